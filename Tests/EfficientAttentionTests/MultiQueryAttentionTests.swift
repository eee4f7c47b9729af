// MultiQueryAttention: multi-query / grouped-query heads and sliding windows against the
// Double reference with broadcast heads; incremental decoding against a KVCache (Float32
// and Float16) against the reference and against one causal call over the whole
// sequence; split-KV decoding against the unsplit decode and across thread counts;
// configuration and shape errors.

import EfficientAttention
import Foundation
import Testing

// MARK: - Helpers

/// Batch item `b` of `t` as a `[1, ...]` tensor.
private func item(_ t: Tensor, _ b: Int) throws -> Tensor {
    let s = t.shape
    var data: [Float] = []
    data.reserveCapacity(s[1] * s[2] * s[3])
    for h in 0..<s[1] { for i in 0..<s[2] { for c in 0..<s[3] { data.append(t[b, h, i, c]) } } }
    return try Tensor(shape: [1, s[1], s[2], s[3]], data: data)
}

/// Positions `range` (dimension 2) of `t`.
private func positions(_ t: Tensor, _ range: Range<Int>) throws -> Tensor {
    let s = t.shape
    var data: [Float] = []
    for b in 0..<s[0] { for h in 0..<s[1] { for i in range { for c in 0..<s[3] { data.append(t[b, h, i, c]) } } } }
    return try Tensor(shape: [s[0], s[1], range.count, s[3]], data: data)
}

/// The elements of `t` rounded to Float16 and back.
private func roundedToHalf(_ t: Tensor) throws -> Tensor {
    try Tensor(shape: t.shape, data: t.elements.map(halfRounded))
}

/// The visibility MultiQueryAttention promises: window around `i + Nk − Nq`, causal rule.
private func windowVisibility(queryLength nq: Int, keyLength nk: Int, left: Int?, right: Int?,
                              causal: Bool) -> Visibility {
    { _, _, i, j in
        let p = i + nk - nq
        if let left, j < p - left { return false }
        if let right, j > p + right { return false }
        return !causal || j <= p
    }
}

private func maxAbsDifference(_ a: [Float], _ b: [Float]) -> Float {
    zip(a, b).map { abs($0 - $1) }.max() ?? 0
}

/// Checks a decode result batch item by batch item against the reference over the
/// cache's own (read-back) keys and values.
@discardableResult
private func checkDecode(_ attention: MultiQueryAttention, query: Tensor, cache: KVCache, layer: Int = 0,
                         threads: Int? = nil, _ label: String,
                         sourceLocation: SourceLocation = #_sourceLocation) throws -> AttentionResult {
    let result = try attention.decode(query: query, cache: cache, layer: layer, threads: threads)
    for b in 0..<cache.batch {
        let q = try item(query, b)
        let k = try cache.keys(layer: layer, batchItem: b), v = try cache.values(layer: layer, batchItem: b)
        let n = q.shape[2], length = k.shape[2]
        let visible = windowVisibility(queryLength: n, keyLength: length, left: attention.leftWindow,
                                       right: attention.rightWindow, causal: attention.causal)
        let d = q.shape[3]
        let reference = referenceAttention(query: q, key: k, value: v, scale: defaultScale(headDim: d), visible: visible)
        let naive = naiveFloatAttention(query: q, key: k, value: v, scale: 1 / Float(d).squareRoot(), visible: visible)
        let part = try AttentionResult(output: item(result.output, b), logSumExp: item(result.logSumExp, b))
        checkAttention(part, reference: reference, naive: naive, "\(label) batch item \(b) (L=\(length))",
                       sourceLocation: sourceLocation)
    }
    return result
}

// MARK: - Batch attention

@Suite("MultiQueryAttention") struct MultiQueryAttentionTests {

    struct Case: Sendable, CustomTestStringConvertible {
        var heads = 8, kvHeads = 1, nq = 37, nk = 37, d = 16, dv: Int? = nil
        var causal = false
        var left: Int? = nil, right: Int? = nil
        var keyLengths: [Int]? = nil
        var batch = 1
        var testDescription: String {
            "B\(batch) H\(heads)/\(kvHeads) Nq\(nq) Nk\(nk) D\(d) Dv\(dv ?? d)\(causal ? " causal" : "")"
                + (left.map { " left \($0)" } ?? "") + (right.map { " right \($0)" } ?? "")
                + (keyLengths.map { " keyLengths \($0)" } ?? "")
        }
    }

