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
/// `[layer][batch][kvHead][capacity][D]` and values `[layer][batch][kvHead][capacity][Dv]`,
/// each row contiguous, in Float32 or Float16 (``Precision``). Float16 halves the memory and
/// the bytes a decode step reads; appends round to the nearest Float16 (values beyond
/// ±65504 become ±infinity) and the decode kernel widens to Float in registers.
///
/// Appends are all-or-nothing: a wrong shape, an unknown layer or batch item, or a
/// position past `capacity` throws an ``AttentionError`` and leaves the cache unchanged.
///
/// `KVCache` is a reference type (the storage is large and meant to be shared by the
/// decode calls of one generation); it is not safe to mutate from several threads at once.
public final class KVCache {
    /// How cached keys and values are stored.
    public enum Precision: String, Sendable, CaseIterable {
        case float32
        case float16

        /// Bytes per stored element: 4 or 2.
        public var bytesPerElement: Int { self == .float32 ? 4 : 2 }
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
        guard let keyBytes = checkedProduct([layers, batch, kvHeads, capacity, headDim, precision.bytesPerElement]),
              let valueBytes = checkedProduct([layers, batch, kvHeads, capacity, valueDim, precision.bytesPerElement]),
              keyBytes.addingReportingOverflow(valueBytes).overflow == false else {
            throw AttentionError.sizeOverflow(
                "KVCache of \(layers) layers x \(batch) x \(kvHeads) heads x \(capacity) positions x (\(headDim) + \(valueDim)) overflows Int bytes")
        }
        guard capacity <= lengthLimit else {
            throw AttentionError.invalidParameter("KVCache capacity must be at most \(lengthLimit), got \(capacity)")
        }
        try checkAllocation(bytes: keyBytes, option: "KVCache keys (layers × batch × kvHeads × capacity × headDim)")
        try checkAllocation(bytes: valueBytes, option: "KVCache values (layers × batch × kvHeads × capacity × valueDim)")
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
    /// `layers · batch · Hkv · capacity · (D + Dv) · bytesPerElement`.
    public var memoryBytes: Int {
        layers * batch * kvHeads * capacity * (headDim + valueDim) * precision.bytesPerElement
    }

