import Foundation

/// A visibility rule written as a type, the library's form of FlexAttention's `mask_mod`:
/// the compiler specialises the kernel for it (no closure call per pair).
///
/// `isVisible` must be a pure function of its arguments and the predicate's stored
/// properties (it is evaluated once per pair when the block mask is built, and again per
/// pair of the partially visible tiles).
public protocol VisibilityPredicate: Sendable, Equatable {
    /// Whether key `key` (`0..<Nk`) is visible to query `query` (`0..<Nq`) of query head
    /// `head` in batch item `batch`.
    func isVisible(batch: Int, head: Int, query: Int, key: Int) -> Bool

    /// Whether the rule depends on the batch item or head. `false` (the default): one
    /// block mask serves every head, built with `batch` and `head` 0.
    var variesByHead: Bool { get }

    /// The lanes of `queries` (16 query positions) that do not see `key`: the form the
    /// kernel masks a partial tile with. The default asks ``isVisible(batch:head:query:key:)``
    /// lane by lane; a rule that can be written with vector operations (comparisons of
    /// positions) implements it to mask 16 pairs at a time. It must agree with `isVisible`.
    func hiddenLanes(batch: Int, head: Int, queries: SIMD16<Int32>, key: Int) -> SIMDMask<SIMD16<Int32>>
}

extension VisibilityPredicate {
    public var variesByHead: Bool { false }

    public func hiddenLanes(batch: Int, head: Int, queries: SIMD16<Int32>, key: Int) -> SIMDMask<SIMD16<Int32>> {
        var hidden = SIMDMask<SIMD16<Int32>>()
        for l in 0..<16 { hidden[l] = !isVisible(batch: batch, head: head, query: Int(queries[l]), key: key) }
        return hidden
    }
}

/// Documents of `length` positions packed one after another (the last may be shorter): a
/// query sees the keys of its own document, and with `causal` only those up to itself
/// (query and key positions aligned from 0; use it with `Nq == Nk`).
public struct DocumentMask: VisibilityPredicate {
    public let length: Int
    public let causal: Bool

    /// Throws unless `length` is at least 1.
    public init(length: Int, causal: Bool = false) throws {
        guard length >= 1 else {
            throw AttentionError.invalidParameter("DocumentMask length must be at least 1, got \(length)")
        }
        self.length = length
        self.causal = causal
    }

    public func isVisible(batch: Int, head: Int, query: Int, key: Int) -> Bool {
        query / length == key / length && (!causal || key <= query)
    }

    /// 16 queries at a time: hidden when the query lies outside the key's document
    /// `[start, start + length)` (or, causal, before the key).
    public func hiddenLanes(batch: Int, head: Int, queries: SIMD16<Int32>, key: Int) -> SIMDMask<SIMD16<Int32>> {
        let start = key / length * length
        let first = SIMD16<Int32>(repeating: Int32(truncatingIfNeeded: causal ? key : start))
        let end = SIMD16<Int32>(repeating: Int32(truncatingIfNeeded: min(start + length, Int(Int32.max))))
        return (queries .< first) .| (queries .>= end)
    }
}

/// A score transformation written as a type, the library's form of FlexAttention's
/// `score_mod`: ``CustomMaskAttention`` applies it to every scored pair inside the tiled
/// kernel, specialised for the type (no closure call per pair).
///
/// The kernel calls ``scores(_:batch:head:queries:key:)`` on the scaled scores
/// `s = scale · dot(q, k)` of 16 queries and one key, before the built-in
/// ``ScoreModifiers`` (soft-capping, bias, ALiBi) and before masking. It must be a pure
/// function of its arguments and the type's stored properties. A result of `−∞` hides the
/// pair (a row whose pairs are all hidden gives 0); `+∞` or NaN makes the row NaN.
public protocol ScoreFunction: Sendable, Equatable {
    /// The transformed score of query `query` and key `key` (positions in the call, `0..<Nq`
    /// and `0..<Nk`) of query head `head` in batch item `batch`, given the scaled score.
    func score(_ score: Float, batch: Int, head: Int, query: Int, key: Int) -> Float

    /// 16 query positions at a time (lanes past the tile's last query repeat it). The
    /// default calls ``score(_:batch:head:query:key:)`` lane by lane; a function that can be
    /// written with vector operations implements it. It must agree with `score`.
    func scores(_ scores: SIMD16<Float>, batch: Int, head: Int, queries: SIMD16<Int32>, key: Int) -> SIMD16<Float>

