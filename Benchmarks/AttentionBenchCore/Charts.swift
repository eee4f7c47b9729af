import Foundation

/// One line of a chart.
public struct ChartSeries: Equatable, Sendable {
    public var name: String
    public var points: [Point]
    public var dashed: Bool
    public var color: String

    public struct Point: Equatable, Sendable {
        public var x: Double
        public var y: Double
        public init(x: Double, y: Double) { self.x = x; self.y = y }
    }

    public init(name: String, points: [Point], dashed: Bool = false, color: String) {
        self.name = name
        self.points = points
        self.dashed = dashed
        self.color = color
    }
}

/// A log-log line chart written as a standalone SVG document (no dependencies).
///
/// Structure (what the tests and scripts can rely on): one `<g class="series"
/// data-series="NAME">` per series holding a `<polyline>` (when it has two or more
/// points) and one `<circle>` marker per point with a `<title>` tooltip; a
/// `<g class="legend">` with one `<text>` per series; axis tick labels; axis titles;
/// a title. Points with a non-positive coordinate cannot be drawn on log axes and are left out.
public struct LogLogChart: Sendable {
    public var title: String
    public var xLabel: String
    public var yLabel: String
    public var series: [ChartSeries]
    public var xFormat: @Sendable (Double) -> String
    public var yFormat: @Sendable (Double) -> String
    /// Extra line under the title (e.g. what solid and dashed mean).
    public var subtitle: String

    public var width = 960.0
    public var height = 600.0

    public init(title: String, subtitle: String = "", xLabel: String, yLabel: String, series: [ChartSeries],
                xFormat: @escaping @Sendable (Double) -> String, yFormat: @escaping @Sendable (Double) -> String) {
        self.title = title
        self.subtitle = subtitle
        self.xLabel = xLabel
        self.yLabel = yLabel
        self.series = series
        self.xFormat = xFormat
        self.yFormat = yFormat
    }

    /// Tick values for a log axis over `[lo, hi]` (positive): the data's own x values
    /// when `preferred` is given and short, else 1-2-5 steps per decade (only powers of
    /// ten when that gives more than 12, all 1..9 multiples when it gives fewer than 3).
    public static func logTicks(lo: Double, hi: Double, preferred: [Double] = []) -> [Double] {
        let inRange = preferred.filter { $0 >= lo * 0.999 && $0 <= hi * 1.001 }
        if !inRange.isEmpty && inRange.count <= 12 { return inRange.sorted() }
        func steps(_ mantissas: [Double]) -> [Double] {
            var ticks: [Double] = []
            var decade = pow(10, floor(log10(lo)))
            while decade <= hi * 1.001 {
                for m in mantissas {
                    let v = m * decade
                    if v >= lo * 0.999 && v <= hi * 1.001 { ticks.append(v) }
                }
                decade *= 10
            }
            return ticks
        }
        var ticks = steps([1, 2, 5])
        if ticks.count > 12 { ticks = steps([1]) }
        if ticks.count < 3 { ticks = steps([1, 2, 3, 4, 5, 6, 7, 8, 9]) }
        return ticks
    }

