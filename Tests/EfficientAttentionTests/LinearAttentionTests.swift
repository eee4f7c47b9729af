// LinearAttention against its own reference: the formula of ATTENTION_SPEC.md with the
// same feature map (same W), in Double and naively in Float (the error yardstick), for
// elu+1, FAVOR+ and ReLU features; causal and not, awkward lengths and dimensions, key
// padding. FAVOR+ approaching softmax attention as m grows; the recurrent form against
// the causal batch form token by token; determinism; configurations that must throw.

import EfficientAttention
import Foundation
import Testing

/// Which feature map a case uses.
enum MapKind: String, Sendable, CaseIterable { case elu, favor, relu }

/// φ of one row in `T`: the features divided by `exp(logScale)`, and `logScale`
/// (FAVOR+: the row's largest exponent minus log sqrt(m); elu+1 and ReLU: 0).
private func referenceFeatures<T: BinaryFloatingPoint & ElementaryFunctionsShim>(
    _ x: [T], kind: MapKind, weights: [Float], m: Int) -> (features: [T], logScale: T) {
    let d = x.count
    switch kind {
    case .elu:
        return (x.map { $0 > 0 ? $0 + 1 : T.expShim($0) }, 0)
    case .relu:
        return ((0..<m).map { r in max(0, (0..<d).reduce(T(0)) { $0 + T(weights[r * d + $1]) * x[$1] }) }, 0)
    case .favor:
        let s = 1 / T(d).squareRoot().squareRoot()
        let xs = x.map { $0 * s }
        let half = xs.reduce(T(0)) { $0 + $1 * $1 } / 2
        let a = (0..<m).map { r in (0..<d).reduce(T(0)) { $0 + T(weights[r * d + $1]) * xs[$1] } - half }
        let top = a.max()!
        return (a.map { T.expShim($0 - top) }, top - T.logShim(T(m)) / 2)
    }
}

/// The spec's formula in `T`, with the spec's stabilisers: query rows by their own max,
/// keys by the largest over the head's valid keys; `ε` added to the stabilised denominator.
private func referenceLinear<T: BinaryFloatingPoint & ElementaryFunctionsShim>(
    _ query: Tensor, _ key: Tensor, _ value: Tensor, kind: MapKind, weights: [Float], m: Int,
    causal: Bool, keyLengths: [Int]?, epsilon: T, as: T.Type) -> ReferenceResult<T> {
    let (nb, nh, nq, d) = (query.shape[0], query.shape[1], query.shape[2], query.shape[3])
    let (nhkv, nk, dv) = (key.shape[1], key.shape[2], value.shape[3])
    var output = [T](repeating: 0, count: nb * nh * nq * dv)
    var lse = [T](repeating: -.infinity, count: nb * nh * nq)
    for b in 0..<nb { for h in 0..<nh {
        let hk = h / (nh / nhkv), valid = keyLengths?[b] ?? nk
        let keys = (0..<valid).map { j in referenceFeatures((0..<d).map { T(key[b, hk, j, $0]) }, kind: kind, weights: weights, m: m) }
        let c = keys.map(\.logScale).max() ?? 0
        let fk = keys.map { k in k.features.map { $0 * T.expShim(k.logScale - c) } }
        for i in 0..<nq {
            let (fq, lq) = referenceFeatures((0..<d).map { T(query[b, h, i, $0]) }, kind: kind, weights: weights, m: m)
            let last = causal ? min(valid, i + nk - nq + 1) : valid
            var num = [T](repeating: 0, count: dv), den: T = 0
            for j in 0..<max(0, last) {
                let w = (0..<fq.count).reduce(T(0)) { $0 + fq[$1] * fk[j][$1] }
                den += w
                for x in 0..<dv { num[x] += w * T(value[b, hk, j, x]) }
            }
            let row = (b * nh + h) * nq + i
            for x in 0..<dv { output[row * dv + x] = num[x] / (den + epsilon) }
            lse[row] = den > 0 ? T.logShim(den) + lq + c : -.infinity
        }
    } }
    return ReferenceResult(batch: nb, heads: nh, queryLength: nq, valueDim: dv, output: output, lse: lse)
}

