// SinkhornAttention against a reference of the spec's definition written here, in Double
// (with the same code in Float as the error yardstick): block sums, log-space balancing
// (causal: column sums over earlier rows), block mixing, one softmax over the sorted and
// the own block (SortCut: the first n sorted blocks). N not a multiple of the block, odd D,
// Dv ≠ D, grouped heads, key padding, causal, SortCut, Gumbel noise, given logits; one
// block; a hard permutation; bad configurations; thread counts.

@_spi(Testing) import EfficientAttention
import Foundation
import Testing

/// The spec's Sinkhorn attention in precision `T`; returns the result and the plans
/// `[B][H][t][u]`.
private func sinkhornReference<T: BinaryFloatingPoint>(
    _ q: Tensor, _ k: Tensor, _ v: Tensor, bs: Int, iterations: Int, tau: Double, causal: Bool, sortCut: Int?,
    keyLengths: [Int]?, logits given: Tensor? = nil, noise: ((Int, Int, Int, Int) -> Double)? = nil, as _: T.Type
) -> (result: ReferenceResult<T>, plans: [[[[T]]]]) {
    let (bsz, heads, n, d) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3])
    let (hkv, dv) = (k.shape[1], v.shape[3])
    let nb = (n + bs - 1) / bs, scale = T(1 / Double(d).squareRoot())
    func exp(_ x: T) -> T { T(Foundation.exp(Double(x))) }
    func log(_ x: T) -> T { T(Foundation.log(Double(x))) }
    var result = ReferenceResult<T>(batch: bsz, heads: heads, queryLength: n, valueDim: dv,
                                    output: .init(repeating: 0, count: bsz * heads * n * dv),
                                    lse: .init(repeating: -.infinity, count: bsz * heads * n))
    var plans: [[[[T]]]] = []
    for b in 0..<bsz {
        let length = keyLengths?[b] ?? n, valid = (length + bs - 1) / bs
        var headPlans: [[[T]]] = []
        for h in 0..<heads {
            let hk = h / (heads / hkv)
            var logP = [[T]](repeating: [T](repeating: -.infinity, count: nb), count: nb)
            for t in 0..<nb { for u in 0..<nb where u < valid && (!causal || u < t) {
                var r: T
                if let given { r = T(given[b, h, t, u]) } else {
                    r = 0
                    for c in 0..<d {
                        var qs: T = 0, ks: T = 0
                        for i in (t * bs)..<min(n, t * bs + bs) { qs += T(q[b, h, i, c]) }
                        for j in (u * bs)..<min(length, u * bs + bs) { ks += T(k[b, hk, j, c]) }
                        r += qs * ks
                    }
                    r *= scale
                }
                logP[t][u] = r / T(tau) + T(noise?(b, h, t, u) ?? 0)
            } }
            func lse(_ xs: [T]) -> T {
                let m = xs.max() ?? -.infinity
                return m == -.infinity ? m : m + log(xs.reduce(0) { $0 + exp($1 - m) })
            }
            for _ in 0..<iterations {
                for t in 0..<nb {
                    let total = lse(logP[t])
                    if total > -.infinity { for u in 0..<nb { logP[t][u] -= total } }
                }
                let before = logP
                for u in 0..<nb { for t in 0..<nb where before[t][u] > -.infinity {
                    let rows = causal ? Array(0...t) : Array(0..<nb)
                    logP[t][u] = before[t][u] - lse(rows.map { before[$0][u] })
                } }
            }
            let plan = logP.map { $0.map { exp($0) } }
            headPlans.append(plan)
            let rows = min(bs, length)
            for i in 0..<n {
                let t = i / bs
                var keys: [[T]] = [], values: [[T]] = []
                func sorted(_ s: Int) {
                    for r in 0..<rows {
                        var kr = [T](repeating: 0, count: d), vr = [T](repeating: 0, count: dv)
                        for u in 0..<nb where u * bs + r < length {
                            for c in 0..<d { kr[c] += plan[s][u] * T(k[b, hk, u * bs + r, c]) }
                            for c in 0..<dv { vr[c] += plan[s][u] * T(v[b, hk, u * bs + r, c]) }
                        }
                        keys.append(kr)
                        values.append(vr)
                    }
                }
                if let cut = sortCut {
                    for s in 0..<cut { sorted(s) }
                } else {
                    if !(causal && t == 0) { sorted(t) }
                    for j in (t * bs)..<max(t * bs, min(length, t * bs + bs)) where !causal || j <= i {
                        keys.append((0..<d).map { T(k[b, hk, j, $0]) })
                        values.append((0..<dv).map { T(v[b, hk, j, $0]) })
                    }
                }
                guard !keys.isEmpty else { continue }
                let scores = keys.map { key in scale * (0..<d).reduce(T(0)) { $0 + T(q[b, h, i, $1]) * key[$1] } }
                let m = scores.max()!
                let weights = scores.map { exp($0 - m) }
                let total = weights.reduce(0, +)
                let row = result.row(b, h, i)
                result.lse[row] = m + log(total)
                for (e, value) in values.enumerated() {
                    for c in 0..<dv { result.output[row * dv + c] += weights[e] / total * value[c] }
                }
            }
        }
        plans.append(headPlans)
    }
    return (result, plans)
}

