// Score modifiers on the conformers that score the call's own keys in a permuted order:
// LSH (soft-capping, ALiBi, bias, sinks; the self rule's score modified too) and routing
// (soft-capping, ALiBi, bias; sinks refused). Forward and gradients (inputs, ∂bias,
// ∂sinks) against Double references of their definitions with the library's own routes
// (LSH's rounds as copies of the keys modified at their positions; routing's memberships),
// the LSH reference itself checked by central finite differences; neutral modifiers give
// the plain result bit for bit; 1, 2, 3 and 7 threads bitwise; bad inputs throw.

@_spi(Testing) @_spi(Benchmarking) import EfficientAttention
import Foundation
import Testing

/// A problem of LSH with modifiers.
struct LSHModifierCase: Sendable, CustomTestStringConvertible {
    var lsh: LSHCase
    var choice: ModifierChoice
    var testDescription: String { "\(lsh.testDescription) [\(choice)]" }

    var shape: AttentionShape {
        AttentionShape(batch: lsh.batch, heads: lsh.heads, kvHeads: lsh.kvHeads ?? lsh.heads, queryLength: lsh.length,
                       keyLength: lsh.length, headDim: lsh.headDim, valueDim: lsh.valueDim ?? lsh.headDim)
    }

    func attention() throws -> LSHAttention {
        var a = lsh.attention
        a.modifiers = try choice.modifiers(shape, seed: lsh.seed)
        return a
    }

    func check(sourceLocation: SourceLocation = #_sourceLocation) throws {
        let a = try attention()
        let (q, k, v) = try lsh.inputs()
        let result = try a.attend(query: q, key: k, value: v, keyLengths: lsh.keyLengths, threads: 2)
        let dO = try randomTensor(result.output.shape, seed: lsh.seed &+ 7)
        let g = try a.modifierGradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                        keyLengths: lsh.keyLengths, threads: 2)
        let table = try lshVisibility(a, q: q, k: k, keyLengths: lsh.keyLengths)
        let dims = GradientDims(query: q, value: v)
        let scale = 1 / Double(lsh.headDim).squareRoot()
        let reference = lshModifiedReferenceBackward(
            q: q.elements.map(Double.init), k: k.elements.map(Double.init), v: v.elements.map(Double.init),
            dO: dO.elements.map(Double.init), dims: dims, sharedQK: lsh.sharedQK, scale: scale, table: table,
            modifiers: ReferenceModifiers(a.modifiers), exp: { Foundation.exp($0) }, log: { Foundation.log($0) },
            tanh: { Foundation.tanh($0) })
        let naive = lshModifiedReferenceBackward(
            q: q.elements, k: k.elements, v: v.elements, dO: dO.elements, dims: dims, sharedQK: lsh.sharedQK,
            scale: Float(scale), table: table, modifiers: ReferenceModifiers(a.modifiers), exp: { expf($0) },
            log: { logf($0) }, tanh: { tanhf($0) })
        checkModifiedForward(result, reference.gradients, testDescription, sourceLocation: sourceLocation)
        let shared = lsh.sharedQK
        let visible: Visibility = { b, h, i, j in
            shared || (0..<table.rounds).contains { r in table[r, b, h, i, j] }
        }
        checkGradients(g.inputs, reference: reference.gradients, naive: naive.gradients, dims: dims, visible: visible,
                       testDescription, sourceLocation: sourceLocation)
        checkModifierGradients(g.modifiers, a.modifiers, reference: reference, naive: naive, testDescription,
                               sourceLocation: sourceLocation)
    }
}

/// A problem of routing with modifiers (no sinks).
struct RoutingModifierCase: Sendable, CustomTestStringConvertible {
    var routing: RoutingBackwardCase
    var choice: ModifierChoice
    var testDescription: String { "\(routing.testDescription) [\(choice)]" }

    func attention() throws -> RoutingAttention {
        var a = try routing.attention()
        a.modifiers = try choice.modifiers(routing.shape, seed: routing.seed)
        return a
    }

