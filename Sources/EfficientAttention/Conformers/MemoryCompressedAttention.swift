/// Memory-compressed attention (Liu et al. 2018): keys and values shortened by a strided
/// convolution of kernel and stride `c` along the sequence, per key/value head, then
/// softmax attention over the compressed keys.
///
/// ```
/// // naive reference (what this computes), for each b, h, i (hk = h / (H / Hkv)):
/// let L = keyLengths?[b] ?? Nk, Lc = ⌈L / c⌉
/// k'[t] = Σ_{r < c, tc + r < L} W^K[hk, r] · k[b, hk, tc + r] + b^K[hk]     // t < Lc
/// v'[t] = Σ_{r < c, tc + r < L} W^V[hk, r] · v[b, hk, tc + r] + b^V[hk]
/// //  without weights: mean pooling, k'[t] = mean of the window's rows (+ bias)
/// // visible(t) = !causal || min((t + 1)c, L) − 1 ≤ i + Nk − Nq    (whole windows)
/// s[t] = scale · dot(q[b, h, i], k'[t])
/// o[b, h, i] = Σ_t softmax(s)[t] · v'[t],   lse[b, h, i] = log Σ_t exp(s[t])
/// ```
/// `W[hk, r]` is a row-major `[out, in]` matrix (`W^K [Hkv, c, D, D]`, `W^V [Hkv, c, Dv, Dv]`).
/// A last, partial window sums the rows it has (with weights: missing rows count as zero
/// vectors; mean pooling divides by the rows it has). Key padding compresses the first `L`
/// keys only. Rows with no visible compressed key are 0 with `lse = -infinity`.
///
/// The convolution runs on the GEMM kernel, `c` products per head over strided views of
/// the keys (``WindowCompression``); the attention is the tiled softmax kernel over the
/// compressed keys, with ``WindowEndMask`` when causal. (KernelDocs/MemoryCompressed.md.)
///
/// - Complexity: `2 · Nk · (D² + Dv²)` FLOPs per key/value head for the convolution with
///   weights (`Nk · (D + Dv)` mean pooling), plus `2 · Nq · ⌈Nk / c⌉ · (D + Dv)` per query
///   head (about half causal): quadratic in `N` at a fixed ratio, `c` times cheaper than
///   dense. Workspace: the compressed keys and values (`4 · B · Hkv · ⌈Nk / c⌉ · (D + Dv)`
///   bytes), one GEMM workspace per thread and the tiled kernel's tiles.
public struct MemoryCompressedAttention: KernelWidening {
    /// Kernel and stride `c` of the convolution.
    public var compression: Int
    /// `W^K [Hkv, c, D, D]` row-major, or `nil` for mean pooling.
    public let keyWeights: [Float]?
    /// `W^V [Hkv, c, Dv, Dv]` row-major, or `nil` for mean pooling.
    public let valueWeights: [Float]?
    /// `b^K [Hkv, D]`, or `nil` for none.
    public let keyBias: [Float]?
    /// `b^V [Hkv, Dv]`, or `nil` for none.
    public let valueBias: [Float]?
    public var causal: Bool
    /// Score scale; `nil` means `1 / sqrt(D)`. Must be finite.
    public var scale: Float?

    /// The paper's compression, 3.
    public static let defaultCompression = 3

    /// A configuration; weights and biases are checked for finite values here and for
    /// their sizes against each call's shape.
    ///
    /// - Throws: ``AttentionError/invalidParameter(_:)`` for a non-finite weight or bias.
    public init(compression: Int = MemoryCompressedAttention.defaultCompression,
                keyWeights: [Float]? = nil, valueWeights: [Float]? = nil,
                keyBias: [Float]? = nil, valueBias: [Float]? = nil,
                causal: Bool = false, scale: Float? = nil) throws {
        for (name, array) in [("keyWeights", keyWeights), ("valueWeights", valueWeights),
                              ("keyBias", keyBias), ("valueBias", valueBias)] {
            if let index = array?.firstIndex(where: { !$0.isFinite }) {
                throw AttentionError.invalidParameter(
                    "memory-compressed attention: \(name)[\(index)] must be finite, got \(array![index])")
            }
        }
        self.compression = compression
        self.keyWeights = keyWeights
        self.valueWeights = valueWeights
        self.keyBias = keyBias
        self.valueBias = valueBias
        self.causal = causal
        self.scale = scale
    }

