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
/// The work runs on ``GroupedAttention``: routing scores are a GEMM on the micro-kernel
/// (`C · X̂ᵀ`, a panel of positions against all of a thread's clusters), compared as they
/// are computed with per-cluster thresholds from a sample, so that only candidates are
/// kept; the top-w of each cluster is selected among them, and each cluster
/// attends with the tiled softmax kernel (a query tile per cluster, the cluster's keys as
/// key tiles, no masking unless causal or padded).
///
/// - Complexity: per head, `K · wq · wk · 2 · (D + Dv)` FLOPs of attention (about
///   `Nq · wk · 2 · (D + Dv)`) plus `2 · (Nq + Nk) · K · D` FLOPs of routing and
///   O((Nq + Nk) · K) selection; workspace O((Nq + Nk) · (D + Dv)) per head in flight (one
///   per thread while they fit in the L3, else one).
public struct RoutingAttention: Attention {
    /// `[1, H, K, D]`, finite.
    public private(set) var centroids: Tensor
    /// Key `j` is visible to query `i` only if `j <= i + Nk − Nq` (original positions).
    public var causal: Bool
    /// Score scale; `nil` means `1 / sqrt(D)`. Must be finite.
    public var scale: Float?
    /// Weight of the old centroid in ``updateCentroids(query:key:)``, in `[0, 1)` (default 0.999).
    public var decay: Float

    /// Seeded centroids: `clusters` unit vectors per head with Gaussian directions.
    ///
    /// - Complexity: O(heads · clusters · headDim).
    public init(heads: Int, headDim: Int, clusters: Int, causal: Bool = false, scale: Float? = nil,
                decay: Float = 0.999, seed: UInt64 = 0) throws {
        for (name, value) in [("heads", heads), ("headDim", headDim), ("clusters", clusters)] where value < 1 {
            throw AttentionError.invalidParameter("routing \(name) must be at least 1, got \(value)")
        }
        try checkLimit(clusters, "clusters", variant: "routing attention")
        try checkFloatAllocation([heads, clusters, headDim], option: "routing centroids [1, heads, clusters, headDim]")
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
        try checkLimit(clusterCount, "clusters", variant: "routing attention")
        // Cluster slots and candidate lists grow with K · N: checked before any size is
        // computed with unchecked arithmetic, then the workspace of the most workers.
        guard checkedProduct([clusterCount + 64, max(shape.queryLength, shape.keyLength) + 64, 64]) != nil else {
            throw AttentionError.sizeOverflow("routing cluster lists (clusters × sequence length) overflow Int")
        }
        try checkAllocation(bytes: workspaceBytes(shape, threads: maxThreadCount), option: "routing workspace")
    }

    private func layout(_ shape: AttentionShape) -> GroupedAttention.Layout {
        let k = clusterCount
        let wq = (shape.queryLength + k - 1) / k, wk = (shape.keyLength + k - 1) / k
        return GroupedAttention.Layout(
            rounds: 1, queryLength: shape.queryLength, querySlots: k * wq, keySlots: k * wk,
            queryGroupSize: wq, keyGroupSize: wk, groups: k, lookBack: false, checkBuckets: false,
            causalOffset: causal ? shape.keyLength - shape.queryLength : nil, sharedKeys: false,
            combine: .mean, headDim: shape.headDim, valueDim: shape.valueDim)
    }

