/// Linformer (Wang et al. 2020): keys and values projected along the sequence to `k`
/// rows, then exact softmax attention over the `k` projected keys.
///
/// ```
/// // naive reference (what this computes), for each b, h, i:
/// let hk = h / (H / Hkv), L = keyLengths?[b] ?? Nk       // L ≤ Nmax
/// let E = projections.e[p], F = projections.f[p]         // p = 0 shared, p = hk per head
/// K'[r] = Σ_{j < L} E[r, j] · k[b, hk, j]                // r < k
/// V'[r] = Σ_{j < L} F[r, j] · v[b, hk, j]
/// s[r] = scale · dot(q[b, h, i], K'[r])
/// o[b, h, i] = Σ_r softmax(s)[r] · V'[r],   lse[b, h, i] = log Σ_r exp(s[r])
/// ```
/// Sequences shorter than `Nmax` use the leading columns of `E` and `F`. A batch item with
/// `L = 0` has no key: its rows are 0 with `lse = -infinity`. Causal attention is not
/// defined (projecting mixes future keys into every row): `causal` throws
/// ``AttentionError/unsupported(_:)``.
///
/// The projections run on the shared GEMM kernel (KernelDocs/MicroKernels.md), one work
/// item per batch item, key/value head and projection; the attention over the projected
/// keys is the dense flash kernel (KernelDocs/Dense.md).
///
/// - Complexity: `2 · k · L · (D + Dv)` FLOPs per key/value head for the projections plus
///   `2 · Nq · k · (D + Dv)` per query head: linear in the sequence length. Workspace: the
///   projected keys and values (`4 · B · Hkv · k · (D + Dv)` bytes) plus about 1 MiB of
///   packing buffers and the dense kernel's tiles per thread.
public struct LinformerAttention: KernelWidening {
    /// Rows of the projections, `k`.
    public let projectedLength: Int
    /// Columns of the projections, `Nmax`: the longest key sequence this instance accepts.
    public let maxSequenceLength: Int
    /// Number of projection pairs: 1 (shared by every head) or `Hkv` (one per key/value head).
    public let projectionCount: Int
    /// `E` for every projection, `[projectionCount, k, Nmax]` row-major.
    public let e: [Float]
    /// `F`, same layout; `nil` when `E = F` (keys and values share one projection).
    public let f: [Float]?
    /// Score scale; `nil` means `1 / sqrt(D)`. Must be finite.
    public var scale: Float?
    /// Must stay false: Linformer has no causal form (a thrown error).
    public var causal: Bool

    /// Projections drawn from a seeded generator, entries `N(0, 1/k)` (the Johnson-Lindenstrauss
    /// scaling of the paper's analysis, so that `E Eᵀ ≈ I` and projected scores keep the
    /// size of exact ones).
    ///
    /// - Parameters:
    ///   - projectedLength: `k ≥ 1`.
    ///   - maxSequenceLength: `Nmax ≥ 1`.
    ///   - perHeadProjections: `nil` shares one `E, F` pair across heads; `n` gives each of
    ///     `n` key/value heads its own pair (`n` must then equal `Hkv` of every call).
    ///   - sharedKeyValue: `E = F`.
    /// - Complexity: `O(projections · k · Nmax)` to draw the entries.
    public init(projectedLength: Int, maxSequenceLength: Int, perHeadProjections: Int? = nil,
                sharedKeyValue: Bool = false, seed: UInt64 = 0,
                causal: Bool = false, scale: Float? = nil) throws {
        let count = perHeadProjections ?? 1
        try LinformerAttention.checkSizes(k: projectedLength, nmax: maxSequenceLength, projections: count)
        var rng = SeededGenerator(seed: seed)
        let n = count * projectedLength * maxSequenceLength
        let sigma = 1 / Double(projectedLength).squareRoot()
        func draw() -> [Float] { (0..<n).map { _ in Float(rng.nextGaussian() * sigma) } }
        let e = draw()
        try self.init(e: e, f: sharedKeyValue ? nil : draw(), projectedLength: projectedLength,
                      maxSequenceLength: maxSequenceLength, projectionCount: count,
                      causal: causal, scale: scale)
    }

