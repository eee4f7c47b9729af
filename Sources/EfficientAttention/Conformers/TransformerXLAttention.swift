/// Transformer-XL attention (Dai et al. 2019): a segment attends causally over
/// `[memory ; segment]` with relative-position scores.
///
/// ```
/// // naive reference (what this computes), for each b, h, i, with M = Nk − Nq memory keys
/// // in front of the segment's keys (key/value head hk = h / (H / Hkv)):
/// Δ = i + M − j                                         // distance; visible iff 0 ≤ Δ
/// s[j] = scale · (dot(q[b,h,i], k[b,hk,j]) + dot(q[b,h,i], r[h,Δ])
///                 + dot(u[h], k[b,hk,j]) + dot(v[h], r[h,Δ]))
/// o[b, h, i] = Σ_j softmax(s)[j] · v[b, hk, j],   lse[b, h, i] = log Σ_j exp(s[j])
/// ```
/// `r` is the relative-position table `[1, H, T, D]` (or `[1, 1, T, D]`, shared by every
/// head): row `Δ` is the projected sinusoid `W_R R_Δ` (``sinusoidTable(length:projection:)``
/// builds it) or any table the caller supplies. `u` and `v` (``contentBias``,
/// ``positionBias``) are the global content and position biases, `H × D` each.
///
/// Two ways to call it:
/// - statefully, ``attend(query:key:value:memory:threads:)``: the caller owns a
///   ``TransformerXLMemory`` (a value: copy it to branch, ``TransformerXLMemory/reset()``
///   to start over); each call attends over that memory and the segment, then the memory
///   keeps the last `M` positions. The conformer itself stays an immutable, `Sendable`
///   value, as the ``Attention`` protocol expects.
/// - statelessly, through ``Attention``: `key` and `value` are `[memory ; segment]`
///   already concatenated (`Nk = M′ + Nq` with `0 ≤ M′ ≤ memoryLength`), as the benchmark
///   does.
///
/// Runs on the shared tiled softmax kernel (KernelDocs/TransformerXL.md): the content
/// scores are the kernel's `Sᵀ = K Qᵀ`; the position term is added to each score tile by
/// a small product of the tile's queries with the band of relative rows it needs, then a
/// diagonal shift. No `Nq × Nk` array is ever formed.
///
/// - Complexity: `2 · pairs · (2·D + Dv)` useful FLOPs with
///   `pairs = Nq · M′ + Nq (Nq + 1) / 2` per head (the position band reuses the rows
///   consecutive key tiles share, so it costs about one relative row per key, like
///   `K Qᵀ`); workspace: the dense kernel's per thread plus the band buffers
///   (`(Br/32) · 96 · 32` floats per thread) and `(B·H + H) · Nk` floats of biases (and
///   the concatenated keys and values in the stateful call).
public struct TransformerXLAttention: KernelWidening, ModifiableAttention, Equatable {
    /// `M`: how many past positions the memory keeps.
    public var memoryLength: Int
    /// The relative-position table `[1, H or 1, T, D]`, `T ≥ M + Nq`.
    public var relativePositions: Tensor
    /// `u`, `H × D` row-major: the content bias.
    public var contentBias: [Float]
    /// `v`, `H × D` row-major: the position bias.
    public var positionBias: [Float]
    /// Score scale; `nil` means `1 / sqrt(D)`. Must be finite.
    public var scale: Float?
    /// Soft-capping, ALiBi, an additive bias and sinks (``ScoreModifiers``), applied to the
    /// whole score (content and relative terms) over the keys `[memory ; segment]`; none by
    /// default. In the stateful call the bias is `[B or 1, H or 1, Nq, M′ + Nq]` with `M′`
    /// the memory's stored length before the call.
    public var modifiers = ScoreModifiers()

    public init(memoryLength: Int, relativePositions: Tensor, contentBias: [Float], positionBias: [Float],
                scale: Float? = nil) {
        self.memoryLength = memoryLength
        self.relativePositions = relativePositions
        self.contentBias = contentBias
        self.positionBias = positionBias
        self.scale = scale
    }

