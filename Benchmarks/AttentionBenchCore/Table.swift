import Foundation

/// Aligned plain-text tables.
public enum TextTable {
    /// Renders `rows` (the first is the header) with columns padded to their widest cell,
    /// separated by two spaces; columns in `rightAligned` are right-aligned. A dashed
    /// rule follows the header. A row with a single cell is printed as is (a note).
    public static func render(_ rows: [[String]], rightAligned: Set<Int>) -> String {
        guard let header = rows.first else { return "" }
        var widths = [Int](repeating: 0, count: header.count)
        for row in rows where row.count == header.count {
            for (c, cell) in row.enumerated() { widths[c] = max(widths[c], cell.count) }
        }
        func line(_ row: [String]) -> String {
            if row.count != header.count { return row.joined(separator: "  ") }
            var parts: [String] = []
            for (c, cell) in row.enumerated() {
                let pad = String(repeating: " ", count: widths[c] - cell.count)
                parts.append(rightAligned.contains(c) ? pad + cell : cell + pad)
            }
            var text = parts.joined(separator: "  ")
            while text.hasSuffix(" ") { text.removeLast() }
            return text
        }
        var lines = [line(header)]
        lines.append(widths.map { String(repeating: "-", count: $0) }.joined(separator: "  "))
        lines += rows.dropFirst().map(line)
        return lines.joined(separator: "\n")
    }
}

/// Number formats used by the table and the charts.
public enum Format {
    /// Bytes with binary prefixes: `0 B`, `512 B`, `3.2 KiB`, `16.0 MiB`, `1.00 GiB`.
    public static func bytes(_ value: Int) -> String {
        let v = Double(value)
        if value < 1024 { return "\(value) B" }
        if v < 1024 * 1024 { return String(format: "%.1f KiB", v / 1024) }
        if v < 1024 * 1024 * 1024 { return String(format: "%.1f MiB", v / 1024 / 1024) }
        return String(format: "%.2f GiB", v / 1024 / 1024 / 1024)
    }

    /// Milliseconds with three significant digits.
    public static func milliseconds(_ seconds: Double) -> String {
        let ms = seconds * 1000
        if ms >= 100 { return String(format: "%.0f", ms) }
        if ms >= 10 { return String(format: "%.1f", ms) }
        if ms >= 1 { return String(format: "%.2f", ms) }
        return String(format: "%.3f", ms)
    }

    /// `2.31x`, or `-` for nil.
    public static func ratio(_ value: Double?) -> String {
        guard let value, value.isFinite else { return "-" }
        return value >= 100 ? String(format: "%.0fx", value) : String(format: "%.2fx", value)
    }

    /// Relative error: `0`, `3.1e-07`, or `-`.
    public static func error(_ value: Double?) -> String {
        guard let value else { return "-" }
        if value == 0 { return "0" }
        if !value.isFinite { return "inf" }
        return String(format: "%.1e", value)
    }

    /// `1K`, `2K`, `1536` for sequence lengths.
    public static func length(_ n: Int) -> String {
        n >= 1024 && n % 1024 == 0 ? "\(n / 1024)K" : String(n)
    }
}

