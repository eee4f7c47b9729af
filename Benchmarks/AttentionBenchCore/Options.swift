import Foundation
@_spi(Benchmarking) import EfficientAttention

/// A failure of the benchmark: bad command line (exit code 2) or a run-time failure
/// such as an unwritable output file (exit code 1).
public enum BenchError: Error, Equatable, Sendable, CustomStringConvertible {
    case usage(String)
    case failure(String)

    public var message: String {
        switch self {
        case .usage(let m), .failure(let m): return m
        }
    }

    public var description: String { message }

    public var exitCode: Int32 {
        switch self {
        case .usage: return 2
        case .failure: return 1
        }
    }
}

/// Which conformers a run selects.
public enum VariantSelection: Equatable, Sendable {
    /// Every registered name (unavailable ones are reported, not run).
    case all
    /// These names, in the order given.
    case names([String])
}

/// Named option sets.
public enum Preset: String, CaseIterable, Sendable {
    /// The Long Range Arena lengths: N = 1K, 2K, 3K, 4K.
    case lra
    /// N = 1K ... 16K; quadratic conformers stop at their `longPresetLimit`.
    case long
    /// N = 64K, 256K, 1M, the sub-quadratic conformers (``Preset/millionVariants``), H = 8
    /// where memory allows (else H = 1, stated), growth per quadrupling and resident memory.
    case million

    /// The conformers `--preset million` runs unless `--variants` names others: every
    /// registered conformer whose cost is linear in N (issue 21). Not run there: the
    /// quadratic ones (vanilla, dense, multi-query, Transformer-XL, memory-compressed at a
    /// fixed ratio), the `N √N` ones (strided, LSH), routing (its router is quadratic by
    /// definition: KernelDocs/Routing.md), Sinkhorn (its plan has `(N / bs)²` entries).
    public static let millionVariants = ["local", "longformer", "bigbird", "linformer", "linear-elu", "performer",
                                         "adaptive-span", "axial", "isab", "etc"]
}

/// Everything the command line says, with presets and defaults applied.
public struct BenchOptions: Equatable, Sendable {
    public var variants: VariantSelection = .all
    public var sequenceLengths: [Int] = [1024, 2048]
    /// Key length for every point (`--seq-k`); `nil` means `Nk = Nq`.
    public var keyLength: Int?
    /// `--varlen`: sequence lengths packed into one call (self-attention, batch 1), or nil.
    public var packedLengths: [Int]?
    public var batches: [Int] = [1]
    public var heads: [Int] = [8]
    /// `nil` means `Hkv = H` at every point.
    public var kvHeads: [Int]?
    public var dims: [Int] = [64]
    public var causal: [Bool] = [false]
    public var threads: [Int] = [1]
    /// Exact timed runs per point (`--repeat`), or the cap on runs when a budget is given.
    public var repeatCount: Int?
    /// Seconds of timed runs per point (`--budget`).
    public var budget: Double?
    public var warmup: Int = 1
    public var seed: UInt64 = 42
    public var jsonPath: String?
    public var csvPath: String?
    public var chartsDirectory: String?
    public var quiet = false
    /// Measure with the allocator's defaults instead of ``SteadyStateAllocator`` (`--fresh-pages`).
    public var freshPages = false
    /// Time engine-style calls on copies of the inputs in memory advised for transparent huge
    /// pages (`--huge-pages`; Float32 I/O).
    public var hugePages = false
    public var preset: Preset?
    public var list = false
    public var help = false
    /// Conformer settings given on the command line (`--window 256`).
    public var overrides: [Parameter: Int] = [:]
    /// Axial attention's grid (`--axes 64x64`); `nil`: the most square grid of each N.
    public var axes: [Int]?
    /// Decode mode (`--decode`): `sequenceLengths` are query positions per step (default 1)
    /// against a key/value cache of each of `cacheLengths` positions.
    public var decode = false
    /// `--backward`: also time the backward pass alone and forward plus backward, for the
    /// conformers that have one (records with `pass` "backward" and "forward+backward").
    public var backward = false
    /// Cache lengths of decode mode (`--cache`).
    public var cacheLengths: [Int] = [32768]
    /// Cache storage of decode mode (`--cache-precision`).
    public var cachePrecisions: [KVCache.Precision] = [.float32]
    /// Cache layouts of decode mode (`--cache-kind`).
    public var cacheKinds: [DecodeCacheKind] = [.contiguous]
    /// Element types of query, key, value and output in the timed calls (`--io`), each a
    /// separate record.
    public var ioPrecisions: [ActivationPrecision] = [.float32]
    /// Score modifiers (`--softcap X`, `--alibi`, `--sinks`, `--bias`) for the conformers that take them.
    public var softCap: Float?
    public var alibi = false
    public var sinks = false
    public var bias = false

