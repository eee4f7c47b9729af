// DenseAttention against the Double reference: shapes (awkward sizes, Nq != Nk, D != Dv,
// grouped heads, batch, key padding, custom scales), out-of-bounds safety with
// NaN-padded inputs, determinism across runs and thread counts, and numerics (large
// logits, rows with no visible key).

@_spi(Testing) @_spi(Benchmarking) import EfficientAttention
import Foundation
import Testing

/// One dense-attention problem.
struct DenseCase: Sendable, CustomTestStringConvertible {
    var batch = 1
    var heads = 2
    var kvHeads: Int? = nil
    var queryLength: Int
    var keyLength: Int? = nil
    var headDim = 16
    var valueDim: Int? = nil
    var causal = false
    var keyLengths: [Int]? = nil
    var scale: Float? = nil
    var threads: Int? = nil
    var seed: UInt64 = 0

    var nk: Int { keyLength ?? queryLength }

    var testDescription: String {
        var s = "B\(batch) H\(heads)/\(kvHeads ?? heads) Nq\(queryLength) Nk\(nk) D\(headDim) Dv\(valueDim ?? headDim)"
        if causal { s += " causal" }
        if let keyLengths { s += " keyLengths\(keyLengths)" }
        if let scale { s += " scale \(scale)" }
        if let threads { s += " threads \(threads)" }
        return s
    }

    func inputs() throws -> (q: Tensor, k: Tensor, v: Tensor) {
        try randomQKV(batch: batch, heads: heads, kvHeads: kvHeads, queryLength: queryLength,
                      keyLength: keyLength, headDim: headDim, valueDim: valueDim, seed: seed)
    }

    var visible: Visibility {
        Visible.dense(causal: causal, queryLength: queryLength, keyLength: nk, keyLengths: keyLengths)
    }

    /// Runs `attention` (configured for this case) and checks it against the reference.
    @discardableResult
    func check(_ attention: some Attention, sourceLocation: SourceLocation = #_sourceLocation) throws -> AttentionResult {
        let (q, k, v) = try inputs()
        return try checkAgainstReference(attention, query: q, key: k, value: v, keyLengths: keyLengths,
                                         threads: threads, scale: scale, visible: visible,
                                         "\(attention.name) \(testDescription)", sourceLocation: sourceLocation)
    }
}

/// Numbers the cases' seeds so every case has its own data.
func numberingSeeds(_ cases: [DenseCase], base: UInt64) -> [DenseCase] {
    cases.enumerated().map { n, c in
        var c = c
        c.seed = base + UInt64(n)
        return c
    }
}

enum DenseCases {
    /// Sequence lengths 1 ... 777, causal and not.
    static let lengths: [DenseCase] = numberingSeeds([1, 2, 17, 64, 127, 300, 777].flatMap { n in
        [false, true].map { causal in
            n <= 127 ? DenseCase(heads: 4, kvHeads: 2, queryLength: n, causal: causal)
                     : DenseCase(heads: 2, kvHeads: 1, queryLength: n, causal: causal)
        }
    }, base: 100)

    /// Nq != Nk both ways.
    static let unequalLengths: [DenseCase] = numberingSeeds([(17, 300), (300, 17), (1, 777), (777, 1), (64, 65), (65, 64),
                                                     (2, 1), (1, 2)].flatMap { nq, nk in
        [false, true].map { causal in DenseCase(queryLength: nq, keyLength: nk, headDim: 8, causal: causal) }
    }, base: 200)

    /// Head dimensions 1 ... 199.
    static let headDims: [DenseCase] = numberingSeeds([1, 3, 16, 64, 65, 128, 199].flatMap { d in
        [false, true].map { causal in DenseCase(queryLength: 37, keyLength: 45, headDim: d, causal: causal) }
    }, base: 300)

    /// Value dimension different from the query/key dimension, up to the 256 limit.
    static let valueDims: [DenseCase] = numberingSeeds([(64, 3), (3, 65), (199, 128), (256, 256), (1, 7), (16, 1),
                                                (256, 17), (5, 256)].flatMap { d, dv in
        [false, true].map { causal in
            DenseCase(queryLength: 33, keyLength: 40, headDim: d, valueDim: dv, causal: causal)
        }
    }, base: 400)

