/// The Longformer pattern (Beltagy et al. 2020) for one problem size. With
/// `p = i + Nk − Nq` the position of query `i` and `δ = dilations[h]`:
///
/// - window: `j = p + δ·t` for an integer `t` with `|t| ≤ w/2` (causal: `−w ≤ t ≤ 0`);
/// - global positions `G`: a query at a global position sees every key, every query
///   sees the keys at global positions;
/// - causal: additionally `j ≤ p`, for global queries and keys too.
public struct LongformerPattern: AttentionPattern {
    /// Total window `w` (keys per query before clipping, not counting the query's own).
    public let window: Int
    /// Dilation `δ` of each head.
    public let dilations: [Int]
    /// Sorted global positions (key positions; a query is global when `p` is one).
    public let globalPositions: [Int]
    public let causal: Bool
    public let queryLength: Int
    public let keyLength: Int
    public var heads: Int { dilations.count }

    /// The pattern for `queryLength` queries and `keyLength` keys, one head per dilation.
    /// Throws what ``LongformerAttention/validate(_:)`` throws for these lengths and
    /// `dilations.count` heads.
    public init(window: Int, dilations: [Int], globalPositions: [Int], causal: Bool,
                queryLength: Int, keyLength: Int) throws {
        try LongformerAttention(window: window, dilations: dilations, globalPositions: globalPositions, causal: causal)
            .validate(AttentionShape(heads: dilations.count, queryLength: queryLength, keyLength: keyLength, headDim: 1))
        self.window = window
        self.dilations = dilations
        // Sorted and unique (as given already, usually: then no copy is made).
        let sorted = globalPositions.indices.dropFirst().allSatisfy { globalPositions[$0 - 1] < globalPositions[$0] }
        self.globalPositions = sorted ? globalPositions : Array(Set(globalPositions)).sorted()
        self.causal = causal
        self.queryLength = queryLength
        self.keyLength = keyLength
    }

    var offset: Int { keyLength - queryLength }

    /// Window offsets `lo...hi` of `j − p` for head `h` (multiples of the dilation).
    func windowRange(head h: Int) -> (lo: Int, hi: Int, dilation: Int) {
        let d = dilations[h]
        return causal ? (-d * window, 0, d) : (-d * (window / 2), d * (window / 2), d)
    }

    /// Whether `position` is global (binary search).
    func isGlobal(_ position: Int) -> Bool {
        let n = firstGlobal(atLeast: position)
        return n < globalPositions.count && globalPositions[n] == position
    }

    /// The index of the first global position `>= position`.
    func firstGlobal(atLeast position: Int) -> Int {
        var lo = 0, hi = globalPositions.count
        while lo < hi {
            let mid = (lo + hi) / 2
            if globalPositions[mid] < position { lo = mid + 1 } else { hi = mid }
        }
        return lo
    }

    func inWindow(head h: Int, p: Int, key j: Int) -> Bool {
        let w = windowRange(head: h)
        let d = j - p
        return d >= w.lo && d <= w.hi && positiveModulo(d, w.dilation) == 0
    }

    public func isVisible(head: Int, query: Int, key j: Int) -> Bool {
        let p = query + offset
        guard j >= 0, j < keyLength, !causal || j <= p else { return false }
        return isGlobal(p) || isGlobal(j) || inWindow(head: head, p: p, key: j)
    }

    public func visibleKeyCount(head: Int, query: Int) -> Int {
        let p = query + offset
        let end = causal ? min(keyLength - 1, p) : keyLength - 1
        guard end >= 0 else { return 0 }
        if isGlobal(p) { return end + 1 }
        let w = windowRange(head: head)
        // Window keys j = p + δt in [max(0, p + lo), min(end, p + hi)].
        let tMin = -floorDiv(-(max(0, p + w.lo) - p), w.dilation)     // ⌈(max(0, p + lo) − p) / δ⌉
        let tMax = floorDiv(min(end, p + w.hi) - p, w.dilation)
        var count = max(0, tMax - tMin + 1)
        for g in globalPositions where g <= end && !inWindow(head: head, p: p, key: g) { count += 1 }
        return count
    }

