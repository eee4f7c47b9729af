/// The flash-style backward pass of ``TiledSoftmaxAttention``: `dQ`, `dK`, `dV` from the
/// forward's inputs, its output `O`, its log-sum-exp and the output gradient `dO`, with the
/// probabilities recomputed tile by tile from the log-sum-exp (no `Nq × Nk` buffer).
///
/// For a query `i` and a visible key `j` (`s_ij = scale · q_i · k_j`):
///
///     P_ij  = exp(s_ij − lse_i)                    (0 for rows with lse = −∞ and hidden pairs)
///     D_i   = Σ_c dO_ic · O_ic                     (= Σ_j P_ij dP_ij)
///     dP_ij = dO_i · v_j
///     dS_ij = P_ij · (dP_ij − D_i)
///     dV_j  = Σ_i P_ij dO_i,   dK_j = scale · Σ_i dS_ij q_i,   dQ_i = scale · Σ_j dS_ij k_j
///
/// Two passes, each a set of independent work items whose sums run in a fixed order, so the
/// results are bitwise identical for every thread count without atomics:
///
///     pass 1, item = (b, key/value head hk, block of 2·Bc keys):        dK, dV of the block
///         acc_K ← 0, acc_V ← 0
///         for each query head h of hk's group, in order:
///             for each query tile that may see the block (the mask's transposed listing), in order:
///                 Qᵀ ← scale · Q[tile]ᵀ, dOᵀ ← dO[tile]ᵀ, shift ← lse (−∞ → +∞), D ← rowsum(dO ∘ O)
///                 Sᵀ ← K Qᵀ, dPᵀ ← V dOᵀ             micro-kernel, key and value rows read in place
///                 mask the partial tile's scores
///                 Pᵀ ← exp(Sᵀ − shift), dSᵀ ← Pᵀ ∘ (dPᵀ − D)      lane-wise (queries in lanes)
///                 acc_V += Pᵀ dO, acc_K += dSᵀ Q   micro-kernel, depth = the tile's queries
///         dK ← scale · acc_K, dV ← acc_V
///     pass 2, item = (b, h, query tile): the forward's work items, key tiles as the mask lists them
///         Qᵀ, dOᵀ, shift, D as above; acc_Q ← 0
///         for each key tile: Sᵀ, dPᵀ, mask, Pᵀ, dSᵀ as above; acc_Q += dS K   (depth = the tile's keys)
///         dQ ← scale · acc_Q
///
/// Pass 2 recomputes `Sᵀ` and `dPᵀ` (the price of determinism without a `dQ` reduction
/// buffer): `(8·D + 6·Dv)` FLOPs per visible pair against the forward's `2·(D + Dv)`.
///
/// Scores stay transposed as in the forward (keys as rows, queries in SIMD lanes), so the
/// masks' ``TileMask/maskScores(_:ld:tile:queries:)`` applies unchanged and the row
/// statistics (`lse`, `D`) are lane vectors. Masks that add score terms or weight
/// probabilities (Transformer-XL, adaptive span) need their own derivatives and are not
/// accepted here.
///
/// Tiles: `Br = 64` queries (lanes), `Bc = 64` keys in pass 2 and blocks of `2·Bc = 128`
/// keys in pass 1. Workspace per worker (floats; `Br′` = the query tile rounded up to 32,
/// `R` = the pass's key rows rounded up to 8, `D′`, `Dv′` rounded up to 32):
/// `(D + Dv)·Br′ + 2·R·Br′ + 2·Br′ + 8·32`, plus `Br′·(D′ + Dv′) + R·(D′ + Dv′)` in pass 1
/// or `Br′·D′ + R·D′` in pass 2 (each buffer rounded up to 64 bytes): independent of the
/// sequence lengths. The two passes' arenas are allocated one after the other.
enum TiledSoftmaxBackward {
    /// Query rows per tile in both passes: the forward's key tile, not tuned separately.
    static var queryTileSize: Int { Tuning.current.attentionKeyTile }
    /// Keys per tile in pass 2: the forward's key tile.
    static var keyTileSize: Int { Tuning.current.attentionKeyTile }
    /// Keys per work item of pass 1: two key tiles, so that each query tile's preparation
    /// (packing `Qᵀ`, `dOᵀ`, the row dots) serves 128 keys. Not tuned.
    static var keyBlockSize: Int { 2 * Tuning.current.attentionKeyTile }

