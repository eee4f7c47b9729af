// Issue 14, items 6–12: inputs that used to trap, abort in the allocator, hang or give
// NaN now throw an AttentionError naming the option (or work, for absurd thread counts and
// odd Transformer-XL head dimensions), and BigBird's random blocks are drawn in
// O(blocks · r) with the same blocks as before.

@_spi(Testing) @_spi(Benchmarking) import EfficientAttention
import Testing

@Suite("Robustness (issue 14)")
struct RobustnessTests {
    // MARK: 6. Integer overflow and Double-to-Int traps

    @Test("multi-query windows near Int.max throw instead of overflowing")
    func multiQueryHugeWindows() throws {
        let (q, k, v) = try randomQKV(heads: 1, queryLength: 3, headDim: 4, seed: 1)
        for (left, right) in [(Int.max - 1, 0), (0, Int.max - 1), (Int.max, Int.max), (lengthLimit + 1, nil)] {
            let attention = MultiQueryAttention(leftWindow: left, rightWindow: right)
            let name = left > lengthLimit ? "leftWindow" : "rightWindow"
            expectAttentionError(.invalidParameter, mentioning: [name, "at most"], "window \(left) \(String(describing: right))") {
                try attention.attend(query: q, key: k, value: v)
            }
            expectAttentionError(.invalidParameter, mentioning: [name], "cost") {
                try attention.cost(AttentionShape(heads: 1, queryLength: 3, headDim: 4))
            }
        }
        expectAttentionError(.invalidParameter, mentioning: ["decodeChunkLength", "at most"], "decodeChunkLength") {
            try MultiQueryAttention(decodeChunkLength: .max).attend(query: q, key: k, value: v)
        }
    }

    @Test("Transformer-XL memoryLength Int.max throws")
    func transformerXLHugeMemory() throws {
        let table = try Tensor.random(shape: [1, 1, 8, 4], seed: 2)
        let attention = TransformerXLAttention(memoryLength: .max, relativePositions: table,
                                               contentBias: [Float](repeating: 0, count: 4),
                                               positionBias: [Float](repeating: 0, count: 4))
        expectAttentionError(.invalidParameter, mentioning: ["memoryLength", "at most"], "validate") {
            try attention.validate(AttentionShape(heads: 1, queryLength: 2, headDim: 4))
        }
        for (memory, segment) in [(Int.max, 4), (4, Int.max), (Int.max - 3, 4)] {
            let option = memory > lengthLimit ? "memoryLength" : "maxSegmentLength"
            expectAttentionError(.invalidParameter, mentioning: [option, "at most"], "seeded \(memory) \(segment)") {
                try TransformerXLAttention(heads: 1, headDim: 4, memoryLength: memory, maxSegmentLength: segment, seed: 0)
            }
        }
        expectAttentionError(.invalidParameter, mentioning: ["memory capacity", "at most"], "memory") {
            try TransformerXLMemory(batch: 1, kvHeads: 1, headDim: 4, capacity: .max)
        }
    }

    @Test("adaptive span: huge ramp and spans throw instead of trapping in Double-to-Int")
    func adaptiveSpanHugeValues() throws {
        let shape = AttentionShape(heads: 2, queryLength: 4, headDim: 4)
        let cases: [(AdaptiveSpanAttention, [String])] = [
            (AdaptiveSpanAttention(heads: 2, span: 4, ramp: 1e30), ["ramp", "at most"]),
            (AdaptiveSpanAttention(heads: 2, span: 1e30), ["spans[0]", "at most"]),
            (AdaptiveSpanAttention(heads: 2, span: .greatestFiniteMagnitude), ["spans[0]", "at most"]),
            (AdaptiveSpanAttention(spans: [1, 1], maxSpan: .max), ["maxSpan", "at most"]),
        ]
        for (attention, mentions) in cases {
            expectAttentionError(.invalidParameter, mentioning: mentions, "\(mentions[0])") {
                try attention.cost(shape)
            }
            expectAttentionError(.invalidParameter, mentioning: mentions, "\(mentions[0]) spans") {
                try attention.effectiveSpans()
            }
        }
    }