/// The stdout table of a sweep.
public enum ReportTable {
    /// A header line with the parameters every record shares, then one row per record
    /// grouped by sweep point, then the notes (unavailable or skipped conformers) as
    /// `name  note` rows.
    public static func render(_ records: [BenchRecord], notes: [(variant: String, note: String)],
                              peaks: [(threads: Int, gflops: Double)], fma: Bool,
                              bandwidths: [(threads: Int, gbPerSecond: Double)] = []) -> String {
        var out: [String] = []
        if !peaks.isEmpty {
            let list = peaks.map { "\($0.threads) thread\($0.threads == 1 ? "" : "s") \(String(format: "%.1f", $0.gflops))" }
            out.append("FMA peak (measured, \(fma ? "fused multiply-add" : "portable multiply + add"), GFLOP/s): "
                       + list.joined(separator: ", "))
            if !fma {
                out.append("Default (portable) build: add --traits NativeCPU to `swift run` for this CPU's "
                           + "instructions (KernelDocs/Portability.md).")
            }
        }
        if !bandwidths.isEmpty {
            let list = bandwidths.map { "\($0.threads) thread\($0.threads == 1 ? "" : "s") \(String(format: "%.1f", $0.gbPerSecond))" }
            out.append("Read bandwidth (measured, streaming 1 GiB, GB/s): " + list.joined(separator: ", "))
        }
        let decode = records.contains { $0.gbPerSecond != nil }
        func shared<T: Hashable>(_ key: (BenchRecord) -> T) -> T? {
            let values = Set(records.map(key))
            return values.count == 1 ? values.first : nil
        }
        let b = shared(\.batch), h = shared(\.heads), kv = shared(\.kvHeads), d = shared(\.dim)
        let dv = shared(\.valueDim), causal = shared(\.causal)
        let sameLengths = records.allSatisfy { $0.seqQ == $0.seqK }
        var common: [String] = []
        if let b { common.append("B=\(b)") }
        if let h { common.append("H=\(h)") }
        if let kv { common.append("Hkv=\(kv)") }
        if let d { common.append("D=\(d)") }
        if let dv, dv != d { common.append("Dv=\(dv)") }
        if let causal { common.append(causal ? "causal" : "non-causal") }
        if !records.isEmpty { out.append("Problem: " + common.joined(separator: " ") + "; inputs uniform in [-1, 1]") }

        var header = ["variant"]
        if b == nil { header.append("B") }
        if h == nil { header.append("H") }
        if kv == nil { header.append("Hkv") }
        if d == nil { header.append("D") }
        if causal == nil { header.append("causal") }
        header += sameLengths ? ["N"] : ["Nq", "Nk"]
        header += ["thr", "median ms", "min ms", "runs", "GFLOP", "GFLOP/s", "%peak", "workspace",
                   "measured", "meas-out", "rel.err", "x dense", "x vanilla", "mem/dense", "mem/vanilla"]
        if decode { header += ["GB/s", "%bw"] }
        let growth = records.contains { $0.growthPerQuadrupling != nil }
        if growth { header += ["x per 4N", "max RSS"] }
        let counted = records.contains { $0.allocationsPerCall != nil }
        if counted { header.append("allocs") }
        header.append("settings")
        let rightAligned = Set(1..<(header.count - 1))
        var rows = [header]
        var lastGroup: String?
        for r in records {
            let group = "\(r.batch)/\(r.heads)/\(r.dim)/\(r.causal)/\(r.seqQ)/\(r.seqK)/\(r.threads)"
            if let lastGroup, lastGroup != group { rows.append([""]) }
            lastGroup = group
            var row = [r.pass == "forward" ? r.variant : "\(r.variant) \(r.pass)"]
            if b == nil { row.append(String(r.batch)) }
            if h == nil { row.append(String(r.heads)) }
            if kv == nil { row.append(String(r.kvHeads)) }
            if d == nil { row.append(String(r.dim)) }
            if causal == nil { row.append(r.causal ? "yes" : "no") }
            row += sameLengths ? [String(r.seqQ)] : [String(r.seqQ), String(r.seqK)]
            row += [String(r.threads), Format.milliseconds(r.medianSeconds), Format.milliseconds(r.minSeconds),
                    String(r.runs), String(format: "%.2f", r.flops / 1e9), String(format: "%.1f", r.gflops),
                    String(format: "%.1f", r.percentOfPeak), Format.bytes(r.workspaceBytes),
                    Format.bytes(r.measuredPeakBytes), Format.bytes(max(0, r.measuredPeakBytes - r.outputBytes)),
                    Format.error(r.relativeError) + (r.errorRows == nil ? "" : "~"),
                    Format.ratio(r.speedupVsDense), Format.ratio(r.speedupVsVanilla),
                    Format.ratio(r.memoryVsDense), Format.ratio(r.memoryVsVanilla)]
            if decode {
                row += [r.gbPerSecond.map { String(format: "%.1f", $0) } ?? "-",
                        r.gbPerSecond.flatMap { gb in r.peakGBPerSecond.map { String(format: "%.1f", 100 * gb / $0) } } ?? "-"]
            }
            if growth {
                row += [r.growthPerQuadrupling.map { String(format: "%.2f", $0) } ?? "-",
                        r.maxResidentBytes.map(Format.bytes) ?? "-"]
            }
            if counted { row.append(r.allocationsPerCall.map { String(format: "%.0f", $0.rounded(.up)) } ?? "-") }
            row.append(r.parameters.isEmpty ? "-" : r.parameters)
            rows.append(row)
        }
        if !records.isEmpty { out.append(TextTable.render(rows, rightAligned: rightAligned)) }
        if let sampled = records.compactMap(\.errorRows).max() {
            out.append("~ rel.err over \(sampled) evenly spread query rows per head, each exact over all its keys "
                       + "(the full dense reference would cost more than \(String(format: "%.0e", SweepRunner.fullReferenceFlops)) FLOPs)\n")
        }
        if records.contains(where: { $0.allocationsPerCall != nil }) {
            out.append("Timed calls are engine style: borrowed views, output written in place, one reused "
                       + "AttentionWorkspace; allocs = heap allocations per timed call, counted.")
        }
        if !notes.isEmpty {
            if !records.isEmpty { out.append("") }
            let width = notes.map(\.variant.count).max()!
            for n in notes {
                out.append(n.variant.padding(toLength: width, withPad: " ", startingAt: 0) + "  " + n.note)
            }
        }
        return out.joined(separator: "\n") + "\n"
    }
}
