// LSHAttention's backward pass with the buckets held fixed, against a Double reference of
// the forward as defined, differentiated by hand: the rounds' visible pairs come from the
// library's own buckets (lshVisibility), each round's keys become a copy of the keys (so a
// pair seen in several rounds counts as often as the forward counts it), the merged softmax
// over those copies is DenseBackwardTests' reference, and shared QK's normalisation is
// differentiated on top. The reference is itself checked by central finite differences of
// its forward (routes fixed) and against the library's forward. Awkward shapes (N not a
// multiple of the bucket size or the tiles, D = 1, 3, 65, grouped heads, key padding down
// to an item with no key, shared QK and not, causal and not, 1 to 4 rounds, across buckets,
// factorised buckets), 1/2/3/7 threads bitwise, views against Tensors, bad inputs, the cost,
// and a gradient step that lowers a loss.

@_spi(Testing) @_spi(Benchmarking) import EfficientAttention
import Foundation
import Testing

// MARK: - Reference

/// The forward as defined with the rounds' visible pairs `table` fixed, and its gradients
/// of `L = Σ dO ∘ O`, in `T`: keys `k_j = q_j / |q_j|` (shared QK; 0 for a zero row) or the
/// given ones, copied once per round; query `i` sees copy `r` of key `j` iff
/// `table[r, b, h, i, j]`; one softmax over all the copies (the exact log-sum-exp merge of
/// the rounds); then the copies' gradients summed, and with shared QK taken through the
/// normalisation into `dq` (`dk = 0`).
func lshReferenceBackward<T: BinaryFloatingPoint>(
    q: [T], k: [T], v: [T], dO: [T], dims n: GradientDims, sharedQK: Bool, scale: T, table: VisibilityTable,
    exp: (T) -> T, log: (T) -> T
) -> ReferenceGradients<T> {
    lshModifiedReferenceBackward(q: q, k: k, v: v, dO: dO, dims: n, sharedQK: sharedQK, scale: scale, table: table,
                                 modifiers: nil, exp: exp, log: log, tanh: { $0 }).gradients
}