    @Test("cost throws for batch or head dimension near Int.max")
    func costWithHugeDimensions() {
        let shapes = [AttentionShape(batch: Int.max / 2, heads: 1, queryLength: 1, headDim: 1),
                      AttentionShape(batch: 1 << 40, heads: 1 << 20, queryLength: 1, keyLength: 2, headDim: 1),
                      AttentionShape(heads: 1, queryLength: 1, headDim: Int.max / 8),
                      AttentionShape(heads: 1, queryLength: 1, headDim: 1, valueDim: Int.max / 8)]
        for attention in Self.conformers {
            for shape in shapes {
                #expect(throws: AttentionError.self, "\(attention.name) \(shape)") { try attention.cost(shape) }
            }
        }
    }

    // MARK: 7. Allocations beyond memory

    @Test("sizes beyond one allocation throw sizeOverflow naming what was too large")
    func hugeAllocationsThrow() throws {
        expectAttentionError(.sizeOverflow, mentioning: ["KVCache keys"], "cache 2^40") {
            try KVCache(kvHeads: 1, headDim: 1 << 10, capacity: 1 << 30)
        }
        expectAttentionError(.invalidParameter, mentioning: ["capacity", "at most"], "cache capacity 2^40") {
            try KVCache(kvHeads: 1, headDim: 1, capacity: 1 << 40)
        }
        expectAttentionError(.invalidParameter, mentioning: ["clusters", "at most"], "routing clusters") {
            try RoutingAttention(heads: 1, headDim: 1, clusters: 1 << 40)
        }
        expectAttentionError(.sizeOverflow, mentioning: ["centroids"], "routing centroids") {
            try RoutingAttention(heads: 1 << 20, headDim: 256, clusters: 1 << 20)
        }
        expectAttentionError(.invalidParameter, mentioning: ["features", "at most"], "FAVOR+ features") {
            try FavorPlusFeatures(features: 1 << 40, headDim: 4)
        }
        expectAttentionError(.sizeOverflow, mentioning: ["random features W"], "ReLU features") {
            try ReLUFeatures(features: 1 << 29, headDim: 1 << 10)
        }
        expectAttentionError(.invalidParameter, mentioning: ["projected length", "at most"], "Linformer k") {
            try LinformerAttention(projectedLength: 1 << 40, maxSequenceLength: 4)
        }
        expectAttentionError(.sizeOverflow, mentioning: ["Linformer projections"], "Linformer k · Nmax") {
            try LinformerAttention(projectedLength: 1 << 20, maxSequenceLength: 1 << 20)
        }
        expectAttentionError(.invalidParameter, mentioning: ["bucketCount", "at most"], "LSH buckets") {
            try LSHAttention(bucketCount: 1 << 40).validate(AttentionShape(heads: 1, queryLength: 8, headDim: 4))
        }
        expectAttentionError(.sizeOverflow, mentioning: ["tensor of shape"], "tensor 2^60") {
            try Tensor(shape: [1 << 60, 1, 1, 1])
        }
        expectAttentionError(.sizeOverflow, mentioning: ["tensor of shape"], "random tensor 2^40") {
            try Tensor.random(shape: [1 << 20, 1 << 20, 1, 1], seed: 0)
        }
        // A view may address more elements than memory holds: no allocation is made.
        let broadcast = try Tensor(shape: [1 << 20, 1 << 20, 1 << 10, 1], storage: [1], strides: [0, 0, 0, 0])
        #expect(broadcast.shape[0] == 1 << 20)
        // Vanilla materialises Nq × Nk scores: a 2^20-long broadcast view (4 MiB of output)
        // asks for 4 TiB of scores, refused before anything is allocated.
        let long = try Tensor(shape: [1, 1, 1 << 20, 1], storage: [1], strides: [0, 0, 0, 0])
        expectAttentionError(.sizeOverflow, mentioning: ["vanilla score matrix", "maxAllocationBytes"], "vanilla 2^20") {
            try VanillaAttention().attend(query: long, key: long, value: long)
        }
        // Nq = Nk = 10M, H = 64, D = 64: the output alone is 164 GB.
        let huge = AttentionShape(heads: 64, queryLength: 10_000_000, headDim: 64)
        for attention in Self.conformers {
            expectAttentionError(.sizeOverflow, mentioning: ["output"], "\(attention.name) 10M") {
                try attention.cost(huge)
            }
        }
    }

