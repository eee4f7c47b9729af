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
    /// count. The conformers whose backward is the tiled flash kernel (dense, grouped-query,
    /// local, strided, Longformer, BigBird, custom masks, adaptive span, axial, ETC,
    /// Transformer-XL, the Compressive Transformer, Sinkhorn, PMA) widen
    /// 16-bit operands as the kernel packs them (query and `dO` rows per query tile, key and
    /// value rows per key block) and round 16-bit `dK`, `dV` rows as they write them; only a
    /// 16-bit `dQuery` (summed over the key blocks) and, for those whose passes add to `dK`,
    /// `dV` (strided, Longformer, axial with several axes, ETC, Transformer-XL, Sinkhorn), those two are staged in
    /// `Float`. LSH, routing, Linformer, memory-compressed attention, linear attention and
    /// ISAB widen rows as their hashing, routers, gathers, GEMMs, feature maps and
    /// tiled passes read them. Their 16-bit gradients are rounded as their rows are finished
    /// (Linformer's, memory-compressed attention's and ISAB's `dKey`, `dValue`; linear
    /// attention's `dQuery`), summed in `Float` a head at a time (LSH's and routing's three)
    /// or a key/value head per worker (linear attention's grouped `dKey`, `dValue`), or staged
    /// whole (the `dQuery` that Linformer's, memory-compressed attention's and ISAB's tiled
    /// passes sum over key blocks). Vanilla widens its 16-bit
    /// operands into `Float` copies and stages its 16-bit gradients. Scratch comes from `workspace` when it has
    /// room for ``backwardConversionScratchBytes(_:query:key:value:output:outputGradient:dQuery:dKey:dValue:threads:)``
    /// beyond ``DifferentiableAttention/backwardCost(_:threads:)``'s workspace (see
    /// ``AttentionWorkspace/init(forBackwardOf:shape:threads:precisions:)``).
    ///
    /// - Throws: what the `Float` entry point throws (shapes named, no gradient overlapping
    ///   an input or another gradient, checked on the caller's views), and a workspace too
    ///   small for the conversions.
    /// - Complexity: the `Float` backward's, plus one pass over each staged gradient (and,
    ///   for the conformers that copy, each 16-bit operand).
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
        // The caller's gradients are separate memory (the Float call only sees scratch).
        try checkGradientViews(s, query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                               outputGradient: outputGradient, dQuery: dQuery, dKey: dKey, dValue: dValue)
        if let workspace {
            let needed = try backwardWorkspaceBytes(s, BackwardPrecisions(
                query: query, key: key, value: value, output: output, outputGradient: outputGradient,
                dQuery: dQuery, dKey: dKey, dValue: dValue), threads: threads)
            guard workspace.byteCount >= needed else {
                throw AttentionError.invalidParameter(
                    "workspace has \(workspace.byteCount) bytes; the mixed-precision backward of \(name) needs \(needed) for \(s) (AttentionWorkspace(forBackwardOf:shape:threads:precisions:) sizes it)")
            }
        }
        func run() throws {
            // Through the metatype (see ``scoreModifiers``: casting the value would box it).
            if let widening = Self.self as? any KernelWideningBackward.Type {
                return try withUnsafePointer(to: self) {
                    try widening.widenedGradients(at: UnsafeRawPointer($0), s, query: query, key: key, value: value,
                                                  output: output, logSumExp: logSumExp, outputGradient: outputGradient,
                                                  dQuery: dQuery, dKey: dKey, dValue: dValue, keyLengths: keyLengths,
                                                  threads: threads)
                }
            }
            if let gathering = Self.self as? any OperandWideningBackward.Type {
                let staged = gathering.stagedGradients(s)
                return try withUnsafePointer(to: self) { attention in
                    try withFloatGradient(dQuery, staged: staged.query, zeroed: true, threads: threads) { dq in
                    try withFloatGradient(dKey, staged: staged.keys, threads: threads) { dk in
                    try withFloatGradient(dValue, staged: staged.keys, threads: threads) { dv in
                        try gathering.widenedOperandsBackward(
                            at: UnsafeRawPointer(attention), s, threads: try threadCount(threads), q: query.kernel,
                            k: key.kernel, v: value.kernel, o: output.kernel, lse: logSumExp.kernel,
                            dO: outputGradient.kernel, dQ: dq, dK: dk, dV: dv, keyLengths: keyLengths)
                    } } }
                }
            }
            try withWidened(query) { q in try withWidened(key) { k in try withWidened(value) { v in
            try withWidened(output) { o in try withWidened(outputGradient) { g in
            try withFloatOutput(dQuery, shape: dQuery.shape, threads: threads) { dq in
            try withFloatOutput(dKey, shape: dKey.shape, threads: threads) { dk in
            try withFloatOutput(dValue, shape: dValue.shape, threads: threads) { dv in
                try gradients(query: q, key: k, value: v, output: o, logSumExp: logSumExp, outputGradient: g,
                              dQuery: dq, dKey: dk, dValue: dv, keyLengths: keyLengths, workspace: workspace,
                              threads: threads)
            } } } } } } } }
        }
        if let workspace { try workspace.use(run) } else { try run() }
    }

    /// Bytes of scratch a mixed-precision backward
    /// (``gradients(query:key:value:output:logSumExp:outputGradient:dQuery:dKey:dValue:keyLengths:workspace:threads:)``
    /// over ``ActivationView``s) takes beyond ``backwardCost(_:threads:)``'s workspace with
    /// `threads` workers (`nil`: every active processor): for the conformers with the tiled
    /// kernel, a `Float` `dQuery` when it is 16-bit, `Float` `dKey` and `dValue` when they
    /// are 16-bit and the passes add to them, and per worker a key block's widened value
    /// rows when an operand is 16-bit; for the others, one `Float` copy per operand and
    /// gradient that is not `float32`.
    public func backwardConversionScratchBytes(
        _ shape: AttentionShape, query: ActivationPrecision, key: ActivationPrecision, value: ActivationPrecision,
        output: ActivationPrecision, outputGradient: ActivationPrecision, dQuery: ActivationPrecision,
        dKey: ActivationPrecision, dValue: ActivationPrecision, threads: Int? = nil
    ) -> Int {
        let widensOperands = query != .float32 || key != .float32 || value != .float32 || output != .float32
            || outputGradient != .float32
        /// The tiled backward's widened value rows per worker for a problem of `shape`.
        func wideningBytes(_ shape: AttentionShape) -> Int {
            TiledSoftmaxBackward.wideningBytes(shape: shape, threads: workerCount(threads: threads, items: .max))
        }
        if let widening = Self.self as? any KernelWideningBackward.Type {
            let stagesKeys = withUnsafePointer(to: self) {
                (try? widening.addsKeyGradients(at: UnsafeRawPointer($0), shape)) ?? true
            }
            return widenedCopyBytes(dQuery, shape.queryElements)
                + (stagesKeys ? widenedCopyBytes(dKey, shape.keyElements) + widenedCopyBytes(dValue, shape.valueElements) : 0)
                + (widensOperands ? wideningBytes(shape) : 0)
        }
        if let reading = Self.self as? any OperandWideningBackward.Type {
            // The tiled backward some of them run (on the call's operands or gathered rows)
            // takes a key block's widened value rows per worker when an operand is 16-bit:
            // reserved for the largest tile.
            var tile = shape
            (tile.queryLength, tile.keyLength) = (TiledSoftmaxBackward.queryTileSize, TiledSoftmaxBackward.keyBlockSize)
            let staged = reading.stagedGradients(shape)
            let partial = reading.gradientSumBytes(shape, threads: threads, dQuery: dQuery, dKey: dKey, dValue: dValue)
            return partial + (staged.query ? widenedCopyBytes(dQuery, shape.queryElements) : 0)
                + (staged.keys ? widenedCopyBytes(dKey, shape.keyElements) + widenedCopyBytes(dValue, shape.valueElements) : 0)
                + (widensOperands && reading.widensInTiledBackward ? wideningBytes(tile) : 0)
        }
        return widenedCopyBytes(query, shape.queryElements) + widenedCopyBytes(key, shape.keyElements)
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
        try self.init(byteCount: try attention.backwardWorkspaceBytes(shape, BackwardPrecisions(precisions),
                                                                      threads: threads))
    }
}