    public func cost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        let threads = try threadCount(threads)
        try validate(shape)
        let l = layout(shape), k = clusterCount
        let heads = shape.batch * shape.heads
        guard let pairs = checkedProduct([k, l.queryGroupSize, l.keyGroupSize]), checkedProduct([pairs, heads]) != nil else {
            throw AttentionError.sizeOverflow("routing scored pairs (clusters × wq × wk × B·H) overflow Int")
        }
        let flops = Double(heads) * (2 * Double(pairs) * Double(shape.headDim + shape.valueDim)
                                     + 2 * Double(shape.queryLength + shape.keyLength) * Double(k * shape.headDim))
        return AttentionCost(flops: flops, workspaceBytes: workspaceBytes(shape, threads: threads),
                             scoredPairs: heads * pairs)
    }

    /// The workspace of a call on `shape` with `threads` workers (at most ``maxThreadCount``):
    /// one grouped-attention workspace and one router per head in flight.
    private func workspaceBytes(_ shape: AttentionShape, threads: Int) -> Int {
        let l = layout(shape), heads = shape.batch * shape.heads
        let bytesPerHead = headBytes(l, keyLength: shape.keyLength)
        let (outer, inner) = GroupedAttention.split(heads: heads, threads: threads, bytesPerHead: bytesPerHead)
        return GroupedAttention.workspaceBytes(l, heads: heads, threads: threads, bytesPerHead: bytesPerHead)
            + outer * Router.byteCount(l, keyLength: shape.keyLength, workers: inner)
    }

    /// The memory one head touches (``GroupedAttention/split(heads:threads:bytesPerHead:cacheBytes:)``).
    private func headBytes(_ l: GroupedAttention.Layout, keyLength: Int) -> Int {
        GroupedAttention.headBytes(l, keyLength: keyLength,
                                   scratchBytes: Router.byteCount(l, keyLength: keyLength, workers: 1))
    }

    /// The members of every cluster, ascending: `query[(b·H + h)·K + c]` lists the original
    /// query positions routed to cluster `c` of head `h`, `key[...]` the key positions.
    ///
    /// - Complexity: O(B · H · (Nq + Nk) · K · D), single-threaded.
    public func routes(query: Tensor, key: Tensor) throws -> (query: [[Int]], key: [[Int]]) {
        let shape = try AttentionShape(query: query, key: key, value: key)
        try validate(shape)
        let l = layout(shape)
        let router = Router(l, keyLength: shape.keyLength, workers: 1)
        defer { router.deallocate() }
        var queries = [[Int]](), keys = [[Int]]()
        query.withView { q in key.withView { k in centroids.withView { c in
            for b in 0..<shape.batch { for h in 0..<shape.heads {
                let (qp, kp) = route(l, router: router, shape: shape, threads: 1, q: q, k: k, c: c, b: b, h: h)
                for cluster in 0..<clusterCount {
                    queries.append((0..<l.queryGroupSize).map { Int(qp[cluster * l.queryGroupSize + $0]) })
                    keys.append((0..<l.keyGroupSize).map { Int(kp[cluster * l.keyGroupSize + $0]) })
                }
            } }
        } } }
        return (queries, keys)
    }

    /// Fills the router's query and key slot positions for head `(b, h)`.
    private func route(_ l: GroupedAttention.Layout, router: Router, shape: AttentionShape, threads: Int,
                       q: TensorView, k: TensorView, c: TensorView, b: Int, h: Int,
                       into space: GroupedAttention.Workspace? = nil)
        -> (UnsafeMutablePointer<Int32>, UnsafeMutablePointer<Int32>) {
        let queryOut = space?.queryPosition ?? router.queryRoutes
        let keyOut = space?.keyPosition ?? router.keyRoutes
        let hk = h / shape.groupSize
        let sides = [(GroupedAttention.Rows(view: q, b: b, h: h), shape.queryLength, l.queryGroupSize, queryOut),
                     (GroupedAttention.Rows(view: k, b: b, h: hk), shape.keyLength, l.keyGroupSize, keyOut)]
        // One work item per thread, each of whole micro-kernel row blocks: a panel of positions
        // is loaded once for all of an item's clusters.
        let perItem = router.itemClusters
        let items = (clusterCount + perItem - 1) / perItem
        for (rows, n, w, out) in sides {
            let rowBlocks = (n + 255) / 256
            parallelForEach(items: rowBlocks, threads: threads) { item, _ in
                router.packUnit(rows, start: item * 256, count: min(256, n - item * 256), n: n)
            }
            router.packSamples(n: n, take: w)
            parallelForEach(items: items, threads: threads) { item, worker in
                router.select(centroids: c, head: h, firstCluster: item * perItem,
                              clusters: min(perItem, clusterCount - item * perItem),
                              n: n, take: w, worker: worker, into: out)
            }
        }
        return (queryOut, keyOut)
    }

    public func attend(query: Tensor, key: Tensor, value: Tensor,
                       keyLengths: [Int]?, threads: Int?) throws -> AttentionResult {
        let (shape, scale) = try checkedCall(query: query, key: key, value: value, keyLengths: keyLengths,
                                             threads: threads, scale: self.scale)
        let threads = try threadCount(threads)
        let l = layout(shape)
        var output = try Tensor(shape: [shape.batch, shape.heads, shape.queryLength, shape.valueDim])
        var lse = try Tensor(shape: [shape.batch, shape.heads, shape.queryLength, 1])
        query.withView { q in key.withView { k in value.withView { v in centroids.withView { c in
        output.withMutableView { o in lse.withMutableView { lv in
            // Heads side by side (one workspace and router per head worker), each head's
            // phases on `inner` threads.
            GroupedAttention.forEachHead(
                batch: shape.batch, heads: shape.heads, threads: threads, layout: l,
                bytesPerHead: headBytes(l, keyLength: shape.keyLength),
                makeScratch: { Router(l, keyLength: shape.keyLength, workers: $0) },
                release: { $0.deallocate() }
            ) { b, h, inner, space, router in
                _ = route(l, router: router, shape: shape, threads: inner, q: q, k: k, c: c, b: b, h: h, into: space)
                let hk = h / shape.groupSize
                GroupedAttention.attendRound(
                    l, round: 0, space: space, scale: scale, threads: inner,
                    query: GroupedAttention.Rows(view: q, b: b, h: h), key: GroupedAttention.Rows(view: k, b: b, h: hk),
                    value: GroupedAttention.Rows(view: v, b: b, h: hk), keyLength: keyLengths?[b] ?? shape.keyLength,
                    output: o, lse: lv, b: b, h: h)
            }
        } } } } } }
        return try AttentionResult(output: output, logSumExp: lse)
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
            var sums = [Double](repeating: 0, count: k * d), counts = [Int](repeating: 0, count: k)
            let centre = (0..<k).map { c in (0..<d).map { centroids[0, h, c, $0] } }
            for (tensor, head, n) in [(query, h, shape.queryLength), (key, h / shape.groupSize, shape.keyLength)] {
                for b in 0..<shape.batch { for i in 0..<n {
                    let x = (0..<d).map { tensor[b, head, i, $0] }
                    let norm = x.reduce(0) { $0 + $1 * $1 }.squareRoot()
                    guard norm > 0, norm.isFinite else { continue }
                    var best = 0, bestScore = -Float.infinity
                    for c in 0..<k {
                        var score: Float = 0
                        for t in 0..<d { score += x[t] * centre[c][t] }
                        if score > bestScore { best = c; bestScore = score }
                    }
                    counts[best] += 1
                    for t in 0..<d { sums[best * d + t] += Double(x[t] / norm) }
                } }
            }
            for c in 0..<k where counts[c] > 0 {
                let moved = (0..<d).map { t in
                    Double(decay) * Double(centre[c][t]) + Double(1 - decay) * sums[c * d + t] / Double(counts[c])
                }
                let norm = moved.reduce(0) { $0 + $1 * $1 }.squareRoot()
                guard norm > 0 else { continue }
                for t in 0..<d { updated[0, h, c, t] = Float(moved[t] / norm) }
            }
        }
        centroids = updated
    }

    /// Routing scratch: unit-normalised rows as packed panels, the sampled rows' panels,
    /// and per worker a full score tile (`MR × N`, for short sequences and fallbacks), a
    /// panel's scores, the sample scores and every cluster's candidate list.
    struct Router {
        let d: Int, stride: Int
        /// Clusters of one work item of ``select(centroids:head:firstCluster:clusters:n:take:worker:into:)``:
        /// `K / workers` in whole micro-kernel row blocks, so that each panel of positions is
        /// read once per worker.
        let itemClusters: Int
        /// Row length of the sample scores (the most samples of either side).
        let sampleStride: Int
        /// Capacity of one cluster's candidate list.
        let capacity: Int
        let unitT: UnsafeMutablePointer<Float>       // packed panels: [N / NR][D][NR]
        let sampleT: UnsafeMutablePointer<Float>     // packed panels of the sampled rows
        private let perWorker: Int
        private let workerBase: UnsafeMutablePointer<Float>
        let queryRoutes, keyRoutes: UnsafeMutablePointer<Int32>
        private let block: UnsafeMutableRawPointer

        /// One worker's buffers.
        struct Local {
            var tile: UnsafeMutablePointer<Float>               // [MR][stride] full scores
            var values: UnsafeMutablePointer<Float>             // [stride] selection scratch
            var indices: UnsafeMutablePointer<Int32>            // [stride]
            var panel: UnsafeMutablePointer<Float>              // [MR][NR] one panel's scores
            var rows: UnsafeMutablePointer<Float>               // [MR][D] centroids of fallbacks
            var sampleScores: UnsafeMutablePointer<Float>       // [MR][sampleStride]
            var thresholds: UnsafeMutablePointer<Float>         // [itemClusters]
            var counts: UnsafeMutablePointer<Int32>             // [itemClusters]
            var listValues: UnsafeMutablePointer<Float>         // [itemClusters][capacity]
            var listIndices: UnsafeMutablePointer<Int32>        // [itemClusters][capacity]
        }

        /// The sampled positions `t · step`, `t < count`, for `n` positions (`nil`: no sampling,
        /// every score is a candidate): about `max(512, 4 · n / take)` (at least four per
        /// cluster), at most `n / 4`.
        static func sampling(n: Int, take: Int) -> (step: Int, count: Int)? {
            guard n >= 2048 && 4 * take <= n else { return nil }
            let step = n / min(n / 4, max(512, 4 * n / take))
            return (step, n / step)
        }

        /// The sample rank whose score is the first threshold tried (about `1.25 · take`
        /// candidates expected, plus a margin).
        static func firstRank(take: Int, n: Int, samples: Int) -> Int {
            min(samples - 1, take * samples * 5 / (4 * n) + 5)
        }

        /// Candidate-list capacity for `take` of `n`: four times the expected count of the first
        /// threshold (a longer list falls back to the full scores).
        static func capacity(n: Int, take: Int) -> Int {
            guard let (_, samples) = sampling(n: n, take: take) else { return 0 }
            return min(n, 4 * (firstRank(take: take, n: n, samples: samples) + 1) * n / samples + 64)
        }

        private static func counts(_ l: GroupedAttention.Layout, keyLength: Int, workers: Int)
            -> (floats: Int, perWorker: Int, capacity: Int, ints: Int, itemClusters: Int, sampleStride: Int) {
            let stride = TransposedRows.stride(max(l.queryLength, keyLength))
            let capacity = roundUp(max(Router.capacity(n: l.queryLength, take: l.queryGroupSize),
                                       Router.capacity(n: keyLength, take: l.keyGroupSize)), 16)
            let samples = max(sampling(n: l.queryLength, take: l.queryGroupSize)?.count ?? 0,
                              sampling(n: keyLength, take: l.keyGroupSize)?.count ?? 0)
            let sampleStride = roundUp(samples, MicroTile.nr)
            let itemClusters = roundUp((l.groups + workers - 1) / workers, MicroTile.mr)
            let perWorker = roundUp(stride * (MicroTile.mr + 2) + MicroTile.mr * (MicroTile.nr + l.headDim + sampleStride)
                                    + 2 * itemClusters * (1 + capacity), 16)
            let shared = l.headDim * (stride + sampleStride)
            return (shared + workers * perWorker, perWorker, capacity, l.querySlots + l.keySlots,
                    itemClusters, sampleStride)
        }

        /// Bytes for `l` with `workers`; ``routes(query:key:)`` alone uses the slot arrays.
        static func byteCount(_ l: GroupedAttention.Layout, keyLength: Int, workers: Int) -> Int {
            let c = counts(l, keyLength: keyLength, workers: workers)
            return 4 * (c.floats + c.ints)
        }

        init(_ l: GroupedAttention.Layout, keyLength: Int, workers: Int) {
            d = l.headDim
            stride = TransposedRows.stride(max(l.queryLength, keyLength))
            let c = Router.counts(l, keyLength: keyLength, workers: workers)
            capacity = c.capacity
            perWorker = c.perWorker
            itemClusters = c.itemClusters
            sampleStride = c.sampleStride
            block = UnsafeMutableRawPointer.allocate(byteCount: 4 * (c.floats + c.ints), alignment: 64)
            unitT = block.initializeMemory(as: Float.self, repeating: 0, count: c.floats)
            sampleT = unitT + d * stride
            workerBase = sampleT + d * sampleStride
            queryRoutes = (block + 4 * c.floats).initializeMemory(as: Int32.self, repeating: 0, count: c.ints)
            keyRoutes = queryRoutes + l.querySlots
        }

        func deallocate() { block.deallocate() }

        func local(_ worker: Int) -> Local {
            let base = workerBase + worker * perWorker
            let ints = { (p: UnsafeMutablePointer<Float>) in
                UnsafeMutableRawPointer(p).assumingMemoryBound(to: Int32.self)
            }
            let tile = base, values = tile + MicroTile.mr * stride, indices = values + stride
            let panel = indices + stride, rows = panel + MicroTile.mr * MicroTile.nr
            let sampleScores = rows + MicroTile.mr * d
            let thresholds = sampleScores + MicroTile.mr * sampleStride
            let counts = thresholds + itemClusters
            let listValues = counts + itemClusters
            return Local(tile: tile, values: values, indices: ints(indices), panel: panel, rows: rows,
                         sampleScores: sampleScores,
                         thresholds: thresholds, counts: ints(counts), listValues: listValues,
                         listIndices: ints(listValues + itemClusters * capacity))
        }

        /// `x_i / |x_i|` for rows `start..<start + count` (`start` a multiple of `NR`) into
        /// `unitT` as packed `NR`-position panels; lanes past position `n − 1` zero.
        func packUnit(_ rows: GroupedAttention.Rows, start: Int, count: Int, n: Int) {
            TransposedRows.packPanels(rows, start: start, count: count, depth: d, normalise: true, into: unitT, n: n)
        }

        /// Copies the sampled positions' packed rows (``sampling(n:take:)``) from `unitT` into
        /// `sampleT`'s panels (lanes past the last sample zero).
        func packSamples(n: Int, take: Int) {
            guard let (step, samples) = Router.sampling(n: n, take: take) else { return }
            let nr = MicroTile.nr
            sampleT.update(repeating: 0, count: d * roundUp(samples, nr))
            for t in 0..<samples {
                let p = t * step
                let source = unitT + p / nr * d * nr + p % nr, target = sampleT + t / nr * d * nr + t % nr
                for c in 0..<d { target[c * nr] = source[c * nr] }
            }
        }

        /// Each cluster's top `take` of the `n` positions (ascending) into
        /// `out[cluster · take ...]`, for clusters `firstCluster ..< firstCluster + clusters`
        /// (at most ``itemClusters``).
        ///
        /// With sampling (``sampling(n:take:)``, after ``packSamples(n:take:)``): the sampled
        /// scores give each cluster a threshold (the ``firstRank(take:n:samples:)``-th
        /// largest); the scores are then computed a panel of `NR` positions at a time for all
        /// the item's clusters (the panel stays in L1) and those at or above the threshold
        /// are listed, so the `K × N` scores are never stored. A cluster with too few
        /// candidates or too many (a full list) falls back to its full row of scores (eight such
        /// clusters per micro-kernel pass) and ``top(_:count:take:values:indices:into:)``,
        /// which gives the same members.
        /// Without sampling every cluster takes the full-row path.
        func select(centroids: TensorView, head: Int, firstCluster: Int, clusters: Int,
                    n: Int, take: Int, worker: Int, into out: UnsafeMutablePointer<Int32>) {
            let w = local(worker)
            let nr = MicroTile.nr
            func operand(_ first: Int, _ rows: Int) -> BroadcastOperand {
                BroadcastOperand(base: centroids.row(0, head, first), rowStride: centroids.strides[2],
                                 depthStride: centroids.strides[3], rows: rows)
            }
            // The full rows of scores of `a`'s centroids in `w.tile`.
            func fullRows(_ a: BroadcastOperand) {
                for panel in Swift.stride(from: 0, to: roundUp(n, nr), by: nr) {
                    microKernel(depth: d, a: a, b: unitT + panel * d, ldb: nr, c: w.tile + panel, ldc: stride,
                                update: .overwrite)
                }
            }
            guard let (_, samples) = Router.sampling(n: n, take: take) else {
                for first in Swift.stride(from: firstCluster, to: firstCluster + clusters, by: MicroTile.mr) {
                    let rows = min(MicroTile.mr, firstCluster + clusters - first)
                    fullRows(operand(first, rows))
                    for r in 0..<rows {
                        Router.top(w.tile + r * stride, count: n, take: take, values: w.values, indices: w.indices,
                                   into: out + (first + r) * take)
                    }
                }
                return
            }
            // Thresholds from the sampled scores (NaN as −∞).
            let rank = Router.firstRank(take: take, n: n, samples: samples)
            for first in Swift.stride(from: firstCluster, to: firstCluster + clusters, by: MicroTile.mr) {
                let rows = min(MicroTile.mr, firstCluster + clusters - first)
                for panel in Swift.stride(from: 0, to: samples, by: nr) {
                    microKernel(depth: d, a: operand(first, rows), b: sampleT + panel * d, ldb: nr,
                                c: w.sampleScores + panel, ldc: sampleStride, update: .overwrite)
                }
                for r in 0..<rows {
                    let scores = w.sampleScores + r * sampleStride
                    for t in 0..<samples { w.values[t] = scores[t].isNaN ? -.infinity : scores[t] }
                    w.thresholds[first - firstCluster + r] = Router.kthLargest(w.values, count: samples, k: rank)
                }
            }
            // Candidates: a panel's scores for every cluster of the item, compared at once.
            w.counts.update(repeating: 0, count: clusters)
            for panel in Swift.stride(from: 0, to: n, by: nr) {
                let inside = n - panel >= nr ? UInt32.max : (1 << UInt32(n - panel)) - 1
                for first in Swift.stride(from: firstCluster, to: firstCluster + clusters, by: MicroTile.mr) {
                    let rows = min(MicroTile.mr, firstCluster + clusters - first)
                    microKernel(depth: d, a: operand(first, rows), b: unitT + panel * d, ldb: nr,
                                c: w.panel, ldc: nr, update: .overwrite)
                    for r in 0..<rows {
                        let item = first - firstCluster + r
                        let bound = Vec16(repeating: w.thresholds[item])
                        let scores = w.panel + r * nr
                        var mask = Router.passMask(scores, atLeast: bound) & inside
                        // Branch-free for the first two passing lanes (about 40% of rows
                        // have one, few have more): stores at `count` whether or not a lane
                        // passed, counting only those that did.
                        // A list with no room for a whole panel is full: the cluster falls back.
                        var count = Int(w.counts[item])
                        guard count <= capacity - MicroTile.nr else { continue }
                        let values = w.listValues + item * capacity, indices = w.listIndices + item * capacity
                        for _ in 0..<2 {
                            let lane = Int(mask.trailingZeroBitCount) & (MicroTile.nr - 1)
                            values[count] = scores[lane]
                            indices[count] = Int32(truncatingIfNeeded: panel &+ lane)
                            count &+= mask != 0 ? 1 : 0
                            mask &= mask &- 1
                        }
                        count = Router.append(mask, scores: scores, first: panel, values: values, indices: indices,
                                              at: count)
                        w.counts[item] = Int32(count)
                    }
                }
            }
            // Clusters with too few candidates (or a full list) take the full-row path, a
            // micro-kernel row block of them at a time.
            withUnsafeTemporaryAllocation(of: Int.self, capacity: MicroTile.mr) { failed in
                var pending = 0
                func flush() {
                    guard pending > 0 else { return }
                    for r in 0..<pending {
                        let centroid = centroids.row(0, head, failed[r]), es = centroids.strides[3]
                        for c in 0..<d { w.rows[r * d + c] = centroid[c * es] }
                    }
                    fullRows(BroadcastOperand(base: w.rows, rowStride: d, depthStride: 1, rows: pending))
                    for r in 0..<pending {
                        Router.top(w.tile + r * stride, count: n, take: take, values: w.values, indices: w.indices,
                                   into: out + failed[r] * take)
                    }
                    pending = 0
                }
                for item in 0..<clusters {
                    let cluster = firstCluster + item
                    let count = Int(w.counts[item])
                    if w.thresholds[item] > -.infinity && count >= take && count <= capacity - MicroTile.nr {
                        let values = w.listValues + item * capacity
                        w.values.update(from: values, count: count)
                        Router.finish(selecting: w.values, indices: w.listIndices + item * capacity, count: count,
                                      take: take, into: out + cluster * take) { values[$0] }
                    } else {
                        failed[pending] = cluster
                        pending += 1
                        if pending == MicroTile.mr { flush() }
                    }
                }
                flush()
            }
        }

        /// Bit `i` set iff `scores[i] >= bound` (NaN never passes), `i < 32`. The comparison
        /// masks become bytes of 0 or 1, whose eight lanes per word a multiply gathers into
        /// one byte each (a mask's or-reduction over lane bits compiles to lane extracts).
        @inline(__always)
        static func passMask(_ scores: UnsafePointer<Float>, atLeast bound: Vec16) -> UInt32 {
            let b0 = SIMD16<Int8>(truncatingIfNeeded: SIMD16<Int32>().replacing(with: 1, where: load16(scores) .>= bound))
            let b1 = SIMD16<Int8>(truncatingIfNeeded:
                SIMD16<Int32>().replacing(with: 1, where: load16(scores + 16) .>= bound))
            let words = unsafeBitCast(SIMD32<Int8>(lowHalf: b0, highHalf: b1), to: SIMD4<UInt64>.self)
            let gather: UInt64 = 0x0102_0408_1020_4080     // byte j's low bit to bit 56 + j
            let bytes = (words &* gather) &>> 56
            return UInt32(truncatingIfNeeded: bytes[0] | bytes[1] << 8 | bytes[2] << 16 | bytes[3] << 24)
        }

        /// The `take` largest of `scores[0..<count]` (ties: smaller index first; NaN counts as
        /// −∞), as ascending indices, from a full row of scores (short sequences and the
        /// fallback of ``select(centroids:head:firstCluster:clusters:n:take:worker:into:)``).
        /// The sampled scores (``sampling(n:take:)``) give a threshold that a little more
        /// than `take` scores pass; a vector scan collects those candidates (the set bits of
        /// each 32-score comparison mask) and the selection runs on them only. Too few
        /// candidates lower the threshold (a larger sample rank), down to all scores.
        /// `values` and `indices` hold `count` entries.
        static func top(_ scores: UnsafePointer<Float>, count: Int, take: Int,
                        values: UnsafeMutablePointer<Float>, indices: UnsafeMutablePointer<Int32>,
                        into out: UnsafeMutablePointer<Int32>) {
            var candidates = 0
            if let (step, samples) = sampling(n: count, take: take) {
                var rank = firstRank(take: take, n: count, samples: samples)
                while true {
                    for t in 0..<samples { values[t] = scores[t * step].isNaN ? -.infinity : scores[t * step] }
                    let low = kthLargest(values, count: samples, k: rank)
                    guard low > -.infinity else { break }
                    candidates = collect(scores, count: count, atLeast: low, values: values, indices: indices)
                    if candidates >= take || rank == samples - 1 { break }
                    rank = min(samples - 1, 2 * rank + 4)
                }
            }
            if candidates < take {
                for i in 0..<count {
                    values[i] = scores[i].isNaN ? -.infinity : scores[i]
                    indices[i] = Int32(i)
                }
                candidates = count
            }
            // Candidates are in ascending index order; `values` is reordered by the selection.
            finish(selecting: values, indices: indices, count: candidates, take: take, into: out) { c in
                let score = scores[Int(indices[c])]
                return score.isNaN ? -.infinity : score
            }
        }

        /// The `take` largest of `count` listed candidates (ties: smaller index first), as
        /// ascending indices: candidate `c` has index `indices[c]` (ascending in `c`) and
        /// value `listValue(c)`; `selecting` holds the same values in any order and is
        /// reordered by the selection.
        @inline(__always)
        static func finish(selecting: UnsafeMutablePointer<Float>, indices: UnsafePointer<Int32>, count: Int,
                           take: Int, into out: UnsafeMutablePointer<Int32>, listValue: (Int) -> Float) {
            let threshold = kthLargest(selecting, count: count, k: take - 1)
            var greater = 0
            for c in 0..<count where listValue(c) > threshold { greater += 1 }
            var ties = take - greater, next = 0
            for c in 0..<count {
                let s = listValue(c)
                if s > threshold || (s == threshold && ties > 0) {
                    if s == threshold { ties -= 1 }
                    out[next] = indices[c]
                    next += 1
                }
            }
        }

        /// Writes the scores `>= low` (and their indices, ascending) to `values` and
        /// `indices`; returns how many. Thirty-two scores per ``passMask(_:atLeast:)``; only
        /// the set bits of a mask are visited.
        @inline(__always)
        static func collect(_ scores: UnsafePointer<Float>, count: Int, atLeast low: Float,
                            values: UnsafeMutablePointer<Float>, indices: UnsafeMutablePointer<Int32>) -> Int {
            let bound = Vec16(repeating: low), nr = MicroTile.nr
            var found = 0, i = 0
            while i + nr <= count {
                found = append(passMask(scores + i, atLeast: bound), scores: scores + i, first: i,
                               values: values, indices: indices, at: found)
                i += nr
            }
            while i < count {
                if scores[i] >= low {
                    values[found] = scores[i]
                    indices[found] = Int32(truncatingIfNeeded: i)
                    found += 1
                }
                i += 1
            }
            return found
        }

        /// Appends `scores[lane]` and its index `first + lane` for every set bit of `mask`
        /// (ascending) at `values[count...]`, `indices[count...]`; returns the new count.
        @inline(__always)
        static func append(_ mask: UInt32, scores: UnsafePointer<Float>, first: Int,
                           values: UnsafeMutablePointer<Float>, indices: UnsafeMutablePointer<Int32>,
                           at count: Int) -> Int {
            var mask = mask, count = count
            while mask != 0 {
                let lane = Int(mask.trailingZeroBitCount)
                values[count] = scores[lane]
                indices[count] = Int32(truncatingIfNeeded: first &+ lane)
                count &+= 1
                mask &= mask &- 1
            }
            return count
        }

        /// The `k`-th largest value (0-based) of `a[0..<count]` (`a` holds no NaN; it may be
        /// overwritten). Bisection on the floats' order-preserving 32-bit keys: 32 passes, each
        /// counting the keys at or above the midpoint sixteen at a time (no data-dependent
        /// branches; a quickselect's partitions are chains of dependent loads and stores).
        /// `-0` and `+0` are distinct keys but equal values, so the result compares equal to
        /// the `k`-th largest under `<`.
        static func kthLargest(_ a: UnsafeMutablePointer<Float>, count: Int, k: Int) -> Float {
            if k < 32 && count > 8 * (k + 1) { return kthLargestSmall(a, count: count, k: k) }
            let keys = UnsafeMutableRawPointer(a).assumingMemoryBound(to: UInt32.self)
            let sign = UInt32(1) << 31
            @inline(__always) func key(_ bits: UInt32) -> UInt32 { bits & sign != 0 ? ~bits : bits | sign }
            let whole = count / 16 * 16
            var i = 0
            while i < whole {
                let bits = UnsafeRawPointer(keys + i).loadUnaligned(as: SIMD16<UInt32>.self)
                let negative = (bits & sign) .!= 0
                let mapped = (bits | sign).replacing(with: ~bits, where: negative)
                UnsafeMutableRawPointer(keys + i).storeBytes(of: mapped, as: SIMD16<UInt32>.self)
                i += 16
            }
            for t in whole..<count { keys[t] = key(keys[t]) }
            // The largest v with at least k + 1 keys >= v.
            var lo: UInt64 = 0, hi = UInt64(UInt32.max)
            while lo < hi {
                let mid = (lo + hi + 1) / 2, bound = UInt32(mid)
                var counts = SIMD16<Int32>()
                let vector = SIMD16<UInt32>(repeating: bound)
                var t = 0
                while t < whole {
                    let x = UnsafeRawPointer(keys + t).loadUnaligned(as: SIMD16<UInt32>.self)
                    counts &+= SIMD16<Int32>().replacing(with: 1, where: x .>= vector)
                    t += 16
                }
                var above = Int(counts.wrappedSum())
                for t in whole..<count where keys[t] >= bound { above += 1 }
                if above > k { lo = mid } else { hi = mid - 1 }
            }
            let v = UInt32(lo)
            return Float(bitPattern: v & sign != 0 ? v & ~sign : ~v)
        }

        /// ``kthLargest(_:count:k:)`` for a small `k` (a sample's threshold rank), leaving `a`
        /// unchanged: a descending buffer of the `k + 1` largest values seen, which most
        /// values (sixteen at a time once it is full) pass with one comparison.
        static func kthLargestSmall(_ a: UnsafePointer<Float>, count: Int, k: Int) -> Float {
            withUnsafeTemporaryAllocation(of: Float.self, capacity: k + 1) { buffer in
                let top = buffer.baseAddress!
                var filled = 0, i = 0
                while i < count {
                    if filled > k && i + 16 <= count && !any(load16(a + i) .> Vec16(repeating: top[k])) {
                        i += 16
                        continue
                    }
                    for x in UnsafeBufferPointer(start: a + i, count: min(16, count - i))
                    where filled <= k || x > top[k] {
                        var j = min(filled, k)
                        while j > 0 && top[j - 1] < x {
                            top[j] = top[j - 1]
                            j -= 1
                        }
                        top[j] = x
                        filled += 1
                    }
                    i += 16
                }
                return top[k]
            }
        }
    }
}
