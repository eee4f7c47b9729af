/// The element type of activations in caller memory: query, key, value and output each
/// may be in any of the three; arithmetic is in `Float` whatever they are.
///
/// - `float16`: IEEE 754 binary16 (Swift's `Float16`, or its bit pattern as `UInt16`).
/// - `bfloat16`: the upper 16 bits of a `Float` (8 exponent bits, 7 fraction bits), held as
///   its bit pattern in `UInt16` (Swift has no type for it). Reading one is exact; writing
///   one rounds to nearest, ties to even, and keeps NaN a (quiet) NaN.
public enum ActivationPrecision: String, Sendable, CaseIterable {
    case float32, float16, bfloat16

    /// Bytes of one element.
    public var byteWidth: Int { self == .float32 ? 4 : 2 }
}

/// A borrowed, read-only view of a `[B, H, N, D]` tensor in caller memory whose elements
/// are `Float`, binary16 or bfloat16 (``ActivationPrecision``): the operand type of
/// ``Attention/attend(query:key:value:output:logSumExp:keyLengths:workspace:threads:)-(ActivationView,_,_,_,_,_,_,_)``.
///
/// Extents and strides count elements, as for ``StridedView`` (which is the `float32` case
/// and converts to this type with ``init(_:)``); the same bounds checks apply.
public struct ActivationView: @unchecked Sendable {
    /// Address of element `[0, 0, 0, 0]`.
    public let rawBaseAddress: UnsafeRawPointer
    public let precision: ActivationPrecision
    public let shape: SIMD4<Int>
    public let strides: SIMD4<Int>

    /// The `float32` view `view`.
    public init(_ view: StridedView) {
        rawBaseAddress = UnsafeRawPointer(view.baseAddress)
        precision = .float32
        shape = view.shape
        strides = view.strides
    }

    /// A view of 16-bit elements (`precision` `.float16` or `.bfloat16`) held as their bit
    /// patterns in `buffer`, from element `offset`; `strides` default to row-major. Throws
    /// what ``StridedView/init(_:shape:strides:offset:)-(UnsafeBufferPointer<Float>,_,_,_)``
    /// throws, and if `precision` is `.float32`.
    public init(bitPatterns buffer: UnsafeBufferPointer<UInt16>, precision: ActivationPrecision,
                shape: SIMD4<Int>, strides: SIMD4<Int>? = nil, offset: Int = 0) throws {
        guard precision != .float32 else {
            throw AttentionError.invalidParameter("a view of UInt16 bit patterns needs precision float16 or bfloat16, not float32")
        }
        let strides = strides ?? rowMajorStrides(shape)
        let extent = try checkedExtent(shape: shape, strides: strides, offset: offset, count: buffer.count)
        rawBaseAddress = extent > 0 ? UnsafeRawPointer(buffer.baseAddress! + offset)
            : UnsafeRawPointer(bitPattern: MemoryLayout<Float>.alignment)!
        self.precision = precision
        self.shape = shape
        self.strides = strides
    }

    init(unchecked base: UnsafeRawPointer, precision: ActivationPrecision, shape: SIMD4<Int>, strides: SIMD4<Int>) {
        rawBaseAddress = base
        self.precision = precision
        self.shape = shape
        self.strides = strides
    }

    /// The `float32` view, or nil for 16-bit elements.
    public var float32: StridedView? {
        precision == .float32
            ? StridedView(unchecked: rawBaseAddress.assumingMemoryBound(to: Float.self), shape: shape, strides: strides)
            : nil
    }

    /// The kernels' form.
    var kernel: TensorView { TensorView(raw: rawBaseAddress, strides: strides, precision: precision) }

    var addressRange: Range<UInt> {
        addressSpan(rawBaseAddress, shape: shape, strides: strides, elementBytes: precision.byteWidth)
    }
}

/// A borrowed, writable view of a `[B, H, N, D]` tensor in caller memory of any
/// ``ActivationPrecision``: the output of a mixed-precision call (see ``ActivationView``;
/// the checks of ``MutableStridedView`` apply). Results are computed in `Float` and
/// rounded to the view's precision once, when written.
public struct MutableActivationView: @unchecked Sendable {
    public let rawBaseAddress: UnsafeMutableRawPointer
    public let precision: ActivationPrecision
    public let shape: SIMD4<Int>
    public let strides: SIMD4<Int>

    /// The `float32` view `view`.
    public init(_ view: MutableStridedView) {
        rawBaseAddress = UnsafeMutableRawPointer(view.baseAddress)
        precision = .float32
        shape = view.shape
        strides = view.strides
    }