    /// Multi-query, grouped-query and plain multi-head.
    static let groupedHeads: [DenseCase] = numberingSeeds([(4, 1), (4, 2), (4, 4), (6, 3), (6, 2), (6, 1)].flatMap { h, hkv in
        [false, true].map { causal in
            DenseCase(heads: h, kvHeads: hkv, queryLength: 50, keyLength: 41, headDim: 24, valueDim: 20,
                      causal: causal)
        }
    }, base: 500)

    /// Key padding: lengths 0, 1, Nk and in between, with and without causal, Nq <=> Nk.
    static let keyPadding: [DenseCase] = numberingSeeds([
        DenseCase(batch: 4, queryLength: 64, keyLengths: [0, 1, 64, 23]),
        DenseCase(batch: 4, queryLength: 64, causal: true, keyLengths: [0, 1, 64, 23]),
        DenseCase(batch: 4, queryLength: 20, keyLength: 64, causal: true, keyLengths: [64, 0, 1, 40]),
        DenseCase(batch: 4, queryLength: 80, keyLength: 64, causal: true, keyLengths: [64, 10, 0, 1]),
        DenseCase(batch: 4, queryLength: 80, keyLength: 64, keyLengths: [33, 64, 1, 0]),
        DenseCase(batch: 2, heads: 4, kvHeads: 1, queryLength: 31, keyLength: 129, headDim: 33, valueDim: 9,
                  keyLengths: [129, 70]),
        DenseCase(batch: 2, heads: 4, kvHeads: 2, queryLength: 129, keyLength: 31, headDim: 9, valueDim: 33,
                  causal: true, keyLengths: [17, 31]),
        DenseCase(batch: 3, queryLength: 1, keyLength: 300, keyLengths: [300, 299, 1]),
        DenseCase(batch: 3, queryLength: 300, keyLength: 1, keyLengths: [1, 0, 1]),
    ], base: 600)

    /// Custom scales, including negative ones and 1.
    static let scales: [DenseCase] = numberingSeeds([Float(0.05), -0.5, 1, -3, 2.5].flatMap { scale in
        [false, true].map { causal in
            DenseCase(heads: 3, queryLength: 45, keyLength: 60, headDim: 16, causal: causal, scale: scale)
        }
    }, base: 700)

    /// Batches, and explicit thread counts (fewer, equal to and more than the B·H items).
    static let batchesAndThreads: [DenseCase] = numberingSeeds([
        DenseCase(batch: 2, heads: 4, kvHeads: 2, queryLength: 100, headDim: 24, causal: true),
        DenseCase(batch: 2, heads: 4, kvHeads: 2, queryLength: 100, headDim: 24),
        DenseCase(batch: 3, heads: 2, queryLength: 70, keyLength: 90, causal: true, threads: 1),
        DenseCase(batch: 3, heads: 2, queryLength: 70, keyLength: 90, causal: true, threads: 2),
        DenseCase(batch: 3, heads: 2, queryLength: 70, keyLength: 90, keyLengths: [90, 0, 45], threads: 3),
        DenseCase(batch: 1, heads: 1, queryLength: 200, causal: true, threads: 2),
        DenseCase(batch: 1, heads: 1, queryLength: 200, threads: 16),
    ], base: 800)
}

extension DenseCases {
    /// Lengths and head dimensions around likely tile and vector widths.
    static let tileEdges: [DenseCase] = numberingSeeds([(63, 65), (65, 63), (127, 129), (129, 127), (255, 257), (256, 256),
                                                (257, 255), (128, 33), (33, 128)].flatMap { nq, nk in
        [false, true].map { causal in DenseCase(heads: 1, queryLength: nq, keyLength: nk, headDim: 8, causal: causal) }
    } + [15, 17, 31, 32, 33, 47, 48, 63, 96, 255].map { d in
        DenseCase(heads: 1, queryLength: 40, keyLength: 70, headDim: d, valueDim: 97 - d % 64, causal: d % 2 == 1)
    } + [63, 64, 65, 127, 128, 129].map { length in
        DenseCase(batch: 2, heads: 2, kvHeads: 1, queryLength: 100, keyLength: 150, causal: length % 2 == 0,
                  keyLengths: [length, 150 - length])
    }, base: 850)

