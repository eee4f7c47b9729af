import Foundation

/// The process's peak resident set size (Linux: `VmHWM` in /proc/self/status, reset by
/// writing "5" to /proc/self/clear_refs). Elsewhere, or where /proc refuses, `nil`.
public enum ResidentMemory {
    /// Resets the peak to the current resident size.
    static func resetPeak() {
        #if os(Linux)
        if let handle = FileHandle(forWritingAtPath: "/proc/self/clear_refs") {
            try? handle.write(contentsOf: Data("5".utf8))
            try? handle.close()
        }
        #endif
    }

    /// The peak resident size since the last reset, in bytes.
    static func peak() -> Int? {
        #if os(Linux)
        guard let status = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8) else { return nil }
        return peak(status: status)
        #else
        return nil
        #endif
    }

    /// `VmHWM` of a /proc status text, in bytes. The field is `VmHWM:`, a tab, the value in
    /// kB right-aligned with spaces (none from 8 digits on: 10 GB), and ` kB`.
    public static func peak(status: String) -> Int? {
        for line in status.split(separator: "\n") where line.hasPrefix("VmHWM:") {
            let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            guard fields.count >= 2, let kib = Int(fields[1]) else { return nil }
            return kib * 1024
        }
        return nil
    }
}