    /// The SVG document.
    public func svg() -> String {
        let left = 100.0, right = 270.0, top = 70.0, bottom = 80.0
        let plotW = width - left - right, plotH = height - top - bottom
        let drawn = series.map { s in
            ChartSeries(name: s.name, points: s.points.filter { $0.x > 0 && $0.y > 0 && $0.x.isFinite && $0.y.isFinite },
                        dashed: s.dashed, color: s.color)
        }
        let xs = drawn.flatMap { $0.points.map(\.x) }, ys = drawn.flatMap { $0.points.map(\.y) }
        func range(_ v: [Double]) -> (Double, Double) {
            guard var lo = v.min(), var hi = v.max() else { return (1, 10) }
            if hi / lo < 1.5 { lo /= 1.5; hi *= 1.5 }
            let pad = pow(hi / lo, 0.05)
            return (lo / pad, hi * pad)
        }
        let (x0, x1) = range(xs), (y0, y1) = range(ys)
        func px(_ x: Double) -> Double { left + plotW * (log10(x) - log10(x0)) / (log10(x1) - log10(x0)) }
        func py(_ y: Double) -> Double { top + plotH * (1 - (log10(y) - log10(y0)) / (log10(y1) - log10(y0))) }
        func f(_ v: Double) -> String { String(format: "%.1f", v) }

        var s: [String] = []
        s.append("<?xml version=\"1.0\" encoding=\"UTF-8\"?>")
        s.append("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(Int(width))\" height=\"\(Int(height))\" "
                 + "viewBox=\"0 0 \(Int(width)) \(Int(height))\" font-family=\"sans-serif\" font-size=\"12\">")
        s.append("<title>\(xml(title))</title>")
        s.append("<rect x=\"0\" y=\"0\" width=\"\(Int(width))\" height=\"\(Int(height))\" fill=\"white\"/>")
        s.append("<text class=\"title\" x=\"\(f(left + plotW / 2))\" y=\"28\" text-anchor=\"middle\" font-size=\"17\" "
                 + "font-weight=\"bold\">\(xml(title))</text>")
        if !subtitle.isEmpty {
            s.append("<text class=\"subtitle\" x=\"\(f(left + plotW / 2))\" y=\"48\" text-anchor=\"middle\" "
                     + "fill=\"#555\">\(xml(subtitle))</text>")
        }
        // Grid and ticks.
        s.append("<g class=\"axes\" stroke=\"#ddd\" stroke-width=\"1\">")
        let xTicks = LogLogChart.logTicks(lo: x0, hi: x1, preferred: Array(Set(xs)))
        let yTicks = LogLogChart.logTicks(lo: y0, hi: y1)
        for t in xTicks { s.append("<line x1=\"\(f(px(t)))\" y1=\"\(f(top))\" x2=\"\(f(px(t)))\" y2=\"\(f(top + plotH))\"/>") }
        for t in yTicks { s.append("<line x1=\"\(f(left))\" y1=\"\(f(py(t)))\" x2=\"\(f(left + plotW))\" y2=\"\(f(py(t)))\"/>") }
        s.append("<rect x=\"\(f(left))\" y=\"\(f(top))\" width=\"\(f(plotW))\" height=\"\(f(plotH))\" fill=\"none\" stroke=\"#333\"/>")
        s.append("</g>")
        s.append("<g class=\"ticks\" fill=\"#333\">")
        for t in xTicks {
            s.append("<text class=\"xtick\" x=\"\(f(px(t)))\" y=\"\(f(top + plotH + 18))\" text-anchor=\"middle\">\(xml(xFormat(t)))</text>")
        }
        for t in yTicks {
            s.append("<text class=\"ytick\" x=\"\(f(left - 8))\" y=\"\(f(py(t) + 4))\" text-anchor=\"end\">\(xml(yFormat(t)))</text>")
        }
        s.append("</g>")
        s.append("<text class=\"xlabel\" x=\"\(f(left + plotW / 2))\" y=\"\(f(height - 30))\" text-anchor=\"middle\" "
                 + "font-size=\"14\">\(xml(xLabel))</text>")
        s.append("<text class=\"ylabel\" x=\"24\" y=\"\(f(top + plotH / 2))\" text-anchor=\"middle\" font-size=\"14\" "
                 + "transform=\"rotate(-90 24 \(f(top + plotH / 2)))\">\(xml(yLabel))</text>")
        // Series.
        for d in drawn {
            let dash = d.dashed ? " stroke-dasharray=\"7 4\"" : ""
            s.append("<g class=\"series\" data-series=\"\(xml(d.name))\">")
            let pts = d.points.sorted { $0.x < $1.x }
            if pts.count >= 2 {
                let list = pts.map { "\(f(px($0.x))),\(f(py($0.y)))" }.joined(separator: " ")
                s.append("<polyline points=\"\(list)\" fill=\"none\" stroke=\"\(d.color)\" stroke-width=\"2\"\(dash)/>")
            }
            for p in pts {
                let fill = d.dashed ? "white" : d.color
                s.append("<circle cx=\"\(f(px(p.x)))\" cy=\"\(f(py(p.y)))\" r=\"4\" fill=\"\(fill)\" stroke=\"\(d.color)\" "
                         + "stroke-width=\"1.5\"><title>\(xml("\(d.name): \(xFormat(p.x)) -> \(yFormat(p.y))"))</title></circle>")
            }
            s.append("</g>")
        }
        // Legend.
        s.append("<g class=\"legend\">")
        let lx = left + plotW + 20
        for (i, d) in drawn.enumerated() {
            let y = top + 10 + Double(i) * 20
            let dash = d.dashed ? " stroke-dasharray=\"7 4\"" : ""
            s.append("<line x1=\"\(f(lx))\" y1=\"\(f(y))\" x2=\"\(f(lx + 28))\" y2=\"\(f(y))\" stroke=\"\(d.color)\" stroke-width=\"2\"\(dash)/>")
            s.append("<circle cx=\"\(f(lx + 14))\" cy=\"\(f(y))\" r=\"4\" fill=\"\(d.dashed ? "white" : d.color)\" stroke=\"\(d.color)\"/>")
            s.append("<text x=\"\(f(lx + 36))\" y=\"\(f(y + 4))\">\(xml(d.name))</text>")
        }
        s.append("</g>")
        s.append("</svg>")
        return s.joined(separator: "\n") + "\n"
    }
}

