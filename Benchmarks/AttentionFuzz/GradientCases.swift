import AttentionBenchCore
@_spi(Testing) @_spi(Benchmarking) import EfficientAttention
import Foundation

extension FuzzCase {
    /// A conformer with a backward on a random valid problem: gradients without a throw once
    /// `validate` accepts, finite, the bits of 1 thread at any thread count and through
    /// strided NaN-gapped views of every operand, and with operands and gradients in random
    /// precisions (16-bit through ``ActivationView``s, with or without a workspace) the
    /// `Float` gradients on the same values, each element rounded once.
    func gradientCase() throws {
        guard let (entry, problem, _, made) = try drawConformer(from: FuzzCase.entries) else { return }
        guard let attention = made as? any DifferentiableAttention else {
            log("no backward")
            return
        }
        try checkGradients(attention, problem, "\(entry.name) \(problem)")
    }

    private func checkGradients(_ attention: some DifferentiableAttention, _ problem: BenchProblem,
                                _ label: String) throws {
        let s = problem.shape
        let precisions: [ActivationPrecision] = [.float32, .float32, .float16, .bfloat16]
        let p = OperandPrecisions(query: rng.pick(precisions), key: rng.pick(precisions),
                                  value: rng.pick(precisions), output: rng.pick(precisions))
        // Every operand holds values of its precision, so the Float calls and the 16-bit call
        // see the same numbers.
        func operand(_ shape: [Int], _ precision: ActivationPrecision) throws -> Tensor {
            let t = try rng.tensor(shape)
            return try Tensor(shape: shape, data: t.elements.map { Self.rounded($0, precision) })
        }
        let q = try operand([s.batch, s.heads, s.queryLength, s.headDim], p.query)
        let k = try operand([s.batch, s.kvHeads, s.keyLength, s.headDim], p.key)
        let v = try operand([s.batch, s.kvHeads, s.keyLength, s.valueDim], p.value)
        let keyLengths: [Int]? = rng.chance(0.35)
            ? (0..<s.batch).map { _ in rng.chance(0.3) ? 0 : rng.int(0...s.keyLength) } : nil
        log("gradients, precisions \(p), keyLengths \(keyLengths.map { "\($0)" } ?? "none")")
        let forward: AttentionResult
        do {
            forward = try call { try attention.attend(query: q, key: k, value: v, keyLengths: keyLengths, threads: 1) }
        } catch {
            fail("\(label): forward threw \(error) on a problem validate accepted")
            return
        }
        let o = try Tensor(shape: forward.output.shape, data: forward.output.elements.map { Self.rounded($0, p.output) })
        let dO = try operand(forward.output.shape, p.output)
        func gradients(_ q: Tensor, _ k: Tensor, _ v: Tensor, _ o: Tensor, _ lse: Tensor, _ dO: Tensor,
                       threads: Int, _ what: String) -> AttentionGradients? {
            do {
                return try call {
                    try attention.gradients(query: q, key: k, value: v, output: o, logSumExp: lse, outputGradient: dO,
                                            keyLengths: keyLengths, threads: threads)
                }
            } catch {
                fail("\(label) \(what): gradients threw \(error) on a problem validate accepted")
                return nil
            }
        }
        guard let one = gradients(q, k, v, o, forward.logSumExp, dO, threads: 1, "1 thread") else { return }
        for (name, t) in [("dQuery", one.dQuery), ("dKey", one.dKey), ("dValue", one.dValue)]
            where !t.elements.allSatisfy(\.isFinite) {
            fail("\(label): \(name) not finite")
        }
        let threads = threadCount()
        if let other = gradients(q, k, v, o, forward.logSumExp, dO, threads: threads, "\(threads) threads"),
           !sameBits(other, one) {
            fail("\(label): gradients on \(threads) threads differ from 1 thread")
        }
        let views = (try rng.view(of: q), try rng.view(of: k), try rng.view(of: v), try rng.view(of: o),
                     try rng.view(of: forward.logSumExp), try rng.view(of: dO))
        let viewThreads = rng.int(1...4)
        if let viewed = gradients(views.0, views.1, views.2, views.3, views.4, views.5, threads: viewThreads,
                                  "strided views"), !sameBits(viewed, one) {
            fail("\(label): gradients through strided views differ from contiguous")
        }
        guard [p.query, p.key, p.value, p.output].contains(where: { $0 != .float32 }) else { return }
        // The 16-bit call: operands and gradients stored in their precisions (dQ like the
        // query, dK like the key, dV like the value, dO like the output).
        let stored = (StoredOperand(q, p.query), StoredOperand(k, p.key), StoredOperand(v, p.value),
                      StoredOperand(o, p.output), StoredOperand(dO, p.output))
        let dq = StoredOperand(shape: q.shape, p.query), dk = StoredOperand(shape: k.shape, p.key)
        let dv = StoredOperand(shape: v.shape, p.value)
        let mixedThreads = rng.int(1...4)
        let workspace = rng.chance(0.5)
            ? try AttentionWorkspace(forBackwardOf: attention, shape: s, threads: mixedThreads, precisions: p) : nil
        log("16-bit gradients, \(mixedThreads) threads, workspace \(workspace?.byteCount ?? 0) bytes")
        do {
            try forward.logSumExp.withStridedView { lse in
                try call {
                    try attention.gradients(query: stored.0.view(), key: stored.1.view(), value: stored.2.view(),
                                            output: stored.3.view(), logSumExp: lse, outputGradient: stored.4.view(),
                                            dQuery: dq.mutableView(), dKey: dk.mutableView(), dValue: dv.mutableView(),
                                            keyLengths: keyLengths, workspace: workspace, threads: mixedThreads)
                }
            }
        } catch {
            fail("\(label): 16-bit gradients (\(p)) threw \(error)")
            return
        }
        for (name, got, want) in [("dQuery", dq, one.dQuery), ("dKey", dk, one.dKey), ("dValue", dv, one.dValue)] {
            if let i = (0..<got.count).first(where: { got.bits($0) != Self.storedBits(want.elements[$0], got.precision) }) {
                fail("\(label): 16-bit \(name) (\(got.precision), operands \(p)) element \(i) differs from the Float gradient rounded")
            }
        }
    }

