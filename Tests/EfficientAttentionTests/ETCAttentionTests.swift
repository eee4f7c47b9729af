// ETCAttention against a Double reference of ATTENTION_SPEC.md's "ETC global-local":
// the spec's visibility written out here (global/long pieces, radius, causal long → long,
// segments, key padding) and Shaw et al.'s clipped relative term on long → long pairs;
// the pattern's inspection API; no globals equals local attention, every token global
// equals dense; the two-input API; thread counts; strided views; bad configurations.

import EfficientAttention
import Foundation
import Testing

/// The spec's visibility for query position `p` and key `j` of `N = G + N_l` positions.
private func etcVisible(globals g: Int, radius r: Int, causal: Bool, segments: ETCSegments?,
                        p: Int, j: Int) -> Bool {
    func same(_ global: Int, _ long: Int) -> Bool {
        segments.map { $0.global[global] == $0.long[long - g] } ?? true
    }
    if p < g { return j < g || same(p, j) }
    if j < g { return same(j, p) }
    return j >= p - r && j <= (causal ? p : p + r)
}

/// `scale · q_p · a[clip(j − p, −κ, κ) + κ]` on long → long pairs, in precision `T`.
private func etcRelativeTerm<T: BinaryFloatingPoint>(_ attention: ETCAttention, query: Tensor,
                                                     scale: T) -> PairTerm<T> {
    guard let table = attention.relativePositions else { return { _, _, _, _ in 0 } }
    let (h, nq, d) = (query.shape[1], query.shape[2], query.shape[3])
    let (tableHeads, rows) = (table.shape[1], table.shape[2])
    let kappa = (rows - 1) / 2, g = attention.globals
    let q = query.elements.map { T($0) }, a = table.elements.map { T($0) }
    return { b, head, p, j in
        guard p >= g, j >= g else { return 0 }
        let t = min(max(j - p, -kappa), kappa) + kappa
        let qBase = ((b * h + head) * nq + p) * d, aBase = ((tableHeads == 1 ? 0 : head) * rows + t) * d
        var dot: T = 0
        for c in 0..<d { dot += q[qBase + c] * a[aBase + c] }
        return scale * dot
    }
}

/// Checks `attention` on seeded inputs of `globals + longs` positions against the reference.
@discardableResult
private func checkETC(_ attention: ETCAttention, batch: Int = 1, heads: Int, kvHeads: Int? = nil, longs: Int,
                      headDim d: Int, valueDim: Int? = nil, keyLengths: [Int]? = nil, threads: Int? = nil,
                      seed: UInt64, _ label: String,
                      sourceLocation: SourceLocation = #_sourceLocation) throws -> AttentionResult {
    let n = attention.globals + longs
    let (q, k, v) = try randomQKV(batch: batch, heads: heads, kvHeads: kvHeads, queryLength: n,
                                  headDim: d, valueDim: valueDim, seed: seed)
    let result = try attention.attend(query: q, key: k, value: v, keyLengths: keyLengths, threads: threads)
    let (g, r, causal, segments) = (attention.globals, attention.radius, attention.causal, attention.segments)
    let visible: Visibility = { b, _, p, j in
        etcVisible(globals: g, radius: r, causal: causal, segments: segments, p: p, j: j)
            && j < (keyLengths?[b] ?? n)
    }
    let scale = attention.scale ?? 1 / Float(d).squareRoot()
    let reference = referenceAttention(query: q, key: k, value: v, scale: Double(scale), visible: visible,
                                       bias: etcRelativeTerm(attention, query: q, scale: Double(scale)))
    let naive = naiveFloatAttention(query: q, key: k, value: v, scale: scale, visible: visible,
                                    bias: etcRelativeTerm(attention, query: q, scale: scale))
    checkAttention(result, reference: reference, naive: naive, "\(label) G\(g) Nl\(longs) r\(r) D\(d)",
                   sourceLocation: sourceLocation)
    return result
}

/// Segments of about `size` long tokens each, and global token `t` in segment `t mod count`.
private func segments(globals: Int, longs: Int, size: Int) -> ETCSegments {
    let count = max(1, ceilDivide(longs, size))
    return ETCSegments(count: count, global: (0..<globals).map { $0 % count },
                       long: (0..<longs).map { $0 / size })
}

private func ceilDivide(_ a: Int, _ b: Int) -> Int { (a + b - 1) / b }

private func table(heads: Int, kappa: Int, headDim: Int, seed: UInt64) throws -> Tensor {
    try randomTensor([1, heads, 2 * kappa + 1, headDim], seed: seed)
}

