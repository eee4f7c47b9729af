/// Elementwise math on SIMD lanes used by the kernels. `@_spi(Testing)`: the tests check
/// its accuracy over the whole range; callers use it only through the conformers.
@_spi(Testing) public enum VectorMath {
    /// `e^x` on 16 lanes.
    ///
    /// Range reduction by ln 2 (Cody-Waite, two-part constant): `x = n·ln2 + r` with
    /// `|r| <= ln2/2`, then `e^r ≈ 1 + r + r²·P(r)` with the degree-5 minimax polynomial
    /// of Cephes' `expf`, scaled by `2^n` built in the exponent bits (as `2·2^(n−1)`
    /// so that `n = 128` needs no special case).
    ///
    /// - Accuracy: within 2 ulp of the correctly rounded result for
    ///   `-86.6 <= x <= 88.72` (measured over the whole range in the tests).
    /// - Edge cases: `x > 88.72` gives `+infinity`; `x < -86.6` (results below `2^-125`
    ///   ≈ 2.35e-38) gives `0`, so `-infinity` gives exactly 0; NaN stays NaN.
    /// - Complexity: about 15 vector instructions; no table, no branch.
    @inline(__always)
    public static func exp(_ x: SIMD16<Float>) -> SIMD16<Float> { exp16(x) }

    /// ``exp(_:)-(SIMD16<Float>)`` for lanes at most 0 (or NaN): the same bits, with fewer
    /// instructions (the kernels' softmax exponents `s − max`).
    @inline(__always)
    public static func expNonPositive(_ x: SIMD16<Float>) -> SIMD16<Float> { expNonPositive16(x) }

    /// The body of ``exp(_:)-(SIMD16<Float>)``, inlined by the mandatory pass
    /// (`@_transparent`): the optimiser left `@inline(__always)` calls out of line in some
    /// kernels, passing the vector through memory in four pieces.
    @_transparent
    static func exp16(_ x: SIMD16<Float>) -> SIMD16<Float> {
        typealias V = SIMD16<Float>
        var result = expReduced16(clamp(x, V(repeating: expLower), V(repeating: expUpper)))
        result.replace(with: .infinity, where: x .> V(repeating: expUpper))
        result.replace(with: 0, where: x .< V(repeating: expLower))
        result.replace(with: x, where: x .!= x)
        return result
    }

    /// ``exp16(_:)`` for lanes that are at most 0 or NaN, such as a softmax's `s − max`
    /// over a set holding `s`: the same bits, without the upper clamp and the overflow
    /// select (four fewer vector instructions per eight lanes on AVX2).
    @_transparent
    static func expNonPositive16(_ x: SIMD16<Float>) -> SIMD16<Float> {
        typealias V = SIMD16<Float>
        var lowered = x
        lowered.replace(with: V(repeating: expLower), where: x .< V(repeating: expLower))
        var result = expReduced16(lowered)
        result.replace(with: 0, where: x .< V(repeating: expLower))
        result.replace(with: x, where: x .!= x)
        return result
    }

    /// The range limits of ``exp16(_:)``: `e^x` overflows above `expUpper`, and below
    /// `expLower` it is given as 0.
    @_transparent static var expUpper: Float { 88.72283 }
    @_transparent static var expLower: Float { -86.6 }

    /// ``exp16(_:)`` of lanes already within `expLower...expUpper`.
    @_transparent
    static func expReduced16(_ clamped: SIMD16<Float>) -> SIMD16<Float> {
        typealias V = SIMD16<Float>
        // n = round(x / ln2) by the 1.5·2^23 trick; t's low mantissa bits hold n.
        let magic = V(repeating: 12_582_912)
        let t = fused(clamped, V(repeating: 1.442_695_04), magic)
        let n = t - magic
        var r = fused(n, V(repeating: -0.693_359_375), clamped)
        r = fused(n, V(repeating: 2.121_944_4e-4), r)
        var p = V(repeating: 1.987_569_15e-4)
        p = fused(p, r, V(repeating: 1.398_199_95e-3))
        p = fused(p, r, V(repeating: 8.333_451_9e-3))
        p = fused(p, r, V(repeating: 4.166_579_59e-2))
        p = fused(p, r, V(repeating: 1.666_666_55e-1))
        p = fused(p, r, V(repeating: 5.000_000_1e-1))
        let r2 = r * r
        let er = fused(p, r2, r) + V(repeating: 1)
        // 2^(n-1) from the exponent field: (n - 1 + 127) << 23.
        let ni = unsafeBitCast(t, to: SIMD16<Int32>.self) &- SIMD16<Int32>(repeating: 0x4B40_0000)
        let pow2 = unsafeBitCast((ni &+ SIMD16<Int32>(repeating: 126)) &<< 23, to: V.self)
        return (er + er) * pow2
    }

    /// `e^x` for each element of `values`, in place, 16 lanes at a time.
    public static func exp(_ values: inout [Float]) {
        let count = values.count
        values.withUnsafeMutableBufferPointer { buffer in
            guard let p = buffer.baseAddress else { return }
            var t = 0
            while t + 16 <= count {
                let v = UnsafeRawPointer(p + t).loadUnaligned(as: SIMD16<Float>.self)
                UnsafeMutableRawPointer(p + t).storeBytes(of: exp(v), as: SIMD16<Float>.self)
                t += 16
            }
            if t < count {
                var tail = SIMD16<Float>(repeating: 0)
                for l in 0..<(count - t) { tail[l] = p[t + l] }
                let e = exp(tail)
                for l in 0..<(count - t) { p[t + l] = e[l] }
            }
        }
    }
}

/// `a · b + c`, fused under `EA_FMA`.
@inline(__always)
func fused(_ a: SIMD16<Float>, _ b: SIMD16<Float>, _ c: SIMD16<Float>) -> SIMD16<Float> {
    var acc = c
    multiplyAdd(&acc, a, b)
    return acc
}

/// The larger of `a` and `b` per lane (`b` where `a` is NaN). Written with a compare and
/// a blend: the standard library's `pointwiseMax` compiles to a scalar loop.
@inline(__always)
func maximum(_ a: SIMD16<Float>, _ b: SIMD16<Float>) -> SIMD16<Float> {
    var r = a
    r.replace(with: b, where: b .> a)
    return r
}

/// `x` limited to `lo...hi` per lane; NaN lanes stay NaN. Compare-and-blend for the same
/// reason as ``maximum(_:_:)``.
@inline(__always)
func clamp(_ x: SIMD16<Float>, _ lo: SIMD16<Float>, _ hi: SIMD16<Float>) -> SIMD16<Float> {
    var r = x
    r.replace(with: lo, where: x .< lo)
    r.replace(with: hi, where: x .> hi)
    return r
}
