// Float16 and BFloat16 activations in the backward pass: the ActivationView gradients equal
// the Float gradients on the widened operands with each gradient rounded once, bit for bit,
// with and without a workspace, for any thread count; bad views and small workspaces throw.

import AttentionBenchCore
@_spi(Testing) @_spi(Benchmarking) import EfficientAttention
import Foundation
import Testing

@Suite("Float16 and BFloat16 activations in the backward pass")
struct MixedPrecisionBackwardTests {
    /// Runs the mixed-precision backward of `attention` with operands in `p`'s precisions
    /// (gradients like their operands, `dO` like the output) and checks it against the Float
    /// backward on the rounded values, rounded.
    static func compare(_ attention: some DifferentiableAttention, _ q: Tensor, _ k: Tensor, _ v: Tensor,
                        keyLengths: [Int]?, precisions p: OperandPrecisions, step: Int, workspace: Bool,
                        threads: Int, _ label: String) throws {
        func widened(_ t: Tensor, _ precision: ActivationPrecision) throws -> Tensor {
            try Tensor(shape: t.shape, data: t.elements.map { rounded($0, precision) })
        }
        let (wq, wk, wv) = (try widened(q, p.query), try widened(k, p.key), try widened(v, p.value))
        let forward = try attention.attend(query: wq, key: wk, value: wv, keyLengths: keyLengths, threads: threads)
        let wo = try widened(forward.output, p.output)
        let wg = try widened(try randomTensor(forward.output.shape, seed: 77), p.output)
        let expected = try attention.gradients(query: wq, key: wk, value: wv, output: wo, logSumExp: forward.logSumExp,
                                               outputGradient: wg, keyLengths: keyLengths, threads: threads)
        let shape = try AttentionShape(query: q, key: k, value: v)
        let operand = { (t: Tensor, precision: ActivationPrecision) in
            MixedOperand(shape: SIMD4(t.shape), precision: precision, step: step, values: t.elements)
        }
        let (qo, ko, vo, oo, go) = (operand(wq, p.query), operand(wk, p.key), operand(wv, p.value),
                                    operand(wo, p.output), operand(wg, p.output))
        let dq = MixedOperand(shape: SIMD4(q.shape), precision: p.query, step: step)
        let dk = MixedOperand(shape: SIMD4(k.shape), precision: p.key, step: step)
        let dv = MixedOperand(shape: SIMD4(v.shape), precision: p.value, step: step)
        let space = workspace
            ? try AttentionWorkspace(forBackwardOf: attention, shape: shape, threads: threads, precisions: p) : nil
        try forward.logSumExp.withStridedView { lse in
            try attention.gradients(query: qo.view, key: ko.view, value: vo.view, output: oo.view, logSumExp: lse,
                                    outputGradient: go.view, dQuery: dq.mutableView, dKey: dk.mutableView,
                                    dValue: dv.mutableView, keyLengths: keyLengths, workspace: space, threads: threads)
        }
        for (name, got, want, precision) in [("dQuery", dq, expected.dQuery, p.query), ("dKey", dk, expected.dKey, p.key),
                                             ("dValue", dv, expected.dValue, p.value)] {
            let wantBits = want.elements.map { roundedBits($0, precision) }
            let gotBits = got.elementBits
            let index = zip(gotBits, wantBits).enumerated().first { $0.element.0 != $0.element.1 }?.offset
            #expect(index == nil, "\(label): \(name) element \(index ?? -1) differs")
            #expect(got.gapsUntouched, "\(label): wrote outside \(name)")
        }
    }

    /// `body` for each precision mix of ``MixedPrecisionTests/combinations``, with a
    /// workspace on alternate mixes (from the first when `workspaceFirst`), 1–3 threads and
    /// element steps 1–2.
    static func forEachSetting(workspaceFirst: Bool,
                               _ body: (OperandPrecisions, Bool, Int, Int, String) throws -> Void) rethrows {
        for (c, p) in MixedPrecisionTests.combinations.enumerated() {
            let workspace = (c % 2 == 0) == workspaceFirst, threads = c % 3 + 1, step = c % 2 + 1
            try body(p, workspace, threads, step, "\(p) threads \(threads) workspace \(workspace)")
        }
    }

