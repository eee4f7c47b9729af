/// Sparse Sinkhorn attention (Tay et al. 2020): blocks of `b` positions, a learned-free
/// sort of the key blocks by a Sinkhorn-balanced plan `P`, and each query block attending
/// to its sorted block and its own block with one softmax.
///
/// ```
/// // naive reference (what this computes), for each b, h (hk = h / (H / Hkv)), N = Nq = Nk:
/// let L = keyLengths?[b] ?? N, nb = ⌈N / bs⌉, valid(u) = u < ⌈L / bs⌉
/// Q̄[t] = Σ_{i in block t} q[b, h, i],   K̄[u] = Σ_{j in block u, j < L} k[b, hk, j]
/// logP[t][u] = allowed(t, u) ? scale · Q̄[t]·K̄[u] / τ (+ Gumbel noise) : −∞
/// //  allowed(t, u) = valid(u) && (!causal || u < t);  R may be given instead of Q̄·K̄
/// repeat iterations: rows ← rows − logsumexp(row)          // over the allowed entries
///                    columns ← column − logsumexp(column)  // causal: over rows t' ≤ t only
/// P = exp(logP)                                            // disallowed entries exactly 0
/// K̃[t][r] = Σ_u P[t][u] · k[b, hk, u·bs + r],  Ṽ likewise  // rows past L count as 0
/// // query i in block t: one softmax over the sorted rows r < min(bs, L) of K̃[t]
/// // (none for t = 0 when causal) and the own block's keys j < L (causal: j ≤ i);
/// // SortCut n: over the sorted rows of K̃[0] … K̃[n−1] only
/// ```
/// Rows with no visible key are 0 with `lse = -infinity`. The plan is exposed by
/// ``permutation(query:key:keyLengths:sortLogits:)``.
///
/// Kernels: block sums and the logits (a GEMM), log-space balancing and the mixing
/// (`bs` GEMMs of `P` with strided row views of the keys and values) run per batch item and
/// query head (``SinkhornSort``); the attention is the tiled softmax kernel, the own blocks
/// (``BlockedMask``) then the sorted blocks merged by log-sum-exp (``SortedBlockMask``).
/// (KernelDocs/Sinkhorn.md.)
///
/// - Complexity: attention `2 · N · (2·bs) · (D + Dv)` FLOPs per head (SortCut:
///   `2 · N · n · bs · (D + Dv)`), mixing `2 · n_b² · bs · (D + Dv)` (SortCut: `n` rows of
///   `P`), balancing `O(iterations · n_b²)`. Workspace: the sorted blocks
///   (`4 · B · H · n_out · min(bs, N) · (D + Dv)` bytes), the plan (`4 · n_b · ⌈n_b⌉₁₆`) and a GEMM
///   workspace per thread, and the tiled kernel's tiles.
public struct SinkhornAttention: KernelWidening {
    /// Block size `bs` (the paper's default 64 in the benchmark).
    public var blockSize: Int
    /// Sinkhorn rounds (default 7).
    public var iterations: Int
    /// Temperature `τ` (default 0.75), finite and positive.
    public var temperature: Float
    /// Seed of the Gumbel noise added to the logits; `nil` (default): no noise.
    public var noiseSeed: UInt64?
    /// SortCut: every query attends to the first `n` sorted blocks only; `nil`: off.
    public var sortCut: Int?
    public var causal: Bool
    /// Score scale of the logits and the attention; `nil` means `1 / sqrt(D)`. Must be finite.
    public var scale: Float?

    /// The most Sinkhorn rounds a configuration may ask for.
    public static let maxIterations = 1000

    public init(blockSize: Int = 64, iterations: Int = 7, temperature: Float = 0.75, noiseSeed: UInt64? = nil,
                sortCut: Int? = nil, causal: Bool = false, scale: Float? = nil) {
        self.blockSize = blockSize
        self.iterations = iterations
        self.temperature = temperature
        self.noiseSeed = noiseSeed
        self.sortCut = sortCut
        self.causal = causal
        self.scale = scale
    }

    public var name: String { "sinkhorn" }

    /// `n_b = ⌈N / bs⌉` for `shape`.
    func blocks(_ shape: AttentionShape) -> Int { ceilDiv(shape.keyLength, blockSize) }

    public func validate(_ shape: AttentionShape) throws {
        let variant = "Sinkhorn attention"
        try checkPatternShape(shape, scale: scale, variant: variant)
        guard shape.queryLength == shape.keyLength else {
            throw AttentionError.unsupported(
                "\(variant) sorts blocks of one sequence: queryLength (\(shape.queryLength)) must equal keyLength (\(shape.keyLength))")
        }
        try checkOption(blockSize, "blockSize", in: 1...patternLimit, variant: variant)
        try checkOption(iterations, "iterations", in: 0...SinkhornAttention.maxIterations, variant: variant)
        guard temperature.isFinite, temperature > 0 else {
            throw AttentionError.invalidParameter("\(variant): temperature must be finite and positive, got \(temperature)")
        }
        let n = blocks(shape)
        if let sortCut {
            guard !causal else {
                throw AttentionError.unsupported("\(variant): sortCut has no causal form (the first sorted blocks mix every key)")
            }
            try checkOption(sortCut, "sortCut", in: 1...n, variant: "\(variant) (\(n) blocks)")
        }
        try checkFloatAllocation(n, n + 2 * shape.headDim, option: "\(variant): the plan and block sums per thread [n_b, n_b + 2·D]")
        try checkFloatAllocation(shape.batch, shape.heads, sortCut ?? n, min(blockSize, shape.keyLength),
                                 shape.headDim + shape.valueDim,
                                 option: "\(variant): sorted blocks [B, H, n_out, min(bs, N), D + Dv]")
    }