    /// Which pass a workspace serves.
    enum Pass { case keysValues, queries }

    /// Lanes of a query tile (a multiple of ``MicroTile/nr``) and rows (multiples of
    /// ``MicroTile/mr``) of a pass's key tiles for `shape`.
    static func tileExtents(_ shape: AttentionShape, _ pass: Pass) -> (lanes: Int, keyRows: Int) {
        (roundUp(min(queryTileSize, shape.queryLength), MicroTile.nr),
         roundUp(min(pass == .keysValues ? keyBlockSize : keyTileSize, shape.keyLength), MicroTile.mr))
    }

    /// Work items of each pass: pass 1 one per (batch, key/value head, key block), pass 2
    /// one per (batch, head, query tile) of contiguous tiles.
    static func itemCounts(_ shape: AttentionShape) -> (keysValues: Int, queries: Int) {
        (shape.batch * shape.kvHeads * ceilDiv(shape.keyLength, keyBlockSize),
         shape.batch * shape.heads * ceilDiv(shape.queryLength, queryTileSize))
    }

    /// Bytes of workspace ``run(shape:scale:threads:q:k:v:o:lse:dO:dQ:dK:dV:mask:)`` allocates
    /// with `threads` workers (`nil`: every active processor): the larger of the two passes'
    /// arenas (they are allocated one after the other).
    static func workspaceBytes(shape: AttentionShape, threads: Int?) -> Int {
        let items = itemCounts(shape)
        func bytes(_ pass: Pass) -> Int {
            let (lanes, keyRows) = tileExtents(shape, pass)
            return Workspace.byteCount(pass: pass, d: shape.headDim, dv: shape.valueDim, lanes: lanes, keyRows: keyRows)
        }
        return max(bytes(.keysValues) * workerCount(threads: threads, items: items.keysValues),
                   bytes(.queries) * workerCount(threads: threads, items: items.queries))
    }

    /// Allocates `dQ [B, H, Nq, D]`, `dK [B, Hkv, Nk, D]`, `dV [B, Hkv, Nk, Dv]` and fills them
    /// with one ``run(shape:scale:threads:q:k:v:o:lse:dO:dQ:dK:dV:mask:)``. Everything must
    /// already be validated.
    static func gradients<Mask: TransposedTileMask>(
        shape: AttentionShape, scale: Float, threads: Int?,
        query: Tensor, key: Tensor, value: Tensor, output: Tensor, logSumExp: Tensor, outputGradient: Tensor,
        mask: (_ batch: Int, _ head: Int) -> Mask
    ) throws -> (dQuery: Tensor, dKey: Tensor, dValue: Tensor) {
        var dq = try Tensor(shape: [shape.batch, shape.heads, shape.queryLength, shape.headDim])
        var dk = try Tensor(shape: [shape.batch, shape.kvHeads, shape.keyLength, shape.headDim])
        var dv = try Tensor(shape: [shape.batch, shape.kvHeads, shape.keyLength, shape.valueDim])
        query.withView { q in key.withView { k in value.withView { v in
        output.withView { o in logSumExp.withView { l in outputGradient.withView { g in
        dq.withMutableView { dQ in dk.withMutableView { dK in dv.withMutableView { dV in
            run(shape: shape, scale: scale, threads: threads ?? defaultThreadCount,
                q: q, k: k, v: v, o: o, lse: l, dO: g, dQ: dQ, dK: dK, dV: dV, mask: mask)
        } } } } } } } } }
        return (dq, dk, dv)
    }