    // MARK: 8. Memory follows absurd thread counts

    @Test("absurd thread counts give results bitwise equal to one thread")
    func absurdThreadCounts() throws {
        let (q, k, v) = try randomQKV(batch: 2, heads: 2, queryLength: 48, headDim: 8, seed: 5)
        for attention in Self.conformers where (try? attention.validate(AttentionShape(query: q, key: k, value: v))) != nil {
            let one = try attention.attend(query: q, key: k, value: v, threads: 1)
            for threads in [1_000_000, Int.max] {
                let many = try attention.attend(query: q, key: k, value: v, threads: threads)
                expectBitwiseEqual(many, one, "\(attention.name) threads \(threads)")
                let cost = try attention.cost(AttentionShape(query: q, key: k, value: v), threads: threads)
                let capped = try attention.cost(AttentionShape(query: q, key: k, value: v), threads: maxThreadCount)
                #expect(cost == capped, "\(attention.name): cost at \(threads) threads is the cost at maxThreadCount")
            }
        }
        expectAttentionError(.invalidParameter, mentioning: ["threads", "at least"], "threads 0 in cost") {
            try DenseAttention().cost(AttentionShape(query: q, key: k, value: v), threads: 0)
        }
    }

    @Test("fixed patterns with a 2^30 block or stride run without a workspace per empty group")
    func hugeBlocksAndStrides() throws {
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 40, headDim: 8, seed: 6)
        let patterns: [any Attention] = [
            LocalAttention(blockSize: 1 << 30), LocalAttention(form: .slidingWindow(left: 1 << 30, right: 1 << 30)),
            StridedAttention(stride: 1 << 30), LongformerAttention(window: 1 << 30),
            BigBirdAttention(blockSize: 1 << 30),
        ]
        for attention in patterns {
            // Every key is visible.
            _ = try checkAgainstReference(attention, query: q, key: k, value: v, threads: 1_000_000, scale: nil,
                                      visible: { _, _, _, _ in true }, "\(attention.name) huge block")
            let cost = try attention.cost(AttentionShape(query: q, key: k, value: v), threads: 1_000_000)
            #expect(cost.workspaceBytes <= maxThreadCount * (1 << 20), "\(attention.name): \(cost.workspaceBytes) bytes")
        }
    }

    // MARK: 9. BigBird at Nk = 10M

    @Test("BigBird cost at Nk = 10M returns (random blocks drawn in O(blocks · r))")
    func bigBirdLongSequence() throws {
        let shape = AttentionShape(heads: 1, queryLength: 10_000_000, headDim: 1)
        let cost = try BigBirdAttention().cost(shape, threads: 1)
        #expect(cost.scoredPairs > 0)
        let pattern = try BigBirdAttention(seed: 9).pattern(for: shape)
        #expect(pattern.randomBlocks[0].count == 156_250)
        #expect(pattern.randomBlocks[0][1000].count == 3)
    }

    @Test("BigBird draws the same random blocks as the quadratic draw")
    func bigBirdSameBlocks() throws {
        let settings: [(n: Int, r: Int, global: [Int]?, causal: Bool)] = [
            (32, 3, nil, false), (32, 3, nil, true), (7, 5, nil, false), (40, 2, [0, 3, 4, 17, 39], false),
            (40, 4, [5, 6, 7], true), (3, 3, nil, false), (1, 3, nil, false), (64, 70, [1, 62], false),
        ]
        for (n, r, global, causal) in settings {
            for seed: UInt64 in [0, 1, 7, 12345] {
                let attention = BigBirdAttention(blockSize: 4, randomBlockCount: r, globalBlocks: global,
                                                 seed: seed, causal: causal)
                let shape = AttentionShape(heads: 3, queryLength: 4 * n, headDim: 2)
                let drawn = try attention.pattern(for: shape).randomBlocks
                var generator = SeededGenerator(seed: seed)
                let expected = quadraticDraw(heads: 3, blockCount: n, count: r,
                                             globalBlocks: global ?? Array(Set([0, n - 1])).sorted(),
                                             causal: causal, generator: &generator)
                #expect(drawn == expected, "n \(n) r \(r) global \(String(describing: global)) causal \(causal) seed \(seed)")
            }
        }
    }

    // MARK: 10. Huge scale

    @Test("a finite scale above 2^32 throws instead of giving NaN")
    func hugeScale() throws {
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 16, headDim: 4, seed: 8)
        for scale: Float in [1e30, -1e30, .greatestFiniteMagnitude, maxScale.nextUp] {
            let conformers: [any Attention] = [
                DenseAttention(scale: scale), VanillaAttention(scale: scale), LocalAttention(blockSize: 4, scale: scale),
                MultiQueryAttention(scale: scale), LSHAttention(bucketSize: 4, scale: scale),
                StridedAttention(stride: 4, scale: scale), BigBirdAttention(blockSize: 4, scale: scale),
            ]
            for attention in conformers {
                expectAttentionError(.invalidParameter, mentioning: ["scale", "at most"], "\(attention.name) \(scale)") {
                    try attention.attend(query: q, key: k, value: v)
                }
            }
        }
        // 2^32 itself is accepted, and the result is the reference's.
        _ = try checkAgainstReference(DenseAttention(scale: maxScale), query: q, key: k, value: v, scale: maxScale,
                                  visible: { _, _, _, _ in true }, "scale 2^32")
    }

    // MARK: 11. Messages for options above the limit

    @Test("options above 2^30 say 'must be at most'")
    func upperBoundMessages() {
        let shape = AttentionShape(heads: 1, queryLength: 8, headDim: 4)
        let cases: [(any Attention, String)] = [
            (LocalAttention(blockSize: lengthLimit + 1), "blockSize"),
            (LocalAttention(form: .slidingWindow(left: .max, right: 0)), "left"),
            (StridedAttention(stride: .max), "stride"),
            (LongformerAttention(window: lengthLimit + 1), "window"),
            (BigBirdAttention(blockSize: .max), "blockSize"),
            (BigBirdAttention(randomBlockCount: lengthLimit + 1), "randomBlockCount"),
            (LSHAttention(bucketSize: .max), "bucketSize"),
            (LSHAttention(hashes: .max), "hashes"),
        ]
        for (attention, option) in cases {
            guard let error = thrownAttentionError({ try attention.validate(shape) }) else { continue }
            #expect(error.message.contains(option) && error.message.contains("at most")
                    && !error.message.contains("at least"), "\(attention.name): \(error.message)")
        }
    }

    // MARK: Conformers

    static var conformers: [any Attention] {
        var list: [any Attention] = [
            DenseAttention(), VanillaAttention(), MultiQueryAttention(), LocalAttention(blockSize: 16),
            StridedAttention(stride: 8), LongformerAttention(window: 8), BigBirdAttention(blockSize: 16),
            LSHAttention(bucketSize: 16), AdaptiveSpanAttention(heads: 2, span: 8),
            LinearAttention(featureMap: EluPlusOneFeatures()),
        ]
        if let favor = try? FavorPlusFeatures(features: 16, headDim: 8) { list.append(LinearAttention(featureMap: favor)) }
        if let routing = try? RoutingAttention(heads: 2, headDim: 8, clusters: 3) { list.append(routing) }
        if let linformer = try? LinformerAttention(projectedLength: 8, maxSequenceLength: 64) { list.append(linformer) }
        if let xl = try? TransformerXLAttention(heads: 2, headDim: 8, memoryLength: 0, maxSegmentLength: 64, seed: 1) {
            list.append(xl)
        }
        return list
    }
}