    /// Seeded random problems: every parameter drawn at once, with small work each.
    static let randomProblems: [DenseCase] = {
        var rng = SeededGenerator(seed: 2024)
        func int(_ range: ClosedRange<Int>) -> Int { Int.random(in: range, using: &rng) }
        func length() -> Int {
            // Half the time near a multiple of 16, otherwise anywhere.
            Bool.random(using: &rng) ? max(1, 16 * int(0...16) + int(-1...1)) : int(1...300)
        }
        var cases: [DenseCase] = []
        while cases.count < 120 {
            let heads = [1, 2, 3, 4, 6, 8].randomElement(using: &rng)!
            let divisors = (1...heads).filter { heads % $0 == 0 }
            var c = DenseCase(batch: int(1...3), heads: heads, kvHeads: divisors.randomElement(using: &rng)!,
                              queryLength: length(), keyLength: length(),
                              headDim: Bool.random(using: &rng) ? int(1...64) : int(1...256),
                              valueDim: Bool.random(using: &rng) ? int(1...64) : int(1...256),
                              causal: Bool.random(using: &rng))
            if int(0...2) == 0 {
                c.keyLengths = (0..<c.batch).map { _ in [0, 1, c.nk, int(0...c.nk)].randomElement(using: &rng)! }
            }
            if int(0...2) == 0 { c.scale = rng.nextFloat(in: -2...2) }
            c.threads = [nil, 1, 2, 3].randomElement(using: &rng)!
            let work = c.batch * c.heads * c.queryLength * c.nk * (c.headDim + (c.valueDim ?? c.headDim))
            if work <= 8_000_000 { cases.append(c) }
        }
        return numberingSeeds(cases, base: 5000)
    }()
}

@Suite("DenseAttention matches the reference")
struct DenseReferenceTests {
    @Test("sequence lengths", arguments: DenseCases.lengths)
    func lengths(_ c: DenseCase) throws {
        try c.check(DenseAttention(causal: c.causal, scale: c.scale))
    }

    @Test("Nq != Nk", arguments: DenseCases.unequalLengths)
    func unequalLengths(_ c: DenseCase) throws {
        try c.check(DenseAttention(causal: c.causal, scale: c.scale))
    }

    @Test("head dimensions", arguments: DenseCases.headDims)
    func headDims(_ c: DenseCase) throws {
        try c.check(DenseAttention(causal: c.causal, scale: c.scale))
    }

    @Test("value dimension != head dimension", arguments: DenseCases.valueDims)
    func valueDims(_ c: DenseCase) throws {
        try c.check(DenseAttention(causal: c.causal, scale: c.scale))
    }

    @Test("grouped and multi-query heads", arguments: DenseCases.groupedHeads)
    func groupedHeads(_ c: DenseCase) throws {
        try c.check(DenseAttention(causal: c.causal, scale: c.scale))
    }

    @Test("key padding", arguments: DenseCases.keyPadding)
    func keyPadding(_ c: DenseCase) throws {
        try c.check(DenseAttention(causal: c.causal, scale: c.scale))
    }

    @Test("custom scale", arguments: DenseCases.scales)
    func scales(_ c: DenseCase) throws {
        try c.check(DenseAttention(causal: c.causal, scale: c.scale))
    }

    @Test("batches and thread counts", arguments: DenseCases.batchesAndThreads)
    func batchesAndThreads(_ c: DenseCase) throws {
        try c.check(DenseAttention(causal: c.causal, scale: c.scale))
    }

    @Test("tile and vector width edges", arguments: DenseCases.tileEdges)
    func tileEdges(_ c: DenseCase) throws {
        try c.check(DenseAttention(causal: c.causal, scale: c.scale))
    }

    @Test("seeded random problems", arguments: DenseCases.randomProblems)
    func randomProblems(_ c: DenseCase) throws {
        try c.check(DenseAttention(causal: c.causal, scale: c.scale))
    }

    @Test("a larger problem: B=1 H=2 N=1000 D=64 causal")
    func larger() throws {
        let c = DenseCase(batch: 1, heads: 2, queryLength: 1000, headDim: 64, causal: true, seed: 900)
        try c.check(DenseAttention(causal: true))
    }

