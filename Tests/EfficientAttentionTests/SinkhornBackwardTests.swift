// SinkhornAttention's backward pass with the plan P held fixed: dQ, dK, dV and ∂L/∂P
// against a Double reference (the library's plan as a fixed input: the sorted blocks
// K̃ = P K, Ṽ = P V, the softmax backward over [K̃_t ; K_t] by hand, the mixing transposed;
// itself checked by central finite differences of the Double forward in q, k, v and P), on
// awkward shapes (N not a multiple of the block, one block, D = 1, 3, 65, Dv != D, grouped
// heads, key padding down to an item with no key and items shorter than a block), causal,
// SortCut and given sort logits; bitwise identical for 1, 2, 3 and 7 threads; the view
// entry point equal to the Tensor convenience; a gradient step with fixed sort logits.

@_spi(Testing) @_spi(Benchmarking) import EfficientAttention
import Foundation
import Testing

/// The Double reference's results: output, log-sum-exp, `dq`, `dk`, `dv`, `∂L/∂P`.
private struct SinkhornReference {
    var output: [Double], lse: [Double], dq: [Double], dk: [Double], dv: [Double], dp: [Double]
}

/// Sinkhorn attention with the plan `plans [B, H, n_b, n_b]` given, and its derivative by
/// hand: the own and sorted keys of query head `h` as one key set `[K ; K̃]` (`K̃_t[r] =
/// Σ_u P_tu k[u·bs + r]`, positions past `L` zero), DenseBackwardTests' softmax backward
/// over it, then `dk[u·bs + r] += Σ_t P_tu dK̃_t[r]` and `∂L/∂P_tu = Σ_r dK̃_t[r]·k[u·bs + r]
/// + dṼ_t[r]·v[u·bs + r]`.
private func sinkhornReference(q: [Double], k: [Double], v: [Double], dO: [Double], plans: [Double],
                               dims n: GradientDims, bs: Int, sortCut: Int?, causal: Bool, scale: Double,
                               keyLengths: [Int]?) -> SinkhornReference {
    let (nk, d, dv, group) = (n.keyLength, n.headDim, n.valueDim, n.heads / n.kvHeads)
    let nb = (nk + bs - 1) / bs, rows = min(bs, nk), outBlocks = sortCut ?? nb
    let na = nk + outBlocks * rows
    func length(_ b: Int) -> Int { keyLengths?[b] ?? nk }
    func plan(_ b: Int, _ h: Int, _ t: Int, _ u: Int) -> Double { plans[((b * n.heads + h) * nb + t) * nb + u] }
    var augmented = n
    (augmented.kvHeads, augmented.keyLength) = (n.heads, na)
    var ka = [Double](repeating: 0, count: n.batch * n.heads * na * d)
    var va = [Double](repeating: 0, count: n.batch * n.heads * na * dv)
    for b in 0..<n.batch { for h in 0..<n.heads {
        let hk = h / group
        for j in 0..<nk {
            let source = n.keyIndex(b, hk, j), target = augmented.keyIndex(b, h, j)
            for c in 0..<d { ka[target * d + c] = k[source * d + c] }
            for c in 0..<dv { va[target * dv + c] = v[source * dv + c] }
        }
        for t in 0..<outBlocks { for r in 0..<rows { for u in 0..<nb where u * bs + r < length(b) {
            let p = plan(b, h, t, u), source = n.keyIndex(b, hk, u * bs + r)
            let target = augmented.keyIndex(b, h, nk + t * rows + r)
            for c in 0..<d { ka[target * d + c] += p * k[source * d + c] }
            for c in 0..<dv { va[target * dv + c] += p * v[source * dv + c] }
        } } }
    } }
    let visible: Visibility = { b, _, i, j in
        let l = keyLengths?[b] ?? nk
        if j < nk { return sortCut == nil && j / bs == i / bs && j < l && (!causal || j <= i) }
        let t = (j - nk) / rows, r = (j - nk) % rows
        guard r < min(rows, l) else { return false }
        if let cut = sortCut { return t < cut }
        return t == i / bs && !(causal && t == 0)
    }
    let dense = referenceBackward(q: q, k: ka, v: va, dO: dO, dims: augmented, scale: scale, visible: visible,
                                  exp: { Foundation.exp($0) }, log: { Foundation.log($0) })
    var result = SinkhornReference(output: dense.output, lse: dense.lse, dq: dense.dq,
                                   dk: .init(repeating: 0, count: k.count), dv: .init(repeating: 0, count: v.count),
                                   dp: .init(repeating: 0, count: plans.count))
    for b in 0..<n.batch { for h in 0..<n.heads {
        let hk = h / group
        for j in 0..<nk {
            let source = augmented.keyIndex(b, h, j), target = n.keyIndex(b, hk, j)
            for c in 0..<d { result.dk[target * d + c] += dense.dk[source * d + c] }
            for c in 0..<dv { result.dv[target * dv + c] += dense.dv[source * dv + c] }
        }
        for t in 0..<outBlocks { for r in 0..<rows { for u in 0..<nb where u * bs + r < length(b) {
            let p = plan(b, h, t, u), key = n.keyIndex(b, hk, u * bs + r)
            let sorted = augmented.keyIndex(b, h, nk + t * rows + r)
            var dp = 0.0
            for c in 0..<d {
                result.dk[key * d + c] += p * dense.dk[sorted * d + c]
                dp += dense.dk[sorted * d + c] * k[key * d + c]
            }
            for c in 0..<dv {
                result.dv[key * dv + c] += p * dense.dv[sorted * dv + c]
                dp += dense.dv[sorted * dv + c] * v[key * dv + c]
            }
            result.dp[((b * n.heads + h) * nb + t) * nb + u] += dp
        } } }
    } }
    return result
}

