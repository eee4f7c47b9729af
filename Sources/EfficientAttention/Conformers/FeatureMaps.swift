/// A feature map `φ: R^D → R^m` for kernelized linear attention (``LinearAttention``).
///
/// Linear attention computes `φ(q)ᵀ Σ_j φ(k_j) v_jᵀ / (φ(q)ᵀ Σ_j φ(k_j) + ε)`; the map
/// decides which kernel `φ(q)ᵀφ(k)` approximates. Implement ``apply(_:rows:rowStride:columnStride:headDim:output:outputStride:logScale:)``
/// to add your own; features should be non-negative (the ratio is a weighted mean then).
///
/// Maps that exponentiate return each row's features divided by a positive factor
/// `exp(logScale[r])` (the row's stabiliser): the true features are
/// `exp(logScale[r]) · output[r]`. The linear-attention scan rescales key rows to one
/// common stabiliser, and the query stabilisers cancel in the ratio (they enter only the
/// log-sum-exp).
public protocol FeatureMap: Sendable {
    /// The registry name of linear attention with this map (`"linear-elu"`, `"performer"`, ...).
    var attentionName: String { get }

    /// The number of features `m` for head dimension `headDim`; throws an
    /// ``AttentionError`` if the map cannot take that dimension.
    func featureCount(headDim: Int) throws -> Int

    /// FLOPs of one row's features (for the cost model).
    func flopsPerRow(headDim: Int) -> Double

    /// Features of `rows` rows: row `r` is `x_r[c] = input[r · rowStride + c · columnStride]`
    /// for `c < headDim`. Writes `φ(x_r)[f] · exp(−logScale[r])` to
    /// `output[r · outputStride + f]` for `f < m` and the row's `logScale[r]`.
    func apply(_ input: UnsafePointer<Float>, rows: Int, rowStride: Int, columnStride: Int, headDim: Int,
               output: UnsafeMutablePointer<Float>, outputStride: Int, logScale: UnsafeMutablePointer<Float>)
}

/// A feature map with a derivative, for the backward of ``LinearAttention``
/// (``DifferentiableAttention``).
public protocol DifferentiableFeatureMap: FeatureMap {
    /// `dx_r = J_φ(x_r)ᵀ g_r` for `rows` rows, written to `output[r · outputStride + c]`
    /// for `c < headDim`, where `g_r` is `∂L/∂φ(x_r)`. `features` holds `φ(x_r) · e^(−λ_r)`
    /// (what ``apply(_:rows:rowStride:columnStride:headDim:output:outputStride:logScale:)``
    /// wrote, possibly rescaled by a positive per-row factor) and `featureGradient` holds
    /// `g_r · e^(λ_r)` for the same `λ_r` (`λ_r = 0` for maps whose `logScale` is 0), both
    /// rows `featureStride` apart; the map may overwrite `featureGradient`. Parameters of
    /// the map (a projection `W`) are held fixed.
    func backward(_ input: UnsafePointer<Float>, rows: Int, rowStride: Int, columnStride: Int, headDim: Int,
                  features: UnsafePointer<Float>, featureGradient: UnsafeMutablePointer<Float>, featureStride: Int,
                  output: UnsafeMutablePointer<Float>, outputStride: Int)
}

/// `φ(x) = elu(x) + 1` elementwise (Katharopoulos et al. 2020): `x + 1` for `x > 0`,
/// `exp(x)` otherwise; `m = D`, no stabiliser.
///
/// - Complexity: `D` exponentials per row.
public struct EluPlusOneFeatures: FeatureMap {
    public init() {}

    public var attentionName: String { "linear-elu" }

    public func featureCount(headDim: Int) throws -> Int { headDim }

    public func flopsPerRow(headDim: Int) -> Double { Double(headDim) }

