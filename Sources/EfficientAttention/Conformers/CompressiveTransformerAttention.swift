/// Compressive Transformer attention (Rae et al. 2020): Transformer-XL's segment attention
/// over `[compressed ; memory ; segment]`, where the positions that leave the memory are
/// compressed at rate `c` into slots of a second, compressed memory.
///
/// ```
/// // naive reference (what this computes), for each b, h, i, with P = Nk − Nq keys of
/// // [compressed ; memory] in front of the segment's (hk = h / (H / Hkv)); each compressed
/// // slot counts as one position:
/// Δ = i + P − j                                         // distance; visible iff 0 ≤ Δ
/// s[j] = scale · (dot(q[b,h,i], k[b,hk,j]) + dot(q[b,h,i], r[h,Δ])
///                 + dot(u[h], k[b,hk,j]) + dot(v[h], r[h,Δ]))
/// o[b, h, i] = Σ_j softmax(s)[j] · v[b, hk, j],   lse[b, h, i] = log Σ_j exp(s[j])
/// // then, per batch item, X = [memory ; segment] (len_m + N positions):
/// n_s = max(0, len_m + N − M)                           // evicted, must be a multiple of c
/// memory = X[n_s...]                                    // the last min(M, len_m + N)
/// slot[t] = f(X[tc ..< tc + c]) for t < n_s / c         // per key/value head, keys and values
/// compressed = last M_c of [compressed ; slot]
/// // f: max pool (per column), mean pool, or Σ_{r<c} W_r · x[tc + r] (W_r row-major [out, in])
/// ```
/// The attention is exactly ``TransformerXLAttention``'s over the whole span
/// (`memoryLength = M_c + M`), with the same table `r`, biases `u`, `v` and scale.
///
/// Two ways to call it:
/// - statefully, ``attend(query:key:value:memory:threads:)``: the caller owns a
///   ``CompressiveMemory`` (a value; ``CompressiveMemory/reset(batchItem:)`` and
///   ``CompressiveMemory/reset()`` forget); the call attends, then updates the memory as
///   above. The evicted count of every item must be a multiple of `c` (a segment length
///   and `M` that are both multiples of `c` guarantee it; with `M_c = 0` nothing is
///   compressed and any count is fine), or the call throws before changing anything.
/// - statelessly, through ``Attention``: `key` and `value` already hold
///   `[compressed ; memory ; segment]` (`Nk = Nq + P`, `0 ≤ P ≤ M_c + M`), as the benchmark
///   does; nothing is compressed.
///
/// ``reconstructionLoss(query:oldKeys:oldValues:threads:)`` is the paper's
/// attention-reconstruction loss of the compression function, on the dense kernel.
///
/// Runs on the shared kernels (KernelDocs/Compressive.md): the attention is Transformer-XL's
/// tiled-softmax call with the relative-position mask (per-item `keyBegin` for the
/// right-aligned memories); the convolution and the mean pool are ``WindowCompression``'s
/// GEMMs and sums over strided row views of the evicted positions, the max pool its
/// `maxPool`.
///
/// - Complexity: the attention, `2 · pairs · (2·D + Dv)` FLOPs with
///   `pairs = Nq · P + Nq (Nq + 1) / 2` per head (as Transformer-XL over `P` memory keys);
///   the stateful call adds `O(B · Hkv · (P + Nq) · (D + Dv))` to concatenate and update
///   and the compression of `n_s` positions per item and key/value head:
///   `2 · n_s · (D² + Dv²)` FLOPs for the convolution, `n_s · (D + Dv)` for the pools.
///   Workspace: Transformer-XL's over `P + Nq` keys, the concatenated keys and values,
///   the new memories, and one GEMM workspace per thread.
public struct CompressiveTransformerAttention: KernelWidening, ModifiableAttention, Equatable {
    /// How the positions leaving the memory become compressed slots, `c` positions each.
    public enum CompressionFunction: Sendable, Equatable {
        /// The largest value of each column over the window.
        case maxPool
        /// The mean of the window's rows.
        case meanPool
        /// A 1-D convolution of kernel and stride `c`, no bias: `slot_t = Σ_{r<c} W_r · x[tc + r]`
        /// with key weights `[Hkv, c, D, D]` and value weights `[Hkv, c, Dv, Dv]`, each `W_r`
        /// row-major `[out, in]`.
        case convolution(keyWeights: [Float], valueWeights: [Float])
    }

