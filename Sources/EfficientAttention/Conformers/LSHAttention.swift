// Longer than the 250 lines a conformer aims at: LSH has ten parameters (bucket size,
// rounds, buckets or bucket factors, explicit rotations, shared QK, buckets crossed,
// causal, scale, seed) whose validation and documented reference take most of the file,
// and the backward's conformance (one file per conformer) plans with the same hashing;
// the hashing and sorting live in Kernels/BucketHash.swift, the backward's gather and
// scatter in Kernels/LSHBackward.swift.

/// Reformer attention (Kitaev et al. 2020): angular locality-sensitive hashing sorts the
/// positions into buckets; each chunk of the sorted order attends to itself and to the
/// previous chunk; several hash rounds are combined exactly by log-sum-exp.
///
/// ```
/// // naive reference (what this computes), for each b, h (query head), with
/// // k_j = q_j / |q_j| (shared QK, the default) or the given keys (separate keys):
/// for r in 0..<hashes:
///     bucket(x) = argmax([x R[h, r] ; −x R[h, r]])            // R[h, r]: D × nBuckets/2
///     // or, with bucketFactors [n_0, n_1, ...] (nBuckets = Π n_i, R[h, r]: D × Σ n_i/2):
///     //   rot = x R[h, r]; offset = 0; bucket = 0; weight = 1
///     //   for n_i in bucketFactors:
///     //       part = rot[offset ..< offset + n_i/2]
///     //       bucket += weight · argmax([part ; −part])     // first maximum
///     //       offset += n_i/2; weight *= n_i               // first factor least significant
///     order = positions sorted by (bucket, position)          // queries; keys likewise
///     chunk(i) = (index of i in order) / bucketSize
///     j visible to i in round r iff
///         chunk(j) == chunk(i) or chunk(j) == chunk(i) − 1 (chunk −1 is the last chunk)
///         and (attendAcrossBuckets or bucket(j) == bucket(i))
///         and (!causal or j <= i) and j < keyLengths[b]
///         and (!sharedQK or j != i)                           // the self rule, below
///     (o[r][i], lse[r][i]) = softmax attention of q_i over the visible keys
/// lse_i = log Σ_r exp(lse[r][i]),  o_i = Σ_r exp(lse[r][i] − lse_i) · o[r][i]
/// ```
/// The self rule (shared QK): a query never attends to itself unless it has no other
/// visible key in any round; it then attends to itself alone in every round, so
/// `o_i = v_i` and `lse_i = scale · |q_i| + log(hashes)` (zero queries have a zero key).
/// Rows with no visible key are 0 with `lse = −∞`. `Nq` must equal `Nk`; sequence
/// lengths need not be multiples of the bucket size (the last chunk is shorter).
///
/// Rotations have N(0, 1) entries, drawn for each head and round from its own
/// `SeededGenerator` derived from `seed` (``rotations(for:)`` returns them as
/// `[H, hashes, D, columns]`, `columns = nBuckets/2`, or `Σ n_i/2` with ``bucketFactors``),
/// or passed in explicitly (``rotations``). With separate
/// keys, query head `h` hashes its keys (key head `h / (H / Hkv)`) with its own rotations.
///
/// This file plans; kernels compute: ``BucketHash`` hashes (a small GEMM on the fused
/// micro-kernel ``microKernelExtremes(depth:a:b:ldb:scan:)``) and sorts by bucket (a
/// stable counting sort, O(N)); ``PermutedBlockAttention`` gathers the chunks, which attend with
/// the tiled softmax kernel (query tiles of one chunk, keys of the chunk and the previous
/// one).
///
/// Factorised hashing (``bucketFactors``) is the rule of trax and Hugging Face's Reformer
/// for a `num_buckets` list: the same buckets from the same rotations. It makes hashing
/// cost `Σ n_i` instead of `Π n_i` columns, which keeps the default `nBuckets ≈ N / 64`
/// from turning hashing quadratic. It is automatic: when neither a bucket count, factors
/// nor rotations are given and the default count `n` exceeds ``factorisationThreshold``
/// (512: there one round's hashing, `N · D · n` FLOPs, would pass its attention at
/// D = 64), the buckets are the two even factors `[a, b]`, `a = ⌈√n⌉` and
/// `b = ⌈n / a⌉` each rounded up to even (`a · b ≥ n`), so hashing grows like `N √N`
/// (Hugging Face switches likewise, to two powers of two, past
/// `2 · max(√(max_position_embeddings / chunk_length), chunk_length)` buckets).
///
/// - Complexity: per head, `hashes · Nq · (2·bucketSize) · 2·(D + Dv)` FLOPs of
///   attention plus `hashes · N · D · 2·columns` FLOPs of hashing (`2·columns = nBuckets`,
///   or `Σ n_i` with ``bucketFactors``; twice with separate keys); workspace
///   O(N · (D + Dv) + nBuckets) for one round of each head in flight (one per thread while
///   they fit in the L3, else one).
public struct LSHAttention: KernelWidening, ModifiableAttention {
    /// Chunk length of the sorted order (default 64). At least 1.
    public var bucketSize: Int
    /// Hash rounds (default 4). At least 1.
    public var hashes: Int
    /// Buckets per round, even and at least 2; `nil` means the product of ``bucketFactors``
    /// when given, else `⌈N / bucketSize⌉` rounded up to an even number (at least 2), or
    /// twice the last extent of explicit rotations.
    public var bucketCount: Int?
    /// Factorised hashing (trax / Hugging Face `num_buckets = [n_0, n_1, ...]`): each factor
    /// even and at least 2, `nBuckets = Π n_i` (equal to ``bucketCount`` if both are given),
    /// rotations of `Σ n_i/2` columns; bucket `b_0 + n_0·b_1 + n_0·n_1·b_2 + ...` with `b_i`
    /// the argmax of `[rot_i ; −rot_i]` over factor `i`'s columns. `nil` (the default) or
    /// `[n]` is the unfactorised rule with `n` buckets.
    public var bucketFactors: [Int]?
    /// Default bucket counts above this are factorised automatically (see the type's
    /// documentation); `nil` never factorises (the unfactorised rule at every length).
    public var factorisationThreshold: Int?
    /// Keys are the unit-normalised queries (the `key` argument is then only shape-checked).
    public var sharedQK: Bool
    /// Keys of other buckets within the attended chunks are visible too.
    public var attendAcrossBuckets: Bool
    /// Key `j` is visible to query `i` only if `j <= i` (original positions).
    public var causal: Bool
    /// Score scale; `nil` means `1 / sqrt(D)`. Must be finite.
    public var scale: Float?
    /// Seed of the random rotations.
    public var seed: UInt64
    /// Explicit rotations `[H, hashes, D, columns]` (finite), replacing the seeded ones:
    /// `columns = nBuckets / 2`, or `Σ n_i / 2` with ``bucketFactors``.
    public var rotations: Tensor?
    /// Soft-capping, ALiBi, an additive bias `[B or 1, H or 1, N, N]` and sinks
    /// (``ScoreModifiers``); none by default. Each scored pair is modified at its original
    /// positions `(i, j)` in every round that scores it, as is the self rule's score
    /// (`scale · |q_i|`, key `i`); the sinks join the rounds' merged softmax once.
    public var modifiers = ScoreModifiers()
    /// The last plan built, for calls with the same settings and shape (no arrays per call).
    private let plans = PlanCache<PlanKey, Plan>()

