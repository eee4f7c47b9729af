// The Set Transformer's backward passes: induced set attention (ISAB: the summary of the
// keys by the inducing points, recomputed, then the queries over it; with and without
// the projections W_K, W_V) and pooling by attention (PMA). dQ, dK, dV and the learned
// parameters' gradients (∂L/∂I, ∂L/∂W_K, ∂L/∂W_V; ∂L/∂S) against a Double reference
// built stage by stage from DenseBackwardTests' hand-differentiated softmax reference
// (itself checked by central finite differences of the Double forward), on awkward shapes
// (D = 1, 3, 65, Dv != D, m not a tile multiple, grouped heads, key padding down to an
// item with no key); 1, 2, 3 and 7 threads bitwise; views equal Tensors; a gradient step
// through the parameters; errors.

@_spi(Testing) @_spi(Benchmarking) import EfficientAttention
import Foundation
import Testing

/// The gradients of `L = Σ dO ∘ O` in Double: inputs and learned parameters.
private struct SetReference {
    var output: [Double], dq: [Double], dk: [Double], dv: [Double]
    var dPoints: [Double], dwk: [Double]?, dwv: [Double]?
}

private func dims(batch: Int, heads: Int, kvHeads: Int, queryLength: Int, keyLength: Int, headDim: Int,
                  valueDim: Int) -> GradientDims {
    var n = GradientDims(query: try! Tensor(shape: [1, 1, 1, 1]), value: try! Tensor(shape: [1, 1, 1, 1]))
    (n.batch, n.heads, n.kvHeads, n.queryLength, n.keyLength, n.headDim, n.valueDim)
        = (batch, heads, kvHeads, queryLength, keyLength, headDim, valueDim)
    return n
}

private func denseBackward(q: [Double], k: [Double], v: [Double], dO: [Double], dims: GradientDims, scale: Double,
                           visible: @escaping Visibility) -> ReferenceGradients<Double> {
    referenceBackward(q: q, k: k, v: v, dO: dO, dims: dims, scale: scale, visible: visible,
                      exp: { Foundation.exp($0) }, log: { Foundation.log($0) })
}

/// Points `[H, m, D]` attending over the keys of each item (PMA; ISAB's first step):
/// the dense reference with the points repeated per batch item. Returns the reference and
/// `∂L/∂points` (the per-item query gradients summed over the items).
private func pointsReference(points: [Double], m: Int, k: [Double], v: [Double], dO: [Double], n: GradientDims,
                             scale: Double, keyLengths: [Int]?) -> (ReferenceGradients<Double>, [Double]) {
    var first = n
    first.queryLength = m
    let q = (0..<n.batch).flatMap { _ in points }
    let r = denseBackward(q: q, k: k, v: v, dO: dO, dims: first, scale: scale) { b, _, _, j in
        j < (keyLengths?[b] ?? n.keyLength)
    }
    var dPoints = [Double](repeating: 0, count: points.count)
    for b in 0..<n.batch { for e in points.indices { dPoints[e] += r.dq[b * points.count + e] } }
    return (r, dPoints)
}

