// Shared checks for the fixed sparse patterns (local, strided, Longformer, BigBird):
// the pattern's counts against its dense mask, its kernel tile list against its
// visibility, and a conformer's output against the Double reference with the pattern's
// dense mask.

import EfficientAttention
import Testing

/// The pattern's visibility (test side: through its dense mask) with optional key padding.
func patternVisibility(_ pattern: some AttentionPattern, keyLengths: [Int]? = nil) -> Visibility {
    let masks = (0..<pattern.heads).map { pattern.denseMask(head: $0) }
    let nk = pattern.keyLength, heads = pattern.heads
    return { b, h, i, j in
        masks[h % heads][i * nk + j] && j < (keyLengths?[b] ?? nk)
    }
}

/// Checks a pattern's inspection API for consistency:
/// - `visibleKeyCount` equals the number of visible keys in the dense mask, row by row;
/// - `scoredPairs` is their sum over heads;
/// - in the tile list, every visible pair lies in some (query tile, key tile), fully
///   visible tiles hold only visible pairs and no pair is in two of them, and query
///   groups of a pass are disjoint.
func checkPatternConsistency(_ pattern: some AttentionPattern, _ label: String,
                             sourceLocation: SourceLocation = #_sourceLocation) {
    let nq = pattern.queryLength, nk = pattern.keyLength
    var total = 0
    for h in 0..<pattern.heads {
        let mask = pattern.denseMask(head: h)
        var countErrors: [String] = []
        for i in 0..<nq {
            let expected = (0..<nk).filter { mask[i * nk + $0] }.count
            let counted = pattern.visibleKeyCount(head: h, query: i)
            if counted != expected { countErrors.append("query \(i): \(counted) vs \(expected)") }
            total += expected
        }
        #expect(countErrors.isEmpty, "\(label) head \(h): visibleKeyCount differs from the mask: \(countErrors.prefix(4))",
                sourceLocation: sourceLocation)

        var covered = [UInt8](repeating: 0, count: nq * nk), coveredFull = covered
        var fullButHidden: [String] = []
        var groupsByPass: [Int: Set<[Int]>] = [:]
        var queriesSeen: [Int: [Int]] = [:]
        for tile in pattern.tiles(head: h) {
            if groupsByPass[tile.pass, default: []].insert([tile.queryStart, tile.queryCount, tile.queryStep]).inserted {
                for n in 0..<tile.queryCount { queriesSeen[tile.pass, default: []].append(tile.queryStart + n * tile.queryStep) }
            }
            for a in 0..<tile.queryCount {
                let i = tile.queryStart + a * tile.queryStep
                for c in 0..<tile.keyCount {
                    let j = tile.keyStart + c * tile.keyStep
                    guard i >= 0, i < nq, j >= 0, j < nk else {
                        Issue.record("\(label) head \(h): tile \(tile) addresses (\(i), \(j)) outside the problem",
                                     sourceLocation: sourceLocation)
                        return
                    }
                    covered[i * nk + j] &+= 1
                    if tile.fullyVisible {
                        coveredFull[i * nk + j] &+= 1
                        if !mask[i * nk + j] { fullButHidden.append("(\(i), \(j)) in \(tile)") }
                    }
                }
            }
        }
        // A pair in two tiles is right only if all but one of them mask it (the
        // attention tests check the masking); it can never be in two fully visible tiles.
        let missing = (0..<(nq * nk)).filter { mask[$0] && covered[$0] == 0 }
        let twiceFull = (0..<(nq * nk)).filter { coveredFull[$0] > 1 }
        let noneMissing = missing.isEmpty, noneTwice = twiceFull.isEmpty, fullOK = fullButHidden.isEmpty
        #expect(noneMissing, "\(label) head \(h): \(missing.count) visible pairs in no tile, e.g. \(missing.prefix(3).map { ($0 / nk, $0 % nk) })",
                sourceLocation: sourceLocation)
        #expect(noneTwice, "\(label) head \(h): \(twiceFull.count) pairs in several fully visible tiles, e.g. \(twiceFull.prefix(3).map { ($0 / nk, $0 % nk) })",
                sourceLocation: sourceLocation)
        #expect(fullOK, "\(label) head \(h): fully visible tiles hold hidden pairs: \(fullButHidden.prefix(3))",
                sourceLocation: sourceLocation)
        for (pass, queries) in queriesSeen {
            let disjoint = Set(queries).count == queries.count
            #expect(disjoint, "\(label) head \(h) pass \(pass): query tiles overlap",
                    sourceLocation: sourceLocation)
        }
    }
    #expect(pattern.scoredPairs == total, "\(label): scoredPairs \(pattern.scoredPairs), mask has \(total)",
            sourceLocation: sourceLocation)
}

