/// Longformer attention (Beltagy et al. 2020): a dilated sliding window per head plus
/// global positions.
///
/// ```
/// // naive reference (what this computes), for each b, h, i with p = i + Nk − Nq, δ = dilations[h]:
/// // window(j) = (j − p) mod δ == 0 && |j − p| ≤ δ·(w/2)      (causal: 0 ≤ p − j ≤ δ·w)
/// // visible(j) = p ∈ G || j ∈ G || window(j);  causal: and j ≤ p;  padding: j < keyLengths[b]
/// s[j] = scale · dot(q[b, h, i], k[b, hk, j])         for visible j
/// o[b, h, i] = Σ_j softmax(s)[j] · v[b, hk, j],       lse[b, h, i] = log Σ_j exp(s[j])
/// ```
/// Rows with no visible key are 0 with `lse = -infinity`. The pattern is
/// ``LongformerPattern``. Two passes of the tiled softmax kernel over disjoint key sets,
/// merged by log-sum-exp inside the kernel (KernelDocs/Longformer.md): every query's
/// window and the global keys, with queries grouped by residue mod `δ` so that dilated
/// keys are tiles with step `δ` read in place; then the global queries against every
/// other key, through the same kernel as dense rows.
///
/// - Complexity: `2 · pairs · (D + Dv)` FLOPs with about `Nq · (w + 1 + |G|) + |G| · Nk`
///   pairs per head; workspace of a few hundred KiB per thread, independent of `Nq` and `Nk`.
public struct LongformerAttention: KernelWidening, ModifiableAttention {
    /// Total window `w`: `w/2` keys each side (causal: `w` to the left), `δ` apart.
    public var window: Int
    /// Dilation per head (one value applies to every head). Default 1.
    public var dilations: [Int]
    /// Global positions (key positions `0..<Nk`; query `i` is global when `i + Nk − Nq` is).
    public var globalPositions: [Int]
    public var causal: Bool
    /// Score scale; `nil` means `1 / sqrt(D)`. Must be finite.
    public var scale: Float?
    /// Soft-capping, ALiBi, an additive bias and sinks (``ScoreModifiers``); none by default.
    public var modifiers = ScoreModifiers()
    /// The last plan built, for calls with the same settings and shape (no arrays per call).
    private let plans = PlanCache<PlanKey, Plan>()

    /// Everything the plan depends on.
    private struct PlanKey: Equatable {
        var window: Int, dilations: [Int], globalPositions: [Int], causal: Bool
        var heads: Int, queryLength: Int, keyLength: Int
    }

    /// A call's pattern with its global key runs and global query ranges.
    private struct Plan {
        let pattern: LongformerPattern
        let globalKeys: [Range<Int>], globalQueries: [Range<Int>]
    }

    public init(window: Int = 512, dilations: [Int] = [1], globalPositions: [Int] = [],
                causal: Bool = false, scale: Float? = nil) {
        self.window = window
        self.dilations = dilations
        self.globalPositions = globalPositions
        self.causal = causal
        self.scale = scale
    }

    public var name: String { "longformer" }

    public func validate(_ shape: AttentionShape) throws {
        let variant = "longformer attention"
        try checkPatternShape(shape, scale: scale, variant: variant)
        try checkOption(window, "window", in: 0...patternLimit, variant: variant)
        guard dilations.count == 1 || dilations.count == shape.heads else {
            throw AttentionError.invalidParameter(
                "\(variant): dilations has \(dilations.count) entries, expected 1 or one per head (\(shape.heads))")
        }
        for (h, d) in dilations.enumerated() {
            try checkOption(d, "dilations[\(h)]", in: 1...(patternLimit / max(1, window)), variant: variant)
        }
        for g in globalPositions where g < 0 || g >= shape.keyLength {
            throw AttentionError.invalidParameter(
                "\(variant): global position \(g) is outside 0..<\(shape.keyLength) (the key length)")
        }
    }

    /// The pattern for `shape`.
    public func pattern(for shape: AttentionShape) throws -> LongformerPattern {
        try validate(shape)
        return try LongformerPattern(window: window,
                                 dilations: dilations.count == 1 ? Array(repeating: dilations[0], count: shape.heads) : dilations,
                                 globalPositions: globalPositions, causal: causal,
                                 queryLength: shape.queryLength, keyLength: shape.keyLength)
    }

