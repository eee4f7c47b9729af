import Foundation

/// One timed run of one conformer at one sweep point.
public struct BenchRecord: Equatable, Sendable {
    public var variant: String
    public var batch: Int
    public var heads: Int
    public var kvHeads: Int
    public var seqQ: Int
    public var seqK: Int
    public var dim: Int
    public var valueDim: Int
    public var causal: Bool
    public var threads: Int
    /// Resolved conformer settings, `window=256` style (empty for dense and vanilla).
    public var parameters: String = ""
    public var runs: Int
    public var medianSeconds: Double
    public var minSeconds: Double
    /// From the conformer's cost model.
    public var flops: Double
    public var scoredPairs: Int
    /// `flops / medianSeconds / 1e9`.
    public var gflops: Double
    /// Measured FMA peak for `threads`.
    public var peakGflops: Double
    /// From the conformer's cost model.
    public var workspaceBytes: Int
    /// Measured peak heap growth during one call (includes the output).
    public var measuredPeakBytes: Int
    /// Output plus log-sum-exp bytes, `B·H·Nq·(Dv + 1)·4`, part of `measuredPeakBytes`.
    public var outputBytes: Int
    /// `‖O − O_dense‖_F / ‖O_dense‖_F` (0 for dense).
    public var relativeError: Double?
    /// Query rows per (batch item, head) the error was computed on when the full dense
    /// reference would have been too expensive (evenly spread, each row exact over all its
    /// keys); `nil`: every row.
    public var errorRows: Int?
    /// The process's peak resident size during the warm-up and timed calls (`VmHWM` after
    /// resetting it; inputs, outputs and workspace included); `nil` where unknown.
    public var maxResidentBytes: Int?
    /// This median / the median of the same variant and settings at `N / 4` in the run.
    public var growthPerQuadrupling: Double?
    /// Dense median / this median at the same problem and thread count.
    public var speedupVsDense: Double?
    /// This measured peak / dense's.
    public var memoryVsDense: Double?
    public var speedupVsVanilla: Double?
    public var memoryVsVanilla: Double?
    /// Decode mode (`--decode`): bytes of cache read per call / median seconds / 1e9.
    public var gbPerSecond: Double?
    /// Decode mode: the measured streaming read bandwidth with `threads` threads, GB/s.
    public var peakGBPerSecond: Double?
    /// What was timed: "forward", "backward" (the gradients alone) or "forward+backward".
    public var pass = "forward"
    /// Element type of query, key, value and output in the timed calls (`--io`): "f32",
    /// "f16" or "bf16".
    public var io = "f32"
    /// Heap allocations per timed call (engine style: views, caller-owned output, a reused
    /// workspace), counted; `nil` where allocations are not counted.
    public var allocationsPerCall: Double?

    public init(variant: String, batch: Int, heads: Int, kvHeads: Int, seqQ: Int, seqK: Int,
                dim: Int, valueDim: Int, causal: Bool, threads: Int, parameters: String = "",
                runs: Int, medianSeconds: Double, minSeconds: Double, flops: Double, scoredPairs: Int,
                peakGflops: Double, workspaceBytes: Int, measuredPeakBytes: Int, outputBytes: Int,
                relativeError: Double? = nil, errorRows: Int? = nil, maxResidentBytes: Int? = nil,
                speedupVsDense: Double? = nil, memoryVsDense: Double? = nil,
                speedupVsVanilla: Double? = nil, memoryVsVanilla: Double? = nil,
                gbPerSecond: Double? = nil, peakGBPerSecond: Double? = nil, allocationsPerCall: Double? = nil) {
        self.variant = variant
        self.batch = batch
        self.heads = heads
        self.kvHeads = kvHeads
        self.seqQ = seqQ
        self.seqK = seqK
        self.dim = dim
        self.valueDim = valueDim
        self.causal = causal
        self.threads = threads
        self.parameters = parameters
        self.runs = runs
        self.medianSeconds = medianSeconds
        self.minSeconds = minSeconds
        self.flops = flops
        self.scoredPairs = scoredPairs
        self.gflops = Accounting.gflops(flops: flops, seconds: medianSeconds)
        self.peakGflops = peakGflops
        self.workspaceBytes = workspaceBytes
        self.measuredPeakBytes = measuredPeakBytes
        self.outputBytes = outputBytes
        self.relativeError = relativeError
        self.errorRows = errorRows
        self.maxResidentBytes = maxResidentBytes
        self.speedupVsDense = speedupVsDense
        self.memoryVsDense = memoryVsDense
        self.speedupVsVanilla = speedupVsVanilla
        self.memoryVsVanilla = memoryVsVanilla
        self.gbPerSecond = gbPerSecond
        self.peakGBPerSecond = peakGBPerSecond
        self.allocationsPerCall = allocationsPerCall
    }

