/// Segment ids for ``ETCAttention`` (ETC's structured inputs): each global token and each
/// long token belongs to one of `count` segments (sentences, paragraphs, table cells…).
/// Given them, a global token sees only the long tokens of its own segment, and a long
/// token only the global tokens of its own segment; global → global and long → long
/// pairs are not restricted.
///
/// Long tokens' ids must be non-decreasing (a segment is one contiguous run of the long
/// input, as ETC's sentences are); global tokens' ids are in any order.
public struct ETCSegments: Sendable, Equatable {
    /// Segments `0..<count`.
    public var count: Int
    /// One id per global token (`N_g`).
    public var global: [Int]
    /// One id per long token (`N_l`), non-decreasing.
    public var long: [Int]

    public init(count: Int, global: [Int], long: [Int]) {
        self.count = count
        self.global = global
        self.long = long
    }

    /// Throws unless the ids fit `globals` global and `longs` long tokens.
    func validate(globals: Int, longs: Int, variant: String) throws {
        try checkOption(count, "segments.count", in: 1...patternLimit, variant: variant)
        guard global.count == globals, long.count == longs else {
            throw AttentionError.shapeMismatch(
                "\(variant): segments has \(global.count) global and \(long.count) long ids, expected "
                + "\(globals) (globals) and \(longs) (the long length)")
        }
        // Two calls, no array of (label, ids) pairs: validation runs on every call and allocates nothing.
        func checkIDs(_ ids: [Int], _ label: String) throws {
            if let n = ids.firstIndex(where: { $0 < 0 || $0 >= count }) {
                throw AttentionError.invalidParameter(
                    "\(variant): \(label)[\(n)] = \(ids[n]) is outside 0..<\(count) (segments.count)")
            }
        }
        try checkIDs(global, "segments.global")
        try checkIDs(long, "segments.long")
        if let n = long.indices.dropFirst().first(where: { long[$0] < long[$0 - 1] }) {
            throw AttentionError.invalidParameter(
                "\(variant): segments.long must be non-decreasing (each segment one run of long tokens), "
                + "got \(long[n - 1]) then \(long[n]) at \(n)")
        }
    }
}

/// The ETC global-local pattern (Ainslie et al. 2020) over the concatenated sequence
/// `[global ; long]` of `N = N_g + N_l` positions (queries and keys alike), with
/// `G = N_g`:
///
/// - a global query `p < G` sees every global key, and every long key (with segments:
///   the long keys of its segment);
/// - a long query `p ≥ G` sees every global key (with segments: those of its segment)
///   and the long keys `j` with `|p − j| ≤ r` (causal: `p − r ≤ j ≤ p`).
public struct ETCPattern: AttentionPattern {
    public let globals: Int
    public let radius: Int
    public let causal: Bool
    public let segments: ETCSegments?
    public let queryLength: Int
    public var keyLength: Int { queryLength }
    public var heads: Int { 1 }

    /// Long positions (concatenated) `runs[s]` of segment `s`; global tokens per segment.
    let runs: [Range<Int>]
    let globalsPerSegment: [Int]
    /// The query partitions of the two passes (built once: masks share them, no array per mask).
    let globalQueries: QueryPartition, longQueries: QueryPartition

    /// The pattern for `length = N_g + N_l` positions. Throws what
    /// ``ETCAttention/validate(_:)`` throws for that length.
    public init(globals: Int, radius: Int, causal: Bool, segments: ETCSegments? = nil, length: Int) throws {
        try ETCAttention(globals: globals, radius: radius, segments: segments, causal: causal)
            .validate(AttentionShape(heads: 1, queryLength: length, keyLength: length, headDim: 1))
        self.globals = globals
        self.radius = radius
        self.causal = causal
        self.segments = segments
        queryLength = length
        if let segments {
            var runs = [Range<Int>](repeating: globals..<globals, count: segments.count)
            var n = 0
            while n < segments.long.count {
                let s = segments.long[n]
                var end = n
                while end < segments.long.count && segments.long[end] == s { end += 1 }
                runs[s] = (globals + n)..<(globals + end)
                n = end
            }
            self.runs = runs
            var counts = [Int](repeating: 0, count: segments.count)
            for s in segments.global { counts[s] += 1 }
            globalsPerSegment = counts
        } else {
            runs = []
            globalsPerSegment = []
        }
        globalQueries = .ranges(globals > 0 ? [0..<globals] : [])
        longQueries = .ranges(globals < length ? [globals..<length] : [])
    }

