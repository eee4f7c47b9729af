// LSHAttention against a Double reference that recomputes the buckets naively from the
// same rotations and applies the spec's rules (sorted chunks with look-back and wrap,
// bucket equality, causal on original positions, the shared-QK self rule, rounds merged
// by log-sum-exp); special cases (one bucket equals dense with the self rule, more rounds
// approximate exact attention better), errors and determinism.

@_spi(Testing) @_spi(Benchmarking) import EfficientAttention
import Foundation
import Testing

struct LSHCase: Sendable, CustomTestStringConvertible {
    var batch = 1
    var heads = 2
    var kvHeads: Int? = nil
    var length: Int
    var headDim = 16
    var valueDim: Int? = nil
    var bucketSize = 8
    var hashes = 2
    var bucketCount: Int? = nil
    var factors: [Int]? = nil
    var sharedQK = true
    var across = false
    var causal = false
    var keyLengths: [Int]? = nil
    var seed: UInt64 = 0

    var testDescription: String {
        var s = "B\(batch) H\(heads)/\(kvHeads ?? heads) N\(length) D\(headDim) Dv\(valueDim ?? headDim) bs\(bucketSize) x\(hashes)"
        if let bucketCount { s += " nb\(bucketCount)" }
        if let factors { s += " factors\(factors)" }
        if !sharedQK { s += " separate-keys" }
        if across { s += " across" }
        if causal { s += " causal" }
        if let keyLengths { s += " keyLengths\(keyLengths)" }
        return s
    }

    var attention: LSHAttention {
        LSHAttention(bucketSize: bucketSize, hashes: hashes, bucketCount: bucketCount, sharedQK: sharedQK,
                     attendAcrossBuckets: across, causal: causal, seed: seed &+ 99, bucketFactors: factors)
    }

    func inputs() throws -> (q: Tensor, k: Tensor, v: Tensor) {
        try randomQKV(batch: batch, heads: heads, kvHeads: kvHeads, queryLength: length,
                      headDim: headDim, valueDim: valueDim, seed: seed)
    }
}

/// Naive Double buckets `[B][H][hashes][N]` of `vectors` (head `h / group` of a tensor with
/// fewer heads) with `rotations` `[H, hashes, D, columns]`, and each one's margin (the gap
/// to the best other bucket, the smallest over the factors), to tell real disagreements
/// from near-ties. `factors` (default `[2 · columns]`) is the factorised rule of trax and
/// Hugging Face: factor `i` takes the next `n_i / 2` columns, `b_i = argmax([p ; −p])`,
/// bucket `b_0 + n_0 · b_1 + n_0 · n_1 · b_2 + ...`.
func naiveBuckets(_ vectors: Tensor, heads: Int, rotations: Tensor, factors: [Int]? = nil)
    -> (buckets: [Int], margins: [Double]) {
    let (nb, hv, n, d) = (vectors.shape[0], vectors.shape[1], vectors.shape[2], vectors.shape[3])
    let (hashes, columns) = (rotations.shape[1], rotations.shape[3])
    let factors = factors ?? [2 * columns]
    var buckets = [Int](), margins = [Double]()
    for b in 0..<nb { for h in 0..<heads { for r in 0..<hashes { for i in 0..<n {
        let rotated = (0..<columns).map { c in
            (0..<d).reduce(0.0) { $0 + Double(vectors[b, h / (heads / hv), i, $1]) * Double(rotations[h, r, $1, c]) }
        }
        var bucket = 0, weight = 1, offset = 0, margin = Double.infinity
        for factor in factors {
            let part = rotated[offset..<offset + factor / 2]
            let projections = Array(part) + part.map { -$0 }
            let best = projections.indices.max { projections[$0] < projections[$1] || (projections[$0] == projections[$1] && $0 > $1) }!
            let second = projections.indices.filter { $0 != best }.map { projections[$0] }.max() ?? -.infinity
            bucket += weight * best
            margin = min(margin, projections[best] - second)
            weight *= factor
            offset += factor / 2
        }
        buckets.append(bucket)
        margins.append(margin)
    } } } }
    return (buckets, margins)
}

