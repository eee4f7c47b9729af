@_spi(Testing) @_spi(Benchmarking) import EfficientAttention

extension FuzzCase {
    /// A packed variable-length batch (ATTENTION_SPEC.md, "Packed variable-length batches")
    /// on a registered conformer: 1–5 sequences of 0–40 queries and keys (self-attention or
    /// separate lengths). The packed call throws exactly when a sequence with queries and
    /// keys fails `validate`; otherwise each sequence's rows are the bits of a separate call
    /// on its rows (0 and `-inf`, or the sink, for a sequence without keys), at a random
    /// thread count. With probability 0.4 a conformer that takes score modifiers gets random
    /// ones, a bias `[S or 1, H or 1, max Nq_s, max Nk_s]` among them: each separate call
    /// then takes its sequence's block of the bias (a strided view of its storage). The
    /// packed backward likewise (``checkPackedGradients(_:_:q:k:v:result:threads:alone:_:)``).
    /// Then offsets drawn at random: `PackedSequences` refuses what is not non-decreasing
    /// from 0, and a call whose tensors do not end at the last offsets throws.
    func packedCase() throws {
        guard let (entry, problem, _, drawn) = try drawConformer(from: FuzzCase.entries) else { return }
        var attention = drawn
        let s = problem.shape
        let count = rng.int(1...5)
        let selfAttention = rng.chance(0.6)
        func lengths() -> [Int] { (0..<count).map { _ in rng.chance(0.15) ? rng.pick([0, 1]) : rng.int(0...40) } }
        let queryLengths = lengths(), keyLengths = selfAttention ? queryLengths : lengths()
        func offsets(_ lengths: [Int]) -> [Int] { lengths.reduce(into: [0]) { $0.append($0.last! + $1) } }
        let sequences = try call {
            try PackedSequences(queryOffsets: offsets(queryLengths), keyOffsets: offsets(keyLengths))
        }
        let (nq, nk) = (sequences.queryOffsets.last!, sequences.keyOffsets.last!)
        var label = "\(entry.name) \(problem) packed queries \(queryLengths) keys \(keyLengths)"
        var sinks: [Float]?
        if rng.chance(0.4), var modifiable = attention as? any ModifiableAttention {
            // The bias's batch dimension is the sequence's: [S or 1, H or 1, max Nq_s, max Nk_s].
            var padded = s
            (padded.batch, padded.queryLength, padded.keyLength) = (count, queryLengths.max()!, keyLengths.max()!)
            modifiable.modifiers = try randomModifiers(padded)
            sinks = modifiable.modifiers.sinks
            label += " modifiers [\(describe(modifiable.modifiers))]"
            attention = modifiable
        }
        log(label)
        /// The conformer of sequence `n`'s separate call: with a bias, one whose bias is the
        /// sequence's block (a strided view of the packed bias's storage).
        func alone(_ n: Int) throws -> any Attention {
            guard var modifiable = attention as? any ModifiableAttention, let bias = modifiable.modifiers.bias else {
                return attention
            }
            let item = bias.shape[0] == 1 ? 0 : n
            modifiable.modifiers.bias = try Tensor(shape: [1, bias.shape[1], queryLengths[n], keyLengths[n]],
                                                   storage: bias.storage, strides: bias.strides,
                                                   offset: bias.offset + item * bias.strides[0])
            return modifiable
        }
        guard nq > 0, nk > 0 else {
            checkPackedMismatch(attention, sequences, problem: s, label)
            return
        }
        let q = try rng.tensor([1, s.heads, nq, s.headDim])
        let k = try rng.tensor([1, s.kvHeads, nk, s.headDim]), v = try rng.tensor([1, s.kvHeads, nk, s.valueDim])
        let refused = (0..<count).first { n in
            let shape = AttentionShape(heads: s.heads, kvHeads: s.kvHeads, queryLength: queryLengths[n],
                                       keyLength: keyLengths[n], headDim: s.headDim, valueDim: s.valueDim)
            return queryLengths[n] > 0 && keyLengths[n] > 0 && (try? alone(n).validate(shape)) == nil
        }
        let threads = threadCount()
        let packed: AttentionResult
        do {
            packed = try call { try attention.attend(query: q, key: k, value: v, sequences: sequences, threads: threads) }
        } catch let error as AttentionError {
            if refused == nil { fail("\(label): the packed call threw \(error), but every sequence validates") }
            return
        }
        if let refused { fail("\(label): sequence \(refused) fails validate, but the packed call did not throw") }
        let (o, lse) = (packed.output.elements, packed.logSumExp.elements)
        for n in 0..<count where queryLengths[n] > 0 {
            let (q0, k0) = (sequences.queryOffsets[n], sequences.keyOffsets[n])
            for h in 0..<s.heads {
                for i in q0..<(q0 + queryLengths[n]) {
                    let r = h * nq + i
                    if keyLengths[n] == 0 {
                        let expected = sinks?[h] ?? -.infinity
                        if lse[r] != expected || o[(r * s.valueDim)..<((r + 1) * s.valueDim)].contains(where: { $0 != 0 }) {
                            fail("\(label): sequence \(n) has no key, but head \(h) row \(i) is not 0 with lse \(expected)")
                            return
                        }
                    }
                }
            }
            guard keyLengths[n] > 0 else { continue }
            let one = try call {
                try alone(n).attend(query: try rows(q, q0, queryLengths[n]), key: try rows(k, k0, keyLengths[n]),
                                    value: try rows(v, k0, keyLengths[n]), keyLengths: nil, threads: threads)
            }
            let (so, sl) = (one.output.elements, one.logSumExp.elements)
            for h in 0..<s.heads {
                for i in 0..<queryLengths[n] {
                    let r = h * nq + q0 + i, own = h * queryLengths[n] + i
                    let same = lse[r].bitPattern == sl[own].bitPattern
                        && (0..<s.valueDim).allSatisfy { o[r * s.valueDim + $0].bitPattern == so[own * s.valueDim + $0].bitPattern }
                    if !same {
                        fail("\(label): sequence \(n) head \(h) row \(i) differs from its separate call")
                        return
                    }
                }
            }
        }
        if let differentiable = attention as? any DifferentiableAttention {
            try checkPackedGradients(differentiable, sequences, q: q, k: k, v: v, result: packed, threads: threads,
                                     alone: { try alone($0) as! any DifferentiableAttention }, label)
        }
        if let modifiable = attention as? any ModifiableAttention & DifferentiableAttention {
            try checkPackedModifierGradients(modifiable, sequences, q: q, k: k, v: v, result: packed, threads: threads,
                                             alone: alone, label)
        }
        checkPackedMismatch(attention, sequences, problem: s, label)
    }

