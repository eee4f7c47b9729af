// The element type of a `.float16` KV cache (``KVCache/Precision``), and its conversions
// to and from Float for the decode kernel (``CacheScalar``). (`.bfloat16` caches store
// ``BFloat16Bits``, ActivationView.swift; `.int8` caches `Int8`, CacheRows.swift.)
//
// Swift's `Float16` does not exist on Apple x86-64 (Intel Macs and Mac Catalyst on Intel:
// the standard library marks it unavailable there), so the cache stores `HalfElement`:
// `Float16` wherever the standard library has it (Linux, Apple arm64, Windows), the
// software type `SoftHalf` with the same bits and the same round-to-nearest-even
// conversions on Apple x86-64. The `#if` below is the only place that tells them apart;
// on Linux the cache and the kernels compile to exactly the code they had when they named
// `Float16` directly.

#if (os(macOS) || targetEnvironment(macCatalyst)) && arch(x86_64)
/// Storage type of `.float16` caches: `SoftHalf` (no `Float16` on Apple x86-64).
typealias HalfElement = SoftHalf
#else
/// Storage type of `.float16` caches: the standard library's `Float16`.
typealias HalfElement = Float16

extension Float16: CacheScalar {
    @inline(__always) static func wide16(_ p: UnsafePointer<Float16>) -> Vec16 {
        let h = UnsafeRawPointer(p).loadUnaligned(as: SIMD16<Float16>.self)
        // A lane loop, not `SIMD16<Float>(h)`: the loop compiles to one vcvtph2ps, the
        // generic initialiser to an out-of-line call.
        var r = Vec16()
        for i in 0..<16 { r[i] = Float(h[i]) }
        return r
    }
    @inline(__always) static func widen(_ x: Float16) -> Float { Float(x) }

    /// `out[c] = Float16(x[c · stride])` for `c < count`, rounding to nearest, 16 lanes
    /// at a time when `stride == 1` (one vcvtps2ph per 16 lanes with F16C).
    static func narrow(_ x: UnsafePointer<Float>, stride: Int, into out: UnsafeMutablePointer<Float16>, count: Int) {
        var c = 0
        if stride == 1 {
            while c + 16 <= count {
                let v = load16(x + c)
                var h = SIMD16<Float16>()
                for i in 0..<16 { h[i] = Float16(v[i]) }
                UnsafeMutableRawPointer(out + c).storeBytes(of: h, as: SIMD16<Float16>.self)
                c += 16
            }
        }
        while c < count { out[c] = Float16(x[c * stride]); c += 1 }
    }
}
#endif

/// An IEEE 754 binary16 value in software: 1 sign bit, 5 exponent bits (bias 15), 10
/// fraction bits, stored as its bit pattern. The cache's element type on Apple x86-64,
/// where Swift has no `Float16`; compiled (and tested against `Float16`, bit for bit)
/// everywhere.
///
/// Conversions match the hardware ones (F16C's `vcvtps2ph` / `vcvtph2ps`, arm64's
/// `fcvt`): Float → half rounds to nearest, ties to even, with overflow to ±infinity and
/// gradual underflow to subnormals and ±0; half → Float is exact. A NaN keeps its sign and
/// the upper bits of its payload and comes out quiet.
struct SoftHalf: Equatable, Sendable {
    /// The binary16 bit pattern.
    var bits: UInt16

    init(bits: UInt16) { self.bits = bits }

    /// `x` rounded to the nearest binary16 value, ties to even.
    /// - Complexity: O(1), integer operations only.
    init(_ x: Float) {
        let pattern = x.bitPattern
        let sign = UInt16(truncatingIfNeeded: pattern >> 16) & 0x8000
        let exponent = Int(pattern >> 23 & 0xFF)
        let fraction = pattern & 0x7F_FFFF
        if exponent == 0xFF {   // infinity, or NaN: quiet, with the payload's upper 9 bits
            bits = sign | 0x7C00 | (fraction == 0 ? 0 : 0x200 | UInt16(fraction >> 13))
            return
        }
        let halfExponent = exponent - 127 + 15
        if halfExponent >= 0x1F { bits = sign | 0x7C00; return }   // |x| ≥ 2^16: infinity
        // Bits of the 24-bit significand that binary16 drops: 13 for a normal result, more
        // for a subnormal one. Beyond 24 even the leading bit is gone (|x| < 2^-25, which
        // includes Float's own subnormals): ±0.
        let dropped = halfExponent > 0 ? 13 : 14 - halfExponent
        guard dropped <= 24 else { bits = sign; return }
        let significand = fraction | 0x80_0000
        var magnitude = halfExponent > 0
            ? UInt32(halfExponent) << 10 | fraction >> 13
            : significand >> dropped
        let rest = significand & ((1 << dropped) - 1), halfway = UInt32(1) << (dropped - 1)
        // Rounding up may carry into the exponent: the largest subnormal becomes the
        // smallest normal, 65520 and above become infinity, as they should.
        if rest > halfway || (rest == halfway && magnitude & 1 == 1) { magnitude += 1 }
        bits = sign | UInt16(magnitude)
    }

