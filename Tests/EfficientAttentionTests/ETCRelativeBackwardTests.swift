// ETCAttention's backward with a relative table (Shaw et al.'s clipped terms on long → long
// pairs): dQ, dK, dV and ∂a against a Double reference of the forward differentiated by hand
// (itself checked by central finite differences of its own forward, table included), on
// awkward shapes (N_l not a multiple of the tiles, D = 1, 3, 65, radius above and below κ,
// κ = 0, per-head and shared tables, H = 4 over Hkv = 2, key padding, segments, causal and
// not); 1, 2, 3 and 7 threads bitwise; views equal Tensors; the two-input API; a gradient
// step on the inputs and the table; errors.

@_spi(Testing) @_spi(Benchmarking) import EfficientAttention
import Foundation
import Testing

/// One ETC configuration with a relative table, and its inputs.
struct ETCRelativeCase: CustomTestStringConvertible, Sendable {
    var globals: Int, radius: Int, kappa: Int, sharedTable = false, segmentSize = 0, causal: Bool
    var batch = 1, heads = 4, kvHeads = 2, length: Int, headDim = 8, valueDim = 6
    var keyLengths: [Int]? = nil
    var seed: UInt64

    var testDescription: String {
        "G\(globals) r\(radius) κ\(kappa)\(sharedTable ? " shared" : "")\(segmentSize > 0 ? " seg\(segmentSize)" : "")"
            + "\(causal ? " causal" : "") B\(batch) H\(heads)/\(kvHeads) N\(length) D\(headDim) Dv\(valueDim)"
            + (keyLengths.map { " lengths \($0)" } ?? "")
    }

    func attention() throws -> ETCAttention {
        let rows = 2 * kappa + 1
        let table = try randomTensor([1, sharedTable ? 1 : heads, rows, headDim], seed: seed &+ 7, in: -0.7...0.7)
        let segments = segmentSize > 0 ? etcSegments(globals: globals, longs: length - globals, size: segmentSize) : nil
        return ETCAttention(globals: globals, radius: radius, relativePositions: table, segments: segments,
                            causal: causal)
    }

    func inputs() throws -> (q: Tensor, k: Tensor, v: Tensor, dO: Tensor) {
        let (q, k, v) = try randomQKV(batch: batch, heads: heads, kvHeads: kvHeads, queryLength: length,
                                      headDim: headDim, valueDim: valueDim, seed: seed)
        return (q, k, v, try randomTensor([batch, heads, length, valueDim], seed: seed &+ 11))
    }
}

/// The Double reference: ETC's forward with the table and its gradients by hand.
struct ETCRelativeReference {
    var loss = 0.0   // Σ dO ∘ O
    var dq: [Double], dk: [Double], dv: [Double], da: [Double]
}

func etcRelativeReference(_ attention: ETCAttention, shape s: AttentionShape, keyLengths: [Int]?,
                          q: [Double], k: [Double], v: [Double], a: [Double], dO: [Double]) throws -> ETCRelativeReference {
    let pattern = try attention.pattern(for: s)
    let (n, d, dv, g) = (s.queryLength, s.headDim, s.valueDim, attention.globals)
    let kappa = attention.maxDistance, rows = 2 * kappa + 1, tableHeads = a.count / (rows * d)
    let scale = 1 / Double(d).squareRoot()
    var r = ETCRelativeReference(dq: .init(repeating: 0, count: q.count), dk: .init(repeating: 0, count: k.count),
                                 dv: .init(repeating: 0, count: v.count), da: .init(repeating: 0, count: a.count))
    for b in 0..<s.batch { for h in 0..<s.heads {
        let hk = h / s.groupSize, th = tableHeads == 1 ? 0 : h, end = keyLengths?[b] ?? n
        for p in 0..<n {
            let qi = ((b * s.heads + h) * n + p) * d
            let keys = (0..<end).filter { pattern.isVisible(head: h, query: p, key: $0) }
            if keys.isEmpty { continue }
            func row(_ j: Int) -> Int? { p >= g && j >= g ? th * rows + min(max(j - p, -kappa), kappa) + kappa : nil }
            var scores = [Double]()
            for j in keys {
                let kj = ((b * s.kvHeads + hk) * n + j) * d
                var x = 0.0
                for c in 0..<d { x += q[qi + c] * (k[kj + c] + (row(j).map { a[$0 * d + c] } ?? 0)) }
                scores.append(scale * x)
            }
            let m = scores.max()!, z = scores.reduce(0) { $0 + exp($1 - m) }
            let probabilities = scores.map { exp($0 - m) / z }
            let oi = ((b * s.heads + h) * n + p) * dv
            var o = [Double](repeating: 0, count: dv)
            for (t, j) in keys.enumerated() {
                let vj = ((b * s.kvHeads + hk) * n + j) * dv
                for c in 0..<dv { o[c] += probabilities[t] * v[vj + c] }
            }
            var rowSum = 0.0
            for c in 0..<dv { rowSum += dO[oi + c] * o[c]; r.loss += dO[oi + c] * o[c] }
            for (t, j) in keys.enumerated() {
                let kj = ((b * s.kvHeads + hk) * n + j) * d, vj = ((b * s.kvHeads + hk) * n + j) * dv
                var dp = 0.0
                for c in 0..<dv { dp += dO[oi + c] * v[vj + c]; r.dv[vj + c] += probabilities[t] * dO[oi + c] }
                let ds = scale * probabilities[t] * (dp - rowSum)
                for c in 0..<d {
                    r.dq[qi + c] += ds * (k[kj + c] + (row(j).map { a[$0 * d + c] } ?? 0))
                    r.dk[kj + c] += ds * q[qi + c]
                    if let t = row(j) { r.da[t * d + c] += ds * q[qi + c] }
                }
            }
        }
    } }
    return r
}

