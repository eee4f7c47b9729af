/// Exact softmax attention computed flash-style (TEMPORARY: delegates to vanilla while
/// the tiled kernel is written).
public struct DenseAttention: Attention {
    /// Bottom-right aligned causal mask: key `j` visible to query `i` iff `j <= i + Nk - Nq`.
    public var causal: Bool
    /// Score scale; `nil` means `1 / sqrt(D)`.
    public var scale: Float?

    public init(causal: Bool = false, scale: Float? = nil) {
        self.causal = causal
        self.scale = scale
    }

    public var name: String { "dense" }

    public func validate(_ shape: AttentionShape) throws {
        try shape.check()
        try shape.checkHeadDims(limit: 256, variant: "dense attention")
        try checkScale(scale)
    }

    public func cost(_ shape: AttentionShape) throws -> AttentionCost {
        try validate(shape)
        let pairs = visiblePairs(shape, causal: causal)
        return AttentionCost(flops: 2 * Double(pairs) * Double(shape.headDim + shape.valueDim),
                             workspaceBytes: 0, scoredPairs: pairs)
    }

    public func attend(query: Tensor, key: Tensor, value: Tensor,
                       keyLengths: [Int]?, threads: Int?) throws -> AttentionResult {
        let shape = try AttentionShape(query: query, key: key, value: value)
        try validate(shape)
        return try VanillaAttention(causal: causal, scale: scale)
            .attend(query: query, key: key, value: value, keyLengths: keyLengths, threads: threads)
    }
}