/// The random-block draw as it was before issue 14 (O(blocks²) per head: it built and
/// filtered the whole candidate list for every query block), kept to check that the
/// O(blocks · r) draw gives the same blocks.
private func quadraticDraw(heads: Int, blockCount n: Int, count: Int, globalBlocks: [Int],
                           causal: Bool, generator: inout SeededGenerator) -> [[[Int]]] {
    let global = Set(globalBlocks)
    return (0..<heads).map { _ in
        (0..<n).map { t in
            if global.contains(t) { return [] }
            var candidates = (0..<(causal ? max(0, t - 1) : n)).filter { abs($0 - t) > 1 && !global.contains($0) }
            let take = min(count, candidates.count)
            for k in 0..<take {
                candidates.swapAt(k, Int.random(in: k..<candidates.count, using: &generator))
            }
            return Array(candidates[0..<take]).sorted()
        }
    }
}

@Suite("Robustness (issue 14): patterns and decoding")
struct RobustnessPatternTests {
    @Test("public pattern initialisers throw for parameters their conformers refuse")
    func patternInitialisers() {
        expectAttentionError(.invalidParameter, mentioning: ["blockSize", "at least"], "block 0") {
            try LocalPattern(form: .blocked(size: 0, lookBackward: 1, lookForward: 0), causal: false,
                             queryLength: 8, keyLength: 8)
        }
        expectAttentionError(.invalidParameter, mentioning: ["left", "at most"], "window Int.max") {
            try LocalPattern(form: .slidingWindow(left: .max, right: 0), causal: false, queryLength: 8, keyLength: 8)
        }
        expectAttentionError(.invalidParameter, mentioning: ["window", "at most"], "longformer window") {
            try LongformerPattern(window: .max, dilations: [1], globalPositions: [], causal: false,
                                  queryLength: 8, keyLength: 8)
        }
        expectAttentionError(.invalidParameter, mentioning: ["dilations[0]", "at least"], "dilation 0") {
            try LongformerPattern(window: 4, dilations: [0], globalPositions: [], causal: false,
                                  queryLength: 8, keyLength: 8)
        }
    }

