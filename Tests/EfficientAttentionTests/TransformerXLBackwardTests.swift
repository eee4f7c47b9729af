// TransformerXLAttention's backward pass: dQ, dK, dV (memory rows included) and ∂L/∂r,
// ∂L/∂u, ∂L/∂v against a Double reference differentiated by hand (itself checked by
// central finite differences of the Double forward), on awkward shapes (Nq and Nk not
// tile multiples, several key blocks, D = 1, 3, 65, grouped heads, a shared table, key
// padding down to a batch item with no key); bitwise identical for 1, 2, 3 and 7 threads;
// the view entry point equal to the Tensor convenience; a gradient step lowers the loss.
// `referenceTermsBackward` is shared with the adaptive span tests.

@_spi(Testing) @_spi(Benchmarking) import EfficientAttention
import Foundation
import Testing

/// Output, log-sum-exp and the gradients of `L = Σ dO ∘ O` of a softmax whose scores and
/// weights come from callbacks, in Double.
struct TermsReference {
    var output: [Double], lse: [Double], dq: [Double], dk: [Double], dv: [Double]
}

/// Softmax attention with additive score terms and probability weights, and its
/// hand-written derivative: for each row with visible keys `J`,
/// `s_j = scale · q·k_j + term(j)`, `e_j = w_j exp(s_j)`, `P = e / Σ e`,
/// `lse = log Σ e`; `dP_j = dO·v_j`, `D = Σ P dP`, `ds_j = P_j (dP_j − D) = ∂L/∂s_j`,
/// `dq += scale ds_j k_j`, `dk_j += scale ds_j q`, `dv_j += P_j dO`; `pair` gets `ds_j` and
/// `∂L/∂w_j = exp(s_j − lse)(dP_j − D)` for the caller's own parameters.
func referenceTermsBackward(q: [Double], k: [Double], v: [Double], dO: [Double], dims n: GradientDims,
                            scale: Double, visible: (Int, Int, Int, Int) -> Bool,
                            term: (Int, Int, Int, Int) -> Double, weight: (Int, Int, Int, Int) -> Double,
                            pair: (_ b: Int, _ h: Int, _ i: Int, _ j: Int, _ ds: Double, _ dw: Double) -> Void)
    -> TermsReference {
    let (d, dv, group) = (n.headDim, n.valueDim, n.heads / n.kvHeads)
    var r = TermsReference(output: .init(repeating: 0, count: n.batch * n.heads * n.queryLength * dv),
                           lse: .init(repeating: -.infinity, count: n.batch * n.heads * n.queryLength),
                           dq: .init(repeating: 0, count: q.count), dk: .init(repeating: 0, count: k.count),
                           dv: .init(repeating: 0, count: v.count))
    for b in 0..<n.batch { for h in 0..<n.heads { for i in 0..<n.queryLength {
        let hk = h / group, row = n.queryIndex(b, h, i)
        let keys = (0..<n.keyLength).filter { visible(b, h, i, $0) }
        let scores = keys.map { j -> Double in
            let kj = n.keyIndex(b, hk, j)
            var dot = 0.0
            for c in 0..<d { dot += q[row * d + c] * k[kj * d + c] }
            return scale * dot + term(b, h, i, j)
        }
        guard let m = scores.max() else { continue }
        let e = zip(keys, scores).map { weight(b, h, i, $0) * exp($1 - m) }
        let sum = e.reduce(0, +)
        guard sum > 0 else { continue }
        let p = e.map { $0 / sum }
        r.lse[row] = m + log(sum)
        let dp = keys.map { j -> Double in
            let kj = n.keyIndex(b, hk, j)
            var dot = 0.0
            for c in 0..<dv { dot += dO[row * dv + c] * v[kj * dv + c] }
            return dot
        }
        for (t, j) in keys.enumerated() {
            let kj = n.keyIndex(b, hk, j)
            for c in 0..<dv { r.output[row * dv + c] += p[t] * v[kj * dv + c] }
        }
        var rowDot = 0.0
        for t in keys.indices { rowDot += p[t] * dp[t] }
        for (t, j) in keys.enumerated() {
            let ds = p[t] * (dp[t] - rowDot), kj = n.keyIndex(b, hk, j)
            for c in 0..<d {
                r.dq[row * d + c] += scale * ds * k[kj * d + c]
                r.dk[kj * d + c] += scale * ds * q[row * d + c]
            }
            for c in 0..<dv { r.dv[kj * dv + c] += p[t] * dO[row * dv + c] }
            pair(b, h, i, j, ds, exp(scores[t] - r.lse[row]) * (dp[t] - rowDot))
        }
    } } }
    return r
}