    /// A configuration with seeded random parameters, for experiments and benchmarks:
    /// `u`, `v` with N(0, 1/D) entries, and a table of `memoryLength + maxSegmentLength`
    /// rows built by ``sinusoidTable(length:projection:)`` from a `D × E` projection per
    /// head with N(0, 1/D) entries, `E = D` (`D + 1` for odd `D`: the sinusoids come in
    /// sine/cosine pairs, so their dimension is even).
    public init(heads: Int, headDim: Int, memoryLength: Int, maxSegmentLength: Int, seed: UInt64,
                scale: Float? = nil) throws {
        guard heads >= 1, headDim >= 1 else {
            throw AttentionError.invalidShape("heads and headDim must be at least 1, got \(heads) and \(headDim)")
        }
        guard memoryLength >= 0, maxSegmentLength >= 1 else {
            throw AttentionError.invalidParameter(
                "memoryLength must be at least 0 and maxSegmentLength at least 1, got \(memoryLength) and \(maxSegmentLength)")
        }
        try checkLimit(memoryLength, "memoryLength", variant: "Transformer-XL attention")
        try checkLimit(maxSegmentLength, "maxSegmentLength", variant: "Transformer-XL attention")
        try checkLimit(headDim, "headDim", variant: "Transformer-XL attention")
        let e = headDim + headDim % 2
        try checkFloatAllocation(heads, headDim, e, option: "Transformer-XL projection [1, heads, headDim, headDim]")
        try checkFloatAllocation(heads, memoryLength + maxSegmentLength, headDim,
                                 option: "Transformer-XL relative table [1, heads, memoryLength + maxSegmentLength, headDim]")
        try checkFloatAllocation(memoryLength + maxSegmentLength, e,
                                 option: "Transformer-XL sinusoids [memoryLength + maxSegmentLength, headDim]")
        var rng = SeededGenerator(seed: seed)
        let deviation = 1 / Double(headDim).squareRoot()
        func gaussians(_ count: Int) -> [Float] { (0..<count).map { _ in Float(rng.nextGaussian() * deviation) } }
        let u = gaussians(heads * headDim), v = gaussians(heads * headDim)
        let projection = try Tensor(shape: [1, heads, headDim, e], data: gaussians(heads * headDim * e))
        self.init(memoryLength: memoryLength,
                  relativePositions: try TransformerXLAttention.sinusoidTable(
                    length: memoryLength + maxSegmentLength, projection: projection),
                  contentBias: u, positionBias: v, scale: scale)
    }

    public var name: String { "transformer-xl" }

    /// The relative-position table `r[h, Δ] = W_R[h] · R_Δ` for `Δ < length`, as a
    /// `[1, H, length, D]` tensor, from a projection `W_R` of shape `[1, H, D, E]` and the
    /// sinusoids of Transformer-XL's code: `R_Δ = [sin(Δ·f_0) … sin(Δ·f_{E/2−1}),
    /// cos(Δ·f_0) … cos(Δ·f_{E/2−1})]` with `f_t = 10000^(−2t/E)` (`E` even).
    ///
    /// - Complexity: `O(H · length · D · E)`.
    public static func sinusoidTable(length: Int, projection: Tensor) throws -> Tensor {
        let (heads, d, e) = (projection.shape[1], projection.shape[2], projection.shape[3])
        guard projection.shape[0] == 1, e >= 2, e % 2 == 0 else {
            throw AttentionError.invalidShape(
                "projection must be [1, H, D, E] with an even sinusoid dimension E >= 2, got \(projection.shape)")
        }
        guard length >= 1 else {
            throw AttentionError.invalidParameter("relative table length must be at least 1, got \(length)")
        }
        try checkLimit(length, "relative table length", variant: "Transformer-XL attention")
        try checkFloatAllocation(length, e, option: "sinusoids [length, E]")
        try checkFloatAllocation(heads, length, d, option: "relative table [1, H, length, D]")
        let table = projection.elements.withUnsafeBufferPointer { w in
            RelativePositionBias.projectedSinusoids(length: length, heads: heads, headDim: d, sinusoidDim: e,
                                                    projection: w.baseAddress!)
        }
        return try Tensor(shape: [1, heads, length, d], data: table)
    }

