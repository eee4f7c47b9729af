// Score modifiers (soft-capping, ALiBi, an additive bias, sinks) on Transformer-XL (over
// its content and relative scores, keys [memory ; segment]), the Compressive Transformer,
// ETC (over [global ; long], after its relative terms) and axial attention (.union):
// the forward against the Double reference of ATTENTION_SPEC.md's "Score modifiers" with
// Transformer-XL's relative terms as the score's own terms, grouped heads, key padding,
// the stateful call equal to the stateless one; the backward against the hand-
// differentiated modified reference (axial; Transformer-XL with zero relative parameters,
// where it is causal dense attention over [memory ; segment]), and against central finite
// differences of its own forward with the relative terms and every modifier; .sum refuses
// modifiers; a bias NaN is found.

@_spi(Testing) @_spi(Benchmarking) import EfficientAttention
import Foundation
import Testing

/// A Transformer-XL configuration for `heads` heads of dimension `d` over up to `memory`
/// memory positions and `segment` queries: random `r`, `u`, `v` (or all zero).
private func xl(heads: Int, headDim d: Int, memory: Int, segment: Int, seed: UInt64,
                zero: Bool = false) throws -> TransformerXLAttention {
    let table = try randomTensor([1, heads, memory + segment, d], seed: seed, in: zero ? 0...0 : -1...1)
    let u = zero ? [Float](repeating: 0, count: heads * d) : try randomTensor([1, 1, heads, d], seed: seed + 1).elements
    let v = zero ? [Float](repeating: 0, count: heads * d) : try randomTensor([1, 1, heads, d], seed: seed + 2).elements
    return TransformerXLAttention(memoryLength: memory, relativePositions: table, contentBias: u, positionBias: v)
}

/// Axial `.union`'s visibility from the spec: coordinates equal on every axis but at most
/// one, causal `coord_t(j) ≤ coord_t(i)` on the axis they differ, key padding.
private func axialUnionVisible(axes: [Int], causal: Bool, keyLengths: [Int]?) -> Visibility {
    let strides = axes.indices.map { t in axes[(t + 1)...].reduce(1, *) }
    let n = axes.reduce(1, *)
    return { b, _, i, j in
        guard j < (keyLengths?[b] ?? n) else { return false }
        let differing = axes.indices.filter { (i / strides[$0]) % axes[$0] != (j / strides[$0]) % axes[$0] }
        guard differing.count <= 1 else { return false }
        guard let t = differing.first else { return true }
        return !causal || (j / strides[t]) % axes[t] < (i / strides[t]) % axes[t]
    }
}

private func withModifiers<A: ModifiableAttention>(_ a: A, _ m: ScoreModifiers) -> A {
    var a = a
    a.modifiers = m
    return a
}

extension GradientSubject {
    /// Axial `.union` on a fixed grid.
    static func axialUnion(axes: [Int], causal: Bool) -> GradientSubject {
        GradientSubject(label: "axial union \(axes)" + (causal ? " causal" : ""),
                        attention: AxialAttention(axes: axes, causal: causal)) { _, lengths in
            axialUnionVisible(axes: axes, causal: causal, keyLengths: lengths)
        }
    }

    /// Transformer-XL with zero relative parameters: causal dense attention over
    /// `[memory ; segment]` (the keys past `Nq` are memory), whose backward the modified
    /// reference differentiates exactly.
    static func zeroRelativeXL(heads: Int, headDim: Int, memory: Int, segment: Int) -> GradientSubject {
        GradientSubject(label: "transformer-xl, zero relative terms, memory \(memory)",
                        attention: try! xl(heads: heads, headDim: headDim, memory: memory, segment: segment, seed: 1,
                                           zero: true)) { s, lengths in
            Visible.dense(causal: true, queryLength: s.queryLength, keyLength: s.keyLength, keyLengths: lengths)
        }
    }
}

