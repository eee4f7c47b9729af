/// A fixed sparse attention pattern expanded for one problem size: which keys each
/// query of each head sees, as a description that can be inspected.
///
/// Positions are aligned as for causal attention: query `i` sits at position
/// `p = i + Nk − Nq` of the key axis. Key padding (per batch item) is applied on top by
/// the conformers and is not part of the pattern.
public protocol AttentionPattern: Sendable {
    /// `Nq`.
    var queryLength: Int { get }
    /// `Nk`.
    var keyLength: Int { get }
    /// Query heads the pattern describes (patterns that do not vary by head report 1
    /// and answer every head the same).
    var heads: Int { get }

    /// Whether query `query` of head `head` sees key `key` (the specification, one pair).
    ///
    /// - Complexity: O(log G) for G global positions, O(1) otherwise.
    func isVisible(head: Int, query: Int, key: Int) -> Bool

    /// The number of keys query `query` of head `head` sees.
    ///
    /// - Complexity: O(1) to O(G) (global positions), never O(Nk).
    func visibleKeyCount(head: Int, query: Int) -> Int

    /// The work the kernel does for `head`: every query tile with each key tile it
    /// runs, in the kernel's order, for pass after pass.
    ///
    /// - Complexity: O(number of tiles).
    func tiles(head: Int) -> [PatternTile]
}

/// One (query tile, key tile) pair the tiled kernel computes.
public struct PatternTile: Hashable, Sendable, CustomStringConvertible {
    /// Kernel passes run one after another (later passes merge into earlier results).
    public var pass: Int
    /// Query positions `queryStart + n · queryStep`, `n < queryCount`.
    public var queryStart: Int, queryCount: Int, queryStep: Int
    /// Key positions `keyStart + n · keyStep`, `n < keyCount`.
    public var keyStart: Int, keyCount: Int, keyStep: Int
    /// Every query of the tile sees every key of the tile (no masking pass).
    public var fullyVisible: Bool

    public var description: String {
        "pass \(pass): queries \(queryStart)+\(queryStep)n (\(queryCount)) x keys \(keyStart)+\(keyStep)n (\(keyCount))"
            + (fullyVisible ? " full" : " masked")
    }
}

extension AttentionPattern {
    /// Visible (query, key) pairs over all heads of one batch item without padding:
    /// the pairs the kernel scores and uses.
    ///
    /// - Complexity: O(H · Nq) calls of ``visibleKeyCount(head:query:)``.
    public var scoredPairs: Int {
        var total = 0
        for h in 0..<heads {
            for i in 0..<queryLength { total += visibleKeyCount(head: h, query: i) }
        }
        return total
    }

    /// The pattern of `head` as a dense `Nq × Nk` row-major Boolean array.
    /// For tests and inspection only: the library never builds it.
    ///
    /// - Complexity: O(Nq · Nk) time and memory.
    public func denseMask(head: Int) -> [Bool] {
        var mask = [Bool](repeating: false, count: queryLength * keyLength)
        for i in 0..<queryLength {
            for j in 0..<keyLength where isVisible(head: head, query: i, key: j) {
                mask[i * keyLength + j] = true
            }
        }
        return mask
    }

    /// The scored pairs of `head` counted on its kernel tiles: what the kernel computes
    /// (padded to whole tiles), to compare with the pairs it uses.
    ///
    /// - Complexity: O(number of tiles).
    public func computedPairs(head: Int) -> Int {
        tiles(head: head).reduce(0) { $0 + $1.queryCount * $1.keyCount }
    }
}

/// The (query tile, key tile) list of `mask` as ``PatternTile`` values.
func patternTiles<Mask: TileMask>(_ mask: Mask, pass: Int, queryLength: Int, queryTile: Int) -> [PatternTile] {
    var tiles: [PatternTile] = []
    for g in 0..<mask.queryTileCount(queryLength: queryLength, tileSize: queryTile) {
        let queries = mask.queryTile(g, queryLength: queryLength, tileSize: queryTile)
        guard queries.count > 0 else { continue }
        mask.forEachKeyTile(queries: queries, tileSize: TiledSoftmaxAttention.Tiling.keyTile) { tile in
            tiles.append(PatternTile(pass: pass, queryStart: queries.start, queryCount: queries.count,
                                     queryStep: queries.step, keyStart: tile.keys.start,
                                     keyCount: tile.keys.count, keyStep: tile.keys.step,
                                     fullyVisible: tile.fullyVisible))
        }
    }
    return tiles
}

