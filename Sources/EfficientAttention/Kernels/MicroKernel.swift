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
/// - Fused kernels run the same product and consume the tile in registers instead of
///   storing it, as BLIS keeps its fused kernels beside GEMM's: ``microKernelExtremes(depth:a:b:ldb:scan:)``
///   (LSH hashing's argmax, ExtremesMicroKernel.swift).
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

/// The `8 × 32` product `A · B` of one micro-kernel call (``MicroTile``), in registers:
/// `c<r>0` holds row `r`'s columns `0..<16`, `c<r>1` columns `16..<32`.
struct MicroTileProduct {
    var c00, c01, c10, c11, c20, c21, c30, c31: Vec16
    var c40, c41, c50, c51, c60, c61, c70, c71: Vec16

    /// `Σ_{k < depth} A[r, k] · B[k, 0..<NR]` for `r < MR`: the depth loop shared by the
    /// plain micro-kernel and the fused ones (inlined into each, so the accumulators stay
    /// in registers).
    ///
    /// - Complexity: `2 · 8 · 32 · depth` FLOPs.
    @inline(__always)
    init(depth: Int, a: BroadcastOperand, b: UnsafePointer<Float>, ldb: Int) {
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
        (self.c00, self.c01, self.c10, self.c11, self.c20, self.c21, self.c30, self.c31) =
            (c00, c01, c10, c11, c20, c21, c30, c31)
        (self.c40, self.c41, self.c50, self.c51, self.c60, self.c61, self.c70, self.c71) =
            (c40, c41, c50, c51, c60, c61, c70, c71)
    }
}

/// One `8 × 32` tile of `C` (+)= `A · B`; see ``MicroTile`` for the contract.
///
/// - Complexity: `2 · 8 · 32 · depth` FLOPs.
@inline(never)
func microKernel(depth: Int, a: BroadcastOperand,
                 b: UnsafePointer<Float>, ldb: Int,
                 c: UnsafeMutablePointer<Float>, ldc: Int,
                 update: MicroKernelUpdate) {
    let p = MicroTileProduct(depth: depth, a: a, b: b, ldb: ldb)
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
        }
    }
    finish(0, p.c00, p.c01); finish(1, p.c10, p.c11); finish(2, p.c20, p.c21); finish(3, p.c30, p.c31)
    finish(4, p.c40, p.c41); finish(5, p.c50, p.c51); finish(6, p.c60, p.c61); finish(7, p.c70, p.c71)
}