    /// Whether any score modifier was asked for.
    public var hasModifiers: Bool { softCap != nil || alibi || sinks || bias }

    /// The modifiers for `shape`: the standard ALiBi slopes, sink logits drawn uniformly from
    /// [−1, 1] by a generator seeded with `seed`, and a bias `[1, H, Nq, Nk]` uniform in
    /// [−1, 1] seeded from `seed` (a separate value per head and pair: read from memory);
    /// with `--varlen`, `[1, H, max N_s, max N_s]`, the block every packed sequence reads.
    public func modifiers(shape: AttentionShape) throws -> ScoreModifiers {
        var generator = SeededGenerator(seed: seed &+ 0x51_4B)
        let heads = shape.heads
        let rows = packedLengths?.max() ?? shape.queryLength, columns = packedLengths?.max() ?? shape.keyLength
        return ScoreModifiers(softCap: softCap,
                              alibiSlopes: alibi ? ScoreModifiers.standardALiBiSlopes(heads: heads) : nil,
                              bias: bias ? try Tensor.random(shape: [1, heads, rows, columns],
                                                             seed: seed &+ 0xB1A5) : nil,
                              sinks: sinks ? (0..<heads).map { _ in Float.random(in: -1...1, using: &generator) } : nil)
    }

    /// The settings text of `modifiers`: `softcap=X`, `alibi`, `sinks`.
    public static func describe(_ modifiers: ScoreModifiers) -> String {
        var parts: [String] = []
        if let cap = modifiers.softCap { parts.append("softcap=\(cap)") }
        if modifiers.alibiSlopes != nil { parts.append("alibi") }
        if modifiers.sinks != nil { parts.append("sinks") }
        if modifiers.bias != nil { parts.append("bias") }
        return parts.joined(separator: " ")
    }

    public init() {}

    /// The timing rule these options describe.
    public var timing: TimingPolicy {
        TimingPolicy(warmup: warmup, repeatCount: repeatCount, budget: budget)
    }

    /// The registry entries selected, in registry order for `all`, else as given.
    public func selectedEntries(in registry: Registry) -> [VariantEntry] {
        switch variants {
        case .all: return registry.entries
        case .names(let names): return names.compactMap { registry.entry(named: $0) }
        }
    }
}

/// One command-line option, for parsing and for `--help`.
struct OptionSpec {
    let name: String
    /// Placeholder of the value, `nil` for a flag.
    let value: String?
    let help: String
}

