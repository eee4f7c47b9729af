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
public struct SinkhornAttention: Attention {
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
        try checkFloatAllocation([n, n + 2 * shape.headDim], option: "\(variant): the plan and block sums per thread [n_b, n_b + 2·D]")
        try checkFloatAllocation([shape.batch, shape.heads, sortCut ?? n, min(blockSize, shape.keyLength),
                                  shape.headDim + shape.valueDim],
                                 option: "\(variant): sorted blocks [B, H, n_out, min(bs, N), D + Dv]")
    }

    public func cost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        let threads = try threadCount(threads)
        try validate(shape)
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
        let sortWorkers = workerCount(threads: threads, items: shape.batch * shape.heads)
        let sortBytes = WorkspaceCarver.bytes { _ = SinkhornSort.Workspace(carving: &$0, blocks: blocks(shape), headDim: shape.headDim) }
        return AttentionCost(
            flops: sums + logits + balancing + mixing + 2 * Double(pairs) * width,
            workspaceBytes: sortedBytes + sortWorkers * sortBytes
                + TiledSoftmaxAttention.workspaceBytes(shape: shape, threads: threads),
            scoredPairs: pairs)
    }

    public func attend(query: StridedView, key: StridedView, value: StridedView,
                       output: MutableStridedView, logSumExp: MutableStridedView?,
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
        let (q, k, v, o, l) = (call.q, call.k, call.v, call.o, call.lse)
        let n = blocks(shape), outBlocks = sortCut ?? n, rows = min(blockSize, shape.keyLength)
        // The mixed keys and values in workspace scratch.
        withScratchTensor(SIMD4(shape.batch, shape.heads, outBlocks * rows, shape.headDim), zeroed: true) { kOut in
        withScratchTensor(SIMD4(shape.batch, shape.heads, outBlocks * rows, shape.valueDim), zeroed: true) { vOut in
            forEachHead(shape: shape, scale: scale, threads: threads, q: q, k: k, keyLengths: keyLengths,
                        logits: logits) { b, h, plan, settings, gemm in
                let hk = h / shape.groupSize, count = keyLengths?[b] ?? shape.keyLength
                SinkhornSort.mix(k, b: b, h: hk, count: count, width: shape.headDim, rows: rows, outputBlocks: outBlocks,
                                 plan: plan, settings: settings, into: kOut.row(b, h, 0), gemm: gemm)
                SinkhornSort.mix(v, b: b, h: hk, count: count, width: shape.valueDim, rows: rows, outputBlocks: outBlocks,
                                 plan: plan, settings: settings, into: vOut.row(b, h, 0), gemm: gemm)
            }

        var sortedShape = shape
        sortedShape.kvHeads = shape.heads
        sortedShape.keyLength = outBlocks * rows
        let (bs, causal, sortCut) = (blockSize, causal, sortCut)
        func sortedMask(_ b: Int) -> SortedBlockMask {
            SortedBlockMask(blockSize: bs, rows: rows, visibleRows: min(rows, keyLengths?[b] ?? shape.keyLength),
                            causal: causal, sortCut: sortCut)
        }
        let (kSorted, vSorted) = (kOut.readOnly, vOut.readOnly)
        do {
            if sortCut != nil {
                TiledSoftmaxAttention.run(shape: sortedShape, scale: scale, threads: threads,
                                          q: q, k: kSorted, v: vSorted, o: o, lse: l) { b, _ in sortedMask(b) }
            } else {
                TiledSoftmaxAttention.run(shape: shape, scale: scale, threads: threads, byHead: true,
                                          q: q, k: k, v: v, o: o, lse: l) { b, _ in
                    BlockedMask(size: bs, backward: 0, forward: 0, causal: causal, offset: 0,
                                keyEnd: keyLengths?[b] ?? shape.keyLength)
                }
                TiledSoftmaxAttention.run(shape: sortedShape, scale: scale, threads: threads, merge: true, byHead: true,
                                          q: q, k: kSorted, v: vSorted, o: o, lse: l) { b, _ in sortedMask(b) }
            }
        }
        } }
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
                    SinkhornSort.blockSums(q, b: b, h: h, count: shape.queryLength, d: d, settings: settings,
                                           into: space.querySums)
                    SinkhornSort.blockSums(k, b: b, h: hk, count: count, d: d, settings: settings,
                                           into: space.keySums)
                }
                let noise: ((Int, Int) -> Float)? = noiseSeed.map { seed in
                    { t, u in
                        // Gumbel(0, 1) from a generator of its own per entry: the same draw for
                        // every thread count and order of evaluation.
                        var rng = SeededGenerator(seed: seed ^ (UInt64((item * n + t) * n + u) &* 0x9E37_79B9_7F4A_7C15))
                        let uniform = max(rng.nextUnitFloat(), .leastNormalMagnitude)
                        return -logf(-logf(uniform))
                    }
                }
                SinkhornSort.balance(space: space, validBlocks: ceilDiv(count, settings.blockSize), settings: settings,
                                     given: logits == nil ? nil : given.value! + item * n * n, noise: noise)
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

    func maskScores(_ scores: UnsafeMutablePointer<Float>, ld: Int, tile: KeyTile, queries: PositionRun) {}
}
