/// Scratch memory for one call: a single 64-byte aligned block that the kernels carve into
/// their buffers: an optional shared part (results every worker writes a disjoint piece of),
/// then one equal slice per worker.
///
/// A kernel describes its buffers once, as an initialiser that takes a
/// ``WorkspaceCarver`` (`init(carving:…)`): run on ``WorkspaceCarver/measuring()`` it gives
/// the slice's size, which is also what `cost(_:threads:)` reports; run on a slice of an
/// arena it gives the buffers. Size and layout cannot disagree, since they are the same
/// code.
///
/// The block comes from the call's ``AttentionWorkspace`` when the caller passed one (no
/// allocation), else from the heap for the duration of ``with(sharedBytes:sliceBytes:slices:zeroed:_:)``.
///
/// - Complexity: at most one allocation per arena, `O(bytes)` only when zero-filled.
struct WorkspaceArena {
    /// Bytes of one worker's slice (a multiple of 64).
    let sliceBytes: Int
    /// Bytes of the shared part before the slices (a multiple of 64).
    let sharedBytes: Int
    /// Number of slices.
    let slices: Int
    private let block: UnsafeMutableRawPointer

    /// The arena's total bytes for these parts (what ``with(sharedBytes:sliceBytes:slices:zeroed:_:)`` takes).
    static func byteCount(sharedBytes: Int = 0, sliceBytes: Int, slices: Int) -> Int {
        let shared = roundUp(max(sharedBytes, 0), WorkspaceCarver.alignment)
        let slice = roundUp(max(sliceBytes, 0), WorkspaceCarver.alignment)
        return max(shared + slice * max(slices, 1), WorkspaceCarver.alignment)
    }

    /// Runs `body` with an arena of a shared part of `sharedBytes` and `slices` slices of
    /// `sliceBytes` bytes each (both rounded up to 64), zero-filled when `zeroed`. Callers
    /// have checked the total against the allocation limit (the cost model's
    /// `workspaceBytes` goes through `checkAllocation`).
    static func with<R>(sharedBytes: Int = 0, sliceBytes: Int, slices: Int, zeroed: Bool,
                        _ body: (WorkspaceArena) throws -> R) rethrows -> R {
        let total = byteCount(sharedBytes: sharedBytes, sliceBytes: sliceBytes, slices: slices)
        return try withScratch(byteCount: total) { block in
            if zeroed { block.initializeMemory(as: UInt8.self, repeating: 0, count: total) }
            return try body(WorkspaceArena(sliceBytes: roundUp(max(sliceBytes, 0), WorkspaceCarver.alignment),
                                           sharedBytes: roundUp(max(sharedBytes, 0), WorkspaceCarver.alignment),
                                           slices: max(slices, 1), block: block))
        }
    }

    /// A carver over slice `index` (`0 ..< slices`).
    func slice(_ index: Int) -> WorkspaceCarver {
        precondition(index >= 0 && index < slices, "workspace slice out of range")
        let start = block + sharedBytes + index * sliceBytes
        return WorkspaceCarver(start: start, end: start + sliceBytes)
    }

    /// A carver over the shared part.
    func shared() -> WorkspaceCarver {
        WorkspaceCarver(start: block, end: block + sharedBytes)
    }
}

/// Hands out consecutive 64-byte aligned buffers from a slice of a ``WorkspaceArena``, or,
/// when measuring, only counts the bytes they would take.
struct WorkspaceCarver {
    /// Every buffer starts on a cache line (and an AVX-512 vector).
    static let alignment = 64

    private var next: UnsafeMutableRawPointer
    private let end: UnsafeMutableRawPointer?
    private let start: UnsafeMutableRawPointer

    init(start: UnsafeMutableRawPointer, end: UnsafeMutableRawPointer?) {
        self.start = start
        self.next = start
        self.end = end
    }

    /// A carver that hands out no memory: its pointers are placeholders that must not be
    /// dereferenced, and ``bytes`` is the size a slice needs for the same requests.
    static func measuring() -> WorkspaceCarver {
        let origin = UnsafeMutableRawPointer(bitPattern: alignment)!
        return WorkspaceCarver(start: origin, end: nil)
    }

    /// Bytes handed out so far, each buffer rounded up to 64 bytes.
    var bytes: Int { next - start }

    /// The next `count` elements of `T`, 64-byte aligned (uninitialised unless the arena is
    /// zero-filled).
    mutating func take<T>(_ count: Int, of type: T.Type = T.self) -> UnsafeMutablePointer<T> {
        let pointer = next
        next += roundUp(max(count, 0) * MemoryLayout<T>.stride, WorkspaceCarver.alignment)
        guard let end else { return pointer.assumingMemoryBound(to: T.self) }  // a placeholder
        precondition(next <= end, "workspace layout larger than its slice")
        return pointer.bindMemory(to: T.self, capacity: count)
    }

    /// The bytes a slice needs for the requests `layout` makes.
    static func bytes(_ layout: (inout WorkspaceCarver) -> Void) -> Int {
        var carver = measuring()
        layout(&carver)
        return carver.bytes
    }
}

extension WorkspaceArena {
    /// Runs `body` with one workspace per worker, each carved by `layout` from its own slice
    /// of one arena that lives until `body` returns. `layout` must only carve (it also runs
    /// on a measuring carver, whose pointers are placeholders). The workspaces are handed
    /// over in stack memory for small worker counts (no allocation).
    static func withWorkspaces<Space, Result>(
        workers: Int, zeroed: Bool = false, layout: (inout WorkspaceCarver) -> Space,
        _ body: (UnsafeBufferPointer<Space>) throws -> Result
    ) rethrows -> Result {
        let bytes = WorkspaceCarver.bytes { _ = layout(&$0) }
        let slices = max(workers, 1)
        return try with(sliceBytes: bytes, slices: slices, zeroed: zeroed) { arena in
            try withUnsafeTemporaryAllocation(of: Space.self, capacity: slices) { spaces in
                for index in 0..<slices {
                    var carver = arena.slice(index)
                    (spaces.baseAddress! + index).initialize(to: layout(&carver))
                }
                defer { spaces.baseAddress!.deinitialize(count: slices) }
                return try body(UnsafeBufferPointer(spaces))
            }
        }
    }
}
