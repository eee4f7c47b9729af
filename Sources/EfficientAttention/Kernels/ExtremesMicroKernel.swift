/// The running maximum and minimum of each of `NR` lanes over a sequence of rows, with the
/// index of the first row holding each (LSH hashing's argmax over `[x R ; −x R]`, with
/// positions in lanes).
struct LaneExtremes {
    var high0 = Vec16(repeating: -.infinity), high1 = Vec16(repeating: -.infinity)
    var low0 = Vec16(repeating: .infinity), low1 = Vec16(repeating: .infinity)
    var highAt0 = SIMD16<Int32>(), highAt1 = SIMD16<Int32>()
    var lowAt0 = SIMD16<Int32>(), lowAt1 = SIMD16<Int32>()
    /// Index of the next ``microKernelExtremes(depth:a:b:ldb:scan:)`` call's row 0.
    var column: Int32 = 0

    /// Takes row `index` (lanes `0..<16` in `v0`, `16..<32` in `v1`): a strictly larger
    /// (smaller) value replaces the maximum (minimum) and its index, so the first stays.
    @inline(__always)
    mutating func take(_ v0: Vec16, _ v1: Vec16, at index: Int32) {
        let i = SIMD16<Int32>(repeating: index)
        var up = v0 .> high0, down = v0 .< low0
        high0.replace(with: v0, where: up); highAt0.replace(with: i, where: up)
        low0.replace(with: v0, where: down); lowAt0.replace(with: i, where: down)
        up = v1 .> high1; down = v1 .< low1
        high1.replace(with: v1, where: up); highAt1.replace(with: i, where: up)
        low1.replace(with: v1, where: down); lowAt1.replace(with: i, where: down)
    }
}

/// The micro-kernel fused with a column scan (a fused kernel beside the plain
/// ``microKernel(depth:a:b:ldb:c:ldc:update:)``, as BLIS keeps its fused kernels apart from
/// GEMM): the `8 × 32` product `A · B` (``MicroTile``'s operands) is not stored; its rows
/// `0..<MR`, in order, update the running extremes of each of the `NR` columns
/// (``LaneExtremes/take(_:_:at:)`` with indices `scan.column + r`). A short `A` repeats its
/// last row, which never changes the first extremes.
///
/// - Complexity: `2 · 8 · 32 · depth` FLOPs and `8 · 32` comparisons.
@inline(never)
func microKernelExtremes(depth: Int, a: BroadcastOperand, b: UnsafePointer<Float>, ldb: Int,
                         scan: inout LaneExtremes) {
    let p = MicroTileProduct(depth: depth, a: a, b: b, ldb: ldb)
    var e = scan
    let column = e.column
    e.take(p.c00, p.c01, at: column); e.take(p.c10, p.c11, at: column &+ 1)
    e.take(p.c20, p.c21, at: column &+ 2); e.take(p.c30, p.c31, at: column &+ 3)
    e.take(p.c40, p.c41, at: column &+ 4); e.take(p.c50, p.c51, at: column &+ 5)
    e.take(p.c60, p.c61, at: column &+ 6); e.take(p.c70, p.c71, at: column &+ 7)
    scan = e
}