    /// Everything the plan depends on.
    private struct PlanKey: Equatable {
        var bucketSize: Int, hashes: Int, bucketCount: Int?, bucketFactors: [Int]?, factorisationThreshold: Int?
        var sharedQK: Bool, attendAcrossBuckets: Bool, causal: Bool, rotationColumns: Int?
        var queryLength: Int, headDim: Int, valueDim: Int
    }

    /// The permuted-block layout and the bucket factors of a length.
    private struct Plan {
        let layout: PermutedBlockAttention.Layout
        let factors: [Int]
    }

    public init(bucketSize: Int = 64, hashes: Int = 4, bucketCount: Int? = nil, sharedQK: Bool = true,
                attendAcrossBuckets: Bool = false, causal: Bool = false, scale: Float? = nil,
                seed: UInt64 = 0, rotations: Tensor? = nil, bucketFactors: [Int]? = nil,
                factorisationThreshold: Int? = LSHAttention.defaultFactorisationThreshold) {
        self.bucketSize = bucketSize
        self.hashes = hashes
        self.bucketCount = bucketCount
        self.sharedQK = sharedQK
        self.attendAcrossBuckets = attendAcrossBuckets
        self.causal = causal
        self.scale = scale
        self.seed = seed
        self.rotations = rotations
        self.bucketFactors = bucketFactors
        self.factorisationThreshold = factorisationThreshold
    }

    /// Default bucket counts above 512 are factorised.
    public static let defaultFactorisationThreshold = 512

    public var name: String { "lsh" }

    /// Largest sequence length (positions are stored as 32-bit integers).
    public static let maxLength = 1 << 30

    /// The number of buckets used for sequences of `length` positions.
    ///
    /// - Complexity: O(1).
    public func buckets(forLength length: Int) -> Int {
        if let bucketCount { return bucketCount }
        if let bucketFactors { return BucketHash.product(bucketFactors) }
        if let rotations { return 2 * rotations.shape[3] }
        if let automatic = automaticFactors(forLength: length) { return automatic[0] * automatic[1] }
        return defaultBuckets(forLength: length)
    }

    /// The bucket factors used for sequences of `length` positions: ``bucketFactors``, the
    /// automatic two factors, or the single factor ``buckets(forLength:)``.
    ///
    /// - Complexity: O(factors).
    public func factors(forLength length: Int) -> [Int] {
        bucketFactors ?? automaticFactors(forLength: length) ?? [buckets(forLength: length)]
    }

    /// `⌈N / bucketSize⌉` rounded up to even, at least 2: the unfactorised default.
    private func defaultBuckets(forLength length: Int) -> Int {
        let chunks = (length + max(1, bucketSize) - 1) / max(1, bucketSize)
        return max(2, roundUp(chunks, 2))
    }

    /// `[a, b]` when the default count passes ``factorisationThreshold`` and nothing
    /// explicit fixes the buckets, else `nil`.
    private func automaticFactors(forLength length: Int) -> [Int]? {
        guard bucketCount == nil, bucketFactors == nil, rotations == nil, let threshold = factorisationThreshold
        else { return nil }
        let n = defaultBuckets(forLength: length)
        guard n > threshold else { return nil }
        var a = Int(Double(n).squareRoot())
        while a * a < n { a += 1 }
        a = roundUp(a, 2)
        return [a, roundUp(ceilDiv(n, a), 2)]
    }

    /// Most buckets ``bucketFactors`` may give (the sort's counters take 4 bytes each).
    public static let maxFactorisedBuckets = 1 << 24

