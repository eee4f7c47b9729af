/// A key/value cache of the last `window` positions per layer and batch item, in a ring
/// buffer: for sliding-window models (Mistral, the local layers of Gemma), whose queries
/// never see further back than the window, the memory stays `W` positions however long the
/// generation.
///
/// ```
/// let cache = try RotatingKVCache(kvHeads: 8, headDim: 128, window: 4096, precision: .float16)
/// try cache.append(layer: 0, keys: k, values: v)        // any n; only the last W are kept
/// let mistral = MultiQueryAttention(causal: true, leftWindow: 4096 - 1)
/// let r = try mistral.decode(query: q, cache: cache, layer: 0)
/// ```
///
/// Layout: keys `[layer][batch][kvHead][window]` rows of `D` (values the same with `Dv`), in
/// any ``KVCache/Precision``; absolute position `t` sits in slot `t mod W`. Every batch item
/// keeps its absolute count (``position(layer:batchItem:)``); it holds positions
/// `position − length ..< position` (``firstPosition(layer:batchItem:)``). A decode reads the
/// held positions in place, oldest first, as a contiguous cache holding the same positions
/// would (bitwise the same result): causal and window limits depend on differences of
/// positions only, so they are the absolute ones. Keys older than the window are gone: a
/// decode with a window wider than `W` (or none) sees only the held ones.
///
/// Appends are all-or-nothing (a wrong shape, an unknown layer or batch item, or for Int8 a
/// non-finite value throws and changes nothing); an append of more than `W` positions keeps
/// its last `W`.
///
/// - Complexity: appends O(Hkv · min(n, W) · (D + Dv)); a decode reads `Hkv · min(L, W) · (D + Dv)`
///   elements; ``memoryBytes`` of storage allocated once.
public final class RotatingKVCache: DecodingCache, DecodableCache {
    public let layers: Int
    public let batch: Int
    public let kvHeads: Int
    public let headDim: Int
    public let valueDim: Int
    /// Positions held per layer and batch item (`W`).
    public let window: Int
    public let precision: KVCache.Precision

    /// Positions appended so far per (layer, batch item): `totals[layer * batch + b]`.
    private var totals: [Int]
    /// Slot of the oldest held position per (layer, batch item), read by the kernel.
    private let firstSlots: UnsafeMutablePointer<Int>
    private let keyStorage: UnsafeMutableRawPointer
    private let valueStorage: UnsafeMutableRawPointer
    private let keyStore: RowStore
    private let valueStore: RowStore

    /// An empty cache holding at most `window` positions per layer and batch item.
    ///
    /// Throws ``AttentionError/invalidShape(_:)`` for a size below 1, ``AttentionError/invalidParameter(_:)``
    /// above ``lengthLimit`` and ``AttentionError/sizeOverflow(_:)`` when the storage would not fit
    /// ``maxAllocationBytes``, each naming the option; nothing is allocated before these checks.
    public init(layers: Int = 1, batch: Int = 1, kvHeads: Int, headDim: Int, valueDim: Int? = nil,
                window: Int, precision: KVCache.Precision = .float32) throws {
        let valueDim = valueDim ?? headDim
        try checkCacheSizes("RotatingKVCache", ["layers": layers, "batch": batch, "kvHeads": kvHeads,
                                                "headDim": headDim, "valueDim": valueDim, "window": window])
        let bytes = try checkedStorageBytes("RotatingKVCache", precision: precision, rows: [layers, batch, kvHeads, window],
                                            rowNames: "layers × batch × kvHeads × window",
                                            headDim: headDim, valueDim: valueDim)
        self.layers = layers
        self.batch = batch
        self.kvHeads = kvHeads
        self.headDim = headDim
        self.valueDim = valueDim
        self.window = window
        self.precision = precision
        totals = [Int](repeating: 0, count: layers * batch)
        firstSlots = .allocate(capacity: layers * batch)
        firstSlots.initialize(repeating: 0, count: layers * batch)
        keyStorage = KVCache.allocateStorage(bytes.keys)
        valueStorage = KVCache.allocateStorage(bytes.values)
        keyStore = RowStore(base: keyStorage, width: headDim, precision: precision)
        valueStore = RowStore(base: valueStorage, width: valueDim, precision: precision)
    }

    deinit {
        keyStorage.deallocate()
        valueStorage.deallocate()
        firstSlots.deallocate()
    }

    /// Bytes of key and value storage, exactly as allocated:
    /// `layers · batch · Hkv · W · (rowBytes(D) + rowBytes(Dv))` (``KVCache/Precision/rowBytes(width:)``).
    public var memoryBytes: Int {
        layers * batch * kvHeads * window * (keyStore.rowBytes + valueStore.rowBytes)
    }

    /// Bytes of the positions held, over every layer and batch item:
    /// `Σ min(position, W) · Hkv · (rowBytes(D) + rowBytes(Dv))`.
    public var usedBytes: Int {
        totals.reduce(0) { $0 + min($1, window) } * kvHeads * (keyStore.rowBytes + valueStore.rowBytes)
    }

    /// Positions held (at most `window`).
    public func length(layer: Int = 0, batchItem: Int = 0) throws -> Int {
        min(try position(layer: layer, batchItem: batchItem), window)
    }

    /// Positions appended so far: the absolute position of the next one.
    public func position(layer: Int = 0, batchItem: Int = 0) throws -> Int {
        try check(layer: layer, batchItem: batchItem)
        return totals[layer * batch + batchItem]
    }

    /// The absolute position of the oldest held position (held: `firstPosition ..< position`).
    public func firstPosition(layer: Int = 0, batchItem: Int = 0) throws -> Int {
        try position(layer: layer, batchItem: batchItem) - length(layer: layer, batchItem: batchItem)
    }

