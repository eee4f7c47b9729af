import CEfficientAttention

/// The decode kernel: a few query positions per head against a long key/value cache,
/// split along the keys into chunks whose partial results merge exactly.
///
/// Work items are (batch b, key/value head hk, tile of the group's query rows, chunk c of
/// `split` keys). The rows of a group are its `G = H / Hkv` query heads × `n` positions
/// (row `r` = head `hk · G + r / n`, position `r % n`); they all read the key/value head in
/// place, so the cache is streamed once for the whole group. Two paths, by rows per group:
///
/// - **Dot-product path** (`G · n < 8`, e.g. multi-head `H = Hkv` decoding): about one FLOP
///   per byte of cache, so the loop is written to stream the cache at memory speed:
///
///         for each key tile (~64 KiB of keys) of the chunk:
///             G · n < 4: touch the tile's value lines and the next tile's key lines
///             for each row r (of G · n):
///                 G · n ≥ 4: prefetch part r of the next tile's key and value lines
///                 (skip rows with no visible key in the tile)
///                 s_j = scale · q_r · k_j                  4 keys at a time, SIMD16 over D
///                 m' = max(m, max s), α = exp(m − m')
///                 p_j = exp(s_j − m'), l = α·l + Σ p_j     SIMD16 over keys
///                 o = α·o + Σ p_j v_j                     4 value rows per pass over o
///
/// - **Micro-kernel path** (`G · n ≥ 8`, multi-query and large groups): the rows are the
///   SIMD lanes of the shared flash-kernel pieces (``TiledSoftmaxAttention/Workspace``,
///   ``TiledSoftmaxAttention/onlineSoftmax(_:keyCount:lanes:)``, ``microKernel``):
///   `Sᵀ = K Qᵀ` with Float keys read in place, per-lane masking of the window/causal
///   limits, `O = diag(α) O + P V` — compute bound, like dense attention.
///
/// Float16 caches are widened in registers (`vcvtph2ps` from memory) on the dot path and
/// into the workspace tile on the micro-kernel path.
///
/// Each item writes `(o / l, lse = m + log l)` per row (0 and −∞ where `l = 0`); the chunks
/// of a row then merge in chunk order:
///
///     lse = M + log Σ_c exp(lse_c − M),   o = Σ_c exp(lse_c − lse) · o_c,   M = max_c lse_c
///
/// The chunking depends only on the cache length and `split`, never on the thread count,
/// so results are bitwise identical for every thread count. With a single chunk the merge
/// is the identity (`exp(0) = 1`, `log 1 = 0`): a cache shorter than `split` gives exactly
/// the unsplit result; longer caches differ from an unsplit computation only by rounding.
enum DecodeAttention {
    /// Keys per chunk (split-KV work item) unless the caller chooses: long enough that the
    /// merge is negligible, short enough that a head's long cache feeds many work items
    /// (the value: the tuning table, ``Tuning``).
    static let defaultSplit = Tuning.current.decodeSplit

    /// Query rows per group (`G · n`) from which the micro-kernel path is used: below it
    /// the 8 × 32 tile would be mostly padding and the dot-product path is faster.
    static let microKernelRows = 8

    /// Rows per group (`G · n`) from which the dot-product path requests the next key tile
    /// with prefetch instructions spread over the rows' work; fewer rows touch it with plain
    /// loads at each tile's start. Measured (KernelDocs/MultiQuery.md): with one row a
    /// tile's prefetches all issue in one burst before the row's work, and plain loads were
    /// 10–15% faster; with four, the spread prefetches 10–20% faster.
    static let spreadPrefetchRows = 4

    /// Query rows per work item on the micro-kernel path (the tiled kernel's query tile).
    static let rowTile = Tuning.current.decodeRowTile

    /// Keys per tile on the dot-product path: the tuning table's bytes of key rows (``Tuning``;
    /// as many of value rows), a multiple of 16 between 16 and 2048. The kernel reads a tile of keys,
    /// then the same tile of values: two streams taking turns, which the hardware
    /// prefetchers follow well only in long runs (KernelDocs/MultiQuery.md; the read
    /// bandwidth by turn length is in CHANGELOG.md). The tile stays
    /// in L2 for the other rows of a small group.
    static func keyTile(headDim d: Int, valueDim dv: Int, elementBytes: Int) -> Int {
        let tile = Tuning.current.decodeKeyTileBytes / (elementBytes * max(d, dv))
        return max(16, min(2048, tile / 16 * 16))
    }

    /// Chunks of `split` keys for a cache of `keyLength` positions (at least one).
    static func chunks(keyLength: Int, split: Int) -> Int {
        max(1, (keyLength + split - 1) / split)
    }

    /// How a problem is cut into work items.
    struct Plan {
        let rows: Int, grouped: Bool, rowTile: Int, rowTiles: Int, chunks: Int, items: Int

        init(_ shape: AttentionShape, split: Int) {
            rows = shape.groupSize * shape.queryLength
            grouped = rows >= DecodeAttention.microKernelRows
            rowTile = grouped ? min(rows, DecodeAttention.rowTile) : rows
            rowTiles = (rows + rowTile - 1) / rowTile
            chunks = DecodeAttention.chunks(keyLength: shape.keyLength, split: split)
            items = shape.batch * shape.kvHeads * rowTiles * chunks
        }
    }

