/// The flash-style kernel: softmax attention over the key tiles a ``TileMask`` lists,
/// with an online softmax, emitting each row's output and log-sum-exp.
///
/// For one work item (batch `b`, head `h`, a query tile of at most `Br` queries
/// `start + n·step` from the mask's partition):
///
///     Qᵀ ← scale · Q[tile]ᵀ                  packed D × Br (queries in lanes)
///     m ← −∞, l ← 0, O ← 0                    per query
///     for each key tile (≤ Bc keys start + n·step) the mask lists:
///         V tile: read in place (rows step apart) when Dv % NR == 0, else packed
///         Sᵀ ← K Qᵀ                          micro-kernel, keys read in place step rows apart
///         Sᵀ += mask's score terms            hook (relative positions); skipped unless used
///         mask the partial tiles' scores to −∞
///         m' ← max(m, column max of Sᵀ)      vertical: no horizontal reductions
///         Pᵀ ← exp(Sᵀ − m'), α ← exp(m − m')
///         Pᵀ ← mask's weights ⊙ Pᵀ            hook (soft masks); skipped unless used
///         l ← α·l + column sums of Pᵀ
///         O ← diag(α)·O + P V                 micro-kernel, α fused into the C update;
///                                             partial tiles: each MR-query block over the
///                                             keys the mask says it may see
///     o = O / l, lse = m + log l              (0 and −∞ where l = 0), written step rows apart;
///                                             with `merge`, combined by log-sum-exp with o, lse
///
/// Scores are kept transposed (keys as rows, queries in SIMD lanes) so that the
/// row statistics are elementwise vector operations and `Pᵀ` is already the
/// depth-major operand the second micro-kernel broadcasts from.
///
/// Workspace per worker: `4 · (D·Br + Bc·Dv′ + Bc·Br + Br·Dv′ + 3·Br + 16 + X)` bytes with
/// `Dv′` = Dv rounded up to 32 and `X` the mask's score-term scratch
/// (``TileMask/scoreTermScratchCount(queryTile:keyTile:)``, 0 unless it adds score terms):
/// independent of the sequence lengths.
enum TiledSoftmaxAttention {
    /// Query rows per work item and keys per tile (values: the tuning table, ``Tuning``).
    struct Tiling {
        var queryTile: Int
        var keyTile: Int

        /// The default query tile; patterns whose key sets are narrow bands pass a
        /// smaller one (less wasted work on the band's edges).
        static let defaultQueryTile = Tuning.current.attentionQueryTile
        /// Keys per tile.
        static let keyTile = Tuning.current.attentionKeyTile
        /// At most this many queries per tile with an additive bias: each query row of a
        /// tile reads its own run of bias row (a stream of its own, `Nk` floats from the
        /// next), and fewer streams kept more of them in flight (N = 2048, H = 8: the bias
        /// cost +21 ms with 64, +27 with 128; since its requests are spread over the
        /// micro-kernel loop, 64, 128 and 32 cost the same: KernelDocs/ScoreModifiers.md).
        /// Smaller tiles, never more workspace: the cost model's figure stays an upper bound.
        static let biasQueryTile = 64

        /// The query tile for a pattern whose queries each see a contiguous band of
        /// `width` keys: the band's ends cost `Br` extra keys per tile, so narrow bands
        /// take smaller query tiles.
        static func queryTile(forBandWidth width: Int) -> Int {
            let t = Tuning.current
            return width <= t.narrowBand ? t.narrowBandQueryTile
                : width <= t.mediumBand ? t.mediumBandQueryTile : defaultQueryTile
        }

        /// The query tile for dense rows (every key, or a causal prefix, per query): the
        /// default while one head's keys and values fit `residentKeyBytes`, else
        /// `streamingQueryTile` (see ``Tuning``).
        static func denseQueryTile(keyLength: Int, headDim: Int, valueDim: Int) -> Int {
            let t = Tuning.current
            // keyLength ≤ 2^30 and head dimensions ≤ maxHeadDim: no overflow.
            return keyLength * (headDim + valueDim) * MemoryLayout<Float>.stride > t.residentKeyBytes
                ? t.streamingQueryTile : defaultQueryTile
        }

        static func forProblem(headDim: Int, valueDim: Int, queryTile: Int? = nil) -> Tiling {
            Tiling(queryTile: queryTile ?? defaultQueryTile, keyTile: keyTile)
        }
    }

