/// ETC's global-local attention (Ainslie et al. 2020): a few global tokens that see and
/// are seen by everything, and a long input that sees the global tokens and a band of
/// radius `r` around itself, with Shaw et al.'s clipped relative positions on long → long
/// pairs.
///
/// Through ``Attention`` the inputs are the concatenation `[global ; long]` along the
/// positions (`Nq = Nk = N_g + N_l`, the first ``globals`` rows global), and so is the
/// output; ``attend(global:long:keyLengths:threads:)`` takes and returns the two parts
/// separately.
///
/// ```
/// // naive reference (what this computes), for each b, h, query position p (hk = h / (H / Hkv)),
/// // G = globals, κ = maxDistance, a = relativePositions[h] (2κ + 1 rows):
/// visible(j) = p < G  ? (j < G || sameSegment(p, j))                  // global query
///                     : (j < G ? sameSegment(p, j)                    // long → global
///                              : p − r ≤ j ≤ (causal ? p : p + r))    // long → long
///              && j < (keyLengths?[b] ?? N)          // sameSegment is true without segments
/// s[j] = scale · dot(q[b,h,p], k[b,hk,j])  +  (p ≥ G && j ≥ G ? scale · dot(q[b,h,p], a[clip(j − p, −κ, κ) + κ]) : 0)
/// o[b, h, p] = Σ_j softmax(s)[j] · v[b, hk, j],   lse[b, h, p] = log Σ_j exp(s[j])
/// ```
/// Rows with no visible key are 0 with `lse = -infinity`. Global tokens are never causal;
/// causal applies to long → long pairs. The pattern is ``ETCPattern``.
///
/// Two passes of the tiled softmax kernel over disjoint query sets (KernelDocs/ETC.md):
/// the global queries against every key (dense rows), then the long queries against the
/// global keys and their band, the relative term added to the band's score tiles by the
/// same in-tile product Transformer-XL uses (``RelativeScoreTerms``, reading the table
/// backwards and clamping distances past `κ`). No `N × N` mask or score array exists.
///
/// - Complexity: `2 · pairs · (D + Dv) + 2 · bandPairs · D` FLOPs (the second term with a
///   relative table) with about `N_g · N + N_l · (N_g + 2r + 1)` pairs per head (causal:
///   `r + 1`); workspace of a few hundred KiB per thread plus `4 · (2κ + 1)` bytes,
///   independent of `N`.
public struct ETCAttention: KernelWidening, ModifiableAttention, Equatable {
    /// `N_g`: the first `globals` positions of the sequence are the global tokens.
    public var globals: Int
    /// `r`: a long token sees the long tokens at most `r` positions away.
    public var radius: Int
    /// Shaw et al.'s relative-position vectors for long → long pairs, `[1, H or 1, 2κ + 1, D]`
    /// (row `t` is `a_{t − κ}`, for `j − i = t − κ` clipped to `[−κ, κ]`), or `nil` for none.
    public var relativePositions: Tensor?
    /// Segment ids restricting global ↔ long pairs, or `nil` for none.
    public var segments: ETCSegments?
    /// Causal on long → long pairs (`p − r ≤ j ≤ p`).
    public var causal: Bool
    /// Score scale; `nil` means `1 / sqrt(D)`. Must be finite.
    public var scale: Float?
    /// Soft-capping, ALiBi, an additive bias and sinks (``ScoreModifiers``) over the one
    /// sequence `[global ; long]` (`Nq = Nk = N_g + N_l`; ALiBi's distance is `|p − j|` in
    /// it), applied after the long pairs' relative terms; none by default.
    public var modifiers = ScoreModifiers()
    /// The last plan built, for calls with the same settings and length (no arrays per call).
    private let plans = PlanCache<PlanKey, Plan>()

    /// Everything the plan depends on (the relative table's values are read on each call,
    /// only its row count is in the plan).
    private struct PlanKey: Equatable {
        var globals: Int, radius: Int, causal: Bool, segments: ETCSegments?, maxDistance: Int, length: Int
    }

