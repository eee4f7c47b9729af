/// The BigBird ITC pattern (Zaheer et al. 2020) for one problem size: positions in
/// blocks of `b` (the last one possibly short), query `i` at position
/// `p = i + Nk − Nq` in query block `t = ⌊p / b⌋`.
///
/// Query block `t` sees key blocks `t − 1, t, t + 1` (window), the global blocks, and
/// its random blocks; a global query block sees every key block. With `causal` the
/// causal rule `j ≤ p` applies on top (random blocks are then drawn from the past).
public struct BigBirdPattern: AttentionPattern {
    public let blockSize: Int
    /// Sorted global block indices.
    public let globalBlocks: [Int]
    /// `randomBlocks[h][t]`: the random key blocks of query block `t` in head `h`.
    public let randomBlocks: [[[Int]]]
    public let causal: Bool
    public let queryLength: Int
    public let keyLength: Int
    public var heads: Int { randomBlocks.count }

    /// `keyBlockRanges[h][t]`: the key positions of query block `t`, as sorted disjoint
    /// ranges (adjacent blocks merged), before the causal rule.
    let keyBlockRanges: [[[Range<Int>]]]

    /// The number of blocks, `⌈Nk / b⌉`.
    public var blockCount: Int { ceilDiv(keyLength, blockSize) }

    init(blockSize: Int, globalBlocks: [Int], randomBlocks: [[[Int]]], causal: Bool,
         queryLength: Int, keyLength: Int) {
        self.blockSize = blockSize
        self.globalBlocks = Array(Set(globalBlocks)).sorted()
        self.randomBlocks = randomBlocks
        self.causal = causal
        self.queryLength = queryLength
        self.keyLength = keyLength
        let n = ceilDiv(keyLength, blockSize)
        let global = Set(globalBlocks)
        keyBlockRanges = randomBlocks.map { perBlock in
            (0..<n).map { t in
                // A global query block sees every key: one range (what merging all n blocks gives).
                if global.contains(t) { return [0..<keyLength] }
                var blocks: Set<Int>
                do {
                    blocks = Set([t - 1, t, t + 1].filter { $0 >= 0 && $0 < n }).union(global).union(perBlock[t])
                }
                var ranges: [Range<Int>] = []
                for block in blocks.sorted() {
                    let range = (block * blockSize)..<min(keyLength, (block + 1) * blockSize)
                    if let last = ranges.last, last.upperBound == range.lowerBound {
                        ranges[ranges.count - 1] = last.lowerBound..<range.upperBound
                    } else {
                        ranges.append(range)
                    }
                }
                return ranges
            }
        }
    }

    /// Draws `count` random blocks per head and query block from `generator`: for block
    /// `t`, uniformly without replacement among the blocks outside its window and the
    /// global set (causal: only blocks before `t − 1`); fewer when fewer exist.
    ///
    /// The draw is a partial Fisher-Yates shuffle of the ascending candidate list: step `k`
    /// swaps entry `k` with a uniform entry of `k..<candidates`. The list is never built:
    /// entry `i` is the `i`-th block not excluded (found by binary search over the sorted
    /// global blocks and the window), and only the entries a swap moved are stored.
    ///
    /// - Complexity: O(H · n · (r · log² n + log G)) time for `n` blocks, `r = count`, `G`
    ///   global blocks; O(r) memory besides the result.
    static func drawRandomBlocks(heads: Int, blockCount n: Int, count: Int, globalBlocks: [Int],
                                 causal: Bool, generator: inout SeededGenerator) -> [[[Int]]] {
        let global = Array(Set(globalBlocks)).sorted()
        let globalSet = Set(global)
        return (0..<heads).map { _ in
            (0..<n).map { t in
                if globalSet.contains(t) { return [] }
                let candidates = RandomBlockCandidates(limit: causal ? max(0, t - 1) : n, window: t, global: global)
                let take = min(count, candidates.count)
                var moved: [Int: Int] = [:]   // entries of the virtual list changed by swaps
                for k in 0..<take {
                    let j = Int.random(in: k..<candidates.count, using: &generator)
                    let atK = moved[k] ?? candidates.block(k), atJ = moved[j] ?? candidates.block(j)
                    moved[k] = atJ
                    moved[j] = atK
                }
                return (0..<take).map { moved[$0]! }.sorted()
            }
        }
    }

