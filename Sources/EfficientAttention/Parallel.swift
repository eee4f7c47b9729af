import Dispatch
import Foundation

/// The thread count used when a call passes `threads: nil`: every active processor.
/// `@_spi(Benchmarking)`, for the benchmark's reports; callers get it by passing `nil`.
@_spi(Benchmarking) public var defaultThreadCount: Int { max(1, ProcessInfo.processInfo.activeProcessorCount) }

/// Runs `body(item, worker)` for every item in `0..<items` on `threads` workers.
///
/// Items are handed out in order from a shared counter, so a worker that finishes early
/// takes the next item (order items heaviest first for balance). `worker` is in
/// `0..<min(threads, items)` and lets each worker own scratch memory. The result of an
/// item must not depend on which worker ran it: that is what makes every kernel's output
/// identical for any thread count.
func parallelForEach(items: Int, threads: Int, _ body: (_ item: Int, _ worker: Int) -> Void) {
    let workers = max(1, min(threads, items))
    if workers == 1 {
        for item in 0..<items { body(item, 0) }
        return
    }
    // The job (the next item and `body`) lives on the caller's stack and the pool is
    // entered through libdispatch's C function, which boxes nothing; the one allocation
    // left is the 32-byte escape check of `withoutActuallyEscaping` (Swift cannot store a
    // non-escaping closure otherwise). Single-threaded calls allocate nothing.
    withoutActuallyEscaping(body) { body in
        var job = ParallelJob(body: body, items: items)
        withUnsafeMutablePointer(to: &job) { job in
            ea_parallel_apply(workers, job) { context, worker in
                let job = context!.assumingMemoryBound(to: ParallelJob.self)
                let next = job.pointer(to: \.next)!
                while case let item = ea_next_item(next), item < job.pointee.items {
                    job.pointee.body(item, worker)
                }
            }
        }
    }
}

/// One parallel loop: the items, the next item to hand out, and the body.
private struct ParallelJob {
    let body: (_ item: Int, _ worker: Int) -> Void
    let items: Int
    var next = 0
}

import CEfficientAttention