/// Checks what every fixed-pattern conformer needs of a shape: the shape itself, head
/// dimensions up to the kernel's limit, a finite scale, and positions that fit the
/// kernel's 32-bit lane arithmetic.
func checkPatternShape(_ shape: AttentionShape, scale: Float?, variant: String) throws {
    try shape.check()
    try shape.checkHeadDims(limit: DenseAttention.maxHeadDim, variant: variant)
    try checkScale(scale)
    let limit = 1 << 30
    guard shape.queryLength < limit, shape.keyLength < limit else {
        throw AttentionError.unsupported(
            "\(variant) supports queryLength and keyLength below \(limit), got \(shape.queryLength) and \(shape.keyLength)")
    }
}

/// Throws unless `value` is in `range`, naming `option`.
/// (The name is built only for the message: a passing check allocates nothing.)
func checkOption(_ value: Int, _ option: @autoclosure () -> String, in range: ClosedRange<Int>,
                 variant: String) throws {
    guard value >= range.lowerBound else {
        throw AttentionError.invalidParameter(
            "\(variant): \(option()) must be at least \(range.lowerBound), got \(value)")
    }
    guard value <= range.upperBound else {
        throw AttentionError.invalidParameter(
            "\(variant): \(option()) must be at most \(range.upperBound), got \(value)")
    }
}

/// The largest window side, block size or stride a pattern accepts (keeps position
/// arithmetic far from overflow).
let patternLimit = lengthLimit

/// The cost of a fixed-pattern conformer: its pattern's scored pairs over all heads and
/// batch items (an upper bound under key padding), `2 · pairs · (D + Dv)` FLOPs, and the
/// tiled kernel's workspace with query tile `queryTile`.
func patternCost(_ pattern: some AttentionPattern, shape: AttentionShape, threads: Int?,
                 queryTile: Int = TiledSoftmaxAttention.Tiling.defaultQueryTile) -> AttentionCost {
    let pairs = pattern.scoredPairs * (shape.heads / pattern.heads) * shape.batch
    return AttentionCost(flops: 2 * Double(pairs) * Double(shape.headDim + shape.valueDim),
                         workspaceBytes: TiledSoftmaxAttention.workspaceBytes(shape: shape, threads: threads,
                                                                              queryTile: queryTile),
                         scoredPairs: pairs)
}

/// One call of a fixed-pattern conformer, checked, with its output allocated: the
/// conformer runs the kernel over it once per pass.
struct PatternCall {
    let shape: AttentionShape
    let scale: Float
    let threads: Int
    /// The key lengths of the whole call (see ``keyEnd(_:)``).
    let keyLengths: [Int]?
    let q: TensorView, k: TensorView, v: TensorView
    let o: MutableTensorView, lse: MutableTensorView
    /// The call's score modifiers (nil: none).
    var modifiers: ScoreModifierKernel? = nil
    /// The whole call's batch item and query head of this call's item 0 and head 0 (a
    /// restricted call's: ``restricted(items:heads:)``, ``forEachHead(_:)``).
    var firstItem = 0, firstHead = 0

    /// Valid keys of batch item `b` of this call.
    func keyEnd(_ b: Int) -> Int { keyLengths?[firstItem + b] ?? shape.keyLength }

    /// Runs one kernel pass; `mask(h, keyEnd)` is built once per batch item and head (`h`
    /// the whole call's query head, `keyEnd` the item's valid key length). Later passes use
    /// `merge: true`. Work items go head by head: fixed patterns' query tiles cost about the
    /// same, and neighbouring tiles share key rows.
    func run<Mask: TileMask>(queryTile: Int? = nil, merge: Bool = false,
                             mask: (_ head: Int, _ keyEnd: Int) -> Mask) {
        TiledSoftmaxAttention.withMasks(shape, { b, h in mask(firstHead + h, keyEnd(b)) }) { masks in
            TiledSoftmaxAttention.run(shape: shape, scale: scale, threads: threads, queryTile: queryTile, merge: merge,
                                      byHead: true, q: q, k: k, v: v, o: o, lse: lse, modifiers: modifiers,
                                      mask: masks)
        }
    }

