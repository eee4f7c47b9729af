// The backward of packed variable-length batches (issue 16's packed batches with issue 18's
// gradients): the same bits as separate backward calls per sequence.

import AttentionBenchCore
@_spi(Testing) @_spi(Benchmarking) import EfficientAttention
import Testing

/// The backward of packed variable-length batches: each sequence's gradient rows are those
/// of a separate backward call on its rows, bit for bit (ATTENTION_SPEC.md, "Packed
/// variable-length batches", with "Gradients").
@Suite("Packed variable-length batches: gradients")
struct PackedGradientTests {
    func rows(_ x: Tensor, _ range: Range<Int>) throws -> Tensor { try headRows(x, range) }

    /// A sequence's rows of packed gradients: query rows `qr` of `dQ`, key rows `kr` of `dK`, `dV`.
    func rows(_ g: AttentionGradients, _ qr: Range<Int>, _ kr: Range<Int>) throws -> AttentionGradients {
        AttentionGradients(dQuery: try rows(g.dQuery, qr), dKey: try rows(g.dKey, kr), dValue: try rows(g.dValue, kr))
    }

    /// `t`'s values rounded to `precision`, in a NaN-padded operand of that precision.
    func operand(_ t: Tensor, _ precision: ActivationPrecision, step: Int = 1) -> MixedOperand {
        MixedOperand(shape: SIMD4(t.shape), precision: precision, step: step,
                     values: t.elements.map { rounded($0, precision) })
    }

