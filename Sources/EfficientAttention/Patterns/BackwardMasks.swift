/// The key-major listings (``TransposedTileMask``) of the fixed patterns' masks, for the
/// backward pass (``TiledSoftmaxBackward``), and the masks only the backward needs.
///
/// A pattern the forward runs as several passes merged by log-sum-exp runs backward as
/// the same passes (or a split of them), each with the final output and log-sum-exp:
/// the passes' pairs are disjoint, so their terms add up to the whole backward
/// (``TiledSoftmaxBackward/run(shape:scale:threads:keyBlocks:accumulate:q:k:v:o:lse:dO:dQ:dK:dV:mask:)``).

/// Calls `body(index, queries)`, in index order, for the tiles of `partition` (a partition
/// of contiguous tiles: ``QueryPartition/tiles`` or ``QueryPartition/blocks(size:origin:)``)
/// holding a query in `lo...hi`.
///
/// - Complexity: O(log(tiles)) to find the first, then O(1) per tile.
func forEachContiguousQueryTile(_ partition: QueryPartition, queryLength n: Int, queryTile br: Int,
                                from lo: Int, through hi: Int, _ body: (_ index: Int, _ queries: PositionRun) -> Void) {
    let lo = max(0, lo), hi = min(n - 1, hi)
    guard lo <= hi else { return }
    let count = partition.tileCount(queryLength: n, tileSize: br)
    // The tiles are disjoint and in increasing order: the first whose last query is at least lo.
    var a = 0, z = count
    while a < z {
        let mid = (a + z) / 2
        let tile = partition.tile(mid, queryLength: n, tileSize: br)
        if tile.count > 0 && tile.last < lo { a = mid + 1 } else { z = mid }
    }
    var index = a
    while index < count {
        let queries = partition.tile(index, queryLength: n, tileSize: br)
        if queries.count > 0 {
            guard queries.start <= hi else { return }
            body(index, queries)
        }
        index += 1
    }
}

// MARK: - Local attention

extension BlockedMask: TransposedTileMask {
    /// The forward's partition (query tiles never straddle a block), so each listed tile
    /// sees one key interval and only the causal diagonal is masked, as in the forward.
    func backwardQueryTileCount(queryLength: Int, queryTile: Int) -> Int {
        queryPartition.tileCount(queryLength: queryLength, tileSize: queryTile)
    }

    /// Query position `p` (block `⌊p / size⌋`) sees key `j` iff
    /// `⌊j / size⌋ − forward ≤ ⌊p / size⌋ ≤ ⌊j / size⌋ + backward`, and `p ≥ j` (causal).
    func forEachQueryTile(seeing keys: PositionRun, queryLength: Int, queryTile: Int,
                          _ body: (_ index: Int, _ queries: PositionRun, _ tile: KeyTile) -> Void) {
        precondition(keys.step == 1, "blocked local masks list contiguous key blocks")
        let first = keys.start, last = min(keys.last, keyEnd - 1)
        guard first <= last else { return }
        let lowP = max((floorDiv(first, size) - forward) * size, causal ? first : Int.min)
        let highP = (floorDiv(last, size) + backward + 1) * size - 1
        forEachContiguousQueryTile(queryPartition, queryLength: queryLength, queryTile: queryTile,
                                   from: lowP - offset, through: highP - offset) { index, queries in
            let firstP = queries.start + offset, lastP = queries.last + offset
            let t = floorDiv(firstP, size)
            let lo = max(first, (t - backward) * size)
            let hi = min(last, (t + forward + 1) * size - 1, causal ? lastP : Int.max)
            guard lo <= hi else { return }
            body(index, queries, KeyTile(keys: PositionRun(start: lo, count: hi - lo + 1),
                                         fullyVisible: !causal || hi <= firstP))
        }
    }

    /// Every query of the block sees the listed keys but for the causal rule: key `j` is
    /// seen by the queries at positions `p ≥ j`.
    func visibleQueryIndices(tile: KeyTile, queries: PositionRun, keys: Range<Int>) -> Range<Int> {
        guard !keys.isEmpty else { return 0..<0 }
        guard causal else { return 0..<queries.count }
        return runIndices(queries, from: tile.keys.position(keys.lowerBound) - offset, through: queries.last)
    }
}

extension LocalMask: TransposedTileMask {
    func backwardQueryTileCount(queryLength: Int, queryTile: Int) -> Int {
        switch self {
        case .window(let m): return m.backwardQueryTileCount(queryLength: queryLength, queryTile: queryTile)
        case .blocked(let m): return m.backwardQueryTileCount(queryLength: queryLength, queryTile: queryTile)
        }
    }

    func forEachQueryTile(seeing keys: PositionRun, queryLength: Int, queryTile: Int,
                          _ body: (_ index: Int, _ queries: PositionRun, _ tile: KeyTile) -> Void) {
        switch self {
        case .window(let m): m.forEachQueryTile(seeing: keys, queryLength: queryLength, queryTile: queryTile, body)
        case .blocked(let m): m.forEachQueryTile(seeing: keys, queryLength: queryLength, queryTile: queryTile, body)
        }
    }

    func visibleQueryIndices(tile: KeyTile, queries: PositionRun, keys: Range<Int>) -> Range<Int> {
        switch self {
        case .window(let m): return m.visibleQueryIndices(tile: tile, queries: queries, keys: keys)
        case .blocked(let m): return m.visibleQueryIndices(tile: tile, queries: queries, keys: keys)
        }
    }
}

// MARK: - Strided attention

extension StridedColumnMask: TransposedTileMask {
    /// The forward's partition: residue classes of the queries modulo the stride.
    func backwardQueryTileCount(queryLength: Int, queryTile: Int) -> Int {
        queryPartition.tileCount(queryLength: queryLength, tileSize: queryTile)
    }