    /// Throws unless the configuration fits `shape` (without the memory-length rule).
    func validateConfiguration(_ shape: AttentionShape) throws {
        try shape.check()
        try shape.checkHeadDims(limit: DenseAttention.maxHeadDim, variant: "Transformer-XL attention")
        try checkScale(scale)
        guard memoryLength >= 0 else {
            throw AttentionError.invalidParameter("memoryLength must be at least 0, got \(memoryLength)")
        }
        try checkLimit(memoryLength, "memoryLength", variant: "Transformer-XL attention")
        // The biases `keyBias` [B, H, Nk] and `distanceBias` [H, Nk] of a call.
        try checkFloatAllocation(shape.batch + 1, shape.heads, memoryLength + shape.queryLength,
                                 option: "Transformer-XL biases [B + 1, H, memoryLength + Nq]")
        let table = relativePositions.shape
        guard table[0] == 1, table[1] == shape.heads || table[1] == 1, table[3] == shape.headDim else {
            throw AttentionError.shapeMismatch(
                "relativePositions must be [1, H or 1, T, D] = [1, \(shape.heads), T, \(shape.headDim)], got \(table)")
        }
        let needed = memoryLength + shape.queryLength
        guard table[2] >= needed else {
            throw AttentionError.invalidParameter(
                "relativePositions has \(table[2]) rows (distances), too short for memoryLength + Nq = "
                + "\(memoryLength) + \(shape.queryLength) = \(needed)")
        }
        for (label, bias) in [("contentBias (u)", contentBias), ("positionBias (v)", positionBias)]
        where bias.count != shape.heads * shape.headDim {
            throw AttentionError.invalidParameter(
                "\(label) has \(bias.count) values, expected H · D = \(shape.heads) · \(shape.headDim)")
        }
    }

    /// Throws unless `shape` is `Nk = M′ + Nq` keys with `0 ≤ M′ ≤ memoryLength` and the
    /// table, biases and scale fit it.
    public func validate(_ shape: AttentionShape) throws {
        try validateConfiguration(shape)
        let memory = shape.keyLength - shape.queryLength
        guard memory >= 0, memory <= memoryLength else {
            throw AttentionError.shapeMismatch(
                "memory length mismatch: keyLength \(shape.keyLength) = memory + segment needs a memory of "
                + "0...\(memoryLength) (memoryLength) positions before the \(shape.queryLength) queries, got \(memory)")
        }
    }

