// The engine calling convention (issue 16): borrowed views, caller-owned outputs,
// reused workspaces. Every conformer through views equals its `Tensor` result bit for
// bit (strided outputs inside NaN-filled memory, with and without the log-sum-exp and a
// workspace); bad views and workspaces are thrown errors; steady-state calls allocate
// nothing.

import AttentionBenchCore
@_spi(Testing) @_spi(Benchmarking) import EfficientAttention
import Foundation
import Testing

/// Rows `range` of every batch item and head of `x` `[B, H, N, D]` as a tensor (a packed
/// sequence's rows, or a prefix of a decoded sequence).
func headRows(_ x: Tensor, _ range: Range<Int>) throws -> Tensor {
    let s = x.shape
    var data = [Float]()
    for b in 0..<s[0] { for h in 0..<s[1] { for i in range { for c in 0..<s[3] { data.append(x[b, h, i, c]) } } } }
    return try Tensor(shape: [s[0], s[1], range.count, s[3]], data: data)
}

/// A writable `[B, H, N, D]` view inside NaN-filled memory: rows `rowPad` floats apart
/// beyond their width, an offset of 5 floats, and elements `step` apart.
struct NaNPaddedOutput {
    var storage: [Float]
    let shape: SIMD4<Int>
    let strides: SIMD4<Int>
    let offset = 5

    init(shape: SIMD4<Int>, step: Int = 1, rowPad: Int = 3) {
        let row = (shape[3] - 1) * step + 1 + rowPad
        strides = [shape[1] * shape[2] * row + 7, shape[2] * row + 2, row, step]
        self.shape = shape
        storage = [Float](repeating: .nan, count: offset + shape[0] * strides[0] + 16)
    }

    /// Runs `body` with the writable view.
    mutating func withView<R>(_ body: (MutableStridedView) throws -> R) throws -> R {
        let (shape, strides, offset) = (self.shape, self.strides, self.offset)
        return try storage.withUnsafeMutableBufferPointer { buffer in
            try body(MutableStridedView(buffer, shape: shape, strides: strides, offset: offset))
        }
    }

    /// The addressed elements in row-major order.
    var elements: [Float] {
        var out = [Float]()
        for a in 0..<shape[0] { for b in 0..<shape[1] { for c in 0..<shape[2] { for d in 0..<shape[3] {
            out.append(storage[offset + a * strides[0] + b * strides[1] + c * strides[2] + d * strides[3]])
        } } } }
        return out
    }

    /// Whether every unaddressed element still holds NaN (nothing written outside the view).
    var gapsUntouched: Bool {
        var addressed = Set<Int>()
        for a in 0..<shape[0] { for b in 0..<shape[1] { for c in 0..<shape[2] { for d in 0..<shape[3] {
            addressed.insert(offset + a * strides[0] + b * strides[1] + c * strides[2] + d * strides[3])
        } } } }
        return storage.indices.allSatisfy { addressed.contains($0) || storage[$0].isNaN }
    }
}

@Suite("Calling convention: views, caller-owned outputs, workspaces")
struct CallingConventionTests {
    static let entries = InvarianceTests.entries

    @Test("views into caller-owned, NaN-padded outputs give the Tensor result bitwise", arguments: entries)
    func viewsEqualTensors(_ name: String) throws {
        let entry = Registry.standard.entry(named: name)!
        var ran = 0
        for p in InvarianceProblem.all {
            guard let (attention, q, k, v) = try InvarianceTests.instance(entry, p) else { continue }
            let keyLengths = p.keyLengths.flatMap { $0.count == q.shape[0] ? $0 : nil }
            let label = "\(name) \(p.testDescription)"
            let expected = try attention.attend(query: q, key: k, value: v, keyLengths: keyLengths, threads: 2)
            let shape = try AttentionShape(query: q, key: k, value: v)
            let workspace = try AttentionWorkspace(for: attention, shape: shape, threads: 2)
            for (useWorkspace, withLSE) in [(false, true), (true, true), (true, false), (false, false)] {
                var out = NaNPaddedOutput(shape: [shape.batch, shape.heads, shape.queryLength, shape.valueDim], step: 2)
                var lse = NaNPaddedOutput(shape: [shape.batch, shape.heads, shape.queryLength, 1])
                // Twice: a reused workspace and overwritten outputs give the same bits.
                for _ in 0..<2 {
                    try q.withStridedView { qv in try k.withStridedView { kv in try v.withStridedView { vv in
                    try out.withView { ov in try lse.withView { lv in
                        try attention.attend(query: qv, key: kv, value: vv, output: ov, logSumExp: withLSE ? lv : nil,
                                             keyLengths: keyLengths, workspace: useWorkspace ? workspace : nil,
                                             threads: 2)
                    } } } } }
                }
                let what = "\(label) workspace \(useWorkspace) lse \(withLSE)"
                let (o, e) = (out.elements, expected.output.elements)
                let outputEqual = bitwiseEqual(o, e), gapsUntouched = out.gapsUntouched
                #expect(outputEqual, "\(what): output differs at \(firstDifference(o, e))")
                #expect(gapsUntouched, "\(what): wrote outside the output view")
                if withLSE {
                    let (l, el) = (lse.elements, expected.logSumExp.elements)
                    let lseEqual = bitwiseEqual(l, el)
                    #expect(lseEqual, "\(what): lse differs at \(firstDifference(l, el))")
                } else {
                    let untouched = lse.elements.allSatisfy { $0.isNaN }
                    #expect(untouched, "\(what): wrote a log-sum-exp not asked for")
                }
            }
            ran += 1
        }
        #expect(ran >= 2, "\(name) ran on only \(ran) problems")
    }

