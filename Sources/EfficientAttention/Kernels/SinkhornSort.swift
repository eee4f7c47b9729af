/// Sparse Sinkhorn attention's sorting for one batch item and query head (Tay et al.
/// 2020): block sums, sort logits, log-space Sinkhorn balancing and the block mixing
/// `K̃ = P K`, `Ṽ = P V`.
///
/// Blocks of `b` positions, `n_b = ⌈N / b⌉`; a block `u` is *valid* when it holds a key
/// below the batch item's key length `L` (`u < ⌈L / b⌉`). Entry `(t, u)` of `P` is
/// *allowed* when `u` is valid and, causal, `u < t`; every other entry is exactly 0.
enum SinkhornSort {
    /// One worker's scratch: block sums, the plan (rows `ld` floats apart, `ld` a multiple
    /// of 16, padding columns −∞) and per-column running statistics.
    struct Workspace {
        let querySums, keySums, logits, columnMax, columnSum: UnsafeMutablePointer<Float>
        let gemm: Gemm.Workspace
        let headDim: Int
        /// The plan's row stride.
        let ld: Int

        init(carving carver: inout WorkspaceCarver, blocks: Int, headDim: Int) {
            self.headDim = headDim
            ld = roundUp(blocks, 16)
            querySums = carver.take(blocks * headDim)
            keySums = carver.take(blocks * headDim)
            logits = carver.take(blocks * ld)
            columnMax = carver.take(ld)
            columnSum = carver.take(ld)
            gemm = Gemm.Workspace(carving: &carver)
        }
    }

    /// The settings of one sort.
    struct Settings {
        var blockSize: Int
        var blocks: Int
        var iterations: Int
        var temperature: Float
        var causal: Bool
        var scale: Float
    }

    /// Row sums of each block of `rows` rows (`count` valid rows from the view's head
    /// `(b, h)`, width `d`) into `out[u · d ..]`; blocks without rows are 0.
    static func blockSums(_ x: TensorView, b: Int, h: Int, count: Int, d: Int, settings s: Settings,
                          into out: UnsafeMutablePointer<Float>) {
        out.update(repeating: 0, count: s.blocks * d)
        for j in 0..<count {
            axpy(1, x.row(b, h, j), x.strides[3], out + (j / s.blockSize) * d, count: d)
        }
    }

