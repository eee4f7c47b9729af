// The shared GEMM kernel (MatrixProduct, Kernels/Gemm.swift) against a naive Double
// product: awkward sizes around the micro-tile (MR = 8, NR = 32) and the block sizes
// (MC = 128, KC = 256, NC = 512), transposed operands, thread counts, bad arguments.

@_spi(Testing) @_spi(Benchmarking) import EfficientAttention
import Testing

struct GemmCase: Sendable, CustomTestStringConvertible {
    var m: Int, n: Int, depth: Int
    var transposeA = false, transposeB = false
    var testDescription: String {
        "\(m) x \(n) x \(depth)" + (transposeA ? " Aᵀ" : "") + (transposeB ? " Bᵀ" : "")
    }
}

/// `C = A B` in Double, plus `Σ_k |A_ik B_kj|` per element (the scale of the rounding error).
private func naiveProduct(_ a: [Float], _ b: [Float], _ c: GemmCase) -> (value: [Double], magnitude: [Double]) {
    var value = [Double](repeating: 0, count: c.m * c.n), magnitude = value
    for i in 0..<c.m { for j in 0..<c.n { for k in 0..<c.depth {
        let x = Double(c.transposeA ? a[k * c.m + i] : a[i * c.depth + k])
        let y = Double(c.transposeB ? b[j * c.depth + k] : b[k * c.n + j])
        value[i * c.n + j] += x * y
        magnitude[i * c.n + j] += abs(x * y)
    } } }
    return (value, magnitude)
}

@Suite("GEMM kernel")
struct GemmTests {
    static let cases: [GemmCase] = [
        GemmCase(m: 1, n: 1, depth: 1), GemmCase(m: 1, n: 1, depth: 300), GemmCase(m: 7, n: 31, depth: 5),
        GemmCase(m: 9, n: 33, depth: 1), GemmCase(m: 8, n: 32, depth: 8), GemmCase(m: 7, n: 33, depth: 17),
        GemmCase(m: 9, n: 31, depth: 64), GemmCase(m: 777, n: 199, depth: 37),
        GemmCase(m: 199, n: 777, depth: 3), GemmCase(m: 129, n: 513, depth: 257),
        GemmCase(m: 130, n: 65, depth: 513), GemmCase(m: 33, n: 40, depth: 300, transposeA: true),
        GemmCase(m: 33, n: 40, depth: 300, transposeB: true),
        GemmCase(m: 17, n: 95, depth: 70, transposeA: true, transposeB: true),
    ]

    @Test("matches a naive product", arguments: cases)
    func matchesNaive(_ c: GemmCase) throws {
        var rng = SeededGenerator(seed: UInt64(c.m * 1000 + c.n * 10 + c.depth))
        let a = (0..<c.m * c.depth).map { _ in rng.nextFloat(in: -1...1) }
        let b = (0..<c.depth * c.n).map { _ in rng.nextFloat(in: -1...1) }
        let product = try MatrixProduct.multiply(a, b, m: c.m, n: c.n, depth: c.depth,
                                                 transposeA: c.transposeA, transposeB: c.transposeB, threads: 2)
        #expect(product.count == c.m * c.n)
        let (reference, magnitude) = naiveProduct(a, b, c)
        // Float summation of `depth` products: |error| ≤ depth · 2^-24 · Σ|a b| (and far less in practice).
        var worst = 0.0, worstIndex = 0
        for i in reference.indices {
            let excess = abs(Double(product[i]) - reference[i]) / (Double(c.depth) * 0x1p-24 * magnitude[i] + 1e-30)
            if excess > worst { worst = excess; worstIndex = i }
        }
        #expect(worst <= 1, "\(c.testDescription): element \(worstIndex) off by \(worst)x the rounding bound: \(product[worstIndex]) vs \(reference[worstIndex])")
    }

