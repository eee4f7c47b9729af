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
/// The work runs on ``GroupedAttention``: routing scores are a small GEMM on the
/// micro-kernel (`C · X̂ᵀ`, eight clusters at a time), selection is a sampled threshold, a
/// vector scan for candidates and a quickselect on them per cluster, and each cluster
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
        try validate(shape)
        let l = layout(shape), k = clusterCount
        let pairs = k * l.queryGroupSize * l.keyGroupSize
        let heads = shape.batch * shape.heads
        let flops = Double(heads) * (2 * Double(pairs) * Double(shape.headDim + shape.valueDim)
                                     + 2 * Double(shape.queryLength + shape.keyLength) * Double(k * shape.headDim))
        let bytesPerHead = headBytes(l, keyLength: shape.keyLength)
        let (outer, inner) = GroupedAttention.split(heads: heads, threads: threads ?? defaultThreadCount,
                                                    bytesPerHead: bytesPerHead)
        return AttentionCost(flops: flops,
                             workspaceBytes: GroupedAttention.workspaceBytes(l, heads: heads, threads: threads,
                                                                             bytesPerHead: bytesPerHead)
                                 + outer * Router.byteCount(l, keyLength: shape.keyLength, workers: inner),
                             scoredPairs: heads * pairs)
    }

    /// The memory one head touches (``GroupedAttention/split(heads:threads:bytesPerHead:)``).
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
        let blocks = (clusterCount + MicroTile.mr - 1) / MicroTile.mr
        for (rows, n, w, out) in sides {
            let rowBlocks = (n + 255) / 256
            parallelForEach(items: rowBlocks, threads: threads) { item, _ in
                router.packUnit(rows, start: item * 256, count: min(256, n - item * 256), n: n)
            }
            parallelForEach(items: blocks, threads: threads) { block, worker in
                router.select(centroids: c, head: h, firstCluster: block * MicroTile.mr,
                              clusters: min(MicroTile.mr, clusterCount - block * MicroTile.mr),
                              n: n, take: w, worker: worker, into: out)
            }
        }
        return (queryOut, keyOut)
    }

    public func attend(query: Tensor, key: Tensor, value: Tensor,
                       keyLengths: [Int]?, threads: Int?) throws -> AttentionResult {
        let (shape, scale) = try checkedCall(query: query, key: key, value: value, keyLengths: keyLengths,
                                             threads: threads, scale: self.scale)
        let threads = threads ?? defaultThreadCount
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

    /// Routing scratch: unit-normalised rows transposed (`D × N`), per-worker score tiles
    /// (`MR × N`) and selection buffers, and slot positions for ``routes(query:key:)``.
    struct Router {
        let d: Int, stride: Int
        let unitT: UnsafeMutablePointer<Float>       // packed panels: [N / NR][D][NR]
        let tiles: UnsafeMutablePointer<Float>       // [workers][MR][stride]
        let copies: UnsafeMutablePointer<Float>      // [workers][stride] values, then [workers][stride] indices
        let tilesCount: Int
        let queryRoutes, keyRoutes: UnsafeMutablePointer<Int32>
        private let block: UnsafeMutableRawPointer

        private static func counts(_ l: GroupedAttention.Layout, keyLength: Int, workers: Int)
            -> (floats: Int, ints: Int) {
            let stride = TransposedRows.stride(max(l.queryLength, keyLength))
            return (stride * (l.headDim + workers * (MicroTile.mr + 2)), l.querySlots + l.keySlots)   // unitT ≤ D · stride
        }

        /// Bytes for `l` with `workers`; ``routes(query:key:)`` alone uses the slot arrays.
        static func byteCount(_ l: GroupedAttention.Layout, keyLength: Int, workers: Int) -> Int {
            let (floats, ints) = counts(l, keyLength: keyLength, workers: workers)
            return 4 * (floats + ints)
        }

        init(_ l: GroupedAttention.Layout, keyLength: Int, workers: Int) {
            d = l.headDim
            stride = TransposedRows.stride(max(l.queryLength, keyLength))
            let (floats, ints) = Router.counts(l, keyLength: keyLength, workers: workers)
            block = UnsafeMutableRawPointer.allocate(byteCount: 4 * (floats + ints), alignment: 64)
            unitT = block.initializeMemory(as: Float.self, repeating: 0, count: floats)
            tiles = unitT + d * stride
            copies = tiles + workers * MicroTile.mr * stride
            tilesCount = workers
            queryRoutes = (block + 4 * floats).initializeMemory(as: Int32.self, repeating: 0, count: ints)
            keyRoutes = queryRoutes + l.querySlots
        }

        func deallocate() { block.deallocate() }

        /// `x_i / |x_i|` for rows `start..<start + count` (`start` a multiple of `NR`) into
        /// `unitT` as packed `NR`-position panels; lanes past position `n − 1` zero.
        func packUnit(_ rows: GroupedAttention.Rows, start: Int, count: Int, n: Int) {
            TransposedRows.packPanels(rows, start: start, count: count, depth: d, normalise: true, into: unitT, n: n)
        }

        /// Scores of `clusters` centroids from `firstCluster` against the `n` packed rows, then
        /// each cluster's top `take` positions (ascending) into `out[cluster · take ...]`.
        func select(centroids: TensorView, head: Int, firstCluster: Int, clusters: Int,
                    n: Int, take: Int, worker: Int, into out: UnsafeMutablePointer<Int32>) {
            let tile = tiles + worker * MicroTile.mr * stride
            let a = BroadcastOperand(base: centroids.row(0, head, firstCluster), rowStride: centroids.strides[2],
                                     depthStride: centroids.strides[3], rows: clusters)
            for panel in Swift.stride(from: 0, to: roundUp(n, MicroTile.nr), by: MicroTile.nr) {
                microKernel(depth: d, a: a, b: unitT + panel * d, ldb: MicroTile.nr, c: tile + panel, ldc: stride,
                            update: .overwrite)
            }
            let values = copies + worker * stride
            let indices = UnsafeMutableRawPointer(copies + (tilesCount + worker) * stride)
                .assumingMemoryBound(to: Int32.self)
            for r in 0..<clusters {
                Router.top(tile + r * stride, count: n, take: take, values: values, indices: indices,
                           into: out + (firstCluster + r) * take)
            }
        }

        /// The `take` largest of `scores[0..<count]` (ties: smaller index first; NaN counts as
        /// −∞), as ascending indices. A strided sample of 512 scores gives a threshold that
        /// about `1.25 · take` scores pass; a vector scan collects those candidates (the set
        /// bits of each 16-score comparison mask) and the selection runs on them only. Too
        /// few candidates lower the threshold (a larger sample rank), down to all scores.
        /// `values` and `indices` hold `count` entries.
        static func top(_ scores: UnsafePointer<Float>, count: Int, take: Int,
                        values: UnsafeMutablePointer<Float>, indices: UnsafeMutablePointer<Int32>,
                        into out: UnsafeMutablePointer<Int32>) {
            var candidates = 0
            if count >= 2048 && 4 * take <= count {
                let step = count / 512, samples = count / step
                var rank = min(samples - 1, take * samples * 5 / (4 * count) + 3)
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
            let threshold = kthLargest(values, count: candidates, k: take - 1)
            var greater = 0
            for c in 0..<candidates where scores[Int(indices[c])] > threshold { greater += 1 }
            var ties = take - greater, next = 0
            for c in 0..<candidates {
                let score = scores[Int(indices[c])]
                let s = score.isNaN ? -Float.infinity : score
                if s > threshold || (s == threshold && ties > 0) {
                    if s == threshold { ties -= 1 }
                    out[next] = indices[c]
                    next += 1
                }
            }
        }

        /// Writes the scores `>= low` (and their indices, ascending) to `values` and
        /// `indices`; returns how many. Sixteen scores per comparison; only the set bits of
        /// a comparison's mask are visited.
        @inline(__always)
        static func collect(_ scores: UnsafePointer<Float>, count: Int, atLeast low: Float,
                            values: UnsafeMutablePointer<Float>, indices: UnsafeMutablePointer<Int32>) -> Int {
            let bound = Vec16(repeating: low)
            let bits = SIMD16<Int32>(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
            var found = 0, i = 0
            while i + 16 <= count {
                let passed = load16(scores + i) .>= bound
                if any(passed) {
                    // The lanes' bits, or-reduced in halves (a short vector tree, no lane extracts).
                    let m16 = SIMD16<Int32>().replacing(with: bits, where: passed)
                    let m8 = m16.lowHalf | m16.highHalf
                    let m4 = m8.lowHalf | m8.highHalf
                    let m2 = m4.lowHalf | m4.highHalf
                    var mask = m2[0] | m2[1]
                    while mask != 0 {
                        let t = i &+ Int(mask.trailingZeroBitCount)
                        values[found] = scores[t]
                        indices[found] = Int32(truncatingIfNeeded: t)
                        found &+= 1
                        mask &= mask &- 1
                    }
                }
                i += 16
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

        /// The `k`-th largest value (0-based) of `a[0..<count]`, reordering `a` (quickselect
        /// with median-of-three pivots and branch-free partitions: the larger values to the
        /// front, then the values equal to the pivot, which ends the search when `k` falls
        /// among them, so equal values cost no extra rounds). `a` holds no NaN.
        static func kthLargest(_ a: UnsafeMutablePointer<Float>, count: Int, k: Int) -> Float {
            var lo = 0, hi = count, k = k
            while hi - lo > 1 {
                let x = a[lo], y = a[(lo + hi) / 2], z = a[hi - 1]
                let pivot = max(min(x, y), min(max(x, y), z))
                let greater = partition(a, lo, hi) { $0 > pivot }
                if k < greater - lo {
                    hi = greater
                    continue
                }
                let equal = partition(a, greater, hi) { $0 == pivot }
                if k < equal - lo { return pivot }
                k -= equal - lo
                lo = equal
            }
            return a[lo + k]
        }

        /// Moves the values of `a[lo..<hi]` that satisfy `front` to the front (branch-free);
        /// returns the end of that run.
        @inline(__always)
        static func partition(_ a: UnsafeMutablePointer<Float>, _ lo: Int, _ hi: Int,
                              _ front: (Float) -> Bool) -> Int {
            var store = lo
            for i in lo..<hi {
                let value = a[i]
                a[i] = a[store]
                a[store] = value
                store &+= front(value) ? 1 : 0
            }
            return store
        }
    }
}
