// AxialAttention's backward pass, `.union` and `.sum`, causal and not: against the Double
// reference of the forward differentiated by hand (`.union`: the dense softmax backward
// with the union's visibility from the spec; `.sum`: the sum over axes of each axis's own
// softmax backward), on awkward grids (default grids of N = 1, 37, 77, 130; explicit 3- and
// 4-axis grids, axes of 1, lines longer than a query tile or a key block), D = 1, 3, 65,
// Dv != D, grouped heads, key padding down to an item with no key; central finite
// differences of the library's forward; bitwise identical for 1, 2, 3 and 7 threads; the
// view entry point equal to the Tensor convenience; a gradient step; the cost.

@_spi(Testing) @_spi(Benchmarking) import EfficientAttention
import Foundation
import Testing

/// The grid of a call: the configured axes or the default one.
private func gridAxes(_ axes: [Int]?, _ n: Int) -> [Int] { axes ?? AxialAttention.defaultAxes(sequenceLength: n) }

/// Axis `t`'s visibility from the spec: coordinates equal on every axis but `t`, causal
/// `coord_t(j) ≤ coord_t(i)`, key padding. `axis == nil`: the union over the axes.
private func axialVisible(axes: [Int], causal: Bool, keyLengths: [Int]?, axis: Int?) -> Visibility {
    let strides = axes.indices.map { t in axes[(t + 1)...].reduce(1, *) }
    return { b, _, i, j in
        guard j < (keyLengths?[b] ?? strides[0] * axes[0]) else { return false }
        let differing = axes.indices.filter { (i / strides[$0]) % axes[$0] != (j / strides[$0]) % axes[$0] }
        guard differing.count <= 1 else { return false }
        if let axis, let t = differing.first, t != axis { return false }
        guard let t = differing.first else { return true }
        return !causal || (j / strides[t]) % axes[t] < (i / strides[t]) % axes[t]
    }
}

struct AxialBackwardCase: Sendable, CustomTestStringConvertible {
    var axes: [Int]? = nil
    var combination: AxialAttention.Combination = .union
    var causal = false
    var batch = 1, heads = 4, kvHeads: Int? = 2
    var length: Int
    var headDim = 16, valueDim: Int? = nil
    var keyLengths: [Int]? = nil
    var seed: UInt64 = 0

    var attention: AxialAttention { AxialAttention(axes: axes, combination: combination, causal: causal) }
    var grid: [Int] { gridAxes(axes, length) }
    var shape: AttentionShape {
        AttentionShape(batch: batch, heads: heads, kvHeads: kvHeads ?? heads, queryLength: length, keyLength: length,
                       headDim: headDim, valueDim: valueDim ?? headDim)
    }
    var testDescription: String {
        "axial \(combination) \(grid)" + (causal ? " causal" : "")
            + " B\(batch) H\(heads)/\(kvHeads ?? heads) N\(length) D\(headDim) Dv\(valueDim ?? headDim)"
            + (keyLengths.map { " keyLengths\($0)" } ?? "")
    }

    func inputs() throws -> (q: Tensor, k: Tensor, v: Tensor, result: AttentionResult, dO: Tensor) {
        let (q, k, v) = try randomQKV(batch: batch, heads: heads, kvHeads: kvHeads, queryLength: length,
                                      headDim: headDim, valueDim: valueDim, seed: seed)
        let result = try attention.attend(query: q, key: k, value: v, keyLengths: keyLengths, threads: nil)
        let dO = try randomTensor([batch, heads, length, valueDim ?? headDim], seed: seed &* 7 &+ 5)
        return (q, k, v, result, dO)
    }

