@_spi(Testing) @_spi(Benchmarking) import EfficientAttention

/// Ends a cache case after a failed check whose effects would only repeat downstream.
private struct CaseStopped: Error {}

/// The Float rows appended to one layer of one batch item or sequence, oldest first
/// (`keys[h][j]`, `values[h][j]`): a reference cache of any precision is built from them.
struct RowHistory {
    var keys: [[[Float]]]
    var values: [[[Float]]]

    init(heads: Int) {
        keys = Array(repeating: [], count: heads)
        values = keys
    }

    var count: Int { keys[0].count }

    /// Appends batch item `b` of `k` `[_, Hkv, n, D]` and `v` `[_, Hkv, n, Dv]`.
    mutating func append(_ k: Tensor, _ v: Tensor, item b: Int) {
        for h in keys.indices {
            for j in 0..<k.shape[2] {
                keys[h].append((0..<k.shape[3]).map { k[b, h, j, $0] })
                values[h].append((0..<v.shape[3]).map { v[b, h, j, $0] })
            }
        }
    }

    /// Positions `range` only.
    func slice(_ range: Range<Int>) -> RowHistory {
        var part = self
        part.keys = keys.map { Array($0[range]) }
        part.values = values.map { Array($0[range]) }
        return part
    }

    /// The last `n` positions (every one when fewer).
    func last(_ n: Int) -> RowHistory { slice(max(0, count - n)..<count) }

    /// Keys `[1, Hkv, count, D]` and values `[1, Hkv, count, Dv]` (`count` at least 1).
    func tensors() throws -> (keys: Tensor, values: Tensor) {
        func tensor(_ rows: [[[Float]]]) throws -> Tensor {
            try Tensor(shape: [1, rows.count, count, rows[0][0].count], data: rows.flatMap { $0.flatMap { $0 } })
        }
        return (try tensor(keys), try tensor(values))
    }
}

/// A cache under test, of one of the three kinds, and the rows appended to each of its
/// slots: batch items, or for a paged cache its live sequences (by id).
final class CacheUnderTest {
    enum Kind {
        case contiguous(KVCache)
        case rotating(RotatingKVCache)
        case paged(PagedKVCache)
    }

    let kind: Kind
    let layers: Int, kvHeads: Int, headDim: Int, valueDim: Int
    let precision: KVCache.Precision
    /// `history[slot][layer]`: every row appended to that layer of that slot.
    var history: [Int: [RowHistory]] = [:]
    /// Sequences ended (paged).
    var ended: [Int] = []

    init(_ kind: Kind, slots: [Int]) {
        self.kind = kind
        let sizes: (Int, Int, Int, Int, KVCache.Precision) = switch kind {
        case .contiguous(let c): (c.layers, c.kvHeads, c.headDim, c.valueDim, c.precision)
        case .rotating(let c): (c.layers, c.kvHeads, c.headDim, c.valueDim, c.precision)
        case .paged(let c): (c.layers, c.kvHeads, c.headDim, c.valueDim, c.precision)
        }
        (layers, kvHeads, headDim, valueDim, precision) = sizes
        for slot in slots { addSlot(slot) }
    }

    /// The cache a ``MultiQueryDecoding`` state is, or nil for another type.
    convenience init?(state: any DecodingCache) {
        switch state {
        case let c as KVCache: self.init(.contiguous(c), slots: Array(0..<c.batch))
        case let c as RotatingKVCache: self.init(.rotating(c), slots: Array(0..<c.batch))
        case let c as PagedKVCache.Batch: self.init(.paged(c.pool), slots: c.sequences)
        default: return nil
        }
    }

    func addSlot(_ slot: Int) {
        history[slot] = Array(repeating: RowHistory(heads: kvHeads), count: layers)
    }

    var slots: [Int] { history.keys.sorted() }

    var pool: PagedKVCache? {
        if case .paged(let p) = kind { p } else { nil }
    }

    var window: Int? {
        if case .rotating(let c) = kind { c.window } else { nil }
    }

    var name: String {
        switch kind {
        case .contiguous(let c): "KVCache L\(layers) B\(c.batch) capacity \(c.capacity)"
        case .rotating(let c): "RotatingKVCache L\(layers) B\(c.batch) window \(c.window)"
        case .paged(let p): "PagedKVCache L\(layers) pageSize \(p.pageSize) pageCount \(p.pageCount)"
        }
    }

    /// `rowBytes(D) + rowBytes(Dv)`.
    var rowBytes: Int { precision.rowBytes(width: headDim) + precision.rowBytes(width: valueDim) }

    /// The rows `slot` holds in `layer`: the last `window` for a rotating cache, all otherwise.
    func held(_ slot: Int, layer: Int) -> RowHistory {
        let rows = history[slot]![layer]
        return window.map { rows.last($0) } ?? rows
    }

    /// `slots` as the batch items of a ``DecodingCache``: the cache itself (every batch item),
    /// or a paged batch of those sequences.
    func decoding(_ slots: [Int]) throws -> any DecodingCache {
        switch kind {
        case .contiguous(let c): c
        case .rotating(let c): c
        case .paged(let p): try p.batch(slots)
        }
    }

    /// What `layer` of `slot` holds, read through the cache's own API.
    func stored(_ slot: Int, layer: Int) throws -> (length: Int, keys: Tensor, values: Tensor) {
        switch kind {
        case .contiguous(let c):
            (try c.length(layer: layer, batchItem: slot), try c.keys(layer: layer, batchItem: slot),
             try c.values(layer: layer, batchItem: slot))
        case .rotating(let c):
            (try c.length(layer: layer, batchItem: slot), try c.keys(layer: layer, batchItem: slot),
             try c.values(layer: layer, batchItem: slot))
        case .paged(let p):
            (try p.length(sequence: slot, layer: layer), try p.keys(sequence: slot, layer: layer),
             try p.values(sequence: slot, layer: layer))
        }
    }

    /// Appends `keys` and `values` to `layer` of `slots`: through the per-item call (`single`),
    /// the paged pool's `append(sequences:)` (`direct`), or the ``DecodingCache`` batch append.
    func append(_ slots: [Int], layer: Int, keys: Tensor, values: Tensor, single: Bool, direct: Bool) throws {
        switch (kind, single) {
        case (.contiguous(let c), true): try c.append(layer: layer, batchItem: slots[0], keys: keys, values: values)
        case (.rotating(let c), true): try c.append(layer: layer, batchItem: slots[0], keys: keys, values: values)
        case (.paged(let p), true): try p.append(sequence: slots[0], layer: layer, keys: keys, values: values)
        case (.paged(let p), false) where direct: try p.append(sequences: slots, layer: layer, keys: keys, values: values)
        default: try decoding(slots).append(layer: layer, keys: keys, values: values)
        }
    }

