/// Transformer-XL's visibility and relative-position scores, as the tiled softmax kernel
/// consumes them.
///
/// Visibility: causal with `offset = Nk − Nq` (the segment's queries sit after the
/// memory), key padding at `keyEnd`, and keys before `keyBegin` hidden (memory slots a
/// batch item has not filled yet: its memory is right-aligned in the shared key range).
///
/// Scores: to the kernel's `scale · q_i · k_j` the mask adds, tile by tile,
///
///     scale · q_i · r_Δ   +   scale · u · k_j   +   scale · v · r_Δ,     Δ = i + offset − j
///
/// The last two are precomputed vectors (`keyBias[j]`, `distanceBias[Δ]`). The first is a
/// small product per 32-query panel of the tile: the band of relative rows the panel
/// needs (`Δ` from `Δmin` to `Δmin + Bc + 30`), read in place from the table as the
/// micro-kernel's broadcast operand, times the packed scaled queries,
/// `G[δ][l] = Σ_c r_{Δmin+δ}[c] · qT[c][l]`, then the diagonal shift
/// `Sᵀ[jj][l] += G[Δ(l, jj) − Δmin][l]`. No `Nq × Nk` array exists at any point.
struct RelativePositionMask: TileMask {
    var interval: IntervalMask
    /// Keys `< keyBegin` are invisible.
    var keyBegin: Int
    /// The score terms, with `offset = interval.offset`.
    var terms: RelativeScoreTerms
    /// Where the backward pass keeps the sums the parameters' gradients need (`nil`: the
    /// forward, or a backward without the key sums).
    var gradients: RelativeScoreGradients? = nil

    func forEachKeyTile(queries: PositionRun, tileSize: Int, _ body: (KeyTile) -> Void) {
        let keyBegin = self.keyBegin
        interval.forEachKeyTile(queries: queries, tileSize: tileSize) { tile in
            let keys = tile.keys
            if keys.start + keys.count <= keyBegin { return }
            let clipped = max(keys.start, keyBegin)
            var kept = tile
            kept.keys = PositionRun(start: clipped, count: keys.start + keys.count - clipped)
            body(kept)
        }
    }

    func maskScores(_ scores: UnsafeMutablePointer<Float>, ld: Int, tile: KeyTile, queries: PositionRun) {
        interval.maskScores(scores, ld: ld, tile: tile, queries: queries)
    }

    static var addsScoreTerms: Bool { true }

    static func scoreTermScratchCount(queryTile: Int, keyTile: Int) -> Int {
        RelativeScoreTerms.scratchCount(queryTile: queryTile, keyTile: keyTile)
    }

    func addScoreTerms(_ tile: ScoreTile) { terms.add(to: tile) }
}

extension RelativePositionMask: TransposedTileMask {
    /// The interval's query tiles for the keys of `keys` at or past `keyBegin`.
    func forEachQueryTile(seeing keys: PositionRun, queryLength: Int, queryTile: Int,
                          _ body: (_ index: Int, _ queries: PositionRun, _ tile: KeyTile) -> Void) {
        let clipped = max(keys.start, keyBegin), end = keys.start + keys.count
        guard clipped < end else { return }
        interval.forEachQueryTile(seeing: PositionRun(start: clipped, count: end - clipped), queryLength: queryLength,
                                  queryTile: queryTile, body)
    }

    func visibleQueryIndices(tile: KeyTile, queries: PositionRun, keys: Range<Int>) -> Range<Int> {
        interval.visibleQueryIndices(tile: tile, queries: queries, keys: keys)
    }

    static var takesScoreGradients: Bool { true }

    static func scoreGradientScratchCount(lanes: Int, keyRows: Int, headDim: Int) -> Int {
        RelativeScoreTerms.gradientScratchCount(lanes: lanes, keyRows: keyRows, headDim: headDim)
    }

    func takeScoreGradients(_ tile: ScoreGradientTile) {
        if let gradients { terms.takeGradients(tile, into: gradients) }
    }

    func publishScoreGradients(_ tile: ScoreGradientTile) {
        if let gradients { terms.publishGradients(tile, into: gradients) }
    }
}