    /// A writable view of 16-bit elements held as bit patterns in `buffer` (see
    /// ``ActivationView/init(bitPatterns:precision:shape:strides:offset:)``); also throws if
    /// two elements would share an address.
    public init(bitPatterns buffer: UnsafeMutableBufferPointer<UInt16>, precision: ActivationPrecision,
                shape: SIMD4<Int>, strides: SIMD4<Int>? = nil, offset: Int = 0) throws {
        guard precision != .float32 else {
            throw AttentionError.invalidParameter("a view of UInt16 bit patterns needs precision float16 or bfloat16, not float32")
        }
        let strides = strides ?? rowMajorStrides(shape)
        let extent = try checkedExtent(shape: shape, strides: strides, offset: offset, count: buffer.count)
        try checkNoOverlap(shape: shape, strides: strides)
        rawBaseAddress = extent > 0 ? UnsafeMutableRawPointer(buffer.baseAddress! + offset)
            : UnsafeMutableRawPointer(bitPattern: MemoryLayout<Float>.alignment)!
        self.precision = precision
        self.shape = shape
        self.strides = strides
    }

    init(unchecked base: UnsafeMutableRawPointer, precision: ActivationPrecision, shape: SIMD4<Int>,
         strides: SIMD4<Int>) {
        rawBaseAddress = base
        self.precision = precision
        self.shape = shape
        self.strides = strides
    }

    /// The `float32` view, or nil for 16-bit elements.
    public var float32: MutableStridedView? {
        precision == .float32
            ? MutableStridedView(unchecked: rawBaseAddress.assumingMemoryBound(to: Float.self), shape: shape,
                                 strides: strides)
            : nil
    }

    var kernel: MutableTensorView { MutableTensorView(raw: rawBaseAddress, strides: strides, precision: precision) }

    var addressRange: Range<UInt> {
        addressSpan(UnsafeRawPointer(rawBaseAddress), shape: shape, strides: strides, elementBytes: precision.byteWidth)
    }
}

// MARK: - Element conversions

/// An element type activations are read from and written to: widened to `Float` when read
/// (``CacheScalar``), rounded to nearest even when written.
protocol ActivationScalar: CacheScalar {
    /// `out[c] = Self(x[c])` for `c < count`, rounding to nearest, ties to even.
    static func narrow(_ x: UnsafePointer<Float>, into out: UnsafeMutablePointer<Self>, count: Int)
}

extension Float: ActivationScalar {
    @inline(__always)
    static func narrow(_ x: UnsafePointer<Float>, into out: UnsafeMutablePointer<Float>, count: Int) {
        out.update(from: x, count: count)
    }
}

extension HalfElement: ActivationScalar {
    @inline(__always)
    static func narrow(_ x: UnsafePointer<Float>, into out: UnsafeMutablePointer<HalfElement>, count: Int) {
        narrow(x, stride: 1, into: out, count: count)
    }
}

/// A bfloat16 value as its bit pattern: the upper half of a `Float`.
struct BFloat16Bits: Equatable, Sendable {
    var bits: UInt16

    init(bits: UInt16) { self.bits = bits }

    /// `x` rounded to the nearest bfloat16, ties to even; a NaN stays NaN (made quiet,
    /// sign and upper payload kept); overflow rounds to ±infinity.
    @inline(__always)
    init(_ x: Float) {
        let pattern = x.bitPattern
        if x.isNaN {
            bits = UInt16(truncatingIfNeeded: pattern >> 16) | 0x0040
        } else {
            let rounded = pattern &+ 0x7FFF &+ ((pattern >> 16) & 1)
            bits = UInt16(truncatingIfNeeded: rounded >> 16)
        }
    }

    /// The value as a Float (exact).
    @inline(__always)
    var float: Float { Float(bitPattern: UInt32(bits) << 16) }
}

extension BFloat16Bits: ActivationScalar {
    @inline(__always) static func wide16(_ p: UnsafePointer<BFloat16Bits>) -> Vec16 {
        let h = UnsafeRawPointer(p).loadUnaligned(as: SIMD16<UInt16>.self)
        // A lane loop (one vpmovzxwd and a shift): the generic SIMD conversion initialiser
        // compiles to an out-of-line call, which halved bfloat16 decode bandwidth.
        var w = SIMD16<UInt32>()
        for i in 0..<16 { w[i] = UInt32(h[i]) &<< 16 }
        return unsafeBitCast(w, to: Vec16.self)
    }
    @inline(__always) static func widen(_ x: BFloat16Bits) -> Float { x.float }