    @Test("bitwise identical for 1, 2 and 3 threads")
    func threads() throws {
        var rng = SeededGenerator(seed: 9)
        let (m, n, depth) = (300, 600, 300)
        let a = (0..<m * depth).map { _ in rng.nextFloat(in: -1...1) }
        let b = (0..<depth * n).map { _ in rng.nextFloat(in: -1...1) }
        let one = try MatrixProduct.multiply(a, b, m: m, n: n, depth: depth, threads: 1)
        for threads in [2, 3] {
            let other = try MatrixProduct.multiply(a, b, m: m, n: n, depth: depth, threads: threads)
            #expect(bitwiseEqual(one, other), "threads \(threads): \(firstDifference(one, other))")
        }
    }

    @Test("every form of the micro-kernel's register tile gives the same bits, each element one chain over the depth",
          arguments: [0, 1, 3, 64, 65])
    func registerTileForms(depth: Int) throws {
        var rng = SeededGenerator(seed: UInt64(70 + depth))
        let a = (0..<8 * depth).map { _ in rng.nextFloat(in: -1...1) }
        let b = (0..<depth * 32).map { _ in rng.nextFloat(in: -1...1) }
        // The chain every form must reproduce: c ← c + a·b over k in order, fused under NativeCPU.
        var chain = [Float](repeating: 0, count: 8 * 32)
        for r in 0..<8 { for col in 0..<32 { for k in 0..<depth {
            let (x, y) = (a[r * depth + k], b[k * 32 + col])
            chain[r * 32 + col] = fusedMultiplyAddEnabled ? chain[r * 32 + col].addingProduct(x, y) : chain[r * 32 + col] + x * y
        } } }
        var leftHalf = chain
        for r in 0..<8 { for col in 16..<32 { leftHalf[r * 32 + col] = 0 } }
        for form in RegisterTileForms.Form.allCases {
            let out = try #require(RegisterTileForms.product(a: a, b: b, depth: depth, form: form))
            let expected = (form == .half || form == .halfQuarters) ? leftHalf : chain
            #expect(out.map(\.bitPattern) == expected.map(\.bitPattern), "\(form), depth \(depth): \(firstDifference(out, expected))")
        }
        // Sizes that do not fit give nil, not a trap.
        #expect(RegisterTileForms.product(a: Array(a.dropLast()), b: b, depth: depth + 1, form: .half) == nil)
        #expect(RegisterTileForms.product(a: a, b: b, depth: Int.max / 4 + depth, form: .whole) == nil)
        #expect(RegisterTileForms.product(a: a, b: b, depth: -1, form: .quarters) == nil)
        // A planted difference is visible: a tile with one input changed differs (depth > 0).
        if depth > 0 {
            var changed = a
            changed[0] += 1
            let out = try #require(RegisterTileForms.product(a: changed, b: b, depth: depth, form: .half))
            #expect(out.map(\.bitPattern) != leftHalf.map(\.bitPattern))
        }
    }

    @Test("empty sizes")
    func empty() throws {
        #expect(try MatrixProduct.multiply([], [], m: 3, n: 4, depth: 0) == [Float](repeating: 0, count: 12))
        #expect(try MatrixProduct.multiply([], [1, 2], m: 0, n: 2, depth: 1) == [])
    }

    @Test("bad arguments throw")
    func errors() {
        expectAttentionError(.shapeMismatch, mentioning: ["a has 5", "6"]) {
            try MatrixProduct.multiply([Float](repeating: 0, count: 5), [Float](repeating: 0, count: 6), m: 2, n: 2, depth: 3)
        }
        expectAttentionError(.shapeMismatch, mentioning: ["b has 5", "6"]) {
            try MatrixProduct.multiply([Float](repeating: 0, count: 6), [Float](repeating: 0, count: 5), m: 2, n: 2, depth: 3)
        }
        expectAttentionError(.invalidShape, mentioning: ["depth", "-1"]) {
            try MatrixProduct.multiply([], [], m: 2, n: 2, depth: -1)
        }
        expectAttentionError(.invalidParameter, mentioning: ["threads"]) {
            try MatrixProduct.multiply([1], [1], m: 1, n: 1, depth: 1, threads: 0)
        }
    }
}