    public func cost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        let threads = try threadCount(threads)
        try validate(shape)
        let memory = shape.keyLength - shape.queryLength
        let n = shape.queryLength
        let pairs = shape.batch * shape.heads * (n * memory + n * (n + 1) / 2)
        return AttentionCost(flops: 2 * Double(pairs) * Double(2 * shape.headDim + shape.valueDim),
                             workspaceBytes: workspaceBytes(shape, threads: threads),
                             scoredPairs: pairs)
    }

    /// One pass, queries widened as they are packed: nothing is staged.
    func stagedOperands(_ shape: AttentionShape) -> (query: Bool, output: Bool) { (false, false) }

    func workspaceBytes(_ shape: AttentionShape, threads: Int?) -> Int {
        TiledSoftmaxAttention.workspaceBytes(shape: shape, threads: threads, mask: RelativePositionMask.self)
            + roundUp(4 * shape.batch * shape.heads * shape.keyLength, WorkspaceCarver.alignment)
            + roundUp(4 * shape.heads * shape.keyLength, WorkspaceCarver.alignment)
    }

    /// Attention of a segment over memory already prepended to its keys: `key` and
    /// `value` hold `M′ = Nk − Nq` memory positions followed by the `Nq` segment positions.
    /// `keyLengths` pads keys at the end, as for dense attention.
    ///
    /// Float16 and BFloat16 operands are widened by the tiled kernel as it packs them (the
    /// relative terms read the packed, widened query tile; the content bias `u · k` reads
    /// each key row through ``TensorView/dot(row:_:row:count:)``); the one pass writes the
    /// output rows in their precision.
    public func attend(query: ActivationView, key: ActivationView, value: ActivationView,
                       output: MutableActivationView, logSumExp: MutableStridedView?,
                       keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws {
        try withCheckedCall(query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                            keyLengths: keyLengths, workspace: workspace, threads: threads, scale: scale,
                            modifiers: modifiers) { call in
            run(shape: call.shape, q: call.q, k: call.k, v: call.v, o: call.o, lse: call.lse, keyBegins: nil,
                keyLengths: keyLengths, threads: call.threadCount, modifiers: call.modifiers)
        }
    }

    /// Attends the segment (`query`, `key`, `value` of `Nq` positions each) over
    /// `memory` and the segment with the causal rule, then moves the last `M` positions
    /// of `[memory ; segment]` into `memory`. Each batch item has its own memory
    /// contents and fill level (see ``TransformerXLMemory``).
    ///
    /// - Complexity: the attention as above with `M′ ≤ M` memory positions, plus
    ///   `O(B · Hkv · (M′ + Nq) · (D + Dv))` to concatenate and to update the memory.
    public func attend(query: Tensor, key: Tensor, value: Tensor,
                       memory: inout TransformerXLMemory, threads: Int? = nil) throws -> AttentionResult {
        let segment = try Self.segmentShape(query: query, key: key, value: value, validate: validateConfiguration)
        guard memory.capacity == memoryLength else {
            throw AttentionError.shapeMismatch(
                "memory length mismatch: the memory holds up to \(memory.capacity) positions, memoryLength is \(memoryLength)")
        }
        try Self.checkMemoryDimensions(segment, batch: memory.batch, kvHeads: memory.kvHeads, headDim: memory.headDim,
                                       valueDim: memory.valueDim, threads: threads)
        let stored = memory.storedLength
        let allKeys = try memory.keys.appendingPositions(of: key)
        let allValues = try memory.values.appendingPositions(of: value)
        var shape = segment
        shape.keyLength = stored + segment.queryLength
        let keyBegins = memory.lengths.map { stored - $0 }
        let result = try run(shape: shape, query: query, key: allKeys, value: allValues, keyBegins: keyBegins,
                             keyLengths: nil, threads: threads, modifiers: modifiers)
        memory.keep(keys: allKeys, values: allValues, added: segment.queryLength)
        return result
    }

    /// The shape of a stateful segment call (keys and values as long as the queries),
    /// checked by `validate` (the conformer's configuration against it).
    static func segmentShape(query: Tensor, key: Tensor, value: Tensor,
                             validate: (AttentionShape) throws -> Void) throws -> AttentionShape {
        let segment = try AttentionShape(query: query, key: key, value: value)
        guard segment.keyLength == segment.queryLength else {
            throw AttentionError.shapeMismatch(
                "the segment's keys and values must have its query length \(segment.queryLength), got \(segment.keyLength)")
        }
        try validate(segment)
        return segment
    }

    /// Throws unless a memory of these dimensions fits the segment, and checks `threads`.
    static func checkMemoryDimensions(_ segment: AttentionShape, batch: Int, kvHeads: Int, headDim: Int, valueDim: Int,
                               threads: Int?) throws {
        guard batch == segment.batch, kvHeads == segment.kvHeads, headDim == segment.headDim,
              valueDim == segment.valueDim else {
            throw AttentionError.shapeMismatch(
                "memory is [B, Hkv, M, D/Dv] = [\(batch), \(kvHeads), M, \(headDim)/\(valueDim)], "
                + "the segment's keys and values are [\(segment.batch), \(segment.kvHeads), N, \(segment.headDim)/\(segment.valueDim)]")
        }
        try checkCallArguments(segment, keyLengths: nil, threads: threads)
    }

    /// The kernel call: biases, then the tiled softmax kernel with the relative-position mask
    /// and `modifiers` (checked against `shape` first; sinks applied to the finished rows).
    /// `keyBegins[b]` hides the keys before it (right-aligned memories shorter than the
    /// stored length). Internal: ``CompressiveTransformerAttention`` runs it over
    /// `[compressed ; memory ; segment]`.
    func run(shape: AttentionShape, query: Tensor, key: Tensor, value: Tensor, keyBegins: [Int]?,
             keyLengths: [Int]?, threads: Int?, modifiers: ScoreModifiers = ScoreModifiers()) throws -> AttentionResult {
        try modifiers.validate(shape)
        var output = try Tensor.uninitializedOutput(shape: [shape.batch, shape.heads, shape.queryLength, shape.valueDim])
        var lse = try Tensor.uninitializedOutput(shape: [shape.batch, shape.heads, shape.queryLength, 1])
        let workers = try threadCount(threads)
        try query.withView { q in try key.withView { k in try value.withView { v in
        try output.withMutableView { o in try lse.withMutableView { l in
            try modifiers.withKernelThenSinks(shape, o: o, lse: l, threads: workers) { kernel in
                run(shape: shape, q: q, k: k, v: v, o: o, lse: l, keyBegins: keyBegins, keyLengths: keyLengths,
                    threads: workers, modifiers: kernel)
            }
        } } } } }
        return try AttentionResult(output: output, logSumExp: lse)
    }

    /// ``run(shape:query:key:value:keyBegins:keyLengths:threads:)`` on views, into `o` and `lse`.
    func run(shape: AttentionShape, q: TensorView, k: TensorView, v: TensorView,
             o: MutableTensorView, lse: MutableTensorView, keyBegins: [Int]?, keyLengths: [Int]?, threads workers: Int,
             modifiers: ScoreModifierKernel? = nil) {
        withBiases(shape: shape, k: k, threads: workers) { scale, mask in
            TiledSoftmaxAttention.run(shape: shape, scale: scale, threads: workers,
                                      q: q, k: k, v: v, o: o, lse: lse, modifiers: modifiers) { b, h in
                mask(b, h, keyBegins?[b] ?? 0, keyLengths?[b] ?? shape.keyLength)
            }
        }
    }

    /// Runs `body` with the scale and the relative-position mask of (batch item, head,
    /// first visible key, key end), over the biases
    /// `keyBias[(b·H + h)·Nk + j] = scale·u_h·k_j` and `distanceBias[h·Nk + Δ] = scale·v_h·r_Δ`
    /// (`Δ < Nk`) in workspace scratch (part of the cost model's workspace).
    func withBiases(shape: AttentionShape, k: TensorView, threads workers: Int,
                    _ body: (_ scale: Float, _ mask: (Int, Int, Int, Int) -> RelativePositionMask) -> Void) {
        let scale = self.scale ?? 1 / Float(shape.headDim).squareRoot()
        let (nk, heads) = (shape.keyLength, shape.heads)
        let tableHeads = relativePositions.shape[1]
        withScratchTensor(SIMD4(1, shape.batch, heads, nk)) { keyBias in
        withScratchTensor(SIMD4(1, 1, heads, nk)) { distanceBias in
        relativePositions.withView { r in
            contentBias.withUnsafeBufferPointer { u in positionBias.withUnsafeBufferPointer { pv in
                RelativePositionBias.biases(shape: shape, scale: scale, threads: workers,
                                            contentBias: u.baseAddress!, positionBias: pv.baseAddress!,
                                            key: k, table: r, tableHeads: tableHeads,
                                            keyBias: keyBias.base, distanceBias: distanceBias.base)
            } }
            let (kb, db) = (UnsafePointer(keyBias.base), UnsafePointer(distanceBias.base))
            body(scale) { b, h, keyBegin, keyEnd in
                RelativePositionMask(
                    interval: IntervalMask(queryLength: shape.queryLength, keyLength: nk, causal: true, keyEnd: keyEnd),
                    keyBegin: keyBegin,
                    terms: RelativeScoreTerms(
                        table: r.row(0, tableHeads == 1 ? 0 : h, 0),
                        tableRowStride: r.strides[2], tableDepthStride: r.strides[3], tableRows: nk,
                        offset: nk - shape.queryLength,
                        keyBias: kb + (b * heads + h) * nk,
                        distanceBias: db + h * nk, owner: b * heads + h + 1))
            }
        }
        } }
    }
}

