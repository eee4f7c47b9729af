// DenseAttention's backward pass against a Double-precision reference of the forward
// differentiated by hand (itself checked by central finite differences), on awkward shapes
// (N not a tile multiple, D = 1, 3, 65, 128, Dv != D, Nq != Nk both ways, grouped heads,
// key padding down to a batch item with no key, causal and not, NaN-padded strided
// inputs), bitwise identical across thread counts, and the inputs that must throw.

@_spi(Testing) @_spi(Benchmarking) import EfficientAttention
import Foundation
import Testing

// MARK: - Reference

/// The dimensions of one problem.
struct GradientDims: Sendable {
    var batch: Int, heads: Int, kvHeads: Int, queryLength: Int, keyLength: Int, headDim: Int, valueDim: Int

    init(query q: Tensor, value v: Tensor) {
        (batch, heads, kvHeads, queryLength, keyLength, headDim, valueDim)
            = (q.shape[0], q.shape[1], v.shape[1], q.shape[2], v.shape[2], q.shape[3], v.shape[3])
    }

    func queryIndex(_ b: Int, _ h: Int, _ i: Int) -> Int { (b * heads + h) * queryLength + i }
    func keyIndex(_ b: Int, _ hk: Int, _ j: Int) -> Int { (b * kvHeads + hk) * keyLength + j }
}

/// Output, log-sum-exp and the gradients of `L = Σ dO ∘ O`, row-major.
struct ReferenceGradients<T: BinaryFloatingPoint> {
    var output: [T], lse: [T]
    var dq: [T], dk: [T], dv: [T]
}

/// Softmax attention and its hand-written derivative, in `T`, straight from the
/// definition: for each row with visible keys `J`,
/// `P_j = exp(s_j − m) / Σ exp(s − m)`, `o = Σ P_j v_j`, `lse = m + log Σ exp(s − m)`;
/// `dP_j = dO · v_j`, `D = Σ_j P_j dP_j`, `dS_j = P_j (dP_j − D)`,
/// `dq = scale Σ_j dS_j k_j`, `dk_j += scale dS_j q`, `dv_j += P_j dO`.
func referenceBackward<T: BinaryFloatingPoint>(
    q: [T], k: [T], v: [T], dO: [T], dims n: GradientDims, scale: T, visible: Visibility,
    exp: (T) -> T, log: (T) -> T
) -> ReferenceGradients<T> {
    let (d, dv, group) = (n.headDim, n.valueDim, n.heads / n.kvHeads)
    var r = ReferenceGradients<T>(output: .init(repeating: 0, count: n.batch * n.heads * n.queryLength * dv),
                                  lse: .init(repeating: -.infinity, count: n.batch * n.heads * n.queryLength),
                                  dq: .init(repeating: 0, count: q.count), dk: .init(repeating: 0, count: k.count),
                                  dv: .init(repeating: 0, count: v.count))
    for b in 0..<n.batch { for h in 0..<n.heads { for i in 0..<n.queryLength {
        let hk = h / group, row = n.queryIndex(b, h, i)
        let keys = (0..<n.keyLength).filter { visible(b, h, i, $0) }
        guard !keys.isEmpty else { continue }
        let scores = keys.map { j -> T in
            let kj = n.keyIndex(b, hk, j)
            var dot: T = 0
            for c in 0..<d { dot += q[row * d + c] * k[kj * d + c] }
            return scale * dot
        }
        let m = scores.max()!
        let e = scores.map { exp($0 - m) }
        let sum = e.reduce(0, +)
        let p = e.map { $0 / sum }
        r.lse[row] = m + log(sum)
        for (t, j) in keys.enumerated() {
            let kj = n.keyIndex(b, hk, j)
            for c in 0..<dv { r.output[row * dv + c] += p[t] * v[kj * dv + c] }
        }
        let dp = keys.map { j -> T in
            let kj = n.keyIndex(b, hk, j)
            var dot: T = 0
            for c in 0..<dv { dot += dO[row * dv + c] * v[kj * dv + c] }
            return dot
        }
        var rowDot: T = 0
        for t in keys.indices { rowDot += p[t] * dp[t] }
        for (t, j) in keys.enumerated() {
            let ds = p[t] * (dp[t] - rowDot), kj = n.keyIndex(b, hk, j)
            for c in 0..<d {
                r.dq[row * d + c] += scale * ds * k[kj * d + c]
                r.dk[kj * d + c] += scale * ds * q[row * d + c]
            }
            for c in 0..<dv { r.dv[kj * dv + c] += p[t] * dO[row * dv + c] }
        }
    } } }
    return r
}

