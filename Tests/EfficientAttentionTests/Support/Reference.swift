// Shared test support: a naive Double-precision reference for softmax attention, the
// same naive algorithm in Float (to measure what a plain Float implementation gets
// wrong), the error checker every conformer test uses, visibility predicates, random
// tensors and NaN-padded strided embeddings.
//
// The error rule (after FlashAttention's tests): a kernel's error against the Double
// reference may be at most 3x the error of the naive Float implementation, plus a tiny
// absolute slack for problems where the naive error happens to be zero.

import EfficientAttention
import Foundation
import Testing

// MARK: - Visibility predicates

/// Whether key `j` is visible to query `i` of query head `h` in batch item `b`.
typealias Visibility = @Sendable (_ b: Int, _ h: Int, _ i: Int, _ j: Int) -> Bool

/// A per-pair term of query `i`, key `j` (query head `h`, batch item `b`): an additive
/// score term (relative positions) or a probability weight (soft masks).
typealias PairTerm<T> = (_ b: Int, _ h: Int, _ i: Int, _ j: Int) -> T

enum Visible {
    /// Every key is visible.
    static let all: Visibility = { _, _, _, _ in true }

    /// Bottom-right aligned causal rule: `j <= i + Nk - Nq`.
    static func causal(queryLength nq: Int, keyLength nk: Int) -> Visibility {
        { _, _, i, j in j <= i + nk - nq }
    }

    /// Key padding: `j < keyLengths[b]`.
    static func keyPadding(_ keyLengths: [Int]) -> Visibility {
        { b, _, _, j in j < keyLengths[b] }
    }

    /// Keys in `range` only (used to split a problem into disjoint key sets).
    static func keys(in range: Range<Int>) -> Visibility {
        { _, _, _, j in range.contains(j) }
    }

    /// The intersection of several predicates.
    static func both(_ predicates: Visibility...) -> Visibility {
        { b, h, i, j in predicates.allSatisfy { $0(b, h, i, j) } }
    }

    /// Dense attention's visibility: causal and/or key padding.
    static func dense(causal: Bool, queryLength nq: Int, keyLength nk: Int,
                      keyLengths: [Int]?) -> Visibility {
        switch (causal, keyLengths) {
        case (false, nil): return Visible.all
        case (true, nil): return Visible.causal(queryLength: nq, keyLength: nk)
        case (false, let lengths?): return Visible.keyPadding(lengths)
        case (true, let lengths?):
            return Visible.both(Visible.causal(queryLength: nq, keyLength: nk), Visible.keyPadding(lengths))
        }
    }
}

// MARK: - Naive references

/// A reference result in row-major order: `output[((b·H + h)·Nq + i)·Dv + c]`,
/// `lse[(b·H + h)·Nq + i]`.
struct ReferenceResult<Scalar: BinaryFloatingPoint> {
    var batch: Int, heads: Int, queryLength: Int, valueDim: Int
    var output: [Scalar]
    var lse: [Scalar]

    var shape: [Int] { [batch, heads, queryLength, valueDim] }

    /// Row `(b, h, i)`'s index into `lse` (multiply by `valueDim` for `output`).
    func row(_ b: Int, _ h: Int, _ i: Int) -> Int { (b * heads + h) * queryLength + i }
}

/// The dimensions of query, key and value, checked as the spec states them (a test
/// support precondition, not the library's validation).
private func referenceDims(_ q: Tensor, _ k: Tensor, _ v: Tensor)
    -> (b: Int, h: Int, hkv: Int, nq: Int, nk: Int, d: Int, dv: Int) {
    let (b, h, nq, d) = (q.shape[0], q.shape[1], q.shape[2], q.shape[3])
    let (hkv, nk, dv) = (k.shape[1], k.shape[2], v.shape[3])
    precondition(k.shape[0] == b && v.shape[0] == b && v.shape[1] == hkv
                 && v.shape[2] == nk && k.shape[3] == d && h % hkv == 0,
                 "reference: inconsistent shapes \(q.shape) \(k.shape) \(v.shape)")
    return (b, h, hkv, nq, nk, d, dv)
}

