import Dispatch
import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// The machine's memory read bandwidth, measured by streaming a buffer much larger than
/// the last-level cache with every thread at once.
///
/// The buffer (``bufferBytes``, 1 GiB, on huge pages where Linux grants them) is written once, then split into one contiguous
/// part per thread; each thread reads its part with 64-byte `SIMD16<Float>` loads into
/// eight independent accumulators (so the loop is bound by memory, not by add latency),
/// and the sum is folded into a sink so the reads cannot be removed. A trial reads the
/// whole buffer once; the best of ``trials`` counts. GB/s = bytes read / seconds / 1e9.
public enum ReadBandwidth {
    public static let bufferBytes = 1 << 30
    public static let trials = 5

    /// Measured GB/s with `threads` threads reading concurrently.
    public static func measure(threads: Int) -> Double {
        let threads = max(1, threads)
        let count = bufferBytes / 4
        // 2 MiB aligned and marked for transparent huge pages, as KVCache storage is.
        let raw = UnsafeMutableRawPointer.allocate(byteCount: bufferBytes, alignment: 2 << 20)
        defer { raw.deallocate() }
        #if os(Linux)
        _ = madvise(raw, bufferBytes, MADV_HUGEPAGE)
        #endif
        let buffer = raw.bindMemory(to: Float.self, capacity: count)
        buffer.initialize(repeating: 1e-9, count: count)
        let shared = SendablePointer(buffer)
        var best = 0.0
        for _ in 0..<trials {
            let results = ResultBox(count: threads)
            let t0 = monotonicSeconds()
            DispatchQueue.concurrentPerform(iterations: threads) { t in
                let per = count / threads / 128 * 128
                results.set(t, stream(shared.pointer + t * per, count: per))
            }
            let dt = monotonicSeconds() - t0
            FMAPeak.sink.add(results.sum())
            best = max(best, Double(count / threads / 128 * 128 * threads * 4) / dt / 1e9)
        }
        return best
    }

    /// Sums `count` floats (a multiple of 128) with eight SIMD16 accumulators.
    @inline(never)
    public static func stream(_ p: UnsafePointer<Float>, count: Int) -> Float {
        typealias V = SIMD16<Float>
        var a0 = V(), a1 = V(), a2 = V(), a3 = V(), a4 = V(), a5 = V(), a6 = V(), a7 = V()
        let raw = UnsafeRawPointer(p)
        var offset = 0
        let bytes = count * 4
        while offset < bytes {
            a0 += raw.loadUnaligned(fromByteOffset: offset, as: V.self)
            a1 += raw.loadUnaligned(fromByteOffset: offset + 64, as: V.self)
            a2 += raw.loadUnaligned(fromByteOffset: offset + 128, as: V.self)
            a3 += raw.loadUnaligned(fromByteOffset: offset + 192, as: V.self)
            a4 += raw.loadUnaligned(fromByteOffset: offset + 256, as: V.self)
            a5 += raw.loadUnaligned(fromByteOffset: offset + 320, as: V.self)
            a6 += raw.loadUnaligned(fromByteOffset: offset + 384, as: V.self)
            a7 += raw.loadUnaligned(fromByteOffset: offset + 448, as: V.self)
            offset += 512
        }
        let s = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
        return s.sum()
    }
}

/// Read bandwidth cached per thread count for one run of the tool (the same caching as
/// ``PeakCache``, which it wraps).
public final class BandwidthCache: @unchecked Sendable {
    private let cache: PeakCache

    public init(measure: @escaping @Sendable (Int) -> Double = { ReadBandwidth.measure(threads: $0) }) {
        cache = PeakCache(measure: measure)
    }

    /// GB/s for `threads`, measured on first use.
    public func bandwidth(threads: Int) -> Double { cache.peak(threads: threads) }

    /// Thread counts measured so far, with their bandwidth.
    public var measured: [(threads: Int, gbPerSecond: Double)] {
        cache.measured.map { ($0.threads, $0.gflops) }
    }
}

private struct SendablePointer: @unchecked Sendable {
    let pointer: UnsafeMutablePointer<Float>
    init(_ pointer: UnsafeMutablePointer<Float>) { self.pointer = pointer }
}
