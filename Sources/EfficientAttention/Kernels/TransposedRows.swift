/// Rows of one head packed transposed, as the micro-kernel's vector operand: routing
/// scores (`C · X̂ᵀ`) and LSH hashes (`Rᵀ Xᵀ`) put positions in SIMD lanes so that the
/// per-position reductions (top-w, argmax over buckets) are vertical.
enum TransposedRows {
    /// Row length for `n` positions: whole micro-kernel panels plus one, so that the `D`
    /// rows the micro-kernel reads are not a power of two apart (cache-set conflicts).
    static func stride(_ n: Int) -> Int { roundUp(n, MicroTile.nr) + MicroTile.nr }

    /// `out[c · ld + i] = x_i[c] · (normalise ? 1 / |x_i| : 1)` for rows `start..<start + count`
    /// of `rows` and `c < depth` (zero rows stay zero). Row by row: contiguous reads, and
    /// the stores of a panel's rows land in the same `depth` cache lines (L1-resident).
    /// Rows of any precision, widened as they are read.
    static func pack(_ rows: PermutedBlockAttention.Rows, start: Int, count: Int, depth: Int, normalise: Bool,
                     into out: UnsafeMutablePointer<Float>, ld: Int) {
        switch rows.view.precision {
        case .float32: pack(Float.self, rows, start: start, count: count, depth: depth, normalise: normalise,
                            into: out, ld: ld)
        case .float16: pack(HalfElement.self, rows, start: start, count: count, depth: depth, normalise: normalise,
                            into: out, ld: ld)
        case .bfloat16: pack(BFloat16Bits.self, rows, start: start, count: count, depth: depth, normalise: normalise,
                             into: out, ld: ld)
        }
    }

    @inline(__always)
    private static func pack<E: ActivationScalar>(_: E.Type, _ rows: PermutedBlockAttention.Rows, start: Int,
                                                  count: Int, depth: Int, normalise: Bool,
                                                  into out: UnsafeMutablePointer<Float>, ld: Int) {
        let es = rows.elementStride
        for i in start..<start + count {
            let row = rows.view.rawRow(rows.b, rows.h, i).assumingMemoryBound(to: E.self)
            var factor: Float = 1
            if normalise {
                let norm = rows.squaredNorm(i, count: depth).squareRoot()
                factor = norm > 0 ? 1 / norm : 0
            }
            let target = out + i
            if es == 1 {
                for c in 0..<depth { target[c &* ld] = E.widen(row[c]) * factor }
            } else {
                for c in 0..<depth { target[c &* ld] = E.widen(row[c &* es]) * factor }
            }
        }
    }

    /// Floats of ``packPanels(_:start:count:depth:normalise:into:)``'s layout for `n` positions.
    static func panelFloatCount(_ n: Int, depth: Int) -> Int { roundUp(n, MicroTile.nr) * depth }

    /// Like ``pack(_:start:count:depth:normalise:into:ld:)`` into the micro-kernel's packed
    /// `B` layout (``Gemm/PackedB``): position `i`, element `c` at
    /// `out[(i / NR) · depth · NR + c · NR + i % NR]`, so one panel of `NR` positions is
    /// `depth · NR` contiguous floats (one stream for the prefetchers, few pages).
    /// `start` is a multiple of `NR`; with `n` given, the lanes past position `n − 1` in
    /// its last panel are zeroed. `out` holds the panels from position `origin` on (a
    /// multiple of `NR`; 0: the whole sequence's layout).
    static func packPanels(_ rows: PermutedBlockAttention.Rows, start: Int, count: Int, depth: Int, normalise: Bool,
                           into out: UnsafeMutablePointer<Float>, n: Int? = nil, origin: Int = 0) {
        switch rows.view.precision {
        case .float32: packPanels(Float.self, rows, start: start, count: count, depth: depth, normalise: normalise,
                                  into: out, n: n, origin: origin)
        case .float16: packPanels(HalfElement.self, rows, start: start, count: count, depth: depth,
                                  normalise: normalise, into: out, n: n, origin: origin)
        case .bfloat16: packPanels(BFloat16Bits.self, rows, start: start, count: count, depth: depth,
                                   normalise: normalise, into: out, n: n, origin: origin)
        }
    }

    @inline(__always)
    private static func packPanels<E: ActivationScalar>(_: E.Type, _ rows: PermutedBlockAttention.Rows, start: Int,
                                                        count: Int, depth: Int, normalise: Bool,
                                                        into out: UnsafeMutablePointer<Float>, n: Int?, origin: Int) {
        let nr = MicroTile.nr
        @inline(__always) func row(_ i: Int) -> UnsafePointer<E> {
            rows.view.rawRow(rows.b, rows.h, i).assumingMemoryBound(to: E.self)
        }
        for first in Swift.stride(from: start, to: start + count, by: nr) {
            // Positions first..<first + nr land at panel + c · nr + (i − first).
            let panel = out + (first - origin) / nr * depth * nr
            guard rows.elementStride == 1 && start + count - first >= nr else {
                pack(E.self, rows, start: first, count: min(nr, start + count - first), depth: depth,
                     normalise: normalise, into: panel - first, ld: nr)
                continue
            }
            // Two blocks of 16 positions, widened and transposed 16 columns at a time in registers.
            for half in Swift.stride(from: 0, to: nr, by: 16) {
                let base = first + half
                var factor = Vec16(repeating: 1)
                if normalise {
                    for r in 0..<16 {
                        let norm = rows.squaredNorm(base + r, count: depth).squareRoot()
                        factor[r] = norm > 0 ? 1 / norm : 0
                    }
                }
                Transpose16.transpose(E.self, scale: factor, rows: { row(base + $0) }, depth: depth,
                                      into: panel + half, ld: nr)
            }
        }
        if let n, n % nr != 0, start + count == n {
            let panel = out + (n - origin) / nr * depth * nr
            for c in 0..<depth { (panel + c * nr + n % nr).update(repeating: 0, count: nr - n % nr) }
        }
    }
}
