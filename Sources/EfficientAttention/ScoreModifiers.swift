import Foundation
import Synchronization
import CEfficientAttention

/// What today's models add to softmax attention's scores (ATTENTION_SPEC.md, "Score
/// modifiers"): soft-capping, ALiBi, an additive bias, and learned sinks, applied by the
/// tiled softmax kernel as it computes each tile of scores.
///
/// For query `i`, key `j` of batch item `b`, head `h`, with `s = scale · q_i · k_j` (plus a
/// conformer's own score terms, Transformer-XL's relative ones):
///
///     s ← cap · tanh(s / cap)                         softCap
///     s ← s + bias[b, h, i, j] − α_h · |i + (Nk − Nq) − j|    bias, alibiSlopes
///
/// then the conformer's visibility and the softmax. A sink `σ_h` adds `e^{σ_h}` to the
/// denominator with no value: `o_i = Σ_j e^{s_ij} v_j / (Σ_j e^{s_ij} + e^{σ_h})`,
/// `lse_i = log(Σ_j e^{s_ij} + e^{σ_h})`, applied once to the whole result (after passes
/// over split keys merge). A row with no visible key stays 0; its log-sum-exp is `σ_h`
/// (the sink is the one term of its denominator).
///
/// Conformers on the tiled kernel take them (`modifiers` on ``DenseAttention``,
/// ``MultiQueryAttention``, ``LocalAttention``, ``StridedAttention``,
/// ``LongformerAttention``, ``BigBirdAttention``, ``AdaptiveSpanAttention``,
/// ``TransformerXLAttention``, ``CompressiveTransformerAttention``, ``AxialAttention``
/// (`.union`), ``ETCAttention``, ``CustomMaskAttention``).
///
/// - Complexity: per scored pair, one `exp` and a division for soft-capping, two vector
///   operations for ALiBi, one load for the bias; per output row, one rescale for sinks.
public struct ScoreModifiers: Sendable, Equatable {
    /// Soft-capping `cap` (Gemma 2 uses 50 for attention); `nil`: none. Finite, > 0.
    public var softCap: Float?
    /// ALiBi slopes `α_h`, one per query head; `nil`: none. Finite.
    public var alibiSlopes: [Float]?
    /// Additive bias `[B or 1, H or 1, Nq, Nk]` (a 1 broadcasts over that dimension);
    /// `nil`: none. Finite or `-infinity` (a hidden pair): NaN or `+infinity` on a pair the
    /// call scores makes it throw once its kernel has run (outputs then unspecified); terms
    /// of pairs in tiles the mask skips are not read. In a packed call (``PackedSequences``)
    /// the bias is `[S or 1, H or 1, max Nq_s, max Nk_s]`, one padded block per sequence:
    /// sequence `s` reads `bias[s or 0, h, i, j]` for its own `i < Nq_s`, `j < Nk_s`.
    public var bias: Tensor?
    /// Sink logits `σ_h`, one per query head; `nil`: none. Finite.
    public var sinks: [Float]?
    /// In a packed call, the sequence whose block of the bias this (per-sequence) call
    /// reads (``Attention/packedSequence(_:)``); nil: the bias is the call's own.
    var biasSequence: Int?

    public init(softCap: Float? = nil, alibiSlopes: [Float]? = nil, bias: Tensor? = nil, sinks: [Float]? = nil) {
        self.softCap = softCap
        self.alibiSlopes = alibiSlopes
        self.bias = bias
        self.sinks = sinks
    }

    /// Whether nothing is modified.
    public var isEmpty: Bool { softCap == nil && alibiSlopes == nil && bias == nil && sinks == nil }

    /// Whether a tile of scores is modified (everything but sinks).
    var modifiesScores: Bool { softCap != nil || alibiSlopes != nil || bias != nil }

    /// Press et al.'s slopes for `heads` heads: `2^(−8(h+1)/H)` for `h = 0 … H−1` when `H`
    /// is a power of two; otherwise those of the largest power of two `P < H`, followed by
    /// every other slope of `2P` heads (`2^(−4(2k+1)/P)`, `k = 0 …`) until there are `H`.
    public static func standardALiBiSlopes(heads: Int) -> [Float] {
        guard heads >= 1 else { return [] }
        func powerOfTwoSlopes(_ n: Int) -> [Float] {
            (0..<n).map { Float(pow(2, -8 * Double($0 + 1) / Double(n))) }
        }
        var p = 1
        while p * 2 <= heads { p *= 2 }
        if p == heads { return powerOfTwoSlopes(heads) }
        let extra = powerOfTwoSlopes(2 * p).enumerated().filter { $0.offset % 2 == 0 }.map(\.element)
        return powerOfTwoSlopes(p) + extra.prefix(heads - p)
    }