    public var name: String { "memory-compressed" }

    public func validate(_ shape: AttentionShape) throws {
        let variant = "memory-compressed attention"
        try checkPatternShape(shape, scale: scale, variant: variant)
        try checkOption(compression, "compression", in: 1...patternLimit, variant: variant)
        let (hkv, c, d, dv) = (shape.kvHeads, compression, shape.headDim, shape.valueDim)
        func checkCount(_ array: [Float]?, _ name: StaticString, _ dims: @autoclosure () -> [Int],
                        _ label: StaticString) throws {
            if let array, case let dims = dims(), array.count != checkedProduct(dims) {
                throw AttentionError.shapeMismatch(
                    "\(variant): \(name) has \(array.count) elements, expected \(label) = \(dims)")
            }
        }
        try checkCount(keyWeights, "keyWeights", [hkv, c, d, d], "[Hkv, c, D, D]")
        try checkCount(valueWeights, "valueWeights", [hkv, c, dv, dv], "[Hkv, c, Dv, Dv]")
        try checkCount(keyBias, "keyBias", [hkv, d], "[Hkv, D]")
        try checkCount(valueBias, "valueBias", [hkv, dv], "[Hkv, Dv]")
        try checkFloatAllocation(shape.batch, hkv, compressedShape(shape).keyLength, d + dv,
                                 option: "\(variant): compressed keys and values [B, Hkv, ⌈Nk / c⌉, D + Dv]")
    }

    /// The attention problem over the compressed keys.
    func compressedShape(_ shape: AttentionShape) -> AttentionShape {
        var compressed = shape
        compressed.keyLength = WindowCompression.compressedLength(shape.keyLength, compression: compression)
        return compressed
    }

