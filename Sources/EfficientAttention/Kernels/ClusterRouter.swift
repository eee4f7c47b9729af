/// Routing's selection kernel: for every cluster of one head, its `take` members among `n`
/// positions, the positions whose unit-normalised rows have the largest dot products with
/// the cluster's centroid (``TopKSelection``'s rule: ties to the smaller position, NaN
/// as −∞), listed in ascending order.
///
/// Scores are a GEMM on the micro-kernel (`C · X̂ᵀ`: a panel of `NR` positions against all
/// of a worker's clusters, positions in lanes), compared as they are computed with
/// per-cluster thresholds from a sample, so that the `K × N` scores are never stored; see
/// ``select(centroids:head:firstCluster:clusters:n:take:worker:into:)``.
///
/// Scratch: unit-normalised rows as packed panels, the sampled rows' panels, and per worker
/// a full score tile (`MR × N`, for short sequences and fallbacks), a panel's scores, the
/// sample scores and every cluster's candidate list.
///
/// - Complexity: `2 · n · K · D` FLOPs of scores and O(n · K) selection per side and head;
///   scratch O(n · D + workers · (MR · n + K / workers · capacity)) floats.
struct ClusterRouter {
    /// The problem of one head: `clusters` clusters, each selecting `queryTake` of
    /// `queryLength` queries and `keyTake` of `keyLength` keys, rows of `depth` elements.
    struct Sizes {
        var queryLength: Int, keyLength: Int
        var queryTake: Int, keyTake: Int
        var clusters: Int, depth: Int
    }

    let d: Int, stride: Int
    /// `K`, the clusters of a head.
    let clusters: Int
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

    private static func counts(_ s: Sizes, workers: Int)
        -> (floats: Int, perWorker: Int, capacity: Int, ints: Int, itemClusters: Int, sampleStride: Int) {
        let stride = TransposedRows.stride(max(s.queryLength, s.keyLength))
        let capacity = roundUp(max(TopKSelection.capacity(n: s.queryLength, take: s.queryTake),
                                   TopKSelection.capacity(n: s.keyLength, take: s.keyTake)), 16)
        let samples = max(TopKSelection.sampling(n: s.queryLength, take: s.queryTake)?.count ?? 0,
                          TopKSelection.sampling(n: s.keyLength, take: s.keyTake)?.count ?? 0)
        let sampleStride = roundUp(samples, MicroTile.nr)
        let itemClusters = roundUp((s.clusters + workers - 1) / workers, MicroTile.mr)
        let perWorker = roundUp(stride * (MicroTile.mr + 2) + MicroTile.mr * (MicroTile.nr + s.depth + sampleStride)
                                + 2 * itemClusters * (1 + capacity), 16)
        let shared = s.depth * (stride + sampleStride)
        return (shared + workers * perWorker, perWorker, capacity, s.clusters * (s.queryTake + s.keyTake),
                itemClusters, sampleStride)
    }

    /// Bytes for `sizes` with `workers`; the slot arrays ``queryRoutes`` and ``keyRoutes``
    /// included (only ``RoutingAttention/routes(query:key:)`` uses them).
    static func byteCount(_ sizes: Sizes, workers: Int) -> Int {
        WorkspaceCarver.bytes { _ = ClusterRouter(carving: &$0, sizes, workers: workers) }
    }

    /// Carves the router's buffers (from a zero-filled arena: padding lanes stay 0).
    init(carving carver: inout WorkspaceCarver, _ sizes: Sizes, workers: Int) {
        d = sizes.depth
        clusters = sizes.clusters
        stride = TransposedRows.stride(max(sizes.queryLength, sizes.keyLength))
        let c = ClusterRouter.counts(sizes, workers: workers)
        capacity = c.capacity
        perWorker = c.perWorker
        itemClusters = c.itemClusters
        sampleStride = c.sampleStride
        unitT = carver.take(c.floats, of: Float.self)
        sampleT = unitT + d * stride
        workerBase = sampleT + d * sampleStride
        queryRoutes = carver.take(c.ints, of: Int32.self)
        keyRoutes = queryRoutes + sizes.clusters * sizes.queryTake
    }

