/// A small owned 4-D array of `Float` with explicit strides.
///
/// Elements live in `storage`; element `[i0, i1, i2, i3]` is at
/// `offset + i0·strides[0] + i1·strides[1] + i2·strides[2] + i3·strides[3]`.
/// Tensors made by ``init(shape:repeating:)`` are row-major and contiguous; the strided
/// initialiser lets a tensor live inside a larger buffer (a sub-range of a bigger
/// sequence, padding between rows). Kernels only ever read the addressed elements.
public struct Tensor: Sendable, Equatable {
    /// The backing array (`@_spi(Testing)`: tests build views over it); read a tensor's
    /// values through ``elements`` or the subscript.
    @_spi(Testing) public private(set) var storage: [Float]
    /// Four extents.
    public let shape: [Int]
    /// Four strides, in elements, each at least 0.
    public let strides: [Int]
    /// Position of element `[0, 0, 0, 0]` in `storage`.
    public let offset: Int

    /// A contiguous row-major tensor filled with `value`.
    public init(shape: [Int], repeating value: Float = 0) throws {
        let count = try Tensor.checkShape(shape, allocating: true)
        self.storage = [Float](repeating: value, count: count)
        self.shape = shape
        self.strides = Tensor.rowMajorStrides(shape)
        self.offset = 0
    }

    /// A contiguous row-major tensor holding `data` (`data.count` must equal the element count).
    public init(shape: [Int], data: [Float]) throws {
        let count = try Tensor.checkShape(shape)
        guard data.count == count else {
            throw AttentionError.shapeMismatch("shape \(shape) holds \(count) elements, data has \(data.count)")
        }
        self.storage = data
        self.shape = shape
        self.strides = Tensor.rowMajorStrides(shape)
        self.offset = 0
    }

    /// A view-like tensor over `storage` with explicit strides and offset. Throws if a
    /// stride is negative or an addressed element lies outside `storage`.
    public init(shape: [Int], storage: [Float], strides: [Int], offset: Int = 0) throws {
        _ = try Tensor.checkShape(shape)
        guard strides.count == 4 else {
            throw AttentionError.invalidShape("a tensor needs 4 strides, got \(strides.count)")
        }
        guard strides.allSatisfy({ $0 >= 0 }), offset >= 0 else {
            throw AttentionError.invalidParameter("strides and offset must be non-negative, got \(strides), \(offset)")
        }
        var last = offset
        for axis in 0..<4 where shape[axis] > 0 {
            guard let span = checkedProduct([shape[axis] - 1, strides[axis]]) else {
                throw AttentionError.sizeOverflow("shape \(shape) with strides \(strides) overflows Int")
            }
            let (sum, overflow) = last.addingReportingOverflow(span)
            guard !overflow else {
                throw AttentionError.sizeOverflow("shape \(shape) with strides \(strides) overflows Int")
            }
            last = sum
        }
        if shape.contains(0) { last = offset - 1 }
        guard last < storage.count else {
            throw AttentionError.shapeMismatch(
                "shape \(shape), strides \(strides), offset \(offset) address element \(last), storage has \(storage.count)")
        }
        self.storage = storage
        self.shape = shape
        self.strides = strides
        self.offset = offset
    }

    /// A contiguous tensor for a kernel's output, **not initialised**: the caller must
    /// write every element before the tensor is read. Skipping the zero fill saves a pass
    /// over the output, and the pages are first touched by the workers that write them.
    /// Large storage (at least 4 MiB) is advised to use transparent huge pages: a fresh
    /// 32 MiB output would otherwise take 8192 page faults per call (KernelDocs/LinearAttention.md
    /// gives their cost beside the arithmetic of a call).
    static func uninitializedOutput(shape: [Int]) throws -> Tensor {
        let count = try checkShape(shape, allocating: true)
        let data = [Float](unsafeUninitializedCapacity: count) { buffer, initialized in
            if let base = buffer.baseAddress {
                adviseHugePages(UnsafeMutableRawPointer(base), byteCount: count * MemoryLayout<Float>.stride)
            }
            initialized = count
        }
        return try Tensor(shape: shape, data: data)
    }