    public func cost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        let threads = try threadCount(threads)
        try validate(shape)
        let compressed = compressedShape(shape)
        let (nk, d, dv) = (Double(shape.keyLength), Double(shape.headDim), Double(shape.valueDim))
        let keyFlops = keyWeights == nil ? nk * d : 2 * nk * d * d
        let valueFlops = valueWeights == nil ? nk * dv : 2 * nk * dv * dv
        let convolution = Double(shape.batch * shape.kvHeads) * (keyFlops + valueFlops)
        var perHead = shape.queryLength * compressed.keyLength
        if causal {
            let mask = WindowEndMask(compression: compression, keyLength: shape.keyLength,
                                     offset: shape.keyLength - shape.queryLength)
            perHead = mask.visiblePairs(firstPosition: mask.offset, queries: shape.queryLength)
        }
        let pairs = perHead * shape.batch * shape.heads
        // The compressed keys and values, each its own aligned scratch tensor.
        let rows = shape.batch * shape.kvHeads * compressed.keyLength
        let compressedBytes = roundUp(rows * shape.headDim * MemoryLayout<Float>.stride, WorkspaceCarver.alignment)
            + roundUp(rows * shape.valueDim * MemoryLayout<Float>.stride, WorkspaceCarver.alignment)
        let gemmWorkers = workerCount(threads: threads, items: 2 * shape.batch * shape.kvHeads)
        return AttentionCost(
            flops: convolution + 2 * Double(pairs) * (d + dv),
            workspaceBytes: compressedBytes + gemmWorkers * Gemm.Workspace.byteCount()
                + TiledSoftmaxAttention.workspaceBytes(shape: compressed, threads: threads),
            scoredPairs: pairs)
    }

    /// 16-bit keys and values are widened as the convolution packs (or pools) them, 16-bit
    /// queries as the tiled kernel packs them; its one pass writes the output rows.
    func stagedOperands(_ shape: AttentionShape) -> (query: Bool, output: Bool) { (false, false) }

    public func attend(query: ActivationView, key: ActivationView, value: ActivationView,
                       output: MutableActivationView, logSumExp: MutableStridedView?,
                       keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws {
        try withCheckedCall(query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                            keyLengths: keyLengths, workspace: workspace, threads: threads, scale: scale) { call in
        let (shape, scale, threads) = (call.shape, call.scale, call.threadCount)
        let (k, v) = (call.k, call.v)
        let compressed = compressedShape(shape)
        let c = compression, nc = compressed.keyLength
        // The compressed keys and values in workspace scratch (zero past an item's windows).
        withScratchTensor(SIMD4(shape.batch, shape.kvHeads, nc, shape.headDim), zeroed: true) { kOut in
        withScratchTensor(SIMD4(shape.batch, shape.kvHeads, nc, shape.valueDim), zeroed: true) { vOut in

        compressKeysAndValues(shape: shape, keyLengths: keyLengths, threads: threads, k: k, v: v,
                              kOut: kOut, vOut: vOut)

        func length(_ b: Int) -> Int { keyLengths?[b] ?? shape.keyLength }
        let (k, v) = (kOut.readOnly, vOut.readOnly)
        do {
            if causal {
                TiledSoftmaxAttention.run(shape: compressed, scale: scale, threads: threads,
                                          q: call.q, k: k, v: v, o: call.o, lse: call.lse) { b, _ in
                    WindowEndMask(compression: c, keyLength: length(b), offset: shape.keyLength - shape.queryLength)
                }
            } else {
                TiledSoftmaxAttention.run(shape: compressed, scale: scale, threads: threads,
                                          q: call.q, k: k, v: v, o: call.o, lse: call.lse) { b, _ in
                    IntervalMask(queryLength: shape.queryLength, keyLength: nc, causal: false,
                                 keyEnd: WindowCompression.compressedLength(length(b), compression: c))
                }
            }
        }
        } }
        }
    }

    /// Compresses the keys and values of every batch item and key/value head into `kOut`,
    /// `vOut` (``WindowCompression``), one work item per batch item, key/value head and side.
    func compressKeysAndValues(shape: AttentionShape, keyLengths: [Int]?, threads: Int, k: TensorView, v: TensorView,
                               kOut: MutableTensorView, vOut: MutableTensorView) {
        let c = compression
        // One work item per batch item, key/value head and side (keys or values).
        let items = 2 * shape.batch * shape.kvHeads
        let workers = workerCount(threads: threads, items: items)
        WorkspaceArena.withWorkspaces(workers: workers, layout: { Gemm.Workspace(carving: &$0) }) { spaces in
        withOptionalPointers(keyWeights, valueWeights, keyBias, valueBias) { kw, vw, kb, vb in
            parallelForEach(items: items, threads: workers) { item, worker in
                let isValue = item % 2 == 1
                let b = item / 2 / shape.kvHeads, hk = item / 2 % shape.kvHeads
                let width = isValue ? shape.valueDim : shape.headDim
                let weights = isValue ? vw : kw, bias = isValue ? vb : kb
                let out = isValue ? vOut : kOut
                WindowCompression.compress(isValue ? v : k, b: b, h: hk, length: keyLengths?[b] ?? shape.keyLength,
                                           compression: c, width: width,
                                           weights: weights.map { $0.value + hk * c * width * width },
                                           bias: bias.map { $0.value + hk * width },
                                           into: out.row(b, hk, 0), ldo: out.strides[2], workspace: spaces[worker])
            }
        }
        }
    }
}

/// Calls `body` with the base addresses of the arrays that are given (`nil` for the others),
/// valid for the duration of the call.
private func withOptionalPointers<R>(
    _ a: [Float]?, _ b: [Float]?, _ c: [Float]?, _ d: [Float]?,
    _ body: (UncheckedSendable<UnsafePointer<Float>>?, UncheckedSendable<UnsafePointer<Float>>?,
             UncheckedSendable<UnsafePointer<Float>>?, UncheckedSendable<UnsafePointer<Float>>?) -> R
) -> R {
    func with(_ array: [Float]?, _ next: (UncheckedSendable<UnsafePointer<Float>>?) -> R) -> R {
        guard let array else { return next(nil) }
        return array.withUnsafeBufferPointer { next(UncheckedSendable($0.baseAddress!)) }
    }
    return with(a) { a in with(b) { b in with(c) { c in with(d) { d in body(a, b, c, d) } } } }
}

/// The gradients of a loss with respect to ``MemoryCompressedAttention``'s convolution (see
/// ``MemoryCompressedAttention/parameterGradients(query:key:value:result:outputGradient:keyLengths:threads:)``).
/// Each is shaped like its parameter and `nil` when the configuration has no such parameter
/// (mean pooling has no weights).
public struct MemoryCompressedParameterGradients: Sendable, Equatable {
    /// `∂L/∂W^K`, `[Hkv, c, D, D]` like ``MemoryCompressedAttention/keyWeights``.
    public var keyWeights: [Float]?
    /// `∂L/∂W^V`, `[Hkv, c, Dv, Dv]` like ``MemoryCompressedAttention/valueWeights``.
    public var valueWeights: [Float]?
    /// `∂L/∂b^K`, `[Hkv, D]` like ``MemoryCompressedAttention/keyBias``.
    public var keyBias: [Float]?
    /// `∂L/∂b^V`, `[Hkv, Dv]` like ``MemoryCompressedAttention/valueBias``.
    public var valueBias: [Float]?
}

