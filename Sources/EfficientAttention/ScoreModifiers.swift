import Foundation

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
/// ``LongformerAttention``, ``BigBirdAttention``, ``AdaptiveSpanAttention``).
///
/// - Complexity: per scored pair, one `exp` and a division for soft-capping, two vector
///   operations for ALiBi, one load for the bias; per output row, one rescale for sinks.
public struct ScoreModifiers: Sendable, Equatable {
    /// Soft-capping `cap` (Gemma 2 uses 50 for attention); `nil`: none. Finite, > 0.
    public var softCap: Float?
    /// ALiBi slopes `α_h`, one per query head; `nil`: none. Finite.
    public var alibiSlopes: [Float]?
    /// Additive bias `[B or 1, H or 1, Nq, Nk]` (a 1 broadcasts over that dimension);
    /// `nil`: none. Finite or `-infinity` (a hidden pair).
    public var bias: Tensor?
    /// Sink logits `σ_h`, one per query head; `nil`: none. Finite.
    public var sinks: [Float]?

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

    /// Throws unless every modifier fits `shape`, naming the option.
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
        if let bias {
            let s = bias.shape
            guard s.count == 4, s[0] == 1 || s[0] == shape.batch, s[1] == 1 || s[1] == shape.heads,
                  s[2] == shape.queryLength, s[3] == shape.keyLength else {
                throw AttentionError.shapeMismatch(
                    "modifiers.bias must be [B or 1, H or 1, Nq, Nk] = [\(shape.batch) or 1, \(shape.heads) or 1, \(shape.queryLength), \(shape.keyLength)], got \(s)")
            }
            if bias.elements.contains(where: { $0.isNaN || $0 == .infinity }) {
                throw AttentionError.invalidParameter("modifiers.bias must be finite or -infinity (found NaN or +infinity)")
            }
        }
    }

    /// Runs `body` with the kernel form of the score modifiers of `shape` (nil when none
    /// modifies scores), valid during `body`.
    func withKernel<R>(_ shape: AttentionShape, _ body: (ScoreModifierKernel?) throws -> R) rethrows -> R {
        guard modifiesScores else { return try body(nil) }
        func withSlopes(_ body: (UnsafePointer<Float>?) throws -> R) rethrows -> R {
            guard let alibiSlopes else { return try body(nil) }
            return try alibiSlopes.withUnsafeBufferPointer { try body($0.baseAddress!) }
        }
        return try withSlopes { slopes in
            func make(_ bias: TensorView?) throws -> R {
                try body(ScoreModifierKernel(softCap: softCap ?? 0, slopes: slopes, bias: bias,
                                             offset: shape.keyLength - shape.queryLength))
            }
            guard let bias else { return try make(nil) }
            return try bias.withStridedView { view in
                // Broadcast dimensions read the one row they have (stride 0).
                var strides = view.strides
                if view.shape[0] == 1 { strides[0] = 0 }
                if view.shape[1] == 1 { strides[1] = 0 }
                return try make(TensorView(base: view.baseAddress, strides: strides))
            }
        }
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
    /// The whole call's batch item and head of a restricted call's item 0 and head 0.
    var firstItem = 0, firstHead = 0

    /// This kernel for a call restricted to batch item `b`, head `h` of this one.
    func restricted(item b: Int, head h: Int) -> ScoreModifierKernel {
        var r = self
        r.firstItem += b
        r.firstHead += h
        return r
    }

    /// Applies soft-capping, the bias and ALiBi to `scores[r · ld + lane]`, the score of key
    /// `keys.position(r)` and query `queries.position(lane)` of batch item `b`, head `h`.
    func apply(_ scores: UnsafeMutablePointer<Float>, ld: Int, keys: PositionRun, queries: PositionRun,
               lanes: Int, b: Int, h: Int) {
        typealias V = SIMD16<Float>
        let item = firstItem + b, head = firstHead + h
        let cap = V(repeating: softCap), inverseCap = V(repeating: softCap > 0 ? 1 / softCap : 0)
        let slope = slopes.map { V(repeating: $0[head]) }
        var lanePositions = SIMD16<Int32>()
        for l in 0..<16 { lanePositions[l] = Int32(truncatingIfNeeded: l * queries.step) }
        let biasRow = bias.map { $0.row(item, head, 0) }
        let biasRowStride = bias?.strides[2] ?? 0, biasColumnStride = bias?.strides[3] ?? 0
        for r in 0..<keys.count {
            let j = keys.position(r), row = scores + r &* ld
            for lane in stride(from: 0, to: lanes, by: 16) {
                var s = load16(row + lane)
                if softCap > 0 { s = cap * tanh16(s * inverseCap) }
                if let biasRow {
                    var terms = V()
                    for l in 0..<max(0, min(16, queries.count - lane)) {
                        terms[l] = biasRow[queries.position(lane + l) &* biasRowStride &+ j &* biasColumnStride]
                    }
                    s += terms
                }
                if let slope {
                    // −α · |i + offset − j| with i = queries.start + (lane + l) · step.
                    let base = Int32(truncatingIfNeeded: queries.position(lane) + offset - j)
                    let distance = SIMD16<Int32>(repeating: base) &+ lanePositions
                    let magnitude = distance.replacing(with: 0 &- distance, where: distance .< 0)
                    s -= slope * V(magnitude)
                }
                store16(s, row + lane)
            }
        }
    }
}

/// `tanh(x)` lane by lane, within a few ulp: `(e^{2x} − 1) / (e^{2x} + 1)` for `|x| ≥ 0.55`
/// (`x` clamped to ±9, where tanh is ±1 in Float), its Taylor series to `x¹³` below (the
/// quotient loses digits to cancellation near 0; the series' first omitted term is under
/// 2·10⁻⁷ there).
@inline(__always)
func tanh16(_ x: SIMD16<Float>) -> SIMD16<Float> {
    typealias V = SIMD16<Float>
    let clamped = clamp(x, V(repeating: -9), V(repeating: 9))
    let e = VectorMath.exp16(clamped + clamped)
    let quotient = (e - 1) / (e + 1)
    let x2 = x * x
    var p = V(repeating: 21844.0 / 6081075.0)
    p = fused(p, x2, V(repeating: -1382.0 / 155925.0))
    p = fused(p, x2, V(repeating: 62.0 / 2835.0))
    p = fused(p, x2, V(repeating: -17.0 / 315.0))
    p = fused(p, x2, V(repeating: 2.0 / 15.0))
    p = fused(p, x2, V(repeating: -1.0 / 3.0))
    let series = fused(p * x2, x, x)
    let small = (x .< V(repeating: 0.55)) .& (x .> V(repeating: -0.55))
    return quotient.replacing(with: series, where: small)
}

extension ScoreModifiers {
    /// Adds the sinks to a finished result: `lse' = log(e^{lse} + e^{σ_h})` and
    /// `o ← o · e^{lse − lse'}` for every row of `o` (Float) and `lse`.
    func applySinks(o: MutableTensorView, lse: MutableTensorView, shape: AttentionShape) {
        guard let sinks else { return }
        for b in 0..<shape.batch {
            for h in 0..<shape.heads {
                let sink = sinks[h]
                for i in 0..<shape.queryLength {
                    let l = lse.row(b, h, i)
                    let held = l[0]
                    let top = max(held, sink)
                    let total = logf(expf(held - top) + expf(sink - top)) + top
                    let keep = held == -.infinity ? 0 : expf(held - total)
                    let row = o.row(b, h, i), sd = o.strides[3]
                    for c in 0..<shape.valueDim { row[c &* sd] *= keep }
                    l[0] = total
                }
            }
        }
    }
}
