/// Sequences of different lengths packed along the position axis, described by cumulative
/// offsets (`cu_seqlens`): query rows `queryOffsets[s] ..< queryOffsets[s + 1]` and key
/// rows `keyOffsets[s] ..< keyOffsets[s + 1]` of a `[1, H, ΣNq_s, D]` query and
/// `[1, Hkv, ΣNk_s, ·]` key and value belong to sequence `s`, which attends only within
/// itself, with every rule of the conformer (causal alignment, windows, patterns) applied
/// per sequence (../shared/ATTENTION_SPEC.md, "Packed variable-length batches").
///
/// ```swift
/// let packed = try PackedSequences(lengths: [300, 2048, 64])      // self-attention
/// try DenseAttention(causal: true).attend(query: q, key: k, value: v, output: o,
///                                         logSumExp: nil, sequences: packed, workspace: w, threads: 2)
/// ```
public struct PackedSequences: Sendable, Equatable {
    /// `S + 1` non-decreasing offsets from 0: the query rows of each sequence.
    public let queryOffsets: [Int]
    /// `S + 1` non-decreasing offsets from 0: the key rows of each sequence.
    public let keyOffsets: [Int]

    /// Sequences with the given cumulative offsets (both `S + 1` long, starting at 0,
    /// non-decreasing). Throws naming the offending entry.
    public init(queryOffsets: [Int], keyOffsets: [Int]) throws {
        try PackedSequences.check(queryOffsets, "queryOffsets")
        try PackedSequences.check(keyOffsets, "keyOffsets")
        guard queryOffsets.count == keyOffsets.count else {
            throw AttentionError.invalidParameter(
                "queryOffsets has \(queryOffsets.count) entries and keyOffsets \(keyOffsets.count): one per sequence plus one each")
        }
        self.queryOffsets = queryOffsets
        self.keyOffsets = keyOffsets
    }

    /// Self-attention sequences of the given lengths (queries and keys alike).
    public init(lengths: [Int]) throws {
        var offsets = [0]
        offsets.reserveCapacity(lengths.count + 1)
        for (s, length) in lengths.enumerated() {
            guard length >= 0 else {
                throw AttentionError.invalidParameter("lengths[\(s)] must be at least 0, got \(length)")
            }
            let (sum, overflow) = offsets[s].addingReportingOverflow(length)
            guard !overflow, sum <= lengthLimit else {
                throw AttentionError.invalidParameter("the packed lengths add up to more than \(lengthLimit) (lengthLimit)")
            }
            offsets.append(sum)
        }
        try self.init(queryOffsets: offsets, keyOffsets: offsets)
    }

    /// The number of sequences.
    public var count: Int { queryOffsets.count - 1 }

    /// The shape of sequence `s` within a packed problem of `packed`'s heads and dimensions.
    func shape(_ s: Int, of packed: AttentionShape) -> AttentionShape {
        AttentionShape(batch: 1, heads: packed.heads, kvHeads: packed.kvHeads,
                       queryLength: queryOffsets[s + 1] - queryOffsets[s],
                       keyLength: keyOffsets[s + 1] - keyOffsets[s],
                       headDim: packed.headDim, valueDim: packed.valueDim)
    }

    /// The shape of sequence `s` for these dimensions (`@_spi(Testing)`).
    @_spi(Testing) public func shapeForTesting(_ s: Int, heads: Int, kvHeads: Int, headDim: Int, valueDim: Int)
        -> AttentionShape {
        shape(s, of: AttentionShape(heads: heads, kvHeads: kvHeads, queryLength: 1, headDim: headDim, valueDim: valueDim))
    }

    /// The packed problem of views of these shapes: batch 1, the query and key lengths the
    /// last offsets. Throws naming what does not fit.
    func packedShape(query: SIMD4<Int>, key: SIMD4<Int>, value: SIMD4<Int>) throws -> AttentionShape {
        let packed = try AttentionShape(query: query, key: key, value: value)
        guard packed.batch == 1 else {
            throw AttentionError.shapeMismatch("packed sequences take batch 1 (dimension 0), got \(packed.batch)")
        }
        guard packed.queryLength == queryOffsets.last!, packed.keyLength == keyOffsets.last! else {
            throw AttentionError.shapeMismatch(
                "packed query length \(packed.queryLength) and key length \(packed.keyLength) must be the last offsets, "
                + "\(queryOffsets.last!) and \(keyOffsets.last!)")
        }
        return packed
    }