extension BenchOptions {
    static let specs: [OptionSpec] = [
        OptionSpec(name: "variants", value: "LIST|all", help: "conformers to run, comma-separated registry names (see --list), or all [all]"),
        OptionSpec(name: "seq", value: "LIST", help: "sequence lengths N (query length), e.g. 1024,2048 or 1K,2K [1024,2048]"),
        OptionSpec(name: "seq-k", value: "N", help: "key length for every point (cross-attention); default Nk = N"),
        OptionSpec(name: "varlen", value: "LENGTHS", help: "sequence lengths packed into one call (cu_seqlens, self-attention, batch 1), e.g. 64,300,2048; N is their sum"),
        OptionSpec(name: "batch", value: "LIST", help: "batch sizes B [1]"),
        OptionSpec(name: "heads", value: "LIST", help: "query heads H [8]"),
        OptionSpec(name: "kv-heads", value: "LIST", help: "key/value heads Hkv, each dividing every H [= H]"),
        OptionSpec(name: "dim", value: "LIST", help: "head dimension D (= Dv) [64]"),
        OptionSpec(name: "causal", value: nil, help: "causal mask (bottom-right aligned); --causal=both runs both, --causal=no neither"),
        OptionSpec(name: "threads", value: "LIST", help: "thread counts; 'all' = every core [all,1; presets: all]"),
        OptionSpec(name: "repeat", value: "N", help: "timed runs per point (exactly N; with --budget: at most N)"),
        OptionSpec(name: "budget", value: "SECONDS", help: "time budget of timed runs per point (at least one run) [1.0 unless --repeat]"),
        OptionSpec(name: "warmup", value: "N", help: "untimed runs before timing; the first one also measures heap growth (1 adds a second, so timed runs reuse freed pages) [1]"),
        OptionSpec(name: "seed", value: "N", help: "seed of the random inputs (uniform in [-1, 1]) and conformer randomness [42]"),
        OptionSpec(name: "json", value: "FILE", help: "write the records as a JSON array"),
        OptionSpec(name: "csv", value: "FILE", help: "write the records as CSV with a header"),
        OptionSpec(name: "charts", value: "DIR", help: "write time_vs_n.svg and memory_vs_n.svg into DIR"),
        OptionSpec(name: "mask", value: "document:K", help: "custom-mask with K equal documents (same as --variants custom-mask --documents K when no --variants)"),
        OptionSpec(name: "softcap", value: "X", help: "score soft-capping cap·tanh(s/cap) on the conformers that take modifiers"),
        OptionSpec(name: "alibi", value: nil, help: "ALiBi with the standard slopes on the conformers that take modifiers"),
        OptionSpec(name: "sinks", value: nil, help: "per-head sink logits (seeded, uniform in [-1, 1]) on the conformers that take modifiers"),
        OptionSpec(name: "bias", value: nil, help: "an additive bias [1, H, Nq, Nk] (seeded, uniform in [-1, 1]; with --varlen [1, H, max N, max N], read by every sequence) on the conformers that take modifiers"),
        OptionSpec(name: "io", value: "LIST", help: "element type of query, key, value and output (and gradients with --backward) in the timed calls: f32, f16, bf16 or a list [f32] (JSON field io)"),
        OptionSpec(name: "backward", value: nil, help: "also time the backward pass alone and forward+backward (conformers with gradients; JSON field pass)"),
        OptionSpec(name: "decode", value: nil, help: "decode mode: --seq query positions [1] against a key/value cache; reports GB/s of cache read"),
        OptionSpec(name: "cache", value: "LIST", help: "decode: cache lengths (positions) [32K]"),
        OptionSpec(name: "cache-precision", value: "LIST", help: "decode: cache storage f32, f16, bf16, int8 (or both = f32,f16) [f32]"),
        OptionSpec(name: "cache-kind", value: "LIST", help: "decode: cache layout contiguous, rotating (window = cache length), paged (pages of 16) [contiguous]"),
        OptionSpec(name: "quiet", value: nil, help: "no progress lines on stderr"),
        OptionSpec(name: "fresh-pages", value: nil, help: "keep glibc's allocator defaults: large outputs and scratch are mmapped fresh (page faults) on every call"),
        OptionSpec(name: "huge-pages", value: nil, help: "the timed calls read copies of query, key and value in 2 MiB-aligned memory advised for transparent huge pages (an engine's arena), not the tensors' arrays (f32 I/O)"),
        OptionSpec(name: "preset", value: "lra|long|million", help: "lra: N = 1K,2K,3K,4K; long: N = 1K..16K, quadratic conformers capped; million: N = 64K,256K,1M, sub-quadratic conformers (see below)"),
        OptionSpec(name: "list", value: nil, help: "print the registry (availability, defaults, descriptions) and exit"),
        OptionSpec(name: "help", value: nil, help: "print this help and exit"),
    ] + Parameter.allCases.map { OptionSpec(name: $0.rawValue, value: "N", help: $0.help) }
      + [OptionSpec(name: "axes", value: "AxB[xC..]",
                    help: "axial: the grid, e.g. 64x64 (default the most square two-axis grid of N); points where it does not multiply to N are skipped")]

