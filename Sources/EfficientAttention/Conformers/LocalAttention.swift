/// Local attention: each query sees a window of nearby keys, as a sliding window or in
/// blocks (Image Transformer, Parmar et al. 2018; the local-attention form of
/// Roy et al. 2021).
///
/// ```
/// // naive reference (what this computes), for each b, h, i with p = i + Nk − Nq:
/// // sliding window: keys = max(0, p − left) ... min(Nk − 1, p + right)   (causal: right = 0)
/// // blocked:        t = ⌊p / b⌋, keys = blocks t − lookBackward ... t + lookForward
/// //                 (causal: and j ≤ p)
/// s[j] = scale · dot(q[b, h, i], k[b, hk, j])         for j in keys, j < keyLengths[b]
/// o[b, h, i] = Σ_j softmax(s)[j] · v[b, hk, j],       lse[b, h, i] = log Σ_j exp(s[j])
/// ```
/// Rows with no visible key are 0 with `lse = -infinity`. The pattern is
/// ``LocalPattern``; the kernel is the tiled softmax kernel over the key tiles of each
/// query tile's window (KernelDocs/Local.md), so only tiles on the window's edges are
/// masked and keys outside it are never read.
///
/// - Complexity: `2 · pairs · (D + Dv)` FLOPs with about `Nq · (left + right + 1)` pairs
///   per head (blocked: `Nq · b · (lookBackward + lookForward + 1)`); workspace of a few
///   hundred KiB per thread, independent of `Nq` and `Nk`.
public struct LocalAttention: KernelWidening, ModifiableAttention {
    /// The two local forms.
    public enum Form: Hashable, Sendable {
        /// Key `j` visible iff `p − left ≤ j ≤ p + right`.
        case slidingWindow(left: Int, right: Int)
        /// Blocks of `size` positions; a query sees its block, `lookBackward` blocks
        /// before it and `lookForward` blocks after it.
        case blocked(size: Int, lookBackward: Int, lookForward: Int)
    }

    public var form: Form
    /// Applies the causal rule `j ≤ p` on top of the form (sliding window: `right` 0).
    public var causal: Bool
    /// Score scale; `nil` means `1 / sqrt(D)`. Must be finite.
    public var scale: Float?
    /// Soft-capping, ALiBi, an additive bias and sinks (``ScoreModifiers``); none by default.
    public var modifiers = ScoreModifiers()

    /// A sliding window of `left` keys before and `right` keys after each query.
    public init(left: Int, right: Int, causal: Bool = false, scale: Float? = nil) {
        self.init(form: .slidingWindow(left: left, right: right), causal: causal, scale: scale)
    }

    /// Blocked local attention with blocks of `blockSize` positions.
    public init(blockSize: Int, lookBackward: Int = 1, lookForward: Int = 0, causal: Bool = false,
                scale: Float? = nil) {
        self.init(form: .blocked(size: blockSize, lookBackward: lookBackward, lookForward: lookForward),
                  causal: causal, scale: scale)
    }

    public init(form: Form, causal: Bool = false, scale: Float? = nil) {
        self.form = form
        self.causal = causal
        self.scale = scale
    }

    public var name: String { "local" }

    public func validate(_ shape: AttentionShape) throws {
        try checkPatternShape(shape, scale: scale, variant: "local attention")
        switch form {
        case .slidingWindow(let left, let right):
            try checkOption(left, "left", in: 0...patternLimit, variant: "local attention")
            try checkOption(right, "right", in: 0...patternLimit, variant: "local attention")
        case .blocked(let size, let backward, let forward):
            try checkOption(size, "blockSize", in: 1...patternLimit, variant: "local attention")
            try checkOption(backward, "lookBackward", in: 0...patternLimit, variant: "local attention")
            try checkOption(forward, "lookForward", in: 0...patternLimit, variant: "local attention")
        }
    }

    /// The pattern for `shape`.
    public func pattern(for shape: AttentionShape) throws -> LocalPattern {
        try validate(shape)
        return try LocalPattern(form: form, causal: causal, queryLength: shape.queryLength, keyLength: shape.keyLength)
    }

    public func cost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        let threads = try threadCount(threads)
        let pattern = try pattern(for: shape)
        return patternCost(pattern, shape: shape, threads: threads, queryTile: pattern.queryTile)
    }

    /// One pass: a 16-bit output is written in place, each row rounded once.
    func stagedOperands(_ shape: AttentionShape) -> (query: Bool, output: Bool) { (false, false) }

    public func attend(query: ActivationView, key: ActivationView, value: ActivationView,
                       output: MutableActivationView, logSumExp: MutableStridedView?,
                       keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws {
        try withCheckedCall(query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                            keyLengths: keyLengths, workspace: workspace, threads: threads, scale: scale,
                            modifiers: modifiers) { call in
            try TiledSoftmaxAttention.attendPattern(call, merging: false) { call in
                let pattern = try self.pattern(for: call.shape)
                call.run(queryTile: pattern.queryTile) { _, keyEnd in pattern.mask(keyEnd: keyEnd) }
            }
        }
    }
}

extension LocalAttention: KernelWideningBackward {
    /// The flash-style backward of the tiled kernel (KernelDocs/Local.md, "Backward") over
    /// the forward's mask: per block of 128 keys, the query tiles whose window holds one of
    /// them (blocked: the forward's block-aligned query tiles), `dQ` summed in key-block
    /// order; no `Nq × Nk` buffer, bitwise identical for every thread count.
    ///
    /// ```
    /// // naive reference: DenseAttention's backward with the visible keys J of the forward
    /// P[j] = exp(scale · dot(q[b,h,i], k[b,hk,j]) − lse[b,h,i]),  dS[j] = P[j] · (dO·v[j] − dO·o)
    /// dQ[b,h,i] = scale · Σ_j dS[j] k[j],  dK[b,hk,j] += scale · dS[j] q[i],  dV[b,hk,j] += P[j] dO[i]
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
        let pattern = try self.pattern(for: call.shape)
        call.run { _, keyEnd in pattern.mask(keyEnd: keyEnd) }
    }

    func addsKeyGradients(_ shape: AttentionShape) -> Bool { false }

    public func backwardCost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        tiledBackwardCost(forward: try cost(shape, threads: threads), shape: shape, threads: threads,
                          modifiers: modifiers)
    }
}