    /// Throws unless every modifier fits `shape`, naming the option. The bias's values are
    /// not read here: the kernels check each term as they add it (``withKernel(_:_:)``), so
    /// a large bias is read once per call, not twice.
    func validate(_ shape: AttentionShape) throws {
        if let softCap, !(softCap.isFinite && softCap > 0) {
            throw AttentionError.invalidParameter("modifiers.softCap must be finite and above 0, got \(softCap)")
        }
        func checkPerHead(_ values: [Float]?, _ name: StaticString) throws {
            guard let values else { return }
            guard values.count == shape.heads else {
                throw AttentionError.invalidParameter(
                    "modifiers.\(name) has \(values.count) values, expected one per query head (\(shape.heads))")
            }
            if let bad = values.firstIndex(where: { !$0.isFinite }) {
                throw AttentionError.invalidParameter("modifiers.\(name)[\(bad)] must be finite, got \(values[bad])")
            }
        }
        try checkPerHead(alibiSlopes, "alibiSlopes")
        try checkPerHead(sinks, "sinks")
        if let bias, let sequence = biasSequence {
            // One sequence of a packed call, whose bias was checked whole
            // (``PackedSequences/checkBias(_:heads:)``): its block must hold the sequence.
            let s = bias.shape
            guard s.count == 4, s[0] == 1 || sequence < s[0], s[1] == 1 || s[1] == shape.heads,
                  shape.queryLength <= s[2], shape.keyLength <= s[3] else {
                throw AttentionError.shapeMismatch(
                    "modifiers.bias \(s) has no block [\(shape.heads) or 1, \(shape.queryLength), \(shape.keyLength)] for packed sequence \(sequence)")
            }
        } else if let bias {
            let s = bias.shape
            guard s.count == 4, s[0] == 1 || s[0] == shape.batch, s[1] == 1 || s[1] == shape.heads,
                  s[2] == shape.queryLength, s[3] == shape.keyLength else {
                throw AttentionError.shapeMismatch(
                    "modifiers.bias must be [B or 1, H or 1, Nq, Nk] = [\(shape.batch) or 1, \(shape.heads) or 1, \(shape.queryLength), \(shape.keyLength)], got \(s)")
            }
        }
    }

    /// Runs `body` with the kernel form of the score modifiers of `shape` (nil when none
    /// modifies scores), valid during `body`. Throws after `body` if a bias term the kernels
    /// added was NaN or `+infinity`: every visible pair's term is checked as it is added
    /// (``BiasTermCheck``), hidden pairs' only where a scored tile holds them, so the
    /// bias is read once per call (KernelDocs/ScoreModifiers.md, "Checking the bias"). The
    /// outputs are then unspecified.
    func withKernel<R>(_ shape: AttentionShape, _ body: (ScoreModifierKernel?) throws -> R) throws -> R {
        guard modifiesScores else { return try body(nil) }
        func withSlopes(_ body: (UnsafePointer<Float>?) throws -> R) rethrows -> R {
            guard let alibiSlopes else { return try body(nil) }
            return try alibiSlopes.withUnsafeBufferPointer { try body($0.baseAddress!) }
        }
        let invalidBias = Atomic<Bool>(false)
        let result = try withUnsafePointer(to: invalidBias) { invalid in
            try withSlopes { slopes in
                func make(_ bias: TensorView?) throws -> R {
                    try body(ScoreModifierKernel(softCap: softCap ?? 0, slopes: slopes, bias: bias,
                                                 offset: shape.keyLength - shape.queryLength, invalidBias: invalid))
                }
                guard let bias else { return try make(nil) }
                return try bias.withStridedView { view in
                    // Broadcast dimensions read the one row they have (stride 0); a packed
                    // sequence's call starts at its block.
                    var strides = view.strides
                    if view.shape[0] == 1 { strides[0] = 0 }
                    if view.shape[1] == 1 { strides[1] = 0 }
                    let base = view.baseAddress + (biasSequence ?? 0) * strides[0]
                    return try make(TensorView(base: base, strides: strides))
                }
            }
        }
        // The workers have finished (their pool's join orders their stores before this load).
        if invalidBias.load(ordering: .relaxed) {
            throw AttentionError.invalidParameter(
                "modifiers.bias must be finite or -infinity (found NaN or +infinity on a scored pair)")
        }
        return result
    }
}

/// A conformer that takes ``ScoreModifiers`` (those of the tiled softmax kernel).
public protocol ModifiableAttention: Attention {
    /// Soft-capping, ALiBi, an additive bias and sinks; none by default.
    var modifiers: ScoreModifiers { get set }
}

/// The score modifiers of one call, as the tiled kernel applies them to a tile of
/// transposed scores (keys as rows, queries in lanes).
struct ScoreModifierKernel: @unchecked Sendable {
    /// The cap, or 0 for none.
    let softCap: Float
    /// ALiBi slopes per query head, or nil.
    let slopes: UnsafePointer<Float>?
    /// The bias `[B, H, Nq, Nk]` (stride 0 on broadcast dimensions), or nil.
    let bias: TensorView?
    /// `Nk − Nq`: query `i`'s aligned position is `i + offset`.
    let offset: Int
    /// Set when a bias term added was NaN or `+infinity` (read by ``ScoreModifiers/withKernel(_:_:)``).
    let invalidBias: UnsafePointer<Atomic<Bool>>
    /// The whole call's batch item and head of a restricted call's item 0 and head 0.
    var firstItem = 0, firstHead = 0
    /// Gathered rows (``PermutedBlockAttention``'s slots): the kernel's queries and keys are
    /// slots, mapped to the call's positions here; nil: they are the positions.
    var slots: SlotPositions? = nil

    /// Where a permuted kernel's slots come from: the kernel's batch item `b` (a block of
    /// gathered rows: an LSH round's item, a routing cluster) holds query slot `ii` at query
    /// position `queries[b · queryStride + ii]` and key slot `jj` at key position
    /// `keys[b · keyStride + jj]`, all of one head of the call (the restricted item and head).
    struct SlotPositions {
        var queries: UnsafePointer<Int32>, keys: UnsafePointer<Int32>
        var queryStride = 0, keyStride = 0

