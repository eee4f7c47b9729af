// MemoryCompressedAttention's backward pass: dQ, dK, dV and the gradients of the
// convolution's weights and biases against a Double reference (the windows compressed in
// Double, the dense softmax backward over the compressed keys with whole-window causal
// visibility, the convolution transposed; itself checked by central finite differences of
// the Double forward), on awkward shapes (N not a multiple of c, c = 1, 2, 3, 7, D = 1, 3,
// 65, Dv != D, Nq != Nk both ways, grouped heads, key padding down to an item with no key,
// causal rows with no visible window), mean pooling and given weights, causal and not;
// bitwise identical for 1, 2, 3 and 7 threads; the view entry point equal to the Tensor
// convenience; a gradient step on the inputs and the weights lowering a loss.

@_spi(Testing) @_spi(Benchmarking) import EfficientAttention
import Foundation
import Testing

/// The convolution's parameters in Double (`nil`: not given).
private struct CompressionParameters {
    var c: Int
    var keyWeights: [Double]?, valueWeights: [Double]?, keyBias: [Double]?, valueBias: [Double]?
}

/// Output and gradients of `L = Σ dO ∘ O` in Double; parameter gradients empty when absent.
private struct CompressedReference {
    var output: [Double], lse: [Double], dq: [Double], dk: [Double], dv: [Double]
    var dKeyWeights: [Double], dValueWeights: [Double], dKeyBias: [Double], dValueBias: [Double]
}

/// Compressed key `t` visible to query `i`: it exists (`t < ⌈L / c⌉`) and, causal, its whole
/// window ends at or before `i + Nk − Nq`.
private func compressedVisible(c: Int, nq: Int, nk: Int, causal: Bool, keyLengths: [Int]?) -> Visibility {
    { b, _, i, t in
        let length = keyLengths?[b] ?? nk
        return t < (length + c - 1) / c && (!causal || min((t + 1) * c, length) - 1 <= i + nk - nq)
    }
}