    /// Computes `dQ`, `dK`, `dV` for every row of `shape` (see the type's description).
    ///
    /// `mask(b, h)` is the forward's visibility of batch item `b`, query head `h`; query head
    /// `h` reads key/value head `h / (H / Hkv)`. Every row of `dK` and `dV` is written (0 for
    /// keys no query sees); every row of `dQ` in a query tile of the mask's partition is
    /// written (0 for queries with no visible key or `lse = −∞`).
    static func run<Mask: TransposedTileMask>(
        shape: AttentionShape, scale: Float, threads: Int,
        q: TensorView, k: TensorView, v: TensorView, o: TensorView, lse: TensorView, dO: TensorView,
        dQ: MutableTensorView, dK: MutableTensorView, dV: MutableTensorView,
        mask: (_ batch: Int, _ head: Int) -> Mask
    ) {
        precondition(!Mask.addsScoreTerms && !Mask.weightsProbabilities,
                     "the tiled backward pass takes masks without score or weight hooks")
        let d = shape.headDim, dv = shape.valueDim
        let br = queryTileSize, bc = keyTileSize, blockSize = keyBlockSize
        let operands = Operands(q: q, k: k, v: v, o: o, lse: lse, dO: dO, d: d, dv: dv, scale: scale)

        // Pass 1: dK and dV, one item per (b, hk, key block), key blocks in order (the first
        // ones are the heaviest under causal masks).
        let blocks = ceilDiv(shape.keyLength, blockSize)
        let (lanes, blockRows) = tileExtents(shape, .keysValues)
        let kvHeads = shape.batch * shape.kvHeads
        let kvItems = kvHeads * blocks
        WorkspaceArena.withWorkspaces(workers: workerCount(threads: threads, items: kvItems), zeroed: true, layout: {
            Workspace(carving: &$0, pass: .keysValues, d: d, dv: dv, lanes: lanes, keyRows: blockRows)
        }) { spaces in
            parallelForEach(items: kvItems, threads: spaces.count) { item, worker in
                let head = item % kvHeads
                let b = head / shape.kvHeads, hk = head % shape.kvHeads
                let start = (item / kvHeads) * blockSize
                let block = PositionRun(start: start, count: min(blockSize, shape.keyLength - start))
                keyValueItem(shape: shape, space: spaces[worker], operands: operands, b: b, hk: hk, block: block,
                              queryTile: br, dK: dK, dV: dV, mask: mask)
            }
        }

        // Pass 2: dQ, the forward's work items (heaviest query tiles first).
        let heads = shape.batch * shape.heads
        var tiles = 0
        for b in 0..<shape.batch {
            for h in 0..<shape.heads {
                tiles = max(tiles, mask(b, h).queryTileCount(queryLength: shape.queryLength, tileSize: br))
            }
        }
        let qItems = tiles * heads
        guard qItems > 0 else { return }
        let keyRows = tileExtents(shape, .queries).keyRows
        WorkspaceArena.withWorkspaces(workers: workerCount(threads: threads, items: qItems), zeroed: true, layout: {
            Workspace(carving: &$0, pass: .queries, d: d, dv: dv, lanes: lanes, keyRows: keyRows)
        }) { spaces in
            parallelForEach(items: qItems, threads: spaces.count) { item, worker in
                let head = item % heads
                let b = head / shape.heads, h = head % shape.heads
                let headMask = mask(b, h)
                let queries = headMask.queryTile(tiles - 1 - item / heads, queryLength: shape.queryLength, tileSize: br)
                guard queries.count > 0 else { return }
                queryItem(shape: shape, space: spaces[worker], operands: operands, b: b, h: h, queries: queries,
                          keyTile: bc, dQ: dQ, mask: headMask)
            }
        }
    }

    /// The read-only tensors of one call.
    struct Operands {
        let q, k, v, o, lse, dO: TensorView
        let d, dv: Int
        let scale: Float
    }

