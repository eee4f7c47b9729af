// The backward pass of CustomMaskAttention (issues 17 and 18): a Double reference of the
// forward with a predicate, a score function and the built-in modifiers, differentiated by
// hand (itself checked by central finite differences on a tiny shape); the library against
// it for document masks (causal and not), a head-varying predicate, one that hides whole
// rows, an affine tilt, a tanh cap and a function that hides pairs with −∞; with modifiers
// (∂bias and ∂sinks through modifierGradients); on awkward shapes (N not a tile multiple,
// D = 1, 3, 65, Nq != Nk, H = 4 over Hkv = 2, key padding down to an item with no key);
// a custom causal predicate equals dense causal bitwise and a tanh cap written as a score
// function equals the built-in soft-cap within 1e-6; bitwise identical for 1, 2, 3, 7
// threads; the view entry point against the Tensor path; misshapen inputs throw.

@_spi(Testing) @_spi(Benchmarking) import EfficientAttention
import Foundation
import Testing

// MARK: - Score functions with their reference form

/// A score function whose value and derivative are written once, generically, for the
/// library (in Float) and the references (in Double and Float).
protocol ReferenceScore: DifferentiableScoreFunction {
    /// `f(s)` and `f′(s)` for query `i`, key `j` of head `h` in item `b`.
    func reference<T: BinaryFloatingPoint>(_ s: T, _ b: Int, _ h: Int, _ i: Int, _ j: Int,
                                           tanh: (T) -> T) -> (value: T, derivative: T)
}

extension ReferenceScore {
    func score(_ s: Float, batch: Int, head: Int, query: Int, key: Int) -> Float {
        reference(s, batch, head, query, key, tanh: tanhf).value
    }
    func derivative(_ s: Float, batch: Int, head: Int, query: Int, key: Int) -> Float {
        reference(s, batch, head, query, key, tanh: tanhf).derivative
    }
}

extension IdentityScore: ReferenceScore {
    func reference<T: BinaryFloatingPoint>(_ s: T, _ b: Int, _ h: Int, _ i: Int, _ j: Int,
                                           tanh: (T) -> T) -> (value: T, derivative: T) { (s, 1) }
}

/// An ALiBi-like tilt, steeper per head, with a slope on the score per batch item:
/// `f = s (1 + b/4) − slope (h + 1) |i − j|`, `f′ = 1 + b/4`.
struct AffineTilt: ReferenceScore {
    var slope: Float
    func reference<T: BinaryFloatingPoint>(_ s: T, _ b: Int, _ h: Int, _ i: Int, _ j: Int,
                                           tanh: (T) -> T) -> (value: T, derivative: T) {
        let a = 1 + T(b) / 4
        return (s * a - T(slope * Float(h + 1)) * T(abs(i - j)), a)
    }
}

/// Soft-capping as a score function: `f = cap · tanh(s / cap)`, `f′ = 1 − tanh²(s / cap)`.
struct TanhCap: ReferenceScore {
    var cap: Float
    func reference<T: BinaryFloatingPoint>(_ s: T, _ b: Int, _ h: Int, _ i: Int, _ j: Int,
                                           tanh: (T) -> T) -> (value: T, derivative: T) {
        let t = tanh(s / T(cap))
        return (T(cap) * t, 1 - t * t)
    }
}

/// A nonlinear function that hides the pairs with `(i + j) mod 5 = 0` by returning −∞ (its
/// derivative there is NaN, which must not leak): `f = s + s²/10`, `f′ = 1 + s/5`.
struct HidingSquare: ReferenceScore {
    func reference<T: BinaryFloatingPoint>(_ s: T, _ b: Int, _ h: Int, _ i: Int, _ j: Int,
                                           tanh: (T) -> T) -> (value: T, derivative: T) {
        (i + j) % 5 == 0 ? (-.infinity, .nan) : (s + s * s / 10, 1 + s / 5)
    }
}

// MARK: - Predicates