    public func validate(_ shape: AttentionShape) throws {
        try shape.check()
        try shape.checkHeadDims(limit: DenseAttention.maxHeadDim, variant: "LSH attention")
        try checkScale(scale)
        guard bucketSize >= 1 else {
            throw AttentionError.invalidParameter("LSH bucketSize must be at least 1, got \(bucketSize)")
        }
        guard hashes >= 1 else {
            throw AttentionError.invalidParameter("LSH hashes (rounds) must be at least 1, got \(hashes)")
        }
        if let factorisationThreshold, factorisationThreshold < 2 {
            throw AttentionError.invalidParameter(
                "LSH factorisationThreshold must be at least 2 (or nil), got \(factorisationThreshold)")
        }
        try checkLimit(bucketSize, "bucketSize", variant: "LSH attention")
        try checkLimit(hashes, "hashes", variant: "LSH attention")
        if let bucketCount, bucketCount > LSHAttention.maxFactorisedBuckets {
            throw AttentionError.invalidParameter(
                "LSH bucketCount must be at most \(LSHAttention.maxFactorisedBuckets), got \(bucketCount) "
                + "(the counting sort keeps one counter per bucket)")
        }
        guard shape.queryLength == shape.keyLength else {
            throw AttentionError.unsupported(
                "LSH attention needs queryLength == keyLength (chunks pair queries with keys), got \(shape.queryLength) and \(shape.keyLength)")
        }
        guard shape.queryLength <= LSHAttention.maxLength else {
            throw AttentionError.unsupported("LSH attention supports sequences up to \(LSHAttention.maxLength), got \(shape.queryLength)")
        }
        if let bucketFactors {
            guard !bucketFactors.isEmpty else {
                throw AttentionError.invalidParameter("LSH bucketFactors must list at least one factor, got []")
            }
            for factor in bucketFactors where factor < 2 || factor % 2 != 0 {
                throw AttentionError.invalidParameter(
                    "LSH bucketFactors must each be even and at least 2, got \(factor) in \(bucketFactors)")
            }
            let product = BucketHash.product(bucketFactors)
            guard product <= LSHAttention.maxFactorisedBuckets else {
                throw AttentionError.invalidParameter(
                    "LSH bucketFactors \(bucketFactors) give more than \(LSHAttention.maxFactorisedBuckets) buckets "
                    + "(the counting sort keeps one counter per bucket)")
            }
            if let bucketCount, bucketCount != product {
                throw AttentionError.invalidParameter(
                    "LSH bucketCount \(bucketCount) must equal the product \(product) of bucketFactors \(bucketFactors)")
            }
        }
        let factors = plan(shape).factors
        let n = BucketHash.product(factors)
        guard n >= 2, n % 2 == 0 else {
            throw AttentionError.invalidParameter("LSH bucketCount (nBuckets) must be even and at least 2, got \(n)")
        }
        if let rotations {
            let expected = [shape.heads, hashes, shape.headDim, BucketHash.columns(factors)]
            guard rotations.shape == expected else {
                let extent = bucketFactors == nil ? "nBuckets/2" : "Σ bucketFactors/2"
                throw AttentionError.shapeMismatch(
                    "LSH rotations must be [heads, hashes, headDim, \(extent)] = \(expected), got \(rotations.shape)")
            }
            guard rotations.elements.allSatisfy(\.isFinite) else {
                throw AttentionError.invalidParameter("LSH rotations must be finite (found NaN or infinity)")
            }
        }
        // The per-head scratch (rotations, bucket arrays) and the workspace, checked before
        // any of their sizes is computed with unchecked arithmetic.
        let columns = BucketHash.columns(factors)
        try checkAllocation(bytes: checkedProduct(shape.heads, hashes, shape.headDim,
                                                  roundUp(columns, MicroTile.nr)).flatMap { checkedProduct($0, 4) },
                            option: "LSH rotations [heads, hashes, headDim, nBuckets/2]")
        try checkAllocation(bytes: checkedProduct(2 * 4, hashes, shape.queryLength),
                            option: "LSH bucket arrays (2 · hashes · N)")
        try checkAllocation(bytes: workspaceBytes(shape, threads: maxThreadCount), option: "LSH workspace")
    }

    /// The rotations a call on `shape` uses: the explicit ones, or the seeded
    /// `[H, hashes, D, columns]` standard normal values (see ``BucketHash/seededRotation(seed:head:round:hashes:d:half:store:)``), with
    /// `columns = nBuckets/2`, or `Σ n_i/2` with ``bucketFactors``.
    ///
    /// - Complexity: O(H · hashes · D · columns).
    public func rotations(for shape: AttentionShape) throws -> Tensor {
        try validate(shape)
        if let rotations { return rotations }
        let half = BucketHash.columns(factors(forLength: shape.queryLength))
        let d = shape.headDim
        var data = [Float](repeating: 0, count: shape.heads * hashes * d * half)
        data.withUnsafeMutableBufferPointer { buffer in
            for h in 0..<shape.heads { for r in 0..<hashes {
                let out = buffer.baseAddress! + (h * hashes + r) * d * half
                BucketHash.seededRotation(seed: seed, head: h, round: r, hashes: hashes, d: d, half: half) { c, t, x in
                    out[c * half + t] = x
                }
            } }
        }
        return try Tensor(shape: [shape.heads, hashes, d, half], data: data)
    }

