/// The backward pass of one hash round of one head of LSH attention (``LSHAttention``) with
/// its buckets held fixed: the round's sorted slots are gathered whole, the flash backward
/// (``TiledSoftmaxBackward``) runs on them with the round's chunk mask (``PermutedRoundMask``),
/// and the gathered gradients are added back to the original rows.
///
/// For one head `(b, h)` (key/value head `hk`) and round `r`, with the forward's sorted
/// order (`queryPosition[s]`, `keyPosition[t]`: slots of chunks of `bucketSize`):
///
///     gather    Q̃[s] = q[queryPosition[s]],  Õ[s] = o[·],  dÕ[s] = dO[·],  l̃se[s] = lse[·]
///               K̃[t] = k[keyPosition[t]]  (shared QK: q[·] / |q[·]|, 0 for a zero row),  Ṽ[t] = v[·]
///     backward  (dQ̃, dK̃, dṼ) = TiledSoftmaxBackward on the N slots, the merged lse and output:
///               P = exp(s − lse) is the round's share of the merged softmax, D = rowsum(dO ∘ O)
///               the merged row's, so the rounds' terms add up to the merged softmax's backward
///     scatter   dQ[queryPosition[s]] += dQ̃[s]
///               shared QK:  dQ[keyPosition[t]] += (dK̃[t] − K̃[t] (K̃[t] · dK̃[t])) / |q|   (the normalisation)
///               else:       dK[keyPosition[t]] += dK̃[t]
///               dV[keyPosition[t]] += dṼ[t]
///
/// A round's slots hold every position once, so the scatter writes distinct rows whichever
/// thread takes a slot, and the rounds (then the query heads of a group) run one after
/// another: every row's sum has one order for any thread count, and the flash backward is
/// itself bitwise identical for any thread count.
///
/// The self rule (shared QK): a query with no other visible key in any round attends to
/// itself alone, `o_i = v_i`, whose derivative is `dV_i += dO_i` (the `R` equal scores give
/// `dS = P (dP − D) = 0`, so nothing reaches `q_i`). ``markSeen(_:mask:)`` finds the
/// queries with a visible key round by round; the conformer adds the rest after the last round.
///
/// Workspace (floats; one head in flight): `N · (4·D + 4·Dv + 2)` rows and six `N + 32`
/// slot arrays plus `N` flags, besides the hashing scratch and the flash backward's
/// per-worker buffers.
enum LSHBackward {
    /// One head's round: slot arrays, gathered rows and their gradients.
    struct Workspace {
        let n: Int, d: Int, dv: Int
        let queryPosition, queryBucket, queryBlock, keyPosition, keyBucket, keyBlock: UnsafeMutablePointer<Int32>
        /// Per original query: it saw a key in some round so far (shared QK's self rule).
        let seen: UnsafeMutablePointer<Int32>
        /// Per slot: `Q̃`, `dQ̃`, `K̃`, `dK̃` (`D`); `Ṽ`, `dṼ`, `Õ`, `dÕ` (`Dv`); `l̃se`; `1 / |q|` (shared keys).
        let q, queryGradient, k, keyGradient: UnsafeMutablePointer<Float>
        let v, valueGradient, o, outputGradient: UnsafeMutablePointer<Float>
        let lse, inverseNorm: UnsafeMutablePointer<Float>

        init(carving carver: inout WorkspaceCarver, length n: Int, headDim d: Int, valueDim dv: Int) {
            (self.n, self.d, self.dv) = (n, d, dv)
            let slots = n + PermutedBlockAttention.slotPadding
            queryPosition = carver.take(slots, of: Int32.self)
            queryBucket = carver.take(slots, of: Int32.self)
            queryBlock = carver.take(slots, of: Int32.self)
            keyPosition = carver.take(slots, of: Int32.self)
            keyBucket = carver.take(slots, of: Int32.self)
            keyBlock = carver.take(slots, of: Int32.self)
            seen = carver.take(n, of: Int32.self)
            q = carver.take(n * d)
            queryGradient = carver.take(n * d)
            k = carver.take(n * d)
            keyGradient = carver.take(n * d)
            v = carver.take(n * dv)
            valueGradient = carver.take(n * dv)
            o = carver.take(n * dv)
            outputGradient = carver.take(n * dv)
            lse = carver.take(n)
            inverseNorm = carver.take(n)
        }