/// ISAB from the definition: `Z = softmax(scale · I Kᵀ) V`, `K2 = Z W_K`, `V2 = Z W_V`
/// (or `Z`), `O = softmax(scale · Q K2ᵀ) V2`; backward stage by stage.
private func isabReference(q: [Double], k: [Double], v: [Double], dO: [Double], n: GradientDims, points: [Double],
                           m: Int, wk: [Double]?, wv: [Double]?, scale: Double, keyLengths: [Int]?) -> SetReference {
    let (d, dv, bh) = (n.headDim, n.valueDim, n.batch * n.heads)
    let zeros = [Double](repeating: 0, count: bh * m * dv)
    let z = pointsReference(points: points, m: m, k: k, v: v, dO: zeros, n: n, scale: scale,
                            keyLengths: keyLengths).0.output
    /// `x [bh, m, width] · w[h] [width, out]` per (b, h), or its transpose `w[h]ᵀ`.
    func times(_ x: [Double], _ w: [Double], width: Int, out: Int, transposed: Bool) -> [Double] {
        var y = [Double](repeating: 0, count: bh * m * out)
        for item in 0..<bh { for r in 0..<m { for c in 0..<out { for e in 0..<width {
            let h = item % n.heads
            let weight = transposed ? w[(h * out + c) * width + e] : w[(h * width + e) * out + c]
            y[(item * m + r) * out + c] += x[(item * m + r) * width + e] * weight
        } } } }
        return y
    }
    let (k2, v2) = wk.map { wk in (times(z, wk, width: dv, out: d, transposed: false),
                                   times(z, wv!, width: dv, out: dv, transposed: false)) } ?? (z, z)
    var second = n
    (second.kvHeads, second.keyLength) = (n.heads, m)
    let s2 = denseBackward(q: q, k: k2, v: v2, dO: dO, dims: second, scale: scale) { b, _, _, _ in
        (keyLengths?[b] ?? n.keyLength) > 0
    }
    var dz = zip(s2.dk, s2.dv).map { $0 + $1 }
    var dwk: [Double]?, dwv: [Double]?
    if let wk, let wv {
        dz = zip(times(s2.dk, wk, width: d, out: dv, transposed: true),
                 times(s2.dv, wv, width: dv, out: dv, transposed: true)).map { $0 + $1 }
        // ∂L/∂W[h][c, e] = Σ_b Σ_r Z[b,h,r,c] · dX[b,h,r,e].
        func weightGradient(_ dx: [Double], out: Int) -> [Double] {
            var g = [Double](repeating: 0, count: n.heads * dv * out)
            for item in 0..<bh { for r in 0..<m { for c in 0..<dv { for e in 0..<out {
                g[((item % n.heads) * dv + c) * out + e] += z[(item * m + r) * dv + c] * dx[(item * m + r) * out + e]
            } } } }
            return g
        }
        (dwk, dwv) = (weightGradient(s2.dk, out: d), weightGradient(s2.dv, out: dv))
    }
    let (s1, dPoints) = pointsReference(points: points, m: m, k: k, v: v, dO: dz, n: n, scale: scale,
                                        keyLengths: keyLengths)
    return SetReference(output: s2.output, dq: s2.dq, dk: s1.dk, dv: s1.dv, dPoints: dPoints, dwk: dwk, dwv: dwv)
}

private func pmaReference(k: [Double], v: [Double], dO: [Double], n: GradientDims, seeds: [Double], count: Int,
                          scale: Double, keyLengths: [Int]?) -> SetReference {
    let (r, dSeeds) = pointsReference(points: seeds, m: count, k: k, v: v, dO: dO, n: n, scale: scale,
                                      keyLengths: keyLengths)
    return SetReference(output: r.output, dq: .init(repeating: 0, count: n.batch * n.heads * count * n.headDim),
                        dk: r.dk, dv: r.dv, dPoints: dSeeds, dwk: nil, dwv: nil)
}

private func seeded(_ count: Int, _ seed: UInt64) -> [Float] {
    var rng = SeededGenerator(seed: seed)
    return (0..<count).map { _ in rng.nextFloat(in: -1...1) }
}

/// One ISAB or PMA problem.
struct SetBackwardCase: Sendable, CustomTestStringConvertible {
    var pooling = false
    var batch = 1, heads = 2, kvHeads: Int? = nil
    var queryLength = 0
    var keyLength: Int
    var headDim = 8, valueDim: Int? = nil
    var m = 5
    var projections = false
    var keyLengths: [Int]? = nil
    var seed: UInt64 = 0

    var dv: Int { valueDim ?? headDim }
    /// PMA's queries are its `m` seeds.
    var nq: Int { pooling ? m : queryLength }
    var testDescription: String {
        (pooling ? "PMA" : "ISAB") + " B\(batch) H\(heads)/\(kvHeads ?? heads) Nq\(nq) Nk\(keyLength) D\(headDim) Dv\(dv) m\(m)"
            + (projections ? " projections" : "") + (keyLengths.map { " keyLengths\($0)" } ?? "")
    }
    var shape: AttentionShape {
        AttentionShape(batch: batch, heads: heads, kvHeads: kvHeads ?? heads, queryLength: nq, keyLength: keyLength,
                       headDim: headDim, valueDim: dv)
    }

    func isab() throws -> InducedSetAttention {
        try InducedSetAttention(heads: heads, headDim: headDim, inducingPoints: seeded(heads * m * headDim, seed &+ 11),
                                keyProjection: projections ? seeded(heads * dv * headDim, seed &+ 12) : nil,
                                valueProjection: projections ? seeded(heads * dv * dv, seed &+ 13) : nil)
    }

