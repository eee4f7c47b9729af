/// Pooling by multihead attention (PMA, Lee et al. 2019, Set Transformer): `k` learned
/// seed vectors per head attend over the set, giving `k` outputs per head whatever the
/// set's size.
///
/// ```
/// // naive reference (what this computes), for each b, h, r < k (hk = h / (H / Hkv)):
/// let L = keyLengths?[b] ?? Nk
/// o[b, h, r] = Σ_{j < L} softmax_j(scale · S[h, r] · k[b, hk, j]) · v[b, hk, j]
/// lse[b, h, r] = log Σ_{j < L} exp(scale · S[h, r] · k[b, hk, j])
/// ```
/// The seeds are the queries: through the ``Attention`` protocol the query tensor must be
/// `[B, H, k, D]` (its values are not read; the output is `[B, H, k, Dv]`), and
/// ``pool(key:value:keyLengths:threads:)`` does the same without one. A batch item
/// without keys gives rows 0 with `lse = -infinity`. Not causal.
///
/// One run of the tiled softmax kernel with the seeds as a query view of batch stride 0
/// (``PointAttention``). (KernelDocs/SetTransformer.md.)
///
/// - Complexity: `2 · k · Nk · (D + Dv)` FLOPs per head: linear in the set size.
///   Workspace: the kernel's tiles per thread.
public struct AttentionPooling: KernelWidening {
    public let heads: Int
    public let headDim: Int
    /// `k`, seeds per head.
    public let seedCount: Int
    /// `S [H, k, D]` row-major.
    public let seeds: [Float]
    /// Must stay false: a thrown error.
    public var causal: Bool
    /// Score scale; `nil` means `1 / sqrt(D)`. Must be finite.
    public var scale: Float?

    /// Given seeds `[H, k, D]`.
    public init(heads: Int, headDim: Int, seeds: [Float], causal: Bool = false, scale: Float? = nil) throws {
        try PointAttention.checkPoints(seeds, heads: heads, headDim: headDim, option: "seeds",
                                       variant: "attention pooling")
        self.heads = heads
        self.headDim = headDim
        self.seedCount = seeds.count / (heads * headDim)
        self.seeds = seeds
        self.causal = causal
        self.scale = scale
    }

    /// `seedCount` seeds drawn from `N(0, 1)` with a seeded generator.
    public init(heads: Int, headDim: Int, seedCount: Int = 1, seed: UInt64 = 0,
                causal: Bool = false, scale: Float? = nil) throws {
        let seeds = try PointAttention.seededPoints(heads: heads, count: seedCount, headDim: headDim, seed: seed,
                                                    option: "seeds", variant: "attention pooling")
        try self.init(heads: heads, headDim: headDim, seeds: seeds, causal: causal, scale: scale)
    }

    public var name: String { "pma" }

    public func validate(_ shape: AttentionShape) throws {
        let variant = "attention pooling"
        try PointAttention.checkProblem(shape, heads: heads, headDim: headDim, causal: causal, scale: scale,
                                        variant: variant)
        guard shape.queryLength == seedCount else {
            throw AttentionError.shapeMismatch(
                "\(variant): the queries are the \(seedCount) seeds, so queryLength must be \(seedCount), got \(shape.queryLength)")
        }
    }