/// ``lshReferenceBackward(q:k:v:dO:dims:sharedQK:scale:table:exp:log:)`` through score
/// modifiers (ModifierBackwardTests' reference, each round's copy of key `j` modified at
/// position `j`), with `∂bias` and `∂sinks`; `nil` modifiers: the plain reference.
func lshModifiedReferenceBackward<T: BinaryFloatingPoint>(
    q: [T], k: [T], v: [T], dO: [T], dims n: GradientDims, sharedQK: Bool, scale: T, table: VisibilityTable,
    modifiers: ReferenceModifiers<T>?, exp: (T) -> T, log: (T) -> T, tanh: (T) -> T
) -> ModifiedReference<T> {
    let (d, dv, rounds, len) = (n.headDim, n.valueDim, table.rounds, n.keyLength)
    let group = n.heads / n.kvHeads, keyHeads = sharedQK ? n.heads : n.kvHeads
    // The keys of each key head (a query head with shared QK), and their rows' 1 / |q|.
    var keys = [T](repeating: 0, count: n.batch * keyHeads * len * d), inverse = [T](repeating: 0, count: keys.count / d)
    for b in 0..<n.batch { for g in 0..<keyHeads { for j in 0..<len {
        let row = (b * keyHeads + g) * len + j
        if sharedQK {
            let source = n.queryIndex(b, g, j) * d
            let norm = (0..<d).reduce(T(0)) { $0 + q[source + $1] * q[source + $1] }.squareRoot()
            inverse[row] = norm > 0 ? 1 / norm : 0
            for c in 0..<d { keys[row * d + c] = q[source + c] * inverse[row] }
        } else {
            for c in 0..<d { keys[row * d + c] = k[row * d + c] }
        }
    } } }
    // One copy of every key and value per round.
    var expanded = n
    expanded.kvHeads = keyHeads
    expanded.keyLength = rounds * len
    var kx = [T](), vx = [T]()
    for b in 0..<n.batch { for g in 0..<keyHeads { for _ in 0..<rounds { for j in 0..<len {
        let row = (b * keyHeads + g) * len + j, valueRow = n.keyIndex(b, sharedQK ? g / group : g, j)
        kx += keys[(row * d)..<((row + 1) * d)]
        vx += v[(valueRow * dv)..<((valueRow + 1) * dv)]
    } } } }
    let fixed = table
    let visible: Visibility = { b, h, i, j in fixed[j / len, b, h, i, j % len] }
    let modified = modifiers.map {
        modifiedReferenceBackward(q: q, k: kx, v: vx, dO: dO, dims: expanded, scale: scale, visible: visible,
                                  modifiers: $0, exp: exp, log: log, tanh: tanh, keyPosition: { $0 % len },
                                  positionKeyLength: len)
    }
    let x = modified?.gradients
        ?? referenceBackward(q: q, k: kx, v: vx, dO: dO, dims: expanded, scale: scale, visible: visible, exp: exp, log: log)
    var result = ReferenceGradients<T>(output: x.output, lse: x.lse, dq: x.dq, dk: .init(repeating: 0, count: k.count),
                                       dv: .init(repeating: 0, count: v.count))
    for b in 0..<n.batch { for g in 0..<keyHeads { for j in 0..<len {
        let row = (b * keyHeads + g) * len + j, valueRow = n.keyIndex(b, sharedQK ? g / group : g, j)
        var dk = [T](repeating: 0, count: d)
        for r in 0..<rounds {
            let copy = expanded.keyIndex(b, g, r * len + j)
            for c in 0..<d { dk[c] += x.dk[copy * d + c] }
            for c in 0..<dv { result.dv[valueRow * dv + c] += x.dv[copy * dv + c] }
        }
        if sharedQK {
            // d(q / |q|) = (I − k kᵀ) / |q|.
            let along = (0..<d).reduce(T(0)) { $0 + keys[row * d + $1] * dk[$1] }
            let target = n.queryIndex(b, g, j) * d
            for c in 0..<d { result.dq[target + c] += inverse[row] * (dk[c] - along * keys[row * d + c]) }
        } else {
            for c in 0..<d { result.dk[row * d + c] += dk[c] }
        }
    } } }
    return ModifiedReference(gradients: result, bias: modified?.bias ?? [], sinks: modified?.sinks ?? [])
}

struct LSHBackwardCase: Sendable, CustomTestStringConvertible {
    var lsh: LSHCase
    var testDescription: String { lsh.testDescription }

    init(_ lsh: LSHCase) { self.lsh = lsh }

    func inputs() throws -> (q: Tensor, k: Tensor, v: Tensor, result: AttentionResult, dO: Tensor) {
        let (q, k, v) = try lsh.inputs()
        let result = try lsh.attention.attend(query: q, key: k, value: v, keyLengths: lsh.keyLengths, threads: 2)
        let dO = try randomTensor(result.output.shape, seed: lsh.seed &+ 7)
        return (q, k, v, result, dO)
    }

    /// The library's gradients against the Double reference, and the reference's forward
    /// against the library's.
    func check(threads: Int = 2, sourceLocation: SourceLocation = #_sourceLocation) throws {
        let attention = lsh.attention
        let (q, k, v, result, dO) = try inputs()
        let g = try attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                        keyLengths: lsh.keyLengths, threads: threads)
        let table = try lshVisibility(attention, q: q, k: k, keyLengths: lsh.keyLengths)
        let dims = GradientDims(query: q, value: v)
        let scale = 1 / Double(q.shape[3]).squareRoot()
        let reference = lshReferenceBackward(
            q: q.elements.map(Double.init), k: k.elements.map(Double.init), v: v.elements.map(Double.init),
            dO: dO.elements.map(Double.init), dims: dims, sharedQK: lsh.sharedQK, scale: scale, table: table,
            exp: { Foundation.exp($0) }, log: { Foundation.log($0) })
        let naive = lshReferenceBackward(q: q.elements, k: k.elements, v: v.elements, dO: dO.elements, dims: dims,
                                         sharedQK: lsh.sharedQK, scale: Float(scale), table: table,
                                         exp: { expf($0) }, log: { logf($0) })
        // The reference's forward is the library's (the routes and the rules are the same).
        let output = result.output.elements
        let forwardError = zip(output, reference.output).map { abs(Double($0) - $1) }.max() ?? 0
        #expect(forwardError < 1e-5, "\(testDescription): library forward differs from the reference by \(forwardError)",
                sourceLocation: sourceLocation)
        // With shared QK every query row is also a key row: no row is known to be zero.
        let shared = lsh.sharedQK
        let visible: Visibility = { b, h, i, j in
            shared || (0..<table.rounds).contains { r in table[r, b, h, i, j] }
        }
        checkGradients(g, reference: reference, naive: naive, dims: dims, visible: visible,
                       "lsh \(testDescription) threads \(threads)", sourceLocation: sourceLocation)
    }
}

