// TransformerXLAttention against a Double reference over the concatenated keys with
// explicit relative scores: stateless calls over [memory ; segment] (awkward shapes,
// shared or per-head tables, NaN-padded strided inputs), a sequence processed in
// segments with memory against the reference over the same windows, memory contents,
// reset, batch independence, errors, determinism.

import AttentionBenchCore
import EfficientAttention
import Foundation
import Testing

/// Positions `range` (axis 2) of `tensor`.
private func positions(_ tensor: Tensor, _ range: Range<Int>) throws -> Tensor {
    let s = tensor.shape
    var data = [Float]()
    for a in 0..<s[0] { for b in 0..<s[1] { for n in range { for c in 0..<s[3] { data.append(tensor[a, b, n, c]) } } } }
    return try Tensor(shape: [s[0], s[1], range.count, s[3]], data: data)
}

/// A configuration with random biases and a random table of `rows` rows.
private func randomXL(heads: Int, tableHeads: Int? = nil, headDim d: Int, memoryLength: Int, rows: Int,
                      seed: UInt64, scale: Float? = nil) throws -> TransformerXLAttention {
    let table = try randomTensor([1, tableHeads ?? heads, rows, d], seed: seed)
    let u = try randomTensor([1, 1, heads, d], seed: seed + 1).elements
    let v = try randomTensor([1, 1, heads, d], seed: seed + 2).elements
    return TransformerXLAttention(memoryLength: memoryLength, relativePositions: table,
                                  contentBias: u, positionBias: v, scale: scale)
}

@Suite("TransformerXLAttention")
struct TransformerXLAttentionTests {
    @Test("stateless: [memory ; segment] against the reference with explicit relative scores")
    func stateless() throws {
        // (heads, kvHeads, Nq, memory, D, Dv, shared table)
        let cases: [(Int, Int, Int, Int, Int, Int, Bool)] = [
            (2, 2, 1, 0, 1, 1, false), (2, 2, 17, 5, 3, 3, false), (2, 1, 129, 64, 64, 64, false),
            (3, 3, 300, 200, 16, 16, true), (2, 2, 65, 33, 65, 7, false), (1, 1, 40, 90, 128, 128, false),
            (4, 2, 100, 0, 8, 8, true),
        ]
        for (n, (h, hkv, nq, memory, d, dv, shared)) in cases.enumerated() {
            let attention = try randomXL(heads: h, tableHeads: shared ? 1 : h, headDim: d, memoryLength: memory,
                                         rows: memory + nq + 3, seed: UInt64(100 + 10 * n))
            let (q, k, v) = try randomQKV(heads: h, kvHeads: hkv, queryLength: nq, keyLength: memory + nq,
                                          headDim: d, valueDim: dv, seed: UInt64(n))
            let result = try attention.attend(query: q, key: k, value: v)
            checkXL(result, attention, query: q, key: k, value: v, "H\(h)/\(hkv) Nq\(nq) M\(memory) D\(d)")
        }
    }

    @Test("a shorter memory than memoryLength, key padding, and a custom scale")
    func partialMemoryAndPadding() throws {
        let attention = try randomXL(heads: 2, headDim: 16, memoryLength: 100, rows: 180, seed: 7, scale: 0.3)
        let (q, k, v) = try randomQKV(batch: 2, heads: 2, queryLength: 70, keyLength: 130, headDim: 16, seed: 8)
        let result = try attention.attend(query: q, key: k, value: v, keyLengths: [130, 45])
        let nk = 130, nq = 70
        let visible = Visible.both(Visible.causal(queryLength: nq, keyLength: nk), Visible.keyPadding([130, 45]))
        let reference = referenceAttention(query: q, key: k, value: v, scale: 0.3, visible: visible,
                                           bias: relativeTerm(attention, query: q, key: k, memory: 60, scale: 0.3))
        let naive = naiveFloatAttention(query: q, key: k, value: v, scale: 0.3, visible: visible,
                                        bias: relativeTerm(attention, query: q, key: k, memory: 60, scale: Float(0.3)))
        checkAttention(result, reference: reference, naive: naive, "memory 60 of 100, padding")
    }

