// How the decode kernel reads cached rows, whatever the cache's layout and precision.
//
// A cache store (the keys or the values of one layer) is a set of rows `(b, h, j)`: batch
// item, key/value head, and the position's index among the positions the item holds (0 is
// the oldest held). The kernel asks a ``KVRows`` value for the address of a row and, for
// Int8 storage, its scale; the three layouts (contiguous, ring, paged) are three small
// structs the compiler specialises the one decode kernel for. No per-element closure:
// `row(b, h, j)` is pointer arithmetic (a compare for the ring, a shift and a table load
// for pages), done once per row of `D` elements.
//
// Row bytes: `width · bytesPerElement` for Float32, Float16 and bfloat16; `4 + width` for
// Int8, the row's Float scale first (``scale(ofRow:)``), then the `width` Int8 elements. The
// row address given to the kernel is the first element's, past the scale.

/// Rows of one cached store as the decode kernel reads them.
protocol KVRows: Sendable {
    associatedtype Element: CacheScalar
    /// The first element of row `(b, h, j)`.
    func row(_ b: Int, _ h: Int, _ j: Int) -> UnsafePointer<Element>
    /// How many rows from `j` on lie at `row(b, h, j) + r · rowStride` (at least 1).
    func run(_ b: Int, _ h: Int, from j: Int) -> Int
    /// Elements from one row of a run to the next.
    var rowStride: Int { get }
}

/// Walks rows `j, j + 1, …` of one batch item and head of a ``KVRows``: inside a run the
/// next row is ``KVRows/rowStride`` elements on, so a paged or ring store computes a row's
/// address (for pages, a table load) once per run rather than once per row.
struct RowCursor<R: KVRows> {
    private let rows: R
    private let b: Int, h: Int
    private var j: Int
    private var pointer: UnsafePointer<R.Element>
    /// Rows left in the current run, `pointer`'s included.
    private var left: Int

    @inline(__always)
    init(_ rows: R, b: Int, h: Int, from j: Int) {
        self.rows = rows
        self.b = b
        self.h = h
        self.j = j
        pointer = rows.row(b, h, j)
        left = rows.run(b, h, from: j)
    }

    /// Row `j`'s first element, then on to row `j + 1`.
    @inline(__always)
    mutating func next() -> UnsafePointer<R.Element> {
        if left == 0 {
            pointer = rows.row(b, h, j)
            left = rows.run(b, h, from: j)
        }
        let row = pointer
        left -= 1
        j += 1
        if left > 0 { pointer += rows.rowStride }
        return row
    }

    /// The current row (the one ``next()`` would return) and how many rows from it on lie
    /// ``KVRows/rowStride`` elements apart: a caller walks them with its own loop, then
    /// moves on with ``skip(_:)``.
    @inline(__always)
    mutating func run() -> (row: UnsafePointer<R.Element>, count: Int) {
        if left == 0 {
            pointer = rows.row(b, h, j)
            left = rows.run(b, h, from: j)
        }
        return (pointer, left)
    }

    /// Moves on by `n` rows of the current run (`n` at most its ``run()`` count).
    @inline(__always)
    mutating func skip(_ n: Int) {
        left -= n
        j += n
        if left > 0 { pointer += n &* rows.rowStride }
    }
}

extension KVRows {
    /// The dequantisation scale of the Int8 row at `row` (stored just before it; `row` from
    /// a ``row(_:_:_:)`` the caller holds: no second address computation, which for paged
    /// rows is a table load).
    @inline(__always)
    static func scale(ofRow row: UnsafePointer<Element>) -> Float {
        UnsafeRawPointer(row).loadUnaligned(fromByteOffset: -4, as: Float.self)
    }

    /// `out[r · ld + c] = value of row(start + r)[c]` as Float for `r < count`, `c < width`
    /// (16-bit elements widened, Int8 elements times their row's scale).
    @inline(__always)
    func pack(b: Int, h: Int, start: Int, count: Int, width: Int,
              into out: UnsafeMutablePointer<Float>, ld: Int) {
        var rows = RowCursor(self, b: b, h: h, from: start)
        for r in 0..<count {
            let source = rows.next(), target = out + r * ld
            var c = 0
            if Element.quantized {
                let s = Self.scale(ofRow: source), factor = Vec16(repeating: s)
                while c + 16 <= width {
                    store16(Element.wide16(source + c) * factor, target + c)
                    c += 16
                }
                while c < width { target[c] = Element.widen(source[c]) * s; c += 1 }
            } else {
                while c + 16 <= width {
                    store16(Element.wide16(source + c), target + c)
                    c += 16
                }
                while c < width { target[c] = Element.widen(source[c]); c += 1 }
            }
        }
    }