    @Test("long keys take the streaming query tile (512): reference, causal, padding, grouped heads, threads")
    func streamingQueryTile() throws {
        // K + V of one head past 1 MiB: Nk · (D + Dv) · 4 > 2^20.
        let cases = [
            DenseCase(batch: 1, heads: 2, queryLength: 600, keyLength: 2100, headDim: 128, seed: 910),
            DenseCase(batch: 2, heads: 4, kvHeads: 2, queryLength: 700, keyLength: 2100, headDim: 128, valueDim: 96,
                      causal: true, keyLengths: [2100, 1500], seed: 911),
            DenseCase(batch: 1, heads: 1, queryLength: 530, keyLength: 4500, headDim: 65, causal: true, seed: 912),
        ]
        for c in cases {
            let shape = AttentionShape(batch: c.batch, heads: c.heads, kvHeads: c.kvHeads, queryLength: c.queryLength,
                                       keyLength: c.nk, headDim: c.headDim, valueDim: c.valueDim)
            #expect(DenseAttention.queryTile(shape) == 512, "\(c.testDescription) takes the streaming tile")
            let one = try c.check(DenseAttention(causal: c.causal))
            let (q, k, v) = try c.inputs()
            for threads in [1, 3] {
                let other = try DenseAttention(causal: c.causal).attend(query: q, key: k, value: v,
                                                                        keyLengths: c.keyLengths, threads: threads)
                expectBitwiseEqual(other, one, "\(c.testDescription) threads \(threads)")
            }
            // The tile does not change a row's arithmetic: a window wider than the keys keeps
            // the default 128-query tile and gives the same bits.
            let wide = try MultiQueryAttention(causal: c.causal, leftWindow: 1 << 20, rightWindow: 1 << 20)
                .attend(query: q, key: k, value: v, keyLengths: c.keyLengths, threads: 2)
            expectBitwiseEqual(wide, one, "\(c.testDescription) 128-query tiles vs 512")
        }
        #expect(DenseAttention.queryTile(AttentionShape(heads: 1, queryLength: 2048, headDim: 64)) == 128)
    }

    @Test("the default scale is 1/sqrt(D)")
    func defaultScaleIsInverseSqrtD() throws {
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 20, headDim: 49, seed: 901)
        let implicit = try DenseAttention().attend(query: q, key: k, value: v)
        let explicit = try DenseAttention(scale: 1 / 7).attend(query: q, key: k, value: v)
        expectBitwiseEqual(implicit, explicit, "scale nil vs 1/7 for D = 49")
        // And a different scale gives a different answer (the scale is really used).
        let other = try DenseAttention(scale: 0.5).attend(query: q, key: k, value: v)
        #expect(!bitwiseEqual(implicit.output.elements, other.output.elements))
    }
}

@Suite("DenseAttention reads only the addressed elements")
struct DenseOutOfBoundsTests {
    static let cases: [DenseCase] = numberingSeeds([
        DenseCase(batch: 2, heads: 4, kvHeads: 2, queryLength: 37, keyLength: 53, headDim: 19, valueDim: 7),
        DenseCase(batch: 2, heads: 4, kvHeads: 2, queryLength: 37, keyLength: 53, headDim: 19, valueDim: 7,
                  causal: true),
        DenseCase(batch: 2, heads: 2, queryLength: 70, keyLength: 40, headDim: 64, causal: true,
                  keyLengths: [40, 13]),
        DenseCase(batch: 1, heads: 3, kvHeads: 1, queryLength: 129, keyLength: 129, headDim: 128, valueDim: 65),
    ], base: 1000)