/// Checks the library's buckets against the naive ones (disagreements only at near-ties)
/// and returns the reference and naive results built from the library's buckets.
func lshReferences(_ lsh: LSHAttention, q: Tensor, k: Tensor, v: Tensor, keyLengths: [Int]?,
                   sourceLocation: SourceLocation = #_sourceLocation) throws
    -> (reference: ReferenceResult<Double>, naive: ReferenceResult<Float>) {
    let shape = try AttentionShape(query: q, key: k, value: v)
    let (nh, n) = (shape.heads, shape.queryLength)
    let rotations = try lsh.rotations(for: shape)
    let library = try lsh.bucketIDs(query: q, key: k)
    for (vectors, ids) in [(q, library.query)] + (lsh.sharedQK ? [] : [(k, library.key)]) {
        let naive = naiveBuckets(vectors, heads: nh, rotations: rotations, factors: lsh.factors(forLength: n))
        let bad = ids.indices.filter { ids[$0] != naive.buckets[$0] && naive.margins[$0] > 1e-4 }
        #expect(bad.isEmpty, "LSH buckets differ from the naive Double hash at \(bad.count) places, e.g. \(bad.prefix(3))",
                sourceLocation: sourceLocation)
    }
    let keys = lsh.sharedQK ? try unitRows(q) : k
    // Shared keys have one head per query head: repeat grouped value heads to match.
    let values = lsh.sharedQK ? try repeatedHeads(v, to: nh) : v
    let table = try lshVisibility(lsh, q: q, k: k, library: library, keyLengths: keyLengths)
    let scale = lsh.scale ?? 1 / Float(shape.headDim).squareRoot()
    return groupedReferences(query: q, key: keys, value: values, scale: scale, table: table,
                             combineDouble: { mergeByLogSumExp($0, exp: Foundation.exp, log: Foundation.log) },
                             combineFloat: { mergeByLogSumExp($0, exp: expf, log: logf) })
}

/// The forward's visible pairs per round from the library's buckets (`library`: its
/// ``LSHAttention/bucketIDs(query:key:)``, computed when `nil`): sorted chunks with look-back
/// and wrap, bucket equality, causal, key padding, and the shared-QK self rule (a query with
/// no other visible key sees itself in every round).
func lshVisibility(_ lsh: LSHAttention, q: Tensor, k: Tensor, library: (query: [Int], key: [Int])? = nil,
                   keyLengths: [Int]?) throws -> VisibilityTable {
    let (nb, nh, n) = (q.shape[0], q.shape[1], q.shape[2])
    let library = try library ?? lsh.bucketIDs(query: q, key: k)
    var table = VisibilityTable(rounds: lsh.hashes, batch: nb, heads: nh, queryLength: n, keyLength: n)
    let chunk = lsh.bucketSize, chunks = (n + chunk - 1) / chunk
    for b in 0..<nb { for h in 0..<nh {
        var seesOther = [Bool](repeating: false, count: n)
        for r in 0..<lsh.hashes {
            let base = ((b * nh + h) * lsh.hashes + r) * n
            let qb = Array(library.query[base..<base + n]), kb = Array(library.key[base..<base + n])
            func chunkOf(_ buckets: [Int]) -> [Int] {
                let order = (0..<n).sorted { (buckets[$0], $0) < (buckets[$1], $1) }
                var chunkOf = [Int](repeating: 0, count: n)
                for (rank, i) in order.enumerated() { chunkOf[i] = rank / chunk }
                return chunkOf
            }
            let qc = chunkOf(qb), kc = chunkOf(kb)
            for i in 0..<n { for j in 0..<n {
                let near = kc[j] == qc[i] || kc[j] == (qc[i] + chunks - 1) % chunks
                let visible = near && (lsh.attendAcrossBuckets || qb[i] == kb[j])
                    && (!lsh.causal || j <= i) && j < (keyLengths?[b] ?? n)
                    && !(lsh.sharedQK && i == j)
                table[r, b, h, i, j] = visible
                if visible { seesOther[i] = true }
            } }
        }
        if lsh.sharedQK {
            for i in 0..<n where !seesOther[i] && i < (keyLengths?[b] ?? n) {
                for r in 0..<lsh.hashes { table[r, b, h, i, i] = true }
            }
        }
    } }
    return table
}

