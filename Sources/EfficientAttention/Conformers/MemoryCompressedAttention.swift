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
public struct MemoryCompressedAttention: Attention {
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
        try checkFloatAllocation([shape.batch, hkv, compressedShape(shape).keyLength, d + dv],
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
        let compressedBytes = shape.batch * shape.kvHeads * compressed.keyLength * (shape.headDim + shape.valueDim)
            * MemoryLayout<Float>.stride
        let gemmWorkers = workerCount(threads: threads, items: 2 * shape.batch * shape.kvHeads)
        return AttentionCost(
            flops: convolution + 2 * Double(pairs) * (d + dv),
            workspaceBytes: compressedBytes + gemmWorkers * Gemm.Workspace.byteCount()
                + TiledSoftmaxAttention.workspaceBytes(shape: compressed, threads: threads),
            scoredPairs: pairs)
    }

    public func attend(query: StridedView, key: StridedView, value: StridedView,
                       output: MutableStridedView, logSumExp: MutableStridedView?,
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