    /// `gflops` as a percentage of `peakGflops`.
    public var percentOfPeak: Double { Accounting.percentOfPeak(gflops: gflops, peak: peakGflops) }

    /// The problem (shape, causal) and thread count, for matching a record with its baselines.
    public var problemKey: String {
        "\(pass)/\(io)/\(batch)/\(heads)/\(kvHeads)/\(seqQ)/\(seqK)/\(dim)/\(valueDim)/\(causal)/\(threads)"
    }

    /// A value of a record field.
    public enum Field: Equatable, Sendable {
        case string(String)
        case int(Int)
        case double(Double?)
        case bool(Bool)
    }

    /// The record's fields in their fixed order: the JSON keys and the CSV columns.
    public static let fieldNames = [
        "variant", "batch", "heads", "kvHeads", "seqQ", "seqK", "dim", "valueDim", "causal", "threads",
        "parameters", "runs", "medianSeconds", "minSeconds", "flops", "scoredPairs", "gflops", "peakGflops",
        "percentOfPeak", "workspaceBytes", "measuredPeakBytes", "outputBytes", "relativeError",
        "speedupVsDense", "memoryVsDense", "speedupVsVanilla", "memoryVsVanilla",
        "gbPerSecond", "peakGBPerSecond", "errorRows", "maxResidentBytes", "growthPerQuadrupling",
        "allocationsPerCall", "pass", "io",
    ]

    /// Values in ``fieldNames`` order.
    public var fields: [Field] {
        [.string(variant), .int(batch), .int(heads), .int(kvHeads), .int(seqQ), .int(seqK), .int(dim),
         .int(valueDim), .bool(causal), .int(threads), .string(parameters), .int(runs),
         .double(medianSeconds), .double(minSeconds), .double(flops), .int(scoredPairs), .double(gflops),
         .double(peakGflops), .double(percentOfPeak), .int(workspaceBytes), .int(measuredPeakBytes),
         .int(outputBytes), .double(relativeError), .double(speedupVsDense), .double(memoryVsDense),
         .double(speedupVsVanilla), .double(memoryVsVanilla), .double(gbPerSecond), .double(peakGBPerSecond),
         .double(errorRows.map(Double.init)), .double(maxResidentBytes.map(Double.init)),
         .double(growthPerQuadrupling), .double(allocationsPerCall), .string(pass), .string(io)]
    }
}

/// JSON and CSV text of a list of records.
public enum RecordWriter {
    /// A JSON array with one object per record, keys in ``BenchRecord/fieldNames`` order;
    /// missing or non-finite numbers are `null`.
    public static func json(_ records: [BenchRecord]) -> String {
        if records.isEmpty { return "[]\n" }
        var out = "[\n"
        for (r, record) in records.enumerated() {
            let pairs = zip(BenchRecord.fieldNames, record.fields).map { name, field in
                "\"\(name)\": \(jsonValue(field))"
            }
            out += "  {" + pairs.joined(separator: ", ") + "}" + (r + 1 < records.count ? ",\n" : "\n")
        }
        return out + "]\n"
    }

    /// CSV: a header of ``BenchRecord/fieldNames``, then one line per record; missing
    /// numbers are empty cells; text with a comma or quote is quoted.
    public static func csv(_ records: [BenchRecord]) -> String {
        var lines = [BenchRecord.fieldNames.joined(separator: ",")]
        for record in records {
            lines.append(record.fields.map(csvValue).joined(separator: ","))
        }
        return lines.joined(separator: "\n") + "\n"
    }

    static func number(_ value: Double) -> String {
        if value == value.rounded(), abs(value) < 1e15 { return String(Int64(value)) }
        return String(describing: value)
    }

    static func jsonValue(_ field: BenchRecord.Field) -> String {
        switch field {
        case .string(let s): return jsonString(s)
        case .int(let i): return String(i)
        case .bool(let b): return b ? "true" : "false"
        case .double(let d):
            guard let d, d.isFinite else { return "null" }
            return number(d)
        }
    }

    static func jsonString(_ s: String) -> String {
        var out = "\""
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            default:
                if scalar.value < 0x20 {
                    out += String(format: "\\u%04x", scalar.value)
                } else {
                    out.unicodeScalars.append(scalar)
                }
            }
        }
        return out + "\""
    }

    static func csvValue(_ field: BenchRecord.Field) -> String {
        switch field {
        case .string(let s):
            if s.contains(",") || s.contains("\"") || s.contains("\n") {
                return "\"" + s.replacingOccurrences(of: "\"", with: "\"\"") + "\""
            }
            return s
        case .int(let i): return String(i)
        case .bool(let b): return b ? "true" : "false"
        case .double(let d):
            guard let d, d.isFinite else { return "" }
            return number(d)
        }
    }
}
