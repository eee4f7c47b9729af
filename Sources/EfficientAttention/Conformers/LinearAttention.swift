/// Kernelized linear attention (Katharopoulos et al. 2020; Performer, Choromanski et al. 2021):
/// softmax's `exp(q·k)` replaced by a feature-map inner product `φ(q)ᵀφ(k)`, so the sum
/// over keys factors out of the query loop.
///
/// ```
/// // naive reference (what this computes), for each b, h, i:
/// let hk = h / (H / Hkv)
/// keys: j < keyLengths[b] (all keys without padding); causal: also j <= i + Nk - Nq
/// S = Σ_j φ(k[b, hk, j]) v[b, hk, j]ᵀ      // m × Dv
/// z = Σ_j φ(k[b, hk, j])                   // m
/// o[b, h, i] = φ(q[b, h, i])ᵀ S / (φ(q[b, h, i])ᵀ z + ε)
/// lse[b, h, i] = log(φ(q[b, h, i])ᵀ z)     // -infinity when that is 0 (e.g. no visible key)
/// ```
/// `φ` is the ``FeatureMap``: ``EluPlusOneFeatures`` (`linear-elu`),
/// ``FavorPlusFeatures`` (FAVOR+, `performer`, approaching softmax attention as `m` grows,
/// so its `lse` approaches softmax's), ``ReLUFeatures``, or your own. Maps that stabilise
/// their exponentials (FAVOR+) report per-row factors; the scan keeps one running key
/// stabiliser and adds `ε` to the stabilised denominator (KernelDocs/LinearAttention.md), so
/// `ε` acts relative to the largest key feature seen rather than in absolute units.
///
/// The work runs on the linear-attention scan (Kernels/LinearAttentionScan.swift): GEMMs
/// for the features, for `S` and for the read-out; causal attention in chunks of 64
/// queries (a small masked product within the chunk, the running state across chunks).
/// ``RecurrentState`` is the same scan one token at a time, for decoding.
///
/// - Complexity: per query head, `Nk` key and `Nq` query feature rows plus
///   `2 · (Nk + Nq) · m · Dv` FLOPs (causal: plus `2 · Nq · 64 · (m + Dv)` within chunks):
///   linear in the sequence length. Workspace: `O((256 + m) · (m + Dv))` floats per thread,
///   independent of `N`.
public struct LinearAttention<Map: FeatureMap>: KernelWidening {
    public var featureMap: Map
    /// Prefix sums: key `j` visible to query `i` iff `j <= i + Nk - Nq`.
    public var causal: Bool
    /// Added to the (stabilised) denominator; must be finite and positive.
    public var epsilon: Float

    public init(featureMap: Map, causal: Bool = false, epsilon: Float = 1e-6) {
        self.featureMap = featureMap
        self.causal = causal
        self.epsilon = epsilon
    }

    public var name: String { featureMap.attentionName }

    public func validate(_ shape: AttentionShape) throws {
        try shape.check()
        guard epsilon.isFinite && epsilon > 0 else {
            throw AttentionError.invalidParameter("linear attention epsilon must be finite and positive, got \(epsilon)")
        }
        let m = try featureMap.featureCount(headDim: shape.headDim)
        guard m >= 1 else {
            throw AttentionError.invalidParameter("feature map \(name) gives \(m) features, needs at least 1")
        }
        guard checkedProduct([m + 256, shape.valueDim + 256, 64]) != nil else {
            throw AttentionError.sizeOverflow("linear attention state of \(m) × \(shape.valueDim) overflows Int")
        }
        // One scan workspace per worker, for the most workers a call may use.
        try checkAllocation(bytes: checkedProduct([maxThreadCount,
                                                   LinearAttentionScan.Workspace.byteCount(m: m, d: shape.headDim, dv: shape.valueDim)]),
                            option: "linear attention workspace (features m = \(m), valueDim \(shape.valueDim))")
        if LinearAttentionSegments.applies(shape, causal: causal) {
            // The segment states and packed states (a bound on `sharedFloats`).
            try checkFloatAllocation(shape.batch, shape.heads, LinearAttentionSegments.stateCount(shape, causal: causal) + 1,
                                     m + 1, shape.valueDim + 16,
                                     option: "linear attention segment states [B, H, segments, m, Dv]")
        }
    }

