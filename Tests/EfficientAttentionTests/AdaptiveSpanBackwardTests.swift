// AdaptiveSpanAttention's backward pass: dQ, dK, dV and ∂L/∂z_h against a Double reference
// differentiated by hand (`referenceTermsBackward` with the soft mask as weights; itself
// checked by central finite differences of the Double forward, spans off the ramp's
// kinks), on awkward shapes (N not a tile multiple, several key blocks, spans shorter and
// longer than a tile, D = 1, 3, 65, Nq != Nk, grouped heads, key padding down to a batch
// item with no key); bitwise identical for 1, 2, 3 and 7 threads; the view entry point
// equal to the Tensor convenience; a gradient step on z lowers the loss.

@_spi(Testing) @_spi(Benchmarking) import EfficientAttention
import Foundation
import Testing

/// The soft mask `m(x) = clamp((R + z − x) / R, 0, 1)` and its derivative in `z`
/// (`1/R` strictly inside the ramp, 0 at and past its kinks).
private func softMask(_ x: Double, z: Double, ramp: Double) -> (m: Double, dz: Double) {
    let m = min(max((ramp + z - x) / ramp, 0), 1)
    return (m, m > 0 && m < 1 ? 1 / ramp : 0)
}

/// Outputs and gradients, with `∂L/∂z_h = Σ ∂m/∂z · exp(s − lse) · (dP − D)`.
private func spanReference(q: [Double], k: [Double], v: [Double], dO: [Double], dims n: GradientDims,
                           spans: [Double], ramp: Double, scale: Double, keyLengths: [Int]?)
    -> (base: TermsReference, dz: [Double]) {
    let offset = n.keyLength - n.queryLength
    var dz = [Double](repeating: 0, count: spans.count)
    let base = referenceTermsBackward(
        q: q, k: k, v: v, dO: dO, dims: n, scale: scale,
        visible: { b, _, i, j in j <= i + offset && j < (keyLengths?[b] ?? n.keyLength) },
        term: { _, _, _, _ in 0 },
        weight: { _, h, i, j in softMask(Double(i + offset - j), z: spans[h], ramp: ramp).m },
        pair: { _, h, i, j, _, dw in dz[h] += softMask(Double(i + offset - j), z: spans[h], ramp: ramp).dz * dw })
    return (base, dz)
}

struct SpanBackwardCase: Sendable, CustomTestStringConvertible {
    var batch = 1, heads = 2, kvHeads: Int? = nil
    var queryLength: Int, keyLength: Int? = nil
    var headDim = 8, valueDim: Int? = nil
    var spans: [Float] = [3.5, 20.25], ramp: Float = 4
    var keyLengths: [Int]? = nil
    var seed: UInt64 = 0

    var nk: Int { keyLength ?? queryLength }
    var testDescription: String {
        "B\(batch) H\(heads)/\(kvHeads ?? heads) Nq\(queryLength) Nk\(nk) D\(headDim) Dv\(valueDim ?? headDim) "
            + "z\(spans) R\(ramp)" + (keyLengths.map { " keyLengths\($0)" } ?? "")
    }

    var shape: AttentionShape {
        AttentionShape(batch: batch, heads: heads, kvHeads: kvHeads ?? heads, queryLength: queryLength,
                       keyLength: nk, headDim: headDim, valueDim: valueDim ?? headDim)
    }

    func attention() -> AdaptiveSpanAttention {
        AdaptiveSpanAttention(spans: spans, maxSpan: 400, ramp: ramp)
    }

    func inputs() throws -> (q: Tensor, k: Tensor, v: Tensor, result: AttentionResult, dO: Tensor) {
        let (q, k, v) = try randomQKV(batch: batch, heads: heads, kvHeads: kvHeads, queryLength: queryLength,
                                      keyLength: nk, headDim: headDim, valueDim: valueDim, seed: seed)
        let result = try attention().attend(query: q, key: k, value: v, keyLengths: keyLengths, threads: nil)
        let dO = try randomTensor([batch, heads, queryLength, valueDim ?? headDim], seed: seed &* 7 &+ 5)
        return (q, k, v, result, dO)
    }

