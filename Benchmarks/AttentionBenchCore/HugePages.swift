import EfficientAttention
#if canImport(Glibc)
import Glibc
#endif

/// A copy of a tensor's elements in memory aligned to 2 MiB and, on Linux, advised for
/// transparent huge pages before it is first touched (`--huge-pages`): the kind of arena an
/// inference engine may keep its activations and caches in. A large read through 4 KiB
/// pages misses the TLB once per page and the hardware prefetchers stop at each page; the
/// library's own caches are allocated this way.
final class HugePageCopy {
    let base: UnsafeMutablePointer<Float>
    let shape: SIMD4<Int>
    let count: Int

    init(_ tensor: Tensor) throws {
        shape = SIMD4(tensor.shape[0], tensor.shape[1], tensor.shape[2], tensor.shape[3])
        count = tensor.count
        let alignment = 2 << 20
        let bytes = (max(count, 1) * MemoryLayout<Float>.stride + alignment - 1) / alignment * alignment
        var raw: UnsafeMutableRawPointer?
        guard posix_memalign(&raw, alignment, bytes) == 0, let raw else {
            throw BenchError.failure("--huge-pages: could not allocate \(bytes) bytes")
        }
        #if os(Linux)
        _ = madvise(raw, bytes, MADV_HUGEPAGE)  // best effort: a refusal leaves ordinary pages
        #endif
        base = raw.bindMemory(to: Float.self, capacity: max(count, 1))
        let elements = tensor.elements
        elements.withUnsafeBufferPointer { base.initialize(from: $0.baseAddress!, count: count) }
    }

    deinit { free(base) }

    /// The copy as a contiguous view.
    func view() throws -> StridedView {
        try StridedView(UnsafeBufferPointer(start: base, count: count), shape: shape)
    }
}