/// `L = Σ dO ∘ O`.
func referenceLoss(_ output: [Double], _ dO: [Double]) -> Double { zip(output, dO).reduce(0) { $0 + $1.0 * $1.1 } }

/// The largest |x − y| and the largest |y|.
func maxErrorAndMagnitude(_ x: [Float], _ y: [Double]) -> (Double, Double) {
    zip(x, y).reduce((0.0, 0.0)) { (max($0.0, abs(Double($1.0) - $1.1)), max($0.1, abs($1.1))) }
}

/// Each named result (name, values, reference) has the reference's count, no NaN, and every element within
/// `1e-4 · max |reference| + 1e-6` of it.
func expectMatchesReference(_ results: [(String, [Float], [Double])], _ description: String,
                            sourceLocation: SourceLocation = #_sourceLocation) {
    for (name, values, ref) in results {
        #expect(values.count == ref.count && !values.contains { $0.isNaN }, "\(description): \(name)",
                sourceLocation: sourceLocation)
        let (error, magnitude) = maxErrorAndMagnitude(values, ref)
        #expect(error <= 1e-4 * magnitude + 1e-6, "\(description): \(name) error \(error), max |ref| \(magnitude)",
                sourceLocation: sourceLocation)
    }
}

/// Misshapen `output`, `logSumExp` or `outputGradient` throw naming it, and a workspace one
/// byte short of the backward cost throws naming the workspace.
func expectBadGradientInputsThrow(_ attention: some DifferentiableAttention, shape: AttentionShape, q: Tensor,
                                  k: Tensor, v: Tensor, result: AttentionResult, dO: Tensor) throws {
    var wrongShape = result.output.shape
    wrongShape[2] -= 1
    let wrong = try Tensor(shape: wrongShape)
    for (name, o, l, g) in [("output", wrong, result.logSumExp, dO), ("logSumExp", result.output, wrong, dO),
                            ("outputGradient", result.output, result.logSumExp, wrong)] {
        expectAttentionError(.shapeMismatch, mentioning: [name]) {
            try attention.gradients(query: q, key: k, value: v, output: o, logSumExp: l, outputGradient: g,
                                    keyLengths: nil, threads: nil)
        }
    }
    expectAttentionError(.invalidParameter, mentioning: ["workspace"]) {
        try viewPathGradients(attention, shape: shape, q: q, k: k, v: v, result: result, dO: dO, keyLengths: nil,
                               workspaceShort: true)
    }
}

/// Transformer-XL's parameters in Double and the gradients of `L` with respect to them.
private struct XLParameters {
    var table: [Double], tableHeads: Int, rows: Int, u: [Double], v: [Double]
}

private struct XLReference {
    var base: TermsReference
    var dr: [Double], du: [Double], dvb: [Double]
}