/// Escapes text for XML content and attribute values.
public func xml(_ text: String) -> String {
    var out = ""
    for c in text {
        switch c {
        case "&": out += "&amp;"
        case "<": out += "&lt;"
        case ">": out += "&gt;"
        case "\"": out += "&quot;"
        case "'": out += "&apos;"
        default: out.append(c)
        }
    }
    return out
}

/// The benchmark's two charts, built from its records.
public enum BenchCharts {
    static let palette = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
                          "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39",
                          "#7b4173", "#3182bd", "#e6550d", "#31a354", "#756bb1", "#636363"]

    /// Series label of a record: the variant, plus the settings that differ between the
    /// records (threads, batch, heads, kv-heads, dim, causal), e.g. `dense 1t`.
    public static func seriesLabels(_ records: [BenchRecord]) -> [String] {
        func varies<T: Hashable>(_ key: (BenchRecord) -> T) -> Bool { Set(records.map(key)).count > 1 }
        let t = varies(\.threads), b = varies(\.batch), h = varies(\.heads), kv = varies(\.kvHeads)
        let d = varies(\.dim), c = varies(\.causal)
        return records.map { r in
            var parts = [r.variant]
            if t { parts.append("\(r.threads)t") }
            if b { parts.append("B=\(r.batch)") }
            if h { parts.append("H=\(r.heads)") }
            if kv { parts.append("Hkv=\(r.kvHeads)") }
            if d { parts.append("D=\(r.dim)") }
            if c { parts.append(r.causal ? "causal" : "non-causal") }
            return parts.joined(separator: " ")
        }
    }

    /// Records grouped by series label, in first-appearance order.
    static func grouped(_ records: [BenchRecord]) -> [(label: String, records: [BenchRecord])] {
        let labels = seriesLabels(records)
        var order: [String] = []
        var groups: [String: [BenchRecord]] = [:]
        for (label, r) in zip(labels, records) {
            if groups[label] == nil { order.append(label) }
            groups[label, default: []].append(r)
        }
        return order.map { ($0, groups[$0]!) }
    }

    /// Median time against N, one solid series per conformer configuration.
    public static func timeChart(_ records: [BenchRecord]) -> LogLogChart {
        let series = grouped(records).enumerated().map { i, g in
            ChartSeries(name: g.label, points: g.records.map { .init(x: Double($0.seqQ), y: $0.medianSeconds) },
                        color: palette[i % palette.count])
        }
        return LogLogChart(title: "Attention time vs sequence length", subtitle: subtitle(records),
                           xLabel: "sequence length N (log)", yLabel: "median time per call (log)",
                           series: series, xFormat: { Format.length(Int($0.rounded())) }, yFormat: seconds)
    }

    /// Measured peak heap growth (solid) and the cost model's workspace (dashed,
    /// "(model)") against N.
    public static func memoryChart(_ records: [BenchRecord]) -> LogLogChart {
        var series: [ChartSeries] = []
        for (i, g) in grouped(records).enumerated() {
            let color = palette[i % palette.count]
            series.append(ChartSeries(name: g.label,
                                      points: g.records.map { .init(x: Double($0.seqQ), y: Double($0.measuredPeakBytes)) },
                                      color: color))
            series.append(ChartSeries(name: g.label + " (model)",
                                      points: g.records.map { .init(x: Double($0.seqQ), y: Double($0.workspaceBytes)) },
                                      dashed: true, color: color))
        }
        return LogLogChart(title: "Attention memory vs sequence length",
                           subtitle: subtitle(records) + "; solid: measured heap growth (incl. output), dashed: workspace model",
                           xLabel: "sequence length N (log)", yLabel: "bytes (log)",
                           series: series, xFormat: { Format.length(Int($0.rounded())) }, yFormat: bytesSI)
    }

    static func subtitle(_ records: [BenchRecord]) -> String {
        func one<T: Hashable>(_ key: (BenchRecord) -> T) -> T? {
            let s = Set(records.map(key)); return s.count == 1 ? s.first : nil
        }
        var parts: [String] = []
        if let b = one(\.batch) { parts.append("B=\(b)") }
        if let h = one(\.heads) { parts.append("H=\(h)") }
        if let d = one(\.dim) { parts.append("D=\(d)") }
        if let c = one(\.causal) { parts.append(c ? "causal" : "non-causal") }
        if let t = one(\.threads) { parts.append("\(t) thread\(t == 1 ? "" : "s")") }
        return parts.joined(separator: " ")
    }

    /// `100 µs`, `2 ms`, `1 s`.
    @Sendable public static func seconds(_ v: Double) -> String {
        func g(_ x: Double) -> String { x >= 10 || x == x.rounded() ? String(format: "%.0f", x) : String(format: "%.1f", x) }
        if v >= 1 { return g(v) + " s" }
        if v >= 1e-3 { return g(v * 1e3) + " ms" }
        if v >= 1e-6 { return g(v * 1e6) + " µs" }
        return g(v * 1e9) + " ns"
    }

    /// `500 kB`, `2 MB`, `1 GB` (decimal prefixes, matching the 1-2-5 ticks).
    @Sendable public static func bytesSI(_ v: Double) -> String {
        func g(_ x: Double) -> String { x >= 10 || x == x.rounded() ? String(format: "%.0f", x) : String(format: "%.1f", x) }
        if v >= 1e9 { return g(v / 1e9) + " GB" }
        if v >= 1e6 { return g(v / 1e6) + " MB" }
        if v >= 1e3 { return g(v / 1e3) + " kB" }
        return g(v) + " B"
    }

    /// Writes `time_vs_n.svg` and `memory_vs_n.svg` into `directory` (created if needed);
    /// returns the two paths.
    public static func write(_ records: [BenchRecord], to directory: String) throws -> [String] {
        let fm = FileManager.default
        do {
            try fm.createDirectory(atPath: directory, withIntermediateDirectories: true)
        } catch {
            throw BenchError.failure("cannot create chart directory '\(directory)': \(error.localizedDescription)")
        }
        let url = URL(fileURLWithPath: directory)
        var paths: [String] = []
        for (name, chart) in [("time_vs_n.svg", timeChart(records)), ("memory_vs_n.svg", memoryChart(records))] {
            let path = url.appendingPathComponent(name).path
            try writeText(chart.svg(), to: path)
            paths.append(path)
        }
        return paths
    }
}

/// Writes `text` to `path` as UTF-8, or throws ``BenchError/failure(_:)``.
public func writeText(_ text: String, to path: String) throws {
    do {
        try text.write(toFile: path, atomically: true, encoding: .utf8)
    } catch {
        throw BenchError.failure("cannot write '\(path)': \(error.localizedDescription)")
    }
}
