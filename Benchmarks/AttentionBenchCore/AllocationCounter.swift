import CAllocationCounter

/// Counts the heap allocations of the whole process (KernelDocs/Benchmarking.md).
///
/// On Linux with glibc the benchmark, the fuzzer and the test runner link
/// `CAllocationCounter`, which defines `malloc` and its siblings and forwards them to glibc,
/// counting each call: every Swift array, class instance, closure context and `Tensor`
/// storage goes through them. Another thread allocating at the same time is counted too,
/// so measure with nothing else running.
public enum AllocationCounter {
    /// True where allocations are counted (Linux, glibc).
    public static var isSupported: Bool { ea_allocation_counting_supported() != 0 }

    /// Allocations made by the process so far.
    public static var count: Int { ea_allocation_count() }

    /// Allocations made by the calling thread so far: exact for work that stays on one
    /// thread (a call with `threads: 1`) whatever other threads do.
    public static var threadCount: Int { ea_thread_allocation_count() }

    /// Runs `body` and returns its result and the allocations the calling thread made meanwhile.
    public static func countingOnThisThread<R>(_ body: () throws -> R) rethrows -> (result: R, allocations: Int) {
        let before = threadCount
        let result = try body()
        return (result, threadCount - before)
    }

    /// Runs `body` and returns its result and the allocations the calling thread and the
    /// library's worker threads made meanwhile: exact for a call on several threads when no
    /// other thread runs a parallel loop of the library meanwhile (the workers serve one
    /// loop at a time; a loop of another thread adds its workers' allocations).
    public static func countingOnThisThreadAndWorkers<R>(_ body: () throws -> R) rethrows
        -> (result: R, allocations: Int) {
        let before = threadCount + ea_pool_allocation_count()
        let result = try body()
        return (result, threadCount + ea_pool_allocation_count() - before)
    }

    /// Runs `body` and returns its result and the allocations made meanwhile.
    public static func counting<R>(_ body: () throws -> R) rethrows -> (result: R, allocations: Int) {
        let before = count
        let result = try body()
        return (result, count - before)
    }
}