/// The Double reference for tensors.
func referenceBackward(query: Tensor, key: Tensor, value: Tensor, outputGradient: Tensor, scale: Double,
                       visible: Visibility) -> ReferenceGradients<Double> {
    referenceBackward(q: query.elements.map(Double.init), k: key.elements.map(Double.init),
                      v: value.elements.map(Double.init), dO: outputGradient.elements.map(Double.init),
                      dims: GradientDims(query: query, value: value), scale: scale, visible: visible,
                      exp: { Foundation.exp($0) }, log: { Foundation.log($0) })
}

/// The same algorithm naively in Float: the yardstick for the library's error.
func naiveFloatBackward(query: Tensor, key: Tensor, value: Tensor, outputGradient: Tensor, scale: Float,
                        visible: Visibility) -> ReferenceGradients<Float> {
    referenceBackward(q: query.elements, k: key.elements, v: value.elements, dO: outputGradient.elements,
                      dims: GradientDims(query: query, value: value), scale: scale, visible: visible,
                      exp: { expf($0) }, log: { logf($0) })
}

/// Max-abs error of `values` against `reference`, and the largest |reference|.
private func maxError(_ values: [Float], _ reference: [Double]) -> (error: Double, scale: Double) {
    var error = 0.0, scale = 0.0
    for (x, r) in zip(values, reference) {
        error = max(error, abs(Double(x) - r))
        scale = max(scale, abs(r))
    }
    return (error, scale)
}

/// Checks library gradients against the Double reference: shapes; no NaN; exact zeros
/// where no pair contributes (queries with no visible key, keys no query sees); and
/// `maxAbsErr(lib) ≤ 3 · maxAbsErr(naive Float) + 1e-6 · (1 + max |ref|)` per gradient.
func checkGradients(_ g: AttentionGradients, reference: ReferenceGradients<Double>,
                    naive: ReferenceGradients<Float>, dims n: GradientDims, visible: Visibility, _ label: String,
                    sourceLocation: SourceLocation = #_sourceLocation) {
    let shapes = [[n.batch, n.heads, n.queryLength, n.headDim], [n.batch, n.kvHeads, n.keyLength, n.headDim],
                  [n.batch, n.kvHeads, n.keyLength, n.valueDim]]
    let tensors = [("dQuery", g.dQuery), ("dKey", g.dKey), ("dValue", g.dValue)]
    for ((name, tensor), shape) in zip(tensors, shapes) {
        #expect(tensor.shape == shape, "\(label): \(name) shape \(tensor.shape), expected \(shape)",
                sourceLocation: sourceLocation)
        guard tensor.shape == shape else { return }
    }
    let group = n.heads / n.kvHeads
    // Rows that no pair reaches must be exactly zero.
    var queryEmpty = [Bool](repeating: true, count: n.batch * n.heads * n.queryLength)
    var keyUnseen = [Bool](repeating: true, count: n.batch * n.kvHeads * n.keyLength)
    for b in 0..<n.batch { for h in 0..<n.heads { for i in 0..<n.queryLength { for j in 0..<n.keyLength
        where visible(b, h, i, j) {
        queryEmpty[n.queryIndex(b, h, i)] = false
        keyUnseen[n.keyIndex(b, h / group, j)] = false
    } } } }
    let rowEmpty = [queryEmpty, keyUnseen, keyUnseen]
    let widths = [n.headDim, n.headDim, n.valueDim]
    let refs = [reference.dq, reference.dk, reference.dv], naives = [naive.dq, naive.dk, naive.dv]
    for (t, (name, tensor)) in tensors.enumerated() {
        let values = tensor.elements, w = widths[t]
        let nans = values.lazy.filter { $0.isNaN }.count
        #expect(nans == 0, "\(label): \(nans) NaN in \(name)", sourceLocation: sourceLocation)
        let nonzero = rowEmpty[t].indices.filter { row in rowEmpty[t][row] && (0..<w).contains { values[row * w + $0] != 0 } }
        #expect(nonzero.isEmpty, "\(label): \(name) rows \(nonzero.prefix(4)) have no visible pair but are not 0",
                sourceLocation: sourceLocation)
        let lib = maxError(values, refs[t]), base = maxError(naives[t], refs[t])
        let bound = 3 * base.error + 1e-6 * (1 + base.scale)
        #expect(lib.error <= bound,
                "\(label): \(name) error \(lib.error) > bound \(bound) (naive Float \(base.error), max |ref| \(base.scale))",
                sourceLocation: sourceLocation)
    }
}

