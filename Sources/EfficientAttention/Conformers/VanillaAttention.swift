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
        try checkFloatAllocation(shape.queryLength, shape.keyLength, option: "vanilla score matrix [Nq, Nk]")
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
        try checkFloatAllocation(workers, nq, nk, option: "vanilla score matrices [threads, Nq, Nk]")
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

// MARK: - Backward

extension VanillaAttention: DifferentiableAttention {
    /// The textbook backward, materialised like the forward: for each key/value head, and
    /// each query head of its group in order, the `Nq × Nk` probabilities are recomputed from
    /// the log-sum-exp into a matrix, then walked row by row. A worker owns a whole key/value
    /// head (its `dK`, `dV` rows and its group's `dQ` rows), so every sum has one fixed order
    /// and the gradients are bitwise identical for any thread count, without atomics.
    ///
    /// ```
    /// // for each (b, hk), for h in hk's group, in order:
    /// P  = exp(scale · Q Kᵀ − lse)        // Nq × Nk, masked entries 0 (rows with lse = −∞: 0)
    /// dV += Pᵀ dO
    /// dS = P ∘ (dO Vᵀ − rowsum(dO ∘ O))
    /// dQ = scale · dS K,   dK += scale · dSᵀ Q
    /// ```
    ///
    /// Not a copy of ``DenseAttention``'s backward: the same mathematics with no head-dimension
    /// limit and no tiling: the baseline the tiled backward is measured against
    /// (KernelDocs/Dense.md, "Backward", has the mathematics).
    ///
    /// - Complexity: `6·D + 4·Dv` FLOPs per visible pair (the cost model counts `2.5 ×` the
    ///   forward's); workspace `4 · Nq · Nk` bytes per worker, like the forward.
    public func gradients(query: StridedView, key: StridedView, value: StridedView, output: StridedView,
                          logSumExp: StridedView, outputGradient: StridedView,
                          dQuery: MutableStridedView, dKey: MutableStridedView, dValue: MutableStridedView,
                          keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws {
        let causal = self.causal
        try withCheckedGradientCall(query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                                    outputGradient: outputGradient, dQuery: dQuery, dKey: dKey, dValue: dValue,
                                    keyLengths: keyLengths, workspace: workspace, threads: threads,
                                    scale: self.scale) { shape, scale in
            let (q, k, v, o, l, g) = (query.kernel, key.kernel, value.kernel, output.kernel, logSumExp.kernel,
                                      outputGradient.kernel)
            let (dq, dk, dvw) = (dQuery.kernel, dKey.kernel, dValue.kernel)
            let (nq, nk, d, dv) = (shape.queryLength, shape.keyLength, shape.headDim, shape.valueDim)
            let items = shape.batch * shape.kvHeads
            let workers = workerCount(threads: try threadCount(threads), items: items)
            try checkFloatAllocation(workers, nq, nk, option: "vanilla score matrices [threads, Nq, Nk]")
            WorkspaceArena.withWorkspaces(workers: workers,
                                          layout: { UncheckedSendable($0.take(nq * nk, of: Float.self)) }) { spaces in
                parallelForEach(items: items, threads: workers) { item, worker in
                    let b = item / shape.kvHeads, hk = item % shape.kvHeads
                    let visibleKeys = keyLengths?[b] ?? nk
                    let p = spaces[worker].value
                    for j in 0..<nk {
                        let (kr, vr) = (dk.row(b, hk, j), dvw.row(b, hk, j))
                        for c in 0..<d { kr[c &* dk.strides[3]] = 0 }
                        for c in 0..<dv { vr[c &* dvw.strides[3]] = 0 }
                    }
                    for h in hk * shape.groupSize..<(hk + 1) * shape.groupSize {
                        // P = exp(scale · Q Kᵀ − lse), 0 where masked.
                        for i in 0..<nq {
                            let lse = l.row(b, h, i)[0], qi = q.row(b, h, i)
                            let last = causal ? min(visibleKeys - 1, i + nk - nq) : visibleKeys - 1
                            for j in 0..<nk {
                                p[i * nk + j] = j <= last && lse > -.infinity
                                    ? expf(scale * dot(qi, q.strides[3], k.row(b, hk, j), k.strides[3], count: d) - lse)
                                    : 0
                            }
                        }
                        for i in 0..<nq {
                            let prow = p + i * nk, gi = g.row(b, h, i), qi = q.row(b, h, i), dqi = dq.row(b, h, i)
                            let di = dot(gi, g.strides[3], o.row(b, h, i), o.strides[3], count: dv)
                            for j in 0..<nk where prow[j] != 0 {
                                let vj = v.row(b, hk, j)
                                axpy(prow[j], gi, g.strides[3], dvw.row(b, hk, j), dvw.strides[3], count: dv)
                                let ds = prow[j] * (dot(gi, g.strides[3], vj, v.strides[3], count: dv) - di)
                                axpy(scale * ds, k.row(b, hk, j), k.strides[3], dqi, dq.strides[3], count: d)
                                axpy(scale * ds, qi, q.strides[3], dk.row(b, hk, j), dk.strides[3], count: d)
                            }
                        }
                    }
                }
            }
        }
    }

    public func backwardCost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        let forward = try cost(shape, threads: threads)
        let workers = workerCount(threads: try threadCount(threads), items: shape.batch * shape.kvHeads)
        return AttentionCost(flops: 2.5 * forward.flops,
                             workspaceBytes: workers * WorkspaceCarver.bytes {
                                 _ = $0.take(shape.queryLength * shape.keyLength, of: Float.self)
                             },
                             scoredPairs: forward.scoredPairs)
    }
}