    /// The FLOPs of a call by part (sorting: block sums, logits, balancing; the mixing; the
    /// attention), its scored pairs and the sorted blocks' bytes (keys and values).
    func costParts(_ shape: AttentionShape) -> (sorting: Double, mixing: Double, attention: Double, pairs: Int,
                                                sortedBytes: Int) {
        let n = Double(blocks(shape)), outBlocks = Double(sortCut ?? blocks(shape))
        let rows = min(blockSize, shape.keyLength), width = Double(shape.headDim + shape.valueDim)
        let bh = Double(shape.batch * shape.heads)
        var perHead = 0
        let bs = blockSize, nk = shape.keyLength
        for t in 0..<blocks(shape) {
            let size = min(bs, nk - t * bs)
            if let cut = sortCut {
                perHead += size * cut * rows
            } else {
                let sorted = causal && t == 0 ? 0 : rows
                perHead += size * sorted + (causal ? size * (size + 1) / 2 : size * size)
            }
        }
        let pairs = perHead * shape.batch * shape.heads
        let sums = Double(shape.batch * (shape.heads + shape.kvHeads) * nk * shape.headDim)
        let logits = 2 * n * n * Double(shape.headDim) * bh
        let balancing = 4 * Double(iterations) * n * n * bh
        let mixing = 2 * outBlocks * n * Double(rows) * width * bh
        let sortedBytes = shape.batch * shape.heads * (sortCut ?? blocks(shape)) * rows
            * (shape.headDim + shape.valueDim) * MemoryLayout<Float>.stride
        return (sums + logits + balancing, mixing, 2 * Double(pairs) * width, pairs, sortedBytes)
    }

    /// Bytes of one worker's sorting workspace.
    func sortWorkspaceBytes(_ shape: AttentionShape) -> Int {
        WorkspaceCarver.bytes { _ = SinkhornSort.Workspace(carving: &$0, blocks: blocks(shape), headDim: shape.headDim) }
    }

