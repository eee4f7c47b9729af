// LinearAttention's backward pass (elu+1, FAVOR+ with its projection fixed, ReLU features;
// causal and not) against a Double reference of the forward differentiated by hand
// (itself checked by central finite differences of the Double forward), on awkward shapes
// (N not a chunk multiple, D = 1, 3, 65, Nq != Nk, grouped heads, key padding down to a
// batch item with no key); bitwise identical for 1, 2, 3 and 7 threads; the view entry
// point equal to the Tensor convenience; a gradient step lowering a loss.

@_spi(Testing) @_spi(Benchmarking) import EfficientAttention
import Foundation
import Testing

/// The features of one row in Double: `φ(x)`, its Jacobian-transpose product
/// `dx = J_φ(x)ᵀ g`, and the row's stabiliser `ℓ` (FAVOR+: the largest exponent minus
/// log √m; elu+1, ReLU: 0).
private struct ReferenceMap {
    var kind: MapKind, weights: [Double], m: Int, d: Int

    func exponents(_ x: [Double]) -> [Double] {
        let s = 1 / Double(d).squareRoot().squareRoot()
        let half = x.reduce(0) { $0 + $1 * $1 } * s * s / 2
        return (0..<m).map { r in s * (0..<d).reduce(0.0) { $0 + weights[r * d + $1] * x[$1] } - half }
    }

    func features(_ x: [Double]) -> [Double] {
        switch kind {
        case .elu: return x.map { $0 > 0 ? $0 + 1 : Foundation.exp($0) }
        case .relu: return (0..<m).map { r in max(0, (0..<d).reduce(0.0) { $0 + weights[r * d + $1] * x[$1] }) }
        case .favor: return exponents(x).map { Foundation.exp($0) / Double(m).squareRoot() }
        }
    }

    func logScale(_ x: [Double]) -> Double {
        kind == .favor ? exponents(x).max()! - Foundation.log(Double(m)) / 2 : 0
    }

    func backward(_ x: [Double], _ g: [Double]) -> [Double] {
        switch kind {
        case .elu:
            return (0..<d).map { c in x[c] > 0 ? g[c] : g[c] * Foundation.exp(x[c]) }
        case .relu:
            let y = (0..<m).map { r in (0..<d).reduce(0.0) { $0 + weights[r * d + $1] * x[$1] } }
            return (0..<d).map { c in (0..<m).reduce(0.0) { $0 + (y[$1] > 0 ? g[$1] * weights[$1 * d + c] : 0) } }
        case .favor:
            let s = 1 / Double(d).squareRoot().squareRoot()
            let u = zip(g, features(x)).map { $0 * $1 }
            let total = u.reduce(0, +)
            return (0..<d).map { c in
                s * (0..<m).reduce(0.0) { $0 + u[$1] * weights[$1 * d + c] } - s * s * total * x[c]
            }
        }
    }
}

