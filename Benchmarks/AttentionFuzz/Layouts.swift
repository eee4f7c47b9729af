@_spi(Testing) @_spi(Benchmarking) import EfficientAttention

/// Random tensors and random memory layouts of the same elements.
extension SeededGenerator {
    /// Uniform in `range` (`range` must not be empty).
    mutating func int(_ range: ClosedRange<Int>) -> Int {
        Int.random(in: range, using: &self)
    }

    /// True with probability `p`.
    mutating func chance(_ p: Double) -> Bool {
        Double(next() >> 11) * 0x1p-53 < p
    }

    /// One of `values`, uniformly.
    mutating func pick<T>(_ values: [T]) -> T {
        values[int(0...values.count - 1)]
    }

    /// A contiguous tensor of uniform values in `-amplitude...amplitude`.
    mutating func tensor(_ shape: [Int], amplitude: Float = 1) throws -> Tensor {
        let seed = next()
        return try Tensor.random(shape: shape, seed: seed, in: -amplitude...amplitude)
    }

    /// The elements of `tensor` in a random layout: per axis a stride that is the dense
    /// stride times an element step (1, 2 or 3 on the last axis), plus padding, or 0 where
    /// the axis has extent 1; a random offset; axes visited in a random order (a permuted
    /// view); NaN in every element the view does not address, so a kernel reading outside
    /// the view gives NaN, not a plausible number.
    ///
    /// - Complexity: O(addressed span) time and memory.
    mutating func view(of tensor: Tensor) throws -> Tensor {
        let shape = tensor.shape
        var strides = [Int](repeating: 0, count: 4)
        var extent = 1
        for axis in permutedAxes() {
            if shape[axis] == 1 && chance(0.5) { continue }   // a stride-0 axis of extent 1
            let step = axis == 3 ? pick([1, 1, 2, 3]) : 1
            strides[axis] = extent * step + (chance(0.5) ? int(0...5) : 0)
            extent = strides[axis] * shape[axis]
        }
        let offset = chance(0.5) ? int(1...17) : 0
        let last = offset + zip(shape, strides).reduce(0) { $0 + ($1.0 - 1) * $1.1 }
        var storage = [Float](repeating: .nan, count: last + 1 + int(0...9))
        let values = tensor.elements
        var n = 0
        for a in 0..<shape[0] { for b in 0..<shape[1] { for c in 0..<shape[2] { for d in 0..<shape[3] {
            storage[offset + a * strides[0] + b * strides[1] + c * strides[2] + d * strides[3]] = values[n]
            n += 1
        } } } }
        return try Tensor(shape: shape, storage: storage, strides: strides, offset: offset)
    }

    /// `tensor` with every slice along `axis` replaced by slice 0: as a contiguous tensor,
    /// and as a view with stride 0 on `axis` that addresses slice 0 alone (every other
    /// element of its storage is NaN).
    ///
    /// - Complexity: O(tensor.count).
    func broadcast(_ tensor: Tensor, axis: Int) throws -> (contiguous: Tensor, view: Tensor) {
        let shape = tensor.shape
        let dense = (0..<4).map { a in shape[(a + 1)...].reduce(1, *) }
        var flat = tensor.elements
        var gapped = flat
        for i in 0..<flat.count {
            let index = (i / dense[axis]) % shape[axis]
            flat[i] = flat[i - index * dense[axis]]
            if index > 0 { gapped[i] = .nan }
        }
        var strides = dense
        strides[axis] = 0
        return (try Tensor(shape: shape, data: flat), try Tensor(shape: shape, storage: gapped, strides: strides))
    }

    /// The axes 0...3 in a random order (innermost first).
    mutating func permutedAxes() -> [Int] {
        chance(0.6) ? [3, 2, 1, 0] : [3, 2, 1, 0].shuffled(using: &self)
    }
}

/// True when `a` and `b` hold the same elements bit for bit (so `-inf` matches `-inf`).
func bitwiseEqual(_ a: AttentionResult, _ b: AttentionResult) -> Bool {
    func same(_ x: Tensor, _ y: Tensor) -> Bool {
        x.shape == y.shape && zip(x.elements, y.elements).allSatisfy { $0.bitPattern == $1.bitPattern }
    }
    return same(a.output, b.output) && same(a.logSumExp, b.logSumExp)
}