    public func cost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        let threads = try threadCount(threads)
        try validate(shape)
        let parts = costParts(shape)
        let sortWorkers = workerCount(threads: threads, items: shape.batch * shape.heads)
        return AttentionCost(
            flops: parts.sorting + parts.mixing + parts.attention,
            workspaceBytes: parts.sortedBytes + sortWorkers * sortWorkspaceBytes(shape)
                + TiledSoftmaxAttention.workspaceBytes(shape: shape, threads: threads),
            scoredPairs: parts.pairs)
    }

    /// 16-bit queries and keys are widened a row at a time for the block sums, keys and
    /// values as the mixing GEMM packs them, and all three as the tiled kernel packs them;
    /// a 16-bit output is staged in `Float` when the sorted blocks' pass merges into the own
    /// blocks' (without SortCut), a part at a time (``MergedOutputStaging``).
    func stagedOperands(_ shape: AttentionShape) -> (query: Bool, output: Bool) { (false, sortCut == nil) }

    func stagedOutputElements(_ shape: AttentionShape) -> Int { MergedOutputStaging.elements(shape) }

    public func attend(query: ActivationView, key: ActivationView, value: ActivationView,
                       output: MutableActivationView, logSumExp: MutableStridedView?,
                       keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws {
        try withCheckedCall(query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                            keyLengths: keyLengths, workspace: workspace, threads: threads, scale: scale) { call in
            try run(call, logits: nil)
        }
    }

    /// Attention with the sort logits `R [B, H, n_b, n_b]` given by the caller (a learned
    /// sort network) instead of `scale · Q̄ K̄ᵀ`; `nil` computes them. `R` is divided by `τ`.
    public func attend(query: Tensor, key: Tensor, value: Tensor, sortLogits: Tensor?,
                       keyLengths: [Int]? = nil, threads: Int? = nil) throws -> AttentionResult {
        try allocatingCall(query: query, key: key, value: value) { q, k, v, o, l in
            try withCheckedCall(query: q, key: k, value: v, output: o, logSumExp: l, keyLengths: keyLengths,
                                workspace: nil, threads: threads, scale: scale) { call in
                try run(call, logits: checkedLogits(sortLogits, shape: call.shape))
            }
        }
    }

    /// The attention of a checked call, with the sort logits given (`logits`) or computed.
    private func run(_ call: ViewCall, logits: [Float]?) throws {
        let (shape, scale, threads, keyLengths) = (call.shape, call.scale, call.threadCount, call.keyLengths)
        let (q, k, v) = (call.q, call.k, call.v)
        let n = blocks(shape), outBlocks = sortCut ?? n, rows = min(blockSize, shape.keyLength)
        // The mixed keys and values in workspace scratch.
        withScratchTensor(SIMD4(shape.batch, shape.heads, outBlocks * rows, shape.headDim), zeroed: true) { kOut in
        withScratchTensor(SIMD4(shape.batch, shape.heads, outBlocks * rows, shape.valueDim), zeroed: true) { vOut in
            sortAndMix(shape: shape, scale: scale, threads: threads, q: q, k: k, v: v, keyLengths: keyLengths,
                       logits: logits, kOut: kOut, vOut: vOut, plans: nil)

        let (bs, causal, sortCut, sortedKeys) = (blockSize, causal, sortCut, sortedShape(shape).keyLength)
        // Without SortCut the sorted blocks' pass merges into the own blocks' (so a 16-bit
        // output is formed in `Float`, part by part); with it, one pass over the sorted blocks.
        TiledSoftmaxAttention.attendPattern(call, merging: sortCut == nil) { own in
            // The same items and heads over their sorted blocks (one key/value head per query head).
            let part = own.shape, (b, h) = (own.firstItem, own.firstHead)
            let sorted = PatternCall(
                shape: AttentionShape(batch: part.batch, heads: part.heads, kvHeads: part.heads,
                                      queryLength: part.queryLength, keyLength: sortedKeys,
                                      headDim: part.headDim, valueDim: part.valueDim),
                scale: own.scale, threads: own.threads, keyLengths: own.keyLengths, q: own.q,
                k: TensorView(base: UnsafePointer(kOut.row(b, h, 0)), strides: kOut.strides),
                v: TensorView(base: UnsafePointer(vOut.row(b, h, 0)), strides: vOut.strides),
                o: own.o, lse: own.lse, firstItem: b, firstHead: h)
            if sortCut == nil {
                own.run { _, keyEnd in
                    BlockedMask(size: bs, backward: 0, forward: 0, causal: causal, offset: 0, keyEnd: keyEnd)
                }
            }
            sorted.run(merge: sortCut == nil) { _, keyEnd in sortedMask(shape, keyLength: keyEnd) }
        }
        } }
    }

    /// The plan of every (batch item, query head) and the sorted blocks `K̃ = P K`, `Ṽ = P V`
    /// into `kOut`, `vOut` (`[B, H, n_out · rows, ·]`); with `plans`, each plan is also
    /// copied there (`[B · H, n_b, ⌈n_b⌉₁₆]`, rows `⌈n_b⌉₁₆` apart).
    func sortAndMix(shape: AttentionShape, scale: Float, threads: Int, q: TensorView, k: TensorView, v: TensorView,
                    keyLengths: [Int]?, logits: [Float]?, kOut: MutableTensorView, vOut: MutableTensorView,
                    plans: UnsafeMutablePointer<Float>?) {
        let n = blocks(shape), outBlocks = sortCut ?? n, rows = min(blockSize, shape.keyLength)
        let plans = UncheckedSendable(plans), planFloats = n * roundUp(n, 16)
        forEachHead(shape: shape, scale: scale, threads: threads, q: q, k: k, keyLengths: keyLengths,
                    logits: logits) { b, h, plan, settings, gemm in
            let hk = h / shape.groupSize, count = keyLengths?[b] ?? shape.keyLength
            SinkhornSort.mix(k, b: b, h: hk, count: count, width: shape.headDim, rows: rows, outputBlocks: outBlocks,
                             plan: plan, settings: settings, into: kOut.row(b, h, 0), gemm: gemm)
            SinkhornSort.mix(v, b: b, h: hk, count: count, width: shape.valueDim, rows: rows, outputBlocks: outBlocks,
                             plan: plan, settings: settings, into: vOut.row(b, h, 0), gemm: gemm)
            plans.value?.advanced(by: (b * shape.heads + h) * planFloats).update(from: plan, count: planFloats)
        }
    }

    /// The attention problem over the sorted blocks: one key/value head per query head,
    /// `n_out · min(bs, N)` keys.
    func sortedShape(_ shape: AttentionShape) -> AttentionShape {
        var sorted = shape
        sorted.kvHeads = shape.heads
        sorted.keyLength = (sortCut ?? blocks(shape)) * min(blockSize, shape.keyLength)
        return sorted
    }

    /// The sorted blocks' mask for a batch item with `length` valid keys.
    func sortedMask(_ shape: AttentionShape, keyLength length: Int) -> SortedBlockMask {
        let rows = min(blockSize, shape.keyLength)
        return SortedBlockMask(blockSize: blockSize, rows: rows, visibleRows: min(rows, length), causal: causal,
                               sortCut: sortCut)
    }

    /// The balanced plan `P [B, H, n_b, n_b]` the call with these inputs uses (the rows
    /// past SortCut's `n` included); `sortLogits` as in
    /// ``attend(query:key:value:sortLogits:keyLengths:threads:)``.
    public func permutation(query: Tensor, key: Tensor, keyLengths: [Int]? = nil,
                            sortLogits: Tensor? = nil, threads: Int? = nil) throws -> Tensor {
        let (shape, scale) = try checkedCall(query: query, key: key, value: key, keyLengths: keyLengths,
                                             threads: threads, scale: self.scale)
        let logits = try checkedLogits(sortLogits, shape: shape)
        let threads = try threadCount(threads)
        let n = blocks(shape)
        var plans = try Tensor(shape: [shape.batch, shape.heads, n, n])
        query.withView { q in key.withView { k in plans.withMutableView { out in
            forEachHead(shape: shape, scale: scale, threads: threads, q: q, k: k,
                        keyLengths: keyLengths, logits: logits) { b, h, plan, _, _ in
                for t in 0..<n { out.row(b, h, t).update(from: plan + t * roundUp(n, 16), count: n) }
            }
        } } }
        return plans
    }

    /// `sortLogits` checked (`[B, H, n_b, n_b]`, finite) and laid out row-major.
    private func checkedLogits(_ sortLogits: Tensor?, shape: AttentionShape) throws -> [Float]? {
        guard let sortLogits else { return nil }
        let n = blocks(shape), expected = [shape.batch, shape.heads, n, n]
        guard sortLogits.shape == expected else {
            throw AttentionError.shapeMismatch("Sinkhorn attention: sortLogits is \(sortLogits.shape), expected [B, H, n_b, n_b] = \(expected)")
        }
        let elements = sortLogits.elements
        if let index = elements.firstIndex(where: { !$0.isFinite }) {
            throw AttentionError.invalidParameter("Sinkhorn attention: sortLogits[\(index)] must be finite, got \(elements[index])")
        }
        return elements
    }

    /// Computes the plan of every (batch item, query head) on `threads` workers and hands
    /// it to `body` (with the settings and the worker's GEMM workspace).
    private func forEachHead(shape: AttentionShape, scale: Float, threads: Int, q: TensorView, k: TensorView,
                             keyLengths: [Int]?, logits: [Float]?,
                             _ body: (_ b: Int, _ h: Int, _ plan: UnsafePointer<Float>, SinkhornSort.Settings,
                                      Gemm.Workspace) -> Void) {
        let n = blocks(shape), d = shape.headDim
        let settings = SinkhornSort.Settings(blockSize: blockSize, blocks: n, iterations: iterations,
                                             temperature: temperature, causal: causal, scale: scale)
        let items = shape.batch * shape.heads
        let workers = workerCount(threads: threads, items: items)
        let noiseSeed = noiseSeed
        WorkspaceArena.withWorkspaces(workers: workers, layout: {
            SinkhornSort.Workspace(carving: &$0, blocks: n, headDim: d)
        }) { spaces in
        (logits ?? []).withUnsafeBufferPointer { given in
            let given = UncheckedSendable(given.baseAddress)
            parallelForEach(items: items, threads: workers) { item, worker in
                let b = item / shape.heads, h = item % shape.heads, hk = h / shape.groupSize
                let space = spaces[worker], count = keyLengths?[b] ?? shape.keyLength
                if logits == nil {
                    precondition(d <= space.gemm.aCapacity, "a row must fit the widening stage (D ≤ 256)")
                    SinkhornSort.blockSums(q, b: b, h: h, count: shape.queryLength, d: d, settings: settings,
                                           into: space.querySums, stage: space.gemm.a)
                    SinkhornSort.blockSums(k, b: b, h: hk, count: count, d: d, settings: settings,
                                           into: space.keySums, stage: space.gemm.a)
                }
                SinkhornSort.balance(space: space, validBlocks: ceilDiv(count, settings.blockSize), settings: settings,
                                     given: logits == nil ? nil : given.value! + item * n * n,
                                     noise: noiseSeed.map { (seed: $0, item: item) })
                SinkhornSort.exponentiate(space: space, blocks: n)
                body(b, h, space.logits, settings, space.gemm)
            }
        }
        }
    }
}