    /// Bytes of workspace ``run(shape:scale:threads:queryTile:merge:q:k:v:o:lse:mask:)``
    /// allocates for `shape` with `threads` workers (`nil`: every active processor) and
    /// query tile `queryTile` (`nil`: the default tiling); `mask` is the mask type the call
    /// will use (its score-term scratch is included).
    static func workspaceBytes<Mask: TileMask>(shape: AttentionShape, threads: Int?, queryTile: Int? = nil,
                                               workItems items: Int? = nil,
                                               mask: Mask.Type = IntervalMask.self) -> Int {
        let tiling = Tiling.forProblem(headDim: shape.headDim, valueDim: shape.valueDim, queryTile: queryTile)
        let brPad = paddedQueryTile(tiling, shape.queryLength)
        let perWorker = Workspace.byteCount(d: shape.headDim, dv: shape.valueDim,
                                            queryTile: brPad, keyTile: tiling.keyTile,
                                            extra: Mask.scoreTermScratchCount(queryTile: brPad,
                                                                              keyTile: tiling.keyTile))
        let items = items ?? ceilDiv(shape.queryLength, tiling.queryTile) * shape.batch * shape.heads
        return perWorker * workerCount(threads: threads, items: items)
    }

    static func paddedQueryTile(_ tiling: Tiling, _ queryLength: Int) -> Int {
        roundUp(min(tiling.queryTile, queryLength), MicroTile.nr)
    }

    /// Computes `o` and `lse` for every `(b, h, query)` of `shape`.
    ///
    /// `mask(b, h)` gives the visibility of that batch item and head: its query tiles
    /// (each one work item) and their key tiles. `queryTile` overrides the default query
    /// tile (at most that many queries per tile). With `merge`, `o` and `lse` already
    /// hold a result over a key set disjoint from this mask's, and each row is combined
    /// with it by log-sum-exp (rows of no tile, or with no visible key, stay unchanged).
    /// Work items go heaviest query tile first across all heads (causal masks), or with
    /// `byHead` head after head, tiles in order: consecutive items then share their key
    /// rows (bands) and read query rows sequentially.
    static func run<Mask: TileMask>(
        shape: AttentionShape, scale: Float, threads: Int, queryTile: Int? = nil, merge: Bool = false,
        byHead: Bool = false,
        q: TensorView, k: TensorView, v: TensorView,
        o: MutableTensorView, lse: MutableTensorView, modifiers: ScoreModifierKernel? = nil,
        mask: (_ batch: Int, _ head: Int) -> Mask
    ) {
        let tiling = Tiling.forProblem(headDim: shape.headDim, valueDim: shape.valueDim, queryTile: queryTile)
        let br = tiling.queryTile
        let heads = shape.batch * shape.heads
        var tiles = 0
        for b in 0..<shape.batch {
            for h in 0..<shape.heads {
                tiles = max(tiles, mask(b, h).queryTileCount(queryLength: shape.queryLength, tileSize: br))
            }
        }
        let items = tiles * heads
        guard items > 0 else { return }
        let workers = workerCount(threads: threads, items: items)
        let brPad = paddedQueryTile(tiling, shape.queryLength)
        let extra = Mask.scoreTermScratchCount(queryTile: brPad, keyTile: tiling.keyTile)
        WorkspaceArena.withWorkspaces(workers: workers, zeroed: true, layout: {
            Workspace(carving: &$0, d: shape.headDim, dv: shape.valueDim, queryTile: brPad,
                      keyTile: tiling.keyTile, extra: extra)
        }) { spaces in
        do {
            let spaces = UncheckedSendable(spaces)
            func attendQueryTile(_ tile: Int, head: Int, worker: Int, upcoming: UpcomingRows = UpcomingRows()) {
                let b = head / shape.heads, h = head % shape.heads
                let headMask = mask(b, h)
                let queries = headMask.queryTile(tile, queryLength: shape.queryLength, tileSize: br)
                guard queries.count > 0 else { return }
                attendTile(shape: shape, scale: scale, merge: merge, space: spaces.value[worker],
                           b: b, h: h, queries: queries,
                           q: q, k: k, v: v, o: o, lse: lse, modifiers: modifiers, mask: headMask,
                           upcoming: upcoming)
            }
            // A worker's next query tile of the same head: its query rows, output rows (when
            // merging) and first key tile's rows, which the current tile requests into L2
            // a few rows at a time as it computes. Patterns whose tiles see one or two key
            // tiles (axial lines, narrow bands) spend only microseconds per tile, too little
            // for the misses of its first touches to hide behind; rows `step > 1` apart are
            // invisible to the hardware prefetchers besides.
            func rows(ofQueryTile tile: Int, head: Int) -> UpcomingRows {
                let b = head / shape.heads, h = head % shape.heads, hk = h / shape.groupSize
                let headMask = mask(b, h)
                let queries = headMask.queryTile(tile, queryLength: shape.queryLength, tileSize: br)
                var upcoming = UpcomingRows()
                guard queries.count > 0 else { return upcoming }
                upcoming.add(q, b, h, rows: queries, width: shape.headDim)
                if merge { upcoming.add(o.readOnly, b, h, rows: queries, width: shape.valueDim) }
                var first = true
                headMask.forEachKeyTile(queries: queries, tileSize: tiling.keyTile) { tile in
                    guard first else { return }
                    first = false
                    upcoming.add(k, b, hk, rows: tile.keys, width: shape.headDim)
                    upcoming.add(v, b, hk, rows: tile.keys, width: shape.valueDim)
                }
                return upcoming
            }
            if byHead {
                // Runs of up to 8 consecutive tiles of one head per work unit: a worker's
                // next tile continues its last one (key rows still cached, query and output
                // rows streaming), with enough units left to balance the workers.
                parallelForEachRun(items: items, segment: tiles, threads: workers) { item, next, worker in
                    attendQueryTile(item % tiles, head: item / tiles, worker: worker,
                                    upcoming: next.map { rows(ofQueryTile: $0 % tiles, head: $0 / tiles) } ?? UpcomingRows())
                }
            } else {
                // Heaviest query tiles (the last ones, under causal masks) first, every head's
                // tile before the next tile. Heads of one or two query tiles (a short sequence
                // in many heads) touch their rows once: runs of up to 8 items per work unit,
                // each requesting the next one's rows. (Longer heads keep one item per unit:
                // runs cost dense at N = 2048 2-3 %.)
                parallelForEachRun(items: items, maxRun: tiles > 2 ? 1 : 8, threads: workers) { item, next, worker in
                    attendQueryTile(tiles - 1 - item / heads, head: item % heads, worker: worker,
                                    upcoming: next.map { rows(ofQueryTile: tiles - 1 - $0 / heads, head: $0 % heads) }
                                        ?? UpcomingRows())
                }
            }
        }
        }
    }

