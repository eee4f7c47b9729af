import Foundation

/// The contract every attention variant in this library follows.
///
/// Shape letters (as in ../KernelDocs/README.md):
/// `B` batch, `H` query heads, `Hkv` key/value heads (`H % Hkv == 0`), `Nq` query
/// positions, `Nk` key positions, `D` query/key head dimension, `Dv` value head dimension.
///
/// - query `[B, H, Nq, D]`, key `[B, Hkv, Nk, D]`, value `[B, Hkv, Nk, Dv]`
/// - output `[B, H, Nq, Dv]`, log-sum-exp `[B, H, Nq, 1]`
///
/// Query head `h` reads key/value head `h / (H / Hkv)`. A conformer answers three
/// questions: what it computes (`attend`), whether it supports a problem (`validate`,
/// which throws an ``AttentionError`` naming the offending dimension or option), and
/// what the problem costs (`cost`).
public protocol Attention: Sendable {
    /// The registry name used by the benchmark and in messages (`"dense"`, `"vanilla"`, ...).
    var name: String { get }

    /// Throws an ``AttentionError`` if this conformer cannot compute `shape`.
    func validate(_ shape: AttentionShape) throws

    /// FLOPs, workspace and scored pairs for `shape` computed with `threads` workers
    /// (`nil`: every active processor), as ``attend(query:key:value:keyLengths:threads:)``
    /// would allocate them; an upper bound when key padding shortens some batch items.
    /// Throws what ``validate(_:)`` throws.
    func cost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost

    /// Computes attention from borrowed views into caller-owned memory: the one entry
    /// point every conformer implements (the `Tensor` methods forward to it).
    ///
    /// - Parameters:
    ///   - query: `[B, H, Nq, D]`; key `[B, Hkv, Nk, D]`; value `[B, Hkv, Nk, Dv]`.
    ///   - output: `[B, H, Nq, Dv]`, written completely; it must not overlap an input.
    ///   - logSumExp: `[B, H, Nq, 1]`, written when given; `nil` skips it (the call then
    ///     takes `B·H·Nq` floats of scratch from `workspace`, or allocates them).
    ///   - keyLengths: optional valid key length per batch item (key padding): keys at
    ///     positions `>= keyLengths[b]` are invisible. Each value in `0...Nk`.
    ///   - workspace: scratch memory reused across calls (``AttentionWorkspace``); with a
    ///     workspace sized for the problem a call makes no heap allocation. `nil`: the call
    ///     allocates its scratch.
    ///   - threads: worker threads; `nil` uses every active processor. Results are
    ///     bitwise identical for every thread count.
    ///
    /// Rows with no visible key are 0 with log-sum-exp `-infinity`. Throws before writing
    /// anything if a view's shape disagrees with the others, an output overlaps an input,
    /// the workspace is too small, or the problem is invalid for this conformer.
    func attend(query: StridedView, key: StridedView, value: StridedView,
                output: MutableStridedView, logSumExp: MutableStridedView?,
                keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws

    /// The same computation with query, key, value and output each in `Float`, binary16 or
    /// bfloat16 (``ActivationPrecision``): inputs are widened to `Float` as the kernels read
    /// them, arithmetic is in `Float`, and each output element is rounded to the output's
    /// precision once. The result is bitwise the `Float` call on the widened inputs, rounded.
    ///
    /// Conformers on the tiled softmax kernel (dense, multi-query, local, strided, Longformer,
    /// BigBird, axial, ETC, Transformer-XL, the Compressive Transformer, adaptive span, custom
    /// masks) widen 16-bit operands tile by tile inside the kernel; Linformer, memory-compressed,
    /// Sinkhorn, ISAB, PMA, linear attention, LSH and routing widen them as their GEMMs, scans,
    /// hashing, routers and gathers read them; vanilla widens them into `Float` scratch first
    /// (``conversionScratchBytes(_:precisions:)``).
    /// All-`float32` views run the `StridedView` entry point.
    func attend(query: ActivationView, key: ActivationView, value: ActivationView,
                output: MutableActivationView, logSumExp: MutableStridedView?,
                keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws

    /// Bytes of `Float` scratch a call with operands of `precisions` takes from its workspace
    /// besides ``cost(_:threads:)``'s `workspaceBytes` (0 when every operand is `float32`):
    /// the widened copies of the operands this conformer's kernels cannot read in place.
    /// ``AttentionWorkspace/init(for:shape:threads:precisions:)`` includes it.
    func conversionScratchBytes(_ shape: AttentionShape, precisions: OperandPrecisions) -> Int
}

/// The element types of a call's query, key, value and output.
public struct OperandPrecisions: Hashable, Sendable {
    public var query, key, value, output: ActivationPrecision

    public init(query: ActivationPrecision, key: ActivationPrecision, value: ActivationPrecision,
                output: ActivationPrecision) {
        self.query = query
        self.key = key
        self.value = value
        self.output = output
    }

    /// Every operand in `precision`.
    public init(_ precision: ActivationPrecision) {
        self.init(query: precision, key: precision, value: precision, output: precision)
    }

    /// Every operand in `Float`.
    public static let float32 = OperandPrecisions(.float32)

    /// The precisions of four views.
    init(_ q: ActivationView, _ k: ActivationView, _ v: ActivationView, _ o: MutableActivationView) {
        self.init(query: q.precision, key: k.precision, value: v.precision, output: o.precision)
    }
}

/// Bytes of a `Float` copy of an operand of `shape`'s `[B, H or Hkv, N, width]` when its
/// precision is not `float32`, rounded up to the workspace's alignment.
func widenedCopyBytes(_ precision: ActivationPrecision, _ count: Int) -> Int {
    precision == .float32 ? 0 : roundUp(count * MemoryLayout<Float>.stride, WorkspaceCarver.alignment)
}

extension AttentionShape {
    var queryElements: Int { batch * heads * queryLength * headDim }
    var keyElements: Int { batch * kvHeads * keyLength * headDim }
    var valueElements: Int { batch * kvHeads * keyLength * valueDim }
    var outputElements: Int { batch * heads * queryLength * valueDim }

    /// Bytes of `Float` copies of the operands whose precision is not `float32`, for the
    /// operands `copied` selects.
    func widenedCopyBytes(_ p: OperandPrecisions, query: Bool = true, key: Bool = true, value: Bool = true,
                          output: Bool = true) -> Int {
        (query ? EfficientAttention.widenedCopyBytes(p.query, queryElements) : 0)
            + (key ? EfficientAttention.widenedCopyBytes(p.key, keyElements) : 0)
            + (value ? EfficientAttention.widenedCopyBytes(p.value, valueElements) : 0)
            + (output ? EfficientAttention.widenedCopyBytes(p.output, outputElements) : 0)
    }
}

extension Attention {
    /// Conformers that read 16-bit operands only through `Float` copies: one per operand
    /// that is not `float32`.
    public func conversionScratchBytes(_ shape: AttentionShape, precisions: OperandPrecisions) -> Int {
        shape.widenedCopyBytes(precisions)
    }

    /// The mixed-precision entry point of conformers whose kernels read `Float` only: the
    /// 16-bit operands are widened into `Float` scratch (from the workspace when it has
    /// room), the `Float` entry point runs, and a 16-bit output is rounded from its scratch.
    public func attend(query: ActivationView, key: ActivationView, value: ActivationView,
                       output: MutableActivationView, logSumExp: MutableStridedView?,
                       keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws {
        if let q = query.float32, let k = key.float32, let v = value.float32, let o = output.float32 {
            return try attend(query: q, key: k, value: v, output: o, logSumExp: logSumExp,
                              keyLengths: keyLengths, workspace: workspace, threads: threads)
        }
        _ = try checkMixedCall(query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                               keyLengths: keyLengths, workspace: workspace, threads: threads)
        func run() throws {
            try withWidened(query) { q in try withWidened(key) { k in try withWidened(value) { v in
                try withFloatOutput(output, shape: output.shape, threads: threads) { o in
                    try attend(query: q, key: k, value: v, output: o, logSumExp: logSumExp,
                               keyLengths: keyLengths, workspace: workspace, threads: threads)
                }
            } } }
        }
        if let workspace { try workspace.use(run) } else { try run() }
    }

    /// The checks of a mixed-precision call (those of ``withCheckedCall(query:key:value:output:logSumExp:keyLengths:workspace:threads:scale:_:)``,
    /// with the workspace sized for ``conversionScratchBytes(_:precisions:)`` too); returns the shape.
    func checkMixedCall(query: ActivationView, key: ActivationView, value: ActivationView,
                        output: MutableActivationView, logSumExp: MutableStridedView?,
                        keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws -> AttentionShape {
        let shape = try AttentionShape(query: query.shape, key: key.shape, value: value.shape)
        try validate(shape)
        try checkCallArguments(shape, keyLengths: keyLengths, threads: threads)
        try checkOutputViews(shape, query: query, key: key, value: value, output: output, logSumExp: logSumExp)
        if let workspace {
            let needed = try cost(shape, threads: threads).workspaceBytes
                + (logSumExp == nil ? logSumExpScratchBytes(shape) : 0)
                + conversionScratchBytes(shape, precisions: OperandPrecisions(query, key, value, output))
            guard workspace.byteCount >= needed else {
                throw AttentionError.invalidParameter(
                    "workspace has \(workspace.byteCount) bytes; \(name) needs \(needed) for \(shape) with \(threads.map(String.init) ?? "all") threads and precisions \(query.precision)/\(key.precision)/\(value.precision)/\(output.precision) (AttentionWorkspace(for:shape:threads:precisions:) sizes it)")
            }
        }
        return shape
    }
}

/// Runs `body` with the `float32` view of `view`: itself, or a `Float` copy in scratch.
func withWidened<R>(_ view: ActivationView, _ body: (StridedView) throws -> R) rethrows -> R {
    if let float = view.float32 { return try body(float) }
    let shape = view.shape
    return try withScratchTensor(shape) { copy in
        let source = view.kernel
        for b in 0..<shape[0] {
            for h in 0..<shape[1] {
                source.widenRows(b, h, rows: PositionRun(start: 0, count: shape[2]), width: shape[3],
                                 into: copy.row(b, h, 0), ld: copy.strides[2])
            }
        }
        return try body(StridedView(unchecked: UnsafePointer(copy.base), shape: shape, strides: copy.strides))
    }
}

/// Runs `body` with a `float32` view to write `output` through: itself, or `Float` scratch
/// whose rows are then rounded into `output` (by up to `threads` workers).
func withFloatOutput<R>(_ output: MutableActivationView, shape: SIMD4<Int>, threads: Int?,
                        _ body: (MutableStridedView) throws -> R) rethrows -> R {
    if let float = output.float32 { return try body(float) }
    return try withStaged(output.kernel, shape: shape, threads: threads) { scratch in
        try body(MutableStridedView(unchecked: scratch.base, shape: shape, strides: scratch.strides))
    }
}

/// Runs `body` with contiguous `Float` scratch of `shape`, then rounds its rows into `target`
/// (an output written through `Float`), ``stagedRowsPerItem`` rows per work item over up to
/// `threads` workers (`nil`: every active processor).
func withStaged<R>(_ target: MutableTensorView, shape: SIMD4<Int>, threads: Int?,
                   _ body: (MutableTensorView) throws -> R) rethrows -> R {
    try withScratchTensor(shape) { scratch in
        let result = try body(scratch)
        let (heads, length) = (shape[1], shape[2]), rows = shape[0] * heads * length
        let items = ceilDiv(rows, stagedRowsPerItem)
        parallelForEach(items: items, threads: workerCount(threads: threads, items: items)) { item, _ in
            for r in (item * stagedRowsPerItem)..<min(rows, (item + 1) * stagedRowsPerItem) {
                let (bh, i) = r.quotientAndRemainder(dividingBy: length)
                let (b, h) = bh.quotientAndRemainder(dividingBy: heads)
                target.storeRow(b, h, i, from: scratch.row(b, h, i), count: shape[3])
            }
        }
        return result
    }
}

/// Rows a worker rounds per item when a staged result is copied out (``withStaged(_:shape:threads:_:)``).
let stagedRowsPerItem = 256

extension Attention {
    /// The cost of `shape` with every active processor.
    public func cost(_ shape: AttentionShape) throws -> AttentionCost {
        try cost(shape, threads: nil)
    }

    /// Attention over all keys with every active processor.
    public func attend(query: Tensor, key: Tensor, value: Tensor) throws -> AttentionResult {
        try attend(query: query, key: key, value: value, keyLengths: nil, threads: nil)
    }

    /// Attention with optional key padding and an explicit thread count, into a newly
    /// allocated output and log-sum-exp (the owning convenience over
    /// ``attend(query:key:value:output:logSumExp:keyLengths:workspace:threads:)``).
    public func attend(query: Tensor, key: Tensor, value: Tensor,
                       keyLengths: [Int]? = nil, threads: Int? = nil) throws -> AttentionResult {
        try allocatingCall(query: query, key: key, value: value) { q, k, v, o, l in
            try attend(query: q, key: k, value: v, output: o, logSumExp: l,
                       keyLengths: keyLengths, workspace: nil, threads: threads)
        }
    }

    /// The owning form of a call: checks the tensors' shape against ``validate(_:)``,
    /// allocates the output and log-sum-exp, and runs `body` with views of the inputs and
    /// of both results.
    func allocatingCall(query: Tensor, key: Tensor, value: Tensor,
                        _ body: (StridedView, StridedView, StridedView, MutableStridedView, MutableStridedView) throws -> Void)
        throws -> AttentionResult {
        let shape = try AttentionShape(query: query, key: key, value: value)
        try validate(shape)
        var output = try Tensor.uninitializedOutput(
            shape: [shape.batch, shape.heads, shape.queryLength, shape.valueDim])
        var lse = try Tensor.uninitializedOutput(shape: [shape.batch, shape.heads, shape.queryLength, 1])
        try query.withStridedView { q in try key.withStridedView { k in try value.withStridedView { v in
        try output.withMutableStridedView { o in try lse.withMutableStridedView { l in
            try body(q, k, v, o, l)
        } } } } }
        return try AttentionResult(output: output, logSumExp: lse)
    }

    /// Attention from views into a caller-owned output, without the log-sum-exp.
    public func attend(query: StridedView, key: StridedView, value: StridedView,
                       output: MutableStridedView, keyLengths: [Int]? = nil,
                       workspace: AttentionWorkspace? = nil, threads: Int? = nil) throws {
        try attend(query: query, key: key, value: value, output: output, logSumExp: nil,
                   keyLengths: keyLengths, workspace: workspace, threads: threads)
    }
}

/// The dimensions of one attention problem.
public struct AttentionShape: Hashable, Sendable, CustomStringConvertible {
    public var batch: Int
    public var heads: Int
    public var kvHeads: Int
    public var queryLength: Int
    public var keyLength: Int
    public var headDim: Int
    public var valueDim: Int

    /// A shape; checked by ``check()`` (every conformer's `validate` calls it).
    public init(batch: Int = 1, heads: Int, kvHeads: Int? = nil, queryLength: Int,
                keyLength: Int? = nil, headDim: Int, valueDim: Int? = nil) {
        self.batch = batch
        self.heads = heads
        self.kvHeads = kvHeads ?? heads
        self.queryLength = queryLength
        self.keyLength = keyLength ?? queryLength
        self.headDim = headDim
        self.valueDim = valueDim ?? headDim
    }

    /// The shape of `query`, `key`, `value`, or a thrown ``AttentionError/shapeMismatch(_:)``
    /// naming the tensors and dimensions that disagree.
    public init(query: Tensor, key: Tensor, value: Tensor) throws {
        try self.init(query: SIMD4(query.shape), key: SIMD4(key.shape), value: SIMD4(value.shape))
    }

    /// The shape of the views `query`, `key`, `value` (see ``init(query:key:value:)-(Tensor,_,_)``).
    public init(query: StridedView, key: StridedView, value: StridedView) throws {
        try self.init(query: query.shape, key: key.shape, value: value.shape)
    }

    init(query q: SIMD4<Int>, key k: SIMD4<Int>, value v: SIMD4<Int>) throws {
        guard k[0] == q[0], v[0] == q[0] else {
            throw AttentionError.shapeMismatch(
                "batch differs: query \(q[0]), key \(k[0]), value \(v[0]) (dimension 0 of [B, H, N, D])")
        }
        guard v[1] == k[1] else {
            throw AttentionError.shapeMismatch(
                "key/value heads differ: key \(k[1]), value \(v[1]) (dimension 1 of [B, Hkv, Nk, D])")
        }
        guard v[2] == k[2] else {
            throw AttentionError.shapeMismatch(
                "key length differs: key \(k[2]), value \(v[2]) (dimension 2 of [B, Hkv, Nk, D])")
        }
        guard k[3] == q[3] else {
            throw AttentionError.shapeMismatch(
                "head dimension differs: query \(q[3]), key \(k[3]) (dimension 3 of [B, H, N, D])")
        }
        self.init(batch: q[0], heads: q[1], kvHeads: k[1], queryLength: q[2],
                  keyLength: k[2], headDim: q[3], valueDim: v[3])
        try check()
    }

    /// Query heads that share one key/value head (`H / Hkv`).
    public var groupSize: Int { heads / kvHeads }

    /// Throws unless every dimension is at least 1, the lengths are at most ``lengthLimit``,
    /// `heads % kvHeads == 0`, the element counts of query, key, value and output fit in
    /// `Int`, and the output fits one allocation (``maxAllocationBytes``).
    public func check() throws {
        func atLeastOne(_ value: Int, _ name: StaticString) throws {
            guard value >= 1 else { throw AttentionError.invalidShape("\(name) must be at least 1, got \(value)") }
        }
        try atLeastOne(batch, "batch")
        try atLeastOne(heads, "heads")
        try atLeastOne(kvHeads, "kvHeads")
        try atLeastOne(queryLength, "queryLength")
        try atLeastOne(keyLength, "keyLength")
        try atLeastOne(headDim, "headDim")
        try atLeastOne(valueDim, "valueDim")
        guard heads % kvHeads == 0 else {
            throw AttentionError.invalidShape(
                "heads (\(heads)) must be a multiple of kvHeads (\(kvHeads))")
        }
        func countable(_ dims: SIMD4<Int>, _ name: StaticString) throws {
            guard checkedProduct([dims[0], dims[1], dims[2], dims[3]]) != nil else {
                throw AttentionError.sizeOverflow("\(name) \(list(dims)) has more elements than Int can count")
            }
        }
        try countable(SIMD4(batch, heads, queryLength, headDim), "query")
        try countable(SIMD4(batch, kvHeads, keyLength, headDim), "key")
        try countable(SIMD4(batch, kvHeads, keyLength, valueDim), "value")
        try countable(SIMD4(batch, heads, queryLength, valueDim), "output")
        try countable(SIMD4(batch, heads, queryLength, keyLength), "score matrix")
        guard queryLength <= lengthLimit else {
            throw AttentionError.invalidShape("queryLength must be at most \(lengthLimit) (lengthLimit), got \(queryLength)")
        }
        guard keyLength <= lengthLimit else {
            throw AttentionError.invalidShape("keyLength must be at most \(lengthLimit) (lengthLimit), got \(keyLength)")
        }
        // The output every conformer allocates must fit one allocation.
        try checkFloatAllocation(batch, heads, queryLength, valueDim, option: "output [B, H, Nq, Dv] of \(self)")
    }

    /// Throws unless `headDim` and `valueDim` are at most `limit`.
    func checkHeadDims(limit: Int, variant: String) throws {
        guard headDim <= limit else {
            throw AttentionError.unsupported("\(variant) supports headDim up to \(limit), got \(headDim)")
        }
        guard valueDim <= limit else {
            throw AttentionError.unsupported("\(variant) supports valueDim up to \(limit), got \(valueDim)")
        }
    }

    public var description: String {
        "B=\(batch) H=\(heads) Hkv=\(kvHeads) Nq=\(queryLength) Nk=\(keyLength) D=\(headDim) Dv=\(valueDim)"
    }
}

/// What a problem costs, from a conformer's cost model.
public struct AttentionCost: Hashable, Sendable {
    /// Floating-point operations, counted as each KernelDocs page states
    /// (dense: `2 · pairs · (D + Dv)`, i.e. `4 · Nq · Nk · D` when `Dv == D`).
    public var flops: Double
    /// Scratch memory the kernels allocate for the call, over all threads, not counting
    /// inputs and outputs.
    public var workspaceBytes: Int
    /// Query/key pairs whose score is computed and used (visible pairs).
    public var scoredPairs: Int

    public init(flops: Double, workspaceBytes: Int, scoredPairs: Int) {
        self.flops = flops
        self.workspaceBytes = workspaceBytes
        self.scoredPairs = scoredPairs
    }
}

/// Why a problem or configuration was refused.
public enum AttentionError: Error, Equatable, Sendable, CustomStringConvertible {
    /// Tensors whose shapes do not fit together.
    case shapeMismatch(String)
    /// A shape that is not meaningful (zero sizes, heads not divisible by kvHeads).
    case invalidShape(String)
    /// A configuration value or argument out of range (scale, key lengths, threads...).
    case invalidParameter(String)
    /// A valid problem this conformer does not compute (for example causal Linformer).
    case unsupported(String)
    /// Sizes whose element or byte counts overflow.
    case sizeOverflow(String)

    public var message: String {
        switch self {
        case .shapeMismatch(let m), .invalidShape(let m), .invalidParameter(let m),
             .unsupported(let m), .sizeOverflow(let m):
            return m
        }
    }

    public var description: String {
        switch self {
        case .shapeMismatch(let m): return "shape mismatch: \(m)"
        case .invalidShape(let m): return "invalid shape: \(m)"
        case .invalidParameter(let m): return "invalid parameter: \(m)"
        case .unsupported(let m): return "unsupported: \(m)"
        case .sizeOverflow(let m): return "size overflow: \(m)"
        }
    }
}

extension Attention {
    /// The checks every `attend` starts with: the tensors' shape, ``validate(_:)``, the key
    /// lengths and thread count. Returns the shape and the scale (`nil`: `1/√D`).
    func checkedCall(query: Tensor, key: Tensor, value: Tensor, keyLengths: [Int]?, threads: Int?,
                     scale: Float?) throws -> (shape: AttentionShape, scale: Float) {
        let shape = try AttentionShape(query: query, key: key, value: value)
        try validate(shape)
        try checkCallArguments(shape, keyLengths: keyLengths, threads: threads)
        return (shape, scale ?? 1 / Float(shape.headDim).squareRoot())
    }
}

/// A checked call through views: the problem, its scale, the kernels' views of the inputs
/// and the output, and the log-sum-exp the kernels write (the caller's, or scratch when the
/// caller did not ask for it).
struct ViewCall {
    let shape: AttentionShape
    let scale: Float
    let keyLengths: [Int]?
    /// The caller's thread request (`nil`: every active processor), already checked.
    let threads: Int?
    /// The workers to run with: the request, or every active processor, capped at ``maxThreadCount``.
    let threadCount: Int
    let q: TensorView, k: TensorView, v: TensorView
    let o: MutableTensorView, lse: MutableTensorView
    /// The score modifiers the kernels apply to each tile (nil: none; sinks are applied by
    /// ``Attention/withCheckedCall(query:key:value:output:logSumExp:keyLengths:workspace:threads:scale:modifiers:_:)``).
    var modifiers: ScoreModifierKernel? = nil

    /// Valid keys of batch item `b`.
    func keyEnd(_ b: Int) -> Int { keyLengths?[b] ?? shape.keyLength }

    /// Runs `body` with a call whose output is `Float`: this call when it is, else one
    /// writing into contiguous `Float` scratch that is then rounded into the caller's output.
    func withFloatOutput(_ body: (ViewCall) throws -> Void) rethrows {
        guard o.precision != .float32 else { return try body(self) }
        try withStaged(o, shape: SIMD4(shape.batch, shape.heads, shape.queryLength, shape.valueDim),
                       threads: threadCount) { scratch in
            try body(with(o: scratch))
        }
    }

    /// Runs `body(items, heads, output)` over this call's batch items and query heads a part
    /// at a time, for conformers whose heads are independent problems that merge several
    /// results into an output row (LSH's hash rounds, routing's clusters): head `(b, h)`
    /// (whole-call indices) writes its output rows through `output(b, h)`. A `Float` output
    /// is written in place, every head in one part; a 16-bit one is formed in `Float` scratch
    /// a part of ``MergedOutputStaging`` at a time (whole batch items while one fits, else any
    /// number of one item's heads, at least one), each part's rows rounded into the caller's
    /// output before the next part runs. A row's arithmetic does not depend on its part.
    func forEachOutputPart(_ body: (_ items: Range<Int>, _ heads: Range<Int>,
                                    _ output: (_ b: Int, _ h: Int) -> MutableTensorView) -> Void) {
        guard o.precision != .float32 else { return body(0..<shape.batch, 0..<shape.heads) { _, _ in o } }
        MergedOutputStaging.forEachPart(shape, groups: false, output: o, threads: threadCount) { items, heads, scratch in
            // A head's rows through a view whose batch and head strides are 0.
            body(items, heads) { b, h in
                MutableTensorView(base: scratch.row(b - items.lowerBound, h - heads.lowerBound, 0),
                                  strides: SIMD4(0, 0, scratch.strides[2], scratch.strides[3]))
            }
        }
    }

    /// This call with other query or output views (staged copies).
    func with(q: TensorView? = nil, o: MutableTensorView? = nil) -> ViewCall {
        ViewCall(shape: shape, scale: scale, keyLengths: keyLengths, threads: threads, threadCount: threadCount,
                 q: q ?? self.q, k: k, v: v, o: o ?? self.o, lse: lse, modifiers: modifiers)
    }
}

extension Attention {
    /// The checks every view entry point starts with, then `body` with the checked call
    /// (in the scope of `workspace`, with scratch for the log-sum-exp if `logSumExp` is nil):
    /// the views' shapes agree with each other and with ``validate(_:)``, key lengths and
    /// threads are valid, the output and log-sum-exp have the problem's shape and overlap
    /// no input (nor each other), and the workspace holds what ``cost(_:threads:)`` says
    /// the call needs. `scale` nil is `1/√D`.
    func withCheckedCall(query: StridedView, key: StridedView, value: StridedView,
                         output: MutableStridedView, logSumExp: MutableStridedView?,
                         keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?,
                         scale: Float?, _ body: (ViewCall) throws -> Void) throws {
        try withCheckedCall(query: ActivationView(query), key: ActivationView(key), value: ActivationView(value),
                            output: MutableActivationView(output), logSumExp: logSumExp, keyLengths: keyLengths,
                            workspace: workspace, threads: threads, scale: scale, body)
    }

    /// ``withCheckedCall(query:key:value:output:logSumExp:keyLengths:workspace:threads:scale:_:)``
    /// for operands of any precision, for conformers whose kernels read 16-bit operands
    /// (the call's views carry their precision); the workspace must also hold
    /// ``conversionScratchBytes(_:precisions:)``.
    func withCheckedCall(query: ActivationView, key: ActivationView, value: ActivationView,
                         output: MutableActivationView, logSumExp: MutableStridedView?,
                         keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?,
                         scale: Float?, modifiers: ScoreModifiers = ScoreModifiers(),
                         _ body: (ViewCall) throws -> Void) throws {
        let shape = try checkMixedCall(query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                                       keyLengths: keyLengths, workspace: workspace, threads: threads)
        try modifiers.validate(shape)
        let scale = scale ?? 1 / Float(shape.headDim).squareRoot()
        func run() throws {
            func call(_ lse: MutableTensorView) throws {
                try modifiers.withKernel(shape) { kernel in
                    let call = ViewCall(shape: shape, scale: scale, keyLengths: keyLengths, threads: threads,
                                        threadCount: try threadCount(threads),
                                        q: query.kernel, k: key.kernel, v: value.kernel, o: output.kernel, lse: lse,
                                        modifiers: kernel)
                    guard modifiers.sinks != nil else { return try body(call) }
                    // Sinks rescale the finished rows: a 16-bit output is formed in Float first.
                    try call.withFloatOutput { call in
                        try body(call)
                        modifiers.applySinks(o: call.o, lse: call.lse, shape: shape, threads: call.threadCount)
                    }
                }
            }
            if let logSumExp { return try call(logSumExp.kernel) }
            return try withScratch(byteCount: logSumExpScratchBytes(shape)) { scratch in
                try call(MutableTensorView(base: scratch.assumingMemoryBound(to: Float.self),
                                           strides: SIMD4(shape.heads * shape.queryLength, shape.queryLength, 1, 1)))
            }
        }
        if let workspace { return try workspace.use(run) }
        return try run()
    }
}

/// Throws unless `output` is `[B, H, Nq, Dv]` and `logSumExp` `[B, H, Nq, 1]` of `shape`, and
/// neither overlaps an input or the other, naming the view and dimension.
func checkOutputViews(_ shape: AttentionShape, query: StridedView, key: StridedView, value: StridedView,
                      output: MutableStridedView, logSumExp: MutableStridedView?) throws {
    try checkOutputViews(shape, query: ActivationView(query), key: ActivationView(key), value: ActivationView(value),
                         output: MutableActivationView(output), logSumExp: logSumExp)
}

/// ``checkOutputViews(_:query:key:value:output:logSumExp:)`` for views of any precision.
func checkOutputViews(_ shape: AttentionShape, query: ActivationView, key: ActivationView, value: ActivationView,
                      output: MutableActivationView, logSumExp: MutableStridedView?) throws {
    let expected = SIMD4(shape.batch, shape.heads, shape.queryLength, shape.valueDim)
    if let axis = (0..<4).first(where: { output.shape[$0] != expected[$0] }) {
        throw AttentionError.shapeMismatch(
            "output \(list(output.shape)) must be [B, H, Nq, Dv] = \(list(expected)): dimension \(axis) (\(["B", "H", "Nq", "Dv"][axis])) is \(output.shape[axis]), expected \(expected[axis])")
    }
    func checkInputs(_ written: Range<UInt>, _ name: StaticString) throws {
        func check(_ range: Range<UInt>, _ input: StaticString) throws {
            guard !written.overlaps(range) else {
                throw AttentionError.invalidParameter("\(name) overlaps \(input): an output must not alias an input")
            }
        }
        try check(query.addressRange, "query")
        try check(key.addressRange, "key")
        try check(value.addressRange, "value")
    }
    try checkInputs(output.addressRange, "output")
    guard let logSumExp else { return }
    let lseShape = SIMD4(shape.batch, shape.heads, shape.queryLength, 1)
    if let axis = (0..<4).first(where: { logSumExp.shape[$0] != lseShape[$0] }) {
        throw AttentionError.shapeMismatch(
            "logSumExp \(list(logSumExp.shape)) must be [B, H, Nq, 1] = \(list(lseShape)): dimension \(axis) is \(logSumExp.shape[axis]), expected \(lseShape[axis])")
    }
    try checkInputs(logSumExp.addressRange, "logSumExp")
    guard !logSumExp.addressRange.overlaps(output.addressRange) else {
        throw AttentionError.invalidParameter("logSumExp overlaps output: they must be separate memory")
    }
}

/// `a · b · c · d`, or nil if it overflows `Int`: the array-free form for checks that run
/// on every call (an array literal is not always kept on the stack).
@inline(__always)
func checkedProduct(_ a: Int, _ b: Int, _ c: Int = 1, _ d: Int = 1) -> Int? {
    let (ab, o1) = a.multipliedReportingOverflow(by: b)
    let (abc, o2) = ab.multipliedReportingOverflow(by: c)
    let (abcd, o3) = abc.multipliedReportingOverflow(by: d)
    return o1 || o2 || o3 ? nil : abcd
}

/// The product of `values`, or nil if it overflows `Int`. Inlined, so that the array
/// literals of call sites stay on the stack (a checked call allocates nothing).
@inline(__always)
func checkedProduct(_ values: [Int]) -> Int? {
    var product = 1
    for value in values {
        let (p, overflow) = product.multipliedReportingOverflow(by: value)
        if overflow { return nil }
        product = p
    }
    return product
}

/// Checks the per-call arguments shared by every conformer: key lengths and threads.
func checkCallArguments(_ shape: AttentionShape, keyLengths: [Int]?, threads: Int?) throws {
    if let keyLengths {
        guard keyLengths.count == shape.batch else {
            throw AttentionError.invalidParameter(
                "keyLengths has \(keyLengths.count) entries, expected one per batch item (\(shape.batch))")
        }
        for (b, length) in keyLengths.enumerated() where length < 0 || length > shape.keyLength {
            throw AttentionError.invalidParameter(
                "keyLengths[\(b)] = \(length) is outside 0...\(shape.keyLength) (the key length)")
        }
    }
    _ = try threadCount(threads)
}

/// The number of workers a call with `threads` uses for `items` independent work items:
/// at most the items and ``maxThreadCount``.
func workerCount(threads: Int?, items: Int) -> Int {
    max(1, min(threads ?? defaultThreadCount, maxThreadCount, items))
}

/// Checks an attention scale: finite and of magnitude at most ``maxScale``.
func checkScale(_ scale: Float?) throws {
    if let scale, !scale.isFinite {
        throw AttentionError.invalidParameter("scale must be finite, got \(scale)")
    }
    if let scale, abs(scale) > maxScale {
        throw AttentionError.invalidParameter("scale must be at most \(maxScale) in magnitude, got \(scale)")
    }
}

// MARK: Limits

/// The largest single allocation the library makes, in bytes: the machine's physical
/// memory (`ProcessInfo.physicalMemory`, at least 1 GiB). A buffer larger than that cannot
/// be backed, and asking for it would end the process in the allocator (or, with
/// overcommit, later on first touch) instead of throwing. Every output, workspace, cache,
/// table and tensor the library allocates is checked against it first
/// (``AttentionError/sizeOverflow(_:)``, naming the option or tensor).
public let maxAllocationBytes: Int = {
    let physical = ProcessInfo.processInfo.physicalMemory
    return max(1 << 30, physical > UInt64(Int.max) ? Int.max : Int(physical))
}()

/// The most worker threads a call uses: `max(16, 4 · active processors)`. A larger
/// `threads` is accepted and capped (results are bitwise identical for every thread
/// count), so that per-worker memory never follows an absurd request.
public let maxThreadCount: Int = max(16, 4 * ProcessInfo.processInfo.activeProcessorCount)

/// The largest `scale` a conformer accepts (`2^32`).
///
/// Scores are `scale · q·k` and the kernels exponentiate `scale · q·k − max`. With
/// `|scale| ≤ 2^32` a score overflows Float only when `|q·k| > 2^96`, and the row maximum
/// of such rows is infinite, which the kernels already treat as any other non-finite
/// input; a larger finite scale (1e30, `Float.greatestFiniteMagnitude`) turns ordinary,
/// finite dot products into infinite scores and the log-sum-exp or the output into NaN or
/// infinity. The bound is far beyond any meaningful scale (`1/√D ≤ 1`, learned
/// temperatures stay within a few hundred).
public let maxScale: Float = 0x1p32

/// The largest sequence length, window, span, block, stride, memory length, cluster or
/// feature count an option may take (`2^30`): positions then fit the kernels' 32-bit
/// lane arithmetic and every sum or product of two of them stays far from `Int.max`.
public let lengthLimit = 1 << 30

/// Throws ``AttentionError/sizeOverflow(_:)`` naming `option` unless `bytes` (nil: the
/// count overflowed `Int`) is at most ``maxAllocationBytes``.
@inline(__always)
func checkAllocation(bytes: Int?, option: @autoclosure () -> String) throws {
    guard let bytes else {
        throw AttentionError.sizeOverflow("\(option()) has more bytes than Int can count")
    }
    guard bytes <= maxAllocationBytes else {
        throw AttentionError.sizeOverflow(
            "\(option()) needs \(bytes) bytes, more than the \(maxAllocationBytes) bytes one allocation may take (maxAllocationBytes)")
    }
}

/// Throws unless an allocation of `a · b · c · d · e` Floats fits ``maxAllocationBytes``,
/// naming `option`. Counts as arguments, not an array: a checked call then allocates
/// nothing (an array literal at a call site was not reliably kept on the stack).
func checkFloatAllocation(_ a: Int, _ b: Int = 1, _ c: Int = 1, _ d: Int = 1, _ e: Int = 1,
                          option: @autoclosure () -> String) throws {
    try checkAllocation(bytes: checkedProduct(a, b, c, d).flatMap { checkedProduct($0, e, MemoryLayout<Float>.stride) },
                        option: option())
}

/// The worker threads a call with `threads` uses: `nil` is every active processor; values
/// below 1 throw; values above ``maxThreadCount`` are capped.
func threadCount(_ threads: Int?) throws -> Int {
    if let threads, threads < 1 {
        throw AttentionError.invalidParameter("threads must be at least 1, got \(threads)")
    }
    return min(threads ?? defaultThreadCount, maxThreadCount)
}

/// Throws unless `value` is at most ``lengthLimit``, naming `option` ("must be at most").
func checkLimit(_ value: Int, _ option: String, variant: String) throws {
    guard value <= lengthLimit else {
        throw AttentionError.invalidParameter("\(variant): \(option) must be at most \(lengthLimit), got \(value)")
    }
}
