import EfficientAttention

/// Naive softmax attention in Double: for every query row, the softmax over the keys
/// `visible(h, i, j, Nq, Nk)` accepts (keys at `j >= keyLength[b]` are never visible),
/// with query head `h` reading key/value head `h / (H / Hkv)`, and the score modifiers of
/// ATTENTION_SPEC.md: `s ← cap·tanh(s/cap)`, `s ← s + bias − α_h·|i + Nk − Nq − j|` (a key
/// whose score is then `−∞` is not visible), a sink `e^{σ_h}` in the denominator. Rows with
/// no visible key are 0 with log-sum-exp `σ_h`, or `-inf` without sinks.
///
/// - Complexity: O(B · H · Nq · Nk · (D + Dv)) time, O(Nk) extra memory.
func naiveAttention(query: Tensor, key: Tensor, value: Tensor, keyLengths: [Int]?, scale: Double,
                    modifiers m: ScoreModifiers = ScoreModifiers(),
                    visible: (_ h: Int, _ i: Int, _ j: Int, _ nq: Int, _ nk: Int) -> Bool) -> (output: [Double], lse: [Double]) {
    let (b, h, nq, d) = (query.shape[0], query.shape[1], query.shape[2], query.shape[3])
    let (hkv, nk, dv) = (key.shape[1], key.shape[2], value.shape[3])
    var output = [Double](repeating: 0, count: b * h * nq * dv)
    var lse = [Double](repeating: -.infinity, count: b * h * nq)
    var scores = [Double](repeating: 0, count: nk)
    for bi in 0..<b {
        let end = keyLengths?[bi] ?? nk
        for hi in 0..<h {
            let g = hi / (h / hkv)
            let sink = m.sinks.map { Double($0[hi]) }
            for i in 0..<nq {
                var keys: [Int] = []
                for j in 0..<end where visible(hi, i, j, nq, nk) {
                    var s = 0.0
                    for c in 0..<d { s += Double(query[bi, hi, i, c]) * Double(key[bi, g, j, c]) }
                    s *= scale
                    if let cap = m.softCap.map(Double.init) { s = cap * Foundation.tanh(s / cap) }
                    if let bias = m.bias {
                        s += Double(bias[bias.shape[0] == 1 ? 0 : bi, bias.shape[1] == 1 ? 0 : hi, i, j])
                    }
                    if let slopes = m.alibiSlopes { s -= Double(slopes[hi]) * Double(abs(i + nk - nq - j)) }
                    if s > -.infinity {
                        scores[j] = s
                        keys.append(j)
                    }
                }
                let top = max(keys.map { scores[$0] }.max() ?? -.infinity, sink ?? -.infinity)
                guard top > -.infinity else { continue }
                var sum = sink.map { ($0 - top).exp() } ?? 0
                for j in keys { scores[j] = (scores[j] - top).exp(); sum += scores[j] }
                let row = ((bi * h + hi) * nq + i) * dv
                for j in keys {
                    for c in 0..<dv { output[row + c] += scores[j] / sum * Double(value[bi, g, j, c]) }
                }
                lse[(bi * h + hi) * nq + i] = top + sum.log()
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