    public func cost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        let threads = try threadCount(threads)
        try validate(shape)
        let half = BucketHash.columns(plan(shape).factors)
        let heads = shape.batch * shape.heads
        guard let pairs = checkedProduct([LSHAttention.chunkPairs(length: shape.queryLength, chunk: bucketSize), hashes]),
              checkedProduct([pairs, heads]) != nil else {
            throw AttentionError.sizeOverflow("LSH scored pairs (hashes × chunk pairs × B·H) overflow Int")
        }
        let flops = Double(heads) * 2 * Double(pairs) * Double(shape.headDim + shape.valueDim)
        return AttentionCost(flops: flops + hashingFlops(shape, columns: half),
                             workspaceBytes: workspaceBytes(shape, threads: threads), scoredPairs: heads * pairs)
    }

    /// FLOPs of hashing every head's rows (twice with separate keys) in every round.
    private func hashingFlops(_ shape: AttentionShape, columns half: Int) -> Double {
        let hashedRows = shape.queryLength * (sharedQK ? 1 : 2) * hashes
        return Double(shape.batch * shape.heads) * 2 * Double(hashedRows) * Double(shape.headDim) * Double(half)
    }

    /// The workspace of a call on `shape` with `threads` workers (at most ``maxThreadCount``):
    /// one permuted-block workspace and one scratch per head in flight.
    private func workspaceBytes(_ shape: AttentionShape, threads: Int) -> Int {
        let (layout, factors) = plan(shape)
        return PermutedBlockAttention.workspaceBytes(
            layout, heads: shape.batch * shape.heads, threads: threads, keyLength: shape.keyLength,
            cacheBytes: LSHAttention.cacheBytes
        ) { BucketHash.byteCount(shape, hashes: hashes, factors: factors, workers: $0) }
    }

    /// How much of the shared cache the heads in flight may take
    /// (``PermutedBlockAttention/split(heads:threads:bytesPerHead:cacheBytes:)``): half of it.
    /// Every round revisits a head's rows of q, v and the output in a new random order, so
    /// they must stay cached from round to round while other tenants use the same L3; at
    /// N = 16K (D = 64, 13 MiB a head) one head at a time runs on every thread.
    static let cacheBytes = PermutedBlockAttention.sharedCacheBytes / 2

    /// The memory one head touches (``PermutedBlockAttention/split(heads:threads:bytesPerHead:cacheBytes:)``).
    private func headBytes(_ shape: AttentionShape, _ layout: PermutedBlockAttention.Layout, factors: [Int]) -> Int {
        PermutedBlockAttention.headBytes(layout, keyLength: shape.keyLength,
                                   scratchBytes: BucketHash.byteCount(shape, hashes: hashes, factors: factors, workers: 1))
    }

    /// Query/key pairs one round examines: each chunk against itself and its predecessor.
    static func chunkPairs(length n: Int, chunk: Int) -> Int {
        let chunks = (n + chunk - 1) / chunk
        var pairs = 0
        for c in 0..<chunks {
            let size = min(chunk, n - c * chunk)
            let previous = (c + chunks - 1) % chunks
            pairs += size * (size + (previous == c ? 0 : min(chunk, n - previous * chunk)))
        }
        return pairs
    }

    private func plan(_ shape: AttentionShape) -> (PermutedBlockAttention.Layout, factors: [Int]) {
        let key = PlanKey(bucketSize: bucketSize, hashes: hashes, bucketCount: bucketCount, bucketFactors: bucketFactors,
                          factorisationThreshold: factorisationThreshold, sharedQK: sharedQK,
                          attendAcrossBuckets: attendAcrossBuckets, causal: causal, rotationColumns: rotations?.shape[3],
                          queryLength: shape.queryLength, headDim: shape.headDim, valueDim: shape.valueDim)
        let plan = plans.plan(for: key) {
            let (layout, factors) = makePlan(shape)
            return Plan(layout: layout, factors: factors)
        }
        return (plan.layout, plan.factors)
    }

    private func makePlan(_ shape: AttentionShape) -> (PermutedBlockAttention.Layout, factors: [Int]) {
        let n = shape.queryLength
        let layout = PermutedBlockAttention.Layout(
            rounds: hashes, queryLength: n, querySlots: n, keySlots: n,
            queryBlockSize: bucketSize, keyBlockSize: bucketSize, blocks: (n + bucketSize - 1) / bucketSize,
            visibility: BlockVisibility(reach: .withPreviousBlock, sameBucket: !attendAcrossBuckets,
                                        causalOffset: causal ? 0 : nil, notSelf: sharedQK),
            sharedKeys: sharedQK, combine: .logSumExp, headDim: shape.headDim, valueDim: shape.valueDim)
        return (layout, factors(forLength: n))
    }

    /// The bucket of every query and key in every round: `query[((b·H + h)·hashes + r)·N + i]`
    /// and `key` likewise (keys hashed for query head `h`; equal to `query` with shared QK).
    ///
    /// - Complexity: O(B · H · hashes · N · D · columns), single-threaded (`columns =
    ///   nBuckets / 2`, or `Σ n_i / 2` with ``bucketFactors``).
    public func bucketIDs(query: Tensor, key: Tensor) throws -> (query: [Int], key: [Int]) {
        let shape = try AttentionShape(query: query, key: key, value: key)
        try validate(shape)
        let n = shape.queryLength, (_, factors) = plan(shape)
        let rotations = try self.rotations(for: shape)
        var queryBuckets = [Int](), keyBuckets = [Int]()
        WorkspaceArena.withWorkspaces(workers: 1, zeroed: true, layout: {
            BucketHash(carving: &$0, shape, hashes: hashes, factors: factors, workers: 1)
        }) { scratches in
        let scratch = scratches[0]
        query.withView { q in key.withView { k in rotations.withView { rot in
            for b in 0..<shape.batch { for h in 0..<shape.heads {
                hashHead(scratch, rotations: rot, head: h, queries: PermutedBlockAttention.Rows(view: q, b: b, h: h),
                         keys: PermutedBlockAttention.Rows(view: k, b: b, h: h / shape.groupSize), threads: 1)
                for r in 0..<hashes {
                    queryBuckets += (0..<n).map { Int(scratch.queryBuckets[r * n + $0]) }
                    keyBuckets += (0..<n).map { Int((sharedQK ? scratch.queryBuckets : scratch.keyBuckets)[r * n + $0]) }
                }
            } }
        } } }
        }
        return (queryBuckets, keyBuckets)
    }

    /// `body` with the explicit rotations' view, or `nil` (seeded rotations, drawn per head
    /// by ``hashHead(_:rotations:head:queries:keys:threads:)``).
    private func withRotations(_ body: (TensorView?) -> Void) {
        if let rotations { rotations.withView { body($0) } } else { body(nil) }
    }

    /// Head `head`'s rotations into `scratch` (packed from `rot`, or drawn from the seed),
    /// then the buckets of every row of `queries` (and, with separate keys, of `keys`) in
    /// every round, by blocks of rows on `threads` threads.
    private func hashHead(_ scratch: BucketHash, rotations rot: TensorView?, head h: Int,
                          queries: PermutedBlockAttention.Rows, keys: PermutedBlockAttention.Rows, threads: Int) {
        let n = scratch.n, d = scratch.d, half = scratch.half, hashes = self.hashes, seed = self.seed
        if let rot {
            scratch.packRotations(rot, head: h, hashes: hashes, d: d)
        } else {
            parallelForEach(items: hashes, threads: threads) { r, _ in
                BucketHash.seededRotation(seed: seed, head: h, round: r, hashes: hashes, d: d,
                                          half: half) { c, t, x in scratch.rotations[scratch.packed(r, c, t)] = x }
            }
        }
        let rowBlock = BucketHash.rowBlock, sharedQK = self.sharedQK
        parallelForEach(items: ceilDiv(n, rowBlock), threads: threads) { item, worker in
            let start = item * rowBlock, count = min(rowBlock, n - start)
            scratch.hash(queries, start: start, count: count, worker: worker, into: scratch.queryBuckets)
            if !sharedQK {
                scratch.hash(keys, start: start, count: count, worker: worker, into: scratch.keyBuckets)
            }
        }
    }

    /// Round `r`'s sorted order (by bucket, then position) and the slots' buckets, of the
    /// queries and of the keys (a copy of the queries' with shared QK).
    private func sortRound(_ scratch: BucketHash, round r: Int, threads: Int,
                           queryPosition: UnsafeMutablePointer<Int32>, queryBucket: UnsafeMutablePointer<Int32>,
                           keyPosition: UnsafeMutablePointer<Int32>, keyBucket: UnsafeMutablePointer<Int32>) {
        let n = scratch.n
        parallelForEach(items: sharedQK ? 1 : 2, threads: threads) { side, worker in
            if side == 0 {
                scratch.sort(scratch.queryBuckets + r * n, count: n, worker: worker,
                             positions: queryPosition, buckets: queryBucket)
            } else {
                scratch.sort(scratch.keyBuckets + r * n, count: n, worker: worker,
                             positions: keyPosition, buckets: keyBucket)
            }
        }
        if sharedQK {
            keyPosition.update(from: queryPosition, count: n)
            keyBucket.update(from: queryBucket, count: n)
        }
    }

    /// 16-bit queries, keys and values are widened as the hashing packs them and as each
    /// round's gather copies them; a 16-bit output is staged in `Float` (the rounds merge
    /// into it), a part of the heads at a time (``ViewCall/forEachOutputPart(_:)``).
    func stagedOperands(_ shape: AttentionShape) -> (query: Bool, output: Bool) { (false, true) }

    func stagedOutputElements(_ shape: AttentionShape) -> Int { MergedOutputStaging.elements(shape, groups: false) }

    public func attend(query: ActivationView, key: ActivationView, value: ActivationView,
                       output: MutableActivationView, logSumExp: MutableStridedView?,
                       keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws {
        try attend(query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                   keyLengths: keyLengths, workspace: workspace, threads: threads, routes: nil)
    }

    /// The forward that also hands back its buckets, for
    /// ``gradients(query:key:value:result:outputGradient:routes:keyLengths:threads:)`` (which
    /// then sorts them instead of hashing again): the same result as
    /// ``Attention/attend(query:key:value:keyLengths:threads:)``, bit for bit.
    ///
    /// - Complexity: the forward's, plus copying `B · H · hashes · N` buckets (twice with
    ///   separate keys).
    public func attendReturningRoutes(query: Tensor, key: Tensor, value: Tensor, keyLengths: [Int]? = nil,
                                      threads: Int? = nil) throws -> (result: AttentionResult, routes: LSHRoutes) {
        let shape = try AttentionShape(query: query, key: key, value: value)
        try validate(shape)
        let count = shape.batch * shape.heads * hashes * shape.queryLength
        try checkAllocation(bytes: checkedProduct([count, sharedQK ? 4 : 8]), option: "LSH routes")
        var queryRoutes = [Int32](repeating: 0, count: count)
        var keyRoutes = [Int32](repeating: 0, count: sharedQK ? 0 : count)
        let result = try queryRoutes.withUnsafeMutableBufferPointer { qr in
            try keyRoutes.withUnsafeMutableBufferPointer { kr in
                try allocatingCall(query: query, key: key, value: value) { q, k, v, o, lse in
                    try attend(query: ActivationView(q), key: ActivationView(k), value: ActivationView(v),
                               output: MutableActivationView(o), logSumExp: lse, keyLengths: keyLengths,
                               workspace: nil, threads: threads, routes: (qr.baseAddress!, kr.baseAddress))
                }
            }
        }
        return (result, LSHRoutes(batch: shape.batch, heads: shape.heads, hashes: hashes, length: shape.queryLength,
                                  buckets: buckets(forLength: shape.queryLength), query: queryRoutes, key: keyRoutes))
    }

    /// The forward, copying each head's buckets of every round to `routes` (head
    /// `b · H + h` at `(b · H + h) · hashes · N`; keys only with separate keys) when given.
    private func attend(query: ActivationView, key: ActivationView, value: ActivationView,
                        output: MutableActivationView, logSumExp: MutableStridedView?,
                        keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?,
                        routes: (query: UnsafeMutablePointer<Int32>, key: UnsafeMutablePointer<Int32>?)?) throws {
        try withCheckedCall(query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                            keyLengths: keyLengths, workspace: workspace, threads: threads, scale: scale,
                            modifiers: modifiers) { call in
        let (shape, scale, threads) = (call.shape, call.scale, call.threadCount)
        let (layout, factors) = plan(shape)
        let n = shape.queryLength, hashes = self.hashes, sharedQK = self.sharedQK
        // Every row is written by the first round's combine: no zero fill.
        let (q, k, v, l) = (call.q, call.k, call.v, call.lse)
        withRotations { rot in
        // The rounds merge into the output: a 16-bit one is formed in `Float`, part by part.
        call.forEachOutputPart { items, heads, output in
            // Heads side by side (one workspace and scratch per head worker), each head's
            // phases on `inner` threads.
            PermutedBlockAttention.forEachHead(
                items: items, heads: heads, threads: threads, layout: layout,
                bytesPerHead: headBytes(shape, layout, factors: factors), cacheBytes: LSHAttention.cacheBytes,
                makeScratch: { BucketHash(carving: &$0, shape, hashes: hashes, factors: factors, workers: $1) }
            ) { b, h, inner, space, scratch in
                let hk = h / shape.groupSize
                let queries = PermutedBlockAttention.Rows(view: q, b: b, h: h)
                // Shared keys are normalised from the gathered queries by the pipeline.
                let keys = sharedQK ? queries : PermutedBlockAttention.Rows(view: k, b: b, h: hk)
                hashHead(scratch, rotations: rot, head: h, queries: queries, keys: keys, threads: inner)
                if let routes {
                    let start = (b * shape.heads + h) * hashes * n
                    (routes.query + start).update(from: scratch.queryBuckets, count: hashes * n)
                    if let keyRoutes = routes.key, !sharedQK {
                        (keyRoutes + start).update(from: scratch.keyBuckets, count: hashes * n)
                    }
                }
                for r in 0..<hashes {
                    // Sort by (bucket, position), then attend and merge this round.
                    sortRound(scratch, round: r, threads: inner, queryPosition: space.queryPosition,
                              queryBucket: space.queryBucket, keyPosition: space.keyPosition, keyBucket: space.keyBucket)
                    PermutedBlockAttention.attendRound(
                        layout, round: r, space: space, scale: scale, threads: inner,
                        query: queries, key: keys, value: PermutedBlockAttention.Rows(view: v, b: b, h: hk),
                        keyLength: keyLengths?[b] ?? n, output: output(b, h), lse: l, b: b, h: h,
                        modifiers: call.modifiers)
                }
            }
        }
        }
        }
    }
}