    /// Appends `n` positions to every batch item of `layer` (`keys` `[B, Hkv, n, D]`, `values`
    /// `[B, Hkv, n, Dv]`), keeping the last `W` of each. All-or-nothing.
    public func append(layer: Int, keys: Tensor, values: Tensor) throws {
        try check(layer: layer, batchItem: 0)
        try checkAppend(layer: layer, items: 0..<batch, keys: keys, values: values)
        for b in 0..<batch { write(layer: layer, batchItem: b, keys: keys, values: values, from: b) }
    }

    /// Appends `n` positions to batch item `batchItem` of `layer` (`keys` `[1, Hkv, n, D]`).
    /// All-or-nothing.
    public func append(layer: Int, batchItem: Int, keys: Tensor, values: Tensor) throws {
        try check(layer: layer, batchItem: batchItem)
        try checkAppend(layer: layer, items: batchItem..<batchItem + 1, keys: keys, values: values)
        write(layer: layer, batchItem: batchItem, keys: keys, values: values, from: 0)
    }

    /// Empties every layer and batch item (positions restart at 0; storage is kept).
    public func reset() {
        for i in totals.indices { totals[i] = 0 }
        firstSlots.update(repeating: 0, count: layers * batch)
    }

    /// The held keys of `layer`, `batchItem` as Float, oldest first, `[1, Hkv, length, D]`.
    public func keys(layer: Int = 0, batchItem: Int = 0) throws -> Tensor {
        let n = try length(layer: layer, batchItem: batchItem), first = firstSlots[layer * batch + batchItem]
        return try readRows(keyStore, heads: kvHeads, count: n) { h, j in index(layer, batchItem, h, (first + j) % window) }
    }

    /// The held values of `layer`, `batchItem` as Float, oldest first, `[1, Hkv, length, Dv]`.
    public func values(layer: Int = 0, batchItem: Int = 0) throws -> Tensor {
        let n = try length(layer: layer, batchItem: batchItem), first = firstSlots[layer * batch + batchItem]
        return try readRows(valueStore, heads: kvHeads, count: n) { h, j in index(layer, batchItem, h, (first + j) % window) }
    }

    // MARK: Decode

    func heldLengths(layer: Int) throws -> [Int] {
        try check(layer: layer, batchItem: 0)
        return (0..<batch).map { min(totals[layer * batch + $0], window) }
    }

    func visitRows<V: CacheRowsVisitor>(layer: Int, _ visitor: V) {
        func rows<E: CacheScalar>(_ store: RowStore, _: E.Type) -> RingRows<E> {
            let rowStride = store.rowBytes / MemoryLayout<E>.size
            return RingRows(base: UnsafePointer(store.elements(index(layer, 0, 0, 0)).assumingMemoryBound(to: E.self)),
                            batchStride: kvHeads * window * rowStride, headStride: window * rowStride,
                            rowStride: rowStride, window: window, firstSlot: UnsafePointer(firstSlots + layer * batch))
        }
        switch precision {
        case .float32: visitor.visit(keys: rows(keyStore, Float.self), values: rows(valueStore, Float.self))
        case .float16: visitor.visit(keys: rows(keyStore, HalfElement.self), values: rows(valueStore, HalfElement.self))
        case .bfloat16: visitor.visit(keys: rows(keyStore, BFloat16Bits.self), values: rows(valueStore, BFloat16Bits.self))
        case .int8: visitor.visit(keys: rows(keyStore, Int8.self), values: rows(valueStore, Int8.self))
        }
    }

    // MARK: Private

    private func index(_ layer: Int, _ b: Int, _ h: Int, _ slot: Int) -> Int {
        ((layer * batch + b) * kvHeads + h) * window + slot
    }

    private func check(layer: Int, batchItem b: Int) throws {
        guard layer >= 0, layer < layers else {
            throw AttentionError.invalidParameter("layer \(layer) is outside 0..<\(layers) (the cache's layers)")
        }
        guard b >= 0, b < batch else {
            throw AttentionError.invalidParameter("batch item \(b) is outside 0..<\(batch) (the cache's batch)")
        }
    }

    private func checkAppend(layer: Int, items: Range<Int>, keys: Tensor, values: Tensor) throws {
        try checkCacheAppendShapes(keys: keys, values: values, batchItems: items.count, kvHeads: kvHeads,
                                   headDim: headDim, valueDim: valueDim)
        if precision == .int8 {
            try checkFiniteForInt8(keys, "keys")
            try checkFiniteForInt8(values, "values")
        }
        let n = keys.shape[2]
        for b in items where totals[layer * batch + b] > Int.max - n {
            throw AttentionError.sizeOverflow("append of \(n) positions: the position count of layer \(layer) batch item \(b) overflows Int")
        }
    }

    private func write(layer: Int, batchItem b: Int, keys: Tensor, values: Tensor, from source: Int) {
        let n = keys.shape[2], total = totals[layer * batch + b]
        // Only the last W of the n new positions survive: write those.
        let skip = max(0, n - window), w = window
        func slot(_ j: Int) -> Int { (total + skip + j) % w }
        writeRows(keys, item: source, heads: kvHeads, skip: skip, into: keyStore) { h, j in index(layer, b, h, slot(j)) }
        writeRows(values, item: source, heads: kvHeads, skip: skip, into: valueStore) { h, j in index(layer, b, h, slot(j)) }
        let newTotal = total + n
        totals[layer * batch + b] = newTotal
        firstSlots[layer * batch + b] = (newTotal - min(newTotal, window)) % window
    }
}