    /// A length's pattern (its masks' runs and query partitions), the long → long pairs,
    /// and the zero key and distance biases of the relative terms.
    private struct Plan {
        let pattern: ETCPattern
        let bandPairs: Int
        let zeros: [Float]
    }

    /// Equal settings (the plan cache is not compared).
    public static func == (a: ETCAttention, b: ETCAttention) -> Bool {
        a.globals == b.globals && a.radius == b.radius && a.relativePositions == b.relativePositions
            && a.segments == b.segments && a.causal == b.causal && a.scale == b.scale
    }

    /// ETC's local radius, 84 (its released base configuration).
    public static let defaultRadius = 84
    /// ETC's relative-position clipping distance `κ`, 12 (its released base configuration).
    public static let defaultMaxDistance = 12

    public init(globals: Int, radius: Int = ETCAttention.defaultRadius, relativePositions: Tensor? = nil,
                segments: ETCSegments? = nil, causal: Bool = false, scale: Float? = nil) {
        self.globals = globals
        self.radius = radius
        self.relativePositions = relativePositions
        self.segments = segments
        self.causal = causal
        self.scale = scale
    }

    /// A configuration with a seeded random relative table of `2 · maxDistance + 1` rows
    /// per head, N(0, 1/D) entries, for experiments and benchmarks.
    public init(heads: Int, headDim: Int, globals: Int, radius: Int = ETCAttention.defaultRadius,
                maxDistance: Int = ETCAttention.defaultMaxDistance, seed: UInt64,
                segments: ETCSegments? = nil, causal: Bool = false, scale: Float? = nil) throws {
        let variant = "ETC attention"
        try checkOption(heads, "heads", in: 1...patternLimit, variant: variant)
        try checkOption(headDim, "headDim", in: 1...DenseAttention.maxHeadDim, variant: variant)
        try checkOption(maxDistance, "maxDistance", in: 0...patternLimit, variant: variant)
        let rows = 2 * maxDistance + 1
        try checkFloatAllocation(heads, rows, headDim, option: "ETC relative table [1, heads, 2·maxDistance + 1, headDim]")
        var rng = SeededGenerator(seed: seed)
        let deviation = 1 / Double(headDim).squareRoot()
        let table = (0..<(heads * rows * headDim)).map { _ in Float(rng.nextGaussian() * deviation) }
        self.init(globals: globals, radius: radius,
                  relativePositions: try Tensor(shape: [1, heads, rows, headDim], data: table),
                  segments: segments, causal: causal, scale: scale)
    }

    public var name: String { "etc" }

    /// `κ` of the relative table (0 without one).
    public var maxDistance: Int { ((relativePositions?.shape[2] ?? 1) - 1) / 2 }

    public func validate(_ shape: AttentionShape) throws {
        let variant = "ETC attention"
        try checkPatternShape(shape, scale: scale, variant: variant)
        guard shape.queryLength == shape.keyLength else {
            throw AttentionError.shapeMismatch(
                "\(variant) attends [global ; long] to itself: keyLength \(shape.keyLength) must equal queryLength "
                + "\(shape.queryLength) (globals + the long length)")
        }
        try checkOption(globals, "globals", in: 0...shape.queryLength, variant: variant)
        try checkOption(radius, "radius", in: 0...patternLimit, variant: variant)
        if let table = relativePositions {
            let s = table.shape
            guard s[0] == 1, s[1] == shape.heads || s[1] == 1, s[2] % 2 == 1, s[3] == shape.headDim else {
                throw AttentionError.shapeMismatch(
                    "\(variant): relativePositions must be [1, H or 1, 2κ + 1, D] = [1, \(shape.heads), odd, "
                    + "\(shape.headDim)], got \(s)")
            }
            try checkOption(s[2], "relativePositions rows (2κ + 1)", in: 1...patternLimit, variant: variant)
            // Read in place (`elements` of a strided table would build an array on every call).
            let bad: (index: Int, value: Float)? = table.withView { a in
                for h in 0..<s[1] { for t in 0..<s[2] {
                    let row = a.row(0, h, t)
                    for c in 0..<s[3] where !row[c * a.strides[3]].isFinite {
                        return (((h * s[2]) + t) * s[3] + c, row[c * a.strides[3]])
                    }
                } }
                return nil
            }
            if let bad {
                throw AttentionError.invalidParameter(
                    "\(variant): relativePositions element \(bad.index) must be finite, got \(bad.value)")
            }
        }
        try segments?.validate(globals: globals, longs: shape.queryLength - globals, variant: variant)
    }