/// exp and log for the generic reference.
protocol ElementaryFunctionsShim {
    static func expShim(_ x: Self) -> Self
    static func logShim(_ x: Self) -> Self
}
extension Double: ElementaryFunctionsShim {
    static func expShim(_ x: Double) -> Double { Foundation.exp(x) }
    static func logShim(_ x: Double) -> Double { Foundation.log(x) }
}
extension Float: ElementaryFunctionsShim {
    static func expShim(_ x: Float) -> Float { Foundation.expf(x) }
    static func logShim(_ x: Float) -> Float { Foundation.logf(x) }
}

struct LinearCase: Sendable, CustomTestStringConvertible {
    var kind: MapKind
    var batch = 1, heads = 2, kvHeads: Int? = nil
    var queryLength: Int, keyLength: Int? = nil
    var headDim = 16, valueDim: Int? = nil
    var features = 48
    var causal = false
    var keyLengths: [Int]? = nil
    var threads: Int? = nil
    var seed: UInt64 = 0

    var testDescription: String {
        "\(kind) B\(batch) H\(heads)/\(kvHeads ?? heads) Nq\(queryLength) Nk\(keyLength ?? queryLength) D\(headDim) Dv\(valueDim ?? headDim)"
            + (kind == .elu ? "" : " m\(features)") + (causal ? " causal" : "") + (keyLengths.map { " keyLengths\($0)" } ?? "")
    }
}

/// A linear attention of `kind` for head dimension `d`, and the W its reference needs.
private func makeLinear(_ kind: MapKind, headDim d: Int, features m: Int, causal: Bool,
                        seed: UInt64) throws -> (attention: any Attention, weights: [Float], m: Int) {
    switch kind {
    case .elu:
        return (LinearAttention(featureMap: EluPlusOneFeatures(), causal: causal), [], d)
    case .favor:
        let map = try FavorPlusFeatures(features: m, headDim: d, seed: seed)
        return (LinearAttention(featureMap: map, causal: causal), map.projection.weights, m)
    case .relu:
        let map = try ReLUFeatures(features: m, headDim: d, seed: seed)
        return (LinearAttention(featureMap: map, causal: causal), map.projection.weights, m)
    }
}

@discardableResult
private func checkLinear(_ kind: MapKind, _ q: Tensor, _ k: Tensor, _ v: Tensor, features: Int, causal: Bool,
                         keyLengths: [Int]?, threads: Int?, seed: UInt64, _ label: String,
                         sourceLocation: SourceLocation = #_sourceLocation) throws -> AttentionResult {
    let (attention, weights, m) = try makeLinear(kind, headDim: q.shape[3], features: features, causal: causal, seed: seed)
    let result = try attention.attend(query: q, key: k, value: v, keyLengths: keyLengths, threads: threads)
    let reference = referenceLinear(q, k, v, kind: kind, weights: weights, m: m, causal: causal,
                                    keyLengths: keyLengths, epsilon: 1e-6, as: Double.self)
    let naive = referenceLinear(q, k, v, kind: kind, weights: weights, m: m, causal: causal,
                                keyLengths: keyLengths, epsilon: 1e-6, as: Float.self)
    checkAttention(result, reference: reference, naive: naive, label, sourceLocation: sourceLocation)
    return result
}

extension LinearCase {
    @discardableResult
    func check(sourceLocation: SourceLocation = #_sourceLocation) throws -> AttentionResult {
        let (q, k, v) = try randomQKV(batch: batch, heads: heads, kvHeads: kvHeads, queryLength: queryLength,
                                      keyLength: keyLength, headDim: headDim, valueDim: valueDim, seed: seed)
        return try checkLinear(kind, q, k, v, features: features, causal: causal, keyLengths: keyLengths,
                               threads: threads, seed: seed &+ 11, "linear \(testDescription)",
                               sourceLocation: sourceLocation)
    }
}