    /// A whole single-kernel `attend`: fills the call's output and log-sum-exp with one
    /// ``run(shape:scale:threads:queryTile:merge:byHead:q:k:v:o:lse:mask:)`` (dense,
    /// adaptive span, multi-query).
    static func attend<Mask: TileMask>(_ call: ViewCall, queryTile: Int? = nil,
                                       mask: (_ batch: Int, _ head: Int) -> Mask) {
        var queryTile = queryTile
        if call.modifiers?.bias != nil {
            queryTile = min(queryTile ?? Tiling.defaultQueryTile, Tiling.biasQueryTile)
        }
        run(shape: call.shape, scale: call.scale, threads: call.threadCount, queryTile: queryTile,
            q: call.q, k: call.k, v: call.v, o: call.o, lse: call.lse, modifiers: call.modifiers, mask: mask)
    }

    /// One work item: the query tile `queries` of head `h` in batch item `b`.
    @inline(__always)
    static func attendTile<Mask: TileMask>(
        shape: AttentionShape, scale: Float, merge: Bool, space: Workspace,
        b: Int, h: Int, queries: PositionRun,
        q: TensorView, k: TensorView, v: TensorView,
        o: MutableTensorView, lse: MutableTensorView, modifiers: ScoreModifierKernel? = nil, mask: Mask,
        upcoming: UpcomingRows = UpcomingRows()
    ) {
        let d = shape.headDim, dv = shape.valueDim
        let hk = h / shape.groupSize
        let br = space.queryTile, dvPad = space.dvPad
        let mr = MicroTile.mr, nr = MicroTile.nr
        let queryLanes = roundUp(queries.count, nr)
        // Lanes scored: whole 32-lane panels and, where the queries end within the first
        // half of the last one, a 16-lane half panel (the micro-kernel's `halfWidth`; a
        // strided column tile of 44 queries scores 48 lanes, not 64). The softmax and the
        // modifiers run over these lanes only; `P V` reads fewer (`outputRows`).
        let scoredLanes = roundUp(queries.count, nr / 2)
        // Output rows of `P V`: whole blocks of MR holding the tile's queries (lanes past
        // them are padding of the 32-lane score panels, never read back).
        let outputRows = roundUp(queries.count, mr)
        // Key and value rows are read in place when `TensorView.readsInPlace` says so (Float
        // rows of a contiguous tile; values also whole micro-tile rows), else packed per tile
        // (16-bit ones widened: the only conversion).

        // Touch the query rows first, so that their cache misses overlap instead of
        // stalling the transposing pack one row at a time (cheap next to a dense row's
        // work; it matters for narrow bands, which only see a few tiles). Output rows a
        // merge reads `step > 1` apart too: they defeat the hardware prefetchers.
        q.touch(b, h, rows: queries, width: d, sink: space.sink)
        if merge && queries.step > 1 {
            o.touch(b, h, rows: queries, width: dv, sink: space.sink)
        }
        packQueries(q, b: b, h: h, queries: queries, d: d, scale: scale,
                    into: space.qT, ld: br, lanes: queryLanes, stage: space.stage)
        for i in 0..<br {
            space.rowMax[i] = -.infinity
            space.rowSum[i] = 0
        }

        // The next work item's rows, requested a few at a time at each micro-kernel block
        // of the first key tile (the rest after the last tile).
        var upcoming = upcoming
        let pointsPerTile = (space.keyTile + mr - 1) / mr + (dvPad / nr) * (outputRows / mr)
        let upcomingPerPoint = (upcoming.remainingRows + pointsPerTile - 1) / pointsPerTile
        // The first key tile writes the accumulators (`O = P V`): the same bits as scaling
        // zeros by its `α = e^{−∞} = 0` and adding (a micro-kernel sum starts at +0, so it is
        // never −0), without zero-filling them first. Patterns whose rows see one or two key
        // tiles (axial lines, narrow bands) spent a few percent on the fill.
        var firstTile = true
        mask.forEachKeyTile(queries: queries, tileSize: space.keyTile) { tile in
            let keys = tile.keys
            if keys.step > 1 {
                k.touch(b, hk, rows: keys, width: d, sink: space.sink)
                v.touch(b, hk, rows: keys, width: dv, sink: space.sink)
            } else {
                // The next contiguous tile's key and value rows, requested now so that they
                // arrive while this tile computes (rows past the head are harmless: a
                // prefetch never faults).
                let next = PositionRun(start: keys.start + keys.count, count: keys.count)
                k.prefetch(b, hk, rows: next, width: d)
                v.prefetch(b, hk, rows: next, width: dv)
            }
            let values: UnsafePointer<Float>, ldv: Int
            if v.readsInPlace(keys, width: dv, padded: dvPad) {
                values = v.row(b, hk, keys.start)
                ldv = v.strides[2]
            } else {
                packValues(v, b: b, h: hk, keys: keys, dv: dv, into: space.vPack, ld: dvPad)
                values = UnsafePointer(space.vPack)
                ldv = dvPad
            }
            // Sᵀ = K Qᵀ, key rows in place or packed into `stage`.
            let keysInPlace = k.readsInPlace(keys)
            if !keysInPlace {
                k.widenRows(b, hk, rows: keys, width: d, into: space.stage, ld: d)
            }
            let keyRowStride = keysInPlace ? k.strides[2] : d
            let keyDepthStride = keysInPlace ? k.strides[3] : 1
            let keyBlocks = (keys.count + mr - 1) / mr
            for block in 0..<keyBlocks {
                upcoming.prefetch(rows: upcomingPerPoint)
                // The next key tile's bias, a few query rows per block (ScoreModifierKernel.prefetchBias).
                modifiers?.prefetchBias(keys: PositionRun(start: keys.start + keys.count, count: keys.count),
                                        queries: queries, part: block, of: keyBlocks, b: b, h: h)
                let rows = min(mr, keys.count - block * mr)
                let keyRows = BroadcastOperand(base: keysInPlace ? k.row(b, hk, keys.position(block * mr))
                                                                 : UnsafePointer(space.stage + block * mr * d),
                                               rowStride: keyRowStride, depthStride: keyDepthStride, rows: rows)
                // On a partial tile, only the half panels of the queries that may see these
                // keys (the mask hides the rest of their rows).
                let lanes = tile.fullyVisible ? 0..<scoredLanes
                    : halfPanelLanes(holding: mask.scoredQueryLanes(tile: tile, queries: queries,
                                                                    keys: (block * mr)..<(block * mr + rows)),
                                     lanes: scoredLanes)
                forEachPanel(lanes) { panel, half in
                    microKernel(depth: d, a: keyRows,
                                b: space.qT + panel, ldb: br,
                                c: space.scores + block * mr * br + panel, ldc: br,
                                update: .overwrite, halfWidth: half)
                }
            }
            if Mask.addsScoreTerms {
                assert(keys.step == 1 && queries.step == 1, "score-term hooks take runs of step 1")
                mask.addScoreTerms(ScoreTile(scores: space.scores, ld: br, queries: space.qT,
                                             headDim: d, lanes: queryLanes, keyTile: space.keyTile,
                                             scratch: space.extra,
                                             keyStart: keys.start, keyCount: keys.count,
                                             queryStart: queries.start, queryCount: queries.count))
            }
            if let modifiers {
                modifiers.apply(space.scores, ld: br, keys: keys, queries: queries, lanes: scoredLanes, b: b, h: h)
            }
            if !tile.fullyVisible {
                mask.maskScores(space.scores, ld: br, tile: tile, queries: queries)
            }
            onlineSoftmax(space, keyCount: keys.count, lanes: scoredLanes,
                          updateSums: !Mask.weightsProbabilities)
            if Mask.weightsProbabilities {
                assert(keys.step == 1 && queries.step == 1, "weighting hooks take runs of step 1")
                mask.weightProbabilities(space.scores, ld: br, keyStart: keys.start, keyCount: keys.count,
                                         queryStart: queries.start, queryCount: queries.count)
                addColumnSums(space, keyCount: keys.count, lanes: scoredLanes)
            }
            // O = diag(α) O + P V; on a partial tile each block of MR queries runs over
            // only the keys the mask says it may see (the others have probability 0).
            for panel in stride(from: 0, to: dvPad, by: nr) {
                for block in stride(from: 0, to: outputRows, by: mr) {
                    upcoming.prefetch(rows: upcomingPerPoint)
                    let span = tile.fullyVisible
                        ? 0..<keys.count
                        : mask.visibleKeyIndices(tile: tile, queries: queries, lanes: block..<(block + mr))
                    let probabilities = BroadcastOperand(base: space.scores + span.lowerBound * br + block,
                                                         rowStride: 1, depthStride: br)
                    microKernel(depth: span.count, a: probabilities,
                                b: values + span.lowerBound * ldv + panel, ldb: ldv,
                                c: space.acc + block * dvPad + panel, ldc: dvPad,
                                update: firstTile ? .overwrite : .scaleAndAccumulate(space.alpha + block))
                }
            }
            firstTile = false
        }

        upcoming.prefetch(rows: upcoming.remainingRows)

        // o = O / l, lse = m + log l (merged by log-sum-exp with what o and lse hold). A
        // 16-bit output row is formed in Float (in `vPack`, free now) and rounded once.
        assert(!merge || o.precision == .float32, "merging passes read their output back: Float outputs only")
        let os = o.strides[3]
        let narrowed = o.precision != .float32, staged = space.vPack
        for ii in 0..<queries.count {
            let i = queries.position(ii)
            let out = o.rawRow(b, h, i).assumingMemoryBound(to: Float.self), lseOut = lse.row(b, h, i)
            let sum = space.rowSum[ii]
            let row = space.acc + ii &* dvPad
            if sum > 0 && merge && lseOut[0] != -.infinity {
                // The log-sum-exp merge (LogSumExpMerge) of the held `A` and this row's
                // `m + log l`: with `M = max(A, m)`, weights `e^(A−M)` and `e^(m−M)` (one is 1)
                // and `t = e^(A−M) + e^(m−M)·l`, `o ← (e^(A−M)·o + e^(m−M)·O) / t`, `lse = M + log t`.
                let held = lseOut[0], m = space.rowMax[ii]
                // `held` and `m` are finite (a held row with keys, `sum > 0`): the merge exists.
                guard var rows = LogSumExpMerge(maximum: max(held, m)) else { continue }
                let first = rows.weight(held), second = rows.weight(m)
                rows.add(first)
                rows.add(second, sum: sum)
                let r = 1 / rows.total
                let keep = first * r, inverse = second * r
                if os == 1 {
                    for c in 0..<dv { out[c] = keep * out[c] + inverse * row[c] }
                } else {
                    for c in 0..<dv { out[c &* os] = keep * out[c &* os] + inverse * row[c] }
                }
                lseOut[0] = rows.logSumExp
            } else if sum > 0 {
                let inverse = 1 / sum
                if narrowed {
                    for c in 0..<dv { staged[c] = row[c] * inverse }
                    o.storeRow(b, h, i, from: staged, count: dv)
                } else if os == 1 {
                    for c in 0..<dv { out[c] = row[c] * inverse }
                } else {
                    for c in 0..<dv { out[c &* os] = row[c] * inverse }
                }
                lseOut[0] = space.rowMax[ii] + logf(sum)
            } else if !merge {
                o.zeroRow(b, h, i, count: dv)
                lseOut[0] = -.infinity
            }
        }
    }