    /// The packed forward, then the packed backward with every view NaN-padded (and the
    /// gradients NaN before the call), against a separate forward and backward per sequence
    /// on its rows: the same bits; rows of sequences without queries or keys `+0`; nothing
    /// written outside the views; no allocation in steady state with the packed workspace.
    func check(_ attention: some DifferentiableAttention, precisions p: OperandPrecisions, queryOffsets: [Int],
               keyOffsets: [Int], step: Int, threads: Int, _ label: String) throws {
        let sequences = try PackedSequences(queryOffsets: queryOffsets, keyOffsets: keyOffsets)
        let heads = 4, kvHeads = 2, d = 16, dv = 8
        let nq = queryOffsets.last!, nk = keyOffsets.last!
        let (q, k, v) = try randomQKV(heads: heads, kvHeads: kvHeads, queryLength: nq, keyLength: nk, headDim: d,
                                      valueDim: dv, seed: 91)
        let dO = try Tensor.random(shape: [1, heads, nq, dv], seed: 92)
        let (qo, ko, vo, go) = (operand(q, p.query, step: step), operand(k, p.key, step: step),
                                operand(v, p.value, step: step), operand(dO, p.output, step: step))
        let oo = MixedOperand(shape: SIMD4(1, heads, nq, dv), precision: p.output, step: step)
        var lse = NaNPaddedOutput(shape: [1, heads, nq, 1])
        let dq = MixedOperand(shape: SIMD4(1, heads, nq, d), precision: p.query, step: step)
        let dk = MixedOperand(shape: SIMD4(1, kvHeads, nk, d), precision: p.key, step: step)
        let dvo = MixedOperand(shape: SIMD4(1, kvHeads, nk, dv), precision: p.value, step: step)
        let workspace = try AttentionWorkspace(byteCount: max(
            try AttentionWorkspace(for: attention, sequences: sequences, heads: heads, kvHeads: kvHeads, headDim: d,
                                   valueDim: dv, threads: threads, precisions: p).byteCount,
            try AttentionWorkspace(forBackwardOf: attention, sequences: sequences, heads: heads, kvHeads: kvHeads,
                                   headDim: d, valueDim: dv, threads: threads, precisions: p).byteCount))
        let (qv, kv, vv, gv) = (try qo.view, try ko.view, try vo.view, try go.view)
        let (dqv, dkv, dvv) = (try dq.mutableView, try dk.mutableView, try dvo.mutableView)
        func backward(_ l: MutableStridedView) throws {
            try attention.gradients(query: qv, key: kv, value: vv, output: try oo.view,
                                    logSumExp: try PackedGradientTests.readable(l), outputGradient: gv,
                                    dQuery: dqv, dKey: dkv, dValue: dvv, sequences: sequences,
                                    workspace: workspace, threads: threads)
        }
        try lse.withView { l in
            try attention.attend(query: qv, key: kv, value: vv, output: try oo.mutableView, logSumExp: l,
                                 sequences: sequences, workspace: workspace, threads: threads)
            try backward(l)
        }
        #expect(dq.gapsUntouched && dk.gapsUntouched && dvo.gapsUntouched, "\(label): wrote outside a gradient view")
        let packed = (dq.elementBits, dk.elementBits, dvo.elementBits)
        /// Element `c` of row `i`, head `h` in a row-major `[1, H, rows, width]` listing.
        func index(_ h: Int, _ i: Int, _ c: Int, rows: Int, width: Int) -> Int { (h * rows + i) * width + c }
        /// Rows `range` of a packed gradient listing against `alone` (`nil`: all `+0`).
        func compare(_ packedBits: [UInt32], _ alone: [UInt32]?, heads: Int, rows: Int, width: Int,
                     _ range: Range<Int>, _ name: String, _ s: Int) {
            var mismatches = 0
            for h in 0..<heads {
                for i in 0..<range.count {
                    for c in 0..<width {
                        let got = packedBits[index(h, range.lowerBound + i, c, rows: rows, width: width)]
                        let expected = alone?[index(h, i, c, rows: range.count, width: width)] ?? 0
                        if got != expected { mismatches += 1 }
                    }
                }
            }
            #expect(mismatches == 0, "\(label) sequence \(s): \(mismatches) elements of \(name) differ")
        }
        for s in 0..<sequences.count {
            let qr = queryOffsets[s]..<queryOffsets[s + 1], kr = keyOffsets[s]..<keyOffsets[s + 1]
            guard !qr.isEmpty, !kr.isEmpty else {
                compare(packed.0, nil, heads: heads, rows: nq, width: d, qr, "dQuery", s)
                compare(packed.1, nil, heads: kvHeads, rows: nk, width: d, kr, "dKey", s)
                compare(packed.2, nil, heads: kvHeads, rows: nk, width: dv, kr, "dValue", s)
                continue
            }
            let (qs, ks, vs, gs) = (operand(try rows(q, qr), p.query), operand(try rows(k, kr), p.key),
                                    operand(try rows(v, kr), p.value), operand(try rows(dO, qr), p.output))
            let os = MixedOperand(shape: SIMD4(1, heads, qr.count, dv), precision: p.output)
            let dqs = MixedOperand(shape: SIMD4(1, heads, qr.count, d), precision: p.query)
            let dks = MixedOperand(shape: SIMD4(1, kvHeads, kr.count, d), precision: p.key)
            let dvs = MixedOperand(shape: SIMD4(1, kvHeads, kr.count, dv), precision: p.value)
            var ls = NaNPaddedOutput(shape: [1, heads, qr.count, 1])
            try ls.withView { l in
                try attention.attend(query: try qs.view, key: try ks.view, value: try vs.view,
                                     output: try os.mutableView, logSumExp: l, keyLengths: nil, workspace: nil,
                                     threads: 1)
                try attention.gradients(query: try qs.view, key: try ks.view, value: try vs.view,
                                        output: try os.view, logSumExp: try PackedGradientTests.readable(l),
                                        outputGradient: try gs.view, dQuery: try dqs.mutableView,
                                        dKey: try dks.mutableView, dValue: try dvs.mutableView, keyLengths: nil,
                                        workspace: nil, threads: 1)
            }
            compare(packed.0, dqs.elementBits, heads: heads, rows: nq, width: d, qr, "dQuery", s)
            compare(packed.1, dks.elementBits, heads: kvHeads, rows: nk, width: d, kr, "dKey", s)
            compare(packed.2, dvs.elementBits, heads: kvHeads, rows: nk, width: dv, kr, "dValue", s)
        }
        if AllocationCounter.isSupported {
            let allocations = try lse.withView { l in
                try CallingConventionTests.steadyStateAllocations(threads: threads) { try backward(l) }
            }
            #expect(allocations == 0, "\(label): \(allocations) allocations per packed backward call")
        }
        // The cost follows the sequences.
        let cost = try attention.backwardCost(sequences: sequences, heads: heads, kvHeads: kvHeads, headDim: d,
                                              valueDim: dv)
        var flops = 0.0
        for s in 0..<sequences.count where queryOffsets[s + 1] > queryOffsets[s] && keyOffsets[s + 1] > keyOffsets[s] {
            flops += try attention.backwardCost(sequences.shapeForTesting(s, heads: heads, kvHeads: kvHeads, headDim: d,
                                                                          valueDim: dv)).flops
        }
        #expect(cost.flops == flops, "\(label): backward cost \(cost.flops) FLOPs, expected \(flops)")
    }

