// Tensor, AttentionShape, AttentionCost, AttentionResult merging, SeededGenerator and
// VectorMath.exp.

@_spi(Testing) @_spi(Benchmarking) import EfficientAttention
import Foundation
import Testing

@Suite("Tensor")
struct TensorTests {
    @Test("contiguous tensors: shape, strides, count, fill")
    func contiguous() throws {
        let t = try Tensor(shape: [2, 3, 4, 5], repeating: 1.5)
        #expect(t.shape == [2, 3, 4, 5])
        #expect(t.strides == [60, 20, 5, 1])
        #expect(t.offset == 0)
        #expect(t.count == 120)
        #expect(t.isContiguous)
        #expect(t.elements == [Float](repeating: 1.5, count: 120))
        let zero = try Tensor(shape: [1, 2, 3, 4])
        #expect(zero.elements == [Float](repeating: 0, count: 24))
    }

    @Test("elements are in row-major order; subscripts address offset + Σ index·stride")
    func rowMajorOrder() throws {
        let data = (0..<120).map(Float.init)
        var t = try Tensor(shape: [2, 3, 4, 5], data: data)
        #expect(t.elements == data)
        for a in 0..<2 { for b in 0..<3 { for c in 0..<4 { for d in 0..<5 {
            #expect(t[a, b, c, d] == Float(a * 60 + b * 20 + c * 5 + d))
        } } } }
        t[1, 2, 3, 4] = -7
        #expect(t.elements.last == -7)
        #expect(t.storage[119] == -7)
        t[0, 1, 0, 2] = 99
        #expect(t.elements[22] == 99)
    }

    @Test("strided tensors: elements follow the strides and offset")
    func stridedElements() throws {
        let storage = (0..<200).map(Float.init)
        // A "transposed" layout: the last axis has the largest stride.
        let shape = [2, 2, 3, 4], strides = [3, 6, 1, 12], offset = 5
        let t = try Tensor(shape: shape, storage: storage, strides: strides, offset: offset)
        #expect(!t.isContiguous)
        var expected: [Float] = []
        for a in 0..<2 { for b in 0..<2 { for c in 0..<3 { for d in 0..<4 {
            expected.append(Float(offset + a * 3 + b * 6 + c * 1 + d * 12))
        } } } }
        #expect(t.elements == expected)
        #expect(t[1, 1, 2, 3] == Float(5 + 3 + 6 + 2 + 36))
        // Stride 0 broadcasts.
        let b = try Tensor(shape: [1, 3, 2, 2], storage: [1, 2, 3, 4], strides: [0, 0, 2, 1])
        #expect(b.elements == [1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4])
        // A contiguous-strided tensor at offset 0 whose storage is exactly its elements.
        let c = try Tensor(shape: [1, 1, 2, 3], storage: [1, 2, 3, 4, 5, 6], strides: [6, 6, 3, 1])
        #expect(c.isContiguous && c.elements == [1, 2, 3, 4, 5, 6])
        // Contiguous strides with an offset: the elements start at the offset.
        let d = try Tensor(shape: [1, 1, 2, 3], storage: (0..<10).map(Float.init), strides: [6, 6, 3, 1], offset: 2)
        #expect(d.elements == [2, 3, 4, 5, 6, 7])
    }

    @Test("strided init checks that every addressed element is in storage")
    func stridedBounds() throws {
        let shape = [2, 3, 4, 5], strides = [100, 30, 7, 1], offset = 3
        let last = offset + 100 + 2 * 30 + 3 * 7 + 4   // 188
        let fits = try Tensor(shape: shape, storage: [Float](repeating: 0, count: last + 1), strides: strides,
                              offset: offset)
        #expect(fits.count == 120)
        expectAttentionError(.shapeMismatch, mentioning: ["storage", "\(last)"], "one element short") {
            try Tensor(shape: shape, storage: [Float](repeating: 0, count: last), strides: strides, offset: offset)
        }
        expectAttentionError(.shapeMismatch, mentioning: ["storage"], "offset past the end") {
            try Tensor(shape: [1, 1, 1, 1], storage: [1, 2], strides: [1, 1, 1, 1], offset: 2)
        }
        expectAttentionError(.shapeMismatch, mentioning: ["storage"], "empty storage") {
            try Tensor(shape: [1, 1, 1, 1], storage: [], strides: [1, 1, 1, 1])
        }
        expectAttentionError(.invalidParameter, mentioning: ["strides"], "negative stride") {
            try Tensor(shape: [1, 1, 2, 2], storage: [Float](repeating: 0, count: 10), strides: [4, 4, -2, 1],
                       offset: 4)
        }
        expectAttentionError(.invalidParameter, mentioning: ["offset"], "negative offset") {
            try Tensor(shape: [1, 1, 2, 2], storage: [Float](repeating: 0, count: 10), strides: [4, 4, 2, 1],
                       offset: -1)
        }
        expectAttentionError(.invalidShape, mentioning: ["strides"], "three strides") {
            try Tensor(shape: [1, 1, 2, 2], storage: [Float](repeating: 0, count: 10), strides: [4, 2, 1])
        }
        expectAttentionError(.sizeOverflow, mentioning: ["overflow"], "stride overflow") {
            try Tensor(shape: [1, 1, 3, 2], storage: [1, 2, 3, 4, 5, 6], strides: [1, 1, Int.max / 2 + 1, 1])
        }
    }

