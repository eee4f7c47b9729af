/// Memory-compressed attention's strided convolution (kernel = stride = `c`) along the
/// sequence, for one key/value head: rows `0..<L` of a strided head view shortened to
/// `⌈L / c⌉` rows.
///
/// With weights `W [c, w, w]` (`W_r` row-major `[out, in]`) and an optional bias `b [w]`:
///
///     out[t] = Σ_{r < c, tc + r < L} W_r · x[tc + r] + b      (the last, partial window
///                                                            counts missing rows as 0)
///
/// computed as `c` GEMMs `out[rows] += X_r · W_rᵀ`, where `X_r` is the strided view of rows
/// `r, r + c, r + 2c, …` (read in place, row stride `c` rows) and `W_rᵀ` is read through
/// strides; the first GEMM overwrites. Without weights, mean pooling
/// `out[t] = (1 / n_t) Σ_r x[tc + r]` with `n_t` the rows the window has, as
/// `axpy` sums (plus the bias when one is given).
///
/// - Complexity: `2 · L · w²` FLOPs with weights, `L · w` without; no scratch beyond one
///   GEMM workspace.
enum WindowCompression {
    /// The compressed length of `length` rows: `⌈length / c⌉`.
    @inline(__always)
    static func compressedLength(_ length: Int, compression c: Int) -> Int { ceilDiv(length, c) }

    /// Writes the `⌈length / c⌉` compressed rows of head `(b, h)` of `source` (`width`
    /// columns) to `out`, rows `ldo` floats apart.
    static func compress(_ source: TensorView, b: Int, h: Int, length: Int, compression c: Int, width: Int,
                         weights: UnsafePointer<Float>?, bias: UnsafePointer<Float>?,
                         into out: UnsafeMutablePointer<Float>, ldo: Int, workspace: Gemm.Workspace) {
        let rows = compressedLength(length, compression: c)
        guard rows > 0 else { return }
        let rowStride = source.strides[2], columnStride = source.strides[3]
        let first = source.row(b, h, 0)
        if let weights {
            for r in 0..<min(c, length) {
                // Windows that have row r: t with tc + r < length.
                let windows = ceilDiv(length - r, c)
                Gemm.multiply(m: windows, n: width, depth: width,
                              a: MatrixOperand(base: first + r * rowStride, rowStride: c * rowStride,
                                               columnStride: columnStride),
                              b: .matrix(MatrixOperand(base: weights + r * width * width, rowStride: 1,
                                                       columnStride: width)),
                              c: out, ldc: ldo, accumulate: r > 0, workspace: workspace)
            }
        } else {
            for t in 0..<rows {
                let row = out + t * ldo
                row.update(repeating: 0, count: width)
                let count = min(c, length - t * c)
                let weight = 1 / Float(count)
                for r in 0..<count {
                    axpy(weight, first + (t * c + r) * rowStride, columnStride, row, count: width)
                }
            }
        }
        if let bias {
            for t in 0..<rows { axpy(1, bias, 1, out + t * ldo, count: width) }
        }
    }
}

extension WindowCompression {
    /// Max pooling of the windows of `c` rows of head `(b, h)` of `source`: the
    /// `⌈length / c⌉` rows `out[t][col] = max_{r < c, tc + r < length} x[tc + r][col]`
    /// (a last, partial window over the rows it has), rows `ldo` floats apart. A NaN input
    /// never replaces a number already taken (the compressive memory's pooling; its inputs
    /// are finite).
    ///
    /// - Complexity: `length · width` comparisons, no scratch.
    static func maxPool(_ source: TensorView, b: Int, h: Int, length: Int, compression c: Int, width: Int,
                        into out: UnsafeMutablePointer<Float>, ldo: Int) {
        let rowStride = source.strides[2], columnStride = source.strides[3]
        let first = source.row(b, h, 0)
        for t in 0..<compressedLength(length, compression: c) {
            let row = out + t * ldo
            let window = first + t * c * rowStride
            for column in 0..<width { row[column] = window[column * columnStride] }
            for r in 1..<min(c, length - t * c) {
                let x = window + r * rowStride
                for column in 0..<width where x[column * columnStride] > row[column] {
                    row[column] = x[column * columnStride]
                }
            }
        }
    }
}