/// The precisions of a backward call's eight views.
struct BackwardPrecisions {
    var query, key, value, output, outputGradient, dQuery, dKey, dValue: ActivationPrecision

    /// The views' precisions.
    init(query: ActivationView, key: ActivationView, value: ActivationView, output: ActivationView,
         outputGradient: ActivationView, dQuery: MutableActivationView, dKey: MutableActivationView,
         dValue: MutableActivationView) {
        (self.query, self.key, self.value, self.output) = (query.precision, key.precision, value.precision,
                                                           output.precision)
        (self.outputGradient, self.dQuery, self.dKey, self.dValue) = (outputGradient.precision, dQuery.precision,
                                                                      dKey.precision, dValue.precision)
    }

    /// Each gradient in its operand's precision, `dO` in the output's.
    init(_ p: OperandPrecisions) {
        (query, key, value, output) = (p.query, p.key, p.value, p.output)
        (outputGradient, dQuery, dKey, dValue) = (p.output, p.query, p.key, p.value)
    }
}

extension DifferentiableAttention {
    /// The workspace a backward of `shape` with views of `precisions` takes: the backward
    /// cost's `workspaceBytes` plus its conversion scratch
    /// (``backwardConversionScratchBytes(_:query:key:value:output:outputGradient:dQuery:dKey:dValue:threads:)``).
    func backwardWorkspaceBytes(_ shape: AttentionShape, _ p: BackwardPrecisions, threads: Int?) throws -> Int {
        try backwardCost(shape, threads: threads).workspaceBytes + backwardConversionScratchBytes(
            shape, query: p.query, key: p.key, value: p.value, output: p.output, outputGradient: p.outputGradient,
            dQuery: p.dQuery, dKey: p.dKey, dValue: p.dValue, threads: threads)
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

/// Conformers whose backward is passes of the tiled flash kernel (``TiledBackwardCall``) with
/// masks that read no operand: their mixed-precision backward hands the kernel the caller's
/// 16-bit views, which it widens as it packs them (``TiledSoftmaxBackward``), instead of
/// `Float` copies of whole tensors.
protocol KernelWideningBackward: DifferentiableAttention {
    /// The scale of the scores (`nil`: `1/√D`).
    var scale: Float? { get }

    /// The backward's passes on a checked call (the `Float` entry point runs the same).
    func tiledBackward(_ call: TiledBackwardCall) throws

    /// Whether a later pass adds to `dK`, `dV` rows an earlier one wrote: then 16-bit key
    /// and value gradients are staged in `Float` and rounded once at the end.
    func addsKeyGradients(_ shape: AttentionShape) throws -> Bool
}

extension KernelWideningBackward {
    /// ``widenedGradients(_:query:key:value:output:logSumExp:outputGradient:dQuery:dKey:dValue:keyLengths:threads:)``
    /// of the conformer at `value` (a metatype's entry).
    static func widenedGradients(at value: UnsafeRawPointer, _ shape: AttentionShape, query: ActivationView,
                                 key: ActivationView, value values: ActivationView, output: ActivationView,
                                 logSumExp: StridedView, outputGradient: ActivationView,
                                 dQuery: MutableActivationView, dKey: MutableActivationView,
                                 dValue: MutableActivationView, keyLengths: [Int]?, threads: Int?) throws {
        try value.assumingMemoryBound(to: Self.self).pointee.widenedGradients(
            shape, query: query, key: key, value: values, output: output, logSumExp: logSumExp,
            outputGradient: outputGradient, dQuery: dQuery, dKey: dKey, dValue: dValue, keyLengths: keyLengths,
            threads: threads)
    }

    /// ``addsKeyGradients(_:)`` of the conformer at `value` (a metatype's entry).
    static func addsKeyGradients(at value: UnsafeRawPointer, _ shape: AttentionShape) throws -> Bool {
        try value.assumingMemoryBound(to: Self.self).pointee.addsKeyGradients(shape)
    }

    /// The `Float` entry point's body for these conformers.
    func tiledGradients(query: StridedView, key: StridedView, value: StridedView, output: StridedView,
                        logSumExp: StridedView, outputGradient: StridedView,
                        dQuery: MutableStridedView, dKey: MutableStridedView, dValue: MutableStridedView,
                        keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws {
        try withTiledBackwardCall(query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                                  outputGradient: outputGradient, dQuery: dQuery, dKey: dKey, dValue: dValue,
                                  keyLengths: keyLengths, workspace: workspace, threads: threads, scale: scale) {
            try tiledBackward($0)
        }
    }

    /// The mixed-precision backward on checked views (in the workspace's scope): the
    /// passes on the caller's operands, `dQ` summed in `Float` (staged when 16-bit), `dK`,
    /// `dV` written by the kernel unless staged (``addsKeyGradients(_:)``).
    func widenedGradients(_ shape: AttentionShape, query: ActivationView, key: ActivationView, value: ActivationView,
                          output: ActivationView, logSumExp: StridedView, outputGradient: ActivationView,
                          dQuery: MutableActivationView, dKey: MutableActivationView, dValue: MutableActivationView,
                          keyLengths: [Int]?, threads: Int?) throws {
        let workers = try threadCount(threads)
        try checkModifiersForBackward(shape)
        let stagesKeys = try addsKeyGradients(shape)
        let scale = self.scale ?? 1 / Float(shape.headDim).squareRoot()
        try withFloatGradient(dQuery, zeroed: true, threads: workers) { dq in
        try withFloatGradient(dKey, staged: stagesKeys, threads: workers) { dk in
        try withFloatGradient(dValue, staged: stagesKeys, threads: workers) { dv in
            var call = TiledBackwardCall(shape: shape, scale: scale, threads: workers, keyLengths: keyLengths,
                                         q: query.kernel, k: key.kernel, v: value.kernel, o: output.kernel,
                                         lse: logSumExp.kernel, dO: outputGradient.kernel, dQ: dq, dK: dk, dV: dv)
            try withModifierBackward(shape) { modifiers, biasGradient in
                (call.modifiers, call.biasGradient) = (modifiers, biasGradient)
                try tiledBackward(call)
            }
        } } }
    }
}

/// Conformers whose backward kernels read operands of any precision, widening rows as
/// their gathers, packings and GEMMs copy them (LSH and routing through
/// ``PermutedBlockAttention/Rows``, Linformer through the GEMM's packing and the tiled
/// backward), but write `Float` gradients: their mixed-precision backward hands the kernels
/// the caller's 16-bit operand views and stages 16-bit gradients in `Float` (all but those
/// a kernel writes in their precision, ``stagedGradients(_:)``).
protocol OperandWideningBackward: DifferentiableAttention {
    /// The backward on checked views: operands of any precision, gradients `Float` or as
    /// ``stagedGradients(_:)`` leaves them, `dQ` zero-filled; the same bits as the `Float`
    /// entry point on the widened operands.
    func widenedOperandsBackward(_ shape: AttentionShape, threads: Int, q: TensorView, k: TensorView,
                                 v: TensorView, o: TensorView, lse: TensorView, dO: TensorView,
                                 dQ: MutableTensorView, dK: MutableTensorView, dV: MutableTensorView,
                                 keyLengths: [Int]?) throws

    /// Whether the tiled backward runs on the caller's operands (and so widens 16-bit rows
    /// into per-worker scratch); `false` for gathered or feature-mapped `Float` rows.
    static var widensInTiledBackward: Bool { get }

    /// Which 16-bit gradients of a call of `shape` are staged in `Float` (`keys`: `dK` and
    /// `dV`); the others reach the kernel in their precision. Staged unless a conformer says
    /// otherwise.
    static func stagedGradients(_ shape: AttentionShape) -> (query: Bool, keys: Bool)

    /// Bytes of `Float` scratch the backward takes itself (from the workspace) to sum the
    /// 16-bit gradients ``stagedGradients(_:)`` does not stage a part at a time (a head's or a
    /// worker's rows, ``forEachHeadSummingGradients(_:dQ:dK:dV:_:)``); 0 unless a conformer
    /// says otherwise.
    static func gradientSumBytes(_ shape: AttentionShape, threads: Int?, dQuery: ActivationPrecision,
                                 dKey: ActivationPrecision, dValue: ActivationPrecision) -> Int
}

extension OperandWideningBackward {
    static var widensInTiledBackward: Bool { true }

    static func stagedGradients(_ shape: AttentionShape) -> (query: Bool, keys: Bool) { (true, true) }

    static func gradientSumBytes(_ shape: AttentionShape, threads: Int?, dQuery: ActivationPrecision,
                                 dKey: ActivationPrecision, dValue: ActivationPrecision) -> Int { 0 }

    /// ``widenedOperandsBackward(_:threads:q:k:v:o:lse:dO:dQ:dK:dV:keyLengths:)`` of the conformer
    /// at `value` (a metatype's entry).
    static func widenedOperandsBackward(at value: UnsafeRawPointer, _ shape: AttentionShape, threads: Int, q: TensorView,
                                 k: TensorView, v: TensorView, o: TensorView, lse: TensorView, dO: TensorView,
                                 dQ: MutableTensorView, dK: MutableTensorView, dV: MutableTensorView,
                                 keyLengths: [Int]?) throws {
        try value.assumingMemoryBound(to: Self.self).pointee.widenedOperandsBackward(
            shape, threads: threads, q: q, k: k, v: v, o: o, lse: lse, dO: dO, dQ: dQ, dK: dK, dV: dV,
            keyLengths: keyLengths)
    }
}

/// Bytes of `Float` scratch for one head's rows of each 16-bit gradient (0 for a `Float` one):
/// a query head's `dQ`, a key/value head's `dK` and `dV`.
func headGradientBytes(_ shape: AttentionShape, dQuery: ActivationPrecision, dKey: ActivationPrecision,
                       dValue: ActivationPrecision) -> (query: Int, key: Int, value: Int, total: Int) {
    let q = widenedCopyBytes(dQuery, shape.queryLength * shape.headDim)
    let k = widenedCopyBytes(dKey, shape.keyLength * shape.headDim)
    let v = widenedCopyBytes(dValue, shape.keyLength * shape.valueDim)
    return (q, k, v, q + k + v)
}

/// Runs `body(b, h, dQ, dK, dV)` for every head, batch item by batch item and heads in
/// order, for backward passes that run heads one after another and add to head `(b, h)`'s
/// `dQ` rows only while it runs and to `(b, h / (H / Hkv))`'s `dK`, `dV` rows only while the
/// heads of its group run (LSH, routing). A 16-bit gradient is summed in `Float` scratch of
/// one head's rows (the views `body` gets have batch and head strides 0), zeroed before the
/// head (for `dK`, `dV`: its group) starts and rounded into the caller's rows once it ends:
/// the same sums in the same order as the `Float` call's, so its bits, rounded once, from
/// scratch of one head instead of whole `Float` copies. `Float` gradients are the caller's
/// (`dQ` as the caller zero-filled it; `dK`, `dV` zero-filled here).
func forEachHeadSummingGradients(
    _ shape: AttentionShape, dQ: MutableTensorView, dK: MutableTensorView, dV: MutableTensorView,
    _ body: (_ b: Int, _ h: Int, _ dQ: MutableTensorView, _ dK: MutableTensorView, _ dV: MutableTensorView) -> Void
) {
    let (nq, nk, d, dv, g) = (shape.queryLength, shape.keyLength, shape.headDim, shape.valueDim, shape.groupSize)
    let bytes = headGradientBytes(shape, dQuery: dQ.precision, dKey: dK.precision, dValue: dV.precision)
    if bytes.key == 0 { dK.zero(batch: shape.batch, heads: shape.kvHeads, rows: nk, width: d) }
    if bytes.value == 0 { dV.zero(batch: shape.batch, heads: shape.kvHeads, rows: nk, width: dv) }
    withScratch(byteCount: bytes.total) { raw in
        /// One head's `rows × width` floats at `offset`, or `gradient` itself when it is `Float`.
        func head(_ gradient: MutableTensorView, _ offset: Int, _ floats: Int, width: Int) -> MutableTensorView {
            floats == 0 ? gradient
                : MutableTensorView(base: (raw + offset).bindMemory(to: Float.self, capacity: floats),
                                    strides: SIMD4(0, 0, width, 1))
        }
        let q = head(dQ, 0, bytes.query == 0 ? 0 : nq * d, width: d)
        let k = head(dK, bytes.query, bytes.key == 0 ? 0 : nk * d, width: d)
        let v = head(dV, bytes.query + bytes.key, bytes.value == 0 ? 0 : nk * dv, width: dv)
        for b in 0..<shape.batch {
            for h in 0..<shape.heads {
                let hk = h / g
                if bytes.query > 0 { q.zero(batch: 1, heads: 1, rows: nq, width: d) }
                if h % g == 0 {
                    if bytes.key > 0 { k.zero(batch: 1, heads: 1, rows: nk, width: d) }
                    if bytes.value > 0 { v.zero(batch: 1, heads: 1, rows: nk, width: dv) }
                }
                body(b, h, q, k, v)
                if bytes.query > 0 { dQ.storeRows(b, h, rows: nq, from: q.row(0, 0, 0), width: d) }
                if h % g == g - 1 {
                    if bytes.key > 0 { dK.storeRows(b, hk, rows: nk, from: k.row(0, 0, 0), width: d) }
                    if bytes.value > 0 { dV.storeRows(b, hk, rows: nk, from: v.row(0, 0, 0), width: dv) }
                }
            }
        }
    }
}

/// Runs `body` with the kernel view of `gradient`, or, when it is 16-bit and `staged`,
/// with `Float` scratch whose rows are then rounded into it; `zeroed`: the view `body`
/// gets holds zeros.
private func withFloatGradient(_ gradient: MutableActivationView, staged: Bool = true, zeroed: Bool = false,
                               threads: Int?, _ body: (MutableTensorView) throws -> Void) throws {
    let shape = gradient.shape
    guard gradient.precision != .float32 && staged else {
        if zeroed { gradient.kernel.zero(batch: shape[0], heads: shape[1], rows: shape[2], width: shape[3]) }
        return try body(gradient.kernel)
    }
    try withStaged(gradient.kernel, shape: shape, threads: threads) { scratch in
        if zeroed { scratch.zero(batch: shape[0], heads: shape[1], rows: shape[2], width: shape[3]) }
        try body(scratch)
    }
}
