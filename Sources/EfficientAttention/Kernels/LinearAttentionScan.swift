/// The linear-attention scan: `o_i = φ(q_i)ᵀ S_i / (φ(q_i)ᵀ z_i + ε)` with
/// `S = Σ_j φ(k_j) v_jᵀ`, `z = Σ_j φ(k_j)` over all keys or over the causal prefix, every
/// product on the shared GEMM kernel.
///
/// For one (batch item, query head):
///
///     non-causal:  for each chunk of keys:   stabilise, S += Φ_Kᵀ V, z += Σ rows of Φ_K
///                  for each chunk of queries: O = Φ_Q S, den = Φ_Q z          (S packed once)
///     causal:      for each chunk of queries [i0, i1) with its keys [i0 + off, i1 + off):
///                  stabilise the chunk's keys (rescaling S, z if the stabiliser grows)
///                  O = Φ_Q S, den = Φ_Q z                                     (the prefix)
///                  P = mask(Φ_Q Φ_Kᵀ), O += P V, den += row sums of P         (within the chunk)
///                  S += Φ_Kᵀ V, z += Σ rows of Φ_K                            (running state)
///     o = O / (den + ε),  lse = log den + (query stabiliser) + (key stabiliser)
///
/// Key features come from the map divided by per-row factors `exp(logScale_j)`; the scan
/// keeps one running key stabiliser `c` (the largest `logScale` absorbed so far, like the
/// running max of an online softmax): each chunk's rows are multiplied by
/// `exp(logScale_j − c)` and the state is rescaled by `exp(c_old − c)` when `c` grows.
/// Without the `ε` the result does not depend on `c` at all; `ε` is added to the stabilised
/// denominator. The recurrent (decoding) form is this causal loop over chunks of one token
/// with the state kept between calls.
enum LinearAttentionScan {
    /// Rows per chunk: queries and keys of the causal loop, keys and queries of the non-causal passes.
    static let causalChunk = 64
    static let chunk = 256

    /// The running state of one (batch item, head): `S` (`m × Dv`, rows `Dv` apart),
    /// `z` (`m`), and the key stabiliser `c` (`-infinity` when empty).
    struct State {
        var s: UnsafeMutablePointer<Float>
        var z: UnsafeMutablePointer<Float>
        var c: UnsafeMutablePointer<Float>

        func reset(m: Int, dv: Int) {
            s.update(repeating: 0, count: m * dv)
            z.update(repeating: 0, count: m)
            c.pointee = -.infinity
        }

        /// Makes this state a copy of `other`.
        func assign(_ other: State, m: Int, dv: Int) {
            s.update(from: other.s, count: m * dv)
            z.update(from: other.z, count: m)
            c.pointee = other.c.pointee
        }

        static func floatCount(m: Int, dv: Int) -> Int { m * dv + m + 1 }
    }

    /// One worker's scratch memory. Every buffer is written before it is read (the state by
    /// `reset`), so no zero fill: a one-token recurrent step touches only the rows it uses.
    struct Workspace {
        let m: Int, mPad: Int, dv: Int
        let keyFeatures, queryFeatures, keyLogScale, queryLogScale, denominators, products,
            packedState, sink: UnsafeMutablePointer<Float>
        /// A chunk's 16-bit query or key rows widened (`rows × D`, rows `D` apart).
        let rowStage: UnsafeMutablePointer<Float>
        /// A chunk's output rows (`rows × Dv`, rows `Dv` apart) when the output is 16-bit
        /// or its elements are not contiguous (``HeadInput/outputRows(start:space:)``).
        let outputStage: UnsafeMutablePointer<Float>
        let state: State
        let gemm: Gemm.Workspace

        init(carving carver: inout WorkspaceCarver, m: Int, d: Int, dv: Int) {
            self.m = m
            self.dv = dv
            mPad = roundUp(m, 16)
            let rows = max(LinearAttentionScan.chunk, LinearAttentionScan.causalChunk)
            keyFeatures = carver.take(rows * mPad)
            queryFeatures = carver.take(rows * mPad)
            keyLogScale = carver.take(rows)
            queryLogScale = carver.take(rows)
            denominators = carver.take(rows)
            products = carver.take(LinearAttentionScan.causalChunk * LinearAttentionScan.causalChunk)
            packedState = carver.take(Gemm.PackedB.floatCount(depth: m, columns: dv))
            state = State(s: carver.take(m * dv), z: carver.take(m), c: carver.take(1))
            sink = carver.take(1)
            rowStage = carver.take(rows * d)
            outputStage = carver.take(rows * dv)
            gemm = Gemm.Workspace(carving: &carver)
        }

