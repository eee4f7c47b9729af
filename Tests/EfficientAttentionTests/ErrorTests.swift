// Every bad input throws an AttentionError of the right case whose message names the
// problem; cost() throws what validate() throws.

import EfficientAttention
import Foundation
import Testing

/// The conformers under test, causal and not.
let errorTestConformers: [any Attention] = [DenseAttention(), DenseAttention(causal: true), VanillaAttention(),
                                      VanillaAttention(causal: true)]

/// Random tensors of the given shapes.
func randomTensors(_ q: [Int], _ k: [Int], _ v: [Int]) throws -> (Tensor, Tensor, Tensor) {
    (try Tensor.random(shape: q, seed: 1), try Tensor.random(shape: k, seed: 2), try Tensor.random(shape: v, seed: 3))
}

/// Something wrong with query, key and value, and what the error must say.
struct BadShape: Sendable, CustomTestStringConvertible {
    var q: [Int], k: [Int], v: [Int]
    var kind: AttentionErrorCase
    var mentions: [String]
    var testDescription: String { "q \(q) k \(k) v \(v)" }
}

@Suite("Errors")
struct ErrorTests {
    static let badShapes: [BadShape] = [
        // Mismatched batch.
        BadShape(q: [2, 2, 4, 8], k: [1, 2, 5, 8], v: [1, 2, 5, 8], kind: .shapeMismatch, mentions: ["batch"]),
        BadShape(q: [2, 2, 4, 8], k: [2, 2, 5, 8], v: [3, 2, 5, 8], kind: .shapeMismatch, mentions: ["batch"]),
        // Key and value heads differ.
        BadShape(q: [1, 4, 4, 8], k: [1, 2, 5, 8], v: [1, 4, 5, 8], kind: .shapeMismatch, mentions: ["heads"]),
        // Key and value lengths differ.
        BadShape(q: [1, 2, 4, 8], k: [1, 2, 5, 8], v: [1, 2, 6, 8], kind: .shapeMismatch, mentions: ["key length"]),
        // Query and key head dimensions differ.
        BadShape(q: [1, 2, 4, 8], k: [1, 2, 5, 7], v: [1, 2, 5, 8], kind: .shapeMismatch, mentions: ["head dimension"]),
        // Query heads not a multiple of key/value heads.
        BadShape(q: [1, 6, 4, 8], k: [1, 4, 5, 8], v: [1, 4, 5, 8], kind: .invalidShape, mentions: ["kvHeads", "multiple"]),
        BadShape(q: [1, 2, 4, 8], k: [1, 4, 5, 8], v: [1, 4, 5, 8], kind: .invalidShape, mentions: ["kvHeads", "multiple"]),
        BadShape(q: [1, 5, 4, 8], k: [1, 2, 5, 8], v: [1, 2, 5, 8], kind: .invalidShape, mentions: ["kvHeads", "multiple"]),
        // Zero sizes.
        BadShape(q: [0, 2, 4, 8], k: [0, 2, 5, 8], v: [0, 2, 5, 8], kind: .invalidShape, mentions: ["batch"]),
        BadShape(q: [1, 0, 4, 8], k: [1, 2, 5, 8], v: [1, 2, 5, 8], kind: .invalidShape, mentions: ["heads"]),
        BadShape(q: [1, 2, 4, 8], k: [1, 0, 5, 8], v: [1, 0, 5, 8], kind: .invalidShape, mentions: ["kvHeads"]),
        BadShape(q: [1, 2, 0, 8], k: [1, 2, 5, 8], v: [1, 2, 5, 8], kind: .invalidShape, mentions: ["queryLength"]),
        BadShape(q: [1, 2, 4, 8], k: [1, 2, 0, 8], v: [1, 2, 0, 8], kind: .invalidShape, mentions: ["keyLength"]),
        BadShape(q: [1, 2, 4, 0], k: [1, 2, 5, 0], v: [1, 2, 5, 8], kind: .invalidShape, mentions: ["headDim"]),
        BadShape(q: [1, 2, 4, 8], k: [1, 2, 5, 8], v: [1, 2, 5, 0], kind: .invalidShape, mentions: ["valueDim"]),
    ]