    @Test("dense, grouped-query, local, Linformer, linear attention: the Float backward on widened operands, rounded once")
    func matchesWidenedFloatBackward() throws {
        let (q, k, v) = try randomQKV(batch: 2, heads: 4, kvHeads: 2, queryLength: 37, keyLength: 37, headDim: 65,
                                      valueDim: 16, seed: 5)
        try Self.forEachSetting(workspaceFirst: true) { p, workspace, threads, step, label in
            try Self.compare(DenseAttention(causal: true), q, k, v, keyLengths: [37, 20], precisions: p, step: step,
                             workspace: workspace, threads: threads, "dense \(label)")
            try Self.compare(MultiQueryAttention(causal: false), q, k, v, keyLengths: nil, precisions: p, step: step,
                             workspace: workspace, threads: threads, "multi-query \(label)")
            try Self.compare(LocalAttention(left: 5, right: 0, causal: true), q, k, v, keyLengths: nil, precisions: p,
                             step: step, workspace: workspace, threads: threads, "local \(label)")
            try Self.compare(try LinformerAttention(projectedLength: 8, maxSequenceLength: 37, seed: 3), q, k, v,
                             keyLengths: nil, precisions: p, step: step, workspace: workspace, threads: threads,
                             "linformer \(label)")
            try Self.compare(LinearAttention(featureMap: EluPlusOneFeatures(), causal: true), q, k, v, keyLengths: nil,
                             precisions: p, step: step, workspace: workspace, threads: threads, "linear-elu \(label)")
        }
    }

    @Test("strided, Longformer, BigBird, custom masks, adaptive span, axial, ETC (16-bit operands widened in the kernel): the Float backward on widened operands, rounded once")
    func patternsMatchWidenedFloatBackward() throws {
        let (q, k, v) = try randomQKV(batch: 2, heads: 4, kvHeads: 2, queryLength: 150, keyLength: 150, headDim: 65,
                                      valueDim: 16, seed: 9)
        try Self.forEachSetting(workspaceFirst: false) { p, workspace, threads, step, label in
            // Two passes adding to dK, dV (staged when 16-bit), then one pass (written by the kernel).
            try Self.compare(StridedAttention(kind: .strided, stride: 7, causal: true), q, k, v, keyLengths: [150, 90],
                             precisions: p, step: step, workspace: workspace, threads: threads, "strided \(label)")
            try Self.compare(LongformerAttention(window: 16, globalPositions: [0, 5, 6, 120], causal: false), q, k, v,
                             keyLengths: nil, precisions: p, step: step, workspace: workspace, threads: threads,
                             "longformer \(label)")
            try Self.compare(BigBirdAttention(blockSize: 16, randomBlockCount: 2, seed: 7, causal: false), q, k, v,
                             keyLengths: [150, 101], precisions: p, step: step, workspace: workspace, threads: threads,
                             "bigbird \(label)")
            try Self.compare(CustomMaskAttention(predicate: try DocumentMask(length: 40, causal: true)), q, k, v,
                             keyLengths: nil, precisions: p, step: step, workspace: workspace, threads: threads,
                             "custom-mask \(label)")
            // A weighting mask (its hooks read the recomputed tiles, no operand).
            try Self.compare(AdaptiveSpanAttention(spans: [20, 3.5, 60, 0], maxSpan: 400, ramp: 8), q, k, v,
                             keyLengths: [150, 77], precisions: p, step: step, workspace: workspace, threads: threads,
                             "adaptive-span \(label)")
            // Axial: one pass per axis, later ones adding to dK, dV; .sum recomputes each axis's
            // output from the 16-bit operands.
            try Self.compare(AxialAttention(axes: [10, 15], causal: true), q, k, v, keyLengths: [150, 88],
                             precisions: p, step: step, workspace: workspace, threads: threads, "axial \(label)")
            try Self.compare(AxialAttention(axes: [5, 6, 5], combination: .sum), q, k, v, keyLengths: nil,
                             precisions: p, step: step, workspace: workspace, threads: threads, "axial sum \(label)")
            // ETC: the global pass, then the long pass (with the relative table's score hooks).
            try Self.compare(try ETCAttention(heads: 4, headDim: 65, globals: 6, radius: 8, maxDistance: 4, seed: 2),
                             q, k, v, keyLengths: [150, 95], precisions: p, step: step, workspace: workspace,
                             threads: threads, "etc \(label)")
        }
    }