/// A band that widens with the head (and shifts with the batch item): `|i − j − b| ≤ 3 + 20 h`.
struct HeadBand: VisibilityPredicate {
    var variesByHead: Bool { true }
    func isVisible(batch: Int, head: Int, query: Int, key: Int) -> Bool { abs(query - key - batch) <= 3 + 20 * head }
}

/// Rows `i ≡ 3 (mod 7)` see no key; the others see the keys `j ≤ i` and those with `j mod 3 ≠ 1`.
struct HiddenRows: VisibilityPredicate {
    func isVisible(batch: Int, head: Int, query: Int, key: Int) -> Bool {
        query % 7 != 3 && (key <= query || key % 3 != 1)
    }
}

// MARK: - Reference

/// The forward with score function `f` and the built-in modifiers, and its hand-written
/// derivative, in `T` (``modifiedReferenceBackward(q:k:v:dO:dims:scale:visible:modifiers:exp:log:tanh:weight:weightGradient:score:)``):
/// for each row, the keys `J` the predicate shows (below the key length),
/// `s_j = scale q·k_j`, `u_j = f(s_j)`, `t_j = tanh(u_j / cap)`,
/// `s′_j = cap t_j + bias_ij − α_h |i + Nk − Nq − j|`, `Z = Σ e^{s′_j} + e^{σ_h}`,
/// `P_j = e^{s′_j} / Z`, `o = Σ P_j v_j`, `lse = log Z`; `G_j = P_j (dO·v_j − D)`,
/// `D = Σ P_j dO·v_j`: `∂bias_ij = G_j`, `dS_j = G_j (1 − t_j²) f′(s_j)` (0 where `P_j = 0`),
/// `dq = scale Σ dS_j k_j`, `dk_j += scale dS_j q`, `dv_j += P_j dO`, `∂σ_h −= (e^{σ_h} / Z) D`.
func customReferenceBackward<T: BinaryFloatingPoint, F: ReferenceScore>(
    q: [T], k: [T], v: [T], dO: [T], dims n: GradientDims, scale: T, visible: Visibility, score f: F,
    modifiers m: ReferenceModifiers<T>, exp: (T) -> T, log: (T) -> T, tanh: @escaping (T) -> T
) -> ModifiedReference<T> {
    modifiedReferenceBackward(q: q, k: k, v: v, dO: dO, dims: n, scale: scale, visible: visible, modifiers: m,
                              exp: exp, log: log, tanh: tanh,
                              score: { s, b, h, i, j in f.reference(s, b, h, i, j, tanh: tanh) })
}

/// The Double reference and the naive Float one of a call.
func customReferences<F: ReferenceScore>(_ q: Tensor, _ k: Tensor, _ v: Tensor, _ dO: Tensor, visible: Visibility,
                                         score: F, modifiers: ScoreModifiers)
    -> (double: ModifiedReference<Double>, float: ModifiedReference<Float>) {
    let dims = GradientDims(query: q, value: v), scale = 1 / Float(q.shape[3]).squareRoot()
    let double = customReferenceBackward(
        q: q.elements.map(Double.init), k: k.elements.map(Double.init), v: v.elements.map(Double.init),
        dO: dO.elements.map(Double.init), dims: dims, scale: Double(scale), visible: visible, score: score,
        modifiers: ReferenceModifiers(modifiers), exp: { Foundation.exp($0) }, log: { Foundation.log($0) },
        tanh: { Foundation.tanh($0) })
    let float = customReferenceBackward(
        q: q.elements, k: k.elements, v: v.elements, dO: dO.elements, dims: dims, scale: scale, visible: visible,
        score: score, modifiers: ReferenceModifiers(modifiers), exp: { expf($0) }, log: { logf($0) },
        tanh: { tanhf($0) })
    return (double, float)
}

// MARK: - Cases

/// A predicate of the cases, with its rule for the reference.
struct CustomPredicateChoice: Sendable, CustomStringConvertible {
    var description: String
    var make: @Sendable () throws -> any VisibilityPredicate

