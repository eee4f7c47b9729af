// AxialAttention against Double references written from the spec's rule (coordinates
// on the grid, independent of AxialPattern): `.union` as one softmax over the axes'
// lines, `.sum` as the sum of one reference per axis (lse: the union's), and `.sum`
// against DenseAttention run on strided views of the axes; 2-D and 3-D grids, axes of
// length 1, lines longer than a query tile, causal, key padding, grouped heads, odd D;
// one axis equals dense; bad grids throw; thread counts give the same bits.

@_spi(Testing) import EfficientAttention
import Testing

/// The coordinates of position `i` on the row-major grid `axes` (test side).
private func coordinates(_ i: Int, _ axes: [Int]) -> [Int] {
    var c = [Int](repeating: 0, count: axes.count), rest = i
    for t in axes.indices.reversed() {
        c[t] = rest % axes[t]
        rest /= axes[t]
    }
    return c
}

/// Axis `t`'s visibility from the spec: `j` agrees with `i` on every other axis, and
/// (causal) `coord_t(j) ≤ coord_t(i)`; key padding on top.
private func axisVisibility(_ t: Int, axes: [Int], causal: Bool, keyLengths: [Int]?) -> Visibility {
    { b, _, i, j in
        let ci = coordinates(i, axes), cj = coordinates(j, axes)
        guard j < (keyLengths?[b] ?? Int.max) else { return false }
        for u in axes.indices where u != t && ci[u] != cj[u] { return false }
        return !causal || cj[t] <= ci[t]
    }
}

private func unionVisibility(axes: [Int], causal: Bool, keyLengths: [Int]?) -> Visibility {
    let parts = axes.indices.map { axisVisibility($0, axes: axes, causal: causal, keyLengths: keyLengths) }
    return { b, h, i, j in parts.contains { $0(b, h, i, j) } }
}

/// `.sum`'s reference: the axes' outputs added, the union's lse.
private func sumReference<T: BinaryFloatingPoint>(_ parts: [ReferenceResult<T>], union: ReferenceResult<T>) -> ReferenceResult<T> {
    var result = union
    for n in result.output.indices { result.output[n] = parts.reduce(0) { $0 + $1.output[n] } }
    return result
}

@Suite("AxialAttention")
struct AxialAttentionTests {
    static let cases: [(axes: [Int], d: Int, dv: Int, causal: Bool, combination: AxialAttention.Combination)] = [
        ([5, 7], 3, 3, false, .union), ([5, 7], 3, 3, true, .union),
        ([3, 4, 5], 8, 5, false, .union), ([3, 4, 5], 8, 5, true, .union),
        ([1, 7, 5], 1, 1, false, .union), ([2, 150], 65, 16, true, .union), ([150, 2], 16, 16, false, .union),
        ([5, 7], 3, 3, false, .sum), ([5, 7], 3, 3, true, .sum),
        ([3, 4, 5], 8, 5, false, .sum), ([3, 4, 5], 65, 8, true, .sum), ([7, 1], 4, 4, false, .sum),
        ([2, 150], 16, 16, false, .sum),
    ]

    /// Checks `attention` against the spec's references (union or per-axis sum).
    func checkReference(_ attention: AxialAttention, axes: [Int], batch: Int = 1, heads: Int, kvHeads: Int? = nil,
                        d: Int, dv: Int, keyLengths: [Int]? = nil, threads: Int? = nil,
                        seed: UInt64, _ label: String,
                        sourceLocation: SourceLocation = #_sourceLocation) throws {
        let n = axes.reduce(1, *)
        let (q, k, v) = try randomQKV(batch: batch, heads: heads, kvHeads: kvHeads, queryLength: n,
                                      headDim: d, valueDim: dv, seed: seed)
        let result = try attention.attend(query: q, key: k, value: v, keyLengths: keyLengths, threads: threads)
        let scale = defaultScale(headDim: d)
        let union = unionVisibility(axes: axes, causal: attention.causal, keyLengths: keyLengths)
        var reference = referenceAttention(query: q, key: k, value: v, scale: scale, visible: union)
        var naive = naiveFloatAttention(query: q, key: k, value: v, scale: Float(scale), visible: union)
        if attention.combination == .sum {
            let visible = axes.indices.map { axisVisibility($0, axes: axes, causal: attention.causal, keyLengths: keyLengths) }
            reference = sumReference(visible.map { referenceAttention(query: q, key: k, value: v, scale: scale, visible: $0) },
                                     union: reference)
            naive = sumReference(visible.map { naiveFloatAttention(query: q, key: k, value: v, scale: Float(scale), visible: $0) },
                                 union: naive)
        }
        checkAttention(result, reference: reference, naive: naive, label, sourceLocation: sourceLocation)
    }

