// Float16 and BFloat16 activations (issue 16, item 4): every conformer through the
// ActivationView entry point equals its Float call on the widened inputs, with the output
// rounded once, bit for bit; dense within the bound the output precision allows of the
// Double reference; the bfloat16 conversions against their definition.

import AttentionBenchCore
@_spi(Testing) @_spi(Benchmarking) import EfficientAttention
import Foundation
import Testing

/// `x` rounded to `precision` and widened back (the value a 16-bit operand holds).
/// `bytes` rounded up to the workspace's 64-byte alignment.
func roundUp64(_ bytes: Int) -> Int { (bytes + 63) / 64 * 64 }

func rounded(_ x: Float, _ precision: ActivationPrecision) -> Float {
    switch precision {
    case .float32: x
    case .float16: Float(Float16(x))
    case .bfloat16: Float(bitPattern: UInt32(BFloat16Conversions.bits(x)) << 16)
    }
}

/// The bit pattern of `x` rounded to `precision` (zero-extended for 16-bit precisions).
func roundedBits(_ x: Float, _ precision: ActivationPrecision) -> UInt32 {
    switch precision {
    case .float32: x.bitPattern
    case .float16: UInt32(Float16(x).bitPattern)
    case .bfloat16: UInt32(BFloat16Conversions.bits(x))
    }
}

/// An operand in its own storage: elements `step` apart inside rows padded by 3 elements,
/// heads by 5, batch items by 7, from offset 2; every gap holds a NaN pattern.
final class MixedOperand {
    let precision: ActivationPrecision
    let shape: SIMD4<Int>, strides: SIMD4<Int>
    let offset = 2, count: Int
    let storage: UnsafeMutableRawPointer

    /// `values` (row-major Floats, exactly representable in `precision`) or NaN everywhere.
    init(shape: SIMD4<Int>, precision: ActivationPrecision, step: Int = 1, values: [Float]? = nil) {
        self.precision = precision
        self.shape = shape
        let s2 = shape[3] * step + 3, s1 = shape[2] * s2 + 5, s0 = shape[1] * s1 + 7
        strides = SIMD4(s0, s1, s2, step)
        count = offset + shape[0] * s0 + 4
        storage = .allocate(byteCount: count * precision.byteWidth, alignment: 64)
        for e in 0..<count { store(.nan, at: e) }
        if let values {
            var n = 0
            forEachIndex { e in store(values[n], at: e); n += 1 }
        }
    }

    deinit { storage.deallocate() }

    func forEachIndex(_ body: (Int) -> Void) {
        for b in 0..<shape[0] { for h in 0..<shape[1] { for i in 0..<shape[2] { for c in 0..<shape[3] {
            body(offset + b * strides[0] + h * strides[1] + i * strides[2] + c * strides[3])
        } } } }
    }

    func store(_ x: Float, at e: Int) {
        switch precision {
        case .float32: storage.storeBytes(of: x, toByteOffset: 4 * e, as: Float.self)
        case .float16, .bfloat16:
            storage.storeBytes(of: UInt16(truncatingIfNeeded: roundedBits(x, precision)), toByteOffset: 2 * e,
                               as: UInt16.self)
        }
    }

    func bits(at e: Int) -> UInt32 {
        precision == .float32 ? storage.load(fromByteOffset: 4 * e, as: UInt32.self)
            : UInt32(storage.load(fromByteOffset: 2 * e, as: UInt16.self))
    }

    /// The addressed elements' bit patterns, row-major.
    var elementBits: [UInt32] {
        var out: [UInt32] = []
        forEachIndex { out.append(bits(at: $0)) }
        return out
    }

    /// Whether every element outside the view still holds its NaN pattern.
    var gapsUntouched: Bool {
        var addressed = Set<Int>()
        forEachIndex { addressed.insert($0) }
        let nan = roundedBits(.nan, precision)
        return (0..<count).allSatisfy { addressed.contains($0) || bits(at: $0) == nan }
    }

    var view: ActivationView {
        get throws {
            switch precision {
            case .float32:
                ActivationView(try StridedView(UnsafeBufferPointer(start: storage.assumingMemoryBound(to: Float.self),
                                                                   count: count),
                                               shape: shape, strides: strides, offset: offset))
            case .float16, .bfloat16:
                try ActivationView(bitPatterns: UnsafeBufferPointer(start: storage.assumingMemoryBound(to: UInt16.self),
                                                                    count: count),
                                   precision: precision, shape: shape, strides: strides, offset: offset)
            }
        }
    }

    var mutableView: MutableActivationView {
        get throws {
            switch precision {
            case .float32:
                MutableActivationView(try MutableStridedView(
                    UnsafeMutableBufferPointer(start: storage.assumingMemoryBound(to: Float.self), count: count),
                    shape: shape, strides: strides, offset: offset))
            case .float16, .bfloat16:
                try MutableActivationView(
                    bitPatterns: UnsafeMutableBufferPointer(start: storage.assumingMemoryBound(to: UInt16.self),
                                                            count: count),
                    precision: precision, shape: shape, strides: strides, offset: offset)
            }
        }
    }
}

