/// A borrowed, read-only view of a `[B, H, N, D]` tensor of `Float` in caller memory:
/// a base address, four extents and four strides (in elements).
///
/// Element `[i0, i1, i2, i3]` is at `baseAddress + i0·strides[0] + i1·strides[1] +
/// i2·strides[2] + i3·strides[3]`. The initialiser checks that every addressed element
/// lies in the buffer it is given; the view does not own or copy that memory, which must
/// stay valid and unchanged while a call that reads the view runs.
///
/// This is the form every conformer's entry point
/// (``Attention/attend(query:key:value:output:logSumExp:keyLengths:workspace:threads:)``)
/// takes; ``Tensor`` is the owning convenience that forwards to it. Extents and strides
/// are `SIMD4<Int>` (an array literal such as `[1, 8, 2048, 64]` works), so making a view
/// allocates nothing.
///
/// Why not `Span<Float>`: a `Span` is a contiguous, non-escapable sequence. Attention
/// operands are strided 4-D views (a head's rows inside a packed `[N, H·D]` projection,
/// key rows of a larger cache), and the kernels hand their base addresses to worker
/// threads, which a non-escapable value cannot cross. ``init(_:shape:strides:offset:)-(Span<Float>,_,_,_)``
/// accepts a `Span` for the common case of a buffer already held as one.
public struct StridedView: @unchecked Sendable {
    /// Address of element `[0, 0, 0, 0]`.
    public let baseAddress: UnsafePointer<Float>
    /// Four extents `[B, H, N, D]`, each at least 0.
    public let shape: SIMD4<Int>
    /// Four strides in elements, each at least 0.
    public let strides: SIMD4<Int>

    /// A view of `buffer` starting at element `offset`; `strides` default to row-major
    /// (contiguous). Throws if an extent, a stride or the offset is negative, or if an
    /// addressed element lies outside `buffer`, naming the dimension.
    public init(_ buffer: UnsafeBufferPointer<Float>, shape: SIMD4<Int>, strides: SIMD4<Int>? = nil,
                offset: Int = 0) throws {
        let strides = strides ?? rowMajorStrides(shape)
        let extent = try checkedExtent(shape: shape, strides: strides, offset: offset, count: buffer.count)
        // An empty view addresses nothing; any base serves (it is never read).
        baseAddress = extent > 0 ? buffer.baseAddress! + offset
            : UnsafePointer(bitPattern: MemoryLayout<Float>.alignment)!
        self.shape = shape
        self.strides = strides
    }

    /// The view of a contiguous `Span` (see ``init(_:shape:strides:offset:)-(UnsafeBufferPointer<Float>,_,_,_)``).
    /// The view must not outlive the span's storage.
    public init(_ span: Span<Float>, shape: SIMD4<Int>, strides: SIMD4<Int>? = nil, offset: Int = 0) throws {
        self = try span.withUnsafeBufferPointer { try StridedView($0, shape: shape, strides: strides, offset: offset) }
    }

    /// Unchecked: for views the library builds over memory it has checked.
    init(unchecked base: UnsafePointer<Float>, shape: SIMD4<Int>, strides: SIMD4<Int>) {
        baseAddress = base
        self.shape = shape
        self.strides = strides
    }

    /// The kernels' form.
    var kernel: TensorView { TensorView(base: baseAddress, strides: strides) }

    /// The addresses the view spans, from its first element to its last (empty for an empty view).
    var addressRange: Range<UInt> { addressSpan(baseAddress, shape: shape, strides: strides) }
}

/// A borrowed, writable view of a `[B, H, N, D]` tensor of `Float` in caller memory: the
/// output and log-sum-exp of a call written in place (see ``StridedView``).
///
/// Besides the checks of ``StridedView``, no two elements of a writable view share an
/// address (strides that make elements overlap are refused, since workers would write
/// them concurrently).
public struct MutableStridedView: @unchecked Sendable {
    public let baseAddress: UnsafeMutablePointer<Float>
    public let shape: SIMD4<Int>
    public let strides: SIMD4<Int>

    /// A writable view of `buffer` (see ``StridedView/init(_:shape:strides:offset:)-(UnsafeBufferPointer<Float>,_,_,_)``);
    /// also throws if two elements would share an address.
    public init(_ buffer: UnsafeMutableBufferPointer<Float>, shape: SIMD4<Int>, strides: SIMD4<Int>? = nil,
                offset: Int = 0) throws {
        let strides = strides ?? rowMajorStrides(shape)
        let extent = try checkedExtent(shape: shape, strides: strides, offset: offset, count: buffer.count)
        try checkNoOverlap(shape: shape, strides: strides)
        baseAddress = extent > 0 ? buffer.baseAddress! + offset
            : UnsafeMutablePointer(bitPattern: MemoryLayout<Float>.alignment)!
        self.shape = shape
        self.strides = strides
    }

