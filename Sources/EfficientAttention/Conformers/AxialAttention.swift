/// Axial attention (Ho et al. 2019): positions on a grid `axes = [n₁, …, n_a]`
/// (row-major, `N = Π nₜ`), each query attending along every axis through it.
///
/// ```
/// // naive reference (what this computes), for each b, h, i (Nq = Nk = N):
/// // line_t(i) = the positions whose coordinates equal i's on every axis but t
/// // visible_t(j) = j ∈ line_t(i) && (!causal || coord_t(j) ≤ coord_t(i)) && j < keyLengths[b]
/// s[j] = scale · dot(q[b, h, i], k[b, hk, j])
/// // .union: one softmax over ∪_t visible_t (i itself once)
/// o[b, h, i] = Σ_{j ∈ ∪} softmax(s)[j] · v[b, hk, j],   lse = log Σ_{j ∈ ∪} exp(s[j])
/// // .sum: one softmax per axis, outputs added
/// o[b, h, i] = Σ_t Σ_{j ∈ visible_t} softmax_t(s)[j] · v[b, hk, j],   lse as for .union
/// ```
/// Rows with no visible key (key padding) are 0 with `lse = -infinity`. `.union` is a
/// pattern (``AxialPattern``) on the tiled softmax kernel: one pass per axis, queries
/// grouped by line and keys read in place `sₜ = Π_{u>t} n_u` rows apart (no transposed
/// copy), later passes merged by log-sum-exp and hiding the query itself. Its result
/// merges with others like any softmax result. `.sum` runs the axes as separate,
/// unmerged passes and adds their outputs; its `lse` is the union's (from the axes'
/// log-sum-exps, with the query's own score counted once), so a `.sum` result is not
/// mergeable. (KernelDocs/Axial.md.)
///
/// - Complexity: `2 · pairs · (D + Dv)` FLOPs with `pairs = N · (1 + Σₜ (nₜ − 1))` per
///   head (about half causal; `.sum` adds `(a − 1) · N` for the repeated self pairs):
///   `O(N · Σ nₜ)`, `O(N √N)` on a square grid. Workspace: the tiled kernel's tiles per
///   thread, independent of `N`; `.sum` also keeps one output-sized scratch
///   (`4 · B · H · N · (Dv + 1)` bytes).
public struct AxialAttention: KernelWidening, ModifiableAttention {
    /// How the axes' attentions combine.
    public enum Combination: Hashable, Sendable {
        /// One softmax over the union of the axes' keys (mergeable).
        case union
        /// One softmax per axis, outputs summed (the axial-attention package's `sum_axial_out`).
        case sum
    }

    /// The grid `[n₁, …, n_a]`; `nil` means ``defaultAxes(sequenceLength:)`` of each call.
    public var axes: [Int]?
    public var combination: Combination
    public var causal: Bool
    /// Score scale; `nil` means `1 / sqrt(D)`. Must be finite.
    public var scale: Float?
    /// Soft-capping, ALiBi, an additive bias and sinks (``ScoreModifiers``) with `.union`,
    /// over grid positions in row-major order (ALiBi's distance is `|i − j|` in that order);
    /// none by default. `.sum` takes none (each axis is a softmax of its own): a call with
    /// modifiers throws.
    public var modifiers = ScoreModifiers()

    /// The most axes a grid may have.
    public static let maxAxes = 16

    /// The last pattern built, for calls with the same settings and lengths (no arrays per call).
    private let plans = PlanCache<PlanKey, AxialPattern>()

    /// Everything the pattern depends on.
    private struct PlanKey: Equatable {
        var axes: [Int]?, causal: Bool, queryLength: Int, keyLength: Int
    }

    public init(axes: [Int]? = nil, combination: Combination = .union, causal: Bool = false, scale: Float? = nil) {
        self.axes = axes
        self.combination = combination
        self.causal = causal
        self.scale = scale
    }

    public var name: String { "axial" }

    /// The most square two-axis grid of `n` positions: `[n / f, f]` with `f` the largest
    /// divisor of `n` at most `√n` (`[64, 64]` for 4096; `[n, 1]` for a prime `n`).
    public static func defaultAxes(sequenceLength n: Int) -> [Int] {
        guard n > 1 else { return [max(n, 1)] }
        var f = StridedAttention.defaultStride(keyLength: n)
        if f * f > n { f -= 1 }
        while n % f != 0 { f -= 1 }
        return [n / f, f]
    }