    /// Keys come in residue classes (blocks of step `stride`, ``TiledSoftmaxBackward/KeyBlocks``
    /// with `modulus = stride`): key `j` is seen by the queries of its class (positions
    /// `p ≡ j`), all but `p = j` (causal: `p ≥ j + stride`).
    func forEachQueryTile(seeing keys: PositionRun, queryLength n: Int, queryTile br: Int,
                          _ body: (_ index: Int, _ queries: PositionRun, _ tile: KeyTile) -> Void) {
        let l = stride
        precondition(keys.step == l, "strided column masks list key blocks of one residue class")
        forEachClassQueryTile(seeing: keys, keyEnd: keyEnd, offset: offset, partition: queryPartition,
                              queryLength: n, queryTile: br) { valid, residue, members in
            let first = causal ? max(0, -floorDiv(residue - (valid.start + l - offset), l)) : 0
            return first < members ? first...(members - 1) : nil
        } _: { index, queries, valid in
            let firstP = queries.start + offset, lastP = queries.last + offset
            if causal {
                let seen = runIndices(valid, from: valid.start, through: lastP - l)
                guard !seen.isEmpty else { return }
                let tileKeys = PositionRun(start: valid.start, count: seen.count, step: l)
                body(index, queries, KeyTile(keys: tileKeys, fullyVisible: tileKeys.last <= firstP - l))
            } else {
                body(index, queries, KeyTile(keys: valid, fullyVisible: valid.last < firstP || valid.start > lastP))
            }
        }
    }

    /// Causal: key `j` is seen by the queries at `p ≥ j + stride`; otherwise by all (the
    /// one at `p = j` has probability 0 after masking).
    func visibleQueryIndices(tile: KeyTile, queries: PositionRun, keys: Range<Int>) -> Range<Int> {
        guard !keys.isEmpty else { return 0..<0 }
        guard causal else { return 0..<queries.count }
        return runIndices(queries, from: tile.keys.position(keys.lowerBound) + stride - offset, through: queries.last)
    }
}

/// The query tiles of the residue class of `keys` (a key block of one residue class modulo
/// its step `l`, the pattern's stride or dilation) in the forward's partition of the queries
/// into classes (`⌈⌈n / l⌉ / br⌉` tiles per class): the keys are cut at `keyEnd` (`valid`),
/// the class's queries are `i = residue + a · l` (`p = i + offset ≡ j`), `a <` `members`;
/// `body` runs for each tile holding a member of `range(valid, residue, members)`, in order.
@inline(__always)
func forEachClassQueryTile(seeing keys: PositionRun, keyEnd: Int, offset: Int, partition: QueryPartition,
                           queryLength n: Int, queryTile br: Int,
                           _ range: (_ valid: PositionRun, _ residue: Int, _ members: Int) -> ClosedRange<Int>?,
                           _ body: (_ index: Int, _ queries: PositionRun, _ valid: PositionRun) -> Void) {
    let l = keys.step
    let kept = runIndices(keys, from: keys.start, through: keyEnd - 1)
    guard !kept.isEmpty else { return }
    let valid = PositionRun(start: keys.start, count: kept.count, step: l)
    let residue = positiveModulo(valid.start - offset, l)
    guard residue < n else { return }
    let members = ceilDiv(n - residue, l), perClass = ceilDiv(ceilDiv(n, l), br)
    guard let range = range(valid, residue, members) else { return }
    for part in (range.lowerBound / br)...(range.upperBound / br) {
        let index = residue * perClass + part
        body(index, partition.tile(index, queryLength: n, tileSize: br), valid)
    }
}

/// The summary columns of fixed strided attention as the backward pass lists them: key
/// `j` with `j mod l ≥ l − c` (keys in residue classes, ``TiledSoftmaxBackward/KeyBlocks``
/// with `modulus = l`, classes `l − c ..< l`) is seen by the queries of the other blocks
/// (causal: of the later blocks), block `⌊p / l⌋`. The forward lists these pairs inside
/// ``FixedMask``; the backward runs them as their own pass after the own blocks
/// (``BlockedMask`` with one block), so no key tile mixes the two.
struct FixedSummaryMask: TransposedTileMask {
    var stride: Int
    /// `c`: the last `c` positions of each block are its summary.
    var summary: Int
    var causal: Bool
    var offset: Int
    var keyEnd: Int

    /// The forward listing (unused by the library: the forward runs ``FixedMask``): every
    /// valid key of the summary columns, masked.
    func forEachKeyTile(queries: PositionRun, tileSize: Int, _ body: (KeyTile) -> Void) {
        forEachTile(from: 0, through: keyEnd - 1, tileSize: tileSize) { body(KeyTile(keys: $0, fullyVisible: false)) }
    }

    /// Hides key `j` from the queries of its own block `u = ⌊j / l⌋` (causal: of the blocks
    /// up to `u`), and every key outside the summary columns.
    func maskScores(_ scores: UnsafeMutablePointer<Float>, ld: Int, tile: KeyTile, queries: PositionRun) {
        let l = stride, offset = self.offset, causal = self.causal, summary = self.summary
        let all = SIMDMask<SIMD16<Int32>>(repeating: true)
        maskTransposedScores(scores, ld: ld, keys: tile.keys, queries: queries) { j, i in
            if positiveModulo(j, l) < l - summary { return all }
            let blockStart = floorDiv(j, l) * l
            let end = SIMD16<Int32>(repeating: Int32(clamping: blockStart + l - offset))
            if causal { return i .< end }
            return (i .>= SIMD16<Int32>(repeating: Int32(clamping: blockStart - offset))) .& (i .< end)
        }
    }

    func forEachQueryTile(seeing keys: PositionRun, queryLength n: Int, queryTile br: Int,
                          _ body: (_ index: Int, _ queries: PositionRun, _ tile: KeyTile) -> Void) {
        let l = stride
        precondition(keys.step == l, "summary column masks list key blocks of one residue class")
        let kept = runIndices(keys, from: keys.start, through: keyEnd - 1)
        guard !kept.isEmpty else { return }
        let valid = PositionRun(start: keys.start, count: kept.count, step: l)
        // Causal: the first query that sees a key of the run is at the block after the run's first key.
        let lowest = causal ? (floorDiv(valid.start, l) + 1) * l - offset : 0
        forEachContiguousQueryTile(.tiles, queryLength: n, queryTile: br, from: lowest, through: n - 1) {
            index, queries in
            let firstP = queries.start + offset, lastP = queries.last + offset
            let firstBlock = floorDiv(firstP, l) * l, lastBlockEnd = (floorDiv(lastP, l) + 1) * l
            if causal {
                // Keys in the blocks before the tile's last query's block.
                let seen = runIndices(valid, from: valid.start, through: lastBlockEnd - l - 1)
                guard !seen.isEmpty else { return }
                let tileKeys = PositionRun(start: valid.start, count: seen.count, step: l)
                body(index, queries, KeyTile(keys: tileKeys, fullyVisible: tileKeys.last < firstBlock))
            } else {
                let shared = runIndices(valid, from: firstBlock, through: lastBlockEnd - 1)
                body(index, queries, KeyTile(keys: valid, fullyVisible: shared.isEmpty))
            }
        }
    }