    /// Throws unless `check` (the conformer's ``Attention/validate(_:)``, and for the
    /// backward its modifiers' checks) passes for every sequence with queries and keys
    /// (given its index and shape), naming the sequence.
    func validate(_ packed: AttentionShape, _ check: (Int, AttentionShape) throws -> Void) throws {
        for s in 0..<count {
            let shape = shape(s, of: packed)
            guard shape.queryLength > 0, shape.keyLength > 0 else { continue }
            do { try check(s, shape) } catch let error as AttentionError {
                throw AttentionError.unsupported("sequence \(s) (Nq \(shape.queryLength), Nk \(shape.keyLength)): \(error.message)")
            }
        }
    }

    /// `cost` (given a sequence's index and shape) summed over the sequences with queries
    /// and keys (FLOPs, scored pairs), with the largest workspace (the sequences run one
    /// after another).
    func totalCost(heads: Int, kvHeads: Int?, headDim: Int, valueDim: Int?,
                   _ cost: (Int, AttentionShape) throws -> AttentionCost) throws -> AttentionCost {
        let packed = AttentionShape(heads: heads, kvHeads: kvHeads, queryLength: 1, headDim: headDim, valueDim: valueDim)
        var total = AttentionCost(flops: 0, workspaceBytes: 0, scoredPairs: 0)
        for s in 0..<count {
            let shape = shape(s, of: packed)
            guard shape.queryLength > 0, shape.keyLength > 0 else { continue }
            let one = try cost(s, shape)
            total.flops += one.flops
            total.scoredPairs += one.scoredPairs
            total.workspaceBytes = max(total.workspaceBytes, one.workspaceBytes)
        }
        return total
    }

    /// The largest `need` (given a sequence's index and shape) over the sequences with
    /// queries and keys (0 without any).
    func largestNeed(_ packed: AttentionShape, _ need: (Int, AttentionShape) throws -> Int) throws -> Int {
        var largest = 0
        for s in 0..<count {
            let shape = shape(s, of: packed)
            guard shape.queryLength > 0, shape.keyLength > 0 else { continue }
            largest = max(largest, try need(s, shape))
        }
        return largest
    }

    /// Throws unless a bias in `modifiers` is `[S or 1, H or 1, max Nq_s, max Nk_s]` for
    /// these sequences (``ScoreModifiers/bias``: one padded block per sequence), naming it.
    func checkBias(_ modifiers: ScoreModifiers?, heads: Int) throws {
        guard let bias = modifiers?.bias else { return }
        var rows = 0, columns = 0
        for s in 0..<count {
            rows = max(rows, queryOffsets[s + 1] - queryOffsets[s])
            columns = max(columns, keyOffsets[s + 1] - keyOffsets[s])
        }
        let b = bias.shape
        guard b.count == 4, b[0] == 1 || b[0] == count, b[1] == 1 || b[1] == heads, b[2] == rows, b[3] == columns else {
            throw AttentionError.shapeMismatch(
                "modifiers.bias of a packed call must be [S or 1, H or 1, max Nq_s, max Nk_s] = [\(count) or 1, \(heads) or 1, \(rows), \(columns)], got \(b)")
        }
    }

    private static func check(_ offsets: [Int], _ name: String) throws {
        guard offsets.count >= 2 else {
            throw AttentionError.invalidParameter("\(name) needs at least 2 entries (one sequence), got \(offsets.count)")
        }
        guard offsets[0] == 0 else {
            throw AttentionError.invalidParameter("\(name)[0] must be 0, got \(offsets[0])")
        }
        for s in 1..<offsets.count where offsets[s] < offsets[s - 1] || offsets[s] > lengthLimit {
            throw AttentionError.invalidParameter(
                "\(name)[\(s)] = \(offsets[s]) must be between \(name)[\(s - 1)] = \(offsets[s - 1]) and \(lengthLimit) (lengthLimit)")
        }
    }
}