enum LSHCases {
    static let reference: [LSHCase] = [
        LSHCase(length: 1),
        LSHCase(length: 2, causal: true),
        LSHCase(length: 17, bucketSize: 4),
        LSHCase(length: 17, bucketSize: 4, causal: true),
        LSHCase(heads: 4, kvHeads: 2, length: 100, headDim: 3, bucketSize: 16, hashes: 3),
        LSHCase(length: 100, headDim: 1, bucketSize: 16, causal: true),
        LSHCase(length: 77, headDim: 64, valueDim: 65, bucketSize: 8, hashes: 4, causal: true),
        LSHCase(heads: 1, length: 130, headDim: 65, valueDim: 3, bucketSize: 64, hashes: 1),
        LSHCase(heads: 1, length: 150, headDim: 128, bucketSize: 32, hashes: 2, bucketCount: 4, causal: true),
        LSHCase(length: 90, bucketSize: 10, hashes: 2, sharedQK: false),
        LSHCase(heads: 4, kvHeads: 1, length: 61, bucketSize: 8, hashes: 3, sharedQK: false, causal: true),
        LSHCase(length: 50, bucketSize: 8, across: true),
        LSHCase(length: 50, bucketSize: 8, across: true, causal: true),
        LSHCase(batch: 3, length: 40, bucketSize: 8, keyLengths: [40, 0, 13]),
        LSHCase(batch: 2, length: 40, bucketSize: 8, sharedQK: false, causal: true, keyLengths: [1, 33]),
        LSHCase(length: 300, headDim: 32, bucketSize: 64, hashes: 4),
        // Several blocks of 256 chunks: the first block's look-back is the short last chunk.
        LSHCase(heads: 1, length: 1101, headDim: 8, bucketSize: 4, hashes: 2, bucketCount: 8, causal: true),
        LSHCase(heads: 1, length: 2050, headDim: 5, bucketSize: 4, hashes: 1, bucketCount: 6, sharedQK: false),
        // One query tile spans every chunk: the first chunk's look-back is listed once.
        LSHCase(length: 17, bucketSize: 4, across: true),
        LSHCase(length: 30, bucketSize: 8, hashes: 3, sharedQK: false, across: true),
    ].enumerated().map { n, c in var c = c; c.seed = 40 + UInt64(n); return c }

    /// Factorised hashing (`bucketFactors`), 2 and 3 factors.
    static let factorised: [LSHCase] = [
        LSHCase(length: 77, bucketSize: 8, factors: [2, 4]),
        LSHCase(length: 101, headDim: 3, bucketSize: 8, hashes: 3, factors: [4, 2, 6], causal: true),
        LSHCase(length: 90, bucketSize: 10, factors: [6, 4], sharedQK: false),
        LSHCase(heads: 4, kvHeads: 2, length: 61, bucketSize: 8, hashes: 3, factors: [2, 2, 4], sharedQK: false, causal: true),
        LSHCase(heads: 1, length: 300, headDim: 65, bucketSize: 16, bucketCount: 16, factors: [4, 4]),
        LSHCase(heads: 1, length: 1101, headDim: 8, bucketSize: 4, hashes: 2, factors: [8, 36], causal: true),
    ].enumerated().map { n, c in var c = c; c.seed = 80 + UInt64(n); return c }
}

@Suite("LSHAttention")
struct LSHAttentionTests {
    @Test("matches the reference recomputed from the same rotations", arguments: LSHCases.reference)
    func reference(_ c: LSHCase) throws {
        let (q, k, v) = try c.inputs()
        for threads in [1, 2] {
            let result = try c.attention.attend(query: q, key: k, value: v, keyLengths: c.keyLengths, threads: threads)
            let (reference, naive) = try lshReferences(c.attention, q: q, k: k, v: v, keyLengths: c.keyLengths)
            checkAttention(result, reference: reference, naive: naive, "lsh \(c.testDescription) threads \(threads)")
        }
    }

    @Test("factorised hashing matches the reference recomputed from the same rotations", arguments: LSHCases.factorised)
    func factorised(_ c: LSHCase) throws {
        try reference(c)
    }

