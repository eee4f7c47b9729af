/// Routing Transformer attention (Roy et al. 2021): queries and keys are routed to `K`
/// centroids by balanced top-`w` selection (mini-batch k-means), and attend within their
/// cluster.
///
/// ```
/// // naive reference (what this computes), for each b, h (query head):
/// q̂_i = q_i / |q_i|,  k̂_j = k_j / |k_j|                          (zero rows stay zero)
/// wq = ⌈Nq / K⌉,  wk = ⌈Nk / K⌉
/// for c in 0..<K:
///     Q_c = the wq queries with the largest q̂_i · C[h, c]   (ties: smaller position first)
///     K_c = the wk keys    with the largest k̂_j · C[h, c]   (keys of head h / (H / Hkv))
///     for i in Q_c: (o[c][i], lse[c][i]) = softmax attention of q_i over the j in K_c with
///                   j < keyLengths[b] and, when causal, j <= i + Nk − Nq
/// o_i = mean of o[c][i] over the clusters c with i ∈ Q_c and a visible key   (0 if none)
/// lse_i = log mean exp(lse[c][i]) over the same clusters                  (−∞ if none)
/// ```
/// Scores use the raw `q_i · k_j` (times `scale`); only the routing is normalised.
///
/// Centroids `[1, H, K, D]` come from a seeded initialisation (unit rows with Gaussian
/// directions) or are given; they are usable at once, before any update.
/// ``updateCentroids(query:key:)`` moves them by an exponential moving average toward the
/// mean of the normalised queries and keys nearest to each (mini-batch k-means).
///
/// This file plans; kernels compute. ``ClusterRouter`` selects each cluster's members
/// (routing scores a GEMM on the micro-kernel, the top-w by ``TopKSelection``),
/// ``PermutedBlockAttention`` gathers them and each cluster attends with the tiled softmax kernel
/// (a query tile per cluster, the cluster's keys as key tiles, no masking unless causal or
/// padded); ``SphericalKMeans`` updates the centroids. The backward (``DifferentiableAttention``,
/// routes held fixed) runs each cluster's gathered rows through ``TiledSoftmaxBackward``
/// (``ClusterBackward``; KernelDocs/Routing.md, "Backward").
///
/// - Complexity: per head, `K · wq · wk · 2 · (D + Dv)` FLOPs of attention (about
///   `Nq · wk · 2 · (D + Dv)`) plus `2 · (Nq + Nk) · K · D` FLOPs of routing and
///   O((Nq + Nk) · K) selection; workspace O((Nq + Nk) · (D + Dv)) per head in flight (one
///   per thread while they fit in the L3, else one).
public struct RoutingAttention: KernelWidening, ModifiableAttention {
    /// `[1, H, K, D]`, finite.
    public private(set) var centroids: Tensor
    /// Key `j` is visible to query `i` only if `j <= i + Nk − Nq` (original positions).
    public var causal: Bool
    /// Score scale; `nil` means `1 / sqrt(D)`. Must be finite.
    public var scale: Float?
    /// Weight of the old centroid in ``updateCentroids(query:key:)``, in `[0, 1)` (default 0.999).
    public var decay: Float
    /// Soft-capping, ALiBi and an additive bias `[B or 1, H or 1, Nq, Nk]` (``ScoreModifiers``),
    /// applied to each scored pair at its original positions `(i, j)` in every cluster that
    /// scores it; none by default. Sinks are refused (``AttentionError/unsupported(_:)``):
    /// a query's result is the mean of its clusters' softmaxes, with no one denominator
    /// for a sink to join (KernelDocs/Routing.md, "Score modifiers").
    public var modifiers = ScoreModifiers()

