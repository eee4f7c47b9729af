// The Double reference of Transformer-XL's relative scores, shared by the
// Transformer-XL and Compressive Transformer tests: the relative term of a pair and a
// checker of a result over keys [memory ; segment] (moved from
// TransformerXLAttentionTests.swift unchanged).

import EfficientAttention
import Foundation
import Testing

/// The relative part of the spec's score, `scale · (q_i·r_Δ + u·k_j + v·r_Δ)` with
/// `Δ = i + memory − j`, in precision `T` (the reference adds it to `scale · q_i·k_j`).
func relativeTerm<T: BinaryFloatingPoint>(_ attention: TransformerXLAttention, query: Tensor, key: Tensor,
                                          memory: Int, scale: T) -> PairTerm<T> {
    let (h, nq, d) = (query.shape[1], query.shape[2], query.shape[3])
    let (hkv, nk) = (key.shape[1], key.shape[2])
    let table = attention.relativePositions
    let (tableHeads, rows) = (table.shape[1], table.shape[2])
    let q = query.elements.map { T($0) }, k = key.elements.map { T($0) }, r = table.elements.map { T($0) }
    let u = attention.contentBias.map { T($0) }, v = attention.positionBias.map { T($0) }
    return { b, head, i, j in
        let delta = i + memory - j
        guard delta >= 0, delta < rows else { return 0 }   // invisible pair
        let qBase = ((b * h + head) * nq + i) * d
        let kBase = ((b * hkv + head / (h / hkv)) * nk + j) * d
        let rBase = ((tableHeads == 1 ? 0 : head) * rows + delta) * d
        var qr: T = 0, uk: T = 0, vr: T = 0
        for c in 0..<d {
            qr += q[qBase + c] * r[rBase + c]
            uk += u[head * d + c] * k[kBase + c]
            vr += v[head * d + c] * r[rBase + c]
        }
        return scale * (qr + uk + vr)
    }
}

/// Checks `result` against the reference over keys `[memory ; segment]` (`key`, `value`
/// already concatenated; `memory = Nk − Nq`), hiding keys before `keyBegins[b]`.
func checkXL(_ result: AttentionResult, _ attention: TransformerXLAttention,
             query: Tensor, key: Tensor, value: Tensor, keyBegins: [Int]? = nil, _ label: String,
             sourceLocation: SourceLocation = #_sourceLocation) {
    let (nq, nk, d) = (query.shape[2], key.shape[2], query.shape[3])
    let memory = nk - nq
    var visible = Visible.causal(queryLength: nq, keyLength: nk)
    if let keyBegins { visible = Visible.both(visible, { b, _, _, j in j >= keyBegins[b] }) }
    let scale = attention.scale ?? 1 / Float(d).squareRoot()
    let reference = referenceAttention(
        query: query, key: key, value: value, scale: Double(scale), visible: visible,
        bias: relativeTerm(attention, query: query, key: key, memory: memory, scale: Double(scale)))
    let naive = naiveFloatAttention(
        query: query, key: key, value: value, scale: scale, visible: visible,
        bias: relativeTerm(attention, query: query, key: key, memory: memory, scale: scale))
    checkAttention(result, reference: reference, naive: naive, label, sourceLocation: sourceLocation)
}
