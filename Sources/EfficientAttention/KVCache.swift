/// A growing store of keys and values for incremental decoding: per layer and per batch
/// item, up to `capacity` positions of `Hkv` key/value heads.
///
/// ```
/// let cache = try KVCache(layers: 2, batch: 1, kvHeads: 8, headDim: 128,
///                         capacity: 4096, precision: .float16)
/// try cache.append(layer: 0, keys: k, values: v)          // k [B, Hkv, n, D], v [B, Hkv, n, Dv]
/// let r = try MultiQueryAttention(causal: true).decode(query: q, cache: cache, layer: 0)
/// ```
///
/// Storage is allocated once, up front, for the full capacity: keys
/// `[layer][batch][kvHead][capacity]` rows of `D` and values the same with `Dv`, each row
/// contiguous, in Float32, Float16, bfloat16 or Int8 (``Precision``). 16-bit storage halves
/// the memory and the bytes a decode step reads; appends round to nearest even and the
/// decode kernel widens to Float in registers. Int8 stores each (position, head) row as
/// `round(x / s)` with one Float scale `s = max|x| / 127` before it (KernelDocs/MultiQuery.md,
/// "Cache kinds", for the error bound).
///
/// Appends are all-or-nothing: a wrong shape, an unknown layer or batch item, a
/// position past `capacity` (or, for Int8, a non-finite value) throws an ``AttentionError``
/// and leaves the cache unchanged.
///
/// The other kinds: ``RotatingKVCache`` (the last `W` positions in a ring buffer) and
/// ``PagedKVCache`` (pages from a shared pool); all decode through
/// ``MultiQueryAttention/decode(query:cache:layer:threads:)``.
///
/// `KVCache` is a reference type (the storage is large and meant to be shared by the
/// decode calls of one generation); it is not safe to mutate from several threads at once.
public final class KVCache: DecodingCache {
    /// How cached keys and values are stored.
    public enum Precision: String, Sendable, CaseIterable {
        case float32
        case float16
        /// bfloat16 (the upper half of a Float), rounded to nearest even.
        case bfloat16
        /// Int8 with one Float scale per (position, head) row, symmetric: `s = max|x| / 127`.
        case int8

        /// Bytes per stored element: 4, 2, 2 or 1 (Int8 rows also carry a 4-byte scale:
        /// ``rowBytes(width:)``).
        public var bytesPerElement: Int {
            switch self {
            case .float32: 4
            case .float16, .bfloat16: 2
            case .int8: 1
            }
        }

        /// Bytes of one stored row of `width` elements: `width · bytesPerElement`, plus 4
        /// for Int8's scale.
        public func rowBytes(width: Int) -> Int {
            width * bytesPerElement + (self == .int8 ? 4 : 0)
        }

        /// `rowBytes(width:)`, nil when it overflows `Int`.
        func checkedRowBytes(width: Int) -> Int? {
            let (bytes, overflow) = width.multipliedReportingOverflow(by: bytesPerElement)
            return overflow ? nil : bytes.addingReportingOverflow(self == .int8 ? 4 : 0).partialValue
        }
    }

    public let layers: Int
    public let batch: Int
    public let kvHeads: Int
    public let headDim: Int
    public let valueDim: Int
    /// Positions each (layer, batch item) can hold.
    public let capacity: Int
    public let precision: Precision

    /// `lengths[layer * batch + b]`: positions filled.
    private var lengths: [Int]
    private let keyStorage: UnsafeMutableRawPointer
    private let valueStorage: UnsafeMutableRawPointer
    private let keyStore: RowStore
    private let valueStore: RowStore