    /// q, k and v inside NaN-filled buffers with padded strides and offsets: the result
    /// is bitwise the contiguous result, and no NaN reaches it.
    @Test("NaN-padded strided inputs", arguments: cases)
    func nanPadded(_ c: DenseCase) throws {
        let (q, k, v) = try c.inputs()
        let attention = DenseAttention(causal: c.causal)
        let contiguous = try attention.attend(query: q, key: k, value: v, keyLengths: c.keyLengths)
        let padded = try attention.attend(query: embeddedInNaN(q), key: embeddedInNaN(k), value: embeddedInNaN(v),
                                          keyLengths: c.keyLengths)
        #expect(!padded.output.elements.contains { $0.isNaN }, "NaN reached the output: \(c.testDescription)")
        #expect(!padded.logSumExp.elements.contains { $0.isNaN }, "NaN reached the lse: \(c.testDescription)")
        expectBitwiseEqual(padded, contiguous, "NaN-padded vs contiguous \(c.testDescription)")
        // Each input padded on its own, too.
        expectBitwiseEqual(try attention.attend(query: embeddedInNaN(q), key: k, value: v, keyLengths: c.keyLengths),
                           contiguous, "padded query only")
        expectBitwiseEqual(try attention.attend(query: q, key: embeddedInNaN(k), value: v, keyLengths: c.keyLengths),
                           contiguous, "padded key only")
        expectBitwiseEqual(try attention.attend(query: q, key: k, value: embeddedInNaN(v), keyLengths: c.keyLengths),
                           contiguous, "padded value only")
    }

    /// A non-unit innermost stride (elements of a row interleaved with NaN): still the
    /// reference result, no NaN.
    @Test("NaN-interleaved rows (inner stride 2)", arguments: cases)
    func innerStride(_ c: DenseCase) throws {
        let (q, k, v) = try c.inputs()
        let (qs, ks, vs) = (try embeddedInNaN(q, innerStride: 2), try embeddedInNaN(k, innerStride: 2),
                            try embeddedInNaN(v, innerStride: 3))
        let result = try DenseAttention(causal: c.causal).attend(query: qs, key: ks, value: vs,
                                                                 keyLengths: c.keyLengths)
        let reference = referenceAttention(query: q, key: k, value: v, scale: defaultScale(headDim: c.headDim),
                                           visible: c.visible)
        let naive = naiveFloatAttention(query: q, key: k, value: v, scale: 1 / Float(c.headDim).squareRoot(),
                                        visible: c.visible)
        checkAttention(result, reference: reference, naive: naive, "inner stride 2 \(c.testDescription)")
    }

    /// Keys and values past a batch item's key length are padding: NaN there must not
    /// reach the output.
    @Test("NaN in padded key positions", arguments: [false, true])
    func nanInPaddedKeys(causal: Bool) throws {
        let keyLengths = [0, 1, 17, 40]
        var (q, k, v) = try randomQKV(batch: 4, heads: 2, queryLength: 30, keyLength: 40, headDim: 12,
                                      valueDim: 5, seed: 1100)
        let clean = try DenseAttention(causal: causal).attend(query: q, key: k, value: v, keyLengths: keyLengths)
        for b in 0..<4 { for h in 0..<2 { for j in keyLengths[b]..<40 {
            for c in 0..<12 { k[b, h, j, c] = .nan }
            for c in 0..<5 { v[b, h, j, c] = .nan }
        } } }
        let dirty = try DenseAttention(causal: causal).attend(query: q, key: k, value: v, keyLengths: keyLengths)
        #expect(!dirty.output.elements.contains { $0.isNaN }, "NaN from padded keys reached the output")
        expectBitwiseEqual(dirty, clean, "NaN in padded keys vs finite padding")
        q = try embeddedInNaN(q)
        let both = try DenseAttention(causal: causal).attend(query: q, key: k, value: v, keyLengths: keyLengths)
        expectBitwiseEqual(both, clean, "NaN-padded query and NaN padded keys")
    }

    /// A key/value tensor that is a window of a longer sequence (offset into shared storage).
    @Test("key and value as a sub-range of a longer sequence")
    func subRange() throws {
        let (q, kLong, vLong) = try randomQKV(batch: 2, heads: 2, queryLength: 20, keyLength: 90, headDim: 16,
                                              seed: 1200)
        let start = 25, length = 40
        func window(_ t: Tensor) throws -> Tensor {
            try Tensor(shape: [2, 2, length, t.shape[3]], storage: t.storage, strides: t.strides,
                       offset: start * t.strides[2])
        }
        let k = try window(kLong), v = try window(vLong)
        let kCopy = try Tensor(shape: k.shape, data: k.elements), vCopy = try Tensor(shape: v.shape, data: v.elements)
        let viewResult = try DenseAttention().attend(query: q, key: k, value: v)
        let copyResult = try DenseAttention().attend(query: q, key: kCopy, value: vCopy)
        expectBitwiseEqual(viewResult, copyResult, "windowed view vs copied window")
        try checkAgainstReference(DenseAttention(), query: q, key: k, value: v, scale: nil, visible: Visible.all,
                                  "windowed keys")
    }
}

