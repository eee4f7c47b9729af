// MemoryCompressedAttention against a Double reference of its definition (the windows
// compressed in Double, then softmax over the compressed keys with whole-window causal
// visibility), with the naive Float path (compression in Float, naive Float attention) as
// the error yardstick: N not a multiple of c, c = 1, 2, 3, 7, odd D, Dv ≠ D, grouped
// heads, key padding, Nq ≠ Nk, mean pooling and given weights with biases; c = 1 with
// identity weights equals dense; bad configurations throw; thread counts give the same bits.

@_spi(Testing) import EfficientAttention
import Foundation
import Testing

/// Compressed keys (or values) `[B, Hkv, ⌈Nk / c⌉, w]` of `x` in precision `T`, straight
/// from the spec (windows over the first `L_b` rows; weights `[Hkv, c, w, w]` as `[out, in]`).
private func compressWindows<T: BinaryFloatingPoint>(_ x: Tensor, c: Int, weights: [Float]?, bias: [Float]?,
                                                     keyLengths: [Int]?, as _: T.Type) -> [T] {
    let (bs, hkv, nk, w) = (x.shape[0], x.shape[1], x.shape[2], x.shape[3])
    let nc = (nk + c - 1) / c
    var out = [T](repeating: 0, count: bs * hkv * nc * w)
    for b in 0..<bs {
        let length = keyLengths?[b] ?? nk
        for h in 0..<hkv {
            for t in 0..<((length + c - 1) / c) {
                let rows = (t * c)..<min(t * c + c, length)
                for o in 0..<w {
                    var sum: T = 0
                    for j in rows {
                        if let weights {
                            let r = j - t * c
                            for i in 0..<w { sum += T(weights[((h * c + r) * w + o) * w + i]) * T(x[b, h, j, i]) }
                        } else {
                            sum += T(x[b, h, j, o])
                        }
                    }
                    if weights == nil { sum /= T(rows.count) }
                    if let bias { sum += T(bias[h * w + o]) }
                    out[((b * hkv + h) * nc + t) * w + o] = sum
                }
            }
        }
    }
    return out
}

/// The compressed key `t` is visible to query `i` (whole windows when causal, padding).
private func compressedVisibility(c: Int, nq: Int, nk: Int, causal: Bool, keyLengths: [Int]?) -> Visibility {
    { b, _, i, t in
        let length = keyLengths?[b] ?? nk
        guard t < (length + c - 1) / c else { return false }
        return !causal || min((t + 1) * c, length) - 1 <= i + nk - nq
    }
}

@Suite("MemoryCompressedAttention")
struct MemoryCompressedAttentionTests {
    static let cases: [(c: Int, nq: Int, nk: Int, d: Int, dv: Int, causal: Bool, weighted: Bool)] = [
        (3, 100, 100, 3, 3, false, false), (3, 100, 100, 3, 3, true, false),
        (3, 100, 100, 8, 5, false, true), (3, 100, 100, 8, 5, true, true),
        (1, 40, 40, 1, 1, true, false), (2, 37, 37, 65, 16, true, true), (7, 50, 130, 16, 16, true, true),
        (7, 130, 50, 16, 8, true, false), (7, 130, 50, 4, 4, false, true), (200, 60, 60, 8, 8, true, false),
        (3, 300, 300, 64, 64, false, true),
    ]

