/// Positions `start, start + step, …, start + (count − 1) · step`: a tile of queries or
/// keys as the tiled softmax kernel reads it (rows `step` apart, read in place).
struct PositionRun: Hashable {
    var start: Int
    var count: Int
    var step: Int = 1

    /// The `n`-th position of the run.
    @inline(__always)
    func position(_ n: Int) -> Int { start + n * step }

    /// The last position (`start − step` when empty).
    var last: Int { start + (count - 1) * step }
}

/// A key tile listed by a mask: the keys, whether every listed query sees every key of
/// the tile (then the kernel skips masking), and which part of the pattern listed it
/// (mask-defined, handed back to ``TileMask/maskScores(_:ld:tile:queries:)``).
struct KeyTile {
    var keys: PositionRun
    var fullyVisible: Bool
    var part: Int = 0
}

/// Which keys each query sees, as the tiled softmax kernel consumes it.
///
/// A mask is a description, never a dense `Nq × Nk` array. It splits a head's queries
/// into disjoint query tiles (runs with a step, at most `queryTile` queries each: one
/// work item each), lists for a tile the key tiles that may hold visible pairs (runs
/// with a step, disjoint, at most `tileSize` keys), says which of them are entirely
/// visible (the kernel runs those without masking), and masks the scores of the others
/// in place. Listing a tile with no visible pair costs time, never correctness.
protocol TileMask {
    /// How this head's queries split into query tiles (default: contiguous tiles).
    var queryPartition: QueryPartition { get }

    /// Calls `body` for each key tile that may hold a visible pair for `queries`.
    /// Keys outside every listed tile are invisible.
    func forEachKeyTile(queries: PositionRun, tileSize: Int, _ body: (KeyTile) -> Void)

    /// Sets to `-infinity` the invisible entries of a transposed score tile:
    /// `scores[jj · ld + ii]` holds the score of query `queries.position(ii)` and key
    /// `tile.keys.position(jj)`, for `jj < tile.keys.count` and `ii < queries.count`
    /// rounded up to 16 (lanes past the count may be masked or not).
    func maskScores(_ scores: UnsafeMutablePointer<Float>, ld: Int, tile: KeyTile, queries: PositionRun)

    /// The keys of a partially visible `tile` (indices into `tile.keys`) that the query
    /// lanes `lanes` (one block of ``MicroTile/mr`` lanes; lanes past `queries.count`
    /// are padding) may see: the kernel's `P V` product skips the others, whose
    /// probabilities are 0 after masking. Default: the whole tile. Narrow bands return
    /// the band's cut of the tile, so its wasted triangles cost half.
    func visibleKeyIndices(tile: KeyTile, queries: PositionRun, lanes: Range<Int>) -> Range<Int>

    /// The query lanes (indices into `queries`) that may see any of the keys `keys`
    /// (indices into `tile.keys`) of a partially visible `tile`: the kernel scores those
    /// keys' rows only on the half panels (16 lanes) holding these lanes and leaves the
    /// rest of the rows as they were, so ``maskScores(_:ld:tile:queries:)`` must hide every
    /// pair outside the range (a mask whose masking is a predicate over every lane does).
    /// Default: every lane (nothing skipped). The band's edges and causal diagonal tiles
    /// (``IntervalMask``) skip the half panels of the queries that see none of a block's keys.
    func scoredQueryLanes(tile: KeyTile, queries: PositionRun, keys: Range<Int>) -> Range<Int>

    /// Whether the kernel calls ``addScoreTerms(_:)``; `false` (the default) removes the
    /// call from the specialised kernel. Masks that add score terms list contiguous
    /// query tiles and key tiles (runs of step 1).
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
    /// `false` (the default) removes the call from the specialised kernel. Masks that
    /// weight probabilities list runs of step 1.
    static var weightsProbabilities: Bool { get }

    /// Multiplies the probabilities `exp(s − m')` of a transposed tile
    /// (`probabilities[jj · ld + ii]`: key `keyStart + jj`, query `queryStart + ii`) by
    /// per-pair weights in `[0, 1]`, before the kernel adds them to the row sums (adaptive
    /// span's soft mask). The row's log-sum-exp then is `log Σ_j w_ij exp(s_ij)`.
    /// Default: nothing.
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
    var queryPartition: QueryPartition { .tiles }

