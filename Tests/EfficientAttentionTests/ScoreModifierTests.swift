// Score modifiers (issue 17): soft-capping, ALiBi, an additive bias and sinks, on every
// conformer of the tiled kernel, against a Double reference of ATTENTION_SPEC.md's
// "Score modifiers"; their combinations with causal, windows, patterns and key padding;
// the sink's merge-then-sink rule; bad modifiers as thrown errors.

import Foundation
@_spi(Testing) import EfficientAttention
import Testing

/// The spec's definition in Double: `s = scale·q·k`, `s ← cap·tanh(s/cap)`, `s ← s + bias −
/// α_h·|i + Nk − Nq − j|` over the visible keys, softmax with the sink `e^{σ_h}` in the
/// denominator. Rows with no visible key: 0, lse `σ_h` with a sink, else −∞.
func modifiedReference(query: Tensor, key: Tensor, value: Tensor, visible: Visibility,
                       modifiers m: ScoreModifiers,
                       score function: ((_ s: Double, _ b: Int, _ h: Int, _ i: Int, _ j: Int) -> Double)? = nil)
    -> ReferenceResult<Double> {
    let (nb, nh, nq, d) = (query.shape[0], query.shape[1], query.shape[2], query.shape[3])
    let (nhkv, nk, dv) = (key.shape[1], key.shape[2], value.shape[3])
    let q = query.elements.map(Double.init), k = key.elements.map(Double.init), v = value.elements.map(Double.init)
    let bias = m.bias?.elements.map(Double.init)
    let scale = 1 / Double(d).squareRoot()
    var output = [Double](repeating: 0, count: nb * nh * nq * dv)
    var lse = [Double](repeating: -.infinity, count: nb * nh * nq)
    for b in 0..<nb { for h in 0..<nh {
        let hk = h / (nh / nhkv)
        for i in 0..<nq {
            var scores: [(Int, Double)] = []
            for j in 0..<nk where visible(b, h, i, j) {
                var s = 0.0
                for c in 0..<d { s += q[((b * nh + h) * nq + i) * d + c] * k[((b * nhkv + hk) * nk + j) * d + c] }
                s *= scale
                if let function { s = function(s, b, h, i, j) }
                if let cap = m.softCap.map(Double.init) { s = cap * Foundation.tanh(s / cap) }
                if let bias, let shape = m.bias?.shape {
                    let bb = shape[0] == 1 ? 0 : b, hh = shape[1] == 1 ? 0 : h
                    s += bias[((bb * shape[1] + hh) * nq + i) * nk + j]
                }
                if let slopes = m.alibiSlopes { s -= Double(slopes[h]) * Double(abs(i + nk - nq - j)) }
                if s > -.infinity { scores.append((j, s)) }
            }
            let row = (b * nh + h) * nq + i
            let sink = m.sinks.map { Double($0[h]) }
            let top = max(scores.map(\.1).max() ?? -.infinity, sink ?? -.infinity)
            guard top > -.infinity else { continue }
            var sum = sink.map { Foundation.exp($0 - top) } ?? 0
            for (j, s) in scores {
                let p = Foundation.exp(s - top)
                sum += p
                for c in 0..<dv { output[row * dv + c] += p * v[((b * nhkv + hk) * nk + j) * dv + c] }
            }
            for c in 0..<dv { output[row * dv + c] /= sum }
            lse[row] = top + Foundation.log(sum)
        }
    } }
    return ReferenceResult(batch: nb, heads: nh, queryLength: nq, valueDim: dv, output: output, lse: lse)
}

