/// Exact softmax attention, computed flash-style in O(N) memory.
///
/// ```
/// // naive reference (what this computes), for each b, h, i:
/// let hk = h / (H / Hkv)
/// s[j] = scale · dot(q[b, h, i], k[b, hk, j])     for visible j
/// o[b, h, i] = Σ_j softmax(s)[j] · v[b, hk, j],   lse[b, h, i] = log Σ_j exp(s[j])
/// ```
/// Visible keys: every `j < keyLengths[b]` (all keys without padding); with `causal`
/// additionally `j <= i + Nk - Nq` (bottom-right alignment: the last query sees every key,
/// as decoding with a cache needs). Rows with no visible key are 0 with `lse = -infinity`.
///
/// The kernel (KernelDocs/Dense.md) walks tiles of 128 queries against tiles of 64 keys
/// with an online softmax and two register-tiled micro-kernels; key tiles entirely past
/// the causal limit are never touched. Grouped key/value heads are read in place. Fewer
/// than 16 queries (decoding against keys and values in the caller's buffers) run on the
/// decode kernel instead (KernelDocs/MultiQuery.md), which streams each key/value head
/// once for its whole group (the choice depends on the shape only).
///
/// - Complexity: `4 · Nq · Nk · D` FLOPs per head (half that when causal and Nq = Nk);
///   workspace of a few hundred KiB per thread, independent of `Nq` and `Nk`.
public struct DenseAttention: KernelWidening, ModifiableAttention {
    /// Bottom-right aligned causal mask: key `j` visible to query `i` iff `j <= i + Nk - Nq`.
    public var causal: Bool
    /// Score scale; `nil` means `1 / sqrt(D)`. Must be finite.
    public var scale: Float?
    /// Soft-capping, ALiBi, an additive bias and sinks (``ScoreModifiers``); none by default.
    public var modifiers = ScoreModifiers()

    public init(causal: Bool = false, scale: Float? = nil) {
        self.causal = causal
        self.scale = scale
    }

    public var name: String { "dense" }

    /// Largest supported `D` and `Dv`.
    public static let maxHeadDim = 256

    public func validate(_ shape: AttentionShape) throws {
        try shape.check()
        try shape.checkHeadDims(limit: DenseAttention.maxHeadDim, variant: "dense attention")
        try checkScale(scale)
    }

    /// Dense rows: 512 queries per tile once a head's keys and values outgrow L2.
    @_spi(Testing) public static func queryTile(_ shape: AttentionShape) -> Int {
        TiledSoftmaxAttention.Tiling.denseQueryTile(keyLength: shape.keyLength, headDim: shape.headDim,
                                                    valueDim: shape.valueDim)
    }

    public func cost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        let threads = try threadCount(threads)
        try validate(shape)
        let pairs = visiblePairs(shape, causal: causal)
        return AttentionCost(flops: 2 * Double(pairs) * Double(shape.headDim + shape.valueDim),
                             workspaceBytes: DecodeAttention.denseRowsWorkspaceBytes(
                                shape, threads: threads, tiledBytes: TiledSoftmaxAttention.workspaceBytes(
                                    shape: shape, threads: threads, queryTile: Self.queryTile(shape))),
                             scoredPairs: pairs)
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
            let shape = call.shape, causal = self.causal
            func mask(_ b: Int) -> IntervalMask {
                IntervalMask(queryLength: shape.queryLength, keyLength: shape.keyLength,
                             causal: causal, keyEnd: call.keyEnd(b))
            }
            // A few queries (decoding): the decode kernel reads each key/value head once for its group.
            if DecodeAttention.serves(shape) {
                DecodeAttention.attend(call, mask: mask)
            } else {
                TiledSoftmaxAttention.attend(call, queryTile: Self.queryTile(shape)) { b, _ in mask(b) }
            }
        }
    }
}
