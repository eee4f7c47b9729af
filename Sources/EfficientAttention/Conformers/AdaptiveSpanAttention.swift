/// Causal attention where each head learns how far back it looks (Sukhbaatar et al. 2019,
/// "Adaptive Attention Span in Transformers").
///
/// ```
/// // naive reference (what this computes), for each b, h, i, with off = Nk − Nq:
/// let hk = h / (H / Hkv), z = spans[h], R = ramp
/// m(x) = clamp((R + z − x) / R, 0, 1)                    // soft mask on the distance x
/// s[j] = scale · dot(q[b, h, i], k[b, hk, j])             for j ≤ i + off (causal)
/// w[j] = m(i + off − j) · exp(s[j]) / Σ_j' m(i + off − j') · exp(s[j'])
/// o[b, h, i] = Σ_j w[j] · v[b, hk, j],   lse[b, h, i] = log Σ_j m(i + off − j) · exp(s[j])
/// ```
/// A query sees itself (`m(0) ≥ 1` clamps to 1) and the `⌈z + R⌉ − 1` keys before it:
/// weight 1 up to distance `z`, then a linear ramp to 0 at distance `z + R`. Keys where
/// `m = 0` are never scored, so the cost follows the span and not the sequence length.
/// The log-sum-exp is that of the weighted sum, so partial results still merge exactly.
///
/// The spans are plain values: change ``spans`` between calls (a training loop updates
/// them from the gradient of the loss plus ``spanPenalty``). Key padding (`keyLengths`)
/// is honoured; rows that see no key are 0 with log-sum-exp `-infinity`.
///
/// Runs on the shared tiled softmax kernel (KernelDocs/AdaptiveSpan.md): a causal band
/// of key tiles per query tile, and the soft mask applied to the probabilities of the
/// tiles that reach into the ramp.
///
/// - Complexity: `2 · pairs · (D + Dv)` FLOPs with at most `Nq · ⌈z_h + R⌉` pairs per
///   head: linear in `Nq` for a fixed span. Workspace as dense: a few hundred KiB per
///   thread, independent of the lengths.
public struct AdaptiveSpanAttention: KernelWidening, ModifiableAttention {
    /// The span `z_h` of each head, in positions; one per query head, each in `0...maxSpan`.
    public var spans: [Float]
    /// The largest span `S` a head may take.
    public var maxSpan: Int
    /// The ramp `R` of the soft mask, in positions; finite and greater than 0.
    public var ramp: Float
    /// Must be `true`: adaptive span is defined for causal attention only.
    public var causal: Bool
    /// Score scale; `nil` means `1 / sqrt(D)`. Must be finite.
    public var scale: Float?
    /// Soft-capping, ALiBi, an additive bias and sinks (``ScoreModifiers``); none by default.
    public var modifiers = ScoreModifiers()

    /// The paper's default ramp.
    public static let defaultRamp: Float = 32

    public init(spans: [Float], maxSpan: Int, ramp: Float = AdaptiveSpanAttention.defaultRamp,
                causal: Bool = true, scale: Float? = nil) {
        self.spans = spans
        self.maxSpan = maxSpan
        self.ramp = ramp
        self.causal = causal
        self.scale = scale
    }

    /// Every one of `heads` heads with span `span` (and `maxSpan = ⌈span⌉`).
    public init(heads: Int, span: Float, ramp: Float = AdaptiveSpanAttention.defaultRamp,
                causal: Bool = true, scale: Float? = nil) {
        // In range only: an out-of-range span is refused by validation (spans[h]), not here.
        let largest = span.isFinite && span <= Float(lengthLimit) ? Int(max(0, span).rounded(.up)) : 0
        self.init(spans: [Float](repeating: span, count: max(0, heads)), maxSpan: largest,
                  ramp: ramp, causal: causal, scale: scale)
    }

    public var name: String { "adaptive-span" }

    /// The span penalty `Σ_h z_h` (the paper adds it, times a coefficient, to the loss).
    ///
    /// - Complexity: O(H).
    public var spanPenalty: Float { spans.reduce(0, +) }

    /// The positions each head sees with nonzero weight, itself included: `⌈z_h + R⌉`.
    /// Throws what ``validateConfiguration()`` throws.
    ///
    /// - Complexity: O(H).
    public func effectiveSpans() throws -> [Int] {
        try validateConfiguration()
        return spans.map { SoftSpanMask.reach(span: $0, ramp: ramp) }
    }