/// The gradients of a loss with respect to ``TransformerXLAttention``'s parameters (see
/// ``TransformerXLAttention/parameterGradients(query:key:value:result:outputGradient:keyLengths:threads:)``).
public struct TransformerXLParameterGradients: Sendable, Equatable {
    /// `∂L/∂r`, shaped like ``TransformerXLAttention/relativePositions`` (`[1, H or 1, T, D]`
    /// row-major; a shared table gets the sum over the heads). Rows `Δ ≥ Nk` are 0.
    public var relativePositions: [Float]
    /// `∂L/∂u`, `H × D` row-major.
    public var contentBias: [Float]
    /// `∂L/∂v`, `H × D` row-major.
    public var positionBias: [Float]
}

extension TransformerXLAttention: KernelWideningBackward {
    /// The flash-style backward of the tiled kernel (KernelDocs/TransformerXL.md, "Backward")
    /// through the stateless call (`key`, `value` = `[memory ; segment]`: the memory rows get
    /// their gradients too). Each tile's scores are recomputed as in the forward (content
    /// scores, the relative band, the biases, the causal mask); the relative-position mask
    /// takes each tile's `dS` and adds `Σ_j dS_ij r_Δ` to the tile's `dQ` part, and keeps
    /// per key `Σ_i dS_ij` (then `dK_j += u_h Σ_i dS_ij`). No `Nq × Nk` buffer; bitwise
    /// identical for every thread count. The parameters' gradients come from
    /// ``parameterGradients(query:key:value:result:outputGradient:keyLengths:threads:)``.
    ///
    /// ```
    /// // naive reference, for each b, h, i (hk = h / (H / Hkv), M = Nk − Nq, Δ = i + M − j):
    /// s[j]  = scale · (dot(q[i], k[j]) + dot(q[i], r[h,Δ]) + dot(u[h], k[j]) + dot(v[h], r[h,Δ]))   0 ≤ Δ
    /// P[j]  = exp(s[j] − lse[b,h,i]),  dS[j] = scale · P[j] · (dot(dO[i], v[j]) − dot(dO[i], o[i]))
    /// dQ[b,h,i]   = Σ_j dS[j] · (k[b,hk,j] + r[h,Δ])
    /// dK[b,hk,j] += dS[j] · (q[b,h,i] + u[h]),   dV[b,hk,j] += P[j] · dO[b,h,i]
    /// ∂r[h,Δ] += dS[j] · (q[b,h,i] + v[h]),  ∂u[h] += dS[j] · k[b,hk,j],  ∂v[h] += dS[j] · r[h,Δ]
    /// ```
    ///
    /// - Complexity: `2 · pairs · (6·D + 2·Dv)` FLOPs (the cost model counts the
    ///   conventional `2.5 ×` the forward's); workspace: the dense backward's per thread plus
    ///   the band buffers, the biases and per-key sums (`(2·B·H + H) · Nk` floats),
    ///   independent of `Nq` for a fixed `Nk`.
    public func gradients(query: StridedView, key: StridedView, value: StridedView, output: StridedView,
                          logSumExp: StridedView, outputGradient: StridedView,
                          dQuery: MutableStridedView, dKey: MutableStridedView, dValue: MutableStridedView,
                          keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws {
        try withCheckedGradientCall(query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                                    outputGradient: outputGradient, dQuery: dQuery, dKey: dKey, dValue: dValue,
                                    keyLengths: keyLengths, workspace: workspace, threads: threads,
                                    scale: scale) { shape, _ in
            let workers = try threadCount(threads)
            try withModifierBackward(shape) { modifiers, biasGradient in
                backward(shape: shape, threads: workers, keyLengths: keyLengths,
                         q: query.kernel, k: key.kernel, v: value.kernel, o: output.kernel, lse: logSumExp.kernel,
                         dO: outputGradient.kernel, dQ: dQuery.kernel, dK: dKey.kernel, dV: dValue.kernel,
                         modifiers: modifiers, biasGradient: biasGradient, parameters: nil)
            }
        }
    }

    /// The backward on a checked call of any precisions (the mixed-precision entry point):
    /// the kernel widens 16-bit rows as it packs them, and the content bias's `u · k` reads
    /// the key rows widened.
    func tiledBackward(_ call: TiledBackwardCall) throws {
        backward(shape: call.shape, threads: call.threads, keyLengths: call.keyLengths, q: call.q, k: call.k,
                 v: call.v, o: call.o, lse: call.lse, dO: call.dO, dQ: call.dQ, dK: call.dK, dV: call.dV,
                 modifiers: call.modifiers, biasGradient: call.biasGradient, parameters: nil)
    }

    /// `dK` gets `u_h · Σ_i dS_ij` added after the kernel: staged when 16-bit.
    func addsKeyGradients(_ shape: AttentionShape) throws -> Bool { true }

    /// `∂L/∂r`, `∂L/∂u` and `∂L/∂v` through the stateless call that gave `result` (and
    /// `dQ`, `dK`, `dV`, which the same pass computes).
    ///
    /// - Complexity: the backward's plus `2 · pairs · D` FLOPs for the distance sums and
    ///   `O(B · H · Nk · D)` to form the gradients; `B · H · Nk · (D + 1)` floats of scratch.
    ///   Sums in a fixed order (bitwise identical for every thread count).
    public func parameterGradients(query: Tensor, key: Tensor, value: Tensor, result: AttentionResult,
                                   outputGradient: Tensor, keyLengths: [Int]? = nil, threads: Int? = nil)
        throws -> (inputs: AttentionGradients, parameters: TransformerXLParameterGradients) {
        let s = try AttentionShape(query: query, key: key, value: value)
        try checkFloatAllocation(s.batch, s.heads, s.keyLength, s.headDim + 1,
                                 option: "Transformer-XL distance sums [B, H, Nk, D + 1]")
        var parameters = TransformerXLParameterGradients(
            relativePositions: [Float](repeating: 0, count: relativePositions.elements.count),
            contentBias: [Float](repeating: 0, count: contentBias.count),
            positionBias: [Float](repeating: 0, count: positionBias.count))
        let inputs = try withParameterGradientCall(query: query, key: key, value: value, result: result,
                                                   outputGradient: outputGradient, keyLengths: keyLengths,
                                                   threads: threads, scale: scale) { x in
            try withModifierBackward(x.shape) { modifiers, biasGradient in
                backward(shape: x.shape, threads: x.threads, keyLengths: keyLengths,
                         q: x.q, k: x.k, v: x.v, o: x.o, lse: x.lse, dO: x.dO, dQ: x.dQ, dK: x.dK, dV: x.dV,
                         modifiers: modifiers, biasGradient: biasGradient, parameters: &parameters)
            }
        }
        return (inputs, parameters)
    }

    public func backwardCost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        let forward = try cost(shape, threads: threads)
        let floats = { (count: Int) in roundUp(4 * count, WorkspaceCarver.alignment) }
        let (b, h, nk) = (shape.batch, shape.heads, shape.keyLength)
        return AttentionCost(
            flops: 2.5 * forward.flops,
            workspaceBytes: TiledSoftmaxBackward.workspaceBytes(shape: shape, threads: threads,
                                                                 mask: RelativePositionMask.self,
                                                                 softCap: modifiers.softCap != nil)
                + 2 * floats(b * h * nk) + floats(h * nk) + 2 * floats(1),
            scoredPairs: forward.scoredPairs)
    }