    func check(sourceLocation: SourceLocation = #_sourceLocation) throws {
        let a = try attention()
        let r = routing
        let (q, k, v) = try randomQKV(batch: r.batch, heads: r.heads, kvHeads: r.kvHeads, queryLength: r.queryLength,
                                      keyLength: r.keyLength, headDim: r.headDim, valueDim: r.valueDim, seed: r.seed)
        let result = try a.attend(query: q, key: k, value: v, keyLengths: r.keyLengths, threads: 2)
        let dO = try randomTensor(result.output.shape, seed: r.seed &* 7 &+ 5)
        let g = try a.modifierGradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                        keyLengths: r.keyLengths, threads: 3)
        let reference = routingReference(
            q: q.elements.map(Double.init), k: k.elements.map(Double.init), v: v.elements.map(Double.init),
            dO: dO.elements.map(Double.init), dims: GradientDims(query: q, value: v),
            routes: try a.routes(query: q, key: k), clusters: r.clusters, scale: 1 / Double(r.headDim).squareRoot(),
            causal: r.causal, keyLengths: r.keyLengths, modifiers: ReferenceModifiers(a.modifiers))
        checkRoutingForward(result, reference, testDescription, sourceLocation: sourceLocation)
        for (name, values, ref) in [("dQuery", g.inputs.dQuery.elements, reference.dq),
                                    ("dKey", g.inputs.dKey.elements, reference.dk),
                                    ("dValue", g.inputs.dValue.elements, reference.dv)] {
            let (error, scale) = maxErrorAndMagnitude(values, ref)
            #expect(!values.contains { $0.isNaN } && error <= 1e-4 * scale + 1e-6,
                    "\(testDescription): \(name) error \(error), max |ref| \(scale)", sourceLocation: sourceLocation)
        }
        #expect((g.modifiers.bias != nil) == (a.modifiers.bias != nil) && g.modifiers.sinks == nil,
                "\(testDescription): parameter gradients present", sourceLocation: sourceLocation)
        if let bias = g.modifiers.bias {
            #expect(bias.shape == a.modifiers.bias!.shape, sourceLocation: sourceLocation)
            let (error, scale) = maxErrorAndMagnitude(bias.elements, reference.bias)
            #expect(!bias.elements.contains { $0.isNaN } && error <= 1e-4 * scale + 1e-6,
                    "\(testDescription): ∂bias error \(error), max |ref| \(scale)", sourceLocation: sourceLocation)
            // Exactly 0 on pairs no membership scores.
            let stray = bias.elements.indices.filter { !reference.biasScored[$0] && bias.elements[$0] != 0 }
            #expect(stray.isEmpty, "\(testDescription): ∂bias nonzero off the scored pairs at \(stray.prefix(4))",
                    sourceLocation: sourceLocation)
        }
    }
}

/// The forward's output and log-sum-exp against the reference's.
func checkModifiedForward(_ result: AttentionResult, _ reference: ReferenceGradients<Double>, _ label: String,
                          sourceLocation: SourceLocation = #_sourceLocation) {
    let (outputError, outputScale) = maxErrorAndMagnitude(result.output.elements, reference.output)
    #expect(outputError <= 1e-5 * (1 + outputScale), "\(label): forward output error \(outputError)",
            sourceLocation: sourceLocation)
    let lseError = zip(result.logSumExp.elements, reference.lse).map { l, r in
        l == -.infinity && r == -.infinity ? 0 : abs(Double(l) - r)
    }.max() ?? 0
    #expect(lseError < 1e-4, "\(label): forward lse error \(lseError)", sourceLocation: sourceLocation)
}

/// `∂bias` and `∂sinks` against the reference (present exactly when the modifiers have them).
func checkModifierGradients(_ g: ScoreModifierGradients, _ m: ScoreModifiers, reference: ModifiedReference<Double>,
                            naive: ModifiedReference<Float>, _ label: String,
                            sourceLocation: SourceLocation = #_sourceLocation) {
    #expect((g.bias != nil) == (m.bias != nil) && (g.sinks != nil) == (m.sinks != nil),
            "\(label): parameter gradients present", sourceLocation: sourceLocation)
    if let bias = g.bias {
        #expect(bias.shape == m.bias!.shape, sourceLocation: sourceLocation)
        checkParameterGradient(bias.elements, reference: reference.bias, naive: naive.bias, "\(label): ∂bias",
                               sourceLocation: sourceLocation)
    }
    if let sinks = g.sinks {
        checkParameterGradient(sinks, reference: reference.sinks, naive: naive.sinks, "\(label): ∂sinks",
                               sourceLocation: sourceLocation)
    }
}