    /// `x` rounded to `precision` (nearest, ties to even), as a Float.
    static func rounded(_ x: Float, _ precision: ActivationPrecision) -> Float {
        switch precision {
        case .float32: x
        case .float16: HalfConversions.softwareFloat(bits: HalfConversions.softwareBits(x))
        case .bfloat16: Float(bitPattern: UInt32(BFloat16Conversions.bits(x)) << 16)
        }
    }

    /// The bits `x` is stored as in `precision` (zero-extended for 16-bit precisions).
    static func storedBits(_ x: Float, _ precision: ActivationPrecision) -> UInt32 {
        switch precision {
        case .float32: x.bitPattern
        case .float16: UInt32(HalfConversions.softwareBits(x))
        case .bfloat16: UInt32(BFloat16Conversions.bits(x))
        }
    }
}

/// True when the three gradients hold the same elements bit for bit.
func sameBits(_ a: AttentionGradients, _ b: AttentionGradients) -> Bool {
    func same(_ x: Tensor, _ y: Tensor) -> Bool {
        x.shape == y.shape && zip(x.elements, y.elements).allSatisfy { $0.bitPattern == $1.bitPattern }
    }
    return same(a.dQuery, b.dQuery) && same(a.dKey, b.dKey) && same(a.dValue, b.dValue)
}

/// A tensor's elements stored contiguously in `precision`, in memory the object owns; an
/// output starts as NaN in every element.
final class StoredOperand {
    let precision: ActivationPrecision
    let shape: SIMD4<Int>
    let count: Int
    private let memory: UnsafeMutableRawPointer

    init(shape: [Int], _ precision: ActivationPrecision) {
        self.precision = precision
        self.shape = SIMD4(shape[0], shape[1], shape[2], shape[3])
        count = shape.reduce(1, *)
        memory = .allocate(byteCount: max(1, count) * precision.byteWidth, alignment: 64)
        for i in 0..<count { store(.nan, at: i) }
    }

    convenience init(_ tensor: Tensor, _ precision: ActivationPrecision) {
        self.init(shape: tensor.shape, precision)
        for (i, x) in tensor.elements.enumerated() { store(x, at: i) }
    }

    deinit { memory.deallocate() }

    private func store(_ x: Float, at i: Int) {
        if precision == .float32 {
            memory.storeBytes(of: x, toByteOffset: 4 * i, as: Float.self)
        } else {
            memory.storeBytes(of: UInt16(FuzzCase.storedBits(x, precision)), toByteOffset: 2 * i, as: UInt16.self)
        }
    }

    /// Element `i`'s stored bits (zero-extended).
    func bits(_ i: Int) -> UInt32 {
        precision == .float32 ? memory.load(fromByteOffset: 4 * i, as: UInt32.self)
            : UInt32(memory.load(fromByteOffset: 2 * i, as: UInt16.self))
    }

    func view() throws -> ActivationView {
        if precision == .float32 {
            return ActivationView(try StridedView(UnsafeBufferPointer(start: memory.assumingMemoryBound(to: Float.self),
                                                                      count: count), shape: shape))
        }
        return try ActivationView(bitPatterns: UnsafeBufferPointer(start: memory.assumingMemoryBound(to: UInt16.self),
                                                                   count: count),
                                  precision: precision, shape: shape)
    }

    func mutableView() throws -> MutableActivationView {
        if precision == .float32 {
            return MutableActivationView(try MutableStridedView(
                UnsafeMutableBufferPointer(start: memory.assumingMemoryBound(to: Float.self), count: count), shape: shape))
        }
        return try MutableActivationView(
            bitPatterns: UnsafeMutableBufferPointer(start: memory.assumingMemoryBound(to: UInt16.self), count: count),
            precision: precision, shape: shape)
    }
}