    /// `M`: how many past positions the memory keeps.
    public var memoryLength: Int
    /// `M_c`: how many compressed slots the compressed memory keeps.
    public var compressedMemoryLength: Int
    /// `c`: positions per compressed slot.
    public var compression: Int
    public var compressionFunction: CompressionFunction
    /// The relative-position table `[1, H or 1, T, D]`, `T ≥ M_c + M + Nq`.
    public var relativePositions: Tensor
    /// `u`, `H × D` row-major: the content bias.
    public var contentBias: [Float]
    /// `v`, `H × D` row-major: the position bias.
    public var positionBias: [Float]
    /// Score scale; `nil` means `1 / sqrt(D)`. Must be finite.
    public var scale: Float?
    /// Soft-capping, ALiBi, an additive bias and sinks (``ScoreModifiers``), as
    /// ``TransformerXLAttention/modifiers`` over the keys `[compressed ; memory ; segment]`;
    /// none by default. In the stateful call the bias is `[B or 1, H or 1, Nq, P + Nq]` with
    /// `P` the longest item's held past (compressed slots and memory) before the call.
    public var modifiers = ScoreModifiers()

    /// The paper's compression rate, 3.
    public static let defaultCompression = 3

    public init(memoryLength: Int, compressedMemoryLength: Int,
                compression: Int = CompressiveTransformerAttention.defaultCompression,
                compressionFunction: CompressionFunction = .meanPool,
                relativePositions: Tensor, contentBias: [Float], positionBias: [Float], scale: Float? = nil) {
        self.memoryLength = memoryLength
        self.compressedMemoryLength = compressedMemoryLength
        self.compression = compression
        self.compressionFunction = compressionFunction
        self.relativePositions = relativePositions
        self.contentBias = contentBias
        self.positionBias = positionBias
        self.scale = scale
    }

    /// A configuration with seeded random parameters, for experiments and benchmarks: `r`,
    /// `u`, `v` are those of
    /// ``TransformerXLAttention/init(heads:headDim:memoryLength:maxSegmentLength:seed:scale:)``
    /// with `memoryLength = M_c + M` (a table of `M_c + M + maxSegmentLength` rows).
    public init(heads: Int, headDim: Int, memoryLength: Int, compressedMemoryLength: Int,
                compression: Int = CompressiveTransformerAttention.defaultCompression,
                compressionFunction: CompressionFunction = .meanPool,
                maxSegmentLength: Int, seed: UInt64, scale: Float? = nil) throws {
        for (label, value) in [("memoryLength", memoryLength), ("compressedMemoryLength", compressedMemoryLength)] {
            try checkOption(value, label, in: 0...lengthLimit, variant: "compressive transformer attention")
        }
        let xl = try TransformerXLAttention(heads: heads, headDim: headDim,
                                            memoryLength: compressedMemoryLength + memoryLength,
                                            maxSegmentLength: maxSegmentLength, seed: seed, scale: scale)
        self.init(memoryLength: memoryLength, compressedMemoryLength: compressedMemoryLength,
                  compression: compression, compressionFunction: compressionFunction,
                  relativePositions: xl.relativePositions, contentBias: xl.contentBias,
                  positionBias: xl.positionBias, scale: scale)
    }

    public var name: String { "compressive" }

    /// The Transformer-XL attention this one runs: the same parameters over a memory of
    /// `M_c + M` positions.
    var transformerXL: TransformerXLAttention {
        var attention = TransformerXLAttention(memoryLength: compressedMemoryLength + memoryLength,
                                               relativePositions: relativePositions, contentBias: contentBias,
                                               positionBias: positionBias, scale: scale)
        attention.modifiers = modifiers
        return attention
    }

    private static let variant = "compressive transformer attention"