    /// Whether appending `n` positions to `layer` of each of `slots` fits: the capacity of a
    /// contiguous cache, always for a rotating one, the free pages of a paged pool.
    func fits(_ slots: [Int], layer: Int, n: Int) throws -> Bool {
        switch kind {
        case .contiguous(let c): slots.allSatisfy { held($0, layer: layer).count + n <= c.capacity }
        case .rotating: true
        case .paged(let p): try pagesNeeded(slots, layer: layer, n: n) <= p.freePages
        }
    }

    /// Pages an append of `n` positions to `layer` of `ids` (in order) takes from the pool:
    /// new pages past each table, and a copy of each shared page it writes into (a copy drops
    /// one share, so a later sequence may then write that page in place).
    func pagesNeeded(_ ids: [Int], layer: Int, n: Int) throws -> Int {
        let p = pool!, size = p.pageSize
        var references: [Int: Int] = [:], tables: [Int: [Int]] = [:]
        for id in slots {
            tables[id] = try p.pageTable(of: id)
            for page in tables[id]! { references[page, default: 0] += 1 }
        }
        var taken = 0
        for id in ids {
            let start = held(id, layer: layer).count, end = (start + n + size - 1) / size, table = tables[id]!
            for page in table[min(start / size, table.count)..<min(end, table.count)] where references[page]! > 1 {
                references[page]! -= 1
                taken += 1
            }
            taken += max(0, end - table.count)
        }
        return taken
    }

    /// A contiguous cache in this precision holding `rows[b][layer]` in batch item `b` (one
    /// empty item when `rows` is empty).
    func referenceCache(_ rows: [[RowHistory]]) throws -> KVCache {
        let longest = rows.flatMap { $0 }.map(\.count).max() ?? 0
        let cache = try KVCache(layers: rows.first?.count ?? 1, batch: max(1, rows.count), kvHeads: kvHeads, headDim: headDim,
                                valueDim: valueDim, capacity: max(1, longest), precision: precision)
        for (b, item) in rows.enumerated() {
            for (layer, rows) in item.enumerated() where rows.count > 0 {
                let (k, v) = try rows.tensors()
                try cache.append(layer: layer, batchItem: b, keys: k, values: v)
            }
        }
        return cache
    }

    var memoryBytes: Int {
        switch kind {
        case .contiguous(let c): c.memoryBytes
        case .rotating(let c): c.memoryBytes
        case .paged(let p): p.memoryBytes
        }
    }

    var usedBytes: Int {
        switch kind {
        case .contiguous(let c): c.usedBytes
        case .rotating(let c): c.usedBytes
        case .paged(let p): p.usedBytes()
        }
    }

    /// The documented `memoryBytes`: every slot of storage times `rowBytes(D) + rowBytes(Dv)`.
    var expectedMemoryBytes: Int {
        switch kind {
        case .contiguous(let c): layers * c.batch * kvHeads * c.capacity * rowBytes
        case .rotating(let c): layers * c.batch * kvHeads * c.window * rowBytes
        case .paged(let p): p.pageCount * layers * kvHeads * p.pageSize * rowBytes
        }
    }

    /// The documented `usedBytes` of `slots`: the rows held in every layer times the row bytes.
    func expectedUsedBytes(_ slots: [Int]) -> Int {
        slots.reduce(0) { sum, slot in sum + (0..<layers).reduce(0) { $0 + held(slot, layer: $1).count } } * kvHeads * rowBytes
    }

    /// Whether `stored` (`[1, Hkv, n, width]`, read back) holds `rows` as this precision stores
    /// them: rounded to nearest even (16-bit), within half a step `max|row| / 254` (Int8).
    func storesFaithfully(_ stored: Tensor, _ rows: [[[Float]]]) -> Bool {
        let read = stored.elements, flat = rows.flatMap { $0 }
        guard read.count == flat.reduce(0, { $0 + $1.count }) else { return false }
        var i = 0
        for row in flat {
            let bound = (row.map(abs).max() ?? 0) / 254 * 1.0001 + 1e-44
            for x in row {
                let faithful = switch precision {
                case .float32: read[i].bitPattern == x.bitPattern
                case .float16: read[i].bitPattern == FuzzCase.rounded(x, .float16).bitPattern
                case .bfloat16: read[i].bitPattern == FuzzCase.rounded(x, .bfloat16).bitPattern
                case .int8: abs(read[i] - x) <= bound
                }
                if !faithful { return false }
                i += 1
            }
        }
        return true
    }

    /// Everything observable, to tell that a refused call changed nothing.
    struct Observed: Equatable {
        var lengths: [Int] = []
        var bits: [[UInt32]] = []
        var counts: [Int] = []
        var tables: [[Int]] = []
    }

    func observe() throws -> Observed {
        var seen = Observed(counts: [usedBytes])
        for slot in slots {
            for layer in 0..<layers {
                let s = try stored(slot, layer: layer)
                seen.lengths.append(s.length)
                seen.bits.append((s.keys.elements + s.values.elements).map(\.bitPattern))
            }
        }
        switch kind {
        case .contiguous: break
        case .rotating(let c):
            seen.counts += try slots.flatMap { s in try (0..<layers).map { try c.position(layer: $0, batchItem: s) } }
        case .paged(let p):
            seen.counts += [p.freePages] + p.sequenceIDs
            seen.tables = try p.sequenceIDs.map { try p.pageTable(of: $0) }
        }
        return seen
    }

    /// How the cache differs from the rows appended to it (lengths, positions, the stored
    /// rows against a contiguous cache of the same precision bitwise, byte counts, page
    /// tables and free pages): the first difference, or nil.
    func mismatch() throws -> String? {
        if let p = pool, p.sequenceIDs != slots { return "live sequences \(p.sequenceIDs), expected \(slots)" }
        let reference = try referenceCache(slots.map { s in (0..<layers).map { held(s, layer: $0) } })
        for (b, slot) in slots.enumerated() {
            for layer in 0..<layers {
                let s = try stored(slot, layer: layer), count = held(slot, layer: layer).count
                let at = "slot \(slot) layer \(layer)"
                if s.length != count { return "\(at): length \(s.length), expected \(count)" }
                if count > 0, try !holdsRows(reference, layer: layer, batchItem: b, keys: s.keys, values: s.values) {
                    return "\(at): keys or values differ from a contiguous \(precision) cache of the same rows"
                }
                let rows = held(slot, layer: layer)
                if !storesFaithfully(s.keys, rows.keys) || !storesFaithfully(s.values, rows.values) {
                    return "\(at): keys or values read back are not the appended ones stored in \(precision)"
                }
                if case .rotating(let c) = kind {
                    let total = history[slot]![layer].count
                    let (position, first) = (try c.position(layer: layer, batchItem: slot),
                                             try c.firstPosition(layer: layer, batchItem: slot))
                    if position != total || first != total - count {
                        return "\(at): position \(position), firstPosition \(first) after \(total) appended"
                    }
                }
            }
        }
        if memoryBytes != expectedMemoryBytes { return "memoryBytes \(memoryBytes), expected \(expectedMemoryBytes)" }
        if usedBytes != expectedUsedBytes(slots) { return "usedBytes \(usedBytes), expected \(expectedUsedBytes(slots))" }
        guard let p = pool else { return nil }
        var taken = Set<Int>()
        for id in slots {
            let table = try p.pageTable(of: id)
            let longest = (0..<layers).map { held(id, layer: $0).count }.max()!
            if table.count != (longest + p.pageSize - 1) / p.pageSize || Set(table).count != table.count
                || !table.allSatisfy({ (0..<p.pageCount).contains($0) }) {
                return "sequence \(id) holding \(longest) positions has page table \(table)"
            }
            taken.formUnion(table)
        }
        if p.freePages != p.pageCount - taken.count {
            return "freePages \(p.freePages), but \(taken.count) of \(p.pageCount) pages are in page tables"
        }
        if p.pageBytes * p.pageCount != p.memoryBytes { return "pageBytes \(p.pageBytes) × \(p.pageCount) ≠ memoryBytes" }
        return nil
    }
}

