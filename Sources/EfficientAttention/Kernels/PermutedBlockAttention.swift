/// Permuted-block attention, the gather–attend–scatter kernel of content-based routing
/// (``LSHAttention``, ``RoutingAttention``): queries and keys are permuted into blocks
/// (LSH chunks of the bucket-sorted order, routing clusters), each block attends to the
/// keys its ``BlockVisibility`` rule allows (block-diagonal, plus the previous block for
/// LSH) with the tiled softmax kernel, and the results are scattered back and combined.
///
/// For one head, round by round (`R` LSH hash rounds; one round for routing):
///
///     the conformer fills, for round r and every slot s, t:  queryPosition[s], queryBucket[s]
///                                                           keyPosition[t],   keyBucket[t]
///     per work item of consecutive blocks (about 1024 query slots):
///         gather    Q̃[s] = q[queryPosition[s]] for the item's query slots, and
///                   K̃[t] = k[keyPosition[t]], Ṽ[t] = v[keyPosition[t]] for the keys of the
///                   block before the item (LSH look-back, padded to a whole block) and of
///                   the item's blocks, into the worker's L2-sized buffers
///         attend    (Õ, l̃se)[item] = TiledSoftmaxAttention on the item with a PermutedBlockMask
///     combine, for each original query i over the slots s holding i:
///         .logSumExp:  merged exactly into the rows of the earlier rounds:
///                      lse_i ← log(exp(lse_i) + Σ_s exp(l̃se[s])),
///                      o_i ← exp(lse_i,old − lse_i) o_i + Σ_s exp(l̃se[s] − lse_i) Õ[s]
///         .mean:       o_i = mean of Õ[s] over the slots with a visible key,
///                      lse_i = log mean exp(l̃se[s]) over the same slots
///     rows with no slot, or no visible key in any round: 0 and −∞, except that with
///     `sharedKeys` a query whose key is valid falls back to itself after the last round
///     (the self rule): o_i = v_i, lse_i = scale · q_i·k_i + log R = scale · |q_i| + log R
///
/// Heads are work items of head workers (``forEachHead``), one head per thread while the
/// heads in flight fit in the shared cache, else one head at a time on every thread
/// (``split(heads:threads:bytesPerHead:cacheBytes:)``); a head's result never depends on the split.
///
/// Workspace: O(Nq · Dv + Nq + Nk) for one round of each head in flight (slot arrays, sorted
/// outputs) plus about 1 MiB of gathered rows per item worker (see
/// ``workspaceBytes(_:heads:threads:bytesPerHead:)``); rounds merge into the output rows, so
/// memory does not grow with `R`.
enum PermutedBlockAttention {
    /// How several results of one query combine.
    enum Combine {
        /// Exactly, by log-sum-exp (LSH rounds over the same query).
        case logSumExp
        /// The mean of the memberships with a visible key (routing clusters; one round).
        case mean
    }

    /// The slot layout and visibility rule of one head (the same for every head of a call):
    /// `blocks` blocks of `queryBlockSize` query slots and `keyBlockSize` key slots.
    struct Layout {
        /// Rounds merged into each output row (LSH hash rounds; 1 for routing).
        var rounds: Int
        /// Original queries, and the query and key slots of one round.
        var queryLength: Int, querySlots: Int, keySlots: Int
        /// Slots per block, and the blocks of one round.
        var queryBlockSize: Int, keyBlockSize: Int, blocks: Int
        /// Which key slots each query slot sees (same block, with the previous block,
        /// same bucket, causal, not itself).
        var visibility: BlockVisibility
        /// Keys are the unit-normalised queries (shared-QK LSH): key slots mirror the query
        /// slots, `K̃` is normalised from `Q̃` (no second gather), and the self rule applies.
        var sharedKeys: Bool
        var combine: Combine
        var headDim: Int
        var valueDim: Int

        /// Query tiles matched to the blocks (a tile of 64 queries for 64-slot chunks), keys
        /// in tiles of 64.
        var queryTile: Int {
            min(TiledSoftmaxAttention.Tiling.defaultQueryTile, max(MicroTile.nr, queryBlockSize))
        }

