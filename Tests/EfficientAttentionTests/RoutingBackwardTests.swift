// RoutingAttention's backward pass (routes held fixed) against a Double reference of the
// forward as defined, differentiated by hand (the routes taken from the library's
// `routes(query:key:)`; the reference itself checked by central finite differences of its
// Double forward with the same routes), on awkward shapes (N not a multiple of the cluster
// size, clusters of more than one key block, D = 1, 3, 65, Nq != Nk both ways, grouped
// heads, key padding down to a batch item with no key, causal and not); bitwise identical
// for 1, 2, 3 and 7 threads; the view entry point equal to the Tensor convenience; bad
// inputs throw; a gradient step lowers a loss.

@_spi(Testing) @_spi(Benchmarking) import EfficientAttention
import Foundation
import Testing

/// Output, log-sum-exp and the gradients of `L = Σ dO ∘ O` of routing attention in Double,
/// and each query's number of memberships with a visible key.
struct RoutingReference {
    var output: [Double], lse: [Double], dq: [Double], dk: [Double], dv: [Double]
    /// `∂L/∂bias` (the bias's shape) when the modifiers have a bias, and which of its
    /// elements some membership scores.
    var bias: [Double] = [], biasScored: [Bool] = []
    var used: [Int]
    /// Per key row: whether some membership sees it.
    var seen: [Bool]
}