        static func byteCount(length n: Int, headDim d: Int, valueDim dv: Int) -> Int {
            WorkspaceCarver.bytes { _ = Workspace(carving: &$0, length: n, headDim: d, valueDim: dv) }
        }

        /// The flash backward's problem: one round's slots as one sequence.
        var roundShape: AttentionShape {
            AttentionShape(batch: 1, heads: 1, queryLength: n, keyLength: n, headDim: d, valueDim: dv)
        }

        /// The round's mask over the slot arrays (filled by the conformer and ``prepareRound(_:blockSize:keyLength:)``).
        func mask(blockSize: Int, visibility: BlockVisibility) -> PermutedRoundMask {
            let blocks = ceilDiv(n, blockSize)
            return PermutedRoundMask(
                slots: n, blockSize: blockSize, blocks: blocks, visibility: visibility,
                mask: PermutedBlockMask(
                    queryBlock: queryBlock, queryBucket: queryBucket, queryPosition: queryPosition,
                    keyBlock: keyBlock, keyBucket: keyBucket, keyPosition: keyPosition, keySlots: n,
                    queryBlockSize: blockSize, keyBlockSize: blockSize, predecessorBlocks: 0, blocks: blocks,
                    visibility: visibility, blocksOnly: false))
        }
    }

    /// Rows gathered per work item of the gather and scatter.
    static let rowsPerItem = 256

    /// Fills the blocks of the round's slots once the conformer has sorted them: query slot
    /// `s` is in chunk `s / blockSize`, and so is key slot `t` unless its key is padding
    /// (`keyPosition[t] >= keyLength`: `−1`, never visible).
    static func prepareRound(_ space: Workspace, blockSize: Int, keyLength: Int) {
        for s in 0..<space.n {
            space.queryBlock[s] = Int32(s / blockSize)
            space.keyBlock[s] = Int(space.keyPosition[s]) < keyLength ? Int32(s / blockSize) : -1
        }
    }

