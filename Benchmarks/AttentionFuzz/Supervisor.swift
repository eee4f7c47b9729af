import Foundation

/// The parent process: hands batches of consecutive case seeds to child processes
/// (`--child --first-seed S --count K`, `jobs` at a time), collects their reports, and
/// isolates crashes. A child prints `fail <seed> <message>` for each failed check and
/// `done <seed> <calls>` after each case, flushed, so when it dies by a signal (or is
/// killed at the timeout) the first seed without `done` is the suspect; that seed is run
/// again alone in a fresh child to confirm it (a hang is not: it would cost another
/// timeout), and the rest of the batch continues in
/// another child.
final class Supervisor: @unchecked Sendable {
    struct Limits {
        var seconds: Double?
        var calls: Int?
        var seed: UInt64
        var jobs: Int
        var batch: Int
        var timeout: Double
    }

    /// What one child reported.
    struct ChildOutcome {
        var done: [UInt64: Int] = [:]
        var failures: [(seed: UInt64, message: String)] = []
        /// `nil` when the child exited normally with status 0.
        var abnormal: String?
        /// Killed at the timeout.
        var timedOut = false
    }

    let limits: Limits
    let executable: URL
    private let lock = NSLock()
    private var nextIndex: UInt64 = 0
    private var calls = 0, cases = 0
    private var failures: [(seed: UInt64, message: String)] = []
    private var crashes: [(seed: UInt64, message: String)] = []
    private let start = Date()

    init(limits: Limits) {
        self.limits = limits
        executable = Bundle.main.executableURL ?? URL(fileURLWithPath: CommandLine.arguments[0])
    }

    /// The seed of case `index` of a run with `seed`: `seed · 10⁹ + index`.
    static func caseSeed(run seed: UInt64, index: UInt64) -> UInt64 { seed &* 1_000_000_000 &+ index }

    /// Runs until the time or call limit; prints the summary; returns whether all passed.
    func run() -> Bool {
        DispatchQueue.concurrentPerform(iterations: limits.jobs) { _ in
            while let batch = takeBatch() { runBatch(batch) }
        }
        return summarize()
    }

    private func elapsed() -> Double { Date().timeIntervalSince(start) }

    /// The next batch of case seeds, or nil once a limit is reached.
    private func takeBatch() -> Range<UInt64>? {
        lock.lock(); defer { lock.unlock() }
        if let seconds = limits.seconds, elapsed() >= seconds { return nil }
        if let limit = limits.calls, calls >= limit { return nil }
        let first = Supervisor.caseSeed(run: limits.seed, index: nextIndex)
        nextIndex += UInt64(limits.batch)
        return first..<(first + UInt64(limits.batch))
    }

    /// Runs `batch` in children until every seed has run or crashed.
    private func runBatch(_ batch: Range<UInt64>) {
        var remaining = batch
        while !remaining.isEmpty {
            let outcome = runChild(remaining)
            record(outcome)
            guard outcome.abnormal != nil else { break }
            guard let suspect = remaining.first(where: { outcome.done[$0] == nil }) else { break }
            // A hang is not run again (another full timeout); a crash is, alone.
            let alone = outcome.timedOut ? outcome : runChild(suspect..<(suspect + 1))
            if !outcome.timedOut { record(alone) }
            lock.lock()
            if let reason = alone.abnormal {
                crashes.append((suspect, reason))
            } else {
                crashes.append((suspect, "\(outcome.abnormal!) in a batch; passed when run alone"))
            }
            lock.unlock()
            remaining = (suspect + 1)..<remaining.upperBound
        }
        lock.lock()
        print(String(format: "[%5.0f s] %d cases, %d calls, %d failed checks, %d crashes",
                     elapsed(), cases, calls, failures.count, crashes.count))
        fflush(nil)  // every stream: stdout
        lock.unlock()
    }

    private func record(_ outcome: ChildOutcome) {
        lock.lock(); defer { lock.unlock() }
        cases += outcome.done.count
        calls += outcome.done.values.reduce(0, +)
        failures += outcome.failures
    }

    /// One child over `seeds`, killed after the timeout.
    private func runChild(_ seeds: Range<UInt64>) -> ChildOutcome {
        let process = Process()
        process.executableURL = executable
        process.arguments = ["--child", "--first-seed", String(seeds.lowerBound), "--count", String(seeds.count)]
        // No backtrace on the console for every crash in a batch: `--case SEED` shows it.
        var environment = ProcessInfo.processInfo.environment
        environment["SWIFT_BACKTRACE"] = "enable=no"
        process.environment = environment
        let pipe = Pipe()
        process.standardOutput = pipe
        var outcome = ChildOutcome()
        do {
            try process.run()
        } catch {
            outcome.abnormal = "could not start a child: \(error)"
            return outcome
        }
        let killed = KillFlag()
        let timer = DispatchWorkItem {
            if process.isRunning {
                killed.set()
                process.terminate()
            }
        }
        DispatchQueue.global().asyncAfter(deadline: .now() + limits.timeout, execute: timer)
        let data = pipe.fileHandleForReading.readDataToEndOfFile()
        process.waitUntilExit()
        timer.cancel()
        outcome.timedOut = killed.isSet
        for line in String(decoding: data, as: UTF8.self).split(separator: "\n") {
            let parts = line.split(separator: " ", maxSplits: 2)
            guard parts.count >= 3, let seed = UInt64(parts[1]) else { continue }
            if parts[0] == "done" {
                outcome.done[seed] = Int(parts[2]) ?? 0
            } else if parts[0] == "fail" {
                outcome.failures.append((seed, String(parts[2])))
            }
        }
        switch (process.terminationReason, process.terminationStatus) {
        case (.exit, 0): break
        case (.exit, let status): outcome.abnormal = "exit status \(status)"
        case (_, let signal):
            outcome.abnormal = outcome.timedOut ? "no answer within \(Int(limits.timeout)) s (killed)" : "signal \(signal)"
        }
        return outcome
    }

    /// Prints the summary line and every failure and crash with its seed.
    private func summarize() -> Bool {
        print(String(format: "attention-fuzz: seed %llu, %d cases, %d calls, %d failed checks, %d crashes, %.0f s",
                     limits.seed, cases, calls, failures.count, crashes.count, elapsed()))
        for crash in crashes.sorted(by: { $0.seed < $1.seed }) {
            print("crash seed \(crash.seed): \(crash.message)  (rerun: attention-fuzz --case \(crash.seed))")
        }
        for failure in failures.sorted(by: { $0.seed < $1.seed }) {
            print("failed seed \(failure.seed): \(failure.message)")
        }
        return failures.isEmpty && crashes.isEmpty
    }
}

/// Set by the timeout that kills a child, read after the child has ended.
final class KillFlag: @unchecked Sendable {
    private let lock = NSLock()
    private var value = false

    func set() { lock.lock(); value = true; lock.unlock() }
    var isSet: Bool { lock.lock(); defer { lock.unlock() }; return value }
}
