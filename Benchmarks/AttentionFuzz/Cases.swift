import AttentionBenchCore
@_spi(Testing) @_spi(Benchmarking) import EfficientAttention
import Foundation

/// One fuzz case: a problem drawn from its seed alone, run through the public API, and
/// the checks of its results. A case is one of these kinds: `attend` on a registered
/// conformer with a valid random problem, its gradients, `decode` against a ``KVCache``
/// with random appends, the rotating, paged and contiguous caches in every precision with
/// random operations, random score modifiers, a packed variable-length batch, or an
/// invalid input that must throw an ``AttentionError``.
final class FuzzCase {
    let seed: UInt64
    let verbose: Bool
    var rng: SeededGenerator
    /// Public API calls made.
    private(set) var calls = 0
    /// Failed checks, one message each.
    private(set) var failures: [String] = []

    init(seed: UInt64, verbose: Bool = false) {
        self.seed = seed
        self.verbose = verbose
        rng = SeededGenerator(seed: seed)
    }

    /// Runs the case; errors outside the checks' expectations become failures.
    func run() {
        do {
            switch rng.int(0...99) {
            case 0..<44: try attendCase()
            case 44..<56: try gradientCase()
            case 56..<66: try decodeCase()
            case 66..<74: try modifierCase()
            case 74..<82: try packedCase()
            case 82..<90: try cacheCase()
            default: invalidCase()
            }
        } catch {
            fail("unexpected error \(type(of: error)): \(error)")
        }
    }

    func log(_ text: @autoclosure () -> String) {
        if verbose {
            print("  " + text())
            fflush(nil)  // a crash right after must not lose the line
        }
    }

    func fail(_ message: String) {
        failures.append(message)
        log("FAIL " + message)
    }

    /// `body()`, counted as one call.
    func call<T>(_ body: () throws -> T) rethrows -> T {
        calls += 1
        return try body()
    }

    /// `body()`, counted as one call, that must not throw: an error is a failed check
    /// (`what`: threw …) and gives nil.
    func attempt<T>(_ what: @autoclosure () -> String, _ body: () throws -> T) -> T? {
        do {
            return try call(body)
        } catch {
            fail("\(what()): threw \(error)")
            return nil
        }
    }

    // MARK: Random sizes

    static let dims = [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 31, 32, 33, 48, 64, 65, 128]

    func length() -> Int { rng.chance(0.1) ? rng.int(41...150) : rng.int(1...40) }

    func threadCount() -> Int {
        rng.chance(0.05) ? rng.pick([64, 1000, 1 << 20, Int.max]) : rng.int(2...8)
    }

    /// Settings small enough that every structure (windows, blocks, buckets, clusters,
    /// projections, features, spans, memory) shows at the lengths above.
    func settings() -> [Parameter: Int] {
        var values: [Parameter: Int] = [
            .window: rng.int(1...24), .stride: rng.int(1...9), .blockSize: rng.int(1...12), .randomBlocks: rng.int(0...3),
            .bucketSize: rng.int(1...12), .hashes: rng.int(1...4), .features: rng.int(1...40), .proj: rng.int(1...24),
            .span: rng.int(0...30), .ramp: rng.int(1...10), .memory: rng.int(0...12),
            .compression: rng.int(1...9), .inducing: rng.int(1...12), .seeds: rng.int(1...5),
            .globals: rng.int(0...10), .radius: rng.int(0...20), .maxDistance: rng.int(0...8),
            .compressedMemory: rng.int(0...12)]
        if rng.chance(0.3) { values[.sortCut] = rng.int(1...4) }
        return values
    }

    static let entries = Registry.standard.entries.filter(\.isAvailable)

    // MARK: attend