        @inline(__always)
        func query(_ b: Int, _ ii: Int) -> Int { Int(queries[b &* queryStride &+ ii]) }
        @inline(__always)
        func key(_ b: Int, _ jj: Int) -> Int { Int(keys[b &* keyStride &+ jj]) }
    }

    /// This kernel for a call restricted to batch item `b`, head `h` of this one.
    func restricted(item b: Int, head h: Int) -> ScoreModifierKernel {
        var r = self
        r.firstItem += b
        r.firstHead += h
        return r
    }

    /// This kernel, restricted to batch item `b` and head `h`, for a kernel run over
    /// gathered slots of that head (``SlotPositions``): its own batch items are blocks of
    /// slots, and biases, slopes and distances follow the slots' positions.
    func gathered(item b: Int, head h: Int, _ slots: SlotPositions) -> ScoreModifierKernel {
        var r = restricted(item: b, head: h)
        r.slots = slots
        return r
    }

    /// The modified score of one pair (``modified(_:biasTerms:slope:distance:check:)`` on
    /// a splat: the same bits as the vector paths), for a score the kernels never tile
    /// (LSH's self rule): query `i`, key `j` of the call, batch item `b`, head `h`.
    func modifiedScore(_ score: Float, b: Int, h: Int, i: Int, j: Int) -> Float {
        var check = BiasTermCheck()
        let s = modified(SIMD16(repeating: score), biasTerms: SIMD16(repeating: biasTerm(b: b, h: h, i: i, j: j) ?? 0),
                         slope: SIMD16(repeating: slopes?[firstHead + h] ?? 0),
                         distance: SIMD16(repeating: Float(i + offset - j)), check: &check)
        report(check)
        return s[0]
    }

    /// Whether the bias hides pair `(i, j)` (its term is `−∞`) of batch item `b`, head `h`:
    /// the only modifier that can (soft-capping and ALiBi are finite).
    func hides(b: Int, h: Int, i: Int, j: Int) -> Bool {
        biasTerm(b: b, h: h, i: i, j: j) == -.infinity
    }

    /// The bias element of pair `(i, j)` of batch item `b`, head `h`, or nil without a bias.
    private func biasTerm(b: Int, h: Int, i: Int, j: Int) -> Float? {
        bias.map { $0.row(firstItem + b, firstHead + h, i)[j &* $0.strides[3]] }
    }

    /// Applies soft-capping, the bias and ALiBi to `scores[r · ld + lane]`, the score of key
    /// `keys.position(r)` and query `queries.position(lane)` of batch item `b`, head `h`.
    ///
    /// The bias of 16 queries for one key lies in 16 rows: with contiguous keys and a bias
    /// whose rows are contiguous, whole 16 × 16 blocks are loaded row by row and transposed
    /// in registers (``Transpose16``: 16 loads and 64 permutes for 256 pairs); other keys
    /// gather it element by element. Both give the same values.
    ///
    /// Gathered, each query's term of a key with a step (the strided and axial column passes)
    /// is a cache line of its own: the lanes' bias rows are found once per 16 lanes, and each
    /// key's lines are requested ``gatherAhead`` keys before they are read, so that their
    /// misses overlap (as ``applyGathered`` does for LSH's and routing's slots).
    ///
    /// Not inlined: the patterns' kernels are specialised in the conformers' files, where the
    /// C prefetch helpers stayed calls; compiled once here, they are instructions.
    @inline(never)
    func apply(_ scores: UnsafeMutablePointer<Float>, ld: Int, keys: PositionRun, queries: PositionRun,
               lanes: Int, b: Int, h: Int) {
        if let slots {
            applyGathered(scores, ld: ld, keys: keys, queries: queries, lanes: lanes, b: b, slots: slots)
            return
        }
        typealias V = SIMD16<Float>
        let item = firstItem + b, head = firstHead + h
        let slope = V(repeating: slopes?[head] ?? 0)
        // A `let`: a `var` captured by `distance` would be boxed, and each read of it an
        // exclusivity check (a runtime call per 16 lanes).
        let laneOffsets: V = {
            var offsets = V()
            for l in 0..<16 { offsets[l] = Float(l * queries.step) }
            return offsets
        }()
        let biasRow = bias.map { $0.row(item, head, 0) }
        let biasRowStride = bias?.strides[2] ?? 0, biasColumnStride = bias?.strides[3] ?? 0
        /// Query `lane + l`'s aligned position minus key `j`'s, for the 16 lanes.
        @inline(__always) func distance(lane: Int, key j: Int) -> V {
            V(repeating: Float(queries.position(lane) + offset - j)) + laneOffsets
        }
        guard let biasRow else {
            // Soft-capping and ALiBi alone: the tile key by key, each key's lanes contiguous,
            // with no bias rows to find, no terms to gather and nothing to check (the
            // gathering loop below walks the tile a column of 16 lanes at a time).
            // Measured only together with `modified` made `@_transparent` (KernelDocs/ScoreModifiers.md,
            // "Without AVX-512, inlined").
            var unused = BiasTermCheck()
            for r in 0..<keys.count {
                let j = keys.position(r), row = scores + r &* ld
                for lane in stride(from: 0, to: lanes, by: 16) {
                    store16(modified(load16(row + lane), biasTerms: V(), slope: slope,
                                     distance: distance(lane: lane, key: j), check: &unused), row + lane)
                }
            }
            return
        }
        var r = 0, check = BiasTermCheck()
        if biasColumnStride == 1, keys.step == 1, keys.count >= 16 {
            // Each of the tile's query rows is its own stream, too many for the hardware
            // prefetchers, so the bias is requested ahead twice: the next tile's into L2 by
            // the caller, spread over its micro-kernel calls (``prefetchBias``), and within
            // the tile each 16-key block's lines into L1 two blocks before they are read
            // (KernelDocs/ScoreModifiers.md).
            (check, r) = withUnsafeTemporaryAllocation(of: Float.self, capacity: 256) { block in
                // A check and a key counter of the closure's own: captured variables live in
                // memory, and a captured `r` cost an exclusivity check per 16 lanes.
                var check = BiasTermCheck(), r = 0
                let terms = block.baseAddress!
                let last = queries.count - 1
                while r + 16 <= keys.count {
                    let j0 = keys.position(r)
                    for lane in 0..<queries.count {
                        ea_prefetch_read(biasRow + (queries.position(lane) &* biasRowStride &+ j0 &+ 32))
                    }
                    for lane in stride(from: 0, to: lanes, by: 16) {
                        // terms[jj · 16 + l] = bias of query lane + l (the last query for
                        // padding lanes), key j0 + jj.
                        Transpose16.transpose(scale: V(repeating: 1), rows: { l in
                            biasRow + (queries.position(min(lane + l, last)) &* biasRowStride &+ j0)
                        }, into: terms, ld: 16)
                        // A check of the block's own, merged after it: the compiler kept the
                        // closure's in memory, a store and a load on every key's chain.
                        var blockCheck = BiasTermCheck()
                        for jj in 0..<16 {
                            let row = scores + (r + jj) &* ld + lane
                            store16(modified(load16(row), biasTerms: load16(terms + jj * 16), slope: slope,
                                             distance: distance(lane: lane, key: j0 + jj), check: &blockCheck), row)
                        }
                        check.merge(blockCheck)
                    }
                    r += 16
                }
                return (check, r)
            }
        }
        // The rest key by key (keys with a step, or fewer than 16 left): per block of 16 query
        // lanes, the lanes' bias rows once; then for each key one load per lane, the lines
        // of the key `gatherAhead` further requested (with a step, each is a line of its own).
        let first = r
        for lane in stride(from: 0, to: lanes, by: 16) where first < keys.count {
            let valid = max(0, min(16, queries.count - lane))
            var rows = SIMD16<Int>()
            for l in 0..<valid { rows[l] = queries.position(lane + l) &* biasRowStride }
            for r in first..<keys.count {
                let j = keys.position(r), row = scores + r &* ld + lane
                let ahead = r + Self.gatherAhead < keys.count ? keys.position(r + Self.gatherAhead) : nil
                let terms = Self.gatherTerms(biasRow, rows: rows, valid: valid, column: j &* biasColumnStride,
                                             requesting: ahead.map { $0 &* biasColumnStride })
                store16(modified(load16(row), biasTerms: terms, slope: slope,
                                 distance: distance(lane: lane, key: j), check: &check), row)
            }
        }
        report(check)
    }

