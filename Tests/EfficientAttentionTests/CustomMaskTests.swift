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

/// A per-head, position-dependent score function written lane by lane (the default vector form).
struct TiltScore: ScoreFunction {
    var slope: Float
    func score(_ s: Float, batch: Int, head: Int, query: Int, key: Int) -> Float {
        s * (1 + 0.25 * Float(batch)) - slope * Float(head + 1) * Float(abs(query - key))
    }
}

/// The same function with its own vector form.
struct VectorTiltScore: ScoreFunction {
    var slope: Float
    func score(_ s: Float, batch: Int, head: Int, query: Int, key: Int) -> Float {
        TiltScore(slope: slope).score(s, batch: batch, head: head, query: query, key: key)
    }
    func scores(_ s: SIMD16<Float>, batch: Int, head: Int, queries: SIMD16<Int32>, key: Int) -> SIMD16<Float> {
        var distance = SIMD16<Float>()
        for l in 0..<16 { distance[l] = Float(abs(Int(queries[l]) - key)) }
        return s * (1 + 0.25 * Float(batch)) - slope * Float(head + 1) * distance
    }
}

/// Adds `table[i · keyLength + j]`: an additive bias as a score function.
struct TableScore: ScoreFunction {
    var table: [Float]
    var keyLength: Int
    func score(_ s: Float, batch: Int, head: Int, query: Int, key: Int) -> Float { s + table[query * keyLength + key] }
}

/// Hides key `j` from query `i` when `j > i` by returning `−∞`.
struct CausalScore: ScoreFunction {
    func score(_ s: Float, batch: Int, head: Int, query: Int, key: Int) -> Float { key > query ? -.infinity : s }
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

    /// DocumentMask masks 16 lanes at a time (its own hiddenLanes): it must agree with its
    /// isVisible and with the built-in rules.
    @Test("DocumentMask's vector form: one causal document equals built-in causal; documents of 45 match the reference")
    func documentMaskVectorForm() throws {
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 200, headDim: 16, seed: 21)
        let causal = CustomMaskAttention(predicate: try DocumentMask(length: 200, causal: true))
        expectBitwiseEqual(try causal.attend(query: q, key: k, value: v, keyLengths: nil, threads: 3),
                           try DenseAttention(causal: true).attend(query: q, key: k, value: v, keyLengths: nil, threads: 3),
                           "one causal document")
        for isCausal in [false, true] {
            let mask = try DocumentMask(length: 45, causal: isCausal)
            try checkAgainstReference(CustomMaskAttention(predicate: mask), query: q, key: k, value: v, scale: nil,
                                      visible: { _, _, i, j in mask.isVisible(batch: 0, head: 0, query: i, key: j) },
                                      "documents of 45, causal \(isCausal)")
        }
        #expect(thrownAttentionError { try DocumentMask(length: 0) }?.message.contains("length") == true)
    }

    @Test("a score function (FlexAttention's score_mod) against the Double reference: with a predicate, key padding, Nq != Nk, grouped heads, modifiers")
    func scoreFunction() throws {
        for (nq, nk, d, lengths) in [(150, 170, 65, [170, 90]), (33, 33, 1, nil), (200, 129, 3, [0, 129])]
            as [(Int, Int, Int, [Int]?)] {
            let batch = lengths?.count ?? 1
            let (q, k, v) = try randomQKV(batch: batch, heads: 4, kvHeads: 2, queryLength: nq, keyLength: nk,
                                          headDim: d, valueDim: 7, seed: 31)
            let tilt = TiltScore(slope: 0.05)
            let function: (Double, Int, Int, Int, Int) -> Double = { s, b, h, i, j in
                s * (1 + 0.25 * Double(b)) - Double(Float(0.05) * Float(h + 1)) * Double(abs(i - j))
            }
            let predicate = ScatteredPredicate(seed: 4)
            let end = lengths ?? [nk]
            var masked = CustomMaskAttention(predicate: predicate, score: tilt)
            ScoreModifierTests.check(
                try masked.attend(query: q, key: k, value: v, keyLengths: lengths, threads: 3),
                modifiedReference(query: q, key: k, value: v,
                                  visible: { b, h, i, j in predicate.isVisible(batch: b, head: h, query: i, key: j)
                                      && j < end[b] },
                                  modifiers: ScoreModifiers(), score: function), "tilt, scattered, Nq \(nq) Nk \(nk) D \(d)")
            masked.modifiers = ScoreModifiers(softCap: 2, alibiSlopes: ScoreModifiers.standardALiBiSlopes(heads: 4))
            ScoreModifierTests.check(
                try masked.attend(query: q, key: k, value: v, keyLengths: lengths, threads: 2),
                modifiedReference(query: q, key: k, value: v,
                                  visible: { b, h, i, j in predicate.isVisible(batch: b, head: h, query: i, key: j)
                                      && j < end[b] },
                                  modifiers: masked.modifiers, score: function), "tilt then modifiers, Nq \(nq) Nk \(nk)")
            // The vector form agrees with the lane-by-lane default, bitwise, for any thread count.
            let everywhere = CustomMaskAttention(score: tilt)
            let vector = try CustomMaskAttention(score: VectorTiltScore(slope: 0.05))
                .attend(query: q, key: k, value: v, keyLengths: lengths, threads: 1)
            for threads in [1, 3] {
                expectBitwiseEqual(try everywhere.attend(query: q, key: k, value: v, keyLengths: lengths, threads: threads),
                                   vector, "vector form, threads \(threads)")
            }
        }
    }

    @Test("score functions: identity over every pair equals dense, a table equals the bias modifier, −∞ hides pairs")
    func scoreFunctionEquivalences() throws {
        let (nq, nk) = (140, 150)
        let (q, k, v) = try randomQKV(heads: 2, queryLength: nq, keyLength: nk, headDim: 16, seed: 41)
        expectBitwiseEqual(try CustomMaskAttention(predicate: AllVisible()).attend(query: q, key: k, value: v, threads: 2),
                           try DenseAttention().attend(query: q, key: k, value: v, threads: 2), "identity")
        let table = try randomTensor([1, 1, nq, nk], seed: 9).elements
        var bias = DenseAttention()
        bias.modifiers = ScoreModifiers(bias: try Tensor(shape: [1, 1, nq, nk], data: table))
        expectBitwiseEqual(try CustomMaskAttention(score: TableScore(table: table, keyLength: nk))
                            .attend(query: q, key: k, value: v, keyLengths: [120], threads: 3),
                           try bias.attend(query: q, key: k, value: v, keyLengths: [120], threads: 3), "table = bias")
        let hidden = try CustomMaskAttention(score: CausalScore()).attend(query: q, key: k, value: v, threads: 2)
        ScoreModifierTests.check(hidden, modifiedReference(query: q, key: k, value: v, visible: { _, _, i, j in j <= i },
                                                           modifiers: ScoreModifiers()), "−∞ hides")
        // A row whose every pair the function hides gives 0 with lse −∞ (keys all past the row).
        let allHidden = try CustomMaskAttention(score: CausalScore())
            .attend(query: q, key: k, value: v, keyLengths: [0], threads: 1)
        #expect(allHidden.output.elements.allSatisfy { $0 == 0 })
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
