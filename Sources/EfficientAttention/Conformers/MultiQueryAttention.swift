/// Multi-query and grouped-query attention (Shazeer 2019; Ainslie et al. 2023): `H` query
/// heads over `Hkv` shared key/value heads, dense or over a sliding window, causal or not,
/// with incremental decoding against a ``KVCache``.
///
/// ```
/// // naive reference (what this computes), for each b, h, i:
/// let hk = h / (H / Hkv)                           // Hkv = 1: multi-query; 1 < Hkv < H: grouped
/// let p = i + Nk - Nq                              // the query's position among the keys
/// visible j: p - left <= j <= p + right,  j <= p if causal,  j < keyLengths[b]
/// s[j] = scale · dot(q[b, h, i], k[b, hk, j])
/// o[b, h, i] = Σ_j softmax(s)[j] · v[b, hk, j],   lse[b, h, i] = log Σ_j exp(s[j])
/// ```
/// `left`/`right` are ``leftWindow``/``rightWindow`` (`nil`: unbounded). `Hkv = H` is
/// accepted too (plain multi-head attention), so the same code measures the baseline.
/// Key/value heads are read in place by every query head of their group, never copied.
/// Rows with no visible key are 0 with `lse = -infinity`.
///
/// `attend` runs the shared flash-style kernel (KernelDocs/Dense.md) with the interval
/// mask; ``decode(query:cache:layer:threads:)`` runs the memory-bound decode kernel
/// (KernelDocs/MultiQuery.md) over a cache, split along the keys into chunks of
/// ``decodeChunkLength`` positions whose partial results merge exactly through their log-sum-exp.
///
/// - Complexity: `attend`: `2 · pairs · (D + Dv)` FLOPs (pairs = visible query/key pairs,
///   `Nq · Nk` per head when dense) and a few hundred KiB of workspace per thread.
///   `decode` of `n` positions: `2 · H · n · L · (D + Dv)` FLOPs for a cache of `L`
///   positions, reading `Hkv · L · (D + Dv)` cached elements once.
public struct MultiQueryAttention: IncrementalAttention, KernelWidening, ModifiableAttention {
    /// Bottom-right aligned causal rule: key `j` visible to query `i` iff `j <= i + Nk - Nq`.
    public var causal: Bool
    /// Keys visible before the query's position (`nil`: unbounded). At least 0.
    public var leftWindow: Int?
    /// Keys visible after the query's position (`nil`: unbounded; causal limits it to 0). At least 0.
    public var rightWindow: Int?
    /// Score scale; `nil` means `1 / sqrt(D)`. Must be finite.
    public var scale: Float?
    /// Soft-capping, ALiBi, an additive bias and sinks (``ScoreModifiers``); none by default.
    public var modifiers = ScoreModifiers()
    /// Decode: cache positions per split-KV chunk (a work item whose partial result is
    /// merged by log-sum-exp). At least 1. The chunking depends only on the cache length,
    /// so results are identical for every thread count.
    public var decodeChunkLength: Int

    /// The former name of ``decodeChunkLength``.
    @available(*, deprecated, renamed: "decodeChunkLength")
    public var split: Int {
        get { decodeChunkLength }
        set { decodeChunkLength = newValue }
    }

    /// Cache positions per decode chunk by default.
    public static let defaultDecodeChunkLength = DecodeAttention.defaultSplit

    /// The former name of ``defaultDecodeChunkLength``.
    @available(*, deprecated, renamed: "defaultDecodeChunkLength")
    public static var defaultSplit: Int { defaultDecodeChunkLength }

    public init(causal: Bool = false, leftWindow: Int? = nil, rightWindow: Int? = nil,
                scale: Float? = nil, decodeChunkLength: Int = MultiQueryAttention.defaultDecodeChunkLength) {
        self.causal = causal
        self.leftWindow = leftWindow
        self.rightWindow = rightWindow
        self.scale = scale
        self.decodeChunkLength = decodeChunkLength
    }