    func visibleKeyIndices(tile: KeyTile, queries: PositionRun, lanes: Range<Int>) -> Range<Int> {
        0..<tile.keys.count
    }

    func scoredQueryLanes(tile: KeyTile, queries: PositionRun, keys: Range<Int>) -> Range<Int> {
        0..<queries.count
    }

    static var addsScoreTerms: Bool { false }
    static func scoreTermScratchCount(queryTile: Int, keyTile: Int) -> Int { 0 }
    func addScoreTerms(_ tile: ScoreTile) {}
    static var weightsProbabilities: Bool { false }
    func weightProbabilities(_ probabilities: UnsafeMutablePointer<Float>, ld: Int,
                             keyStart: Int, keyCount: Int, queryStart: Int, queryCount: Int) {}

    /// The number of query tiles of this head (some may be empty).
    func queryTileCount(queryLength: Int, tileSize: Int) -> Int {
        queryPartition.tileCount(queryLength: queryLength, tileSize: tileSize)
    }

    /// Query tile `index` (`count == 0` for an empty tile, and for every `index` at or
    /// past ``queryTileCount(queryLength:tileSize:)``). Groups are disjoint.
    func queryTile(_ index: Int, queryLength: Int, tileSize: Int) -> PositionRun {
        queryPartition.tile(index, queryLength: queryLength, tileSize: tileSize)
    }
}

/// How a pattern splits one head's queries `0..<Nq` into tiles of at most `queryTile`.
enum QueryPartition {
    /// Contiguous tiles `[t · Br, (t + 1) · Br)`.
    case tiles
    /// Contiguous tiles that never straddle a block boundary; query `i` is in block
    /// `⌊(i + origin) / size⌋`.
    case blocks(size: Int, origin: Int)
    /// Residue classes `i mod modulus`, each cut into runs of step `modulus`.
    case residues(modulus: Int)
    /// The given sorted, disjoint ranges of queries, each cut into tiles.
    case ranges([Range<Int>])
    /// Lines of `length` positions `stride` apart (a grid's axis with that stride):
    /// line `n` starts at `⌊n / stride⌋ · length · stride + n mod stride`; each line is cut
    /// into tiles of step `stride`. `Nq` must be a multiple of `length · stride`.
    case lines(stride: Int, length: Int)

    func tileCount(queryLength n: Int, tileSize br: Int) -> Int {
        switch self {
        case .tiles:
            return ceilDiv(n, br)
        case .blocks(let size, let origin):
            let blocks = BlockTiles(size: size, origin: origin, queryLength: n, queryTile: br)
            return blocks.count
        case .residues(let m):
            return min(m, n) * ceilDiv(ceilDiv(n, m), br)
        case .ranges(let ranges):
            return ranges.reduce(0) { $0 + ceilDiv($1.count, br) }
        case .lines(_, let length):
            return n / length * ceilDiv(length, br)
        }
    }

    func tile(_ index: Int, queryLength n: Int, tileSize br: Int) -> PositionRun {
        switch self {
        case .tiles:
            return PositionRun(start: index * br, count: min(br, n - index * br))
        case .blocks(let size, let origin):
            return BlockTiles(size: size, origin: origin, queryLength: n, queryTile: br).tile(index)
        case .residues(let m):
            let perClass = ceilDiv(ceilDiv(n, m), br)
            let residue = index / perClass, tile = index % perClass
            // Kernels run the largest tile count over all heads; past this head's own
            // count, `residue ≥ m` would repeat the queries of residue `residue − m`.
            guard residue < m else { return PositionRun(start: 0, count: 0) }
            let members = ceilDiv(n - residue, m)
            return PositionRun(start: residue + tile * br * m,
                               count: max(0, min(br, members - tile * br)), step: m)
        case .ranges(let ranges):
            var index = index
            for range in ranges {
                let tiles = ceilDiv(range.count, br)
                if index < tiles {
                    let start = range.lowerBound + index * br
                    return PositionRun(start: start, count: min(br, range.upperBound - start))
                }
                index -= tiles
            }
            return PositionRun(start: 0, count: 0)
        case .lines(let stride, let length):
            let perLine = ceilDiv(length, br)
            let line = index / perLine, part = index % perLine
            guard line < n / length else { return PositionRun(start: 0, count: 0) }
            let base = line / stride * length * stride + line % stride
            return PositionRun(start: base + part * br * stride, count: min(br, length - part * br), step: stride)
        }
    }
}

