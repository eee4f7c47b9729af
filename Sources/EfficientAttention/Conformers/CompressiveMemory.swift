/// The keys and values a ``CompressiveTransformerAttention`` segment call attends to before
/// the segment: a memory of up to `capacity` (`M`) past positions and a compressed memory
/// of up to `compressedCapacity` (`M_c`) slots, per batch item and key/value head.
///
/// A value type owned by the caller: pass it `inout` to
/// ``CompressiveTransformerAttention/attend(query:key:value:memory:threads:)``, which
/// appends the segment to the memory, keeps its last `M` positions and compresses the
/// positions that leave it into slots appended to the compressed memory (whose oldest
/// slots fall out past `M_c`). Batch items are independent: each has its own contents and
/// fill levels (``lengths``, ``compressedLengths``); ``reset(batchItem:)`` empties one of
/// them. Storage is shared and right-aligned, like ``TransformerXLMemory``: ``keys`` holds
/// ``storedLength`` positions per item, item `b`'s valid ones being the last `lengths[b]`
/// (the rows before them are zero); likewise ``compressedKeys`` with
/// ``compressedStoredLength`` and ``compressedLengths``. The stored lengths are the
/// longest fill levels.
public struct CompressiveMemory: Sendable, Equatable {
    /// `M`: the most positions the memory keeps.
    public let capacity: Int
    /// `M_c`: the most compressed slots kept.
    public let compressedCapacity: Int
    public let batch: Int, kvHeads: Int, headDim: Int, valueDim: Int
    /// The memory's keys `[B, Hkv, storedLength, D]`, oldest first.
    public private(set) var keys: Tensor
    /// The memory's values `[B, Hkv, storedLength, Dv]`.
    public private(set) var values: Tensor
    /// Valid (most recent) memory positions per batch item, each `≤ storedLength ≤ capacity`.
    public private(set) var lengths: [Int]
    /// The compressed memory's keys `[B, Hkv, compressedStoredLength, D]`, oldest first.
    public private(set) var compressedKeys: Tensor
    /// The compressed memory's values `[B, Hkv, compressedStoredLength, Dv]`.
    public private(set) var compressedValues: Tensor
    /// Valid (most recent) compressed slots per batch item, each
    /// `≤ compressedStoredLength ≤ compressedCapacity`.
    public private(set) var compressedLengths: [Int]

    /// An empty memory.
    ///
    /// - Complexity: O(B).
    public init(batch: Int, kvHeads: Int, headDim: Int, valueDim: Int? = nil, capacity: Int,
                compressedCapacity: Int) throws {
        for (label, value) in [("batch", batch), ("kvHeads", kvHeads), ("headDim", headDim),
                               ("valueDim", valueDim ?? headDim)] where value < 1 {
            throw AttentionError.invalidShape("compressive memory \(label) must be at least 1, got \(value)")
        }
        for (label, value) in [("capacity", capacity), ("compressedCapacity", compressedCapacity)] {
            guard value >= 0 else {
                throw AttentionError.invalidParameter("compressive memory \(label) must be at least 0, got \(value)")
            }
            try checkLimit(value, label, variant: "compressive memory")
        }
        self.capacity = capacity
        self.compressedCapacity = compressedCapacity
        self.batch = batch
        self.kvHeads = kvHeads
        self.headDim = headDim
        self.valueDim = valueDim ?? headDim
        keys = try Tensor(shape: [batch, kvHeads, 0, headDim])
        values = try Tensor(shape: [batch, kvHeads, 0, valueDim ?? headDim])
        compressedKeys = keys
        compressedValues = values
        lengths = [Int](repeating: 0, count: batch)
        compressedLengths = lengths
    }

    /// Memory positions stored per batch item (the longest fill level).
    public var storedLength: Int { keys.shape[2] }

    /// Compressed slots stored per batch item (the longest fill level).
    public var compressedStoredLength: Int { compressedKeys.shape[2] }

