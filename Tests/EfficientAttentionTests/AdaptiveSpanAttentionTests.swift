// AdaptiveSpanAttention against the Double reference with the explicit soft mask:
// spans 0, below the ramp, non-integer, beyond N, per head; Nq != Nk, awkward D, key
// padding; exact cases (span 0 sees the current position; spans >= N equal causal
// dense); configuration errors; cost following the span; determinism.

import AttentionBenchCore
import EfficientAttention
import Foundation
import Testing

/// The spec's soft mask `m(x) = clamp((R + z − x) / R, 0, 1)` of head `h` as a pair weight.
private func spanWeight<T: BinaryFloatingPoint>(_ spans: [Float], ramp: Float, offset: Int) -> PairTerm<T> {
    { _, h, i, j in
        let x = T(i + offset - j), z = T(spans[h]), r = T(ramp)
        return min(max((r + z - x) / r, 0), 1)
    }
}

/// Runs `attention` and checks it against the Double reference with the soft mask.
@discardableResult
private func checkSpan(_ attention: AdaptiveSpanAttention, batch: Int = 1, kvHeads: Int? = nil,
                       queryLength nq: Int, keyLength: Int? = nil, headDim d: Int, valueDim: Int? = nil,
                       keyLengths: [Int]? = nil, threads: Int? = nil, seed: UInt64,
                       sourceLocation: SourceLocation = #_sourceLocation) throws -> AttentionResult {
    let nk = keyLength ?? nq, heads = attention.spans.count
    let (q, k, v) = try randomQKV(batch: batch, heads: heads, kvHeads: kvHeads, queryLength: nq, keyLength: nk,
                                  headDim: d, valueDim: valueDim, seed: seed)
    let result = try attention.attend(query: q, key: k, value: v, keyLengths: keyLengths, threads: threads)
    var visible = Visible.causal(queryLength: nq, keyLength: nk)
    if let keyLengths { visible = Visible.both(visible, Visible.keyPadding(keyLengths)) }
    let scale = attention.scale ?? 1 / Float(d).squareRoot()
    let reference = referenceAttention(query: q, key: k, value: v, scale: Double(scale), visible: visible,
                                       weight: spanWeight(attention.spans, ramp: attention.ramp, offset: nk - nq))
    let naive = naiveFloatAttention(query: q, key: k, value: v, scale: scale, visible: visible,
                                    weight: spanWeight(attention.spans, ramp: attention.ramp, offset: nk - nq))
    checkAttention(result, reference: reference, naive: naive,
                   "adaptive-span spans \(attention.spans) R \(attention.ramp) Nq \(nq) Nk \(nk) D \(d)",
                   sourceLocation: sourceLocation)
    return result
}

@Suite("AdaptiveSpanAttention")
struct AdaptiveSpanAttentionTests {
    @Test("matches the reference for spans 0, below the ramp, non-integer and beyond N",
          arguments: [(Float(0), Float(8)), (3, 8), (13.7, 5), (100, 32), (250.25, 32), (600, 32), (0, 0.5)])
    func spans(span: Float, ramp: Float) throws {
        let attention = AdaptiveSpanAttention(heads: 2, span: span, ramp: ramp)
        try checkSpan(attention, queryLength: 300, headDim: 16, seed: UInt64(span * 4 + ramp))
    }

    @Test("per-head spans, awkward shapes, Nq != Nk, grouped heads")
    func shapes() throws {
        let attention = AdaptiveSpanAttention(spans: [0, 7.5, 40, 129], maxSpan: 200, ramp: 16)
        for (n, (nq, nk, d, dv)) in [(1, 1, 1, 1), (17, 17, 3, 5), (129, 129, 64, 64), (50, 200, 65, 8),
                                     (200, 50, 8, 65), (70, 90, 128, 128)].enumerated() {
            try checkSpan(attention, kvHeads: 2, queryLength: nq, keyLength: nk, headDim: d, valueDim: dv,
                          seed: UInt64(10 + n))
        }
    }

    @Test("key padding and batch items")
    func keyPadding() throws {
        let attention = AdaptiveSpanAttention(spans: [20, 60.5], maxSpan: 64, ramp: 32)
        try checkSpan(attention, batch: 3, queryLength: 150, keyLength: 180, headDim: 24,
                      keyLengths: [180, 0, 97], seed: 20)
    }

    @Test("span 0 with ramp 1 sees exactly the current position")
    func currentPositionOnly() throws {
        let attention = AdaptiveSpanAttention(heads: 1, span: 0, ramp: 1)
        let (q, k, v) = try randomQKV(heads: 1, queryLength: 77, headDim: 8, seed: 30)
        let result = try attention.attend(query: q, key: k, value: v)
        // m(0) = 1, m(x ≥ 1) = 0: o_i = v_i and lse_i = s(i, i).
        for i in 0..<77 {
            for c in 0..<8 { #expect(result.output[0, 0, i, c] == v[0, 0, i, c], "row \(i) column \(c)") }
            var dot: Float = 0
            for c in 0..<8 { dot += q[0, 0, i, c] * k[0, 0, i, c] }
            #expect(abs(result.logSumExp[0, 0, i, 0] - dot / Float(8).squareRoot()) < 1e-5, "lse of row \(i)")
        }
    }

    @Test("spans of at least Nk give causal dense attention, bitwise")
    func wideSpansAreCausalDense() throws {
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 200, keyLength: 260, headDim: 32, seed: 40)
        let wide = try AdaptiveSpanAttention(heads: 2, span: 260).attend(query: q, key: k, value: v)
        let dense = try DenseAttention(causal: true).attend(query: q, key: k, value: v)
        expectBitwiseEqual(wide, dense, "span 260 vs causal dense")
    }