    /// The text of `--help`.
    public static func helpText(registry: Registry = .standard) -> String {
        var lines = [
            "USAGE: attention-bench [options]",
            "",
            "Times attention conformers of the EfficientAttention library on the same seeded random",
            "inputs and reports time, GFLOP/s against the measured FMA peak, workspace and measured",
            "heap growth, and the error against dense attention (over 256 sampled query rows per head,",
            "marked ~, once a full dense reference would cost more than 2e11 FLOPs). Without options it runs every",
            "available conformer at N = 1024, 2048 (B=1, H=8, D=64) with all cores and with 1 thread.",
            "",
            "OPTIONS (LIST = comma-separated values; N may be written 4K = 4096 or 1M = 1048576; --opt=value works too):",
        ]
        let conformer = Set(Parameter.allCases.map(\.rawValue) + ["axes"])
        let width = specs.map { "--\($0.name)" + ($0.value.map { " " + $0 } ?? "") }.map(\.count).max()! + 2
        func line(_ s: OptionSpec) -> String {
            let head = "--\(s.name)" + (s.value.map { " " + $0 } ?? "")
            return "  " + head.padding(toLength: width, withPad: " ", startingAt: 0) + s.help
        }
        lines += specs.filter { !conformer.contains($0.name) }.map(line)
        lines += ["", "CONFORMER SETTINGS (defaults per conformer in --list; a setting the selected conformer",
                  "does not take is an error; with --variants all it applies to those that take it):"]
        lines += specs.filter { conformer.contains($0.name) }.map(line)
        lines += [
            "",
            "DECODE (--decode): each conformer that decodes against a key/value cache (multi-query) is",
            "timed on --seq new query positions (default 1) against a cache of each --cache length,",
            "filled with the seeded inputs. Hkv is --kv-heads, else the conformer's default. The table",
            "adds GB/s of cache read per step and the machine's streaming read bandwidth (measured).",
            "  e.g. --variants multi-query --decode --cache 32768 --heads 32 --kv-heads 32 --dim 128 --cache-precision f16",
            "",
            "PRESETS:",
            "  (none)         N = 1024,2048, threads all,1, every available conformer (under two minutes)",
            "  --preset lra   N = 1024,2048,3072,4096, threads all",
            "  --preset long  N = 1024,2048,4096,8192,16384, threads all; skipped with a note: "
                + registry.entries.compactMap { e in e.longPresetLimit.map { "\(e.name) above \($0)" } }.joined(separator: ", "),
            "  --preset million  N = 65536,262144,1048576, threads all, H = 8 (H = 1 where H = 8 does not fit 3/4 of memory,",
            "                 with a note), variants " + Preset.millionVariants.joined(separator: ",") + " unless --variants is given;",
            "                 the table adds the time's growth per quadrupling of N and the maximum resident size",
            "",
            "TIMING: warm-up runs, then timed runs until the budget is spent (or exactly --repeat runs);",
            "the table shows the median and the minimum. Exit codes: 0 ok, 1 run-time failure, 2 bad usage.",
            "",
            "REGISTRY: " + registry.names.joined(separator: ", "),
        ]
        return lines.joined(separator: "\n") + "\n"
    }