    @Test("rank other than 4 and negative extents throw invalidShape")
    func badShapes() throws {
        for shape in [[], [4], [2, 3], [1, 2, 3], [1, 1, 1, 1, 1]] {
            expectAttentionError(.invalidShape, mentioning: ["4 dimensions", "\(shape.count)"], "rank \(shape.count)") {
                try Tensor(shape: shape)
            }
            expectAttentionError(.invalidShape, mentioning: ["4 dimensions"], "rank \(shape.count), data") {
                try Tensor(shape: shape, data: [])
            }
            expectAttentionError(.invalidShape, mentioning: ["4 dimensions"], "rank \(shape.count), strided") {
                try Tensor(shape: shape, storage: [1, 2, 3], strides: [1, 1, 1, 1])
            }
            expectAttentionError(.invalidShape, mentioning: ["4 dimensions"], "rank \(shape.count), random") {
                try Tensor.random(shape: shape, seed: 1)
            }
        }
        for shape in [[-1, 1, 1, 1], [1, -2, 1, 1], [1, 1, -3, 1], [1, 1, 1, -1]] {
            expectAttentionError(.invalidShape, mentioning: ["non-negative", "\(shape)"], "extents \(shape)") {
                try Tensor(shape: shape)
            }
            expectAttentionError(.invalidShape, mentioning: ["non-negative"], "extents \(shape), strided") {
                try Tensor(shape: shape, storage: [1], strides: [0, 0, 0, 0])
            }
        }
        expectAttentionError(.sizeOverflow, mentioning: ["elements"], "too many elements") {
            try Tensor(shape: [Int.max, 2, 1, 1])
        }
        expectAttentionError(.sizeOverflow, mentioning: ["elements"], "too many bytes") {
            try Tensor(shape: [1 << 62, 1, 1, 1])
        }
    }

    @Test("zero extents are allowed for tensors")
    func zeroExtents() throws {
        let t = try Tensor(shape: [0, 3, 4, 5])
        #expect(t.count == 0 && t.elements.isEmpty)
        let s = try Tensor(shape: [2, 3, 0, 5], storage: [], strides: [15, 5, 5, 1])
        #expect(s.count == 0 && s.elements.isEmpty)
    }

    @Test("Tensor(shape:data:) needs exactly the element count")
    func dataCount() throws {
        for count in [0, 23, 25, 48] {
            expectAttentionError(.shapeMismatch, mentioning: ["24", "\(count)"], "data count \(count)") {
                try Tensor(shape: [1, 2, 3, 4], data: [Float](repeating: 1, count: count))
            }
        }
        #expect(try Tensor(shape: [1, 2, 3, 4], data: [Float](repeating: 1, count: 24)).count == 24)
    }

    @Test("Tensor.random: seeded, in range, row-major")
    func random() throws {
        let a = try Tensor.random(shape: [2, 3, 5, 7], seed: 42)
        let b = try Tensor.random(shape: [2, 3, 5, 7], seed: 42)
        let c = try Tensor.random(shape: [2, 3, 5, 7], seed: 43)
        #expect(a == b)
        #expect(a.elements == b.elements)
        #expect(a.elements != c.elements)
        #expect(a.shape == [2, 3, 5, 7] && a.isContiguous)
        #expect(a.elements.allSatisfy { (-1...1).contains($0) })
        #expect(Set(a.elements).count > 200, "values should vary")
        let r = try Tensor.random(shape: [1, 1, 100, 10], seed: 7, in: 3...5)
        #expect(r.elements.allSatisfy { (3...5).contains($0) })
        #expect(r.elements.min()! < 3.1 && r.elements.max()! > 4.9)
        // The values are the generator's stream in row-major order.
        var rng = SeededGenerator(seed: 42)
        #expect(a.elements == (0..<a.count).map { _ in rng.nextFloat(in: -1...1) })
    }
}

