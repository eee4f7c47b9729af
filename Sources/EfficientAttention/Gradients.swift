/// The gradients of a loss with respect to an attention call's inputs, given the gradient
/// `dO` of that loss with respect to the call's output (ATTENTION_SPEC.md, "Gradients").
public struct AttentionGradients: Sendable, Equatable {
    /// `∂L/∂query`, `[B, H, Nq, D]`.
    public var dQuery: Tensor
    /// `∂L/∂key`, `[B, Hkv, Nk, D]`: summed over the query heads of each key/value head's group.
    public var dKey: Tensor
    /// `∂L/∂value`, `[B, Hkv, Nk, Dv]`: summed over the query heads of each group.
    public var dValue: Tensor

    public init(dQuery: Tensor, dKey: Tensor, dValue: Tensor) {
        self.dQuery = dQuery
        self.dKey = dKey
        self.dValue = dValue
    }
}

/// An attention conformer with a backward pass.
///
/// `gradients` takes the forward's inputs, the output and log-sum-exp its `attend` returned
/// for them (same key lengths), and `dO = ∂L/∂output`, and returns `∂L/∂query`, `∂L/∂key`,
/// `∂L/∂value`: the exact derivatives of the forward (up to rounding), with the
/// probabilities recomputed from the log-sum-exp. Keys no query sees (key padding, causal)
/// get zero gradients, and so do queries with no visible key (`lse = −∞`). Results are
/// bitwise identical for every thread count.
public protocol DifferentiableAttention: Attention {
    /// The gradients of a loss through one ``Attention/attend(query:key:value:keyLengths:threads:)``
    /// call (see the protocol).
    ///
    /// - Parameters:
    ///   - output: the forward's output `[B, H, Nq, Dv]`.
    ///   - logSumExp: the forward's log-sum-exp `[B, H, Nq, 1]`.
    ///   - outputGradient: `dO`, `[B, H, Nq, Dv]`.
    ///   - keyLengths, threads: as for the forward (`threads` may differ from the forward's).
    /// - Throws: what the forward throws for the inputs, and
    ///   ``AttentionError/shapeMismatch(_:)`` naming `output`, `logSumExp` or
    ///   `outputGradient` when its shape does not fit the problem.
    func gradients(query: StridedView, key: StridedView, value: StridedView, output: StridedView,
                   logSumExp: StridedView, outputGradient: StridedView,
                   dQuery: MutableStridedView, dKey: MutableStridedView, dValue: MutableStridedView,
                   keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws

    /// FLOPs (counted as `2.5 ×` the forward's, the usual convention for a flash backward),
    /// workspace and scored pairs of ``gradients(query:key:value:output:logSumExp:outputGradient:keyLengths:threads:)``
    /// for `shape` with `threads` workers. Throws what ``Attention/validate(_:)`` throws.
    func backwardCost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost
}

extension DifferentiableAttention {
    /// The owning convenience over the view entry point
    /// (``gradients(query:key:value:output:logSumExp:outputGradient:dQuery:dKey:dValue:keyLengths:workspace:threads:)``):
    /// allocates the three gradients.
    public func gradients(query: Tensor, key: Tensor, value: Tensor, output: Tensor, logSumExp: Tensor,
                          outputGradient: Tensor, keyLengths: [Int]?, threads: Int?) throws -> AttentionGradients {
        let s = try checkedGradientCall(query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                                        outputGradient: outputGradient, keyLengths: keyLengths, threads: threads,
                                        scale: nil).shape
        var dq = try Tensor.uninitializedOutput(shape: [s.batch, s.heads, s.queryLength, s.headDim])
        var dk = try Tensor.uninitializedOutput(shape: [s.batch, s.kvHeads, s.keyLength, s.headDim])
        var dv = try Tensor.uninitializedOutput(shape: [s.batch, s.kvHeads, s.keyLength, s.valueDim])
        try query.withStridedView { q in try key.withStridedView { k in try value.withStridedView { v in
        try output.withStridedView { o in try logSumExp.withStridedView { l in try outputGradient.withStridedView { g in
        try dq.withMutableStridedView { dQ in try dk.withMutableStridedView { dK in try dv.withMutableStridedView { dV in
            try gradients(query: q, key: k, value: v, output: o, logSumExp: l, outputGradient: g,
                          dQuery: dQ, dKey: dK, dValue: dV, keyLengths: keyLengths, workspace: nil, threads: threads)
        } } } } } } } } }
        return AttentionGradients(dQuery: dq, dKey: dk, dValue: dv)
    }