    /// Bytes of the positions filled so far, over every layer and batch item
    /// (what decode calls on every layer read): `Σ length · Hkv · (D + Dv) · bytesPerElement`.
    public var usedBytes: Int {
        lengths.reduce(0, +) * kvHeads * (headDim + valueDim) * precision.bytesPerElement
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
        try checkAppendShapes(keys: keys, values: values, batchItems: batch)
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
        try checkAppendShapes(keys: keys, values: values, batchItems: 1)
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
    /// a Float16 cache gives the rounded values the decode kernel reads).
    public func keys(layer: Int = 0, batchItem: Int = 0) throws -> Tensor {
        try read(layer: layer, batchItem: batchItem, storage: keyStorage, width: headDim)
    }

    /// The cached values of `layer`, `batchItem` as Float, `[1, Hkv, length, Dv]` (a copy).
    public func values(layer: Int = 0, batchItem: Int = 0) throws -> Tensor {
        try read(layer: layer, batchItem: batchItem, storage: valueStorage, width: valueDim)
    }

    // MARK: Kernel access

    /// Filled lengths of `layer` per batch item.
    func lengths(layer: Int) -> [Int] {
        Array(lengths[layer * batch..<(layer + 1) * batch])
    }

    /// Rows of `layer` for the decode kernel, typed by the storage precision.
    func rows<Element: CacheScalar>(layer: Int, as _: Element.Type) -> (keys: CacheRows<Element>, values: CacheRows<Element>) {
        precondition(MemoryLayout<Element>.size == precision.bytesPerElement, "cache element type mismatch")
        func rows(_ storage: UnsafeMutableRawPointer, width: Int) -> CacheRows<Element> {
            let headStride = capacity * width
            let base = storage.assumingMemoryBound(to: Element.self) + layer * batch * kvHeads * headStride
            return CacheRows(base: base, batchStride: kvHeads * headStride, headStride: headStride, rowStride: width)
        }
        return (rows(keyStorage, width: headDim), rows(valueStorage, width: valueDim))
    }

    // MARK: Private

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

    private func checkAppendShapes(keys: Tensor, values: Tensor, batchItems: Int) throws {
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

    private func checkRoom(layer: Int, batchItem b: Int, adding n: Int) throws {
        let length = lengths[layer * batch + b]
        guard n <= capacity - length else {
            throw AttentionError.invalidParameter(
                "append of \(n) positions to layer \(layer) batch item \(b) (holding \(length)) exceeds the capacity \(capacity)")
        }
    }

    private func write(layer: Int, batchItem b: Int, keys: Tensor, values: Tensor, from source: Int) {
        let n = keys.shape[2], start = lengths[layer * batch + b]
        guard n > 0 else { return }   // an empty tensor has no storage to view
        func copy(_ tensor: Tensor, into storage: UnsafeMutableRawPointer, width: Int) {
            tensor.withView { view in
                for h in 0..<kvHeads {
                    let first = (((layer * batch + b) * kvHeads + h) * capacity + start) * width
                    for j in 0..<n {
                        let row = view.row(source, h, j), sd = view.strides[3]
                        switch precision {
                        case .float32:
                            let out = storage.assumingMemoryBound(to: Float.self) + first + j * width
                            if sd == 1 {
                                out.update(from: row, count: width)
                            } else {
                                for c in 0..<width { out[c] = row[c * sd] }
                            }
                        case .float16:
                            let out = storage.assumingMemoryBound(to: HalfElement.self) + first + j * width
                            HalfElement.narrow(row, stride: sd, into: out, count: width)
                        }
                    }
                }
            }
        }
        copy(keys, into: keyStorage, width: headDim)
        copy(values, into: valueStorage, width: valueDim)
        lengths[layer * batch + b] = start + n
    }

    private func read(layer: Int, batchItem b: Int, storage: UnsafeMutableRawPointer, width: Int) throws -> Tensor {
        let n = try length(layer: layer, batchItem: b)
        var data = [Float](repeating: 0, count: kvHeads * n * width)
        for h in 0..<kvHeads {
            let first = (((layer * batch + b) * kvHeads + h) * capacity) * width
            for i in 0..<(n * width) {
                switch precision {
                case .float32: data[h * n * width + i] = storage.assumingMemoryBound(to: Float.self)[first + i]
                case .float16: data[h * n * width + i] = HalfElement.widen(storage.assumingMemoryBound(to: HalfElement.self)[first + i])
                }
            }
        }
        return try Tensor(shape: [1, kvHeads, n, width], data: data)
    }
}

/// Element types the decode kernel reads from a cache: Float, or Float16 widened to Float
/// in registers (one `vcvtph2ps` per 16 lanes on x86-64 with F16C).
protocol CacheScalar {
    /// 16 consecutive elements as Float.
    static func wide16(_ p: UnsafePointer<Self>) -> Vec16
    /// One element as Float.
    static func widen(_ x: Self) -> Float
}

extension CacheScalar {
    /// `out[r · ld + c] = Float(row(start + r)[c])` for `r < count`, `c < width`.
    @inline(__always)
    static func pack(_ rows: CacheRows<Self>, b: Int, h: Int, start: Int, count: Int, width: Int,
                     into out: UnsafeMutablePointer<Float>, ld: Int) {
        for r in 0..<count {
            let source = rows.row(b, h, start + r), target = out + r * ld
            var c = 0
            while c + 16 <= width {
                store16(wide16(source + c), target + c)
                c += 16
            }
            while c < width { target[c] = widen(source[c]); c += 1 }
        }
    }

    /// Rows `start ..< start + count` as Float rows `base[r · rowStride + c]`: in place for
    /// a Float cache, widened into `scratch` (`count · width` floats) otherwise.
    @inline(__always)
    static func floatRows(_ rows: CacheRows<Self>, b: Int, h: Int, start: Int, count: Int, width: Int,
                          scratch: UnsafeMutablePointer<Float>) -> (base: UnsafePointer<Float>, rowStride: Int) {
        if Self.self == Float.self {
            let base = UnsafeRawPointer(rows.row(b, h, start)).assumingMemoryBound(to: Float.self)
            return (base, rows.rowStride)
        }
        pack(rows, b: b, h: h, start: start, count: count, width: width, into: scratch, ld: width)
        return (UnsafePointer(scratch), width)
    }
}

extension Float: CacheScalar {
    @inline(__always) static func wide16(_ p: UnsafePointer<Float>) -> Vec16 {
        UnsafeRawPointer(p).loadUnaligned(as: Vec16.self)
    }
    @inline(__always) static func widen(_ x: Float) -> Float { x }
}

/// Rows of a cached key or value store: element `[b, h, j, c]` at
/// `base[b · batchStride + h · headStride + j · rowStride + c]` (rows contiguous).
struct CacheRows<Element: CacheScalar>: @unchecked Sendable {
    let base: UnsafePointer<Element>
    let batchStride: Int
    let headStride: Int
    let rowStride: Int

    init(base: UnsafePointer<Element>, batchStride: Int, headStride: Int, rowStride: Int) {
        self.base = base
        self.batchStride = batchStride
        self.headStride = headStride
        self.rowStride = rowStride
    }

    init(base: UnsafeMutablePointer<Element>, batchStride: Int, headStride: Int, rowStride: Int) {
        self.init(base: UnsafePointer(base), batchStride: batchStride, headStride: headStride, rowStride: rowStride)
    }

    @inline(__always)
    func row(_ b: Int, _ h: Int, _ j: Int) -> UnsafePointer<Element> {
        base + b * batchStride + h * headStride + j * rowStride
    }
}