    @Test("bad shapes are refused by attend, validate and cost", arguments: badShapes)
    func shapes(_ bad: BadShape) throws {
        let (q, k, v) = try randomTensors(bad.q, bad.k, bad.v)
        for attention in errorTestConformers {
            let label = "\(attention.name) \(bad.testDescription)"
            expectAttentionError(bad.kind, mentioning: bad.mentions, label) {
                try attention.attend(query: q, key: k, value: v)
            }
            expectAttentionError(bad.kind, mentioning: bad.mentions, label + " with arguments") {
                try attention.attend(query: q, key: k, value: v, keyLengths: nil, threads: 1)
            }
            expectAttentionError(bad.kind, mentioning: bad.mentions, label + " shape init") {
                try AttentionShape(query: q, key: k, value: v)
            }
        }
        // Mismatched tensors have no shape; zero and indivisible sizes do, and
        // validate/cost refuse them like attend.
        if bad.kind == .invalidShape {
            let shape = AttentionShape(batch: bad.q[0], heads: bad.q[1], kvHeads: bad.k[1], queryLength: bad.q[2],
                                       keyLength: bad.k[2], headDim: bad.q[3], valueDim: bad.v[3])
            for attention in errorTestConformers {
                expectAttentionError(bad.kind, mentioning: bad.mentions, "\(attention.name) validate \(shape)") {
                    try attention.validate(shape)
                }
                expectAttentionError(bad.kind, mentioning: bad.mentions, "\(attention.name) cost \(shape)") {
                    try attention.cost(shape)
                }
            }
        }
    }

    @Test("key lengths: one per batch item, each in 0...Nk")
    func keyLengths() throws {
        let (q, k, v) = try randomTensors([3, 2, 4, 8], [3, 2, 5, 8], [3, 2, 5, 8])
        for attention in errorTestConformers {
            for lengths in [[], [5], [5, 5], [5, 5, 5, 5]] {
                expectAttentionError(.invalidParameter, mentioning: ["keyLengths", "\(lengths.count)", "3"],
                                     "\(attention.name) \(lengths.count) key lengths") {
                    try attention.attend(query: q, key: k, value: v, keyLengths: lengths)
                }
            }
            for (lengths, bad) in [([5, -1, 5], 1), ([6, 5, 5], 0), ([0, 5, 6], 2), ([5, 5, Int.min], 2),
                                   ([5, Int.max, 0], 1)] {
                expectAttentionError(.invalidParameter, mentioning: ["keyLengths[\(bad)]", "\(lengths[bad])", "0...5"],
                                     "\(attention.name) keyLengths \(lengths)") {
                    try attention.attend(query: q, key: k, value: v, keyLengths: lengths)
                }
            }
            // The edges of the range are fine.
            let edge = try attention.attend(query: q, key: k, value: v, keyLengths: [0, 5, 1])
            #expect(edge.output.shape == [3, 2, 4, 8])
        }
    }

    @Test("threads must be at least 1")
    func threads() throws {
        let (q, k, v) = try randomTensors([1, 2, 4, 8], [1, 2, 5, 8], [1, 2, 5, 8])
        for attention in errorTestConformers {
            for threads in [0, -1, Int.min] {
                expectAttentionError(.invalidParameter, mentioning: ["threads", "\(threads)"],
                                     "\(attention.name) threads \(threads)") {
                    try attention.attend(query: q, key: k, value: v, threads: threads)
                }
            }
            #expect(try attention.attend(query: q, key: k, value: v, threads: 1000).output.shape == [1, 2, 4, 8])
        }
    }