    func pma() throws -> AttentionPooling {
        try AttentionPooling(heads: heads, headDim: headDim, seeds: seeded(heads * m * headDim, seed &+ 11))
    }

    var attention: any DifferentiableAttention { get throws { pooling ? try pma() : try isab() } }

    func inputs() throws -> (q: Tensor, k: Tensor, v: Tensor, result: AttentionResult, dO: Tensor) {
        let (q, k, v) = try randomQKV(batch: batch, heads: heads, kvHeads: kvHeads, queryLength: nq, keyLength: keyLength,
                                      headDim: headDim, valueDim: dv, seed: seed)
        let result = try attention.attend(query: q, key: k, value: v, keyLengths: keyLengths, threads: nil)
        let dO = try randomTensor([batch, heads, nq, dv], seed: seed &* 7 &+ 5)
        return (q, k, v, result, dO)
    }

    /// The inputs' and parameters' gradients (parameters flattened: points, W_K, W_V).
    func gradients(threads: Int) throws -> (AttentionGradients, [[Float]]) {
        let (q, k, v, result, dO) = try inputs()
        if pooling {
            let (g, s) = try pma().parameterGradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                                      keyLengths: keyLengths, threads: threads)
            return (g, [s])
        }
        let (g, p) = try isab().parameterGradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                                   keyLengths: keyLengths, threads: threads)
        return (g, [p.inducingPoints] + (p.keyProjection.map { [$0, p.valueProjection!] } ?? []))
    }

    func check(sourceLocation: SourceLocation = #_sourceLocation) throws {
        let (q, k, v, result, dO) = try inputs()
        let (g, parameters) = try gradients(threads: 3)
        let plain = try attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                            keyLengths: keyLengths, threads: 2)
        expectBitwiseEqualGradients(g, plain, "\(testDescription): parameterGradients' inputs vs gradients",
                                    sourceLocation: sourceLocation)
        let n = GradientDims(query: q, value: v), scale = defaultScale(headDim: headDim)
        let (dq, dk, dvv, o) = (q.elements.map(Double.init), k.elements.map(Double.init), v.elements.map(Double.init),
                                dO.elements.map(Double.init))
        let reference: SetReference
        if pooling {
            let p = try pma()
            reference = pmaReference(k: dk, v: dvv, dO: o, n: n, seeds: p.seeds.map(Double.init), count: m, scale: scale,
                                     keyLengths: keyLengths)
        } else {
            let a = try isab()
            reference = isabReference(q: dq, k: dk, v: dvv, dO: o, n: n, points: a.inducingPoints.map(Double.init), m: m,
                                      wk: a.keyProjection?.map(Double.init), wv: a.valueProjection?.map(Double.init),
                                      scale: scale, keyLengths: keyLengths)
        }
        var pairs = [("output", result.output.elements, reference.output), ("dQuery", g.dQuery.elements, reference.dq),
                     ("dKey", g.dKey.elements, reference.dk), ("dValue", g.dValue.elements, reference.dv),
                     ("dPoints", parameters[0], reference.dPoints)]
        if let dwk = reference.dwk, let dwv = reference.dwv {
            #expect(parameters.count == 3, "\(testDescription): projection gradients missing", sourceLocation: sourceLocation)
            guard parameters.count == 3 else { return }
            pairs += [("dW_K", parameters[1], dwk), ("dW_V", parameters[2], dwv)]
        } else {
            #expect(parameters.count == 1, "\(testDescription): projection gradients without projections",
                    sourceLocation: sourceLocation)
        }
        for (name, values, ref) in pairs {
            let error = zip(values, ref).reduce(0.0) { max($0, abs(Double($1.0) - $1.1)) }
            let size = ref.reduce(0.0) { max($0, abs($1)) }
            #expect(values.count == ref.count && !values.contains { $0.isNaN } && error <= 1e-4 * size + 1e-6,
                    "\(testDescription): \(name) error \(error), max |ref| \(size)", sourceLocation: sourceLocation)
        }
        // Padded keys: exact zeros.
        for b in 0..<batch { for hk in 0..<(kvHeads ?? heads) { for j in (keyLengths?[b] ?? keyLength)..<keyLength {
            let (kr, vr) = (n.keyIndex(b, hk, j) * headDim, n.keyIndex(b, hk, j) * dv)
            #expect(g.dKey.elements[kr..<(kr + headDim)].allSatisfy { $0 == 0 }
                        && g.dValue.elements[vr..<(vr + dv)].allSatisfy { $0 == 0 },
                    "\(testDescription): padded key \(b), \(hk), \(j)", sourceLocation: sourceLocation)
        } } }
    }
}