    /// Seeded centroids: `clusters` unit vectors per head with Gaussian directions.
    ///
    /// - Complexity: O(heads · clusters · headDim).
    public init(heads: Int, headDim: Int, clusters: Int, causal: Bool = false, scale: Float? = nil,
                decay: Float = 0.999, seed: UInt64 = 0) throws {
        for (name, value) in [("heads", heads), ("headDim", headDim), ("clusters", clusters)] where value < 1 {
            throw AttentionError.invalidParameter("routing \(name) must be at least 1, got \(value)")
        }
        try checkLimit(clusters, "clusters", variant: "routing attention")
        try checkFloatAllocation(heads, clusters, headDim, option: "routing centroids [1, heads, clusters, headDim]")
        var rng = SeededGenerator(seed: seed)
        var values = [Float]()
        values.reserveCapacity(heads * clusters * headDim)
        for _ in 0..<(heads * clusters) {
            let direction = (0..<headDim).map { _ in rng.nextGaussian() }
            let norm = direction.reduce(0) { $0 + $1 * $1 }.squareRoot()
            values += direction.map { Float($0 / max(norm, .leastNormalMagnitude)) }
        }
        try self.init(centroids: Tensor(shape: [1, heads, clusters, headDim], data: values),
                      causal: causal, scale: scale, decay: decay)
    }

    /// Given centroids `[1, H, K, D]` (finite; they need not be unit length).
    ///
    /// - Complexity: O(H · K · D) to check them.
    public init(centroids: Tensor, causal: Bool = false, scale: Float? = nil, decay: Float = 0.999) throws {
        let s = centroids.shape
        guard s[0] == 1, s[1] >= 1, s[2] >= 1, s[3] >= 1 else {
            throw AttentionError.shapeMismatch("routing centroids must be [1, heads, clusters, headDim] with every extent at least 1, got \(s)")
        }
        guard centroids.elements.allSatisfy(\.isFinite) else {
            throw AttentionError.invalidParameter("routing centroids must be finite (found NaN or infinity)")
        }
        self.centroids = centroids
        self.causal = causal
        self.scale = scale
        self.decay = decay
    }

    public var name: String { "routing" }

    /// `K`, the number of clusters.
    public var clusterCount: Int { centroids.shape[2] }

    /// Largest sequence length (positions are stored as 32-bit integers).
    public static let maxLength = 1 << 30

    public func validate(_ shape: AttentionShape) throws {
        try shape.check()
        try shape.checkHeadDims(limit: DenseAttention.maxHeadDim, variant: "routing attention")
        try checkScale(scale)
        guard shape.heads == centroids.shape[1], shape.headDim == centroids.shape[3] else {
            throw AttentionError.shapeMismatch(
                "routing centroids \(centroids.shape) must be [1, heads, clusters, headDim] = [1, \(shape.heads), K, \(shape.headDim)] for this problem")
        }
        guard max(shape.queryLength, shape.keyLength) <= RoutingAttention.maxLength else {
            throw AttentionError.unsupported("routing attention supports sequences up to \(RoutingAttention.maxLength)")
        }
        guard decay >= 0, decay < 1 else {
            throw AttentionError.invalidParameter("routing decay must be in [0, 1), got \(decay)")
        }
        guard modifiers.sinks == nil else {
            throw AttentionError.unsupported(
                "routing attention: modifiers.sinks are not supported (a query's result is the mean of its clusters' softmaxes: no one denominator for a sink); soft-capping, ALiBi and bias are")
        }
        try checkLimit(clusterCount, "clusters", variant: "routing attention")
        // Cluster slots and candidate lists grow with K · N: checked before any size is
        // computed with unchecked arithmetic, then the workspace of the most workers.
        guard checkedProduct([clusterCount + 64, max(shape.queryLength, shape.keyLength) + 64, 64]) != nil else {
            throw AttentionError.sizeOverflow("routing cluster lists (clusters × sequence length) overflow Int")
        }
        try checkAllocation(bytes: workspaceBytes(shape, threads: maxThreadCount), option: "routing workspace")
    }

    private func layout(_ shape: AttentionShape) -> PermutedBlockAttention.Layout {
        let k = clusterCount
        let wq = (shape.queryLength + k - 1) / k, wk = (shape.keyLength + k - 1) / k
        return PermutedBlockAttention.Layout(
            rounds: 1, queryLength: shape.queryLength, querySlots: k * wq, keySlots: k * wk,
            queryBlockSize: wq, keyBlockSize: wk, blocks: k,
            visibility: BlockVisibility(reach: .sameBlock,
                                        causalOffset: causal ? shape.keyLength - shape.queryLength : nil),
            sharedKeys: false,
            combine: .mean, headDim: shape.headDim, valueDim: shape.valueDim)
    }

