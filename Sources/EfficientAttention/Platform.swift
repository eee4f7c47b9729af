// The one file of the library that imports the C library. Every other file calls the
// module-internal wrappers below, which carry the C names they wrap (a declaration of this
// module shadows an imported one of the same signature, and the C library is imported
// nowhere else), so call sites read as plain C math and a new platform is one `#elseif`
// here. Each wrapper is `@inline(__always)` and calls exactly the C function of the same
// name: results are bitwise what the call sites computed when they imported the C library
// themselves.
//
// Platforms (Package.swift's `platforms:`): Linux needs nothing beyond the C library. On
// Apple platforms the floor is set by `Float16` (macOS 11 / iOS 14 on arm64; absent on
// x86-64 Macs, where HalfPrecision.swift substitutes a software type); the package
// declares macOS 13 / iOS 16 (and the tvOS, watchOS, visionOS releases of that year) to
// leave a margin for standard-library API it has not been compiled against on those
// systems. Nothing in the library needs Synchronization, Span or other newer API.

// Single precision (kernels: softmax rescaling, log-sum-exp, feature maps): `expf`, `logf`.
// Double precision (set-up: random draws, sinusoid tables): `log`, `pow`, `sin`, `cos`.
#if canImport(Glibc)
import Glibc
@inline(__always) func expf(_ x: Float) -> Float { Glibc.expf(x) }
@inline(__always) func logf(_ x: Float) -> Float { Glibc.logf(x) }
@inline(__always) func log(_ x: Double) -> Double { Glibc.log(x) }
@inline(__always) func pow(_ x: Double, _ y: Double) -> Double { Glibc.pow(x, y) }
@inline(__always) func sin(_ x: Double) -> Double { Glibc.sin(x) }
@inline(__always) func cos(_ x: Double) -> Double { Glibc.cos(x) }
#elseif canImport(Musl)
import Musl
@inline(__always) func expf(_ x: Float) -> Float { Musl.expf(x) }
@inline(__always) func logf(_ x: Float) -> Float { Musl.logf(x) }
@inline(__always) func log(_ x: Double) -> Double { Musl.log(x) }
@inline(__always) func pow(_ x: Double, _ y: Double) -> Double { Musl.pow(x, y) }
@inline(__always) func sin(_ x: Double) -> Double { Musl.sin(x) }
@inline(__always) func cos(_ x: Double) -> Double { Musl.cos(x) }
#elseif canImport(Darwin)
import Darwin
@inline(__always) func expf(_ x: Float) -> Float { Darwin.expf(x) }
@inline(__always) func logf(_ x: Float) -> Float { Darwin.logf(x) }
@inline(__always) func log(_ x: Double) -> Double { Darwin.log(x) }
@inline(__always) func pow(_ x: Double, _ y: Double) -> Double { Darwin.pow(x, y) }
@inline(__always) func sin(_ x: Double) -> Double { Darwin.sin(x) }
@inline(__always) func cos(_ x: Double) -> Double { Darwin.cos(x) }
#else
#error("EfficientAttention: no C library module (Glibc, Musl or Darwin) for this platform")
#endif

// MARK: Memory

/// Asks the kernel to back `[start, start + byteCount)` with transparent huge pages
/// (`madvise(MADV_HUGEPAGE)` on Linux, best effort: a refusal is ignored); nothing
/// elsewhere.
@inline(__always) func markHugePages(_ start: UnsafeMutableRawPointer, byteCount: Int) {
#if os(Linux)
    _ = madvise(start, byteCount, MADV_HUGEPAGE)
#endif
}

/// Advises the kernel to back the whole 2 MiB pages inside `[base, base + byteCount)` with
/// transparent huge pages (Linux; a no-op elsewhere and for regions under 4 MiB).
func adviseHugePages(_ base: UnsafeMutableRawPointer, byteCount: Int) {
#if os(Linux)
    let huge = 2 << 20
    guard byteCount >= 2 * huge else { return }
    let start = (Int(bitPattern: base) + huge - 1) / huge * huge
    let end = (Int(bitPattern: base) + byteCount) / huge * huge
    guard end > start, let aligned = UnsafeMutableRawPointer(bitPattern: start) else { return }
    markHugePages(aligned, byteCount: end - start)
#endif
}
