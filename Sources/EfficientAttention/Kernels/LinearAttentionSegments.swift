/// Non-causal linear attention split along the sequence, so that one long head spreads over
/// every thread: the keys' state `(S, z)` is absorbed per segment of at most
/// ``segmentLength`` positions (one work item each), the segments' states are merged in a
/// fixed order, and the queries are read out per segment.
///
///     phase 1, per (b, h, key segment s):   S_s, z_s, c_s over the segment's keys
///     phase 2, per (b, h):                  c = max_s c_s,  S = Σ_s e^{c_s − c} S_s,  z likewise
///                                           (in segment order; the log-sum-exp merge weights)
///     phase 3, per (b, h, query segment):   O = Φ_Q S, den = Φ_Q z, o = O / (den + ε)
///
/// The segments depend on the lengths only, never on the thread count, so results are the
/// same bits for every thread count. With one key segment (`Nk ≤ segmentLength`) the state
/// is exactly the serial scan's and so is every output.
///
/// - Complexity: the serial scan's FLOPs plus `2 · segments · m · (Dv + 1)` per head for the
///   merge. Workspace (shared): one state per (b, h, segment) and one packed state per (b, h).
enum LinearAttentionSegments {
    /// Positions per segment at most (32K: a segment's work, about 32K · m · Dv · 4 FLOPs,
    /// dwarfs the merge and the work-item overhead).
    static let segmentLength = 32768
    /// Segments per sequence at most.
    static let maxSegments = 32

    /// Segments for `n` positions.
    static func count(_ n: Int) -> Int { min(maxSegments, max(1, ceilDiv(n, segmentLength))) }

    /// Positions of segment `s` of `segments` over `0 ..< n`.
    static func bounds(_ s: Int, of segments: Int, length n: Int) -> Range<Int> {
        (n * s / segments)..<(n * (s + 1) / segments)
    }

    /// Whether a problem takes the segmented path: more than one segment (causal: of queries).
    static func applies(_ shape: AttentionShape, causal: Bool) -> Bool {
        causal ? count(shape.queryLength) > 1 : count(shape.keyLength) > 1 || count(shape.queryLength) > 1
    }

    /// The states the shared part holds per head: one per key segment (non-causal), one per
    /// query segment but the last (causal).
    static func stateCount(_ shape: AttentionShape, causal: Bool) -> Int {
        causal ? count(shape.queryLength) - 1 : count(shape.keyLength)
    }

    /// Floats of the shared part for `heads` (b, h) pairs.
    static func sharedFloats(heads: Int, segments: Int, m: Int, dv: Int) -> Int {
        heads * (segments * LinearAttentionScan.State.floatCount(m: m, dv: dv)
                 + Gemm.PackedB.floatCount(depth: m, columns: dv))
    }

    /// Where head `bh`'s part of the shared buffer at `base` starts: `segments` states, then
    /// the packed merged state.
    private static func headBase(_ base: UnsafeMutablePointer<Float>, bh: Int, segments: Int, m: Int, dv: Int)
        -> UnsafeMutablePointer<Float> {
        base + bh * sharedFloats(heads: 1, segments: segments, m: m, dv: dv)
    }

    /// The state of segment `s` of head `bh` in the shared part at `base`.
    static func state(_ base: UnsafeMutablePointer<Float>, bh: Int, segment s: Int, segments: Int,
                      m: Int, dv: Int) -> LinearAttentionScan.State {
        let p = headBase(base, bh: bh, segments: segments, m: m, dv: dv)
            + s * LinearAttentionScan.State.floatCount(m: m, dv: dv)
        return .init(s: p, z: p + m * dv, c: p + m * dv + m)
    }

    /// The packed merged state of head `bh`.
    static func packed(_ base: UnsafeMutablePointer<Float>, bh: Int, segments: Int, m: Int, dv: Int)
        -> UnsafeMutablePointer<Float> {
        headBase(base, bh: bh, segments: segments, m: m, dv: dv)
            + segments * LinearAttentionScan.State.floatCount(m: m, dv: dv)
    }