    @Test("Transformer-XL (memory before the segment, grouped heads): forward and backward widened in the kernel, the Float calls on widened operands, rounded once")
    func transformerXLWidensInKernel() throws {
        let (q, k, v) = try randomQKV(batch: 2, heads: 4, kvHeads: 2, queryLength: 70, keyLength: 93, headDim: 65,
                                      valueDim: 16, seed: 21)
        let attention = try TransformerXLAttention(heads: 4, headDim: 65, memoryLength: 30, maxSegmentLength: 70,
                                                   seed: 6)
        try Self.forEachSetting(workspaceFirst: true) { p, workspace, threads, step, label in
            try MixedPrecisionTests.compare(attention, q, k, v, keyLengths: [93, 51], precisions: p, step: step,
                                            workspace: workspace, threads: threads, "transformer-xl forward \(label)")
            try Self.compare(attention, q, k, v, keyLengths: [93, 51], precisions: p, step: step, workspace: workspace,
                             threads: threads, "transformer-xl \(label)")
        }
        // No Float copy of an operand: the forward stages nothing.
        let shape = AttentionShape(batch: 1, heads: 8, queryLength: 512, keyLength: 542, headDim: 64)
        #expect(attention.conversionScratchBytes(shape, precisions: OperandPrecisions(.bfloat16)) == 0)
    }

    @Test("the Compressive Transformer's stateless call ([compressed ; memory ; segment]): forward and backward widened in Transformer-XL's kernel, the Float calls on widened operands, rounded once")
    func compressiveWidensInKernel() throws {
        let (q, k, v) = try randomQKV(batch: 2, heads: 4, kvHeads: 2, queryLength: 37, keyLength: 37 + 9 + 20,
                                      headDim: 33, valueDim: 16, seed: 22)
        let attention = try CompressiveTransformerAttention(heads: 4, headDim: 33, memoryLength: 20,
                                                            compressedMemoryLength: 9, maxSegmentLength: 40, seed: 7)
        try Self.forEachSetting(workspaceFirst: false) { p, workspace, threads, step, label in
            try MixedPrecisionTests.compare(attention, q, k, v, keyLengths: [66, 40], precisions: p, step: step,
                                            workspace: workspace, threads: threads, "compressive forward \(label)")
            try Self.compare(attention, q, k, v, keyLengths: [66, 40], precisions: p, step: step, workspace: workspace,
                             threads: threads, "compressive \(label)")
        }
        let shape = AttentionShape(batch: 1, heads: 4, queryLength: 37, keyLength: 66, headDim: 33)
        #expect(attention.conversionScratchBytes(shape, precisions: OperandPrecisions(.bfloat16)) == 0)
        // As Transformer-XL's: a Float dQ per 16-bit one, staged dK and dV, no operand copied.
        let half = ActivationPrecision.bfloat16
        let bytes = { (a: any DifferentiableAttention) in
            a.backwardConversionScratchBytes(shape, query: half, key: half, value: half, output: half,
                                             outputGradient: half, dQuery: half, dKey: half, dValue: half, threads: 2)
        }
        let transformerXL = try TransformerXLAttention(heads: 4, headDim: 33, memoryLength: 29, maxSegmentLength: 40,
                                                       seed: 7)
        #expect(bytes(attention) == bytes(transformerXL))
        // The copying fallback's Float q, o, dO, dQ (37 rows per head) and k, v, dK, dV (66 rows).
        #expect(bytes(attention) < 4 * (4 * 37 + 4 * 66) * 33 * 4)
    }

