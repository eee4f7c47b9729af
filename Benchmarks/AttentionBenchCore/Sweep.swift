import Foundation
@_spi(Benchmarking) @_spi(Testing) import EfficientAttention

/// A note printed under the table: a conformer that is not available, a point skipped
/// by the preset, a problem a conformer does not support.
public struct SweepNote: Equatable, Sendable {
    public var variant: String
    public var note: String
    public init(variant: String, note: String) { self.variant = variant; self.note = note }
}

/// One conformer at one sweep point and thread count, ready to run.
public struct SweepJob: Sendable {
    public var entry: VariantEntry
    /// The sweep's problem; ``problem`` is the one the conformer computes (adjusted).
    public var base: BenchProblem
    public var problem: BenchProblem
    public var parameters: [Parameter: Int]
    public var threads: Int
    public var conformer: any Attention
    public var cost: AttentionCost
    /// Index of the sweep point (problem × threads), for grouping.
    public var pointIndex: Int
    /// Position of the variant in the selection, for table order.
    public var variantIndex: Int
    /// Element type of the timed calls' operands (`--io`).
    public var io: ActivationPrecision = .float32
}

/// What a sweep will run, and what it will not (with the reason).
public struct SweepPlan: Sendable {
    public var jobs: [SweepJob]
    public var notes: [SweepNote]

    /// The problems of the sweep: batch × heads × kv-heads × dim × causal × N, in that
    /// nesting order (N innermost).
    public static func problems(_ options: BenchOptions) -> [BenchProblem] {
        var problems: [BenchProblem] = []
        for b in options.batches {
            for h in options.heads {
                for kv in options.kvHeads ?? [h] {
                    for d in options.dims {
                        for c in options.causal {
                            for n in options.sequenceLengths {
                                let shape = AttentionShape(batch: b, heads: h, kvHeads: kv, queryLength: n,
                                                           keyLength: options.keyLength ?? n, headDim: d)
                                problems.append(BenchProblem(shape: shape, causal: c))
                            }
                        }
                    }
                }
            }
        }
        return problems
    }

    /// Builds the plan. Throws ``BenchError/usage(_:)`` when a factory refuses its settings.
    ///
    /// - Parameter memoryLimit: jobs whose inputs, output and workspace exceed this many
    ///   bytes are skipped with a note (default: 3/4 of physical memory).
    public static func make(_ options: BenchOptions, registry: Registry = .standard,
                            memoryLimit: Int = Int(Double(ProcessInfo.processInfo.physicalMemory) * 0.75)) throws -> SweepPlan {
        let selected = options.selectedEntries(in: registry)
        var notes: [SweepNote] = []
        var skipped: [String: [String]] = [:]   // variant -> reasons in order
        func skip(_ variant: String, _ reason: String) {
            if !(skipped[variant]?.contains(reason) ?? false) { skipped[variant, default: []].append(reason) }
        }
        for entry in selected where !entry.isAvailable {
            notes.append(SweepNote(variant: entry.name, note: "not available yet (registered, conformer not in the library yet)"))
        }
        var jobs: [SweepJob] = []
        var pointIndex = 0
        for base in problems(options) {
            for threads in options.threads {
                defer { pointIndex += 1 }
                for (variantIndex, entry) in selected.enumerated() {
                    guard let make = entry.make else { continue }
                    if options.preset == .long, let limit = entry.longPresetLimit, base.shape.queryLength > limit {
                        skip(entry.name, "N > \(limit) skipped in --preset long (quadratic time or memory)")
                        continue
                    }
                    let overrides = options.overrides.filter { entry.takes($0.key) }
                    let parameters = entry.resolveParameters(overrides, at: base)
                    let problem = entry.adjustProblem(base, parameters)
                    let config = ConformerConfig(problem: problem, parameters: parameters, seed: options.seed,
                                                 axes: options.axes)
                    let conformer: any Attention
                    let cost: AttentionCost
                    do {
                        if options.hasModifiers {
                            guard var modifiable = try make(config) as? any ModifiableAttention else {
                                skip(entry.name, "takes no score modifiers (--softcap, --alibi, --sinks, --bias): not run")
                                continue
                            }
                            modifiable.modifiers = try options.modifiers(shape: problem.shape)
                            conformer = modifiable
                        } else {
                            conformer = try make(config)
                        }
                        if let lengths = options.packedLengths {
                            let s = problem.shape
                            cost = try conformer.cost(sequences: PackedSequences(lengths: lengths), heads: s.heads,
                                                      kvHeads: s.kvHeads, headDim: s.headDim, valueDim: s.valueDim,
                                                      threads: threads)
                        } else {
                            cost = try conformer.cost(problem.shape, threads: threads)
                        }
                    } catch let error as BenchError {
                        throw error
                    } catch {
                        skip(entry.name, "\(problem): \(error)")
                        continue
                    }
                    var needed = cost.workspaceBytes + problemBytes(problem.shape)
                    if options.preset == .million, needed > memoryLimit, problem.shape.heads > 1 {
                        // --preset million: H = 1 where H = 8 does not fit, stated.
                        var one = problem
                        one.shape.heads = 1
                        one.shape.kvHeads = 1
                        let oneConfig = ConformerConfig(problem: one, parameters: parameters, seed: options.seed,
                                                        axes: options.axes)
                        if let c = try? make(oneConfig), let oneCost = try? c.cost(one.shape, threads: threads) {
                            skip(entry.name, "N=\(problem.shape.queryLength): H=\(problem.shape.heads) needs about "
                                 + "\(Format.bytes(needed)), more than 3/4 of this machine's memory; run with H=1")
                            jobs.append(SweepJob(entry: entry, base: base, problem: one, parameters: parameters,
                                                 threads: threads, conformer: c, cost: oneCost,
                                                 pointIndex: pointIndex, variantIndex: variantIndex))
                            continue
                        }
                    }
                    needed = cost.workspaceBytes + problemBytes(problem.shape)
                    if needed > memoryLimit {
                        skip(entry.name, "N=\(problem.shape.queryLength) skipped: needs about \(Format.bytes(needed)), "
                             + "more than 3/4 of this machine's memory")
                        continue
                    }
                    for io in options.ioPrecisions {
                        jobs.append(SweepJob(entry: entry, base: base, problem: problem, parameters: parameters,
                                             threads: threads, conformer: conformer, cost: cost,
                                             pointIndex: pointIndex, variantIndex: variantIndex, io: io))
                    }
                }
            }
        }
        for entry in selected {
            for reason in skipped[entry.name] ?? [] { notes.append(SweepNote(variant: entry.name, note: reason)) }
        }
        return SweepPlan(jobs: jobs, notes: notes)
    }