// MARK: - Cases

struct BackwardCase: Sendable, CustomTestStringConvertible {
    var batch = 1, heads = 2, kvHeads: Int? = nil
    var queryLength: Int, keyLength: Int? = nil
    var headDim = 16, valueDim: Int? = nil
    var causal = false
    var keyLengths: [Int]? = nil
    var scale: Float? = nil
    var seed: UInt64 = 0

    var nk: Int { keyLength ?? queryLength }
    var testDescription: String {
        "B\(batch) H\(heads)/\(kvHeads ?? heads) Nq\(queryLength) Nk\(nk) D\(headDim) Dv\(valueDim ?? headDim)"
            + (causal ? " causal" : "") + (keyLengths.map { " keyLengths\($0)" } ?? "")
            + (scale.map { " scale \($0)" } ?? "")
    }

    var attention: DenseAttention { DenseAttention(causal: causal, scale: scale) }
    var visible: Visibility {
        Visible.dense(causal: causal, queryLength: queryLength, keyLength: nk, keyLengths: keyLengths)
    }

    /// Query, key, value, the forward's result and a random `dO`.
    func inputs() throws -> (q: Tensor, k: Tensor, v: Tensor, result: AttentionResult, dO: Tensor) {
        let (q, k, v) = try randomQKV(batch: batch, heads: heads, kvHeads: kvHeads, queryLength: queryLength,
                                      keyLength: keyLength, headDim: headDim, valueDim: valueDim, seed: seed)
        let result = try attention.attend(query: q, key: k, value: v, keyLengths: keyLengths, threads: nil)
        let dO = try randomTensor([batch, heads, queryLength, valueDim ?? headDim], seed: seed &* 7 &+ 5)
        return (q, k, v, result, dO)
    }

    /// Runs the backward (optionally on NaN-padded strided copies of every input) and checks it.
    @discardableResult
    func check(embedded innerStride: Int? = nil, threads: Int? = nil,
               sourceLocation: SourceLocation = #_sourceLocation) throws -> AttentionGradients {
        var (q, k, v, result, dO) = try inputs()
        let reference = referenceBackward(query: q, key: k, value: v, outputGradient: dO,
                                          scale: scale.map(Double.init) ?? defaultScale(headDim: headDim),
                                          visible: visible)
        let naive = naiveFloatBackward(query: q, key: k, value: v, outputGradient: dO,
                                       scale: scale ?? 1 / Float(headDim).squareRoot(), visible: visible)
        let dims = GradientDims(query: q, value: v)
        if let innerStride {
            (q, k, v, dO) = (try embeddedInNaN(q, innerStride: innerStride), try embeddedInNaN(k, innerStride: innerStride),
                             try embeddedInNaN(v, innerStride: innerStride), try embeddedInNaN(dO, innerStride: innerStride))
            result = try AttentionResult(output: embeddedInNaN(result.output, innerStride: innerStride),
                                         logSumExp: embeddedInNaN(result.logSumExp, innerStride: innerStride))
        }
        let g = try attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                        keyLengths: keyLengths, threads: threads)
        checkGradients(g, reference: reference, naive: naive, dims: dims, visible: visible,
                       "\(testDescription)" + (innerStride.map { " embedded stride \($0)" } ?? ""),
                       sourceLocation: sourceLocation)
        return g
    }
}

private func seeded(_ cases: [BackwardCase], base: UInt64) -> [BackwardCase] {
    cases.enumerated().map { n, c in
        var c = c
        c.seed = base + UInt64(n)
        return c
    }
}

enum BackwardCases {
    static let lengths = seeded([1, 77, 130, 200].flatMap { n in
        [false, true].map { BackwardCase(heads: 4, kvHeads: 2, queryLength: n, causal: $0) }
    }, base: 100)