/// The forward in Double from the spec and its derivative by hand: windows
/// `x'[t] = Σ_r W_r x[tc + r] + b` (mean pooling without weights), the softmax backward over
/// the compressed keys, then `dx[tc + r] = dx'[t] · W_r` (or `dx'[t] / n_t`),
/// `dW_r += dx'[t] ⊗ x[tc + r]`, `db += dx'[t]`.
private func compressedReference(q: [Double], k: [Double], v: [Double], dO: [Double], dims n: GradientDims,
                                 parameters p: CompressionParameters, causal: Bool, scale: Double,
                                 keyLengths: [Int]?) -> CompressedReference {
    let c = p.c, nc = (n.keyLength + c - 1) / c
    func length(_ b: Int) -> Int { keyLengths?[b] ?? n.keyLength }
    func window(_ b: Int, _ t: Int) -> Range<Int> { (t * c)..<min(t * c + c, length(b)) }
    func compress(_ x: [Double], _ w: Int, _ weights: [Double]?, _ bias: [Double]?) -> [Double] {
        var out = [Double](repeating: 0, count: n.batch * n.kvHeads * nc * w)
        for b in 0..<n.batch { for hk in 0..<n.kvHeads { for t in 0..<((length(b) + c - 1) / c) {
            let row = (b * n.kvHeads + hk) * nc + t, rows = window(b, t)
            for o in 0..<w {
                var sum = 0.0
                for j in rows {
                    let xj = n.keyIndex(b, hk, j) * w
                    if let weights {
                        for i in 0..<w { sum += weights[((hk * c + j - t * c) * w + o) * w + i] * x[xj + i] }
                    } else {
                        sum += x[xj + o] / Double(rows.count)
                    }
                }
                out[row * w + o] = sum + (bias?[hk * w + o] ?? 0)
            }
        } } }
        return out
    }
    let (d, dv) = (n.headDim, n.valueDim)
    var compressed = n
    compressed.keyLength = nc
    let dense = referenceBackward(q: q, k: compress(k, d, p.keyWeights, p.keyBias),
                                  v: compress(v, dv, p.valueWeights, p.valueBias), dO: dO, dims: compressed,
                                  scale: scale,
                                  visible: compressedVisible(c: c, nq: n.queryLength, nk: n.keyLength, causal: causal,
                                                             keyLengths: keyLengths),
                                  exp: { Foundation.exp($0) }, log: { Foundation.log($0) })
    func expand(_ g: [Double], _ x: [Double], _ w: Int, _ weights: [Double]?, _ hasBias: Bool)
        -> (dx: [Double], dW: [Double], db: [Double]) {
        var dx = [Double](repeating: 0, count: x.count)
        var dW = [Double](repeating: 0, count: weights?.count ?? 0)
        var db = [Double](repeating: 0, count: hasBias ? n.kvHeads * w : 0)
        for b in 0..<n.batch { for hk in 0..<n.kvHeads { for t in 0..<((length(b) + c - 1) / c) {
            let row = (b * n.kvHeads + hk) * nc + t, rows = window(b, t)
            for j in rows {
                let xj = n.keyIndex(b, hk, j) * w, r = j - t * c
                for i in 0..<w {
                    if let weights {
                        for o in 0..<w {
                            let at = ((hk * c + r) * w + o) * w + i
                            dx[xj + i] += g[row * w + o] * weights[at]
                            dW[at] += g[row * w + o] * x[xj + i]
                        }
                    } else {
                        dx[xj + i] += g[row * w + i] / Double(rows.count)
                    }
                }
            }
            if hasBias { for o in 0..<w { db[hk * w + o] += g[row * w + o] } }
        } } }
        return (dx, dW, db)
    }
    let keys = expand(dense.dk, k, d, p.keyWeights, p.keyBias != nil)
    let values = expand(dense.dv, v, dv, p.valueWeights, p.valueBias != nil)
    return CompressedReference(output: dense.output, lse: dense.lse, dq: dense.dq, dk: keys.dx, dv: values.dx,
                               dKeyWeights: keys.dW, dValueWeights: values.dW, dKeyBias: keys.db,
                               dValueBias: values.db)
}

struct MemoryCompressedBackwardCase: Sendable, CustomTestStringConvertible {
    var c = 3
    var batch = 1, heads = 2, kvHeads: Int? = nil
    var queryLength: Int, keyLength: Int? = nil
    var headDim = 8, valueDim: Int? = nil
    var causal = false
    var weighted = true, biased = true
    var keyLengths: [Int]? = nil
    var seed: UInt64 = 0

    var nk: Int { keyLength ?? queryLength }
    var hkv: Int { kvHeads ?? heads }
    var dv: Int { valueDim ?? headDim }
    var testDescription: String {
        "c\(c) B\(batch) H\(heads)/\(hkv) Nq\(queryLength) Nk\(nk) D\(headDim) Dv\(dv)" + (causal ? " causal" : "")
            + (weighted ? " weights" : " mean") + (biased ? " bias" : "") + (keyLengths.map { " keyLengths\($0)" } ?? "")
    }

    var shape: AttentionShape {
        AttentionShape(batch: batch, heads: heads, kvHeads: hkv, queryLength: queryLength, keyLength: nk,
                       headDim: headDim, valueDim: dv)
    }

    func attention() throws -> MemoryCompressedAttention {
        func draw(_ count: Int, _ s: UInt64, _ bound: Float) throws -> [Float] {
            try randomTensor([1, 1, 1, count], seed: seed &* 11 &+ s, in: -bound...bound).elements
        }
        let (d, dv) = (Float(headDim), Float(self.dv))
        return try MemoryCompressedAttention(
            compression: c,
            keyWeights: weighted ? try draw(hkv * c * headDim * headDim, 1, 1.5 / d.squareRoot()) : nil,
            valueWeights: weighted ? try draw(hkv * c * self.dv * self.dv, 2, 1.5 / dv.squareRoot()) : nil,
            keyBias: biased ? try draw(hkv * headDim, 3, 0.5) : nil,
            valueBias: biased ? try draw(hkv * self.dv, 4, 0.5) : nil, causal: causal)
    }