    /// Pass 1's work item: `dK`, `dV` of the keys `block` of key/value head `hk`.
    static func keyValueItem<Mask: TransposedTileMask>(
        shape: AttentionShape, space: Workspace, operands x: Operands, b: Int, hk: Int, block: PositionRun,
        queryTile br: Int, dK: MutableTensorView, dV: MutableTensorView, mask: (Int, Int) -> Mask
    ) {
        let d = x.d, dv = x.dv, dPad = space.dPad, dvPad = space.dvPad
        space.accK.update(repeating: 0, count: space.keyRows * dPad)
        space.accV.update(repeating: 0, count: space.keyRows * dvPad)
        let queryRowsInPlace = x.q.strides[3] == 1 && dPad == d
        let gradientRowsInPlace = x.dO.strides[3] == 1 && dvPad == dv
        for h in (hk * shape.groupSize)..<((hk + 1) * shape.groupSize) {
            let headMask = mask(b, h)
            headMask.forEachQueryTile(seeing: block, queryLength: shape.queryLength, queryTile: br) { queries, tile in
                let lanes = roundUp(queries.count, MicroTile.nr)
                prepareQueries(space, x, b: b, h: h, queries: queries, lanes: lanes)
                gradientTile(space, x, b: b, hk: hk, tile: tile, queries: queries, lanes: lanes, mask: headMask)
                // B operands: the tile's dO and Q rows, in place when they are whole micro-tile rows.
                let gradientRows: UnsafePointer<Float>, ldg: Int
                if gradientRowsInPlace {
                    gradientRows = x.dO.row(b, h, queries.start)
                    ldg = queries.step &* x.dO.strides[2]
                } else {
                    TiledSoftmaxAttention.packValues(x.dO, b: b, h: h, keys: queries, dv: dv, into: space.gradientRows, ld: dvPad)
                    gradientRows = UnsafePointer(space.gradientRows)
                    ldg = dvPad
                }
                let queryRows: UnsafePointer<Float>, ldq: Int
                if queryRowsInPlace {
                    queryRows = x.q.row(b, h, queries.start)
                    ldq = queries.step &* x.q.strides[2]
                } else {
                    TiledSoftmaxAttention.packValues(x.q, b: b, h: h, keys: queries, dv: d, into: space.queryRows, ld: dPad)
                    queryRows = UnsafePointer(space.queryRows)
                    ldq = dPad
                }
                // acc_V += Pᵀ dO, acc_K += dSᵀ Q: key rows of the tile, depth = its queries.
                let row = tile.keys.start - block.start
                accumulateProduct(rows: tile.keys.count, width: dvPad, depth: queries.count,
                                  a: UnsafePointer(space.probabilities), rowStride: space.lanes, depthStride: 1,
                                  b: gradientRows, ldb: ldg, c: space.accV + row * dvPad, ldc: dvPad, edge: space.edge)
                accumulateProduct(rows: tile.keys.count, width: dPad, depth: queries.count,
                                  a: UnsafePointer(space.scoreGradients), rowStride: space.lanes, depthStride: 1,
                                  b: queryRows, ldb: ldq, c: space.accK + row * dPad, ldc: dPad, edge: space.edge)
            }
        }
        let ks = dK.strides[3], vs = dV.strides[3], scale = x.scale
        for r in 0..<block.count {
            let keyOut = dK.row(b, hk, block.position(r)), valueOut = dV.row(b, hk, block.position(r))
            let keyAcc = space.accK + r * dPad, valueAcc = space.accV + r * dvPad
            for c in 0..<d { keyOut[c &* ks] = scale * keyAcc[c] }
            for c in 0..<dv { valueOut[c &* vs] = valueAcc[c] }
        }
    }

    /// Pass 2's work item: `dQ` of the query tile `queries` of head `h`.
    static func queryItem<Mask: TileMask>(
        shape: AttentionShape, space: Workspace, operands x: Operands, b: Int, h: Int, queries: PositionRun,
        keyTile bc: Int, dQ: MutableTensorView, mask: Mask
    ) {
        let d = x.d, dPad = space.dPad
        let hk = h / shape.groupSize
        let lanes = roundUp(queries.count, MicroTile.nr)
        let keyRowsInPlace = x.k.strides[3] == 1 && dPad == d
        space.accQ.update(repeating: 0, count: space.lanes * dPad)
        prepareQueries(space, x, b: b, h: h, queries: queries, lanes: lanes)
        mask.forEachKeyTile(queries: queries, tileSize: bc) { tile in
            let keys = tile.keys
            gradientTile(space, x, b: b, hk: hk, tile: tile, queries: queries, lanes: lanes, mask: mask)
            let keyRows: UnsafePointer<Float>, ldk: Int
            if keyRowsInPlace {
                keyRows = x.k.row(b, hk, keys.start)
                ldk = keys.step &* x.k.strides[2]
            } else {
                TiledSoftmaxAttention.packValues(x.k, b: b, h: hk, keys: keys, dv: d, into: space.keyRowsPacked, ld: dPad)
                keyRows = UnsafePointer(space.keyRowsPacked)
                ldk = dPad
            }
            // acc_Q += dS K: query rows (dSᵀ read across its columns), depth = the tile's keys.
            // Rows past the tile's queries are padding rows of acc_Q, never written out.
            accumulateProduct(rows: roundUp(queries.count, MicroTile.mr), width: dPad, depth: keys.count,
                              a: UnsafePointer(space.scoreGradients), rowStride: 1, depthStride: space.lanes,
                              b: keyRows, ldb: ldk, c: space.accQ, ldc: dPad, edge: space.edge)
        }
        let qs = dQ.strides[3], scale = x.scale
        for ii in 0..<queries.count {
            let out = dQ.row(b, h, queries.position(ii)), acc = space.accQ + ii * dPad
            for c in 0..<d { out[c &* qs] = scale * acc[c] }
        }
    }