    static let headCases: [Case] = [1, 2, 4, 8].flatMap { kv in
        [false, true].map { Case(kvHeads: kv, nq: 37, nk: 53, d: kv == 2 ? 3 : 16, causal: $0) }
    } + [
        Case(heads: 6, kvHeads: 3, nq: 65, nk: 65, d: 64, causal: true),
        Case(heads: 4, kvHeads: 1, nq: 129, nk: 70, d: 65, dv: 7, causal: true),
        Case(heads: 2, kvHeads: 1, nq: 1, nk: 200, d: 128, causal: false),
        Case(heads: 3, kvHeads: 1, nq: 20, nk: 20, d: 1, causal: true, batch: 2),
    ]

    @Test("grouped and multi-query heads against the reference", arguments: headCases)
    func heads(_ c: Case) throws {
        let (q, k, v) = try randomQKV(batch: c.batch, heads: c.heads, kvHeads: c.kvHeads, queryLength: c.nq,
                                      keyLength: c.nk, headDim: c.d, valueDim: c.dv, seed: UInt64(c.nq * 7 + c.kvHeads))
        try checkAgainstReference(MultiQueryAttention(causal: c.causal), query: q, key: k, value: v, scale: nil,
                                  visible: windowVisibility(queryLength: c.nq, keyLength: c.nk, left: nil, right: nil,
                                                            causal: c.causal), c.testDescription)
    }

    static let windowCases: [Case] = [
        Case(heads: 4, kvHeads: 2, nq: 100, nk: 100, d: 16, causal: true, left: 17),
        Case(heads: 4, kvHeads: 1, nq: 77, nk: 90, d: 33, causal: false, left: 5, right: 3),
        Case(heads: 2, kvHeads: 2, nq: 150, nk: 150, d: 8, causal: false, left: 0, right: 64),
        Case(heads: 4, kvHeads: 2, nq: 64, nk: 64, d: 16, causal: true, left: 9, right: 4),
        Case(heads: 2, kvHeads: 1, nq: 70, nk: 70, d: 16, causal: true, left: 30, keyLengths: [50, 70], batch: 2),
    ]

    @Test("sliding windows (with causal and key padding) against the reference", arguments: windowCases)
    func windows(_ c: Case) throws {
        let (q, k, v) = try randomQKV(batch: c.batch, heads: c.heads, kvHeads: c.kvHeads, queryLength: c.nq,
                                      keyLength: c.nk, headDim: c.d, seed: UInt64(c.nq + 1000))
        var visible = windowVisibility(queryLength: c.nq, keyLength: c.nk, left: c.left, right: c.right, causal: c.causal)
        if let lengths = c.keyLengths { visible = Visible.both(visible, Visible.keyPadding(lengths)) }
        let attention = MultiQueryAttention(causal: c.causal, leftWindow: c.left, rightWindow: c.right)
        try checkAgainstReference(attention, query: q, key: k, value: v, keyLengths: c.keyLengths,
                                  scale: nil, visible: visible, c.testDescription)
        let cost = try attention.cost(AttentionShape(batch: c.batch, heads: c.heads, kvHeads: c.kvHeads,
                                                     queryLength: c.nq, keyLength: c.nk, headDim: c.d))
        if c.keyLengths == nil {
            var pairs = 0
            for i in 0..<c.nq { for j in 0..<c.nk where visible(0, 0, i, j) { pairs += 1 } }
            #expect(cost.scoredPairs == pairs * c.batch * c.heads, "cost counts the window's visible pairs")
        }
    }

    @Test("every thread count gives the same bits; strided NaN-padded inputs")
    func determinismAndStrides() throws {
        let (q, k, v) = try randomQKV(batch: 2, heads: 8, kvHeads: 2, queryLength: 150, keyLength: 170, headDim: 24, seed: 5)
        let attention = MultiQueryAttention(causal: true, leftWindow: 40)
        let one = try attention.attend(query: q, key: k, value: v, threads: 1)
        let two = try attention.attend(query: q, key: k, value: v, threads: 2)
        expectBitwiseEqual(one, two, "threads 1 vs 2")
        let padded = try attention.attend(query: embeddedInNaN(q), key: embeddedInNaN(k, innerStride: 2),
                                          value: embeddedInNaN(v), threads: 2)
        expectBitwiseEqual(one, padded, "NaN-padded strided inputs")
    }

