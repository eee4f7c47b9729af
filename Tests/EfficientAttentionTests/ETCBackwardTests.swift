// ETCAttention's backward pass (global-local: the global queries' pass, then the long
// queries' global keys and band) against the Double reference of its forward differentiated
// by hand (DenseBackwardTests' reference with ETC's visibility, the pattern the forward's
// tests check against the spec): key blocks straddling the global/long boundary, global
// query tiles of several segments, N not a multiple of the tiles, D = 1, 3, 65, Dv != D,
// H = 4 over Hkv = 2 or 1, key padding down to an item with no key, no globals, no long
// tokens, causal and not; central finite differences of the library's forward; 1, 2, 3
// and 7 threads bitwise; views equal Tensors; the two-input API; a gradient step; errors.
// With a relative table: ETCRelativeBackwardTests.swift.

@_spi(Testing) @_spi(Benchmarking) import EfficientAttention
import Foundation
import Testing

/// Segment ids of about `size` long tokens each; global token `t` in segment `t mod count`.
func etcSegments(globals: Int, longs: Int, size: Int) -> ETCSegments {
    let count = max(1, (longs + size - 1) / size)
    return ETCSegments(count: count, global: (0..<globals).map { $0 % count }, long: (0..<longs).map { $0 / size })
}

/// ETC over `length` positions (segments need it) as a gradient subject.
private func etcSubject(globals: Int, radius: Int, segmentSize: Int = 0, length: Int, causal: Bool) -> GradientSubject {
    let segments = segmentSize > 0 ? etcSegments(globals: globals, longs: length - globals, size: segmentSize) : nil
    return .pattern("etc G\(globals) r\(radius)" + (segmentSize > 0 ? " segments \(segmentSize)" : "")
                        + (causal ? " causal" : ""),
                    ETCAttention(globals: globals, radius: radius, segments: segments, causal: causal)) {
        try $0.pattern(for: $1)
    }
}

private func etcCase(globals: Int, radius: Int, segmentSize: Int = 0, causal: Bool, batch: Int = 1, heads: Int = 4,
                     kvHeads: Int? = 2, length: Int, headDim: Int = 16, valueDim: Int? = nil,
                     keyLengths: [Int]? = nil, seed: UInt64) -> PatternBackwardCase {
    PatternBackwardCase(subject: etcSubject(globals: globals, radius: radius, segmentSize: segmentSize, length: length,
                                            causal: causal),
                        batch: batch, heads: heads, kvHeads: kvHeads, queryLength: length, headDim: headDim,
                        valueDim: valueDim, keyLengths: keyLengths, seed: seed)
}

/// Positions `range` of a `[B, H, N, ·]` tensor (also ETCRelativeBackwardTests).
func etcPositions(_ t: Tensor, _ range: Range<Int>) throws -> Tensor {
    let s = t.shape, e = t.elements
    var out = [Float]()
    for a in 0..<s[0] { for b in 0..<s[1] { for i in range {
        let base = ((a * s[1] + b) * s[2] + i) * s[3]
        out += e[base..<(base + s[3])]
    } } }
    return try Tensor(shape: [s[0], s[1], range.count, s[3]], data: out)
}

/// The two-input API's gradients (long key lengths `longLengths`) equal the concatenated
/// call's, cut at the globals, bitwise.
func expectTwoInputGradientsMatch(_ attention: ETCAttention, _ q: Tensor, _ k: Tensor, _ v: Tensor, _ dO: Tensor,
                                  longLengths lengths: [Int]) throws {
    let g = attention.globals, n = q.shape[2]
    let whole = try attention.attend(query: q, key: k, value: v, keyLengths: lengths.map { $0 + g }, threads: 2)
    let expected = try attention.gradients(query: q, key: k, value: v, result: whole, outputGradient: dO,
                                           keyLengths: lengths.map { $0 + g }, threads: 2)
    let global = 0..<g, long = g..<n
    func parts(_ x: Tensor) throws -> (Tensor, Tensor) { (try etcPositions(x, global), try etcPositions(x, long)) }
    let (gq, lq) = try parts(q), (gk, lk) = try parts(k), (gv, lv) = try parts(v), (gdO, ldO) = try parts(dO)
    let split = try attention.attend(globalQuery: gq, globalKey: gk, globalValue: gv, longQuery: lq, longKey: lk,
                                     longValue: lv, keyLengths: lengths, threads: 2)
    let got = try attention.gradients(globalQuery: gq, globalKey: gk, globalValue: gv, longQuery: lq, longKey: lk,
                                      longValue: lv, global: split.global, long: split.long,
                                      globalOutputGradient: gdO, longOutputGradient: ldO, keyLengths: lengths,
                                      threads: 3)
    for (name, range, part) in [("global", global, got.global), ("long", long, got.long)] {
        let slice = AttentionGradients(dQuery: try etcPositions(expected.dQuery, range),
                                       dKey: try etcPositions(expected.dKey, range),
                                       dValue: try etcPositions(expected.dValue, range))
        expectBitwiseEqualGradients(slice, part, name)
    }
}