    /// Packs the query tile's `scale · Qᵀ` and `dOᵀ` (queries in lanes, zero lanes past the
    /// tile), and per lane the probability shift (`lse`, with `−∞` turned into `+∞` so that
    /// every probability of an empty row is `exp(−∞) = 0`; `+∞` on padding lanes) and
    /// `D = Σ_c dO_c · O_c` (0 on padding lanes).
    @inline(__always)
    static func prepareQueries(_ space: Workspace, _ x: Operands, b: Int, h: Int, queries: PositionRun, lanes: Int) {
        let ld = space.lanes
        TiledSoftmaxAttention.packQueries(x.q, b: b, h: h, queries: queries, d: x.d, scale: x.scale,
                                          into: space.qT, ld: ld, lanes: lanes)
        TiledSoftmaxAttention.packQueries(x.dO, b: b, h: h, queries: queries, d: x.dv, scale: 1,
                                          into: space.gradientT, ld: ld, lanes: lanes)
        let gs = x.dO.strides[3], os = x.o.strides[3]
        for ii in 0..<queries.count {
            let i = queries.position(ii)
            let l = x.lse.row(b, h, i)[0]
            space.shift[ii] = l == -.infinity ? .infinity : l
            space.rowDot[ii] = dot(x.dO.row(b, h, i), gs, x.o.row(b, h, i), os, count: x.dv)
        }
        for ii in queries.count..<lanes {
            space.shift[ii] = .infinity
            space.rowDot[ii] = 0
        }
    }

    /// One (query tile, key tile) pair: `Pᵀ` into `probabilities` and `dSᵀ` into
    /// `scoreGradients` (`[jj · lanes + ii]`: key `tile.keys.position(jj)`, query lane `ii`).
    @inline(__always)
    static func gradientTile<Mask: TileMask>(_ space: Workspace, _ x: Operands, b: Int, hk: Int, tile: KeyTile,
                                             queries: PositionRun, lanes: Int, mask: Mask) {
        let keys = tile.keys, ld = space.lanes, mr = MicroTile.mr
        let keyStride = keys.step &* x.k.strides[2], valueStride = keys.step &* x.v.strides[2]
        for block in 0..<ceilDiv(keys.count, mr) {
            let rows = min(mr, keys.count - block * mr)
            let first = keys.position(block * mr)
            let keyRows = BroadcastOperand(base: x.k.row(b, hk, first), rowStride: keyStride,
                                           depthStride: x.k.strides[3], rows: rows)
            let valueRows = BroadcastOperand(base: x.v.row(b, hk, first), rowStride: valueStride,
                                             depthStride: x.v.strides[3], rows: rows)
            for panel in stride(from: 0, to: lanes, by: MicroTile.nr) {
                // Sᵀ = K (scale · Qᵀ), dPᵀ = V dOᵀ.
                microKernel(depth: x.d, a: keyRows, b: space.qT + panel, ldb: ld,
                            c: space.probabilities + block * mr * ld + panel, ldc: ld, update: .overwrite)
                microKernel(depth: x.dv, a: valueRows, b: space.gradientT + panel, ldb: ld,
                            c: space.scoreGradients + block * mr * ld + panel, ldc: ld, update: .overwrite)
            }
        }
        if !tile.fullyVisible {
            mask.maskScores(space.probabilities, ld: ld, tile: tile, queries: queries)
        }
        softmaxGradient(space, keyCount: keys.count, lanes: lanes)
    }