    /// A read-only view of the `Float` `[1, H, N, 1]` view `l` (the forward's log-sum-exp).
    static func readable(_ l: MutableStridedView) throws -> StridedView {
        let s = l.shape, t = l.strides
        let span = (s[0] - 1) * t[0] + (s[1] - 1) * t[1] + (s[2] - 1) * t[2] + (s[3] - 1) * t[3] + 1
        return try StridedView(UnsafeBufferPointer(start: l.baseAddress, count: span), shape: s, strides: t)
    }

    static let selfOffsets: [Int] = {
        var offsets = [0]
        for n in [0, 1, 17, 64, 0, 130, 3] { offsets.append(offsets.last! + n) }
        return offsets
    }()

    static let precisions = [OperandPrecisions(.float32), OperandPrecisions(.float16), OperandPrecisions(.bfloat16),
                             OperandPrecisions(query: .bfloat16, key: .float16, value: .float32, output: .float16)]

    @Test("a packed backward equals separate backward calls (lengths 0 and 1, causal, windows, grouped heads, 16-bit)",
          arguments: 0..<4)
    func separateCalls(_ m: Int) throws {
        let p = PackedGradientTests.precisions[m], offsets = PackedGradientTests.selfOffsets
        let step = m % 2 + 1, threads = 2 - m % 2
        for causal in [false, true] {
            let label = "\(p) causal \(causal)"
            try check(DenseAttention(causal: causal), precisions: p, queryOffsets: offsets, keyOffsets: offsets,
                      step: step, threads: threads, "dense \(label)")
            try check(LocalAttention(form: .slidingWindow(left: 8, right: causal ? 0 : 5), causal: causal),
                      precisions: p, queryOffsets: offsets, keyOffsets: offsets, step: step, threads: threads,
                      "local \(label)")
            try check(MultiQueryAttention(causal: causal, leftWindow: 20), precisions: p, queryOffsets: offsets,
                      keyOffsets: offsets, step: step, threads: threads, "multi-query \(label)")
            try check(StridedAttention(stride: 5, causal: causal), precisions: p, queryOffsets: offsets,
                      keyOffsets: offsets, step: step, threads: threads, "strided \(label)")
            try check(LinearAttention(featureMap: EluPlusOneFeatures(), causal: causal), precisions: p,
                      queryOffsets: offsets, keyOffsets: offsets, step: step, threads: threads, "linear-elu \(label)")
        }
        try check(LinformerAttention(projectedLength: 8, maxSequenceLength: 130, seed: 5), precisions: p,
                  queryOffsets: offsets, keyOffsets: offsets, step: step, threads: threads, "linformer \(p)")
        // Cross attention: queries and keys of different lengths, sequences without keys or queries.
        try check(DenseAttention(causal: true), precisions: p, queryOffsets: [0, 5, 5, 40, 41, 41],
                  keyOffsets: [0, 70, 75, 75, 200, 230], step: step, threads: threads, "dense cross \(p)")
    }