    /// The workspace of a decode over cache rows of `elementBytes`-byte elements; `keyScratch`:
    /// the micro-kernel path copies key tiles (anything but contiguous Float rows, ``KVRows/needsKeyScratch``).
    static func workspaceBytes(shape: AttentionShape, split: Int, threads: Int?, elementBytes: Int, keyScratch: Bool) -> Int {
        let plan = Plan(shape, split: split)
        let perWorker: Int
        if plan.grouped {
            let tiling = TiledSoftmaxAttention.Tiling.forProblem(headDim: shape.headDim, valueDim: shape.valueDim)
            perWorker = GroupedWorkspace.byteCount(rows: plan.rowTile, d: shape.headDim, dv: shape.valueDim,
                                                   keyTile: tiling.keyTile, halfPrecision: keyScratch)
        } else {
            let tile = keyTile(headDim: shape.headDim, valueDim: shape.valueDim, elementBytes: elementBytes)
            perWorker = Workspace.byteCount(rows: plan.rows, d: shape.headDim, dv: shape.valueDim, tile: tile)
        }
        let partials = WorkspaceCarver.bytes {
            _ = $0.take(shape.batch * shape.kvHeads * plan.chunks * plan.rows * (shape.valueDim + 1), of: Float.self)
        }
        return perWorker * workerCount(threads: threads, items: plan.items) + partials
    }

    /// Computes `o` and `lse` for every `(b, h, query)` of `shape`, whose `keyLength` is
    /// the longest cache length. `mask(b)` gives batch item `b`'s visibility; its `keyEnd`
    /// is that item's cache length. `keyTileElementBytes`: the element size the dot-product
    /// path's key tile is sized for (default the rows' own: a cache's 16-bit or Int8 rows take
    /// longer tiles).
    static func run<R: KVRows>(
        shape: AttentionShape, scale: Float, threads: Int, split: Int,
        q: TensorView, keys: R, values: R,
        o: MutableTensorView, lse: MutableTensorView, modifiers: ScoreModifierKernel? = nil,
        keyTileElementBytes: Int? = nil, mask: (_ batch: Int) -> IntervalMask
    ) {
        let plan = Plan(shape, split: split)
        let g = shape.groupSize, n = shape.queryLength, rows = plan.rows, dv = shape.valueDim
        let chunkCount = plan.chunks
        let workers = workerCount(threads: threads, items: plan.items)
        let chunkFloats = rows * (dv + 1)
        let partialCount = shape.batch * shape.kvHeads * chunkCount * chunkFloats
        let tiling = TiledSoftmaxAttention.Tiling.forProblem(headDim: shape.headDim, valueDim: dv)
        let tile = keyTile(headDim: shape.headDim, valueDim: dv,
                           elementBytes: keyTileElementBytes ?? MemoryLayout<R.Element>.size)
        // The chunks' partial results (shared), then one workspace per worker.
        let sliceBytes = plan.grouped
            ? GroupedWorkspace.byteCount(rows: plan.rowTile, d: shape.headDim, dv: dv, keyTile: tiling.keyTile,
                                         halfPrecision: R.needsKeyScratch)
            : Workspace.byteCount(rows: rows, d: shape.headDim, dv: dv, tile: tile)
        WorkspaceArena.with(sharedBytes: WorkspaceCarver.bytes { _ = $0.take(partialCount, of: Float.self) },
                            sliceBytes: sliceBytes, slices: workers, zeroed: true) { arena in
        var sharedPart = arena.shared()
        let partials = sharedPart.take(partialCount, of: Float.self)

        // Masks and worker workspaces are made per item (a call and pointer arithmetic), not
        // gathered into arrays: a decode-shaped call allocates nothing.
        func forEachItem(_ body: (_ b: Int, _ hk: Int, _ rowStart: Int, _ rowCount: Int,
                                  _ keyStart: Int, _ keyEnd: Int, _ mask: IntervalMask,
                                  _ partial: UnsafeMutablePointer<Float>, _ worker: Int) -> Void) {
            let shared = UncheckedSendable(partials)
            parallelForEach(items: plan.items, threads: workers) { item, worker in
                let c = item % chunkCount, rest = item / chunkCount
                let tile = rest % plan.rowTiles, head = rest / plan.rowTiles
                let b = head / shape.kvHeads, hk = head % shape.kvHeads
                let rowStart = tile * plan.rowTile
                let itemMask = mask(b)
                body(b, hk, rowStart, min(plan.rowTile, rows - rowStart), c * split,
                     min((c + 1) * split, itemMask.keyEnd), itemMask,
                     shared.value + (head * chunkCount + c) * chunkFloats, worker)
            }
        }
        if plan.grouped {
            forEachItem { b, hk, rowStart, rowCount, keyStart, keyEnd, itemMask, partial, worker in
                var carver = arena.slice(worker)
                let space = GroupedWorkspace(carving: &carver, rows: plan.rowTile, d: shape.headDim, dv: dv,
                                             keyTile: tiling.keyTile, halfPrecision: R.needsKeyScratch)
                attendChunkGrouped(shape: shape, scale: scale, space: space, b: b, hk: hk,
                                   rowStart: rowStart, rowCount: rowCount, keyStart: keyStart, keyEnd: keyEnd,
                                   mask: itemMask, modifiers: modifiers, q: q, keys: keys, values: values,
                                   partial: partial, rows: rows)
            }
        } else {
            forEachItem { b, hk, _, _, keyStart, keyEnd, itemMask, partial, worker in
                var carver = arena.slice(worker)
                let space = Workspace(carving: &carver, rows: rows, d: shape.headDim, dv: dv, tile: tile)
                attendChunk(shape: shape, scale: scale, space: space, b: b, hk: hk,
                            keyStart: keyStart, keyEnd: keyEnd, mask: itemMask, modifiers: modifiers,
                            q: q, keys: keys, values: values, partial: partial)
            }
        }
        // Merge the chunks of every row in chunk order.
        for head in 0..<(shape.batch * shape.kvHeads) {
            let b = head / shape.kvHeads, hk = head % shape.kvHeads
            let first: UnsafePointer<Float> = UnsafePointer(partials + head * chunkCount * chunkFloats)
            for r in 0..<rows {
                let h = hk * g + r / n, i = r % n
                mergeChunks(count: chunkCount, dv: dv,
                            output: { (c: Int) -> UnsafePointer<Float> in first + (c * chunkFloats + r * dv) },
                            lse: { (c: Int) -> Float in first[c * chunkFloats + rows * dv + r] },
                            into: o.row(b, h, i), stride: o.strides[3], lse: lse.row(b, h, i))
            }
        }
        }
    }