    /// Whether the function returns its score unchanged; `true` removes it from the
    /// specialised kernel. Default `false`.
    static var isIdentity: Bool { get }
}

/// `f(values[l], queries[l])` for the 16 lanes: the lane-by-lane defaults of the vector forms.
@inline(__always)
private func laneByLane(_ values: SIMD16<Float>, _ queries: SIMD16<Int32>,
                        _ f: (_ value: Float, _ query: Int) -> Float) -> SIMD16<Float> {
    var result = values
    for l in 0..<16 { result[l] = f(values[l], Int(queries[l])) }
    return result
}

extension ScoreFunction {
    public func scores(_ scores: SIMD16<Float>, batch: Int, head: Int, queries: SIMD16<Int32>,
                       key: Int) -> SIMD16<Float> {
        laneByLane(scores, queries) { score($0, batch: batch, head: head, query: $1, key: key) }
    }

    public static var isIdentity: Bool { false }
}

/// A ``ScoreFunction`` with a derivative: what makes ``CustomMaskAttention`` differentiable
/// (``DifferentiableAttention``). The backward recomputes each transformed score as the
/// forward does and multiplies the gradient of the transformed score by
/// `f′(s) = ∂ score(s, …) / ∂s` at the scaled score `s` (KernelDocs/ScoreModifiers.md,
/// "Backward of custom masks and score functions").
///
/// ```
/// // naive reference, per visible pair (the built-in modifiers m after f):
/// s = scale · dot(q_i, k_j),  s′ = m(f(s)),  P = exp(s′ − lse_i),  G = P · (dO_i · v_j − dO_i · o_i)
/// dS_raw = G · m′(f(s)) · f′(s);   dQ_i += scale · dS_raw · k_j,   dK_j += scale · dS_raw · q_i
/// ```
///
/// Only the dependence on the score is differentiated: the function's own stored
/// properties (a table, slopes) are constants of the backward and get no gradient (a
/// learned additive table belongs in ``ScoreModifiers/bias``, whose gradient
/// ``ModifiableAttention/modifierGradients(query:key:value:result:outputGradient:keyLengths:threads:)``
/// returns). A function whose derivative is not defined somewhere it is used should not
/// conform: it keeps the forward only. Where the function returns `−∞` (a hidden pair)
/// its derivative is never used (the pair's probability is 0 and the kernel takes the
/// derivative as 0 there), so it may be anything, even NaN.
///
/// - Complexity: one call of ``derivatives(_:batch:head:queries:key:)`` per 16 recomputed
///   scores in the backward, plus one multiply per score (none for ``IdentityScore``).
public protocol DifferentiableScoreFunction: ScoreFunction {
    /// `∂ score(s, …) / ∂s` for query `query`, key `key` of query head `head` in batch item
    /// `batch`, at the scaled score `s` (the argument ``ScoreFunction/score(_:batch:head:query:key:)`` got).
    func derivative(_ score: Float, batch: Int, head: Int, query: Int, key: Int) -> Float

    /// 16 query positions at a time (lanes past the tile's last query repeat it), as
    /// ``ScoreFunction/scores(_:batch:head:queries:key:)``. The default calls
    /// ``derivative(_:batch:head:query:key:)`` lane by lane; it must agree with it.
    func derivatives(_ scores: SIMD16<Float>, batch: Int, head: Int, queries: SIMD16<Int32>, key: Int) -> SIMD16<Float>
}

extension DifferentiableScoreFunction {
    public func derivatives(_ scores: SIMD16<Float>, batch: Int, head: Int, queries: SIMD16<Int32>,
                            key: Int) -> SIMD16<Float> {
        laneByLane(scores, queries) { derivative($0, batch: batch, head: head, query: $1, key: key) }
    }
}

/// The score function that changes nothing (``CustomMaskAttention`` with a mask only). Its
/// derivative is 1: the backward kernel skips both the function and the multiply.
public struct IdentityScore: DifferentiableScoreFunction {
    public init() {}
    public func score(_ score: Float, batch: Int, head: Int, query: Int, key: Int) -> Float { score }
    public func derivative(_ score: Float, batch: Int, head: Int, query: Int, key: Int) -> Float { 1 }
    public static var isIdentity: Bool { true }
}

