/// The flash-style kernel: softmax attention over the key tiles a ``TileMask`` lists,
/// with an online softmax, emitting each row's output and log-sum-exp.
///
/// For one work item (batch `b`, head `h`, a tile of `Br` queries):
///
///     Qᵀ ← scale · Q[tile]ᵀ                   packed D × Br (queries in lanes)
///     m ← −∞, l ← 0, O ← 0                    per query
///     for each key tile (≤ Bc keys) the mask lists:
///         pack the V tile (rows padded to NR)
///         Sᵀ ← K Qᵀ                          micro-kernel, keys read in place, Bc × Br
///         mask the partial tiles' scores to −∞
///         m' ← max(m, column max of Sᵀ)      vertical: no horizontal reductions
///         Pᵀ ← exp(Sᵀ − m'), α ← exp(m − m')
///         l ← α·l + column sums of Pᵀ
///         O ← diag(α)·O + P V                 micro-kernel, α fused into the C update
///     o = O / l, lse = m + log l              (0 and −∞ where l = 0)
///
/// Scores are kept transposed (keys as rows, queries in SIMD lanes) so that the
/// row statistics are elementwise vector operations and `Pᵀ` is already the
/// depth-major operand the second micro-kernel broadcasts from.
///
/// Workspace per worker: `4 · (D·Br + Bc·Dv′ + Bc·Br + Br·Dv′ + 3·Br)` bytes with
/// `Dv′` = Dv rounded up to 32: independent of the sequence lengths.
enum TiledSoftmaxAttention {
    /// Query rows per work item and keys per tile (block sizes as data, in one place).
    struct Tiling {
        var queryTile: Int
        var keyTile: Int

        static func forProblem(headDim: Int, valueDim: Int) -> Tiling {
            // Measured on Zen 5 (KernelDocs/Dense.md): 128 × 64 is within noise of the best
            // for D = 64 and 128; 128 queries halve the key/value traffic of 64 at N ≥ 4096.
            Tiling(queryTile: 128, keyTile: 64)
        }
    }

    /// Bytes of workspace ``run(shape:scale:threads:tiling:q:k:v:o:lse:mask:)`` allocates for
    /// `shape` with `threads` workers (`nil`: every active processor) and `tiling`
    /// (`nil`: ``Tiling/forProblem(headDim:valueDim:)``).
    static func workspaceBytes(shape: AttentionShape, threads: Int?, tiling: Tiling? = nil) -> Int {
        let tiling = tiling ?? Tiling.forProblem(headDim: shape.headDim, valueDim: shape.valueDim)
        let perWorker = Workspace.floatCount(d: shape.headDim, dv: shape.valueDim,
                                             queryTile: paddedQueryTile(tiling, shape.queryLength),
                                             keyTile: tiling.keyTile) * MemoryLayout<Float>.stride
        return perWorker * workerCount(threads: threads, items: workItems(shape, tiling))
    }

    static func workItems(_ shape: AttentionShape, _ tiling: Tiling) -> Int {
        (shape.queryLength + tiling.queryTile - 1) / tiling.queryTile * shape.batch * shape.heads
    }

    static func paddedQueryTile(_ tiling: Tiling, _ queryLength: Int) -> Int {
        roundUp(min(tiling.queryTile, queryLength), MicroTile.nr)
    }

    /// Computes `o` and `lse` for every `(b, h, query)` of `shape`.
    /// `mask(b, h)` gives the visibility of that batch item and head. `tiling` overrides the
    /// block sizes (`nil`: ``Tiling/forProblem(headDim:valueDim:)``); a caller whose keys
    /// come in groups (LSH chunks, routing clusters) matches the query tile to the group.
    static func run<Mask: TileMask>(
        shape: AttentionShape, scale: Float, threads: Int, tiling: Tiling? = nil,
        q: TensorView, k: TensorView, v: TensorView,
        o: MutableTensorView, lse: MutableTensorView,
        mask: (_ batch: Int, _ head: Int) -> Mask
    ) {
        let tiling = tiling ?? Tiling.forProblem(headDim: shape.headDim, valueDim: shape.valueDim)
        let br = tiling.queryTile
        let queryTiles = (shape.queryLength + br - 1) / br
        let heads = shape.batch * shape.heads
        let items = workItems(shape, tiling)
        let workers = workerCount(threads: threads, items: items)
        let brPad = paddedQueryTile(tiling, shape.queryLength)
        var spaces = (0..<workers).map { _ in
            Workspace(d: shape.headDim, dv: shape.valueDim, queryTile: brPad, keyTile: tiling.keyTile)
        }
        defer { for space in spaces { space.deallocate() } }
        spaces.withUnsafeMutableBufferPointer { spaces in
            let spaces = UncheckedSendable(spaces)
            parallelForEach(items: items, threads: workers) { item, worker in
                // Heaviest query tiles (the last ones, under causal masks) first.
                let tile = queryTiles - 1 - item / heads
                let b = (item % heads) / shape.heads, h = item % shape.heads
                let queryStart = tile * br
                let queryCount = min(br, shape.queryLength - queryStart)
                attendTile(shape: shape, scale: scale, space: spaces.value[worker],
                           b: b, h: h, queryStart: queryStart, queryCount: queryCount,
                           q: q, k: k, v: v, o: o, lse: lse, mask: mask(b, h))
            }
        }
    }

