import CEfficientAttention

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
///
/// With 16 vector registers of 256 bits (AVX2) a SIMD16 is two registers, and those 16
/// accumulators need 32: the compiler spilled half of them, a load and a store around
/// every fused multiply-add. There the kernel computes the same tile in four quarters of
/// `4 × 16` (``splitsRegisterTile``): 8 accumulator registers, one `B` vector, one
/// broadcast. Each element of `C` is the same chain of multiply-adds over the depth in the
/// same order, so both ways give the same bits.
enum MicroTile {
    /// Rows of `C` per call (broadcast operand).
    static let mr = 8
    /// Columns of `C` per call (vector operand): two SIMD16 vectors.
    static let nr = 32
    /// Whether ``microKernel(depth:a:b:ldb:c:ldc:update:)`` computes its tile in four
    /// `4 × 16` quarters: everywhere except in the `NativeCPU` build running on an x86-64
    /// CPU with AVX-512F, whose 32 vector registers of 512 bits hold the whole tile. (A
    /// `NativeCPU` build made on an AVX2 machine and run on an AVX-512 one takes the whole
    /// tile on 256-bit code and spills, as every build did before; KernelDocs/MicroKernels.md.)
    static let splitsRegisterTile: Bool = {
        #if EA_FMA && arch(x86_64)
        return ea_cpu_has_avx512f() == 0
        #else
        return true
        #endif
    }()
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