// MARK: - Backward

extension LSHAttention: OperandWideningBackward {
    /// Each round's attention backward reads its bucket-sorted rows, gathered (and widened)
    /// into `Float` by ``PermutedBlockAttention``, never the caller's operands.
    static var widensInTiledBackward: Bool { false }

    /// Heads run one after another: 16-bit gradients are summed a head at a time
    /// (``forEachHeadSummingGradients(_:dQ:dK:dV:_:)``), none staged whole.
    static func stagedGradients(_ shape: AttentionShape) -> (query: Bool, keys: Bool) { (false, false) }

    static func gradientSumBytes(_ shape: AttentionShape, threads: Int?, dQuery: ActivationPrecision,
                                 dKey: ActivationPrecision, dValue: ActivationPrecision) -> Int {
        headGradientBytes(shape, dQuery: dQuery, dKey: dKey, dValue: dValue).total
    }

    /// 16-bit operands are widened by the hashing and each round's gather (the self rule's
    /// `dO` row element by element).
    func widenedOperandsBackward(_ shape: AttentionShape, threads: Int, q: TensorView, k: TensorView,
                                 v: TensorView, o: TensorView, lse: TensorView, dO: TensorView,
                                 dQ: MutableTensorView, dK: MutableTensorView, dV: MutableTensorView,
                                 keyLengths: [Int]?) throws {
        try backward(shape, scale: scale ?? 1 / Float(shape.headDim).squareRoot(), threads: threads, q: q, k: k,
                     v: v, o: o, l: lse, dO: dO, dQ: dQ, dK: dK, dV: dV, keyLengths: keyLengths, routes: nil)
    }