    @Test("spans change between calls")
    func changingSpans() throws {
        var attention = AdaptiveSpanAttention(spans: [10, 10], maxSpan: 100, ramp: 8)
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 120, headDim: 16, seed: 50)
        let before = try attention.attend(query: q, key: k, value: v)
        attention.spans = [90, 2.5]
        let after = try checkSpan(attention, queryLength: 120, headDim: 16, seed: 50)
        #expect(before.output != after.output)
        let fresh = try AdaptiveSpanAttention(spans: [90, 2.5], maxSpan: 100, ramp: 8).attend(query: q, key: k, value: v)
        expectBitwiseEqual(after, fresh, "changed spans vs a fresh configuration")
    }

    @Test("span penalty and effective spans")
    func reporting() throws {
        let attention = AdaptiveSpanAttention(spans: [0, 7.5, 40, 128], maxSpan: 128, ramp: 32)
        #expect(attention.spanPenalty == 175.5)
        #expect(try attention.effectiveSpans() == [32, 40, 72, 160])
        #expect(try AdaptiveSpanAttention(spans: [0, 0.25], maxSpan: 1, ramp: 0.5).effectiveSpans() == [1, 1])
    }

    @Test("cost follows the span, not N")
    func costFollowsSpan() throws {
        let attention = AdaptiveSpanAttention(heads: 8, span: 128, ramp: 32)
        let short = try attention.cost(AttentionShape(heads: 8, queryLength: 4096, headDim: 64))
        let long = try attention.cost(AttentionShape(heads: 8, queryLength: 8192, headDim: 64))
        // 160 positions per query except the first 159 queries (1 + 2 + … + 159 pairs).
        let expected = { (n: Int) in 8 * (160 * (n - 159) + 159 * 160 / 2) }
        #expect(short.scoredPairs == expected(4096))
        #expect(long.scoredPairs == expected(8192))
        #expect(long.flops == 2 * Double(expected(8192)) * 128)
        #expect(long.workspaceBytes == short.workspaceBytes)
    }

    @Test("the benchmark entry builds the paper's setting and runs")
    func registry() throws {
        let plan = try SweepPlan.make(try BenchOptions.parse(["--variants", "adaptive-span", "--seq", "300",
                                                              "--heads", "2", "--dim", "16", "--threads", "1"]))
        let job = try #require(plan.jobs.first)
        let attention = try #require(job.conformer as? AdaptiveSpanAttention)
        #expect(attention.spans == [128, 128] && attention.ramp == 32 && job.problem.causal)
        try checkSpan(attention, queryLength: 300, headDim: 16, seed: 70)
    }

    @Test("bitwise identical across runs and thread counts")
    func determinism() throws {
        let attention = AdaptiveSpanAttention(spans: [30, 0.5, 70, 5], maxSpan: 100, ramp: 20)
        let (q, k, v) = try randomQKV(batch: 2, heads: 4, queryLength: 333, headDim: 16, seed: 60)
        let one = try attention.attend(query: q, key: k, value: v, threads: 1)
        let two = try attention.attend(query: q, key: k, value: v, threads: 2)
        let again = try attention.attend(query: q, key: k, value: v, threads: 2)
        expectBitwiseEqual(one, two, "1 vs 2 threads")
        expectBitwiseEqual(two, again, "two runs")
    }

    @Test("bad configurations throw clear errors")
    func errors() throws {
        let shape = AttentionShape(heads: 2, queryLength: 10, headDim: 4)
        expectAttentionError(.invalidParameter, mentioning: ["spans[1]", "-1"], "negative span") {
            try AdaptiveSpanAttention(spans: [1, -1], maxSpan: 8).validate(shape)
        }
        expectAttentionError(.invalidParameter, mentioning: ["spans[0]", "maxSpan"], "span above maxSpan") {
            try AdaptiveSpanAttention(spans: [9, 1], maxSpan: 8).validate(shape)
        }
        expectAttentionError(.invalidParameter, mentioning: ["spans[0]"], "NaN span") {
            try AdaptiveSpanAttention(spans: [.nan, 1], maxSpan: 8).validate(shape)
        }
        expectAttentionError(.invalidParameter, mentioning: ["maxSpan"], "negative maxSpan") {
            try AdaptiveSpanAttention(spans: [0, 0], maxSpan: -1).validate(shape)
        }
        for ramp in [Float(0), -2, .infinity] {
            expectAttentionError(.invalidParameter, mentioning: ["ramp"], "ramp \(ramp)") {
                try AdaptiveSpanAttention(spans: [1, 1], maxSpan: 8, ramp: ramp).validate(shape)
            }
        }
        expectAttentionError(.unsupported, mentioning: ["causal"], "non-causal") {
            try AdaptiveSpanAttention(spans: [1, 1], maxSpan: 8, causal: false).validate(shape)
        }
        expectAttentionError(.invalidParameter, mentioning: ["spans", "heads"], "span count") {
            try AdaptiveSpanAttention(spans: [1, 1, 1], maxSpan: 8).validate(shape)
        }
        expectAttentionError(.invalidParameter, mentioning: ["scale"], "scale") {
            try AdaptiveSpanAttention(spans: [1, 1], maxSpan: 8, scale: .nan).validate(shape)
        }
        expectAttentionError(.invalidParameter, mentioning: ["spans[0]"], "effective spans of a bad span") {
            try AdaptiveSpanAttention(spans: [-3], maxSpan: 8).effectiveSpans()
        }
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 10, headDim: 4, seed: 1)
        expectAttentionError(.invalidParameter, mentioning: ["spans[1]"], "attend with a bad span") {
            try AdaptiveSpanAttention(spans: [1, -0.5], maxSpan: 8).attend(query: q, key: k, value: v)
        }
    }
}
