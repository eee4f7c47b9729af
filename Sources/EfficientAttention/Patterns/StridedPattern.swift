/// The Sparse Transformer patterns (Child et al. 2019) for one problem size, both of
/// their parts united in one head. With `p = i + Nk − Nq` the position of query `i`:
///
/// - strided: `j` visible iff `|p − j| < l` or `(p − j) mod l == 0`;
/// - fixed: `j` visible iff `⌊j / l⌋ == ⌊p / l⌋` or `j mod l ≥ l − c`;
///
/// and with `causal` also `j ≤ p`. The same pattern for every head.
public struct StridedPattern: AttentionPattern {
    public let kind: StridedAttention.Kind
    /// The stride `l`.
    public let stride: Int
    public let causal: Bool
    public let queryLength: Int
    public let keyLength: Int
    public var heads: Int { 1 }

    public init(kind: StridedAttention.Kind, stride: Int, causal: Bool, queryLength: Int, keyLength: Int) {
        self.kind = kind
        self.stride = stride
        self.causal = causal
        self.queryLength = queryLength
        self.keyLength = keyLength
    }

    var offset: Int { keyLength - queryLength }

    public func isVisible(head: Int, query: Int, key j: Int) -> Bool {
        let p = query + offset, l = stride
        guard j >= 0, j < keyLength, !causal || j <= p else { return false }
        switch kind {
        case .strided:
            return abs(p - j) < l || positiveModulo(p - j, l) == 0
        case .fixed(let c):
            return floorDiv(j, l) == floorDiv(p, l) || j % l >= l - c
        }
    }

    public func visibleKeyCount(head: Int, query: Int) -> Int {
        let p = query + offset, l = stride
        let end = causal ? min(keyLength - 1, p) : keyLength - 1   // last key the causal rule allows
        func count(_ lo: Int, _ hi: Int) -> Int { max(0, min(hi, end) - max(lo, 0) + 1) }
        /// Keys `j ≡ r (mod l)` in `lo...hi` (within `0...end`).
        func congruent(_ r: Int, _ lo: Int, _ hi: Int) -> Int {
            let lo = max(lo, 0), hi = min(hi, end)
            guard lo <= hi else { return 0 }
            let first = lo + positiveModulo(r - lo, l)
            return first > hi ? 0 : (hi - first) / l + 1
        }
        switch kind {
        case .strided:
            // The band, plus the keys ≡ p (mod l) outside it (only j = p is in both).
            let band = count(p - l + 1, p + l - 1)
            let column = congruent(p, 0, end) - congruent(p, p, p)
            return band + column
        case .fixed(let c):
            // The own block, plus the summary columns of the other blocks.
            let t = floorDiv(p, l)
            var total = count(t * l, t * l + l - 1)
            for u in 0..<c {
                total += congruent(l - c + u, 0, end) - congruent(l - c + u, t * l, t * l + l - 1)
            }
            return total
        }
    }

    /// The query tile of the band pass (strided) or of the block pass (fixed).
    var queryTile: Int {
        switch kind {
        case .strided: return TiledSoftmaxAttention.Tiling.queryTile(forBandWidth: min(keyLength, 2 * stride - 1))
        case .fixed: return TiledSoftmaxAttention.Tiling.defaultQueryTile
        }
    }

    /// Strided: the band `|p − j| < l` (an interval mask).
    func bandMask(keyEnd: Int) -> IntervalMask {
        IntervalMask(offset: offset, left: stride - 1, right: causal ? 0 : stride - 1, keyEnd: keyEnd)
    }

    /// Strided: the keys `≡ p (mod l)` other than `p` itself, for queries grouped by residue.
    func columnMask(keyEnd: Int) -> StridedColumnMask {
        StridedColumnMask(stride: stride, causal: causal, offset: offset, keyEnd: keyEnd)
    }

    /// Fixed: own block plus summary columns, in one pass.
    func fixedMask(keyEnd: Int, summary: Int) -> FixedMask {
        FixedMask(stride: stride, summary: summary, causal: causal, offset: offset, keyEnd: keyEnd)
    }

