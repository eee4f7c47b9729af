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
    // The caller's closure goes to C as it is (function and context, see
    // `ea_parallel_for_each` in shim.c); the job lives on the caller's stack and runs on
    // the caller and the library's kept worker threads: a parallel loop allocates nothing.
    eaParallelForEach(items, workers, body)
}

/// ``parallelForEach(items:threads:_:)`` in runs: `body(item, next, worker)` for every
/// `item` in `0..<items`, a work unit being up to `maxRun` consecutive items (at most 8, and
/// fewer when that leaves under 8 units per worker, for balance) that do not cross a
/// multiple of `segment` (`items` is a whole number of segments; nil: one segment). `next`
/// is the item after `item` in its run (nil at a run's end): the kernels' small work items
/// touch their rows once, and request the next item's while they compute.
func parallelForEachRun(items: Int, segment: Int? = nil, maxRun: Int = 8, threads: Int,
                        _ body: (_ item: Int, _ next: Int?, _ worker: Int) -> Void) {
    let segment = max(1, segment ?? items)
    let run = max(1, min(maxRun, 8, items / (8 * max(1, threads))))
    let runsPerSegment = ceilDiv(segment, run)
    parallelForEach(items: items / segment * runsPerSegment, threads: threads) { unit, worker in
        let segmentStart = unit / runsPerSegment * segment
        let first = segmentStart + unit % runsPerSegment * run
        let end = min(segmentStart + segment, first + run)
        for item in first..<end { body(item, item + 1 < end ? item + 1 : nil, worker) }
    }
}

/// shim.c's `ea_parallel_for_each`: `body(item, worker)` for every `item < items` on the
/// calling thread and `workers − 1` kept worker threads (of the first of shim.c's pools no
/// other loop holds; libdispatch's pool when all are held), items handed out in order from
/// a shared counter. Declared by
/// its symbol: C receives the non-escaping closure as its two words (function, context)
/// under the Swift calling convention (`swiftcall`, the context in `swift_context`) and
/// calls it there; Swift has no other way to hand a non-escaping
/// closure to another thread without boxing it (`withoutActuallyEscaping` allocates its
/// escape check).
@_silgen_name("ea_parallel_for_each")
private func eaParallelForEach(_ items: Int, _ workers: Int, _ body: (_ item: Int, _ worker: Int) -> Void)