@Suite("ETCAttention")
struct ETCAttentionTests {
    @Test("the pattern matches the spec and its tile list covers it")
    func pattern() throws {
        // (globals, longs, radius, causal, segment size or 0)
        let cases: [(Int, Int, Int, Bool, Int)] = [
            (3, 50, 4, false, 0), (3, 50, 4, true, 0), (0, 40, 5, false, 0), (17, 0, 3, false, 0),
            (5, 130, 70, false, 0), (6, 90, 7, false, 13), (6, 90, 7, true, 13), (1, 200, 0, false, 0),
            (40, 150, 20, true, 31),
        ]
        for (g, nl, r, causal, size) in cases {
            let seg = size > 0 ? segments(globals: g, longs: nl, size: size) : nil
            let pattern = try ETCPattern(globals: g, radius: r, causal: causal, segments: seg, length: g + nl)
            let label = "G\(g) Nl\(nl) r\(r) causal \(causal) segments \(size)"
            checkPatternConsistency(pattern, label)
            checkPatternMatchesSpec(pattern, label) { _, p, j in
                etcVisible(globals: g, radius: r, causal: causal, segments: seg, p: p, j: j)
            }
        }
    }

    @Test("against the Double reference: relative positions, causal, segments, grouped heads, padding")
    func reference() throws {
        // (globals, longs, radius, κ or nil, causal, heads, kvHeads, D, Dv, segment size, shared table)
        let cases: [(Int, Int, Int, Int?, Bool, Int, Int, Int, Int, Int, Bool)] = [
            (4, 77, 9, 3, false, 2, 1, 16, 16, 0, false),
            (4, 77, 9, 3, true, 2, 1, 16, 16, 0, false),
            (8, 300, 40, 12, false, 4, 2, 3, 5, 0, true),
            (8, 300, 40, 64, true, 4, 2, 65, 65, 0, false),      // κ ≥ r: no clipping
            (1, 133, 0, 2, false, 1, 1, 1, 1, 0, false),         // radius 0: the long token itself
            (12, 257, 33, 5, false, 2, 2, 128, 128, 40, false),  // segments
            (12, 257, 33, 5, true, 2, 2, 32, 24, 17, true),
            (5, 200, 50, nil, false, 2, 1, 64, 64, 0, false),    // no relative table
            (0, 150, 20, 4, true, 2, 2, 16, 16, 0, false),       // no globals
            (37, 0, 8, 2, false, 2, 1, 16, 16, 0, false),        // no long tokens
        ]
        for (n, c) in cases.enumerated() {
            let (g, nl, r, kappa, causal, h, hkv, d, dv, size, shared) = c
            let attention = ETCAttention(
                globals: g, radius: r,
                relativePositions: try kappa.map { try table(heads: shared ? 1 : h, kappa: $0, headDim: d, seed: UInt64(n + 10)) },
                segments: size > 0 ? segments(globals: g, longs: nl, size: size) : nil, causal: causal)
            try checkETC(attention, batch: 2, heads: h, kvHeads: hkv, longs: nl, headDim: d, valueDim: dv,
                         seed: UInt64(n), "case \(n) causal \(causal) κ \(kappa.map(String.init) ?? "-") segments \(size)")
        }
    }

    @Test("key padding, including rows that see no key")
    func padding() throws {
        let attention = ETCAttention(globals: 6, radius: 10,
                                     relativePositions: try table(heads: 2, kappa: 4, headDim: 16, seed: 3),
                                     segments: segments(globals: 6, longs: 100, size: 25))
        try checkETC(attention, batch: 3, heads: 2, longs: 100, headDim: 16, keyLengths: [106, 50, 3], seed: 4,
                     "padding")
        // Keys 0..<3 valid: long tokens far from them see nothing (segments: no global of theirs).
        try checkETC(attention, batch: 1, heads: 2, longs: 100, headDim: 16, keyLengths: [0], seed: 5, "no keys")
    }