/// Output and the gradients of `L = Σ dO ∘ O` for linear attention, in Double, from the
/// definition: `o_i = φ(q_i)ᵀS_i / (φ(q_i)ᵀz_i + ε_i)` with `ε_i = ε · exp(ℓ_{q_i} + c)`
/// (`c` the largest key stabiliser of the batch item: `ε` added to the stabilised
/// denominator, the stabilisers held constant), and by hand
/// `r = 1/(den + ε_i)`, `dN = r dO`, `dden = −r (dO·o)`, `dφ(q) = S dN + z dden`,
/// `dφ(k_j) += φ(q)(dN·v_j + dden)`, `dv_j += (φ(q)·φ(k_j)) dN`, then through the map.
private func linearReference(q: [Double], k: [Double], v: [Double], dO: [Double], dims n: GradientDims,
                             map: ReferenceMap, causal: Bool, keyLengths: [Int]?,
                             epsilon: Double = 1e-6) -> ReferenceGradients<Double> {
    let (d, dv, group) = (n.headDim, n.valueDim, n.heads / n.kvHeads)
    var r = ReferenceGradients<Double>(output: .init(repeating: 0, count: n.batch * n.heads * n.queryLength * dv),
                                       lse: .init(repeating: -.infinity, count: n.batch * n.heads * n.queryLength),
                                       dq: .init(repeating: 0, count: q.count), dk: .init(repeating: 0, count: k.count),
                                       dv: .init(repeating: 0, count: v.count))
    for b in 0..<n.batch {
        let valid = keyLengths?[b] ?? n.keyLength
        for hk in 0..<n.kvHeads {
            let keys = (0..<valid).map { j in Array(k[(n.keyIndex(b, hk, j) * d)..<(n.keyIndex(b, hk, j) * d + d)]) }
            let values = (0..<valid).map { j in Array(v[(n.keyIndex(b, hk, j) * dv)..<(n.keyIndex(b, hk, j) * dv + dv)]) }
            let fk = keys.map(map.features)
            let c = keys.map(map.logScale).max() ?? 0
            var dfk = [[Double]](repeating: [Double](repeating: 0, count: map.m), count: valid)
            for h in hk * group..<(hk + 1) * group { for i in 0..<n.queryLength {
                let row = n.queryIndex(b, h, i)
                let x = Array(q[(row * d)..<(row * d + d)]), g = Array(dO[(row * dv)..<(row * dv + dv)])
                let fq = map.features(x)
                let last = causal ? min(valid, max(0, i + n.keyLength - n.queryLength + 1)) : valid
                let w = (0..<last).map { j in zip(fq, fk[j]).reduce(0.0) { $0 + $1.0 * $1.1 } }
                let den = w.reduce(0, +)
                let inverse = 1 / (den + epsilon * Foundation.exp(map.logScale(x) + c))
                var o = [Double](repeating: 0, count: dv)
                for j in 0..<last { for t in 0..<dv { o[t] += w[j] * values[j][t] * inverse } }
                for t in 0..<dv { r.output[row * dv + t] = o[t] }
                if den > 0 { r.lse[row] = Foundation.log(den) }
                let dN = g.map { $0 * inverse }
                let dden = -inverse * zip(g, o).reduce(0.0) { $0 + $1.0 * $1.1 }
                var dfq = [Double](repeating: 0, count: map.m)
                for j in 0..<last {
                    let dp = zip(dN, values[j]).reduce(0.0) { $0 + $1.0 * $1.1 } + dden
                    for f in 0..<map.m {
                        dfq[f] += dp * fk[j][f]
                        dfk[j][f] += dp * fq[f]
                    }
                    for t in 0..<dv { r.dv[n.keyIndex(b, hk, j) * dv + t] += w[j] * dN[t] }
                }
                let dx = map.backward(x, dfq)
                for t in 0..<d { r.dq[row * d + t] += dx[t] }
            } }
            for j in 0..<valid {
                let dx = map.backward(keys[j], dfk[j])
                for t in 0..<d { r.dk[n.keyIndex(b, hk, j) * d + t] += dx[t] }
            }
        }
    }
    return r
}

struct LinearBackwardCase: Sendable, CustomTestStringConvertible {
    var kind: MapKind
    var batch = 1, heads = 2, kvHeads: Int? = nil
    var queryLength: Int, keyLength: Int? = nil
    var headDim = 8, valueDim: Int? = nil
    var features = 24
    var causal = false
    var keyLengths: [Int]? = nil
    var seed: UInt64 = 0

    var nk: Int { keyLength ?? queryLength }
    var testDescription: String {
        "\(kind) B\(batch) H\(heads)/\(kvHeads ?? heads) Nq\(queryLength) Nk\(nk) D\(headDim) Dv\(valueDim ?? headDim)"
            + (kind == .elu ? "" : " m\(features)") + (causal ? " causal" : "")
            + (keyLengths.map { " keyLengths\($0)" } ?? "")
    }

    var shape: AttentionShape {
        AttentionShape(batch: batch, heads: heads, kvHeads: kvHeads ?? heads, queryLength: queryLength,
                       keyLength: nk, headDim: headDim, valueDim: valueDim ?? headDim)
    }

    var attention: any DifferentiableAttention {
        switch kind {
        case .elu: return LinearAttention(featureMap: EluPlusOneFeatures(), causal: causal)
        case .favor: return LinearAttention(featureMap: try! FavorPlusFeatures(features: features, headDim: headDim,
                                                                                seed: seed), causal: causal)
        case .relu: return LinearAttention(featureMap: try! ReLUFeatures(features: features, headDim: headDim,
                                                                          seed: seed), causal: causal)
        }
    }

    fileprivate var map: ReferenceMap {
        switch kind {
        case .elu: return ReferenceMap(kind: .elu, weights: [], m: headDim, d: headDim)
        case .favor:
            let w = try! FavorPlusFeatures(features: features, headDim: headDim, seed: seed).projection.weights
            return ReferenceMap(kind: .favor, weights: w.map(Double.init), m: features, d: headDim)
        case .relu:
            let w = try! ReLUFeatures(features: features, headDim: headDim, seed: seed).projection.weights
            return ReferenceMap(kind: .relu, weights: w.map(Double.init), m: features, d: headDim)
        }
    }