    /// The pattern for `shape`.
    public func pattern(for shape: AttentionShape) throws -> ETCPattern {
        try plan(for: shape).pattern
    }

    /// The validated plan of `shape`, built once per settings and length.
    private func plan(for shape: AttentionShape) throws -> Plan {
        try validate(shape)
        let key = PlanKey(globals: globals, radius: radius, causal: causal, segments: segments,
                          maxDistance: maxDistance, length: shape.queryLength)
        return try plans.plan(for: key) {
            let pattern = try ETCPattern(globals: globals, radius: radius, causal: causal, segments: segments,
                                         length: shape.queryLength)
            var bandPairs = 0
            for p in globals..<shape.queryLength { bandPairs += pattern.band(p).count }
            return Plan(pattern: pattern, bandPairs: bandPairs,
                        zeros: [Float](repeating: 0, count: 2 * maxDistance + 1))
        }
    }

    public func cost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        let threads = try threadCount(threads)
        let plan = try plan(for: shape), pattern = plan.pattern
        let base = patternCost(pattern, shape: shape, threads: threads)
        let bandPairs = relativePositions == nil ? 0 : plan.bandPairs
        let termFlops = 2 * Double(bandPairs * shape.heads * shape.batch) * Double(shape.headDim)
        let longWorkspace = TiledSoftmaxAttention.workspaceBytes(
            shape: shape, threads: threads, queryTile: pattern.longQueryTile,
            mask: RelativeTermsMask<ETCLongQueryMask>.self)
        return AttentionCost(flops: base.flops + termFlops,
                             workspaceBytes: max(base.workspaceBytes, longWorkspace)
                                + 4 * (2 * maxDistance + 1),
                             scoredPairs: base.scoredPairs)
    }

    /// The long queries' pass merges into the global keys' results (reading the output
    /// back): a 16-bit output is staged in `Float`; 16-bit query, key and value rows are
    /// widened by the tiled kernel as it packs them (the relative terms read the packed,
    /// widened query tile).
    func stagedOperands(_ shape: AttentionShape) -> (query: Bool, output: Bool) { (false, true) }

    /// Merged passes stage their 16-bit output part by part (``MergedOutputStaging``).
    func stagedOutputElements(_ shape: AttentionShape) -> Int { MergedOutputStaging.elements(shape) }

    public func attend(query: ActivationView, key: ActivationView, value: ActivationView,
                       output: MutableActivationView, logSumExp: MutableStridedView?,
                       keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws {
        try withCheckedCall(query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                            keyLengths: keyLengths, workspace: workspace, threads: threads, scale: scale,
                            modifiers: modifiers) { call in
            let plan = try self.plan(for: call.shape), pattern = plan.pattern
            TiledSoftmaxAttention.attendPattern(call, merging: true) { call in
                call.run(queryTile: globalQueryTile(call.shape, threads: call.threads)) { _, keyEnd in
                    pattern.globalQueryMask(keyEnd: keyEnd)
                }
                guard let table = relativePositions else {
                    call.run(queryTile: pattern.longQueryTile) { _, keyEnd in pattern.longQueryMask(keyEnd: keyEnd) }
                    return
                }
                let shape = call.shape
                withRelativeTerms(table, plan: plan, heads: shape.heads, firstHead: call.firstHead) { terms in
                    // Built per query tile: its arrays are the plan's (shared, not copied), so
                    // nothing is allocated, and no table of B·H masks is needed.
                    TiledSoftmaxAttention.run(shape: shape, scale: call.scale, threads: call.threads,
                                              queryTile: pattern.longQueryTile, byHead: true, q: call.q, k: call.k,
                                              v: call.v, o: call.o, lse: call.lse, modifiers: call.modifiers) { b, h in
                        RelativeTermsMask(base: pattern.longQueryMask(keyEnd: call.keyEnd(b)), terms: terms(b, h),
                                          firstKey: globals)
                    }
                }
            }
        }
    }

    /// Hands `body` the relative score terms of each (batch item, head): row
    /// `Δ' = p + κ − j` of the table read backwards is `a[clip(j − p) + κ]`, clamped.
    /// `terms(b, h)`: the relative terms of batch item `b` and query head `h` of a call of
    /// `heads` heads whose head 0 is the whole call's `firstHead` (the table's head).
    private func withRelativeTerms<R>(_ table: Tensor, plan: Plan, heads: Int, firstHead: Int = 0,
                                      _ body: (_ terms: (_ b: Int, _ h: Int) -> RelativeScoreTerms) -> R) -> R {
        let kappa = maxDistance, rows = 2 * kappa + 1, perHead = table.shape[1] != 1
        return plan.zeros.withUnsafeBufferPointer { zeros in table.withView { a in
            body { b, h in
                RelativeScoreTerms(table: a.row(0, perHead ? firstHead + h : 0, rows - 1),
                                   tableRowStride: -a.strides[2], tableDepthStride: a.strides[3], tableRows: rows,
                                   offset: kappa, keyBias: zeros.baseAddress!, keyBiasStride: 0,
                                   distanceBias: zeros.baseAddress!, owner: b * heads + h + 1, clamped: true)
            }
        } }
    }

    /// The global queries' tile: the default, or smaller when there are fewer heads than
    /// about twice the threads, so that the global rows (each over every key) spread over
    /// every thread. A row's arithmetic does not depend on its tile: results stay the same
    /// bits for every thread count.
    func globalQueryTile(_ shape: AttentionShape, threads: Int) -> Int {
        let wanted = ceilDiv(2 * threads, shape.batch * shape.heads)
        return min(TiledSoftmaxAttention.Tiling.defaultQueryTile,
                   max(MicroTile.nr, roundUp(ceilDiv(globals, max(1, wanted)), MicroTile.nr)))
    }

    /// ETC with the global and long inputs apart: `globalQuery [B, H, N_g, D]`,
    /// `longQuery [B, H, N_l, D]`, keys and values likewise (`Hkv` heads). `keyLengths`
    /// pads the long keys (`0...N_l` valid long keys per batch item).
    ///
    /// - Complexity: the attention above, plus copying the inputs into one sequence and
    ///   the output out of it.
    public func attend(globalQuery: Tensor, globalKey: Tensor, globalValue: Tensor,
                       longQuery: Tensor, longKey: Tensor, longValue: Tensor,
                       keyLengths: [Int]? = nil, threads: Int? = nil)
        throws -> (global: AttentionResult, long: AttentionResult) {
        try checkParts(globalQuery: globalQuery, globalKey: globalKey, globalValue: globalValue,
                       longQuery: longQuery, longKey: longKey, longValue: longValue,
                       keyLengths: keyLengths, threads: threads)
        let l = try AttentionShape(query: longQuery, key: longKey, value: longValue)
        let result = try attend(query: try globalQuery.appendingPositions(of: longQuery),
                                key: try globalKey.appendingPositions(of: longKey),
                                value: try globalValue.appendingPositions(of: longValue),
                                keyLengths: keyLengths?.map { $0 + globals }, threads: threads)
        let n = globals + l.queryLength
        return (try AttentionResult(output: result.output.positions(0..<globals),
                                    logSumExp: result.logSumExp.positions(0..<globals)),
                try AttentionResult(output: result.output.positions(globals..<n),
                                    logSumExp: result.logSumExp.positions(globals..<n)))
    }
}

