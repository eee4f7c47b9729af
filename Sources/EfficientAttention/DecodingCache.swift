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
    /// Bytes of the positions held, over every layer and batch item (what decode calls on
    /// every layer read): `Σ length · Hkv · (rowBytes(D) + rowBytes(Dv))`.
    var usedBytes: Int { get }
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

/// Calls `visitor` with the rows of `layer` of `cache`, dispatched on the cache's concrete
/// type first: through the existential alone, `visitRows` and the kernel under it would
/// run unspecialised (generic code calling the row and element methods through witness
/// tables: twice the time of a decode step, measured); with the concrete type known, the
/// compiler specialises the whole decode for each layout and precision.
func visitRows<V: CacheRowsVisitor>(of cache: any DecodableCache, layer: Int, _ visitor: V) {
    switch cache {
    case let contiguous as KVCache: contiguous.visitRows(layer: layer, visitor)
    case let ring as RotatingKVCache: ring.visitRows(layer: layer, visitor)
    case let paged as PagedKVCache.Batch: paged.visitRows(layer: layer, visitor)
    default: cache.visitRows(layer: layer, visitor)
    }
}

/// One decode: the kernel over the visited rows.
struct DecodeRun: CacheRowsVisitor {
    let shape: AttentionShape, scale: Float, threads: Int, split: Int
    let q: TensorView, o: MutableTensorView, lse: MutableTensorView
    let modifiers: ScoreModifierKernel?
    let masks: [IntervalMask]

    func visit<R: KVRows>(keys: R, values: R) {
        DecodeAttention.run(shape: shape, scale: scale, threads: threads, split: split,
                            q: q, keys: keys, values: values, o: o, lse: lse, modifiers: modifiers) { masks[$0] }
    }
}

/// ``MultiQueryAttention`` decoding through the ``DecodingAttention`` protocol against a
/// chosen cache kind and precision, so an engine runs every kind alike:
///
/// ```
/// let decoder = MultiQueryAttention(causal: true, leftWindow: 4095)
///     .decoding(cache: .rotating(window: 4096), precision: .int8)
/// var state = try decoder.makeDecodingState(batch: 1, heads: 32, kvHeads: 8, headDim: 128,
///                                           valueDim: 128, capacity: 32768)
/// let r = try decoder.attendNext(query: q, key: k, value: v, state: &state, threads: nil)
/// ```
///
/// The state is the cache (``DecodingCache``): a ``KVCache`` of `capacity` positions, a
/// ``RotatingKVCache`` of `window` positions (capacity ignored), or a batch of `batch`
/// sequences of a ``PagedKVCache`` (`pageCount` pages, or enough for `batch · capacity`
/// positions when `nil`). `attend` and the rest of ``Attention`` are the wrapped attention's.
public struct MultiQueryDecoding: DecodingAttention {
    /// Which cache a decoding state is.
    public enum CacheKind: Sendable, Hashable {
        case contiguous
        case rotating(window: Int)
        case paged(pageSize: Int, pageCount: Int?)
    }

    public var attention: MultiQueryAttention
    public var cacheKind: CacheKind
    public var precision: KVCache.Precision

    public init(_ attention: MultiQueryAttention, cacheKind: CacheKind = .contiguous,
                precision: KVCache.Precision = .float32) {
        self.attention = attention
        self.cacheKind = cacheKind
        self.precision = precision
    }

    public var name: String { attention.name }

    public func validate(_ shape: AttentionShape) throws {
        try attention.validate(shape)
        switch cacheKind {
        case .contiguous: break
        case .rotating(let window):
            try checkOption(window, "rotating cache window", in: 1...lengthLimit, variant: "multi-query decoding")
        case .paged(let pageSize, let pageCount):
            try checkOption(pageSize, "paged cache pageSize", in: 1...lengthLimit, variant: "multi-query decoding")
            guard pageSize & (pageSize - 1) == 0 else {
                throw AttentionError.invalidParameter("multi-query decoding: paged cache pageSize must be a power of two, got \(pageSize)")
            }
            if let pageCount {
                try checkOption(pageCount, "paged cache pageCount", in: 1...lengthLimit, variant: "multi-query decoding")
            }
        }
    }