/// `attention` with soft-capping, ALiBi, a bias `[1, H, N, N]` and (`sinks`) sinks, for
/// problems of `heads` heads and `length` queries and keys (the mixed-precision tests).
func permutedWithModifiers<A: ModifiableAttention>(_ attention: A, heads: Int, length: Int, sinks: Bool) throws -> A {
    var a = attention
    a.modifiers = try ModifierChoice(softCap: 2, alibi: true, bias: [1, 2], sinks: sinks)
        .modifiers(AttentionShape(heads: heads, queryLength: length, headDim: 1), seed: 31)
    return a
}

enum PermutedModifierCases {
    static let lsh: [LSHModifierCase] = [
        (LSHCase(length: 17, bucketSize: 4), ModifierChoice(softCap: 1.5)),
        (LSHCase(length: 17, bucketSize: 4, causal: true), ModifierChoice(alibi: true)),
        (LSHCase(length: 33, headDim: 1, bucketSize: 4, hashes: 3, across: true), ModifierChoice(bias: [1, 1])),
        (LSHCase(length: 40, headDim: 3, bucketSize: 8, causal: true), ModifierChoice(sinks: true)),
        (LSHCase(heads: 4, kvHeads: 2, length: 100, headDim: 3, bucketSize: 16, hashes: 3), ModifierChoice.all),
        (LSHCase(length: 77, headDim: 64, valueDim: 65, bucketSize: 8, hashes: 4, causal: true), ModifierChoice.all),
        (LSHCase(length: 90, bucketSize: 10, hashes: 2, sharedQK: false), ModifierChoice(softCap: 2, bias: [1, 2])),
        (LSHCase(heads: 4, kvHeads: 2, length: 61, headDim: 3, bucketSize: 8, hashes: 3, sharedQK: false, causal: true),
         ModifierChoice.all),
        (LSHCase(batch: 3, length: 40, bucketSize: 8, keyLengths: [40, 0, 13]),
         ModifierChoice(softCap: 1, alibi: true, bias: [3, 1], sinks: true)),
        (LSHCase(batch: 2, length: 40, bucketSize: 8, sharedQK: false, causal: true, keyLengths: [1, 33]),
         ModifierChoice(alibi: true, bias: [2, 2], hiddenColumn: 5, sinks: true)),
        (LSHCase(heads: 1, length: 130, headDim: 65, valueDim: 3, bucketSize: 64, hashes: 1), ModifierChoice.all),
        (LSHCase(length: 101, headDim: 3, bucketSize: 8, hashes: 3, factors: [4, 2, 6], causal: true),
         ModifierChoice(softCap: 0.5, bias: [1, 2], sinks: true)),
    ].enumerated().map { n, c in
        var lsh = c.0
        lsh.seed = 900 + UInt64(n)
        return LSHModifierCase(lsh: lsh, choice: c.1)
    }