    /// The writable view of a contiguous `MutableSpan`; the view must not outlive its storage.
    public init(_ span: inout MutableSpan<Float>, shape: SIMD4<Int>, strides: SIMD4<Int>? = nil,
                offset: Int = 0) throws {
        self = try span.withUnsafeMutableBufferPointer {
            try MutableStridedView($0, shape: shape, strides: strides, offset: offset)
        }
    }

    init(unchecked base: UnsafeMutablePointer<Float>, shape: SIMD4<Int>, strides: SIMD4<Int>) {
        baseAddress = base
        self.shape = shape
        self.strides = strides
    }

    /// The same elements, read-only.
    public var readOnly: StridedView {
        StridedView(unchecked: UnsafePointer(baseAddress), shape: shape, strides: strides)
    }

    var kernel: MutableTensorView { MutableTensorView(base: baseAddress, strides: strides) }

    var addressRange: Range<UInt> { addressSpan(UnsafeRawPointer(baseAddress), shape: shape, strides: strides) }
}

/// Row-major strides of `shape`.
@inline(__always)
func rowMajorStrides(_ shape: SIMD4<Int>) -> SIMD4<Int> {
    SIMD4(shape[1] &* shape[2] &* shape[3], shape[2] &* shape[3], shape[3], 1)
}

/// Checks a view's layout against a buffer of `count` elements and returns the number of
/// elements the view addresses (0 when an extent is 0).
func checkedExtent(shape: SIMD4<Int>, strides: SIMD4<Int>, offset: Int, count: Int) throws -> Int {
    let names = ["B", "H", "N", "D"]
    for axis in 0..<4 {
        guard shape[axis] >= 0 else {
            throw AttentionError.invalidShape("view extent \(names[axis]) (dimension \(axis)) is negative: \(shape[axis])")
        }
        guard strides[axis] >= 0 else {
            throw AttentionError.invalidParameter(
                "view stride of \(names[axis]) (dimension \(axis)) is negative: \(strides[axis])")
        }
    }
    guard offset >= 0 else { throw AttentionError.invalidParameter("view offset is negative: \(offset)") }
    guard let elements = checkedProduct([shape[0], shape[1], shape[2], shape[3]]) else {
        throw AttentionError.sizeOverflow("view of shape \(list(shape)) has more elements than Int can count")
    }
    if elements == 0 { return 0 }
    var last = offset
    for axis in 0..<4 {
        guard let step = checkedProduct([shape[axis] - 1, strides[axis]]) else {
            throw AttentionError.sizeOverflow("view dimension \(names[axis]) (\(axis)) spans more elements than Int can count")
        }
        let (sum, overflow) = last.addingReportingOverflow(step)
        guard !overflow else {
            throw AttentionError.sizeOverflow("view dimension \(names[axis]) (\(axis)) spans more elements than Int can count")
        }
        last = sum
        guard last < count else {
            throw AttentionError.shapeMismatch(
                "view of shape \(list(shape)), strides \(list(strides)), offset \(offset) reaches element \(last) along \(names[axis]) (dimension \(axis)); the buffer has \(count) elements")
        }
    }
    return elements
}

/// Throws unless distinct indices of a view with `shape` and `strides` address distinct
/// elements: with the axes of extent above 1 ordered by stride, each stride is at least
/// the span of the smaller ones (`stride[a] ≥ Σ_{smaller b} (n_b − 1)·stride[b] + 1`).
func checkNoOverlap(shape: SIMD4<Int>, strides: SIMD4<Int>) throws {
    let names = ["B", "H", "N", "D"]
    let axes = (0..<4).filter { shape[$0] > 1 }.sorted { strides[$0] < strides[$1] }
    var span = 0   // elements covered by the axes so far, minus 1
    for axis in axes {
        guard strides[axis] > span else {
            throw AttentionError.invalidParameter(
                "writable view strides \(list(strides)) make elements overlap along \(names[axis]) (dimension \(axis)) for shape \(list(shape))")
        }
        span += (shape[axis] - 1) * strides[axis]   // bounded by the checked extent
    }
}

/// Addresses from a view's first element to just past its last one.
func addressSpan(_ base: UnsafeRawPointer, shape: SIMD4<Int>, strides: SIMD4<Int>,
                 elementBytes: Int = MemoryLayout<Float>.stride) -> Range<UInt> {
    guard shape[0] > 0, shape[1] > 0, shape[2] > 0, shape[3] > 0 else { return 0..<0 }
    let last = ((shape &- 1) &* strides).wrappedSum()
    let start = UInt(bitPattern: base)
    return start..<(start + UInt(last + 1) * UInt(elementBytes))
}

/// The four values of `v` as an array (for messages).
func list(_ v: SIMD4<Int>) -> [Int] { [v[0], v[1], v[2], v[3]] }
