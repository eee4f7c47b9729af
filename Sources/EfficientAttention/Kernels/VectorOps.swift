/// Plain vectorised loops used by the unfused baseline and small helpers.

/// `Σ a[t·sa] · b[t·sb]` for `t < count`, in SIMD16 lanes when both strides are 1.
@inline(__always)
func dot(_ a: UnsafePointer<Float>, _ sa: Int, _ b: UnsafePointer<Float>, _ sb: Int, count: Int) -> Float {
    var t = 0
    var acc = SIMD16<Float>()
    if sa == 1 && sb == 1 {
        while t + 16 <= count {
            let x = UnsafeRawPointer(a + t).loadUnaligned(as: SIMD16<Float>.self)
            let y = UnsafeRawPointer(b + t).loadUnaligned(as: SIMD16<Float>.self)
            multiplyAdd(&acc, x, y)
            t += 16
        }
    }
    var sum = acc.sum()
    while t < count { sum += a[t * sa] * b[t * sb]; t += 1 }
    return sum
}

/// `y[t] += alpha · x[t·sx]` for `t < count` (y contiguous).
@inline(__always)
func axpy(_ alpha: Float, _ x: UnsafePointer<Float>, _ sx: Int, _ y: UnsafeMutablePointer<Float>, count: Int) {
    var t = 0
    if sx == 1 {
        let a = SIMD16<Float>(repeating: alpha)
        while t + 16 <= count {
            var acc = UnsafeRawPointer(y + t).loadUnaligned(as: SIMD16<Float>.self)
            multiplyAdd(&acc, a, UnsafeRawPointer(x + t).loadUnaligned(as: SIMD16<Float>.self))
            UnsafeMutableRawPointer(y + t).storeBytes(of: acc, as: SIMD16<Float>.self)
            t += 16
        }
    }
    while t < count { y[t] += alpha * x[t * sx]; t += 1 }
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
/// `NativeCPU` trait); false in the portable build.
public let fusedMultiplyAddEnabled: Bool = {
#if EA_FMA
    return true
#else
    return false
#endif
}()