    @Test("no global tokens equals sliding-window local attention; every token global equals dense")
    func limits() throws {
        let (q, k, v) = try randomQKV(batch: 2, heads: 2, queryLength: 333, headDim: 64, seed: 8)
        for causal in [false, true] {
            let etc = try ETCAttention(globals: 0, radius: 21, causal: causal)
                .attend(query: q, key: k, value: v, keyLengths: nil, threads: 2)
            let local = try LocalAttention(left: 21, right: causal ? 0 : 21, causal: causal)
                .attend(query: q, key: k, value: v, keyLengths: nil, threads: 2)
            expectClose(etc, local, "no globals, causal \(causal)")
        }
        for kappa in [0, 5] {
            let etc = try ETCAttention(globals: 333, radius: 3,
                                       relativePositions: try table(heads: 2, kappa: kappa, headDim: 64, seed: 9))
                .attend(query: q, key: k, value: v, keyLengths: [333, 200], threads: 2)
            let dense = try DenseAttention().attend(query: q, key: k, value: v, keyLengths: [333, 200], threads: 2)
            expectClose(etc, dense, "all global, κ \(kappa)")
        }
    }

    @Test("the two-input call equals the concatenated call")
    func separateInputs() throws {
        let (g, nl, h, d) = (7, 90, 2, 16)
        let attention = try ETCAttention(heads: h, headDim: d, globals: g, radius: 12, maxDistance: 3, seed: 1,
                                         causal: true)
        let (gq, gk, gv) = try randomQKV(batch: 2, heads: h, queryLength: g, headDim: d, seed: 20)
        let (lq, lk, lv) = try randomQKV(batch: 2, heads: h, queryLength: nl, headDim: d, seed: 21)
        let parts = try attention.attend(globalQuery: gq, globalKey: gk, globalValue: gv,
                                         longQuery: lq, longKey: lk, longValue: lv, keyLengths: [90, 40], threads: 2)
        func joined(_ a: Tensor, _ b: Tensor) throws -> Tensor {
            var data = [Float]()
            let (n, m, w) = (a.shape[2], b.shape[2], a.shape[3])
            for item in 0..<(a.shape[0] * a.shape[1]) {
                data += a.elements[(item * n * w)..<((item + 1) * n * w)]
                data += b.elements[(item * m * w)..<((item + 1) * m * w)]
            }
            return try Tensor(shape: [a.shape[0], a.shape[1], n + m, w], data: data)
        }
        let whole = try attention.attend(query: joined(gq, lq), key: joined(gk, lk), value: joined(gv, lv),
                                         keyLengths: [97, 47], threads: 2)
        let glued = try AttentionResult(output: joined(parts.global.output, parts.long.output),
                                        logSumExp: joined(parts.global.logSumExp, parts.long.logSumExp))
        expectBitwiseEqual(glued, whole, "two inputs vs concatenated")
        #expect(parts.global.output.shape == [2, h, g, d] && parts.long.output.shape == [2, h, nl, d])
        expectAttentionError(.shapeMismatch, mentioning: ["globals"]) {
            try attention.attend(globalQuery: lq, globalKey: lk, globalValue: lv,
                                 longQuery: gq, longKey: gk, longValue: gv)
        }
        expectAttentionError(.shapeMismatch, mentioning: ["global", "long"]) {
            try attention.attend(globalQuery: gq, globalKey: gk, globalValue: gv,
                                 longQuery: lq, longKey: gk, longValue: gv)
        }
    }

    @Test("bitwise identical for 1, 2, 3 and 7 threads; strided NaN-padded views; cost")
    func determinism() throws {
        let attention = try ETCAttention(heads: 4, headDim: 64, globals: 9, radius: 40, maxDistance: 6, seed: 2,
                                         segments: segments(globals: 9, longs: 500, size: 77))
        let (q, k, v) = try randomQKV(batch: 2, heads: 4, queryLength: 509, headDim: 64, seed: 30)
        let one = try attention.attend(query: q, key: k, value: v, keyLengths: [509, 300], threads: 1)
        for threads in [2, 3, 7] {
            expectBitwiseEqual(try attention.attend(query: q, key: k, value: v, keyLengths: [509, 300], threads: threads),
                               one, "threads \(threads) vs 1")
        }
        // One head: the global rows take smaller tiles with more threads, same bits.
        let (q1, k1, v1) = try randomQKV(heads: 1, queryLength: 509, headDim: 64, seed: 31)
        let single = try ETCAttention(heads: 1, headDim: 64, globals: 130, radius: 40, seed: 3)
        let oneThread = try single.attend(query: q1, key: k1, value: v1, keyLengths: nil, threads: 1)
        for threads in [2, 7] {
            expectBitwiseEqual(try single.attend(query: q1, key: k1, value: v1, keyLengths: nil, threads: threads),
                               oneThread, "one head, threads \(threads) vs 1")
        }
        try checkReadsOnlyAddressedElements(attention, heads: 4, queryLength: 509, "etc")
        let shape = AttentionShape(batch: 2, heads: 4, queryLength: 509, keyLength: 509, headDim: 64)
        let pattern = try attention.pattern(for: shape)
        let cost = try attention.cost(shape, threads: 2)
        #expect(cost.scoredPairs == 2 * 4 * pattern.scoredPairs)
        var band = 0
        for p in 9..<509 { band += (max(9, p - 40)...min(508, p + 40)).count }
        #expect(cost.flops == 2 * Double(cost.scoredPairs) * 128 + 2 * Double(2 * 4 * band) * 64)
    }

