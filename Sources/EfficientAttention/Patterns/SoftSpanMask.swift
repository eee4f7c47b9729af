/// Adaptive span's visibility: causal, bottom-right aligned, with the soft mask
/// `m(x) = clamp((R + z − x) / R, 0, 1)` on the distance `x = i + offset − j`
/// (`offset = Nk − Nq`).
///
/// Keys with `m = 0` (`x ≥ z + R`) are outside the listed tiles: the interval is causal
/// with `left = ⌈z + R⌉ − 1`, so the kernel's cost follows the span. Tiles whose
/// distances are all `≤ z` (weight 1) skip the weighting; the others multiply their
/// probabilities by `m`.
struct SoftSpanMask: TileMask {
    var interval: IntervalMask
    /// `z`, in positions.
    var span: Float
    /// `R > 0`, in positions.
    var ramp: Float
    /// The backward pass's `∂L/∂z` slots of this (batch item, head), one per key block
    /// (`nil`: the forward, or not wanted); zero-filled by the caller.
    var spanGradients: UnsafeMutablePointer<Double>? = nil

    init(queryLength: Int, keyLength: Int, keyEnd: Int, span: Float, ramp: Float) {
        interval = IntervalMask(queryLength: queryLength, keyLength: keyLength, causal: true, keyEnd: keyEnd)
        interval.left = SoftSpanMask.reach(span: span, ramp: ramp) - 1
        self.span = span
        self.ramp = ramp
    }

    /// Positions with a nonzero weight, the current one included: `⌈z + R⌉`
    /// (distances `0 ..< ⌈z + R⌉`). Requires finite `z ≥ 0`, `R > 0`.
    static func reach(span: Float, ramp: Float) -> Int {
        Int((Double(span) + Double(ramp)).rounded(.up))
    }

    func forEachKeyTile(queries: PositionRun, tileSize: Int, _ body: (KeyTile) -> Void) {
        interval.forEachKeyTile(queries: queries, tileSize: tileSize, body)
    }

    func maskScores(_ scores: UnsafeMutablePointer<Float>, ld: Int, tile: KeyTile, queries: PositionRun) {
        interval.maskScores(scores, ld: ld, tile: tile, queries: queries)
    }

    static var weightsProbabilities: Bool { true }

    func weightProbabilities(_ probabilities: UnsafeMutablePointer<Float>, ld: Int,
                             keyStart: Int, keyCount: Int, queryStart: Int, queryCount: Int) {
        // The largest distance in the tile; at most z means every weight is 1.
        let farthest = queryStart + queryCount - 1 + interval.offset - keyStart
        if Double(farthest) <= Double(span) { return }
        let lanes = Vec16(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
        let top = Vec16(repeating: ramp + span), width = Vec16(repeating: ramp)
        let zero = Vec16(), one = Vec16(repeating: 1)
        for jj in 0..<keyCount {
            // Distance of lane ii: x = (queryStart + ii + offset) − (keyStart + jj).
            let first = queryStart + interval.offset - keyStart - jj
            let row = probabilities + jj * ld
            var ii = 0
            while ii < queryCount {
                let x = lanes + Vec16(repeating: Float(first + ii))
                let weight = clamp((top - x) / width, zero, one)
                store16(load16(row + ii) * weight, row + ii)
                ii += 16
            }
        }
    }
}

extension SoftSpanMask: TransposedTileMask {
    func forEachQueryTile(seeing keys: PositionRun, queryLength: Int, queryTile: Int,
                          _ body: (_ index: Int, _ queries: PositionRun, _ tile: KeyTile) -> Void) {
        interval.forEachQueryTile(seeing: keys, queryLength: queryLength, queryTile: queryTile, body)
    }

    func visibleQueryIndices(tile: KeyTile, queries: PositionRun, keys: Range<Int>) -> Range<Int> {
        interval.visibleQueryIndices(tile: tile, queries: queries, keys: keys)
    }

    /// The weights, and `∂L/∂z` of the tile into the key block's slot:
    /// `Σ_ij ∂m/∂z · exp(s_ij − lse_i) · (dP_ij − D_i)` with `∂m/∂z = 1/R` where the forward's
    /// weight is strictly between 0 and 1, else 0 (the ramp's subgradient: 0 at its kinks),
    /// summed in Double over keys, then queries, in order.
    func weightProbabilitiesBackward(_ tile: WeightGradientTile) {
        let farthest = tile.queryStart + tile.queryCount - 1 + interval.offset - tile.keyStart
        if Double(farthest) <= Double(span) { return }
        if let spanGradients {
            let top = ramp + span
            var sum = 0.0
            for jj in 0..<tile.keyCount {
                let first = tile.queryStart + interval.offset - tile.keyStart - jj
                let p = tile.probabilities + jj * tile.ld, dp = tile.probabilityGradients + jj * tile.ld
                for ii in 0..<tile.queryCount {
                    // The forward's weight, in the same Float operations.
                    let weight = min(max((top - Float(first + ii)) / ramp, 0), 1)
                    if weight > 0 && weight < 1 { sum += Double(p[ii]) * Double(dp[ii] - tile.rowDot[ii]) }
                }
            }
            spanGradients[tile.block] += sum / Double(ramp)
        }
        weightProbabilities(tile.probabilities, ld: tile.ld, keyStart: tile.keyStart, keyCount: tile.keyCount,
                            queryStart: tile.queryStart, queryCount: tile.queryCount)
    }
}
