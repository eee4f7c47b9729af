/// Axial attention's visibility (Ho et al. 2019) for one grid: positions lie on the grid
/// `axes = [n₁, …, n_a]` in row-major order (`N = Π nₜ`, queries and keys on the same
/// grid), and key `j` is visible to query `i` iff their coordinates agree on every axis
/// but at most one; with `causal`, also `coord_t(j) ≤ coord_t(i)` on the axis `t` where
/// they differ. This is the `.union` combination (the query itself counted once); the
/// same pattern for every head.
///
/// Axis `t` has stride `sₜ = Π_{u>t} n_u`: the keys query `i` sees along it are the line
/// `base, base + sₜ, …, base + (nₜ − 1)·sₜ` through `i`, read in place `sₜ` rows apart.
public struct AxialPattern: AttentionPattern {
    /// `[n₁, …, n_a]`, each at least 1.
    public let axes: [Int]
    public let causal: Bool
    /// Position strides of the axes (`Π_{u>t} n_u`).
    let strides: [Int]

    /// The pattern on the grid `axes` (not checked here: ``AxialAttention`` validates).
    public init(axes: [Int], causal: Bool) {
        self.axes = axes
        self.causal = causal
        var strides = [Int](repeating: 1, count: axes.count)
        for t in stride(from: axes.count - 2, through: 0, by: -1) { strides[t] = strides[t + 1] * axes[t + 1] }
        self.strides = strides
    }

    public var queryLength: Int { axes.isEmpty ? 0 : strides[0] * axes[0] }
    public var keyLength: Int { queryLength }
    public var heads: Int { 1 }

    /// The coordinate of position `i` on axis `t`.
    func coordinate(_ i: Int, axis t: Int) -> Int { i / strides[t] % axes[t] }

    public func isVisible(head: Int, query i: Int, key j: Int) -> Bool {
        guard j >= 0, j < keyLength else { return false }
        var differing: Int? = nil
        for t in axes.indices where coordinate(i, axis: t) != coordinate(j, axis: t) {
            guard differing == nil else { return false }
            differing = t
        }
        guard let t = differing else { return true }      // j = i
        return !causal || coordinate(j, axis: t) < coordinate(i, axis: t)
    }

    public func visibleKeyCount(head: Int, query i: Int) -> Int {
        var count = 1
        for t in axes.indices { count += causal ? coordinate(i, axis: t) : axes[t] - 1 }
        return count
    }

    /// Queries per tile on axis `t`: lines of `nₜ` cut into equal parts of at most the
    /// default query tile.
    func queryTile(axis t: Int) -> Int {
        let n = axes[t], tile = TiledSoftmaxAttention.Tiling.defaultQueryTile
        return ceilDiv(n, ceilDiv(n, tile))
    }

    /// Axis `t`'s keys for every query (its own line), over the first `keyEnd` positions;
    /// with `hidesSelf`, the query's own position is hidden (a later pass of `.union`,
    /// whose first pass already counted it).
    func lineMask(axis t: Int, keyEnd: Int, hidesSelf: Bool) -> AxisLineMask {
        AxisLineMask(stride: strides[t], length: axes[t], causal: causal, hidesSelf: hidesSelf, keyEnd: keyEnd)
    }

    /// The backward pass's key blocks for axis `t`: the residue classes modulo its stride
    /// (runs along the lines), each reaching the queries of its own class only.
    func backwardKeyBlocks(axis t: Int) -> TiledSoftmaxBackward.KeyBlocks {
        TiledSoftmaxBackward.KeyBlocks(modulus: strides[t], classes: 0..<strides[t], disjointClasses: true)
    }

    public func tiles(head: Int) -> [PatternTile] {
        axes.indices.flatMap { t in
            patternTiles(lineMask(axis: t, keyEnd: keyLength, hidesSelf: t > 0), pass: t,
                         queryLength: queryLength, queryTile: queryTile(axis: t))
        }
    }
}

/// One axis of a grid: queries grouped by line (tiles of step `stride` that never leave
/// their line), each seeing the keys of its own line `stride` rows apart (read in place),
/// causally up to itself when `causal`, without itself when `hidesSelf`.
struct AxisLineMask: TileMask {
    var stride: Int
    var length: Int
    var causal: Bool
    var hidesSelf: Bool
    var keyEnd: Int

    var queryPartition: QueryPartition { .lines(stride: stride, length: length) }

    func forEachKeyTile(queries: PositionRun, tileSize: Int, _ body: (KeyTile) -> Void) {
        let base = queries.start - queries.start / stride % length * stride
        guard base < keyEnd else { return }
        var last = base + (min(length, (keyEnd - 1 - base) / stride + 1) - 1) * stride
        if causal { last = min(last, queries.last) }
        forEachTile(from: base, through: last, step: stride, tileSize: tileSize) { keys in
            let cutByDiagonal = causal && keys.last > queries.start
            let holdsQuery = hidesSelf && keys.start <= queries.last && keys.last >= queries.start
            body(KeyTile(keys: keys, fullyVisible: !cutByDiagonal && !holdsQuery))
        }
    }

    func visibleKeyIndices(tile: KeyTile, queries: PositionRun, lanes: Range<Int>) -> Range<Int> {
        guard causal else { return 0..<tile.keys.count }
        return causalVisibleKeyIndices(tile: tile, queries: queries, lanes: lanes, offset: 0)
    }

    func maskScores(_ scores: UnsafeMutablePointer<Float>, ld: Int, tile: KeyTile, queries: PositionRun) {
        let hidesSelf = hidesSelf
        if !causal {
            // A non-causal tile is partial only for `hidesSelf`: one score per query, `j = i`,
            // set directly rather than by a compare over the whole tile.
            return hideOwnPositions(scores, ld: ld, keys: tile.keys, queries: queries)
        }
        maskTransposedScores(scores, ld: ld, keys: tile.keys, queries: queries) { j, i in
            // Queries and keys share the line: positions compare like coordinates on it.
            let key = SIMD16<Int32>(repeating: Int32(clamping: j))
            return hidesSelf ? i .<= key : i .< key
        }
    }
}