/// The forward as ATTENTION_SPEC.md and KernelDocs/Routing.md define it, with the given
/// routes (`routes.query[(b·H + h)·K + c]`, `routes.key[...]`), and its derivative:
/// for each membership `(c, i)` with visible keys `J`, `P = softmax(scale · q_i · k_J)`,
/// `o_c = Σ P_j v_j`; `o_i = mean_c o_c`, `lse_i = log mean_c exp(lse_c)`. Backward: the
/// mean gives each membership `g = dO_i / u_i`; `dP_j = g · v_j`, `D = Σ_j P_j dP_j`,
/// `dS_j = P_j (dP_j − D)`, `dq_i += scale Σ dS_j k_j`, `dk_j += scale dS_j q_i`, `dv_j += P_j g`.
/// With `modifiers` (no sinks) each score is modified as ModifierBackwardTests' reference
/// does (`s′ = cap tanh(s / cap) + bias_ij − α_h |i + Nk − Nq − j|`), `∂bias_ij += G_j =
/// P_j (dP_j − D)` and `dS_j = G_j (1 − tanh²)`; a membership whose scores are all `−∞`
/// has no visible key.
func routingReference(q: [Double], k: [Double], v: [Double], dO: [Double], dims n: GradientDims,
                      routes: (query: [[Int]], key: [[Int]]), clusters: Int, scale: Double,
                      causal: Bool, keyLengths: [Int]?, modifiers mods: ReferenceModifiers<Double>? = nil) -> RoutingReference {
    let (d, dv, group) = (n.headDim, n.valueDim, n.heads / n.kvHeads)
    let rows = n.batch * n.heads * n.queryLength
    var r = RoutingReference(output: .init(repeating: 0, count: rows * dv), lse: .init(repeating: -.infinity, count: rows),
                             dq: .init(repeating: 0, count: q.count), dk: .init(repeating: 0, count: k.count),
                             dv: .init(repeating: 0, count: v.count), used: .init(repeating: 0, count: rows),
                             seen: .init(repeating: false, count: k.count / d))
    struct Membership { var row: Int, i: Int, keys: [Int], p: [Double], o: [Double], lse: Double, derivative: [Double] }
    if let bias = mods?.bias {
        r.bias = .init(repeating: 0, count: bias.count)
        r.biasScored = .init(repeating: false, count: bias.count)
    }
    for b in 0..<n.batch { for h in 0..<n.heads {
        let hk = h / group, valid = keyLengths?[b] ?? n.keyLength
        var memberships: [Membership] = []
        for c in 0..<clusters {
            let route = (b * n.heads + h) * clusters + c
            for i in routes.query[route] {
                let row = n.queryIndex(b, h, i)
                let keys = routes.key[route].filter { $0 < valid && (!causal || $0 <= i + n.keyLength - n.queryLength) }
                guard !keys.isEmpty else { continue }
                var derivative = [Double](repeating: 1, count: keys.count)
                let scores = keys.enumerated().map { t, j -> Double in
                    let kj = n.keyIndex(b, hk, j)
                    var s = scale * (0..<d).reduce(0.0) { $0 + q[row * d + $1] * k[kj * d + $1] }
                    if let cap = mods?.softCap {
                        let th = tanh(s / cap)
                        s = cap * th
                        derivative[t] = 1 - th * th
                    }
                    if let bias = mods?.bias { s += bias[mods!.biasIndex(b, h, i, j)] }
                    if let slopes = mods?.slopes { s -= slopes[h] * Double(abs(i + n.keyLength - n.queryLength - j)) }
                    return s
                }
                let top = scores.max()!
                guard top > -.infinity else { continue }
                let e = scores.map { exp($0 - top) }, sum = e.reduce(0, +)
                let p = e.map { $0 / sum }
                var o = [Double](repeating: 0, count: dv)
                for (t, j) in keys.enumerated() { for col in 0..<dv { o[col] += p[t] * v[n.keyIndex(b, hk, j) * dv + col] } }
                memberships.append(Membership(row: row, i: i, keys: keys, p: p, o: o, lse: top + log(sum),
                                              derivative: derivative))
                for j in keys { r.seen[n.keyIndex(b, hk, j)] = true }
                r.used[row] += 1
            }
        }
        var sums = [Int: Double]()
        for m in memberships {
            let u = Double(r.used[m.row])
            for col in 0..<dv { r.output[m.row * dv + col] += m.o[col] / u }
            sums[m.row, default: 0] += exp(m.lse) / u
        }
        for (row, s) in sums { r.lse[row] = log(s) }
        for m in memberships {
            let u = Double(r.used[m.row])
            let g = (0..<dv).map { dO[m.row * dv + $0] / u }
            let dp = m.keys.map { j in (0..<dv).reduce(0.0) { $0 + g[$1] * v[n.keyIndex(b, hk, j) * dv + $1] } }
            let rowDot = zip(m.p, dp).reduce(0.0) { $0 + $1.0 * $1.1 }
            for (t, j) in m.keys.enumerated() {
                let pairGradient = m.p[t] * (dp[t] - rowDot), ds = pairGradient * m.derivative[t]
                let kj = n.keyIndex(b, hk, j)
                if let mods, mods.bias != nil {
                    r.bias[mods.biasIndex(b, h, m.i, j)] += pairGradient
                    r.biasScored[mods.biasIndex(b, h, m.i, j)] = true
                }
                for c in 0..<d {
                    r.dq[m.row * d + c] += scale * ds * k[kj * d + c]
                    r.dk[kj * d + c] += scale * ds * q[m.row * d + c]
                }
                for c in 0..<dv { r.dv[kj * dv + c] += m.p[t] * g[c] }
            }
        }
    } }
    return r
}

/// The library's forward output and log-sum-exp against the reference's.
func checkRoutingForward(_ result: AttentionResult, _ reference: RoutingReference, _ label: String,
                         sourceLocation: SourceLocation = #_sourceLocation) {
    let (outputError, outputScale) = maxErrorAndMagnitude(result.output.elements, reference.output)
    #expect(outputError <= 1e-5 * (1 + outputScale), "\(label): forward output error \(outputError)",
            sourceLocation: sourceLocation)
    #expect(zip(result.logSumExp.elements, reference.lse).allSatisfy { l, r in
        r == -.infinity ? l == -.infinity : abs(Double(l) - r) <= 1e-5 * (1 + abs(r))
    }, "\(label): forward log-sum-exp", sourceLocation: sourceLocation)
}

struct RoutingBackwardCase: Sendable, CustomTestStringConvertible {
    var batch = 1, heads = 2, kvHeads: Int? = nil
    var queryLength: Int, keyLength: Int? = nil
    var headDim = 8, valueDim: Int? = nil
    var clusters = 3
    var causal = false
    var keyLengths: [Int]? = nil
    var seed: UInt64 = 0