    public func cost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        let threads = try threadCount(threads)
        try validate(shape)
        let l = layout(shape), k = clusterCount
        let heads = shape.batch * shape.heads
        guard let pairs = checkedProduct([k, l.queryBlockSize, l.keyBlockSize]), checkedProduct([pairs, heads]) != nil else {
            throw AttentionError.sizeOverflow("routing scored pairs (clusters × wq × wk × B·H) overflow Int")
        }
        let flops = Double(heads) * (2 * Double(pairs) * Double(shape.headDim + shape.valueDim)
                                     + 2 * Double(shape.queryLength + shape.keyLength) * Double(k * shape.headDim))
        return AttentionCost(flops: flops, workspaceBytes: workspaceBytes(shape, threads: threads),
                             scoredPairs: heads * pairs)
    }

    /// The workspace of a call on `shape` with `threads` workers (at most ``maxThreadCount``):
    /// one permuted-block workspace and one router per head in flight.
    private func workspaceBytes(_ shape: AttentionShape, threads: Int) -> Int {
        PermutedBlockAttention.workspaceBytes(layout(shape), heads: shape.batch * shape.heads, threads: threads,
                                              keyLength: shape.keyLength) {
            ClusterRouter.byteCount(sizes(shape), workers: $0)
        }
    }

    /// The router's problem for `shape`: each of the `K` clusters takes `⌈Nq / K⌉` queries
    /// and `⌈Nk / K⌉` keys.
    private func sizes(_ shape: AttentionShape) -> ClusterRouter.Sizes {
        let l = layout(shape)
        return ClusterRouter.Sizes(queryLength: shape.queryLength, keyLength: shape.keyLength,
                                   queryTake: l.queryBlockSize, keyTake: l.keyBlockSize,
                                   clusters: clusterCount, depth: shape.headDim)
    }

    /// The memory one head touches (``PermutedBlockAttention/split(heads:threads:bytesPerHead:cacheBytes:)``).
    private func headBytes(_ shape: AttentionShape, _ l: PermutedBlockAttention.Layout) -> Int {
        PermutedBlockAttention.headBytes(l, keyLength: shape.keyLength,
                                   scratchBytes: ClusterRouter.byteCount(sizes(shape), workers: 1))
    }

    /// The members of every cluster, ascending: `query[(b·H + h)·K + c]` lists the original
    /// query positions routed to cluster `c` of head `h`, `key[...]` the key positions.
    ///
    /// - Complexity: O(B · H · (Nq + Nk) · K · D), single-threaded.
    public func routes(query: Tensor, key: Tensor) throws -> (query: [[Int]], key: [[Int]]) {
        let shape = try AttentionShape(query: query, key: key, value: key)
        try validate(shape)
        let l = layout(shape)
        var queries = [[Int]](), keys = [[Int]]()
        WorkspaceArena.withWorkspaces(workers: 1, zeroed: true, layout: {
            ClusterRouter(carving: &$0, sizes(shape), workers: 1)
        }) { routers in
        let router = routers[0]
        query.withView { q in key.withView { k in centroids.withView { c in
            for b in 0..<shape.batch { for h in 0..<shape.heads {
                let (qp, kp) = route(l, router: router, shape: shape, threads: 1, q: q, k: k, c: c, b: b, h: h)
                for cluster in 0..<clusterCount {
                    queries.append((0..<l.queryBlockSize).map { Int(qp[cluster * l.queryBlockSize + $0]) })
                    keys.append((0..<l.keyBlockSize).map { Int(kp[cluster * l.keyBlockSize + $0]) })
                }
            } }
        } } }
        }
        return (queries, keys)
    }

    /// Fills the router's query and key slot positions for head `(b, h)` (``ClusterRouter``),
    /// into `space`'s slot arrays when given, else the router's own.
    private func route(_ l: PermutedBlockAttention.Layout, router: ClusterRouter, shape: AttentionShape, threads: Int,
                       q: TensorView, k: TensorView, c: TensorView, b: Int, h: Int,
                       into space: PermutedBlockAttention.Workspace? = nil)
        -> (UnsafeMutablePointer<Int32>, UnsafeMutablePointer<Int32>) {
        let queryOut = space?.queryPosition ?? router.queryRoutes
        let keyOut = space?.keyPosition ?? router.keyRoutes
        router.route(PermutedBlockAttention.Rows(view: q, b: b, h: h), n: shape.queryLength, take: l.queryBlockSize,
                     centroids: c, head: h, threads: threads, into: queryOut)
        router.route(PermutedBlockAttention.Rows(view: k, b: b, h: h / shape.groupSize), n: shape.keyLength,
                     take: l.keyBlockSize, centroids: c, head: h, threads: threads, into: keyOut)
        return (queryOut, keyOut)
    }

    /// 16-bit queries and keys are widened as the router packs them, and all three as the
    /// gather copies a cluster's rows; a 16-bit output is staged in `Float` (a query in
    /// several clusters merges their results into its row), a part of the heads at a time
    /// (``ViewCall/forEachOutputPart(_:)``).
    func stagedOperands(_ shape: AttentionShape) -> (query: Bool, output: Bool) { (false, true) }

    func stagedOutputElements(_ shape: AttentionShape) -> Int { MergedOutputStaging.elements(shape, groups: false) }

    public func attend(query: ActivationView, key: ActivationView, value: ActivationView,
                       output: MutableActivationView, logSumExp: MutableStridedView?,
                       keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws {
        try attend(query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                   keyLengths: keyLengths, workspace: workspace, threads: threads, routes: nil)
    }

    /// The forward that also hands back its routes, for
    /// ``gradients(query:key:value:result:outputGradient:routes:keyLengths:threads:)``: the
    /// same result as ``Attention/attend(query:key:value:keyLengths:threads:)``, bit for bit.
    ///
    /// - Complexity: the forward's, plus copying `B · H · K · (wq + wk)` positions.
    public func attendReturningRoutes(query: Tensor, key: Tensor, value: Tensor, keyLengths: [Int]? = nil,
                                      threads: Int? = nil) throws -> (result: AttentionResult, routes: RoutingRoutes) {
        let shape = try AttentionShape(query: query, key: key, value: value)
        try validate(shape)
        let l = layout(shape)
        let heads = shape.batch * shape.heads
        try checkAllocation(bytes: checkedProduct([heads, l.querySlots + l.keySlots, 4]), option: "routing routes")
        var queryRoutes = [Int32](repeating: 0, count: heads * l.querySlots)
        var keyRoutes = [Int32](repeating: 0, count: heads * l.keySlots)
        let result = try queryRoutes.withUnsafeMutableBufferPointer { qr in
            try keyRoutes.withUnsafeMutableBufferPointer { kr in
                try allocatingCall(query: query, key: key, value: value) { q, k, v, o, lse in
                    try attend(query: ActivationView(q), key: ActivationView(k), value: ActivationView(v),
                               output: MutableActivationView(o), logSumExp: lse, keyLengths: keyLengths,
                               workspace: nil, threads: threads, routes: (qr.baseAddress!, kr.baseAddress!))
                }
            }
        }
        return (result, RoutingRoutes(batch: shape.batch, heads: shape.heads, clusters: clusterCount,
                                      queryLength: shape.queryLength, keyLength: shape.keyLength,
                                      queryTake: l.queryBlockSize, keyTake: l.keyBlockSize,
                                      query: queryRoutes, key: keyRoutes))
    }

    /// The forward, copying each head's slot positions to `routes` (head `b · H + h` at
    /// `(b · H + h) · K · w`) when given.
    private func attend(query: ActivationView, key: ActivationView, value: ActivationView,
                        output: MutableActivationView, logSumExp: MutableStridedView?,
                        keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?,
                        routes: (query: UnsafeMutablePointer<Int32>, key: UnsafeMutablePointer<Int32>)?) throws {
        try withCheckedCall(query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                            keyLengths: keyLengths, workspace: workspace, threads: threads, scale: scale,
                            modifiers: modifiers) { call in
        let (shape, scale, threads) = (call.shape, call.scale, call.threadCount)
        let l = layout(shape)
        let (q, k, v, lv) = (call.q, call.k, call.v, call.lse)
        centroids.withView { c in
        // A query's clusters merge into its row: a 16-bit output is formed in `Float`, part
        // by part.
        call.forEachOutputPart { items, heads, output in
            // Heads side by side (one workspace and router per head worker), each head's
            // phases on `inner` threads.
            PermutedBlockAttention.forEachHead(
                items: items, heads: heads, threads: threads, layout: l,
                bytesPerHead: headBytes(shape, l),
                makeScratch: { ClusterRouter(carving: &$0, sizes(shape), workers: $1) }
            ) { b, h, inner, space, router in
                // Queries no cluster takes keep the result over no keys.
                let o = output(b, h)
                for i in 0..<shape.queryLength {
                    o.zeroRow(b, h, i, count: shape.valueDim)
                    lv.row(b, h, i).pointee = -.infinity
                }
                let (qp, kp) = route(l, router: router, shape: shape, threads: inner, q: q, k: k, c: c, b: b, h: h,
                                     into: space)
                if let routes {
                    let head = b * shape.heads + h
                    (routes.query + head * l.querySlots).update(from: qp, count: l.querySlots)
                    (routes.key + head * l.keySlots).update(from: kp, count: l.keySlots)
                }
                let hk = h / shape.groupSize
                PermutedBlockAttention.attendRound(
                    l, round: 0, space: space, scale: scale, threads: inner,
                    query: PermutedBlockAttention.Rows(view: q, b: b, h: h), key: PermutedBlockAttention.Rows(view: k, b: b, h: hk),
                    value: PermutedBlockAttention.Rows(view: v, b: b, h: hk), keyLength: keyLengths?[b] ?? shape.keyLength,
                    output: o, lse: lv, b: b, h: h, modifiers: call.modifiers)
            }
        }
        }
        }
    }

    /// One mini-batch k-means step: each normalised query and key (every batch item; keys of
    /// head `h / (H / Hkv)` for head `h`) joins its most similar centroid (first maximum);
    /// every centroid with members moves to `decay · C + (1 − decay) · mean(members)`,
    /// rescaled to unit length. Centroids without members are unchanged.
    ///
    /// - Complexity: O(B · H · (Nq + Nk) · K · D).
    public mutating func updateCentroids(query: Tensor, key: Tensor) throws {
        let shape = try AttentionShape(query: query, key: key, value: key)
        try validate(shape)
        let (k, d) = (clusterCount, shape.headDim)
        var updated = centroids
        for h in 0..<shape.heads {
            var kMeans = SphericalKMeans(centres: (0..<k).map { c in (0..<d).map { centroids[0, h, c, $0] } })
            for (tensor, head, n) in [(query, h, shape.queryLength), (key, h / shape.groupSize, shape.keyLength)] {
                for b in 0..<shape.batch { for i in 0..<n {
                    kMeans.assign((0..<d).map { tensor[b, head, i, $0] })
                } }
            }
            for (c, moved) in kMeans.updated(decay: decay).enumerated() {
                guard let moved else { continue }
                for t in 0..<d { updated[0, h, c, t] = moved[t] }
            }
        }
        centroids = updated
    }
}