extension MemoryCompressedAttention: OperandWideningBackward {
    /// `dK`, `dV` rows are each written once (the transposed convolution), so 16-bit ones are
    /// rounded as they are written; a 16-bit `dQ`, summed over the compressed key blocks by
    /// the tiled backward, is staged.
    static func stagedGradients(_ shape: AttentionShape) -> (query: Bool, keys: Bool) { (true, false) }

    /// 16-bit keys and values are widened as the window convolution packs (or the mean pool
    /// reads) them, queries, outputs and `dO` as the tiled backward packs them.
    func widenedOperandsBackward(_ shape: AttentionShape, threads: Int, q: TensorView, k: TensorView,
                                 v: TensorView, o: TensorView, lse: TensorView, dO: TensorView,
                                 dQ: MutableTensorView, dK: MutableTensorView, dV: MutableTensorView,
                                 keyLengths: [Int]?) throws {
        backward(shape: shape, scale: scale ?? 1 / Float(shape.headDim).squareRoot(), threads: threads,
                 keyLengths: keyLengths, q: q, k: k, v: v, o: o, lse: lse, dO: dO, dQ: dQ, dK: dK, dV: dV,
                 parameters: nil)
    }

    /// The backward through the compression (KernelDocs/MemoryCompressed.md, "Backward"): the
    /// compressed keys and values recomputed on the GEMM, the dense backward
    /// (``TiledSoftmaxBackward``) over them with the forward's mask (whole windows when
    /// causal, `⌈L / c⌉` compressed keys under key padding) gives `dQ`, `dK'`, `dV'`, then the
    /// transposed convolution: each key row gets its window's gradient times `W_r` (or divided
    /// by the window's rows for mean pooling); keys past `keyLengths[b]` get 0. The weights
    /// and biases are parameters: their gradients come from
    /// ``parameterGradients(query:key:value:result:outputGradient:keyLengths:threads:)``.
    ///
    /// ```
    /// // naive reference, for each b, hk, L = keyLengths?[b] ?? Nk:
    /// dQ, dK', dV' = softmax backward over the compressed K', V' (forward's visibility and lse)
    /// dK[b, hk, tc + r] = dK'[t] · W^K[hk, r]     (mean pooling: dK'[t] / n_t)    tc + r < L
    /// dV[b, hk, tc + r] = dV'[t] · W^V[hk, r]     (mean pooling: dV'[t] / n_t);   0 for j ≥ L
    /// ∂L/∂W^K[hk, r] += Σ_t dK'[t]ᵀ k[b, hk, tc + r]  (outer product, [out, in]),  ∂L/∂b^K[hk] += Σ_t dK'[t]
    /// ```
    ///
    /// - Complexity: the dense backward over `⌈Nk / c⌉` keys (`2.5 ×` its forward) plus
    ///   `4 · Nk · (D² + Dv²)` FLOPs per key/value head for the convolution and its transpose
    ///   (`2 · Nk · (D + Dv)` mean pooling). Workspace: the compressed keys, values and their
    ///   gradients (`8 · B · Hkv · ⌈Nk / c⌉ · (D + Dv)` bytes) plus the larger of the dense
    ///   backward's tiles and one GEMM workspace and a 128-row tile per thread.
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

