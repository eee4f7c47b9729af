/// The running maximum and minimum of each of 16 lanes over a sequence of rows, with the
/// index of the first row holding each.
struct HalfExtremes {
    var high = Vec16(repeating: -.infinity), low = Vec16(repeating: .infinity)
    var highAt = SIMD16<Int32>(), lowAt = SIMD16<Int32>()

    /// Takes row `index`: a strictly larger (smaller) value replaces the maximum (minimum)
    /// and its index, so the first stays.
    @inline(__always)
    mutating func take(_ v: Vec16, at index: Int32) {
        let i = SIMD16<Int32>(repeating: index)
        let up = v .> high, down = v .< low
        high.replace(with: v, where: up); highAt.replace(with: i, where: up)
        low.replace(with: v, where: down); lowAt.replace(with: i, where: down)
    }
}

/// The running maximum and minimum of each of `NR` lanes over a sequence of rows, with the
/// index of the first row holding each (LSH hashing's argmax over `[x R ; −x R]`, with
/// positions in lanes): lanes `0..<16` in `lanes0`, `16..<32` in `lanes1`, independent.
struct LaneExtremes {
    var lanes0 = HalfExtremes(), lanes1 = HalfExtremes()
    /// Index of the next ``microKernelExtremes(depth:a:b:ldb:scan:)`` call's row 0.
    var column: Int32 = 0
}

/// The micro-kernel fused with a column scan (a fused kernel beside the plain
/// ``microKernel(depth:a:b:ldb:c:ldc:update:)``, as BLIS keeps its fused kernels apart from
/// GEMM): the `8 × 32` product `A · B` (``MicroTile``'s operands) is not stored; its rows
/// `0..<MR`, in order, update the running extremes of each of the `NR` columns
/// (``HalfExtremes/take(_:at:)`` with indices `scan.column + r`). A short `A` repeats its
/// last row, which never changes the first extremes.
///
/// - Complexity: `2 · 8 · 32 · depth` FLOPs and `8 · 32` comparisons.
@inline(never)
func microKernelExtremes(depth: Int, a: BroadcastOperand, b: UnsafePointer<Float>, ldb: Int,
                         scan: inout LaneExtremes) {
    var e = scan
    let column = e.column
    if MicroTile.splitsRegisterTile {
        // Quarters (``MicroTile/splitsRegisterTile``): each column half takes rows 0..<8 in
        // order, as the whole tile does; the halves' lanes are independent. Written as a
        // loop over one `lanes` value: a `HalfExtremes` method taking a whole quarter, or a
        // nested function updating `e`, was left a call per quarter by the optimiser (and
        // the nested function boxed `e` on the heap).
        var lanes = e.lanes0
        for half in 0..<2 {
            for r0 in 0..<2 {
                let q = MicroQuarterProduct(depth: depth, a: a, firstRow: 4 &* r0, b: b + 16 &* half, ldb: ldb)
                let at = column &+ 4 &* Int32(truncatingIfNeeded: r0)
                lanes.take(q.c0, at: at); lanes.take(q.c1, at: at &+ 1)
                lanes.take(q.c2, at: at &+ 2); lanes.take(q.c3, at: at &+ 3)
            }
            if half == 0 { e.lanes0 = lanes; lanes = e.lanes1 } else { e.lanes1 = lanes }
        }
        scan = e
        return
    }
    let p = MicroTileProduct(depth: depth, a: a, b: b, ldb: ldb)
    var lanes0 = e.lanes0, lanes1 = e.lanes1
    lanes0.take(p.c00, at: column); lanes1.take(p.c01, at: column)
    lanes0.take(p.c10, at: column &+ 1); lanes1.take(p.c11, at: column &+ 1)
    lanes0.take(p.c20, at: column &+ 2); lanes1.take(p.c21, at: column &+ 2)
    lanes0.take(p.c30, at: column &+ 3); lanes1.take(p.c31, at: column &+ 3)
    lanes0.take(p.c40, at: column &+ 4); lanes1.take(p.c41, at: column &+ 4)
    lanes0.take(p.c50, at: column &+ 5); lanes1.take(p.c51, at: column &+ 5)
    lanes0.take(p.c60, at: column &+ 6); lanes1.take(p.c61, at: column &+ 6)
    lanes0.take(p.c70, at: column &+ 7); lanes1.take(p.c71, at: column &+ 7)
    (e.lanes0, e.lanes1) = (lanes0, lanes1)
    scan = e
}
