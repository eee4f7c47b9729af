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

    @Test("allocations per steady-state call with a workspace", arguments: entries)
    func allocations(_ name: String) throws {
        let entry = Registry.standard.entry(named: name)!
        let p = InvarianceProblem.all[2]
        guard let (attention, q, k, v) = try InvarianceTests.instance(entry, p)
                ?? InvarianceTests.instance(entry, InvarianceProblem.all[0]) else { return }
        let shape = try AttentionShape(query: q, key: k, value: v)
        let workspace = try AttentionWorkspace(for: attention, shape: shape, threads: 2)
        var out = NaNPaddedOutput(shape: [shape.batch, shape.heads, shape.queryLength, shape.valueDim])
        var lse = NaNPaddedOutput(shape: [shape.batch, shape.heads, shape.queryLength, 1])
        let keyLengths: [Int]? = p.keyLengths.flatMap { $0.count == q.shape[0] ? $0 : nil }
        var counts = [Int]()
        try q.withStridedView { qv in try k.withStridedView { kv in try v.withStridedView { vv in
        try out.withView { ov in try lse.withView { lv in
            for _ in 0..<4 {
                let (_, allocations) = try AllocationCounter.counting {
                    try attention.attend(query: qv, key: kv, value: vv, output: ov, logSumExp: lv,
                                         keyLengths: keyLengths, workspace: workspace, threads: 2)
                }
                counts.append(allocations)
            }
        } } } } }
        print("ALLOC \(name): \(counts)")
    }
}