@Suite("Float16 and BFloat16 activations")
struct MixedPrecisionTests {
    static let combinations: [OperandPrecisions] = [
        OperandPrecisions(.float16),
        OperandPrecisions(.bfloat16),
        OperandPrecisions(query: .bfloat16, key: .float16, value: .float32, output: .float16),
        OperandPrecisions(query: .float32, key: .float32, value: .float32, output: .bfloat16),
        OperandPrecisions(query: .float16, key: .bfloat16, value: .bfloat16, output: .float32),
    ]

    /// Runs `attention` on `q`, `k`, `v` (Float tensors) stored in `p`'s precisions, and the
    /// Float call on the rounded values; returns both outputs' bits (rounded to `p.output`).
    static func compare(_ attention: any Attention, _ q: Tensor, _ k: Tensor, _ v: Tensor, keyLengths: [Int]?,
                        precisions p: OperandPrecisions, step: Int, workspace: Bool, threads: Int,
                        _ label: String) throws {
        func widened(_ t: Tensor, _ precision: ActivationPrecision) throws -> Tensor {
            try Tensor(shape: t.shape, data: t.elements.map { rounded($0, precision) })
        }
        let (wq, wk, wv) = (try widened(q, p.query), try widened(k, p.key), try widened(v, p.value))
        let expected = try attention.attend(query: wq, key: wk, value: wv, keyLengths: keyLengths, threads: threads)
        let shape = try AttentionShape(query: q, key: k, value: v)
        let qo = MixedOperand(shape: SIMD4(q.shape), precision: p.query, step: step, values: wq.elements)
        let ko = MixedOperand(shape: SIMD4(k.shape), precision: p.key, step: step, values: wk.elements)
        let vo = MixedOperand(shape: SIMD4(v.shape), precision: p.value, step: step, values: wv.elements)
        let oo = MixedOperand(shape: SIMD4(shape.batch, shape.heads, shape.queryLength, shape.valueDim),
                              precision: p.output, step: step)
        var lse = NaNPaddedOutput(shape: [shape.batch, shape.heads, shape.queryLength, 1])
        let space = workspace ? try AttentionWorkspace(for: attention, shape: shape, threads: threads, precisions: p) : nil
        try lse.withView { lv in
            try attention.attend(query: qo.view, key: ko.view, value: vo.view, output: oo.mutableView,
                                 logSumExp: lv, keyLengths: keyLengths, workspace: space, threads: threads)
        }
        let want = expected.output.elements.map { roundedBits($0, p.output) }
        let got = oo.elementBits
        let index = zip(got, want).enumerated().first { $0.element.0 != $0.element.1 }?.offset
        #expect(index == nil, "\(label): output element \(index ?? -1) has bits \(index.map { got[$0] } ?? 0), expected \(index.map { want[$0] } ?? 0)")
        let gaps = oo.gapsUntouched
        #expect(gaps, "\(label): wrote outside the output view")
        let lseEqual = bitwiseEqual(lse.elements, expected.logSumExp.elements)
        #expect(lseEqual, "\(label): lse differs at \(firstDifference(lse.elements, expected.logSumExp.elements))")
    }

    /// Heap allocations of a steady-state Float16 call of `attention` on `q`, `k`, `v` (one
    /// thread) with a workspace sized for its precisions.
    /// ``compare(_:_:_:_:keyLengths:precisions:step:workspace:threads:_:)`` for each conformer
    /// with a 16-bit output formed in parts of at most each of `parts`' bytes
    /// (``MergedOutputStaging/partBytes``), with a workspace; the first precision mix with
    /// `keyLengths` on 2 threads, the next without on 3, and so on.
    static func compareInParts(_ conformers: [(String, any Attention)], _ q: Tensor, _ k: Tensor, _ v: Tensor,
                               keyLengths: [Int], parts: [(String, Int)], precisions: [OperandPrecisions]) throws {
        for (c, p) in precisions.enumerated() {
            for (partName, bytes) in parts {
                try MergedOutputStaging.$partBytes.withValue(bytes) {
                    for (name, attention) in conformers {
                        try compare(attention, q, k, v, keyLengths: c == 0 ? keyLengths : nil, precisions: p,
                                    step: c + 1, workspace: true, threads: c + 2, "\(name), parts: \(partName)")
                    }
                }
            }
        }
    }