    /// The round's backward for head `(b, h)` (key/value head `hk`), adding into `dQ` and
    /// (separate keys) `dK` and `dV` (see the type's description), on `threads` threads.
    static func addRound(
        _ space: Workspace, mask: PermutedRoundMask, sharedKeys: Bool, scale: Float, threads: Int,
        query: PermutedBlockAttention.Rows, key: PermutedBlockAttention.Rows, value: PermutedBlockAttention.Rows,
        output: PermutedBlockAttention.Rows, logSumExp: PermutedBlockAttention.Rows,
        outputGradient: PermutedBlockAttention.Rows,
        dQ: MutableTensorView, dK: MutableTensorView, dV: MutableTensorView, b: Int, h: Int, hk: Int,
        modifiers: ScoreModifierKernel? = nil, biasGradient: MutableTensorView? = nil
    ) {
        let n = space.n, d = space.d, dv = space.dv
        let items = ceilDiv(n, rowsPerItem)
        parallelForEach(items: items, threads: threads) { item, _ in
            let first = item * rowsPerItem, count = min(rowsPerItem, n - first)
            let queries = space.queryPosition + first, keys = space.keyPosition + first
            PermutedBlockAttention.gather(queries, count: count, query, width: d, into: space.q + first * d,
                                          outputGradient, width: dv, into: space.outputGradient + first * dv)
            PermutedBlockAttention.gather(queries, count: count, output, width: dv, into: space.o + first * dv,
                                          logSumExp, width: 1, into: space.lse + first)
            if sharedKeys {
                // Shared keys mirror the query slots: the forward's normalisation of the gathered rows.
                PermutedBlockAttention.gather(keys, count: count, value, width: dv, into: space.v + first * dv,
                                              value, width: 0, into: nil)
                for t in first..<(first + count) {
                    let row = space.q + t * d, keyRow = space.k + t * d
                    let norm = dot(row, 1, row, 1, count: d).squareRoot()
                    let inverse: Float = norm > 0 ? 1 / norm : 0
                    for c in 0..<d { keyRow[c] = row[c] * inverse }
                    space.inverseNorm[t] = inverse
                }
            } else {
                PermutedBlockAttention.gather(keys, count: count, key, width: d, into: space.k + first * d,
                                              value, width: dv, into: space.v + first * dv)
            }
            (space.queryGradient + first * d).update(repeating: 0, count: count * d)
        }
        let rows = { (width: Int) in SIMD4<Int>(0, n * width, width, 1) }
        TiledSoftmaxBackward.run(
            shape: space.roundShape, scale: scale, threads: threads,
            q: TensorView(base: space.q, strides: rows(d)), k: TensorView(base: space.k, strides: rows(d)),
            v: TensorView(base: space.v, strides: rows(dv)), o: TensorView(base: space.o, strides: rows(dv)),
            lse: TensorView(base: space.lse, strides: rows(1)),
            dO: TensorView(base: space.outputGradient, strides: rows(dv)),
            dQ: MutableTensorView(base: space.queryGradient, strides: rows(d)),
            dK: MutableTensorView(base: space.keyGradient, strides: rows(d)),
            dV: MutableTensorView(base: space.valueGradient, strides: rows(dv)),
            modifiers: modifiers, biasGradient: biasGradient) { _, _ in mask }
        // Scatter: every position holds one query slot and one key slot of the round.
        let qs = dQ.strides[3], ks = dK.strides[3], vs = dV.strides[3]
        parallelForEach(items: items, threads: threads) { item, _ in
            let first = item * rowsPerItem
            for s in first..<min(n, first + rowsPerItem) {
                PermutedBlockAttention.add(space.queryGradient + s * d, to: dQ.row(b, h, Int(space.queryPosition[s])), stride: qs, count: d)
                let j = Int(space.keyPosition[s])
                let keyGradient = space.keyGradient + s * d
                if sharedKeys {
                    // d(q / |q|) = (I − k kᵀ) / |q|: the key's gradient into its query row.
                    let keyRow = space.k + s * d, inverse = space.inverseNorm[s]
                    let along = dot(keyRow, 1, keyGradient, 1, count: d)
                    for c in 0..<d { keyGradient[c] = inverse * (keyGradient[c] - along * keyRow[c]) }
                    PermutedBlockAttention.add(keyGradient, to: dQ.row(b, h, j), stride: qs, count: d)
                } else {
                    PermutedBlockAttention.add(keyGradient, to: dK.row(b, hk, j), stride: ks, count: d)
                }
                PermutedBlockAttention.add(space.valueGradient + s * dv, to: dV.row(b, hk, j), stride: vs, count: dv)
            }
        }
    }

    /// The self rule's gradients for query `i` (shared QK; no other visible key in any of
    /// the `rounds`): the forward gave `o_i = w · v_i` with `w = exp(s′ + log R − lse_i)`,
    /// `s′` the self score `scale · |q_i|` modified (``PermutedBlockAttention/selfRuleScore(_:scale:modifiers:query:headDim:)``)
    /// and `w` its share against the sink (1 without sinks). So `dV_i += w · dO_i`, and
    /// with sinks `G = w · (dO_i · v_i − dO_i · o_i)` (the `R` equal pairs' `Σ P (dP − D)`;
    /// 0 without sinks) gives `∂bias_ii += G` and `dq_i += G · cap′ · scale · q_i / |q_i|`
    /// (0 for a zero row). Nothing when a `−∞` bias hides the pair (the forward gave 0).
    /// `dQ`, `dV` are row `i`'s; `biasGradient` the head's.
    static func addSelfRule(
        _ i: Int, rounds: Int, headDim d: Int, valueDim dv: Int, scale: Float, sinks: Bool,
        modifiers: ScoreModifierKernel?, query: PermutedBlockAttention.Rows, value: PermutedBlockAttention.Rows,
        output: PermutedBlockAttention.Rows, logSumExp: PermutedBlockAttention.Rows,
        outputGradient: PermutedBlockAttention.Rows, dQ: UnsafeMutablePointer<Float>, dQStride: Int,
        dV: UnsafeMutablePointer<Float>, dVStride: Int, biasGradient: MutableTensorView?
    ) {
        // A −∞ bias on the pair too: the forward gave 0 (no visible key at all).
        let score = PermutedBlockAttention.selfRuleScore(i, scale: scale, modifiers: modifiers, query: query, headDim: d)
        guard score > -.infinity else { return }
        guard sinks else {
            for c in 0..<dv { dV[c &* dVStride] += outputGradient.element(i, c) }
            return
        }
        let w = expf(score + logf(Float(rounds)) - logSumExp.element(i, 0))
        var alongValue: Float = 0, alongOutput: Float = 0
        for c in 0..<dv {
            let g = outputGradient.element(i, c)
            dV[c &* dVStride] += w * g
            alongValue += g * value.element(i, c)
            alongOutput += g * output.element(i, c)
        }
        let gradient = w * (alongValue - alongOutput)
        if let biasGradient { biasGradient.row(0, 0, i)[i &* biasGradient.strides[3]] += gradient }
        let norm = query.squaredNorm(i, count: d).squareRoot()
        guard norm > 0 else { return }
        var factor = gradient * scale / norm
        if let modifiers, modifiers.softCap > 0 {
            factor *= modifiers.softCapDerivative(SIMD16(repeating: scale * norm))[0]
        }
        for c in 0..<d { dQ[c &* dQStride] += factor * query.element(i, c) }
    }