    /// Bytes of query, key, value, output and log-sum-exp.
    /// Bytes of the inputs, the output and log-sum-exp the timed calls write in place, and
    /// those of the measured (allocating) call, kept for the error column.
    public static func problemBytes(_ s: AttentionShape) -> Int {
        4 * (s.batch * s.heads * s.queryLength * (s.headDim + 2 * (s.valueDim + 1))
             + s.batch * s.kvHeads * s.keyLength * (s.headDim + s.valueDim))
    }

    /// Bytes of the output and log-sum-exp a call returns.
    public static func outputBytes(_ s: AttentionShape) -> Int {
        4 * s.batch * s.heads * s.queryLength * (s.valueDim + 1)
    }
}

/// Runs a plan: inputs, warm-up, timing, memory, error against dense, relative columns.
public final class SweepRunner {
    public let options: BenchOptions
    public let registry: Registry
    public let peaks: PeakCache
    /// Receives progress lines (already silenced for `--quiet` by the caller).
    public let progress: (String) -> Void
    let meter = HeapMeter()

    public init(options: BenchOptions, registry: Registry = .standard, peaks: PeakCache = PeakCache(),
                progress: @escaping (String) -> Void) {
        self.options = options
        self.registry = registry
        self.peaks = peaks
        self.progress = progress
    }

    public struct Inputs {
        public var query: Tensor
        public var key: Tensor
        public var value: Tensor

        public init(query: Tensor, key: Tensor, value: Tensor) {
            self.query = query
            self.key = key
            self.value = value
        }
    }

    /// Seeded inputs, uniform in [-1, 1]: query, key, value from `seed`, `seed + 1`, `seed + 2`.
    /// The record's `parameters`: the entry's settings, and axial attention's grid as run.
    public static func describeSettings(_ job: SweepJob, packedLengths: [Int]? = nil) -> String {
        var text = VariantEntry.describe(job.parameters)
        if let packedLengths {
            text += (text.isEmpty ? "" : " ") + "varlen=" + packedLengths.map(String.init).joined(separator: ",")
        }
        if job.io != .float32 {
            text += (text.isEmpty ? "" : " ") + "io=" + Self.ioName(job.io)
        }
        if let modifiers = (job.conformer as? any ModifiableAttention)?.modifiers, !modifiers.isEmpty {
            text += (text.isEmpty ? "" : " ") + BenchOptions.describe(modifiers)
        }
        if let axial = job.conformer as? AxialAttention {
            let grid = axial.axes ?? AxialAttention.defaultAxes(sequenceLength: job.problem.shape.queryLength)
            text += (text.isEmpty ? "" : " ") + "axes=" + grid.map(String.init).joined(separator: "x")
        }
        return text
    }

    /// The `--io` spelling of `precision`.
    public static func ioName(_ precision: ActivationPrecision) -> String {
        switch precision {
        case .float32: "f32"
        case .float16: "f16"
        case .bfloat16: "bf16"
        }
    }

    /// Dense FLOPs above which the error column compares sampled rows (about a second of
    /// dense attention on this machine): a full dense reference at N = 1M would be 10^14 FLOPs.
    public static let fullReferenceFlops = 2e11
    /// Query rows the sampled error uses (per batch item and head).
    public static let sampledRowCount = 256

    /// `count` query rows evenly spread over `0..<n`, first and last included (every row
    /// when `n ≤ count`).
    public static func sampleRows(_ n: Int, count: Int) -> [Int] {
        guard n > count else { return Array(0..<n) }
        return (0..<count).map { $0 * (n - 1) / (count - 1) }
    }

