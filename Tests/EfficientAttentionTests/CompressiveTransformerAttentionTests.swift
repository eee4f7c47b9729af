// CompressiveTransformerAttention against Double references: the stateless call over
// [compressed ; memory ; segment] with Transformer-XL's relative scores (awkward shapes,
// grouped heads, D = 1, 3, 65, Dv != D); segments processed one by one against a
// reference memory that evolves in Double (memory and compressed contents after each
// segment, all three compression functions, a batch item reset in the middle); M_c = 0
// against Transformer-XL bitwise; thread counts; the reconstruction loss; errors that
// leave the memory unchanged.

import EfficientAttention
import Foundation
import Testing

private typealias Compression = CompressiveTransformerAttention.CompressionFunction

/// Positions `range` (axis 2) of `tensor`.
private func positions(_ tensor: Tensor, _ range: Range<Int>) throws -> Tensor {
    let s = tensor.shape
    var data = [Float]()
    for a in 0..<s[0] { for b in 0..<s[1] { for n in range { for c in 0..<s[3] { data.append(tensor[a, b, n, c]) } } } }
    return try Tensor(shape: [s[0], s[1], range.count, s[3]], data: data)
}

/// Random convolution weights `[Hkv, c, w, w]` for keys and values, scaled by `1/√(c·w)`.
private func randomConvolution(kvHeads: Int, compression c: Int, headDim d: Int, valueDim dv: Int,
                               seed: UInt64) throws -> Compression {
    let k = try randomTensor([kvHeads, c, d, d], seed: seed).elements.map { $0 / Float(c * d).squareRoot() }
    let v = try randomTensor([kvHeads, c, dv, dv], seed: seed + 1).elements.map { $0 / Float(c * dv).squareRoot() }
    return .convolution(keyWeights: k, valueWeights: v)
}

/// A configuration with random biases and a random table of `rows` rows.
private func randomCompressive(heads: Int, headDim d: Int, memoryLength: Int, compressedMemoryLength: Int,
                               compression: Int, function: Compression, rows: Int, seed: UInt64,
                               scale: Float? = nil) throws -> CompressiveTransformerAttention {
    CompressiveTransformerAttention(
        memoryLength: memoryLength, compressedMemoryLength: compressedMemoryLength, compression: compression,
        compressionFunction: function, relativePositions: try randomTensor([1, heads, rows, d], seed: seed),
        contentBias: try randomTensor([1, 1, heads, d], seed: seed + 1).elements,
        positionBias: try randomTensor([1, 1, heads, d], seed: seed + 2).elements, scale: scale)
}

/// The Transformer-XL attention with the same parameters over a memory of `M_c + M`.
private func transformerXL(_ attention: CompressiveTransformerAttention) -> TransformerXLAttention {
    TransformerXLAttention(memoryLength: attention.compressedMemoryLength + attention.memoryLength,
                           relativePositions: attention.relativePositions, contentBias: attention.contentBias,
                           positionBias: attention.positionBias, scale: attention.scale)
}

/// The compression of one window of `c` rows (each `[Hkv · w]`, head-major) in Double:
/// the slot and, per element, the sum of the absolute terms (the scale of rounding errors).
private func referenceSlot(_ rows: [[Float]], function: Compression, isValue: Bool, kvHeads: Int,
                           width w: Int) -> (slot: [Double], magnitude: [Double]) {
    let c = rows.count
    var slot = [Double](repeating: 0, count: kvHeads * w), magnitude = slot
    for hk in 0..<kvHeads { for o in 0..<w {
        let index = hk * w + o
        switch function {
        case .maxPool:
            slot[index] = rows.map { Double($0[index]) }.max()!
            magnitude[index] = abs(slot[index])
        case .meanPool:
            slot[index] = rows.reduce(0) { $0 + Double($1[index]) } / Double(c)
            magnitude[index] = rows.reduce(0) { $0 + abs(Double($1[index])) } / Double(c)
        case let .convolution(keyWeights, valueWeights):
            let weights = isValue ? valueWeights : keyWeights
            for r in 0..<c { for i in 0..<w {
                let term = Double(weights[((hk * c + r) * w + o) * w + i]) * Double(rows[r][hk * w + i])
                slot[index] += term
                magnitude[index] += abs(term)
            } }
        }
    } }
    return (slot, magnitude)
}

/// Rows of `tensor` per batch item and position, each `[Hkv · w]` head-major.
private func rowsOf(_ tensor: Tensor, item b: Int) -> [[Float]] {
    let (h, n, w) = (tensor.shape[1], tensor.shape[2], tensor.shape[3])
    return (0..<n).map { j in (0..<h).flatMap { hk in (0..<w).map { tensor[b, hk, j, $0] } } }
}

/// The compressive memory, straight from the spec, per batch item: memory positions as
/// Float rows (copies), compressed slots in Double with their error scale.
private struct ReferenceMemory {
    let memoryLength: Int, compressedLength: Int, compression: Int, function: Compression
    let kvHeads: Int, headDim: Int, valueDim: Int
    var keys: [[[Float]]], values: [[[Float]]]
    var compressedKeys: [[(slot: [Double], magnitude: [Double])]]
    var compressedValues: [[(slot: [Double], magnitude: [Double])]]

