// LinformerAttention's backward pass: dQ, dK, dV and ∂L/∂E, ∂L/∂F against a Double
// reference (the projections, the dense softmax backward over the projected keys, the
// projections transposed; itself checked by central finite differences of the Double
// forward), on awkward shapes (Nq != Nk, D = 1, 3, 65, k not a tile multiple, grouped
// heads, per-head projections, E = F, key padding down to a batch item with no key);
// bitwise identical for 1, 2, 3 and 7 threads; the view entry point equal to the Tensor
// convenience.

@_spi(Testing) @_spi(Benchmarking) import EfficientAttention
import Foundation
import Testing

/// Output and `L = Σ dO ∘ O` gradients of Linformer in Double, with `∂L/∂E`, `∂L/∂F`
/// (summed into `e` when `E = F`: `f` is then `nil`).
private struct LinformerReference {
    var output: [Double], dq: [Double], dk: [Double], dv: [Double], de: [Double], df: [Double]?
}

private func linformerReference(q: [Double], k: [Double], v: [Double], dO: [Double], dims n: GradientDims,
                                e: [Double], f: [Double]?, kProj: Int, nmax: Int, perHead: Bool,
                                scale: Double, keyLengths: [Int]?) -> LinformerReference {
    let (d, dv) = (n.headDim, n.valueDim)
    let fMatrix = f ?? e
    var pk = [Double](repeating: 0, count: n.batch * n.kvHeads * kProj * d)
    var pv = [Double](repeating: 0, count: n.batch * n.kvHeads * kProj * dv)
    func base(_ hk: Int) -> Int { perHead ? hk * kProj * nmax : 0 }
    for b in 0..<n.batch { for hk in 0..<n.kvHeads { for r in 0..<kProj {
        let row = (b * n.kvHeads + hk) * kProj + r
        for j in 0..<(keyLengths?[b] ?? n.keyLength) {
            let kj = n.keyIndex(b, hk, j)
            for c in 0..<d { pk[row * d + c] += e[base(hk) + r * nmax + j] * k[kj * d + c] }
            for c in 0..<dv { pv[row * dv + c] += fMatrix[base(hk) + r * nmax + j] * v[kj * dv + c] }
        }
    } } }
    var projected = n
    projected.keyLength = kProj
    let dense = referenceBackward(q: q, k: pk, v: pv, dO: dO, dims: projected, scale: scale,
                                  visible: { b, _, _, _ in (keyLengths?[b] ?? n.keyLength) > 0 },
                                  exp: { Foundation.exp($0) }, log: { Foundation.log($0) })
    var r = LinformerReference(output: dense.output, dq: dense.dq, dk: .init(repeating: 0, count: k.count),
                               dv: .init(repeating: 0, count: v.count), de: .init(repeating: 0, count: e.count),
                               df: .init(repeating: 0, count: e.count))
    for b in 0..<n.batch { for hk in 0..<n.kvHeads { for p in 0..<kProj {
        let row = (b * n.kvHeads + hk) * kProj + p
        for j in 0..<(keyLengths?[b] ?? n.keyLength) {
            let kj = n.keyIndex(b, hk, j), at = base(hk) + p * nmax + j
            for c in 0..<d {
                r.dk[kj * d + c] += e[at] * dense.dk[row * d + c]
                r.de[at] += dense.dk[row * d + c] * k[kj * d + c]
            }
            for c in 0..<dv {
                r.dv[kj * dv + c] += fMatrix[at] * dense.dv[row * dv + c]
                r.df![at] += dense.dv[row * dv + c] * v[kj * dv + c]
            }
        }
    } } }
    if f == nil {
        r.de = zip(r.de, r.df!).map { $0 + $1 }
        r.df = nil
    }
    return r
}

struct LinformerBackwardCase: Sendable, CustomTestStringConvertible {
    var batch = 1, heads = 2, kvHeads: Int? = nil
    var queryLength: Int, keyLength: Int? = nil
    var headDim = 8, valueDim: Int? = nil
    var k = 7, maxLength: Int? = nil
    var perHead = false, shared = false
    var keyLengths: [Int]? = nil
    var seed: UInt64 = 0

    var nk: Int { keyLength ?? queryLength }
    var testDescription: String {
        "B\(batch) H\(heads)/\(kvHeads ?? heads) Nq\(queryLength) Nk\(nk) D\(headDim) Dv\(valueDim ?? headDim) k\(k)"
            + (perHead ? " per-head" : "") + (shared ? " E=F" : "") + (keyLengths.map { " keyLengths\($0)" } ?? "")
    }

    var shape: AttentionShape {
        AttentionShape(batch: batch, heads: heads, kvHeads: kvHeads ?? heads, queryLength: queryLength,
                       keyLength: nk, headDim: headDim, valueDim: valueDim ?? headDim)
    }

    func attention() throws -> LinformerAttention {
        try LinformerAttention(projectedLength: k, maxSequenceLength: maxLength ?? nk + 5,
                               perHeadProjections: perHead ? (kvHeads ?? heads) : nil,
                               sharedKeyValue: shared, seed: seed &+ 77)
    }