    /// `Pᵀ ← exp(Sᵀ − shift)` and `dSᵀ ← Pᵀ ∘ (dPᵀ − D)`, lane-wise. Not inlined, as the
    /// forward's `onlineSoftmax`: `VectorMath.exp` stays in registers.
    @inline(never)
    static func softmaxGradient(_ space: Workspace, keyCount: Int, lanes: Int) {
        let ld = space.lanes
        for lane in stride(from: 0, to: lanes, by: 16) {
            let shift = load16(space.shift + lane), dot = load16(space.rowDot + lane)
            var scores = space.probabilities + lane, gradients = space.scoreGradients + lane
            for _ in 0..<keyCount {
                let p = VectorMath.exp16(load16(scores) - shift)
                store16(p, scores)
                store16(p * (load16(gradients) - dot), gradients)
                scores += ld
                gradients += ld
            }
        }
    }

    /// `C[r, 0..<width] += Σ_{k < depth} A[r, k] · B[k, 0..<width]` for `r < rows`, with
    /// `A[r, k] = a[r · rowStride + k · depthStride]`, `B` rows `ldb` apart and `width` a
    /// multiple of ``MicroTile/nr``. Whole blocks of ``MicroTile/mr`` rows go straight into
    /// `C`; a last partial block goes through `edge` so that the rows of `C` past `rows` are
    /// never touched. Each element is `C + (the depth sum)`, the same arithmetic either way.
    @inline(__always)
    static func accumulateProduct(rows: Int, width: Int, depth: Int,
                                  a: UnsafePointer<Float>, rowStride: Int, depthStride: Int,
                                  b: UnsafePointer<Float>, ldb: Int,
                                  c: UnsafeMutablePointer<Float>, ldc: Int, edge: UnsafeMutablePointer<Float>) {
        let mr = MicroTile.mr, nr = MicroTile.nr
        guard depth > 0 else { return }
        for block in stride(from: 0, to: rows, by: mr) {
            let count = min(mr, rows - block)
            let operand = BroadcastOperand(base: a + block * rowStride, rowStride: rowStride,
                                           depthStride: depthStride, rows: count)
            for panel in stride(from: 0, to: width, by: nr) {
                let target = c + block * ldc + panel
                if count == mr {
                    microKernel(depth: depth, a: operand, b: b + panel, ldb: ldb, c: target, ldc: ldc,
                                update: .accumulate)
                } else {
                    microKernel(depth: depth, a: operand, b: b + panel, ldb: ldb, c: edge, ldc: nr,
                                update: .overwrite)
                    for r in 0..<count {
                        let source = edge + r * nr, row = target + r * ldc
                        for col in 0..<nr { row[col] += source[col] }
                    }
                }
            }
        }
    }

    /// One worker's scratch memory, carved from a zero-filled arena once per pass.
    struct Workspace {
        /// Lanes of a query tile (the leading dimension of the transposed tiles) and rows of
        /// a key tile.
        let lanes: Int, keyRows: Int
        let dPad: Int, dvPad: Int
        /// `scale · Qᵀ` (`D × lanes`) and `dOᵀ` (`Dv × lanes`).
        let qT, gradientT: UnsafeMutablePointer<Float>
        /// Packed query and `dO` rows (pass 1's `B` operands when not read in place).
        let queryRows, gradientRows: UnsafeMutablePointer<Float>
        /// `Sᵀ` then `Pᵀ`, and `dPᵀ` then `dSᵀ` (`keyRows × lanes` each).
        let probabilities, scoreGradients: UnsafeMutablePointer<Float>
        /// Per lane: the probability shift and `D = rowsum(dO ∘ O)`.
        let shift, rowDot: UnsafeMutablePointer<Float>
        /// The edge tile of ``accumulateProduct(rows:width:depth:a:rowStride:depthStride:b:ldb:c:ldc:edge:)``.
        let edge: UnsafeMutablePointer<Float>
        /// Pass 1: the block's `dK` and `dV` accumulators (`keyRows × D′`, `keyRows × Dv′`).
        let accK, accV: UnsafeMutablePointer<Float>
        /// Pass 2: the tile's `dQ` accumulator (`lanes × D′`) and packed key rows (`keyRows × D′`).
        let accQ, keyRowsPacked: UnsafeMutablePointer<Float>

