import CEfficientAttention
import Dispatch
import Foundation

/// The machine's fused multiply-add peak, measured by running independent multiply-add
/// chains on every thread at once.
///
/// Under `EA_FMA` (the `NativeCPU` trait) each thread runs 16 independent `SIMD16<Float>`
/// chains, one `acc.addProduct(x, y)` per chain per iteration (a 512-bit FMA on AVX-512,
/// 16 lanes × 2 FLOPs). Sixteen chains cover FMA latency × pipes of current x86 and Arm
/// cores and still fit the 32 vector registers. On an x86-64 CPU without AVX-512F (AVX2:
/// 16 registers of 256 bits, where those chains took 32 registers and half of them were
/// spilled, so the probe read about half the peak) it runs 12 `SIMD8<Float>` chains
/// instead (12 registers, plus `x` and `y`). In the portable build (`acc += a * b`
/// kernels, 16 SSE2/NEON registers) it runs 12 `SIMD4<Float>` chains of
/// `acc = acc * x + y` (a dependent multiply and add, so the product cannot be hoisted out
/// of the loop; SIMD16 chains would spill there). The chains' sum is returned and folded
/// into a sink read at exit, so the loop cannot be deleted. A trial lasts
/// ~``trialSeconds``; the best of ``trials`` counts.
public enum FMAPeak {
    #if EA_FMA
    /// 256-bit chains on an x86-64 CPU without AVX-512F (see above).
    static let narrow: Bool = {
        #if arch(x86_64)
        return ea_cpu_has_avx512f() == 0
        #else
        return false
        #endif
    }()
    public static let accumulators = narrow ? 12 : 16
    public static let lanes = narrow ? 8 : 16
    #else
    public static let accumulators = 12
    public static let lanes = 4
    #endif
    public static let trials = 10
    public static let trialSeconds = 0.03

    /// FLOPs of `iterations` loop iterations on one thread.
    public static func flops(iterations: Int) -> Double {
        Double(iterations) * Double(accumulators * lanes * 2)
    }

    /// Measured GFLOP/s with `threads` threads running concurrently.
    public static func measure(threads: Int) -> Double {
        let threads = max(1, threads)
        // Calibrate on one thread: iterations for ~trialSeconds.
        var iterations = 1 << 16
        while true {
            let t0 = monotonicSeconds()
            sink.add(chains(iterations: iterations, seed: Float(iterations & 7)))
            let dt = monotonicSeconds() - t0
            if dt > trialSeconds / 4 || iterations > 1 << 30 {
                iterations = max(1, Int(Double(iterations) * trialSeconds / max(dt, 1e-9)))
                break
            }
            iterations *= 4
        }
        let calibrated = iterations
        var best = 0.0
        for trial in 0..<trials {
            let results = ResultBox(count: threads)
            let t0 = monotonicSeconds()
            DispatchQueue.concurrentPerform(iterations: threads) { t in
                results.set(t, chains(iterations: calibrated, seed: Float(trial + t)))
            }
            let dt = monotonicSeconds() - t0
            sink.add(results.sum())
            best = max(best, Accounting.gflops(flops: flops(iterations: calibrated) * Double(threads), seconds: dt))
        }
        return best
    }

