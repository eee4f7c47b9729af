// The backward passes of the conformers on the tiled kernel other than dense: multi-query
// (grouped key/value heads), local (sliding window and blocked), strided (strided and
// fixed), Longformer and BigBird. Each is checked against the Double reference of its
// forward differentiated by hand (DenseBackwardTests' reference with the conformer's
// visibility) on awkward shapes (N not a multiple of the tile, window, block or stride;
// D = 1, 3, 65; Dv != D; Nq != Nk where the conformer allows it; H = 4 over Hkv = 2 or 1;
// key padding down to an item with no key; rows with no visible key), causal and not;
// against central finite differences of the library's own forward on a tiny shape; for
// bitwise identical results with 1, 2, 3 and 7 threads; for the view entry point (strided
// NaN-padded views, a caller's workspace) against the Tensor convenience; and for the
// backward cost.

@_spi(Testing) @_spi(Benchmarking) import EfficientAttention
import Foundation
import Testing

/// A conformer under test and its forward's visibility.
struct GradientSubject: Sendable, CustomStringConvertible {
    var label: String
    var attention: any DifferentiableAttention
    /// Whether the conformer takes `Nq > Nk` (BigBird does not).
    var allowsLongerQueries = true
    /// The forward's visible pairs for a shape and key lengths.
    var visibility: @Sendable (AttentionShape, [Int]?) throws -> Visibility

    var description: String { label }

    /// A fixed-pattern conformer: its pattern's visibility (checked against the spec by the
    /// forward's tests) with key padding.
    static func pattern<A: DifferentiableAttention, P: AttentionPattern>(
        _ label: String, _ attention: A, allowsLongerQueries: Bool = true,
        _ pattern: @escaping @Sendable (A, AttentionShape) throws -> P
    ) -> GradientSubject {
        GradientSubject(label: label, attention: attention, allowsLongerQueries: allowsLongerQueries) { shape, lengths in
            patternVisibility(try pattern(attention, shape), keyLengths: lengths)
        }
    }

    static func multiQuery(left: Int?, right: Int?, causal: Bool) -> GradientSubject {
        GradientSubject(label: "multi-query left \(left.map(String.init) ?? "-") right \(right.map(String.init) ?? "-")"
                            + (causal ? " causal" : ""),
                        attention: MultiQueryAttention(causal: causal, leftWindow: left, rightWindow: right)) { s, lengths in
            let offset = s.keyLength - s.queryLength
            return { b, _, i, j in
                let p = i + offset
                return j < (lengths?[b] ?? s.keyLength) && (left.map { j >= p - $0 } ?? true)
                    && (right.map { j <= p + $0 } ?? true) && (!causal || j <= p)
            }
        }
    }

    static func local(_ attention: LocalAttention) -> GradientSubject {
        .pattern("local \(attention.form)" + (attention.causal ? " causal" : ""), attention) { try $0.pattern(for: $1) }
    }

    static func strided(_ attention: StridedAttention) -> GradientSubject {
        .pattern("strided \(attention.kind) stride \(attention.stride.map(String.init) ?? "default")"
                    + (attention.causal ? " causal" : ""), attention) { try $0.pattern(for: $1) }
    }

    static func longformer(_ attention: LongformerAttention) -> GradientSubject {
        .pattern("longformer window \(attention.window) dilations \(attention.dilations) globals \(attention.globalPositions)"
                    + (attention.causal ? " causal" : ""), attention) { try $0.pattern(for: $1) }
    }

    static func bigBird(_ attention: BigBirdAttention) -> GradientSubject {
        .pattern("bigbird block \(attention.blockSize) random \(attention.randomBlockCount) globals "
                    + "\(attention.globalBlocks.map { "\($0)" } ?? "default")" + (attention.causal ? " causal" : ""),
                 attention, allowsLongerQueries: false) { try $0.pattern(for: $1) }
    }