    @Test("the scale must be finite", arguments: [Float.nan, .infinity, -.infinity, .signalingNaN])
    func scale(_ scale: Float) throws {
        let (q, k, v) = try randomTensors([1, 2, 4, 8], [1, 2, 5, 8], [1, 2, 5, 8])
        let shape = AttentionShape(heads: 2, queryLength: 4, keyLength: 5, headDim: 8)
        let conformers: [any Attention] = [DenseAttention(scale: scale), DenseAttention(causal: true, scale: scale),
                                           VanillaAttention(scale: scale), VanillaAttention(causal: true, scale: scale)]
        for attention in conformers {
            expectAttentionError(.invalidParameter, mentioning: ["scale"], "\(attention.name) attend scale \(scale)") {
                try attention.attend(query: q, key: k, value: v)
            }
            expectAttentionError(.invalidParameter, mentioning: ["scale"], "\(attention.name) validate scale \(scale)") {
                try attention.validate(shape)
            }
            expectAttentionError(.invalidParameter, mentioning: ["scale"], "\(attention.name) cost scale \(scale)") {
                try attention.cost(shape)
            }
        }
    }

    @Test("dense attention supports head dimensions up to 256", arguments: [(257, 8), (8, 257), (257, 257), (1000, 1)])
    func denseHeadDimLimit(d: Int, dv: Int) throws {
        let (q, k, v) = try randomTensors([1, 1, 3, d], [1, 1, 4, d], [1, 1, 4, dv])
        let dimension = d > 256 ? "headDim" : "valueDim"
        let shape = AttentionShape(heads: 1, queryLength: 3, keyLength: 4, headDim: d, valueDim: dv)
        for attention in [DenseAttention(), DenseAttention(causal: true)] {
            expectAttentionError(.unsupported, mentioning: [dimension, "256"], "dense D \(d) Dv \(dv)") {
                try attention.attend(query: q, key: k, value: v)
            }
            expectAttentionError(.unsupported, mentioning: [dimension, "256"], "dense validate D \(d) Dv \(dv)") {
                try attention.validate(shape)
            }
            expectAttentionError(.unsupported, mentioning: [dimension, "256"], "dense cost D \(d) Dv \(dv)") {
                try attention.cost(shape)
            }
        }
        // The vanilla baseline has no limit.
        try VanillaAttention().validate(shape)
        #expect(try VanillaAttention().attend(query: q, key: k, value: v).output.shape == [1, 1, 3, dv])
        // 256 itself is accepted.
        try DenseAttention().validate(AttentionShape(heads: 1, queryLength: 3, headDim: 256, valueDim: 256))
    }

    /// cost() throws exactly what validate() throws, for every refused problem.
    @Test("cost throws what validate throws")
    func costMatchesValidate() {
        let shapes = [
            AttentionShape(batch: 0, heads: 2, queryLength: 3, headDim: 4),
            AttentionShape(heads: 3, kvHeads: 2, queryLength: 3, headDim: 4),
            AttentionShape(heads: 2, queryLength: 3, keyLength: 0, headDim: 4),
            AttentionShape(heads: 2, queryLength: 3, headDim: 257),
            AttentionShape(heads: 2, queryLength: 3, headDim: 4, valueDim: 300),
            AttentionShape(heads: 1, queryLength: 1 << 32, keyLength: 1 << 32, headDim: 1),
        ]
        let conformers: [any Attention] = errorTestConformers + [DenseAttention(scale: .nan), VanillaAttention(scale: .infinity)]
        var refused = 0
        for attention in conformers {
            for shape in shapes + [AttentionShape(heads: 2, queryLength: 3, headDim: 4)] {
                var validateError: AttentionError?
                do { try attention.validate(shape) } catch { validateError = error as? AttentionError }
                var costError: AttentionError?
                do { _ = try attention.cost(shape) } catch { costError = error as? AttentionError }
                #expect(validateError == costError,
                        "\(attention.name) \(shape): validate \(String(describing: validateError)), cost \(String(describing: costError))")
                if validateError != nil { refused += 1 }
            }
        }
        // Every bad shape is refused by every conformer, except D > 256 by vanilla, and the
        // good shape is refused only for a non-finite scale.
        #expect(refused == 2 * 6 + 2 * 4 + 2 * 7)
    }

    @Test("Tensor(shape:data:) with the wrong count")
    func dataCount() {
        expectAttentionError(.shapeMismatch, mentioning: ["[2, 3, 4, 5]", "120", "119"], "count 119") {
            try Tensor(shape: [2, 3, 4, 5], data: [Float](repeating: 0, count: 119))
        }
    }
}