    /// This call restricted to the batch items `items` and query heads `heads` (whole groups
    /// of the heads sharing a key/value head, or heads of one group), its views offset there.
    func restricted(items: Range<Int>, heads: Range<Int>) -> PatternCall {
        let g = shape.groupSize
        assert((heads.lowerBound % g == 0 && heads.count % g == 0) || heads.lowerBound / g == (heads.upperBound - 1) / g,
               "a restricted call takes whole groups or heads of one group")
        let (b, h, hk) = (items.lowerBound, heads.lowerBound, heads.lowerBound / g)
        let part = AttentionShape(batch: items.count, heads: heads.count, kvHeads: max(1, heads.count / g),
                                  queryLength: shape.queryLength, keyLength: shape.keyLength,
                                  headDim: shape.headDim, valueDim: shape.valueDim)
        return PatternCall(
            shape: part, scale: scale, threads: threads, keyLengths: keyLengths,
            q: TensorView(raw: q.rawRow(b, h, 0), strides: q.strides, precision: q.precision),
            k: TensorView(raw: k.rawRow(b, hk, 0), strides: k.strides, precision: k.precision),
            v: TensorView(raw: v.rawRow(b, hk, 0), strides: v.strides, precision: v.precision),
            o: MutableTensorView(raw: o.rawRow(b, h, 0), strides: o.strides, precision: o.precision),
            lse: MutableTensorView(base: lse.row(b, h, 0), strides: lse.strides),
            modifiers: modifiers?.restricted(item: b, head: h), firstItem: firstItem + b, firstHead: firstHead + h)
    }

    /// This call writing its output into `o` (a staged copy) and, if given, its log-sum-exp
    /// into `lse` instead.
    func with(o: MutableTensorView, lse: MutableTensorView? = nil) -> PatternCall {
        PatternCall(shape: shape, scale: scale, threads: threads, keyLengths: keyLengths, q: q, k: k, v: v,
                    o: o, lse: lse ?? self.lse, modifiers: modifiers, firstItem: firstItem, firstHead: firstHead)
    }

    /// Calls `body` with the call restricted to one batch item and query head at a time
    /// (`body` gets the restricted call and the whole call's head index), so that passes
    /// over the same head can run back to back while its rows are still in cache.
    func forEachHead(_ body: (_ call: PatternCall, _ head: Int) -> Void) {
        for b in 0..<shape.batch {
            for h in 0..<shape.heads { body(restricted(items: b..<(b + 1), heads: h..<(h + 1)), firstHead + h) }
        }
    }
}

extension TiledSoftmaxAttention {
    /// Runs `body` with the masks of every batch item and head built once by `make(b, h)`
    /// (``run(shape:scale:threads:queryTile:merge:byHead:q:k:v:o:lse:mask:)`` asks for a
    /// head's mask once per query tile; masks that hold arrays would allocate each time).
    /// They live in stack memory (heap only past the stack's safe size): no allocation.
    static func withMasks<Mask: TileMask, R>(_ shape: AttentionShape, _ make: (_ batch: Int, _ head: Int) -> Mask,
                                             _ body: (_ mask: (_ batch: Int, _ head: Int) -> Mask) -> R) -> R {
        let heads = shape.heads, count = shape.batch * heads
        return withUnsafeTemporaryAllocation(of: Mask.self, capacity: count) { masks in
            for b in 0..<shape.batch {
                for h in 0..<heads { (masks.baseAddress! + b * heads + h).initialize(to: make(b, h)) }
            }
            defer { masks.baseAddress!.deinitialize(count: count) }
            return body { b, h in masks[b * heads + h] }
        }
    }