    /// Causal: key `j` (block `u`) is seen by the queries at `p ≥ (u + 1) · l`; otherwise by
    /// all but its own block's (masked to 0).
    func visibleQueryIndices(tile: KeyTile, queries: PositionRun, keys: Range<Int>) -> Range<Int> {
        guard !keys.isEmpty else { return 0..<0 }
        guard causal else { return 0..<queries.count }
        let j = tile.keys.position(keys.lowerBound)
        return runIndices(queries, from: (floorDiv(j, stride) + 1) * stride - offset, through: queries.last)
    }
}

// MARK: - Shared by the conformers

/// The backward cost of a conformer on the tiled kernel: `2.5 ×` the forward's FLOPs, its
/// scored pairs, and the largest workspace of its passes (`keyBlocks`, one per pass; the
/// passes run one after another in the same memory).
/// `modifiers`: the conformer's score modifiers (soft-capping takes one more tile per worker).
func tiledBackwardCost(forward: AttentionCost, shape: AttentionShape, threads: Int?,
                       passes keyBlocks: some Sequence<TiledSoftmaxBackward.KeyBlocks> = CollectionOfOne(.contiguous),
                       modifiers: ScoreModifiers = ScoreModifiers()) -> AttentionCost {
    let workspace = keyBlocks.reduce(0) {
        max($0, TiledSoftmaxBackward.workspaceBytes(shape: shape, threads: threads, keyBlocks: $1,
                                                    softCap: modifiers.softCap != nil))
    }
    return AttentionCost(flops: 2.5 * forward.flops, workspaceBytes: workspace,
                         scoredPairs: forward.scoredPairs)
}

/// The key blocks of a backward that runs in one or two passes (a sequence, so the cost
/// model takes it without an array per call).
struct TwoBackwardPasses: Sequence {
    let first: TiledSoftmaxBackward.KeyBlocks
    let second: TiledSoftmaxBackward.KeyBlocks?

    struct Iterator: IteratorProtocol {
        var pending: (TiledSoftmaxBackward.KeyBlocks?, TiledSoftmaxBackward.KeyBlocks?)
        mutating func next() -> TiledSoftmaxBackward.KeyBlocks? {
            defer { pending = (pending.1, nil) }
            return pending.0
        }
    }

    func makeIterator() -> Iterator { Iterator(pending: (first, second)) }
}

/// One checked backward call of a conformer on the tiled kernel: the kernel views, the
/// thread count and the key lengths, to run one backward pass after another.
struct TiledBackwardCall {
    let shape: AttentionShape
    let scale: Float
    let threads: Int
    let keyLengths: [Int]?
    let q, k, v, o, lse, dO: TensorView
    let dQ, dK, dV: MutableTensorView
    /// The conformer's score modifiers and where to add `∂L/∂bias`
    /// (``DifferentiableAttention/withModifierBackward(_:_:)``; nil: none).
    var modifiers: ScoreModifierKernel? = nil
    var biasGradient: MutableTensorView? = nil

    init(shape: AttentionShape, scale: Float, threads: Int, keyLengths: [Int]?,
         query: StridedView, key: StridedView, value: StridedView, output: StridedView, logSumExp: StridedView,
         outputGradient: StridedView, dQuery: MutableStridedView, dKey: MutableStridedView, dValue: MutableStridedView) {
        self.init(shape: shape, scale: scale, threads: threads, keyLengths: keyLengths,
                  q: query.kernel, k: key.kernel, v: value.kernel, o: output.kernel, lse: logSumExp.kernel,
                  dO: outputGradient.kernel, dQ: dQuery.kernel, dK: dKey.kernel, dV: dValue.kernel)
    }

    /// A call over kernel views (operands of any precision; see ``TiledSoftmaxBackward/run(shape:scale:threads:keyBlocks:accumulate:q:k:v:o:lse:dO:dQ:dK:dV:modifiers:biasGradient:mask:)``
    /// for the gradients').
    init(shape: AttentionShape, scale: Float, threads: Int, keyLengths: [Int]?,
         q: TensorView, k: TensorView, v: TensorView, o: TensorView, lse: TensorView, dO: TensorView,
         dQ: MutableTensorView, dK: MutableTensorView, dV: MutableTensorView) {
        self.shape = shape
        self.scale = scale
        self.threads = threads
        self.keyLengths = keyLengths
        (self.q, self.k, self.v, self.o, self.lse, self.dO) = (q, k, v, o, lse, dO)
        (self.dQ, self.dK, self.dV) = (dQ, dK, dV)
    }

    /// Valid keys of batch item `b`.
    func keyEnd(_ b: Int) -> Int { keyLengths?[b] ?? shape.keyLength }

    /// One backward pass over `keyBlocks` (see ``TiledSoftmaxBackward``); `mask(h, keyEnd)`
    /// is built once per batch item and head. The first pass of a call writes every key
    /// row; later passes `accumulate`.
    func run<Mask: TransposedTileMask>(keyBlocks: TiledSoftmaxBackward.KeyBlocks = .contiguous, accumulate: Bool = false,
                                       mask: (_ head: Int, _ keyEnd: Int) -> Mask) {
        TiledSoftmaxAttention.withMasks(shape, { b, h in mask(h, keyEnd(b)) }) { masks in
            TiledSoftmaxBackward.run(shape: shape, scale: scale, threads: threads, keyBlocks: keyBlocks,
                                     accumulate: accumulate, q: q, k: k, v: v, o: o, lse: lse, dO: dO,
                                     dQ: dQ, dK: dK, dV: dV, modifiers: modifiers, biasGradient: biasGradient,
                                     mask: masks)
        }
    }
}

extension TiledBackwardCall {
    /// The tiled call of a checked parameter-gradient call (without score modifiers: see
    /// ``DifferentiableAttention/withModifiers(_:_:)``).
    init(_ x: ParameterGradientCall, keyLengths: [Int]?) {
        (shape, scale, threads, self.keyLengths) = (x.shape, x.scale, x.threads, keyLengths)
        (q, k, v, o, lse, dO) = (x.q, x.k, x.v, x.o, x.lse, x.dO)
        (dQ, dK, dV) = (x.dQ, x.dK, x.dV)
    }
}

