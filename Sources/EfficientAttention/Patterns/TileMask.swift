/// Which keys each query sees, as the tiled softmax kernel consumes it.
///
/// A mask is a description, never a dense `Nq × Nk` array: for a tile of queries it
/// lists the key tiles that hold at least one visible pair, says which of them are
/// entirely visible (the kernel runs those without masking), and masks the scores of
/// the partially visible ones in place.
protocol TileMask {
    /// Calls `body(keyStart, keyCount, fullyVisible)` for each key tile, in increasing
    /// key order, that holds a visible pair for some query in `queryStart..<queryEnd`.
    /// Tiles hold at most `tileSize` keys. Keys outside every listed tile are invisible.
    func forEachKeyTile(queryStart: Int, queryEnd: Int, tileSize: Int,
                        _ body: (_ keyStart: Int, _ keyCount: Int, _ fullyVisible: Bool) -> Void)

    /// Sets to `-infinity` the invisible entries of a transposed score tile:
    /// `scores[jj · ld + ii]` holds the score of query `queryStart + ii` and key
    /// `keyStart + jj`, for `jj < keyCount` and `ii < queryCount` (rounded up to 16).
    func maskScores(_ scores: UnsafeMutablePointer<Float>, ld: Int,
                    keyStart: Int, keyCount: Int, queryStart: Int, queryCount: Int)

    /// Whether the kernel calls ``addScoreTerms(_:)``; `false` (the default) removes the
    /// call from the specialised kernel.
    static var addsScoreTerms: Bool { get }

    /// Floats of per-worker scratch ``addScoreTerms(_:)`` needs (in `ScoreTile.scratch`)
    /// for tiles of `queryTile` query lanes (a multiple of ``MicroTile/nr``) and at most
    /// `keyTile` keys. The kernel zero-fills it once per call, and it keeps its contents
    /// from one tile to the next. Default 0.
    static func scoreTermScratchCount(queryTile: Int, keyTile: Int) -> Int

    /// Adds terms to a transposed score tile right after `Sᵀ = K Qᵀ`, before masking
    /// (Transformer-XL's relative-position scores). Entries the mask hides may receive
    /// any finite value: masking overwrites them. Default: nothing.
    func addScoreTerms(_ tile: ScoreTile)

    /// Whether the kernel calls ``weightProbabilities(_:ld:keyStart:keyCount:queryStart:queryCount:)``;
    /// `false` (the default) removes the call from the specialised kernel.
    static var weightsProbabilities: Bool { get }

    /// Multiplies the probabilities `exp(s − m')` of a transposed tile (laid out as in
    /// ``maskScores(_:ld:keyStart:keyCount:queryStart:queryCount:)``) by per-pair weights
    /// in `[0, 1]`, before the kernel adds them to the row sums (adaptive span's soft
    /// mask). The row's log-sum-exp then is `log Σ_j w_ij exp(s_ij)`. Default: nothing.
    func weightProbabilities(_ probabilities: UnsafeMutablePointer<Float>, ld: Int,
                             keyStart: Int, keyCount: Int, queryStart: Int, queryCount: Int)
}

/// What ``TileMask/addScoreTerms(_:)`` sees of one tile: the transposed scores
/// `scores[jj · ld + ii]` (key `keyStart + jj`, query `queryStart + ii`), the packed
/// scaled queries they came from (`queries[c · ld + ii] = scale · q[queryStart + ii][c]`
/// for `c < headDim`, lanes `queryCount..<lanes` zero), and the mask's scratch.
struct ScoreTile {
    var scores: UnsafeMutablePointer<Float>
    var ld: Int
    var queries: UnsafePointer<Float>
    var headDim: Int
    /// `queryCount` rounded up to ``MicroTile/nr``.
    var lanes: Int
    /// The largest key tile (`keyCount ≤ keyTile`).
    var keyTile: Int
    var scratch: UnsafeMutablePointer<Float>
    var keyStart: Int
    var keyCount: Int
    var queryStart: Int
    var queryCount: Int
}

extension TileMask {
    static var addsScoreTerms: Bool { false }
    static func scoreTermScratchCount(queryTile: Int, keyTile: Int) -> Int { 0 }
    func addScoreTerms(_ tile: ScoreTile) {}
    static var weightsProbabilities: Bool { false }
    func weightProbabilities(_ probabilities: UnsafeMutablePointer<Float>, ld: Int,
                             keyStart: Int, keyCount: Int, queryStart: Int, queryCount: Int) {}
}

/// The mask where each query sees one interval of keys:
/// key `j` is visible to query `i` iff `i + offset − left ≤ j ≤ i + offset + right` and
/// `j < keyEnd`.
///
/// With `offset = Nk − Nq` (bottom-right alignment) this is FlashAttention's single mask
/// model: no mask is `left = right = unbounded`, causal is `right = 0`, a sliding window
/// is finite `left`/`right`, and key padding is `keyEnd < Nk`.
struct IntervalMask: TileMask {
    /// A window side that never limits anything (kept far from `Int` overflow).
    static let unbounded = 1 << 40

    var offset: Int
    var left: Int
    var right: Int
    var keyEnd: Int

    /// Dense attention (optionally causal) over `keyEnd` valid keys.
    init(queryLength: Int, keyLength: Int, causal: Bool, keyEnd: Int) {
        self.offset = keyLength - queryLength
        self.left = IntervalMask.unbounded
        self.right = causal ? 0 : IntervalMask.unbounded
        self.keyEnd = keyEnd
    }

    func forEachKeyTile(queryStart: Int, queryEnd: Int, tileSize: Int,
                        _ body: (Int, Int, Bool) -> Void) {
        let first = max(0, queryStart + offset - left)
        let last = min(keyEnd - 1, queryEnd - 1 + offset + right)
        guard first <= last else { return }
        var start = first
        while start <= last {
            let count = min(tileSize, last - start + 1)
            let full = queryEnd - 1 + offset - left <= start
                && start + count - 1 <= queryStart + offset + right
            body(start, count, full)
            start += count
        }
    }

    func maskScores(_ scores: UnsafeMutablePointer<Float>, ld: Int,
                    keyStart: Int, keyCount: Int, queryStart: Int, queryCount: Int) {
        let lanes = SIMD16<Int32>(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
        let minusInfinity = Vec16(repeating: -.infinity)
        for jj in 0..<keyCount {
            let j = keyStart + jj
            // Queries that see key j: j − offset − right ≤ i ≤ j − offset + left (relative to queryStart).
            let lo = Int32(clamping: j - offset - right - queryStart)
            let hi = Int32(clamping: j - offset + left - queryStart)
            let row = scores + jj * ld
            var ii = 0
            while ii < queryCount {
                let index = lanes &+ SIMD16<Int32>(repeating: Int32(ii))
                let hidden = (index .< SIMD16<Int32>(repeating: lo)) .| (index .> SIMD16<Int32>(repeating: hi))
                var v = load16(row + ii)
                v.replace(with: minusInfinity, where: hidden)
                store16(v, row + ii)
                ii += 16
            }
        }
    }
}