    /// The allocations of the third of three calls. One thread: the whole call runs on the
    /// calling thread, whose allocations are counted exactly whatever other tests do. More:
    /// the calling thread's and the library's worker threads', fewest of three more calls
    /// (another test's parallel loop between them can only add to a count).
    static func steadyStateAllocations(threads: Int = 1, _ call: () throws -> Void) rethrows -> Int {
        try call()
        try call()
        guard threads > 1 else { return try AllocationCounter.countingOnThisThread(call).allocations }
        var fewest = Int.max
        for _ in 0..<3 { fewest = min(fewest, try AllocationCounter.countingOnThisThreadAndWorkers(call).allocations) }
        return fewest
    }

    /// Conformers that still build a plan of small arrays per call, with the most
    /// allocations a call of the test problem may make: a bound that catches allocations
    /// per tile or per row (KernelDocs/CallingConvention.md). None left: every conformer,
    /// ETC included (its masks' runs and partitions in a plan cache), allocates nothing.
    static let planAllocations: [String: Int] = [:]

    @Test("a steady-state call with a workspace allocates nothing (1 and 2 threads)",
          arguments: entries, [1, 2])
    func allocations(_ name: String, threads: Int) throws {
        guard AllocationCounter.isSupported else { return }
        let entry = Registry.standard.entry(named: name)!
        /// The steady-state allocations of `entry` on `p` (nil: it does not take `p`).
        func count(_ p: InvarianceProblem, withLSE: Bool) throws -> Int? {
            guard let (attention, q, k, v) = try InvarianceTests.instance(entry, p) else { return nil }
            let shape = try AttentionShape(query: q, key: k, value: v)
            let workspace = try AttentionWorkspace(for: attention, shape: shape, threads: threads)
            var out = NaNPaddedOutput(shape: [shape.batch, shape.heads, shape.queryLength, shape.valueDim])
            var lse = NaNPaddedOutput(shape: [shape.batch, shape.heads, shape.queryLength, 1])
            let keyLengths: [Int]? = p.keyLengths.flatMap { $0.count == q.shape[0] ? $0 : nil }
            return try q.withStridedView { qv in try k.withStridedView { kv in try v.withStridedView { vv in
            try out.withView { ov in try lse.withView { lv in
                try CallingConventionTests.steadyStateAllocations(threads: threads) {
                    try attention.attend(query: qv, key: kv, value: vv, output: ov, logSumExp: withLSE ? lv : nil,
                                         keyLengths: keyLengths, workspace: workspace, threads: threads)
                }
            } } } } }
        }
        var p = InvarianceProblem.all[2]
        if try count(p, withLSE: true) == nil { p = InvarianceProblem.all[0] }
        let bound = CallingConventionTests.planAllocations[name] ?? 0
        // Non-causal (grouped heads, key padding) and causal (D = 65).
        for problem in [p, InvarianceProblem.all[1]] {
            for withLSE in [true, false] {
                guard let fewest = try count(problem, withLSE: withLSE) else { continue }
                #expect(fewest <= bound, "\(name) (causal \(problem.causal), log-sum-exp \(withLSE), \(threads) threads): \(fewest) allocations per call, at most \(bound) expected")
                if let longer = try count(problem.threeTimesLonger, withLSE: withLSE) {
                    #expect(longer == fewest, "\(name) (causal \(problem.causal), log-sum-exp \(withLSE)): \(fewest) allocations at N = \(problem.queryLength), \(longer) at \(3 * problem.queryLength)")
                }
            }
        }
    }