    @Test("factorised hashing with explicit rotations; one factor is the unfactorised rule, bitwise")
    func factorisedRotations() throws {
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 83, headDim: 12, seed: 21)
        let shape = try AttentionShape(query: q, key: k, value: v)
        var rng = SeededGenerator(seed: 22)
        let rotations = try Tensor(shape: [2, 2, 12, 5], data: (0..<2 * 2 * 12 * 5).map { _ in Float(rng.nextGaussian()) })
        for (sharedQK, causal) in [(true, false), (false, true)] {
            let lsh = LSHAttention(bucketSize: 8, hashes: 2, sharedQK: sharedQK, causal: causal, rotations: rotations,
                                   bucketFactors: [4, 6])
            #expect(lsh.buckets(forLength: 83) == 24)
            #expect(try lsh.rotations(for: shape).elements == rotations.elements)
            let result = try lsh.attend(query: q, key: k, value: v, threads: 2)
            let (reference, naive) = try lshReferences(lsh, q: q, k: k, v: v, keyLengths: nil)
            checkAttention(result, reference: reference, naive: naive, "lsh explicit factorised shared \(sharedQK)")
            expectBitwiseEqual(result, try lsh.attend(query: q, key: k, value: v, threads: 1), "lsh factorised threads")
            // The seeded rotations of the same factors, passed explicitly, give the same result.
            var seeded = lsh
            seeded.rotations = nil
            seeded.seed = 31
            var explicit = seeded
            explicit.rotations = try seeded.rotations(for: shape)
            #expect(explicit.rotations?.shape == [2, 2, 12, 5])
            expectBitwiseEqual(try seeded.attend(query: q, key: k, value: v), try explicit.attend(query: q, key: k, value: v),
                               "lsh factorised seeded vs explicit")
        }
        // A single factor [n] is bucketCount n, bitwise (seeded and explicit rotations).
        for n in [2, 10] {
            let counted = LSHAttention(bucketSize: 8, hashes: 2, bucketCount: n, sharedQK: false, seed: 3)
            let factored = LSHAttention(bucketSize: 8, hashes: 2, sharedQK: false, seed: 3, bucketFactors: [n])
            #expect(try counted.bucketIDs(query: q, key: k) == factored.bucketIDs(query: q, key: k))
            expectBitwiseEqual(try counted.attend(query: q, key: k, value: v), try factored.attend(query: q, key: k, value: v),
                               "lsh bucketCount \(n) vs bucketFactors [\(n)]")
        }
    }

    @Test("factorised bucket ids by hand: the first factor is the least significant")
    func factorisedByHand() throws {
        // D = 2, factors [2, 4]: columns 1 + 2, rotated = [x0, x1, x0 + x1].
        // b0 = argmax([x0, −x0]); b1 = argmax([x1, x0 + x1, −x1, −(x0 + x1)]); bucket = b0 + 2 · b1.
        let rotation = try Tensor(shape: [1, 1, 2, 3], data: [1, 0, 1,
                                                               0, 1, 1])
        let points: [(x: [Float], bucket: Int)] = [
            ([1, 2], 2),      // b0 0; [2, 3, −2, −3] → 1
            ([-1, 2], 1),     // b0 1; [2, 1, −2, −1] → 0
            ([3, -1], 2),     // b0 0; [−1, 2, 1, −2] → 1
            ([-3, -1], 7),    // b0 1; [−1, −4, 1, 4] → 3
            ([1, -3], 4),     // b0 0; [−3, −2, 3, 2] → 2
            ([-2, 1], 1),     // b0 1; [1, −1, −1, 1] → 0 (first of the tied maxima)
            ([0, -1], 4),     // b0 0 (0 ties −0: the first); [−1, −1, 1, 1] → 2
            ([-1, -3], 7),    // b0 1; [−3, −4, 3, 4] → 3
        ]
        let x = try Tensor(shape: [1, 1, points.count, 2], data: points.flatMap(\.x))
        let lsh = LSHAttention(bucketSize: 2, hashes: 1, rotations: rotation, bucketFactors: [2, 4])
        let ids = try lsh.bucketIDs(query: x, key: x)
        #expect(ids.query == points.map(\.bucket))
        #expect(ids.key == ids.query)
        // Separate keys hash the keys by the same rule.
        var separate = lsh
        separate.sharedQK = false
        let y = try Tensor(shape: [1, 1, points.count, 2], data: points.reversed().flatMap(\.x))
        #expect(try separate.bucketIDs(query: x, key: y).key == points.reversed().map(\.bucket))
        // Reversed factors read the columns the other way round: [4, 2] gives other ids.
        let reversed = LSHAttention(bucketSize: 2, hashes: 1, rotations: rotation, bucketFactors: [4, 2])
        // b0 = argmax([x0, x1, −x0, −x1]) over columns 0, 1; b1 = argmax([x0 + x1, −(x0 + x1)]).
        #expect(try reversed.bucketIDs(query: x, key: x).query == [1, 1, 0, 6, 7, 6, 7, 7])
    }

    @Test("one bucket with attention across buckets is dense attention with the self rule")
    func oneBucketIsDense() throws {
        for (n, causal) in [(45, false), (45, true), (130, false)] {
            let (q, _, v) = try randomQKV(heads: 2, queryLength: n, headDim: 24, seed: 7 + UInt64(n))
            let lsh = LSHAttention(bucketSize: n, hashes: 3, attendAcrossBuckets: true, causal: causal)
            let result = try lsh.attend(query: q, key: q, value: v)
            // Self excluded unless nothing else is visible (only the first query under causal).
            let visible: Visibility = { _, _, i, j in (j != i || (causal && i == 0)) && (!causal || j <= i) }
            let keys = try unitRows(q)
            let reference = referenceAttention(query: q, key: keys, value: v, scale: defaultScale(headDim: 24),
                                               visible: visible)
            var naive = naiveFloatAttention(query: q, key: keys, value: v, scale: 1 / Float(24).squareRoot(),
                                            visible: visible)
            // Every round sees the same keys: lse gains log(rounds).
            var shifted = reference
            for row in shifted.lse.indices { shifted.lse[row] += Foundation.log(3.0) }
            for row in naive.lse.indices { naive.lse[row] += logf(3) }
            checkAttention(result, reference: shifted, naive: naive, "lsh one bucket N\(n) causal \(causal)")
        }
    }

    @Test("more hash rounds approximate exact attention better on clustered inputs")
    func roundsReduceError() throws {
        // 12 directions, each with 40 noisy copies: LSH buckets follow the clusters.
        let (n, d, clusters) = (480, 32, 12)
        var rng = SeededGenerator(seed: 5)
        let centres = (0..<clusters).map { _ in (0..<d).map { _ in Float(rng.nextGaussian()) } }
        var query = [Float](), value = [Float]()
        for i in 0..<n {
            let centre = centres[(i * 7) % clusters]
            query += centre.map { 2 * $0 + 0.3 * Float(rng.nextGaussian()) }
            value += (0..<d).map { _ in rng.nextFloat(in: -1...1) }
        }
        let q = try Tensor(shape: [1, 1, n, d], data: query), v = try Tensor(shape: [1, 1, n, d], data: value)
        let exact = referenceAttention(query: q, key: try unitRows(q), value: v, scale: defaultScale(headDim: d),
                                       visible: { _, _, i, j in i != j })
        var errors: [Double] = []
        for hashes in [1, 2, 4, 8] {
            let result = try LSHAttention(bucketSize: 32, hashes: hashes, seed: 11).attend(query: q, key: q, value: v)
            let output = result.output.elements
            let error = output.indices.map { abs(Double(output[$0]) - exact.output[$0]) }.reduce(0, +) / Double(output.count)
            errors.append(error)
        }
        #expect(errors[1] < errors[0] && errors[2] < errors[1] && errors[3] < errors[2],
                "mean error against exact attention should fall with rounds 1, 2, 4, 8: \(errors)")
    }

    @Test("bitwise identical across thread counts and with explicit rotations")
    func determinism() throws {
        let (q, k, v) = try randomQKV(batch: 2, heads: 3, queryLength: 333, headDim: 40, seed: 3)
        let lsh = LSHAttention(bucketSize: 32, hashes: 3, causal: true, seed: 17)
        let one = try lsh.attend(query: q, key: k, value: v, threads: 1)
        let two = try lsh.attend(query: q, key: k, value: v, threads: 2)
        expectBitwiseEqual(one, two, "lsh threads 1 vs 2")
        // One head: the threads share its blocks instead of taking heads.
        let (q1, k1, v1) = try randomQKV(batch: 1, heads: 1, queryLength: 2100, headDim: 16, seed: 4)
        let single = LSHAttention(bucketSize: 32, hashes: 2, seed: 5)
        expectBitwiseEqual(try single.attend(query: q1, key: k1, value: v1, threads: 1),
                           try single.attend(query: q1, key: k1, value: v1, threads: 2), "lsh one head, threads 1 vs 2")
        let shape = try AttentionShape(query: q, key: k, value: v)
        var explicit = lsh
        explicit.rotations = try lsh.rotations(for: shape)
        explicit.seed = 12345
        expectBitwiseEqual(one, try explicit.attend(query: q, key: k, value: v, threads: 2), "lsh explicit rotations")
        var other = lsh
        other.seed = 18
        let different = try other.attend(query: q, key: k, value: v, threads: 1)
        #expect(!bitwiseEqual(one.output.elements, different.output.elements), "another seed should hash differently")
    }

    @Test("strided inputs with NaN padding never leak NaN")
    func nanPadding() throws {
        let c = LSHCase(heads: 2, length: 70, headDim: 12, bucketSize: 8, hashes: 2, sharedQK: false, causal: true, seed: 9)
        let (q, k, v) = try c.inputs()
        let result = try c.attention.attend(query: try embeddedInNaN(q, innerStride: 2), key: try embeddedInNaN(k),
                                            value: try embeddedInNaN(v, innerStride: 3))
        let (reference, naive) = try lshReferences(c.attention, q: q, k: k, v: v, keyLengths: nil)
        checkAttention(result, reference: reference, naive: naive, "lsh NaN-padded")
    }

    @Test("bad configurations throw clear errors")
    func errors() throws {
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 64, headDim: 8, seed: 1)
        expectAttentionError(.invalidParameter, mentioning: ["bucketCount", "even", "3"]) {
            try LSHAttention(bucketCount: 3).attend(query: q, key: k, value: v)
        }
        expectAttentionError(.invalidParameter, mentioning: ["bucketSize", "0"]) {
            try LSHAttention(bucketSize: 0).attend(query: q, key: k, value: v)
        }
        expectAttentionError(.invalidParameter, mentioning: ["hashes", "0"]) {
            try LSHAttention(hashes: 0).attend(query: q, key: k, value: v)
        }
        let wrong = try Tensor(shape: [2, 4, 8, 3], repeating: 1)
        expectAttentionError(.shapeMismatch, mentioning: ["rotations", "[2, 4, 8, 1]"]) {
            try LSHAttention(bucketCount: 2, rotations: wrong).attend(query: q, key: k, value: v)
        }
        var nan = try Tensor(shape: [2, 4, 8, 1], repeating: 1)
        nan[1, 2, 3, 0] = .nan
        expectAttentionError(.invalidParameter, mentioning: ["rotations", "NaN"]) {
            try LSHAttention(rotations: nan).attend(query: q, key: k, value: v)
        }
        for factors in [[3, 2], [2, 0], [2, -2], [1]] {
            expectAttentionError(.invalidParameter, mentioning: ["bucketFactors", "even", "\(factors.first { $0 < 2 || $0 % 2 != 0 }!)"]) {
                try LSHAttention(bucketFactors: factors).attend(query: q, key: k, value: v)
            }
        }
        expectAttentionError(.invalidParameter, mentioning: ["bucketFactors", "[]"]) {
            try LSHAttention(bucketFactors: []).attend(query: q, key: k, value: v)
        }
        expectAttentionError(.invalidParameter, mentioning: ["bucketCount", "8", "4", "[2, 2]"]) {
            try LSHAttention(bucketCount: 8, bucketFactors: [2, 2]).attend(query: q, key: k, value: v)
        }
        expectAttentionError(.invalidParameter, mentioning: ["bucketFactors", "16777216"]) {
            try LSHAttention(bucketFactors: [1 << 20, 1 << 20]).attend(query: q, key: k, value: v)
        }
        let wrongFactored = try Tensor(shape: [2, 4, 8, 4], repeating: 1)
        expectAttentionError(.shapeMismatch, mentioning: ["rotations", "Σ bucketFactors/2", "[2, 4, 8, 3]"]) {
            try LSHAttention(rotations: wrongFactored, bucketFactors: [2, 4]).attend(query: q, key: k, value: v)
        }
        let (q2, k2, v2) = try randomQKV(heads: 2, queryLength: 10, keyLength: 12, headDim: 8, seed: 2)
        expectAttentionError(.unsupported, mentioning: ["queryLength", "keyLength"]) {
            try LSHAttention().attend(query: q2, key: k2, value: v2)
        }
        expectAttentionError(.invalidParameter, mentioning: ["threads"]) {
            try LSHAttention().attend(query: q, key: k, value: v, threads: 0)
        }
    }

    @Test("cost: O(N) workspace per head, examined pairs per round")
    func cost() throws {
        let lsh = LSHAttention()
        let small = try lsh.cost(AttentionShape(heads: 8, queryLength: 4096, headDim: 64), threads: 2)
        let large = try lsh.cost(AttentionShape(heads: 8, queryLength: 8192, headDim: 64), threads: 2)
        #expect(large.scoredPairs == 2 * small.scoredPairs)
        #expect(small.scoredPairs == 8 * 4 * 4096 * 128)
        #expect(Double(large.workspaceBytes) < 2.2 * Double(small.workspaceBytes),
                "workspace \(small.workspaceBytes) -> \(large.workspaceBytes) should grow linearly")
        // Hashing FLOPs: 2 · N · D · columns per round and head (Σ n_i / 2 columns when factorised).
        let shape = AttentionShape(heads: 8, queryLength: 8192, headDim: 64)
        let unfactorised = try LSHAttention(bucketCount: 128).cost(shape, threads: 2)
        let factorised = try LSHAttention(bucketFactors: [16, 8]).cost(shape, threads: 2)
        #expect(factorised.scoredPairs == unfactorised.scoredPairs)
        #expect(unfactorised.flops - factorised.flops == 8 * 4 * 2 * 8192 * 64 * (64 - 12),
                "hashing FLOPs: \(unfactorised.flops) vs \(factorised.flops)")
    }

    @Test("default buckets past 512 are factorised automatically, as the explicit factors")
    func automaticFactorisation() throws {
        let lsh = LSHAttention()
        // The switch: 512 buckets (N = 32768) stay one factor; 514 (N = 32769) become [24, 22].
        #expect(lsh.factors(forLength: 32768) == [512] && lsh.buckets(forLength: 32768) == 512)
        #expect(lsh.factors(forLength: 32769) == [24, 22] && lsh.buckets(forLength: 32769) == 528)
        #expect(lsh.factors(forLength: 1 << 20) == [128, 128])
        #expect(lsh.factors(forLength: 1000) == [16])
        // The old rule is one option away; explicit counts, factors or rotations are kept.
        var plain = lsh
        plain.factorisationThreshold = nil
        #expect(plain.factors(forLength: 1 << 20) == [16384])
        #expect(LSHAttention(bucketCount: 1024).factors(forLength: 1 << 20) == [1024])
        #expect(LSHAttention(bucketFactors: [8, 8]).factors(forLength: 1 << 20) == [8, 8])
        // Same buckets, same rotations, same bits as giving the factors.
        let n = 33000, factors = lsh.factors(forLength: n)
        #expect(factors == [24, 22])
        let (q, k, v) = try randomQKV(heads: 1, queryLength: n, headDim: 8, seed: 7100)
        let automatic = try LSHAttention(hashes: 2).attend(query: q, key: k, value: v, keyLengths: nil, threads: 2)
        let explicit = try LSHAttention(hashes: 2, bucketFactors: factors).attend(query: q, key: k, value: v,
                                                                                  keyLengths: nil, threads: 2)
        expectBitwiseEqual(automatic, explicit, "automatic vs explicit factors at N \(n)")
        let shape = AttentionShape(heads: 1, queryLength: n, headDim: 8)
        expectAttentionError(.invalidParameter, mentioning: ["factorisationThreshold", "at least 2"]) {
            try LSHAttention(factorisationThreshold: 1).cost(shape)
        }
    }
}