    /// The backward pass on views (see ``gradients(query:key:value:output:logSumExp:outputGradient:dQuery:dKey:dValue:keyLengths:workspace:threads:)``),
    /// with the parameters' gradients added to `parameters` when given.
    private func backward(shape: AttentionShape, threads: Int, keyLengths: [Int]?,
                          q: TensorView, k: TensorView, v: TensorView, o: TensorView, lse: TensorView,
                          dO: TensorView, dQ: MutableTensorView, dK: MutableTensorView, dV: MutableTensorView,
                          modifiers: ScoreModifierKernel?, biasGradient: MutableTensorView?,
                          parameters: UnsafeMutablePointer<TransformerXLParameterGradients>?) {
        let (batch, heads, kvHeads, nk, d) = (shape.batch, shape.heads, shape.kvHeads, shape.keyLength, shape.headDim)
        let group = shape.groupSize, wanted = parameters != nil
        let one = SIMD4(1, 1, 1, 1)
        withBiases(shape: shape, k: k, threads: threads) { scale, mask in
        withScratchTensor(SIMD4(1, batch, heads, nk), zeroed: true) { keySums in
        withScratchTensor(wanted ? SIMD4(batch, heads, nk, d) : one, zeroed: true) { distanceRows in
        withScratchTensor(wanted ? SIMD4(1, batch, heads, nk) : one, zeroed: true) { distanceSums in
            TiledSoftmaxBackward.run(shape: shape, scale: scale, threads: threads, q: q, k: k, v: v, o: o, lse: lse,
                                     dO: dO, dQ: dQ, dK: dK, dV: dV, modifiers: modifiers,
                                     biasGradient: biasGradient) { b, h in
                var headMask = mask(b, h, 0, keyLengths?[b] ?? nk)
                let row = b * heads + h
                headMask.gradients = RelativeScoreGradients(
                    keySums: keySums.base + row * nk,
                    distanceRows: wanted ? distanceRows.base + row * nk * d : nil,
                    distanceSums: wanted ? distanceSums.base + row * nk : nil)
                return headMask
            }
            // dK[b, hk, j] += Σ_h u_h · Σ_i dS[b, h, i, j], heads of the group in order.
            let sums = UncheckedSendable(UnsafePointer(keySums.base))
            contentBias.withUnsafeBufferPointer { u in
                let u = UncheckedSendable(u.baseAddress!)
                parallelForEach(items: batch * kvHeads, threads: threads) { item, _ in
                    let b = item / kvHeads, hk = item % kvHeads, ks = dK.strides[3]
                    for j in 0..<nk {
                        let out = dK.row(b, hk, j)
                        for h in (hk * group)..<((hk + 1) * group) {
                            let e = sums.value[(b * heads + h) * nk + j], bias = u.value + h * d
                            for c in 0..<d { out[c &* ks] += e * bias[c] }
                        }
                    }
                }
            }
            guard let parameters else { return }
            addParameterGradients(shape: shape, k: k, keySums: UnsafePointer(keySums.base),
                                  distanceRows: UnsafePointer(distanceRows.base),
                                  distanceSums: UnsafePointer(distanceSums.base), into: &parameters.pointee)
        } } }
        }
    }