    /// Given projections: `e` (and `f`, or `nil` for `E = F`) hold `projectionCount · k · Nmax`
    /// floats, `[projectionCount, k, Nmax]` row-major.
    ///
    /// - Throws: ``AttentionError/invalidParameter(_:)`` for `k`, `Nmax` or
    ///   `projectionCount` below 1, ``AttentionError/shapeMismatch(_:)`` when `e` or `f`
    ///   has the wrong number of elements.
    public init(e: [Float], f: [Float]?, projectedLength: Int, maxSequenceLength: Int,
                projectionCount: Int = 1, causal: Bool = false, scale: Float? = nil) throws {
        try LinformerAttention.checkSizes(k: projectedLength, nmax: maxSequenceLength, projections: projectionCount)
        let expected = projectionCount * projectedLength * maxSequenceLength
        for (name, array) in [("E", e), ("F", f ?? e)] where array.count != expected {
            throw AttentionError.shapeMismatch(
                "projection \(name) has \(array.count) elements, expected [projections \(projectionCount), k \(projectedLength), Nmax \(maxSequenceLength)] = \(expected)")
        }
        self.projectedLength = projectedLength
        self.maxSequenceLength = maxSequenceLength
        self.projectionCount = projectionCount
        self.e = e
        self.f = f
        self.causal = causal
        self.scale = scale
    }

    private static func checkSizes(k: Int, nmax: Int, projections: Int) throws {
        guard k >= 1 else {
            throw AttentionError.invalidParameter("Linformer projected length k must be at least 1, got \(k)")
        }
        guard nmax >= 1 else {
            throw AttentionError.invalidParameter("Linformer maxSequenceLength must be at least 1, got \(nmax)")
        }
        guard projections >= 1 else {
            throw AttentionError.invalidParameter("Linformer projection count must be at least 1, got \(projections)")
        }
        try checkLimit(k, "projected length k", variant: "Linformer")
        try checkLimit(nmax, "maxSequenceLength", variant: "Linformer")
        try checkFloatAllocation(projections, k, nmax, option: "Linformer projections [projections, k, Nmax]")
    }

    public var name: String { "linformer" }

    public func validate(_ shape: AttentionShape) throws {
        try shape.check()
        try shape.checkHeadDims(limit: DenseAttention.maxHeadDim, variant: "Linformer attention")
        try checkScale(scale)
        guard !causal else {
            throw AttentionError.unsupported(
                "Linformer has no causal form: projecting along the sequence mixes future keys into every projected key")
        }
        guard shape.keyLength <= maxSequenceLength else {
            throw AttentionError.unsupported(
                "keyLength \(shape.keyLength) exceeds the Linformer projections' maxSequenceLength \(maxSequenceLength)")
        }
        guard projectionCount == 1 || projectionCount == shape.kvHeads else {
            throw AttentionError.shapeMismatch(
                "Linformer has \(projectionCount) per-head projections, the problem has kvHeads \(shape.kvHeads)")
        }
        // The projected keys and values, and the dense problem over them.
        try checkFloatAllocation(shape.batch, shape.kvHeads, projectedLength, shape.headDim + shape.valueDim,
                                 option: "Linformer projected keys and values [B, Hkv, k, D + Dv]")
        try projectedShape(shape).check()
    }

    /// The dense problem over the projected keys.
    private func projectedShape(_ shape: AttentionShape) -> AttentionShape {
        var projected = shape
        projected.keyLength = projectedLength
        return projected
    }