enum LSHBackwardCases {
    static let reference: [LSHBackwardCase] = [
        LSHCase(length: 1),
        LSHCase(length: 2, causal: true),
        LSHCase(length: 17, bucketSize: 4),
        LSHCase(length: 17, bucketSize: 4, causal: true),
        LSHCase(length: 33, headDim: 1, bucketSize: 4, hashes: 3, across: true),
        LSHCase(length: 17, bucketSize: 4, across: true),
        LSHCase(heads: 4, kvHeads: 2, length: 100, headDim: 3, bucketSize: 16, hashes: 3),
        LSHCase(length: 100, headDim: 1, bucketSize: 16, causal: true),
        LSHCase(length: 77, headDim: 64, valueDim: 65, bucketSize: 8, hashes: 4, causal: true),
        LSHCase(heads: 1, length: 130, headDim: 65, valueDim: 3, bucketSize: 64, hashes: 1),
        LSHCase(heads: 1, length: 250, headDim: 8, bucketSize: 100, hashes: 2, across: true),
        LSHCase(length: 90, bucketSize: 10, hashes: 2, sharedQK: false),
        LSHCase(heads: 4, kvHeads: 2, length: 61, headDim: 3, bucketSize: 8, hashes: 3, sharedQK: false, causal: true),
        LSHCase(heads: 4, kvHeads: 1, length: 45, headDim: 65, valueDim: 7, bucketSize: 8, hashes: 1, sharedQK: false),
        LSHCase(length: 50, bucketSize: 8, across: true),
        LSHCase(length: 50, bucketSize: 8, across: true, causal: true),
        LSHCase(batch: 3, length: 40, bucketSize: 8, keyLengths: [40, 0, 13]),
        LSHCase(batch: 2, length: 40, bucketSize: 8, sharedQK: false, causal: true, keyLengths: [1, 33]),
        LSHCase(length: 300, headDim: 32, bucketSize: 64, hashes: 4),
        LSHCase(length: 300, headDim: 16, bucketSize: 32, hashes: 2, across: true, causal: true),
        LSHCase(length: 101, headDim: 3, bucketSize: 8, hashes: 3, factors: [4, 2, 6], causal: true),
        LSHCase(heads: 1, length: 1101, headDim: 8, bucketSize: 4, hashes: 2, bucketCount: 8, causal: true),
    ].enumerated().map { n, c in var c = c; c.seed = 500 + UInt64(n); return LSHBackwardCase(c) }
}

@Suite("LSH backward")
struct LSHBackwardTests {
    @Test("matches the hand-differentiated Double reference with the forward's buckets",
          arguments: LSHBackwardCases.reference)
    func reference(_ c: LSHBackwardCase) throws { try c.check() }