extension Attention {
    /// Attention over packed variable-length sequences: each sequence `s` is the problem
    /// `[1, H, Nq_s, D] × [1, Hkv, Nk_s, ·]` of its rows, computed exactly as a separate call
    /// of this conformer (the same bits), its output written to its rows of `output`.
    /// Sequences without queries are skipped; sequences without keys give 0 and `-infinity`
    /// (the sink `σ_h` with sinks). A bias is `[S or 1, H or 1, max Nq_s, max Nk_s]`: sequence `s`
    /// reads its block (``ScoreModifiers/bias``).
    ///
    /// Every sequence is validated (and the views checked) before anything is computed;
    /// an error names the sequence. The workspace must hold the largest sequence's needs
    /// (``AttentionWorkspace/init(for:sequences:heads:kvHeads:headDim:valueDim:threads:)``).
    ///
    /// - Complexity: the sum of the sequences' costs (``cost(sequences:heads:kvHeads:headDim:valueDim:threads:)``),
    ///   never the padded `S · max Nq · max Nk`.
    public func attend(query: StridedView, key: StridedView, value: StridedView,
                       output: MutableStridedView, logSumExp: MutableStridedView?,
                       sequences: PackedSequences, workspace: AttentionWorkspace? = nil, threads: Int? = nil) throws {
        try attend(query: ActivationView(query), key: ActivationView(key), value: ActivationView(value),
                   output: MutableActivationView(output), logSumExp: logSumExp, sequences: sequences,
                   workspace: workspace, threads: threads)
    }

    /// The packed call with query, key, value and output each in `Float`, binary16 or
    /// bfloat16 (``ActivationPrecision``): each sequence is exactly a separate call of
    /// ``attend(query:key:value:output:logSumExp:keyLengths:workspace:threads:)-(ActivationView,_,_,_,_,_,_,_)``
    /// on its rows (the same bits). Sequences without keys give `+0` in the output's
    /// precision and `-infinity` (the sink `σ_h` with sinks). A bias is
    /// `[S or 1, H or 1, max Nq_s, max Nk_s]`, each sequence reading its block
    /// (``ScoreModifiers/bias``). The workspace must hold the largest sequence's needs for
    /// these precisions (``AttentionWorkspace/init(for:sequences:heads:kvHeads:headDim:valueDim:threads:precisions:)``).
    ///
    /// - Complexity: the sum of the sequences' costs.
    public func attend(query: ActivationView, key: ActivationView, value: ActivationView,
                       output: MutableActivationView, logSumExp: MutableStridedView?,
                       sequences: PackedSequences, workspace: AttentionWorkspace? = nil, threads: Int? = nil) throws {
        let packed = try sequences.packedShape(query: query.shape, key: key.shape, value: value.shape)
        try checkOutputViews(packed, query: query, key: key, value: value, output: output, logSumExp: logSumExp)
        try sequences.checkBias(scoreModifiers, heads: packed.heads)
        try sequences.validate(packed) { try packedSequence($0).validate($1) }
        let sinks = scoreModifiers?.sinks
        for s in 0..<sequences.count {
            let shape = sequences.shape(s, of: packed)
            let qStart = sequences.queryOffsets[s], kStart = sequences.keyOffsets[s]
            guard shape.queryLength > 0 else { continue }
            let out = output.rows(qStart, shape.queryLength)
            let lse = logSumExp?.rows(qStart, shape.queryLength)
            guard shape.keyLength > 0 else {
                // No keys: the result over no keys (with sinks, the sink is the one term of
                // the denominator: KernelDocs/ScoreModifiers.md).
                for h in 0..<shape.heads {
                    for i in 0..<shape.queryLength {
                        out.kernel.zeroRow(0, h, i, count: shape.valueDim)
                        lse?.kernel.row(0, h, i).pointee = sinks?[h] ?? -.infinity
                    }
                }
                continue
            }
            try packedSequence(s).attend(
                query: query.rows(qStart, shape.queryLength), key: key.rows(kStart, shape.keyLength),
                value: value.rows(kStart, shape.keyLength), output: out, logSumExp: lse, keyLengths: nil,
                workspace: workspace, threads: threads)
        }
    }

