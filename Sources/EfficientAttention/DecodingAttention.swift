/// Attention that decodes: it attends the next positions of each sequence given a state
/// that holds everything before them, so that an engine runs every such conformer alike
/// (prefill with the first positions, then one or a few positions per step).
///
/// - ``MultiQueryAttention``: the state is a ``KVCache`` (one layer) that keeps the keys
///   and values; a step appends the new ones and runs the split-KV decode kernel.
///   ``MultiQueryDecoding`` (`MultiQueryAttention(...).decoding(cache:precision:)`) does the
///   same with any cache kind (contiguous, rotating, paged) and precision (Float32, Float16,
///   bfloat16, Int8); its state is that ``DecodingCache``.
/// - ``LinearAttention``: the state is its ``LinearAttention/RecurrentState``
///   (`S = Σ φ(k) vᵀ`, `z = Σ φ(k)`), of constant size; a step folds the new positions in.
///
/// A step over `n` new positions equals, up to rounding, the conformer's `attend` over the
/// whole history with the new positions as the last `n` queries (causal: each new position
/// sees the history and the new positions up to itself).
public protocol DecodingAttention: Attention {
    /// What a decoding step reads and extends.
    associatedtype DecodingState

    /// A state for `batch` sequences of query heads `heads`, key/value heads `kvHeads`, head
    /// dimensions `headDim` and `valueDim`, holding up to `capacity` positions (a bound
    /// for states that store positions; ignored by constant-size states).
    func makeDecodingState(batch: Int, heads: Int, kvHeads: Int, headDim: Int, valueDim: Int,
                           capacity: Int) throws -> DecodingState

    /// Attends `query` `[B, H, n, D]` (the next `n` positions of every sequence) over the
    /// history in `state` and the new positions' own keys and values (`key [B, Hkv, n, D]`,
    /// `value [B, Hkv, n, Dv]`), which are then part of `state`. All-or-nothing: on a thrown
    /// error `state` is unchanged.
    func attendNext(query: Tensor, key: Tensor, value: Tensor, state: inout DecodingState,
                    threads: Int?) throws -> AttentionResult
}