    /// Rows `rows` of every (batch item, head) of `output` (`[B, H, Nq, Dv]` row-major), in
    /// `[B, H, rows, Dv]` order.
    public static func selectRows(_ output: [Float], rows: [Int], shape: AttentionShape) -> [Float] {
        var out: [Float] = []
        out.reserveCapacity(shape.batch * shape.heads * rows.count * shape.valueDim)
        for bh in 0..<(shape.batch * shape.heads) {
            for i in rows {
                let start = (bh * shape.queryLength + i) * shape.valueDim
                out += output[start..<(start + shape.valueDim)]
            }
        }
        return out
    }

    /// Dense attention's output on query rows `rows` of `problem`, each computed exactly
    /// over all its visible keys, in `[B, H, rows, Dv]` order: per batch item, one dense
    /// call whose batch items are the sampled rows (keys and values read through a
    /// batch-stride-0 view, the causal limit as each row's key length).
    public static func denseRows(_ rows: [Int], problem: BenchProblem, inputs: Inputs) throws -> [Float] {
        let s = problem.shape, n = rows.count
        let offset = s.keyLength - s.queryLength
        var out = [Float](repeating: 0, count: s.batch * s.heads * n * s.valueDim)
        for b in 0..<s.batch {
            var gathered = [Float](repeating: 0, count: n * s.heads * s.headDim)
            for (r, i) in rows.enumerated() {
                for h in 0..<s.heads {
                    for c in 0..<s.headDim { gathered[(r * s.heads + h) * s.headDim + c] = inputs.query[b, h, i, c] }
                }
            }
            let query = try Tensor(shape: [n, s.heads, 1, s.headDim], data: gathered)
            func broadcast(_ t: Tensor) throws -> Tensor {
                try Tensor(shape: [n, t.shape[1], t.shape[2], t.shape[3]], storage: t.storage,
                           strides: [0, t.strides[1], t.strides[2], t.strides[3]], offset: t.offset + b * t.strides[0])
            }
            let lengths = rows.map { problem.causal ? min(s.keyLength, max(0, $0 + offset + 1)) : s.keyLength }
            let result = try DenseAttention().attend(query: query, key: broadcast(inputs.key), value: broadcast(inputs.value),
                                                     keyLengths: lengths, threads: defaultThreadCount)
            for r in 0..<n {
                for h in 0..<s.heads {
                    for c in 0..<s.valueDim {
                        out[((b * s.heads + h) * n + r) * s.valueDim + c] = result.output[r, h, 0, c]
                    }
                }
            }
        }
        return out
    }

    public static func inputs(for shape: AttentionShape, seed: UInt64) throws -> (query: Tensor, key: Tensor, value: Tensor) {
        let q = try Tensor.random(shape: [shape.batch, shape.heads, shape.queryLength, shape.headDim], seed: seed)
        let k = try Tensor.random(shape: [shape.batch, shape.kvHeads, shape.keyLength, shape.headDim], seed: seed &+ 1)
        let v = try Tensor.random(shape: [shape.batch, shape.kvHeads, shape.keyLength, shape.valueDim], seed: seed &+ 2)
        return (q, k, v)
    }