    func inputs() throws -> (q: Tensor, k: Tensor, v: Tensor, result: AttentionResult, dO: Tensor) {
        let (q, k, v) = try randomQKV(batch: batch, heads: heads, kvHeads: kvHeads, queryLength: queryLength,
                                      keyLength: keyLength, headDim: headDim, valueDim: valueDim, seed: seed)
        let result = try attention.attend(query: q, key: k, value: v, keyLengths: keyLengths, threads: nil)
        let dO = try randomTensor([batch, heads, queryLength, valueDim ?? headDim], seed: seed &* 7 &+ 5)
        return (q, k, v, result, dO)
    }

    func gradients(threads: Int?) throws -> AttentionGradients {
        let (q, k, v, result, dO) = try inputs()
        return try attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                       keyLengths: keyLengths, threads: threads)
    }

    /// Gradients against the Double reference: relative max-abs error per gradient, exact
    /// zeros for keys no query sees (padding) and every row of a batch item with no key.
    func check(sourceLocation: SourceLocation = #_sourceLocation) throws {
        let (q, k, v, _, dO) = try inputs()
        let g = try gradients(threads: 3)
        let dims = GradientDims(query: q, value: v)
        let reference = linearReference(q: q.elements.map(Double.init), k: k.elements.map(Double.init),
                                        v: v.elements.map(Double.init), dO: dO.elements.map(Double.init),
                                        dims: dims, map: map, causal: causal, keyLengths: keyLengths)
        // Relative to the largest of the three gradients: a map homogeneous in x (ReLU
        // features with D = 1) has dq ≈ 0 by cancellation, whose rounding follows the others.
        let pairs = [("dQuery", g.dQuery, reference.dq), ("dKey", g.dKey, reference.dk), ("dValue", g.dValue, reference.dv)]
        let largest = pairs.map { maxErrorAndMagnitude($0.1.elements, $0.2).1 }.max()!
        for (name, tensor, ref) in pairs {
            let values = tensor.elements
            #expect(!values.contains { $0.isNaN }, "\(testDescription): NaN in \(name)", sourceLocation: sourceLocation)
            let (error, scale) = maxErrorAndMagnitude(values, ref)
            #expect(error <= 2e-4 * max(scale, 0.1 * largest) + 1e-6, "\(testDescription): \(name) error \(error), max |ref| \(scale)",
                    sourceLocation: sourceLocation)
        }
        // Padded keys and items with no key: exact zeros.
        let hkv = kvHeads ?? heads, d = headDim, dv = valueDim ?? headDim
        let (dk, dvv, dq) = (g.dKey.elements, g.dValue.elements, g.dQuery.elements)
        for b in 0..<batch {
            let valid = keyLengths?[b] ?? nk
            for hk in 0..<hkv { for j in valid..<nk {
                let row = dims.keyIndex(b, hk, j)
                #expect((0..<d).allSatisfy { dk[row * d + $0] == 0 } && (0..<dv).allSatisfy { dvv[row * dv + $0] == 0 },
                        "\(testDescription): padded key \(b), \(hk), \(j) has a gradient", sourceLocation: sourceLocation)
            } }
            if valid == 0 {
                #expect(dq[(b * heads * queryLength * d)..<((b + 1) * heads * queryLength * d)].allSatisfy { $0 == 0 },
                        "\(testDescription): item \(b) has no key but a query gradient", sourceLocation: sourceLocation)
            }
        }
    }
}

private func seeded(_ cases: [LinearBackwardCase], base: UInt64) -> [LinearBackwardCase] {
    cases.enumerated().map { n, c in
        var c = c
        c.seed = base + UInt64(n)
        return c
    }
}

enum LinearBackwardCases {
    static let all: [LinearBackwardCase] = MapKind.allCases.flatMap { kind in
        seeded([false, true].flatMap { causal in [
            LinearBackwardCase(kind: kind, heads: 4, kvHeads: 2, queryLength: 1, causal: causal),
            LinearBackwardCase(kind: kind, heads: 4, kvHeads: 2, queryLength: 150, causal: causal),
            LinearBackwardCase(kind: kind, queryLength: 70, keyLength: 131, headDim: 1, valueDim: 3, causal: causal),
            LinearBackwardCase(kind: kind, queryLength: 131, keyLength: 70, headDim: 3, valueDim: 1, causal: causal),
            LinearBackwardCase(kind: kind, queryLength: 65, keyLength: 64, headDim: 65, valueDim: 17,
                               features: 40, causal: causal),
            LinearBackwardCase(kind: kind, batch: 3, heads: 4, kvHeads: 2, queryLength: 90, keyLength: 100,
                               headDim: 5, valueDim: 7, causal: causal, keyLengths: [100, 0, 37]),
            LinearBackwardCase(kind: kind, batch: 2, heads: 4, kvHeads: 1, queryLength: 200, keyLength: 129,
                               headDim: 4, causal: causal, keyLengths: [1, 129]),
        ] }, base: UInt64(1000 * (MapKind.allCases.firstIndex(of: kind)! + 1)))
    }
}

