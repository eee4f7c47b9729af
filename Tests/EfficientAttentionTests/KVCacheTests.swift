// KVCache: exact memory, appends (one and many positions, per batch item), Float16
// rounding, truncation and reset, and failed appends that leave the cache unchanged.

@_spi(Testing) import EfficientAttention
import Foundation
import Testing

@Suite("KVCache") struct KVCacheTests {

    @Test("memory is reported exactly; Float16 halves it; multi-query divides it by H / Hkv")
    func memory() throws {
        let f32 = try KVCache(layers: 3, batch: 2, kvHeads: 4, headDim: 64, valueDim: 32, capacity: 100)
        #expect(f32.memoryBytes == 3 * 2 * 4 * 100 * (64 + 32) * 4)
        #expect(f32.usedBytes == 0)
        let f16 = try KVCache(layers: 3, batch: 2, kvHeads: 4, headDim: 64, valueDim: 32, capacity: 100, precision: .float16)
        #expect(f16.memoryBytes * 2 == f32.memoryBytes)
        let mha = try KVCache(kvHeads: 32, headDim: 128, capacity: 32768)
        let mqa = try KVCache(kvHeads: 1, headDim: 128, capacity: 32768)
        let gqa = try KVCache(kvHeads: 8, headDim: 128, capacity: 32768)
        #expect(mha.memoryBytes == 32 * 32768 * 256 * 4)
        #expect(mha.memoryBytes == 32 * mqa.memoryBytes && mha.memoryBytes == 4 * gqa.memoryBytes)
        try f32.append(layer: 1, keys: Tensor(shape: [2, 4, 7, 64]), values: Tensor(shape: [2, 4, 7, 32]))
        #expect(f32.usedBytes == 2 * 7 * 4 * 96 * 4)
    }

    @Test("appends keep every position; Float16 and bfloat16 store the rounded values",
          arguments: [KVCache.Precision.float32, .float16, .bfloat16])
    func appendsAndReadBack(precision: KVCache.Precision) throws {
        let cache = try KVCache(layers: 2, batch: 2, kvHeads: 3, headDim: 17, valueDim: 5, capacity: 40, precision: precision)
        let k = try randomTensor([2, 3, 10, 17], seed: 1, in: -100...100), v = try randomTensor([2, 3, 10, 5], seed: 2)
        try cache.append(layer: 1, keys: k, values: v)
        let k1 = try randomTensor([1, 3, 1, 17], seed: 3), v1 = try randomTensor([1, 3, 1, 5], seed: 4)
        try cache.append(layer: 1, batchItem: 1, keys: k1, values: v1)
        #expect(try cache.length(layer: 1, batchItem: 0) == 10)
        #expect(try cache.length(layer: 1, batchItem: 1) == 11)
        #expect(try cache.length(layer: 0, batchItem: 1) == 0)
        let stored = try cache.keys(layer: 1, batchItem: 1)
        let storedValues = try cache.values(layer: 1, batchItem: 1)
        #expect(stored.shape == [1, 3, 11, 17] && storedValues.shape == [1, 3, 11, 5])
        func expected(_ x: Float) -> Float {
            switch precision {
            case .float32: x
            case .float16: halfRounded(x)
            default: Float(bitPattern: UInt32(BFloat16Conversions.bits(x)) << 16)   // Int8: CacheKindsTests
            }
        }
        var mismatches = 0
        for h in 0..<3 {
            for j in 0..<10 { for c in 0..<17 where stored[0, h, j, c] != expected(k[1, h, j, c]) { mismatches += 1 } }
            for c in 0..<17 where stored[0, h, 10, c] != expected(k1[0, h, 0, c]) { mismatches += 1 }
            for c in 0..<5 where storedValues[0, h, 10, c] != expected(v1[0, h, 0, c]) { mismatches += 1 }
        }
        #expect(mismatches == 0, "\(mismatches) cached elements differ from the appended ones")
    }

    @Test("truncate and reset")
    func truncateAndReset() throws {
        let cache = try KVCache(layers: 2, batch: 2, kvHeads: 1, headDim: 4, capacity: 8)
        for layer in 0..<2 {
            try cache.append(layer: layer, keys: randomTensor([2, 1, 6, 4], seed: 1), values: randomTensor([2, 1, 6, 4], seed: 2))
        }
        try cache.truncate(to: 4, layer: 1, batchItem: 0)
        #expect(try cache.length(layer: 1, batchItem: 0) == 4 && cache.length(layer: 1, batchItem: 1) == 6)
        try cache.truncate(to: 3)
        #expect(try (0..<2).allSatisfy { l in try (0..<2).allSatisfy { try cache.length(layer: l, batchItem: $0) == 3 } })
        expectAttentionError(.invalidParameter, mentioning: ["truncate to 5", "holds 3"]) {
            try cache.truncate(to: 5)
        }
        expectAttentionError(.invalidParameter, mentioning: ["-1"]) { try cache.truncate(to: -1, layer: 0) }
        // After truncation the next append overwrites the forgotten positions.
        let k = try randomTensor([2, 1, 5, 4], seed: 9)
        try cache.append(layer: 0, keys: k, values: k)
        #expect(try cache.keys(layer: 0, batchItem: 1)[0, 0, 3, 2] == k[1, 0, 0, 2])
        cache.reset()
        let lengthAfterReset = try cache.length(layer: 0, batchItem: 0)
        #expect(cache.usedBytes == 0 && lengthAfterReset == 0)
    }

