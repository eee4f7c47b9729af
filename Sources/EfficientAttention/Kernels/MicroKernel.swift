/// The register-tiled micro-kernel shared by every GEMM-shaped loop in the library.
///
/// Contract (see KernelDocs/MicroKernels.md):
///
///     C[r, 0..<NR] = rowScale[r] · C[r, 0..<NR]   (or 0, or C unchanged)
///                  + Σ_{k < depth} A[r, k] · B[k, 0..<NR]        for r < MR
///
/// - `A[r, k] = a[r · rowStride + k · depthStride]` (``BroadcastOperand``): each value is
///   broadcast to all lanes. Packed panels are depth-major (`rowStride = 1`,
///   `depthStride = MR`); keys are read in place (`rowStride` = the key tensor's row
///   stride, `depthStride` = its element stride).
/// - `B` rows are `NR` contiguous floats: `B[k, c] = b[k · ldb + c]`.
/// - `C` rows are `NR` contiguous floats: `C[r, c] = c[r · ldc + c]`.
/// - Edges: a short `A` (fewer than `MR` rows) repeats its last row; `B` and `C` are
///   padded by the caller to whole `NR`-wide rows, so every call runs the same full tile.
/// - ``MicroKernelUpdate/extremes(_:)`` scans the rows of `A·B` instead of storing them
///   (a repeated last row never changes the first extremes).
///
/// `MR × NR = 8 × 32` keeps 16 SIMD16 accumulators (16 of the 32 AVX-512 registers)
/// plus two `B` vectors and one broadcast in registers; one depth step is 16 fused
/// multiply-adds against 2 vector loads and 8 broadcasts.
enum MicroTile {
    /// Rows of `C` per call (broadcast operand).
    static let mr = 8
    /// Columns of `C` per call (vector operand): two SIMD16 vectors.
    static let nr = 32
}

/// How the micro-kernel combines its product with what `C` holds.
enum MicroKernelUpdate {
    /// `C = A·B`.
    case overwrite
    /// `C = C + A·B`.
    case accumulate
    /// `C = diag(scale) · C + A·B`, `scale` pointing at `MR` row factors.
    case scaleAndAccumulate(UnsafePointer<Float>)
    /// `C` is not touched: rows `0..<MR` of `A·B`, in order, update the running extremes of
    /// each of the `NR` columns (``LaneExtremes/take(_:_:at:)`` with indices `column + r`).
    case extremes(UnsafeMutablePointer<LaneExtremes>)
}

