/// A key/value cache of many sequences sharing one pool of fixed-size pages (vLLM's
/// PagedAttention layout): a sequence takes pages as it grows and returns them when it
/// ends, so memory follows the positions actually held instead of every sequence's
/// maximum length.
///
/// ```
/// let cache = try PagedKVCache(layers: 2, kvHeads: 8, headDim: 128, pageSize: 16, pageCount: 4096,
///                              precision: .float16)
/// let a = cache.addSequence(), b = cache.addSequence()
/// try cache.append(sequence: a, layer: 0, keys: ka, values: va)     // [1, Hkv, n, D]
/// let both = try cache.batch([a, b])                                 // a DecodingCache
/// let r = try MultiQueryAttention(causal: true).decode(query: q, cache: both, layer: 0)
/// try cache.endSequence(a)                                           // its pages return to the pool
/// ```
///
/// Layout: a page holds `P` positions (``pageSize``, a power of two) of every layer and
/// key/value head: keys `[page][layer][kvHead][P]` rows of `D`, values the same with `Dv`,
/// in any ``KVCache/Precision``. A sequence's page table lists its pages in position order:
/// position `j` is row `j mod P` of page `table[j / P]`. The decode kernel reads the rows in
/// place through the table, in runs: a page's rows, continued through the pages after it in
/// the table while each is the pool's next page (a sequence filled in one go reads like a
/// contiguous cache); the result equals a contiguous cache holding the same positions, bitwise.
///
/// Pages can be shared: ``addSequence(sharing:length:)`` starts a sequence on a prefix of
/// another's page table (a common prompt); a shared page is reference counted and copied
/// before a sequence writes into it. Page tables given by the caller are checked (range,
/// duplicates, count, and that they are a held prefix of a live sequence); errors name the
/// entry.
///
/// Appends are all-or-nothing: a wrong shape, an unknown sequence or layer, too few free
/// pages in the pool (exhaustion), or for Int8 a non-finite value throws and changes nothing.
/// Not safe to mutate from several threads at once.
public final class PagedKVCache {
    public let layers: Int
    public let kvHeads: Int
    public let headDim: Int
    public let valueDim: Int
    /// Positions per page (`P`), a power of two.
    public let pageSize: Int
    /// Pages in the pool.
    public let pageCount: Int
    public let precision: KVCache.Precision

    private struct Sequence {
        var pages: [Int32] = []
        var lengths: [Int]
    }

    private var sequences: [Int: Sequence] = [:]
    private var nextSequence = 0
    /// Sequences holding each page (0: free).
    private var references: [Int32]
    /// Free pages, taken from the end.
    private var freeList: [Int32]
    private let pageShift: Int
    private let keyStorage: UnsafeMutableRawPointer
    private let valueStorage: UnsafeMutableRawPointer
    private let keyStore: RowStore
    private let valueStore: RowStore

    /// An empty pool of `pageCount` pages of `pageSize` positions.
    ///
    /// Throws ``AttentionError/invalidShape(_:)`` for a size below 1, ``AttentionError/invalidParameter(_:)``
    /// for a `pageSize` that is not a power of two or a size above ``lengthLimit``, and
    /// ``AttentionError/sizeOverflow(_:)`` when the pool would not fit ``maxAllocationBytes``, each
    /// naming the option; nothing is allocated before these checks.
    public init(layers: Int = 1, kvHeads: Int, headDim: Int, valueDim: Int? = nil, pageSize: Int, pageCount: Int,
                precision: KVCache.Precision = .float32) throws {
        let valueDim = valueDim ?? headDim
        try checkCacheSizes("PagedKVCache", ["layers": layers, "kvHeads": kvHeads, "headDim": headDim,
                                             "valueDim": valueDim, "pageSize": pageSize, "pageCount": pageCount])
        guard pageSize & (pageSize - 1) == 0 else {
            throw AttentionError.invalidParameter("PagedKVCache pageSize must be a power of two, got \(pageSize)")
        }
        let bytes = try checkedStorageBytes("PagedKVCache", precision: precision,
                                            rows: [pageCount, layers, kvHeads, pageSize],
                                            rowNames: "pageCount × layers × kvHeads × pageSize",
                                            headDim: headDim, valueDim: valueDim)
        self.layers = layers
        self.kvHeads = kvHeads
        self.headDim = headDim
        self.valueDim = valueDim
        self.pageSize = pageSize
        self.pageCount = pageCount
        self.precision = precision
        pageShift = pageSize.trailingZeroBitCount
        references = [Int32](repeating: 0, count: pageCount)
        freeList = (0..<Int32(pageCount)).reversed()
        keyStorage = KVCache.allocateStorage(bytes.keys)
        valueStorage = KVCache.allocateStorage(bytes.values)
        keyStore = RowStore(base: keyStorage, width: headDim, precision: precision)
        valueStore = RowStore(base: valueStorage, width: valueDim, precision: precision)
    }

