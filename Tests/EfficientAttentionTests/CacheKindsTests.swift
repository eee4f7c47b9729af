// Cache kinds and precisions: bfloat16 and Int8 storage (conversions against references,
// the Int8 error bound against Float32 in Double), the rotating and paged caches against
// the contiguous cache bitwise, all-or-nothing appends, exhaustion and bad options.

@_spi(Testing) import EfficientAttention
import Foundation
import Testing

/// Positions `range` of every batch item and head of `x` `[B, H, N, D]`.
private func positions(_ x: Tensor, _ range: Range<Int>) throws -> Tensor {
    let s = x.shape
    var data = [Float]()
    for b in 0..<s[0] { for h in 0..<s[1] { for i in range { for c in 0..<s[3] { data.append(x[b, h, i, c]) } } } }
    return try Tensor(shape: [s[0], s[1], range.count, s[3]], data: data)
}

extension Tensor {
    /// `[B, H, N, D]` → `[B, H, D, N]`.
    func transposedLastTwo() throws -> Tensor {
        let s = shape
        var data = [Float]()
        for b in 0..<s[0] { for h in 0..<s[1] { for c in 0..<s[3] { for i in 0..<s[2] { data.append(self[b, h, i, c]) } } } }
        return try Tensor(shape: [s[0], s[1], s[3], s[2]], data: data)
    }
}

/// Batch item `b` of `x`.
private func item(_ x: Tensor, _ b: Int) throws -> Tensor {
    let s = x.shape
    var data = [Float]()
    for h in 0..<s[1] { for i in 0..<s[2] { for c in 0..<s[3] { data.append(x[b, h, i, c]) } } }
    return try Tensor(shape: [1, s[1], s[2], s[3]], data: data)
}

/// The decode visibility of `n` queries over `length` held keys (bottom-right aligned).
private func decodeVisibility(_ attention: MultiQueryAttention, queryLength n: Int, keyLength length: Int) -> Visibility {
    let (left, right, causal) = (attention.leftWindow, attention.rightWindow, attention.causal)
    return { _, _, i, j in
        let p = i + length - n
        if let left, j < p - left { return false }
        if let right, j > p + right { return false }
        return !causal || j <= p
    }
}

/// The nearest bfloat16 of `x` by exhaustive comparison in Double (ties to even), as bits.
private func referenceBFloat16(_ x: Float) -> UInt16 {
    let upper = UInt16(truncatingIfNeeded: x.bitPattern >> 16)
    if x.isNaN { return upper | 0x40 }
    let down = Float(bitPattern: UInt32(upper) << 16)
    let up = Float(bitPattern: UInt32(upper &+ 1) << 16)   // the next magnitude (same sign)
    let dDown = abs(Double(x) - Double(down)), dUp = up.isNaN ? .infinity : abs(Double(x) - Double(up))
    // Past the largest finite bfloat16 the "next" value is infinity: round-to-nearest sends
    // halfway-and-beyond there, which the Double distance to infinity cannot express.
    if up.isInfinite && !down.isInfinite {
        let halfway = Double(down) + (Double(down) - Double(Float(bitPattern: UInt32(upper &- 1) << 16))) / 2
        return abs(Double(x)) >= abs(halfway) ? upper &+ 1 : upper
    }
    if dDown < dUp { return upper }
    if dUp < dDown { return upper &+ 1 }
    return upper & 1 == 0 ? upper : upper &+ 1
}

@Suite("Cache kinds and precisions") struct CacheKindsTests {

    // MARK: bfloat16

    @Test("bfloat16: every pattern round-trips, NaN stays NaN, rounding to nearest even (scalar and cache paths)")
    func bfloat16Conversions() throws {
        // All 65536 patterns widened then stored in a cache row and read back.
        let all = (0..<65536).map { Float(bitPattern: UInt32($0) << 16) }
        let cache = try KVCache(kvHeads: 1, headDim: 65536, valueDim: 1, capacity: 1, precision: .bfloat16)
        try cache.append(layer: 0, keys: Tensor(shape: [1, 1, 1, 65536], data: all), values: Tensor(shape: [1, 1, 1, 1]))
        let back = try cache.keys(layer: 0, batchItem: 0).elements
        var wrong = 0
        for p in 0..<65536 {
            let x = all[p]
            if x.isNaN {
                if !back[p].isNaN || BFloat16Conversions.bits(x) & 0x7FC0 != 0x7FC0 { wrong += 1 }
            } else if back[p].bitPattern != x.bitPattern || BFloat16Conversions.bits(x) != UInt16(p) {
                wrong += 1
            }
        }
        #expect(wrong == 0, "\(wrong) of 65536 bfloat16 patterns do not round-trip")

        // Rounding: ties (exactly halfway, even and odd), just above and below, overflow,
        // subnormals, and random values, against the exhaustive Double reference.
        var values: [Float] = [0, -0, 1, -1, .greatestFiniteMagnitude, -.greatestFiniteMagnitude, .infinity,
                               .leastNonzeroMagnitude, .leastNormalMagnitude, Float(bitPattern: 0x7F7F_8000),
                               Float(bitPattern: 0x7F7F_7FFF)]
        for upper in [0x3F80, 0x3F81, 0x0001, 0x8002, 0xC123, 0x7F7E, 0x0080] as [UInt32] {
            for lower in [0x8000, 0x7FFF, 0x8001, 0x0001, 0xFFFF] as [UInt32] {
                values.append(Float(bitPattern: upper << 16 | lower))
            }
        }
        var rng = SystemRandomNumberGenerator()
        for _ in 0..<4000 { values.append(Float(bitPattern: UInt32.random(in: 0...UInt32.max, using: &rng))) }
        let row = BFloat16Conversions.rowBits(values)
        let storeCache = try KVCache(kvHeads: 1, headDim: values.count, valueDim: 1, capacity: 1, precision: .bfloat16)
        try storeCache.append(layer: 0, keys: Tensor(shape: [1, 1, 1, values.count], data: values),
                              values: Tensor(shape: [1, 1, 1, 1]))
        let stored = try storeCache.keys(layer: 0, batchItem: 0).elements
        var mismatches: [String] = []
        for (i, x) in values.enumerated() {
            let expected = referenceBFloat16(x)
            let scalar = BFloat16Conversions.bits(x), lane = row[i]
            let cached = UInt16(truncatingIfNeeded: stored[i].bitPattern >> 16)
            if x.isNaN {
                if !stored[i].isNaN || scalar & 0x7FC0 != 0x7FC0 || lane & 0x7FC0 != 0x7FC0 { mismatches.append("NaN \(x.bitPattern)") }
            } else if scalar != expected || lane != expected || cached != expected || stored[i].bitPattern & 0xFFFF != 0 {
                mismatches.append(String(format: "%08x: reference %04x scalar %04x lanes %04x cache %04x",
                                         x.bitPattern, expected, scalar, lane, cached))
            }
        }
        #expect(mismatches.isEmpty, "\(mismatches.count) roundings differ: \(mismatches.prefix(5))")
    }