/// Sinkhorn attention's sorted blocks, stored `rows` apart per block: query tiles within
/// block `t` (``QueryPartition/blocks(size:origin:)``) see the first `visibleRows` rows of
/// sorted block `t` (none for `t = 0` when causal), or with SortCut (any query tiles) the
/// first `visibleRows` rows of sorted blocks `0 ..< n`. Every listed tile is fully visible.
struct SortedBlockMask: TileMask {
    var blockSize: Int
    var rows: Int
    var visibleRows: Int
    var causal: Bool
    var sortCut: Int?

    var queryPartition: QueryPartition { sortCut == nil ? .blocks(size: blockSize, origin: 0) : .tiles }

    func forEachKeyTile(queries: PositionRun, tileSize: Int, _ body: (KeyTile) -> Void) {
        func block(_ u: Int) {
            forEachTile(from: u * rows, through: u * rows + visibleRows - 1, tileSize: tileSize) {
                body(KeyTile(keys: $0, fullyVisible: true))
            }
        }
        if let n = sortCut {
            for u in 0..<n { block(u) }
        } else {
            let t = queries.start / blockSize
            if !(causal && t == 0) { block(t) }
        }
    }

    /// Hides the sorted rows `r ≥ visibleRows` of each block (the forward lists none; the
    /// backward's SortCut tiles may span several blocks).
    func maskScores(_ scores: UnsafeMutablePointer<Float>, ld: Int, tile: KeyTile, queries: PositionRun) {
        let all = SIMDMask<SIMD16<Int32>>(repeating: true), none = SIMDMask<SIMD16<Int32>>(repeating: false)
        let rows = rows, visibleRows = visibleRows
        maskTransposedScores(scores, ld: ld, keys: tile.keys, queries: queries) { j, _ in
            j % rows >= visibleRows ? all : none
        }
    }
}