    /// The arena of a segmented call: `sharedFloats` shared floats (`base`), one scan workspace
    /// per worker, and each (b, h)'s rows (`input(bh)`).
    private static func withSegmentWorkspaces(
        shape: AttentionShape, m: Int, workers: Int, sharedFloats shared: Int,
        q: TensorView, k: TensorView, v: TensorView, o: MutableTensorView, lse: MutableTensorView,
        _ body: (_ base: UncheckedSendable<UnsafeMutablePointer<Float>>, _ spaces: UnsafeBufferPointer<LinearAttentionScan.Workspace>,
                 _ input: (Int) -> LinearAttentionScan.HeadInput) -> Void
    ) {
        let dv = shape.valueDim
        let sliceBytes = LinearAttentionScan.Workspace.byteCount(m: m, d: shape.headDim, dv: dv)
        WorkspaceArena.with(sharedBytes: shared * MemoryLayout<Float>.stride, sliceBytes: sliceBytes,
                            slices: workers, zeroed: false) { arena in
            var sharedCarver = arena.shared()
            let base = UncheckedSendable(sharedCarver.take(shared, of: Float.self))
            withUnsafeTemporaryAllocation(of: LinearAttentionScan.Workspace.self, capacity: workers) { spaces in
                for index in 0..<workers {
                    var carver = arena.slice(index)
                    (spaces.baseAddress! + index).initialize(to: LinearAttentionScan.Workspace(carving: &carver, m: m, d: shape.headDim, dv: dv))
                }
                defer { spaces.baseAddress!.deinitialize(count: workers) }
                body(base, UnsafeBufferPointer(spaces)) { bh in
                    let b = bh / shape.heads, h = bh % shape.heads
                    return .init(q: q, k: k, v: v, b: b, h: h, hk: h / shape.groupSize, o: o, lse: lse)
                }
            }
        }
    }

    /// `b := a ⊕ b`: the state of both key sets, with the larger stabiliser (either may be empty).
    static func merge(_ a: LinearAttentionScan.State, into b: LinearAttentionScan.State, m: Int, dv: Int) {
        let ca = a.c.pointee, cb = b.c.pointee
        guard ca > -.infinity else { return }
        let top = max(ca, cb)
        let keep: Float = cb > -.infinity ? expf(cb - top) : 0
        LinearAttentionScan.scale(b.s, count: m * dv, by: keep)
        LinearAttentionScan.scale(b.z, count: m, by: keep)
        let weight = expf(ca - top)
        axpy(weight, a.s, 1, b.s, count: m * dv)
        axpy(weight, a.z, 1, b.z, count: m)
        b.c.pointee = top
    }

    /// Causal linear attention split along the queries, for every (b, h) of `shape`:
    ///
    ///     segments Q_s = bounds(s) of the queries, keys split at t_s = clamp(Q_s.start + offset)
    ///     phase 1, per (b, h, s < S − 1):  A_s over the keys [s == 0 ? 0 : t_s, t_{s+1})
    ///     phase 2, per (b, h):             A_s := A_{s−1} ⊕ A_s in order (inclusive prefix:
    ///                                      A_{s−1} is then every key before t_s)
    ///     phase 3, per (b, h, s):          the causal loop over Q_s from state A_{s−1}
    ///                                      (segment 0: from its prefix keys [0, t_0))
    ///
    /// Chunks of the loop start at each segment's first query, and the keys before a
    /// segment are summed by segment, so results differ from the one-segment scan by
    /// rounding only, and depend on the lengths, never on the thread count.
    static func runCausal<Map: FeatureMap>(
        map: Map, epsilon: Float, shape: AttentionShape, m: Int, keyLengths: [Int]?, threads: Int,
        q: TensorView, k: TensorView, v: TensorView, o: MutableTensorView, lse: MutableTensorView
    ) {
        let heads = shape.batch * shape.heads, dv = shape.valueDim, d = shape.headDim
        let segments = count(shape.queryLength), states = segments - 1
        let offset = shape.keyLength - shape.queryLength
        let workers = workerCount(threads: threads, items: heads * segments)
        let stateFloats = LinearAttentionScan.State.floatCount(m: m, dv: dv)
        let shared = heads * states * stateFloats
        withSegmentWorkspaces(shape: shape, m: m, workers: workers, sharedFloats: shared,
                              q: q, k: k, v: v, o: o, lse: lse) { base, spaces, input in
            func state(_ bh: Int, _ s: Int) -> LinearAttentionScan.State {
                let p = base.value + (bh * states + s) * stateFloats
                return .init(s: p, z: p + m * dv, c: p + m * dv + m)
            }
            func split(_ s: Int, keyCount: Int) -> Int {
                min(max(bounds(s, of: segments, length: shape.queryLength).lowerBound + offset, 0), keyCount)
            }
            // Phase 1: the keys each segment but the last adds.
            parallelForEach(items: heads * states, threads: workers) { item, worker in
                let bh = item / states, s = item % states, head = input(bh)
                let keyCount = keyLengths?[head.b] ?? shape.keyLength
                let own = state(bh, s)
                own.reset(m: m, dv: dv)
                let keys = (s == 0 ? 0 : split(s, keyCount: keyCount))..<split(s + 1, keyCount: keyCount)
                LinearAttentionScan.absorbKeys(map, head, keys, by: LinearAttentionScan.chunk, d: d,
                                               space: spaces[worker], state: own)
            }
            // Phase 2: inclusive prefix in segment order.
            parallelForEach(items: heads, threads: workerCount(threads: threads, items: heads)) { bh, _ in
                for s in stride(from: 1, to: states, by: 1) { merge(state(bh, s - 1), into: state(bh, s), m: m, dv: dv) }
            }
            // Phase 3: each segment's causal loop from the keys before it.
            parallelForEach(items: heads * segments, threads: workers) { item, worker in
                let bh = item / segments, s = item % segments, head = input(bh), space = spaces[worker]
                let keyCount = keyLengths?[head.b] ?? shape.keyLength
                let floor = split(s, keyCount: keyCount)
                if s == 0 {
                    space.state.reset(m: m, dv: dv)
                    LinearAttentionScan.absorbKeys(map, head, 0..<floor, by: LinearAttentionScan.causalChunk, d: d,
                                                   space: space, state: space.state)
                } else {
                    space.state.assign(state(bh, s - 1), m: m, dv: dv)
                }
                LinearAttentionScan.causalQueries(
                    map: map, epsilon: epsilon, d: d, queries: bounds(s, of: segments, length: shape.queryLength),
                    keyFloor: floor, keyCount: keyCount, offset: offset, input: head, state: space.state, space: space)
            }
        }
    }

