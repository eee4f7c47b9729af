/// Memory-compressed attention's causal rule over compressed keys: compressed key `t`
/// (the window of keys `tc ..< min((t + 1)c, L)`) is visible to query `i` iff the window's
/// last key `e_t = min((t + 1)c, L) − 1` is at or before `i + offset` (`offset = Nk − Nq`).
/// The visible keys of a query are a prefix `0 ..< limit(i)`, growing with `i`.
struct WindowEndMask: TileMask {
    /// The compression `c`.
    var compression: Int
    /// The valid (uncompressed) key length `L`.
    var keyLength: Int
    var offset: Int

    /// Compressed keys that exist: `⌈L / c⌉`.
    var keyEnd: Int { WindowCompression.compressedLength(keyLength, compression: compression) }

    /// The last uncompressed key of compressed key `t`.
    @inline(__always)
    func windowEnd(_ t: Int) -> Int { min((t + 1) * compression, keyLength) - 1 }

    /// The number of compressed keys query position `p = i + offset` sees.
    @inline(__always)
    func limit(position p: Int) -> Int {
        p >= keyLength - 1 ? keyEnd : max(0, floorDiv(p + 1, compression))
    }

    /// `Σ limit(p)` over the positions `p` of `queries` consecutive queries from `first`, in
    /// closed form: the compressed keys the causal rule lets a call score per head.
    ///
    /// - Complexity: O(1).
    func visiblePairs(firstPosition first: Int, queries: Int) -> Int {
        guard queries > 0 else { return 0 }
        let last = first + queries - 1, c = compression
        // Σ_{x=0}^{n} ⌊x / c⌋ = c·q(q − 1)/2 + q·(r + 1) with n = qc + r (0 for n < 0).
        func floorSum(_ n: Int) -> Int {
            guard n >= 0 else { return 0 }
            let q = n / c, r = n % c
            return c * q * (q - 1) / 2 + q * (r + 1)
        }
        // Positions before L − 1 see ⌊(p + 1) / c⌋ (at least 0); the rest every compressed key.
        let partialEnd = min(last, keyLength - 2)
        let partial = first <= partialEnd ? floorSum(partialEnd + 1) - floorSum(max(first + 1, 0) - 1) : 0
        let full = max(0, last - max(first, keyLength - 1) + 1)
        return partial + full * keyEnd
    }

    func forEachKeyTile(queries: PositionRun, tileSize: Int, _ body: (KeyTile) -> Void) {
        let seenByAll = limit(position: queries.start + offset)
        forEachTile(from: 0, through: limit(position: queries.last + offset) - 1, tileSize: tileSize) { keys in
            body(KeyTile(keys: keys, fullyVisible: keys.last < seenByAll))
        }
    }

    func visibleKeyIndices(tile: KeyTile, queries: PositionRun, lanes: Range<Int>) -> Range<Int> {
        guard let p = lanePositions(queries, lanes) else { return 0..<0 }
        return runIndices(tile.keys, from: 0, through: limit(position: p.last + offset) - 1)
    }

    func maskScores(_ scores: UnsafeMutablePointer<Float>, ld: Int, tile: KeyTile, queries: PositionRun) {
        maskTransposedScores(scores, ld: ld, keys: tile.keys, queries: queries) { t, i in
            // Hidden from the queries before the window's end.
            i .< SIMD16<Int32>(repeating: Int32(clamping: windowEnd(t) - offset))
        }
    }
}
