/// LSH's bucket-hash kernel (Reformer's angular locality-sensitive hashing): the bucket
/// of every position of one head in every round, and the stable sort of positions by
/// bucket.
///
///     rot = x R[round]                                   // R: D × columns, columns = Σ n_i / 2
///     bucket(x) = Σ_i (Π_{j<i} n_j) · argmax([rot_i ; −rot_i])   // rot_i: factor i's n_i / 2 columns
///
/// one factor `[n]` being the plain rule `argmax([x R ; −x R])`. Rotations are drawn from
/// ``seededRotation(seed:head:round:hashes:d:half:store:)`` or copied from given ones
/// (``packRotations(_:head:hashes:d:)``) into the micro-kernel's packed `A` layout; rows are
/// transposed a block at a time (positions in lanes) and hashed by the fused
/// ``microKernelExtremes(depth:a:b:ldb:scan:)``, so `x R` is never stored. ``sort(_:count:worker:positions:buckets:)``
/// is a counting sort.
///
/// Scratch: packed rotations of one head, bucket ids of every round, and per worker a block
/// of rows transposed and the sort's counters. `half` is the rotation's column count
/// (`Σ n_i / 2` over the bucket factors).
///
/// - Complexity: per head, `hashes · N · D · 2 · columns` FLOPs of hashing, O(N + nBuckets)
///   per sort; scratch O(hashes · (D · columns + N) + workers · (256 · D + nBuckets)).
struct BucketHash {
    let d: Int, n: Int, hashes: Int, half: Int, halfPad: Int, buckets: Int
    let factors: [Int]
    let rotations: UnsafeMutablePointer<Float>      // [hashes][halfPad / MR][D][MR]
    let panels: UnsafeMutablePointer<Float>         // [workers][rowBlock / NR][D][NR]
    let queryBuckets, keyBuckets: UnsafeMutablePointer<Int32>   // [hashes][N]
    let counters: UnsafeMutablePointer<Int32>       // [workers][buckets + 1]

    /// Rows hashed per work item (a multiple of `NR`).
    static let rowBlock = 256

    private static func counts(_ shape: AttentionShape, hashes: Int, factors: [Int], workers: Int)
        -> (floats: Int, ints: Int) {
        let half = BucketHash.columns(factors), buckets = BucketHash.product(factors)
        let halfPad = roundUp(half, MicroTile.nr), n = shape.queryLength, d = shape.headDim
        let floats = roundUp(hashes * d * halfPad, 16) + workers * rowBlock * d
        return (floats, 2 * hashes * n + workers * (buckets + 1))
    }

    static func byteCount(_ shape: AttentionShape, hashes: Int, factors: [Int], workers: Int) -> Int {
        WorkspaceCarver.bytes { _ = BucketHash(carving: &$0, shape, hashes: hashes, factors: factors, workers: workers) }
    }

    /// Carves the scratch (from a zero-filled arena: the padding columns of the rotations
    /// stay 0).
    init(carving carver: inout WorkspaceCarver, _ shape: AttentionShape, hashes: Int, factors: [Int], workers: Int) {
        d = shape.headDim
        n = shape.queryLength
        self.hashes = hashes
        self.factors = factors
        half = BucketHash.columns(factors)
        halfPad = roundUp(half, MicroTile.nr)
        buckets = BucketHash.product(factors)
        let (floats, ints) = BucketHash.counts(shape, hashes: hashes, factors: factors, workers: workers)
        let f = carver.take(floats, of: Float.self)
        rotations = f
        panels = f + roundUp(hashes * d * halfPad, 16)
        let i = carver.take(ints, of: Int32.self)
        queryBuckets = i
        keyBuckets = i + hashes * n
        counters = keyBuckets + hashes * n
    }

    /// Where rotation `round`'s element `(c, t)` is kept: the micro-kernel's packed `A`
    /// layout, `MR` columns at a time (`[hashes][halfPad / MR][D][MR]`), so that one tile
    /// of columns reads `D · MR` contiguous floats.
    @inline(__always)
    func packed(_ round: Int, _ c: Int, _ t: Int) -> Int {
        let mr = MicroTile.mr
        return round * d * halfPad + (t / mr * d + c) * mr + t % mr
    }

    /// Copies head `head`'s rotations into the packed layout (``packed(_:_:_:)``;
    /// padding columns stay 0).
    func packRotations(_ rot: TensorView, head: Int, hashes: Int, d: Int) {
        for r in 0..<hashes {
            for c in 0..<d {
                let row = rot.row(head, r, c)
                for t in 0..<half { rotations[packed(r, c, t)] = row[t * rot.strides[3]] }
            }
        }
    }

    /// Buckets of positions `start..<start + count` of `rows` (`start` a multiple of
    /// ``rowBlock``, `count` at most ``rowBlock``) in every round, to
    /// `bucketOf[r · N + i]`: the rows are transposed into the worker's panels (which
    /// stay in L2), then hashed round by round (``hash(_:start:count:round:into:)``).
    func hash(_ rows: PermutedBlockAttention.Rows, start: Int, count: Int, worker: Int,
              into bucketOf: UnsafeMutablePointer<Int32>) {
        let block = panels + worker * BucketHash.rowBlock * d
        TransposedRows.packPanels(rows, start: start, count: count, depth: d, normalise: false, into: block, n: n,
                                  origin: start)
        for r in 0..<hashes {
            hash(block, start: start, count: count, round: r, into: bucketOf + r * n)
        }
    }