/// The spec's default scale, `1 / sqrt(D)`.
func defaultScale(headDim d: Int) -> Double { 1 / Double(d).squareRoot() }

/// Softmax attention in Double, straight from ATTENTION_SPEC.md: query head `h` reads
/// key/value head `h / (H / Hkv)`, `s(i, j) = scale · q_i · k_j` over the keys for which
/// `visible(b, h, i, j)`, rows with no visible key are 0 with `lse = -infinity`.
/// Optionally `bias` is added to each score (after scaling) and `weight` multiplies each
/// exponential: `w_ij = weight · exp(s_ij) / Σ weight · exp(s)`, `lse = log Σ weight · exp(s)`.
func referenceAttention(query: Tensor, key: Tensor, value: Tensor, scale: Double,
                        visible: Visibility, bias: PairTerm<Double>? = nil,
                        weight: PairTerm<Double>? = nil) -> ReferenceResult<Double> {
    naiveAttention(query: query, key: key, value: value, scale: scale, visible: visible,
                   bias: bias, weight: weight,
                   exp: { Foundation.exp($0) }, log: { Foundation.log($0) })
}

/// The same naive algorithm in Float: same loops and summation order, Float
/// accumulation, Foundation's `expf` and `logf`. Its error against the Double reference
/// is the yardstick for the library's error.
func naiveFloatAttention(query: Tensor, key: Tensor, value: Tensor, scale: Float,
                         visible: Visibility, bias: PairTerm<Float>? = nil,
                         weight: PairTerm<Float>? = nil) -> ReferenceResult<Float> {
    naiveAttention(query: query, key: key, value: value, scale: scale, visible: visible,
                   bias: bias, weight: weight,
                   exp: { expf($0) }, log: { logf($0) })
}

/// The naive algorithm in any precision: materialise each row's visible scores,
/// subtract the row max, exponentiate, normalise, multiply by the values.
private func naiveAttention<T: BinaryFloatingPoint>(
    query: Tensor, key: Tensor, value: Tensor, scale: T, visible: Visibility,
    bias: PairTerm<T>?, weight: PairTerm<T>?,
    exp: (T) -> T, log: (T) -> T
) -> ReferenceResult<T> {
    let (nb, nh, nhkv, nq, nk, d, dv) = referenceDims(query, key, value)
    let group = nh / nhkv
    let q = query.elements.map { T($0) }, k = key.elements.map { T($0) }
    let v = value.elements.map { T($0) }
    var output = [T](repeating: 0, count: nb * nh * nq * dv)
    var lse = [T](repeating: -.infinity, count: nb * nh * nq)
    var scores = [T](repeating: 0, count: nk)
    var keys = [Int]()
    keys.reserveCapacity(nk)
    for b in 0..<nb { for h in 0..<nh {
        let hk = h / group
        for i in 0..<nq {
            keys.removeAll(keepingCapacity: true)
            for j in 0..<nk where visible(b, h, i, j) { keys.append(j) }
            let row = (b * nh + h) * nq + i
            guard !keys.isEmpty else { continue }   // output 0, lse -inf
            let qBase = row * d
            var m = -T.infinity
            for j in keys {
                let kBase = ((b * nhkv + hk) * nk + j) * d
                var dot: T = 0
                for c in 0..<d { dot += q[qBase + c] * k[kBase + c] }
                scores[j] = scale * dot + (bias?(b, h, i, j) ?? 0)
                m = max(m, scores[j])
            }
            var sum: T = 0
            let oBase = row * dv
            for j in keys {
                let p = exp(scores[j] - m) * (weight?(b, h, i, j) ?? 1)
                sum += p
                let vBase = ((b * nhkv + hk) * nk + j) * dv
                for c in 0..<dv { output[oBase + c] += p * v[vBase + c] }
            }
            for c in 0..<dv { output[oBase + c] /= sum }
            lse[row] = m + log(sum)
        }
    } }
    return ReferenceResult(batch: nb, heads: nh, queryLength: nq, valueDim: dv, output: output, lse: lse)
}