        /// Blocks per work item: an item's gathered rows (about 1024 query slots) stay in L2.
        var itemBlocks: Int { max(1, Tuning.current.permutedItemQuerySlots / queryBlockSize) }
        /// Work items of a round.
        var items: Int { (blocks + itemBlocks - 1) / itemBlocks }
        /// Whether an item also holds the keys of the block before its first (LSH look-back;
        /// with one block, the previous block is the block itself).
        var predecessor: Bool { visibility.withPrevious && blocks > 1 }
        var itemQuerySlots: Int { itemBlocks * queryBlockSize }
        var itemKeySlots: Int { (itemBlocks + (predecessor ? 1 : 0)) * keyBlockSize }

        /// Every query holds exactly one slot per round and rounds merge by log-sum-exp (LSH):
        /// each item merges its outputs into the output rows right after attending, from
        /// the worker's buffer, so a round's sorted outputs are never stored whole.
        var combinesPerItem: Bool { combine == .logSumExp && querySlots == queryLength }

        /// The kernel's problem for the largest work item.
        var kernelShape: AttentionShape {
            AttentionShape(batch: 1, heads: 1, queryLength: min(itemQuerySlots, querySlots),
                           keyLength: itemKeySlots, headDim: headDim, valueDim: valueDim)
        }
    }

    /// Per-slot arrays are padded by this many entries (the mask reads 16-lane vectors).
    static let slotPadding = 32

    /// The last-level cache the head workers share (the tuning table, ``Tuning``).
    static let sharedCacheBytes = Tuning.current.sharedCacheBytes

    /// How `threads` split between heads and the work items of one head: `outer` workers each
    /// take whole heads (the `heads` = B·H work items, one head's workspace per worker), and
    /// every head runs its phases on `inner` threads. Heads run side by side on one thread
    /// each (no synchronisation inside a head, every phase parallel) while the heads in
    /// flight, `bytesPerHead` each (``headBytes(_:keyLength:scratchBytes:)``), fit in the
    /// shared cache; otherwise (long sequences) fewer heads at a time, each on more threads,
    /// whose work items are then plentiful. A head's result does not depend on `inner`, so the
    /// output is the same for any split. `cacheBytes` (default the whole shared cache) bounds
    /// the heads in flight.
    static func split(heads: Int, threads: Int, bytesPerHead: Int,
                      cacheBytes: Int = sharedCacheBytes) -> (outer: Int, inner: Int) {
        var outer = max(1, min(threads, heads))
        while outer > 1 && outer * bytesPerHead > cacheBytes { outer -= 1 }
        return (outer, max(1, threads / outer))
    }

    /// The memory one head touches: its rows of q, k (not read with shared keys), v and the
    /// output, one ``Workspace`` and the conformer's `scratchBytes`.
    static func headBytes(_ l: Layout, keyLength: Int, scratchBytes: Int) -> Int {
        4 * (l.queryLength * (l.headDim + l.valueDim) + keyLength * ((l.sharedKeys ? 0 : l.headDim) + l.valueDim))
            + Workspace.byteCount(l, workers: 1) + scratchBytes
    }

    /// Bytes of a call's workspace: the arena of ``forEachHead(batch:heads:threads:layout:bytesPerHead:cacheBytes:makeScratch:_:)``
    /// (per head worker, one ``Workspace`` and the conformer's scratch of `scratchBytes(inner)`
    /// bytes) plus the tiled kernel's workspace of each of their item workers. `heads` is
    /// B·H; the split is the one ``split(heads:threads:bytesPerHead:cacheBytes:)`` makes for
    /// heads of ``headBytes(_:keyLength:scratchBytes:)`` with `scratchBytes(1)`.
    static func workspaceBytes(_ layout: Layout, heads: Int, threads: Int?, keyLength: Int,
                               cacheBytes: Int = sharedCacheBytes, scratchBytes: (_ workers: Int) -> Int) -> Int {
        let bytesPerHead = headBytes(layout, keyLength: keyLength, scratchBytes: scratchBytes(1))
        let (outer, inner) = split(heads: heads, threads: threads ?? defaultThreadCount, bytesPerHead: bytesPerHead,
                                   cacheBytes: cacheBytes)
        let workers = workerCount(threads: inner, items: layout.items)
        let slice = roundUp(Workspace.byteCount(layout, workers: workers) + scratchBytes(inner), WorkspaceCarver.alignment)
        return outer * (slice + workers * TiledSoftmaxAttention.workspaceBytes(shape: layout.kernelShape, threads: 1,
                                                                               queryTile: layout.queryTile))
    }