// MARK: - Backward

extension RoutingAttention: OperandWideningBackward {
    /// Each cluster's attention backward reads its members' rows, gathered (and widened)
    /// into `Float` by ``PermutedBlockAttention``, never the caller's operands.
    static var widensInTiledBackward: Bool { false }

    /// Heads run one after another: 16-bit gradients are summed a head at a time
    /// (``forEachHeadSummingGradients(_:dQ:dK:dV:_:)``), none staged whole.
    static func stagedGradients(_ shape: AttentionShape) -> (query: Bool, keys: Bool) { (false, false) }

    static func gradientSumBytes(_ shape: AttentionShape, threads: Int?, dQuery: ActivationPrecision,
                                 dKey: ActivationPrecision, dValue: ActivationPrecision) -> Int {
        headGradientBytes(shape, dQuery: dQuery, dKey: dKey, dValue: dValue).total
    }

    /// 16-bit operands are widened by the router's packing and each cluster's gather.
    func widenedOperandsBackward(_ shape: AttentionShape, threads: Int, q: TensorView, k: TensorView,
                                 v: TensorView, o: TensorView, lse: TensorView, dO: TensorView,
                                 dQ: MutableTensorView, dK: MutableTensorView, dV: MutableTensorView,
                                 keyLengths: [Int]?) throws {
        try backward(shape, scale: scale ?? 1 / Float(shape.headDim).squareRoot(), threads: threads, q: q, k: k,
                     v: v, dO: dO, dQ: dQ, dK: dK, dV: dV, keyLengths: keyLengths, routes: nil)
    }