    /// The value as a Float (exact).
    /// - Complexity: O(1).
    var float: Float {
        let sign = UInt32(bits & 0x8000) << 16
        let exponent = UInt32(bits >> 10 & 0x1F), fraction = UInt32(bits & 0x3FF)
        switch exponent {
        case 0x1F:   // infinity, or NaN made quiet
            return Float(bitPattern: sign | 0x7F80_0000 | fraction << 13 | (fraction == 0 ? 0 : 0x40_0000))
        case 0:      // ±0 or subnormal: fraction · 2^-24, exact in Float
            let magnitude = Float(fraction) * 0x1p-24
            return sign == 0 ? magnitude : -magnitude
        default:
            return Float(bitPattern: sign | (exponent + 127 - 15) << 23 | fraction << 13)
        }
    }
}

extension SoftHalf: CacheScalar {
    @inline(__always) static func wide16(_ p: UnsafePointer<SoftHalf>) -> Vec16 {
        var r = Vec16()
        for i in 0..<16 { r[i] = p[i].float }
        return r
    }
    @inline(__always) static func widen(_ x: SoftHalf) -> Float { x.float }

    /// `out[c] = SoftHalf(x[c · stride])` for `c < count`.
    static func narrow(_ x: UnsafePointer<Float>, stride: Int, into out: UnsafeMutablePointer<SoftHalf>, count: Int) {
        for c in 0..<count { out[c] = SoftHalf(x[c * stride]) }
    }
}

/// The conversions of `.float16` caches, for tests: the software binary16 type and the
/// cache's element type (`Float16` where it exists), each through the paths the cache and
/// the decode kernel use.
@_spi(Testing) public enum HalfConversions {
    /// `x` rounded to binary16 by the software conversion, as a bit pattern.
    public static func softwareBits(_ x: Float) -> UInt16 { SoftHalf(x).bits }

    /// The binary16 bit pattern `bits` as a Float, by the software conversion.
    public static func softwareFloat(bits: UInt16) -> Float { SoftHalf(bits: bits).float }

    /// `values` rounded to binary16 the way a `.float16` cache stores appended rows
    /// (16 lanes at a time, then one by one), as bit patterns.
    public static func cacheBits(_ values: [Float]) -> [UInt16] {
        var bits = [UInt16](repeating: 0, count: values.count)
        values.withUnsafeBufferPointer { source in
            bits.withUnsafeMutableBytes { target in
                guard let x = source.baseAddress, let out = target.baseAddress else { return }
                HalfElement.narrow(x, stride: 1, into: out.bindMemory(to: HalfElement.self, capacity: values.count),
                                   count: values.count)
            }
        }
        return bits
    }

    /// The binary16 bit patterns `bits` as Floats, the way the decode kernel widens a
    /// `.float16` cache row (16 lanes at a time, then one by one).
    public static func cacheFloats(bits: [UInt16]) -> [Float] {
        var values = [Float](repeating: 0, count: bits.count)
        bits.withUnsafeBytes { source in
            values.withUnsafeMutableBufferPointer { target in
                guard let row = source.baseAddress, let out = target.baseAddress else { return }
                let rows = CacheRows(base: row.bindMemory(to: HalfElement.self, capacity: bits.count),
                                     batchStride: 0, headStride: 0, rowStride: bits.count)
                rows.pack(b: 0, h: 0, start: 0, count: 1, width: bits.count, into: out, ld: bits.count)
            }
        }
        return values
    }
}
