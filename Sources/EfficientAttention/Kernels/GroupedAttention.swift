/// The shared pipeline of content-based routing (``LSHAttention``, ``RoutingAttention``):
/// gather queries and keys into group order, run block-diagonal (plus look-back)
/// attention with the tiled softmax kernel, scatter back and combine.
///
/// For one head, round by round (`R` LSH hash rounds; one round for routing):
///
///     the conformer fills, for round r and every slot s, t:  queryPosition[s], queryBucket[s]
///                                                           keyPosition[t],   keyBucket[t]
///     per block of groups (about 1024 query slots; one work item each):
///         gather    Q̃[s] = q[queryPosition[s]] for the block's query slots, and
///                   K̃[t] = k[keyPosition[t]], Ṽ[t] = v[keyPosition[t]] for the keys of the
///                   group before the block (LSH look-back, padded to a whole group) and of
///                   the block's groups, into the worker's L2-sized buffers
///         attend    (Õ, l̃se)[block] = TiledSoftmaxAttention on the block with a GroupMask
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
/// outputs) plus about 1 MiB of gathered rows per block worker (see
/// ``workspaceBytes(_:heads:threads:bytesPerHead:)``); rounds merge into the output rows, so
/// memory does not grow with `R`.
enum GroupedAttention {
    /// How several results of one query combine.
    enum Combine {
        /// Exactly, by log-sum-exp (LSH rounds over the same query).
        case logSumExp
        /// The mean of the memberships with a visible key (routing clusters; one round).
        case mean
    }

    /// The slot layout and visibility rules of one head (the same for every head of a call).
    struct Layout {
        var rounds: Int
        var queryLength: Int
        var querySlots: Int
        var keySlots: Int
        var queryGroupSize: Int
        var keyGroupSize: Int
        var groups: Int
        var lookBack: Bool
        var checkBuckets: Bool
        var causalOffset: Int?
        /// Keys are the unit-normalised queries (shared-QK LSH): key slots mirror the query
        /// slots, `K̃` is normalised from `Q̃` (no second gather), and the self rule applies.
        var sharedKeys: Bool
        var combine: Combine
        var headDim: Int
        var valueDim: Int

        /// Query tiles matched to the groups (a tile of 64 queries for 64-slot chunks), keys
        /// in tiles of 64.
        var queryTile: Int {
            min(TiledSoftmaxAttention.Tiling.defaultQueryTile, max(MicroTile.nr, queryGroupSize))
        }

        /// Groups per block: a block's gathered rows (about 1024 query slots) stay in L2.
        var blockGroups: Int { max(1, 1024 / queryGroupSize) }
        var blocks: Int { (groups + blockGroups - 1) / blockGroups }
        /// Whether a block also holds the keys of the group before its first (LSH look-back;
        /// with one group, the previous group is the group itself).
        var predecessor: Bool { lookBack && groups > 1 }
        var blockQuerySlots: Int { blockGroups * queryGroupSize }
        var blockKeySlots: Int { (blockGroups + (predecessor ? 1 : 0)) * keyGroupSize }

        /// Every query holds exactly one slot per round and rounds merge by log-sum-exp (LSH):
        /// each block merges its outputs into the output rows right after attending, from
        /// the worker's buffer, so a round's sorted outputs are never stored whole.
        var combinesInBlocks: Bool { combine == .logSumExp && querySlots == queryLength }

        /// The kernel's problem for the largest block.
        var kernelShape: AttentionShape {
            AttentionShape(batch: 1, heads: 1, queryLength: min(blockQuerySlots, querySlots),
                           keyLength: blockKeySlots, headDim: headDim, valueDim: valueDim)
        }
    }

    /// Per-slot arrays are padded by this many entries (the mask reads 16-lane vectors).
    static let slotPadding = 32

    /// The last-level cache the head workers share (the tuning table, ``Tuning``).
    static let sharedCacheBytes = Tuning.current.sharedCacheBytes