    func gradients(threads: Int?) throws -> AttentionGradients {
        let (q, k, v, result, dO) = try inputs()
        return try attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                       keyLengths: keyLengths, threads: threads)
    }

    /// The reference in `T`: `.union` one softmax over the union; `.sum` the sum of the axes'.
    static func reference<T: BinaryFloatingPoint>(q: [T], k: [T], v: [T], dO: [T], dims: GradientDims, scale: T,
                                                  axes: [Int], combination: AxialAttention.Combination, causal: Bool,
                                                  keyLengths: [Int]?, exp: (T) -> T, log: (T) -> T)
        -> ReferenceGradients<T> {
        func run(_ axis: Int?) -> ReferenceGradients<T> {
            referenceBackward(q: q, k: k, v: v, dO: dO, dims: dims, scale: scale,
                              visible: axialVisible(axes: axes, causal: causal, keyLengths: keyLengths, axis: axis),
                              exp: exp, log: log)
        }
        guard combination == .sum else { return run(nil) }
        var total = run(0)
        for t in axes.indices.dropFirst() {
            let part = run(t)
            func add(_ x: inout [T], _ y: [T]) { for n in x.indices { x[n] += y[n] } }
            add(&total.output, part.output)
            add(&total.dq, part.dq)
            add(&total.dk, part.dk)
            add(&total.dv, part.dv)
        }
        return total
    }

    func check(sourceLocation: SourceLocation = #_sourceLocation) throws {
        let (q, k, v, result, dO) = try inputs()
        let dims = GradientDims(query: q, value: v)
        let reference = Self.reference(q: q.elements.map(Double.init), k: k.elements.map(Double.init),
                                       v: v.elements.map(Double.init), dO: dO.elements.map(Double.init), dims: dims,
                                       scale: defaultScale(headDim: headDim), axes: grid, combination: combination,
                                       causal: causal, keyLengths: keyLengths,
                                       exp: { Foundation.exp($0) }, log: { Foundation.log($0) })
        let naive = Self.reference(q: q.elements, k: k.elements, v: v.elements, dO: dO.elements, dims: dims,
                                   scale: 1 / Float(headDim).squareRoot(), axes: grid, combination: combination,
                                   causal: causal, keyLengths: keyLengths, exp: { expf($0) }, log: { logf($0) })
        // The forward agrees with the reference's output (so the backward is checked against the forward it differentiates).
        let outputError = zip(result.output.elements, reference.output).map { abs(Double($0) - $1) }.max() ?? 0
        #expect(outputError < 1e-4, "\(testDescription): forward output differs by \(outputError)",
                sourceLocation: sourceLocation)
        let g = try attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                        keyLengths: keyLengths, threads: 2)
        checkGradients(g, reference: reference, naive: naive, dims: dims,
                       visible: axialVisible(axes: grid, causal: causal, keyLengths: keyLengths, axis: nil),
                       testDescription, sourceLocation: sourceLocation)
    }
}

enum AxialBackwardCases {
    static let subjects: [(AxialAttention.Combination, Bool)] = [(.union, false), (.union, true), (.sum, false),
                                                                  (.sum, true)]

    static func shapes(_ combination: AxialAttention.Combination, _ causal: Bool, base: UInt64) -> [AxialBackwardCase] {
        let cases = [
            AxialBackwardCase(length: 77),
            AxialBackwardCase(heads: 1, kvHeads: nil, length: 1, headDim: 3),
            AxialBackwardCase(heads: 2, kvHeads: 1, length: 37, headDim: 3),
            AxialBackwardCase(heads: 2, kvHeads: nil, length: 130, headDim: 65, valueDim: 7),
            AxialBackwardCase(axes: [3, 5, 4], heads: 1, kvHeads: nil, length: 60, headDim: 1, valueDim: 2),
            AxialBackwardCase(axes: [2, 3, 2, 5], length: 60, headDim: 8, valueDim: 5),
            AxialBackwardCase(axes: [4, 1, 9], batch: 3, length: 36, headDim: 9, valueDim: 33,
                              keyLengths: [36, 0, 17]),
            // Lines longer than a query tile (64) and a key block (128), both ways round.
            AxialBackwardCase(axes: [130, 2], heads: 2, kvHeads: 1, length: 260, headDim: 4),
            AxialBackwardCase(axes: [2, 150], batch: 2, heads: 2, kvHeads: 1, length: 300, headDim: 5,
                              keyLengths: [300, 201]),
            AxialBackwardCase(axes: [7, 3, 11], batch: 2, heads: 4, kvHeads: 1, length: 231, headDim: 33,
                              keyLengths: [100, 231]),
        ]
        return cases.enumerated().map { n, c in
            var c = c
            (c.combination, c.causal, c.seed) = (combination, causal, base + UInt64(n))
            return c
        }
    }

    static let all: [AxialBackwardCase] = subjects.enumerated().flatMap { n, s in
        shapes(s.0, s.1, base: 80_000 + 100 * UInt64(n))
    }
}

@Suite("Axial backward")
struct AxialBackwardTests {
    @Test("matches the hand-differentiated Double reference", arguments: AxialBackwardCases.all)
    func reference(_ c: AxialBackwardCase) throws { try c.check() }