extension SortedBlockMask: TransposedTileMask {
    func backwardQueryTileCount(queryLength: Int, queryTile: Int) -> Int {
        queryPartition.tileCount(queryLength: queryLength, tileSize: queryTile)
    }

    /// Sorted block `u`'s rows are seen by the query tiles of block `u` (none for `u = 0`
    /// when causal), with SortCut by every query tile: each tile against the block's keys
    /// it sees (SortCut: their hull, rows past `visibleRows` masked).
    func forEachQueryTile(seeing keys: PositionRun, queryLength: Int, queryTile: Int,
                          _ body: (_ index: Int, _ queries: PositionRun, _ tile: KeyTile) -> Void) {
        precondition(keys.step == 1, "sorted blocks are listed in contiguous key blocks")
        /// The visible rows of sorted block `u` within the key block.
        func visible(_ u: Int) -> (Int, Int)? {
            let a = max(keys.start, u * rows), z = min(keys.last, u * rows + visibleRows - 1)
            return a <= z ? (a, z) : nil
        }
        let firstBlock = keys.start / rows, lastBlock = keys.last / rows
        if let cut = sortCut {
            guard firstBlock < cut else { return }
            let blocks = (firstBlock...min(lastBlock, cut - 1)).compactMap(visible)
            guard let a = blocks.first?.0, let z = blocks.last?.1 else { return }
            let full = blocks.count == 1 || visibleRows == rows
            forEachContiguousQueryTile(queryPartition, queryLength: queryLength, queryTile: queryTile,
                                       from: 0, through: queryLength - 1) { index, queries in
                body(index, queries, KeyTile(keys: PositionRun(start: a, count: z - a + 1), fullyVisible: full))
            }
        } else {
            for u in firstBlock...lastBlock where !(causal && u == 0) {
                guard let (a, z) = visible(u) else { continue }
                forEachContiguousQueryTile(queryPartition, queryLength: queryLength, queryTile: queryTile,
                                           from: u * blockSize, through: (u + 1) * blockSize - 1) { index, queries in
                    body(index, queries, KeyTile(keys: PositionRun(start: a, count: z - a + 1), fullyVisible: true))
                }
            }
        }
    }

    func visibleQueryIndices(tile: KeyTile, queries: PositionRun, keys: Range<Int>) -> Range<Int> {
        keys.isEmpty ? 0..<0 : 0..<queries.count
    }
}