/// The predicate that shows every pair (``CustomMaskAttention`` with a score function only).
public struct AllVisible: VisibilityPredicate {
    public init() {}
    public func isVisible(batch: Int, head: Int, query: Int, key: Int) -> Bool { true }
    public func hiddenLanes(batch: Int, head: Int, queries: SIMD16<Int32>, key: Int) -> SIMDMask<SIMD16<Int32>> {
        SIMDMask()
    }
}

/// Softmax attention over the pairs a ``VisibilityPredicate`` makes visible (FlexAttention's
/// `mask_mod`), on the tiled kernel with a block mask: every (query tile, key tile) is
/// classified once as skipped (no visible pair), full (every pair visible: no masking) or
/// partial (the predicate masks its pairs), so a document or causal mask skips what it hides.
///
/// ```swift
/// struct Documents: VisibilityPredicate {      // K documents of `length` positions
///     var length: Int
///     func isVisible(batch: Int, head: Int, query: Int, key: Int) -> Bool { query / length == key / length }
/// }
/// let attention = CustomMaskAttention(predicate: Documents(length: 256))
/// ```
///
/// Key padding (`keyLengths`) hides keys as usual; rows with no visible key are 0 with
/// log-sum-exp `-infinity`. A ``ScoreFunction`` (FlexAttention's `score_mod`) transforms
/// the scaled scores of the visible tiles first, then ``ScoreModifiers`` apply:
///
/// ```swift
/// struct Tilt: ScoreFunction {                 // a per-head linear tilt, as ALiBi
///     var slope: Float
///     func score(_ s: Float, batch: Int, head: Int, query: Int, key: Int) -> Float {
///         s - slope * Float(head + 1) * Float(abs(query - key))
///     }
/// }
/// let tilted = CustomMaskAttention(predicate: AllVisible(), score: Tilt(slope: 0.1))
/// ```
///
/// The block mask is built on the first
/// call for a shape (`Nq · Nk` predicate evaluations, times `B · H` when the rule varies by
/// head) and kept for the next calls with the same predicate and shape. With a
/// ``DifferentiableScoreFunction`` (``IdentityScore`` included) it has a backward
/// (``DifferentiableAttention``) that reuses it.
///
/// - Complexity: `2 · pairs · (D + Dv)` FLOPs over the pairs of the listed tiles; the block
///   mask is `⌈Nq/Br⌉ · ⌈Nk/Bc⌉` bytes per head plus its cells, `⌈Nq/64⌉ · ⌈Nk/64⌉` bytes
///   (one set for all heads when the rule does not vary); workspace as dense attention's.
///   KernelDocs/ScoreModifiers.md, "Custom masks".
public struct CustomMaskAttention<Predicate: VisibilityPredicate, Score: ScoreFunction>: KernelWidening,
    ModifiableAttention {
    public var predicate: Predicate
    /// The score transformation (``IdentityScore`` for a mask alone).
    public var score: Score
    /// Score scale; `nil` means `1 / sqrt(D)`. Must be finite.
    public var scale: Float?
    /// Soft-capping, ALiBi, an additive bias and sinks (``ScoreModifiers``); none by default.
    public var modifiers = ScoreModifiers()
    /// The block masks of the last shape.
    private let plans = PlanCache<PlanKey, CustomMaskPlan>()

    private struct PlanKey: Equatable {
        var predicate: Predicate
        var batch: Int, heads: Int, queryLength: Int, keyLength: Int, queryTile: Int
    }

    /// A mask with a score function.
    public init(predicate: Predicate, score: Score, scale: Float? = nil) {
        self.predicate = predicate
        self.score = score
        self.scale = scale
    }

    public var name: String { "custom-mask" }

    /// Most predicate evaluations a block mask may take (2^36: about a minute of a simple rule).
    public static var maxEvaluations: Int { 1 << 36 }

    public func validate(_ shape: AttentionShape) throws {
        let variant = "custom-mask attention"
        try checkPatternShape(shape, scale: scale, variant: variant)
        let heads = predicate.variesByHead ? shape.batch * shape.heads : 1
        guard let evaluations = checkedProduct([shape.queryLength, shape.keyLength, heads]),
              evaluations <= Self.maxEvaluations else {
            throw AttentionError.unsupported(
                "\(variant): the block mask would evaluate the predicate Nq · Nk\(predicate.variesByHead ? " · B · H" : "") = \(shape.queryLength) · \(shape.keyLength)\(predicate.variesByHead ? " · \(heads)" : "") times, more than \(Self.maxEvaluations)")
        }
    }

    public func cost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        let threads = try threadCount(threads)
        let blocks = try plan(for: shape)
        let pairs = blocks.listedPairs(batch: shape.batch, heads: shape.heads)
        return AttentionCost(flops: 2 * Double(pairs) * Double(shape.headDim + shape.valueDim),
                             workspaceBytes: TiledSoftmaxAttention.workspaceBytes(
                                shape: shape, threads: threads, queryTile: blocks.queryTile,
                                mask: PredicateMask<Predicate, Score>.self),
                             scoredPairs: pairs)
    }

    /// The forward's block mask of `shape` (see ``blockMasks(for:)``).
    func plan(for shape: AttentionShape) throws -> BlockMask {
        try blockMasks(for: shape).forward
    }

    /// The block masks of `shape`, built once per predicate and shape: the predicate is
    /// evaluated once per pair into cells that tile both the forward's (query tile × key
    /// tile) and the backward's (query tile × key block) tiles, whose classes are then the
    /// cells' combined (``BlockMask/init(coarsening:queryTile:keyTile:)``).
    func blockMasks(for shape: AttentionShape) throws -> CustomMaskPlan {
        try validate(shape)
        let br = DenseAttention.queryTile(shape), bc = TiledSoftmaxAttention.Tiling.keyTile
        let key = PlanKey(predicate: predicate, batch: shape.batch, heads: shape.heads,
                          queryLength: shape.queryLength, keyLength: shape.keyLength, queryTile: br)
        return try plans.plan(for: key) {
            let cells = try BlockMask(predicate, shape: shape,
                                      queryTile: gcd(br, TiledSoftmaxBackward.queryTileSize),
                                      keyTile: gcd(bc, TiledSoftmaxBackward.keyBlockSize))
            return CustomMaskPlan(cells: cells, forward: try BlockMask(coarsening: cells, queryTile: br, keyTile: bc))
        }
    }

    /// The kernel widens every operand itself.
    func stagedOperands(_ shape: AttentionShape) -> (query: Bool, output: Bool) { (false, false) }

    public func attend(query: ActivationView, key: ActivationView, value: ActivationView,
                       output: MutableActivationView, logSumExp: MutableStridedView?,
                       keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws {
        try withCheckedCall(query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                            keyLengths: keyLengths, workspace: workspace, threads: threads, scale: scale,
                            modifiers: modifiers) { call in
            let blocks = try plan(for: call.shape)
            let predicate = self.predicate, score = self.score
            TiledSoftmaxAttention.attend(call, queryTile: blocks.queryTile) { b, h in
                PredicateMask(predicate: predicate, score: score, blocks: blocks, batch: b, head: h,
                              heads: call.shape.heads, keyEnd: call.keyEnd(b))
            }
        }
    }
}

