// RoutingAttention against a Double reference that recomputes the balanced top-w routing
// naively from the same centroids and applies the spec's rules (attention within each
// cluster, causal on original positions, the mean over memberships, unchosen queries 0);
// one cluster equals dense attention; the centroid update moves toward the data; errors
// and determinism.

@_spi(Testing) @_spi(Benchmarking) import EfficientAttention
import Foundation
import Testing

struct RoutingCase: Sendable, CustomTestStringConvertible {
    var batch = 1
    var heads = 2
    var kvHeads: Int? = nil
    var queryLength: Int
    var keyLength: Int? = nil
    var headDim = 16
    var valueDim: Int? = nil
    var clusters = 3
    var causal = false
    var keyLengths: [Int]? = nil
    var seed: UInt64 = 0

    var testDescription: String {
        var s = "B\(batch) H\(heads)/\(kvHeads ?? heads) Nq\(queryLength) Nk\(keyLength ?? queryLength) D\(headDim) Dv\(valueDim ?? headDim) K\(clusters)"
        if causal { s += " causal" }
        if let keyLengths { s += " keyLengths\(keyLengths)" }
        return s
    }

    func attention() throws -> RoutingAttention {
        try RoutingAttention(heads: heads, headDim: headDim, clusters: clusters, causal: causal, seed: seed &+ 7)
    }

    func inputs() throws -> (q: Tensor, k: Tensor, v: Tensor) {
        try randomQKV(batch: batch, heads: heads, kvHeads: kvHeads, queryLength: queryLength, keyLength: keyLength,
                      headDim: headDim, valueDim: valueDim, seed: seed)
    }
}

/// Naive Double routing scores of the normalised rows of head `head` of `x` against centroid `c` of head `h`.
func routingScores(_ x: Tensor, b: Int, head: Int, centroids: Tensor, h: Int, c: Int) -> [Double] {
    let (n, d) = (x.shape[2], x.shape[3])
    return (0..<n).map { i in
        let row = (0..<d).map { Double(x[b, head, i, $0]) }
        let norm = row.reduce(0) { $0 + $1 * $1 }.squareRoot()
        guard norm > 0 else { return 0 }
        return (0..<d).reduce(0.0) { $0 + row[$1] / norm * Double(centroids[0, h, c, $1]) }
    }
}

/// The library's routes, checked against the naive balanced top-w in Double (differences
/// only at near-ties).
func checkedRoutes(_ routing: RoutingAttention, q: Tensor, k: Tensor,
                   sourceLocation: SourceLocation = #_sourceLocation) throws -> (query: [[Int]], key: [[Int]]) {
    let shape = try AttentionShape(query: q, key: k, value: k)
    let (nb, nh, nq, nk, kc) = (shape.batch, shape.heads, shape.queryLength, shape.keyLength, routing.clusterCount)
    let routes = try routing.routes(query: q, key: k)
    for b in 0..<nb { for h in 0..<nh { for c in 0..<kc {
        let index = (b * nh + h) * kc + c
        for (x, head, n, chosen) in [(q, h, nq, routes.query[index]), (k, h / shape.groupSize, nk, routes.key[index])] {
            let w = (n + kc - 1) / kc
            let scores = routingScores(x, b: b, head: head, centroids: routing.centroids, h: h, c: c)
            let naive = Set((0..<n).sorted { (-scores[$0], $0) < (-scores[$1], $1) }.prefix(w))
            let boundary = naive.map { scores[$0] }.min()!
            let bad = Set(chosen).symmetricDifference(naive).filter { abs(scores[$0] - boundary) > 1e-5 }
            #expect(chosen.count == w && bad.isEmpty && chosen == chosen.sorted(),
                    "routing b\(b) h\(h) cluster \(c): \(chosen.count) members (expected \(w)), \(bad.count) differ from the naive top-w",
                    sourceLocation: sourceLocation)
        }
    } } }
    return routes
}

