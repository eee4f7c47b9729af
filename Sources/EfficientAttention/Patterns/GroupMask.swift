/// Visibility between grouped slots: the mask of content-based routing (LSH chunks,
/// k-means clusters) after queries and keys have been sorted into group order.
///
/// Queries and keys live in *slots* of one block of groups: query slot `s` holds the
/// original query `queryPosition[s]` of group `queryGroup[s]`; the block's query slots start
/// at a group boundary, groups of `queryGroupSize` slots. Key slots hold
/// `predecessorGroups` (0 or 1) groups of `keyGroupSize` slots before the keys of the
/// block's own groups (LSH's look-back chunk). Key slot `t` is visible to query slot `s` iff:
///
/// - `keyGroup[t] == queryGroup[s]`, or `lookBack` and `keyGroup[t] == previous(queryGroup[s])`
///   where `previous(0) = groups − 1` (LSH chunks attend to the previous chunk, wrapping);
///   a key slot with `keyGroup[t] == −1` (key padding, a short previous chunk) is never visible;
/// - `checkBuckets` is false or `keyBucket[t] == queryBucket[s]`;
/// - not causal, or `keyPosition[t] ≤ queryPosition[s] + causalOffset` (original positions);
/// - `excludeSelf` is false or `keyPosition[t] != queryPosition[s]` (shared-QK LSH).
///
/// Every per-slot array holds at least `slots + 16` entries (the kernel masks whole
/// 16-lane vectors). Pointers are borrowed from ``GroupedAttention``'s workspace.
struct GroupMask: TileMask {
    var queryGroup: UnsafePointer<Int32>
    var queryBucket: UnsafePointer<Int32>
    var queryPosition: UnsafePointer<Int32>
    var keyGroup: UnsafePointer<Int32>
    var keyBucket: UnsafePointer<Int32>
    var keyPosition: UnsafePointer<Int32>
    var keySlots: Int
    var queryGroupSize: Int
    var keyGroupSize: Int
    var predecessorGroups: Int
    var groups: Int
    var lookBack: Bool
    var checkBuckets: Bool
    /// `Nk − Nq` under the causal rule, `nil` without it.
    var causalOffset: Int?
    var excludeSelf: Bool
    /// True when nothing but the group decides visibility (no buckets, causal rule,
    /// self rule or padded keys): tiles of a single query group are then fully visible.
    var groupsOnly: Bool

    func forEachKeyTile(queries: PositionRun, tileSize: Int, _ body: (KeyTile) -> Void) {
        // Query slots come in contiguous tiles (the default partition).
        // Local groups first...last see key groups first...last + predecessorGroups.
        let first = queries.start / queryGroupSize, last = (queries.start + queries.count - 1) / queryGroupSize
        let full = groupsOnly && first == last
        var start = first * keyGroupSize
        let end = min((last + 1 + predecessorGroups) * keyGroupSize, keySlots)
        while start < end {
            let count = min(tileSize, end - start)
            body(KeyTile(keys: PositionRun(start: start, count: count), fullyVisible: full))
            start += count
        }
    }

    func maskScores(_ scores: UnsafeMutablePointer<Float>, ld: Int, tile: KeyTile, queries: PositionRun) {
        let keyStart = tile.keys.start, keyCount = tile.keys.count
        let queryStart = queries.start, queryCount = queries.count
        typealias Lanes = SIMD16<Int32>
        let minusInfinity = Vec16(repeating: -.infinity)
        let lastGroup = Lanes(repeating: Int32(groups - 1))
        let zero = Lanes(repeating: 0), one = Lanes(repeating: 1)
        let offset = Int32(clamping: causalOffset ?? 0)
        let causal = causalOffset != nil
        for jj in 0..<keyCount {
            let t = keyStart + jj
            let row = scores + jj * ld
            let group = keyGroup[t]
            guard group >= 0 else {
                var ii = 0
                while ii < queryCount { store16(minusInfinity, row + ii); ii += 16 }
                continue
            }
            let keyGroupLanes = Lanes(repeating: group)
            let bucket = Lanes(repeating: keyBucket[t])
            let position = keyPosition[t]
            let limit = Lanes(repeating: position &- offset)   // visible iff queryPosition ≥ limit
            let own = Lanes(repeating: position)
            var ii = 0
            while ii < queryCount {
                let s = queryStart + ii
                let queryGroups = UnsafeRawPointer(queryGroup + s).loadUnaligned(as: Lanes.self)
                var seen = queryGroups .== keyGroupLanes
                if lookBack {
                    var previous = queryGroups &- one
                    previous.replace(with: lastGroup, where: queryGroups .== zero)
                    seen = seen .| (previous .== keyGroupLanes)
                }
                if checkBuckets {
                    let buckets = UnsafeRawPointer(queryBucket + s).loadUnaligned(as: Lanes.self)
                    seen = seen .& (buckets .== bucket)
                }
                if causal || excludeSelf {
                    let positions = UnsafeRawPointer(queryPosition + s).loadUnaligned(as: Lanes.self)
                    if causal { seen = seen .& (positions .>= limit) }
                    if excludeSelf { seen = seen .& (positions .!= own) }
                }
                var v = load16(row + ii)
                v.replace(with: minusInfinity, where: .!seen)
                store16(v, row + ii)
                ii += 16
            }
        }
    }
}