@Suite("DenseAttention is deterministic")
struct DenseDeterminismTests {
    static let cases: [DenseCase] = numberingSeeds([
        DenseCase(batch: 2, heads: 3, kvHeads: 1, queryLength: 130, keyLength: 257, headDim: 40),
        DenseCase(batch: 2, heads: 3, kvHeads: 1, queryLength: 130, keyLength: 257, headDim: 40, causal: true),
        DenseCase(batch: 2, heads: 3, kvHeads: 3, queryLength: 257, keyLength: 130, headDim: 33, valueDim: 64,
                  causal: true, keyLengths: [100, 7]),
        DenseCase(batch: 1, heads: 1, queryLength: 600, headDim: 64, causal: true),
        DenseCase(batch: 1, heads: 1, queryLength: 3, keyLength: 900, headDim: 64),
    ], base: 1300)

    @Test("two runs are bitwise equal", arguments: cases)
    func repeatable(_ c: DenseCase) throws {
        let (q, k, v) = try c.inputs()
        let attention = DenseAttention(causal: c.causal)
        let a = try attention.attend(query: q, key: k, value: v, keyLengths: c.keyLengths)
        let b = try attention.attend(query: q, key: k, value: v, keyLengths: c.keyLengths)
        #expect(!a.output.elements.contains { $0.isNaN })
        expectBitwiseEqual(a, b, "run 1 vs run 2, \(c.testDescription)")
    }

    @Test("every thread count gives the same bits", arguments: cases)
    func threadCounts(_ c: DenseCase) throws {
        let (q, k, v) = try c.inputs()
        let attention = DenseAttention(causal: c.causal)
        let one = try attention.attend(query: q, key: k, value: v, keyLengths: c.keyLengths, threads: 1)
        #expect(!one.output.elements.contains { $0.isNaN })
        for threads in [2, 3, 7, nil] as [Int?] {
            let other = try attention.attend(query: q, key: k, value: v, keyLengths: c.keyLengths, threads: threads)
            expectBitwiseEqual(one, other, "threads 1 vs \(threads.map(String.init) ?? "nil"), \(c.testDescription)")
        }
    }
}