enum ETCBackwardCases {
    static let all: [PatternBackwardCase] = [false, true].flatMap { causal in
        let base: UInt64 = causal ? 81_000 : 80_000
        return [
            etcCase(globals: 3, radius: 4, causal: causal, length: 77, seed: base),
            etcCase(globals: 5, radius: 9, causal: causal, heads: 2, kvHeads: 1, length: 200, headDim: 3, seed: base + 1),
            // 130 globals: key blocks of 128 and query tiles of 64 straddle the boundary.
            etcCase(globals: 130, radius: 20, causal: causal, heads: 2, kvHeads: nil, length: 300, headDim: 65,
                    valueDim: 7, seed: base + 2),
            etcCase(globals: 1, radius: 0, causal: causal, heads: 1, kvHeads: nil, length: 45, headDim: 1, seed: base + 3),
            etcCase(globals: 6, radius: 7, segmentSize: 13, causal: causal, batch: 3, length: 96, headDim: 9,
                    valueDim: 33, keyLengths: [96, 0, 40], seed: base + 4),
            // Global query tiles of several segments; long query tiles across segment edges.
            etcCase(globals: 70, radius: 11, segmentSize: 31, causal: causal, batch: 2, heads: 4, kvHeads: 1,
                    length: 260, headDim: 33, keyLengths: [17, 260], seed: base + 5),
            etcCase(globals: 140, radius: 5, segmentSize: 50, causal: causal, heads: 2, kvHeads: 1, length: 400,
                    headDim: 8, seed: base + 6),
            etcCase(globals: 0, radius: 20, causal: causal, length: 150, seed: base + 7),
            etcCase(globals: 37, radius: 8, causal: causal, length: 37, headDim: 5, seed: base + 8),
        ]
    }

    /// Subjects for the property tests (lengths fixed per subject: segments need them).
    static func subject(_ n: Int, length: Int) -> GradientSubject {
        switch n {
        case 0: return etcSubject(globals: 3, radius: 2, length: length, causal: false)
        case 1: return etcSubject(globals: 3, radius: 2, length: length, causal: true)
        case 2: return etcSubject(globals: 4, radius: 3, segmentSize: 4, length: length, causal: false)
        default: return etcSubject(globals: 4, radius: 3, segmentSize: 4, length: length, causal: true)
        }
    }
}

@Suite("ETC backward")
struct ETCBackwardTests {
    @Test("matches the hand-differentiated Double reference", arguments: ETCBackwardCases.all)
    func reference(_ c: PatternBackwardCase) throws { try c.check() }

