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
}

extension VisibilityPredicate {
    public var variesByHead: Bool { false }
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
/// log-sum-exp `-infinity`. ``ScoreModifiers`` apply. The block mask is built on the first
/// call for a shape (`Nq · Nk` predicate evaluations, times `B · H` when the rule varies by
/// head) and kept for the next calls with the same predicate and shape.
///
/// - Complexity: `2 · pairs · (D + Dv)` FLOPs over the pairs of the listed tiles; the block
///   mask is `⌈Nq/Br⌉ · ⌈Nk/Bc⌉` bytes per head (one for all when the rule does not vary);
///   workspace as dense attention's. KernelDocs/ScoreModifiers.md, "Custom masks".
public struct CustomMaskAttention<Predicate: VisibilityPredicate>: KernelWidening, ModifiableAttention {
    public var predicate: Predicate
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

    public init(predicate: Predicate, scale: Float? = nil) {
        self.predicate = predicate
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
                                mask: PredicateMask<Predicate>.self),
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
            let predicate = self.predicate
            TiledSoftmaxAttention.attend(call, queryTile: blocks.queryTile) { b, h in
                PredicateMask(predicate: predicate, blocks: blocks, batch: b, head: h, heads: call.shape.heads,
                              keyEnd: call.keyEnd(b))
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

/// One head's view of a ``BlockMask``: the key tiles of a query tile that are not skipped,
/// full ones unmasked, partial ones masked pair by pair by the predicate.
struct PredicateMask<P: VisibilityPredicate>: TileMask {
    let predicate: P
    let blocks: BlockMask
    let batch: Int, head: Int
    let keyEnd: Int
    let base: Int

    init(predicate: P, blocks: BlockMask, batch: Int, head: Int, heads: Int, keyEnd: Int) {
        self.predicate = predicate
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

    func maskScores(_ scores: UnsafeMutablePointer<Float>, ld: Int, tile: KeyTile, queries: PositionRun) {
        for jj in 0..<tile.keys.count {
            let j = tile.keys.position(jj), row = scores + jj &* ld
            for ii in 0..<queries.count
            where !predicate.isVisible(batch: batch, head: head, query: queries.position(ii), key: j) {
                row[ii] = -.infinity
            }
        }
    }
}
