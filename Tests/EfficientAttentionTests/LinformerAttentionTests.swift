// LinformerAttention against its own reference: the keys and values projected with the
// same E and F (in Double, and naively in Float for the error yardstick), then softmax
// attention over the k projected keys. Awkward lengths and dimensions, Nq != Nk, per-head
// projections, E = F, grouped heads, key padding, NaN-padded strided inputs, determinism
// across thread counts, and the configurations that must throw.

import EfficientAttention
import Foundation
import Testing

struct LinformerCase: Sendable, CustomTestStringConvertible {
    var batch = 1, heads = 2, kvHeads: Int? = nil
    var queryLength: Int, keyLength: Int? = nil
    var headDim = 16, valueDim: Int? = nil
    var k = 24, maxLength: Int? = nil
    var perHead = false, shared = false
    var keyLengths: [Int]? = nil
    var threads: Int? = nil
    var seed: UInt64 = 0

    var nk: Int { keyLength ?? queryLength }
    var testDescription: String {
        "B\(batch) H\(heads)/\(kvHeads ?? heads) Nq\(queryLength) Nk\(nk) D\(headDim) Dv\(valueDim ?? headDim) k\(k)"
            + (perHead ? " per-head" : "") + (shared ? " E=F" : "") + (keyLengths.map { " keyLengths\($0)" } ?? "")
    }

    func attention() throws -> LinformerAttention {
        try LinformerAttention(projectedLength: k, maxSequenceLength: maxLength ?? nk + 5,
                               perHeadProjections: perHead ? (kvHeads ?? heads) : nil,
                               sharedKeyValue: shared, seed: seed &+ 77)
    }
}

/// `[B, Hkv, k, width]`: `P[:, :L] X[:L]` per (b, hk) with `L = keyLengths[b]`, in `T`.
private func project<T: BinaryFloatingPoint>(_ x: Tensor, _ p: [Float], _ attention: LinformerAttention,
                                             keyLengths: [Int]?, as: T.Type) -> [T] {
    let (nb, nh, nk, w) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3])
    let k = attention.projectedLength, nmax = attention.maxSequenceLength
    var out = [T](repeating: 0, count: nb * nh * k * w)
    for b in 0..<nb { for h in 0..<nh {
        let base = attention.projectionCount > 1 ? h * k * nmax : 0
        for r in 0..<k { for c in 0..<w {
            var sum: T = 0
            for j in 0..<(keyLengths?[b] ?? nk) { sum += T(p[base + r * nmax + j]) * T(x[b, h, j, c]) }
            out[((b * nh + h) * k + r) * w + c] = sum
        } }
    } }
    return out
}

/// Checks `attention` on `(q, k, v)` against the projected reference.
@discardableResult
private func checkLinformer(_ attention: LinformerAttention, _ q: Tensor, _ k: Tensor, _ v: Tensor,
                            keyLengths: [Int]?, threads: Int?, _ label: String,
                            sourceLocation: SourceLocation = #_sourceLocation) throws -> AttentionResult {
    let result = try attention.attend(query: q, key: k, value: v, keyLengths: keyLengths, threads: threads)
    let f = attention.f ?? attention.e
    let (nb, nhkv, kp) = (k.shape[0], k.shape[1], attention.projectedLength)
    let dShape = [nb, nhkv, kp, k.shape[3]], vShape = [nb, nhkv, kp, v.shape[3]]
    // A batch item with no valid key has no projected key either.
    let visible: Visibility = { b, _, _, _ in (keyLengths?[b] ?? k.shape[2]) > 0 }
    let kd = project(k, attention.e, attention, keyLengths: keyLengths, as: Double.self)
    let vd = project(v, f, attention, keyLengths: keyLengths, as: Double.self)
    // The reference projects in Double; the yardstick projects naively in Float.
    let reference = referenceAttentionDouble(q, kd, dShape, vd, vShape, visible: visible)
    let kf = try Tensor(shape: dShape, data: project(k, attention.e, attention, keyLengths: keyLengths, as: Float.self))
    let vf = try Tensor(shape: vShape, data: project(v, f, attention, keyLengths: keyLengths, as: Float.self))
    let naive = naiveFloatAttention(query: q, key: kf, value: vf, scale: 1 / Float(q.shape[3]).squareRoot(),
                                    visible: visible)
    checkAttention(result, reference: reference, naive: naive, label, sourceLocation: sourceLocation)
    return result
}