    @Test("configuration and shape errors")
    func errors() throws {
        let (q, k, v) = try randomQKV(heads: 6, kvHeads: 4, queryLength: 5, headDim: 8, seed: 1)
        expectAttentionError(.invalidShape, mentioning: ["heads", "kvHeads"], "H % Hkv") {
            try MultiQueryAttention().attend(query: q, key: k, value: v)
        }
        let shape = AttentionShape(heads: 4, kvHeads: 2, queryLength: 5, headDim: 8)
        expectAttentionError(.invalidParameter, mentioning: ["leftWindow", "-1"]) {
            try MultiQueryAttention(leftWindow: -1).cost(shape)
        }
        expectAttentionError(.invalidParameter, mentioning: ["rightWindow"]) {
            try MultiQueryAttention(rightWindow: -3).validate(shape)
        }
        expectAttentionError(.invalidParameter, mentioning: ["decodeChunkLength", "0"]) {
            try MultiQueryAttention(decodeChunkLength: 0).validate(shape)
        }
        expectAttentionError(.invalidParameter, mentioning: ["scale"]) {
            try MultiQueryAttention(scale: .nan).validate(shape)
        }
        expectAttentionError(.unsupported, mentioning: ["headDim", "256"]) {
            try MultiQueryAttention().validate(AttentionShape(heads: 2, kvHeads: 1, queryLength: 3, headDim: 300))
        }
    }

    /// The deprecated spellings `split` (property and initialiser argument) and
    /// `defaultSplit` still compile and mean the decode chunk length (deprecation warnings
    /// here are expected: this is the code of users not yet migrated).
    @Test("the former name split is a deprecated alias of decodeChunkLength")
    func splitAlias() {
        var attention = MultiQueryAttention(causal: true, split: 48)
        #expect(attention.decodeChunkLength == 48 && attention.split == 48 && attention.causal)
        attention.split = 7
        #expect(attention.decodeChunkLength == 7)
        #expect(MultiQueryAttention.defaultSplit == MultiQueryAttention.defaultDecodeChunkLength)
        #expect(MultiQueryAttention().decodeChunkLength == 2048)
    }

    // MARK: Decoding

    @Test("decode against the reference: heads, windows, batch items of different lengths",
          arguments: [(1, false, nil as Int?), (2, true, nil), (8, true, nil), (4, false, 6), (1, true, 20)])
    func decodeAgainstReference(kvHeads: Int, causal: Bool, left: Int?) throws {
        let heads = 8, d = 65, dv = 40
        let cache = try KVCache(batch: 2, kvHeads: kvHeads, headDim: d, valueDim: dv, capacity: 300)
        let k0 = try randomTensor([1, kvHeads, 211, d], seed: 11), v0 = try randomTensor([1, kvHeads, 211, dv], seed: 12)
        let k1 = try randomTensor([1, kvHeads, 97, d], seed: 13), v1 = try randomTensor([1, kvHeads, 97, dv], seed: 14)
        try cache.append(layer: 0, batchItem: 0, keys: k0, values: v0)
        try cache.append(layer: 0, batchItem: 1, keys: k1, values: v1)
        let attention = MultiQueryAttention(causal: causal, leftWindow: left, decodeChunkLength: 64)
        for n in [1, 3] {
            let q = try randomTensor([2, heads, n, d], seed: UInt64(20 + n))
            _ = try checkDecode(attention, query: q, cache: cache, "decode Hkv \(kvHeads) n \(n)")
        }
    }

    @Test("decode on the micro-kernel path with several row tiles (G · n > 128), both precisions",
          arguments: KVCache.Precision.allCases)
    func decodeRowTiles(precision: KVCache.Precision) throws {
        let cache = try KVCache(kvHeads: 1, headDim: 33, capacity: 300, precision: precision)
        try cache.append(layer: 0, keys: randomTensor([1, 1, 290, 33], seed: 61), values: randomTensor([1, 1, 290, 33], seed: 62))
        let q = try randomTensor([1, 16, 9, 33], seed: 63)
        let attention = MultiQueryAttention(causal: true, leftWindow: 100, decodeChunkLength: 128)
        let one = try checkDecode(attention, query: q, cache: cache, threads: 1, "G·n = 144")
        expectBitwiseEqual(one, try attention.decode(query: q, cache: cache, threads: 2), "threads 1 vs 2")
    }

