import Foundation
import EfficientAttention

// Decode mode (`--decode`): one decode step of `n` new query positions against a key/value
// cache of `L` positions, for every conformer that decodes (``IncrementalAttention``).
// A decode step is bound by memory bandwidth, so besides time and FLOPs each record
// carries the GB/s of cache read (`gbPerSecond`) and the machine's measured streaming
// read bandwidth (`peakGBPerSecond`).

/// The cache layouts decode mode measures (`--cache-kind`).
public enum DecodeCacheKind: String, Sendable, CaseIterable {
    /// ``KVCache``.
    case contiguous
    /// ``RotatingKVCache`` with a window of the whole cache length (it holds every position).
    case rotating
    /// ``PagedKVCache`` with pages of ``DecodePlan/pageSize`` positions, one sequence per batch item.
    case paged
}

/// One decode problem and thread count for one conformer.
public struct DecodeJob: Sendable {
    public var entry: VariantEntry
    /// `queryLength` = new positions per step, `keyLength` = cache length.
    public var problem: BenchProblem
    public var precision: KVCache.Precision
    public var kind: DecodeCacheKind = .contiguous
    public var threads: Int
    public var conformer: any IncrementalAttention
    public var cost: AttentionCost
    public var parameters: [Parameter: Int]
}

/// What a decode sweep will run, and the notes on what it will not.
public struct DecodePlan: Sendable {
    public var jobs: [DecodeJob]
    public var notes: [SweepNote]

    /// Bytes of the cache a decode problem needs (all positions filled; Int8 rows with their scales).
    public static func cacheBytes(_ s: AttentionShape, precision: KVCache.Precision) -> Int {
        s.batch * s.kvHeads * s.keyLength * (precision.rowBytes(width: s.headDim) + precision.rowBytes(width: s.valueDim))
    }

    /// Positions per page of `--cache-kind paged`.
    public static let pageSize = 16

    /// Builds the plan: batch × heads × kv-heads × dim × causal × cache × n × precision ×
    /// threads. `Hkv` is `--kv-heads` when given, else the entry's adjusted problem's.
    public static func make(_ options: BenchOptions, registry: Registry = .standard,
                            memoryLimit: Int = Int(Double(ProcessInfo.processInfo.physicalMemory) * 0.75)) throws -> DecodePlan {
        var jobs: [DecodeJob] = []
        var notes: [SweepNote] = []
        func note(_ variant: String, _ text: String) {
            let n = SweepNote(variant: variant, note: text)
            if !notes.contains(n) { notes.append(n) }
        }
        for entry in options.selectedEntries(in: registry) {
            guard let make = entry.make else {
                note(entry.name, "not available yet (registered, conformer not in the library yet)")
                continue
            }
            for b in options.batches { for h in options.heads { for kv in options.kvHeads?.map({ Optional($0) }) ?? [nil] {
                for d in options.dims { for causal in options.causal { for length in options.cacheLengths {
                    for n in options.sequenceLengths { for precision in options.cachePrecisions {
                        for kind in options.cacheKinds { for threads in options.threads {
                            let base = BenchProblem(shape: AttentionShape(batch: b, heads: h, kvHeads: kv ?? h, queryLength: n,
                                                                          keyLength: length, headDim: d), causal: causal)
                            let overrides = options.overrides.filter { entry.takes($0.key) }
                            let parameters = entry.resolveParameters(overrides, at: base)
                            var problem = entry.adjustProblem(base, parameters)
                            if let kv { problem.shape.kvHeads = kv }
                            problem.shape.queryLength = n
                            problem.shape.keyLength = length
                            var conformer: any Attention
                            do {
                                conformer = try make(ConformerConfig(problem: problem, parameters: parameters, seed: options.seed))
                                if options.hasModifiers {
                                    guard var modifiable = conformer as? any ModifiableAttention else {
                                        note(entry.name, "takes no score modifiers (--softcap, --alibi, --sinks, --bias): not run")
                                        continue
                                    }
                                    modifiable.modifiers = try options.modifiers(shape: problem.shape)
                                    conformer = modifiable
                                }
                            } catch let error as BenchError {
                                throw error
                            } catch {
                                note(entry.name, "\(problem): \(error)")
                                continue
                            }
                            guard let decoder = conformer as? any IncrementalAttention else {
                                note(entry.name, "does not decode against a key/value cache (--decode)")
                                continue
                            }
                            let cost: AttentionCost
                            do {
                                if kind == .contiguous {
                                    cost = try decoder.decodeCost(problem.shape, precision: precision, threads: threads)
                                } else if let multiQuery = decoder as? MultiQueryAttention {
                                    cost = try multiQuery.decodeCost(problem.shape, precision: precision,
                                                                     cacheKind: kind.library(length: length, batch: b),
                                                                     threads: threads)
                                } else {
                                    note(entry.name, "decodes a contiguous KVCache only (--cache-kind \(kind.rawValue))")
                                    continue
                                }
                            } catch {
                                note(entry.name, "\(problem): \(error)")
                                continue
                            }
                            let needed = cacheBytes(problem.shape, precision: precision) + cost.workspaceBytes
                            if needed > memoryLimit {
                                note(entry.name, "cache \(length) skipped: needs about \(Format.bytes(needed)), "
                                     + "more than 3/4 of this machine's memory")
                                continue
                            }
                            jobs.append(DecodeJob(entry: entry, problem: problem, precision: precision, kind: kind,
                                                  threads: threads, conformer: decoder, cost: cost, parameters: parameters))
                        } }
                    } }
                } } }
            } } }
        }
        return DecodePlan(jobs: jobs, notes: notes)
    }
}