@Suite("SinkhornAttention")
struct SinkhornAttentionTests {
    static let cases: [(bs: Int, n: Int, d: Int, dv: Int, causal: Bool, sortCut: Int?)] = [
        (8, 45, 3, 3, false, nil), (8, 45, 3, 3, true, nil), (5, 33, 1, 1, true, nil),
        (16, 100, 65, 16, false, nil), (16, 100, 16, 16, true, nil), (7, 50, 8, 5, false, 2),
        (10, 64, 8, 8, false, 7), (64, 40, 8, 8, false, nil), (64, 40, 8, 8, true, nil),
    ]

    func check(_ attention: SinkhornAttention, batch: Int = 1, heads: Int, kvHeads: Int, n: Int, d: Int, dv: Int,
               keyLengths: [Int]? = nil, threads: Int? = nil, logits: Tensor? = nil, seed: UInt64, _ label: String,
               sourceLocation: SourceLocation = #_sourceLocation) throws {
        let (q, k, v) = try randomQKV(batch: batch, heads: heads, kvHeads: kvHeads, queryLength: n,
                                      headDim: d, valueDim: dv, seed: seed)
        let result = try attention.attend(query: q, key: k, value: v, sortLogits: logits, keyLengths: keyLengths,
                                          threads: threads)
        let reference = sinkhornReference(q, k, v, bs: attention.blockSize, iterations: attention.iterations,
                                          tau: Double(attention.temperature), causal: attention.causal,
                                          sortCut: attention.sortCut, keyLengths: keyLengths, logits: logits, as: Double.self)
        let naive = sinkhornReference(q, k, v, bs: attention.blockSize, iterations: attention.iterations,
                                      tau: Double(attention.temperature), causal: attention.causal,
                                      sortCut: attention.sortCut, keyLengths: keyLengths, logits: logits, as: Float.self)
        checkAttention(result, reference: reference.result, naive: naive.result, label, sourceLocation: sourceLocation)
        // The exposed plan against the reference's.
        let plans = try attention.permutation(query: q, key: k, keyLengths: keyLengths, sortLogits: logits, threads: threads)
        var worst = 0.0
        for b in 0..<batch { for h in 0..<heads {
            for (t, row) in reference.plans[b][h].enumerated() { for (u, p) in row.enumerated() {
                worst = max(worst, abs(Double(plans[b, h, t, u]) - p))
            } }
        } }
        #expect(worst < 1e-4, "\(label): plan differs from the reference by \(worst)", sourceLocation: sourceLocation)
    }

    @Test("matches the reference", arguments: cases.indices)
    func reference(_ index: Int) throws {
        let c = SinkhornAttentionTests.cases[index]
        try check(SinkhornAttention(blockSize: c.bs, sortCut: c.sortCut, causal: c.causal), heads: 2, kvHeads: 1,
                  n: c.n, d: c.d, dv: c.dv, seed: 6000 + UInt64(index), "sinkhorn \(c)")
    }