    /// The packed backward: each sequence's gradient rows are the bits of a separate backward
    /// call on its rows by `alone(n)` (at the same thread count); the rows of sequences
    /// without queries or keys are 0.
    func checkPackedGradients(_ attention: some DifferentiableAttention, _ sequences: PackedSequences,
                              q: Tensor, k: Tensor, v: Tensor, result: AttentionResult, threads: Int,
                              alone: (Int) throws -> any DifferentiableAttention, _ label: String) throws {
        let dO = try rng.tensor(result.output.shape)
        let packed: AttentionGradients
        do {
            packed = try call {
                try attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                        sequences: sequences, threads: threads)
            }
        } catch AttentionError.unsupported {
            return   // a setting this conformer's backward does not take
        }
        for n in 0..<sequences.count {
            let (q0, k0) = (sequences.queryOffsets[n], sequences.keyOffsets[n])
            let (nq, nk) = (sequences.queryOffsets[n + 1] - q0, sequences.keyOffsets[n + 1] - k0)
            let got = AttentionGradients(dQuery: try rows(packed.dQuery, q0, nq), dKey: try rows(packed.dKey, k0, nk),
                                         dValue: try rows(packed.dValue, k0, nk))
            guard nq > 0, nk > 0 else {
                if ![got.dQuery, got.dKey, got.dValue].allSatisfy({ $0.elements.allSatisfy { $0.bitPattern == 0 } }) {
                    fail("\(label): sequence \(n) (\(nq) queries, \(nk) keys) has gradient rows that are not +0")
                    return
                }
                continue
            }
            let (qs, ks, vs) = (try rows(q, q0, nq), try rows(k, k0, nk), try rows(v, k0, nk))
            let one = try call {
                try alone(n).gradients(query: qs, key: ks, value: vs,
                                       result: try AttentionResult(output: try rows(result.output, q0, nq),
                                                                   logSumExp: try rows(result.logSumExp, q0, nq)),
                                       outputGradient: try rows(dO, q0, nq), keyLengths: nil, threads: threads)
            }
            if !sameBits(got, one) {
                fail("\(label): sequence \(n)'s packed gradients differ from its separate backward call")
                return
            }
        }
    }

    /// The learned modifiers' gradients of a packed call (with a bias or sinks): `dQ`, `dK`,
    /// `dV` the bits of the packed backward; with a bias per sequence (`S > 1`), each block
    /// the bits of its separate call's `∂L/∂bias` on the sequence's rows and keys and 0
    /// elsewhere; with sinks, `∂L/∂σ_h` within 1e-4 of the separate calls' sum (relative to
    /// the sum of their magnitudes).
    func checkPackedModifierGradients<A: ModifiableAttention & DifferentiableAttention>(
        _ attention: A, _ sequences: PackedSequences, q: Tensor, k: Tensor, v: Tensor, result: AttentionResult,
        threads: Int, alone: (Int) throws -> any Attention, _ label: String
    ) throws {
        guard attention.modifiers.bias != nil || attention.modifiers.sinks != nil else { return }
        let dO = try rng.tensor(result.output.shape)
        let packed: (inputs: AttentionGradients, modifiers: ScoreModifierGradients)
        do {
            packed = try call {
                try attention.modifierGradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                                sequences: sequences, threads: threads)
            }
        } catch AttentionError.unsupported {
            return   // a setting this conformer's backward does not take
        }
        let inputs = try call {
            try attention.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                    sequences: sequences, threads: threads)
        }
        if !sameBits(packed.inputs, inputs) {
            fail("\(label): modifierGradients' dQ, dK, dV differ from the packed backward's")
            return
        }
        let heads = q.shape[1]
        var sinkSum = [Double](repeating: 0, count: heads), sinkMagnitude = sinkSum
        let perSequence = packed.modifiers.bias.flatMap { $0.shape[0] > 1 ? $0 : nil }
        for n in 0..<sequences.count {
            let (q0, k0) = (sequences.queryOffsets[n], sequences.keyOffsets[n])
            let (nq, nk) = (sequences.queryOffsets[n + 1] - q0, sequences.keyOffsets[n + 1] - k0)
            var own: Tensor?
            if nq > 0, nk > 0 {
                let one = try alone(n) as! A
                let g = try call {
                    try one.modifierGradients(query: try rows(q, q0, nq), key: try rows(k, k0, nk),
                                              value: try rows(v, k0, nk),
                                              result: try AttentionResult(output: try rows(result.output, q0, nq),
                                                                          logSumExp: try rows(result.logSumExp, q0, nq)),
                                              outputGradient: try rows(dO, q0, nq), keyLengths: nil, threads: threads)
                }
                for (h, x) in (g.modifiers.sinks ?? []).enumerated() {
                    sinkSum[h] += Double(x)
                    sinkMagnitude[h] += abs(Double(x))
                }
                own = g.modifiers.bias
            }
            guard let block = perSequence else { continue }
            let s = block.shape
            for h in 0..<s[1] {
                for i in 0..<s[2] {
                    for j in 0..<s[3] {
                        let expected = i < nq && j < nk ? own.map { $0[0, h, i, j] } ?? 0 : 0
                        if block[n, h, i, j].bitPattern != expected.bitPattern {
                            fail("\(label): sequence \(n)'s bias gradient [\(h), \(i), \(j)] is \(block[n, h, i, j]), its separate call's \(expected)")
                            return
                        }
                    }
                }
            }
        }
        for (h, x) in (packed.modifiers.sinks ?? []).enumerated()
        where !(abs(Double(x) - sinkSum[h]) <= 1e-4 * max(1, sinkMagnitude[h])) {
            fail("\(label): the packed sink gradient \(h) is \(x), the separate calls' sum \(sinkSum[h])")
            return
        }
    }

    /// Rows `start ..< start + count` of every head of the packed `[1, H, N, ·]` tensor `t`,
    /// as a view of its storage.
    func rows(_ t: Tensor, _ start: Int, _ count: Int) throws -> Tensor {
        try Tensor(shape: [1, t.shape[1], count, t.shape[3]], storage: t.storage, strides: t.strides,
                   offset: t.offset + start * t.strides[2])
    }

    /// Random offsets must be refused unless valid, and a call whose tensors' lengths are
    /// not the last offsets (or whose batch is not 1) must throw.
    func checkPackedMismatch(_ attention: any Attention, _ sequences: PackedSequences, problem s: AttentionShape,
                             _ label: String) {
        let drawn = (0..<rng.int(0...4)).map { _ in rng.chance(0.1) ? rng.pick([-1, Int.max, Int.min]) : rng.int(-3...30) }
        let valid = drawn.count >= 2 && drawn[0] == 0 && zip(drawn, drawn.dropFirst()).allSatisfy { $0 <= $1 }
            && drawn.last! <= lengthLimit
        do {
            _ = try call { try PackedSequences(queryOffsets: drawn, keyOffsets: drawn) }
            if !valid { fail("\(label): offsets \(drawn) were accepted") }
        } catch is AttentionError {
            if valid { fail("\(label): valid offsets \(drawn) were refused") }
        } catch {
            fail("\(label): offsets \(drawn) threw \(error)")
        }
        let nq = sequences.queryOffsets.last!, nk = sequences.keyOffsets.last!
        let batch = rng.chance(0.3) ? 2 : 1
        let wrongQuery = nq + (batch == 1 ? rng.pick([-1, 1, 2]) : 0)
        guard wrongQuery > 0, nk > 0 else { return }
        do {
            let q = try rng.tensor([batch, s.heads, wrongQuery, s.headDim])
            let k = try rng.tensor([batch, s.kvHeads, nk, s.headDim]), v = try rng.tensor([batch, s.kvHeads, nk, s.valueDim])
            _ = try call { try attention.attend(query: q, key: k, value: v, sequences: sequences, threads: 1) }
            fail("\(label): a packed call with \(batch) items and \(wrongQuery) query rows for offsets ending at \(nq) was accepted")
        } catch is AttentionError {
        } catch {
            fail("\(label): a mismatched packed call threw \(error)")
        }
    }
}
