import Foundation

/// The last plan a conformer built, kept for the next call with the same settings and
/// shape: a conformer whose plan is a data structure (BigBird's random blocks) builds it
/// once instead of on every call, so that steady-state calls allocate nothing
/// (KernelDocs/CallingConvention.md).
///
/// The key holds every setting the plan depends on and the shape: a copy of the conformer
/// with a changed setting (conformers are structs with `var` settings, and copies share
/// their cache) misses and builds its own plan. Thread-safe; a lookup takes a lock and
/// compares keys (no allocation).
final class PlanCache<Key: Equatable, Plan>: @unchecked Sendable {
    private let lock = NSLock()
    private var last: (key: Key, plan: Plan)?

    init() {}

    /// The cached plan for `key`, or nil (nothing is built).
    func cached(for key: Key) -> Plan? {
        lock.lock()
        defer { lock.unlock() }
        if let last, last.key == key { return last.plan }
        return nil
    }

    /// The cached plan for `key`, or `make()`'s (then cached).
    func plan(for key: Key, _ make: () throws -> Plan) rethrows -> Plan {
        lock.lock()
        if let last, last.key == key {
            let plan = last.plan
            lock.unlock()
            return plan
        }
        lock.unlock()
        let plan = try make()
        lock.lock()
        last = (key, plan)
        lock.unlock()
        return plan
    }
}
