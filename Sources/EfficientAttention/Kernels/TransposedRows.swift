/// Rows of one head packed transposed, as the micro-kernel's vector operand: routing
/// scores (`C · X̂ᵀ`) and LSH hashes (`Rᵀ Xᵀ`) put positions in SIMD lanes so that the
/// per-position reductions (top-w, argmax over buckets) are vertical.
enum TransposedRows {
    /// Row length for `n` positions: whole micro-kernel panels plus one, so that the `D`
    /// rows the micro-kernel reads are not a power of two apart (cache-set conflicts).
    static func stride(_ n: Int) -> Int { roundUp(n, MicroTile.nr) + MicroTile.nr }

    /// `out[c · ld + i] = x_i[c] · (normalise ? 1 / |x_i| : 1)` for rows `start..<start + count`
    /// of `rows` and `c < depth` (zero rows stay zero). Rows go in blocks of 16 so that every
    /// store fills a whole cache line of an output row.
    static func pack(_ rows: GroupedAttention.Rows, start: Int, count: Int, depth: Int, normalise: Bool,
                     into out: UnsafeMutablePointer<Float>, ld: Int) {
        let es = rows.elementStride
        var factors = SIMD16<Float>(repeating: 1)
        for first in Swift.stride(from: start, to: start + count, by: 16) {
            let block = min(16, start + count - first)
            if normalise {
                for r in 0..<block {
                    let row = rows.row(first + r)
                    let norm = dot(row, es, row, es, count: depth).squareRoot()
                    factors[r] = norm > 0 ? 1 / norm : 0
                }
            }
            for c in 0..<depth {
                let column = out + c * ld + first
                for r in 0..<block { column[r] = rows.row(first + r)[c * es] * factors[r] }
            }
        }
    }

    /// Zeroes columns `n..<ld` of `depth` output rows (the lanes past the last position).
    static func clearTail(_ out: UnsafeMutablePointer<Float>, n: Int, depth: Int, ld: Int) {
        for c in 0..<depth { (out + c * ld + n).update(repeating: 0, count: ld - n) }
    }
}