    func check(sourceLocation: SourceLocation = #_sourceLocation) throws {
        let attention = attention()
        let (q, k, v, result, dO) = try inputs()
        let (g, dz) = try attention.parameterGradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                                       keyLengths: keyLengths, threads: 3)
        let plain = try attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                            keyLengths: keyLengths, threads: 2)
        expectBitwiseEqualGradients(g, plain, "\(testDescription): parameterGradients' inputs vs gradients",
                                    sourceLocation: sourceLocation)
        let reference = spanReference(
            q: q.elements.map(Double.init), k: k.elements.map(Double.init), v: v.elements.map(Double.init),
            dO: dO.elements.map(Double.init), dims: GradientDims(query: q, value: v),
            spans: spans.map(Double.init), ramp: Double(ramp), scale: 1 / Double(headDim).squareRoot(),
            keyLengths: keyLengths)
        expectMatchesReference([("output", result.output.elements, reference.base.output),
                                ("dQuery", g.dQuery.elements, reference.base.dq),
                                ("dKey", g.dKey.elements, reference.base.dk),
                                ("dValue", g.dValue.elements, reference.base.dv), ("∂z", dz, reference.dz)],
                               testDescription, sourceLocation: sourceLocation)
    }
}

enum SpanBackwardCases {
    static let all: [SpanBackwardCase] = [
        SpanBackwardCase(queryLength: 1, seed: 1),
        SpanBackwardCase(heads: 4, kvHeads: 2, queryLength: 150, keyLength: 231, spans: [0, 2.5, 70.75, 130.5],
                         ramp: 32, seed: 2),
        SpanBackwardCase(queryLength: 300, headDim: 1, valueDim: 3, spans: [5.5, 200.5], ramp: 9.5, seed: 3),
        SpanBackwardCase(queryLength: 70, keyLength: 201, headDim: 3, valueDim: 1, seed: 4),
        SpanBackwardCase(queryLength: 65, keyLength: 129, headDim: 65, valueDim: 17, spans: [64.5, 1.25], seed: 5),
        SpanBackwardCase(batch: 3, heads: 4, kvHeads: 2, queryLength: 90, keyLength: 140, headDim: 5, valueDim: 7,
                         spans: [1.5, 7.5, 33.5, 100.5], keyLengths: [140, 0, 37], seed: 6),
    ]
}

@Suite("Adaptive span backward")
struct AdaptiveSpanBackwardTests {
    @Test("matches the Double reference (dQ, dK, dV, ∂z)", arguments: SpanBackwardCases.all)
    func reference(_ c: SpanBackwardCase) throws { try c.check() }