    /// How many keys ahead ``apply(_:ld:keys:queries:lanes:b:h:)`` requests the bias terms it
    /// gathers one by one.
    static var gatherAhead: Int { 4 }

    /// One key's bias terms for up to 16 lanes, gathered: lane `l < valid` reads
    /// `biasRow[rows[l] + column]` (the rest 0), and the lines of the lanes' terms at column
    /// `requesting` (a key a few ahead; nil: none) are requested into every cache level.
    @inline(__always)
    private static func gatherTerms(_ biasRow: UnsafePointer<Float>, rows: SIMD16<Int>, valid: Int, column: Int,
                                    requesting next: Int?) -> SIMD16<Float> {
        var terms = SIMD16<Float>()
        for l in 0..<valid { terms[l] = biasRow[rows[l] &+ column] }
        if let next {
            for l in 0..<valid { ea_prefetch_read(biasRow + (rows[l] &+ next)) }
        }
        return terms
    }

    /// ``apply(_:ld:keys:queries:lanes:b:h:)`` on gathered slots (``SlotPositions``): per
    /// block of 16 query lanes, the lanes' positions (for ALiBi) and bias rows are read
    /// from the slot list once; then, key by key, each lane's distance is one vector
    /// subtraction and its bias term one scalar load at the key's position (the rows are
    /// scattered: no 16 × 16 blocks in sorted order), requested a few keys ahead so the
    /// misses overlap. Soft-capping alone reads no position. The slots are all of this
    /// kernel's one item and head (``gathered(item:head:_:)``); `b` is the block of slots.
    @inline(__always)
    private func applyGathered(_ scores: UnsafeMutablePointer<Float>, ld: Int, keys: PositionRun, queries: PositionRun,
                               lanes: Int, b: Int, slots: SlotPositions) {
        typealias V = SIMD16<Float>
        let slope = V(repeating: slopes?[firstHead] ?? 0)
        let biasRow = bias.map { $0.row(firstItem, firstHead, 0) }
        let biasRowStride = bias?.strides[2] ?? 0, biasColumnStride = bias?.strides[3] ?? 0
        var check = BiasTermCheck()
        let positioned = slopes != nil || biasRow != nil
        let ahead = 2
        for lane in stride(from: 0, to: lanes, by: 16) {
            let valid = max(0, min(16, queries.count - lane))
            // The lanes' positions (padding lanes: 0) and bias rows.
            var positions = V(), rows = SIMD16<Int>()
            if positioned {
                for l in 0..<valid {
                    let i = slots.query(b, queries.position(lane + l))
                    positions[l] = Float(i + offset)
                    rows[l] = i &* biasRowStride
                }
            }
            for r in 0..<keys.count {
                let row = scores + r &* ld + lane
                guard positioned else {
                    store16(modified(load16(row), biasTerms: V(), slope: slope, distance: V(), check: &check), row)
                    continue
                }
                let j = slots.key(b, keys.position(r))
                var terms = V()
                if let biasRow {
                    let next = r + ahead < keys.count ? slots.key(b, keys.position(r + ahead)) : nil
                    terms = Self.gatherTerms(biasRow, rows: rows, valid: valid, column: j &* biasColumnStride,
                                             requesting: next.map { $0 &* biasColumnStride })
                }
                store16(modified(load16(row), biasTerms: terms, slope: slope,
                                 distance: positions - V(repeating: Float(j)), check: &check), row)
            }
        }
        report(check)
    }

