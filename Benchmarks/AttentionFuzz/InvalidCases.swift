import AttentionBenchCore
import EfficientAttention

extension FuzzCase {
    /// One invalid input, drawn at random: mismatched shapes, bad key lengths or thread
    /// counts, a non-finite or huge scale, out-of-range options, negative or huge sizes.
    /// It must throw an ``AttentionError`` (accepting it, or any other error, fails).
    func invalidCase() {
        let (what, body) = invalidInput()
        // Options marked "(valid if computed)" are legal but extreme: they may compute or
        // throw, never trap.
        expectRefused(what, mayCompute: what.hasSuffix(FuzzCase.mayCompute), body)
    }

    /// Runs `body`, which must throw an ``AttentionError`` (or, if `mayCompute`, succeed).
    func expectRefused(_ what: String, mayCompute: Bool, _ body: () throws -> Void) {
        log("invalid: \(what)")
        do {
            try call(body)
            if !mayCompute { fail("accepted invalid input: \(what)") }
        } catch let error as AttentionError {
            log("threw \(error)")
        } catch {
            fail("invalid input \(what) threw \(type(of: error)), not an AttentionError: \(error)")
        }
    }

    /// A description of an invalid input and the calls that must throw.
    func invalidInput() -> (String, () throws -> Void) {
        let (b, h, n, d) = (rng.int(1...2), rng.pick([1, 2, 4]), rng.int(1...20), rng.pick([1, 3, 8, 16]))
        let entry = rng.pick(FuzzCase.entries)
        let causal = rng.chance(0.5)
        /// `attend` of the registry's conformer (small settings) on the given tensors.
        func attend(q: [Int], k: [Int], v: [Int], keyLengths: [Int]? = nil, threads: Int = 1) -> () throws -> Void {
            let seed = rng.next()
            return {
                let shape = AttentionShape(batch: b, heads: h, queryLength: n, headDim: d)
                let problem = BenchProblem(shape: shape, causal: causal)
                let attention = try entry.make!(ConformerConfig(
                    problem: problem, parameters: entry.resolveParameters(
                        [.window: 4, .stride: 3, .blockSize: 4, .randomBlocks: 1, .bucketSize: 4, .hashes: 2, .features: 8,
                         .proj: 4, .span: 6, .ramp: 2, .memory: 0], at: problem), seed: seed))
                let (query, key, value) = (try Tensor.random(shape: q, seed: seed), try Tensor.random(shape: k, seed: seed + 1),
                                           try Tensor.random(shape: v, seed: seed + 2))
                _ = try attention.attend(query: query, key: key, value: value, keyLengths: keyLengths, threads: threads)
            }
        }
        let good = [b, h, n, d]
        let scale = rng.pick([Float.nan, .infinity, -.infinity, 1e30, .greatestFiniteMagnitude, -1e30])
        let huge = rng.pick([Int.max, Int.max / 2, 1 << 40, 1 << 62])
        let negative = rng.pick([-1, -7, Int.min])
        switch rng.int(0...15) {
        case 0: return ("\(entry.name): key headDim \(d + 1) vs query \(d)", attend(q: good, k: [b, h, n, d + 1], v: good))
        case 1: return ("\(entry.name): value length \(n + 1) vs key \(n)", attend(q: good, k: good, v: [b, h, n + 1, d]))
        case 2: return ("\(entry.name): key batch \(b + 1) vs query \(b)", attend(q: good, k: [b + 1, h, n, d], v: [b + 1, h, n, d]))
        case 3: return ("\(entry.name): 3 query heads over 2 key heads", attend(q: [b, 3, n, d], k: [b, 2, n, d], v: [b, 2, n, d]))
        case 4:
            let lengths = rng.pick([Array(repeating: n, count: b + 1), [n + 1] + Array(repeating: n, count: b - 1),
                                    [-1] + Array(repeating: 0, count: b - 1)])
            return ("\(entry.name): keyLengths \(lengths) for B \(b) Nk \(n)", attend(q: good, k: good, v: good, keyLengths: lengths))
        case 5:
            let threads = rng.pick([0, -1, Int.min])
            return ("\(entry.name): threads \(threads)", attend(q: good, k: good, v: good, threads: threads))
        case 6:
            let which = rng.int(0...7)
            return ("scale \(scale) on conformer #\(which)", {
                let (q, k, v) = (try Tensor.random(shape: good, seed: 1), try Tensor.random(shape: good, seed: 2),
                                 try Tensor.random(shape: good, seed: 3))
                let attention: any Attention
                switch which {
                case 0: attention = VanillaAttention(causal: causal, scale: scale)
                case 1: attention = DenseAttention(causal: causal, scale: scale)
                case 2: attention = LocalAttention(left: 3, right: 2, causal: causal, scale: scale)
                case 3: attention = StridedAttention(stride: 3, causal: causal, scale: scale)
                case 4: attention = MultiQueryAttention(causal: causal, scale: scale)
                case 5: var a = LongformerAttention(window: 4, causal: causal); a.scale = scale; attention = a
                case 6: var a = BigBirdAttention(blockSize: 4, randomBlockCount: 1, causal: causal); a.scale = scale; attention = a
                default: var a = LSHAttention(bucketSize: 4, hashes: 2, causal: causal); a.scale = scale; attention = a
                }
                _ = try attention.attend(query: q, key: k, value: v, threads: 1)
            })
        case 7, 8:
            return badOption(good: good, negative: negative, huge: huge, causal: causal)
        case 9:
            let shape = rng.pick([[negative, h, n, d], [b, negative, n, d], [b, h, n, negative], [huge, huge, 4, 4],
                                  [1 << 31, 1 << 31, 1, 1]])
            return ("Tensor(shape: \(shape))", { _ = try Tensor(shape: shape) })
        case 10:
            // Two elements along an axis whose stride is negative or too large for the storage.
            let axis = rng.int(0...3)
            var (shape, strides) = ([1, 1, 1, 1], [1, 1, 1, 1])
            shape[axis] = 2
            strides[axis] = rng.chance(0.5) ? negative : huge
            return ("Tensor view shape \(shape) strides \(strides) over 8 elements", {
                _ = try Tensor(shape: shape, storage: [Float](repeating: 0, count: 8), strides: strides)
            })
        case 11:
            // A huge batch or head dimension times at least 2·2·2·4 overflows Int elements.
            let field = rng.int(0...4)
            var sizes = [b, max(h, 2), max(n, 2), max(n, 2), max(d, 4)]
            sizes[field] = field == 0 || field == 4 ? rng.pick([Int.max, Int.max / 2, 1 << 62]) : negative
            return ("\(entry.name).cost at B \(sizes[0]) H \(sizes[1]) Nq \(sizes[2]) Nk \(sizes[3]) D \(sizes[4])", {
                let shape = AttentionShape(batch: sizes[0], heads: sizes[1], queryLength: sizes[2], keyLength: sizes[3],
                                           headDim: sizes[4])
                let attention = try entry.make!(ConformerConfig(
                    problem: BenchProblem(shape: AttentionShape(heads: 1, queryLength: 8, headDim: 4), causal: causal),
                    parameters: entry.resolveParameters([:], at: BenchProblem(shape: AttentionShape(heads: 1, queryLength: 8, headDim: 4),
                                                                               causal: causal)), seed: 1))
                _ = try attention.cost(shape, threads: 1)
            })
        case 12:
            let sizes = rng.pick([(1, 1, 1, 0), (1, 0, 1, 4), (0, 1, 1, 4), (1, 1, huge, 4), (1, 1, 1 << 40, 64),
                                  (1, 1, 4, huge), (1, huge, 4, 4)])
            return ("KVCache(layers \(sizes.0), kvHeads \(sizes.1), capacity \(sizes.2), headDim \(sizes.3))", {
                _ = try KVCache(layers: sizes.0, kvHeads: sizes.1, headDim: sizes.3, capacity: sizes.2)
            })
        case 13:
            return ("decode with query headDim \(d + 1) on a cache of \(d)", {
                let cache = try KVCache(kvHeads: 1, headDim: d, capacity: 4)
                try cache.append(layer: 0, keys: try Tensor.random(shape: [1, 1, 2, d], seed: 1),
                                 values: try Tensor.random(shape: [1, 1, 2, d], seed: 2))
                _ = try MultiQueryAttention().decode(query: try Tensor.random(shape: [1, 2, 1, d + 1], seed: 3), cache: cache)
            })
        case 14:
            let layer = rng.pick([-1, 1, Int.max])
            return ("KVCache append to layer \(layer) of 1", {
                let cache = try KVCache(kvHeads: 1, headDim: d, capacity: 4)
                try cache.append(layer: layer, keys: try Tensor.random(shape: [1, 1, 2, d], seed: 1),
                                 values: try Tensor.random(shape: [1, 1, 2, d], seed: 2))
            })
        default:
            return ("\(entry.name): huge threads \(huge) with keyLengths of the wrong count",
                    attend(q: good, k: good, v: good, keyLengths: [], threads: huge))
        }
    }