    /// Forgets every batch item's memory and compressed memory.
    ///
    /// - Complexity: O(B) besides releasing the storage.
    public mutating func reset() {
        keys = try! Tensor(shape: [batch, kvHeads, 0, headDim])
        values = try! Tensor(shape: [batch, kvHeads, 0, valueDim])
        compressedKeys = keys
        compressedValues = values
        lengths = [Int](repeating: 0, count: batch)
        compressedLengths = lengths
    }

    /// Forgets batch item `b`'s memory and compressed memory; the others keep theirs.
    ///
    /// - Complexity: `O(B · Hkv · (storedLength + compressedStoredLength) · (D + Dv))`
    ///   (the storage is zeroed for `b` and shortened to the longest remaining fill levels).
    public mutating func reset(batchItem b: Int) throws {
        guard b >= 0, b < batch else {
            throw AttentionError.invalidParameter("batchItem \(b) is outside 0..<\(batch) (batch)")
        }
        lengths[b] = 0
        compressedLengths[b] = 0
        let (stored, compressed) = (lengths.max() ?? 0, compressedLengths.max() ?? 0)
        let items = (0..<batch)
        keys = keys.rightAligned(length: stored, copying: items.map { lengths[$0] })
        values = values.rightAligned(length: stored, copying: items.map { lengths[$0] })
        compressedKeys = compressedKeys.rightAligned(length: compressed, copying: items.map { compressedLengths[$0] })
        compressedValues = compressedValues.rightAligned(length: compressed,
                                                         copying: items.map { compressedLengths[$0] })
    }

    /// Per batch item: its valid compressed slots and memory positions.
    var valid: [(compressed: Int, memory: Int)] { (0..<batch).map { (compressedLengths[$0], lengths[$0]) } }

    /// `[pad ; compressed valid ; memory valid ; segment]` per batch item (`pads[b]` zero
    /// rows), for the keys (`values: false`) or the values, row-major.
    func concatenated(values isValues: Bool, segment: Tensor, pads: [Int]) throws -> Tensor {
        let width = isValues ? valueDim : headDim
        let (memory, compressed) = isValues ? (values, compressedValues) : (keys, compressedKeys)
        let n = segment.shape[2], valid = self.valid
        let total = pads[0] + valid[0].compressed + valid[0].memory + n   // the same for every item
        var data = [Float](repeating: 0, count: batch * kvHeads * total * width)
        let (c, m, s) = (compressed.elements, memory.elements, segment.elements)
        for b in 0..<batch {
            let (lc, lm) = valid[b]
            copyRows(c, length: compressedStoredLength, from: compressedStoredLength - lc, into: &data, length: total,
                     to: pads[b], count: lc, item: b, heads: kvHeads, width: width)
            copyRows(m, length: storedLength, from: storedLength - lm, into: &data, length: total,
                     to: pads[b] + lc, count: lm, item: b, heads: kvHeads, width: width)
            copyRows(s, length: n, from: 0, into: &data, length: total, to: total - n, count: n,
                     item: b, heads: kvHeads, width: width)
        }
        return try Tensor(shape: [batch, kvHeads, total, width], data: data)
    }