@Suite("AttentionShape and cost")
struct ShapeTests {
    @Test("defaults, group size, description")
    func defaults() {
        let s = AttentionShape(heads: 8, queryLength: 100, headDim: 64)
        #expect(s.batch == 1 && s.kvHeads == 8 && s.keyLength == 100 && s.valueDim == 64 && s.groupSize == 1)
        let g = AttentionShape(batch: 2, heads: 8, kvHeads: 2, queryLength: 10, keyLength: 30, headDim: 16,
                               valueDim: 4)
        #expect(g.groupSize == 4)
        #expect(g.description == "B=2 H=8 Hkv=2 Nq=10 Nk=30 D=16 Dv=4")
        #expect(g != s && g == AttentionShape(batch: 2, heads: 8, kvHeads: 2, queryLength: 10, keyLength: 30,
                                              headDim: 16, valueDim: 4))
    }

    @Test("the shape of query, key and value")
    func fromTensors() throws {
        let (q, k, v) = try randomQKV(batch: 3, heads: 6, kvHeads: 2, queryLength: 5, keyLength: 9, headDim: 4,
                                      valueDim: 7, seed: 1)
        let s = try AttentionShape(query: q, key: k, value: v)
        #expect(s == AttentionShape(batch: 3, heads: 6, kvHeads: 2, queryLength: 5, keyLength: 9, headDim: 4,
                                    valueDim: 7))
        #expect(s.groupSize == 3)
    }

    @Test("check() refuses zero sizes, indivisible heads and overflowing sizes")
    func check() throws {
        try AttentionShape(heads: 1, queryLength: 1, headDim: 1).check()
        let fields: [(String, AttentionShape)] = [
            ("batch", AttentionShape(batch: 0, heads: 2, queryLength: 3, headDim: 4)),
            ("heads", AttentionShape(heads: 0, kvHeads: 1, queryLength: 3, headDim: 4)),
            ("kvHeads", AttentionShape(heads: 2, kvHeads: 0, queryLength: 3, headDim: 4)),
            ("queryLength", AttentionShape(heads: 2, queryLength: 0, keyLength: 3, headDim: 4)),
            ("keyLength", AttentionShape(heads: 2, queryLength: 3, keyLength: 0, headDim: 4)),
            ("headDim", AttentionShape(heads: 2, queryLength: 3, headDim: 0, valueDim: 4)),
            ("valueDim", AttentionShape(heads: 2, queryLength: 3, headDim: 4, valueDim: 0)),
            ("batch", AttentionShape(batch: -1, heads: 2, queryLength: 3, headDim: 4)),
        ]
        for (name, shape) in fields {
            expectAttentionError(.invalidShape, mentioning: [name, "at least 1"], "\(shape)") { try shape.check() }
        }
        expectAttentionError(.invalidShape, mentioning: ["heads", "kvHeads", "multiple"], "H 6 Hkv 4") {
            try AttentionShape(heads: 6, kvHeads: 4, queryLength: 3, headDim: 4).check()
        }
        expectAttentionError(.invalidShape, mentioning: ["multiple"], "H 2 Hkv 4") {
            try AttentionShape(heads: 2, kvHeads: 4, queryLength: 3, headDim: 4).check()
        }
        expectAttentionError(.sizeOverflow, mentioning: ["query"], "query overflow") {
            try AttentionShape(batch: 1 << 40, heads: 1 << 20, queryLength: 1 << 10, keyLength: 1,
                               headDim: 1, valueDim: 1).check()
        }
        expectAttentionError(.sizeOverflow, mentioning: ["score matrix"], "score overflow") {
            try AttentionShape(batch: 1, heads: 1, queryLength: 1 << 32, keyLength: 1 << 32, headDim: 1).check()
        }
    }

    @Test("cost counts visible pairs and 2·pairs·(D + Dv) FLOPs")
    func cost() throws {
        for attention in [DenseAttention(), VanillaAttention()] as [any Attention] {
            let shape = AttentionShape(batch: 2, heads: 4, kvHeads: 2, queryLength: 10, headDim: 16, valueDim: 8)
            let c = try attention.cost(shape)
            #expect(c.scoredPairs == 800, "\(attention.name)")
            #expect(c.flops == 2 * 800 * 24, "\(attention.name)")
            #expect(c.workspaceBytes >= 0)
        }
        let causalCases: [(nq: Int, nk: Int, perHead: Int)] = [(10, 10, 55), (10, 4, 10), (4, 10, 34), (1, 7, 7),
                                                                (7, 1, 1), (1, 1, 1)]
        for (nq, nk, perHead) in causalCases {
            let shape = AttentionShape(batch: 3, heads: 2, queryLength: nq, keyLength: nk, headDim: 5, valueDim: 3)
            for attention in [DenseAttention(causal: true), VanillaAttention(causal: true)] as [any Attention] {
                let c = try attention.cost(shape)
                #expect(c.scoredPairs == 6 * perHead, "\(attention.name) causal Nq \(nq) Nk \(nk)")
                #expect(c.flops == Double(2 * 6 * perHead * 8), "\(attention.name) causal Nq \(nq) Nk \(nk)")
            }
        }
        #expect(DenseAttention().name == "dense")
        #expect(VanillaAttention().name == "vanilla")
    }

    @Test("AttentionError messages and descriptions")
    func errorDescriptions() {
        let cases: [(AttentionError, String)] = [
            (.shapeMismatch("a"), "shape mismatch: a"), (.invalidShape("b"), "invalid shape: b"),
            (.invalidParameter("c"), "invalid parameter: c"), (.unsupported("d"), "unsupported: d"),
            (.sizeOverflow("e"), "size overflow: e"),
        ]
        for (error, description) in cases {
            #expect(error.description == description)
            #expect(error.message == String(description.last!))
        }
    }
}

