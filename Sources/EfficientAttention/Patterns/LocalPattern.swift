/// The local attention pattern (sliding window or blocked) for one problem size.
///
/// - Sliding window `(left, right)`: key `j` is visible to query `i` (position
///   `p = i + Nk − Nq`) iff `p − left ≤ j ≤ p + right`; causal uses `min(right, 0)`.
/// - Blocked, block size `b`: query `i` in block `t = ⌊p / b⌋` sees the keys of blocks
///   `t − lookBackward … t + lookForward`; causal also requires `j ≤ p`.
///
/// The same pattern for every head.
public struct LocalPattern: AttentionPattern {
    public let form: LocalAttention.Form
    public let causal: Bool
    public let queryLength: Int
    public let keyLength: Int
    public var heads: Int { 1 }

    /// The pattern for `queryLength` queries and `keyLength` keys. Throws what
    /// ``LocalAttention/validate(_:)`` throws for these lengths (block size at least 1,
    /// window sides and lengths at most ``lengthLimit``).
    public init(form: LocalAttention.Form, causal: Bool, queryLength: Int, keyLength: Int) throws {
        try LocalAttention(form: form, causal: causal)
            .validate(AttentionShape(heads: 1, queryLength: queryLength, keyLength: keyLength, headDim: 1))
        self.form = form
        self.causal = causal
        self.queryLength = queryLength
        self.keyLength = keyLength
    }

    var offset: Int { keyLength - queryLength }

    /// The keys of query `i` before clipping to `0..<Nk`: always one interval.
    func interval(query i: Int) -> ClosedRange<Int> {
        let p = i + offset
        switch form {
        case .slidingWindow(let left, let right):
            return (p - left)...(p + (causal ? min(right, 0) : right))
        case .blocked(let size, let backward, let forward):
            let t = floorDiv(p, size)
            return ((t - backward) * size)...min((t + forward + 1) * size - 1, causal ? p : Int.max)
        }
    }

    public func isVisible(head: Int, query: Int, key: Int) -> Bool {
        interval(query: query).contains(key)
    }

    public func visibleKeyCount(head: Int, query: Int) -> Int {
        let r = interval(query: query)
        return max(0, min(keyLength - 1, r.upperBound) - max(0, r.lowerBound) + 1)
    }

    /// The query tile the kernel uses for this pattern.
    var queryTile: Int {
        switch form {
        case .slidingWindow(let left, let right):
            return TiledSoftmaxAttention.Tiling.queryTile(
                forBandWidth: min(keyLength, left + (causal ? min(right, 0) : right) + 1))
        case .blocked:
            return TiledSoftmaxAttention.Tiling.defaultQueryTile
        }
    }

    /// The kernel's mask for a batch item with `keyEnd` valid keys.
    func mask(keyEnd: Int) -> LocalMask {
        switch form {
        case .slidingWindow(let left, let right):
            return .window(IntervalMask(offset: offset, left: left,
                                        right: causal ? min(right, 0) : right, keyEnd: keyEnd))
        case .blocked(let size, let backward, let forward):
            return .blocked(BlockedMask(size: size, backward: backward, forward: forward,
                                        causal: causal, offset: offset, keyEnd: keyEnd))
        }
    }

    public func tiles(head: Int) -> [PatternTile] {
        patternTiles(mask(keyEnd: keyLength), pass: 0, queryLength: queryLength, queryTile: queryTile)
    }
}

/// The kernel mask of ``LocalPattern``: one of its two forms.
enum LocalMask: TileMask {
    case window(IntervalMask)
    case blocked(BlockedMask)

    var queryPartition: QueryPartition {
        switch self {
        case .window(let m): return m.queryPartition
        case .blocked(let m): return m.queryPartition
        }
    }

    func forEachKeyTile(queries: PositionRun, tileSize: Int, _ body: (KeyTile) -> Void) {
        switch self {
        case .window(let m): m.forEachKeyTile(queries: queries, tileSize: tileSize, body)
        case .blocked(let m): m.forEachKeyTile(queries: queries, tileSize: tileSize, body)
        }
    }

    func visibleKeyIndices(tile: KeyTile, queries: PositionRun, lanes: Range<Int>) -> Range<Int> {
        switch self {
        case .window(let m): return m.visibleKeyIndices(tile: tile, queries: queries, lanes: lanes)
        case .blocked(let m): return m.visibleKeyIndices(tile: tile, queries: queries, lanes: lanes)
        }
    }

    func scoredQueryLanes(tile: KeyTile, queries: PositionRun, keys: Range<Int>) -> Range<Int> {
        switch self {
        case .window(let m): return m.scoredQueryLanes(tile: tile, queries: queries, keys: keys)
        case .blocked(let m): return m.scoredQueryLanes(tile: tile, queries: queries, keys: keys)
        }
    }

    func maskScores(_ scores: UnsafeMutablePointer<Float>, ld: Int, tile: KeyTile, queries: PositionRun) {
        switch self {
        case .window(let m): m.maskScores(scores, ld: ld, tile: tile, queries: queries)
        case .blocked(let m): m.maskScores(scores, ld: ld, tile: tile, queries: queries)
        }
    }
}

/// Blocked local attention: query tiles never straddle a block, so every query of a
/// tile sees the same key interval; only the causal diagonal is masked.
struct BlockedMask: TileMask {
    var size: Int, backward: Int, forward: Int
    var causal: Bool
    var offset: Int
    var keyEnd: Int

    var queryPartition: QueryPartition { .blocks(size: size, origin: offset) }

    func forEachKeyTile(queries: PositionRun, tileSize: Int, _ body: (KeyTile) -> Void) {
        let firstP = queries.start + offset, lastP = queries.last + offset
        let t = floorDiv(firstP, size)
        let first = max(0, (t - backward) * size)
        let last = min(keyEnd - 1, (t + forward + 1) * size - 1, causal ? lastP : Int.max)
        forEachTile(from: first, through: last, tileSize: tileSize) { keys in
            body(KeyTile(keys: keys, fullyVisible: !causal || keys.last <= firstP))
        }
    }

    func visibleKeyIndices(tile: KeyTile, queries: PositionRun, lanes: Range<Int>) -> Range<Int> {
        // Only the causal rule cuts a listed tile: keys up to the block's last query.
        causalVisibleKeyIndices(tile: tile, queries: queries, lanes: lanes, offset: offset)
    }

    func maskScores(_ scores: UnsafeMutablePointer<Float>, ld: Int, tile: KeyTile, queries: PositionRun) {
        // Only the causal rule cuts a listed tile: key j is hidden from queries i < j − offset.
        maskCausalDiagonal(scores, ld: ld, keys: tile.keys, queries: queries, offset: offset)
    }
}