/// True when `a` and `b` have the same shape and elements bit for bit.
func identicalBits(_ a: Tensor, _ b: Tensor) -> Bool {
    a.shape == b.shape && zip(a.elements, b.elements).allSatisfy { $0.bitPattern == $1.bitPattern }
}

/// Whether `keys` and `values` are, bit for bit, what `cache` holds in `layer` of batch item `b`.
func holdsRows(_ cache: KVCache, layer: Int, batchItem b: Int, keys: Tensor, values: Tensor) throws -> Bool {
    try identicalBits(keys, cache.keys(layer: layer, batchItem: b)) && identicalBits(values, cache.values(layer: layer, batchItem: b))
}

/// Batch item `b` of `t`, as `[1, …]`.
func batchItem(_ t: Tensor, _ b: Int) throws -> Tensor {
    let s = t.shape
    var data = [Float]()
    for h in 0..<s[1] { for i in 0..<s[2] { for c in 0..<s[3] { data.append(t[b, h, i, c]) } } }
    return try Tensor(shape: [1, s[1], s[2], s[3]], data: data)
}

extension FuzzCase {
    /// The other caches and precisions: random operations on a ``KVCache``,
    /// ``RotatingKVCache`` or ``PagedKVCache`` in any ``KVCache/Precision`` (appends, refused
    /// ones among them, invalid calls, sequences added, shared and ended), each followed by
    /// a decode; steps through ``MultiQueryDecoding`` (`attendNext`); or an invalid cache
    /// option. See ``cacheOperationsCase()``, ``decodingStepsCase()``, ``badCacheOptionCase()``.
    func cacheCase() throws {
        do {
            switch rng.int(0...9) {
            case 0..<6: try cacheOperationsCase()
            case 6..<9: try decodingStepsCase()
            default: badCacheOptionCase()
            }
        } catch is CaseStopped {
            log("case stopped after a failed check")
        }
    }

    // MARK: Operations

    /// Random cache sizes as small as ``decodeCase()``'s.
    private func cacheDims() -> (kvHeads: Int, heads: Int, headDim: Int, valueDim: Int, precision: KVCache.Precision) {
        let kvHeads = rng.int(1...3), headDim = rng.pick(FuzzCase.dims)
        return (kvHeads, kvHeads * rng.pick([1, 1, 2, 3]), headDim, rng.chance(0.5) ? headDim : rng.pick(FuzzCase.dims),
                rng.pick(KVCache.Precision.allCases))
    }

    /// A decoder with random masks and chunk length; for a rotating cache of `window`
    /// sometimes the sliding window it is made for (`window − 1`).
    private func cacheDecoder(window: Int?) -> MultiQueryAttention {
        let left: Int? = if let window, rng.chance(0.3) { window - 1 } else if rng.chance(0.3) { rng.int(0...8) } else { nil }
        return MultiQueryAttention(
            causal: rng.chance(0.5), leftWindow: left, rightWindow: rng.chance(0.3) ? rng.int(0...8) : nil,
            decodeChunkLength: rng.chance(0.5) ? rng.int(1...16) : MultiQueryAttention.defaultDecodeChunkLength)
    }

    private func describe(_ d: MultiQueryAttention) -> String {
        "causal \(d.causal) window \(d.leftWindow.map(String.init) ?? "-") \(d.rightWindow.map(String.init) ?? "-") chunk \(d.decodeChunkLength)"
    }

    /// A cache of a random kind, layers 1–3, in `precision`; a paged one starts with 1–3 sequences.
    private func makeCacheUnderTest(kvHeads: Int, headDim: Int, valueDim: Int,
                                    precision: KVCache.Precision) throws -> CacheUnderTest {
        let layers = rng.int(1...3), batch = rng.int(1...3)
        switch rng.int(0...2) {
        case 0:
            let c = try call {
                try KVCache(layers: layers, batch: batch, kvHeads: kvHeads, headDim: headDim, valueDim: valueDim,
                            capacity: rng.int(1...40), precision: precision)
            }
            return CacheUnderTest(.contiguous(c), slots: Array(0..<batch))
        case 1:
            let c = try call {
                try RotatingKVCache(layers: layers, batch: batch, kvHeads: kvHeads, headDim: headDim, valueDim: valueDim,
                                    window: rng.int(1...24), precision: precision)
            }
            return CacheUnderTest(.rotating(c), slots: Array(0..<batch))
        default:
            let p = try call {
                try PagedKVCache(layers: layers, kvHeads: kvHeads, headDim: headDim, valueDim: valueDim,
                                 pageSize: rng.pick([1, 2, 4, 8, 16]), pageCount: rng.int(1...24), precision: precision)
            }
            return CacheUnderTest(.paged(p), slots: (0..<batch).map { _ in call { p.addSequence() } })
        }
    }

    /// One cache of a random kind and precision through 1–10 random operations, each
    /// checked (a refused one changes nothing), then the whole cache against the rows
    /// appended to it, then a decode (``checkCacheDecode(_:heads:_:_:)``).
    func cacheOperationsCase() throws {
        let dims = cacheDims()
        let cache = try makeCacheUnderTest(kvHeads: dims.kvHeads, headDim: dims.headDim, valueDim: dims.valueDim,
                                           precision: dims.precision)
        let decoder = cacheDecoder(window: cache.window)
        let label = "\(cache.name) H\(dims.heads)/\(dims.kvHeads) D\(dims.headDim) Dv\(dims.valueDim) \(dims.precision)"
        log("\(label), decoder \(describe(decoder))")
        if let problem = try cache.mismatch() { fail("\(label) new: \(problem)") }
        for step in 0..<rng.int(1...10) {
            let what = try cacheOperation(cache, heads: dims.heads)
            log("step \(step): \(what)")
            let at = "\(label) step \(step) (\(what))"
            if let problem = try cache.mismatch() {
                fail("\(at): \(problem)")
                throw CaseStopped()
            }
            try checkCacheDecode(cache, heads: dims.heads, decoder, at)
        }
    }

