// BigBirdAttention against the Double reference with the pattern's dense mask, and the
// pattern against the specification written out here: N not a multiple of the block,
// blocks larger than N, random blocks drawn (seeded, from the past when causal) or
// given, global blocks at the start, middle and end (and none), Nq < Nk, causal and
// not, key padding, bad configurations, determinism across thread counts.

import EfficientAttention
import Testing

/// ATTENTION_SPEC's BigBird rule for one pair, from the pattern's blocks.
func bigBirdSpecVisible(_ p: BigBirdPattern, head: Int, query: Int, key j: Int) -> Bool {
    let pos = query + p.keyLength - p.queryLength
    if p.causal && j > pos { return false }
    let t = pos / p.blockSize, s = j / p.blockSize
    return p.globalBlocks.contains(t) || p.globalBlocks.contains(s) || abs(s - t) <= 1
        || p.randomBlocks[head][t].contains(s)
}

@Suite("BigBirdAttention")
struct BigBirdAttentionTests {
    static let cases: [(bs: Int, r: Int, g: [Int]?, nq: Int, nk: Int, d: Int, causal: Bool)] = [
        (8, 2, nil, 100, 100, 3, false), (8, 2, nil, 100, 100, 3, true),
        (16, 3, [0, 5, 9], 157, 157, 65, false), (16, 3, [0, 5, 9], 157, 157, 64, true),
        (7, 1, [], 60, 60, 16, false), (7, 1, [], 60, 60, 16, true),
        (200, 3, nil, 150, 150, 8, false),   // one block larger than N
        (10, 2, [3], 35, 123, 8, false), (10, 2, [3], 35, 123, 8, true), (64, 3, nil, 300, 300, 1, true),
    ]

    @Test("matches the reference and the specification", arguments: cases.indices)
    func reference(_ n: Int) throws {
        let c = BigBirdAttentionTests.cases[n]
        let attention = BigBirdAttention(blockSize: c.bs, randomBlockCount: c.r, globalBlocks: c.g,
                                         seed: 40 + UInt64(n), causal: c.causal)
        let pattern = try attention.pattern(for: AttentionShape(heads: 2, queryLength: c.nq, keyLength: c.nk, headDim: c.d))
        checkPatternConsistency(pattern, "bigbird \(c)")
        for h in 0..<2 {
            let mask = pattern.denseMask(head: h)
            let spec = (0..<(c.nq * c.nk)).map { bigBirdSpecVisible(pattern, head: h, query: $0 / c.nk, key: $0 % c.nk) }
            let same = mask == spec
            #expect(same, "bigbird \(c) head \(h): dense mask differs from the specification")
        }
        try checkPatternAttention(attention, pattern: pattern, heads: 2, kvHeads: 1, headDim: c.d,
                                  seed: 4000 + UInt64(n), "bigbird \(c)")
    }