    /// How `threads` split between heads and the blocks of one head: `outer` workers each
    /// take whole heads (the `heads` = B·H work items, one head's workspace per worker), and
    /// every head runs its phases on `inner` threads. Heads run side by side on one thread
    /// each (no synchronisation inside a head, every phase parallel) while the heads in
    /// flight, `bytesPerHead` each (``headBytes(_:keyLength:scratchBytes:)``), fit in the
    /// shared cache; otherwise (long sequences) fewer heads at a time, each on more threads,
    /// whose blocks are then plentiful. A head's result does not depend on `inner`, so the
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

    /// Bytes of one ``Workspace`` per head worker (see ``split(heads:threads:bytesPerHead:cacheBytes:)``;
    /// `heads` is B·H) plus the kernel's workspace of each of their block workers.
    static func workspaceBytes(_ layout: Layout, heads: Int, threads: Int?, bytesPerHead: Int,
                               cacheBytes: Int = sharedCacheBytes) -> Int {
        let (outer, inner) = split(heads: heads, threads: threads ?? defaultThreadCount, bytesPerHead: bytesPerHead,
                                   cacheBytes: cacheBytes)
        let workers = workerCount(threads: inner, items: layout.blocks)
        return outer * (Workspace.byteCount(layout, workers: workers)
            + workers * TiledSoftmaxAttention.workspaceBytes(shape: layout.kernelShape, threads: 1,
                                                             queryTile: layout.queryTile))
    }

    /// Runs `body(b, h, inner, space, scratch)` for every head `(b, h)`: heads are work
    /// items of `outer` workers (``split(heads:threads:bytesPerHead:cacheBytes:)``), each with its own
    /// ``Workspace`` and conformer scratch (`makeScratch(inner)`, released by `release`), and
    /// `body` runs the head's phases on `inner` threads.
    static func forEachHead<Scratch>(
        batch: Int, heads: Int, threads: Int, layout l: Layout, bytesPerHead: Int,
        cacheBytes: Int = sharedCacheBytes,
        makeScratch: (_ inner: Int) -> Scratch, release: (Scratch) -> Void,
        _ body: (_ b: Int, _ h: Int, _ inner: Int, _ space: Workspace, _ scratch: Scratch) -> Void
    ) {
        let (outer, inner) = split(heads: batch * heads, threads: threads, bytesPerHead: bytesPerHead,
                                   cacheBytes: cacheBytes)
        let spaces = (0..<outer).map { _ in Workspace(l, workers: workerCount(threads: inner, items: l.blocks)) }
        let scratches = (0..<outer).map { _ in makeScratch(inner) }
        defer {
            for space in spaces { space.deallocate() }
            for scratch in scratches { release(scratch) }
        }
        parallelForEach(items: batch * heads, threads: outer) { item, worker in
            body(item / heads, item % heads, inner, spaces[worker], scratches[worker])
        }
    }

    /// One head's slot arrays and sorted outputs, and each worker's gathered block, in one
    /// allocation reused for every head and round.
    struct Workspace {
        let queryPosition, queryBucket, queryGroup: UnsafeMutablePointer<Int32>
        let keyPosition, keyBucket: UnsafeMutablePointer<Int32>
        /// Slots of each original query: `memberSlots[memberStart[i] ..< memberStart[i + 1]]`.
        let memberStart, memberSlots: UnsafeMutablePointer<Int32>
        /// Sorted outputs `[querySlots][Dv]` and log-sum-exps; `nil` when the blocks combine
        /// their own outputs (``Layout/combinesInBlocks``: in each worker's ``Block``).
        let o, lse: UnsafeMutablePointer<Float>?
        let workers: Int
        private let blockInts, blockFloats, blockRows, blockOutputs: Int
        private let blockBase: UnsafeMutableRawPointer
        private let block: UnsafeMutableRawPointer