        static func byteCount(m: Int, d: Int, dv: Int) -> Int {
            WorkspaceCarver.bytes { _ = Workspace(carving: &$0, m: m, d: d, dv: dv) }
        }
    }

    /// Where one head's rows live.
    struct HeadInput {
        var q: TensorView, k: TensorView, v: TensorView
        var b: Int, h: Int, hk: Int
        var o: MutableTensorView, lse: MutableTensorView

        /// Where a chunk's output rows from `start` are computed (the GEMM writes them, the
        /// causal loop adds to them, ``LinearAttentionScan/finish(_:start:count:epsilon:space:state:)``
        /// divides them): the output's own rows when they are `Float` with contiguous
        /// elements, else the workspace's output stage, which `finish` rounds into the
        /// output row by row. No copy of the whole output is ever made.
        @inline(__always)
        func outputRows(start: Int, space: Workspace) -> (base: UnsafeMutablePointer<Float>, ld: Int) {
            stagesOutput ? (space.outputStage, space.dv) : (o.row(b, h, start), o.strides[2])
        }

        var stagesOutput: Bool { o.precision != .float32 || o.strides[3] != 1 }
    }

    /// The scan for one (batch item, query head).
    ///
    /// - Parameters:
    ///   - keyCount: valid keys (`keyLengths[b]`, or `Nk`).
    ///   - offset: `Nk − Nq` for the causal rule `j ≤ i + offset` (`Nk` the full key length).
    ///   - state: reset first for a batch call; carried over for the recurrent form.
    static func scanHead<Map: FeatureMap>(
        map: Map, causal: Bool, epsilon: Float, d: Int, dv: Int,
        queryCount: Int, keyCount: Int, offset: Int,
        input: HeadInput, state: State, space: Workspace
    ) {
        if !causal {
            absorbKeys(map, input, 0..<keyCount, by: chunk, d: d, space: space, state: state)
            let packedState = Gemm.PackedB.pack(MatrixOperand(base: state.s, rowStride: dv, columnStride: 1),
                                                depth: space.m, columns: dv, into: space.packedState)
            for start in stride(from: 0, to: queryCount, by: chunk) {
                let count = min(chunk, queryCount - start)
                queryFeatures(map, input, start: start, count: count, d: d, space: space)
                readState(input, start: start, count: count, b: .packed(packedState), space: space, state: state)
                finish(input, start: start, count: count, epsilon: epsilon, space: space, state: state)
            }
            return
        }
        // Keys every query sees (Nk > Nq): the prefix before the first query.
        let prefix = min(max(offset, 0), keyCount)
        absorbKeys(map, input, 0..<prefix, by: causalChunk, d: d, space: space, state: state)
        causalQueries(map: map, epsilon: epsilon, d: d, queries: 0..<queryCount, keyFloor: prefix,
                      keyCount: keyCount, offset: offset, input: input, state: state, space: space)
    }

    /// Absorbs keys `keys` into `state`, `step` at a time.
    @inline(__always)
    static func absorbKeys<Map: FeatureMap>(_ map: Map, _ input: HeadInput, _ keys: Range<Int>, by step: Int, d: Int,
                                            space: Workspace, state: State) {
        for start in stride(from: keys.lowerBound, to: keys.upperBound, by: step) {
            let count = min(step, keys.upperBound - start)
            keyFeatures(map, input, start: start, count: count, d: d, space: space, state: state)
            addKeys(input, start: start, count: count, space: space, state: state)
        }
    }

    /// The keys query chunk `start ..< start + count` adds within the causal loop: from
    /// `start + offset` (at least `keyFloor`) to `start + count + offset`, within `keyCount`.
    @inline(__always)
    static func chunkKeys(start: Int, count: Int, keyFloor: Int, keyCount: Int, offset: Int) -> Range<Int> {
        let keyStart = min(max(start + offset, keyFloor), keyCount)
        return keyStart..<min(max(start + count + offset, keyStart), keyCount)
    }

