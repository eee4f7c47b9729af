import EfficientAttention

// The registry of conformers the benchmark knows by name.
//
// Every name the issue fixes is registered, with a one-line description and the paper's
// default settings, whether or not its conformer exists yet. A conformer that has landed
// becomes available by giving its entry a `make` closure; nothing else in the harness
// changes. For example, once `LocalAttention` exists:
//
//     make: { c in LocalAttention(left: c[.window] / 2, right: c[.window] / 2 - 1, causal: c.causal) }

/// A setting a conformer takes, overridable from the command line as `--<rawValue> N`.
public enum Parameter: String, CaseIterable, Sendable, Hashable, Comparable {
    case window
    case stride
    case blockSize = "block-size"
    case randomBlocks = "random-blocks"
    case bucketSize = "bucket-size"
    case hashes
    case bucketFactor = "bucket-factor"
    case features
    case proj
    case span
    case ramp
    case memory
    case compression
    case inducing
    case seeds
    case sortCut = "sort-cut"
    case globals
    case radius
    case maxDistance = "max-distance"
    case compressedMemory = "compressed-memory"
    case documents

    /// The command-line flag, `--window` and so on.
    public var flag: String { "--" + rawValue }

    /// What the value means, for `--help`.
    public var help: String {
        switch self {
        case .window: return "window size (local: left w/2, right w/2-1; longformer: total keys per query; routing: cluster size)"
        case .stride: return "strided: stride l (default ceil(sqrt(N)))"
        case .blockSize: return "bigbird, sinkhorn: block size"
        case .randomBlocks: return "bigbird: random blocks per query block"
        case .bucketSize: return "lsh: bucket (chunk) size"
        case .hashes: return "lsh: hash rounds"
        case .bucketFactor: return "lsh: factorised hashing with bucket factors [N, nBuckets/N] (default: automatic two factors past 512 buckets)"
        case .features: return "performer: random features m"
        case .proj: return "linformer: projected length k"
        case .span: return "adaptive-span: maximum span S"
        case .ramp: return "adaptive-span: soft-mask ramp R"
        case .memory: return "transformer-xl, compressive: memory length M (default N)"
        case .compression: return "memory-compressed: kernel and stride c of the key/value convolution (mean pooling); compressive: compression rate c"
        case .inducing: return "isab: inducing points m per head"
        case .seeds: return "pma: seed vectors k per head (the output has k rows)"
        case .sortCut: return "sinkhorn: SortCut, each query attends to the first N sorted blocks only (off by default)"
        case .globals: return "etc: global tokens N_g in front of the N long tokens"
        case .radius: return "etc: local radius r of long -> long attention"
        case .maxDistance: return "etc: relative-position clipping distance (2k + 1 seeded vectors per head)"
        case .compressedMemory: return "compressive: compressed memory slots M_c (default N)"
        case .documents: return "custom-mask: K documents of equal length (a custom visibility predicate; --mask document:K)"
        }
    }

    public static func < (a: Parameter, b: Parameter) -> Bool {
        allCases.firstIndex(of: a)! < allCases.firstIndex(of: b)!
    }
}

/// A parameter's default: a constant, a function of the sequence length, or unset.
public enum ParameterDefault: Sendable, Equatable, CustomStringConvertible {
    /// A fixed value.
    case value(Int)
    /// No value unless one is given on the command line (an optional feature, off).
    case unset
    /// `⌈√Nk⌉` of the sweep point's key length.
    case ceilSqrtOfKeyLength
    /// The sweep point's query (segment) length `N`.
    case sequenceLength

    /// The value at a sweep point with the given lengths (`nil` when unset).
    public func resolve(queryLength: Int, keyLength: Int) -> Int? {
        switch self {
        case .value(let v): return v
        case .unset: return nil
        case .ceilSqrtOfKeyLength: return ceilSquareRoot(keyLength)
        case .sequenceLength: return queryLength
        }
    }

    public var description: String {
        switch self {
        case .value(let v): return String(v)
        case .unset: return "off"
        case .ceilSqrtOfKeyLength: return "ceil(sqrt(N))"
        case .sequenceLength: return "N"
        }
    }
}

/// The smallest `r` with `r · r >= n` (exact integer arithmetic), for `n >= 0`.
public func ceilSquareRoot(_ n: Int) -> Int {
    precondition(n >= 0, "ceilSquareRoot of a negative number")
    var r = Int(Double(n).squareRoot())
    while r * r < n { r += 1 }
    while r > 0 && (r - 1) * (r - 1) >= n { r -= 1 }
    return r
}