    @Test("reads only the addressed elements (NaN-padded strided inputs and table)")
    func stridedNaNPadded() throws {
        let base = try randomXL(heads: 2, headDim: 24, memoryLength: 50, rows: 50 + 97, seed: 9)
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 97, keyLength: 147, headDim: 24, seed: 10)
        var attention = base
        // The table holds exactly the rows the problem can use: any read beyond is NaN.
        attention.relativePositions = try embeddedInNaN(base.relativePositions, innerStride: 2)
        let result = try attention.attend(query: try embeddedInNaN(q), key: try embeddedInNaN(k, innerStride: 3),
                                          value: try embeddedInNaN(v))
        checkXL(result, base, query: q, key: k, value: v, "NaN-padded")
        expectBitwiseEqual(result, try base.attend(query: q, key: k, value: v), "strided vs contiguous")
    }

    @Test("segments with memory equal the reference over the same windows; memory contents")
    func segments() throws {
        let (h, d, n, m, total) = (2, 16, 48, 80, 48 * 5)
        let attention = try randomXL(heads: h, headDim: d, memoryLength: m, rows: m + n, seed: 11)
        let (q, k, v) = try randomQKV(batch: 2, heads: h, queryLength: total, headDim: d, seed: 12)
        var memory = try TransformerXLMemory(batch: 2, kvHeads: h, headDim: d, capacity: m)
        for s in 0..<(total / n) {
            let segment = (s * n)..<((s + 1) * n)
            let window = max(0, s * n - m)..<((s + 1) * n)
            let result = try attention.attend(query: positions(q, segment), key: positions(k, segment),
                                              value: positions(v, segment), memory: &memory, threads: 2)
            let (wq, wk, wv) = (try positions(q, segment), try positions(k, window), try positions(v, window))
            checkXL(result, attention, query: wq, key: wk, value: wv, "segment \(s)")
            // The stateful call is the stateless one over the same window, bitwise.
            expectBitwiseEqual(result, try attention.attend(query: wq, key: wk, value: wv), "segment \(s) stateless")
            let kept = max(0, (s + 1) * n - m)..<((s + 1) * n)
            #expect(memory.keys == (try positions(k, kept)), "memory keys after segment \(s)")
            #expect(memory.values == (try positions(v, kept)), "memory values after segment \(s)")
            #expect(memory.lengths == [kept.count, kept.count])
            #expect(memory.storedLength == min(m, (s + 1) * n))
        }
    }

    @Test("reset forgets the memory; batch items are independent")
    func resetAndBatches() throws {
        let (h, d, n, m) = (2, 8, 40, 100)
        let attention = try randomXL(heads: h, headDim: d, memoryLength: m, rows: m + n, seed: 13)
        let (q, k, v) = try randomQKV(batch: 2, heads: h, queryLength: 3 * n, headDim: d, seed: 14)
        func segment(_ t: Tensor, _ s: Int, item: Int? = nil) throws -> Tensor {
            let part = try positions(t, (s * n)..<((s + 1) * n))
            guard let item else { return part }
            let e = part.elements, size = e.count / 2
            return try Tensor(shape: [1, part.shape[1], n, part.shape[3]], data: Array(e[(item * size)..<((item + 1) * size)]))
        }
        var both = try TransformerXLMemory(batch: 2, kvHeads: h, headDim: d, capacity: m)
        var alone = try TransformerXLMemory(batch: 1, kvHeads: h, headDim: d, capacity: m)
        var first: AttentionResult?
        for s in 0..<2 {
            let joint = try attention.attend(query: segment(q, s), key: segment(k, s), value: segment(v, s), memory: &both)
            let single = try attention.attend(query: segment(q, s, item: 1), key: segment(k, s, item: 1),
                                              value: segment(v, s, item: 1), memory: &alone)
            // Item 1 of the batch equals item 1 run on its own, bitwise.
            let o = joint.output.elements, l = joint.logSumExp.elements
            #expect(bitwiseEqual(Array(o[(o.count / 2)...]), single.output.elements), "segment \(s) output of item 1")
            #expect(bitwiseEqual(Array(l[(l.count / 2)...]), single.logSumExp.elements), "segment \(s) lse of item 1")
            if s == 0 { first = joint }
        }
        // Item 0 forgets; item 1 keeps its memory.
        try both.reset(batchItem: 0)
        #expect(both.lengths == [0, 80])
        let afterPartial = try attention.attend(query: segment(q, 2), key: segment(k, 2), value: segment(v, 2), memory: &both)
        // Keys 0..<120 (80 stored + the segment); item 0 sees only the segment's.
        let window = try positions(k, 0..<120), values = try positions(v, 0..<120)
        checkXL(afterPartial, attention, query: try segment(q, 2), key: window, value: values, keyBegins: [80, 0],
                "after reset(batchItem: 0)")
        #expect(both.lengths == [40, 100])
        // A full reset behaves as a fresh memory.
        both.reset()
        #expect(both.storedLength == 0 && both.lengths == [0, 0])
        let again = try attention.attend(query: segment(q, 0), key: segment(k, 0), value: segment(v, 0), memory: &both)
        expectBitwiseEqual(again, first!, "first segment after reset")
    }

    @Test("sinusoid table: W_R times [sin ; cos] of the distance")
    func sinusoidTable() throws {
        let projection = try randomTensor([1, 2, 3, 6], seed: 15)
        let table = try TransformerXLAttention.sinusoidTable(length: 5, projection: projection)
        #expect(table.shape == [1, 2, 5, 3])
        for h in 0..<2 { for delta in 0..<5 { for c in 0..<3 {
            var expected = 0.0
            for t in 0..<3 {
                let angle = Double(delta) / pow(10_000, Double(2 * t) / 6)
                expected += Double(projection[0, h, c, t]) * sin(angle) + Double(projection[0, h, c, 3 + t]) * cos(angle)
            }
            #expect(abs(Double(table[0, h, delta, c]) - expected) < 1e-5, "h \(h) Δ \(delta) c \(c)")
        } } }
        let seeded = try TransformerXLAttention(heads: 2, headDim: 8, memoryLength: 10, maxSegmentLength: 6, seed: 3)
        #expect(seeded.relativePositions.shape == [1, 2, 16, 8])
        #expect(seeded == (try TransformerXLAttention(heads: 2, headDim: 8, memoryLength: 10, maxSegmentLength: 6, seed: 3)))
        // Odd D (issue 14, item 12): the sinusoids take E = D + 1 (an even count of
        // sine/cosine pairs); the conformer attends like any other.
        for d in [1, 5, 33] {
            let odd = try TransformerXLAttention(heads: 2, headDim: d, memoryLength: 4, maxSegmentLength: 6, seed: 3)
            #expect(odd.relativePositions.shape == [1, 2, 10, d])
            let (q, k, v) = try randomQKV(heads: 2, queryLength: 6, keyLength: 10, headDim: d, seed: 4)
            checkXL(try odd.attend(query: q, key: k, value: v), odd, query: q, key: k, value: v, "odd D \(d)")
        }
    }

    @Test("bitwise identical across runs and thread counts")
    func determinism() throws {
        let attention = try randomXL(heads: 3, headDim: 32, memoryLength: 150, rows: 150 + 260, seed: 16)
        let (q, k, v) = try randomQKV(batch: 2, heads: 3, queryLength: 260, keyLength: 410, headDim: 32, seed: 17)
        let one = try attention.attend(query: q, key: k, value: v, threads: 1)
        let two = try attention.attend(query: q, key: k, value: v, threads: 2)
        expectBitwiseEqual(one, two, "1 vs 2 threads")
        expectBitwiseEqual(two, try attention.attend(query: q, key: k, value: v, threads: 2), "two runs")
    }

    @Test("cost counts the visible pairs; the benchmark entry builds and runs")
    func costAndRegistry() throws {
        let attention = try randomXL(heads: 2, headDim: 16, memoryLength: 64, rows: 64 + 100, seed: 21)
        let cost = try attention.cost(AttentionShape(batch: 3, heads: 2, queryLength: 100, keyLength: 160, headDim: 16,
                                                     valueDim: 8))
        #expect(cost.scoredPairs == 3 * 2 * (100 * 60 + 100 * 101 / 2))
        #expect(cost.flops == 2 * Double(cost.scoredPairs) * Double(2 * 16 + 8))
        let plan = try SweepPlan.make(try BenchOptions.parse(["--variants", "transformer-xl", "--seq", "96",
                                                              "--heads", "2", "--dim", "16", "--threads", "1"]))
        let job = try #require(plan.jobs.first)
        #expect(job.problem.shape.keyLength == 192 && job.problem.causal)
        let inputs = try SweepRunner.inputs(for: job.problem.shape, seed: 5)
        let result = try job.conformer.attend(query: inputs.query, key: inputs.key, value: inputs.value)
        let finite = result.output.elements.allSatisfy { $0.isFinite }
        #expect(finite && result.output.shape == [1, 2, 96, 16])
    }

    @Test("bad configurations throw clear errors")
    func errors() throws {
        let attention = try randomXL(heads: 2, headDim: 4, memoryLength: 10, rows: 20, seed: 18)
        let shape = AttentionShape(heads: 2, queryLength: 10, keyLength: 20, headDim: 4)
        try attention.validate(shape)
        expectAttentionError(.shapeMismatch, mentioning: ["memory length mismatch", "memoryLength"], "memory too long") {
            try attention.validate(AttentionShape(heads: 2, queryLength: 8, keyLength: 19, headDim: 4))
        }
        expectAttentionError(.shapeMismatch, mentioning: ["memory length mismatch"], "fewer keys than queries") {
            try attention.validate(AttentionShape(heads: 2, queryLength: 8, keyLength: 7, headDim: 4))
        }
        expectAttentionError(.invalidParameter, mentioning: ["relativePositions", "too short", "21"], "short table") {
            try attention.validate(AttentionShape(heads: 2, queryLength: 11, keyLength: 21, headDim: 4))
        }
        var wrong = attention
        wrong.contentBias.removeLast()
        expectAttentionError(.invalidParameter, mentioning: ["contentBias", "H · D"], "u count") { try wrong.validate(shape) }
        wrong = attention
        wrong.positionBias.append(1)
        expectAttentionError(.invalidParameter, mentioning: ["positionBias"], "v count") { try wrong.validate(shape) }
        expectAttentionError(.shapeMismatch, mentioning: ["relativePositions", "[1, 3, T, 4]"], "table heads") {
            try attention.validate(AttentionShape(heads: 3, queryLength: 10, keyLength: 20, headDim: 4))
        }
        wrong = attention
        wrong.memoryLength = -1
        expectAttentionError(.invalidParameter, mentioning: ["memoryLength"], "negative memory") {
            try wrong.validate(AttentionShape(heads: 2, queryLength: 10, headDim: 4))
        }
        // The stateful call: memory capacity and dimensions must match.
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 10, headDim: 4, seed: 19)
        var memory = try TransformerXLMemory(batch: 1, kvHeads: 2, headDim: 4, capacity: 9)
        expectAttentionError(.shapeMismatch, mentioning: ["memory length mismatch", "9", "10"], "capacity") {
            try attention.attend(query: q, key: k, value: v, memory: &memory)
        }
        memory = try TransformerXLMemory(batch: 2, kvHeads: 2, headDim: 4, capacity: 10)
        expectAttentionError(.shapeMismatch, mentioning: ["memory is"], "memory batch") {
            try attention.attend(query: q, key: k, value: v, memory: &memory)
        }
        memory = try TransformerXLMemory(batch: 1, kvHeads: 2, headDim: 4, capacity: 10)
        let (_, k2, v2) = try randomQKV(heads: 2, queryLength: 10, keyLength: 12, headDim: 4, seed: 20)
        expectAttentionError(.shapeMismatch, mentioning: ["segment"], "segment keys") {
            try attention.attend(query: q, key: k2, value: v2, memory: &memory)
        }
        #expect(memory.storedLength == 0, "a refused call leaves the memory alone")
        expectAttentionError(.invalidParameter, mentioning: ["batchItem"], "reset index") { try memory.reset(batchItem: 1) }
        expectAttentionError(.invalidParameter, mentioning: ["capacity"], "negative capacity") {
            try TransformerXLMemory(batch: 1, kvHeads: 1, headDim: 4, capacity: -1)
        }
        expectAttentionError(.invalidShape, mentioning: ["even"], "odd sinusoid dimension") {
            try TransformerXLAttention.sinusoidTable(length: 4, projection: try randomTensor([1, 1, 2, 3], seed: 1))
        }
    }
}