    static let documents = CustomPredicateChoice(description: "documents of 45") { try DocumentMask(length: 45) }
    static let causalDocuments = CustomPredicateChoice(description: "causal documents of 45") {
        try DocumentMask(length: 45, causal: true)
    }
    static let band = CustomPredicateChoice(description: "head band") { HeadBand() }
    static let hiddenRows = CustomPredicateChoice(description: "hidden rows") { HiddenRows() }
    static let all = CustomPredicateChoice(description: "all visible") { AllVisible() }
}

/// A score function of the cases.
struct CustomScoreChoice: Sendable, CustomStringConvertible {
    var description: String
    var function: any ReferenceScore & Sendable

    static let identity = CustomScoreChoice(description: "identity", function: IdentityScore())
    static let tilt = CustomScoreChoice(description: "tilt", function: AffineTilt(slope: 0.05))
    static let cap = CustomScoreChoice(description: "tanh cap", function: TanhCap(cap: 0.8))
    static let hiding = CustomScoreChoice(description: "hiding square", function: HidingSquare())
}

/// One problem: predicate, score function, modifiers and shape.
struct CustomBackwardCase: Sendable, CustomTestStringConvertible {
    var predicate: CustomPredicateChoice
    var score: CustomScoreChoice
    var choice = ModifierChoice()
    var batch = 1, heads = 2, kvHeads = 2
    var queryLength: Int, keyLength: Int? = nil
    var headDim = 16, valueDim: Int? = nil
    var keyLengths: [Int]? = nil
    var seed: UInt64 = 0

    var nk: Int { keyLength ?? queryLength }
    var shape: AttentionShape {
        AttentionShape(batch: batch, heads: heads, kvHeads: kvHeads, queryLength: queryLength, keyLength: nk,
                       headDim: headDim, valueDim: valueDim ?? headDim)
    }
    var testDescription: String {
        "\(predicate) / \(score) [\(choice)]: B\(batch) H\(heads)/\(kvHeads) Nq\(queryLength) Nk\(nk) D\(headDim)"
            + " Dv\(valueDim ?? headDim)" + (keyLengths.map { " keyLengths\($0)" } ?? "")
    }

    /// Visibility for the reference: the predicate's pairs below the key lengths.
    func visibility() throws -> Visibility {
        let p = try predicate.make(), lengths = keyLengths
        return { b, h, i, j in j < (lengths?[b] ?? .max) && p.isVisible(batch: b, head: h, query: i, key: j) }
    }

    /// Runs `body` with the case's conformer (its modifiers set), opened to its concrete types.
    func with<R>(_ body: (any ModifiableAttention & DifferentiableAttention) throws -> R) throws -> R {
        func open<P: VisibilityPredicate, F: ReferenceScore>(_ p: P, _ f: F) throws -> R {
            var a = CustomMaskAttention(predicate: p, score: f)
            a.modifiers = try choice.modifiers(shape, seed: seed)
            return try body(a)
        }
        return try open(try predicate.make(), score.function)
    }

    func inputs() throws -> (q: Tensor, k: Tensor, v: Tensor, result: AttentionResult, dO: Tensor) {
        let (q, k, v) = try randomQKV(batch: batch, heads: heads, kvHeads: kvHeads, queryLength: queryLength,
                                      keyLength: keyLength, headDim: headDim, valueDim: valueDim, seed: seed, range: -2...2)
        let result = try with { try $0.attend(query: q, key: k, value: v, keyLengths: keyLengths, threads: nil) }
        let dO = try randomTensor([batch, heads, queryLength, valueDim ?? headDim], seed: seed &* 7 &+ 5)
        return (q, k, v, result, dO)
    }

    func gradients(threads: Int?) throws -> (inputs: AttentionGradients, modifiers: ScoreModifierGradients) {
        let (q, k, v, result, dO) = try inputs()
        return try with { try modifierGradients($0, q, k, v, result, dO, keyLengths: keyLengths, threads: threads) }
    }