extension DifferentiableAttention {
    /// ``withCheckedGradientCall(query:key:value:output:logSumExp:outputGradient:dQuery:dKey:dValue:keyLengths:workspace:threads:scale:_:)``
    /// handing `body` the call's ``TiledBackwardCall``.
    func withTiledBackwardCall(
        query: StridedView, key: StridedView, value: StridedView, output: StridedView, logSumExp: StridedView,
        outputGradient: StridedView, dQuery: MutableStridedView, dKey: MutableStridedView, dValue: MutableStridedView,
        keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?, scale: Float?,
        _ body: (TiledBackwardCall) throws -> Void
    ) throws {
        try withCheckedGradientCall(query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                                    outputGradient: outputGradient, dQuery: dQuery, dKey: dKey, dValue: dValue,
                                    keyLengths: keyLengths, workspace: workspace, threads: threads,
                                    scale: scale) { shape, scale in
            try withModifiers(TiledBackwardCall(shape: shape, scale: scale, threads: try threadCount(threads),
                                                keyLengths: keyLengths, query: query, key: key, value: value,
                                                output: output, logSumExp: logSumExp, outputGradient: outputGradient,
                                                dQuery: dQuery, dKey: dKey, dValue: dValue), body)
        }
    }

    /// Runs `body` with `call` carrying this conformer's score modifiers and where to add
    /// `∂L/∂bias` (``withModifierBackward(_:_:)``).
    func withModifiers(_ call: TiledBackwardCall, _ body: (TiledBackwardCall) throws -> Void) throws {
        try withModifierBackward(call.shape) { modifiers, biasGradient in
            var call = call
            (call.modifiers, call.biasGradient) = (modifiers, biasGradient)
            try body(call)
        }
    }
}

// MARK: - Longformer

/// Longformer's dilated window as the backward pass lists it (the first of its three
/// backward passes) when the heads' dilations differ: key `j` is seen by query position
/// `p` when `d = j − p ∈ [lo, hi]` and `d ≡ 0 (mod dilation)`, global or not (the forward's
/// part 0 of ``LongformerWindowMask``). Contiguous key blocks and query tiles (a key block
/// serves every head of its group): with a dilation above 1 the tiles hold the window's
/// other residues too, masked. With one dilation for every head the backward lists
/// ``LongformerWindowMask`` itself, by residue class.
struct LongformerWindowBackwardMask: TransposedTileMask {
    var lo: Int, hi: Int, dilation: Int
    var offset: Int
    var keyEnd: Int

    func forEachKeyTile(queries: PositionRun, tileSize: Int, _ body: (KeyTile) -> Void) {
        let firstP = queries.start + offset, lastP = queries.last + offset
        forEachTile(from: max(0, firstP + lo), through: min(keyEnd - 1, lastP + hi), tileSize: tileSize) { keys in
            body(KeyTile(keys: keys, fullyVisible: isFull(keys, firstP: firstP, lastP: lastP)))
        }
    }

    /// Every (query, key) pair of the tile is in the window.
    private func isFull(_ keys: PositionRun, firstP: Int, lastP: Int) -> Bool {
        dilation == 1 && keys.start >= lastP + lo && keys.last <= firstP + hi
    }

    func forEachQueryTile(seeing keys: PositionRun, queryLength: Int, queryTile: Int,
                          _ body: (_ index: Int, _ queries: PositionRun, _ tile: KeyTile) -> Void) {
        precondition(keys.step == 1, "the window lists contiguous key blocks")
        let first = keys.start, last = min(keys.last, keyEnd - 1)
        guard first <= last else { return }
        forEachContiguousQueryTile(.tiles, queryLength: queryLength, queryTile: queryTile,
                                   from: first - hi - offset, through: last - lo - offset) { index, queries in
            let firstP = queries.start + offset, lastP = queries.last + offset
            let a = max(first, firstP + lo), z = min(last, lastP + hi)
            guard a <= z else { return }
            let tileKeys = PositionRun(start: a, count: z - a + 1)
            body(index, queries, KeyTile(keys: tileKeys, fullyVisible: isFull(tileKeys, firstP: firstP, lastP: lastP)))
        }
    }

    func visibleKeyIndices(tile: KeyTile, queries: PositionRun, lanes: Range<Int>) -> Range<Int> {
        guard let p = lanePositions(queries, lanes) else { return 0..<0 }
        return runIndices(tile.keys, from: p.first + offset + lo, through: p.last + offset + hi)
    }

    func visibleQueryIndices(tile: KeyTile, queries: PositionRun, keys: Range<Int>) -> Range<Int> {
        guard !keys.isEmpty else { return 0..<0 }
        let first = tile.keys.position(keys.lowerBound), last = tile.keys.position(keys.upperBound - 1)
        return runIndices(queries, from: first - hi - offset, through: last - lo - offset)
    }

    func maskScores(_ scores: UnsafeMutablePointer<Float>, ld: Int, tile: KeyTile, queries: PositionRun) {
        let lo = self.lo, hi = self.hi, offset = self.offset, dilation = self.dilation
        maskTransposedScores(scores, ld: ld, keys: tile.keys, queries: queries) { j, i in
            longformerWindowHides(j: j, i: i, offset: offset, lo: lo, hi: hi, dilation: dilation, inside: false)
        }
    }
}

extension LongformerWindowMask: TransposedTileMask {
    /// The forward's partition: residue classes of the queries modulo the dilation.
    func backwardQueryTileCount(queryLength: Int, queryTile: Int) -> Int {
        queryPartition.tileCount(queryLength: queryLength, tileSize: queryTile)
    }