    var nk: Int { keyLength ?? queryLength }
    var testDescription: String {
        "B\(batch) H\(heads)/\(kvHeads ?? heads) Nq\(queryLength) Nk\(nk) D\(headDim) Dv\(valueDim ?? headDim) K\(clusters)"
            + (causal ? " causal" : "") + (keyLengths.map { " keyLengths\($0)" } ?? "")
    }

    var shape: AttentionShape {
        AttentionShape(batch: batch, heads: heads, kvHeads: kvHeads ?? heads, queryLength: queryLength,
                       keyLength: nk, headDim: headDim, valueDim: valueDim ?? headDim)
    }

    func attention() throws -> RoutingAttention {
        try RoutingAttention(heads: heads, headDim: headDim, clusters: clusters, causal: causal, seed: seed &+ 91)
    }

    func inputs() throws -> (q: Tensor, k: Tensor, v: Tensor, result: AttentionResult, dO: Tensor) {
        let (q, k, v) = try randomQKV(batch: batch, heads: heads, kvHeads: kvHeads, queryLength: queryLength,
                                      keyLength: keyLength, headDim: headDim, valueDim: valueDim, seed: seed)
        let result = try attention().attend(query: q, key: k, value: v, keyLengths: keyLengths, threads: nil)
        let dO = try randomTensor([batch, heads, queryLength, valueDim ?? headDim], seed: seed &* 7 &+ 5)
        return (q, k, v, result, dO)
    }

    /// The library's gradients against the reference; returns the largest membership count.
    @discardableResult
    func check(sourceLocation: SourceLocation = #_sourceLocation) throws -> Int {
        let attention = try attention()
        let (q, k, v, result, dO) = try inputs()
        let g = try attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                        keyLengths: keyLengths, threads: 3)
        let reference = routingReference(
            q: q.elements.map(Double.init), k: k.elements.map(Double.init), v: v.elements.map(Double.init),
            dO: dO.elements.map(Double.init), dims: GradientDims(query: q, value: v),
            routes: try attention.routes(query: q, key: k), clusters: clusters,
            scale: 1 / Double(headDim).squareRoot(), causal: causal, keyLengths: keyLengths)
        // The reference's forward is the library's forward (the routes are the same).
        checkRoutingForward(result, reference, testDescription, sourceLocation: sourceLocation)
        let (d, dv) = (headDim, valueDim ?? headDim)
        for (name, values, ref, width, zeroRows) in [
            ("dQuery", g.dQuery.elements, reference.dq, d, reference.used.map { $0 == 0 }),
            ("dKey", g.dKey.elements, reference.dk, d, reference.seen.map { !$0 }),
            ("dValue", g.dValue.elements, reference.dv, dv, reference.seen.map { !$0 }),
        ] {
            #expect(values.count == ref.count && !values.contains { $0.isNaN }, "\(testDescription): \(name)",
                    sourceLocation: sourceLocation)
            let (error, scale) = maxErrorAndMagnitude(values, ref)
            #expect(error <= 1e-4 * scale + 1e-6, "\(testDescription): \(name) error \(error), max |ref| \(scale)",
                    sourceLocation: sourceLocation)
            // Exact zeros where no pair contributes (queries in no cluster or with no visible
            // key; keys in no cluster, padded, or seen by no query).
            let nonzero = zeroRows.indices.filter { row in zeroRows[row] && (0..<width).contains { values[row * width + $0] != 0 } }
            #expect(nonzero.isEmpty, "\(testDescription): \(name) rows \(nonzero.prefix(5)) should be 0",
                    sourceLocation: sourceLocation)
        }
        return reference.used.max() ?? 0
    }
}