    /// Rows `start ..< start + count` as Float rows `base[r · rowStride + c]`: in place for
    /// Float rows that are one run, copied (widened, dequantised) into `scratch`
    /// (`count · width` floats) otherwise. A copy holds the same values, so the kernel's
    /// arithmetic, and its bits, do not depend on the layout.
    @inline(__always)
    func floatRows(b: Int, h: Int, start: Int, count: Int, width: Int,
                   scratch: UnsafeMutablePointer<Float>) -> (base: UnsafePointer<Float>, rowStride: Int) {
        if Element.self == Float.self && run(b, h, from: start) >= count {
            let base = UnsafeRawPointer(row(b, h, start)).assumingMemoryBound(to: Float.self)
            return (base, rowStride)
        }
        pack(b: b, h: h, start: start, count: count, width: width, into: scratch, ld: width)
        return (UnsafePointer(scratch), width)
    }

    /// Whether the kernel's micro-kernel path needs a scratch tile for keys (anything but
    /// contiguous Float rows).
    static var needsKeyScratch: Bool { Element.self != Float.self || !(Self.self == CacheRows<Element>.self) }
}

// MARK: - Layouts

/// Rows of a contiguous store: element `[b, h, j, c]` at
/// `base[b · batchStride + h · headStride + j · rowStride + c]`.
struct CacheRows<Element: CacheScalar>: KVRows, @unchecked Sendable {
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

    @inline(__always) func run(_ b: Int, _ h: Int, from j: Int) -> Int { Int.max }
}

/// Rows of a ring buffer of `window` slots per (b, h): held position `j` (0 = oldest held)
/// of item `b` is in slot `(firstSlot[b] + j) mod window`.
struct RingRows<Element: CacheScalar>: KVRows, @unchecked Sendable {
    let base: UnsafePointer<Element>
    let batchStride: Int
    let headStride: Int
    let rowStride: Int
    let window: Int
    /// Slot of each batch item's oldest held position.
    let firstSlot: UnsafePointer<Int>

    @inline(__always)
    func slot(_ b: Int, _ j: Int) -> Int {
        let t = firstSlot[b] + j
        return t >= window ? t - window : t
    }

    @inline(__always)
    func row(_ b: Int, _ h: Int, _ j: Int) -> UnsafePointer<Element> {
        base + b * batchStride + h * headStride + slot(b, j) * rowStride
    }

    @inline(__always) func run(_ b: Int, _ h: Int, from j: Int) -> Int { window - slot(b, j) }
}

/// Rows of a paged store: pages of `1 << pageShift` positions; held position `j` of item
/// `b` is row `j mod P` of page `tables[tableStart[b] + j / P]`, whose rows of head `h`
/// start at `base + page · pageStride + h · headStride`. Each item's entries are followed
/// by `-1` (no page).
struct PagedRows<Element: CacheScalar>: KVRows, @unchecked Sendable {
    let base: UnsafePointer<Element>
    let pageStride: Int
    let headStride: Int
    let rowStride: Int
    let pageShift: Int
    let tables: UnsafePointer<Int32>
    let tableStart: UnsafePointer<Int>

    @inline(__always)
    func row(_ b: Int, _ h: Int, _ j: Int) -> UnsafePointer<Element> {
        let page = Int(tables[tableStart[b] + j >> pageShift])
        return base + page * pageStride + h * headStride + (j & ((1 << pageShift) - 1)) * rowStride
    }

    /// Rows from `j` on, `rowStride` apart: to the end of `j`'s page, then on through the
    /// pages after it in the table while each is the pool's next page (page `p + 1` after
    /// page `p`: a sequence filled in one go holds consecutive pages), up to
    /// ``maxRunRows``. Each item's table ends with an entry that is no page (`-1`), so the
    /// scan stays in the item's table. (Runs cut at every page cost the Int8 decode a
    /// fifth of its time at pages of 16; KernelDocs/MultiQuery.md.)
    @inline(__always)
    func run(_ b: Int, _ h: Int, from j: Int) -> Int {
        let size = 1 << pageShift
        var entry = tableStart[b] &+ (j >> pageShift)
        var page = tables[entry], n = size &- (j & (size &- 1))
        while n < PagedRows.maxRunRows && tables[entry &+ 1] == page &+ 1 {
            entry &+= 1
            page &+= 1
            n &+= size
        }
        return n
    }

    /// The longest run ``run(_:_:from:)`` reports past the first page (a few key tiles).
    static var maxRunRows: Int { 512 }
}

// MARK: - Int8 elements

extension Int8: CacheScalar {
    @inline(__always) static func wide16(_ p: UnsafePointer<Int8>) -> Vec16 {
        let x = UnsafeRawPointer(p).loadUnaligned(as: SIMD16<Int8>.self)
        // A lane loop, as for Float16: it compiles to a sign extension and a conversion,
        // where the generic SIMD initialisers may be out-of-line calls.
        var r = Vec16()
        for i in 0..<16 { r[i] = Float(x[i]) }
        return r
    }
    @inline(__always) static func widen(_ x: Int8) -> Float { Float(x) }
    static var quantized: Bool { true }
}

// MARK: - Writing and reading rows

/// One store (the keys or the values) of a cache: rows of `width` elements in `precision`,
/// `rowBytes` apart, row `index` at `base + index · rowBytes`.
struct RowStore {
    let base: UnsafeMutableRawPointer
    let width: Int
    let precision: KVCache.Precision