// MARK: - Checker

/// Errors of one result against the Double reference.
struct AttentionErrors: CustomStringConvertible {
    var output: Double = 0
    var lse: Double = 0
    /// Largest |reference output| and |reference lse| over finite rows.
    var outputScale: Double = 0
    var lseScale: Double = 0

    var description: String { "output err \(output), lse err \(lse)" }
}

/// Max-abs errors of `output` / `lse` (row-major Float arrays) against `reference`,
/// over rows whose reference lse is finite.
func attentionErrors(output: [Float], lse: [Float], reference: ReferenceResult<Double>) -> AttentionErrors {
    var errors = AttentionErrors()
    let dv = reference.valueDim
    for row in reference.lse.indices where reference.lse[row].isFinite {
        errors.lse = max(errors.lse, abs(Double(lse[row]) - reference.lse[row]))
        errors.lseScale = max(errors.lseScale, abs(reference.lse[row]))
        for c in 0..<dv {
            let r = reference.output[row * dv + c]
            errors.output = max(errors.output, abs(Double(output[row * dv + c]) - r))
            errors.outputScale = max(errors.outputScale, abs(r))
        }
    }
    return errors
}

/// Checks a library result against the Double reference with the tolerance given by
/// the naive Float implementation:
///
/// - shapes are `[B, H, Nq, Dv]` and `[B, H, Nq, 1]`;
/// - no NaN anywhere in the output or the lse;
/// - rows where the reference lse is -infinity have lse exactly -infinity and output
///   exactly 0; every other row has a finite lse;
/// - `maxAbsErr(lib) <= 3 · maxAbsErr(naive) + 1e-6 · (1 + max |ref|)`, separately for
///   the output and the lse (over finite rows).
///
/// Returns the library's errors (for callers that want to print them).
@discardableResult
func checkAttention(_ result: AttentionResult, reference: ReferenceResult<Double>,
                    naive: ReferenceResult<Float>, _ label: String,
                    sourceLocation: SourceLocation = #_sourceLocation) -> AttentionErrors {
    let shape = reference.shape
    let lseShape = [reference.batch, reference.heads, reference.queryLength, 1]
    #expect(result.output.shape == shape,
            "\(label): output shape \(result.output.shape), expected \(shape)", sourceLocation: sourceLocation)
    #expect(result.logSumExp.shape == lseShape,
            "\(label): lse shape \(result.logSumExp.shape), expected \(lseShape)", sourceLocation: sourceLocation)
    guard result.output.shape == shape, result.logSumExp.shape == lseShape else {
        return AttentionErrors(output: .infinity, lse: .infinity)
    }
    let output = result.output.elements, lse = result.logSumExp.elements
    let dv = reference.valueDim

    let nanOutputs = output.lazy.filter { $0.isNaN }.count
    let nanLSE = lse.lazy.filter { $0.isNaN }.count
    #expect(nanOutputs == 0 && nanLSE == 0,
            "\(label) \(shape): \(nanOutputs) NaN outputs, \(nanLSE) NaN lse values", sourceLocation: sourceLocation)

    var emptyRowViolations: [String] = []
    var infiniteFiniteRows: [String] = []
    for row in reference.lse.indices {
        if reference.lse[row] == -.infinity {
            let nonzero = (0..<dv).filter { output[row * dv + $0] != 0 }.count
            if lse[row] != -.infinity || nonzero > 0 {
                emptyRowViolations.append("row \(row): lse \(lse[row]), \(nonzero) nonzero outputs")
            }
        } else if !lse[row].isFinite {
            infiniteFiniteRows.append("row \(row): lse \(lse[row]), reference \(reference.lse[row])")
        }
    }
    #expect(emptyRowViolations.isEmpty,
            "\(label) \(shape): rows with no visible key must be 0 with lse -inf; \(emptyRowViolations.count) are not, e.g. \(emptyRowViolations.prefix(3))",
            sourceLocation: sourceLocation)
    #expect(infiniteFiniteRows.isEmpty,
            "\(label) \(shape): rows with visible keys must have a finite lse; \(infiniteFiniteRows.count) do not, e.g. \(infiniteFiniteRows.prefix(3))",
            sourceLocation: sourceLocation)

    let lib = attentionErrors(output: output, lse: lse, reference: reference)
    let base = attentionErrors(output: naive.output, lse: naive.lse, reference: reference)
    let outputBound = 3 * base.output + 1e-6 * (1 + base.outputScale)
    let lseBound = 3 * base.lse + 1e-6 * (1 + base.lseScale)
    #expect(lib.output <= outputBound,
            "\(label) \(shape): output error \(lib.output) > bound \(outputBound) (naive Float error \(base.output), max |ref| \(base.outputScale))",
            sourceLocation: sourceLocation)
    #expect(lib.lse <= lseBound,
            "\(label) \(shape): lse error \(lib.lse) > bound \(lseBound) (naive Float error \(base.lse), max |ref lse| \(base.lseScale))",
            sourceLocation: sourceLocation)
    return lib
}