    @Test("key padding, batches, grouped heads, iterations and temperature")
    func padding() throws {
        for causal in [false, true] {
            for sortCut in causal ? [nil] : [nil, 3] as [Int?] {
                try check(SinkhornAttention(blockSize: 6, iterations: 3, temperature: 0.4, sortCut: sortCut, causal: causal),
                          batch: 3, heads: 4, kvHeads: 2, n: 40, d: 8, dv: 6, keyLengths: [40, 0, 15], threads: 2,
                          seed: 6100, "sinkhorn padded causal \(causal) sortCut \(String(describing: sortCut))")
            }
        }
        try check(SinkhornAttention(blockSize: 8, iterations: 0), heads: 2, kvHeads: 2, n: 30, d: 4, dv: 4,
                  keyLengths: [5], seed: 6101, "sinkhorn 0 iterations, L < block")
    }

    @Test("given sort logits; a permutation-shaped R at a small temperature is the hard permutation")
    func givenLogits() throws {
        let (bs, n, d) = (4, 16, 8), nb = 4, order = [2, 0, 3, 1]
        var r = [Float](repeating: 0, count: 2 * nb * nb)
        for h in 0..<2 { for t in 0..<nb { r[(h * nb + t) * nb + order[t]] = 1 } }
        let logits = try Tensor(shape: [1, 2, nb, nb], data: r)
        let attention = SinkhornAttention(blockSize: bs, temperature: 0.01)
        try check(SinkhornAttention(blockSize: bs, temperature: 0.5), heads: 2, kvHeads: 1, n: n, d: d, dv: d,
                  logits: logits, seed: 6200, "sinkhorn given logits")
        let (q, k, v) = try randomQKV(heads: 2, kvHeads: 1, queryLength: n, headDim: d, seed: 6201)
        let plan = try attention.permutation(query: q, key: k, sortLogits: logits)
        for h in 0..<2 { for t in 0..<nb { for u in 0..<nb {
            #expect(abs(plan[0, h, t, u] - (u == order[t] ? 1 : 0)) < 1e-6, "plan[\(h), \(t), \(u)] = \(plan[0, h, t, u])")
        } } }
        // The sorted block of t is block order[t]: attention over [K_order[t]; K_t].
        let result = try attention.attend(query: q, key: k, value: v, sortLogits: logits)
        let visible: Visibility = { _, _, i, j in j / bs == i / bs || j / bs == order[i / bs] }
        var worst: Float = 0
        let reference = referenceAttention(query: q, key: k, value: v, scale: defaultScale(headDim: d), visible: visible)
        for h in 0..<2 { for i in 0..<n {
            let row = reference.row(0, h, i)
            // Where the sorted block is the own block, its keys count twice: + log 2 in lse.
            let twice = order[i / bs] == i / bs
            worst = max(worst, abs(result.logSumExp[0, h, i, 0] - Float(reference.lse[row] + (twice ? Foundation.log(2) : 0))))
            for c in 0..<d { worst = max(worst, abs(result.output[0, h, i, c] - Float(reference.output[row * d + c]))) }
        } }
        #expect(worst < 1e-5, "hard permutation: max difference \(worst)")
    }