struct SinkhornBackwardCase: Sendable, CustomTestStringConvertible {
    var blockSize = 8
    var sortCut: Int? = nil
    var causal = false
    var givenLogits = false
    var batch = 1, heads = 2, kvHeads: Int? = nil
    var length: Int
    var headDim = 8, valueDim: Int? = nil
    var keyLengths: [Int]? = nil
    var seed: UInt64 = 0

    var attention: SinkhornAttention {
        SinkhornAttention(blockSize: blockSize, iterations: 5, temperature: 0.6, sortCut: sortCut, causal: causal)
    }
    var blocks: Int { (length + blockSize - 1) / blockSize }
    var shape: AttentionShape {
        AttentionShape(batch: batch, heads: heads, kvHeads: kvHeads ?? heads, queryLength: length, keyLength: length,
                       headDim: headDim, valueDim: valueDim ?? headDim)
    }
    var testDescription: String {
        "sinkhorn bs\(blockSize)" + (sortCut.map { " sortCut \($0)" } ?? "") + (causal ? " causal" : "")
            + (givenLogits ? " given logits" : "")
            + " B\(batch) H\(heads)/\(kvHeads ?? heads) N\(length) D\(headDim) Dv\(valueDim ?? headDim)"
            + (keyLengths.map { " keyLengths\($0)" } ?? "")
    }

    func inputs() throws -> (q: Tensor, k: Tensor, v: Tensor, logits: Tensor?, result: AttentionResult, dO: Tensor) {
        let (q, k, v) = try randomQKV(batch: batch, heads: heads, kvHeads: kvHeads, queryLength: length,
                                      headDim: headDim, valueDim: valueDim, seed: seed)
        let logits = givenLogits ? try randomTensor([batch, heads, blocks, blocks], seed: seed &+ 99, in: -2...2) : nil
        let result = try attention.attend(query: q, key: k, value: v, sortLogits: logits, keyLengths: keyLengths)
        let dO = try randomTensor([batch, heads, length, valueDim ?? headDim], seed: seed &* 7 &+ 5)
        return (q, k, v, logits, result, dO)
    }