    public func cost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        let threads = try threadCount(threads)
        try validate(shape)
        let k = Double(projectedLength), widths = Double(shape.headDim + shape.valueDim)
        let projection = 2 * k * Double(shape.keyLength) * widths * Double(shape.batch * shape.kvHeads)
        let attention = 2 * Double(shape.batch * shape.heads * shape.queryLength) * k * widths
        let projectedBytes = shape.batch * shape.kvHeads * projectedLength
            * (shape.headDim + shape.valueDim) * MemoryLayout<Float>.stride
        let gemmWorkers = workerCount(threads: threads, items: (projectedLength + MicroTile.mr - 1) / MicroTile.mr)
        return AttentionCost(
            flops: projection + attention,
            workspaceBytes: projectedBytes + gemmWorkers * Gemm.Workspace.byteCount()
                + TiledSoftmaxAttention.workspaceBytes(shape: projectedShape(shape), threads: threads),
            scoredPairs: shape.batch * shape.heads * shape.queryLength * projectedLength)
    }

    /// 16-bit keys and values are widened as the projection GEMM packs them, 16-bit queries
    /// as the tiled kernel packs them; its one pass writes the output rows: nothing staged.
    func stagedOperands(_ shape: AttentionShape) -> (query: Bool, output: Bool) { (false, false) }

    public func attend(query: ActivationView, key: ActivationView, value: ActivationView,
                       output: MutableActivationView, logSumExp: MutableStridedView?,
                       keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws {
        try withCheckedCall(query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                            keyLengths: keyLengths, workspace: workspace, threads: threads, scale: scale) { call in
        let (shape, scale, threads) = (call.shape, call.scale, call.threadCount)
        let (k, v) = (call.k, call.v)
        let kProj = projectedLength, nmax = maxSequenceLength
        // The projected keys and values in workspace scratch (zero: items without keys).
        withScratchTensor(SIMD4(shape.batch, shape.kvHeads, kProj, shape.headDim), zeroed: true) { kOut in
        withScratchTensor(SIMD4(shape.batch, shape.kvHeads, kProj, shape.valueDim), zeroed: true) { vOut in

        // K' = E[:, :L] K[:L] and V' = F[:, :L] V[:L] for all 2·B·Hkv products. The k rows
        // of E and F are split into one range per worker (whole MR-row panels); a worker
        // walks the sequence in blocks of KC positions and runs every product on its rows
        // of a block before the next, so each element of E and F is read from memory once
        // per call and then from L2 (E is 16 MiB at Nmax = 16K: reading it once per head
        // would stream 256 MiB per call). Each product sums its blocks in order, as one
        // GEMM call would: results do not depend on the split.
        let products = 2 * shape.batch * shape.kvHeads
        let panels = (kProj + MicroTile.mr - 1) / MicroTile.mr
        let workers = workerCount(threads: threads, items: panels)
        let perHead = projectionCount > 1
        let block = Gemm.Blocking.standard.kc
        var longest = 0
        for b in 0..<shape.batch { longest = max(longest, call.keyEnd(b)) }
        WorkspaceArena.withWorkspaces(workers: workers, layout: { Gemm.Workspace(carving: &$0) }) { spaces in
        e.withUnsafeBufferPointer { e in (f ?? []).withUnsafeBufferPointer { f in
        do {
            let eBase = UncheckedSendable(e.baseAddress!)
            let fBase = UncheckedSendable(self.f == nil ? e.baseAddress! : f.baseAddress!)
            parallelForEach(items: workers, threads: workers) { range, worker in
                let firstRow = range * panels / workers * MicroTile.mr
                let rows = min(kProj, (range + 1) * panels / workers * MicroTile.mr) - firstRow
                guard rows > 0 else { return }
                for start in stride(from: 0, to: max(longest, 1), by: block) {
                    for product in 0..<products {
                        let isValue = product % 2 == 1
                        let b = product / 2 / shape.kvHeads, hk = product / 2 % shape.kvHeads
                        let valid = keyLengths?[b] ?? shape.keyLength
                        guard start < valid || start == 0 else { continue }
                        let projection = (isValue ? fBase.value : eBase.value)
                            + (perHead ? hk * kProj * nmax : 0) + firstRow * nmax
                        let source = isValue ? v : k
                        let target = isValue ? vOut : kOut
                        let width = isValue ? shape.valueDim : shape.headDim
                        Gemm.multiply(m: rows, n: width, depth: min(block, max(0, valid - start)),
                                      a: MatrixOperand(base: projection + start, rowStride: nmax, columnStride: 1),
                                      packA: false,
                                      b: .matrix(MatrixOperand(source, b: b, h: hk, firstRow: start)),
                                      c: target.row(b, hk, firstRow), ldc: width, accumulate: start > 0,
                                      workspace: spaces[worker])
                    }
                }
            }
        } } }
        }

        let projected = projectedShape(shape)
        do {
            TiledSoftmaxAttention.run(shape: projected, scale: scale, threads: threads,
                                      q: call.q, k: kOut.readOnly, v: vOut.readOnly, o: call.o, lse: call.lse) { b, _ in
                // A batch item without valid keys has no projected key either.
                IntervalMask(queryLength: projected.queryLength, keyLength: kProj, causal: false,
                             keyEnd: (keyLengths?[b] ?? shape.keyLength) == 0 ? 0 : kProj)
            }
        }
        } }
        }
    }
}