        private static func counts(_ l: Layout)
            -> (ints: Int, floats: Int, blockInts: Int, blockFloats: Int, blockRows: Int, blockOutputs: Int) {
            let qs = l.querySlots + slotPadding, ks = l.keySlots + slotPadding
            let ints = roundUp(3 * qs + 2 * ks + (l.queryLength + 1) + qs, 16)
            let floats = l.combinesInBlocks ? 0 : roundUp(l.querySlots * (l.valueDim + 1), 16)
            let blockInts = roundUp(3 * (l.blockKeySlots + slotPadding), 16)
            let blockRows = roundUp(l.blockQuerySlots * l.headDim + l.blockKeySlots * (l.headDim + l.valueDim), 16)
            let blockOutputs = l.combinesInBlocks ? roundUp(l.blockQuerySlots * l.valueDim, 16) : 0
            let blockFloats = blockRows + blockOutputs + (l.combinesInBlocks ? roundUp(l.blockQuerySlots, 16) : 0)
            return (ints, floats, blockInts, blockFloats, blockRows, blockOutputs)
        }

        static func byteCount(_ l: Layout, workers: Int) -> Int {
            let c = counts(l)
            return 4 * (c.ints + c.floats + workers * (c.blockInts + c.blockFloats))
        }

        init(_ l: Layout, workers: Int) {
            let c = Workspace.counts(l)
            self.workers = workers
            blockInts = c.blockInts
            blockFloats = c.blockFloats
            blockRows = c.blockRows
            blockOutputs = c.blockOutputs
            let bytes = Workspace.byteCount(l, workers: workers)
            block = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 64)
            let i = block.initializeMemory(as: Int32.self, repeating: 0, count: c.ints)
            let qs = l.querySlots + slotPadding, ks = l.keySlots + slotPadding
            queryPosition = i
            queryBucket = i + qs
            queryGroup = i + 2 * qs
            keyPosition = i + 3 * qs
            keyBucket = keyPosition + ks
            memberStart = keyPosition + 2 * ks
            memberSlots = memberStart + l.queryLength + 1
            // Query groups depend on the slot only: the same for every head and round.
            for s in 0..<l.querySlots { queryGroup[s] = Int32(s / l.queryGroupSize) }
            let sorted = (block + 4 * c.ints).initializeMemory(as: Float.self, repeating: 0, count: c.floats)
            o = l.combinesInBlocks ? nil : sorted
            lse = l.combinesInBlocks ? nil : sorted + l.querySlots * l.valueDim
            blockBase = block + 4 * (c.ints + c.floats)
            blockBase.initializeMemory(as: Float.self, repeating: 0, count: workers * (c.blockInts + c.blockFloats))
        }

        /// Worker `worker`'s block.
        func blockSpace(_ worker: Int, _ l: Layout) -> Block {
            let base = blockBase + 4 * worker * (blockInts + blockFloats)
            let ints = base.assumingMemoryBound(to: Int32.self)
            let keys = l.blockKeySlots + slotPadding
            let q = (base + 4 * blockInts).assumingMemoryBound(to: Float.self)
            let k = q + l.blockQuerySlots * l.headDim
            let o = q + blockRows
            return Block(keyGroup: ints, keyBucket: ints + keys, keyPosition: ints + 2 * keys,
                         q: q, k: k, v: k + l.blockKeySlots * l.headDim, o: o, lse: o + blockOutputs)
        }