@Suite("DenseAttention numerics")
struct DenseNumericsTests {
    /// Scales `q` so that the largest |q·k| over the problem is `target` (scale 1).
    static func queryScaled(_ q: Tensor, _ k: Tensor, kvGroup: Int, to target: Double) throws -> Tensor {
        var largest = 0.0
        let (nb, nh, nq, d) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3])
        for b in 0..<nb { for h in 0..<nh { for i in 0..<nq { for j in 0..<k.shape[2] {
            var dot = 0.0
            for c in 0..<d { dot += Double(q[b, h, i, c]) * Double(k[b, h / kvGroup, j, c]) }
            largest = max(largest, abs(dot))
        } } } }
        let factor = Float(target / largest)
        return try Tensor(shape: q.shape, data: q.elements.map { $0 * factor })
    }

    /// Logits up to ±1e4 (scale 1): finite and matching the reference.
    @Test("logits of magnitude 1e4", arguments: [(false, 16), (true, 16), (false, 128), (true, 77)])
    func largeLogits(causal: Bool, headDim: Int) throws {
        let (q0, k, v) = try randomQKV(batch: 2, heads: 2, kvHeads: 1, queryLength: 70, keyLength: 90,
                                       headDim: headDim, seed: 1400 + UInt64(headDim))
        let q = try Self.queryScaled(q0, k, kvGroup: 2, to: 1e4)
        let visible = Visible.dense(causal: causal, queryLength: 70, keyLength: 90, keyLengths: [90, 50])
        let result = try checkAgainstReference(DenseAttention(causal: causal, scale: 1), query: q, key: k, value: v,
                                               keyLengths: [90, 50], scale: 1, visible: visible,
                                               "logits up to 1e4, D \(headDim)")
        #expect(result.output.elements.allSatisfy { $0.isFinite })
        #expect(result.logSumExp.elements.allSatisfy { $0.isFinite })
        #expect(result.logSumExp.elements.contains { $0 > 1000 }, "the test should reach large logits")
    }

    /// Every logit large and of one sign: all negative (around -1e4, the sum of
    /// exponentials must not underflow to 0) and all positive (must not overflow).
    @Test("logits all near -1e4 or all near +1e4", arguments: [Float(-1), 1])
    func oneSignedLogits(sign: Float) throws {
        let q = try randomTensor([1, 2, 40, 1], seed: 1410, in: 50...100)
        let k = try Tensor(shape: [1, 2, 64, 1], data: randomTensor([1, 2, 64, 1], seed: 1411, in: 50...100)
            .elements.map { $0 * sign })
        let v = try randomTensor([1, 2, 64, 8], seed: 1412)
        for causal in [false, true] {
            let visible = Visible.dense(causal: causal, queryLength: 40, keyLength: 64, keyLengths: nil)
            let result = try checkAgainstReference(DenseAttention(causal: causal, scale: 1), query: q, key: k,
                                                   value: v, scale: 1, visible: visible, "logits of sign \(sign)")
            #expect(result.output.elements.allSatisfy { $0.isFinite })
            #expect(result.logSumExp.elements.allSatisfy { $0.isFinite && abs($0) > 2000 },
                    "lse should be finite and of the logits' magnitude")
        }
    }

    /// Scores that rise (or fall) steadily along the keys, so the running maximum of an
    /// online softmax changes in every key tile (or never after the first).
    @Test("monotone scores", arguments: [Float(1), -1])
    func monotoneScores(direction: Float) throws {
        let nk = 500
        let q = try Tensor(shape: [1, 1, 30, 1], data: (0..<30).map { 0.5 + Float($0) / 30 })
        let k = try Tensor(shape: [1, 1, nk, 1], data: (0..<nk).map { direction * 60 * Float($0) / Float(nk) })
        let v = try randomTensor([1, 1, nk, 5], seed: 1440)
        for causal in [false, true] {
            try checkAgainstReference(DenseAttention(causal: causal, scale: 1), query: q, key: k, value: v, scale: 1,
                                      visible: Visible.dense(causal: causal, queryLength: 30, keyLength: nk,
                                                             keyLengths: nil),
                                      "monotone scores \(direction), causal \(causal)")
        }
    }

    /// Equal scores: the output is the mean of the visible values and lse = log(count).
    @Test("uniform attention")
    func uniform() throws {
        let q = try Tensor(shape: [1, 1, 5, 8], repeating: 0)
        let k = try randomTensor([1, 1, 9, 8], seed: 1420)
        let v = try randomTensor([1, 1, 9, 3], seed: 1421)
        let result = try DenseAttention(causal: true).attend(query: q, key: k, value: v)
        for i in 0..<5 {
            let count = i + 4 + 1   // keys 0 ... i + 4
            #expect(abs(Double(result.logSumExp[0, 0, i, 0]) - Foundation.log(Double(count))) < 1e-6)
            for c in 0..<3 {
                let mean = (0..<count).map { Double(v[0, 0, $0, c]) }.reduce(0, +) / Double(count)
                #expect(abs(Double(result.output[0, 0, i, c]) - mean) < 1e-6, "row \(i) column \(c)")
            }
        }
    }

    /// Rows that see no key are exactly 0 with lse -infinity; the others are finite.
    @Test("rows with no visible key")
    func emptyRows() throws {
        // Batch item 0 has no keys at all; item 1 has 5 keys. Causal with Nq = 10 > Nk = 8:
        // query i sees keys j <= i - 2, so rows 0 and 1 see nothing in either item.
        let (q, k, v) = try randomQKV(batch: 2, heads: 2, queryLength: 10, keyLength: 8, headDim: 4, valueDim: 6,
                                      seed: 1430)
        for causal in [false, true] {
            let result = try DenseAttention(causal: causal).attend(query: q, key: k, value: v, keyLengths: [0, 5])
            for h in 0..<2 { for i in 0..<10 {
                for b in 0..<2 {
                    let empty = b == 0 || (causal && i < 2)
                    let lse = result.logSumExp[b, h, i, 0]
                    if empty {
                        #expect(lse == -.infinity, "causal \(causal) b \(b) h \(h) i \(i): lse \(lse)")
                        for c in 0..<6 {
                            #expect(result.output[b, h, i, c] == 0, "causal \(causal) b \(b) h \(h) i \(i) c \(c)")
                        }
                    } else {
                        #expect(lse.isFinite, "causal \(causal) b \(b) h \(h) i \(i): lse \(lse)")
                    }
                }
            } }
        }
        // Causal with Nq > Nk and no key padding.
        let (q2, k2, v2) = try randomQKV(heads: 1, queryLength: 300, keyLength: 17, headDim: 8, seed: 1431)
        let result = try DenseAttention(causal: true).attend(query: q2, key: k2, value: v2)
        let lse = result.logSumExp.elements
        #expect(lse[..<283].allSatisfy { $0 == -.infinity }, "rows 0..<283 see no key")
        #expect(lse[283...].allSatisfy { $0.isFinite }, "rows 283... see at least one key")
        #expect(result.output.elements[..<(283 * 8)].allSatisfy { $0 == 0 })
    }
}