/// The gradients of a loss with respect to ``LinformerAttention``'s projections (see
/// ``LinformerAttention/parameterGradients(query:key:value:result:outputGradient:keyLengths:threads:)``).
public struct LinformerParameterGradients: Sendable, Equatable {
    /// `∂L/∂E`, shaped like ``LinformerAttention/e`` (`[projectionCount, k, Nmax]`); with
    /// `E = F` (``LinformerAttention/f`` `nil`) the gradient of the shared matrix
    /// (`∂L/∂E + ∂L/∂F`).
    public var e: [Float]
    /// `∂L/∂F`, shaped like ``LinformerAttention/f``; `nil` when `E = F`.
    public var f: [Float]?
}

extension LinformerAttention: OperandWideningBackward {
    /// `dK`, `dV` rows are each written once (the transposed projection's chunks), so 16-bit
    /// ones are rounded as they are written; a 16-bit `dQ`, summed over the projected key
    /// blocks by the tiled backward, is staged.
    static func stagedGradients(_ shape: AttentionShape) -> (query: Bool, keys: Bool) { (true, false) }

    /// 16-bit keys and values are widened as the projection GEMM packs them, queries,
    /// outputs and `dO` as the tiled backward packs them.
    func widenedOperandsBackward(_ shape: AttentionShape, threads: Int, q: TensorView, k: TensorView,
                                 v: TensorView, o: TensorView, lse: TensorView, dO: TensorView,
                                 dQ: MutableTensorView, dK: MutableTensorView, dV: MutableTensorView,
                                 keyLengths: [Int]?) throws {
        backward(shape: shape, scale: scale ?? 1 / Float(shape.headDim).squareRoot(), threads: threads,
                 keyLengths: keyLengths, q: q, k: k, v: v, o: o, lse: lse, dO: dO, dQ: dQ, dK: dK, dV: dV,
                 parameters: nil)
    }

