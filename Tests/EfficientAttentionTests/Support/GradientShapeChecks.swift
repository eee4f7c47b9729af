// The shape checks every backward pass shares: a misshapen output, log-sum-exp or output
// gradient throws a shape mismatch naming it.

@_spi(Testing) import EfficientAttention
import Testing

/// The three misshapen cases: `wrong` in place of the output, the log-sum-exp or the
/// output gradient, each with the name the error must give.
func misshapenGradientInputs(result: AttentionResult, outputGradient dO: Tensor, wrong: Tensor)
    -> [(name: String, output: Tensor, logSumExp: Tensor, outputGradient: Tensor)] {
    [("output", wrong, result.logSumExp, dO), ("logSumExp", result.output, wrong, dO),
     ("outputGradient", result.output, result.logSumExp, wrong)]
}

/// Expects `attention`'s gradients to throw ``AttentionError/shapeMismatch(_:)`` naming
/// `output`, `logSumExp` or `outputGradient` when that one is replaced by `wrong`.
func expectMisshapenGradientInputsThrow(_ attention: some DifferentiableAttention, query q: Tensor, key k: Tensor,
                                        value v: Tensor, result: AttentionResult, outputGradient dO: Tensor,
                                        wrong: Tensor, _ label: String = "",
                                        sourceLocation: SourceLocation = #_sourceLocation) {
    for c in misshapenGradientInputs(result: result, outputGradient: dO, wrong: wrong) {
        expectAttentionError(.shapeMismatch, mentioning: [c.name], label, sourceLocation: sourceLocation) {
            try attention.gradients(query: q, key: k, value: v, output: c.output, logSumExp: c.logSumExp,
                                    outputGradient: c.outputGradient, keyLengths: nil, threads: nil)
        }
    }
}