    public func cost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        try validate(shape)
        return try attention.cost(shape, threads: threads)
    }

    public func attend(query: StridedView, key: StridedView, value: StridedView,
                       output: MutableStridedView, logSumExp: MutableStridedView?,
                       keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws {
        try attention.attend(query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                             keyLengths: keyLengths, workspace: workspace, threads: threads)
    }

    public func attend(query: ActivationView, key: ActivationView, value: ActivationView,
                       output: MutableActivationView, logSumExp: MutableStridedView?,
                       keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws {
        try attention.attend(query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                             keyLengths: keyLengths, workspace: workspace, threads: threads)
    }

    public func conversionScratchBytes(_ shape: AttentionShape, precisions: OperandPrecisions) -> Int {
        attention.conversionScratchBytes(shape, precisions: precisions)
    }

    /// A one-layer cache of the configured kind and precision for `batch` sequences.
    public func makeDecodingState(batch: Int, heads: Int, kvHeads: Int, headDim: Int, valueDim: Int,
                                  capacity: Int) throws -> any DecodingCache {
        try validate(AttentionShape(batch: batch, heads: heads, kvHeads: kvHeads, queryLength: 1,
                                    keyLength: max(1, capacity), headDim: headDim, valueDim: valueDim))
        switch cacheKind {
        case .contiguous:
            return try KVCache(batch: batch, kvHeads: kvHeads, headDim: headDim, valueDim: valueDim,
                               capacity: capacity, precision: precision)
        case .rotating(let window):
            return try RotatingKVCache(batch: batch, kvHeads: kvHeads, headDim: headDim, valueDim: valueDim,
                                       window: window, precision: precision)
        case .paged(let pageSize, let pageCount):
            guard let pages = pageCount ?? checkedProduct([batch, (capacity + pageSize - 1) / pageSize]) else {
                throw AttentionError.sizeOverflow("paged cache pageCount (batch × ⌈capacity / pageSize⌉) overflows Int")
            }
            let cache = try PagedKVCache(kvHeads: kvHeads, headDim: headDim, valueDim: valueDim, pageSize: pageSize,
                                         pageCount: max(1, pages), precision: precision)
            return try cache.batch((0..<batch).map { _ in cache.addSequence() })
        }
    }

    /// Appends `key` and `value` to layer 0 of the cache, then decodes `query` against it.
    /// The problem is checked before the append; the append is all-or-nothing.
    public func attendNext(query: Tensor, key: Tensor, value: Tensor, state: inout any DecodingCache,
                           threads: Int? = nil) throws -> AttentionResult {
        let step = try checkedDecodingStep(query: query, key: key, value: value, cache: state)
        var after = step
        var held = 0
        for b in 0..<state.batch { held = max(held, try state.length(layer: 0, batchItem: b)) }
        after.keyLength = held + step.queryLength
        if case .rotating(let window) = cacheKind { after.keyLength = min(after.keyLength, window) }
        try validate(after)
        try checkCallArguments(after, keyLengths: nil, threads: threads)
        try state.append(layer: 0, keys: key, values: value)   // all-or-nothing
        return try attention.decode(query: query, cache: state, layer: 0, threads: threads)
    }
}

extension MultiQueryAttention {
    /// This attention decoding against a cache of `kind` in `precision` (``MultiQueryDecoding``).
    public func decoding(cache kind: MultiQueryDecoding.CacheKind,
                         precision: KVCache.Precision = .float32) -> MultiQueryDecoding {
        MultiQueryDecoding(self, cacheKind: kind, precision: precision)
    }
}

/// The checks of an `attendNext` step before anything is appended: the query, key and value
/// shapes agree, as many queries as new keys, and the cache's `B`, `Hkv`, `D`, `Dv`.
/// Returns the step's shape.
func checkedDecodingStep(query: Tensor, key: Tensor, value: Tensor, cache: some DecodingCache) throws -> AttentionShape {
    let step = try AttentionShape(query: query, key: key, value: value)
    guard step.queryLength == step.keyLength else {
        throw AttentionError.shapeMismatch(
            "attendNext takes as many queries as new keys, got Nq=\(step.queryLength) Nk=\(step.keyLength)")
    }
    guard step.batch == cache.batch, step.kvHeads == cache.kvHeads, step.headDim == cache.headDim,
          step.valueDim == cache.valueDim else {
        throw AttentionError.shapeMismatch(
            "the cache holds B=\(cache.batch) Hkv=\(cache.kvHeads) D=\(cache.headDim) Dv=\(cache.valueDim), the step is \(step)")
    }
    return step
}