    @Test("bad packed backward calls are thrown errors naming the view, the sequence or the workspace, and write nothing")
    func badCalls() throws {
        let sequences = try PackedSequences(lengths: [3, 0, 9])
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 12, headDim: 4, seed: 3)
        let dense = DenseAttention()
        let result = try dense.attend(query: q, key: k, value: v, sequences: sequences)
        let dO = try Tensor.random(shape: result.output.shape, seed: 4)
        func expectError(_ fragment: String, _ label: String, _ call: () throws -> Void) {
            do {
                try call()
                Issue.record("\(label) was accepted")
            } catch let error as AttentionError {
                #expect(error.message.contains(fragment), "\(label): \(error.message)")
            } catch {
                Issue.record("\(label): \(error)")
            }
        }
        expectError("last offsets", "offsets shorter than the tensors") {
            _ = try dense.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                    sequences: try PackedSequences(lengths: [3, 8]))
        }
        expectError("outputGradient", "a dO of the wrong length") {
            _ = try dense.gradients(query: q, key: k, value: v, result: result,
                                    outputGradient: try Tensor.random(shape: [1, 2, 11, 4], seed: 5), sequences: sequences)
        }
        expectError("threads", "0 threads") {
            _ = try dense.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                    sequences: sequences, threads: 0)
        }
        // Checked before anything is written: gradients still NaN after each refused call.
        let dq = MixedOperand(shape: SIMD4(1, 2, 12, 4), precision: .float32)
        let dk = MixedOperand(shape: SIMD4(1, 2, 12, 4), precision: .float32)
        let dv = MixedOperand(shape: SIMD4(1, 2, 12, 4), precision: .float32)
        func call(_ attention: some DifferentiableAttention, dKey: MutableActivationView? = nil,
                  workspace: AttentionWorkspace? = nil) throws {
            try q.withStridedView { qv in try k.withStridedView { kv in try v.withStridedView { vv in
            try result.output.withStridedView { o in try result.logSumExp.withStridedView { l in
            try dO.withStridedView { g in
                try attention.gradients(query: ActivationView(qv), key: ActivationView(kv), value: ActivationView(vv),
                                        output: ActivationView(o), logSumExp: l, outputGradient: ActivationView(g),
                                        dQuery: try dq.mutableView, dKey: try dKey ?? dk.mutableView,
                                        dValue: try dv.mutableView, sequences: sequences, workspace: workspace,
                                        threads: 2)
            } } } } } }
        }
        func untouched() -> Bool {
            [dq, dk, dv].allSatisfy { g in g.elementBits.allSatisfy { Float(bitPattern: $0).isNaN } }
        }
        expectError("overlaps", "dKey the same memory as dQuery") { try call(dense, dKey: try dq.mutableView) }
        #expect(untouched(), "a refused call (overlap) wrote gradients")
        // A workspace for the first sequence only: the last, longer one needs more.
        let small = try AttentionWorkspace(forBackwardOf: dense, sequences: try PackedSequences(lengths: [3]),
                                           heads: 2, headDim: 4, threads: 2)
        let needed = try dense.backwardCost(sequences: sequences, heads: 2, headDim: 4, threads: 2).workspaceBytes
        if small.byteCount < needed {
            expectError("workspace", "a workspace too small for the last sequence") { try call(dense, workspace: small) }
            #expect(untouched(), "a refused call (workspace) wrote the first sequence's gradients")
        } else {
            Issue.record("the test's small workspace (\(small.byteCount) bytes) is not smaller than \(needed)")
        }
        // A sequence the conformer cannot take (Linformer: longer than maxSequenceLength) names the sequence.
        let linformer = try LinformerAttention(projectedLength: 2, maxSequenceLength: 4, seed: 1)
        expectError("sequence 2", "a sequence longer than Linformer's maxSequenceLength") { try call(linformer) }
        #expect(untouched(), "a refused call (sequence) wrote the first sequence's gradients")
        // A good call writes every row.
        try call(dense)
        #expect(!untouched() && [dq, dk, dv].allSatisfy { g in
            g.elementBits.allSatisfy { Float(bitPattern: $0).isFinite } && g.gapsUntouched
        }, "the accepted call left rows unwritten or wrote outside the views")
    }

    @Test("the Tensor convenience equals the view call and trains: a step against the packed gradient lowers the loss")
    func tensorConvenience() throws {
        let sequences = try PackedSequences(lengths: [7, 0, 40, 1])
        let dense = DenseAttention(causal: true)
        var (q, k, v) = try randomQKV(heads: 2, queryLength: 48, headDim: 8, seed: 6)
        let target = try Tensor.random(shape: [1, 2, 48, 8], seed: 7)
        /// L = ½ Σ (O − target)², so dO = O − target.
        func loss(_ o: Tensor) -> Double {
            zip(o.elements, target.elements).reduce(0) { $0 + 0.5 * Double($1.0 - $1.1) * Double($1.0 - $1.1) }
        }
        let result = try dense.attend(query: q, key: k, value: v, sequences: sequences)
        let dO = try Tensor(shape: result.output.shape, data: zip(result.output.elements, target.elements).map { $0 - $1 })
        let g = try dense.gradients(query: q, key: k, value: v, result: result, outputGradient: dO, sequences: sequences)
        // Per sequence, the unpacked Tensor backward on its rows.
        for (s, r) in [(0, 0..<7), (2, 7..<47), (3, 47..<48)] {
            let alone = try dense.attend(query: rows(q, r), key: rows(k, r), value: rows(v, r))
            let ga = try dense.gradients(query: rows(q, r), key: rows(k, r), value: rows(v, r), result: alone,
                                         outputGradient: rows(dO, r))
            expectBitwiseEqualGradients(AttentionGradients(dQuery: try rows(g.dQuery, r), dKey: try rows(g.dKey, r),
                                                           dValue: try rows(g.dValue, r)), ga, "sequence \(s)")
        }
        let before = loss(result.output)
        let rate: Float = 0.5
        q = try Tensor(shape: q.shape, data: zip(q.elements, g.dQuery.elements).map { $0 - rate * $1 })
        k = try Tensor(shape: k.shape, data: zip(k.elements, g.dKey.elements).map { $0 - rate * $1 })
        v = try Tensor(shape: v.shape, data: zip(v.elements, g.dValue.elements).map { $0 - rate * $1 })
        let after = loss(try dense.attend(query: q, key: k, value: v, sequences: sequences).output)
        #expect(after < 0.95 * before, "a gradient step took the loss from \(before) to \(after)")
    }

    @Test("with soft-capping, ALiBi and sinks (the README's example), each sequence is its separate modified backward")
    func modified() throws {
        var gemma = DenseAttention(causal: true)
        gemma.modifiers = ScoreModifiers(softCap: 5, alibiSlopes: ScoreModifiers.standardALiBiSlopes(heads: 4),
                                         sinks: [0.5, -1, 0, 2])
        let batch = try PackedSequences(lengths: [30, 70, 5])
        let (q, k, v) = try randomQKV(heads: 4, queryLength: 105, headDim: 16, seed: 8)
        let dO = try Tensor.random(shape: [1, 4, 105, 16], seed: 9)
        let packedResult = try gemma.attend(query: q, key: k, value: v, sequences: batch)
        let packedGrads = try gemma.gradients(query: q, key: k, value: v, result: packedResult, outputGradient: dO,
                                              sequences: batch, threads: 2)
        for (s, r) in [0..<30, 30..<100, 100..<105].enumerated() {
            let alone = try gemma.attend(query: rows(q, r), key: rows(k, r), value: rows(v, r))
            let ga = try gemma.gradients(query: rows(q, r), key: rows(k, r), value: rows(v, r), result: alone,
                                         outputGradient: rows(dO, r), threads: 1)
            expectBitwiseEqualGradients(try rows(packedGrads, r, r), ga, "modified sequence \(s)")
        }
    }

    /// A packed call with a bias `[S or 1, H or 1, max Nq_s, max Nk_s]` against separate
    /// calls, each given its sequence's block of the bias: the same bits, forward (output
    /// and log-sum-exp) and backward, for every sequence with queries and keys.
    func checkBias<A: ModifiableAttention & DifferentiableAttention>(
        _ attention: A, biasShape: [Int], queryOffsets: [Int], keyOffsets: [Int], _ label: String
    ) throws {
        let sequences = try PackedSequences(queryOffsets: queryOffsets, keyOffsets: keyOffsets)
        let heads = 4, nq = queryOffsets.last!, nk = keyOffsets.last!
        let (q, k, v) = try randomQKV(heads: heads, kvHeads: 2, queryLength: nq, keyLength: nk, headDim: 16,
                                      valueDim: 8, seed: 31)
        let dO = try Tensor.random(shape: [1, heads, nq, 8], seed: 32)
        // Some pairs hidden by the bias (-infinity), as a mask passed as a bias does.
        var values = try Tensor.random(shape: biasShape, seed: 33, in: -2...2).elements
        for e in stride(from: 5, to: values.count, by: 7) { values[e] = -.infinity }
        let bias = try Tensor(shape: biasShape, data: values)
        var packedAttention = attention
        packedAttention.modifiers.bias = bias
        let packed = try packedAttention.attend(query: q, key: k, value: v, sequences: sequences, threads: 2)
        let grads = try packedAttention.gradients(query: q, key: k, value: v, result: packed, outputGradient: dO,
                                                  sequences: sequences, threads: 2)
        for s in 0..<sequences.count {
            let qr = queryOffsets[s]..<queryOffsets[s + 1], kr = keyOffsets[s]..<keyOffsets[s + 1]
            guard !qr.isEmpty, !kr.isEmpty else { continue }
            // The sequence's block: bias[s or 0, :, 0..<Nq_s, 0..<Nk_s].
            var block = [Float]()
            let item = biasShape[0] == 1 ? 0 : s
            for h in 0..<biasShape[1] {
                for i in 0..<qr.count { for j in 0..<kr.count { block.append(bias[item, h, i, j]) } }
            }
            var alone = attention
            alone.modifiers.bias = try Tensor(shape: [1, biasShape[1], qr.count, kr.count], data: block)
            let result = try alone.attend(query: rows(q, qr), key: rows(k, kr), value: rows(v, kr), threads: 1)
            expectBitwiseEqual(try AttentionResult(output: rows(packed.output, qr), logSumExp: rows(packed.logSumExp, qr)),
                               result, "\(label) sequence \(s)")
            let g = try alone.gradients(query: rows(q, qr), key: rows(k, kr), value: rows(v, kr), result: result,
                                        outputGradient: rows(dO, qr), threads: 1)
            expectBitwiseEqualGradients(try rows(grads, qr, kr), g, "\(label) sequence \(s) gradients")
        }
    }

    @Test("a bias [S or 1, H or 1, max Nq, max Nk]: each sequence reads its block, forward and backward; other shapes are refused")
    func packedBias() throws {
        // Cross attention: a sequence without queries (1) and one without keys (2).
        let queryOffsets = [0, 5, 5, 40, 41], keyOffsets = [0, 70, 75, 75, 200]   // max Nq 35, max Nk 125
        for biasShape in [[4, 4, 35, 125], [1, 1, 35, 125], [4, 1, 35, 125], [1, 4, 35, 125]] {
            try checkBias(DenseAttention(causal: true), biasShape: biasShape, queryOffsets: queryOffsets,
                          keyOffsets: keyOffsets, "dense causal \(biasShape)")
            var alibi = MultiQueryAttention(causal: false, leftWindow: 20)
            alibi.modifiers.alibiSlopes = ScoreModifiers.standardALiBiSlopes(heads: 4)
            try checkBias(alibi, biasShape: biasShape, queryOffsets: queryOffsets, keyOffsets: keyOffsets,
                          "grouped-query window with ALiBi \(biasShape)")
        }
        // Self-attention with passes that merge (strided) and a window (local), lengths 0 and 1.
        let offsets = PackedGradientTests.selfOffsets   // lengths 0, 1, 17, 64, 0, 130, 3
        try checkBias(StridedAttention(stride: 5, causal: true), biasShape: [7, 4, 130, 130], queryOffsets: offsets,
                      keyOffsets: offsets, "strided causal")
        try checkBias(LocalAttention(form: .slidingWindow(left: 8, right: 5)), biasShape: [1, 4, 130, 130],
                      queryOffsets: offsets, keyOffsets: offsets, "local")
        // Any other shape is refused before anything is computed, naming the bias.
        let (q, k, v) = try randomQKV(heads: 4, kvHeads: 2, queryLength: 41, keyLength: 200, headDim: 16, seed: 3)
        let sequences = try PackedSequences(queryOffsets: queryOffsets, keyOffsets: keyOffsets)
        for wrong in [[1, 4, 35, 124], [1, 4, 36, 125], [3, 4, 35, 125], [1, 2, 35, 125], [1, 4, 41, 200]] {
            var dense = DenseAttention()
            dense.modifiers.bias = try Tensor(shape: wrong)
            let message = thrownAttentionError { _ = try dense.attend(query: q, key: k, value: v, sequences: sequences) }?
                .message ?? "no error"
            #expect(message.contains("modifiers.bias") && message.contains("max Nq_s"), "bias \(wrong): \(message)")
            #expect(throws: AttentionError.self, "bias \(wrong): packed cost") {
                _ = try dense.cost(sequences: sequences, heads: 4, kvHeads: 2, headDim: 16)
            }
        }
        // With a workspace, a packed call with a bias allocates nothing in steady state (the
        // per-sequence conformer copies box nothing).
        if AllocationCounter.isSupported {
            var dense = DenseAttention(causal: true)
            dense.modifiers.bias = try Tensor.random(shape: [4, 4, 35, 125], seed: 6)
            let workspace = try AttentionWorkspace(for: dense, sequences: sequences, heads: 4, kvHeads: 2, headDim: 16,
                                                   threads: 2)
            var o = try Tensor(shape: [1, 4, 41, 16]), l = try Tensor(shape: [1, 4, 41, 1])
            let allocations = try q.withStridedView { qv in try k.withStridedView { kv in try v.withStridedView { vv in
            try o.withMutableStridedView { ov in try l.withMutableStridedView { lv in
                try CallingConventionTests.steadyStateAllocations(threads: 2) {
                    try dense.attend(query: qv, key: kv, value: vv, output: ov, logSumExp: lv, sequences: sequences,
                                     workspace: workspace, threads: 2)
                }
            } } } } }
            #expect(allocations == 0, "\(allocations) allocations per packed call with a bias")
        }
        // With sinks, a sequence without keys (2: queries 5..<40) gives 0 with lse σ_h.
        var sinks = DenseAttention()
        sinks.modifiers.sinks = [0.5, -1, 0, 2]
        let r = try sinks.attend(query: q, key: k, value: v, sequences: sequences)
        for h in 0..<4 {
            for i in 5..<40 {
                #expect(r.logSumExp[0, h, i, 0] == sinks.modifiers.sinks![h]
                        && (0..<16).allSatisfy { r.output[0, h, i, $0] == 0 }, "sinks: head \(h) row \(i)")
            }
        }
    }

    @Test("modifierGradients of a packed call: each sequence's bias block and the sinks' sum are those of separate calls")
    func packedModifierGradients() throws {
        let queryOffsets = [0, 5, 5, 40, 41], keyOffsets = [0, 70, 75, 75, 200]   // max Nq 35, max Nk 125
        let sequences = try PackedSequences(queryOffsets: queryOffsets, keyOffsets: keyOffsets)
        let (q, k, v) = try randomQKV(heads: 4, kvHeads: 2, queryLength: 41, keyLength: 200, headDim: 16, valueDim: 8,
                                      seed: 41)
        let dO = try Tensor.random(shape: [1, 4, 41, 8], seed: 42)
        for biasShape in [[4, 4, 35, 125], [1, 1, 35, 125]] {
            var attention = MultiQueryAttention(causal: true, leftWindow: 30)
            attention.modifiers = ScoreModifiers(alibiSlopes: ScoreModifiers.standardALiBiSlopes(heads: 4),
                                                 bias: try Tensor.random(shape: biasShape, seed: 43),
                                                 sinks: [0.5, -1, 0, 2])
            let result = try attention.attend(query: q, key: k, value: v, sequences: sequences)
            let packed = try attention.modifierGradients(query: q, key: k, value: v, result: result,
                                                         outputGradient: dO, sequences: sequences, threads: 2)
            let three = try attention.modifierGradients(query: q, key: k, value: v, result: result,
                                                        outputGradient: dO, sequences: sequences, threads: 3)
            expectBitwiseEqualGradients(three.inputs, packed.inputs, "\(biasShape): 3 threads")
            #expect(three.modifiers == packed.modifiers, "\(biasShape): 3 threads' modifier gradients")
            let inputs = try attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                                 sequences: sequences, threads: 2)
            expectBitwiseEqualGradients(packed.inputs, inputs, "\(biasShape): dQ, dK, dV")
            // The separate calls, each given its block.
            var biasSum = [Double](repeating: 0, count: biasShape.reduce(1, *)), sinkSum = [Double](repeating: 0, count: 4)
            let bias = attention.modifiers.bias!, gradient = packed.modifiers.bias!
            for s in 0..<sequences.count {
                let qr = queryOffsets[s]..<queryOffsets[s + 1], kr = keyOffsets[s]..<keyOffsets[s + 1]
                guard !qr.isEmpty, !kr.isEmpty else { continue }
                let item = biasShape[0] == 1 ? 0 : s
                var alone = attention
                alone.modifiers.bias = try Tensor(shape: [1, biasShape[1], qr.count, kr.count], storage: bias.storage,
                                                  strides: bias.strides, offset: item * bias.strides[0])
                let r = try alone.attend(query: rows(q, qr), key: rows(k, kr), value: rows(v, kr))
                let g = try alone.modifierGradients(query: rows(q, qr), key: rows(k, kr), value: rows(v, kr),
                                                    result: r, outputGradient: rows(dO, qr), threads: 1)
                for (h, x) in g.modifiers.sinks!.enumerated() { sinkSum[h] += Double(x) }
                for h in 0..<biasShape[1] {
                    for i in 0..<qr.count {
                        for j in 0..<kr.count {
                            let x = g.modifiers.bias![0, h, i, j]
                            biasSum[((item * biasShape[1] + h) * 35 + i) * 125 + j] += Double(x)
                            if biasShape[0] > 1 {
                                #expect(gradient[item, h, i, j].bitPattern == x.bitPattern,
                                        "\(biasShape) sequence \(s): bias gradient [\(h), \(i), \(j)]")
                            }
                        }
                    }
                }
            }
            // Shared blocks sum the sequences (in their order); the rest of a block is 0.
            let biasError = zip(gradient.elements, biasSum).map { abs(Double($0) - $1) }.max()!
            #expect(biasError < 1e-6, "\(biasShape): bias gradient off the sequences' sum by \(biasError)")
            for (h, x) in packed.modifiers.sinks!.enumerated() {
                #expect(abs(Double(x) - sinkSum[h]) < 1e-5 * max(1, abs(sinkSum[h])),
                        "\(biasShape): sink gradient \(h) \(x), separate calls \(sinkSum[h])")
            }
        }
    }
}