    func gradients(threads: Int?) throws -> (inputs: AttentionGradients, permutation: Tensor) {
        let (q, k, v, logits, result, dO) = try inputs()
        return try attention.parameterGradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                                keyLengths: keyLengths, sortLogits: logits, threads: threads)
    }

    func check(sourceLocation: SourceLocation = #_sourceLocation) throws {
        let (q, k, v, logits, result, dO) = try inputs()
        let (g, dp) = try attention.parameterGradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                                       keyLengths: keyLengths, sortLogits: logits, threads: 3)
        if !givenLogits {
            let plain = try attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                                keyLengths: keyLengths, threads: 2)
            expectBitwiseEqualGradients(g, plain, "\(testDescription): parameterGradients' inputs vs gradients",
                                        sourceLocation: sourceLocation)
        }
        let plans = try attention.permutation(query: q, key: k, keyLengths: keyLengths, sortLogits: logits)
        let dims = GradientDims(query: q, value: v)
        let reference = sinkhornReference(
            q: q.elements.map(Double.init), k: k.elements.map(Double.init), v: v.elements.map(Double.init),
            dO: dO.elements.map(Double.init), plans: plans.elements.map(Double.init), dims: dims, bs: blockSize,
            sortCut: sortCut, causal: causal, scale: defaultScale(headDim: headDim), keyLengths: keyLengths)
        // The reference's forward is the library's (so the backward is checked against the forward it differentiates).
        let (outputError, outputScale) = maxErrorAndMagnitude(result.output.elements, reference.output)
        #expect(outputError <= 1e-4 * outputScale + 1e-6, "\(testDescription): forward output differs by \(outputError)",
                sourceLocation: sourceLocation)
        #expect(dp.shape == [batch, heads, blocks, blocks], "\(testDescription): ∂L/∂P shape \(dp.shape)",
                sourceLocation: sourceLocation)
        expectMatchesReference([("dQuery", g.dQuery.elements, reference.dq), ("dKey", g.dKey.elements, reference.dk),
                                ("dValue", g.dValue.elements, reference.dv), ("dP", dp.elements, reference.dp)],
                               testDescription, sourceLocation: sourceLocation)
        // Padded keys and rows with no visible key: exact zeros.
        let (d, dv, dq, dk, dvv) = (headDim, valueDim ?? headDim, g.dQuery.elements, g.dKey.elements, g.dValue.elements)
        for b in 0..<batch { for hk in 0..<(kvHeads ?? heads) { for j in (keyLengths?[b] ?? length)..<length {
            let row = dims.keyIndex(b, hk, j)
            #expect((0..<d).allSatisfy { dk[row * d + $0] == 0 } && (0..<dv).allSatisfy { dvv[row * dv + $0] == 0 },
                    "\(testDescription): padded key \(b), \(hk), \(j)", sourceLocation: sourceLocation)
        } } }
        for (row, lse) in reference.lse.enumerated() where lse == -.infinity {
            #expect((0..<d).allSatisfy { dq[row * d + $0] == 0 }, "\(testDescription): dQ row \(row) has no key",
                    sourceLocation: sourceLocation)
        }
    }
}

enum SinkhornBackwardCases {
    static let all: [SinkhornBackwardCase] = {
        let shapes = [
            SinkhornBackwardCase(length: 1),
            SinkhornBackwardCase(heads: 4, kvHeads: 2, length: 77),
            SinkhornBackwardCase(blockSize: 5, heads: 2, kvHeads: 1, length: 37, headDim: 3),
            SinkhornBackwardCase(blockSize: 16, length: 130, headDim: 65, valueDim: 7),
            SinkhornBackwardCase(blockSize: 3, heads: 1, length: 45, headDim: 1, valueDim: 3),
            SinkhornBackwardCase(blockSize: 7, batch: 3, heads: 4, kvHeads: 2, length: 70, headDim: 9, valueDim: 5,
                                 keyLengths: [70, 0, 40]),
            SinkhornBackwardCase(blockSize: 64, batch: 2, heads: 4, kvHeads: 1, length: 200, headDim: 6,
                                 keyLengths: [200, 30]),
            // More sorted rows than one key block (128) and query tiles within the blocks.
            SinkhornBackwardCase(blockSize: 100, heads: 2, kvHeads: 1, length: 290, headDim: 4),
        ]
        var cases: [SinkhornBackwardCase] = []
        for (variant, (sortCut, causal, given)) in [(nil, false, false), (nil, true, false), (2, false, false),
                                                    (nil, false, true), (1, false, true)].enumerated() {
            for (n, shape) in shapes.enumerated() {
                var c = shape
                (c.causal, c.givenLogits, c.seed) = (causal, given, 90_000 + UInt64(100 * variant + n))
                c.sortCut = sortCut.map { min($0, c.blocks) }
                cases.append(c)
            }
        }
        return cases
    }()
}