/// Runs a decode plan: fills a cache with the seeded inputs, times decode steps.
public final class DecodeRunner {
    public let options: BenchOptions
    public let peaks: PeakCache
    public let bandwidth: BandwidthCache
    public let progress: (String) -> Void
    let meter = HeapMeter()

    /// The relative error against dense attention over the cached keys is computed when
    /// the cache holds at most this many bytes (the reference copies the cache as Float).
    public static let errorCheckLimit = 256 << 20

    public init(options: BenchOptions, peaks: PeakCache = PeakCache(), bandwidth: BandwidthCache = BandwidthCache(),
                progress: @escaping (String) -> Void) {
        self.options = options
        self.peaks = peaks
        self.bandwidth = bandwidth
        self.progress = progress
    }

    /// A cache of `kind` holding `shape.keyLength` positions filled with seeded uniform
    /// values in [-1, 1] (keys from `seed + 1`, values from `seed + 2`, in blocks of 1024
    /// positions: ``cacheBlocks(_:seed:)``).
    public static func filledCache(_ shape: AttentionShape, precision: KVCache.Precision,
                                   kind: DecodeCacheKind = .contiguous, seed: UInt64) throws -> any DecodingCache {
        let cache: any DecodingCache
        switch kind {
        case .contiguous:
            cache = try KVCache(batch: shape.batch, kvHeads: shape.kvHeads, headDim: shape.headDim,
                                valueDim: shape.valueDim, capacity: shape.keyLength, precision: precision)
        case .rotating:
            cache = try RotatingKVCache(batch: shape.batch, kvHeads: shape.kvHeads, headDim: shape.headDim,
                                        valueDim: shape.valueDim, window: shape.keyLength, precision: precision)
        case .paged:
            let pages = shape.batch * ((shape.keyLength + DecodePlan.pageSize - 1) / DecodePlan.pageSize)
            let pool = try PagedKVCache(kvHeads: shape.kvHeads, headDim: shape.headDim, valueDim: shape.valueDim,
                                        pageSize: DecodePlan.pageSize, pageCount: pages, precision: precision)
            cache = try pool.batch((0..<shape.batch).map { _ in pool.addSequence() })
        }
        for (k, v) in try cacheBlocks(shape, seed: seed) { try cache.append(layer: 0, keys: k, values: v) }
        return cache
    }

    /// The seeded key and value blocks a filled cache holds, in order.
    public static func cacheBlocks(_ shape: AttentionShape, seed: UInt64) throws -> [(keys: Tensor, values: Tensor)] {
        var blocks: [(Tensor, Tensor)] = []
        var start = 0
        while start < shape.keyLength {
            let n = min(1024, shape.keyLength - start)
            let block = UInt64(start / 1024) &* 0x9E37_79B9
            let k = try Tensor.random(shape: [shape.batch, shape.kvHeads, n, shape.headDim], seed: (seed &+ 1) &+ block)
            let v = try Tensor.random(shape: [shape.batch, shape.kvHeads, n, shape.valueDim], seed: (seed &+ 2) &+ block)
            blocks.append((k, v))
            start += n
        }
        return blocks
    }