    /// Throws unless the compression options fit `shape`'s key/value heads and dimensions:
    /// `c ≥ 1`, convolution weights of the right counts and finite.
    func validateCompression(_ shape: AttentionShape) throws {
        let variant = Self.variant
        try checkOption(compression, "compression", in: 1...patternLimit, variant: variant)
        guard case let .convolution(keyWeights, valueWeights) = compressionFunction else { return }
        let (hkv, c, d, dv) = (shape.kvHeads, compression, shape.headDim, shape.valueDim)
        for (label, weights, dims, layout) in [("keyWeights", keyWeights, [hkv, c, d, d], "[Hkv, c, D, D]"),
                                               ("valueWeights", valueWeights, [hkv, c, dv, dv], "[Hkv, c, Dv, Dv]")] {
            guard weights.count == checkedProduct(dims) else {
                throw AttentionError.invalidParameter(
                    "\(variant): convolution \(label) has \(weights.count) values, expected \(layout) = \(dims)")
            }
            if let index = weights.firstIndex(where: { !$0.isFinite }) {
                throw AttentionError.invalidParameter(
                    "\(variant): convolution \(label)[\(index)] must be finite, got \(weights[index])")
            }
        }
    }

    /// Throws unless the configuration fits a segment of `shape` (keys not counted): the
    /// shape, the lengths, the compression, and a table of at least `M_c + M + Nq` rows.
    func validateConfiguration(_ shape: AttentionShape) throws {
        let variant = Self.variant
        try checkPatternShape(shape, scale: scale, variant: variant)
        try checkOption(memoryLength, "memoryLength", in: 0...lengthLimit, variant: variant)
        try checkOption(compressedMemoryLength, "compressedMemoryLength", in: 0...lengthLimit, variant: variant)
        try validateCompression(shape)
        let needed = compressedMemoryLength + memoryLength + shape.queryLength
        let rows = relativePositions.shape[2]
        guard rows >= needed else {
            throw AttentionError.invalidParameter(
                "\(variant): relativePositions has \(rows) rows (distances), too short for compressedMemoryLength "
                + "+ memoryLength + Nq = \(compressedMemoryLength) + \(memoryLength) + \(shape.queryLength) = \(needed)")
        }
        try transformerXL.validateConfiguration(shape)
    }

    /// Throws unless `shape` is `Nk = P + Nq` keys with `0 ≤ P ≤ M_c + M` and the table,
    /// biases, scale and compression fit it.
    public func validate(_ shape: AttentionShape) throws {
        try validateConfiguration(shape)
        let past = shape.keyLength - shape.queryLength
        let span = compressedMemoryLength + memoryLength
        guard past >= 0, past <= span else {
            throw AttentionError.shapeMismatch(
                "memory length mismatch: keyLength \(shape.keyLength) = compressed + memory + segment needs "
                + "0...\(span) (compressedMemoryLength + memoryLength) positions before the \(shape.queryLength) "
                + "queries, got \(past)")
        }
    }