    /// Runs every job; returns the records in table order (sweep point, then selection order).
    public func run(_ plan: SweepPlan) throws -> [BenchRecord] {
        let start = monotonicSeconds()
        var inputCache: [AttentionShape: Inputs] = [:]
        var referenceCache: [BenchProblem: [Float]] = [:]
        var sampledCache: [BenchProblem: [Float]] = [:]
        var currentBase: BenchProblem?
        var results: [(job: SweepJob, record: BenchRecord)] = []

        // Within a point, dense runs first so its output serves as the error reference.
        let ordered = plan.jobs.enumerated().sorted { a, b in
            if a.element.pointIndex != b.element.pointIndex { return a.element.pointIndex < b.element.pointIndex }
            let ad = a.element.entry.name == "dense", bd = b.element.entry.name == "dense"
            if ad != bd { return ad }
            return a.offset < b.offset
        }.map(\.element)

        for (i, job) in ordered.enumerated() {
            if currentBase != job.base {
                inputCache.removeAll()
                referenceCache.removeAll()
                sampledCache.removeAll()
                currentBase = job.base
            }
            let elapsed = monotonicSeconds() - start
            if elapsed >= 2 {
                progress("[\(i + 1)/\(ordered.count)] \(job.entry.name) N=\(job.problem.shape.queryLength) "
                         + "threads=\(job.threads) (elapsed \(String(format: "%.1f", elapsed)) s)")
            }
            let peak = peaks.peak(threads: job.threads)
            let shape = job.problem.shape
            let inputs: Inputs
            if let cached = inputCache[shape] {
                inputs = cached
            } else {
                let t = try Self.inputs(for: shape, seed: options.seed)
                inputs = Inputs(query: t.query, key: t.key, value: t.value)
                inputCache[shape] = inputs
            }
            let measured = try execute(job, inputs)
            // Dense in Float is the reference; 16-bit runs (dense too) are compared with it.
            let isDense = job.entry.name == "dense" && job.io == .float32
            if isDense && referenceCache[job.problem] == nil { referenceCache[job.problem] = measured.output }

            var relativeError: Double?
            var errorRows: Int?
            if isDense {
                relativeError = 0
            } else if job.entry.approximatesDense || job.entry.name == "dense" {
                let shape = job.problem.shape
                let denseFlops = Accounting.denseFlops(batch: shape.batch, heads: shape.heads, queryLength: shape.queryLength,
                                                       keyLength: shape.keyLength, headDim: shape.headDim,
                                                       valueDim: shape.valueDim, causal: job.problem.causal)
                let sampled = options.packedLengths == nil && referenceCache[job.problem] == nil
                    && denseFlops > Self.fullReferenceFlops
                if sampled && options.hasModifiers {
                    // Sampled rows are attended as separate one-query problems, without the
                    // positions a bias or ALiBi needs: no error column with modifiers.
                    progress("note: no sampled dense reference with score modifiers for \(job.problem)")
                } else if sampled {
                    // The full dense output would cost more than the run itself: exact dense rows
                    // on an even sample of the queries instead.
                    let rows = Self.sampleRows(shape.queryLength, count: Self.sampledRowCount)
                    if sampledCache[job.problem] == nil {
                        sampledCache[job.problem] = try Self.denseRows(rows, problem: job.problem, inputs: inputs)
                    }
                    relativeError = Accounting.relativeError(Self.selectRows(measured.output, rows: rows, shape: shape),
                                                             reference: sampledCache[job.problem]!)
                    errorRows = rows.count
                } else {
                    // The full dense Float output (dense's own when it ran in Float, else
                    // computed here); packed runs: of the same packed call.
                    if referenceCache[job.problem] == nil, let make = registry.entry(named: "dense")?.make {
                        var dense = try make(ConformerConfig(problem: job.problem, parameters: [:], seed: options.seed))
                        // The run's modifiers too, as when dense runs in the sweep.
                        if options.hasModifiers, var modifiable = dense as? any ModifiableAttention {
                            modifiable.modifiers = try options.modifiers(shape: job.problem.shape)
                            dense = modifiable
                        }
                        do {
                            let r = try options.packedLengths.map {
                                try dense.attend(query: inputs.query, key: inputs.key, value: inputs.value,
                                                 sequences: try PackedSequences(lengths: $0), threads: defaultThreadCount)
                            } ?? dense.attend(query: inputs.query, key: inputs.key, value: inputs.value,
                                              keyLengths: nil, threads: defaultThreadCount)
                            referenceCache[job.problem] = r.output.elements
                        } catch {
                            progress("note: no dense reference for \(job.problem): \(error)")
                        }
                    }
                    if let reference = referenceCache[job.problem] {
                        relativeError = Accounting.relativeError(measured.output, reference: reference)
                    }
                }
            }
            var record = BenchRecord(
                variant: job.entry.name, batch: shape.batch, heads: shape.heads, kvHeads: shape.kvHeads,
                seqQ: shape.queryLength, seqK: shape.keyLength, dim: shape.headDim, valueDim: shape.valueDim,
                causal: job.problem.causal, threads: job.threads, parameters: Self.describeSettings(job, packedLengths: options.packedLengths),
                runs: measured.timing.runs, medianSeconds: measured.timing.medianSeconds,
                minSeconds: measured.timing.minSeconds, flops: job.cost.flops, scoredPairs: job.cost.scoredPairs,
                peakGflops: peak, workspaceBytes: job.cost.workspaceBytes, measuredPeakBytes: measured.peakBytes,
                outputBytes: SweepPlan.outputBytes(shape), relativeError: relativeError, errorRows: errorRows,
                maxResidentBytes: measured.maxResidentBytes, allocationsPerCall: measured.allocationsPerCall)
            record.io = Self.ioName(job.io)
            results.append((job, record))
            if options.backward {
                if let differentiable = job.conformer as? any DifferentiableAttention {
                    do {
                        for extra in try timeBackward(job, differentiable, inputs, forward: record, peak: peak) {
                            results.append((job, extra))
                        }
                    } catch AttentionError.unsupported(let reason) {
                        // A setting this conformer's backward does not take (ETC's relative table):
                        // the forward's record stands, the backward is skipped with the reason.
                        progress("note: \(job.entry.name) backward skipped: \(reason)")
                    }
                } else {
                    progress("note: \(job.entry.name) has no backward pass yet (--backward skipped)")
                }
            }
        }
        let sorted = results.sorted { a, b in
            (a.job.pointIndex, a.job.variantIndex) < (b.job.pointIndex, b.job.variantIndex)
        }
        return SweepRunner.fillRelativeColumns(sorted.map(\.record))
    }