    /// The checks of the view entry point, then `body` with the shape, the scale and the
    /// kernels' views (in the scope of `workspace`): the forward's checks on the inputs,
    /// `output`, `logSumExp`, `outputGradient` and the three gradients of the problem's
    /// shapes (each named), no gradient overlapping an input or another gradient, and the
    /// workspace at least ``backwardCost(_:threads:)``'s. `dQuery` is zero-filled.
    func withCheckedGradientCall(
        query: StridedView, key: StridedView, value: StridedView, output: StridedView, logSumExp: StridedView,
        outputGradient: StridedView, dQuery: MutableStridedView, dKey: MutableStridedView, dValue: MutableStridedView,
        keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?, scale: Float?,
        _ body: (AttentionShape, Float) throws -> Void
    ) throws {
        let s = try AttentionShape(query: query, key: key, value: value)
        try validate(s)
        try checkCallArguments(s, keyLengths: keyLengths, threads: threads)
        try checkModifiersForBackward(s)
        try checkGradientViews(s, query: ActivationView(query), key: ActivationView(key), value: ActivationView(value),
                               output: ActivationView(output), logSumExp: logSumExp,
                               outputGradient: ActivationView(outputGradient), dQuery: MutableActivationView(dQuery),
                               dKey: MutableActivationView(dKey), dValue: MutableActivationView(dValue))
        if let workspace {
            let needed = try backwardCost(s, threads: threads).workspaceBytes
            guard workspace.byteCount >= needed else {
                throw AttentionError.invalidParameter(
                    "workspace has \(workspace.byteCount) bytes; the backward of \(name) needs \(needed) for \(s)")
            }
        }
        // The kernel adds each key block's part of dQ: start from zero.
        dQuery.kernel.zero(batch: s.batch, heads: s.heads, rows: s.queryLength, width: s.headDim)
        let scale = scale ?? 1 / Float(s.headDim).squareRoot()
        if let workspace { try workspace.use { try body(s, scale) } } else { try body(s, scale) }
    }

    /// Throws unless this conformer's score modifiers (if it takes any) fit `shape` (the
    /// forward's checks, naming the option) and its backward applies them (conformers marked
    /// ``ModifierDifferentiable``; the others refuse modifiers rather than ignore them).
    func checkModifiersForBackward(_ shape: AttentionShape) throws {
        guard let modifiers = scoreModifiers else { return }
        try modifiers.validate(shape)
        if !modifiers.isEmpty && !(Self.self is any ModifierDifferentiable.Type) {
            throw AttentionError.unsupported(
                "\(name) gradients: score modifiers (soft-capping, ALiBi, bias, sinks) have no backward pass yet")
        }
    }

    /// The gradients of a loss through the call that gave `result`, all keys visible unless
    /// `keyLengths` says otherwise.
    public func gradients(query: Tensor, key: Tensor, value: Tensor, result: AttentionResult,
                          outputGradient: Tensor, keyLengths: [Int]? = nil,
                          threads: Int? = nil) throws -> AttentionGradients {
        try gradients(query: query, key: key, value: value, output: result.output, logSumExp: result.logSumExp,
                      outputGradient: outputGradient, keyLengths: keyLengths, threads: threads)
    }

    /// The backward cost of `shape` with every active processor.
    public func backwardCost(_ shape: AttentionShape) throws -> AttentionCost {
        try backwardCost(shape, threads: nil)
    }