/// The running maximum and minimum of each of `NR` lanes over a sequence of rows, with the
/// index of the first row holding each (LSH hashing's argmax over `[x R ; −x R]`, with
/// positions in lanes).
struct LaneExtremes {
    var high0 = Vec16(repeating: -.infinity), high1 = Vec16(repeating: -.infinity)
    var low0 = Vec16(repeating: .infinity), low1 = Vec16(repeating: .infinity)
    var highAt0 = SIMD16<Int32>(), highAt1 = SIMD16<Int32>()
    var lowAt0 = SIMD16<Int32>(), lowAt1 = SIMD16<Int32>()
    /// Index of the next micro-kernel call's row 0 (``MicroKernelUpdate/extremes(_:)``).
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

typealias Vec16 = SIMD16<Float>

@inline(__always)
func load16(_ p: UnsafePointer<Float>) -> Vec16 {
    UnsafeRawPointer(p).loadUnaligned(as: Vec16.self)
}

@inline(__always)
func store16(_ v: Vec16, _ p: UnsafeMutablePointer<Float>) {
    UnsafeMutableRawPointer(p).storeBytes(of: v, as: Vec16.self)
}

/// The `A` operand of the micro-kernel: element `A[r, k] = base[r · rowStride + k · depthStride]`
/// for `r < rows`; rows `rows..<MR` repeat row `rows − 1` (their `C` rows are computed
/// but meaningless), so `A` never reads outside the rows it was given.
struct BroadcastOperand {
    var base: UnsafePointer<Float>
    var rowStride: Int
    var depthStride: Int
    var rows: Int = MicroTile.mr
}

/// One `8 × 32` tile of `C` (+)= `A · B`; see ``MicroTile`` for the contract.
///
/// - Complexity: `2 · 8 · 32 · depth` FLOPs.
@inline(never)
func microKernel(depth: Int, a: BroadcastOperand,
                 b: UnsafePointer<Float>, ldb: Int,
                 c: UnsafeMutablePointer<Float>, ldc: Int,
                 update: MicroKernelUpdate) {
    let last = a.rows - 1, rs = a.rowStride, ks = a.depthStride
    let a0 = a.base, a1 = a.base + min(1, last) &* rs, a2 = a.base + min(2, last) &* rs
    let a3 = a.base + min(3, last) &* rs, a4 = a.base + min(4, last) &* rs
    let a5 = a.base + min(5, last) &* rs, a6 = a.base + min(6, last) &* rs
    let a7 = a.base + min(7, last) &* rs
    var c00 = Vec16(), c01 = Vec16(), c10 = Vec16(), c11 = Vec16()
    var c20 = Vec16(), c21 = Vec16(), c30 = Vec16(), c31 = Vec16()
    var c40 = Vec16(), c41 = Vec16(), c50 = Vec16(), c51 = Vec16()
    var c60 = Vec16(), c61 = Vec16(), c70 = Vec16(), c71 = Vec16()
    var k = 0
    var bp = b
    for _ in 0..<depth {
        let b0 = load16(bp), b1 = load16(bp + 16)
        var x = Vec16(repeating: a0[k]); multiplyAdd(&c00, x, b0); multiplyAdd(&c01, x, b1)
        x = Vec16(repeating: a1[k]); multiplyAdd(&c10, x, b0); multiplyAdd(&c11, x, b1)
        x = Vec16(repeating: a2[k]); multiplyAdd(&c20, x, b0); multiplyAdd(&c21, x, b1)
        x = Vec16(repeating: a3[k]); multiplyAdd(&c30, x, b0); multiplyAdd(&c31, x, b1)
        x = Vec16(repeating: a4[k]); multiplyAdd(&c40, x, b0); multiplyAdd(&c41, x, b1)
        x = Vec16(repeating: a5[k]); multiplyAdd(&c50, x, b0); multiplyAdd(&c51, x, b1)
        x = Vec16(repeating: a6[k]); multiplyAdd(&c60, x, b0); multiplyAdd(&c61, x, b1)
        x = Vec16(repeating: a7[k]); multiplyAdd(&c70, x, b0); multiplyAdd(&c71, x, b1)
        k &+= ks
        bp += ldb
    }
    if case .extremes(let scan) = update {
        var e = scan.pointee
        let column = e.column
        e.take(c00, c01, at: column); e.take(c10, c11, at: column &+ 1)
        e.take(c20, c21, at: column &+ 2); e.take(c30, c31, at: column &+ 3)
        e.take(c40, c41, at: column &+ 4); e.take(c50, c51, at: column &+ 5)
        e.take(c60, c61, at: column &+ 6); e.take(c70, c71, at: column &+ 7)
        scan.pointee = e
        return
    }
    @inline(__always)
    func finish(_ row: Int, _ v0: Vec16, _ v1: Vec16) {
        let p = c + row * ldc
        switch update {
        case .overwrite:
            store16(v0, p); store16(v1, p + 16)
        case .accumulate:
            store16(load16(p) + v0, p); store16(load16(p + 16) + v1, p + 16)
        case .scaleAndAccumulate(let scale):
            let s = Vec16(repeating: scale[row])
            store16(fused(load16(p), s, v0), p); store16(fused(load16(p + 16), s, v1), p + 16)
        case .extremes:
            break
        }
    }
    finish(0, c00, c01); finish(1, c10, c11); finish(2, c20, c21); finish(3, c30, c31)
    finish(4, c40, c41); finish(5, c50, c51); finish(6, c60, c61); finish(7, c70, c71)
}