    /// The causal loop over `queries`, in chunks of ``causalChunk`` from its first query:
    /// `state` holds every key before `keyFloor` (and no other); each chunk reads the state,
    /// adds its own keys' masked products and then absorbs them.
    static func causalQueries<Map: FeatureMap>(
        map: Map, epsilon: Float, d: Int, queries: Range<Int>, keyFloor: Int, keyCount: Int, offset: Int,
        input: HeadInput, state: State, space: Workspace
    ) {
        let dv = space.dv
        for start in stride(from: queries.lowerBound, to: queries.upperBound, by: causalChunk) {
            let count = min(causalChunk, queries.upperBound - start)
            let chunkKeys = chunkKeys(start: start, count: count, keyFloor: keyFloor, keyCount: keyCount, offset: offset)
            let keyStart = chunkKeys.lowerBound
            let keys = chunkKeys.count
            if keys > 0 {
                keyFeatures(map, input, start: keyStart, count: keys, d: d, space: space, state: state)
            }
            queryFeatures(map, input, start: start, count: count, d: d, space: space)
            readState(input, start: start, count: count,
                      b: .matrix(MatrixOperand(base: state.s, rowStride: dv, columnStride: 1)),
                      space: space, state: state)
            if keys > 0 {
                intraChunk(input, queryStart: start, queryCount: count, keyStart: keyStart, keyCount: keys,
                           offset: offset, space: space)
                addKeys(input, start: keyStart, count: keys, space: space, state: state)
            }
            finish(input, start: start, count: count, epsilon: epsilon, space: space, state: state)
        }
    }

    /// Features of keys `start ..< start + count` into `keyFeatures`, stabilised to the
    /// state's running `c` (which grows, rescaling the state, if the chunk needs it).
    @inline(__always)
    static func keyFeatures<Map: FeatureMap>(_ map: Map, _ input: HeadInput, start: Int, count: Int, d: Int,
                                             space: Workspace, state: State) {
        let k = input.k, v = input.v
        // The chunk's key and value rows are loaded first with independent loads, so that
        // their cache misses overlap (out of cache the feature map's own loads would
        // wait one after another behind its exponentials, and the GEMM's behind its FMAs).
        let rows = PositionRun(start: start, count: count)
        k.touch(input.b, input.hk, rows: rows, width: d, sink: space.sink)
        v.touch(input.b, input.hk, rows: rows, width: space.dv, sink: space.sink)
        apply(map, k, input.b, input.hk, rows: rows, d: d, output: space.keyFeatures, space: space,
              logScale: space.keyLogScale)
        var top = -Float.infinity
        for j in 0..<count { top = max(top, space.keyLogScale[j]) }
        let old = state.c.pointee
        guard top > -.infinity else { return }
        if top > old {
            if old > -.infinity {
                let factor = expf(old - top)
                scale(state.s, count: space.m * space.dv, by: factor)
                scale(state.z, count: space.m, by: factor)
            } else {
                state.s.update(repeating: 0, count: space.m * space.dv)
                state.z.update(repeating: 0, count: space.m)
            }
            state.c.pointee = top
        }
        let c = state.c.pointee
        for j in 0..<count where space.keyLogScale[j] != c {
            scale(space.keyFeatures + j * space.mPad, count: space.m, by: expf(space.keyLogScale[j] - c))
        }
    }

    /// Features of queries `start ..< start + count` into `queryFeatures`.
    @inline(__always)
    static func queryFeatures<Map: FeatureMap>(_ map: Map, _ input: HeadInput, start: Int, count: Int, d: Int,
                                               space: Workspace) {
        let q = input.q, o = input.o
        // The chunk's query rows, and the output rows the GEMM is about to write, loaded
        // first for the reason given in `keyFeatures`.
        let rows = PositionRun(start: start, count: count)
        q.touch(input.b, input.h, rows: rows, width: d, sink: space.sink)
        o.touch(input.b, input.h, rows: rows, width: space.dv, sink: space.sink)
        apply(map, q, input.b, input.h, rows: rows, d: d, output: space.queryFeatures, space: space,
              logScale: space.queryLogScale)
    }

    /// The feature map of rows `rows` of head `(b, h)` of `x`: read in place, or (16-bit)
    /// widened into the workspace's row stage first (the map's results do not depend on
    /// the input's strides).
    @inline(__always)
    static func apply<Map: FeatureMap>(_ map: Map, _ x: TensorView, _ b: Int, _ h: Int, rows: PositionRun, d: Int,
                                       output: UnsafeMutablePointer<Float>, space: Workspace,
                                       logScale: UnsafeMutablePointer<Float>) {
        let source = x.floatRows(b, h, rows: rows, width: d, stage: space.rowStage)
        map.apply(source.base, rows: rows.count, rowStride: source.rowStride, columnStride: source.columnStride,
                  headDim: d, output: output, outputStride: space.mPad, logScale: logScale)
    }