@Suite("LinearAttention matches its reference")
struct LinearAttentionReferenceTests {
    static let cases: [LinearCase] = MapKind.allCases.flatMap { kind in
        [false, true].flatMap { causal in [
            LinearCase(kind: kind, queryLength: 1, causal: causal),
            LinearCase(kind: kind, queryLength: 17, headDim: 1, features: 5, causal: causal),
            LinearCase(kind: kind, queryLength: 300, headDim: 3, valueDim: 65, causal: causal),
            LinearCase(kind: kind, queryLength: 129, keyLength: 40, headDim: 64, features: 33, causal: causal),
            LinearCase(kind: kind, queryLength: 40, keyLength: 200, headDim: 65, valueDim: 7, features: 70, causal: causal),
            LinearCase(kind: kind, heads: 1, queryLength: 20, headDim: 128, features: 256, causal: causal),
            LinearCase(kind: kind, heads: 4, kvHeads: 2, queryLength: 65, headDim: 24, valueDim: 20, causal: causal),
            LinearCase(kind: kind, batch: 3, queryLength: 70, keyLength: 90, causal: causal,
                       keyLengths: [90, 0, 45], threads: 3),
        ] }
    }.enumerated().map { n, c in var c = c; c.seed = 4000 + UInt64(n); return c }

    @Test("shapes, maps, causal and not", arguments: cases)
    func matches(_ c: LinearCase) throws {
        try c.check()
    }

    @Test("NaN-padded strided inputs", arguments: MapKind.allCases)
    func strided(_ kind: MapKind) throws {
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 70, keyLength: 45, headDim: 9, valueDim: 33, seed: 8)
        for causal in [false, true] {
            try checkLinear(kind, embeddedInNaN(q, innerStride: 2), embeddedInNaN(k, innerStride: 3), embeddedInNaN(v),
                            features: 40, causal: causal, keyLengths: nil, threads: 2, seed: 1, "NaN-padded \(kind)")
        }
    }

    @Test("deterministic across thread counts", arguments: MapKind.allCases)
    func determinism(_ kind: MapKind) throws {
        let (q, k, v) = try randomQKV(batch: 2, heads: 3, queryLength: 150, headDim: 32, seed: 5)
        for causal in [false, true] {
            let attention = try makeLinear(kind, headDim: 32, features: 64, causal: causal, seed: 2).attention
            let one = try attention.attend(query: q, key: k, value: v, keyLengths: nil, threads: 1)
            expectBitwiseEqual(one, try attention.attend(query: q, key: k, value: v, keyLengths: nil, threads: 2),
                               "\(kind) causal \(causal): 1 vs 2 threads")
        }
    }
}

@Suite("FAVOR+ approaches softmax attention")
struct FavorConvergenceTests {
    /// Mean over seeds of ‖o − o_softmax‖ / ‖o_softmax‖ with m features, small-norm inputs.
    static func relativeError(features m: Int) throws -> Double {
        var total = 0.0
        let seeds: [UInt64] = [1, 2, 3, 4]
        for seed in seeds {
            let (q, k, v) = try randomQKV(heads: 2, queryLength: 96, headDim: 16, seed: seed, range: -0.6...0.6)
            let map = try FavorPlusFeatures(features: m, headDim: 16, seed: seed &* 31)
            let result = try LinearAttention(featureMap: map).attend(query: q, key: k, value: v)
            let exact = referenceAttention(query: q, key: k, value: v, scale: defaultScale(headDim: 16), visible: Visible.all)
            var diff = 0.0, norm = 0.0
            for (x, r) in zip(result.output.elements, exact.output) {
                diff += (Double(x) - r) * (Double(x) - r)
                norm += r * r
            }
            total += (diff / norm).squareRoot()
        }
        return total / Double(seeds.count)
    }