    // MARK: Int8

    @Test("Int8 quantisation: s = max|x| / 127, round(x / s), zero rows, read back as the kernel dequantises")
    func int8Quantization() throws {
        let rows: [[Float]] = [[0, 0, 0], [1, -1, 0.5, 0.25], [127, -63.5, 0.49, 3e-39, -3e-39], [-2e-45, 1e-45],
                               (0..<37).map { sin(Float($0)) * 1000 }]
        for row in rows {
            let (q, s) = Int8CacheConversions.quantize(row)
            let m = row.map { abs($0) }.max()!
            #expect(m == 0 ? s == 0 : s == max(m / 127, .leastNonzeroMagnitude), "scale of \(row)")
            for (x, v) in zip(row, q) {
                if s == 0 {
                    #expect(v == 0)
                } else {
                    let exact = Double(x) / Double(s)
                    #expect(abs(Double(v) - max(-127, min(127, exact))) <= 0.5 + 1e-6 * abs(exact), "\(x) -> \(v) (scale \(s))")
                }
            }
            let cache = try KVCache(kvHeads: 1, headDim: row.count, capacity: 1, precision: .int8)
            try cache.append(layer: 0, keys: Tensor(shape: [1, 1, 1, row.count], data: row),
                             values: Tensor(shape: [1, 1, 1, row.count], data: row))
            let back = try cache.keys(layer: 0, batchItem: 0).elements
            #expect(back == zip(q, row).map { v, _ in Float(v) * s }, "read back of \(row)")
            // |x − s · q| ≤ s / 2 = max|x| / 254.
            for (x, y) in zip(row, back) { #expect(abs(x - y) <= m / 254 * 1.0001 + 1e-44) }
        }
    }

    @Test("contiguous cache, every precision: decode within the precision's bound of Float32 (Double reference), exact over the stored rows, threads 1/2/3 bitwise",
          arguments: KVCache.Precision.allCases, [(4, 4, 1, 64), (8, 2, 3, 33), (16, 1, 2, 130), (2, 2, 1, 3)])
    func contiguousPrecisions(precision: KVCache.Precision, problem: (Int, Int, Int, Int)) throws {
        let (heads, kvHeads, n, d) = problem
        let length = 300, batch = 2
        let k = try randomTensor([batch, kvHeads, length, d], seed: 11), v = try randomTensor([batch, kvHeads, length, d], seed: 12)
        let q = try randomTensor([batch, heads, n, d], seed: 13)
        let cache = try KVCache(batch: batch, kvHeads: kvHeads, headDim: d, capacity: length, precision: precision)
        try cache.append(layer: 0, keys: positions(k, 0..<200), values: positions(v, 0..<200))
        try cache.append(layer: 0, batchItem: 0, keys: positions(try item(k, 0), 200..<length),
                         values: positions(try item(v, 0), 200..<length))
        let attention = MultiQueryAttention(causal: true, leftWindow: 150, decodeChunkLength: 64)
        let one = try attention.decode(query: q, cache: cache, threads: 1)
        for threads in [2, 3] {
            expectBitwiseEqual(one, try attention.decode(query: q, cache: cache, threads: threads), "\(precision) threads \(threads)")
        }
        let scale = defaultScale(headDim: d)
        for b in 0..<batch {
            let held = try cache.length(layer: 0, batchItem: b)
            let qb = try item(q, b)
            let visible = decodeVisibility(attention, queryLength: n, keyLength: held)
            // Exact (Float rounding only) over the stored rows.
            let stored = referenceAttention(query: qb, key: try cache.keys(layer: 0, batchItem: b),
                                            value: try cache.values(layer: 0, batchItem: b), scale: scale, visible: visible)
            // Against the Float32 keys and values.
            let kb = try positions(try item(k, b), 0..<held), vb = try positions(try item(v, b), 0..<held)
            let exact = referenceAttention(query: qb, key: kb, value: vb, scale: scale, visible: visible)
            let kMax = Double(kb.elements.map { abs($0) }.max()!), vMax = Double(vb.elements.map { abs($0) }.max()!)
            for h in 0..<heads { for i in 0..<n {
                let r = (h * n + i), mine = one.output.elements[(b * heads * n + r) * d..<(b * heads * n + r + 1) * d]
                let lse = Double(one.logSumExp[b, h, i, 0])
                // Bound of the precision (per element of the output, and on the lse):
                // keys off by at most u·|k| move each score by Δ = scale · ||q||₁ · u · max|k|,
                // the weights by a factor e^{±2Δ}; values off by u · max|v|.
                let u: Double = switch precision {
                case .float32: 0
                case .float16: 1.0 / 2048
                case .bfloat16: 1.0 / 256
                case .int8: 1.0 / 254
                }
                var q1 = 0.0
                for c in 0..<d { q1 += abs(Double(qb[0, h, i, c])) }
                let delta = scale * q1 * u * kMax
                let bound = (exp(2 * delta) - 1) * vMax + u * vMax + 2e-5
                var worstStored = 0.0, worstExact = 0.0
                for c in 0..<d {
                    let x = Double(mine[mine.startIndex + c])
                    worstStored = max(worstStored, abs(x - stored.output[r * d + c]))
                    worstExact = max(worstExact, abs(x - exact.output[r * d + c]))
                }
                #expect(worstStored <= 2e-5 && abs(lse - stored.lse[r]) <= 2e-5,
                        "\(precision) b\(b) h\(h) i\(i): \(worstStored) from the stored rows")
                #expect(worstExact <= bound && abs(lse - exact.lse[r]) <= delta + 2e-5,
                        "\(precision) b\(b) h\(h) i\(i): \(worstExact) from Float32 > bound \(bound)")
            } }
        }
    }

    @Test("Int8 appends of non-finite values throw and leave the cache unchanged")
    func int8NonFinite() throws {
        let cache = try KVCache(batch: 2, kvHeads: 1, headDim: 4, capacity: 8, precision: .int8)
        try cache.append(layer: 0, keys: randomTensor([2, 1, 3, 4], seed: 1), values: randomTensor([2, 1, 3, 4], seed: 2))
        let before = try cache.keys(layer: 0, batchItem: 1)
        var bad = try randomTensor([2, 1, 2, 4], seed: 3)
        bad[1, 0, 1, 2] = .nan
        expectAttentionError(.invalidParameter, mentioning: ["int8", "keys[1, 0, 1, 2]"]) {
            try cache.append(layer: 0, keys: bad, values: randomTensor([2, 1, 2, 4], seed: 4))
        }
        #expect(try cache.length(layer: 0, batchItem: 0) == 3 && cache.keys(layer: 0, batchItem: 1) == before)
        #expect(cache.memoryBytes == 2 * 1 * 8 * 2 * (4 + 4))
    }

    // MARK: Rotating

    @Test("rotating cache equals the contiguous cache holding the same last W positions, bitwise (wrap-around, per-item appends, appends longer than W, threads 1/2/3)",
          arguments: KVCache.Precision.allCases, [(4, 4, 1), (8, 2, 3)])
    func rotatingEqualsContiguous(precision: KVCache.Precision, problem: (Int, Int, Int)) throws {
        let (heads, kvHeads, n) = problem
        let window = 37, d = 33, batch = 2
        let ring = try RotatingKVCache(batch: batch, kvHeads: kvHeads, headDim: d, window: window, precision: precision)
        var history = [History](repeating: History(heads: kvHeads), count: batch)
        let windowed = MultiQueryAttention(causal: true, leftWindow: window - 1, decodeChunkLength: 8)
        let unbounded = MultiQueryAttention(causal: true, decodeChunkLength: 16)
        var seed: UInt64 = 100
        for (step, count) in [5, 1, 40, 1, 3, 1, 16, 30, 1, 2, 75, 1].enumerated() {
            seed += 2
            let k = try randomTensor([batch, kvHeads, count, d], seed: seed), v = try randomTensor([batch, kvHeads, count, d], seed: seed + 1)
            try ring.append(layer: 0, keys: k, values: v)
            for b in 0..<batch { history[b].append(try item(k, b), try item(v, b)) }
            if step % 3 == 1 {   // item 1 runs ahead
                let k1 = try randomTensor([1, kvHeads, 2, d], seed: seed + 500), v1 = try randomTensor([1, kvHeads, 2, d], seed: seed + 501)
                try ring.append(layer: 0, batchItem: 1, keys: k1, values: v1)
                history[1].append(k1, v1)
            }
            let contiguous = try KVCache(batch: batch, kvHeads: kvHeads, headDim: d, capacity: window, precision: precision)
            for b in 0..<batch {
                let total = try ring.position(batchItem: b), first = try ring.firstPosition(batchItem: b)
                #expect(total == history[b].count && total - first == min(total, window))
                try contiguous.append(layer: 0, batchItem: b, keys: history[b].keys(first..<total),
                                      values: history[b].values(first..<total))
                #expect(try ring.keys(layer: 0, batchItem: b) == contiguous.keys(layer: 0, batchItem: b)
                        && ring.values(layer: 0, batchItem: b) == contiguous.values(layer: 0, batchItem: b),
                        "step \(step) item \(b): held rows")
            }
            let q = try randomTensor([batch, heads, n, d], seed: seed + 1000)
            for attention in [windowed, unbounded] {
                let expected = try attention.decode(query: q, cache: contiguous, threads: 1)
                for threads in [1, 2, 3] {
                    expectBitwiseEqual(try attention.decode(query: q, cache: ring, threads: threads), expected,
                                       "\(precision) step \(step) window \(String(describing: attention.leftWindow)) threads \(threads)")
                }
            }
        }
        #expect(ring.memoryBytes == batch * kvHeads * window * 2 * precision.rowBytes(width: d))
        #expect(ring.usedBytes == batch * kvHeads * window * 2 * precision.rowBytes(width: d))
    }

    @Test("rotating cache: failed appends change nothing; bad options throw naming the option")
    func rotatingErrors() throws {
        let ring = try RotatingKVCache(batch: 2, kvHeads: 1, headDim: 4, window: 5, precision: .int8)
        try ring.append(layer: 0, keys: randomTensor([2, 1, 7, 4], seed: 1), values: randomTensor([2, 1, 7, 4], seed: 2))
        let before = try (0..<2).map { try (ring.keys(batchItem: $0), ring.values(batchItem: $0), ring.position(batchItem: $0)) }
        var bad = try randomTensor([2, 1, 2, 4], seed: 3)
        bad[0, 0, 1, 3] = .infinity
        expectAttentionError(.invalidParameter, mentioning: ["int8"]) {
            try ring.append(layer: 0, keys: bad, values: randomTensor([2, 1, 2, 4], seed: 4))
        }
        expectAttentionError(.shapeMismatch, mentioning: ["valueDim"]) {
            try ring.append(layer: 0, keys: randomTensor([2, 1, 2, 4], seed: 4), values: randomTensor([2, 1, 2, 3], seed: 4))
        }
        expectAttentionError(.invalidParameter, mentioning: ["layer 1"]) {
            try ring.append(layer: 1, keys: randomTensor([2, 1, 2, 4], seed: 4), values: randomTensor([2, 1, 2, 4], seed: 4))
        }
        expectAttentionError(.invalidParameter, mentioning: ["batch item 2"]) {
            try ring.append(layer: 0, batchItem: 2, keys: randomTensor([1, 1, 2, 4], seed: 4), values: randomTensor([1, 1, 2, 4], seed: 4))
        }
        for b in 0..<2 {
            #expect(try ring.keys(batchItem: b) == before[b].0 && ring.values(batchItem: b) == before[b].1
                    && ring.position(batchItem: b) == before[b].2)
        }
        expectAttentionError(.invalidShape, mentioning: ["RotatingKVCache window"]) {
            try RotatingKVCache(kvHeads: 1, headDim: 4, window: 0)
        }
        expectAttentionError(.invalidParameter, mentioning: ["RotatingKVCache window", "at most"]) {
            try RotatingKVCache(kvHeads: 1, headDim: 4, window: 1 << 31)
        }
        expectAttentionError(.sizeOverflow, mentioning: ["RotatingKVCache keys"]) {
            try RotatingKVCache(layers: 1 << 20, kvHeads: 1 << 20, headDim: 1 << 20, window: 1 << 20)
        }
    }

    // MARK: Paged

    @Test("paged cache equals the contiguous cache bitwise: page boundaries, sequences interleaved, pages reused after a sequence ends, threads 1/2/3",
          arguments: KVCache.Precision.allCases, [(4, 4, 1), (8, 2, 2)])
    func pagedEqualsContiguous(precision: KVCache.Precision, problem: (Int, Int, Int)) throws {
        let (heads, kvHeads, n) = problem
        let pageSize = 8, d = 20, layers = 2
        let pool = try PagedKVCache(layers: layers, kvHeads: kvHeads, headDim: d, pageSize: pageSize, pageCount: 40,
                                    precision: precision)
        #expect(pool.memoryBytes == 40 * layers * kvHeads * pageSize * 2 * precision.rowBytes(width: d))
        var ids = [pool.addSequence(), pool.addSequence(), pool.addSequence()]
        var history: [Int: [History]] = [:]
        for id in ids { history[id] = [History](repeating: History(heads: kvHeads), count: layers) }
        let attention = MultiQueryAttention(causal: true, leftWindow: 50, decodeChunkLength: 16)
        var seed: UInt64 = 300
        let sizes = [3, 1, 8, 5, 13, 1, 7, 16, 2]
        for step in 0..<24 {
            let id = ids[step % ids.count], count = sizes[step % sizes.count]
            for layer in 0..<layers {
                seed += 2
                let k = try randomTensor([1, kvHeads, count, d], seed: seed), v = try randomTensor([1, kvHeads, count, d], seed: seed + 1)
                try pool.append(sequence: id, layer: layer, keys: k, values: v)
                history[id]![layer].append(k, v)
            }
            if step == 11 {   // end one sequence, start another: it reuses the freed pages
                let freed = try pool.pageTable(of: ids[1]).count, free = pool.freePages
                try pool.endSequence(ids[1])
                #expect(pool.freePages == free + freed)
                ids[1] = pool.addSequence()
                history[ids[1]] = [History](repeating: History(heads: kvHeads), count: layers)
                continue
            }
            // Decode the live sequences in a permuted order against a contiguous cache of the same history.
            let order = [ids[2], ids[0], ids[1]].filter { try! pool.length(sequence: $0, layer: 1) > 0 }
            let batch = try pool.batch(order)
            let contiguous = try KVCache(layers: layers, batch: order.count, kvHeads: kvHeads, headDim: d, capacity: 200,
                                         precision: precision)
            for (b, id) in order.enumerated() {
                for layer in 0..<layers {
                    let h = history[id]![layer]
                    try contiguous.append(layer: layer, batchItem: b, keys: h.keys(0..<h.count), values: h.values(0..<h.count))
                    #expect(try pool.keys(sequence: id, layer: layer) == contiguous.keys(layer: layer, batchItem: b))
                }
            }
            let q = try randomTensor([order.count, heads, n, d], seed: seed + 1000)
            let expected = try attention.decode(query: q, cache: contiguous, layer: 1, threads: 1)
            for threads in [1, 2, 3] {
                expectBitwiseEqual(try attention.decode(query: q, cache: batch, layer: 1, threads: threads), expected,
                                   "\(precision) step \(step) threads \(threads)")
            }
        }
        let held = try ids.map { id in try (0..<layers).map { try pool.length(sequence: id, layer: $0) }.reduce(0, +) }
        #expect(pool.usedBytes() == held.reduce(0, +) * kvHeads * 2 * precision.rowBytes(width: d))
        #expect(try pool.batch([ids[0]]).usedBytes == held[0] * kvHeads * 2 * precision.rowBytes(width: d))
        let used = try ids.map { try pool.pageTable(of: $0).count }.reduce(0, +)
        #expect(pool.freePages == 40 - used)
        for id in ids { try pool.endSequence(id) }
        #expect(pool.freePages == 40)
    }

    @Test("paged cache: pool exhaustion throws and changes nothing (single and batched appends)",
          arguments: [KVCache.Precision.float32, .float16])
    func pagedExhaustion(precision: KVCache.Precision) throws {
        let pool = try PagedKVCache(kvHeads: 2, headDim: 4, pageSize: 4, pageCount: 5, precision: precision)
        let a = pool.addSequence(), b = pool.addSequence()
        try pool.append(sequence: a, layer: 0, keys: randomTensor([1, 2, 14, 4], seed: 1), values: randomTensor([1, 2, 14, 4], seed: 2))
        try pool.append(sequence: b, layer: 0, keys: randomTensor([1, 2, 1, 4], seed: 3), values: randomTensor([1, 2, 1, 4], seed: 4))
        #expect(pool.freePages == 0)
        func snapshot() throws -> [[Float]] {
            try [a, b].flatMap { [try pool.keys(sequence: $0).elements, try pool.values(sequence: $0).elements,
                                  try pool.pageTable(of: $0).map(Float.init)] }
        }
        let before = try snapshot()
        expectAttentionError(.invalidParameter, mentioning: ["exhausted", "needs 1 pages", "0 of 5"]) {
            try pool.append(sequence: a, layer: 0, keys: randomTensor([1, 2, 3, 4], seed: 5), values: randomTensor([1, 2, 3, 4], seed: 6))
        }
        // Batched: 3 positions fit b's page, not a's: neither changes.
        expectAttentionError(.invalidParameter, mentioning: ["exhausted"]) {
            try pool.batch([b, a]).append(layer: 0, keys: randomTensor([2, 2, 3, 4], seed: 7), values: randomTensor([2, 2, 3, 4], seed: 8))
        }
        #expect(try snapshot() == before && pool.freePages == 0)
        #expect(try pool.length(sequence: a) == 14 && pool.length(sequence: b) == 1)
        // b still has room in its page: 3 positions fit without a new page.
        try pool.append(sequence: b, layer: 0, keys: randomTensor([1, 2, 3, 4], seed: 9), values: randomTensor([1, 2, 3, 4], seed: 10))
        #expect(try pool.length(sequence: b) == 4)
    }

    @Test("paged cache: a batched append counts a page shared among its writers once per copy it needs (found by the fuzzer)")
    func pagedBatchSharedPageCount() throws {
        let d = 4
        let pool = try PagedKVCache(kvHeads: 1, headDim: d, pageSize: 8, pageCount: 3)
        let (a, b) = (pool.addSequence(), pool.addSequence())
        try pool.batch([a, b]).append(layer: 0, keys: randomTensor([2, 1, 3, d], seed: 1),
                                      values: randomTensor([2, 1, 3, d], seed: 2))
        // c shares a's page (2 of its 3 positions): that page has 2 holders, one page is free.
        let c = try pool.addSequence(sharing: [pool.pageTable(of: a)[0]], length: 2)
        #expect(pool.freePages == 1)
        let before = try [a, b, c].map { try pool.keys(sequence: $0) }
        // b writes its own page, a copies the shared page (the one free page), and c, then its
        // only holder, writes it in place: the append fits.
        let keys = try randomTensor([3, 1, 2, d], seed: 3), values = try randomTensor([3, 1, 2, d], seed: 4)
        try pool.append(sequences: [b, a, c], layer: 0, keys: keys, values: values)
        #expect(pool.freePages == 0)
        // Each sequence holds what it held, then its item's two new rows (a's and c's first
        // two positions alike: c's copy of a's page was untouched by a's append).
        for (n, (id, held)) in zip([b, a, c], [before[1], before[0], before[2]]).enumerated() {
            let now = try pool.keys(sequence: id), count = held.shape[2]
            #expect(try positions(now, 0..<count) == held, "sequence \(id) kept its rows")
            let item = try Tensor(shape: [1, 1, 2, d], data: Array(keys.elements[(n * 2 * d)..<((n + 1) * 2 * d)]))
            #expect(try positions(now, count..<(count + 2)) == item, "sequence \(id) got its item's rows")
        }
        // A second copy of a page shared with a sequence outside the batch does not fit.
        let e = try pool.addSequence(sharing: [pool.pageTable(of: c)[0]], length: 4)
        let f = try pool.addSequence(sharing: [pool.pageTable(of: c)[0]], length: 4)
        expectAttentionError(.invalidParameter, mentioning: ["exhausted", "needs 2 pages", "0 of 3"]) {
            try pool.append(sequences: [e, f], layer: 0, keys: randomTensor([2, 1, 1, d], seed: 5),
                            values: randomTensor([2, 1, 1, d], seed: 6))
        }
    }

    @Test("paged cache: shared prefix pages (copy on write), bad page tables and bad options throw naming the entry")
    func pagedSharingAndBadTables() throws {
        let d = 6
        let pool = try PagedKVCache(kvHeads: 1, headDim: d, pageSize: 8, pageCount: 8)
        let a = pool.addSequence()
        let ka = try randomTensor([1, 1, 20, d], seed: 1), va = try randomTensor([1, 1, 20, d], seed: 2)
        try pool.append(sequence: a, layer: 0, keys: ka, values: va)
        let tableA = try pool.pageTable(of: a)
        let aKeys = try pool.keys(sequence: a)
        // Share A's first 12 positions (one full page, one partial), then grow B: B copies the partial page.
        let b = try pool.addSequence(sharing: Array(tableA[0..<2]), length: 12)
        #expect(pool.freePages == 5)
        let kb = try randomTensor([1, 1, 6, d], seed: 3), vb = try randomTensor([1, 1, 6, d], seed: 4)
        try pool.append(sequence: b, layer: 0, keys: kb, values: vb)
        #expect(try pool.pageTable(of: b)[0] == tableA[0] && pool.pageTable(of: b)[1] != tableA[1])
        #expect(try pool.keys(sequence: a) == aKeys, "B's append must not change A")
        let contiguous = try KVCache(kvHeads: 1, headDim: d, capacity: 18)
        try contiguous.append(layer: 0, keys: positions(ka, 0..<12), values: positions(va, 0..<12))
        try contiguous.append(layer: 0, keys: kb, values: vb)
        let q = try randomTensor([1, 2, 1, d], seed: 5)
        expectBitwiseEqual(try MultiQueryAttention(causal: true, decodeChunkLength: 4).decode(query: q, cache: pool.batch([b])),
                           try MultiQueryAttention(causal: true, decodeChunkLength: 4).decode(query: q, cache: contiguous),
                           "shared prefix")
        try pool.endSequence(a)
        #expect(pool.freePages == 8 - 1 - 2, "the shared first page stays with B")
        try pool.endSequence(b)
        #expect(pool.freePages == 8)

        let c = pool.addSequence()
        try pool.append(sequence: c, layer: 0, keys: randomTensor([1, 1, 10, d], seed: 6), values: randomTensor([1, 1, 10, d], seed: 7))
        let tableC = try pool.pageTable(of: c)
        let free = pool.freePages
        let unused = (0..<8).first { !tableC.contains($0) }!
        expectAttentionError(.invalidParameter, mentioning: ["pageTable[1] = 8", "outside 0..<8"]) {
            try pool.addSequence(sharing: [tableC[0], 8], length: 10)
        }
        expectAttentionError(.invalidParameter, mentioning: ["pageTable[1] = \(unused)", "free page"]) {
            try pool.addSequence(sharing: [tableC[0], unused], length: 10)
        }
        expectAttentionError(.invalidParameter, mentioning: ["pageTable[1]", "repeats"]) {
            try pool.addSequence(sharing: [tableC[0], tableC[0]], length: 10)
        }
        expectAttentionError(.invalidParameter, mentioning: ["2 pages", "take 1"]) {
            try pool.addSequence(sharing: tableC, length: 5)
        }
        expectAttentionError(.invalidParameter, mentioning: ["not the first pages"]) {
            try pool.addSequence(sharing: [tableC[1], tableC[0]], length: 10)
        }
        expectAttentionError(.invalidParameter, mentioning: ["not the first pages", "11 positions"]) {
            try pool.addSequence(sharing: tableC, length: 11)
        }
        expectAttentionError(.invalidParameter, mentioning: ["sequence 99", "not live"]) {
            try pool.append(sequence: 99, layer: 0, keys: randomTensor([1, 1, 1, d], seed: 8), values: randomTensor([1, 1, 1, d], seed: 9))
        }
        expectAttentionError(.invalidParameter, mentioning: ["repeat"]) { try pool.batch([c, c]) }
        let ended = pool.addSequence()
        let stale = try pool.batch([c, ended])
        try pool.endSequence(ended)
        expectAttentionError(.invalidParameter, mentioning: ["sequence \(ended)", "not live"]) {
            try MultiQueryAttention().decode(query: randomTensor([2, 1, 1, d], seed: 10), cache: stale)
        }
        #expect(pool.freePages == free && pool.sequenceIDs == [c])

        expectAttentionError(.invalidParameter, mentioning: ["pageSize", "power of two"]) {
            try PagedKVCache(kvHeads: 1, headDim: 4, pageSize: 12, pageCount: 4)
        }
        expectAttentionError(.invalidShape, mentioning: ["pageCount"]) {
            try PagedKVCache(kvHeads: 1, headDim: 4, pageSize: 16, pageCount: 0)
        }
        expectAttentionError(.sizeOverflow, mentioning: ["PagedKVCache keys"]) {
            try PagedKVCache(layers: 1 << 20, kvHeads: 1 << 20, headDim: 1 << 20, pageSize: 1 << 20, pageCount: 1 << 20)
        }
        expectAttentionError(.invalidParameter, mentioning: ["pageSize", "power of two"]) {
            try MultiQueryAttention().decoding(cache: .paged(pageSize: 6, pageCount: nil))
                .makeDecodingState(batch: 1, heads: 1, kvHeads: 1, headDim: 4, valueDim: 4, capacity: 10)
        }
        expectAttentionError(.invalidParameter, mentioning: ["window", "at least 1"]) {
            try MultiQueryAttention().decoding(cache: .rotating(window: 0))
                .makeDecodingState(batch: 1, heads: 1, kvHeads: 1, headDim: 4, valueDim: 4, capacity: 10)
        }
    }

    // MARK: Score modifiers

    /// Decoding with soft-capping, ALiBi, a bias (with a row it hides entirely) and sinks,
    /// on both decode paths (per-row: G · n < 8; grouped: G · n ≥ 8), against the Double
    /// reference of each batch item's own call (keys `[0, L_b)`, query `i` at `L_b − n + i`);
    /// rotating and paged caches equal the contiguous one bitwise; 1 and 3 threads alike.
    @Test("cache decode with score modifiers: both kernel paths against the reference, every cache kind bitwise",
          arguments: [(4, 2, 1), (4, 2, 3), (8, 1, 1), (8, 1, 3)])
    func decodeWithModifiers(problem: (Int, Int, Int)) throws {
        let (heads, kvHeads, n) = problem
        let d = 65, lengths = [37, 100], longest = 100
        let k = try randomTensor([2, kvHeads, longest, d], seed: 71), v = try randomTensor([2, kvHeads, longest, d], seed: 72)
        let contiguous = try KVCache(batch: 2, kvHeads: kvHeads, headDim: d, capacity: 128)
        let ring = try RotatingKVCache(batch: 2, kvHeads: kvHeads, headDim: d, window: 128)
        let pool = try PagedKVCache(kvHeads: kvHeads, headDim: d, pageSize: 16, pageCount: 20)
        let ids = [pool.addSequence(), pool.addSequence()]
        for (b, length) in lengths.enumerated() {
            let keys = try positions(item(k, b), 0..<length), values = try positions(item(v, b), 0..<length)
            try contiguous.append(layer: 0, batchItem: b, keys: keys, values: values)
            try ring.append(layer: 0, batchItem: b, keys: keys, values: values)
            try pool.append(sequence: ids[b], layer: 0, keys: keys, values: values)
        }
        let q = try randomTensor([2, heads, n, d], seed: 73)
        var biasValues = try randomTensor([2, 1, n, longest], seed: 74).elements
        for j in 0..<longest { biasValues[j] = -.infinity }   // item 0, query 0: every key hidden
        let modifiers = ScoreModifiers(softCap: 3, alibiSlopes: ScoreModifiers.standardALiBiSlopes(heads: heads),
                                       bias: try Tensor(shape: [2, 1, n, longest], data: biasValues),
                                       sinks: (0..<heads).map { Float($0) * 0.5 - 1 })
        for causal in [true, false] {
            var attention = MultiQueryAttention(causal: causal, leftWindow: causal ? 50 : nil, decodeChunkLength: 16)
            attention.modifiers = modifiers
            let result = try attention.decode(query: q, cache: contiguous, threads: 1)
            for (b, length) in lengths.enumerated() {
                var itemModifiers = modifiers
                itemModifiers.bias = try positions(item(try Tensor(shape: [2, 1, n, longest], data: biasValues), b)
                    .transposedLastTwo(), 0..<length).transposedLastTwo()
                let reference = modifiedReference(
                    query: try item(q, b), key: try positions(item(k, b), 0..<length),
                    value: try positions(item(v, b), 0..<length),
                    visible: decodeVisibility(attention, queryLength: n, keyLength: length), modifiers: itemModifiers)
                ScoreModifierTests.check(try AttentionResult(output: item(result.output, b), logSumExp: item(result.logSumExp, b)),
                                         reference, "H \(heads) Hkv \(kvHeads) n \(n) causal \(causal) item \(b)")
            }
            // Item 0's query 0 sees no key: 0 with lse = its sink.
            for h in 0..<heads {
                #expect(result.logSumExp[0, h, 0, 0] == modifiers.sinks![h])
                #expect((0..<d).allSatisfy { result.output[0, h, 0, $0] == 0 })
            }
            for threads in [1, 3] {
                expectBitwiseEqual(try attention.decode(query: q, cache: contiguous, threads: threads), result,
                                   "contiguous threads \(threads)")
                expectBitwiseEqual(try attention.decode(query: q, cache: ring, threads: threads), result,
                                   "rotating threads \(threads)")
                expectBitwiseEqual(try attention.decode(query: q, cache: pool.batch(ids), threads: threads), result,
                                   "paged threads \(threads)")
            }
        }
        // A bias of the wrong key length is refused, naming the option.
        var wrong = MultiQueryAttention(causal: true)
        wrong.modifiers = ScoreModifiers(bias: try Tensor(shape: [1, 1, n, 99]))
        #expect(thrownAttentionError { try wrong.decode(query: q, cache: contiguous) }?.message.contains("modifiers.bias") == true)
    }

    // MARK: DecodingAttention

    @Test("every cache kind through DecodingAttention: prefill and steps equal causal attention over the whole sequence",
          arguments: [MultiQueryDecoding.CacheKind.contiguous, .rotating(window: 64), .paged(pageSize: 4, pageCount: nil)],
          [KVCache.Precision.float32, .float16])
    func decodingProtocol(kind: MultiQueryDecoding.CacheKind, precision: KVCache.Precision) throws {
        let steps = [5, 1, 1, 3, 1, 4], n = steps.reduce(0, +)
        let (q, k, v) = try randomQKV(batch: 2, heads: 4, kvHeads: 2, queryLength: n, headDim: 16, valueDim: 8, seed: 91)
        let attention = MultiQueryAttention(causal: true)
        let decoder = attention.decoding(cache: kind, precision: precision)
        var state = try decoder.makeDecodingState(batch: 2, heads: 4, kvHeads: 2, headDim: 16, valueDim: 8, capacity: n)
        let whole = try attention.attend(query: q, key: k, value: v, keyLengths: nil, threads: 1)
        let tolerance: Float = precision == .float32 ? 2e-5 : 4e-3
        var start = 0
        for (t, count) in steps.enumerated() {
            let range = start..<(start + count)
            let step = try decoder.attendNext(query: positions(q, range), key: positions(k, range), value: positions(v, range),
                                              state: &state, threads: t % 3 + 1)
            let expected = try AttentionResult(output: positions(whole.output, range), logSumExp: positions(whole.logSumExp, range))
            expectClose(step, expected, tolerance: tolerance, "\(kind) \(precision) step \(t)")
            start += count
        }
        #expect(try state.length(layer: 0, batchItem: 1) == n)
        // A step that does not fit throws and leaves the state unchanged.
        #expect(throws: AttentionError.self) {
            let (q2, k2, v2) = try randomQKV(batch: 2, heads: 4, kvHeads: 2, queryLength: 1, headDim: 8, seed: 5)
            _ = try decoder.attendNext(query: q2, key: k2, value: v2, state: &state, threads: 1)
        }
        #expect(try state.length(layer: 0, batchItem: 0) == n)
    }

    @Test("rotating cache through DecodingAttention: a sliding-window model decodes past its window")
    func rotatingSlidingWindow() throws {
        let n = 40, window = 8
        let (q, k, v) = try randomQKV(batch: 1, heads: 2, kvHeads: 1, queryLength: n, headDim: 16, seed: 17)
        let attention = MultiQueryAttention(causal: true, leftWindow: window - 1)
        let decoder = attention.decoding(cache: .rotating(window: window), precision: .float32)
        var state = try decoder.makeDecodingState(batch: 1, heads: 2, kvHeads: 1, headDim: 16, valueDim: 16, capacity: 0)
        let whole = try attention.attend(query: q, key: k, value: v, keyLengths: nil, threads: 1)
        var steps = [window]
        while steps.reduce(0, +) < n { steps.append(1) }
        var start = 0
        for count in steps {
            let range = start..<(start + count)
            let step = try decoder.attendNext(query: positions(q, range), key: positions(k, range), value: positions(v, range),
                                              state: &state, threads: 2)
            let expected = try AttentionResult(output: positions(whole.output, range), logSumExp: positions(whole.logSumExp, range))
            expectClose(step, expected, tolerance: 2e-5, "positions \(range)")
            start += count
        }
        #expect(state.memoryBytes == window * 2 * 16 * 4)
    }
}