    /// One work item on the micro-kernel path: query rows `rowStart ..< rowStart + rowCount`
    /// of the group (row `r` is head `hk · G + r / n`, position `r % n`) as the lanes of the
    /// shared flash-kernel pieces: `Sᵀ = K Qᵀ` and `O = diag(α) O + P V` by ``microKernel``,
    /// the online softmax of ``TiledSoftmaxAttention/onlineSoftmax(_:keyCount:lanes:)``.
    /// Float keys are read in place; Float16 key and value tiles are widened into the
    /// workspace first. Writes rows `rowStart...` of the chunk's partial result.
    static func attendChunkGrouped<R: KVRows>(
        shape: AttentionShape, scale: Float, space: GroupedWorkspace, b: Int, hk: Int,
        rowStart: Int, rowCount: Int, keyStart: Int, keyEnd: Int, mask: IntervalMask,
        modifiers: ScoreModifierKernel?, q: TensorView, keys: R, values: R,
        partial: UnsafeMutablePointer<Float>, rows: Int
    ) {
        let g = shape.groupSize, n = shape.queryLength, d = shape.headDim, dv = shape.valueDim
        let tiled = space.tiled, br = tiled.queryTile, dvPad = tiled.dvPad
        let mr = MicroTile.mr, nr = MicroTile.nr
        let lanes = roundUp(rowCount, nr)
        // Qᵀ (lanes = rows), the visible key range of each lane, and their envelope.
        var first = Int.max, last = Int.min, latestStart = Int.min, earliestEnd = Int.max
        for lane in 0..<br {
            guard lane < rowCount else {
                for c in 0..<d { tiled.qT[c * br + lane] = 0 }
                space.lo[lane] = .max
                space.hi[lane] = .min
                continue
            }
            let r = rowStart + lane, h = hk * g + r / n, i = r % n
            let source = q.row(b, h, i), sd = q.strides[3]
            for c in 0..<d { tiled.qT[c * br + lane] = scale * source[c * sd] }
            let lo = max(keyStart, i + mask.offset - mask.left), hi = min(keyEnd - 1, i + mask.offset + mask.right)
            space.lo[lane] = Int32(clamping: lo)
            space.hi[lane] = Int32(clamping: hi)
            latestStart = max(latestStart, lo)
            earliestEnd = min(earliestEnd, hi)
            if lo <= hi {
                first = min(first, lo)
                last = max(last, hi)
            }
        }
        for i in 0..<br {
            tiled.rowMax[i] = -.infinity
            tiled.rowSum[i] = 0
        }
        tiled.acc.update(repeating: 0, count: br * dvPad)

        var tileStart = first
        while tileStart <= last {
            let count = min(tiled.keyTile, last - tileStart + 1)
            // Keys: in place (contiguous Float rows) or widened, dequantised or gathered into
            // the workspace (the same values, so the same bits).
            let keyTile = keys.floatRows(b: b, h: hk, start: tileStart, count: count, width: d, scratch: space.keys)
            values.pack(b: b, h: hk, start: tileStart, count: count, width: dv, into: tiled.vPack, ld: dvPad)
            for block in 0..<((count + mr - 1) / mr) {
                let operand = BroadcastOperand(base: keyTile.base + block * mr * keyTile.rowStride,
                                               rowStride: keyTile.rowStride, depthStride: 1,
                                               rows: min(mr, count - block * mr))
                for panel in stride(from: 0, to: lanes, by: nr) {
                    microKernel(depth: d, a: operand, b: tiled.qT + panel, ldb: br,
                                c: tiled.scores + block * mr * br + panel, ldc: br, update: .overwrite)
                }
            }
            if let modifiers {
                modifiers.applyToGroupRows(tiled.scores, ld: br, keyStart: tileStart, keyCount: count,
                                           rowStart: rowStart, rowCount: rowCount, queryLength: n,
                                           firstHead: hk * g, b: b, offset: mask.offset)
            }
            if tileStart < latestStart || tileStart + count - 1 > earliestEnd {
                maskLanes(tiled.scores, ld: br, keyStart: tileStart, keyCount: count, lanes: lanes,
                          lo: space.lo, hi: space.hi)
            }
            TiledSoftmaxAttention.onlineSoftmax(tiled, keyCount: count, lanes: lanes)
            for panel in stride(from: 0, to: dvPad, by: nr) {
                for block in stride(from: 0, to: lanes, by: mr) {
                    microKernel(depth: count, a: BroadcastOperand(base: tiled.scores + block, rowStride: 1, depthStride: br),
                                b: tiled.vPack + panel, ldb: dvPad,
                                c: tiled.acc + block * dvPad + panel, ldc: dvPad,
                                update: .scaleAndAccumulate(tiled.alpha + block))
                }
            }
            tileStart += count
        }

        for lane in 0..<rowCount {
            writePartial(acc: tiled.acc + lane * dvPad, max: tiled.rowMax[lane], sum: tiled.rowSum[lane],
                         dv: dv, row: rowStart + lane, rows: rows, into: partial)
        }
    }

