/// An in-register transpose of a 16 × 16 block of floats, for packing rows into the
/// depth-major (lanes = rows) operands the micro-kernel broadcasts from.
///
/// Four perfect-shuffle stages: each interleaves vector `r` with vector `r + 8`
/// (`lo` takes the low halves, `hi` the high halves). One stage rotates the 8-bit
/// index `(row, column)` of every element by one bit, so four stages swap rows and
/// columns. The compiler lowers each interleave to a two-source permute.
enum Transpose16 {
    typealias Block = (Vec16, Vec16, Vec16, Vec16, Vec16, Vec16, Vec16, Vec16,
                       Vec16, Vec16, Vec16, Vec16, Vec16, Vec16, Vec16, Vec16)

    /// `out[c · ld + r] = scale[r] · rows[r][c]` for `r, c < 16`: the 16 floats starting at
    /// `rows(r)` (r < 16) become column `r` of the 16 rows `out + c · ld`, each row `r`
    /// scaled by its own factor.
    ///
    /// - Complexity: 16 vector loads, 64 permutes, 16 multiplies, 16 vector stores.
    @inline(__always)
    static func transpose(scale s: Vec16, rows: (Int) -> UnsafePointer<Float>,
                          into out: UnsafeMutablePointer<Float>, ld: Int) {
        transpose(scale: s, load: { load16(rows($0)) }, into: out, ld: ld)
    }

    /// ``transpose(scale:rows:into:ld:)`` with row `r`'s 16 values given by `load(r)`.
    /// Without AVX-512 (``MicroTile/splitsRegisterTile``) 16 `SIMD16` rows are 32 registers
    /// and spill, so there the block is four 8 × 8 transposes (``Transpose8``): the same values.
    @inline(__always)
    static func transpose(scale s: Vec16, load: (Int) -> Vec16, into out: UnsafeMutablePointer<Float>, ld: Int) {
        if MicroTile.splitsRegisterTile {
            Transpose8.transpose16(scale: s, load: load, into: out, ld: ld)
        } else {
            transposeWhole(scale: s, load: load, into: out, ld: ld)
        }
    }

    /// ``transpose(scale:load:into:ld:)`` in 16 `SIMD16` registers.
    @inline(__always)
    static func transposeWhole(scale s: Vec16, load: (Int) -> Vec16, into out: UnsafeMutablePointer<Float>, ld: Int) {
        var x: Block = (load(0), load(1), load(2), load(3), load(4), load(5), load(6), load(7),
                        load(8), load(9), load(10), load(11), load(12), load(13), load(14), load(15))
        x = stage(stage(stage(stage(x))))
        store16(s * x.0, out); store16(s * x.1, out + ld)
        store16(s * x.2, out + 2 * ld); store16(s * x.3, out + 3 * ld)
        store16(s * x.4, out + 4 * ld); store16(s * x.5, out + 5 * ld)
        store16(s * x.6, out + 6 * ld); store16(s * x.7, out + 7 * ld)
        store16(s * x.8, out + 8 * ld); store16(s * x.9, out + 9 * ld)
        store16(s * x.10, out + 10 * ld); store16(s * x.11, out + 11 * ld)
        store16(s * x.12, out + 12 * ld); store16(s * x.13, out + 13 * ld)
        store16(s * x.14, out + 14 * ld); store16(s * x.15, out + 15 * ld)
    }

    /// `out[c · ld + r] = scale[r] · rows(r)[c]` for `r < 16` and every `c < depth`: whole
    /// 16-column blocks with ``transpose(scale:rows:into:ld:)``, the last `depth % 16`
    /// columns element by element.
    @inline(__always)
    static func transpose(scale: Vec16, rows: (Int) -> UnsafePointer<Float>, depth: Int,
                          into out: UnsafeMutablePointer<Float>, ld: Int) {
        transpose(Float.self, scale: scale, rows: rows, depth: depth, into: out, ld: ld)
    }