@Suite("Score modifiers: soft-capping, ALiBi, bias, sinks")
struct ScoreModifierTests {
    /// The modifier sets tried on every conformer: each alone, then all together.
    static func modifierSets(batch: Int, heads: Int, queryLength nq: Int, keyLength nk: Int) throws -> [(String, ScoreModifiers)] {
        let slopes = ScoreModifiers.standardALiBiSlopes(heads: heads)
        let sinks = (0..<heads).map { Float($0) * 0.7 - 1 }
        var full = try randomTensor([batch, heads, nq, nk], seed: 77, in: -2...2)
        var data = full.elements
        for j in 0..<nk { data[j] = -.infinity }   // query 0 of item 0, head 0 sees no key through the bias
        full = try Tensor(shape: full.shape, data: data)
        let broadcast = try randomTensor([1, 1, nq, nk], seed: 78, in: -2...2)
        return [
            ("softcap", ScoreModifiers(softCap: 0.6)),
            ("alibi", ScoreModifiers(alibiSlopes: slopes)),
            ("bias", ScoreModifiers(bias: full)),
            ("broadcast bias", ScoreModifiers(bias: broadcast)),
            ("sinks", ScoreModifiers(sinks: sinks)),
            ("all", ScoreModifiers(softCap: 0.8, alibiSlopes: slopes, bias: broadcast, sinks: sinks)),
        ]
    }

    /// Conformers of the tiled kernel with their visibility for a problem.
    static func conformers(queryLength nq: Int, keyLength nk: Int, heads: Int, keyLengths: [Int]?)
        throws -> [(any Attention, Visibility)] {
        let shape = AttentionShape(heads: heads, queryLength: nq, keyLength: nk, headDim: 16)
        let padding: Visibility = { b, _, _, j in j < (keyLengths?[b] ?? nk) }
        var out: [(any Attention, Visibility)] = [
            (DenseAttention(), padding),
            (DenseAttention(causal: true), Visible.both(Visible.causal(queryLength: nq, keyLength: nk), padding)),
            (MultiQueryAttention(causal: true, leftWindow: 9),
             Visible.both({ _, _, i, j in j <= i + nk - nq && j >= i + nk - nq - 9 }, padding)),
        ]
        guard nq == nk else { return out }
        let local = LocalAttention(left: 12, right: 0, causal: true)
        let longformer = LongformerAttention(window: 8, globalPositions: [0, 5])
        let bigbird = BigBirdAttention(blockSize: 8, randomBlockCount: 1, seed: 3)
        let strided = StridedAttention(stride: 5)
        out += [(local, patternVisibility(try local.pattern(for: shape), keyLengths: keyLengths)),
                (longformer, patternVisibility(try longformer.pattern(for: shape), keyLengths: keyLengths)),
                (bigbird, patternVisibility(try bigbird.pattern(for: shape), keyLengths: keyLengths)),
                (strided, patternVisibility(try strided.pattern(for: shape), keyLengths: keyLengths))]
        return out
    }

    static func withModifiers(_ attention: any Attention, _ m: ScoreModifiers) -> any Attention {
        var modifiable = attention as! any ModifiableAttention
        modifiable.modifiers = m
        return modifiable
    }

    static func check(_ result: AttentionResult, _ reference: ReferenceResult<Double>, _ label: String) {
        let output = result.output.elements, lse = result.logSumExp.elements
        var worstOutput = 0.0, worstLSE = 0.0
        for (n, x) in output.enumerated() { worstOutput = max(worstOutput, abs(Double(x) - reference.output[n])) }
        for (n, x) in lse.enumerated() {
            let r = reference.lse[n]
            if r == -.infinity {
                #expect(x == -.infinity, "\(label): row \(n) lse \(x), expected -inf")
            } else {
                worstLSE = max(worstLSE, abs(Double(x) - r) / max(1, abs(r)))
            }
        }
        #expect(worstOutput < 2e-5 && worstLSE < 2e-6, "\(label): output error \(worstOutput), lse error \(worstLSE)")
    }