    /// A tensor of uniform random values in `range`, from a seeded generator.
    public static func random(shape: [Int], seed: UInt64, in range: ClosedRange<Float> = -1...1) throws -> Tensor {
        var rng = SeededGenerator(seed: seed)
        let count = try checkShape(shape, allocating: true)
        var data = [Float](repeating: 0, count: count)
        for i in 0..<count { data[i] = rng.nextFloat(in: range) }
        return try Tensor(shape: shape, data: data)
    }

    /// The number of elements (product of the extents).
    public var count: Int { shape.reduce(1, *) }

    /// True when the elements are row-major and gap-free from `offset`.
    public var isContiguous: Bool {
        // Compared in place: a strides array per check would allocate on every checked call.
        strides.count == 4 && strides[3] == 1 && strides[2] == shape[3] && strides[1] == shape[2] * shape[3]
            && strides[0] == shape[1] * shape[2] * shape[3]
    }

    public subscript(_ i0: Int, _ i1: Int, _ i2: Int, _ i3: Int) -> Float {
        get { storage[index(i0, i1, i2, i3)] }
        set { storage[index(i0, i1, i2, i3)] = newValue }
    }

    /// The elements in row-major order (a copy).
    public var elements: [Float] {
        if isContiguous && offset == 0 && storage.count == count { return storage }
        var out = [Float]()
        out.reserveCapacity(count)
        for a in 0..<shape[0] { for b in 0..<shape[1] { for c in 0..<shape[2] { for d in 0..<shape[3] {
            out.append(self[a, b, c, d])
        } } } }
        return out
    }

    @inline(__always)
    func index(_ i0: Int, _ i1: Int, _ i2: Int, _ i3: Int) -> Int {
        precondition(i0 >= 0 && i0 < shape[0] && i1 >= 0 && i1 < shape[1]
                     && i2 >= 0 && i2 < shape[2] && i3 >= 0 && i3 < shape[3], "Tensor index out of range")
        return offset + i0 * strides[0] + i1 * strides[1] + i2 * strides[2] + i3 * strides[3]
    }

    /// Runs `body` with a borrowed view of the tensor (valid only inside `body`).
    public func withStridedView<R>(_ body: (StridedView) throws -> R) throws -> R {
        try storage.withUnsafeBufferPointer { buffer in
            try body(StridedView(buffer, shape: SIMD4(shape), strides: SIMD4(strides), offset: offset))
        }
    }

    /// Runs `body` with a borrowed writable view of the tensor (valid only inside `body`).
    /// The tensor's strides must not make elements overlap (a stride-0 axis of extent above
    /// 1 does): then this throws.
    public mutating func withMutableStridedView<R>(_ body: (MutableStridedView) throws -> R) throws -> R {
        let shape = self.shape, strides = self.strides, offset = self.offset
        return try storage.withUnsafeMutableBufferPointer { buffer in
            try body(MutableStridedView(buffer, shape: SIMD4(shape), strides: SIMD4(strides), offset: offset))
        }
    }

    /// Runs `body` with a read-only view for kernels.
    func withView<R>(_ body: (TensorView) throws -> R) rethrows -> R {
        try storage.withUnsafeBufferPointer { buffer in
            try body(TensorView(base: buffer.baseAddress! + offset, strides: SIMD4(strides)))
        }
    }

    /// Runs `body` with a writable view for kernels.
    mutating func withMutableView<R>(_ body: (MutableTensorView) throws -> R) rethrows -> R {
        let strides = self.strides, offset = self.offset
        return try storage.withUnsafeMutableBufferPointer { buffer in
            try body(MutableTensorView(base: buffer.baseAddress! + offset, strides: SIMD4(strides)))
        }
    }

    static func rowMajorStrides(_ shape: [Int]) -> [Int] {
        [shape[1] * shape[2] * shape[3], shape[2] * shape[3], shape[3], 1]
    }