    /// Parses the command line (without the program name).
    ///
    /// Explicit options win over the preset's values, which win over the defaults.
    /// Throws ``BenchError/usage(_:)`` for unknown options or variants, bad numbers,
    /// missing values, and conformer settings the selected conformers do not take.
    /// `cores` is what "all cores" means (`nil`: the library's default thread count).
    public static func parse(_ arguments: [String], registry: Registry = .standard,
                             cores: Int? = nil) throws -> BenchOptions {
        let cores = cores ?? defaultThreadCount
        var options = BenchOptions()
        if arguments.contains("--help") || arguments.contains("-h") {
            options.help = true
            return options
        }
        var given: [String: String] = [:]
        var causalWords: String?
        var index = 0
        while index < arguments.count {
            let token = arguments[index]
            index += 1
            guard token.hasPrefix("--"), token.count > 2 else {
                throw BenchError.usage("unexpected argument '\(token)' (options start with --; see --help)")
            }
            var name = String(token.dropFirst(2))
            var inline: String?
            if let eq = name.firstIndex(of: "=") {
                inline = String(name[name.index(after: eq)...])
                name = String(name[..<eq])
            }
            guard let spec = specs.first(where: { $0.name == name }) else {
                throw BenchError.usage("unknown option '--\(name)' (see --help)")
            }
            if name == "causal" {
                if let inline {
                    causalWords = inline
                } else if index < arguments.count, causalValues[arguments[index].lowercased()] != nil {
                    causalWords = arguments[index]
                    index += 1
                } else {
                    causalWords = "yes"
                }
                continue
            }
            if spec.value == nil {
                if let inline {
                    throw BenchError.usage("--\(name) takes no value, got '\(inline)'")
                }
                given[name] = ""
                continue
            }
            if let inline {
                given[name] = inline
            } else {
                guard index < arguments.count, !arguments[index].hasPrefix("--") else {
                    throw BenchError.usage("--\(name) needs a value (\(spec.value!))")
                }
                given[name] = arguments[index]
                index += 1
            }
        }

        options.list = given["list"] != nil
        options.quiet = given["quiet"] != nil
        options.freshPages = given["fresh-pages"] != nil
        options.hugePages = given["huge-pages"] != nil
        if options.list { return options }

        if let text = given["preset"] {
            guard let preset = Preset(rawValue: text.lowercased()) else {
                throw BenchError.usage("--preset: unknown preset '\(text)' (lra, long or million)")
            }
            options.preset = preset
        }
        switch options.preset {
        case nil:
            options.sequenceLengths = [1024, 2048]
            options.threads = cores > 1 ? [cores, 1] : [1]
        case .lra?:
            options.sequenceLengths = [1024, 2048, 3072, 4096]
            options.threads = [cores]
        case .long?:
            options.sequenceLengths = [1024, 2048, 4096, 8192, 16384]
            options.threads = [cores]
        case .million?:
            options.sequenceLengths = [1 << 16, 1 << 18, 1 << 20]
            options.threads = [cores]
            options.variants = .names(Preset.millionVariants.filter { registry.entry(named: $0) != nil })
        }

        if let text = given["variants"] {
            options.variants = try parseVariants(text, registry: registry)
        }
        options.decode = given["decode"] != nil
        options.backward = given["backward"] != nil
        if options.backward && options.decode { throw BenchError.usage("--backward does not combine with --decode") }
        if options.decode { options.sequenceLengths = [1] }
        if let text = given["seq"] { options.sequenceLengths = try parseList(text, option: "seq") }
        for key in ["cache", "cache-precision", "cache-kind"] where given[key] != nil && !options.decode {
            throw BenchError.usage("--\(key) needs --decode")
        }
        if let text = given["cache"] { options.cacheLengths = try parseList(text, option: "cache") }
        if let text = given["cache-precision"] {
            options.cachePrecisions = try text.lowercased().split(separator: ",").flatMap {
                guard let values = cachePrecisionValues[String($0)] else {
                    throw BenchError.usage("--cache-precision: expected f32, f16, bf16, int8, both or a list, got '\(text)'")
                }
                return values
            }
        }
        if let text = given["cache-kind"] {
            options.cacheKinds = try text.lowercased().split(separator: ",").map {
                guard let kind = DecodeCacheKind(rawValue: String($0)) else {
                    throw BenchError.usage("--cache-kind: expected contiguous, rotating, paged or a list, got '\(text)'")
                }
                return kind
            }
        }
        if let text = given["softcap"] {
            guard let cap = Float(text), cap.isFinite, cap > 0 else {
                throw BenchError.usage("--softcap: expected a finite number above 0, got '\(text)'")
            }
            options.softCap = cap
        }
        options.alibi = given["alibi"] != nil
        options.sinks = given["sinks"] != nil
        options.bias = given["bias"] != nil
        if let text = given["io"] {
            for other in ["decode"] where given[other] != nil {
                throw BenchError.usage("--io does not combine with --\(other) yet")
            }
            options.ioPrecisions = try text.split(separator: ",").map {
                guard let p = ioPrecisionValues[$0.trimmingCharacters(in: .whitespaces).lowercased()] else {
                    throw BenchError.usage("--io: expected f32, f16 or bf16 (or a list), got '\($0)'")
                }
                return p
            }
        }
        if options.hugePages && (options.ioPrecisions != [.float32] || given["decode"] != nil) {
            throw BenchError.usage("--huge-pages applies to the f32 view calls (not --io f16/bf16 or --decode, whose caches use huge pages already)")
        }
        if let text = given["seq-k"] { options.keyLength = try parseCount(text, option: "seq-k") }
        if let text = given["varlen"] {
            for other in ["seq", "seq-k", "batch", "decode", "preset"] where given[other] != nil {
                throw BenchError.usage("--varlen sets the packed sequences; it does not combine with --\(other)")
            }
            // Order and repeats kept: one entry per sequence.
            let lengths = try text.split(separator: ",", omittingEmptySubsequences: false).map {
                try parseCount($0.trimmingCharacters(in: .whitespaces), option: "varlen")
            }
            options.packedLengths = lengths
            options.sequenceLengths = [lengths.reduce(0, +)]
        }
        if let text = given["batch"] { options.batches = try parseList(text, option: "batch") }
        if let text = given["heads"] { options.heads = try parseList(text, option: "heads") }
        if let text = given["kv-heads"] { options.kvHeads = try parseList(text, option: "kv-heads") }
        if let text = given["dim"] { options.dims = try parseList(text, option: "dim") }
        if let text = given["threads"] {
            options.threads = try parseList(text, option: "threads", keywords: ["all": cores])
        }
        if let causalWords {
            guard let values = causalValues[causalWords.lowercased()] else {
                throw BenchError.usage("--causal: expected yes, no or both, got '\(causalWords)'")
            }
            options.causal = values
        }
        if let text = given["repeat"] { options.repeatCount = try parseCount(text, option: "repeat") }
        if let text = given["budget"] {
            guard let seconds = Double(text), seconds.isFinite, seconds > 0 else {
                throw BenchError.usage("--budget: expected a positive number of seconds, got '\(text)'")
            }
            options.budget = seconds
        }
        if let text = given["warmup"] {
            guard let n = Int(text), n >= 0 else {
                throw BenchError.usage("--warmup: expected a non-negative integer, got '\(text)'")
            }
            options.warmup = n
        }
        if let text = given["seed"] {
            guard let seed = UInt64(text) else {
                throw BenchError.usage("--seed: expected a non-negative integer, got '\(text)'")
            }
            options.seed = seed
        }
        for key in ["json", "csv", "charts"] {
            if let text = given[key], text.isEmpty {
                throw BenchError.usage("--\(key) needs a non-empty path")
            }
        }
        options.jsonPath = given["json"]
        options.csvPath = given["csv"]
        options.chartsDirectory = given["charts"]
        if options.decode && options.chartsDirectory != nil {
            throw BenchError.usage("--charts plots time against N and is not available with --decode")
        }

        for parameter in Parameter.allCases {
            if let text = given[parameter.rawValue] {
                options.overrides[parameter] = try parseCount(text, option: parameter.rawValue)
            }
        }

        if let text = given["axes"] { options.axes = try parseGrid(text, option: "axes") }
        if let text = given["mask"] {
            guard text.hasPrefix("document:"), let k = Int(text.dropFirst("document:".count)), k >= 1 else {
                throw BenchError.usage("--mask: expected document:K (K equal documents, K >= 1), got '\(text)'")
            }
            options.overrides[.documents] = k
            if case .all = options.variants { options.variants = try parseVariants("custom-mask", registry: registry) }
        }

        try options.check(registry: registry)
        return options
    }