/// Softmax attention in Double over Double keys and values (the projected ones).
private func referenceAttentionDouble(_ query: Tensor, _ k: [Double], _ kShape: [Int], _ v: [Double], _ vShape: [Int],
                                      visible: Visibility) -> ReferenceResult<Double> {
    let (nb, nh, nq, d) = (query.shape[0], query.shape[1], query.shape[2], query.shape[3])
    let (nhkv, nk, dv) = (kShape[1], kShape[2], vShape[3])
    let q = query.elements.map(Double.init), scale = defaultScale(headDim: d)
    var output = [Double](repeating: 0, count: nb * nh * nq * dv)
    var lse = [Double](repeating: -.infinity, count: nb * nh * nq)
    for b in 0..<nb { for h in 0..<nh { for i in 0..<nq where visible(b, h, i, 0) {
        let hk = h / (nh / nhkv), row = (b * nh + h) * nq + i
        let scores = (0..<nk).map { j in
            scale * (0..<d).reduce(0.0) { $0 + q[row * d + $1] * k[((b * nhkv + hk) * nk + j) * d + $1] }
        }
        let m = scores.max()!
        let weights = scores.map { exp($0 - m) }
        let sum = weights.reduce(0, +)
        for j in 0..<nk { for c in 0..<dv {
            let w: Double = weights[j] / sum
            output[row * dv + c] += w * v[((b * nhkv + hk) * nk + j) * dv + c]
        } }
        lse[row] = m + log(sum)
    } } }
    return ReferenceResult(batch: nb, heads: nh, queryLength: nq, valueDim: dv, output: output, lse: lse)
}

extension LinformerCase {
    @discardableResult
    func check(sourceLocation: SourceLocation = #_sourceLocation) throws -> AttentionResult {
        let (q, k, v) = try randomQKV(batch: batch, heads: heads, kvHeads: kvHeads, queryLength: queryLength,
                                      keyLength: keyLength, headDim: headDim, valueDim: valueDim, seed: seed)
        return try checkLinformer(attention(), q, k, v, keyLengths: keyLengths, threads: threads,
                                  "linformer \(testDescription)", sourceLocation: sourceLocation)
    }
}

@Suite("LinformerAttention matches its reference")
struct LinformerReferenceTests {
    static let cases: [LinformerCase] = numberingSeeds([
        LinformerCase(queryLength: 1, k: 1), LinformerCase(queryLength: 17, k: 9), LinformerCase(queryLength: 300, k: 33),
        LinformerCase(queryLength: 777, k: 256, maxLength: 1024),
        LinformerCase(queryLength: 40, keyLength: 129, headDim: 1), LinformerCase(queryLength: 129, keyLength: 40, headDim: 3),
        LinformerCase(queryLength: 50, keyLength: 70, headDim: 64, k: 65),
        LinformerCase(queryLength: 33, keyLength: 45, headDim: 65, valueDim: 7),
        LinformerCase(queryLength: 20, keyLength: 300, headDim: 128, valueDim: 33, k: 31),
        LinformerCase(queryLength: 64, keyLength: 64, maxLength: 64),
        LinformerCase(heads: 4, kvHeads: 2, queryLength: 60, perHead: true),
        LinformerCase(heads: 3, queryLength: 60, keyLength: 35, perHead: true, shared: true),
        LinformerCase(heads: 6, kvHeads: 1, queryLength: 50, headDim: 24, valueDim: 20, shared: true),
        LinformerCase(batch: 3, heads: 2, queryLength: 40, keyLength: 90, keyLengths: [90, 0, 45]),
        LinformerCase(batch: 2, heads: 4, kvHeads: 2, queryLength: 30, keyLength: 50, perHead: true,
                      keyLengths: [1, 50], threads: 3),
    ])

    @Test("shapes, projections, padding", arguments: cases)
    func matches(_ c: LinformerCase) throws {
        try c.check()
    }

