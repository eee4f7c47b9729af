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
    /// Sequences without queries are skipped; sequences without keys give 0 and `-infinity`.
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
    /// precision and `-infinity`. The workspace must hold the largest sequence's needs for
    /// these precisions (``AttentionWorkspace/init(for:sequences:heads:kvHeads:headDim:valueDim:threads:precisions:)``).
    ///
    /// - Complexity: the sum of the sequences' costs.
    public func attend(query: ActivationView, key: ActivationView, value: ActivationView,
                       output: MutableActivationView, logSumExp: MutableStridedView?,
                       sequences: PackedSequences, workspace: AttentionWorkspace? = nil, threads: Int? = nil) throws {
        let packed = try AttentionShape(query: query.shape, key: key.shape, value: value.shape)
        guard packed.batch == 1 else {
            throw AttentionError.shapeMismatch("packed sequences take batch 1 (dimension 0), got \(packed.batch)")
        }
        guard packed.queryLength == sequences.queryOffsets.last!, packed.keyLength == sequences.keyOffsets.last! else {
            throw AttentionError.shapeMismatch(
                "packed query length \(packed.queryLength) and key length \(packed.keyLength) must be the last offsets, "
                + "\(sequences.queryOffsets.last!) and \(sequences.keyOffsets.last!)")
        }
        try checkOutputViews(packed, query: query, key: key, value: value, output: output, logSumExp: logSumExp)
        for s in 0..<sequences.count {
            let shape = sequences.shape(s, of: packed)
            guard shape.queryLength > 0, shape.keyLength > 0 else { continue }
            do { try validate(shape) } catch let error as AttentionError {
                throw AttentionError.unsupported("sequence \(s) (Nq \(shape.queryLength), Nk \(shape.keyLength)): \(error.message)")
            }
        }
        /// Rows `start ..< start + count` of every head of a packed view.
        func rows(_ v: ActivationView, _ start: Int, _ count: Int) -> ActivationView {
            ActivationView(unchecked: v.rawBaseAddress + start * v.strides[2] * v.precision.byteWidth,
                           precision: v.precision, shape: SIMD4(1, v.shape[1], count, v.shape[3]), strides: v.strides)
        }
        func rows(_ v: MutableActivationView, _ start: Int, _ count: Int) -> MutableActivationView {
            MutableActivationView(unchecked: v.rawBaseAddress + start * v.strides[2] * v.precision.byteWidth,
                                  precision: v.precision, shape: SIMD4(1, v.shape[1], count, v.shape[3]),
                                  strides: v.strides)
        }
        func rows(_ v: MutableStridedView, _ start: Int, _ count: Int) -> MutableStridedView {
            MutableStridedView(unchecked: v.baseAddress + start * v.strides[2],
                               shape: SIMD4(1, v.shape[1], count, v.shape[3]), strides: v.strides)
        }
        for s in 0..<sequences.count {
            let shape = sequences.shape(s, of: packed)
            let qStart = sequences.queryOffsets[s], kStart = sequences.keyOffsets[s]
            guard shape.queryLength > 0 else { continue }
            let out = rows(output, qStart, shape.queryLength)
            let lse = logSumExp.map { rows($0, qStart, shape.queryLength) }
            guard shape.keyLength > 0 else {
                // No keys: the result over no keys.
                for h in 0..<shape.heads {
                    for i in 0..<shape.queryLength {
                        out.kernel.zeroRow(0, h, i, count: shape.valueDim)
                        lse?.kernel.row(0, h, i).pointee = -.infinity
                    }
                }
                continue
            }
            try attend(query: rows(query, qStart, shape.queryLength), key: rows(key, kStart, shape.keyLength),
                       value: rows(value, kStart, shape.keyLength), output: out, logSumExp: lse,
                       keyLengths: nil, workspace: workspace, threads: threads)
        }
    }

    /// The cost of a packed call: FLOPs and scored pairs summed over the sequences, the
    /// largest sequence's workspace (sequences run one after another).
    public func cost(sequences: PackedSequences, heads: Int, kvHeads: Int? = nil, headDim: Int, valueDim: Int? = nil,
                     threads: Int? = nil) throws -> AttentionCost {
        let packed = AttentionShape(heads: heads, kvHeads: kvHeads, queryLength: max(1, sequences.queryOffsets.last!),
                                    keyLength: max(1, sequences.keyOffsets.last!), headDim: headDim, valueDim: valueDim)
        var total = AttentionCost(flops: 0, workspaceBytes: 0, scoredPairs: 0)
        for s in 0..<sequences.count {
            let shape = sequences.shape(s, of: packed)
            guard shape.queryLength > 0, shape.keyLength > 0 else { continue }
            let one = try cost(shape, threads: threads)
            total.flops += one.flops
            total.scoredPairs += one.scoredPairs
            total.workspaceBytes = max(total.workspaceBytes, one.workspaceBytes)
        }
        return total
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
        var bytes = 0
        let packed = AttentionShape(heads: heads, kvHeads: kvHeads, queryLength: 1, headDim: headDim, valueDim: valueDim)
        for s in 0..<sequences.count {
            let shape = sequences.shape(s, of: packed)
            guard shape.queryLength > 0, shape.keyLength > 0 else { continue }
            bytes = max(bytes, try attention.cost(shape, threads: threads).workspaceBytes + logSumExpScratchBytes(shape)
                                   + attention.conversionScratchBytes(shape, precisions: precisions))
        }
        try self.init(byteCount: bytes)
    }
}
