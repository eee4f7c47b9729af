/// The backward pass of one head of routing attention (``RoutingAttention``) with its
/// routes held fixed: each cluster's gathered rows run the flash backward
/// (``TiledSoftmaxBackward``), and the gathered gradients are added back to the original
/// rows in cluster order.
///
/// For one head `(b, h)` (key/value head `hk`), with the cluster lists of the forward
/// (`Q_c`: `wq` query positions, `K_c`: `wk` key positions, each ascending):
///
///     limit[c][ii] = #{ key slots jj of c : K_c[jj] < keyLength, and K_c[jj] ≤ Q_c[ii] + Nk − Nq if causal }
///                    (both lists ascending, so query slot ii sees exactly key slots 0 ..< limit)
///     gather       Q̃[c][ii] = q[Q_c[ii]],  K̃[c][jj] = k[K_c[jj]],  Ṽ[c][jj] = v[K_c[jj]]
///     recompute    (Õ, l̃se) = TiledSoftmaxAttention per cluster (batch item c)   the per-cluster
///                  outputs and log-sum-exps the forward merged and did not keep
///     used[i]      = #{ (c, ii) : Q_c[ii] = i, limit[c][ii] > 0, l̃se[c][ii] > −∞ }   (the forward's mean is over these)
///                  dÕ[c][ii] = dO[Q_c[ii]] · (1 / used)   (0 if not counted): the mean's derivative
///     backward     (dQ̃, dK̃, dṼ) = TiledSoftmaxBackward per cluster, D = rowsum(dÕ ∘ Õ)
///     scatter      dQ[Q_c[ii]] += dQ̃[c][ii],  dK[K_c[jj]] += dK̃[c][jj],  dV[K_c[jj]] += dṼ[c][jj]
///                  slots in order (cluster c, then slot), whichever thread takes the row
///
/// Every cluster is a batch item of the two tiled kernels (one query tile per 64 queries, one
/// key block per 128 keys), with a ``ClusterPrefixMask``. Both kernels are bitwise identical
/// for any thread count; the scatter splits the destination rows between the threads and
/// each thread walks every slot in order, so each row's sum has the same order for any
/// split. Results are bitwise identical for any thread count.
///
/// Workspace (floats; `Sq = K · wq ≤ Nq + K`, `Sk = K · wk ≤ Nk + K`):
/// `Sq · (2·D + 2·Dv + 1) + Sk · (2·D + 2·Dv)` plus `Sq + Nq` 32-bit integers, per head in
/// flight (one at a time), and the tiled kernels' per-worker workspaces.
enum ClusterBackward {
    /// One head's problem: the router's sizes and the value dimension.
    struct Sizes {
        var router: ClusterRouter.Sizes
        var valueDim: Int

        var clusters: Int { router.clusters }
        var querySlots: Int { router.clusters * router.queryTake }
        var keySlots: Int { router.clusters * router.keyTake }

        /// The tiled kernels' problem: a batch item per cluster, its slots as the sequence.
        var clusterShape: AttentionShape {
            AttentionShape(batch: router.clusters, heads: 1, queryLength: router.queryTake,
                           keyLength: router.keyTake, headDim: router.depth, valueDim: valueDim)
        }
    }

    /// Padding of the per-slot limits (the mask reads 16-lane vectors past a tile's queries).
    static let limitPadding = 32

    /// One head's gathered rows, recomputed statistics and gathered gradients.
    struct Workspace {
        /// Per query slot: `Q̃` (`D`), `Õ`, `dÕ` (`Dv`), `dQ̃` (`D`) and `l̃se`.
        let q, o, outputGradient, queryGradient, lse: UnsafeMutablePointer<Float>
        /// Per key slot: `K̃`, `dK̃` (`D`), `Ṽ`, `dṼ` (`Dv`).
        let k, keyGradient, v, valueGradient: UnsafeMutablePointer<Float>
        /// Per query slot: the key slots it sees (`0 ..< limit`), padded.
        let limits: UnsafeMutablePointer<Int32>
        /// Per original query: the memberships with a visible key.
        let used: UnsafeMutablePointer<Int32>