    /// The backward through the projections (KernelDocs/Linformer.md, "Backward"): `K' = E K`,
    /// `V' = F V` recomputed on the GEMM, the dense backward (``TiledSoftmaxBackward``)
    /// over the `k` projected keys gives `dQ`, `dK'`, `dV'`, then `dK = Eᵀ dK'`,
    /// `dV = Fᵀ dV'` on the GEMM (keys past `keyLengths[b]` get 0). The projections are
    /// parameters: their gradients come from
    /// ``parameterGradients(query:key:value:result:outputGradient:keyLengths:threads:)``.
    ///
    /// ```
    /// // naive reference, for each b, hk (projection p), L = keyLengths?[b] ?? Nk:
    /// dK', dV', dQ = dense softmax backward over K' = E[:, :L] K, V' = F[:, :L] V
    /// dK[b, hk, j] = Σ_r E[r, j] dK'[r],   dV[b, hk, j] = Σ_r F[r, j] dV'[r]     j < L
    /// ∂L/∂E[p][r, j] += dot(dK'[r], k[b, hk, j]),  ∂L/∂F[p][r, j] += dot(dV'[r], v[b, hk, j])
    /// ```
    ///
    /// - Complexity: the dense backward over `k` keys (`2.5 ×` its forward) plus
    ///   `4 · k · L · (D + Dv)` FLOPs per key/value head for the projections and their
    ///   transposes (`2 ·` that again with the parameter gradients). Workspace: the
    ///   projected keys, values and their gradients (`8 · B · Hkv · k · (D + Dv)` bytes),
    ///   the dense backward's tiles and GEMM buffers per thread; independent of `N`.
    public func gradients(query: StridedView, key: StridedView, value: StridedView, output: StridedView,
                          logSumExp: StridedView, outputGradient: StridedView,
                          dQuery: MutableStridedView, dKey: MutableStridedView, dValue: MutableStridedView,
                          keyLengths: [Int]?, workspace: AttentionWorkspace?, threads: Int?) throws {
        try withCheckedGradientCall(query: query, key: key, value: value, output: output, logSumExp: logSumExp,
                                    outputGradient: outputGradient, dQuery: dQuery, dKey: dKey, dValue: dValue,
                                    keyLengths: keyLengths, workspace: workspace, threads: threads,
                                    scale: scale) { shape, scale in
            backward(shape: shape, scale: scale, threads: try threadCount(threads), keyLengths: keyLengths,
                     q: query.kernel, k: key.kernel, v: value.kernel, o: output.kernel, lse: logSumExp.kernel,
                     dO: outputGradient.kernel, dQ: dQuery.kernel, dK: dKey.kernel, dV: dValue.kernel,
                     parameters: nil)
        }
    }

    /// `∂L/∂E` and `∂L/∂F` through the call that gave `result` (and `dQ`, `dK`, `dV`, which
    /// the same pass computes).
    ///
    /// - Complexity: the backward's plus `2 · k · L · (D + Dv)` FLOPs per key/value head;
    ///   the parameter sums run in a fixed order (bitwise identical for every thread count).
    public func parameterGradients(query: Tensor, key: Tensor, value: Tensor, result: AttentionResult,
                                   outputGradient: Tensor, keyLengths: [Int]? = nil, threads: Int? = nil)
        throws -> (inputs: AttentionGradients, parameters: LinformerParameterGradients) {
        var de = [Float](), df = [Float]()
        let inputs = try withParameterGradientCall(query: query, key: key, value: value, result: result,
                                                   outputGradient: outputGradient, keyLengths: keyLengths,
                                                   threads: threads, scale: scale) { c in
            // Allocated after the call's checks.
            de = [Float](repeating: 0, count: e.count)
            df = [Float](repeating: 0, count: e.count)
            de.withUnsafeMutableBufferPointer { de in df.withUnsafeMutableBufferPointer { df in
                backward(shape: c.shape, scale: c.scale, threads: c.threads, keyLengths: keyLengths,
                         q: c.q, k: c.k, v: c.v, o: c.o, lse: c.lse, dO: c.dO, dQ: c.dQ, dK: c.dK, dV: c.dV,
                         parameters: (de.baseAddress!, df.baseAddress!))
            } }
        }
        if f == nil { for n in de.indices { de[n] += df[n] } }
        return (inputs, LinformerParameterGradients(e: de, f: f == nil ? nil : df))
    }

