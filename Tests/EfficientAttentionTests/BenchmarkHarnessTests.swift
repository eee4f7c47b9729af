// Tests of the benchmark harness (Benchmarks/AttentionBenchCore): argument parsing, the
// registry, FLOP and ratio formulas, timing rules, JSON/CSV shape, SVG well-formedness
// and series, sweep planning, and a tiny end-to-end sweep. No timing assertions.
import Testing
import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif
import EfficientAttention
import AttentionBenchCore

@Suite struct BenchmarkHarnessTests {

    // MARK: Argument parsing

    @Test func defaultsWithoutArguments() throws {
        let o = try BenchOptions.parse([], cores: 2)
        #expect(o.variants == .all)
        #expect(o.sequenceLengths == [1024, 2048])
        #expect(o.threads == [2, 1])
        #expect(o.batches == [1] && o.heads == [8] && o.dims == [64] && o.causal == [false])
        #expect(o.kvHeads == nil && o.keyLength == nil && o.preset == nil)
        #expect(o.timing == TimingPolicy(warmup: 1, repeatCount: nil, budget: nil))
        #expect(try BenchOptions.parse([], cores: 1).threads == [1])
    }

    @Test func issueTwoCommandLine() throws {
        let o = try BenchOptions.parse(["--variants", "dense,vanilla", "--seq", "2048", "--heads", "8",
                                        "--dim", "64", "--threads", "1", "--json", "out.json"], cores: 2)
        #expect(o.variants == .names(["dense", "vanilla"]))
        #expect(o.sequenceLengths == [2048])
        #expect(o.heads == [8] && o.dims == [64] && o.threads == [1])
        #expect(o.jsonPath == "out.json")
        #expect(o.selectedEntries(in: .standard).map(\.name) == ["dense", "vanilla"])
    }

    @Test func listsSuffixesAndInlineValues() throws {
        let o = try BenchOptions.parse(["--seq=1K,2k,3000,1024", "--seq-k", "4K", "--batch", "1,2", "--heads=4,8",
                                        "--kv-heads", "1,2", "--dim", "32,64", "--threads", "all,1",
                                        "--repeat", "3", "--budget", "0.25", "--warmup", "0", "--seed", "7",
                                        "--csv", "a.csv", "--charts", "dir", "--quiet", "--fresh-pages"], cores: 2)
        let plain = try BenchOptions.parse([], cores: 2)
        #expect(o.freshPages && !plain.freshPages)
        #expect(o.sequenceLengths == [1024, 2048, 3000])
        #expect(o.keyLength == 4096)
        #expect(o.batches == [1, 2] && o.heads == [4, 8] && o.kvHeads == [1, 2] && o.dims == [32, 64])
        #expect(o.threads == [2, 1])
        #expect(o.repeatCount == 3 && o.budget == 0.25 && o.warmup == 0 && o.seed == 7)
        #expect(o.csvPath == "a.csv" && o.chartsDirectory == "dir" && o.quiet)
    }

    @Test func causalForms() throws {
        #expect(try BenchOptions.parse(["--causal"]).causal == [true])
        #expect(try BenchOptions.parse(["--causal", "--seq", "64"]).causal == [true])
        #expect(try BenchOptions.parse(["--causal", "both"]).causal == [false, true])
        #expect(try BenchOptions.parse(["--causal=no"]).causal == [false])
        #expect(try BenchOptions.parse(["--causal=yes"]).causal == [true])
    }

    @Test func presets() throws {
        let lra = try BenchOptions.parse(["--preset", "lra"], cores: 2)
        #expect(lra.sequenceLengths == [1024, 2048, 3072, 4096] && lra.threads == [2])
        let long = try BenchOptions.parse(["--preset=long"], cores: 2)
        #expect(long.sequenceLengths.last == 16384 && long.preset == .long)
        // Explicit options win over the preset.
        let mixed = try BenchOptions.parse(["--preset", "lra", "--seq", "512", "--threads", "1"], cores: 2)
        #expect(mixed.sequenceLengths == [512] && mixed.threads == [1])
    }

    @Test func helpAndListShortCircuit() throws {
        #expect(try BenchOptions.parse(["--seq", "bad", "--help"]).help)
        #expect(try BenchOptions.parse(["-h"]).help)
        #expect(try BenchOptions.parse(["--list"]).list)
        let help = BenchOptions.helpText()
        for option in ["--variants", "--seq", "--seq-k", "--batch", "--heads", "--kv-heads", "--dim", "--causal",
                       "--threads", "--repeat", "--budget", "--warmup", "--seed", "--json", "--csv", "--charts",
                       "--quiet", "--fresh-pages", "--preset", "--list", "--help"] + Parameter.allCases.map(\.flag) {
            #expect(help.contains(option), "help lacks \(option)")
        }
    }

    @Test(arguments: [
        ["--bogus"], ["--variants", "nope"], ["--variants", "dense,,vanilla"], ["--seq", "abc"], ["--seq", "0"],
        ["--seq", "-5"], ["--seq", "1.5"], ["--seq", "1024,x"], ["--threads"], ["--threads", "0"],
        ["--repeat", "0"], ["--budget", "0"], ["--budget", "nan"], ["--warmup", "-1"], ["--seed", "-1"],
        ["--preset", "huge"], ["--causal=maybe"], ["positional"], ["--kv-heads", "3"], ["--json="],
        ["--quiet=1"], ["--variants", "dense", "--window", "256"], ["--variants", "lsh", "--proj", "64"],
        ["--seq", "99999999999999999"],
    ])
    func badCommandLinesAreUsageErrors(_ arguments: [String]) {
        do {
            _ = try BenchOptions.parse(arguments, cores: 2)
            Issue.record("\(arguments) was accepted")
        } catch let error as BenchError {
            guard case .usage(let message) = error else {
                Issue.record("\(arguments): not a usage error: \(error)")
                return
            }
            #expect(error.exitCode == 2)
            #expect(!message.isEmpty)
        } catch {
            Issue.record("\(arguments): unexpected error \(error)")
        }
    }

    @Test func commandExitCodes() {
        #expect(AttentionBenchCommand.main(["--no-such-option"]) == 2)
        #expect(AttentionBenchCommand.main(["--variants", "dense", "--hashes", "4"]) == 2)
    }

    @Test func conformerSettings() throws {
        let lsh = try BenchOptions.parse(["--variants", "lsh", "--bucket-size", "32", "--hashes", "8"])
        #expect(lsh.overrides == [.bucketSize: 32, .hashes: 8])
        // With `all`, a setting applies to the conformers that take it.
        let all = try BenchOptions.parse(["--window", "128"])
        #expect(all.overrides == [.window: 128])
        // ... and is an error when no registered conformer takes it.
        let registry = Registry(entries: [Registry.standard.entry(named: "dense")!])
        #expect(throws: BenchError.self) { try BenchOptions.parse(["--window", "128"], registry: registry) }
    }

    // MARK: Registry