    /// Where row `r` of `A` starts (a short `A` repeats its last row).
    @inline(__always)
    func row(_ r: Int) -> UnsafePointer<Float> { base + min(r, rows &- 1) &* rowStride }
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
    /// With `leftHalf`, only columns `0 ..< 16` (`c<r>0`): `B` is read there only, and the
    /// `c<r>1` are meaningless. Called with a constant and left unread, their chains are
    /// dead code, so the loop is one `B` vector and 8 independent chains (where the whole
    /// tile fits the registers; two `4 × 16` quarters one after the other give 4 chains at
    /// a time, fewer than the two FMA pipes' latency needs: a half-width call ran at about
    /// half speed on AVX-512 until stop 56).
    ///
    /// - Complexity: `2 · 8 · 32 · depth` FLOPs (half that with `leftHalf`).
    @inline(__always)
    init(depth: Int, a: BroadcastOperand, b: UnsafePointer<Float>, ldb: Int, leftHalf: Bool = false) {
        let ks = a.depthStride
        let a0 = a.row(0), a1 = a.row(1), a2 = a.row(2), a3 = a.row(3)
        let a4 = a.row(4), a5 = a.row(5), a6 = a.row(6), a7 = a.row(7)
        var c00 = Vec16(), c01 = Vec16(), c10 = Vec16(), c11 = Vec16()
        var c20 = Vec16(), c21 = Vec16(), c30 = Vec16(), c31 = Vec16()
        var c40 = Vec16(), c41 = Vec16(), c50 = Vec16(), c51 = Vec16()
        var c60 = Vec16(), c61 = Vec16(), c70 = Vec16(), c71 = Vec16()
        var k = 0
        var bp = b
        for _ in 0..<depth {
            let b0 = load16(bp), b1 = leftHalf ? b0 : load16(bp + 16)
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

/// A quarter of the tile, `C[r0 ..< r0 + 4, col ..< col + 16]`, for ``MicroTile/splitsRegisterTile``:
/// the depth loop of ``MicroTileProduct`` on four rows and one `B` vector.
struct MicroQuarterProduct {
    var c0, c1, c2, c3: Vec16

    /// - Complexity: `2 · 4 · 16 · depth` FLOPs.
    @inline(__always)
    init(depth: Int, a: BroadcastOperand, firstRow r0: Int, b: UnsafePointer<Float>, ldb: Int) {
        let ks = a.depthStride
        let a0 = a.row(r0), a1 = a.row(r0 &+ 1), a2 = a.row(r0 &+ 2), a3 = a.row(r0 &+ 3)
        var c0 = Vec16(), c1 = Vec16(), c2 = Vec16(), c3 = Vec16()
        var k = 0
        var bp = b
        for _ in 0..<depth {
            let bv = load16(bp)
            multiplyAdd(&c0, Vec16(repeating: a0[k]), bv); multiplyAdd(&c1, Vec16(repeating: a1[k]), bv)
            multiplyAdd(&c2, Vec16(repeating: a2[k]), bv); multiplyAdd(&c3, Vec16(repeating: a3[k]), bv)
            k &+= ks
            bp += ldb
        }
        (self.c0, self.c1, self.c2, self.c3) = (c0, c1, c2, c3)
    }
}

/// One `8 × 32` tile of `C` (+)= `A · B`; see ``MicroTile`` for the contract. With
/// `halfWidth`, only its first 16 columns (`B` and `C` are read and written there only):
/// the same values, computed as one `8 × 16` loop where the whole tile fits the registers
/// (``MicroTileProduct`` with `leftHalf`) and as two `4 × 16` quarters where it does not.
///
/// - Complexity: `2 · 8 · 32 · depth` FLOPs (half that with `halfWidth`).
@inline(never)
func microKernel(depth: Int, a: BroadcastOperand,
                 b: UnsafePointer<Float>, ldb: Int,
                 c: UnsafeMutablePointer<Float>, ldc: Int,
                 update: MicroKernelUpdate, halfWidth: Bool = false) {
    /// Row `row`'s 16 columns from `column` (+)= `v`.
    @inline(__always)
    func finish(_ row: Int, _ column: Int, _ v: Vec16) {
        let p = c + (row &* ldc &+ column)
        switch update {
        case .overwrite: store16(v, p)
        case .accumulate: store16(load16(p) + v, p)
        case .scaleAndAccumulate(let scale): store16(fused(load16(p), Vec16(repeating: scale[row]), v), p)
        }
    }
    if halfWidth && !MicroTile.splitsRegisterTile {
        let h = MicroTileProduct(depth: depth, a: a, b: b, ldb: ldb, leftHalf: true)
        finish(0, 0, h.c00); finish(1, 0, h.c10); finish(2, 0, h.c20); finish(3, 0, h.c30)
        finish(4, 0, h.c40); finish(5, 0, h.c50); finish(6, 0, h.c60); finish(7, 0, h.c70)
        return
    }
    if MicroTile.splitsRegisterTile || halfWidth {
        @inline(__always)
        func quarter(_ r0: Int, _ column: Int) {
            let q = MicroQuarterProduct(depth: depth, a: a, firstRow: r0, b: b + column, ldb: ldb)
            finish(r0, column, q.c0); finish(r0 &+ 1, column, q.c1)
            finish(r0 &+ 2, column, q.c2); finish(r0 &+ 3, column, q.c3)
        }
        if halfWidth {
            quarter(0, 0); quarter(4, 0)
        } else {
            quarter(0, 0); quarter(0, 16); quarter(4, 0); quarter(4, 16)
        }
        return
    }
    let p = MicroTileProduct(depth: depth, a: a, b: b, ldb: ldb)
    finish(0, 0, p.c00); finish(0, 16, p.c01); finish(1, 0, p.c10); finish(1, 16, p.c11)
    finish(2, 0, p.c20); finish(2, 16, p.c21); finish(3, 0, p.c30); finish(3, 16, p.c31)
    finish(4, 0, p.c40); finish(4, 16, p.c41); finish(5, 0, p.c50); finish(5, 16, p.c51)
    finish(6, 0, p.c60); finish(6, 16, p.c61); finish(7, 0, p.c70); finish(7, 16, p.c71)
}

/// The micro-kernel's ways of computing its tile, for the tests: a CPU's kernels take only
/// some of them (``MicroTile/splitsRegisterTile``), so the tests compare all of them on
/// every CPU.
@_spi(Testing) public enum RegisterTileForms {
    public enum Form: CaseIterable, Sendable {
        /// ``MicroTileProduct``: the whole `8 × 32` tile in one loop.
        case whole
        /// Four ``MicroQuarterProduct`` `4 × 16` quarters.
        case quarters
        /// ``MicroTileProduct`` with `leftHalf`: columns `0 ..< 16` only, in one loop (the rest 0).
        case half
        /// Two quarters: columns `0 ..< 16` only (the rest 0).
        case halfQuarters
    }

    /// `C = A · B` (`8 × 32`, row-major) for a row-major `8 × depth` `a` and `depth × 32`
    /// `b`, in the given form; nil unless the sizes fit.
    public static func product(a: [Float], b: [Float], depth: Int, form: Form) -> [Float]? {
        let mr = MicroTile.mr, nr = MicroTile.nr
        // Checked products: an absurd depth gives nil, not an overflow trap.
        let (aCount, aOverflow) = depth.multipliedReportingOverflow(by: mr)
        let (bCount, bOverflow) = depth.multipliedReportingOverflow(by: nr)
        guard depth >= 0, !aOverflow, !bOverflow, a.count == aCount, b.count == bCount else { return nil }
        var c = [Float](repeating: 0, count: mr * nr)
        a.withUnsafeBufferPointer { ap in
            b.withUnsafeBufferPointer { bp in
                c.withUnsafeMutableBufferPointer { cp in
                    // A 1-element buffer when depth is 0, so the operand's base is never nil.
                    let one: [Float] = [0]
                    one.withUnsafeBufferPointer { dummy in
                        let operand = BroadcastOperand(base: ap.baseAddress ?? dummy.baseAddress!,
                                                       rowStride: depth, depthStride: 1)
                        let bBase = bp.baseAddress ?? dummy.baseAddress!
                        let out = cp.baseAddress!
                        func put(_ row: Int, _ column: Int, _ v: Vec16) { store16(v, out + row * nr + column) }
                        func quarter(_ r0: Int, _ column: Int) {
                            let q = MicroQuarterProduct(depth: depth, a: operand, firstRow: r0, b: bBase + column, ldb: nr)
                            put(r0, column, q.c0); put(r0 + 1, column, q.c1)
                            put(r0 + 2, column, q.c2); put(r0 + 3, column, q.c3)
                        }
                        switch form {
                        case .whole, .half:
                            let half = form == .half
                            let p = MicroTileProduct(depth: depth, a: operand, b: bBase, ldb: nr, leftHalf: half)
                            let rows = [(p.c00, p.c01), (p.c10, p.c11), (p.c20, p.c21), (p.c30, p.c31),
                                        (p.c40, p.c41), (p.c50, p.c51), (p.c60, p.c61), (p.c70, p.c71)]
                            for (r, v) in rows.enumerated() {
                                put(r, 0, v.0)
                                if !half { put(r, 16, v.1) }
                            }
                        case .quarters:
                            quarter(0, 0); quarter(0, 16); quarter(4, 0); quarter(4, 16)
                        case .halfQuarters:
                            quarter(0, 0); quarter(4, 0)
                        }
                    }
                }
            }
        }
        return c
    }
}