    /// The former spelling of ``init(causal:leftWindow:rightWindow:scale:decodeChunkLength:)``.
    @available(*, deprecated, renamed: "init(causal:leftWindow:rightWindow:scale:decodeChunkLength:)")
    public init(causal: Bool = false, leftWindow: Int? = nil, rightWindow: Int? = nil, scale: Float? = nil,
                split: Int) {
        self.init(causal: causal, leftWindow: leftWindow, rightWindow: rightWindow, scale: scale,
                  decodeChunkLength: split)
    }

    public var name: String { "multi-query" }

    /// Largest supported `D` and `Dv` (those of the shared tiled kernel).
    public static let maxHeadDim = DenseAttention.maxHeadDim

    public func validate(_ shape: AttentionShape) throws {
        try shape.check()
        try shape.checkHeadDims(limit: MultiQueryAttention.maxHeadDim, variant: "multi-query attention")
        try checkScale(scale)
        for (name, value) in [("leftWindow", leftWindow), ("rightWindow", rightWindow)] {
            if let value, value < 0 {
                throw AttentionError.invalidParameter("\(name) must be at least 0, got \(value)")
            }
            if let value { try checkLimit(value, name, variant: "multi-query attention") }
        }
        guard decodeChunkLength >= 1 else {
            throw AttentionError.invalidParameter("decodeChunkLength must be at least 1, got \(decodeChunkLength)")
        }
        try checkLimit(decodeChunkLength, "decodeChunkLength", variant: "multi-query attention")
    }