    /// The gradients of the convolution's weights and biases through the call that gave
    /// `result` (and `dQ`, `dK`, `dV`, which the same pass computes).
    ///
    /// - Complexity: the backward's plus `2 · Nk · (D² + Dv²)` FLOPs per key/value head with
    ///   weights; the parameter sums run over the batch items in order, one work item per
    ///   (side, key/value head, window offset `r`): bitwise identical for every thread count.
    public func parameterGradients(query: Tensor, key: Tensor, value: Tensor, result: AttentionResult,
                                   outputGradient: Tensor, keyLengths: [Int]? = nil, threads: Int? = nil)
        throws -> (inputs: AttentionGradients, parameters: MemoryCompressedParameterGradients) {
        // One buffer per parameter (zero-sized for the missing ones).
        let given = [keyWeights, valueWeights, keyBias, valueBias].map { $0 != nil }
        func zeros(_ parameter: [Float]?) -> [Float] { [Float](repeating: 0, count: parameter?.count ?? 0) }
        var (dkw, dvw, dkb, dvb) = ([Float](), [Float](), [Float](), [Float]())
        let inputs = try withParameterGradientCall(query: query, key: key, value: value, result: result,
                                                   outputGradient: outputGradient, keyLengths: keyLengths,
                                                   threads: threads, scale: scale) { c in
            // Allocated after the call's checks.
            (dkw, dvw, dkb, dvb) = (zeros(keyWeights), zeros(valueWeights), zeros(keyBias), zeros(valueBias))
            dkw.withUnsafeMutableBufferPointer { kw in dvw.withUnsafeMutableBufferPointer { vw in
            dkb.withUnsafeMutableBufferPointer { kb in dvb.withUnsafeMutableBufferPointer { vb in
                backward(shape: c.shape, scale: c.scale, threads: c.threads, keyLengths: keyLengths,
                         q: c.q, k: c.k, v: c.v, o: c.o, lse: c.lse, dO: c.dO, dQ: c.dQ, dK: c.dK, dV: c.dV,
                         parameters: zip([kw, vw, kb, vb], given).map { UncheckedSendable($1 ? $0.baseAddress : nil) })
            } } } }
        }
        return (inputs,
                MemoryCompressedParameterGradients(keyWeights: given[0] ? dkw : nil, valueWeights: given[1] ? dvw : nil,
                                                   keyBias: given[2] ? dkb : nil, valueBias: given[3] ? dvb : nil))
    }