    static func halfPrecisionAllocations(_ attention: any Attention, _ q: Tensor, _ k: Tensor, _ v: Tensor,
                                         threads: Int = 1) throws -> Int {
        let s = try AttentionShape(query: q, key: k, value: v)
        let workspace = try AttentionWorkspace(for: attention, shape: s, threads: threads,
                                               precisions: OperandPrecisions(.float16))
        let qo = MixedOperand(shape: SIMD4(q.shape), precision: .float16, values: q.elements.map { rounded($0, .float16) })
        let ko = MixedOperand(shape: SIMD4(k.shape), precision: .float16, values: k.elements.map { rounded($0, .float16) })
        let vo = MixedOperand(shape: SIMD4(v.shape), precision: .float16, values: v.elements.map { rounded($0, .float16) })
        let oo = MixedOperand(shape: SIMD4(s.batch, s.heads, s.queryLength, s.valueDim), precision: .float16)
        let (qv, kv, vv, ov) = (try qo.view, try ko.view, try vo.view, try oo.mutableView)
        return try CallingConventionTests.steadyStateAllocations {
            try attention.attend(query: qv, key: kv, value: vv, output: ov, logSumExp: nil, keyLengths: nil,
                                 workspace: workspace, threads: threads)
        }
    }

    @Test("every conformer: 16-bit operands give the Float call on the widened inputs, rounded once",
          arguments: InvarianceTests.entries)
    func matchesWidenedFloatCall(_ name: String) throws {
        let entry = Registry.standard.entry(named: name)!
        var ran = 0
        for (n, problem) in InvarianceProblem.all.enumerated().dropFirst() where ran < 3 {
            guard let (attention, q, k, v) = try InvarianceTests.instance(entry, problem) else { continue }
            let keyLengths = problem.keyLengths.flatMap { $0.count == q.shape[0] ? $0 : nil }
            for (c, precisions) in Self.combinations.enumerated() {
                let step = (n + c) % 2 + 1
                try Self.compare(attention, q, k, v, keyLengths: keyLengths, precisions: precisions, step: step,
                                 workspace: c % 2 == 0, threads: c % 3 + 1,
                                 "\(name) \(problem.testDescription) \(precisions) step \(step)")
            }
            ran += 1
        }
        #expect(ran >= 1, "\(name) ran on no problem")
    }

    @Test("axial (union and sum, 2-D and 3-D, causal) and ETC (with a relative table): widened in the tiled kernel, the Float call on the widened inputs")
    func axialAndETCWidenInKernel() throws {
        let (q, k, v) = try randomQKV(batch: 2, heads: 4, kvHeads: 2, queryLength: 150, keyLength: 150, headDim: 65,
                                      valueDim: 16, seed: 12)
        let table = try ETCAttention(heads: 4, headDim: 65, globals: 7, radius: 9, maxDistance: 5, seed: 4)
        let conformers: [(String, any Attention)] = [
            ("axial union 10x15", AxialAttention(axes: [10, 15])),
            ("axial sum 5x5x6 causal", AxialAttention(axes: [5, 5, 6], combination: .sum, causal: true)),
            ("axial sum 15x10", AxialAttention(axes: [15, 10], combination: .sum)),
            ("etc causal", ETCAttention(globals: 3, radius: 11, causal: true)),
            ("etc with a relative table", table),
        ]
        for (c, precisions) in Self.combinations.enumerated() {
            for (name, attention) in conformers {
                try Self.compare(attention, q, k, v, keyLengths: c % 2 == 0 ? [150, 61] : nil, precisions: precisions,
                                 step: c % 2 + 1, workspace: c % 2 == 1, threads: c % 3 + 1, "\(name) \(precisions)")
            }
        }
        // .sum's later axes run in the workspace (they allocated a tensor per call before).
        if AllocationCounter.isSupported {
            let count = try Self.halfPrecisionAllocations(AxialAttention(axes: [10, 15], combination: .sum), q, k, v)
            #expect(count == 0, "axial .sum: \(count) allocations per call with a workspace")
        }
        // Their 16-bit calls take no Float copy of an input: only the staged output.
        let shape = AttentionShape(batch: 1, heads: 8, queryLength: 4096, headDim: 64)
        let half = OperandPrecisions(.bfloat16)
        for (name, attention) in conformers {
            #expect(attention.conversionScratchBytes(shape, precisions: half) == 8 * 4096 * 64 * 4, "\(name)")
        }
    }

