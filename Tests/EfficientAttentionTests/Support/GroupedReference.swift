// Reference support for the content-routing conformers (LSH, routing): visibility from
// an explicit per-round boolean table, and the exact merges of several partial results
// (log-sum-exp across LSH rounds, the mean across routing memberships).

import EfficientAttention
import Foundation

/// A dense visibility table `[rounds][B][H][Nq][Nk]` (tests only: tiny problems).
struct VisibilityTable: Sendable {
    var rounds: Int, batch: Int, heads: Int, queryLength: Int, keyLength: Int
    var bits: [Bool]

    init(rounds: Int, batch: Int, heads: Int, queryLength: Int, keyLength: Int) {
        (self.rounds, self.batch, self.heads, self.queryLength, self.keyLength)
            = (rounds, batch, heads, queryLength, keyLength)
        bits = [Bool](repeating: false, count: rounds * batch * heads * queryLength * keyLength)
    }

    func index(_ r: Int, _ b: Int, _ h: Int, _ i: Int, _ j: Int) -> Int {
        (((r * batch + b) * heads + h) * queryLength + i) * keyLength + j
    }

    subscript(_ r: Int, _ b: Int, _ h: Int, _ i: Int, _ j: Int) -> Bool {
        get { bits[index(r, b, h, i, j)] }
        set { bits[index(r, b, h, i, j)] = newValue }
    }

    func round(_ r: Int) -> Visibility {
        let table = self
        return { b, h, i, j in table[r, b, h, i, j] }
    }
}

/// The exact log-sum-exp merge of per-round results over the same queries:
/// `lse = log Σ_r exp(lse_r)`, `o = Σ_r exp(lse_r − lse) o_r` (rows empty in every round stay 0, −∞).
func mergeByLogSumExp<T: BinaryFloatingPoint & Comparable>(_ parts: [ReferenceResult<T>],
                                                          exp: (T) -> T, log: (T) -> T) -> ReferenceResult<T> {
    var merged = parts[0]
    let dv = merged.valueDim
    for row in merged.lse.indices {
        let m = parts.map { $0.lse[row] }.max()!
        guard m > -T.infinity else {
            merged.lse[row] = -T.infinity
            for c in 0..<dv { merged.output[row * dv + c] = 0 }
            continue
        }
        let weights = parts.map { $0.lse[row] > -T.infinity ? exp($0.lse[row] - m) : 0 }
        let total = weights.reduce(0, +)
        merged.lse[row] = m + log(total)
        for c in 0..<dv {
            var sum: T = 0
            for (part, w) in zip(parts, weights) where w > 0 { sum += w / total * part.output[row * dv + c] }
            merged.output[row * dv + c] = sum
        }
    }
    return merged
}

/// The mean over memberships: row `row` averages the parts `member(part, row)` selects
/// among those with a finite lse; lse is the log of the mean of their `exp(lse)`.
func mergeByMean<T: BinaryFloatingPoint & Comparable>(_ parts: [ReferenceResult<T>], member: (Int, Int) -> Bool,
                                                     exp: (T) -> T, log: (T) -> T) -> ReferenceResult<T> {
    var merged = parts[0]
    let dv = merged.valueDim
    for row in merged.lse.indices {
        let chosen = parts.indices.filter { member($0, row) && parts[$0].lse[row] > -T.infinity }
        for c in 0..<dv { merged.output[row * dv + c] = 0 }
        guard !chosen.isEmpty else { merged.lse[row] = -T.infinity; continue }
        let m = chosen.map { parts[$0].lse[row] }.max()!
        let total = chosen.map { exp(parts[$0].lse[row] - m) }.reduce(0, +)
        merged.lse[row] = m + log(total / T(chosen.count))
        for c in 0..<dv {
            merged.output[row * dv + c] = chosen.map { parts[$0].output[row * dv + c] }.reduce(0, +) / T(chosen.count)
        }
    }
    return merged
}

/// Reference (Double) and naive Float results for a problem whose visibility is a table of
/// rounds, combined by `combine` (a Double and a Float version of the same merge).
func groupedReferences(query: Tensor, key: Tensor, value: Tensor, scale: Float,
                       table: VisibilityTable,
                       combineDouble: ([ReferenceResult<Double>]) -> ReferenceResult<Double>,
                       combineFloat: ([ReferenceResult<Float>]) -> ReferenceResult<Float>)
    -> (reference: ReferenceResult<Double>, naive: ReferenceResult<Float>) {
    let doubles = (0..<table.rounds).map {
        referenceAttention(query: query, key: key, value: value, scale: Double(scale), visible: table.round($0))
    }
    let floats = (0..<table.rounds).map {
        naiveFloatAttention(query: query, key: key, value: value, scale: scale, visible: table.round($0))
    }
    return (combineDouble(doubles), combineFloat(floats))
}

/// Rows of `tensor` scaled to unit length (zero rows stay zero), in Float.
func unitRows(_ tensor: Tensor) throws -> Tensor {
    let s = tensor.shape
    var values = tensor.elements
    for row in 0..<(s[0] * s[1] * s[2]) {
        let base = row * s[3]
        let norm = (0..<s[3]).reduce(Float(0)) { $0 + values[base + $1] * values[base + $1] }.squareRoot()
        let inverse: Float = norm > 0 ? 1 / norm : 0
        for c in 0..<s[3] { values[base + c] *= inverse }
    }
    return try Tensor(shape: s, data: values)
}

/// `tensor` `[B, Hkv, N, D]` with each head repeated to `heads` heads (head `h` is head `h / (heads / Hkv)`).
func repeatedHeads(_ tensor: Tensor, to heads: Int) throws -> Tensor {
    let s = tensor.shape
    var values = [Float]()
    for b in 0..<s[0] { for h in 0..<heads { for i in 0..<s[2] { for c in 0..<s[3] {
        values.append(tensor[b, h / (heads / s[1]), i, c])
    } } } }
    return try Tensor(shape: [s[0], heads, s[2], s[3]], data: values)
}