    /// The backward of every conformer that has one, called engine style (views, the
    /// forward's output and log-sum-exp, caller-owned gradients, one workspace sized by
    /// `backwardCost`), allocates nothing in steady state either, causal and not, at any
    /// length (KernelDocs/CallingConvention.md, "Backward").
    @Test("a steady-state backward call with a workspace allocates nothing (1 and 2 threads)",
          arguments: entries, [1, 2])
    func backwardAllocations(_ name: String, threads: Int) throws {
        guard AllocationCounter.isSupported else { return }
        let entry = Registry.standard.entry(named: name)!
        /// The steady-state allocations of `entry`'s backward on `p` (nil: no backward for `p`).
        func count(_ p: InvarianceProblem) throws -> Int? {
            guard let (attention, q, k, v) = try InvarianceTests.instance(entry, p),
                  let attention = attention as? any DifferentiableAttention else { return nil }
            let shape = try AttentionShape(query: q, key: k, value: v)
            let keyLengths: [Int]? = p.keyLengths.flatMap { $0.count == q.shape[0] ? $0 : nil }
            let result = try attention.attend(query: q, key: k, value: v, keyLengths: keyLengths, threads: threads)
            let dO = try randomTensor(result.output.shape, seed: 11)
            // A configuration without a backward (ETC's relative table, for now) says so here.
            guard let cost = try? attention.backwardCost(shape, threads: threads) else { return nil }
            let workspace = try AttentionWorkspace(byteCount: cost.workspaceBytes)
            var (dQ, dK, dV) = (try Tensor(shape: q.shape), try Tensor(shape: k.shape), try Tensor(shape: v.shape))
            return try q.withStridedView { qv in try k.withStridedView { kv in try v.withStridedView { vv in
            try result.output.withStridedView { ov in try result.logSumExp.withStridedView { lv in
            try dO.withStridedView { gv in
            try dQ.withMutableStridedView { dq in try dK.withMutableStridedView { dk in try dV.withMutableStridedView { dv in
                try CallingConventionTests.steadyStateAllocations(threads: threads) {
                    try attention.gradients(query: qv, key: kv, value: vv, output: ov, logSumExp: lv, outputGradient: gv,
                                            dQuery: dq, dKey: dk, dValue: dv, keyLengths: keyLengths,
                                            workspace: workspace, threads: threads)
                }
            } } } } } } } } }
        }
        for p in [InvarianceProblem.all[2], InvarianceProblem.all[1]] {
            guard let fewest = try count(p) else { continue }
            #expect(fewest == 0, "\(name) backward (causal \(p.causal), \(threads) threads): \(fewest) allocations per call")
            if let longer = try count(p.threeTimesLonger) {
                #expect(longer == fewest, "\(name) backward (causal \(p.causal)): \(fewest) allocations at N = \(p.queryLength), \(longer) at \(3 * p.queryLength)")
            }
        }
    }
}

extension InvarianceProblem {
    /// The same problem with three times the positions (and key lengths): an allocation per
    /// tile or per row would change the count.
    var threeTimesLonger: InvarianceProblem {
        var long = self
        long.queryLength *= 3
        long.keyLength *= 3
        long.keyLengths = keyLengths?.map { $0 * 3 }
        return long
    }
}

extension CallingConventionTests {
    /// Decode-shaped calls (fewer queries than the tiled kernel's lanes) run on the decode
    /// kernel; they too allocate nothing with a workspace, at any cache length.
    @Test("a decode-shaped call with a workspace allocates nothing (one thread)",
          arguments: [(1, 1, 1), (3, 4, 2), (1, 8, 1)])
    func decodeAllocations(queries: Int, heads: Int, kvHeads: Int) throws {
        guard AllocationCounter.isSupported else { return }
        let conformers: [any Attention] = [DenseAttention(), DenseAttention(causal: true),
                                           MultiQueryAttention(causal: true), MultiQueryAttention(leftWindow: 40)]
        for attention in conformers where heads == kvHeads || attention is MultiQueryAttention {
            var counts: [Int] = []
            for keys in [300, 900] {
                let (q, k, v) = try randomQKV(heads: heads, kvHeads: kvHeads, queryLength: queries, keyLength: keys,
                                              headDim: 16, seed: 5)
                let shape = try AttentionShape(query: q, key: k, value: v)
                let workspace = try AttentionWorkspace(for: attention, shape: shape, threads: 1)
                var out = NaNPaddedOutput(shape: [1, heads, queries, 16])
                counts.append(try q.withStridedView { qv in try k.withStridedView { kv in try v.withStridedView { vv in
                    try out.withView { ov in
                        try CallingConventionTests.steadyStateAllocations {
                            try attention.attend(query: qv, key: kv, value: vv, output: ov, logSumExp: nil,
                                                 keyLengths: nil, workspace: workspace, threads: 1)
                        }
                    } } } })
            }
            #expect(counts == [0, 0], "\(attention.name) Nq = \(queries), H = \(heads)/\(kvHeads): allocations \(counts) at Nk = 300, 900")
        }
    }
}

@Suite("Calling convention: bad views and workspaces are thrown errors")
struct BadViewTests {
    let shape = AttentionShape(batch: 1, heads: 2, queryLength: 5, headDim: 4)
    let dense = DenseAttention()

    /// Runs dense attention on views of one buffer per operand; `output` and `lse` may be
    /// replaced by views the test builds over the inputs.
    func call(output makeOutput: ((UnsafeMutableBufferPointer<Float>) throws -> MutableStridedView)? = nil,
              workspace: AttentionWorkspace? = nil) throws {
        var q = [Float](repeating: 0.5, count: 40), k = q, v = q, o = q, l = [Float](repeating: 0, count: 10)
        try q.withUnsafeMutableBufferPointer { qb in try k.withUnsafeBufferPointer { kb in
        try v.withUnsafeBufferPointer { vb in try o.withUnsafeMutableBufferPointer { ob in
        try l.withUnsafeMutableBufferPointer { lb in
            let query = try StridedView(UnsafeBufferPointer(qb), shape: [1, 2, 5, 4])
            let output = try makeOutput?(qb) ?? MutableStridedView(ob, shape: [1, 2, 5, 4])
            try dense.attend(query: query, key: StridedView(kb, shape: [1, 2, 5, 4]),
                             value: StridedView(vb, shape: [1, 2, 5, 4]), output: output,
                             logSumExp: MutableStridedView(lb, shape: [1, 2, 5, 1]),
                             keyLengths: nil, workspace: workspace, threads: 1)
        } } } } }
    }