    struct Problem: CustomTestStringConvertible, Sendable {
        var batch: Int, heads: Int, kvHeads: Int, queryLength: Int, keyLength: Int, keyLengths: [Int]?
        init(batch: Int = 1, heads: Int = 4, kvHeads: Int = 2, queryLength: Int, keyLength: Int,
             keyLengths: [Int]? = nil) {
            self.batch = batch
            self.heads = heads
            self.kvHeads = kvHeads
            self.queryLength = queryLength
            self.keyLength = keyLength
            self.keyLengths = keyLengths
        }
        var testDescription: String { "B\(batch) H\(heads)/\(kvHeads) Nq\(queryLength) Nk\(keyLength) pad \(keyLengths ?? [])" }
    }

    @Test("each modifier and all together, against the Double reference", arguments: [
        Problem(queryLength: 45, keyLength: 45),
        Problem(batch: 2, queryLength: 37, keyLength: 37, keyLengths: [37, 20]),
        Problem(heads: 2, kvHeads: 1, queryLength: 21, keyLength: 50),
        Problem(heads: 3, kvHeads: 3, queryLength: 5, keyLength: 70),
    ])
    func againstReference(_ p: Problem) throws {
        let (q, k, v) = try randomQKV(batch: p.batch, heads: p.heads, kvHeads: p.kvHeads, queryLength: p.queryLength,
                                      keyLength: p.keyLength, headDim: 16, seed: 41, range: -2...2)
        for (attention, visible) in try Self.conformers(queryLength: p.queryLength, keyLength: p.keyLength,
                                                         heads: p.heads, keyLengths: p.keyLengths) {
            for (name, m) in try Self.modifierSets(batch: p.batch, heads: p.heads, queryLength: p.queryLength,
                                                   keyLength: p.keyLength) {
                let modified = Self.withModifiers(attention, m)
                let label = "\(attention.name) \(name) \(p.testDescription)"
                let result = try modified.attend(query: q, key: k, value: v, keyLengths: p.keyLengths, threads: 2)
                Self.check(result, modifiedReference(query: q, key: k, value: v, visible: visible, modifiers: m), label)
                let one = try modified.attend(query: q, key: k, value: v, keyLengths: p.keyLengths, threads: 1)
                let three = try modified.attend(query: q, key: k, value: v, keyLengths: p.keyLengths, threads: 3)
                expectBitwiseEqual(one, three, "\(label): 1 vs 3 threads")
            }
        }
    }