    func check(sourceLocation: SourceLocation = #_sourceLocation) throws {
        let (q, k, v, result, dO) = try inputs()
        let visible = try visibility()
        let modifiers = try choice.modifiers(shape, seed: seed)
        func open<F: ReferenceScore>(_ f: F) -> (ModifiedReference<Double>, ModifiedReference<Float>) {
            customReferences(q, k, v, dO, visible: visible, score: f, modifiers: modifiers)
        }
        let (reference, naive) = open(score.function)
        let label = testDescription
        // The forward agrees with the reference (the backward's inputs are the forward's).
        let lse = result.logSumExp.elements
        #expect(zip(lse, reference.gradients.lse).allSatisfy { $0.isInfinite ? Double($0) == $1 : abs(Double($0) - $1) < 1e-4 },
                "\(label): lse differs from the reference", sourceLocation: sourceLocation)
        let g = try with { try modifierGradients($0, q, k, v, result, dO, keyLengths: keyLengths, threads: 3) }
        // Pairs the score function hides count as invisible: their rows and columns must be 0.
        let f = score.function, capped = modifiers.softCap != nil
        let effective: Visibility = { b, h, i, j in
            visible(b, h, i, j) && (capped || f.reference(Double(0), b, h, i, j, tanh: { Foundation.tanh($0) }).value > -.infinity)
        }
        checkGradients(g.inputs, reference: reference.gradients, naive: naive.gradients,
                       dims: GradientDims(query: q, value: v), visible: effective, label,
                       sourceLocation: sourceLocation)
        if let bias = g.modifiers.bias {
            checkParameterGradient(bias.elements, reference: reference.bias, naive: naive.bias, "\(label): ∂bias",
                                   sourceLocation: sourceLocation)
        }
        if let sinks = g.modifiers.sinks {
            checkParameterGradient(sinks, reference: reference.sinks, naive: naive.sinks, "\(label): ∂sinks",
                                   sourceLocation: sourceLocation)
        }
    }
}

enum CustomBackwardCases {
    /// Awkward shapes: N not a multiple of the tiles (64 queries, 128 keys), D = 1, 3, 65,
    /// Nq != Nk both ways, grouped heads, key padding down to an item with no key.
    static func shapes(_ p: CustomPredicateChoice, _ f: CustomScoreChoice, base: UInt64) -> [CustomBackwardCase] {
        [CustomBackwardCase(predicate: p, score: f, batch: 2, heads: 4, kvHeads: 2, queryLength: 150, keyLength: 170,
                            headDim: 65, valueDim: 7, keyLengths: [170, 90], seed: base + 1),
         CustomBackwardCase(predicate: p, score: f, queryLength: 33, headDim: 1, seed: base + 2),
         CustomBackwardCase(predicate: p, score: f, batch: 2, heads: 4, kvHeads: 2, queryLength: 200, keyLength: 129,
                            headDim: 3, valueDim: 5, keyLengths: [0, 129], seed: base + 3),
         CustomBackwardCase(predicate: p, score: f, heads: 2, kvHeads: 1, queryLength: 70, keyLength: 333,
                            headDim: 16, seed: base + 4)]
    }

    static let all: [CustomBackwardCase] =
        shapes(.documents, .identity, base: 100) + shapes(.causalDocuments, .tilt, base: 200)
        + shapes(.band, .cap, base: 300) + shapes(.hiddenRows, .hiding, base: 400)
        + [CustomBackwardCase(predicate: .all, score: .tilt, queryLength: 130, keyLength: 257, seed: 500),
           CustomBackwardCase(predicate: .causalDocuments, score: .identity, heads: 4, kvHeads: 2, queryLength: 300,
                              headDim: 32, keyLengths: [260], seed: 501)]