enum RelativeAndAxialModifierCases {
    static let backward: [ModifierBackwardCase] = {
        let choices = [ModifierBackwardCases.modifierChoices[8], .all, ModifierChoice(softCap: 0.8),
                       ModifierChoice(bias: [2, 4])]
        var cases: [ModifierBackwardCase] = []
        for causal in [false, true] {
            for choice in choices {
                cases.append(ModifierBackwardCase(subject: .axialUnion(axes: [7, 11], causal: causal), choice: choice,
                                                  batch: 2, heads: 4, kvHeads: 2, queryLength: 77, headDim: 3,
                                                  keyLengths: [77, 0]))
            }
            cases.append(ModifierBackwardCase(subject: .axialUnion(axes: [3, 4, 12], causal: causal), choice: .all,
                                              batch: 2, heads: 4, kvHeads: 2, queryLength: 144, headDim: 8,
                                              valueDim: 5, keyLengths: [144, 60]))
        }
        for choice in choices {
            cases.append(ModifierBackwardCase(subject: .zeroRelativeXL(heads: 4, headDim: 3, memory: 13, segment: 77),
                                              choice: choice, batch: 2, heads: 4, kvHeads: 2, queryLength: 77,
                                              keyLength: 90, headDim: 3, keyLengths: [90, 0]))
        }
        cases.append(ModifierBackwardCase(subject: .zeroRelativeXL(heads: 2, headDim: 65, memory: 70, segment: 140),
                                          choice: .all, heads: 2, queryLength: 140, keyLength: 210, headDim: 65))
        for causal in [false, true] {
            let etc = GradientSubject.pattern("etc G5 r6" + (causal ? " causal" : ""),
                                              ETCAttention(globals: 5, radius: 6, causal: causal)) {
                try $0.pattern(for: $1)
            }
            for choice in [ModifierBackwardCases.modifierChoices[8], .all] {
                cases.append(ModifierBackwardCase(subject: etc, choice: choice, batch: 2, heads: 4, kvHeads: 2,
                                                  queryLength: 90, headDim: 3, keyLengths: [90, 40]))
            }
        }
        return cases.enumerated().map { n, c in
            var c = c
            c.seed = 46_000 + UInt64(n)
            return c
        }
    }()
}

@Suite("Score modifiers on Transformer-XL and axial attention")
struct RelativeAndAxialModifierTests {
    @Test("Transformer-XL: each modifier and all together over content and relative scores, against the Double reference")
    func transformerXLForward() throws {
        for (batch, heads, kvHeads, nq, memory, padding) in [(2, 4, 2, 45, 13, [58, 20]), (1, 3, 3, 70, 0, nil),
                                                              (1, 2, 1, 5, 66, nil)] {
            let nk = nq + memory
            let attention = try xl(heads: heads, headDim: 16, memory: memory, segment: nq, seed: 5)
            let (q, k, v) = try randomQKV(batch: batch, heads: heads, kvHeads: kvHeads, queryLength: nq, keyLength: nk,
                                          headDim: 16, seed: 6, range: -2...2)
            let term = relativeTerm(attention, query: q, key: k, memory: memory, scale: defaultScale(headDim: 16))
            let visible = Visible.both(Visible.causal(queryLength: nq, keyLength: nk),
                                       { b, _, _, j in j < (padding?[b] ?? nk) })
            for (name, m) in try ScoreModifierTests.modifierSets(batch: batch, heads: heads, queryLength: nq,
                                                                   keyLength: nk) {
                let modified = withModifiers(attention, m)
                let label = "transformer-xl \(name) B\(batch) H\(heads)/\(kvHeads) Nq\(nq) M\(memory)"
                let result = try modified.attend(query: q, key: k, value: v, keyLengths: padding, threads: 2)
                let reference = modifiedReference(query: q, key: k, value: v, visible: visible, modifiers: m) {
                    s, b, h, i, j in s + term(b, h, i, j)
                }
                ScoreModifierTests.check(result, reference, label)
                expectBitwiseEqual(try modified.attend(query: q, key: k, value: v, keyLengths: padding, threads: 1),
                                   try modified.attend(query: q, key: k, value: v, keyLengths: padding, threads: 3),
                                   "\(label): 1 vs 3 threads")
            }
        }
    }