    func inputs() throws -> (q: Tensor, k: Tensor, v: Tensor, result: AttentionResult, dO: Tensor) {
        let (q, k, v) = try randomQKV(batch: batch, heads: heads, kvHeads: kvHeads, queryLength: queryLength,
                                      keyLength: keyLength, headDim: headDim, valueDim: valueDim, seed: seed)
        let result = try attention().attend(query: q, key: k, value: v, keyLengths: keyLengths, threads: nil)
        let dO = try randomTensor([batch, heads, queryLength, dv], seed: seed &* 7 &+ 5)
        return (q, k, v, result, dO)
    }

    func check(sourceLocation: SourceLocation = #_sourceLocation) throws {
        let attention = try attention()
        let (q, k, v, result, dO) = try inputs()
        let (g, p) = try attention.parameterGradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                                      keyLengths: keyLengths, threads: 3)
        let plain = try attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                            keyLengths: keyLengths, threads: 2)
        expectBitwiseEqualGradients(g, plain, "\(testDescription): parameterGradients' inputs vs gradients",
                                    sourceLocation: sourceLocation)
        func double(_ x: [Float]?) -> [Double]? { x.map { $0.map(Double.init) } }
        let parameters = CompressionParameters(c: c, keyWeights: double(attention.keyWeights),
                                               valueWeights: double(attention.valueWeights),
                                               keyBias: double(attention.keyBias),
                                               valueBias: double(attention.valueBias))
        let dims = GradientDims(query: q, value: v)
        let reference = compressedReference(
            q: q.elements.map(Double.init), k: k.elements.map(Double.init), v: v.elements.map(Double.init),
            dO: dO.elements.map(Double.init), dims: dims, parameters: parameters, causal: causal,
            scale: defaultScale(headDim: headDim), keyLengths: keyLengths)
        #expect((p.keyWeights != nil) == weighted && (p.valueWeights != nil) == weighted
                    && (p.keyBias != nil) == biased && (p.valueBias != nil) == biased,
                "\(testDescription): parameter gradients present iff the parameters are", sourceLocation: sourceLocation)
        var pairs = [("dQuery", g.dQuery.elements, reference.dq), ("dKey", g.dKey.elements, reference.dk),
                     ("dValue", g.dValue.elements, reference.dv)]
        for (name, values, ref) in [("dKeyWeights", p.keyWeights, reference.dKeyWeights),
                                    ("dValueWeights", p.valueWeights, reference.dValueWeights),
                                    ("dKeyBias", p.keyBias, reference.dKeyBias),
                                    ("dValueBias", p.valueBias, reference.dValueBias)] {
            if let values { pairs.append((name, values, ref)) }
        }
        // ∂L/∂b^K is exactly 0 (a key bias shifts a row's scores by a constant): its sums
        // cancel, so its error is measured against the size of its terms (dK's).
        let keyScale = maxErrorAndMagnitude(g.dKey.elements, reference.dk).1
        for (name, values, ref) in pairs {
            #expect(values.count == ref.count && !values.contains { $0.isNaN }, "\(testDescription): \(name)",
                    sourceLocation: sourceLocation)
            var (error, scale) = maxErrorAndMagnitude(values, ref)
            if name == "dKeyBias" { scale = max(scale, keyScale) }
            #expect(error <= 1e-4 * scale + 1e-6, "\(testDescription): \(name) error \(error), max |ref| \(scale)",
                    sourceLocation: sourceLocation)
        }
        // Padded keys and rows with no visible window: exact zeros.
        let (d, dq, dk, dvv) = (headDim, g.dQuery.elements, g.dKey.elements, g.dValue.elements)
        for b in 0..<batch { for hk in 0..<hkv { for j in (keyLengths?[b] ?? nk)..<nk {
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

enum MemoryCompressedBackwardCases {
    static let all: [MemoryCompressedBackwardCase] = [false, true].flatMap { causal in [
        MemoryCompressedBackwardCase(queryLength: 1, causal: causal, seed: 1),
        MemoryCompressedBackwardCase(heads: 4, kvHeads: 2, queryLength: 200, causal: causal, weighted: false,
                                     biased: false, seed: 2),
        MemoryCompressedBackwardCase(c: 7, heads: 4, kvHeads: 2, queryLength: 150, keyLength: 131, headDim: 5,
                                     valueDim: 9, causal: causal, seed: 3),
        MemoryCompressedBackwardCase(c: 2, queryLength: 70, keyLength: 300, headDim: 1, valueDim: 3, causal: causal,
                                     weighted: false, seed: 4),
        MemoryCompressedBackwardCase(c: 1, queryLength: 131, keyLength: 20, headDim: 3, valueDim: 1, causal: causal,
                                     seed: 5),
        MemoryCompressedBackwardCase(c: 3, queryLength: 65, keyLength: 64, headDim: 65, valueDim: 17, causal: causal,
                                     seed: 6),
        MemoryCompressedBackwardCase(c: 4, batch: 3, heads: 4, kvHeads: 2, queryLength: 90, keyLength: 100,
                                     headDim: 5, valueDim: 7, causal: causal, keyLengths: [100, 0, 37], seed: 7),
        MemoryCompressedBackwardCase(c: 5, batch: 2, heads: 4, kvHeads: 1, queryLength: 60, keyLength: 80,
                                     causal: causal, weighted: false, keyLengths: [3, 80], seed: 8),
        MemoryCompressedBackwardCase(c: 3, batch: 2, heads: 2, kvHeads: 2, queryLength: 40, keyLength: 400,
                                     headDim: 16, causal: causal, biased: false, keyLengths: [400, 398], seed: 9),
        // More windows than one key block (128 compressed keys) and causal query tiles.
        MemoryCompressedBackwardCase(c: 2, heads: 2, kvHeads: 1, queryLength: 330, keyLength: 333, headDim: 4,
                                     causal: causal, seed: 10),
    ] }
}

@Suite("Memory-compressed backward")
struct MemoryCompressedBackwardTests {
    @Test("matches the Double reference (dQ, dK, dV, ∂L/∂W, ∂L/∂b)", arguments: MemoryCompressedBackwardCases.all)
    func reference(_ c: MemoryCompressedBackwardCase) throws { try c.check() }

    @Test("the Double reference agrees with central finite differences of the Double forward",
          arguments: [(false, true), (true, true), (true, false)])
    func finiteDifferences(_ causal: Bool, _ weighted: Bool) throws {
        let (c, nq, nk, d, dv) = (2, 4, 5, 3, 2)
        let dims = GradientDims(query: try Tensor(shape: [2, 2, nq, d]), value: try Tensor(shape: [2, 1, nk, dv]))
        var rng = SeededGenerator(seed: causal ? 910 : 911)
        func random(_ count: Int) -> [Double] { (0..<count).map { _ in Double(rng.nextFloat(in: -1...1)) } }
        let q = random(2 * 2 * nq * d), k = random(2 * nk * d), v = random(2 * nk * dv), dO = random(2 * 2 * nq * dv)
        let kw = weighted ? random(c * d * d) : [], vw = weighted ? random(c * dv * dv) : []
        let kb = random(d), vb = random(dv)
        let keyLengths = [5, 3]
        func run(_ x: [[Double]]) -> CompressedReference {
            compressedReference(q: x[0], k: x[1], v: x[2], dO: dO, dims: dims,
                                parameters: CompressionParameters(c: c, keyWeights: weighted ? x[3] : nil,
                                                                  valueWeights: weighted ? x[4] : nil,
                                                                  keyBias: x[5], valueBias: x[6]),
                                causal: causal, scale: 0.7, keyLengths: keyLengths)
        }
        func loss(_ r: CompressedReference) -> Double { zip(r.output, dO).reduce(0) { $0 + $1.0 * $1.1 } }
        let inputs = [q, k, v, kw, vw, kb, vb]
        let analytic = run(inputs)
        let grads = [analytic.dq, analytic.dk, analytic.dv, analytic.dKeyWeights, analytic.dValueWeights,
                     analytic.dKeyBias, analytic.dValueBias]
        let h = 1e-6
        var largest = 0.0
        for which in inputs.indices {
            #expect(grads[which].count == inputs[which].count, "input \(which): gradient count")
            for index in inputs[which].indices {
                func eval(_ delta: Double) -> Double {
                    var x = inputs
                    x[which][index] += delta
                    return loss(run(x))
                }
                let numeric = (eval(h) - eval(-h)) / (2 * h)
                largest = max(largest, abs(numeric))
                #expect(abs(numeric - grads[which][index]) <= 1e-6 * (1 + abs(numeric)),
                        "causal \(causal) input \(which)[\(index)]: analytic \(grads[which][index]), numeric \(numeric)")
            }
        }
        #expect(largest > 0.01, "the gradients vanish")
    }

    @Test("bitwise identical gradients for 1, 2, 3 and 7 threads", arguments: [false, true])
    func threadInvariance(_ causal: Bool) throws {
        let c = MemoryCompressedBackwardCase(c: 3, batch: 2, heads: 8, kvHeads: 2, queryLength: 400, keyLength: 420,
                                             headDim: 16, valueDim: 12, causal: causal, keyLengths: [420, 91],
                                             seed: 3000)
        let attention = try c.attention()
        let (q, k, v, result, dO) = try c.inputs()
        let runs = try [1, 2, 3, 7].map {
            try attention.parameterGradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                             keyLengths: c.keyLengths, threads: $0)
        }
        for (n, g) in runs.enumerated().dropFirst() {
            expectBitwiseEqualGradients(runs[0].inputs, g.inputs, "run \(n)")
            #expect(runs[0].parameters == g.parameters, "run \(n): parameter gradients differ")
        }
    }

    @Test("the view entry point (strided NaN-padded views, a caller's workspace) equals the Tensor convenience",
          arguments: [false, true])
    func viewEntryPoint(_ weighted: Bool) throws {
        let c = MemoryCompressedBackwardCase(c: 3, batch: 2, heads: 4, kvHeads: 2, queryLength: 150, keyLength: 170,
                                             headDim: 12, valueDim: 6, causal: true, weighted: weighted,
                                             keyLengths: [170, 61], seed: 4000)
        let attention = try c.attention()
        let (q, k, v, result, dO) = try c.inputs()
        try expectViewEntryPointMatchesTensors(attention, shape: c.shape, query: q, key: k, value: v, result: result,
                                               outputGradient: dO, keyLengths: c.keyLengths, c.testDescription)
    }

    @Test("backward cost: the convolution twice plus 2.5 × the attention")
    func cost() throws {
        for weighted in [false, true] {
            let c = MemoryCompressedBackwardCase(heads: 8, queryLength: 4096, headDim: 64, weighted: weighted)
            let attention = try c.attention()
            let forward = try attention.cost(c.shape, threads: 2), backward = try attention.backwardCost(c.shape, threads: 2)
            #expect(backward.flops > 2 * forward.flops && backward.flops < 2.5 * forward.flops,
                    "\(backward) vs \(forward)")
            #expect(backward.scoredPairs == forward.scoredPairs)
            #expect(backward.workspaceBytes > forward.workspaceBytes)
        }
    }

    /// `L = ½‖O − T‖²`: a small step against the gradients of Q, K, V and of the weights and
    /// biases lowers the loss by what the gradients predict (first order).
    @Test("a gradient step on the inputs and the convolution lowers L = ½‖O − T‖²", arguments: [false, true])
    func gradientStep(_ causal: Bool) throws {
        let c = MemoryCompressedBackwardCase(c: 3, batch: 2, heads: 4, kvHeads: 2, queryLength: 90, keyLength: 100,
                                             headDim: 12, valueDim: 10, causal: causal, keyLengths: [100, 43],
                                             seed: 70_000)
        let attention = try c.attention()
        let (q, k, v, result, _) = try c.inputs()
        let target = try randomTensor(result.output.shape, seed: 70_001)
        func loss(_ o: Tensor) -> Double {
            zip(o.elements, target.elements).reduce(0) { $0 + 0.5 * Double($1.0 - $1.1) * Double($1.0 - $1.1) }
        }
        let dO = try Tensor(shape: target.shape, data: zip(result.output.elements, target.elements).map { $0 - $1 })
        let (g, p) = try attention.parameterGradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                                      keyLengths: c.keyLengths, threads: 2)
        let parameterGradients = [p.keyWeights!, p.valueWeights!, p.keyBias!, p.valueBias!]
        let squaredNorm = ([g.dQuery.elements, g.dKey.elements, g.dValue.elements] + parameterGradients)
            .reduce(0.0) { sum, x in x.reduce(sum) { $0 + Double($1) * Double($1) } }
        let before = loss(result.output)
        let eta = Float(0.002 * before / squaredNorm)
        func step(_ x: [Float], _ dx: [Float]) -> [Float] { zip(x, dx).map { $0 - eta * $1 } }
        func step(_ x: Tensor, _ dx: Tensor) throws -> Tensor { try Tensor(shape: x.shape, data: step(x.elements, dx.elements)) }
        let stepped = try MemoryCompressedAttention(
            compression: c.c, keyWeights: step(attention.keyWeights!, p.keyWeights!),
            valueWeights: step(attention.valueWeights!, p.valueWeights!), keyBias: step(attention.keyBias!, p.keyBias!),
            valueBias: step(attention.valueBias!, p.valueBias!), causal: causal)
        let after = try stepped.attend(query: step(q, g.dQuery), key: step(k, g.dKey), value: step(v, g.dValue),
                                       keyLengths: c.keyLengths, threads: 2)
        let decrease = before - loss(after.output), predicted = Double(eta) * squaredNorm
        #expect(decrease > 0, "the loss rose from \(before) by \(-decrease)")
        #expect(abs(decrease - predicted) < 0.05 * predicted, "decrease \(decrease), predicted \(predicted)")
    }

    @Test("misshapen output, logSumExp, outputGradient or weights throw, naming them")
    func badInputs() throws {
        let c = MemoryCompressedBackwardCase(queryLength: 9, headDim: 4, seed: 11)
        let attention = try c.attention()
        let (q, k, v, result, dO) = try c.inputs()
        let wrong = try Tensor(shape: [1, 2, 8, 4])
        expectMisshapenGradientInputsThrow(attention, query: q, key: k, value: v, result: result, outputGradient: dO,
                                           wrong: wrong)
        for c in misshapenGradientInputs(result: result, outputGradient: dO, wrong: wrong) {
            expectAttentionError(.shapeMismatch, mentioning: [c.name]) {
                try attention.parameterGradients(query: q, key: k, value: v,
                                                 result: AttentionResult(output: c.output, logSumExp: c.logSumExp),
                                                 outputGradient: c.outputGradient)
            }
        }
        let misshapen = try MemoryCompressedAttention(compression: 3, keyWeights: [Float](repeating: 0, count: 5))
        expectAttentionError(.shapeMismatch, mentioning: ["keyWeights"]) {
            try misshapen.gradients(query: q, key: k, value: v, result: result, outputGradient: dO)
        }
        expectAttentionError(.invalidParameter, mentioning: ["compression"]) {
            try MemoryCompressedAttention(compression: 0).gradients(query: q, key: k, value: v, result: result,
                                                                    outputGradient: dO)
        }
    }
}