    static let headDims = seeded([1, 3, 65, 128].flatMap { d in
        [false, true].map { BackwardCase(queryLength: 37, keyLength: 45, headDim: d, causal: $0) }
    }, base: 200)

    static let valueDims = seeded([(64, 3), (3, 65), (16, 1), (1, 7), (33, 96)].flatMap { d, dv in
        [false, true].map { BackwardCase(queryLength: 70, keyLength: 66, headDim: d, valueDim: dv, causal: $0) }
    }, base: 300)

    static let unequalLengths = seeded([(17, 130), (130, 17), (1, 77), (77, 1), (64, 65), (65, 64), (200, 70)]
        .flatMap { nq, nk in
            [false, true].map { BackwardCase(queryLength: nq, keyLength: nk, headDim: 8, causal: $0) }
        }, base: 400)

    static let keyPadding = seeded([false, true].flatMap { causal in [
        BackwardCase(batch: 3, queryLength: 70, keyLength: 90, causal: causal, keyLengths: [90, 0, 45]),
        BackwardCase(batch: 2, heads: 4, kvHeads: 2, queryLength: 130, keyLength: 31, headDim: 9, valueDim: 33,
                     causal: causal, keyLengths: [17, 0]),
        BackwardCase(batch: 3, heads: 4, kvHeads: 1, queryLength: 31, keyLength: 129, headDim: 33, valueDim: 9,
                     causal: causal, keyLengths: [129, 64, 1]),
    ] }, base: 500)

    static let scales = seeded([Float(-0.5), 2.5].flatMap { scale in
        [false, true].map { BackwardCase(heads: 3, queryLength: 45, keyLength: 60, causal: $0, scale: scale) }
    }, base: 600)
}

// MARK: - Tests

@Suite("Dense backward")
struct DenseBackwardTests {
    @Test("matches the hand-differentiated Double reference: lengths", arguments: BackwardCases.lengths)
    func lengths(_ c: BackwardCase) throws { try c.check() }

    @Test("matches the reference: head dimensions", arguments: BackwardCases.headDims)
    func headDims(_ c: BackwardCase) throws { try c.check() }

    @Test("matches the reference: value dimension != head dimension", arguments: BackwardCases.valueDims)
    func valueDims(_ c: BackwardCase) throws { try c.check() }

    @Test("matches the reference: Nq != Nk (causal bottom-right)", arguments: BackwardCases.unequalLengths)
    func unequalLengths(_ c: BackwardCase) throws { try c.check() }

    @Test("matches the reference: key padding (a batch item with no key), grouped heads",
          arguments: BackwardCases.keyPadding)
    func keyPadding(_ c: BackwardCase) throws { try c.check() }

    @Test("matches the reference: custom scales", arguments: BackwardCases.scales)
    func scales(_ c: BackwardCase) throws { try c.check() }

    @Test("reads NaN-padded strided inputs in place (unit and stride-2 columns)", arguments: [1, 2])
    func stridedInputs(_ innerStride: Int) throws {
        let cases = [BackwardCase(batch: 2, heads: 4, kvHeads: 2, queryLength: 77, keyLength: 130, headDim: 64,
                                  valueDim: 32, causal: true, keyLengths: [130, 50], seed: 700),
                     BackwardCase(batch: 2, heads: 2, queryLength: 130, keyLength: 77, headDim: 5, valueDim: 7,
                                  keyLengths: [0, 77], seed: 701)]
        for c in cases { try c.check(embedded: innerStride) }
    }

