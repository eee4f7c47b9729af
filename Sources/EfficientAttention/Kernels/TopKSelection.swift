/// Top-k selection of one row of scores: the `take` largest of `count` scores, as their
/// indices in ascending order (ties: the smaller index first; NaN counts as −∞). Routing
/// selects each cluster's members with it (``ClusterRouter``).
///
/// The pieces, each a kernel of its own:
/// - **Sample thresholds** (``sampling(n:take:)``, ``firstRank(take:n:samples:)``): a strided
///   sample of the scores gives a threshold that a little more than `take` scores pass.
/// - **Pass masks** (``passMask(_:atLeast:)``, ``collect(_:count:atLeast:values:indices:)``,
///   ``append(_:scores:first:values:indices:at:)``): 32 scores compared at once with the
///   threshold; only the set bits of the mask are listed as candidates.
/// - **Bisection selection** (``kthLargest(_:count:k:)``, ``finish(selecting:indices:count:take:into:listValue:)``):
///   the `k`-th largest candidate by bisection on the floats' order-preserving integer
///   keys (branch-free), then the candidates above it (and enough ties) in index order.
/// - **Fallbacks** (``top(_:count:take:values:indices:into:)``): too few candidates lower
///   the threshold (a larger sample rank), down to every score; the selection is the same.
///
/// - Complexity: O(count) per row: one pass of the pass masks, and 32 counting passes of
///   the bisection over the candidates (about `1.25 · take` of them when the sample is
///   representative; every score in the worst case).
enum TopKSelection {
    /// The sampled positions `t · step`, `t < count`, for `n` positions (`nil`: no sampling,
    /// every score is a candidate): about `max(512, 4 · n / take)` (at least four per
    /// cluster), at most `n / 4`.
    static func sampling(n: Int, take: Int) -> (step: Int, count: Int)? {
        guard n >= 2048 && 4 * take <= n else { return nil }
        let step = n / min(n / 4, max(512, 4 * n / take))
        return (step, n / step)
    }

    /// The sample rank whose score is the first threshold tried (about `1.25 · take`
    /// candidates expected, plus a margin).
    static func firstRank(take: Int, n: Int, samples: Int) -> Int {
        min(samples - 1, take * samples * 5 / (4 * n) + 5)
    }

    /// Candidate-list capacity for `take` of `n`: four times the expected count of the first
    /// threshold (a longer list falls back to the full scores).
    static func capacity(n: Int, take: Int) -> Int {
        guard let (_, samples) = sampling(n: n, take: take) else { return 0 }
        return min(n, 4 * (firstRank(take: take, n: n, samples: samples) + 1) * n / samples + 64)
    }

    /// Bit `i` set iff `scores[i] >= bound` (NaN never passes), `i < 32`. The comparison
    /// masks become bytes of 0 or 1, whose eight lanes per word a multiply gathers into
    /// one byte each (a mask's or-reduction over lane bits compiles to lane extracts).
    @inline(__always)
    static func passMask(_ scores: UnsafePointer<Float>, atLeast bound: Vec16) -> UInt32 {
        let b0 = SIMD16<Int8>(truncatingIfNeeded: SIMD16<Int32>().replacing(with: 1, where: load16(scores) .>= bound))
        let b1 = SIMD16<Int8>(truncatingIfNeeded:
            SIMD16<Int32>().replacing(with: 1, where: load16(scores + 16) .>= bound))
        let words = unsafeBitCast(SIMD32<Int8>(lowHalf: b0, highHalf: b1), to: SIMD4<UInt64>.self)
        let gather: UInt64 = 0x0102_0408_1020_4080     // byte j's low bit to bit 56 + j
        let bytes = (words &* gather) &>> 56
        return UInt32(truncatingIfNeeded: bytes[0] | bytes[1] << 8 | bytes[2] << 16 | bytes[3] << 24)
    }