    static func narrow(_ x: UnsafePointer<Float>, into out: UnsafeMutablePointer<BFloat16Bits>, count: Int) {
        var c = 0
        while c + 16 <= count {
            let v = load16(x + c)
            let pattern = unsafeBitCast(v, to: SIMD16<UInt32>.self)
            let rounded = (pattern &+ 0x7FFF &+ ((pattern &>> 16) & 1)) &>> 16
            // NaN lanes: the truncated pattern made quiet (rounding could carry a NaN's
            // payload into the exponent or turn it into infinity).
            let quietNaN = (pattern &>> 16) | 0x40
            let chosen = rounded.replacing(with: quietNaN, where: v .!= v)
            var bits = SIMD16<UInt16>()
            for i in 0..<16 { bits[i] = UInt16(truncatingIfNeeded: chosen[i]) }
            UnsafeMutableRawPointer(out + c).storeBytes(of: bits, as: SIMD16<UInt16>.self)
            c += 16
        }
        while c < count { out[c] = BFloat16Bits(x[c]); c += 1 }
    }
}

extension TensorView {
    /// `out[r · ld + c] = scale · Float(x[rows.position(r)][c])` for `r < rows.count`,
    /// `c < width`: rows of head `(b, h)` widened to Float whatever the view's precision.
    @inline(__always)
    func widenRows(_ b: Int, _ h: Int, rows: PositionRun, width: Int,
                   into out: UnsafeMutablePointer<Float>, ld: Int) {
        switch precision {
        case .float32: widenRows(Float.self, b, h, rows: rows, width: width, into: out, ld: ld)
        case .float16: widenRows(HalfElement.self, b, h, rows: rows, width: width, into: out, ld: ld)
        case .bfloat16: widenRows(BFloat16Bits.self, b, h, rows: rows, width: width, into: out, ld: ld)
        }
    }

    @inline(__always)
    private func widenRows<E: ActivationScalar>(_: E.Type, _ b: Int, _ h: Int, rows: PositionRun, width: Int,
                                               into out: UnsafeMutablePointer<Float>, ld: Int) {
        let sd = strides[3]
        for r in 0..<rows.count {
            let source = rawRow(b, h, rows.position(r)).assumingMemoryBound(to: E.self), target = out + r &* ld
            var c = 0
            if sd == 1 {
                while c + 16 <= width {
                    store16(E.wide16(source + c), target + c)
                    c += 16
                }
            }
            while c < width { target[c] = E.widen(source[c &* sd]); c += 1 }
        }
    }
}

extension TensorView {
    /// Whether the tiled kernels (forward and backward) read the rows `rows` of this view in
    /// place: `Float` rows of a contiguous run. Others are packed into a worker's workspace
    /// (16-bit ones widened): rows `step > 1` apart are read again by every micro-kernel
    /// block, and a multiple of 4 KiB apart (an axial column, a strided pattern's column at
    /// `stride · D · 4` bytes) they fall in the same few L1 sets and came from L2 each time
    /// (KernelDocs/Axial.md, "Packed line tiles").
    @inline(__always)
    func readsInPlace(_ rows: PositionRun) -> Bool { precision == .float32 && rows.step == 1 }

    /// Whether the tiled kernels read the rows `rows` of this view in place as the
    /// micro-kernel's vector rows (`B`), `width` elements each padded to `padded`:
    /// ``readsInPlace(_:)`` rows that are also whole micro-tile rows (unit column stride, no
    /// padding). Others are packed `padded` apart.
    @inline(__always)
    func readsInPlace(_ rows: PositionRun, width: Int, padded: Int) -> Bool {
        readsInPlace(rows) && strides[3] == 1 && padded == width
    }

    /// Rows `rows` of head `(b, h)` (`width` elements each) as `Float` rows for a kernel that
    /// reads them through strides: this view's own rows when it is `Float`, else the rows
    /// widened into `stage` (`rows.count × width` floats; valid until it is next written).
    @inline(__always)
    func floatRows(_ b: Int, _ h: Int, rows: PositionRun, width: Int, stage: UnsafeMutablePointer<Float>)
        -> (base: UnsafePointer<Float>, rowStride: Int, columnStride: Int) {
        guard precision != .float32 else { return (row(b, h, rows.start), rows.step &* strides[2], strides[3]) }
        widenRows(b, h, rows: rows, width: width, into: stage, ld: width)
        return (UnsafePointer(stage), width, 1)
    }
}