    deinit {
        keyStorage.deallocate()
        valueStorage.deallocate()
    }

    /// Bytes of key and value storage (the pool), exactly as allocated:
    /// `pageCount · layers · Hkv · P · (rowBytes(D) + rowBytes(Dv))` (``KVCache/Precision/rowBytes(width:)``).
    public var memoryBytes: Int {
        pageCount * layers * kvHeads * pageSize * (keyStore.rowBytes + valueStore.rowBytes)
    }

    /// Bytes of the positions held by `sequences` (every live one when `nil`), over every layer:
    /// `Σ length · Hkv · (rowBytes(D) + rowBytes(Dv))` (shared pages counted per sequence, as
    /// decodes read them).
    public func usedBytes(sequences ids: [Int]? = nil) -> Int {
        let held = (ids ?? sequenceIDs).reduce(0) { $0 + (sequences[$1]?.lengths.reduce(0, +) ?? 0) }
        return held * kvHeads * (keyStore.rowBytes + valueStore.rowBytes)
    }

    /// Bytes of one page (every layer's keys and values for `P` positions).
    public var pageBytes: Int { memoryBytes / pageCount }

    /// Pages not held by any sequence.
    public var freePages: Int { freeList.count }

    /// The live sequences, in creation order.
    public var sequenceIDs: [Int] { sequences.keys.sorted() }

    /// A new, empty sequence (it takes pages as it grows).
    public func addSequence() -> Int {
        let id = nextSequence
        nextSequence += 1
        sequences[id] = Sequence(lengths: [Int](repeating: 0, count: layers))
        return id
    }

    /// A new sequence whose first `length` positions (every layer) are those of the pages
    /// `pageTable`, shared: `pageTable` must be the first `⌈length / P⌉` entries of a live
    /// sequence's table that holds at least `length` positions in every layer. The pages are
    /// reference counted; a partly filled last page is copied before the new sequence (or the
    /// other) writes into it.
    ///
    /// Throws ``AttentionError/invalidParameter(_:)`` naming the bad entry: a page outside the
    /// pool, a free page, a repeated page, the wrong number of pages, or a table that is no
    /// such prefix.
    public func addSequence(sharing pageTable: [Int], length: Int) throws -> Int {
        guard length >= 1, length <= lengthLimit else {
            throw AttentionError.invalidParameter("addSequence(sharing:length:): length must be in 1...\(lengthLimit), got \(length)")
        }
        let needed = (length + pageSize - 1) / pageSize
        guard pageTable.count == needed else {
            throw AttentionError.invalidParameter(
                "pageTable has \(pageTable.count) pages; \(length) positions with pageSize \(pageSize) take \(needed)")
        }
        var seen = Set<Int>()
        for (i, page) in pageTable.enumerated() {
            guard page >= 0, page < pageCount else {
                throw AttentionError.invalidParameter("pageTable[\(i)] = \(page) is outside 0..<\(pageCount) (the pool's pages)")
            }
            guard references[page] > 0 else {
                throw AttentionError.invalidParameter("pageTable[\(i)] = \(page) is a free page (it holds no positions)")
            }
            guard seen.insert(page).inserted else {
                throw AttentionError.invalidParameter("pageTable[\(i)] = \(page) repeats an earlier entry")
            }
        }
        let table = pageTable.map { Int32($0) }
        guard sequences.values.contains(where: { $0.pages.starts(with: table) && $0.lengths.min()! >= length }) else {
            throw AttentionError.invalidParameter(
                "pageTable \(pageTable) is not the first pages of a live sequence holding \(length) positions in every layer")
        }
        for page in table { references[Int(page)] += 1 }
        let id = nextSequence
        nextSequence += 1
        sequences[id] = Sequence(pages: table, lengths: [Int](repeating: length, count: layers))
        return id
    }

