// Invariances every conformer owes its callers (issue 14, defects 1-5): the result of a
// call does not depend on how the inputs are laid out in memory (strided views with
// element steps, offsets and NaN in every unaddressed element give the contiguous bits),
// nor on the thread count; and the regressions of the four kernels that broke them (the
// row touch past the end of a strided view, LSH rounds whose log-sum-exps are far apart,
// Longformer heads with different dilations, routing ties).

import AttentionBenchCore
@_spi(Testing) @_spi(Benchmarking) import EfficientAttention
import Foundation
import Testing

/// A small awkward problem for every registered conformer.
struct InvarianceProblem: Sendable, CustomTestStringConvertible {
    var batch = 1, heads = 2, kvHeads = 2, queryLength: Int, keyLength: Int, headDim: Int, valueDim: Int
    var causal: Bool
    var keyLengths: [Int]? = nil

    var testDescription: String {
        "B\(batch) H\(heads)/\(kvHeads) Nq\(queryLength) Nk\(keyLength) D\(headDim) Dv\(valueDim)"
            + (causal ? " causal" : "") + (keyLengths.map { " keyLengths\($0)" } ?? "")
    }

    static let all: [InvarianceProblem] = [
        InvarianceProblem(queryLength: 37, keyLength: 37, headDim: 3, valueDim: 3, causal: false),
        InvarianceProblem(heads: 4, queryLength: 70, keyLength: 70, headDim: 65, valueDim: 33, causal: true),
        InvarianceProblem(batch: 2, heads: 4, kvHeads: 2, queryLength: 45, keyLength: 45, headDim: 17, valueDim: 1,
                          causal: false, keyLengths: [45, 20]),
        InvarianceProblem(heads: 1, kvHeads: 1, queryLength: 33, keyLength: 50, headDim: 1, valueDim: 16, causal: true),
        InvarianceProblem(queryLength: 29, keyLength: 29, headDim: 128, valueDim: 128, causal: true),
        InvarianceProblem(batch: 2, queryLength: 40, keyLength: 40, headDim: 8, valueDim: 24, causal: false,
                          keyLengths: [0, 40]),
        InvarianceProblem(batch: 2, heads: 4, kvHeads: 2, queryLength: 36, keyLength: 60, headDim: 16, valueDim: 16,
                          causal: false, keyLengths: [30, 0]),
    ]
}

@Suite("Invariances of every conformer")
struct InvarianceTests {
    /// Settings small enough that every conformer's structure (windows, blocks, buckets,
    /// clusters, projections, features, spans, memory) is exercised at these lengths.
    static let settings: [Parameter: Int] = [
        .window: 12, .stride: 5, .blockSize: 8, .randomBlocks: 2, .bucketSize: 8, .hashes: 3, .features: 24,
        .proj: 16, .span: 20, .ramp: 6, .memory: 9, .compression: 3, .inducing: 6, .seeds: 3,
    ]

    /// Every available conformer of the benchmark's registry, built for `problem` (after the
    /// entry's own adjustment), with the inputs to run it on; `nil` where the conformer does
    /// not take the problem (for example Linformer and causal attention).
    static func instance(_ entry: VariantEntry, _ p: InvarianceProblem)
        throws -> (attention: any Attention, q: Tensor, k: Tensor, v: Tensor)? {
        let base = BenchProblem(shape: AttentionShape(batch: p.batch, heads: p.heads, kvHeads: p.kvHeads,
                                                      queryLength: p.queryLength, keyLength: p.keyLength,
                                                      headDim: p.headDim, valueDim: p.valueDim),
                                causal: p.causal)
        let problem = entry.adjustProblem(base, entry.resolveParameters(settings, at: base))
        let config = ConformerConfig(problem: problem, parameters: entry.resolveParameters(settings, at: problem),
                                     seed: 5)
        guard let attention = try? entry.make!(config), (try? attention.validate(problem.shape)) != nil else {
            return nil
        }
        let s = problem.shape
        let (q, k, v) = try randomQKV(batch: s.batch, heads: s.heads, kvHeads: s.kvHeads, queryLength: s.queryLength,
                                      keyLength: s.keyLength, headDim: s.headDim, valueDim: s.valueDim,
                                      seed: UInt64(s.queryLength * 31 + s.headDim))
        return (attention, q, k, v)
    }

    static let entries = Registry.standard.entries.filter(\.isAvailable).map(\.name)

