// VanillaAttention (the benchmark's unfused baseline) against the same Double reference.

import EfficientAttention
import Foundation
import Testing

@Suite("VanillaAttention matches the reference")
struct VanillaReferenceTests {
    static let cases: [DenseCase] = numberingSeeds([
        DenseCase(queryLength: 1),
        DenseCase(queryLength: 2, causal: true),
        DenseCase(heads: 4, kvHeads: 2, queryLength: 127),
        DenseCase(heads: 4, kvHeads: 2, queryLength: 127, causal: true),
        DenseCase(heads: 1, queryLength: 777, headDim: 4, causal: true),
        DenseCase(queryLength: 17, keyLength: 300, causal: true),
        DenseCase(queryLength: 300, keyLength: 17, causal: true),
        DenseCase(queryLength: 1, keyLength: 777, headDim: 8),
        DenseCase(queryLength: 777, keyLength: 1, headDim: 8, causal: true),
        DenseCase(queryLength: 37, headDim: 199, valueDim: 128, causal: true),
        DenseCase(queryLength: 37, headDim: 3, valueDim: 65),
        DenseCase(queryLength: 20, headDim: 300, valueDim: 2),
        DenseCase(heads: 6, kvHeads: 3, queryLength: 50, keyLength: 41, headDim: 24, causal: true),
        DenseCase(heads: 4, kvHeads: 1, queryLength: 50, keyLength: 41, headDim: 24),
        DenseCase(batch: 4, queryLength: 64, keyLengths: [0, 1, 64, 23]),
        DenseCase(batch: 4, queryLength: 80, keyLength: 64, causal: true, keyLengths: [64, 10, 0, 1]),
        DenseCase(batch: 2, heads: 3, queryLength: 45, keyLength: 60, causal: true, scale: -0.5),
        DenseCase(batch: 2, heads: 3, queryLength: 45, keyLength: 60, scale: 0.05, threads: 1),
        DenseCase(batch: 3, heads: 2, queryLength: 70, keyLength: 90, keyLengths: [90, 0, 45], threads: 2),
    ], base: 2000)

    @Test("vanilla vs reference", arguments: cases)
    func matchesReference(_ c: DenseCase) throws {
        try c.check(VanillaAttention(causal: c.causal, scale: c.scale))
    }

    @Test("vanilla with NaN-padded strided inputs", arguments: [false, true])
    func nanPadded(causal: Bool) throws {
        let c = DenseCase(batch: 2, heads: 4, kvHeads: 2, queryLength: 37, keyLength: 53, headDim: 19, valueDim: 7,
                          causal: causal, keyLengths: [53, 20], seed: 2100)
        let (q, k, v) = try c.inputs()
        let attention = VanillaAttention(causal: causal)
        let contiguous = try attention.attend(query: q, key: k, value: v, keyLengths: c.keyLengths)
        let padded = try attention.attend(query: embeddedInNaN(q), key: embeddedInNaN(k), value: embeddedInNaN(v),
                                          keyLengths: c.keyLengths)
        #expect(!padded.output.elements.contains { $0.isNaN })
        expectBitwiseEqual(padded, contiguous, "vanilla NaN-padded vs contiguous")
        let interleaved = try attention.attend(query: embeddedInNaN(q, innerStride: 2),
                                               key: embeddedInNaN(k, innerStride: 3),
                                               value: embeddedInNaN(v, innerStride: 2), keyLengths: c.keyLengths)
        checkAttention(interleaved,
                       reference: referenceAttention(query: q, key: k, value: v, scale: defaultScale(headDim: 19),
                                                     visible: c.visible),
                       naive: naiveFloatAttention(query: q, key: k, value: v, scale: 1 / Float(19).squareRoot(),
                                                  visible: c.visible),
                       "vanilla inner stride 2")
    }

    @Test("vanilla: thread counts give the same bits")
    func threadCounts() throws {
        let c = DenseCase(batch: 2, heads: 3, kvHeads: 1, queryLength: 130, keyLength: 157, headDim: 40, causal: true,
                          keyLengths: [157, 60], seed: 2200)
        let (q, k, v) = try c.inputs()
        let attention = VanillaAttention(causal: true)
        let one = try attention.attend(query: q, key: k, value: v, keyLengths: c.keyLengths, threads: 1)
        for threads in [1, 2, 5, nil] as [Int?] {
            expectBitwiseEqual(one, try attention.attend(query: q, key: k, value: v, keyLengths: c.keyLengths,
                                                         threads: threads), "vanilla threads 1 vs \(String(describing: threads))")
        }
    }

    /// Dense and vanilla compute the same function: both within the reference bound, and
    /// close to each other.
    @Test("dense and vanilla agree")
    func agreesWithDense() throws {
        let c = DenseCase(batch: 2, heads: 4, kvHeads: 2, queryLength: 90, keyLength: 111, headDim: 32, valueDim: 48,
                          causal: true, keyLengths: [111, 77], seed: 2300)
        let (q, k, v) = try c.inputs()
        let dense = try DenseAttention(causal: true).attend(query: q, key: k, value: v, keyLengths: c.keyLengths)
        let vanilla = try VanillaAttention(causal: true).attend(query: q, key: k, value: v, keyLengths: c.keyLengths)
        let worst = zip(dense.output.elements, vanilla.output.elements).map { abs($0 - $1) }.max() ?? .nan
        #expect(worst < 1e-5, "dense vs vanilla max difference \(worst)")
        #expect(dense.logSumExp.shape == vanilla.logSumExp.shape)
    }
}