        init(carving carver: inout WorkspaceCarver, _ s: Sizes) {
            let d = s.router.depth, dv = s.valueDim, sq = s.querySlots, sk = s.keySlots
            q = carver.take(sq * d)
            o = carver.take(sq * dv)
            outputGradient = carver.take(sq * dv)
            queryGradient = carver.take(sq * d)
            lse = carver.take(sq)
            k = carver.take(sk * d)
            keyGradient = carver.take(sk * d)
            v = carver.take(sk * dv)
            valueGradient = carver.take(sk * dv)
            limits = carver.take(sq + ClusterBackward.limitPadding, of: Int32.self)
            used = carver.take(s.router.queryLength, of: Int32.self)
        }

        static func byteCount(_ s: Sizes) -> Int {
            WorkspaceCarver.bytes { _ = Workspace(carving: &$0, s) }
        }
    }

    /// Bytes of the tiled kernels' workspaces with `threads` workers (the larger of the
    /// two: they run one after the other, inside the head workspace's scope).
    static func kernelBytes(_ s: Sizes, threads: Int) -> Int {
        let shape = s.clusterShape
        return max(TiledSoftmaxAttention.workspaceBytes(shape: shape, threads: threads, mask: ClusterPrefixMask.self),
                   TiledSoftmaxBackward.workspaceBytes(shape: shape, threads: threads, mask: ClusterPrefixMask.self))
    }

