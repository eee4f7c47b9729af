/// The backward of the linear-attention scan (KernelDocs/LinearAttention.md, "Backward"):
/// the exact derivative of `o_i = φ(q_i)ᵀ S_i / (φ(q_i)ᵀ z_i + ε)` with every product on
/// the shared GEMM kernel, in chunks of ``chunk`` rows, in `O(m · Dv)` memory per worker.
///
/// With `r_i = 1 / (den_i + ε)`, `dN_i = r_i · dO_i`, `dden_i = −r_i · (dO_i · o_i)`:
///
///     dφ(q_i) = S_i dN_i + z_i dden_i
///     dS_j    = Σ_{i sees j} φ(q_i) dN_iᵀ,    dz_j = Σ_{i sees j} φ(q_i) dden_i
///     dφ(k_j) = dS_j v_j + dz_j,             dv_j = dS_jᵀ φ(k_j)
///
/// then `dq`, `dk` through the map (``DifferentiableFeatureMap``). Causal: a forward pass
/// over query chunks (prefix state `S`, `z`, plus the masked products within the chunk)
/// gives `dQ`; a reverse pass (suffix sums `dS`, `dz`, plus the chunk's masked products)
/// gives `dK`, `dV`. The denominators come from the forward's log-sum-exp
/// (`den_i = exp(lse_i − ℓ_q − c)`), so the reverse pass needs no prefix state.
///
/// Every key feature row is stabilised to one constant `c`, the largest key `logScale` of
/// the batch item (the forward's final stabiliser when not causal); `ε` is added in that
/// frame and the stabilisers are held constant (their derivative is a multiple of `ε`).
/// One work item is one (batch item, key/value head): its query heads run in order and add
/// their parts of `dK`, `dV` in a fixed order, so results do not depend on the thread count.
enum LinearAttentionBackward {
    static let chunk = 64

    struct Workspace {
        let m: Int, mPad: Int, d: Int, dv: Int
        let keyFeatures, queryFeatures, keyLogScale, queryLogScale, dden, dN, masked, products,
            dPhiQ, dPhiK, dX, dVChunk, s, z, dS, dz: UnsafeMutablePointer<Float>
        /// A chunk of 16-bit query or key rows widened to `Float` before the feature map
        /// reads them (``TensorView/floatRows(_:_:rows:width:stage:)``).
        let rowStage: UnsafeMutablePointer<Float>
        let gemm: Gemm.Workspace

        init(carving carver: inout WorkspaceCarver, m: Int, d: Int, dv: Int) {
            self.m = m
            self.d = d
            self.dv = dv
            mPad = roundUp(m, 16)
            let n = LinearAttentionBackward.chunk
            keyFeatures = carver.take(n * mPad)
            queryFeatures = carver.take(n * mPad)
            keyLogScale = carver.take(n)
            queryLogScale = carver.take(n)
            dden = carver.take(n)
            dN = carver.take(n * dv)
            masked = carver.take(n * n)
            products = carver.take(n * n)
            dPhiQ = carver.take(n * mPad)
            dPhiK = carver.take(n * mPad)
            dX = carver.take(n * d)
            dVChunk = carver.take(n * dv)
            s = carver.take(m * dv)
            z = carver.take(m)
            dS = carver.take(m * dv)
            dz = carver.take(m)
            rowStage = carver.take(n * d)
            gemm = Gemm.Workspace(carving: &carver)
        }

        static func byteCount(m: Int, d: Int, dv: Int) -> Int {
            WorkspaceCarver.bytes { _ = Workspace(carving: &$0, m: m, d: d, dv: dv) }
        }
    }

    struct Views {
        var q: TensorView, k: TensorView, v: TensorView, o: TensorView, lse: TensorView, dO: TensorView
        var dQ: MutableTensorView, dK: MutableTensorView, dV: MutableTensorView
    }

