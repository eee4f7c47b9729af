// The shape checks every backward pass shares: a misshapen output, log-sum-exp or output
// gradient throws a shape mismatch naming it.

@_spi(Testing) import EfficientAttention
import Testing

/// Expects `attention`'s gradients to throw ``AttentionError/shapeMismatch(_:)`` naming
/// `output`, `logSumExp` or `outputGradient` when that one is replaced by `wrong`.
func expectMisshapenGradientInputsThrow(_ attention: some DifferentiableAttention, query q: Tensor, key k: Tensor,
                                        value v: Tensor, result: AttentionResult, outputGradient dO: Tensor,
                                        wrong: Tensor, sourceLocation: SourceLocation = #_sourceLocation) {
    for (name, o, l, g) in [("output", wrong, result.logSumExp, dO), ("logSumExp", result.output, wrong, dO),
                            ("outputGradient", result.output, result.logSumExp, wrong)] {
        expectAttentionError(.shapeMismatch, mentioning: [name], sourceLocation: sourceLocation) {
            try attention.gradients(query: q, key: k, value: v, output: o, logSumExp: l, outputGradient: g,
                                    keyLengths: nil, threads: nil)
        }
    }
}