    /// The window part only (the global keys outside the windows are the backward's second
    /// pass). Keys come in residue classes modulo the dilation (``TiledSoftmaxBackward/KeyBlocks``
    /// with `modulus = dilation`): key `j` is seen by the queries of its class (positions
    /// `p ≡ j`) with `j − p ∈ [lo, hi]`, so each tile holds only window pairs and its
    /// edges, masked as in the forward.
    func forEachQueryTile(seeing keys: PositionRun, queryLength n: Int, queryTile br: Int,
                          _ body: (_ index: Int, _ queries: PositionRun, _ tile: KeyTile) -> Void) {
        let l = dilation, lo = self.lo, hi = self.hi, offset = self.offset
        precondition(keys.step == l, "the dilated window lists key blocks of one residue class")
        forEachClassQueryTile(seeing: keys, keyEnd: keyEnd, offset: offset, partition: queryPartition,
                              queryLength: n, queryTile: br) { valid, residue, members in
            // The class's queries with p = i + offset in [first − hi, last − lo].
            let lowest = valid.start - hi - offset, highest = valid.last - lo - offset
            let a0 = max(0, -floorDiv(residue - lowest, l)), a1 = min(members - 1, floorDiv(highest - residue, l))
            return a0 <= a1 ? a0...a1 : nil
        } _: { index, queries, valid in
            let firstP = queries.start + offset, lastP = queries.last + offset
            let seen = runIndices(valid, from: firstP + lo, through: lastP + hi)
            guard !seen.isEmpty else { return }
            let tileKeys = PositionRun(start: valid.position(seen.lowerBound), count: seen.count, step: l)
            body(index, queries, KeyTile(keys: tileKeys,
                                         fullyVisible: tileKeys.start >= lastP + lo && tileKeys.last <= firstP + hi))
        }
    }

    /// Keys `first … last` of a tile are seen by the queries at `first − hi … last − lo`.
    func visibleQueryIndices(tile: KeyTile, queries: PositionRun, keys: Range<Int>) -> Range<Int> {
        guard !keys.isEmpty else { return 0..<0 }
        let first = tile.keys.position(keys.lowerBound), last = tile.keys.position(keys.upperBound - 1)
        return runIndices(queries, from: first - hi - offset, through: last - lo - offset)
    }
}

/// For key `j` and 16 query indices `i` (`d = j − offset − i`): the lanes outside the
/// window `d ∈ [lo, hi]`, `d ≡ 0 (mod dilation)` (`inside`: the lanes inside it).
@inline(__always)
func longformerWindowHides(j: Int, i: SIMD16<Int32>, offset: Int, lo: Int, hi: Int, dilation: Int,
                           inside: Bool) -> SIMDMask<SIMD16<Int32>> {
    let d = SIMD16<Int32>(repeating: Int32(clamping: j - offset)) &- i
    var seen = (d .>= SIMD16<Int32>(repeating: Int32(clamping: lo))) .& (d .<= SIMD16<Int32>(repeating: Int32(clamping: hi)))
    if dilation > 1 {
        // d − lo ≥ 0 inside the window, so a plain remainder is the modulo there.
        let m = SIMD16<Int32>(repeating: Int32(clamping: dilation))
        seen = seen .& ((d &- Int32(clamping: lo)) % m .== SIMD16<Int32>(repeating: 0))
    }
    return inside ? seen : .!seen
}

/// Longformer's global keys outside each query's window (the second backward pass; the
/// forward's part 1 of ``LongformerWindowMask``): global key `j < keyEnd` is seen by every
/// query position `p` whose window does not hold it (causal: `p ≥ j`). Contiguous key
/// blocks: a block's tile is the hull of its global keys, the others masked.
struct LongformerGlobalKeyMask: TransposedTileMask {
    var pattern: LongformerPattern
    var lo: Int, hi: Int, dilation: Int
    var keyEnd: Int

    func forEachKeyTile(queries: PositionRun, tileSize: Int, _ body: (KeyTile) -> Void) {
        let lastP = queries.last + pattern.offset
        for run in pattern.globalRuns(below: keyEnd) {
            forEachTile(from: run.lowerBound, through: min(run.upperBound - 1, pattern.causal ? lastP : Int.max),
                        tileSize: tileSize) { body(KeyTile(keys: $0, fullyVisible: false)) }
        }
    }

    func forEachQueryTile(seeing keys: PositionRun, queryLength: Int, queryTile: Int,
                          _ body: (_ index: Int, _ queries: PositionRun, _ tile: KeyTile) -> Void) {
        precondition(keys.step == 1, "global keys are listed in contiguous key blocks")
        let last = min(keys.last, keyEnd - 1)
        let globals = pattern.globalPositions
        let g0 = pattern.firstGlobal(atLeast: keys.start), g1 = pattern.firstGlobal(atLeast: last + 1)
        guard g0 < g1 else { return }
        let a = globals[g0], z = globals[g1 - 1]
        let allGlobal = g1 - g0 == z - a + 1
        let offset = pattern.offset, causal = pattern.causal
        forEachContiguousQueryTile(.tiles, queryLength: queryLength, queryTile: queryTile,
                                   from: causal ? a - offset : 0, through: queryLength - 1) { index, queries in
            let firstP = queries.start + offset, lastP = queries.last + offset
            let end = min(z, causal ? lastP : Int.max)
            guard a <= end else { return }
            let tileKeys = PositionRun(start: a, count: end - a + 1)
            let clearOfWindows = end < firstP + lo || a > lastP + hi
            body(index, queries, KeyTile(keys: tileKeys, fullyVisible: allGlobal && clearOfWindows
                                            && (!causal || end <= firstP)))
        }
    }

    func visibleQueryIndices(tile: KeyTile, queries: PositionRun, keys: Range<Int>) -> Range<Int> {
        guard !keys.isEmpty else { return 0..<0 }
        guard pattern.causal else { return 0..<queries.count }
        return runIndices(queries, from: tile.keys.position(keys.lowerBound) - pattern.offset, through: queries.last)
    }

    func maskScores(_ scores: UnsafeMutablePointer<Float>, ld: Int, tile: KeyTile, queries: PositionRun) {
        let lo = self.lo, hi = self.hi, offset = pattern.offset, dilation = self.dilation, causal = pattern.causal
        let all = SIMDMask<SIMD16<Int32>>(repeating: true)
        maskTransposedScores(scores, ld: ld, keys: tile.keys, queries: queries) { j, i in
            guard pattern.isGlobal(j) else { return all }
            var hidden = longformerWindowHides(j: j, i: i, offset: offset, lo: lo, hi: hi, dilation: dilation,
                                               inside: true)
            if causal { hidden = hidden .| (i .< SIMD16<Int32>(repeating: Int32(clamping: j - offset))) }
            return hidden
        }
    }
}

extension LongformerGlobalQueryMask: TransposedTileMask {
    /// The forward's partition: the global queries' ranges.
    func backwardQueryTileCount(queryLength: Int, queryTile: Int) -> Int {
        queryPartition.tileCount(queryLength: queryLength, tileSize: queryTile)
    }