    init(batch: Int, kvHeads: Int, headDim: Int, valueDim: Int, _ attention: CompressiveTransformerAttention) {
        (memoryLength, compressedLength) = (attention.memoryLength, attention.compressedMemoryLength)
        (compression, function) = (attention.compression, attention.compressionFunction)
        (self.kvHeads, self.headDim, self.valueDim) = (kvHeads, headDim, valueDim)
        keys = Array(repeating: [], count: batch)
        values = keys
        compressedKeys = Array(repeating: [], count: batch)
        compressedValues = compressedKeys
    }

    mutating func reset(_ b: Int) {
        (keys[b], values[b], compressedKeys[b], compressedValues[b]) = ([], [], [], [])
    }

    /// Appends the segment, keeps the last M positions, compresses the evicted ones.
    mutating func absorb(key: Tensor, value: Tensor) {
        let c = compression
        for b in keys.indices {
            let allKeys = keys[b] + rowsOf(key, item: b), allValues = values[b] + rowsOf(value, item: b)
            let evicted = max(0, allKeys.count - memoryLength)
            precondition(evicted % c == 0 || compressedLength == 0)
            for t in 0..<(evicted / c) {
                let window = (t * c)..<((t + 1) * c)
                compressedKeys[b].append(referenceSlot(Array(allKeys[window]), function: function, isValue: false,
                                                       kvHeads: kvHeads, width: headDim))
                compressedValues[b].append(referenceSlot(Array(allValues[window]), function: function, isValue: true,
                                                         kvHeads: kvHeads, width: valueDim))
            }
            compressedKeys[b] = Array(compressedKeys[b].suffix(compressedLength))
            compressedValues[b] = Array(compressedValues[b].suffix(compressedLength))
            keys[b] = Array(allKeys.suffix(memoryLength))
            values[b] = Array(allValues.suffix(memoryLength))
        }
    }

    /// Checks the library's memory against this one: the memory bitwise, the compressed
    /// slots within rounding of the Double ones, the storage right-aligned with zeros before.
    func check(_ memory: CompressiveMemory, _ label: String, sourceLocation: SourceLocation = #_sourceLocation) {
        #expect(memory.lengths == keys.map(\.count), "\(label): lengths", sourceLocation: sourceLocation)
        #expect(memory.compressedLengths == compressedKeys.map(\.count), "\(label): compressed lengths",
                sourceLocation: sourceLocation)
        #expect(memory.storedLength == keys.map(\.count).max()!, "\(label): stored length", sourceLocation: sourceLocation)
        #expect(memory.compressedStoredLength == compressedKeys.map(\.count).max()!, "\(label): compressed stored",
                sourceLocation: sourceLocation)
        guard memory.lengths == keys.map(\.count), memory.compressedLengths == compressedKeys.map(\.count) else { return }
        var memoryErrors = 0, compressedErrors: [String] = [], padding = 0
        for b in keys.indices {
            for (tensor, rows) in [(memory.keys, keys[b]), (memory.values, values[b])] {
                let stored = tensor.shape[2], pad = stored - rows.count
                let actual = rowsOf(tensor, item: b)
                padding += actual[..<pad].joined().filter { $0 != 0 }.count
                for (j, row) in rows.enumerated() where !bitwiseEqual(actual[pad + j], row) { memoryErrors += 1 }
            }
            for (tensor, slots) in [(memory.compressedKeys, compressedKeys[b]),
                                    (memory.compressedValues, compressedValues[b])] {
                let stored = tensor.shape[2], pad = stored - slots.count
                let actual = rowsOf(tensor, item: b)
                padding += actual[..<pad].joined().filter { $0 != 0 }.count
                for (t, expected) in slots.enumerated() {
                    for (e, value) in actual[pad + t].enumerated() {
                        let error = abs(Double(value) - expected.slot[e])
                        if !(error <= 1e-5 * expected.magnitude[e] + 1e-7) {
                            compressedErrors.append("item \(b) slot \(t) element \(e): \(value) vs \(expected.slot[e])")
                        }
                    }
                }
            }
        }
        #expect(memoryErrors == 0, "\(label): \(memoryErrors) memory rows differ", sourceLocation: sourceLocation)
        let examples = compressedErrors.prefix(3)
        #expect(compressedErrors.isEmpty, "\(label): \(compressedErrors.count) compressed values off, e.g. \(examples)",
                sourceLocation: sourceLocation)
        #expect(padding == 0, "\(label): \(padding) nonzero padding values", sourceLocation: sourceLocation)
    }
}

/// The keys (or values) a stateful call attends to, from the memory's public contents:
/// per item `[zeros ; compressed valid ; memory valid ; segment]`, right-aligned; and the pads.
private func attendedKeys(_ memory: CompressiveMemory, segment: Tensor, values isValues: Bool) throws
    -> (tensor: Tensor, pads: [Int]) {
    let spans = (0..<memory.batch).map { memory.compressedLengths[$0] + memory.lengths[$0] }
    let past = spans.max()!, n = segment.shape[2]
    let (compressed, recent) = isValues ? (memory.compressedValues, memory.values)
                                        : (memory.compressedKeys, memory.keys)
    let width = segment.shape[3]
    var data = [Float]()
    for b in 0..<memory.batch { for hk in 0..<memory.kvHeads {
        data += [Float](repeating: 0, count: (past - spans[b]) * width)
        for (tensor, count) in [(compressed, memory.compressedLengths[b]), (recent, memory.lengths[b])] {
            let stored = tensor.shape[2]
            for j in (stored - count)..<stored { for c in 0..<width { data.append(tensor[b, hk, j, c]) } }
        }
        for j in 0..<n { for c in 0..<width { data.append(segment[b, hk, j, c]) } }
    } }
    return (try Tensor(shape: [memory.batch, memory.kvHeads, past + n, width], data: data), spans.map { past - $0 })
}