    public func apply(_ input: UnsafePointer<Float>, rows: Int, rowStride: Int, columnStride: Int, headDim: Int,
                      output: UnsafeMutablePointer<Float>, outputStride: Int, logScale: UnsafeMutablePointer<Float>) {
        let one = Vec16(repeating: 1), zero = Vec16()
        for r in 0..<rows {
            let x = input + r * rowStride, y = output + r * outputStride
            logScale[r] = 0
            var c = 0
            // Vector lanes for every column stride: strided rows give the contiguous bits.
            while c + 16 <= headDim {
                let v = gather16(x + c * columnStride, columnStride)
                var e = VectorMath.exp16(v)
                e.replace(with: v + one, where: v .> zero)
                store16(e, y + c)
                c += 16
            }
            while c < headDim {
                let v = x[c * columnStride]
                y[c] = v > 0 ? v + 1 : expf(v)
                c += 1
            }
        }
    }
}

extension EluPlusOneFeatures: DifferentiableFeatureMap {
    /// `dx = g · φ'(x)`: `φ' = 1` for `x > 0`, `e^x = φ(x)` otherwise.
    public func backward(_ input: UnsafePointer<Float>, rows: Int, rowStride: Int, columnStride: Int, headDim: Int,
                         features: UnsafePointer<Float>, featureGradient: UnsafeMutablePointer<Float>,
                         featureStride: Int, output: UnsafeMutablePointer<Float>, outputStride: Int) {
        let zero = Vec16()
        for r in 0..<rows {
            let x = input + r * rowStride, y = features + r * featureStride
            let g = featureGradient + r * featureStride, out = output + r * outputStride
            var c = 0
            // Vector lanes (a select, not a branch: the signs of x are data).
            while c + 16 <= headDim {
                let gradient = load16(g + c)
                var d = gradient * load16(y + c)
                d.replace(with: gradient, where: gather16(x + c * columnStride, columnStride) .> zero)
                store16(d, out + c)
                c += 16
            }
            while c < headDim {
                out[c] = x[c * columnStride] > 0 ? g[c] : g[c] * y[c]
                c += 1
            }
        }
    }
}

/// Random features computed from a projection `W ∈ R^{m × D}` through the shared GEMM:
/// the common part of FAVOR+ and ReLU features. `W`'s rows are orthogonal within blocks
/// of `D` and scaled to chi-distributed norms (Choromanski et al. 2021), drawn from a
/// seeded generator, or given.
public struct RandomProjection: Sendable, Equatable {
    /// `m`.
    public let features: Int
    /// `D`.
    public let headDim: Int
    /// `W`, `[m, D]` row-major.
    public let weights: [Float]
    /// `(inputScale · W)ᵀ` packed as the GEMM's `B` operand (`D × m`, 32-column panels).
    let packed: [Float]
    /// `W` packed as the GEMM's `B` operand (`m × D`), for the backward `u ↦ uᵀ W`.
    let packedBack: [Float]

    /// Orthogonal random features: each block of `D` rows of `W` is an orthonormal basis
    /// (Gram-Schmidt of a Gaussian matrix) whose rows are rescaled to the norms of
    /// independent Gaussian vectors, so each row has the `N(0, I_D)` norm distribution.
    ///
    /// - Throws: ``AttentionError/invalidParameter(_:)`` when `features` or `headDim` is below 1.
    /// - Complexity: `O(m · D²)` (Gram-Schmidt per block), done once per configuration.
    public init(features: Int, headDim: Int, seed: UInt64) throws {
        try RandomProjection.check(features: features, headDim: headDim)
        try checkFloatAllocation(headDim, headDim, 2, option: "random features Gram-Schmidt block [headDim, headDim] of Double")
        var rng = SeededGenerator(seed: seed)
        var w = [Float]()
        w.reserveCapacity(features * headDim)
        while w.count < features * headDim {
            var block = (0..<headDim).map { _ in (0..<headDim).map { _ in rng.nextGaussian() } }
            for r in 0..<headDim {
                for p in 0..<r {
                    var dot = 0.0
                    for c in 0..<headDim { dot += block[r][c] * block[p][c] }
                    for c in 0..<headDim { block[r][c] -= dot * block[p][c] }
                }
                let norm = block[r].reduce(0) { $0 + $1 * $1 }.squareRoot()
                for c in 0..<headDim { block[r][c] /= norm }
            }
            for r in 0..<headDim where w.count < features * headDim {
                let chi = (0..<headDim).reduce(0.0) { sum, _ in let g = rng.nextGaussian(); return sum + g * g }
                    .squareRoot()
                w += block[r].map { Float($0 * chi) }
            }
        }
        try self.init(weights: w, features: features, headDim: headDim)
    }