/// The per-(batch item, head) sums the backward pass of ``RelativeScoreTerms`` keeps, from
/// which the conformer forms its gradients (`dS` the gradient of the score before `scale`):
///
///     keySums[j]           = Σ_i dS_ij                  (→ dK_j += u · keySums[j], ∂u)
///     distanceRows[Δ][c]   = Σ_{i−j+offset=Δ} dS_ij q_i[c]   (→ ∂r_Δ)
///     distanceSums[Δ]      = Σ_{i−j+offset=Δ} dS_ij          (→ ∂r_Δ += v · …, ∂v)
///
/// Each key's sum has one owner (its key block); the distance sums are added by the blocks
/// in block order (``TransposedTileMask/publishScoreGradients(_:)``), bitwise the same for
/// every thread count. Zero-filled by the caller.
struct RelativeScoreGradients {
    /// `nil`: not wanted (ETC: no key bias).
    var keySums: UnsafeMutablePointer<Float>?
    /// `Nk × headDim` (row `Δ` at `Δ · headDim`) and `Nk`; `nil`: not wanted.
    var distanceRows: UnsafeMutablePointer<Float>?
    var distanceSums: UnsafeMutablePointer<Float>?
}

extension RelativeScoreTerms {
    /// The band of distances a tile's pairs reach inside the table, `nil` when none.
    func gradientBand(_ tile: ScoreGradientTile) -> (first: Int, count: Int)? {
        let nearest = tile.queryStart + offset - (tile.keyStart + tile.keyCount - 1)
        let farthest = tile.queryStart + tile.queryCount - 1 + offset - tile.keyStart
        if clamped {
            // Distances past either end land on the table's first or last row.
            let first = min(max(nearest, 0), tableRows - 1), last = max(min(farthest, tableRows - 1), 0)
            return (first, last - first + 1)
        }
        let first = max(nearest, 0), last = min(farthest, tableRows - 1)
        return first <= last ? (first, last - first + 1) : nil
    }

    /// Band rows a tile may need: `lanes + keyRows − 1`, rounded up to whole `MR` blocks.
    static func bandRows(lanes: Int, keyRows: Int) -> Int { roundUp(lanes + keyRows - 1, MicroTile.mr) }

    /// The sheared `dSᵀ` band `H[δ][l]` (`bandRows × lanes`), the band's table rows packed
    /// (`bandRows × D′`), its `Σ dS q` rows (`bandRows × D′`) and its `Σ dS` (`bandRows`).
    static func gradientScratchCount(lanes: Int, keyRows: Int, headDim: Int) -> Int {
        let band = bandRows(lanes: lanes, keyRows: keyRows), dPad = roundUp(headDim, MicroTile.nr)
        return band * lanes + 2 * band * dPad + band
    }

    /// The parts of ``gradientScratchCount(lanes:keyRows:headDim:)``'s scratch.
    static func gradientScratch(_ tile: ScoreGradientTile)
        -> (band: UnsafeMutablePointer<Float>, packed: UnsafeMutablePointer<Float>,
            rows: UnsafeMutablePointer<Float>, sums: UnsafeMutablePointer<Float>) {
        let capacity = bandRows(lanes: tile.ld, keyRows: tile.keyRows)
        let band = tile.scratch, packed = band + capacity * tile.ld, rows = packed + capacity * tile.dPad
        return (band, packed, rows, rows + capacity * tile.dPad)
    }

    /// The backward of ``add(to:)`` for one tile: with `H[δ][l] = Σ dSᵀ[jj][l]` over the
    /// keys `jj` whose distance `Δ(l, jj)` reads row `first + δ` (unclamped, Transformer-XL:
    /// at most one key per `(δ, l)`, pairs outside the band are hidden, `dS = 0`; clamped,
    /// ETC: the keys past either end of the table all land on its first or last row, summed
    /// in key order),
    ///
    ///     dQ part[l]   += Σ_δ H[δ][l] · r_{first+δ}        (micro-kernel, depth = band)
    ///     rows[δ]       = Σ_l H[δ][l] · q_l                (micro-kernel, depth = queries)
    ///     sums[δ]       = Σ_l H[δ][l],   keySums[j] += Σ_l dSᵀ[jj][l]
    ///
    /// the last two into the scratch for ``publishGradients(_:into:)``.
    func takeGradients(_ tile: ScoreGradientTile, into gradients: RelativeScoreGradients) {
        let ld = tile.ld, ds = tile.scoreGradients
        if let keySums = gradients.keySums {
            for jj in 0..<tile.keyCount {
                var sum: Float = 0
                for l in 0..<tile.queryCount { sum += ds[jj * ld + l] }
                keySums[tile.keyStart + jj] += sum
            }
        }
        guard let (first, count) = gradientBand(tile) else { return }
        let (band, packed, rows, sums) = RelativeScoreTerms.gradientScratch(tile)
        band.update(repeating: 0, count: count * ld)
        for jj in 0..<tile.keyCount {
            let delta0 = tile.queryStart + offset - (tile.keyStart + jj) - first
            if clamped {
                for l in 0..<tile.queryCount {
                    let delta = min(max(delta0 + l, -first), tableRows - 1 - first)
                    band[delta * ld + l] += ds[jj * ld + l]
                }
            } else {
                for l in 0..<tile.queryCount where delta0 + l >= 0 && delta0 + l < count {
                    band[(delta0 + l) * ld + l] = ds[jj * ld + l]
                }
            }
        }
        for delta in 0..<count {
            let row = table + (first + delta) * tableRowStride, out = packed + delta * tile.dPad
            for c in 0..<tile.headDim { out[c] = row[c * tableDepthStride] }
        }
        TiledSoftmaxBackward.accumulateProduct(
            rows: tile.queryCount, width: tile.dPad, span: { _ in 0..<count },
            a: UnsafePointer(band), rowStride: 1, depthStride: ld, b: UnsafePointer(packed), ldb: tile.dPad,
            c: tile.queryGradients, ldc: tile.dPad, edge: tile.edge)
        guard gradients.distanceRows != nil else { return }
        TiledSoftmaxBackward.accumulateProduct(
            rows: count, width: tile.dPad, span: { _ in 0..<tile.queryCount },
            a: UnsafePointer(band), rowStride: ld, depthStride: 1, b: tile.queryRows, ldb: tile.ldq,
            c: rows, ldc: tile.dPad, edge: tile.edge, overwrite: true)
        for delta in 0..<count {
            var sum: Float = 0
            for l in 0..<tile.queryCount { sum += band[delta * ld + l] }
            sums[delta] = sum
        }
    }