    /// Ends `sequence`: its pages return to the pool (shared pages when no other sequence
    /// holds them).
    public func endSequence(_ sequence: Int) throws {
        let s = try lookup(sequence)
        for page in s.pages { release(page) }
        sequences[sequence] = nil
    }

    /// The page table of `sequence`: its pages in position order.
    public func pageTable(of sequence: Int) throws -> [Int] {
        try lookup(sequence).pages.map { Int($0) }
    }

    /// Positions `sequence` holds in `layer`.
    public func length(sequence: Int, layer: Int = 0) throws -> Int {
        try checkLayer(layer)
        return try lookup(sequence).lengths[layer]
    }

    /// Appends `keys` `[1, Hkv, n, D]` and `values` `[1, Hkv, n, Dv]` to `layer` of `sequence`,
    /// taking pages from the pool as needed. All-or-nothing: throws and changes nothing when
    /// the pool has too few free pages.
    public func append(sequence: Int, layer: Int, keys: Tensor, values: Tensor) throws {
        try append(sequences: [sequence], layer: layer, keys: keys, values: values)
    }

    /// Appends item `b` of `keys` `[S, Hkv, n, D]` and `values` to `layer` of `sequences[b]`
    /// (distinct), all or none: the pages every sequence needs are counted before any is taken.
    public func append(sequences ids: [Int], layer: Int, keys: Tensor, values: Tensor) throws {
        try checkLayer(layer)
        try checkBatch(ids)
        try checkCacheAppendShapes(keys: keys, values: values, batchItems: ids.count, kvHeads: kvHeads,
                                   headDim: headDim, valueDim: valueDim)
        if precision == .int8 {
            try checkFiniteForInt8(keys, "keys")
            try checkFiniteForInt8(values, "values")
        }
        let n = keys.shape[2]
        // The pages the sequences take in order: each copies a shared page it writes, which
        // then has one holder fewer for the sequences after it (a page shared only among the
        // batch's writers is written in place by the last of them).
        var pagesNeeded = 0
        var copiesOf: [Int32: Int] = [:]
        for id in ids {
            let s = sequences[id]!, start = s.lengths[layer]
            guard start <= lengthLimit - n else {
                throw AttentionError.invalidParameter(
                    "append of \(n) positions to sequence \(id) (holding \(start)) exceeds \(lengthLimit) positions")
            }
            let span = pageSpan(s, start: start, count: n)
            pagesNeeded += span.added
            for p in span.written {
                let page = s.pages[p], copies = copiesOf[page, default: 0]
                if Int(references[Int(page)]) - copies > 1 {
                    pagesNeeded += 1
                    copiesOf[page] = copies + 1
                }
            }
        }
        guard pagesNeeded <= freeList.count else {
            throw AttentionError.invalidParameter(
                "PagedKVCache pool exhausted: the append needs \(pagesNeeded) pages, \(freeList.count) of \(pageCount) (pageCount) are free")
        }
        for (b, id) in ids.enumerated() {
            var s = sequences[id]!
            let start = s.lengths[layer]
            prepare(&s, start: start, count: n)
            let pages = s.pages, shift = pageShift, mask = pageSize - 1
            func row(_ h: Int, _ j: Int) -> Int {
                let p = start + j
                return rowIndex(page: Int(pages[p >> shift]), layer: layer, head: h, offset: p & mask)
            }
            writeRows(keys, item: b, heads: kvHeads, into: keyStore, index: row)
            writeRows(values, item: b, heads: kvHeads, into: valueStore, index: row)
            s.lengths[layer] = start + n
            sequences[id] = s
        }
    }

    /// The held keys of `layer` of `sequence` as Float `[1, Hkv, length, D]`.
    public func keys(sequence: Int, layer: Int = 0) throws -> Tensor {
        try read(keyStore, sequence: sequence, layer: layer)
    }