    @Test("prefill then decode equals one causal call, position by position",
          arguments: [(4, 2, 64), (8, 1, 37), (2, 2, 128)])
    func prefillThenDecode(heads: Int, kvHeads: Int, d: Int) throws {
        let n = 48, prefill = 13
        let (q, k, v) = try randomQKV(heads: heads, kvHeads: kvHeads, queryLength: n, headDim: d, seed: UInt64(d))
        let attention = MultiQueryAttention(causal: true, decodeChunkLength: 16)
        let whole = try attention.attend(query: q, key: k, value: v)
        // Float16 error bound against the Float32 result, worst case for |q|, |k|, |v| <= 1:
        // rounding keys moves each score by at most scale · D · u = sqrt(D) · u, which moves
        // the weights by at most a factor exp(±2 sqrt(D) u); rounding values adds u · max|v|.
        let u: Float = 1.0 / 2048
        let halfBound = (expf(2 * Float(d).squareRoot() * u) - 1) + u

        for precision in [KVCache.Precision.float32, .float16] {   // bfloat16, Int8: CacheKindsTests
            let cache = try KVCache(kvHeads: kvHeads, headDim: d, capacity: n, precision: precision)
            try cache.append(layer: 0, keys: positions(k, 0..<prefill), values: positions(v, 0..<prefill))
            let first = try attention.decode(query: positions(q, 0..<prefill), cache: cache)
            var outputs: [AttentionResult] = [first]
            for t in prefill..<n {
                try cache.append(layer: 0, keys: positions(k, t..<t + 1), values: positions(v, t..<t + 1))
                outputs.append(try attention.decode(query: positions(q, t..<t + 1), cache: cache, threads: 2))
            }
            // Row by row against the batch call.
            var worst: Float = 0
            for h in 0..<heads {
                for t in 0..<n {
                    let (result, row) = t < prefill ? (outputs[0], t) : (outputs[t - prefill + 1], 0)
                    for c in 0..<d {
                        worst = max(worst, abs(result.output[0, h, row, c] - whole.output[0, h, t, c]))
                    }
                }
            }
            switch precision {
            case .float32:
                #expect(worst <= 2e-6, "Float32 cache: decode differs from the causal call by \(worst)")
            case .float16:
                #expect(worst <= halfBound, "Float16 cache: decode differs by \(worst) > bound \(halfBound)")
                // Exact attention over the rounded keys and values, with the usual bound.
                let last = outputs.last!
                let (lastQuery, kh, vh) = (try positions(q, n - 1..<n), try roundedToHalf(k), try roundedToHalf(v))
                let reference = referenceAttention(query: lastQuery, key: kh, value: vh,
                                                   scale: defaultScale(headDim: d), visible: Visible.all)
                let naive = naiveFloatAttention(query: lastQuery, key: kh, value: vh,
                                                scale: 1 / Float(d).squareRoot(), visible: Visible.all)
                checkAttention(last, reference: reference, naive: naive, "Float16 decode of the last position")
            default: break
            }
        }
    }

    @Test("split-KV decode: thread counts bitwise equal, splits equal within rounding (dot path: 4 and 40 rows, micro-kernel: 64)",
          arguments: KVCache.Precision.allCases, [4, 40, 64])
    func splitKV(precision: KVCache.Precision, heads: Int) throws {
        let kvHeads = 1, d = 64, length = 1000
        let cache = try KVCache(kvHeads: kvHeads, headDim: d, capacity: length, precision: precision)
        try cache.append(layer: 0, keys: randomTensor([1, kvHeads, length, d], seed: 41),
                         values: randomTensor([1, kvHeads, length, d], seed: 42))
        let q = try randomTensor([1, heads, 1, d], seed: 43)
        let unsplit = try MultiQueryAttention(decodeChunkLength: length).decode(query: q, cache: cache, threads: 1)
        for split in [1, 63, 256] {
            let attention = MultiQueryAttention(decodeChunkLength: split)
            let one = try attention.decode(query: q, cache: cache, threads: 1)
            let two = try attention.decode(query: q, cache: cache, threads: 2)
            expectBitwiseEqual(one, two, "split \(split): threads 1 vs 2")
            let diff = maxAbsDifference(one.output.elements, unsplit.output.elements)
            let lseDiff = maxAbsDifference(one.logSumExp.elements, unsplit.logSumExp.elements)
            #expect(diff <= 1e-6 && lseDiff <= 1e-5, "split \(split) vs unsplit: output \(diff), lse \(lseDiff)")
        }
        _ = try checkDecode(MultiQueryAttention(decodeChunkLength: 63), query: q, cache: cache, threads: 2, "split 63")
    }