    public func tiles(head: Int) -> [PatternTile] {
        switch kind {
        case .strided:
            return patternTiles(columnMask(keyEnd: keyLength), pass: 0, queryLength: queryLength,
                                queryTile: TiledSoftmaxAttention.Tiling.defaultQueryTile)
                + patternTiles(bandMask(keyEnd: keyLength), pass: 1, queryLength: queryLength, queryTile: queryTile)
        case .fixed(let c):
            return patternTiles(fixedMask(keyEnd: keyLength, summary: c), pass: 0,
                                queryLength: queryLength, queryTile: queryTile)
        }
    }
}

/// The strided pattern's column part: queries grouped by residue mod `l` (step `l`), each
/// tile seeing the keys of its residue (key tiles with step `l`, read in place) except
/// its own position, which the band pass has.
struct StridedColumnMask: TileMask {
    var stride: Int
    var causal: Bool
    var offset: Int
    var keyEnd: Int

    var queryPartition: QueryPartition { .residues(modulus: stride) }

    func forEachKeyTile(queries: PositionRun, tileSize: Int, _ body: (KeyTile) -> Void) {
        let firstP = queries.start + offset, lastP = queries.last + offset
        let first = positiveModulo(firstP, stride)
        let last = min(keyEnd - 1, causal ? lastP - stride : Int.max)
        forEachTile(from: first, through: last, step: stride, tileSize: tileSize) { keys in
            // Visible to every query unless the tile reaches a query's own position (or past it, causal).
            let full = causal ? keys.last <= firstP - stride : keys.last < firstP || keys.start > lastP
            body(KeyTile(keys: keys, fullyVisible: full))
        }
    }

    func maskScores(_ scores: UnsafeMutablePointer<Float>, ld: Int, tile: KeyTile, queries: PositionRun) {
        if !causal {
            // One hidden pair per key at most: the query at the key's own position.
            return hideOwnPositions(scores, ld: ld, keys: tile.keys, queries: queries, offset: offset)
        }
        maskTransposedScores(scores, ld: ld, keys: tile.keys, queries: queries) { j, i in
            // Query i is at position j itself when i = j − offset; causal hides i < j − offset too.
            i .<= SIMD16<Int32>(repeating: Int32(clamping: j - offset))
        }
    }
}

/// The fixed pattern: query tiles never straddle a block of `l` positions; each sees
/// its own block (part 0, step 1) and the `c` summary columns of every other block
/// (part 1: runs with step `l`, entirely visible).
struct FixedMask: TileMask {
    var stride: Int
    var summary: Int
    var causal: Bool
    var offset: Int
    var keyEnd: Int

    var queryPartition: QueryPartition { .blocks(size: stride, origin: offset) }

    func forEachKeyTile(queries: PositionRun, tileSize: Int, _ body: (KeyTile) -> Void) {
        let firstP = queries.start + offset, lastP = queries.last + offset
        let l = stride, t = floorDiv(firstP, l)
        // Summary columns of the blocks before this one (after it too, without causal).
        for u in 0..<summary {
            let column = l - summary + u
            forEachTile(from: column, through: min(keyEnd - 1, t * l - 1), step: l, tileSize: tileSize) {
                body(KeyTile(keys: $0, fullyVisible: true, part: 1))
            }
            if !causal {
                forEachTile(from: max(t + 1, 0) * l + column, through: keyEnd - 1, step: l, tileSize: tileSize) {
                    body(KeyTile(keys: $0, fullyVisible: true, part: 1))
                }
            }
        }
        // The own block.
        let last = min(keyEnd - 1, t * l + l - 1, causal ? lastP : Int.max)
        forEachTile(from: max(0, t * l), through: last, tileSize: tileSize) { keys in
            body(KeyTile(keys: keys, fullyVisible: !causal || keys.last <= firstP))
        }
    }

    func visibleKeyIndices(tile: KeyTile, queries: PositionRun, lanes: Range<Int>) -> Range<Int> {
        // Only the causal diagonal cuts a listed tile (part 0): keys up to the block's last query.
        causalVisibleKeyIndices(tile: tile, queries: queries, lanes: lanes, offset: offset)
    }

    func maskScores(_ scores: UnsafeMutablePointer<Float>, ld: Int, tile: KeyTile, queries: PositionRun) {
        // Only the causal diagonal of the own block is ever masked.
        maskCausalDiagonal(scores, ld: ld, keys: tile.keys, queries: queries, offset: offset)
    }
}
