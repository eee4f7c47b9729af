/// Sparse Transformer attention (Child et al. 2019): the strided or the fixed pattern,
/// both of its parts united in one head.
///
/// ```
/// // naive reference (what this computes), for each b, h, i with p = i + Nk − Nq:
/// // strided: visible(j) = |p − j| < l || (p − j) mod l == 0
/// // fixed:   visible(j) = ⌊j / l⌋ == ⌊p / l⌋ || j mod l ≥ l − c
/// // causal:  additionally j ≤ p;  key padding: j < keyLengths[b]
/// s[j] = scale · dot(q[b, h, i], k[b, hk, j])         for visible j
/// o[b, h, i] = Σ_j softmax(s)[j] · v[b, hk, j],       lse[b, h, i] = log Σ_j exp(s[j])
/// ```
/// The stride `l` defaults to `⌈√Nk⌉`, the summary columns `c` of the fixed pattern to 1.
/// Rows with no visible key are 0 with `lse = -infinity`. The pattern is
/// ``StridedPattern``. The tiled softmax kernel runs the strided pattern in two passes
/// over disjoint key sets, merged by log-sum-exp inside the kernel: the band over
/// contiguous query tiles, then the columns with queries grouped by residue mod `l` and
/// keys read `l` rows apart in place. The fixed pattern is one pass: query tiles within
/// a block see that block and the summary columns as tiles with step `l`.
/// (KernelDocs/Strided.md.)
///
/// - Complexity: `2 · pairs · (D + Dv)` FLOPs with about `Nq · (2l + Nk / l)` pairs per
///   head (strided; fixed: `Nq · (l + c · Nk / l)`), i.e. `O(N √N)` at the default stride;
///   workspace of a few hundred KiB per thread, independent of `Nq` and `Nk`.
public struct StridedAttention: KernelWidening, ModifiableAttention {
    /// The two patterns of the paper.
    public enum Kind: Hashable, Sendable {
        /// The band `|p − j| < l` and every `l`-th key before and after.
        case strided
        /// Blocks of `l` positions plus the last `summary` positions of every block.
        case fixed(summary: Int)
    }

    public var kind: Kind
    /// The stride `l`; `nil` means `⌈√Nk⌉`.
    public var stride: Int?
    public var causal: Bool
    /// Score scale; `nil` means `1 / sqrt(D)`. Must be finite.
    public var scale: Float?
    /// Soft-capping, ALiBi, an additive bias and sinks (``ScoreModifiers``); none by default.
    public var modifiers = ScoreModifiers()

    public init(kind: Kind = .strided, stride: Int? = nil, causal: Bool = false, scale: Float? = nil) {
        self.kind = kind
        self.stride = stride
        self.causal = causal
        self.scale = scale
    }

    public var name: String { "strided" }

    /// `⌈√n⌉`, the paper's stride for `n` keys.
    public static func defaultStride(keyLength n: Int) -> Int {
        var r = Int(Double(max(n, 0)).squareRoot())
        while r * r < n { r += 1 }
        while r > 0 && (r - 1) * (r - 1) >= n { r -= 1 }
        return max(1, r)
    }

    public func validate(_ shape: AttentionShape) throws {
        try checkPatternShape(shape, scale: scale, variant: "strided attention")
        let l = stride ?? StridedAttention.defaultStride(keyLength: shape.keyLength)
        try checkOption(l, "stride", in: 1...patternLimit, variant: "strided attention")
        if case .fixed(let c) = kind {
            try checkOption(c, "summary", in: 1...l, variant: "strided attention (fixed, stride \(l))")
        }
    }

    /// The pattern for `shape`.
    public func pattern(for shape: AttentionShape) throws -> StridedPattern {
        try validate(shape)
        return StridedPattern(kind: kind, stride: stride ?? StridedAttention.defaultStride(keyLength: shape.keyLength),
                              causal: causal, queryLength: shape.queryLength, keyLength: shape.keyLength)
    }

