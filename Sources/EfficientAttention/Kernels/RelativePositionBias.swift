/// The position terms of Transformer-XL's relative attention (Dai et al. 2019) that do not
/// depend on the query: the projected sinusoid table and the two bias rows. The terms that
/// do (`q · r_Δ`) are added tile by tile in the tiled kernel (``RelativePositionMask``).
enum RelativePositionBias {
    /// `r[h, Δ] = W_R[h] · R_Δ` for `Δ < length`, `[H, length, D]` row-major, from a
    /// projection `W_R` `[H, D, E]` (row-major) and the sinusoids of Transformer-XL's code:
    /// `R_Δ = [sin(Δ·f_0) … sin(Δ·f_{E/2−1}), cos(Δ·f_0) … cos(Δ·f_{E/2−1})]`,
    /// `f_t = 10000^(−2t/E)`, `E` even. The angles are computed in Double.
    ///
    /// - Complexity: `O(H · length · D · E)` time, `O(length · E)` scratch.
    static func projectedSinusoids(length: Int, heads: Int, headDim d: Int, sinusoidDim e: Int,
                                   projection w: UnsafePointer<Float>) -> [Float] {
        let half = e / 2
        var sinusoid = [Float](repeating: 0, count: length * e)
        for delta in 0..<length {
            for t in 0..<half {
                let angle = Double(delta) * pow(10_000, -2 * Double(t) / Double(e))
                sinusoid[delta * e + t] = Float(sin(angle))
                sinusoid[delta * e + half + t] = Float(cos(angle))
            }
        }
        var table = [Float](repeating: 0, count: heads * length * d)
        sinusoid.withUnsafeBufferPointer { angles in
            for h in 0..<heads {
                for delta in 0..<length {
                    for c in 0..<d {
                        table[(h * length + delta) * d + c] = dot(w + (h * d + c) * e, 1,
                                                                  angles.baseAddress! + delta * e, 1, count: e)
                    }
                }
            }
        }
        return table
    }

    /// `keyBias[(b·H + h)·Nk + j] = scale · u_h · k[b, hk, j]` and
    /// `distanceBias[h·Nk + Δ] = scale · v_h · r[h, Δ]` for `Δ < Nk`: the content-bias and
    /// position-bias terms of every score, one row per (batch item, head) and per head.
    /// `table` is `[1, tableHeads, T ≥ Nk, D]`, `tableHeads` being `H` or 1 (shared).
    ///
    /// - Complexity: `2 · (B + 1) · H · Nk · D` FLOPs, one work item per row.
    static func biases(shape: AttentionShape, scale: Float, threads: Int,
                       contentBias: UnsafePointer<Float>, positionBias: UnsafePointer<Float>,
                       key k: TensorView, table r: TensorView, tableHeads: Int,
                       keyBias: UnsafeMutablePointer<Float>, distanceBias: UnsafeMutablePointer<Float>) {
        let (nk, d, heads) = (shape.keyLength, shape.headDim, shape.heads)
        let kb = UncheckedSendable(keyBias), db = UncheckedSendable(distanceBias)
        let u = UncheckedSendable(contentBias), pv = UncheckedSendable(positionBias)
        parallelForEach(items: (shape.batch + 1) * heads, threads: threads) { item, _ in
            let b = item / heads, h = item % heads
            if b < shape.batch {
                let hk = h / shape.groupSize
                let out = kb.value + (b * heads + h) * nk
                // u_h as a one-row view: the keys may be 16-bit (widened as they are read).
                let bias = TensorView(base: u.value + h * d, strides: SIMD4(0, 0, 0, 1))
                for j in 0..<nk {
                    out[j] = scale * bias.dot(row: (0, 0, 0), k, row: (b, hk, j), count: d)
                }
            } else {
                let out = db.value + h * nk
                let table = r.row(0, tableHeads == 1 ? 0 : h, 0)
                for delta in 0..<nk {
                    out[delta] = scale * dot(pv.value + h * d, 1, table + delta * r.strides[2],
                                             r.strides[3], count: d)
                }
            }
        }
    }
}