/// Checks the library's routes against the naive balanced top-w (differences only at
/// near-ties) and returns the reference and naive results built from the library's routes.
func routingReferences(_ routing: RoutingAttention, q: Tensor, k: Tensor, v: Tensor, keyLengths: [Int]?,
                       sourceLocation: SourceLocation = #_sourceLocation) throws
    -> (reference: ReferenceResult<Double>, naive: ReferenceResult<Float>) {
    let shape = try AttentionShape(query: q, key: k, value: v)
    let (nb, nh, nq, nk, kc) = (shape.batch, shape.heads, shape.queryLength, shape.keyLength, routing.clusterCount)
    let routes = try checkedRoutes(routing, q: q, k: k, sourceLocation: sourceLocation)
    var table = VisibilityTable(rounds: kc, batch: nb, heads: nh, queryLength: nq, keyLength: nk)
    var member = [Bool](repeating: false, count: kc * nb * nh * nq)
    for b in 0..<nb { for h in 0..<nh { for c in 0..<kc {
        let index = (b * nh + h) * kc + c
        let keys = Set(routes.key[index])
        for i in routes.query[index] {
            member[((c * nb + b) * nh + h) * nq + i] = true
            for j in keys where j < (keyLengths?[b] ?? nk) && (!routing.causal || j <= i + nk - nq) {
                table[c, b, h, i, j] = true
            }
        }
    } } }
    let scale = routing.scale ?? 1 / Float(shape.headDim).squareRoot()
    let rowsPerPart = nb * nh * nq
    let isMember: (Int, Int) -> Bool = { c, row in member[c * rowsPerPart + row] }
    return groupedReferences(query: q, key: k, value: v, scale: scale, table: table,
                             combineDouble: { mergeByMean($0, member: isMember, exp: Foundation.exp, log: Foundation.log) },
                             combineFloat: { mergeByMean($0, member: isMember, exp: expf, log: logf) })
}

enum RoutingCases {
    static let reference: [RoutingCase] = [
        RoutingCase(queryLength: 1, clusters: 1),
        RoutingCase(queryLength: 2, clusters: 3, causal: true),
        RoutingCase(queryLength: 17, clusters: 4),
        RoutingCase(queryLength: 17, clusters: 4, causal: true),
        RoutingCase(heads: 4, kvHeads: 2, queryLength: 100, headDim: 3, clusters: 5),
        RoutingCase(queryLength: 100, headDim: 1, clusters: 7, causal: true),
        RoutingCase(queryLength: 77, headDim: 64, valueDim: 65, clusters: 4, causal: true),
        RoutingCase(heads: 1, queryLength: 130, headDim: 65, valueDim: 3, clusters: 2),
        RoutingCase(heads: 1, queryLength: 150, headDim: 128, clusters: 3, causal: true),
        RoutingCase(queryLength: 40, keyLength: 90, clusters: 4),
        RoutingCase(queryLength: 90, keyLength: 40, clusters: 4, causal: true),
        RoutingCase(heads: 4, kvHeads: 1, queryLength: 61, keyLength: 70, clusters: 9, causal: true),
        RoutingCase(batch: 3, queryLength: 40, clusters: 3, keyLengths: [40, 0, 13]),
        RoutingCase(batch: 2, queryLength: 40, clusters: 3, causal: true, keyLengths: [1, 33]),
        RoutingCase(queryLength: 300, headDim: 32, clusters: 2),
        RoutingCase(queryLength: 12, clusters: 20),
        // Several blocks of clusters (about 1024 query slots each).
        RoutingCase(heads: 1, queryLength: 1100, keyLength: 900, headDim: 8, clusters: 3, causal: true),
        RoutingCase(heads: 1, queryLength: 1500, headDim: 6, clusters: 40, keyLengths: [1400]),
    ].enumerated().map { n, c in var c = c; c.seed = 70 + UInt64(n); return c }
}

@Suite("RoutingAttention")
struct RoutingAttentionTests {
    @Test("matches the reference recomputed from the same centroids", arguments: RoutingCases.reference)
    func reference(_ c: RoutingCase) throws {
        let (q, k, v) = try c.inputs()
        let routing = try c.attention()
        let (reference, naive) = try routingReferences(routing, q: q, k: k, v: v, keyLengths: c.keyLengths)
        for threads in [1, 2] {
            let result = try routing.attend(query: q, key: k, value: v, keyLengths: c.keyLengths, threads: threads)
            checkAttention(result, reference: reference, naive: naive, "routing \(c.testDescription) threads \(threads)")
        }
    }

    @Test("long sequences route like the naive top-w (sampled thresholds), ties by position")
    func longRoutes() throws {
        // 3000 queries, a third of them repeated rows (exact ties); 6 clusters of 500.
        var (q, k, _) = try randomQKV(heads: 1, queryLength: 3000, keyLength: 2500, headDim: 8, seed: 21)
        for i in stride(from: 0, to: 3000, by: 3) { for c in 0..<8 { q[0, 0, i, c] = q[0, 0, 0, c] } }
        let routing = try RoutingAttention(heads: 1, headDim: 8, clusters: 6, seed: 8)
        let routes = try checkedRoutes(routing, q: q, k: k)
        // The repeated row's copies are chosen (or not) together, smallest positions first.
        for members in routes.query {
            let copies = members.filter { $0 % 3 == 0 }
            #expect(copies.isEmpty || copies == Array(stride(from: 0, to: 3 * copies.count, by: 3)),
                    "tied rows must be taken in position order: \(copies.prefix(5))...")
        }
    }

    @Test("thresholds from an unrepresentative sample fall back to the exact top-w")
    func thresholdFallbacks() throws {
        // 4096 queries, 8 clusters of 512, centroid c = e_c; thresholds come from every 8th position.
        let (n, d) = (4096, 8)
        var (q, k, _) = try randomQKV(heads: 1, queryLength: n, headDim: d, seed: 5)
        var centroids = try Tensor(shape: [1, 1, 8, d])
        for c in 0..<8 { centroids[0, 0, c, c] = 1 }
        for i in 0..<n {
            if i % 16 == 0 {
                // Cluster 0: half of the sample scores 1, so its threshold (1) passes only these
                // 256 positions: too few candidates.
                for t in 0..<d { q[0, 0, i, t] = t == 0 ? 1 : 0 }
            } else if i >= 1000 {
                // Cluster 1: about 2900 equal rows pass its threshold: a full candidate list.
                for t in 0..<d { q[0, 0, i, t] = t == 1 ? 0.8 : (t == 2 ? 0.6 : 0) }
            }
        }
        let routing = try RoutingAttention(centroids: centroids)
        let routes = try checkedRoutes(routing, q: q, k: k)
        #expect(Set(stride(from: 0, to: n, by: 16)).isSubset(of: routes.query[0]) && routes.query[0].count == 512,
                "cluster 0 must hold the 256 rows scoring 1 and 256 more")
        // Cluster 1 takes the first 512 of the equal rows (ties by position) after any higher scores.
        let ties = routes.query[1].filter { $0 >= 1000 && $0 % 16 != 0 }
        #expect(!ties.isEmpty && ties == Array((1000..<n).filter { $0 % 16 != 0 }.prefix(ties.count)),
                "tied rows must be taken in position order: \(ties.prefix(5))...")
    }

    @Test("one cluster is dense attention")
    func oneClusterIsDense() throws {
        for (nq, nk, causal) in [(45, 45, false), (45, 45, true), (130, 70, true), (20, 130, false)] {
            let c = DenseCase(heads: 2, kvHeads: 1, queryLength: nq, keyLength: nk, headDim: 24, causal: causal,
                              seed: UInt64(nq + nk))
            try c.check(RoutingAttention(heads: 2, headDim: 24, clusters: 1, causal: causal))
        }
    }

    @Test("the centroid update moves centroids toward the data")
    func centroidUpdate() throws {
        // Two clusters of data around e0 and e1; centroids start 60 degrees away from them.
        let d = 4, n = 50
        var rng = SeededGenerator(seed: 3)
        var data = [Float]()
        for i in 0..<n {
            var x = (0..<d).map { _ in 0.05 * Float(rng.nextGaussian()) }
            x[i % 2] += 1
            data += x
        }
        let x = try Tensor(shape: [1, 1, n, d], data: data)
        let start: [Float] = [0.5, 0, 0.866, 0, 0, 0.5, 0, 0.866]
        var routing = try RoutingAttention(centroids: Tensor(shape: [1, 1, 2, d], data: start), decay: 0.5)
        func cosines(_ r: RoutingAttention) -> [Float] {
            (0..<2).map { c in
                let v = (0..<d).map { r.centroids[0, 0, c, $0] }
                return v[c] / v.reduce(0) { $0 + $1 * $1 }.squareRoot()
            }
        }
        let before = cosines(routing)
        try routing.updateCentroids(query: x, key: x)
        let once = cosines(routing)
        try routing.updateCentroids(query: x, key: x)
        let twice = cosines(routing)
        #expect(once[0] > before[0] + 0.1 && once[1] > before[1] + 0.1 && twice[0] > once[0] && twice[1] > once[1],
                "cosine to the data's direction should grow: \(before) -> \(once) -> \(twice)")
        let norms = (0..<2).map { c in (0..<d).map { routing.centroids[0, 0, c, $0] }.reduce(0) { $0 + $1 * $1 } }
        #expect(norms.allSatisfy { abs($0 - 1) < 1e-5 }, "updated centroids are unit length: \(norms)")
        // The updated centroids still route and attend (and a decay of 0.999 barely moves them).
        let (q, k, v) = try randomQKV(heads: 1, queryLength: 30, headDim: d, seed: 4)
        let (reference, naive) = try routingReferences(routing, q: q, k: k, v: v, keyLengths: nil)
        checkAttention(try routing.attend(query: q, key: k, value: v), reference: reference, naive: naive, "after update")
    }

    /// The k-means step (Kernels/SphericalKMeans.swift) against a Double reference: every
    /// normalised query and key of every batch item (keys of head `h / (H / Hkv)`) joins
    /// the centroid of largest dot product, centroids with members move to
    /// `decay · c + (1 − decay) · mean`, rescaled; zero rows join none; a centroid no row
    /// is nearest to stays bit for bit.
    @Test("the centroid update equals a Double k-means step (GQA heads, zero rows, empty clusters)")
    func centroidUpdateReference() throws {
        let (batch, heads, kvHeads, nq, nk, d, k) = (2, 4, 2, 13, 9, 5, 3)
        let decay: Float = 0.75
        // Rows in the positive orthant; centroid 2 points away from all of them.
        var q = try Tensor.random(shape: [batch, heads, nq, d], seed: 21, in: 0.1...1)
        let key = try Tensor.random(shape: [batch, kvHeads, nk, d], seed: 22, in: 0.1...1)
        for c in 0..<d { q[1, 2, 4, c] = 0 }                                   // a zero row
        var start = try Tensor.random(shape: [1, heads, k, d], seed: 23, in: 0...1)
        for h in 0..<heads { for c in 0..<d { start[0, h, 2, c] = -1 } }
        var routing = try RoutingAttention(centroids: start, decay: decay)
        try routing.updateCentroids(query: q, key: key)
        for h in 0..<heads {
            let centre = (0..<k).map { c in (0..<d).map { Double(start[0, h, c, $0]) } }
            var sums = [[Double]](repeating: [Double](repeating: 0, count: d), count: k), counts = [Int](repeating: 0, count: k)
            for (tensor, head, n) in [(q, h, nq), (key, h / (heads / kvHeads), nk)] {
                for b in 0..<batch { for i in 0..<n {
                    let x = (0..<d).map { Double(tensor[b, head, i, $0]) }
                    let norm = x.reduce(0) { $0 + $1 * $1 }.squareRoot()
                    guard norm > 0 else { continue }
                    let scores = centre.map { c in zip(c, x).reduce(0) { $0 + $1.0 * $1.1 } }
                    let best = scores.indices.max { scores[$0] < scores[$1] || (scores[$0] == scores[$1] && $0 > $1) }!
                    counts[best] += 1
                    for t in 0..<d { sums[best][t] += x[t] / norm }
                } }
            }
            #expect(counts[2] == 0 && counts[0] + counts[1] == batch * (nq + nk) - (h == 2 ? 1 : 0), "head \(h): \(counts)")
            for c in 0..<k {
                let got = (0..<d).map { routing.centroids[0, h, c, $0] }
                guard counts[c] > 0 else {
                    #expect(got == (0..<d).map { start[0, h, c, $0] }, "head \(h) cluster \(c) has no member: unchanged")
                    continue
                }
                let moved = (0..<d).map { Double(decay) * centre[c][$0] + Double(1 - decay) * sums[c][$0] / Double(counts[c]) }
                let norm = moved.reduce(0) { $0 + $1 * $1 }.squareRoot()
                let error = (0..<d).map { abs(Double(got[$0]) - moved[$0] / norm) }.max()!
                #expect(error < 1e-6, "head \(h) cluster \(c): \(got) vs \(moved.map { $0 / norm }), error \(error)")
            }
        }
    }

    @Test("bitwise identical across thread counts; explicit centroids equal seeded ones")
    func determinism() throws {
        let (q, k, v) = try randomQKV(batch: 2, heads: 3, queryLength: 333, keyLength: 301, headDim: 40, seed: 3)
        let routing = try RoutingAttention(heads: 3, headDim: 40, clusters: 5, causal: true, seed: 17)
        let one = try routing.attend(query: q, key: k, value: v, threads: 1)
        expectBitwiseEqual(one, try routing.attend(query: q, key: k, value: v, threads: 2), "routing threads 1 vs 2")
        // One head: the threads share its blocks instead of taking heads.
        let (q1, k1, v1) = try randomQKV(batch: 1, heads: 1, queryLength: 1500, keyLength: 1500, headDim: 16, seed: 4)
        let single = try RoutingAttention(heads: 1, headDim: 16, clusters: 20, seed: 5)
        expectBitwiseEqual(try single.attend(query: q1, key: k1, value: v1, threads: 1),
                           try single.attend(query: q1, key: k1, value: v1, threads: 2), "routing one head, threads 1 vs 2")
        let explicit = try RoutingAttention(centroids: routing.centroids, causal: true)
        expectBitwiseEqual(one, try explicit.attend(query: q, key: k, value: v, threads: 2), "explicit centroids")
    }

    @Test("strided inputs with NaN padding never leak NaN")
    func nanPadding() throws {
        let c = RoutingCase(heads: 2, queryLength: 70, keyLength: 50, headDim: 12, clusters: 4, causal: true, seed: 9)
        let (q, k, v) = try c.inputs()
        let routing = try c.attention()
        let result = try routing.attend(query: try embeddedInNaN(q, innerStride: 2), key: try embeddedInNaN(k),
                                        value: try embeddedInNaN(v, innerStride: 3))
        let (reference, naive) = try routingReferences(routing, q: q, k: k, v: v, keyLengths: nil)
        checkAttention(result, reference: reference, naive: naive, "routing NaN-padded")
    }

    @Test("bad configurations throw clear errors")
    func errors() throws {
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 64, headDim: 8, seed: 1)
        expectAttentionError(.shapeMismatch, mentioning: ["centroids", "[1, 3, 4, 8]", "[1, 2, K, 8]"]) {
            try RoutingAttention(heads: 3, headDim: 8, clusters: 4).attend(query: q, key: k, value: v)
        }
        expectAttentionError(.shapeMismatch, mentioning: ["centroids", "[1, 2, 4, 5]"]) {
            try RoutingAttention(heads: 2, headDim: 5, clusters: 4).attend(query: q, key: k, value: v)
        }
        expectAttentionError(.shapeMismatch, mentioning: ["centroids", "[2, 2, 4, 8]"]) {
            try RoutingAttention(centroids: Tensor(shape: [2, 2, 4, 8], repeating: 1))
        }
        var nan = try Tensor(shape: [1, 2, 4, 8], repeating: 1)
        nan[0, 1, 2, 3] = .nan
        expectAttentionError(.invalidParameter, mentioning: ["centroids", "NaN"]) {
            try RoutingAttention(centroids: nan)
        }
        expectAttentionError(.invalidParameter, mentioning: ["clusters", "0"]) {
            try RoutingAttention(heads: 2, headDim: 8, clusters: 0)
        }
        expectAttentionError(.invalidParameter, mentioning: ["decay", "1.5"]) {
            var routing = try RoutingAttention(heads: 2, headDim: 8, clusters: 2, decay: 1.5)
            try routing.updateCentroids(query: q, key: k)
        }
        expectAttentionError(.invalidParameter, mentioning: ["keyLengths"]) {
            try RoutingAttention(heads: 2, headDim: 8, clusters: 2).attend(query: q, key: k, value: v, keyLengths: [65])
        }
    }

    @Test("cost: pairs within clusters, O(N) workspace per head")
    func cost() throws {
        let shape4 = AttentionShape(heads: 8, queryLength: 4096, headDim: 64)
        let shape8 = AttentionShape(heads: 8, queryLength: 8192, headDim: 64)
        let small = try RoutingAttention(heads: 8, headDim: 64, clusters: 32).cost(shape4, threads: 2)
        let large = try RoutingAttention(heads: 8, headDim: 64, clusters: 64).cost(shape8, threads: 2)
        #expect(small.scoredPairs == 8 * 4096 * 128 && large.scoredPairs == 2 * small.scoredPairs)
        #expect(Double(large.workspaceBytes) < 2.2 * Double(small.workspaceBytes),
                "workspace \(small.workspaceBytes) -> \(large.workspaceBytes) should grow linearly")
    }
}
