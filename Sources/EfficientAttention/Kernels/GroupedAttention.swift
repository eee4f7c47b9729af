/// The shared pipeline of content-based routing (``LSHAttention``, ``RoutingAttention``):
/// gather queries and keys into group order, run block-diagonal (plus look-back)
/// attention with the tiled softmax kernel, scatter back and combine.
///
/// For one head, with `R` rounds (LSH hash rounds; 1 for routing):
///
///     the conformer fills, per round r and slot s:   queryPosition[r][s], queryBucket[r][s]
///                                                   keyPosition[r][t],   keyBucket[r][t]
///     gather:   Q̃[r][s] = q[queryPosition[r][s]],  K̃[r][t] = k[keyPosition[r][t]],  Ṽ likewise
///     attend:   (Õ[r], l̃se[r]) = TiledSoftmaxAttention over the rounds as heads, GroupMask
///     combine, for each original query i over the slots (r, s) holding i:
///         .logSumExp:  lse_i = log Σ exp(l̃se[r][s]),  o_i = Σ exp(l̃se[r][s] − lse_i) Õ[r][s]
///         .mean:       o_i = mean of Õ[r][s] over the slots with a visible key,
///                      lse_i = log mean exp(l̃se[r][s]) over the same slots
///     rows with no slot, or no visible key in any slot: 0 and −∞, except that with
///     `excludeSelf` a query whose key is valid falls back to itself (the self rule):
///         o_i = v_i,  lse_i = scale · q_i·k_i + log R
///
/// Workspace: O(R · (Nq + Nk) · (D + Dv)) per call, one head at a time (see ``workspaceBytes``).
enum GroupedAttention {
    /// How several results of one query combine.
    enum Combine {
        /// Exactly, by log-sum-exp (LSH rounds over the same query).
        case logSumExp
        /// The mean of the memberships with a visible key (routing clusters).
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
        var excludeSelf: Bool
        var combine: Combine
        var headDim: Int
        var valueDim: Int

        /// Query tiles matched to the groups (a tile of 64 queries for 64-slot chunks), keys
        /// in tiles of 64.
        var tiling: TiledSoftmaxAttention.Tiling {
            TiledSoftmaxAttention.Tiling(queryTile: min(128, max(32, queryGroupSize)), keyTile: 64)
        }

        /// The kernel's problem: the rounds as heads over sorted slots.
        var kernelShape: AttentionShape {
            AttentionShape(batch: 1, heads: rounds, kvHeads: rounds, queryLength: querySlots,
                           keyLength: keySlots, headDim: headDim, valueDim: valueDim)
        }
    }

    /// Per-slot arrays are padded by this many entries (the mask reads 16-lane vectors).
    static let slotPadding = 32

    /// Bytes of ``Workspace`` plus the kernel's workspace for `layout` with `threads`.
    static func workspaceBytes(_ layout: Layout, threads: Int?) -> Int {
        Workspace.byteCount(layout)
            + TiledSoftmaxAttention.workspaceBytes(shape: layout.kernelShape, threads: threads,
                                                   tiling: layout.tiling)
    }

    /// One head's sorted rows and slot arrays, in one allocation reused for every head.
    struct Workspace {
        let queryPosition, queryBucket, queryGroup: UnsafeMutablePointer<Int32>
        let keyPosition, keyBucket, keyGroup: UnsafeMutablePointer<Int32>
        /// Slots of each original query: `memberSlots[memberStart[i] ..< memberStart[i + 1]]`.
        let memberStart, memberSlots: UnsafeMutablePointer<Int32>
        let q, k, v, o, lse: UnsafeMutablePointer<Float>
        private let block: UnsafeMutableRawPointer

        private static func counts(_ l: Layout) -> (ints: Int, floats: Int) {
            let qs = l.rounds * l.querySlots + slotPadding, ks = l.rounds * l.keySlots + slotPadding
            let ints = 3 * qs + 3 * ks + (l.queryLength + 1) + qs
            let floats = l.rounds * (l.querySlots * (l.headDim + l.valueDim + 1)
                                     + l.keySlots * (l.headDim + l.valueDim))
            return (roundUp(ints, 16), floats)
        }

        static func byteCount(_ l: Layout) -> Int {
            let (ints, floats) = counts(l)
            return 4 * (ints + floats)
        }