    /// The suffix of an extreme option that is legal (computing it is right, so is an error).
    static let mayCompute = " (valid if computed)"

    /// An out-of-range option of one conformer (negative, zero, NaN or huge).
    func badOption(good: [Int], negative: Int, huge: Int, causal: Bool) -> (String, () throws -> Void) {
        let d = good[3], h = good[1]
        let options: [(String, () throws -> any Attention)] = [
            ("local left \(negative)", { LocalAttention(left: negative, right: 1, causal: causal) }),
            ("local blockSize 0", { LocalAttention(blockSize: 0, causal: causal) }),
            ("strided stride \(negative)", { StridedAttention(stride: negative, causal: causal) }),
            ("longformer window \(negative)", { LongformerAttention(window: negative, causal: causal) }),
            ("longformer dilation 0", { LongformerAttention(window: 4, dilations: [0], causal: causal) }),
            ("longformer global position \(negative)", { LongformerAttention(window: 4, globalPositions: [negative], causal: causal) }),
            ("bigbird blockSize 0", { BigBirdAttention(blockSize: 0, causal: causal) }),
            ("bigbird randomBlockCount \(negative)", { BigBirdAttention(blockSize: 4, randomBlockCount: negative, causal: causal) }),
            ("lsh bucketSize 0", { LSHAttention(bucketSize: 0, hashes: 2, causal: causal) }),
            ("lsh hashes \(negative)", { LSHAttention(bucketSize: 4, hashes: negative, causal: causal) }),
            ("lsh bucketCount \(huge)", { LSHAttention(bucketSize: 4, hashes: 2, bucketCount: huge, causal: causal) }),
            ("routing clusters 0", { try RoutingAttention(heads: h, headDim: d, clusters: 0, causal: causal) }),
            ("routing clusters \(huge)", { try RoutingAttention(heads: h, headDim: d, clusters: huge, causal: causal) }),
            ("linformer projectedLength 0", { try LinformerAttention(projectedLength: 0, maxSequenceLength: good[2]) }),
            ("linformer maxSequenceLength below Nk", { try LinformerAttention(projectedLength: 2, maxSequenceLength: good[2] - 1) }),
            ("linformer projectedLength \(huge)", { try LinformerAttention(projectedLength: huge, maxSequenceLength: good[2]) }),
            ("performer features 0", { LinearAttention(featureMap: try FavorPlusFeatures(features: 0, headDim: d)) }),
            ("performer features \(huge)", { LinearAttention(featureMap: try FavorPlusFeatures(features: huge, headDim: d)) }),
            ("linear epsilon NaN", { LinearAttention(featureMap: EluPlusOneFeatures(), epsilon: .nan) }),
            ("transformer-xl memoryLength \(negative)", {
                try TransformerXLAttention(heads: h, headDim: d, memoryLength: negative, maxSegmentLength: good[2], seed: 1)
            }),
            ("transformer-xl memoryLength \(huge)", {
                try TransformerXLAttention(heads: h, headDim: d, memoryLength: huge, maxSegmentLength: good[2], seed: 1)
            }),
            ("adaptive-span span -1", { AdaptiveSpanAttention(heads: h, span: -1, causal: true) }),
            ("adaptive-span ramp NaN", { AdaptiveSpanAttention(heads: h, span: 4, ramp: .nan, causal: true) }),
            ("adaptive-span ramp 1e30", { AdaptiveSpanAttention(heads: h, span: 4, ramp: 1e30, causal: true) }),
            ("adaptive-span span 1e30" + FuzzCase.mayCompute, { AdaptiveSpanAttention(heads: h, span: 1e30, causal: true) }),
            ("multi-query leftWindow \(negative)", { MultiQueryAttention(causal: causal, leftWindow: negative) }),
            ("multi-query leftWindow \(huge) rightWindow \(huge)" + FuzzCase.mayCompute, { MultiQueryAttention(leftWindow: huge, rightWindow: huge) }),
        ]
        let (what, make) = rng.pick(options)
        return (what, {
            let attention = try make()
            let (q, k, v) = (try Tensor.random(shape: good, seed: 1), try Tensor.random(shape: good, seed: 2),
                             try Tensor.random(shape: good, seed: 3))
            _ = try attention.attend(query: q, key: k, value: v, threads: 1)
        })
    }
}