extension MutableTensorView {
    /// Writes `rows` contiguous rows of `width` floats at `values` into rows `0 ..< rows` of
    /// head `(b, h)`, each rounded to the view's precision.
    func storeRows(_ b: Int, _ h: Int, rows: Int, from values: UnsafePointer<Float>, width: Int) {
        for i in 0..<rows { storeRow(b, h, i, from: values + i * width, count: width) }
    }

    /// Writes `values[0..<count]` into row `[b, h, i]`, rounded to the view's precision.
    @inline(__always)
    func storeRow(_ b: Int, _ h: Int, _ i: Int, from values: UnsafePointer<Float>, count: Int) {
        switch precision {
        case .float32: storeRow(Float.self, b, h, i, from: values, count: count)
        case .float16: storeRow(HalfElement.self, b, h, i, from: values, count: count)
        case .bfloat16: storeRow(BFloat16Bits.self, b, h, i, from: values, count: count)
        }
    }

    /// Writes `+0` into the first `count` elements of row `[b, h, i]` (all bits zero in
    /// every precision).
    @inline(__always)
    func zeroRow(_ b: Int, _ h: Int, _ i: Int, count: Int) {
        let row = rawRow(b, h, i), step = strides[3] &* precision.byteWidth
        if precision == .float32 {
            for c in 0..<count { row.storeBytes(of: Float(0), toByteOffset: c &* step, as: Float.self) }
        } else {
            for c in 0..<count { row.storeBytes(of: UInt16(0), toByteOffset: c &* step, as: UInt16.self) }
        }
    }

    @inline(__always)
    private func storeRow<E: ActivationScalar>(_: E.Type, _ b: Int, _ h: Int, _ i: Int,
                                               from values: UnsafePointer<Float>, count: Int) {
        let target = rawRow(b, h, i).assumingMemoryBound(to: E.self), sd = strides[3]
        if sd == 1 {
            E.narrow(values, into: target, count: count)
        } else {
            for c in 0..<count { E.narrow(values + c, into: target + c &* sd, count: 1) }
        }
    }
}

/// Conformers whose kernels read 16-bit operands themselves: the tiled softmax kernel
/// widens query, key and value rows tile by tile as it packs them and rounds each output
/// row once as it writes it. They implement the ``ActivationView`` entry point; the
/// `StridedView` one forwards to it.
protocol KernelWidening: Attention {
    /// Which operands a call of `shape` still stages in `Float` scratch when they are 16-bit:
    /// the query rows of a decode-shaped call, the output of passes merged by log-sum-exp
    /// (they read their output back).
    func stagedOperands(_ shape: AttentionShape) -> (query: Bool, output: Bool)
    /// The `Float` output elements a 16-bit call of `shape` stages at once when its output is
    /// staged: the whole output unless the conformer stages it part by part.
    func stagedOutputElements(_ shape: AttentionShape) -> Int
}

extension KernelWidening {
    public func attend(query: StridedView, key: StridedView, value: StridedView,
                       output: MutableStridedView, logSumExp: MutableStridedView?,
                       keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws {
        try attend(query: ActivationView(query), key: ActivationView(key), value: ActivationView(value),
                   output: MutableActivationView(output), logSumExp: logSumExp, keyLengths: keyLengths,
                   workspace: workspace, threads: threads)
    }

    public func conversionScratchBytes(_ shape: AttentionShape, precisions: OperandPrecisions) -> Int {
        let staged = stagedOperands(shape)
        // Sinks rescale finished rows, so a 16-bit output is then formed whole in `Float`
        // (``Attention/withCheckedCall(query:key:value:output:logSumExp:keyLengths:workspace:threads:scale:modifiers:_:)``)
        // and the conformer writes into that.
        let outputElements = scoreModifiers?.sinks != nil ? shape.outputElements
            : staged.output ? stagedOutputElements(shape) : 0
        return shape.widenedCopyBytes(precisions, query: staged.query, key: false, value: false, output: false)
            + widenedCopyBytes(precisions.output, outputElements)
    }

    func stagedOutputElements(_ shape: AttentionShape) -> Int { shape.outputElements }
}

/// The bfloat16 conversions of mixed-precision calls, for tests: the scalar path and the
/// 16-lane path the kernels use.
@_spi(Testing) public enum BFloat16Conversions {
    /// `x` rounded to bfloat16 (nearest, ties to even; NaN kept quiet), as a bit pattern.
    public static func bits(_ x: Float) -> UInt16 { BFloat16Bits(x).bits }