/// Plain softmax attention in Double over Double keys/values (row-major
/// `[B, Hkv, Nk, D/Dv]`), non-causal: the reconstruction loss's `attn`.
private func denseDouble(query: Tensor, keys: [Double], values: [Double], keyLength nk: Int, kvHeads: Int,
                         valueDim dv: Int, scale: Double) -> [Double] {
    let (batch, heads, nq, d) = (query.shape[0], query.shape[1], query.shape[2], query.shape[3])
    var output = [Double](repeating: 0, count: batch * heads * nq * dv)
    for b in 0..<batch { for h in 0..<heads { for i in 0..<nq {
        let hk = h / (heads / kvHeads)
        let scores = (0..<nk).map { j in
            scale * (0..<d).reduce(0.0) { $0 + Double(query[b, h, i, $1]) * keys[((b * kvHeads + hk) * nk + j) * d + $1] }
        }
        let m = scores.max()!
        let weights = scores.map { exp($0 - m) }
        let sum = weights.reduce(0, +)
        for j in 0..<nk { for c in 0..<dv {
            output[((b * heads + h) * nq + i) * dv + c] += weights[j] / sum * values[((b * kvHeads + hk) * nk + j) * dv + c]
        } }
    } } }
    return output
}

@Suite("CompressiveTransformerAttention")
struct CompressiveTransformerAttentionTests {
    @Test("stateless: [compressed ; memory ; segment] against the relative-score reference")
    func stateless() throws {
        // (heads, kvHeads, Nq, M_c, M, past keys, D, Dv)
        let cases: [(Int, Int, Int, Int, Int, Int, Int, Int)] = [
            (2, 2, 1, 0, 0, 0, 1, 1), (4, 2, 17, 5, 6, 11, 3, 5), (4, 2, 129, 40, 64, 90, 65, 7),
            (2, 1, 70, 30, 33, 0, 16, 16), (1, 1, 33, 100, 20, 119, 3, 3),
        ]
        for (n, (h, hkv, nq, mc, m, past, d, dv)) in cases.enumerated() {
            let attention = try randomCompressive(heads: h, headDim: d, memoryLength: m, compressedMemoryLength: mc,
                                                  compression: 3, function: .meanPool, rows: mc + m + nq + 2,
                                                  seed: UInt64(200 + 10 * n))
            let (q, k, v) = try randomQKV(batch: 2, heads: h, kvHeads: hkv, queryLength: nq, keyLength: past + nq,
                                          headDim: d, valueDim: dv, seed: UInt64(50 + n))
            let result = try attention.attend(query: q, key: k, value: v, threads: 2)
            let label = "H\(h)/\(hkv) Nq\(nq) Mc\(mc) M\(m) P\(past) D\(d) Dv\(dv)"
            checkXL(result, transformerXL(attention), query: q, key: k, value: v, label)
            expectBitwiseEqual(result, try transformerXL(attention).attend(query: q, key: k, value: v, threads: 2),
                               "\(label) vs Transformer-XL")
        }
    }