        init(carving carver: inout WorkspaceCarver, pass: Pass, d: Int, dv: Int, lanes: Int, keyRows: Int) {
            self.lanes = lanes
            self.keyRows = keyRows
            dPad = roundUp(d, MicroTile.nr)
            dvPad = roundUp(dv, MicroTile.nr)
            qT = carver.take(d * lanes)
            gradientT = carver.take(dv * lanes)
            queryRows = carver.take(pass == .keysValues ? lanes * dPad : 0)
            gradientRows = carver.take(pass == .keysValues ? lanes * dvPad : 0)
            probabilities = carver.take(keyRows * lanes)
            scoreGradients = carver.take(keyRows * lanes)
            shift = carver.take(lanes)
            rowDot = carver.take(lanes)
            edge = carver.take(MicroTile.mr * MicroTile.nr)
            accK = carver.take(pass == .keysValues ? keyRows * dPad : 0)
            accV = carver.take(pass == .keysValues ? keyRows * dvPad : 0)
            accQ = carver.take(pass == .queries ? lanes * dPad : 0)
            keyRowsPacked = carver.take(pass == .queries ? keyRows * dPad : 0)
        }

        static func byteCount(pass: Pass, d: Int, dv: Int, lanes: Int, keyRows: Int) -> Int {
            WorkspaceCarver.bytes {
                _ = Workspace(carving: &$0, pass: pass, d: d, dv: dv, lanes: lanes, keyRows: keyRows)
            }
        }
    }
}

/// A ``TileMask`` that also lists its tiles key-major, for the backward pass's `dK`/`dV`
/// work items.
protocol TransposedTileMask: TileMask {
    /// Calls `body`, in a fixed order, for each query tile (at most `queryTile` queries)
    /// that may hold a query seeing one of `keys` (a contiguous run of step 1), with the key
    /// tile to score it against: a contiguous sub-run of `keys` holding every key of `keys`
    /// the tile's queries may see, flagged fully visible when every pair is (the mask's
    /// ``TileMask/maskScores(_:ld:tile:queries:)`` masks the others). Keys of `keys` outside the listed tiles are invisible
    /// to every query; the query tiles listed for one `keys` are disjoint.
    func forEachQueryTile(seeing keys: PositionRun, queryLength: Int, queryTile: Int,
                          _ body: (_ queries: PositionRun, _ tile: KeyTile) -> Void)
}

extension IntervalMask: TransposedTileMask {
    /// Query `i` sees key `j` iff `i + offset − left ≤ j ≤ i + offset + right` and `j < keyEnd`:
    /// the keys of `keys` below `keyEnd` are seen by queries
    /// `first − offset − right … last + offset + left`, listed in contiguous tiles of
    /// `queryTile` (the forward's partition).
    func forEachQueryTile(seeing keys: PositionRun, queryLength: Int, queryTile: Int,
                          _ body: (_ queries: PositionRun, _ tile: KeyTile) -> Void) {
        precondition(keys.step == 1, "key-major listing takes contiguous keys")
        let first = keys.start, last = min(keys.last, keyEnd - 1)
        guard first <= last else { return }
        let visible = PositionRun(start: first, count: last - first + 1)
        let lo = max(0, first - offset - right), hi = min(queryLength - 1, last - offset + left)
        guard lo <= hi else { return }
        for t in (lo / queryTile)...(hi / queryTile) {
            let start = t * queryTile
            let queries = PositionRun(start: start, count: min(queryTile, queryLength - start))
            let full = queries.last + offset - left <= first && last <= queries.start + offset + right
            body(queries, KeyTile(keys: visible, fullyVisible: full))
        }
    }
}
