@_spi(Testing) @_spi(Benchmarking) import EfficientAttention

extension FuzzCase {
    /// Random score modifiers (soft-capping, ALiBi with any finite slopes, a bias broadcast
    /// or not with `−∞` entries, sinks) on a registered conformer that takes them: refused
    /// only by `validate`; otherwise no throw, finite results (rows without a visible key 0,
    /// with log-sum-exp `σ_h` or `-inf`), the bits of 1 thread at any thread count, the
    /// naive reference for the conformers it covers, and a backward through
    /// `modifierGradients` that is finite and thread-invariant.
    func modifierCase() throws {
        guard let (entry, problem, parameters, drawn) = try drawConformer(from: FuzzCase.modifiableEntries),
              var attention = drawn as? any ModifiableAttention else { return }
        let s = problem.shape
        let m = try randomModifiers(s)
        attention.modifiers = m
        let label = "\(entry.name) \(problem) modifiers [\(describe(m))]"
        log(label)
        do {
            try call { try attention.validate(s) }
        } catch let error as AttentionError {
            log("refused: \(error)")
            return
        }
        let q = try rng.tensor([s.batch, s.heads, s.queryLength, s.headDim], amplitude: rng.pick([Float(1), 3]))
        let k = try rng.tensor([s.batch, s.kvHeads, s.keyLength, s.headDim], amplitude: rng.pick([Float(1), 3]))
        let v = try rng.tensor([s.batch, s.kvHeads, s.keyLength, s.valueDim])
        let keyLengths: [Int]? = rng.chance(0.35) ? (0..<s.batch).map { _ in rng.int(0...s.keyLength) } : nil
        if let keyLengths { log("keyLengths \(keyLengths)") }
        func attend(threads: Int) -> AttentionResult? {
            attempt("\(label) with \(threads) threads, on modifiers validate accepted") {
                try attention.attend(query: q, key: k, value: v, keyLengths: keyLengths, threads: threads)
            }
        }
        guard let one = attend(threads: 1) else { return }
        checkResult(one, shape: s, keyLengths: keyLengths, sinks: m.sinks, label)
        let threads = threadCount()
        if let other = attend(threads: threads), !bitwiseEqual(other, one) {
            fail("\(label): \(threads) threads differ from 1 thread")
        }
        if let visible = referenceMask(entry.name, attention, shape: s, parameters: parameters, causal: problem.causal),
           s.batch * s.heads * s.queryLength * s.keyLength * (s.headDim + s.valueDim) <= 4_000_000 {
            let reference = naiveAttention(query: q, key: k, value: v, keyLengths: keyLengths,
                                           scale: 1 / Double(s.headDim).squareRoot(), modifiers: m, visible: visible)
            if let difference = compare(one, reference, tolerance: 2e-4) {
                fail("\(label): differs from the naive reference: \(difference)")
            }
        }
        guard rng.chance(0.5), let differentiable = attention as? any ModifiableAttention & DifferentiableAttention else {
            return
        }
        let dO = try rng.tensor([s.batch, s.heads, s.queryLength, s.valueDim])
        func gradients(threads: Int) -> (AttentionGradients, ScoreModifierGradients)? {
            attempt("\(label): modifierGradients with \(threads) threads") {
                try modifierGradients(differentiable, q, k, v, one, dO, keyLengths, threads)
            }
        }
        guard let first = gradients(threads: 1) else { return }
        let all = [first.0.dQuery, first.0.dKey, first.0.dValue] + (first.1.bias.map { [$0] } ?? [])
        if all.contains(where: { !$0.elements.allSatisfy(\.isFinite) }) || !(first.1.sinks ?? []).allSatisfy(\.isFinite) {
            fail("\(label): a gradient is not finite")
        }
        let backwardThreads = rng.int(2...7)
        if let other = gradients(threads: backwardThreads),
           !(sameBits(other.0, first.0) && other.1.bias?.elements.map(\.bitPattern) == first.1.bias?.elements.map(\.bitPattern)
             && other.1.sinks?.map(\.bitPattern) == first.1.sinks?.map(\.bitPattern)) {
            fail("\(label): gradients with \(backwardThreads) threads differ from 1 thread")
        }
    }

    /// The registered conformers whose instances take modifiers.
    static let modifiableEntries = entries.filter {
        ["dense", "multi-query", "local", "strided", "longformer", "bigbird", "adaptive-span", "custom-mask", "score-function",
         "transformer-xl", "compressive", "axial", "etc", "lsh", "routing"].contains($0.name)
    }

    /// Each modifier with probability 0.45 (values small enough to leave rows visible,
    /// large enough to matter).
    func randomModifiers(_ s: AttentionShape) throws -> ScoreModifiers {
        var m = ScoreModifiers()
        if rng.chance(0.45) { m.softCap = rng.pick([0.3, 1, 5, 50, 1e6]) }
        if rng.chance(0.45) {
            m.alibiSlopes = rng.chance(0.5) ? ScoreModifiers.standardALiBiSlopes(heads: s.heads)
                : (0..<s.heads).map { _ in Float(rng.int(-100...100)) / 100 }
        }
        if rng.chance(0.45) {
            let shape = [rng.chance(0.5) ? 1 : s.batch, rng.chance(0.5) ? 1 : s.heads, s.queryLength, s.keyLength]
            var bias = try rng.tensor(shape, amplitude: 2)
            if rng.chance(0.3) {
                var data = bias.elements
                for n in data.indices where rng.chance(0.1) { data[n] = -.infinity }
                bias = try Tensor(shape: shape, data: data)
            }
            m.bias = bias
        }
        if rng.chance(0.45) { m.sinks = (0..<s.heads).map { _ in Float(rng.int(-300...300)) / 100 } }
        return m
    }

    func describe(_ m: ScoreModifiers) -> String {
        [m.softCap.map { "cap \($0)" }, m.alibiSlopes.map { "alibi \($0)" }, m.bias.map { "bias \($0.shape)" },
         m.sinks.map { "sinks \($0)" }].compactMap { $0 }.joined(separator: ", ")
    }
}

/// ``ModifiableAttention/modifierGradients(query:key:value:result:outputGradient:keyLengths:threads:)``
/// on an opened existential.
func modifierGradients<A: ModifiableAttention & DifferentiableAttention>(
    _ a: A, _ q: Tensor, _ k: Tensor, _ v: Tensor, _ result: AttentionResult, _ dO: Tensor, _ keyLengths: [Int]?,
    _ threads: Int
) throws -> (AttentionGradients, ScoreModifierGradients) {
    let g = try a.modifierGradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                    keyLengths: keyLengths, threads: threads)
    return (g.inputs, g.modifiers)
}
