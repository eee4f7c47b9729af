// The backward pass through the score modifiers (soft-capping, ALiBi, an additive bias,
// sinks) on the tiled kernel's conformers: a Double reference of the modified forward
// differentiated by hand (input gradients, ∂bias summed over its broadcast dimensions,
// ∂sinks), itself checked by central finite differences on a tiny shape; the library
// against it for each modifier and their combination, causal and not, with windows and
// patterns, key padding down to an item with no key, on awkward shapes (N not a tile
// multiple, D = 1, 3, 65, Nq != Nk, H = 4 over Hkv = 2); bitwise identical for 1, 2, 3, 7
// threads; the view entry point against the Tensor path; inputs that must throw; and a
// gradient step that lowers a loss.

@_spi(Testing) @_spi(Benchmarking) import EfficientAttention
import Foundation
import Testing

// MARK: - Reference

/// Score modifiers in `T` for the reference: the bias row-major `[bB, bH, Nq, Nk]`
/// (`bB` 1 or B, `bH` 1 or H).
struct ReferenceModifiers<T: BinaryFloatingPoint> {
    var softCap: T? = nil
    var slopes: [T]? = nil
    var bias: [T]? = nil, biasShape: [Int] = []
    var sinks: [T]? = nil

    init(_ m: ScoreModifiers) {
        softCap = m.softCap.map { T($0) }
        slopes = m.alibiSlopes?.map { T($0) }
        bias = m.bias?.elements.map { T($0) }
        biasShape = m.bias?.shape ?? []
        sinks = m.sinks?.map { T($0) }
    }

    func biasIndex(_ b: Int, _ h: Int, _ i: Int, _ j: Int) -> Int {
        ((biasShape[0] == 1 ? 0 : b) * biasShape[1] + (biasShape[1] == 1 ? 0 : h)) * biasShape[2] * biasShape[3]
            + i * biasShape[3] + j
    }
}

/// The modified forward and its gradients: input gradients, `∂bias` (the bias's shape) and `∂sinks`.
struct ModifiedReference<T: BinaryFloatingPoint> {
    var gradients: ReferenceGradients<T>
    var bias: [T], sinks: [T]
}