    /// Runs of consecutive global positions below `end`, as half-open ranges.
    func globalRuns(below end: Int) -> [Range<Int>] {
        var runs: [Range<Int>] = []
        for g in globalPositions where g < end {
            if let last = runs.last, last.upperBound == g {
                runs[runs.count - 1] = last.lowerBound..<(g + 1)
            } else {
                runs.append(g..<(g + 1))
            }
        }
        return runs
    }

    /// The query tile of the window pass.
    var queryTile: Int {
        TiledSoftmaxAttention.Tiling.queryTile(forBandWidth: min(keyLength, window + 1))
    }

    /// Pass 0: every query's window (queries grouped by residue mod `δ`, keys `δ` apart)
    /// and the global keys outside it.
    func windowMask(head: Int, keyEnd: Int, globalKeys: [Range<Int>]) -> LongformerWindowMask {
        let w = windowRange(head: head)
        return LongformerWindowMask(lo: w.lo, hi: w.hi, dilation: w.dilation, causal: causal, offset: offset,
                                    keyEnd: keyEnd, globalKeys: globalKeys)
    }

    /// Pass 1 (merged): global queries, every key not already seen in pass 0. `queries` is
    /// ``globalQueryRanges`` (computed once per call by the caller).
    func globalQueryMask(head: Int, keyEnd: Int, queries: [Range<Int>]) -> LongformerGlobalQueryMask {
        let w = windowRange(head: head)
        return LongformerGlobalQueryMask(pattern: self, queryPartition: .ranges(queries),
                                         lo: w.lo, hi: w.hi, dilation: w.dilation, keyEnd: keyEnd)
    }

    /// Global queries as ranges of query indices (`p − offset`).
    var globalQueryRanges: [Range<Int>] {
        var ranges: [Range<Int>] = []
        for run in globalRuns(below: Int.max) {
            let lo = max(0, run.lowerBound - offset), hi = min(queryLength, run.upperBound - offset)
            if lo < hi { ranges.append(lo..<hi) }
        }
        return ranges
    }

    public func tiles(head: Int) -> [PatternTile] {
        patternTiles(windowMask(head: head, keyEnd: keyLength, globalKeys: globalRuns(below: keyLength)),
                     pass: 0, queryLength: queryLength, queryTile: queryTile)
            + patternTiles(globalQueryMask(head: head, keyEnd: keyLength, queries: globalQueryRanges), pass: 1, queryLength: queryLength,
                           queryTile: TiledSoftmaxAttention.Tiling.defaultQueryTile)
    }
}

/// Longformer pass 0. Query tiles are residue classes mod `δ` (step `δ`), so a tile's
/// window keys are one run with step `δ` read in place (part 0, an interval of
/// `j − p`); the global keys are runs of consecutive positions (part 1), masked where a
/// query's window already has them.
struct LongformerWindowMask: TileMask {
    var lo: Int, hi: Int, dilation: Int
    var causal: Bool
    var offset: Int
    var keyEnd: Int
    /// Runs of global positions (any end: clipped to `keyEnd` here).
    var globalKeys: [Range<Int>]

    var queryPartition: QueryPartition { .residues(modulus: dilation) }

    func forEachKeyTile(queries: PositionRun, tileSize: Int, _ body: (KeyTile) -> Void) {
        let firstP = queries.start + offset, lastP = queries.last + offset
        let low = max(0, firstP + lo)
        let first = low + positiveModulo(firstP - low, dilation)
        forEachTile(from: first, through: min(keyEnd - 1, lastP + hi), step: dilation, tileSize: tileSize) { keys in
            body(KeyTile(keys: keys, fullyVisible: keys.start >= lastP + lo && keys.last <= firstP + hi))
        }
        // Runs of global keys, clipped to the item's valid keys (one list serves every item).
        for run in globalKeys where run.lowerBound < keyEnd {
            let last = min(run.upperBound, keyEnd) - 1, lastVisible = min(last, causal ? lastP : Int.max)
            forEachTile(from: run.lowerBound, through: lastVisible, tileSize: tileSize) { keys in
                let clearOfWindows = keys.last < firstP + lo || keys.start > lastP + hi
                body(KeyTile(keys: keys, fullyVisible: clearOfWindows && (!causal || keys.last <= firstP), part: 1))
            }
        }
    }

