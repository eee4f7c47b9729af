import Testing
import EfficientAttention

/// Conformers whose output is allocated without a zero fill (the fixed patterns, Linformer,
/// linear attention, LSH) must write every element themselves, including the rows of a batch
/// item that sees no key. In a fresh process the allocator often hands out zeroed pages,
/// which would hide a missed row; these tests first leave blocks full of NaN in the heap,
/// so that the output is likely to reuse them, and compare with a run after zeros.
@Suite("Outputs allocated without a zero fill")
struct UninitializedOutputTests {
    /// Leaves two blocks of each size from 1 KiB to 4 MiB, filled with `value`, free in this
    /// thread's heap; returns the sum of their middle elements (read, so the blocks are
    /// really allocated and written). Nothing is shared between tests running in parallel.
    @inline(never)
    static func fillHeap(with value: Float) -> Float {
        var blocks: [[Float]] = []
        var bytes = 1 << 10
        while bytes <= 4 << 20 {
            for _ in 0..<2 { blocks.append([Float](repeating: value, count: bytes / 4)) }
            bytes *= 2
        }
        return blocks.reduce(0) { $0 + $1[$1.count / 2] }
    }

    static func runAfter(_ value: Float, _ attention: some Attention, query: Tensor, key: Tensor, value v: Tensor,
                         keyLengths: [Int]?) throws -> AttentionResult {
        let filled = fillHeap(with: value)
        #expect(filled.isNaN == value.isNaN)
        return try attention.attend(query: query, key: key, value: v, keyLengths: keyLengths, threads: 2)
    }

    static func check(_ attention: some Attention, keyLengths: [Int]? = [70, 0, 31], _ label: String) throws {
        let (q, k, v) = try randomQKV(batch: 3, heads: 2, queryLength: 70, headDim: 16, seed: 7100)
        let dirty = try runAfter(.nan, attention, query: q, key: k, value: v, keyLengths: keyLengths)
        let clean = try runAfter(0, attention, query: q, key: k, value: v, keyLengths: keyLengths)
        #expect(!dirty.output.elements.contains { $0.isNaN }, "\(label): NaN left in the output")
        #expect(!dirty.logSumExp.elements.contains { $0.isNaN }, "\(label): NaN left in the log-sum-exp")
        expectBitwiseEqual(dirty, clean, "\(label): output depends on the heap's leftovers")
        if let keyLengths, let empty = keyLengths.firstIndex(of: 0) {
            // Batch item `empty` sees no key: every row is 0 with a log-sum-exp of -infinity.
            let perItem = dirty.output.elements.count / 3, lsePerItem = dirty.logSumExp.elements.count / 3
            #expect(dirty.output.elements[empty * perItem ..< (empty + 1) * perItem].allSatisfy { $0 == 0 },
                    "\(label): rows with no visible key are not 0")
            #expect(dirty.logSumExp.elements[empty * lsePerItem ..< (empty + 1) * lsePerItem]
                .allSatisfy { $0 == -.infinity }, "\(label): log-sum-exp of rows with no visible key")
        }
    }

    @Test func fixedPatterns() throws {
        try Self.check(LocalAttention(left: 5, right: 3), "local window")
        try Self.check(LocalAttention(blockSize: 16, causal: true), "local blocked causal")
        try Self.check(StridedAttention(stride: 9), "strided")
        try Self.check(StridedAttention(kind: .fixed(summary: 2), stride: 9, causal: true), "fixed causal")
        try Self.check(LongformerAttention(window: 8, dilations: [1, 2], globalPositions: [0, 40]), "longformer")
        try Self.check(BigBirdAttention(blockSize: 8, randomBlockCount: 2, seed: 3), "bigbird")
    }

    @Test func linformerAndLinear() throws {
        try Self.check(LinformerAttention(projectedLength: 12, maxSequenceLength: 70, seed: 5),
                       keyLengths: nil, "linformer")
        try Self.check(LinearAttention(featureMap: EluPlusOneFeatures()), "linear-elu")
        try Self.check(LinearAttention(featureMap: EluPlusOneFeatures(), causal: true), "linear-elu causal")
    }

    @Test func lsh() throws {
        try Self.check(LSHAttention(bucketSize: 8, hashes: 2, seed: 3), "lsh shared QK")
        try Self.check(LSHAttention(bucketSize: 8, hashes: 3, sharedQK: false, causal: true, seed: 3),
                       "lsh separate keys causal")
    }
}