    @Test("the Double reference agrees with central finite differences of the Double forward")
    func finiteDifferences() throws {
        for (causal, keyLengths, seed) in [(true, [4, 2], UInt64(800)), (false, [3, 0], 801), (true, [4, 4], 802)] {
            let dims = GradientDims(query: try Tensor(shape: [2, 2, 3, 3]), value: try Tensor(shape: [2, 1, 4, 2]))
            var rng = SeededGenerator(seed: seed)
            func random(_ count: Int) -> [Double] { (0..<count).map { _ in Double(rng.nextFloat(in: -1...1)) } }
            let q = random(2 * 2 * 3 * 3), k = random(2 * 1 * 4 * 3), v = random(2 * 1 * 4 * 2)
            let dO = random(2 * 2 * 3 * 2)
            let scale = 0.7
            let visible = Visible.dense(causal: causal, queryLength: 3, keyLength: 4, keyLengths: keyLengths)
            func gradients(_ q: [Double], _ k: [Double], _ v: [Double]) -> ReferenceGradients<Double> {
                referenceBackward(q: q, k: k, v: v, dO: dO, dims: dims, scale: scale, visible: visible,
                                  exp: { Foundation.exp($0) }, log: { Foundation.log($0) })
            }
            /// L = Σ dO ∘ O.
            func loss(_ q: [Double], _ k: [Double], _ v: [Double]) -> Double {
                zip(gradients(q, k, v).output, dO).reduce(0) { $0 + $1.0 * $1.1 }
            }
            let analytic = gradients(q, k, v)
            let h = 1e-5
            var worst = 0.0
            for which in 0..<3 {
                let x = [q, k, v][which], g = [analytic.dq, analytic.dk, analytic.dv][which]
                for n in x.indices {
                    var plus = x, minus = x
                    plus[n] += h
                    minus[n] -= h
                    let args = { (y: [Double]) in which == 0 ? (y, k, v) : which == 1 ? (q, y, v) : (q, k, y) }
                    let (p1, p2, p3) = args(plus), (m1, m2, m3) = args(minus)
                    let numeric = (loss(p1, p2, p3) - loss(m1, m2, m3)) / (2 * h)
                    worst = max(worst, abs(numeric - g[n]))
                }
            }
            #expect(worst < 1e-8, "causal \(causal) keyLengths \(keyLengths): finite differences differ by \(worst)")
            // Something to check: the gradients are not all zero.
            #expect(analytic.dq.contains { $0 != 0 } && analytic.dk.contains { $0 != 0 })
        }
    }

