/// BigBird attention (Zaheer et al. 2020, the ITC form): block-sparse window, global
/// and random blocks.
///
/// ```
/// // naive reference (what this computes), for each b, h, i with p = i + Nk − Nq,
/// // t = ⌊p / bs⌋ the query block and s(j) = ⌊j / bs⌋ the key block:
/// // visible(j) = t ∈ G || s(j) ∈ G || |s(j) − t| ≤ 1 || s(j) ∈ R[h][t]
/// //              causal: and j ≤ p;  padding: j < keyLengths[b]
/// s[j] = scale · dot(q[b, h, i], k[b, hk, j])         for visible j
/// o[b, h, i] = Σ_j softmax(s)[j] · v[b, hk, j],       lse[b, h, i] = log Σ_j exp(s[j])
/// ```
/// `G` the global blocks (default the first and the last), `R[h][t]` the random blocks of
/// query block `t` in head `h`: `randomBlockCount` (default 3) drawn from the seeded
/// generator among the blocks not already seen (causal: from the past only), or given
/// explicitly. Requires `Nq ≤ Nk`. Rows with no visible key are 0 with `lse = -infinity`.
/// The pattern is ``BigBirdPattern``; one pass of the tiled softmax kernel with query
/// tiles inside one block, each listing its blocks' key tiles, all fully visible but the
/// causal diagonal; global query blocks list every key tile (KernelDocs/BigBird.md).
///
/// - Complexity: `2 · pairs · (D + Dv)` FLOPs with about `Nq · bs · (3 + |G| + r)` pairs per
///   head plus `|G| · bs · Nk` for the global query blocks; workspace of a few hundred KiB
///   per thread, independent of `Nq` and `Nk`; the pattern holds `H · ⌈Nk / bs⌉ · r` block indices.
public struct BigBirdAttention: KernelWidening, ModifiableAttention {
    /// Block size `bs` (default 64).
    public var blockSize: Int
    /// Random blocks per head and query block (default 3).
    public var randomBlockCount: Int
    /// Global block indices; `nil` means the first and the last block.
    public var globalBlocks: [Int]?
    /// Explicit random blocks `[head][queryBlock] → key blocks`, replacing the draw.
    public var randomBlocks: [[[Int]]]?
    /// Seed of the random block draw.
    public var seed: UInt64
    public var causal: Bool
    /// Score scale; `nil` means `1 / sqrt(D)`. Must be finite.
    public var scale: Float?
    /// Soft-capping, ALiBi, an additive bias and sinks (``ScoreModifiers``); none by default.
    public var modifiers = ScoreModifiers()
    /// The last pattern built, for calls with the same settings and shape.
    private let plans = PlanCache<PlanKey, BigBirdPattern>()

    /// Everything the pattern depends on.
    private struct PlanKey: Equatable {
        var blockSize: Int, randomBlockCount: Int, globalBlocks: [Int]?, randomBlocks: [[[Int]]]?
        var seed: UInt64, causal: Bool, heads: Int, queryLength: Int, keyLength: Int
    }

    public init(blockSize: Int = 64, randomBlockCount: Int = 3, globalBlocks: [Int]? = nil,
                randomBlocks: [[[Int]]]? = nil, seed: UInt64 = 0, causal: Bool = false, scale: Float? = nil) {
        self.blockSize = blockSize
        self.randomBlockCount = randomBlockCount
        self.globalBlocks = globalBlocks
        self.randomBlocks = randomBlocks
        self.seed = seed
        self.causal = causal
        self.scale = scale
    }

    public var name: String { "bigbird" }