/// Runs `attention` on `query`, `key`, `value` and checks it against the Double reference
/// and the naive Float implementation with `visible` and `scale` (nil: `1/sqrt(D)`).
@discardableResult
func checkAgainstReference(_ attention: some Attention, query: Tensor, key: Tensor, value: Tensor,
                           keyLengths: [Int]? = nil, threads: Int? = nil,
                           scale: Float?, visible: Visibility, _ label: String,
                           sourceLocation: SourceLocation = #_sourceLocation) throws -> AttentionResult {
    let d = query.shape[3]
    let result = try attention.attend(query: query, key: key, value: value,
                                      keyLengths: keyLengths, threads: threads)
    let reference = referenceAttention(query: query, key: key, value: value,
                                       scale: scale.map(Double.init) ?? defaultScale(headDim: d),
                                       visible: visible)
    let naive = naiveFloatAttention(query: query, key: key, value: value,
                                    scale: scale ?? 1 / Float(d).squareRoot(), visible: visible)
    checkAttention(result, reference: reference, naive: naive, label, sourceLocation: sourceLocation)
    return result
}

/// Converts a Double reference into a library result (Float), e.g. to merge partial
/// reference results.
func attentionResult(_ reference: ReferenceResult<Double>) throws -> AttentionResult {
    try AttentionResult(
        output: Tensor(shape: reference.shape, data: reference.output.map { Float($0) }),
        logSumExp: Tensor(shape: [reference.batch, reference.heads, reference.queryLength, 1],
                          data: reference.lse.map { Float($0) }))
}

// MARK: - Tensors

/// A row-major tensor of uniform values in `range` from `seed`.
func randomTensor(_ shape: [Int], seed: UInt64, in range: ClosedRange<Float> = -1...1) throws -> Tensor {
    try Tensor.random(shape: shape, seed: seed, in: range)
}

/// Random query, key and value for a problem, seeded from `seed`.
func randomQKV(batch: Int = 1, heads: Int, kvHeads: Int? = nil, queryLength: Int, keyLength: Int? = nil,
               headDim: Int, valueDim: Int? = nil, seed: UInt64,
               range: ClosedRange<Float> = -1...1) throws -> (q: Tensor, k: Tensor, v: Tensor) {
    let hkv = kvHeads ?? heads, nk = keyLength ?? queryLength, dv = valueDim ?? headDim
    return (try randomTensor([batch, heads, queryLength, headDim], seed: seed &* 3 &+ 1, in: range),
            try randomTensor([batch, hkv, nk, headDim], seed: seed &* 3 &+ 2, in: range),
            try randomTensor([batch, hkv, nk, dv], seed: seed &* 3 &+ 3, in: range))
}