    /// The stateless call's cost: Transformer-XL's over the same keys.
    public func cost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        try validate(shape)
        return try transformerXL.cost(shape, threads: threads)
    }

    /// Transformer-XL's single pass: queries widened as the tiled kernel packs them,
    /// nothing staged.
    func stagedOperands(_ shape: AttentionShape) -> (query: Bool, output: Bool) { (false, false) }

    /// Attention of a segment over `[compressed ; memory]` already prepended to its keys:
    /// `key` and `value` hold `P = Nk − Nq` past positions followed by the `Nq` segment
    /// positions. `keyLengths` pads keys at the end, as for dense attention. Float16 and
    /// BFloat16 operands are read in place as Transformer-XL's are.
    public func attend(query: ActivationView, key: ActivationView, value: ActivationView,
                       output: MutableActivationView, logSumExp: MutableStridedView?,
                       keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws {
        try withCheckedCall(query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                            keyLengths: keyLengths, workspace: workspace, threads: threads, scale: scale,
                            modifiers: modifiers) { call in
            transformerXL.run(shape: call.shape, q: call.q, k: call.k, v: call.v, o: call.o, lse: call.lse,
                              keyBegins: nil, keyLengths: keyLengths, threads: call.threadCount,
                              modifiers: call.modifiers)
        }
    }

    /// Attends the segment (`query`, `key`, `value` of `Nq` positions each) over
    /// `[compressed ; memory ; segment]` of each batch item with the causal rule, then
    /// updates `memory`: each item's `[memory ; segment]` keeps its last `M` positions and
    /// the `n_s` before them become `n_s / c` compressed slots appended to its compressed
    /// memory, which keeps its last `M_c` slots.
    ///
    /// - Throws: before changing anything: ``AttentionError/invalidParameter(_:)`` naming
    ///   `compression` when `c` does not divide some item's evicted count `n_s` (segment
    ///   length and `M` both multiples of `c` guarantee it; with `M_c = 0` nothing is
    ///   compressed and any count is accepted), a memory of other capacities or
    ///   dimensions, bad options, a table shorter than `M_c + M + Nq`.
    /// - Complexity: see the type; the keys per item are its `P_b ≤ M_c + M` valid past
    ///   positions and the segment, padded in front to the longest `P_b`.
    public func attend(query: Tensor, key: Tensor, value: Tensor,
                       memory: inout CompressiveMemory, threads: Int? = nil) throws -> AttentionResult {
        let segment = try TransformerXLAttention.segmentShape(query: query, key: key, value: value,
                                                              validate: validateConfiguration)
        guard memory.capacity == memoryLength, memory.compressedCapacity == compressedMemoryLength else {
            throw AttentionError.shapeMismatch(
                "memory length mismatch: the memory holds up to \(memory.capacity) positions and "
                + "\(memory.compressedCapacity) compressed slots, memoryLength is \(memoryLength) and "
                + "compressedMemoryLength \(compressedMemoryLength)")
        }
        try TransformerXLAttention.checkMemoryDimensions(
            segment, batch: memory.batch, kvHeads: memory.kvHeads, headDim: memory.headDim, valueDim: memory.valueDim,
            threads: threads)
        let n = segment.queryLength, c = compression
        let evicted = memory.lengths.map { max(0, $0 + n - memoryLength) }
        // Without a compressed memory nothing is compressed (Transformer-XL): any count is fine.
        if compressedMemoryLength > 0, let b = evicted.indices.first(where: { evicted[$0] % c != 0 }) {
            throw AttentionError.invalidParameter(
                "\(Self.variant): compression \(c) does not divide the \(evicted[b]) positions evicted from batch "
                + "item \(b)'s memory (\(memory.lengths[b]) + segment \(n) − memoryLength \(memoryLength)); segment "
                + "lengths and memoryLength that are multiples of compression guarantee it")
        }
        let spans = memory.valid.map { $0.compressed + $0.memory }
        let past = spans.max() ?? 0
        try checkFloatAllocation(segment.batch, segment.kvHeads, past + n, max(segment.headDim, segment.valueDim),
                                 option: "\(Self.variant): [compressed ; memory ; segment] [B, Hkv, M_c + M + Nq, D]")
        let pads = spans.map { past - $0 }
        let allKeys = try memory.concatenated(values: false, segment: key, pads: pads)
        let allValues = try memory.concatenated(values: true, segment: value, pads: pads)
        var shape = segment
        shape.keyLength = past + n
        let result = try transformerXL.run(shape: shape, query: query, key: allKeys, value: allValues, keyBegins: pads,
                                           keyLengths: nil, threads: threads, modifiers: modifiers)
        let workers = try threadCount(threads)
        try memory.absorb(keys: allKeys, values: allValues, pads: pads, added: n, evicted: evicted,
                          compression: c) { starts, slots, keys, values, destinations in
            compressWindows(keys: allKeys, values: allValues, starts: starts, slots: slots,
                            into: &keys, &values, destinations: destinations, threads: workers)
        }
        return result
    }

    /// The attention-reconstruction loss of the compression (Rae et al. 2020, §3.2) for
    /// `old` positions, as a sum of squares over every element of the outputs:
    ///
    /// ```
    /// loss = Σ_{b,h,i,d} (attn(q, k_old, v_old)[b,h,i,d] − attn(q, f(k_old), f(v_old))[b,h,i,d])²
    /// ```
    /// where `attn` is plain non-causal softmax attention with this conformer's scale (no
    /// relative terms: ``DenseAttention``), `f` the compression function at rate `c`, and
    /// `oldKeys [B, Hkv, n_s, D]`, `oldValues [B, Hkv, n_s, Dv]` with `n_s` a multiple of
    /// `c` (the positions a call evicted). The sum is accumulated in Double, in a fixed
    /// order (the same for any thread count).
    ///
    /// - Complexity: the compression of `n_s` positions and two dense attentions, over
    ///   `n_s` and `n_s / c` keys: `2 · Nq · n_s · (1 + 1/c) · (D + Dv)` FLOPs per head.
    public func reconstructionLoss(query: Tensor, oldKeys: Tensor, oldValues: Tensor,
                                   threads: Int? = nil) throws -> Float {
        try reconstruction(query: query, oldKeys: oldKeys, oldValues: oldValues, threads: threads,
                           weightGradients: false).loss
    }

    /// The reconstruction loss (``reconstructionLoss(query:oldKeys:oldValues:threads:)``)
    /// and its gradients with respect to the convolution's key and value weights: how the
    /// paper trains the compression network (Rae et al. 2020, §3.2: the loss is its only
    /// gradient; queries and old positions are held fixed, as its stop-gradients say).
    ///
    /// ```
    /// // naive reference: o = attn(q, k_old, v_old) (fixed), õ = attn(q, K', V'),
    /// // K'[t] = Σ_r W^K_r k_old[tc + r], V'[t] = Σ_r W^V_r v_old[tc + r]   (per b, hk)
    /// dõ = 2 (õ − o)
    /// dK', dV' = the dense softmax backward of õ with dõ (DenseAttention.gradients)
    /// ∂loss/∂W^K_r[hk] = Σ_b Σ_t dK'[b,hk,t] ⊗ k_old[b,hk,tc + r]     (outer product, [out, in])
    /// ∂loss/∂W^V_r[hk] = Σ_b Σ_t dV'[b,hk,t] ⊗ v_old[b,hk,tc + r]
    /// ```
    ///
    /// Throws ``AttentionError/unsupported(_:)`` unless ``compressionFunction`` is a
    /// convolution (the pools have no parameters), and what the loss throws.
    ///
    /// - Complexity: the loss's, plus the dense backward over the `n_s / c` slots
    ///   (`2.5 ×` its forward) and `2 · n_s · (D² + Dv²)` FLOPs per key/value head and batch
    ///   item for the weight gradients; sums over batch items in item order (bitwise
    ///   identical for any thread count).
    public func reconstructionLossGradients(query: Tensor, oldKeys: Tensor, oldValues: Tensor, threads: Int? = nil)
        throws -> (loss: Float, keyWeights: [Float], valueWeights: [Float]) {
        guard case .convolution = compressionFunction else {
            throw AttentionError.unsupported(
                "\(Self.variant): reconstructionLossGradients needs compressionFunction .convolution (the pools have no weights)")
        }
        let r = try reconstruction(query: query, oldKeys: oldKeys, oldValues: oldValues, threads: threads,
                                   weightGradients: true)
        return (r.loss, r.keyWeights, r.valueWeights)
    }

    /// The reconstruction loss, and with `weightGradients` the convolution weights' gradients.
    private func reconstruction(query: Tensor, oldKeys: Tensor, oldValues: Tensor, threads: Int?,
                                weightGradients: Bool) throws -> (loss: Float, keyWeights: [Float], valueWeights: [Float]) {
        let shape = try AttentionShape(query: query, key: oldKeys, value: oldValues)
        try checkPatternShape(shape, scale: scale, variant: Self.variant)
        try validateCompression(shape)
        let c = compression, slots = shape.keyLength / compression
        guard shape.keyLength % c == 0 else {
            throw AttentionError.invalidParameter(
                "\(Self.variant): compression \(c) does not divide the \(shape.keyLength) old positions of the "
                + "reconstruction loss")
        }
        try checkCallArguments(shape, keyLengths: nil, threads: threads)
        var compressedShape = shape
        compressedShape.keyLength = slots
        let dense = DenseAttention(causal: false, scale: scale)
        try dense.validate(shape)
        try dense.validate(compressedShape)
        try checkFloatAllocation(shape.batch, shape.kvHeads, slots, shape.headDim + shape.valueDim,
                                 option: "\(Self.variant): compressed keys and values [B, Hkv, n_s / c, D + Dv]")
        let workers = try threadCount(threads)
        var keys = try Tensor(shape: [shape.batch, shape.kvHeads, slots, shape.headDim])
        var values = try Tensor(shape: [shape.batch, shape.kvHeads, slots, shape.valueDim])
        let zeros = [Int](repeating: 0, count: shape.batch)
        compressWindows(keys: oldKeys, values: oldValues, starts: zeros,
                        slots: [Int](repeating: slots, count: shape.batch), into: &keys, &values,
                        destinations: zeros, threads: workers)
        let full = try dense.attend(query: query, key: oldKeys, value: oldValues, threads: workers).output.elements
        let approximate = try dense.attend(query: query, key: keys, value: values, threads: workers)
        var loss = 0.0
        for (a, b) in zip(full, approximate.output.elements) {
            let difference = Double(a) - Double(b)
            loss += difference * difference
        }
        guard weightGradients, case let .convolution(keyWeights, valueWeights) = compressionFunction else {
            return (Float(loss), [], [])
        }
        // dõ = 2 (õ − o), then the slots' gradients from the dense backward.
        let outputGradient = try Tensor(shape: approximate.output.shape,
                                        data: zip(approximate.output.elements, full).map { 2 * ($0 - $1) })
        let slotGradients = try dense.gradients(query: query, key: keys, value: values, result: approximate,
                                                outputGradient: outputGradient, threads: workers)
        var dKeyWeights = [Float](repeating: 0, count: keyWeights.count)
        var dValueWeights = [Float](repeating: 0, count: valueWeights.count)
        let (batch, kvHeads, d, dv) = (shape.batch, shape.kvHeads, shape.headDim, shape.valueDim)
        // One work item per (side, key/value head, offset r): each owns its W_r block and sums
        // over batch items in order.
        let items = 2 * kvHeads * c
        let threadsUsed = workerCount(threads: workers, items: items)
        WorkspaceArena.withWorkspaces(workers: threadsUsed, layout: { Gemm.Workspace(carving: &$0) }) { spaces in
        oldKeys.withView { k in oldValues.withView { v in
        slotGradients.dKey.withView { gk in slotGradients.dValue.withView { gv in
        dKeyWeights.withUnsafeMutableBufferPointer { dwk in dValueWeights.withUnsafeMutableBufferPointer { dwv in
            let targets = (UncheckedSendable(dwk.baseAddress!), UncheckedSendable(dwv.baseAddress!))
            parallelForEach(items: items, threads: threadsUsed) { item, worker in
                let isValue = item % 2 == 1, hk = item / 2 / c, r = item / 2 % c
                let width = isValue ? dv : d, source = isValue ? v : k, gradient = isValue ? gv : gk
                let dW = (isValue ? targets.1 : targets.0).value + (hk * c + r) * width * width
                for b in 0..<batch {
                    WindowCompression.accumulateWeightGradient(
                        gradient.row(b, hk, 0), ldg: gradient.strides[2], source: source, b: b, h: hk,
                        length: shape.keyLength, compression: c, offset: r, width: width, into: dW,
                        workspace: spaces[worker])
                }
            }
        } } } } } }
        }
        return (Float(loss), dKeyWeights, dValueWeights)
    }

    /// For each batch item `b` and key/value head, compresses the `slots[b] · c` rows of
    /// `keys` / `values` from row `starts[b]` into `slots[b]` rows of `outKeys` / `outValues`
    /// from row `destinations[b]`, with the compression function. One work item per item,
    /// head and side; each writes its own rows, so the result does not depend on threads.
    func compressWindows(keys: Tensor, values: Tensor, starts: [Int], slots: [Int],
                         into outKeys: inout Tensor, _ outValues: inout Tensor, destinations: [Int], threads: Int) {
        let (batch, kvHeads, d, dv) = (keys.shape[0], keys.shape[1], keys.shape[3], values.shape[3])
        let c = compression
        let items = 2 * batch * kvHeads
        let workers = workerCount(threads: threads, items: items)
        let function = compressionFunction
        let (keyWeights, valueWeights): ([Float], [Float])
        if case let .convolution(k, v) = function { (keyWeights, valueWeights) = (k, v) } else { (keyWeights, valueWeights) = ([], []) }
        // Only the convolution runs GEMMs: the pools get a workspace without packing buffers.
        let packing = function != .maxPool && function != .meanPool
        WorkspaceArena.withWorkspaces(workers: workers, layout: { Gemm.Workspace(carving: &$0, packing: packing) }) { spaces in
        keyWeights.withUnsafeBufferPointer { kw in valueWeights.withUnsafeBufferPointer { vw in
        keys.withView { k in values.withView { v in
        outKeys.withMutableView { kOut in outValues.withMutableView { vOut in
            let weights = (UncheckedSendable(kw), UncheckedSendable(vw))
            parallelForEach(items: items, threads: workers) { item, worker in
                let isValue = item % 2 == 1
                let b = item / 2 / kvHeads, hk = item / 2 % kvHeads
                guard slots[b] > 0 else { return }
                let width = isValue ? dv : d
                let source = isValue ? v : k, out = isValue ? vOut : kOut
                let rows = TensorView(base: source.row(b, hk, starts[b]), strides: source.strides)
                let target = out.row(b, hk, destinations[b])
                switch function {
                case .maxPool:
                    WindowCompression.maxPool(rows, b: 0, h: 0, length: slots[b] * c, compression: c, width: width,
                                              into: target, ldo: out.strides[2])
                case .meanPool, .convolution:
                    // Empty arrays may still have a base address: only a convolution has weights.
                    let matrices = function == .meanPool ? nil : (isValue ? weights.1 : weights.0).value.baseAddress
                    WindowCompression.compress(rows, b: 0, h: 0, length: slots[b] * c, compression: c, width: width,
                                               weights: matrices.map { $0 + hk * c * width * width }, bias: nil,
                                               into: target, ldo: out.strides[2], workspace: spaces[worker])
                }
            }
        } } } } } }
        }
    }
}