    @Test("LSH, routing, Linformer, memory-compressed, linear attention, ISAB, PMA (16-bit rows widened by the hashing, the router, the gathers, the GEMM's packing, the feature map's stage and the tiled backward): the Float backward on widened operands, only the gradients staged")
    func gatherWidensBackward() throws {
        let (q, k, v) = try randomQKV(batch: 2, heads: 4, kvHeads: 2, queryLength: 70, keyLength: 70, headDim: 33,
                                      valueDim: 16, seed: 23)
        let conformers: [(String, any DifferentiableAttention)] = [
            // The self rule (shared QK, causal) adds dO rows to dV.
            ("lsh shared QK, causal", LSHAttention(bucketSize: 8, hashes: 3, causal: true, seed: 11)),
            ("lsh separate keys", LSHAttention(bucketSize: 8, hashes: 2, sharedQK: false, seed: 12)),
            ("routing causal", try RoutingAttention(heads: 4, headDim: 33, clusters: 3, causal: true, seed: 4)),
            // Modifiers at the gathered slots' positions; LSH's self rule with a sink's share.
            ("lsh modified", try permutedWithModifiers(LSHAttention(bucketSize: 8, hashes: 3, causal: true, seed: 14),
                                                       heads: 4, length: 70, sinks: true)),
            ("routing modified", try permutedWithModifiers(
                RoutingAttention(heads: 4, headDim: 33, clusters: 3, causal: true, seed: 5), heads: 4, length: 70,
                sinks: false)),
            ("linformer per head", try LinformerAttention(projectedLength: 12, maxSequenceLength: 80,
                                                          perHeadProjections: 2, seed: 5)),
            ("memory-compressed mean, causal", try MemoryCompressedAttention(compression: 3, causal: true)),
            ("memory-compressed weights", try MemoryCompressedAttention(
                compression: 4, keyWeights: try Tensor.random(shape: [1, 1, 1, 2 * 4 * 33 * 33], seed: 1,
                                                               in: -0.3...0.3).elements,
                valueWeights: try Tensor.random(shape: [1, 1, 1, 2 * 4 * 16 * 16], seed: 2, in: -0.3...0.3).elements)),
            ("linear elu", LinearAttention(featureMap: EluPlusOneFeatures(), causal: false)),
            ("performer causal", LinearAttention(featureMap: try FavorPlusFeatures(features: 24, headDim: 33, seed: 2),
                                                 causal: true)),
            ("isab with projections", try InducedSetAttention(
                heads: 4, headDim: 33,
                inducingPoints: try Tensor.random(shape: [1, 1, 1, 4 * 5 * 33], seed: 6, in: -1...1).elements,
                keyProjection: try Tensor.random(shape: [1, 1, 1, 4 * 16 * 33], seed: 7, in: -0.3...0.3).elements,
                valueProjection: try Tensor.random(shape: [1, 1, 1, 4 * 16 * 16], seed: 8, in: -0.3...0.3).elements)),
        ]
        // PMA (KernelWideningBackward: the tiled backward writes dK, dV in their precision):
        // the seeds are the queries (the query tensor gives the shape).
        let pma = try AttentionPooling(heads: 4, headDim: 33, seedCount: 3, seed: 9)
        let (pq, pk, pv) = try randomQKV(batch: 2, heads: 4, kvHeads: 2, queryLength: 3, keyLength: 70, headDim: 33,
                                         valueDim: 16, seed: 24)
        try Self.forEachSetting(workspaceFirst: false) { p, workspace, threads, step, label in
            try Self.compare(pma, pq, pk, pv, keyLengths: [70, 0], precisions: p, step: step, workspace: workspace,
                             threads: threads, "pma \(label)")
        }
        try Self.forEachSetting(workspaceFirst: true) { p, workspace, threads, step, label in
            for (name, attention) in conformers {
                try Self.compare(attention, q, k, v, keyLengths: [70, 41], precisions: p, step: step,
                                 workspace: workspace, threads: threads, "\(name) \(label)")
            }
        }
        // Linear attention writes 16-bit gradients as it finishes their rows: dQ always,
        // dK and dV when the group has one query head (here, heads = kvHeads).
        let (sq, sk, sv) = try randomQKV(batch: 2, heads: 3, kvHeads: 3, queryLength: 70, keyLength: 70, headDim: 33,
                                         valueDim: 16, seed: 26)
        try Self.forEachSetting(workspaceFirst: true) { p, workspace, threads, step, label in
            for (name, attention) in conformers where attention is any LinearAttentionMarker {
                try Self.compare(attention, sq, sk, sv, keyLengths: [70, 41], precisions: p, step: step,
                                 workspace: workspace, threads: threads, "\(name), one head per group, \(label)")
            }
        }
        // Only the 16-bit gradients are staged (linear attention's dQ not even those, its dK
        // and dV a key/value head per worker; LSH and routing one head's rows of each): no
        // operand is copied (beyond them, the scratch for
        // 16-bit operands is per worker, the same at 70 and 7000 positions).
        let half = ActivationPrecision.bfloat16
        for (name, attention) in conformers {
            let linear = attention is any LinearAttentionMarker
            let perHead = name.hasPrefix("lsh") || name.hasPrefix("routing")
            // Linformer, memory-compressed and ISAB write each dK, dV row once, rounded: only
            // dQ staged.
            let keysWritten = name.hasPrefix("linformer") || name.hasPrefix("memory-compressed")
                || name.hasPrefix("isab")
            func bytes(_ n: Int, operands: ActivationPrecision, kvHeads: Int = 2) -> Int {
                let shape = AttentionShape(batch: 1, heads: 4, kvHeads: kvHeads, queryLength: n, headDim: 33,
                                           valueDim: 16)
                return attention.backwardConversionScratchBytes(
                    shape, query: operands, key: operands, value: operands, output: operands,
                    outputGradient: operands, dQuery: half, dKey: half, dValue: half, threads: 2)
            }
            for n in [70, 7000] {
                // LSH and routing: one head's rows of each; linear attention: dK, dV rows of
                // one key/value head per worker (2 threads, 2 key/value heads).
                let gradients = perHead ? 2 * roundUp64(n * 33 * 4) + roundUp64(n * 16 * 4)
                    : linear ? 2 * (roundUp64(n * 33 * 4) + roundUp64(n * 16 * 4))
                    : keysWritten ? roundUp64(4 * n * 33 * 4)
                    : roundUp64(4 * n * 33 * 4) + roundUp64(2 * n * 33 * 4) + roundUp64(2 * n * 16 * 4)
                #expect(bytes(n, operands: .float32) == gradients, "\(name) N \(n)")
                if linear { #expect(bytes(n, operands: .float32, kvHeads: 4) == 0, "\(name) N \(n)") }
            }
            #expect(bytes(70, operands: half) - bytes(70, operands: .float32)
                        == bytes(7000, operands: half) - bytes(7000, operands: .float32), "\(name)")
        }
    }

