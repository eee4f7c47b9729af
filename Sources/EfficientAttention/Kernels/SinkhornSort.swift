/// Sparse Sinkhorn attention's sorting for one batch item and query head (Tay et al.
/// 2020): block sums, sort logits, log-space Sinkhorn balancing and the block mixing
/// `K̃ = P K`, `Ṽ = P V`.
///
/// Blocks of `b` positions, `n_b = ⌈N / b⌉`; a block `u` is *valid* when it holds a key
/// below the batch item's key length `L` (`u < ⌈L / b⌉`). Entry `(t, u)` of `P` is
/// *allowed* when `u` is valid and, causal, `u < t`; every other entry is exactly 0.
enum SinkhornSort {
    /// One worker's scratch: block sums, logits and the balanced plan.
    struct Workspace {
        let querySums, keySums, logits: UnsafeMutablePointer<Float>
        let gemm: Gemm.Workspace
        let headDim: Int

        init(carving carver: inout WorkspaceCarver, blocks: Int, headDim: Int) {
            self.headDim = headDim
            querySums = carver.take(blocks * headDim)
            keySums = carver.take(blocks * headDim)
            logits = carver.take(blocks * blocks)
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

    /// `log P` in `space.logits` (`n_b × n_b`): `R / τ` (+ `noise`), disallowed entries
    /// −∞, then `iterations` rounds of row and column normalisation in log space. `R` is
    /// `scale · Q̄ K̄ᵀ` from the block sums in `space`, or `given` (row-major `n_b × n_b`).
    static func balance(space: Workspace, validBlocks: Int, settings s: Settings,
                        given: UnsafePointer<Float>?, noise: ((Int, Int) -> Float)?) {
        let n = s.blocks, logits = space.logits
        if let given {
            logits.update(from: given, count: n * n)
        } else {
            let d = space.headDim
            Gemm.multiply(m: n, n: n, depth: d, a: MatrixOperand(base: space.querySums, rowStride: d, columnStride: 1),
                          b: .matrix(MatrixOperand(base: space.keySums, rowStride: 1, columnStride: d)),
                          c: logits, ldc: n, workspace: space.gemm)
        }
        let inverseTemperature = 1 / s.temperature
        for t in 0..<n {
            for u in 0..<n {
                let allowed = u < validBlocks && (!s.causal || u < t)
                let scaled = (given == nil ? s.scale * logits[t * n + u] : logits[t * n + u]) * inverseTemperature
                logits[t * n + u] = allowed ? scaled + (noise?(t, u) ?? 0) : -.infinity
            }
        }
        for _ in 0..<s.iterations {
            // Rows: over the allowed entries.
            for t in 0..<n {
                let row = logits + t * n
                let total = logSumExp(count: n) { row[$0] }
                guard total > -.infinity else { continue }
                for u in 0..<n { row[u] -= total }
            }
            // Columns: over all rows, or causal over the rows t' ≤ t (a running sum).
            for u in 0..<n {
                if s.causal {
                    var running = -Float.infinity
                    for t in 0..<n {
                        let x = logits[t * n + u]
                        running = addLogs(running, x)
                        if x > -.infinity { logits[t * n + u] = x - running }
                    }
                } else {
                    let total = logSumExp(count: n) { logits[$0 * n + u] }
                    guard total > -.infinity else { continue }
                    for t in 0..<n { logits[t * n + u] -= total }
                }
            }
        }
    }

    /// `P = exp(log P)` in place.
    static func exponentiate(space: Workspace, blocks n: Int) {
        for e in 0..<(n * n) { space.logits[e] = expf(space.logits[e]) }
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
                          a: MatrixOperand(base: plan, rowStride: s.blocks, columnStride: 1),
                          b: .matrix(MatrixOperand(base: x.row(b, h, r), rowStride: s.blockSize * x.strides[2],
                                                   columnStride: x.strides[3])),
                          c: mixed + r * width, ldc: rows * width, workspace: gemm)
        }
    }

    /// `log Σ exp(value(e))` over `e < count` (−∞ when every value is −∞).
    @inline(__always)
    static func logSumExp(count: Int, _ value: (Int) -> Float) -> Float {
        var m = -Float.infinity
        for e in 0..<count { m = max(m, value(e)) }
        guard m > -.infinity else { return m }
        var sum: Float = 0
        for e in 0..<count { sum += expf(value(e) - m) }
        return m + logf(sum)
    }

    /// `log(e^a + e^b)`.
    @inline(__always)
    static func addLogs(_ a: Float, _ b: Float) -> Float {
        let m = max(a, b)
        guard m > -.infinity else { return m }
        return m + logf(expf(a - m) + expf(b - m))
    }
}