// MARK: - Shared by the backward tests of this change (ETCBackwardTests too)

/// `L = ½‖O − T‖²`.
func halfSquaredError(_ o: Tensor, _ target: Tensor) -> Double {
    zip(o.elements, target.elements).reduce(0) { $0 + 0.5 * Double($1.0 - $1.1) * Double($1.0 - $1.1) }
}

/// `x − η · dx`.
func stepped(_ x: [Float], _ dx: [Float], _ eta: Float) -> [Float] { zip(x, dx).map { $0 - eta * $1 } }

/// A step `x − η g` on everything with gradients `gradients` lowers a loss of `before` by
/// `η ‖g‖²` to first order: with `η` chosen for a 0.2% decrease, `after(η)` (the loss
/// after the step) must show it within 5%.
func expectFirstOrderDecrease(_ label: String, before: Double, gradients: [[Float]], after: (Float) throws -> Double,
                              sourceLocation: SourceLocation = #_sourceLocation) rethrows {
    let squaredNorm = gradients.reduce(0.0) { sum, t in t.reduce(sum) { $0 + Double($1) * Double($1) } }
    let eta = Float(0.002 * before / squaredNorm)
    let decrease = before - (try after(eta)), predicted = Double(eta) * squaredNorm
    #expect(decrease > 0 && abs(decrease - predicted) < 0.05 * predicted,
            "\(label): decrease \(decrease), first-order prediction \(predicted), loss \(before)",
            sourceLocation: sourceLocation)
}

enum SetBackwardCases {
    static let all: [SetBackwardCase] = [false, true].flatMap { pooling in
        let base: UInt64 = pooling ? 91_000 : 90_000
        var cases = [
            SetBackwardCase(pooling: pooling, queryLength: 70, keyLength: 77, headDim: 16, seed: base),
            SetBackwardCase(pooling: pooling, batch: 3, heads: 4, kvHeads: 2, queryLength: 33, keyLength: 150,
                            headDim: 3, m: 7, keyLengths: [150, 0, 37], seed: base + 1),
            SetBackwardCase(pooling: pooling, heads: 1, queryLength: 1, keyLength: 200, headDim: 1, m: 33, seed: base + 2),
            SetBackwardCase(pooling: pooling, batch: 2, heads: 4, kvHeads: 1, queryLength: 129, keyLength: 260,
                            headDim: 65, m: 4, keyLengths: [17, 260], seed: base + 3),
        ]
        // Dv != D: PMA always, ISAB with its projections.
        cases += [SetBackwardCase(pooling: pooling, batch: 2, heads: 2, kvHeads: 1, queryLength: 65, keyLength: 90,
                                  headDim: 65, valueDim: 17, m: 4, projections: !pooling, keyLengths: [90, 1],
                                  seed: base + 4),
                  SetBackwardCase(pooling: pooling, queryLength: 50, keyLength: 131, headDim: 3, valueDim: 1, m: 70,
                                  projections: !pooling, seed: base + 5)]
        if !pooling {
            cases.append(SetBackwardCase(batch: 3, heads: 4, kvHeads: 2, queryLength: 40, keyLength: 60, headDim: 8,
                                         m: 6, projections: true, keyLengths: [60, 0, 9], seed: base + 6))
        }
        return cases
    }
}

@Suite("Set Transformer backward")
struct SetBackwardTests {
    @Test("matches the Double reference (inputs, inducing points, projections, seeds)", arguments: SetBackwardCases.all)
    func reference(_ c: SetBackwardCase) throws { try c.check() }

