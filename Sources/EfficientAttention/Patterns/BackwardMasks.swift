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
        let kept = runIndices(keys, from: keys.start, through: keyEnd - 1)
        guard !kept.isEmpty else { return }
        let valid = PositionRun(start: keys.start, count: kept.count, step: l)
        // The queries of the class: i = residue + a · l, a < members.
        let residue = positiveModulo(valid.start - offset, l)
        guard residue < n else { return }
        let members = ceilDiv(n - residue, l), perClass = ceilDiv(members, br)
        let firstMember = causal ? max(0, -floorDiv(residue - (valid.start + l - offset), l)) : 0
        guard firstMember < members else { return }
        for part in (firstMember / br)...((members - 1) / br) {
            let queries = queryPartition.tile(residue * perClass + part, queryLength: n, tileSize: br)
            let firstP = queries.start + offset, lastP = queries.last + offset
            if causal {
                let seen = runIndices(valid, from: valid.start, through: lastP - l)
                guard !seen.isEmpty else { continue }
                let tileKeys = PositionRun(start: valid.start, count: seen.count, step: l)
                body(residue * perClass + part, queries,
                     KeyTile(keys: tileKeys, fullyVisible: tileKeys.last <= firstP - l))
            } else {
                body(residue * perClass + part, queries,
                     KeyTile(keys: valid, fullyVisible: valid.last < firstP || valid.start > lastP))
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
func tiledBackwardCost(forward: AttentionCost, shape: AttentionShape, threads: Int?,
                       passes keyBlocks: [TiledSoftmaxBackward.KeyBlocks] = [.contiguous]) -> AttentionCost {
    let workspace = keyBlocks.map { TiledSoftmaxBackward.workspaceBytes(shape: shape, threads: threads, keyBlocks: $0) }
    return AttentionCost(flops: 2.5 * forward.flops, workspaceBytes: workspace.max() ?? 0,
                         scoredPairs: forward.scoredPairs)
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

    init(shape: AttentionShape, scale: Float, threads: Int, keyLengths: [Int]?,
         query: StridedView, key: StridedView, value: StridedView, output: StridedView, logSumExp: StridedView,
         outputGradient: StridedView, dQuery: MutableStridedView, dKey: MutableStridedView, dValue: MutableStridedView) {
        self.shape = shape
        self.scale = scale
        self.threads = threads
        self.keyLengths = keyLengths
        (q, k, v, o, lse, dO) = (query.kernel, key.kernel, value.kernel, output.kernel, logSumExp.kernel,
                                 outputGradient.kernel)
        (dQ, dK, dV) = (dQuery.kernel, dKey.kernel, dValue.kernel)
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
                                     dQ: dQ, dK: dK, dV: dV, mask: masks)
        }
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
            try body(TiledBackwardCall(shape: shape, scale: scale, threads: try threadCount(threads),
                                       keyLengths: keyLengths, query: query, key: key, value: value, output: output,
                                       logSumExp: logSumExp, outputGradient: outputGradient,
                                       dQuery: dQuery, dKey: dKey, dValue: dValue))
        }
    }
}
