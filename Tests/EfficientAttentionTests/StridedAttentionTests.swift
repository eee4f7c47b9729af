// StridedAttention (Sparse Transformer strided and fixed patterns) against the Double
// reference with the pattern's dense mask: N not a multiple of the stride, stride 1,
// the default stride, Nq != Nk, causal and not, key padding, bad configurations,
// determinism across thread counts.

import EfficientAttention
import Testing

@Suite("StridedAttention")
struct StridedAttentionTests {
    static let cases: [(kind: StridedAttention.Kind, stride: Int?, nq: Int, nk: Int, d: Int, causal: Bool)] = [
        (.strided, 7, 100, 100, 3, false), (.strided, 7, 100, 100, 3, true),
        (.strided, nil, 300, 300, 64, false), (.strided, nil, 300, 300, 65, true),
        (.strided, 1, 50, 50, 8, false), (.strided, 1, 50, 50, 8, true),
        (.strided, 9, 40, 130, 16, false), (.strided, 9, 130, 40, 16, true), (.strided, 200, 150, 150, 8, false),
        (.fixed(summary: 1), 7, 100, 100, 3, false), (.fixed(summary: 1), 7, 100, 100, 3, true),
        (.fixed(summary: 3), 10, 333, 333, 65, false), (.fixed(summary: 2), nil, 300, 300, 16, true),
        (.fixed(summary: 1), 1, 30, 30, 8, false), (.fixed(summary: 2), 9, 40, 130, 8, true),
        (.fixed(summary: 2), 9, 130, 40, 8, false), (.fixed(summary: 4), 4, 64, 64, 8, true),
    ]

    @Test("matches the reference", arguments: cases.indices)
    func reference(_ n: Int) throws {
        let c = StridedAttentionTests.cases[n]
        let attention = StridedAttention(kind: c.kind, stride: c.stride, causal: c.causal)
        let pattern = try attention.pattern(for: AttentionShape(heads: 2, queryLength: c.nq, keyLength: c.nk, headDim: c.d))
        checkPatternConsistency(pattern, "strided \(c)")
        let l = pattern.stride
        checkPatternMatchesSpec(pattern, "strided \(c)") { _, p, j in
            if c.causal && j > p { return false }
            switch c.kind {
            case .strided: return abs(p - j) < l || (p - j) % l == 0
            case .fixed(let summary): return floorDivide(j, l) == floorDivide(p, l) || j % l >= l - summary
            }
        }
        try checkPatternAttention(attention, pattern: pattern, heads: 2, kvHeads: 1, headDim: c.d,
                                  seed: 2000 + UInt64(n), "strided \(c)")
    }

    @Test("default stride is ceil(sqrt(Nk))")
    func defaultStride() throws {
        for (n, l) in [(1, 1), (2, 2), (4, 2), (5, 3), (8192, 91), (10000, 100), (10001, 101)] {
            #expect(StridedAttention.defaultStride(keyLength: n) == l, "Nk \(n)")
        }
        let pattern = try StridedAttention().pattern(for: AttentionShape(heads: 1, queryLength: 50, keyLength: 90, headDim: 4))
        #expect(pattern.stride == 10)
    }

    @Test("key padding, batches and grouped heads")
    func padding() throws {
        let attention = StridedAttention(stride: 6, causal: true)
        let pattern = try attention.pattern(for: AttentionShape(heads: 1, queryLength: 70, headDim: 8))
        try checkPatternAttention(attention, pattern: pattern, batch: 3, heads: 4, kvHeads: 2, headDim: 8,
                                  keyLengths: [70, 0, 33], threads: 2, seed: 2100, "strided padded")
        let fixed = StridedAttention(kind: .fixed(summary: 2), stride: 6)
        let fixedPattern = try fixed.pattern(for: AttentionShape(heads: 1, queryLength: 70, headDim: 8))
        try checkPatternAttention(fixed, pattern: fixedPattern, batch: 2, heads: 2, headDim: 8,
                                  keyLengths: [31, 70], seed: 2101, "fixed padded")
    }

    @Test("deterministic across thread counts; cost counts the pattern's pairs")
    func determinism() throws {
        for kind in [StridedAttention.Kind.strided, .fixed(summary: 2)] {
            let attention = StridedAttention(kind: kind, stride: 13)
            let pattern = try attention.pattern(for: AttentionShape(heads: 1, queryLength: 290, headDim: 8))
            try checkPatternDeterminismAndCost(attention, queryLength: 290, heads: 3, headDim: 8,
                                               expectedPairs: 3 * pattern.scoredPairs, "strided \(kind)")
        }
    }

    @Test("reads only the addressed elements (keys and queries step l apart)")
    func nanPadding() throws {
        try checkReadsOnlyAddressedElements(StridedAttention(stride: 7), heads: 2, queryLength: 150, "strided")
        try checkReadsOnlyAddressedElements(StridedAttention(kind: .fixed(summary: 2), stride: 9, causal: true), heads: 2,
                                            queryLength: 150, "fixed")
    }

    @Test("bad configurations throw")
    func errors() {
        let shape = AttentionShape(heads: 1, queryLength: 10, headDim: 8)
        expectAttentionError(.invalidParameter, mentioning: ["stride", "0"]) { try StridedAttention(stride: 0).validate(shape) }
        expectAttentionError(.invalidParameter, mentioning: ["summary", "5"]) {
            try StridedAttention(kind: .fixed(summary: 5), stride: 4).validate(shape)
        }
        expectAttentionError(.invalidParameter, mentioning: ["summary", "0"]) {
            try StridedAttention(kind: .fixed(summary: 0), stride: 4).validate(shape)
        }
        expectAttentionError(.invalidParameter, mentioning: ["scale"]) {
            try StridedAttention(scale: .infinity).validate(shape)
        }
    }
}