    /// The checks every `gradients` starts with: the forward's checks (``checkedCall(query:key:value:keyLengths:threads:scale:)``),
    /// then the shapes of `output`, `logSumExp` and `outputGradient`, and the allocation of
    /// the three gradients. Returns the shape and the scale.
    func checkedGradientCall(query: Tensor, key: Tensor, value: Tensor, output: Tensor, logSumExp: Tensor,
                             outputGradient: Tensor, keyLengths: [Int]?, threads: Int?,
                             scale: Float?) throws -> (shape: AttentionShape, scale: Float) {
        let checked = try checkedCall(query: query, key: key, value: value, keyLengths: keyLengths,
                                      threads: threads, scale: scale)
        let s = checked.shape
        let rows = [s.batch, s.heads, s.queryLength]
        for (name, tensor, expected) in [("output", output, rows + [s.valueDim]),
                                         ("logSumExp", logSumExp, rows + [1]),
                                         ("outputGradient", outputGradient, rows + [s.valueDim])]
            where tensor.shape != expected {
            throw AttentionError.shapeMismatch(
                "\(name) has shape \(tensor.shape), expected \(expected) for query \(query.shape) and value \(value.shape)")
        }
        try checkFloatAllocation(s.batch, s.heads, s.queryLength, s.headDim, option: "dQuery [B, H, Nq, D]")
        try checkFloatAllocation(s.batch, s.kvHeads, s.keyLength, s.headDim, option: "dKey [B, Hkv, Nk, D]")
        try checkFloatAllocation(s.batch, s.kvHeads, s.keyLength, s.valueDim, option: "dValue [B, Hkv, Nk, Dv]")
        return checked
    }
}

// MARK: - Dense attention

extension DenseAttention: KernelWideningBackward {
    func tiledBackward(_ call: TiledBackwardCall) throws {
        let causal = self.causal, shape = call.shape
        call.run { _, keyEnd in
            IntervalMask(queryLength: shape.queryLength, keyLength: shape.keyLength, causal: causal, keyEnd: keyEnd)
        }
    }

    func addsKeyGradients(_ shape: AttentionShape) -> Bool { false }

