/// The output of one attention call together with each row's log-sum-exp.
///
/// `logSumExp[b, h, i, 0] = log Σ_j exp(s(i, j))` over the keys visible to query `i`
/// (natural log, scores already scaled), `-infinity` for a row with no visible key.
/// Two results over disjoint key sets merge exactly with ``merged(with:)``.
public struct AttentionResult: Sendable, Equatable {
    /// `[B, H, Nq, Dv]`.
    public var output: Tensor
    /// `[B, H, Nq, 1]`.
    public var logSumExp: Tensor

    public init(output: Tensor, logSumExp: Tensor) throws {
        let o = output.shape, l = logSumExp.shape
        guard l[0] == o[0], l[1] == o[1], l[2] == o[2], l[3] == 1 else {
            throw AttentionError.shapeMismatch("logSumExp \(l) must be [B, H, Nq, 1] for output \(o)")
        }
        self.output = output
        self.logSumExp = logSumExp
    }

    /// The result over the union of the key sets of `self` and `other` (disjoint):
    /// `lse = log(exp(lse₁) + exp(lse₂))`, `o = exp(lse₁ − lse) o₁ + exp(lse₂ − lse) o₂`.
    /// A row with no visible key on one side takes the other side unchanged.
    ///
    /// - Complexity: O(B · H · Nq · Dv).
    public func merged(with other: AttentionResult) throws -> AttentionResult {
        guard output.shape == other.output.shape else {
            throw AttentionError.shapeMismatch(
                "cannot merge results of shapes \(output.shape) and \(other.output.shape)")
        }
        let s = output.shape
        var out = try Tensor(shape: s)
        var lse = try Tensor(shape: [s[0], s[1], s[2], 1])
        var rowA = [Float](repeating: 0, count: s[3]), rowB = rowA
        for b in 0..<s[0] { for h in 0..<s[1] { for i in 0..<s[2] {
            for d in 0..<s[3] { rowA[d] = output[b, h, i, d]; rowB[d] = other.output[b, h, i, d] }
            let merged = mergeRows(rowA, logSumExp[b, h, i, 0], rowB, other.logSumExp[b, h, i, 0])
            for d in 0..<s[3] { out[b, h, i, d] = merged.row[d] }
            lse[b, h, i, 0] = merged.lse
        } } }
        return try AttentionResult(output: out, logSumExp: lse)
    }
}

/// Merges two partial softmax-attention rows over disjoint key sets (see
/// ``AttentionResult/merged(with:)``). Exact up to rounding; never NaN for finite rows.
func mergeRows(_ a: [Float], _ lseA: Float, _ b: [Float], _ lseB: Float) -> (row: [Float], lse: Float) {
    let w = mergeWeights(lseA, lseB)
    var row = a
    for d in row.indices { row[d] = w.first * a[d] + w.second * b[d] }
    return (row, w.lse)
}

/// The weights of two partial rows over disjoint key sets with log-sum-exps `lseA`
/// and `lseB`: the merged row is `first · a + second · b` and its log-sum-exp `lse`.
/// A side with `lse = -infinity` gets weight 0 (the other side is taken unchanged).
@inline(__always)
func mergeWeights(_ lseA: Float, _ lseB: Float) -> (first: Float, second: Float, lse: Float) {
    if lseA == -.infinity { return (0, 1, lseB) }
    if lseB == -.infinity { return (1, 0, lseA) }
    // Both sides have visible keys here; only a NaN log-sum-exp finds no maximum.
    guard var merge = LogSumExpMerge(maximum: max(lseA, lseB)) else { return (.nan, .nan, .nan) }
    let wa = merge.weight(lseA), wb = merge.weight(lseB)
    merge.add(wa)
    merge.add(wb)
    return (wa / merge.total, wb / merge.total, merge.logSumExp)
}