    public func validate(_ shape: AttentionShape) throws {
        let variant = "bigbird attention"
        try checkPatternShape(shape, scale: scale, variant: variant)
        try checkOption(blockSize, "blockSize", in: 1...patternLimit, variant: variant)
        try checkOption(randomBlockCount, "randomBlockCount", in: 0...patternLimit, variant: variant)
        guard shape.queryLength <= shape.keyLength else {
            throw AttentionError.unsupported(
                "\(variant) needs queryLength <= keyLength (query blocks are key blocks), got \(shape.queryLength) > \(shape.keyLength)")
        }
        let n = ceilDiv(shape.keyLength, blockSize)
        for g in globalBlocks ?? [] where g < 0 || g >= n {
            throw AttentionError.invalidParameter(
                "\(variant): global block \(g) is outside 0..<\(n) (keyLength \(shape.keyLength) / blockSize \(blockSize), rounded up)")
        }
        if let randomBlocks {
            guard randomBlocks.count == shape.heads else {
                throw AttentionError.invalidParameter(
                    "\(variant): randomBlocks has \(randomBlocks.count) heads, expected \(shape.heads)")
            }
            for (h, perBlock) in randomBlocks.enumerated() {
                guard perBlock.count == n else {
                    throw AttentionError.invalidParameter(
                        "\(variant): randomBlocks[\(h)] has \(perBlock.count) query blocks, expected \(n)")
                }
                for (t, blocks) in perBlock.enumerated() {
                    for s in blocks where s < 0 || s >= n {
                        throw AttentionError.invalidParameter(
                            "\(variant): randomBlocks[\(h)][\(t)] holds block \(s), outside 0..<\(n)")
                    }
                }
            }
        }
    }

    /// The pattern for `shape`, with the random blocks drawn (or taken as given).
    /// The last one built is reused by calls with the same settings and shape.
    public func pattern(for shape: AttentionShape) throws -> BigBirdPattern {
        try validate(shape)
        let key = PlanKey(blockSize: blockSize, randomBlockCount: randomBlockCount, globalBlocks: globalBlocks,
                          randomBlocks: randomBlocks, seed: seed, causal: causal, heads: shape.heads,
                          queryLength: shape.queryLength, keyLength: shape.keyLength)
        return plans.plan(for: key) { makePattern(for: shape) }
    }

    private func makePattern(for shape: AttentionShape) -> BigBirdPattern {
        let n = ceilDiv(shape.keyLength, blockSize)
        let global = globalBlocks ?? Array(Set([0, n - 1])).sorted()
        var generator = SeededGenerator(seed: seed)
        let random = randomBlocks ?? BigBirdPattern.drawRandomBlocks(
            heads: shape.heads, blockCount: n, count: randomBlockCount, globalBlocks: global,
            causal: causal, generator: &generator)
        return BigBirdPattern(blockSize: blockSize, globalBlocks: global, randomBlocks: random, causal: causal,
                              queryLength: shape.queryLength, keyLength: shape.keyLength)
    }

    public func cost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        let threads = try threadCount(threads)
        return patternCost(try pattern(for: shape), shape: shape, threads: threads)
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
                call.run { h, keyEnd in pattern.mask(head: h, keyEnd: keyEnd) }
            }
        }
    }
}

extension BigBirdAttention: KernelWideningBackward {
    /// The flash-style backward of the tiled kernel (KernelDocs/BigBird.md, "Backward")
    /// with the forward's plan held fixed (the same random blocks: the pattern is the
    /// forward's, from the same settings and shape): per block of 128 keys, the query
    /// blocks whose window, global or random blocks hold one of its keys; `dQ` summed in
    /// key-block order. Bitwise identical for every thread count.
    ///
    /// ```
    /// // naive reference: DenseAttention's backward with the pattern's visible keys J
    /// P[j] = exp(scale · dot(q[b,h,i], k[b,hk,j]) − lse[b,h,i]),  dS[j] = P[j] · (dO·v[j] − dO·o)
    /// dQ[b,h,i] = scale · Σ_j dS[j] k[j],  dK[b,hk,j] += scale · dS[j] q[i],  dV[b,hk,j] += P[j] dO[i]
    /// ```
    ///
    /// - Complexity: `2.5 ×` the forward's FLOPs on the visible pairs (a key block's tile
    ///   for a query block spans its ranges, the keys between them masked); workspace of
    ///   about 341 KiB per thread at `D = Dv = 64` plus one `Int` per 128 keys per key/value head.
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
        call.run { h, keyEnd in BigBirdBackwardMask(forward: pattern.mask(head: h, keyEnd: keyEnd)) }
    }

    func addsKeyGradients(_ shape: AttentionShape) -> Bool { false }

    public func backwardCost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        tiledBackwardCost(forward: try cost(shape, threads: threads), shape: shape, threads: threads,
                          modifiers: modifiers)
    }
}
