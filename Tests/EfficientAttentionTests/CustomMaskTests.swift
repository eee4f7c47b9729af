// Custom visibility predicates (issue 17): a predicate reproducing causal equals built-in
// causal bitwise; a document mask equals separate calls per document; arbitrary and
// per-head predicates against the Double reference; the block mask skips what it hides.

@_spi(Testing) import EfficientAttention
import Testing

/// Bottom-right aligned causal, as a predicate.
struct CausalPredicate: VisibilityPredicate {
    var offset: Int
    func isVisible(batch: Int, head: Int, query: Int, key: Int) -> Bool { key <= query + offset }
}

/// Documents of `length` positions: a query sees the keys of its own document.
struct DocumentPredicate: VisibilityPredicate {
    var length: Int
    func isVisible(batch: Int, head: Int, query: Int, key: Int) -> Bool { query / length == key / length }
}

/// A scattered rule that differs by head and batch item.
struct ScatteredPredicate: VisibilityPredicate {
    var seed: Int
    var variesByHead: Bool { true }
    func isVisible(batch: Int, head: Int, query: Int, key: Int) -> Bool {
        var x = UInt64(truncatingIfNeeded: ((batch * 31 + head) * 1009 + query) * 4099 + key + seed)
        x = (x ^ (x >> 29)) &* 0xBF58_476D_1CE4_E5B9
        return (x ^ (x >> 32)) % 5 < 2 || key == query % 7
    }
}

@Suite("Custom visibility predicates")
struct CustomMaskTests {
    @Test("a causal predicate equals built-in causal bitwise (Nq != Nk, key padding, grouped heads, 1 and 3 threads)")
    func causalEqualsBuiltIn() throws {
        for (nq, nk, lengths) in [(200, 200, nil), (70, 333, [333, 100]), (129, 129, [0, 64])] as [(Int, Int, [Int]?)] {
            let batch = lengths?.count ?? 1
            let (q, k, v) = try randomQKV(batch: batch, heads: 4, kvHeads: 2, queryLength: nq, keyLength: nk,
                                          headDim: 33, seed: 5)
            let custom = CustomMaskAttention(predicate: CausalPredicate(offset: nk - nq))
            let builtIn = DenseAttention(causal: true)
            for threads in [1, 3] {
                expectBitwiseEqual(try custom.attend(query: q, key: k, value: v, keyLengths: lengths, threads: threads),
                                   try builtIn.attend(query: q, key: k, value: v, keyLengths: lengths, threads: threads),
                                   "Nq \(nq) Nk \(nk) threads \(threads)")
            }
            let cost = try custom.cost(AttentionShape(batch: batch, heads: 4, kvHeads: 2, queryLength: nq, keyLength: nk,
                                                      headDim: 33))
            let dense = try DenseAttention().cost(AttentionShape(batch: batch, heads: 4, kvHeads: 2, queryLength: nq,
                                                                 keyLength: nk, headDim: 33))
            // The block mask skips the tiles above the diagonal (with one query tile, none is).
            #expect(nq == nk ? cost.scoredPairs < dense.scoredPairs : cost.scoredPairs <= dense.scoredPairs)
        }
    }

    @Test("a document mask equals separate calls per document; its cost is the documents' blocks")
    func documents() throws {
        let length = 128, documents = 4, n = length * documents
        let (q, k, v) = try randomQKV(heads: 2, queryLength: n, headDim: 16, seed: 8)
        let custom = CustomMaskAttention(predicate: DocumentPredicate(length: length))
        let whole = try custom.attend(query: q, key: k, value: v, threads: 2)
        let sequences = try PackedSequences(lengths: Array(repeating: length, count: documents))
        let separate = try DenseAttention().attend(query: q, key: k, value: v, sequences: sequences, threads: 2)
        expectBitwiseEqual(whole, separate, "documents of \(length)")
        let shape = AttentionShape(heads: 2, queryLength: n, headDim: 16)
        #expect(try custom.cost(shape).scoredPairs == 2 * documents * length * length)
        // Documents not aligned with tiles: against the reference.
        try checkAgainstReference(CustomMaskAttention(predicate: DocumentPredicate(length: 45)), query: q, key: k,
                                  value: v, scale: nil, visible: { _, _, i, j in i / 45 == j / 45 }, "documents of 45")
    }

    @Test("a predicate varying by head and batch item, against the Double reference, with modifiers")
    func scattered() throws {
        let (q, k, v) = try randomQKV(batch: 2, heads: 4, kvHeads: 2, queryLength: 150, keyLength: 170, headDim: 65,
                                      valueDim: 7, seed: 12)
        let predicate = ScatteredPredicate(seed: 3)
        let visible: Visibility = { b, h, i, j in predicate.isVisible(batch: b, head: h, query: i, key: j) && j < [170, 90][b] }
        try checkAgainstReference(CustomMaskAttention(predicate: predicate), query: q, key: k, value: v,
                                  keyLengths: [170, 90], threads: 3, scale: nil, visible: visible, "scattered")
        var modified = CustomMaskAttention(predicate: predicate)
        modified.modifiers = ScoreModifiers(softCap: 0.7, alibiSlopes: ScoreModifiers.standardALiBiSlopes(heads: 4),
                                            sinks: [0, 1, -1, 0.5])
        let result = try modified.attend(query: q, key: k, value: v, keyLengths: [170, 90], threads: 2)
        ScoreModifierTests.check(result, modifiedReference(query: q, key: k, value: v, visible: visible,
                                                           modifiers: modified.modifiers), "scattered with modifiers")
    }

    @Test("bad options throw")
    func bad() {
        let scaled = CustomMaskAttention(predicate: CausalPredicate(offset: 0), scale: .nan)
        #expect(thrownAttentionError { try scaled.cost(AttentionShape(heads: 1, queryLength: 8, headDim: 4)) }?
            .message.contains("scale") == true)
        let huge = AttentionShape(batch: 8, heads: 8, queryLength: 1 << 16, headDim: 4)
        #expect(thrownAttentionError { try CustomMaskAttention(predicate: ScatteredPredicate(seed: 0)).validate(huge) }?
            .message.contains("evaluate the predicate") == true)
    }
}