    /// Runs `body(b, h, inner, space, scratch)` for every head `(b, h)` of the batch items
    /// `items` and query heads `heads` (a part of the call: ``ViewCall/forEachOutputPart(_:)``):
    /// heads are work items of `outer` workers (``split(heads:threads:bytesPerHead:cacheBytes:)``),
    /// each with its own ``Workspace`` and conformer scratch (carved by `makeScratch(carver, inner)`),
    /// both in the worker's slice of one zero-filled arena, and `body` runs the head's phases
    /// on `inner` threads. A part's split takes at most the whole call's workspace
    /// (``workspaceBytes(_:heads:threads:keyLength:cacheBytes:scratchBytes:)``): fewer heads
    /// in flight, each with more item workers.
    static func forEachHead<Scratch>(
        items: Range<Int>, heads: Range<Int>, threads: Int, layout l: Layout, bytesPerHead: Int,
        cacheBytes: Int = sharedCacheBytes,
        makeScratch: (_ carver: inout WorkspaceCarver, _ inner: Int) -> Scratch,
        _ body: (_ b: Int, _ h: Int, _ inner: Int, _ space: Workspace, _ scratch: Scratch) -> Void
    ) {
        let count = items.count * heads.count
        let (outer, inner) = split(heads: count, threads: threads, bytesPerHead: bytesPerHead,
                                   cacheBytes: cacheBytes)
        let workers = workerCount(threads: inner, items: l.items)
        WorkspaceArena.withWorkspaces(workers: outer, zeroed: true, layout: { carver in
            (Workspace(carving: &carver, l, workers: workers), makeScratch(&carver, inner))
        }) { spaces in
            for (space, _) in spaces { space.prepare(l) }
            parallelForEach(items: count, threads: outer) { item, worker in
                body(items.lowerBound + item / heads.count, heads.lowerBound + item % heads.count, inner,
                     spaces[worker].0, spaces[worker].1)
            }
        }
    }

    /// One head's slot arrays and sorted outputs, and each worker's gathered item, in one
    /// allocation reused for every head and round.
    struct Workspace {
        let queryPosition, queryBucket, queryBlock: UnsafeMutablePointer<Int32>
        let keyPosition, keyBucket: UnsafeMutablePointer<Int32>
        /// Slots of each original query: `memberSlots[memberStart[i] ..< memberStart[i + 1]]`.
        let memberStart, memberSlots: UnsafeMutablePointer<Int32>
        /// Sorted outputs `[querySlots][Dv]` and log-sum-exps; `nil` when the items combine
        /// their own outputs (``Layout/combinesPerItem``: in each worker's ``ItemSpace``).
        let o, lse: UnsafeMutablePointer<Float>?
        let workers: Int
        private let itemInts, itemFloats, itemRows, itemOutputs: Int
        private let itemBase: UnsafeMutableRawPointer

        private static func counts(_ l: Layout)
            -> (ints: Int, floats: Int, itemInts: Int, itemFloats: Int, itemRows: Int, itemOutputs: Int) {
            let qs = l.querySlots + slotPadding, ks = l.keySlots + slotPadding
            let ints = roundUp(3 * qs + 2 * ks + (l.queryLength + 1) + qs, 16)
            let floats = l.combinesPerItem ? 0 : roundUp(l.querySlots * (l.valueDim + 1), 16)
            let itemInts = roundUp(3 * (l.itemKeySlots + slotPadding), 16)
            let itemRows = roundUp(l.itemQuerySlots * l.headDim + l.itemKeySlots * (l.headDim + l.valueDim), 16)
            let itemOutputs = l.combinesPerItem ? roundUp(l.itemQuerySlots * l.valueDim, 16) : 0
            let itemFloats = itemRows + itemOutputs + (l.combinesPerItem ? roundUp(l.itemQuerySlots, 16) : 0)
            return (ints, floats, itemInts, itemFloats, itemRows, itemOutputs)
        }