    static let routing: [RoutingModifierCase] = [
        (RoutingBackwardCase(heads: 1, queryLength: 1, clusters: 1, seed: 1), ModifierChoice(softCap: 1.5, bias: [1, 1])),
        (RoutingBackwardCase(heads: 4, kvHeads: 2, queryLength: 150, keyLength: 131, clusters: 3, seed: 2),
         ModifierChoice(softCap: 1.5, alibi: true, bias: [1, 1])),
        (RoutingBackwardCase(queryLength: 70, keyLength: 90, headDim: 1, valueDim: 3, clusters: 4, causal: true, seed: 3),
         ModifierChoice(alibi: true)),
        (RoutingBackwardCase(queryLength: 131, keyLength: 20, headDim: 3, valueDim: 1, clusters: 5, causal: true, seed: 4),
         ModifierChoice(softCap: 1, bias: [1, 2])),
        (RoutingBackwardCase(queryLength: 65, keyLength: 64, headDim: 65, valueDim: 17, clusters: 2, seed: 5),
         ModifierChoice(bias: [1, 1], hiddenColumn: 3)),
        (RoutingBackwardCase(batch: 3, heads: 4, kvHeads: 2, queryLength: 90, keyLength: 100, headDim: 5, valueDim: 7,
                             clusters: 6, causal: true, keyLengths: [100, 0, 37], seed: 6),
         ModifierChoice(softCap: 2, alibi: true, bias: [3, 4])),
        (RoutingBackwardCase(batch: 2, heads: 2, kvHeads: 1, queryLength: 300, keyLength: 280, headDim: 16, clusters: 2,
                             causal: true, keyLengths: [280, 201], seed: 7), ModifierChoice(alibi: true, bias: [1, 1])),
        // Most queries and keys in several clusters: a pair scored in several, its ∂bias summed.
        (RoutingBackwardCase(heads: 2, queryLength: 5, keyLength: 3, headDim: 3, clusters: 8, causal: true, seed: 10),
         ModifierChoice(softCap: 1, alibi: true, bias: [1, 1])),
    ].map { RoutingModifierCase(routing: $0.0, choice: $0.1) }
}

@Suite("Modifiers on LSH and routing")
struct PermutedModifierTests {
    @Test("LSH with modifiers against the Double reference", arguments: PermutedModifierCases.lsh)
    func lsh(_ c: LSHModifierCase) throws { try c.check() }

    @Test("Routing with modifiers against the Double reference", arguments: PermutedModifierCases.routing)
    func routing(_ c: RoutingModifierCase) throws { try c.check() }