    @Test("relative error against dense decreases as m goes 16, 64, 256, 1024")
    func convergence() throws {
        let errors = try [16, 64, 256, 1024].map { try FavorConvergenceTests.relativeError(features: $0) }
        for (a, b) in zip(errors, errors.dropFirst()) {
            #expect(b < a, "FAVOR+ error did not decrease with m: \(errors)")
        }
        #expect(errors[3] < 0.06, "FAVOR+ with m = 1024 is \(errors[3]) from softmax attention (errors \(errors))")
    }
}

@Suite("LinearAttention recurrent form")
struct LinearRecurrentTests {
    @Test("one token at a time equals the causal batch form", arguments: MapKind.allCases)
    func tokenByToken(_ kind: MapKind) throws {
        let (n, d, dv) = (150, 12, 5)
        let (q, k, v) = try randomQKV(batch: 2, heads: 4, kvHeads: 2, queryLength: n, headDim: d, valueDim: dv, seed: 21)
        let batch = try LinearAttention<AnyMapBox>.make(kind, headDim: d, causal: true)
        let whole = try batch.attend(query: q, key: k, value: v)
        var state = try batch.makeRecurrentState(batch: 2, heads: 4, kvHeads: 2, headDim: d, valueDim: dv)
        let wo = whole.output, wl = whole.logSumExp
        var worst = 0.0, worstLSE = 0.0
        for t in 0..<n {
            let step = try state.append(query: slice(q, t), key: slice(k, t), value: slice(v, t))
            for b in 0..<2 { for h in 0..<4 {
                for x in 0..<dv { worst = max(worst, Double(abs(step.output[b, h, 0, x] - wo[b, h, t, x]))) }
                worstLSE = max(worstLSE, Double(abs(step.logSumExp[b, h, 0, 0] - wl[b, h, t, 0])))
            } }
        }
        #expect(state.length == n)
        // Same formula, different summation order (GEMM blocks vs one token at a time) and
        // stabiliser granularity (affects only the ε term): rounding-level differences.
        #expect(worst < 2e-5 && worstLSE < 2e-5, "\(kind): recurrent differs from batch by \(worst) (lse \(worstLSE))")
    }

    @Test("appending blocks of tokens equals the causal batch form")
    func blocks() throws {
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 200, headDim: 16, seed: 22)
        let attention = try LinearAttention<AnyMapBox>.make(.favor, headDim: 16, causal: true)
        let whole = try attention.attend(query: q, key: k, value: v)
        var state = try attention.makeRecurrentState(heads: 2, headDim: 16)
        var start = 0
        for length in [37, 1, 100, 62] {
            let part = try state.append(query: slice(q, start, length), key: slice(k, start, length),
                                        value: slice(v, start, length))
            for h in 0..<2 { for i in 0..<length { for x in 0..<16 {
                #expect(abs(part.output[0, h, i, x] - whole.output[0, h, start + i, x]) < 2e-5)
            } } }
            start += length
        }
    }

    @Test("a copied state continues independently")
    func copies() throws {
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 40, headDim: 8, seed: 23)
        let attention = try LinearAttention<AnyMapBox>.make(.favor, headDim: 8, causal: true)
        var state = try attention.makeRecurrentState(heads: 2, headDim: 8)
        _ = try state.append(query: slice(q, 0, 20), key: slice(k, 0, 20), value: slice(v, 0, 20))
        var copy = state
        // The copy takes other tokens first; the original must not see them.
        _ = try copy.append(query: slice(q, 30, 10), key: slice(k, 30, 10), value: slice(v, 30, 10))
        let original = try state.append(query: slice(q, 20, 10), key: slice(k, 20, 10), value: slice(v, 20, 10))
        let whole = try attention.attend(query: slice(q, 0, 30), key: slice(k, 0, 30), value: slice(v, 0, 30))
        for h in 0..<2 { for i in 0..<10 { for x in 0..<8 {
            #expect(abs(original.output[0, h, i, x] - whole.output[0, h, 20 + i, x]) < 2e-5)
        } } }
        #expect(state.length == 30 && copy.length == 30)
    }

    @Test("recurrent state rejects mismatched tensors")
    func errors() throws {
        let attention = LinearAttention(featureMap: EluPlusOneFeatures(), causal: true)
        var state = try attention.makeRecurrentState(heads: 2, headDim: 4)
        let (q, k, v) = try randomQKV(heads: 3, queryLength: 1, headDim: 4, seed: 1)
        expectAttentionError(.shapeMismatch, mentioning: ["H=2", "H=3"]) { try state.append(query: q, key: k, value: v) }
        let (q2, k2, v2) = try randomQKV(heads: 2, queryLength: 2, keyLength: 3, headDim: 4, seed: 1)
        expectAttentionError(.shapeMismatch, mentioning: ["Nq=2", "Nk=3"]) { try state.append(query: q2, key: k2, value: v2) }
    }
}