    @Test("Transformer-XL: the stateful call with modifiers equals the stateless call over [memory ; segment]")
    func transformerXLStateful() throws {
        let (heads, d, segment, memoryLength) = (2, 8, 20, 30)
        var attention = try xl(heads: heads, headDim: d, memory: memoryLength, segment: segment, seed: 7)
        var memory = try TransformerXLMemory(batch: 1, kvHeads: heads, headDim: d, capacity: memoryLength)
        var keys: Tensor? = nil, values: Tensor? = nil
        for step in 0..<3 {
            let (q, k, v) = try randomQKV(heads: heads, queryLength: segment, headDim: d, seed: 70 + UInt64(step))
            let stored = memory.storedLength
            attention.modifiers = ScoreModifiers(
                softCap: 3, alibiSlopes: [0.3, 0.1],
                bias: try randomTensor([1, heads, segment, stored + segment], seed: 80 + UInt64(step)), sinks: [0.5, -1])
            // The stateless call's keys: the memory's last `stored` positions, then the segment.
            let allKeys = try keys.map { try positions($0, from: $0.shape[2] - stored, then: k) } ?? k
            let allValues = try values.map { try positions($0, from: $0.shape[2] - stored, then: v) } ?? v
            let stateless = try attention.attend(query: q, key: allKeys, value: allValues, threads: 2)
            let stateful = try attention.attend(query: q, key: k, value: v, memory: &memory, threads: 2)
            expectBitwiseEqual(stateful, stateless, "step \(step), \(stored) stored positions")
            (keys, values) = (allKeys, allValues)
        }
        // A bias sized for the wrong number of keys names it.
        attention.modifiers = ScoreModifiers(bias: try Tensor(shape: [1, 1, segment, segment]))
        let (q, k, v) = try randomQKV(heads: heads, queryLength: segment, headDim: d, seed: 90)
        expectAttentionError(.shapeMismatch, mentioning: ["modifiers.bias"]) {
            try attention.attend(query: q, key: k, value: v, memory: &memory, threads: 1)
        }
    }

    /// Positions `start...` (axis 2) of `tensor`, followed by every position of `next`.
    private func positions(_ tensor: Tensor, from start: Int, then next: Tensor) throws -> Tensor {
        let s = tensor.shape
        var data = [Float]()
        for a in 0..<s[0] { for b in 0..<s[1] {
            for n in start..<s[2] { for c in 0..<s[3] { data.append(tensor[a, b, n, c]) } }
            for n in 0..<next.shape[2] { for c in 0..<s[3] { data.append(next[a, b, n, c]) } }
        } }
        return try Tensor(shape: [s[0], s[1], s[2] - start + next.shape[2], s[3]], data: data)
    }