private func doubles(_ t: Tensor) -> [Double] { t.elements.map(Double.init) }

enum ETCRelativeCases {
    static let all: [ETCRelativeCase] = [false, true].flatMap { causal in
        let base: UInt64 = causal ? 88_100 : 88_000
        return [
            ETCRelativeCase(globals: 3, radius: 4, kappa: 2, causal: causal, length: 77, headDim: 16, seed: base),
            // Radius below κ (no clamped pair), a shared table, D = 3.
            ETCRelativeCase(globals: 5, radius: 2, kappa: 6, sharedTable: true, causal: causal, heads: 2, kvHeads: 1,
                            length: 70, headDim: 3, valueDim: 4, seed: base + 1),
            // 130 globals: key blocks straddle the global/long boundary; D = 65.
            ETCRelativeCase(globals: 130, radius: 20, kappa: 7, causal: causal, heads: 2, kvHeads: 2, length: 300,
                            headDim: 65, valueDim: 7, seed: base + 2),
            // κ = 0 (every pair clamped to the one row), D = 1.
            ETCRelativeCase(globals: 1, radius: 5, kappa: 0, causal: causal, heads: 1, kvHeads: 1, length: 45,
                            headDim: 1, valueDim: 2, seed: base + 3),
            ETCRelativeCase(globals: 6, radius: 7, kappa: 3, segmentSize: 13, causal: causal, batch: 3, length: 96,
                            headDim: 9, valueDim: 5, keyLengths: [96, 0, 40], seed: base + 4),
            ETCRelativeCase(globals: 0, radius: 40, kappa: 5, sharedTable: true, causal: causal, length: 150,
                            seed: base + 5),
        ]
    }
}