    var offset: Int { keyLength - queryLength }

    public func isVisible(head: Int, query: Int, key j: Int) -> Bool {
        let p = query + offset
        guard j >= 0, j < keyLength, !causal || j <= p else { return false }
        let t = p / blockSize, s = j / blockSize
        return globalBlocks.contains(t) || globalBlocks.contains(s) || abs(s - t) <= 1
            || randomBlocks[head][t].contains(s)
    }

    public func visibleKeyCount(head: Int, query: Int) -> Int {
        let p = query + offset
        let end = causal ? p + 1 : keyLength
        return keyBlockRanges[head][p / blockSize].reduce(0) { $0 + max(0, min($1.upperBound, end) - $1.lowerBound) }
    }

    /// The kernel's mask for head `head` of a batch item with `keyEnd` valid keys.
    func mask(head: Int, keyEnd: Int) -> BigBirdMask {
        BigBirdMask(blockSize: blockSize, ranges: keyBlockRanges[head], causal: causal, offset: offset, keyEnd: keyEnd)
    }

    public func tiles(head: Int) -> [PatternTile] {
        patternTiles(mask(head: head, keyEnd: keyLength), pass: 0, queryLength: queryLength,
                     queryTile: TiledSoftmaxAttention.Tiling.defaultQueryTile)
    }
}

/// BigBird: query tiles never straddle a block, so every query of a tile sees the
/// same key blocks (merged into runs, cut into tiles): all tiles are fully visible but
/// those on the causal diagonal. Global query blocks list every key tile, as dense does.
struct BigBirdMask: TileMask {
    var blockSize: Int
    var ranges: [[Range<Int>]]
    var causal: Bool
    var offset: Int
    var keyEnd: Int

    var queryPartition: QueryPartition { .blocks(size: blockSize, origin: offset) }

    func forEachKeyTile(queries: PositionRun, tileSize: Int, _ body: (KeyTile) -> Void) {
        let firstP = queries.start + offset, lastP = queries.last + offset
        for range in ranges[firstP / blockSize] {
            let last = min(range.upperBound - 1, keyEnd - 1, causal ? lastP : Int.max)
            forEachTile(from: range.lowerBound, through: last, tileSize: tileSize) { keys in
                body(KeyTile(keys: keys, fullyVisible: !causal || keys.last <= firstP))
            }
        }
    }

    func maskScores(_ scores: UnsafeMutablePointer<Float>, ld: Int, tile: KeyTile, queries: PositionRun) {
        maskCausalDiagonal(scores, ld: ld, keys: tile.keys, queries: queries, offset: offset)
    }
}

/// The ascending list of blocks in `0..<limit` outside the window `window − 1 ... window + 1`
/// and the global blocks, without building it: ``count`` and the ``block(_:)`` at an index.
struct RandomBlockCandidates {
    let limit: Int
    let window: Int
    /// Sorted, distinct.
    let global: [Int]

    /// Candidates.
    ///
    /// - Complexity: O(log G).
    var count: Int { limit - excluded(through: limit - 1) }

    /// Excluded blocks in `0...b` (global or in the window, counted once).
    ///
    /// - Complexity: O(log G).
    func excluded(through b: Int) -> Int {
        guard b >= 0 else { return 0 }
        var lo = 0, hi = global.count           // global blocks <= b: the first index above b
        while lo < hi {
            let mid = (lo + hi) / 2
            if global[mid] <= b { lo = mid + 1 } else { hi = mid }
        }
        var total = lo
        for w in (window - 1)...(window + 1) where w >= 0 && w <= b && w < limit && !isGlobal(w) {
            total += 1
        }
        return total
    }

    private func isGlobal(_ b: Int) -> Bool {
        var lo = 0, hi = global.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if global[mid] < b { lo = mid + 1 } else { hi = mid }
        }
        return lo < global.count && global[lo] == b
    }

    /// The candidate at `index` (`0..<count`): the smallest `b` with `index + 1` candidates
    /// in `0...b`.
    ///
    /// - Complexity: O(log n · log G).
    func block(_ index: Int) -> Int {
        var lo = index, hi = limit - 1
        while lo < hi {
            let mid = (lo + hi) / 2
            if mid + 1 - excluded(through: mid) >= index + 1 { hi = mid } else { lo = mid + 1 }
        }
        return lo
    }
}
