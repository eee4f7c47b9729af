/// Learned points attending over a sequence: `softmax(scale · P Kᵀ) V` for points
/// `P [H, m, D]` shared by every batch item, the first step of the Set Transformer's
/// induced set attention and its pooling by attention (Lee et al. 2019).
///
/// The points are a query view with batch stride 0 (nothing is copied per batch item) and
/// the product is one run of the tiled softmax kernel, key padding as `keyEnd`.
enum PointAttention {
    /// Checks learned points `[H, m, D]` (count, finite values) and returns `m`.
    static func checkPoints(_ points: [Float], heads: Int, headDim: Int, option: String, variant: String) throws {
        try checkOption(heads, "heads", in: 1...lengthLimit, variant: variant)
        try checkOption(headDim, "headDim", in: 1...DenseAttention.maxHeadDim, variant: variant)
        guard !points.isEmpty, let perHead = checkedProduct([heads, headDim]), points.count % perHead == 0 else {
            throw AttentionError.shapeMismatch(
                "\(variant): \(option) has \(points.count) elements, expected [H \(heads), m, D \(headDim)] with m ≥ 1")
        }
        try checkLimit(points.count / perHead, "the number of \(option)", variant: variant)
        if let index = points.firstIndex(where: { !$0.isFinite }) {
            throw AttentionError.invalidParameter("\(variant): \(option)[\(index)] must be finite, got \(points[index])")
        }
    }

    /// What both Set Transformer conformers need of a problem: the shape, a finite scale,
    /// no causal rule (the points see every key), and the heads and head dimension the
    /// points were made for.
    static func checkProblem(_ shape: AttentionShape, heads: Int, headDim: Int, causal: Bool, scale: Float?,
                             variant: String) throws {
        try checkPatternShape(shape, scale: scale, variant: variant)
        guard !causal else {
            throw AttentionError.unsupported("\(variant) has no causal form: the learned points see every key")
        }
        guard shape.heads == heads, shape.headDim == headDim else {
            throw AttentionError.shapeMismatch(
                "\(variant): configured for heads \(heads) and headDim \(headDim), the problem has heads \(shape.heads) and headDim \(shape.headDim)")
        }
    }

    /// Points drawn from `N(0, 1)` with a seeded generator, `[heads, count, headDim]`.
    static func seededPoints(heads: Int, count: Int, headDim: Int, seed: UInt64,
                             option: String, variant: String) throws -> [Float] {
        try checkOption(count, "the number of \(option)", in: 1...lengthLimit, variant: variant)
        try checkOption(heads, "heads", in: 1...lengthLimit, variant: variant)
        try checkOption(headDim, "headDim", in: 1...DenseAttention.maxHeadDim, variant: variant)
        try checkFloatAllocation(heads, count, headDim, option: "\(variant): \(option) [H, m, D]")
        var rng = SeededGenerator(seed: seed)
        return (0..<(heads * count * headDim)).map { _ in Float(rng.nextGaussian()) }
    }

    /// `o[b, h] = softmax(scale · points[h] · k[b, hk]ᵀ) v[b, hk]` over the first
    /// `keyLengths[b]` keys, into `o` and `lse` (`[B, H, m, ·]`).
    static func run(points: [Float], count m: Int, shape: AttentionShape, scale: Float, threads: Int,
                    keyLengths: [Int]?, k: TensorView, v: TensorView, o: MutableTensorView, lse: MutableTensorView) {
        var problem = shape
        problem.queryLength = m
        points.withUnsafeBufferPointer { p in
            let q = TensorView(base: p.baseAddress!, strides: SIMD4(0, m * shape.headDim, shape.headDim, 1))
            TiledSoftmaxAttention.run(shape: problem, scale: scale, threads: threads,
                                      q: q, k: k, v: v, o: o, lse: lse) { b, _ in
                IntervalMask(queryLength: m, keyLength: shape.keyLength, causal: false,
                             keyEnd: keyLengths?[b] ?? shape.keyLength)
            }
        }
    }

    /// FLOPs, pairs and kernel workspace of ``run`` for `m` points.
    static func cost(count m: Int, shape: AttentionShape, threads: Int) -> AttentionCost {
        var problem = shape
        problem.queryLength = m
        let pairs = shape.batch * shape.heads * m * shape.keyLength
        return AttentionCost(flops: 2 * Double(pairs) * Double(shape.headDim + shape.valueDim),
                             workspaceBytes: TiledSoftmaxAttention.workspaceBytes(shape: problem, threads: threads),
                             scoredPairs: pairs)
    }
}

extension PointAttention {
    /// The backward of ``run(points:count:shape:scale:threads:keyLengths:k:v:o:lse:)``
    /// (``TiledSoftmaxBackward`` with the points as a query view of batch stride 0): `dK`,
    /// `dV` (written) and each batch item's gradient of the points added into `dPoints`
    /// `[B, H, m, D]` (zero on entry: the points' gradient is ``sumOverBatch(_:shape:count:into:)``
    /// of it). `o`, `lse` are the forward's.
    static func backward(points: [Float], count m: Int, shape: AttentionShape, scale: Float, threads: Int,
                         keyLengths: [Int]?, k: TensorView, v: TensorView, o: TensorView, lse: TensorView,
                         dO: TensorView, dPoints: MutableTensorView, dK: MutableTensorView, dV: MutableTensorView) {
        var problem = shape
        problem.queryLength = m
        points.withUnsafeBufferPointer { p in
            let q = TensorView(base: p.baseAddress!, strides: SIMD4(0, m * shape.headDim, shape.headDim, 1))
            TiledSoftmaxBackward.run(shape: problem, scale: scale, threads: threads, q: q, k: k, v: v, o: o, lse: lse,
                                     dO: dO, dQ: dPoints, dK: dK, dV: dV) { b, _ in
                IntervalMask(queryLength: m, keyLength: shape.keyLength, causal: false,
                             keyEnd: keyLengths?[b] ?? shape.keyLength)
            }
        }
    }

    /// `gradient[h, r, c] += Σ_b perItem[b, h, r, c]`, batch items in order (`perItem` is
    /// contiguous `[B, H, m, D]`): the points' gradient, the same bits for any thread count.
    static func sumOverBatch(_ perItem: TensorView, shape: AttentionShape, count m: Int,
                             into gradient: UnsafeMutablePointer<Float>) {
        let perHead = m * shape.headDim
        for b in 0..<shape.batch {
            for h in 0..<shape.heads {
                let source = perItem.row(b, h, 0), target = gradient + h * perHead
                for n in 0..<perHead { target[n] += source[n] }
            }
        }
    }

    /// Workspace of ``backward(points:count:shape:scale:threads:keyLengths:k:v:o:lse:dO:dPoints:dK:dV:)``
    /// beside `dPoints`.
    static func backwardWorkspaceBytes(count m: Int, shape: AttentionShape, threads: Int) -> Int {
        var problem = shape
        problem.queryLength = m
        return TiledSoftmaxBackward.workspaceBytes(shape: problem, threads: threads)
    }
}
