extension TiledSoftmaxAttention {
    /// Runs the kernel on whole tensors: allocates the output `[B, H, Nq, Dv]` and the
    /// log-sum-exp `[B, H, Nq, 1]` and fills them for every `(b, h, query)` of `shape`
    /// with the visibility `mask(b, h)`. The conformers that are this kernel over a mask
    /// (dense, multi-query) call it after validating their arguments.
    static func attend<Mask: TileMask>(
        query: Tensor, key: Tensor, value: Tensor, shape: AttentionShape, scale: Float, threads: Int?,
        mask: (_ batch: Int, _ head: Int) -> Mask
    ) throws -> AttentionResult {
        var output = try Tensor(shape: [shape.batch, shape.heads, shape.queryLength, shape.valueDim])
        var lse = try Tensor(shape: [shape.batch, shape.heads, shape.queryLength, 1])
        query.withView { q in key.withView { k in value.withView { v in
        output.withMutableView { o in lse.withMutableView { l in
            run(shape: shape, scale: scale, threads: threads ?? defaultThreadCount,
                q: q, k: k, v: v, o: o, lse: l, mask: mask)
        } } } } }
        return try AttentionResult(output: output, logSumExp: lse)
    }
}