    /// Checks `attention` (weights given when `weighted`) against the references.
    func check(c: Int, batch: Int = 1, heads: Int, kvHeads: Int, nq: Int, nk: Int, d: Int, dv: Int,
               causal: Bool, weighted: Bool, keyLengths: [Int]? = nil, threads: Int? = nil, seed: UInt64,
               _ label: String, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let (q, k, v) = try randomQKV(batch: batch, heads: heads, kvHeads: kvHeads, queryLength: nq, keyLength: nk,
                                      headDim: d, valueDim: dv, seed: seed)
        func draw(_ count: Int, _ s: UInt64, _ range: ClosedRange<Float>) throws -> [Float] {
            try randomTensor([1, 1, 1, count], seed: s, in: range).elements
        }
        let kw = weighted ? try draw(kvHeads * c * d * d, seed + 10, -0.5...0.5) : nil
        let vw = weighted ? try draw(kvHeads * c * dv * dv, seed + 11, -0.5...0.5) : nil
        let kb = weighted ? try draw(kvHeads * d, seed + 12, -1...1) : nil
        let vb = weighted ? try draw(kvHeads * dv, seed + 13, -1...1) : nil
        let attention = try MemoryCompressedAttention(compression: c, keyWeights: kw, valueWeights: vw,
                                                      keyBias: kb, valueBias: vb, causal: causal)
        let result = try attention.attend(query: q, key: k, value: v, keyLengths: keyLengths, threads: threads)
        let nc = (nk + c - 1) / c
        let visible = compressedVisibility(c: c, nq: nq, nk: nk, causal: causal, keyLengths: keyLengths)
        let reference = referenceAttention(query: q, keys: compressWindows(k, c: c, weights: kw, bias: kb, keyLengths: keyLengths, as: Double.self),
                                        values: compressWindows(v, c: c, weights: vw, bias: vb, keyLengths: keyLengths, as: Double.self),
                                        kvHeads: kvHeads, nc: nc, dv: dv, visible: visible)
        let floatKeys = try Tensor(shape: [batch, kvHeads, nc, d],
                                   data: compressWindows(k, c: c, weights: kw, bias: kb, keyLengths: keyLengths, as: Float.self))
        let floatValues = try Tensor(shape: [batch, kvHeads, nc, dv],
                                     data: compressWindows(v, c: c, weights: vw, bias: vb, keyLengths: keyLengths, as: Float.self))
        let naive = naiveFloatAttention(query: q, key: floatKeys, value: floatValues,
                                        scale: 1 / Float(d).squareRoot(), visible: visible)
        checkAttention(result, reference: reference, naive: naive, label, sourceLocation: sourceLocation)
    }

    @Test("matches the reference", arguments: cases.indices)
    func reference(_ index: Int) throws {
        let c = MemoryCompressedAttentionTests.cases[index]
        try check(c: c.c, heads: 2, kvHeads: 1, nq: c.nq, nk: c.nk, d: c.d, dv: c.dv, causal: c.causal,
                  weighted: c.weighted, seed: 4000 + UInt64(index), "memory-compressed \(c)")
    }

    @Test("key padding, batches and grouped heads")
    func padding() throws {
        for causal in [false, true] {
            for weighted in [false, true] {
                try check(c: 3, batch: 3, heads: 4, kvHeads: 2, nq: 70, nk: 70, d: 8, dv: 6, causal: causal,
                          weighted: weighted, keyLengths: [70, 0, 31], threads: 2, seed: 4100,
                          "memory-compressed padded causal \(causal) weighted \(weighted)")
            }
        }
    }

    @Test("c = 1 with identity weights is dense attention")
    func identity() throws {
        for causal in [false, true] {
            let (q, k, v) = try randomQKV(heads: 4, kvHeads: 2, queryLength: 90, keyLength: 150, headDim: 16, seed: 4200)
            var eye = [Float](repeating: 0, count: 2 * 16 * 16)
            for h in 0..<2 { for x in 0..<16 { eye[(h * 16 + x) * 16 + x] = 1 } }
            let weighted = try MemoryCompressedAttention(compression: 1, keyWeights: eye, valueWeights: eye, causal: causal)
            let pooled = try MemoryCompressedAttention(compression: 1, causal: causal)
            let dense = try DenseAttention(causal: causal).attend(query: q, key: k, value: v, keyLengths: nil, threads: 2)
            expectBitwiseEqual(try weighted.attend(query: q, key: k, value: v, keyLengths: nil, threads: 2), dense,
                               "c = 1, identity weights, causal \(causal) vs dense")
            expectBitwiseEqual(try pooled.attend(query: q, key: k, value: v, keyLengths: nil, threads: 2), dense,
                               "c = 1, mean pooling, causal \(causal) vs dense")
        }
    }