@Suite("AttentionResult merging")
struct MergeTests {
    /// Merges the two halves of a problem (keys 0..<split by key padding on the whole
    /// tensors, keys split..<Nk as a window view) computed by DenseAttention, and checks
    /// the merge against the reference of the whole problem.
    @Test("dense halves merge to the whole", arguments: [(false, 29), (true, 29), (false, 1), (true, 69), (true, 45)])
    func denseHalves(causal: Bool, split: Int) throws {
        let (b, h, hkv, nq, nk, d, dv) = (2, 4, 2, 60, 70, 16, 8)
        let (q, k, v) = try randomQKV(batch: b, heads: h, kvHeads: hkv, queryLength: nq, keyLength: nk, headDim: d,
                                      valueDim: dv, seed: 3000 + UInt64(split))
        let attention = DenseAttention(causal: causal)
        let first = try attention.attend(query: q, key: k, value: v, keyLengths: [split, split])
        func window(_ t: Tensor) throws -> Tensor {
            try Tensor(shape: [b, hkv, nk - split, t.shape[3]], storage: t.storage, strides: t.strides,
                       offset: split * t.strides[2])
        }
        // Bottom-right causal alignment is preserved when keys are cut from the left.
        let second = try attention.attend(query: q, key: window(k), value: window(v))
        let merged = try first.merged(with: second)
        let visible = Visible.dense(causal: causal, queryLength: nq, keyLength: nk, keyLengths: nil)
        let reference = referenceAttention(query: q, key: k, value: v, scale: defaultScale(headDim: d),
                                           visible: visible)
        let naive = naiveFloatAttention(query: q, key: k, value: v, scale: 1 / Float(d).squareRoot(), visible: visible)
        checkAttention(merged, reference: reference, naive: naive, "merged halves, causal \(causal), split \(split)")
        let whole = try attention.attend(query: q, key: k, value: v)
        let worst = zip(merged.output.elements, whole.output.elements).map { abs($0 - $1) }.max()!
        #expect(worst < 1e-5, "merged vs whole: \(worst)")
        // The merge is symmetric up to rounding.
        let swapped = try second.merged(with: first)
        let asymmetry = zip(merged.output.elements, swapped.output.elements).map { abs($0 - $1) }.max()!
        #expect(asymmetry < 1e-6)
        let lseAsymmetry = zip(merged.logSumExp.elements, swapped.logSumExp.elements).map { abs($0 - $1) }.max()!
        #expect(lseAsymmetry < 1e-5)
    }