    /// The stateless backward is Transformer-XL's over the span (whose own suite checks it
    /// against the Double reference): the same bits, parameter gradients included, for any
    /// thread count; a span longer than M_c + M is refused as in the forward.
    @Test("stateless backward: Transformer-XL's over [compressed ; memory ; segment], bitwise, with r, u, v gradients")
    func statelessBackward() throws {
        for (n, (h, hkv, nq, mc, m, past, d, dv)) in [(4, 2, 17, 5, 6, 11, 3, 5), (2, 1, 40, 9, 12, 21, 65, 7)].enumerated() {
            let attention = try randomCompressive(heads: h, headDim: d, memoryLength: m, compressedMemoryLength: mc,
                                                  compression: 3, function: .meanPool, rows: mc + m + nq + 2,
                                                  seed: UInt64(300 + n))
            let (q, k, v) = try randomQKV(batch: 2, heads: h, kvHeads: hkv, queryLength: nq, keyLength: past + nq,
                                          headDim: d, valueDim: dv, seed: UInt64(310 + n))
            let result = try attention.attend(query: q, key: k, value: v, keyLengths: [past + nq, past], threads: 2)
            let dO = try randomTensor(result.output.shape, seed: UInt64(320 + n))
            let xl = transformerXL(attention)
            let expected = try xl.parameterGradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                                     keyLengths: [past + nq, past], threads: 1)
            for threads in [1, 3] {
                let got = try attention.parameterGradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                                           keyLengths: [past + nq, past], threads: threads)
                #expect(got.inputs == expected.inputs && got.parameters == expected.parameters, "case \(n) threads \(threads)")
                let plain = try attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                                    keyLengths: [past + nq, past], threads: threads)
                #expect(plain == expected.inputs, "case \(n) threads \(threads): gradients")
            }
            #expect(expected.inputs.dKey.elements.contains { $0 != 0 } && expected.parameters.contentBias.contains { $0 != 0 })
        }
        let attention = try randomCompressive(heads: 2, headDim: 4, memoryLength: 3, compressedMemoryLength: 2,
                                              compression: 3, function: .meanPool, rows: 20, seed: 330)
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 4, keyLength: 10, headDim: 4, seed: 331)
        let dO = try randomTensor([1, 2, 4, 4], seed: 332)
        let fake = try AttentionResult(output: dO, logSumExp: try Tensor(shape: [1, 2, 4, 1]))
        #expect(thrownAttentionError { try attention.gradients(query: q, key: k, value: v, result: fake, outputGradient: dO) }?
            .message.contains("memory length mismatch") == true)
    }

    @Test("segments one by one equal the reference's memory evolution (all compression functions, a reset)")
    func segments() throws {
        // (batch, heads, kvHeads, D, Dv, N, M, M_c, c, segments, reset item 1 after segment)
        let cases: [(Int, Int, Int, Int, Int, Int, Int, Int, Int, Int, Int)] = [
            (2, 4, 2, 3, 5, 6, 9, 4, 3, 6, 2),     // fill levels differ after the reset
            (2, 2, 1, 65, 7, 12, 6, 3, 3, 4, 1),   // more new slots than M_c in one call
            (3, 1, 1, 1, 2, 4, 0, 5, 2, 5, 2),     // no memory: every position is compressed
            (1, 4, 2, 16, 16, 10, 15, 7, 5, 5, -1),
        ]
        for (n, (batch, h, hkv, d, dv, segment, m, mc, c, count, resetAfter)) in cases.enumerated() {
            let functions: [Compression] = [.maxPool, .meanPool,
                                            try randomConvolution(kvHeads: hkv, compression: c, headDim: d,
                                                                  valueDim: dv, seed: UInt64(300 + n))]
            let (q, k, v) = try randomQKV(batch: batch, heads: h, kvHeads: hkv, queryLength: segment * count,
                                          headDim: d, valueDim: dv, seed: UInt64(400 + n))
            for function in functions {
                let attention = try randomCompressive(heads: h, headDim: d, memoryLength: m, compressedMemoryLength: mc,
                                                      compression: c, function: function, rows: mc + m + segment,
                                                      seed: UInt64(500 + 10 * n))
                var memory = try CompressiveMemory(batch: batch, kvHeads: hkv, headDim: d, valueDim: dv, capacity: m,
                                                   compressedCapacity: mc)
                var reference = ReferenceMemory(batch: batch, kvHeads: hkv, headDim: d, valueDim: dv, attention)
                for s in 0..<count {
                    let range = (s * segment)..<((s + 1) * segment)
                    let (sq, sk, sv) = (try positions(q, range), try positions(k, range), try positions(v, range))
                    let (keys, pads) = try attendedKeys(memory, segment: sk, values: false)
                    let (values, _) = try attendedKeys(memory, segment: sv, values: true)
                    let label = "case \(n) \(function == .maxPool ? "max" : function == .meanPool ? "mean" : "conv") segment \(s)"
                    let result = try attention.attend(query: sq, key: sk, value: sv, memory: &memory, threads: 2)
                    checkXL(result, transformerXL(attention), query: sq, key: keys, value: values, keyBegins: pads, label)
                    if pads.allSatisfy({ $0 == 0 }) {
                        // Nothing to hide: the stateless call over the same keys, bitwise.
                        expectBitwiseEqual(result, try attention.attend(query: sq, key: keys, value: values, threads: 2),
                                           "\(label) stateless")
                    }
                    reference.absorb(key: sk, value: sv)
                    reference.check(memory, label)
                    if s == resetAfter {
                        try memory.reset(batchItem: 1)
                        reference.reset(1)
                        reference.check(memory, "\(label) after reset(batchItem: 1)")
                    }
                }
                memory.reset()
                #expect(memory.storedLength == 0 && memory.compressedStoredLength == 0)
                #expect(memory.lengths.allSatisfy { $0 == 0 } && memory.compressedLengths.allSatisfy { $0 == 0 })
            }
        }
    }

    @Test("M_c = 0 equals Transformer-XL bitwise: outputs, lse and memory, over several segments")
    func withoutCompressedMemory() throws {
        // N = 7, M = 10: evicted counts 0, 4, 7, … are not multiples of c = 3; with M_c = 0
        // nothing is compressed and every count is accepted.
        let (batch, h, hkv, d, dv, n, m) = (2, 4, 2, 65, 3, 7, 10)
        let attention = try randomCompressive(heads: h, headDim: d, memoryLength: m, compressedMemoryLength: 0,
                                              compression: 3, function: .meanPool, rows: m + n, seed: 31)
        let xl = TransformerXLAttention(memoryLength: m, relativePositions: attention.relativePositions,
                                        contentBias: attention.contentBias, positionBias: attention.positionBias)
        let (q, k, v) = try randomQKV(batch: batch, heads: h, kvHeads: hkv, queryLength: 5 * n, headDim: d,
                                      valueDim: dv, seed: 32)
        var memory = try CompressiveMemory(batch: batch, kvHeads: hkv, headDim: d, valueDim: dv, capacity: m,
                                           compressedCapacity: 0)
        var xlMemory = try TransformerXLMemory(batch: batch, kvHeads: hkv, headDim: d, valueDim: dv, capacity: m)
        for s in 0..<5 {
            let range = (s * n)..<((s + 1) * n)
            let (sq, sk, sv) = (try positions(q, range), try positions(k, range), try positions(v, range))
            let result = try attention.attend(query: sq, key: sk, value: sv, memory: &memory, threads: 2)
            expectBitwiseEqual(result, try xl.attend(query: sq, key: sk, value: sv, memory: &xlMemory, threads: 2),
                               "segment \(s)")
            #expect(memory.keys == xlMemory.keys && memory.values == xlMemory.values, "segment \(s) memory")
            #expect(memory.lengths == xlMemory.lengths && memory.compressedStoredLength == 0, "segment \(s) lengths")
        }
    }

    @Test("reads only the addressed elements: NaN-padded strided segments, table and old keys")
    func stridedNaNPadded() throws {
        let (batch, h, hkv, d, dv, n, m, mc, c) = (2, 4, 2, 5, 6, 6, 6, 4, 3)
        let (q, k, v) = try randomQKV(batch: batch, heads: h, kvHeads: hkv, queryLength: 3 * n, headDim: d,
                                      valueDim: dv, seed: 45)
        for function in [Compression.maxPool, .meanPool,
                         try randomConvolution(kvHeads: hkv, compression: c, headDim: d, valueDim: dv, seed: 46)] {
            let base = try randomCompressive(heads: h, headDim: d, memoryLength: m, compressedMemoryLength: mc,
                                             compression: c, function: function, rows: mc + m + n, seed: 47)
            var padded = base
            padded.relativePositions = try embeddedInNaN(base.relativePositions, innerStride: 2)
            var plain = try CompressiveMemory(batch: batch, kvHeads: hkv, headDim: d, valueDim: dv, capacity: m,
                                              compressedCapacity: mc)
            var strided = plain
            for s in 0..<3 {
                let range = (s * n)..<((s + 1) * n)
                let (sq, sk, sv) = (try positions(q, range), try positions(k, range), try positions(v, range))
                let a = try base.attend(query: sq, key: sk, value: sv, memory: &plain)
                let b = try padded.attend(query: try embeddedInNaN(sq), key: try embeddedInNaN(sk, innerStride: 3),
                                          value: try embeddedInNaN(sv), memory: &strided)
                expectBitwiseEqual(a, b, "segment \(s)")
                #expect(plain == strided, "segment \(s): memories differ")
            }
            let loss = try base.reconstructionLoss(query: q, oldKeys: k, oldValues: v)
            let stridedLoss = try padded.reconstructionLoss(query: try embeddedInNaN(q), oldKeys: try embeddedInNaN(k, innerStride: 3),
                                                            oldValues: try embeddedInNaN(v, innerStride: 2))
            #expect(loss.bitPattern == stridedLoss.bitPattern, "reconstruction loss \(loss) vs \(stridedLoss)")
        }
    }

    @Test("1 vs 3 threads: outputs and memories bitwise identical")
    func threads() throws {
        let (batch, h, hkv, d, dv, n, m, mc, c) = (2, 4, 2, 33, 20, 12, 12, 8, 3)
        let (q, k, v) = try randomQKV(batch: batch, heads: h, kvHeads: hkv, queryLength: 4 * n, headDim: d,
                                      valueDim: dv, seed: 41)
        for function in [Compression.maxPool, .meanPool,
                         try randomConvolution(kvHeads: hkv, compression: c, headDim: d, valueDim: dv, seed: 42)] {
            let attention = try randomCompressive(heads: h, headDim: d, memoryLength: m, compressedMemoryLength: mc,
                                                  compression: c, function: function, rows: mc + m + n, seed: 43)
            var one = try CompressiveMemory(batch: batch, kvHeads: hkv, headDim: d, valueDim: dv, capacity: m,
                                            compressedCapacity: mc)
            var three = one
            for s in 0..<4 {
                let range = (s * n)..<((s + 1) * n)
                let (sq, sk, sv) = (try positions(q, range), try positions(k, range), try positions(v, range))
                let a = try attention.attend(query: sq, key: sk, value: sv, memory: &one, threads: 1)
                let b = try attention.attend(query: sq, key: sk, value: sv, memory: &three, threads: 3)
                expectBitwiseEqual(a, b, "segment \(s)")
                #expect(one == three, "segment \(s): memories differ")
                if s == 1 { try one.reset(batchItem: 0); try three.reset(batchItem: 0) }
            }
            let old = try randomQKV(batch: batch, heads: h, kvHeads: hkv, queryLength: n, keyLength: 3 * c,
                                    headDim: d, valueDim: dv, seed: 44)
            let lossOne = try attention.reconstructionLoss(query: old.q, oldKeys: old.k, oldValues: old.v, threads: 1)
            let lossThree = try attention.reconstructionLoss(query: old.q, oldKeys: old.k, oldValues: old.v, threads: 3)
            #expect(lossOne.bitPattern == lossThree.bitPattern, "reconstruction loss")
        }
    }

    @Test("reconstruction loss against a Double reference; zero when c = 1 with mean pooling")
    func reconstructionLoss() throws {
        // (batch, heads, kvHeads, Nq, n_s, c, D, Dv)
        let cases: [(Int, Int, Int, Int, Int, Int, Int, Int)] = [
            (1, 1, 1, 1, 3, 3, 1, 1), (2, 4, 2, 13, 12, 3, 3, 5), (1, 2, 1, 40, 35, 5, 65, 7),
        ]
        for (n, (batch, h, hkv, nq, ns, c, d, dv)) in cases.enumerated() {
            let (q, k, v) = try randomQKV(batch: batch, heads: h, kvHeads: hkv, queryLength: nq, keyLength: ns,
                                          headDim: d, valueDim: dv, seed: UInt64(60 + n), range: -2...2)
            for function in [Compression.maxPool, .meanPool,
                             try randomConvolution(kvHeads: hkv, compression: c, headDim: d, valueDim: dv,
                                                   seed: UInt64(70 + n))] {
                let attention = try randomCompressive(heads: h, headDim: d, memoryLength: 6, compressedMemoryLength: 6,
                                                      compression: c, function: function, rows: 1, seed: 80,
                                                      scale: n == 1 ? 0.7 : nil)
                let loss = try attention.reconstructionLoss(query: q, oldKeys: k, oldValues: v, threads: 2)
                // The reference: the slots in Double, two Double attentions, the squared difference.
                let scale = Double(attention.scale ?? 1 / Float(d).squareRoot())
                var keys = [Double](), values = [Double]()
                for b in 0..<batch {
                    let (keyRows, valueRows) = (rowsOf(k, item: b), rowsOf(v, item: b))
                    var slots: [(key: [Double], value: [Double])] = []
                    for t in 0..<(ns / c) {
                        let window = (t * c)..<((t + 1) * c)
                        slots.append((referenceSlot(Array(keyRows[window]), function: function, isValue: false,
                                                    kvHeads: hkv, width: d).slot,
                                      referenceSlot(Array(valueRows[window]), function: function, isValue: true,
                                                    kvHeads: hkv, width: dv).slot))
                    }
                    for hk in 0..<hkv {
                        for slot in slots {
                            keys += slot.key[(hk * d)..<((hk + 1) * d)]
                            values += slot.value[(hk * dv)..<((hk + 1) * dv)]
                        }
                    }
                }
                let full = referenceAttention(query: q, key: k, value: v, scale: scale, visible: Visible.all).output
                let compressed = denseDouble(query: q, keys: keys, values: values, keyLength: ns / c, kvHeads: hkv,
                                             valueDim: dv, scale: scale)
                let expected = zip(full, compressed).reduce(0.0) { $0 + ($1.0 - $1.1) * ($1.0 - $1.1) }
                #expect(expected > 1e-6, "case \(n): a meaningful loss")
                // Each output element is off by far less than 1e-5; the loss by at most
                // 2 · 1e-5 · Σ |difference| ≤ 2e-5 · √(count · loss).
                let tolerance = 2e-5 * (Double(full.count) * expected).squareRoot() + 1e-5 * expected
                let name = function == .maxPool ? "max" : function == .meanPool ? "mean" : "conv"
                #expect(abs(Double(loss) - expected) <= tolerance, "case \(n) \(name): loss \(loss), reference \(expected)")
            }
        }
        // c = 1 with mean pooling compresses nothing: the loss is exactly 0.
        let identity = try randomCompressive(heads: 4, headDim: 3, memoryLength: 2, compressedMemoryLength: 2,
                                             compression: 1, function: .meanPool, rows: 1, seed: 90)
        let (q, k, v) = try randomQKV(batch: 2, heads: 4, kvHeads: 2, queryLength: 9, keyLength: 7, headDim: 3,
                                      valueDim: 5, seed: 91)
        #expect(try identity.reconstructionLoss(query: q, oldKeys: k, oldValues: v) == 0)
    }

    /// The convolution weights' gradients of the reconstruction loss against central
    /// differences of a Double reference of the loss (slots, both attentions and the sum in
    /// Double, so the differences are accurate to about 1e-9); 1 and 3 threads bitwise; the
    /// loss equals reconstructionLoss's; pools are refused.
    @Test("reconstruction loss: convolution weight gradients against differences of the Double reference")
    func reconstructionGradients() throws {
        for (n, (batch, h, hkv, nq, ns, c, d, dv)) in [(2, 4, 2, 5, 6, 3, 3, 2), (1, 2, 1, 17, 10, 2, 1, 4)].enumerated() {
            let (q, k, v) = try randomQKV(batch: batch, heads: h, kvHeads: hkv, queryLength: nq, keyLength: ns,
                                          headDim: d, valueDim: dv, seed: UInt64(160 + n), range: -2...2)
            let function = try randomConvolution(kvHeads: hkv, compression: c, headDim: d, valueDim: dv, seed: UInt64(170 + n))
            let attention = try randomCompressive(heads: h, headDim: d, memoryLength: 6, compressedMemoryLength: 6,
                                                  compression: c, function: function, rows: 1, seed: 180)
            guard case let .convolution(keyWeights, valueWeights) = function else { return }
            let scale = 1 / Double(d).squareRoot()
            let full = referenceAttention(query: q, key: k, value: v, scale: scale, visible: Visible.all).output
            func referenceLoss(_ kw: [Double], _ vw: [Double]) -> Double {
                var keys = [Double](), values = [Double]()
                for b in 0..<batch { for hk in 0..<hkv { for t in 0..<(ns / c) {
                    for (width, weights, x, out) in [(d, kw, k, 0), (dv, vw, v, 1)] {
                        for o in 0..<width {
                            var slot = 0.0
                            for r in 0..<c { for i in 0..<width {
                                slot += weights[((hk * c + r) * width + o) * width + i] * Double(x[b, hk, t * c + r, i])
                            } }
                            if out == 0 { keys.append(slot) } else { values.append(slot) }
                        }
                    }
                } } }
                let compressed = denseDouble(query: q, keys: keys, values: values, keyLength: ns / c, kvHeads: hkv,
                                             valueDim: dv, scale: scale)
                return zip(full, compressed).reduce(0.0) { $0 + ($1.0 - $1.1) * ($1.0 - $1.1) }
            }
            let kw = keyWeights.map(Double.init), vw = valueWeights.map(Double.init)
            let result = try attention.reconstructionLossGradients(query: q, oldKeys: k, oldValues: v, threads: 1)
            #expect(result.loss.bitPattern == (try attention.reconstructionLoss(query: q, oldKeys: k, oldValues: v)).bitPattern)
            let step = 1e-5
            for (label, base, computed) in [("keyWeights", kw, result.keyWeights), ("valueWeights", vw, result.valueWeights)] {
                #expect(computed.count == base.count)
                var expected = [Double]()
                for index in base.indices {
                    var plus = base, minus = base
                    plus[index] += step
                    minus[index] -= step
                    let (lossPlus, lossMinus) = label == "keyWeights"
                        ? (referenceLoss(plus, vw), referenceLoss(minus, vw)) : (referenceLoss(kw, plus), referenceLoss(kw, minus))
                    expected.append((lossPlus - lossMinus) / (2 * step))
                }
                let largest = expected.map(abs).max()!
                #expect(largest > 1e-4, "case \(n) \(label): a meaningful gradient")
                let worst = zip(computed, expected).map { abs(Double($0) - $1) }.max()!
                #expect(worst <= 1e-4 * largest + 1e-6, "case \(n) \(label): worst \(worst) of \(largest)")
            }
            let three = try attention.reconstructionLossGradients(query: q, oldKeys: k, oldValues: v, threads: 3)
            #expect(three.keyWeights.map(\.bitPattern) == result.keyWeights.map(\.bitPattern)
                    && three.valueWeights.map(\.bitPattern) == result.valueWeights.map(\.bitPattern), "threads")
        }
        let pooled = try randomCompressive(heads: 2, headDim: 4, memoryLength: 3, compressedMemoryLength: 3,
                                           compression: 3, function: .meanPool, rows: 1, seed: 190)
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 4, keyLength: 6, headDim: 4, seed: 191)
        #expect(thrownAttentionError { try pooled.reconstructionLossGradients(query: q, oldKeys: k, oldValues: v) }?
            .message.contains("convolution") == true)
    }

    @Test("seeded configuration, name and cost follow Transformer-XL's")
    func seededAndCost() throws {
        let attention = try CompressiveTransformerAttention(heads: 2, headDim: 8, memoryLength: 12,
                                                            compressedMemoryLength: 6, maxSegmentLength: 9, seed: 3)
        let xl = try TransformerXLAttention(heads: 2, headDim: 8, memoryLength: 18, maxSegmentLength: 9, seed: 3)
        #expect(attention.relativePositions == xl.relativePositions && attention.contentBias == xl.contentBias
                && attention.positionBias == xl.positionBias)
        #expect(attention.relativePositions.shape == [1, 2, 27, 8])
        #expect(attention.compression == 3 && attention.compressionFunction == .meanPool)
        #expect(attention.name == "compressive")
        let shape = AttentionShape(batch: 2, heads: 2, queryLength: 9, keyLength: 27, headDim: 8, valueDim: 4)
        #expect(try attention.cost(shape, threads: 1) == (try xl.cost(shape, threads: 1)))
    }

    @Test("bad configurations throw and leave the memory unchanged")
    func errors() throws {
        let (h, hkv, d, dv, n, m, mc, c) = (4, 2, 4, 3, 6, 6, 4, 3)
        let base = try randomCompressive(heads: h, headDim: d, memoryLength: m, compressedMemoryLength: mc,
                                         compression: c, function: .meanPool, rows: mc + m + n, seed: 100)
        let (q, k, v) = try randomQKV(batch: 2, heads: h, kvHeads: hkv, queryLength: n, headDim: d, valueDim: dv,
                                      seed: 101)
        var memory = try CompressiveMemory(batch: 2, kvHeads: hkv, headDim: d, valueDim: dv, capacity: m,
                                           compressedCapacity: mc)
        for _ in 0..<3 { _ = try base.attend(query: q, key: k, value: v, memory: &memory) }
        let before = memory
        #expect(before.compressedLengths == [4, 4] && before.lengths == [6, 6])

        func expectRefused(_ attention: CompressiveTransformerAttention, query: Tensor = q, key: Tensor = k,
                           value: Tensor = v, _ kind: AttentionErrorCase, _ words: [String], _ label: String,
                           sourceLocation: SourceLocation = #_sourceLocation) {
            expectAttentionError(kind, mentioning: words, label, sourceLocation: sourceLocation) {
                try attention.attend(query: query, key: key, value: value, memory: &memory)
            }
            #expect(memory == before, "\(label): the memory changed", sourceLocation: sourceLocation)
        }
        var wrong = base
        wrong.compression = 0
        expectRefused(wrong, .invalidParameter, ["compression", "at least 1"], "c = 0")
        // A 4-position segment evicts 4 positions from a full memory of 6: not a multiple of 3.
        let short = try randomQKV(batch: 2, heads: h, kvHeads: hkv, queryLength: 4, headDim: d, valueDim: dv, seed: 102)
        expectRefused(base, query: short.q, key: short.k, value: short.v, .invalidParameter,
                      ["compression 3", "4 positions evicted"], "evicted count")
        wrong.compression = 2
        wrong.compressionFunction = .convolution(keyWeights: [Float](repeating: 0.1, count: hkv * 2 * d * d),
                                                 valueWeights: [Float](repeating: 0.1, count: hkv * 3 * dv * dv))
        expectRefused(wrong, .invalidParameter, ["valueWeights", "[Hkv, c, Dv, Dv]"], "value weight count")
        wrong.compressionFunction = .convolution(keyWeights: [Float](repeating: 0.1, count: 5),
                                                 valueWeights: [Float](repeating: 0.1, count: hkv * 2 * dv * dv))
        expectRefused(wrong, .invalidParameter, ["keyWeights", "[Hkv, c, D, D]"], "key weight count")
        var weights = [Float](repeating: 0.1, count: hkv * 2 * d * d)
        weights[7] = .nan
        wrong.compressionFunction = .convolution(keyWeights: weights,
                                                 valueWeights: [Float](repeating: 0.1, count: hkv * 2 * dv * dv))
        expectRefused(wrong, .invalidParameter, ["keyWeights[7]", "finite"], "NaN weight")
        weights[7] = 0.1
        wrong.compressionFunction = .convolution(keyWeights: weights,
                                                 valueWeights: [Float](repeating: .infinity, count: hkv * 2 * dv * dv))
        expectRefused(wrong, .invalidParameter, ["valueWeights[0]", "finite"], "infinite weight")
        wrong = base
        wrong.relativePositions = try randomTensor([1, h, mc + m + n - 1, d], seed: 103)
        expectRefused(wrong, .invalidParameter, ["relativePositions", "too short", "\(mc + m + n)"], "short table")
        wrong = base
        wrong.compressedMemoryLength = mc - 1
        expectRefused(wrong, .shapeMismatch, ["memory length mismatch", "compressedMemoryLength"], "M_c mismatch")
        wrong = base
        wrong.memoryLength = m - 3
        expectRefused(wrong, .shapeMismatch, ["memory length mismatch"], "M mismatch")
        let other = try randomQKV(batch: 2, heads: h, kvHeads: hkv, queryLength: n, headDim: d, valueDim: dv + 1,
                                  seed: 104)
        expectRefused(base, query: other.q, key: other.k, value: other.v, .shapeMismatch, ["memory is"], "Dv mismatch")
        let longer = try randomQKV(batch: 2, heads: h, kvHeads: hkv, queryLength: n, keyLength: n + 1, headDim: d,
                                   valueDim: dv, seed: 105)
        expectRefused(base, query: longer.q, key: longer.k, value: longer.v, .shapeMismatch, ["segment"], "segment keys")
        expectAttentionError(.invalidParameter, mentioning: ["threads"], "threads") {
            try base.attend(query: q, key: k, value: v, memory: &memory, threads: 0)
        }
        #expect(memory == before)

        // The stateless call and the loss validate too.
        expectAttentionError(.shapeMismatch, mentioning: ["memory length mismatch", "0...10"], "too many past keys") {
            try base.validate(AttentionShape(heads: h, kvHeads: hkv, queryLength: n, keyLength: n + 11, headDim: d))
        }
        expectAttentionError(.invalidParameter, mentioning: ["compression 3", "7 old positions"], "loss n_s") {
            let old = try randomQKV(heads: h, kvHeads: hkv, queryLength: 2, keyLength: 7, headDim: d, seed: 106)
            return try base.reconstructionLoss(query: old.q, oldKeys: old.k, oldValues: old.v)
        }
        expectAttentionError(.invalidParameter, mentioning: ["batchItem"], "reset index") { try memory.reset(batchItem: 2) }
        expectAttentionError(.invalidParameter, mentioning: ["compressedCapacity"], "negative capacity") {
            try CompressiveMemory(batch: 1, kvHeads: 1, headDim: 4, capacity: 3, compressedCapacity: -1)
        }
        expectAttentionError(.invalidParameter, mentioning: ["compressedMemoryLength"], "seeded, negative M_c") {
            try CompressiveTransformerAttention(heads: 2, headDim: 4, memoryLength: 3, compressedMemoryLength: -1,
                                                maxSegmentLength: 3, seed: 1)
        }
    }
}