extension SinkhornAttention: KernelWideningBackward {
    /// The backward with the plan `P` held fixed (KernelDocs/Sinkhorn.md, "Backward"; the
    /// spec's "routes, buckets ... held fixed", as LSH's buckets): no gradient flows through
    /// the sort logits into the queries and keys. The plan and the sorted blocks are
    /// recomputed as in the forward; the flash backward (``TiledSoftmaxBackward``, the
    /// forward's final output and log-sum-exp) runs the own blocks (``BlockedMask``, writing
    /// `dK`, `dV`) then the sorted blocks (``SortedBlockMask``, giving `dK̃`, `dṼ` per query
    /// head); the mixing `K̃_t = Σ_u P_tu K_u` is linear, so its transpose on the GEMM adds
    /// `dK_u += Σ_h Σ_t P_h[t, u] dK̃_h[t]` (the query heads of the group in order), the same
    /// for `V`. SortCut has no own-block pass (`dK`, `dV` start from 0). `∂L/∂P`, to train a
    /// caller's sort network, comes from
    /// ``parameterGradients(query:key:value:result:outputGradient:keyLengths:sortLogits:threads:)``.
    ///
    /// ```
    /// // naive reference, for each b, h (hk = h / (H / Hkv)), P = the forward's plan (fixed):
    /// dQ, dK (own blocks), dK̃, dṼ = softmax backward over [K̃_t ; K_t] with the forward's lse
    /// dK[b, hk, u·bs + r] += Σ_t P[t][u] · dK̃[t][r],  dV likewise     (u·bs + r < L)
    /// ∂L/∂P[b, h, t, u] = Σ_r dot(dK̃[t][r], k[b, hk, u·bs + r]) + dot(dṼ[t][r], v[b, hk, u·bs + r])
    /// ```
    ///
    /// - Complexity: the sorting and mixing again, `2.5 ×` the attention's FLOPs and the
    ///   mixing's once more for its transpose. Workspace: the sorted blocks and their
    ///   gradients (`8 · B · H · n_out · min(bs, N) · (D + Dv)` bytes), every head's plan
    ///   (`4 · B · H · n_b · ⌈n_b⌉₁₆` bytes) and the largest of the sorting's, the flash
    ///   backward's and the transposed mixing's per-thread buffers.
    public func gradients(query: StridedView, key: StridedView, value: StridedView, output: StridedView,
                          logSumExp: StridedView, outputGradient: StridedView,
                          dQuery: MutableStridedView, dKey: MutableStridedView, dValue: MutableStridedView,
                          keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws {
        try tiledGradients(query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                           outputGradient: outputGradient, dQuery: dQuery, dKey: dKey, dValue: dValue,
                           keyLengths: keyLengths, workspace: workspace, threads: threads)
    }

    /// The own blocks' pass and the sorted blocks' read 16-bit operands as the tiled
    /// backward packs them, the re-run sorting and mixing as the forward does; `dK`, `dV`
    /// get the mixing's transpose added after the passes (staged when 16-bit).
    func tiledBackward(_ call: TiledBackwardCall) throws {
        try checkPlanAllocation(call.shape)
        backward(call, logits: nil, permutationGradient: nil)
    }

    func addsKeyGradients(_ shape: AttentionShape) throws -> Bool { true }

    /// `dQ`, `dK`, `dV` and `∂L/∂P [B, H, n_b, n_b]` (the gradient with respect to the plan
    /// as the mixing uses it, every entry, rows past SortCut's `n` 0) through the call that
    /// gave `result`, with the sort logits the forward was given (`sortLogits`, as in
    /// ``attend(query:key:value:sortLogits:keyLengths:threads:)``) or computed (`nil`).
    /// A caller's sort network takes `∂L/∂P` back through the Sinkhorn balancing (or its
    /// own relaxation) to its logits.
    ///
    /// - Complexity: the backward's plus the mixing's FLOPs; bitwise identical for every
    ///   thread count (one work item per batch item and query head).
    public func parameterGradients(query: Tensor, key: Tensor, value: Tensor, result: AttentionResult,
                                   outputGradient: Tensor, keyLengths: [Int]? = nil, sortLogits: Tensor? = nil,
                                   threads: Int? = nil) throws -> (inputs: AttentionGradients, permutation: Tensor) {
        let s = try checkedGradientCall(query: query, key: key, value: value, output: result.output,
                                        logSumExp: result.logSumExp, outputGradient: outputGradient,
                                        keyLengths: keyLengths, threads: threads, scale: scale)
        let shape = s.shape, logits = try checkedLogits(sortLogits, shape: shape)
        let n = blocks(shape)
        try checkPlanAllocation(shape)
        var dq = try Tensor(shape: [shape.batch, shape.heads, shape.queryLength, shape.headDim])
        var dk = try Tensor.uninitializedOutput(shape: [shape.batch, shape.kvHeads, shape.keyLength, shape.headDim])
        var dv = try Tensor.uninitializedOutput(shape: [shape.batch, shape.kvHeads, shape.keyLength, shape.valueDim])
        var dp = try Tensor(shape: [shape.batch, shape.heads, n, n])
        let threads = try threadCount(threads)
        try query.withStridedView { q in try key.withStridedView { k in try value.withStridedView { v in
        try result.output.withStridedView { o in try result.logSumExp.withStridedView { l in
        try outputGradient.withStridedView { g in
        try dq.withMutableStridedView { dQ in try dk.withMutableStridedView { dK in try dv.withMutableStridedView { dV in
        dp.withMutableView { dP in
            backward(TiledBackwardCall(shape: shape, scale: s.scale, threads: threads, keyLengths: keyLengths,
                                       query: q, key: k, value: v, output: o, logSumExp: l, outputGradient: g,
                                       dQuery: dQ, dKey: dK, dValue: dV),
                     logits: logits, permutationGradient: dP)
        }
        } } } } } } } } }
        return (AttentionGradients(dQuery: dq, dKey: dk, dValue: dv), dp)
    }

    public func backwardCost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        let forward = try cost(shape, threads: threads)
        let threads = try threadCount(threads)
        let parts = costParts(shape), n = blocks(shape)
        let planBytes = shape.batch * shape.heads * n * roundUp(n, 16) * MemoryLayout<Float>.stride
        let sortWorkers = workerCount(threads: threads, items: shape.batch * shape.heads)
        let mixWorkers = workerCount(threads: threads, items: shape.batch * shape.kvHeads)
        let mixTile = roundUp(n * max(shape.headDim, shape.valueDim) * MemoryLayout<Float>.stride,
                              WorkspaceCarver.alignment)
        let kernels = [sortWorkers * sortWorkspaceBytes(shape),
                       TiledSoftmaxBackward.workspaceBytes(shape: shape, threads: threads),
                       TiledSoftmaxBackward.workspaceBytes(shape: sortedShape(shape), threads: threads),
                       mixWorkers * (Gemm.Workspace.byteCount() + mixTile)]
        return AttentionCost(flops: parts.sorting + 2 * parts.mixing + 2.5 * parts.attention,
                             workspaceBytes: 2 * parts.sortedBytes + roundUp(planBytes, WorkspaceCarver.alignment)
                                + kernels.max()!,
                             scoredPairs: forward.scoredPairs)
    }