    public func cost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        try validate(shape)
        return PointAttention.cost(count: seedCount, shape: shape, threads: try threadCount(threads))
    }

    /// 16-bit keys and values are widened as the tiled kernel packs them (the seeds are the
    /// queries); its one pass writes the output rows.
    func stagedOperands(_ shape: AttentionShape) -> (query: Bool, output: Bool) { (false, false) }

    public func attend(query: ActivationView, key: ActivationView, value: ActivationView,
                       output: MutableActivationView, logSumExp: MutableStridedView?,
                       keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws {
        try withCheckedCall(query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                            keyLengths: keyLengths, workspace: workspace, threads: threads, scale: scale) { call in
            PointAttention.run(points: seeds, count: seedCount, shape: call.shape, scale: call.scale,
                               threads: call.threadCount, keyLengths: keyLengths, k: call.k, v: call.v,
                               o: call.o, lse: call.lse)
        }
    }

    /// The seeds attending over `key` `[B, Hkv, Nk, D]` and `value` `[B, Hkv, Nk, Dv]`:
    /// output `[B, H, k, Dv]`.
    public func pool(key: Tensor, value: Tensor, keyLengths: [Int]? = nil, threads: Int? = nil) throws -> AttentionResult {
        guard key.shape.count == 4, value.shape.count == 4 else {
            throw AttentionError.shapeMismatch("attention pooling: key and value must be [B, Hkv, Nk, ·]")
        }
        let shape = AttentionShape(batch: key.shape[0], heads: heads, kvHeads: key.shape[1], queryLength: seedCount,
                                   keyLength: key.shape[2], headDim: key.shape[3], valueDim: value.shape[3])
        guard value.shape[0] == shape.batch, value.shape[1] == shape.kvHeads, value.shape[2] == shape.keyLength else {
            throw AttentionError.shapeMismatch("attention pooling: key \(key.shape) and value \(value.shape) disagree")
        }
        try validate(shape)
        try checkCallArguments(shape, keyLengths: keyLengths, threads: threads)
        return try pool(shape: shape, scale: scale ?? 1 / Float(headDim).squareRoot(), key: key, value: value,
                        keyLengths: keyLengths, threads: threads)
    }

    private func pool(shape: AttentionShape, scale: Float, key: Tensor, value: Tensor, keyLengths: [Int]?,
                      threads: Int?) throws -> AttentionResult {
        var output = try Tensor.uninitializedOutput(shape: [shape.batch, heads, seedCount, shape.valueDim])
        var lse = try Tensor.uninitializedOutput(shape: [shape.batch, heads, seedCount, 1])
        let threads = try threadCount(threads)
        key.withView { k in value.withView { v in output.withMutableView { o in lse.withMutableView { l in
            PointAttention.run(points: seeds, count: seedCount, shape: shape, scale: scale, threads: threads,
                               keyLengths: keyLengths, k: k, v: v, o: o, lse: l)
        } } } }
        return try AttentionResult(output: output, logSumExp: lse)
    }
}

extension AttentionPooling: KernelWideningBackward {
    /// One pass of the tiled backward with the seeds as queries: it widens 16-bit keys,
    /// values, outputs and `dO` as it packs them and writes `dK`, `dV` rows (rounded once
    /// when 16-bit); `dQuery` is 0.
    func tiledBackward(_ call: TiledBackwardCall) throws {
        backward(shape: call.shape, scale: call.scale, threads: call.threads, keyLengths: call.keyLengths,
                 k: call.k, v: call.v, o: call.o, lse: call.lse, dO: call.dO, dK: call.dK, dV: call.dV, seeds: nil)
    }

    func addsKeyGradients(_ shape: AttentionShape) throws -> Bool { false }

