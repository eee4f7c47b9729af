/// A key/value cache the decode kernel reads in place: ``KVCache`` (contiguous),
/// ``RotatingKVCache`` (the last `W` positions in a ring buffer) or a batch of sequences of
/// a ``PagedKVCache`` (``PagedKVCache/Batch``), each in Float32, Float16, bfloat16 or Int8
/// (``KVCache/Precision``).
///
/// ``MultiQueryAttention/decode(query:cache:layer:threads:)`` decodes against any of them
/// with one kernel; ``MultiQueryDecoding`` runs them through the ``DecodingAttention``
/// protocol. Batch item `b` holds `length(layer:batchItem:)` positions; a decode treats them
/// as positions `0 ..< length` (the oldest held first), exactly as a contiguous cache
/// holding the same positions (causal and window limits are differences of positions, so
/// they are the same in absolute positions).
///
/// Only the library's caches conform (decoding others throws ``AttentionError/unsupported(_:)``).
public protocol DecodingCache: AnyObject {
    var layers: Int { get }
    /// Batch items (sequences) an append or a decode covers.
    var batch: Int { get }
    var kvHeads: Int { get }
    var headDim: Int { get }
    var valueDim: Int { get }
    var precision: KVCache.Precision { get }
    /// Bytes of key/value storage, exactly as allocated (for a paged batch: its pool's).
    var memoryBytes: Int { get }
    /// Positions `layer` of `batchItem` holds (what a decode reads).
    func length(layer: Int, batchItem: Int) throws -> Int
    /// Appends `keys` `[B, Hkv, n, D]` and `values` `[B, Hkv, n, Dv]` to every batch item of
    /// `layer`; all-or-nothing (a thrown error leaves the cache unchanged).
    func append(layer: Int, keys: Tensor, values: Tensor) throws
    /// The held keys of `layer`, `batchItem` as Float `[1, Hkv, length, D]`, oldest first, as
    /// the decode kernel reads them (rounded or dequantised).
    func keys(layer: Int, batchItem: Int) throws -> Tensor
    /// The held values, as ``keys(layer:batchItem:)``.
    func values(layer: Int, batchItem: Int) throws -> Tensor
}

/// Receives the rows of one layer of a cache, typed by layout and precision.
protocol CacheRowsVisitor {
    func visit<R: KVRows>(keys: R, values: R)
}

/// What the decode kernel needs from a cache.
protocol DecodableCache: DecodingCache {
    /// Held positions of `layer` per batch item; throws for an unknown layer (or an ended
    /// sequence of a paged batch).
    func heldLengths(layer: Int) throws -> [Int]
    /// Calls `visitor` with the rows of `layer` (valid during the call).
    func visitRows<V: CacheRowsVisitor>(layer: Int, _ visitor: V)
}

extension KVCache: DecodableCache {
    func heldLengths(layer: Int) throws -> [Int] {
        _ = try length(layer: layer, batchItem: 0)
        return lengths(layer: layer)
    }

    func visitRows<V: CacheRowsVisitor>(layer: Int, _ visitor: V) {
        switch precision {
        case .float32: let r = rows(layer: layer, as: Float.self); visitor.visit(keys: r.keys, values: r.values)
        case .float16: let r = rows(layer: layer, as: HalfElement.self); visitor.visit(keys: r.keys, values: r.values)
        case .bfloat16: let r = rows(layer: layer, as: BFloat16Bits.self); visitor.visit(keys: r.keys, values: r.values)
        case .int8: let r = rows(layer: layer, as: Int8.self); visitor.visit(keys: r.keys, values: r.values)
        }
    }
}

/// One decode: the kernel over the visited rows.
struct DecodeRun: CacheRowsVisitor {
    let shape: AttentionShape, scale: Float, threads: Int, split: Int
    let q: TensorView, o: MutableTensorView, lse: MutableTensorView
    let masks: [IntervalMask]

    func visit<R: KVRows>(keys: R, values: R) {
        DecodeAttention.run(shape: shape, scale: scale, threads: threads, split: split,
                            q: q, keys: keys, values: values, o: o, lse: lse) { masks[$0] }
    }
}