    /// One of `entries` built for a random problem with random settings, or nil (logged) when
    /// it refuses them: the conformer, its problem and its resolved settings.
    func drawConformer(from entries: [VariantEntry])
        throws -> (VariantEntry, BenchProblem, [Parameter: Int], any Attention)? {
        let entry = rng.pick(entries)
        let heads = rng.pick([1, 1, 2, 3, 4, 6])
        let kvHeads = rng.pick((1...heads).filter { heads % $0 == 0 })
        let nq = length()
        let base = BenchProblem(
            shape: AttentionShape(batch: rng.int(1...3), heads: heads, kvHeads: kvHeads, queryLength: nq,
                                  keyLength: rng.chance(0.5) ? nq : length(), headDim: rng.pick(FuzzCase.dims),
                                  valueDim: rng.chance(0.5) ? nil : rng.pick(FuzzCase.dims)),
            causal: rng.chance(0.5))
        let overrides = settings()
        let problem = entry.adjustProblem(base, entry.resolveParameters(overrides, at: base))
        let parameters = entry.resolveParameters(overrides, at: problem)
        log("\(entry.name) \(problem) \(VariantEntry.describe(parameters))")
        do {
            let attention = try call {
                try entry.make!(ConformerConfig(problem: problem, parameters: parameters, seed: rng.next()))
            }
            try call { try attention.validate(problem.shape) }
            _ = try call { try attention.cost(problem.shape, threads: rng.int(1...8)) }
            return (entry, problem, parameters, attention)
        } catch let error as AttentionError {
            log("refused: \(error)")
            return nil
        }
    }

    /// A registered conformer on a random valid problem: no throw once `validate` accepts,
    /// finite results, empty rows 0 with `-inf`, the bits of 1 thread at any thread count
    /// and for a strided NaN-gapped view, and for the exact conformers the naive reference.
    func attendCase() throws {
        guard let (entry, problem, parameters, attention) = try drawConformer(from: FuzzCase.entries) else { return }
        let s = problem.shape
        let amplitude = rng.pick([Float(1), 1, 1, 4])
        var q = try rng.tensor([s.batch, s.heads, s.queryLength, s.headDim], amplitude: amplitude)
        let k = try rng.tensor([s.batch, s.kvHeads, s.keyLength, s.headDim], amplitude: amplitude)
        let v = try rng.tensor([s.batch, s.kvHeads, s.keyLength, s.valueDim])
        var qView = try rng.view(of: q)
        if rng.chance(0.25), let axis = [0, 1, 2].filter({ q.shape[$0] > 1 }).randomElement(using: &rng) {
            (q, qView) = try rng.broadcast(q, axis: axis)
            log("query broadcast along axis \(axis) (stride 0)")
        }
        let keyLengths: [Int]? = rng.chance(0.35)
            ? (0..<s.batch).map { _ in rng.chance(0.3) ? 0 : rng.int(0...s.keyLength) } : nil
        if let keyLengths { log("keyLengths \(keyLengths)") }
        func attend(_ q: Tensor, _ k: Tensor, _ v: Tensor, threads: Int, _ what: String) -> AttentionResult? {
            attempt("\(entry.name) \(problem) \(what), on a problem validate accepted") {
                try attention.attend(query: q, key: k, value: v, keyLengths: keyLengths, threads: threads)
            }
        }
        guard let one = attend(q, k, v, threads: 1, "1 thread") else { return }
        checkResult(one, shape: s, keyLengths: keyLengths, "\(entry.name) \(problem)")
        let threads = threadCount()
        log("\(threads) threads")
        if let other = attend(q, k, v, threads: threads, "\(threads) threads"), !bitwiseEqual(other, one) {
            fail("\(entry.name) \(problem): \(threads) threads differ from 1 thread")
        }
        let (kView, vView) = (try rng.view(of: k), try rng.view(of: v))
        let viewThreads = rng.int(1...4)
        log("views: strides q \(qView.strides) k \(kView.strides) v \(vView.strides), \(viewThreads) threads")
        if let viewed = attend(qView, kView, vView, threads: viewThreads, "strided views"), !bitwiseEqual(viewed, one) {
            fail("\(entry.name) \(problem): strided views (q \(qView.strides) k \(kView.strides) v \(vView.strides)) differ from contiguous")
        }
        if rng.chance(0.4) { try checkMixedForward(attention, q, k, v, keyLengths: keyLengths, "\(entry.name) \(problem)") }
        if let visible = referenceMask(entry.name, attention, shape: s, parameters: parameters, causal: problem.causal),
           s.batch * s.heads * s.queryLength * s.keyLength * (s.headDim + s.valueDim) <= 4_000_000 {
            let reference = naiveAttention(query: q, key: k, value: v, keyLengths: keyLengths,
                                           scale: 1 / Double(s.headDim).squareRoot(), visible: visible)
            if let difference = compare(one, reference) {
                fail("\(entry.name) \(problem): differs from the naive reference: \(difference)")
            }
        }
    }