    public func cost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        let threads = try threadCount(threads)
        try validate(shape)
        let m = try featureMap.featureCount(headDim: shape.headDim)
        let nq = shape.queryLength, nk = shape.keyLength, dv = Double(shape.valueDim)
        let features = Double(nq + nk) * featureMap.flopsPerRow(headDim: shape.headDim)
        var flops = features + 2 * Double(nk + nq) * Double(m) * (dv + 1)
        var pairs = 0
        let segmented = LinearAttentionSegments.applies(shape, causal: causal)
        if causal {
            // The masked products within each chunk; chunks start at each query segment.
            let offset = nk - nq, segments = segmented ? LinearAttentionSegments.count(nq) : 1
            for s in 0..<segments {
                let queries = LinearAttentionSegments.bounds(s, of: segments, length: nq)
                let floor = min(max(queries.lowerBound + offset, 0), nk)
                for start in stride(from: queries.lowerBound, to: queries.upperBound, by: LinearAttentionScan.causalChunk) {
                    let count = min(LinearAttentionScan.causalChunk, queries.upperBound - start)
                    pairs += count * LinearAttentionScan.chunkKeys(start: start, count: count, keyFloor: floor,
                                                                   keyCount: nk, offset: offset).count
                }
            }
            flops += 2 * Double(pairs) * (Double(m) + dv)
        }
        let heads = Double(shape.batch * shape.heads)
        let slice = LinearAttentionScan.Workspace.byteCount(m: m, d: shape.headDim, dv: shape.valueDim)
        guard segmented else {
            let workers = workerCount(threads: threads, items: shape.batch * shape.heads)
            return AttentionCost(flops: heads * flops, workspaceBytes: workers * slice,
                                 scoredPairs: shape.batch * shape.heads * pairs)
        }
        let segments = LinearAttentionSegments.stateCount(shape, causal: causal)
        let items = shape.batch * shape.heads * (causal ? LinearAttentionSegments.count(shape.queryLength)
            : max(LinearAttentionSegments.count(shape.keyLength), LinearAttentionSegments.count(shape.queryLength)))
        let shared = causal
            ? shape.batch * shape.heads * segments * LinearAttentionScan.State.floatCount(m: m, dv: shape.valueDim)
            : LinearAttentionSegments.sharedFloats(heads: shape.batch * shape.heads, segments: segments,
                                                   m: m, dv: shape.valueDim)
        let merge = 2 * Double(segments) * Double(m) * (dv + 1)
        return AttentionCost(flops: heads * (flops + merge),
                             workspaceBytes: roundUp(shared * MemoryLayout<Float>.stride, 64)
                                 + workerCount(threads: threads, items: items) * slice,
                             scoredPairs: shape.batch * shape.heads * pairs)
    }

    /// 16-bit query and key rows are widened a chunk at a time (at most 256 rows) into the
    /// scan workspace before the feature map, 16-bit values as the GEMM packs them; a 16-bit
    /// output's rows are computed a chunk at a time in the scan workspace and rounded as
    /// they are finished (`LinearAttentionScan.HeadInput.outputRows`): nothing is staged.
    func stagedOperands(_ shape: AttentionShape) -> (query: Bool, output: Bool) { (false, false) }

    public func attend(query: ActivationView, key: ActivationView, value: ActivationView,
                       output: MutableActivationView, logSumExp: MutableStridedView?,
                       keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws {
        try withCheckedCall(query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                            keyLengths: keyLengths, workspace: workspace, threads: threads, scale: nil) { call in
            try run(call, keyLengths: keyLengths, threads: threads)
        }
    }

    private func run(_ call: ViewCall, keyLengths: [Int]?, threads: Int?) throws {
        let shape = call.shape
        let (q, k, v, o, l) = (call.q, call.k, call.v, call.o, call.lse)
        let m = try featureMap.featureCount(headDim: shape.headDim)
        let items = shape.batch * shape.heads
        let workers = workerCount(threads: threads, items: items)
        let (map, causal, epsilon) = (featureMap, self.causal, self.epsilon)
        if LinearAttentionSegments.applies(shape, causal: causal) {
            // Long sequences: split along the sequence (one head spreads over every thread).
            if causal {
                LinearAttentionSegments.runCausal(map: map, epsilon: epsilon, shape: shape, m: m,
                                                  keyLengths: keyLengths, threads: call.threadCount,
                                                  q: q, k: k, v: v, o: o, lse: l)
            } else {
                LinearAttentionSegments.run(map: map, epsilon: epsilon, shape: shape, m: m, keyLengths: keyLengths,
                                            threads: call.threadCount, q: q, k: k, v: v, o: o, lse: l)
            }
            return
        }
        WorkspaceArena.withWorkspaces(workers: workers, layout: {
            LinearAttentionScan.Workspace(carving: &$0, m: m, d: shape.headDim, dv: shape.valueDim)
        }) { spaces in
            parallelForEach(items: items, threads: workers) { item, worker in
                let b = item / shape.heads, h = item % shape.heads
                let space = spaces[worker]
                space.state.reset(m: m, dv: shape.valueDim)
                LinearAttentionScan.scanHead(
                    map: map, causal: causal, epsilon: epsilon, d: shape.headDim, dv: shape.valueDim,
                    queryCount: shape.queryLength, keyCount: call.keyEnd(b),
                    offset: shape.keyLength - shape.queryLength,
                    input: .init(q: q, k: k, v: v, b: b, h: h, hk: h / shape.groupSize, o: o, lse: l),
                    state: space.state, space: space)
            }
        }
    }

    /// A fresh decoding state for `batch` items and `heads` query heads (`kvHeads` key/value
    /// heads), head dimension `headDim` and value dimension `valueDim`.
    public func makeRecurrentState(batch: Int = 1, heads: Int, kvHeads: Int? = nil,
                                   headDim: Int, valueDim: Int? = nil) throws -> RecurrentState {
        try RecurrentState(attention: self, batch: batch, heads: heads, kvHeads: kvHeads ?? heads,
                           headDim: headDim, valueDim: valueDim ?? headDim)
    }

    /// The recurrent form for decoding: the state `(S, z)` of every (batch item, query head),
    /// updated as tokens arrive. ``append(query:key:value:threads:)`` with one token per call
    /// gives the same outputs as the causal batch form over the whole sequence (up to
    /// rounding and the placement of `ε`, see KernelDocs/LinearAttention.md); with `n` tokens
    /// it is the causal batch form over those tokens with every earlier token visible.
    ///
    /// - Complexity: per token and query head, one query and one key feature row and
    ///   `4 · m · Dv` FLOPs; memory `4 · B · H · m · (Dv + 1)` bytes, independent of the
    ///   number of tokens.
    public struct RecurrentState: Sendable {
        public let attention: LinearAttention<Map>
        public let batch: Int, heads: Int, kvHeads: Int, headDim: Int, valueDim: Int
        /// Tokens absorbed so far.
        public private(set) var length = 0
        private let featureCount: Int
        private var storage: [Float]
        /// Scratch memory kept between calls (a decoding step would otherwise spend more
        /// time allocating it than computing); never shared between copies of the state.
        private var scratch: ScratchBox?

        init(attention: LinearAttention<Map>, batch: Int, heads: Int, kvHeads: Int,
             headDim: Int, valueDim: Int) throws {
            let shape = AttentionShape(batch: batch, heads: heads, kvHeads: kvHeads, queryLength: 1,
                                       headDim: headDim, valueDim: valueDim)
            try attention.validate(shape)
            self.attention = attention
            self.batch = batch
            self.heads = heads
            self.kvHeads = kvHeads
            self.headDim = headDim
            self.valueDim = valueDim
            featureCount = try attention.featureMap.featureCount(headDim: headDim)
            let perHead = LinearAttentionScan.State.floatCount(m: featureCount, dv: valueDim)
            guard let count = checkedProduct([batch, heads, perHead]) else {
                throw AttentionError.sizeOverflow("recurrent state \(batch) × \(heads) × \(perHead) overflows Int")
            }
            try checkFloatAllocation(count, option: "recurrent state [B, H, m · (Dv + 1) + 1]")
            storage = [Float](repeating: 0, count: count)
            for item in 0..<batch * heads { storage[(item + 1) * perHead - 1] = -.infinity }
        }

        /// Attends `n` new tokens (query `[B, H, n, D]`, key `[B, Hkv, n, D]`, value
        /// `[B, Hkv, n, Dv]`) causally to themselves and to every earlier token, then keeps them
        /// in the state.
        public mutating func append(query: Tensor, key: Tensor, value: Tensor,
                                    threads: Int? = nil) throws -> AttentionResult {
            let shape = try AttentionShape(query: query, key: key, value: value)
            guard shape.batch == batch, shape.heads == heads, shape.kvHeads == kvHeads,
                  shape.headDim == headDim, shape.valueDim == valueDim else {
                throw AttentionError.shapeMismatch(
                    "recurrent state is for B=\(batch) H=\(heads) Hkv=\(kvHeads) D=\(headDim) Dv=\(valueDim), got \(shape)")
            }
            guard shape.queryLength == shape.keyLength else {
                throw AttentionError.shapeMismatch(
                    "recurrent append takes as many queries as keys, got Nq=\(shape.queryLength) Nk=\(shape.keyLength)")
            }
            try checkCallArguments(shape, keyLengths: nil, threads: threads)
            let m = featureCount, perHead = LinearAttentionScan.State.floatCount(m: m, dv: valueDim)
            var output = try Tensor.uninitializedOutput(shape: [batch, heads, shape.queryLength, valueDim])
            var lse = try Tensor(shape: [batch, heads, shape.queryLength, 1])
            let items = batch * heads
            let workers = workerCount(threads: threads, items: items)
            if scratch == nil || !isKnownUniquelyReferenced(&scratch!) || scratch!.spaces.count < workers {
                scratch = ScratchBox(workers: workers, m: m, d: headDim, dv: valueDim)
            }
            let spaces = scratch!.spaces
            let attention = self.attention
            storage.withUnsafeMutableBufferPointer { storage in
                let base = UncheckedSendable(storage.baseAddress!)
                query.withView { q in key.withView { k in value.withView { v in
                output.withMutableView { o in lse.withMutableView { l in
                    parallelForEach(items: items, threads: workers) { item, worker in
                        let b = item / shape.heads, h = item % shape.heads
                        let head = base.value + item * perHead
                        let state = LinearAttentionScan.State(s: head, z: head + m * shape.valueDim,
                                                              c: head + m * shape.valueDim + m)
                        LinearAttentionScan.scanHead(
                            map: attention.featureMap, causal: true, epsilon: attention.epsilon,
                            d: shape.headDim, dv: shape.valueDim,
                            queryCount: shape.queryLength, keyCount: shape.keyLength, offset: 0,
                            input: .init(q: q, k: k, v: v, b: b, h: h, hk: h / shape.groupSize, o: o, lse: l),
                            state: state, space: spaces[worker])
                    }
                } } } } }
            }
            length += shape.queryLength
            return try AttentionResult(output: output, logSumExp: lse)
        }
    }
}