    @Test("no modifiers and an enormous cap change nothing; sinks on rows without keys give 0 with lse σ")
    func edges() throws {
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 33, headDim: 16, seed: 9)
        let plain = try DenseAttention(causal: true).attend(query: q, key: k, value: v, threads: 1)
        var capped = DenseAttention(causal: true)
        capped.modifiers = ScoreModifiers()
        expectBitwiseEqual(try capped.attend(query: q, key: k, value: v, threads: 1), plain, "empty modifiers")
        capped.modifiers.softCap = 1e6
        expectClose(try capped.attend(query: q, key: k, value: v, threads: 1), plain, tolerance: 1e-5, "cap 1e6")
        // Key padding hides every key of item 1: its rows are 0 with lse = σ_h.
        let (q2, k2, v2) = try randomQKV(batch: 2, heads: 2, queryLength: 20, headDim: 8, seed: 10)
        var sunk = DenseAttention()
        sunk.modifiers.sinks = [0.5, -2]
        let r = try sunk.attend(query: q2, key: k2, value: v2, keyLengths: [20, 0], threads: 2)
        let lse = r.logSumExp.elements, out = r.output.elements
        #expect((40..<60).allSatisfy { lse[$0] == 0.5 } && (60..<80).allSatisfy { lse[$0] == -2 })
        #expect(out[(40 * 8)...].allSatisfy { $0 == 0 })
    }

    @Test("Press et al.'s standard ALiBi slopes")
    func standardSlopes() {
        #expect(ScoreModifiers.standardALiBiSlopes(heads: 8) == (1...8).map { Float(pow(2, -Double($0))) })
        let twelve = ScoreModifiers.standardALiBiSlopes(heads: 12)
        let expected = (1...8).map { pow(2, -Double($0)) } + [0.5, 1.5, 2.5, 3.5].map { pow(2, -$0) }
        #expect(twelve.count == 12 && zip(twelve, expected).allSatisfy { abs(Double($0) - $1) < 1e-7 })
        #expect(ScoreModifiers.standardALiBiSlopes(heads: 1) == [Float(pow(2, -8.0))])
    }

    @Test("a bias in a permuted layout: the row-major bias's results, its NaN found; a NaN outside its elements is no element")
    func permutedBias() throws {
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 10, keyLength: 12, headDim: 8, seed: 3)
        let rowMajor = try Tensor.random(shape: [1, 2, 10, 12], seed: 4)
        // Key-major storage: element [0, h, i, j] at h·120 + j·10 + i.
        var storage = [Float](repeating: 0, count: 240)
        for h in 0..<2 { for i in 0..<10 { for j in 0..<12 { storage[h * 120 + j * 10 + i] = rowMajor[0, h, i, j] } } }
        func attend(_ bias: Tensor) throws -> AttentionResult {
            var dense = DenseAttention(causal: true)
            dense.modifiers = ScoreModifiers(bias: bias)
            return try dense.attend(query: q, key: k, value: v, threads: 1)
        }
        let strides = [240, 120, 1, 10]
        let expected = try attend(rowMajor).output.elements.map(\.bitPattern)
        #expect(try attend(Tensor(shape: [1, 2, 10, 12], storage: storage, strides: strides)).output.elements
            .map(\.bitPattern) == expected)
        var bad = storage
        bad[37] = .nan
        let error = thrownAttentionError { try attend(Tensor(shape: [1, 2, 10, 12], storage: bad, strides: strides)) }
        #expect(error?.message.contains("modifiers.bias must be finite") == true)
        // A NaN past the elements (storage one longer than the tensor) is not checked.
        let gapped = try attend(Tensor(shape: [1, 2, 10, 12], storage: storage + [.nan], strides: strides))
        #expect(gapped.output.elements.map(\.bitPattern) == expected)
    }

    @Test("a bias is checked where the kernels add it: NaN or +infinity on a visible pair throws on every path (tiled, decode, a second pass, backward); on a pair of a skipped tile it is never read")
    func biasCheckedWhereRead() throws {
        let n = 200
        let (q, k, v) = try randomQKV(heads: 2, queryLength: n, headDim: 8, seed: 11)
        let clean = try Tensor.random(shape: [1, 2, n, n], seed: 12)
        func planted(_ value: Float, _ h: Int, _ i: Int, _ j: Int, in base: Tensor = clean) -> Tensor {
            var t = base
            t[0, h, i, j] = value
            return t
        }
        func withBias<A: ModifiableAttention>(_ a: A, _ bias: Tensor) -> A {
            var a = a
            a.modifiers = ScoreModifiers(bias: bias)
            return a
        }
        let dense = DenseAttention(causal: true)
        // The tiled kernel (200 queries), both values, both heads.
        for value in [Float.nan, .infinity] {
            for (h, i, j) in [(0, 150, 20), (1, 199, 199), (1, 63, 0)] {
                let error = thrownAttentionError {
                    try withBias(dense, planted(value, h, i, j)).attend(query: q, key: k, value: v, threads: 2)
                }
                #expect(error?.message.contains("modifiers.bias must be finite") == true, "\(value) at \(h), \(i), \(j)")
            }
        }
        // Hidden pairs in tiles the causal mask skips (query tile 0 sees keys below 64): not
        // read, so the result is the clean bias's, bit for bit; −infinity is a hidden pair.
        let expected = try withBias(dense, clean).attend(query: q, key: k, value: v, threads: 2)
        let hidden = planted(.nan, 0, 0, 199, in: planted(.infinity, 1, 10, 150))
        let unread = try withBias(dense, hidden).attend(query: q, key: k, value: v, threads: 2)
        #expect(unread.output.elements.map(\.bitPattern) == expected.output.elements.map(\.bitPattern))
        #expect(try withBias(dense, planted(-.infinity, 0, 5, 3)).attend(query: q, key: k, value: v, threads: 2)
            .output.elements.allSatisfy(\.isFinite))
        // The decode kernel (fewer than 16 queries).
        let (q3, k3, v3) = try randomQKV(heads: 2, queryLength: 3, keyLength: 40, headDim: 8, seed: 13)
        var small = try Tensor.random(shape: [1, 1, 3, 40], seed: 14)
        small[0, 0, 1, 5] = .nan
        #expect(thrownAttentionError {
            try withBias(DenseAttention(), small).attend(query: q3, key: k3, value: v3, threads: 1)
        }?.message.contains("modifiers.bias must be finite") == true)
        // A pair only strided's column pass scores (query 150, key 4: 146 apart, a multiple of 73).
        let strided = StridedAttention(kind: .strided, stride: 73, causal: true)
        #expect(try withBias(strided, clean).attend(query: q, key: k, value: v, threads: 2).output.elements
            .allSatisfy(\.isFinite))
        #expect(thrownAttentionError {
            try withBias(strided, planted(.nan, 1, 150, 4)).attend(query: q, key: k, value: v, threads: 2)
        }?.message.contains("modifiers.bias must be finite") == true)
        // The backward reads the bias again, and checks it as it does.
        let bad = withBias(dense, planted(.infinity, 0, 120, 7))
        #expect(thrownAttentionError {
            try bad.gradients(query: q, key: k, value: v, output: expected.output, logSumExp: expected.logSumExp,
                              outputGradient: expected.output, keyLengths: nil, threads: 2)
        }?.message.contains("modifiers.bias must be finite") == true)
    }

    @Test("bad modifiers are thrown errors naming the option (a bias NaN once the kernel meets it)")
    func badModifiers() throws {
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 10, headDim: 8, seed: 1)
        let cases: [(ScoreModifiers, String)] = [
            (ScoreModifiers(softCap: 0), "softCap"), (ScoreModifiers(softCap: -.infinity), "softCap"),
            (ScoreModifiers(softCap: .nan), "softCap"),
            (ScoreModifiers(alibiSlopes: [1]), "alibiSlopes has 1 values"),
            (ScoreModifiers(alibiSlopes: [1, .nan]), "alibiSlopes[1]"),
            (ScoreModifiers(sinks: [1, 2, 3]), "sinks has 3"),
            (ScoreModifiers(sinks: [.infinity, 0]), "sinks[0]"),
            (ScoreModifiers(bias: try Tensor(shape: [1, 2, 10, 9])), "modifiers.bias must be"),
            (ScoreModifiers(bias: try Tensor(shape: [1, 3, 10, 10])), "modifiers.bias must be"),
            (ScoreModifiers(bias: try Tensor(shape: [1, 1, 10, 10], repeating: .nan)), "NaN"),
        ]
        // The backward checks the modifiers as the forward does (ModifierBackwardTests covers its results).
        let forward = try DenseAttention().attend(query: q, key: k, value: v, threads: 1)
        for (m, mention) in cases {
            var dense = DenseAttention()
            dense.modifiers = m
            let error = thrownAttentionError { try dense.attend(query: q, key: k, value: v, threads: 1) }
            #expect(error?.message.contains(mention) == true, "\(mention): \(error?.message ?? "no error")")
            let backward = thrownAttentionError {
                try dense.gradients(query: q, key: k, value: v, output: forward.output, logSumExp: forward.logSumExp,
                                    outputGradient: forward.output, keyLengths: nil, threads: 1)
            }
            #expect(backward?.message.contains(mention) == true, "backward \(mention): \(backward?.message ?? "no error")")
        }
    }
}