    @Test("one block is dense attention over [K; K]")
    func oneBlock() throws {
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 50, headDim: 16, seed: 6300)
        let sinkhorn = try SinkhornAttention(blockSize: 64).attend(query: q, key: k, value: v)
        let dense = try DenseAttention().attend(query: q, key: k, value: v)
        var worst: Float = 0
        for (a, b) in zip(sinkhorn.output.elements, dense.output.elements) { worst = max(worst, abs(a - b)) }
        for (a, b) in zip(sinkhorn.logSumExp.elements, dense.logSumExp.elements) { worst = max(worst, abs(a - b - logf(2))) }
        #expect(worst < 2e-6, "one block vs dense: \(worst)")
    }

    @Test("Gumbel noise is seeded; thread counts give the same bits")
    func determinism() throws {
        let (q, k, v) = try randomQKV(batch: 2, heads: 4, kvHeads: 2, queryLength: 300, headDim: 32, seed: 6400)
        for attention in [SinkhornAttention(blockSize: 16), SinkhornAttention(blockSize: 16, causal: true),
                          SinkhornAttention(blockSize: 16, noiseSeed: 3), SinkhornAttention(blockSize: 20, sortCut: 4)] {
            let one = try attention.attend(query: q, key: k, value: v, keyLengths: [300, 123], threads: 1)
            for threads in [2, 3, 7] {
                expectBitwiseEqual(one, try attention.attend(query: q, key: k, value: v, keyLengths: [300, 123], threads: threads),
                                   "sinkhorn \(attention) threads \(threads)")
            }
        }
        let noisy = try SinkhornAttention(blockSize: 16, noiseSeed: 3).permutation(query: q, key: k)
        let again = try SinkhornAttention(blockSize: 16, noiseSeed: 3).permutation(query: q, key: k)
        let quiet = try SinkhornAttention(blockSize: 16).permutation(query: q, key: k)
        #expect(noisy == again && noisy != quiet)
        try checkReadsOnlyAddressedElements(SinkhornAttention(blockSize: 12, causal: true), heads: 2, queryLength: 70, "sinkhorn")
    }

    @Test("cost counts the pairs")
    func cost() throws {
        let shape = AttentionShape(heads: 2, queryLength: 10, headDim: 4)
        // Blocks of 4: sizes 4, 4, 2; sorted rows 4.
        let plain = try SinkhornAttention(blockSize: 4).cost(shape, threads: 1)
        #expect(plain.scoredPairs == 2 * (4 * 4 + 4 * 4 + 4 * 4 + 4 * 4 + 2 * 4 + 2 * 2))
        let causal = try SinkhornAttention(blockSize: 4, causal: true).cost(shape, threads: 1)
        #expect(causal.scoredPairs == 2 * (10 + 4 * 4 + 10 + 2 * 4 + 3))
        let cut = try SinkhornAttention(blockSize: 4, sortCut: 2).cost(shape, threads: 1)
        #expect(cut.scoredPairs == 2 * 10 * 8)
    }

    @Test("bad configurations throw")
    func errors() throws {
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 12, headDim: 4, seed: 6500)
        expectAttentionError(.invalidParameter, mentioning: ["blockSize", "at least 1"]) {
            try SinkhornAttention(blockSize: 0).attend(query: q, key: k, value: v)
        }
        expectAttentionError(.unsupported, mentioning: ["sortCut", "causal"]) {
            try SinkhornAttention(blockSize: 4, sortCut: 1, causal: true).attend(query: q, key: k, value: v)
        }
        expectAttentionError(.invalidParameter, mentioning: ["sortCut", "at most 3"]) {
            try SinkhornAttention(blockSize: 4, sortCut: 4).attend(query: q, key: k, value: v)
        }
        expectAttentionError(.invalidParameter, mentioning: ["iterations", "at least 0"]) {
            try SinkhornAttention(iterations: -1).attend(query: q, key: k, value: v)
        }
        for tau in [Float(0), -1, .nan, .infinity] {
            expectAttentionError(.invalidParameter, mentioning: ["temperature"]) {
                try SinkhornAttention(temperature: tau).attend(query: q, key: k, value: v)
            }
        }
        expectAttentionError(.shapeMismatch, mentioning: ["sortLogits", "[1, 2, 3, 3]"]) {
            try SinkhornAttention(blockSize: 4).attend(query: q, key: k, value: v, sortLogits: try Tensor(shape: [1, 2, 3, 2]))
        }
        expectAttentionError(.invalidParameter, mentioning: ["sortLogits[0]", "finite"]) {
            try SinkhornAttention(blockSize: 4).attend(query: q, key: k, value: v,
                                                       sortLogits: try Tensor(shape: [1, 2, 3, 3], repeating: .nan))
        }
        let (q2, k2, v2) = try randomQKV(heads: 2, queryLength: 12, keyLength: 16, headDim: 4, seed: 6501)
        expectAttentionError(.unsupported, mentioning: ["queryLength (12) must equal keyLength (16)"]) {
            try SinkhornAttention().attend(query: q2, key: k2, value: v2)
        }
    }
}