/// Softmax attention with modifiers and its hand-written derivative, in `T`: for each row
/// with visible keys `J` (ATTENTION_SPEC.md, "Score modifiers"),
/// `s_j = scale q·k_j`, `t_j = tanh(s_j / cap)`, `s′_j = cap t_j + bias_ij − α_h |i + Nk − Nq − j|`,
/// `Z = Σ_j e^{s′_j} + e^{σ_h}`, `P_j = e^{s′_j} / Z`, `o = Σ P_j v_j`, `lse = log Z`;
/// `G_j = P_j (dO·v_j − D)` with `D = Σ P_j dO·v_j`: `∂bias_ij = G_j`,
/// `dS_j = G_j (1 − t_j²)`, `dq = scale Σ dS_j k_j`, `dk_j += scale dS_j q`, `dv_j += P_j dO`,
/// `∂σ_h −= (e^{σ_h} / Z) · D`. Rows with no visible key: `o = 0`, `lse = σ_h` (or −∞).
/// `score` (a custom score function `f` with its derivative, CustomMaskAttention's): `s_j`
/// becomes `f(s_j)` before the cap and `dS_j` takes the factor `f′(s_j)` (0 where `P_j = 0`);
/// a row whose every score is `−∞` has no visible key. `keyPosition` (copies of keys, LSH's
/// rounds) maps key `j` to the position its bias and ALiBi distance use, in sequences of
/// `positionKeyLength` keys (default: `j` itself, of `Nk`).
func modifiedReferenceBackward<T: BinaryFloatingPoint>(
    q: [T], k: [T], v: [T], dO: [T], dims n: GradientDims, scale: T, visible: Visibility,
    modifiers m: ReferenceModifiers<T>, exp: (T) -> T, log: (T) -> T, tanh: (T) -> T,
    keyPosition: ((Int) -> Int)? = nil, positionKeyLength: Int? = nil,
    weight: PairTerm<T>? = nil, weightGradient: ((_ b: Int, _ h: Int, _ i: Int, _ j: Int, _ dw: T) -> Void)? = nil,
    score: ((_ s: T, _ b: Int, _ h: Int, _ i: Int, _ j: Int) -> (value: T, derivative: T))? = nil
) -> ModifiedReference<T> {
    let (d, dv, group) = (n.headDim, n.valueDim, n.heads / n.kvHeads)
    var r = ReferenceGradients<T>(output: .init(repeating: 0, count: n.batch * n.heads * n.queryLength * dv),
                                  lse: .init(repeating: -.infinity, count: n.batch * n.heads * n.queryLength),
                                  dq: .init(repeating: 0, count: q.count), dk: .init(repeating: 0, count: k.count),
                                  dv: .init(repeating: 0, count: v.count))
    var dbias = [T](repeating: 0, count: m.bias?.count ?? 0)
    var dsinks = [T](repeating: 0, count: n.heads)
    // Batch item, then head: the library's order of the broadcast sums.
    for b in 0..<n.batch { for h in 0..<n.heads { for i in 0..<n.queryLength {
        let hk = h / group, row = n.queryIndex(b, h, i)
        let keys = (0..<n.keyLength).filter { visible(b, h, i, $0) }
        let sink = m.sinks?[h]
        guard !keys.isEmpty else {
            if let sink { r.lse[row] = sink }
            continue
        }
        var derivative = [T](repeating: 1, count: keys.count)
        let scores = keys.enumerated().map { t, j -> T in
            let kj = n.keyIndex(b, hk, j)
            var dot: T = 0
            for c in 0..<d { dot += q[row * d + c] * k[kj * d + c] }
            var s = scale * dot
            if let score { (s, derivative[t]) = score(s, b, h, i, j) }
            if let cap = m.softCap {
                let th = tanh(s / cap)
                s = cap * th
                derivative[t] *= 1 - th * th
            }
            let jo = keyPosition?(j) ?? j
            if let bias = m.bias { s += bias[m.biasIndex(b, h, i, jo)] }
            if let slopes = m.slopes {
                let distance = T(i + (positionKeyLength ?? n.keyLength) - n.queryLength - jo)
                s -= slopes[h] * (distance < 0 ? -distance : distance)
            }
            return s
        }
        guard scores.contains(where: { $0 > -.infinity }) else {
            if let sink { r.lse[row] = sink }
            continue
        }
        var top = scores.max()!
        if let sink { top = max(top, sink) }
        // Probability weights (adaptive span's soft mask): P_j = w_j e^{s′_j} / Z, Z = Σ w_j e^{s′_j} + e^{σ}.
        let w = keys.map { j in weight?(b, h, i, j) ?? 1 }
        let e = zip(scores, w).map { $1 * exp($0 - top) }
        let sum = e.reduce(0, +) + (sink.map { exp($0 - top) } ?? 0)
        let p = e.map { $0 / sum }
        r.lse[row] = top + log(sum)
        for (t, j) in keys.enumerated() {
            let kj = n.keyIndex(b, hk, j)
            for c in 0..<dv { r.output[row * dv + c] += p[t] * v[kj * dv + c] }
        }
        let dp = keys.map { j -> T in
            let kj = n.keyIndex(b, hk, j)
            var dot: T = 0
            for c in 0..<dv { dot += dO[row * dv + c] * v[kj * dv + c] }
            return dot
        }
        var rowDot: T = 0
        for t in keys.indices { rowDot += p[t] * dp[t] }
        for (t, j) in keys.enumerated() {
            let g = p[t] * (dp[t] - rowDot), ds = p[t] > 0 ? g * derivative[t] : 0, kj = n.keyIndex(b, hk, j)
            if m.bias != nil { dbias[m.biasIndex(b, h, i, keyPosition?(j) ?? j)] += g }
            for c in 0..<d {
                r.dq[row * d + c] += scale * ds * k[kj * d + c]
                r.dk[kj * d + c] += scale * ds * q[row * d + c]
            }
            for c in 0..<dv { r.dv[kj * dv + c] += p[t] * dO[row * dv + c] }
        }
        if let sink { dsinks[h] -= exp(sink - top) / sum * rowDot }
        // ∂L/∂w_j = e^{s′_j} / Z · (dP_j − D).
        if let weightGradient {
            for (t, j) in keys.enumerated() { weightGradient(b, h, i, j, exp(scores[t] - top) / sum * (dp[t] - rowDot)) }
        }
    } } }
    return ModifiedReference(gradients: r, bias: dbias, sinks: dsinks)
}

func modifiedReference(_ q: Tensor, _ k: Tensor, _ v: Tensor, _ dO: Tensor, scale: Double, visible: Visibility,
                       _ m: ScoreModifiers) -> ModifiedReference<Double> {
    modifiedReferenceBackward(q: q.elements.map(Double.init), k: k.elements.map(Double.init),
                              v: v.elements.map(Double.init), dO: dO.elements.map(Double.init),
                              dims: GradientDims(query: q, value: v), scale: scale, visible: visible,
                              modifiers: ReferenceModifiers(m), exp: { Foundation.exp($0) },
                              log: { Foundation.log($0) }, tanh: { Foundation.tanh($0) })
}

func naiveModified(_ q: Tensor, _ k: Tensor, _ v: Tensor, _ dO: Tensor, scale: Float, visible: Visibility,
                   _ m: ScoreModifiers) -> ModifiedReference<Float> {
    modifiedReferenceBackward(q: q.elements, k: k.elements, v: v.elements, dO: dO.elements,
                              dims: GradientDims(query: q, value: v), scale: scale, visible: visible,
                              modifiers: ReferenceModifiers(m), exp: { expf($0) }, log: { logf($0) },
                              tanh: { tanhf($0) })
}