    /// Updates the running max, sum and rescale factor of every query lane and turns the
    /// score tile into probabilities `exp(s − m')`. With `updateSums` false the running
    /// sums are left for ``addColumnSums(_:keyCount:lanes:)`` (after a weighting hook).
    /// Not inlined: one call per key tile, and a body of its own keeps `VectorMath.exp`
    /// inlined and in registers however large the mask-specialised caller grows.
    @inline(never)
    static func onlineSoftmax(_ space: Workspace, keyCount: Int, lanes: Int, updateSums: Bool = true) {
        let br = space.queryTile
        let minusInfinity = Vec16(repeating: -.infinity)
        for lane in stride(from: 0, to: lanes, by: 16) {
            let column = space.scores + lane
            var tileMax = minusInfinity
            for j in 0..<keyCount { tileMax = maximum(tileMax, load16(column + j * br)) }
            let oldMax = load16(space.rowMax + lane)
            let newMax = maximum(oldMax, tileMax)
            // A lane that has seen no visible key keeps m = −∞; subtracting 0 instead keeps exp(−∞) = 0.
            // Every exponent below is at most 0 (or NaN): `m'` is the maximum of `m` and the tile.
            var shift = newMax
            shift.replace(with: 0, where: newMax .== minusInfinity)
            let alpha = VectorMath.expNonPositive16(oldMax - shift)
            var sum0 = Vec16(), sum1 = Vec16()
            var j = 0
            while j + 1 < keyCount {
                let p0 = VectorMath.expNonPositive16(load16(column + j * br) - shift)
                let p1 = VectorMath.expNonPositive16(load16(column + (j + 1) * br) - shift)
                store16(p0, column + j * br)
                store16(p1, column + (j + 1) * br)
                sum0 += p0
                sum1 += p1
                j += 2
            }
            if j < keyCount {
                let p0 = VectorMath.expNonPositive16(load16(column + j * br) - shift)
                store16(p0, column + j * br)
                sum0 += p0
            }
            if updateSums {
                store16(fused(load16(space.rowSum + lane), alpha, sum0 + sum1), space.rowSum + lane)
            }
            store16(newMax, space.rowMax + lane)
            store16(alpha, space.alpha + lane)
        }
    }