    /// Fills `speedupVsDense`, `memoryVsDense`, `speedupVsVanilla`, `memoryVsVanilla`
    /// from the dense and vanilla records with the same problem and thread count
    /// (left `nil` where that baseline was not run).
    public static func fillRelativeColumns(_ records: [BenchRecord]) -> [BenchRecord] {
        var dense: [String: BenchRecord] = [:], vanilla: [String: BenchRecord] = [:]
        for r in records {
            if r.variant == "dense" { dense[r.problemKey] = r }
            if r.variant == "vanilla" { vanilla[r.problemKey] = r }
        }
        var byLength: [String: BenchRecord] = [:]
        func lengthKey(_ r: BenchRecord, seqQ: Int, seqK: Int) -> String {
            "\(r.variant)/\(r.parameters)/\(r.batch)/\(r.heads)/\(r.kvHeads)/\(seqQ)/\(seqK)/\(r.dim)/\(r.valueDim)/\(r.causal)/\(r.threads)"
        }
        for r in records { byLength[lengthKey(r, seqQ: r.seqQ, seqK: r.seqK)] = r }
        return records.map { r in
            var r = r
            if r.seqQ % 4 == 0, r.seqK % 4 == 0, let quarter = byLength[lengthKey(r, seqQ: r.seqQ / 4, seqK: r.seqK / 4)] {
                r.growthPerQuadrupling = Accounting.ratio(r.medianSeconds, quarter.medianSeconds)
            }
            if let d = dense[r.problemKey] {
                r.speedupVsDense = Accounting.ratio(d.medianSeconds, r.medianSeconds)
                r.memoryVsDense = Accounting.ratio(Double(r.measuredPeakBytes), Double(d.measuredPeakBytes))
            }
            if let v = vanilla[r.problemKey] {
                r.speedupVsVanilla = Accounting.ratio(v.medianSeconds, r.medianSeconds)
                r.memoryVsVanilla = Accounting.ratio(Double(r.measuredPeakBytes), Double(v.measuredPeakBytes))
            }
            return r
        }
    }

    struct Measured {
        var timing: TimingStatistics
        var peakBytes: Int
        var output: [Float]
        /// The process's peak resident size over the calls (inputs included), when known.
        var maxResidentBytes: Int?
        /// Heap allocations per timed call (nil where they are not counted).
        var allocationsPerCall: Double?
    }

    /// `--backward`: the gradients alone (given the forward's output and log-sum-exp and a
    /// seeded `dO`), then forward plus backward, each timed as the policy says; records
    /// with FLOPs from `backwardCost` (2.5× the forward's for dense).
    func timeBackward(_ job: SweepJob, _ attention: some DifferentiableAttention, _ inputs: Inputs,
                      forward: BenchRecord, peak: Double) throws -> [BenchRecord] {
        let threads = job.threads, shape = job.problem.shape
        let sequences = try options.packedLengths.map { try PackedSequences(lengths: $0) }
        let backwardCost = try sequences.map {
            try attention.backwardCost(sequences: $0, heads: shape.heads, kvHeads: shape.kvHeads, headDim: shape.headDim,
                                       valueDim: shape.valueDim, threads: threads)
        } ?? attention.backwardCost(shape, threads: threads)
        let result = try sequences.map {
            try attention.attend(query: inputs.query, key: inputs.key, value: inputs.value, sequences: $0,
                                 threads: threads)
        } ?? attention.attend(query: inputs.query, key: inputs.key, value: inputs.value, keyLengths: nil,
                              threads: threads)
        let dO = try Tensor.random(shape: result.output.shape, seed: options.seed &+ 0x0d0)
        let (alone, both) = job.io == .float32
            ? try timedBackwardCalls(job, attention, inputs, result: result, outputGradient: dO, sequences: sequences,
                                     workspaceBytes: max(backwardCost.workspaceBytes, job.cost.workspaceBytes))
            : try timedMixedBackwardCalls(job, attention, inputs, outputGradient: dO, sequences: sequences)
        func record(_ pass: String, _ timed: (timing: TimingStatistics, allocationsPerCall: Double?),
                    flops: Double, workspace: Int) -> BenchRecord {
            var r = BenchRecord(
                variant: forward.variant, batch: forward.batch, heads: forward.heads, kvHeads: forward.kvHeads,
                seqQ: forward.seqQ, seqK: forward.seqK, dim: forward.dim, valueDim: forward.valueDim,
                causal: forward.causal, threads: forward.threads, parameters: forward.parameters,
                runs: timed.timing.runs, medianSeconds: timed.timing.medianSeconds, minSeconds: timed.timing.minSeconds,
                flops: flops, scoredPairs: forward.scoredPairs, peakGflops: peak, workspaceBytes: workspace,
                measuredPeakBytes: 0, outputBytes: forward.outputBytes, allocationsPerCall: timed.allocationsPerCall)
            r.pass = pass
            r.io = forward.io
            return r
        }
        return [record("backward", alone, flops: backwardCost.flops, workspace: backwardCost.workspaceBytes),
                record("forward+backward", both, flops: backwardCost.flops + job.cost.flops,
                       workspace: max(backwardCost.workspaceBytes, job.cost.workspaceBytes))]
    }

    typealias TimedCalls = (timing: TimingStatistics, allocationsPerCall: Double?)