    /// Runs a fixed-pattern conformer on a checked call: sets every log-sum-exp to
    /// `-infinity` (until a pass writes the row) and hands `passes` the call.
    /// `merging`: whether later passes merge into the first's output (they read it back,
    /// so a 16-bit output is then formed in `Float` scratch, part by part: `passes` runs
    /// once per part of ``MergedOutputStaging``, on the call restricted to it; a single
    /// pass writes a 16-bit output in place, rounding each row once).
    ///
    /// The output is not zero-filled: `passes` must start with a pass without `merge`
    /// whose query tiles cover every query (contiguous tiles, blocks or residue classes),
    /// which writes every output row (0 where a row sees no key). Every fixed pattern's
    /// first pass does.
    static func attendPattern(_ call: ViewCall, merging: Bool,
                              _ passes: (PatternCall) throws -> Void) rethrows {
        let shape = call.shape
        for b in 0..<shape.batch {
            for h in 0..<shape.heads {
                for i in 0..<shape.queryLength { call.lse.row(b, h, i).pointee = -.infinity }
            }
        }
        let whole = PatternCall(shape: shape, scale: call.scale, threads: call.threadCount, keyLengths: call.keyLengths,
                                q: call.q, k: call.k, v: call.v, o: call.o, lse: call.lse, modifiers: call.modifiers)
        guard merging && call.o.precision != .float32 else { return try passes(whole) }
        try MergedOutputStaging.forEachPart(shape, groups: true, output: call.o, threads: call.threadCount) {
            items, heads, scratch in
            try passes(whole.restricted(items: items, heads: heads).with(o: scratch))
        }
    }
}

/// How passes merged by log-sum-exp form a 16-bit output: in `Float` scratch (they read
/// their output back), one part of the call at a time, each part's rows rounded into the
/// caller's output before the next part runs, so the scratch stays near ``partBytes``
/// however long the sequence: whole batch items while one fits, else whole groups of one
/// item's query heads (the heads sharing a key/value head), at least one group. A row's
/// arithmetic does not depend on the part it runs in: the same bits as one part.
@_spi(Testing) public enum MergedOutputStaging {
    /// The most `Float` output bytes one part stages (16 MiB; a task-local, so that tests
    /// can force small parts).
    @TaskLocal public static var partBytes = 16 << 20

    /// Batch items and query heads per part of `shape` (heads below `H` only with one item):
    /// whole groups of the heads sharing a key/value head, or, when not `groups` (conformers
    /// whose query heads are independent problems), any number of heads, at least one.
    static func part(_ shape: AttentionShape, groups: Bool = true) -> (items: Int, heads: Int) {
        let headBytes = max(1, shape.queryLength * shape.valueDim * MemoryLayout<Float>.stride)
        let itemBytes = headBytes * shape.heads, limit = partBytes
        if itemBytes <= limit { return (min(shape.batch, max(1, limit / itemBytes)), shape.heads) }
        let g = groups ? shape.groupSize : 1
        return (1, min(shape.heads, max(1, limit / (headBytes * g)) * g))
    }

    /// Runs `body(items, heads, scratch)` for each part of `shape` in order, `scratch` the
    /// part's contiguous `Float` output (`[items, heads, Nq, Dv]`), then rounds its rows into
    /// `output`'s rows of those items and heads before the next part.
    static func forEachPart(_ shape: AttentionShape, groups: Bool, output: MutableTensorView, threads: Int,
                            _ body: (_ items: Range<Int>, _ heads: Range<Int>, _ scratch: MutableTensorView) throws -> Void)
        rethrows {
        let part = part(shape, groups: groups)
        for b in stride(from: 0, to: shape.batch, by: part.items) {
            for h in stride(from: 0, to: shape.heads, by: part.heads) {
                let items = b..<min(shape.batch, b + part.items), heads = h..<min(shape.heads, h + part.heads)
                let target = MutableTensorView(raw: output.rawRow(b, h, 0), strides: output.strides,
                                               precision: output.precision)
                try withStaged(target, shape: SIMD4(items.count, heads.count, shape.queryLength, shape.valueDim),
                               threads: threads) { scratch in
                    try body(items, heads, scratch)
                }
            }
        }
    }

    /// Floats the largest part of `shape` stages.
    static func elements(_ shape: AttentionShape, groups: Bool = true) -> Int {
        let part = part(shape, groups: groups)
        return part.items * part.heads * shape.queryLength * shape.valueDim
    }
}