    func visibleKeyIndices(tile: KeyTile, queries: PositionRun, lanes: Range<Int>) -> Range<Int> {
        // Window keys: the interval j − p ∈ [lo, hi] of the block's first and last query.
        guard tile.part == 0 else { return 0..<tile.keys.count }
        guard let p = lanePositions(queries, lanes) else { return 0..<0 }
        return runIndices(tile.keys, from: p.first + offset + lo, through: p.last + offset + hi)
    }

    func maskScores(_ scores: UnsafeMutablePointer<Float>, ld: Int, tile: KeyTile, queries: PositionRun) {
        let lo = self.lo, hi = self.hi, offset = self.offset, causal = self.causal
        if tile.part == 0 {
            // Same residue as every query of the tile: only the interval j − p ∈ [lo, hi] cuts.
            maskTransposedScores(scores, ld: ld, keys: tile.keys, queries: queries) { j, i in
                (i .> SIMD16<Int32>(repeating: Int32(clamping: j - offset - lo)))
                    .| (i .< SIMD16<Int32>(repeating: Int32(clamping: j - offset - hi)))
            }
        } else {
            // A global key: hidden where the query's window holds it (pass-0 part 0) or past it (causal).
            let tileP = queries.start + offset
            maskTransposedScores(scores, ld: ld, keys: tile.keys, queries: queries) { j, i in
                let seen = positiveModulo(j - tileP, dilation) == 0
                let start = SIMD16<Int32>(repeating: Int32(clamping: j - offset - hi))
                let end = SIMD16<Int32>(repeating: Int32(clamping: j - offset - lo))
                var hidden = SIMDMask<SIMD16<Int32>>(repeating: false)
                if seen { hidden = (i .>= start) .& (i .<= end) }
                if causal { hidden = hidden .| (i .< SIMD16<Int32>(repeating: Int32(clamping: j - offset))) }
                return hidden
            }
        }
    }
}

/// Longformer pass 1: the global queries (runs of consecutive positions) see every key
/// (causal: every earlier key); the keys pass 0 gave them (window, global keys) are masked.
struct LongformerGlobalQueryMask: TileMask {
    var pattern: LongformerPattern
    /// The global queries' ranges.
    var queryPartition: QueryPartition
    var lo: Int, hi: Int, dilation: Int
    var keyEnd: Int


    func forEachKeyTile(queries: PositionRun, tileSize: Int, _ body: (KeyTile) -> Void) {
        let offset = pattern.offset, causal = pattern.causal
        let firstP = queries.start + offset, lastP = queries.last + offset
        forEachTile(from: 0, through: min(keyEnd - 1, causal ? lastP : Int.max), tileSize: tileSize) { keys in
            let clearOfWindows = keys.last < firstP + lo || keys.start > lastP + hi
            let g = pattern.firstGlobal(atLeast: keys.start)
            let clearOfGlobals = g == pattern.globalPositions.count || pattern.globalPositions[g] > keys.last
            body(KeyTile(keys: keys, fullyVisible: clearOfWindows && clearOfGlobals && (!causal || keys.last <= firstP)))
        }
    }

    func maskScores(_ scores: UnsafeMutablePointer<Float>, ld: Int, tile: KeyTile, queries: PositionRun) {
        let offset = pattern.offset, causal = pattern.causal, lo = self.lo, hi = self.hi, dilation = self.dilation
        let all = SIMDMask<SIMD16<Int32>>(repeating: true)
        maskTransposedScores(scores, ld: ld, keys: tile.keys, queries: queries) { j, i in
            if pattern.isGlobal(j) { return all }
            // d = j − p; hidden where d ∈ [lo, hi] and d ≡ 0 (mod δ), or d > 0 (causal).
            let d = SIMD16<Int32>(repeating: Int32(clamping: j - offset)) &- i
            var hidden = (d .>= SIMD16<Int32>(repeating: Int32(clamping: lo)))
                .& (d .<= SIMD16<Int32>(repeating: Int32(clamping: hi)))
            if dilation > 1 {
                let m = Int32(clamping: dilation)
                // d − lo ≥ 0 inside the window, so a plain remainder is the modulo there.
                hidden = hidden .& ((d &- Int32(clamping: lo)) % SIMD16<Int32>(repeating: m) .== SIMD16<Int32>(repeating: 0))
            }
            if causal { hidden = hidden .| (d .> SIMD16<Int32>(repeating: 0)) }
            return hidden
        }
    }
}