    /// The flash-style backward of the tiled kernel (``TiledSoftmaxBackward``,
    /// KernelDocs/Dense.md, "Backward"): one pass over blocks of 128 keys, each computing its
    /// `dK`, `dV` rows and adding its part of `dQ` in block order (deterministic without
    /// atomics), skipping the query tiles that see none of its keys; no `Nq × Nk` buffer.
    ///
    /// ```
    /// // naive reference, for each b, h, i with visible keys J (hk = h / (H / Hkv)):
    /// P[j]  = exp(scale · dot(q[b,h,i], k[b,hk,j]) − lse[b,h,i])      j in J
    /// dP[j] = dot(dO[b,h,i], v[b,hk,j]),  Di = dot(dO[b,h,i], o[b,h,i])
    /// dS[j] = P[j] · (dP[j] − Di)
    /// dQ[b,h,i]   = scale · Σ_j dS[j] · k[b,hk,j]
    /// dK[b,hk,j] += scale · dS[j] · q[b,h,i],   dV[b,hk,j] += P[j] · dO[b,h,i]
    /// ```
    ///
    /// - Complexity: `6·D + 4·Dv` FLOPs per visible pair (the cost model counts the
    ///   conventional `2.5 ×` the forward's `2·(D + Dv)`, the same for `Dv = D`); workspace
    ///   of about 341 KiB per thread at `D = Dv = 64`, independent of `Nq` and `Nk`, plus one
    ///   `Int` per 128 keys per key/value head for the ordering of the `dQ` sums.
    public func gradients(query: StridedView, key: StridedView, value: StridedView, output: StridedView,
                          logSumExp: StridedView, outputGradient: StridedView,
                          dQuery: MutableStridedView, dKey: MutableStridedView, dValue: MutableStridedView,
                          keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws {
        try tiledGradients(query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                           outputGradient: outputGradient, dQuery: dQuery, dKey: dKey, dValue: dValue,
                           keyLengths: keyLengths, workspace: workspace, threads: threads)
    }

    public func backwardCost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        let forward = try cost(shape, threads: threads)
        return AttentionCost(flops: 2.5 * forward.flops,
                             workspaceBytes: TiledSoftmaxBackward.workspaceBytes(shape: shape, threads: threads,
                                                                                  softCap: modifiers.softCap != nil),
                             scoredPairs: forward.scoredPairs)
    }
}

// MARK: - Parameter gradients

/// The kernel views of one `parameterGradients` call: its inputs, the forward's output and
/// log-sum-exp, `dO`, and the freshly allocated input gradients (`dQ` zero-filled).
struct ParameterGradientCall {
    let shape: AttentionShape
    let scale: Float
    let threads: Int
    let q, k, v, o, lse, dO: TensorView
    let dQ, dK, dV: MutableTensorView
}

extension DifferentiableAttention {
    /// The Tensor convenience's checks (``checkedGradientCall(query:key:value:output:logSumExp:outputGradient:keyLengths:threads:scale:)``),
    /// then `body` with the call's kernel views; returns the input gradients `body` wrote.
    /// For the conformers' `parameterGradients`, which add their parameters' gradients
    /// into arrays of their own in `body`.
    func withParameterGradientCall(query: Tensor, key: Tensor, value: Tensor, result: AttentionResult,
                                   outputGradient: Tensor, keyLengths: [Int]?, threads: Int?, scale: Float?,
                                   _ body: (ParameterGradientCall) throws -> Void) throws -> AttentionGradients {
        let s = try checkedGradientCall(query: query, key: key, value: value, output: result.output,
                                        logSumExp: result.logSumExp, outputGradient: outputGradient,
                                        keyLengths: keyLengths, threads: threads, scale: scale)
        let shape = s.shape, threads = try threadCount(threads)
        try checkModifiersForBackward(shape)
        var dq = try Tensor(shape: [shape.batch, shape.heads, shape.queryLength, shape.headDim])
        var dk = try Tensor.uninitializedOutput(shape: [shape.batch, shape.kvHeads, shape.keyLength, shape.headDim])
        var dv = try Tensor.uninitializedOutput(shape: [shape.batch, shape.kvHeads, shape.keyLength, shape.valueDim])
        try query.withStridedView { q in try key.withStridedView { k in try value.withStridedView { v in
        try result.output.withStridedView { o in try result.logSumExp.withStridedView { l in
        try outputGradient.withStridedView { g in
        try dq.withMutableStridedView { dQ in try dk.withMutableStridedView { dK in try dv.withMutableStridedView { dV in
            try body(ParameterGradientCall(shape: shape, scale: s.scale, threads: threads,
                                           q: q.kernel, k: k.kernel, v: v.kernel, o: o.kernel, lse: l.kernel,
                                           dO: g.kernel, dQ: dQ.kernel, dK: dK.kernel, dV: dV.kernel))
        } } } } } } } } }
        return AttentionGradients(dQuery: dq, dKey: dk, dValue: dv)
    }
}

/// Throws unless the backward's views fit problem `s` (``checkGradientShapes(_:query:key:value:output:logSumExp:outputGradient:dQuery:dKey:dValue:)``)
/// and the gradients overlap neither each other nor an input (``checkSeparateGradients(dQuery:dKey:dValue:reading:)``).
func checkGradientViews(_ s: AttentionShape, query: ActivationView, key: ActivationView, value: ActivationView,
                        output: ActivationView, logSumExp: StridedView, outputGradient: ActivationView,
                        dQuery: MutableActivationView, dKey: MutableActivationView, dValue: MutableActivationView) throws {
    try checkGradientShapes(s, query: query.shape, key: key.shape, value: value.shape, output: output.shape,
                            logSumExp: logSumExp.shape, outputGradient: outputGradient.shape,
                            dQuery: dQuery.shape, dKey: dKey.shape, dValue: dValue.shape)
    try checkSeparateGradients(
        dQuery: dQuery.addressRange, dKey: dKey.addressRange, dValue: dValue.addressRange,
        reading: [query.addressRange, key.addressRange, value.addressRange, output.addressRange,
                  logSumExp.addressRange, outputGradient.addressRange])
}

/// Throws unless the backward's views other than query, key and value have the shapes of
/// problem `s` (the gradients those of the inputs), naming the first that does not.
/// Allocation-free (static strings, no arrays).
func checkGradientShapes(_ s: AttentionShape, query: SIMD4<Int>, key: SIMD4<Int>, value: SIMD4<Int>,
                         output: SIMD4<Int>, logSumExp: SIMD4<Int>, outputGradient: SIMD4<Int>,
                         dQuery: SIMD4<Int>, dKey: SIMD4<Int>, dValue: SIMD4<Int>) throws {
    func expect(_ view: SIMD4<Int>, _ shape: SIMD4<Int>, _ name: StaticString, _ letters: StaticString) throws {
        guard view == shape else {
            throw AttentionError.shapeMismatch("\(name) is \(list(view)), expected \(letters) = \(list(shape))")
        }
    }
    try expect(output, SIMD4(s.batch, s.heads, s.queryLength, s.valueDim), "output", "[B, H, Nq, Dv]")
    try expect(logSumExp, SIMD4(s.batch, s.heads, s.queryLength, 1), "logSumExp", "[B, H, Nq, 1]")
    try expect(outputGradient, SIMD4(s.batch, s.heads, s.queryLength, s.valueDim), "outputGradient", "[B, H, Nq, Dv]")
    try expect(dQuery, query, "dQuery", "[B, H, Nq, D]")
    try expect(dKey, key, "dKey", "[B, Hkv, Nk, D]")
    try expect(dValue, value, "dValue", "[B, Hkv, Nk, Dv]")
}
