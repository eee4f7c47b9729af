/// The textbook, unfused softmax attention: for each head, materialise the `Nq × Nk`
/// score matrix, apply the softmax row by row, then multiply by the values.
///
/// This is the "vanilla Transformer" baseline of the benchmark (the first row of the
/// Long Range Arena speed/memory table): plain vectorised loops, no tiling. It computes
/// exactly what ``DenseAttention`` computes (same causal rule, key padding, scale,
/// grouped heads) and needs `4 · Nq · Nk` bytes of scores per head in flight.
///
/// ```
/// for each (b, h): S = scale · Q Kᵀ          // Nq × Nk, materialised
///                  P = softmax(S masked)     // row by row
///                  O = P V
/// ```
///
/// - Complexity: O(B · H · Nq · Nk · (D + Dv)) time, O(threads · Nq · Nk) workspace.
public struct VanillaAttention: Attention {
    /// Bottom-right aligned causal mask: key `j` visible to query `i` iff `j <= i + Nk - Nq`.
    public var causal: Bool
    /// Score scale; `nil` means `1 / sqrt(D)`.
    public var scale: Float?

    public init(causal: Bool = false, scale: Float? = nil) {
        self.causal = causal
        self.scale = scale
    }

    public var name: String { "vanilla" }

    public func validate(_ shape: AttentionShape) throws {
        try shape.check()
        try checkScale(scale)
        // Views with stride-0 axes can describe long sequences without memory; the scores
        // are materialised.
        try checkFloatAllocation([shape.queryLength, shape.keyLength], option: "vanilla score matrix [Nq, Nk]")
    }

    public func cost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        let threads = try threadCount(threads)
        try validate(shape)
        let pairs = visiblePairs(shape, causal: causal)
        let workers = workerCount(threads: threads, items: shape.batch * shape.heads)
        return AttentionCost(flops: 2 * Double(pairs) * Double(shape.headDim + shape.valueDim),
                             workspaceBytes: workers * WorkspaceCarver.bytes { _ = $0.take(shape.queryLength * shape.keyLength, of: Float.self) },
                             scoredPairs: pairs)
    }

    public func attend(query: StridedView, key: StridedView, value: StridedView,
                       output: MutableStridedView, logSumExp: MutableStridedView?,
                       keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws {
        try withCheckedCall(query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                            keyLengths: keyLengths, workspace: workspace, threads: threads, scale: scale) { call in
        let (shape, scale) = (call.shape, call.scale)
        let (q, k, v, o, l) = (call.q, call.k, call.v, call.o, call.lse)
        let (nq, nk, d, dv) = (shape.queryLength, shape.keyLength, shape.headDim, shape.valueDim)
        let workers = workerCount(threads: threads, items: shape.batch * shape.heads)
        try checkFloatAllocation([workers, nq, nk], option: "vanilla score matrices [threads, Nq, Nk]")
        let causal = self.causal
        // One score matrix per worker.
        WorkspaceArena.withWorkspaces(workers: workers, layout: { UncheckedSendable($0.take(nq * nk, of: Float.self)) }) {
            scores in
            parallelForEach(items: shape.batch * shape.heads, threads: workers) { item, worker in
                let b = item / shape.heads, h = item % shape.heads
                let hk = h / shape.groupSize
                let visibleKeys = keyLengths?[b] ?? nk
                do {
                    let s = scores[worker].value
                    // S = scale · Q Kᵀ, masked entries -inf.
                    for i in 0..<nq {
                        let qi = q.row(b, h, i)
                        let last = causal ? min(visibleKeys - 1, i + nk - nq) : visibleKeys - 1
                        for j in 0..<nk {
                            s[i * nk + j] = j <= last
                                ? scale * dot(qi, q.strides[3], k.row(b, hk, j), k.strides[3], count: d)
                                : -.infinity
                        }
                    }
                    // Row softmax and O = P V.
                    for i in 0..<nq {
                        let srow = s + i * nk
                        var m = -Float.infinity
                        for j in 0..<nk { m = max(m, srow[j]) }
                        let orow = o.row(b, h, i)
                        for c in 0..<dv { orow[c &* o.strides[3]] = 0 }
                        guard m > -.infinity else { l.row(b, h, i)[0] = -.infinity; continue }
                        var sum: Float = 0
                        for j in 0..<nk {
                            let p = expf(srow[j] - m)
                            srow[j] = p
                            sum += p
                        }
                        for j in 0..<nk where srow[j] != 0 {
                            axpy(srow[j] / sum, v.row(b, hk, j), v.strides[3], orow, o.strides[3], count: dv)
                        }
                        l.row(b, h, i)[0] = m + logf(sum)
                    }
                }
            }
        }
        }
    }
}

/// Visible query/key pairs of a dense problem (without key padding).
func visiblePairs(_ shape: AttentionShape, causal: Bool) -> Int {
    let (nq, nk) = (shape.queryLength, shape.keyLength)
    var perHead = nq * nk
    if causal {
        perHead = 0
        for i in 0..<nq { perHead += max(0, min(nk, i + nk - nq + 1)) }
    }
    return perHead * shape.batch * shape.heads
}

/// Wraps a value that is shared across worker threads whose accesses are disjoint.
struct UncheckedSendable<T>: @unchecked Sendable {
    let value: T
    init(_ value: T) { self.value = value }
}