    @Test("thread counts give the same bits")
    func determinism() throws {
        let (q, k, v) = try randomQKV(batch: 2, heads: 4, kvHeads: 2, queryLength: 700, headDim: 64, seed: 4300)
        let weights = try randomTensor([1, 1, 1, 2 * 3 * 64 * 64], seed: 4301, in: -0.2...0.2).elements
        for causal in [false, true] {
            for w in [nil, weights] {
                let attention = try MemoryCompressedAttention(keyWeights: w, valueWeights: w, causal: causal)
                let one = try attention.attend(query: q, key: k, value: v, keyLengths: [700, 500], threads: 1)
                for threads in [2, 3, 7] {
                    let other = try attention.attend(query: q, key: k, value: v, keyLengths: [700, 500], threads: threads)
                    expectBitwiseEqual(one, other, "memory-compressed causal \(causal) weights \(w != nil) threads \(threads)")
                }
            }
        }
        try checkReadsOnlyAddressedElements(try MemoryCompressedAttention(causal: true), heads: 2, queryLength: 100,
                                            "memory-compressed")
    }

    @Test("cost counts the scored pairs and the convolution")
    func cost() throws {
        let shape = AttentionShape(batch: 2, heads: 4, kvHeads: 2, queryLength: 10, headDim: 8)
        let pooled = try MemoryCompressedAttention().cost(shape, threads: 1)
        #expect(pooled.scoredPairs == 2 * 4 * 10 * 4)
        #expect(pooled.flops == 2 * 2 * (10 * 8 + 10 * 8) + 2 * Double(pooled.scoredPairs) * 16)
        // Causal, c = 3, N = 10: windows end at 2, 5, 8, 9; query i sees ⌊(i + 1) / 3⌋, all 4 at i = 9.
        let causal = try MemoryCompressedAttention(causal: true).cost(shape, threads: 1)
        #expect(causal.scoredPairs == 2 * 4 * (0 + 0 + 1 + 1 + 1 + 2 + 2 + 2 + 3 + 4))
        // The closed form against a count of the causal rule (whole windows), Nq ≷ Nk.
        for (nq, nk, c) in [(10, 10, 3), (7, 20, 3), (20, 7, 4), (33, 33, 1), (5, 100, 9), (100, 5, 2), (64, 65, 8)] {
            var count = 0
            for i in 0..<nq {
                for t in 0..<((nk + c - 1) / c) where min((t + 1) * c, nk) - 1 <= i + nk - nq { count += 1 }
            }
            let s = AttentionShape(heads: 1, queryLength: nq, keyLength: nk, headDim: 4)
            let pairs = try MemoryCompressedAttention(compression: c, causal: true).cost(s, threads: 1).scoredPairs
            #expect(pairs == count, "Nq \(nq) Nk \(nk) c \(c): cost \(pairs), rule \(count)")
        }
        let w = [Float](repeating: 0, count: 2 * 3 * 64)
        let weighted = try MemoryCompressedAttention(keyWeights: w, valueWeights: w).cost(shape, threads: 1)
        #expect(weighted.flops == 2 * 2 * (2 * 10 * 64 * 2) + 2 * Double(pooled.scoredPairs) * 16)
    }

    @Test("bad configurations throw")
    func errors() throws {
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 12, headDim: 4, seed: 4400)
        expectAttentionError(.invalidParameter, mentioning: ["compression", "at least 1"]) {
            try MemoryCompressedAttention(compression: 0).attend(query: q, key: k, value: v)
        }
        expectAttentionError(.invalidParameter, mentioning: ["compression", "at most"]) {
            try MemoryCompressedAttention(compression: 1 << 40).attend(query: q, key: k, value: v)
        }
        expectAttentionError(.shapeMismatch, mentioning: ["keyWeights", "[Hkv, c, D, D]"]) {
            try MemoryCompressedAttention(keyWeights: [Float](repeating: 0, count: 5)).attend(query: q, key: k, value: v)
        }
        expectAttentionError(.shapeMismatch, mentioning: ["valueBias", "[Hkv, Dv]"]) {
            try MemoryCompressedAttention(valueBias: [1, 2, 3]).attend(query: q, key: k, value: v)
        }
        expectAttentionError(.invalidParameter, mentioning: ["valueWeights[2]", "finite"]) {
            try MemoryCompressedAttention(valueWeights: [0, 0, .nan] + [Float](repeating: 0, count: 93))
        }
        expectAttentionError(.invalidParameter, mentioning: ["scale"]) {
            try MemoryCompressedAttention(scale: .infinity).attend(query: q, key: k, value: v)
        }
    }
}