    /// Row `row` of a chunk's partial result: `o = acc / sum` (`Dv` floats at
    /// `partial + row · Dv`) and `lse = max + log sum` (at `partial[rows · Dv + row]`);
    /// 0 and −∞ when `sum` is 0 (no visible key in the chunk).
    @inline(__always)
    static func writePartial(acc: UnsafePointer<Float>, max: Float, sum: Float, dv: Int, row: Int, rows: Int,
                             into partial: UnsafeMutablePointer<Float>) {
        let out = partial + row * dv
        if sum > 0 {
            let inverse = 1 / sum
            for c in 0..<dv { out[c] = acc[c] * inverse }
            partial[rows * dv + row] = max + logf(sum)
        } else {
            out.update(repeating: 0, count: dv)
            partial[rows * dv + row] = -.infinity
        }
    }

    /// Sets to −∞ the scores of a transposed tile (`scores[jj · ld + lane]`, key
    /// `keyStart + jj`) outside each lane's visible range `lo[lane]...hi[lane]`.
    @inline(__always)
    static func maskLanes(_ scores: UnsafeMutablePointer<Float>, ld: Int, keyStart: Int, keyCount: Int, lanes: Int,
                          lo: UnsafePointer<Int32>, hi: UnsafePointer<Int32>) {
        let minusInfinity = Vec16(repeating: -.infinity)
        for lane in stride(from: 0, to: lanes, by: 16) {
            let low = UnsafeRawPointer(lo + lane).loadUnaligned(as: SIMD16<Int32>.self)
            let high = UnsafeRawPointer(hi + lane).loadUnaligned(as: SIMD16<Int32>.self)
            for jj in 0..<keyCount {
                let j = SIMD16<Int32>(repeating: Int32(clamping: keyStart + jj))
                var v = load16(scores + jj * ld + lane)
                v.replace(with: minusInfinity, where: (j .< low) .| (j .> high))
                store16(v, scores + jj * ld + lane)
            }
        }
    }

    /// The micro-kernel path's scratch: the tiled kernel's workspace, the lanes' key
    /// ranges, and (Float16 caches) a widened key tile.
    struct GroupedWorkspace {
        let tiled: TiledSoftmaxAttention.Workspace
        let lo, hi: UnsafeMutablePointer<Int32>
        let keys: UnsafeMutablePointer<Float>

        init(carving carver: inout WorkspaceCarver, rows: Int, d: Int, dv: Int, keyTile: Int, halfPrecision: Bool) {
            let br = roundUp(rows, MicroTile.nr)
            tiled = TiledSoftmaxAttention.Workspace(carving: &carver, d: d, dv: dv, queryTile: br, keyTile: keyTile)
            lo = carver.take(2 * br)
            hi = lo + br
            keys = carver.take(halfPrecision ? keyTile * d : 1)
        }

        static func byteCount(rows: Int, d: Int, dv: Int, keyTile: Int, halfPrecision: Bool) -> Int {
            WorkspaceCarver.bytes {
                _ = GroupedWorkspace(carving: &$0, rows: rows, d: d, dv: dv, keyTile: keyTile,
                                     halfPrecision: halfPrecision)
            }
        }
    }