    @Test("bitwise identical gradients for 1, 2, 3 and 7 threads, and across runs")
    func determinism() throws {
        for c in [BackwardCase(batch: 2, heads: 4, kvHeads: 2, queryLength: 200, keyLength: 150, headDim: 65,
                               valueDim: 33, causal: true, keyLengths: [150, 77], seed: 900),
                  BackwardCase(batch: 1, heads: 4, kvHeads: 1, queryLength: 130, keyLength: 257, headDim: 64,
                               seed: 901),
                  // One key/value head: consecutive key blocks are consecutive work items, so the
                  // dQ ordering makes workers wait for each other.
                  BackwardCase(batch: 1, heads: 1, queryLength: 300, keyLength: 900, headDim: 32, causal: true,
                               seed: 902),
                  // Causal Nq = Nk: key block 1 starts at query tile 2 while block 0 is still on
                  // tiles 0 and 1, so without the ordering it would add to dQ first.
                  BackwardCase(batch: 1, heads: 1, queryLength: 1000, headDim: 64, causal: true, seed: 904),
                  BackwardCase(batch: 1, heads: 2, kvHeads: 1, queryLength: 700, keyLength: 500, headDim: 20,
                               valueDim: 64, seed: 903)] {
            let (q, k, v, result, dO) = try c.inputs()
            let runs = try [1, 2, 3, 7, 7].map {
                try c.attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                          keyLengths: c.keyLengths, threads: $0)
            }
            for (n, g) in runs.enumerated().dropFirst() {
                for (name, a, b) in [("dQuery", runs[0].dQuery, g.dQuery), ("dKey", runs[0].dKey, g.dKey),
                                     ("dValue", runs[0].dValue, g.dValue)] {
                    let (x, y) = (a.elements, b.elements)
                    #expect(bitwiseEqual(x, y), "\(c.testDescription) run \(n): \(name) differs at \(firstDifference(x, y))")
                }
            }
        }
    }

    @Test("backward cost: 2.5 × the forward's FLOPs, per-worker workspace independent of the sequence lengths")
    func cost() throws {
        for causal in [false, true] {
            let dense = DenseAttention(causal: causal)
            let shape = AttentionShape(heads: 8, queryLength: 2048, headDim: 64)
            let forward = try dense.cost(shape, threads: 2), backward = try dense.backwardCost(shape, threads: 2)
            #expect(backward.flops == 2.5 * forward.flops)
            #expect(backward.scoredPairs == forward.scoredPairs)
            #expect(backward.workspaceBytes > 0)
            // Per worker the same; the two orderings (dQ's and a broadcast bias's) keep two Ints
            // per block of 128 keys per head each (the blocks' counts are multiples of 8 here,
            // so the 64-byte rounding adds nothing).
            let long = try dense.backwardCost(AttentionShape(heads: 8, queryLength: 1 << 16, headDim: 64), threads: 2)
            #expect(long.workspaceBytes - backward.workspaceBytes == 2 * 2 * 8 * 8 * ((1 << 16) - 2048) / 128)
        }
        expectAttentionError(.invalidParameter, mentioning: ["threads"]) {
            try DenseAttention().backwardCost(AttentionShape(heads: 1, queryLength: 4, headDim: 4), threads: 0)
        }
        expectAttentionError(.unsupported, mentioning: ["headDim"]) {
            try DenseAttention().backwardCost(AttentionShape(heads: 1, queryLength: 4, headDim: 300), threads: 1)
        }
    }

    @Test("a small gradient step on Q, K, V lowers L = ½‖O − T‖² by what the gradients predict")
    func gradientStep() throws {
        for causal in [false, true] {
            let c = BackwardCase(batch: 2, heads: 4, kvHeads: 2, queryLength: 90, keyLength: 70, headDim: 24,
                                 valueDim: 20, causal: causal, keyLengths: [70, 33], seed: 1000)
            let (q, k, v, result, _) = try c.inputs()
            let target = try randomTensor(result.output.shape, seed: 1001)
            func loss(_ o: Tensor) -> Double {
                zip(o.elements, target.elements).reduce(0) { $0 + 0.5 * Double($1.0 - $1.1) * Double($1.0 - $1.1) }
            }
            // dL/dO = O − T.
            let dO = try Tensor(shape: target.shape, data: zip(result.output.elements, target.elements).map { $0 - $1 })
            let g = try c.attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                              keyLengths: c.keyLengths, threads: 2)
            let eta: Float = 0.01
            func step(_ x: Tensor, _ dx: Tensor) throws -> Tensor {
                try Tensor(shape: x.shape, data: zip(x.elements, dx.elements).map { $0 - eta * $1 })
            }
            let after = try c.attention.attend(query: step(q, g.dQuery), key: step(k, g.dKey), value: step(v, g.dValue),
                                               keyLengths: c.keyLengths, threads: 2)
            let squaredNorm = [g.dQuery, g.dKey, g.dValue].reduce(0.0) { sum, t in
                t.elements.reduce(sum) { $0 + Double($1) * Double($1) }
            }
            let before = loss(result.output), decrease = before - loss(after.output)
            let predicted = Double(eta) * squaredNorm
            #expect(decrease > 0, "causal \(causal): the loss rose from \(before) by \(-decrease)")
            // First order: L(x − η g) ≈ L − η ‖g‖²; the rest is O(η²).
            #expect(abs(decrease - predicted) < 0.05 * predicted,
                    "causal \(causal): decrease \(decrease), first-order prediction \(predicted), loss \(before)")
        }
    }

    /// End to end through two stacked layers: `Y₁ = Attn(X, X, X)` (causal), `Y₂ = Attn(Y₁,
    /// Y₁, Y₁)`, `L = ½‖Y₂ − T‖²`. Backpropagation: layer 2's three input gradients add up to
    /// `dY₁` (Y₁ is its query, key and value), layer 1's to `dX`. A step `X − η dX` lowers the
    /// loss by what the chain-ruled gradient predicts, and repeated steps keep lowering it.
    @Test("a two-layer toy model: chained gradients lower the loss as predicted")
    func twoLayerModel() throws {
        let attention = DenseAttention(causal: true)
        var x = try randomTensor([1, 2, 40, 16], seed: 1200)
        let target = try randomTensor([1, 2, 40, 16], seed: 1201)
        func add(_ a: Tensor, _ b: Tensor, _ c: Tensor) throws -> Tensor {
            try Tensor(shape: a.shape, data: (0..<a.count).map { a.elements[$0] + b.elements[$0] + c.elements[$0] })
        }
        func forward(_ x: Tensor) throws -> (y1: AttentionResult, y2: AttentionResult, loss: Double) {
            let y1 = try attention.attend(query: x, key: x, value: x)
            let y2 = try attention.attend(query: y1.output, key: y1.output, value: y1.output)
            let loss = zip(y2.output.elements, target.elements).reduce(0.0) {
                $0 + 0.5 * Double($1.0 - $1.1) * Double($1.0 - $1.1)
            }
            return (y1, y2, loss)
        }
        func gradient(_ x: Tensor) throws -> (dx: Tensor, loss: Double) {
            let (y1, y2, loss) = try forward(x)
            let dY2 = try Tensor(shape: target.shape, data: zip(y2.output.elements, target.elements).map { $0 - $1 })
            let g2 = try attention.gradients(query: y1.output, key: y1.output, value: y1.output, result: y2,
                                             outputGradient: dY2, threads: 2)
            let dY1 = try add(g2.dQuery, g2.dKey, g2.dValue)
            let g1 = try attention.gradients(query: x, key: x, value: x, result: y1, outputGradient: dY1, threads: 3)
            return (try add(g1.dQuery, g1.dKey, g1.dValue), loss)
        }
        let eta: Float = 0.02
        var losses: [Double] = []
        for step in 0..<5 {
            let (dx, loss) = try gradient(x)
            losses.append(loss)
            let next = try Tensor(shape: x.shape, data: zip(x.elements, dx.elements).map { $0 - eta * $1 })
            if step == 0 {
                let squaredNorm = dx.elements.reduce(0.0) { $0 + Double($1) * Double($1) }
                let decrease = loss - (try forward(next).loss), predicted = Double(eta) * squaredNorm
                #expect(predicted > 0.01 * loss, "the gradient vanished: η‖dX‖² = \(predicted), loss \(loss)")
                #expect(abs(decrease - predicted) < 0.1 * predicted,
                        "first step: decrease \(decrease), first-order prediction \(predicted)")
            }
            x = next
        }
        for (a, b) in zip(losses, losses.dropFirst()) { #expect(b < a, "the loss rose: \(losses)") }
    }

    @Test("bad inputs throw errors naming the tensor or option")
    func badInputs() throws {
        let c = BackwardCase(batch: 2, heads: 4, kvHeads: 2, queryLength: 5, keyLength: 6, headDim: 3, valueDim: 2)
        let (q, k, v, result, dO) = try c.inputs()
        let dense = c.attention
        func call(q query: Tensor? = nil, k key: Tensor? = nil, o: Tensor? = nil, lse: Tensor? = nil,
                  g: Tensor? = nil, keyLengths: [Int]? = nil, threads: Int? = 1) throws -> AttentionGradients {
            try dense.gradients(query: query ?? q, key: key ?? k, value: v, output: o ?? result.output,
                                logSumExp: lse ?? result.logSumExp, outputGradient: g ?? dO,
                                keyLengths: keyLengths, threads: threads)
        }
        _ = try call()
        expectAttentionError(.shapeMismatch, mentioning: ["output"]) { try call(o: try Tensor(shape: [2, 4, 5, 3])) }
        expectAttentionError(.shapeMismatch, mentioning: ["logSumExp"]) { try call(lse: try Tensor(shape: [2, 4, 5, 2])) }
        expectAttentionError(.shapeMismatch, mentioning: ["logSumExp"]) { try call(lse: try Tensor(shape: [2, 4, 6, 1])) }
        expectAttentionError(.shapeMismatch, mentioning: ["outputGradient"]) { try call(g: try Tensor(shape: [2, 4, 5, 3])) }
        expectAttentionError(.shapeMismatch, mentioning: ["outputGradient"]) { try call(g: try Tensor(shape: [1, 4, 5, 2])) }
        expectAttentionError(.shapeMismatch, mentioning: ["head dimension"]) { try call(k: try Tensor(shape: [2, 2, 6, 4])) }
        expectAttentionError(.invalidShape, mentioning: ["kvHeads"]) { try call(q: try Tensor(shape: [2, 3, 5, 3])) }
        expectAttentionError(.invalidParameter, mentioning: ["keyLengths"]) { try call(keyLengths: [6]) }
        expectAttentionError(.invalidParameter, mentioning: ["keyLengths[1]"]) { try call(keyLengths: [6, 7]) }
        expectAttentionError(.invalidParameter, mentioning: ["keyLengths[0]"]) { try call(keyLengths: [-1, 2]) }
        expectAttentionError(.invalidParameter, mentioning: ["threads"]) { try call(threads: 0) }
        expectAttentionError(.invalidParameter, mentioning: ["scale"]) {
            try DenseAttention(scale: .nan).gradients(query: q, key: k, value: v, result: result, outputGradient: dO)
        }
    }
}
