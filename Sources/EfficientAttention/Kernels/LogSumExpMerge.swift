/// The exact merge of partial softmax-attention rows over disjoint key sets, by
/// log-sum-exp: the single definition of how parts weigh against each other (used by
/// ``AttentionResult/merged(with:)``, the tiled kernel's `merge`, decode's chunk merge and
/// the permuted-block kernel's round combine).
///
/// A part `c` is a row `o_c` with log-sum-exp `lse_c` (or an unnormalised row `O_c` with
/// running max `m_c` and sum `l_c`, i.e. `lse_c = m_c + log l_c`, `o_c = O_c / l_c`). With
/// `M = max_c lse_c` (the ``maximum``, over the parts the caller names):
///
///     weight_c = e^(lse_c − M)                    exactly 1 for the part that attains M
///     total    = Σ_c weight_c · l_c               (l_c = 1 for a normalised part), in order of ``add(_:sum:)``
///     lse      = M + log total                    (``logSumExp``)
///     o        = Σ_c (weight_c / total) · O_c     the caller scales and adds the rows
///
/// Conventions:
/// - `lse_c = −∞` marks a part with no visible key (fully masked): ``weight(_:)`` is
///   `e^(−∞) = 0`, so it adds nothing to `total` and its row gets weight 0.
/// - Every part fully masked (`M = −∞`): there is nothing to merge and the initialiser
///   returns `nil`; the caller keeps its empty-row convention (output 0 and `lse = −∞`,
///   or the held row unchanged).
/// - A part whose log-sum-exp is more than about 88 below `M` underflows to weight 0;
///   the result is still exact to rounding (its true weight is below 2⁻¹²⁶ of the total).
///
/// The arithmetic is fixed here (one `expf` per weight, `total` accumulated by separate
/// multiplies and adds in call order, `M + logf(total)`), so every caller rounds alike;
/// how the row weights are normalised (`weight / total`, or `weight · (1 / total)`) and
/// whether rows are added with fused multiply-adds stays the caller's, as it was.
///
/// `@_spi(Testing)`: the tests check it against a Double reference.
///
/// - Complexity: O(1) per part; the row updates are O(Dv) per part.
@_spi(Testing) public struct LogSumExpMerge {
    /// `M`, the largest log-sum-exp of the parts (finite).
    public let maximum: Float
    /// `Σ weight_c · l_c` over the parts added so far.
    public private(set) var total: Float = 0

    /// A merge of parts whose largest log-sum-exp is `maximum`; `nil` when it is `−∞`
    /// (every part fully masked).
    @inline(__always)
    public init?(maximum: Float) {
        guard maximum > -.infinity else { return nil }
        self.maximum = maximum
    }

    /// `e^(lse − M)`: 1 for the part attaining the maximum, 0 for a fully masked part.
    @inline(__always)
    public func weight(_ lse: Float) -> Float { expf(lse - maximum) }

    /// Adds a part of weight `weight` (from ``weight(_:)``) and row sum `sum` to `total`.
    @inline(__always)
    public mutating func add(_ weight: Float, sum: Float = 1) { total += weight * sum }

    /// `M + log total`, the merged log-sum-exp.
    @inline(__always)
    public var logSumExp: Float { maximum + logf(total) }

    /// `out[x · stride] += weight · row[x]` for `x < count`, a separate multiply and add per
    /// element (no fused multiply-add, whatever the build).
    @inline(__always)
    public static func accumulate(_ weight: Float, _ row: UnsafePointer<Float>,
                           into out: UnsafeMutablePointer<Float>, stride: Int, count: Int) {
        for x in 0..<count { out[x &* stride] += weight * row[x] }
    }
}