/// The block masks of one shape: the cells the predicate was evaluated into, and the
/// forward's tiles combined from them. The backward reads the cells
/// (``PredicateBackwardMask``).
struct CustomMaskPlan: Sendable {
    let cells: BlockMask
    let forward: BlockMask
}

/// The greatest common divisor of two positive sizes.
func gcd(_ a: Int, _ b: Int) -> Int {
    var (a, b) = (a, b)
    while b != 0 { (a, b) = (b, a % b) }
    return a
}

/// The classes of every (query tile, key tile) of a custom mask, per head (or one set for
/// all heads): 0 skipped, 1 partial, 2 full.
struct BlockMask: @unchecked Sendable {
    let queryTile: Int, keyTile: Int
    let queryTiles: Int, keyTiles: Int
    let queryLength: Int, keyLength: Int
    /// Whether there is one set of classes per (batch item, head).
    let perHead: Bool
    let classes: [UInt8]

    static let skipped: UInt8 = 0, partial: UInt8 = 1, full: UInt8 = 2

    init<P: VisibilityPredicate>(_ predicate: P, shape: AttentionShape, queryTile: Int, keyTile: Int) throws {
        self.queryTile = queryTile
        self.keyTile = keyTile
        queryLength = shape.queryLength
        keyLength = shape.keyLength
        queryTiles = ceilDiv(shape.queryLength, queryTile)
        keyTiles = ceilDiv(shape.keyLength, keyTile)
        perHead = predicate.variesByHead
        let sets = perHead ? shape.batch * shape.heads : 1
        try checkAllocation(bytes: checkedProduct([queryTiles, keyTiles, sets]), option: "custom mask block classes")
        var classes = [UInt8](repeating: 0, count: queryTiles * keyTiles * sets)
        for set in 0..<sets {
            let b = perHead ? set / shape.heads : 0, h = perHead ? set % shape.heads : 0
            for t in 0..<queryTiles {
                let queries = (t * queryTile)..<min(shape.queryLength, (t + 1) * queryTile)
                for u in 0..<keyTiles {
                    let keys = (u * keyTile)..<min(shape.keyLength, (u + 1) * keyTile)
                    var seen = 0, visible = 0
                    scan: for i in queries {
                        for j in keys {
                            seen += 1
                            if predicate.isVisible(batch: b, head: h, query: i, key: j) { visible += 1 }
                            if visible > 0 && visible < seen { break scan }
                        }
                    }
                    classes[(set * queryTiles + t) * keyTiles + u] =
                        visible == 0 ? Self.skipped : visible == seen && seen == queries.count * keys.count ? Self.full : Self.partial
                }
            }
        }
        self.classes = classes
    }