    /// ``transpose(scale:rows:depth:into:ld:)`` for rows of any activation precision,
    /// widened to `Float` as they are loaded.
    @inline(__always)
    static func transpose<E: ActivationScalar>(_: E.Type, scale: Vec16, rows: (Int) -> UnsafePointer<E>, depth: Int,
                                               into out: UnsafeMutablePointer<Float>, ld: Int) {
        var c = 0
        while c + 16 <= depth {
            transpose(scale: scale, load: { E.wide16(rows($0) + c) }, into: out + c &* ld, ld: ld)
            c += 16
        }
        for r in 0..<16 where c < depth {
            let row = rows(r)
            for cc in c..<depth { out[cc &* ld + r] = scale[r] * E.widen(row[cc]) }
        }
    }

    @inline(__always)
    static func stage(_ r: Block) -> Block {
        (lo(r.0, r.8), hi(r.0, r.8), lo(r.1, r.9), hi(r.1, r.9),
         lo(r.2, r.10), hi(r.2, r.10), lo(r.3, r.11), hi(r.3, r.11),
         lo(r.4, r.12), hi(r.4, r.12), lo(r.5, r.13), hi(r.5, r.13),
         lo(r.6, r.14), hi(r.6, r.14), lo(r.7, r.15), hi(r.7, r.15))
    }

    /// `(a0, b0, a1, b1, …, a7, b7)`.
    @inline(__always)
    static func lo(_ a: Vec16, _ b: Vec16) -> Vec16 {
        Vec16(a[0], b[0], a[1], b[1], a[2], b[2], a[3], b[3], a[4], b[4], a[5], b[5], a[6], b[6], a[7], b[7])
    }

    /// `(a8, b8, a9, b9, …, a15, b15)`.
    @inline(__always)
    static func hi(_ a: Vec16, _ b: Vec16) -> Vec16 {
        Vec16(a[8], b[8], a[9], b[9], a[10], b[10], a[11], b[11],
              a[12], b[12], a[13], b[13], a[14], b[14], a[15], b[15])
    }
}

/// An in-register transpose of an 8 × 8 block of floats: the form of a 16 × 16 transpose
/// for CPUs with sixteen 256-bit vector registers (x86-64 without AVX-512), where
/// ``Transpose16``'s 16 `SIMD16` rows are 32 registers and spill. Three stages, each a
/// shuffle the compiler emits as one instruction: interleave pairs of rows within 128-bit
/// halves, interleave pairs of pairs, then swap 128-bit halves.
enum Transpose8 {
    typealias V = SIMD8<Float>
    typealias Block = (V, V, V, V, V, V, V, V)

    /// `out.c[r] = x.r[c]`.
    @inline(__always)
    static func transpose(_ x: Block) -> Block {
        // t: (a0 b0 a1 b1 | a4 b4 a5 b5) and (a2 b2 a3 b3 | a6 b6 a7 b7) per pair of rows.
        let t0 = lo(x.0, x.1), t1 = hi(x.0, x.1), t2 = lo(x.2, x.3), t3 = hi(x.2, x.3)
        let t4 = lo(x.4, x.5), t5 = hi(x.4, x.5), t6 = lo(x.6, x.7), t7 = hi(x.6, x.7)
        // s: (a0 b0 c0 d0 | a4 b4 c4 d4) …
        let s0 = lowPairs(t0, t2), s1 = highPairs(t0, t2), s2 = lowPairs(t1, t3), s3 = highPairs(t1, t3)
        let s4 = lowPairs(t4, t6), s5 = highPairs(t4, t6), s6 = lowPairs(t5, t7), s7 = highPairs(t5, t7)
        return (lowHalves(s0, s4), lowHalves(s1, s5), lowHalves(s2, s6), lowHalves(s3, s7),
                highHalves(s0, s4), highHalves(s1, s5), highHalves(s2, s6), highHalves(s3, s7))
    }