    /// A global query at `p` sees every key `j < keyEnd` (causal: `j ≤ p`) that is neither
    /// global nor in its window (those are the first two passes'); the tile is the block's
    /// keys, masked unless clear of windows and globals.
    func forEachQueryTile(seeing keys: PositionRun, queryLength: Int, queryTile: Int,
                          _ body: (_ index: Int, _ queries: PositionRun, _ tile: KeyTile) -> Void) {
        precondition(keys.step == 1, "global queries are listed against contiguous key blocks")
        let first = keys.start, last = min(keys.last, keyEnd - 1)
        guard first <= last else { return }
        let offset = pattern.offset, causal = pattern.causal
        let g = pattern.firstGlobal(atLeast: first)
        forEachContiguousQueryTile(queryPartition, queryLength: queryLength, queryTile: queryTile,
                                   from: causal ? first - offset : 0, through: queryLength - 1) { index, queries in
            let firstP = queries.start + offset, lastP = queries.last + offset
            let end = min(last, causal ? lastP : Int.max)
            guard first <= end else { return }
            let clearOfWindows = end < firstP + lo || first > lastP + hi
            let clearOfGlobals = g == pattern.globalPositions.count || pattern.globalPositions[g] > end
            body(index, queries, KeyTile(keys: PositionRun(start: first, count: end - first + 1),
                                         fullyVisible: clearOfWindows && clearOfGlobals && (!causal || end <= firstP)))
        }
    }

    func visibleQueryIndices(tile: KeyTile, queries: PositionRun, keys: Range<Int>) -> Range<Int> {
        guard !keys.isEmpty else { return 0..<0 }
        guard pattern.causal else { return 0..<queries.count }
        return runIndices(queries, from: tile.keys.position(keys.lowerBound) - pattern.offset, through: queries.last)
    }
}

/// A backward mask holding the forward's mask (whose own ``TileMask/maskScores(_:ld:tile:queries:)``
/// masks query-major tiles, so the backward's transposed masking needs a type of its own):
/// the forward's query partition and key listing.
protocol ForwardWrappingMask: TransposedTileMask {
    associatedtype Forward: TileMask
    var forward: Forward { get }
}

extension ForwardWrappingMask {
    var queryPartition: QueryPartition { forward.queryPartition }

    func backwardQueryTileCount(queryLength: Int, queryTile: Int) -> Int {
        queryPartition.tileCount(queryLength: queryLength, tileSize: queryTile)
    }

    func forEachKeyTile(queries: PositionRun, tileSize: Int, _ body: (KeyTile) -> Void) {
        forward.forEachKeyTile(queries: queries, tileSize: tileSize, body)
    }
}

// MARK: - BigBird

/// BigBird's blocks as the backward pass lists them: the query tiles of query block `t`
/// (the forward's partition) see the keys of `ranges[t]` (its window, global and random
/// blocks, merged), `j < keyEnd`, causal `j ≤ p`. A key block's tile for query block `t`
/// is the hull of its keys in `ranges[t]`; keys between two ranges are masked.
struct BigBirdBackwardMask: ForwardWrappingMask {
    var forward: BigBirdMask

    /// The index of the first range of `ranges` ending past `key`.
    private func firstRange(_ ranges: [Range<Int>], endingPast key: Int) -> Int {
        var a = 0, z = ranges.count
        while a < z {
            let mid = (a + z) / 2
            if ranges[mid].upperBound <= key { a = mid + 1 } else { z = mid }
        }
        return a
    }

    func forEachQueryTile(seeing keys: PositionRun, queryLength: Int, queryTile: Int,
                          _ body: (_ index: Int, _ queries: PositionRun, _ tile: KeyTile) -> Void) {
        precondition(keys.step == 1, "BigBird lists contiguous key blocks")
        let f = forward, size = f.blockSize
        let first = keys.start, last = min(keys.last, f.keyEnd - 1)
        guard first <= last else { return }
        // Query blocks in order (the partition's tiles are block by block); causal: from the block of `first`.
        let firstBlock = f.causal ? max(0, (first) / size) : 0
        let lastBlock = (queryLength - 1 + f.offset) / size
        guard firstBlock <= lastBlock else { return }
        for t in firstBlock...lastBlock {
            let ranges = f.ranges[t]
            let n = firstRange(ranges, endingPast: first)
            guard n < ranges.count, ranges[n].lowerBound <= last else { continue }
            var m = n
            while m + 1 < ranges.count && ranges[m + 1].lowerBound <= last { m += 1 }
            let a = max(first, ranges[n].lowerBound), z = min(last, ranges[m].upperBound - 1)
            forEachContiguousQueryTile(queryPartition, queryLength: queryLength, queryTile: queryTile,
                                       from: t * size - f.offset, through: (t + 1) * size - 1 - f.offset) {
                index, queries in
                let firstP = queries.start + f.offset, lastP = queries.last + f.offset
                let end = min(z, f.causal ? lastP : Int.max)
                guard a <= end else { return }
                body(index, queries, KeyTile(keys: PositionRun(start: a, count: end - a + 1),
                                             fullyVisible: n == m && (!f.causal || end <= firstP)))
            }
        }
    }

    func visibleQueryIndices(tile: KeyTile, queries: PositionRun, keys: Range<Int>) -> Range<Int> {
        guard !keys.isEmpty else { return 0..<0 }
        guard forward.causal else { return 0..<queries.count }
        return runIndices(queries, from: tile.keys.position(keys.lowerBound) - forward.offset, through: queries.last)
    }

    func maskScores(_ scores: UnsafeMutablePointer<Float>, ld: Int, tile: KeyTile, queries: PositionRun) {
        let f = forward
        let ranges = f.ranges[(queries.start + f.offset) / f.blockSize]
        let all = SIMDMask<SIMD16<Int32>>(repeating: true), none = SIMDMask<SIMD16<Int32>>(repeating: false)
        var n = firstRange(ranges, endingPast: tile.keys.start)
        maskTransposedScores(scores, ld: ld, keys: tile.keys, queries: queries) { j, i in
            while n < ranges.count && ranges[n].upperBound <= j { n += 1 }
            guard n < ranges.count && ranges[n].lowerBound <= j else { return all }
            return f.causal ? i .< SIMD16<Int32>(repeating: Int32(clamping: j - f.offset)) : none
        }
    }
}

// MARK: - ETC

