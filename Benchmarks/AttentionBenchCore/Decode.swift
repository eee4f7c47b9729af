import Foundation
import EfficientAttention

// Decode mode (`--decode`): one decode step of `n` new query positions against a key/value
// cache of `L` positions, for every conformer that decodes (``IncrementalAttention``).
// A decode step is bound by memory bandwidth, so besides time and FLOPs each record
// carries the GB/s of cache read (`gbPerSecond`) and the machine's measured streaming
// read bandwidth (`peakGBPerSecond`).

/// One decode problem and thread count for one conformer.
public struct DecodeJob: Sendable {
    public var entry: VariantEntry
    /// `queryLength` = new positions per step, `keyLength` = cache length.
    public var problem: BenchProblem
    public var precision: KVCache.Precision
    public var threads: Int
    public var conformer: any IncrementalAttention
    public var cost: AttentionCost
    public var parameters: [Parameter: Int]
}

/// What a decode sweep will run, and the notes on what it will not.
public struct DecodePlan: Sendable {
    public var jobs: [DecodeJob]
    public var notes: [SweepNote]

    /// Bytes of the cache a decode problem needs (all positions filled).
    public static func cacheBytes(_ s: AttentionShape, precision: KVCache.Precision) -> Int {
        s.batch * s.kvHeads * s.keyLength * (s.headDim + s.valueDim) * precision.bytesPerElement
    }

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
                        for threads in options.threads {
                            let base = BenchProblem(shape: AttentionShape(batch: b, heads: h, kvHeads: kv ?? h, queryLength: n,
                                                                          keyLength: length, headDim: d), causal: causal)
                            let overrides = options.overrides.filter { entry.takes($0.key) }
                            let parameters = entry.resolveParameters(overrides, at: base)
                            var problem = entry.adjustProblem(base, parameters)
                            if let kv { problem.shape.kvHeads = kv }
                            problem.shape.queryLength = n
                            problem.shape.keyLength = length
                            let conformer: any Attention
                            do {
                                conformer = try make(ConformerConfig(problem: problem, parameters: parameters, seed: options.seed))
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
                                cost = try decoder.decodeCost(problem.shape, precision: precision, threads: threads)
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
                            jobs.append(DecodeJob(entry: entry, problem: problem, precision: precision, threads: threads,
                                                  conformer: decoder, cost: cost, parameters: parameters))
                        }
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

    /// A cache of `shape.keyLength` positions filled with seeded uniform values in [-1, 1]
    /// (keys from `seed + 1`, values from `seed + 2`, in blocks of 1024 positions).
    public static func filledCache(_ shape: AttentionShape, precision: KVCache.Precision, seed: UInt64) throws -> KVCache {
        let cache = try KVCache(batch: shape.batch, kvHeads: shape.kvHeads, headDim: shape.headDim,
                                valueDim: shape.valueDim, capacity: shape.keyLength, precision: precision)
        var start = 0
        while start < shape.keyLength {
            let n = min(1024, shape.keyLength - start)
            let block = UInt64(start / 1024) &* 0x9E37_79B9
            let k = try Tensor.random(shape: [shape.batch, shape.kvHeads, n, shape.headDim], seed: (seed &+ 1) &+ block)
            let v = try Tensor.random(shape: [shape.batch, shape.kvHeads, n, shape.valueDim], seed: (seed &+ 2) &+ block)
            try cache.append(layer: 0, keys: k, values: v)
            start += n
        }
        return cache
    }

    public func run(_ plan: DecodePlan) throws -> [BenchRecord] {
        var records: [BenchRecord] = []
        var current: (shape: AttentionShape, precision: KVCache.Precision, cache: KVCache, query: Tensor)?
        var reference: (key: String, output: [Float])?
        for (i, job) in plan.jobs.enumerated() {
            let shape = job.problem.shape
            if current == nil || current!.shape != shape || current!.precision != job.precision {
                current = nil
                progress("[\(i + 1)/\(plan.jobs.count)] \(job.entry.name): filling a \(job.precision.rawValue) cache of "
                         + "\(shape.keyLength) positions (\(Format.bytes(DecodePlan.cacheBytes(shape, precision: job.precision))))")
                let cache = try Self.filledCache(shape, precision: job.precision, seed: options.seed)
                let query = try Tensor.random(shape: [shape.batch, shape.heads, shape.queryLength, shape.headDim],
                                              seed: options.seed)
                current = (shape, job.precision, cache, query)
            }
            let (cache, query) = (current!.cache, current!.query)
            let peak = peaks.peak(threads: job.threads)
            let peakBandwidth = bandwidth.bandwidth(threads: job.threads)
            let measured = try execute(job, cache: cache, query: query)

            var relativeError: Double?
            let key = "\(shape)/\(job.problem.causal)"
            if cache.usedBytes <= Self.errorCheckLimit {
                if reference?.key != key {
                    reference = (key, try denseOutput(cache: cache, query: query, causal: job.problem.causal))
                }
                relativeError = Accounting.relativeError(measured.output, reference: reference!.output)
            }
            let settings = "cache=\(job.precision == .float32 ? "f32" : "f16")"
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

    /// Dense attention over the cache's keys and values read back as Float.
    func denseOutput(cache: KVCache, query: Tensor, causal: Bool) throws -> [Float] {
        var keys: [Float] = [], values: [Float] = []
        for b in 0..<cache.batch {
            keys += try cache.keys(batchItem: b).elements
            values += try cache.values(batchItem: b).elements
        }
        let length = try cache.length()
        let k = try Tensor(shape: [cache.batch, cache.kvHeads, length, cache.headDim], data: keys)
        let v = try Tensor(shape: [cache.batch, cache.kvHeads, length, cache.valueDim], data: values)
        return try DenseAttention(causal: causal).attend(query: query, key: k, value: v).output.elements
    }

    /// Warm-up (the first warm-up call measures heap growth), then timed decode calls.
    func execute(_ job: DecodeJob, cache: KVCache, query: Tensor) throws -> SweepRunner.Measured {
        let policy = options.timing
        func call() throws -> AttentionResult {
            do {
                return try job.conformer.decode(query: query, cache: cache, layer: 0, threads: job.threads)
            } catch {
                throw BenchError.failure("\(job.entry.name) decode failed on \(job.problem) with \(job.threads) threads: \(error)")
            }
        }
        let measured = try timeCalls(policy: policy, meter: meter, call)
        return SweepRunner.Measured(timing: measured.timing, peakBytes: measured.peakBytes, output: measured.output)
    }
}