    func message(_ body: () throws -> Void) -> String {
        do { try body() } catch let error as AttentionError { return error.message } catch { return "\(error)" }
        return "no error"
    }

    @Test("a buffer too short for the view names the dimension")
    func tooShort() {
        let text = message {
            var buffer = [Float](repeating: 0, count: 39)
            _ = try buffer.withUnsafeMutableBufferPointer { try MutableStridedView($0, shape: [1, 2, 5, 4]) }
        }
        #expect(text.contains("the buffer has 39 elements") && text.contains("dimension"), "\(text)")
        let offset = message {
            let buffer = [Float](repeating: 0, count: 40)
            _ = try buffer.withUnsafeBufferPointer { try StridedView($0, shape: [1, 2, 5, 4], offset: 1) }
        }
        #expect(offset.contains("reaches element 40"), "\(offset)")
    }

    @Test("negative and overlapping writable strides are refused")
    func badStrides() {
        let negative = message {
            var buffer = [Float](repeating: 0, count: 40)
            _ = try buffer.withUnsafeMutableBufferPointer {
                try MutableStridedView($0, shape: [1, 2, 5, 4], strides: [40, 20, -4, 1], offset: 20)
            }
        }
        #expect(negative.contains("stride of N (dimension 2) is negative"), "\(negative)")
        let overlapping = message {
            var buffer = [Float](repeating: 0, count: 40)
            _ = try buffer.withUnsafeMutableBufferPointer {
                try MutableStridedView($0, shape: [1, 2, 5, 4], strides: [40, 20, 2, 1])
            }
        }
        #expect(overlapping.contains("overlap") && overlapping.contains("dimension 2"), "\(overlapping)")
        // A read-only view may overlap itself (a broadcast row).
        let broadcast = message {
            let buffer = [Float](repeating: 0, count: 4)
            _ = try buffer.withUnsafeBufferPointer { try StridedView($0, shape: [1, 2, 5, 4], strides: [0, 0, 0, 1]) }
        }
        #expect(broadcast == "no error", "\(broadcast)")
    }

    @Test("an output aliasing an input, or of the wrong shape, is refused before any write")
    func aliasing() {
        let aliased = message { try call(output: { try MutableStridedView($0, shape: [1, 2, 5, 4]) }) }
        #expect(aliased.contains("output overlaps query"), "\(aliased)")
        let wrongShape = message {
            try call(output: { _ in
                let scratch = UnsafeMutableBufferPointer<Float>.allocate(capacity: 40)
                return try MutableStridedView(scratch, shape: [1, 2, 4, 5])
            })
        }
        #expect(wrongShape.contains("dimension 2 (Nq) is 4, expected 5"), "\(wrongShape)")
    }

    @Test("a workspace too small for the problem names workspace")
    func smallWorkspace() throws {
        let needed = try dense.cost(shape, threads: 1).workspaceBytes
        let small = try AttentionWorkspace(byteCount: needed - 1)
        let text = message { try call(workspace: small) }
        #expect(text.contains("workspace has \(needed - 1) bytes"), "\(text)")
        #expect(message { try call(workspace: AttentionWorkspace(byteCount: needed)) } == "no error")
        #expect(message { _ = try AttentionWorkspace(byteCount: -1) }.contains("byteCount"))
    }
}

@Suite("Packed variable-length batches")
struct PackedSequenceTests {
    func rows(_ x: Tensor, _ range: Range<Int>) throws -> Tensor { try headRows(x, range) }

