import Foundation
import EfficientAttention
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Seconds on a monotonic clock (for intervals only).
public func monotonicSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) * 1e-9
}

/// Median and minimum of timed runs.
public struct TimingStatistics: Equatable, Sendable {
    public var runs: Int
    public var medianSeconds: Double
    public var minSeconds: Double

    /// Statistics of `samples` (at least one): the median is the mean of the two middle
    /// values for an even count.
    public init(samples: [Double]) {
        precondition(!samples.isEmpty, "no timing samples")
        let sorted = samples.sorted()
        let n = sorted.count
        runs = n
        medianSeconds = n % 2 == 1 ? sorted[n / 2] : (sorted[n / 2 - 1] + sorted[n / 2]) / 2
        minSeconds = sorted[0]
    }
}

/// How many times a point is run.
///
/// - `warmup` untimed runs first (the first of them, or an extra run when `warmup` is 0,
///   is the one whose heap growth is measured; its output is kept, so a single warm-up is
///   followed by one more untimed run, whose freed pages the timed runs then reuse).
/// - `repeatCount` without `budget`: exactly that many timed runs.
/// - Otherwise timed runs continue while less than `budget` seconds (default
///   ``defaultBudget``) have been spent and fewer than `repeatCount` (default
///   ``defaultCap``) runs were made; there is always at least one timed run.
public struct TimingPolicy: Equatable, Sendable {
    public static let defaultBudget = 1.0
    public static let defaultCap = 50

    public var warmup: Int
    public var repeatCount: Int?
    public var budget: Double?

    public init(warmup: Int = 1, repeatCount: Int? = nil, budget: Double? = nil) {
        self.warmup = warmup
        self.repeatCount = repeatCount
        self.budget = budget
    }

    /// Whether to make another timed run after `runs` runs that took `elapsed` seconds.
    public func wantsAnotherRun(after runs: Int, elapsed: Double) -> Bool {
        if runs < 1 { return true }
        if let repeatCount, budget == nil { return runs < repeatCount }
        return runs < (repeatCount ?? Self.defaultCap) && elapsed < (budget ?? Self.defaultBudget)
    }
}

/// FLOP and ratio arithmetic shared by the table, the records and the tests.
public enum Accounting {
    /// Visible query/key pairs of one head of a dense problem: `Nq · Nk`, or with the
    /// bottom-right aligned causal rule (`j <= i + Nk - Nq`)
    /// `Nq · (Nk - Nq) + Nq (Nq + 1) / 2` when `Nk >= Nq`, `Nk (Nk + 1) / 2` otherwise.
    public static func denseVisiblePairsPerHead(queryLength nq: Int, keyLength nk: Int, causal: Bool) -> Int {
        guard causal else { return nq * nk }
        if nk >= nq { return nq * (nk - nq) + nq * (nq + 1) / 2 }
        return nk * (nk + 1) / 2
    }

    /// Dense FLOPs: `2 · pairs · (D + Dv)` over all batch items and heads (one multiply
    /// and one add per element of `QKᵀ` and of `PV`; exp, max and the normalisation are
    /// not counted). For `Dv = D`, non-causal: `4 · Nq · Nk · D` per head.
    public static func denseFlops(batch: Int, heads: Int, queryLength: Int, keyLength: Int,
                                  headDim: Int, valueDim: Int, causal: Bool) -> Double {
        let pairs = denseVisiblePairsPerHead(queryLength: queryLength, keyLength: keyLength, causal: causal)
        return 2 * Double(pairs) * Double(batch * heads) * Double(headDim + valueDim)
    }

    /// `flops / seconds / 1e9`.
    public static func gflops(flops: Double, seconds: Double) -> Double {
        seconds > 0 ? flops / seconds / 1e9 : 0
    }

    /// Percent of `peak` GFLOP/s.
    public static func percentOfPeak(gflops: Double, peak: Double) -> Double {
        peak > 0 ? 100 * gflops / peak : 0
    }

    /// `numerator / denominator`, or `nil` when the denominator is not positive.
    public static func ratio(_ numerator: Double, _ denominator: Double) -> Double? {
        denominator > 0 && numerator.isFinite && denominator.isFinite ? numerator / denominator : nil
    }

    /// `‖a − reference‖_F / ‖reference‖_F`, accumulated in Double; `nil` if the element
    /// counts differ; 0 when both are zero, infinity when only the reference is.
    public static func relativeError(_ a: [Float], reference: [Float]) -> Double? {
        guard a.count == reference.count else { return nil }
        var diff = 0.0, norm = 0.0
        for i in a.indices {
            let r = Double(reference[i])
            let d = Double(a[i]) - r
            diff += d * d
            norm += r * r
        }
        if norm == 0 { return diff == 0 ? 0 : .infinity }
        return (diff / norm).squareRoot()
    }
}

/// Runs the engine-style `call` (views, workspace, output written in place) as `policy`
/// says: `max(1, warmup)` untimed calls, then the timed ones, each timed and its heap
/// allocations counted (``AllocationCounter``). Returns the timing and the allocations per
/// timed call (nil where they are not counted).
func timeEngineCalls(policy: TimingPolicy, _ call: () throws -> Void) throws
    -> (timing: TimingStatistics, allocationsPerCall: Double?) {
    for _ in 0..<max(1, policy.warmup) { try call() }
    var samples: [Double] = []
    samples.reserveCapacity(policy.repeatCount ?? TimingPolicy.defaultCap)
    var spent = 0.0, allocations = 0
    while policy.wantsAnotherRun(after: samples.count, elapsed: spent) {
        let before = AllocationCounter.count
        let t0 = monotonicSeconds()
        try call()
        let dt = monotonicSeconds() - t0
        allocations += AllocationCounter.count - before
        samples.append(dt)
        spent += dt
    }
    let perCall = AllocationCounter.isSupported ? Double(allocations) / Double(samples.count) : nil
    return (TimingStatistics(samples: samples), perCall)
}

/// Runs `call` as `policy` says: warm-up calls (the first one measures heap growth with
/// `meter`, or an extra call after timing when there is no warm-up), then timed calls.
/// Returns the timing, the measured heap growth and the measured call's output.
/// Shared by the sweep and the decode runners.
func timeCalls(policy: TimingPolicy, meter: HeapMeter,
               _ call: () throws -> AttentionResult) throws -> (timing: TimingStatistics, peakBytes: Int, output: [Float]) {
    func measuredCall() throws -> (output: [Float], peak: Int) {
        let (result, peak) = try meter.measure { try call() }
        return (result.output.elements, peak)
    }
    var output: [Float] = []
    var peakBytes = 0
    if policy.warmup > 0 {
        (output, peakBytes) = try measuredCall()
        // The measured call's output stays alive (for the error column), so the next call
        // gets fresh pages: one more untimed call lets every timed call reuse the pages
        // of a finished one (steady state), even with a single warm-up and one timed run.
        for _ in 0..<max(1, policy.warmup - 1) { _ = try call() }
    }
    var samples: [Double] = []
    var spent = 0.0
    while policy.wantsAnotherRun(after: samples.count, elapsed: spent) {
        let t0 = monotonicSeconds()
        let result = try call()
        let dt = monotonicSeconds() - t0
        withExtendedLifetime(result) {}
        samples.append(dt)
        spent += dt
    }
    if policy.warmup == 0 {
        (output, peakBytes) = try measuredCall()
    }
    return (TimingStatistics(samples: samples), peakBytes, output)
}