    /// An empty cache with storage for `capacity` positions per layer and batch item.
    ///
    /// Throws ``AttentionError/invalidShape(_:)`` for a size below 1 and
    /// ``AttentionError/sizeOverflow(_:)`` when the byte count overflows `Int`.
    ///
    /// - Complexity: O(1) time; ``memoryBytes`` of storage (not touched until appended).
    public init(layers: Int = 1, batch: Int = 1, kvHeads: Int, headDim: Int, valueDim: Int? = nil,
                capacity: Int, precision: Precision = .float32) throws {
        let valueDim = valueDim ?? headDim
        for (name, value) in [("layers", layers), ("batch", batch), ("kvHeads", kvHeads),
                              ("headDim", headDim), ("valueDim", valueDim), ("capacity", capacity)] where value < 1 {
            throw AttentionError.invalidShape("KVCache \(name) must be at least 1, got \(value)")
        }
        guard let keyRow = precision.checkedRowBytes(width: headDim), let valueRow = precision.checkedRowBytes(width: valueDim),
              let keyBytes = checkedProduct([layers, batch, kvHeads, capacity, keyRow]),
              let valueBytes = checkedProduct([layers, batch, kvHeads, capacity, valueRow]),
              keyBytes.addingReportingOverflow(valueBytes).overflow == false else {
            throw AttentionError.sizeOverflow(
                "KVCache of \(layers) layers x \(batch) x \(kvHeads) heads x \(capacity) positions x (\(headDim) + \(valueDim)) overflows Int bytes")
        }
        guard capacity <= lengthLimit else {
            throw AttentionError.invalidParameter("KVCache capacity must be at most \(lengthLimit), got \(capacity)")
        }
        _ = try checkedStorageBytes("KVCache", precision: precision, rows: [layers, batch, kvHeads, capacity],
                                    rowNames: "layers × batch × kvHeads × capacity", headDim: headDim, valueDim: valueDim)
        self.layers = layers
        self.batch = batch
        self.kvHeads = kvHeads
        self.headDim = headDim
        self.valueDim = valueDim
        self.capacity = capacity
        self.precision = precision
        self.lengths = [Int](repeating: 0, count: layers * batch)
        keyStorage = KVCache.allocateStorage(keyBytes)
        valueStorage = KVCache.allocateStorage(valueBytes)
        keyStore = RowStore(base: keyStorage, width: headDim, precision: precision)
        valueStore = RowStore(base: valueStorage, width: valueDim, precision: precision)
    }

