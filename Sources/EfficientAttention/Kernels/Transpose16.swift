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
    @inline(__always)
    static func transpose(scale s: Vec16, load: (Int) -> Vec16, into out: UnsafeMutablePointer<Float>, ld: Int) {
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