/// The segment ids of 16 query lanes at positions `i` (ids of positions `origin…`; lanes
/// past `last`, padding, read `last`'s).
@inline(__always)
private func etcLaneSegments(_ ids: [Int], _ i: SIMD16<Int32>, origin: Int, last: Int) -> SIMD16<Int32> {
    let clamped = pointwiseMin(i, SIMD16<Int32>(repeating: Int32(clamping: last)))
    var lanes = SIMD16<Int32>()
    for l in 0..<16 { lanes[l] = Int32(truncatingIfNeeded: ids[Int(clamped[l]) - origin]) }
    return lanes
}

/// ETC's global queries (the forward's pass 0, ``ETCGlobalQueryMask``) listed key-major:
/// a global query sees every key below `keyEnd`, or with segments the global keys and
/// the long keys of its segment. A key block's tile for a query tile runs from the
/// block's first global key (or the hull of the tile's segments' runs) to the hull's
/// end; long keys of other segments are masked per lane. Global and long keys share a
/// tile (the block may straddle `G`), so the mask tests each key's side, not the tile's.
struct ETCGlobalQueryBackwardMask: ForwardWrappingMask {
    var forward: ETCGlobalQueryMask

    func forEachQueryTile(seeing keys: PositionRun, queryLength: Int, queryTile: Int,
                          _ body: (_ index: Int, _ queries: PositionRun, _ tile: KeyTile) -> Void) {
        precondition(keys.step == 1, "ETC lists contiguous key blocks")
        let f = forward, g = f.globals
        let first = keys.start, last = min(keys.last, f.keyEnd - 1)
        guard first <= last else { return }
        forEachContiguousQueryTile(queryPartition, queryLength: queryLength, queryTile: queryTile,
                                   from: 0, through: g - 1) { index, queries in
            guard let segments = f.segments, last >= g else {
                body(index, queries, KeyTile(keys: PositionRun(start: first, count: last - first + 1), fullyVisible: true))
                return
            }
            // The hull of the runs of the tile's segments (one run when the tile has one segment).
            var lo = Int.max, hi = Int.min, mixed = false
            let s0 = segments.global[queries.start]
            for n in 0..<queries.count {
                let s = segments.global[queries.position(n)]
                mixed = mixed || s != s0
                let run = f.runs[s]
                if !run.isEmpty { lo = min(lo, run.lowerBound); hi = max(hi, run.upperBound - 1) }
            }
            let seesLong = lo <= hi && max(first, lo) <= min(last, hi)
            let a = first < g ? first : max(first, lo)
            let z = seesLong ? min(last, hi) : min(last, g - 1)
            guard a <= z else { return }
            let longStart = max(a, g)
            body(index, queries, KeyTile(keys: PositionRun(start: a, count: z - a + 1),
                                         fullyVisible: longStart > z || (!mixed && longStart >= lo && z <= hi)))
        }
    }

    func visibleQueryIndices(tile: KeyTile, queries: PositionRun, keys: Range<Int>) -> Range<Int> {
        keys.isEmpty ? 0..<0 : 0..<queries.count
    }

    /// Long keys of another segment than the lane's query are hidden; global keys never.
    func maskScores(_ scores: UnsafeMutablePointer<Float>, ld: Int, tile: KeyTile, queries: PositionRun) {
        let g = forward.globals
        guard let segments = forward.segments, tile.keys.last >= g else { return }
        let last = queries.last, none = SIMDMask<SIMD16<Int32>>(repeating: false)
        maskTransposedScores(scores, ld: ld, keys: tile.keys, queries: queries) { j, i in
            guard j >= g else { return none }
            return etcLaneSegments(segments.global, i, origin: 0, last: last)
                .!= SIMD16<Int32>(repeating: Int32(truncatingIfNeeded: segments.long[j - g]))
        }
    }
}

/// ETC's long queries (the forward's pass 1, ``ETCLongQueryMask``) listed key-major: a
/// long query at `p` sees the global keys (with segments: those of its segment) and the
/// long keys `j ∈ [p + lo, p + hi]` below `keyEnd`. A block holding global keys is seen
/// by every long query tile; one of long keys only, by the tiles meeting its band
/// `[first − hi, last − lo]`. The tile runs from the block's first global key (or the
/// tile's band start) to its band end; each key is masked by its side's rule.
struct ETCLongQueryBackwardMask: ForwardWrappingMask {
    var forward: ETCLongQueryMask

    func forEachQueryTile(seeing keys: PositionRun, queryLength: Int, queryTile: Int,
                          _ body: (_ index: Int, _ queries: PositionRun, _ tile: KeyTile) -> Void) {
        precondition(keys.step == 1, "ETC lists contiguous key blocks")
        let f = forward, g = f.globals, lo = f.lo, hi = f.hi
        let first = keys.start, last = min(keys.last, f.keyEnd - 1)
        guard first <= last else { return }
        let hasGlobals = first < g, longFirst = max(first, g)
        forEachContiguousQueryTile(queryPartition, queryLength: queryLength, queryTile: queryTile,
                                   from: hasGlobals ? g : longFirst - hi,
                                   through: hasGlobals ? queryLength - 1 : last - lo) { index, queries in
            let firstP = queries.start, lastP = queries.last
            let bandStart = max(longFirst, firstP + lo), bandEnd = min(last, lastP + hi)
            let a = hasGlobals ? first : bandStart
            let z = bandStart <= bandEnd ? bandEnd : min(last, g - 1)
            guard a <= z else { return }
            var full = true
            if hasGlobals, let segments = f.segments {
                // Every query of one segment, and every global key of the tile in it.
                let s = segments.long[firstP - g]
                full = segments.long[lastP - g] == s && (a...min(z, g - 1)).allSatisfy { segments.global[$0] == s }
            }
            if z >= g { full = full && max(a, g) >= lastP + lo && z <= firstP + hi }
            body(index, queries, KeyTile(keys: PositionRun(start: a, count: z - a + 1), fullyVisible: full))
        }
    }

    func visibleKeyIndices(tile: KeyTile, queries: PositionRun, lanes: Range<Int>) -> Range<Int> {
        guard let p = lanePositions(queries, lanes) else { return 0..<0 }
        let from = tile.keys.start < forward.globals ? tile.keys.start : p.first + forward.lo
        return runIndices(tile.keys, from: from, through: p.last + forward.hi)
    }