    /// The gradients of one (batch item `b`, key/value head `hk`): every query head of its
    /// group, `heads` (in order). `keyCount` valid keys; `keyLength` the full `Nk` (for the
    /// causal offset). `dQ` rows must be zero on entry; `dK`, `dV` rows are written. A
    /// 16-bit gradient is written in its precision (``addGradientRow(_:_:_:_:_:count:)``):
    /// `dQ` always, `dK` and `dV` when the group has one query head.
    static func item<Map: DifferentiableFeatureMap>(
        map: Map, causal: Bool, epsilon: Float, queryLength: Int, keyLength: Int, keyCount: Int,
        b: Int, hk: Int, heads: Range<Int>, views x: Views, space: Workspace
    ) {
        let (m, mPad, d, dv) = (space.m, space.mPad, space.d, space.dv)
        /// Rows `start ..< start + count` of head `h` of `view` for the feature map
        /// (``TensorView/floatRows(_:_:rows:width:stage:)``: 16-bit rows widened into the stage).
        func floatRows(_ view: TensorView, _ h: Int, _ start: Int, _ count: Int)
            -> (base: UnsafePointer<Float>, rowStride: Int, columnStride: Int) {
            view.floatRows(b, h, rows: PositionRun(start: start, count: count), width: d, stage: space.rowStage)
        }
        for j in 0..<keyLength {
            x.dK.zeroRow(b, hk, j, count: d)
            x.dV.zeroRow(b, hk, j, count: dv)
        }
        // The stabiliser: the largest key logScale.
        var c = -Float.infinity
        for start in stride(from: 0, to: keyCount, by: chunk) {
            let count = min(chunk, keyCount - start)
            let keys = floatRows(x.k, hk, start, count)
            map.apply(keys.base, rows: count, rowStride: keys.rowStride, columnStride: keys.columnStride,
                      headDim: d, output: space.keyFeatures, outputStride: mPad, logScale: space.keyLogScale)
            for j in 0..<count { c = max(c, space.keyLogScale[j]) }
        }
        // No key (or no key with finite features): every output is 0, every gradient 0.
        guard c > -.infinity else { return }
        let offset = keyLength - queryLength
        let prefix = causal ? min(max(offset, 0), keyCount) : keyCount

        func keyRows(_ start: Int, _ count: Int) {
            let keys = floatRows(x.k, hk, start, count)
            map.apply(keys.base, rows: count, rowStride: keys.rowStride, columnStride: keys.columnStride,
                      headDim: d, output: space.keyFeatures, outputStride: mPad, logScale: space.keyLogScale)
            for j in 0..<count where space.keyLogScale[j] != c {
                LinearAttentionScan.scale(space.keyFeatures + j * mPad, count: m, by: expf(space.keyLogScale[j] - c))
            }
        }
        func valueOperand(_ start: Int) -> MatrixOperand {
            MatrixOperand(x.v, b: b, h: hk, firstRow: start)
        }
        /// Query features, `dN`, `dden` of queries `start ..< start + count` of head `h`.
        func queryRows(_ h: Int, _ start: Int, _ count: Int) {
            let queries = floatRows(x.q, h, start, count)
            map.apply(queries.base, rows: count, rowStride: queries.rowStride, columnStride: queries.columnStride,
                      headDim: d, output: space.queryFeatures, outputStride: mPad, logScale: space.queryLogScale)
            for i in 0..<count {
                let l = x.lse.row(b, h, start + i)[0]
                let den = l > -.infinity ? expf(l - space.queryLogScale[i] - c) : 0
                let r = 1 / (den + epsilon)
                let go = x.dO.dot(row: (b, h, start + i), x.o, row: (b, h, start + i), count: dv)
                space.dden[i] = -r * go
                let row = space.dN + i * dv
                x.dO.widenRows(b, h, rows: PositionRun(start: start + i, count: 1), width: dv, into: row, ld: dv)
                for t in 0..<dv { row[t] = r * row[t] }
            }
        }
        /// `masked = mask(dN Vᵀ + dden)` and `products = mask(Φ_Q Φ_Kᵀ)` within a causal chunk.
        func intraChunk(_ start: Int, _ count: Int, _ keyStart: Int, _ keys: Int, products: Bool) {
            let ld = chunk
            Gemm.multiply(m: count, n: keys, depth: dv,
                          a: MatrixOperand(base: space.dN, rowStride: dv, columnStride: 1), packA: false,
                          b: .matrix(valueOperand(keyStart).transposed), c: space.masked, ldc: ld,
                          workspace: space.gemm)
            if products {
                Gemm.multiply(m: count, n: keys, depth: m,
                              a: MatrixOperand(base: space.queryFeatures, rowStride: mPad, columnStride: 1),
                              packA: false,
                              b: .matrix(MatrixOperand(base: space.keyFeatures, rowStride: 1, columnStride: mPad)),
                              c: space.products, ldc: ld, workspace: space.gemm)
            }
            for ii in 0..<count {
                let visible = min(keys, max(0, start + ii + offset - keyStart + 1))
                let t = space.masked + ii * ld, p = space.products + ii * ld
                for jj in 0..<visible { t[jj] += space.dden[ii] }
                for jj in visible..<keys { t[jj] = 0 }
                if products { for jj in visible..<keys { p[jj] = 0 } }
            }
        }
        /// `S += Φ_Kᵀ V`, `z += Σ Φ_K` for the key rows in `keyFeatures`.
        func absorb(_ start: Int, _ count: Int) {
            Gemm.multiply(m: m, n: dv, depth: count,
                          a: MatrixOperand(base: space.keyFeatures, rowStride: 1, columnStride: mPad), packA: false,
                          b: .matrix(valueOperand(start)), c: space.s, ldc: dv, accumulate: true,
                          workspace: space.gemm)
            for j in 0..<count { addRow(space.keyFeatures + j * mPad, 1, into: space.z, m) }
        }
        /// `dS += Φ_Qᵀ dN`, `dz += Φ_Qᵀ dden` for the query rows in `queryFeatures`.
        func absorbGradients(_ count: Int) {
            Gemm.multiply(m: m, n: dv, depth: count,
                          a: MatrixOperand(base: space.queryFeatures, rowStride: 1, columnStride: mPad), packA: false,
                          b: .matrix(MatrixOperand(base: space.dN, rowStride: dv, columnStride: 1)),
                          c: space.dS, ldc: dv, accumulate: true, workspace: space.gemm)
            for i in 0..<count { addRow(space.queryFeatures + i * mPad, space.dden[i], into: space.dz, m) }
        }
        /// `dΦ_K = V dSᵀ + dz` and `dV = Φ_K dS` for the key rows in `keyFeatures` (into
        /// `dPhiK`, `dVChunk`), before any within-chunk part.
        func keyGradientsFromState(_ start: Int, _ count: Int) {
            Gemm.multiply(m: count, n: m, depth: dv, a: valueOperand(start), packA: x.v.precision != .float32,
                          b: .matrix(MatrixOperand(base: space.dS, rowStride: 1, columnStride: dv)),
                          c: space.dPhiK, ldc: mPad, workspace: space.gemm)
            for j in 0..<count { addRow(space.dz, 1, into: space.dPhiK + j * mPad, m) }
            Gemm.multiply(m: count, n: dv, depth: m,
                          a: MatrixOperand(base: space.keyFeatures, rowStride: mPad, columnStride: 1), packA: false,
                          b: .matrix(MatrixOperand(base: space.dS, rowStride: dv, columnStride: 1)),
                          c: space.dVChunk, ldc: dv, workspace: space.gemm)
        }
        /// Adds `dPhiK` through the map, and `dVChunk`, to the key rows.
        func finishKeys(_ start: Int, _ count: Int) {
            let keys = floatRows(x.k, hk, start, count)
            map.backward(keys.base, rows: count, rowStride: keys.rowStride, columnStride: keys.columnStride,
                         headDim: d, features: space.keyFeatures, featureGradient: space.dPhiK, featureStride: mPad,
                         output: space.dX, outputStride: d)
            for j in 0..<count {
                addGradientRow(x.dK, b, hk, start + j, space.dX + j * d, count: d)
                addGradientRow(x.dV, b, hk, start + j, space.dVChunk + j * dv, count: dv)
            }
        }
        func chunkKeys(_ start: Int, _ count: Int) -> Range<Int> {
            causal ? LinearAttentionScan.chunkKeys(start: start, count: count, keyFloor: prefix, keyCount: keyCount,
                                                   offset: offset)
                : keyCount..<keyCount
        }

        for h in heads {
            // dQ: the prefix state, chunk by chunk.
            space.s.update(repeating: 0, count: m * dv)
            space.z.update(repeating: 0, count: m)
            for start in stride(from: 0, to: prefix, by: chunk) {
                let count = min(chunk, prefix - start)
                keyRows(start, count)
                absorb(start, count)
            }
            for start in stride(from: 0, to: queryLength, by: chunk) {
                let count = min(chunk, queryLength - start)
                let keys = chunkKeys(start, count)
                if !keys.isEmpty { keyRows(keys.lowerBound, keys.count) }
                queryRows(h, start, count)
                Gemm.multiply(m: count, n: m, depth: dv,
                              a: MatrixOperand(base: space.dN, rowStride: dv, columnStride: 1), packA: false,
                              b: .matrix(MatrixOperand(base: space.s, rowStride: 1, columnStride: dv)),
                              c: space.dPhiQ, ldc: mPad, workspace: space.gemm)
                for i in 0..<count { addRow(space.z, space.dden[i], into: space.dPhiQ + i * mPad, m) }
                if !keys.isEmpty {
                    intraChunk(start, count, keys.lowerBound, keys.count, products: false)
                    Gemm.multiply(m: count, n: m, depth: keys.count,
                                  a: MatrixOperand(base: space.masked, rowStride: chunk, columnStride: 1), packA: false,
                                  b: .matrix(MatrixOperand(base: space.keyFeatures, rowStride: mPad, columnStride: 1)),
                                  c: space.dPhiQ, ldc: mPad, accumulate: true, workspace: space.gemm)
                }
                let queries = floatRows(x.q, h, start, count)
                map.backward(queries.base, rows: count, rowStride: queries.rowStride,
                             columnStride: queries.columnStride, headDim: d, features: space.queryFeatures,
                             featureGradient: space.dPhiQ, featureStride: mPad, output: space.dX, outputStride: d)
                for i in 0..<count { addGradientRow(x.dQ, b, h, start + i, space.dX + i * d, count: d) }
                if !keys.isEmpty { absorb(keys.lowerBound, keys.count) }
            }
            // dK, dV: the suffix sums, chunk by chunk from the last.
            space.dS.update(repeating: 0, count: m * dv)
            space.dz.update(repeating: 0, count: m)
            let chunks = (queryLength + chunk - 1) / chunk
            for index in stride(from: chunks - 1, through: 0, by: -1) {
                let start = index * chunk, count = min(chunk, queryLength - start)
                let keys = chunkKeys(start, count)
                queryRows(h, start, count)
                if !keys.isEmpty {
                    keyRows(keys.lowerBound, keys.count)
                    keyGradientsFromState(keys.lowerBound, keys.count)
                    intraChunk(start, count, keys.lowerBound, keys.count, products: true)
                    Gemm.multiply(m: keys.count, n: m, depth: count,
                                  a: MatrixOperand(base: space.masked, rowStride: 1, columnStride: chunk), packA: false,
                                  b: .matrix(MatrixOperand(base: space.queryFeatures, rowStride: mPad, columnStride: 1)),
                                  c: space.dPhiK, ldc: mPad, accumulate: true, workspace: space.gemm)
                    Gemm.multiply(m: keys.count, n: dv, depth: count,
                                  a: MatrixOperand(base: space.products, rowStride: 1, columnStride: chunk),
                                  packA: false,
                                  b: .matrix(MatrixOperand(base: space.dN, rowStride: dv, columnStride: 1)),
                                  c: space.dVChunk, ldc: dv, accumulate: true, workspace: space.gemm)
                    finishKeys(keys.lowerBound, keys.count)
                }
                absorbGradients(count)
            }
            // Keys every query sees.
            for start in stride(from: 0, to: prefix, by: chunk) {
                let count = min(chunk, prefix - start)
                keyRows(start, count)
                keyGradientsFromState(start, count)
                finishKeys(start, count)
            }
        }
    }