    /// The held values of `layer` of `sequence` as Float `[1, Hkv, length, Dv]`.
    public func values(sequence: Int, layer: Int = 0) throws -> Tensor {
        try read(valueStore, sequence: sequence, layer: layer)
    }

    /// `sequences` as the batch items of a ``DecodingCache`` (for decoding and batched
    /// appends). The ids must be live and distinct; the batch checks again at every use.
    public func batch(_ sequences: [Int]) throws -> Batch {
        try checkBatch(sequences)
        return Batch(pool: self, sequences: sequences)
    }

    /// Sequences of a ``PagedKVCache`` as batch items: batch item `b` is `sequences[b]`.
    public final class Batch: DecodingCache, DecodableCache {
        public let pool: PagedKVCache
        public let sequences: [Int]

        init(pool: PagedKVCache, sequences: [Int]) {
            self.pool = pool
            self.sequences = sequences
        }

        public var layers: Int { pool.layers }
        public var batch: Int { sequences.count }
        public var kvHeads: Int { pool.kvHeads }
        public var headDim: Int { pool.headDim }
        public var valueDim: Int { pool.valueDim }
        public var precision: KVCache.Precision { pool.precision }
        /// The pool's bytes (shared by every sequence).
        public var memoryBytes: Int { pool.memoryBytes }
        /// Bytes of the positions these sequences hold, over every layer.
        public var usedBytes: Int { pool.usedBytes(sequences: sequences) }

        public func length(layer: Int, batchItem: Int) throws -> Int {
            try pool.length(sequence: sequence(batchItem), layer: layer)
        }

        public func append(layer: Int, keys: Tensor, values: Tensor) throws {
            try pool.append(sequences: sequences, layer: layer, keys: keys, values: values)
        }

        public func keys(layer: Int, batchItem: Int) throws -> Tensor {
            try pool.keys(sequence: sequence(batchItem), layer: layer)
        }

        public func values(layer: Int, batchItem: Int) throws -> Tensor {
            try pool.values(sequence: sequence(batchItem), layer: layer)
        }

        func heldLengths(layer: Int) throws -> [Int] {
            try pool.checkBatch(sequences)
            return try sequences.map { try pool.length(sequence: $0, layer: layer) }
        }

        func visitRows<V: CacheRowsVisitor>(layer: Int, _ visitor: V) {
            pool.visitRows(sequences: sequences, layer: layer, visitor)
        }

        private func sequence(_ b: Int) throws -> Int {
            guard b >= 0, b < sequences.count else {
                throw AttentionError.invalidParameter("batch item \(b) is outside 0..<\(sequences.count) (the batch's sequences)")
            }
            return sequences[b]
        }
    }

    // MARK: Decode

    /// Calls `visitor` with the rows of `layer` of `ids` (checked live) through their page tables.
    func visitRows<V: CacheRowsVisitor>(sequences ids: [Int], layer: Int, _ visitor: V) {
        var tables: [Int32] = [], starts: [Int] = []
        for id in ids {
            starts.append(tables.count)
            tables += sequences[id]!.pages
            tables.append(-1)   // the end of the item's table (PagedRows.run)
        }
        tables.append(-1)   // never empty; a run scan from an item's end entry stays in bounds
        tables.withUnsafeBufferPointer { tables in starts.withUnsafeBufferPointer { starts in
            func rows<E: CacheScalar>(_ store: RowStore, _: E.Type) -> PagedRows<E> {
                let rowStride = store.rowBytes / MemoryLayout<E>.size
                let base = store.elements(rowIndex(page: 0, layer: layer, head: 0, offset: 0)).assumingMemoryBound(to: E.self)
                return PagedRows(base: UnsafePointer(base), pageStride: pageSize * rowStride,
                                 headStride: pageCount * pageSize * rowStride, rowStride: rowStride, pageShift: pageShift,
                                 tables: tables.baseAddress!, tableStart: starts.baseAddress!)
            }
            switch precision {
            case .float32: visitor.visit(keys: rows(keyStore, Float.self), values: rows(valueStore, Float.self))
            case .float16: visitor.visit(keys: rows(keyStore, HalfElement.self), values: rows(valueStore, HalfElement.self))
            case .bfloat16: visitor.visit(keys: rows(keyStore, BFloat16Bits.self), values: rows(valueStore, BFloat16Bits.self))
            case .int8: visitor.visit(keys: rows(keyStore, Int8.self), values: rows(valueStore, Int8.self))
            }
        } }
    }