/// Workspaces owned by a ``LinearAttention/RecurrentState``, freed with it.
final class ScratchBox: @unchecked Sendable {
    let spaces: [LinearAttentionScan.Workspace]
    private let block: UnsafeMutableRawPointer

    init(workers: Int, m: Int, d: Int, dv: Int) {
        let layout = { (carver: inout WorkspaceCarver) in
            LinearAttentionScan.Workspace(carving: &carver, m: m, d: d, dv: dv)
        }
        let sliceBytes = WorkspaceCarver.bytes { _ = layout(&$0) }
        block = .allocate(byteCount: max(sliceBytes * workers, WorkspaceCarver.alignment),
                          alignment: WorkspaceCarver.alignment)
        let block = self.block
        spaces = (0..<workers).map { index in
            var carver = WorkspaceCarver(start: block + index * sliceBytes, end: block + (index + 1) * sliceBytes)
            return layout(&carver)
        }
    }

    deinit { block.deallocate() }
}

extension LinearAttention: DecodingAttention {
    /// A ``RecurrentState`` (constant size: `capacity` is not needed).
    public func makeDecodingState(batch: Int, heads: Int, kvHeads: Int, headDim: Int, valueDim: Int,
                                  capacity: Int) throws -> RecurrentState {
        try makeRecurrentState(batch: batch, heads: heads, kvHeads: kvHeads, headDim: headDim, valueDim: valueDim)
    }