    /// The packed call equals separate calls per sequence, bit for bit.
    func check(_ attention: some Attention, queryOffsets: [Int], keyOffsets: [Int], heads: Int = 4, kvHeads: Int = 2,
               headDim: Int = 16, valueDim: Int = 8, _ label: String) throws {
        let sequences = try PackedSequences(queryOffsets: queryOffsets, keyOffsets: keyOffsets)
        let (q, k, v) = try randomQKV(heads: heads, kvHeads: kvHeads, queryLength: queryOffsets.last!,
                                      keyLength: keyOffsets.last!, headDim: headDim, valueDim: valueDim, seed: 81)
        let packed = try attention.attend(query: q, key: k, value: v, sequences: sequences, threads: 2)
        for s in 0..<sequences.count {
            let qr = queryOffsets[s]..<queryOffsets[s + 1], kr = keyOffsets[s]..<keyOffsets[s + 1]
            guard !qr.isEmpty else { continue }
            let out = try rows(packed.output, qr), lse = try rows(packed.logSumExp, qr)
            if kr.isEmpty {
                #expect(out.elements.allSatisfy { $0 == 0 } && lse.elements.allSatisfy { $0 == -.infinity },
                        "\(label) sequence \(s) without keys")
                continue
            }
            let alone = try attention.attend(query: rows(q, qr), key: rows(k, kr), value: rows(v, kr), threads: 1)
            expectBitwiseEqual(try AttentionResult(output: out, logSumExp: lse), alone, "\(label) sequence \(s)")
        }
        // The cost follows the sequences, not the padded size.
        let cost = try attention.cost(sequences: sequences, heads: heads, kvHeads: kvHeads, headDim: headDim,
                                      valueDim: valueDim)
        var pairs = 0
        for s in 0..<sequences.count where queryOffsets[s + 1] > queryOffsets[s] && keyOffsets[s + 1] > keyOffsets[s] {
            pairs += try attention.cost(sequences.shapeForTesting(s, heads: heads, kvHeads: kvHeads, headDim: headDim,
                                                                  valueDim: valueDim)).scoredPairs
        }
        #expect(cost.scoredPairs == pairs, "\(label): cost pairs \(cost.scoredPairs), expected \(pairs)")
    }

    @Test("a packed batch equals separate calls (lengths 0 and 1, causal, windows, grouped heads)")
    func separateCalls() throws {
        let lengths = [0, 1, 17, 64, 0, 130, 3]
        var offsets = [0]
        for n in lengths { offsets.append(offsets.last! + n) }
        for causal in [false, true] {
            try check(DenseAttention(causal: causal), queryOffsets: offsets, keyOffsets: offsets, "dense causal \(causal)")
            try check(LocalAttention(form: .slidingWindow(left: 8, right: causal ? 0 : 5), causal: causal),
                      queryOffsets: offsets, keyOffsets: offsets, "local causal \(causal)")
            try check(MultiQueryAttention(causal: causal, leftWindow: 20), queryOffsets: offsets, keyOffsets: offsets,
                      "multi-query causal \(causal)")
            try check(LinearAttention(featureMap: EluPlusOneFeatures(), causal: causal), queryOffsets: offsets,
                      keyOffsets: offsets, "linear-elu causal \(causal)")
        }
        // Cross attention: queries and keys of different lengths, a sequence without keys.
        try check(DenseAttention(causal: true), queryOffsets: [0, 5, 5, 40, 41], keyOffsets: [0, 70, 75, 75, 200],
                  "dense cross")
    }

    /// The packed call in 16-bit precisions equals separate 16-bit calls per sequence bit
    /// for bit (its outputs rounded once), and with a workspace sized for the packed
    /// sequences and precisions it allocates nothing in steady state.
    func checkMixed(_ attention: some Attention, precisions p: OperandPrecisions, lengths: [Int], step: Int,
                    threads: Int, _ label: String) throws {
        let sequences = try PackedSequences(lengths: lengths)
        let n = lengths.reduce(0, +), heads = 4, kvHeads = 2
        let (q, k, v) = try randomQKV(heads: heads, kvHeads: kvHeads, queryLength: n, keyLength: n, headDim: 16,
                                      valueDim: 8, seed: 82)
        func operand(_ t: Tensor, _ precision: ActivationPrecision) -> MixedOperand {
            MixedOperand(shape: SIMD4(t.shape), precision: precision, step: step,
                         values: t.elements.map { rounded($0, precision) })
        }
        let (qo, ko, vo) = (operand(q, p.query), operand(k, p.key), operand(v, p.value))
        let oo = MixedOperand(shape: SIMD4(1, heads, n, 8), precision: p.output, step: step)
        var lse = NaNPaddedOutput(shape: [1, heads, n, 1])
        let workspace = try AttentionWorkspace(for: attention, sequences: sequences, heads: heads, kvHeads: kvHeads,
                                               headDim: 16, valueDim: 8, threads: threads, precisions: p)
        let (qv, kv, vv, ov) = (try qo.view, try ko.view, try vo.view, try oo.mutableView)
        try lse.withView { lv in
            try attention.attend(query: qv, key: kv, value: vv, output: ov, logSumExp: lv, sequences: sequences,
                                 workspace: workspace, threads: threads)
        }
        #expect(oo.gapsUntouched, "\(label): wrote outside the output view")
        let packedBits = oo.elementBits, packedLSE = lse.elements
        /// Element `c` of row `i`, head `h` in a row-major `[1, H, rows, width]` listing.
        func index(_ h: Int, _ i: Int, _ c: Int, rows: Int, width: Int) -> Int { (h * rows + i) * width + c }
        for s in 0..<sequences.count where lengths[s] > 0 {
            let r = sequences.queryOffsets[s]..<sequences.queryOffsets[s + 1]
            let (qs, ks, vs) = (operand(try rows(q, r), p.query), operand(try rows(k, r), p.key),
                                operand(try rows(v, r), p.value))
            let os = MixedOperand(shape: SIMD4(1, heads, r.count, 8), precision: p.output)
            var ls = NaNPaddedOutput(shape: [1, heads, r.count, 1])
            let (qsv, ksv, vsv, osv) = (try qs.view, try ks.view, try vs.view, try os.mutableView)
            try ls.withView { lv in
                try attention.attend(query: qsv, key: ksv, value: vsv, output: osv, logSumExp: lv, keyLengths: nil,
                                     workspace: nil, threads: 1)
            }
            let alone = os.elementBits, aloneLSE = ls.elements
            var mismatches = 0
            for h in 0..<heads {
                for i in 0..<r.count {
                    for c in 0..<8 where packedBits[index(h, r.lowerBound + i, c, rows: n, width: 8)]
                        != alone[index(h, i, c, rows: r.count, width: 8)] { mismatches += 1 }
                    if packedLSE[h * n + r.lowerBound + i].bitPattern != aloneLSE[h * r.count + i].bitPattern {
                        mismatches += 1
                    }
                }
            }
            #expect(mismatches == 0, "\(label) sequence \(s): \(mismatches) elements differ from the separate call")
        }
        if AllocationCounter.isSupported {
            let allocations = try lse.withView { lv in
                try CallingConventionTests.steadyStateAllocations(threads: threads) {
                    try attention.attend(query: qv, key: kv, value: vv, output: ov, logSumExp: lv,
                                         sequences: sequences, workspace: workspace, threads: threads)
                }
            }
            #expect(allocations == 0, "\(label): \(allocations) allocations per packed call")
        }
    }

    @Test("a packed batch in Float16 and BFloat16 equals separate 16-bit calls, and allocates nothing with a workspace")
    func mixedPrecision() throws {
        let lengths = [0, 1, 17, 64, 0, 130, 3]
        let mixes = [OperandPrecisions(.float16), OperandPrecisions(.bfloat16),
                     OperandPrecisions(query: .bfloat16, key: .float16, value: .float32, output: .float16)]
        for (m, p) in mixes.enumerated() {
            let step = m % 2 + 1, threads = m % 2 + 1
            for causal in [false, true] {
                try checkMixed(DenseAttention(causal: causal), precisions: p, lengths: lengths, step: step,
                               threads: threads, "dense causal \(causal) \(p)")
                try checkMixed(LocalAttention(form: .slidingWindow(left: 8, right: causal ? 0 : 5), causal: causal),
                               precisions: p, lengths: lengths, step: step, threads: threads, "local causal \(causal) \(p)")
                try checkMixed(MultiQueryAttention(causal: causal, leftWindow: 20), precisions: p, lengths: lengths,
                               step: step, threads: threads, "multi-query causal \(causal) \(p)")
                // A conformer that widens into Float scratch (not on the tiled kernel).
                try checkMixed(LinearAttention(featureMap: EluPlusOneFeatures(), causal: causal), precisions: p,
                               lengths: lengths, step: step, threads: threads, "linear-elu causal \(causal) \(p)")
            }
        }
    }

    @Test("bad offsets and mismatched views are thrown errors naming them")
    func badOffsets() throws {
        #expect(throws: AttentionError.self) { _ = try PackedSequences(queryOffsets: [1, 3], keyOffsets: [0, 3]) }
        #expect(throws: AttentionError.self) { _ = try PackedSequences(queryOffsets: [0, 3, 2], keyOffsets: [0, 1, 2]) }
        #expect(throws: AttentionError.self) { _ = try PackedSequences(queryOffsets: [0, 3], keyOffsets: [0, 1, 2]) }
        #expect(throws: AttentionError.self) { _ = try PackedSequences(lengths: [3, -1]) }
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 10, headDim: 4, seed: 3)
        let sequences = try PackedSequences(lengths: [4, 5])   // 9 rows, the tensors have 10
        do {
            _ = try DenseAttention().attend(query: q, key: k, value: v, sequences: sequences)
            Issue.record("a packed length that differs from the offsets was accepted")
        } catch let error as AttentionError {
            #expect(error.message.contains("last offsets"), "\(error.message)")
        }
        // A sequence the conformer cannot take (Linformer: longer than its maxSequenceLength) names the sequence.
        let linformer = try LinformerAttention(projectedLength: 4, maxSequenceLength: 6, seed: 1)
        do {
            _ = try linformer.attend(query: q, key: k, value: v, sequences: try PackedSequences(lengths: [3, 7]))
            Issue.record("a sequence longer than Linformer's maxSequenceLength was accepted")
        } catch let error as AttentionError {
            #expect(error.message.contains("sequence 1"), "\(error.message)")
        }
    }
}

