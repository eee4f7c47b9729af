/// Induced set attention (ISAB, Lee et al. 2019, Set Transformer): `m` learned inducing
/// points per head summarise the keys, and the queries attend over the summary.
///
/// ```
/// // naive reference (what this computes), for each b, h (hk = h / (H / Hkv)):
/// let L = keyLengths?[b] ?? Nk
/// Z[r] = Σ_{j < L} softmax_j(scale · I[h, r] · k[b, hk, j]) · v[b, hk, j]        // r < m, [m, Dv]
/// K2 = Z · W_K[h]   ([m, Dv] · [Dv, D]),   V2 = Z · W_V[h]   ([m, Dv] · [Dv, Dv])
/// //  without projections: K2 = V2 = Z (needs Dv == D)
/// o[b, h, i] = Σ_r softmax_r(scale · q[b, h, i] · K2[r]) · V2[r],   lse = log Σ_r exp(…)
/// ```
/// A batch item without keys (`L = 0`) has no summary: its rows are 0 with
/// `lse = -infinity`. Not causal (the summary mixes every key): `causal` throws.
///
/// Both attentions are the tiled softmax kernel: the inducing points as a query view with
/// batch stride 0 (``PointAttention``), then the queries over the `m`-row summary of their
/// own head; the projections run on the GEMM kernel. (KernelDocs/SetTransformer.md.)
///
/// - Complexity: `2 · m · (Nk + Nq) · (D + Dv)` FLOPs per head for the attentions plus
///   `2 · m · Dv · (D + Dv)` for the projections: `O(N · m)`. Workspace: the summary and its
///   projections (`4 · B · H · m · (2·Dv + D + 1)` bytes), GEMM and kernel tiles per thread.
public struct InducedSetAttention: Attention {
    /// Query heads `H` the inducing points and projections are for.
    public let heads: Int
    /// `D`.
    public let headDim: Int
    /// `m`, inducing points per head.
    public let inducingCount: Int
    /// `I [H, m, D]` row-major.
    public let inducingPoints: [Float]
    /// `W_K [H, Dv, D]` row-major, or `nil` (identity, with `W_V`).
    public let keyProjection: [Float]?
    /// `W_V [H, Dv, Dv]` row-major, or `nil` (identity, with `W_K`).
    public let valueProjection: [Float]?
    /// Must stay false: a thrown error.
    public var causal: Bool
    /// Score scale of both attentions; `nil` means `1 / sqrt(D)`. Must be finite.
    public var scale: Float?

    /// The paper's number of inducing points, 32.
    public static let defaultInducingCount = 32

    /// Given inducing points `[H, m, D]` (and optionally both projections).
    ///
    /// - Throws: ``AttentionError`` for sizes that do not match `[H, m, D]`, `[H, Dv, D]`,
    ///   `[H, Dv, Dv]`, one projection without the other, or a non-finite entry.
    public init(heads: Int, headDim: Int, inducingPoints: [Float], keyProjection: [Float]? = nil,
                valueProjection: [Float]? = nil, causal: Bool = false, scale: Float? = nil) throws {
        let variant = "induced set attention"
        try PointAttention.checkPoints(inducingPoints, heads: heads, headDim: headDim,
                                       option: "inducingPoints", variant: variant)
        guard (keyProjection == nil) == (valueProjection == nil) else {
            throw AttentionError.invalidParameter(
                "\(variant): keyProjection and valueProjection must be given together (or neither, for identity)")
        }
        if let wk = keyProjection, let wv = valueProjection {
            // W_K [H, Dv, D] fixes Dv; W_V must then be [H, Dv, Dv].
            guard !wk.isEmpty, wk.count % (heads * headDim) == 0 else {
                throw AttentionError.shapeMismatch(
                    "\(variant): keyProjection has \(wk.count) elements, expected [H \(heads), Dv, D \(headDim)]")
            }
            let dv = wk.count / (heads * headDim)
            guard wv.count == heads * dv * dv else {
                throw AttentionError.shapeMismatch(
                    "\(variant): valueProjection has \(wv.count) elements, expected [H \(heads), Dv \(dv), Dv \(dv)]")
            }
            for (name, array) in [("keyProjection", wk), ("valueProjection", wv)] {
                if let index = array.firstIndex(where: { !$0.isFinite }) {
                    throw AttentionError.invalidParameter("\(variant): \(name)[\(index)] must be finite, got \(array[index])")
                }
            }
        }
        self.heads = heads
        self.headDim = headDim
        self.inducingCount = inducingPoints.count / (heads * headDim)
        self.inducingPoints = inducingPoints
        self.keyProjection = keyProjection
        self.valueProjection = valueProjection
        self.causal = causal
        self.scale = scale
    }

    /// Inducing points drawn from `N(0, 1)` with a seeded generator, identity projections.
    public init(heads: Int, headDim: Int, inducingCount: Int = InducedSetAttention.defaultInducingCount,
                seed: UInt64 = 0, causal: Bool = false, scale: Float? = nil) throws {
        let points = try PointAttention.seededPoints(heads: heads, count: inducingCount, headDim: headDim, seed: seed,
                                                     option: "inducing points", variant: "induced set attention")
        try self.init(heads: heads, headDim: headDim, inducingPoints: points, causal: causal, scale: scale)
    }

    public var name: String { "isab" }