    /// The gradients through the forward with its buckets held fixed (KernelDocs/LSH.md,
    /// "Backward"): the buckets and sorted orders are recomputed from the same rotations
    /// (seeded or explicit), and each round's sorted slots run the flash backward
    /// (``LSHBackward``, ``TiledSoftmaxBackward``) with the probabilities of the merged
    /// log-sum-exp, their gradients added back to the original rows round after round. A
    /// pair seen in several rounds counts as often as the forward counts it.
    ///
    /// ```
    /// // naive reference, for each b, h (hk = h / (H / Hkv)), with the forward's rounds
    /// // (visible pairs (r, i, j), the self rule's pairs included) and k_j = q_j / |q_j|
    /// // (shared QK) or the given keys:
    /// P[r, i, j] = exp(scale · q_i · k_j − lse_i)          (lse, o: the forward's merged rows)
    /// dS[r, i, j] = P[r, i, j] · (dO_i · v_j − dO_i · o_i)
    /// dQ[i]   += scale · dS · k_j,   dk_j += scale · dS · q_i,   dV[hk, j] += P · dO_i
    /// shared QK:  dQ[j] += (dk_j − k_j (k_j · dk_j)) / |q_j|   (0 for a zero row; dK = 0)
    /// else:       dK[hk, j] += dk_j
    /// ```
    /// A query under the self rule (`o_i = v_i`) gives `dV[hk, i] += dO_i` and nothing else.
    ///
    /// - Complexity: per head and round, the flash backward on the round's `N` slots (the
    ///   forward's pairs, `6·D + 4·Dv` FLOPs each; the cost model counts `2.5 ×` the
    ///   forward's attention FLOPs) and the hashing once more; heads one after another,
    ///   every phase on all threads; workspace O(N · (D + Dv)) for the head in flight plus
    ///   the hashing scratch and the flash backward's per-thread buffers
    ///   (``backwardCost(_:threads:)``), nothing of order `N²`.
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
                         o: output.kernel, l: logSumExp.kernel, dO: outputGradient.kernel, dQ: dQuery.kernel,
                         dK: dKey.kernel, dV: dValue.kernel, keyLengths: keyLengths, routes: nil)
        }
    }

    /// The gradients through ``attendReturningRoutes(query:key:value:keyLengths:threads:)``
    /// with its buckets (`routes`) instead of hashing again: the same gradients as
    /// ``gradients(query:key:value:result:outputGradient:keyLengths:threads:)``, bit for bit.
    ///
    /// - Throws: what the gradients throw without routes, and
    ///   ``AttentionError/shapeMismatch(_:)`` naming `routes` when they belong to another
    ///   problem (batch, heads, rounds, length, bucket count, shared or separate keys).
    /// - Complexity: the backward's, without the hashing's FLOPs.
    public func gradients(query: Tensor, key: Tensor, value: Tensor, result: AttentionResult, outputGradient: Tensor,
                          routes: LSHRoutes, keyLengths: [Int]? = nil,
                          threads: Int? = nil) throws -> AttentionGradients {
        let shape = try AttentionShape(query: query, key: key, value: value)
        try validate(shape)
        let theirs = [routes.batch, routes.heads, routes.hashes, routes.length, routes.buckets, routes.key.isEmpty ? 1 : 0]
        let ours = [shape.batch, shape.heads, hashes, shape.queryLength, buckets(forLength: shape.queryLength),
                    sharedQK ? 1 : 0]
        guard theirs == ours else {
            throw AttentionError.shapeMismatch(
                "routes are of [B, H, hashes, N, nBuckets, shared keys] = \(theirs), this problem's are \(ours)")
        }
        return try withParameterGradientCall(query: query, key: key, value: value, result: result,
                                             outputGradient: outputGradient, keyLengths: keyLengths, threads: threads,
                                             scale: scale) { call in
            try backward(call.shape, scale: call.scale, threads: call.threads, q: call.q, k: call.k, v: call.v,
                         o: call.o, l: call.lse, dO: call.dO, dQ: call.dQ, dK: call.dK, dV: call.dV,
                         keyLengths: keyLengths, routes: routes)
        }
    }

    /// The backward on the checked call's kernel views (`dQ` zero-filled), hashing again
    /// when `routes` is `nil`, through the score modifiers (``modifiers``) when set.
    private func backward(_ shape: AttentionShape, scale: Float, threads: Int, q: TensorView, k: TensorView,
                          v: TensorView, o: TensorView, l: TensorView, dO: TensorView, dQ: MutableTensorView,
                          dK: MutableTensorView, dV: MutableTensorView, keyLengths: [Int]?, routes: LSHRoutes?) throws {
        try checkAllocation(bytes: backwardWorkspaceBytes(shape, threads: threads), option: "LSH backward workspace")
        let (layout, factors) = plan(shape)
        let n = shape.queryLength, sharedQK = self.sharedQK, sinks = modifiers.sinks != nil
        try withModifierBackward(shape) { modifiers, biasGradient in
        WorkspaceArena.withWorkspaces(workers: 1, zeroed: true, layout: { carver in
            backwardLayout(&carver, shape, factors: factors, threads: threads)
        }) { spaces in
            let (scratch, space) = spaces[0]
            let mask = space.mask(blockSize: bucketSize, visibility: layout.visibility)
            withRotations { rot in
                // dK, dV are sums over the rounds and the query heads of each group, from zero;
                // 16-bit gradients are summed a head at a time in `Float`.
                forEachHeadSummingGradients(shape, dQ: dQ, dK: dK, dV: dV) { b, h, dQ, dK, dV in
                    let hk = h / shape.groupSize, keyLength = keyLengths?[b] ?? n
                    let queries = PermutedBlockAttention.Rows(view: q, b: b, h: h)
                    let keys = sharedQK ? queries : PermutedBlockAttention.Rows(view: k, b: b, h: hk)
                    let outputGradients = PermutedBlockAttention.Rows(view: dO, b: b, h: h)
                    let values = PermutedBlockAttention.Rows(view: v, b: b, h: hk)
                    let outputs = PermutedBlockAttention.Rows(view: o, b: b, h: h)
                    let logSumExps = PermutedBlockAttention.Rows(view: l, b: b, h: h)
                    // The modifiers and the bias gradient of this head (stride 0 where the bias broadcasts).
                    let headModifiers = modifiers?.restricted(item: b, head: h)
                    let headBias = biasGradient.map { MutableTensorView(base: $0.row(b, h, 0), strides: $0.strides) }
                    if let routes {
                        let start = (b * shape.heads + h) * hashes * n
                        routes.query.withUnsafeBufferPointer {
                            scratch.queryBuckets.update(from: $0.baseAddress! + start, count: hashes * n)
                        }
                        if !sharedQK {
                            routes.key.withUnsafeBufferPointer {
                                scratch.keyBuckets.update(from: $0.baseAddress! + start, count: hashes * n)
                            }
                        }
                    } else {
                        hashHead(scratch, rotations: rot, head: h, queries: queries, keys: keys, threads: threads)
                    }
                    space.seen.update(repeating: 0, count: n)
                    for r in 0..<hashes {
                        sortRound(scratch, round: r, threads: threads, queryPosition: space.queryPosition,
                                  queryBucket: space.queryBucket, keyPosition: space.keyPosition,
                                  keyBucket: space.keyBucket)
                        LSHBackward.prepareRound(space, blockSize: bucketSize, keyLength: keyLength)
                        LSHBackward.addRound(
                            space, mask: mask, sharedKeys: sharedQK, scale: scale, threads: threads,
                            query: queries, key: keys, value: values, output: outputs, logSumExp: logSumExps,
                            outputGradient: outputGradients, dQ: dQ, dK: dK, dV: dV, b: b, h: h, hk: hk,
                            modifiers: modifiers?.gathered(item: b, head: h, .init(queries: space.queryPosition,
                                                                                    keys: space.keyPosition)),
                            biasGradient: headBias)
                        if sharedQK { LSHBackward.markSeen(space, mask: mask, threads: threads, modifiers: headModifiers) }
                    }
                    // The self rule: o_i = v_i for a valid query that saw no other key
                    // (with sinks, its share of the sink's softmax).
                    guard sharedQK else { return }
                    for i in 0..<min(keyLength, n) where space.seen[i] == 0 {
                        LSHBackward.addSelfRule(
                            i, rounds: hashes, headDim: shape.headDim, valueDim: shape.valueDim, scale: scale, sinks: sinks,
                            modifiers: headModifiers, query: queries, value: values, output: outputs,
                            logSumExp: logSumExps, outputGradient: outputGradients,
                            dQ: dQ.row(b, h, i), dQStride: dQ.strides[3], dV: dV.row(b, hk, i), dVStride: dV.strides[3],
                            biasGradient: headBias)
                    }
                }
            }
        }
        }
    }

    /// FLOPs: `2.5 ×` the forward's attention FLOPs plus its hashing once more; workspace:
    /// the hashing scratch, one head's gathered round and its gradients, and the flash
    /// backward's per-thread buffers on a round.
    public func backwardCost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        let threads = try threadCount(threads)
        let forward = try cost(shape, threads: threads)
        let hashing = hashingFlops(shape, columns: BucketHash.columns(plan(shape).factors))
        let bytes = backwardWorkspaceBytes(shape, threads: threads)
        try checkAllocation(bytes: bytes, option: "LSH backward workspace")
        return AttentionCost(flops: 2.5 * (forward.flops - hashing) + hashing, workspaceBytes: bytes,
                             scoredPairs: forward.scoredPairs)
    }

    /// The backward's arena: the hashing scratch for `threads` workers and one head's round.
    private func backwardLayout(_ carver: inout WorkspaceCarver, _ shape: AttentionShape, factors: [Int],
                                threads: Int) -> (BucketHash, LSHBackward.Workspace) {
        (BucketHash(carving: &carver, shape, hashes: hashes, factors: factors, workers: threads),
         LSHBackward.Workspace(carving: &carver, length: shape.queryLength, headDim: shape.headDim,
                               valueDim: shape.valueDim))
    }

    /// The backward's arena and the flash backward's workspace taken inside it.
    private func backwardWorkspaceBytes(_ shape: AttentionShape, threads: Int) -> Int {
        let factors = plan(shape).factors
        let arena = WorkspaceCarver.bytes { _ = backwardLayout(&$0, shape, factors: factors, threads: threads) }
        let round = AttentionShape(batch: 1, heads: 1, queryLength: shape.queryLength, keyLength: shape.queryLength,
                                   headDim: shape.headDim, valueDim: shape.valueDim)
        return WorkspaceArena.byteCount(sliceBytes: arena, slices: 1)
            + TiledSoftmaxBackward.workspaceBytes(shape: round, threads: threads, mask: PermutedRoundMask.self)
    }
}