    /// Every subject, causal and not.
    static let all: [GradientSubject] = [false, true].flatMap { causal in
        [multiQuery(left: nil, right: nil, causal: causal),
         multiQuery(left: 9, right: 4, causal: causal),
         local(LocalAttention(left: 20, right: 7, causal: causal)),
         local(LocalAttention(blockSize: 24, lookBackward: 1, lookForward: 1, causal: causal)),
         local(LocalAttention(blockSize: 50, lookBackward: 2, lookForward: 0, causal: causal)),
         local(LocalAttention(blockSize: 200, lookBackward: 0, lookForward: 0, causal: causal)),
         strided(StridedAttention(kind: .strided, stride: 7, causal: causal)),
         strided(StridedAttention(kind: .strided, causal: causal)),
         // Classes of 65 and 64 queries at Nq = 129: the class tiles' indices must follow the partition.
         strided(StridedAttention(kind: .strided, stride: 2, causal: causal)),
         strided(StridedAttention(kind: .fixed(summary: 2), stride: 16, causal: causal)),
         strided(StridedAttention(kind: .fixed(summary: 1), stride: 5, causal: causal)),
         longformer(LongformerAttention(window: 16, globalPositions: [0, 5, 6, 12], causal: causal)),
         longformer(LongformerAttention(window: 10, dilations: [2], globalPositions: [3, 11, 12], causal: causal)),
         longformer(LongformerAttention(window: 6, dilations: [3], causal: causal)),
         bigBird(BigBirdAttention(blockSize: 16, randomBlockCount: 2, seed: 7, causal: causal)),
         bigBird(BigBirdAttention(blockSize: 5, randomBlockCount: 1, globalBlocks: [1], seed: 8, causal: causal)),
         bigBird(BigBirdAttention(blockSize: 48, randomBlockCount: 1, globalBlocks: [], seed: 9, causal: causal))]
    }
}

/// One problem for one subject.
struct PatternBackwardCase: Sendable, CustomTestStringConvertible {
    var subject: GradientSubject
    var batch = 1, heads = 4, kvHeads: Int? = 2
    var queryLength: Int, keyLength: Int? = nil
    var headDim = 16, valueDim: Int? = nil
    var keyLengths: [Int]? = nil
    var seed: UInt64 = 0

    var nk: Int { keyLength ?? queryLength }
    var shape: AttentionShape {
        AttentionShape(batch: batch, heads: heads, kvHeads: kvHeads ?? heads, queryLength: queryLength, keyLength: nk,
                       headDim: headDim, valueDim: valueDim ?? headDim)
    }
    var testDescription: String {
        "\(subject.label): B\(batch) H\(heads)/\(kvHeads ?? heads) Nq\(queryLength) Nk\(nk) D\(headDim) Dv\(valueDim ?? headDim)"
            + (keyLengths.map { " keyLengths\($0)" } ?? "")
    }

    func inputs() throws -> (q: Tensor, k: Tensor, v: Tensor, result: AttentionResult, dO: Tensor) {
        let (q, k, v) = try randomQKV(batch: batch, heads: heads, kvHeads: kvHeads, queryLength: queryLength,
                                      keyLength: keyLength, headDim: headDim, valueDim: valueDim, seed: seed)
        let result = try subject.attention.attend(query: q, key: k, value: v, keyLengths: keyLengths, threads: nil)
        let dO = try randomTensor([batch, heads, queryLength, valueDim ?? headDim], seed: seed &* 7 &+ 5)
        return (q, k, v, result, dO)
    }

    func gradients(threads: Int?) throws -> AttentionGradients {
        let (q, k, v, result, dO) = try inputs()
        return try subject.attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                               keyLengths: keyLengths, threads: threads)
    }

    /// The library's gradients against the Double reference with the subject's visibility.
    func check(sourceLocation: SourceLocation = #_sourceLocation) throws {
        let (q, k, v, result, dO) = try inputs()
        let visible = try subject.visibility(shape, keyLengths)
        let scale = 1 / Float(headDim).squareRoot()
        let reference = referenceBackward(query: q, key: k, value: v, outputGradient: dO,
                                          scale: defaultScale(headDim: headDim), visible: visible)
        let naive = naiveFloatBackward(query: q, key: k, value: v, outputGradient: dO, scale: scale, visible: visible)
        let g = try subject.attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                                keyLengths: keyLengths, threads: 2)
        checkGradients(g, reference: reference, naive: naive, dims: GradientDims(query: q, value: v), visible: visible,
                       testDescription, sourceLocation: sourceLocation)
    }
}