    /// Runs the three phases for every (b, h) of `shape`.
    static func run<Map: FeatureMap>(
        map: Map, epsilon: Float, shape: AttentionShape, m: Int, keyLengths: [Int]?, threads: Int,
        q: TensorView, k: TensorView, v: TensorView, o: MutableTensorView, lse: MutableTensorView
    ) {
        let heads = shape.batch * shape.heads, dv = shape.valueDim, d = shape.headDim
        let keySegments = count(shape.keyLength), querySegments = count(shape.queryLength)
        let workers = workerCount(threads: threads, items: heads * max(keySegments, querySegments))
        let shared = sharedFloats(heads: heads, segments: keySegments, m: m, dv: dv)
        withSegmentWorkspaces(shape: shape, m: m, workers: workers, sharedFloats: shared,
                              q: q, k: k, v: v, o: o, lse: lse) { base, spaces, input in
            // Phase 1: each key segment's state.
            parallelForEach(items: heads * keySegments, threads: workers) { item, worker in
                let bh = item / keySegments, s = item % keySegments, head = input(bh)
                let state = state(base.value, bh: bh, segment: s, segments: keySegments, m: m, dv: dv)
                state.reset(m: m, dv: dv)
                let keys = bounds(s, of: keySegments, length: keyLengths?[head.b] ?? shape.keyLength)
                LinearAttentionScan.absorbKeys(map, head, keys, by: LinearAttentionScan.chunk, d: d,
                                               space: spaces[worker], state: state)
            }
            // Phase 2: merge into segment 0's state, in segment order; pack it.
            parallelForEach(items: heads, threads: workerCount(threads: threads, items: heads)) { bh, _ in
                let total = state(base.value, bh: bh, segment: 0, segments: keySegments, m: m, dv: dv)
                var top = -Float.infinity
                for s in 0..<keySegments {
                    top = max(top, state(base.value, bh: bh, segment: s, segments: keySegments, m: m, dv: dv).c.pointee)
                }
                if keySegments > 1, top > -.infinity {
                    let first = total.c.pointee
                    LinearAttentionScan.scale(total.s, count: m * dv, by: first > -.infinity ? expf(first - top) : 0)
                    LinearAttentionScan.scale(total.z, count: m, by: first > -.infinity ? expf(first - top) : 0)
                    for s in 1..<keySegments {
                        let part = state(base.value, bh: bh, segment: s, segments: keySegments, m: m, dv: dv)
                        guard part.c.pointee > -.infinity else { continue }
                        let weight = expf(part.c.pointee - top)
                        axpy(weight, part.s, 1, total.s, count: m * dv)
                        axpy(weight, part.z, 1, total.z, count: m)
                    }
                    total.c.pointee = top
                }
                _ = Gemm.PackedB.pack(MatrixOperand(base: total.s, rowStride: dv, columnStride: 1), depth: m, columns: dv,
                                      into: packed(base.value, bh: bh, segments: keySegments, m: m, dv: dv))
            }
            // Phase 3: each query segment's readout.
            parallelForEach(items: heads * querySegments, threads: workers) { item, worker in
                let bh = item / querySegments, s = item % querySegments, head = input(bh), space = spaces[worker]
                let total = state(base.value, bh: bh, segment: 0, segments: keySegments, m: m, dv: dv)
                let packedState = Gemm.PackedB(base: UnsafePointer(packed(base.value, bh: bh, segments: keySegments,
                                                                          m: m, dv: dv)),
                                               depth: m, columns: dv)
                let queries = bounds(s, of: querySegments, length: shape.queryLength)
                for start in stride(from: queries.lowerBound, to: queries.upperBound, by: LinearAttentionScan.chunk) {
                    let n = min(LinearAttentionScan.chunk, queries.upperBound - start)
                    LinearAttentionScan.queryFeatures(map, head, start: start, count: n, d: d, space: space)
                    LinearAttentionScan.readState(head, start: start, count: n, b: .packed(packedState), space: space,
                                                  state: total)
                    LinearAttentionScan.finish(head, start: start, count: n, epsilon: epsilon, space: space, state: total)
                }
            }
        }
    }
}