    /// The band of long keys a long query at `p` sees.
    func band(_ p: Int) -> ClosedRange<Int> {
        max(globals, p - radius)...min(queryLength - 1, causal ? p : p + radius)
    }

    public func isVisible(head: Int, query p: Int, key j: Int) -> Bool {
        guard p >= 0, p < queryLength, j >= 0, j < queryLength else { return false }
        switch (p < globals, j < globals) {
        case (true, true): return true
        case (true, false): return segments.map { $0.long[j - globals] == $0.global[p] } ?? true
        case (false, true): return segments.map { $0.global[j] == $0.long[p - globals] } ?? true
        case (false, false): return band(p).contains(j)
        }
    }

    public func visibleKeyCount(head: Int, query p: Int) -> Int {
        guard let segments else {
            return p < globals ? queryLength : globals + band(p).count
        }
        if p < globals { return globals + runs[segments.global[p]].count }
        return globalsPerSegment[segments.long[p - globals]] + band(p).count
    }

    /// The query tile of the long queries' pass (their band is at most `2r + 1` keys).
    var longQueryTile: Int {
        TiledSoftmaxAttention.Tiling.queryTile(forBandWidth: min(queryLength, causal ? radius + 1 : 2 * radius + 1))
    }

    /// Pass 0: the global queries.
    func globalQueryMask(keyEnd: Int) -> ETCGlobalQueryMask {
        ETCGlobalQueryMask(globals: globals, keyEnd: keyEnd, segments: segments, runs: runs,
                           queryPartition: globalQueries)
    }

    /// Pass 1: the long queries.
    func longQueryMask(keyEnd: Int) -> ETCLongQueryMask {
        ETCLongQueryMask(globals: globals, length: queryLength, radius: radius, causal: causal, keyEnd: keyEnd,
                         segments: segments, queryPartition: longQueries)
    }

    public func tiles(head: Int) -> [PatternTile] {
        patternTiles(globalQueryMask(keyEnd: keyLength), pass: 0, queryLength: queryLength,
                     queryTile: TiledSoftmaxAttention.Tiling.defaultQueryTile)
            + patternTiles(longQueryMask(keyEnd: keyLength), pass: 1, queryLength: queryLength,
                           queryTile: longQueryTile)
    }
}

/// Hides the score of query lane `i` and key `j` unless both have the same segment:
/// `querySegment(i)` and `keySegment(j)` (positions of the tile).
@inline(__always)
private func maskOtherSegments(_ scores: UnsafeMutablePointer<Float>, ld: Int, keys: PositionRun,
                               queries: PositionRun, querySegment: (Int) -> Int, keySegment: (Int) -> Int) {
    let minusInfinity = Vec16(repeating: -.infinity)
    var ii = 0
    while ii < queries.count {
        // Lanes past the count repeat the last query.
        var lanes = SIMD16<Int32>()
        for l in 0..<16 {
            lanes[l] = Int32(truncatingIfNeeded: querySegment(queries.position(min(ii + l, queries.count - 1))))
        }
        for jj in 0..<keys.count {
            let row = scores + jj * ld + ii
            var v = load16(row)
            v.replace(with: minusInfinity,
                      where: lanes .!= SIMD16<Int32>(repeating: Int32(truncatingIfNeeded: keySegment(keys.position(jj)))))
            store16(v, row)
        }
        ii += 16
    }
}

/// ETC pass 0: the global queries `0..<G`, against the global keys (always fully
/// visible) and the long keys (all of them, or the runs of their segments: part 1,
/// masked by segment unless every query of the tile has one segment).
struct ETCGlobalQueryMask: TileMask {
    var globals: Int
    var keyEnd: Int
    var segments: ETCSegments?
    var runs: [Range<Int>]
    /// The global queries (stored: the kernel asks for it once per query tile).
    var queryPartition: QueryPartition


