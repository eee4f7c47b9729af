// Central finite differences of a conformer's own forward, against its backward: the
// check every backward suite runs on a tiny shape.

@_spi(Testing) import EfficientAttention

/// The largest difference between `attention`'s gradients of `L = Σ dO ∘ O` (the library's
/// backward, 3 threads) and central finite differences of its forward (step `h` on every
/// element of `q`, `k` and `v`, 1 thread), and the largest |gradient|. Truncation `O(h²)`
/// and Float rounding `O(ε / h)` are both far below the suites' tolerances at `h = 1e-2`.
func finiteDifferenceGap(_ attention: some DifferentiableAttention, query q: Tensor, key k: Tensor, value v: Tensor,
                         outputGradient dO: Tensor, keyLengths: [Int]?, h: Float = 1e-2)
    throws -> (worst: Double, largest: Double) {
    let result = try attention.attend(query: q, key: k, value: v, keyLengths: keyLengths, threads: 1)
    let g = try attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                    keyLengths: keyLengths, threads: 3)
    func loss(_ q: Tensor, _ k: Tensor, _ v: Tensor) throws -> Double {
        let o = try attention.attend(query: q, key: k, value: v, keyLengths: keyLengths, threads: 1).output
        return zip(o.elements, dO.elements).reduce(0) { $0 + Double($1.0) * Double($1.1) }
    }
    var worst = 0.0, largest = 0.0
    for which in 0..<3 {
        let x = [q, k, v][which], analytic = [g.dQuery, g.dKey, g.dValue][which].elements
        for n in 0..<x.count {
            var plus = x.elements, minus = x.elements
            plus[n] += h
            minus[n] -= h
            let (p, m) = (try Tensor(shape: x.shape, data: plus), try Tensor(shape: x.shape, data: minus))
            let lp = which == 0 ? try loss(p, k, v) : which == 1 ? try loss(q, p, v) : try loss(q, k, p)
            let lm = which == 0 ? try loss(m, k, v) : which == 1 ? try loss(q, m, v) : try loss(q, k, m)
            let numeric = (lp - lm) / (2 * Double(h))
            worst = max(worst, abs(numeric - Double(analytic[n])))
            largest = max(largest, abs(Double(analytic[n])))
        }
    }
    return (worst, largest)
}