/// A parameter gradient against the reference: no NaN, and the error rule of the input
/// gradients (`≤ 3 ×` the naive Float error `+ 1e-6 (1 + max |ref|)`).
func checkParameterGradient(_ values: [Float], reference: [Double], naive: [Float], _ label: String,
                            sourceLocation: SourceLocation = #_sourceLocation) {
    #expect(values.count == reference.count, "\(label): \(values.count) values, expected \(reference.count)",
            sourceLocation: sourceLocation)
    guard values.count == reference.count else { return }
    func error(_ x: [Float]) -> Double { zip(x, reference).map { abs(Double($0) - $1) }.max() ?? 0 }
    let largest = reference.map(abs).max() ?? 0
    let bound = 3 * error(naive) + 1e-6 * (1 + largest)
    #expect(!values.contains { $0.isNaN }, "\(label): NaN", sourceLocation: sourceLocation)
    #expect(error(values) <= bound, "\(label): error \(error(values)) > bound \(bound)", sourceLocation: sourceLocation)
}

// MARK: - Cases

/// Which modifiers a case sets (the values are drawn from the case's seed).
struct ModifierChoice: Sendable, CustomStringConvertible {
    var softCap: Float? = nil
    var alibi = false
    /// The bias's batch and head extents as `[bB, bH]` (1 broadcasts), or nil.
    var bias: [Int]? = nil
    /// A hidden key column (bias −∞) of the bias.
    var hiddenColumn: Int? = nil
    var sinks = false

    var description: String {
        [softCap.map { "cap \($0)" }, alibi ? "alibi" : nil, bias.map { "bias \($0)" },
         hiddenColumn.map { "-inf column \($0)" }, sinks ? "sinks" : nil].compactMap { $0 }.joined(separator: " ")
    }

    static let all = ModifierChoice(softCap: 1.5, alibi: true, bias: [1, 1], sinks: true)

    func modifiers(_ s: AttentionShape, seed: UInt64) throws -> ScoreModifiers {
        var m = ScoreModifiers(softCap: softCap)
        if alibi { m.alibiSlopes = ScoreModifiers.standardALiBiSlopes(heads: s.heads).map { $0 * 0.5 } }
        if let bias {
            var values = try randomTensor([bias[0] == 1 ? 1 : s.batch, bias[1] == 1 ? 1 : s.heads, s.queryLength,
                                           s.keyLength], seed: seed &+ 99, in: -2...2)
            if let hiddenColumn {
                var e = values.elements
                for n in stride(from: hiddenColumn, to: e.count, by: s.keyLength) { e[n] = -.infinity }
                values = try Tensor(shape: values.shape, data: e)
            }
            m.bias = values
        }
        if sinks { m.sinks = (0..<s.heads).map { Float($0) * 0.7 - 0.5 } }
        return m
    }
}

/// One problem: a conformer (by subject), its modifiers, a shape.
struct ModifierBackwardCase: Sendable, CustomTestStringConvertible {
    var subject: GradientSubject
    var choice: ModifierChoice
    var batch = 1, heads = 2, kvHeads: Int? = nil
    var queryLength: Int, keyLength: Int? = nil
    var headDim = 16, valueDim: Int? = nil
    var keyLengths: [Int]? = nil
    var seed: UInt64 = 0

    var nk: Int { keyLength ?? queryLength }
    var shape: AttentionShape {
        AttentionShape(batch: batch, heads: heads, kvHeads: kvHeads ?? heads, queryLength: queryLength, keyLength: nk,
                       headDim: headDim, valueDim: valueDim ?? headDim)
    }
    var testDescription: String {
        "\(subject.label) [\(choice)]: B\(batch) H\(heads)/\(kvHeads ?? heads) Nq\(queryLength) Nk\(nk) D\(headDim)"
            + " Dv\(valueDim ?? headDim)" + (keyLengths.map { " keyLengths\($0)" } ?? "")
    }

    /// The subject's conformer with the case's modifiers.
    func attention() throws -> any ModifiableAttention & DifferentiableAttention {
        var a = subject.attention as! any ModifiableAttention & DifferentiableAttention
        a.modifiers = try choice.modifiers(shape, seed: seed)
        return a
    }

    func inputs() throws -> (q: Tensor, k: Tensor, v: Tensor, result: AttentionResult, dO: Tensor) {
        let (q, k, v) = try randomQKV(batch: batch, heads: heads, kvHeads: kvHeads, queryLength: queryLength,
                                      keyLength: keyLength, headDim: headDim, valueDim: valueDim, seed: seed)
        let result = try attention().attend(query: q, key: k, value: v, keyLengths: keyLengths, threads: nil)
        let dO = try randomTensor([batch, heads, queryLength, valueDim ?? headDim], seed: seed &* 7 &+ 5)
        return (q, k, v, result, dO)
    }

    func gradients(threads: Int?) throws -> (inputs: AttentionGradients, modifiers: ScoreModifierGradients) {
        let (q, k, v, result, dO) = try inputs()
        return try modifierGradients(try attention(), q, k, v, result, dO, keyLengths: keyLengths, threads: threads)
    }