@Suite("Sinkhorn backward")
struct SinkhornBackwardTests {
    @Test("matches the Double reference with the plan held fixed (dQ, dK, dV, ∂L/∂P)",
          arguments: SinkhornBackwardCases.all)
    func reference(_ c: SinkhornBackwardCase) throws { try c.check() }

    @Test("the Double reference agrees with central finite differences of the Double forward in q, k, v and P",
          arguments: [(nil, false), (nil, true), (2, false)] as [(Int?, Bool)])
    func finiteDifferences(_ sortCut: Int?, _ causal: Bool) throws {
        let (bs, n, d, dv) = (3, 8, 3, 2), nb = 3
        let dims = GradientDims(query: try Tensor(shape: [2, 2, n, d]), value: try Tensor(shape: [2, 1, n, dv]))
        var rng = SeededGenerator(seed: causal ? 930 : 931)
        func random(_ count: Int) -> [Double] { (0..<count).map { _ in Double(rng.nextFloat(in: -1...1)) } }
        let inputs = [random(2 * 2 * n * d), random(2 * n * d), random(2 * n * dv), random(2 * 2 * nb * nb).map(abs)]
        let dO = random(2 * 2 * n * dv)
        func run(_ x: [[Double]]) -> SinkhornReference {
            sinkhornReference(q: x[0], k: x[1], v: x[2], dO: dO, plans: x[3], dims: dims, bs: bs, sortCut: sortCut,
                              causal: causal, scale: 0.7, keyLengths: [8, 5])
        }
        let analytic = run(inputs)
        let grads = [analytic.dq, analytic.dk, analytic.dv, analytic.dp]
        let h = 1e-6
        var largest = 0.0
        for which in inputs.indices {
            for index in inputs[which].indices {
                func eval(_ delta: Double) -> Double {
                    var x = inputs
                    x[which][index] += delta
                    return zip(run(x).output, dO).reduce(0) { $0 + $1.0 * $1.1 }
                }
                let numeric = (eval(h) - eval(-h)) / (2 * h)
                largest = max(largest, abs(numeric))
                #expect(abs(numeric - grads[which][index]) <= 1e-6 * (1 + abs(numeric)),
                        "input \(which)[\(index)]: analytic \(grads[which][index]), numeric \(numeric)")
            }
        }
        #expect(largest > 0.01, "the gradients vanish")
    }

    @Test("bitwise identical gradients for 1, 2, 3 and 7 threads", arguments: [(nil, false), (nil, true), (3, false)]
          as [(Int?, Bool)])
    func determinism(_ sortCut: Int?, _ causal: Bool) throws {
        let c = SinkhornBackwardCase(blockSize: 32, sortCut: sortCut, causal: causal, batch: 2, heads: 4, kvHeads: 2,
                                     length: 333, headDim: 20, valueDim: 12, keyLengths: [333, 150], seed: 91_000)
        let runs = try [1, 2, 3, 7].map { try c.gradients(threads: $0) }
        for (n, g) in runs.enumerated().dropFirst() {
            expectBitwiseEqualGradients(runs[0].inputs, g.inputs, "\(c.testDescription) run \(n)")
            #expect(bitwiseEqual(runs[0].permutation.elements, g.permutation.elements), "run \(n): ∂L/∂P differs")
        }
    }

    @Test("the view entry point (strided NaN-padded views, a caller's workspace) equals the Tensor convenience",
          arguments: [(nil, false), (nil, true), (2, false)] as [(Int?, Bool)])
    func viewEntryPoint(_ sortCut: Int?, _ causal: Bool) throws {
        let c = SinkhornBackwardCase(blockSize: 16, sortCut: sortCut, causal: causal, batch: 2, heads: 4, kvHeads: 2,
                                     length: 150, headDim: 12, valueDim: 6, keyLengths: [150, 61], seed: 92_000)
        let (q, k, v, _, result, dO) = try c.inputs()
        let attention = c.attention
        try expectViewEntryPointMatchesTensors(attention, shape: c.shape, query: q, key: k, value: v, result: result,
                                               outputGradient: dO, keyLengths: c.keyLengths, c.testDescription)
    }

    @Test("backward cost: the sort, the mixing twice and 2.5 × the attention")
    func cost() throws {
        for attention in [SinkhornAttention(), SinkhornAttention(causal: true), SinkhornAttention(sortCut: 4)] {
            let shape = AttentionShape(heads: 8, queryLength: 4096, headDim: 64)
            let forward = try attention.cost(shape, threads: 2), backward = try attention.backwardCost(shape, threads: 2)
            #expect(backward.flops > 2 * forward.flops && backward.flops < 2.5 * forward.flops,
                    "\(backward) vs \(forward)")
            #expect(backward.scoredPairs == forward.scoredPairs)
            #expect(backward.workspaceBytes > forward.workspaceBytes)
        }
    }

    /// With the sort logits given, `P` does not depend on Q, K, V: the held-fixed gradients
    /// are the whole gradients, and a step `x − η g` lowers `L = ½‖O − T‖²` by `η ‖g‖²` to
    /// first order.
    @Test("a gradient step with fixed sort logits lowers L = ½‖O − T‖² by what the gradients predict",
          arguments: [(nil, false), (nil, true), (2, false)] as [(Int?, Bool)])
    func gradientStep(_ sortCut: Int?, _ causal: Bool) throws {
        let c = SinkhornBackwardCase(blockSize: 10, sortCut: sortCut, causal: causal, givenLogits: true, batch: 2,
                                     heads: 4, kvHeads: 2, length: 90, headDim: 24, valueDim: 20,
                                     keyLengths: [90, 43], seed: 93_000)
        let (q, k, v, logits, result, _) = try c.inputs()
        let target = try randomTensor(result.output.shape, seed: 93_001)
        func loss(_ o: Tensor) -> Double {
            zip(o.elements, target.elements).reduce(0) { $0 + 0.5 * Double($1.0 - $1.1) * Double($1.0 - $1.1) }
        }
        let dO = try Tensor(shape: target.shape, data: zip(result.output.elements, target.elements).map { $0 - $1 })
        let g = try c.attention.parameterGradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                                   keyLengths: c.keyLengths, sortLogits: logits, threads: 2).inputs
        let squaredNorm = [g.dQuery, g.dKey, g.dValue].reduce(0.0) { sum, t in
            t.elements.reduce(sum) { $0 + Double($1) * Double($1) }
        }
        let before = loss(result.output)
        let eta = Float(0.002 * before / squaredNorm)
        func step(_ x: Tensor, _ dx: Tensor) throws -> Tensor {
            try Tensor(shape: x.shape, data: zip(x.elements, dx.elements).map { $0 - eta * $1 })
        }
        let after = try c.attention.attend(query: step(q, g.dQuery), key: step(k, g.dKey), value: step(v, g.dValue),
                                           sortLogits: logits, keyLengths: c.keyLengths)
        let decrease = before - loss(after.output), predicted = Double(eta) * squaredNorm
        #expect(decrease > 0, "\(c.testDescription): the loss rose from \(before) by \(-decrease)")
        #expect(abs(decrease - predicted) < 0.05 * predicted, "\(c.testDescription): decrease \(decrease), predicted \(predicted)")
    }

    /// `L(R) = Σ dO ∘ O` through the library's forward with sort logits `R`: `∂L/∂R` from
    /// `∂L/∂P` through the unrolled balancing against central differences (`h = 1e-2`) of
    /// the forward in every entry of `R`.
    @Test("∂L/∂R through the Sinkhorn iterations agrees with central finite differences of the forward",
          arguments: [(nil, false, nil), (nil, true, nil), (2, false, nil), (nil, false, 5), (nil, true, 6)]
            as [(Int?, Bool, UInt64?)])
    func sortLogitsGradient(_ sortCut: Int?, _ causal: Bool, _ noiseSeed: UInt64?) throws {
        let attention = SinkhornAttention(blockSize: 3, iterations: 4, temperature: 0.8, noiseSeed: noiseSeed,
                                          sortCut: sortCut, causal: causal)
        let keyLengths = [12, 7]
        let (q, k, v) = try randomQKV(batch: 2, heads: 2, kvHeads: 1, queryLength: 12, headDim: 3, valueDim: 2,
                                      seed: 95_000)
        let logits = try randomTensor([2, 2, 4, 4], seed: 95_001, in: -2...2)
        let dO = try randomTensor([2, 2, 12, 2], seed: 95_002)
        let result = try attention.attend(query: q, key: k, value: v, sortLogits: logits, keyLengths: keyLengths)
        let dP = try attention.parameterGradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                                  keyLengths: keyLengths, sortLogits: logits).permutation
        let dR = try attention.sortLogitsGradient(permutationGradient: dP, sortLogits: logits, keyLengths: keyLengths)
        func loss(_ r: [Float]) throws -> Double {
            let o = try attention.attend(query: q, key: k, value: v, sortLogits: Tensor(shape: logits.shape, data: r),
                                         keyLengths: keyLengths, threads: 1).output
            return zip(o.elements, dO.elements).reduce(0) { $0 + Double($1.0) * Double($1.1) }
        }
        let h: Float = 1e-2
        var worst = 0.0, largest = 0.0
        for n in logits.elements.indices {
            var plus = logits.elements, minus = logits.elements
            plus[n] += h
            minus[n] -= h
            let numeric = (try loss(plus) - loss(minus)) / (2 * Double(h))
            worst = max(worst, abs(numeric - Double(dR.elements[n])))
            largest = max(largest, abs(numeric))
        }
        #expect(worst < 1e-3 * largest + 1e-5, "∂L/∂R differs from finite differences by \(worst) (max \(largest))")
        #expect(largest > 0.01, "the gradients vanish")
        expectAttentionError(.shapeMismatch, mentioning: ["permutationGradient"]) {
            try attention.sortLogitsGradient(permutationGradient: try Tensor(shape: [2, 2, 4, 3]), sortLogits: logits)
        }
    }

    @Test("bad options and misshapen inputs throw, naming them")
    func badInputs() throws {
        let c = SinkhornBackwardCase(length: 20, headDim: 4, seed: 94_000)
        let (q, k, v, _, result, dO) = try c.inputs()
        let bad: [(SinkhornAttention, AttentionErrorCase, String)] = [
            (SinkhornAttention(blockSize: 0), .invalidParameter, "blockSize"),
            (SinkhornAttention(temperature: 0), .invalidParameter, "temperature"),
            (SinkhornAttention(blockSize: 8, sortCut: 9), .invalidParameter, "sortCut"),
            (SinkhornAttention(blockSize: 8, sortCut: 1, causal: true), .unsupported, "sortCut"),
        ]
        for (attention, kind, option) in bad {
            expectAttentionError(kind, mentioning: [option]) {
                try attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO)
            }
        }
        let attention = c.attention
        expectMisshapenGradientInputsThrow(attention, query: q, key: k, value: v, result: result, outputGradient: dO,
                                           wrong: try Tensor(shape: [1, 2, 19, 4]))
        expectAttentionError(.shapeMismatch, mentioning: ["sortLogits"]) {
            try attention.parameterGradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                             sortLogits: try Tensor(shape: [1, 2, 2, 2]))
        }
        let (q2, k2, v2) = try randomQKV(heads: 2, queryLength: 20, keyLength: 24, headDim: 4, seed: 94_001)
        let dense = try DenseAttention().attend(query: q2, key: k2, value: v2)
        expectAttentionError(.unsupported, mentioning: ["queryLength"]) {
            try attention.gradients(query: q2, key: k2, value: v2, result: dense, outputGradient: dO)
        }
    }
}