        init(_ l: Layout) {
            let (ints, floats) = Workspace.counts(l)
            block = UnsafeMutableRawPointer.allocate(byteCount: 4 * (ints + floats), alignment: 64)
            let i = block.initializeMemory(as: Int32.self, repeating: 0, count: ints)
            let qs = l.rounds * l.querySlots + slotPadding, ks = l.rounds * l.keySlots + slotPadding
            queryPosition = i
            queryBucket = i + qs
            queryGroup = i + 2 * qs
            keyPosition = i + 3 * qs
            keyBucket = keyPosition + ks
            keyGroup = keyPosition + 2 * ks
            memberStart = keyPosition + 3 * ks
            memberSlots = memberStart + l.queryLength + 1
            let f = (block + 4 * ints).initializeMemory(as: Float.self, repeating: 0, count: floats)
            q = f
            k = q + l.rounds * l.querySlots * l.headDim
            v = k + l.rounds * l.keySlots * l.headDim
            o = v + l.rounds * l.keySlots * l.valueDim
            lse = o + l.rounds * l.querySlots * l.valueDim
        }

        func deallocate() { block.deallocate() }
    }

    /// Rows of one head of a tensor: `row(i)` is position `i`.
    struct Rows {
        var view: TensorView
        var b: Int
        var h: Int
        @inline(__always) func row(_ i: Int) -> UnsafePointer<Float> { view.row(b, h, i) }
        var elementStride: Int { view.strides[3] }
    }

    /// Attends one head once the conformer has filled `space`'s positions and buckets for
    /// every round, writing rows `0..<queryLength` of `output` and `lse` (head `b`, `h`).
    ///
    /// - Parameters:
    ///   - keyLength: keys at original positions `>= keyLength` are invisible (padding).
    static func attendHead(
        _ l: Layout, space: Workspace, scale: Float, threads: Int,
        query: Rows, key: Rows, value: Rows, keyLength: Int,
        output: MutableTensorView, lse: MutableTensorView, b: Int, h: Int
    ) {
        let d = l.headDim, dv = l.valueDim
        let qs = l.querySlots, ks = l.keySlots
        // Groups and key validity per slot; gather rows into slot order.
        let chunk = 512
        let queryBlocks = (qs + chunk - 1) / chunk, keyBlocks = (ks + chunk - 1) / chunk
        parallelForEach(items: l.rounds * (queryBlocks + keyBlocks), threads: threads) { item, _ in
            let r = item / (queryBlocks + keyBlocks), block = item % (queryBlocks + keyBlocks)
            if block < queryBlocks {
                for s in block * chunk ..< min(qs, (block + 1) * chunk) {
                    let slot = r * qs + s
                    space.queryGroup[slot] = Int32(s / l.queryGroupSize)
                    copyRow(query.row(Int(space.queryPosition[slot])), query.elementStride,
                            to: space.q + slot * d, count: d)
                }
            } else {
                let kb = block - queryBlocks
                for t in kb * chunk ..< min(ks, (kb + 1) * chunk) {
                    let slot = r * ks + t
                    let position = Int(space.keyPosition[slot])
                    space.keyGroup[slot] = position < keyLength ? Int32(t / l.keyGroupSize) : -1
                    copyRow(key.row(position), key.elementStride, to: space.k + slot * d, count: d)
                    copyRow(value.row(position), value.elementStride, to: space.v + slot * dv, count: dv)
                }
            }
        }

        let groupsOnly = !l.checkBuckets && l.causalOffset == nil && !l.excludeSelf && keyLength >= l.keySlots
        let rowStrides = { (width: Int, slots: Int) in [0, slots * width, width, 1] }
        TiledSoftmaxAttention.run(
            shape: l.kernelShape, scale: scale, threads: threads, tiling: l.tiling,
            q: TensorView(base: space.q, strides: rowStrides(d, qs)),
            k: TensorView(base: space.k, strides: rowStrides(d, ks)),
            v: TensorView(base: space.v, strides: rowStrides(dv, ks)),
            o: MutableTensorView(base: space.o, strides: rowStrides(dv, qs)),
            lse: MutableTensorView(base: space.lse, strides: rowStrides(1, qs))
        ) { _, r in
            GroupMask(queryGroup: space.queryGroup + r * qs, queryBucket: space.queryBucket + r * qs,
                      queryPosition: space.queryPosition + r * qs,
                      keyGroup: space.keyGroup + r * ks, keyBucket: space.keyBucket + r * ks,
                      keyPosition: space.keyPosition + r * ks, keySlots: ks,
                      queryGroupSize: l.queryGroupSize, keyGroupSize: l.keyGroupSize, groups: l.groups,
                      lookBack: l.lookBack, checkBuckets: l.checkBuckets, causalOffset: l.causalOffset,
                      excludeSelf: l.excludeSelf, groupsOnly: groupsOnly)
        }

        // The slots of every original query (counting sort by position: slots ascending).
        let n = l.queryLength
        space.memberStart.update(repeating: 0, count: n + 1)
        for slot in 0..<(l.rounds * qs) { space.memberStart[Int(space.queryPosition[slot]) + 1] += 1 }
        for i in 0..<n { space.memberStart[i + 1] += space.memberStart[i] }
        for slot in 0..<(l.rounds * qs) {
            let i = Int(space.queryPosition[slot])
            space.memberSlots[Int(space.memberStart[i])] = Int32(slot)
            space.memberStart[i] += 1
        }
        for i in stride(from: n, to: 0, by: -1) { space.memberStart[i] = space.memberStart[i - 1] }
        space.memberStart[0] = 0

        let rowsPerItem = 256
        parallelForEach(items: (n + rowsPerItem - 1) / rowsPerItem, threads: threads) { item, _ in
            for i in item * rowsPerItem ..< min(n, (item + 1) * rowsPerItem) {
                combineRow(l, space: space, i: i, scale: scale, query: query, key: key, value: value,
                           keyLength: keyLength, out: output.row(b, h, i), outStride: output.strides[3],
                           lse: lse.row(b, h, i))
            }
        }
    }