    /// The classes of tiles of `queryTile × keyTile` (multiples of `cells`' tiles) combined
    /// from `cells`: skipped when every cell is, full when every cell is, partial otherwise
    /// (the classes a direct evaluation gives; no predicate call).
    init(coarsening cells: BlockMask, queryTile: Int, keyTile: Int) throws {
        precondition(queryTile % cells.queryTile == 0 && keyTile % cells.keyTile == 0, "tiles must be unions of cells")
        self.queryTile = queryTile
        self.keyTile = keyTile
        queryLength = cells.queryLength
        keyLength = cells.keyLength
        queryTiles = ceilDiv(queryLength, queryTile)
        keyTiles = ceilDiv(keyLength, keyTile)
        perHead = cells.perHead
        let sets = cells.classes.count / max(1, cells.queryTiles * cells.keyTiles)
        try checkAllocation(bytes: checkedProduct([queryTiles, keyTiles, sets]), option: "custom mask block classes")
        var classes = [UInt8](repeating: 0, count: queryTiles * keyTiles * sets)
        let rows = queryTile / cells.queryTile, columns = keyTile / cells.keyTile
        for set in 0..<sets {
            for t in 0..<queryTiles {
                let cellRows = (t * rows)..<min(cells.queryTiles, (t + 1) * rows)
                for u in 0..<keyTiles {
                    let cellColumns = (u * columns)..<min(cells.keyTiles, (u + 1) * columns)
                    classes[(set * queryTiles + t) * keyTiles + u] =
                        cells.combined(base: set * cells.queryTiles * cells.keyTiles, rows: cellRows, columns: cellColumns)
                }
            }
        }
        self.classes = classes
    }

    /// The class of the union of tiles `rows × columns` of the set at `base`.
    func combined(base: Int, rows: Range<Int>, columns: Range<Int>) -> UInt8 {
        var skipped = true, full = true
        for t in rows {
            for u in columns {
                let kind = classes[base + t * keyTiles + u]
                skipped = skipped && kind == Self.skipped
                full = full && kind == Self.full
            }
        }
        return skipped ? Self.skipped : full ? Self.full : Self.partial
    }

    /// For the contiguous queries `queries` and keys `keys` (runs starting on a tile
    /// boundary; a run may end inside a tile), the keys of `keys` in the key tiles holding
    /// a visible pair for some query of `queries` (their hull, cut to `keys`), and whether
    /// every pair of it is visible; nil when no tile holds one. `base`: the set's first class.
    func visibleHull(base: Int, queries: PositionRun, keys: PositionRun) -> (keys: PositionRun, full: Bool)? {
        let rows = (queries.start / queryTile)...(queries.last / queryTile)
        let columns = (keys.start / keyTile)...(keys.last / keyTile)
        func seen(_ u: Int) -> Bool { rows.contains { classes[base + $0 * keyTiles + u] != Self.skipped } }
        guard let first = columns.first(where: seen), let last = columns.reversed().first(where: seen) else {
            return nil
        }
        let start = max(keys.start, first * keyTile), end = min(keys.last, (last + 1) * keyTile - 1)
        let full = combined(base: base, rows: rows.lowerBound..<(rows.upperBound + 1),
                            columns: first..<(last + 1)) == Self.full
        return (PositionRun(start: start, count: end - start + 1), full)
    }