extension ETCAttention: KernelWideningBackward {
    /// The flash-style backward of the tiled kernel (KernelDocs/ETC.md, "Backward") in the
    /// forward's two passes, each with the forward's output and log-sum-exp: the global
    /// queries against every key they see, then the long queries against the global keys
    /// and their band (adding to `dK`, `dV`). The passes' queries are disjoint, so their
    /// sums are the whole backward; `dQ` is summed in key-block order. Bitwise identical for
    /// every thread count. Through this entry point the inputs and gradients are the
    /// concatenation `[global ; long]`;
    /// ``gradients(globalQuery:globalKey:globalValue:longQuery:longKey:longValue:global:long:globalOutputGradient:longOutputGradient:keyLengths:threads:)``
    /// takes and returns the two parts apart.
    ///
    /// ```
    /// // naive reference: DenseAttention's backward with ETC's visible keys J(p) (ETCPattern)
    /// P[j] = exp(scale · dot(q[b,h,p], k[b,hk,j]) − lse[b,h,p]),  dS[j] = P[j] · (dO·v[j] − dO·o)
    /// dQ[b,h,p] = scale · Σ_j dS[j] k[j],  dK[b,hk,j] += scale · dS[j] q[p],  dV[b,hk,j] += P[j] dO[p]
    /// ```
    ///
    /// With a relative table (``relativePositions``) the long pass recomputes the band's
    /// terms as the forward adds them, and the relative mask adds each tile's
    /// `Σ_j dS_ij a_{clip(j − i)}` to its `dQ` part (the pairs past `±κ` summed onto the
    /// table's end rows); the table's own gradient comes from
    /// ``parameterGradients(query:key:value:result:outputGradient:keyLengths:threads:)``:
    ///
    /// ```
    /// // long → long pairs (p, j ≥ G), t = clip(j − p, −κ, κ) + κ, dS including scale:
    /// dQ[b,h,p] += dS[j] · a[h,t],   ∂a[h,t] += dS[j] · q[b,h,p]   (dK, dV as above)
    /// ```
    ///
    /// - Complexity: `2.5 ×` the forward's FLOPs on the visible pairs; workspace of about
    ///   341 KiB per thread at `D = Dv = 64` plus one `Int` per key block per key/value head,
    ///   independent of `N` (with a table: plus each worker's band scratch).
    public func gradients(query: StridedView, key: StridedView, value: StridedView, output: StridedView,
                          logSumExp: StridedView, outputGradient: StridedView,
                          dQuery: MutableStridedView, dKey: MutableStridedView, dValue: MutableStridedView,
                          keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws {
        try tiledGradients(query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                           outputGradient: outputGradient, dQuery: dQuery, dKey: dKey, dValue: dValue,
                           keyLengths: keyLengths, workspace: workspace, threads: threads)
    }

    /// The passes of the backward (the `Float` and mixed-precision entry points run them).
    func tiledBackward(_ call: TiledBackwardCall) throws { try backward(call, tableGradient: nil) }

    /// The long queries' pass adds to the `dK`, `dV` rows the global queries' pass wrote.
    func addsKeyGradients(_ shape: AttentionShape) throws -> Bool { true }

    /// The two passes of the backward; with `tableGradient` (`B · H · (2κ + 1) · D` zeroed
    /// floats, row `Δ' = p + κ − j` of each (batch item, head) at `Δ' · D`) the long pass
    /// adds `Σ dS q` per distance there, in key-block order.
    private func backward(_ call: TiledBackwardCall, tableGradient: UnsafeMutablePointer<Float>?) throws {
        let plan = try self.plan(for: call.shape), pattern = plan.pattern
        call.run { _, keyEnd in ETCGlobalQueryBackwardMask(forward: pattern.globalQueryMask(keyEnd: keyEnd)) }
        guard let table = relativePositions else {
            call.run(accumulate: true) { _, keyEnd in
                ETCLongQueryBackwardMask(forward: pattern.longQueryMask(keyEnd: keyEnd))
            }
            return
        }
        let shape = call.shape, rows = table.shape[2] * shape.headDim
        withRelativeTerms(table, plan: plan, heads: shape.heads) { terms in
            TiledSoftmaxBackward.run(shape: shape, scale: call.scale, threads: call.threads, accumulate: true,
                                     q: call.q, k: call.k, v: call.v, o: call.o, lse: call.lse, dO: call.dO,
                                     dQ: call.dQ, dK: call.dK, dV: call.dV, modifiers: call.modifiers,
                                     biasGradient: call.biasGradient) { b, h in
                RelativeTermsMask(
                    base: ETCLongQueryBackwardMask(forward: pattern.longQueryMask(keyEnd: call.keyEnd(b))),
                    terms: terms(b, h), firstKey: globals,
                    gradients: tableGradient.map {
                        RelativeScoreGradients(keySums: nil, distanceRows: $0 + (b * shape.heads + h) * rows)
                    })
            }
        }
    }

    /// `∂L/∂a` (the relative table's gradient) through the call that gave `result`, with
    /// `dQ`, `dK`, `dV`, which the same pass computes. Without a table the parameters'
    /// gradient is empty.
    ///
    /// ```
    /// // naive reference, long → long pairs only (p, j ≥ G visible), t = clip(j − p, −κ, κ) + κ:
    /// ∂a[h or 0, t] += scale · P[j] · (dot(dO[b,h,p], v[b,hk,j]) − dot(dO[b,h,p], o[b,h,p])) · q[b,h,p]
    /// ```
    ///
    /// - Complexity: the backward's plus `2 · bandPairs · D` FLOPs for the distance sums and
    ///   `B · H · (2κ + 1) · D` floats of scratch, summed in a fixed order (head, batch item:
    ///   bitwise identical for every thread count). KernelDocs/ETC.md, "Backward".
    public func parameterGradients(query: Tensor, key: Tensor, value: Tensor, result: AttentionResult,
                                   outputGradient: Tensor, keyLengths: [Int]? = nil, threads: Int? = nil)
        throws -> (inputs: AttentionGradients, parameters: ETCParameterGradients) {
        let s = try AttentionShape(query: query, key: key, value: value)
        let tableRows = relativePositions?.shape[2] ?? 0, tableHeads = relativePositions?.shape[1] ?? 0
        try checkFloatAllocation(s.batch, s.heads, max(tableRows, 1), s.headDim,
                                 option: "ETC distance sums [B, H, 2κ + 1, D]")
        var parameters = ETCParameterGradients(
            relativePositions: [Float](repeating: 0, count: tableHeads * tableRows * s.headDim))
        let inputs = try withParameterGradientCall(query: query, key: key, value: value, result: result,
                                                   outputGradient: outputGradient, keyLengths: keyLengths,
                                                   threads: threads, scale: scale) { x in
            try withModifiers(TiledBackwardCall(x, keyLengths: keyLengths)) { call in
                guard tableRows > 0 else { return try backward(call, tableGradient: nil) }
                let (heads, d) = (x.shape.heads, x.shape.headDim)
                try withScratchTensor(SIMD4(x.shape.batch, heads, tableRows, d), zeroed: true) { sums in
                    try backward(call, tableGradient: sums.base)
                    // Head, batch item, row: row Δ' of the backwards table is table row 2κ − Δ'.
                    for h in 0..<heads {
                        let th = tableHeads == 1 ? 0 : h
                        for b in 0..<x.shape.batch {
                            let head = sums.base + (b * heads + h) * tableRows * d
                            for delta in 0..<tableRows {
                                let out = (th * tableRows + tableRows - 1 - delta) * d
                                for c in 0..<d { parameters.relativePositions[out + c] += head[delta * d + c] }
                            }
                        }
                    }
                }
            }
        }
        return (inputs, parameters)
    }

    public func backwardCost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        let forward = try cost(shape, threads: threads)
        let plain = tiledBackwardCost(forward: forward, shape: shape, threads: threads, modifiers: modifiers)
        guard relativePositions != nil else { return plain }
        let relative = TiledSoftmaxBackward.workspaceBytes(
            shape: shape, threads: try threadCount(threads),
            mask: RelativeTermsMask<ETCLongQueryBackwardMask>.self, softCap: modifiers.softCap != nil)
        return AttentionCost(flops: plain.flops, workspaceBytes: max(plain.workspaceBytes, relative),
                             scoredPairs: plain.scoredPairs)
    }