    /// The grid of `shape` (the configured axes or the default: the cached pattern's when
    /// the lengths match, so that a checked call allocates nothing).
    func grid(for shape: AttentionShape) -> [Int] {
        if let axes { return axes }
        let key = PlanKey(axes: nil, causal: causal, queryLength: shape.queryLength, keyLength: shape.keyLength)
        return plans.cached(for: key)?.axes ?? AxialAttention.defaultAxes(sequenceLength: shape.queryLength)
    }

    public func validate(_ shape: AttentionShape) throws {
        let variant = "axial attention"
        try checkPatternShape(shape, scale: scale, variant: variant)
        let axes = grid(for: shape)
        try checkOption(axes.count, "the number of axes", in: 1...AxialAttention.maxAxes, variant: variant)
        for (t, n) in axes.enumerated() { try checkOption(n, "axes[\(t)]", in: 1...patternLimit, variant: variant) }
        guard let n = checkedProduct(axes), n == shape.queryLength, n == shape.keyLength else {
            throw AttentionError.invalidParameter(
                "\(variant): axes \(axes) must multiply to the sequence length (queryLength \(shape.queryLength), keyLength \(shape.keyLength); queries and keys share the grid)")
        }
        guard combination == .union || modifiers.isEmpty else {
            throw AttentionError.unsupported(
                "\(variant): modifiers (soft-capping, ALiBi, bias, sinks) take combination .union; with .sum each axis is a softmax of its own")
        }
    }

    /// The `.union` pattern of `shape`.
    public func pattern(for shape: AttentionShape) throws -> AxialPattern {
        try validate(shape)
        let key = PlanKey(axes: axes, causal: causal, queryLength: shape.queryLength, keyLength: shape.keyLength)
        return plans.plan(for: key) { AxialPattern(axes: grid(for: shape), causal: causal) }
    }

    public func cost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        let threads = try threadCount(threads)
        let pattern = try pattern(for: shape)
        var largestTile = 1
        for t in pattern.axes.indices { largestTile = max(largestTile, pattern.queryTile(axis: t)) }
        var cost = patternCost(pattern, shape: shape, threads: threads, queryTile: largestTile)
        if combination == .sum {
            let repeated = (pattern.axes.count - 1) * shape.queryLength * shape.heads * shape.batch
            cost.scoredPairs += repeated
            cost.flops += 2 * Double(repeated) * Double(shape.headDim + shape.valueDim)
            cost.workspaceBytes += try AxialSum.scratchBytes(shape)
        }
        return cost
    }

    /// The passes merge (`.union`) or add (`.sum`) into the output, reading it back: a
    /// 16-bit output is staged in `Float`; 16-bit query, key and value rows are widened by
    /// the tiled kernel as it packs them.
    func stagedOperands(_ shape: AttentionShape) -> (query: Bool, output: Bool) { (false, true) }

    /// Merged passes stage their 16-bit output part by part (``MergedOutputStaging``).
    func stagedOutputElements(_ shape: AttentionShape) -> Int { MergedOutputStaging.elements(shape) }

    public func attend(query: ActivationView, key: ActivationView, value: ActivationView,
                       output: MutableActivationView, logSumExp: MutableStridedView?,
                       keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws {
        try withCheckedCall(query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                            keyLengths: keyLengths, workspace: workspace, threads: threads, scale: scale,
                            modifiers: modifiers) { call in
            let combination = combination
            let pattern = try self.pattern(for: call.shape)
            TiledSoftmaxAttention.attendPattern(call, merging: true) { call in
                switch combination {
                case .union:
                    for t in pattern.axes.indices {
                        call.run(queryTile: pattern.queryTile(axis: t), merge: t > 0) { _, keyEnd in
                            pattern.lineMask(axis: t, keyEnd: keyEnd, hidesSelf: t > 0)
                        }
                    }
                case .sum:
                    AxialSum.run(call, pattern: pattern)
                }
            }
        }
    }
}