    /// Marks `seen[i]` for the queries with a visible key in this round (shared QK's self
    /// rule), skipping those already marked; a key the bias hides (`−∞`: `modifiers`,
    /// restricted to the head) is not visible, as in the forward.
    static func markSeen(_ space: Workspace, mask: PermutedRoundMask, threads: Int, modifiers: ScoreModifierKernel?) {
        parallelForEach(items: ceilDiv(space.n, rowsPerItem), threads: threads) { item, _ in
            let first = item * rowsPerItem
            for s in first..<min(space.n, first + rowsPerItem) {
                let i = Int(space.queryPosition[s])
                if space.seen[i] == 0 && mask.seesAnyKey(s, scored: { j in modifiers?.hides(b: 0, h: 0, i: i, j: j) != true }) {
                    space.seen[i] = 1
                }
            }
        }
    }
}

/// One whole LSH round's chunk mask for the backward pass: `slots` sorted slots in blocks
/// (chunks) of `blockSize`, the keys of query slot `s`'s block and (``BlockVisibility/withPrevious``)
/// of the block before it, the first block's being the last; within them the
/// ``BlockVisibility`` rules, applied by ``PermutedBlockMask/maskScores(_:ld:tile:queries:)``
/// over the round's slot arrays (key slots of padded keys have block `−1`). Query tiles and
/// key blocks are contiguous runs of slots; a tile's key run is the hull of the keys its
/// blocks may see (the wrap makes it the whole round for tiles of the first block when the
/// round is short), masked.
struct PermutedRoundMask: TransposedTileMask {
    var slots: Int
    var blockSize: Int
    var blocks: Int
    var visibility: BlockVisibility
    /// The forward's mask over the round's slot arrays (no predecessor copy: keys are the
    /// round's own slots).
    var mask: PermutedBlockMask

    /// Whether a block sees the one before it (not itself again: one block).
    private var previous: Bool { visibility.withPrevious && blocks > 1 }

    /// The hull of the key slots that query blocks `first...last` may see, within
    /// `lo...hi`, or `nil`.
    private func keyHull(queryBlocks first: Int, _ last: Int, within lo: Int, _ hi: Int) -> PositionRun? {
        var a = Int.max, z = Int.min
        func take(_ from: Int, _ through: Int) {
            let x = max(from, lo), y = min(through, hi)
            if x <= y { a = min(a, x); z = max(z, y) }
        }
        let start = previous ? first - 1 : first
        take(max(start, 0) * blockSize, min((last + 1) * blockSize, slots) - 1)
        if start < 0 { take((blocks - 1) * blockSize, slots - 1) }
        return a <= z ? PositionRun(start: a, count: z - a + 1) : nil
    }

    func forEachKeyTile(queries: PositionRun, tileSize: Int, _ body: (KeyTile) -> Void) {
        let first = queries.start / blockSize, last = queries.last / blockSize
        let start = previous ? first - 1 : first
        let own = (max(start, 0) * blockSize)..<(min((last + 1) * blockSize, slots))
        if start < 0 && (blocks - 1) * blockSize >= own.upperBound {
            forEachTile(from: (blocks - 1) * blockSize, through: slots - 1, tileSize: tileSize) {
                body(KeyTile(keys: $0, fullyVisible: false))
            }
        }
        forEachTile(from: own.lowerBound, through: own.upperBound - 1, tileSize: tileSize) {
            body(KeyTile(keys: $0, fullyVisible: false))
        }
    }