    /// The gradients through the forward with its routes held fixed (KernelDocs/Routing.md,
    /// "Backward"): the clusters' members are recomputed from the centroids, each cluster's
    /// gathered rows run the flash backward (``ClusterBackward``, ``TiledSoftmaxBackward``),
    /// and the gathered gradients are added to the original rows in cluster order. The
    /// centroids are state (``updateCentroids(query:key:)``), not differentiated.
    ///
    /// ```
    /// // naive reference, for each b, query head h (hk = h / (H / Hkv)), routes Q_c, K_c of the forward:
    /// for c, i in Q_c with visible keys J_c(i) (j ∈ K_c, j < keyLengths[b], causal: j <= i + Nk − Nq):
    ///     u_i   = #{c : i ∈ Q_c, J_c(i) non-empty}              (the forward's mean is over these)
    ///     P[j]  = softmax_j(scale · q_i · k_j) over J_c(i),  o_c = Σ_j P[j] v_j   (recomputed per cluster)
    ///     g     = dO_i / u_i,  dP[j] = g · v_j,  D = g · o_c,  dS[j] = P[j] · (dP[j] − D)
    ///     dQ[i] += scale · Σ_j dS[j] k_j
    ///     dK[j] += scale · dS[j] q_i,  dV[j] += P[j] g           (clusters in order, then heads of the group)
    /// ```
    ///
    /// `output` and `logSumExp` are checked but not read: the forward's mean and merged
    /// log-sum-exp do not give back the per-cluster outputs and log-sum-exps the backward
    /// needs, so they are recomputed (one forward of the clusters).
    ///
    /// - Complexity: per head, `K · wq · wk · (8·D + 6·Dv)` FLOPs (the flash backward's
    ///   `6·D + 4·Dv` plus the recomputed forward's `2·(D + Dv)` per pair) plus the routing's
    ///   `2 · (Nq + Nk) · K · D`; heads one after another, every phase on all threads;
    ///   workspace O((Nq + Nk) · (D + Dv)) for the head in flight, plus the router's and the
    ///   tiled kernels' scratch.
    public func gradients(query: StridedView, key: StridedView, value: StridedView, output: StridedView,
                          logSumExp: StridedView, outputGradient: StridedView,
                          dQuery: MutableStridedView, dKey: MutableStridedView, dValue: MutableStridedView,
                          keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws {
        let threads = try threadCount(threads)
        try withCheckedGradientCall(query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                                    outputGradient: outputGradient, dQuery: dQuery, dKey: dKey, dValue: dValue,
                                    keyLengths: keyLengths, workspace: workspace, threads: threads,
                                    scale: scale) { shape, scale in
            try backward(shape, scale: scale, threads: threads, q: query.kernel, k: key.kernel, v: value.kernel,
                         dO: outputGradient.kernel, dQ: dQuery.kernel, dK: dKey.kernel, dV: dValue.kernel,
                         keyLengths: keyLengths, routes: nil)
        }
    }

    /// The gradients with the routes the forward handed back
    /// (``attendReturningRoutes(query:key:value:keyLengths:threads:)``) instead of
    /// recomputing them: the same gradients bit for bit when they are that call's routes
    /// (otherwise the gradients of the forward with the given routes).
    ///
    /// - Throws: what ``gradients(query:key:value:output:logSumExp:outputGradient:keyLengths:threads:)``
    ///   throws, and ``AttentionError/shapeMismatch(_:)`` naming `routes` when they belong to
    ///   another problem (batch, heads, clusters or lengths).
    /// - Complexity: the backward's, without the routing's `2 · (Nq + Nk) · K · D` FLOPs per head.
    public func gradients(query: Tensor, key: Tensor, value: Tensor, result: AttentionResult, outputGradient: Tensor,
                          routes: RoutingRoutes, keyLengths: [Int]? = nil,
                          threads: Int? = nil) throws -> AttentionGradients {
        try check(routes, try AttentionShape(query: query, key: key, value: value))
        return try withParameterGradientCall(query: query, key: key, value: value, result: result,
                                             outputGradient: outputGradient, keyLengths: keyLengths, threads: threads,
                                             scale: scale) { call in
            try backward(call.shape, scale: call.scale, threads: call.threads, q: call.q, k: call.k, v: call.v,
                         dO: call.dO, dQ: call.dQ, dK: call.dK, dV: call.dV, keyLengths: keyLengths, routes: routes)
        }
    }

    /// Throws unless `routes` are routes of this conformer's problem `shape`.
    private func check(_ routes: RoutingRoutes, _ shape: AttentionShape) throws {
        let theirs = [routes.batch, routes.heads, routes.clusters, routes.queryLength, routes.keyLength]
        let ours = [shape.batch, shape.heads, clusterCount, shape.queryLength, shape.keyLength]
        guard theirs == ours else {
            throw AttentionError.shapeMismatch(
                "routes are of [B, H, K, Nq, Nk] = \(theirs), this problem's are \(ours)")
        }
    }

    /// The backward on the checked call's kernel views (`dQ` zero-filled), with the routes
    /// recomputed when `routes` is `nil`.
    private func backward(_ shape: AttentionShape, scale: Float, threads: Int, q: TensorView, k: TensorView,
                          v: TensorView, dO: TensorView, dQ: MutableTensorView, dK: MutableTensorView,
                          dV: MutableTensorView, keyLengths: [Int]?, routes: RoutingRoutes?) throws {
        try checkAllocation(bytes: backwardWorkspaceBytes(shape, threads: threads), option: "routing backward workspace")
        let l = layout(shape), sizes = backwardSizes(shape)
        let offset = causal ? shape.keyLength - shape.queryLength : nil
        try withModifierBackward(shape) { modifiers, biasGradient in
        WorkspaceArena.withWorkspaces(workers: 1, zeroed: true, layout: {
            (ClusterRouter(carving: &$0, sizes.router, workers: threads), ClusterBackward.Workspace(carving: &$0, sizes))
        }) { spaces in
            let (router, space) = spaces[0]
            centroids.withView { c in routes.withPositions { givenQueries, givenKeys in
                // dK, dV are sums over the clusters and the query heads of each group, from
                // zero; 16-bit gradients are summed a head at a time in `Float`.
                forEachHeadSummingGradients(shape, dQ: dQ, dK: dK, dV: dV) { b, h, dQ, dK, dV in
                    let hk = h / shape.groupSize, head = b * shape.heads + h
                    let qp: UnsafePointer<Int32>, kp: UnsafePointer<Int32>
                    if let givenQueries, let givenKeys {
                        (qp, kp) = (givenQueries + head * l.querySlots, givenKeys + head * l.keySlots)
                    } else {
                        let routed = route(l, router: router, shape: shape, threads: threads, q: q, k: k, c: c,
                                           b: b, h: h)
                        (qp, kp) = (UnsafePointer(routed.0), UnsafePointer(routed.1))
                    }
                    ClusterBackward.addHead(
                        sizes, space: space, queryRoutes: qp, keyRoutes: kp, causalOffset: offset,
                        keyLength: keyLengths?[b] ?? shape.keyLength, scale: scale, threads: threads,
                        query: PermutedBlockAttention.Rows(view: q, b: b, h: h),
                        key: PermutedBlockAttention.Rows(view: k, b: b, h: hk),
                        value: PermutedBlockAttention.Rows(view: v, b: b, h: hk),
                        outputGradient: PermutedBlockAttention.Rows(view: dO, b: b, h: h),
                        dQ: dQ, dK: dK, dV: dV, b: b, h: h, hk: hk, modifiers: modifiers,
                        biasGradient: biasGradient.map { MutableTensorView(base: $0.row(b, h, 0), strides: $0.strides) })
                }
            } }
        }
        }
    }

    /// FLOPs: `3.5 ×` the forward's attention FLOPs (the flash backward's conventional
    /// `2.5 ×` and the recomputed per-cluster forward) plus the routing's once; workspace:
    /// the router, one head's gathered rows and gradients, and the larger of the tiled
    /// kernels' workspaces.
    public func backwardCost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        let threads = try threadCount(threads)
        let forward = try cost(shape, threads: threads)
        let heads = Double(shape.batch * shape.heads)
        let routing = heads * 2 * Double(shape.queryLength + shape.keyLength) * Double(clusterCount * shape.headDim)
        let bytes = backwardWorkspaceBytes(shape, threads: threads)
        try checkAllocation(bytes: bytes, option: "routing backward workspace")
        return AttentionCost(flops: 3.5 * (forward.flops - routing) + routing, workspaceBytes: bytes,
                             scoredPairs: forward.scoredPairs)
    }