/// The spec's relative scores differentiated by hand (`Δ = i + M − j`, visible iff `Δ ≥ 0`
/// and `j < keyLengths[b]`): on top of the content part,
/// `dq_i += scale ds r_Δ`, `dk_j += scale ds u_h`, `∂r_Δ += scale ds (q_i + v_h)`,
/// `∂u_h += scale ds k_j`, `∂v_h += scale ds r_Δ`.
private func xlReference(q: [Double], k: [Double], v: [Double], dO: [Double], dims n: GradientDims,
                         p: XLParameters, scale: Double, keyLengths: [Int]?) -> XLReference {
    let (d, group, memory) = (n.headDim, n.heads / n.kvHeads, n.keyLength - n.queryLength)
    func rBase(_ h: Int, _ delta: Int) -> Int { ((p.tableHeads == 1 ? 0 : h) * p.rows + delta) * d }
    var extraQ = [Double](repeating: 0, count: q.count), extraK = [Double](repeating: 0, count: k.count)
    var dr = [Double](repeating: 0, count: p.table.count)
    var du = [Double](repeating: 0, count: p.u.count), dvb = [Double](repeating: 0, count: p.v.count)
    let base = referenceTermsBackward(
        q: q, k: k, v: v, dO: dO, dims: n, scale: scale,
        visible: { b, _, i, j in i + memory - j >= 0 && j < (keyLengths?[b] ?? n.keyLength) },
        term: { b, h, i, j in
            let (qi, kj, rr) = (n.queryIndex(b, h, i) * d, n.keyIndex(b, h / group, j) * d, rBase(h, i + memory - j))
            var sum = 0.0
            for c in 0..<d { sum += q[qi + c] * p.table[rr + c] + p.u[h * d + c] * k[kj + c] + p.v[h * d + c] * p.table[rr + c] }
            return scale * sum
        },
        weight: { _, _, _, _ in 1 },
        pair: { b, h, i, j, ds, _ in
            let (qi, kj, rr) = (n.queryIndex(b, h, i) * d, n.keyIndex(b, h / group, j) * d, rBase(h, i + memory - j))
            let g = scale * ds
            for c in 0..<d {
                extraQ[qi + c] += g * p.table[rr + c]
                extraK[kj + c] += g * p.u[h * d + c]
                dr[rr + c] += g * (q[qi + c] + p.v[h * d + c])
                du[h * d + c] += g * k[kj + c]
                dvb[h * d + c] += g * p.table[rr + c]
            }
        })
    var result = XLReference(base: base, dr: dr, du: du, dvb: dvb)
    for x in extraQ.indices { result.base.dq[x] += extraQ[x] }
    for x in extraK.indices { result.base.dk[x] += extraK[x] }
    return result
}

struct XLBackwardCase: Sendable, CustomTestStringConvertible {
    var batch = 1, heads = 2, kvHeads: Int? = nil
    var queryLength: Int, memory = 0
    var headDim = 8, valueDim: Int? = nil
    var sharedTable = false
    var keyLengths: [Int]? = nil
    var seed: UInt64 = 0

    var nk: Int { queryLength + memory }
    var testDescription: String {
        "B\(batch) H\(heads)/\(kvHeads ?? heads) Nq\(queryLength) M\(memory) D\(headDim) Dv\(valueDim ?? headDim)"
            + (sharedTable ? " shared table" : "") + (keyLengths.map { " keyLengths\($0)" } ?? "")
    }

    var shape: AttentionShape {
        AttentionShape(batch: batch, heads: heads, kvHeads: kvHeads ?? heads, queryLength: queryLength,
                       keyLength: nk, headDim: headDim, valueDim: valueDim ?? headDim)
    }

    func attention() throws -> TransformerXLAttention {
        let rows = nk + 3, tableHeads = sharedTable ? 1 : heads
        var rng = SeededGenerator(seed: seed &+ 99)
        func random(_ count: Int) -> [Float] { (0..<count).map { _ in rng.nextFloat(in: -0.5...0.5) } }
        return TransformerXLAttention(
            memoryLength: memory + 2,
            relativePositions: try Tensor(shape: [1, tableHeads, rows, headDim], data: random(tableHeads * rows * headDim)),
            contentBias: random(heads * headDim), positionBias: random(heads * headDim))
    }

    func inputs() throws -> (q: Tensor, k: Tensor, v: Tensor, result: AttentionResult, dO: Tensor) {
        let (q, k, v) = try randomQKV(batch: batch, heads: heads, kvHeads: kvHeads, queryLength: queryLength,
                                      keyLength: nk, headDim: headDim, valueDim: valueDim, seed: seed)
        let result = try attention().attend(query: q, key: k, value: v, keyLengths: keyLengths, threads: nil)
        let dO = try randomTensor([batch, heads, queryLength, valueDim ?? headDim], seed: seed &* 7 &+ 5)
        return (q, k, v, result, dO)
    }

    fileprivate static func parameters(_ a: TransformerXLAttention) -> XLParameters {
        XLParameters(table: a.relativePositions.elements.map(Double.init), tableHeads: a.relativePositions.shape[1],
                     rows: a.relativePositions.shape[2], u: a.contentBias.map(Double.init),
                     v: a.positionBias.map(Double.init))
    }