    @Test("decode with split 1 over a long cache throws when its partial rows exceed one allocation")
    func decodeSplitWorkspace() throws {
        let cache = try KVCache(kvHeads: 1, headDim: 1, capacity: 1 << 20)
        try cache.append(layer: 0, keys: try Tensor(shape: [1, 1, 1 << 20, 1]), values: try Tensor(shape: [1, 1, 1 << 20, 1]))
        let query = try Tensor(shape: [1, 64, 1 << 12, 1])
        let attention = MultiQueryAttention(decodeChunkLength: 1)
        expectAttentionError(.sizeOverflow, mentioning: ["decodeChunkLength"], "decode") {
            try attention.decode(query: query, cache: cache)
        }
        expectAttentionError(.sizeOverflow, mentioning: ["decodeChunkLength"], "decodeCost") {
            try attention.decodeCost(AttentionShape(heads: 64, kvHeads: 1, queryLength: 1 << 12, keyLength: 1 << 20,
                                                    headDim: 1), threads: 1)
        }
    }
}

@Suite("Robustness (issue 14): blocks far larger than the sequence")
struct RobustnessHugeBlockTests {
    /// A 2^30 block used to give ⌈2^30 / Br⌉ = 2^23 query tiles per head, nearly all
    /// empty, each a work item: 2^31 items for 256 heads. Only the groups holding a query
    /// are listed now.
    @Test("blocked local and BigBird with a 2^30 block over many heads run one group per head", .timeLimit(.minutes(1)))
    func hugeBlockManyHeads() throws {
        let (q, k, v) = try randomQKV(heads: 256, queryLength: 3, headDim: 2, seed: 11)
        for attention in [LocalAttention(blockSize: 1 << 30), BigBirdAttention(blockSize: 1 << 30)] as [any Attention] {
            _ = try checkAgainstReference(attention, query: q, key: k, value: v, threads: 2, scale: nil,
                                          visible: { _, _, _, _ in true }, "\(attention.name) 2^30 block, 256 heads")
        }
        let pattern = try LocalPattern(form: .blocked(size: 1 << 30, lookBackward: 1, lookForward: 0), causal: false,
                                       queryLength: 300, keyLength: 300)
        // Three query tiles (each listed once per key tile).
        let groups = Set(pattern.tiles(head: 0).map { [$0.queryStart, $0.queryCount] })
        #expect(groups == [[0, 128], [128, 128], [256, 44]])
    }
}