    /// The backward alone and forward + backward, engine style as the forward's timed calls:
    /// borrowed views, gradients (and, for forward + backward, the output and log-sum-exp)
    /// written into the caller's tensors, one workspace for both passes, allocations counted
    /// per call. With `--varlen`, the packed calls on `sequences`.
    func timedBackwardCalls(_ job: SweepJob, _ attention: some DifferentiableAttention, _ inputs: Inputs,
                            result: AttentionResult, outputGradient dO: Tensor, sequences: PackedSequences?,
                            workspaceBytes: Int) throws -> (alone: TimedCalls, both: TimedCalls) {
        let threads = job.threads
        var dq = try Tensor(shape: inputs.query.shape), dk = try Tensor(shape: inputs.key.shape)
        var dv = try Tensor(shape: inputs.value.shape)
        var output = try Tensor(shape: result.output.shape), lse = try Tensor(shape: result.logSumExp.shape)
        let workspace = try AttentionWorkspace(byteCount: workspaceBytes)
        return try inputs.query.withStridedView { q in try inputs.key.withStridedView { k in
        try inputs.value.withStridedView { v in try dO.withStridedView { g in
        try result.output.withStridedView { o in try result.logSumExp.withStridedView { l in
        try dq.withMutableStridedView { dQ in try dk.withMutableStridedView { dK in try dv.withMutableStridedView { dV in
        try output.withMutableStridedView { out in try lse.withMutableStridedView { lseOut in
            // The forward's output and log-sum-exp, read by the backward that follows it.
            let written = try Self.readable(out), writtenLSE = try Self.readable(lseOut)
            let (qa, ka, va, ga) = (ActivationView(q), ActivationView(k), ActivationView(v), ActivationView(g))
            let (dQa, dKa, dVa) = (MutableActivationView(dQ), MutableActivationView(dK), MutableActivationView(dV))
            let alone = try timeEngineCalls(policy: options.timing) {
                try Self.engineGradients(attention, qa, ka, va, output: ActivationView(o), logSumExp: l,
                                         outputGradient: ga, dQuery: dQa, dKey: dKa, dValue: dVa,
                                         sequences: sequences, workspace: workspace, threads: threads)
            }
            let both = try timeEngineCalls(policy: options.timing) {
                try Self.engineCall(attention, qa, ka, va, output: MutableActivationView(out), logSumExp: lseOut,
                                    sequences: sequences, workspace: workspace, threads: threads)
                try Self.engineGradients(attention, qa, ka, va, output: ActivationView(written), logSumExp: writtenLSE,
                                         outputGradient: ga, dQuery: dQa, dKey: dKa, dValue: dVa,
                                         sequences: sequences, workspace: workspace, threads: threads)
            }
            return (alone, both)
        } } } } } } } } } } }
    }

    /// ``timedBackwardCalls(_:_:_:result:outputGradient:workspaceBytes:)`` with every operand
    /// and gradient in `job.io` (the inputs and `dO` rounded once, before timing; the
    /// output the 16-bit forward's): the ``ActivationView`` entry points, one workspace sized
    /// for both passes' conversions.
    func timedMixedBackwardCalls(_ job: SweepJob, _ attention: some DifferentiableAttention, _ inputs: Inputs,
                                 outputGradient dO: Tensor,
                                 sequences: PackedSequences?) throws -> (alone: TimedCalls, both: TimedCalls) {
        let threads = job.threads, io = job.io
        let shape = try AttentionShape(query: inputs.query, key: inputs.key, value: inputs.value)
        let precisions = OperandPrecisions(io)
        let backward = try sequences.map {
            try AttentionWorkspace(forBackwardOf: attention, sequences: $0, heads: shape.heads, kvHeads: shape.kvHeads,
                                   headDim: shape.headDim, valueDim: shape.valueDim, threads: threads,
                                   precisions: precisions)
        } ?? AttentionWorkspace(forBackwardOf: attention, shape: shape, threads: threads, precisions: precisions)
        let forward = try Self.forwardWorkspace(attention, shape, sequences: sequences, threads: threads,
                                                precisions: precisions)
        let workspace = try AttentionWorkspace(byteCount: max(backward.byteCount, forward.byteCount))
        let (q, k, v, g) = (Self.bitPatterns(inputs.query, io), Self.bitPatterns(inputs.key, io),
                            Self.bitPatterns(inputs.value, io), Self.bitPatterns(dO, io))
        var out = [UInt16](repeating: 0, count: dO.count)
        var dq = [UInt16](repeating: 0, count: q.count), dk = [UInt16](repeating: 0, count: k.count)
        var dv = [UInt16](repeating: 0, count: v.count)
        var lse = try Tensor(shape: [shape.batch, shape.heads, shape.queryLength, 1])
        func view(_ b: UnsafeBufferPointer<UInt16>, _ t: Tensor) throws -> ActivationView {
            try ActivationView(bitPatterns: b, precision: io, shape: SIMD4(t.shape))
        }
        func view(_ b: UnsafeMutableBufferPointer<UInt16>, _ t: Tensor) throws -> MutableActivationView {
            try MutableActivationView(bitPatterns: b, precision: io, shape: SIMD4(t.shape))
        }
        return try q.withUnsafeBufferPointer { qb in try k.withUnsafeBufferPointer { kb in
        try v.withUnsafeBufferPointer { vb in try g.withUnsafeBufferPointer { gb in
        try out.withUnsafeMutableBufferPointer { ob in try dq.withUnsafeMutableBufferPointer { dqb in
        try dk.withUnsafeMutableBufferPointer { dkb in try dv.withUnsafeMutableBufferPointer { dvb in
        try lse.withMutableStridedView { lseOut in
            let (qv, kv, vv, gv) = (try view(qb, inputs.query), try view(kb, inputs.key), try view(vb, inputs.value),
                                    try view(gb, dO))
            let (outView, dQ, dK, dV) = (try view(ob, dO), try view(dqb, inputs.query), try view(dkb, inputs.key),
                                         try view(dvb, inputs.value))
            // The output and log-sum-exp the backward reads: the 16-bit forward's, written here.
            let written = try ActivationView(bitPatterns: UnsafeBufferPointer(ob), precision: io, shape: SIMD4(dO.shape))
            let writtenLSE = try Self.readable(lseOut)
            func forward() throws {
                try Self.engineCall(attention, qv, kv, vv, output: outView, logSumExp: lseOut, sequences: sequences,
                                    workspace: workspace, threads: threads)
            }
            func backward() throws {
                try Self.engineGradients(attention, qv, kv, vv, output: written, logSumExp: writtenLSE,
                                         outputGradient: gv, dQuery: dQ, dKey: dK, dValue: dV, sequences: sequences,
                                         workspace: workspace, threads: threads)
            }
            try forward()
            let alone = try timeEngineCalls(policy: options.timing) { try backward() }
            let both = try timeEngineCalls(policy: options.timing) {
                try forward()
                try backward()
            }
            return (alone, both)
        } } } } } } } } }
    }