    /// The gradients with the global and long inputs apart, through the call of
    /// ``attend(globalQuery:globalKey:globalValue:longQuery:longKey:longValue:keyLengths:threads:)``
    /// that gave `global` and `long`, for the output gradients of the two parts
    /// (`[B, H, N_g, Dv]` and `[B, H, N_l, Dv]`). `keyLengths` pads the long keys, as there.
    ///
    /// - Complexity: the backward above, plus copying the inputs into one sequence and the
    ///   gradients out of it.
    public func gradients(globalQuery: Tensor, globalKey: Tensor, globalValue: Tensor,
                          longQuery: Tensor, longKey: Tensor, longValue: Tensor,
                          global: AttentionResult, long: AttentionResult,
                          globalOutputGradient: Tensor, longOutputGradient: Tensor,
                          keyLengths: [Int]? = nil, threads: Int? = nil)
        throws -> (global: AttentionGradients, long: AttentionGradients) {
        try checkParts(globalQuery: globalQuery, globalKey: globalKey, globalValue: globalValue,
                       longQuery: longQuery, longKey: longKey, longValue: longValue,
                       keyLengths: keyLengths, threads: threads)
        let n = globals + longQuery.shape[2]
        let g = try gradients(query: try globalQuery.appendingPositions(of: longQuery),
                              key: try globalKey.appendingPositions(of: longKey),
                              value: try globalValue.appendingPositions(of: longValue),
                              output: try global.output.appendingPositions(of: long.output),
                              logSumExp: try global.logSumExp.appendingPositions(of: long.logSumExp),
                              outputGradient: try globalOutputGradient.appendingPositions(of: longOutputGradient),
                              keyLengths: keyLengths?.map { $0 + globals }, threads: threads)
        func part(_ range: Range<Int>) -> AttentionGradients {
            AttentionGradients(dQuery: g.dQuery.positions(range), dKey: g.dKey.positions(range),
                               dValue: g.dValue.positions(range))
        }
        return (part(0..<globals), part(globals..<n))
    }