    /// Inputs inside NaN-filled storage with element steps 2 and 3 (every row's elements
    /// interleaved with NaN), padded row, head and batch strides and an offset: the
    /// contiguous result, bit for bit, and every thread count too. Before the fix of
    /// `touchRows` (defect 1) the last row's touch read past the storage (a crash under
    /// AddressSanitizer, and in release for large views); the unfused, FAVOR+ and elu + 1
    /// kernels took scalar paths for strided rows and gave other bits.
    @Test("strided views with NaN gaps and every thread count give the contiguous bits",
          arguments: entries)
    func layoutAndThreads(_ name: String) throws {
        let entry = Registry.standard.entry(named: name)!
        var ran = 0
        for p in InvarianceProblem.all {
            guard let (attention, q, k, v) = try InvarianceTests.instance(entry, p) else { continue }
            let keyLengths = p.keyLengths.flatMap { $0.count == q.shape[0] ? $0 : nil }
            let label = "\(name) \(p.testDescription)"
            let contiguous = try attention.attend(query: q, key: k, value: v, keyLengths: keyLengths, threads: 1)
            #expect(!contiguous.output.elements.contains { !$0.isFinite }, "\(label): non-finite output")
            for threads in [2, 3, 7] {
                expectBitwiseEqual(try attention.attend(query: q, key: k, value: v, keyLengths: keyLengths,
                                                        threads: threads),
                                   contiguous, "\(label) threads \(threads) vs 1")
            }
            let strided = try attention.attend(query: embeddedInNaN(q, innerStride: 2), key: embeddedInNaN(k, innerStride: 3),
                                               value: embeddedInNaN(v, innerStride: 2), keyLengths: keyLengths, threads: 2)
            expectBitwiseEqual(strided, contiguous, "\(label) strided (steps 2, 3, 2) vs contiguous")
            ran += 1
        }
        #expect(ran >= 2, "\(name) ran on only \(ran) problems")
    }

    /// Views whose last addressed element is the last element of their storage, with
    /// element step 17: the row touch before packing spanned `width · step` floats,
    /// past the storage's end for the last row (defect 1: a heap-buffer-overflow under
    /// AddressSanitizer, which is how this test fails before the fix; in release the few
    /// bytes past the end were usually mapped). The contiguous bits, too.
    @Test("views ending at their storage's last element read nothing past it", arguments: entries)
    func viewsEndingTheStorage(_ name: String) throws {
        let entry = Registry.standard.entry(named: name)!
        var ran = 0
        for p in InvarianceProblem.all.prefix(3) {
            guard let (attention, q, k, v) = try InvarianceTests.instance(entry, p) else { continue }
            let keyLengths = p.keyLengths.flatMap { $0.count == q.shape[0] ? $0 : nil }
            let contiguous = try attention.attend(query: q, key: k, value: v, keyLengths: keyLengths, threads: 1)
            // Step 17: the span `width · 17` holds a multiple of 16 (a touched float) past
            // the last element whatever the width.
            let tight = try attention.attend(query: tightView(q, step: 17), key: tightView(k, step: 17),
                                             value: tightView(v, step: 17), keyLengths: keyLengths, threads: 2)
            expectBitwiseEqual(tight, contiguous, "\(name) \(p.testDescription) tight strided views")
            ran += 1
        }
        #expect(ran >= 1, "\(name) ran on no problem")
    }

    /// `x`'s elements `step` floats apart in storage that ends at the last one.
    func tightView(_ x: Tensor, step: Int) throws -> Tensor {
        let s = x.shape, values = x.elements
        var storage = [Float](repeating: .nan, count: (values.count - 1) * step + 1)
        for (n, value) in values.enumerated() { storage[n * step] = value }
        return try Tensor(shape: s, storage: storage,
                          strides: [s[1] * s[2] * s[3] * step, s[2] * s[3] * step, s[3] * step, step])
    }

    /// LSH with a large scale: rounds whose log-sum-exps differ by more than ~88, so the
    /// earlier rounds' weight `exp(lse_earlier − m)` underflows to 0. Before the fix the
    /// combine skipped rescaling them and left them weight 1 (outputs up to `hashes` times
    /// too large).
    @Test("LSH rounds with far-apart log-sum-exps merge as the reference does")
    func lshFarApartRounds() throws {
        for (n, causal) in [(64, false), (100, true)] {
            var lsh = LSHAttention(bucketSize: 8, hashes: 4, causal: causal, seed: 11)
            lsh.scale = 400
            let (q, k, v) = try randomQKV(heads: 2, queryLength: n, headDim: 8, seed: 900 + UInt64(n))
            let result = try lsh.attend(query: q, key: k, value: v, threads: 1)
            let (reference, naive) = try lshReferences(lsh, q: q, k: k, v: v, keyLengths: nil)
            // The test only means something if some row's rounds are that far apart.
            #expect(reference.lse.contains { $0 > 200 }, "no large log-sum-exp: the test would not reach the underflow")
            checkAttention(result, reference: reference, naive: naive, "lsh scale 400 N\(n) causal \(causal)")
        }
    }