    @Test("merged passes form a 16-bit output part by part (batch items, then groups of heads): the Float call's bits, and the part's scratch only")
    func mergedOutputInParts() throws {
        let (n, heads) = (150, 4)
        let (q, k, v) = try randomQKV(batch: 2, heads: heads, kvHeads: 2, queryLength: n, keyLength: n, headDim: 65,
                                      valueDim: 16, seed: 31)
        // Per-head state whose head index a part must offset: ALiBi slopes and a per-head bias
        // (strided), per-head dilations (Longformer), a per-head relative table (ETC).
        var strided = StridedAttention(stride: 12)
        strided.modifiers = ScoreModifiers(alibiSlopes: ScoreModifiers.standardALiBiSlopes(heads: heads),
                                           bias: try Tensor.random(shape: [1, heads, n, n], seed: 5))
        let conformers: [(String, any Attention)] = [
            ("strided with ALiBi and a per-head bias", strided),
            ("strided causal", StridedAttention(stride: 9, causal: true)),
            ("longformer with per-head dilations", LongformerAttention(window: 16, dilations: [1, 2, 1, 3],
                                                                       globalPositions: [0, 77])),
            ("axial union 10x15", AxialAttention(axes: [10, 15])),
            ("axial sum 15x10", AxialAttention(axes: [15, 10], combination: .sum)),
            ("etc with a per-head relative table",
             try ETCAttention(heads: heads, headDim: 65, globals: 7, radius: 9, maxDistance: 5, seed: 4)),
        ]
        let headBytes = n * 16 * 4
        // Parts of one group (2 heads), of one batch item, and the whole call.
        let parts: [(String, Int)] = [("one group", headBytes), ("one item", heads * headBytes), ("whole", 16 << 20)]
        try Self.compareInParts(conformers, q, k, v, keyLengths: [150, 61], parts: parts, precisions: [
            OperandPrecisions(.float16),
            OperandPrecisions(query: .float32, key: .float32, value: .float32, output: .bfloat16)])
        // The scratch follows the part: a 16 MiB part at N = 65536 (one head's rows), one
        // group of 4 heads with grouped heads, not the whole 128 MiB output.
        let long = AttentionShape(batch: 1, heads: 8, queryLength: 65536, headDim: 64)
        let grouped = AttentionShape(batch: 1, heads: 8, kvHeads: 2, queryLength: 65536, headDim: 64)
        let short = AttentionShape(batch: 4, heads: 8, queryLength: 1024, headDim: 64)
        for (name, attention) in conformers.prefix(4) {
            let bf16 = OperandPrecisions(.bfloat16)
            #expect(attention.conversionScratchBytes(long, precisions: bf16) == 65536 * 64 * 4, "\(name)")
            #expect(attention.conversionScratchBytes(grouped, precisions: bf16) == 4 * 65536 * 64 * 4, "\(name)")
            #expect(attention.conversionScratchBytes(short, precisions: bf16) == 4 * 8 * 1024 * 64 * 4, "\(name)")
            #expect(attention.conversionScratchBytes(long, precisions: OperandPrecisions(.float32)) == 0, "\(name)")
        }
        // A call sized for its parts allocates nothing in steady state.
        if AllocationCounter.isSupported {
            let count = try MergedOutputStaging.$partBytes.withValue(headBytes) {
                try Self.halfPrecisionAllocations(strided, q, k, v)
            }
            #expect(count == 0, "strided in parts of one group: \(count) allocations per call with a workspace")
        }
    }