    /// `S += Φ_Kᵀ V`, `z += Σ_j Φ_K[j]` for the chunk in `keyFeatures`.
    @inline(__always)
    static func addKeys(_ input: HeadInput, start: Int, count: Int, space: Workspace, state: State) {
        let v = input.v
        Gemm.multiply(m: space.m, n: space.dv, depth: count,
                      a: MatrixOperand(base: space.keyFeatures, rowStride: 1, columnStride: space.mPad), packA: false,
                      b: .matrix(MatrixOperand(v, b: input.b, h: input.hk, firstRow: start)),
                      c: state.s, ldc: space.dv, accumulate: true, workspace: space.gemm)
        for j in 0..<count {
            let row = space.keyFeatures + j * space.mPad
            var f = 0
            while f + 16 <= space.m { store16(load16(state.z + f) + load16(row + f), state.z + f); f += 16 }
            while f < space.m { state.z[f] += row[f]; f += 1 }
        }
    }

    /// `O = Φ_Q S` into the output rows, `den = Φ_Q z`.
    @inline(__always)
    static func readState(_ input: HeadInput, start: Int, count: Int, b: Gemm.OperandB,
                          space: Workspace, state: State) {
        let out = input.outputRows(start: start, space: space)
        Gemm.multiply(m: count, n: space.dv, depth: space.m,
                      a: MatrixOperand(base: space.queryFeatures, rowStride: space.mPad, columnStride: 1), packA: false,
                      b: b, c: out.base, ldc: out.ld, workspace: space.gemm)
        for i in 0..<count {
            space.denominators[i] = dot(space.queryFeatures + i * space.mPad, 1, state.z, 1, count: space.m)
        }
    }

    /// Within a causal chunk: `P = Φ_Q Φ_Kᵀ` masked to `j ≤ i + offset`, `O += P V`,
    /// `den += row sums of P`.
    @inline(__always)
    static func intraChunk(_ input: HeadInput, queryStart: Int, queryCount: Int, keyStart: Int, keyCount: Int,
                           offset: Int, space: Workspace) {
        let ld = causalChunk, p = space.products
        Gemm.multiply(m: queryCount, n: keyCount, depth: space.m,
                      a: MatrixOperand(base: space.queryFeatures, rowStride: space.mPad, columnStride: 1), packA: false,
                      b: .matrix(MatrixOperand(base: space.keyFeatures, rowStride: 1, columnStride: space.mPad)),
                      c: p, ldc: ld, workspace: space.gemm)
        for ii in 0..<queryCount {
            // Keys keyStart + jj visible iff jj ≤ queryStart + ii + offset − keyStart.
            let visible = min(keyCount, max(0, queryStart + ii + offset - keyStart + 1))
            let row = p + ii * ld
            for jj in visible..<keyCount { row[jj] = 0 }
            var sum: Float = 0
            for jj in 0..<visible { sum += row[jj] }
            space.denominators[ii] += sum
        }
        let out = input.outputRows(start: queryStart, space: space)
        Gemm.multiply(m: queryCount, n: space.dv, depth: keyCount,
                      a: MatrixOperand(base: p, rowStride: ld, columnStride: 1), packA: false,
                      b: .matrix(MatrixOperand(input.v, b: input.b, h: input.hk, firstRow: keyStart)),
                      c: out.base, ldc: out.ld, accumulate: true, workspace: space.gemm)
    }

    /// `o = O / (den + ε)`, `lse = log den + query stabiliser + key stabiliser`
    /// (`-infinity` where `den ≤ 0`, which includes rows with no visible key; their `O` is 0).
    /// Staged rows are rounded into the output as they are finished.
    @inline(__always)
    static func finish(_ input: HeadInput, start: Int, count: Int, epsilon: Float, space: Workspace, state: State) {
        let o = input.o, lse = input.lse
        let c = state.c.pointee
        let out = input.outputRows(start: start, space: space), staged = input.stagesOutput
        for i in 0..<count {
            let den = space.denominators[i]
            let row = out.base + i &* out.ld
            let inverse = 1 / (den + epsilon)
            for x in 0..<space.dv { row[x] *= inverse }
            if staged { o.storeRow(input.b, input.h, start + i, from: row, count: space.dv) }
            lse.row(input.b, input.h, start + i)[0] = den > 0 ? logf(den) + space.queryLogScale[i] + c : -.infinity
        }
    }

    @inline(__always)
    static func scale(_ p: UnsafeMutablePointer<Float>, count: Int, by factor: Float) {
        let f = Vec16(repeating: factor)
        var t = 0
        while t + 16 <= count { store16(load16(p + t) * f, p + t); t += 16 }
        while t < count { p[t] *= factor; t += 1 }
    }
}