    /// `log P` in `space.logits`: `R / τ` (+ `noise`), disallowed entries −∞, then
    /// `iterations` rounds of row and column normalisation in log space. `R` is
    /// `scale · Q̄ K̄ᵀ` from the block sums in `space`, or `given` (row-major `n_b × n_b`).
    /// Every pass runs along the rows, 16 columns at a time (the columns' statistics are
    /// kept per column, online).
    static func balance(space: Workspace, validBlocks: Int, settings s: Settings,
                        given: UnsafePointer<Float>?, noise: ((Int, Int) -> Float)?) {
        let n = s.blocks, ld = space.ld, logits = space.logits
        if let given {
            for t in 0..<n { (logits + t * ld).update(from: given + t * n, count: n) }
        } else {
            let d = space.headDim
            Gemm.multiply(m: n, n: n, depth: d, a: MatrixOperand(base: space.querySums, rowStride: d, columnStride: 1),
                          b: .matrix(MatrixOperand(base: space.keySums, rowStride: 1, columnStride: d)),
                          c: logits, ldc: ld, workspace: space.gemm)
        }
        let factor = (given == nil ? s.scale : 1) / s.temperature
        for t in 0..<n {
            for u in 0..<ld {
                let allowed = u < validBlocks && (!s.causal || u < t)
                // Clamped to ±1e30: an overflowing logit (huge inputs or scale) must not turn
                // the normalisation's differences into ∞ − ∞.
                let logit = min(max(factor * logits[t * ld + u] + (noise?(t, u) ?? 0), -1e30), 1e30)
                logits[t * ld + u] = allowed ? logit : -.infinity
            }
        }
        let minusInfinity = Vec16(repeating: -.infinity)
        /// `log(sum) + max` per lane, 0 where nothing was summed (max −∞): subtracting it
        /// leaves −∞ entries −∞.
        func logTotal(_ maximum: Vec16, _ sum: Vec16) -> Vec16 {
            var total = Vec16()
            for lane in 0..<16 where maximum[lane] > -.infinity { total[lane] = maximum[lane] + logf(sum[lane]) }
            return total
        }
        for _ in 0..<s.iterations {
            // Rows, over the allowed entries.
            for t in 0..<n {
                let row = logits + t * ld
                var m = minusInfinity
                for c in stride(from: 0, to: ld, by: 16) { m = maximum(m, load16(row + c)) }
                let rowMax = m.max()
                guard rowMax > -.infinity else { continue }
                var sum = Vec16()
                let shift = Vec16(repeating: rowMax)
                for c in stride(from: 0, to: ld, by: 16) { sum += VectorMath.exp16(load16(row + c) - shift) }
                let total = Vec16(repeating: rowMax + logf(sum.sum()))
                for c in stride(from: 0, to: ld, by: 16) { store16(load16(row + c) - total, row + c) }
            }
            // Columns: over every row, or causal over the rows t' ≤ t (online, row by row).
            space.columnMax.update(repeating: -.infinity, count: ld)
            space.columnSum.update(repeating: 0, count: ld)
            for t in 0..<n {
                let row = logits + t * ld
                for c in stride(from: 0, to: ld, by: 16) {
                    let x = load16(row + c), oldMax = load16(space.columnMax + c)
                    let newMax = maximum(oldMax, x)
                    var shift = newMax
                    shift.replace(with: 0, where: newMax .== minusInfinity)
                    let sum = load16(space.columnSum + c) * VectorMath.exp16(oldMax - shift)
                        + VectorMath.exp16(x - shift)
                    store16(newMax, space.columnMax + c)
                    store16(sum, space.columnSum + c)
                    if s.causal { store16(x - logTotal(newMax, sum), row + c) }
                }
            }
            guard !s.causal else { continue }
            for c in stride(from: 0, to: ld, by: 16) {
                store16(logTotal(load16(space.columnMax + c), load16(space.columnSum + c)), space.columnSum + c)
            }
            for t in 0..<n {
                let row = logits + t * ld
                for c in stride(from: 0, to: ld, by: 16) { store16(load16(row + c) - load16(space.columnSum + c), row + c) }
            }
        }
    }

    /// `P = exp(log P)` in place (rows of `ld`).
    static func exponentiate(space: Workspace, blocks n: Int) {
        for e in stride(from: 0, to: n * space.ld, by: 16) {
            store16(VectorMath.exp16(load16(space.logits + e)), space.logits + e)
        }
    }

    /// `mixed[t · rows + r] = Σ_u P[t, u] · x[u · b + r]` for the first `outputBlocks` rows
    /// `t` of `P`, rows `r < rows`, over the positions below `count` (the others are zero
    /// vectors): one GEMM per row offset `r`, `P` times the strided view of rows
    /// `r, r + b, r + 2b, …`.
    static func mix(_ x: TensorView, b: Int, h: Int, count: Int, width: Int, rows: Int, outputBlocks: Int,
                    plan: UnsafePointer<Float>, settings s: Settings,
                    into mixed: UnsafeMutablePointer<Float>, gemm: Gemm.Workspace) {
        for r in 0..<rows {
            let depth = ceilDiv(count - r, s.blockSize)       // blocks that have row r
            Gemm.multiply(m: outputBlocks, n: width, depth: depth,
                          a: MatrixOperand(base: plan, rowStride: roundUp(s.blocks, 16), columnStride: 1),
                          b: .matrix(MatrixOperand(base: x.row(b, h, r), rowStride: s.blockSize * x.strides[2],
                                                   columnStride: x.strides[3])),
                          c: mixed + r * width, ldc: rows * width, workspace: gemm)
        }
    }
}