    /// With the built-in modifiers: a bias (∂bias), ALiBi, soft-capping, sinks (∂sinks).
    static let modified: [CustomBackwardCase] = [
        CustomBackwardCase(predicate: .band, score: .tilt, choice: .all, batch: 2, heads: 4, kvHeads: 2,
                           queryLength: 150, keyLength: 170, headDim: 65, valueDim: 7, keyLengths: [170, 90], seed: 600),
        CustomBackwardCase(predicate: .hiddenRows, score: .hiding, choice: ModifierChoice(alibi: true, bias: [2, 4]),
                           batch: 2, heads: 4, kvHeads: 2, queryLength: 77, keyLength: 140, headDim: 3,
                           keyLengths: [140, 0], seed: 601),
        CustomBackwardCase(predicate: .causalDocuments, score: .cap,
                           choice: ModifierChoice(softCap: 2, bias: [1, 2], hiddenColumn: 5, sinks: true),
                           queryLength: 129, headDim: 16, seed: 602),
        CustomBackwardCase(predicate: .documents, score: .identity, choice: ModifierChoice(bias: [1, 1]),
                           batch: 2, heads: 4, kvHeads: 2, queryLength: 100, headDim: 8, seed: 603),
    ]
}

// MARK: - Tests

@Suite("Custom mask backward")
struct CustomMaskBackwardTests {
    @Test("the Double reference agrees with central finite differences of its own forward")
    func referenceFiniteDifferences() throws {
        let predicates: [any VisibilityPredicate] = [HiddenRows(), HeadBand(), try DocumentMask(length: 3, causal: true)]
        let functions: [any ReferenceScore] = [HidingSquare(), TanhCap(cap: 0.9), AffineTilt(slope: 0.3)]
        for (n, (predicate, function)) in zip(predicates, functions).enumerated() {
            let (q, k, v) = try randomQKV(batch: 2, heads: 2, kvHeads: 1, queryLength: 8, keyLength: 7, headDim: 3,
                                          valueDim: 2, seed: 70 + UInt64(n), range: -2...2)
            let dO = try randomTensor([2, 2, 8, 2], seed: 80 + UInt64(n))
            let shape = AttentionShape(batch: 2, heads: 2, kvHeads: 1, queryLength: 8, keyLength: 7, headDim: 3, valueDim: 2)
            // The hiding function is not smooth under soft-capping's −∞ → −cap: no cap with it.
            let choice = n == 0 ? ModifierChoice(alibi: true, bias: [2, 1], sinks: true) : .all
            let modifiers = try choice.modifiers(shape, seed: 90)
            let visible: Visibility = { b, h, i, j in predicate.isVisible(batch: b, head: h, query: i, key: j) }
            func check<F: ReferenceScore>(_ f: F) {
                let dims = GradientDims(query: q, value: v), scale = 1 / 3.0.squareRoot()
                let base = ReferenceModifiers<Double>(modifiers)
                let (x, y, z, g) = (q.elements.map(Double.init), k.elements.map(Double.init),
                                    v.elements.map(Double.init), dO.elements.map(Double.init))
                func run(_ x: [Double], _ y: [Double], _ z: [Double], _ m: ReferenceModifiers<Double>) -> ModifiedReference<Double> {
                    customReferenceBackward(q: x, k: y, v: z, dO: g, dims: dims, scale: scale, visible: visible, score: f,
                                            modifiers: m, exp: { Foundation.exp($0) }, log: { Foundation.log($0) },
                                            tanh: { Foundation.tanh($0) })
                }
                func loss(_ r: ModifiedReference<Double>) -> Double { zip(r.gradients.output, g).map { $0 * $1 }.reduce(0, +) }
                let analytic = run(x, y, z, base)
                let h = 1e-6
                func expectClose(_ numeric: Double, _ value: Double, _ what: String) {
                    #expect(abs(numeric - value) <= 1e-6 * (1 + abs(value)), "predicate \(n): \(what) fd \(numeric) vs \(value)")
                }
                for t in x.indices {
                    var p = x, m = x
                    p[t] += h; m[t] -= h
                    expectClose((loss(run(p, y, z, base)) - loss(run(m, y, z, base))) / (2 * h), analytic.gradients.dq[t], "dq[\(t)]")
                }
                for t in y.indices {
                    var p = y, m = y
                    p[t] += h; m[t] -= h
                    expectClose((loss(run(x, p, z, base)) - loss(run(x, m, z, base))) / (2 * h), analytic.gradients.dk[t], "dk[\(t)]")
                }
                for t in z.indices {
                    var p = z, m = z
                    p[t] += h; m[t] -= h
                    expectClose((loss(run(x, y, p, base)) - loss(run(x, y, m, base))) / (2 * h), analytic.gradients.dv[t], "dv[\(t)]")
                }
                for t in (base.bias ?? []).indices where base.bias![t].isFinite {
                    var p = base, m = base
                    p.bias![t] += h; m.bias![t] -= h
                    expectClose((loss(run(x, y, z, p)) - loss(run(x, y, z, m))) / (2 * h), analytic.bias[t], "bias[\(t)]")
                }
                for t in (base.sinks ?? []).indices {
                    var p = base, m = base
                    p.sinks![t] += h; m.sinks![t] -= h
                    expectClose((loss(run(x, y, z, p)) - loss(run(x, y, z, m))) / (2 * h), analytic.sinks[t], "sinks[\(t)]")
                }
                #expect(!analytic.gradients.dq.contains { $0.isNaN }, "predicate \(n): NaN in the reference")
            }
            check(function)
        }
    }