enum PatternBackwardCases {
    /// Awkward shapes for one subject (seeds distinct per shape).
    static func shapes(_ s: GradientSubject, base: UInt64) -> [PatternBackwardCase] {
        var cases = [
            PatternBackwardCase(subject: s, queryLength: 77),
            PatternBackwardCase(subject: s, heads: 2, kvHeads: 1, queryLength: 200, headDim: 3),
            PatternBackwardCase(subject: s, heads: 2, kvHeads: nil, queryLength: 130, headDim: 65, valueDim: 7),
            PatternBackwardCase(subject: s, heads: 1, kvHeads: nil, queryLength: 45, headDim: 1),
            PatternBackwardCase(subject: s, queryLength: 37, keyLength: 150, headDim: 8, valueDim: 5),
            PatternBackwardCase(subject: s, batch: 3, queryLength: 70, keyLength: 90, headDim: 9, valueDim: 33,
                                keyLengths: [90, 0, 45]),
            PatternBackwardCase(subject: s, batch: 2, heads: 4, kvHeads: 1, queryLength: 129, keyLength: 260,
                                headDim: 33, keyLengths: [17, 260]),
        ]
        if s.allowsLongerQueries {
            cases.append(PatternBackwardCase(subject: s, queryLength: 150, keyLength: 37, headDim: 8))
            cases.append(PatternBackwardCase(subject: s, batch: 2, queryLength: 90, keyLength: 66, headDim: 4,
                                             keyLengths: [66, 20]))
        }
        return cases.enumerated().map { n, c in
            var c = c
            c.seed = base + UInt64(n)
            return c
        }
    }

    static let all: [PatternBackwardCase] = GradientSubject.all.enumerated().flatMap { n, s in
        shapes(s, base: 10_000 + 100 * UInt64(n))
    }
}

/// Bitwise equality of two gradients, with the first difference named.
func expectBitwiseEqualGradients(_ a: AttentionGradients, _ b: AttentionGradients, _ label: String,
                                 sourceLocation: SourceLocation = #_sourceLocation) {
    for (name, x, y) in [("dQuery", a.dQuery, b.dQuery), ("dKey", a.dKey, b.dKey), ("dValue", a.dValue, b.dValue)] {
        let (p, q) = (x.elements, y.elements)
        #expect(x.shape == y.shape && bitwiseEqual(p, q), "\(label): \(name) differs at \(firstDifference(p, q))",
                sourceLocation: sourceLocation)
    }
}

@Suite("Pattern backward")
struct PatternBackwardTests {
    @Test("matches the hand-differentiated Double reference", arguments: PatternBackwardCases.all)
    func reference(_ c: PatternBackwardCase) throws { try c.check() }

    /// `L = Σ dO ∘ O` through the library's Float forward, central differences with step
    /// `h = 1e-2` on every input element, against the library's backward (truncation
    /// `O(h²)` and Float rounding `O(ε / h)`: both far below the tolerance).
    @Test("gradients agree with central finite differences of the library's forward", arguments: GradientSubject.all)
    func finiteDifferences(_ s: GradientSubject) throws {
        let c = PatternBackwardCase(subject: s, batch: 2, heads: 2, kvHeads: 1, queryLength: 11, keyLength: 13,
                                    headDim: 3, valueDim: 2, keyLengths: [13, 9], seed: 20_000)
        let (q, k, v, _, dO) = try c.inputs()
        let (worst, largest) = try finiteDifferenceGap(s.attention, query: q, key: k, value: v, outputGradient: dO,
                                                       keyLengths: c.keyLengths)
        #expect(worst < 2e-3 * (1 + largest), "\(s.label): finite differences differ by \(worst) (max |g| \(largest))")
        #expect(largest > 0.01, "\(s.label): the gradients vanish")
    }

    @Test("bitwise identical gradients for 1, 2, 3 and 7 threads, and across runs", arguments: GradientSubject.all)
    func determinism(_ s: GradientSubject) throws {
        for c in [PatternBackwardCase(subject: s, batch: 2, heads: 4, kvHeads: 2, queryLength: 333, keyLength: 400,
                                      headDim: 20, valueDim: 33, keyLengths: [400, 250], seed: 30_000),
                  // One key/value head for the whole group: consecutive key blocks are
                  // consecutive work items, so the dQ ordering makes workers wait.
                  PatternBackwardCase(subject: s, heads: 2, kvHeads: 1, queryLength: 700, headDim: 32, seed: 30_001)] {
            let runs = try [1, 2, 3, 7, 7].map { try c.gradients(threads: $0) }
            for (n, g) in runs.enumerated().dropFirst() {
                expectBitwiseEqualGradients(runs[0], g, "\(c.testDescription) run \(n)")
            }
        }
    }