/// `.sum`: each axis an unmerged pass of its own, outputs added; the log-sum-exp of the
/// union from the axes' log-sum-exps.
///
/// With `Lₜ` axis `t`'s log-sum-exp (every axis counts the query's own score `s_ii`), the
/// union's is `log(Σₜ e^{Lₜ} − (a − 1)·e^{s_ii})`: computed as `L + log(1 − (a − 1)·e^{s_ii − L})`
/// with `L = log Σₜ e^{Lₜ}` (absolute error of a few ulps of 1), and never below `s_ii`
/// (rounding in the subtraction).
enum AxialSum {
    /// Bytes of the scratch output and log-sum-exp (`B · H · N · Dv` and `B · H · N` floats,
    /// each rounded up to the workspace's alignment).
    static func scratchBytes(_ shape: AttentionShape) throws -> Int {
        let bytes = checkedProduct([shape.batch, shape.heads, shape.queryLength, shape.valueDim + 1,
                                    MemoryLayout<Float>.stride])
        try checkAllocation(bytes: bytes, option: "axial attention's .sum scratch output")
        let rows = shape.batch * shape.heads * shape.queryLength * MemoryLayout<Float>.stride
        return roundUp(rows * shape.valueDim, WorkspaceCarver.alignment) + roundUp(rows, WorkspaceCarver.alignment)
    }

    static func run(_ call: PatternCall, pattern: AxialPattern) {
        let shape = call.shape
        call.run(queryTile: pattern.queryTile(axis: 0)) { _, keyEnd in
            pattern.lineMask(axis: 0, keyEnd: keyEnd, hidesSelf: false)
        }
        guard pattern.axes.count > 1 else { return }
        // The later axes' outputs and log-sum-exps in scratch (part of the cost's workspace).
        withScratchTensor(SIMD4(shape.batch, shape.heads, shape.queryLength, shape.valueDim)) { o in
        withScratchTensor(SIMD4(shape.batch, shape.heads, shape.queryLength, 1)) { l in
            let axis = call.with(o: o, lse: l)
            for t in pattern.axes.indices.dropFirst() {
                axis.run(queryTile: pattern.queryTile(axis: t)) { _, keyEnd in
                    pattern.lineMask(axis: t, keyEnd: keyEnd, hidesSelf: false)
                }
                add(o, l, into: call)
            }
        } }
        removeRepeatedSelf(call, axes: pattern.axes.count)
    }

    /// `o += o'`, `lse ← log(e^lse + e^lse')` row by row, in parallel over heads.
    static func add(_ o: MutableTensorView, _ lse: MutableTensorView, into call: PatternCall) {
        let shape = call.shape, dv = shape.valueDim
        let heads = shape.batch * shape.heads
        parallelForEach(items: heads, threads: workerCount(threads: call.threads, items: heads)) { item, _ in
            let b = item / shape.heads, h = item % shape.heads
            for i in 0..<shape.queryLength {
                let added = lse.row(b, h, i)[0], held = call.lse.row(b, h, i)
                guard var merge = LogSumExpMerge(maximum: max(added, held[0])) else { continue }
                merge.add(merge.weight(held[0]))
                merge.add(merge.weight(added))
                held[0] = merge.logSumExp
                let out = call.o.row(b, h, i), row = o.row(b, h, i)
                let so = call.o.strides[3], sr = o.strides[3]
                for c in 0..<dv { out[c &* so] += row[c &* sr] }
            }
        }
    }

    /// Takes the query's own score out of the summed log-sum-exps `axes − 1` times.
    static func removeRepeatedSelf(_ call: PatternCall, axes: Int) {
        let shape = call.shape, d = shape.headDim
        let heads = shape.batch * shape.heads
        let repeats = Float(axes - 1)
        parallelForEach(items: heads, threads: workerCount(threads: call.threads, items: heads)) { item, _ in
            let b = item / shape.heads, h = item % shape.heads, hk = h / shape.groupSize
            let keyEnd = call.keyEnd(b)
            for i in 0..<min(keyEnd, shape.queryLength) {
                let lse = call.lse.row(b, h, i)
                let own = call.scale * call.q.dot(row: (b, h, i), call.k, row: (b, hk, i), count: d)
                guard lse[0].isFinite, own.isFinite else { continue }
                let union = lse[0] + logf(max(0, 1 - repeats * expf(own - lse[0])))
                lse[0] = max(union, own)
            }
        }
    }
}