    func visibleQueryIndices(tile: KeyTile, queries: PositionRun, keys: Range<Int>) -> Range<Int> {
        guard !keys.isEmpty else { return 0..<0 }
        let first = tile.keys.position(keys.lowerBound), last = tile.keys.position(keys.upperBound - 1)
        guard first >= forward.globals else { return 0..<queries.count }
        return runIndices(queries, from: first - forward.hi, through: last - forward.lo)
    }

    /// Global keys: the lanes of another segment hidden; long keys: the lanes outside the band.
    func maskScores(_ scores: UnsafeMutablePointer<Float>, ld: Int, tile: KeyTile, queries: PositionRun) {
        let g = forward.globals, lo = forward.lo, hi = forward.hi, segments = forward.segments
        let last = queries.last, none = SIMDMask<SIMD16<Int32>>(repeating: false)
        maskTransposedScores(scores, ld: ld, keys: tile.keys, queries: queries) { j, i in
            guard j >= g else {
                guard let segments else { return none }
                return etcLaneSegments(segments.long, i, origin: g, last: last)
                    .!= SIMD16<Int32>(repeating: Int32(truncatingIfNeeded: segments.global[j]))
            }
            // Queries that see key j: j − hi ≤ i ≤ j − lo.
            return (i .< SIMD16<Int32>(repeating: Int32(clamping: j - hi)))
                .| (i .> SIMD16<Int32>(repeating: Int32(clamping: j - lo)))
        }
    }
}

// MARK: - Memory-compressed attention

extension WindowEndMask: TransposedTileMask {
    /// Compressed key `t < keyEnd` is seen by the query positions `p ≥ e_t` (its window's
    /// end): the keys `first … last` of a block by the queries from `e_first − offset` on,
    /// each tile holding the keys its last query has passed (fully visible when its first
    /// query has passed them all).
    func forEachQueryTile(seeing keys: PositionRun, queryLength: Int, queryTile: Int,
                          _ body: (_ index: Int, _ queries: PositionRun, _ tile: KeyTile) -> Void) {
        precondition(keys.step == 1, "whole-window masks list contiguous key blocks")
        let first = keys.start, last = min(keys.last, keyEnd - 1)
        guard first <= last else { return }
        forEachContiguousQueryTile(.tiles, queryLength: queryLength, queryTile: queryTile,
                                   from: windowEnd(first) - offset, through: queryLength - 1) { index, queries in
            let end = min(last, limit(position: queries.last + offset) - 1)
            guard first <= end else { return }
            body(index, queries, KeyTile(keys: PositionRun(start: first, count: end - first + 1),
                                         fullyVisible: windowEnd(end) <= queries.start + offset))
        }
    }

    /// Keys from `t` on are seen by the queries at positions `p ≥ e_t`.
    func visibleQueryIndices(tile: KeyTile, queries: PositionRun, keys: Range<Int>) -> Range<Int> {
        guard !keys.isEmpty else { return 0..<0 }
        return runIndices(queries, from: windowEnd(tile.keys.position(keys.lowerBound)) - offset, through: queries.last)
    }
}

// MARK: - Axial attention

extension AxisLineMask: TransposedTileMask {
    /// The forward's partition: the lines, each cut into tiles of step `stride`.
    func backwardQueryTileCount(queryLength: Int, queryTile: Int) -> Int {
        queryPartition.tileCount(queryLength: queryLength, tileSize: queryTile)
    }

    /// Keys come in residue classes modulo the axis stride (``TiledSoftmaxBackward/KeyBlocks``
    /// with `modulus = stride`), so a block is a run along one line or along consecutive
    /// lines of one class. Each of its lines' keys (coordinates `a … z`) is seen by the query
    /// tiles of that line only: every tile when not causal, else the tiles reaching
    /// coordinate `a` (`≥ a`, `> a` hiding the query itself), each against the keys up to
    /// its last query.
    func forEachQueryTile(seeing keys: PositionRun, queryLength: Int, queryTile br: Int,
                          _ body: (_ index: Int, _ queries: PositionRun, _ tile: KeyTile) -> Void) {
        precondition(keys.step == stride, "axis lines list key blocks of one residue class modulo the axis stride")
        let kept = runIndices(keys, from: keys.start, through: keyEnd - 1)
        guard !kept.isEmpty else { return }
        let perLine = ceilDiv(length, br)
        var n = 0
        while n < kept.count {
            let j = keys.position(n), a = j / stride % length
            let count = min(kept.count - n, length - a)
            let base = j - a * stride
            let line = base / (length * stride) * stride + base % stride
            let z = a + count - 1
            for part in (causal ? a / br : 0)..<perLine {
                let index = line * perLine + part
                let queries = queryPartition.tile(index, queryLength: queryLength, tileSize: br)
                let first = part * br, last = first + queries.count - 1     // the tile's coordinates
                let end = causal ? min(z, hidesSelf ? last - 1 : last) : z
                guard a <= end else { continue }
                let full: Bool
                if causal {
                    full = hidesSelf ? end < first : end <= first
                } else {
                    full = !hidesSelf || end < first || a > last
                }
                body(index, queries, KeyTile(keys: PositionRun(start: j, count: end - a + 1, step: stride),
                                             fullyVisible: full))
            }
            n += count
        }
    }

    /// Causal: key `j` is seen by the queries of its line at positions `p ≥ j`; otherwise by
    /// every query of the tile (the query itself masked when hidden).
    func visibleQueryIndices(tile: KeyTile, queries: PositionRun, keys: Range<Int>) -> Range<Int> {
        guard !keys.isEmpty else { return 0..<0 }
        guard causal else { return 0..<queries.count }
        return runIndices(queries, from: tile.keys.position(keys.lowerBound), through: queries.last)
    }
}

// MARK: - Masks with score-term hooks

/// ``tiledBackwardCost(forward:shape:threads:passes:modifiers:)`` of one contiguous pass
/// over `mask`, whose hooks may need per-worker scratch of their own (a score function's
/// derivatives: one more `keyRows × lanes` tile).
func tiledBackwardCost<Mask: TransposedTileMask>(forward: AttentionCost, shape: AttentionShape, threads: Int?,
                                                 mask: Mask.Type, modifiers: ScoreModifiers) -> AttentionCost {
    AttentionCost(flops: 2.5 * forward.flops,
                  workspaceBytes: TiledSoftmaxBackward.workspaceBytes(shape: shape, threads: threads, mask: mask,
                                                                      softCap: modifiers.softCap != nil),
                  scoredPairs: forward.scoredPairs)
}