    /// Validates a shape and returns its element count. With `allocating` (the tensor gets
    /// its own storage) the storage must also fit ``maxAllocationBytes``; views over given
    /// storage (stride-0 axes) may address more elements than that.
    static func checkShape(_ shape: [Int], allocating: Bool = false) throws -> Int {
        guard shape.count == 4 else {
            throw AttentionError.invalidShape("a tensor has 4 dimensions [B, H, N, D], got \(shape.count): \(shape)")
        }
        guard shape.allSatisfy({ $0 >= 0 }) else {
            throw AttentionError.invalidShape("tensor extents must be non-negative, got \(shape)")
        }
        guard let count = checkedProduct(shape), checkedProduct([count, MemoryLayout<Float>.stride]) != nil else {
            throw AttentionError.sizeOverflow("tensor of shape \(shape) has more elements than memory can address")
        }
        if allocating { try checkFloatAllocation(count, option: "tensor of shape \(shape)") }
        return count
    }
}

/// Read-only strided access for kernels: a base pointer and four strides (the public,
/// checked form is ``StridedView``, or ``ActivationView`` for 16-bit elements). Valid only
/// while the memory it points to is. Views of `.float16` or `.bfloat16` elements are read
/// through ``rawRow(_:_:_:)`` (``widenRows(_:_:rows:width:into:ld:)``), never ``row(_:_:_:)``.
struct TensorView: @unchecked Sendable {
    let base: UnsafePointer<Float>
    let strides: SIMD4<Int>
    let precision: ActivationPrecision

    init(base: UnsafePointer<Float>, strides: SIMD4<Int>) {
        self.base = base
        self.strides = strides
        precision = .float32
    }

    init(raw: UnsafeRawPointer, strides: SIMD4<Int>, precision: ActivationPrecision) {
        base = raw.assumingMemoryBound(to: Float.self)
        self.strides = strides
        self.precision = precision
    }

    /// Pointer to row `[b, h, i, 0]` of a `.float32` view.
    @inline(__always)
    func row(_ b: Int, _ h: Int, _ i: Int) -> UnsafePointer<Float> {
        assert(precision == .float32, "row(_:_:_:) of a 16-bit view")
        let offset: Int = b &* strides[0] &+ h &* strides[1] &+ i &* strides[2]
        return base + offset
    }

    /// Address of row `[b, h, i, 0]`, whatever the precision.
    @inline(__always)
    func rawRow(_ b: Int, _ h: Int, _ i: Int) -> UnsafeRawPointer {
        let offset: Int = b &* strides[0] &+ h &* strides[1] &+ i &* strides[2]
        return UnsafeRawPointer(base) + offset &* precision.byteWidth
    }
}

/// Writable strided access for kernels (the public, checked form is ``MutableStridedView``,
/// or ``MutableActivationView`` for 16-bit elements).
struct MutableTensorView: @unchecked Sendable {
    let base: UnsafeMutablePointer<Float>
    let strides: SIMD4<Int>
    let precision: ActivationPrecision

    init(base: UnsafeMutablePointer<Float>, strides: SIMD4<Int>) {
        self.base = base
        self.strides = strides
        precision = .float32
    }

    init(raw: UnsafeMutableRawPointer, strides: SIMD4<Int>, precision: ActivationPrecision) {
        base = raw.assumingMemoryBound(to: Float.self)
        self.strides = strides
        self.precision = precision
    }

    /// The same elements, read-only.
    var readOnly: TensorView { TensorView(raw: UnsafeRawPointer(base), strides: strides, precision: precision) }

    @inline(__always)
    func row(_ b: Int, _ h: Int, _ i: Int) -> UnsafeMutablePointer<Float> {
        assert(precision == .float32, "row(_:_:_:) of a 16-bit view")
        let offset: Int = b &* strides[0] &+ h &* strides[1] &+ i &* strides[2]
        return base + offset
    }

    @inline(__always)
    func rawRow(_ b: Int, _ h: Int, _ i: Int) -> UnsafeMutableRawPointer {
        let offset: Int = b &* strides[0] &+ h &* strides[1] &+ i &* strides[2]
        return UnsafeMutableRawPointer(base) + offset &* precision.byteWidth
    }

    /// Sets the `[batch, heads, rows, width]` elements to 0 (Float32 views).
    func zero(batch: Int, heads: Int, rows: Int, width: Int) {
        for b in 0..<batch { for h in 0..<heads { for i in 0..<rows { zeroRow(b, h, i, count: width) } } }
    }
}