    /// Adds head `(b, h)`'s contributions to `dQ` (rows of head `h`) and to `dK`, `dV`
    /// (rows of key/value head `hk`), given its routes `queryRoutes[c · wq + ii]`,
    /// `keyRoutes[c · wk + jj]` (each cluster's positions ascending), on `threads` threads.
    ///
    /// - Parameters:
    ///   - causalOffset: `Nk − Nq` when causal, else `nil`.
    ///   - keyLength: keys at positions `>= keyLength` are invisible (padding).
    ///   - modifiers: the call's score modifiers (soft-capping, ALiBi, bias; nil: none),
    ///     applied at the slots' positions in both kernels.
    ///   - biasGradient: where to add head `(b, h)`'s `∂L/∂bias` (restricted to the head:
    ///     ``TiledSoftmaxBackward/addBiasGradient(_:_:b:h:keys:queries:modifiers:)``), or nil.
    static func addHead(
        _ s: Sizes, space: Workspace, queryRoutes qp: UnsafePointer<Int32>, keyRoutes kp: UnsafePointer<Int32>,
        causalOffset: Int?, keyLength: Int, scale: Float, threads: Int,
        query: PermutedBlockAttention.Rows, key: PermutedBlockAttention.Rows, value: PermutedBlockAttention.Rows,
        outputGradient: PermutedBlockAttention.Rows,
        dQ: MutableTensorView, dK: MutableTensorView, dV: MutableTensorView, b: Int, h: Int, hk: Int,
        modifiers: ScoreModifierKernel? = nil, biasGradient: MutableTensorView? = nil
    ) {
        let d = s.router.depth, dv = s.valueDim
        let wq = s.router.queryTake, wk = s.router.keyTake, clusters = s.clusters
        let sq = s.querySlots, sk = s.keySlots, n = s.router.queryLength
        // Which key slots each query slot sees (both lists ascending: a prefix).
        parallelForEach(items: clusters, threads: threads) { c, _ in
            let keys = kp + c * wk, queries = qp + c * wq, limits = space.limits + c * wq
            var valid = 0
            while valid < wk && Int(keys[valid]) < keyLength { valid += 1 }
            guard let offset = causalOffset else {
                limits.update(repeating: Int32(valid), count: wq)
                return
            }
            var seen = 0
            for ii in 0..<wq {
                let last = Int(queries[ii]) + offset
                while seen < valid && Int(keys[seen]) <= last { seen += 1 }
                limits[ii] = Int32(seen)
            }
        }
        (space.limits + sq).update(repeating: 0, count: limitPadding)
        // Gather the clusters' rows.
        parallelForEach(items: clusters, threads: threads) { c, _ in
            let first = c * wq
            PermutedBlockAttention.gather(qp + first, count: wq, query, width: d, into: space.q + first * d,
                                          outputGradient, width: dv, into: space.outputGradient + first * dv)
            PermutedBlockAttention.gather(kp + c * wk, count: wk, key, width: d, into: space.k + c * wk * d,
                                          value, width: dv, into: space.v + c * wk * dv)
        }
        let strides = { (width: Int, rows: Int) in SIMD4<Int>(rows * width, 0, width, 1) }
        // The modifiers at the slots' positions: batch item c of the kernels is cluster c.
        func gathered(first c: Int) -> ScoreModifierKernel? {
            modifiers?.gathered(item: b, head: h, .init(queries: qp + c * wq, keys: kp + c * wk,
                                                        queryStride: wq, keyStride: wk))
        }
        // A local function, not a closure value: a stored closure would box its captures.
        func mask(_ c: Int, _: Int) -> ClusterPrefixMask { ClusterPrefixMask(limits: UnsafePointer(space.limits + c * wq)) }
        // The per-cluster outputs and log-sum-exps (the forward kept only their mean).
        TiledSoftmaxAttention.run(
            shape: s.clusterShape, scale: scale, threads: threads,
            q: TensorView(base: space.q, strides: strides(d, wq)), k: TensorView(base: space.k, strides: strides(d, wk)),
            v: TensorView(base: space.v, strides: strides(dv, wk)),
            o: MutableTensorView(base: space.o, strides: strides(dv, wq)),
            lse: MutableTensorView(base: space.lse, strides: strides(1, wq)), modifiers: gathered(first: 0), mask: mask)
        // The memberships each query's mean is over (a visible key, and with a bias not
        // every one of them at −∞: a finite log-sum-exp), and dO times the mean's weight.
        space.used.update(repeating: 0, count: n)
        for slot in 0..<sq where space.limits[slot] > 0 && space.lse[slot] > -.infinity { space.used[Int(qp[slot])] += 1 }
        parallelForEach(items: clusters, threads: threads) { c, _ in
            for slot in (c * wq)..<((c + 1) * wq) {
                let row = space.outputGradient + slot * dv
                let used = space.limits[slot] > 0 && space.lse[slot] > -.infinity ? space.used[Int(qp[slot])] : 0
                let weight: Float = used > 0 ? 1 / Float(used) : 0
                for col in 0..<dv { row[col] *= weight }
            }
        }
        space.queryGradient.update(repeating: 0, count: sq * d)
        /// The flash backward of clusters `first ..< first + count` (batch items of the kernel).
        func backward(first c: Int, count: Int) {
            var shape = s.clusterShape
            shape.batch = count
            let (q, k) = (space.q + c * wq * d, space.k + c * wk * d)
            let (v, o) = (space.v + c * wk * dv, space.o + c * wq * dv)
            TiledSoftmaxBackward.run(
                shape: shape, scale: scale, threads: threads,
                q: TensorView(base: q, strides: strides(d, wq)), k: TensorView(base: k, strides: strides(d, wk)),
                v: TensorView(base: v, strides: strides(dv, wk)), o: TensorView(base: o, strides: strides(dv, wq)),
                lse: TensorView(base: space.lse + c * wq, strides: strides(1, wq)),
                dO: TensorView(base: space.outputGradient + c * wq * dv, strides: strides(dv, wq)),
                dQ: MutableTensorView(base: space.queryGradient + c * wq * d, strides: strides(d, wq)),
                dK: MutableTensorView(base: space.keyGradient + c * wk * d, strides: strides(d, wk)),
                dV: MutableTensorView(base: space.valueGradient + c * wk * dv, strides: strides(dv, wk)),
                modifiers: gathered(first: c), biasGradient: biasGradient) { item, _ in mask(c + item, 0) }
        }
        if biasGradient != nil {
            // A pair can recur in several clusters at different slots: the clusters one after
            // another (within one, every pair is distinct), so each ∂bias element's terms
            // add in cluster order for any thread count.
            for c in 0..<clusters { backward(first: c, count: 1) }
        } else {
            backward(first: 0, count: clusters)
        }
        // Scatter: each thread owns a range of destination rows and walks every slot in order.
        let nk = s.router.keyLength, parts = max(1, threads)
        parallelForEach(items: parts, threads: threads) { part, _ in
            let queryRows = (part * n / parts)..<((part + 1) * n / parts)
            for slot in 0..<sq where space.limits[slot] > 0 && queryRows.contains(Int(qp[slot])) {
                PermutedBlockAttention.add(space.queryGradient + slot * d, to: dQ.row(b, h, Int(qp[slot])),
                                           stride: dQ.strides[3], count: d)
            }
            let keyRows = (part * nk / parts)..<((part + 1) * nk / parts)
            for slot in 0..<sk where keyRows.contains(Int(kp[slot])) && Int(kp[slot]) < keyLength {
                let j = Int(kp[slot])
                PermutedBlockAttention.add(space.keyGradient + slot * d, to: dK.row(b, hk, j), stride: dK.strides[3],
                                           count: d)
                PermutedBlockAttention.add(space.valueGradient + slot * dv, to: dV.row(b, hk, j),
                                           stride: dV.strides[3], count: dv)
            }
        }
    }
}