    /// Cross-option checks: kv-heads divide heads; conformer settings are taken by the
    /// selected conformers.
    func check(registry: Registry) throws {
        if let kvHeads {
            for kv in kvHeads {
                for h in heads where h % kv != 0 {
                    throw BenchError.usage("--kv-heads \(kv) does not divide --heads \(h) (H must be a multiple of Hkv)")
                }
            }
        }
        let selected = selectedEntries(in: registry)
        if axes != nil, !selected.contains(where: { $0.name == "axial" }) {
            throw BenchError.usage("--axes is a setting of 'axial' only")
        }
        for parameter in overrides.keys.sorted() {
            let takers = selected.filter { $0.takes(parameter) }
            switch variants {
            case .all:
                if takers.isEmpty {
                    throw BenchError.usage("\(parameter.flag) is not a setting of any registered conformer")
                }
            case .names:
                if let refuser = selected.first(where: { !$0.takes(parameter) }) {
                    let takes = refuser.parameters.map(\.parameter.flag)
                    throw BenchError.usage("\(parameter.flag) is not a setting of '\(refuser.name)' "
                        + "(it takes \(takes.isEmpty ? "no settings" : takes.joined(separator: ", ")))")
                }
            }
        }
    }

    static let cachePrecisionValues: [String: [KVCache.Precision]] = [
        "f32": [.float32], "float32": [.float32], "f16": [.float16], "float16": [.float16],
        "both": [.float32, .float16], "bf16": [.bfloat16], "bfloat16": [.bfloat16], "int8": [.int8],
    ]