    /// Reference halves (rounded to Float) merge to the reference whole within a few ulp.
    @Test("reference halves merge to the whole")
    func referenceHalves() throws {
        let (q, k, v) = try randomQKV(batch: 1, heads: 3, queryLength: 40, keyLength: 50, headDim: 12, valueDim: 6,
                                      seed: 3100)
        let scale = defaultScale(headDim: 12)
        let causal = Visible.causal(queryLength: 40, keyLength: 50)
        let whole = referenceAttention(query: q, key: k, value: v, scale: scale, visible: causal)
        // Interleaved key sets: even and odd keys.
        let even = referenceAttention(query: q, key: k, value: v, scale: scale,
                                      visible: Visible.both(causal, { _, _, _, j in j % 2 == 0 }))
        let odd = referenceAttention(query: q, key: k, value: v, scale: scale,
                                     visible: Visible.both(causal, { _, _, _, j in j % 2 == 1 }))
        let merged = try attentionResult(even).merged(with: attentionResult(odd))
        let errors = attentionErrors(output: merged.output.elements, lse: merged.logSumExp.elements, reference: whole)
        #expect(errors.output < 1e-6, "\(errors)")
        #expect(errors.lse < 1e-6 * (1 + errors.lseScale), "\(errors)")
        // Three-way: keys below 10, 10..<30 and from 30, where row 0 sees keys 0...10 only.
        let parts = [0..<10, 10..<30, 30..<50].map { range in
            referenceAttention(query: q, key: k, value: v, scale: scale, visible: Visible.both(causal, Visible.keys(in: range)))
        }
        #expect(parts[2].lse[0] == -.infinity)
        let three = try attentionResult(parts[0]).merged(with: attentionResult(parts[1]))
            .merged(with: attentionResult(parts[2]))
        let e3 = attentionErrors(output: three.output.elements, lse: three.logSumExp.elements, reference: whole)
        #expect(e3.output < 1e-6 && e3.lse < 1e-6 * (1 + e3.lseScale), "\(e3)")
    }

    @Test("a row with no keys on one side takes the other side unchanged")
    func emptySide() throws {
        let a = try AttentionResult(
            output: Tensor(shape: [1, 1, 3, 3], data: [1, 2, 3, 0.1, 0.2, 0.3, 0, 0, 0]),
            logSumExp: Tensor(shape: [1, 1, 3, 1], data: [0.5, -.infinity, -.infinity]))
        let b = try AttentionResult(
            output: Tensor(shape: [1, 1, 3, 3], data: [0, 0, 0, -4, 5.5, 1e-3, 0, 0, 0]),
            logSumExp: Tensor(shape: [1, 1, 3, 1], data: [-.infinity, 37.25, -.infinity]))
        for merged in [try a.merged(with: b), try b.merged(with: a)] {
            #expect(merged.output.elements == [1, 2, 3, -4, 5.5, 1e-3, 0, 0, 0])
            #expect(merged.logSumExp.elements == [0.5, 37.25, -.infinity])
        }
    }

    @Test("merging two finite rows weights them by exp(lse)")
    func weights() throws {
        let a = try AttentionResult(output: Tensor(shape: [1, 1, 1, 2], data: [1, 0]),
                                    logSumExp: Tensor(shape: [1, 1, 1, 1], data: [Float(Foundation.log(2.0))]))
        let b = try AttentionResult(output: Tensor(shape: [1, 1, 1, 2], data: [0, 1]),
                                    logSumExp: Tensor(shape: [1, 1, 1, 1], data: [Float(Foundation.log(6.0))]))
        let m = try a.merged(with: b)
        #expect(abs(m.logSumExp[0, 0, 0, 0] - Float(Foundation.log(8.0))) < 1e-6)
        #expect(abs(m.output[0, 0, 0, 0] - 0.25) < 1e-6 && abs(m.output[0, 0, 0, 1] - 0.75) < 1e-6)
        // Far-apart lse values (1e4 apart) do not overflow.
        let far = try AttentionResult(output: Tensor(shape: [1, 1, 1, 2], data: [3, 3]),
                                      logSumExp: Tensor(shape: [1, 1, 1, 1], data: [1e4]))
        let m2 = try a.merged(with: far)
        #expect(m2.output.elements == [3, 3] && m2.logSumExp[0, 0, 0, 0] == 1e4)
    }

    @Test("shapes that do not fit are refused")
    func mismatch() throws {
        let a = try AttentionResult(output: Tensor(shape: [1, 2, 3, 4]), logSumExp: Tensor(shape: [1, 2, 3, 1]))
        let b = try AttentionResult(output: Tensor(shape: [1, 2, 3, 5]), logSumExp: Tensor(shape: [1, 2, 3, 1]))
        expectAttentionError(.shapeMismatch, mentioning: ["merge"], "merge shapes") { try a.merged(with: b) }
        expectAttentionError(.shapeMismatch, mentioning: ["logSumExp"], "lse rows") {
            try AttentionResult(output: Tensor(shape: [1, 2, 3, 4]), logSumExp: Tensor(shape: [1, 2, 4, 1]))
        }
        expectAttentionError(.shapeMismatch, mentioning: ["logSumExp"], "lse last dimension") {
            try AttentionResult(output: Tensor(shape: [1, 2, 3, 4]), logSumExp: Tensor(shape: [1, 2, 3, 4]))
        }
    }
}

