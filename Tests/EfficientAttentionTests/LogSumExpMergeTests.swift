// LogSumExpMerge, the one log-sum-exp merge of partial attention rows, against a Double
// reference: fully masked parts (−∞), every part masked, unnormalised parts (sum l),
// log-sum-exp gaps past Float's exp range (underflowing weights), and the merge of
// AttentionResult built on it.

@_spi(Testing) @_spi(Benchmarking) import EfficientAttention
import Foundation
import Testing

/// One partial row: a normalised row and its log-sum-exp `lse` (`−∞` when fully masked), or
/// an unnormalised row with running max `lse` and row sum `sum` (log-sum-exp `lse + log sum`).
private struct Part {
    var lse: Float
    var sum: Float = 1
    var row: [Float]
}

/// The exact merge in Double: `lse = log Σ_c e^(lse_c)`, `o = Σ_c e^(lse_c − lse) · row_c / sum_c`;
/// `nil` when every part is masked.
private func referenceMerge(_ parts: [Part]) -> (row: [Double], lse: Double)? {
    let partLSE = parts.map { Double($0.lse) + log(Double($0.sum)) }
    let m = partLSE.max()!
    guard m > -.infinity else { return nil }
    let total = partLSE.reduce(0.0) { $0 + exp($1 - m) }
    let lse = m + log(total)
    var row = [Double](repeating: 0, count: parts[0].row.count)
    for (part, partLSE) in zip(parts, partLSE) where partLSE > -.infinity {
        let weight = exp(partLSE - lse) / Double(part.sum)
        for x in row.indices { row[x] += weight * Double(part.row[x]) }
    }
    return (row, lse)
}

/// The merge as the kernels write it with the primitive: weights, `total` with each part's
/// sum, rows added with `weight / total`.
private func primitiveMerge(_ parts: [Part], stride: Int) -> (row: [Float], lse: Float)? {
    let dv = parts[0].row.count
    guard var merge = LogSumExpMerge(maximum: parts.map(\.lse).max()!) else { return nil }
    for part in parts { merge.add(merge.weight(part.lse), sum: part.sum) }
    var out = [Float](repeating: .nan, count: dv * stride)
    for x in 0..<dv { out[x * stride] = 0 }
    out.withUnsafeMutableBufferPointer { o in
        for part in parts where part.lse > -.infinity {
            part.row.withUnsafeBufferPointer { row in
                LogSumExpMerge.accumulate(merge.weight(part.lse) / merge.total, row.baseAddress!,
                                          into: o.baseAddress!, stride: stride, count: dv)
            }
        }
    }
    return ((0..<dv).map { out[$0 * stride] }, merge.logSumExp)
}

@Suite("LogSumExpMerge")
struct LogSumExpMergeTests {
    /// Rows of 19 values in -1...1 (19: not a multiple of any vector width).
    private func rows(_ count: Int, seed: UInt64) -> [[Float]] {
        var generator = SeededGenerator(seed: seed)
        return (0..<count).map { _ in (0..<19).map { _ in Float.random(in: -1...1, using: &generator) } }
    }

    private func check(_ parts: [Part], _ label: String) {
        let expected = referenceMerge(parts)
        for stride in [1, 3] {
            let merged = primitiveMerge(parts, stride: stride)
            guard let expected, let merged else {
                #expect(expected == nil && merged == nil, "\(label): masked everywhere on one side only")
                continue
            }
            #expect(abs(Double(merged.lse) - expected.lse) <= 1e-6 * max(1, abs(expected.lse)), "\(label) lse")
            for x in expected.row.indices {
                #expect(abs(Double(merged.row[x]) - expected.row[x]) <= 1e-6, "\(label) [\(x)] stride \(stride)")
            }
        }
    }

    @Test("matches the Double reference: masked parts, unnormalised parts, underflowing weights")
    func reference() {
        let r = rows(4, seed: 15)
        check([Part(lse: 0.3, row: r[0]), Part(lse: -1.2, row: r[1])], "two finite")
        check([Part(lse: 2.5, row: r[0]), Part(lse: 2.5, row: r[1]), Part(lse: 1, row: r[2])], "equal maxima")
        check([Part(lse: -.infinity, row: r[0]), Part(lse: 0.7, row: r[1])], "first masked")
        check([Part(lse: 0.7, row: r[0]), Part(lse: -.infinity, row: r[1])], "second masked")
        check([Part(lse: -.infinity, row: r[0]), Part(lse: -.infinity, row: r[1])], "both masked")
        check([Part(lse: 1.5, sum: 7.25, row: r[0].map { $0 * 7.25 }), Part(lse: 0.4, row: r[1])], "unnormalised")
        // A gap of 200 (e^-200 underflows Float): the small part's weight is 0, the result the large part.
        check([Part(lse: -150, row: r[0]), Part(lse: 50, row: r[1])], "gap 200")
        check([Part(lse: 87, row: r[0]), Part(lse: -.infinity, row: r[1]), Part(lse: 0, row: r[2]),
               Part(lse: 86, row: r[3])], "four parts, one masked, one near underflow")
    }

    @Test("exact conventions: weight 1 at the maximum, 0 for masked parts, no merge when all are masked")
    func conventions() {
        #expect(LogSumExpMerge(maximum: -.infinity) == nil)
        var merge = LogSumExpMerge(maximum: 3.75)!
        #expect(merge.weight(3.75) == 1)
        #expect(merge.weight(-.infinity) == 0)
        #expect(merge.weight(3.75 - 200) == 0)
        merge.add(merge.weight(3.75))
        merge.add(merge.weight(-.infinity))
        // One part: total 1, the log-sum-exp passes through unchanged.
        #expect(merge.total == 1)
        #expect(merge.logSumExp == 3.75)
    }

    @Test("AttentionResult.merged, built on it, matches the reference row by row")
    func resultMerge() throws {
        let r = rows(8, seed: 16)
        let lseA: [Float] = [0.5, -.infinity, 3, -.infinity], lseB: [Float] = [-2, 1, -.infinity, -.infinity]
        func result(_ rows: ArraySlice<[Float]>, _ lse: [Float]) throws -> AttentionResult {
            // A masked row holds 0 (the convention of every kernel).
            let values = zip(rows, lse).flatMap { row, l in l > -.infinity ? row : [Float](repeating: 0, count: 19) }
            return try AttentionResult(output: Tensor(shape: [1, 1, 4, 19], data: values),
                                       logSumExp: Tensor(shape: [1, 1, 4, 1], data: lse))
        }
        let merged = try result(r[0..<4], lseA).merged(with: result(r[4..<8], lseB))
        for i in 0..<4 {
            let expected = referenceMerge([Part(lse: lseA[i], row: r[i]), Part(lse: lseB[i], row: r[4 + i])])
            guard let expected else {
                #expect(merged.logSumExp[0, 0, i, 0] == -.infinity)
                for x in 0..<19 { #expect(merged.output[0, 0, i, x] == 0) }
                continue
            }
            #expect(abs(Double(merged.logSumExp[0, 0, i, 0]) - expected.lse) <= 1e-6 * max(1, abs(expected.lse)))
            for x in 0..<19 { #expect(abs(Double(merged.output[0, 0, i, x]) - expected.row[x]) <= 1e-6) }
        }
    }
}