    /// The call through ``ActivationView``s with operands in random precisions (stored
    /// 16-bit where drawn, with or without a workspace): the `Float` call on the rounded
    /// operands, its output rounded once, and its log-sum-exp, bit for bit.
    func checkMixedForward(_ attention: any Attention, _ q: Tensor, _ k: Tensor, _ v: Tensor, keyLengths: [Int]?,
                           _ label: String) throws {
        let precisions: [ActivationPrecision] = [.float32, .float16, .bfloat16]
        let p = OperandPrecisions(query: rng.pick(precisions), key: rng.pick(precisions),
                                  value: rng.pick(precisions), output: rng.pick(precisions))
        func rounded(_ t: Tensor, _ precision: ActivationPrecision) throws -> Tensor {
            try Tensor(shape: t.shape, data: t.elements.map { Self.rounded($0, precision) })
        }
        let (rq, rk, rv) = (try rounded(q, p.query), try rounded(k, p.key), try rounded(v, p.value))
        let threads = rng.int(1...4)
        let want: AttentionResult
        do {
            want = try call { try attention.attend(query: rq, key: rk, value: rv, keyLengths: keyLengths, threads: threads) }
        } catch {
            fail("\(label): the Float call on rounded operands threw \(error)")
            return
        }
        let s = try AttentionShape(query: q, key: k, value: v)
        let (sq, sk, sv) = (StoredOperand(rq, p.query), StoredOperand(rk, p.key), StoredOperand(rv, p.value))
        let out = StoredOperand(shape: want.output.shape, p.output)
        var lse = try Tensor(shape: want.logSumExp.shape, repeating: .nan)
        // Merged passes form a 16-bit output part by part (MergedOutputStaging): half the
        // cases with parts of a random size (down to one group of heads).
        let partBytes = rng.chance(0.5) ? MergedOutputStaging.partBytes
            : rng.int(1...max(1, s.batch * s.heads * s.queryLength * s.valueDim * 4))
        let ran = try MergedOutputStaging.$partBytes.withValue(partBytes) { () throws -> Bool in
            let workspace = rng.chance(0.5)
                ? try AttentionWorkspace(for: attention, shape: s, threads: threads, precisions: p) : nil
            log("16-bit forward, precisions \(p), \(threads) threads, workspace \(workspace?.byteCount ?? 0) bytes, parts of \(partBytes) bytes")
            do {
                try lse.withMutableStridedView { l in
                    try call {
                        try attention.attend(query: sq.view(), key: sk.view(), value: sv.view(), output: out.mutableView(),
                                             logSumExp: l, keyLengths: keyLengths, workspace: workspace, threads: threads)
                    }
                }
            } catch {
                fail("\(label): the 16-bit call (\(p)) threw \(error)")
                return false
            }
            return true
        }
        guard ran else { return }
        if let i = (0..<out.count).first(where: { out.bits($0) != Self.storedBits(want.output.elements[$0], p.output) }) {
            fail("\(label): 16-bit output (\(p)) element \(i) differs from the Float call's, rounded")
        }
        if !zip(lse.elements, want.logSumExp.elements).allSatisfy({ $0.bitPattern == $1.bitPattern }) {
            fail("\(label): 16-bit call's log-sum-exp (\(p)) differs from the Float call's")
        }
    }