    public func cost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        let threads = try threadCount(threads)
        return patternCost(try plan(for: shape).pattern, shape: shape, threads: threads)
    }

    /// The pattern of `shape` with its global runs, built once per settings and shape.
    private func plan(for shape: AttentionShape) throws -> Plan {
        let key = PlanKey(window: window, dilations: dilations, globalPositions: globalPositions, causal: causal,
                          heads: shape.heads, queryLength: shape.queryLength, keyLength: shape.keyLength)
        return try plans.plan(for: key) {
            let pattern = try self.pattern(for: shape)
            // The global runs once for every head and item (each mask clips them to its keys).
            return Plan(pattern: pattern, globalKeys: pattern.globalRuns(below: shape.keyLength),
                        globalQueries: pattern.globalQueryRanges)
        }
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
            let plan = try self.plan(for: call.shape)
            TiledSoftmaxAttention.attendPattern(call, merging: true) { call in
                let pattern = plan.pattern
                call.run(queryTile: pattern.queryTile) { h, keyEnd in
                    pattern.windowMask(head: h, keyEnd: keyEnd, globalKeys: plan.globalKeys)
                }
                guard !pattern.globalPositions.isEmpty else { return }
                call.run(merge: true) { h, keyEnd in
                    pattern.globalQueryMask(head: h, keyEnd: keyEnd, queries: plan.globalQueries)
                }
            }
        }
    }
}

extension LongformerAttention: KernelWideningBackward {
    /// The flash-style backward of the tiled kernel (KernelDocs/Longformer.md, "Backward")
    /// in three passes, each with the forward's final output and log-sum-exp: the dilated
    /// windows, then the global keys outside each window, then the global queries' other
    /// keys (adding to `dK`, `dV`). Every visible pair is in exactly one pass (as in the
    /// forward's two), so the passes' sums are the whole backward; `dQ` is summed in pass,
    /// then key-block order. Bitwise identical for every thread count.
    ///
    /// ```
    /// // naive reference: DenseAttention's backward with the pattern's visible keys J
    /// P[j] = exp(scale · dot(q[b,h,i], k[b,hk,j]) − lse[b,h,i]),  dS[j] = P[j] · (dO·v[j] − dO·o)
    /// dQ[b,h,i] = scale · Σ_j dS[j] k[j],  dK[b,hk,j] += scale · dS[j] q[i],  dV[b,hk,j] += P[j] dO[i]
    /// ```
    ///
    /// With one dilation `δ` for every head the window pass lists keys and queries by residue
    /// class modulo `δ` (as the forward groups its queries); with dilations that differ
    /// between heads it scores contiguous tiles, the other residues masked.
    ///
    /// - Complexity: `2.5 ×` the forward's FLOPs on the visible pairs (`δ ×` the window's
    ///   pairs scored when the dilations differ between heads); workspace of about 341 KiB
    ///   per thread at `D = Dv = 64` plus one `Int` per key block per key/value head.
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
        let plan = try self.plan(for: call.shape), pattern = plan.pattern
        let window = backwardWindowBlocks(pattern)
        if window.modulus == 1 && pattern.dilations.contains(where: { $0 != 1 }) {
            // Dilations that differ between heads: contiguous blocks, other residues masked.
            call.run { h, keyEnd in
                let w = pattern.windowRange(head: h)
                return LongformerWindowBackwardMask(lo: w.lo, hi: w.hi, dilation: w.dilation,
                                                    offset: pattern.offset, keyEnd: keyEnd)
            }
        } else {
            // One dilation δ: keys and queries in residue classes modulo δ, as the forward's queries.
            call.run(keyBlocks: window) { h, keyEnd in pattern.windowMask(head: h, keyEnd: keyEnd, globalKeys: []) }
        }
        guard !pattern.globalPositions.isEmpty else { return }
        call.run(accumulate: true) { h, keyEnd in
            let w = pattern.windowRange(head: h)
            return LongformerGlobalKeyMask(pattern: pattern, lo: w.lo, hi: w.hi, dilation: w.dilation, keyEnd: keyEnd)
        }
        guard !plan.globalQueries.isEmpty else { return }
        call.run(accumulate: true) { h, keyEnd in
            pattern.globalQueryMask(head: h, keyEnd: keyEnd, queries: plan.globalQueries)
        }
    }

    /// The global passes add to the window pass's rows.
    func addsKeyGradients(_ shape: AttentionShape) throws -> Bool {
        try !plan(for: shape).pattern.globalPositions.isEmpty
    }

    /// The key blocks of the window pass: residue classes modulo the dilation when every
    /// head has the same (each class seen by its own queries), else contiguous blocks.
    func backwardWindowBlocks(_ pattern: LongformerPattern) -> TiledSoftmaxBackward.KeyBlocks {
        let d = pattern.dilations[0]
        guard pattern.dilations.allSatisfy({ $0 == d }) else { return .contiguous }
        return .init(modulus: d, classes: 0..<min(d, pattern.keyLength), disjointClasses: true)
    }

    public func backwardCost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        tiledBackwardCost(forward: try cost(shape, threads: threads), shape: shape, threads: threads,
                          passes: TwoBackwardPasses(first: backwardWindowBlocks(try plan(for: shape).pattern), second: .contiguous),
                          modifiers: modifiers)
    }
}