@Suite("One decoding protocol: the KV cache and the recurrent state alike")
struct DecodingProtocolTests {
    func rows(_ x: Tensor, _ range: Range<Int>) throws -> Tensor { try headRows(x, range) }

    /// Prefill then steps of `steps` positions through the protocol, the same code for any
    /// conformer, against the conformer's causal attention over the whole sequence.
    func decodeInSteps<A: DecodingAttention>(_ attention: A, steps: [Int], tolerance: Float, _ label: String) throws {
        let n = steps.reduce(0, +)
        let (q, k, v) = try randomQKV(batch: 2, heads: 4, kvHeads: 2, queryLength: n, headDim: 16, valueDim: 8, seed: 91)
        var state = try attention.makeDecodingState(batch: 2, heads: 4, kvHeads: 2, headDim: 16, valueDim: 8,
                                                    capacity: n)
        let whole = try attention.attend(query: q, key: k, value: v, keyLengths: nil, threads: 1)
        var start = 0
        for (t, count) in steps.enumerated() {
            let range = start..<(start + count)
            let step = try attention.attendNext(query: rows(q, range), key: rows(k, range), value: rows(v, range),
                                                state: &state, threads: t % 2 + 1)
            let expected = try AttentionResult(output: rows(whole.output, range), logSumExp: rows(whole.logSumExp, range))
            expectClose(step, expected, tolerance: tolerance, "\(label) step \(t) positions \(range)")
            start += count
        }
        // A step that does not fit the state throws.
        #expect(throws: AttentionError.self, "\(label): a step of the wrong head dimension") {
            let (q2, k2, v2) = try randomQKV(batch: 2, heads: 4, kvHeads: 2, queryLength: 1, headDim: 8, seed: 5)
            _ = try attention.attendNext(query: q2, key: k2, value: v2, state: &state, threads: 1)
        }
    }

    @Test("prefill and steps equal causal attention over the whole sequence")
    func steps() throws {
        try decodeInSteps(MultiQueryAttention(causal: true), steps: [5, 1, 1, 3, 1], tolerance: 2e-5, "multi-query")
        try decodeInSteps(LinearAttention(featureMap: EluPlusOneFeatures(), causal: true), steps: [5, 1, 1, 3, 1],
                          tolerance: 2e-5, "linear-elu")
    }

    @Test("a multi-query step past the cache's capacity throws and leaves the cache unchanged")
    func capacity() throws {
        let attention = MultiQueryAttention(causal: true)
        var cache = try attention.makeDecodingState(batch: 1, heads: 2, kvHeads: 1, headDim: 4, valueDim: 4, capacity: 3)
        let (q, k, v) = try randomQKV(heads: 2, kvHeads: 1, queryLength: 2, headDim: 4, seed: 9)
        _ = try attention.attendNext(query: q, key: k, value: v, state: &cache, threads: 1)
        #expect(throws: AttentionError.self) { _ = try attention.attendNext(query: q, key: k, value: v, state: &cache, threads: 1) }
        #expect(try cache.length(layer: 0) == 2)
    }
}