@Suite("ETC backward with a relative table")
struct ETCRelativeBackwardTests {
    /// The library's gradients and table gradient for `c` on `threads`.
    static func run(_ c: ETCRelativeCase, threads: Int)
        throws -> (inputs: AttentionGradients, table: [Float]) {
        let attention = try c.attention(), (q, k, v, dO) = try c.inputs()
        let result = try attention.attend(query: q, key: k, value: v, keyLengths: c.keyLengths, threads: threads)
        let g = try attention.parameterGradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                                 keyLengths: c.keyLengths, threads: threads)
        return (g.inputs, g.parameters.relativePositions)
    }

    @Test("dQ, dK, dV and ∂a match the hand-differentiated Double reference", arguments: ETCRelativeCases.all)
    func reference(_ c: ETCRelativeCase) throws {
        let attention = try c.attention(), (q, k, v, dO) = try c.inputs()
        let shape = try AttentionShape(query: q, key: k, value: v)
        let expected = try etcRelativeReference(attention, shape: shape, keyLengths: c.keyLengths, q: doubles(q),
                                                k: doubles(k), v: doubles(v),
                                                a: doubles(attention.relativePositions!), dO: doubles(dO))
        let got = try Self.run(c, threads: 2)
        for (name, e, x) in [("dQ", expected.dq, got.inputs.dQuery.elements), ("dK", expected.dk, got.inputs.dKey.elements),
                             ("dV", expected.dv, got.inputs.dValue.elements), ("∂a", expected.da, got.table)] {
            #expect(e.count == x.count, "\(c.testDescription) \(name) count")
            let largest = e.reduce(0) { max($0, abs($1)) }
            let worst = zip(e, x).reduce(0) { max($0, abs($1.0 - Double($1.1))) }
            #expect(worst <= 1e-3 * (1 + largest), "\(c.testDescription) \(name): off by \(worst) (max \(largest))")
        }
        // The plain backward (no table gradient) gives the same input gradients.
        let result = try attention.attend(query: q, key: k, value: v, keyLengths: c.keyLengths, threads: 3)
        let plain = try attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                            keyLengths: c.keyLengths, threads: 3)
        expectBitwiseEqualGradients(plain, got.inputs, c.testDescription)
    }

    /// The Double reference against central differences of its own Double forward, every
    /// element of Q, K, V and the table.
    @Test("the reference agrees with central finite differences of its forward", arguments: [false, true])
    func finiteDifferences(_ shared: Bool) throws {
        for causal in [false, true] {
            let c = ETCRelativeCase(globals: 2, radius: 3, kappa: 1, sharedTable: shared, segmentSize: shared ? 4 : 0,
                                    causal: causal, batch: 2, heads: 2, kvHeads: 1, length: 11, headDim: 2,
                                    valueDim: 2, keyLengths: [11, 8], seed: 88_500)
            let attention = try c.attention(), (q, k, v, dO) = try c.inputs()
            let shape = try AttentionShape(query: q, key: k, value: v)
            var x = [doubles(q), doubles(k), doubles(v), doubles(attention.relativePositions!)]
            let o = doubles(dO)
            func reference() throws -> ETCRelativeReference {
                try etcRelativeReference(attention, shape: shape, keyLengths: c.keyLengths, q: x[0], k: x[1], v: x[2],
                                         a: x[3], dO: o)
            }
            let analytic = try reference()
            let h = 1e-5
            var worst = 0.0
            for (which, gradient) in [analytic.dq, analytic.dk, analytic.dv, analytic.da].enumerated() {
                for e in 0..<x[which].count {
                    x[which][e] += h
                    let plus = try reference().loss
                    x[which][e] -= 2 * h
                    let minus = try reference().loss
                    x[which][e] += h
                    worst = max(worst, abs((plus - minus) / (2 * h) - gradient[e]))
                }
            }
            #expect(worst < 1e-7, "\(c.testDescription): finite differences differ by \(worst)")
            #expect(analytic.da.contains { abs($0) > 1e-3 }, "\(c.testDescription): ∂a vanishes")
        }
    }

    @Test("bitwise identical gradients and ∂a for 1, 2, 3 and 7 threads")
    func determinism() throws {
        for c in [ETCRelativeCase(globals: 4, radius: 30, kappa: 4, segmentSize: 100, causal: false, batch: 2,
                                  length: 333, headDim: 20, valueDim: 9, keyLengths: [333, 250], seed: 88_600),
                  ETCRelativeCase(globals: 70, radius: 9, kappa: 12, sharedTable: true, causal: true, heads: 2,
                                  kvHeads: 1, length: 500, headDim: 32, seed: 88_601)] {
            let runs = try [1, 2, 3, 7].map { try Self.run(c, threads: $0) }
            for (t, g) in runs.enumerated().dropFirst() {
                expectBitwiseEqualGradients(runs[0].inputs, g.inputs, "\(c.testDescription) run \(t)")
                #expect(runs[0].table.map(\.bitPattern) == g.table.map(\.bitPattern), "\(c.testDescription) ∂a run \(t)")
            }
        }
    }

    /// `L = ½‖O − T‖²`: a step of Q, K, V and the table by `−η g` lowers the loss by `η ‖g‖²`
    /// to first order.
    @Test("a small gradient step on Q, K, V and the table lowers L = ½‖O − T‖² as predicted", arguments: [false, true])
    func gradientStep(_ causal: Bool) throws {
        let c = ETCRelativeCase(globals: 4, radius: 9, kappa: 3, segmentSize: 30, causal: causal, batch: 2,
                                length: 90, headDim: 12, valueDim: 10, keyLengths: [90, 61], seed: 88_700)
        let attention = try c.attention(), (q, k, v, _) = try c.inputs()
        let result = try attention.attend(query: q, key: k, value: v, keyLengths: c.keyLengths, threads: 2)
        let target = try randomTensor(result.output.shape, seed: 88_701)
        let dO = try Tensor(shape: target.shape, data: zip(result.output.elements, target.elements).map { $0 - $1 })
        let g = try attention.parameterGradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                                 keyLengths: c.keyLengths, threads: 2)
        let table = try #require(attention.relativePositions)
        try expectFirstOrderDecrease(c.testDescription, before: halfSquaredError(result.output, target),
                                     gradients: [g.inputs.dQuery.elements, g.inputs.dKey.elements,
                                                 g.inputs.dValue.elements, g.parameters.relativePositions]) { eta in
            func moved(_ x: Tensor, _ dx: [Float]) throws -> Tensor {
                try Tensor(shape: x.shape, data: stepped(x.elements, dx, eta))
            }
            var updated = attention
            updated.relativePositions = try moved(table, g.parameters.relativePositions)
            let after = try updated.attend(query: moved(q, g.inputs.dQuery.elements), key: moved(k, g.inputs.dKey.elements),
                                           value: moved(v, g.inputs.dValue.elements), keyLengths: c.keyLengths,
                                           threads: 2)
            return halfSquaredError(after.output, target)
        }
    }

    @Test("the view entry point equals the Tensor convenience with a table")
    func viewEntryPoint() throws {
        let c = ETCRelativeCase(globals: 5, radius: 6, kappa: 3, segmentSize: 30, causal: false, batch: 2,
                                length: 150, headDim: 12, valueDim: 6, keyLengths: [150, 61], seed: 88_700)
        let attention = try c.attention(), (q, k, v, dO) = try c.inputs()
        let result = try attention.attend(query: q, key: k, value: v, keyLengths: c.keyLengths, threads: 2)
        try expectViewEntryPointMatchesTensors(attention, shape: try AttentionShape(query: q, key: k, value: v),
                                               query: q, key: k, value: v, result: result, outputGradient: dO,
                                               keyLengths: c.keyLengths, c.testDescription)
    }

    @Test("the two-input API's gradients with a table are the concatenated call's")
    func twoInputs() throws {
        let c = ETCRelativeCase(globals: 5, radius: 9, kappa: 4, causal: true, batch: 2, length: 95, seed: 88_800)
        let attention = try c.attention(), (q, k, v, dO) = try c.inputs()
        try expectTwoInputGradientsMatch(attention, q, k, v, dO, longLengths: [c.length - c.globals, 33])
    }

    @Test("backward cost with a table; misshapen tables and inputs throw")
    func costAndErrors() throws {
        let attention = try ETCAttention(heads: 8, headDim: 64, globals: 16, radius: 84, maxDistance: 12, seed: 3)
        let short = AttentionShape(heads: 8, queryLength: 2048, headDim: 64)
        let long = AttentionShape(heads: 8, queryLength: 8192, headDim: 64)
        let forward = try attention.cost(short, threads: 2), backward = try attention.backwardCost(short, threads: 2)
        #expect(backward.flops == 2.5 * forward.flops && backward.scoredPairs == forward.scoredPairs)
        let plain = try ETCAttention(globals: 16, radius: 84).backwardCost(short, threads: 2)
        #expect(backward.workspaceBytes >= plain.workspaceBytes)
        let longer = try attention.backwardCost(long, threads: 2)
        #expect(longer.workspaceBytes - backward.workspaceBytes <= 8 * 8 * (8192 + 128), "\(backward) -> \(longer)")

        let c = ETCRelativeCase(globals: 3, radius: 4, kappa: 2, causal: false, heads: 2, kvHeads: 2, length: 30,
                                headDim: 4, valueDim: 4, seed: 88_900)
        let good = try c.attention(), (q, k, v, dO) = try c.inputs()
        let result = try good.attend(query: q, key: k, value: v)
        expectMisshapenGradientInputsThrow(good, query: q, key: k, value: v, result: result, outputGradient: dO,
                                           wrong: try Tensor(shape: [1, 2, 29, 4]))
        for table in [try Tensor(shape: [1, 2, 4, 4]), try Tensor(shape: [1, 3, 5, 4]), try Tensor(shape: [1, 2, 5, 3])] {
            var bad = good
            bad.relativePositions = table
            expectAttentionError(.shapeMismatch, mentioning: ["relativePositions"]) {
                try bad.parameterGradients(query: q, key: k, value: v, result: result, outputGradient: dO)
            }
            expectAttentionError(.shapeMismatch, mentioning: ["relativePositions"]) {
                try bad.gradients(query: q, key: k, value: v, result: result, outputGradient: dO)
            }
            expectAttentionError(.shapeMismatch, mentioning: ["relativePositions"]) { try bad.backwardCost(short) }
        }
    }
}