    /// ``RecurrentState/append(query:key:value:threads:)``: causal over the history and the
    /// new positions.
    public func attendNext(query: Tensor, key: Tensor, value: Tensor, state: inout RecurrentState,
                           threads: Int? = nil) throws -> AttentionResult {
        try state.append(query: query, key: key, value: value, threads: threads)
    }
}

extension LinearAttention: OperandWideningBackward where Map: DifferentiableFeatureMap {
    /// Each `dQ` row is finished once, so a 16-bit `dQ` is written in its precision; `dK`
    /// and `dV` rows are sums over a group's query heads: with grouped heads a 16-bit one is
    /// summed in `Float` scratch of one key/value head's rows per worker
    /// (``gradientSumBytes(_:threads:dQuery:dKey:dValue:)``, ``headGradientBytes(_:dQuery:dKey:dValue:)``)
    /// and rounded when the group ends;
    /// nothing is staged whole.
    static func stagedGradients(_ shape: AttentionShape) -> (query: Bool, keys: Bool) { (false, false) }

    static func gradientSumBytes(_ shape: AttentionShape, threads: Int?, dQuery: ActivationPrecision,
                                 dKey: ActivationPrecision, dValue: ActivationPrecision) -> Int {
        guard shape.groupSize > 1 else { return 0 }
        let rows = headGradientBytes(shape, dQuery: .float32, dKey: dKey, dValue: dValue)
        return workerCount(threads: threads, items: shape.batch * shape.kvHeads) * rows.total
    }