/// One attention problem of a sweep: the shape and whether the causal rule applies.
public struct BenchProblem: Hashable, Sendable, CustomStringConvertible {
    public var shape: AttentionShape
    public var causal: Bool

    public init(shape: AttentionShape, causal: Bool) {
        self.shape = shape
        self.causal = causal
    }

    public var description: String { "\(shape) \(causal ? "causal" : "non-causal")" }
}

/// What a registry factory receives: the (possibly adjusted) problem, the resolved
/// parameter values, and the sweep's seed for the conformer's own random choices.
public struct ConformerConfig: Sendable {
    public var problem: BenchProblem
    public var parameters: [Parameter: Int]
    public var seed: UInt64
    /// Axial attention's grid (`--axes`); `nil`: the most square grid of the sequence length.
    public var axes: [Int]?

    public init(problem: BenchProblem, parameters: [Parameter: Int], seed: UInt64, axes: [Int]? = nil) {
        self.problem = problem
        self.parameters = parameters
        self.seed = seed
        self.axes = axes
    }

    public var causal: Bool { problem.causal }
    public var shape: AttentionShape { problem.shape }

    /// The value of an optional parameter (declared with ``ParameterDefault/unset``), if given.
    public func optional(_ parameter: Parameter) -> Int? { parameters[parameter] }

    /// The resolved value of a parameter the entry declares.
    public subscript(_ parameter: Parameter) -> Int {
        guard let value = parameters[parameter] else {
            preconditionFailure("parameter \(parameter.flag) is not declared by this registry entry")
        }
        return value
    }
}

/// One registered conformer.
public struct VariantEntry: Sendable {
    /// The registry name (`--variants` and the `variant` field of the records).
    public var name: String
    /// One line: what it is and where it comes from.
    public var summary: String
    /// The parameters it takes, with the paper's defaults, in display order.
    public var parameters: [(parameter: Parameter, default: ParameterDefault)]
    /// Extra words about the defaults for `--list` (may be empty).
    public var settingsNote: String
    /// In `--preset long`, sequence lengths above this are skipped with a note
    /// (quadratic time or memory); `nil` runs every length.
    public var longPresetLimit: Int?
    /// Whether its output approximates dense attention over the same queries (the error
    /// column); false for conformers whose queries are their own (PMA's seeds).
    public var approximatesDense: Bool
    /// Turns the sweep's problem into the one this conformer computes (for example
    /// multi-query uses one key/value head, Transformer-XL attends to memory + segment).
    public var adjustProblem: @Sendable (BenchProblem, [Parameter: Int]) -> BenchProblem
    /// Builds the conformer, or throws (``BenchError``) for settings it does not take.
    /// `nil` while the conformer has not landed: the name is then reported as not available.
    public var make: (@Sendable (ConformerConfig) throws -> any Attention)?

    public init(name: String, summary: String,
                parameters: [(parameter: Parameter, default: ParameterDefault)] = [],
                settingsNote: String = "",
                longPresetLimit: Int? = nil,
                approximatesDense: Bool = true,
                adjustProblem: @escaping @Sendable (BenchProblem, [Parameter: Int]) -> BenchProblem = { p, _ in p },
                make: (@Sendable (ConformerConfig) throws -> any Attention)?) {
        self.name = name
        self.summary = summary
        self.parameters = parameters
        self.settingsNote = settingsNote
        self.longPresetLimit = longPresetLimit
        self.approximatesDense = approximatesDense
        self.adjustProblem = adjustProblem
        self.make = make
    }

    /// True once the conformer exists in the library.
    public var isAvailable: Bool { make != nil }

    /// Whether `parameter` is one of this entry's settings.
    public func takes(_ parameter: Parameter) -> Bool {
        parameters.contains { $0.parameter == parameter }
    }

    /// The entry's parameters at `problem`: the command-line overrides where given,
    /// else the defaults. Overrides the entry does not take are ignored here (the
    /// option parser has already rejected or filtered them).
    public func resolveParameters(_ overrides: [Parameter: Int], at problem: BenchProblem) -> [Parameter: Int] {
        var values: [Parameter: Int] = [:]
        for (parameter, fallback) in parameters {
            values[parameter] = overrides[parameter]
                ?? fallback.resolve(queryLength: problem.shape.queryLength, keyLength: problem.shape.keyLength)
        }
        return values
    }

    /// `window=256 stride=...` as stored in the records (empty without parameters).
    public static func describe(_ values: [Parameter: Int]) -> String {
        values.keys.sorted().map { "\($0.rawValue)=\(values[$0]!)" }.joined(separator: " ")
    }

