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
public struct InducedSetAttention: KernelWidening {
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
        try checkFloatAllocation(shape.batch, heads, inducingCount, 2 * shape.valueDim + headDim + 1,
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

    /// 16-bit keys and values are widened as the tiled kernel packs them for the inducing
    /// points' attention, 16-bit queries for the summary's; its one pass writes the output rows.
    func stagedOperands(_ shape: AttentionShape) -> (query: Bool, output: Bool) { (false, false) }

    public func attend(query: ActivationView, key: ActivationView, value: ActivationView,
                       output: MutableActivationView, logSumExp: MutableStridedView?,
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
                project(z.readOnly, shape: shape, threads: threads, wk: wk, wv: wv, kOut: kOut, vOut: vOut)
                attendSummary(kOut.readOnly, vOut.readOnly)
            } }
        } }
        }
    }

    /// `K2 = Z W_K[h]` into `kOut` and `V2 = Z W_V[h]` into `vOut` (`[B, H, m, ·]`), one
    /// (batch item, head, which) per work item on the GEMM.
    private func project(_ z: TensorView, shape: AttentionShape, threads: Int, wk: [Float], wv: [Float],
                         kOut: MutableTensorView, vOut: MutableTensorView) {
        let m = inducingCount, (d, dv) = (shape.headDim, shape.valueDim)
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
    }
}

/// The gradients of ``InducedSetAttention``'s learned parameters, from
/// ``InducedSetAttention/parameterGradients(query:key:value:result:outputGradient:keyLengths:threads:)``.
public struct InducedSetParameterGradients: Sendable, Equatable {
    /// `∂L/∂I`, shaped like ``InducedSetAttention/inducingPoints`` (`[H, m, D]`).
    public var inducingPoints: [Float]
    /// `∂L/∂W_K`, shaped like ``InducedSetAttention/keyProjection`` (`[H, Dv, D]`); `nil`
    /// without projections.
    public var keyProjection: [Float]?
    /// `∂L/∂W_V`, shaped like ``InducedSetAttention/valueProjection`` (`[H, Dv, Dv]`); `nil`
    /// without projections.
    public var valueProjection: [Float]?
}

extension InducedSetAttention: OperandWideningBackward {
    /// `dK`, `dV` come from one tiled pass of the inducing points over the keys, which sums a
    /// group's heads itself and writes each row once, rounded when 16-bit; a 16-bit `dQ`,
    /// summed over the summary's key blocks, is staged.
    static func stagedGradients(_ shape: AttentionShape) -> (query: Bool, keys: Bool) { (true, false) }

    /// 16-bit operands are read by the tiled kernels (the summary's recomputation and both
    /// backward passes), which widen them as they pack them.
    func widenedOperandsBackward(_ shape: AttentionShape, threads: Int, q: TensorView, k: TensorView,
                                 v: TensorView, o: TensorView, lse: TensorView, dO: TensorView,
                                 dQ: MutableTensorView, dK: MutableTensorView, dV: MutableTensorView,
                                 keyLengths: [Int]?) throws {
        backward(shape: shape, scale: scale ?? 1 / Float(shape.headDim).squareRoot(), threads: threads,
                 keyLengths: keyLengths, q: q, k: k, v: v, o: o, lse: lse, dO: dO, dQ: dQ, dK: dK, dV: dV,
                 parameters: nil)
    }