    func forEachKeyTile(queries: PositionRun, tileSize: Int, _ body: (KeyTile) -> Void) {
        forEachTile(from: 0, through: min(globals, keyEnd) - 1, tileSize: tileSize) { keys in
            body(KeyTile(keys: keys, fullyVisible: true))
        }
        guard let segments else {
            forEachTile(from: globals, through: keyEnd - 1, tileSize: tileSize) { keys in
                body(KeyTile(keys: keys, fullyVisible: true))
            }
            return
        }
        // The smallest range holding the runs of the tile's segments.
        var lo = Int.max, hi = Int.min
        var first = segments.global[queries.start], mixed = false
        for n in 0..<queries.count {
            let s = segments.global[queries.position(n)]
            mixed = mixed || s != first
            first = s
            let run = runs[s]
            if !run.isEmpty { lo = min(lo, run.lowerBound); hi = max(hi, run.upperBound - 1) }
        }
        guard lo <= hi else { return }
        forEachTile(from: lo, through: min(hi, keyEnd - 1), tileSize: tileSize) { keys in
            body(KeyTile(keys: keys, fullyVisible: !mixed, part: 1))
        }
    }

    func maskScores(_ scores: UnsafeMutablePointer<Float>, ld: Int, tile: KeyTile, queries: PositionRun) {
        guard tile.part == 1, let segments else { return }
        let globals = self.globals
        maskOtherSegments(scores, ld: ld, keys: tile.keys, queries: queries,
                          querySegment: { segments.global[$0] }, keySegment: { segments.long[$0 - globals] })
    }
}

/// ETC pass 1: the long queries `G..<N`, against the global keys (part 1: fully visible,
/// or masked by segment) and the band of long keys `|p − j| ≤ r` (part 0; causal:
/// `p − r ≤ j ≤ p`).
struct ETCLongQueryMask: TileMask {
    var globals: Int
    /// `N = N_g + N_l`.
    var length: Int
    var radius: Int
    var causal: Bool
    var keyEnd: Int
    var segments: ETCSegments?
    /// The long queries (stored: the kernel asks for it once per query tile).
    var queryPartition: QueryPartition

    /// Offsets `j − p` of the band: `lo...hi`.
    var lo: Int { -radius }
    var hi: Int { causal ? 0 : radius }

    func forEachKeyTile(queries: PositionRun, tileSize: Int, _ body: (KeyTile) -> Void) {
        let firstP = queries.start, lastP = queries.last
        let sameSegment = segments.map { $0.long[firstP - globals] == $0.long[lastP - globals] } ?? true
        forEachTile(from: 0, through: min(globals, keyEnd) - 1, tileSize: tileSize) { keys in
            var full = segments == nil
            if let segments, sameSegment {
                let s = segments.long[firstP - globals]
                full = (keys.start...keys.last).allSatisfy { segments.global[$0] == s }
            }
            body(KeyTile(keys: keys, fullyVisible: full, part: 1))
        }
        forEachTile(from: max(globals, firstP + lo), through: min(keyEnd - 1, lastP + hi), tileSize: tileSize) { keys in
            body(KeyTile(keys: keys, fullyVisible: keys.start >= lastP + lo && keys.last <= firstP + hi))
        }
    }

    func visibleKeyIndices(tile: KeyTile, queries: PositionRun, lanes: Range<Int>) -> Range<Int> {
        guard tile.part == 0 else { return 0..<tile.keys.count }
        guard let p = lanePositions(queries, lanes) else { return 0..<0 }
        return runIndices(tile.keys, from: p.first + lo, through: p.last + hi)
    }

    func maskScores(_ scores: UnsafeMutablePointer<Float>, ld: Int, tile: KeyTile, queries: PositionRun) {
        if tile.part == 1 {
            guard let segments else { return }
            let globals = self.globals
            maskOtherSegments(scores, ld: ld, keys: tile.keys, queries: queries,
                              querySegment: { segments.long[$0 - globals] }, keySegment: { segments.global[$0] })
            return
        }
        let lo = self.lo, hi = self.hi
        maskTransposedScores(scores, ld: ld, keys: tile.keys, queries: queries) { j, i in
            // Queries that see key j: j − hi ≤ i ≤ j − lo.
            (i .< SIMD16<Int32>(repeating: Int32(clamping: j - hi))) .| (i .> SIMD16<Int32>(repeating: Int32(clamping: j - lo)))
        }
    }
}