    /// One work item: `queryCount` queries from `queryStart` of head `h` in batch item `b`.
    @inline(__always)
    static func attendTile<Mask: TileMask>(
        shape: AttentionShape, scale: Float, space: Workspace,
        b: Int, h: Int, queryStart: Int, queryCount: Int,
        q: TensorView, k: TensorView, v: TensorView,
        o: MutableTensorView, lse: MutableTensorView, mask: Mask
    ) {
        let d = shape.headDim, dv = shape.valueDim
        let hk = h / shape.groupSize
        let br = space.queryTile, dvPad = space.dvPad
        let mr = MicroTile.mr, nr = MicroTile.nr
        let queryLanes = roundUp(queryCount, nr)

        packQueries(q, b: b, h: h, start: queryStart, count: queryCount, d: d, scale: scale,
                    into: space.qT, ld: br, lanes: queryLanes)
        for i in 0..<br {
            space.rowMax[i] = -.infinity
            space.rowSum[i] = 0
        }
        (space.acc).update(repeating: 0, count: br * dvPad)

        mask.forEachKeyTile(queryStart: queryStart, queryEnd: queryStart + queryCount,
                            tileSize: space.keyTile) { keyStart, keyCount, full in
            packValues(v, b: b, h: hk, start: keyStart, count: keyCount, dv: dv,
                       into: space.vPack, ld: dvPad)
            // Sᵀ = K Qᵀ.
            let keyBlocks = (keyCount + mr - 1) / mr
            for block in 0..<keyBlocks {
                for panel in stride(from: 0, to: queryLanes, by: nr) {
                    let keys = BroadcastOperand(base: k.row(b, hk, keyStart + block * mr),
                                                rowStride: k.strides[2], depthStride: k.strides[3],
                                                rows: min(mr, keyCount - block * mr))
                    microKernel(depth: d, a: keys,
                                b: space.qT + panel, ldb: br,
                                c: space.scores + block * mr * br + panel, ldc: br,
                                update: .overwrite)
                }
            }
            if !full {
                mask.maskScores(space.scores, ld: br, keyStart: keyStart, keyCount: keyCount,
                                queryStart: queryStart, queryCount: queryCount)
            }
            onlineSoftmax(space, keyCount: keyCount, lanes: queryLanes)
            // O = diag(α) O + P V.
            for panel in stride(from: 0, to: dvPad, by: nr) {
                for block in stride(from: 0, to: queryLanes, by: mr) {
                    let probabilities = BroadcastOperand(base: space.scores + block,
                                                         rowStride: 1, depthStride: br)
                    microKernel(depth: keyCount, a: probabilities,
                                b: space.vPack + panel, ldb: dvPad,
                                c: space.acc + block * dvPad + panel, ldc: dvPad,
                                update: .scaleAndAccumulate(space.alpha + block))
                }
            }
        }

        // o = O / l, lse = m + log l.
        for i in 0..<queryCount {
            let out = o.row(b, h, queryStart + i)
            let sum = space.rowSum[i]
            let row = space.acc + i * dvPad
            if sum > 0 {
                let inverse = 1 / sum
                for c in 0..<dv { out[c * o.strides[3]] = row[c] * inverse }
                lse.row(b, h, queryStart + i)[0] = space.rowMax[i] + logf(sum)
            } else {
                for c in 0..<dv { out[c * o.strides[3]] = 0 }
                lse.row(b, h, queryStart + i)[0] = -.infinity
            }
        }
    }