    public func cost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        let threads = try threadCount(threads)
        return patternCost(try pattern(for: shape), shape: shape, threads: threads)
    }

    /// Merged passes read their output back: a 16-bit output is staged in `Float`.
    func stagedOperands(_ shape: AttentionShape) -> (query: Bool, output: Bool) { (false, true) }

    /// Merged passes stage their 16-bit output part by part (``MergedOutputStaging``).
    func stagedOutputElements(_ shape: AttentionShape) -> Int { MergedOutputStaging.elements(shape) }

    public func attend(query: ActivationView, key: ActivationView, value: ActivationView,
                       output: MutableActivationView, logSumExp: MutableStridedView?,
                       keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws {
        try withCheckedCall(query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                            keyLengths: keyLengths, workspace: workspace, threads: threads, scale: scale,
                            modifiers: modifiers) { call in
            let pattern = try self.pattern(for: call.shape)
            TiledSoftmaxAttention.attendPattern(call, merging: true) { call in
                switch pattern.kind {
                case .strided:
                    // Head by head, so that the second pass finds the head's rows still in cache.
                    // The column pass (rows `l` apart) first: it only writes its output rows,
                    // and the band pass merges into them reading rows in order.
                    call.forEachHead { head, _ in
                        head.run { _, keyEnd in pattern.columnMask(keyEnd: keyEnd) }
                        head.run(queryTile: pattern.queryTile, merge: true) { _, keyEnd in pattern.bandMask(keyEnd: keyEnd) }
                    }
                case .fixed(let c):
                    call.run(queryTile: pattern.queryTile) { _, keyEnd in pattern.fixedMask(keyEnd: keyEnd, summary: c) }
                }
            }
        }
    }
}

extension StridedAttention: KernelWideningBackward {
    /// The flash-style backward of the tiled kernel (KernelDocs/Strided.md, "Backward"),
    /// pass by pass, each with the forward's final output and log-sum-exp (so every pass's
    /// probabilities are the final ones): strided: the column pass (keys and queries in
    /// residue classes modulo the stride, each class on its own) then the band pass
    /// (adding to `dK`, `dV`); fixed: the own blocks, then the summary columns of the other
    /// blocks (keys in the summary residue classes). The passes' pairs are disjoint, so
    /// their sums are the whole backward; `dQ` is summed in pass, then key-block order.
    /// Bitwise identical for every thread count.
    ///
    /// ```
    /// // naive reference: DenseAttention's backward with the pattern's visible keys J
    /// P[j] = exp(scale · dot(q[b,h,i], k[b,hk,j]) − lse[b,h,i]),  dS[j] = P[j] · (dO·v[j] − dO·o)
    /// dQ[b,h,i] = scale · Σ_j dS[j] k[j],  dK[b,hk,j] += scale · dS[j] q[i],  dV[b,hk,j] += P[j] dO[i]
    /// ```
    ///
    /// - Complexity: `2.5 ×` the forward's FLOPs; workspace of about 341 KiB per thread at
    ///   `D = Dv = 64` plus one `Int` per key block per key/value head.
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
        let passes = backwardPasses(pattern)
        switch pattern.kind {
        case .strided:
            call.run(keyBlocks: passes.first) { _, keyEnd in pattern.columnMask(keyEnd: keyEnd) }
            call.run(keyBlocks: passes.second ?? .contiguous, accumulate: true) { _, keyEnd in
                pattern.bandMask(keyEnd: keyEnd)
            }
        case .fixed(let c):
            call.run(keyBlocks: passes.first) { _, keyEnd in
                BlockedMask(size: pattern.stride, backward: 0, forward: 0, causal: pattern.causal,
                            offset: pattern.offset, keyEnd: keyEnd)
            }
            if let summary = passes.second {
                call.run(keyBlocks: summary, accumulate: true) { _, keyEnd in
                    FixedSummaryMask(stride: pattern.stride, summary: c, causal: pattern.causal,
                                     offset: pattern.offset, keyEnd: keyEnd)
                }
            }
        }
    }

    /// The band pass (strided) or the summary pass (fixed) adds to the first pass's rows.
    func addsKeyGradients(_ shape: AttentionShape) throws -> Bool {
        backwardPasses(try pattern(for: shape)).second != nil
    }

    /// The key blocks of the backward's passes (see ``gradients(query:key:value:output:logSumExp:outputGradient:dQuery:dKey:dValue:keyLengths:workspace:threads:)``):
    /// strided: the residue classes (those holding a key), then contiguous blocks; fixed:
    /// contiguous blocks, then the summary classes holding a key (none when every summary
    /// column is past the keys).
    func backwardPasses(_ pattern: StridedPattern) -> TwoBackwardPasses {
        let l = pattern.stride, n = pattern.keyLength
        switch pattern.kind {
        case .strided:
            return TwoBackwardPasses(first: .init(modulus: l, classes: 0..<min(l, n), disjointClasses: true),
                                     second: .contiguous)
        case .fixed(let c):
            let summary = min(l - c, n)..<min(l, n)
            return TwoBackwardPasses(first: .contiguous,
                                     second: summary.isEmpty ? nil : .init(modulus: l, classes: summary))
        }
    }

    public func backwardCost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        tiledBackwardCost(forward: try cost(shape, threads: threads), shape: shape, threads: threads,
                          passes: backwardPasses(try pattern(for: shape)), modifiers: modifiers)
    }
}