    /// The `take` largest of `scores[0..<count]` (ties: smaller index first; NaN counts as
    /// −∞), as ascending indices, from a full row of scores (short sequences and the
    /// fallback of ``ClusterRouter/select(centroids:head:firstCluster:clusters:n:take:worker:into:)``).
    /// The sampled scores (``sampling(n:take:)``) give a threshold that a little more
    /// than `take` scores pass; a vector scan collects those candidates (the set bits of
    /// each 32-score comparison mask) and the selection runs on them only. Too few
    /// candidates lower the threshold (a larger sample rank), down to all scores.
    /// `values` and `indices` hold `count` entries.
    static func top(_ scores: UnsafePointer<Float>, count: Int, take: Int,
                    values: UnsafeMutablePointer<Float>, indices: UnsafeMutablePointer<Int32>,
                    into out: UnsafeMutablePointer<Int32>) {
        var candidates = 0
        if let (step, samples) = sampling(n: count, take: take) {
            var rank = firstRank(take: take, n: count, samples: samples)
            while true {
                for t in 0..<samples { values[t] = scores[t * step].isNaN ? -.infinity : scores[t * step] }
                let low = kthLargest(values, count: samples, k: rank)
                guard low > -.infinity else { break }
                candidates = collect(scores, count: count, atLeast: low, values: values, indices: indices)
                if candidates >= take || rank == samples - 1 { break }
                rank = min(samples - 1, 2 * rank + 4)
            }
        }
        if candidates < take {
            for i in 0..<count {
                values[i] = scores[i].isNaN ? -.infinity : scores[i]
                indices[i] = Int32(i)
            }
            candidates = count
        }
        // Candidates are in ascending index order; `values` is reordered by the selection.
        finish(selecting: values, indices: indices, count: candidates, take: take, into: out) { c in
            let score = scores[Int(indices[c])]
            return score.isNaN ? -.infinity : score
        }
    }

    /// The `take` largest of `count` listed candidates (ties: smaller index first), as
    /// ascending indices: candidate `c` has index `indices[c]` (ascending in `c`) and
    /// value `listValue(c)`; `selecting` holds the same values in any order and is
    /// reordered by the selection.
    @inline(__always)
    static func finish(selecting: UnsafeMutablePointer<Float>, indices: UnsafePointer<Int32>, count: Int,
                       take: Int, into out: UnsafeMutablePointer<Int32>, listValue: (Int) -> Float) {
        let threshold = kthLargest(selecting, count: count, k: take - 1)
        var greater = 0
        for c in 0..<count where listValue(c) > threshold { greater += 1 }
        var ties = take - greater, next = 0
        for c in 0..<count {
            let s = listValue(c)
            if s > threshold || (s == threshold && ties > 0) {
                if s == threshold { ties -= 1 }
                out[next] = indices[c]
                next += 1
            }
        }
    }

    /// Writes the scores `>= low` (and their indices, ascending) to `values` and
    /// `indices`; returns how many. Thirty-two scores per ``passMask(_:atLeast:)``; only
    /// the set bits of a mask are visited.
    @inline(__always)
    static func collect(_ scores: UnsafePointer<Float>, count: Int, atLeast low: Float,
                        values: UnsafeMutablePointer<Float>, indices: UnsafeMutablePointer<Int32>) -> Int {
        let bound = Vec16(repeating: low), nr = MicroTile.nr
        var found = 0, i = 0
        while i + nr <= count {
            found = append(passMask(scores + i, atLeast: bound), scores: scores + i, first: i,
                           values: values, indices: indices, at: found)
            i += nr
        }
        while i < count {
            if scores[i] >= low {
                values[found] = scores[i]
                indices[found] = Int32(truncatingIfNeeded: i)
                found += 1
            }
            i += 1
        }
        return found
    }

    /// Appends `scores[lane]` and its index `first + lane` for every set bit of `mask`
    /// (ascending) at `values[count...]`, `indices[count...]`; returns the new count.
    @inline(__always)
    static func append(_ mask: UInt32, scores: UnsafePointer<Float>, first: Int,
                       values: UnsafeMutablePointer<Float>, indices: UnsafeMutablePointer<Int32>,
                       at count: Int) -> Int {
        var mask = mask, count = count
        while mask != 0 {
            let lane = Int(mask.trailingZeroBitCount)
            values[count] = scores[lane]
            indices[count] = Int32(truncatingIfNeeded: first &+ lane)
            count &+= 1
            mask &= mask &- 1
        }
        return count
    }