@Suite("LinearAttention configuration errors")
struct LinearErrorTests {
    @Test("bad configurations throw")
    func errors() throws {
        expectAttentionError(.invalidParameter, mentioning: ["m", "0"]) { try FavorPlusFeatures(features: 0, headDim: 8) }
        expectAttentionError(.invalidParameter, mentioning: ["m", "0"]) { try ReLUFeatures(features: 0, headDim: 8) }
        expectAttentionError(.shapeMismatch, mentioning: ["W", "10", "12"]) {
            try RandomProjection(weights: [Float](repeating: 0, count: 10), features: 3, headDim: 4)
        }
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 5, headDim: 8, seed: 1)
        expectAttentionError(.shapeMismatch, mentioning: ["headDim 16", "headDim 8"]) {
            try LinearAttention(featureMap: try FavorPlusFeatures(features: 4, headDim: 16)).attend(query: q, key: k, value: v)
        }
        expectAttentionError(.invalidParameter, mentioning: ["epsilon"]) {
            try LinearAttention(featureMap: EluPlusOneFeatures(), epsilon: 0).attend(query: q, key: k, value: v)
        }
    }

    @Test("FAVOR+ rows of W are orthogonal within blocks of D")
    func orthogonal() throws {
        let d = 8, map = try FavorPlusFeatures(features: 20, headDim: d, seed: 3)
        let w = map.projection.weights
        for block in 0..<3 { for r in block * d..<min(20, block * d + d) { for p in block * d..<r {
            let dot = (0..<d).reduce(Float(0)) { $0 + w[r * d + $1] * w[p * d + $1] }
            #expect(abs(dot) < 1e-4, "rows \(r), \(p) of W not orthogonal: \(dot)")
        } } }
    }
}

/// Rows `start ..< start + count` of a `[B, H, N, D]` tensor.
private func slice(_ t: Tensor, _ start: Int, _ count: Int = 1) throws -> Tensor {
    var data: [Float] = []
    for b in 0..<t.shape[0] { for h in 0..<t.shape[1] { for i in start..<start + count { for x in 0..<t.shape[3] {
        data.append(t[b, h, i, x])
    } } } }
    return try Tensor(shape: [t.shape[0], t.shape[1], count, t.shape[3]], data: data)
}

/// A feature map chosen at run time (lets one test body cover every map).
struct AnyMapBox: FeatureMap {
    let base: any FeatureMap
    var attentionName: String { base.attentionName }
    func featureCount(headDim: Int) throws -> Int { try base.featureCount(headDim: headDim) }
    func flopsPerRow(headDim: Int) -> Double { base.flopsPerRow(headDim: headDim) }
    func apply(_ input: UnsafePointer<Float>, rows: Int, rowStride: Int, columnStride: Int, headDim: Int,
               output: UnsafeMutablePointer<Float>, outputStride: Int, logScale: UnsafeMutablePointer<Float>) {
        base.apply(input, rows: rows, rowStride: rowStride, columnStride: columnStride, headDim: headDim,
                   output: output, outputStride: outputStride, logScale: logScale)
    }
}