    /// The backward of the two attentions in reverse (KernelDocs/SetTransformer.md,
    /// "Backward"). The forward returns only the final output and log-sum-exp, so the
    /// summary `Z`, its log-sum-exp and its projections `K2`, `V2` are **recomputed** (the
    /// first attention and the GEMMs again); then the dense backward (``TiledSoftmaxBackward``)
    /// of the queries over the summary gives `dQ`, `dK2`, `dV2`; `dZ = dK2 W_Kᵀ + dV2 W_Vᵀ`
    /// (identity: `dK2 + dV2`) on the GEMM; and the dense backward of the inducing points
    /// over the keys, with `dZ` as its output gradient, gives `dK`, `dV`. The learned
    /// parameters' gradients come from
    /// ``parameterGradients(query:key:value:result:outputGradient:keyLengths:threads:)``.
    ///
    /// ```
    /// // naive reference, for each b, h (hk = h / (H / Hkv)), L = keyLengths?[b] ?? Nk:
    /// Z, lseZ = softmax attention of I[h] over k[b, hk, :L], v[b, hk, :L]      (recomputed)
    /// K2 = Z W_K[h], V2 = Z W_V[h]                                               (recomputed)
    /// dQ[b, h], dK2, dV2 = dense softmax backward of q[b, h] over K2, V2 (o, lse, dO given)
    /// dZ = dK2 W_K[h]ᵀ + dV2 W_V[h]ᵀ
    /// dI_b, dK[b, hk] +=, dV[b, hk] += dense softmax backward of I[h] over k, v (Z, lseZ, dZ)
    /// ∂L/∂I[h] = Σ_b dI_b,  ∂L/∂W_K[h] = Σ_b Zᵀ dK2,  ∂L/∂W_V[h] = Σ_b Zᵀ dV2
    /// ```
    /// A batch item without keys gets zero gradients. `dQ` rows are summed in a fixed
    /// order, the parameters' over batch items in order: bitwise identical for every
    /// thread count.
    ///
    /// - Complexity: the recomputation (the first attention, `2 · m · Nk · (D + Dv)` FLOPs
    ///   per head, and the projections, `2 · m · Dv · (D + Dv)`), `2.5 ×` each attention's
    ///   forward FLOPs, and `2 · m · Dv · (D + Dv)` for `dZ` (twice that again for the
    ///   projections' gradients): `O(N · m)`. Workspace: the recomputed summary, its
    ///   projections and their gradients (`4 · B · H · m · (3·Dv + 2·D + 1)` bytes, plus
    ///   `4 · B · H · m · (D + 2·Dv)` with projections), GEMM and kernel tiles per thread.
    public func gradients(query: StridedView, key: StridedView, value: StridedView, output: StridedView,
                          logSumExp: StridedView, outputGradient: StridedView,
                          dQuery: MutableStridedView, dKey: MutableStridedView, dValue: MutableStridedView,
                          keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws {
        try withCheckedGradientCall(query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                                    outputGradient: outputGradient, dQuery: dQuery, dKey: dKey, dValue: dValue,
                                    keyLengths: keyLengths, workspace: workspace, threads: threads,
                                    scale: scale) { shape, scale in
            backward(shape: shape, scale: scale, threads: try threadCount(threads), keyLengths: keyLengths,
                     q: query.kernel, k: key.kernel, v: value.kernel, o: output.kernel, lse: logSumExp.kernel,
                     dO: outputGradient.kernel, dQ: dQuery.kernel, dK: dKey.kernel, dV: dValue.kernel,
                     parameters: nil)
        }
    }

    /// `∂L/∂I` (and `∂L/∂W_K`, `∂L/∂W_V` with projections) through the call that gave
    /// `result`, with `dQ`, `dK`, `dV`, which the same pass computes.
    ///
    /// - Complexity: the backward's plus `4 · m · Dv · (D + Dv)` FLOPs per head and batch
    ///   item with projections; sums over batch items in order (bitwise identical for every
    ///   thread count).
    public func parameterGradients(query: Tensor, key: Tensor, value: Tensor, result: AttentionResult,
                                   outputGradient: Tensor, keyLengths: [Int]? = nil, threads: Int? = nil)
        throws -> (inputs: AttentionGradients, parameters: InducedSetParameterGradients) {
        var dPoints = [Float](repeating: 0, count: inducingPoints.count)
        var dwk = [Float](repeating: 0, count: keyProjection?.count ?? 0)
        var dwv = [Float](repeating: 0, count: valueProjection?.count ?? 0)
        let inputs = try withParameterGradientCall(query: query, key: key, value: value, result: result,
                                                   outputGradient: outputGradient, keyLengths: keyLengths,
                                                   threads: threads, scale: scale) { c in
            dPoints.withUnsafeMutableBufferPointer { dPoints in
            dwk.withUnsafeMutableBufferPointer { dwk in dwv.withUnsafeMutableBufferPointer { dwv in
                backward(shape: c.shape, scale: c.scale, threads: c.threads, keyLengths: keyLengths, q: c.q, k: c.k,
                         v: c.v, o: c.o, lse: c.lse, dO: c.dO, dQ: c.dQ, dK: c.dK, dV: c.dV,
                         parameters: (dPoints.baseAddress!, dwk.baseAddress, dwv.baseAddress))
            } } }
        }
        return (inputs, InducedSetParameterGradients(inducingPoints: dPoints,
                                                     keyProjection: keyProjection == nil ? nil : dwk,
                                                     valueProjection: valueProjection == nil ? nil : dwv))
    }

    public func backwardCost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        let forward = try cost(shape, threads: threads)
        let threads = try threadCount(threads)
        let m = inducingCount, (d, dv) = (shape.headDim, shape.valueDim)
        let first = PointAttention.cost(count: m, shape: shape, threads: threads)
        let secondFlops = 2 * Double(shape.batch * shape.heads * shape.queryLength * m) * Double(d + dv)
        let projections = keyProjection == nil ? 0 : 2 * Double(shape.batch * heads * m * dv * (d + dv))
        let buffer = { (width: Int) in roundUp(shape.batch * heads * m * width * 4, WorkspaceCarver.alignment) }
        // Z, its log-sum-exp, dK2, dV2, the points' per-item gradient; K2, V2, dZ with projections.
        let buffers = buffer(dv) + buffer(1) + buffer(d) + buffer(dv) + buffer(d)
            + (keyProjection == nil ? 0 : buffer(d) + 2 * buffer(dv))
        let gemmWorkers = keyProjection == nil ? 0 : workerCount(threads: threads, items: 2 * shape.batch * heads)
        let kernels = max(first.workspaceBytes,
                          TiledSoftmaxBackward.workspaceBytes(shape: summaryShape(shape), threads: threads),
                          PointAttention.backwardWorkspaceBytes(count: m, shape: shape, threads: threads))
        return AttentionCost(
            // Recomputed: the first attention and the projections; then both backwards and dZ.
            flops: first.flops + projections + 2.5 * (first.flops + secondFlops) + projections,
            workspaceBytes: buffers + gemmWorkers * Gemm.Workspace.byteCount() + kernels,
            scoredPairs: forward.scoredPairs)
    }