    /// `values` rounded the way an output row is written (16 lanes at a time, then one by one).
    public static func rowBits(_ values: [Float]) -> [UInt16] {
        var bits = [UInt16](repeating: 0, count: values.count)
        values.withUnsafeBufferPointer { source in
            bits.withUnsafeMutableBytes { target in
                guard let x = source.baseAddress, let out = target.baseAddress else { return }
                BFloat16Bits.narrow(x, into: out.bindMemory(to: BFloat16Bits.self, capacity: values.count),
                                    count: values.count)
            }
        }
        return bits
    }

    /// The bit patterns `bits` widened the way the kernels read a row (16 lanes at a time).
    public static func rowFloats(_ bits: [UInt16]) -> [Float] {
        var values = [Float](repeating: 0, count: bits.count)
        bits.withUnsafeBufferPointer { source in
            values.withUnsafeMutableBufferPointer { target in
                guard let row = source.baseAddress, let out = target.baseAddress else { return }
                let view = TensorView(raw: UnsafeRawPointer(row), strides: SIMD4(0, 0, bits.count, 1),
                                      precision: .bfloat16)
                view.widenRows(0, 0, rows: PositionRun(start: 0, count: 1), width: bits.count, into: out,
                               ld: bits.count)
            }
        }
        return values
    }
}

extension TensorView {
    /// `Σ_c self[row][c] · other[otherRow][c]` over `count` elements, whatever the two views'
    /// precisions: the bits of ``dot(_:_:_:_:count:)`` on the rows widened to `Float`.
    func dot(row r: (Int, Int, Int), _ other: TensorView, row o: (Int, Int, Int), count: Int) -> Float {
        if precision == .float32 && other.precision == .float32 {
            return EfficientAttention.dot(row(r.0, r.1, r.2), strides[3], other.row(o.0, o.1, o.2), other.strides[3],
                                          count: count)
        }
        let x = (rawRow(r.0, r.1, r.2), strides[3]), y = (other.rawRow(o.0, o.1, o.2), other.strides[3])
        if precision == other.precision {
            // Two rows of one 16-bit precision (a row's norm): 16 lanes widened at a time.
            switch precision {
            case .float16: return dot(HalfElement.self, x, y, count: count)
            case .bfloat16: return dot(BFloat16Bits.self, x, y, count: count)
            case .float32: break
            }
        }
        var t = 0
        var acc = SIMD16<Float>()
        while t + 16 <= count {
            var a = SIMD16<Float>(), b = SIMD16<Float>()
            for l in 0..<16 {
                a[l] = precision.widen(x.0, at: (t &+ l) &* x.1)
                b[l] = other.precision.widen(y.0, at: (t &+ l) &* y.1)
            }
            multiplyAdd(&acc, a, b)
            t += 16
        }
        var sum = acc.sum()
        while t < count {
            sum += precision.widen(x.0, at: t &* x.1) * other.precision.widen(y.0, at: t &* y.1)
            t += 1
        }
        return sum
    }
}

extension TensorView {
    /// ``dot(row:_:row:count:)`` for two rows of precision `E` (`(address, element stride)`).
    @inline(__always)
    private func dot<E: ActivationScalar>(_: E.Type, _ x: (UnsafeRawPointer, Int), _ y: (UnsafeRawPointer, Int),
                                          count: Int) -> Float {
        let a = x.0.assumingMemoryBound(to: E.self), b = y.0.assumingMemoryBound(to: E.self)
        @inline(__always) func lanes(_ p: UnsafePointer<E>, _ s: Int) -> Vec16 {
            if s == 1 { return E.wide16(p) }
            var v = Vec16()
            for l in 0..<16 { v[l] = E.widen(p[l &* s]) }
            return v
        }
        var t = 0
        var acc = SIMD16<Float>()
        while t + 16 <= count {
            multiplyAdd(&acc, lanes(a + t &* x.1, x.1), lanes(b + t &* y.1, y.1))
            t += 16
        }
        var sum = acc.sum()
        while t < count { sum += E.widen(a[t &* x.1]) * E.widen(b[t &* y.1]); t += 1 }
        return sum
    }
}

extension ActivationPrecision {
    /// Element `index` of a row of this precision at `row`, as `Float`.
    @inline(__always)
    func widen(_ row: UnsafeRawPointer, at index: Int) -> Float {
        switch self {
        case .float32: row.assumingMemoryBound(to: Float.self)[index]
        case .float16: HalfElement.widen(row.assumingMemoryBound(to: HalfElement.self)[index])
        case .bfloat16: BFloat16Bits.widen(row.assumingMemoryBound(to: BFloat16Bits.self)[index])
        }
    }
}