    /// Requests into L2 part `part` of `parts` of the bias of the tile a kernel will modify
    /// next, keys `keys` and queries `queries` of batch item `b`, head `h` (a bias with
    /// contiguous rows and contiguous keys; nothing otherwise): the forward's next key tile,
    /// the backward's next query tile. The part is `⌈queries.count / parts⌉` query rows.
    /// Kernels spread the parts over a tile's work (one per block of micro-kernel rows):
    /// issued all at once, the requests stall on the core's outstanding-miss limit (N = 2048,
    /// H = 8: 4–5 ms of the forward bias's cost). Positions past the bias are harmless (a
    /// prefetch never faults).
    @inline(__always)
    func prefetchBias(keys: PositionRun, queries: PositionRun, part: Int, of parts: Int, b: Int, h: Int) {
        guard let bias, slots == nil, keys.step == 1, bias.strides[3] == 1 else { return }
        requestBias(bias, keys: keys, queries: queries, part: part, of: parts, b: b, h: h)
    }

    /// ``prefetchBias(keys:queries:part:of:b:h:)``'s requests, compiled once here (as
    /// ``apply(_:ld:keys:queries:lanes:b:h:)``) so that each line is one instruction.
    @inline(never)
    private func requestBias(_ bias: TensorView, keys: PositionRun, queries: PositionRun, part: Int, of parts: Int,
                             b: Int, h: Int) {
        let rowsPerPart = (queries.count + parts - 1) / parts
        let base = bias.row(firstItem + b, firstHead + h, 0) + keys.start
        let end = min((part + 1) * rowsPerPart, queries.count)
        for lane in min(part * rowsPerPart, end)..<end {
            let row = base + queries.position(lane) &* bias.strides[2]
            for c in stride(from: 0, to: keys.count, by: 16) { ea_prefetch_read_l2(row + c) }
        }
    }

    /// Soft-capping, the bias terms `biasTerms` and ALiBi applied to 16 scores: `slope · |distance|`
    /// subtracted (`distance` = query position + offset − key position, per lane). The one
    /// formula of the tiled and the decode kernels; the bias terms are shown to `check`
    /// (reported by ``report(_:)`` once per tile). `@_transparent`: with `@inline(__always)`
    /// the optimiser left it a call per 16 lanes in `apply` (a tenth of an ALiBi call's
    /// samples; VectorMath's `exp` has the same note).
    @_transparent
    func modified(_ scores: SIMD16<Float>, biasTerms: SIMD16<Float>, slope: SIMD16<Float>,
                  distance: SIMD16<Float>, check: inout BiasTermCheck) -> SIMD16<Float> {
        var s = scores
        if softCap > 0 {
            s = SIMD16(repeating: softCap) * tanh16(s * SIMD16(repeating: 1 / softCap))
        }
        if bias != nil {
            check.note(biasTerms)
            s += biasTerms
        }
        if slopes != nil { s = fused(-slope, abs16(distance), s) }
        return s
    }

    /// Flags the call's bias as invalid if `check` saw NaN or `+infinity`.
    @inline(__always)
    func report(_ check: BiasTermCheck) {
        if check.found { invalidBias.pointee.store(true, ordering: .relaxed) }
    }

    /// The derivative of ``modified(_:biasTerms:slope:distance:check:)`` with respect to the raw
    /// scores `s` when soft-capping: `1 − tanh²(s / cap)` (the same `tanh16` of the same
    /// argument as the forward; 0 where its clamp makes the capped score constant). The bias
    /// and ALiBi are additive: derivative 1.
    @inline(__always)
    func softCapDerivative(_ scores: SIMD16<Float>) -> SIMD16<Float> {
        let t = tanh16(scores * SIMD16(repeating: 1 / softCap))
        return fused(-t, t, SIMD16(repeating: 1))
    }
}

/// Whether any bias term shown to it was NaN or `+infinity`. It keeps the running maximum,
/// as `Int32`, of each term's bits and of its magnitude's bits minus 1: both stay below
/// `0x7F80_0000` for finite terms and −infinity, and one reaches it for +infinity (the
/// bits) and every NaN (the magnitude). Integer compares and blends, which vectorize; a
/// mask reduction per vector compiles lane by lane.
struct BiasTermCheck {
    private var peak = SIMD16<Int32>(repeating: .min)

    @inline(__always)
    mutating func note(_ terms: SIMD16<Float>) {
        let bits = unsafeBitCast(terms, to: SIMD16<Int32>.self)
        let magnitude = (bits & 0x7FFF_FFFF) &- 1
        peak.replace(with: bits, where: bits .> peak)
        peak.replace(with: magnitude, where: magnitude .> peak)
    }