    public func cost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        let threads = try threadCount(threads)
        try validate(shape)
        return cost(shape, workspaceBytes: DecodeAttention.denseRowsWorkspaceBytes(
            shape, threads: threads, tiledBytes: TiledSoftmaxAttention.workspaceBytes(shape: shape, threads: threads,
                                                                                      queryTile: queryTile(shape))))
    }

    /// Decode-shaped calls stage 16-bit query and output rows in `Float` (a few rows).
    func stagedOperands(_ shape: AttentionShape) -> (query: Bool, output: Bool) {
        DecodeAttention.serves(shape) ? (true, true) : (false, false)
    }

    public func attend(query: ActivationView, key: ActivationView, value: ActivationView,
                       output: MutableActivationView, logSumExp: MutableStridedView?,
                       keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws {
        try withCheckedCall(query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                            keyLengths: keyLengths, workspace: workspace, threads: threads, scale: scale,
                            modifiers: modifiers) { call in
            let shape = call.shape
            func rows(_ b: Int) -> IntervalMask {
                mask(queryLength: shape.queryLength, keyLength: shape.keyLength, keyEnd: call.keyEnd(b))
            }
            // A few queries (decoding against keys and values the caller holds): the decode kernel.
            if DecodeAttention.serves(shape) {
                DecodeAttention.attend(call, mask: rows)
            } else {
                TiledSoftmaxAttention.attend(call, queryTile: queryTile(shape)) { b, _ in rows(b) }
            }
        }
    }

    /// The cost of decoding `shape.queryLength` positions against a cache holding
    /// `shape.keyLength` positions (every batch item) stored in `precision`, with
    /// `threads` workers: FLOPs `2 · pairs · (D + Dv)`, the decode kernel's workspace
    /// (per-worker scratch plus the chunks' partial rows), visible pairs.
    ///
    /// - Complexity: O(Nq).
    public func decodeCost(_ shape: AttentionShape, precision: KVCache.Precision = .float32,
                           threads: Int?) throws -> AttentionCost {
        let threads = try threadCount(threads)
        try validate(shape)
        try checkDecodeWorkspace(shape, precision: precision)
        return cost(shape, workspaceBytes: DecodeAttention.workspaceBytes(
            shape: shape, split: decodeChunkLength, threads: threads, elementBytes: precision.bytesPerElement,
            keyScratch: precision != .float32))
    }

    /// The cost of a decode against a cache of `kind` (``MultiQueryDecoding/CacheKind``) in
    /// `precision`: as ``decodeCost(_:precision:threads:)``, whose workspace is the contiguous
    /// cache's; rotating and paged caches (and 16-bit or Int8 ones) also copy key tiles on the
    /// micro-kernel path.
    public func decodeCost(_ shape: AttentionShape, precision: KVCache.Precision,
                           cacheKind kind: MultiQueryDecoding.CacheKind, threads: Int?) throws -> AttentionCost {
        let threads = try threadCount(threads)
        try validate(shape)
        try MultiQueryDecoding(self, cacheKind: kind, precision: precision).validate(shape)
        try checkDecodeWorkspace(shape, precision: precision)
        return cost(shape, workspaceBytes: DecodeAttention.workspaceBytes(
            shape: shape, split: decodeChunkLength, threads: threads, elementBytes: precision.bytesPerElement,
            keyScratch: precision != .float32 || kind != .contiguous))
    }

    /// Throws unless a decode's workspace fits one allocation: the partial rows of the
    /// `⌈L / decodeChunkLength⌉` chunks (`B · H · n · (Dv + 1)` floats each) are checked before the
    /// kernel's byte count is computed, then that count for the most workers.
    private func checkDecodeWorkspace(_ shape: AttentionShape, precision: KVCache.Precision) throws {
        let chunk = decodeChunkLength
        try checkFloatAllocation(shape.batch, shape.heads, shape.queryLength, shape.valueDim + 1,
                                 (shape.keyLength + chunk - 1) / chunk,
                                 option: "decode partial rows of ⌈cache length / decodeChunkLength⌉ chunks (decodeChunkLength \(chunk))")
        try checkAllocation(bytes: DecodeAttention.workspaceBytes(shape: shape, split: chunk, threads: maxThreadCount,
                                                                  elementBytes: precision.bytesPerElement, keyScratch: true),
                            option: "decode workspace (decodeChunkLength \(chunk))")
    }

    /// Attention of `query` `[B, H, n, D]`, the newest `n` positions, against the keys and
    /// values cached in `layer` (append them first). For batch item `b` with `L_b` cached
    /// positions this equals ``attend(query:key:value:keyLengths:threads:)`` with the
    /// cached keys and values `[0, L_b)` (so `Nk = L_b` and query `i` sits at position
    /// `L_b − n + i`); positions before 0 see no key under the causal rule.
    ///
    /// ``modifiers`` apply as in `attend` on that call (`Nk = L_b`): ALiBi measures from
    /// query position `L_b − n + i`; a bias is `[B or 1, H or 1, n, L]` with `L` the longest
    /// held length (item `b` reads its first `L_b` columns); sinks join each row once, after
    /// the chunks merge. The decode kernel applies them to each tile of scores.
    ///
    /// Throws when `B`, `D` or the cache's `Hkv` do not fit the query (`H` must be a
    /// multiple of `Hkv`), for an unknown layer, or for modifiers that do not fit (named).
    ///
    /// - Complexity: `2 · H · n · L · (D + Dv)` FLOPs; reads each cached row once.
    ///   Workspace: `O(H/Hkv · n · (D + Dv))` per thread plus the partial rows of the
    ///   `⌈L / decodeChunkLength⌉` chunks.
    public func decode(query: Tensor, cache: KVCache, layer: Int = 0, threads: Int? = nil) throws -> AttentionResult {
        try decodeAny(query: query, cache: cache, layer: layer, threads: threads)
    }

    /// Attention of `query` `[B, H, n, D]` against the positions any cache kind holds in
    /// `layer` (``DecodingCache``: contiguous, rotating, a paged batch; any precision): for
    /// batch item `b` holding `L_b` positions, the same as a contiguous cache holding those
    /// positions, bitwise (one kernel reads every layout in place; ``decode(query:cache:layer:threads:)``).
    /// A ``RotatingKVCache`` holds at most its window: keys older than that are gone, so
    /// decoding with a window wider than the cache's sees only the held ones.
    ///
    /// - Complexity: as ``decode(query:cache:layer:threads:)``; a paged batch also builds
    ///   its page tables (`B · ⌈L / P⌉` entries) per call.
    public func decode(query: Tensor, cache: some DecodingCache, layer: Int = 0,
                       threads: Int? = nil) throws -> AttentionResult {
        try decodeAny(query: query, cache: cache, layer: layer, threads: threads)
    }

    func decodeAny(query: Tensor, cache: any DecodingCache, layer: Int, threads: Int?) throws -> AttentionResult {
        guard let cache = cache as? any DecodableCache else {
            throw AttentionError.unsupported("decode: \(type(of: cache)) is not one of the library's caches")
        }
        let lengths = try cache.heldLengths(layer: layer)
        let qs = query.shape
        guard qs[0] == cache.batch else {
            throw AttentionError.shapeMismatch("decode: query batch (dimension 0) is \(qs[0]), the cache's is \(cache.batch)")
        }
        guard qs[3] == cache.headDim else {
            throw AttentionError.shapeMismatch("decode: query headDim (dimension 3) is \(qs[3]), the cache's is \(cache.headDim)")
        }
        let shape = AttentionShape(batch: qs[0], heads: qs[1], kvHeads: cache.kvHeads, queryLength: qs[2],
                                   keyLength: max(1, lengths.max() ?? 1), headDim: qs[3], valueDim: cache.valueDim)
        try validate(shape)
        try checkCallArguments(shape, keyLengths: nil, threads: threads)
        try modifiers.validate(shape)
        try checkDecodeWorkspace(shape, precision: cache.precision)
        let scale = self.scale ?? 1 / Float(shape.headDim).squareRoot()
        var output = try Tensor(shape: [shape.batch, shape.heads, shape.queryLength, shape.valueDim])
        var lse = try Tensor(shape: [shape.batch, shape.heads, shape.queryLength, 1])
        let workers = try threadCount(threads), chunk = decodeChunkLength
        let masks = lengths.map { mask(queryLength: shape.queryLength, keyLength: $0, keyEnd: $0) }
        try query.withView { q in try output.withMutableView { o in try lse.withMutableView { l in
            try modifiers.withKernelThenSinks(shape, o: o, lse: l, threads: workers) { kernel in
                visitRows(of: cache, layer: layer, DecodeRun(shape: shape, scale: scale, threads: workers, split: chunk,
                                                             q: q, o: o, lse: l, modifiers: kernel, masks: masks))
            }
        } } }
        return try AttentionResult(output: output, logSumExp: lse)
    }

    /// FLOPs `2 · pairs · (D + Dv)` and the visible pairs of `shape` (no key padding).
    func cost(_ shape: AttentionShape, workspaceBytes: Int) -> AttentionCost {
        let pairs = mask(queryLength: shape.queryLength, keyLength: shape.keyLength, keyEnd: shape.keyLength)
            .visiblePairs(queryLength: shape.queryLength) * shape.batch * shape.heads
        return AttentionCost(flops: 2 * Double(pairs) * Double(shape.headDim + shape.valueDim),
                             workspaceBytes: workspaceBytes, scoredPairs: pairs)
    }

    /// The visibility of one batch item: the window and causal rule, bottom-right aligned
    /// for `queryLength` queries and `keyLength` keys, keys `< keyEnd`.
    /// Without a window, dense rows (``DenseAttention``'s tile); a window keeps the default.
    func queryTile(_ shape: AttentionShape) -> Int? {
        leftWindow == nil && rightWindow == nil ? DenseAttention.queryTile(shape) : nil
    }

    func mask(queryLength: Int, keyLength: Int, keyEnd: Int) -> IntervalMask {
        var right = rightWindow ?? IntervalMask.unbounded
        if causal { right = min(right, 0) }
        return IntervalMask(offset: keyLength - queryLength,
                            left: leftWindow ?? IntervalMask.unbounded, right: right, keyEnd: keyEnd)
    }
}