/// The mask of one routing cluster's gathered slots: query slot `ii` sees key slots
/// `0 ..< limits[ii]`, the limits non-decreasing in `ii` (the cluster's key positions
/// ascending, so key padding and the causal rule on original positions cut each query's
/// keys to a prefix, longer for later queries). `limits` is readable 16 entries past the
/// cluster's queries. Query tiles are contiguous; key tiles and blocks contiguous.
struct ClusterPrefixMask: TransposedTileMask {
    let limits: UnsafePointer<Int32>

    @inline(__always)
    func limit(_ ii: Int) -> Int { Int(limits[ii]) }

    func forEachKeyTile(queries: PositionRun, tileSize: Int, _ body: (KeyTile) -> Void) {
        let all = limit(queries.start)
        forEachTile(from: 0, through: limit(queries.last) - 1, tileSize: tileSize) { keys in
            body(KeyTile(keys: keys, fullyVisible: keys.last < all))
        }
    }

    func visibleKeyIndices(tile: KeyTile, queries: PositionRun, lanes: Range<Int>) -> Range<Int> {
        guard let p = lanePositions(queries, lanes) else { return 0..<0 }
        return runIndices(tile.keys, from: 0, through: limit(p.last) - 1)
    }

    func maskScores(_ scores: UnsafeMutablePointer<Float>, ld: Int, tile: KeyTile, queries: PositionRun) {
        // Keys below the first query's limit are seen by the whole tile: only the rows after them.
        let seenByAll = runIndices(tile.keys, from: 0, through: limit(queries.start) - 1)
        let minusInfinity = Vec16(repeating: -.infinity)
        for jj in seenByAll.upperBound..<tile.keys.count {
            let key = SIMD16<Int32>(repeating: Int32(truncatingIfNeeded: tile.keys.position(jj)))
            let row = scores + jj * ld
            var ii = 0
            while ii < queries.count {
                let limits = UnsafeRawPointer(self.limits + queries.position(ii)).loadUnaligned(as: SIMD16<Int32>.self)
                var v = load16(row + ii)
                v.replace(with: minusInfinity, where: limits .<= key)
                store16(v, row + ii)
                ii += 16
            }
        }
    }

    func forEachQueryTile(seeing keys: PositionRun, queryLength: Int, queryTile: Int,
                          _ body: (_ index: Int, _ queries: PositionRun, _ tile: KeyTile) -> Void) {
        precondition(keys.step == 1, "key-major listing takes contiguous keys")
        for t in 0..<ceilDiv(queryLength, queryTile) {
            let queries = PositionRun(start: t * queryTile, count: min(queryTile, queryLength - t * queryTile))
            let end = min(keys.start + keys.count, limit(queries.last))
            guard end > keys.start else { continue }
            body(t, queries, KeyTile(keys: PositionRun(start: keys.start, count: end - keys.start),
                                     fullyVisible: limit(queries.start) >= end))
        }
    }

    /// The queries that see the first of `keys`: a suffix of the tile (limits non-decreasing).
    func visibleQueryIndices(tile: KeyTile, queries: PositionRun, keys: Range<Int>) -> Range<Int> {
        guard !keys.isEmpty else { return 0..<0 }
        let first = tile.keys.position(keys.lowerBound)
        var lo = 0, hi = queries.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if limit(queries.position(mid)) > first { hi = mid } else { lo = mid + 1 }
        }
        return lo..<queries.count
    }
}