    /// Buckets of positions `start..<start + count` (`start` a multiple of 32) from their
    /// transposed rows, `transposed` holding the panels from position `start` on: per
    /// factor `n_i`, `argmax([x R_i ; −x R_i])` over its `n_i / 2`
    /// columns (the first maximum, positive half first), combined with the first factor
    /// least significant. Positions are in lanes, so each argmax is a vertical scan; the
    /// micro-kernel runs it on the tiles of `x R` in its registers
    /// (``microKernelExtremes(depth:a:b:ldb:scan:)``), so only the rotation and one panel of rows
    /// stay in L1, however many columns there are.
    func hash(_ transposed: UnsafePointer<Float>, start: Int, count: Int, round: Int,
              into bucketOf: UnsafeMutablePointer<Int32>) {
        typealias Lanes = SIMD16<Int32>
        let mr = MicroTile.mr
        let rotation = rotations + round * d * halfPad
        for panel in Swift.stride(from: start, to: start + count, by: MicroTile.nr) {
            let b = transposed + (panel - start) * d
            var bucket0 = Lanes(), bucket1 = Lanes()
            var offset = 0, weight: Int32 = 1
            for factor in factors {
                let columns = factor / 2
                var scan = LaneExtremes()
                // Tiles of at most MR columns of this factor within one packed MR-column slice.
                var t = offset
                while t < offset + columns {
                    let rows = min(mr - t % mr, offset + columns - t)
                    scan.column = Int32(t - offset)
                    let a = BroadcastOperand(base: rotation + (t / mr * d) * mr + t % mr, rowStride: 1,
                                             depthStride: mr, rows: rows)
                    microKernelExtremes(depth: d, a: a, b: b, ldb: MicroTile.nr, scan: &scan)
                    t += rows
                }
                // The factor's argmax over [x R_i ; −x R_i]: the positive half on ties.
                let half = Lanes(repeating: Int32(columns)), w = Lanes(repeating: weight)
                let e0 = scan.lanes0, e1 = scan.lanes1
                var result0 = e0.lowAt &+ half, result1 = e1.lowAt &+ half
                result0.replace(with: e0.highAt, where: e0.high .>= -e0.low)
                result1.replace(with: e1.highAt, where: e1.high .>= -e1.low)
                bucket0 &+= result0 &* w
                bucket1 &+= result1 &* w
                offset += columns
                weight &*= Int32(truncatingIfNeeded: factor)
            }
            let valid = min(MicroTile.nr, start + count - panel)
            for t in 0..<valid { bucketOf[panel + t] = t < 16 ? bucket0[t] : bucket1[t - 16] }
        }
    }

    /// Counting sort of positions `0..<count` by bucket, stable: slot order and buckets.
    func sort(_ bucketOf: UnsafePointer<Int32>, count: Int, worker: Int,
              positions: UnsafeMutablePointer<Int32>, buckets slotBuckets: UnsafeMutablePointer<Int32>) {
        let next = counters + worker * (buckets + 1)
        next.update(repeating: 0, count: buckets + 1)
        for i in 0..<count { next[Int(bucketOf[i]) + 1] += 1 }
        for c in 0..<buckets { next[c + 1] += next[c] }
        for i in 0..<count {
            let bucket = Int(bucketOf[i])
            let slot = Int(next[bucket])
            positions[slot] = Int32(i)
            slotBuckets[slot] = Int32(bucket)
            next[bucket] += 1
        }
    }

/// Rotation columns for `factors`: `Σ n_i / 2`.
static func columns(_ factors: [Int]) -> Int { factors.reduce(0) { $0 + $1 / 2 } }

/// `Π factors`, saturating at `Int.max` (validation rejects more than ``maxFactorisedBuckets``).
static func product(_ factors: [Int]) -> Int {
    factors.reduce(1) { product, factor in
        let (next, overflow) = product.multipliedReportingOverflow(by: factor)
        return overflow ? Int.max : next
    }
}

/// Passes rotation `[head, round]` (`D × half` standard normal values) to
/// `store(c, t, value)`: Box-Muller pairs from `SeededGenerator` seeded with `seed` and the
/// rotation's index, so that every (head, round) is drawn independently (and in parallel).
static func seededRotation(seed: UInt64, head: Int, round: Int, hashes: Int, d: Int, half: Int,
                           store: (_ c: Int, _ t: Int, _ value: Float) -> Void) {
    var rng = SeededGenerator(seed: seed ^ (UInt64(head * hashes + round) &+ 1) &* 0x9E37_79B9_7F4A_7C15)
    let count = d * half
    var index = 0
    while index < count {
        let u1 = (Double(rng.next() >> 11) + 1) * 0x1p-53   // (0, 1]
        let u2 = Double(rng.next() >> 11) * 0x1p-53
        let radius = (-2 * log(u1)).squareRoot(), angle = 2 * Double.pi * u2
        store(index / half, index % half, Float(radius * cos(angle)))
        if index + 1 < count { store((index + 1) / half, (index + 1) % half, Float(radius * sin(angle))) }
        index += 2
    }
}
}