    @Test("matches the reference", arguments: cases.indices)
    func reference(_ index: Int) throws {
        let c = AxialAttentionTests.cases[index]
        let attention = AxialAttention(axes: c.axes, combination: c.combination, causal: c.causal)
        let label = "axial \(c)"
        if c.combination == .union {
            let n = c.axes.reduce(1, *)
            let pattern = try attention.pattern(for: AttentionShape(heads: 2, queryLength: n, headDim: c.d))
            checkPatternConsistency(pattern, label)
            let spec = unionVisibility(axes: c.axes, causal: c.causal, keyLengths: nil)
            checkPatternMatchesSpec(pattern, label) { _, p, j in spec(0, 0, p, j) }
        }
        try checkReference(attention, axes: c.axes, heads: 2, kvHeads: 1, d: c.d, dv: c.dv,
                           seed: 3000 + UInt64(index), label)
    }

    @Test("key padding, batches and grouped heads")
    func padding() throws {
        for combination in [AxialAttention.Combination.union, .sum] {
            for causal in [false, true] {
                let attention = AxialAttention(axes: [6, 11], combination: combination, causal: causal)
                try checkReference(attention, axes: [6, 11], batch: 3, heads: 4, kvHeads: 2, d: 8, dv: 8,
                                   keyLengths: [66, 0, 29], threads: 2, seed: 3100,
                                   "axial \(combination) causal \(causal) padded")
            }
        }
    }

    @Test("the default grid is the most square one")
    func defaultAxes() throws {
        for (n, axes) in [(1, [1]), (2, [2, 1]), (4096, [64, 64]), (4095, [65, 63]), (13, [13, 1]), (12, [4, 3])] {
            #expect(AxialAttention.defaultAxes(sequenceLength: n) == axes, "N \(n)")
        }
        try checkReference(AxialAttention(), axes: [10, 10], heads: 1, d: 4, dv: 4, seed: 3200, "axial default grid")
    }

    @Test("one axis is dense attention")
    func oneAxis() throws {
        for causal in [false, true] {
            for n in [1, 37, 300] {
                let (q, k, v) = try randomQKV(heads: 2, queryLength: n, headDim: 16, seed: 3300 + UInt64(n))
                let axial = try AxialAttention(axes: [n], causal: causal).attend(query: q, key: k, value: v, keyLengths: [n - n / 3])
                let dense = try DenseAttention(causal: causal).attend(query: q, key: k, value: v, keyLengths: [n - n / 3])
                // One position: dense runs the decode kernel (another summation order).
                if n < 16 {
                    expectClose(axial, dense, "axial [\(n)] causal \(causal) vs dense")
                } else {
                    expectBitwiseEqual(axial, dense, "axial [\(n)] causal \(causal) vs dense")
                }
            }
        }
    }

    @Test(".sum equals dense attention along strided views of each axis")
    func sumOfDenseAxes() throws {
        let (n0, n1, heads, d) = (9, 13, 3, 8)
        let n = n0 * n1
        let (q, k, v) = try randomQKV(heads: heads, queryLength: n, headDim: d, seed: 3400)
        let sum = try AxialAttention(axes: [n0, n1], combination: .sum).attend(query: q, key: k, value: v)
        // Axis 1: the grid's rows, contiguous runs of n1 ([1, H·n0, n1, D]); axis 0: its
        // columns, n1 rows apart (the heads as batch items, the column as the head: [H, n1, n0, D]).
        func rows(_ t: Tensor) throws -> Tensor {
            try Tensor(shape: [1, heads * n0, n1, d], storage: t.storage, strides: [heads * n * d, n1 * d, d, 1])
        }
        func columns(_ t: Tensor) throws -> Tensor {
            try Tensor(shape: [heads, n1, n0, d], storage: t.storage, strides: [n * d, d, n1 * d, 1])
        }
        let dense = DenseAttention()
        let alongRows = try dense.attend(query: rows(q), key: rows(k), value: rows(v))
        let alongColumns = try dense.attend(query: columns(q), key: columns(k), value: columns(v))
        var worst: Float = 0
        for h in 0..<heads {
            for i in 0..<n {
                for c in 0..<d {
                    let expected = alongRows.output[0, h * n0 + i / n1, i % n1, c] + alongColumns.output[h, i % n1, i / n1, c]
                    worst = max(worst, abs(sum.output[0, h, i, c] - expected))
                }
            }
        }
        #expect(worst < 2e-6, "axial .sum vs dense per axis: max difference \(worst)")
    }