    /// The cost of a packed call: FLOPs and scored pairs summed over the sequences, the
    /// largest sequence's workspace (sequences run one after another).
    public func cost(sequences: PackedSequences, heads: Int, kvHeads: Int? = nil, headDim: Int, valueDim: Int? = nil,
                     threads: Int? = nil) throws -> AttentionCost {
        try sequences.checkBias(scoreModifiers, heads: heads)
        return try sequences.totalCost(heads: heads, kvHeads: kvHeads, headDim: headDim, valueDim: valueDim) {
            try packedSequence($0).cost($1, threads: threads)
        }
    }

    /// The owning convenience of the packed call: `query [1, H, ΣNq_s, D]`, key and value
    /// `[1, Hkv, ΣNk_s, ·]`; returns the packed output and log-sum-exp.
    public func attend(query: Tensor, key: Tensor, value: Tensor, sequences: PackedSequences,
                       threads: Int? = nil) throws -> AttentionResult {
        let shape = try AttentionShape(query: query, key: key, value: value)
        var output = try Tensor.uninitializedOutput(shape: [shape.batch, shape.heads, shape.queryLength, shape.valueDim])
        var lse = try Tensor.uninitializedOutput(shape: [shape.batch, shape.heads, shape.queryLength, 1])
        try query.withStridedView { q in try key.withStridedView { k in try value.withStridedView { v in
        try output.withMutableStridedView { o in try lse.withMutableStridedView { l in
            try attend(query: q, key: k, value: v, output: o, logSumExp: l, sequences: sequences, threads: threads)
        } } } } }
        return try AttentionResult(output: output, logSumExp: lse)
    }
}

extension AttentionWorkspace {
    /// A workspace for packed calls of `attention` on `sequences` with operands of
    /// `precisions`: the largest sequence's workspace plus its log-sum-exp scratch and its
    /// conversion scratch (``Attention/conversionScratchBytes(_:precisions:)``).
    public convenience init(for attention: some Attention, sequences: PackedSequences, heads: Int, kvHeads: Int? = nil,
                            headDim: Int, valueDim: Int? = nil, threads: Int? = nil,
                            precisions: OperandPrecisions = .float32) throws {
        let packed = AttentionShape(heads: heads, kvHeads: kvHeads, queryLength: 1, headDim: headDim, valueDim: valueDim)
        try self.init(byteCount: try sequences.largestNeed(packed) { s, shape in
            let sequence = attention.packedSequence(s)
            return try sequence.cost(shape, threads: threads).workspaceBytes + logSumExpScratchBytes(shape)
                + sequence.conversionScratchBytes(shape, precisions: precisions)
        })
    }

    /// A workspace for packed backward calls of `attention` on `sequences` with operands of
    /// `precisions` (each gradient in its operand's, `dO` in the output's): the largest
    /// sequence's ``init(forBackwardOf:shape:threads:precisions:)``.
    public convenience init(forBackwardOf attention: some DifferentiableAttention, sequences: PackedSequences,
                            heads: Int, kvHeads: Int? = nil, headDim: Int, valueDim: Int? = nil, threads: Int? = nil,
                            precisions: OperandPrecisions = .float32) throws {
        let packed = AttentionShape(heads: heads, kvHeads: kvHeads, queryLength: 1, headDim: headDim, valueDim: valueDim)
        try self.init(byteCount: try sequences.largestNeed(packed) { s, shape in
            try attention.packedSequence(s).backwardWorkspaceBytes(shape, BackwardPrecisions(precisions),
                                                                   threads: threads)
        })
    }
}