    /// The first class index of batch item `b`, head `h`.
    func base(batch b: Int, head h: Int, heads: Int) -> Int {
        perHead ? (b * heads + h) * queryTiles * keyTiles : 0
    }

    /// Query/key pairs in the tiles the kernel runs, over `batch` items and `heads` heads.
    func listedPairs(batch: Int, heads: Int) -> Int {
        var pairs = 0
        for set in 0..<(perHead ? batch * heads : 1) {
            for t in 0..<queryTiles {
                let rows = min(queryLength, (t + 1) * queryTile) - t * queryTile
                for u in 0..<keyTiles where classes[(set * queryTiles + t) * keyTiles + u] != Self.skipped {
                    pairs += rows * (min(keyLength, (u + 1) * keyTile) - u * keyTile)
                }
            }
        }
        return perHead ? pairs : pairs * batch * heads
    }
}

extension CustomMaskAttention where Score == IdentityScore {
    /// A mask alone.
    public init(predicate: Predicate, scale: Float? = nil) {
        self.init(predicate: predicate, score: IdentityScore(), scale: scale)
    }
}

extension CustomMaskAttention where Predicate == AllVisible {
    /// A score function over every pair.
    public init(score: Score, scale: Float? = nil) {
        self.init(predicate: AllVisible(), score: score, scale: scale)
    }
}

/// One head's view of a ``BlockMask``: the key tiles of a query tile that are not skipped,
/// full ones unmasked, partial ones masked pair by pair by the predicate; the score
/// function applied to every listed tile.
struct PredicateMask<P: VisibilityPredicate, S: ScoreFunction>: TileMask {
    let predicate: P
    let score: S
    let blocks: BlockMask
    let batch: Int, head: Int
    let keyEnd: Int
    let base: Int

    init(predicate: P, score: S, blocks: BlockMask, batch: Int, head: Int, heads: Int, keyEnd: Int) {
        self.predicate = predicate
        self.score = score
        self.blocks = blocks
        self.batch = batch
        self.head = head
        self.keyEnd = keyEnd
        base = blocks.base(batch: batch, head: head, heads: heads)
    }

    func forEachKeyTile(queries: PositionRun, tileSize: Int, _ body: (KeyTile) -> Void) {
        assert(tileSize == blocks.keyTile && queries.step == 1, "block mask tiles differ from the kernel's")
        let t = queries.start / blocks.queryTile
        let row = base + t * blocks.keyTiles
        for u in 0..<blocks.keyTiles {
            let kind = blocks.classes[row + u]
            guard kind != BlockMask.skipped else { continue }
            let start = u * blocks.keyTile
            let count = min(blocks.keyTile, keyEnd - start)
            guard count > 0 else { break }
            // Key padding only shortens the tile: the keys left of a full tile are all visible.
            body(KeyTile(keys: PositionRun(start: start, count: count), fullyVisible: kind == BlockMask.full))
        }
    }

    static var addsScoreTerms: Bool { !S.isIdentity }

    /// Applies the score function to 16 query lanes at a time (lanes past the last query
    /// ask about that query again).
    func addScoreTerms(_ tile: ScoreTile) {
        let queries = PositionRun(start: tile.queryStart, count: tile.queryCount)
        for jj in 0..<tile.keyCount {
            let row = tile.scores + jj &* tile.ld
            var ii = 0
            while ii < tile.queryCount {
                let s = load16(row + ii)
                store16(score.scores(s, batch: batch, head: head, queries: lanePositions(queries, from: ii),
                                     key: tile.keyStart + jj), row + ii)
                ii += 16
            }
        }
    }

    /// The positions of `queries`' lanes `first..<first + 16`, those past the last repeating it.
    @inline(__always)
    fileprivate func lanePositions(_ queries: PositionRun, from first: Int) -> SIMD16<Int32> {
        var ramp = SIMD16<Int32>()
        for l in 0..<16 { ramp[l] = Int32(truncatingIfNeeded: l * queries.step) }
        var positions = ramp &+ Int32(truncatingIfNeeded: queries.position(first))
        let last = SIMD16<Int32>(repeating: Int32(truncatingIfNeeded: queries.last))
        positions.replace(with: last, where: positions .> last)
        return positions
    }