        static func byteCount(_ l: Layout, workers: Int) -> Int {
            WorkspaceCarver.bytes { _ = Workspace(carving: &$0, l, workers: workers) }
        }

        /// Carves the arrays (from a zero-filled arena); ``prepare(_:)`` then fills the
        /// query blocks.
        init(carving carver: inout WorkspaceCarver, _ l: Layout, workers: Int) {
            let c = Workspace.counts(l)
            self.workers = workers
            itemInts = c.itemInts
            itemFloats = c.itemFloats
            itemRows = c.itemRows
            itemOutputs = c.itemOutputs
            let i = carver.take(c.ints, of: Int32.self)
            let qs = l.querySlots + slotPadding, ks = l.keySlots + slotPadding
            queryPosition = i
            queryBucket = i + qs
            queryBlock = i + 2 * qs
            keyPosition = i + 3 * qs
            keyBucket = keyPosition + ks
            memberStart = keyPosition + 2 * ks
            memberSlots = memberStart + l.queryLength + 1
            let sorted = carver.take(c.floats, of: Float.self)
            o = l.combinesPerItem ? nil : sorted
            lse = l.combinesPerItem ? nil : sorted + l.querySlots * l.valueDim
            itemBase = UnsafeMutableRawPointer(carver.take(workers * (c.itemInts + c.itemFloats), of: Float.self))
        }

        /// Query blocks depend on the slot only: the same for every head and round.
        func prepare(_ l: Layout) {
            for s in 0..<l.querySlots { queryBlock[s] = Int32(s / l.queryBlockSize) }
        }

        /// Worker `worker`'s gathered item.
        func itemSpace(_ worker: Int, _ l: Layout) -> ItemSpace {
            let base = itemBase + 4 * worker * (itemInts + itemFloats)
            let ints = base.assumingMemoryBound(to: Int32.self)
            let keys = l.itemKeySlots + slotPadding
            let q = (base + 4 * itemInts).assumingMemoryBound(to: Float.self)
            let k = q + l.itemQuerySlots * l.headDim
            let o = q + itemRows
            return ItemSpace(keyBlock: ints, keyBucket: ints + keys, keyPosition: ints + 2 * keys,
                             q: q, k: k, v: k + l.itemKeySlots * l.headDim, o: o, lse: o + itemOutputs)
        }
    }

    /// One worker's gathered work item: key slot arrays (block, bucket, position), rows q,
    /// k, v and, when ``Layout/combinesPerItem``, the item's outputs and log-sum-exps.
    struct ItemSpace {
        let keyBlock, keyBucket, keyPosition: UnsafeMutablePointer<Int32>
        let q, k, v, o, lse: UnsafeMutablePointer<Float>
    }

    /// Rows of one head of a tensor: `row(i)` is position `i`.
    struct Rows {
        var view: TensorView
        var b: Int
        var h: Int
        /// Row `i` of a `Float` view (``widen(_:width:into:)`` and ``element(_:_:)`` read
        /// any precision).
        @inline(__always) func row(_ i: Int) -> UnsafePointer<Float> { view.row(b, h, i) }
        var elementStride: Int { view.strides[3] }

        /// The first `width` elements of row `i`, widened to `Float` into `target`.
        @inline(__always)
        func widen(_ i: Int, width: Int, into target: UnsafeMutablePointer<Float>) {
            view.widenRows(b, h, rows: PositionRun(start: i, count: 1), width: width, into: target, ld: width)
        }