    /// A given `W` (`features · headDim` floats, `[m, D]` row-major).
    ///
    /// - Throws: ``AttentionError/shapeMismatch(_:)`` when `weights` has the wrong count.
    /// - Complexity: `O(m · D)` to pack `Wᵀ` for the GEMM.
    public init(weights: [Float], features: Int, headDim: Int) throws {
        try RandomProjection.check(features: features, headDim: headDim)
        guard weights.count == features * headDim else {
            throw AttentionError.shapeMismatch(
                "projection W has \(weights.count) elements, expected [features \(features), headDim \(headDim)] = \(features * headDim)")
        }
        self.features = features
        self.headDim = headDim
        self.weights = weights
        // The FAVOR+ input scale D^(-1/4) is applied by the maps; pack plain Wᵀ here.
        var packed = [Float](repeating: 0, count: Gemm.PackedB.floatCount(depth: headDim, columns: features))
        weights.withUnsafeBufferPointer { w in packed.withUnsafeMutableBufferPointer { p in
            _ = Gemm.PackedB.pack(MatrixOperand(base: w.baseAddress!, rowStride: 1, columnStride: headDim),
                                  depth: headDim, columns: features, into: p.baseAddress!)
        } }
        self.packed = packed
        var packedBack = [Float](repeating: 0, count: Gemm.PackedB.floatCount(depth: features, columns: headDim))
        weights.withUnsafeBufferPointer { w in packedBack.withUnsafeMutableBufferPointer { p in
            _ = Gemm.PackedB.pack(MatrixOperand(base: w.baseAddress!, rowStride: headDim, columnStride: 1),
                                  depth: features, columns: headDim, into: p.baseAddress!)
        } }
        self.packedBack = packedBack
    }

    private static func check(features: Int, headDim: Int) throws {
        guard features >= 1 else {
            throw AttentionError.invalidParameter("random features m must be at least 1, got \(features)")
        }
        guard headDim >= 1 else {
            throw AttentionError.invalidParameter("random features headDim must be at least 1, got \(headDim)")
        }
        try checkLimit(features, "random features m", variant: "random features")
        try checkLimit(headDim, "headDim", variant: "random features")
        // W [m, D] and its packed copy (padded to whole panels).
        try checkFloatAllocation(features + 64, headDim + 64, 2, option: "random features W [m, D]")
    }

    func checkHeadDim(_ d: Int, _ map: String) throws {
        guard d == headDim else {
            throw AttentionError.shapeMismatch(
                "\(map) projection W was made for headDim \(headDim), the problem has headDim \(d)")
        }
    }

    /// `output[r] = W x_r` for `rows` rows (the shared GEMM; `x` read in place). Its
    /// workspace (one edge tile, `W` being prepacked) is on the stack: no allocation on any
    /// thread.
    func project(_ input: UnsafePointer<Float>, rows: Int, rowStride: Int, columnStride: Int,
                 output: UnsafeMutablePointer<Float>, outputStride: Int) {
        // 16-byte alignment (the tile's vectors need no more): the standard library keeps
        // temporary allocations of up to 1 KiB with alignment 16 on the stack.
        let bytes = Gemm.Workspace.byteCount(packing: false)
        withUnsafeTemporaryAllocation(byteCount: bytes, alignment: 16) { raw in
        var carver = WorkspaceCarver(start: raw.baseAddress!, end: raw.baseAddress! + bytes)
        let space = Gemm.Workspace(carving: &carver, packing: false)
        packed.withUnsafeBufferPointer { p in
            Gemm.multiply(m: rows, n: features, depth: headDim,
                          a: MatrixOperand(base: input, rowStride: rowStride, columnStride: columnStride),
                          packA: false,
                          b: .packed(Gemm.PackedB(base: p.baseAddress!, depth: headDim, columns: features)),
                          c: output, ldc: outputStride, workspace: space)
        }
        }
    }
}