    /// One engine-style forward call: over the packed `sequences` when given.
    static func engineCall(_ conformer: some Attention, _ q: ActivationView, _ k: ActivationView, _ v: ActivationView,
                           output: MutableActivationView, logSumExp: MutableStridedView, sequences: PackedSequences?,
                           workspace: AttentionWorkspace, threads: Int) throws {
        if let sequences {
            try conformer.attend(query: q, key: k, value: v, output: output, logSumExp: logSumExp,
                                 sequences: sequences, workspace: workspace, threads: threads)
        } else {
            try conformer.attend(query: q, key: k, value: v, output: output, logSumExp: logSumExp,
                                 keyLengths: nil, workspace: workspace, threads: threads)
        }
    }

    /// A workspace for `conformer`'s forward calls on `shape` with operands of `precisions`:
    /// for the packed `sequences` when given.
    static func forwardWorkspace(_ conformer: some Attention, _ shape: AttentionShape, sequences: PackedSequences?,
                                 threads: Int, precisions: OperandPrecisions) throws -> AttentionWorkspace {
        try sequences.map {
            try AttentionWorkspace(for: conformer, sequences: $0, heads: shape.heads, kvHeads: shape.kvHeads,
                                   headDim: shape.headDim, valueDim: shape.valueDim, threads: threads,
                                   precisions: precisions)
        } ?? AttentionWorkspace(for: conformer, shape: shape, threads: threads, precisions: precisions)
    }

    /// One engine-style backward call: over the packed `sequences` when given.
    static func engineGradients(_ conformer: some DifferentiableAttention, _ q: ActivationView, _ k: ActivationView,
                                _ v: ActivationView, output: ActivationView, logSumExp: StridedView,
                                outputGradient: ActivationView, dQuery: MutableActivationView,
                                dKey: MutableActivationView, dValue: MutableActivationView,
                                sequences: PackedSequences?, workspace: AttentionWorkspace, threads: Int) throws {
        if let sequences {
            try conformer.gradients(query: q, key: k, value: v, output: output, logSumExp: logSumExp,
                                    outputGradient: outputGradient, dQuery: dQuery, dKey: dKey, dValue: dValue,
                                    sequences: sequences, workspace: workspace, threads: threads)
        } else {
            try conformer.gradients(query: q, key: k, value: v, output: output, logSumExp: logSumExp,
                                    outputGradient: outputGradient, dQuery: dQuery, dKey: dKey, dValue: dValue,
                                    keyLengths: nil, workspace: workspace, threads: threads)
        }
    }

    /// A read-only view of a contiguous tensor `view` writes (the forward's output, read by
    /// the backward that follows it).
    static func readable(_ view: MutableStridedView) throws -> StridedView {
        let s = view.shape
        return try StridedView(UnsafeBufferPointer(start: view.baseAddress, count: s[0] * s[1] * s[2] * s[3]), shape: s)
    }

    /// `t`'s elements rounded to `precision` (16-bit), as bit patterns.
    static func bitPatterns(_ t: Tensor, _ precision: ActivationPrecision) -> [UInt16] {
        t.elements.map { x in
            precision == .float16 ? HalfConversions.softwareBits(x) : BFloat16Conversions.bits(x)
        }
    }