        /// Element `c` of row `i`, widened to `Float`.
        @inline(__always)
        func element(_ i: Int, _ c: Int) -> Float {
            view.precision.widen(view.rawRow(b, h, i), at: c &* elementStride)
        }

        /// `|x_i|²` with the bits of ``dot(_:_:_:_:count:)`` on the widened row.
        @inline(__always)
        func squaredNorm(_ i: Int, count: Int) -> Float {
            view.dot(row: (b, h, i), view, row: (b, h, i), count: count)
        }

        /// Prefetches rows `positions[0..<count]`, `width` elements each
        /// (``prefetchRows(_:count:rowStrideBytes:lengthBytes:positions:write:)``).
        @inline(__always)
        func prefetch(_ positions: UnsafePointer<Int32>, count: Int, width: Int) {
            let rows = view.byteRows(b, h, rows: PositionRun(start: 0, count: 1), width: width)
            prefetchRows(rows.base, count: count, rowStrideBytes: rows.strideBytes, lengthBytes: rows.lengthBytes,
                         positions: positions)
        }
    }

    /// Rows a chunk of a gather or combine prefetches before the previous chunk is processed.
    static let prefetchChunk = 16

    /// Runs `body(r)` for `r` in `0..<count` in chunks of ``prefetchChunk``, calling
    /// `prefetch(first, count)` on each chunk before the body runs on the previous one, so
    /// that the cache misses of a chunk's scattered rows overlap (with each other, and with
    /// the work on the previous chunk) instead of stalling one row at a time.
    @inline(__always)
    static func prefetchingAhead(count: Int, prefetch: (_ first: Int, _ count: Int) -> Void,
                                 _ body: (_ r: Int) -> Void) {
        if count > 0 { prefetch(0, min(prefetchChunk, count)) }
        var first = 0
        while first < count {
            let end = min(count, first + prefetchChunk)
            if end < count { prefetch(end, min(prefetchChunk, count - end)) }
            for r in first..<end { body(r) }
            first = end
        }
    }

    /// Copies rows `positions[0..<count]` of `a` (`aWidth` elements each) to the
    /// consecutive rows of `aOut`, and the same rows of `b` to `bOut`, prefetching ahead.
    static func gather(_ positions: UnsafePointer<Int32>, count: Int,
                       _ a: Rows, width aWidth: Int, into aOut: UnsafeMutablePointer<Float>,
                       _ b: Rows, width bWidth: Int, into bOut: UnsafeMutablePointer<Float>?) {
        prefetchingAhead(count: count, prefetch: { first, rows in
            a.prefetch(positions + first, count: rows, width: aWidth)
            if bOut != nil { b.prefetch(positions + first, count: rows, width: bWidth) }
        }) { r in
            let position = Int(positions[r])
            a.widen(position, width: aWidth, into: aOut + r * aWidth)
            if let bOut { b.widen(position, width: bWidth, into: bOut + r * bWidth) }
        }
    }