    /// Masks 16 query lanes at a time with ``VisibilityPredicate/hiddenLanes(batch:head:queries:key:)``;
    /// padding lanes past the tile's last query ask about that query again (the predicate
    /// only ever sees positions of the call).
    func maskScores(_ scores: UnsafeMutablePointer<Float>, ld: Int, tile: KeyTile, queries: PositionRun) {
        let minusInfinity = Vec16(repeating: -.infinity)
        for jj in 0..<tile.keys.count {
            let j = tile.keys.position(jj), row = scores + jj &* ld
            var ii = 0
            while ii < queries.count {
                var v = load16(row + ii)
                v.replace(with: minusInfinity, where: predicate.hiddenLanes(
                    batch: batch, head: head, queries: lanePositions(queries, from: ii), key: j))
                store16(v, row + ii)
                ii += 16
            }
        }
    }
}

// MARK: - Backward

extension PredicateMask where S: DifferentiableScoreFunction {
    /// The score function applied to the tile (as ``addScoreTerms(_:)``) and its derivatives
    /// at the raw scores written to `derivatives` (0 where the function returns `−∞`).
    func addScoreTerms(_ tile: ScoreTile, derivatives: UnsafeMutablePointer<Float>) {
        let minusInfinity = SIMD16<Float>(repeating: -.infinity), zero = SIMD16<Float>(repeating: 0)
        let queries = PositionRun(start: tile.queryStart, count: tile.queryCount)
        for jj in 0..<tile.keyCount {
            let row = tile.scores + jj &* tile.ld, out = derivatives + jj &* tile.ld
            let key = tile.keyStart + jj
            var ii = 0
            while ii < tile.queryCount {
                let s = load16(row + ii), lanes = lanePositions(queries, from: ii)
                let t = score.scores(s, batch: batch, head: head, queries: lanes, key: key)
                var d = score.derivatives(s, batch: batch, head: head, queries: lanes, key: key)
                d.replace(with: zero, where: t .== minusInfinity)
                store16(t, row + ii)
                store16(d, out + ii)
                ii += 16
            }
        }
    }
}

/// One head's custom mask as the backward pass lists it (``TransposedTileMask``): for a key
/// block (128 contiguous keys) and each query tile (64 contiguous queries), the cells of the
/// plan (``CustomMaskPlan/cells``) the pair of tiles covers: skipped when every cell is (the
/// tile is not listed), else the hull of the key cells with a visible pair, full (no
/// masking) when every cell of that hull is, otherwise masked by the predicate's
/// ``VisibilityPredicate/hiddenLanes(batch:head:queries:key:)`` as in the forward. The
/// score function runs as the forward's, and its derivative scales `dS`.
struct PredicateBackwardMask<P: VisibilityPredicate, S: DifferentiableScoreFunction>: ForwardWrappingMask {
    let forward: PredicateMask<P, S>
    let cells: BlockMask
    /// The head's first cell class.
    let cellBase: Int

    func forEachQueryTile(seeing keys: PositionRun, queryLength: Int, queryTile: Int,
                          _ body: (_ index: Int, _ queries: PositionRun, _ tile: KeyTile) -> Void) {
        precondition(keys.step == 1 && keys.start % cells.keyTile == 0 && queryTile % cells.queryTile == 0,
                     "the backward's tiles must be unions of the block mask's cells")
        let last = min(keys.last, forward.keyEnd - 1)
        guard keys.start <= last else { return }
        let valid = PositionRun(start: keys.start, count: last - keys.start + 1)
        for r in 0..<ceilDiv(queryLength, queryTile) {
            let queries = PositionRun(start: r * queryTile, count: min(queryTile, queryLength - r * queryTile))
            guard let hull = cells.visibleHull(base: cellBase, queries: queries, keys: valid) else { continue }
            body(r, queries, KeyTile(keys: hull.keys, fullyVisible: hull.full))
        }
    }

    /// Every query of a partial tile may see its keys (the cells are as tall as the tile).
    func visibleQueryIndices(tile: KeyTile, queries: PositionRun, keys: Range<Int>) -> Range<Int> {
        keys.isEmpty ? 0..<0 : 0..<queries.count
    }

    func maskScores(_ scores: UnsafeMutablePointer<Float>, ld: Int, tile: KeyTile, queries: PositionRun) {
        forward.maskScores(scores, ld: ld, tile: tile, queries: queries)
    }

    static var addsScoreTerms: Bool { !S.isIdentity }
    func addScoreTerms(_ tile: ScoreTile) { forward.addScoreTerms(tile) }