    /// Adds the tile's distance sums (computed by ``takeGradients(_:into:)``) to the head's.
    func publishGradients(_ tile: ScoreGradientTile, into gradients: RelativeScoreGradients) {
        guard let distanceRows = gradients.distanceRows, let (first, count) = gradientBand(tile) else { return }
        let (_, _, rows, sums) = RelativeScoreTerms.gradientScratch(tile)
        for delta in 0..<count {
            let out = distanceRows + (first + delta) * tile.headDim, source = rows + delta * tile.dPad
            for c in 0..<tile.headDim { out[c] += source[c] }
            gradients.distanceSums?[first + delta] += sums[delta]
        }
    }
}

/// Scores that depend on the distance `Δ = i + offset − j` between query `i` and key `j`
/// through a table of rows `r_Δ`, added to a transposed score tile:
///
///     scale · q_i · r_Δ   +   keyBias[j]   +   distanceBias[Δ]
///
/// The first is a small product per 32-query panel of the tile: the band of relative rows
/// the panel needs (`Δ` from `Δmin` to `Δmin + Bc + 30`), read in place from the table as
/// the micro-kernel's broadcast operand, times the packed scaled queries,
/// `G[δ][l] = Σ_c r_{Δmin+δ}[c] · qT[c][l]`, then the diagonal shift
/// `Sᵀ[jj][l] += G[Δ(l, jj) − Δmin][l]`.
///
/// Distances outside `0..<tableRows`: with `clamped`, they read the nearest row (Shaw et
/// al.'s clipped relative positions: ETC); without, they only meet hidden pairs
/// (Transformer-XL's causal rule) and panels wholly outside the table are skipped.
struct RelativeScoreTerms {
    /// `r_0`; `r_Δ[c] = table[Δ · rowStride + c · depthStride]`, `Δ < rows` (the row
    /// stride may be negative: a table read backwards).
    var table: UnsafePointer<Float>
    var tableRowStride: Int
    var tableDepthStride: Int
    var tableRows: Int
    /// `Δ = i + offset − j`.
    var offset: Int
    /// Per key: `keyBias[j · keyBiasStride]` for `j < Nk` (stride 0: one value for all).
    var keyBias: UnsafePointer<Float>
    var keyBiasStride: Int = 1
    /// Per distance `Δ < tableRows`.
    var distanceBias: UnsafePointer<Float>
    /// Distinct and non-zero for every (batch item, head) of a call: the band a panel's
    /// buffer holds is reused only by the same owner.
    var owner: Int
    var clamped: Bool = false

    /// Rows of one panel's band buffer: `keyTile + NR − 1` relative rows, rounded up to
    /// whole `MR` blocks.
    static func bandCapacity(keyTile: Int) -> Int { roundUp(keyTile + MicroTile.nr - 1, MicroTile.mr) }

    /// Floats of the header that records, per panel, which band its buffer holds.
    static func headerCount(panels: Int) -> Int { roundUp(panels * 4 * 2, 16) }

    /// A band buffer per 32-query panel, plus the header.
    static func scratchCount(queryTile: Int, keyTile: Int) -> Int {
        let panels = (queryTile + MicroTile.nr - 1) / MicroTile.nr
        return headerCount(panels: panels) + panels * bandCapacity(keyTile: keyTile) * MicroTile.nr
    }

