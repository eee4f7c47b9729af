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
}