    /// Storage of `bytes` bytes. Large stores are aligned to 2 MiB and, on Linux, marked
    /// for transparent huge pages (`madvise(MADV_HUGEPAGE)`): a decode step streams the
    /// whole cache, and 2 MiB pages spare it a TLB miss every 4 KiB.
    static func allocateStorage(_ bytes: Int) -> UnsafeMutableRawPointer {
        let huge = 2 << 20
        guard bytes >= 2 * huge else { return .allocate(byteCount: max(bytes, 1), alignment: 64) }
        let pointer = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: huge)
        markHugePages(pointer, byteCount: bytes)
        return pointer
    }

    deinit {
        keyStorage.deallocate()
        valueStorage.deallocate()
    }

    /// Bytes of key and value storage, exactly as allocated:
    /// `layers · batch · Hkv · capacity · (rowBytes(D) + rowBytes(Dv))`
    /// (``Precision/rowBytes(width:)``: `(D + Dv) · bytesPerElement`, plus 8 for Int8's scales).
    public var memoryBytes: Int {
        layers * batch * kvHeads * capacity * (keyStore.rowBytes + valueStore.rowBytes)
    }

    /// Bytes of the positions filled so far, over every layer and batch item
    /// (what decode calls on every layer read): `Σ length · Hkv · (rowBytes(D) + rowBytes(Dv))`.
    public var usedBytes: Int {
        lengths.reduce(0, +) * kvHeads * (keyStore.rowBytes + valueStore.rowBytes)
    }

    /// Positions filled in `layer` for batch item `batchItem`.
    public func length(layer: Int = 0, batchItem: Int = 0) throws -> Int {
        try checkLayer(layer)
        try checkBatchItem(batchItem)
        return lengths[layer * batch + batchItem]
    }

    /// Appends `n` positions to every batch item of `layer`: `keys` `[B, Hkv, n, D]`,
    /// `values` `[B, Hkv, n, Dv]` (any strides). All-or-nothing: throws and leaves the
    /// cache unchanged on a wrong shape or when a batch item would exceed `capacity`.
    ///
    /// - Complexity: O(B · Hkv · n · (D + Dv)); vectorised conversion for Float16.
    public func append(layer: Int, keys: Tensor, values: Tensor) throws {
        try checkLayer(layer)
        try checkAppend(keys: keys, values: values, batchItems: batch)
        let n = keys.shape[2]
        for b in 0..<batch { try checkRoom(layer: layer, batchItem: b, adding: n) }
        for b in 0..<batch { write(layer: layer, batchItem: b, keys: keys, values: values, from: b) }
    }

    /// Appends `n` positions to batch item `batchItem` of `layer`: `keys` `[1, Hkv, n, D]`,
    /// `values` `[1, Hkv, n, Dv]`. All-or-nothing, as ``append(layer:keys:values:)``.
    ///
    /// - Complexity: O(Hkv · n · (D + Dv)).
    public func append(layer: Int, batchItem: Int, keys: Tensor, values: Tensor) throws {
        try checkLayer(layer)
        try checkBatchItem(batchItem)
        try checkAppend(keys: keys, values: values, batchItems: 1)
        try checkRoom(layer: layer, batchItem: batchItem, adding: keys.shape[2])
        write(layer: layer, batchItem: batchItem, keys: keys, values: values, from: 0)
    }

    /// Shortens `layer` (every layer when `nil`) of `batchItem` (every batch item when
    /// `nil`) to `length` positions; positions past `length` are forgotten. Throws if
    /// `length` is negative or longer than a selected entry's current length.
    ///
    /// - Complexity: O(layers · B).
    public func truncate(to length: Int, layer: Int? = nil, batchItem: Int? = nil) throws {
        if let layer { try checkLayer(layer) }
        if let batchItem { try checkBatchItem(batchItem) }
        let layerRange = layer.map { $0...$0 } ?? 0...(layers - 1)
        let batchRange = batchItem.map { $0...$0 } ?? 0...(batch - 1)
        for l in layerRange { for b in batchRange {
            guard length >= 0, length <= lengths[l * batch + b] else {
                throw AttentionError.invalidParameter(
                    "truncate to \(length): layer \(l) batch item \(b) holds \(lengths[l * batch + b]) positions (length must be in 0...that)")
            }
        } }
        for l in layerRange { for b in batchRange { lengths[l * batch + b] = length } }
    }

    /// Empties every layer and batch item (storage is kept).
    ///
    /// - Complexity: O(layers · B).
    public func reset() {
        for i in lengths.indices { lengths[i] = 0 }
    }

    /// The cached keys of `layer`, `batchItem` as Float, `[1, Hkv, length, D]` (a copy;
    /// a 16-bit or Int8 cache gives the rounded or dequantised values the decode kernel reads).
    public func keys(layer: Int = 0, batchItem: Int = 0) throws -> Tensor {
        let n = try length(layer: layer, batchItem: batchItem)
        return try readRows(keyStore, heads: kvHeads, count: n) { h, j in rowIndex(layer, batchItem, h, j) }
    }

    /// The cached values of `layer`, `batchItem` as Float, `[1, Hkv, length, Dv]` (a copy).
    public func values(layer: Int = 0, batchItem: Int = 0) throws -> Tensor {
        let n = try length(layer: layer, batchItem: batchItem)
        return try readRows(valueStore, heads: kvHeads, count: n) { h, j in rowIndex(layer, batchItem, h, j) }
    }

    // MARK: Kernel access

    /// Filled lengths of `layer` per batch item.
    func lengths(layer: Int) -> [Int] {
        Array(lengths[layer * batch..<(layer + 1) * batch])
    }

    /// Rows of `layer` for the decode kernel, typed by the storage precision.
    func rows<Element: CacheScalar>(layer: Int, as _: Element.Type) -> (keys: CacheRows<Element>, values: CacheRows<Element>) {
        precondition(MemoryLayout<Element>.size == precision.bytesPerElement, "cache element type mismatch")
        func rows(_ store: RowStore) -> CacheRows<Element> {
            let rowStride = store.rowBytes / MemoryLayout<Element>.size, headStride = capacity * rowStride
            let base = store.elements(rowIndex(layer, 0, 0, 0)).assumingMemoryBound(to: Element.self)
            return CacheRows(base: base, batchStride: kvHeads * headStride, headStride: headStride, rowStride: rowStride)
        }
        return (rows(keyStore), rows(valueStore))
    }

    // MARK: Private

    private func rowIndex(_ layer: Int, _ b: Int, _ h: Int, _ j: Int) -> Int {
        ((layer * batch + b) * kvHeads + h) * capacity + j
    }

    private func checkLayer(_ layer: Int) throws {
        guard layer >= 0, layer < layers else {
            throw AttentionError.invalidParameter("layer \(layer) is outside 0..<\(layers) (the cache's layers)")
        }
    }

    private func checkBatchItem(_ b: Int) throws {
        guard b >= 0, b < batch else {
            throw AttentionError.invalidParameter("batch item \(b) is outside 0..<\(batch) (the cache's batch)")
        }
    }

    private func checkAppend(keys: Tensor, values: Tensor, batchItems: Int) throws {
        try checkCacheAppendShapes(keys: keys, values: values, batchItems: batchItems, kvHeads: kvHeads,
                                   headDim: headDim, valueDim: valueDim)
        if precision == .int8 {
            try checkFiniteForInt8(keys, "keys")
            try checkFiniteForInt8(values, "values")
        }
    }

    private func checkRoom(layer: Int, batchItem b: Int, adding n: Int) throws {
        let length = lengths[layer * batch + b]
        guard n <= capacity - length else {
            throw AttentionError.invalidParameter(
                "append of \(n) positions to layer \(layer) batch item \(b) (holding \(length)) exceeds the capacity \(capacity)")
        }
    }

    private func write(layer: Int, batchItem b: Int, keys: Tensor, values: Tensor, from source: Int) {
        let start = lengths[layer * batch + b]
        writeRows(keys, item: source, heads: kvHeads, into: keyStore) { h, j in rowIndex(layer, b, h, start + j) }
        writeRows(values, item: source, heads: kvHeads, into: valueStore) { h, j in rowIndex(layer, b, h, start + j) }
        lengths[layer * batch + b] = start + keys.shape[2]
    }
}