    func check(sourceLocation: SourceLocation = #_sourceLocation) throws {
        let attention = try attention()
        let (q, k, v, result, dO) = try inputs()
        let (g, p) = try attention.parameterGradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                                      keyLengths: keyLengths, threads: 3)
        let plain = try attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                            keyLengths: keyLengths, threads: 2)
        expectBitwiseEqualGradients(g, plain, "\(testDescription): parameterGradients' inputs vs gradients",
                                    sourceLocation: sourceLocation)
        let reference = xlReference(
            q: q.elements.map(Double.init), k: k.elements.map(Double.init), v: v.elements.map(Double.init),
            dO: dO.elements.map(Double.init), dims: GradientDims(query: q, value: v),
            p: Self.parameters(attention), scale: 1 / Double(headDim).squareRoot(), keyLengths: keyLengths)
        let pairs = [("output", result.output.elements, reference.base.output),
                     ("dQuery", g.dQuery.elements, reference.base.dq), ("dKey", g.dKey.elements, reference.base.dk),
                     ("dValue", g.dValue.elements, reference.base.dv), ("∂r", p.relativePositions, reference.dr),
                     ("∂u", p.contentBias, reference.du), ("∂v", p.positionBias, reference.dvb)]
        expectMatchesReference(pairs, testDescription, sourceLocation: sourceLocation)
    }
}

enum XLBackwardCases {
    static let all: [XLBackwardCase] = [
        XLBackwardCase(queryLength: 1, seed: 1),
        XLBackwardCase(heads: 4, kvHeads: 2, queryLength: 150, memory: 70, seed: 2),
        XLBackwardCase(queryLength: 300, headDim: 1, valueDim: 3, seed: 3),
        XLBackwardCase(queryLength: 70, memory: 131, headDim: 3, valueDim: 1, sharedTable: true, seed: 4),
        XLBackwardCase(queryLength: 65, memory: 64, headDim: 65, valueDim: 17, seed: 5),
        XLBackwardCase(batch: 3, heads: 4, kvHeads: 2, queryLength: 90, memory: 50, headDim: 5, valueDim: 7,
                       sharedTable: true, keyLengths: [140, 0, 37], seed: 6),
        XLBackwardCase(batch: 2, heads: 4, kvHeads: 1, queryLength: 200, memory: 9, headDim: 16,
                       keyLengths: [209, 150], seed: 7),
    ]
}

@Suite("Transformer-XL backward")
struct TransformerXLBackwardTests {
    @Test("matches the Double reference (dQ, dK, dV, ∂r, ∂u, ∂v)", arguments: XLBackwardCases.all)
    func reference(_ c: XLBackwardCase) throws { try c.check() }