    // MARK: Private

    /// Rows are stored layer-major, then head, then page: the `pageSize` rows of one page,
    /// layer and head are contiguous, and so are consecutive pages of one layer and head.
    /// Pages are taken from the free list in ascending order, so a sequence filled in one
    /// go (a prompt) reads each head's keys as one long run, as the contiguous cache does:
    /// the hardware prefetchers do not cross 4 KiB pages, and page-major storage (a page
    /// holding every layer and head) cut each head's read into runs of one page's rows.
    private func rowIndex(page: Int, layer: Int, head: Int, offset: Int) -> Int {
        ((layer * kvHeads + head) * pageCount + page) * pageSize + offset
    }

    private func lookup(_ id: Int) throws -> Sequence {
        guard let s = sequences[id] else {
            throw AttentionError.invalidParameter("sequence \(id) is not live (never added, or ended)")
        }
        return s
    }

    private func checkLayer(_ layer: Int) throws {
        guard layer >= 0, layer < layers else {
            throw AttentionError.invalidParameter("layer \(layer) is outside 0..<\(layers) (the cache's layers)")
        }
    }

    fileprivate func checkBatch(_ ids: [Int]) throws {
        guard !ids.isEmpty else { throw AttentionError.invalidParameter("a batch of sequences must not be empty") }
        for id in ids { _ = try lookup(id) }
        guard Set(ids).count == ids.count else {
            throw AttentionError.invalidParameter("a batch of sequences must not repeat one: \(ids)")
        }
    }

    /// The pages an append of `count` positions at `start` writes into: the indices of its
    /// table's pages it writes (`written`), and the new pages it adds past the table.
    private func pageSpan(_ s: Sequence, start: Int, count: Int) -> (written: Range<Int>, added: Int) {
        guard count > 0 else { return (s.pages.count..<s.pages.count, 0) }
        let first = start >> pageShift, end = (start + count + pageSize - 1) >> pageShift
        return (min(first, s.pages.count)..<min(end, s.pages.count), max(0, end - s.pages.count))
    }

    /// Makes the pages an append writes exclusive (copying shared ones) and adds new pages.
    /// The caller has checked that the pool has them.
    private func prepare(_ s: inout Sequence, start: Int, count: Int) {
        let span = pageSpan(s, start: start, count: count)
        for p in span.written where references[Int(s.pages[p])] > 1 {
            let old = Int(s.pages[p]), copy = take()
            for store in [keyStore, valueStore] {
                for layer in 0..<layers {
                    for head in 0..<kvHeads {
                        let from = rowIndex(page: old, layer: layer, head: head, offset: 0)
                        let to = rowIndex(page: copy, layer: layer, head: head, offset: 0)
                        (store.base + to * store.rowBytes).copyMemory(from: store.base + from * store.rowBytes,
                                                                      byteCount: pageSize * store.rowBytes)
                    }
                }
            }
            release(Int32(old))
            s.pages[p] = Int32(copy)
        }
        for _ in 0..<span.added { s.pages.append(Int32(take())) }
    }

    private func take() -> Int {
        let page = freeList.removeLast()
        references[Int(page)] = 1
        return Int(page)
    }

    private func release(_ page: Int32) {
        references[Int(page)] -= 1
        if references[Int(page)] == 0 { freeList.append(page) }
    }

    private func read(_ store: RowStore, sequence: Int, layer: Int) throws -> Tensor {
        try checkLayer(layer)
        let s = try lookup(sequence), n = s.lengths[layer], shift = pageShift, mask = pageSize - 1
        return try readRows(store, heads: kvHeads, count: n) { h, j in
            rowIndex(page: Int(s.pages[j >> shift]), layer: layer, head: h, offset: j & mask)
        }
    }
}
