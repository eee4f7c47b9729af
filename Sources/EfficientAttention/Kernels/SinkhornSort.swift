import Foundation

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
    /// A 16-bit view's rows are widened one at a time into `stage` (`d` floats).
    static func blockSums(_ x: TensorView, b: Int, h: Int, count: Int, d: Int, settings s: Settings,
                          into out: UnsafeMutablePointer<Float>, stage: UnsafeMutablePointer<Float>) {
        out.update(repeating: 0, count: s.blocks * d)
        for j in 0..<count {
            let (row, stride) = TiledSoftmaxBackward.floatRow(x, b, h, j, width: d, stage: stage)
            axpy(1, row, stride, out + (j / s.blockSize) * d, count: d)
        }
    }

    /// `log P` in `space.logits`: `R / τ` (+ the Gumbel noise of head `noise.item` drawn from
    /// `noise.seed`, ``gumbel(seed:item:blocks:t:u:)``), disallowed entries −∞, then
    /// `iterations` rounds of row and column normalisation in log space. `R` is
    /// `scale · Q̄ K̄ᵀ` from the block sums in `space`, or `given` (row-major `n_b × n_b`).
    /// Every pass runs along the rows, 16 columns at a time (the columns' statistics are
    /// kept per column, online).
    static func balance(space: Workspace, validBlocks: Int, settings s: Settings,
                        given: UnsafePointer<Float>?, noise: (seed: UInt64, item: Int)?) {
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
                let gumbel = noise.map { SinkhornSort.gumbel(seed: $0.seed, item: $0.item, blocks: n, t: t, u: u) } ?? 0
                let logit = min(max(factor * logits[t * ld + u] + gumbel, -1e30), 1e30)
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
                          b: .matrix(blockRows(x, b: b, h: h, offset: r, blockSize: s.blockSize)),
                          c: mixed + r * width, ldc: rows * width, workspace: gemm)
        }
    }

    /// Row `offset` of every block of head `(b, h)` of `x` as a matrix (one row per block,
    /// `blockSize` rows apart), in the view's precision (16-bit rows are widened as packed).
    static func blockRows(_ x: TensorView, b: Int, h: Int, offset: Int, blockSize: Int) -> MatrixOperand {
        var rows = MatrixOperand(x, b: b, h: h, firstRow: offset)
        rows.rowStride = blockSize * x.strides[2]
        return rows
    }

    /// The Gumbel(0, 1) noise of entry `(t, u)` of head `item` (`b · H + h`) of a plan of
    /// `blocks` rows: from a generator of its own per entry, the same draw for every thread
    /// count and order of evaluation.
    static func gumbel(seed: UInt64, item: Int, blocks n: Int, t: Int, u: Int) -> Float {
        var rng = SeededGenerator(seed: seed ^ (UInt64((item * n + t) * n + u) &* 0x9E37_79B9_7F4A_7C15))
        let uniform = max(rng.nextUnitFloat(), .leastNormalMagnitude)
        return -logf(-logf(uniform))
    }
}

extension SinkhornSort {
    /// The gradient through ``balance(space:validBlocks:settings:given:noise:)`` and
    /// ``exponentiate(space:blocks:)`` (the unrolled Sinkhorn iterations): given the
    /// balancing's input `x₀` (`n × n` row-major: `R / τ` plus noise, disallowed entries −∞)
    /// and `∂L/∂P`, returns `∂L/∂x₀` (0 at disallowed entries).
    ///
    /// The forward is recomputed scalar in `Double`, keeping each round's row-normalised
    /// `y` and its column log-sum-exps `C` (`z = y − C`; causal: over rows `t' ≤ t`, so `C`
    /// per entry); then, from `g = ∂L/∂P ∘ P`, round by round backwards:
    ///
    ///     columns:  g_y[t, u] = g[t, u] − e^{z[t, u]} · Σ_t' g[t', u]                   (all rows)
    ///               g_y[t', u] = g[t', u] − e^{z[t', u]} · S[t', u],
    ///               S[t', u] = g[t', u] + e^{C[t', u] − C[t' + 1, u]} · S[t' + 1, u]   (causal: rows t ≥ t')
    ///     rows:     g_x[t, u] = g_y[t, u] − e^{y[t, u]} · Σ_u' g_y[t, u']
    ///
    /// Rows and columns with no allowed entry are left alone, as the forward leaves them.
    ///
    /// - Complexity: `O(iterations · n²)` time, `2 · iterations · n²` doubles.
    static func balanceGradient(input x0: [Float], blocks n: Int, iterations: Int, causal: Bool,
                                permutationGradient dP: [Float]) -> [Float] {
        let minus = -Double.infinity
        var x = x0.map(Double.init)
        var ys: [[Double]] = [], cs: [[Double]] = []
        /// `log Σ exp` of `values` (−∞ when every value is −∞).
        func logSumExp(_ values: [Double]) -> Double {
            guard let m = values.max(), m > minus else { return minus }
            return m + log(values.reduce(0) { $0 + exp($1 - m) })
        }
        for _ in 0..<iterations {
            for t in 0..<n {
                let total = logSumExp(Array(x[(t * n)..<(t * n + n)]))
                if total > minus { for u in 0..<n { x[t * n + u] -= total } }
            }
            ys.append(x)
            var c = [Double](repeating: minus, count: n * n)
            for u in 0..<n {
                if causal {
                    var running = minus
                    for t in 0..<n {
                        running = logSumExp([running, x[t * n + u]])
                        c[t * n + u] = running
                    }
                } else {
                    let total = logSumExp((0..<n).map { x[$0 * n + u] })
                    for t in 0..<n { c[t * n + u] = total }
                }
            }
            cs.append(c)
            for e in x.indices where c[e] > minus { x[e] -= c[e] }
        }
        var g = (0..<(n * n)).map { Double(dP[$0]) * exp(x[$0]) }
        for round in stride(from: iterations - 1, through: 0, by: -1) {
            let y = ys[round], c = cs[round]
            func z(_ e: Int) -> Double { c[e] > minus ? y[e] - c[e] : y[e] }
            for u in 0..<n {
                if causal {
                    var s = 0.0
                    for t in stride(from: n - 1, through: 0, by: -1) {
                        let e = t * n + u
                        if t + 1 < n {
                            let next = c[e + n]
                            s *= c[e] > minus && next > minus ? exp(c[e] - next) : 0
                        } else {
                            s = 0
                        }
                        s += g[e]
                        if c[e] > minus { g[e] -= exp(z(e)) * s }
                    }
                } else {
                    guard c[u] > minus else { continue }
                    let s = (0..<n).reduce(0.0) { $0 + g[$1 * n + u] }
                    for t in 0..<n { g[t * n + u] -= exp(z(t * n + u)) * s }
                }
            }
            for t in 0..<n {
                let row = (t * n)..<(t * n + n)
                guard row.contains(where: { y[$0] > minus }) else { continue }
                let s = row.reduce(0.0) { $0 + g[$1] }
                for e in row { g[e] -= exp(y[e]) * s }
            }
        }
        return (0..<(n * n)).map { x0[$0] == -.infinity ? 0 : Float(g[$0]) }
    }
}