    /// Combines the slots of original query `i` into its output row.
    @inline(__always)
    static func combineRow(_ l: Layout, space: Workspace, i: Int, scale: Float,
                           query: Rows, key: Rows, value: Rows, keyLength: Int,
                           out: UnsafeMutablePointer<Float>, outStride: Int, lse: UnsafeMutablePointer<Float>) {
        let dv = l.valueDim
        let slots = space.memberSlots + Int(space.memberStart[i])
        let count = Int(space.memberStart[i + 1] - space.memberStart[i])
        var m = -Float.infinity, used = 0
        for n in 0..<count where space.lse[Int(slots[n])] > -.infinity {
            m = max(m, space.lse[Int(slots[n])])
            used += 1
        }
        for c in 0..<dv { out[c * outStride] = 0 }
        guard used > 0 else {
            if l.excludeSelf && i < keyLength {
                // The self rule: a query with no other visible key attends to itself, in every round.
                let v = value.row(i)
                for c in 0..<dv { out[c * outStride] = v[c * value.elementStride] }
                let score = scale * dot(query.row(i), query.elementStride, key.row(i), key.elementStride,
                                        count: l.headDim)
                lse[0] = score + logf(Float(l.rounds))
            } else {
                lse[0] = -.infinity
            }
            return
        }
        var total: Float = 0
        for n in 0..<count {
            let slot = Int(slots[n])
            let weight = space.lse[slot] > -.infinity ? expf(space.lse[slot] - m) : 0
            total += weight
        }
        let normaliser = l.combine == .logSumExp ? 1 / total : 1 / Float(used)
        for n in 0..<count {
            let slot = Int(slots[n])
            guard space.lse[slot] > -.infinity else { continue }
            let weight = l.combine == .logSumExp ? expf(space.lse[slot] - m) * normaliser : normaliser
            let row = space.o + slot * dv
            for c in 0..<dv { out[c * outStride] += weight * row[c] }
        }
        lse[0] = l.combine == .logSumExp ? m + logf(total) : m + logf(total / Float(used))
    }

    @inline(__always)
    static func copyRow(_ source: UnsafePointer<Float>, _ stride: Int, to target: UnsafeMutablePointer<Float>,
                        count: Int) {
        if stride == 1 {
            target.update(from: source, count: count)
        } else {
            for c in 0..<count { target[c] = source[c * stride] }
        }
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