    func inputs() throws -> (q: Tensor, k: Tensor, v: Tensor, result: AttentionResult, dO: Tensor) {
        let (q, k, v) = try randomQKV(batch: batch, heads: heads, kvHeads: kvHeads, queryLength: queryLength,
                                      keyLength: keyLength, headDim: headDim, valueDim: valueDim, seed: seed)
        let result = try attention().attend(query: q, key: k, value: v, keyLengths: keyLengths, threads: nil)
        let dO = try randomTensor([batch, heads, queryLength, valueDim ?? headDim], seed: seed &* 7 &+ 5)
        return (q, k, v, result, dO)
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
        let reference = linformerReference(
            q: q.elements.map(Double.init), k: k.elements.map(Double.init), v: v.elements.map(Double.init),
            dO: dO.elements.map(Double.init), dims: GradientDims(query: q, value: v),
            e: attention.e.map(Double.init), f: attention.f.map { $0.map(Double.init) }, kProj: attention.projectedLength,
            nmax: attention.maxSequenceLength, perHead: attention.projectionCount > 1,
            scale: 1 / Double(headDim).squareRoot(), keyLengths: keyLengths)
        #expect((p.f == nil) == shared, "\(testDescription): ∂L/∂F present iff E != F", sourceLocation: sourceLocation)
        var pairs = [("dQuery", g.dQuery.elements, reference.dq), ("dKey", g.dKey.elements, reference.dk),
                     ("dValue", g.dValue.elements, reference.dv), ("dE", p.e, reference.de)]
        if let f = p.f, let rf = reference.df { pairs.append(("dF", f, rf)) }
        expectMatchesReference(pairs, testDescription, sourceLocation: sourceLocation)
        // Padded keys: exact zeros.
        let dims = GradientDims(query: q, value: v), d = headDim, dv = valueDim ?? headDim
        let (dk, dvv) = (g.dKey.elements, g.dValue.elements)
        for b in 0..<batch { for hk in 0..<(kvHeads ?? heads) { for j in (keyLengths?[b] ?? nk)..<nk {
            let row = dims.keyIndex(b, hk, j)
            #expect((0..<d).allSatisfy { dk[row * d + $0] == 0 } && (0..<dv).allSatisfy { dvv[row * dv + $0] == 0 },
                    "\(testDescription): padded key \(b), \(hk), \(j)", sourceLocation: sourceLocation)
        } } }
    }
}

enum LinformerBackwardCases {
    static let all: [LinformerBackwardCase] = [
        LinformerBackwardCase(queryLength: 1, seed: 1),
        LinformerBackwardCase(heads: 4, kvHeads: 2, queryLength: 150, keyLength: 131, k: 33, seed: 2),
        LinformerBackwardCase(queryLength: 70, keyLength: 300, headDim: 1, valueDim: 3, k: 9, seed: 3),
        LinformerBackwardCase(queryLength: 131, keyLength: 20, headDim: 3, valueDim: 1, k: 40, seed: 4),
        LinformerBackwardCase(queryLength: 65, keyLength: 64, headDim: 65, valueDim: 17, k: 24, seed: 5),
        LinformerBackwardCase(batch: 3, heads: 4, kvHeads: 2, queryLength: 90, keyLength: 100, headDim: 5,
                              valueDim: 7, keyLengths: [100, 0, 37], seed: 6),
        LinformerBackwardCase(batch: 2, heads: 4, kvHeads: 2, queryLength: 60, keyLength: 80, perHead: true,
                              keyLengths: [80, 3], seed: 7),
        LinformerBackwardCase(batch: 2, heads: 4, kvHeads: 1, queryLength: 60, keyLength: 80, shared: true,
                              keyLengths: [1, 80], seed: 8),
        LinformerBackwardCase(heads: 2, kvHeads: 2, queryLength: 40, keyLength: 280, perHead: true, shared: true,
                              seed: 9),
    ]
}

@Suite("Linformer backward")
struct LinformerBackwardTests {
    @Test("matches the Double reference (dQ, dK, dV, ∂L/∂E, ∂L/∂F)", arguments: LinformerBackwardCases.all)
    func reference(_ c: LinformerBackwardCase) throws { try c.check() }