    /// The dense backward (``TiledSoftmaxBackward``) of the seeds over the keys
    /// (KernelDocs/SetTransformer.md, "Backward"): one attention, whose output and
    /// log-sum-exp are the forward's, so nothing is recomputed. The query tensor's values
    /// are not read by the forward, so `dQuery` is all zeros; the seeds' gradient comes from
    /// ``parameterGradients(query:key:value:result:outputGradient:keyLengths:threads:)``.
    ///
    /// ```
    /// // naive reference, for each b, h, r < k (hk = h / (H / Hkv)), L = keyLengths?[b] ?? Nk:
    /// P[j] = exp(scale · dot(S[h, r], k[b, hk, j]) − lse[b, h, r]),  dS[j] = P[j] · (dO·v[j] − dO·o)   j < L
    /// dK[b, hk, j] += scale · dS[j] S[h, r],   dV[b, hk, j] += P[j] dO[b, h, r]
    /// ∂L/∂S[h, r] = Σ_b scale · Σ_j dS[j] k[b, hk, j],   dQuery = 0
    /// ```
    /// A batch item without keys gets zero gradients. Bitwise identical for every thread
    /// count (the seeds' per-item gradients summed over batch items in order).
    ///
    /// - Complexity: `2.5 ×` the forward's FLOPs; workspace: the kernel's tiles per thread
    ///   and the seeds' per-item gradient (`4 · B · H · k · D` bytes), independent of `Nk`.
    public func gradients(query: StridedView, key: StridedView, value: StridedView, output: StridedView,
                          logSumExp: StridedView, outputGradient: StridedView,
                          dQuery: MutableStridedView, dKey: MutableStridedView, dValue: MutableStridedView,
                          keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws {
        try withCheckedGradientCall(query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                                    outputGradient: outputGradient, dQuery: dQuery, dKey: dKey, dValue: dValue,
                                    keyLengths: keyLengths, workspace: workspace, threads: threads,
                                    scale: scale) { shape, scale in
            backward(shape: shape, scale: scale, threads: try threadCount(threads), keyLengths: keyLengths,
                     k: key.kernel, v: value.kernel, o: output.kernel, lse: logSumExp.kernel,
                     dO: outputGradient.kernel, dK: dKey.kernel, dV: dValue.kernel, seeds: nil)
        }
    }

    /// `∂L/∂S` (shaped like ``seeds``, `[H, k, D]`) through the call that gave `result`,
    /// with `dQ` (zeros), `dK`, `dV`, which the same pass computes.
    ///
    /// - Complexity: the backward's plus `B · H · k · D` additions.
    public func parameterGradients(query: Tensor, key: Tensor, value: Tensor, result: AttentionResult,
                                   outputGradient: Tensor, keyLengths: [Int]? = nil, threads: Int? = nil)
        throws -> (inputs: AttentionGradients, seeds: [Float]) {
        var dSeeds = [Float](repeating: 0, count: seeds.count)
        let inputs = try withParameterGradientCall(query: query, key: key, value: value, result: result,
                                                   outputGradient: outputGradient, keyLengths: keyLengths,
                                                   threads: threads, scale: scale) { c in
            dSeeds.withUnsafeMutableBufferPointer { dSeeds in
                backward(shape: c.shape, scale: c.scale, threads: c.threads, keyLengths: keyLengths, k: c.k, v: c.v,
                         o: c.o, lse: c.lse, dO: c.dO, dK: c.dK, dV: c.dV, seeds: dSeeds.baseAddress!)
            }
        }
        return (inputs, dSeeds)
    }

    public func backwardCost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        let forward = try cost(shape, threads: threads)
        let perItem = roundUp(shape.batch * heads * seedCount * shape.headDim * 4, WorkspaceCarver.alignment)
        return AttentionCost(
            flops: 2.5 * forward.flops,
            workspaceBytes: perItem + PointAttention.backwardWorkspaceBytes(count: seedCount, shape: shape,
                                                                            threads: try threadCount(threads)),
            scoredPairs: forward.scoredPairs)
    }

    private func backward(shape: AttentionShape, scale: Float, threads: Int, keyLengths: [Int]?,
                          k: TensorView, v: TensorView, o: TensorView, lse: TensorView, dO: TensorView,
                          dK: MutableTensorView, dV: MutableTensorView, seeds gradient: UnsafeMutablePointer<Float>?) {
        withScratchTensor(SIMD4(shape.batch, heads, seedCount, shape.headDim), zeroed: true) { perItem in
            PointAttention.backward(points: seeds, count: seedCount, shape: shape, scale: scale, threads: threads,
                                    keyLengths: keyLengths, k: k, v: v, o: o, lse: lse, dO: dO,
                                    dPoints: perItem, dK: dK, dV: dV)
            if let gradient {
                PointAttention.sumOverBatch(perItem.readOnly, shape: shape, count: seedCount, into: gradient)
            }
        }
    }
}
