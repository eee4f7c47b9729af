/// Float16 and BFloat16 activations in the backward pass (issue 18 with the calling
/// convention's item 4): the gradients of a call whose operands are 16-bit, written in the
/// caller's 16-bit buffers.

extension DifferentiableAttention {
    /// The gradients (``DifferentiableAttention``) of a call over ``ActivationView``s: `query`,
    /// `key`, `value`, `output` and `outputGradient` each in its own precision (Float32,
    /// Float16 or BFloat16), the log-sum-exp in `Float`, and `dQuery`, `dKey`, `dValue`
    /// written in theirs. Accumulation is in `Float`.
    ///
    /// The result is the `Float` backward on the widened operands with each gradient element
    /// rounded once to its view's precision (nearest even), bit for bit, for any thread
    /// count. The 16-bit operands are widened into `Float` scratch and the 16-bit gradients
    /// staged there (from `workspace` when it has room for
    /// ``backwardConversionScratchBytes(_:query:key:value:output:outputGradient:dQuery:dKey:dValue:)``
    /// beyond ``DifferentiableAttention/backwardCost(_:threads:)``'s workspace; see
    /// ``AttentionWorkspace/init(forBackwardOf:shape:threads:precisions:)``).
    ///
    /// - Throws: what the `Float` entry point throws (shapes named, no gradient overlapping
    ///   an input or another gradient, checked on the caller's views), and a workspace too
    ///   small for the conversions.
    /// - Complexity: the `Float` backward's, plus one pass over each 16-bit operand and gradient.
    public func gradients(query: ActivationView, key: ActivationView, value: ActivationView, output: ActivationView,
                          logSumExp: StridedView, outputGradient: ActivationView,
                          dQuery: MutableActivationView, dKey: MutableActivationView, dValue: MutableActivationView,
                          keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws {
        if let q = query.float32, let k = key.float32, let v = value.float32, let o = output.float32,
           let g = outputGradient.float32, let dq = dQuery.float32, let dk = dKey.float32, let dv = dValue.float32 {
            return try gradients(query: q, key: k, value: v, output: o, logSumExp: logSumExp, outputGradient: g,
                                 dQuery: dq, dKey: dk, dValue: dv, keyLengths: keyLengths, workspace: workspace,
                                 threads: threads)
        }
        let s = try AttentionShape(query: query.shape, key: key.shape, value: value.shape)
        try validate(s)
        try checkCallArguments(s, keyLengths: keyLengths, threads: threads)
        try checkGradientShapes(s, query: query.shape, key: key.shape, value: value.shape, output: output.shape,
                                logSumExp: logSumExp.shape, outputGradient: outputGradient.shape,
                                dQuery: dQuery.shape, dKey: dKey.shape, dValue: dValue.shape)
        // The caller's gradients are separate memory (the Float call only sees scratch).
        try checkSeparateGradients(
            dQuery: dQuery.addressRange, dKey: dKey.addressRange, dValue: dValue.addressRange,
            reading: [query.addressRange, key.addressRange, value.addressRange, output.addressRange,
                      logSumExp.addressRange, outputGradient.addressRange])
        if let workspace {
            let needed = try backwardCost(s, threads: threads).workspaceBytes
                + backwardConversionScratchBytes(s, query: query.precision, key: key.precision, value: value.precision,
                                                 output: output.precision, outputGradient: outputGradient.precision,
                                                 dQuery: dQuery.precision, dKey: dKey.precision, dValue: dValue.precision)
            guard workspace.byteCount >= needed else {
                throw AttentionError.invalidParameter(
                    "workspace has \(workspace.byteCount) bytes; the mixed-precision backward of \(name) needs \(needed) for \(s) (AttentionWorkspace(forBackwardOf:shape:threads:precisions:) sizes it)")
            }
        }
        func run() throws {
            try withWidened(query) { q in try withWidened(key) { k in try withWidened(value) { v in
            try withWidened(output) { o in try withWidened(outputGradient) { g in
            try withFloatOutput(dQuery, shape: dQuery.shape) { dq in
            try withFloatOutput(dKey, shape: dKey.shape) { dk in
            try withFloatOutput(dValue, shape: dValue.shape) { dv in
                try gradients(query: q, key: k, value: v, output: o, logSumExp: logSumExp, outputGradient: g,
                              dQuery: dq, dKey: dk, dValue: dv, keyLengths: keyLengths, workspace: workspace,
                              threads: threads)
            } } } } } } } }
        }
        if let workspace { try workspace.use(run) } else { try run() }
    }

    /// Bytes of the `Float` copies a mixed-precision backward
    /// (``gradients(query:key:value:output:logSumExp:outputGradient:dQuery:dKey:dValue:keyLengths:workspace:threads:)``
    /// over ``ActivationView``s) makes: one per operand and gradient that is not `float32`.
    public func backwardConversionScratchBytes(
        _ shape: AttentionShape, query: ActivationPrecision, key: ActivationPrecision, value: ActivationPrecision,
        output: ActivationPrecision, outputGradient: ActivationPrecision, dQuery: ActivationPrecision,
        dKey: ActivationPrecision, dValue: ActivationPrecision
    ) -> Int {
        widenedCopyBytes(query, shape.queryElements) + widenedCopyBytes(key, shape.keyElements)
            + widenedCopyBytes(value, shape.valueElements) + widenedCopyBytes(output, shape.outputElements)
            + widenedCopyBytes(outputGradient, shape.outputElements) + widenedCopyBytes(dQuery, shape.queryElements)
            + widenedCopyBytes(dKey, shape.keyElements) + widenedCopyBytes(dValue, shape.valueElements)
    }
}

extension AttentionWorkspace {
    /// A workspace for mixed-precision backward calls of `attention` on problems up to
    /// `shape` with `threads` workers: its backward cost's `workspaceBytes` plus the `Float`
    /// copies of the operands in `precisions` and of gradients in their operands' precisions
    /// (`dQuery` like the query, `dKey` like the key, `dValue` like the value, `dO` like the
    /// output).
    public convenience init(forBackwardOf attention: some DifferentiableAttention, shape: AttentionShape,
                            threads: Int? = nil, precisions: OperandPrecisions = OperandPrecisions(.float32)) throws {
        let cost = try attention.backwardCost(shape, threads: threads)
        let p = precisions
        try self.init(byteCount: cost.workspaceBytes + attention.backwardConversionScratchBytes(
            shape, query: p.query, key: p.key, value: p.value, output: p.output, outputGradient: p.output,
            dQuery: p.query, dKey: p.key, dValue: p.value))
    }
}

/// Throws unless the three gradients' address ranges overlap neither each other nor the
/// call's inputs (`reading`: query, key, value, output, logSumExp, outputGradient, in that
/// order), naming the pair.
func checkSeparateGradients(dQuery: Range<UInt>, dKey: Range<UInt>, dValue: Range<UInt>,
                            reading: InlineArray<6, Range<UInt>>) throws {
    // Fixed-size storage (no allocation on a call that passes).
    let names: InlineArray<9, StaticString> = ["dQuery", "dKey", "dValue", "query", "key", "value", "output",
                                               "logSumExp", "outputGradient"]
    let ranges: InlineArray<9, Range<UInt>> = [dQuery, dKey, dValue, reading[0], reading[1], reading[2],
                                               reading[3], reading[4], reading[5]]
    for n in 0..<3 {
        for m in (n + 1)..<9 where ranges[n].overlaps(ranges[m]) {
            throw AttentionError.invalidParameter("\(names[n]) overlaps \(names[m]): gradients must be separate memory")
        }
    }
}
