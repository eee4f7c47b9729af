// VanillaAttention's materialised backward against the hand-differentiated Double
// reference of DenseBackwardTests.swift (checked there by central finite differences): the
// same cases as the dense backward, head dimensions beyond the tiled kernel's limit,
// bitwise identity across thread counts, views equal to tensors, and the inputs that throw.

@_spi(Testing) @_spi(Benchmarking) import EfficientAttention
import Foundation
import Testing

extension BackwardCase {
    var vanilla: VanillaAttention { VanillaAttention(causal: causal, scale: scale) }

    /// The vanilla backward on the case's inputs, checked against the Double reference.
    @discardableResult
    func checkVanilla(threads: Int? = nil, sourceLocation: SourceLocation = #_sourceLocation) throws
        -> AttentionGradients {
        let (q, k, v) = try randomQKV(batch: batch, heads: heads, kvHeads: kvHeads, queryLength: queryLength,
                                      keyLength: keyLength, headDim: headDim, valueDim: valueDim, seed: seed)
        let dO = try randomTensor([batch, heads, queryLength, valueDim ?? headDim], seed: seed &* 7 &+ 5)
        let result = try vanilla.attend(query: q, key: k, value: v, keyLengths: keyLengths, threads: threads)
        let reference = referenceBackward(query: q, key: k, value: v, outputGradient: dO,
                                          scale: scale.map(Double.init) ?? defaultScale(headDim: headDim),
                                          visible: visible)
        let naive = naiveFloatBackward(query: q, key: k, value: v, outputGradient: dO,
                                       scale: scale ?? 1 / Float(headDim).squareRoot(), visible: visible)
        let g = try vanilla.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                      keyLengths: keyLengths, threads: threads)
        checkGradients(g, reference: reference, naive: naive, dims: GradientDims(query: q, value: v), visible: visible,
                       "vanilla \(testDescription)", sourceLocation: sourceLocation)
        return g
    }
}

@Suite("Vanilla backward")
struct VanillaBackwardTests {
    static let cases = BackwardCases.lengths + BackwardCases.headDims + BackwardCases.valueDims
        + BackwardCases.unequalLengths + BackwardCases.keyPadding + BackwardCases.scales
        + [BackwardCase(queryLength: 20, keyLength: 23, headDim: 300, valueDim: 2, causal: true, seed: 3000),
           BackwardCase(heads: 4, kvHeads: 1, queryLength: 9, headDim: 257, valueDim: 260, seed: 3001)]

    @Test("matches the hand-differentiated Double reference", arguments: cases)
    func reference(_ c: BackwardCase) throws { try c.checkVanilla() }

    @Test("bitwise identical gradients for 1, 2, 3 and 7 threads")
    func determinism() throws {
        let c = BackwardCase(batch: 2, heads: 4, kvHeads: 2, queryLength: 70, keyLength: 50, headDim: 33,
                             valueDim: 17, causal: true, keyLengths: [50, 21], seed: 3100)
        let runs = try [1, 2, 3, 7].map { try c.checkVanilla(threads: $0) }
        for g in runs.dropFirst() {
            #expect(bitwiseEqual(runs[0].dQuery.elements, g.dQuery.elements))
            #expect(bitwiseEqual(runs[0].dKey.elements, g.dKey.elements))
            #expect(bitwiseEqual(runs[0].dValue.elements, g.dValue.elements))
        }
    }

    @Test("the view entry point on NaN-padded strided views equals the tensor path")
    func views() throws {
        let c = BackwardCase(batch: 2, heads: 2, queryLength: 30, keyLength: 25, headDim: 5, valueDim: 7,
                             keyLengths: [0, 25], seed: 3200)
        let (q, k, v, _, dO) = try c.inputs()
        let result = try c.vanilla.attend(query: q, key: k, value: v, keyLengths: c.keyLengths, threads: 2)
        let expected = try c.vanilla.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                               keyLengths: c.keyLengths, threads: 2)
        let padded = try [q, k, v, dO, result.output, result.logSumExp].map { try embeddedInNaN($0, innerStride: 2) }
        let g = try c.vanilla.gradients(query: padded[0], key: padded[1], value: padded[2],
                                        result: AttentionResult(output: padded[4], logSumExp: padded[5]),
                                        outputGradient: padded[3], keyLengths: c.keyLengths, threads: 3)
        #expect(bitwiseEqual(expected.dQuery.elements, g.dQuery.elements))
        #expect(bitwiseEqual(expected.dKey.elements, g.dKey.elements))
        #expect(bitwiseEqual(expected.dValue.elements, g.dValue.elements))
    }

    @Test("bad inputs throw, naming the option")
    func badInputs() throws {
        let c = BackwardCase(queryLength: 6, keyLength: 5, headDim: 4, seed: 3300)
        let (q, k, v, result, dO) = try c.inputs()
        let wrong = try Tensor(shape: [1, 2, 5, 4])
        expectAttentionError(.shapeMismatch, mentioning: ["outputGradient"]) {
            try c.vanilla.gradients(query: q, key: k, value: v, output: result.output, logSumExp: result.logSumExp,
                                    outputGradient: wrong, keyLengths: nil, threads: 1)
        }
        expectAttentionError(.shapeMismatch, mentioning: ["logSumExp"]) {
            try c.vanilla.gradients(query: q, key: k, value: v, output: result.output, logSumExp: result.output,
                                    outputGradient: dO, keyLengths: nil, threads: 1)
        }
        expectAttentionError(.invalidParameter, mentioning: ["threads"]) {
            try c.vanilla.gradients(query: q, key: k, value: v, result: result, outputGradient: dO, threads: 0)
        }
        let forward = try c.vanilla.cost(AttentionShape(heads: 2, queryLength: 6, keyLength: 5, headDim: 4), threads: 1)
        let backward = try c.vanilla.backwardCost(AttentionShape(heads: 2, queryLength: 6, keyLength: 5, headDim: 4),
                                                  threads: 1)
        #expect(backward.flops == 2.5 * forward.flops && backward.workspaceBytes == forward.workspaceBytes)
    }
}
