import CEfficientAttention
import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Scratch memory a caller creates once and passes to every call, so that a call in
/// steady state allocates nothing.
///
/// Size it for the largest problem it will serve with ``init(for:shape:threads:)`` (the
/// conformer's `cost(shape, threads:).workspaceBytes`, plus room for the log-sum-exp when a
/// call does not ask for it), or give a byte count. A call whose needs exceed the
/// workspace throws ``AttentionError/invalidParameter(_:)`` naming `workspace` before any
/// arithmetic. A workspace serves one call at a time: a call that finds it in use by
/// another thread throws instead of sharing it (give each concurrent caller its own).
///
/// ```swift
/// let attention = DenseAttention(causal: true)
/// let workspace = try AttentionWorkspace(for: attention, shape: shape, threads: 2)
/// for layer in layers {   // no allocation per call
///     try attention.attend(query: q, key: k, value: v, output: out, logSumExp: nil,
///                          keyLengths: nil, workspace: workspace, threads: 2)
/// }
/// ```
///
/// - Complexity: one allocation of ``byteCount`` bytes, at creation.
public final class AttentionWorkspace: @unchecked Sendable {
    /// Bytes of scratch memory.
    public let byteCount: Int
    private let block: UnsafeMutableRawPointer
    /// Bytes in use by the scopes of the current call (a stack).
    fileprivate private(set) var top = 0
    private let lock = NSLock()

    /// A workspace of `byteCount` bytes (at least 0, at most ``maxAllocationBytes``).
    public init(byteCount: Int) throws {
        guard byteCount >= 0 else {
            throw AttentionError.invalidParameter("workspace byteCount must be at least 0, got \(byteCount)")
        }
        try checkAllocation(bytes: byteCount, option: "workspace")
        self.byteCount = byteCount
        block = .allocate(byteCount: max(byteCount, WorkspaceCarver.alignment), alignment: WorkspaceCarver.alignment)
    }

    /// A workspace for calls of `attention` on problems up to `shape` with `threads`
    /// workers: its cost model's `workspaceBytes` plus the log-sum-exp scratch of a call
    /// that passes `logSumExp: nil`.
    public convenience init(for attention: some Attention, shape: AttentionShape, threads: Int? = nil) throws {
        let cost = try attention.cost(shape, threads: threads)
        try self.init(byteCount: cost.workspaceBytes + logSumExpScratchBytes(shape))
    }

    /// A workspace for calls of `attention` on problems up to `shape` with `threads`
    /// workers and operands of `precisions`: also the `Float` copies the conformer makes of
    /// 16-bit operands (``Attention/conversionScratchBytes(_:precisions:)``).
    public convenience init(for attention: some Attention, shape: AttentionShape, threads: Int? = nil,
                            precisions: OperandPrecisions) throws {
        let cost = try attention.cost(shape, threads: threads)
        try self.init(byteCount: cost.workspaceBytes + logSumExpScratchBytes(shape)
                      + attention.conversionScratchBytes(shape, precisions: precisions))
    }

    deinit { block.deallocate() }

    /// Runs `body` with this workspace as the calling thread's scratch source (see
    /// ``withScratch(byteCount:_:)``). Throws if another call is using it. A call nested in
    /// one already using it on this thread (a mixed-precision call running the `Float`
    /// entry point on its widened operands) continues its stack.
    func use<R>(_ body: () throws -> R) throws -> R {
        if AttentionWorkspace.current === self { return try body() }
        guard lock.try() else {
            throw AttentionError.invalidParameter(
                "workspace is in use by another call; give each concurrent caller its own AttentionWorkspace")
        }
        defer { lock.unlock() }
        top = 0
        let previous = pthread_getspecific(currentWorkspaceKey)
        pthread_setspecific(currentWorkspaceKey, Unmanaged.passUnretained(self).toOpaque())
        defer { pthread_setspecific(currentWorkspaceKey, previous) }
        return try body()
    }

    /// The workspace of the call running on this thread, if it passed one.
    static var current: AttentionWorkspace? {
        pthread_getspecific(currentWorkspaceKey).map { Unmanaged<AttentionWorkspace>.fromOpaque($0).takeUnretainedValue() }
    }

    /// Takes `bytes` (rounded up to 64) from the top, or nil if they do not fit.
    fileprivate func push(_ bytes: Int) -> UnsafeMutableRawPointer? {
        let size = roundUp(bytes, WorkspaceCarver.alignment)
        guard size <= byteCount - top else { return nil }
        defer { top += size }
        return block + top
    }

    /// Returns the bytes of the last ``push(_:)`` at `pointer`.
    fileprivate func pop(_ pointer: UnsafeMutableRawPointer) {
        top = pointer - block
    }
}

/// The thread-specific slot holding the workspace of the call running on a thread.
private let currentWorkspaceKey: pthread_key_t = {
    var key = pthread_key_t()
    let status = pthread_key_create(&key, nil)
    precondition(status == 0, "pthread_key_create failed (\(status))")
    return key
}()