@Suite("Linear attention backward")
struct LinearBackwardTests {
    @Test("matches the hand-differentiated Double reference", arguments: LinearBackwardCases.all)
    func reference(_ c: LinearBackwardCase) throws { try c.check() }

    @Test("the Double reference agrees with central finite differences of the Double forward",
          arguments: MapKind.allCases)
    func finiteDifferences(_ kind: MapKind) throws {
        for (causal, keyLengths, nq, nk, seed) in [(true, [4, 2], 3, 4, UInt64(800)), (false, [3, 0], 3, 4, 801),
                                                   (true, [3, 1], 5, 3, 802)] {
            let c = LinearBackwardCase(kind: kind, batch: 2, heads: 2, kvHeads: 1, queryLength: nq, keyLength: nk,
                                       headDim: 3, valueDim: 2, features: 5, causal: causal, keyLengths: keyLengths,
                                       seed: seed)
            let dims = GradientDims(query: try Tensor(shape: [2, 2, nq, 3]), value: try Tensor(shape: [2, 1, nk, 2]))
            var rng = SeededGenerator(seed: seed)
            func random(_ count: Int) -> [Double] { (0..<count).map { _ in Double(rng.nextFloat(in: -1...1)) } }
            let q = random(2 * 2 * nq * 3), k = random(2 * nk * 3), v = random(2 * nk * 2), dO = random(2 * 2 * nq * 2)
            // ε = 0 for elu+1 and FAVOR+ (positive features; the reference holds the stabilised ε
            // constant, which is exact at ε = 0); ReLU features can give a zero denominator,
            // and their ε is a constant (no stabiliser).
            let epsilon = kind == .relu ? 1e-6 : 0
            func run(_ q: [Double], _ k: [Double], _ v: [Double], epsilon: Double) -> ReferenceGradients<Double> {
                linearReference(q: q, k: k, v: v, dO: dO, dims: dims, map: c.map, causal: causal,
                                keyLengths: keyLengths, epsilon: epsilon)
            }
            func loss(_ q: [Double], _ k: [Double], _ v: [Double]) -> Double {
                zip(run(q, k, v, epsilon: epsilon).output, dO).reduce(0) { $0 + $1.0 * $1.1 }
            }
            let analytic = run(q, k, v, epsilon: epsilon)
            let h = 1e-6
            for (which, values, grad) in [(0, q, analytic.dq), (1, k, analytic.dk), (2, v, analytic.dv)] {
                for index in values.indices {
                    var plus = values, minus = values
                    plus[index] += h
                    minus[index] -= h
                    func eval(_ x: [Double]) -> Double {
                        which == 0 ? loss(x, k, v) : which == 1 ? loss(q, x, v) : loss(q, k, x)
                    }
                    let numeric = (eval(plus) - eval(minus)) / (2 * h)
                    #expect(abs(numeric - grad[index]) <= 1e-6 * (1 + abs(numeric)),
                            "\(kind) causal \(causal) input \(which)[\(index)]: analytic \(grad[index]), numeric \(numeric)")
                }
            }
        }
    }

    @Test("bitwise identical gradients for 1, 2, 3 and 7 threads", arguments: MapKind.allCases)
    func threadInvariance(_ kind: MapKind) throws {
        for causal in [false, true] {
            let c = LinearBackwardCase(kind: kind, batch: 2, heads: 8, kvHeads: 2, queryLength: 300, keyLength: 280,
                                       headDim: 16, causal: causal, keyLengths: [280, 91], seed: 3000)
            let runs = try [1, 2, 3, 7].map { try c.gradients(threads: $0) }
            for (n, g) in runs.enumerated().dropFirst() {
                expectBitwiseEqualGradients(runs[0], g, "\(c.testDescription) run \(n)")
            }
        }
    }

    @Test("the view entry point (strided NaN-padded views, a caller's workspace) equals the Tensor convenience",
          arguments: MapKind.allCases)
    func viewEntryPoint(_ kind: MapKind) throws {
        for causal in [false, true] {
            let c = LinearBackwardCase(kind: kind, batch: 2, heads: 4, kvHeads: 2, queryLength: 150, keyLength: 170,
                                       headDim: 12, valueDim: 6, causal: causal, keyLengths: [170, 61], seed: 4000)
            let attention = c.attention
            let (q, k, v, result, dO) = try c.inputs()
            let expected = try attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                                   keyLengths: c.keyLengths, threads: 2)
            let workspace = try AttentionWorkspace(byteCount: try attention.backwardCost(c.shape, threads: 3).workspaceBytes)
            var dq = try embeddedInNaN(try Tensor(shape: q.shape, repeating: 12345), innerStride: 2)
            var dk = try embeddedInNaN(try Tensor(shape: k.shape, repeating: 12345))
            var dv = try embeddedInNaN(try Tensor(shape: v.shape, repeating: 12345), innerStride: 3)
            let (eq, ek, ev) = (try embeddedInNaN(q, innerStride: 2), try embeddedInNaN(k),
                                try embeddedInNaN(v, innerStride: 2))
            let (eo, el, eg) = (try embeddedInNaN(result.output), try embeddedInNaN(result.logSumExp),
                                try embeddedInNaN(dO, innerStride: 2))
            try eq.withStridedView { qv in try ek.withStridedView { kv in try ev.withStridedView { vv in
            try eo.withStridedView { ov in try el.withStridedView { lv in try eg.withStridedView { gv in
            try dq.withMutableStridedView { dQ in try dk.withMutableStridedView { dK in try dv.withMutableStridedView { dV in
                try attention.gradients(query: qv, key: kv, value: vv, output: ov, logSumExp: lv, outputGradient: gv,
                                        dQuery: dQ, dKey: dK, dValue: dV, keyLengths: c.keyLengths,
                                        workspace: workspace, threads: 3)
            } } } } } } } } }
            expectBitwiseEqualGradients(expected, AttentionGradients(dQuery: dq, dKey: dk, dValue: dv), c.testDescription)
        }
    }

    @Test("backward cost: 2.5 × the forward's FLOPs, workspace independent of N", arguments: MapKind.allCases)
    func cost(_ kind: MapKind) throws {
        for causal in [false, true] {
            let c = LinearBackwardCase(kind: kind, heads: 8, queryLength: 4096, headDim: 64, features: 256, causal: causal)
            var long = c.shape
            long.queryLength = 65536
            long.keyLength = 65536
            let forward = try c.attention.cost(c.shape, threads: 2), backward = try c.attention.backwardCost(c.shape, threads: 2)
            #expect(backward.flops == 2.5 * forward.flops)
            #expect(try c.attention.backwardCost(long, threads: 2).workspaceBytes == backward.workspaceBytes)
        }
    }

    /// `L = ½‖O − T‖²`: a small step against the gradients lowers the loss by the
    /// first-order prediction.
    @Test("a small gradient step lowers L = ½‖O − T‖² by what the gradients predict", arguments: MapKind.allCases)
    func gradientStep(_ kind: MapKind) throws {
        for causal in [false, true] {
            let c = LinearBackwardCase(kind: kind, batch: 2, heads: 4, kvHeads: 2, queryLength: 90, keyLength: 100,
                                       headDim: 24, valueDim: 20, causal: causal, keyLengths: [100, 43], seed: 5000)
            let (q, k, v, result, _) = try c.inputs()
            let target = try randomTensor(result.output.shape, seed: 5001)
            func loss(_ o: Tensor) -> Double {
                zip(o.elements, target.elements).reduce(0) { $0 + 0.5 * Double($1.0 - $1.1) * Double($1.0 - $1.1) }
            }
            let dO = try Tensor(shape: target.shape, data: zip(result.output.elements, target.elements).map { $0 - $1 })
            let g = try c.attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                              keyLengths: c.keyLengths, threads: 2)
            let squaredNorm = [g.dQuery, g.dKey, g.dValue].reduce(0.0) { sum, t in
                t.elements.reduce(sum) { $0 + Double($1) * Double($1) }
            }
            let before = loss(result.output)
            let eta = Float(0.002 * before / squaredNorm)
            func step(_ x: Tensor, _ dx: Tensor) throws -> Tensor {
                try Tensor(shape: x.shape, data: zip(x.elements, dx.elements).map { $0 - eta * $1 })
            }
            let after = try c.attention.attend(query: step(q, g.dQuery), key: step(k, g.dKey),
                                               value: step(v, g.dValue), keyLengths: c.keyLengths, threads: 2)
            let decrease = before - loss(after.output), predicted = Double(eta) * squaredNorm
            #expect(decrease > 0, "\(c.testDescription): the loss rose by \(-decrease)")
            #expect(abs(decrease - predicted) < 0.05 * predicted,
                    "\(c.testDescription): decrease \(decrease), prediction \(predicted), loss \(before)")
        }
    }
}