    public func backwardCost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        let forward = try cost(shape, threads: threads)
        let threads = try threadCount(threads)
        let compressed = compressedShape(shape)
        let (nk, d, dv) = (Double(shape.keyLength), Double(shape.headDim), Double(shape.valueDim))
        let keyFlops = keyWeights == nil ? nk * d : 2 * nk * d * d
        let valueFlops = valueWeights == nil ? nk * dv : 2 * nk * dv * dv
        let convolution = Double(shape.batch * shape.kvHeads) * (keyFlops + valueFlops)
        let attention = forward.flops - convolution
        // The compressed keys and values, each its own aligned scratch tensor.
        let rows = shape.batch * shape.kvHeads * compressed.keyLength
        let compressedBytes = roundUp(rows * shape.headDim * MemoryLayout<Float>.stride, WorkspaceCarver.alignment)
            + roundUp(rows * shape.valueDim * MemoryLayout<Float>.stride, WorkspaceCarver.alignment)
        let workers = workerCount(threads: threads, items: 2 * shape.batch * shape.kvHeads)
        let tile = WindowCompression.expandChunk * max(shape.headDim, shape.valueDim) * MemoryLayout<Float>.stride
        return AttentionCost(
            flops: 2 * convolution + 2.5 * attention,
            workspaceBytes: 2 * compressedBytes
                + max(TiledSoftmaxBackward.workspaceBytes(shape: compressed, threads: threads),
                      workers * (Gemm.Workspace.byteCount() + roundUp(tile, WorkspaceCarver.alignment))),
            scoredPairs: forward.scoredPairs)
    }

    /// The backward pass; `parameters` (weight and bias gradients of keys and values, `nil`
    /// entries for parameters the configuration lacks) are added to when given.
    private func backward(shape: AttentionShape, scale: Float, threads: Int, keyLengths: [Int]?,
                          q: TensorView, k: TensorView, v: TensorView, o: TensorView, lse: TensorView,
                          dO: TensorView, dQ: MutableTensorView, dK: MutableTensorView, dV: MutableTensorView,
                          parameters: [UncheckedSendable<UnsafeMutablePointer<Float>?>]?) {
        let compressed = compressedShape(shape)
        let c = compression, nc = compressed.keyLength
        func length(_ b: Int) -> Int { keyLengths?[b] ?? shape.keyLength }
        withScratchTensor(SIMD4(shape.batch, shape.kvHeads, nc, shape.headDim), zeroed: true) { kOut in
        withScratchTensor(SIMD4(shape.batch, shape.kvHeads, nc, shape.valueDim), zeroed: true) { vOut in
        withScratchTensor(SIMD4(shape.batch, shape.kvHeads, nc, shape.headDim)) { dkOut in
        withScratchTensor(SIMD4(shape.batch, shape.kvHeads, nc, shape.valueDim)) { dvOut in
            compressKeysAndValues(shape: shape, keyLengths: keyLengths, threads: threads, k: k, v: v,
                                  kOut: kOut, vOut: vOut)
            // dQ, dK', dV' (every row of dK', dV' written: 0 for compressed keys no query sees).
            if causal {
                TiledSoftmaxBackward.run(shape: compressed, scale: scale, threads: threads,
                                         q: q, k: kOut.readOnly, v: vOut.readOnly, o: o, lse: lse, dO: dO,
                                         dQ: dQ, dK: dkOut, dV: dvOut) { b, _ in
                    WindowEndMask(compression: c, keyLength: length(b), offset: shape.keyLength - shape.queryLength)
                }
            } else {
                TiledSoftmaxBackward.run(shape: compressed, scale: scale, threads: threads,
                                         q: q, k: kOut.readOnly, v: vOut.readOnly, o: o, lse: lse, dO: dO,
                                         dQ: dQ, dK: dkOut, dV: dvOut) { b, _ in
                    IntervalMask(queryLength: shape.queryLength, keyLength: nc, causal: false,
                                 keyEnd: WindowCompression.compressedLength(length(b), compression: c))
                }
            }
            let (dkc, dvc) = (dkOut.readOnly, dvOut.readOnly)
            withOptionalPointers(keyWeights, valueWeights, nil, nil) { kw, vw, _, _ in
                // dK, dV: the transposed convolution, one work item per batch item, head and side.
                let items = 2 * shape.batch * shape.kvHeads
                let workers = workerCount(threads: threads, items: items)
                let wide = max(shape.headDim, shape.valueDim)
                WorkspaceArena.withWorkspaces(workers: workers, layout: { carver in
                    (Gemm.Workspace(carving: &carver), carver.take(WindowCompression.expandChunk * wide))
                }) { spaces in
                    parallelForEach(items: items, threads: workers) { item, worker in
                        let isValue = item % 2 == 1
                        let b = item / 2 / shape.kvHeads, hk = item / 2 % shape.kvHeads
                        let width = isValue ? shape.valueDim : shape.headDim
                        let weights = isValue ? vw : kw, gradient = isValue ? dvc : dkc
                        WindowCompression.expand(gradient.row(b, hk, 0), ldg: gradient.strides[2], length: length(b),
                                                 compression: c, width: width,
                                                 weights: weights.map { $0.value + hk * c * width * width },
                                                 into: isValue ? dV : dK, b: b, h: hk, rows: shape.keyLength,
                                                 tile: spaces[worker].1, workspace: spaces[worker].0)
                    }
                }
                guard let parameters else { return }
                // ∂L/∂W_r and ∂L/∂b: one work item per (side, head, offset r), the batch items in order.
                let parameterItems = 2 * shape.kvHeads * c
                let parameterWorkers = workerCount(threads: threads, items: parameterItems)
                WorkspaceArena.withWorkspaces(workers: parameterWorkers, layout: { Gemm.Workspace(carving: &$0) }) {
                    spaces in
                    parallelForEach(items: parameterItems, threads: parameterWorkers) { item, worker in
                        let isValue = item % 2 == 1
                        let hk = item / 2 / c, r = item / 2 % c
                        let width = isValue ? shape.valueDim : shape.headDim
                        let gradient = isValue ? dvc : dkc, source = isValue ? v : k
                        let dW = parameters[isValue ? 1 : 0].value, db = parameters[isValue ? 3 : 2].value
                        for b in 0..<shape.batch {
                            if let dW {
                                WindowCompression.accumulateWeightGradient(
                                    gradient.row(b, hk, 0), ldg: gradient.strides[2], source: source, b: b, h: hk,
                                    length: length(b), compression: c, offset: r, width: width,
                                    into: dW + (hk * c + r) * width * width, workspace: spaces[worker])
                            }
                            if r == 0, let db {
                                for t in 0..<WindowCompression.compressedLength(length(b), compression: c) {
                                    axpy(1, gradient.row(b, hk, t), 1, db + hk * width, count: width)
                                }
                            }
                        }
                    }
                }
            }
        } } } }
    }
}
