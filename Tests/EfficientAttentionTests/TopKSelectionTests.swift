// The top-k selection kernel (TopKSelection, Kernels/TopKSelection.swift) against a sort:
// lengths around the 32-score pass masks and the sampling threshold (2048), ties, NaN,
// infinities, and scores ordered so that the sample is unrepresentative.

@_spi(Testing) @_spi(Benchmarking) import EfficientAttention
import Testing

/// The indices of the `take` largest scores, ascending: a stable sort by score descending
/// (NaN as −∞), ties by index.
private func sortedTop(_ scores: [Float], take: Int) -> [Int] {
    let key = scores.map { $0.isNaN ? -Float.infinity : $0 }
    let order = scores.indices.sorted { key[$0] != key[$1] ? key[$0] > key[$1] : $0 < $1 }
    return order.prefix(take).sorted()
}

@Suite("TopKSelection")
struct TopKSelectionTests {
    enum Scores: CaseIterable { case distinct, fewValues, withNaN, ascending }

    static func scores(_ kind: Scores, count: Int, seed: UInt64) -> [Float] {
        var rng = SeededGenerator(seed: seed)
        return (0..<count).map { i in
            switch kind {
            case .distinct: return rng.nextFloat(in: -4...4)
            case .fewValues: return Float(rng.next() % 5) - 2          // many ties
            case .withNaN:
                let r = rng.next() % 16
                return r == 0 ? .nan : r == 1 ? -.infinity : r == 2 ? .infinity : rng.nextFloat(in: -1...1)
            case .ascending: return Float(i)                         // the largest all at the end
            }
        }
    }

    @Test("selects the take largest, ties by index, NaN as −∞",
          arguments: [1, 7, 31, 32, 33, 100, 2047, 2048, 3001, 8192], Scores.allCases)
    func matchesSort(count: Int, kind: Scores) {
        let scores = Self.scores(kind, count: count, seed: UInt64(count))
        for take in Set([1, 2, count / 9 + 1, count / 4, count / 2 + 1, count]) where take >= 1 && take <= count {
            let top = SelectionKernels.topIndices(of: scores, take: take)
            #expect(top == sortedTop(scores, take: take), "count \(count), take \(take), \(kind)")
        }
    }

    @Test("out-of-range take gives no indices")
    func badTake() {
        #expect(SelectionKernels.topIndices(of: [1, 2, 3], take: 0).isEmpty)
        #expect(SelectionKernels.topIndices(of: [1, 2, 3], take: 4).isEmpty)
        #expect(SelectionKernels.topIndices(of: [], take: 1).isEmpty)
    }
}