/// `tensor`'s elements in a larger buffer filled with NaN: every axis has a padded
/// stride (the innermost one is `innerStride`; rows, heads and batch items are separated
/// by NaN gaps), the first element is at a nonzero offset, and NaN trails the last
/// element. Only the addressed elements hold the tensor's values.
func embeddedInNaN(_ tensor: Tensor, innerStride: Int = 1) throws -> Tensor {
    let s = tensor.shape
    let s3 = innerStride
    let s2 = s[3] * s3 + 5
    let s1 = s[2] * s2 + 7
    let s0 = s[1] * s1 + 11
    let offset = 13
    let last = offset + (s[0] - 1) * s0 + (s[1] - 1) * s1 + (s[2] - 1) * s2 + (s[3] - 1) * s3
    var storage = [Float](repeating: .nan, count: last + 1 + 17)
    let values = tensor.elements
    var n = 0
    for a in 0..<s[0] { for b in 0..<s[1] { for c in 0..<s[2] { for d in 0..<s[3] {
        storage[offset + a * s0 + b * s1 + c * s2 + d * s3] = values[n]
        n += 1
    } } } }
    let embedded = try Tensor(shape: s, storage: storage, strides: [s0, s1, s2, s3], offset: offset)
    precondition(embedded.elements == values, "embedding lost values")
    return embedded
}

/// The elements of `a` and `b` are the same bit patterns (so -inf matches -inf and a
/// NaN would only match the same NaN).
func bitwiseEqual(_ a: [Float], _ b: [Float]) -> Bool {
    a.count == b.count && zip(a, b).allSatisfy { $0.bitPattern == $1.bitPattern }
}

/// Index of the first element where `a` and `b` differ bitwise, with both values.
func firstDifference(_ a: [Float], _ b: [Float]) -> String {
    guard a.count == b.count else { return "counts \(a.count) vs \(b.count)" }
    guard let i = a.indices.first(where: { a[$0].bitPattern != b[$0].bitPattern }) else { return "none" }
    return "element \(i): \(a[i]) vs \(b[i])"
}

/// Checks that two results are bitwise identical (output and lse).
func expectBitwiseEqual(_ a: AttentionResult, _ b: AttentionResult, _ label: String,
                        sourceLocation: SourceLocation = #_sourceLocation) {
    #expect(a.output.shape == b.output.shape && a.logSumExp.shape == b.logSumExp.shape,
            "\(label): shapes \(a.output.shape) vs \(b.output.shape)", sourceLocation: sourceLocation)
    let (oa, ob) = (a.output.elements, b.output.elements)
    let (la, lb) = (a.logSumExp.elements, b.logSumExp.elements)
    #expect(bitwiseEqual(oa, ob), "\(label): outputs differ at \(firstDifference(oa, ob))",
            sourceLocation: sourceLocation)
    #expect(bitwiseEqual(la, lb), "\(label): lse differ at \(firstDifference(la, lb))",
            sourceLocation: sourceLocation)
}

/// `a` and `b` agree within `tolerance` (absolute, outputs and finite log-sum-exps; equal
/// infinities): two kernels computing the same definition in different orders (the tiled
/// kernel and the decode kernel, for example).
func expectClose(_ a: AttentionResult, _ b: AttentionResult, tolerance: Float = 1e-5, _ label: String,
                 sourceLocation: SourceLocation = #_sourceLocation) {
    let (oa, ob) = (a.output.elements, b.output.elements)
    let (la, lb) = (a.logSumExp.elements, b.logSumExp.elements)
    #expect(oa.count == ob.count && la.count == lb.count, "\(label): shapes differ", sourceLocation: sourceLocation)
    let outputError = zip(oa, ob).map { abs($0 - $1) }.max() ?? 0
    let lseMatch = zip(la, lb).allSatisfy { $0 == $1 || abs($0 - $1) <= tolerance }
    #expect(outputError <= tolerance, "\(label): outputs differ by \(outputError)", sourceLocation: sourceLocation)
    #expect(lseMatch, "\(label): log-sum-exps differ", sourceLocation: sourceLocation)
}