@Suite("SeededGenerator")
struct GeneratorTests {
    /// xoshiro256** seeded by SplitMix64, written out independently.
    struct Xoshiro {
        var s: [UInt64]
        init(seed: UInt64) {
            var x = seed
            s = (0..<4).map { _ in
                x = x &+ 0x9E37_79B9_7F4A_7C15
                var z = x
                z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
                z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
                return z ^ (z >> 31)
            }
        }
        static func rotl(_ x: UInt64, _ k: UInt64) -> UInt64 { (x << k) | (x >> (64 - k)) }
        mutating func next() -> UInt64 {
            let result = Self.rotl(s[1] &* 5, 7) &* 9
            let t = s[1] << 17
            s[2] ^= s[0]; s[3] ^= s[1]; s[1] ^= s[2]; s[0] ^= s[3]
            s[2] ^= t
            s[3] = Self.rotl(s[3], 45)
            return result
        }
    }

    @Test("same seed, same stream; different seeds, different streams")
    func determinism() {
        for seed: UInt64 in [0, 1, 42, .max] {
            var a = SeededGenerator(seed: seed), b = SeededGenerator(seed: seed)
            let sa = (0..<1000).map { _ in a.next() }, sb = (0..<1000).map { _ in b.next() }
            #expect(sa == sb, "seed \(seed)")
            #expect(Set(sa).count == 1000, "seed \(seed): a stream should not repeat early")
        }
        let streams = [0, 1, 2, 3, 1 << 32, .max].map { (seed: UInt64) -> [UInt64] in
            var g = SeededGenerator(seed: seed)
            return (0..<8).map { _ in g.next() }
        }
        for i in streams.indices { for j in streams.indices where i < j {
            #expect(zip(streams[i], streams[j]).allSatisfy { $0 != $1 }, "streams \(i) and \(j) share values")
        } }
    }

    @Test("the stream is xoshiro256** seeded by SplitMix64")
    func algorithm() {
        for seed: UInt64 in [0, 7, 0xDEAD_BEEF] {
            var g = SeededGenerator(seed: seed)
            var x = Xoshiro(seed: seed)
            #expect((0..<100).map { _ in g.next() } == (0..<100).map { _ in x.next() }, "seed \(seed)")
        }
        // SplitMix64's first output for seed 0 is the published 0xE220A8397B1DCDAF.
        #expect(Xoshiro(seed: 0).s[0] == 0xE220_A839_7B1D_CDAF)
    }

    @Test("uniform and Gaussian draws")
    func distributions() {
        var g = SeededGenerator(seed: 11)
        let units = (0..<20000).map { _ in g.nextUnitFloat() }
        #expect(units.allSatisfy { $0 >= 0 && $0 < 1 })
        let mean = units.reduce(0, +) / Float(units.count)
        #expect(abs(mean - 0.5) < 0.01, "mean \(mean)")
        let ranged = (0..<5000).map { _ in g.nextFloat(in: -3...(-2)) }
        #expect(ranged.allSatisfy { (-3...(-2)).contains($0) })
        let gauss = (0..<20000).map { _ in g.nextGaussian() }
        let gm = gauss.reduce(0, +) / Double(gauss.count)
        let gv = gauss.map { ($0 - gm) * ($0 - gm) }.reduce(0, +) / Double(gauss.count)
        #expect(abs(gm) < 0.03 && abs(gv - 1) < 0.05, "gaussian mean \(gm) variance \(gv)")
        #expect(gauss.allSatisfy { $0.isFinite })
        var h = SeededGenerator(seed: 11)
        #expect(h.nextUnitFloat() == units[0])
    }
}

@Suite("VectorMath.exp")
struct ExpTests {
    static let lower: Float = -86.6
    static let upper: Float = 88.72283

    /// Checks lanes of `x` against Foundation.exp: within 3e-7 relative error in the
    /// accurate range, 0 below it, +inf above it, NaN for NaN. Returns the worst relative error.
    static func check(_ x: SIMD16<Float>, _ e: SIMD16<Float>, worst: inout Double, failures: inout [String]) {
        for l in 0..<16 {
            let xi = x[l], ei = e[l]
            if xi.isNaN {
                if !ei.isNaN { failures.append("exp(nan) = \(ei)") }
            } else if xi < lower {
                if ei != 0 || ei.sign == .minus { failures.append("exp(\(xi)) = \(ei), expected 0") }
            } else if xi > upper {
                if ei != .infinity { failures.append("exp(\(xi)) = \(ei), expected inf") }
            } else {
                let reference = Foundation.exp(Double(xi))
                let error = abs(Double(ei) - reference) / reference
                worst = max(worst, error)
                if !(error < 3e-7) { failures.append("exp(\(xi)) = \(ei), reference \(reference), rel err \(error)") }
            }
        }
    }