/// Element types the decode kernel reads from a cache: Float, Float16 or bfloat16 widened
/// to Float in registers (one `vcvtph2ps` per 16 lanes on x86-64 with F16C; a shift for
/// bfloat16), or Int8 widened and scaled by its row's scale (``KVRows/scale(ofRow:)``).
protocol CacheScalar {
    /// 16 consecutive elements as Float.
    static func wide16(_ p: UnsafePointer<Self>) -> Vec16
    /// One element as Float.
    static func widen(_ x: Self) -> Float
    /// Whether rows carry a scale their widened elements are multiplied by (Int8).
    static var quantized: Bool { get }
}

extension CacheScalar {
    static var quantized: Bool { false }
}

extension Float: CacheScalar {
    @inline(__always) static func wide16(_ p: UnsafePointer<Float>) -> Vec16 {
        UnsafeRawPointer(p).loadUnaligned(as: Vec16.self)
    }
    @inline(__always) static func widen(_ x: Float) -> Float { x }
}

/// Checks the shapes of an append of keys `[items, Hkv, n, D]` and values `[items, Hkv, n, Dv]`.
func checkCacheAppendShapes(keys: Tensor, values: Tensor, batchItems: Int, kvHeads: Int, headDim: Int,
                            valueDim: Int) throws {
    let k = keys.shape, v = values.shape
    guard k[0] == batchItems, v[0] == batchItems else {
        throw AttentionError.shapeMismatch(
            "append: batch (dimension 0) of keys \(k[0]) and values \(v[0]) must be \(batchItems)")
    }
    guard k[1] == kvHeads, v[1] == kvHeads else {
        throw AttentionError.shapeMismatch(
            "append: kvHeads (dimension 1) of keys \(k[1]) and values \(v[1]) must be the cache's \(kvHeads)")
    }
    guard k[2] == v[2] else {
        throw AttentionError.shapeMismatch(
            "append: positions (dimension 2) differ: keys \(k[2]), values \(v[2])")
    }
    guard k[3] == headDim else {
        throw AttentionError.shapeMismatch(
            "append: headDim (dimension 3) of keys is \(k[3]), the cache's is \(headDim)")
    }
    guard v[3] == valueDim else {
        throw AttentionError.shapeMismatch(
            "append: valueDim (dimension 3) of values is \(v[3]), the cache's is \(valueDim)")
    }
}

