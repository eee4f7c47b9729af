import Foundation
@_spi(Benchmarking) import EfficientAttention

/// The `attention-bench` command: parse, plan, run, report. `main.swift` only calls
/// ``AttentionBenchCommand/main(_:)``.
public enum AttentionBenchCommand {
    /// Runs the command with `arguments` (without the program name); returns the exit
    /// code: 0 success, 1 run-time failure, 2 bad usage.
    public static func main(_ arguments: [String], registry: Registry = .standard) -> Int32 {
        do {
            try run(arguments, registry: registry)
            return 0
        } catch let error as BenchError {
            printError("attention-bench: error: \(error.message)")
            if case .usage = error { printError("Run 'attention-bench --help' for usage.") }
            return error.exitCode
        } catch {
            printError("attention-bench: error: \(error)")
            return 1
        }
    }

    static func run(_ arguments: [String], registry: Registry) throws {
        if arguments.first == "gemm" {
            try GemmBench.run(Array(arguments.dropFirst()))
            return
        }
        let options = try BenchOptions.parse(arguments, registry: registry)
        if options.help {
            print(BenchOptions.helpText(registry: registry), terminator: "")
            return
        }
        if options.list {
            print(registry.listing(), terminator: "")
            let available = registry.entries.filter(\.isAvailable).count
            print("\(available) of \(registry.entries.count) available. Library built with "
                  + (fusedMultiplyAddEnabled ? "fused multiply-add (NativeCPU trait)." : "the default, portable path (no FMA; --traits NativeCPU for this CPU)."))
            return
        }
        if !options.freshPages { SteadyStateAllocator.enable() }
        let quiet = options.quiet
        let records: [BenchRecord]
        let notes: [SweepNote]
        let peaks: PeakCache
        var bandwidths: [(threads: Int, gbPerSecond: Double)] = []
        if options.decode {
            let plan = try DecodePlan.make(options, registry: registry)
            let runner = DecodeRunner(options: options) { line in
                if !quiet { printError(line) }
            }
            records = try runner.run(plan)
            notes = plan.notes
            peaks = runner.peaks
            bandwidths = runner.bandwidth.measured
        } else {
            let plan = try SweepPlan.make(options, registry: registry)
            let runner = SweepRunner(options: options, registry: registry) { line in
                if !quiet { printError(line) }
            }
            notes = plan.notes
            records = try runner.run(plan)
            peaks = runner.peaks
        }
        if case .names = options.variants {
            for note in notes where note.note.hasPrefix("not available") {
                printError("attention-bench: note: '\(note.variant)' is not available yet; nothing to run for it")
            }
        }
        print(SteadyStateAllocator.description)
        if options.hugePages {
            print("Inputs: the timed calls read copies of query, key and value in memory advised for transparent huge pages (--huge-pages)")
        }
        print(ReportTable.render(records, notes: notes.map { ($0.variant, $0.note) },
                                 peaks: peaks.measured, fma: fusedMultiplyAddEnabled,
                                 bandwidths: bandwidths), terminator: "")
        if records.isEmpty { print("Nothing was run.") }
        var written: [String] = []
        if let path = options.jsonPath {
            try writeText(RecordWriter.json(records), to: path)
            written.append(path)
        }
        if let path = options.csvPath {
            try writeText(RecordWriter.csv(records), to: path)
            written.append(path)
        }
        if let directory = options.chartsDirectory {
            written += try BenchCharts.write(records, to: directory)
        }
        if !written.isEmpty && !quiet { printError("wrote " + written.joined(separator: ", ")) }
        // Keeps the FMA-peak loop's results observable.
        if FMAPeak.sinkValue.isNaN { printError("(FMA peak loop produced NaN)") }
    }
}

/// A line on stderr.
public func printError(_ line: String) {
    FileHandle.standardError.write((line + "\n").data(using: .utf8)!)
}