    /// One work item: every query row of key/value head `hk` of batch item `b` against the
    /// keys `keyStart..<keyEnd`. Writes the partial rows (`rows · Dv` outputs, then `rows`
    /// log-sum-exps) to `partial`.
    static func attendChunk<R: KVRows>(
        shape: AttentionShape, scale: Float, space: Workspace, b: Int, hk: Int,
        keyStart: Int, keyEnd: Int, mask: IntervalMask, modifiers: ScoreModifierKernel?,
        q: TensorView, keys: R, values: R,
        partial: UnsafeMutablePointer<Float>
    ) {
        let g = shape.groupSize, n = shape.queryLength, rows = g * n
        let d = shape.headDim, dv = shape.valueDim, dPad = space.dPad, dvPad = space.dvPad
        var first = Int.max, last = Int.min
        for r in 0..<rows {
            let h = hk * g + r / n, i = r % n
            let source = q.row(b, h, i), sd = q.strides[3], packed = space.q + r * dPad
            for c in 0..<d { packed[c] = scale * source[c * sd] }
            let lo = max(keyStart, i + mask.offset - mask.left)
            let hi = min(keyEnd - 1, i + mask.offset + mask.right)
            space.lo[r] = lo
            space.hi[r] = hi
            if lo <= hi {
                first = min(first, lo)
                last = max(last, hi)
            }
            space.rowMax[r] = -.infinity
            space.rowSum[r] = 0
        }
        space.acc.update(repeating: 0, count: rows * dvPad)

        var tileStart = first
        var touched: UInt32 = 0
        // Keeping the memory busy while a tile computes (KernelDocs/MultiQuery.md): with
        // fewer than `spreadPrefetchRows` rows, plain loads of this tile's values and the
        // next tile's keys at the tile's start; with that many or more, prefetches of the next
        // tile's keys and values, spread over the rows' work on this tile.
        let spread = rows >= spreadPrefetchRows
        if first <= last && spread {
            // The first tile's keys and values, one load per 64-byte line (all in flight at once).
            let count = min(space.tile, last - first + 1)
            touched |= touchLines(keys, b: b, hk: hk, start: first, count: count, width: d)
            touched |= touchLines(values, b: b, hk: hk, start: first, count: count, width: dv)
        }
        while tileStart <= last {
            let count = min(space.tile, last - tileStart + 1), lanes = roundUp(count, 16)
            let next = tileStart + count, nextCount = next <= last ? min(space.tile, last - next + 1) : 0
            if !spread {
                touched |= touchLines(values, b: b, hk: hk, start: tileStart, count: count, width: dv)
                touched |= touchLines(keys, b: b, hk: hk, start: next, count: nextCount, width: d)
            }
            for r in 0..<rows {
                if spread {
                    // The r-th part of the next tile: requested now, arriving while row r works.
                    let lo = next + r * nextCount / rows, hi = next + (r + 1) * nextCount / rows
                    prefetchLines(keys, b: b, hk: hk, start: lo, count: hi - lo, width: d)
                    prefetchLines(values, b: b, hk: hk, start: lo, count: hi - lo, width: dv)
                }
                let a = max(space.lo[r], tileStart), e = min(space.hi[r], tileStart + count - 1)
                guard a <= e else { continue }
                let s = space.scores
                s.update(repeating: -.infinity, count: lanes)
                scores(q: space.q + r * dPad, d: d, keys: keys, b: b, hk: hk,
                       from: a, through: e, into: s - tileStart)
                modifiers?.applyToRow(s - tileStart, from: a, through: e, b: b, h: hk * g + r / n,
                                      i: r % n, offset: mask.offset)
                // Online softmax over the tile (vertical over 16 keys, one horizontal max).
                var tileMax = Vec16(repeating: -.infinity)
                for t in stride(from: 0, to: lanes, by: 16) { tileMax = maximum(tileMax, load16(s + t)) }
                let oldMax = space.rowMax[r]
                let newMax = max(oldMax, horizontalMax(tileMax))
                // Every score −∞ so far (a bias hides them): nothing to add yet.
                guard newMax > -.infinity else { continue }
                let alpha = expf(oldMax - newMax)
                var sum = Vec16()
                for t in stride(from: 0, to: lanes, by: 16) {
                    let p = VectorMath.exp16(load16(s + t) - Vec16(repeating: newMax))
                    store16(p, s + t)
                    sum += p
                }
                space.rowSum[r] = alpha * space.rowSum[r] + horizontalSum(sum)
                space.rowMax[r] = newMax
                let acc = space.acc + r * dvPad
                if alpha != 1 {
                    let factor = Vec16(repeating: alpha)
                    for c in stride(from: 0, to: dvPad, by: 16) { store16(load16(acc + c) * factor, acc + c) }
                }
                accumulate(probabilities: s - tileStart, values: values, b: b, hk: hk,
                           from: a, through: e, dv: dv, into: acc)
            }
            tileStart += count
        }

        space.touched[0] = touched
        for r in 0..<rows {
            writePartial(acc: space.acc + r * dvPad, max: space.rowMax[r], sum: space.rowSum[r],
                         dv: dv, row: r, rows: rows, into: partial)
        }
    }

    /// A prefetch instruction for each 64-byte line of rows `start ..< start + count`.
    @inline(__always)
    static func prefetchLines<R: KVRows>(_ rows: R, b: Int, hk: Int, start: Int, count: Int, width: Int) {
        forEachRun(rows, b: b, hk: hk, start: start, count: count, width: width) { base, bytes in
            for offset in stride(from: 0, to: bytes, by: 64) { ea_prefetch_read(base + offset) }
        }
    }

    /// One 4-byte load per 64-byte line of rows `start ..< start + count`, OR-ed together:
    /// independent loads the core issues at once, for lines needed right away.
    @inline(__always)
    static func touchLines<R: KVRows>(_ rows: R, b: Int, hk: Int, start: Int, count: Int, width: Int) -> UInt32 {
        var touched: UInt32 = 0
        forEachRun(rows, b: b, hk: hk, start: start, count: count, width: width) { touched |= touchLines($0, bytes: $1) }
        return touched
    }

    /// The byte runs of rows `start ..< start + count` (`width` elements each; a paged
    /// cache's rows run to a page's end), each from its first row's start (before an Int8
    /// row's scale) to its last row's last element: never past the rows (a caller's view
    /// whose rows are padded ends with a row of `width` elements, not of `rowStride`).
    @inline(__always)
    static func forEachRun<R: KVRows>(_ rows: R, b: Int, hk: Int, start: Int, count: Int, width: Int,
                                      _ body: (_ base: UnsafeRawPointer, _ bytes: Int) -> Void) {
        let scale = R.Element.quantized ? 4 : 0
        var j = start
        while j < start + count {
            let n = min(start + count - j, rows.run(b, hk, from: j))
            body(UnsafeRawPointer(rows.row(b, hk, j)) - scale,
                 scale + ((n - 1) * rows.rowStride + width) * MemoryLayout<R.Element>.stride)
            j += n
        }
    }