extension RandomProjection {
    /// `output[r] = Wᵀ u_r` (`u_r` the `m` entries of row `r` of `input`, rows `inputStride`
    /// apart): the backward of ``project(_:rows:rowStride:columnStride:output:outputStride:)``.
    func projectBack(_ input: UnsafePointer<Float>, rows: Int, inputStride: Int,
                     output: UnsafeMutablePointer<Float>, outputStride: Int) {
        let bytes = Gemm.Workspace.byteCount(packing: false)
        withUnsafeTemporaryAllocation(byteCount: bytes, alignment: 16) { raw in
        var carver = WorkspaceCarver(start: raw.baseAddress!, end: raw.baseAddress! + bytes)
        let space = Gemm.Workspace(carving: &carver, packing: false)
        packedBack.withUnsafeBufferPointer { p in
            Gemm.multiply(m: rows, n: headDim, depth: features,
                          a: MatrixOperand(base: input, rowStride: inputStride, columnStride: 1), packA: false,
                          b: .packed(Gemm.PackedB(base: p.baseAddress!, depth: features, columns: headDim)),
                          c: output, ldc: outputStride, workspace: space)
        }
        }
    }
}

/// FAVOR+ positive orthogonal random features (Choromanski et al. 2021):
/// `x' = x · D^(-1/4)`, `φ(x) = exp(W x' − ‖x'‖²/2) / sqrt(m)`, so that
/// `E[φ(q)ᵀφ(k)] = exp(q·k / sqrt(D))`: linear attention with this map approaches softmax
/// attention as `m` grows. Each row is stabilised by its largest exponent (returned as
/// `logScale`), so no exponential overflows.
///
/// - Complexity: `2 · D · m` FLOPs (a GEMM) and `m` exponentials per row.
public struct FavorPlusFeatures: FeatureMap {
    /// `W` and its packed form.
    public let projection: RandomProjection

    /// `m` orthogonal random features (default 256) for head dimension `headDim`, from `seed`.
    public init(features: Int = 256, headDim: Int, seed: UInt64 = 0) throws {
        projection = try RandomProjection(features: features, headDim: headDim, seed: seed)
    }

    /// Given features `W` (see ``RandomProjection``).
    public init(projection: RandomProjection) {
        self.projection = projection
    }

    public var attentionName: String { "performer" }

    public func featureCount(headDim: Int) throws -> Int {
        try projection.checkHeadDim(headDim, "FAVOR+")
        return projection.features
    }

    public func flopsPerRow(headDim: Int) -> Double { Double(2 * headDim * projection.features + 2 * projection.features) }

    public func apply(_ input: UnsafePointer<Float>, rows: Int, rowStride: Int, columnStride: Int, headDim: Int,
                      output: UnsafeMutablePointer<Float>, outputStride: Int, logScale: UnsafeMutablePointer<Float>) {
        let m = projection.features
        projection.project(input, rows: rows, rowStride: rowStride, columnStride: columnStride,
                           output: output, outputStride: outputStride)
        // W x' = D^(-1/4) · W x; ‖x'‖² = ‖x‖² / sqrt(D).
        let inputScale = 1 / Float(headDim).squareRoot().squareRoot()
        let logNorm = 0.5 * logf(Float(m))
        let full = m / 16 * 16
        for r in 0..<rows {
            let x = input + r * rowStride, y = output + r * outputStride
            let squares = dot(x, columnStride, x, columnStride, count: headDim)
            let half = squares * inputScale * inputScale / 2
            var maxima = Vec16(repeating: -.infinity)
            var f = 0
            while f < full { maxima = maximum(maxima, load16(y + f)); f += 16 }
            var rowMax = maxima.max()
            while f < m { rowMax = max(rowMax, y[f]); f += 1 }
            // exp(s·y − half − (s·max − half)) = exp(s·(y − max)).
            let s = Vec16(repeating: inputScale), top = Vec16(repeating: rowMax)
            f = 0
            while f < full { store16(VectorMath.exp16((load16(y + f) - top) * s), y + f); f += 16 }
            while f < m { y[f] = expf((y[f] - rowMax) * inputScale); f += 1 }
            logScale[r] = inputScale * rowMax - half - logNorm
        }
    }
}

