import Foundation
import CMallocInfo
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Measures how much the malloc heap grows during a call.
///
/// What it reads: glibc's `mallinfo2()`, `uordblks + hblkhd` = bytes in chunks handed
/// out by `malloc` from all arenas plus bytes in chunks served by `mmap` (large
/// allocations). Swift arrays, `Tensor` storage and every `[Float]` scratch buffer come
/// from `malloc`, so a conformer's workspace and its output show up here.
///
/// How: the value is read before the call (`before`); a sampler thread then reads it
/// every ~100 µs while the call runs, and once more right after the call returns (its
/// result still alive). `peakGrowth = max(samples) − before`, clamped at 0.
///
/// Limits (documented in KernelDocs/Benchmarking.md):
/// - allocations that live less than the sampling interval can be missed, so the figure
///   is a lower bound for very short calls (it always includes what is still allocated
///   when the call returns, i.e. the output and log-sum-exp);
/// - it counts requested chunk sizes plus malloc overhead, mmapped chunks rounded to
///   pages; memory a call touches without `malloc` (thread stacks, the kernel's page
///   cache) is not counted, nor is freed memory the allocator keeps;
/// - `mallinfo2` takes each arena's lock, so the measured call is not timed: the
///   benchmark measures memory on a separate (warm-up) call;
/// - on systems without `mallinfo2` (not glibc) the figure is 0 and ``isSupported`` is false.
public final class HeapMeter: @unchecked Sendable {
    /// Sampling interval in microseconds.
    public let intervalMicroseconds: UInt32

    private let lock = NSLock()
    private var running = false
    private var peak = 0
    private let started = DispatchSemaphore(value: 0)
    private let finished = DispatchSemaphore(value: 0)

    public init(intervalMicroseconds: UInt32 = 100) {
        self.intervalMicroseconds = intervalMicroseconds
    }

    /// True where `mallinfo2` is available (glibc).
    public static var isSupported: Bool {
        #if canImport(Glibc)
        return true
        #else
        return false
        #endif
    }

    /// Bytes currently allocated through malloc (`uordblks + hblkhd`), 0 where unsupported.
    public static func bytesInUse() -> Int {
        #if canImport(Glibc)
        let info = mallinfo2()
        return Int(info.uordblks) + Int(info.hblkhd)
        #else
        return 0
        #endif
    }

    /// Runs `body` while sampling; returns its result and the peak heap growth in bytes.
    public func measure<R>(_ body: () throws -> R) rethrows -> (result: R, peakGrowth: Int) {
        lock.lock()
        running = true
        peak = 0
        lock.unlock()
        let thread = Thread { [self] in self.sample() }
        thread.stackSize = 1 << 16
        thread.start()
        started.wait()
        let before = HeapMeter.bytesInUse()
        let result: R
        do {
            result = try body()
        } catch {
            stop()
            throw error
        }
        let after = HeapMeter.bytesInUse()
        let sampled = stop()
        return (result, max(0, max(after, sampled) - before))
    }

    /// Stops the sampler, waits for it, returns its peak reading.
    @discardableResult
    private func stop() -> Int {
        lock.lock()
        running = false
        lock.unlock()
        finished.wait()
        lock.lock()
        defer { lock.unlock() }
        return peak
    }

    private func sample() {
        started.signal()
        while true {
            let now = HeapMeter.bytesInUse()
            lock.lock()
            peak = max(peak, now)
            let keepGoing = running
            lock.unlock()
            if !keepGoing { break }
            usleep(intervalMicroseconds)
        }
        finished.signal()
    }
}

/// Puts glibc's allocator in the steady state of a long-running program before measuring.
///
/// By default glibc serves each allocation above its (dynamic, at most 32 MiB) mmap
/// threshold with a fresh `mmap` and returns it with `munmap` on free, so a call whose
/// output or scratch is that large pays a page fault per 4 KiB page on every call
/// (about 3–5 ms per 32 MiB here) — a cost of the allocator, not of the kernel, and one
/// that jumps at the threshold rather than growing with N. ``enable()`` sets
/// `M_MMAP_MAX = 0` (every block comes from the heap) and raises `M_TRIM_THRESHOLD`
/// (freed heap memory is kept), so repeated calls reuse pages already mapped, as a
/// caching allocator would. `--fresh-pages` skips this and measures with glibc's defaults.
/// Heap growth is still measured (`mallinfo2`'s `uordblks` then holds every block).
public enum SteadyStateAllocator {
    /// Whether ``enable()`` took effect in this process.
    public private(set) nonisolated(unsafe) static var isEnabled = false

    /// Applies the settings; a no-op where glibc's `mallopt` is unavailable.
    public static func enable() {
        #if canImport(Glibc)
        let mmapOff = mallopt(M_MMAP_MAX, 0)
        let keep = mallopt(M_TRIM_THRESHOLD, Int32.max)
        isEnabled = mmapOff == 1 && keep == 1
        #endif
    }

    /// One line for the report header.
    public static var description: String {
        isEnabled
            ? "Allocator: steady state (glibc mmap off, freed memory kept: pages are reused across calls; --fresh-pages for glibc defaults)"
            : "Allocator: system defaults (large blocks are mapped fresh on every call)"
    }
}