    static let ioPrecisionValues: [String: ActivationPrecision] = [
        "f32": .float32, "float32": .float32, "f16": .float16, "float16": .float16, "bf16": .bfloat16,
        "bfloat16": .bfloat16,
    ]

    static let causalValues: [String: [Bool]] = [
        "yes": [true], "true": [true], "1": [true], "on": [true],
        "no": [false], "false": [false], "0": [false], "off": [false],
        "both": [false, true],
    ]

    static func parseVariants(_ text: String, registry: Registry) throws -> VariantSelection {
        let names = text.split(separator: ",", omittingEmptySubsequences: false)
            .map { $0.trimmingCharacters(in: .whitespaces).lowercased() }
        guard !names.isEmpty, !names.contains("") else {
            throw BenchError.usage("--variants: empty name in '\(text)'")
        }
        if names.contains("all") { return .all }
        var unique: [String] = []
        for name in names where !unique.contains(name) {
            guard registry.entry(named: name) != nil else {
                throw BenchError.usage("unknown variant '\(name)'; registered: \(registry.names.joined(separator: ", "))")
            }
            unique.append(name)
        }
        return .names(unique)
    }

    /// A positive integer; `4K` / `4k` means 4096.
    /// A grid `AxB[xC..]` of positive counts (each may be written 4K).
    static func parseGrid(_ text: String, option: String) throws -> [Int] {
        let parts = text.split(separator: "x", omittingEmptySubsequences: false)
        guard !parts.isEmpty, parts.count <= 16 else {
            throw BenchError.usage("--\(option): expected AxB[xC..] with at most 16 axes, got '\(text)'")
        }
        return try parts.map { try parseCount(String($0), option: option) }
    }

    static func parseCount(_ text: String, option: String) throws -> Int {
        var digits = Substring(text.trimmingCharacters(in: .whitespaces))
        var multiplier = 1
        if let last = digits.last, last == "K" || last == "k" {
            multiplier = 1024
            digits = digits.dropLast()
        } else if let last = digits.last, last == "M" || last == "m" {
            multiplier = 1 << 20
            digits = digits.dropLast()
        }
        guard let value = Int(digits), value > 0 else {
            throw BenchError.usage("--\(option): expected a positive integer, got '\(text)'")
        }
        let (product, overflow) = value.multipliedReportingOverflow(by: multiplier)
        guard !overflow, product <= 1 << 40 else {
            throw BenchError.usage("--\(option): value '\(text)' is too large")
        }
        return product
    }

    /// A comma-separated list of positive integers (duplicates dropped, order kept).
    static func parseList(_ text: String, option: String, keywords: [String: Int] = [:]) throws -> [Int] {
        var values: [Int] = []
        for part in text.split(separator: ",", omittingEmptySubsequences: false) {
            let word = part.trimmingCharacters(in: .whitespaces)
            let value = try keywords[word.lowercased()] ?? parseCount(word, option: option)
            if !values.contains(value) { values.append(value) }
        }
        return values
    }
}