    public func backwardCost(_ shape: AttentionShape, threads: Int?) throws -> AttentionCost {
        let forward = try cost(shape, threads: threads)
        var projected = shape
        projected.keyLength = projectedLength
        let threads = try threadCount(threads)
        let k = Double(projectedLength), widths = Double(shape.headDim + shape.valueDim)
        let projections = 4 * k * Double(shape.keyLength) * widths * Double(shape.batch * shape.kvHeads)
        let attention = 2 * Double(shape.batch * shape.heads * shape.queryLength) * k * widths
        let projectedBytes = 2 * shape.batch * shape.kvHeads * projectedLength
            * (shape.headDim + shape.valueDim) * MemoryLayout<Float>.stride
        let workers = workerCount(threads: threads, items: shape.batch * shape.kvHeads)
        return AttentionCost(
            flops: projections + 2.5 * attention,
            workspaceBytes: projectedBytes + workers * Gemm.Workspace.byteCount()
                + max(TiledSoftmaxBackward.workspaceBytes(shape: projected, threads: threads),
                      workers * LinformerAttention.transposeChunk * max(shape.headDim, shape.valueDim)
                          * MemoryLayout<Float>.stride),
            scoredPairs: forward.scoredPairs)
    }

    /// Rows of `dK`, `dV` per GEMM of the transposed projection.
    static let transposeChunk = 256