    @Test("the Double reference agrees with central finite differences of the Double forward",
          arguments: [false, true])
    func finiteDifferences(_ shared: Bool) throws {
        let (nq, memory, d) = (3, 2, 3)
        let dims = GradientDims(query: try Tensor(shape: [2, 2, nq, d]), value: try Tensor(shape: [2, 1, nq + memory, 2]))
        var rng = SeededGenerator(seed: shared ? 910 : 911)
        func random(_ count: Int) -> [Double] { (0..<count).map { _ in Double(rng.nextFloat(in: -1...1)) } }
        let q = random(2 * 2 * nq * d), k = random(2 * (nq + memory) * d), v = random(2 * (nq + memory) * 2)
        let dO = random(2 * 2 * nq * 2)
        let tableHeads = shared ? 1 : 2, rows = nq + memory
        let p = XLParameters(table: random(tableHeads * rows * d), tableHeads: tableHeads, rows: rows,
                             u: random(2 * d), v: random(2 * d))
        let keyLengths = [5, 3]
        func run(_ x: [[Double]]) -> XLReference {
            xlReference(q: x[0], k: x[1], v: x[2], dO: dO, dims: dims,
                        p: XLParameters(table: x[3], tableHeads: tableHeads, rows: rows, u: x[4], v: x[5]),
                        scale: 0.7, keyLengths: keyLengths)
        }
        let inputs = [q, k, v, p.table, p.u, p.v]
        let analytic = run(inputs)
        let grads = [analytic.base.dq, analytic.base.dk, analytic.base.dv, analytic.dr, analytic.du, analytic.dvb]
        let h = 1e-6
        for which in inputs.indices {
            for index in inputs[which].indices {
                func eval(_ delta: Double) -> Double {
                    var x = inputs
                    x[which][index] += delta
                    return referenceLoss(run(x).base.output, dO)
                }
                let numeric = (eval(h) - eval(-h)) / (2 * h)
                #expect(abs(numeric - grads[which][index]) <= 1e-6 * (1 + abs(numeric)),
                        "shared \(shared) input \(which)[\(index)]: analytic \(grads[which][index]), numeric \(numeric)")
            }
        }
    }

    @Test("bitwise identical gradients for 1, 2, 3 and 7 threads", arguments: [false, true])
    func threadInvariance(_ shared: Bool) throws {
        let c = XLBackwardCase(batch: 2, heads: 4, kvHeads: 2, queryLength: 260, memory: 140, headDim: 16,
                               sharedTable: shared, keyLengths: [400, 333], seed: 3000)
        let attention = try c.attention()
        let (q, k, v, result, dO) = try c.inputs()
        let runs = try [1, 2, 3, 7].map {
            try attention.parameterGradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                             keyLengths: c.keyLengths, threads: $0)
        }
        for (n, g) in runs.enumerated().dropFirst() {
            expectBitwiseEqualGradients(runs[0].inputs, g.inputs, "run \(n)")
            #expect(runs[0].parameters == g.parameters, "run \(n): parameter gradients differ")
        }
    }

    @Test("the view entry point (strided NaN-padded views, a caller's workspace) equals the Tensor convenience")
    func viewEntryPoint() throws {
        let c = XLBackwardCase(batch: 2, heads: 4, kvHeads: 2, queryLength: 150, memory: 20, headDim: 12,
                               valueDim: 6, keyLengths: [170, 61], seed: 4000)
        let attention = try c.attention()
        let (q, k, v, result, dO) = try c.inputs()
        let expected = try attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                               keyLengths: c.keyLengths, threads: 2)
        let views = try viewPathGradients(attention, shape: c.shape, q: q, k: k, v: v, result: result, dO: dO,
                                          keyLengths: c.keyLengths)
        expectBitwiseEqualGradients(expected, views, c.testDescription)
    }

    @Test("a gradient step on u, v and the table lowers L = Σ dO ∘ O")
    func gradientStep() throws {
        let c = XLBackwardCase(heads: 2, queryLength: 40, memory: 10, headDim: 8, seed: 5000)
        var attention = try c.attention()
        let (q, k, v, result, dO) = try c.inputs()
        let p = try attention.parameterGradients(query: q, key: k, value: v, result: result, outputGradient: dO).parameters
        func loss(_ a: TransformerXLAttention) throws -> Float {
            let o = try a.attend(query: q, key: k, value: v).output.elements
            return zip(o, dO.elements).reduce(0) { $0 + $1.0 * $1.1 }
        }
        let before = try loss(attention), rate: Float = 0.05
        attention.contentBias = zip(attention.contentBias, p.contentBias).map { $0 - rate * $1 }
        attention.positionBias = zip(attention.positionBias, p.positionBias).map { $0 - rate * $1 }
        attention.relativePositions = try Tensor(shape: attention.relativePositions.shape,
            data: zip(attention.relativePositions.elements, p.relativePositions).map { $0 - rate * $1 })
        let squared = (p.contentBias + p.positionBias + p.relativePositions).reduce(0) { $0 + $1 * $1 }
        let after = try loss(attention)
        // First order: L drops by about rate · |∇|² (> 0).
        #expect(squared > 0 && after < before, "loss \(before) → \(after), rate · |∇|² = \(rate * squared)")
    }

    @Test("misshapen output, logSumExp or outputGradient, a memory too long and a short workspace throw")
    func badInputs() throws {
        let c = XLBackwardCase(queryLength: 9, memory: 2, headDim: 4, seed: 11)
        let attention = try c.attention()
        let (q, k, v, result, dO) = try c.inputs()
        try expectBadGradientInputsThrow(attention, shape: c.shape, q: q, k: k, v: v, result: result, dO: dO)
        var short = attention
        short.memoryLength = 1
        expectAttentionError(.shapeMismatch, mentioning: ["memory"]) {
            try short.gradients(query: q, key: k, value: v, result: result, outputGradient: dO)
        }
    }
}