    /// `∂u[h] = Σ_b Σ_j keySums[b,h,j] k[b,hk,j]`, `∂v[h] = Σ_b Σ_Δ sums[b,h,Δ] r[h,Δ]`,
    /// `∂r[h,Δ] = Σ_b (rows[b,h,Δ] + sums[b,h,Δ] v[h])` (a shared table: also summed over `h`),
    /// in this order: head, batch item, key or distance.
    private func addParameterGradients(shape: AttentionShape, k: TensorView, keySums: UnsafePointer<Float>,
                                       distanceRows: UnsafePointer<Float>, distanceSums: UnsafePointer<Float>,
                                       into p: inout TransformerXLParameterGradients) {
        let (heads, nk, d) = (shape.heads, shape.keyLength, shape.headDim)
        let (tableHeads, tableRows) = (relativePositions.shape[1], relativePositions.shape[2])
        relativePositions.withView { r in
            for h in 0..<heads {
                let hk = h / shape.groupSize, th = tableHeads == 1 ? 0 : h
                let table = r.row(0, th, 0)
                for b in 0..<shape.batch {
                    let row = b * heads + h
                    for j in 0..<nk {
                        let e = keySums[row * nk + j], key = k.row(b, hk, j)
                        for c in 0..<d { p.contentBias[h * d + c] += e * key[c &* k.strides[3]] }
                    }
                    for delta in 0..<nk {
                        let g = distanceSums[row * nk + delta], relative = table + delta * r.strides[2]
                        let sums = distanceRows + (row * nk + delta) * d, out = (th * tableRows + delta) * d
                        for c in 0..<d {
                            p.positionBias[h * d + c] += g * relative[c &* r.strides[3]]
                            p.relativePositions[out + c] += sums[c] + g * positionBias[h * d + c]
                        }
                    }
                }
            }
        }
    }
}