/// Checks the sizes shared by every cache kind (each at least 1; `headDim`, `valueDim`
/// at most ``lengthLimit``), naming the option.
func checkCacheSizes(_ kind: String, _ sizes: KeyValuePairs<String, Int>) throws {
    for (name, value) in sizes {
        guard value >= 1 else {
            throw AttentionError.invalidShape("\(kind) \(name) must be at least 1, got \(value)")
        }
        guard value <= lengthLimit else {
            throw AttentionError.invalidParameter("\(kind) \(name) must be at most \(lengthLimit), got \(value)")
        }
    }
}

/// The key and value storage bytes of a cache of `rows` rows (a product of counts, spelled
/// `rowNames`, e.g. "layers × batch × kvHeads × window") of `headDim` and `valueDim` elements
/// in `precision`, each checked against ``maxAllocationBytes`` (a thrown error names it).
func checkedStorageBytes(_ kind: String, precision: KVCache.Precision, rows: [Int], rowNames: String,
                         headDim: Int, valueDim: Int) throws -> (keys: Int, values: Int) {
    let keys = precision.checkedRowBytes(width: headDim).flatMap { checkedProduct(rows + [$0]) }
    let values = precision.checkedRowBytes(width: valueDim).flatMap { checkedProduct(rows + [$0]) }
    try checkAllocation(bytes: keys, option: "\(kind) keys (\(rowNames) × headDim)")
    try checkAllocation(bytes: values, option: "\(kind) values (\(rowNames) × valueDim)")
    return (keys!, values!)
}

/// Writes positions `skip + j`, `j < n − skip`, of item `source`, head `h` of `tensor`
/// `[items, Hkv, n, width]` as rows `index(h, j)` of `store`. Appends check the shapes (and,
/// for Int8, finiteness) first.
func writeRows(_ tensor: Tensor, item source: Int, heads: Int, skip: Int = 0, into store: RowStore,
               index: (_ h: Int, _ j: Int) -> Int) {
    let n = tensor.shape[2]
    guard n > skip else { return }   // (an empty tensor has no storage to view)
    tensor.withView { view in
        for h in 0..<heads {
            for j in 0..<(n - skip) { store.write(index(h, j), from: view.row(source, h, skip + j), stride: view.strides[3]) }
        }
    }
}

/// Reads rows `index(h, j)`, `j < n`, of `store` as a Float tensor `[1, Hkv, n, width]`.
func readRows(_ store: RowStore, heads: Int, count n: Int, index: (_ h: Int, _ j: Int) -> Int) throws -> Tensor {
    var data = [Float](repeating: 0, count: heads * n * store.width)
    data.withUnsafeMutableBufferPointer { out in
        for h in 0..<heads {
            for j in 0..<n { store.read(index(h, j), into: out.baseAddress! + (h * n + j) * store.width) }
        }
    }
    return try Tensor(shape: [1, heads, n, store.width], data: data)
}