    @Test("deterministic across thread counts")
    func determinism() throws {
        let c = LinformerCase(batch: 2, heads: 4, kvHeads: 2, queryLength: 200, keyLength: 150, headDim: 32, k: 40)
        let (q, k, v) = try randomQKV(batch: 2, heads: 4, kvHeads: 2, queryLength: 200, keyLength: 150, headDim: 32, seed: 5)
        let attention = try c.attention()
        let one = try attention.attend(query: q, key: k, value: v, threads: 1)
        expectBitwiseEqual(one, try attention.attend(query: q, key: k, value: v, threads: 2), "1 vs 2 threads")
        expectBitwiseEqual(one, try attention.attend(query: q, key: k, value: v, threads: 1), "two runs")
    }

    @Test("NaN-padded strided inputs")
    func strided() throws {
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 37, keyLength: 45, headDim: 9, valueDim: 33, seed: 8)
        let attention = try LinformerAttention(projectedLength: 20, maxSequenceLength: 60, seed: 3)
        try checkLinformer(attention, embeddedInNaN(q), embeddedInNaN(k, innerStride: 2), embeddedInNaN(v),
                           keyLengths: nil, threads: 2, "NaN-padded")
    }

    @Test("given projections are used as given")
    func given() throws {
        // E = the first k rows of the identity: K' = K[:k], V' = V[:k], i.e. dense attention over the first k keys.
        let (k, nmax) = (5, 12)
        var e = [Float](repeating: 0, count: k * nmax)
        for r in 0..<k { e[r * nmax + r] = 1 }
        let attention = try LinformerAttention(e: e, f: nil, projectedLength: k, maxSequenceLength: nmax)
        let (q, key, v) = try randomQKV(heads: 2, queryLength: 9, keyLength: 12, headDim: 8, seed: 4)
        let result = try attention.attend(query: q, key: key, value: v)
        let dense = try DenseAttention().attend(query: q, key: key, value: v, keyLengths: [k])
        let diff = zip(result.output.elements, dense.output.elements).map { abs($0 - $1) }.max()!
        #expect(diff < 1e-5, "identity projection differs from dense over \(k) keys by \(diff)")
    }

    @Test("bad configurations throw")
    func errors() throws {
        expectAttentionError(.invalidParameter, mentioning: ["k", "0"]) {
            try LinformerAttention(projectedLength: 0, maxSequenceLength: 10)
        }
        expectAttentionError(.invalidParameter, mentioning: ["maxSequenceLength"]) {
            try LinformerAttention(projectedLength: 4, maxSequenceLength: 0)
        }
        expectAttentionError(.shapeMismatch, mentioning: ["E", "39", "40"]) {
            try LinformerAttention(e: [Float](repeating: 0, count: 39), f: nil, projectedLength: 4, maxSequenceLength: 10)
        }
        expectAttentionError(.shapeMismatch, mentioning: ["F", "41", "40"]) {
            try LinformerAttention(e: [Float](repeating: 0, count: 40), f: [Float](repeating: 0, count: 41),
                                   projectedLength: 4, maxSequenceLength: 10)
        }
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 12, headDim: 4, seed: 1)
        expectAttentionError(.unsupported, mentioning: ["keyLength 12", "maxSequenceLength 10"]) {
            try LinformerAttention(projectedLength: 4, maxSequenceLength: 10).attend(query: q, key: k, value: v)
        }
        expectAttentionError(.unsupported, mentioning: ["causal"]) {
            try LinformerAttention(projectedLength: 4, maxSequenceLength: 20, causal: true).attend(query: q, key: k, value: v)
        }
        expectAttentionError(.shapeMismatch, mentioning: ["3 per-head", "kvHeads 2"]) {
            try LinformerAttention(projectedLength: 4, maxSequenceLength: 20, perHeadProjections: 3)
                .attend(query: q, key: k, value: v)
        }
        expectAttentionError(.invalidParameter, mentioning: ["scale"]) {
            try LinformerAttention(projectedLength: 4, maxSequenceLength: 20, scale: .nan).cost(
                AttentionShape(heads: 2, queryLength: 12, headDim: 4))
        }
    }
}

private func numberingSeeds(_ cases: [LinformerCase]) -> [LinformerCase] {
    cases.enumerated().map { n, c in var c = c; c.seed = 3000 + UInt64(n); return c }
}