    /// `gradient[b, h, i] += values` (`count` elements). A 16-bit gradient row is written
    /// once (the kernel is handed one only then) and holds zero: it gets `0 + values`
    /// rounded, the bits a zeroed `Float` row added to and then rounded would give (`0 + −0`
    /// is `+0`). `values` is scratch and is overwritten.
    @inline(__always)
    static func addGradientRow(_ gradient: MutableTensorView, _ b: Int, _ h: Int, _ i: Int,
                               _ values: UnsafeMutablePointer<Float>, count: Int) {
        if gradient.precision == .float32 {
            let row = gradient.row(b, h, i), s = gradient.strides[3]
            for t in 0..<count { row[t &* s] += values[t] }
        } else {
            for t in 0..<count { values[t] = 0 + values[t] }
            gradient.storeRow(b, h, i, from: values, count: count)
        }
    }

    /// `into[f] += factor · row[f]` for `f < count`.
    @inline(__always)
    static func addRow(_ row: UnsafePointer<Float>, _ factor: Float, into: UnsafeMutablePointer<Float>, _ count: Int) {
        let s = Vec16(repeating: factor)
        var f = 0
        while f + 16 <= count { store16(load16(into + f) + load16(row + f) * s, into + f); f += 16 }
        while f < count { into[f] += factor * row[f]; f += 1 }
    }
}