    private enum CacheOperation {
        case appendBatch, appendOne, prefill, invalid, addSequence, share, end, truncate, reset
    }

    /// One random operation on `cache`, checked; returns what it did.
    private func cacheOperation(_ cache: CacheUnderTest, heads: Int) throws -> String {
        var menu: [CacheOperation] = [.appendBatch, .appendBatch, .appendBatch, .appendOne, .appendOne, .prefill, .invalid, .invalid]
        switch cache.kind {
        case .contiguous: menu += [.truncate] + (rng.chance(0.5) ? [.reset] : [])
        case .rotating: menu += rng.chance(0.5) ? [.reset] : []
        case .paged: menu += [.prefill, .addSequence, .share, .share, .end, .end]
        }
        let slots = cache.slots, operation = rng.pick(menu)
        switch operation {
        case .appendBatch, .prefill:
            guard !slots.isEmpty else { return "no sequence to append to" }
            let targets = cache.pool == nil ? slots : Array(slots.shuffled(using: &rng).prefix(rng.int(1...slots.count)))
            guard operation == .prefill else { return try appendRows(cache, to: targets, single: false) }
            // A prompt: the same count of positions appended to every layer.
            let n = appendCount()
            return try (0..<cache.layers).map { try appendRows(cache, to: targets, single: false, layer: $0, n: n) }
                .joined(separator: "; ")
        case .appendOne:
            guard !slots.isEmpty else { return "no sequence to append to" }
            return try appendRows(cache, to: [rng.pick(slots)], single: true)
        case .invalid: return try invalidCacheCall(cache, heads: heads)
        case .addSequence:
            let id = call { cache.pool!.addSequence() }
            if cache.history[id] != nil || cache.ended.contains(id) { fail("\(cache.name): addSequence returned id \(id) again") }
            cache.addSlot(id)
            return "addSequence -> \(id)"
        case .share: return try shareSequence(cache)
        case .end: return try endSequence(cache, heads: heads)
        case .truncate: return try truncate(cache)
        case .reset:
            switch cache.kind {
            case .contiguous(let c): call { c.reset() }
            case .rotating(let c): call { c.reset() }
            case .paged: break
            }
            for slot in slots { cache.addSlot(slot) }
            return "reset"
        }
    }

    /// Runs `body`, which must succeed exactly when `fits`; `apply` then brings the model
    /// along. A refusal must be an ``AttentionError`` and leave everything observable as it was.
    private func attempt(_ cache: CacheUnderTest, _ what: String, fits: Bool, _ body: () throws -> Void,
                         then apply: () -> Void = {}) throws {
        let before = try cache.observe()
        do {
            try call(body)
        } catch let error as AttentionError {
            log("\(what): threw \(error)")
            if fits {
                fail("\(cache.name): \(what) threw \(error), expected to succeed")
                throw CaseStopped()
            }
            if try cache.observe() != before {
                fail("\(cache.name): \(what) threw, but changed the cache")
                throw CaseStopped()
            }
            return
        } catch {
            fail("\(cache.name): \(what) threw \(type(of: error)), not an AttentionError: \(error)")
            throw CaseStopped()
        }
        if !fits {
            fail("\(cache.name): \(what) was accepted, expected an AttentionError")
            throw CaseStopped()
        }
        apply()
    }

    /// Keys `[items, Hkv, n, D]` and values `[items, Hkv, n, Dv]`: random (sometimes 0),
    /// contiguous or in a strided NaN-gapped layout.
    private func appendTensors(_ cache: CacheUnderTest, items: Int, n: Int) throws -> (Tensor, Tensor) {
        func tensor(_ width: Int) throws -> Tensor {
            let shape = [items, cache.kvHeads, n, width]
            let amplitude: Float = rng.pick([1, 1, 1, 8])
            let t = try rng.chance(0.05) ? Tensor(shape: shape) : rng.tensor(shape, amplitude: amplitude)
            return try rng.chance(0.4) ? rng.view(of: t) : t
        }
        return (try tensor(cache.headDim), try tensor(cache.valueDim))
    }

    private func appendCount() -> Int { rng.chance(0.15) ? rng.int(9...40) : rng.int(1...8) }

    /// Appends to `layer` of `slots` (one through the per-item call when `single`): refused
    /// exactly when it does not fit.
    private func appendRows(_ cache: CacheUnderTest, to slots: [Int], single: Bool, layer: Int? = nil,
                            n: Int? = nil) throws -> String {
        let layer = layer ?? rng.int(0...cache.layers - 1), n = n ?? appendCount()
        let (k, v) = try appendTensors(cache, items: slots.count, n: n)
        let fits = try cache.fits(slots, layer: layer, n: n), direct = rng.chance(0.5)
        let what = "append \(n) to \(single ? "slot" : "slots") \(slots) layer \(layer)"
        try attempt(cache, what, fits: fits, {
            try cache.append(slots, layer: layer, keys: k, values: v, single: single, direct: direct)
        }, then: {
            for (b, slot) in slots.enumerated() { cache.history[slot]![layer].append(k, v, item: b) }
        })
        return what + (fits ? "" : " (refused)")
    }

    /// A new sequence on a prefix of a live one's page table.
    private func shareSequence(_ cache: CacheUnderTest) throws -> String {
        let p = cache.pool!
        let sources = cache.slots.filter { s in (0..<cache.layers).allSatisfy { cache.held(s, layer: $0).count > 0 } }
        guard !sources.isEmpty else { return "no sequence to share" }
        let source = rng.pick(sources)
        let length = rng.int(1...(0..<cache.layers).map { cache.held(source, layer: $0).count }.min()!)
        let table = Array(try p.pageTable(of: source).prefix((length + p.pageSize - 1) / p.pageSize))
        var id = -1
        let what = "addSequence(sharing: \(table), length: \(length)) of \(source)"
        try attempt(cache, what, fits: true, { id = try p.addSequence(sharing: table, length: length) }, then: {
            cache.history[id] = cache.history[source]!.map { $0.slice(0..<length) }
        })
        return what + " -> \(id)"
    }