    /// `l ← α·l + column sums of Pᵀ`, for a probability tile the mask has reweighted.
    @inline(__always)
    static func addColumnSums(_ space: Workspace, keyCount: Int, lanes: Int) {
        let br = space.queryTile
        for lane in stride(from: 0, to: lanes, by: 16) {
            let column = space.scores + lane
            var sum0 = Vec16(), sum1 = Vec16()
            var j = 0
            while j + 1 < keyCount {
                sum0 += load16(column + j * br)
                sum1 += load16(column + (j + 1) * br)
                j += 2
            }
            if j < keyCount { sum0 += load16(column + j * br) }
            store16(fused(load16(space.rowSum + lane), load16(space.alpha + lane), sum0 + sum1),
                    space.rowSum + lane)
        }
    }

    /// `qT[c · ld + ii] = scale · q[queries.position(ii)][c]`; lanes `count..<lanes` are zero.
    /// 16-bit query rows are widened 16 at a time into `stage` (16·d floats; Float rows need
    /// none), then packed
    /// like Float rows (the same products, so the same bits as Float rows of their values).
    @inline(__always)
    static func packQueries(_ q: TensorView, b: Int, h: Int, queries: PositionRun, d: Int,
                            scale: Float, into qT: UnsafeMutablePointer<Float>, ld: Int, lanes: Int,
                            stage: UnsafeMutablePointer<Float>? = nil) {
        if q.precision != .float32, let stage {
            var first = 0
            while first < queries.count {
                let n = min(16, queries.count - first)
                let rows = PositionRun(start: queries.position(first), count: n, step: queries.step)
                q.widenRows(b, h, rows: rows, width: d, into: stage, ld: d)
                packRows({ UnsafePointer(stage + $0 &* d) }, count: n, columnStride: 1, d: d, scale: scale,
                         into: qT + first, ld: ld)
                first += n
            }
        } else {
            let rowStride = queries.step &* q.strides[2], base = q.row(b, h, queries.start)
            packRows({ base + $0 &* rowStride }, count: queries.count, columnStride: q.strides[3], d: d,
                     scale: scale, into: qT, ld: ld)
        }
        if queries.count < lanes {
            for c in 0..<d { (qT + c * ld + queries.count).update(repeating: 0, count: lanes - queries.count) }
        }
    }