/// A mask with relative-position score terms added on the keys from `firstKey` on
/// (ETC: the long → long band; global keys get none).
struct RelativeTermsMask<Base: TileMask>: TileMask {
    var base: Base
    var terms: RelativeScoreTerms
    var firstKey: Int
    /// Where the backward pass keeps `Σ dS q` per table row (`nil`: the forward, or a
    /// backward without the table's gradient).
    var gradients: RelativeScoreGradients? = nil

    var queryPartition: QueryPartition { base.queryPartition }

    func forEachKeyTile(queries: PositionRun, tileSize: Int, _ body: (KeyTile) -> Void) {
        base.forEachKeyTile(queries: queries, tileSize: tileSize, body)
    }

    func visibleKeyIndices(tile: KeyTile, queries: PositionRun, lanes: Range<Int>) -> Range<Int> {
        base.visibleKeyIndices(tile: tile, queries: queries, lanes: lanes)
    }

    func maskScores(_ scores: UnsafeMutablePointer<Float>, ld: Int, tile: KeyTile, queries: PositionRun) {
        base.maskScores(scores, ld: ld, tile: tile, queries: queries)
    }

    static var addsScoreTerms: Bool { true }

    static func scoreTermScratchCount(queryTile: Int, keyTile: Int) -> Int {
        RelativeScoreTerms.scratchCount(queryTile: queryTile, keyTile: keyTile)
    }

    func addScoreTerms(_ tile: ScoreTile) {
        // The backward's key blocks may hold global and long keys: the terms go to the long ones.
        let skipped = firstKey - tile.keyStart
        if skipped <= 0 { return terms.add(to: tile) }
        guard skipped < tile.keyCount else { return }
        var long = tile
        long.scores += skipped * tile.ld
        long.keyStart = firstKey
        long.keyCount -= skipped
        terms.add(to: long)
    }
}

extension RelativeTermsMask: TransposedTileMask where Base: TransposedTileMask {
    func forEachQueryTile(seeing keys: PositionRun, queryLength: Int, queryTile: Int,
                          _ body: (_ index: Int, _ queries: PositionRun, _ tile: KeyTile) -> Void) {
        base.forEachQueryTile(seeing: keys, queryLength: queryLength, queryTile: queryTile, body)
    }

    func backwardQueryTileCount(queryLength: Int, queryTile: Int) -> Int {
        base.backwardQueryTileCount(queryLength: queryLength, queryTile: queryTile)
    }

    func visibleQueryIndices(tile: KeyTile, queries: PositionRun, keys: Range<Int>) -> Range<Int> {
        base.visibleQueryIndices(tile: tile, queries: queries, keys: keys)
    }

    static var takesScoreGradients: Bool { true }

    static func scoreGradientScratchCount(lanes: Int, keyRows: Int, headDim: Int) -> Int {
        RelativeScoreTerms.gradientScratchCount(lanes: lanes, keyRows: keyRows, headDim: headDim)
    }

    /// The tile's long keys (the terms' keys), `nil` when it has none.
    private func longKeys(_ tile: ScoreGradientTile) -> ScoreGradientTile? {
        let skipped = max(0, firstKey - tile.keyStart)
        guard skipped < tile.keyCount else { return nil }
        var long = tile
        long.scoreGradients += skipped * tile.ld
        long.keyStart += skipped
        long.keyCount -= skipped
        return long
    }

    func takeScoreGradients(_ tile: ScoreGradientTile) {
        guard let long = longKeys(tile) else { return }
        terms.takeGradients(long, into: gradients ?? RelativeScoreGradients(keySums: nil))
    }

    func publishScoreGradients(_ tile: ScoreGradientTile) {
        if let gradients, let long = longKeys(tile) { terms.publishGradients(long, into: gradients) }
    }
}