/// The buckets of one LSH call (``LSHAttention/attendReturningRoutes(query:key:value:keyLengths:threads:)``),
/// which its backward (``LSHAttention/gradients(query:key:value:result:outputGradient:routes:keyLengths:threads:)``)
/// sorts instead of hashing again: every query's and (separate keys) key's bucket in every
/// round, per head.
public struct LSHRoutes: Sendable, Equatable {
    /// The problem they route: `B`, `H` (query heads), rounds, `N`, buckets per round.
    public let batch: Int, heads: Int, hashes: Int, length: Int, buckets: Int
    /// `query[((b · H + h) · hashes + r) · N + i]`: the bucket of query `i` in round `r`.
    let query: [Int32]
    /// The keys' buckets (hashed for query head `h`), laid out likewise; empty with shared QK.
    let key: [Int32]

    /// The bucket of every query of head `(batch, head)` in round `round` (``LSHAttention/bucketIDs(query:key:)``'s).
    public func queryBuckets(batch b: Int, head h: Int, round r: Int) -> [Int] {
        let start = ((b * heads + h) * hashes + r) * length
        return query[start..<(start + length)].map { Int($0) }
    }

    /// The bucket of every key for head `(batch, head)` in round `round` (the queries' with shared QK).
    public func keyBuckets(batch b: Int, head h: Int, round r: Int) -> [Int] {
        guard !key.isEmpty else { return queryBuckets(batch: b, head: h, round: r) }
        let start = ((b * heads + h) * hashes + r) * length
        return key[start..<(start + length)].map { Int($0) }
    }
}