    /// `qT[c · ld + r] = scale · row(r)[c · columnStride]` for `r < count`, `c < d`: whole
    /// blocks of 16 rows × 16 columns transposed in registers when columns are adjacent, the
    /// last rows as one more block (lanes `count ..< roundUp(count, 16)` then hold copies of
    /// the last row: `ld` must leave room, and the caller zeroes them).
    @inline(__always)
    static func packRows(_ row: (Int) -> UnsafePointer<Float>, count: Int, columnStride sd: Int, d: Int,
                         scale: Float, into qT: UnsafeMutablePointer<Float>, ld: Int) {
        var first = 0
        if sd == 1 {
            while first + 16 <= count {
                let start = first
                Transpose16.transpose(scale: Vec16(repeating: scale), rows: { row(start + $0) }, depth: d,
                                      into: qT + first, ld: ld)
                first += 16
            }
            if first < count {
                // The last rows as a block too, its missing rows repeating the last row: the
                // lanes past `count` get values the caller overwrites.
                let start = first, last = count - 1
                Transpose16.transpose(scale: Vec16(repeating: scale), rows: { row(min(start + $0, last)) }, depth: d,
                                      into: qT + first, ld: ld)
                first = count
            }
        }
        for r in first..<count {
            let source = row(r)
            var out = qT + r
            for c in 0..<d {
                out.pointee = scale * source[c &* sd]
                out += ld
            }
        }
    }

    /// Value rows of `keys`: `vPack[r · ld + c] = v[keys.position(r)][c]`; columns
    /// `dv..<ld` stay zero from allocation.
    @inline(__always)
    static func packValues(_ v: TensorView, b: Int, h: Int, keys: PositionRun, dv: Int,
                           into vPack: UnsafeMutablePointer<Float>, ld: Int) {
        guard v.precision == .float32 else {
            return v.widenRows(b, h, rows: keys, width: dv, into: vPack, ld: ld)
        }
        let sd = v.strides[3]
        for r in 0..<keys.count {
            let row = v.row(b, h, keys.position(r))
            let out = vPack + r * ld
            if sd == 1 {
                // Rows of a few hundred bytes: a vector loop, not a library call per row.
                var c = 0
                while c &+ 16 <= dv {
                    store16(load16(row + c), out + c)
                    c &+= 16
                }
                while c < dv {
                    out[c] = row[c]
                    c &+= 1
                }
            } else {
                for c in 0..<dv { out[c] = row[c * sd] }
            }
        }
    }