    @Test("accuracy over the whole input range")
    func wholeRange() {
        var worst = 0.0
        var failures: [String] = []
        // -87 ... 88.73 in steps of about 6e-5 (about 2.9 million points), lanes spread.
        let step: Double = 6.103515625e-5
        var base = -87.0
        while base < 88.73 {
            let x = SIMD16<Float>((0..<16).map { Float(base + Double($0) * step / 16) })
            Self.check(x, VectorMath.exp(x), worst: &worst, failures: &failures)
            base += step
        }
        // Pseudo-random points with all mantissa bits.
        var rng = SeededGenerator(seed: 99)
        for _ in 0..<20000 {
            let x = SIMD16<Float>((0..<16).map { _ in rng.nextFloat(in: -87...88.8) })
            Self.check(x, VectorMath.exp(x), worst: &worst, failures: &failures)
        }
        // Tiny arguments, both signs, including subnormals and zeros.
        let tiny: [Float] = [0, -0, .leastNonzeroMagnitude, -.leastNonzeroMagnitude, .leastNormalMagnitude,
                             1e-30, -1e-30, 1e-10, -1e-10, 1e-7, -1e-7, 0x1p-24, -0x1p-24, 0x1p-25, 1e-3, -1e-3]
        Self.check(SIMD16(tiny), VectorMath.exp(SIMD16(tiny)), worst: &worst, failures: &failures)
        #expect(failures.isEmpty, "\(failures.count) failures, e.g. \(failures.prefix(5))")
        #expect(worst < 3e-7, "worst relative error \(worst)")
    }

    @Test("every Float near the boundaries of the accurate range")
    func boundaries() {
        var worst = 0.0
        var failures: [String] = []
        for start: Float in [-86.62, 88.71] {
            var x = start
            var lanes: [Float] = []
            for _ in 0..<(1 << 14) {
                lanes.append(x)
                x = x.nextUp
                if lanes.count == 16 {
                    Self.check(SIMD16(lanes), VectorMath.exp(SIMD16(lanes)), worst: &worst, failures: &failures)
                    lanes.removeAll()
                }
            }
            #expect(x > start + 0.02, "the walk should cross the boundary")
        }
        #expect(failures.isEmpty, "\(failures.count) failures, e.g. \(failures.prefix(5))")
        // The largest accurate input really is finite and the next Float overflows.
        #expect(Foundation.exp(Double(Self.upper)) <= Double(Float.greatestFiniteMagnitude))
        #expect(Foundation.exp(Double(Self.upper.nextUp)) > Double(Float.greatestFiniteMagnitude))
    }

    @Test("special values")
    func specials() {
        let x = SIMD16<Float>(-.infinity, .infinity, .nan, 0, -1e4, 1e4, 89, -87, -0.0, 88.73, -86.61,
                              -.greatestFiniteMagnitude, .greatestFiniteMagnitude, -104, -150, 1)
        let e = VectorMath.exp(x)
        #expect(e[0] == 0, "exp(-inf)")
        #expect(e[1] == .infinity, "exp(+inf)")
        #expect(e[2].isNaN, "exp(nan)")
        #expect(e[3] == 1, "exp(0) must be exactly 1")
        #expect(e[4] == 0, "exp(-1e4)")
        #expect(e[5] == .infinity, "exp(1e4)")
        #expect(e[6] == .infinity, "exp(89)")
        #expect(e[7] == 0, "exp(-87)")
        #expect(e[8] == 1, "exp(-0) must be exactly 1")
        #expect(e[9] == .infinity, "exp(88.73)")
        #expect(e[10] == 0, "exp(-86.61)")
        #expect(e[11] == 0 && e[12] == .infinity, "exp(±greatestFiniteMagnitude)")
        #expect(e[13] == 0 && e[14] == 0, "exp(-104), exp(-150)")
        #expect(abs(Double(e[15]) - M_E) / M_E < 3e-7, "exp(1) = \(e[15])")
        // NaN in one lane leaves the others alone.
        var mixed = SIMD16<Float>(repeating: 1)
        mixed[5] = .nan
        let m = VectorMath.exp(mixed)
        #expect(m[5].isNaN && (0..<16).filter { $0 != 5 }.allSatisfy { m[$0] == VectorMath.exp(SIMD16(repeating: 1))[0] })
    }