    @Test("Sinkhorn (plain, causal with noise, SortCut): the backward's passes widen 16-bit operands in the tiled kernel, the Float backward on widened operands, rounded once")
    func sinkhornWidensInKernel() throws {
        let (q, k, v) = try randomQKV(batch: 2, heads: 4, kvHeads: 2, queryLength: 100, keyLength: 100, headDim: 33,
                                      valueDim: 16, seed: 25)
        let conformers: [(String, SinkhornAttention)] = [
            ("sinkhorn", SinkhornAttention(blockSize: 16)),
            ("sinkhorn causal, noise", SinkhornAttention(blockSize: 12, noiseSeed: 4, causal: true)),
            ("sinkhorn sort-cut", SinkhornAttention(blockSize: 16, sortCut: 3)),
        ]
        try Self.forEachSetting(workspaceFirst: true) { p, workspace, threads, step, label in
            for (name, attention) in conformers {
                try Self.compare(attention, q, k, v, keyLengths: [100, 47], precisions: p, step: step,
                                 workspace: workspace, threads: threads, "\(name) \(label)")
            }
        }
        // Scratch beyond the staged gradients is per worker, a key block's rows at most (no
        // operand copied): the same at 1000 and 10000 positions.
        let half = ActivationPrecision.bfloat16
        func bytes(_ n: Int, operands: ActivationPrecision) -> Int {
            let shape = AttentionShape(batch: 1, heads: 4, kvHeads: 2, queryLength: n, headDim: 33, valueDim: 16)
            return conformers[0].1.backwardConversionScratchBytes(
                shape, query: operands, key: operands, value: operands, output: operands, outputGradient: operands,
                dQuery: half, dKey: half, dValue: half, threads: 2)
        }
        #expect(bytes(1000, operands: half) - bytes(1000, operands: .float32)
                    == bytes(10000, operands: half) - bytes(10000, operands: .float32))
        #expect(bytes(10000, operands: .float32)
                    == roundUp64(4 * 10000 * 33 * 4) + roundUp64(2 * 10000 * 33 * 4) + roundUp64(2 * 10000 * 16 * 4))
    }

    @Test("the tiled conformers' mixed backward takes no Float copy of an operand: scratch for dQ, staged dK and dV, and a key block per worker")
    func widenedInKernelScratch() throws {
        let shape = AttentionShape(batch: 2, heads: 8, kvHeads: 2, queryLength: 2048, headDim: 64)
        let dense = DenseAttention(causal: true)
        let half = ActivationPrecision.bfloat16
        let bytes = { (attention: any DifferentiableAttention, dQuery: ActivationPrecision) in
            attention.backwardConversionScratchBytes(shape, query: half, key: half, value: half, output: half,
                                                     outputGradient: half, dQuery: dQuery, dKey: half, dValue: half,
                                                     threads: 2)
        }
        // Float dQuery: only each worker's widened dO and output row (its value rows are in
        // the backward's own workspace, which packs them for strided blocks at any precision).
        #expect(bytes(dense, .float32) == 2 * (2 * 64) * 4)
        #expect(bytes(dense, .bfloat16) - bytes(dense, .float32) == shape.batch * shape.heads * 2048 * 64 * 4)
        // The strided pattern's passes add to dK and dV: those two staged too.
        let strided = StridedAttention(kind: .strided, stride: 46, causal: true)
        #expect(bytes(strided, .float32) - bytes(dense, .float32) == 2 * shape.batch * shape.kvHeads * 2048 * 64 * 4)
        // Linear attention widens its operands as it reads them: only the 16-bit dK, dV of
        // grouped heads are summed in Float, one key/value head's rows per worker (2 workers
        // for the 4 key/value heads), not the 4 heads' rows of each.
        let linear = LinearAttention(featureMap: EluPlusOneFeatures(), causal: true)
        #expect(bytes(linear, .float32) == 2 * 2 * 2048 * 64 * 4)
    }

    @Test("a steady-state mixed backward with a workspace sized for its precisions allocates nothing (one thread)",
          arguments: ["dense", "local", "strided", "longformer", "bigbird", "custom-mask", "adaptive-span", "multi-query",
                      "axial", "etc", "transformer-xl", "linformer", "linear-elu", "lsh", "routing", "memory-compressed",
                      "isab", "pma", "sinkhorn"])
    func allocations(_ name: String) throws {
        guard AllocationCounter.isSupported else { return }
        let entry = Registry.standard.entry(named: name)!
        // The first of the invariance problems the conformer takes (ISAB: D = Dv).
        let built = try InvarianceProblem.all.dropFirst(2).lazy.compactMap { problem in
            try InvarianceTests.instance(entry, problem).map { (problem, $0) }
        }.first
        guard let (problem, (made, q, k, v)) = built, let attention = made as? any DifferentiableAttention else {
            Issue.record("\(name) did not build a differentiable conformer")
            return
        }
        try Self.countAllocations(attention, q, k, v, keyLengths: problem.keyLengths.flatMap {
            $0.count == q.shape[0] ? $0 : nil
        }, name)
    }

    static func countAllocations(_ attention: some DifferentiableAttention, _ q: Tensor, _ k: Tensor, _ v: Tensor,
                                 keyLengths: [Int]?, _ name: String) throws {
        let p = OperandPrecisions(query: .bfloat16, key: .float16, value: .float16, output: .bfloat16)
        let shape = try AttentionShape(query: q, key: k, value: v)
        let forward = try attention.attend(query: q, key: k, value: v, keyLengths: keyLengths, threads: 1)
        let operand = { (t: Tensor, precision: ActivationPrecision) in
            MixedOperand(shape: SIMD4(t.shape), precision: precision, values: t.elements.map { rounded($0, precision) })
        }
        let (qo, ko, vo, oo) = (operand(q, p.query), operand(k, p.key), operand(v, p.value), operand(forward.output, p.output))
        let go = operand(try randomTensor(forward.output.shape, seed: 78), p.output)
        let dq = MixedOperand(shape: SIMD4(q.shape), precision: p.query)
        let dk = MixedOperand(shape: SIMD4(k.shape), precision: p.key)
        let dv = MixedOperand(shape: SIMD4(v.shape), precision: p.value)
        let workspace = try AttentionWorkspace(forBackwardOf: attention, shape: shape, threads: 1, precisions: p)
        let (qv, kv, vv, ov, gv) = (try qo.view, try ko.view, try vo.view, try oo.view, try go.view)
        let (dqv, dkv, dvv) = (try dq.mutableView, try dk.mutableView, try dv.mutableView)
        let count = try forward.logSumExp.withStridedView { lse in
            try CallingConventionTests.steadyStateAllocations {
                try attention.gradients(query: qv, key: kv, value: vv, output: ov, logSumExp: lse, outputGradient: gv,
                                        dQuery: dqv, dKey: dkv, dValue: dvv, keyLengths: keyLengths,
                                        workspace: workspace, threads: 1)
            }
        }
        #expect(count == 0, "\(name): \(count) allocations per mixed backward call")
        // The counter sees this call's allocations: without a workspace the conversions
        // take their scratch from the heap.
        let unassisted = try forward.logSumExp.withStridedView { lse in
            try CallingConventionTests.steadyStateAllocations {
                try attention.gradients(query: qv, key: kv, value: vv, output: ov, logSumExp: lse, outputGradient: gv,
                                        dQuery: dqv, dKey: dkv, dValue: dvv, keyLengths: keyLengths,
                                        workspace: nil, threads: 1)
            }
        }
        #expect(unassisted > 0, "\(name): no allocation counted without a workspace")
    }

    @Test("bad views and a small workspace throw, naming what is wrong")
    func badCalls() throws {
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 9, keyLength: 9, headDim: 8, seed: 6)
        let dense = DenseAttention()
        let forward = try dense.attend(query: q, key: k, value: v)
        let p = OperandPrecisions(.bfloat16)
        let operand = { (t: Tensor) in MixedOperand(shape: SIMD4(t.shape), precision: .bfloat16, values: t.elements) }
        let (qo, ko, vo, oo) = (operand(q), operand(k), operand(v), operand(forward.output))
        let dk = MixedOperand(shape: SIMD4(k.shape), precision: .bfloat16)
        let dv = MixedOperand(shape: SIMD4(v.shape), precision: .bfloat16)
        let small = try AttentionWorkspace(byteCount: 64)
        try forward.logSumExp.withStridedView { lse in
            // dQuery written over the query.
            let overlap = thrownAttentionError {
                try dense.gradients(query: qo.view, key: ko.view, value: vo.view, output: oo.view, logSumExp: lse,
                                    outputGradient: oo.view, dQuery: qo.mutableView, dKey: dk.mutableView,
                                    dValue: dv.mutableView, keyLengths: nil, workspace: nil, threads: 1)
            }
            #expect(overlap?.message.contains("dQuery overlaps query") == true)
            // dKey of the wrong shape.
            let wrong = MixedOperand(shape: SIMD4(1, 2, 8, 8), precision: .bfloat16)
            let dq = MixedOperand(shape: SIMD4(q.shape), precision: .bfloat16)
            let shape = thrownAttentionError {
                try dense.gradients(query: qo.view, key: ko.view, value: vo.view, output: oo.view, logSumExp: lse,
                                    outputGradient: oo.view, dQuery: dq.mutableView, dKey: wrong.mutableView,
                                    dValue: dv.mutableView, keyLengths: nil, workspace: nil, threads: 1)
            }
            #expect(shape?.message.contains("dKey") == true)
            let space = thrownAttentionError {
                try dense.gradients(query: qo.view, key: ko.view, value: vo.view, output: oo.view, logSumExp: lse,
                                    outputGradient: oo.view, dQuery: dq.mutableView, dKey: dk.mutableView,
                                    dValue: dv.mutableView, keyLengths: nil, workspace: small, threads: 1)
            }
            #expect(space?.message.contains("workspace") == true)
        }
        let sized = try AttentionWorkspace(forBackwardOf: dense, shape: AttentionShape(heads: 2, queryLength: 9, headDim: 8),
                                           threads: 1, precisions: p)
        #expect(sized.byteCount > (try dense.backwardCost(AttentionShape(heads: 2, queryLength: 9, headDim: 8),
                                                           threads: 1).workspaceBytes))
    }
}

/// Any ``LinearAttention``, whatever its feature map.
private protocol LinearAttentionMarker {}
extension LinearAttention: LinearAttentionMarker {}