    /// The visibility rule `(h, i, j, Nq, Nk)` of the conformers the naive reference covers
    /// (`nil` for the rest): vanilla, dense, multi-query and local from their definitions;
    /// strided, Longformer, BigBird and axial `.union` from their public patterns
    /// (`AttentionPattern.isVisible`, which their own suites check against the spec).
    func referenceMask(_ name: String, _ attention: any Attention, shape: AttentionShape,
                       parameters: [Parameter: Int], causal: Bool)
        -> ((_ h: Int, _ i: Int, _ j: Int, _ nq: Int, _ nk: Int) -> Bool)? {
        func visible(_ pattern: some AttentionPattern) -> (Int, Int, Int, Int, Int) -> Bool {
            { h, i, j, _, _ in pattern.isVisible(head: h, query: i, key: j) }
        }
        switch (name, attention) {
        case ("vanilla", _), ("dense", _), ("multi-query", _):
            return { _, i, j, nq, nk in !causal || j <= i + nk - nq }
        case ("local", _):
            // The registry's local: left w/2, right w/2 - 1 (0 when causal), aligned as causal.
            let window = parameters[.window]!
            let (left, right) = (window / 2, causal ? 0 : max(0, window / 2 - 1))
            return { _, i, j, nq, nk in j >= i + nk - nq - left && j <= i + nk - nq + right }
        case (_, let a as StridedAttention): return (try? a.pattern(for: shape)).map(visible)
        case (_, let a as LongformerAttention): return (try? a.pattern(for: shape)).map(visible)
        case (_, let a as BigBirdAttention): return (try? a.pattern(for: shape)).map(visible)
        case (_, let a as AxialAttention) where a.combination == .union: return (try? a.pattern(for: shape)).map(visible)
        default:
            return nil
        }
    }

    /// Shapes; finite outputs; a log-sum-exp that is a number or `-inf` (with `sinks`, a
    /// number); rows at `-inf` all 0; every row of a batch item with key length 0 all 0 at
    /// `-inf` (with `sinks`, at its head's sink `σ_h`).
    func checkResult(_ result: AttentionResult, shape s: AttentionShape, keyLengths: [Int]?, sinks: [Float]? = nil,
                     _ label: String) {
        let expected = [s.batch, s.heads, s.queryLength, s.valueDim]
        guard result.output.shape == expected, result.logSumExp.shape == [s.batch, s.heads, s.queryLength, 1] else {
            fail("\(label): result shapes \(result.output.shape), \(result.logSumExp.shape); expected \(expected)")
            return
        }
        let output = result.output.elements, lse = result.logSumExp.elements
        if let bad = output.firstIndex(where: { !$0.isFinite }) {
            fail("\(label): output element \(bad) is \(output[bad])")
        }
        for (r, value) in lse.enumerated() {
            let b = r / (s.heads * s.queryLength), h = r / s.queryLength % s.heads
            let empty = sinks?[h] ?? -.infinity
            let zeroRow = !output[(r * s.valueDim)..<((r + 1) * s.valueDim)].contains(where: { $0 != 0 })
            if value.isNaN || value == .infinity || (sinks != nil && value == -.infinity) {
                fail("\(label): lse row \(r) is \(value)" + (sinks == nil ? "" : " with sinks"))
                return
            }
            if keyLengths?[b] == 0 && (value != empty || !zeroRow) {
                fail("\(label): row \(r) has lse \(value) and output 0 \(zeroRow), but batch item \(b) has no key (expected 0 at lse \(empty))")
                return
            }
            if value == -.infinity && !zeroRow {
                fail("\(label): row \(r) sees no key (lse -inf) but its output is not 0")
                return
            }
        }
    }
}