    /// The modified LSH reference (rounds as key copies modified at their positions, the
    /// self rule's pair included) against central finite differences of its own forward
    /// with the routes fixed: ∂q, ∂bias and ∂sinks, causal so query 0 takes the self rule.
    @Test func lshReferenceFiniteDifferences() throws {
        let c = LSHModifierCase(lsh: LSHCase(heads: 1, length: 9, headDim: 3, bucketSize: 2, hashes: 2, causal: true,
                                             seed: 41),
                                choice: ModifierChoice(softCap: 1.2, alibi: true, bias: [1, 1], sinks: true))
        let a = try c.attention()
        let (q, k, v) = try c.lsh.inputs()
        let table = try lshVisibility(a, q: q, k: k, keyLengths: nil)
        #expect((1..<9).allSatisfy { j in !table[0, 0, 0, 0, j] && !table[1, 0, 0, 0, j] } && table[0, 0, 0, 0, 0],
                "query 0 takes the self rule")
        let dims = GradientDims(query: q, value: v)
        let dO = try randomTensor([1, 1, 9, 3], seed: 5).elements.map(Double.init)
        let base = ReferenceModifiers<Double>(a.modifiers)
        func run(_ q: [Double], _ m: ReferenceModifiers<Double>) -> ModifiedReference<Double> {
            lshModifiedReferenceBackward(q: q, k: k.elements.map(Double.init), v: v.elements.map(Double.init), dO: dO,
                                         dims: dims, sharedQK: true, scale: 1 / 3.0.squareRoot(), table: table,
                                         modifiers: m, exp: { Foundation.exp($0) }, log: { Foundation.log($0) },
                                         tanh: { Foundation.tanh($0) })
        }
        func loss(_ r: ModifiedReference<Double>) -> Double { zip(r.gradients.output, dO).reduce(0) { $0 + $1.0 * $1.1 } }
        let q0 = q.elements.map(Double.init)
        let x = run(q0, base)
        let h = 1e-6
        var worst = 0.0
        for n in q0.indices {
            var plus = q0, minus = q0
            plus[n] += h
            minus[n] -= h
            worst = max(worst, abs((loss(run(plus, base)) - loss(run(minus, base))) / (2 * h) - x.gradients.dq[n]))
        }
        for n in base.bias!.indices {
            var plus = base, minus = base
            plus.bias![n] += h
            minus.bias![n] -= h
            worst = max(worst, abs((loss(run(q0, plus)) - loss(run(q0, minus))) / (2 * h) - x.bias[n]))
        }
        var plus = base, minus = base
        plus.sinks![0] += h
        minus.sinks![0] -= h
        worst = max(worst, abs((loss(run(q0, plus)) - loss(run(q0, minus))) / (2 * h) - x.sinks[0]))
        #expect(worst < 1e-6, "finite differences differ by \(worst)")
        // The self rule's pair carries a gradient once a sink takes a share: ∂bias[0, 0] ≠ 0.
        #expect(abs(x.bias[0]) > 1e-4, "∂bias[0, 0] = \(x.bias[0])")
    }

    /// A zero bias and zero slopes go through the gathered-slot path and change no bit of
    /// the forward.
    @Test(arguments: [false, true])
    func neutralModifiersChangeNothing(_ routing: Bool) throws {
        let shape = AttentionShape(batch: 2, heads: 2, queryLength: 70, keyLength: 70, headDim: 8, valueDim: 8)
        let (q, k, v) = try randomQKV(batch: 2, heads: 2, queryLength: 70, headDim: 8, seed: 3)
        let neutral = ScoreModifiers(alibiSlopes: [0, 0], bias: try Tensor(shape: [1, 1, 70, 70]))
        func run<A: ModifiableAttention & DifferentiableAttention>(_ plain: A) throws {
            var modified = plain
            modified.modifiers = neutral
            let a = try plain.attend(query: q, key: k, value: v, keyLengths: [70, 41], threads: 2)
            let b = try modified.attend(query: q, key: k, value: v, keyLengths: [70, 41], threads: 2)
            expectBitwiseEqual(a, b, "\(plain.name) neutral modifiers")
            let dO = try randomTensor(a.output.shape, seed: 8)
            let ga = try plain.gradients(query: q, key: k, value: v, result: a, outputGradient: dO,
                                         keyLengths: [70, 41], threads: 2)
            let gb = try modified.gradients(query: q, key: k, value: v, result: b, outputGradient: dO,
                                            keyLengths: [70, 41], threads: 2)
            // The backward scales dS after the modifiers' terms (`(P (dP − D)) · scale`, not
            // `(scale · P)(dP − D)`): the same values to rounding, not the same bits.
            for (x, y) in [(ga.dQuery, gb.dQuery), (ga.dKey, gb.dKey), (ga.dValue, gb.dValue)] {
                let (error, scale) = maxErrorAndMagnitude(x.elements, y.elements.map(Double.init))
                #expect(error <= 1e-6 * (1 + scale), "\(plain.name) neutral modifiers: gradients differ by \(error)")
            }
        }
        if routing {
            try run(try RoutingAttention(heads: 2, headDim: 8, clusters: 3, causal: true, seed: 4))
        } else {
            try run(LSHAttention(bucketSize: 8, hashes: 2, causal: true, seed: 4))
        }
        _ = shape
    }

    /// Forward and all gradients (∂bias broadcast over batch and heads included) bitwise
    /// identical for 1, 2, 3 and 7 threads.
    @Test(arguments: [false, true])
    func threadInvariance(_ routing: Bool) throws {
        let shape = AttentionShape(batch: 2, heads: 4, kvHeads: 2, queryLength: 150, keyLength: 150, headDim: 16,
                                   valueDim: 16)
        var m = try ModifierChoice(softCap: 1.5, alibi: true, bias: [1, 1], sinks: !routing).modifiers(shape, seed: 2)
        m.bias = try randomTensor([1, 1, 150, 150], seed: 9, in: -2...2)
        let (q, k, v) = try randomQKV(batch: 2, heads: 4, kvHeads: 2, queryLength: 150, headDim: 16, seed: 6)
        func results<A: ModifiableAttention & DifferentiableAttention>(_ a: A) throws -> [[Float]] {
            try [1, 2, 3, 7].map { threads in
                let r = try a.attend(query: q, key: k, value: v, keyLengths: [150, 77], threads: threads)
                let dO = try randomTensor(r.output.shape, seed: 10)
                let g = try a.modifierGradients(query: q, key: k, value: v, result: r, outputGradient: dO,
                                                keyLengths: [150, 77], threads: threads)
                return r.output.elements + r.logSumExp.elements + g.inputs.dQuery.elements + g.inputs.dKey.elements
                    + g.inputs.dValue.elements + g.modifiers.bias!.elements + (g.modifiers.sinks ?? [])
            }
        }
        let runs: [[Float]]
        if routing {
            var a = try RoutingAttention(heads: 4, headDim: 16, clusters: 3, causal: true, seed: 4)
            a.modifiers = m
            runs = try results(a)
        } else {
            var a = LSHAttention(bucketSize: 16, hashes: 3, sharedQK: false, causal: true, seed: 4)
            a.modifiers = m
            runs = try results(a)
        }
        for (n, run) in runs.enumerated().dropFirst() {
            #expect(bitwiseEqual(run, runs[0]), "threads \([1, 2, 3, 7][n]): \(firstDifference(run, runs[0]))")
        }
    }

    /// A `−∞` bias hides keys as a mask does: a query whose other keys it all hides takes
    /// LSH's self rule (`o_i = v_i`, `lse_i = s′_ii + log R`, gradient `dV_i = dO_i` alone),
    /// and one whose own pair it hides too has no visible key (0 and `−∞`, no gradient).
    /// Found by attention-fuzz: the self rule gave `v_i` with `lse = −∞`.
    @Test func lshBiasHidesKeys() throws {
        let n = 30, r = 3
        let (q, k, v) = try randomQKV(heads: 2, queryLength: n, headDim: 4, seed: 12)
        var lsh = LSHAttention(bucketSize: 4, hashes: r, attendAcrossBuckets: true, seed: 2)
        var diagonal = [Float](repeating: -.infinity, count: n * n)
        for i in 0..<n { diagonal[i * n + i] = Float(i % 3) - 1 }
        lsh.modifiers = ScoreModifiers(softCap: 2, bias: try Tensor(shape: [1, 1, n, n], data: diagonal))
        let result = try lsh.attend(query: q, key: k, value: v, threads: 2)
        #expect(bitwiseEqual(result.output.elements, v.elements), "every query takes the self rule: o = v")
        for h in 0..<2 { for i in 0..<n {
            let norm = (0..<4).reduce(0.0) { $0 + Double(q[0, h, i, $1]) * Double(q[0, h, i, $1]) }.squareRoot()
            let expected = 2 * tanh(norm / 2 / 2) + Double(i % 3) - 1 + log(Double(r))
            #expect(abs(Double(result.logSumExp[0, h, i, 0]) - expected) < 1e-5, "lse of query \(i), head \(h)")
        } }
        let dO = try randomTensor(result.output.shape, seed: 3)
        let g = try lsh.modifierGradients(query: q, key: k, value: v, result: result, outputGradient: dO, threads: 2)
        #expect(bitwiseEqual(g.inputs.dValue.elements, dO.elements), "dV = dO")
        #expect(g.inputs.dQuery.elements.allSatisfy { $0 == 0 } && g.modifiers.bias!.elements.allSatisfy { $0 == 0 },
                "no gradient reaches q or the bias without sinks")
        // Every pair hidden: no visible key at all.
        lsh.modifiers.bias = try Tensor(shape: [1, 1, n, n], data: .init(repeating: -.infinity, count: n * n))
        let hidden = try lsh.attend(query: q, key: k, value: v, threads: 2)
        #expect(hidden.output.elements.allSatisfy { $0 == 0 } && hidden.logSumExp.elements.allSatisfy { $0 == -.infinity })
        let none = try lsh.modifierGradients(query: q, key: k, value: v, result: hidden, outputGradient: dO, threads: 2)
        #expect([none.inputs.dQuery, none.inputs.dValue, none.modifiers.bias!].allSatisfy { $0.elements.allSatisfy { $0 == 0 } },
                "no gradient from rows without a visible key")
    }

    /// The routes a modified forward hands back give that forward's result and the
    /// gradients of hashing or routing again, bit for bit.
    @Test(arguments: [false, true])
    func handedRoutes(_ routing: Bool) throws {
        let shape = AttentionShape(batch: 2, heads: 2, queryLength: 90, keyLength: 90, headDim: 8, valueDim: 8)
        let m = try ModifierChoice(softCap: 2, alibi: true, bias: [1, 2], sinks: !routing).modifiers(shape, seed: 4)
        let (q, k, v) = try randomQKV(batch: 2, heads: 2, queryLength: 90, headDim: 8, seed: 21)
        let dO = try randomTensor([2, 2, 90, 8], seed: 22)
        /// The modified `plain`'s forward, its routes' forward and gradients against those
        /// of routing or hashing again.
        func check<A: ModifiableAttention & DifferentiableAttention, Routes>(
            _ plain: A, returningRoutes: (A) throws -> (AttentionResult, Routes),
            gradients: (A, AttentionResult, Routes) throws -> AttentionGradients
        ) throws {
            var a = plain
            a.modifiers = m
            let expected = try a.attend(query: q, key: k, value: v, keyLengths: [90, 50], threads: 2)
            let (result, routes) = try returningRoutes(a)
            expectBitwiseEqual(expected, result, "\(a.name): attendReturningRoutes")
            let again = try a.gradients(query: q, key: k, value: v, result: result, outputGradient: dO,
                                        keyLengths: [90, 50], threads: 2)
            let given = try gradients(a, result, routes)
            #expect(bitwiseEqual(again.dQuery.elements + again.dKey.elements + again.dValue.elements,
                                 given.dQuery.elements + given.dKey.elements + given.dValue.elements),
                    "\(a.name): gradients with the handed routes")
        }
        if routing {
            try check(try RoutingAttention(heads: 2, headDim: 8, clusters: 3, causal: true, seed: 1),
                      returningRoutes: { try $0.attendReturningRoutes(query: q, key: k, value: v, keyLengths: [90, 50],
                                                                      threads: 2) },
                      gradients: { try $0.gradients(query: q, key: k, value: v, result: $1, outputGradient: dO, routes: $2,
                                                    keyLengths: [90, 50], threads: 3) })
        } else {
            try check(LSHAttention(bucketSize: 8, hashes: 3, causal: true, seed: 1),
                      returningRoutes: { try $0.attendReturningRoutes(query: q, key: k, value: v, keyLengths: [90, 50],
                                                                      threads: 2) },
                      gradients: { try $0.gradients(query: q, key: k, value: v, result: $1, outputGradient: dO, routes: $2,
                                                    keyLengths: [90, 50], threads: 3) })
        }
    }

    /// Routing refuses sinks, naming them; both check the modifiers before any work.
    @Test func badModifiers() throws {
        let (q, k, v) = try randomQKV(heads: 2, queryLength: 20, headDim: 4, seed: 1)
        var routing = try RoutingAttention(heads: 2, headDim: 4, clusters: 2)
        routing.modifiers.sinks = [0, 1]
        expectAttentionError(.unsupported, mentioning: ["sinks"], "routing sinks") {
            try routing.attend(query: q, key: k, value: v)
        }
        routing.modifiers = ScoreModifiers(softCap: -1)
        expectAttentionError(.invalidParameter, mentioning: ["modifiers.softCap"], "routing cap") {
            try routing.attend(query: q, key: k, value: v)
        }
        var lsh = LSHAttention(bucketSize: 4)
        lsh.modifiers.bias = try Tensor(shape: [1, 2, 20, 19])
        expectAttentionError(.shapeMismatch, mentioning: ["modifiers.bias"], "lsh bias shape") {
            try lsh.attend(query: q, key: k, value: v)
        }
        lsh.modifiers = ScoreModifiers(alibiSlopes: [1, .nan])
        expectAttentionError(.invalidParameter, mentioning: ["modifiers.alibiSlopes[1]"], "lsh slopes") {
            try lsh.attend(query: q, key: k, value: v)
        }
        // A NaN bias on a scored pair is found as the kernel adds it.
        var values = [Float](repeating: 0, count: 400)
        values[3 * 20 + 3] = .nan
        values[3 * 20 + 2] = .nan
        values[3 * 20 + 4] = .nan
        lsh.modifiers = ScoreModifiers(bias: try Tensor(shape: [1, 1, 20, 20], data: values))
        lsh.attendAcrossBuckets = true
        expectAttentionError(.invalidParameter, mentioning: ["modifiers.bias"], "lsh NaN bias") {
            try lsh.attend(query: q, key: k, value: v)
        }
    }
}