/// Runs `attention` on seeded inputs and checks it against the Double reference with
/// `pattern`'s dense mask (and key padding); returns the result.
@discardableResult
func checkPatternAttention(_ attention: some Attention, pattern: some AttentionPattern,
                           batch: Int = 1, heads: Int, kvHeads: Int? = nil, headDim: Int, valueDim: Int? = nil,
                           keyLengths: [Int]? = nil, threads: Int? = nil, seed: UInt64, _ label: String,
                           sourceLocation: SourceLocation = #_sourceLocation) throws -> AttentionResult {
    let (q, k, v) = try randomQKV(batch: batch, heads: heads, kvHeads: kvHeads, queryLength: pattern.queryLength,
                                  keyLength: pattern.keyLength, headDim: headDim, valueDim: valueDim, seed: seed)
    return try checkAgainstReference(attention, query: q, key: k, value: v, keyLengths: keyLengths,
                                     threads: threads, scale: nil,
                                     visible: patternVisibility(pattern, keyLengths: keyLengths),
                                     "\(label) Nq\(pattern.queryLength) Nk\(pattern.keyLength) D\(headDim)",
                                     sourceLocation: sourceLocation)
}

/// Checks that `attention` gives bitwise identical results with 1 and 2 threads, and
/// that cost() reports the pattern's scored pairs.
func checkPatternDeterminismAndCost(_ attention: some Attention, queryLength: Int, keyLength: Int? = nil,
                                    heads: Int, headDim: Int, expectedPairs: Int, _ label: String,
                                    sourceLocation: SourceLocation = #_sourceLocation) throws {
    let (q, k, v) = try randomQKV(batch: 2, heads: heads, queryLength: queryLength, keyLength: keyLength,
                                  headDim: headDim, seed: 77)
    let one = try attention.attend(query: q, key: k, value: v, keyLengths: nil, threads: 1)
    let two = try attention.attend(query: q, key: k, value: v, keyLengths: nil, threads: 2)
    expectBitwiseEqual(one, two, "\(label) threads 1 vs 2", sourceLocation: sourceLocation)
    let shape = AttentionShape(batch: 2, heads: heads, queryLength: queryLength, keyLength: keyLength, headDim: headDim)
    let cost = try attention.cost(shape, threads: 2)
    #expect(cost.scoredPairs == 2 * expectedPairs, "\(label): cost reports \(cost.scoredPairs) pairs, expected \(2 * expectedPairs)",
            sourceLocation: sourceLocation)
    #expect(cost.flops == 2 * Double(cost.scoredPairs) * Double(2 * headDim), "\(label): flops", sourceLocation: sourceLocation)
}

/// Checks `pattern`'s dense mask of every head against `spec(head, p, j)`, the
/// specification's rule written out in the test with `p = i + Nk − Nq` (pairs with `j`
/// outside `0..<Nk` never reach it).
func checkPatternMatchesSpec(_ pattern: some AttentionPattern, _ label: String,
                             sourceLocation: SourceLocation = #_sourceLocation,
                             spec: (_ head: Int, _ p: Int, _ j: Int) -> Bool) {
    let nq = pattern.queryLength, nk = pattern.keyLength
    for h in 0..<pattern.heads {
        let mask = pattern.denseMask(head: h)
        let differing = (0..<(nq * nk)).filter { mask[$0] != spec(h, $0 / nk + nk - nq, $0 % nk) }
        let same = differing.isEmpty
        #expect(same, "\(label) head \(h): \(differing.count) pairs differ from the specification, e.g. \(differing.prefix(3).map { ($0 / nk, $0 % nk) })",
                sourceLocation: sourceLocation)
    }
}

/// `⌊a / b⌋` for any sign of `a` (test side).
func floorDivide(_ a: Int, _ b: Int) -> Int { Int((Double(a) / Double(b)).rounded(.down)) }

/// Checks that `attention` reads only the addressed elements: inputs embedded in NaN
/// (padded rows, inner strides 1 and 2, so values are read in place or packed) give
/// results bitwise equal to contiguous inputs, with no NaN.
func checkReadsOnlyAddressedElements(_ attention: some Attention, heads: Int, queryLength: Int,
                                     keyLength: Int? = nil, headDim: Int = 64, _ label: String,
                                     sourceLocation: SourceLocation = #_sourceLocation) throws {
    let (q, k, v) = try randomQKV(heads: heads, queryLength: queryLength, keyLength: keyLength,
                                  headDim: headDim, seed: 91)
    let contiguous = try attention.attend(query: q, key: k, value: v, keyLengths: nil, threads: 2)
    for stride in [1, 2] {
        let padded = try attention.attend(query: embeddedInNaN(q, innerStride: stride), key: embeddedInNaN(k, innerStride: stride),
                                          value: embeddedInNaN(v, innerStride: stride), keyLengths: nil, threads: 2)
        let clean = !padded.output.elements.contains { $0.isNaN } && !padded.logSumExp.elements.contains { $0.isNaN }
        #expect(clean, "\(label): NaN padding reached the result (inner stride \(stride))", sourceLocation: sourceLocation)
        expectBitwiseEqual(padded, contiguous, "\(label) NaN-padded (inner stride \(stride)) vs contiguous",
                           sourceLocation: sourceLocation)
    }
}
