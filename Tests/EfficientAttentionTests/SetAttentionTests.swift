// InducedSetAttention (ISAB) and AttentionPooling (PMA) against Double references of the
// Set Transformer's definitions (the summary Z in Double, projected in Double, then the
// queries' softmax over it), with the naive Float path as the yardstick: awkward sizes,
// odd D, Dv ≠ D with projections, grouped heads, key padding (including an empty set);
// ISAB with the keys as inducing points is two dense attentions; PMA with one seed is a
// one-query dense call; bad configurations throw; thread counts give the same bits.

@_spi(Testing) import EfficientAttention
import Foundation
import Testing

/// `points [H, m, D]` repeated over `batch` items as a query tensor.
private func pointQueries(_ points: [Float], batch: Int, heads: Int, m: Int, d: Int) throws -> Tensor {
    try Tensor(shape: [batch, heads, m, d], data: Array((0..<batch).map { _ in points }.joined()))
}

/// `Z · W` per (b, h): `z [B, H, m, dv]`, `w [H, dv, width]` (nil: `Z` itself).
private func project<T: BinaryFloatingPoint>(_ z: [T], _ w: [Float]?, batch: Int, heads: Int, m: Int, dv: Int,
                                             width: Int) -> [T] {
    guard let w else { return z }
    var out = [T](repeating: 0, count: batch * heads * m * width)
    for b in 0..<batch { for h in 0..<heads { for r in 0..<m { for x in 0..<width {
        var sum: T = 0
        for y in 0..<dv { sum += z[((b * heads + h) * m + r) * dv + y] * T(w[(h * dv + y) * width + x]) }
        out[((b * heads + h) * m + r) * width + x] = sum
    } } } }
    return out
}

@Suite("Set Transformer attention (ISAB, PMA)")
struct SetAttentionTests {
    static let cases: [(m: Int, nq: Int, nk: Int, d: Int, dv: Int, projected: Bool)] = [
        (4, 37, 53, 3, 3, false), (1, 20, 20, 1, 1, false), (32, 100, 300, 16, 16, false),
        (7, 65, 40, 8, 5, true), (40, 33, 30, 65, 65, true), (32, 200, 129, 64, 32, true),
    ]

    func checkISAB(m: Int, batch: Int = 1, heads: Int, kvHeads: Int, nq: Int, nk: Int, d: Int, dv: Int,
                   projected: Bool, keyLengths: [Int]? = nil, threads: Int? = nil, seed: UInt64, _ label: String,
                   sourceLocation: SourceLocation = #_sourceLocation) throws {
        let (q, k, v) = try randomQKV(batch: batch, heads: heads, kvHeads: kvHeads, queryLength: nq, keyLength: nk,
                                      headDim: d, valueDim: dv, seed: seed)
        let points = try randomTensor([1, heads, m, d], seed: seed + 10).elements
        let wk = projected ? try randomTensor([1, heads, dv, d], seed: seed + 11, in: -0.5...0.5).elements : nil
        let wv = projected ? try randomTensor([1, heads, dv, dv], seed: seed + 12, in: -0.5...0.5).elements : nil
        let isab = try InducedSetAttention(heads: heads, headDim: d, inducingPoints: points,
                                           keyProjection: wk, valueProjection: wv)
        let result = try isab.attend(query: q, key: k, value: v, keyLengths: keyLengths, threads: threads)

        let inducing = try pointQueries(points, batch: batch, heads: heads, m: m, d: d)
        let padding = keyLengths.map { Visible.keyPadding($0) } ?? Visible.all
        let z = referenceAttention(query: inducing, key: k, value: v, scale: defaultScale(headDim: d), visible: padding)
        let zFloat = naiveFloatAttention(query: inducing, key: k, value: v, scale: 1 / Float(d).squareRoot(), visible: padding)
        let hasKeys: Visibility = { b, _, _, _ in (keyLengths?[b] ?? nk) > 0 }
        let reference = referenceAttention(
            query: q, keys: project(z.output, wk, batch: batch, heads: heads, m: m, dv: dv, width: d),
            values: project(z.output, wv, batch: batch, heads: heads, m: m, dv: dv, width: dv),
            kvHeads: heads, nc: m, dv: dv, visible: hasKeys)
        let naive = naiveFloatAttention(
            query: q,
            key: try Tensor(shape: [batch, heads, m, d],
                            data: project(zFloat.output, wk, batch: batch, heads: heads, m: m, dv: dv, width: d)),
            value: try Tensor(shape: [batch, heads, m, dv],
                              data: project(zFloat.output, wv, batch: batch, heads: heads, m: m, dv: dv, width: dv)),
            scale: 1 / Float(d).squareRoot(), visible: hasKeys)
        checkAttention(result, reference: reference, naive: naive, label, sourceLocation: sourceLocation)
    }