enum RoutingBackwardCases {
    static let all: [RoutingBackwardCase] = [
        RoutingBackwardCase(heads: 1, queryLength: 1, clusters: 1, seed: 1),
        RoutingBackwardCase(heads: 4, kvHeads: 2, queryLength: 150, keyLength: 131, clusters: 3, seed: 2),
        RoutingBackwardCase(queryLength: 70, keyLength: 90, headDim: 1, valueDim: 3, clusters: 4, causal: true, seed: 3),
        RoutingBackwardCase(queryLength: 131, keyLength: 20, headDim: 3, valueDim: 1, clusters: 5, causal: true, seed: 4),
        RoutingBackwardCase(queryLength: 65, keyLength: 64, headDim: 65, valueDim: 17, clusters: 2, seed: 5),
        RoutingBackwardCase(batch: 3, heads: 4, kvHeads: 2, queryLength: 90, keyLength: 100, headDim: 5, valueDim: 7,
                            clusters: 6, causal: true, keyLengths: [100, 0, 37], seed: 6),
        // Clusters of 150 queries and 140 keys: two query tiles and two key blocks per cluster.
        RoutingBackwardCase(batch: 2, heads: 2, kvHeads: 1, queryLength: 300, keyLength: 280, headDim: 16, clusters: 2,
                            causal: true, keyLengths: [280, 201], seed: 7),
        RoutingBackwardCase(heads: 3, queryLength: 100, keyLength: 45, headDim: 6, clusters: 7, keyLengths: [30], seed: 8),
        RoutingBackwardCase(heads: 4, kvHeads: 1, queryLength: 40, keyLength: 120, headDim: 4, valueDim: 9, clusters: 9,
                            causal: true, seed: 9),
        // More clusters than queries or keys: clusters of one query and one key, most
        // queries and keys in several clusters.
        RoutingBackwardCase(heads: 2, queryLength: 5, keyLength: 3, headDim: 3, clusters: 8, causal: true, seed: 10),
    ]
}

@Suite("Routing backward")
struct RoutingBackwardTests {
    @Test("matches the Double reference with the forward's routes", arguments: RoutingBackwardCases.all)
    func reference(_ c: RoutingBackwardCase) throws { try c.check() }

    @Test("the cases exercise queries averaged over several clusters")
    func sharedQueries() throws {
        let c = RoutingBackwardCase(heads: 4, kvHeads: 2, queryLength: 150, keyLength: 131, clusters: 3, seed: 2)
        #expect(try c.check() >= 2, "no query is in two clusters: the mean's derivative goes untested")
    }