    /// One worker's scratch memory, carved from a zero-filled arena once per call.
    struct Workspace {
        let queryTile: Int, keyTile: Int, dvPad: Int
        let qT, vPack, scores, acc, rowMax, rowSum, alpha: UnsafeMutablePointer<Float>
        /// 16-bit operands widened to Float: a key tile (`Bc × D`) or 16 query rows.
        let stage: UnsafeMutablePointer<Float>
        /// Where ``touchRows(_:count:rowStride:length:sink:)`` leaves its sum.
        let sink: UnsafeMutablePointer<Float>
        /// The mask's score-term scratch (`extra` floats; empty for most masks).
        let extra: UnsafeMutablePointer<Float>

        init(carving carver: inout WorkspaceCarver, d: Int, dv: Int, queryTile br: Int, keyTile bc: Int,
             extra extraCount: Int = 0) {
            queryTile = br
            keyTile = bc
            dvPad = roundUp(dv, MicroTile.nr)
            qT = carver.take(d * br)
            vPack = carver.take(bc * dvPad)
            scores = carver.take(roundUp(bc, MicroTile.mr) * br)
            acc = carver.take(br * dvPad)
            rowMax = carver.take(br)
            rowSum = carver.take(br)
            alpha = carver.take(br)
            stage = carver.take(max(bc, 16) * d)
            sink = carver.take(16)
            extra = carver.take(extraCount)
        }

        static func byteCount(d: Int, dv: Int, queryTile br: Int, keyTile bc: Int, extra: Int = 0) -> Int {
            WorkspaceCarver.bytes {
                _ = Workspace(carving: &$0, d: d, dv: dv, queryTile: br, keyTile: bc, extra: extra)
            }
        }
    }
}

/// Prefetches `count` rows of `widthBytes` bytes, `rowStrideBytes` apart, one request per
/// 64-byte line, into every cache level or, with `outer`, into L2 and beyond.
@inline(__always)
func prefetchRows(_ base: UnsafeRawPointer, count: Int, rowStrideBytes: Int, widthBytes: Int, outer: Bool = false) {
    for r in 0..<count {
        let row = base + r &* rowStrideBytes
        var c = 0
        while c < widthBytes {
            if outer { ea_prefetch_read_l2(row + c) } else { ea_prefetch_read(row + c) }
            c &+= 64
        }
    }
}

/// Reads one byte of every 64-byte line of `count` rows `rowStrideBytes` apart
/// (`lengthBytes` each) with independent loads, so that their misses overlap; the sum is
/// added to `sink` only to keep the loads (a store that the next touch overwrote would be
/// dead, and the compiler could drop its loads with it).
@inline(__always)
func touchRows(_ base: UnsafeRawPointer, count: Int, rowStrideBytes: Int, lengthBytes: Int,
               sink: UnsafeMutablePointer<Float>) {
    var sum: UInt32 = 0
    for r in 0..<count {
        let row = base + r &* rowStrideBytes
        var c = 0
        while c < lengthBytes {
            sum &+= UInt32(row.load(fromByteOffset: c, as: UInt8.self))
            c &+= 64
        }
    }
    sink.pointee += Float(sum)
}

/// Up to five runs of rows (a work item's query, output, key and value rows; the backward's
/// also `dO`'s) to request into L2 a few rows at a time (``prefetch(rows:)``), so that the
/// requests spread over the arithmetic in between instead of filling the miss queues in one
/// burst. Fixed size: no allocation.
struct UpcomingRows {
    private struct Run {
        var base: UnsafeRawPointer? = nil
        var count = 0, strideBytes = 0, widthBytes = 0
    }
    private var runs = InlineArray<5, Run>(repeating: Run())
    private var runCount = 0
    /// The next row to request: run `current`, row `row`.
    private var current = 0, row = 0
    /// Rows not requested yet.
    private(set) var remainingRows = 0

    /// Appends the rows `rows` of head `(b, h)` of `view`, `width` elements each.
    mutating func add(_ view: TensorView, _ b: Int, _ h: Int, rows: PositionRun, width: Int) {
        guard runCount < 5 && rows.count > 0 else { return }
        let r = view.byteRows(b, h, rows: rows, width: width)
        runs[runCount] = Run(base: r.base, count: rows.count, strideBytes: r.strideBytes, widthBytes: r.lengthBytes)
        runCount += 1
        remainingRows += rows.count
    }

    /// Requests the next `n` rows (fewer when fewer remain) into L2.
    @inline(__always)
    mutating func prefetch(rows n: Int) {
        if remainingRows > 0 { request(rows: n) }
    }