/// The appended Float rows of one batch item: `keys[h][position]`, `values[h][position]`.
private struct History {
    var keyRows: [[[Float]]], valueRows: [[[Float]]]
    init(heads: Int) { keyRows = Array(repeating: [], count: heads); valueRows = keyRows }
    var count: Int { keyRows[0].count }

    mutating func append(_ k: Tensor, _ v: Tensor) {
        for h in 0..<k.shape[1] {
            for j in 0..<k.shape[2] {
                keyRows[h].append((0..<k.shape[3]).map { k[0, h, j, $0] })
                valueRows[h].append((0..<v.shape[3]).map { v[0, h, j, $0] })
            }
        }
    }

    func keys(_ range: Range<Int>) throws -> Tensor { try tensor(keyRows, range) }
    func values(_ range: Range<Int>) throws -> Tensor { try tensor(valueRows, range) }

    private func tensor(_ rows: [[[Float]]], _ range: Range<Int>) throws -> Tensor {
        let width = rows[0].first?.count ?? 0
        return try Tensor(shape: [1, rows.count, range.count, width], data: rows.flatMap { $0[range].flatMap { $0 } })
    }
}


@Suite("Cache kinds: costs") struct CacheKindCostTests {
    @Test("decode cost by cache kind: rotating and paged Float32 caches reserve the key tile the contiguous one reads in place")
    func costs() throws {
        let shape = AttentionShape(batch: 1, heads: 32, kvHeads: 1, queryLength: 1, keyLength: 4096, headDim: 128)
        let attention = MultiQueryAttention(causal: true)
        let contiguous = try attention.decodeCost(shape, precision: .float32, cacheKind: .contiguous, threads: 2)
        #expect(try contiguous.workspaceBytes == attention.decodeCost(shape, precision: .float32, threads: 2).workspaceBytes)
        for kind in [MultiQueryDecoding.CacheKind.rotating(window: 4096), .paged(pageSize: 16, pageCount: nil)] {
            let other = try attention.decodeCost(shape, precision: .float32, cacheKind: kind, threads: 2)
            #expect(other.workspaceBytes > contiguous.workspaceBytes && other.flops == contiguous.flops, "\(kind)")
        }
        expectAttentionError(.invalidParameter, mentioning: ["pageSize", "power of two"]) {
            try attention.decodeCost(shape, precision: .int8, cacheKind: .paged(pageSize: 24, pageCount: nil), threads: 1)
        }
    }
}