    /// Ends a live sequence; half the time through a batch made before, which must then be refused.
    private func endSequence(_ cache: CacheUnderTest, heads: Int) throws -> String {
        let p = cache.pool!, slots = cache.slots
        guard !slots.isEmpty else { return "no sequence to end" }
        let id = rng.pick(slots), free = p.freePages
        let order = slots.shuffled(using: &rng)
        let stale: PagedKVCache.Batch? = try rng.chance(0.5) ? call { try p.batch(order) } : nil
        try attempt(cache, "endSequence(\(id))", fits: true, { try p.endSequence(id) }, then: {
            cache.history[id] = nil
            cache.ended.append(id)
        })
        if p.freePages < free { fail("\(cache.name): endSequence(\(id)) took pages: \(free) free before, \(p.freePages) after") }
        if let stale {
            let (k, v) = try appendTensors(cache, items: stale.batch, n: 1)
            let q = try rng.tensor([stale.batch, heads, 1, cache.headDim])
            try attempt(cache, "decode of a batch holding ended \(id)", fits: false, {
                _ = try MultiQueryAttention().decode(query: q, cache: stale, threads: 1)
            })
            try attempt(cache, "append to a batch holding ended \(id)", fits: false, {
                try stale.append(layer: 0, keys: k, values: v)
            })
        }
        return "endSequence(\(id))" + (stale == nil ? "" : ", stale batch refused")
    }

    /// `truncate(to:layer:batchItem:)` of a contiguous cache, refused when a selected entry is shorter.
    private func truncate(_ cache: CacheUnderTest) throws -> String {
        guard case .contiguous(let c) = cache.kind else { return "no truncate" }
        let layer: Int? = rng.chance(0.5) ? rng.int(0...cache.layers - 1) : nil
        let item: Int? = rng.chance(0.5) ? rng.int(0...c.batch - 1) : nil
        let layers = layer.map { [$0] } ?? Array(0..<cache.layers), items = item.map { [$0] } ?? cache.slots
        let lengths = items.flatMap { b in layers.map { cache.held(b, layer: $0).count } }
        let length = rng.chance(0.2) ? rng.pick([-1, Int.min, lengths.max()! + 1]) : rng.int(0...lengths.max()!)
        let what = "truncate(to: \(length), layer: \(layer.map(String.init) ?? "all"), batchItem: \(item.map(String.init) ?? "all"))"
        try attempt(cache, what, fits: length >= 0 && length <= lengths.min()!, {
            try c.truncate(to: length, layer: layer, batchItem: item)
        }, then: {
            for b in items { for l in layers { cache.history[b]![l] = cache.history[b]![l].slice(0..<length) } }
        })
        return what
    }

    // MARK: Invalid calls on a live cache

    /// One call that must throw an ``AttentionError`` and change nothing: a bad layer,
    /// batch item or sequence, tensors of the wrong shape, a non-finite value for Int8,
    /// a bad query or decoder, a bad shared page table.
    private func invalidCacheCall(_ cache: CacheUnderTest, heads: Int) throws -> String {
        let badLayer = rng.pick([-1, cache.layers, cache.layers + 5, Int.max, Int.min])
        let n = rng.int(1...4), d = cache.headDim
        var calls: [(String, () throws -> Void)] = []
        if !cache.slots.isEmpty {
            let target = try cache.decoding(cache.slots), items = target.batch
            let badItem = rng.pick([-1, items, items + 3, Int.max, Int.min])
            let (k, v) = try appendTensors(cache, items: items, n: n)
            let (wk, wv, wrong) = try wrongAppendShape(cache, items: items, n: n)
            let query = try rng.tensor([items, heads, 1, d]), wideQuery = try rng.tensor([items, heads, 1, d + 1])
            let longQuery = try rng.tensor([items + 1, heads, 1, d]), oddQuery = try rng.tensor([items, cache.kvHeads + 1, 1, d])
            func decode(_ q: Tensor, layer: Int = 0, _ decoder: MultiQueryAttention = MultiQueryAttention()) -> () throws -> Void {
                { _ = try decoder.decode(query: q, cache: target, layer: layer, threads: 2) }
            }
            let common: [(String, () throws -> Void)] = [
                ("append to layer \(badLayer)", { try target.append(layer: badLayer, keys: k, values: v) }),
                ("append of \(wrong)", { try target.append(layer: 0, keys: wk, values: wv) }),
                ("keys of layer \(badLayer)", { _ = try target.keys(layer: badLayer, batchItem: 0) }),
                ("values of batch item \(badItem)", { _ = try target.values(layer: 0, batchItem: badItem) }),
                ("length of batch item \(badItem)", { _ = try target.length(layer: 0, batchItem: badItem) }),
                ("decode of layer \(badLayer)", decode(query, layer: badLayer)),
                ("decode of a query of headDim \(d + 1)", decode(wideQuery)),
                ("decode of a query of batch \(items + 1)", decode(longQuery)),
                ("decode with decodeChunkLength 0", decode(query, MultiQueryAttention(decodeChunkLength: 0))),
            ]
            calls += common
            if cache.kvHeads > 1 {
                calls.append(("decode of \(cache.kvHeads + 1) heads over \(cache.kvHeads)", decode(oddQuery)))
            }
            if cache.precision == .int8 {
                var (nk, nv) = (try rng.tensor([items, cache.kvHeads, n, d]), try rng.tensor([items, cache.kvHeads, n, cache.valueDim]))
                let bad = rng.pick([Float.nan, .infinity, -.infinity])
                if rng.chance(0.5) {
                    nk[rng.int(0...items - 1), rng.int(0...cache.kvHeads - 1), rng.int(0...n - 1), rng.int(0...d - 1)] = bad
                } else {
                    nv[rng.int(0...items - 1), rng.int(0...cache.kvHeads - 1), rng.int(0...n - 1), rng.int(0...cache.valueDim - 1)] = bad
                }
                calls.append(("int8 append of \(bad)", { try target.append(layer: 0, keys: nk, values: nv) }))
            }
        }
        calls += try kindInvalidCalls(cache, badLayer: badLayer)
        guard !calls.isEmpty else { return "no invalid call" }
        let (what, body) = rng.pick(calls)
        try attempt(cache, what, fits: false, body)
        return "invalid: \(what)"
    }

    /// Keys and values for `items` batch items with one dimension off.
    private func wrongAppendShape(_ cache: CacheUnderTest, items: Int, n: Int) throws -> (Tensor, Tensor, String) {
        var ks = [items, cache.kvHeads, n, cache.headDim], vs = [items, cache.kvHeads, n, cache.valueDim]
        switch rng.int(0...4) {
        case 0: ks[0] += 1; vs[0] += 1
        case 1: ks[1] += 1; vs[1] += 1
        case 2: ks[3] += 1
        case 3: vs[3] += 1
        default: vs[2] += 1
        }
        return (try rng.tensor(ks), try rng.tensor(vs), "keys \(ks) values \(vs)")
    }