    @Test("matches the hand-differentiated Double reference", arguments: CustomBackwardCases.all)
    func reference(_ c: CustomBackwardCase) throws { try c.check() }

    @Test("with the built-in modifiers (∂bias, ∂sinks) against the reference", arguments: CustomBackwardCases.modified)
    func modifiers(_ c: CustomBackwardCase) throws { try c.check() }

    @Test("rows no key is visible to give zero dQ; −∞ scores leak no NaN")
    func hiddenRowsAreZero() throws {
        let c = CustomBackwardCase(predicate: .hiddenRows, score: .hiding, batch: 1, heads: 2, kvHeads: 1,
                                   queryLength: 70, keyLength: 90, headDim: 8, seed: 700)
        let g = try c.gradients(threads: 2).inputs
        let dq = g.dQuery.elements
        for h in 0..<2 {
            for i in stride(from: 3, to: 70, by: 7) {
                let row = (h * 70 + i) * 8
                #expect(dq[row..<(row + 8)].allSatisfy { $0 == 0 }, "row \(i) of head \(h) is not 0")
            }
        }
        #expect(![dq, g.dKey.elements, g.dValue.elements].joined().contains { $0.isNaN })
    }

    @Test("a custom causal predicate's gradients equal dense causal's bitwise (Nq != Nk, key padding, grouped heads)")
    func causalEqualsDense() throws {
        for (nq, nk, lengths) in [(200, 200, nil), (70, 333, [333, 100]), (129, 129, [0, 64]), (300, 150, nil)]
            as [(Int, Int, [Int]?)] {
            let batch = lengths?.count ?? 1
            let (q, k, v) = try randomQKV(batch: batch, heads: 4, kvHeads: 2, queryLength: nq, keyLength: nk,
                                          headDim: 33, seed: 15)
            let dO = try randomTensor([batch, 4, nq, 33], seed: 16)
            let custom = CustomMaskAttention(predicate: CausalPredicate(offset: nk - nq))
            let dense = DenseAttention(causal: true)
            let result = try dense.attend(query: q, key: k, value: v, keyLengths: lengths, threads: 2)
            for threads in [1, 3] {
                expectBitwiseEqualGradients(
                    try custom.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                         keyLengths: lengths, threads: threads),
                    try dense.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                        keyLengths: lengths, threads: threads),
                    "Nq \(nq) Nk \(nk) threads \(threads)")
            }
        }
        // One causal document (the vector form of DocumentMask) and all-visible (dense).
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 200, headDim: 16, seed: 17)
        let dO = try randomTensor([1, 2, 200, 16], seed: 18)
        for (custom, dense) in [(CustomMaskAttention(predicate: try DocumentMask(length: 200, causal: true)),
                                 DenseAttention(causal: true))] {
            let result = try dense.attend(query: q, key: k, value: v, keyLengths: nil, threads: 2)
            expectBitwiseEqualGradients(try custom.gradients(query: q, key: k, value: v, result: result, outputGradient: dO),
                                        try dense.gradients(query: q, key: k, value: v, result: result, outputGradient: dO),
                                        "one causal document")
        }
        let result = try DenseAttention().attend(query: q, key: k, value: v, keyLengths: nil, threads: 2)
        expectBitwiseEqualGradients(
            try CustomMaskAttention(predicate: AllVisible()).gradients(query: q, key: k, value: v, result: result,
                                                                       outputGradient: dO),
            try DenseAttention().gradients(query: q, key: k, value: v, result: result, outputGradient: dO), "all visible")
    }

    @Test("a tanh cap written as a score function has the built-in soft-cap's gradients within 1e-6")
    func tanhCapEqualsSoftCap() throws {
        for (predicate, nq, nk, lengths) in [(AllVisible() as any VisibilityPredicate, 150, 170, [170, 90] as [Int]?),
                                             (try DocumentMask(length: 45, causal: true), 129, 129, nil)] {
            let batch = lengths?.count ?? 1
            let (q, k, v) = try randomQKV(batch: batch, heads: 4, kvHeads: 2, queryLength: nq, keyLength: nk,
                                          headDim: 24, seed: 19, range: -3...3)
            let dO = try randomTensor([batch, 4, nq, 24], seed: 20)
            func open<P: VisibilityPredicate>(_ p: P) throws {
                let custom = CustomMaskAttention(predicate: p, score: TanhCap(cap: 1.5))
                var builtIn = CustomMaskAttention(predicate: p)
                builtIn.modifiers = ScoreModifiers(softCap: 1.5)
                let a = try custom.attend(query: q, key: k, value: v, keyLengths: lengths, threads: 2)
                let b = try builtIn.attend(query: q, key: k, value: v, keyLengths: lengths, threads: 2)
                let ga = try custom.gradients(query: q, key: k, value: v, result: a, outputGradient: dO,
                                              keyLengths: lengths, threads: 2)
                let gb = try builtIn.gradients(query: q, key: k, value: v, result: b, outputGradient: dO,
                                               keyLengths: lengths, threads: 2)
                for (name, x, y) in [("dQuery", ga.dQuery, gb.dQuery), ("dKey", ga.dKey, gb.dKey),
                                     ("dValue", ga.dValue, gb.dValue)] {
                    let difference = zip(x.elements, y.elements).map { abs($0 - $1) }.max() ?? 0
                    #expect(difference <= 1e-6, "\(p): \(name) differs by \(difference)")
                }
            }
            try open(predicate)
        }
    }

    @Test("bitwise identical for 1, 2, 3 and 7 threads (inputs, ∂bias, ∂sinks)")
    func determinism() throws {
        for c in [CustomBackwardCases.modified[0], CustomBackwardCases.all[8],
                  CustomBackwardCase(predicate: .causalDocuments, score: .hiding, choice: ModifierChoice(bias: [1, 1]),
                                     batch: 2, heads: 4, kvHeads: 2, queryLength: 300, headDim: 16, seed: 800)] {
            let first = try c.gradients(threads: 1)
            for threads in [2, 3, 7] {
                let other = try c.gradients(threads: threads)
                expectBitwiseEqualGradients(first.inputs, other.inputs, "\(c.testDescription) threads \(threads)")
                #expect(first.modifiers == other.modifiers, "\(c.testDescription) threads \(threads): modifier gradients")
            }
        }
    }

    @Test("the view entry point (strided NaN-padded views, a caller's workspace) equals the Tensor convenience")
    func views() throws {
        for c in [CustomBackwardCases.all[0], CustomBackwardCases.all[12], CustomBackwardCases.modified[0]] {
            let (q, k, v, result, dO) = try c.inputs()
            try c.with { a in
                try expectViewEntryPointMatchesTensors(a, shape: c.shape, query: q, key: k, value: v, result: result,
                                                       outputGradient: dO, keyLengths: c.keyLengths, c.testDescription)
            }
        }
    }

    @Test("backward cost: 2.5 × the forward's FLOPs; a score function's tile in the workspace; a short workspace throws")
    func cost() throws {
        let shape = AttentionShape(heads: 2, queryLength: 300, headDim: 16)
        let masked = CustomMaskAttention(predicate: try DocumentMask(length: 45))
        let scored = CustomMaskAttention(predicate: try DocumentMask(length: 45), score: TanhCap(cap: 1))
        let forward = try masked.cost(shape, threads: 2), backward = try masked.backwardCost(shape, threads: 2)
        #expect(backward.flops == 2.5 * forward.flops && backward.scoredPairs == forward.scoredPairs)
        #expect(backward.workspaceBytes == (try DenseAttention().backwardCost(shape, threads: 2).workspaceBytes))
        #expect(try scored.backwardCost(shape, threads: 2).workspaceBytes > backward.workspaceBytes)
        let c = CustomBackwardCases.all[8]
        let (q, k, v, result, dO) = try c.inputs()
        try c.with { a in
            expectAttentionError(.invalidParameter, mentioning: ["workspace"]) {
                _ = try viewPathGradients(a, shape: c.shape, q: q, k: k, v: v, result: result, dO: dO,
                                          keyLengths: c.keyLengths, workspaceShort: true)
            }
        }
    }

    @Test("misshapen output, log-sum-exp or output gradient throws, naming it; bad modifiers throw")
    func badInputs() throws {
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 20, headDim: 4, seed: 30)
        let attention = CustomMaskAttention(predicate: HiddenRows(), score: HidingSquare())
        let result = try attention.attend(query: q, key: k, value: v)
        let dO = try randomTensor([1, 2, 20, 4], seed: 31)
        expectMisshapenGradientInputsThrow(attention, query: q, key: k, value: v, result: result, outputGradient: dO,
                                           wrong: try Tensor(shape: [1, 2, 19, 4]))
        var capped = attention
        capped.modifiers = ScoreModifiers(softCap: -1)
        expectAttentionError(.invalidParameter, mentioning: ["softCap"]) {
            _ = try capped.gradients(query: q, key: k, value: v, result: result, outputGradient: dO)
        }
    }

    @Test("a small gradient step through a score function lowers L = ½‖O − T‖²")
    func gradientStep() throws {
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 40, headDim: 8, seed: 40)
        let target = try randomTensor([1, 2, 40, 8], seed: 41)
        let attention = CustomMaskAttention(predicate: try DocumentMask(length: 13, causal: true), score: TanhCap(cap: 1))
        func loss(_ q: Tensor) throws -> (Double, Tensor, AttentionResult) {
            let r = try attention.attend(query: q, key: k, value: v)
            let diff = zip(r.output.elements, target.elements).map { $0 - $1 }
            return (diff.map { Double($0 * $0) / 2 }.reduce(0, +), try Tensor(shape: r.output.shape, data: diff), r)
        }
        let (l0, dO, r) = try loss(q)
        let g = try attention.gradients(query: q, key: k, value: v, result: r, outputGradient: dO).dQuery.elements
        let step: Float = 0.05
        let moved = try Tensor(shape: q.shape, data: zip(q.elements, g).map { $0 - step * $1 })
        let (l1, _, _) = try loss(moved)
        let predicted = Double(step) * g.map { Double($0 * $0) }.reduce(0, +)
        #expect(l1 < l0, "loss \(l0) → \(l1)")
        #expect(abs((l0 - l1) - predicted) <= 0.2 * predicted, "decrease \(l0 - l1), predicted \(predicted)")
    }
}