    /// The measured call (the allocating `Tensor` API: heap growth, output for the error
    /// column), then engine-style warm-up and timed calls: borrowed views of the inputs, one
    /// caller-owned output and log-sum-exp written in place, one ``AttentionWorkspace``
    /// reused by every call, allocations counted per call.
    func execute(_ job: SweepJob, _ inputs: Inputs) throws -> Measured {
        let policy = options.timing
        let conformer = job.conformer, threads = job.threads
        let sequences = try options.packedLengths.map { try PackedSequences(lengths: $0) }
        func failure(_ error: Error) -> BenchError {
            BenchError.failure("\(job.entry.name) failed on \(job.problem) with \(threads) threads: \(error)")
        }
        ResidentMemory.resetPeak()
        // The output and log-sum-exp are bound directly (no `AttentionResult` kept beside
        // them), so the timed calls write into the measured call's buffers instead of a
        // copy: at N = 1M, H = 8 a copy of the output is 2 GiB of resident memory.
        var output: Tensor, lse: Tensor
        let peakBytes: Int
        do {
            ((output, lse), peakBytes) = try meter.measure {
                let result = try sequences.map {
                    try conformer.attend(query: inputs.query, key: inputs.key, value: inputs.value,
                                         sequences: $0, threads: threads)
                } ?? conformer.attend(query: inputs.query, key: inputs.key, value: inputs.value,
                                      keyLengths: nil, threads: threads)
                return (result.output, result.logSumExp)
            }
        } catch {
            throw failure(error)
        }
        if job.io != .float32 {
            return try executeMixed(job, inputs, sequences: sequences, peakBytes: peakBytes, lse: lse)
        }
        let timed: (timing: TimingStatistics, allocationsPerCall: Double?)
        do {
            let shape = try AttentionShape(query: inputs.query, key: inputs.key, value: inputs.value)
            let workspace = try Self.forwardWorkspace(conformer, shape, sequences: sequences, threads: threads,
                                                      precisions: .float32)
            let huge = options.hugePages
                ? (try HugePageCopy(inputs.query), try HugePageCopy(inputs.key), try HugePageCopy(inputs.value)) : nil
            timed = try inputs.query.withStridedView { q in try inputs.key.withStridedView { k in
            try inputs.value.withStridedView { v in
            try output.withMutableStridedView { o in try lse.withMutableStridedView { l in
                var read = (q, k, v)
                if let huge { read = (try huge.0.view(), try huge.1.view(), try huge.2.view()) }
                return try timeEngineCalls(policy: policy) {
                    try Self.engineCall(conformer, ActivationView(read.0), ActivationView(read.1), ActivationView(read.2),
                                        output: MutableActivationView(o), logSumExp: l, sequences: sequences,
                                        workspace: workspace, threads: threads)
                }
            } } } } }
        } catch {
            throw failure(error)
        }
        // The last timed call's output: the engine-style calls give the measured call's bits
        // (CallingConventionTests), and the error column checks what was timed.
        return Measured(timing: timed.timing, peakBytes: peakBytes, output: output.elements,
                        maxResidentBytes: ResidentMemory.peak(), allocationsPerCall: timed.allocationsPerCall)
    }

    /// `--io f16|bf16`: the engine-style timed calls with every operand in `job.io` (the
    /// inputs rounded once, before timing), through the ``ActivationView`` entry point with
    /// a workspace sized for those precisions. The error column compares the widened 16-bit
    /// output, so it includes the rounding of the inputs and of the output. With `--varlen`,
    /// the packed call on `sequences`.
    func executeMixed(_ job: SweepJob, _ inputs: Inputs, sequences: PackedSequences?, peakBytes: Int,
                      lse: Tensor) throws -> Measured {
        let threads = job.threads, conformer = job.conformer
        var lse = lse
        let (q, k, v) = (Self.bitPatterns(inputs.query, job.io), Self.bitPatterns(inputs.key, job.io),
                         Self.bitPatterns(inputs.value, job.io))
        let shape = try AttentionShape(query: inputs.query, key: inputs.key, value: inputs.value)
        var out = [UInt16](repeating: 0, count: shape.batch * shape.heads * shape.queryLength * shape.valueDim)
        let precisions = OperandPrecisions(job.io)
        let timed: (timing: TimingStatistics, allocationsPerCall: Double?)
        do {
            let workspace = try Self.forwardWorkspace(conformer, shape, sequences: sequences, threads: threads,
                                                      precisions: precisions)
            func view(_ b: UnsafeBufferPointer<UInt16>, _ t: Tensor) throws -> ActivationView {
                try ActivationView(bitPatterns: b, precision: job.io, shape: SIMD4(t.shape))
            }
            timed = try q.withUnsafeBufferPointer { qb in try k.withUnsafeBufferPointer { kb in
            try v.withUnsafeBufferPointer { vb in try out.withUnsafeMutableBufferPointer { ob in
            try lse.withMutableStridedView { l in
                let (qv, kv, vv) = (try view(qb, inputs.query), try view(kb, inputs.key), try view(vb, inputs.value))
                let ov = try MutableActivationView(bitPatterns: ob, precision: job.io,
                                                   shape: SIMD4(shape.batch, shape.heads, shape.queryLength, shape.valueDim))
                return try timeEngineCalls(policy: options.timing) {
                    try Self.engineCall(conformer, qv, kv, vv, output: ov, logSumExp: l, sequences: sequences,
                                        workspace: workspace, threads: threads)
                }
            } } } } }
        } catch {
            throw BenchError.failure("\(job.entry.name) failed on \(job.problem) with \(threads) threads, io \(Self.ioName(job.io)): \(error)")
        }
        let widened = out.map { job.io == .float16 ? HalfConversions.softwareFloat(bits: $0) : Float(bitPattern: UInt32($0) << 16) }
        return Measured(timing: timed.timing, peakBytes: peakBytes, output: widened,
                        maxResidentBytes: ResidentMemory.peak(), allocationsPerCall: timed.allocationsPerCall)
    }
}
