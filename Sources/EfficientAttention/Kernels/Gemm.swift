/// The shared small-GEMM kernel: BLIS-style blocking loops and packed panels around the
/// one register-tiled ``microKernel(depth:a:b:ldb:c:ldc:update:)``.
///
///     for jc in columns of C, NC at a time:              (B block: KC × NC, packed in NR-wide panels)
///       for pc in depth, KC at a time:
///         pack B[pc..<pc+KC, jc..<jc+NC]                 (or read a prepacked B)
///         for ic in rows of C, MC at a time:
///           pack A[ic..<ic+MC, pc..<pc+KC]               (MR-row panels, depth-major; or A in place)
///           for each NR panel of the B block:            (the panel stays in L1)
///             for each MR panel of the A block:          (A panels stream from L2)
///               C tile (8 × 32) (+)= A panel · B panel   micro-kernel
///
/// Edges: packed panels are zero-padded to whole `MR` rows and `NR` columns; a `C` tile
/// that sticks out of `C` is computed into a scratch tile and only its valid part is
/// written. Every element of `C` is a sum over the depth in the same order whatever the
/// partition into blocks, so results do not depend on the blocking of `C` or on threads.
enum Gemm {
    /// Block sizes: a B micro-panel of `KC × NR` floats stays in L1, an `MC × KC` A block in
    /// L2. The values, and where they come from, are the tuning table's (``Tuning``).
    struct Blocking {
        var mc: Int
        var kc: Int
        var nc: Int
        static let standard = Blocking(mc: Tuning.current.gemmRows, kc: Tuning.current.gemmDepth,
                                       nc: Tuning.current.gemmColumns)
    }

    /// `B` already packed for every depth and column: panel `q` (columns `q·NR ..< q·NR + NR`)
    /// starts at `base + q · depth · NR`, row `k` of a panel at `+ k · NR`; columns past
    /// `columns` are zero.
    struct PackedB {
        var base: UnsafePointer<Float>
        var depth: Int
        var columns: Int

        /// Floats a packed `depth × columns` matrix takes.
        static func floatCount(depth: Int, columns: Int) -> Int {
            depth * roundUp(columns, MicroTile.nr)
        }

        /// Packs `b` (`depth × columns`) into `into` (``floatCount(depth:columns:)`` floats).
        static func pack(_ b: MatrixOperand, depth: Int, columns: Int,
                         into: UnsafeMutablePointer<Float>) -> PackedB {
            Gemm.packB(b, depth: depth, columns: columns, into: into)
            return PackedB(base: UnsafePointer(into), depth: depth, columns: columns)
        }
    }

    /// The `B` operand: a strided matrix (packed block by block) or a prepacked one.
    enum OperandB {
        case matrix(MatrixOperand)
        case packed(PackedB)
    }

    /// One worker's packing buffers and edge tile. Packing writes every float it later
    /// reads (padding included): no zero fill.
    struct Workspace {
        let blocking: Blocking
        let a, b, tile: UnsafeMutablePointer<Float>
        /// Whether the packing buffers exist (false for products whose `A` is read in place
        /// and whose `B` is prepacked: only the edge tile).
        let canPack: Bool

        init(carving carver: inout WorkspaceCarver, _ blocking: Blocking = .standard, packing: Bool = true) {
            self.blocking = blocking
            canPack = packing
            if packing {
                a = carver.take(roundUp(blocking.mc, MicroTile.mr) * blocking.kc)
                b = carver.take(blocking.kc * roundUp(blocking.nc, MicroTile.nr))
                tile = carver.take(MicroTile.mr * MicroTile.nr)
            } else {
                tile = carver.take(MicroTile.mr * MicroTile.nr)
                a = tile
                b = tile
            }
        }

        /// Floats in `a`.
        var aCapacity: Int { canPack ? roundUp(blocking.mc, MicroTile.mr) * blocking.kc : MicroTile.mr * MicroTile.nr }

