@_spi(Testing) @_spi(Benchmarking) import EfficientAttention

extension FuzzCase {
    /// A ``KVCache`` (Float32 or Float16, 1-2 layers) with random appends, some past the
    /// capacity (they must throw and leave the cache unchanged), each followed by a
    /// ``MultiQueryAttention/decode(query:cache:layer:threads:)``: finite, the same bits at
    /// any thread count, and the naive reference over the cached (rounded) keys.
    func decodeCase() throws {
        let kvHeads = rng.int(1...3), batch = rng.int(1...2), layers = rng.int(1...2)
        let heads = kvHeads * rng.pick([1, 1, 2, 3])
        let headDim = rng.pick(FuzzCase.dims)
        let valueDim = rng.chance(0.5) ? headDim : rng.pick(FuzzCase.dims)
        let precision = rng.pick(KVCache.Precision.allCases)
        let cache = try call {
            try KVCache(layers: layers, batch: batch, kvHeads: kvHeads, headDim: headDim, valueDim: valueDim,
                        capacity: rng.int(1...40), precision: precision)
        }
        let decoder = MultiQueryAttention(causal: rng.chance(0.5), leftWindow: rng.chance(0.3) ? rng.int(0...8) : nil,
                                          rightWindow: rng.chance(0.3) ? rng.int(0...8) : nil)
        let label = "decode B\(batch) H\(heads)/\(kvHeads) D\(headDim) Dv\(valueDim) \(precision) capacity \(cache.capacity) "
            + "causal \(decoder.causal) window \(String(describing: decoder.leftWindow)) \(String(describing: decoder.rightWindow))"
        log(label)
        for step in 0..<rng.int(1...6) {
            let layer = rng.int(0...layers - 1)
            let n = rng.int(1...8)
            let item: Int? = batch > 1 && rng.chance(0.4) ? rng.int(0...batch - 1) : nil
            let rows = item == nil ? batch : 1
            var keys = try rng.tensor([rows, kvHeads, n, headDim]), values = try rng.tensor([rows, kvHeads, n, valueDim])
            if rng.chance(0.5) { (keys, values) = (try rng.view(of: keys), try rng.view(of: values)) }
            let before = try (0..<batch).map { try cache.length(layer: layer, batchItem: $0) }
            let fits = (item.map { [before[$0]] } ?? before).allSatisfy { $0 + n <= cache.capacity }
            do {
                try call {
                    if let item {
                        try cache.append(layer: layer, batchItem: item, keys: keys, values: values)
                    } else {
                        try cache.append(layer: layer, keys: keys, values: values)
                    }
                }
                if !fits { fail("\(label) step \(step): append of \(n) past the capacity was accepted") }
            } catch let error as AttentionError {
                if fits { fail("\(label) step \(step): append of \(n) to lengths \(before) threw \(error)") }
                let after = try (0..<batch).map { try cache.length(layer: layer, batchItem: $0) }
                if after != before { fail("\(label) step \(step): a failed append changed lengths \(before) to \(after)") }
            }
            let lengths = try (0..<batch).map { try cache.length(layer: layer, batchItem: $0) }
            let nq = rng.int(1...3)
            let query = try rng.tensor([batch, heads, nq, headDim])
            log("step \(step): layer \(layer) append \(n) to \(item.map(String.init) ?? "all") -> lengths \(lengths), decode \(nq)")
            let shape = AttentionShape(batch: batch, heads: heads, kvHeads: kvHeads, queryLength: nq,
                                       keyLength: max(1, lengths.max()!), headDim: headDim, valueDim: valueDim)
            guard let one = attempt("\(label) step \(step): decode", {
                try decoder.decode(query: query, cache: cache, layer: layer, threads: 1)
            }) else { return }
            checkResult(one, shape: shape, keyLengths: lengths, "\(label) step \(step)")
            let threads = threadCount()
            if let other = try? call({ try decoder.decode(query: query, cache: cache, layer: layer, threads: threads) }),
               !bitwiseEqual(other, one) {
                fail("\(label) step \(step): \(threads) threads differ from 1 thread")
            }
            for b in 0..<batch where lengths[b] > 0 {
                let qb = try Tensor(shape: [1, heads, nq, headDim], storage: query.storage, strides: query.strides,
                                    offset: query.offset + b * query.strides[0])
                let left = decoder.leftWindow ?? Int.max / 4
                let right = min(decoder.rightWindow ?? Int.max / 4, decoder.causal ? 0 : Int.max / 4)
                let reference = naiveAttention(
                    query: qb, key: try cache.keys(layer: layer, batchItem: b), value: try cache.values(layer: layer, batchItem: b),
                    keyLengths: nil, scale: 1 / Double(headDim).squareRoot()) { _, i, j, nq, nk in
                        j >= i + nk - nq - left && j <= i + nk - nq + right
                    }
                let row = heads * nq
                let mine = try AttentionResult(
                    output: try Tensor(shape: [1, heads, nq, valueDim],
                                       data: Array(one.output.elements[(b * row * valueDim)..<((b + 1) * row * valueDim)])),
                    logSumExp: try Tensor(shape: [1, heads, nq, 1], data: Array(one.logSumExp.elements[(b * row)..<((b + 1) * row)])))
                if let difference = compare(mine, reference) {
                    fail("\(label) step \(step) batch item \(b): differs from the naive reference: \(difference)")
                }
            }
        }
    }
}
