// Reads past a caller's view: operands placed so that their last element ends right before
// a page the process may not touch (PROT_NONE). A kernel that reads one byte past the view
// dies with SIGSEGV instead of passing by chance. (Found by the fuzzer under
// AddressSanitizer, stop 37: the decode kernel's line touches ran `rowStride` elements past
// the last row of a view with padded rows.)

@_spi(Testing) @_spi(Benchmarking) import EfficientAttention
#if canImport(Glibc)
import Glibc
#endif
import Testing

/// `count` floats whose last one ends at a protected page.
final class GuardedFloats {
    let base: UnsafeMutablePointer<Float>
    let count: Int
    private let mapping: UnsafeMutableRawPointer
    private let mappedBytes: Int

    init?(count: Int, values: (Int) -> Float) {
        #if canImport(Glibc)
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        let bytes = count * MemoryLayout<Float>.stride
        let data = (bytes + page - 1) / page * page
        mappedBytes = data + page
        guard let m = mmap(nil, mappedBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),
              m != MAP_FAILED, mprotect(m + data, page, PROT_NONE) == 0 else { return nil }
        mapping = m
        base = (m + data - bytes).bindMemory(to: Float.self, capacity: count)
        self.count = count
        for i in 0..<count { base[i] = values(i) }
        #else
        return nil
        #endif
    }

    deinit {
        #if canImport(Glibc)
        munmap(mapping, mappedBytes)
        #endif
    }

    var buffer: UnsafeBufferPointer<Float> { UnsafeBufferPointer(start: base, count: count) }
}

@Suite("Reads stay inside the caller's views (guard pages)")
struct GuardPageTests {
    @Test("decode-shaped calls over keys and values with padded rows ending at a guard page",
          arguments: [1, 30, 300])
    func decodeOverPaddedRows(keys n: Int) throws {
        let (d, dv, rowStride) = (4, 3, 64)
        // [1, 1, n, width] with rows `rowStride` apart: the last row ends the buffer.
        func operand(width: Int, seed: UInt64) throws -> GuardedFloats {
            let t = try Tensor.random(shape: [1, 1, 1, (n - 1) * rowStride + width], seed: seed)
            return try #require(GuardedFloats(count: t.elements.count) { t.elements[$0] })
        }
        let (k, v) = (try operand(width: d, seed: 1), try operand(width: dv, seed: 2))
        let q = try Tensor.random(shape: [1, 2, 1, d], seed: 3)
        let kv = try StridedView(k.buffer, shape: SIMD4(1, 1, n, d), strides: SIMD4(n * rowStride, n * rowStride, rowStride, 1))
        let vv = try StridedView(v.buffer, shape: SIMD4(1, 1, n, dv), strides: SIMD4(n * rowStride, n * rowStride, rowStride, 1))
        // The same keys and values contiguous, for the expected result.
        let keys = try Tensor(shape: [1, 1, n, d], data: (0..<n).flatMap { j in (0..<d).map { k.base[j * rowStride + $0] } })
        let values = try Tensor(shape: [1, 1, n, dv], data: (0..<n).flatMap { j in (0..<dv).map { v.base[j * rowStride + $0] } })
        for attention in [DenseAttention(causal: false), DenseAttention(causal: true)] as [DenseAttention] {
            let expected = try attention.attend(query: q, key: keys, value: values, threads: 1)
            var output = try Tensor(shape: [1, 2, 1, dv])
            try q.withStridedView { qv in
                try output.withMutableStridedView { ov in
                    try attention.attend(query: qv, key: kv, value: vv, output: ov, logSumExp: nil, keyLengths: nil,
                                         workspace: nil, threads: 1)
                }
            }
            #expect(output.elements == expected.output.elements, "n \(n) causal \(attention.causal)")
        }
    }
}