    @Test("the Double reference agrees with central finite differences of its forward (routes fixed)",
          arguments: [(true, false), (false, true), (true, true)])
    func finiteDifferences(_ sharedQK: Bool, _ causal: Bool) throws {
        // A tiny problem whose rounds see several keys, some twice, and (shared QK) a query
        // under the self rule.
        let c = LSHCase(batch: 1, heads: 2, kvHeads: 1, length: 9, headDim: 3, bucketSize: 2, hashes: 2,
                        sharedQK: sharedQK, across: !sharedQK, causal: causal, seed: sharedQK ? 71 : 72)
        let attention = c.attention
        let (qt, kt, vt) = try c.inputs()
        let table = try lshVisibility(attention, q: qt, k: kt, keyLengths: nil)
        let dims = GradientDims(query: qt, value: vt)
        let dO = try randomTensor([1, 2, 9, 3], seed: 73).elements.map(Double.init)
        func run(_ q: [Double], _ k: [Double], _ v: [Double]) -> ReferenceGradients<Double> {
            lshReferenceBackward(q: q, k: k, v: v, dO: dO, dims: dims, sharedQK: sharedQK, scale: 0.8, table: table,
                                 exp: { Foundation.exp($0) }, log: { Foundation.log($0) })
        }
        let (q, k, v) = (qt.elements.map(Double.init), kt.elements.map(Double.init), vt.elements.map(Double.init))
        let analytic = run(q, k, v)
        let h = 1e-6
        for (which, grad) in [analytic.dq, analytic.dk, analytic.dv].enumerated() {
            for index in grad.indices {
                func loss(_ delta: Double) -> Double {
                    var x = [q, k, v]
                    x[which][index] += delta
                    return zip(run(x[0], x[1], x[2]).output, dO).reduce(0) { $0 + $1.0 * $1.1 }
                }
                let numeric = (loss(h) - loss(-h)) / (2 * h)
                #expect(abs(numeric - grad[index]) <= 1e-6 * (1 + abs(numeric)),
                        "shared \(sharedQK) causal \(causal) input \(which)[\(index)]: analytic \(grad[index]), numeric \(numeric)")
            }
        }
        // The problem is not trivial: pairs seen in both rounds, and the gradients reach every input.
        let twice = (0..<9).contains { i in (0..<9).contains { j in table[0, 0, 0, i, j] && table[1, 0, 0, i, j] } }
        #expect(twice, "no pair is seen in both rounds")
        #expect(analytic.dq.contains { $0 != 0 } && analytic.dv.contains { $0 != 0 })
        #expect(sharedQK || analytic.dk.contains { $0 != 0 })
    }

    @Test("bitwise identical gradients for 1, 2, 3 and 7 threads", arguments: [true, false])
    func threadInvariance(_ sharedQK: Bool) throws {
        let c = LSHCase(batch: 2, heads: 4, kvHeads: 2, length: 700, headDim: 16, bucketSize: 32, hashes: 3,
                        sharedQK: sharedQK, causal: !sharedQK, keyLengths: [700, 301], seed: 600)
        let (q, k, v, result, dO) = try LSHBackwardCase(c).inputs()
        let runs = try [1, 2, 3, 7].map {
            try c.attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                      keyLengths: c.keyLengths, threads: $0)
        }
        for (n, g) in runs.enumerated().dropFirst() { expectBitwiseEqualGradients(runs[0], g, "run \(n)") }
        #expect(runs[0].dQuery.elements.contains { $0 != 0 })
    }

    @Test("the view entry point (strided NaN-padded views, a caller's workspace) equals the Tensor convenience",
          arguments: [true, false])
    func viewEntryPoint(_ sharedQK: Bool) throws {
        let c = LSHCase(batch: 2, heads: 4, kvHeads: 2, length: 150, headDim: 12, valueDim: 6, bucketSize: 16,
                        hashes: 2, sharedQK: sharedQK, causal: sharedQK, keyLengths: [150, 61], seed: 610)
        let (q, k, v, result, dO) = try LSHBackwardCase(c).inputs()
        let shape = try AttentionShape(query: q, key: k, value: v)
        try expectViewEntryPointMatchesTensors(c.attention, shape: shape, query: q, key: k, value: v, result: result,
                                               outputGradient: dO, keyLengths: c.keyLengths, c.testDescription)
    }

    @Test("explicit rotations give the gradients of the seeded ones they equal, bitwise")
    func explicitRotations() throws {
        let c = LSHCase(length: 120, bucketSize: 16, hashes: 2, causal: true, seed: 620)
        let (q, k, v, result, dO) = try LSHBackwardCase(c).inputs()
        var explicit = c.attention
        explicit.rotations = try c.attention.rotations(for: try AttentionShape(query: q, key: k, value: v))
        let seeded = try c.attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO)
        let given = try explicit.gradients(query: q, key: k, value: v, result: result, outputGradient: dO)
        expectBitwiseEqualGradients(seeded, given, "explicit rotations")
    }

    @Test("the forward's routes give the same result and gradients, bitwise; routes of another problem throw",
          arguments: [true, false])
    func routesHandedOver(_ sharedQK: Bool) throws {
        let c = LSHCase(batch: 2, heads: 4, kvHeads: 2, length: 130, headDim: 8, bucketSize: 16, hashes: 3,
                        sharedQK: sharedQK, causal: true, keyLengths: [130, 70], seed: 650)
        let (q, k, v, result, dO) = try LSHBackwardCase(c).inputs()
        let attention = c.attention
        let (routed, routes) = try attention.attendReturningRoutes(query: q, key: k, value: v, keyLengths: c.keyLengths,
                                                                   threads: 3)
        expectBitwiseEqual(routed, result, "attendReturningRoutes")
        let ids = try attention.bucketIDs(query: q, key: k)
        let queryStart: Int = ((1 * 4 + 3) * 3 + 2) * 130, keyStart: Int = ((1 * 4 + 2) * 3 + 1) * 130
        let expectedQueries: [Int] = Array(ids.query[queryStart..<(queryStart + 130)])
        let expectedKeys: [Int] = Array(ids.key[keyStart..<(keyStart + 130)])
        #expect(routes.queryBuckets(batch: 1, head: 3, round: 2) == expectedQueries)
        #expect(routes.keyBuckets(batch: 1, head: 2, round: 1) == expectedKeys)
        let recomputed = try attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                                 keyLengths: c.keyLengths, threads: 2)
        let given = try attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                            routes: routes, keyLengths: c.keyLengths, threads: 3)
        expectBitwiseEqualGradients(recomputed, given, "routes handed over")
        var other = attention
        other.hashes = 2
        expectAttentionError(.shapeMismatch, mentioning: ["routes"]) {
            try other.gradients(query: q, key: k, value: v, result: result, outputGradient: dO, routes: routes,
                                keyLengths: c.keyLengths)
        }
        var flipped = attention
        flipped.sharedQK.toggle()
        expectAttentionError(.shapeMismatch, mentioning: ["routes"]) {
            try flipped.gradients(query: q, key: k, value: v, result: result, outputGradient: dO, routes: routes,
                                  keyLengths: c.keyLengths)
        }
    }

    @Test("backward cost: 2.5 × the attention plus the hashing, workspace O(N)")
    func cost() throws {
        let attention = LSHAttention()
        let shape = AttentionShape(heads: 8, queryLength: 4096, headDim: 64)
        let forward = try attention.cost(shape, threads: 2), backward = try attention.backwardCost(shape, threads: 2)
        #expect(backward.flops > 2.2 * forward.flops && backward.flops < 2.5 * forward.flops, "\(backward) vs \(forward)")
        #expect(backward.scoredPairs == forward.scoredPairs)
        let long = try attention.backwardCost(AttentionShape(heads: 8, queryLength: 16384, headDim: 64), threads: 2)
        // Four times N: at most a little over four times the workspace (no N² term).
        #expect(long.workspaceBytes < 5 * backward.workspaceBytes && long.workspaceBytes > 3 * backward.workspaceBytes,
                "\(long.workspaceBytes) vs \(backward.workspaceBytes)")
    }

    @Test("misshapen output, logSumExp or outputGradient, Nq != Nk and a short workspace throw")
    func badInputs() throws {
        let c = LSHCase(length: 20, headDim: 4, bucketSize: 4, seed: 630)
        let (q, k, v, result, dO) = try LSHBackwardCase(c).inputs()
        let attention = c.attention
        expectMisshapenGradientInputsThrow(attention, query: q, key: k, value: v, result: result, outputGradient: dO,
                                           wrong: try Tensor(shape: [1, 2, 19, 4]))
        let (short, _, _) = try randomQKV(heads: 2, queryLength: 19, headDim: 4, seed: 631)
        let shortResult = try DenseAttention().attend(query: short, key: k, value: v)
        expectAttentionError(.unsupported, mentioning: ["queryLength == keyLength"]) {
            try attention.gradients(query: short, key: k, value: v, result: shortResult,
                                    outputGradient: shortResult.output)
        }
        var bad = attention
        bad.hashes = 0
        expectAttentionError(.invalidParameter, mentioning: ["hashes"]) {
            try bad.gradients(query: q, key: k, value: v, result: result, outputGradient: dO)
        }
        let shape = try AttentionShape(query: q, key: k, value: v)
        expectAttentionError(.invalidParameter, mentioning: ["workspace"]) {
            try viewPathGradients(attention, shape: shape, q: q, k: k, v: v, result: result, dO: dO, keyLengths: nil,
                                  workspaceShort: true)
        }
    }

    @Test("a gradient step lowers a loss through two LSH layers")
    func gradientStep() throws {
        // Two shared-QK layers: y = LSH(x, x, v1), z = LSH(y, y, v2), loss ½|z − target|².
        let layer = LSHAttention(bucketSize: 8, hashes: 2, causal: true, seed: 5)
        let x = try randomTensor([1, 2, 48, 8], seed: 640)
        let v1 = try randomTensor([1, 2, 48, 8], seed: 641), v2 = try randomTensor([1, 2, 48, 8], seed: 642)
        let target = try randomTensor([1, 2, 48, 8], seed: 643)
        func forward(_ x: Tensor, _ v1: Tensor, _ v2: Tensor) throws -> (AttentionResult, AttentionResult, Double) {
            let first = try layer.attend(query: x, key: x, value: v1)
            let second = try layer.attend(query: first.output, key: first.output, value: v2)
            let loss = zip(second.output.elements, target.elements).reduce(0.0) { $0 + 0.5 * pow(Double($1.0 - $1.1), 2) }
            return (first, second, loss)
        }
        let (first, second, loss) = try forward(x, v1, v2)
        let dz = try Tensor(shape: target.shape, data: zip(second.output.elements, target.elements).map { $0 - $1 })
        let g2 = try layer.gradients(query: first.output, key: first.output, value: v2, result: second, outputGradient: dz)
        let g1 = try layer.gradients(query: x, key: x, value: v1, result: first, outputGradient: g2.dQuery)
        func step(_ t: Tensor, _ g: Tensor, _ rate: Float) throws -> Tensor {
            try Tensor(shape: t.shape, data: zip(t.elements, g.elements).map { $0 - rate * $1 })
        }
        // The largest of these steps that leaves both layers' buckets as they were (the
        // gradient is that of fixed routes; the inputs are seeded, so the choice is fixed).
        let squared = [g1.dQuery, g1.dValue, g2.dValue].flatMap(\.elements).reduce(0.0) { $0 + Double($1 * $1) }
        var checked = false
        for rate: Float in [0.05, 0.02, 0.01, 0.005, 0.002] {
            let (x2, v1b, v2b) = (try step(x, g1.dQuery, rate), try step(v1, g1.dValue, rate),
                                  try step(v2, g2.dValue, rate))
            let (firstAfter, _, after) = try forward(x2, v1b, v2b)
            let y = first.output, y2 = firstAfter.output
            guard try layer.bucketIDs(query: x, key: x).query == layer.bucketIDs(query: x2, key: x2).query,
                  try layer.bucketIDs(query: y, key: y).query == layer.bucketIDs(query: y2, key: y2).query
            else { continue }
            // The step's first-order decrease: rate · |∇L|².
            #expect(after < loss, "rate \(rate): loss \(loss) → \(after)")
            #expect(abs((loss - after) - Double(rate) * squared) < 0.2 * Double(rate) * squared,
                    "rate \(rate): decrease \(loss - after), first-order prediction \(Double(rate) * squared)")
            checked = true
            break
        }
        #expect(checked, "every step changed the buckets")
    }
}