    /// ``prefetch(rows:)``'s requests. Not inlined: the patterns' kernels are specialised in
    /// the conformers' files, where the C prefetch helper stayed a call per line (with a
    /// `vzeroupper`); compiled once here, each line is one instruction.
    @inline(never)
    private mutating func request(rows n: Int) {
        var n = min(n, remainingRows)
        remainingRows -= n
        while n > 0 {
            let run = runs[current]
            let take = min(n, run.count - row)
            prefetchRows(run.base! + row &* run.strideBytes, count: take, rowStrideBytes: run.strideBytes,
                         widthBytes: run.widthBytes, outer: true)
            n -= take
            row += take
            if row == run.count { current += 1; row = 0 }
        }
    }
}

/// Asks for every cache line of rows `positions[0..<count]` (`base + positions[r] ·
/// rowStride`, `length` floats each) with prefetch instructions, for writing when `write`:
/// rows scattered over a gather or scatter. Unlike the loads of
/// ``touchRows(_:count:rowStride:length:sink:)``, prefetches do not hold up the
/// instructions that follow until their lines arrive, so the work on other rows runs
/// meanwhile.
@inline(__always)
func prefetchRows(_ base: UnsafePointer<Float>, count: Int, rowStride: Int, length: Int,
                  positions: UnsafePointer<Int32>, write: Bool = false) {
    prefetchRows(UnsafeRawPointer(base), count: count, rowStrideBytes: rowStride &* 4, lengthBytes: length &* 4,
                 positions: positions, write: write)
}

/// ``prefetchRows(_:count:rowStride:length:positions:write:)`` with the distance between
/// rows and their span in bytes (rows of any precision).
@inline(__always)
func prefetchRows(_ base: UnsafeRawPointer, count: Int, rowStrideBytes: Int, lengthBytes: Int,
                  positions: UnsafePointer<Int32>, write: Bool = false) {
    for r in 0..<count {
        let row = base + Int(positions[r]) &* rowStrideBytes
        var c = 0
        while c < lengthBytes {
            // `__builtin_prefetch` in C (CEfficientAttention): `prefetchw` / `prefetcht0`.
            if write {
                ea_prefetch_write(row + c)
            } else {
                ea_prefetch_read(row + c)
            }
            c &+= 64
        }
    }
}

extension TensorView {
    /// ``touchRows(_:count:rowStrideBytes:lengthBytes:sink:)`` over the rows `rows` of head
    /// `(b, h)`, `width` elements each.
    @inline(__always)
    func touch(_ b: Int, _ h: Int, rows: PositionRun, width: Int, sink: UnsafeMutablePointer<Float>) {
        let r = byteRows(b, h, rows: rows, width: width)
        touchRows(r.base, count: rows.count, rowStrideBytes: r.strideBytes, lengthBytes: r.lengthBytes, sink: sink)
    }

    /// Prefetches the rows `rows` of head `(b, h)`, `width` elements each (contiguous rows).
    /// Not inlined, as ``UpcomingRows``' requests: one call per tile rather than one per line.
    @inline(never)
    func prefetch(_ b: Int, _ h: Int, rows: PositionRun, width: Int) {
        let bytes = precision.byteWidth
        prefetchRows(rawRow(b, h, rows.start), count: rows.count, rowStrideBytes: rows.step &* strides[2] &* bytes,
                     widthBytes: width &* bytes)
    }

    /// The rows `rows` of head `(b, h)`, `width` elements each, in bytes: the first row's
    /// address, the distance between rows, and the bytes a row spans (``rowExtent(width:elementStride:)``).
    @inline(__always)
    func byteRows(_ b: Int, _ h: Int, rows: PositionRun, width: Int)
        -> (base: UnsafeRawPointer, strideBytes: Int, lengthBytes: Int) {
        let bytes = precision.byteWidth
        return (rawRow(b, h, rows.start), rows.step &* strides[2] &* bytes,
                rowExtent(width: width, elementStride: strides[3]) &* bytes)
    }
}

extension MutableTensorView {
    /// ``TensorView/touch(_:_:rows:width:sink:)`` on the same rows.
    @inline(__always)
    func touch(_ b: Int, _ h: Int, rows: PositionRun, width: Int, sink: UnsafeMutablePointer<Float>) {
        readOnly.touch(b, h, rows: rows, width: width, sink: sink)
    }
}

/// The floats a row of `width` elements `elementStride` apart spans, from its first element
/// to its last inclusive: `(width - 1) · elementStride + 1` (0 for an empty row, 1 for a
/// stride-0 row). A touch or prefetch over more would address memory past the row's last
/// element, past the end of the storage for the last row of a view.
@inline(__always)
func rowExtent(width: Int, elementStride: Int) -> Int {
    width > 0 ? (width &- 1) &* elementStride &+ 1 : 0
}

@inline(__always)
func roundUp(_ x: Int, _ multiple: Int) -> Int { (x + multiple - 1) / multiple * multiple }

import CEfficientAttention
