@_spi(Benchmarking) import EfficientAttention
import Foundation

/// `attention-bench gemm [M[xNxK] ...] [--threads LIST] [--repeat R]`: times the library's
/// GEMM kernel (``MatrixProduct/multiply(_:_:m:n:depth:transposeA:transposeB:threads:)``)
/// alone on square or `M x N x K` products and reports GFLOP/s against the measured FMA peak.
public enum GemmBench {
    public static func run(_ arguments: [String]) throws {
        var sizes: [(m: Int, n: Int, k: Int)] = []
        var threadCounts = [1, defaultThreadCount]
        var repeats = 20
        var index = 0
        func value() throws -> String {
            index += 1
            guard index < arguments.count else { throw BenchError.usage("gemm: \(arguments[index - 1]) needs a value") }
            return arguments[index]
        }
        while index < arguments.count {
            let argument = arguments[index]
            switch argument {
            case "--threads":
                threadCounts = try value().split(separator: ",").map {
                    guard let t = Int($0), t >= 1 else { throw BenchError.usage("gemm: bad thread count '\($0)'") }
                    return t
                }
            case "--repeat":
                guard let r = Int(try value()), r >= 1 else { throw BenchError.usage("gemm: bad --repeat") }
                repeats = r
            default:
                let parts = argument.split(separator: "x").compactMap { Int($0) }
                guard parts.allSatisfy({ $0 >= 1 }), parts.count == 1 || parts.count == 3 else {
                    throw BenchError.usage("gemm: bad size '\(argument)' (N or MxNxK)")
                }
                sizes.append(parts.count == 1 ? (parts[0], parts[0], parts[0]) : (parts[0], parts[1], parts[2]))
            }
            index += 1
        }
        if sizes.isEmpty { sizes = [(512, 512, 512)] }
        let peaks = PeakCache()
        var rows = [["m x n x k", "thr", "median ms", "min ms", "GFLOP/s (min)", "%peak"]]
        for size in sizes {
            var rng = SeededGenerator(seed: 1)
            let a = (0..<size.m * size.k).map { _ in rng.nextFloat(in: -1...1) }
            let b = (0..<size.k * size.n).map { _ in rng.nextFloat(in: -1...1) }
            for threads in threadCounts {
                _ = try MatrixProduct.multiply(a, b, m: size.m, n: size.n, depth: size.k, threads: threads)
                var samples: [Double] = []
                for _ in 0..<repeats {
                    let start = monotonicSeconds()
                    _ = try MatrixProduct.multiply(a, b, m: size.m, n: size.n, depth: size.k, threads: threads)
                    samples.append(monotonicSeconds() - start)
                }
                let stats = TimingStatistics(samples: samples)
                let gflops = 2 * Double(size.m) * Double(size.n) * Double(size.k) / stats.minSeconds / 1e9
                rows.append(["\(size.m) x \(size.n) x \(size.k)", String(threads),
                             String(format: "%.3f", stats.medianSeconds * 1e3),
                             String(format: "%.3f", stats.minSeconds * 1e3),
                             String(format: "%.1f", gflops),
                             String(format: "%.1f", 100 * gflops / peaks.peak(threads: threads))])
            }
        }
        print(TextTable.render(rows, rightAligned: Set(1..<6)))
        let list = peaks.measured.map { "\($0.threads) thread\($0.threads == 1 ? "" : "s") \(String(format: "%.1f", $0.gflops))" }
        print("FMA peak (measured, GFLOP/s): " + list.joined(separator: ", "))
    }
}