    /// `∂L/∂R` for sort logits `R [B, H, n_b, n_b]` given to the forward
    /// (``attend(query:key:value:sortLogits:keyLengths:threads:)``), from `∂L/∂P` (the
    /// `permutation` of ``parameterGradients(query:key:value:result:outputGradient:keyLengths:sortLogits:threads:)``):
    /// the backward of the unrolled Sinkhorn balancing (KernelDocs/Sinkhorn.md, "Backward"),
    /// for a caller's learned sort network. Disallowed entries (invalid blocks, causal
    /// `u ≥ t`) get 0; the Gumbel noise, when configured, is the forward's.
    ///
    /// ```
    /// // naive reference, per (b, h): x₀ = R / τ (+ noise), −∞ where not allowed
    /// // forward: repeat iterations { y = x − rowLSE(x); x = y − colLSE(y) };  P = exp(x)
    /// // backward: g = ∂L/∂P ∘ P; per round, last first:
    /// //   g ← g − exp(x) ∘ colsum(g)    (causal: the prefix columns' transposed sums)
    /// //   g ← g − exp(y) ∘ rowsum(g)
    /// ∂L/∂R = g / τ
    /// ```
    ///
    /// - Throws: what the forward throws for the options, ``AttentionError/shapeMismatch(_:)``
    ///   naming `permutationGradient` or `sortLogits` when they are not both
    ///   `[B, H, n_b, n_b]`, ``AttentionError/invalidParameter(_:)`` for non-finite entries or
    ///   key lengths outside `0 … n_b · bs`.
    /// - Complexity: `O(iterations · n_b²)` per head, `16 · iterations · n_b²` bytes of
    ///   scratch per head (the rounds' states, in `Double`).
    public func sortLogitsGradient(permutationGradient: Tensor, sortLogits: Tensor,
                                   keyLengths: [Int]? = nil) throws -> Tensor {
        let dims = sortLogits.shape
        guard dims.count == 4, dims[2] == dims[3], dims[2] >= 1 else {
            throw AttentionError.shapeMismatch("Sinkhorn attention: sortLogits is \(dims), expected [B, H, n_b, n_b]")
        }
        guard permutationGradient.shape == dims else {
            throw AttentionError.shapeMismatch(
                "Sinkhorn attention: permutationGradient is \(permutationGradient.shape), expected sortLogits' \(dims)")
        }
        let (batch, heads, n) = (dims[0], dims[1], dims[2])
        guard let length = checkedProduct([n, blockSize]) else {
            throw AttentionError.invalidParameter("Sinkhorn attention: n_b · blockSize overflows")
        }
        let shape = AttentionShape(batch: batch, heads: heads, kvHeads: heads, queryLength: length, keyLength: length,
                                   headDim: 1, valueDim: 1)
        try validate(shape)
        try checkCallArguments(shape, keyLengths: keyLengths, threads: nil)
        try checkFloatAllocation(4 * max(iterations, 1), n, n, option: "Sinkhorn attention: the unrolled rounds' states")
        let logits = try checkedLogits(sortLogits, shape: shape)!
        let dP = permutationGradient.elements
        if let index = dP.firstIndex(where: { !$0.isFinite }) {
            throw AttentionError.invalidParameter(
                "Sinkhorn attention: permutationGradient[\(index)] must be finite, got \(dP[index])")
        }
        var gradient = [Float](repeating: 0, count: logits.count)
        for item in 0..<(batch * heads) {
            let b = item / heads, valid = ceilDiv(keyLengths?[b] ?? length, blockSize)
            let base = item * n * n
            var input = [Float](repeating: -.infinity, count: n * n)
            for t in 0..<n { for u in 0..<n where u < valid && (!causal || u < t) {
                let noise = noiseSeed.map { SinkhornSort.gumbel(seed: $0, item: item, blocks: n, t: t, u: u) } ?? 0
                input[t * n + u] = min(max(logits[base + t * n + u] / temperature + noise, -1e30), 1e30)
            } }
            let g = SinkhornSort.balanceGradient(input: input, blocks: n, iterations: iterations, causal: causal,
                                                 permutationGradient: Array(dP[base..<(base + n * n)]))
            for e in 0..<(n * n) { gradient[base + e] = g[e] / temperature }
        }
        return try Tensor(shape: dims, data: gradient)
    }

    /// Checks the backward's copy of every head's plan (`[B, H, n_b, ⌈n_b⌉₁₆]`, which also
    /// bounds `∂L/∂P`).
    private func checkPlanAllocation(_ shape: AttentionShape) throws {
        let n = blocks(shape)
        try checkFloatAllocation(shape.batch, shape.heads, n, roundUp(n, 16),
                                 option: "Sinkhorn attention backward: the plans [B, H, n_b, n_b]")
    }