    /// The defaults for `--list`: `window 256 (left 128, right 127)`.
    public var defaultsDescription: String {
        var text = parameters.map { "\($0.parameter.rawValue) \($0.default)" }.joined(separator: ", ")
        if !settingsNote.isEmpty { text += text.isEmpty ? settingsNote : " (\(settingsNote))" }
        return text.isEmpty ? "-" : text
    }
}

/// The conformers known to the benchmark, in table order.
public struct Registry: Sendable {
    public var entries: [VariantEntry]

    public init(entries: [VariantEntry]) {
        self.entries = entries
    }

    public var names: [String] { entries.map(\.name) }

    public func entry(named name: String) -> VariantEntry? {
        entries.first { $0.name == name }
    }

    /// The text of `--list`: name, availability, defaults, description.
    public func listing() -> String {
        var rows = [["name", "status", "defaults", "description"]]
        for e in entries {
            rows.append([e.name, e.isAvailable ? "available" : "not available yet", e.defaultsDescription, e.summary])
        }
        return TextTable.render(rows, rightAligned: []) + "\n"
    }

    /// Every conformer named in the issue, with the papers' default settings.
    public static let standard = Registry(entries: [
        VariantEntry(
            name: "vanilla",
            summary: "textbook unfused softmax attention, N x N scores materialised (the LRA 'vanilla Transformer' row)",
            longPresetLimit: 8192,
            make: { c in VanillaAttention(causal: c.causal) }),
        VariantEntry(
            name: "dense",
            summary: "exact softmax attention, flash-style tiles with online softmax (reference for speedup and error)",
            longPresetLimit: 16384,
            make: { c in DenseAttention(causal: c.causal) }),
        VariantEntry(
            name: "local",
            summary: "sliding-window attention (Image Transformer / local attention), causal: right 0",
            parameters: [(.window, .value(256))],
            settingsNote: "left 128, right 127",
            make: { c in LocalAttention(left: c[.window] / 2, right: max(0, c[.window] / 2 - 1), causal: c.causal) }),
        VariantEntry(
            name: "strided",
            summary: "Sparse Transformer strided pattern, band |i-j| < l plus every l-th key (Child et al. 2019)",
            parameters: [(.stride, .ceilSqrtOfKeyLength)],
            make: { c in StridedAttention(kind: .strided, stride: c[.stride], causal: c.causal) }),
        VariantEntry(
            name: "longformer",
            summary: "Longformer sliding window w/2 each side plus global positions (Beltagy et al. 2020)",
            parameters: [(.window, .value(512))],
            settingsNote: "global position 0, dilation 1",
            make: { c in LongformerAttention(window: c[.window], globalPositions: [0], causal: c.causal) }),
        VariantEntry(
            name: "bigbird",
            summary: "BigBird ITC: 3 window blocks, first/last block global, r random blocks (Zaheer et al. 2020)",
            parameters: [(.blockSize, .value(64)), (.randomBlocks, .value(3))],
            settingsNote: "global blocks first and last, random blocks seeded by --seed",
            make: { c in
                BigBirdAttention(blockSize: c[.blockSize], randomBlockCount: c[.randomBlocks], seed: c.seed, causal: c.causal)
            }),
        VariantEntry(
            name: "lsh",
            summary: "Reformer LSH: shared-QK angular hashing, sorted chunks, rounds merged by log-sum-exp (Kitaev et al. 2020)",
            parameters: [(.bucketSize, .value(64)), (.hashes, .value(4)), (.bucketFactor, .unset)],
            make: { c in
                var lsh = LSHAttention(bucketSize: c[.bucketSize], hashes: c[.hashes], causal: c.causal, seed: c.seed)
                if let factor = c.optional(.bucketFactor) {
                    // Factors [f, nBuckets / f] of the usual nBuckets; a point where they do not
                    // exist is skipped with this note rather than silently unfactorised.
                    let buckets = lsh.buckets(forLength: c.shape.queryLength)
                    guard factor >= 2, factor % 2 == 0, buckets % factor == 0, (buckets / factor) % 2 == 0 else {
                        throw AttentionError.invalidParameter(
                            "--bucket-factor \(factor) needs even factors [\(factor), nBuckets / \(factor)] of nBuckets = \(buckets)")
                    }
                    lsh.bucketFactors = [factor, buckets / factor]
                }
                return lsh
            }),
        VariantEntry(
            name: "routing",
            summary: "Routing Transformer: balanced k-means clusters of w queries/keys, attention within clusters (Roy et al. 2021)",
            parameters: [(.window, .value(128))],
            settingsNote: "cluster size; K = N / 128 clusters",
            make: { c in
                try RoutingAttention(heads: c.shape.heads, headDim: c.shape.headDim,
                                     clusters: max(1, c.shape.queryLength / c[.window]), causal: c.causal,
                                     seed: c.seed)
            }),
        VariantEntry(
            name: "linformer",
            summary: "Linformer: keys and values projected along the sequence to k rows, non-causal (Wang et al. 2020)",
            parameters: [(.proj, .value(256))],
            make: { c in
                try LinformerAttention(projectedLength: c[.proj], maxSequenceLength: c.shape.keyLength,
                                       seed: c.seed, causal: c.causal)
            }),
        VariantEntry(
            name: "linear-elu",
            summary: "kernelized linear attention with phi(x) = elu(x) + 1 (Katharopoulos et al. 2020)",
            make: { c in LinearAttention(featureMap: EluPlusOneFeatures(), causal: c.causal) }),
        VariantEntry(
            name: "performer",
            summary: "Performer FAVOR+ positive orthogonal random features (Choromanski et al. 2021)",
            parameters: [(.features, .value(256))],
            make: { c in
                LinearAttention(featureMap: try FavorPlusFeatures(features: c[.features], headDim: c.shape.headDim,
                                                                  seed: c.seed),
                                causal: c.causal)
            }),
        VariantEntry(
            name: "multi-query",
            summary: "multi-query attention, one key/value head read by every query head (Shazeer 2019), dense kernel; --decode: KV cache",
            settingsNote: "kv-heads 1 unless --kv-heads gives a grouped count",
            longPresetLimit: 16384,
            adjustProblem: { p, _ in
                var p = p
                if p.shape.kvHeads == p.shape.heads { p.shape.kvHeads = 1 }
                return p
            },
            make: { c in MultiQueryAttention(causal: c.causal) }),
        VariantEntry(
            name: "transformer-xl",
            summary: "Transformer-XL segment over [memory; segment] with relative positions, causal (Dai et al. 2019)",
            parameters: [(.memory, .sequenceLength)],
            settingsNote: "keys = memory + segment",
            adjustProblem: { p, values in
                var p = p
                p.shape.keyLength = p.shape.queryLength + (values[.memory] ?? p.shape.queryLength)
                p.causal = true
                return p
            },
            make: { c in
                try TransformerXLAttention(heads: c.shape.heads, headDim: c.shape.headDim, memoryLength: c[.memory],
                                           maxSegmentLength: c.shape.queryLength, seed: c.seed)
            }),
        VariantEntry(
            name: "compressive",
            summary: "Compressive Transformer: Transformer-XL over [compressed memory; memory; segment], relative positions over the whole span, causal (Rae et al. 2020)",
            parameters: [(.memory, .sequenceLength), (.compressedMemory, .sequenceLength), (.compression, .value(3))],
            settingsNote: "keys = compressed memory + memory + segment (the stateless call: memory given, nothing compressed); mean pooling",
            adjustProblem: { p, values in
                var p = p
                p.shape.keyLength = p.shape.queryLength + (values[.memory] ?? p.shape.queryLength)
                    + (values[.compressedMemory] ?? p.shape.queryLength)
                p.causal = true
                return p
            },
            make: { c in
                try CompressiveTransformerAttention(
                    heads: c.shape.heads, headDim: c.shape.headDim, memoryLength: c[.memory],
                    compressedMemoryLength: c[.compressedMemory], compression: c[.compression],
                    maxSegmentLength: c.shape.queryLength, seed: c.seed)
            }),
        VariantEntry(
            name: "adaptive-span",
            summary: "adaptive span: causal, per-head span with a soft ramp, cost follows the span (Sukhbaatar et al. 2019)",
            parameters: [(.span, .value(128)), (.ramp, .value(32))],
            adjustProblem: { p, _ in
                var p = p
                p.causal = true
                return p
            },
            make: { c in
                AdaptiveSpanAttention(heads: c.shape.heads, span: Float(c[.span]), ramp: Float(c[.ramp]),
                                      causal: c.causal)
            }),
        VariantEntry(
            name: "axial",
            summary: "axial attention: positions on a grid, each query attends along every axis through it, one softmax (Ho et al. 2019)",
            settingsNote: "grid --axes, default the most square two-axis grid of N (64x64 at 4096); union of the axes",
            make: { c in AxialAttention(axes: c.axes, causal: c.causal) }),
        VariantEntry(
            name: "memory-compressed",
            summary: "memory-compressed attention: keys and values pooled by a stride-c convolution, then dense (Liu et al. 2018)",
            parameters: [(.compression, .value(3))],
            settingsNote: "mean pooling; causal by whole windows",
            longPresetLimit: 16384,
            make: { c in try MemoryCompressedAttention(compression: c[.compression], causal: c.causal) }),
        VariantEntry(
            name: "sinkhorn",
            summary: "Sparse Sinkhorn attention: key blocks sorted by a Sinkhorn-balanced plan, own block + sorted block (Tay et al. 2020)",
            parameters: [(.blockSize, .value(64)), (.sortCut, .unset)],
            settingsNote: "7 iterations, temperature 0.75, no Gumbel noise",
            make: { c in SinkhornAttention(blockSize: c[.blockSize], sortCut: c.optional(.sortCut), causal: c.causal) }),
        VariantEntry(
            name: "isab",
            summary: "Set Transformer induced set attention: m seeded inducing points summarise the keys, queries attend the summary (Lee et al. 2019)",
            parameters: [(.inducing, .value(32))],
            settingsNote: "identity projections; non-causal",
            make: { c in
                try InducedSetAttention(heads: c.shape.heads, headDim: c.shape.headDim, inducingCount: c[.inducing],
                                        seed: c.seed, causal: c.causal)
            }),
        VariantEntry(
            name: "pma",
            summary: "Set Transformer pooling by attention: k seeded seed vectors attend over the set, k output rows (Lee et al. 2019)",
            parameters: [(.seeds, .value(1))],
            settingsNote: "Nq = k (the seeds are the queries, no error column); non-causal",
            approximatesDense: false,
            adjustProblem: { p, values in
                var p = p
                p.shape.queryLength = values[.seeds] ?? 1
                return p
            },
            make: { c in
                try AttentionPooling(heads: c.shape.heads, headDim: c.shape.headDim, seedCount: c[.seeds],
                                     seed: c.seed, causal: c.causal)
            }),
        VariantEntry(
            name: "etc",
            summary: "ETC global-local attention: global tokens see and are seen by all, long tokens a band of radius r, clipped relative positions on long pairs (Ainslie et al. 2020)",
            parameters: [(.globals, .value(128)), (.radius, .value(ETCAttention.defaultRadius)),
                         (.maxDistance, .value(ETCAttention.defaultMaxDistance))],
            settingsNote: "N is the long length: Nq = Nk = globals + N; seeded relative table; causal on long pairs",
            adjustProblem: { p, values in
                var p = p
                let globals = values[.globals] ?? 128
                p.shape.queryLength += globals
                p.shape.keyLength = p.shape.queryLength
                return p
            },
            make: { c in
                try ETCAttention(heads: c.shape.heads, headDim: c.shape.headDim, globals: c[.globals],
                                 radius: c[.radius], maxDistance: c[.maxDistance], seed: c.seed, causal: c.causal)
            }),
        VariantEntry(
            name: "custom-mask",
            summary: "a custom visibility predicate with a block mask (FlexAttention mask_mod): K equal documents, causal within each when --causal yes",
            parameters: [(.documents, .value(8))],
            make: { c in
                CustomMaskAttention(predicate: try DocumentMask(length: (c.problem.shape.queryLength + c[.documents] - 1) / c[.documents],
                                                                causal: c.causal))
            }),
        VariantEntry(
            name: "score-function",
            summary: "a custom score function (FlexAttention score_mod) defined in the harness, outside the library: ALiBi's standard slopes as a ScoreFunction over every pair (compare with --variants dense --alibi)",
            parameters: [],
            make: { c in
                CustomMaskAttention(score: HarnessALiBi(slopes: ScoreModifiers.standardALiBiSlopes(heads: c.shape.heads),
                                                        offset: c.problem.shape.keyLength - c.problem.shape.queryLength))
            }),
    ])
}

/// ALiBi written as a ``ScoreFunction`` in this module (not the library's): `s − m_h · |i + offset − j|`,
/// the score function a user would write, to measure what a caller-defined type costs.
struct HarnessALiBi: ScoreFunction {
    var slopes: [Float]
    var offset: Int

    func score(_ s: Float, batch: Int, head: Int, query: Int, key: Int) -> Float {
        s - slopes[head] * Float(abs(query + offset - key))
    }

    func scores(_ s: SIMD16<Float>, batch: Int, head: Int, queries: SIMD16<Int32>, key: Int) -> SIMD16<Float> {
        let distance = SIMD16<Float>(queries &+ Int32(truncatingIfNeeded: offset - key))
        let magnitude = distance.replacing(with: -distance, where: distance .< 0)
        return s - slopes[head] * magnitude
    }
}