    @Test("the Double reference agrees with central finite differences of the Double forward",
          arguments: [false, true])
    func finiteDifferences(_ shared: Bool) throws {
        let (kProj, nmax, nq, nk) = (3, 6, 3, 4)
        let dims = GradientDims(query: try Tensor(shape: [2, 2, nq, 3]), value: try Tensor(shape: [2, 1, nk, 2]))
        var rng = SeededGenerator(seed: shared ? 900 : 901)
        func random(_ count: Int) -> [Double] { (0..<count).map { _ in Double(rng.nextFloat(in: -1...1)) } }
        let q = random(2 * 2 * nq * 3), k = random(2 * nk * 3), v = random(2 * nk * 2), dO = random(2 * 2 * nq * 2)
        let e = random(kProj * nmax), f: [Double]? = shared ? nil : random(kProj * nmax)
        let keyLengths = [4, 2]
        func run(_ q: [Double], _ k: [Double], _ v: [Double], _ e: [Double], _ f: [Double]?) -> LinformerReference {
            linformerReference(q: q, k: k, v: v, dO: dO, dims: dims, e: e, f: f, kProj: kProj, nmax: nmax,
                               perHead: false, scale: 0.7, keyLengths: keyLengths)
        }
        func loss(_ r: LinformerReference) -> Double { zip(r.output, dO).reduce(0) { $0 + $1.0 * $1.1 } }
        let analytic = run(q, k, v, e, f)
        let h = 1e-6
        var inputs = [(q, analytic.dq), (k, analytic.dk), (v, analytic.dv), (e, analytic.de)]
        if let f, let df = analytic.df { inputs.append((f, df)) }
        for (which, (values, grad)) in inputs.enumerated() {
            for index in values.indices {
                func eval(_ delta: Double) -> Double {
                    var x = [q, k, v, e, f ?? []]
                    x[which][index] += delta
                    return loss(run(x[0], x[1], x[2], x[3], f == nil ? nil : x[4]))
                }
                let numeric = (eval(h) - eval(-h)) / (2 * h)
                #expect(abs(numeric - grad[index]) <= 1e-6 * (1 + abs(numeric)),
                        "E=F \(shared) input \(which)[\(index)]: analytic \(grad[index]), numeric \(numeric)")
            }
        }
    }

    @Test("bitwise identical gradients for 1, 2, 3 and 7 threads")
    func threadInvariance() throws {
        let c = LinformerBackwardCase(batch: 2, heads: 8, kvHeads: 2, queryLength: 300, keyLength: 280, headDim: 16,
                                      k: 40, perHead: true, keyLengths: [280, 91], seed: 3000)
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
        let c = LinformerBackwardCase(batch: 2, heads: 4, kvHeads: 2, queryLength: 150, keyLength: 170, headDim: 12,
                                      valueDim: 6, k: 20, keyLengths: [170, 61], seed: 4000)
        let attention = try c.attention()
        let (q, k, v, result, dO) = try c.inputs()
        let expected = try attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                               keyLengths: c.keyLengths, threads: 2)
        let workspace = try AttentionWorkspace(byteCount: try attention.backwardCost(c.shape, threads: 3).workspaceBytes)
        var dq = try embeddedInNaN(try Tensor(shape: q.shape, repeating: 12345), innerStride: 2)
        var dk = try embeddedInNaN(try Tensor(shape: k.shape, repeating: 12345))
        var dv = try embeddedInNaN(try Tensor(shape: v.shape, repeating: 12345), innerStride: 3)
        let (eq, ek, ev) = (try embeddedInNaN(q, innerStride: 2), try embeddedInNaN(k), try embeddedInNaN(v, innerStride: 2))
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

    @Test("backward cost: the projections plus 2.5 × the attention, workspace independent of N")
    func cost() throws {
        let attention = try LinformerAttention(projectedLength: 256, maxSequenceLength: 65536)
        let short = AttentionShape(heads: 8, queryLength: 4096, headDim: 64)
        let long = AttentionShape(heads: 8, queryLength: 65536, headDim: 64)
        let backward = try attention.backwardCost(short, threads: 2)
        let forward = try attention.cost(short, threads: 2)
        #expect(backward.flops > 2 * forward.flops && backward.flops < 3 * forward.flops, "\(backward) vs \(forward)")
        #expect(backward.scoredPairs == forward.scoredPairs)
        #expect(try attention.backwardCost(long, threads: 2).workspaceBytes == backward.workspaceBytes)
    }

    @Test("misshapen output, logSumExp or outputGradient throw, naming it")
    func badShapes() throws {
        let c = LinformerBackwardCase(queryLength: 9, headDim: 4, seed: 11)
        let attention = try c.attention()
        let (q, k, v, result, dO) = try c.inputs()
        let wrong = try Tensor(shape: [1, 2, 8, 4])
        expectMisshapenGradientInputsThrow(attention, query: q, key: k, value: v, result: result, outputGradient: dO,
                                           wrong: wrong)
        expectMisshapenGradientInputsThrow(LinearAttention(featureMap: EluPlusOneFeatures()), query: q, key: k,
                                           value: v, result: result, outputGradient: dO, wrong: wrong)
    }

    @Test("causal Linformer's gradients throw like its forward")
    func causalThrows() throws {
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 9, headDim: 4, seed: 5)
        let result = try DenseAttention().attend(query: q, key: k, value: v)
        let dO = try randomTensor(result.output.shape, seed: 6)
        let attention = try LinformerAttention(projectedLength: 4, maxSequenceLength: 9, causal: true)
        expectAttentionError(.unsupported, mentioning: ["causal"]) {
            try attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO)
        }
    }
}
