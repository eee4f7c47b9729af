// LongformerAttention against the Double reference with the pattern's dense mask:
// windows not dividing N, windows larger than N, window 0, per-head dilations, global
// positions at the start, middle and end (and none), Nq != Nk, causal and not, key
// padding, bad configurations, determinism across thread counts.

import EfficientAttention
import Testing

@Suite("LongformerAttention")
struct LongformerAttentionTests {
    static let cases: [(w: Int, dil: [Int], g: [Int], nq: Int, nk: Int, d: Int, causal: Bool)] = [
        (8, [1], [], 100, 100, 3, false), (8, [1], [], 100, 100, 3, true),
        (10, [1, 2, 3], [0], 157, 157, 16, false), (10, [1, 2, 3], [0], 157, 157, 16, true),
        (6, [2, 5, 1], [0, 1, 2, 77, 78, 156], 157, 157, 65, false),
        (6, [2, 5, 1], [0, 1, 2, 77, 78, 156], 157, 157, 64, true),
        (300, [1, 1, 1], [5], 150, 150, 8, false),     // window larger than N
        (0, [1, 3, 2], [40], 90, 90, 8, false), (0, [1, 3, 2], [40], 90, 90, 8, true),
        (20, [3, 1, 2], [0, 199], 60, 200, 8, false), (20, [3, 1, 2], [0, 199], 60, 200, 8, true),
        (12, [2, 1, 4], [3, 50], 200, 60, 8, true), (128, [1, 2, 3], [0, 64, 65, 66, 299], 300, 300, 1, false),
    ]

    @Test("matches the reference", arguments: cases.indices)
    func reference(_ n: Int) throws {
        let c = LongformerAttentionTests.cases[n]
        let attention = LongformerAttention(window: c.w, dilations: c.dil, globalPositions: c.g, causal: c.causal)
        let pattern = try attention.pattern(for: AttentionShape(heads: 3, queryLength: c.nq, keyLength: c.nk, headDim: c.d))
        checkPatternConsistency(pattern, "longformer \(c)")
        checkPatternMatchesSpec(pattern, "longformer \(c)") { h, p, j in
            if c.causal && j > p { return false }
            if c.g.contains(p) || c.g.contains(j) { return true }
            let delta = c.dil.count == 1 ? c.dil[0] : c.dil[h], d = j - p
            guard d % delta == 0 else { return false }
            let t = d / delta
            return c.causal ? (t >= -c.w && t <= 0) : abs(t) <= c.w / 2
        }
        try checkPatternAttention(attention, pattern: pattern, heads: 3, headDim: c.d,
                                  seed: 3000 + UInt64(n), "longformer \(c)")
    }

    @Test("a window covering everything equals dense; global rows see every key")
    func edges() throws {
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 70, headDim: 16, seed: 3100)
        for causal in [false, true] {
            let wide = try LongformerAttention(window: 200, causal: causal).attend(query: q, key: k, value: v, threads: 1)
            let dense = try DenseAttention(causal: causal).attend(query: q, key: k, value: v, threads: 1)
            expectBitwiseEqual(wide, dense, "window >= 2N vs dense (causal \(causal))")
        }
        // Every position global: dense attention again (pass 0 gives the window, pass 1 the rest).
        let everyone = LongformerAttention(window: 4, dilations: [3], globalPositions: Array(0..<70))
        let pattern = try everyone.pattern(for: AttentionShape(heads: 2, queryLength: 70, headDim: 16))
        #expect(pattern.scoredPairs == 2 * 70 * 70)
        try checkAgainstReference(everyone, query: q, key: k, value: v, scale: nil, visible: Visible.all, "all global")
    }

    /// The plan is cached by settings and shape: a copy with other global positions,
    /// dilations or window, or another length, never reuses another call's plan.
    @Test("a cached plan is reused only for the same settings and shape")
    func planCache() throws {
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 70, headDim: 16, seed: 3101)
        var attention = LongformerAttention(window: 8, globalPositions: [0])
        _ = try attention.attend(query: q, key: k, value: v, threads: 1)
        for change in 0..<3 {
            switch change {
            case 0: attention.globalPositions = [5, 6]
            case 1: attention.dilations = [2]
            default: attention.window = 12
            }
            let cached = try attention.attend(query: q, key: k, value: v, threads: 1)
            let fresh = try LongformerAttention(window: attention.window, dilations: attention.dilations,
                                                globalPositions: attention.globalPositions)
                .attend(query: q, key: k, value: v, threads: 1)
            expectBitwiseEqual(cached, fresh, "after change \(change)")
        }
        let (q2, k2, v2) = try randomQKV(heads: 2, queryLength: 40, headDim: 16, seed: 3102)
        let shorter = try attention.attend(query: q2, key: k2, value: v2, threads: 1)
        try checkAgainstReference(attention, query: q2, key: k2, value: v2, scale: nil,
                                  visible: patternVisibility(try attention.pattern(for: AttentionShape(heads: 2, queryLength: 40, headDim: 16))),
                                  "shorter after longer")
        _ = shorter
    }

    @Test("key padding, batches and grouped heads")
    func padding() throws {
        let attention = LongformerAttention(window: 10, dilations: [1, 2, 3, 4], globalPositions: [0, 30, 69])
        let pattern = try attention.pattern(for: AttentionShape(heads: 4, queryLength: 70, headDim: 8))
        try checkPatternAttention(attention, pattern: pattern, batch: 3, heads: 4, kvHeads: 2, headDim: 8,
                                  keyLengths: [70, 0, 31], threads: 2, seed: 3200, "longformer padded")
    }

    @Test("deterministic across thread counts; cost counts the pattern's pairs")
    func determinism() throws {
        let attention = LongformerAttention(window: 16, dilations: [1, 2, 3], globalPositions: [0, 150], causal: true)
        let pattern = try attention.pattern(for: AttentionShape(heads: 3, queryLength: 290, headDim: 8))
        try checkPatternDeterminismAndCost(attention, queryLength: 290, heads: 3, headDim: 8,
                                           expectedPairs: pattern.scoredPairs, "longformer")
    }

    @Test("reads only the addressed elements (dilated keys and queries)")
    func nanPadding() throws {
        try checkReadsOnlyAddressedElements(LongformerAttention(window: 8, dilations: [1, 3], globalPositions: [0, 77, 149]),
                                            heads: 2, queryLength: 150, "longformer")
    }

    @Test("bad configurations throw")
    func errors() {
        let shape = AttentionShape(heads: 2, queryLength: 10, headDim: 8)
        expectAttentionError(.invalidParameter, mentioning: ["window", "-2"]) { try LongformerAttention(window: -2).validate(shape) }
        expectAttentionError(.invalidParameter, mentioning: ["dilations", "3", "2"]) {
            try LongformerAttention(dilations: [1, 2, 3]).validate(shape)
        }
        expectAttentionError(.invalidParameter, mentioning: ["dilations[1]", "0"]) {
            try LongformerAttention(dilations: [1, 0]).validate(shape)
        }
        expectAttentionError(.invalidParameter, mentioning: ["global position", "10"]) {
            try LongformerAttention(globalPositions: [0, 10]).validate(shape)
        }
        expectAttentionError(.invalidParameter, mentioning: ["global position", "-1"]) {
            try LongformerAttention(globalPositions: [-1]).validate(shape)
        }
    }
}