    @Test("bad configurations are thrown errors naming the option")
    func errors() throws {
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 40, headDim: 8, seed: 1)
        func attend(_ attention: ETCAttention) throws -> AttentionResult {
            try attention.attend(query: q, key: k, value: v, keyLengths: nil, threads: 1)
        }
        expectAttentionError(.invalidParameter, mentioning: ["globals"]) { try attend(ETCAttention(globals: 41)) }
        expectAttentionError(.invalidParameter, mentioning: ["globals"]) { try attend(ETCAttention(globals: -1)) }
        expectAttentionError(.invalidParameter, mentioning: ["radius"]) { try attend(ETCAttention(globals: 2, radius: -1)) }
        expectAttentionError(.shapeMismatch, mentioning: ["relativePositions"]) {
            try attend(ETCAttention(globals: 2, relativePositions: try randomTensor([1, 2, 4, 8], seed: 1)))
        }
        expectAttentionError(.shapeMismatch, mentioning: ["relativePositions"]) {
            try attend(ETCAttention(globals: 2, relativePositions: try randomTensor([1, 3, 5, 8], seed: 1)))
        }
        let bad = try Tensor(shape: [1, 1, 3, 8], data: [Float](repeating: 0, count: 23) + [.nan])
        expectAttentionError(.invalidParameter, mentioning: ["relativePositions", "finite"]) {
            try attend(ETCAttention(globals: 2, relativePositions: bad))
        }
        expectAttentionError(.invalidParameter, mentioning: ["segments.long", "0..<2"]) {
            try attend(ETCAttention(globals: 2, segments: ETCSegments(count: 2, global: [0, 1],
                                                                      long: [Int](repeating: 0, count: 35) + [1, 2, 1])))
        }
        expectAttentionError(.invalidParameter, mentioning: ["segments.global"]) {
            try attend(ETCAttention(globals: 2, segments: ETCSegments(count: 2, global: [0, -1],
                                                                      long: [Int](repeating: 0, count: 38))))
        }
        expectAttentionError(.invalidParameter, mentioning: ["non-decreasing"]) {
            try attend(ETCAttention(globals: 2, segments: ETCSegments(count: 2, global: [0, 1],
                                                                      long: [Int](repeating: 1, count: 37) + [0])))
        }
        expectAttentionError(.shapeMismatch, mentioning: ["segments", "globals"]) {
            try attend(ETCAttention(globals: 2, segments: ETCSegments(count: 1, global: [0], long: [])))
        }
        expectAttentionError(.invalidParameter, mentioning: ["segments.count"]) {
            try attend(ETCAttention(globals: 2, segments: ETCSegments(count: 0, global: [0, 0],
                                                                      long: [Int](repeating: 0, count: 38))))
        }
        let (q2, k2, v2) = try randomQKV(heads: 2, queryLength: 40, keyLength: 41, headDim: 8, seed: 1)
        expectAttentionError(.shapeMismatch, mentioning: ["keyLength", "queryLength"]) {
            try ETCAttention(globals: 2).attend(query: q2, key: k2, value: v2, keyLengths: nil, threads: 1)
        }
        expectAttentionError(.invalidParameter, mentioning: ["maxDistance"]) {
            try ETCAttention(heads: 1, headDim: 8, globals: 1, maxDistance: -1, seed: 1)
        }
    }
}

/// Results agree to within Float rounding of differently ordered sums.
private func expectClose(_ a: AttentionResult, _ b: AttentionResult, _ label: String,
                         sourceLocation: SourceLocation = #_sourceLocation) {
    let pairs = zip(a.output.elements + a.logSumExp.elements, b.output.elements + b.logSumExp.elements)
    let worst = pairs.map { x, y in x == y ? 0 : abs(x - y) }.max() ?? 0
    #expect(a.output.shape == b.output.shape && worst <= 2e-6, "\(label): largest difference \(worst)",
            sourceLocation: sourceLocation)
}