/// Decode-shaped calls (fewer queries than 16) run on the decode kernel: against the
/// reference on awkward shapes (groups of 1 to 8 heads, key lengths past one chunk, key
/// padding with empty items, causal rows before the first key), the same bits for every
/// thread count and for strided, NaN-padded views of any column stride (the fuzzer found
/// that choosing the kernel by the views' strides broke that).
@Suite("Dense and multi-query attention on the decode kernel")
struct DenseDecodeRouteTests {
    static let cases: [DenseCase] = numberingSeeds([
        DenseCase(heads: 8, kvHeads: 2, queryLength: 1, keyLength: 77, headDim: 65),
        DenseCase(heads: 8, kvHeads: 2, queryLength: 3, keyLength: 5000, headDim: 64, causal: true),
        DenseCase(heads: 4, kvHeads: 4, queryLength: 1, keyLength: 1000, headDim: 128),
        DenseCase(batch: 3, heads: 2, kvHeads: 1, queryLength: 15, keyLength: 300, headDim: 3, valueDim: 17,
                  causal: true, keyLengths: [300, 0, 9]),
        DenseCase(heads: 1, kvHeads: 1, queryLength: 7, keyLength: 1, headDim: 1),
        DenseCase(heads: 32, kvHeads: 8, queryLength: 1, keyLength: 4100, headDim: 128),
    ], base: 7100)

    @Test("against the reference", arguments: cases)
    func reference(_ c: DenseCase) throws {
        try c.check(DenseAttention(causal: c.causal))
        try c.check(MultiQueryAttention(causal: c.causal))
    }

    @Test("every thread count and strided views give the same bits", arguments: cases)
    func invariance(_ c: DenseCase) throws {
        let (q, k, v) = try c.inputs()
        let attention = DenseAttention(causal: c.causal)
        let one = try attention.attend(query: q, key: k, value: v, keyLengths: c.keyLengths, threads: 1)
        for threads in [2, 3, 7] {
            expectBitwiseEqual(try attention.attend(query: q, key: k, value: v, keyLengths: c.keyLengths, threads: threads),
                               one, "\(c.testDescription) threads \(threads)")
        }
        // Query elements two apart, key and value rows padded (unit column stride: still the decode kernel).
        let strided = try attention.attend(query: embeddedInNaN(q, innerStride: 2), key: embeddedInNaN(k, innerStride: 1),
                                           value: embeddedInNaN(v, innerStride: 1), keyLengths: c.keyLengths, threads: 2)
        expectBitwiseEqual(strided, one, "\(c.testDescription) strided views")
        // Keys and values with elements two and three apart: the same kernel, the same bits.
        let spread = try attention.attend(query: q, key: embeddedInNaN(k, innerStride: 2),
                                          value: embeddedInNaN(v, innerStride: 3), keyLengths: c.keyLengths, threads: 2)
        expectBitwiseEqual(spread, one, "\(c.testDescription) keys and values with column strides 2 and 3")
    }
}
