// The binary16 conversions of `.float16` caches (Sources/EfficientAttention/HalfPrecision.swift):
// the software type that stands in for Float16 on Apple x86-64 against the cache's element
// type (Float16 here) through the cache's own 16-lane paths, bit for bit: every one of the
// 65536 half bit patterns widened, and Floats narrowed at every rounding tie and its two
// neighbours, subnormals, overflow, infinities and NaNs, plus a spread of other patterns.

@_spi(Testing) import EfficientAttention
import Testing

/// `x` rounded to binary16 and back, as a `.float16` cache stores it: `Float16` where the
/// standard library has it, the library's software conversion on Apple x86-64.
func halfRounded(_ x: Float) -> Float {
#if (os(macOS) || targetEnvironment(macCatalyst)) && arch(x86_64)
    HalfConversions.softwareFloat(bits: HalfConversions.softwareBits(x))
#else
    Float(Float16(x))
#endif
}

/// Float bit patterns with the quiet bit set on NaNs: hardware and library conversions
/// may or may not quieten a signalling NaN; everything else must agree bit for bit.
private func quietened(_ x: Float) -> UInt32 { x.isNaN ? x.bitPattern | 0x40_0000 : x.bitPattern }
private func quietened(half bits: UInt16) -> UInt16 { bits & 0x7C00 == 0x7C00 && bits & 0x3FF != 0 ? bits | 0x200 : bits }

@Suite("Half-precision conversions")
struct HalfPrecisionTests {
    @Test("software half → Float equals the cache's conversion for all 65536 bit patterns")
    func widenEveryPattern() {
        let patterns = (0...UInt16.max).map { $0 }
        let cache = HalfConversions.cacheFloats(bits: patterns)
        var mismatches: [String] = []
        for (i, bits) in patterns.enumerated() {
            let soft = HalfConversions.softwareFloat(bits: bits)
            if quietened(soft) != quietened(cache[i]) {
                mismatches.append("0x\(String(bits, radix: 16)): software \(soft), cache \(cache[i])")
            }
        }
        #expect(mismatches.isEmpty, "\(mismatches.count) patterns differ, first: \(mismatches.prefix(5))")
        // Fixed points of the format, independent of either implementation.
        #expect(HalfConversions.softwareFloat(bits: 0x3C00) == 1)
        #expect(HalfConversions.softwareFloat(bits: 0x7BFF) == 65504)
        #expect(HalfConversions.softwareFloat(bits: 0x0001) == 0x1p-24)
        #expect(HalfConversions.softwareFloat(bits: 0x03FF) == 0x1.FF8p-15)
        #expect(HalfConversions.softwareFloat(bits: 0x8000).bitPattern == (-0.0 as Float).bitPattern)
        #expect(HalfConversions.softwareFloat(bits: 0xFC00) == -.infinity)
        #expect(HalfConversions.softwareFloat(bits: 0x7E00).isNaN)
#if !((os(macOS) || targetEnvironment(macCatalyst)) && arch(x86_64))
        let standard = patterns.filter { quietened(Float(Float16(bitPattern: $0))) != quietened(HalfConversions.softwareFloat(bits: $0)) }
        #expect(standard.isEmpty, "differs from Float(Float16(bitPattern:)) at \(standard.prefix(5))")
#endif
    }

    /// Floats around every rounding boundary: for each pair of adjacent finite halves (and
    /// the largest one and the overflow threshold 65520), the midpoint and its neighbours,
    /// both signs; the halves themselves; Float subnormals, tiny and huge values,
    /// infinities, NaNs with assorted payloads; and a spread of 2^20 other bit patterns.
    static func narrowingSweep() -> [Float] {
        var values: [Float] = []
        for bits in UInt16(0)..<0x7C00 {
            let low = HalfConversions.softwareFloat(bits: bits)
            let high = bits == 0x7BFF ? 65536 : HalfConversions.softwareFloat(bits: bits + 1)
            let middle = (low + high) / 2   // exact: halves have 11 significant bits
            for x in [low, middle.nextDown, middle, middle.nextUp] { values += [x, -x] }
        }
        values += [.leastNonzeroMagnitude, .leastNormalMagnitude, .greatestFiniteMagnitude, 0x1p-25, 0x1p-26,
                   0x1.000002p-25, 0x1.fffffep-26, 65519.996, 65520, 65536, 1e10, .infinity, .nan, .signalingNaN,
                   Float(bitPattern: 0x7F80_0001), Float(bitPattern: 0x7F80_2000), Float(bitPattern: 0x7FBF_FFFF),
                   Float(bitPattern: 0x7FC0_1FFF), Float(bitPattern: 0x7FFF_E000)].flatMap { [$0, -$0] }
        var pattern: UInt32 = 0x9E37_79B9
        for _ in 0..<(1 << 20) {   // 2^20 patterns 4099 apart: about once around all 2^32
            pattern &+= 0x0000_1003
            values.append(Float(bitPattern: pattern))
        }
        return values
    }

    @Test("software Float → half equals the cache's conversion at every tie, subnormals, overflow, NaN")
    func narrowSweep() {
        let values = Self.narrowingSweep()
        let cache = HalfConversions.cacheBits(values)
        var mismatches: [String] = []
        for (i, x) in values.enumerated() {
            let soft = HalfConversions.softwareBits(x)
            if quietened(half: soft) != quietened(half: cache[i]) {
                mismatches.append("\(x) (0x\(String(x.bitPattern, radix: 16))): software 0x\(String(soft, radix: 16)), cache 0x\(String(cache[i], radix: 16))")
            }
        }
        #expect(mismatches.isEmpty, "\(mismatches.count) of \(values.count) differ, first: \(mismatches.prefix(5))")
        // Ties to even, overflow, underflow, independent of either implementation.
        #expect(HalfConversions.softwareBits(1 + 0x1p-11) == 0x3C00)               // tie, even below
        #expect(HalfConversions.softwareBits(1 + 3 * 0x1p-11) == 0x3C02)           // tie, even above
        #expect(HalfConversions.softwareBits(65519.996) == 0x7BFF)
        #expect(HalfConversions.softwareBits(65520) == 0x7C00)
        #expect(HalfConversions.softwareBits(0x1p-25) == 0x0000)                   // tie to even zero
        #expect(HalfConversions.softwareBits(0x1.000002p-25) == 0x0001)
        #expect(HalfConversions.softwareBits(-0x1p-26) == 0x8000)
        #expect(HalfConversions.softwareBits(0x1.FFCp-15) == 0x0400)               // tie above the largest subnormal: even, the smallest normal
        #expect(HalfConversions.softwareBits(.signalingNaN) & 0x7E00 == 0x7E00)    // NaN, quiet
#if !((os(macOS) || targetEnvironment(macCatalyst)) && arch(x86_64))
        let standard = values.filter { quietened(half: Float16($0).bitPattern) != quietened(half: HalfConversions.softwareBits($0)) }
        #expect(standard.isEmpty, "differs from Float16(_:) at \(standard.prefix(5))")
#endif
    }
}