    /// The invalid calls of one cache kind: a per-item append to a bad batch item or of a
    /// batch of 2; for a paged pool unknown or ended sequences, bad batches and bad page tables.
    private func kindInvalidCalls(_ cache: CacheUnderTest, badLayer: Int) throws -> [(String, () throws -> Void)] {
        let (k, v) = try appendTensors(cache, items: 1, n: rng.int(1...3))
        let (k2, v2) = try appendTensors(cache, items: 2, n: 1)
        switch cache.kind {
        case .contiguous(let c):
            let item = rng.pick([-1, c.batch, Int.max, Int.min])
            return [("append to batch item \(item)", { try c.append(layer: 0, batchItem: item, keys: k, values: v) }),
                    ("append of 2 items to batch item 0", { try c.append(layer: 0, batchItem: 0, keys: k2, values: v2) }),
                    ("truncate of layer \(badLayer)", { try c.truncate(to: 0, layer: badLayer) })]
        case .rotating(let c):
            let item = rng.pick([-1, c.batch, Int.max, Int.min])
            return [("append to batch item \(item)", { try c.append(layer: 0, batchItem: item, keys: k, values: v) }),
                    ("append of 2 items to batch item 0", { try c.append(layer: 0, batchItem: 0, keys: k2, values: v2) }),
                    ("position of layer \(badLayer)", { _ = try c.position(layer: badLayer, batchItem: 0) })]
        case .paged(let p):
            let unknown = rng.pick(cache.ended + [-1, Int.max, Int.min, (cache.slots.max() ?? 0) + 1000])
            var calls: [(String, () throws -> Void)] = [
                ("append to sequence \(unknown)", { try p.append(sequence: unknown, layer: 0, keys: k, values: v) }),
                ("endSequence(\(unknown))", { try p.endSequence(unknown) }),
                ("pageTable(of: \(unknown))", { _ = try p.pageTable(of: unknown) }),
                ("length of sequence \(unknown)", { _ = try p.length(sequence: unknown, layer: 0) }),
                ("batch [\(unknown)]", { _ = try p.batch([unknown]) }),
                ("batch []", { _ = try p.batch([]) }),
                ("append to sequences []", { try p.append(sequences: [], layer: 0, keys: k, values: v) }),
            ]
            if let id = cache.slots.first {
                calls += [("batch [\(id), \(id)]", { _ = try p.batch([id, id]) }),
                          ("append to sequences [\(id), \(id)]", { try p.append(sequences: [id, id], layer: 0, keys: k2, values: v2) }),
                          ("append of 2 items to sequence \(id)", { try p.append(sequence: id, layer: 0, keys: k2, values: v2) }),
                          ("keys of sequence \(id) layer \(badLayer)", { _ = try p.keys(sequence: id, layer: badLayer) })]
            }
            if let (table, length, why) = try badPageTable(cache) {
                calls.append(("addSequence(sharing: \(table), length: \(length)): \(why)", {
                    _ = try p.addSequence(sharing: table, length: length)
                }))
            }
            return calls
        }
    }

    /// A page table and length `addSequence(sharing:length:)` must refuse, and why: an entry
    /// outside the pool, a repeated or free page, the wrong page count, a bad length, more
    /// positions than any live sequence with that prefix holds, or no live sequence's prefix.
    private func badPageTable(_ cache: CacheUnderTest) throws -> ([Int], Int, String)? {
        let p = cache.pool!, size = p.pageSize
        let tables = try cache.slots.map { ($0, try p.pageTable(of: $0)) }
        let inUse = Set(tables.flatMap(\.1)), free = (0..<p.pageCount).filter { !inUse.contains($0) }
        let sources = tables.filter { !$0.1.isEmpty }
        guard !sources.isEmpty else { return free.isEmpty ? nil : ([rng.pick(free)], 1, "a free page") }
        let full = rng.pick(sources).1
        var table = Array(full.prefix(rng.int(1...full.count)))
        let fullLength = table.count * size
        /// The most positions a live sequence starting with `table` holds in every layer.
        func heldPrefix(_ table: [Int]) -> Int {
            tables.filter { $0.1.starts(with: table) }
                .map { s in (0..<cache.layers).map { cache.held(s.0, layer: $0).count }.min()! }.max() ?? -1
        }
        switch rng.int(0...6) {
        case 0:
            table[rng.int(0...table.count - 1)] = rng.pick([-1, p.pageCount, p.pageCount + 9, Int.max, Int.min])
            return (table, fullLength, "an entry outside the pool")
        case 1:
            table.append(table[rng.int(0...table.count - 1)])
            return (table, table.count * size, "a repeated page")
        case 2:
            guard !free.isEmpty else { return nil }
            table[rng.int(0...table.count - 1)] = rng.pick(free)
            return (table, fullLength, "a free page")
        case 3:
            return (table, fullLength + rng.int(1...size), "one page short")
        case 4:
            return (table, rng.pick([0, -1, -size, Int.min, lengthLimit + 1, Int.max]), "a bad length")
        case 5:
            let longest = heldPrefix(table)
            guard longest < fullLength else { return nil }
            return (table, rng.int(max(longest + 1, fullLength - size + 1)...fullLength), "longer than held (\(longest))")
        default:
            table.shuffle(using: &rng)
            guard heldPrefix(table) < fullLength - size + 1 else { return nil }
            return (table, fullLength - size + 1, "no live sequence's prefix")
        }
    }

    // MARK: Decoding checks

    /// A decode of `layer` (random) of `cache` (every batch item, or a random batch of the
    /// live sequences in a random order) with 1–3 queries, checked by ``checkDecoded``.
    private func checkCacheDecode(_ cache: CacheUnderTest, heads: Int, _ decoder: MultiQueryAttention,
                                  _ label: String) throws {
        var slots = cache.slots
        if cache.pool != nil {
            guard !slots.isEmpty else { return }
            slots = Array(slots.shuffled(using: &rng).prefix(rng.int(1...slots.count)))
        }
        let layer = rng.int(0...cache.layers - 1), nq = rng.int(1...3)
        let target = try call { try cache.decoding(slots) }
        let query = try rng.tensor([slots.count, heads, nq, cache.headDim])
        let viewed = try rng.chance(0.3) ? rng.view(of: query) : query
        let at = "\(label) decode of layer \(layer) slots \(slots) (\(nq) queries)"
        log(at)
        guard let result = attempt(at, { try decoder.decode(query: viewed, cache: target, layer: layer, threads: 1) })
        else { return }
        try checkDecoded(result, query: query, decoder, cache: cache, target: target, slots: slots, layer: layer, at) { threads in
            try decoder.decode(query: viewed, cache: target, layer: layer, threads: threads)
        }
        if target.usedBytes != cache.expectedUsedBytes(slots) || target.memoryBytes != cache.memoryBytes {
            fail("\(at): the decoded cache's usedBytes \(target.usedBytes) / memoryBytes \(target.memoryBytes), expected \(cache.expectedUsedBytes(slots)) / \(cache.memoryBytes)")
        }
    }