    /// Throws an ``AttentionError`` unless the spans, ramp, scale and `causal` are valid
    /// (independently of a problem's shape).
    public func validateConfiguration() throws {
        guard causal else {
            throw AttentionError.unsupported("adaptive span is defined for causal attention only (causal is false)")
        }
        guard ramp.isFinite, ramp > 0 else {
            throw AttentionError.invalidParameter("ramp must be finite and greater than 0, got \(ramp)")
        }
        guard ramp <= Float(lengthLimit) else {
            throw AttentionError.invalidParameter("ramp must be at most \(lengthLimit), got \(ramp)")
        }
        for (h, z) in spans.enumerated() where z.isFinite && z > Float(lengthLimit) {
            throw AttentionError.invalidParameter("spans[\(h)] = \(z) must be at most \(lengthLimit)")
        }
        guard maxSpan >= 0 else {
            throw AttentionError.invalidParameter("maxSpan must be at least 0, got \(maxSpan)")
        }
        try checkLimit(maxSpan, "maxSpan", variant: "adaptive span attention")
        for (h, z) in spans.enumerated() where !(z.isFinite && z >= 0 && Double(z) <= Double(maxSpan)) {
            throw AttentionError.invalidParameter("spans[\(h)] = \(z) is outside 0...\(maxSpan) (maxSpan)")
        }
        try checkScale(scale)
    }

    public func validate(_ shape: AttentionShape) throws {
        try shape.check()
        try shape.checkHeadDims(limit: DenseAttention.maxHeadDim, variant: "adaptive span attention")
        try validateConfiguration()
        guard spans.count == shape.heads else {
            throw AttentionError.invalidParameter(
                "spans has \(spans.count) entries, expected one per query head (heads = \(shape.heads))")
        }
    }

    public func cost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        let threads = try threadCount(threads)
        try validate(shape)
        var pairs = 0
        let offset = shape.keyLength - shape.queryLength
        for z in spans {
            let reach = SoftSpanMask.reach(span: z, ramp: ramp)
            for i in 0..<shape.queryLength {
                let last = min(i + offset, shape.keyLength - 1)
                let first = max(0, i + offset - reach + 1)
                pairs += max(0, last - first + 1)
            }
        }
        pairs *= shape.batch
        return AttentionCost(flops: 2 * Double(pairs) * Double(shape.headDim + shape.valueDim),
                             workspaceBytes: TiledSoftmaxAttention.workspaceBytes(
                                shape: shape, threads: threads, mask: SoftSpanMask.self),
                             scoredPairs: pairs)
    }

    /// The kernel widens every operand itself.
    func stagedOperands(_ shape: AttentionShape) -> (query: Bool, output: Bool) { (false, false) }

    public func attend(query: ActivationView, key: ActivationView, value: ActivationView,
                       output: MutableActivationView, logSumExp: MutableStridedView?,
                       keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws {
        try withCheckedCall(query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                            keyLengths: keyLengths, workspace: workspace, threads: threads, scale: scale,
                            modifiers: modifiers) { call in
            let shape = call.shape, spans = self.spans, ramp = self.ramp
            TiledSoftmaxAttention.attend(call) { b, h in
                SoftSpanMask(queryLength: shape.queryLength, keyLength: shape.keyLength,
                             keyEnd: call.keyEnd(b), span: spans[h], ramp: ramp)
            }
        }
    }
}

