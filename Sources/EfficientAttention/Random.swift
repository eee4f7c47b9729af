/// A small, fast, seeded random number generator (xoshiro256**, seeded through
/// SplitMix64). Every random choice in the library (BigBird blocks, LSH rotations,
/// FAVOR+ features, k-means initialisation) comes from one of these, so results are
/// reproducible across runs and platforms.
///
/// Not public API (`@_spi(Benchmarking)`, for the tests and the benchmark, which make
/// their data with it). Users never need the generator itself: every conformer owns its
/// randomness through a `seed` in its configuration, and each random choice can be replaced
/// by explicit arrays (LSH rotations, FAVOR+ features, BigBird's random blocks, routing
/// centroids; ATTENTION_SPEC.md, "Randomness"), while ``Tensor/random(shape:seed:)`` makes
/// reproducible inputs. Keeping it out of the API leaves the stream free to change.
@_spi(Benchmarking) public struct SeededGenerator: RandomNumberGenerator, Sendable {
    private var s0, s1, s2, s3: UInt64

    public init(seed: UInt64) {
        var x = seed
        func splitMix() -> UInt64 {
            x &+= 0x9E37_79B9_7F4A_7C15
            var z = x
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
            z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
        s0 = splitMix(); s1 = splitMix(); s2 = splitMix(); s3 = splitMix()
    }

    public mutating func next() -> UInt64 {
        let result = ((s1 &* 5) << 7 | (s1 &* 5) >> 57) &* 9
        let t = s1 << 17
        s2 ^= s0; s3 ^= s1; s1 ^= s2; s0 ^= s3
        s2 ^= t
        s3 = (s3 << 45) | (s3 >> 19)
        return result
    }

    /// Uniform in `[0, 1)` with 24 random bits.
    public mutating func nextUnitFloat() -> Float {
        Float(next() >> 40) * 0x1p-24
    }

    /// Uniform in `range`.
    public mutating func nextFloat(in range: ClosedRange<Float>) -> Float {
        range.lowerBound + (range.upperBound - range.lowerBound) * nextUnitFloat()
    }

    /// Standard normal (Box-Muller on 53-bit uniforms).
    public mutating func nextGaussian() -> Double {
        let u1 = (Double(next() >> 11) + 1) * 0x1p-53   // (0, 1]
        let u2 = Double(next() >> 11) * 0x1p-53
        return (-2 * log(u1)).squareRoot() * cos(2 * Double.pi * u2)
    }
}