    @Test("LSH, routing and Sinkhorn form a 16-bit output part by part (batch items, then heads; Sinkhorn whole groups): the Float call's bits, and the part's scratch only")
    func mergedHeadsInParts() throws {
        let (n, heads) = (90, 4)
        // Sinkhorn and shared-QK LSH need queries as long as the keys.
        let (q, k, v) = try randomQKV(batch: 2, heads: heads, kvHeads: 2, queryLength: n, headDim: 33, valueDim: 17,
                                      seed: 37)
        // Per-head state a part must read at the whole call's head: LSH's rotations, routing's
        // centroids, Sinkhorn's per-head plans and noise.
        let conformers: [(String, any Attention)] = [
            ("lsh shared QK, causal", LSHAttention(bucketSize: 8, hashes: 3, causal: true, seed: 11)),
            ("lsh separate keys", LSHAttention(bucketSize: 8, hashes: 2, sharedQK: false, seed: 12)),
            ("routing", try RoutingAttention(heads: heads, headDim: 33, clusters: 4, seed: 3)),
            ("routing causal", try RoutingAttention(heads: heads, headDim: 33, clusters: 3, causal: true, seed: 4)),
            ("sinkhorn", SinkhornAttention(blockSize: 16)),
            ("sinkhorn causal, noise", SinkhornAttention(blockSize: 12, noiseSeed: 4, causal: true)),
        ]
        let headBytes = n * 17 * 4
        // Parts of one head (Sinkhorn: one group of 2), of one batch item, and the whole call.
        let parts: [(String, Int)] = [("one head", headBytes), ("one item", heads * headBytes), ("whole", 16 << 20)]
        try Self.compareInParts(conformers, q, k, v, keyLengths: [90, 37], parts: parts, precisions: [
            OperandPrecisions(.bfloat16),
            OperandPrecisions(query: .float32, key: .float16, value: .float32, output: .float16)])
        // The scratch follows the part: one head's rows at N = 65536 (one group of 4 for
        // Sinkhorn with grouped heads), not the whole 128 MiB output.
        let long = AttentionShape(batch: 1, heads: 8, queryLength: 65536, headDim: 64)
        let grouped = AttentionShape(batch: 1, heads: 8, kvHeads: 2, queryLength: 65536, headDim: 64)
        let bf16 = OperandPrecisions(.bfloat16)
        for (name, attention) in [conformers[0], conformers[4]] {
            #expect(attention.conversionScratchBytes(long, precisions: bf16) == 65536 * 64 * 4, "\(name)")
            #expect(attention.conversionScratchBytes(grouped, precisions: bf16)
                        == (name.hasPrefix("lsh") ? 1 : 4) * 65536 * 64 * 4, "\(name)")
        }
        // A call sized for its parts allocates nothing in steady state, on 1 and 2 threads.
        if AllocationCounter.isSupported {
            for threads in [1, 2] {
                for (name, attention) in conformers {
                    let count = try MergedOutputStaging.$partBytes.withValue(headBytes) {
                        try Self.halfPrecisionAllocations(attention, q, k, v, threads: threads)
                    }
                    #expect(count == 0, "\(name) in parts of one head, \(threads) threads: \(count) allocations per call with a workspace")
                }
            }
        }
    }

    @Test("decode-shaped 16-bit keys read in place: the Float call's key tiles, so its bits (fuzz case 4143000296176)")
    func decodeTilesFollowFloat() throws {
        // Seven query rows per key/value head group, below the micro-kernel's 32: the dot-product
        // path, whose Float tile at D = 128 is 128 keys; 139 keys span two of them.
        let (q, k, v) = try randomQKV(batch: 3, heads: 2, kvHeads: 2, queryLength: 7, keyLength: 139, headDim: 128,
                                      valueDim: 4, seed: 41)
        for precisions in [OperandPrecisions(.float16), OperandPrecisions(.bfloat16)] {
            for causal in [false, true] {
                try Self.compare(DenseAttention(causal: causal), q, k, v, keyLengths: [139, 130, 5], precisions: precisions,
                                 step: 1, workspace: causal, threads: 3, "dense decode \(precisions) causal \(causal)")
            }
        }
    }

    @Test("sinks with a 16-bit output: the Float output they rescale is counted in the workspace (no allocation per call)")
    func sinksWithHalfOutput() throws {
        guard AllocationCounter.isSupported else { return }
        let (q, k, v) = try randomQKV(batch: 1, heads: 4, kvHeads: 2, queryLength: 100, keyLength: 100, headDim: 32,
                                      valueDim: 32, seed: 8)
        let conformers: [(String, any ModifiableAttention)] = [
            ("dense", DenseAttention()), ("local", LocalAttention(left: 9, right: 3)), ("strided", StridedAttention(stride: 10)),
        ]
        for (name, conformer) in conformers {
            var attention = conformer
            attention.modifiers = ScoreModifiers(sinks: [0.5, -1, 2, 0])
            let count = try Self.halfPrecisionAllocations(attention, q, k, v)
            #expect(count == 0, "\(name) with sinks: \(count) allocations per Float16 call with a workspace")
        }
    }

    @Test("Linformer, memory-compressed, Sinkhorn, ISAB: keys and values widened as the GEMM packs (or the pooling and block sums read) them, the Float call on the widened inputs")
    func gemmPackingWidens() throws {
        let (q, k, v) = try randomQKV(batch: 2, heads: 4, kvHeads: 2, queryLength: 61, keyLength: 100, headDim: 33,
                                      valueDim: 17, seed: 14)
        func weights(_ count: Int, seed: UInt64) throws -> [Float] {
            try Tensor.random(shape: [1, 1, 1, count], seed: seed, in: -0.3...0.3).elements
        }
        let conformers: [(String, any Attention)] = [
            ("linformer", try LinformerAttention(projectedLength: 12, maxSequenceLength: 100, seed: 3)),
            ("linformer per head, shared", try LinformerAttention(projectedLength: 9, maxSequenceLength: 128,
                                                                  perHeadProjections: 2, sharedKeyValue: true, seed: 5)),
            ("memory-compressed mean", try MemoryCompressedAttention(compression: 3, causal: true)),
            ("memory-compressed weights", try MemoryCompressedAttention(
                compression: 4, keyWeights: try weights(2 * 4 * 33 * 33, seed: 1),
                valueWeights: try weights(2 * 4 * 17 * 17, seed: 2), keyBias: try weights(2 * 33, seed: 3))),
            // Block sums (rows widened one at a time), the mixing GEMM, the own blocks' pass.
            ("sinkhorn", SinkhornAttention(blockSize: 16)),
            ("sinkhorn causal, noise", SinkhornAttention(blockSize: 12, noiseSeed: 4, causal: true)),
            ("sinkhorn sort-cut", SinkhornAttention(blockSize: 16, sortCut: 3)),
            // The inducing points' attention over 16-bit keys and values, projections, the summary.
            ("isab with projections", try InducedSetAttention(
                heads: 4, headDim: 33, inducingPoints: try weights(4 * 5 * 33, seed: 6),
                keyProjection: try weights(4 * 17 * 33, seed: 7), valueProjection: try weights(4 * 17 * 17, seed: 8))),
        ]
        // Sinkhorn sorts the blocks of one sequence: queries as long as the keys.
        let square = try randomQKV(batch: 2, heads: 4, kvHeads: 2, queryLength: 100, headDim: 33, valueDim: 17,
                                   seed: 15)
        for (c, precisions) in Self.combinations.enumerated() {
            for (name, attention) in conformers {
                let (q, k, v) = name.hasPrefix("sinkhorn") ? square : (q, k, v)
                try Self.compare(attention, q, k, v, keyLengths: c % 2 == 0 ? [100, 47] : nil, precisions: precisions,
                                 step: c % 2 + 1, workspace: c % 2 == 1, threads: c % 3 + 1, "\(name) \(precisions)")
            }
        }
        // No Float copy of an input (Sinkhorn without SortCut stages its merged output).
        let shape = AttentionShape(batch: 1, heads: 8, queryLength: 100, headDim: 33, valueDim: 17)
        for (name, attention) in conformers {
            let staged = name == "sinkhorn" || name == "sinkhorn causal, noise" ? 8 * 100 * 17 * 4 : 0
            #expect(attention.conversionScratchBytes(shape, precisions: OperandPrecisions(.float16)) == roundUp64(staged),
                    "\(name)")
        }
    }

    @Test("LSH and routing: 16-bit rows widened as the hashing and the router pack them and as the gather copies them, the Float call on the widened inputs")
    func gatherWidens() throws {
        let conformers: [(String, any Attention)] = [
            ("lsh shared QK, causal", LSHAttention(bucketSize: 8, hashes: 3, causal: true, seed: 11)),
            ("lsh separate keys", LSHAttention(bucketSize: 8, hashes: 2, sharedQK: false, seed: 12)),
            ("lsh across buckets", LSHAttention(bucketSize: 8, hashes: 2, attendAcrossBuckets: true, seed: 13)),
            ("routing", try RoutingAttention(heads: 4, headDim: 33, clusters: 4, seed: 3)),
            ("routing causal", try RoutingAttention(heads: 4, headDim: 33, clusters: 3, causal: true, seed: 4)),
            ("lsh modified", try permutedWithModifiers(LSHAttention(bucketSize: 8, hashes: 3, causal: true, seed: 14),
                                                       heads: 4, length: 70, sinks: true)),
            ("routing modified", try permutedWithModifiers(RoutingAttention(heads: 4, headDim: 33, clusters: 3, seed: 5),
                                                           heads: 4, length: 70, sinks: false)),
        ]
        let (q, k, v) = try randomQKV(batch: 2, heads: 4, kvHeads: 2, queryLength: 70, headDim: 33, valueDim: 17,
                                      seed: 21)
        for (c, precisions) in Self.combinations.enumerated() {
            for (name, attention) in conformers {
                try Self.compare(attention, q, k, v, keyLengths: c % 2 == 0 ? [70, 41] : nil, precisions: precisions,
                                 step: c % 2 + 1, workspace: c % 2 == 1, threads: c % 3 + 1, "\(name) \(precisions)")
            }
        }
        // No Float copy of an input: only the merged output is staged.
        let shape = AttentionShape(batch: 1, heads: 4, queryLength: 100, headDim: 33, valueDim: 17)
        for (name, attention) in conformers where !name.hasSuffix("modified") {
            #expect(attention.conversionScratchBytes(shape, precisions: OperandPrecisions(.float16))
                        == roundUp64(4 * 100 * 17 * 4), "\(name)")
        }
    }

    @Test("linear attention (elu+1, FAVOR+, ReLU; causal and not; the scan and the segmented path): 16-bit rows widened a chunk at a time, the Float call on the widened inputs")
    func linearAttentionWidens() throws {
        func conformers(headDim d: Int) throws -> [(String, any Attention)] {
            [("elu causal", LinearAttention(featureMap: EluPlusOneFeatures(), causal: true)),
             ("elu", LinearAttention(featureMap: EluPlusOneFeatures(), causal: false)),
             ("favor+", LinearAttention(featureMap: try FavorPlusFeatures(features: 24, headDim: d, seed: 2),
                                        causal: false)),
             ("relu causal", LinearAttention(featureMap: try ReLUFeatures(features: 20, headDim: d, seed: 3),
                                             causal: true))]
        }
        // One scan per head, and (past 32768 positions) split along the sequence.
        for (n, (length, d, dv)) in [(70, 33, 17), (40000, 8, 5)].enumerated() {
            let (q, k, v) = try randomQKV(batch: 1, heads: 2, kvHeads: 1, queryLength: length, headDim: d, valueDim: dv,
                                          seed: 16 + UInt64(n))
            for (c, precisions) in Self.combinations.enumerated() where n == 0 || c % 2 == 0 {
                for (name, attention) in try conformers(headDim: d) {
                    try Self.compare(attention, q, k, v, keyLengths: nil, precisions: precisions, step: c % 2 + 1,
                                     workspace: c % 2 == 1, threads: c % 3 + 1, "\(name) N \(length) \(precisions)")
                }
            }
        }
        let shape = AttentionShape(batch: 1, heads: 8, queryLength: 100, headDim: 33, valueDim: 17)
        #expect(try conformers(headDim: 33)[0].1.conversionScratchBytes(shape, precisions: OperandPrecisions(.bfloat16))
                == 0, "nothing staged: the output rounded a chunk at a time")
    }

    @Test("dense and multi-query, decode-shaped (the decode kernel) and tiled, causal and not")
    func denseShapes() throws {
        let cases: [(any Attention, Int, Int, Int, Int)] = [
            (DenseAttention(), 1, 1, 1, 300), (DenseAttention(causal: true), 2, 2, 5, 70),
            (MultiQueryAttention(causal: true), 8, 2, 3, 200), (MultiQueryAttention(leftWindow: 9), 4, 1, 40, 50),
            (DenseAttention(causal: true), 2, 2, 33, 33),
        ]
        for (attention, h, hkv, nq, nk) in cases {
            let (q, k, v) = try randomQKV(heads: h, kvHeads: hkv, queryLength: nq, keyLength: nk, headDim: 65,
                                          valueDim: 16, seed: 11)
            for precisions in Self.combinations {
                for step in [1, 2] {
                    try Self.compare(attention, q, k, v, keyLengths: nil, precisions: precisions, step: step,
                                     workspace: true, threads: 2,
                                     "\(attention.name) H \(h)/\(hkv) Nq \(nq) Nk \(nk) \(precisions) step \(step)")
                }
            }
        }
    }

    /// The output's error against the Double reference on the rounded inputs is the output's
    /// rounding (half an ulp: 2^-11 relative for binary16, 2^-8 for bfloat16) plus the Float
    /// computation's (at most 1e-5 here).
    @Test("dense within the output precision's rounding of the Double reference", arguments: [ActivationPrecision.float16, .bfloat16])
    func againstReference(_ precision: ActivationPrecision) throws {
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 70, headDim: 64, seed: 3)
        let p = OperandPrecisions(precision)
        func widened(_ t: Tensor) throws -> Tensor { try Tensor(shape: t.shape, data: t.elements.map { rounded($0, precision) }) }
        let reference = referenceAttention(query: try widened(q), key: try widened(k), value: try widened(v),
                                           scale: defaultScale(headDim: 64), visible: { _, _, i, j in j <= i })
        let qo = MixedOperand(shape: SIMD4(q.shape), precision: precision, values: try widened(q).elements)
        let ko = MixedOperand(shape: SIMD4(k.shape), precision: precision, values: try widened(k).elements)
        let vo = MixedOperand(shape: SIMD4(v.shape), precision: precision, values: try widened(v).elements)
        let oo = MixedOperand(shape: SIMD4(1, 2, 70, 64), precision: precision)
        try DenseAttention(causal: true).attend(query: qo.view, key: ko.view, value: vo.view, output: oo.mutableView,
                                                logSumExp: nil, keyLengths: nil, workspace: nil, threads: 2)
        _ = p
        let unit: Double = precision == .float16 ? 0x1p-11 : 0x1p-8
        var worst = 0.0
        for (n, bits) in oo.elementBits.enumerated() {
            let value = precision == .float16 ? Double(Float(Float16(bitPattern: UInt16(bits))))
                : Double(Float(bitPattern: bits << 16))
            let exact = reference.output[n]
            worst = max(worst, abs(value - exact) / (unit * abs(exact) + 1e-5))
        }
        #expect(worst <= 1, "\(precision): error \(worst) × the bound")
        #expect(worst > 0.01, "\(precision): the output was not rounded (\(worst))")
    }

    @Test("bfloat16: every pattern widens exactly and narrows back; ties round to even; NaN stays NaN")
    func bfloat16Conversions() {
        let all = (0...UInt16.max).map { $0 }
        let floats = BFloat16Conversions.rowFloats(all)
        #expect(zip(all, floats).allSatisfy { Float(bitPattern: UInt32($0) << 16).bitPattern == $1.bitPattern })
        let back = BFloat16Conversions.rowBits(floats)
        let nonNaN = zip(all, back).filter { !floats[Int($0.0)].isNaN }
        #expect(nonNaN.allSatisfy { $0.0 == $0.1 })
        #expect(zip(all, back).allSatisfy { !floats[Int($0.0)].isNaN || ($0.1 & 0x7FC0 == 0x7FC0 && $0.1 & 0x8000 == $0.0 & 0x8000) })
        // Ties: 1 + 2^-8 lies halfway between 1 and 1 + 2^-7 (rounds down, to even);
        // 1 + 3·2^-8 halfway between 1 + 2^-7 and 1 + 2^-6 (rounds up, to even).
        let ties: [Float] = [1 + 0x1p-8, 1 + 3 * 0x1p-8, -(1 + 0x1p-8), 1 + 0x1p-8 + 0x1p-20, .greatestFiniteMagnitude,
                             .infinity, -.infinity, 0x1p-130, -0.0]
        let expected: [UInt16] = [0x3F80, 0x3F82, 0xBF80, 0x3F81, 0x7F80, 0x7F80, 0xFF80, 0x0008, 0x8000]
        #expect(ties.map(BFloat16Conversions.bits) == expected)
        // The 16-lane path equals the scalar one (a row of 37: two vectors and a tail).
        var generator = SystemRandomNumberGenerator()
        let row = (0..<37).map { _ in Float(bitPattern: UInt32.random(in: 0...UInt32.max, using: &generator)) }
        #expect(BFloat16Conversions.rowBits(row).enumerated().allSatisfy { n, b in
            row[n].isNaN ? b & 0x7FC0 == 0x7FC0 : b == BFloat16Conversions.bits(row[n])
        })
        #expect(BFloat16Conversions.rowBits(ties + ties + ties + ties) == expected + expected + expected + expected)
    }

    @Test("a steady-state mixed call with a workspace sized for its precisions allocates nothing (one thread)",
          arguments: ["dense", "local", "multi-query", "bigbird", "axial", "etc", "transformer-xl", "linformer",
                      "memory-compressed", "sinkhorn", "isab", "pma", "performer"])
    func allocations(_ name: String) throws {
        guard AllocationCounter.isSupported else { return }
        let entry = Registry.standard.entry(named: name)!
        for problem in [InvarianceProblem.all[2], InvarianceProblem(queryLength: 3, keyLength: 80, headDim: 16, valueDim: 16, causal: false)] {
            guard let (attention, q, k, v) = try InvarianceTests.instance(entry, problem) else { continue }
            let shape = try AttentionShape(query: q, key: k, value: v)
            let p = OperandPrecisions(query: .bfloat16, key: .float16, value: .float16, output: .bfloat16)
            let workspace = try AttentionWorkspace(for: attention, shape: shape, threads: 1, precisions: p)
            let qo = MixedOperand(shape: SIMD4(q.shape), precision: p.query, values: q.elements.map { rounded($0, p.query) })
            let ko = MixedOperand(shape: SIMD4(k.shape), precision: p.key, values: k.elements.map { rounded($0, p.key) })
            let vo = MixedOperand(shape: SIMD4(v.shape), precision: p.value, values: v.elements.map { rounded($0, p.value) })
            let oo = MixedOperand(shape: SIMD4(shape.batch, shape.heads, shape.queryLength, shape.valueDim), precision: p.output)
            let (qv, kv, vv, ov) = (try qo.view, try ko.view, try vo.view, try oo.mutableView)
            let keyLengths = problem.keyLengths.flatMap { $0.count == q.shape[0] ? $0 : nil }
            let count = try CallingConventionTests.steadyStateAllocations {
                try attention.attend(query: qv, key: kv, value: vv, output: ov, logSumExp: nil,
                                     keyLengths: keyLengths, workspace: workspace, threads: 1)
            }
            let bound = CallingConventionTests.planAllocations[name] ?? 0
            #expect(count <= bound, "\(name) Nq \(shape.queryLength): \(count) allocations per mixed call")
        }
    }

    @Test("bad mixed views are thrown errors naming the problem")
    func badViews() throws {
        let buffer = [UInt16](repeating: 0, count: 40)
        let wrongPrecision = thrownAttentionError {
            try buffer.withUnsafeBufferPointer { try ActivationView(bitPatterns: $0, precision: .float32, shape: [1, 2, 5, 4]) }
        }
        #expect(wrongPrecision?.message.contains("float16 or bfloat16") == true)
        let short = thrownAttentionError {
            try buffer.withUnsafeBufferPointer { try ActivationView(bitPatterns: $0, precision: .float16, shape: [1, 2, 5, 5]) }
        }
        #expect(short?.message.contains("the buffer has 40 elements") == true)
        // A workspace sized for Float operands is too small for a fallback conformer's
        // widened copies (vanilla's): refused before any arithmetic, naming the precisions.
        let shape = AttentionShape(heads: 2, queryLength: 40, headDim: 8)
        let vanilla = VanillaAttention()
        let small = try AttentionWorkspace(for: vanilla, shape: shape, threads: 1)
        let q = MixedOperand(shape: [1, 2, 40, 8], precision: .float16, values: [Float](repeating: 0.5, count: 640))
        let o = MixedOperand(shape: [1, 2, 40, 8], precision: .float16)
        let error = thrownAttentionError {
            try vanilla.attend(query: q.view, key: q.view, value: q.view, output: o.mutableView, logSumExp: nil,
                               keyLengths: nil, workspace: small, threads: 1)
        }
        #expect(error?.message.contains("precisions float16") == true, "\(error?.message ?? "no error")")
        let aliasing = thrownAttentionError {
            let out = try MutableActivationView(bitPatterns: UnsafeMutableBufferPointer(
                start: q.storage.assumingMemoryBound(to: UInt16.self), count: q.count), precision: .float16,
                shape: [1, 2, 40, 8], strides: q.strides, offset: q.offset)
            try DenseAttention().attend(query: q.view, key: q.view, value: q.view, output: out, logSumExp: nil,
                                        keyLengths: nil, workspace: nil, threads: 1)
        }
        #expect(aliasing?.message.contains("output overlaps query") == true, "\(aliasing?.message ?? "no error")")
    }
}