    func check(sourceLocation: SourceLocation = #_sourceLocation) throws {
        let (q, k, v, result, dO) = try inputs()
        let a = try attention()
        let visible = try subject.visibility(shape, keyLengths)
        let reference = modifiedReference(q, k, v, dO, scale: defaultScale(headDim: headDim), visible: visible,
                                          a.modifiers)
        let naive = naiveModified(q, k, v, dO, scale: 1 / Float(headDim).squareRoot(), visible: visible, a.modifiers)
        // The forward against the same reference first (the backward takes its lse).
        let lseError = zip(result.logSumExp.elements, reference.gradients.lse).map { l, r in
            l == -.infinity && r == -.infinity ? 0 : abs(Double(l) - r)
        }.max() ?? 0
        #expect(lseError < 1e-4, "\(testDescription): forward lse error \(lseError)", sourceLocation: sourceLocation)
        let g = try modifierGradients(a, q, k, v, result, dO, keyLengths: keyLengths, threads: 2)
        checkGradients(g.inputs, reference: reference.gradients, naive: naive.gradients,
                       dims: GradientDims(query: q, value: v), visible: visible, testDescription,
                       sourceLocation: sourceLocation)
        #expect((g.modifiers.bias != nil) == (a.modifiers.bias != nil) && (g.modifiers.sinks != nil) == (a.modifiers.sinks != nil),
                "\(testDescription): parameter gradients present", sourceLocation: sourceLocation)
        if let bias = g.modifiers.bias {
            #expect(bias.shape == a.modifiers.bias!.shape, sourceLocation: sourceLocation)
            checkParameterGradient(bias.elements, reference: reference.bias, naive: naive.bias,
                                   "\(testDescription): ∂bias", sourceLocation: sourceLocation)
            // Pairs no query sees get exactly 0 (summed over the broadcast dimensions).
            let m = ReferenceModifiers<Float>(a.modifiers)
            var seen = [Bool](repeating: false, count: bias.count)
            for b in 0..<batch { for h in 0..<heads { for i in 0..<queryLength { for j in 0..<nk where visible(b, h, i, j) {
                seen[m.biasIndex(b, h, i, j)] = true
            } } } }
            let stray = bias.elements.indices.filter { !seen[$0] && bias.elements[$0] != 0 }
            #expect(stray.isEmpty, "\(testDescription): ∂bias nonzero on hidden pairs \(stray.prefix(4))",
                    sourceLocation: sourceLocation)
        }
        if let sinks = g.modifiers.sinks {
            checkParameterGradient(sinks, reference: reference.sinks, naive: naive.sinks, "\(testDescription): ∂sinks",
                                   sourceLocation: sourceLocation)
        }
    }
}

/// ``ModifiableAttention/modifierGradients(query:key:value:result:outputGradient:keyLengths:threads:)`` on an existential.
func modifierGradients<A: ModifiableAttention & DifferentiableAttention>(
    _ a: A, _ q: Tensor, _ k: Tensor, _ v: Tensor, _ result: AttentionResult, _ dO: Tensor, keyLengths: [Int]?,
    threads: Int?
) throws -> (inputs: AttentionGradients, modifiers: ScoreModifierGradients) {
    try a.modifierGradients(query: q, key: k, value: v, result: result, outputGradient: dO, keyLengths: keyLengths,
                            threads: threads)
}

extension GradientSubject {
    static func dense(causal: Bool) -> GradientSubject {
        GradientSubject(label: "dense" + (causal ? " causal" : ""), attention: DenseAttention(causal: causal)) { s, lengths in
            Visible.dense(causal: causal, queryLength: s.queryLength, keyLength: s.keyLength, keyLengths: lengths)
        }
    }
}

enum ModifierBackwardCases {
    static let modifierChoices: [ModifierChoice] = [
        ModifierChoice(softCap: 0.8), ModifierChoice(alibi: true), ModifierChoice(bias: [2, 4]),
        ModifierChoice(bias: [1, 1], hiddenColumn: 2), ModifierChoice(bias: [1, 4]), ModifierChoice(bias: [2, 1]),
        ModifierChoice(sinks: true), .all,
        ModifierChoice(softCap: 2, alibi: true, bias: [2, 1], hiddenColumn: 5, sinks: true),
    ]

    /// Dense, causal and not, every modifier choice on a shape with everything awkward at
    /// once (N not a tile multiple, H = 4 over Hkv = 2, key padding down to an empty item),
    /// then the combination on the other awkward shapes.
    static let dense: [ModifierBackwardCase] = [false, true].flatMap { causal -> [ModifierBackwardCase] in
        let s = GradientSubject.dense(causal: causal)
        var cases = modifierChoices.map {
            ModifierBackwardCase(subject: s, choice: $0, batch: 2, heads: 4, kvHeads: 2, queryLength: 130,
                                 keyLength: 140, headDim: 16, keyLengths: [140, 0])
        }
        cases += [
            ModifierBackwardCase(subject: s, choice: .all, heads: 2, queryLength: 70, keyLength: 131, headDim: 1),
            ModifierBackwardCase(subject: s, choice: .all, heads: 2, queryLength: 150, keyLength: 37, headDim: 3,
                                 valueDim: 5),
            ModifierBackwardCase(subject: s, choice: .all, heads: 2, kvHeads: 1, queryLength: 129, headDim: 65),
            ModifierBackwardCase(subject: s, choice: modifierChoices[8], batch: 3, heads: 4, kvHeads: 2,
                                 queryLength: 45, keyLength: 300, headDim: 8, keyLengths: [300, 7, 130]),
        ]
        return cases
    }.enumerated().map { n, c in
        var c = c
        c.seed = 40_000 + UInt64(n)
        return c
    }