    /// `L = Σ dO ∘ O` through the library's Float forward, central differences (`h = 1e-2`)
    /// on every input element.
    @Test("gradients agree with central finite differences of the library's forward",
          arguments: AxialBackwardCases.subjects.indices)
    func finiteDifferences(_ subject: Int) throws {
        let (combination, causal) = AxialBackwardCases.subjects[subject]
        let c = AxialBackwardCase(axes: [3, 4], combination: combination, causal: causal, batch: 2, heads: 2,
                                  kvHeads: 1, length: 12, headDim: 3, valueDim: 2, keyLengths: [12, 7], seed: 81_000)
        let (q, k, v, _, dO) = try c.inputs()
        let (worst, largest) = try finiteDifferenceGap(c.attention, query: q, key: k, value: v, outputGradient: dO,
                                                       keyLengths: c.keyLengths)
        #expect(worst < 2e-3 * (1 + largest), "\(c.testDescription): finite differences differ by \(worst) (max |g| \(largest))")
        #expect(largest > 0.01, "\(c.testDescription): the gradients vanish")
    }

    /// The `.sum` reference (a sum of per-axis references) against central differences of
    /// its own Double forward.
    @Test("the .sum Double reference agrees with central finite differences of the Double forward",
          arguments: [false, true])
    func sumReferenceFiniteDifferences(_ causal: Bool) throws {
        let axes = [2, 3, 2], n = 12, (d, dv) = (3, 2)
        let dims = GradientDims(query: try Tensor(shape: [1, 2, n, d]), value: try Tensor(shape: [1, 1, n, dv]))
        var rng = SeededGenerator(seed: causal ? 920 : 921)
        func random(_ count: Int) -> [Double] { (0..<count).map { _ in Double(rng.nextFloat(in: -1...1)) } }
        let inputs = [random(2 * n * d), random(n * d), random(n * dv)], dO = random(2 * n * dv)
        func run(_ x: [[Double]]) -> ReferenceGradients<Double> {
            AxialBackwardCase.reference(q: x[0], k: x[1], v: x[2], dO: dO, dims: dims, scale: 0.7, axes: axes,
                                        combination: .sum, causal: causal, keyLengths: [10],
                                        exp: { Foundation.exp($0) }, log: { Foundation.log($0) })
        }
        let analytic = run(inputs)
        let grads = [analytic.dq, analytic.dk, analytic.dv]
        let h = 1e-6
        for which in 0..<3 {
            for index in inputs[which].indices {
                func eval(_ delta: Double) -> Double {
                    var x = inputs
                    x[which][index] += delta
                    return zip(run(x).output, dO).reduce(0) { $0 + $1.0 * $1.1 }
                }
                let numeric = (eval(h) - eval(-h)) / (2 * h)
                #expect(abs(numeric - grads[which][index]) <= 1e-6 * (1 + abs(numeric)),
                        "causal \(causal) input \(which)[\(index)]: analytic \(grads[which][index]), numeric \(numeric)")
            }
        }
    }

    @Test("bitwise identical gradients for 1, 2, 3 and 7 threads", arguments: AxialBackwardCases.subjects.indices)
    func determinism(_ subject: Int) throws {
        let (combination, causal) = AxialBackwardCases.subjects[subject]
        for c in [AxialBackwardCase(axes: [10, 40], combination: combination, causal: causal, batch: 2, length: 400,
                                    headDim: 20, valueDim: 33, keyLengths: [400, 250], seed: 82_000),
                  AxialBackwardCase(axes: [3, 7, 33], combination: combination, causal: causal, heads: 2, kvHeads: 1,
                                    length: 693, headDim: 16, seed: 82_001)] {
            let runs = try [1, 2, 3, 7].map { try c.gradients(threads: $0) }
            for (n, g) in runs.enumerated().dropFirst() {
                expectBitwiseEqualGradients(runs[0], g, "\(c.testDescription) run \(n)")
            }
        }
    }

    @Test("the view entry point (strided NaN-padded views, a caller's workspace) equals the Tensor convenience",
          arguments: AxialBackwardCases.subjects.indices)
    func viewEntryPoint(_ subject: Int) throws {
        let (combination, causal) = AxialBackwardCases.subjects[subject]
        let c = AxialBackwardCase(axes: [5, 6, 5], combination: combination, causal: causal, batch: 2, length: 150,
                                  headDim: 12, valueDim: 6, keyLengths: [150, 61], seed: 83_000)
        let (q, k, v, result, dO) = try c.inputs()
        try expectViewEntryPointMatchesTensors(c.attention, shape: c.shape, query: q, key: k, value: v, result: result,
                                               outputGradient: dO, keyLengths: c.keyLengths, c.testDescription)
    }

    @Test("backward cost: .union 2.5 × the forward's FLOPs, .sum 3.5 ×; the same pairs",
          arguments: AxialBackwardCases.subjects.indices)
    func cost(_ subject: Int) throws {
        let (combination, causal) = AxialBackwardCases.subjects[subject]
        let attention = AxialAttention(combination: combination, causal: causal)
        let short = AttentionShape(heads: 8, queryLength: 4096, headDim: 64)
        let forward = try attention.cost(short, threads: 2), backward = try attention.backwardCost(short, threads: 2)
        #expect(backward.flops == (combination == .sum ? 3.5 : 2.5) * forward.flops)
        #expect(backward.scoredPairs == forward.scoredPairs)
        #expect(backward.workspaceBytes >= forward.workspaceBytes)
        if combination == .union {
            let long = try attention.backwardCost(AttentionShape(heads: 8, queryLength: 16384, headDim: 64), threads: 2)
            #expect(long.workspaceBytes - backward.workspaceBytes <= 8 * 8 * (16384 + 128))
        }
    }

    /// `L = ½‖O − T‖²`, a step predicted to lower the loss by 0.2%.
    @Test("a small gradient step lowers L = ½‖O − T‖² by what the gradients predict",
          arguments: AxialBackwardCases.subjects.indices)
    func gradientStep(_ subject: Int) throws {
        let (combination, causal) = AxialBackwardCases.subjects[subject]
        let c = AxialBackwardCase(axes: [6, 15], combination: combination, causal: causal, batch: 2, length: 90,
                                  headDim: 24, valueDim: 20, keyLengths: [90, 43], seed: 84_000)
        let (q, k, v, result, _) = try c.inputs()
        let target = try randomTensor(result.output.shape, seed: 84_001)
        func loss(_ o: Tensor) -> Double {
            zip(o.elements, target.elements).reduce(0) { $0 + 0.5 * Double($1.0 - $1.1) * Double($1.0 - $1.1) }
        }
        let dO = try Tensor(shape: target.shape, data: zip(result.output.elements, target.elements).map { $0 - $1 })
        let g = try c.attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                          keyLengths: c.keyLengths, threads: 2)
        let squaredNorm = [g.dQuery, g.dKey, g.dValue].reduce(0.0) { sum, t in
            t.elements.reduce(sum) { $0 + Double($1) * Double($1) }
        }
        let before = loss(result.output)
        let eta = Float(0.002 * before / squaredNorm)
        func step(_ x: Tensor, _ dx: Tensor) throws -> Tensor {
            try Tensor(shape: x.shape, data: zip(x.elements, dx.elements).map { $0 - eta * $1 })
        }
        let after = try c.attention.attend(query: step(q, g.dQuery), key: step(k, g.dKey), value: step(v, g.dValue),
                                           keyLengths: c.keyLengths, threads: 2)
        let decrease = before - loss(after.output), predicted = Double(eta) * squaredNorm
        #expect(decrease > 0, "\(c.testDescription): the loss rose from \(before) by \(-decrease)")
        #expect(abs(decrease - predicted) < 0.05 * predicted, "\(c.testDescription): decrease \(decrease), predicted \(predicted)")
    }

    @Test("bad grids and misshapen inputs throw, naming them")
    func badInputs() throws {
        let c = AxialBackwardCase(axes: [3, 4], length: 12, headDim: 4, seed: 85_000)
        let (q, k, v, result, dO) = try c.inputs()
        for attention in [AxialAttention(axes: [5, 4]), AxialAttention(axes: [3, 4, 0]), AxialAttention(axes: [])] {
            expectAttentionError(.invalidParameter, mentioning: ["axes"]) {
                try attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO)
            }
            expectAttentionError(.invalidParameter, mentioning: ["axes"]) {
                try attention.backwardCost(c.shape)
            }
        }
        let wrong = try Tensor(shape: [1, 4, 11, 16])
        for combination in [AxialAttention.Combination.union, .sum] {
            expectMisshapenGradientInputsThrow(AxialAttention(axes: [3, 4], combination: combination), query: q,
                                               key: k, value: v, result: result, outputGradient: dO, wrong: wrong)
        }
    }
}