    /// Each cluster's `take` members among the `n` rows of `rows` (ascending) into
    /// `out[cluster · take ...]`, on `threads` threads: the rows are packed unit-normalised
    /// (``packUnit(_:start:count:n:)``), the samples copied (``packSamples(n:take:)``), then
    /// one work item per worker selects for whole micro-kernel row blocks of clusters, so a
    /// panel of positions is loaded once for all of an item's clusters.
    ///
    /// - Complexity: `2 · n · K · D` FLOPs and O(n · K) comparisons.
    func route(_ rows: PermutedBlockAttention.Rows, n: Int, take: Int, centroids: TensorView, head: Int, threads: Int,
               into out: UnsafeMutablePointer<Int32>) {
        let rowBlocks = (n + 255) / 256
        parallelForEach(items: rowBlocks, threads: threads) { item, _ in
            packUnit(rows, start: item * 256, count: min(256, n - item * 256), n: n)
        }
        packSamples(n: n, take: take)
        let items = (clusters + itemClusters - 1) / itemClusters
        parallelForEach(items: items, threads: threads) { item, worker in
            select(centroids: centroids, head: head, firstCluster: item * itemClusters,
                   clusters: min(itemClusters, clusters - item * itemClusters),
                   n: n, take: take, worker: worker, into: out)
        }
    }

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
    func packUnit(_ rows: PermutedBlockAttention.Rows, start: Int, count: Int, n: Int) {
        TransposedRows.packPanels(rows, start: start, count: count, depth: d, normalise: true, into: unitT, n: n)
    }

    /// Copies the sampled positions' packed rows (``TopKSelection/sampling(n:take:)``) from `unitT` into
    /// `sampleT`'s panels (lanes past the last sample zero).
    func packSamples(n: Int, take: Int) {
        guard let (step, samples) = TopKSelection.sampling(n: n, take: take) else { return }
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
    /// With sampling (``TopKSelection/sampling(n:take:)``, after ``packSamples(n:take:)``): the sampled
    /// scores give each cluster a threshold (the ``TopKSelection/firstRank(take:n:samples:)``-th
    /// largest); the scores are then computed a panel of `NR` positions at a time for all
    /// the item's clusters (the panel stays in L1) and those at or above the threshold
    /// are listed, so the `K × N` scores are never stored. A cluster with too few
    /// candidates or too many (a full list) falls back to its full row of scores (eight such
    /// clusters per micro-kernel pass) and ``TopKSelection/top(_:count:take:values:indices:into:)``,
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
        guard let (_, samples) = TopKSelection.sampling(n: n, take: take) else {
            for first in Swift.stride(from: firstCluster, to: firstCluster + clusters, by: MicroTile.mr) {
                let rows = min(MicroTile.mr, firstCluster + clusters - first)
                fullRows(operand(first, rows))
                for r in 0..<rows {
                    TopKSelection.top(w.tile + r * stride, count: n, take: take, values: w.values, indices: w.indices,
                                      into: out + (first + r) * take)
                }
            }
            return
        }
        // Thresholds from the sampled scores (NaN as −∞).
        let rank = TopKSelection.firstRank(take: take, n: n, samples: samples)
        for first in Swift.stride(from: firstCluster, to: firstCluster + clusters, by: MicroTile.mr) {
            let rows = min(MicroTile.mr, firstCluster + clusters - first)
            for panel in Swift.stride(from: 0, to: samples, by: nr) {
                microKernel(depth: d, a: operand(first, rows), b: sampleT + panel * d, ldb: nr,
                            c: w.sampleScores + panel, ldc: sampleStride, update: .overwrite)
            }
            for r in 0..<rows {
                let scores = w.sampleScores + r * sampleStride
                for t in 0..<samples { w.values[t] = scores[t].isNaN ? -.infinity : scores[t] }
                w.thresholds[first - firstCluster + r] = TopKSelection.kthLargest(w.values, count: samples, k: rank)
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
                    var mask = TopKSelection.passMask(scores, atLeast: bound) & inside
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
                    count = TopKSelection.append(mask, scores: scores, first: panel, values: values, indices: indices,
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
                    TopKSelection.top(w.tile + r * stride, count: n, take: take, values: w.values, indices: w.indices,
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
                    TopKSelection.finish(selecting: w.values, indices: w.listIndices + item * capacity, count: count,
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
}
