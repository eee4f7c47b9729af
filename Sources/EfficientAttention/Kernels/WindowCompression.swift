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
        let rowStride = source.strides[2]
        if let weights {
            for r in 0..<min(c, length) {
                // Windows that have row r: t with tc + r < length (16-bit rows widened as packed).
                let windows = ceilDiv(length - r, c)
                var rows = MatrixOperand(source, b: b, h: h, firstRow: r)
                rows.rowStride = c * rowStride
                Gemm.multiply(m: windows, n: width, depth: width, a: rows,
                              b: .matrix(MatrixOperand(base: weights + r * width * width, rowStride: 1,
                                                       columnStride: width)),
                              c: out, ldc: ldo, accumulate: r > 0, workspace: workspace)
            }
        } else {
            // 16-bit rows are widened one at a time into the GEMM workspace's packing buffer
            // (unused here; at least `width` floats: widths are at most 256).
            let stage = workspace.a
            precondition(source.precision == .float32 || width <= workspace.aCapacity, "a row must fit the stage")
            for t in 0..<rows {
                let row = out + t * ldo
                row.update(repeating: 0, count: width)
                let count = min(c, length - t * c)
                let weight = 1 / Float(count)
                for r in 0..<count {
                    let (x, stride) = TiledSoftmaxBackward.floatRow(source, b, h, t * c + r, width: width, stage: stage)
                    axpy(weight, x, stride, row, count: width)
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

extension WindowCompression {
    /// Rows of one GEMM of ``expand(_:ldg:length:compression:width:weights:into:b:h:rows:tile:workspace:)``
    /// (the size of its `tile`, in rows of `width` floats).
    static let expandChunk = 128

    /// The transpose of ``compress(_:b:h:length:compression:width:weights:bias:into:ldo:workspace:)``
    /// (memory-compressed attention's backward): from the gradient `g` of the `⌈L / c⌉`
    /// compressed rows (rows `ldg` floats apart), the gradient of the `rows` rows of head
    /// `(b, h)` of `target`:
    ///
    ///     target[tc + r] = g[t] · W_r                (with weights; `W_r` is `[out, in]`)
    ///     target[tc + r] = g[t] / n_t                (mean pooling, `n_t` rows in window t)
    ///     target[j] = 0                              for L ≤ j < rows
    ///
    /// With weights, one GEMM `G_r · W_r` per offset `r` over the windows that have row `r`,
    /// in chunks of ``expandChunk`` windows through `tile` (`expandChunk · width` floats),
    /// each row then stored in its place (any column stride; rounded once when `target` is
    /// 16-bit, every row being written once). The bias adds a constant: no term.
    ///
    /// - Complexity: `2 · L · w²` FLOPs with weights, `L · w` without; `tile` and one GEMM
    ///   workspace.
    static func expand(_ g: UnsafePointer<Float>, ldg: Int, length: Int, compression c: Int, width: Int,
                       weights: UnsafePointer<Float>?, into target: MutableTensorView, b: Int, h: Int, rows: Int,
                       tile: UnsafeMutablePointer<Float>, workspace: Gemm.Workspace) {
        if let weights {
            for r in 0..<min(c, length) {
                let windows = ceilDiv(length - r, c)
                for start in stride(from: 0, to: windows, by: expandChunk) {
                    let count = min(expandChunk, windows - start)
                    Gemm.multiply(m: count, n: width, depth: width,
                                  a: MatrixOperand(base: g + start * ldg, rowStride: ldg, columnStride: 1),
                                  b: .matrix(MatrixOperand(base: weights + r * width * width, rowStride: width,
                                                           columnStride: 1)),
                                  c: tile, ldc: width, workspace: workspace)
                    for n in 0..<count { target.storeRow(b, h, (start + n) * c + r, from: tile + n * width, count: width) }
                }
            }
        } else {
            for t in 0..<compressedLength(length, compression: c) {
                let count = min(c, length - t * c)
                let weight = 1 / Float(count), source = g + t * ldg
                for x in 0..<width { tile[x] = weight * source[x] }
                for r in 0..<count { target.storeRow(b, h, t * c + r, from: tile, count: width) }
            }
        }
        for j in max(0, length)..<rows { target.zeroRow(b, h, j, count: width) }
    }

    /// Adds the gradient of the weight `W_r` (`[out, in]`, `width × width` at `dW`, row-major)
    /// through head `(b, h)` of ``compress(_:b:h:length:compression:width:weights:bias:into:ldo:workspace:)``
    /// with compressed-row gradients `g` (rows `ldg` apart): `dW_r += G_rᵀ X_r`, where `X_r`
    /// holds rows `r, r + c, …` below `length` of `source` and `G_r` the gradients of their
    /// windows; one GEMM reading both in place.
    ///
    /// - Complexity: `2 · ⌈(L − r) / c⌉ · w²` FLOPs, one GEMM workspace.
    static func accumulateWeightGradient(_ g: UnsafePointer<Float>, ldg: Int, source: TensorView, b: Int, h: Int,
                                         length: Int, compression c: Int, offset r: Int, width: Int,
                                         into dW: UnsafeMutablePointer<Float>, workspace: Gemm.Workspace) {
        guard r < length else { return }
        Gemm.multiply(m: width, n: width, depth: ceilDiv(length - r, c),
                      a: MatrixOperand(base: g, rowStride: 1, columnStride: ldg),
                      b: .matrix(MatrixOperand(base: source.row(b, h, r), rowStride: c * source.strides[2],
                                               columnStride: source.strides[3])),
                      c: dW, ldc: width, accumulate: true, workspace: workspace)
    }
}
