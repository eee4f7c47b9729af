// LocalAttention (sliding window and blocked) against the Double reference with the
// pattern's dense mask: awkward lengths and head dimensions, Nq != Nk, causal and not,
// key padding, window 0 and windows covering everything (= dense), bad configurations,
// determinism across thread counts.

import EfficientAttention
import Testing

@Suite("LocalAttention")
struct LocalAttentionTests {
    static let slidingCases: [(left: Int, right: Int, nq: Int, nk: Int, d: Int, causal: Bool)] = [
        (3, 2, 37, 37, 3, false), (3, 2, 37, 37, 3, true),
        (128, 127, 300, 300, 64, false), (128, 127, 300, 300, 65, true),
        (40, 0, 129, 129, 1, false), (0, 40, 129, 129, 16, false),
        (50, 20, 70, 150, 8, false), (50, 20, 150, 70, 8, true), (17, 5, 1, 90, 8, false),
        (500, 500, 77, 77, 8, false),   // window larger than N
    ]

    @Test("sliding window matches the reference", arguments: slidingCases.indices)
    func sliding(_ n: Int) throws {
        let c = LocalAttentionTests.slidingCases[n]
        let attention = LocalAttention(left: c.left, right: c.right, causal: c.causal)
        let shape = AttentionShape(heads: 2, queryLength: c.nq, keyLength: c.nk, headDim: c.d)
        let pattern = try attention.pattern(for: shape)
        checkPatternConsistency(pattern, "local \(c)")
        checkPatternMatchesSpec(pattern, "local \(c)") { _, p, j in
            p - c.left <= j && j <= p + (c.causal ? 0 : c.right)
        }
        try checkPatternAttention(attention, pattern: pattern, heads: 2, kvHeads: 1, headDim: c.d,
                                  seed: 1000 + UInt64(n), "local sliding \(c)")
    }

    static let blockedCases: [(size: Int, back: Int, fwd: Int, nq: Int, nk: Int, causal: Bool)] = [
        (16, 1, 0, 100, 100, false), (16, 1, 0, 100, 100, true), (50, 1, 1, 333, 333, false),
        (200, 0, 0, 333, 333, true), (7, 2, 1, 40, 61, false), (7, 2, 1, 61, 40, true), (1, 0, 0, 20, 20, false),
    ]

    @Test("blocked matches the reference", arguments: blockedCases.indices)
    func blocked(_ n: Int) throws {
        let c = LocalAttentionTests.blockedCases[n]
        let attention = LocalAttention(blockSize: c.size, lookBackward: c.back, lookForward: c.fwd, causal: c.causal)
        let pattern = try attention.pattern(for: AttentionShape(heads: 1, queryLength: c.nq, keyLength: c.nk, headDim: 8))
        checkPatternConsistency(pattern, "blocked \(c)")
        checkPatternMatchesSpec(pattern, "blocked \(c)") { _, p, j in
            let t = floorDivide(p, c.size), s = j / c.size
            return s >= t - c.back && s <= t + c.fwd && (!c.causal || j <= p)
        }
        try checkPatternAttention(attention, pattern: pattern, heads: 2, headDim: 24, valueDim: 7,
                                  seed: 1100 + UInt64(n), "local blocked \(c)")
    }

    @Test("key padding and batches")
    func padding() throws {
        let attention = LocalAttention(left: 20, right: 9, causal: false)
        let pattern = try attention.pattern(for: AttentionShape(heads: 1, queryLength: 90, headDim: 8))
        try checkPatternAttention(attention, pattern: pattern, batch: 3, heads: 2, headDim: 8,
                                  keyLengths: [90, 0, 45], threads: 2, seed: 1200, "local padded")
    }

    @Test("window 0 sees only its own position; a window covering everything equals dense")
    func edges() throws {
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 77, headDim: 16, seed: 1300)
        let own = try LocalAttention(left: 0, right: 0).attend(query: q, key: k, value: v)
        // Softmax over one key returns that key's value.
        #expect(bitwiseEqual(own.output.elements, v.elements) || zip(own.output.elements, v.elements).allSatisfy { abs($0 - $1) < 1e-6 },
                "window 0 must return each position's own value")
        for causal in [false, true] {
            let wide = try LocalAttention(left: 77, right: 77, causal: causal).attend(query: q, key: k, value: v, threads: 1)
            let dense = try DenseAttention(causal: causal).attend(query: q, key: k, value: v, threads: 1)
            expectBitwiseEqual(wide, dense, "window >= N vs dense (causal \(causal))")
        }
    }

    @Test("deterministic across thread counts; cost counts the window's pairs")
    func determinism() throws {
        let attention = LocalAttention(left: 33, right: 12)
        let pattern = try attention.pattern(for: AttentionShape(heads: 1, queryLength: 301, headDim: 8))
        try checkPatternDeterminismAndCost(attention, queryLength: 301, heads: 3, headDim: 8,
                                           expectedPairs: 3 * pattern.scoredPairs, "local")
        let blocked = LocalAttention(blockSize: 32, lookBackward: 1, lookForward: 1, causal: true)
        let blockedPattern = try blocked.pattern(for: AttentionShape(heads: 1, queryLength: 301, headDim: 8))
        try checkPatternDeterminismAndCost(blocked, queryLength: 301, heads: 3, headDim: 8,
                                           expectedPairs: 3 * blockedPattern.scoredPairs, "blocked")
    }

    @Test("reads only the addressed elements")
    func nanPadding() throws {
        try checkReadsOnlyAddressedElements(LocalAttention(left: 20, right: 7), heads: 2, queryLength: 150, "local")
        try checkReadsOnlyAddressedElements(LocalAttention(blockSize: 24, lookForward: 1, causal: true), heads: 2,
                                            queryLength: 150, "blocked")
    }

    @Test("bad configurations throw")
    func errors() {
        let shape = AttentionShape(heads: 1, queryLength: 10, headDim: 8)
        expectAttentionError(.invalidParameter, mentioning: ["left", "-1"]) { try LocalAttention(left: -1, right: 0).validate(shape) }
        expectAttentionError(.invalidParameter, mentioning: ["right"]) { try LocalAttention(left: 1, right: -3).validate(shape) }
        expectAttentionError(.invalidParameter, mentioning: ["blockSize", "0"]) { try LocalAttention(blockSize: 0).validate(shape) }
        expectAttentionError(.invalidParameter, mentioning: ["lookBackward"]) {
            try LocalAttention(blockSize: 4, lookBackward: -1).validate(shape)
        }
        expectAttentionError(.invalidParameter, mentioning: ["scale"]) {
            try LocalAttention(left: 1, right: 1, scale: .nan).validate(shape)
        }
        expectAttentionError(.unsupported, mentioning: ["headDim", "256"]) {
            try LocalAttention(left: 1, right: 1).validate(AttentionShape(heads: 1, queryLength: 10, headDim: 300))
        }
    }
}