    @Test("the Compressive Transformer takes Transformer-XL's modifiers: stateless forward and gradients, and stateful calls without a compressed memory, equal Transformer-XL's bitwise")
    func compressive() throws {
        let (batch, heads, kvHeads, d, segment, memoryLength) = (2, 4, 2, 8, 12, 9)
        let base = try xl(heads: heads, headDim: d, memory: memoryLength, segment: segment, seed: 20)
        let m = ScoreModifiers(softCap: 2, alibiSlopes: ScoreModifiers.standardALiBiSlopes(heads: heads),
                               bias: try randomTensor([1, heads, segment, segment + 6], seed: 21), sinks: [0.1, -1, 2, 0])
        var compressive = CompressiveTransformerAttention(
            memoryLength: memoryLength - 3, compressedMemoryLength: 3, relativePositions: base.relativePositions,
            contentBias: base.contentBias, positionBias: base.positionBias)
        compressive.modifiers = m
        let transformerXL = withModifiers(base, m)
        let (q, k, v) = try randomQKV(batch: batch, heads: heads, kvHeads: kvHeads, queryLength: segment,
                                      keyLength: segment + 6, headDim: d, seed: 22)
        let result = try compressive.attend(query: q, key: k, value: v, keyLengths: [18, 10], threads: 2)
        expectBitwiseEqual(result, try transformerXL.attend(query: q, key: k, value: v, keyLengths: [18, 10], threads: 2),
                           "stateless")
        let dO = try randomTensor([batch, heads, segment, d], seed: 23)
        let mine = try compressive.modifierGradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                                     keyLengths: [18, 10], threads: 3)
        let theirs = try transformerXL.modifierGradients(query: q, key: k, value: v, result: result,
                                                         outputGradient: dO, keyLengths: [18, 10], threads: 3)
        expectBitwiseEqualGradients(mine.inputs, theirs.inputs, "gradients")
        #expect(mine.modifiers == theirs.modifiers && mine.modifiers.bias != nil && mine.modifiers.sinks != nil)
        // Stateful, no compressed memory: Transformer-XL's memory, step by step.
        var plain = CompressiveTransformerAttention(
            memoryLength: memoryLength, compressedMemoryLength: 0, relativePositions: base.relativePositions,
            contentBias: base.contentBias, positionBias: base.positionBias)
        var reference = base
        var memory = try CompressiveMemory(batch: 1, kvHeads: kvHeads, headDim: d, capacity: memoryLength,
                                           compressedCapacity: 0)
        var xlMemory = try TransformerXLMemory(batch: 1, kvHeads: kvHeads, headDim: d, capacity: memoryLength)
        for step in 0..<3 {
            let (sq, sk, sv) = try randomQKV(heads: heads, kvHeads: kvHeads, queryLength: segment, headDim: d,
                                             seed: 30 + UInt64(step))
            plain.modifiers = ScoreModifiers(softCap: 3, bias: try randomTensor(
                [1, 1, segment, xlMemory.storedLength + segment], seed: 40 + UInt64(step)), sinks: [0, 1, -1, 0.5])
            reference.modifiers = plain.modifiers
            expectBitwiseEqual(try plain.attend(query: sq, key: sk, value: sv, memory: &memory, threads: 2),
                               try reference.attend(query: sq, key: sk, value: sv, memory: &xlMemory, threads: 2),
                               "stateful step \(step)")
        }
    }

    @Test("axial .union: each modifier and all together against the Double reference; .sum refuses modifiers")
    func axialForward() throws {
        for (axes, batch, heads, kvHeads, padding, causal) in [([5, 9], 2, 4, 2, [45, 17], false),
                                                               ([3, 4, 3], 1, 3, 1, nil, true),
                                                               ([130, 2], 1, 2, 2, nil, false)] {
            let n = axes.reduce(1, *)
            let (q, k, v) = try randomQKV(batch: batch, heads: heads, kvHeads: kvHeads, queryLength: n, headDim: 16,
                                          seed: 8, range: -2...2)
            let attention = AxialAttention(axes: axes, causal: causal)
            let visible = axialUnionVisible(axes: axes, causal: causal, keyLengths: padding)
            for (name, m) in try ScoreModifierTests.modifierSets(batch: batch, heads: heads, queryLength: n, keyLength: n) {
                let modified = withModifiers(attention, m)
                let label = "axial \(axes) \(name)" + (causal ? " causal" : "")
                let result = try modified.attend(query: q, key: k, value: v, keyLengths: padding, threads: 2)
                ScoreModifierTests.check(result, modifiedReference(query: q, key: k, value: v, visible: visible,
                                                                   modifiers: m), label)
                expectBitwiseEqual(try modified.attend(query: q, key: k, value: v, keyLengths: padding, threads: 1),
                                   try modified.attend(query: q, key: k, value: v, keyLengths: padding, threads: 3),
                                   "\(label): 1 vs 3 threads")
            }
            let sum = withModifiers(AxialAttention(axes: axes, combination: .sum, causal: causal),
                                    ScoreModifiers(softCap: 5))
            expectAttentionError(.unsupported, mentioning: ["modifiers", ".union"]) {
                try sum.attend(query: q, key: k, value: v, keyLengths: padding, threads: 1)
            }
        }
    }

    @Test("backward with modifiers against the hand-differentiated reference",
          arguments: RelativeAndAxialModifierCases.backward)
    func backward(_ c: ModifierBackwardCase) throws { try c.check() }

    @Test("Transformer-XL with relative terms and every modifier: the backward agrees with central finite differences")
    func transformerXLFiniteDifferences() throws {
        let (nq, memory, d) = (5, 3, 3)
        let (q, k, v) = try randomQKV(batch: 2, heads: 2, kvHeads: 1, queryLength: nq, keyLength: nq + memory,
                                      headDim: d, seed: 9)
        let dO = try randomTensor([2, 2, nq, d], seed: 10)
        let attention = withModifiers(
            try xl(heads: 2, headDim: d, memory: memory, segment: nq, seed: 11),
            ScoreModifiers(softCap: 1.5, alibiSlopes: [0.4, 0.2],
                           bias: try randomTensor([1, 2, nq, nq + memory], seed: 12), sinks: [0.3, -0.4]))
        let (worst, largest) = try finiteDifferenceGap(attention, query: q, key: k, value: v, outputGradient: dO,
                                                       keyLengths: [nq + memory, 4])
        #expect(largest > 0.05 && worst <= 2e-3 * (1 + largest), "finite differences: \(worst), largest \(largest)")
    }

    @Test("ETC with its relative table: each modifier and all together against the Double reference; the backward against finite differences")
    func etc() throws {
        let (batch, heads, kvHeads, n, globals, kappa, d) = (2, 4, 2, 60, 6, 3, 16)
        let table = try randomTensor([1, heads, 2 * kappa + 1, d], seed: 50)
        for causal in [false, true] {
            let attention = ETCAttention(globals: globals, radius: 9, relativePositions: table, causal: causal)
            let shape = AttentionShape(batch: batch, heads: heads, kvHeads: kvHeads, queryLength: n, headDim: d)
            let (q, k, v) = try randomQKV(batch: batch, heads: heads, kvHeads: kvHeads, queryLength: n, headDim: d,
                                          seed: 51, range: -2...2)
            let visible = patternVisibility(try attention.pattern(for: shape), keyLengths: [60, 33])
            let scale = defaultScale(headDim: d)
            /// `scale · q_p · a[clip(j − p) + κ]` on long → long pairs.
            func relative(_ s: Double, _ b: Int, _ h: Int, _ p: Int, _ j: Int) -> Double {
                guard p >= globals, j >= globals else { return s }
                let t = min(max(j - p, -kappa), kappa) + kappa
                var dot = 0.0
                for c in 0..<d { dot += Double(q[b, h, p, c]) * Double(table[0, h, t, c]) }
                return s + scale * dot
            }
            for (name, m) in try ScoreModifierTests.modifierSets(batch: batch, heads: heads, queryLength: n, keyLength: n) {
                let modified = withModifiers(attention, m)
                let label = "etc \(name)" + (causal ? " causal" : "")
                let result = try modified.attend(query: q, key: k, value: v, keyLengths: [60, 33], threads: 2)
                ScoreModifierTests.check(result, modifiedReference(query: q, key: k, value: v, visible: visible,
                                                                   modifiers: m, score: relative), label)
                expectBitwiseEqual(try modified.attend(query: q, key: k, value: v, keyLengths: [60, 33], threads: 1),
                                   try modified.attend(query: q, key: k, value: v, keyLengths: [60, 33], threads: 3),
                                   "\(label): 1 vs 3 threads")
            }
            // The backward with the table and every modifier, against its own forward.
            let small = ETCAttention(globals: 2, radius: 2, relativePositions: try randomTensor([1, 2, 5, 3], seed: 52),
                                     causal: causal)
            let (sq, sk, sv) = try randomQKV(batch: 2, heads: 2, kvHeads: 1, queryLength: 7, headDim: 3, seed: 53)
            let withAll = withModifiers(small, ScoreModifiers(softCap: 1.5, alibiSlopes: [0.3, 0.1],
                                                              bias: try randomTensor([2, 1, 7, 7], seed: 54),
                                                              sinks: [0.2, -0.3]))
            let (worst, largest) = try finiteDifferenceGap(withAll, query: sq, key: sk, value: sv,
                                                           outputGradient: try randomTensor([2, 2, 7, 3], seed: 55),
                                                           keyLengths: [7, 5])
            #expect(largest > 0.05 && worst <= 2e-3 * (1 + largest),
                    "causal \(causal): finite differences \(worst), largest \(largest)")
        }
    }

    @Test("with modifiers, parameterGradients' input gradients are gradients' bit for bit (Transformer-XL, ETC), and a gradient of the relative parameters moves with the cap")
    func parameterGradientsTakeModifiers() throws {
        let m = ScoreModifiers(softCap: 0.7, alibiSlopes: [0.2, 0.4], bias: try randomTensor([1, 2, 20, 30], seed: 60),
                               sinks: [0.5, -0.5])
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 20, keyLength: 30, headDim: 8, seed: 61)
        let dO = try randomTensor([1, 2, 20, 8], seed: 62)
        let plainXL = try xl(heads: 2, headDim: 8, memory: 10, segment: 20, seed: 63)
        let transformerXL = withModifiers(plainXL, m)
        let result = try transformerXL.attend(query: q, key: k, value: v, threads: 2)
        let both = try transformerXL.parameterGradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                                        threads: 3)
        expectBitwiseEqualGradients(both.inputs, try transformerXL.gradients(query: q, key: k, value: v, result: result,
                                                                             outputGradient: dO, threads: 2),
                                    "transformer-xl")
        // The cap changes the relative parameters' gradients (they pass through its derivative).
        let plainResult = try plainXL.attend(query: q, key: k, value: v, threads: 2)
        let plain = try plainXL.parameterGradients(query: q, key: k, value: v, result: plainResult, outputGradient: dO)
        #expect(plain.parameters.contentBias != both.parameters.contentBias
                && both.parameters.relativePositions.allSatisfy(\.isFinite))
        let (qe, ke, ve) = try randomQKV(heads: 2, queryLength: 30, headDim: 8, seed: 64)
        var mEtc = m
        mEtc.bias = try randomTensor([1, 2, 30, 30], seed: 65)
        let etc = withModifiers(ETCAttention(globals: 4, radius: 5, relativePositions: try randomTensor([1, 2, 5, 8], seed: 66)),
                                mEtc)
        let etcResult = try etc.attend(query: qe, key: ke, value: ve, threads: 2)
        let dOe = try randomTensor([1, 2, 30, 8], seed: 67)
        expectBitwiseEqualGradients(try etc.parameterGradients(query: qe, key: ke, value: ve, result: etcResult,
                                                               outputGradient: dOe, threads: 3).inputs,
                                    try etc.gradients(query: qe, key: ke, value: ve, result: etcResult,
                                                      outputGradient: dOe, threads: 2), "etc")
    }

    @Test("with every modifier: forward and gradients bitwise identical for 1, 2, 3 and 7 threads and through NaN-padded strided views (Transformer-XL, Compressive, ETC, axial)")
    func invariance() throws {
        let (heads, n) = (4, 40)
        func modifiers(_ nk: Int) throws -> ScoreModifiers {
            ScoreModifiers(softCap: 1.5, alibiSlopes: ScoreModifiers.standardALiBiSlopes(heads: heads),
                           bias: try randomTensor([2, 1, n, nk], seed: 70), sinks: [0.3, -0.2, 1, 0])
        }
        let base = try xl(heads: heads, headDim: 8, memory: 12, segment: n, seed: 71)
        var compressive = CompressiveTransformerAttention(
            memoryLength: 8, compressedMemoryLength: 4, relativePositions: base.relativePositions,
            contentBias: base.contentBias, positionBias: base.positionBias)
        compressive.modifiers = try modifiers(n + 12)
        let subjects: [(String, any ModifiableAttention & DifferentiableAttention, Int)] = [
            ("transformer-xl", withModifiers(base, try modifiers(n + 12)), n + 12),
            ("compressive", compressive, n + 12),
            ("etc", withModifiers(ETCAttention(globals: 3, radius: 4, relativePositions: try randomTensor([1, heads, 5, 8],
                                                                                                       seed: 72),
                                               causal: true), try modifiers(n)), n),
            ("axial", withModifiers(AxialAttention(axes: [5, 8], causal: true), try modifiers(n)), n),
        ]
        for (name, attention, nk) in subjects {
            let (q, k, v) = try randomQKV(batch: 2, heads: heads, kvHeads: 2, queryLength: n, keyLength: nk, headDim: 8,
                                          seed: 73)
            let dO = try randomTensor([2, heads, n, 8], seed: 74)
            let padding = [nk, nk - 9]
            let one = try attention.attend(query: q, key: k, value: v, keyLengths: padding, threads: 1)
            let gradients = try attention.gradients(query: q, key: k, value: v, result: one, outputGradient: dO,
                                                    keyLengths: padding, threads: 1)
            for threads in [2, 3, 7] {
                let other = try attention.attend(query: q, key: k, value: v, keyLengths: padding, threads: threads)
                expectBitwiseEqual(other, one, "\(name): \(threads) threads")
                expectBitwiseEqualGradients(try attention.gradients(query: q, key: k, value: v, result: one,
                                                                    outputGradient: dO, keyLengths: padding,
                                                                    threads: threads),
                                            gradients, "\(name): gradients, \(threads) threads")
            }
            let (sq, sk, sv) = (try embeddedInNaN(q), try embeddedInNaN(k, innerStride: 2), try embeddedInNaN(v))
            let viewed = try attention.attend(query: sq, key: sk, value: sv, keyLengths: padding, threads: 2)
            expectBitwiseEqual(viewed, one, "\(name): strided views")
            expectBitwiseEqualGradients(try attention.gradients(query: sq, key: sk, value: sv, result: one,
                                                                outputGradient: try embeddedInNaN(dO),
                                                                keyLengths: padding, threads: 2),
                                        gradients, "\(name): gradients through strided views")
        }
    }

    @Test("a bias NaN on a pair Transformer-XL or axial scores throws")
    func biasChecked() throws {
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 36, keyLength: 46, headDim: 8, seed: 13)
        var bias = try randomTensor([1, 2, 36, 46], seed: 14)
        bias[0, 1, 20, 25] = .nan   // 20 + 10 − 25 = 5 ≥ 0: visible
        let transformerXL = withModifiers(try xl(heads: 2, headDim: 8, memory: 10, segment: 36, seed: 15),
                                          ScoreModifiers(bias: bias))
        expectAttentionError(.invalidParameter, mentioning: ["modifiers.bias must be finite"]) {
            try transformerXL.attend(query: q, key: k, value: v, threads: 2)
        }
        let (qa, ka, va) = try randomQKV(heads: 2, queryLength: 36, headDim: 8, seed: 16)
        var axialBias = try randomTensor([1, 1, 36, 36], seed: 17)
        axialBias[0, 0, 7, 31] = .nan   // grid [6, 6]: (1, 1) and (5, 1) share a column
        let axial = withModifiers(AxialAttention(axes: [6, 6]), ScoreModifiers(bias: axialBias))
        expectAttentionError(.invalidParameter, mentioning: ["modifiers.bias must be finite"]) {
            try axial.attend(query: qa, key: ka, value: va, threads: 2)
        }
    }
}