    /// Attends round `round` of one head once the conformer has filled `space`'s positions
    /// and buckets for it, and combines it into rows `0..<queryLength` of `output` and `lse`
    /// (head `b`, `h`); rounds must come in order `0, 1, ...`.
    ///
    /// - Parameters:
    ///   - keyLength: keys at original positions `>= keyLength` are invisible (padding).
    ///   - modifiers: the call's score modifiers (nil: none), applied to every scored pair
    ///     at its original positions (``ScoreModifierKernel/gathered(item:head:_:)``) and to
    ///     the self rule's score.
    static func attendRound(
        _ l: Layout, round: Int, space: Workspace, scale: Float, threads: Int,
        query: Rows, key: Rows, value: Rows, keyLength: Int,
        output: MutableTensorView, lse: MutableTensorView, b: Int, h: Int, modifiers: ScoreModifierKernel? = nil
    ) {
        precondition(l.combine == .logSumExp || l.rounds == 1, "the mean combines a single round")
        let d = l.headDim, dv = l.valueDim
        let qs = l.querySlots, ks = l.keySlots
        let blocksOnly = !l.visibility.hasRules && !l.sharedKeys && !l.predecessor && keyLength >= l.keySlots
        let selfModifiers = modifiers?.restricted(item: b, head: h)
        let rowStrides = { (width: Int, slots: Int) -> SIMD4<Int> in SIMD4(0, slots * width, width, 1) }
        // Consecutive blocks, one work item each: gather the item's rows (plus the previous
        // block's keys) into the worker's buffers, attend, and write the sorted outputs.
        parallelForEach(items: l.items, threads: min(threads, space.workers)) { item, worker in
            let local = space.itemSpace(worker, l)
            let firstBlock = item * l.itemBlocks, endBlock = min(l.blocks, firstBlock + l.itemBlocks)
            let queryStart = firstBlock * l.queryBlockSize, queryEnd = min(endBlock * l.queryBlockSize, qs)
            let queryCount = queryEnd - queryStart
            gather(space.queryPosition + queryStart, count: queryCount,
                   query, width: d, into: local.q, query, width: 0, into: nil)
            var keyCount = 0
            func takeKeys(_ start: Int, _ end: Int, padTo: Int) {
                for t in start..<end {
                    let position = Int(space.keyPosition[t])
                    let slot = keyCount + t - start
                    local.keyBlock[slot] = position < keyLength ? Int32(t / l.keyBlockSize) : -1
                    local.keyBucket[slot] = space.keyBucket[t]
                    local.keyPosition[slot] = Int32(position)
                }
                let count = end - start
                let keyRows = local.k + keyCount * d, valueRows = local.v + keyCount * dv
                if l.sharedKeys && start == queryStart && end == queryEnd {
                    // Shared keys mirror the query slots: the item's own keys are its queries.
                    keyRows.update(from: local.q, count: count * d)
                    gather(space.keyPosition + start, count: count,
                           value, width: dv, into: valueRows, value, width: 0, into: nil)
                } else {
                    gather(space.keyPosition + start, count: count,
                           l.sharedKeys ? query : key, width: d, into: keyRows, value, width: dv, into: valueRows)
                }
                if l.sharedKeys {
                    for r in 0..<count {
                        let keyRow = keyRows + r * d
                        let norm = dot(keyRow, 1, keyRow, 1, count: d).squareRoot()
                        let inverse: Float = norm > 0 ? 1 / norm : 0
                        for c in 0..<d { keyRow[c] *= inverse }
                    }
                }
                keyCount += count
                // Padding slots (a short previous block): invisible, with finite rows (and a
                // position, for the modifiers).
                while keyCount < padTo {
                    local.keyBlock[keyCount] = -1
                    local.keyPosition[keyCount] = 0
                    (local.k + keyCount * d).update(repeating: 0, count: d)
                    (local.v + keyCount * dv).update(repeating: 0, count: dv)
                    keyCount += 1
                }
            }
            if l.predecessor {
                let p = (firstBlock + l.blocks - 1) % l.blocks
                takeKeys(p * l.keyBlockSize, min((p + 1) * l.keyBlockSize, ks), padTo: l.keyBlockSize)
            }
            takeKeys(firstBlock * l.keyBlockSize, min(endBlock * l.keyBlockSize, ks), padTo: 0)
            let mask = PermutedBlockMask(
                queryBlock: space.queryBlock + queryStart, queryBucket: space.queryBucket + queryStart,
                queryPosition: space.queryPosition + queryStart, keyBlock: local.keyBlock, keyBucket: local.keyBucket,
                keyPosition: local.keyPosition, keySlots: keyCount, queryBlockSize: l.queryBlockSize,
                keyBlockSize: l.keyBlockSize, predecessorBlocks: l.predecessor ? 1 : 0, blocks: l.blocks,
                visibility: l.visibility, blocksOnly: blocksOnly)
            let itemO = space.o.map { $0 + queryStart * dv } ?? local.o
            let itemLse = space.lse.map { $0 + queryStart } ?? local.lse
            TiledSoftmaxAttention.run(
                shape: AttentionShape(batch: 1, heads: 1, queryLength: queryCount, keyLength: keyCount,
                                      headDim: d, valueDim: dv),
                scale: scale, threads: 1, queryTile: l.queryTile,
                q: TensorView(base: local.q, strides: rowStrides(d, queryCount)),
                k: TensorView(base: local.k, strides: rowStrides(d, keyCount)),
                v: TensorView(base: local.v, strides: rowStrides(dv, keyCount)),
                o: MutableTensorView(base: itemO, strides: rowStrides(dv, queryCount)),
                lse: MutableTensorView(base: itemLse, strides: rowStrides(1, queryCount)),
                modifiers: modifiers?.gathered(item: b, head: h, .init(queries: space.queryPosition + queryStart,
                                                                        keys: local.keyPosition))
            ) { _, _ in mask }
            guard l.combinesPerItem else { return }
            // Every query of the item holds exactly this one slot of the round (LSH): merge
            // the item's outputs into the output rows (distinct rows for distinct items).
            let positions = space.queryPosition + queryStart
            prefetchingAhead(count: queryCount, prefetch: { first, rows in
                prefetchRows(UnsafePointer(output.row(b, h, 0)), count: rows, rowStride: output.strides[2],
                             length: rowExtent(width: dv, elementStride: output.strides[3]), positions: positions + first, write: true)
                prefetchRows(UnsafePointer(lse.row(b, h, 0)), count: rows, rowStride: lse.strides[2], length: 1,
                             positions: positions + first, write: true)
            }) { r in
                let i = Int(positions[r])
                combineRow(l, round: round, i: i, o: itemO + r * dv, lse: itemLse + r, slots: nil, count: 1,
                           scale: scale, modifiers: selfModifiers, query: query, value: value, keyLength: keyLength,
                           out: output.row(b, h, i), outStride: output.strides[3], lse: lse.row(b, h, i))
            }
        }
        guard !l.combinesPerItem, let sortedO = space.o, let sortedLse = space.lse else { return }

        // The slots of every original query (counting sort by position: slots ascending).
        let n = l.queryLength
        space.memberStart.update(repeating: 0, count: n + 1)
        for slot in 0..<qs { space.memberStart[Int(space.queryPosition[slot]) + 1] += 1 }
        for i in 0..<n { space.memberStart[i + 1] += space.memberStart[i] }
        for slot in 0..<qs {
            let i = Int(space.queryPosition[slot])
            space.memberSlots[Int(space.memberStart[i])] = Int32(slot)
            space.memberStart[i] += 1
        }
        for i in stride(from: n, to: 0, by: -1) { space.memberStart[i] = space.memberStart[i - 1] }
        space.memberStart[0] = 0

        // Rows in original order (sequential output), the scattered sorted outputs of each
        // chunk of rows prefetched ahead.
        let rowsPerItem = 256
        parallelForEach(items: (n + rowsPerItem - 1) / rowsPerItem, threads: threads) { item, _ in
            let first = item * rowsPerItem
            prefetchingAhead(count: min(n, first + rowsPerItem) - first, prefetch: { start, rows in
                let slots = space.memberSlots + Int(space.memberStart[first + start])
                let count = Int(space.memberStart[first + start + rows] - space.memberStart[first + start])
                prefetchRows(sortedO, count: count, rowStride: dv, length: dv, positions: slots)
                prefetchRows(sortedLse, count: count, rowStride: 1, length: 1, positions: slots)
            }) { r in
                let i = first + r, start = Int(space.memberStart[i])
                combineRow(l, round: round, i: i, o: sortedO, lse: sortedLse, slots: space.memberSlots + start,
                           count: Int(space.memberStart[i + 1]) - start, scale: scale, modifiers: selfModifiers,
                           query: query, value: value,
                           keyLength: keyLength, out: output.row(b, h, i), outStride: output.strides[3],
                           lse: lse.row(b, h, i))
            }
        }
    }