    public func run(_ plan: DecodePlan) throws -> [BenchRecord] {
        var records: [BenchRecord] = []
        var current: (shape: AttentionShape, precision: KVCache.Precision, kind: DecodeCacheKind,
                      cache: any DecodingCache, query: Tensor)?
        var reference: (key: String, output: [Float])?
        for (i, job) in plan.jobs.enumerated() {
            let shape = job.problem.shape
            if current == nil || current!.shape != shape || current!.precision != job.precision
                || current!.kind != job.kind {
                current = nil
                progress("[\(i + 1)/\(plan.jobs.count)] \(job.entry.name): filling a \(job.kind.rawValue) \(job.precision.rawValue) cache of "
                         + "\(shape.keyLength) positions (\(Format.bytes(DecodePlan.cacheBytes(shape, precision: job.precision))))")
                let cache = try Self.filledCache(shape, precision: job.precision, kind: job.kind, seed: options.seed)
                let query = try Tensor.random(shape: [shape.batch, shape.heads, shape.queryLength, shape.headDim],
                                              seed: options.seed)
                current = (shape, job.precision, job.kind, cache, query)
            }
            let (cache, query) = (current!.cache, current!.query)
            let peak = peaks.peak(threads: job.threads)
            let peakBandwidth = bandwidth.bandwidth(threads: job.threads)
            let measured = try execute(job, cache: cache, query: query)

            var relativeError: Double?
            let key = "\(shape)/\(job.problem.causal)"
            if cache.usedBytes <= Self.errorCheckLimit {
                if reference?.key != key {
                    reference = (key, try denseOutput(shape, query: query, causal: job.problem.causal,
                                                      modifiers: (job.conformer as? any ModifiableAttention)?.modifiers))
                }
                relativeError = Accounting.relativeError(measured.output, reference: reference!.output)
            }
            let names: [KVCache.Precision: String] = [.float32: "f32", .float16: "f16", .bfloat16: "bf16", .int8: "int8"]
            let modifiers = (job.conformer as? any ModifiableAttention)?.modifiers ?? ScoreModifiers()
            let settings = "cache=\(names[job.precision] ?? job.precision.rawValue)"
                + (job.kind == .contiguous ? "" : " kind=\(job.kind.rawValue)")
                + (modifiers.isEmpty ? "" : " " + BenchOptions.describe(modifiers))
            records.append(BenchRecord(
                variant: job.entry.name, batch: shape.batch, heads: shape.heads, kvHeads: shape.kvHeads,
                seqQ: shape.queryLength, seqK: shape.keyLength, dim: shape.headDim, valueDim: shape.valueDim,
                causal: job.problem.causal, threads: job.threads,
                parameters: [settings, VariantEntry.describe(job.parameters)].filter { !$0.isEmpty }.joined(separator: " "),
                runs: measured.timing.runs, medianSeconds: measured.timing.medianSeconds,
                minSeconds: measured.timing.minSeconds, flops: job.cost.flops, scoredPairs: job.cost.scoredPairs,
                peakGflops: peak, workspaceBytes: job.cost.workspaceBytes, measuredPeakBytes: measured.peakBytes,
                outputBytes: SweepPlan.outputBytes(shape), relativeError: relativeError,
                gbPerSecond: Double(cache.usedBytes) / measured.timing.medianSeconds / 1e9,
                peakGBPerSecond: peakBandwidth))
        }
        return records
    }

    /// Dense attention in Float over the keys and values the cache was filled with (before
    /// any rounding: the error column of a 16-bit or Int8 cache includes its storage error).
    func denseOutput(_ shape: AttentionShape, query: Tensor, causal: Bool,
                     modifiers: ScoreModifiers? = nil) throws -> [Float] {
        let blocks = try Self.cacheBlocks(shape, seed: options.seed)
        var keys: [Float] = [], values: [Float] = []
        for b in 0..<shape.batch {
            for h in 0..<shape.kvHeads {
                for (k, v) in blocks {
                    let head: Int = b * shape.kvHeads + h
                    let n: Int = k.shape[2]
                    let keyRange: Range<Int> = (head * n * shape.headDim)..<((head + 1) * n * shape.headDim)
                    let valueRange: Range<Int> = (head * n * shape.valueDim)..<((head + 1) * n * shape.valueDim)
                    keys += k.elements[keyRange]
                    values += v.elements[valueRange]
                }
            }
        }
        let k = try Tensor(shape: [shape.batch, shape.kvHeads, shape.keyLength, shape.headDim], data: keys)
        let v = try Tensor(shape: [shape.batch, shape.kvHeads, shape.keyLength, shape.valueDim], data: values)
        var dense = DenseAttention(causal: causal)
        dense.modifiers = modifiers ?? ScoreModifiers()
        return try dense.attend(query: query, key: k, value: v).output.elements
    }

    /// Warm-up (the first warm-up call measures heap growth), then timed decode calls.
    func execute(_ job: DecodeJob, cache: any DecodingCache, query: Tensor) throws -> SweepRunner.Measured {
        let policy = options.timing
        func call() throws -> AttentionResult {
            do {
                if let contiguous = cache as? KVCache {
                    return try job.conformer.decode(query: query, cache: contiguous, layer: 0, threads: job.threads)
                }
                guard let multiQuery = job.conformer as? MultiQueryAttention else {
                    throw BenchError.usage("\(job.entry.name) decodes a contiguous KVCache only")
                }
                return try multiQuery.decode(query: query, cache: cache, layer: 0, threads: job.threads)
            } catch {
                throw BenchError.failure("\(job.entry.name) decode failed on \(job.problem) with \(job.threads) threads: \(error)")
            }
        }
        let measured = try timeCalls(policy: policy, meter: meter, call)
        return SweepRunner.Measured(timing: measured.timing, peakBytes: measured.peakBytes, output: measured.output)
    }
}

extension DecodeCacheKind {
    /// The library's description of this layout for a cache of `length` positions and `batch` sequences.
    func library(length: Int, batch: Int) -> MultiQueryDecoding.CacheKind {
        switch self {
        case .contiguous: .contiguous
        case .rotating: .rotating(window: length)
        case .paged: .paged(pageSize: DecodePlan.pageSize,
                            pageCount: batch * ((length + DecodePlan.pageSize - 1) / DecodePlan.pageSize))
        }
    }
}