    /// The backward of a checked call (see ``gradients(query:key:value:output:logSumExp:outputGradient:dQuery:dKey:dValue:keyLengths:workspace:threads:)``);
    /// with `permutationGradient` (`[B, H, n_b, n_b]`, zero on entry) also `∂L/∂P`.
    private func backward(_ call: TiledBackwardCall, logits: [Float]?, permutationGradient dP: MutableTensorView?) {
        let shape = call.shape, sorted = sortedShape(shape)
        let n = blocks(shape), ld = roundUp(n, 16), outBlocks = sortCut ?? n, rows = min(blockSize, shape.keyLength)
        let (bs, d, dv) = (blockSize, shape.headDim, shape.valueDim)
        withScratchTensor(SIMD4(shape.batch, shape.heads, outBlocks * rows, d), zeroed: true) { kOut in
        withScratchTensor(SIMD4(shape.batch, shape.heads, outBlocks * rows, dv), zeroed: true) { vOut in
        withScratchTensor(SIMD4(shape.batch, shape.heads, outBlocks * rows, d)) { dkOut in
        withScratchTensor(SIMD4(shape.batch, shape.heads, outBlocks * rows, dv)) { dvOut in
        withScratchTensor(SIMD4(shape.batch, shape.heads, n, ld)) { plans in
            sortAndMix(shape: shape, scale: call.scale, threads: call.threads, q: call.q, k: call.k, v: call.v,
                       keyLengths: call.keyLengths, logits: logits, kOut: kOut, vOut: vOut, plans: plans.base)
            // dQ and the own blocks' dK, dV (SortCut: none, dK and dV start from 0).
            if sortCut == nil {
                call.run { _, keyEnd in
                    BlockedMask(size: bs, backward: 0, forward: 0, causal: causal, offset: 0, keyEnd: keyEnd)
                }
            } else {
                for (target, width) in [(call.dK, d), (call.dV, dv)] {
                    for b in 0..<shape.batch { for hk in 0..<shape.kvHeads { for j in 0..<shape.keyLength {
                        let row = target.row(b, hk, j)
                        for c in 0..<width { row[c * target.strides[3]] = 0 }
                    } } }
                }
            }
            // dQ (added) and dK̃, dṼ per query head.
            TiledSoftmaxBackward.run(shape: sorted, scale: call.scale, threads: call.threads,
                                     q: call.q, k: kOut.readOnly, v: vOut.readOnly, o: call.o, lse: call.lse,
                                     dO: call.dO, dQ: call.dQ, dK: dkOut, dV: dvOut) { b, _ in
                sortedMask(shape, keyLength: call.keyEnd(b))
            }
            let (dkc, dvc, plan) = (dkOut.readOnly, dvOut.readOnly, plans.readOnly)
            // dK_u += Σ_h P_hᵀ dK̃_h, row offset by row offset, one work item per (b, hk).
            let items = shape.batch * shape.kvHeads
            let workers = workerCount(threads: call.threads, items: items)
            WorkspaceArena.withWorkspaces(workers: workers, layout: { carver -> (Gemm.Workspace, UnsafeMutablePointer<Float>) in
                (Gemm.Workspace(carving: &carver), carver.take(n * max(d, dv)))
            }) { spaces in
                parallelForEach(items: items, threads: workers) { item, worker in
                    let b = item / shape.kvHeads, hk = item % shape.kvHeads, count = call.keyEnd(b)
                    let (gemm, tile) = spaces[worker]
                    func scatter(_ gradient: TensorView, into target: MutableTensorView, width: Int) {
                        for r in 0..<min(rows, count) {
                            let depth = ceilDiv(count - r, bs)          // blocks that have row r
                            for (index, h) in (hk * shape.groupSize..<(hk + 1) * shape.groupSize).enumerated() {
                                Gemm.multiply(m: depth, n: width, depth: outBlocks,
                                              a: MatrixOperand(base: plan.row(b, h, 0), rowStride: 1, columnStride: ld),
                                              b: .matrix(MatrixOperand(base: gradient.row(b, h, r),
                                                                       rowStride: rows * width, columnStride: 1)),
                                              c: tile, ldc: width, accumulate: index > 0, workspace: gemm)
                            }
                            for u in 0..<depth {
                                axpy(1, tile + u * width, 1, target.row(b, hk, u * bs + r), target.strides[3],
                                     count: width)
                            }
                        }
                    }
                    scatter(dkc, into: call.dK, width: d)
                    scatter(dvc, into: call.dV, width: dv)
                }
            }
            // ∂L/∂P[t, u] = Σ_r dK̃[t][r] · k[u·bs + r] + dṼ[t][r] · v[u·bs + r], per (b, h).
            guard let dP else { return }
            let heads = shape.batch * shape.heads
            let planWorkers = workerCount(threads: call.threads, items: heads)
            WorkspaceArena.withWorkspaces(workers: planWorkers, layout: { Gemm.Workspace(carving: &$0) }) { spaces in
                parallelForEach(items: heads, threads: planWorkers) { item, worker in
                    let b = item / shape.heads, h = item % shape.heads, hk = h / shape.groupSize
                    let count = call.keyEnd(b)
                    for (gradient, source, width) in [(dkc, call.k, d), (dvc, call.v, dv)] {
                        for r in 0..<min(rows, count) {
                            Gemm.multiply(m: outBlocks, n: ceilDiv(count - r, bs), depth: width,
                                          a: MatrixOperand(base: gradient.row(b, h, r), rowStride: rows * width,
                                                           columnStride: 1),
                                          b: .matrix(MatrixOperand(base: source.row(b, hk, r),
                                                                   rowStride: source.strides[3],
                                                                   columnStride: bs * source.strides[2])),
                                          c: dP.row(b, h, 0), ldc: dP.strides[2], accumulate: true,
                                          workspace: spaces[worker])
                        }
                    }
                }
            }
        } } } } }
    }

}