extension DifferentiableAttention {
    /// The gradients (``DifferentiableAttention``) of a packed call
    /// (``Attention/attend(query:key:value:output:logSumExp:sequences:workspace:threads:)-(ActivationView,_,_,_,_,_,_,_)``):
    /// each sequence's rows of `dQuery`, `dKey`, `dValue` are exactly those of a separate
    /// backward call on its rows (the same bits, for any thread count), with `output` and
    /// `logSumExp` the packed forward's. The key rows of a sequence without queries and the
    /// query rows of a sequence without keys get `+0`. Operands and gradients each in
    /// `Float`, binary16 or bfloat16, as the unpacked entry point takes them.
    ///
    /// Everything is checked before anything is written: the packed shapes (each view named),
    /// every sequence against the conformer and its modifiers' backward (an error names the
    /// sequence), gradients overlapping an input or each other, and the workspace against
    /// the largest sequence's needs (``AttentionWorkspace/init(forBackwardOf:sequences:heads:kvHeads:headDim:valueDim:threads:precisions:)``).
    ///
    /// - Complexity: the sum of the sequences' backward costs
    ///   (``backwardCost(sequences:heads:kvHeads:headDim:valueDim:threads:)``), never the
    ///   padded size; the sequences run one after another, each on `threads` workers.
    public func gradients(query: ActivationView, key: ActivationView, value: ActivationView, output: ActivationView,
                          logSumExp: StridedView, outputGradient: ActivationView,
                          dQuery: MutableActivationView, dKey: MutableActivationView, dValue: MutableActivationView,
                          sequences: PackedSequences, workspace: AttentionWorkspace? = nil, threads: Int? = nil) throws {
        let packed = try sequences.packedShape(query: query.shape, key: key.shape, value: value.shape)
        try checkCallArguments(packed, keyLengths: nil, threads: threads)
        try checkGradientViews(packed, query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                               outputGradient: outputGradient, dQuery: dQuery, dKey: dKey, dValue: dValue)
        try sequences.checkBias(scoreModifiers, heads: packed.heads)
        try sequences.validate(packed) { s, shape in
            let sequence = packedSequence(s)
            try sequence.validate(shape)
            try sequence.checkModifiersForBackward(shape)
        }
        if let workspace {
            let precisions = BackwardPrecisions(query: query, key: key, value: value, output: output,
                                                outputGradient: outputGradient, dQuery: dQuery, dKey: dKey,
                                                dValue: dValue)
            let needed = try sequences.largestNeed(packed) { s, shape in
                try packedSequence(s).backwardWorkspaceBytes(shape, precisions, threads: threads)
            }
            guard workspace.byteCount >= needed else {
                throw AttentionError.invalidParameter(
                    "workspace has \(workspace.byteCount) bytes; the packed backward of \(name) needs \(needed) for its largest sequence (AttentionWorkspace(forBackwardOf:sequences:heads:kvHeads:headDim:valueDim:threads:precisions:) sizes it)")
            }
        }
        for s in 0..<sequences.count {
            let shape = sequences.shape(s, of: packed)
            let qStart = sequences.queryOffsets[s], kStart = sequences.keyOffsets[s]
            let dq = dQuery.rows(qStart, shape.queryLength)
            let dk = dKey.rows(kStart, shape.keyLength), dv = dValue.rows(kStart, shape.keyLength)
            guard shape.queryLength > 0, shape.keyLength > 0 else {
                // No query sees these keys, and these queries see no key: zero gradients.
                for h in 0..<shape.heads {
                    for i in 0..<shape.queryLength { dq.kernel.zeroRow(0, h, i, count: shape.headDim) }
                }
                for h in 0..<shape.kvHeads {
                    for j in 0..<shape.keyLength {
                        dk.kernel.zeroRow(0, h, j, count: shape.headDim)
                        dv.kernel.zeroRow(0, h, j, count: shape.valueDim)
                    }
                }
                continue
            }
            try packedSequence(s).gradients(
                query: query.rows(qStart, shape.queryLength), key: key.rows(kStart, shape.keyLength),
                value: value.rows(kStart, shape.keyLength), output: output.rows(qStart, shape.queryLength),
                logSumExp: logSumExp.rows(qStart, shape.queryLength),
                outputGradient: outputGradient.rows(qStart, shape.queryLength),
                dQuery: dq, dKey: dk, dValue: dv, keyLengths: nil, workspace: workspace, threads: threads)
        }
    }