extension LinearAttention where Map == AnyMapBox {
    static func make(_ kind: MapKind, headDim d: Int, causal: Bool) throws -> LinearAttention<AnyMapBox> {
        let map: any FeatureMap
        switch kind {
        case .elu: map = EluPlusOneFeatures()
        case .favor: map = try FavorPlusFeatures(features: 64, headDim: d, seed: 9)
        case .relu: map = try ReLUFeatures(features: 64, headDim: d, seed: 9)
        }
        return LinearAttention(featureMap: AnyMapBox(base: map), causal: causal)
    }
}

/// The non-causal formula with running sums (`S = Σ φ(k) vᵀ`, `z = Σ φ(k)` once per head,
/// then each query): the same definition as `referenceLinear`, O(N) instead of O(N²), for
/// sequences long enough to take several segments.
private func referenceLinearSums<T: BinaryFloatingPoint & ElementaryFunctionsShim>(
    _ query: Tensor, _ key: Tensor, _ value: Tensor, kind: MapKind, weights: [Float], m: Int,
    keyLengths: [Int]?, epsilon: T, causal: Bool = false, as: T.Type) -> ReferenceResult<T> {
    let (nb, nh, nq, d) = (query.shape[0], query.shape[1], query.shape[2], query.shape[3])
    let (nhkv, nk, dv) = (key.shape[1], key.shape[2], value.shape[3])
    var output = [T](repeating: 0, count: nb * nh * nq * dv)
    var lse = [T](repeating: -.infinity, count: nb * nh * nq)
    for b in 0..<nb { for h in 0..<nh {
        let hk = h / (nh / nhkv), valid = keyLengths?[b] ?? nk
        let keys = (0..<valid).map { j in referenceFeatures((0..<d).map { T(key[b, hk, j, $0]) }, kind: kind, weights: weights, m: m) }
        let c = keys.map(\.logScale).max() ?? 0
        let width = keys.first?.features.count ?? m
        var s = [T](repeating: 0, count: width * dv), z = [T](repeating: 0, count: width)
        var absorbed = 0
        func absorb(through last: Int) {
            while absorbed <= min(last, keys.count - 1) {
                let (j, k) = (absorbed, keys[absorbed])
                let scale = T.expShim(k.logScale - c)
                for f in 0..<width {
                    let x = k.features[f] * scale
                    z[f] += x
                    for y in 0..<dv { s[f * dv + y] += x * T(value[b, hk, j, y]) }
                }
                absorbed += 1
            }
        }
        if !causal { absorb(through: keys.count - 1) }
        for i in 0..<nq {
            if causal { absorb(through: i + nk - nq) }
            let (fq, lq) = referenceFeatures((0..<d).map { T(query[b, h, i, $0]) }, kind: kind, weights: weights, m: m)
            let den = (0..<width).reduce(T(0)) { $0 + fq[$1] * z[$1] }
            let row = (b * nh + h) * nq + i
            for y in 0..<dv {
                let num = (0..<width).reduce(T(0)) { $0 + fq[$1] * s[$1 * dv + y] }
                output[row * dv + y] = num / (den + epsilon)
            }
            lse[row] = den > 0 && absorbed > 0 ? T.logShim(den) + lq + c : -.infinity
        }
    } }
    return ReferenceResult(batch: nb, heads: nh, queryLength: nq, valueDim: dv, output: output, lse: lse)
}

@Suite("LinearAttention split along the sequence")
struct LinearAttentionSegmentTests {
    @Test("several segments match the running-sum reference", arguments: [MapKind.elu, .favor])
    func reference(_ kind: MapKind) throws {
        for (nq, nk, lengths) in [(70000, 70000, nil), (40000, 1000, nil), (3000, 100_000, [100_000, 33000])]
            as [(Int, Int, [Int]?)] {
            let batch = lengths?.count ?? 1
            let (q, k, v) = try randomQKV(batch: batch, heads: 2, kvHeads: 1, queryLength: nq, keyLength: nk,
                                          headDim: 8, valueDim: 5, seed: 7300)
            let (attention, weights, m) = try makeLinear(kind, headDim: 8, features: 16, causal: false, seed: 7301)
            let result = try attention.attend(query: q, key: k, value: v, keyLengths: lengths, threads: 2)
            let reference = referenceLinearSums(q, k, v, kind: kind, weights: weights, m: m, keyLengths: lengths,
                                                epsilon: 1e-6, as: Double.self)
            let naive = referenceLinearSums(q, k, v, kind: kind, weights: weights, m: m, keyLengths: lengths,
                                            epsilon: 1e-6, as: Float.self)
            checkAttention(result, reference: reference, naive: naive, "\(kind) segments Nq \(nq) Nk \(nk)")
        }
    }