    var rowBytes: Int { precision.rowBytes(width: width) }

    /// Bytes before a row's first element (the Int8 scale).
    var prefixBytes: Int { precision == .int8 ? 4 : 0 }

    /// The address of row `index`'s first element.
    @inline(__always)
    func elements(_ index: Int) -> UnsafeMutableRawPointer { base + index * rowBytes + prefixBytes }

    /// Writes `x[c · stride]`, `c < width`, as row `index`: rounded to nearest even
    /// (Float16, bfloat16) or quantised with the row's scale `max|x| / 127` (Int8).
    func write(_ index: Int, from x: UnsafePointer<Float>, stride: Int) {
        let out = elements(index)
        switch precision {
        case .float32:
            let target = out.assumingMemoryBound(to: Float.self)
            if stride == 1 {
                target.update(from: x, count: width)
            } else {
                for c in 0..<width { target[c] = x[c * stride] }
            }
        case .float16:
            HalfElement.narrow(x, stride: stride, into: out.assumingMemoryBound(to: HalfElement.self), count: width)
        case .bfloat16:
            let target = out.assumingMemoryBound(to: BFloat16Bits.self)
            if stride == 1 {
                BFloat16Bits.narrow(x, into: target, count: width)
            } else {
                for c in 0..<width { target[c] = BFloat16Bits(x[c * stride]) }
            }
        case .int8:
            let q = Int8Quantization(x, stride: stride, count: width)
            (out - 4).storeBytes(of: q.scale, as: Float.self)
            let target = out.assumingMemoryBound(to: Int8.self)
            for c in 0..<width { target[c] = q.quantize(x[c * stride]) }
        }
    }

    /// Row `index` as Float into `out[0..<width]` (as the decode kernel reads it).
    func read(_ index: Int, into out: UnsafeMutablePointer<Float>) {
        let source = elements(index)
        switch precision {
        case .float32: out.update(from: source.assumingMemoryBound(to: Float.self), count: width)
        case .float16:
            let p = source.assumingMemoryBound(to: HalfElement.self)
            for c in 0..<width { out[c] = HalfElement.widen(p[c]) }
        case .bfloat16:
            let p = source.assumingMemoryBound(to: BFloat16Bits.self)
            for c in 0..<width { out[c] = p[c].float }
        case .int8:
            let s = (source - 4).loadUnaligned(as: Float.self), p = source.assumingMemoryBound(to: Int8.self)
            for c in 0..<width { out[c] = Float(p[c]) * s }
        }
    }

    /// Copies row `from` over row `to` (same store).
    func copy(_ from: Int, to: Int) {
        (base + to * rowBytes).copyMemory(from: base + from * rowBytes, byteCount: rowBytes)
    }
}

/// The symmetric Int8 quantisation of one row: `s = max|x| / 127`, `q = round(x / s)`
/// (ties away from zero), clamped to ±127; an all-zero row has `s = 0` and stores 0.
/// The rows must be finite (the caches check before writing).
struct Int8Quantization {
    let scale: Float

    init(_ x: UnsafePointer<Float>, stride: Int, count: Int) {
        var m: Float = 0
        for c in 0..<count { m = max(m, abs(x[c * stride])) }
        // max|x| / 127 of a tiny subnormal maximum can round to 0: keep the smallest
        // scale then (the quotients clamp to ±127).
        scale = m == 0 ? 0 : max(m / 127, .leastNonzeroMagnitude)
    }

    @inline(__always)
    func quantize(_ x: Float) -> Int8 {
        guard scale > 0 else { return 0 }
        return Int8(max(-127, min(127, (x / scale).rounded())))
    }
}

/// The Int8 quantisation of cache rows, for tests: the stored integers and scale of a row,
/// and its dequantised values as the decode kernel computes them.
@_spi(Testing) public enum Int8CacheConversions {
    /// `(round(x / s), s)` with `s = max|x| / 127`, as an `.int8` cache stores a row.
    public static func quantize(_ row: [Float]) -> (values: [Int8], scale: Float) {
        row.withUnsafeBufferPointer { x in
            guard let base = x.baseAddress else { return ([], 0) }
            let q = Int8Quantization(base, stride: 1, count: row.count)
            return (row.map { q.quantize($0) }, q.scale)
        }
    }
}

/// Throws unless every element of `tensor` is finite (Int8 caches cannot store the others).
func checkFiniteForInt8(_ tensor: Tensor, _ name: String) throws {
    guard tensor.count > 0 else { return }
    let bad: [Int]? = tensor.withView { view in
        let s = tensor.shape
        for b in 0..<s[0] { for h in 0..<s[1] { for j in 0..<s[2] {
            let row = view.row(b, h, j), sd = view.strides[3]
            for c in 0..<s[3] where !row[c * sd].isFinite { return [b, h, j, c] }
        } } }
        return nil
    }
    if let bad {
        throw AttentionError.invalidParameter(
            "append: \(name)\(bad) is not finite; an int8 cache (precision .int8) stores finite values only")
    }
}
