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
    let counter = ItemCounter()
    withoutActuallyEscaping(body) { body in
        let shared = UncheckedSendable(body)
        DispatchQueue.concurrentPerform(iterations: workers) { worker in
            while case let item = counter.next(), item < items {
                shared.value(item, worker)
            }
        }
    }
}

/// A lock-protected counter that hands out work items.
private final class ItemCounter: @unchecked Sendable {
    private let lock = NSLock()
    private var value = 0

    func next() -> Int {
        lock.lock()
        defer { lock.unlock() }
        value += 1
        return value - 1
    }
}
