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
                var blocks: Set<Int>
                if global.contains(t) {
                    blocks = Set(0..<n)
                } else {
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
    static func drawRandomBlocks(heads: Int, blockCount n: Int, count: Int, globalBlocks: [Int],
                                 causal: Bool, generator: inout SeededGenerator) -> [[[Int]]] {
        let global = Set(globalBlocks)
        return (0..<heads).map { _ in
            (0..<n).map { t in
                if global.contains(t) { return [] }
                var candidates = (0..<(causal ? max(0, t - 1) : n)).filter { abs($0 - t) > 1 && !global.contains($0) }
                let take = min(count, candidates.count)
                for k in 0..<take {
                    candidates.swapAt(k, Int.random(in: k..<candidates.count, using: &generator))
                }
                return Array(candidates[0..<take]).sorted()
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

/// BigBird: query groups never straddle a block, so every query of a group sees the
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