/// An attention that can also run incrementally against a ``KVCache`` (decoding).
public protocol IncrementalAttention: Attention {
    /// Attention of the newest query positions against the keys and values cached in `layer`.
    func decode(query: Tensor, cache: KVCache, layer: Int, threads: Int?) throws -> AttentionResult
    /// FLOPs, workspace and pairs of a decode of `shape.queryLength` positions against a
    /// cache of `shape.keyLength` positions stored in `precision`.
    func decodeCost(_ shape: AttentionShape, precision: KVCache.Precision, threads: Int?) throws -> AttentionCost
}

extension IntervalMask {
    /// Visible pairs of `queryLength` queries (one head of one batch item).
    ///
    /// - Complexity: O(queryLength).
    func visiblePairs(queryLength: Int) -> Int {
        var pairs = 0
        for i in 0..<queryLength {
            let lo = max(0, i + offset - left), hi = min(keyEnd - 1, i + offset + right)
            pairs += max(0, hi - lo + 1)
        }
        return pairs
    }
}

extension MultiQueryAttention: DecodingAttention {
    /// A one-layer ``KVCache`` (Float32) of `capacity` positions per sequence.
    public func makeDecodingState(batch: Int, heads: Int, kvHeads: Int, headDim: Int, valueDim: Int,
                                  capacity: Int) throws -> KVCache {
        try validate(AttentionShape(batch: batch, heads: heads, kvHeads: kvHeads, queryLength: 1, keyLength: capacity,
                                    headDim: headDim, valueDim: valueDim))
        return try KVCache(batch: batch, kvHeads: kvHeads, headDim: headDim, valueDim: valueDim, capacity: capacity)
    }