    /// `L = Σ dO ∘ O` through the library's Float forward, central differences with step
    /// `1e-2` on every element of Q, K and V, against the backward.
    @Test("gradients agree with central finite differences of the library's forward", arguments: 0..<4)
    func finiteDifferences(_ n: Int) throws {
        let s = ETCBackwardCases.subject(n, length: 13)
        let c = PatternBackwardCase(subject: s, batch: 2, heads: 2, kvHeads: 1, queryLength: 13, headDim: 3, valueDim: 2,
                                    keyLengths: [13, 9], seed: 82_000)
        let (q, k, v, result, dO) = try c.inputs()
        let g = try s.attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                          keyLengths: c.keyLengths, threads: 3)
        func loss(_ x: [Tensor]) throws -> Double {
            let o = try s.attention.attend(query: x[0], key: x[1], value: x[2], keyLengths: c.keyLengths, threads: 1).output
            return zip(o.elements, dO.elements).reduce(0) { $0 + Double($1.0) * Double($1.1) }
        }
        let h: Float = 1e-2
        var worst = 0.0, largest = 0.0
        for (which, analytic) in [g.dQuery, g.dKey, g.dValue].enumerated() {
            let x = [q, k, v][which]
            for e in 0..<x.count {
                var plus = [q, k, v], minus = [q, k, v]
                var p = x.elements, m = x.elements
                p[e] += h
                m[e] -= h
                plus[which] = try Tensor(shape: x.shape, data: p)
                minus[which] = try Tensor(shape: x.shape, data: m)
                let numeric = (try loss(plus) - loss(minus)) / (2 * Double(h))
                worst = max(worst, abs(numeric - Double(analytic.elements[e])))
                largest = max(largest, abs(Double(analytic.elements[e])))
            }
        }
        #expect(worst < 2e-3 * (1 + largest), "\(s.label): finite differences differ by \(worst) (max |g| \(largest))")
        #expect(largest > 0.01, "\(s.label): the gradients vanish")
    }

    @Test("bitwise identical gradients for 1, 2, 3 and 7 threads", arguments: 0..<4)
    func determinism(_ n: Int) throws {
        for c in [PatternBackwardCase(subject: ETCBackwardCases.subject(n, length: 333), batch: 2, heads: 4, kvHeads: 2,
                                      queryLength: 333, headDim: 20, valueDim: 33, keyLengths: [333, 250], seed: 83_000),
                  PatternBackwardCase(subject: ETCBackwardCases.subject(n, length: 700), heads: 2, kvHeads: 1,
                                      queryLength: 700, headDim: 32, seed: 83_001)] {
            let runs = try [1, 2, 3, 7].map { try c.gradients(threads: $0) }
            for (t, g) in runs.enumerated().dropFirst() {
                expectBitwiseEqualGradients(runs[0], g, "\(c.testDescription) run \(t)")
            }
        }
    }

    @Test("the view entry point (strided NaN-padded views, a caller's workspace) equals the Tensor convenience")
    func viewEntryPoint() throws {
        let s = ETCBackwardCases.subject(2, length: 150)
        let c = PatternBackwardCase(subject: s, batch: 2, heads: 4, kvHeads: 2, queryLength: 150, headDim: 12,
                                    valueDim: 6, keyLengths: [150, 61], seed: 84_000)
        let (q, k, v, result, dO) = try c.inputs()
        try expectViewEntryPointMatchesTensors(s.attention, shape: c.shape, query: q, key: k, value: v, result: result,
                                               outputGradient: dO, keyLengths: c.keyLengths, c.testDescription)
    }

    @Test("the two-input API's gradients are the concatenated call's, cut at the globals")
    func twoInputs() throws {
        let (g, nl) = (5, 90)
        let attention = ETCAttention(globals: g, radius: 6, segments: etcSegments(globals: g, longs: nl, size: 20))
        let (q, k, v) = try randomQKV(batch: 2, heads: 4, kvHeads: 2, queryLength: g + nl, headDim: 8, valueDim: 6, seed: 85_000)
        let dO = try randomTensor([2, 4, g + nl, 6], seed: 85_001)
        try expectTwoInputGradientsMatch(attention, q, k, v, dO, longLengths: [nl, 33])
    }

    /// `L = ½‖O − T‖²`: a step `x − η g` lowers the loss by `η ‖g‖²` to first order.
    @Test("a small gradient step lowers L = ½‖O − T‖² by what the gradients predict", arguments: 0..<4)
    func gradientStep(_ n: Int) throws {
        let s = ETCBackwardCases.subject(n, length: 100)
        let c = PatternBackwardCase(subject: s, batch: 2, heads: 4, kvHeads: 2, queryLength: 100, headDim: 24,
                                    valueDim: 20, keyLengths: [100, 43], seed: 86_000)
        let (q, k, v, result, _) = try c.inputs()
        let target = try randomTensor(result.output.shape, seed: 86_001)
        let dO = try Tensor(shape: target.shape, data: zip(result.output.elements, target.elements).map { $0 - $1 })
        let g = try s.attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                          keyLengths: c.keyLengths, threads: 2)
        try expectFirstOrderDecrease(s.label, before: halfSquaredError(result.output, target),
                                     gradients: [g.dQuery.elements, g.dKey.elements, g.dValue.elements]) { eta in
            func moved(_ x: Tensor, _ dx: Tensor) throws -> Tensor {
                try Tensor(shape: x.shape, data: stepped(x.elements, dx.elements, eta))
            }
            let after = try s.attention.attend(query: moved(q, g.dQuery), key: moved(k, g.dKey),
                                               value: moved(v, g.dValue), keyLengths: c.keyLengths, threads: 2)
            return halfSquaredError(after.output, target)
        }
    }

    @Test("backward cost: 2.5 × the forward's FLOPs, workspace independent of N; bad shapes throw")
    func costAndErrors() throws {
        let attention = ETCAttention(globals: 16, radius: 84)
        let short = AttentionShape(heads: 8, queryLength: 2048, headDim: 64)
        let long = AttentionShape(heads: 8, queryLength: 8192, headDim: 64)
        let forward = try attention.cost(short, threads: 2), backward = try attention.backwardCost(short, threads: 2)
        #expect(backward.flops == 2.5 * forward.flops && backward.scoredPairs == forward.scoredPairs)
        let longer = try attention.backwardCost(long, threads: 2)
        #expect(longer.workspaceBytes - backward.workspaceBytes <= 8 * 8 * (8192 + 128), "\(backward) -> \(longer)")

        let (q, k, v) = try randomQKV(heads: 2, queryLength: 30, headDim: 4, seed: 87_000)
        let result = try attention.attend(query: q, key: k, value: v)
        let dO = try randomTensor(result.output.shape, seed: 87_001)
        let wrong = try Tensor(shape: [1, 2, 29, 4])
        expectAttentionError(.shapeMismatch, mentioning: ["outputGradient"]) {
            try attention.gradients(query: q, key: k, value: v, output: result.output, logSumExp: result.logSumExp,
                                    outputGradient: wrong, keyLengths: nil, threads: nil)
        }
        expectAttentionError(.shapeMismatch, mentioning: ["keyLength"]) {
            try attention.gradients(query: q, key: try etcPositions(k, 0..<20), value: try etcPositions(v, 0..<20),
                                    result: result, outputGradient: dO)
        }
    }
}