    @Test("decode of an empty cache, and causal rows before the first cached position")
    func emptyRows() throws {
        let cache = try KVCache(kvHeads: 1, headDim: 8, capacity: 10)
        let q = try randomTensor([1, 2, 3, 8], seed: 3)
        let empty = try MultiQueryAttention().decode(query: q, cache: cache)
        #expect(empty.output.elements.allSatisfy { $0 == 0 })
        #expect(empty.logSumExp.elements.allSatisfy { $0 == -.infinity })
        try cache.append(layer: 0, keys: randomTensor([1, 1, 2, 8], seed: 4), values: randomTensor([1, 1, 2, 8], seed: 5))
        // Three queries against two keys: the first query sits at position -1.
        let r = try checkDecode(MultiQueryAttention(causal: true), query: q, cache: cache, "n > L")
        #expect(r.logSumExp[0, 0, 0, 0] == -.infinity && r.logSumExp[0, 0, 1, 0].isFinite)
    }

    @Test("decode with strided NaN-padded query; cache appended from NaN-padded tensors")
    func decodeStrided() throws {
        let k = try randomTensor([1, 2, 50, 16], seed: 7), v = try randomTensor([1, 2, 50, 16], seed: 8)
        let q = try randomTensor([1, 4, 2, 16], seed: 9)
        let plain = try KVCache(kvHeads: 2, headDim: 16, capacity: 64)
        try plain.append(layer: 0, keys: k, values: v)
        let padded = try KVCache(kvHeads: 2, headDim: 16, capacity: 64)
        try padded.append(layer: 0, keys: embeddedInNaN(k, innerStride: 3), values: embeddedInNaN(v))
        let attention = MultiQueryAttention(causal: true)
        expectBitwiseEqual(try attention.decode(query: q, cache: plain),
                           try attention.decode(query: embeddedInNaN(q, innerStride: 2), cache: padded),
                           "strided query and cache")
    }

    /// Float16 rows of 33 and 3 elements (66 and 6 bytes, not multiples of 4): before the
    /// fix, decode's line touch loaded 4 bytes at byte 64 of a 66-byte cache, reading past
    /// its end (AddressSanitizer reports it; see KernelDocs/Robustness.md for the run).
    @Test("decode reads only the cache: Float16 rows not a multiple of 4 bytes", arguments: [1, 3, 40])
    func decodeOddFloat16Rows(length: Int) throws {
        let cache = try KVCache(kvHeads: 1, headDim: 33, valueDim: 3, capacity: length, precision: .float16)
        try cache.append(layer: 0, keys: randomTensor([1, 1, length, 33], seed: 11),
                         values: randomTensor([1, 1, length, 3], seed: 12))
        try checkDecode(MultiQueryAttention(causal: true), query: randomTensor([1, 2, 1, 33], seed: 13), cache: cache,
                        "Float16 D 33, Dv 3, L \(length)")
    }

    @Test("decode shape errors")
    func decodeErrors() throws {
        let cache = try KVCache(layers: 2, batch: 2, kvHeads: 4, headDim: 8, capacity: 10)
        let attention = MultiQueryAttention()
        expectAttentionError(.invalidShape, mentioning: ["heads (6)", "kvHeads (4)"]) {
            try attention.decode(query: Tensor(shape: [2, 6, 1, 8]), cache: cache)
        }
        expectAttentionError(.shapeMismatch, mentioning: ["batch", "2"]) {
            try attention.decode(query: Tensor(shape: [1, 4, 1, 8]), cache: cache)
        }
        expectAttentionError(.shapeMismatch, mentioning: ["headDim", "8"]) {
            try attention.decode(query: Tensor(shape: [2, 4, 1, 9]), cache: cache)
        }
        expectAttentionError(.invalidParameter, mentioning: ["layer 2"]) {
            try attention.decode(query: Tensor(shape: [2, 4, 1, 8]), cache: cache, layer: 2)
        }
        expectAttentionError(.invalidParameter, mentioning: ["threads"]) {
            try attention.decode(query: Tensor(shape: [2, 4, 1, 8]), cache: cache, threads: 0)
        }
    }

    @Test("decode cost: FLOPs and pairs of one query against the cache")
    func decodeCost() throws {
        let shape = AttentionShape(heads: 32, kvHeads: 1, queryLength: 1, keyLength: 32768, headDim: 128)
        let cost = try MultiQueryAttention(causal: true).decodeCost(shape, threads: 2)
        #expect(cost.scoredPairs == 32 * 32768)
        #expect(cost.flops == 2 * 32 * 32768 * 256)
        #expect(cost.workspaceBytes > 0)
    }
}