    /// No tiled backward: the feature map reads `Float` rows (widened into the workspace).
    static var widensInTiledBackward: Bool { false }
}

extension LinearAttention: DifferentiableAttention where Map: DifferentiableFeatureMap {
    /// The exact derivative of the forward (``LinearAttentionBackward``, KernelDocs/LinearAttention.md,
    /// "Backward"), the feature map's projection held fixed: a pass over query chunks for
    /// `dQ` (the prefix state when causal) and a reverse pass for `dK`, `dV` (suffix sums of
    /// `dS`, `dz`), on the shared GEMM; no `Nq × Nk` buffer. `logSumExp` is the forward's
    /// (`log φ(q_i)ᵀ z_i`): the denominators are read from it. The stabilisers (FAVOR+)
    /// are held constant and `ε` is added relative to the batch item's largest key
    /// stabiliser (the forward's frame when not causal; when causal the forward's running
    /// stabiliser may differ, a difference of order `ε`).
    ///
    /// ```
    /// // naive reference, for each b, h (hk = h / (H / Hkv)), with den_i = φ(q_i)ᵀ z_i:
    /// r_i = 1 / (den_i + ε),  dN_i = r_i · dO_i,  dden_i = −r_i · dot(dO_i, o_i)
    /// dφ(q_i) = S_i dN_i + z_i dden_i                   (S_i, z_i over the keys i sees)
    /// dφ(k_j) = Σ_{i sees j} φ(q_i) (dot(dN_i, v_j) + dden_i)
    /// dv_j    = Σ_{i sees j} (φ(q_i)·φ(k_j)) dN_i
    /// dq_i = J_φ(q_i)ᵀ dφ(q_i),  dk_j = J_φ(k_j)ᵀ dφ(k_j)   (summed over the group's heads)
    /// ```
    ///
    /// - Complexity: per query head about `2.5 ×` the forward's FLOPs (the cost model counts
    ///   that convention); workspace `O((64 + m) · (m + D + Dv))` floats per thread,
    ///   independent of `N`. One work item per (batch item, key/value head).
    public func gradients(query: StridedView, key: StridedView, value: StridedView, output: StridedView,
                          logSumExp: StridedView, outputGradient: StridedView,
                          dQuery: MutableStridedView, dKey: MutableStridedView, dValue: MutableStridedView,
                          keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws {
        try withCheckedGradientCall(query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                                    outputGradient: outputGradient, dQuery: dQuery, dKey: dKey, dValue: dValue,
                                    keyLengths: keyLengths, workspace: workspace, threads: threads,
                                    scale: nil) { shape, _ in
            try widenedOperandsBackward(shape, threads: try threadCount(threads), q: query.kernel, k: key.kernel,
                                        v: value.kernel, o: output.kernel, lse: logSumExp.kernel,
                                        dO: outputGradient.kernel, dQ: dQuery.kernel, dK: dKey.kernel,
                                        dV: dValue.kernel, keyLengths: keyLengths)
        }
    }

    /// The backward on checked views (the `Float` entry point's and the mixed-precision
    /// one's): 16-bit query and key rows are widened a chunk at a time into the workspace
    /// before the feature map reads them, values as the GEMM packs them, `dO` and `o` rows
    /// as they are read; 16-bit gradients written as their rows are finished
    /// (``stagedGradients(_:)``).
    func widenedOperandsBackward(_ shape: AttentionShape, threads: Int, q: TensorView, k: TensorView,
                                 v: TensorView, o: TensorView, lse: TensorView, dO: TensorView,
                                 dQ: MutableTensorView, dK: MutableTensorView, dV: MutableTensorView,
                                 keyLengths: [Int]?) throws {
        let (map, causal, epsilon) = (featureMap, self.causal, self.epsilon)
        let m = try map.featureCount(headDim: shape.headDim)
        let items = shape.batch * shape.kvHeads
        let workers = workerCount(threads: threads, items: items)
        let views = LinearAttentionBackward.Views(q: q, k: k, v: v, o: o, lse: lse, dO: dO, dQ: dQ, dK: dK, dV: dV)
        // With grouped heads a 16-bit `dK`, `dV` row sums over the group: each worker sums
        // its group's rows in `Float` (scratch beyond the cost's workspace, in its slice) and
        // rounds them into the caller's rows when the group ends.
        let (nk, d, dv, group) = (shape.keyLength, shape.headDim, shape.valueDim, shape.groupSize)
        let rows = headGradientBytes(shape, dQuery: .float32, dKey: dK.precision, dValue: dV.precision)
        let summed = group > 1 ? (key: rows.key, value: rows.value) : (key: 0, value: 0)
        WorkspaceArena.withWorkspaces(workers: workers, layout: {
            (LinearAttentionBackward.Workspace(carving: &$0, m: m, d: d, dv: dv),
             $0.take(summed.key / 4, of: Float.self), $0.take(summed.value / 4, of: Float.self))
        }) { spaces in
            parallelForEach(items: items, threads: workers) { item, worker in
                let b = item / shape.kvHeads, hk = item % shape.kvHeads
                let (space, keyRows, valueRows) = spaces[worker]
                var x = views
                if summed.key > 0 { x.dK = MutableTensorView(base: keyRows, strides: SIMD4(0, 0, d, 1)) }
                if summed.value > 0 { x.dV = MutableTensorView(base: valueRows, strides: SIMD4(0, 0, dv, 1)) }
                LinearAttentionBackward.item(
                    map: map, causal: causal, epsilon: epsilon, queryLength: shape.queryLength,
                    keyLength: nk, keyCount: keyLengths?[b] ?? nk,
                    b: b, hk: hk, heads: hk * group..<(hk + 1) * group, views: x, space: space)
                if summed.key > 0 { dK.storeRows(b, hk, rows: nk, from: keyRows, width: d) }
                if summed.value > 0 { dV.storeRows(b, hk, rows: nk, from: valueRows, width: dv) }
            }
        }
    }

    public func backwardCost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        let forward = try cost(shape, threads: threads)
        let m = try featureMap.featureCount(headDim: shape.headDim)
        let workers = workerCount(threads: try threadCount(threads), items: shape.batch * shape.kvHeads)
        return AttentionCost(flops: 2.5 * forward.flops,
                             workspaceBytes: workers * LinearAttentionBackward.Workspace.byteCount(
                                 m: m, d: shape.headDim, dv: shape.valueDim),
                             scoredPairs: forward.scoredPairs)
    }
}