    /// Checks `result`, a decode of `query` against `target` (`slots` of `cache` as its batch
    /// items, `layer`): shapes, finite, empty rows 0 at `-inf`; the same bits from `redecode`
    /// at a random thread count and from a contiguous cache of the same precision holding
    /// the same rows; `target`'s keys and values that cache's, bitwise; the naive reference
    /// over them (rounded or dequantised) within tolerance.
    private func checkDecoded(_ result: AttentionResult, query: Tensor, _ decoder: MultiQueryAttention,
                              cache: CacheUnderTest, target: any DecodingCache, slots: [Int], layer: Int,
                              _ label: String, redecode: (Int) throws -> AttentionResult) throws {
        let held = slots.map { cache.held($0, layer: layer) }, lengths = held.map(\.count)
        let (heads, nq) = (query.shape[1], query.shape[2])
        let shape = AttentionShape(batch: slots.count, heads: heads, kvHeads: cache.kvHeads, queryLength: nq,
                                   keyLength: max(1, lengths.max()!), headDim: cache.headDim, valueDim: cache.valueDim)
        checkResult(result, shape: shape, keyLengths: lengths, label)
        let threads = threadCount()
        if let other = attempt("\(label) at \(threads) threads", { try redecode(threads) }), !bitwiseEqual(other, result) {
            fail("\(label): \(threads) threads differ from 1")
        }
        let reference = try cache.referenceCache(held.map { [$0] })
        if !bitwiseEqual(try decoder.decode(query: query, cache: reference, layer: 0, threads: 1), result) {
            fail("\(label): differs from a contiguous \(cache.precision) cache holding the same rows (lengths \(lengths))")
        }
        let left = decoder.leftWindow ?? Int.max / 4
        let right = min(decoder.rightWindow ?? Int.max / 4, decoder.causal ? 0 : Int.max / 4)
        for b in slots.indices where lengths[b] > 0 {
            let (k, v) = (try target.keys(layer: layer, batchItem: b), try target.values(layer: layer, batchItem: b))
            if try !holdsRows(reference, layer: 0, batchItem: b, keys: k, values: v) {
                fail("\(label) batch item \(b): keys or values differ from a contiguous cache of the same rows")
            }
            let naive = naiveAttention(query: try batchItem(query, b), key: k, value: v, keyLengths: nil,
                                       scale: 1 / Double(cache.headDim).squareRoot()) { _, i, j, nq, nk in
                j >= i + nk - nq - left && j <= i + nk - nq + right
            }
            let mine = try AttentionResult(output: batchItem(result.output, b), logSumExp: batchItem(result.logSumExp, b))
            if let difference = compare(mine, naive) {
                fail("\(label) batch item \(b): differs from the naive reference: \(difference)")
            }
        }
    }

    // MARK: DecodingAttention

    /// ``MultiQueryDecoding`` of a random cache kind and precision: the state it makes, then
    /// 1–8 `attendNext` steps (some of the wrong shape, some past the capacity or the pool:
    /// refused, the state unchanged), each checked as a decode (``checkDecoded``).
    func decodingStepsCase() throws {
        let dims = cacheDims(), batch = rng.int(1...3), capacity = rng.int(1...40)
        let kind: MultiQueryDecoding.CacheKind = switch rng.int(0...2) {
        case 0: .contiguous
        case 1: .rotating(window: rng.int(1...24))
        default: .paged(pageSize: rng.pick([1, 2, 4, 8, 16]), pageCount: rng.chance(0.5) ? nil : rng.int(1...16))
        }
        let window: Int? = if case .rotating(let w) = kind { w } else { nil }
        let decoding = cacheDecoder(window: window).decoding(cache: kind, precision: dims.precision)
        let label = "MultiQueryDecoding \(kind) \(dims.precision) B\(batch) H\(dims.heads)/\(dims.kvHeads) D\(dims.headDim) Dv\(dims.valueDim) capacity \(capacity)"
        log("\(label), decoder \(describe(decoding.attention))")
        var state = try call {
            try decoding.makeDecodingState(batch: batch, heads: dims.heads, kvHeads: dims.kvHeads, headDim: dims.headDim,
                                           valueDim: dims.valueDim, capacity: capacity)
        }
        guard let cache = CacheUnderTest(state: state) else {
            fail("\(label): the state is a \(type(of: state))")
            return
        }
        let wrongState = checkState(state, cache, kind: kind, batch: batch, capacity: capacity)
        if let problem = try wrongState ?? cache.mismatch() {
            fail("\(label): new state: \(problem)")
            return
        }
        for step in 0..<rng.int(1...8) {
            let n = rng.chance(0.15) ? rng.int(9...30) : rng.int(1...6), slots = cache.slots
            var (k, v) = try appendTensors(cache, items: batch, n: n)
            var q = try rng.tensor([batch, dims.heads, n, dims.headDim])
            var fits = try cache.fits(slots, layer: 0, n: n), what = "attendNext of \(n)"
            if rng.chance(0.15) {
                switch rng.int(0...2) {
                case 0: q = try rng.tensor([batch, dims.heads, n + 1, dims.headDim]); what += " with \(n + 1) queries"
                case 1: k = try rng.tensor([batch, dims.kvHeads, n, dims.headDim + 1]); what += " with keys of D + 1"
                default:
                    (k, v) = try appendTensors(cache, items: batch + 1, n: n)
                    q = try rng.tensor([batch + 1, dims.heads, n, dims.headDim])
                    what += " of batch \(batch + 1)"
                }
                fits = false
            }
            let threads: Int? = rng.chance(0.2) ? nil : rng.int(1...4)
            var result: AttentionResult?
            try attempt(cache, what, fits: fits, {
                result = try decoding.attendNext(query: q, key: k, value: v, state: &state, threads: threads)
            }, then: {
                for (b, slot) in slots.enumerated() { cache.history[slot]![0].append(k, v, item: b) }
            })
            let at = "\(label) step \(step) (\(what))"
            log("step \(step): \(what)\(result == nil ? " refused" : ""), lengths \(slots.map { cache.held($0, layer: 0).count })")
            if let problem = try cache.mismatch() {
                fail("\(at): \(problem)")
                return
            }
            guard let result else { continue }
            try checkDecoded(result, query: q, decoding.attention, cache: cache, target: state, slots: slots, layer: 0, at) { t in
                try decoding.attention.decode(query: q, cache: state, layer: 0, threads: t)
            }
        }
    }

