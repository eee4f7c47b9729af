/// The keys and values a ``TransformerXLAttention`` segment call attends to before the
/// segment: up to `capacity` (`M`) past positions per batch item and key/value head.
///
/// A value type owned by the caller: pass it `inout` to
/// ``TransformerXLAttention/attend(query:key:value:memory:threads:)``, which appends the
/// segment and keeps the last `M` positions. Batch items are independent: each has its
/// own contents and fill level (``lengths``), and ``reset(batchItem:)`` empties one of
/// them. Storage is shared: ``keys`` and ``values`` hold ``storedLength`` positions per
/// item, item `b`'s valid ones being the last `lengths[b]`.
public struct TransformerXLMemory: Sendable, Equatable {
    /// `M`: the most positions kept.
    public let capacity: Int
    public let batch: Int, kvHeads: Int, headDim: Int, valueDim: Int
    /// `[B, Hkv, storedLength, D]`.
    public private(set) var keys: Tensor
    /// `[B, Hkv, storedLength, Dv]`.
    public private(set) var values: Tensor
    /// Valid (most recent) positions per batch item, each `≤ storedLength ≤ capacity`.
    public private(set) var lengths: [Int]

    /// An empty memory.
    ///
    /// - Complexity: O(B).
    public init(batch: Int, kvHeads: Int, headDim: Int, valueDim: Int? = nil, capacity: Int) throws {
        for (label, value) in [("batch", batch), ("kvHeads", kvHeads), ("headDim", headDim),
                               ("valueDim", valueDim ?? headDim)] where value < 1 {
            throw AttentionError.invalidShape("memory \(label) must be at least 1, got \(value)")
        }
        guard capacity >= 0 else {
            throw AttentionError.invalidParameter("memory capacity must be at least 0, got \(capacity)")
        }
        try checkLimit(capacity, "memory capacity", variant: "Transformer-XL memory")
        self.capacity = capacity
        self.batch = batch
        self.kvHeads = kvHeads
        self.headDim = headDim
        self.valueDim = valueDim ?? headDim
        keys = try Tensor(shape: [batch, kvHeads, 0, headDim])
        values = try Tensor(shape: [batch, kvHeads, 0, valueDim ?? headDim])
        lengths = [Int](repeating: 0, count: batch)
    }

    /// Positions stored per batch item (the longest fill level).
    public var storedLength: Int { keys.shape[2] }

    /// Forgets every batch item's memory.
    ///
    /// - Complexity: O(1) besides releasing the storage.
    public mutating func reset() {
        keys = try! Tensor(shape: [batch, kvHeads, 0, headDim])
        values = try! Tensor(shape: [batch, kvHeads, 0, valueDim])
        lengths = [Int](repeating: 0, count: batch)
    }

    /// Forgets batch item `b`'s memory; the others keep theirs.
    ///
    /// - Complexity: O(B).
    public mutating func reset(batchItem b: Int) throws {
        guard b >= 0, b < batch else {
            throw AttentionError.invalidParameter("batchItem \(b) is outside 0..<\(batch) (batch)")
        }
        lengths[b] = 0
        if lengths.allSatisfy({ $0 == 0 }) { reset() }
    }

    /// Keeps the last `capacity` positions of `keys`/`values` (`[memory ; segment]`).
    mutating func keep(keys allKeys: Tensor, values allValues: Tensor, added: Int) {
        let kept = min(capacity, allKeys.shape[2])
        keys = allKeys.lastPositions(kept)
        values = allValues.lastPositions(kept)
        lengths = lengths.map { min(capacity, $0 + added) }
    }
}

extension Tensor {
    /// `[self ; other]` along the positions axis (2), row-major.
    func appendingPositions(of other: Tensor) throws -> Tensor {
        let (b, h, n, m, d) = (shape[0], shape[1], shape[2], other.shape[2], shape[3])
        precondition(other.shape[0] == b && other.shape[1] == h && other.shape[3] == d)
        let mine = elements, theirs = other.elements
        try checkFloatAllocation(b, h, n + m, d, option: "Transformer-XL [memory ; segment] [B, Hkv, M + Nq, D]")
        var data = [Float]()
        data.reserveCapacity(b * h * (n + m) * d)
        for item in 0..<(b * h) {
            data.append(contentsOf: mine[(item * n * d)..<((item + 1) * n * d)])
            data.append(contentsOf: theirs[(item * m * d)..<((item + 1) * m * d)])
        }
        return try Tensor(shape: [b, h, n + m, d], data: data)
    }

    /// The last `count` positions along axis 2, row-major.
    func lastPositions(_ count: Int) -> Tensor { positions((shape[2] - count)..<shape[2]) }

    /// Positions `range` along axis 2, row-major.
    func positions(_ range: Range<Int>) -> Tensor {
        let (b, h, n, d) = (shape[0], shape[1], shape[2], shape[3])
        let all = elements
        var data = [Float]()
        data.reserveCapacity(b * h * range.count * d)
        for item in 0..<(b * h) {
            data.append(contentsOf: all[((item * n + range.lowerBound) * d)..<((item * n + range.upperBound) * d)])
        }
        return try! Tensor(shape: [b, h, range.count, d], data: data)
    }
}