    @Test("failed appends throw clear errors and leave the cache unchanged", arguments: KVCache.Precision.allCases)
    func failedAppends(precision: KVCache.Precision) throws {
        let cache = try KVCache(batch: 2, kvHeads: 2, headDim: 8, valueDim: 4, capacity: 10, precision: precision)
        try cache.append(layer: 0, keys: randomTensor([2, 2, 9, 8], seed: 1), values: randomTensor([2, 2, 9, 4], seed: 2))
        try cache.append(layer: 0, batchItem: 0, keys: randomTensor([1, 2, 1, 8], seed: 3), values: randomTensor([1, 2, 1, 4], seed: 4))
        let before = try (0..<2).map { (try cache.keys(batchItem: $0), try cache.values(batchItem: $0)) }
        let usedBefore = cache.usedBytes

        // Overflow: item 0 is full, so appending to both items must fail for both.
        expectAttentionError(.invalidParameter, mentioning: ["capacity 10", "batch item 0"]) {
            try cache.append(layer: 0, keys: Tensor(shape: [2, 2, 1, 8]), values: Tensor(shape: [2, 2, 1, 4]))
        }
        expectAttentionError(.invalidParameter, mentioning: ["capacity"]) {
            try cache.append(layer: 0, batchItem: 1, keys: Tensor(shape: [1, 2, 2, 8]), values: Tensor(shape: [1, 2, 2, 4]))
        }
        expectAttentionError(.shapeMismatch, mentioning: ["kvHeads", "3"]) {
            try cache.append(layer: 0, keys: Tensor(shape: [2, 3, 1, 8]), values: Tensor(shape: [2, 3, 1, 4]))
        }
        expectAttentionError(.shapeMismatch, mentioning: ["headDim", "7"]) {
            try cache.append(layer: 0, batchItem: 1, keys: Tensor(shape: [1, 2, 1, 7]), values: Tensor(shape: [1, 2, 1, 4]))
        }
        expectAttentionError(.shapeMismatch, mentioning: ["valueDim", "8"]) {
            try cache.append(layer: 0, batchItem: 1, keys: Tensor(shape: [1, 2, 1, 8]), values: Tensor(shape: [1, 2, 1, 8]))
        }
        expectAttentionError(.shapeMismatch, mentioning: ["positions", "keys 1", "values 2"]) {
            try cache.append(layer: 0, batchItem: 1, keys: Tensor(shape: [1, 2, 1, 8]), values: Tensor(shape: [1, 2, 2, 4]))
        }
        expectAttentionError(.shapeMismatch, mentioning: ["batch", "must be 2"]) {
            try cache.append(layer: 0, keys: Tensor(shape: [1, 2, 1, 8]), values: Tensor(shape: [1, 2, 1, 4]))
        }
        expectAttentionError(.invalidParameter, mentioning: ["layer 1"]) {
            try cache.append(layer: 1, keys: Tensor(shape: [2, 2, 1, 8]), values: Tensor(shape: [2, 2, 1, 4]))
        }
        expectAttentionError(.invalidParameter, mentioning: ["batch item 2"]) {
            try cache.append(layer: 0, batchItem: 2, keys: Tensor(shape: [1, 2, 1, 8]), values: Tensor(shape: [1, 2, 1, 4]))
        }
        #expect(cache.usedBytes == usedBefore)
        for b in 0..<2 {
            #expect(try cache.keys(batchItem: b) == before[b].0 && cache.values(batchItem: b) == before[b].1,
                    "batch item \(b) changed after failed appends")
        }
        // Appending zero positions is allowed and changes nothing.
        try cache.append(layer: 0, keys: Tensor(shape: [2, 2, 0, 8]), values: Tensor(shape: [2, 2, 0, 4]))
        #expect(cache.usedBytes == usedBefore)
        // The one position of room left in item 1 still takes an append.
        try cache.append(layer: 0, batchItem: 1, keys: Tensor(shape: [1, 2, 1, 8]), values: Tensor(shape: [1, 2, 1, 4]))
        #expect(try cache.length(batchItem: 1) == 10)
    }

    @Test("bad cache sizes")
    func badSizes() {
        expectAttentionError(.invalidShape, mentioning: ["capacity", "0"]) {
            try KVCache(kvHeads: 1, headDim: 8, capacity: 0)
        }
        expectAttentionError(.invalidShape, mentioning: ["kvHeads"]) { try KVCache(kvHeads: 0, headDim: 8, capacity: 4) }
        expectAttentionError(.sizeOverflow, mentioning: ["overflows"]) {
            try KVCache(layers: 1 << 20, kvHeads: 1 << 20, headDim: 1 << 20, capacity: 1 << 20)
        }
    }
}
