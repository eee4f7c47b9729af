// The engine calling convention (issue 16): borrowed views, caller-owned outputs,
// reused workspaces. Every conformer through views equals its `Tensor` result bit for
// bit (strided outputs inside NaN-filled memory, with and without the log-sum-exp and a
// workspace); bad views and workspaces are thrown errors; steady-state calls allocate
// nothing.

import AttentionBenchCore
@_spi(Testing) @_spi(Benchmarking) import EfficientAttention
import Foundation
import Testing

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

    /// The allocations of the third of three calls (one thread: the whole call runs on the
    /// calling thread, whose allocations are counted exactly whatever other tests do).
    static func steadyStateAllocations(_ call: () throws -> Void) rethrows -> Int {
        try call()
        try call()
        return try AllocationCounter.countingOnThisThread(call).allocations
    }

    /// Conformers that still build a plan of small arrays per call (BigBird's random
    /// blocks, Longformer's and ETC's global runs, strided and axial masks under key padding,
    /// LSH's bucket plan), with the most allocations a call of the test problem may make:
    /// a bound that catches allocations per tile or per row (KernelDocs/CallingConvention.md).
    static let planAllocations = ["strided": 16, "longformer": 48, "bigbird": 400, "lsh": 24, "axial": 16, "etc": 64]

    @Test("a steady-state call with a workspace allocates nothing (one thread)", arguments: entries)
    func allocations(_ name: String) throws {
        guard AllocationCounter.isSupported else { return }
        let entry = Registry.standard.entry(named: name)!
        let p = InvarianceProblem.all[2]
        guard let (attention, q, k, v) = try InvarianceTests.instance(entry, p)
                ?? InvarianceTests.instance(entry, InvarianceProblem.all[0]) else { return }
        let shape = try AttentionShape(query: q, key: k, value: v)
        let workspace = try AttentionWorkspace(for: attention, shape: shape, threads: 1)
        var out = NaNPaddedOutput(shape: [shape.batch, shape.heads, shape.queryLength, shape.valueDim])
        var lse = NaNPaddedOutput(shape: [shape.batch, shape.heads, shape.queryLength, 1])
        let keyLengths: [Int]? = p.keyLengths.flatMap { $0.count == q.shape[0] ? $0 : nil }
        for withLSE in [true, false] {
            let fewest = try q.withStridedView { qv in try k.withStridedView { kv in try v.withStridedView { vv in
            try out.withView { ov in try lse.withView { lv in
                try CallingConventionTests.steadyStateAllocations {
                    try attention.attend(query: qv, key: kv, value: vv, output: ov, logSumExp: withLSE ? lv : nil,
                                         keyLengths: keyLengths, workspace: workspace, threads: 1)
                }
            } } } } }
            let bound = CallingConventionTests.planAllocations[name] ?? 0
            #expect(fewest <= bound, "\(name) (log-sum-exp \(withLSE)): \(fewest) allocations per call, at most \(bound) expected")
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