    private func backward(shape: AttentionShape, scale: Float, threads: Int, keyLengths: [Int]?,
                          q: TensorView, k: TensorView, v: TensorView, o: TensorView, lse: TensorView,
                          dO: TensorView, dQ: MutableTensorView, dK: MutableTensorView, dV: MutableTensorView,
                          parameters: (points: UnsafeMutablePointer<Float>, wk: UnsafeMutablePointer<Float>?,
                                       wv: UnsafeMutablePointer<Float>?)?) {
        let m = inducingCount, (d, dv) = (shape.headDim, shape.valueDim)
        let summary = summaryShape(shape)
        withScratchTensor(SIMD4(shape.batch, heads, m, dv)) { z in
        withScratchTensor(SIMD4(shape.batch, heads, m, 1)) { zLSE in
        withScratchTensor(SIMD4(shape.batch, heads, m, d)) { dk2 in
        withScratchTensor(SIMD4(shape.batch, heads, m, dv)) { dv2 in
        withScratchTensor(SIMD4(shape.batch, heads, m, d), zeroed: true) { dPoints in
            // The forward's summary again (its output is not kept).
            PointAttention.run(points: inducingPoints, count: m, shape: shape, scale: scale, threads: threads,
                               keyLengths: keyLengths, k: k, v: v, o: z, lse: zLSE)
            func summaryBackward(_ keys: TensorView, _ values: TensorView) {
                TiledSoftmaxBackward.run(shape: summary, scale: scale, threads: threads, q: q, k: keys, v: values,
                                         o: o, lse: lse, dO: dO, dQ: dQ, dK: dk2, dV: dv2) { b, _ in
                    IntervalMask(queryLength: shape.queryLength, keyLength: m, causal: false,
                                 keyEnd: (keyLengths?[b] ?? shape.keyLength) == 0 ? 0 : m)
                }
            }
            func pointsBackward(_ dz: TensorView) {
                PointAttention.backward(points: inducingPoints, count: m, shape: shape, scale: scale, threads: threads,
                                        keyLengths: keyLengths, k: k, v: v, o: z.readOnly, lse: zLSE.readOnly,
                                        dO: dz, dPoints: dPoints, dK: dK, dV: dV)
            }
            if let wk = keyProjection, let wv = valueProjection {
                withScratchTensor(SIMD4(shape.batch, heads, m, d)) { kOut in
                withScratchTensor(SIMD4(shape.batch, heads, m, dv)) { vOut in
                withScratchTensor(SIMD4(shape.batch, heads, m, dv)) { dz in
                    project(z.readOnly, shape: shape, threads: threads, wk: wk, wv: wv, kOut: kOut, vOut: vOut)
                    summaryBackward(kOut.readOnly, vOut.readOnly)
                    projectGradients(z: z.readOnly, dk2: dk2.readOnly, dv2: dv2.readOnly, shape: shape,
                                     threads: threads, wk: wk, wv: wv, dz: dz,
                                     parameters: parameters.flatMap { p in p.wk.flatMap { wk in p.wv.map { (wk, $0) } } })
                    pointsBackward(dz.readOnly)
                } } }
            } else {
                summaryBackward(z.readOnly, z.readOnly)
                // Z is both the keys and the values: dZ = dK2 + dV2 (into dV2; Dv = D).
                let count = shape.batch * heads * m * dv
                let sum = dv2.row(0, 0, 0), keys = dk2.readOnly.row(0, 0, 0)
                for n in 0..<count { sum[n] += keys[n] }
                pointsBackward(dv2.readOnly)
            }
            if let parameters {
                PointAttention.sumOverBatch(dPoints.readOnly, shape: summary, count: m, into: parameters.points)
            }
        } } } } }
    }