    public func validate(_ shape: AttentionShape) throws {
        let variant = "induced set attention"
        try PointAttention.checkProblem(shape, heads: heads, headDim: headDim, causal: causal, scale: scale,
                                        variant: variant)
        if let wk = keyProjection {
            guard wk.count == heads * shape.valueDim * headDim else {
                throw AttentionError.shapeMismatch(
                    "\(variant): keyProjection is [H, Dv, D] with Dv \(wk.count / (heads * headDim)), the problem has valueDim \(shape.valueDim)")
            }
        } else if shape.valueDim != headDim {
            throw AttentionError.shapeMismatch(
                "\(variant): without projections the summary serves as keys, which needs valueDim == headDim (got \(shape.valueDim) and \(headDim))")
        }
        try checkFloatAllocation([shape.batch, heads, inducingCount, 2 * shape.valueDim + headDim + 1],
                                 option: "\(variant): summary and its projections [B, H, m, 2·Dv + D + 1]")
    }

    /// The second attention: queries over the `m`-row summary of their own head.
    private func summaryShape(_ shape: AttentionShape) -> AttentionShape {
        AttentionShape(batch: shape.batch, heads: shape.heads, kvHeads: shape.heads, queryLength: shape.queryLength,
                       keyLength: inducingCount, headDim: shape.headDim, valueDim: shape.valueDim)
    }

    public func cost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        let threads = try threadCount(threads)
        try validate(shape)
        let m = inducingCount, (d, dv) = (shape.headDim, shape.valueDim)
        let first = PointAttention.cost(count: m, shape: shape, threads: threads)
        let summary = summaryShape(shape)
        let pairs = shape.batch * shape.heads * shape.queryLength * m
        let projections = keyProjection == nil ? 0 : 2 * Double(shape.batch * heads * m * dv * (d + dv))
        // Z, its log-sum-exp, and the projected keys and values: one 64-byte aligned buffer each.
        let buffer = { (width: Int) in roundUp(shape.batch * heads * m * width * 4, WorkspaceCarver.alignment) }
        let summaryBytes = buffer(dv) + buffer(1) + (keyProjection == nil ? 0 : buffer(d) + buffer(dv))
        let gemmWorkers = keyProjection == nil ? 0 : workerCount(threads: threads, items: 2 * shape.batch * heads)
        return AttentionCost(
            flops: first.flops + projections + 2 * Double(pairs) * Double(d + dv),
            workspaceBytes: summaryBytes + gemmWorkers * Gemm.Workspace.byteCount()
                + max(first.workspaceBytes, TiledSoftmaxAttention.workspaceBytes(shape: summary, threads: threads)),
            scoredPairs: first.scoredPairs + pairs)
    }

    public func attend(query: StridedView, key: StridedView, value: StridedView,
                       output: MutableStridedView, logSumExp: MutableStridedView?,
                       keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws {
        try withCheckedCall(query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                            keyLengths: keyLengths, workspace: workspace, threads: threads, scale: scale) { call in
        let (shape, scale, threads) = (call.shape, call.scale, call.threadCount)
        let (k, v) = (call.k, call.v)
        let m = inducingCount, (d, dv) = (shape.headDim, shape.valueDim)
        // Z, its log-sum-exp and the projected keys and values in workspace scratch.
        withScratchTensor(SIMD4(shape.batch, heads, m, dv)) { z in
        withScratchTensor(SIMD4(shape.batch, heads, m, 1)) { zLSE in
            PointAttention.run(points: inducingPoints, count: m, shape: shape, scale: scale, threads: threads,
                               keyLengths: keyLengths, k: k, v: v, o: z, lse: zLSE)
            func attendSummary(_ keys: TensorView, _ values: TensorView) {
                TiledSoftmaxAttention.run(shape: summaryShape(shape), scale: scale, threads: threads,
                                          q: call.q, k: keys, v: values, o: call.o, lse: call.lse) { b, _ in
                    // A batch item without keys has no summary.
                    IntervalMask(queryLength: shape.queryLength, keyLength: m, causal: false,
                                 keyEnd: call.keyEnd(b) == 0 ? 0 : m)
                }
            }
            // The summary's keys and values: Z W_K and Z W_V, or Z itself.
            guard let wk = keyProjection, let wv = valueProjection else {
                return attendSummary(z.readOnly, z.readOnly)
            }
            withScratchTensor(SIMD4(shape.batch, heads, m, d)) { kOut in
            withScratchTensor(SIMD4(shape.batch, heads, m, dv)) { vOut in
                let items = 2 * shape.batch * heads
                let workers = workerCount(threads: threads, items: items)
                WorkspaceArena.withWorkspaces(workers: workers, layout: { Gemm.Workspace(carving: &$0) }) { spaces in
                wk.withUnsafeBufferPointer { wk in wv.withUnsafeBufferPointer { wv in
                    let wk = UncheckedSendable(wk.baseAddress!), wv = UncheckedSendable(wv.baseAddress!)
                    parallelForEach(items: items, threads: workers) { item, worker in
                        let isValue = item % 2 == 1, b = item / 2 / heads, h = item / 2 % heads
                        let width = isValue ? dv : d
                        let weights = (isValue ? wv.value : wk.value) + h * dv * width
                        let out = isValue ? vOut : kOut
                        Gemm.multiply(m: m, n: width, depth: dv,
                                      a: MatrixOperand(base: z.row(b, h, 0), rowStride: dv, columnStride: 1),
                                      b: .matrix(MatrixOperand(base: weights, rowStride: width, columnStride: 1)),
                                      c: out.row(b, h, 0), ldc: width, workspace: spaces[worker])
                    }
                } }
                }
                attendSummary(kOut.readOnly, vOut.readOnly)
            } }
        } }
        }
    }
}