    /// One 4-byte load per 64-byte line of `bytes` bytes from `base`, OR-ed together.
    @inline(__always)
    static func touchLines(_ base: UnsafeRawPointer, bytes: Int) -> UInt32 {
        var a: UInt32 = 0, c: UInt32 = 0
        var offset = 0
        // Both 4-byte loads inside the rows: `offset + 64 + 4 ≤ bytes` (rows of Float16
        // need not be a multiple of 4 bytes long).
        while offset &+ 68 <= bytes {
            a |= base.loadUnaligned(fromByteOffset: offset, as: UInt32.self)
            c |= base.loadUnaligned(fromByteOffset: offset + 64, as: UInt32.self)
            offset += 128
        }
        return a | c
    }

    /// `s[j] = q · k_j` for `j` in `a...e` (`q` already scaled), four keys at a time.
    @inline(__always)
    static func scores<R: KVRows>(q: UnsafePointer<Float>, d: Int, keys: R, b: Int, hk: Int,
                                  from a: Int, through e: Int, into s: UnsafeMutablePointer<Float>) {
        typealias E = R.Element
        var j = a, rows = RowCursor(keys, b: b, h: hk, from: a)
        while j + 3 <= e {
            let k0 = rows.next(), k1 = rows.next(), k2 = rows.next(), k3 = rows.next()
            var a0 = Vec16(), a1 = Vec16(), a2 = Vec16(), a3 = Vec16()
            var c = 0
            while c + 16 <= d {
                let x = load16(q + c)
                multiplyAdd(&a0, x, E.wide16(k0 + c))
                multiplyAdd(&a1, x, E.wide16(k1 + c))
                multiplyAdd(&a2, x, E.wide16(k2 + c))
                multiplyAdd(&a3, x, E.wide16(k3 + c))
                c += 16
            }
            var s0 = horizontalSum(a0), s1 = horizontalSum(a1), s2 = horizontalSum(a2), s3 = horizontalSum(a3)
            while c < d {
                s0 += q[c] * E.widen(k0[c]); s1 += q[c] * E.widen(k1[c])
                s2 += q[c] * E.widen(k2[c]); s3 += q[c] * E.widen(k3[c])
                c += 1
            }
            if E.quantized {   // s_j · (q · k̃_j): the row's scale folded into its score
                s0 *= R.scale(ofRow: k0); s1 *= R.scale(ofRow: k1)
                s2 *= R.scale(ofRow: k2); s3 *= R.scale(ofRow: k3)
            }
            s[j] = s0; s[j + 1] = s1; s[j + 2] = s2; s[j + 3] = s3
            j += 4
        }
        while j <= e {
            let k0 = rows.next()
            var a0 = Vec16()
            var c = 0
            while c + 16 <= d {
                multiplyAdd(&a0, load16(q + c), E.wide16(k0 + c))
                c += 16
            }
            var s0 = horizontalSum(a0)
            while c < d { s0 += q[c] * E.widen(k0[c]); c += 1 }
            if E.quantized { s0 *= R.scale(ofRow: k0) }
            s[j] = s0
            j += 1
        }
    }

    /// `acc += Σ_j p[j] · v_j` for `j` in `a...e`, four value rows per pass over `acc`.
    @inline(__always)
    static func accumulate<R: KVRows>(probabilities p: UnsafePointer<Float>, values: R,
                                      b: Int, hk: Int, from a: Int, through e: Int, dv: Int,
                                      into acc: UnsafeMutablePointer<Float>) {
        typealias E = R.Element
        // The weight of row j at `row`: p_j, times the row's scale for Int8 (Σ p_j s_j ṽ_j).
        @inline(__always) func weight(_ j: Int, _ row: UnsafePointer<E>) -> Float {
            E.quantized ? p[j] * R.scale(ofRow: row) : p[j]
        }
        var j = a, rows = RowCursor(values, b: b, h: hk, from: a)
        while j + 3 <= e {
            let v0 = rows.next(), v1 = rows.next(), v2 = rows.next(), v3 = rows.next()
            let w0 = weight(j, v0), w1 = weight(j + 1, v1), w2 = weight(j + 2, v2), w3 = weight(j + 3, v3)
            let p0 = Vec16(repeating: w0), p1 = Vec16(repeating: w1)
            let p2 = Vec16(repeating: w2), p3 = Vec16(repeating: w3)
            var c = 0
            while c + 16 <= dv {
                var x = load16(acc + c)
                multiplyAdd(&x, p0, E.wide16(v0 + c))
                multiplyAdd(&x, p1, E.wide16(v1 + c))
                multiplyAdd(&x, p2, E.wide16(v2 + c))
                multiplyAdd(&x, p3, E.wide16(v3 + c))
                store16(x, acc + c)
                c += 16
            }
            while c < dv {
                acc[c] += w0 * E.widen(v0[c]) + w1 * E.widen(v1[c])
                    + w2 * E.widen(v2[c]) + w3 * E.widen(v3[c])
                c += 1
            }
            j += 4
        }
        while j <= e {
            let v0 = rows.next(), w0 = weight(j, v0), p0 = Vec16(repeating: w0)
            var c = 0
            while c + 16 <= dv {
                var x = load16(acc + c)
                multiplyAdd(&x, p0, E.wide16(v0 + c))
                store16(x, acc + c)
                c += 16
            }
            while c < dv { acc[c] += w0 * E.widen(v0[c]); c += 1 }
            j += 1
        }
    }