    /// `dZ = dK2 W_K[h]ᵀ + dV2 W_V[h]ᵀ` per (batch item, head) on the GEMM, and with
    /// `parameters` `∂L/∂W_K[h] += Zᵀ dK2`, `∂L/∂W_V[h] += Zᵀ dV2` per head, batch items in
    /// order.
    private func projectGradients(z: TensorView, dk2: TensorView, dv2: TensorView, shape: AttentionShape,
                                  threads: Int, wk: [Float], wv: [Float], dz: MutableTensorView,
                                  parameters: (wk: UnsafeMutablePointer<Float>, wv: UnsafeMutablePointer<Float>)?) {
        let m = inducingCount, (d, dv) = (shape.headDim, shape.valueDim)
        let items = shape.batch * heads
        let workers = workerCount(threads: threads, items: items)
        WorkspaceArena.withWorkspaces(workers: workers, layout: { Gemm.Workspace(carving: &$0) }) { spaces in
        wk.withUnsafeBufferPointer { wk in wv.withUnsafeBufferPointer { wv in
            let wk = UncheckedSendable(wk.baseAddress!), wv = UncheckedSendable(wv.baseAddress!)
            parallelForEach(items: items, threads: workers) { item, worker in
                let b = item / heads, h = item % heads
                // W_K[h] is [Dv, D], W_V[h] is [Dv, Dv]: their transposes read in place.
                Gemm.multiply(m: m, n: dv, depth: d,
                              a: MatrixOperand(base: dk2.row(b, h, 0), rowStride: d, columnStride: 1),
                              b: .matrix(MatrixOperand(base: wk.value + h * dv * d, rowStride: 1, columnStride: d)),
                              c: dz.row(b, h, 0), ldc: dv, workspace: spaces[worker])
                Gemm.multiply(m: m, n: dv, depth: dv,
                              a: MatrixOperand(base: dv2.row(b, h, 0), rowStride: dv, columnStride: 1),
                              b: .matrix(MatrixOperand(base: wv.value + h * dv * dv, rowStride: 1, columnStride: dv)),
                              c: dz.row(b, h, 0), ldc: dv, accumulate: true, workspace: spaces[worker])
            }
            guard let parameters else { return }
            let targets = UncheckedSendable(parameters)
            parallelForEach(items: heads, threads: min(workers, heads)) { h, worker in
                for b in 0..<shape.batch {
                    for isValue in [false, true] {
                        let gradient = isValue ? dv2 : dk2, width = isValue ? dv : d
                        Gemm.multiply(m: dv, n: width, depth: m,
                                      a: MatrixOperand(base: z.row(b, h, 0), rowStride: 1, columnStride: dv),
                                      b: .matrix(MatrixOperand(base: gradient.row(b, h, 0), rowStride: width,
                                                               columnStride: 1)),
                                      c: (isValue ? targets.value.wv : targets.value.wk) + h * dv * width, ldc: width,
                                      accumulate: true, workspace: spaces[worker])
                    }
                }
            }
        } }
        }
    }
}