@Suite("Gradients through views")
struct GradientViewTests {
    @Test("gradients into caller-owned NaN-padded views, with a workspace, equal the Tensor result bitwise")
    func viewsEqualTensors() throws {
        for causal in [false, true] {
            let attention = DenseAttention(causal: causal)
            let (q, k, v) = try randomQKV(batch: 2, heads: 4, kvHeads: 2, queryLength: 70, keyLength: 90, headDim: 17,
                                          valueDim: 9, seed: 77)
            let keyLengths = [90, 41]
            let forward = try attention.attend(query: q, key: k, value: v, keyLengths: keyLengths, threads: 2)
            let dO = try randomTensor(forward.output.shape, seed: 78)
            let expected = try attention.gradients(query: q, key: k, value: v, result: forward, outputGradient: dO,
                                                   keyLengths: keyLengths, threads: 2)
            let shape = try AttentionShape(query: q, key: k, value: v)
            let workspace = try AttentionWorkspace(byteCount: attention.backwardCost(shape, threads: 3).workspaceBytes)
            var dq = NaNPaddedOutput(shape: SIMD4(q.shape), step: 2)
            var dk = NaNPaddedOutput(shape: SIMD4(k.shape))
            var dv = NaNPaddedOutput(shape: SIMD4(v.shape), step: 3)
            for _ in 0..<2 {   // a reused workspace and overwritten gradients give the same bits
                try q.withStridedView { qv in try k.withStridedView { kv in try v.withStridedView { vv in
                try forward.output.withStridedView { o in try forward.logSumExp.withStridedView { l in
                try dO.withStridedView { g in
                try dq.withView { dQ in try dk.withView { dK in try dv.withView { dV in
                    try attention.gradients(query: qv, key: kv, value: vv, output: o, logSumExp: l, outputGradient: g,
                                            dQuery: dQ, dKey: dK, dValue: dV, keyLengths: keyLengths,
                                            workspace: workspace, threads: 3)
                } } } } } } } } }
            }
            for (name, got, want, padded) in [("dQuery", dq.elements, expected.dQuery.elements, dq),
                                              ("dKey", dk.elements, expected.dKey.elements, dk),
                                              ("dValue", dv.elements, expected.dValue.elements, dv)] {
                let equal = bitwiseEqual(got, want), untouched = padded.gapsUntouched
                #expect(equal, "causal \(causal) \(name): differs at \(firstDifference(got, want))")
                #expect(untouched, "causal \(causal) \(name): wrote outside its view")
            }
        }
    }

    @Test("a gradient aliasing an input, or a workspace too small, is refused")
    func badViews() throws {
        let attention = DenseAttention()
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 8, headDim: 4, seed: 3)
        let forward = try attention.attend(query: q, key: k, value: v)
        var dq = NaNPaddedOutput(shape: SIMD4(q.shape)), dk = NaNPaddedOutput(shape: SIMD4(k.shape))
        var qCopy = q
        func call(dQueryOverQuery: Bool, workspace: AttentionWorkspace?) throws {
            try qCopy.withMutableStridedView { qm in
            try k.withStridedView { kv in try v.withStridedView { vv in
            try forward.output.withStridedView { o in try forward.logSumExp.withStridedView { l in
            try dq.withView { dQ in try dk.withView { dK in
                var dvStorage = [Float](repeating: 0, count: v.count)
                try dvStorage.withUnsafeMutableBufferPointer { dvb in
                    try attention.gradients(query: qm.readOnly, key: kv, value: vv, output: o, logSumExp: l,
                                            outputGradient: o, dQuery: dQueryOverQuery ? qm : dQ, dKey: dK,
                                            dValue: MutableStridedView(dvb, shape: SIMD4(v.shape)),
                                            keyLengths: nil, workspace: workspace, threads: 1)
                }
            } } } } } } }
        }
        do {
            try call(dQueryOverQuery: true, workspace: nil)
            Issue.record("dQuery over query was accepted")
        } catch let error as AttentionError {
            #expect(error.message.contains("dQuery overlaps query"), "\(error.message)")
        }
        do {
            try call(dQueryOverQuery: false, workspace: AttentionWorkspace(byteCount: 64))
            Issue.record("a 64-byte workspace was accepted")
        } catch let error as AttentionError {
            #expect(error.message.contains("workspace has 64 bytes"), "\(error.message)")
        }
        try call(dQueryOverQuery: false, workspace: nil)
    }
}