    /// Heads with different dilations: each head's query partition into residue classes has
    /// its own group count; the kernel runs the largest, and before the fix the groups past
    /// a head's own count repeated its queries with other tile boundaries (two work items
    /// writing different bits to the same rows: a data race, results varying with the thread
    /// count). Each head must give the bits it gives when run alone.
    @Test("Longformer with per-head dilations: each head's bits alone, the reference, any thread count")
    func longformerPerHeadDilations() throws {
        // The duplicated groups changed bits only where they started past the window's
        // reach and their key tiles straddled a row's keys differently: small dilations
        // beside a large one, windows wider than a key tile.
        let dilations = [1, 2, 3, 16]
        for (n, window, causal) in [(150, 8, false), (300, 100, false), (300, 100, true), (700, 300, true)] {
            let attention = LongformerAttention(window: window, dilations: dilations, globalPositions: [0, 77],
                                                causal: causal)
            let pattern = try attention.pattern(for: AttentionShape(heads: 4, queryLength: n, headDim: 16))
            let label = "longformer dilations \(dilations) N\(n) window \(window) causal \(causal)"
            let all = try checkPatternAttention(attention, pattern: pattern, batch: 2, heads: 4, headDim: 16,
                                                threads: 1, seed: 4200 + UInt64(n), label)
            let (q, k, v) = try randomQKV(batch: 2, heads: 4, queryLength: n, headDim: 16, seed: 4200 + UInt64(n))
            for (h, dilation) in dilations.enumerated() {
                let alone = LongformerAttention(window: window, dilations: [dilation], globalPositions: [0, 77], causal: causal)
                let one = try alone.attend(query: head(q, h), key: head(k, h), value: head(v, h), threads: 1)
                let (output, lse) = (try head(all.output, h).elements, try head(all.logSumExp, h).elements)
                #expect(bitwiseEqual(one.output.elements, output) && bitwiseEqual(one.logSumExp.elements, lse),
                        "\(label): head \(h) differs from the head run alone")
            }
            for threads in [2, 3, 7] {
                expectBitwiseEqual(try attention.attend(query: q, key: k, value: v, threads: threads), all,
                                   "\(label) threads \(threads)")
            }
        }
    }

    /// Head `h` of `x` as a one-head view of the same storage.
    func head(_ x: Tensor, _ h: Int) throws -> Tensor {
        try Tensor(shape: [x.shape[0], 1, x.shape[2], x.shape[3]], storage: x.storage, strides: x.strides,
                   offset: x.offset + h * x.strides[1])
    }

    /// Routing: rows given as a stride-0 view (every element of a row the same value)
    /// route exactly as the same values stored contiguously. The rows are parallel, so
    /// their routing scores tie in exact arithmetic; before the fix the unit-normalisation
    /// took a scalar path for strided rows, and the rounding (not the position) decided
    /// which of the tied rows a cluster took.
    @Test("routing: the same elements as a stride-0 view or contiguous route the same")
    func routingLayout() throws {
        let (n, d) = (96, 48)
        let routing = try RoutingAttention(heads: 1, headDim: d, clusters: 4, seed: 3)
        // Row i is (a_i, a_i, ..., a_i): parallel rows with different lengths and signs.
        let values: [Float] = (0..<n).map { i in
            let step = Float((i * 37) % 23) - 11.3
            return step * 0.1731 + 0.0123 * Float(i)
        }
        let contiguous = try Tensor(shape: [1, 1, n, d], data: values.flatMap { Array(repeating: $0, count: d) })
        let broadcast = try Tensor(shape: [1, 1, n, d], storage: values, strides: [n, n, 1, 0])
        #expect(broadcast.elements == contiguous.elements)
        let a = try routing.routes(query: contiguous, key: contiguous)
        let b = try routing.routes(query: broadcast, key: broadcast)
        #expect(a.query == b.query, "query routes differ between layouts")
        #expect(a.key == b.key, "key routes differ between layouts")
        expectBitwiseEqual(try routing.attend(query: broadcast, key: broadcast, value: contiguous, threads: 2),
                           try routing.attend(query: contiguous, key: contiguous, value: contiguous, threads: 1),
                           "routing stride-0 vs contiguous")
    }

    /// Exact ties (identical rows) go by position: every cluster takes the first positions.
    @Test("routing: identical rows tie, and ties go to the smaller positions")
    func routingTiesByPosition() throws {
        let (n, d) = (64, 8)
        let routing = try RoutingAttention(heads: 1, headDim: d, clusters: 4, seed: 9)
        let row = (0..<d).map { Float($0) - 2.5 }
        for x in [try Tensor(shape: [1, 1, n, d], data: Array((0..<n).map { _ in row }.joined())),
                  try Tensor(shape: [1, 1, n, d], storage: row, strides: [0, 0, 0, 1])] {
            let routes = try routing.routes(query: x, key: x)
            for cluster in routes.query + routes.key {
                #expect(cluster == Array(0..<cluster.count), "tied rows: cluster \(cluster.prefix(6))…")
            }
        }
    }
}
