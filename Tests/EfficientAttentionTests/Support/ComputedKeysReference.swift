// A Double reference for conformers whose keys are computed (compressed windows, set
// summaries): the keys and values come as Double arrays, so that no Float rounding enters
// the reference before the softmax.

import EfficientAttention
import Foundation

/// Softmax attention in Double over keys and values given as Double arrays
/// `[B, kvHeads, nc, ·]` (computed keys: compressed windows, set summaries), scale `1/√D`.
func referenceAttention(query q: Tensor, keys: [Double], values: [Double], kvHeads: Int, nc: Int, dv: Int,
                             visible: Visibility) -> ReferenceResult<Double> {
    let (bs, heads, nq, d) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3])
    let scale = defaultScale(headDim: d)
    var result = ReferenceResult<Double>(batch: bs, heads: heads, queryLength: nq, valueDim: dv,
                                         output: .init(repeating: 0, count: bs * heads * nq * dv),
                                         lse: .init(repeating: -.infinity, count: bs * heads * nq))
    for b in 0..<bs { for h in 0..<heads { for i in 0..<nq {
        let hk = h / (heads / kvHeads), base = (b * kvHeads + hk) * nc
        let seen = (0..<nc).filter { visible(b, h, i, $0) }
        guard !seen.isEmpty else { continue }
        let scores = seen.map { t in scale * (0..<d).reduce(0.0) { $0 + Double(q[b, h, i, $1]) * keys[(base + t) * d + $1] } }
        let m = scores.max()!
        let weights = scores.map { Foundation.exp($0 - m) }
        let total = weights.reduce(0, +)
        let row = result.row(b, h, i)
        result.lse[row] = m + Foundation.log(total)
        for (n, t) in seen.enumerated() {
            for x in 0..<dv { result.output[row * dv + x] += weights[n] / total * values[(base + t) * dv + x] }
        }
    } } }
    return result
}

