// The view entry point of a backward pass against its Tensor convenience: every input in
// NaN-padded strided memory, the gradients written into strided memory filled with 12345
// (every element must be written), a caller's workspace of the backward cost's size.

@_spi(Testing) @_spi(Benchmarking) import EfficientAttention
import Testing

/// `attention`'s gradients through the view entry point: inputs and gradients as strided
/// NaN-padded views, the gradients' memory filled with 12345 beforehand (every element must
/// be written), a workspace of exactly the backward cost for `threads` (`workspaceShort`
/// makes it one byte short).
func viewPathGradients(_ attention: some DifferentiableAttention, shape: AttentionShape, q: Tensor, k: Tensor,
                       v: Tensor, result: AttentionResult, dO: Tensor, keyLengths: [Int]?, threads: Int = 3,
                       workspaceShort: Bool = false) throws -> AttentionGradients {
    let bytes = try attention.backwardCost(shape, threads: threads).workspaceBytes - (workspaceShort ? 1 : 0)
    let workspace = try AttentionWorkspace(byteCount: bytes)
    var dq = try embeddedInNaN(try Tensor(shape: q.shape, repeating: 12345), innerStride: 2)
    var dk = try embeddedInNaN(try Tensor(shape: k.shape, repeating: 12345))
    var dv = try embeddedInNaN(try Tensor(shape: v.shape, repeating: 12345), innerStride: 3)
    let (eq, ek, ev) = (try embeddedInNaN(q, innerStride: 2), try embeddedInNaN(k), try embeddedInNaN(v, innerStride: 2))
    let (eo, el, eg) = (try embeddedInNaN(result.output), try embeddedInNaN(result.logSumExp),
                        try embeddedInNaN(dO, innerStride: 2))
    try eq.withStridedView { qv in try ek.withStridedView { kv in try ev.withStridedView { vv in
    try eo.withStridedView { ov in try el.withStridedView { lv in try eg.withStridedView { gv in
    try dq.withMutableStridedView { dQ in try dk.withMutableStridedView { dK in try dv.withMutableStridedView { dV in
        try attention.gradients(query: qv, key: kv, value: vv, output: ov, logSumExp: lv, outputGradient: gv,
                                dQuery: dQ, dKey: dK, dValue: dV, keyLengths: keyLengths,
                                workspace: workspace, threads: threads)
    } } } } } } } } }
    return AttentionGradients(dQuery: dq, dKey: dk, dValue: dv)
}

/// Runs `attention`'s view entry point through ``viewPathGradients`` (3 threads) and expects
/// the gradients of the Tensor convenience (2 threads) bit for bit.
func expectViewEntryPointMatchesTensors(_ attention: some DifferentiableAttention, shape: AttentionShape,
                                        query q: Tensor, key k: Tensor, value v: Tensor, result: AttentionResult,
                                        outputGradient dO: Tensor, keyLengths: [Int]?, _ label: String,
                                        sourceLocation: SourceLocation = #_sourceLocation) throws {
    let expected = try attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                           keyLengths: keyLengths, threads: 2)
    let views = try viewPathGradients(attention, shape: shape, q: q, k: k, v: v, result: result, dO: dO,
                                      keyLengths: keyLengths)
    expectBitwiseEqualGradients(expected, views, label, sourceLocation: sourceLocation)
}
