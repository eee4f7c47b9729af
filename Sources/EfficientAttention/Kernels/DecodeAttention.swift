import CEfficientAttention

/// The decode kernel: a few query positions per head against a long key/value cache,
/// split along the keys into chunks whose partial results merge exactly.
///
/// Work items are (batch b, key/value head hk, tile of the group's query rows, chunk c of
/// `split` keys). The rows of a group are its `G = H / Hkv` query heads × `n` positions
/// (row `r` = head `hk · G + r / n`, position `r % n`); they all read the key/value head in
/// place, so the cache is streamed once for the whole group. Two paths, by rows per group:
///
/// - **Dot-product path** (`G · n < 32`, e.g. multi-head `H = Hkv` decoding and groups of 4
///   or 8, and groups of up to 128 rows whose 32-lane panels would be more than an eighth
///   padding, ``usesMicroKernel(rows:)``): a few FLOPs per byte of cache, so the loop is
///   written to stream the cache at memory speed:
///
///         for each key tile (~64 KiB of keys) of the chunk:
///             G · n = 1: touch the tile's value lines and the next tile's key lines
///             rows 0–3 as one block of four slots (slots past G · n idle), each further
///             four rows as a block (the tile from L2), then the last one to three rows
///             each alone:
///                 (skip a block if no row of it sees a key in the tile)
///                 s_rj = scale · q_r · k_j     each key row read once for the block,
///                                              SIMD16 over D (alone: 4 keys at a time)
///                 per row: mask, modifiers, m' = max(m, max s), α = exp(m − m'),
///                          p_j = exp(s_j − m'), l = α·l + Σ p_j, o ·= α
///                 o_r += Σ p_rj v_j            each value row read once for the block,
///                                              16 columns at a time (alone: 4 value rows
///                                              per pass over o)
///                 the first block's loops prefetch the next tile's key and value rows
///                 (G · n ≥ 2)
///
///   A row gets the same bits alone or in a block whose visible keys are its own (the same
///   operations per element, in the same order; always so for one position per head).
///
/// - **Micro-kernel path** (`G · n ≥ 32` filling its 32-lane panels to at least seven
///   eighths, or more than a row tile of 128 rows; multi-query and large groups): the rows
///   are the
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

    /// Query rows per group (`G · n`) from which the micro-kernel path may be used
    /// (``usesMicroKernel(rows:)``): below it the 8 × 32 tile is partly padding (it computes
    /// 32 lanes for any group of 8 to 32 rows) and the dot-product path's blocks of four are
    /// faster (on the Zen 3 host 3× at 8 rows, 1.2× at 24, 0.9× at 32: KernelDocs/MultiQuery.md,
    /// "Blocks up to 32 rows"). A structural constant, the same on every target (``Tuning``).
    static let microKernelRows = 32

    /// Whether a group of `rows` query rows (`G · n`) takes the micro-kernel path: from
    /// ``microKernelRows`` rows, when its 32-lane panels are at most an eighth padding
    /// (`roundUp(rows, 32) − rows ≤ rows / 8`: 32, 58–64, 87–96, 116–128) or the group is
    /// longer than one of its row tiles (``rowTile``: the dot-product path attends a group
    /// as one work item, the micro-kernel path splits it across threads). On the Zen 3 host
    /// a row of the blocks costs about what a lane of the micro-kernel does, so a panel with
    /// many padding lanes loses to the blocks (36–48 rows 15–50 % faster as blocks, 71 rows
    /// 10–20 %: KernelDocs/MultiQuery.md, "Blocks up to 32 rows"). Depends on the shape and
    /// the tuning row only, as every partition does (``Tuning``).
    static func usesMicroKernel(rows: Int) -> Bool {
        rows >= microKernelRows && ((roundUp(rows, MicroTile.nr) - rows) * 8 <= rows || rows > rowTile)
    }

    /// Rows per group (`G · n`) from which the dot-product path attends its first four rows as
    /// one block of four slots, each key and value row read once for the block (below four
    /// rows the slots past them idle), the block's loops requesting the next tile's rows with
    /// prefetch instructions, then each further four rows as a block and the last one to
    /// three rows alone; a single row is attended alone and
    /// touches the next tile with plain loads at each tile's start (KernelDocs/MultiQuery.md).
    static let blockRows = 2

    /// Query rows per work item on the micro-kernel path (the tiled kernel's query tile).
    static let rowTile = Tuning.current.decodeRowTile

    /// How many value rows ahead a pass of ``accumulateFourRows`` requests the 16 columns it
    /// is reading: a pass reads one line of each row of the tile (rows `Dv` elements apart),
    /// which come from L2, and the request brings each into L1 a few rows before its
    /// multiply-adds need it (4, 8 and 16 measured alike, 3–4 % faster than none on the
    /// Zen 3 host: KernelDocs/MultiQuery.md, "The block's value pass").
    static let nearRows = 8

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
            grouped = DecodeAttention.usesMicroKernel(rows: rows)
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
        // fewer than `blockRows` rows, plain loads of this tile's values and the next tile's
        // keys at the tile's start where the tuning row says so (else the hardware
        // prefetchers alone); with more, the first tile's keys are touched here, its
        // values requested by the block's scoring loop, and each later tile's rows by the
        // block's loops over the tile before it.
        let blocks = rows >= blockRows
        let touchesTiles = MemoryLayout<R.Element>.size >= Tuning.current.decodeTouchedElementBytes
        if first <= last && blocks {
            // The first tile's keys, one load per 64-byte line (all in flight at once).
            let count = min(space.tile, last - first + 1)
            touched |= touchLines(keys, b: b, hk: hk, start: first, count: count, width: d)
        }
        while tileStart <= last {
            let count = min(space.tile, last - tileStart + 1)
            let next = tileStart + count, nextCount = next <= last ? min(space.tile, last - next + 1) : 0
            if !blocks && touchesTiles {
                touched |= touchLines(values, b: b, hk: hk, start: tileStart, count: count, width: dv)
                touched |= touchLines(keys, b: b, hk: hk, start: next, count: nextCount, width: d)
            }
            let tile = DotTile(space: space, keys: keys, values: values, b: b, hk: hk, d: d, dv: dv,
                               start: tileStart, count: count, nextCount: nextCount, isFirst: tileStart == first,
                               modifiers: modifiers,
                               groupSize: g, queryLength: n, offset: mask.offset)
            if blocks {
                // Rows 0–3 as a block (below four rows its slots past the rows idle), each
                // further four rows as a block reading the tile from L2 (only the first
                // requests the next tile), the last one to three alone: a block's idle slots
                // cost more than those rows' L2 reads.
                attendFourRows(tile, rows: min(4, rows))
                var r = 4
                while r + 4 <= rows {
                    attendFourRows(tile, rows: 4, from: r, requesting: false)
                    r += 4
                }
                while r < rows {
                    attendRow(tile, r)
                    r += 1
                }
            } else {
                attendRow(tile, 0)
            }
            tileStart += count
        }

        space.touched[0] = touched
        for r in 0..<rows {
            writePartial(acc: space.acc + r * dvPad, max: space.rowMax[r], sum: space.rowSum[r],
                         dv: dv, row: r, rows: rows, into: partial)
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

    /// Four rows' values of one kind (query rows, output rows) for a block.
    typealias FourRows<T> = (T, T, T, T)

    /// One key tile of a dot-product-path work item: keys `start ..< start + count` of key/value
    /// head `hk` of batch item `b`, and what its rows need to attend them.
    struct DotTile<R: KVRows> {
        let space: Workspace, keys: R, values: R, b: Int, hk: Int, d: Int, dv: Int
        /// The tile's keys `start ..< start + count`; the next tile's `start + count ..< start + count + nextCount`.
        let start: Int, count: Int, nextCount: Int
        /// Whether this is the work item's first tile (its values not yet requested).
        let isFirst: Bool
        let modifiers: ScoreModifierKernel?, groupSize: Int, queryLength: Int, offset: Int

        /// Score lanes per row: the tile rounded up to 16.
        var lanes: Int { roundUp(count, 16) }

        /// Row `r`'s visible keys in the tile (empty when `a > e`).
        @inline(__always)
        func visible(_ r: Int) -> (a: Int, e: Int) {
            (max(space.lo[r], start), min(space.hi[r], start + count - 1))
        }

        /// The score modifiers on row `r`'s scores `s` (key `j` at `s[j - start]`) over `a...e`.
        @inline(__always)
        func modify(_ s: UnsafeMutablePointer<Float>, row r: Int, from a: Int, through e: Int) {
            modifiers?.applyToRow(s - start, from: a, through: e, b: b, h: hk * groupSize + r / queryLength,
                                  i: r % queryLength, offset: offset)
        }
    }

    /// Row `r` alone on a tile: its scores four keys at a time, the online softmax, then its
    /// output four value rows per pass.
    @inline(__always)
    static func attendRow<R: KVRows>(_ t: DotTile<R>, _ r: Int) {
        let space = t.space, (a, e) = t.visible(r)
        guard a <= e else { return }
        let s = space.scores
        s.update(repeating: -.infinity, count: t.lanes)
        scores(q: space.q + r * space.dPad, d: t.d, keys: t.keys, b: t.b, hk: t.hk,
               from: a, through: e, into: s - t.start, values: t.values)
        t.modify(s, row: r, from: a, through: e)
        guard softmax(s, lanes: t.lanes, row: r, space: space) else { return }
        accumulate(probabilities: s - t.start, values: t.values, b: t.b, hk: t.hk,
                   from: a, through: e, dv: t.dv, into: space.acc + r * space.dvPad)
    }

    /// Rows `first ..< first + count` together on a tile as four slots (slots `count...` idle:
    /// their scores are computed from a valid row and dropped, their output goes to a spare row):
    /// each key row and each value row read once for the four slots
    /// (instead of once per row, from L2). Over the union `a...e` of the rows'
    /// visible keys; a row's keys outside its own range get probability 0. Each score and
    /// output element is the same chain of operations as ``attendRow(_:_:)``'s, so the bits
    /// are the same whichever path a row takes (for a row whose range is the union; another
    /// row's extra keys add `0 · v`). The loops also request the next tile's rows, key rows
    /// while scoring and value rows while accumulating (the row `a + i` of this pass is
    /// followed by the next tile's row `i`); on an item's first tile
    /// the scoring loop requests this tile's value rows instead and the accumulation loop the
    /// next tile's key rows as well. Without `requesting` (a group's later blocks, reading
    /// the tile the first block brought into L2) nothing is requested.
    @inline(__always)
    static func attendFourRows<R: KVRows>(_ t: DotTile<R>, rows count: Int, from first: Int = 0,
                                         requesting: Bool = true) {
        let space = t.space, ld = space.scoreStride
        @inline(__always) func query(_ k: Int) -> UnsafePointer<Float> {
            UnsafePointer(space.q + (first + min(k, count - 1)) * space.dPad)
        }
        @inline(__always) func output(_ k: Int) -> UnsafeMutablePointer<Float> {
            k < count ? space.acc + (first + k) * space.dvPad : space.spare
        }
        var a = Int.max, e = Int.min
        for k in 0..<count {
            let (ak, ek) = t.visible(first + k)
            if ak <= ek {
                a = min(a, ak)
                e = max(e, ek)
            }
        }
        guard a <= e else { return }
        let s = space.scores
        for k in 0..<4 { (s + k * ld).update(repeating: -.infinity, count: t.lanes) }
        let ahead = requesting ? min(t.nextCount, e - a + 1) : 0, next = t.start + t.count
        let own = t.isFirst && requesting
        scoresOfFourRows(q: (query(0), query(1), query(2), query(3)), d: t.d, keys: t.keys, b: t.b, hk: t.hk,
                         from: a, through: e, into: s - t.start, ld: ld,
                         prefetch: own ? t.values : t.keys, from: own ? a : next, count: own ? e - a + 1 : ahead)
        for k in 0..<4 {
            let row = s + k * ld, (ak, ek) = k < count ? t.visible(first + k) : (1, 0)
            var live = ak <= ek
            if live {
                if ak > a { (row + (a - t.start)).update(repeating: -.infinity, count: ak - a) }
                if ek < e { (row + (ek + 1 - t.start)).update(repeating: -.infinity, count: e - ek) }
                t.modify(row, row: first + k, from: ak, through: ek)
                live = softmax(row, lanes: t.lanes, row: first + k, space: space)
            }
            if !live { (row + (a - t.start)).update(repeating: 0, count: e - a + 1) }
        }
        foldRowScales(s - t.start, ld: ld, rows: 4, values: t.values, b: t.b, hk: t.hk, from: a, through: e)
        accumulateFourRows(probabilities: s - t.start, ld: ld, values: t.values, b: t.b, hk: t.hk,
                           from: a, through: e, dv: t.dv, into: (output(0), output(1), output(2), output(3)),
                           columnsFor: 0..<count, prefetch: next, count: ahead, alsoKeys: own ? t.keys : nil)
    }

    /// The online softmax of row `r` over a tile's scores `s` (`lanes` of them, −∞ where
    /// hidden), in place: `m' = max(m, max s)`, `p = exp(s − m')`, `l = α·l + Σ p` with
    /// `α = exp(m − m')`, and the row's output scaled by `α`. False (nothing changed) when
    /// every score so far is −∞ (a bias can hide them all): the row adds nothing yet.
    @inline(__always)
    static func softmax(_ s: UnsafeMutablePointer<Float>, lanes: Int, row r: Int, space: Workspace) -> Bool {
        var tileMax = Vec16(repeating: -.infinity)
        for t in stride(from: 0, to: lanes, by: 16) { tileMax = maximum(tileMax, load16(s + t)) }
        let oldMax = space.rowMax[r]
        let newMax = max(oldMax, horizontalMax(tileMax))
        guard newMax > -.infinity else { return false }
        let alpha = expf(oldMax - newMax)
        var sum = Vec16()
        for t in stride(from: 0, to: lanes, by: 16) {
            let p = VectorMath.expNonPositive16(load16(s + t) - Vec16(repeating: newMax))
            store16(p, s + t)
            sum += p
        }
        space.rowSum[r] = alpha * space.rowSum[r] + horizontalSum(sum)
        space.rowMax[r] = newMax
        if alpha != 1 {
            let acc = space.acc + r * space.dvPad, factor = Vec16(repeating: alpha)
            for c in stride(from: 0, to: space.dvPad, by: 16) { store16(load16(acc + c) * factor, acc + c) }
        }
        return true
    }

    /// For Int8 value rows, `p[k · ld + j] ·= scale_j` for a block's `rows` rows `k` and `j` in
    /// `a...e` (`Σ p_j s_j ṽ_j`: each row's weight then multiplies its stored integers).
    /// Nothing for other elements.
    @inline(__always)
    static func foldRowScales<R: KVRows>(_ p: UnsafeMutablePointer<Float>, ld: Int, rows: Int, values: R,
                                         b: Int, hk: Int, from a: Int, through e: Int) {
        guard R.Element.quantized else { return }
        var cursor = RowCursor(values, b: b, h: hk, from: a)
        for j in a...e {
            let scale = R.scale(ofRow: cursor.next())
            for k in 0..<rows { p[k * ld + j] *= scale }
        }
    }

    /// How many rows ahead the one-row loops request Int8 key and value rows (Zen 5, stop 58:
    /// 32 and 64 alike, 7–8 % faster than none; KernelDocs/MultiQuery.md).
    static let int8RowsAhead = 32

    /// Requests every line of the four Int8 rows (scales included) ``int8RowsAhead`` rows
    /// on from `row`, rows `step` elements apart. The one-row loops call it for Int8 rows
    /// only, which no tuning row touches (`Tuning.decodeTouchedElementBytes`); the AVX2 row
    /// leaves its untouched Float32 and 16-bit rows to the hardware prefetchers alone, as
    /// measured on the Zen 3 (requests for those rows were not measured there). A prefetch
    /// never faults, so rows past the stretch or the cache are harmless.
    @inline(__always)
    static func requestFourRowsAhead<E: CacheScalar>(of row: UnsafePointer<E>, step: Int) {
        let later = UnsafeRawPointer(row + int8RowsAhead &* step) - 4
        for line in stride(from: 0, to: 4 &* step &* MemoryLayout<E>.stride, by: 64) {
            ea_prefetch_read(later + line)
        }
    }

    /// The score of one key for a query `q` (already scaled): SIMD16 over `D` into `partial`,
    /// then the horizontal sum, the remaining columns, and an Int8 row's scale.
    @inline(__always)
    static func finishScore<R: KVRows>(_ partial: Vec16, q: UnsafePointer<Float>, key: UnsafePointer<R.Element>,
                                       from c: Int, d: Int, _: R.Type) -> Float {
        var s = horizontalSum(partial)
        for x in c..<d { s += q[x] * R.Element.widen(key[x]) }
        if R.Element.quantized { s *= R.scale(ofRow: key) }   // s_j · (q · k̃_j)
        return s
    }

    /// `s[j] = q · k_j` for `j` in `a...e` (`q` already scaled), four keys at a time, walking
    /// the keys stretch by stretch (``forEachStretch(of:from:through:pairedWith:also:from:count:b:hk:_:)``)
    /// so the loop holds only the arithmetic and pointer steps. For Int8 rows it requests
    /// each value row's first line (its scale) with the key: the value pass (``accumulate``)
    /// reads the scale first, and the hardware prefetchers would not have it in yet. Int8
    /// key rows, which the tile touches leave out, are requested ``int8RowsAhead`` rows ahead.
    @inline(__always)
    static func scores<R: KVRows>(q: UnsafePointer<Float>, d: Int, keys: R, b: Int, hk: Int,
                                  from a: Int, through e: Int, into s: UnsafeMutablePointer<Float>,
                                  values: R) {
        typealias E = R.Element
        let full = d / 16 * 16
        let keyStep = keys.rowStride, valueStep = values.rowStride
        forEachStretch(of: keys, from: a, through: e, pairedWith: values, from: a,
                       count: E.quantized ? e - a + 1 : 0, b: b, hk: hk) { j, n, first, valueRow, _ in
            var k0 = first, out = s + j, i = 0
            var scaleLine = valueRow.map { UnsafeRawPointer($0) - 4 }
            @inline(__always) func requestScale() {
                if E.quantized, let line = scaleLine {
                    ea_prefetch_read(line)
                    scaleLine = line + valueStep &* MemoryLayout<E>.stride
                }
            }
            while i &+ 4 <= n {
                let k1 = k0 + keyStep, k2 = k1 + keyStep, k3 = k2 + keyStep
                requestScale(); requestScale(); requestScale(); requestScale()
                if E.quantized { requestFourRowsAhead(of: k0, step: keyStep) }
                var a0 = Vec16(), a1 = Vec16(), a2 = Vec16(), a3 = Vec16()
                for c in stride(from: 0, to: full, by: 16) {
                    let x = load16(q + c)
                    multiplyAdd(&a0, x, E.wide16(k0 + c))
                    multiplyAdd(&a1, x, E.wide16(k1 + c))
                    multiplyAdd(&a2, x, E.wide16(k2 + c))
                    multiplyAdd(&a3, x, E.wide16(k3 + c))
                }
                out[0] = finishScore(a0, q: q, key: k0, from: full, d: d, R.self)
                out[1] = finishScore(a1, q: q, key: k1, from: full, d: d, R.self)
                out[2] = finishScore(a2, q: q, key: k2, from: full, d: d, R.self)
                out[3] = finishScore(a3, q: q, key: k3, from: full, d: d, R.self)
                k0 = k3 + keyStep
                out += 4
                i &+= 4
            }
            while i < n {
                requestScale()
                var a0 = Vec16()
                for c in stride(from: 0, to: full, by: 16) { multiplyAdd(&a0, load16(q + c), E.wide16(k0 + c)) }
                out.pointee = finishScore(a0, q: q, key: k0, from: full, d: d, R.self)
                k0 += keyStep
                out += 1
                i &+= 1
            }
        }
    }

    /// `s[k · ld + j] = q_k · k_j` for four query rows `q_k` (already scaled)
    /// and `j` in `a...e`: each key row read once for the four. With key `a + i` it requests
    /// key row `upcoming + i` for `i < count` (one prefetch per 16 elements). The keys are
    /// walked stretch by stretch, as in ``accumulateFourRows``.
    @inline(__always)
    static func scoresOfFourRows<R: KVRows>(q: FourRows<UnsafePointer<Float>>, d: Int, keys: R, b: Int, hk: Int,
                                            from a: Int, through e: Int, into s: UnsafeMutablePointer<Float>,
                                            ld: Int, prefetch requested: R, from upcoming: Int, count: Int) {
        typealias E = R.Element
        let full = d / 16 * 16
        let (q0, q1, q2, q3) = q
        var s0 = s + a, s1 = s + (ld &+ a), s2 = s + (2 &* ld &+ a), s3 = s + (3 &* ld &+ a)
        /// The four scores of `key`, requesting `later`'s lines as it reads the key's.
        @inline(__always)
        func score(_ key: UnsafePointer<E>, requesting later: UnsafePointer<E>?) {
            var a0 = Vec16(), a1 = Vec16(), a2 = Vec16(), a3 = Vec16()
            var c = 0
            while c < full {
                if let later { ea_prefetch_read(later + c) }
                let x = E.wide16(key + c)
                multiplyAdd(&a0, load16(q0 + c), x)
                multiplyAdd(&a1, load16(q1 + c), x)
                multiplyAdd(&a2, load16(q2 + c), x)
                multiplyAdd(&a3, load16(q3 + c), x)
                c &+= 16
            }
            s0.pointee = finishScore(a0, q: q0, key: key, from: full, d: d, R.self)
            s1.pointee = finishScore(a1, q: q1, key: key, from: full, d: d, R.self)
            s2.pointee = finishScore(a2, q: q2, key: key, from: full, d: d, R.self)
            s3.pointee = finishScore(a3, q: q3, key: key, from: full, d: d, R.self)
            s0 += 1; s1 += 1; s2 += 1; s3 += 1
        }
        forEachStretch(of: keys, from: a, through: e, pairedWith: requested, from: upcoming, count: count,
                       b: b, hk: hk) { _, n, first, request, _ in
            var key = first
            if var later = request {
                for _ in 0..<n {
                    score(key, requesting: later)
                    key += keys.rowStride
                    later += requested.rowStride
                }
            } else {
                for _ in 0..<n {
                    score(key, requesting: nil)
                    key += keys.rowStride
                }
            }
        }
    }

    /// Rows `a...e` of `rows` (batch item `b`, head `hk`) in stretches of rows `rowStride`
    /// apart: `body(j, n, row, paired, alsoPaired)` for rows `j ..< j + n` from `row`. The
    /// first `count` rows are paired, row for row, with the rows of `pairs` (and of
    /// `alsoPairs`, if given) from `upcoming`: `paired` (`alsoPaired`) is the first of the
    /// stretch's paired rows, nil past `count`, and a stretch ends where any of the runs does
    /// (``RowCursor/run()``). The decode loops request the paired rows as they read theirs
    /// (the blocks' next-tile rows, the one-row scores' Int8 scale lines; without `pairs`, or
    /// with `count = 0`, nothing is paired), and walk each stretch with nothing but pointer
    /// steps.
    @inline(__always)
    static func forEachStretch<R: KVRows>(
        of rows: R, from a: Int, through e: Int, pairedWith pairs: R? = nil, also alsoPairs: R? = nil,
        from upcoming: Int = 0, count: Int = 0, b: Int, hk: Int,
        _ body: (_ j: Int, _ n: Int, _ row: UnsafePointer<R.Element>,
                 _ paired: UnsafePointer<R.Element>?, _ alsoPaired: UnsafePointer<R.Element>?) -> Void
    ) {
        var cursor = RowCursor(rows, b: b, h: hk, from: a)
        var paired = count > 0 ? pairs.map { RowCursor($0, b: b, h: hk, from: upcoming) } : nil
        var alsoPaired = count > 0 ? alsoPairs.map { RowCursor($0, b: b, h: hk, from: upcoming) } : nil
        var j = a
        while j <= e {
            let (row, inRun) = cursor.run()
            var n = min(inRun, e - j + 1)
            if j - a < count, let (pair, pairRun) = paired?.run() {
                n = min(n, count - (j - a), pairRun)
                var alsoPair: UnsafePointer<R.Element>? = nil
                if let (also, alsoRun) = alsoPaired?.run() {
                    alsoPair = also
                    n = min(n, alsoRun)
                }
                body(j, n, row, pair, alsoPair)
                paired?.skip(n)
                alsoPaired?.skip(n)
            } else {
                body(j, n, row, nil, nil)
            }
            cursor.skip(n)
            j += n
        }
    }

    /// `acc += Σ_j p[j] · v_j` for `j` in `a...e`, four value rows per pass over `acc`, walking
    /// the rows stretch by stretch. An Int8 row's scale is multiplied into its probability
    /// here, where the row is read (`p[j] ·= scale_j`, stored back for the columns past the
    /// last 16): the product ``foldRowScales`` forms for a block, so the same bits. Int8 rows
    /// are requested ``int8RowsAhead`` rows ahead, as the score loop's keys.
    @inline(__always)
    static func accumulate<R: KVRows>(probabilities p: UnsafeMutablePointer<Float>, values: R,
                                      b: Int, hk: Int, from a: Int, through e: Int, dv: Int,
                                      into acc: UnsafeMutablePointer<Float>) {
        typealias E = R.Element
        let full = dv / 16 * 16, step = values.rowStride
        /// Row `row`'s weight `w.pointee`, times its scale for Int8 rows (stored back).
        @inline(__always) func weight(_ w: UnsafeMutablePointer<Float>, _ row: UnsafePointer<E>) -> Vec16 {
            if E.quantized { w.pointee *= R.scale(ofRow: row) }
            return Vec16(repeating: w.pointee)
        }
        forEachStretch(of: values, from: a, through: e, b: b, hk: hk) { j, n, first, _, _ in
            var v0 = first, w = p + j, i = 0
            while i &+ 4 <= n {
                let v1 = v0 + step, v2 = v1 + step, v3 = v2 + step
                let p0 = weight(w, v0), p1 = weight(w + 1, v1), p2 = weight(w + 2, v2), p3 = weight(w + 3, v3)
                if E.quantized { requestFourRowsAhead(of: v0, step: step) }
                for c in stride(from: 0, to: full, by: 16) {
                    var x = load16(acc + c)
                    multiplyAdd(&x, p0, E.wide16(v0 + c))
                    multiplyAdd(&x, p1, E.wide16(v1 + c))
                    multiplyAdd(&x, p2, E.wide16(v2 + c))
                    multiplyAdd(&x, p3, E.wide16(v3 + c))
                    store16(x, acc + c)
                }
                v0 = v3 + step
                w += 4
                i &+= 4
            }
            while i < n {
                let p0 = weight(w, v0)
                for c in stride(from: 0, to: full, by: 16) {
                    var x = load16(acc + c)
                    multiplyAdd(&x, p0, E.wide16(v0 + c))
                    store16(x, acc + c)
                }
                v0 += step
                w += 1
                i &+= 1
            }
        }
        accumulateColumns(probabilities: p, values: values, b: b, hk: hk, from: a, through: e,
                          columns: full..<dv, into: acc)
    }

    /// `acc_r += Σ_j p[r · ld + j] · v_j` for four rows `r` (outputs `acc_r`) and
    /// `j` in `a...e`: each value row read once for the four, 16 columns at a time. Per output
    /// element the same multiply-adds in the same order as ``accumulate``. Each pass walks the
    /// rows stretch by stretch (``forEachStretch(of:from:through:pairedWith:also:from:count:b:hk:_:)``),
    /// so its loop holds only the arithmetic and pointer steps. With each value row it requests
    /// the 16 elements `nearRows` rows further on, and one line of the paired rows (value rows
    /// `upcoming + i` for `i < count`, and key rows on an item's first tile): pass `p` of the
    /// `P` passes requests the `p`-th `P`-th of each paired stretch's bytes, in address order
    /// (``requestShare(of:rows:rowStride:pass:of:)``), so the passes together request every
    /// line once or twice, and the requests run forward through memory as the hardware
    /// prefetchers expect; requests of each paired row's line `p` instead (a 512-byte stride
    /// per pass) made the Float32 GQA decode about a fifth slower (KernelDocs/MultiQuery.md,
    /// "The next tile requested in address order").
    @inline(__always)
    static func accumulateFourRows<R: KVRows>(probabilities p: UnsafePointer<Float>, ld: Int, values: R,
                                              b: Int, hk: Int, from a: Int, through e: Int, dv: Int,
                                              into acc: FourRows<UnsafeMutablePointer<Float>>, columnsFor tails: Range<Int>,
                                              prefetch upcoming: Int, count: Int, alsoKeys keys: R?) {
        typealias E = R.Element
        let full = dv / 16 * 16
        let (o0, o1, o2, o3) = acc
        let rowStep = values.rowStride, keyStep = keys?.rowStride ?? 0
        let near = nearRows &* rowStep, passes = full / 16
        for c in stride(from: 0, to: full, by: 16) {
            var x0 = load16(o0 + c), x1 = load16(o1 + c), x2 = load16(o2 + c), x3 = load16(o3 + c)
            // Keys `j ..< j + n`, value rows from `row`, `rowStep` apart; the paired rows
            // (the next tile's value rows, and key rows on an item's first tile) are
            // requested one line with each value row, this pass's share of them.
            forEachStretch(of: values, from: a, through: e, pairedWith: values, also: keys, from: upcoming,
                           count: count, b: b, hk: hk) { j, n, first, pairedValues, pairedKeys in
                var row = first + c, w0 = p + j, w1 = p + (ld &+ j), w2 = p + (2 &* ld &+ j), w3 = p + (3 &* ld &+ j)
                @inline(__always) func step() {
                    ea_prefetch_read(row + near)
                    let v = E.wide16(row)
                    multiplyAdd(&x0, Vec16(repeating: w0.pointee), v)
                    multiplyAdd(&x1, Vec16(repeating: w1.pointee), v)
                    multiplyAdd(&x2, Vec16(repeating: w2.pointee), v)
                    multiplyAdd(&x3, Vec16(repeating: w3.pointee), v)
                    row += rowStep
                    w0 += 1; w1 += 1; w2 += 1; w3 += 1
                }
                guard let pairedValues else {
                    for _ in 0..<n { step() }
                    return
                }
                var (value, valueStep) = requestShare(of: pairedValues, rows: n, rowStride: rowStep,
                                                      pass: c / 16, of: passes)
                if let pairedKeys {
                    var (key, keyShareStep) = requestShare(of: pairedKeys, rows: n, rowStride: keyStep,
                                                           pass: c / 16, of: passes)
                    for _ in 0..<n {
                        ea_prefetch_read(value)
                        ea_prefetch_read(key)
                        value += valueStep
                        key += keyShareStep
                        step()
                    }
                } else {
                    for _ in 0..<n {
                        ea_prefetch_read(value)
                        value += valueStep
                        step()
                    }
                }
            }
            store16(x0, o0 + c)
            store16(x1, o1 + c)
            store16(x2, o2 + c)
            store16(x3, o3 + c)
        }
        for k in tails {
            accumulateColumns(probabilities: p + k * ld, values: values, b: b, hk: hk, from: a, through: e,
                              columns: full..<dv, into: k == 0 ? o0 : k == 1 ? o1 : k == 2 ? o2 : o3)
        }
    }

    /// Where pass `pass` of `passes` starts requesting `rows` rows `rowStride` elements apart
    /// from `first` (one contiguous run: `rows · rowStride` elements), and how far it steps per
    /// row: its share `pass · rows · rowStride / passes ..<` of the run, in `rows` steps of
    /// `⌈rowStride / passes⌉` elements. Every line of the run is requested when a step is at
    /// most 64 bytes (rows of at most `passes` lines: the value pass's own rows, `passes =
    /// ⌊Dv / 16⌋`; wider key rows get every second or fourth line, as before). The last pass
    /// may request up to `rows` elements past the run: a prefetch never faults.
    @inline(__always)
    static func requestShare<E>(of first: UnsafePointer<E>, rows: Int, rowStride: Int, pass: Int,
                                of passes: Int) -> (start: UnsafePointer<E>, step: Int) {
        (first + pass &* rows &* rowStride / passes, (rowStride + passes - 1) / passes)
    }

    /// The columns past the last full 16 (`columns`): `acc[c] += Σ_j p[j] · v_j[c]`, value
    /// rows four at a time then one at a time from `a`.
    @inline(__always)
    static func accumulateColumns<R: KVRows>(probabilities p: UnsafePointer<Float>, values: R,
                                             b: Int, hk: Int, from a: Int, through e: Int, columns: Range<Int>,
                                             into acc: UnsafeMutablePointer<Float>) {
        typealias E = R.Element
        guard !columns.isEmpty else { return }
        var j = a, rows = RowCursor(values, b: b, h: hk, from: a)
        while j + 3 <= e {
            let v0 = rows.next(), v1 = rows.next(), v2 = rows.next(), v3 = rows.next()
            let w0 = p[j], w1 = p[j + 1], w2 = p[j + 2], w3 = p[j + 3]
            for c in columns {
                acc[c] += w0 * E.widen(v0[c]) + w1 * E.widen(v1[c]) + w2 * E.widen(v2[c]) + w3 * E.widen(v3[c])
            }
            j += 4
        }
        while j <= e {
            let v0 = rows.next(), w0 = p[j]
            for c in columns { acc[c] += w0 * E.widen(v0[c]) }
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
        /// Floats from one row's scores to the next (four rows' for a block of four).
        let scoreStride: Int
        let q, acc, rowMax, rowSum, scores: UnsafeMutablePointer<Float>
        /// The output row of a block's idle slots.
        let spare: UnsafeMutablePointer<Float>
        let lo, hi: UnsafeMutablePointer<Int>
        let touched: UnsafeMutablePointer<UInt32>

        init(carving carver: inout WorkspaceCarver, rows: Int, d: Int, dv: Int, tile: Int) {
            self.rows = rows
            self.tile = tile
            dPad = roundUp(d, 16)
            dvPad = roundUp(dv, 16)
            q = carver.take(rows * dPad)
            acc = carver.take(rows * dvPad)
            scoreStride = tile + 16
            scores = carver.take((rows >= DecodeAttention.blockRows ? 4 : 1) * scoreStride)
            spare = carver.take(dvPad)
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