    /// ``Transpose16/transpose(scale:load:into:ld:)`` as four 8 × 8 blocks: the same values.
    /// Each block reads the half of its 8 rows it needs (`load(r)` narrowed to 8 lanes).
    @inline(__always)
    static func transpose16(scale: Vec16, load: (Int) -> Vec16, into out: UnsafeMutablePointer<Float>, ld: Int) {
        for rowHalf in 0..<2 {
            let r0 = rowHalf * 8
            let s = rowHalf == 0 ? scale.lowHalf : scale.highHalf
            for columnHalf in 0..<2 {
                let c0 = columnHalf * 8
                @inline(__always) func half(_ r: Int) -> V {
                    columnHalf == 0 ? load(r0 + r).lowHalf : load(r0 + r).highHalf
                }
                let x = transpose((half(0), half(1), half(2), half(3), half(4), half(5), half(6), half(7)))
                let o = out + c0 &* ld + r0
                store(s * x.0, o); store(s * x.1, o + ld); store(s * x.2, o + 2 &* ld); store(s * x.3, o + 3 &* ld)
                store(s * x.4, o + 4 &* ld); store(s * x.5, o + 5 &* ld); store(s * x.6, o + 6 &* ld)
                store(s * x.7, o + 7 &* ld)
            }
        }
    }

    @inline(__always)
    static func store(_ v: V, _ p: UnsafeMutablePointer<Float>) { UnsafeMutableRawPointer(p).storeBytes(of: v, as: V.self) }

    /// `(a0 b0 a1 b1 | a4 b4 a5 b5)`.
    @inline(__always)
    static func lo(_ a: V, _ b: V) -> V { V(a[0], b[0], a[1], b[1], a[4], b[4], a[5], b[5]) }

    /// `(a2 b2 a3 b3 | a6 b6 a7 b7)`.
    @inline(__always)
    static func hi(_ a: V, _ b: V) -> V { V(a[2], b[2], a[3], b[3], a[6], b[6], a[7], b[7]) }

    /// `(a0 a1 b0 b1 | a4 a5 b4 b5)`.
    @inline(__always)
    static func lowPairs(_ a: V, _ b: V) -> V { V(a[0], a[1], b[0], b[1], a[4], a[5], b[4], b[5]) }

    /// `(a2 a3 b2 b3 | a6 a7 b6 b7)`.
    @inline(__always)
    static func highPairs(_ a: V, _ b: V) -> V { V(a[2], a[3], b[2], b[3], a[6], a[7], b[6], b[7]) }

    /// `(a0 a1 a2 a3 | b0 b1 b2 b3)`.
    @inline(__always)
    static func lowHalves(_ a: V, _ b: V) -> V { V(a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]) }

    /// `(a4 a5 a6 a7 | b4 b5 b6 b7)`.
    @inline(__always)
    static func highHalves(_ a: V, _ b: V) -> V { V(a[4], a[5], a[6], a[7], b[4], b[5], b[6], b[7]) }
}

/// Both forms of the 16 × 16 register transpose, for the tests: a CPU's kernels run only one
/// of them (``Transpose16/transpose(scale:load:into:ld:)``), so the tests compare the two on
/// every CPU.
@_spi(Testing) public enum RegisterTranspose {
    /// `out[c · 16 + r] = scale[r] · block[r · 16 + c]` for the row-major 16 × 16 `block`, by
    /// four 8 × 8 transposes (`quadrants`) or in 16 `SIMD16` registers; nil unless `block`
    /// holds 256 values.
    public static func transpose(_ block: [Float], scale: SIMD16<Float>, quadrants: Bool) -> [Float]? {
        guard block.count == 256 else { return nil }
        var out = [Float](repeating: 0, count: 256)
        block.withUnsafeBufferPointer { rows in
            out.withUnsafeMutableBufferPointer { o in
                let load = { (r: Int) in load16(rows.baseAddress! + r * 16) }
                if quadrants {
                    Transpose8.transpose16(scale: scale, load: load, into: o.baseAddress!, ld: 16)
                } else {
                    Transpose16.transposeWhole(scale: scale, load: load, into: o.baseAddress!, ld: 16)
                }
            }
        }
        return out
    }
}