    /// The packed backward over `Float` views.
    public func gradients(query: StridedView, key: StridedView, value: StridedView, output: StridedView,
                          logSumExp: StridedView, outputGradient: StridedView,
                          dQuery: MutableStridedView, dKey: MutableStridedView, dValue: MutableStridedView,
                          sequences: PackedSequences, workspace: AttentionWorkspace? = nil, threads: Int? = nil) throws {
        try gradients(query: ActivationView(query), key: ActivationView(key), value: ActivationView(value),
                      output: ActivationView(output), logSumExp: logSumExp, outputGradient: ActivationView(outputGradient),
                      dQuery: MutableActivationView(dQuery), dKey: MutableActivationView(dKey),
                      dValue: MutableActivationView(dValue), sequences: sequences, workspace: workspace, threads: threads)
    }

    /// The owning convenience of the packed backward: the gradients through the packed call
    /// that gave `result` (``Attention/attend(query:key:value:sequences:threads:)``).
    public func gradients(query: Tensor, key: Tensor, value: Tensor, result: AttentionResult, outputGradient: Tensor,
                          sequences: PackedSequences, threads: Int? = nil) throws -> AttentionGradients {
        var dq = try Tensor.uninitializedOutput(shape: query.shape)
        var dk = try Tensor.uninitializedOutput(shape: key.shape)
        var dv = try Tensor.uninitializedOutput(shape: value.shape)
        try query.withStridedView { q in try key.withStridedView { k in try value.withStridedView { v in
        try result.output.withStridedView { o in try result.logSumExp.withStridedView { l in
        try outputGradient.withStridedView { g in
        try dq.withMutableStridedView { dQ in try dk.withMutableStridedView { dK in try dv.withMutableStridedView { dV in
            try gradients(query: q, key: k, value: v, output: o, logSumExp: l, outputGradient: g,
                          dQuery: dQ, dKey: dK, dValue: dV, sequences: sequences, threads: threads)
        } } } } } } } } }
        return AttentionGradients(dQuery: dq, dKey: dk, dValue: dv)
    }

    /// The backward cost of a packed call: FLOPs and scored pairs summed over the
    /// sequences, the largest sequence's workspace.
    public func backwardCost(sequences: PackedSequences, heads: Int, kvHeads: Int? = nil, headDim: Int,
                             valueDim: Int? = nil, threads: Int? = nil) throws -> AttentionCost {
        try sequences.checkBias(scoreModifiers, heads: heads)
        return try sequences.totalCost(heads: heads, kvHeads: kvHeads, headDim: headDim, valueDim: valueDim) {
            try packedSequence($0).backwardCost($1, threads: threads)
        }
    }
}

// Rows `start ..< start + count` of every head of a packed (batch 1) view.
extension ActivationView {
    func rows(_ start: Int, _ count: Int) -> ActivationView {
        ActivationView(unchecked: rawBaseAddress + start * strides[2] * precision.byteWidth, precision: precision,
                       shape: SIMD4(1, shape[1], count, shape[3]), strides: strides)
    }
}

extension MutableActivationView {
    func rows(_ start: Int, _ count: Int) -> MutableActivationView {
        MutableActivationView(unchecked: rawBaseAddress + start * strides[2] * precision.byteWidth,
                              precision: precision, shape: SIMD4(1, shape[1], count, shape[3]), strides: strides)
    }
}

extension StridedView {
    func rows(_ start: Int, _ count: Int) -> StridedView {
        StridedView(unchecked: baseAddress + start * strides[2], shape: SIMD4(1, shape[1], count, shape[3]),
                    strides: strides)
    }
}

extension MutableStridedView {
    func rows(_ start: Int, _ count: Int) -> MutableStridedView {
        MutableStridedView(unchecked: baseAddress + start * strides[2], shape: SIMD4(1, shape[1], count, shape[3]),
                           strides: strides)
    }
}