    /// The `k`-th largest value (0-based) of `a[0..<count]` (`a` holds no NaN; it may be
    /// overwritten). Bisection on the floats' order-preserving 32-bit keys: 32 passes, each
    /// counting the keys at or above the midpoint sixteen at a time (no data-dependent
    /// branches; a quickselect's partitions are chains of dependent loads and stores).
    /// `-0` and `+0` are distinct keys but equal values, so the result compares equal to
    /// the `k`-th largest under `<`.
    static func kthLargest(_ a: UnsafeMutablePointer<Float>, count: Int, k: Int) -> Float {
        if k < 32 && count > 8 * (k + 1) { return kthLargestSmall(a, count: count, k: k) }
        let keys = UnsafeMutableRawPointer(a).assumingMemoryBound(to: UInt32.self)
        let sign = UInt32(1) << 31
        @inline(__always) func key(_ bits: UInt32) -> UInt32 { bits & sign != 0 ? ~bits : bits | sign }
        let whole = count / 16 * 16
        var i = 0
        while i < whole {
            let bits = UnsafeRawPointer(keys + i).loadUnaligned(as: SIMD16<UInt32>.self)
            let negative = (bits & sign) .!= 0
            let mapped = (bits | sign).replacing(with: ~bits, where: negative)
            UnsafeMutableRawPointer(keys + i).storeBytes(of: mapped, as: SIMD16<UInt32>.self)
            i += 16
        }
        for t in whole..<count { keys[t] = key(keys[t]) }
        // The largest v with at least k + 1 keys >= v.
        var lo: UInt64 = 0, hi = UInt64(UInt32.max)
        while lo < hi {
            let mid = (lo + hi + 1) / 2, bound = UInt32(mid)
            var counts = SIMD16<Int32>()
            let vector = SIMD16<UInt32>(repeating: bound)
            var t = 0
            while t < whole {
                let x = UnsafeRawPointer(keys + t).loadUnaligned(as: SIMD16<UInt32>.self)
                counts &+= SIMD16<Int32>().replacing(with: 1, where: x .>= vector)
                t += 16
            }
            var above = Int(counts.wrappedSum())
            for t in whole..<count where keys[t] >= bound { above += 1 }
            if above > k { lo = mid } else { hi = mid - 1 }
        }
        let v = UInt32(lo)
        return Float(bitPattern: v & sign != 0 ? v & ~sign : ~v)
    }

    /// ``kthLargest(_:count:k:)`` for a small `k` (a sample's threshold rank), leaving `a`
    /// unchanged: a descending buffer of the `k + 1` largest values seen, which most
    /// values (sixteen at a time once it is full) pass with one comparison.
    static func kthLargestSmall(_ a: UnsafePointer<Float>, count: Int, k: Int) -> Float {
        withUnsafeTemporaryAllocation(of: Float.self, capacity: k + 1) { buffer in
            let top = buffer.baseAddress!
            var filled = 0, i = 0
            while i < count {
                if filled > k && i + 16 <= count && !any(load16(a + i) .> Vec16(repeating: top[k])) {
                    i += 16
                    continue
                }
                for x in UnsafeBufferPointer(start: a + i, count: min(16, count - i))
                where filled <= k || x > top[k] {
                    var j = min(filled, k)
                    while j > 0 && top[j - 1] < x {
                        top[j] = top[j - 1]
                        j -= 1
                    }
                    top[j] = x
                    filled += 1
                }
                i += 16
            }
            return top[k]
        }
    }
}

/// Test entry point of ``TopKSelection`` (`@_spi(Testing)`, not public API).
@_spi(Testing) public enum SelectionKernels {
    /// The indices of the `take` largest of `scores`, ascending (ties: smaller index first;
    /// NaN counts as −∞), by ``TopKSelection/top(_:count:take:values:indices:into:)``;
    /// empty unless `1 <= take <= scores.count`.
    ///
    /// - Complexity: O(scores.count).
    public static func topIndices(of scores: [Float], take: Int) -> [Int] {
        let count = scores.count
        guard take >= 1, take <= count else { return [] }
        var values = [Float](repeating: 0, count: count), indices = [Int32](repeating: 0, count: count)
        var out = [Int32](repeating: 0, count: take)
        scores.withUnsafeBufferPointer { s in values.withUnsafeMutableBufferPointer { v in
        indices.withUnsafeMutableBufferPointer { i in out.withUnsafeMutableBufferPointer { o in
            TopKSelection.top(s.baseAddress!, count: count, take: take, values: v.baseAddress!, indices: i.baseAddress!,
                              into: o.baseAddress!)
        } } } }
        return out.map { Int($0) }
    }
}