/// The query tiles of ``QueryPartition/blocks(size:origin:)``: block `b` covers queries
/// `[b · size − shift, (b + 1) · size − shift)` (`shift = origin mod size`), cut into
/// `perBlock = ⌈size / Br⌉` parts of `part = ⌈size / perBlock⌉` queries, clipped to
/// `0..<Nq`. Only the parts that hold a query are listed, in block order: a block far
/// larger than `Nq` (2^30) gives a few tiles, not `size / Br` mostly empty ones.
///
/// - Complexity: O(1) for the count and for each tile.
struct BlockTiles {
    let size: Int, shift: Int, queryLength: Int, perBlock: Int, part: Int
    /// Blocks that hold a query.
    let blocks: Int

    init(size: Int, origin: Int, queryLength: Int, queryTile: Int) {
        self.size = size
        shift = positiveModulo(origin, size)
        self.queryLength = queryLength
        perBlock = ceilDiv(size, queryTile)
        part = ceilDiv(size, perBlock)
        blocks = ceilDiv(queryLength + shift, size)
    }

    /// The parts `k` of block `b` that hold a query.
    func parts(ofBlock b: Int) -> Range<Int> {
        let blockStart = b * size - shift
        let blockEnd = min(queryLength, blockStart + size)
        let first = blockStart >= 0 ? 0 : -blockStart / part
        let end = min(perBlock, ceilDiv(blockEnd - blockStart, part))
        return first..<max(first, end)
    }

    /// Parts of each block between the first and the last (all of them full).
    private var middleParts: Int { blocks > 2 ? parts(ofBlock: 1).count : 0 }

    var count: Int {
        blocks == 1 ? parts(ofBlock: 0).count
            : parts(ofBlock: 0).count + (blocks - 2) * middleParts + parts(ofBlock: blocks - 1).count
    }

    /// Group `index` (`0..<count`).
    func tile(_ index: Int) -> PositionRun {
        let head = parts(ofBlock: 0), middle = (blocks - 2) * middleParts
        let b: Int, k: Int
        if index < head.count || blocks == 1 {
            (b, k) = (0, head.lowerBound + index)
        } else if index - head.count < middle {
            (b, k) = (1 + (index - head.count) / middleParts, (index - head.count) % middleParts)
        } else {
            (b, k) = (blocks - 1, parts(ofBlock: blocks - 1).lowerBound + index - head.count - middle)
        }
        let blockStart = b * size - shift
        let start = blockStart + k * part
        let end = min(queryLength, blockStart + size, start + part)
        let first = max(0, start)
        return PositionRun(start: first, count: max(0, end - first))
    }
}

/// Calls `body` with tiles of at most `tileSize` keys covering `first, first + step, …`
/// up to `last` (nothing when `last < first`).
@inline(__always)
func forEachTile(from first: Int, through last: Int, step: Int = 1, tileSize: Int,
                 _ body: (PositionRun) -> Void) {
    guard first <= last else { return }
    let total = (last - first) / step + 1
    var n = 0
    while n < total {
        let count = min(tileSize, total - n)
        body(PositionRun(start: first + n * step, count: count, step: step))
        n += count
    }
}

/// The indices `n` of `keys` whose positions `keys.position(n)` lie in `lo...hi`
/// (empty when none do); `keys.step > 0`.
@inline(__always)
func runIndices(_ keys: PositionRun, from lo: Int, through hi: Int) -> Range<Int> {
    let first = max(0, -floorDiv(keys.start - lo, keys.step))        // ⌈(lo − start) / step⌉
    let last = min(keys.count - 1, floorDiv(hi - keys.start, keys.step))
    return first <= last ? first..<(last + 1) : 0..<0
}

/// The query positions of the lanes `lanes` of `queries` that are real queries, as
/// `(first, last)` positions, or `nil` when every lane is padding.
@inline(__always)
func lanePositions(_ queries: PositionRun, _ lanes: Range<Int>) -> (first: Int, last: Int)? {
    let end = min(lanes.upperBound, queries.count)
    guard lanes.lowerBound < end else { return nil }
    return (queries.position(lanes.lowerBound), queries.position(end - 1))
}