    @Test("thread counts give the same bits")
    func determinism() throws {
        let (q, k, v) = try randomQKV(batch: 2, heads: 2, queryLength: 4 * 9 * 70, headDim: 32, seed: 3500)
        for combination in [AxialAttention.Combination.union, .sum] {
            for causal in [false, true] {
                let attention = AxialAttention(axes: [4, 9, 70], combination: combination, causal: causal)
                let one = try attention.attend(query: q, key: k, value: v, keyLengths: [2520, 1000], threads: 1)
                for threads in [2, 3, 7] {
                    let other = try attention.attend(query: q, key: k, value: v, keyLengths: [2520, 1000], threads: threads)
                    expectBitwiseEqual(one, other, "axial \(combination) causal \(causal) threads 1 vs \(threads)")
                }
            }
        }
        try checkReadsOnlyAddressedElements(AxialAttention(axes: [8, 12]), heads: 2, queryLength: 96, "axial")
    }

    @Test("cost counts the scored pairs")
    func cost() throws {
        let shape = AttentionShape(batch: 2, heads: 3, queryLength: 64 * 64, headDim: 64)
        let union = try AxialAttention(axes: [64, 64]).cost(shape, threads: 2)
        #expect(union.scoredPairs == 2 * 3 * 4096 * 127)
        #expect(union.flops == 2 * Double(union.scoredPairs) * 128)
        let causal = try AxialAttention(axes: [64, 64], causal: true).cost(shape, threads: 2)
        #expect(causal.scoredPairs == 2 * 3 * (4096 + 2 * 64 * (63 * 64 / 2)))
        let sum = try AxialAttention(axes: [64, 64], combination: .sum).cost(shape, threads: 2)
        #expect(sum.scoredPairs == 2 * 3 * 4096 * 128)
        #expect(sum.workspaceBytes >= union.workspaceBytes + 2 * 3 * 4096 * 65 * 4)
    }

    @Test("bad grids throw")
    func errors() throws {
        let (q, k, v) = try randomQKV(heads: 1, queryLength: 12, headDim: 4, seed: 3600)
        expectAttentionError(.invalidParameter, mentioning: ["axes", "multiply", "12"]) {
            try AxialAttention(axes: [5, 2]).attend(query: q, key: k, value: v)
        }
        expectAttentionError(.invalidParameter, mentioning: ["axes[1]", "at least 1"]) {
            try AxialAttention(axes: [12, 0]).attend(query: q, key: k, value: v)
        }
        expectAttentionError(.invalidParameter, mentioning: ["number of axes"]) {
            try AxialAttention(axes: []).attend(query: q, key: k, value: v)
        }
        expectAttentionError(.invalidParameter, mentioning: ["number of axes", "at most"]) {
            try AxialAttention(axes: [Int](repeating: 1, count: 17) + [12]).cost(AttentionShape(heads: 1, queryLength: 12, headDim: 4))
        }
        expectAttentionError(.invalidParameter, mentioning: ["axes[0]", "at most"]) {
            try AxialAttention(axes: [1 << 40, 1 << 40]).cost(AttentionShape(heads: 1, queryLength: 12, headDim: 4))
        }
        let (q2, k2, v2) = try randomQKV(heads: 1, queryLength: 12, keyLength: 24, headDim: 4, seed: 3601)
        expectAttentionError(.invalidParameter, mentioning: ["keyLength 24", "share the grid"]) {
            try AxialAttention(axes: [3, 4]).attend(query: q2, key: k2, value: v2)
        }
        expectAttentionError(.invalidParameter, mentioning: ["scale"]) {
            try AxialAttention(axes: [3, 4], scale: .nan).attend(query: q, key: k, value: v)
        }
    }
}