    /// The measured loop. Returns the sum of the chains so the work is observable.
    @inline(never)
    public static func chains(iterations: Int, seed: Float) -> Float {
        #if EA_FMA
        if narrow { return narrowChains(iterations: iterations, seed: seed) }
        let x = SIMD16<Float>(repeating: 0.999_999 + seed * 1e-9)
        let y = SIMD16<Float>(repeating: 1e-7 * (1 + seed))
        var a0 = SIMD16<Float>(repeating: seed), a1 = a0 + 1, a2 = a0 + 2, a3 = a0 + 3
        var a4 = a0 + 4, a5 = a0 + 5, a6 = a0 + 6, a7 = a0 + 7
        var a8 = a0 + 8, a9 = a0 + 9, a10 = a0 + 10, a11 = a0 + 11
        var a12 = a0 + 12, a13 = a0 + 13, a14 = a0 + 14, a15 = a0 + 15
        for _ in 0..<iterations {
            a0.addProduct(x, y); a1.addProduct(x, y); a2.addProduct(x, y); a3.addProduct(x, y)
            a4.addProduct(x, y); a5.addProduct(x, y); a6.addProduct(x, y); a7.addProduct(x, y)
            a8.addProduct(x, y); a9.addProduct(x, y); a10.addProduct(x, y); a11.addProduct(x, y)
            a12.addProduct(x, y); a13.addProduct(x, y); a14.addProduct(x, y); a15.addProduct(x, y)
        }
        let s = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
            + ((a8 + a9) + (a10 + a11)) + ((a12 + a13) + (a14 + a15))
        return s.sum()
        #else
        let x = SIMD4<Float>(repeating: 0.999_999 + seed * 1e-9)
        let y = SIMD4<Float>(repeating: 1e-7 * (1 + seed))
        var a0 = SIMD4<Float>(repeating: seed), a1 = a0 + 1, a2 = a0 + 2, a3 = a0 + 3
        var a4 = a0 + 4, a5 = a0 + 5, a6 = a0 + 6, a7 = a0 + 7
        var a8 = a0 + 8, a9 = a0 + 9, a10 = a0 + 10, a11 = a0 + 11
        for _ in 0..<iterations {
            a0 = a0 * x + y; a1 = a1 * x + y; a2 = a2 * x + y; a3 = a3 * x + y
            a4 = a4 * x + y; a5 = a5 * x + y; a6 = a6 * x + y; a7 = a7 * x + y
            a8 = a8 * x + y; a9 = a9 * x + y; a10 = a10 * x + y; a11 = a11 * x + y
        }
        let s = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)) + ((a8 + a9) + (a10 + a11))
        return s.sum()
        #endif
    }

    #if EA_FMA
    /// ``chains(iterations:seed:)`` on 256-bit vectors: 12 `SIMD8<Float>` chains.
    @inline(never)
    static func narrowChains(iterations: Int, seed: Float) -> Float {
        let x = SIMD8<Float>(repeating: 0.999_999 + seed * 1e-9)
        let y = SIMD8<Float>(repeating: 1e-7 * (1 + seed))
        var a0 = SIMD8<Float>(repeating: seed), a1 = a0 + 1, a2 = a0 + 2, a3 = a0 + 3
        var a4 = a0 + 4, a5 = a0 + 5, a6 = a0 + 6, a7 = a0 + 7
        var a8 = a0 + 8, a9 = a0 + 9, a10 = a0 + 10, a11 = a0 + 11
        for _ in 0..<iterations {
            a0.addProduct(x, y); a1.addProduct(x, y); a2.addProduct(x, y); a3.addProduct(x, y)
            a4.addProduct(x, y); a5.addProduct(x, y); a6.addProduct(x, y); a7.addProduct(x, y)
            a8.addProduct(x, y); a9.addProduct(x, y); a10.addProduct(x, y); a11.addProduct(x, y)
        }
        let s = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7)) + ((a8 + a9) + (a10 + a11))
        return s.sum()
    }
    #endif

    /// Where the loop results go (read once at exit through ``sinkValue``).
    static let sink = Sink()

    /// The accumulated loop results (keeps the measured work observable).
    public static var sinkValue: Float { sink.value }
}

/// Per-thread results of one trial (also used by ``ReadBandwidth``).
final class ResultBox: @unchecked Sendable {
    private let lock = NSLock()
    private var values: [Float]
    init(count: Int) { values = [Float](repeating: 0, count: count) }
    func set(_ i: Int, _ v: Float) { lock.lock(); values[i] = v; lock.unlock() }
    func sum() -> Float { lock.lock(); defer { lock.unlock() }; return values.reduce(0, +) }
}

final class Sink: @unchecked Sendable {
    private let lock = NSLock()
    private var total: Float = 0
    func add(_ v: Float) { lock.lock(); total += v; lock.unlock() }
    var value: Float { lock.lock(); defer { lock.unlock() }; return total }
}

/// Peak measurements cached per thread count for one run of the tool.
public final class PeakCache: @unchecked Sendable {
    private let lock = NSLock()
    private var values: [Int: Double] = [:]
    private let measureFunction: @Sendable (Int) -> Double

    public init(measure: @escaping @Sendable (Int) -> Double = { FMAPeak.measure(threads: $0) }) {
        self.measureFunction = measure
    }

    /// The peak for `threads`, measured on first use.
    public func peak(threads: Int) -> Double {
        lock.lock()
        if let v = values[threads] { lock.unlock(); return v }
        lock.unlock()
        let v = measureFunction(threads)
        lock.lock()
        values[threads] = v
        lock.unlock()
        return v
    }

    /// Thread counts measured so far, with their peaks.
    public var measured: [(threads: Int, gflops: Double)] {
        lock.lock()
        defer { lock.unlock() }
        return values.keys.sorted().map { ($0, values[$0]!) }
    }
}