extension CompressiveTransformerAttention: KernelWideningBackward {
    /// Transformer-XL's passes over the whole span (16-bit operands widened in its packing).
    func tiledBackward(_ call: TiledBackwardCall) throws { try transformerXL.tiledBackward(call) }

    func addsKeyGradients(_ shape: AttentionShape) throws -> Bool {
        try transformerXL.addsKeyGradients(shape)
    }

    /// The backward of the stateless call (``attend(query:key:value:output:logSumExp:keyLengths:workspace:threads:)``,
    /// `key`/`value` = `[compressed ; memory ; segment]`): exactly Transformer-XL's over the
    /// whole span (``TransformerXLAttention/gradients(query:key:value:output:logSumExp:outputGradient:dQuery:dKey:dValue:keyLengths:workspace:threads:)``,
    /// KernelDocs/TransformerXL.md, "Backward"), after this conformer's own checks. The
    /// compressed slots and memory rows get their gradients like the segment's keys; the
    /// memory update of the stateful call is not differentiated (the paper stops gradients
    /// there and trains the compression with
    /// ``reconstructionLossGradients(query:oldKeys:oldValues:threads:)``).
    ///
    /// - Complexity: Transformer-XL's backward over `P + Nq` keys.
    public func gradients(query: StridedView, key: StridedView, value: StridedView, output: StridedView,
                          logSumExp: StridedView, outputGradient: StridedView,
                          dQuery: MutableStridedView, dKey: MutableStridedView, dValue: MutableStridedView,
                          keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws {
        try validate(AttentionShape(query: query, key: key, value: value))
        try transformerXL.gradients(query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                                    outputGradient: outputGradient, dQuery: dQuery, dKey: dKey, dValue: dValue,
                                    keyLengths: keyLengths, workspace: workspace, threads: threads)
    }

    /// Transformer-XL's parameter gradients (the table `r`, `u`, `v`) through the stateless
    /// call that gave `result` (``TransformerXLAttention/parameterGradients(query:key:value:result:outputGradient:keyLengths:threads:)``).
    public func parameterGradients(query: Tensor, key: Tensor, value: Tensor, result: AttentionResult,
                                   outputGradient: Tensor, keyLengths: [Int]? = nil, threads: Int? = nil)
        throws -> (inputs: AttentionGradients, parameters: TransformerXLParameterGradients) {
        try validate(AttentionShape(query: query, key: key, value: value))
        return try transformerXL.parameterGradients(query: query, key: key, value: value, result: result,
                                                    outputGradient: outputGradient, keyLengths: keyLengths,
                                                    threads: threads)
    }

    public func backwardCost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        try validate(shape)
        return try transformerXL.backwardCost(shape, threads: threads)
    }
}