/// Runs `body` with `byteCount` bytes of 64-byte aligned scratch memory: from the
/// ``AttentionWorkspace`` of the call running on this thread when it has room (on one of
/// the library's worker threads, from that thread's own kept scratch), else allocated for
/// the duration of `body`. Scopes nest (a stack). Uninitialised.
func withScratch<R>(byteCount: Int, _ body: (UnsafeMutableRawPointer) throws -> R) rethrows -> R {
    if let workspace = AttentionWorkspace.current ?? PoolThreadScratch.workspace(forScopeOf: byteCount),
       let pointer = workspace.push(byteCount) {
        defer { workspace.pop(pointer) }
        return try body(pointer)
    }
    PoolThreadScratch.missed(byteCount)
    let pointer = UnsafeMutableRawPointer.allocate(byteCount: max(byteCount, WorkspaceCarver.alignment),
                                                   alignment: WorkspaceCarver.alignment)
    defer { pointer.deallocate() }
    return try body(pointer)
}

/// The scratch of one of the library's kept worker threads (Parallel.swift), for the
/// scopes a parallel loop's body opens there: the caller's workspace belongs to the
/// calling thread, so without this a call with a workspace would allocate on the workers.
/// Grown, when no scope is open, to the most the thread's scopes have needed (at most
/// ``capBytes``; larger scopes allocate), so steady-state calls allocate nothing.
private final class PoolThreadScratch {
    /// The most a worker thread keeps.
    static let capBytes = 64 << 20

    var workspace: AttentionWorkspace?
    /// The most the open scopes have needed at once.
    var wanted = 0

    /// The calling thread's, if it is one of the library's worker threads.
    static var current: PoolThreadScratch? {
        guard ea_on_pool_thread() != 0 else { return nil }
        if let raw = pthread_getspecific(poolScratchKey) {
            return Unmanaged<PoolThreadScratch>.fromOpaque(raw).takeUnretainedValue()
        }
        let scratch = PoolThreadScratch()
        pthread_setspecific(poolScratchKey, Unmanaged.passRetained(scratch).toOpaque())
        return scratch
    }

    /// The worker thread's scratch for a scope of `byteCount` bytes (grown first when no
    /// scope is open); nil off the worker threads.
    static func workspace(forScopeOf byteCount: Int) -> AttentionWorkspace? {
        guard let scratch = current else { return nil }
        let open = scratch.workspace?.top ?? 0
        scratch.wanted = max(scratch.wanted, open + roundUp(byteCount, WorkspaceCarver.alignment))
        if open == 0, scratch.wanted > (scratch.workspace?.byteCount ?? 0), scratch.wanted <= capBytes {
            scratch.workspace = nil
            scratch.workspace = try? AttentionWorkspace(byteCount: scratch.wanted)
        }
        return scratch.workspace
    }

    /// Records a scope that did not fit (nothing off the worker threads).
    static func missed(_ byteCount: Int) {
        guard let scratch = current else { return }
        let open = scratch.workspace?.top ?? 0
        scratch.wanted = max(scratch.wanted, open + roundUp(byteCount, WorkspaceCarver.alignment))
    }
}

/// The thread-specific slot holding a worker thread's ``PoolThreadScratch`` (kept for the
/// thread's life: the library's worker threads never end).
private let poolScratchKey: pthread_key_t = {
    var key = pthread_key_t()
    let status = pthread_key_create(&key, nil)
    precondition(status == 0, "pthread_key_create failed (\(status))")
    return key
}()

/// Bytes of a log-sum-exp buffer for `shape` (`[B, H, Nq]` floats, rounded up to 64): the
/// scratch a call takes when the caller does not ask for the log-sum-exp.
func logSumExpScratchBytes(_ shape: AttentionShape) -> Int {
    roundUp(shape.batch * shape.heads * shape.queryLength * MemoryLayout<Float>.stride, WorkspaceCarver.alignment)
}

/// Runs `body` with a contiguous row-major `[n0, n1, n2, n3]` tensor of scratch
/// (``withScratch(byteCount:_:)``), zero-filled when `zeroed`: intermediate keys and values
/// a conformer computes (their bytes are part of its cost model's workspace).
func withScratchTensor<R>(_ shape: SIMD4<Int>, zeroed: Bool = false,
                          _ body: (MutableTensorView) throws -> R) rethrows -> R {
    let count = shape[0] * shape[1] * shape[2] * shape[3]
    return try withScratch(byteCount: count * MemoryLayout<Float>.stride) { raw in
        let base = raw.bindMemory(to: Float.self, capacity: count)
        if zeroed { base.initialize(repeating: 0, count: count) }
        return try body(MutableTensorView(base: base, strides: rowMajorStrides(shape)))
    }
}