    /// The other conformers that take modifiers (windows and patterns, grouped heads), each
    /// with the combination and a batch- and head-broadcast bias.
    static let patterns: [ModifierBackwardCase] = GradientSubject.all.enumerated().flatMap { n, s in
        [ModifierBackwardCase(subject: s, choice: .all, batch: 2, heads: 4, kvHeads: 2, queryLength: 77,
                              keyLength: s.allowsLongerQueries ? 90 : 77, headDim: 3,
                              keyLengths: [s.allowsLongerQueries ? 90 : 77, 0], seed: 41_000 + 10 * UInt64(n)),
         ModifierBackwardCase(subject: s, choice: modifierChoices[8], batch: 2, heads: 4, kvHeads: 2,
                              queryLength: 140, headDim: 8, keyLengths: [140, 33], seed: 41_001 + 10 * UInt64(n))]
    }
}

// MARK: - Tests

@Suite("Modifier backward")
struct ModifierBackwardTests {
    /// The Double reference (input gradients, ∂bias, ∂sinks) against central differences of
    /// its own Double forward (`L = Σ dO ∘ O`, step 1e-5): checks the hand derivation.
    @Test("the Double reference agrees with central finite differences")
    func referenceFiniteDifferences() throws {
        for causal in [false, true] {
            let c = ModifierBackwardCase(subject: .dense(causal: causal), choice: ModifierChoice(
                softCap: 0.7, alibi: true, bias: [1, 2], sinks: true), batch: 2, heads: 2, kvHeads: 1,
                queryLength: 3, keyLength: 4, headDim: 2, valueDim: 3, keyLengths: [4, 0], seed: 42_000)
            let (q, k, v, _, dO) = try c.inputs()
            let m = try c.attention().modifiers
            let visible = try c.subject.visibility(c.shape, c.keyLengths)
            let dims = GradientDims(query: q, value: v), scale = defaultScale(headDim: c.headDim)
            var x = (q: q.elements.map(Double.init), k: k.elements.map(Double.init), v: v.elements.map(Double.init),
                     m: ReferenceModifiers<Double>(m))
            let g = dO.elements.map(Double.init)
            func loss() -> Double {
                let r = modifiedReferenceBackward(q: x.q, k: x.k, v: x.v, dO: g, dims: dims, scale: scale,
                                                  visible: visible, modifiers: x.m, exp: { Foundation.exp($0) },
                                                  log: { Foundation.log($0) }, tanh: { Foundation.tanh($0) })
                return zip(r.gradients.output, g).map(*).reduce(0, +)
            }
            let analytic = modifiedReference(q, k, v, dO, scale: scale, visible: visible, m)
            func check(_ name: String, _ count: Int, _ expected: [Double], _ poke: (Int, Double) -> Void) {
                for n in 0..<count {
                    let h = 1e-5
                    poke(n, h)
                    let up = loss()
                    poke(n, -2 * h)
                    let down = loss()
                    poke(n, h)
                    let numeric = (up - down) / (2 * h)
                    #expect(abs(numeric - expected[n]) <= 1e-7 * (1 + abs(numeric)),
                            "causal \(causal) \(name)[\(n)]: finite difference \(numeric), reference \(expected[n])")
                }
            }
            check("dq", x.q.count, analytic.gradients.dq) { x.q[$0] += $1 }
            check("dk", x.k.count, analytic.gradients.dk) { x.k[$0] += $1 }
            check("dv", x.v.count, analytic.gradients.dv) { x.v[$0] += $1 }
            check("dbias", x.m.bias!.count, analytic.bias) { x.m.bias![$0] += $1 }
            check("dsinks", x.m.sinks!.count, analytic.sinks) { x.m.sinks![$0] += $1 }
            #expect(analytic.sinks.allSatisfy { $0 != 0 } && analytic.bias.contains { $0 != 0 })
        }
    }

    @Test("dense: each modifier and their combination against the reference", arguments: ModifierBackwardCases.dense)
    func dense(_ c: ModifierBackwardCase) throws { try c.check() }

    @Test("windows and patterns with modifiers against the reference", arguments: ModifierBackwardCases.patterns)
    func patterns(_ c: ModifierBackwardCase) throws { try c.check() }

    /// Without modifiers, `modifierGradients` is the plain backward, bit for bit; with
    /// modifiers, `gradients` equals `modifierGradients`' input gradients bit for bit.
    @Test("modifierGradients equals gradients")
    func sameInputGradients() throws {
        for choice in [ModifierChoice(), .all] {
            let c = ModifierBackwardCase(subject: .dense(causal: true), choice: choice, batch: 2, heads: 4, kvHeads: 2,
                                         queryLength: 150, keyLength: 170, headDim: 8, seed: 43_000)
            let (q, k, v, result, dO) = try c.inputs()
            let a = try c.attention()
            let plain = try a.gradients(query: q, key: k, value: v, result: result, outputGradient: dO, threads: 3)
            let both = try modifierGradients(a, q, k, v, result, dO, keyLengths: nil, threads: 3)
            expectBitwiseEqualGradients(plain, both.inputs, "\(choice)")
        }
    }

    @Test("bitwise identical for 1, 2, 3 and 7 threads")
    func determinism() throws {
        let cases = [
            // A bias broadcast over batch items and heads: the ordered sums over work items.
            ModifierBackwardCase(subject: .dense(causal: false), choice: .all, batch: 2, heads: 4, kvHeads: 2,
                                 queryLength: 200, keyLength: 390, headDim: 8, keyLengths: [390, 260], seed: 44_000),
            ModifierBackwardCase(subject: .dense(causal: true), choice: ModifierChoice(softCap: 1, bias: [2, 1]),
                                 batch: 2, heads: 4, kvHeads: 1, queryLength: 300, headDim: 4, seed: 44_001),
            ModifierBackwardCase(subject: .strided(StridedAttention(kind: .strided, stride: 7, causal: true)),
                                 choice: .all, batch: 2, heads: 4, kvHeads: 2, queryLength: 300, headDim: 4, seed: 44_002),
            ModifierBackwardCase(subject: .longformer(LongformerAttention(window: 16, globalPositions: [0, 5, 200])),
                                 choice: ModifierChoice(alibi: true, bias: [1, 1]), batch: 2, heads: 4, kvHeads: 2,
                                 queryLength: 260, headDim: 4, seed: 44_003),
        ]
        for c in cases {
            let one = try c.gradients(threads: 1)
            for threads in [2, 3, 7] {
                let other = try c.gradients(threads: threads)
                expectBitwiseEqualGradients(one.inputs, other.inputs, "\(c.testDescription) threads \(threads)")
                #expect(bitwiseEqual(one.modifiers.bias?.elements ?? [], other.modifiers.bias?.elements ?? [])
                            && bitwiseEqual(one.modifiers.sinks ?? [], other.modifiers.sinks ?? []),
                        "\(c.testDescription) threads \(threads): parameter gradients differ")
            }
        }
    }

    @Test("the view entry point equals the Tensor path")
    func views() throws {
        for c in [ModifierBackwardCase(subject: .dense(causal: true), choice: .all, batch: 2, heads: 4, kvHeads: 2,
                                       queryLength: 70, keyLength: 133, headDim: 9, keyLengths: [133, 50], seed: 45_000),
                  ModifierBackwardCase(subject: .local(LocalAttention(left: 20, right: 7)),
                                       choice: ModifierChoice(softCap: 3, alibi: true), batch: 2, heads: 4, kvHeads: 2,
                                       queryLength: 100, headDim: 5, seed: 45_001)] {
            let (q, k, v, result, dO) = try c.inputs()
            try expectViewEntryPointMatchesTensors(try c.attention(), shape: c.shape, query: q, key: k, value: v,
                                                   result: result, outputGradient: dO, keyLengths: c.keyLengths,
                                                   c.testDescription)
        }
    }

    @Test("soft-capping's backward workspace is in the cost")
    func cost() throws {
        let s = AttentionShape(batch: 1, heads: 2, kvHeads: 2, queryLength: 300, keyLength: 300, headDim: 16, valueDim: 16)
        var capped = LocalAttention(left: 20, right: 7), biased = capped
        capped.modifiers.softCap = 5
        biased.modifiers.bias = try Tensor(shape: [1, 1, 300, 300])
        let plain = try LocalAttention(left: 20, right: 7).backwardCost(s, threads: 2).workspaceBytes
        #expect(try capped.backwardCost(s, threads: 2).workspaceBytes > plain)
        #expect(try biased.backwardCost(s, threads: 2).workspaceBytes == plain)
    }

    @Test("bad inputs throw, naming the option")
    func badInputs() throws {
        let c = ModifierBackwardCase(subject: .dense(causal: false), choice: .all, heads: 2, queryLength: 10,
                                     headDim: 4, seed: 46_000)
        let (q, k, v, result, dO) = try c.inputs()
        var dense = DenseAttention()
        dense.modifiers = ScoreModifiers(bias: try Tensor(shape: [1, 2, 10, 9]))
        expectAttentionError(.shapeMismatch, mentioning: ["modifiers.bias"]) {
            try dense.gradients(query: q, key: k, value: v, result: result, outputGradient: dO)
        }
        expectAttentionError(.shapeMismatch, mentioning: ["modifiers.bias"]) {
            try modifierGradients(dense, q, k, v, result, dO, keyLengths: nil, threads: 1)
        }
        dense.modifiers = ScoreModifiers(sinks: [1])
        expectAttentionError(.invalidParameter, mentioning: ["modifiers.sinks"]) {
            try modifierGradients(dense, q, k, v, result, dO, keyLengths: nil, threads: 1)
        }
        dense.modifiers = ScoreModifiers(softCap: -1)
        expectAttentionError(.invalidParameter, mentioning: ["modifiers.softCap"]) {
            try dense.gradients(query: q, key: k, value: v, result: result, outputGradient: dO)
        }
        dense.modifiers = try c.attention().modifiers
        let wide = try AttentionResult(output: try Tensor(shape: [1, 2, 10, 5]), logSumExp: result.logSumExp)
        expectAttentionError(.shapeMismatch, mentioning: ["output"]) {
            try modifierGradients(dense, q, k, v, wide, dO, keyLengths: nil, threads: 1)
        }
        expectAttentionError(.shapeMismatch, mentioning: ["outputGradient"]) {
            try modifierGradients(dense, q, k, v, result, try Tensor(shape: [1, 2, 10, 3]), keyLengths: nil, threads: 1)
        }
        expectAttentionError(.invalidParameter, mentioning: ["keyLengths"]) {
            try modifierGradients(dense, q, k, v, result, dO, keyLengths: [11], threads: 1)
        }
        // A caller's workspace sized without the soft cap's tile is refused.
        let shape = c.shape
        let small = try AttentionWorkspace(byteCount: try DenseAttention().backwardCost(shape, threads: 1).workspaceBytes)
        var dq = try Tensor(shape: q.shape), dk = try Tensor(shape: k.shape), dv = try Tensor(shape: v.shape)
        expectAttentionError(.invalidParameter, mentioning: ["workspace"]) {
            try q.withStridedView { qv in try k.withStridedView { kv in try v.withStridedView { vv in
            try result.output.withStridedView { ov in try result.logSumExp.withStridedView { lv in
            try dO.withStridedView { gv in
            try dq.withMutableStridedView { a in try dk.withMutableStridedView { b in try dv.withMutableStridedView { d in
                try dense.gradients(query: qv, key: kv, value: vv, output: ov, logSumExp: lv, outputGradient: gv,
                                    dQuery: a, dKey: b, dValue: d, keyLengths: nil, workspace: small, threads: 1)
            } } } } } } } } }
        }
        // Adaptive span's parameter gradients check the modifiers too.
        var span = AdaptiveSpanAttention(spans: [4, 4], maxSpan: 8)
        span.modifiers.bias = try Tensor(shape: [2, 2, 10, 10])
        expectAttentionError(.shapeMismatch, mentioning: ["modifiers.bias"]) {
            try span.parameterGradients(query: q, key: k, value: v, result: result, outputGradient: dO)
        }
        expectAttentionError(.shapeMismatch, mentioning: ["modifiers.bias"]) {
            try modifierGradients(span, q, k, v, result, dO, keyLengths: nil, threads: 1)
        }
    }

    /// Adaptive span (probability weights from its soft mask) with every modifier: the input
    /// gradients, ∂bias, ∂sinks and ∂z against the reference with the soft mask as weights.
    @Test("adaptive span with modifiers against the reference")
    func adaptiveSpan() throws {
        let spans: [Float] = [3.5, 20.25, 70, 0.5], ramp: Float = 4
        let shapes = [(nq: 77, nk: 90, d: 3, lengths: [90, 0] as [Int]?), (nq: 140, nk: 140, d: 16, lengths: nil),
                      (nq: 45, nk: 300, d: 65, lengths: nil)]
        for (n, s) in shapes.enumerated() {
            for choice in [ModifierChoice.all, ModifierChoice(softCap: 2, bias: [2, 4], hiddenColumn: 5)] {
                var c = ModifierBackwardCase(subject: .dense(causal: true), choice: choice, batch: 2, heads: 4,
                                             kvHeads: 2, queryLength: s.nq, keyLength: s.nk, headDim: s.d,
                                             keyLengths: s.lengths, seed: 48_000 + UInt64(n))
                var span = AdaptiveSpanAttention(spans: spans, maxSpan: 400, ramp: ramp)
                span.modifiers = try choice.modifiers(c.shape, seed: c.seed)
                c.subject = GradientSubject(label: "adaptive span", attention: span) { shape, lengths in
                    Visible.dense(causal: true, queryLength: shape.queryLength, keyLength: shape.keyLength,
                                  keyLengths: lengths)
                }
                let (q, k, v, result, dO) = try c.inputs()
                let offset = s.nk - s.nq
                func mask(_ h: Int, _ i: Int, _ j: Int) -> (m: Double, dz: Double) {
                    let x = Double(i + offset - j), z = Double(spans[h]), r = Double(ramp)
                    let m = min(max((r + z - x) / r, 0), 1)
                    return (m, m > 0 && m < 1 ? 1 / r : 0)
                }
                let visible = try c.subject.visibility(c.shape, c.keyLengths)
                var dz = [Double](repeating: 0, count: spans.count)
                let dims = GradientDims(query: q, value: v)
                let (qd, kd, vd, gd) = (q.elements.map(Double.init), k.elements.map(Double.init),
                                        v.elements.map(Double.init), dO.elements.map(Double.init))
                let doubleModifiers = ReferenceModifiers<Double>(span.modifiers)
                let floatModifiers = ReferenceModifiers<Float>(span.modifiers)
                let weight: PairTerm<Double> = { _, h, i, j in mask(h, i, j).m }
                let floatWeight: PairTerm<Float> = { _, h, i, j in Float(mask(h, i, j).m) }
                let expD: (Double) -> Double = { Foundation.exp($0) }, logD: (Double) -> Double = { Foundation.log($0) }
                let tanhD: (Double) -> Double = { Foundation.tanh($0) }
                let reference = modifiedReferenceBackward(
                    q: qd, k: kd, v: vd, dO: gd, dims: dims, scale: defaultScale(headDim: s.d), visible: visible,
                    modifiers: doubleModifiers, exp: expD, log: logD, tanh: tanhD, weight: weight,
                    weightGradient: { _, h, i, j, dw in dz[h] += mask(h, i, j).dz * dw })
                let expF: (Float) -> Float = { expf($0) }, logF: (Float) -> Float = { logf($0) }
                let tanhF: (Float) -> Float = { tanhf($0) }
                let naive = modifiedReferenceBackward(
                    q: q.elements, k: k.elements, v: v.elements, dO: dO.elements, dims: dims,
                    scale: 1 / Float(s.d).squareRoot(), visible: visible, modifiers: floatModifiers,
                    exp: expF, log: logF, tanh: tanhF, weight: floatWeight)
                let label = "adaptive span [\(choice)] Nq\(s.nq) Nk\(s.nk) D\(s.d)"
                let g = try modifierGradients(span, q, k, v, result, dO, keyLengths: c.keyLengths, threads: 3)
                checkGradients(g.inputs, reference: reference.gradients, naive: naive.gradients,
                               dims: GradientDims(query: q, value: v), visible: visible, label)
                checkParameterGradient(g.modifiers.bias?.elements ?? [], reference: reference.bias, naive: naive.bias,
                                       "\(label): ∂bias")
                if choice.sinks {
                    checkParameterGradient(g.modifiers.sinks ?? [], reference: reference.sinks, naive: naive.sinks,
                                           "\(label): ∂sinks")
                }
                let (inputs, spanGradients) = try span.parameterGradients(query: q, key: k, value: v, result: result,
                                                                          outputGradient: dO, keyLengths: c.keyLengths,
                                                                          threads: 2)
                expectBitwiseEqualGradients(inputs, g.inputs, "\(label): parameterGradients vs modifierGradients")
                let dzError = zip(spanGradients, dz).map { abs(Double($0) - $1) }.max() ?? 0
                #expect(dzError <= 1e-4 * (1 + (dz.map(abs).max() ?? 0)), "\(label): ∂z \(spanGradients) vs \(dz)")
            }
        }
    }

    /// A few plain gradient-descent steps on `L = ½ ‖O − T‖²` over q, k, v, the bias and the
    /// sinks (the cap and slopes fixed) lower the loss.
    @Test("a gradient step lowers a loss")
    func gradientStep() throws {
        let c = ModifierBackwardCase(subject: .dense(causal: true), choice: ModifierChoice(softCap: 2, alibi: true,
                                     bias: [1, 2], sinks: true), heads: 2, queryLength: 24, headDim: 8, seed: 47_000)
        var (q, k, v, _, _) = try c.inputs()
        var a = try c.attention()
        let target = try randomTensor([1, 2, 24, 8], seed: 47_001)
        func loss(_ o: Tensor) -> Float { zip(o.elements, target.elements).map { ($0 - $1) * ($0 - $1) / 2 }.reduce(0, +) }
        let rate: Float = 0.5
        var losses: [Float] = []
        for _ in 0..<4 {
            let result = try a.attend(query: q, key: k, value: v, threads: 2)
            losses.append(loss(result.output))
            let dO = try Tensor(shape: result.output.shape, data: zip(result.output.elements, target.elements).map(-))
            let g = try modifierGradients(a, q, k, v, result, dO, keyLengths: nil, threads: 2)
            func step(_ x: Tensor, _ dx: Tensor) throws -> Tensor {
                try Tensor(shape: x.shape, data: zip(x.elements, dx.elements).map { $0 - rate * $1 })
            }
            (q, k, v) = (try step(q, g.inputs.dQuery), try step(k, g.inputs.dKey), try step(v, g.inputs.dValue))
            a.modifiers.bias = try step(a.modifiers.bias!, g.modifiers.bias!)
            a.modifiers.sinks = zip(a.modifiers.sinks!, g.modifiers.sinks!).map { $0 - rate * $1 }
        }
        #expect(zip(losses, losses.dropFirst()).allSatisfy { $1 < $0 }, "losses \(losses)")
        #expect(losses.last! < 0.9 * losses.first!, "losses \(losses)")
    }
}