        static func byteCount(_ blocking: Blocking = .standard, packing: Bool = true) -> Int {
            WorkspaceCarver.bytes { _ = Workspace(carving: &$0, blocking, packing: packing) }
        }
    }

    /// `C = A · B` (or `C += A · B` with `accumulate`), one thread.
    ///
    /// - Parameters:
    ///   - a: `m × depth`; with `packA` false it is read in place by the micro-kernel
    ///     (good when one of its strides is 1 and the matrix is small).
    ///   - b: `depth × n`, strided (packed here) or prepacked.
    ///   - c: `m × n`, row `r` at `c + r · ldc`, columns contiguous.
    /// - Complexity: `2 · m · n · depth` FLOPs; packing reads `A` once per `NC` block of
    ///   columns and `B` once.
    static func multiply(m: Int, n: Int, depth: Int, a: MatrixOperand, packA: Bool = true,
                         b: OperandB, c: UnsafeMutablePointer<Float>, ldc: Int,
                         accumulate: Bool = false, workspace: Workspace) {
        guard m > 0, n > 0 else { return }
        guard depth > 0 else {
            if !accumulate { for r in 0..<m { (c + r * ldc).update(repeating: 0, count: n) } }
            return
        }
        let mr = MicroTile.mr, nr = MicroTile.nr
        let blocking = workspace.blocking
        if case .matrix = b { precondition(workspace.canPack, "GEMM: packing B needs a packing workspace") }
        precondition(!packA || workspace.canPack, "GEMM: packing A needs a packing workspace")
        precondition(packA || a.precision == .float32, "GEMM: a 16-bit A is widened as it is packed")
        for jc in stride(from: 0, to: n, by: blocking.nc) {
            let nb = min(blocking.nc, n - jc)
            for pc in stride(from: 0, to: depth, by: blocking.kc) {
                let kb = min(blocking.kc, depth - pc)
                let first = pc == 0 && !accumulate
                // B panels of this block: panel q at bBase + q · bPanelStride, rows NR apart.
                let bBase: UnsafePointer<Float>, bPanelStride: Int
                switch b {
                case .matrix(let matrix):
                    packB(matrix.offset(row: pc, column: jc), depth: kb, columns: nb, into: workspace.b)
                    bBase = UnsafePointer(workspace.b)
                    bPanelStride = kb * nr
                case .packed(let packed):
                    bBase = packed.base + (jc / nr * packed.depth + pc) * nr
                    bPanelStride = packed.depth * nr
                }
                for ic in stride(from: 0, to: m, by: blocking.mc) {
                    let mb = min(blocking.mc, m - ic)
                    if packA {
                        packAPanels(a.offset(row: ic, column: pc), rows: mb, depth: kb, into: workspace.a)
                    }
                    for q in 0..<(nb + nr - 1) / nr {
                        let columns = min(nr, nb - q * nr)
                        let panel = bBase + q * bPanelStride
                        for p in 0..<(mb + mr - 1) / mr {
                            let rows = min(mr, mb - p * mr)
                            let operand = packA
                                ? BroadcastOperand(base: workspace.a + p * mr * kb, rowStride: 1, depthStride: mr)
                                : BroadcastOperand(base: a.offset(row: ic + p * mr, column: pc).base,
                                                   rowStride: a.rowStride, depthStride: a.columnStride, rows: rows)
                            let tile = c + (ic + p * mr) * ldc + jc + q * nr
                            if rows == mr && columns == nr {
                                microKernel(depth: kb, a: operand, b: panel, ldb: nr, c: tile, ldc: ldc,
                                            update: first ? .overwrite : .accumulate)
                            } else {
                                microKernel(depth: kb, a: operand, b: panel, ldb: nr, c: workspace.tile, ldc: nr,
                                            update: .overwrite)
                                for r in 0..<rows {
                                    let source = workspace.tile + r * nr, target = tile + r * ldc
                                    if first {
                                        for x in 0..<columns { target[x] = source[x] }
                                    } else {
                                        for x in 0..<columns { target[x] += source[x] }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    /// `C = A · B` (or `+=`) on `threads` workers: `C` is cut into one strip per worker
    /// along its longer side (whole `MR` rows or `NR` columns), each strip a work item that
    /// packs its own panels, so only the shorter operand is packed more than once.
    /// Bitwise identical for every thread count.
    ///
    /// - Complexity: `2 · m · n · depth` FLOPs; workspace ``Workspace/byteCount(_:)`` per worker.
    static func multiply(m: Int, n: Int, depth: Int, a: MatrixOperand, b: MatrixOperand,
                         c: UnsafeMutablePointer<Float>, ldc: Int, accumulate: Bool = false, threads: Int) {
        let byColumns = n >= m
        let unit = byColumns ? MicroTile.nr : MicroTile.mr
        let extent = byColumns ? n : m
        let strips = max(1, min(threads, (extent + unit - 1) / unit))
        let width = roundUp((extent + strips - 1) / strips, unit)
        let items = (extent + width - 1) / width
        WorkspaceArena.withWorkspaces(workers: min(threads, items), layout: { Workspace(carving: &$0) }) { spaces in
        let output = UncheckedSendable(c)
        parallelForEach(items: items, threads: spaces.count) { item, worker in
            let start = item * width, count = min(width, extent - start)
            if byColumns {
                multiply(m: m, n: count, depth: depth, a: a, b: .matrix(b.offset(row: 0, column: start)),
                         c: output.value + start, ldc: ldc, accumulate: accumulate, workspace: spaces[worker])
            } else {
                multiply(m: count, n: n, depth: depth, a: a.offset(row: start, column: 0), b: .matrix(b),
                         c: output.value + start * ldc, ldc: ldc, accumulate: accumulate, workspace: spaces[worker])
            }
        }
        }
    }

    /// Packs `rows × depth` of `a` into `MR`-row panels: panel `p` at `p · MR · depth`,
    /// element `[r, k]` of the panel at `k · MR + r`; rows past `rows` are zero.
    @inline(__always)
    static func packAPanels(_ a: MatrixOperand, rows: Int, depth: Int, into: UnsafeMutablePointer<Float>) {
        packPanels(a, extent: rows, depth: depth, width: MicroTile.mr, into: into)
    }

    /// Packs `depth × columns` of `b` into `NR`-wide panels: panel `q` at `q · depth · NR`,
    /// row `k` at `+ k · NR`; columns past `columns` are zero.
    @inline(__always)
    static func packB(_ b: MatrixOperand, depth: Int, columns: Int, into: UnsafeMutablePointer<Float>) {
        packPanels(b.transposed, extent: columns, depth: depth, width: MicroTile.nr, into: into)
    }

    /// The one packing routine: rows `0..<extent` of `x` (each `depth` long) in panels of
    /// `width` rows, depth-major: panel `p` at `p · width · depth`, `x[p · width + i, k]` at
    /// `+ k · width + i`; rows past `extent` are zero. `A` is packed as it is, `B` transposed.
    @inline(__always)
    static func packPanels(_ x: MatrixOperand, extent: Int, depth: Int, width: Int,
                           into: UnsafeMutablePointer<Float>) {
        guard x.precision == .float32 else { return packWidening(x, extent: extent, depth: depth, width: width, into: into) }
        for p in 0..<(extent + width - 1) / width {
            let panel = into + p * width * depth
            let valid = min(width, extent - p * width)
            let first = x.base + p * width * x.rowStride
            if x.rowStride == 1 {
                // Panel rows adjacent in memory (B with contiguous rows): copy runs of `width`.
                for k in 0..<depth {
                    let source = first + k * x.columnStride, target = panel + k * width
                    if valid == 32 && width == 32 {
                        store16(load16(source), target)
                        store16(load16(source + 16), target + 16)
                    } else {
                        for i in 0..<valid { target[i] = source[i] }
                    }
                }
            } else {
                // Walk each row along the depth (contiguous for A with unit column stride).
                for i in 0..<valid {
                    let source = first + i * x.rowStride
                    for k in 0..<depth { panel[k * width + i] = source[k * x.columnStride] }
                }
            }
            if valid < width {
                for k in 0..<depth { for i in valid..<width { panel[k * width + i] = 0 } }
            }
        }
    }

    /// ``packPanels(_:extent:depth:width:into:)`` of a 16-bit operand: each element widened
    /// to `Float` as it is placed (the same panels as its `Float` values would give).
    static func packWidening(_ x: MatrixOperand, extent: Int, depth: Int, width: Int,
                             into: UnsafeMutablePointer<Float>) {
        switch x.precision {
        case .float32: packPanels(x, extent: extent, depth: depth, width: width, into: into)
        case .float16: packWidening(HalfElement.self, x, extent: extent, depth: depth, width: width, into: into)
        case .bfloat16: packWidening(BFloat16Bits.self, x, extent: extent, depth: depth, width: width, into: into)
        }
    }

    private static func packWidening<E: ActivationScalar>(_: E.Type, _ x: MatrixOperand, extent: Int, depth: Int,
                                                          width: Int, into: UnsafeMutablePointer<Float>) {
        let elements = x.raw.assumingMemoryBound(to: E.self)
        for p in 0..<(extent + width - 1) / width {
            let panel = into + p * width * depth
            let valid = min(width, extent - p * width)
            if x.rowStride == 1 {
                // Panel rows adjacent in memory: widen runs of `valid`.
                for k in 0..<depth {
                    let source = elements + p * width + k * x.columnStride, target = panel + k * width
                    var i = 0
                    while i + 16 <= valid {
                        store16(E.wide16(source + i), target + i)
                        i += 16
                    }
                    while i < valid { target[i] = E.widen(source[i]); i += 1 }
                }
            } else {
                for i in 0..<valid {
                    let row = elements + (p * width + i) * x.rowStride
                    for k in 0..<depth { panel[k * width + i] = E.widen(row[k * x.columnStride]) }
                }
            }
            if valid < width {
                for k in 0..<depth { for i in valid..<width { panel[k * width + i] = 0 } }
            }
        }
    }
}

/// A strided matrix read by the GEMM: element `[r, c]` at `base[r · rowStride + c · columnStride]`.
struct MatrixOperand: @unchecked Sendable {
    /// The address of element `[0, 0]`.
    var raw: UnsafeRawPointer
    var rowStride: Int
    var columnStride: Int
    /// The elements' precision: 16-bit operands are widened to `Float` as they are packed
    /// (they must be packed: `A` with `packA`, `B` as a matrix).
    var precision: ActivationPrecision

    init(base: UnsafePointer<Float>, rowStride: Int, columnStride: Int) {
        self.init(raw: UnsafeRawPointer(base), rowStride: rowStride, columnStride: columnStride, precision: .float32)
    }

    init(raw: UnsafeRawPointer, rowStride: Int, columnStride: Int, precision: ActivationPrecision) {
        self.raw = raw
        self.rowStride = rowStride
        self.columnStride = columnStride
        self.precision = precision
    }

    /// Rows `first...` of head `(b, h)` of `view` (rows along the sequence, columns along
    /// the last axis), in the view's precision.
    init(_ view: TensorView, b: Int, h: Int, firstRow: Int) {
        self.init(raw: view.rawRow(b, h, firstRow), rowStride: view.strides[2], columnStride: view.strides[3],
                  precision: view.precision)
    }

    /// Element `[0, 0]` of a `Float` operand.
    var base: UnsafePointer<Float> {
        assert(precision == .float32, "base of a 16-bit GEMM operand")
        return raw.assumingMemoryBound(to: Float.self)
    }

    /// The same matrix starting at `[row, column]`.
    @inline(__always)
    func offset(row: Int, column: Int) -> MatrixOperand {
        MatrixOperand(raw: raw + (row &* rowStride &+ column &* columnStride) &* precision.byteWidth,
                      rowStride: rowStride, columnStride: columnStride, precision: precision)
    }

    /// The transpose (no data moves).
    var transposed: MatrixOperand {
        MatrixOperand(raw: raw, rowStride: columnStride, columnStride: rowStride, precision: precision)
    }
}

/// Dense matrix products on the library's GEMM kernel (packed panels around the 8 × 32
/// register-tiled micro-kernel), for the tests and the GEMM benchmark
/// (`@_spi(Benchmarking)`): the library's API is attention; a general matrix product is
/// a BLAS's job.
@_spi(Benchmarking) public enum MatrixProduct {
    /// `A · B` for row-major `a` (`m × depth`) and `b` (`depth × n`), as a row-major
    /// `m × n` array. With `transposeA` / `transposeB`, `a` holds `Aᵀ` (`depth × m`) /
    /// `b` holds `Bᵀ` (`n × depth`). Results are bitwise identical for every thread count.
    ///
    /// - Throws: ``AttentionError/invalidShape(_:)`` for negative sizes,
    ///   ``AttentionError/shapeMismatch(_:)`` when an array has the wrong count,
    ///   ``AttentionError/invalidParameter(_:)`` for `threads < 1`.
    /// - Complexity: `2 · m · n · depth` FLOPs on `threads` workers (`nil`: every core);
    ///   about 1 MiB of packing buffers per worker.
    public static func multiply(_ a: [Float], _ b: [Float], m: Int, n: Int, depth: Int,
                                transposeA: Bool = false, transposeB: Bool = false,
                                threads: Int? = nil) throws -> [Float] {
        for (name, value) in [("m", m), ("n", n), ("depth", depth)] where value < 0 {
            throw AttentionError.invalidShape("\(name) must be non-negative, got \(value)")
        }
        guard let aCount = checkedProduct([m, depth]), let bCount = checkedProduct([depth, n]),
              let cCount = checkedProduct([m, n]) else {
            throw AttentionError.sizeOverflow("a \(m) × \(depth) · \(depth) × \(n) product overflows Int")
        }
        guard a.count == aCount else {
            throw AttentionError.shapeMismatch("a has \(a.count) elements, expected m · depth = \(aCount)")
        }
        guard b.count == bCount else {
            throw AttentionError.shapeMismatch("b has \(b.count) elements, expected depth · n = \(bCount)")
        }
        if let threads, threads < 1 {
            throw AttentionError.invalidParameter("threads must be at least 1, got \(threads)")
        }
        guard cCount > 0 else { return [] }
        if depth == 0 { return [Float](repeating: 0, count: cCount) }
        // Every element is written by the overwrite pass over the first depth block.
        var c = [Float](unsafeUninitializedCapacity: cCount) { _, count in count = cCount }
        a.withUnsafeBufferPointer { a in b.withUnsafeBufferPointer { b in c.withUnsafeMutableBufferPointer { c in
            // Empty a or b (depth 0) still need a valid pointer.
            var zero: Float = 0
            withUnsafePointer(to: &zero) { zero in
                let aBase = a.baseAddress ?? zero, bBase = b.baseAddress ?? zero
                let aMatrix = transposeA ? MatrixOperand(base: aBase, rowStride: 1, columnStride: m)
                                         : MatrixOperand(base: aBase, rowStride: depth, columnStride: 1)
                let bMatrix = transposeB ? MatrixOperand(base: bBase, rowStride: 1, columnStride: depth)
                                         : MatrixOperand(base: bBase, rowStride: n, columnStride: 1)
                Gemm.multiply(m: m, n: n, depth: depth, a: aMatrix, b: bMatrix, c: c.baseAddress!, ldc: n,
                              threads: threads ?? defaultThreadCount)
            }
        } } }
        return c
    }
}