    @Test func registryNamesAndAvailability() throws {
        let r = Registry.standard
        #expect(r.names == ["vanilla", "dense", "local", "strided", "longformer", "bigbird", "lsh", "routing",
                            "linformer", "linear-elu", "performer", "multi-query", "transformer-xl", "compressive", "adaptive-span",
                            "axial", "memory-compressed", "sinkhorn", "isab", "pma", "etc", "custom-mask",
                            "score-function"])
        // Every registered conformer has landed.
        #expect(r.entries.allSatisfy { $0.isAvailable })
        for e in r.entries { #expect(!e.summary.isEmpty && !e.summary.contains("\n")) }
        let listing = r.listing()
        #expect(listing.contains("not available yet") == r.entries.contains { !$0.isAvailable })
        #expect(listing.components(separatedBy: "\n").filter { $0.hasPrefix("lsh ") }.count == 1)
    }

    @Test func registryDefaults() throws {
        let r = Registry.standard
        let p = BenchProblem(shape: AttentionShape(heads: 8, queryLength: 1000, headDim: 64), causal: false)
        #expect(r.entry(named: "local")!.resolveParameters([:], at: p) == [.window: 256])
        #expect(r.entry(named: "longformer")!.resolveParameters([:], at: p) == [.window: 512])
        #expect(r.entry(named: "routing")!.resolveParameters([:], at: p) == [.window: 128])
        #expect(r.entry(named: "bigbird")!.resolveParameters([:], at: p) == [.blockSize: 64, .randomBlocks: 3])
        #expect(r.entry(named: "lsh")!.resolveParameters([:], at: p) == [.bucketSize: 64, .hashes: 4])
        #expect(r.entry(named: "linformer")!.resolveParameters([:], at: p) == [.proj: 256])
        #expect(r.entry(named: "performer")!.resolveParameters([:], at: p) == [.features: 256])
        #expect(r.entry(named: "adaptive-span")!.resolveParameters([:], at: p) == [.span: 128, .ramp: 32])
        #expect(r.entry(named: "strided")!.resolveParameters([:], at: p) == [.stride: 32])
        #expect(r.entry(named: "memory-compressed")!.resolveParameters([:], at: p) == [.compression: 3])
        #expect(r.entry(named: "isab")!.resolveParameters([:], at: p) == [.inducing: 32])
        #expect(r.entry(named: "sinkhorn")!.resolveParameters([:], at: p) == [.blockSize: 64])
        #expect(r.entry(named: "sinkhorn")!.resolveParameters([.sortCut: 4], at: p) == [.blockSize: 64, .sortCut: 4])
        let pma = r.entry(named: "pma")!
        #expect(pma.resolveParameters([:], at: p) == [.seeds: 1] && !pma.approximatesDense)
        #expect(pma.adjustProblem(p, [.seeds: 4]).shape.queryLength == 4)
        let compressive = r.entry(named: "compressive")!
        #expect(compressive.resolveParameters([:], at: p) == [.memory: p.shape.queryLength,
                                                                .compressedMemory: p.shape.queryLength, .compression: 3])
        let compressiveProblem = compressive.adjustProblem(p, [.memory: 5, .compressedMemory: 7, .compression: 3])
        #expect(compressiveProblem.causal && compressiveProblem.shape.keyLength == p.shape.queryLength + 12)
        let etc = r.entry(named: "etc")!
        #expect(etc.resolveParameters([:], at: p) == [.globals: 128, .radius: 84, .maxDistance: 12])
        let etcProblem = etc.adjustProblem(p, [.globals: 16])
        #expect(etcProblem.shape.queryLength == p.shape.queryLength + 16 && etcProblem.shape.keyLength == p.shape.queryLength + 16)
        #expect(r.entry(named: "strided")!.resolveParameters([.stride: 5], at: p) == [.stride: 5])
        let xl = r.entry(named: "transformer-xl")!
        let xlValues = xl.resolveParameters([:], at: p)
        #expect(xlValues == [.memory: 1000])
        let xlProblem = xl.adjustProblem(p, xlValues)
        #expect(xlProblem.shape.keyLength == 2000 && xlProblem.causal)
        #expect(r.entry(named: "multi-query")!.adjustProblem(p, [:]).shape.kvHeads == 1)
        #expect(r.entry(named: "adaptive-span")!.adjustProblem(p, [:]).causal)
        #expect(VariantEntry.describe([.hashes: 4, .bucketSize: 64]) == "bucket-size=64 hashes=4")
    }

    @Test func lshBucketFactor() throws {
        let entry = Registry.standard.entry(named: "lsh")!
        #expect(try BenchOptions.parse(["--variants", "lsh", "--bucket-factor", "16"]).overrides == [.bucketFactor: 16])
        #expect(entry.defaultsDescription.contains("bucket-factor off"))
        let p = BenchProblem(shape: AttentionShape(heads: 8, queryLength: 8192, headDim: 64), causal: false)
        let values = entry.resolveParameters([.bucketFactor: 16], at: p)
        #expect(values == [.bucketSize: 64, .hashes: 4, .bucketFactor: 16])
        #expect(VariantEntry.describe(values) == "bucket-size=64 hashes=4 bucket-factor=16")
        // N = 8192: nBuckets 128 = 16 · 8.
        let lsh = try #require(try entry.make!(ConformerConfig(problem: p, parameters: values, seed: 1)) as? LSHAttention)
        #expect(lsh.bucketFactors == [16, 8])
        let plain = try #require(try entry.make!(ConformerConfig(problem: p, parameters: entry.resolveParameters([:], at: p),
                                                                 seed: 1)) as? LSHAttention)
        #expect(plain.bucketFactors == nil)
        // nBuckets 2 · 64 / 64 = 2 at N = 128, and 10 at N = 640: 16 is not a factor; 10 / 2 = 5 is odd.
        for (n, factor) in [(128, 16), (640, 2), (8192, 3)] {
            let q = BenchProblem(shape: AttentionShape(heads: 8, queryLength: n, headDim: 64), causal: false)
            #expect(throws: AttentionError.self) {
                try entry.make!(ConformerConfig(problem: q, parameters: entry.resolveParameters([.bucketFactor: factor], at: q),
                                                seed: 1))
            }
        }
    }

    @Test func ceilSquareRoots() {
        for n in 0...5000 {
            let r = ceilSquareRoot(n)
            #expect(r * r >= n && (r == 0 || (r - 1) * (r - 1) < n))
        }
        #expect(ceilSquareRoot(1024) == 32 && ceilSquareRoot(1025) == 33 && ceilSquareRoot(16384) == 128)
    }

    // MARK: Accounting

    @Test func denseFlopFormula() throws {
        #expect(Accounting.denseFlops(batch: 1, heads: 8, queryLength: 2048, keyLength: 2048, headDim: 64,
                                      valueDim: 64, causal: false) == 4 * 2048 * 2048 * 64 * 8)
        for (nq, nk) in [(1, 1), (5, 7), (7, 5), (17, 17), (64, 300), (300, 64), (777, 777)] {
            var brute = 0
            for i in 0..<nq { brute += max(0, min(nk, i + nk - nq + 1)) }
            #expect(Accounting.denseVisiblePairsPerHead(queryLength: nq, keyLength: nk, causal: true) == brute)
            for causal in [false, true] {
                let shape = AttentionShape(batch: 2, heads: 4, kvHeads: 2, queryLength: nq, keyLength: nk,
                                           headDim: 16, valueDim: 24)
                let expected = Accounting.denseFlops(batch: 2, heads: 4, queryLength: nq, keyLength: nk,
                                                     headDim: 16, valueDim: 24, causal: causal)
                #expect(try DenseAttention(causal: causal).cost(shape).flops == expected)
                #expect(try VanillaAttention(causal: causal).cost(shape).flops == expected)
            }
        }
    }

    @Test func ratiosAndErrors() {
        #expect(Accounting.gflops(flops: 2e9, seconds: 0.5) == 4)
        #expect(Accounting.gflops(flops: 2e9, seconds: 0) == 0)
        #expect(Accounting.percentOfPeak(gflops: 140, peak: 280) == 50)
        #expect(Accounting.ratio(3, 2) == 1.5)
        #expect(Accounting.ratio(3, 0) == nil)
        #expect(Accounting.relativeError([1, 2, 3], reference: [1, 2, 3]) == 0)
        #expect(Accounting.relativeError([3, 4], reference: [0, 0]) == .infinity)
        #expect(Accounting.relativeError([1], reference: [1, 2]) == nil)
        let e = Accounting.relativeError([3, 0], reference: [3, 4])!
        #expect(abs(e - 4.0 / 5.0) < 1e-12)
    }

    @Test func timingStatisticsAndPolicy() {
        let odd = TimingStatistics(samples: [3, 1, 2])
        #expect(odd.medianSeconds == 2 && odd.minSeconds == 1 && odd.runs == 3)
        let even = TimingStatistics(samples: [4, 1, 3, 2])
        #expect(even.medianSeconds == 2.5 && even.minSeconds == 1)

        let exact = TimingPolicy(repeatCount: 3)
        #expect(exact.wantsAnotherRun(after: 0, elapsed: 100))
        #expect(exact.wantsAnotherRun(after: 2, elapsed: 100))
        #expect(!exact.wantsAnotherRun(after: 3, elapsed: 0))
        let budget = TimingPolicy(budget: 1)
        #expect(budget.wantsAnotherRun(after: 0, elapsed: 5))
        #expect(!budget.wantsAnotherRun(after: 1, elapsed: 1.5))
        #expect(budget.wantsAnotherRun(after: 1, elapsed: 0.5))
        #expect(!budget.wantsAnotherRun(after: TimingPolicy.defaultCap, elapsed: 0))
        let capped = TimingPolicy(repeatCount: 2, budget: 10)
        #expect(!capped.wantsAnotherRun(after: 2, elapsed: 0.1))
        let defaults = TimingPolicy()
        #expect(!defaults.wantsAnotherRun(after: 1, elapsed: TimingPolicy.defaultBudget))
    }

    @Test func fmaLoopAccounting() {
        #expect(FMAPeak.flops(iterations: 10) == Double(10 * FMAPeak.accumulators * FMAPeak.lanes * 2))
        #expect(FMAPeak.accumulators >= 12)
        #expect(FMAPeak.chains(iterations: 1000, seed: 1).isFinite)
        let cache = PeakCache(measure: { Double($0) * 100 })
        #expect(cache.peak(threads: 2) == 200 && cache.peak(threads: 2) == 200)
        #expect(cache.measured.map(\.threads) == [2])
    }

    /// AddressSanitizer and ThreadSanitizer replace glibc's allocator, whose statistics
    /// ``HeapMeter`` reads: detected by the sanitizer runtime's entry point, or
    /// `EA_SANITIZER=address` / `thread` (KernelDocs/Robustness.md).
    static let underSanitizerAllocator = ProcessInfo.processInfo.environment["EA_SANITIZER"] != nil
        || dlsym(UnsafeMutableRawPointer(bitPattern: 0), "__asan_init") != nil
        || dlsym(UnsafeMutableRawPointer(bitPattern: 0), "__tsan_init") != nil

    @Test(.disabled(if: underSanitizerAllocator, "a sanitizer's allocator keeps no glibc malloc statistics"))
    func heapMeterSeesALiveAllocation() throws {
        guard HeapMeter.isSupported else { return }
        let meter = HeapMeter()
        // 64 MiB kept alive past the call; other tests running in parallel allocate far less.
        let (array, growth) = meter.measure { [Float](repeating: 1, count: 16 << 20) }
        #expect(array.count == 16 << 20)
        #expect(growth >= 48 << 20)
    }

    // MARK: Records, JSON, CSV

    static func sampleRecords() -> [BenchRecord] {
        var out: [BenchRecord] = []
        for variant in ["vanilla", "dense"] {
            for threads in [2, 1] {
                for n in [1024, 2048] {
                    let scale = variant == "vanilla" ? 10.0 : 1.0
                    out.append(BenchRecord(
                        variant: variant, batch: 1, heads: 8, kvHeads: 8, seqQ: n, seqK: n, dim: 64, valueDim: 64,
                        causal: false, threads: threads, runs: 3, medianSeconds: scale * Double(n * n) * 1e-8 / Double(threads),
                        minSeconds: scale * Double(n * n) * 0.9e-8 / Double(threads),
                        flops: Accounting.denseFlops(batch: 1, heads: 8, queryLength: n, keyLength: n, headDim: 64,
                                                     valueDim: 64, causal: false),
                        scoredPairs: 8 * n * n, peakGflops: 280 * Double(threads),
                        workspaceBytes: variant == "vanilla" ? 4 * n * n * threads : 0,
                        measuredPeakBytes: (variant == "vanilla" ? 4 * n * n * threads : 0) + 8 * n * 65 * 4,
                        outputBytes: 8 * n * 65 * 4, relativeError: variant == "dense" ? 0 : 1e-6))
                }
            }
        }
        return SweepRunner.fillRelativeColumns(out)
    }

    @Test func relativeColumns() {
        let records = Self.sampleRecords()
        let vanilla = records.first { $0.variant == "vanilla" && $0.threads == 2 && $0.seqQ == 1024 }!
        let dense = records.first { $0.variant == "dense" && $0.threads == 2 && $0.seqQ == 1024 }!
        #expect(abs(vanilla.speedupVsDense! - 0.1) < 1e-12)
        #expect(abs(dense.speedupVsVanilla! - 10) < 1e-12)
        #expect(dense.speedupVsDense == 1 && dense.memoryVsDense == 1)
        #expect(vanilla.memoryVsDense! > 1)
        #expect(abs(dense.gflops - dense.flops / dense.medianSeconds / 1e9) < 1e-9)
    }

    @Test func jsonShape() throws {
        let records = Self.sampleRecords()
        let text = RecordWriter.json(records)
        let parsed = try JSONSerialization.jsonObject(with: Data(text.utf8)) as? [[String: Any]]
        let array = try #require(parsed)
        #expect(array.count == records.count)
        let required = ["variant", "batch", "heads", "kvHeads", "seqQ", "seqK", "dim", "causal", "threads",
                        "medianSeconds", "minSeconds", "flops", "gflops", "peakGflops", "workspaceBytes",
                        "measuredPeakBytes", "relativeError", "speedupVsDense", "memoryVsDense"]
        for object in array {
            for key in required { #expect(object[key] != nil, "missing \(key)") }
            #expect(Set(object.keys) == Set(BenchRecord.fieldNames))
        }
        #expect(array[0]["variant"] as? String == "vanilla")
        #expect(array[0]["gbPerSecond"] is NSNull && array[0]["peakGBPerSecond"] is NSNull)
        #expect((array[0]["seqQ"] as? NSNumber)?.intValue == 1024)
        #expect((array[0]["causal"] as? NSNumber)?.boolValue == false)
        // Keys appear in the fixed order.
        let firstLine = text.split(separator: "\n")[1]
        var last = firstLine.startIndex
        for key in BenchRecord.fieldNames {
            let range = try #require(firstLine.range(of: "\"\(key)\":", range: last..<firstLine.endIndex))
            last = range.upperBound
        }
        // Missing values are null; an empty list is an empty array.
        var r = records[0]
        r.speedupVsDense = nil
        r.relativeError = .nan
        let one = try JSONSerialization.jsonObject(with: Data(RecordWriter.json([r]).utf8)) as! [[String: Any]]
        #expect(one[0]["speedupVsDense"] is NSNull && one[0]["relativeError"] is NSNull)
        #expect((try JSONSerialization.jsonObject(with: Data(RecordWriter.json([]).utf8)) as? [Any])?.isEmpty == true)
        // Strings are escaped.
        r.parameters = "a\"b\\c\n"
        let escaped = try JSONSerialization.jsonObject(with: Data(RecordWriter.json([r]).utf8)) as! [[String: Any]]
        #expect(escaped[0]["parameters"] as? String == "a\"b\\c\n")
    }

    @Test func csvShape() {
        var records = Self.sampleRecords()
        records[0].speedupVsVanilla = nil
        records[1].parameters = "window=256, x"
        let lines = RecordWriter.csv(records).split(separator: "\n", omittingEmptySubsequences: false).dropLast()
        #expect(lines.count == records.count + 1)
        #expect(lines.first.map(String.init) == BenchRecord.fieldNames.joined(separator: ","))
        for line in lines where !line.contains("\"") {
            #expect(line.split(separator: ",", omittingEmptySubsequences: false).count == BenchRecord.fieldNames.count)
        }
        #expect(lines[2].contains("\"window=256, x\""))
        let columns = BenchRecord.fieldNames
        let first = lines[1].split(separator: ",", omittingEmptySubsequences: false)
        #expect(first[columns.firstIndex(of: "variant")!] == "vanilla")
        #expect(first[columns.firstIndex(of: "speedupVsVanilla")!] == "")
    }

    @Test func tableRendering() {
        let records = Self.sampleRecords()
        let text = ReportTable.render(records, notes: [("lsh", "not available yet")],
                                      peaks: [(1, 280), (2, 560)], fma: true)
        #expect(text.contains("FMA peak"))
        #expect(text.contains("B=1 H=8 Hkv=8 D=64 non-causal"))
        for column in ["variant", "thr", "median ms", "min ms", "GFLOP/s", "%peak", "workspace", "measured",
                       "rel.err", "x dense", "x vanilla", "mem/dense", "mem/vanilla"] {
            #expect(text.contains(column), "table lacks \(column)")
        }
        #expect(text.contains("lsh  not available yet"))
        // Header and data rows line up: the 'N' column ends at the same position.
        let lines = text.split(separator: "\n").map(String.init)
        let header = lines.first { $0.hasPrefix("variant") }!
        let rows = lines.filter { $0.hasPrefix("dense ") || $0.hasPrefix("vanilla ") }
        #expect(rows.count == records.count)
        let end = header.range(of: "   N")!.upperBound.utf16Offset(in: header)
        for row in rows {
            let idx = row.index(row.startIndex, offsetBy: end - 1)
            #expect(row[idx] == "4" || row[idx] == "8", "misaligned: \(row)")
        }
    }

    // MARK: SVG

    /// Parses an SVG document; returns the `data-series` names or nil if malformed.
    static func parseSVG(_ text: String) -> (series: [String], polylines: Int, circles: Int, texts: [String])? {
        #if canImport(FoundationXML) || canImport(Darwin)
        final class Collector: NSObject, XMLParserDelegate {
            var series: [String] = []
            var polylines = 0, circles = 0
            var texts: [String] = []
            var inText = false
            var current = ""
            func parser(_ parser: XMLParser, didStartElement name: String, namespaceURI: String?,
                        qualifiedName: String?, attributes: [String: String] = [:]) {
                if name == "g", let s = attributes["data-series"] { series.append(s) }
                if name == "polyline" { polylines += 1 }
                if name == "circle" { circles += 1 }
                if name == "text" { inText = true; current = "" }
            }
            func parser(_ parser: XMLParser, foundCharacters string: String) {
                if inText { current += string }
            }
            func parser(_ parser: XMLParser, didEndElement name: String, namespaceURI: String?, qualifiedName: String?) {
                if name == "text" { texts.append(current); inText = false }
            }
        }
        let parser = XMLParser(data: Data(text.utf8))
        let collector = Collector()
        parser.delegate = collector
        guard parser.parse() else { return nil }
        return (collector.series, collector.polylines, collector.circles, collector.texts)
        #else
        return nil
        #endif
    }

    @Test func timeChartIsWellFormedWithExpectedSeries() throws {
        let records = Self.sampleRecords()
        let svg = BenchCharts.timeChart(records).svg()
        let parsed = try #require(Self.parseSVG(svg))
        #expect(parsed.series == ["vanilla 2t", "vanilla 1t", "dense 2t", "dense 1t"])
        #expect(parsed.polylines == 4)
        #expect(parsed.circles >= 8)
        #expect(parsed.texts.contains("Attention time vs sequence length"))
        #expect(parsed.texts.contains("sequence length N (log)"))
        #expect(parsed.texts.contains("median time per call (log)"))
        #expect(parsed.texts.contains("1K") && parsed.texts.contains("2K"))
        #expect(parsed.texts.contains("dense 1t"))  // legend
        #expect(svg.hasPrefix("<?xml"))
    }

    @Test func memoryChartHasMeasuredAndModelSeries() throws {
        let records = Self.sampleRecords()
        let parsed = try #require(Self.parseSVG(BenchCharts.memoryChart(records).svg()))
        #expect(parsed.series.count == 8)
        #expect(parsed.series.contains("vanilla 1t") && parsed.series.contains("vanilla 1t (model)"))
        #expect(parsed.series.contains("dense 2t (model)"))
        // Dense's zero workspace cannot be drawn on a log axis: no line for it.
        #expect(parsed.polylines == 6)
    }

    @Test func chartEscapesTextAndSurvivesOnePoint() throws {
        let chart = LogLogChart(title: "a < b & c", xLabel: "x \"q\"", yLabel: "y 'p'",
                                series: [ChartSeries(name: "s<&>", points: [.init(x: 3, y: 7)], color: "#000"),
                                         ChartSeries(name: "empty", points: [.init(x: 0, y: 1)], color: "#111")],
                                xFormat: { "\($0)" }, yFormat: { "\($0)" })
        let parsed = try #require(Self.parseSVG(chart.svg()))
        #expect(parsed.series == ["s<&>", "empty"])
        #expect(parsed.polylines == 0 && parsed.circles >= 1)
        #expect(parsed.texts.contains("a < b & c"))
    }

    @Test func logTicks() {
        #expect(LogLogChart.logTicks(lo: 900, hi: 4500, preferred: [1024, 2048, 4096]) == [1024, 2048, 4096])
        #expect(LogLogChart.logTicks(lo: 0.009, hi: 1.1) == [0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1])
        let wide = LogLogChart.logTicks(lo: 1, hi: 1e9)
        #expect(wide.count == 10 && wide.first == 1)
        #expect(LogLogChart.logTicks(lo: 3.1, hi: 6.2).count >= 3)
    }

    @Test func chartsAreWrittenToADirectory() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("bench-charts-\(getpid())").path
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let paths = try BenchCharts.write(Self.sampleRecords(), to: dir)
        #expect(paths.map { ($0 as NSString).lastPathComponent } == ["time_vs_n.svg", "memory_vs_n.svg"])
        for path in paths {
            let text = try String(contentsOfFile: path, encoding: .utf8)
            #expect(Self.parseSVG(text) != nil)
        }
    }

    // MARK: Sweep planning and a tiny run

    @Test func planReportsUnavailableAndSkipsLongQuadratic() throws {
        let o = try BenchOptions.parse(["--preset", "long", "--seq", "8192,16384", "--threads", "1"])
        let plan = try SweepPlan.make(o)
        // Every available conformer at every length, except the quadratic ones past their limit.
        let available = Registry.standard.entries.filter(\.isAvailable)
        let expected = [8192, 16384].flatMap { n in
            available.filter { $0.longPresetLimit.map { n <= $0 } ?? true }.map { "\($0.name)@\(n)" }
        }
        #expect(plan.jobs.map { "\($0.entry.name)@\($0.base.shape.queryLength)" } == expected)
        #expect(expected.prefix(2) == ["vanilla@8192", "dense@8192"] && expected.contains("dense@16384")
                && !expected.contains("vanilla@16384"))
        let notes = Dictionary(grouping: plan.notes, by: \.variant)
        let unavailable = Registry.standard.entries.filter { !$0.isAvailable }.map(\.name)
        #expect(notes.count == unavailable.count + 1)  // the unavailable ones + vanilla's skip
        for name in unavailable { #expect(notes[name]?.first?.note.contains("not available") == true) }
        #expect(notes["vanilla"]?.first?.note.contains("8192") == true)
        #expect(plan.jobs[0].cost.flops == Accounting.denseFlops(batch: 1, heads: 8, queryLength: 8192, keyLength: 8192,
                                                                  headDim: 64, valueDim: 64, causal: false))
    }

    /// `--varlen`: the packed lengths in order (repeats kept), N their sum, the FLOPs of the
    /// sequences (not of the padded problem), a run whose records say so and count
    /// allocations; conflicting options are refused.
    @Test func packedSequences() throws {
        let o = try BenchOptions.parse(["--varlen", "64,64,300", "--variants", "dense", "--causal", "yes",
                                        "--threads", "1", "--repeat", "2", "--heads", "2", "--dim", "16"])
        #expect(o.packedLengths == [64, 64, 300] && o.sequenceLengths == [428])
        let plan = try SweepPlan.make(o)
        let perSequence = [64, 64, 300].map {
            Accounting.denseFlops(batch: 1, heads: 2, queryLength: $0, keyLength: $0, headDim: 16, valueDim: 16, causal: true)
        }.reduce(0, +)
        #expect(plan.jobs.count == 1 && plan.jobs[0].cost.flops == perSequence)
        let records = try SweepRunner(options: o, peaks: PeakCache(measure: { Double($0) * 100 }), progress: { _ in }).run(plan)
        #expect(records.count == 1 && records[0].parameters.contains("varlen=64,64,300") && records[0].seqQ == 428)
        #expect(records[0].relativeError == 0)
        // Counted process-wide (other tests allocate meanwhile): present, not asserted zero here.
        #expect((records[0].allocationsPerCall != nil) == AllocationCounter.isSupported)
        for other in [["--seq", "128"], ["--batch", "2"], ["--decode"]] {
            #expect(throws: BenchError.self) { try BenchOptions.parse(["--varlen", "64,64"] + other) }
        }
        // With --backward: the packed backward, its FLOPs 2.5x the sequences' (dense), in
        // Float and in bfloat16.
        for io in ["f32", "bf16"] {
            let b = try BenchOptions.parse(["--varlen", "64,1,300", "--variants", "dense", "--causal", "yes",
                                            "--backward", "--io", io, "--threads", "2", "--repeat", "1",
                                            "--heads", "2", "--dim", "16"])
            let records = try SweepRunner(options: b, peaks: PeakCache(measure: { Double($0) * 100 }),
                                          progress: { _ in }).run(try SweepPlan.make(b))
            let forward = [64, 1, 300].map {
                Accounting.denseFlops(batch: 1, heads: 2, queryLength: $0, keyLength: $0, headDim: 16, valueDim: 16,
                                      causal: true)
            }.reduce(0, +)
            #expect(records.map(\.pass) == ["forward", "backward", "forward+backward"], "\(io)")
            #expect(records.count == 3 && records[1].flops == 2.5 * forward && records[2].flops == 3.5 * forward,
                    "\(io): backward FLOPs \(records.map(\.flops)), expected 2.5x and 3.5x \(forward)")
            #expect(records.allSatisfy { $0.parameters.contains("varlen=64,1,300") })
        }
        // With --bias: [1, H, max N, max N], read by every sequence, forward and backward.
        let biased = try BenchOptions.parse(["--varlen", "64,1,300", "--variants", "dense,local", "--bias",
                                             "--backward", "--threads", "2", "--repeat", "1", "--heads", "2",
                                             "--dim", "16"])
        #expect(try biased.modifiers(shape: AttentionShape(heads: 2, queryLength: 365, headDim: 16)).bias?.shape
                == [1, 2, 300, 300])
        let biasedRecords = try SweepRunner(options: biased, peaks: PeakCache(measure: { Double($0) * 100 }),
                                            progress: { _ in }).run(try SweepPlan.make(biased))
        #expect(biasedRecords.count == 6 && biasedRecords.allSatisfy { $0.parameters.contains("bias") },
                "\(biasedRecords.map { ($0.variant, $0.pass, $0.parameters) })")
    }

    /// `--mask document:K` runs custom-mask with K documents (FLOPs of K diagonal blocks);
    /// `--softcap`, `--alibi`, `--sinks` apply to the conformers that take modifiers (their
    /// records say so) and skip the others with a note; bad values are refused.
    @Test func masksAndModifiers() throws {
        let o = try BenchOptions.parse(["--mask", "document:4", "--seq", "512", "--heads", "2", "--dim", "16",
                                        "--threads", "1", "--repeat", "1"])
        #expect(o.overrides[.documents] == 4)
        let plan = try SweepPlan.make(o)
        #expect(plan.jobs.map(\.entry.name) == ["custom-mask"])
        #expect(plan.jobs[0].cost.scoredPairs == 2 * 4 * 128 * 128)   // documents of whole query tiles
        let m = try BenchOptions.parse(["--softcap", "30", "--alibi", "--sinks", "--bias", "--variants", "dense,linformer",
                                        "--seq", "64", "--heads", "2", "--dim", "16", "--threads", "1", "--repeat", "1"])
        let modified = try SweepPlan.make(m)
        #expect(modified.jobs.map(\.entry.name) == ["dense"])
        #expect(modified.notes.contains { $0.variant == "linformer" && $0.note.contains("score modifiers") })
        let records = try SweepRunner(options: m, peaks: PeakCache(measure: { Double($0) * 100 }), progress: { _ in })
            .run(modified)
        #expect(records[0].parameters.contains("softcap=30.0") && records[0].parameters.contains("alibi")
                && records[0].parameters.contains("sinks") && records[0].parameters.contains("bias"))
        #expect(try m.modifiers(shape: AttentionShape(heads: 2, queryLength: 64, headDim: 16)).bias?.shape == [1, 2, 64, 64])
        for bad in [["--mask", "documents:4"], ["--mask", "document:0"], ["--softcap", "0"], ["--softcap", "x"]] {
            #expect(throws: BenchError.self) { try BenchOptions.parse(bad) }
        }
        // Without dense in the run, the error column's dense reference takes the modifiers
        // too: a local window covering every key is dense.
        let alone = try BenchOptions.parse(["--softcap", "30", "--alibi", "--sinks", "--bias", "--variants", "local",
                                            "--window", "256", "--seq", "64", "--heads", "2", "--dim", "16",
                                            "--threads", "1", "--repeat", "1"])
        let local = try SweepRunner(options: alone, peaks: PeakCache(measure: { Double($0) * 100 }), progress: { _ in })
            .run(try SweepPlan.make(alone))
        #expect(local.count == 1 && (local[0].relativeError ?? 1) < 1e-5, "\(local.map(\.relativeError))")
        // The backward takes the modifiers too.
        let withBackward = try BenchOptions.parse(["--alibi", "--softcap", "20", "--backward"])
        #expect(withBackward.backward && withBackward.alibi && withBackward.softCap == 20)
        // Decode mode takes them too: the record says so, and the error column is against
        // dense with the same modifiers (small), not plain dense.
        let d = try BenchOptions.parse(["--variants", "multi-query", "--decode", "--cache", "300", "--heads", "4",
                                        "--kv-heads", "2", "--dim", "16", "--softcap", "5", "--alibi", "--sinks",
                                        "--threads", "1", "--repeat", "1", "--quiet"])
        let decoded = try DecodeRunner(options: d, peaks: PeakCache(measure: { Double($0) * 100 }),
                                       bandwidth: BandwidthCache(measure: { Double($0) * 10 }), progress: { _ in })
            .run(try DecodePlan.make(d))
        #expect(decoded.count == 1)
        #expect(decoded[0].parameters.contains("softcap=5.0 alibi sinks"))
        #expect((decoded[0].relativeError ?? 1) < 1e-5)
    }

    /// `--io`: one record per element type, each saying so (JSON field `io`, the settings
    /// column); 16-bit dense is compared with Float dense (an error of the inputs' rounding,
    /// not 0); a fallback conformer runs too; bad values and combinations are refused.
    @Test func ioPrecisions() throws {
        let o = try BenchOptions.parse(["--io", "f32,f16,bf16", "--variants", "dense,linformer", "--seq", "64",
                                        "--heads", "2", "--dim", "16", "--threads", "1", "--repeat", "1"])
        #expect(o.ioPrecisions == [.float32, .float16, .bfloat16])
        let records = try SweepRunner(options: o, peaks: PeakCache(measure: { Double($0) * 100 }), progress: { _ in })
            .run(try SweepPlan.make(o))
        let dense = records.filter { $0.variant == "dense" }
        #expect(dense.map(\.io) == ["f32", "f16", "bf16"])
        #expect(dense[0].relativeError == 0)
        let f16Error = dense[1].relativeError ?? 1, bf16Error = dense[2].relativeError ?? 1
        #expect(f16Error > 0 && f16Error < 3e-3, "f16 error \(f16Error)")
        #expect(bf16Error > f16Error && bf16Error < 2e-2, "bf16 error \(bf16Error)")
        #expect(dense[1].parameters.contains("io=f16") && !dense[0].parameters.contains("io="))
        #expect(records.filter { $0.variant == "linformer" }.map(\.io) == ["f32", "f16", "bf16"])
        for bad in [["--io", "f8"], ["--io", "f16", "--decode"]] {
            #expect(throws: BenchError.self) { try BenchOptions.parse(bad) }
        }
        // With --backward: the 16-bit gradients entry point, its records carrying the io.
        let backward = try BenchOptions.parse(["--io", "bf16", "--backward", "--variants", "dense", "--seq", "40",
                                               "--heads", "2", "--dim", "8", "--threads", "1", "--repeat", "1"])
        let backwardRecords = try SweepRunner(options: backward, peaks: PeakCache(measure: { Double($0) * 100 }),
                                              progress: { _ in }).run(try SweepPlan.make(backward))
        #expect(backwardRecords.map { "\($0.pass) \($0.io)" }
                == ["forward bf16", "backward bf16", "forward+backward bf16"])
        // (Its allocations per call are not asserted here: the harness counts process-wide,
        // and tests run in parallel; MixedPrecisionBackwardTests counts per thread.)
        // With --varlen: the packed 16-bit call, compared with dense's Float packed result
        // (computed by the harness: dense does not run in Float here).
        let packed = try BenchOptions.parse(["--io", "f16", "--varlen", "8,1,37", "--variants", "dense,local",
                                             "--heads", "2", "--dim", "16", "--threads", "1", "--repeat", "1"])
        let packedRecords = try SweepRunner(options: packed, peaks: PeakCache(measure: { Double($0) * 100 }),
                                            progress: { _ in }).run(try SweepPlan.make(packed))
        #expect(packedRecords.map(\.variant) == ["dense", "local"])
        for r in packedRecords {
            #expect(r.io == "f16" && r.parameters.contains("varlen=8,1,37"), "\(r.variant): \(r.parameters)")
        }
        let packedError = packedRecords[0].relativeError ?? 1
        #expect(packedError > 0 && packedError < 3e-3, "packed f16 dense error \(packedError)")
    }

    /// `--huge-pages`: the timed calls read huge-page copies of the inputs; the error column
    /// (the measured call's output) and the bits of the timed calls are unchanged.
    @Test func hugePages() throws {
        let o = try BenchOptions.parse(["--huge-pages", "--variants", "dense,multi-query", "--seq", "1", "--seq-k", "300",
                                        "--heads", "4", "--kv-heads", "2", "--dim", "16", "--threads", "1", "--repeat", "2"])
        #expect(o.hugePages)
        let records = try SweepRunner(options: o, peaks: PeakCache(measure: { Double($0) * 100 }), progress: { _ in })
            .run(try SweepPlan.make(o))
        #expect(records.map(\.variant) == ["dense", "multi-query"])
        #expect(records[1].relativeError ?? 1 < 1e-6)
        for bad in [["--huge-pages", "--io", "bf16"], ["--huge-pages", "--decode"]] {
            #expect(throws: BenchError.self) { try BenchOptions.parse(bad) }
        }
    }

    /// `--backward`: dense (and local and vanilla, with gradients too) gets "backward" and
    /// "forward+backward" records with 2.5× and 3.5× the forward FLOPs.
    @Test func backwardPasses() throws {
        let o = try BenchOptions.parse(["--backward", "--variants", "dense,local,vanilla,lsh,custom-mask,score-function,etc", "--seq", "40",
                                        "--heads", "2", "--dim", "8", "--threads", "1", "--repeat", "1"])
        #expect(o.backward)
        var notes: [String] = []
        let records = try SweepRunner(options: o, peaks: PeakCache(measure: { Double($0) * 100 }),
                                      progress: { notes.append($0) })
            .run(try SweepPlan.make(o))
        // A custom mask has a backward; the harness's score function (HarnessALiBi, not a
        // DifferentiableScoreFunction) has none (forward only, a note); ETC's seeded relative
        // table has one (issue 18).
        #expect(records.map { "\($0.variant) \($0.pass)" }
                == ["dense forward", "dense backward", "dense forward+backward",
                    "local forward", "local backward", "local forward+backward",
                    "vanilla forward", "vanilla backward", "vanilla forward+backward",
                    "lsh forward", "lsh backward", "lsh forward+backward",
                    "custom-mask forward", "custom-mask backward", "custom-mask forward+backward",
                    "score-function forward", "etc forward", "etc backward", "etc forward+backward"])
        #expect(notes.contains { $0.contains("score-function has no backward") })
        let forward = records[0].flops
        #expect(records[1].flops == 2.5 * forward && records[2].flops == 3.5 * forward)
        let json = RecordWriter.json(records)
        #expect(json.contains("\"pass\" : \"forward+backward\"") || json.contains("\"pass\": \"forward+backward\""))
        #expect(throws: BenchError.self) { try BenchOptions.parse(["--backward", "--decode"]) }
    }

    @Test func millionPreset() throws {
        let o = try BenchOptions.parse(["--preset", "million"])
        #expect(o.sequenceLengths == [65536, 262144, 1048576] && o.heads == [8])
        #expect(try BenchOptions.parse(["--seq", "64K,1M,2m"]).sequenceLengths == [65536, 1048576, 2097152])
        #expect(o.selectedEntries(in: .standard).map(\.name) == Preset.millionVariants)
        let chosen = try BenchOptions.parse(["--preset", "million", "--variants", "local", "--seq", "4096,16384"])
        #expect(chosen.selectedEntries(in: .standard).map(\.name) == ["local"] && chosen.sequenceLengths == [4096, 16384])
        // H = 8 that does not fit falls back to H = 1, with a note.
        let limit = SweepPlan.problemBytes(AttentionShape(heads: 4, queryLength: 65536, headDim: 64))
        let plan = try SweepPlan.make(try BenchOptions.parse(["--preset", "million", "--variants", "local", "--seq", "65536"]),
                                      memoryLimit: limit)
        #expect(plan.jobs.map(\.problem.shape.heads) == [1])
        #expect(plan.notes.contains { $0.variant == "local" && $0.note.contains("run with H=1") })
        // Growth per quadrupling: same variant and settings at N / 4.
        func record(_ n: Int, _ seconds: Double, variant: String = "local") -> BenchRecord {
            BenchRecord(variant: variant, batch: 1, heads: 1, kvHeads: 1, seqQ: n, seqK: n, dim: 64, valueDim: 64,
                        causal: false, threads: 2, runs: 1, medianSeconds: seconds, minSeconds: seconds, flops: 1,
                        scoredPairs: 1, peakGflops: 1, workspaceBytes: 0, measuredPeakBytes: 0, outputBytes: 0)
        }
        let filled = SweepRunner.fillRelativeColumns([record(1024, 1), record(4096, 4.5), record(16384, 18),
                                                      record(2048, 3), record(4096, 7, variant: "axial")])
        #expect(filled.map(\.growthPerQuadrupling) == [nil, 4.5, 4, nil, nil])
        #expect(try BenchOptions.parse(["--preset", "million", "--variants", "local"]).preset == .million)
    }

    @Test func residentPeakParsing() throws {
        // /proc pads the kB value with spaces after the tab, but not from 8 digits on (10 GB):
        // a split on spaces alone read nothing at N = 1M, H = 8.
        #expect(ResidentMemory.peak(status: "Name:\tx\nVmHWM:\t  123456 kB\nVmRSS:\t 1 kB") == 123456 * 1024)
        #expect(ResidentMemory.peak(status: "VmPeak:\t1 kB\nVmHWM:\t14680064 kB\n") == 14680064 * 1024)
        #expect(ResidentMemory.peak(status: "VmRSS:\t 1 kB") == nil)
    }

    @Test func sampledErrorRows() throws {
        #expect(SweepRunner.sampleRows(5, count: 256) == [0, 1, 2, 3, 4])
        let rows = SweepRunner.sampleRows(1000, count: 5)
        #expect(rows == [0, 249, 499, 749, 999])
        for causal in [false, true] {
            for (nq, nk) in [(300, 300), (200, 350)] {
                let shape = AttentionShape(batch: 2, heads: 4, kvHeads: 2, queryLength: nq, keyLength: nk, headDim: 16, valueDim: 8)
                let problem = BenchProblem(shape: shape, causal: causal)
                let t = try SweepRunner.inputs(for: shape, seed: 3)
                let inputs = SweepRunner.Inputs(query: t.query, key: t.key, value: t.value)
                let full = try DenseAttention(causal: causal).attend(query: t.query, key: t.key, value: t.value).output.elements
                let sample = SweepRunner.sampleRows(nq, count: 37)
                let expected = SweepRunner.selectRows(full, rows: sample, shape: shape)
                let sampled = try SweepRunner.denseRows(sample, problem: problem, inputs: inputs)
                #expect(sampled.count == 2 * 4 * 37 * 8)
                let worst = zip(sampled, expected).map { abs($0 - $1) }.max() ?? .infinity
                #expect(worst <= 1e-6, "causal \(causal) Nq \(nq) Nk \(nk): sampled dense rows differ by \(worst)")
            }
        }
    }

    @Test func axialGridOption() throws {
        let o = try BenchOptions.parse(["--variants", "axial", "--seq", "256,100", "--axes", "16x16", "--threads", "1"])
        #expect(o.axes == [16, 16])
        #expect(try BenchOptions.parse(["--variants", "axial", "--axes", "4x8x2"]).axes == [4, 8, 2])
        #expect(try BenchOptions.parse(["--variants", "axial"]).axes == nil)
        #expect(throws: BenchError.self) { try BenchOptions.parse(["--variants", "axial", "--axes", "16x0"]) }
        #expect(throws: BenchError.self) { try BenchOptions.parse(["--variants", "axial", "--axes", "16x"]) }
        #expect(throws: BenchError.self) { try BenchOptions.parse(["--variants", "dense", "--axes", "16x16"]) }
        // The grid runs where it multiplies to N; elsewhere the point is skipped with a note.
        let plan = try SweepPlan.make(o)
        #expect(plan.jobs.map { $0.problem.shape.queryLength } == [256])
        #expect(plan.notes.contains { $0.variant == "axial" && $0.note.contains("multiply") })
        #expect(SweepRunner.describeSettings(plan.jobs[0]) == "axes=16x16")
        let defaults = try SweepPlan.make(try BenchOptions.parse(["--variants", "axial", "--seq", "4096", "--threads", "1"]))
        #expect(SweepRunner.describeSettings(defaults.jobs[0]) == "axes=64x64")
        #expect(defaults.jobs[0].cost.scoredPairs == 8 * 4096 * 127)
    }

    @Test func planSweepsEveryDimensionAndRespectsMemoryLimit() throws {
        let o = try BenchOptions.parse(["--variants", "vanilla,dense", "--seq", "64,128", "--seq-k", "96",
                                        "--batch", "1,2", "--heads", "4", "--kv-heads", "1,4", "--dim", "8",
                                        "--causal", "both", "--threads", "1,2"])
        let plan = try SweepPlan.make(o)
        #expect(plan.jobs.count == 2 * 2 * 2 * 2 * 2 * 2)
        #expect(plan.jobs.allSatisfy { $0.problem.shape.keyLength == 96 })
        #expect(Set(plan.jobs.map(\.problem.shape.kvHeads)) == [1, 4])
        let limited = try SweepPlan.make(try BenchOptions.parse(["--variants", "vanilla", "--seq", "512"]),
                                         memoryLimit: 1 << 20)
        // One note per distinct reason: the workspace (so the bytes named) depends on the thread count.
        #expect(limited.jobs.isEmpty)
        #expect(!limited.notes.isEmpty && limited.notes.allSatisfy {
            $0.variant == "vanilla" && $0.note.contains("memory") })
    }

    @Test func tinySweepEndToEnd() throws {
        let o = try BenchOptions.parse(["--variants", "vanilla,dense", "--seq", "33", "--heads", "2", "--dim", "8",
                                        "--threads", "1,2", "--repeat", "2", "--causal", "both", "--quiet"])
        let plan = try SweepPlan.make(o)
        let runner = SweepRunner(options: o, peaks: PeakCache(measure: { Double($0) * 100 }), progress: { _ in })
        let records = try runner.run(plan)
        #expect(records.count == 8)
        #expect(records.map(\.variant) == ["vanilla", "dense", "vanilla", "dense", "vanilla", "dense", "vanilla", "dense"])
        for r in records {
            #expect(r.runs == 2)
            #expect(r.minSeconds <= r.medianSeconds)
            #expect(r.peakGflops == Double(r.threads) * 100)
            #expect(r.flops == Accounting.denseFlops(batch: 1, heads: 2, queryLength: 33, keyLength: 33, headDim: 8,
                                                     valueDim: 8, causal: r.causal))
            #expect(r.outputBytes == 2 * 33 * 9 * 4)
            if r.variant == "dense" {
                #expect(r.relativeError == 0 && r.speedupVsDense == 1)
            } else {
                #expect((r.relativeError ?? 1) < 1e-5)
                #expect(r.speedupVsDense != nil && r.speedupVsVanilla == 1)
            }
        }
        // The same seeded inputs every time.
        let a = try SweepRunner.inputs(for: AttentionShape(heads: 2, queryLength: 5, headDim: 3), seed: 9)
        let b = try SweepRunner.inputs(for: AttentionShape(heads: 2, queryLength: 5, headDim: 3), seed: 9)
        #expect(a.query == b.query && a.key == b.key && a.value == b.value)
        #expect(a.query != a.key)
        #expect(a.query.elements.allSatisfy { $0 >= -1 && $0 <= 1 })
    }

    // MARK: Decode mode

    @Test func decodeOptions() throws {
        let o = try BenchOptions.parse(["--variants", "multi-query", "--decode", "--cache", "32768", "--heads", "32",
                                        "--kv-heads", "32", "--dim", "128", "--cache-precision", "f16"], cores: 2)
        #expect(o.decode && o.cacheLengths == [32768] && o.cachePrecisions == [.float16])
        #expect(o.sequenceLengths == [1] && o.heads == [32] && o.kvHeads == [32] && o.dims == [128])
        let both = try BenchOptions.parse(["--decode", "--cache", "1K,4K", "--seq", "4", "--cache-precision=both"])
        #expect(both.cacheLengths == [1024, 4096] && both.sequenceLengths == [4] && both.cachePrecisions == [.float32, .float16])
        #expect(try BenchOptions.parse(["--decode"]).cachePrecisions == [.float32])
        #expect(try BenchOptions.parse(["--decode"]).cacheLengths == [32768])
        #expect(try !BenchOptions.parse([]).decode)
        for bad in [["--cache", "1024"], ["--cache-precision", "f16"], ["--decode", "--cache-precision", "f8"],
                    ["--decode", "--cache", "0"], ["--decode", "--charts", "dir"]] {
            #expect(throws: BenchError.self, "\(bad)") { try BenchOptions.parse(bad) }
        }
        let help = BenchOptions.helpText()
        for option in ["--decode", "--cache", "--cache-precision"] { #expect(help.contains(option)) }
    }

    @Test func decodePlanHonoursKVHeadsAndSkipsNonDecoders() throws {
        let given = try DecodePlan.make(BenchOptions.parse(["--variants", "multi-query,dense", "--decode", "--cache", "64",
                                                            "--heads", "8", "--kv-heads", "8,2", "--threads", "1"]))
        #expect(given.jobs.map(\.problem.shape.kvHeads) == [8, 2])
        #expect(given.jobs.allSatisfy { $0.problem.shape.keyLength == 64 && $0.problem.shape.queryLength == 1 })
        #expect(given.notes.contains { $0.variant == "dense" && $0.note.contains("does not decode") })
        let defaulted = try DecodePlan.make(BenchOptions.parse(["--variants", "multi-query", "--decode", "--cache", "64",
                                                                "--heads", "8", "--threads", "1"]))
        #expect(defaulted.jobs.map(\.problem.shape.kvHeads) == [1])
        let tooBig = try DecodePlan.make(BenchOptions.parse(["--variants", "multi-query", "--decode", "--cache", "4096",
                                                             "--threads", "1"]), memoryLimit: 1 << 10)
        #expect(tooBig.jobs.isEmpty && tooBig.notes.contains { $0.note.contains("memory") })
    }

    @Test func tinyDecodeEndToEnd() throws {
        let o = try BenchOptions.parse(["--variants", "multi-query", "--decode", "--cache", "100", "--heads", "4",
                                        "--kv-heads", "1,4", "--dim", "8", "--cache-precision", "both",
                                        "--threads", "1,2", "--repeat", "2", "--quiet"])
        let plan = try DecodePlan.make(o)
        let runner = DecodeRunner(options: o, peaks: PeakCache(measure: { Double($0) * 100 }),
                                  bandwidth: BandwidthCache(measure: { Double($0) * 10 }), progress: { _ in })
        let records = try runner.run(plan)
        #expect(records.count == 2 * 2 * 2)
        for r in records {
            let f16 = r.parameters.contains("cache=f16")
            let bytes = Double(r.kvHeads * 100 * 16 * (f16 ? 2 : 4))
            #expect(r.runs == 2 && r.seqQ == 1 && r.seqK == 100)
            #expect(r.peakGBPerSecond == Double(r.threads) * 10)
            #expect(abs(r.gbPerSecond! - bytes / r.medianSeconds / 1e9) <= 1e-9 * r.gbPerSecond!)
            #expect(r.flops == 2 * 4 * 100 * 16)
            #expect((r.relativeError ?? 1) < (f16 ? 2e-3 : 1e-5), "\(r.parameters) Hkv \(r.kvHeads): \(String(describing: r.relativeError))")
        }
        let table = ReportTable.render(records, notes: [], peaks: runner.peaks.measured, fma: true,
                                       bandwidths: runner.bandwidth.measured)
        #expect(table.contains("GB/s") && table.contains("%bw") && table.contains("Read bandwidth"))
        let plain = ReportTable.render(Self.sampleRecords(), notes: [], peaks: [], fma: true)
        #expect(!plain.contains("%bw"))
        // The same seeded cache every time.
        let shape = AttentionShape(heads: 2, kvHeads: 1, queryLength: 1, keyLength: 1500, headDim: 4)
        let a = try DecodeRunner.filledCache(shape, precision: .float32, seed: 3)
        let b = try DecodeRunner.filledCache(shape, precision: .float32, seed: 3)
        #expect(try a.keys(layer: 0, batchItem: 0) == b.keys(layer: 0, batchItem: 0)
                && a.values(layer: 0, batchItem: 0) == b.values(layer: 0, batchItem: 0)
                && a.keys(layer: 0, batchItem: 0) != a.values(layer: 0, batchItem: 0))
        #expect(try a.length(layer: 0, batchItem: 0) == 1500)
    }

    /// `--cache-kind` and the four cache precisions: one record each, saying so; rotating and
    /// paged caches give the contiguous result (the same error against Float inputs); Int8
    /// and bf16 errors within their storage precision; bytes read include Int8's scales.
    @Test func cacheKindsAndPrecisions() throws {
        let o = try BenchOptions.parse(["--variants", "multi-query", "--decode", "--cache", "300", "--heads", "4",
                                        "--kv-heads", "2", "--dim", "32", "--cache-precision", "f32,bf16,int8",
                                        "--cache-kind", "contiguous,rotating,paged", "--threads", "2", "--repeat", "1",
                                        "--quiet"])
        #expect(o.cacheKinds == [.contiguous, .rotating, .paged] && o.cachePrecisions == [.float32, .bfloat16, .int8])
        let runner = DecodeRunner(options: o, peaks: PeakCache(measure: { Double($0) * 100 }),
                                  bandwidth: BandwidthCache(measure: { Double($0) * 10 }), progress: { _ in })
        let records = try runner.run(try DecodePlan.make(o))
        #expect(records.count == 9)
        for precision in ["f32", "bf16", "int8"] {
            let group = records.filter { $0.parameters.hasPrefix("cache=\(precision)") }
            #expect(group.count == 3 && group[1].parameters.contains("kind=rotating") && group[2].parameters.contains("kind=paged"))
            let errors = group.map { $0.relativeError ?? 1 }
            #expect(errors[0] == errors[1] && errors[0] == errors[2], "\(precision): \(errors)")
            let bound = precision == "f32" ? 1e-5 : precision == "bf16" ? 1e-2 : 2e-2
            #expect(errors[0] < bound && (precision == "f32" || errors[0] > 1e-6), "\(precision): \(errors[0])")
        }
        let int8 = records.first { $0.parameters.hasPrefix("cache=int8") }!
        let bytes = Double(2 * 300 * 2 * (4 + 32))   // Hkv · L · (K and V rows of 4 + D bytes)
        #expect(abs(int8.gbPerSecond! * int8.medianSeconds * 1e9 - bytes) < 1)
        #expect(throws: BenchError.self) { try BenchOptions.parse(["--decode", "--cache-kind", "ring"]) }
        #expect(throws: BenchError.self) { try BenchOptions.parse(["--cache-kind", "paged"]) }
    }

    @Test func readBandwidthLoopSumsWhatItReads() {
        let values = [Float](repeating: 0.5, count: 1024)
        #expect(values.withUnsafeBufferPointer { ReadBandwidth.stream($0.baseAddress!, count: 1024) } == 512)
    }
}