    /// Notes what `other` saw.
    @inline(__always)
    mutating func merge(_ other: BiasTermCheck) {
        peak.replace(with: other.peak, where: other.peak .> peak)
    }

    var found: Bool { peak.max() >= 0x7F80_0000 }
}

/// `|x|` lane by lane (the sign bit cleared).
@inline(__always)
func abs16(_ x: SIMD16<Float>) -> SIMD16<Float> {
    unsafeBitCast(unsafeBitCast(x, to: SIMD16<UInt32>.self) & 0x7FFF_FFFF, to: SIMD16<Float>.self)
}

/// `tanh(x)` lane by lane: `x · p(x²) / q(x²)` with `p` of degree 6 and `q` of degree 3 in
/// `x²` (the rational form Eigen's vectorised tanh uses), `x` clamped to ±7.9053 where the
/// quotient reaches ±1. Largest error against Double `tanh` over [−12, 12] in Float
/// arithmetic: 3.4·10⁻⁷ absolute and relative. One division and ten multiply-adds: no
/// `exp`, no branch. `@_transparent`, as ``ScoreModifierKernel/modified(_:biasTerms:slope:distance:check:)``.
@_transparent
func tanh16(_ x: SIMD16<Float>) -> SIMD16<Float> {
    typealias V = SIMD16<Float>
    let bound = V(repeating: 7.905_311_107_635_498_05)
    let c = clamp(x, -bound, bound)
    let x2 = c * c
    var p = V(repeating: -2.760_768_477_423_55e-16)
    p = fused(p, x2, V(repeating: 2.000_187_904_824_77e-13))
    p = fused(p, x2, V(repeating: -8.604_671_522_137_35e-11))
    p = fused(p, x2, V(repeating: 5.122_297_090_371_14e-08))
    p = fused(p, x2, V(repeating: 1.485_722_357_179_79e-05))
    p = fused(p, x2, V(repeating: 6.372_619_288_754_36e-04))
    p = fused(p, x2, V(repeating: 4.893_524_558_917_86e-03))
    var q = V(repeating: 1.198_258_394_667_02e-06)
    q = fused(q, x2, V(repeating: 1.185_347_056_866_54e-04))
    q = fused(q, x2, V(repeating: 2.268_434_632_439_00e-03))
    q = fused(q, x2, V(repeating: 4.893_525_185_543_85e-03))
    return c * p / q
}

extension ScoreModifiers {
    /// Runs `body` with the kernel form of the modifiers (``withKernel(_:_:)``), then adds the
    /// sinks to the `Float` rows `o`, `lse` it wrote (``applySinks(o:lse:shape:threads:)``).
    func withKernelThenSinks(_ shape: AttentionShape, o: MutableTensorView, lse: MutableTensorView, threads: Int,
                             _ body: (ScoreModifierKernel?) throws -> Void) throws {
        try withKernel(shape, body)
        applySinks(o: o, lse: lse, shape: shape, threads: threads)
    }

    /// Adds the sinks to a finished result: `lse' = log(e^{lse} + e^{σ_h})` and
    /// `o ← o · e^{lse − lse'}` for every row of `o` (Float) and `lse`.
    func applySinks(o: MutableTensorView, lse: MutableTensorView, shape: AttentionShape, threads: Int) {
        guard let sinks else { return }
        // Rows are independent: heads split over the workers (the same bits for any count)
        // once there are enough rows to pay for waking them (not for a decode step's few).
        let heads = shape.batch * shape.heads
        let workers = heads * shape.queryLength * (shape.valueDim + 16) >= 1 << 18 ? threads : 1
        parallelForEach(items: heads, threads: workerCount(threads: workers, items: heads)) { item, _ in
            let b = item / shape.heads, h = item % shape.heads
            let sink = sinks[h], sd = o.strides[3]
            for i in 0..<shape.queryLength {
                let l = lse.row(b, h, i)
                let held = l[0]
                let top = max(held, sink)
                let total = logf(expf(held - top) + expf(sink - top)) + top
                let keep = held == -.infinity ? 0 : expf(held - total)
                let row = o.row(b, h, i)
                for c in 0..<shape.valueDim { row[c &* sd] *= keep }
                l[0] = total
            }
        }
    }
}

// MARK: - Backward

/// The gradients of a loss with respect to the learned ``ScoreModifiers`` of a call (see
/// ``ModifiableAttention/modifierGradients(query:key:value:result:outputGradient:keyLengths:threads:)``;
/// KernelDocs/ScoreModifiers.md, "Backward"). The cap and the ALiBi slopes are constants:
/// they get no gradient.
public struct ScoreModifierGradients: Sendable, Equatable {
    /// `∂L/∂bias`, shaped like ``ScoreModifiers/bias`` (`[B or 1, H or 1, Nq, Nk]`: summed over
    /// the dimensions it broadcasts over, batch item then head, in that fixed order); 0 on
    /// pairs no query sees. `nil` without a bias.
    public var bias: Tensor?
    /// `∂L/∂σ_h`, one per query head. `nil` without sinks.
    public var sinks: [Float]?

    public init(bias: Tensor? = nil, sinks: [Float]? = nil) {
        self.bias = bias
        self.sinks = sinks
    }
}