    @Test("ISAB matches the reference", arguments: cases.indices)
    func isab(_ index: Int) throws {
        let c = SetAttentionTests.cases[index]
        try checkISAB(m: c.m, heads: 2, kvHeads: 1, nq: c.nq, nk: c.nk, d: c.d, dv: c.dv, projected: c.projected,
                      seed: 5000 + UInt64(index), "isab \(c)")
    }

    @Test("ISAB: key padding, batches, grouped heads, an empty set")
    func isabPadding() throws {
        for projected in [false, true] {
            try checkISAB(m: 5, batch: 3, heads: 4, kvHeads: 2, nq: 30, nk: 44, d: 8, dv: 8, projected: projected,
                          keyLengths: [44, 0, 17], threads: 2, seed: 5100, "isab padded, projected \(projected)")
        }
    }

    @Test("ISAB with the keys as inducing points is two dense attentions")
    func isabTwoDense() throws {
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 50, keyLength: 40, headDim: 16, seed: 5200)
        let isab = try InducedSetAttention(heads: 2, headDim: 16, inducingPoints: k.elements)
        let result = try isab.attend(query: q, key: k, value: v, keyLengths: nil, threads: 2)
        let dense = DenseAttention()
        let z = try dense.attend(query: k, key: k, value: v, keyLengths: nil, threads: 2)
        let expected = try dense.attend(query: q, key: z.output, value: z.output, keyLengths: nil, threads: 2)
        expectBitwiseEqual(result, expected, "isab (I = K) vs dense(Q, Z, Z) with Z = dense(K, K, V)")
    }

    @Test("PMA matches the reference; one seed is a one-query dense call")
    func pma() throws {
        for (k, nk, d, dv, lengths) in [(1, 50, 8, 8, nil), (4, 37, 3, 5, [37, 0, 12]), (16, 300, 65, 64, [1, 300, 299])] as [(Int, Int, Int, Int, [Int]?)] {
            let batch = lengths?.count ?? 1
            let (_, key, value) = try randomQKV(batch: batch, heads: 4, kvHeads: 2, queryLength: 1, keyLength: nk,
                                                headDim: d, valueDim: dv, seed: 5300 + UInt64(k))
            let seeds = try randomTensor([1, 4, k, d], seed: 5310 + UInt64(k)).elements
            let pma = try AttentionPooling(heads: 4, headDim: d, seeds: seeds)
            let pooled = try pma.pool(key: key, value: value, keyLengths: lengths, threads: 3)
            let queries = try pointQueries(seeds, batch: batch, heads: 4, m: k, d: d)
            let visible = lengths.map { Visible.keyPadding($0) } ?? Visible.all
            let reference = referenceAttention(query: queries, key: key, value: value, scale: defaultScale(headDim: d), visible: visible)
            let naive = naiveFloatAttention(query: queries, key: key, value: value, scale: 1 / Float(d).squareRoot(), visible: visible)
            checkAttention(pooled, reference: reference, naive: naive, "pma k \(k) Nk \(nk)")
            // Through the protocol, the query tensor only gives the shape.
            let viaProtocol = try pma.attend(query: try Tensor(shape: [batch, 4, k, d], repeating: .nan), key: key, value: value,
                                             keyLengths: lengths, threads: 1)
            expectBitwiseEqual(viaProtocol, pooled, "pma attend vs pool")
            if k == 1 {
                let dense = try DenseAttention().attend(query: queries, key: key, value: value, keyLengths: lengths, threads: 2)
                // One query: dense runs the decode kernel (another summation order).
                expectClose(pooled, dense, "pma one seed vs dense")
            }
        }
    }

    @Test("thread counts give the same bits")
    func determinism() throws {
        let (q, k, v) = try randomQKV(batch: 2, heads: 4, kvHeads: 2, queryLength: 500, keyLength: 700, headDim: 32, seed: 5400)
        let w = try randomTensor([1, 4, 32, 32], seed: 5401, in: -0.3...0.3).elements
        let isab = try InducedSetAttention(heads: 4, headDim: 32, inducingPoints: try randomTensor([1, 4, 32, 32], seed: 5402).elements,
                                           keyProjection: w, valueProjection: w)
        let pma = try AttentionPooling(heads: 4, headDim: 32, seedCount: 3, seed: 9)
        let one = try isab.attend(query: q, key: k, value: v, keyLengths: [700, 300], threads: 1)
        let pooledOne = try pma.pool(key: k, value: v, keyLengths: [700, 300], threads: 1)
        for threads in [2, 3, 7] {
            expectBitwiseEqual(one, try isab.attend(query: q, key: k, value: v, keyLengths: [700, 300], threads: threads),
                               "isab threads \(threads)")
            expectBitwiseEqual(pooledOne, try pma.pool(key: k, value: v, keyLengths: [700, 300], threads: threads),
                               "pma threads \(threads)")
        }
        let seeded = try InducedSetAttention(heads: 2, headDim: 64, seed: 3)
        let again = try InducedSetAttention(heads: 2, headDim: 64, seed: 3)
        #expect(seeded.inducingCount == 32 && seeded.inducingPoints == again.inducingPoints)
        try checkReadsOnlyAddressedElements(seeded, heads: 2, queryLength: 70, keyLength: 90, "isab")
    }

    @Test("cost counts both attentions and the projections")
    func cost() throws {
        let shape = AttentionShape(batch: 2, heads: 4, kvHeads: 2, queryLength: 100, keyLength: 300, headDim: 8)
        let isab = try InducedSetAttention(heads: 4, headDim: 8, inducingCount: 5)
        let c = try isab.cost(shape, threads: 2)
        #expect(c.scoredPairs == 2 * 4 * (5 * 300 + 100 * 5))
        #expect(c.flops == 2 * Double(c.scoredPairs) * 16)
        let w = [Float](repeating: 0, count: 4 * 64)
        let projected = try InducedSetAttention(heads: 4, headDim: 8, inducingPoints: isab.inducingPoints,
                                                keyProjection: w, valueProjection: w).cost(shape, threads: 2)
        #expect(projected.flops == c.flops + 2 * 2 * 4 * 5 * 8 * 16)
        let pma = try AttentionPooling(heads: 4, headDim: 8, seedCount: 2)
        var pooled = shape
        pooled.queryLength = 2
        let pooledCost = try pma.cost(pooled, threads: 1)
        #expect(pooledCost.scoredPairs == 2 * 4 * 2 * 300)
    }

    @Test("bad configurations throw")
    func errors() throws {
        expectAttentionError(.invalidParameter, mentioning: ["inducing points", "at least 1"]) {
            try InducedSetAttention(heads: 2, headDim: 4, inducingCount: 0)
        }
        expectAttentionError(.shapeMismatch, mentioning: ["inducingPoints", "[H 2, m, D 4]"]) {
            try InducedSetAttention(heads: 2, headDim: 4, inducingPoints: [1, 2, 3])
        }
        expectAttentionError(.invalidParameter, mentioning: ["inducingPoints[1]", "finite"]) {
            try InducedSetAttention(heads: 1, headDim: 2, inducingPoints: [1, .nan])
        }
        expectAttentionError(.invalidParameter, mentioning: ["together"]) {
            try InducedSetAttention(heads: 1, headDim: 2, inducingPoints: [1, 2], keyProjection: [1, 0, 0, 1])
        }
        expectAttentionError(.shapeMismatch, mentioning: ["valueProjection", "[H 1, Dv 2, Dv 2]"]) {
            try InducedSetAttention(heads: 1, headDim: 2, inducingPoints: [1, 2], keyProjection: [1, 0, 0, 1], valueProjection: [1])
        }
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 6, headDim: 4, valueDim: 3, seed: 5500)
        let isab = try InducedSetAttention(heads: 2, headDim: 4, inducingCount: 3)
        expectAttentionError(.shapeMismatch, mentioning: ["valueDim == headDim"]) { try isab.attend(query: q, key: k, value: v) }
        var causal = isab
        causal.causal = true
        let (q4, k4, v4) = try randomQKV(heads: 2, queryLength: 6, headDim: 4, seed: 5501)
        expectAttentionError(.unsupported, mentioning: ["causal"]) { try causal.attend(query: q4, key: k4, value: v4) }
        let (q8, k8, v8) = try randomQKV(heads: 3, queryLength: 6, headDim: 4, seed: 5502)
        expectAttentionError(.shapeMismatch, mentioning: ["heads 2", "heads 3"]) { try isab.attend(query: q8, key: k8, value: v8) }
        let pma = try AttentionPooling(heads: 2, headDim: 4, seedCount: 2)
        expectAttentionError(.shapeMismatch, mentioning: ["queryLength must be 2", "got 6"]) { try pma.attend(query: q4, key: k4, value: v4) }
        expectAttentionError(.invalidParameter, mentioning: ["seeds", "at least 1"]) { try AttentionPooling(heads: 2, headDim: 4, seedCount: 0) }
    }
}