    /// The backward's problem of one head.
    private func backwardSizes(_ shape: AttentionShape) -> ClusterBackward.Sizes {
        ClusterBackward.Sizes(router: sizes(shape), valueDim: shape.valueDim)
    }

    /// The arena of ``gradients(query:key:value:output:logSumExp:outputGradient:dQuery:dKey:dValue:keyLengths:workspace:threads:)``
    /// (a router for `threads` workers and one head's buffers) and the tiled kernels' scratch
    /// taken inside it.
    private func backwardWorkspaceBytes(_ shape: AttentionShape, threads: Int) -> Int {
        let sizes = backwardSizes(shape)
        let arena = WorkspaceCarver.bytes {
            _ = ClusterRouter(carving: &$0, sizes.router, workers: threads)
            _ = ClusterBackward.Workspace(carving: &$0, sizes)
        }
        return WorkspaceArena.byteCount(sliceBytes: arena, slices: 1) + ClusterBackward.kernelBytes(sizes, threads: threads)
    }
}

/// The cluster members of one routing forward
/// (``RoutingAttention/attendReturningRoutes(query:key:value:keyLengths:threads:)``), to hand
/// to ``RoutingAttention/gradients(query:key:value:result:outputGradient:routes:keyLengths:threads:)``
/// so that the backward does not route again. Only the forward makes them: their positions
/// are valid and ascending within each cluster by construction.
public struct RoutingRoutes: Sendable, Equatable {
    /// The problem they route: `B`, `H` (query heads), `K`, `Nq`, `Nk`.
    public let batch: Int, heads: Int, clusters: Int, queryLength: Int, keyLength: Int
    /// Members per cluster: `wq = ⌈Nq / K⌉` queries, `wk = ⌈Nk / K⌉` keys.
    public let queryTake: Int, keyTake: Int
    /// `query[((b · H + h) · K + c) · wq + n]`: the `n`-th query of cluster `c` of head `(b, h)`.
    let query: [Int32]
    let key: [Int32]

    /// The query positions of cluster `cluster` of head `(batch, head)`, ascending (the
    /// lists of ``RoutingAttention/routes(query:key:)``).
    public func queries(batch b: Int, head h: Int, cluster c: Int) -> [Int] {
        let start = ((b * heads + h) * clusters + c) * queryTake
        return query[start..<(start + queryTake)].map { Int($0) }
    }

    /// The key positions of cluster `cluster` of head `(batch, head)`, ascending.
    public func keys(batch b: Int, head h: Int, cluster c: Int) -> [Int] {
        let start = ((b * heads + h) * clusters + c) * keyTake
        return key[start..<(start + keyTake)].map { Int($0) }
    }
}

extension Optional where Wrapped == RoutingRoutes {
    /// `body` with the query and key positions of the routes (`nil` without routes).
    func withPositions<R>(_ body: (UnsafePointer<Int32>?, UnsafePointer<Int32>?) -> R) -> R {
        guard let routes = self else { return body(nil, nil) }
        return routes.query.withUnsafeBufferPointer { q in
            routes.key.withUnsafeBufferPointer { k in body(q.baseAddress, k.baseAddress) }
        }
    }
}