    @Test("random blocks: seeded, r per query block among unseen blocks, past only when causal")
    func randomBlocks() throws {
        let shape = AttentionShape(heads: 3, queryLength: 640, headDim: 8)
        for causal in [false, true] {
            let a = try BigBirdAttention(blockSize: 32, randomBlockCount: 3, seed: 9, causal: causal).pattern(for: shape)
            let b = try BigBirdAttention(blockSize: 32, randomBlockCount: 3, seed: 9, causal: causal).pattern(for: shape)
            let c = try BigBirdAttention(blockSize: 32, randomBlockCount: 3, seed: 10, causal: causal).pattern(for: shape)
            #expect(a.randomBlocks == b.randomBlocks, "same seed, same blocks")
            #expect(a.randomBlocks != c.randomBlocks, "another seed, other blocks")
            #expect(a.randomBlocks[0] != a.randomBlocks[1], "heads draw independently")
            #expect(a.globalBlocks == [0, 19])
            for h in 0..<3 {
                for t in 0..<20 where !a.globalBlocks.contains(t) {
                    let blocks = a.randomBlocks[h][t]
                    let available = (0..<20).filter { abs($0 - t) > 1 && !a.globalBlocks.contains($0) && (!causal || $0 < t) }
                    #expect(blocks.count == min(3, available.count) && Set(blocks).count == blocks.count
                            && blocks.allSatisfy(available.contains), "head \(h) block \(t) causal \(causal): \(blocks)")
                }
            }
        }
        // Explicit blocks replace the draw.
        let given = [[[3], [], [0], [1]], [[], [3], [], [0]]]
        let explicit = BigBirdAttention(blockSize: 5, globalBlocks: [], randomBlocks: given)
        let pattern = try explicit.pattern(for: AttentionShape(heads: 2, queryLength: 20, headDim: 8))
        #expect(pattern.randomBlocks == given)
        #expect(pattern.isVisible(head: 0, query: 0, key: 15) && !pattern.isVisible(head: 1, query: 0, key: 15))
        try checkPatternAttention(explicit, pattern: pattern, heads: 2, headDim: 8, seed: 4100, "bigbird explicit")
    }

    @Test("all blocks global equals dense")
    func allGlobal() throws {
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 100, headDim: 16, seed: 4200)
        for causal in [false, true] {
            let all = BigBirdAttention(blockSize: 16, globalBlocks: Array(0..<7), causal: causal)
            try checkAgainstReference(all, query: q, key: k, value: v, scale: nil,
                                      visible: causal ? Visible.causal(queryLength: 100, keyLength: 100) : Visible.all,
                                      "bigbird all global causal \(causal)")
        }
    }

    @Test("key padding, batches and grouped heads")
    func padding() throws {
        let attention = BigBirdAttention(blockSize: 9, randomBlockCount: 2, seed: 3)
        let pattern = try attention.pattern(for: AttentionShape(heads: 4, queryLength: 70, headDim: 8))
        try checkPatternAttention(attention, pattern: pattern, batch: 3, heads: 4, kvHeads: 2, headDim: 8,
                                  keyLengths: [70, 0, 31], threads: 2, seed: 4300, "bigbird padded")
    }

    @Test("deterministic across thread counts; cost counts the pattern's pairs")
    func determinism() throws {
        let attention = BigBirdAttention(blockSize: 16, randomBlockCount: 2, globalBlocks: [0, 9], seed: 5, causal: true)
        let pattern = try attention.pattern(for: AttentionShape(heads: 3, queryLength: 290, headDim: 8))
        try checkPatternDeterminismAndCost(attention, queryLength: 290, heads: 3, headDim: 8,
                                           expectedPairs: pattern.scoredPairs, "bigbird")
    }

    @Test("reads only the addressed elements")
    func nanPadding() throws {
        try checkReadsOnlyAddressedElements(BigBirdAttention(blockSize: 16, randomBlockCount: 2, causal: true),
                                            heads: 2, queryLength: 150, "bigbird")
    }

    @Test("bad configurations throw")
    func errors() {
        let shape = AttentionShape(heads: 2, queryLength: 20, headDim: 8)
        expectAttentionError(.invalidParameter, mentioning: ["blockSize", "0"]) { try BigBirdAttention(blockSize: 0).validate(shape) }
        expectAttentionError(.invalidParameter, mentioning: ["randomBlockCount", "-1"]) {
            try BigBirdAttention(randomBlockCount: -1).validate(shape)
        }
        expectAttentionError(.invalidParameter, mentioning: ["global block", "4"]) {
            try BigBirdAttention(blockSize: 5, globalBlocks: [0, 4]).validate(shape)
        }
        expectAttentionError(.invalidParameter, mentioning: ["randomBlocks", "1 heads", "2"]) {
            try BigBirdAttention(blockSize: 5, randomBlocks: [[[], [], [], []]]).validate(shape)
        }
        expectAttentionError(.invalidParameter, mentioning: ["randomBlocks[1]", "3 query blocks", "4"]) {
            try BigBirdAttention(blockSize: 5, randomBlocks: [[[], [], [], []], [[], [], []]]).validate(shape)
        }
        expectAttentionError(.invalidParameter, mentioning: ["randomBlocks[0][2]", "7"]) {
            try BigBirdAttention(blockSize: 5, randomBlocks: [[[], [], [7], []], [[], [], [], []]]).validate(shape)
        }
        expectAttentionError(.unsupported, mentioning: ["queryLength", "keyLength"]) {
            try BigBirdAttention().validate(AttentionShape(heads: 1, queryLength: 30, keyLength: 20, headDim: 8))
        }
    }
}