    /// Appends `key` and `value` to layer 0 of the cache, then decodes `query` against it
    /// (``decode(query:cache:layer:threads:)``). The problem is checked before the append.
    public func attendNext(query: Tensor, key: Tensor, value: Tensor, state: inout KVCache,
                           threads: Int? = nil) throws -> AttentionResult {
        let step = try checkedDecodingStep(query: query, key: key, value: value, cache: state)
        var after = step
        after.keyLength = (state.lengths(layer: 0).max() ?? 0) + step.queryLength
        try validate(after)
        try checkCallArguments(after, keyLengths: nil, threads: threads)
        try state.append(layer: 0, keys: key, values: value)   // all-or-nothing (capacity)
        return try decode(query: query, cache: state, layer: 0, threads: threads)
    }
}

extension MultiQueryAttention: KernelWideningBackward {
    /// The flash-style backward of the tiled kernel (KernelDocs/MultiQuery.md, "Backward")
    /// with the forward's window and causal mask. Each work item is a block of 128 keys of
    /// one key/value head and walks the query heads of its group in order, so `dK` and `dV`
    /// are summed over the group inside the item (no reduction pass, no atomics); `dQ` is
    /// summed in key-block order. Bitwise identical for every thread count.
    ///
    /// ```
    /// // naive reference, for each b, h, i with visible keys J (hk = h / (H / Hkv)):
    /// P[j] = exp(scale · dot(q[b,h,i], k[b,hk,j]) − lse[b,h,i]),  dS[j] = P[j] · (dO·v[j] − dO·o)
    /// dQ[b,h,i] = scale · Σ_j dS[j] k[b,hk,j]
    /// dK[b,hk,j] += scale · dS[j] q[b,h,i],  dV[b,hk,j] += P[j] dO[b,h,i]   (summed over h in hk's group)
    /// ```
    ///
    /// - Complexity: `2.5 ×` the forward's FLOPs; workspace of about 341 KiB per thread at
    ///   `D = Dv = 64` plus one `Int` per 128 keys per key/value head.
    public func gradients(query: StridedView, key: StridedView, value: StridedView, output: StridedView,
                          logSumExp: StridedView, outputGradient: StridedView,
                          dQuery: MutableStridedView, dKey: MutableStridedView, dValue: MutableStridedView,
                          keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws {
        try tiledGradients(query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                           outputGradient: outputGradient, dQuery: dQuery, dKey: dKey, dValue: dValue,
                           keyLengths: keyLengths, workspace: workspace, threads: threads)
    }

    /// The passes of the backward (the `Float` and mixed-precision entry points run them).
    func tiledBackward(_ call: TiledBackwardCall) throws {
        let shape = call.shape
        call.run { _, keyEnd in mask(queryLength: shape.queryLength, keyLength: shape.keyLength, keyEnd: keyEnd) }
    }

    func addsKeyGradients(_ shape: AttentionShape) -> Bool { false }

    public func backwardCost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        tiledBackwardCost(forward: try cost(shape, threads: threads), shape: shape, threads: threads,
                          modifiers: modifiers)
    }
}