    @Test("the view entry point (strided NaN-padded views, a caller's workspace) equals the Tensor convenience",
          arguments: GradientSubject.all)
    func viewEntryPoint(_ s: GradientSubject) throws {
        let c = PatternBackwardCase(subject: s, batch: 2, heads: 4, kvHeads: 2, queryLength: 150, keyLength: 170,
                                    headDim: 12, valueDim: 6, keyLengths: [170, 61], seed: 40_000)
        let (q, k, v, result, dO) = try c.inputs()
        let expected = try s.attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                                 keyLengths: c.keyLengths, threads: 2)
        let workspace = try AttentionWorkspace(byteCount: try s.attention.backwardCost(c.shape, threads: 3).workspaceBytes)
        // Gradients in strided memory filled with 12345: every element must be written.
        var dq = try embeddedInNaN(try Tensor(shape: q.shape, repeating: 12345), innerStride: 2)
        var dk = try embeddedInNaN(try Tensor(shape: k.shape, repeating: 12345))
        var dv = try embeddedInNaN(try Tensor(shape: v.shape, repeating: 12345), innerStride: 3)
        let (eq, ek, ev) = (try embeddedInNaN(q, innerStride: 2), try embeddedInNaN(k), try embeddedInNaN(v, innerStride: 2))
        let (eo, el, eg) = (try embeddedInNaN(result.output), try embeddedInNaN(result.logSumExp),
                            try embeddedInNaN(dO, innerStride: 2))
        try eq.withStridedView { qv in try ek.withStridedView { kv in try ev.withStridedView { vv in
        try eo.withStridedView { ov in try el.withStridedView { lv in try eg.withStridedView { gv in
        try dq.withMutableStridedView { dQ in try dk.withMutableStridedView { dK in try dv.withMutableStridedView { dV in
            try s.attention.gradients(query: qv, key: kv, value: vv, output: ov, logSumExp: lv, outputGradient: gv,
                                      dQuery: dQ, dKey: dK, dValue: dV, keyLengths: c.keyLengths,
                                      workspace: workspace, threads: 3)
        } } } } } } } } }
        expectBitwiseEqualGradients(expected, AttentionGradients(dQuery: dq, dKey: dk, dValue: dv), c.testDescription)
        // A workspace smaller than the backward cost's is refused.
        let small = try AttentionWorkspace(byteCount: 64)
        expectAttentionError(.invalidParameter, mentioning: ["workspace"]) {
            try dq.withMutableStridedView { dQ in try dk.withMutableStridedView { dK in try dv.withMutableStridedView { dV in
            try q.withStridedView { qv in try k.withStridedView { kv in try v.withStridedView { vv in
            try result.output.withStridedView { ov in try result.logSumExp.withStridedView { lv in
            try dO.withStridedView { gv in
                try s.attention.gradients(query: qv, key: kv, value: vv, output: ov, logSumExp: lv, outputGradient: gv,
                                          dQuery: dQ, dKey: dK, dValue: dV, keyLengths: c.keyLengths,
                                          workspace: small, threads: 3)
            } } } } } } } } }
        }
    }

    @Test("backward cost: 2.5 × the forward's FLOPs, the same pairs, workspace per worker independent of N",
          arguments: GradientSubject.all)
    func cost(_ s: GradientSubject) throws {
        let short = AttentionShape(heads: 8, queryLength: 2048, headDim: 64)
        let long = AttentionShape(heads: 8, queryLength: 8192, headDim: 64)
        let forward = try s.attention.cost(short, threads: 2), backward = try s.attention.backwardCost(short, threads: 2)
        #expect(backward.flops == 2.5 * forward.flops, "\(s.label)")
        #expect(backward.scoredPairs == forward.scoredPairs, "\(s.label)")
        #expect(backward.workspaceBytes > 100_000, "\(s.label): \(backward.workspaceBytes) bytes")
        // Only the dQ ordering's table (one Int per key block per head) grows with N.
        let longer = try s.attention.backwardCost(long, threads: 2)
        #expect(longer.workspaceBytes - backward.workspaceBytes <= 8 * 8 * (8192 + 128),
                "\(s.label): \(backward.workspaceBytes) -> \(longer.workspaceBytes) bytes")
        expectAttentionError(.invalidParameter, mentioning: ["threads"]) {
            try s.attention.backwardCost(short, threads: 0)
        }
    }

    /// `L = ½‖O − T‖²`, `dL/dO = O − T`: a step `x − η g` on Q, K and V lowers the loss by
    /// `η ‖g‖²` to first order (an end-to-end check through the forward again).
    @Test("a small gradient step lowers L = ½‖O − T‖² by what the gradients predict", arguments: GradientSubject.all)
    func gradientStep(_ s: GradientSubject) throws {
        let c = PatternBackwardCase(subject: s, batch: 2, heads: 4, kvHeads: 2, queryLength: 90, keyLength: 100,
                                    headDim: 24, valueDim: 20, keyLengths: [100, 43], seed: 70_000)
        let (q, k, v, result, _) = try c.inputs()
        let target = try randomTensor(result.output.shape, seed: 70_001)
        func loss(_ o: Tensor) -> Double {
            zip(o.elements, target.elements).reduce(0) { $0 + 0.5 * Double($1.0 - $1.1) * Double($1.0 - $1.1) }
        }
        let dO = try Tensor(shape: target.shape, data: zip(result.output.elements, target.elements).map { $0 - $1 })
        let g = try s.attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                          keyLengths: c.keyLengths, threads: 2)
        let squaredNorm = [g.dQuery, g.dKey, g.dValue].reduce(0.0) { sum, t in
            t.elements.reduce(sum) { $0 + Double($1) * Double($1) }
        }
        // A step predicted to lower the loss by 0.2% (sparse rows have sharp softmaxes: a
        // fixed step would be dominated by second-order terms for some patterns).
        let before = loss(result.output)
        let eta = Float(0.002 * before / squaredNorm)
        func step(_ x: Tensor, _ dx: Tensor) throws -> Tensor {
            try Tensor(shape: x.shape, data: zip(x.elements, dx.elements).map { $0 - eta * $1 })
        }
        let after = try s.attention.attend(query: step(q, g.dQuery), key: step(k, g.dKey), value: step(v, g.dValue),
                                           keyLengths: c.keyLengths, threads: 2)
        let decrease = before - loss(after.output), predicted = Double(eta) * squaredNorm
        #expect(decrease > 0, "\(s.label): the loss rose from \(before) by \(-decrease)")
        #expect(abs(decrease - predicted) < 0.05 * predicted,
                "\(s.label): decrease \(decrease), first-order prediction \(predicted), loss \(before)")
    }

    /// Dilations that differ between the heads of a group: the window pass on contiguous
    /// blocks (one dilation everywhere is in `GradientSubject.all`).
    @Test("Longformer with a dilation per head", arguments: [false, true])
    func longformerPerHeadDilations(_ causal: Bool) throws {
        let s = GradientSubject.longformer(LongformerAttention(window: 8, dilations: [1, 2, 3, 1],
                                                               globalPositions: [2, 20], causal: causal))
        let cases = [PatternBackwardCase(subject: s, queryLength: 150, seed: 60_000),
                     PatternBackwardCase(subject: s, kvHeads: 1, queryLength: 100, keyLength: 170, headDim: 5,
                                         seed: 60_001),
                     PatternBackwardCase(subject: s, batch: 2, kvHeads: 4, queryLength: 170, keyLength: 100,
                                         headDim: 65, valueDim: 3, keyLengths: [100, 0], seed: 60_002)]
        for c in cases { try c.check() }
        let c = PatternBackwardCase(subject: s, queryLength: 400, headDim: 8, seed: 60_003)
        let runs = try [1, 2, 3, 7].map { try c.gradients(threads: $0) }
        for (n, g) in runs.enumerated().dropFirst() { expectBitwiseEqualGradients(runs[0], g, "\(c.testDescription) run \(n)") }
    }

    @Test("bad options throw errors naming the option")
    func badOptions() throws {
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 9, headDim: 4, seed: 50_000)
        let result = try DenseAttention().attend(query: q, key: k, value: v)
        let dO = try randomTensor(result.output.shape, seed: 50_001)
        let bad: [(any DifferentiableAttention, String)] = [
            (LocalAttention(left: -1, right: 2), "left"),
            (LocalAttention(blockSize: 0), "blockSize"),
            (StridedAttention(stride: 0), "stride"),
            (StridedAttention(kind: .fixed(summary: 5), stride: 4), "summary"),
            (MultiQueryAttention(leftWindow: -2), "leftWindow"),
            (LongformerAttention(window: -1), "window"),
            (LongformerAttention(window: 4, globalPositions: [9]), "global position"),
            (BigBirdAttention(blockSize: 0), "blockSize"),
            (BigBirdAttention(blockSize: 4, globalBlocks: [3]), "global block"),
        ]
        for (attention, option) in bad {
            expectAttentionError(.invalidParameter, mentioning: [option]) {
                try attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO)
            }
            expectAttentionError(.invalidParameter, mentioning: [option]) {
                try attention.backwardCost(AttentionShape(heads: 2, queryLength: 9, headDim: 4))
            }
        }
    }
}