    @Test("causal: several query segments match the running-prefix reference", arguments: [MapKind.elu, .favor])
    func causalReference(_ kind: MapKind) throws {
        for (nq, nk, lengths) in [(70000, 70000, nil), (40000, 41000, nil), (66000, 66000, [66000, 40000])]
            as [(Int, Int, [Int]?)] {
            let batch = lengths?.count ?? 1
            let (q, k, v) = try randomQKV(batch: batch, heads: 2, kvHeads: 1, queryLength: nq, keyLength: nk,
                                          headDim: 8, valueDim: 5, seed: 7310)
            // ε = 1e-30 (negligible): the result then does not depend on the key stabiliser (the reference
            // uses the largest over all keys, the scan a running one).
            let attention: any Attention, weights: [Float], m: Int
            switch kind {
            case .favor:
                let map = try FavorPlusFeatures(features: 16, headDim: 8, seed: 7311)
                (attention, weights, m) = (LinearAttention(featureMap: map, causal: true, epsilon: 1e-30), map.projection.weights, 16)
            default:
                (attention, weights, m) = (LinearAttention(featureMap: EluPlusOneFeatures(), causal: true, epsilon: 1e-30), [], 8)
            }
            // Nq > 32768 (the segment length): two or three query segments.
            let result = try attention.attend(query: q, key: k, value: v, keyLengths: lengths, threads: 2)
            let reference = referenceLinearSums(q, k, v, kind: kind, weights: weights, m: m, keyLengths: lengths,
                                                epsilon: 1e-30, causal: true, as: Double.self)
            let naive = referenceLinearSums(q, k, v, kind: kind, weights: weights, m: m, keyLengths: lengths,
                                            epsilon: 1e-30, causal: true, as: Float.self)
            checkAttention(result, reference: reference, naive: naive, "\(kind) causal segments Nq \(nq) Nk \(nk)")
        }
    }

    @Test("causal segments give the same bits for every thread count")
    func causalDeterminism() throws {
        let (q, k, v) = try randomQKV(batch: 2, heads: 2, queryLength: 70000, headDim: 8, seed: 7410)
        let map = try FavorPlusFeatures(features: 16, headDim: 8, seed: 7411)
        let attention = LinearAttention(featureMap: map, causal: true)
        let one = try attention.attend(query: q, key: k, value: v, keyLengths: [70000, 50000], threads: 1)
        for threads in [2, 3, 7] {
            expectBitwiseEqual(one, try attention.attend(query: q, key: k, value: v, keyLengths: [70000, 50000],
                                                         threads: threads), "causal segments threads \(threads)")
        }
    }

    @Test("segments give the same bits for every thread count")
    func determinism() throws {
        let (q, k, v) = try randomQKV(batch: 2, heads: 2, queryLength: 70000, headDim: 8, seed: 7400)
        let attention = LinearAttention(featureMap: EluPlusOneFeatures())
        let one = try attention.attend(query: q, key: k, value: v, keyLengths: [70000, 50000], threads: 1)
        for threads in [2, 3, 7] {
            expectBitwiseEqual(one, try attention.attend(query: q, key: k, value: v, keyLengths: [70000, 50000],
                                                         threads: threads), "segments threads \(threads)")
        }
        let shape = AttentionShape(batch: 2, heads: 2, queryLength: 70000, headDim: 8)
        let cost = try attention.cost(shape, threads: 2)
        #expect(cost.workspaceBytes > 2 * 2 * 3 * (8 * 8 + 8) * 4, "segment states in the workspace")
    }
}