    @Test("the Double reference agrees with central finite differences of the Double forward")
    func finiteDifferences() throws {
        let (nq, nk, d) = (5, 7, 3)
        let dims = GradientDims(query: try Tensor(shape: [2, 2, nq, d]), value: try Tensor(shape: [2, 1, nk, 2]))
        var rng = SeededGenerator(seed: 920)
        func random(_ count: Int) -> [Double] { (0..<count).map { _ in Double(rng.nextFloat(in: -1...1)) } }
        let q = random(2 * 2 * nq * d), k = random(2 * nk * d), v = random(2 * nk * 2), dO = random(2 * 2 * nq * 2)
        let spans = [0.3, 1.6], keyLengths = [7, 5]
        func run(_ x: [[Double]]) -> (base: TermsReference, dz: [Double]) {
            spanReference(q: x[0], k: x[1], v: x[2], dO: dO, dims: dims, spans: x[3], ramp: 2.5, scale: 0.7,
                          keyLengths: keyLengths)
        }
        let inputs = [q, k, v, spans]
        let analytic = run(inputs)
        let grads = [analytic.base.dq, analytic.base.dk, analytic.base.dv, analytic.dz]
        #expect(analytic.dz.allSatisfy { $0 != 0 }, "the ramp is reached")
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
                        "input \(which)[\(index)]: analytic \(grads[which][index]), numeric \(numeric)")
            }
        }
    }

    @Test("bitwise identical gradients for 1, 2, 3 and 7 threads")
    func threadInvariance() throws {
        let c = SpanBackwardCase(batch: 2, heads: 4, kvHeads: 2, queryLength: 300, keyLength: 420, headDim: 16,
                                 spans: [3.5, 60.5, 150.25, 250.75], ramp: 32, keyLengths: [420, 333], seed: 3000)
        let attention = c.attention()
        let (q, k, v, result, dO) = try c.inputs()
        let runs = try [1, 2, 3, 7].map {
            try attention.parameterGradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                             keyLengths: c.keyLengths, threads: $0)
        }
        for (n, g) in runs.enumerated().dropFirst() {
            expectBitwiseEqualGradients(runs[0].inputs, g.inputs, "run \(n)")
            #expect(bitwiseEqual(runs[0].spans, g.spans), "run \(n): ∂z differs")
        }
    }

    @Test("the view entry point (strided NaN-padded views, a caller's workspace) equals the Tensor convenience")
    func viewEntryPoint() throws {
        let c = SpanBackwardCase(batch: 2, heads: 4, kvHeads: 2, queryLength: 150, keyLength: 170, headDim: 12,
                                 valueDim: 6, spans: [2.5, 9.5, 40.5, 80.5], keyLengths: [170, 61], seed: 4000)
        let attention = c.attention()
        let (q, k, v, result, dO) = try c.inputs()
        let expected = try attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                               keyLengths: c.keyLengths, threads: 2)
        let views = try viewPathGradients(attention, shape: c.shape, q: q, k: k, v: v, result: result, dO: dO,
                                          keyLengths: c.keyLengths)
        expectBitwiseEqualGradients(expected, views, c.testDescription)
    }

    @Test("a gradient step on the spans lowers L = Σ dO ∘ O")
    func gradientStep() throws {
        let c = SpanBackwardCase(heads: 2, queryLength: 60, headDim: 8, spans: [4.5, 10.5], ramp: 8, seed: 5000)
        var attention = c.attention()
        let (q, k, v, result, dO) = try c.inputs()
        let dz = try attention.parameterGradients(query: q, key: k, value: v, result: result, outputGradient: dO).spans
        func loss(_ a: AdaptiveSpanAttention) throws -> Float {
            let o = try a.attend(query: q, key: k, value: v).output.elements
            return zip(o, dO.elements).reduce(0) { $0 + $1.0 * $1.1 }
        }
        let before = try loss(attention), rate: Float = 0.5
        attention.spans = zip(attention.spans, dz).map { $0 - rate * $1 }
        let after = try loss(attention)
        #expect(dz.allSatisfy { $0 != 0 } && after < before, "loss \(before) → \(after), ∂z \(dz)")
    }

    @Test("misshapen output, logSumExp or outputGradient, bad score modifiers and a short workspace throw")
    func badInputs() throws {
        let c = SpanBackwardCase(queryLength: 9, headDim: 4, seed: 11)
        let attention = c.attention()
        let (q, k, v, result, dO) = try c.inputs()
        try expectBadGradientInputsThrow(attention, shape: c.shape, q: q, k: k, v: v, result: result, dO: dO)
        // Modifiers have a backward (ModifierBackwardTests); bad ones are named as in the forward.
        var capped = attention
        capped.modifiers = ScoreModifiers(softCap: -30)
        expectAttentionError(.invalidParameter, mentioning: ["modifiers.softCap"]) {
            try capped.parameterGradients(query: q, key: k, value: v, result: result, outputGradient: dO)
        }
    }
}