    /// Merges `count` partial rows over disjoint key sets exactly, in order:
    /// `lse = M + log Σ exp(lse_c − M)`, `o = Σ exp(lse_c − lse) · o_c` with `M = max lse_c`;
    /// 0 and −∞ when every part is empty (the weights: ``LogSumExpMerge``). One part is
    /// copied unchanged.
    @inline(__always)
    static func mergeChunks(count: Int, dv: Int,
                            output: (Int) -> UnsafePointer<Float>, lse partLSE: (Int) -> Float,
                            into out: UnsafeMutablePointer<Float>, stride: Int,
                            lse: UnsafeMutablePointer<Float>) {
        var m = -Float.infinity
        for c in 0..<count { m = max(m, partLSE(c)) }
        for x in 0..<dv { out[x * stride] = 0 }
        guard var chunks = LogSumExpMerge(maximum: m) else {
            lse[0] = -.infinity
            return
        }
        for c in 0..<count { chunks.add(chunks.weight(partLSE(c))) }
        let inverse = 1 / chunks.total
        for c in 0..<count {
            let w = partLSE(c)
            guard w > -.infinity else { continue }
            LogSumExpMerge.accumulate(chunks.weight(w) * inverse, output(c), into: out, stride: stride, count: dv)
        }
        lse[0] = chunks.logSumExp
    }

    /// One worker's scratch memory, carved from a zero-filled arena.
    struct Workspace {
        let rows: Int, tile: Int, dPad: Int, dvPad: Int
        let q, acc, rowMax, rowSum, scores: UnsafeMutablePointer<Float>
        let lo, hi: UnsafeMutablePointer<Int>
        let touched: UnsafeMutablePointer<UInt32>

        init(carving carver: inout WorkspaceCarver, rows: Int, d: Int, dv: Int, tile: Int) {
            self.rows = rows
            self.tile = tile
            dPad = roundUp(d, 16)
            dvPad = roundUp(dv, 16)
            q = carver.take(rows * dPad)
            acc = carver.take(rows * dvPad)
            scores = carver.take(tile + 16)
            rowMax = carver.take(rows * 16)
            rowSum = carver.take(rows * 16)
            lo = carver.take(2 * rows + 1)
            hi = lo + rows
            touched = carver.take(1)
        }

        static func byteCount(rows: Int, d: Int, dv: Int, tile: Int) -> Int {
            WorkspaceCarver.bytes { _ = Workspace(carving: &$0, rows: rows, d: d, dv: dv, tile: tile) }
        }
    }
}

/// The sum of the 16 lanes as a tree (8 + 8, 4 + 4, 2 + 2, 1 + 1): a few shuffles, where
/// the standard library's `sum()` adds the lanes one after another.
@inline(__always)
func horizontalSum(_ v: Vec16) -> Float {
    let a = v.lowHalf + v.highHalf
    let b = a.lowHalf + a.highHalf
    let c = b.lowHalf + b.highHalf
    return c[0] + c[1]
}

/// The largest of the 16 lanes as a tree of compare-and-blend steps (`max()` on a SIMD
/// vector is a scalar loop).
@inline(__always)
func horizontalMax(_ v: Vec16) -> Float {
    var a = v.lowHalf
    a.replace(with: v.highHalf, where: v.highHalf .> a)
    var b = a.lowHalf
    b.replace(with: a.highHalf, where: a.highHalf .> b)
    var c = b.lowHalf
    c.replace(with: b.highHalf, where: b.highHalf .> c)
    return max(c[0], c[1])
}

extension DecodeAttention {
    /// Whether a dense-rows call of `shape` (``DenseAttention``, ``MultiQueryAttention``)
    /// runs on the decode kernel: fewer query positions than the tiled kernel's SIMD lanes
    /// (`Nq < NR`: its query tiles would be mostly empty lanes, and every query head would
    /// stream its key/value head again). Decoding one position against keys and values the
    /// engine holds in its own buffers is this case. The choice depends on the shape only,
    /// never on the views' layout, so every layout gives the same bits.
    static func serves(_ shape: AttentionShape) -> Bool {
        shape.queryLength < MicroTile.nr
    }

    /// The workspace of a dense-rows call of `shape`: the tiled kernel's (`tiledBytes`), or
    /// for decode-shaped problems the decode kernel's: the `Float` key tiles every view call
    /// takes, with the key scratch 16-bit rows need.
    static func denseRowsWorkspaceBytes(_ shape: AttentionShape, threads: Int?, tiledBytes: Int) -> Int {
        guard serves(shape) else { return tiledBytes }
        return workspaceBytes(shape: shape, split: defaultSplit, threads: threads,
                              elementBytes: MemoryLayout<Float>.size, keyScratch: true)
    }