/// The conformers whose backward applies their ``ModifiableAttention/modifiers`` (through
/// ``DifferentiableAttention/withModifierBackward(_:_:)``); the others' backward throws
/// ``AttentionError/unsupported(_:)`` when they have modifiers.
protocol ModifierDifferentiable: ModifiableAttention, DifferentiableAttention {}

extension DenseAttention: ModifierDifferentiable {}
extension LocalAttention: ModifierDifferentiable {}
extension StridedAttention: ModifierDifferentiable {}
extension LongformerAttention: ModifierDifferentiable {}
extension BigBirdAttention: ModifierDifferentiable {}
extension MultiQueryAttention: ModifierDifferentiable {}
extension AdaptiveSpanAttention: ModifierDifferentiable {}
extension TransformerXLAttention: ModifierDifferentiable {}
extension CompressiveTransformerAttention: ModifierDifferentiable {}
extension ETCAttention: ModifierDifferentiable {}
extension AxialAttention: ModifierDifferentiable {}
extension LSHAttention: ModifierDifferentiable {}
extension RoutingAttention: ModifierDifferentiable {}

/// Where the backward of the call running on this task adds `∂L/∂bias` (set by
/// ``ModifiableAttention/modifierGradients(query:key:value:result:outputGradient:keyLengths:threads:)``
/// around its call of the conformer's backward; nil: not asked).
enum ModifierGradientRequest {
    @TaskLocal static var bias: UncheckedSendable<MutableTensorView>?
}

extension ModifiableAttention {
    /// The `modifiers` of the conformer at `value` (a metatype's entry: see
    /// ``DifferentiableAttention/scoreModifiers``).
    static func modifiers(at value: UnsafeRawPointer) -> ScoreModifiers {
        value.assumingMemoryBound(to: Self.self).pointee.modifiers
    }

    /// Makes the conformer at `value` read packed sequence `s`'s block of its bias
    /// (a metatype's entry: see ``Attention/packedSequence(_:)``).
    static func readBias(ofSequence s: Int, at value: UnsafeMutableRawPointer) {
        value.assumingMemoryBound(to: Self.self).pointee.modifiers.biasSequence = s
    }
}

extension Attention {
    /// This conformer's score modifiers when it is a ``ModifiableAttention`` (nil otherwise).
    /// Through the metatype, not `self as? any ModifiableAttention`: casting the value would
    /// box a conformer larger than three words on the heap on every call.
    var scoreModifiers: ScoreModifiers? {
        guard let type = Self.self as? any ModifiableAttention.Type else { return nil }
        return withUnsafePointer(to: self) { type.modifiers(at: UnsafeRawPointer($0)) }
    }

    /// This conformer as packed sequence `s`'s separate call runs it: with a bias, one that
    /// reads the sequence's block of it (``ScoreModifiers/bias``); otherwise itself.
    func packedSequence(_ s: Int) -> Self {
        guard let type = Self.self as? any ModifiableAttention.Type,
              withUnsafePointer(to: self, { type.modifiers(at: UnsafeRawPointer($0)).bias != nil }) else { return self }
        var sequence = self
        withUnsafeMutablePointer(to: &sequence) { type.readBias(ofSequence: s, at: UnsafeMutableRawPointer($0)) }
        return sequence
    }
}

extension DifferentiableAttention {

    /// Runs `body` with the kernel form of this conformer's score modifiers for `shape`
    /// (nil when it has none that modify scores) and the view to add `∂L/∂bias` into (nil
    /// unless ``ModifiableAttention/modifierGradients(query:key:value:result:outputGradient:keyLengths:threads:)``
    /// asked for it), for ``TiledSoftmaxBackward/run(shape:scale:threads:keyBlocks:accumulate:q:k:v:o:lse:dO:dQ:dK:dV:modifiers:biasGradient:mask:)``.
    func withModifierBackward<R>(_ shape: AttentionShape,
                                 _ body: (ScoreModifierKernel?, MutableTensorView?) throws -> R) throws -> R {
        guard let modifiers = scoreModifiers, modifiers.modifiesScores else {
            return try body(nil, nil)
        }
        return try modifiers.withKernel(shape) { kernel in
            // A packed sequence's call adds into its block of the bias gradient.
            let target = (modifiers.bias == nil ? nil : ModifierGradientRequest.bias?.value).map {
                MutableTensorView(base: $0.base + (modifiers.biasSequence ?? 0) * $0.strides[0], strides: $0.strides)
            }
            return try body(kernel, target)
        }
    }
}