extension AxialAttention: KernelWideningBackward {
    /// The flash-style backward of the tiled kernel (KernelDocs/Axial.md, "Backward"), one
    /// pass per axis in axis order, keys in residue classes modulo the axis stride (runs
    /// along the lines, read in place) and queries by line (the forward's partition).
    /// `.union`: each pass with the forward's output and log-sum-exp (the final softmax's),
    /// the query itself in the first axis's pass only, so the passes' pairs are disjoint and
    /// add up to the whole backward. `.sum`: each axis is a softmax of its own, and the
    /// forward's log-sum-exp (the union's) cannot give its probabilities: each pass first
    /// recomputes the axis's output `O_t` and log-sum-exp with the forward kernel (scratch),
    /// then runs the backward with them and the whole `dO` (`∂o_i / ∂o_{i,t} = I`), adding
    /// to `dQ`, `dK`, `dV`. Sums in a fixed order: bitwise identical for every thread count.
    ///
    /// ```
    /// // naive reference, .union: DenseAttention's backward with the union's visible keys J;
    /// // .sum: the sum over axes t of the backward of axis t's own softmax:
    /// P_t[j] = exp(scale · dot(q[b,h,i], k[b,hk,j]) − lse_t[b,h,i])       j on axis t's line
    /// dS[j] = P_t[j] · (dot(dO[b,h,i], v[j]) − dot(dO[b,h,i], O_t[b,h,i]))
    /// dQ[b,h,i] += scale · Σ_j dS[j] k[j],  dK[b,hk,j] += scale · dS[j] q[i],  dV[b,hk,j] += P_t[j] dO[i]
    /// ```
    ///
    /// - Complexity: `.union`: `2.5 ×` the forward's FLOPs; `.sum`: that plus the forward
    ///   once more (the per-axis recomputation). Workspace: about 341 KiB per thread at
    ///   `D = Dv = 64` plus one `Int` per key block per key/value head; `.sum` also one
    ///   axis's output and log-sum-exp (`4 · B · H · N · (Dv + 1)` bytes).
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
        switch combination {
        case .union:
            for t in pattern.axes.indices {
                call.run(keyBlocks: pattern.backwardKeyBlocks(axis: t), accumulate: t > 0) { _, keyEnd in
                    pattern.lineMask(axis: t, keyEnd: keyEnd, hidesSelf: t > 0)
                }
            }
        case .sum:
            AxialSum.backward(call, pattern: pattern)
        }
    }

    /// Every axis after the first adds to `dK`, `dV`.
    func addsKeyGradients(_ shape: AttentionShape) throws -> Bool { try pattern(for: shape).axes.count > 1 }

    public func backwardCost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        let forward = try cost(shape, threads: threads)
        let pattern = try pattern(for: shape)
        var cost = tiledBackwardCost(forward: forward, shape: shape, threads: threads,
                                     passes: pattern.axes.indices.lazy.map { pattern.backwardKeyBlocks(axis: $0) },
                                     modifiers: modifiers)
        if combination == .sum {
            // The recomputed forward, one axis's output in scratch, and the larger kernel workspace.
            let scratch = try AxialSum.scratchBytes(shape)
            cost.flops += forward.flops
            cost.workspaceBytes = scratch + max(cost.workspaceBytes, forward.workspaceBytes - scratch)
        }
        return cost
    }
}

extension AxialSum {
    /// `.sum`'s backward (see ``AxialAttention``'s `gradients`): per axis in order, the
    /// axis's output and log-sum-exp recomputed by the forward kernel into scratch, then the
    /// tiled backward with them, the first axis writing `dK`, `dV` and the others adding.
    static func backward(_ call: TiledBackwardCall, pattern: AxialPattern) {
        let shape = call.shape
        withScratchTensor(SIMD4(shape.batch, shape.heads, shape.queryLength, shape.valueDim)) { o in
        withScratchTensor(SIMD4(shape.batch, shape.heads, shape.queryLength, 1)) { lse in
            let axis = PatternCall(shape: shape, scale: call.scale, threads: call.threads, keyLengths: call.keyLengths,
                                   q: call.q, k: call.k, v: call.v, o: o, lse: lse)
            for t in pattern.axes.indices {
                for b in 0..<shape.batch { for h in 0..<shape.heads { for i in 0..<shape.queryLength {
                    lse.row(b, h, i).pointee = -.infinity
                } } }
                axis.run(queryTile: pattern.queryTile(axis: t)) { _, keyEnd in
                    pattern.lineMask(axis: t, keyEnd: keyEnd, hidesSelf: false)
                }
                TiledSoftmaxBackward.run(shape: shape, scale: call.scale, threads: call.threads,
                                         keyBlocks: pattern.backwardKeyBlocks(axis: t), accumulate: t > 0,
                                         q: call.q, k: call.k, v: call.v, o: o.readOnly, lse: lse.readOnly,
                                         dO: call.dO, dQ: call.dQ, dK: call.dK, dV: call.dV) { b, _ in
                    pattern.lineMask(axis: t, keyEnd: call.keyEnd(b), hidesSelf: false)
                }
            }
        } }
    }
}