/// Hides, in a transposed score tile, each key's pair with the query at its own position
/// less `offset` (query `i = j − offset`): at most one score per key row, set directly, for
/// masks whose only hidden pairs in a tile are these (a strided column's own position, an
/// axial line's query itself).
@inline(__always)
func hideOwnPositions(_ scores: UnsafeMutablePointer<Float>, ld: Int, keys: PositionRun, queries: PositionRun,
                      offset: Int = 0) {
    for jj in 0..<keys.count {
        let d = keys.position(jj) - offset - queries.start
        if d >= 0 && d % queries.step == 0 && d / queries.step < queries.count {
            scores[jj * ld + d / queries.step] = -.infinity
        }
    }
}

/// Masks a transposed score tile (see ``TileMask/maskScores(_:ld:tile:queries:)``) with
/// a per-key predicate over 16 query lanes at a time: `hidden(j, i)` gets key position
/// `j` and the query positions `i` of 16 lanes and returns the lanes that must not see `j`.
@inline(__always)
func maskTransposedScores(_ scores: UnsafeMutablePointer<Float>, ld: Int, keys: PositionRun,
                          queries: PositionRun,
                          hidden: (_ key: Int, _ queries: SIMD16<Int32>) -> SIMDMask<SIMD16<Int32>>) {
    let lanes = SIMD16<Int32>(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
    let stepped = lanes &* Int32(truncatingIfNeeded: queries.step)
    let minusInfinity = Vec16(repeating: -.infinity)
    for jj in 0..<keys.count {
        let j = keys.position(jj)
        let row = scores + jj * ld
        var ii = 0
        while ii < queries.count {
            let positions = stepped &+ Int32(truncatingIfNeeded: queries.position(ii))
            var v = load16(row + ii)
            v.replace(with: minusInfinity, where: hidden(j, positions))
            store16(v, row + ii)
            ii += 16
        }
    }
}

/// ``TileMask/visibleKeyIndices(tile:queries:lanes:)`` for a tile cut by the causal rule
/// alone (the partner of ``maskCausalDiagonal(_:ld:keys:queries:offset:)``): the keys up
/// to the last real query of `lanes`, plus `offset`.
@inline(__always)
func causalVisibleKeyIndices(tile: KeyTile, queries: PositionRun, lanes: Range<Int>, offset: Int) -> Range<Int> {
    guard let p = lanePositions(queries, lanes) else { return 0..<0 }
    return runIndices(tile.keys, from: tile.keys.start, through: p.last + offset)
}

/// Masks by the causal rule alone: key `j` is hidden from query `i` iff `j > i + offset`.
@inline(__always)
func maskCausalDiagonal(_ scores: UnsafeMutablePointer<Float>, ld: Int, keys: PositionRun,
                        queries: PositionRun, offset: Int) {
    maskTransposedScores(scores, ld: ld, keys: keys, queries: queries) { j, i in
        i .< SIMD16<Int32>(repeating: Int32(clamping: j - offset))
    }
}

/// The mask where each query sees one interval of keys:
/// key `j` is visible to query `i` iff `i + offset − left ≤ j ≤ i + offset + right` and
/// `j < keyEnd`.
///
/// With `offset = Nk − Nq` (bottom-right alignment) this is FlashAttention's single mask
/// model: no mask is `left = right = unbounded`, causal is `right = 0`, a sliding window
/// is finite `left`/`right`, and key padding is `keyEnd < Nk`. Query tiles may have any
/// step (key tiles are contiguous).
struct IntervalMask: TileMask {
    /// A window side that never limits anything (kept far from `Int` overflow).
    static let unbounded = 1 << 40

    var offset: Int
    var left: Int
    var right: Int
    var keyEnd: Int

    init(offset: Int, left: Int, right: Int, keyEnd: Int) {
        self.offset = offset
        self.left = left
        self.right = right
        self.keyEnd = keyEnd
    }

    /// Dense attention (optionally causal) over `keyEnd` valid keys.
    init(queryLength: Int, keyLength: Int, causal: Bool, keyEnd: Int) {
        self.init(offset: keyLength - queryLength, left: IntervalMask.unbounded,
                  right: causal ? 0 : IntervalMask.unbounded, keyEnd: keyEnd)
    }

    func forEachKeyTile(queries: PositionRun, tileSize: Int, _ body: (KeyTile) -> Void) {
        let firstQuery = queries.start, lastQuery = queries.last
        let first = max(0, firstQuery + offset - left)
        let last = min(keyEnd - 1, lastQuery + offset + right)
        forEachTile(from: first, through: last, tileSize: tileSize) { keys in
            let full = lastQuery + offset - left <= keys.start && keys.last <= firstQuery + offset + right
            body(KeyTile(keys: keys, fullyVisible: full))
        }
    }

    func visibleKeyIndices(tile: KeyTile, queries: PositionRun, lanes: Range<Int>) -> Range<Int> {
        guard let p = lanePositions(queries, lanes) else { return 0..<0 }
        return runIndices(tile.keys, from: p.first + offset - left, through: p.last + offset + right)
    }

    /// The queries that see the keys (``visibleQueryIndices(tile:queries:keys:)``): the
    /// masking below is a predicate over every lane of each row it touches, and the rows it
    /// skips are those every query sees.
    func scoredQueryLanes(tile: KeyTile, queries: PositionRun, keys: Range<Int>) -> Range<Int> {
        visibleQueryIndices(tile: tile, queries: queries, keys: keys)
    }

    func maskScores(_ scores: UnsafeMutablePointer<Float>, ld: Int, tile: KeyTile, queries: PositionRun) {
        // Keys every query of the tile sees need nothing: mask only the rows before and after them.
        let keys = tile.keys
        let all = runIndices(keys, from: queries.last + offset - left, through: queries.start + offset + right)
        func mask(rows: Range<Int>) {
            guard !rows.isEmpty else { return }
            let part = PositionRun(start: keys.position(rows.lowerBound), count: rows.count, step: keys.step)
            maskTransposedScores(scores + rows.lowerBound * ld, ld: ld, keys: part, queries: queries) { j, i in
                // Queries that see key j: j − offset − right ≤ i ≤ j − offset + left.
                let lo = Int32(clamping: j - offset - right), hi = Int32(clamping: j - offset + left)
                return (i .< SIMD16<Int32>(repeating: lo)) .| (i .> SIMD16<Int32>(repeating: hi))
            }
        }
        if all.isEmpty {
            mask(rows: 0..<keys.count)
        } else {
            mask(rows: 0..<all.lowerBound)
            mask(rows: all.upperBound..<keys.count)
        }
    }
}

@inline(__always)
func ceilDiv(_ a: Int, _ b: Int) -> Int { a <= 0 ? 0 : (a + b - 1) / b }

/// The lanes of the half panels (``MicroTile/nr`` / 2 lanes each, at most `lanes`) holding
/// the lanes `seen`: what the tiled kernels score of a block of keys those lanes may see.
@inline(__always)
func halfPanelLanes(holding seen: Range<Int>, lanes: Int) -> Range<Int> {
    let half = MicroTile.nr / 2
    return seen.isEmpty ? 0..<0 : (seen.lowerBound / half * half)..<min(lanes, roundUp(seen.upperBound, half))
}

/// `body(panel, halfWidth)` for the micro-kernel calls that cover `lanes` (bounds multiples
/// of 16, ``halfPanelLanes(holding:lanes:)``): whole 32-lane panels from `lanes.lowerBound`,
/// and a 16-lane half panel (``microKernel``'s `halfWidth`) where fewer than 32 lanes remain.
@inline(__always)
func forEachPanel(_ lanes: Range<Int>, _ body: (_ panel: Int, _ halfWidth: Bool) -> Void) {
    var panel = lanes.lowerBound
    while panel < lanes.upperBound {
        let half = lanes.upperBound - panel < MicroTile.nr
        body(panel, half)
        panel += half ? MicroTile.nr / 2 : MicroTile.nr
    }
}

/// `a mod m` in `0..<m` for any sign of `a` (`m > 0`).
@inline(__always)
func positiveModulo(_ a: Int, _ m: Int) -> Int {
    let r = a % m
    return r < 0 ? r + m : r
}

/// `⌊a / m⌋` for any sign of `a` (`m > 0`).
@inline(__always)
func floorDiv(_ a: Int, _ m: Int) -> Int {
    a >= 0 ? a / m : -((-a + m - 1) / m)
}