    /// Updates the running max, sum and rescale factor of every query lane and turns the
    /// score tile into probabilities `exp(s − m')`.
    @inline(__always)
    static func onlineSoftmax(_ space: Workspace, keyCount: Int, lanes: Int) {
        let br = space.queryTile
        let minusInfinity = Vec16(repeating: -.infinity)
        for lane in stride(from: 0, to: lanes, by: 16) {
            let column = space.scores + lane
            var tileMax = minusInfinity
            for j in 0..<keyCount { tileMax = maximum(tileMax, load16(column + j * br)) }
            let oldMax = load16(space.rowMax + lane)
            let newMax = maximum(oldMax, tileMax)
            // A lane that has seen no visible key keeps m = −∞; subtracting 0 instead keeps exp(−∞) = 0.
            var shift = newMax
            shift.replace(with: 0, where: newMax .== minusInfinity)
            let alpha = VectorMath.exp(oldMax - shift)
            var sum0 = Vec16(), sum1 = Vec16()
            var j = 0
            while j + 1 < keyCount {
                let p0 = VectorMath.exp(load16(column + j * br) - shift)
                let p1 = VectorMath.exp(load16(column + (j + 1) * br) - shift)
                store16(p0, column + j * br)
                store16(p1, column + (j + 1) * br)
                sum0 += p0
                sum1 += p1
                j += 2
            }
            if j < keyCount {
                let p0 = VectorMath.exp(load16(column + j * br) - shift)
                store16(p0, column + j * br)
                sum0 += p0
            }
            store16(fused(load16(space.rowSum + lane), alpha, sum0 + sum1), space.rowSum + lane)
            store16(newMax, space.rowMax + lane)
            store16(alpha, space.alpha + lane)
        }
    }

    /// `qT[c · ld + i] = scale · q[i][c]`; lanes `count..<lanes` are zero.
    @inline(__always)
    static func packQueries(_ q: TensorView, b: Int, h: Int, start: Int, count: Int, d: Int,
                            scale: Float, into qT: UnsafeMutablePointer<Float>, ld: Int, lanes: Int) {
        let sd = q.strides[3]
        for i in 0..<count {
            let row = q.row(b, h, start + i)
            for c in 0..<d { qT[c * ld + i] = scale * row[c * sd] }
        }
        if count < lanes {
            for c in 0..<d { (qT + c * ld + count).update(repeating: 0, count: lanes - count) }
        }
    }

    /// Value rows `vPack[r · ld + c]`; columns `dv..<ld` stay zero from allocation.
    @inline(__always)
    static func packValues(_ v: TensorView, b: Int, h: Int, start: Int, count: Int, dv: Int,
                           into vPack: UnsafeMutablePointer<Float>, ld: Int) {
        let sd = v.strides[3]
        for r in 0..<count {
            let row = v.row(b, h, start + r)
            let out = vPack + r * ld
            if sd == 1 {
                out.update(from: row, count: dv)
            } else {
                for c in 0..<dv { out[c] = row[c * sd] }
            }
        }
    }

    /// One worker's scratch memory, allocated once per call and zero-filled.
    struct Workspace {
        let queryTile: Int, keyTile: Int, dvPad: Int
        let qT, vPack, scores, acc, rowMax, rowSum, alpha: UnsafeMutablePointer<Float>
        private let block: UnsafeMutableRawPointer

        static func floatCount(d: Int, dv: Int, queryTile br: Int, keyTile bc: Int) -> Int {
            let dvPad = roundUp(dv, MicroTile.nr)
            return d * br + bc * dvPad + roundUp(bc, MicroTile.mr) * br
                + br * dvPad + 3 * br + 7 * 16
        }

        init(d: Int, dv: Int, queryTile br: Int, keyTile bc: Int) {
            queryTile = br
            keyTile = bc
            dvPad = roundUp(dv, MicroTile.nr)
            let count = Workspace.floatCount(d: d, dv: dv, queryTile: br, keyTile: bc)
            block = UnsafeMutableRawPointer.allocate(byteCount: count * 4, alignment: 64)
            let base = block.initializeMemory(as: Float.self, repeating: 0, count: count)
            // Each array starts on a 64-byte boundary.
            var next = base
            func take(_ n: Int) -> UnsafeMutablePointer<Float> {
                defer { next += roundUp(n, 16) }
                return next
            }
            qT = take(d * br)
            vPack = take(bc * dvPad)
            scores = take(roundUp(bc, MicroTile.mr) * br)
            acc = take(br * dvPad)
            rowMax = take(br)
            rowSum = take(br)
            alpha = take(br)
        }

        func deallocate() { block.deallocate() }
    }
}

@inline(__always)
func roundUp(_ x: Int, _ multiple: Int) -> Int { (x + multiple - 1) / multiple * multiple }

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