    static var differentiatesScoreTerms: Bool { !S.isIdentity }
    func addScoreTerms(_ tile: ScoreTile, derivatives: UnsafeMutablePointer<Float>) {
        forward.addScoreTerms(tile, derivatives: derivatives)
    }
}

extension CustomMaskAttention: DifferentiableAttention, KernelWideningBackward where Score: DifferentiableScoreFunction {
    /// The flash-style backward of the tiled kernel (``TiledSoftmaxBackward``;
    /// KernelDocs/ScoreModifiers.md, "Backward of custom masks and score functions") over
    /// the forward's block mask: per block of 128 keys, the query tiles whose cells hold a
    /// visible pair, full tiles unmasked, partial ones masked by the predicate; each tile's
    /// scores recomputed as the forward computes them (score function, built-in modifiers,
    /// mask) and `dS` multiplied by the score function's derivative (skipped for
    /// ``IdentityScore``) and the modifiers' (soft-capping). `∂bias` and `∂sinks` through
    /// ``ModifiableAttention/modifierGradients(query:key:value:result:outputGradient:keyLengths:threads:)``.
    /// The score function's own properties get no gradient. Bitwise identical for every
    /// thread count; no `Nq × Nk` buffer.
    ///
    /// ```
    /// // naive reference, for each b, h, i and key j visible to i (hk = h / (H / Hkv)):
    /// s[j] = scale · dot(q[b,h,i], k[b,hk,j]),  s′[j] = modifiers(score(s[j], b, h, i, j))
    /// P[j] = exp(s′[j] − lse[b,h,i]),  Di = dot(dO[b,h,i], o[b,h,i])
    /// G[j] = P[j] · (dot(dO[b,h,i], v[b,hk,j]) − Di)      (= ∂bias[b,h,i,j])
    /// dS[j] = G[j] · cap′ · score.derivative(s[j], b, h, i, j)    (0 where P[j] = 0)
    /// dQ[b,h,i] = scale · Σ_j dS[j] k[b,hk,j],  dK[b,hk,j] += scale · dS[j] q[b,h,i],  dV[b,hk,j] += P[j] dO[b,h,i]
    /// ```
    ///
    /// - Complexity: `2.5 ×` the forward's FLOPs (`6·D + 4·Dv` per pair of the listed
    ///   tiles), plus a derivative and a multiply per recomputed score with a score function;
    ///   workspace of dense attention's backward plus one `128 × 64` tile per worker with a
    ///   score function, independent of `Nq` and `Nk`. The block mask is the forward's
    ///   (built once per shape).
    public func gradients(query: StridedView, key: StridedView, value: StridedView, output: StridedView,
                          logSumExp: StridedView, outputGradient: StridedView,
                          dQuery: MutableStridedView, dKey: MutableStridedView, dValue: MutableStridedView,
                          keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws {
        try tiledGradients(query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                           outputGradient: outputGradient, dQuery: dQuery, dKey: dKey, dValue: dValue,
                           keyLengths: keyLengths, workspace: workspace, threads: threads)
    }

    /// The passes of the backward (the `Float` and mixed-precision entry points run them).
    func tiledBackward(_ call: TiledBackwardCall) throws {
        let shape = call.shape, cells = try blockMasks(for: shape).cells
        let predicate = self.predicate, score = self.score
        TiledSoftmaxBackward.run(shape: shape, scale: call.scale, threads: call.threads,
                                 q: call.q, k: call.k, v: call.v, o: call.o, lse: call.lse, dO: call.dO,
                                 dQ: call.dQ, dK: call.dK, dV: call.dV,
                                 modifiers: call.modifiers, biasGradient: call.biasGradient) { b, h in
            PredicateBackwardMask(forward: PredicateMask(predicate: predicate, score: score, blocks: cells,
                                                         batch: b, head: h, heads: shape.heads,
                                                         keyEnd: call.keyEnd(b)),
                                  cells: cells, cellBase: cells.base(batch: b, head: h, heads: shape.heads))
        }
    }

    func addsKeyGradients(_ shape: AttentionShape) -> Bool { false }

    public func backwardCost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        tiledBackwardCost(forward: try cost(shape, threads: threads), shape: shape, threads: threads,
                          mask: PredicateBackwardMask<Predicate, Score>.self, modifiers: modifiers)
    }
}

extension CustomMaskAttention: ModifierDifferentiable where Score: DifferentiableScoreFunction {}
