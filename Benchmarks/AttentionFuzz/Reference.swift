import EfficientAttention

/// Naive softmax attention in Double: for every query row, the softmax over the keys
/// `visible(i, j, Nq, Nk_b)` accepts (keys at `j >= keyLength[b]` are never visible),
/// with query head `h` reading key/value head `h / (H / Hkv)`. Rows with no visible key
/// are 0 with log-sum-exp `-inf`.
///
/// - Complexity: O(B · H · Nq · Nk · (D + Dv)) time, O(Nk) extra memory.
func naiveAttention(query: Tensor, key: Tensor, value: Tensor, keyLengths: [Int]?, scale: Double,
                    visible: (_ i: Int, _ j: Int, _ nq: Int, _ nk: Int) -> Bool) -> (output: [Double], lse: [Double]) {
    let (b, h, nq, d) = (query.shape[0], query.shape[1], query.shape[2], query.shape[3])
    let (hkv, nk, dv) = (key.shape[1], key.shape[2], value.shape[3])
    var output = [Double](repeating: 0, count: b * h * nq * dv)
    var lse = [Double](repeating: -.infinity, count: b * h * nq)
    var scores = [Double](repeating: 0, count: nk)
    for bi in 0..<b {
        let end = keyLengths?[bi] ?? nk
        for hi in 0..<h {
            let g = hi / (h / hkv)
            for i in 0..<nq {
                let keys = (0..<end).filter { visible(i, $0, nq, nk) }
                guard !keys.isEmpty else { continue }
                var m = -Double.infinity
                for j in keys {
                    var s = 0.0
                    for c in 0..<d { s += Double(query[bi, hi, i, c]) * Double(key[bi, g, j, c]) }
                    scores[j] = s * scale
                    m = max(m, scores[j])
                }
                var sum = 0.0
                for j in keys { scores[j] = (scores[j] - m).exp(); sum += scores[j] }
                let row = ((bi * h + hi) * nq + i) * dv
                for j in keys {
                    for c in 0..<dv { output[row + c] += scores[j] / sum * Double(value[bi, g, j, c]) }
                }
                lse[(bi * h + hi) * nq + i] = m + sum.log()
            }
        }
    }
    return (output, lse)
}

/// The differences of `result` from a naive reference larger than `tolerance` relative
/// to the row's largest magnitude (at least 1): a message for the first, or nil.
func compare(_ result: AttentionResult, _ reference: (output: [Double], lse: [Double]), tolerance: Double = 1e-4) -> String? {
    let output = result.output.elements, lse = result.logSumExp.elements
    let dv = result.output.shape[3]
    for r in 0..<lse.count {
        let expected = reference.lse[r]
        if expected == -.infinity {
            if lse[r] != -.infinity { return "row \(r): lse \(lse[r]), the reference has no visible key (-inf)" }
        } else if !(abs(Double(lse[r]) - expected) <= tolerance * max(1, abs(expected))) {
            return "row \(r): lse \(lse[r]), reference \(expected)"
        }
        let row = reference.output[(r * dv)..<((r + 1) * dv)]
        let magnitude = max(1, row.map(abs).max() ?? 0)
        for c in 0..<dv where !(abs(Double(output[r * dv + c]) - row[row.startIndex + c]) <= tolerance * magnitude) {
            return "row \(r) column \(c): \(output[r * dv + c]), reference \(row[row.startIndex + c])"
        }
    }
    return nil
}

extension Double {
    func exp() -> Double { Foundation.exp(self) }
    func log() -> Double { Foundation.log(self) }
}

import Foundation