    func maskScores(_ scores: UnsafeMutablePointer<Float>, ld: Int, tile: KeyTile, queries: PositionRun) {
        mask.maskScores(scores, ld: ld, tile: tile, queries: queries)
    }

    /// Query lanes of blocks `qLo...qHi` see the key blocks `qLo − 1 ... qHi` (with the last
    /// block when `qLo` is the first): the hull's cut of the tile.
    func visibleKeyIndices(tile: KeyTile, queries: PositionRun, lanes: Range<Int>) -> Range<Int> {
        guard let p = lanePositions(queries, lanes),
              let hull = keyHull(queryBlocks: p.first / blockSize, p.last / blockSize,
                                 within: tile.keys.start, tile.keys.last) else { return 0..<0 }
        return runIndices(tile.keys, from: hull.start, through: hull.last)
    }

    /// Key block `u` is seen by query blocks `u` and `u + 1` (block 0 for the last block).
    func forEachQueryTile(seeing keys: PositionRun, queryLength: Int, queryTile: Int,
                          _ body: (_ index: Int, _ queries: PositionRun, _ tile: KeyTile) -> Void) {
        precondition(keys.step == 1, "key-major listing takes contiguous keys")
        guard keys.count > 0 else { return }
        let (lo, hi) = queryRange(keyBlocks: keys.start / blockSize, keys.last / blockSize)
        var listed = -1
        func list(_ tiles: ClosedRange<Int>) {
            for t in tiles where t > listed {
                listed = t
                let queries = PositionRun(start: t * queryTile, count: min(queryTile, queryLength - t * queryTile))
                guard let hull = keyHull(queryBlocks: queries.start / blockSize, queries.last / blockSize,
                                         within: keys.start, keys.last) else { continue }
                body(t, queries, KeyTile(keys: hull, fullyVisible: false))
            }
        }
        // Block 0's tiles first when it sees these keys through the wrap, then the others in order.
        if lo > 0 && hi.wraps { list(0...((min(blockSize, slots) - 1) / queryTile)) }
        list((lo / queryTile)...(hi.last / queryTile))
    }

    /// The first query slot seeing key blocks `first...last`, and the last one (whether
    /// block 0 sees them too, through the wrap).
    private func queryRange(keyBlocks first: Int, _ last: Int) -> (Int, (last: Int, wraps: Bool)) {
        let end = previous ? last + 1 : last
        return (first * blockSize, (min((end + 1) * blockSize, slots) - 1, previous && end >= blocks))
    }

    func visibleQueryIndices(tile: KeyTile, queries: PositionRun, keys: Range<Int>) -> Range<Int> {
        guard !keys.isEmpty else { return 0..<0 }
        let (lo, hi) = queryRange(keyBlocks: tile.keys.position(keys.lowerBound) / blockSize,
                                  tile.keys.position(keys.upperBound - 1) / blockSize)
        return runIndices(queries, from: hi.wraps ? 0 : lo, through: hi.last)
    }

    /// Whether query slot `s` sees some key slot (the mask's rules, one pair at a time) at
    /// a position `j` that `scored(j)` accepts.
    func seesAnyKey(_ s: Int, scored: (_ j: Int) -> Bool = { _ in true }) -> Bool {
        let block = s / blockSize
        let bucket = mask.queryBucket[s], position = Int(mask.queryPosition[s])
        let offset = visibility.causalOffset, sameBucket = visibility.sameBucket, notSelf = visibility.notSelf
        func scan(_ u: Int) -> Bool {
            for t in (u * blockSize)..<min((u + 1) * blockSize, slots) where mask.keyBlock[t] >= 0 {
                let j = Int(mask.keyPosition[t])
                if sameBucket && mask.keyBucket[t] != bucket { continue }
                if let offset, j > position + offset { continue }
                if notSelf && j == position { continue }
                if scored(j) { return true }
            }
            return false
        }
        return scan(block) || (previous && scan((block + blocks - 1) % blocks))
    }
}