    /// The checks of the two-input API: the parts agree, `N_g` is ``globals``, the key
    /// lengths fit the long part.
    private func checkParts(globalQuery: Tensor, globalKey: Tensor, globalValue: Tensor,
                            longQuery: Tensor, longKey: Tensor, longValue: Tensor,
                            keyLengths: [Int]?, threads: Int?) throws {
        let g = try AttentionShape(query: globalQuery, key: globalKey, value: globalValue)
        let l = try AttentionShape(query: longQuery, key: longKey, value: longValue)
        guard g.batch == l.batch, g.heads == l.heads, g.kvHeads == l.kvHeads, g.headDim == l.headDim,
              g.valueDim == l.valueDim, g.queryLength == g.keyLength, l.queryLength == l.keyLength else {
            throw AttentionError.shapeMismatch(
                "ETC attention: global [B, H, N_g, D] = [\(g.batch), \(g.heads), \(g.queryLength), \(g.headDim)] "
                + "(keys \(g.keyLength)) and long [\(l.batch), \(l.heads), \(l.queryLength), \(l.headDim)] "
                + "(keys \(l.keyLength)) must agree in B, H, Hkv, D, Dv, with as many keys as queries in each")
        }
        guard g.queryLength == globals else {
            throw AttentionError.shapeMismatch(
                "ETC attention: \(g.queryLength) global tokens given, globals is \(globals)")
        }
        if let keyLengths {
            try checkCallArguments(l, keyLengths: keyLengths, threads: threads)
        }
    }
}

/// The gradients of a loss with respect to ``ETCAttention``'s parameters (see
/// ``ETCAttention/parameterGradients(query:key:value:result:outputGradient:keyLengths:threads:)``).
public struct ETCParameterGradients: Sendable, Equatable {
    /// `∂L/∂a`, shaped like ``ETCAttention/relativePositions`` (`[1, H or 1, 2κ + 1, D]`
    /// row-major; a shared table gets the sum over the heads); empty without a table.
    public var relativePositions: [Float]
}