    /// How a new decoding state differs from what `makeDecodingState` documents, or nil.
    private func checkState(_ state: any DecodingCache, _ cache: CacheUnderTest, kind: MultiQueryDecoding.CacheKind,
                            batch: Int, capacity: Int) -> String? {
        if state.batch != batch || state.layers != 1 { return "batch \(state.batch), layers \(state.layers)" }
        switch (kind, cache.kind) {
        case (.contiguous, .contiguous(let c)) where c.capacity == capacity: return nil
        case (.rotating(let w), .rotating(let c)) where c.window == w: return nil
        case (.paged(let size, let count), .paged(let p)):
            let pages = count ?? max(1, batch * ((capacity + size - 1) / size))
            return p.pageSize == size && p.pageCount == pages && p.sequenceIDs.count == batch
                ? nil : "pool of \(p.pageCount) pages of \(p.pageSize), \(p.sequenceIDs.count) sequences; expected \(pages) pages"
        default: return "the state is \(cache.name)"
        }
    }

    // MARK: Invalid options

    /// A cache or decoding state with an invalid option: a size below 1, a huge size, sizes
    /// whose product overflows the allocation limit, a page size not a power of two. It
    /// must throw an ``AttentionError`` (ones marked may compute may also succeed).
    func badCacheOptionCase() {
        let (what, mayCompute, body) = badCacheOption()
        expectRefused("cache option \(what)", mayCompute: mayCompute, body)
    }

    private func badCacheOption() -> (String, Bool, () throws -> Void) {
        let precision = rng.pick(KVCache.Precision.allCases)
        let bad = rng.pick([0, -1, Int.min]), huge = rng.pick([1 << 40, 1 << 62, Int.max / 2, Int.max])
        // layers, batch (a paged pool's pageSize), kvHeads, headDim, valueDim, and capacity,
        // window or pageCount: one field bad or huge, or every field up to 2^30 with the key
        // storage's product at least 2^50 (past any memory).
        var sizes = [2, 2, 2, 8, 8, 4]
        let field = rng.int(0...5)
        switch rng.int(0...2) {
        case 0: sizes[field] = bad
        case 1: sizes[field] = huge
        default:
            repeat { sizes = sizes.map { _ in rng.pick([1, 1 << 10, 1 << 20, 1 << 30]) } }
            while [0, 1, 2, 3, 5].map({ sizes[$0].trailingZeroBitCount }).reduce(0, +) < 50
        }
        let s = sizes
        let oddPageSize = rng.pick([3, 6, 12, 100, lengthLimit - 1])
        let badPageSize = rng.pick([bad, huge, oddPageSize])
        let window = rng.pick([bad, huge, lengthLimit + 1]), pageCount = rng.pick([bad, huge, lengthLimit + 1])
        let decodingKind: MultiQueryDecoding.CacheKind = rng.pick([
            .rotating(window: window), .paged(pageSize: badPageSize, pageCount: nil), .paged(pageSize: 4, pageCount: pageCount)])
        let capacity = rng.pick([bad, huge, lengthLimit + 1])
        let stateKind: MultiQueryDecoding.CacheKind = rng.pick([.contiguous, .rotating(window: 8), .paged(pageSize: 4, pageCount: nil),
                                                                .paged(pageSize: 4, pageCount: 8)])
        // A state whose storage follows batch × capacity (2^50 positions: past any memory).
        let poolKind: MultiQueryDecoding.CacheKind = rng.pick([.contiguous, .paged(pageSize: 1, pageCount: nil)])
        // The rotating state ignores the capacity; a paged one with a page count (or a
        // negative capacity: one page) may too.
        let capacityMayCompute: Bool = switch stateKind {
        case .contiguous: false
        case .rotating: true
        case .paged(_, let count): count != nil || capacity < 1
        }
        func state(_ kind: MultiQueryDecoding.CacheKind, batch: Int = 1, heads: Int = 2, kvHeads: Int = 1,
                   headDim: Int = 8, capacity: Int = 16) -> () throws -> Void {
            { _ = try MultiQueryAttention(causal: true).decoding(cache: kind, precision: precision)
                .makeDecodingState(batch: batch, heads: heads, kvHeads: kvHeads, headDim: headDim, valueDim: 8, capacity: capacity) }
        }
        let options: [(String, Bool, () throws -> Void)] = [
            ("KVCache sizes \(s) \(precision)", false, {
                _ = try KVCache(layers: s[0], batch: s[1], kvHeads: s[2], headDim: s[3], valueDim: s[4], capacity: s[5], precision: precision)
            }),
            ("KVCache capacity \(lengthLimit + 1)", false, { _ = try KVCache(kvHeads: 1, headDim: 1, capacity: lengthLimit + 1) }),
            ("RotatingKVCache sizes \(s) \(precision)", false, {
                _ = try RotatingKVCache(layers: s[0], batch: s[1], kvHeads: s[2], headDim: s[3], valueDim: s[4], window: s[5], precision: precision)
            }),
            ("RotatingKVCache window \(window)", false, { _ = try RotatingKVCache(kvHeads: 1, headDim: 4, window: window) }),
            ("PagedKVCache sizes \(s) (pageSize \(s[1])) \(precision)", false, {
                _ = try PagedKVCache(layers: s[0], kvHeads: s[2], headDim: s[3], valueDim: s[4], pageSize: s[1],
                                     pageCount: s[5], precision: precision)
            }),
            ("PagedKVCache pageSize \(badPageSize)", false, {
                _ = try PagedKVCache(kvHeads: 1, headDim: 4, pageSize: badPageSize, pageCount: 8, precision: precision)
            }),
            ("PagedKVCache pageCount \(pageCount)", false, {
                _ = try PagedKVCache(kvHeads: 1, headDim: 4, pageSize: 4, pageCount: pageCount, precision: precision)
            }),
            ("PagedKVCache pageSize 2^30 pageCount 2^30", false, {
                _ = try PagedKVCache(kvHeads: 1, headDim: 1, pageSize: 1 << 30, pageCount: 1 << 30, precision: precision)
            }),
            ("decoding state of \(decodingKind)", false, state(decodingKind)),
            ("decoding state \(stateKind) capacity \(capacity)", capacityMayCompute, state(stateKind, capacity: capacity)),
            ("decoding state \(stateKind) batch \(bad)", false, state(stateKind, batch: bad)),
            ("decoding state \(stateKind) batch \(huge) capacity \(lengthLimit)", false,
             state(stateKind, batch: huge, capacity: lengthLimit)),
            ("decoding state \(poolKind) batch 2^20 capacity \(lengthLimit)", false,
             state(poolKind, batch: 1 << 20, capacity: lengthLimit)),
            ("decoding state \(stateKind) 3 heads over 2", false, state(stateKind, heads: 3, kvHeads: 2)),
            ("decoding state \(stateKind) headDim \(MultiQueryAttention.maxHeadDim + 1)", false,
             state(stateKind, headDim: MultiQueryAttention.maxHeadDim + 1)),
        ]
        return rng.pick(options)
    }
}