    /// Combines the slots of original query `i`, `slots[0..<count]` (or the single slot 0
    /// when `slots` is `nil`) of the sorted outputs `o` (rows of `Dv`) and log-sum-exps
    /// `sortedLse`, into its output row (merging with the row of earlier rounds under
    /// `.logSumExp`).
    @inline(__always)
    static func combineRow(_ l: Layout, round: Int, i: Int, o: UnsafePointer<Float>, lse sortedLse: UnsafePointer<Float>,
                           slots: UnsafePointer<Int32>?, count: Int, scale: Float, modifiers: ScoreModifierKernel?,
                           query: Rows, value: Rows, keyLength: Int,
                           out: UnsafeMutablePointer<Float>, outStride: Int, lse: UnsafeMutablePointer<Float>) {
        let dv = l.valueDim
        @inline(__always) func slot(_ n: Int) -> Int { slots.map { Int($0[n]) } ?? n }
        let earlier = round > 0 ? lse[0] : -.infinity
        var m = earlier, used = 0
        for n in 0..<count where sortedLse[slot(n)] > -.infinity {
            m = max(m, sortedLse[slot(n)])
            used += 1
        }
        if round == 0 {
            for c in 0..<dv { out[c * outStride] = 0 }
        }
        guard m > -.infinity else {
            lse[0] = -.infinity
            if l.sharedKeys && round == l.rounds - 1 && i < keyLength {
                // The self rule: a query with no other visible key (none listed, or a −∞ bias
                // on each) attends to itself, in every round; unless a −∞ bias hides that
                // pair too (then it has no visible key at all: 0 and −∞).
                let score = selfRuleScore(i, scale: scale, modifiers: modifiers, query: query, headDim: l.headDim)
                guard score > -.infinity else { return }
                for c in 0..<dv { out[c * outStride] = value.element(i, c) }
                lse[0] = score + logf(Float(l.rounds))
            }
            return
        }
        guard used > 0, var rounds = LogSumExpMerge(maximum: m) else { return }   // nothing new: the earlier rounds' row stands
        let keep = earlier > -.infinity ? rounds.weight(earlier) : 0
        rounds.add(keep)
        for n in 0..<count where sortedLse[slot(n)] > -.infinity {
            rounds.add(rounds.weight(sortedLse[slot(n)]))
        }
        let logSumExp = l.combine == .logSumExp
        let normaliser = logSumExp ? 1 / rounds.total : 1 / Float(used)
        if earlier > -.infinity {
            // Rescale the earlier rounds' row even when `keep` underflowed to 0 (their
            // log-sum-exp more than ~88 below this round's): skipping it would leave them
            // weight 1.
            let factor = keep * normaliser
            if outStride == 1 {
                for c in 0..<dv { out[c] *= factor }
            } else {
                for c in 0..<dv { out[c * outStride] *= factor }
            }
        }
        for n in 0..<count {
            let slot = slot(n)
            guard sortedLse[slot] > -.infinity else { continue }
            let weight = logSumExp ? rounds.weight(sortedLse[slot]) * normaliser : normaliser
            let row = o + slot * dv
            axpy(weight, row, 1, out, outStride, count: dv)
        }
        lse[0] = logSumExp ? rounds.logSumExp : m + logf(rounds.total / Float(used))
    }

    /// The score of shared-QK LSH's self rule, `scale · q_i · q_i / |q_i| = scale · |q_i|`,
    /// then modified (`modifiers` restricted to the head; key `i`).
    static func selfRuleScore(_ i: Int, scale: Float, modifiers: ScoreModifierKernel?, query: Rows, headDim: Int) -> Float {
        let score = scale * query.squaredNorm(i, count: headDim).squareRoot()
        return modifiers?.modifiedScore(score, b: 0, h: 0, i: i, j: i) ?? score
    }

    /// `target[c · stride] += source[c]` for `c < count`: a gathered row's gradient added
    /// back to its original row (``LSHBackward``, ``ClusterBackward``).
    @inline(__always)
    static func add(_ source: UnsafePointer<Float>, to target: UnsafeMutablePointer<Float>, stride: Int, count: Int) {
        if stride == 1 {
            for c in 0..<count { target[c] += source[c] }
        } else {
            for c in 0..<count { target[c &* stride] += source[c] }
        }
    }
}
