/// Plain vectorised loops used by the unfused baseline and small helpers.

/// Sixteen floats `p[0], p[s], …, p[15·s]`: a row's next sixteen elements whatever its
/// element stride, so that strided rows go through the same vector arithmetic as
/// contiguous ones and give the same bits.
@inline(__always)
func gather16(_ p: UnsafePointer<Float>, _ s: Int) -> SIMD16<Float> {
    if s == 1 { return UnsafeRawPointer(p).loadUnaligned(as: SIMD16<Float>.self) }
    var x = SIMD16<Float>()
    for l in 0..<16 { x[l] = p[l &* s] }
    return x
}

/// `Σ a[t·sa] · b[t·sb]` for `t < count`: SIMD16 lanes over the first `⌊count/16⌋·16`
/// elements, then the rest in order. The same bits for every pair of strides.
@inline(__always)
func dot(_ a: UnsafePointer<Float>, _ sa: Int, _ b: UnsafePointer<Float>, _ sb: Int, count: Int) -> Float {
    var t = 0
    var acc = SIMD16<Float>()
    while t + 16 <= count {
        multiplyAdd(&acc, gather16(a + t &* sa, sa), gather16(b + t &* sb, sb))
        t += 16
    }
    var sum = acc.sum()
    while t < count { sum += a[t * sa] * b[t * sb]; t += 1 }
    return sum
}

/// `y[t·sy] += alpha · x[t·sx]` for `t < count`, the same bits for every `sx` and `sy`.
@inline(__always)
func axpy(_ alpha: Float, _ x: UnsafePointer<Float>, _ sx: Int, _ y: UnsafeMutablePointer<Float>, _ sy: Int = 1,
          count: Int) {
    var t = 0
    let a = SIMD16<Float>(repeating: alpha)
    while t + 16 <= count {
        var acc = gather16(y + t &* sy, sy)
        multiplyAdd(&acc, a, gather16(x + t &* sx, sx))
        if sy == 1 {
            UnsafeMutableRawPointer(y + t).storeBytes(of: acc, as: SIMD16<Float>.self)
        } else {
            for l in 0..<16 { y[(t &+ l) &* sy] = acc[l] }
        }
        t += 16
    }
    while t < count { y[t &* sy] += alpha * x[t &* sx]; t += 1 }
}

/// `acc += a · b`: one fused multiply-add per lane under the `NativeCPU` trait
/// (`EA_FMA`), a separate multiply and add in the portable build.
@inline(__always)
func multiplyAdd(_ acc: inout SIMD16<Float>, _ a: SIMD16<Float>, _ b: SIMD16<Float>) {
#if EA_FMA
    acc.addProduct(a, b)
#else
    acc += a * b
#endif
}

/// True when the library was compiled with fused multiply-add kernels (the default
/// `NativeCPU` trait); false in the portable build. `@_spi(Benchmarking)`, for the
/// benchmark's report header: results do not depend on it beyond rounding.
@_spi(Benchmarking) public let fusedMultiplyAddEnabled: Bool = {
#if EA_FMA
    return true
#else
    return false
#endif
}()

/// The smaller of two `Int`s: the standard library's generic `min`, always inlined. The
/// optimiser inlines the generic one at its discretion and stops inlining into very large
/// functions (the tiled kernels' per-tile specialisations), where each `min` of a loop was a
/// call, and around it every live vector register spilled.
@inline(__always)
func min(_ a: Int, _ b: Int) -> Int { b < a ? b : a }

/// The larger of two `Int`s, always inlined (see ``min(_:_:)``).
@inline(__always)
func max(_ a: Int, _ b: Int) -> Int { b >= a ? b : a }
