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

extension ScoreFunction {
    public func scores(_ scores: SIMD16<Float>, batch: Int, head: Int, queries: SIMD16<Int32>,
                       key: Int) -> SIMD16<Float> {
        var result = scores
        for l in 0..<16 {
            result[l] = score(scores[l], batch: batch, head: head, query: Int(queries[l]), key: key)
        }
        return result
    }

    public static var isIdentity: Bool { false }
}

/// The score function that changes nothing (``CustomMaskAttention`` with a mask only).
public struct IdentityScore: ScoreFunction {
    public init() {}
    public func score(_ score: Float, batch: Int, head: Int, query: Int, key: Int) -> Float { score }
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
/// head) and kept for the next calls with the same predicate and shape.
///
/// - Complexity: `2 · pairs · (D + Dv)` FLOPs over the pairs of the listed tiles; the block
///   mask is `⌈Nq/Br⌉ · ⌈Nk/Bc⌉` bytes per head (one for all when the rule does not vary);
///   workspace as dense attention's. KernelDocs/ScoreModifiers.md, "Custom masks".
public struct CustomMaskAttention<Predicate: VisibilityPredicate, Score: ScoreFunction>: KernelWidening,
    ModifiableAttention {
    public var predicate: Predicate
    /// The score transformation (``IdentityScore`` for a mask alone).
    public var score: Score
    /// Score scale; `nil` means `1 / sqrt(D)`. Must be finite.
    public var scale: Float?
    /// Soft-capping, ALiBi, an additive bias and sinks (``ScoreModifiers``); none by default.
    public var modifiers = ScoreModifiers()
    /// The block mask of the last shape.
    private let plans = PlanCache<PlanKey, BlockMask>()

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

    /// The block mask of `shape`, built once per predicate and shape.
    func plan(for shape: AttentionShape) throws -> BlockMask {
        try validate(shape)
        let br = DenseAttention.queryTile(shape)
        let key = PlanKey(predicate: predicate, batch: shape.batch, heads: shape.heads,
                          queryLength: shape.queryLength, keyLength: shape.keyLength, queryTile: br)
        return try plans.plan(for: key) {
            try BlockMask(predicate, shape: shape, queryTile: br, keyTile: TiledSoftmaxAttention.Tiling.keyTile)
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
    private func lanePositions(_ queries: PositionRun, from first: Int) -> SIMD16<Int32> {
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