extension AdaptiveSpanAttention: KernelWideningBackward {
    /// The flash-style backward of the tiled kernel (KernelDocs/AdaptiveSpan.md, "Backward")
    /// over the forward's causal band: the probabilities recomputed as `m · exp(s − lse)`
    /// (the soft mask applied where the forward applies it), `dS = P ∘ (dP − D)`, `dQ` summed
    /// in key-block order; no `Nq × Nk` buffer, bitwise identical for every thread count.
    /// `∂L/∂z_h` comes from ``parameterGradients(query:key:value:result:outputGradient:keyLengths:threads:)``.
    /// ``modifiers`` apply as in the forward (KernelDocs/ScoreModifiers.md, "Backward"; `s`
    /// below is then the modified score); `∂bias`, `∂sinks` come from
    /// ``ModifiableAttention/modifierGradients(query:key:value:result:outputGradient:keyLengths:threads:)``.
    ///
    /// ```
    /// // naive reference, for each b, h, i (hk = h / (H / Hkv), x = i + Nk − Nq − j):
    /// E[j] = exp(scale · dot(q[b,h,i], k[b,hk,j]) − lse[b,h,i]),  P[j] = m(x) · E[j]
    /// dP[j] = dot(dO[b,h,i], v[b,hk,j]),  D = dot(dO[b,h,i], o[b,h,i]),  dS[j] = P[j] · (dP[j] − D)
    /// dQ[b,h,i] = scale · Σ_j dS[j] k[j],  dK[b,hk,j] += scale · dS[j] q[i],  dV[b,hk,j] += P[j] dO[i]
    /// ∂L/∂z[h] += m′(x) · E[j] · (dP[j] − D)     m′ = 1/R where 0 < m(x) < 1, else 0
    /// ```
    ///
    /// - Complexity: `2.5 ×` the forward's FLOPs; workspace as dense's backward (about
    ///   341 KiB per thread at `D = Dv = 64`) plus one `Int` per 128 keys per key/value head.
    public func gradients(query: StridedView, key: StridedView, value: StridedView, output: StridedView,
                          logSumExp: StridedView, outputGradient: StridedView,
                          dQuery: MutableStridedView, dKey: MutableStridedView, dValue: MutableStridedView,
                          keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws {
        try tiledGradients(query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                           outputGradient: outputGradient, dQuery: dQuery, dKey: dKey, dValue: dValue,
                           keyLengths: keyLengths, workspace: workspace, threads: threads)
    }

    /// The backward's one pass (the `Float` and mixed-precision entry points run it).
    func tiledBackward(_ call: TiledBackwardCall) throws {
        backward(shape: call.shape, scale: call.scale, threads: call.threads, keyLengths: call.keyLengths,
                 q: call.q, k: call.k, v: call.v, o: call.o, lse: call.lse, dO: call.dO,
                 dQ: call.dQ, dK: call.dK, dV: call.dV, modifiers: call.modifiers, biasGradient: call.biasGradient,
                 spans: nil)
    }

    func addsKeyGradients(_ shape: AttentionShape) -> Bool { false }

    /// `∂L/∂z_h` for each head (`spans.count` values) through the call that gave `result`
    /// (and `dQ`, `dK`, `dV`, which the same pass computes). The ramp's subgradient is 0 at
    /// its kinks (pairs whose weight is exactly 0 or 1). The span penalty's gradient
    /// (1 per head, times the caller's coefficient) is not included.
    ///
    /// - Complexity: the backward's plus `O(pairs on the ramp)`; one Double per 128 keys
    ///   per (batch item, head) of scratch. Sums in a fixed order (key block, then batch item):
    ///   bitwise identical for every thread count.
    public func parameterGradients(query: Tensor, key: Tensor, value: Tensor, result: AttentionResult,
                                   outputGradient: Tensor, keyLengths: [Int]? = nil, threads: Int? = nil)
        throws -> (inputs: AttentionGradients, spans: [Float]) {
        var dz = [Float](repeating: 0, count: spans.count)
        let inputs = try withParameterGradientCall(query: query, key: key, value: value, result: result,
                                                   outputGradient: outputGradient, keyLengths: keyLengths,
                                                   threads: threads, scale: scale) { x in
            // The score modifiers (and ∂bias when asked) as the forward applies them.
            try withModifierBackward(x.shape) { modifiers, biasGradient in
                backward(shape: x.shape, scale: x.scale, threads: x.threads, keyLengths: keyLengths,
                         q: x.q, k: x.k, v: x.v, o: x.o, lse: x.lse, dO: x.dO, dQ: x.dQ, dK: x.dK, dV: x.dV,
                         modifiers: modifiers, biasGradient: biasGradient, spans: &dz)
            }
        }
        return (inputs, dz)
    }

    public func backwardCost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        let forward = try cost(shape, threads: threads)
        return AttentionCost(flops: 2.5 * forward.flops,
                             workspaceBytes: TiledSoftmaxBackward.workspaceBytes(shape: shape, threads: threads,
                                                                                  mask: SoftSpanMask.self,
                                                                                  softCap: modifiers.softCap != nil),
                             scoredPairs: forward.scoredPairs)
    }

    /// The backward on views with the call's score modifiers (and where to add `∂bias`); with
    /// `spans`, `∂L/∂z_h` from per-(batch item, head, key block) slots summed block by block,
    /// then batch item by batch item.
    private func backward(shape: AttentionShape, scale: Float, threads: Int, keyLengths: [Int]?,
                          q: TensorView, k: TensorView, v: TensorView, o: TensorView, lse: TensorView,
                          dO: TensorView, dQ: MutableTensorView, dK: MutableTensorView, dV: MutableTensorView,
                          modifiers: ScoreModifierKernel?, biasGradient: MutableTensorView?,
                          spans gradients: UnsafeMutablePointer<[Float]>?) {
        let spans = self.spans, ramp = self.ramp, heads = shape.heads
        let blocks = TiledSoftmaxBackward.KeyBlocks.contiguous.blocksPerClass(
            keyLength: shape.keyLength, blockSize: TiledSoftmaxBackward.keyBlockSize)
        func pass(_ slot: UnsafeMutablePointer<Double>?) {
            TiledSoftmaxBackward.run(shape: shape, scale: scale, threads: threads, q: q, k: k, v: v, o: o,
                                     lse: lse, dO: dO, dQ: dQ, dK: dK, dV: dV, modifiers: modifiers,
                                     biasGradient: biasGradient) { b, h in
                var mask = SoftSpanMask(queryLength: shape.queryLength, keyLength: shape.keyLength,
                                        keyEnd: keyLengths?[b] ?? shape.keyLength, span: spans[h], ramp: ramp)
                mask.spanGradients = slot.map { $0 + (b * heads + h) * blocks }
                return mask
            }
        }
        guard let gradients else { return pass(nil) }
        let slots = shape.batch * heads * blocks
        withScratch(byteCount: slots * MemoryLayout<Double>.stride) { raw in
            let slot = raw.bindMemory(to: Double.self, capacity: slots)
            slot.initialize(repeating: 0, count: slots)
            pass(slot)
            for h in 0..<heads {
                var sum = 0.0
                for b in 0..<shape.batch { for t in 0..<blocks { sum += slot[(b * heads + h) * blocks + t] } }
                gradients.pointee[h] = Float(sum)
            }
        }
    }
}