extension FavorPlusFeatures: DifferentiableFeatureMap {
    /// `∂φ_f/∂x = φ_f · (s w_f − s² x)` with `s = D^(−1/4)`, so
    /// `dx = s Wᵀ(g ∘ φ) − s² (Σ_f g_f φ_f) x` (`W` fixed).
    public func backward(_ input: UnsafePointer<Float>, rows: Int, rowStride: Int, columnStride: Int, headDim: Int,
                         features: UnsafePointer<Float>, featureGradient: UnsafeMutablePointer<Float>,
                         featureStride: Int, output: UnsafeMutablePointer<Float>, outputStride: Int) {
        let m = projection.features
        let s = 1 / Float(headDim).squareRoot().squareRoot()
        for r in 0..<rows {
            let g = featureGradient + r * featureStride, y = features + r * featureStride
            for f in 0..<m { g[f] *= y[f] }
        }
        projection.projectBack(featureGradient, rows: rows, inputStride: featureStride,
                               output: output, outputStride: outputStride)
        for r in 0..<rows {
            let x = input + r * rowStride, out = output + r * outputStride
            var total: Float = 0
            let g = featureGradient + r * featureStride
            for f in 0..<m { total += g[f] }
            let t = s * s * total
            for c in 0..<headDim { out[c] = s * out[c] - t * x[c * columnStride] }
        }
    }
}

/// ReLU random features `φ(x) = relu(W x)` (the Performer's generalised-attention option),
/// with the same orthogonal `W` as FAVOR+; no stabiliser.
///
/// - Complexity: `2 · D · m` FLOPs (a GEMM) per row.
public struct ReLUFeatures: FeatureMap {
    public let projection: RandomProjection

    public init(features: Int = 256, headDim: Int, seed: UInt64 = 0) throws {
        projection = try RandomProjection(features: features, headDim: headDim, seed: seed)
    }

    public init(projection: RandomProjection) {
        self.projection = projection
    }

    public var attentionName: String { "linear-relu" }

    public func featureCount(headDim: Int) throws -> Int {
        try projection.checkHeadDim(headDim, "ReLU features")
        return projection.features
    }

    public func flopsPerRow(headDim: Int) -> Double { Double(2 * headDim * projection.features) }

    public func apply(_ input: UnsafePointer<Float>, rows: Int, rowStride: Int, columnStride: Int, headDim: Int,
                      output: UnsafeMutablePointer<Float>, outputStride: Int, logScale: UnsafeMutablePointer<Float>) {
        let m = projection.features
        projection.project(input, rows: rows, rowStride: rowStride, columnStride: columnStride,
                           output: output, outputStride: outputStride)
        let zero = Vec16()
        for r in 0..<rows {
            let y = output + r * outputStride
            logScale[r] = 0
            var f = 0
            while f + 16 <= m {
                var v = load16(y + f)
                v.replace(with: zero, where: v .< zero)
                store16(v, y + f)
                f += 16
            }
            while f < m { y[f] = max(0, y[f]); f += 1 }
        }
    }
}

extension ReLUFeatures: DifferentiableFeatureMap {
    /// `dx = Wᵀ(g ∘ [W x > 0])` (`W` fixed; the step's subgradient at 0 is 0).
    public func backward(_ input: UnsafePointer<Float>, rows: Int, rowStride: Int, columnStride: Int, headDim: Int,
                         features: UnsafePointer<Float>, featureGradient: UnsafeMutablePointer<Float>,
                         featureStride: Int, output: UnsafeMutablePointer<Float>, outputStride: Int) {
        let m = projection.features
        for r in 0..<rows {
            let g = featureGradient + r * featureStride, y = features + r * featureStride
            for f in 0..<m { g[f] = y[f] > 0 ? g[f] : 0 }   // a select the compiler vectorises, not a branch
        }
        projection.projectBack(featureGradient, rows: rows, inputStride: featureStride,
                               output: output, outputStride: outputStride)
    }
}