    /// A checked dense-rows call on the decode kernel (``serves(_:)``), keys and values read
    /// in place like cache rows, chunks of ``defaultSplit`` keys (a length independent of the
    /// thread count: the same bits for every thread count).
    ///
    /// Keys and values of one precision with adjacent elements are read in place (16-bit
    /// ones widened in registers); others (column stride other than 1, or key and value
    /// precisions that differ) are first widened into contiguous `Float` scratch: the same
    /// values in the same order, so the same bits (heap memory unless the workspace has
    /// room). 16-bit query and output rows (a few) are staged in `Float`.
    static func attend(_ call: ViewCall, mask: (_ batch: Int) -> IntervalMask) {
        let shape = call.shape
        if call.q.precision != .float32 {
            return withScratchTensor(SIMD4(shape.batch, shape.heads, shape.queryLength, shape.headDim)) { q in
                for b in 0..<shape.batch {
                    for h in 0..<shape.heads {
                        call.q.widenRows(b, h, rows: PositionRun(start: 0, count: shape.queryLength),
                                         width: shape.headDim, into: q.row(b, h, 0), ld: q.strides[2])
                    }
                }
                attend(call.with(q: q.readOnly), mask: mask)
            }
        }
        if call.o.precision != .float32 {
            return call.withFloatOutput { attend($0, mask: mask) }
        }
        func run<E: CacheScalar>(_: E.Type, _ k: TensorView, _ v: TensorView) {
            func rows(_ x: TensorView) -> CacheRows<E> {
                CacheRows<E>(base: UnsafeRawPointer(x.base).assumingMemoryBound(to: E.self),
                             batchStride: x.strides[0], headStride: x.strides[1], rowStride: x.strides[2])
            }
            // Key tiles as long as the Float call's (the tile is where the online softmax
            // rescales): 16-bit rows read in place give the Float call's bits.
            DecodeAttention.run(shape: shape, scale: call.scale, threads: call.threadCount, split: defaultSplit,
                                q: call.q, keys: rows(k), values: rows(v), o: call.o, lse: call.lse,
                                modifiers: call.modifiers, keyTileElementBytes: MemoryLayout<Float>.size, mask: mask)
        }
        let (k, v) = (call.k, call.v)
        if k.precision == v.precision && k.strides[3] == 1 && v.strides[3] == 1 {
            switch k.precision {
            case .float32: return run(Float.self, k, v)
            case .float16: return run(HalfElement.self, k, v)
            case .bfloat16: return run(BFloat16Bits.self, k, v)
            }
        }
        func contiguous(_ x: TensorView, width: Int, _ body: (TensorView) -> Void) {
            guard x.strides[3] != 1 || x.precision != .float32 else { return body(x) }
            withScratchTensor(SIMD4(shape.batch, shape.kvHeads, shape.keyLength, width)) { copy in
                for b in 0..<shape.batch {
                    for h in 0..<shape.kvHeads {
                        x.widenRows(b, h, rows: PositionRun(start: 0, count: shape.keyLength), width: width,
                                    into: copy.row(b, h, 0), ld: copy.strides[2])
                    }
                }
                body(copy.readOnly)
            }
        }
        contiguous(k, width: shape.headDim) { k in
            contiguous(v, width: shape.valueDim) { v in run(Float.self, k, v) }
        }
    }
}

extension ScoreModifierKernel {
    /// The modifiers on one query row's scores `s[a...e]` (indexed by key) of batch item
    /// `b`, head `h`, query `i` aligned to key position `i + offset` (the decode kernel's
    /// per-row path); entries outside `a...e` are left as they are.
    func applyToRow(_ s: UnsafeMutablePointer<Float>, from a: Int, through e: Int, b: Int, h: Int, i: Int,
                    offset: Int) {
        typealias V = SIMD16<Float>
        let item = firstItem + b, head = firstHead + h
        let slope = V(repeating: slopes?[head] ?? 0)
        var ramp = V()
        for l in 0..<16 { ramp[l] = Float(l) }
        let biasRow = bias.map { $0.row(item, head, i) }, biasStride = bias?.strides[3] ?? 0
        var j = a, check = BiasTermCheck()
        while j <= e {
            let count = min(16, e - j + 1)
            let original = load16(s + j)
            var terms = V()
            if let biasRow { for l in 0..<count { terms[l] = biasRow[(j + l) &* biasStride] } }
            let distance = V(repeating: Float(i + offset - j)) - ramp
            var result = modified(original, biasTerms: terms, slope: slope, distance: distance, check: &check)
            if count < 16 {
                for l in count..<16 { result[l] = original[l] }
            }
            store16(result, s + j)
            j += 16
        }
        report(check)
    }

    /// The modifiers on a transposed tile of the decode kernel's grouped path
    /// (`scores[jj · ld + lane]`: key `keyStart + jj`, lane `lane` the group row
    /// `rowStart + lane`, that is head `firstHead + row / queryLength`, query
    /// `row % queryLength`, aligned to key position `query + offset`); padding lanes
    /// (`rowCount...`) get scores of no meaning (masking overwrites them).
    func applyToGroupRows(_ scores: UnsafeMutablePointer<Float>, ld: Int, keyStart: Int, keyCount: Int,
                          rowStart: Int, rowCount: Int, queryLength n: Int, firstHead: Int, b: Int, offset: Int) {
        typealias V = SIMD16<Float>
        let item = firstItem + b
        var check = BiasTermCheck()
        defer { report(check) }
        for lane in stride(from: 0, to: rowCount, by: 16) {
            // Per lane: the head's slope, the query's aligned position, its bias row.
            var slope = V(), position = V()
            var biasRows = InlineArray<16, UnsafePointer<Float>?>(repeating: nil)
            for l in 0..<min(16, rowCount - lane) {
                let row = rowStart + lane + l
                let head = self.firstHead + firstHead + row / n, i = row % n
                slope[l] = slopes?[head] ?? 0
                position[l] = Float(i + offset)
                biasRows[l] = bias.map { UnsafePointer($0.row(item, head, i)) }
            }
            let biasStride = bias?.strides[3] ?? 0
            for jj in 0..<keyCount {
                let j = keyStart + jj, at = scores + jj &* ld + lane
                var terms = V()
                if bias != nil {
                    for l in 0..<min(16, rowCount - lane) { terms[l] = biasRows[l]![j &* biasStride] }
                }
                store16(modified(load16(at), biasTerms: terms, slope: slope,
                                 distance: position - V(repeating: Float(j)), check: &check), at)
            }
        }
    }
}