    /// The hand-differentiated references against central differences of their own Double
    /// forward (`L = Σ dO ∘ O`), every input and parameter element, on a tiny shape.
    @Test("the Double references agree with central finite differences of the Double forward",
          arguments: [0, 1, 2])
    func finiteDifferences(_ variant: Int) throws {
        let pooling = variant == 0, projections = variant == 2
        let (b, h, hkv, nq, nk, d, m) = (2, 2, 1, 3, 4, 2, 2)
        let dv = projections ? 3 : d
        let n = dims(batch: b, heads: h, kvHeads: hkv, queryLength: pooling ? m : nq, keyLength: nk, headDim: d,
                     valueDim: dv)
        var rng = SeededGenerator(seed: 92_000 + UInt64(variant))
        func random(_ count: Int) -> [Double] { (0..<count).map { _ in Double(rng.nextFloat(in: -1...1)) } }
        let keyLengths = [4, 2]
        var x = [random(b * h * n.queryLength * d), random(b * hkv * nk * d), random(b * hkv * nk * dv),
                 random(h * m * d), random(h * dv * d), random(h * dv * dv)]
        let dO = random(b * h * n.queryLength * dv)
        func run(_ x: [[Double]]) -> SetReference {
            pooling ? pmaReference(k: x[1], v: x[2], dO: dO, n: n, seeds: x[3], count: m, scale: 0.8,
                                   keyLengths: keyLengths)
                : isabReference(q: x[0], k: x[1], v: x[2], dO: dO, n: n, points: x[3], m: m,
                                wk: projections ? x[4] : nil, wv: projections ? x[5] : nil, scale: 0.8,
                                keyLengths: keyLengths)
        }
        let analytic = run(x)
        var grads = [analytic.dq, analytic.dk, analytic.dv, analytic.dPoints]
        if projections { grads += [analytic.dwk!, analytic.dwv!] }
        let step = 1e-6
        for which in grads.indices {
            for e in x[which].indices {
                x[which][e] += step
                let plus = zip(run(x).output, dO).reduce(0) { $0 + $1.0 * $1.1 }
                x[which][e] -= 2 * step
                let minus = zip(run(x).output, dO).reduce(0) { $0 + $1.0 * $1.1 }
                x[which][e] += step
                let numeric = (plus - minus) / (2 * step)
                #expect(abs(numeric - grads[which][e]) <= 1e-6 * (1 + abs(numeric)),
                        "variant \(variant) input \(which)[\(e)]: analytic \(grads[which][e]), numeric \(numeric)")
            }
        }
    }

    @Test("bitwise identical gradients for 1, 2, 3 and 7 threads", arguments: [0, 1, 2])
    func threadInvariance(_ variant: Int) throws {
        let c = SetBackwardCase(pooling: variant == 0, batch: 2, heads: 8, kvHeads: 2, queryLength: 300, keyLength: 280,
                                headDim: 16, m: 40, projections: variant == 2, keyLengths: [280, 91], seed: 93_000)
        let runs = try [1, 2, 3, 7].map { try c.gradients(threads: $0) }
        for (n, g) in runs.enumerated().dropFirst() {
            expectBitwiseEqualGradients(runs[0].0, g.0, "\(c.testDescription) run \(n)")
            #expect(runs[0].1 == g.1, "\(c.testDescription) run \(n): parameter gradients differ")
        }
    }

    @Test("the view entry point (strided NaN-padded views, a caller's workspace) equals the Tensor convenience",
          arguments: [0, 1, 2])
    func viewEntryPoint(_ variant: Int) throws {
        let c = SetBackwardCase(pooling: variant == 0, batch: 2, heads: 4, kvHeads: 2, queryLength: 150, keyLength: 170,
                                headDim: 12, valueDim: variant == 2 ? 6 : nil, m: 9, projections: variant == 2,
                                keyLengths: [170, 61], seed: 94_000)
        let attention = try c.attention
        let (q, k, v, result, dO) = try c.inputs()
        try expectViewEntryPointMatchesTensors(attention, shape: c.shape, query: q, key: k, value: v, result: result,
                                               outputGradient: dO, keyLengths: c.keyLengths, c.testDescription)
    }

    /// `L = ½‖O − T‖²`: a step on the inputs and the learned points (and projections) lowers
    /// the loss by `η ‖g‖²` to first order.
    @Test("a small step on the inputs and learned parameters lowers L = ½‖O − T‖² as predicted", arguments: [0, 1, 2])
    func gradientStep(_ variant: Int) throws {
        let c = SetBackwardCase(pooling: variant == 0, batch: 2, heads: 4, kvHeads: 2, queryLength: 90, keyLength: 100,
                                headDim: 24, valueDim: variant == 2 ? 20 : nil, m: 8, projections: variant == 2,
                                keyLengths: [100, 43], seed: 95_000)
        let (q, k, v, result, _) = try c.inputs()
        let target = try randomTensor(result.output.shape, seed: 95_001)
        let dO = try Tensor(shape: target.shape, data: zip(result.output.elements, target.elements).map { $0 - $1 })
        let parameters: [[Float]], g: AttentionGradients, current: [[Float]]
        if c.pooling {
            let p = try c.pma()
            let r = try p.parameterGradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                             keyLengths: c.keyLengths, threads: 2)
            (g, parameters, current) = (r.inputs, [r.seeds], [p.seeds])
        } else {
            let a = try c.isab()
            let r = try a.parameterGradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                             keyLengths: c.keyLengths, threads: 2)
            g = r.inputs
            parameters = [r.parameters.inducingPoints] + (r.parameters.keyProjection.map { [$0, r.parameters.valueProjection!] } ?? [])
            current = [a.inducingPoints] + (a.keyProjection.map { [$0, a.valueProjection!] } ?? [])
        }
        try expectFirstOrderDecrease(c.testDescription, before: halfSquaredError(result.output, target),
                                     gradients: [g.dQuery.elements, g.dKey.elements, g.dValue.elements] + parameters) { eta in
            func moved(_ x: Tensor, _ dx: Tensor) throws -> Tensor {
                try Tensor(shape: x.shape, data: stepped(x.elements, dx.elements, eta))
            }
            let points = zip(current, parameters).map { stepped($0, $1, eta) }
            let attention: any Attention = c.pooling
                ? try AttentionPooling(heads: c.heads, headDim: c.headDim, seeds: points[0])
                : try InducedSetAttention(heads: c.heads, headDim: c.headDim, inducingPoints: points[0],
                                          keyProjection: points.count > 1 ? points[1] : nil,
                                          valueProjection: points.count > 2 ? points[2] : nil)
            let after = try attention.attend(query: moved(q, g.dQuery), key: moved(k, g.dKey), value: moved(v, g.dValue),
                                             keyLengths: c.keyLengths, threads: 2)
            return halfSquaredError(after.output, target)
        }
    }

    @Test("backward cost counts the recomputation; misshapen inputs and causal configurations throw")
    func costAndErrors() throws {
        let isab = SetBackwardCase(queryLength: 2048, keyLength: 2048, headDim: 64, m: 32)
        let a = try isab.isab()
        let forward = try a.cost(isab.shape, threads: 2), backward = try a.backwardCost(isab.shape, threads: 2)
        // Recomputed first attention (1×) plus both backwards (2.5×): between 3.5× and 3.5× + the first step.
        #expect(backward.flops > 2.5 * forward.flops && backward.flops < 3.5 * forward.flops, "\(backward) vs \(forward)")
        var longer = isab
        longer.keyLength = 8192
        longer.queryLength = 8192
        #expect(try a.backwardCost(longer.shape, threads: 2).workspaceBytes == backward.workspaceBytes
                || (try a.backwardCost(longer.shape, threads: 2).workspaceBytes - backward.workspaceBytes) <= 8 * 2 * 8192)
        let pma = SetBackwardCase(pooling: true, keyLength: 2048, headDim: 64, m: 4)
        let p = try pma.pma()
        #expect(try p.backwardCost(pma.shape, threads: 2).flops == 2.5 * (try p.cost(pma.shape, threads: 2)).flops)

        for c in [SetBackwardCase(queryLength: 9, keyLength: 11, headDim: 4, seed: 1),
                  SetBackwardCase(pooling: true, keyLength: 11, headDim: 4, seed: 2)] {
            let attention = try c.attention
            let (q, k, v, result, dO) = try c.inputs()
            expectMisshapenGradientInputsThrow(attention, query: q, key: k, value: v, result: result, outputGradient: dO,
                                               wrong: try Tensor(shape: [1, 2, c.nq + 1, 4]), c.testDescription)
        }
        var causal = try SetBackwardCase(queryLength: 9, keyLength: 11, headDim: 4).isab()
        causal.causal = true
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 9, keyLength: 11, headDim: 4, seed: 3)
        let dO = try randomTensor([1, 2, 9, 4], seed: 4)
        let fake = try AttentionResult(output: dO, logSumExp: try Tensor(shape: [1, 2, 9, 1]))
        expectAttentionError(.unsupported, mentioning: ["causal"]) {
            try causal.gradients(query: q, key: k, value: v, result: fake, outputGradient: dO)
        }
    }
}