    private func backward(shape: AttentionShape, scale: Float, threads: Int, keyLengths: [Int]?,
                          q: TensorView, k: TensorView, v: TensorView, o: TensorView, lse: TensorView,
                          dO: TensorView, dQ: MutableTensorView, dK: MutableTensorView, dV: MutableTensorView,
                          parameters: (e: UnsafeMutablePointer<Float>, f: UnsafeMutablePointer<Float>)?) {
        let kProj = projectedLength, nmax = maxSequenceLength, perHead = projectionCount > 1
        let items = shape.batch * shape.kvHeads
        let workers = workerCount(threads: threads, items: items)
        var projected = shape
        projected.keyLength = kProj
        withScratchTensor(SIMD4(shape.batch, shape.kvHeads, kProj, shape.headDim), zeroed: true) { kOut in
        withScratchTensor(SIMD4(shape.batch, shape.kvHeads, kProj, shape.valueDim), zeroed: true) { vOut in
        withScratchTensor(SIMD4(shape.batch, shape.kvHeads, kProj, shape.headDim), zeroed: true) { dkOut in
        withScratchTensor(SIMD4(shape.batch, shape.kvHeads, kProj, shape.valueDim), zeroed: true) { dvOut in
        e.withUnsafeBufferPointer { e in (self.f ?? []).withUnsafeBufferPointer { f in
            let eBase = UncheckedSendable(e.baseAddress!)
            let fBase = UncheckedSendable(self.f == nil ? e.baseAddress! : f.baseAddress!)
            func projection(_ isValue: Bool, _ hk: Int) -> UnsafePointer<Float> {
                (isValue ? fBase.value : eBase.value) + (perHead ? hk * kProj * nmax : 0)
            }
            // K' = E[:, :L] K[:L], V' = F[:, :L] V[:L], one (batch item, head) per work item.
            WorkspaceArena.withWorkspaces(workers: workers, layout: { Gemm.Workspace(carving: &$0) }) { spaces in
                parallelForEach(items: items, threads: workers) { item, worker in
                    let b = item / shape.kvHeads, hk = item % shape.kvHeads
                    let valid = keyLengths?[b] ?? shape.keyLength
                    guard valid > 0 else { return }
                    for isValue in [false, true] {
                        let source = isValue ? v : k, target = isValue ? vOut : kOut
                        let width = isValue ? shape.valueDim : shape.headDim
                        Gemm.multiply(m: kProj, n: width, depth: valid,
                                      a: MatrixOperand(base: projection(isValue, hk), rowStride: nmax, columnStride: 1),
                                      packA: false,
                                      b: .matrix(MatrixOperand(source, b: b, h: hk, firstRow: 0)),
                                      c: target.row(b, hk, 0), ldc: width, workspace: spaces[worker])
                    }
                }
            }
            TiledSoftmaxBackward.run(shape: projected, scale: scale, threads: threads,
                                     q: q, k: kOut.readOnly, v: vOut.readOnly, o: o, lse: lse, dO: dO,
                                     dQ: dQ, dK: dkOut, dV: dvOut) { b, _ in
                IntervalMask(queryLength: projected.queryLength, keyLength: kProj, causal: false,
                             keyEnd: (keyLengths?[b] ?? shape.keyLength) == 0 ? 0 : kProj)
            }
            // dK = E[:, :L]ᵀ dK', dV = F[:, :L]ᵀ dV' in chunks of rows; 0 past L.
            let chunk = LinformerAttention.transposeChunk, wide = max(shape.headDim, shape.valueDim)
            WorkspaceArena.withWorkspaces(workers: workers, layout: { carver -> (Gemm.Workspace, UnsafeMutablePointer<Float>) in
                (Gemm.Workspace(carving: &carver), carver.take(chunk * wide))
            }) { spaces in
                parallelForEach(items: items, threads: workers) { item, worker in
                    let b = item / shape.kvHeads, hk = item % shape.kvHeads
                    let valid = keyLengths?[b] ?? shape.keyLength
                    let (space, tile) = spaces[worker]
                    for isValue in [false, true] {
                        let gradient = isValue ? dvOut : dkOut, target = isValue ? dV : dK
                        let width = isValue ? shape.valueDim : shape.headDim
                        for start in stride(from: 0, to: valid, by: chunk) {
                            let count = min(chunk, valid - start)
                            Gemm.multiply(m: count, n: width, depth: kProj,
                                          a: MatrixOperand(base: projection(isValue, hk) + start, rowStride: 1,
                                                           columnStride: nmax),
                                          packA: false,
                                          b: .matrix(MatrixOperand(base: gradient.readOnly.row(b, hk, 0),
                                                                   rowStride: width, columnStride: 1)),
                                          c: tile, ldc: width, workspace: space)
                            // Each row is written once: a 16-bit gradient is rounded here.
                            for j in 0..<count { target.storeRow(b, hk, start + j, from: tile + j * width, count: width) }
                        }
                        for j in valid..<shape.keyLength { target.zeroRow(b, hk, j, count: width) }
                    }
                }
            }
            // ∂L/∂E[p] += dK' Kᵀ, ∂L/∂F[p] += dV' Vᵀ over the items in order (one writer per
            // projection row block: every item adds into the same matrix).
            guard let parameters else { return }
            WorkspaceArena.withWorkspaces(workers: 1, layout: { Gemm.Workspace(carving: &$0) }) { spaces in
                for item in 0..<items {
                    let b = item / shape.kvHeads, hk = item % shape.kvHeads
                    let valid = keyLengths?[b] ?? shape.keyLength
                    guard valid > 0 else { continue }
                    for isValue in [false, true] {
                        let gradient = isValue ? dvOut : dkOut, source = isValue ? v : k
                        let width = isValue ? shape.valueDim : shape.headDim
                        let target = (isValue ? parameters.f : parameters.e) + (perHead ? hk * kProj * nmax : 0)
                        Gemm.multiply(m: kProj, n: valid, depth: width,
                                      a: MatrixOperand(base: gradient.readOnly.row(b, hk, 0), rowStride: width,
                                                       columnStride: 1),
                                      packA: false,
                                      b: .matrix(MatrixOperand(base: source.row(b, hk, 0), rowStride: source.strides[3],
                                                               columnStride: source.strides[2])),
                                      c: target, ldc: nmax, accumulate: true, workspace: spaces[0])
                    }
                }
            }
        } }
        } } } }
    }
}