    @Test("the Double reference agrees with central finite differences of its forward (routes fixed)",
          arguments: [false, true])
    func finiteDifferences(_ causal: Bool) throws {
        let c = RoutingBackwardCase(batch: 2, heads: 2, kvHeads: 1, queryLength: 6, keyLength: 7, headDim: 3,
                                    valueDim: 2, clusters: 3, causal: causal, keyLengths: [7, 4], seed: causal ? 901 : 900)
        let (qt, kt, vt, _, dOt) = try c.inputs()
        let attention = try c.attention()
        let routes = try attention.routes(query: qt, key: kt)
        let dims = GradientDims(query: qt, value: vt)
        let (q, k, v, dO) = (qt.elements.map(Double.init), kt.elements.map(Double.init), vt.elements.map(Double.init),
                             dOt.elements.map(Double.init))
        func run(_ q: [Double], _ k: [Double], _ v: [Double]) -> RoutingReference {
            routingReference(q: q, k: k, v: v, dO: dO, dims: dims, routes: routes, clusters: c.clusters, scale: 0.7,
                             causal: causal, keyLengths: c.keyLengths)
        }
        let analytic = run(q, k, v)
        #expect(analytic.used.max()! >= 2 && analytic.used.contains(0), "routes without shared or unrouted queries")
        let h = 1e-6
        for (which, (values, grad)) in [(q, analytic.dq), (k, analytic.dk), (v, analytic.dv)].enumerated() {
            for index in values.indices {
                func eval(_ delta: Double) -> Double {
                    var x = [q, k, v]
                    x[which][index] += delta
                    return zip(run(x[0], x[1], x[2]).output, dO).reduce(0) { $0 + $1.0 * $1.1 }
                }
                let numeric = (eval(h) - eval(-h)) / (2 * h)
                #expect(abs(numeric - grad[index]) <= 1e-6 * (1 + abs(numeric)),
                        "causal \(causal) input \(which)[\(index)]: analytic \(grad[index]), numeric \(numeric)")
            }
        }
    }

    @Test("bitwise identical gradients for 1, 2, 3 and 7 threads")
    func threadInvariance() throws {
        for causal in [false, true] {
            let c = RoutingBackwardCase(batch: 2, heads: 4, kvHeads: 2, queryLength: 300, keyLength: 270, headDim: 16,
                                        clusters: 5, causal: causal, keyLengths: [270, 91], seed: 3000)
            let attention = try c.attention()
            let (q, k, v, result, dO) = try c.inputs()
            let runs = try [1, 2, 3, 7].map {
                try attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                        keyLengths: c.keyLengths, threads: $0)
            }
            for (n, g) in runs.enumerated().dropFirst() { expectBitwiseEqualGradients(runs[0], g, "causal \(causal) run \(n)") }
        }
    }

    @Test("routes handed over by the forward: the same result, routes and gradients, bit for bit")
    func handedRoutes() throws {
        for causal in [false, true] {
            let c = RoutingBackwardCase(batch: 2, heads: 4, kvHeads: 2, queryLength: 130, keyLength: 110, headDim: 12,
                                        valueDim: 5, clusters: 4, causal: causal, keyLengths: [110, 47], seed: 5000)
            let attention = try c.attention()
            let (q, k, v, result, dO) = try c.inputs()
            let (handed, routes) = try attention.attendReturningRoutes(query: q, key: k, value: v,
                                                                       keyLengths: c.keyLengths, threads: 3)
            expectBitwiseEqual(result, handed, "causal \(causal): attendReturningRoutes' result")
            let listed = try attention.routes(query: q, key: k)
            for b in 0..<c.batch { for h in 0..<c.heads { for cluster in 0..<c.clusters {
                let n = (b * c.heads + h) * c.clusters + cluster
                #expect(routes.queries(batch: b, head: h, cluster: cluster) == listed.query[n]
                        && routes.keys(batch: b, head: h, cluster: cluster) == listed.key[n],
                        "causal \(causal): routes of (\(b), \(h), \(cluster))")
            } } }
            let recomputed = try attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                                     keyLengths: c.keyLengths, threads: 2)
            for threads in [1, 3] {
                let given = try attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                                    routes: routes, keyLengths: c.keyLengths, threads: threads)
                expectBitwiseEqualGradients(recomputed, given, "causal \(causal): gradients with routes, \(threads) threads")
            }
            // Routes of another problem throw, naming them.
            let other = RoutingBackwardCase(batch: 2, heads: 4, kvHeads: 2, queryLength: 129, keyLength: 110, headDim: 12,
                                            valueDim: 5, clusters: 4, causal: causal, seed: 5001)
            let (q2, k2, v2, _, _) = try other.inputs()
            let foreign = try other.attention().attendReturningRoutes(query: q2, key: k2, value: v2).routes
            expectAttentionError(.shapeMismatch, mentioning: ["routes"]) {
                try attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                        routes: foreign, keyLengths: c.keyLengths)
            }
        }
    }

    @Test("the view entry point (strided NaN-padded views, a caller's workspace) equals the Tensor convenience")
    func viewEntryPoint() throws {
        let c = RoutingBackwardCase(batch: 2, heads: 4, kvHeads: 2, queryLength: 150, keyLength: 170, headDim: 12,
                                    valueDim: 6, clusters: 4, causal: true, keyLengths: [170, 61], seed: 4000)
        let (q, k, v, result, dO) = try c.inputs()
        try expectViewEntryPointMatchesTensors(try c.attention(), shape: c.shape, query: q, key: k, value: v,
                                               result: result, outputGradient: dO, keyLengths: c.keyLengths,
                                               c.testDescription)
    }

    @Test("backward cost: 3.5 × the attention FLOPs plus the routing, workspace O(N)")
    func cost() throws {
        let attention = try RoutingAttention(heads: 8, headDim: 64, clusters: 16)
        let shape = AttentionShape(heads: 8, queryLength: 2048, headDim: 64)
        let forward = try attention.cost(shape, threads: 2), backward = try attention.backwardCost(shape, threads: 2)
        let routing = 8 * 2 * Double(2 * 2048) * Double(16 * 64)
        #expect(abs(backward.flops - (3.5 * (forward.flops - routing) + routing)) <= 1e-9 * backward.flops)
        #expect(backward.scoredPairs == forward.scoredPairs)
        let longer = try RoutingAttention(heads: 8, headDim: 64, clusters: 32)
        let double = try longer.backwardCost(AttentionShape(heads: 8, queryLength: 4096, headDim: 64), threads: 2)
        #expect(double.workspaceBytes < 3 * backward.workspaceBytes, "\(double.workspaceBytes) vs \(backward.workspaceBytes)")
    }

    @Test("misshapen output, logSumExp or outputGradient, bad threads or centroids throw, naming them")
    func badInputs() throws {
        let c = RoutingBackwardCase(queryLength: 9, headDim: 4, clusters: 2, seed: 11)
        let attention = try c.attention()
        let (q, k, v, result, dO) = try c.inputs()
        expectMisshapenGradientInputsThrow(attention, query: q, key: k, value: v, result: result, outputGradient: dO,
                                           wrong: try Tensor(shape: [1, 2, 8, 4]))
        expectAttentionError(.invalidParameter, mentioning: ["threads"]) {
            try attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO, threads: 0)
        }
        expectAttentionError(.shapeMismatch, mentioning: ["centroids"]) {
            try RoutingAttention(heads: 3, headDim: 4, clusters: 2)
                .gradients(query: q, key: k, value: v, result: result, outputGradient: dO)
        }
        expectAttentionError(.invalidParameter, mentioning: ["keyLengths"]) {
            try attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO, keyLengths: [10])
        }
        expectAttentionError(.invalidParameter, mentioning: ["workspace"]) {
            try viewPathGradients(attention, shape: c.shape, q: q, k: k, v: v, result: result, dO: dO, keyLengths: nil,
                                  workspaceShort: true)
        }
    }

    @Test("a small gradient step on Q, K, V lowers L = ½‖O − T‖² by what the gradients predict (routes unchanged)")
    func gradientStep() throws {
        for causal in [false, true] {
            let c = RoutingBackwardCase(batch: 2, heads: 4, kvHeads: 2, queryLength: 90, keyLength: 70, headDim: 24,
                                        valueDim: 20, clusters: 3, causal: causal, keyLengths: [70, 33], seed: 1000)
            let attention = try c.attention()
            let (q, k, v, result, _) = try c.inputs()
            let target = try randomTensor(result.output.shape, seed: 1001)
            func loss(_ o: Tensor) -> Double {
                zip(o.elements, target.elements).reduce(0) { $0 + 0.5 * Double($1.0 - $1.1) * Double($1.0 - $1.1) }
            }
            let dO = try Tensor(shape: target.shape, data: zip(result.output.elements, target.elements).map { $0 - $1 })
            let g = try attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                            keyLengths: c.keyLengths, threads: 2)
            let eta: Float = 1e-3
            func step(_ x: Tensor, _ dx: Tensor) throws -> Tensor {
                try Tensor(shape: x.shape, data: zip(x.elements, dx.elements).map { $0 - eta * $1 })
            }
            let (q1, k1, v1) = (try step(q, g.dQuery), try step(k, g.dKey), try step(v, g.dValue))
            let before = try attention.routes(query: q, key: k), after = try attention.routes(query: q1, key: k1)
            #expect(before.query == after.query && before.key == after.key, "causal \(causal): the step moved the routes")
            let stepped = try attention.attend(query: q1, key: k1, value: v1, keyLengths: c.keyLengths, threads: 2)
            let squaredNorm = [g.dQuery, g.dKey, g.dValue].reduce(0.0) { sum, t in
                t.elements.reduce(sum) { $0 + Double($1) * Double($1) }
            }
            let lossBefore = loss(result.output), decrease = lossBefore - loss(stepped.output)
            let predicted = Double(eta) * squaredNorm
            #expect(decrease > 0, "causal \(causal): the loss rose from \(lossBefore) by \(-decrease)")
            #expect(abs(decrease - predicted) < 0.05 * predicted,
                    "causal \(causal): decrease \(decrease), first-order prediction \(predicted), loss \(lossBefore)")
        }
    }
}