extension ModifiableAttention where Self: DifferentiableAttention {
    /// The gradients of a loss with respect to the learned score modifiers, `∂L/∂bias` and
    /// `∂L/∂σ_h` (sinks), through the call that gave `result`, with `dQ`, `dK`, `dV` (which
    /// the same pass computes, as ``DifferentiableAttention/gradients(query:key:value:result:outputGradient:keyLengths:threads:)``).
    /// The cap and the ALiBi slopes are constants (no gradient).
    ///
    /// ```
    /// // naive reference, for each b, h, i and visible key j (s′ the modified score, lse with the sink):
    /// P[j] = exp(s′[j] − lse[b,h,i]),  D = dot(dO[b,h,i], o[b,h,i]),  G[j] = P[j] · (dot(dO[b,h,i], v[j]) − D)
    /// ∂bias[b or 0, h or 0, i, j] += G[j]
    /// ∂σ[h] −= exp(σ[h] − lse[b,h,i]) · D
    /// ```
    ///
    /// - Throws: what ``DifferentiableAttention/gradients(query:key:value:result:outputGradient:keyLengths:threads:)``
    ///   throws (the modifiers checked as the forward checks them), and
    ///   ``AttentionError/unsupported(_:)`` for a conformer whose backward does not take
    ///   modifiers.
    /// - Complexity: the backward's, plus one scattered add per visible pair with a bias
    ///   (a bias broadcast over batch items or key/value heads is summed in a fixed order:
    ///   the work items of one key block add their query tiles one after another), plus
    ///   `O(B · H · Nq · Dv)` for the sinks. Memory: the bias gradient (the bias's shape).
    ///   Bitwise identical for every thread count.
    public func modifierGradients(query: Tensor, key: Tensor, value: Tensor, result: AttentionResult,
                                  outputGradient: Tensor, keyLengths: [Int]? = nil,
                                  threads: Int? = nil) throws -> (inputs: AttentionGradients,
                                                                  modifiers: ScoreModifierGradients) {
        let shape = try checkedGradientCall(query: query, key: key, value: value, output: result.output,
                                            logSumExp: result.logSumExp, outputGradient: outputGradient,
                                            keyLengths: keyLengths, threads: threads, scale: nil).shape
        try checkModifiersForBackward(shape)
        return try withModifierGradients(shape, result: result, outputGradient: outputGradient) {
            try gradients(query: query, key: key, value: value, result: result, outputGradient: outputGradient,
                          keyLengths: keyLengths, threads: threads)
        }
    }

    /// ``modifierGradients(query:key:value:result:outputGradient:keyLengths:threads:)`` of a
    /// packed call (``PackedSequences``): `dQ`, `dK`, `dV` as the packed backward gives them
    /// (``DifferentiableAttention/gradients(query:key:value:result:outputGradient:sequences:threads:)``),
    /// `∂L/∂bias` shaped like the packed bias `[S or 1, H or 1, max Nq_s, max Nk_s]` (each
    /// sequence adds into its block, sequence after sequence: a block shared by all, `S = 1`,
    /// sums them in that order) and `∂L/∂σ_h` summed over every packed row (rows of
    /// sequences without keys add 0: their output does not depend on the sink).
    ///
    /// - Complexity: the packed backward's, plus the bias's scattered adds and the sinks' sum.
    ///   Bitwise identical for every thread count.
    public func modifierGradients(query: Tensor, key: Tensor, value: Tensor, result: AttentionResult,
                                  outputGradient: Tensor, sequences: PackedSequences,
                                  threads: Int? = nil) throws -> (inputs: AttentionGradients,
                                                                  modifiers: ScoreModifierGradients) {
        let shape = try AttentionShape(query: query, key: key, value: value)
        // The packed backward checks everything, the bias's packed shape included, before it
        // computes anything.
        return try withModifierGradients(shape, result: result, outputGradient: outputGradient) {
            try gradients(query: query, key: key, value: value, result: result, outputGradient: outputGradient,
                          sequences: sequences, threads: threads)
        }
    }

    /// `backward()` (a checked backward of this conformer over the rows of `shape`) with the
    /// kernels adding `∂L/∂bias` into a zero-filled tensor of the bias's shape, then
    /// `∂L/∂σ_h` over those rows.
    private func withModifierGradients(_ shape: AttentionShape, result: AttentionResult, outputGradient: Tensor,
                                       _ backward: () throws -> AttentionGradients) throws
        -> (inputs: AttentionGradients, modifiers: ScoreModifierGradients) {
        var biasGradient = try modifiers.bias.map { try Tensor(shape: $0.shape) }
        let inputs: AttentionGradients
        if biasGradient != nil {
            inputs = try biasGradient!.withMutableStridedView { view in
                var strides = view.kernel.strides
                if view.shape[0] == 1 { strides[0] = 0 }
                if view.shape[1] == 1 { strides[1] = 0 }
                let target = MutableTensorView(base: view.kernel.row(0, 0, 0), strides: strides)
                return try ModifierGradientRequest.$bias.withValue(UncheckedSendable(target)) { try backward() }
            }
        } else {
            inputs = try backward()
        }
        let sinks = try modifiers.sinks.map { sinks in
            try result.output.withStridedView { o in try result.logSumExp.withStridedView { l in
            try outputGradient.withStridedView { g in
                sinkGradients(sinks, shape: shape, o: o.kernel, lse: l.kernel, dO: g.kernel)
            } } }
        }
        return (inputs, ScoreModifierGradients(bias: biasGradient, sinks: sinks))
    }
}

/// `∂L/∂σ_h = −Σ_{b, i} exp(σ_h − lse_{b,h,i}) · Σ_c dO_{b,h,i,c} · O_{b,h,i,c}` (the sink is
/// a logit whose value vector is zero: `dS = p_sink · (0 − D)`), summed over `b` then `i` in
/// Double; rows with `lse = −∞` (none when sinks are set) contribute nothing.
func sinkGradients(_ sinks: [Float], shape: AttentionShape, o: TensorView, lse: TensorView, dO: TensorView) -> [Float] {
    (0..<shape.heads).map { h in
        var sum = 0.0
        for b in 0..<shape.batch {
            for i in 0..<shape.queryLength {
                let l = lse.row(b, h, i)[0]
                guard l > -.infinity else { continue }
                let rowDot = dot(dO.row(b, h, i), dO.strides[3], o.row(b, h, i), o.strides[3], count: shape.valueDim)
                sum -= Double(expf(sinks[h] - l)) * Double(rowDot)
            }
        }
        return Float(sum)
    }
}