    @Test("the non-positive variant gives exp's bits for every x <= 0, -inf and NaN")
    func nonPositive() {
        func bits(_ v: SIMD16<Float>) -> SIMD16<UInt32> { unsafeBitCast(v, to: SIMD16<UInt32>.self) }
        // Every 997th Float from -0 down past the underflow limit (about 1.2 million values), then
        // the edges: -inf, NaN, -0, 0, the limit -86.6 and its neighbours.
        var pattern = (-Float(0)).bitPattern
        let end = Float(-120).bitPattern
        var checked = 0, mismatches: [Float] = []
        while pattern <= end {
            var x = SIMD16<Float>()
            for lane in 0..<16 { x[lane] = Float(bitPattern: min(pattern &+ UInt32(lane) &* 997, end)) }
            if bits(VectorMath.expNonPositive(x)) != bits(VectorMath.exp(x)) { mismatches.append(x[0]) }
            pattern &+= 16 * 997
            checked += 16
        }
        let edges = SIMD16<Float>(-.infinity, .nan, -0.0, 0, -86.6, Float(-86.6).nextUp, Float(-86.6).nextDown,
                                  -87, -1e-45, -1, -0.5, -88.72283, -1e30, -.greatestFiniteMagnitude, -2, -10)
        #expect(bits(VectorMath.expNonPositive(edges)) == bits(VectorMath.exp(edges)))
        #expect(checked > 200_000 && mismatches.isEmpty, "\(mismatches.count) mismatching blocks, e.g. \(mismatches.prefix(3))")
        // A planted difference is visible to this comparison: exp(1) is not exp(-1).
        #expect(bits(VectorMath.exp(SIMD16(repeating: 1))) != bits(VectorMath.exp(SIMD16(repeating: -1))))
    }

    @Test("both 16 x 16 register transposes give the scaled transpose, bit for bit")
    func registerTransposes() {
        var rng = SeededGenerator(seed: 16)
        var block = (0..<256).map { _ in rng.nextFloat(in: -4...4) }
        block[3] = .nan; block[17] = -.infinity; block[40] = -0.0; block[255] = .greatestFiniteMagnitude
        var scale = SIMD16<Float>()
        for r in 0..<16 { scale[r] = rng.nextFloat(in: 0.5...2) }
        scale[2] = 1
        var expected = [Float](repeating: 0, count: 256)
        for r in 0..<16 { for c in 0..<16 { expected[c * 16 + r] = scale[r] * block[r * 16 + c] } }
        for quadrants in [false, true] {
            let out = RegisterTranspose.transpose(block, scale: scale, quadrants: quadrants)
            #expect(out?.map(\.bitPattern) == expected.map(\.bitPattern), "quadrants: \(quadrants)")
        }
        // Not a 16 x 16 block: no transpose (and no trap).
        #expect(RegisterTranspose.transpose(Array(block.prefix(255)), scale: scale, quadrants: true) == nil)
        // A planted swap is visible: the block itself is not its transpose.
        #expect(block.map(\.bitPattern) != expected.map(\.bitPattern))
    }

    @Test("array overload: any count, same values as the SIMD overload", arguments: [0, 1, 5, 15, 16, 17, 37, 100])
    func arrayOverload(count: Int) {
        var rng = SeededGenerator(seed: UInt64(count) + 5)
        var values = (0..<count).map { _ in rng.nextFloat(in: -90...90) }
        if count > 3 { values[1] = .nan; values[2] = -.infinity; values[3] = 0 }
        let input = values
        VectorMath.exp(&values)
        #expect(values.count == count)
        for (i, x) in input.enumerated() {
            let lane = VectorMath.exp(SIMD16<Float>(repeating: x))[0]
            #expect(values[i].bitPattern == lane.bitPattern || (values[i].isNaN && lane.isNaN),
                    "element \(i): exp(\(x)) = \(values[i]), SIMD overload gives \(lane)")
            if x.isNaN { #expect(values[i].isNaN) }
            if x > Self.lower && x < Self.upper {
                let reference = Foundation.exp(Double(x))
                #expect(abs(Double(values[i]) - reference) / reference < 3e-7, "element \(i): exp(\(x))")
            }
        }
        if count > 3 { #expect(values[2] == 0 && values[3] == 1) }
    }
}
