/// Mini-batch spherical k-means, the centroid update of routing attention: rows join
/// their most similar centroid (assignment), and every centroid with members moves by an
/// exponential moving average toward the mean of its members' unit vectors, rescaled to
/// unit length (centroid update).
///
/// The sums are kept in `Double`, so the order in which rows are added does not matter
/// to the result beyond that precision.
struct SphericalKMeans {
    /// The centroids rows are assigned to (`K` rows of `D`).
    let centres: [[Float]]
    /// Per centroid: the sum of its members' unit vectors, and how many they are.
    private(set) var sums: [Double], counts: [Int]

    /// - Complexity: O(K · D).
    init(centres: [[Float]]) {
        self.centres = centres
        sums = [Double](repeating: 0, count: centres.count * (centres.first?.count ?? 0))
        counts = [Int](repeating: 0, count: centres.count)
    }

    /// Assignment: row `x` joins the centroid `c` with the largest `x · c` (the first
    /// maximum), and `x / |x|` is added to its sum. A zero row, or one whose norm is not
    /// finite, joins none.
    ///
    /// - Complexity: O(K · D).
    mutating func assign(_ x: [Float]) {
        let d = x.count
        let norm = x.reduce(0) { $0 + $1 * $1 }.squareRoot()
        guard norm > 0, norm.isFinite else { return }
        var best = 0, bestScore = -Float.infinity
        for (c, centre) in centres.enumerated() {
            var score: Float = 0
            for t in 0..<d { score += x[t] * centre[t] }
            if score > bestScore { best = c; bestScore = score }
        }
        counts[best] += 1
        for t in 0..<d { sums[best * d + t] += Double(x[t] / norm) }
    }

    /// Centroid update: centroid `c` with members becomes `decay · c + (1 − decay) · mean`
    /// of its members' unit vectors, rescaled to unit length; `nil` for a centroid without
    /// members (or whose moved vector is zero), which stays as it is.
    ///
    /// - Complexity: O(K · D).
    func updated(decay: Float) -> [[Float]?] {
        centres.enumerated().map { c, centre in
            guard counts[c] > 0 else { return nil }
            let d = centre.count
            let moved = (0..<d).map { t in
                Double(decay) * Double(centre[t]) + Double(1 - decay) * sums[c * d + t] / Double(counts[c])
            }
            let norm = moved.reduce(0) { $0 + $1 * $1 }.squareRoot()
            guard norm > 0 else { return nil }
            return moved.map { Float($0 / norm) }
        }
    }
}