    func add(to tile: ScoreTile) {
        let nr = MicroTile.nr, mr = MicroTile.mr
        let panels = tile.ld / nr
        let capacity = RelativeScoreTerms.bandCapacity(keyTile: tile.keyTile)
        // Header per panel: (owner, queryStart, first, last) of the band its buffer holds.
        let header = UnsafeMutableRawPointer(tile.scratch).assumingMemoryBound(to: Int.self)
        let owner = self.owner, offset = self.offset
        let lastKey = tile.keyStart + tile.keyCount - 1
        for panel in stride(from: 0, to: tile.lanes, by: nr) {
            let g = tile.scratch + RelativeScoreTerms.headerCount(panels: panels) + panel / nr * capacity * nr
            let held = header + panel / nr * 4
            // Distances in this panel: Δ(l, jj) = (queryStart + panel + l + offset) − (keyStart + jj).
            let nearest = tile.queryStart + panel + offset - lastKey
            let farthest = tile.queryStart + panel + nr - 1 + offset - tile.keyStart
            // Clamped: distances outside the table read its first or last row. Otherwise
            // rows outside the table only meet hidden pairs (masked after this hook).
            let first = clamped ? min(max(nearest, 0), tableRows - 1) : max(nearest, 0)
            let last = clamped ? max(min(farthest, tableRows - 1), 0) : min(farthest, tableRows - 1)
            guard first <= last else { continue }
            let band = last - first + 1
            // Key tiles come in increasing order, so the band slides towards smaller Δ and
            // overlaps the previous tile's by up to NR − 1 rows: keep those (moved to their
            // new place), compute the rest. Values are the same bits either way.
            var fresh = band
            if held[0] == owner, held[1] == tile.queryStart, held[2] <= last, last <= held[3], first <= held[2] {
                let kept = last - held[2] + 1
                (g + (held[2] - first) * nr).update(from: g, count: kept * nr)
                fresh = held[2] - first
            }
            held[0] = owner; held[1] = tile.queryStart; held[2] = first; held[3] = last
            // G = R[first ...] · Qᵀ[panel]: relative rows read in place. The last block may
            // spill into kept rows; it rewrites them with the same values.
            for block in stride(from: 0, to: fresh, by: mr) {
                let rows = BroadcastOperand(base: table + (first + block) * tableRowStride,
                                            rowStride: tableRowStride, depthStride: tableDepthStride,
                                            rows: min(mr, band - block))
                microKernel(depth: tile.headDim, a: rows, b: tile.queries + panel, ldb: tile.ld,
                            c: g + block * nr, ldc: nr, update: .overwrite)
            }
            // The diagonal shift: lane l of key row jj takes G[Δ − first][l].
            for jj in 0..<tile.keyCount {
                let j = tile.keyStart + jj
                let delta0 = tile.queryStart + panel + offset - j
                let row = tile.scores + jj * tile.ld + panel
                let bias = keyBias[j * keyBiasStride]
                if delta0 >= first && delta0 + nr - 1 <= last {
                    // Every lane's distance is in the band (and the table).
                    // Lane l reads G[delta0 − first + l][l]: a stride of NR + 1 floats.
                    let diagonal = g + (delta0 - first) * nr
                    let distances = distanceBias + delta0
                    let biases = Vec16(repeating: bias)
                    let s = nr + 1
                    for half in stride(from: 0, to: nr, by: 16) {
                        let d = diagonal + half * s
                        let terms = Vec16(d[0], d[s], d[2 * s], d[3 * s], d[4 * s], d[5 * s], d[6 * s], d[7 * s],
                                          d[8 * s], d[9 * s], d[10 * s], d[11 * s], d[12 * s], d[13 * s],
                                          d[14 * s], d[15 * s])
                        store16(load16(row + half) + ((terms + load16(distances + half)) + biases), row + half)
                    }
                } else if clamped && (delta0 >= last || delta0 + nr - 1 <= first) {
                    // Every lane's distance is past one end of the table: one row for all.
                    let r = delta0 >= last ? last : first
                    let terms = g + (r - first) * nr
                    let distance = Vec16(repeating: distanceBias[r]), biases = Vec16(repeating: bias)
                    for half in stride(from: 0, to: nr, by: 16) {
                        store16(load16(row + half) + ((load16(terms + half) + distance) + biases), row + half)
                    }
                } else {
                    for l in 0..<nr {
                        let delta = delta0 + l
                        let inBand = min(max(delta - first, 0), band - 1)
                        let inTable = min(max(delta, 0), tableRows - 1)
                        row[l] += (g[inBand * nr + l] + distanceBias[inTable]) + bias
                    }
                }
            }
        }
    }
}