@Suite("Plan caches")
struct PlanCacheTests {
    /// BigBird keeps its last pattern; a copy with another setting (sharing the cache) must
    /// not get the old one, and the original must get its own back afterwards.
    @Test("a copy of BigBird with another seed or shape does not reuse the cached pattern")
    func bigBirdCopies() throws {
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 96, headDim: 8, seed: 31)
        let first = BigBirdAttention(blockSize: 8, randomBlockCount: 2, seed: 1)
        var second = first
        second.seed = 2
        let fresh1 = try BigBirdAttention(blockSize: 8, randomBlockCount: 2, seed: 1).attend(query: q, key: k, value: v)
        let fresh2 = try BigBirdAttention(blockSize: 8, randomBlockCount: 2, seed: 2).attend(query: q, key: k, value: v)
        #expect(!bitwiseEqual(fresh1.output.elements, fresh2.output.elements), "the seeds should give other blocks")
        for _ in 0..<2 {
            expectBitwiseEqual(try first.attend(query: q, key: k, value: v), fresh1, "seed 1 after seed 2")
            expectBitwiseEqual(try second.attend(query: q, key: k, value: v), fresh2, "seed 2 after seed 1")
        }
        let (q2, k2, v2) = try randomQKV(heads: 2, queryLength: 64, headDim: 8, seed: 32)
        expectBitwiseEqual(try first.attend(query: q2, key: k2, value: v2),
                           try BigBirdAttention(blockSize: 8, randomBlockCount: 2, seed: 1).attend(query: q2, key: k2, value: v2),
                           "another length")
        let shape = AttentionShape(heads: 2, queryLength: 64, headDim: 8)
        #expect(try first.pattern(for: shape).randomBlocks
                == BigBirdAttention(blockSize: 8, randomBlockCount: 2, seed: 1).pattern(for: shape).randomBlocks)
    }

    /// ETC keeps its last plan (pattern, runs, partitions); a copy with another setting
    /// (sharing the cache) or another length must build its own, and the original must get
    /// its own back afterwards.
    @Test("a copy of ETC with other settings or another length does not reuse the cached plan")
    func etcCopies() throws {
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 90, headDim: 8, seed: 33)
        let settings: [(globals: Int, radius: Int, causal: Bool, segments: ETCSegments?)] = [
            (5, 4, false, nil), (7, 4, false, nil), (5, 9, false, nil), (5, 4, true, nil),
            (5, 4, false, ETCSegments(count: 2, global: [0, 1, 0, 1, 1],
                                      long: Array(repeating: 0, count: 40) + Array(repeating: 1, count: 45))),
        ]
        func configured(_ s: (globals: Int, radius: Int, causal: Bool, segments: ETCSegments?)) -> ETCAttention {
            ETCAttention(globals: s.globals, radius: s.radius, segments: s.segments, causal: s.causal)
        }
        let fresh = try settings.map { try configured($0).attend(query: q, key: k, value: v, threads: 1) }
        var shared = configured(settings[0])
        for round in 0..<2 {
            for (n, s) in settings.enumerated() {
                shared.globals = s.globals
                shared.radius = s.radius
                shared.causal = s.causal
                shared.segments = s.segments
                expectBitwiseEqual(try shared.attend(query: q, key: k, value: v, threads: 1), fresh[n],
                                   "setting \(n), round \(round)")
            }
        }
        // A relative table with another κ (another row count of zero biases).
        for kappa in [1, 3, 1] {
            let withTable = try ETCAttention(heads: 2, headDim: 8, globals: 5, radius: 4, maxDistance: kappa, seed: 9)
            let expected = try withTable.attend(query: q, key: k, value: v, threads: 1)
            shared.relativePositions = withTable.relativePositions
            shared.globals = 5; shared.radius = 4; shared.causal = false; shared.segments = nil
            expectBitwiseEqual(try shared.attend(query: q, key: k, value: v, threads: 1), expected, "κ = \(kappa)")
        }
        shared.relativePositions = nil
        let (q2, k2, v2) = try randomQKV(heads: 2, queryLength: 50, headDim: 8, seed: 34)
        expectBitwiseEqual(try shared.attend(query: q2, key: k2, value: v2, threads: 1),
                           try configured(settings[0]).attend(query: q2, key: k2, value: v2, threads: 1),
                           "another length")
        #expect(try shared.pattern(for: AttentionShape(heads: 2, queryLength: 50, headDim: 8)).queryLength == 50)
    }
}