    /// After a call over `all = [pad ; compressed ; memory ; segment]` (keys and values,
    /// row-major, as ``concatenated(values:segment:pads:)`` built them): item `b`'s memory
    /// keeps the last `M` positions of `[memory ; segment]`, the `evicted[b]` before them
    /// become `evicted[b] / c` slots (`compress(starts, slots, &keys, &values,
    /// destinations)` writes them) appended to its compressed memory, which keeps its last
    /// `M_c` slots. The caller has checked that `c` divides every `evicted[b]`.
    mutating func absorb(keys allKeys: Tensor, values allValues: Tensor, pads: [Int], added n: Int, evicted: [Int],
                         compression c: Int,
                         compress: (_ starts: [Int], _ slots: [Int], inout Tensor, inout Tensor, _ destinations: [Int])
                            -> Void) throws {
        let total = allKeys.shape[2]
        let newLengths = lengths.map { min(capacity, $0 + n) }
        let slots = evicted.map { $0 / c }
        let keptSlots = slots.map { min($0, compressedCapacity) }
        let newCompressed = (0..<batch).map { min(compressedCapacity, compressedLengths[$0] + slots[$0]) }
        let (stored, storedCompressed) = (newLengths.max() ?? 0, newCompressed.max() ?? 0)
        let (k, v) = (allKeys.elements, allValues.elements)

        func rows(_ source: [Float], width: Int, length: Int,
                  _ pieces: (Int) -> [(from: Int, to: Int, count: Int)]) throws -> Tensor {
            var data = [Float](repeating: 0, count: batch * kvHeads * length * width)
            for b in 0..<batch {
                for piece in pieces(b) {
                    copyRows(source, length: total, from: piece.from, into: &data, length: length, to: piece.to,
                             count: piece.count, item: b, heads: kvHeads, width: width)
                }
            }
            return try Tensor(shape: [batch, kvHeads, length, width], data: data)
        }
        // The memory: the last newLengths[b] rows of item b.
        let memoryPieces = { (b: Int) in [(from: total - newLengths[b], to: stored - newLengths[b], count: newLengths[b])] }
        // The compressed memory: the old valid slots that stay, then room for the new ones.
        let oldKept = (0..<batch).map { newCompressed[$0] - keptSlots[$0] }
        let compressedPieces = { (b: Int) in
            [(from: pads[b] + self.compressedLengths[b] - oldKept[b], to: storedCompressed - newCompressed[b],
              count: oldKept[b])]
        }
        let newKeys = try rows(k, width: headDim, length: stored, memoryPieces)
        let newValues = try rows(v, width: valueDim, length: stored, memoryPieces)
        var newCompressedKeys = try rows(k, width: headDim, length: storedCompressed, compressedPieces)
        var newCompressedValues = try rows(v, width: valueDim, length: storedCompressed, compressedPieces)
        // New slots that stay: the last keptSlots[b] windows of the evicted positions.
        let starts = (0..<batch).map { pads[$0] + compressedLengths[$0] + (slots[$0] - keptSlots[$0]) * c }
        compress(starts, keptSlots, &newCompressedKeys, &newCompressedValues,
                 keptSlots.map { storedCompressed - $0 })

        keys = newKeys
        values = newValues
        compressedKeys = newCompressedKeys
        compressedValues = newCompressedValues
        lengths = newLengths
        compressedLengths = newCompressed
    }
}

/// Copies `count` rows (`width` floats each) of every key/value head of batch item `b`,
/// from row `from` of `source` (`[B, heads, sourceLength, width]` row-major) to row `to`
/// of `destination` (`[B, heads, destinationLength, width]`).
private func copyRows(_ source: [Float], length sourceLength: Int, from: Int, into destination: inout [Float],
                      length destinationLength: Int, to: Int, count: Int, item b: Int, heads: Int, width: Int) {
    guard count > 0 else { return }
    source.withUnsafeBufferPointer { s in
        destination.withUnsafeMutableBufferPointer { d in
            for h in 0..<heads {
                let sourceRow = ((b * heads + h) * sourceLength + from) * width
                let destinationRow = ((b * heads + h) * destinationLength + to) * width
                (d.baseAddress! + destinationRow).update(from: s.baseAddress! + sourceRow, count: count * width)
            }
        }
    }
}

extension Tensor {
    /// A `[B, H, length, w]` tensor holding the last `counts[b]` positions of each batch
    /// item of this one (row-major), right-aligned, zeros before them.
    func rightAligned(length: Int, copying counts: [Int]) -> Tensor {
        let (batch, heads, n, width) = (shape[0], shape[1], shape[2], shape[3])
        let source = elements
        var data = [Float](repeating: 0, count: batch * heads * length * width)
        for b in 0..<batch {
            copyRows(source, length: n, from: n - counts[b], into: &data, length: length, to: length - counts[b],
                     count: counts[b], item: b, heads: heads, width: width)
        }
        return try! Tensor(shape: [batch, heads, length, width], data: data)
    }
}