        func deallocate() { block.deallocate() }
    }

    /// One worker's gathered block: key slot arrays (group, bucket, position), rows q, k, v
    /// and, when ``Layout/combinesInBlocks``, the block's outputs and log-sum-exps.
    struct Block {
        let keyGroup, keyBucket, keyPosition: UnsafeMutablePointer<Int32>
        let q, k, v, o, lse: UnsafeMutablePointer<Float>
    }

    /// Rows of one head of a tensor: `row(i)` is position `i`.
    struct Rows {
        var view: TensorView
        var b: Int
        var h: Int
        @inline(__always) func row(_ i: Int) -> UnsafePointer<Float> { view.row(b, h, i) }
        var elementStride: Int { view.strides[3] }

        /// Prefetches rows `positions[0..<count]`, `width` elements each
        /// (``prefetchRows(_:count:rowStride:length:positions:write:)``).
        @inline(__always)
        func prefetch(_ positions: UnsafePointer<Int32>, count: Int, width: Int) {
            prefetchRows(row(0), count: count, rowStride: view.strides[2], length: rowExtent(width: width, elementStride: elementStride),
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
            copyRow(a.row(position), a.elementStride, to: aOut + r * aWidth, count: aWidth)
            if let bOut { copyRow(b.row(position), b.elementStride, to: bOut + r * bWidth, count: bWidth) }
        }
    }

    /// Attends round `round` of one head once the conformer has filled `space`'s positions
    /// and buckets for it, and combines it into rows `0..<queryLength` of `output` and `lse`
    /// (head `b`, `h`); rounds must come in order `0, 1, ...`.
    ///
    /// - Parameters:
    ///   - keyLength: keys at original positions `>= keyLength` are invisible (padding).
    static func attendRound(
        _ l: Layout, round: Int, space: Workspace, scale: Float, threads: Int,
        query: Rows, key: Rows, value: Rows, keyLength: Int,
        output: MutableTensorView, lse: MutableTensorView, b: Int, h: Int
    ) {
        precondition(l.combine == .logSumExp || l.rounds == 1, "the mean combines a single round")
        let d = l.headDim, dv = l.valueDim
        let qs = l.querySlots, ks = l.keySlots
        let groupsOnly = !l.checkBuckets && l.causalOffset == nil && !l.sharedKeys && !l.predecessor
            && keyLength >= l.keySlots
        let rowStrides = { (width: Int, slots: Int) in [0, slots * width, width, 1] }
        // Blocks of groups, one per work item: gather the block's rows (plus the previous
        // group's keys) into the worker's buffers, attend, and write the sorted outputs.
        parallelForEach(items: l.blocks, threads: min(threads, space.workers)) { blockIndex, worker in
            let local = space.blockSpace(worker, l)
            let g0 = blockIndex * l.blockGroups, g1 = min(l.groups, g0 + l.blockGroups)
            let queryStart = g0 * l.queryGroupSize, queryEnd = min(g1 * l.queryGroupSize, qs)
            let queryCount = queryEnd - queryStart
            gather(space.queryPosition + queryStart, count: queryCount,
                   query, width: d, into: local.q, query, width: 0, into: nil)
            var keyCount = 0
            func takeKeys(_ start: Int, _ end: Int, padTo: Int) {
                for t in start..<end {
                    let position = Int(space.keyPosition[t])
                    let slot = keyCount + t - start
                    local.keyGroup[slot] = position < keyLength ? Int32(t / l.keyGroupSize) : -1
                    local.keyBucket[slot] = space.keyBucket[t]
                    local.keyPosition[slot] = Int32(position)
                }
                let count = end - start
                let keyRows = local.k + keyCount * d, valueRows = local.v + keyCount * dv
                if l.sharedKeys && start == queryStart && end == queryEnd {
                    // Shared keys mirror the query slots: the block's own keys are its queries.
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
                // Padding slots (a short previous group): invisible, with finite rows.
                while keyCount < padTo {
                    local.keyGroup[keyCount] = -1
                    (local.k + keyCount * d).update(repeating: 0, count: d)
                    (local.v + keyCount * dv).update(repeating: 0, count: dv)
                    keyCount += 1
                }
            }
            if l.predecessor {
                let p = (g0 + l.groups - 1) % l.groups
                takeKeys(p * l.keyGroupSize, min((p + 1) * l.keyGroupSize, ks), padTo: l.keyGroupSize)
            }
            takeKeys(g0 * l.keyGroupSize, min(g1 * l.keyGroupSize, ks), padTo: 0)
            let mask = GroupMask(queryGroup: space.queryGroup + queryStart, queryBucket: space.queryBucket + queryStart,
                                 queryPosition: space.queryPosition + queryStart,
                                 keyGroup: local.keyGroup, keyBucket: local.keyBucket,
                                 keyPosition: local.keyPosition, keySlots: keyCount,
                                 queryGroupSize: l.queryGroupSize, keyGroupSize: l.keyGroupSize,
                                 predecessorGroups: l.predecessor ? 1 : 0, groups: l.groups,
                                 lookBack: l.lookBack, checkBuckets: l.checkBuckets, causalOffset: l.causalOffset,
                                 excludeSelf: l.sharedKeys, groupsOnly: groupsOnly)
            let blockO = space.o.map { $0 + queryStart * dv } ?? local.o
            let blockLse = space.lse.map { $0 + queryStart } ?? local.lse
            TiledSoftmaxAttention.run(
                shape: AttentionShape(batch: 1, heads: 1, queryLength: queryCount, keyLength: keyCount,
                                      headDim: d, valueDim: dv),
                scale: scale, threads: 1, queryTile: l.queryTile,
                q: TensorView(base: local.q, strides: rowStrides(d, queryCount)),
                k: TensorView(base: local.k, strides: rowStrides(d, keyCount)),
                v: TensorView(base: local.v, strides: rowStrides(dv, keyCount)),
                o: MutableTensorView(base: blockO, strides: rowStrides(dv, queryCount)),
                lse: MutableTensorView(base: blockLse, strides: rowStrides(1, queryCount))
            ) { _, _ in mask }
            guard l.combinesInBlocks else { return }
            // Every query of the block holds exactly this one slot of the round (LSH): merge
            // the block's outputs into the output rows (distinct rows for distinct blocks).
            let positions = space.queryPosition + queryStart
            prefetchingAhead(count: queryCount, prefetch: { first, rows in
                prefetchRows(UnsafePointer(output.row(b, h, 0)), count: rows, rowStride: output.strides[2],
                             length: rowExtent(width: dv, elementStride: output.strides[3]), positions: positions + first, write: true)
                prefetchRows(UnsafePointer(lse.row(b, h, 0)), count: rows, rowStride: lse.strides[2], length: 1,
                             positions: positions + first, write: true)
            }) { r in
                let i = Int(positions[r])
                combineRow(l, round: round, i: i, o: blockO + r * dv, lse: blockLse + r, slots: nil, count: 1,
                           scale: scale, query: query, value: value, keyLength: keyLength,
                           out: output.row(b, h, i), outStride: output.strides[3], lse: lse.row(b, h, i))
            }
        }
        guard !l.combinesInBlocks, let sortedO = space.o, let sortedLse = space.lse else { return }

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
                           count: Int(space.memberStart[i + 1]) - start, scale: scale, query: query, value: value,
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
                           slots: UnsafePointer<Int32>?, count: Int, scale: Float,
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
                // The self rule: a query with no other visible key attends to itself, in every round.
                let v = value.row(i)
                for c in 0..<dv { out[c * outStride] = v[c * value.elementStride] }
                let q = query.row(i), qs = query.elementStride
                let score = scale * dot(q, qs, q, qs, count: l.headDim).squareRoot()
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
            if outStride == 1 {
                axpy(weight, row, 1, out, count: dv)
            } else {
                LogSumExpMerge.accumulate(weight, row, into: out, stride: outStride, count: dv)
            }
        }
        lse[0] = logSumExp ? rounds.logSumExp : m + logf(rounds.total / Float(used))
    }

    @inline(__always)
    static func copyRow(_ source: UnsafePointer<Float>, _ stride: Int, to target: UnsafeMutablePointer<Float>,
                        count: Int) {
        if stride == 1 {
            var c = 0
            while c + 16 <= count {
                store16(load16(source + c), target + c)
                c += 16
            }
            while c < count { target[c] = source[c]; c += 1 }
        } else {
            for c in 0..<count { target[c] = source[c * stride] }
        }
    }
}
