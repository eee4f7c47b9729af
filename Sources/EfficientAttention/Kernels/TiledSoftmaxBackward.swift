import Foundation
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The flash-style backward pass of ``TiledSoftmaxAttention``: `dQ`, `dK`, `dV` from the
/// forward's inputs, its output `O`, its log-sum-exp and the output gradient `dO`, with the
/// probabilities recomputed tile by tile from the log-sum-exp (no `Nq × Nk` buffer).
///
/// For a query `i` and a visible key `j` (`s_ij = scale · q_i · k_j`):
///
///     P_ij  = exp(s_ij − lse_i)                    (0 for rows with lse = −∞ and hidden pairs)
///     D_i   = Σ_c dO_ic · O_ic                     (= Σ_j P_ij dP_ij)
///     dP_ij = dO_i · v_j
///     dS_ij = scale · P_ij · (dP_ij − D_i)
///     dV_j  = Σ_i P_ij dO_i,   dK_j = Σ_i dS_ij q_i,   dQ_i = Σ_j dS_ij k_j
///
/// One pass over key blocks (FlashAttention-2's backward loop order), with `dQ` summed in a
/// fixed order instead of by atomics:
///
///     item = (b, key/value head hk, block t of 2·Bc keys), items block-major (block 0 first)
///         acc_K ← 0, acc_V ← 0
///         for each query head h of hk's group, in order:
///             for each query tile r that may see the block (the mask's transposed listing), in order:
///                 Qᵀ ← scale · Q[r]ᵀ, dOᵀ ← dO[r]ᵀ, shift ← lse (−∞ → +∞), D ← rowsum(dO ∘ O)
///                     (kept from an earlier block when one of the worker's last four tiles)
///                 Sᵀ ← K Qᵀ, dPᵀ ← V dOᵀ             micro-kernel, key and value rows read in place
///                 mask the partial tile's scores
///                 Pᵀ ← exp(Sᵀ − shift), dSᵀ ← scale · Pᵀ ∘ (dPᵀ − D)   lane-wise (queries in lanes)
///                 acc_V += Pᵀ dO, acc_K += dSᵀ Q   micro-kernel, depth = the tile's queries
///                 C ← dS K                          micro-kernel, depth = the block's keys
///                 wait until the blocks before t of (b, hk) are done with (h, r); dQ[r] += C
///         dK ← acc_K, dV ← acc_V
///
/// On a partial tile each micro-kernel block of 8 keys (or 8 queries for `C`) runs over only
/// the queries (keys) the mask says may see it, as the forward's `P V` does; the terms it
/// skips are exact zeros.
///
/// Determinism: `dK` and `dV` rows belong to one item and are summed over `(h, r)` in
/// order; each `dQ` row gets its blocks' contributions in block order, enforced by
/// ``BlockOrder`` (a lock and a condition variable: waiting, never racing). Items are handed
/// out in order, so a waiting item only waits for items handed out before it, and the
/// oldest unfinished item never waits: no deadlock. So results are bitwise identical for
/// every thread count. Blocks of one head seldom wait for each other: consecutive blocks of
/// a head are `B·Hkv` items apart, and a later block walks the query tiles behind the
/// earlier one.
///
/// Scores stay transposed as in the forward (keys as rows, queries in SIMD lanes), so the
/// masks' ``TileMask/maskScores(_:ld:tile:queries:)`` applies unchanged and the row
/// statistics (`lse`, `D`) are lane vectors.
///
/// Masks with hooks (Transformer-XL's score terms, adaptive span's weights) are recomputed
/// in the forward's order: `Sᵀ = K Qᵀ`, ``TileMask/addScoreTerms(_:)``, masking,
/// `Pᵀ = exp(Sᵀ − lse)`, then (weighting masks) ``TransposedTileMask/weightProbabilitiesBackward(_:)``
/// (the weights times `Pᵀ`, and the weights' own gradients), then `dSᵀ`. A mask with
/// parameters in its score terms takes each tile's `dSᵀ` (``TransposedTileMask/takeScoreGradients(_:)``,
/// before the ordered `dQ` add, may add to the tile's `dQ` part) and adds what it keeps
/// per key block while the block holds the `dQ` turn of that tile
/// (``TransposedTileMask/publishScoreGradients(_:)``): sums over the blocks in block order,
/// the same for every thread count. Masks without hooks compile to the code without them
/// (static flags, no-op defaults).
///
/// FLOPs per visible pair: `6·D + 4·Dv` (`Sᵀ`, `dPᵀ`, `dV`, `dK`, `dQ`), exactly 2.5 times
/// the forward's `2·(D + Dv)` when `Dv = D`.
///
/// A worker keeps its last four prepared query tiles (`Qᵀ`, `dOᵀ`, shifts, `D`): with head-major
/// work units a head's blocks run in order on one worker, and a band's block shares about
/// half its query tiles with the block before it (N = 2048, H = 8, 2 threads, backward min
/// ms over alternated runs: local 16.1 against 17.2, strided 13.1 against 13.4–14.2; N = 4096
/// strided 31.3 against 32.2; dense, BigBird, axial unchanged; KernelDocs/Strided.md).
///
/// Tiles: `Br = 64` queries (lanes), blocks of `2·Bc = 128` keys. Workspace per worker
/// (floats; `Br′` = the query tile rounded up to 32, `R` = the block rounded up to 8, `D′`,
/// `Dv′` rounded up to 32): `4·(D + Dv + 2)·Br′ + Br′·(D′ + Dv′) + 2·R·Br′ + R·(D′ + Dv′)
/// + Br′·D′ + R·D′ + 8·32` plus four 32-byte tags (each buffer rounded up to 64 bytes), independent of the
/// sequence lengths, plus `R·Br′` each for soft-capping's and a score function's derivatives
/// when the call has them, plus `R·Dv′ + 2·Dv′` (widened value rows, a `dO` and an output
/// row) when an operand is 16-bit; plus the orderings (``BlockOrder``: a lock, a condition variable
/// and two `Int`s per block of `B·Hkv`).
enum TiledSoftmaxBackward {
    /// Query rows per tile: the forward's key tile, not tuned separately.
    static var queryTileSize: Int { Tuning.current.attentionKeyTile }
    /// Keys per work item: two of the forward's key tiles, so that each query tile's
    /// preparation (packing `Qᵀ`, `dOᵀ`, the row dots) serves 128 keys. 64, 192 and 256 were
    /// timed (KernelDocs/Dense.md, "Tiles and workspace"): none better for dense and the
    /// narrow patterns together.
    static var keyBlockSize: Int { 2 * Tuning.current.attentionKeyTile }

    /// Lanes of a query tile (a multiple of ``MicroTile/nr``) and rows of a key block (a
    /// multiple of ``MicroTile/mr``) for `shape`.
    static func tileExtents(_ shape: AttentionShape) -> (lanes: Int, keyRows: Int) {
        (roundUp(min(queryTileSize, shape.queryLength), MicroTile.nr),
         roundUp(min(keyBlockSize, shape.keyLength), MicroTile.mr))
    }

    /// Work items: one per (batch item, key/value head, key block).
    static func itemCount(_ shape: AttentionShape, keyBlocks: KeyBlocks = .contiguous) -> Int {
        shape.batch * shape.kvHeads * keyBlocks.classes.count * keyBlocks.blocksPerClass(keyLength: shape.keyLength,
                                                                                         blockSize: keyBlockSize)
    }

    /// Bytes of workspace ``run(shape:scale:threads:keyBlocks:accumulate:q:k:v:o:lse:dO:dQ:dK:dV:mask:)``
    /// allocates with `threads` workers (`nil`: every active processor) and key blocks
    /// `keyBlocks`: the workers' arena and the orderings.
    static func workspaceBytes(shape: AttentionShape, threads: Int?, keyBlocks: KeyBlocks = .contiguous,
                               softCap: Bool = false) -> Int {
        workspaceBytes(shape: shape, threads: threads, keyBlocks: keyBlocks, mask: IntervalMask.self, softCap: softCap)
    }

    /// ``workspaceBytes(shape:threads:keyBlocks:softCap:)`` with the scratch of `mask`'s hooks.
    /// `softCap`: the call soft-caps its scores (one more `keyRows × lanes` tile per worker,
    /// the cap's derivatives).
    static func workspaceBytes<Mask: TransposedTileMask>(shape: AttentionShape, threads: Int?,
                                                         keyBlocks: KeyBlocks = .contiguous,
                                                         mask: Mask.Type, softCap: Bool = false) -> Int {
        let (lanes, keyRows) = tileExtents(shape)
        let perWorker = Workspace.byteCount(d: shape.headDim, dv: shape.valueDim, lanes: lanes, keyRows: keyRows,
                                            mask: mask, softCap: softCap, widening: false)
        let items = itemCount(shape, keyBlocks: keyBlocks)
        // The two orderings (dQ's, and a broadcast bias's), each at most `items` blocks.
        return perWorker * workerCount(threads: threads, items: items) + 2 * BlockOrder.byteCount(heads: items, blocks: 1)
    }

    /// Bytes a call with 16-bit operands takes beyond ``workspaceBytes(shape:threads:keyBlocks:softCap:)``
    /// with at most `threads` workers: each worker's widened output and `dO` row.
    static func wideningBytes(shape: AttentionShape, threads: Int) -> Int {
        let (lanes, keyRows) = tileExtents(shape)
        func perWorker(_ widening: Bool) -> Int {
            Workspace.byteCount(d: shape.headDim, dv: shape.valueDim, lanes: lanes, keyRows: keyRows,
                                mask: IntervalMask.self, widening: widening)
        }
        return threads * (perWorker(true) - perWorker(false))
    }

    /// How one pass splits each key/value head's keys into the blocks of its work items:
    /// the residue classes `classes` of the keys modulo `modulus`, each cut into blocks of
    /// at most ``keyBlockSize`` keys `modulus` apart (the default: contiguous blocks).
    /// Patterns whose keys are seen along residue classes (strided columns, summary
    /// columns) list their query tiles per class, so no tile scores keys of other classes.
    struct KeyBlocks {
        var modulus = 1
        var classes: Range<Int> = 0..<1
        /// Whether the blocks of different classes reach disjoint queries: then each class
        /// orders its own `dQ` sums (its blocks never wait for another class's). Otherwise
        /// the blocks of one head are ordered class by class.
        var disjointClasses = false

        static let contiguous = KeyBlocks()

        /// Blocks per class (the longest class's; shorter classes' last blocks are empty).
        func blocksPerClass(keyLength: Int, blockSize: Int) -> Int {
            ceilDiv(ceilDiv(keyLength, modulus), blockSize)
        }

        /// Block `t` of class `c` (empty past the class's keys).
        func block(class c: Int, index t: Int, keyLength: Int, blockSize: Int) -> PositionRun {
            let start = c + t * blockSize * modulus
            return PositionRun(start: start, count: max(0, min(blockSize, ceilDiv(keyLength - start, modulus))),
                               step: modulus)
        }
    }

    /// Computes `dQ`, `dK`, `dV` for every row of `shape` (see the type's description).
    ///
    /// `mask(b, h)` is the forward's visibility of batch item `b`, query head `h`; query head
    /// `h` reads key/value head `h / (H / Hkv)`. Every row of `dK` and `dV` in the blocks of
    /// `keyBlocks` is written (0 for keys no query sees), or with `accumulate` added to. `dQ`
    /// must hold zeros on entry: the blocks add their contributions to it (rows with no
    /// visible key, or `lse = −∞`, stay 0).
    ///
    /// Several passes (a pattern the forward runs as several merged passes): each pass
    /// takes the final `O` and log-sum-exp, so its probabilities are the final ones and
    /// its pairs' terms are exactly the terms of the whole backward; the passes' pairs
    /// must be disjoint. The first pass writes every key row (contiguous blocks, or
    /// every class), the later ones `accumulate`; passes run one after another, so the
    /// sums are in a fixed order.
    ///
    /// 16-bit operands (`q`, `k`, `v`, `o`, `dO` of ``ActivationPrecision/float16`` or
    /// ``ActivationPrecision/bfloat16``) are widened as they are packed: query and `dO` rows
    /// per query tile, key and value rows once per work item, an output row for its row
    /// dot; the arithmetic is that of `Float` operands of the same values, so the results
    /// are the same bits. 16-bit `dK`, `dV` rows are rounded once as written (not with
    /// `accumulate`, which reads them back); `dQ` is `Float` (it is summed over the blocks).
    ///
    /// `modifiers`: the forward's score modifiers (KernelDocs/ScoreModifiers.md, "Backward"),
    /// applied to each recomputed tile exactly as the forward applies them (after the mask's
    /// score terms, before its masking); soft-capping multiplies `dS` by the cap's
    /// derivative. `biasGradient`: where to add `∂L/∂bias = P ∘ (dP − D)` of every visible
    /// pair (`[B, H, Nq, Nk]` indexing, stride 0 on the dimensions the bias broadcasts over;
    /// zero-filled by the caller before the first pass). Elements several work items share
    /// (a broadcast bias) get their terms in the order (batch item, query head): each item
    /// adds a query tile once every item before it in that order has added all of its
    /// terms of that tile (a second ``BlockOrder``), so the sums are the same for every
    /// thread count.
    static func run<Mask: TransposedTileMask>(
        shape: AttentionShape, scale: Float, threads: Int, keyBlocks: KeyBlocks = .contiguous,
        accumulate: Bool = false,
        q: TensorView, k: TensorView, v: TensorView, o: TensorView, lse: TensorView, dO: TensorView,
        dQ: MutableTensorView, dK: MutableTensorView, dV: MutableTensorView,
        modifiers: ScoreModifierKernel? = nil, biasGradient: MutableTensorView? = nil,
        mask: (_ batch: Int, _ head: Int) -> Mask
    ) {
        let d = shape.headDim, dv = shape.valueDim
        let blockSize = keyBlockSize
        let operands = Operands(q: q, k: k, v: v, o: o, lse: lse, dO: dO, d: d, dv: dv, scale: scale,
                                modifiers: modifiers, biasGradient: biasGradient)
        let perClass = keyBlocks.blocksPerClass(keyLength: shape.keyLength, blockSize: blockSize)
        let classes = keyBlocks.classes.count
        let (lanes, keyRows) = tileExtents(shape)
        let kvHeads = shape.batch * shape.kvHeads
        // The ordering's heads and blocks: per class when the classes' queries are disjoint,
        // else every block of a key/value head in one sequence, class by class.
        let orderHeads = keyBlocks.disjointClasses ? kvHeads * classes : kvHeads
        let orderBlocks = keyBlocks.disjointClasses ? perClass : classes * perClass
        let items = orderHeads * orderBlocks
        // A broadcast bias's gradient: the items of one key block (a slot) add in the order
        // of their (batch item, key/value head); a bias broadcast over heads within one
        // group is summed inside the item.
        let biasOrdered = biasGradient.map {
            ($0.strides[0] == 0 && shape.batch > 1) || ($0.strides[1] == 0 && shape.kvHeads > 1)
        } ?? false
        let softCap = (modifiers?.softCap ?? 0) > 0
        precondition(dQ.precision == .float32 && (!accumulate || (dK.precision == .float32 && dV.precision == .float32)),
                     "dQ, and gradients a pass adds to, are Float")
        let widening = operands.widening
        BlockOrder.with(heads: orderHeads, blocks: orderBlocks) { order in
        BlockOrder.with(heads: biasOrdered ? items / kvHeads : 0, blocks: biasOrdered ? kvHeads : 0) { biasOrdering in
        let biasOrder = biasOrdered ? biasOrdering : nil
        WorkspaceArena.withWorkspaces(workers: workerCount(threads: threads, items: items), zeroed: true, layout: {
            Workspace(carving: &$0, d: d, dv: dv, lanes: lanes, keyRows: keyRows, mask: Mask.self, softCap: softCap,
                      widening: widening)
        }) { spaces in
            // The first rows an ordering head's block 0 reads (its key and value rows, the
            // query, dO and output rows of its first query tile), requested into L2 while the
            // block before it computes.
            func firstRows(of orderHead: Int) -> UpcomingRows {
                var upcoming = UpcomingRows()
                let (head, c) = keyBlocks.disjointClasses ? (orderHead / classes, orderHead % classes) : (orderHead, 0)
                let block = keyBlocks.block(class: keyBlocks.classes.lowerBound + c, index: 0,
                                            keyLength: shape.keyLength, blockSize: blockSize)
                guard block.count > 0 else { return upcoming }
                let b = head / shape.kvHeads, hk = head % shape.kvHeads, h = hk * shape.groupSize
                upcoming.add(k, b, hk, rows: block, width: d)
                upcoming.add(v, b, hk, rows: block, width: dv)
                var first = true
                mask(b, h).forEachQueryTile(seeing: block, queryLength: shape.queryLength, queryTile: queryTileSize) { _, queries, _ in
                    guard first else { return }
                    first = false
                    upcoming.add(q, b, h, rows: queries, width: d)
                    upcoming.add(dO, b, h, rows: queries, width: dv)
                    upcoming.add(o, b, h, rows: queries, width: dv)
                }
                return upcoming
            }
            // Work item: block `t` of ordering head `orderHead` (`upcoming`: rows to request as it runs).
            func runItem(orderHead: Int, t: Int, worker: Int, upcoming: UpcomingRows = UpcomingRows()) {
                let head: Int, c: Int, blockIndex: Int
                if keyBlocks.disjointClasses {
                    (head, c, blockIndex) = (orderHead / classes, orderHead % classes, t)
                } else {
                    (head, c, blockIndex) = (orderHead, t / perClass, t % perClass)
                }
                let block = keyBlocks.block(class: keyBlocks.classes.lowerBound + c, index: blockIndex,
                                            keyLength: shape.keyLength, blockSize: blockSize)
                // The item's key block among those of every (b, hk): its slot in the bias order.
                let slot = keyBlocks.disjointClasses ? t * classes + c : t
                if block.count > 0 {
                    blockItem(shape: shape, space: spaces[worker], operands: operands, head: head,
                              orderHead: orderHead, blockIndex: t, block: block, order: order,
                              biasOrder: biasOrder.map { ($0, slot) },
                              accumulate: accumulate, dQ: dQ, dK: dK, dV: dV, upcoming: upcoming, mask: mask)
                }
                order.finish(head: orderHead, block: t)
                biasOrder?.finish(head: slot, block: head)
            }
            if orderHeads >= 4 * spaces.count {
                // Head-major, each ordering head's blocks in order on one worker: the head's
                // query, output and gradient rows stay in cache from block to block, and no
                // block waits for another worker's `dQ` additions. Runs of up to 8
                // consecutive ordering heads per work unit (``parallelForEachRun``): the last
                // block of one requests the first rows of the next, which small problems (a
                // residue class, a short sequence) touch only once, so that their misses do
                // not stall its start.
                parallelForEachRun(items: orderHeads, threads: spaces.count) { orderHead, next, worker in
                    for t in 0..<orderBlocks {
                        let last = t == orderBlocks - 1
                        runItem(orderHead: orderHead, t: t, worker: worker,
                                upcoming: last ? next.map(firstRows(of:)) ?? UpcomingRows() : UpcomingRows())
                    }
                }
            } else {
                // Block-major: every head's block 0 (the heaviest under causal masks) first.
                parallelForEach(items: items, threads: spaces.count) { item, worker in
                    runItem(orderHead: item % orderHeads, t: item / orderHeads, worker: worker)
                }
            }
        }
        }
        }
    }

    /// The read-only tensors of one call.
    struct Operands {
        let q, k, v, o, lse, dO: TensorView
        let d, dv: Int
        let scale: Float
        var modifiers: ScoreModifierKernel? = nil
        var biasGradient: MutableTensorView? = nil

        /// Whether an operand is 16-bit (read through widened rows).
        var widening: Bool {
            q.precision != .float32 || k.precision != .float32 || v.precision != .float32
                || o.precision != .float32 || dO.precision != .float32
        }
    }

    /// Rows of a key block as the `A` operand of `Sᵀ = K Qᵀ` (or `dPᵀ = V dOᵀ`): row `r` of
    /// the block (key `block.position(r)`) at `base + r · rowStride`, elements `depthStride`
    /// apart.
    struct BlockRows {
        let base: UnsafePointer<Float>
        let rowStride, depthStride: Int

        /// The block's rows of `view` (head `(b, hk)`): in place when ``TensorView/readsInPlace(_:)``
        /// (Float rows of a contiguous block), else packed (widened) into `packed` (`ld`
        /// floats apart) by the caller.
        init(_ view: TensorView, b: Int, hk: Int, block: PositionRun, packed: UnsafeMutablePointer<Float>, ld: Int) {
            if view.readsInPlace(block) {
                (base, rowStride, depthStride) = (view.row(b, hk, block.start), view.strides[2], view.strides[3])
            } else {
                (base, rowStride, depthStride) = (UnsafePointer(packed), ld, 1)
            }
        }

        /// The broadcast operand of rows `first..<first + rows` of the block.
        @inline(__always)
        func operand(first: Int, rows: Int) -> BroadcastOperand {
            BroadcastOperand(base: base + first &* rowStride, rowStride: rowStride, depthStride: depthStride, rows: rows)
        }
    }

    /// One work item: `dK`, `dV` of the keys `block` of key/value head `head`
    /// (`b · Hkv + hk`), and their contributions to `dQ` (block `t` of `orderHead` in the
    /// ordering).
    static func blockItem<Mask: TransposedTileMask>(
        shape: AttentionShape, space workerSpace: Workspace, operands x: Operands, head: Int, orderHead: Int, blockIndex t: Int,
        block: PositionRun, order: BlockOrder, biasOrder: (order: BlockOrder, slot: Int)? = nil, accumulate: Bool,
        dQ: MutableTensorView, dK: MutableTensorView, dV: MutableTensorView, upcoming: UpcomingRows = UpcomingRows(),
        mask: (Int, Int) -> Mask
    ) {
        var upcoming = upcoming
        let b = head / shape.kvHeads, hk = head % shape.kvHeads
        let d = x.d, dv = x.dv, dPad = workerSpace.dPad, dvPad = workerSpace.dvPad
        let br = queryTileSize
        let group = (hk * shape.groupSize)..<((hk + 1) * shape.groupSize)
        // Positions in the ordering: query head of the group, then the mask's query tile index.
        var queryTiles = 0
        for h in group {
            queryTiles = max(queryTiles, mask(b, h).backwardQueryTileCount(queryLength: shape.queryLength, queryTile: br))
        }
        // The block's rows only (a strided column block holds a third of `keyRows`).
        workerSpace.accK.update(repeating: 0, count: block.count * dPad)
        workerSpace.accV.update(repeating: 0, count: block.count * dvPad)
        // The block's key rows as the `B` operand of C = dS K: in place when they are whole
        // micro-tile rows of a Float view and a contiguous block, else packed (widened) once
        // for the item; 16-bit or strided value rows packed once for the item too.
        let keyRowsInPlace = x.k.readsInPlace(block, width: d, padded: dPad)
        if !keyRowsInPlace {
            TiledSoftmaxAttention.packValues(x.k, b: b, h: hk, keys: block, dv: d, into: workerSpace.keyRowsPacked,
                                             ld: dPad)
        }
        if !x.v.readsInPlace(block) {
            TiledSoftmaxAttention.packValues(x.v, b: b, h: hk, keys: block, dv: dv, into: workerSpace.valueRowsPacked,
                                             ld: dvPad)
        }
        let blockRows = (keys: BlockRows(x.k, b: b, hk: hk, block: block, packed: workerSpace.keyRowsPacked, ld: dPad),
                         values: BlockRows(x.v, b: b, hk: hk, block: block, packed: workerSpace.valueRowsPacked,
                                           ld: dvPad))
        let qs = dQ.strides[3]
        for (local, h) in group.enumerated() {
            let headMask = mask(b, h)
            headMask.forEachQueryTile(seeing: block, queryLength: shape.queryLength, queryTile: br) { r, queries, tile in
                precondition(tile.keys.step == block.step && r < queryTiles, "a transposed mask's tile must fit its block")
                let lanes = roundUp(queries.count, MicroTile.nr)
                let space = withQueries(workerSpace, x, b: b, h: h, heads: shape.heads, queries: queries, lanes: lanes)
                gradientTile(space, x, rows: blockRows, firstRow: (tile.keys.start - block.start) / block.step,
                             b: b, h: h, tile: tile, queries: queries, lanes: lanes, block: t, mask: headMask,
                             upcoming: &upcoming)
                if let biasGradient = x.biasGradient {
                    // ∂bias = P ∘ (dP − D), then dS = scale · (cap′ ·) ∂bias. A shared element's
                    // terms wait until every earlier (b, hk) has added all of this query tile's.
                    if let biasOrder {
                        biasOrder.order.waitForTurn(head: biasOrder.slot, block: head,
                                                    position: (shape.groupSize - 1) * queryTiles + r)
                    }
                    addBiasGradient(space, biasGradient, b: b, h: h, keys: tile.keys, queries: queries,
                                    modifiers: x.modifiers)
                    if let biasOrder {
                        biasOrder.order.publish(head: biasOrder.slot, block: head, donePast: local * queryTiles + r)
                    }
                    finishScoreGradients(space, keyCount: tile.keys.count, lanes: lanes, scale: x.scale)
                }
                // B operands: the tile's dO and Q rows, in place when they are whole micro-tile
                // rows of a contiguous tile, else packed (strided rows as the key block's).
                let gradientRows: UnsafePointer<Float>, ldg: Int
                if x.dO.readsInPlace(queries, width: dv, padded: dvPad) {
                    gradientRows = x.dO.row(b, h, queries.start)
                    ldg = x.dO.strides[2]
                } else {
                    TiledSoftmaxAttention.packValues(x.dO, b: b, h: h, keys: queries, dv: dv, into: space.gradientRows, ld: dvPad)
                    gradientRows = UnsafePointer(space.gradientRows)
                    ldg = dvPad
                }
                let queryRows: UnsafePointer<Float>, ldq: Int
                if x.q.readsInPlace(queries, width: d, padded: dPad) {
                    queryRows = x.q.row(b, h, queries.start)
                    ldq = x.q.strides[2]
                } else {
                    TiledSoftmaxAttention.packValues(x.q, b: b, h: h, keys: queries, dv: d, into: space.queryRows, ld: dPad)
                    queryRows = UnsafePointer(space.queryRows)
                    ldq = dPad
                }
                // acc_V += Pᵀ dO, acc_K += dSᵀ Q: key rows of the tile, depth = its queries.
                let row = (tile.keys.start - block.start) / block.step
                // On a partial tile each block of MR keys runs over only the queries that may see
                // it (the others have P = dS = 0).
                let visibleQueries = { (keys: Range<Int>) -> Range<Int> in
                    tile.fullyVisible ? 0..<queries.count
                        : headMask.visibleQueryIndices(tile: tile, queries: queries, keys: keys)
                }
                accumulateProduct(rows: tile.keys.count, width: dvPad, span: visibleQueries,
                                  a: UnsafePointer(space.probabilities), rowStride: space.lanes, depthStride: 1,
                                  b: gradientRows, ldb: ldg, c: space.accV + row * dvPad, ldc: dvPad, edge: space.edge)
                accumulateProduct(rows: tile.keys.count, width: dPad, span: visibleQueries,
                                  a: UnsafePointer(space.scoreGradients), rowStride: space.lanes, depthStride: 1,
                                  b: queryRows, ldb: ldq, c: space.accK + row * dPad, ldc: dPad, edge: space.edge)
                // C = dS K: query rows (dSᵀ read across its columns), depth = the tile's keys.
                // Rows past the tile's queries are padding rows of C, never added to dQ.
                let keyRows: UnsafePointer<Float>, ldk: Int
                if keyRowsInPlace {
                    keyRows = x.k.row(b, hk, tile.keys.start)
                    ldk = x.k.strides[2]
                } else {
                    keyRows = UnsafePointer(space.keyRowsPacked + row * dPad)
                    ldk = dPad
                }
                // On a partial tile each block of MR queries runs over only the keys it may see.
                accumulateProduct(rows: roundUp(queries.count, MicroTile.mr), width: dPad,
                                  span: { lanes in
                                      tile.fullyVisible ? 0..<tile.keys.count
                                          : headMask.visibleKeyIndices(tile: tile, queries: queries, lanes: lanes)
                                  },
                                  a: UnsafePointer(space.scoreGradients), rowStride: 1, depthStride: space.lanes,
                                  b: keyRows, ldb: ldk, c: space.accQ, ldc: dPad, edge: space.edge,
                                  overwrite: true)
                // The mask's score-gradient hooks (compiled away for masks without them).
                func hookTile() -> ScoreGradientTile {
                    ScoreGradientTile(scoreGradients: UnsafePointer(space.scoreGradients), ld: space.lanes,
                                      lanes: lanes, queryRows: queryRows, ldq: ldq, headDim: d, dPad: dPad,
                                      queryGradients: space.accQ, edge: space.edge, scratch: space.gradientScratch,
                                      keyRows: space.keyRows, keyStart: tile.keys.start, keyCount: tile.keys.count,
                                      queryStart: queries.start, queryCount: queries.count, block: t)
                }
                if Mask.takesScoreGradients {
                    assert(tile.keys.step == 1 && queries.step == 1, "score-gradient hooks take runs of step 1")
                    headMask.takeScoreGradients(hookTile())
                }
                // dQ[r] += C once every earlier block of this head has added its part.
                let position = local * queryTiles + r
                order.waitForTurn(head: orderHead, block: t, position: position)
                if Mask.takesScoreGradients { headMask.publishScoreGradients(hookTile()) }
                for ii in 0..<queries.count {
                    let out = dQ.row(b, h, queries.position(ii)), contribution = space.accQ + ii * dPad
                    if qs == 1 {
                        for c in 0..<d { out[c] += contribution[c] }
                    } else {
                        for c in 0..<d { out[c &* qs] += contribution[c] }
                    }
                }
                order.publish(head: orderHead, block: t, donePast: position)
            }
        }
        upcoming.prefetch(rows: upcoming.remainingRows)
        let ks = dK.strides[3], vs = dV.strides[3]
        for r in 0..<block.count {
            let keyAcc = workerSpace.accK + r * dPad, valueAcc = workerSpace.accV + r * dvPad
            if dK.precision != .float32 || dV.precision != .float32 {
                // 16-bit gradients (never accumulated): each row rounded once.
                dK.storeRow(b, hk, block.position(r), from: keyAcc, count: d)
                dV.storeRow(b, hk, block.position(r), from: valueAcc, count: dv)
                continue
            }
            let keyOut = dK.row(b, hk, block.position(r)), valueOut = dV.row(b, hk, block.position(r))
            if accumulate {
                for c in 0..<d { keyOut[c &* ks] += keyAcc[c] }
                for c in 0..<dv { valueOut[c &* vs] += valueAcc[c] }
            } else {
                for c in 0..<d { keyOut[c &* ks] = keyAcc[c] }
                for c in 0..<dv { valueOut[c &* vs] = valueAcc[c] }
            }
        }
    }

    /// What a prepared query slot holds: the query run `queries` of (batch item, query
    /// head) `head − 1` (`head = 0`: an empty slot).
    struct PreparedQueries: Equatable {
        var head: Int
        var queries: PositionRun
    }

    /// `space` with its current query tile the slot holding `queries` of (`b`, `h`), prepared
    /// there by ``prepareQueries(_:_:b:h:queries:lanes:)`` when no slot holds it yet (the
    /// same values either way).
    @inline(__always)
    static func withQueries(_ space: Workspace, _ x: Operands, b: Int, h: Int, heads: Int,
                            queries: PositionRun, lanes: Int) -> Workspace {
        let tag = PreparedQueries(head: b &* heads &+ h &+ 1, queries: queries)
        for slot in 0..<Workspace.preparedSlots where space.preparedTags[slot] == tag {
            return space.selecting(slot: slot)
        }
        let slot = space.nextSlot.pointee
        space.nextSlot.pointee = (slot + 1) % Workspace.preparedSlots
        let selected = space.selecting(slot: slot)
        prepareQueries(selected, x, b: b, h: h, queries: queries, lanes: lanes)
        space.preparedTags[slot] = tag
        return selected
    }

    /// Packs the query tile's `scale · Qᵀ` and `dOᵀ` (queries in lanes, zero lanes past the
    /// tile), and per lane the probability shift (`lse`, with `−∞` turned into `+∞` so that
    /// every probability of an empty row is `exp(−∞) = 0`; `+∞` on padding lanes) and
    /// `D = Σ_c dO_c · O_c` (0 on padding lanes). 16-bit query and `dO` rows are widened
    /// through the packed-row buffers (rewritten before their next use), 16-bit `dO` and
    /// output rows for the dot through the row stage.
    @inline(__always)
    static func prepareQueries(_ space: Workspace, _ x: Operands, b: Int, h: Int, queries: PositionRun, lanes: Int) {
        let ld = space.lanes
        // The output rows are read only by the row dots below: requested now, they arrive
        // while the query and dO rows are packed.
        x.o.prefetch(b, h, rows: queries, width: x.dv)
        TiledSoftmaxAttention.packQueries(x.q, b: b, h: h, queries: queries, d: x.d, scale: x.scale,
                                          into: space.qT, ld: ld, lanes: lanes, stage: space.queryRows)
        TiledSoftmaxAttention.packQueries(x.dO, b: b, h: h, queries: queries, d: x.dv, scale: 1,
                                          into: space.gradientT, ld: ld, lanes: lanes, stage: space.gradientRows)
        for ii in 0..<queries.count {
            let i = queries.position(ii)
            let l = x.lse.row(b, h, i)[0]
            space.shift[ii] = l == -.infinity ? .infinity : l
            let g = floatRow(x.dO, b, h, i, width: x.dv, stage: space.rowStage)
            let o = floatRow(x.o, b, h, i, width: x.dv, stage: space.rowStage + space.dvPad)
            space.rowDot[ii] = dot(g.row, g.stride, o.row, o.stride, count: x.dv)
        }
        for ii in queries.count..<lanes {
            space.shift[ii] = .infinity
            space.rowDot[ii] = 0
        }
    }

    /// Row `[b, h, i]` of `view` as `Float`s `stride` apart: in place, or widened into `stage`.
    @inline(__always)
    static func floatRow(_ view: TensorView, _ b: Int, _ h: Int, _ i: Int, width: Int,
                         stage: UnsafeMutablePointer<Float>) -> (row: UnsafePointer<Float>, stride: Int) {
        guard view.precision != .float32 else { return (view.row(b, h, i), view.strides[3]) }
        view.widenRows(b, h, rows: PositionRun(start: i, count: 1), width: width, into: stage, ld: width)
        return (UnsafePointer(stage), 1)
    }

    /// One (query tile, key tile) pair: `Pᵀ` into `probabilities` and `dSᵀ` into
    /// `scoreGradients` (`[jj · lanes + ii]`: key `tile.keys.position(jj)`, query lane `ii`).
    /// `rows`: the item's key and value rows; the tile's keys are rows `firstRow...` of them.
    @inline(__always)
    static func gradientTile<Mask: TransposedTileMask>(_ space: Workspace, _ x: Operands,
                                                       rows blockRows: (keys: BlockRows, values: BlockRows),
                                                       firstRow: Int, b: Int, h: Int,
                                                       tile: KeyTile, queries: PositionRun, lanes: Int, block t: Int,
                                                       mask: Mask, upcoming: inout UpcomingRows) {
        let keys = tile.keys, ld = space.lanes, mr = MicroTile.mr
        let keyBlocks = ceilDiv(keys.count, mr)
        let upcomingPerBlock = ceilDiv(upcoming.remainingRows, keyBlocks)
        // The next query tile's bias (the same keys), a few query rows per block
        // (ScoreModifierKernel.prefetchBias).
        let nextQueries = PositionRun(start: queries.position(queries.count), count: queries.count, step: queries.step)
        for block in 0..<keyBlocks {
            upcoming.prefetch(rows: upcomingPerBlock)
            let rows = min(mr, keys.count - block * mr)
            x.modifiers?.prefetchBias(keys: keys, queries: nextQueries, part: block, of: keyBlocks, b: b, h: h)
            let keyRows = blockRows.keys.operand(first: firstRow + block * mr, rows: rows)
            let valueRows = blockRows.values.operand(first: firstRow + block * mr, rows: rows)
            // Only the lanes of the queries that may see these keys (on a fully visible tile:
            // the tile's queries), in whole panels and a half panel at the end.
            let blockKeys = (block * mr)..<(block * mr + rows)
            let panels = scoredPanels(space, seen: tile.fullyVisible ? 0..<queries.count
                                          : mask.visibleQueryIndices(tile: tile, queries: queries, keys: blockKeys),
                                      lanes: lanes, keys: blockKeys)
            space.scoredLanes[block] = panels
            forEachPanel(panels) { panel, half in
                // Sᵀ = K (scale · Qᵀ), dPᵀ = V dOᵀ.
                microKernel(depth: x.d, a: keyRows, b: space.qT + panel, ldb: ld,
                            c: space.probabilities + block * mr * ld + panel, ldc: ld, update: .overwrite,
                            halfWidth: half)
                microKernel(depth: x.dv, a: valueRows, b: space.gradientT + panel, ldb: ld,
                            c: space.scoreGradients + block * mr * ld + panel, ldc: ld, update: .overwrite,
                            halfWidth: half)
            }
        }
        // The forward's order: score terms, masking, exp, weights.
        if Mask.addsScoreTerms {
            assert(keys.step == 1 && queries.step == 1, "score-term hooks take runs of step 1")
            let scoreTile = ScoreTile(scores: space.probabilities, ld: ld, queries: space.qT, headDim: x.d,
                                      lanes: lanes, keyTile: space.keyRows, scratch: space.terms,
                                      keyStart: keys.start, keyCount: keys.count,
                                      queryStart: queries.start, queryCount: queries.count)
            // A score function: its derivatives at the raw scores as the terms replace them.
            if Mask.differentiatesScoreTerms {
                mask.addScoreTerms(scoreTile, derivatives: space.termDerivatives)
            } else {
                mask.addScoreTerms(scoreTile)
            }
        }
        // The score modifiers, as the forward applies them (the one formula,
        // ScoreModifierKernel.modified), the cap's derivative taken from the scores first.
        if let modifiers = x.modifiers {
            if modifiers.softCap > 0 {
                softCapDerivatives(space, modifiers, keyCount: keys.count, lanes: lanes)
            }
            modifiers.apply(space.probabilities, ld: ld, keys: keys, queries: queries, lanes: lanes, b: b, h: h)
        }
        if !tile.fullyVisible {
            mask.maskScores(space.probabilities, ld: ld, tile: tile, queries: queries)
        }
        // With modifiers (or a score function's derivative), dSᵀ is first left unscaled
        // (∂s′ = ∂bias), then finished: here, or by the caller once it has added ∂bias (the
        // same arithmetic either way).
        let finishedLater = x.modifiers != nil || Mask.differentiatesScoreTerms
        let gradientScale: Float = finishedLater ? 1 : x.scale
        if Mask.weightsProbabilities {
            assert(keys.step == 1 && queries.step == 1, "weighting hooks take runs of step 1")
            exponentiate(space, keyCount: keys.count, lanes: lanes)
            mask.weightProbabilitiesBackward(WeightGradientTile(
                probabilities: space.probabilities, probabilityGradients: UnsafePointer(space.scoreGradients),
                rowDot: UnsafePointer(space.rowDot), ld: ld, keyStart: keys.start, keyCount: keys.count,
                queryStart: queries.start, queryCount: queries.count, block: t))
            weightedScoreGradient(space, keyCount: keys.count, lanes: lanes, scale: gradientScale)
        } else {
            softmaxGradient(space, keyCount: keys.count, lanes: lanes, scale: gradientScale)
        }
        if finishedLater && x.biasGradient == nil {
            finishScoreGradients(space, keyCount: keys.count, lanes: lanes, scale: x.scale)
        }
    }

    /// The lanes of the transposed tiles (`lanes` of them) to compute for the keys `keys`
    /// (rows of the tiles): the half panels (``MicroTile/nr`` / 2 lanes each) holding the
    /// queries `seen` that may see them (on a fully visible tile, all its queries). A narrow
    /// band's tile is mostly hidden, and a block of 8 keys skips the half panels none of
    /// whose queries sees it (the forward keeps such bands to 32-query tiles, one panel,
    /// instead); a tile of 44 queries (a strided column tile at `l = 46`) scores 48 lanes,
    /// not 64. The entries outside get `Sᵀ = dPᵀ = 0`: finite, so masking hides them, as it
    /// hides every pair outside `seen` (and a padding lane's shift of `+∞` gives it `P = 0`),
    /// and `P = dS = 0` there, as when computed.
    @inline(__always)
    static func scoredPanels(_ space: Workspace, seen: Range<Int>, lanes: Int, keys: Range<Int>) -> Range<Int> {
        let ld = space.lanes
        let panels = halfPanelLanes(holding: seen, lanes: lanes)
        func clear(_ row: UnsafeMutablePointer<Float>) {
            row.update(repeating: 0, count: panels.lowerBound)
            (row + panels.upperBound).update(repeating: 0, count: lanes - panels.upperBound)
        }
        if panels != 0..<lanes {
            for r in keys {
                clear(space.probabilities + r * ld)
                clear(space.scoreGradients + r * ld)
            }
        }
        return panels
    }

    /// `capDerivatives ← 1 − tanh²(Sᵀ / cap)`, the derivative of the soft-capped score
    /// (``ScoreModifierKernel/softCapDerivative(_:)``) at each raw score of the tile.
    @inline(never)
    static func softCapDerivatives(_ space: Workspace, _ modifiers: ScoreModifierKernel, keyCount: Int, lanes: Int) {
        let ld = space.lanes
        for r in 0..<keyCount {
            let scores = space.probabilities + r * ld, derivatives = space.capDerivatives + r * ld
            for lane in stride(from: 0, to: lanes, by: 16) {
                store16(modifiers.softCapDerivative(load16(scores + lane)), derivatives + lane)
            }
        }
    }

    /// `dSᵀ ← scale · dSᵀ`, times the cap's derivatives when the workspace holds them, then
    /// times the score function's derivatives `f′` when it holds those (``TransposedTileMask/differentiatesScoreTerms``;
    /// `f′` taken as 0 where `Pᵀ ≤ 0`, so that a hidden pair's undefined or infinite `f′`
    /// never meets its zero: no `0 · ∞`; outside a block's scored lanes `Pᵀ` is the masked
    /// score, `−∞`, or the cleared 0: ``softmaxGradient(_:keyCount:lanes:scale:)``).
    @inline(never)
    static func finishScoreGradients(_ space: Workspace, keyCount: Int, lanes: Int, scale: Float) {
        let ld = space.lanes
        let factor = Vec16(repeating: scale)
        if space.scoreTermDerivatives {
            let zero = Vec16(repeating: 0)
            for r in 0..<keyCount {
                let gradients = space.scoreGradients + r * ld, derivatives = space.termDerivatives + r * ld
                let probabilities = space.probabilities + r * ld
                for lane in stride(from: 0, to: lanes, by: 16) {
                    var g = factor * load16(gradients + lane)
                    if space.softCap { g = g * load16(space.capDerivatives + r * ld + lane) }
                    var f = load16(derivatives + lane)
                    f.replace(with: zero, where: load16(probabilities + lane) .<= zero)
                    store16(g * f, gradients + lane)
                }
            }
            return
        }
        for r in 0..<keyCount {
            let gradients = space.scoreGradients + r * ld
            if space.softCap {
                let derivatives = space.capDerivatives + r * ld
                for lane in stride(from: 0, to: lanes, by: 16) {
                    store16(factor * load16(gradients + lane) * load16(derivatives + lane), gradients + lane)
                }
            } else {
                for lane in stride(from: 0, to: lanes, by: 16) {
                    store16(factor * load16(gradients + lane), gradients + lane)
                }
            }
        }
    }

    /// `∂bias[b, h, i, j] += dSᵀ[j, i]` (unscaled: `P ∘ (dP − D)`) for the tile's keys and
    /// queries (padding lanes skipped; hidden pairs add exact zeros). Gathered slots
    /// (``ScoreModifierKernel/slots``) add at their positions, into the gradient of the
    /// modifiers' one head (`gradient` restricted to it).
    static func addBiasGradient(_ space: Workspace, _ gradient: MutableTensorView, b: Int, h: Int,
                                keys: PositionRun, queries: PositionRun, modifiers: ScoreModifierKernel?) {
        let ld = space.lanes, cs = gradient.strides[3]
        /// Adds the tile into item `item`, head `head` of `gradient`, the kernel's positions
        /// mapped to the bias's by `query` and `key`.
        @inline(__always) func add(item: Int, head: Int, query: (Int) -> Int, key: (Int) -> Int) {
            for ii in 0..<queries.count {
                let row = gradient.row(item, head, query(queries.position(ii)))
                for jj in 0..<keys.count {
                    row[key(keys.position(jj)) &* cs] += space.scoreGradients[jj * ld + ii]
                }
            }
        }
        if let slots = modifiers?.slots {
            add(item: 0, head: 0, query: { slots.query(b, $0) }, key: { slots.key(b, $0) })
        } else {
            add(item: b, head: h, query: { $0 }, key: { $0 })
        }
    }

    /// `Pᵀ ← exp(Sᵀ − shift)` alone (weighting masks: the weights come between).
    @inline(never)
    static func exponentiate(_ space: Workspace, keyCount: Int, lanes: Int) {
        let ld = space.lanes
        for lane in stride(from: 0, to: lanes, by: 16) {
            let shift = load16(space.shift + lane)
            var scores = space.probabilities + lane
            for _ in 0..<keyCount {
                store16(VectorMath.exp16(load16(scores) - shift), scores)
                scores += ld
            }
        }
    }

    /// `dSᵀ ← scale · Pᵀ ∘ (dPᵀ − D)` from weighted probabilities.
    @inline(never)
    static func weightedScoreGradient(_ space: Workspace, keyCount: Int, lanes: Int, scale: Float) {
        let ld = space.lanes
        let scale = Vec16(repeating: scale)
        for lane in stride(from: 0, to: lanes, by: 16) {
            let dot = load16(space.rowDot + lane)
            var probabilities = space.probabilities + lane, gradients = space.scoreGradients + lane
            for _ in 0..<keyCount {
                store16(scale * load16(probabilities) * (load16(gradients) - dot), gradients)
                probabilities += ld
                gradients += ld
            }
        }
    }

    /// `Pᵀ ← exp(Sᵀ − shift)` and `dSᵀ ← scale · Pᵀ ∘ (dPᵀ − D)`, lane-wise, for each block of
    /// ``MicroTile/mr`` key rows on the lanes its `Sᵀ` and `dPᵀ` were computed on
    /// (``Workspace/scoredLanes``, from ``scoredPanels(_:seen:lanes:keys:)``). The lanes
    /// outside keep `dSᵀ = 0` (the panels' clearing) and a `Pᵀ` no product reads: each
    /// block's `Pᵀ dO` and `dSᵀ Q` run over its visible queries, inside its panels, and a
    /// block of `MR` queries in `dS K` reads `dSᵀ` only. Not inlined, as the forward's
    /// `onlineSoftmax`: `VectorMath.exp` stays in registers.
    @inline(never)
    static func softmaxGradient(_ space: Workspace, keyCount: Int, lanes: Int, scale: Float) {
        let ld = space.lanes, mr = MicroTile.mr
        let scale = Vec16(repeating: scale)
        for first in stride(from: 0, to: keyCount, by: mr) {
            let rows = min(mr, keyCount - first), scored = space.scoredLanes[first / mr]
            for lane in stride(from: scored.lowerBound, to: scored.upperBound, by: 16) {
                let shift = load16(space.shift + lane), dot = load16(space.rowDot + lane)
                var scores = space.probabilities + (first * ld + lane), gradients = space.scoreGradients + (first * ld + lane)
                for _ in 0..<rows {
                    let p = VectorMath.exp16(load16(scores) - shift)
                    store16(p, scores)
                    store16(scale * p * (load16(gradients) - dot), gradients)
                    scores += ld
                    gradients += ld
                }
            }
        }
    }

    /// `C[r, 0..<width] += Σ_{k ∈ span} A[r, k] · B[k, 0..<width]` (or `=` with
    /// `overwrite`) for `r < rows`, with `A[r, k] = a[r · rowStride + k · depthStride]`, `B`
    /// rows `ldb` apart, `width` a multiple of ``MicroTile/nr``, and `span(rows)` the depth
    /// range of a block of at most ``MicroTile/mr`` rows (the terms outside it are zero).
    /// Whole blocks of ``MicroTile/mr`` rows go straight into `C`; a last partial block goes
    /// through `edge` so that the rows of `C` past `rows` are never touched. Each element is
    /// `C + (the depth sum)` (or the sum), the same arithmetic either way.
    @inline(__always)
    static func accumulateProduct(rows: Int, width: Int, span: (_ rows: Range<Int>) -> Range<Int>,
                                  a: UnsafePointer<Float>, rowStride: Int, depthStride: Int,
                                  b: UnsafePointer<Float>, ldb: Int,
                                  c: UnsafeMutablePointer<Float>, ldc: Int, edge: UnsafeMutablePointer<Float>,
                                  overwrite: Bool = false) {
        let mr = MicroTile.mr, nr = MicroTile.nr
        // Loops over ranges, not `stride`: inlined into `blockItem`'s large specialisations,
        // `stride`'s iterator stayed a call per step (190 calls in the binary).
        for blockIndex in 0..<ceilDiv(rows, mr) {
            let block = blockIndex * mr
            let count = min(mr, rows - block)
            let depth = span(block..<(block + count))
            guard !depth.isEmpty else {
                if overwrite { for r in block..<(block + count) { (c + r * ldc).update(repeating: 0, count: width) } }
                continue
            }
            let operand = BroadcastOperand(base: a + block * rowStride + depth.lowerBound * depthStride,
                                           rowStride: rowStride, depthStride: depthStride, rows: count)
            let panels = b + depth.lowerBound * ldb
            for panelIndex in 0..<(width / nr) {
                let panel = panelIndex * nr
                let target = c + block * ldc + panel
                if count == mr {
                    microKernel(depth: depth.count, a: operand, b: panels + panel, ldb: ldb, c: target, ldc: ldc,
                                update: overwrite ? .overwrite : .accumulate)
                } else {
                    microKernel(depth: depth.count, a: operand, b: panels + panel, ldb: ldb, c: edge, ldc: nr,
                                update: .overwrite)
                    for r in 0..<count {
                        let source = edge + r * nr, row = target + r * ldc
                        if overwrite {
                            for col in 0..<nr { row[col] = source[col] }
                        } else {
                            for col in 0..<nr { row[col] += source[col] }
                        }
                    }
                }
            }
        }
    }

    /// One worker's scratch memory, carved from a zero-filled arena once per call.
    struct Workspace {
        /// Lanes of a query tile (the leading dimension of the transposed tiles) and rows of
        /// a key tile.
        let lanes: Int, keyRows: Int
        let d: Int, dv: Int, dPad: Int, dvPad: Int
        /// The current query tile's `scale · Qᵀ` (`D × lanes`) and `dOᵀ` (`Dv × lanes`): one
        /// of the prepared slots (``selecting(slot:)``).
        private(set) var qT, gradientT: UnsafeMutablePointer<Float>
        /// Packed query and `dO` rows (`B` operands when not read in place).
        let queryRows, gradientRows: UnsafeMutablePointer<Float>
        /// `Sᵀ` then `Pᵀ`, and `dPᵀ` then `dSᵀ` (`keyRows × lanes` each).
        let probabilities, scoreGradients: UnsafeMutablePointer<Float>
        /// Per lane of the current query tile: the probability shift and `D = rowsum(dO ∘ O)`.
        private(set) var shift, rowDot: UnsafeMutablePointer<Float>
        /// The query tiles this worker prepared last, ``preparedSlots`` of them reused first in,
        /// first out, each with its tag (empty: all zero, as the zero-filled arena starts) and
        /// its `Qᵀ`, `dOᵀ`, shifts and row dots; `nextSlot`: the slot the next preparation takes.
        let preparedTags: UnsafeMutablePointer<PreparedQueries>
        let nextSlot: UnsafeMutablePointer<Int>
        private let qTSlots, gradientTSlots, shiftSlots, rowDotSlots: UnsafeMutablePointer<Float>
        /// The edge tile of ``accumulateProduct(rows:width:span:a:rowStride:depthStride:b:ldb:c:ldc:edge:overwrite:)``.
        let edge: UnsafeMutablePointer<Float>
        /// Per block of ``MicroTile/mr`` key rows of the current tile: the lanes its `Sᵀ` and
        /// `dPᵀ` were computed on (``scoredPanels(_:seen:lanes:keys:)``).
        let scoredLanes: UnsafeMutablePointer<Range<Int>>
        /// The block's `dK` and `dV` accumulators (`keyRows × D′`, `keyRows × Dv′`).
        let accK, accV: UnsafeMutablePointer<Float>
        /// One tile's `dQ` contribution (`lanes × D′`) and the block's packed key rows
        /// (`keyRows × D′`, when not read in place).
        let accQ, keyRowsPacked: UnsafeMutablePointer<Float>
        /// The block's packed value rows (`keyRows × Dv′`, when not read in place:
        /// ``TensorView/readsInPlace(_:)``), and with 16-bit operands (`widening`; empty
        /// otherwise) one `dO` row and one output row widened for a row dot (`2 · Dv′`).
        let valueRowsPacked, rowStage: UnsafeMutablePointer<Float>
        /// The mask's score-term scratch (``TileMask/scoreTermScratchCount(queryTile:keyTile:)``)
        /// and score-gradient scratch (``TransposedTileMask/scoreGradientScratchCount(lanes:keyRows:headDim:)``);
        /// empty for masks without hooks.
        let terms, gradientScratch: UnsafeMutablePointer<Float>
        /// Whether the call soft-caps its scores, and then the tile's cap derivatives
        /// `1 − tanh²(s / cap)` (`keyRows × lanes`; empty otherwise).
        let softCap: Bool
        let capDerivatives: UnsafeMutablePointer<Float>
        /// Whether the mask's score terms have a derivative (``TransposedTileMask/differentiatesScoreTerms``),
        /// and then the tile's `f′` at the raw scores (`keyRows × lanes`; empty otherwise).
        let scoreTermDerivatives: Bool
        let termDerivatives: UnsafeMutablePointer<Float>

        init<Mask: TransposedTileMask>(carving carver: inout WorkspaceCarver, d: Int, dv: Int, lanes: Int,
                                       keyRows: Int, mask: Mask.Type, softCap: Bool = false, widening: Bool) {
            self.lanes = lanes
            self.keyRows = keyRows
            (self.d, self.dv) = (d, dv)
            dPad = roundUp(d, MicroTile.nr)
            dvPad = roundUp(dv, MicroTile.nr)
            preparedTags = carver.take(Workspace.preparedSlots)
            nextSlot = carver.take(1)
            qTSlots = carver.take(Workspace.preparedSlots * d * lanes)
            gradientTSlots = carver.take(Workspace.preparedSlots * dv * lanes)
            shiftSlots = carver.take(Workspace.preparedSlots * lanes)
            rowDotSlots = carver.take(Workspace.preparedSlots * lanes)
            (qT, gradientT, shift, rowDot) = (qTSlots, gradientTSlots, shiftSlots, rowDotSlots)
            queryRows = carver.take(lanes * dPad)
            gradientRows = carver.take(lanes * dvPad)
            probabilities = carver.take(keyRows * lanes)
            scoreGradients = carver.take(keyRows * lanes)
            edge = carver.take(MicroTile.mr * MicroTile.nr)
            scoredLanes = carver.take(ceilDiv(keyRows, MicroTile.mr))
            accK = carver.take(keyRows * dPad)
            accV = carver.take(keyRows * dvPad)
            accQ = carver.take(lanes * dPad)
            keyRowsPacked = carver.take(keyRows * dPad)
            valueRowsPacked = carver.take(keyRows * dvPad)
            rowStage = carver.take(widening ? 2 * dvPad : 0)
            terms = carver.take(Mask.addsScoreTerms ? Mask.scoreTermScratchCount(queryTile: lanes, keyTile: keyRows) : 0)
            gradientScratch = carver.take(Mask.takesScoreGradients
                ? Mask.scoreGradientScratchCount(lanes: lanes, keyRows: keyRows, headDim: d) : 0)
            self.softCap = softCap
            capDerivatives = carver.take(softCap ? keyRows * lanes : 0)
            scoreTermDerivatives = Mask.differentiatesScoreTerms
            termDerivatives = carver.take(Mask.differentiatesScoreTerms ? keyRows * lanes : 0)
        }

        /// Prepared query tiles a worker keeps. A key block of a band walks the query tiles
        /// behind those of the block before it (head-major work units run a head's blocks in
        /// order on one worker): with 128-key blocks, 64-query tiles and a band narrower than
        /// 128 keys, a block meets at most four tiles and shares two with its predecessor.
        static let preparedSlots = 4

        /// This workspace with the current query tile in prepared slot `slot`.
        func selecting(slot: Int) -> Workspace {
            var space = self
            space.qT = qTSlots + slot * d * lanes
            space.gradientT = gradientTSlots + slot * dv * lanes
            space.shift = shiftSlots + slot * lanes
            space.rowDot = rowDotSlots + slot * lanes
            return space
        }

        static func byteCount<Mask: TransposedTileMask>(d: Int, dv: Int, lanes: Int, keyRows: Int,
                                                        mask: Mask.Type, softCap: Bool = false,
                                                        widening: Bool) -> Int {
            WorkspaceCarver.bytes {
                _ = Workspace(carving: &$0, d: d, dv: dv, lanes: lanes, keyRows: keyRows, mask: mask, softCap: softCap,
                              widening: widening)
            }
        }
    }
}

/// The order in which key blocks add their contributions to `dQ`: for each key/value head
/// (`b · Hkv + hk`), block `t` may add to a query tile at position `p` (its place in the
/// block's walk: query head of the group, then query tile) only once every block before
/// `t` is done with every position up to `p`. Each block publishes how far it is done
/// (``publish(head:block:donePast:)``, monotone) and finishes with
/// ``finish(head:block:)``; blocks not yet started count as done with nothing.
///
/// A lock and a condition variable (no spinning, no atomics): a few thousand lock
/// operations per call against millions of FLOPs per operation. Everything lives in the
/// call's scratch (``with(heads:blocks:_:)``): an ordering allocates nothing.
struct BlockOrder: @unchecked Sendable {
    private let lock: UnsafeMutablePointer<pthread_mutex_t>
    private let condition: UnsafeMutablePointer<pthread_cond_t>
    private let blocks: Int
    /// Per (head, block): the positions below this are done (`Int.max`: finished).
    private let done: UnsafeMutablePointer<Int>
    /// Per head: the blocks before this are all finished.
    private let finishedPrefix: UnsafeMutablePointer<Int>

    /// Scratch bytes of an ordering of `heads × blocks` blocks.
    static func byteCount(heads: Int, blocks: Int) -> Int {
        roundUp(MemoryLayout<pthread_mutex_t>.stride, WorkspaceCarver.alignment)
            + roundUp(MemoryLayout<pthread_cond_t>.stride, WorkspaceCarver.alignment)
            + roundUp((heads * blocks + heads) * MemoryLayout<Int>.stride, WorkspaceCarver.alignment)
    }

    /// Runs `body` with an ordering of `heads` heads of `blocks` blocks, none done yet, in
    /// the call's scratch (``withScratch(byteCount:_:)``).
    static func with<R>(heads: Int, blocks: Int, _ body: (BlockOrder) throws -> R) rethrows -> R {
        try withScratch(byteCount: byteCount(heads: heads, blocks: blocks)) { raw in
            let lockBytes = roundUp(MemoryLayout<pthread_mutex_t>.stride, WorkspaceCarver.alignment)
            let conditionBytes = roundUp(MemoryLayout<pthread_cond_t>.stride, WorkspaceCarver.alignment)
            let lock = raw.bindMemory(to: pthread_mutex_t.self, capacity: 1)
            let condition = (raw + lockBytes).bindMemory(to: pthread_cond_t.self, capacity: 1)
            let counts = (raw + lockBytes + conditionBytes).bindMemory(to: Int.self, capacity: heads * blocks + heads)
            counts.initialize(repeating: 0, count: heads * blocks + heads)
            pthread_mutex_init(lock, nil)
            pthread_cond_init(condition, nil)
            defer {
                pthread_cond_destroy(condition)
                pthread_mutex_destroy(lock)
            }
            return try body(BlockOrder(lock: lock, condition: condition, blocks: blocks, done: counts,
                                       finishedPrefix: counts + heads * blocks))
        }
    }

    /// Blocks until every block before `block` of `head` is done past `position`.
    func waitForTurn(head: Int, block: Int, position: Int) {
        pthread_mutex_lock(lock)
        while !isTurn(head: head, block: block, position: position) { pthread_cond_wait(condition, lock) }
        pthread_mutex_unlock(lock)
    }

    /// Whether every block before `block` of `head` is done past `position` (lock held).
    private func isTurn(head: Int, block: Int, position: Int) -> Bool {
        var s = finishedPrefix[head]
        while s < block {
            if done[head * blocks + s] <= position { return false }
            s += 1
        }
        return true
    }

    /// Records that `block` of `head` is done with every position up to `position`.
    func publish(head: Int, block: Int, donePast position: Int) {
        pthread_mutex_lock(lock)
        done[head * blocks + block] = position + 1
        pthread_cond_broadcast(condition)
        pthread_mutex_unlock(lock)
    }

    /// Records that `block` of `head` has added all its contributions.
    func finish(head: Int, block: Int) {
        pthread_mutex_lock(lock)
        done[head * blocks + block] = .max
        var prefix = finishedPrefix[head]
        while prefix < blocks && done[head * blocks + prefix] == .max { prefix += 1 }
        finishedPrefix[head] = prefix
        pthread_cond_broadcast(condition)
        pthread_mutex_unlock(lock)
    }
}

/// A ``TileMask`` that also lists its tiles key-major, for the backward pass's `dK`/`dV`
/// work items.
protocol TransposedTileMask: TileMask {
    /// Calls `body`, in increasing order of `index`, for each query tile (tile `index` of
    /// the mask's partition of the queries into tiles of at most `queryTile`, `index <`
    /// ``backwardQueryTileCount(queryLength:queryTile:)``; by default the contiguous tiles)
    /// that may hold a query seeing one of `keys` (a key block of the backward pass: a run
    /// of step 1, or of the pass's ``TiledSoftmaxBackward/KeyBlocks/modulus``), with the key
    /// tile to score it against: a sub-run of `keys` (the same step) holding every key of
    /// `keys` the tile's queries may see, flagged fully visible when every pair is (the
    /// mask's ``TileMask/maskScores(_:ld:tile:queries:)`` masks the others). Keys of `keys`
    /// outside the listed tiles are invisible to every query. Each index is listed at most
    /// once per call and always stands for the same queries.
    func forEachQueryTile(seeing keys: PositionRun, queryLength: Int, queryTile: Int,
                          _ body: (_ index: Int, _ queries: PositionRun, _ tile: KeyTile) -> Void)

    /// The number of query tiles of ``forEachQueryTile(seeing:queryLength:queryTile:_:)``'s
    /// partition (default: `⌈queryLength / queryTile⌉` contiguous tiles).
    func backwardQueryTileCount(queryLength: Int, queryTile: Int) -> Int

    /// The queries of a partially visible `tile` (indices into `queries`) that may see one
    /// of its keys `keys` (indices into `tile.keys`, one block of ``MicroTile/mr`` or fewer):
    /// the backward scores only the panels holding them
    /// (``TiledSoftmaxBackward/scoredPanels(_:seen:lanes:keys:)``), and its `dK`/`dV`
    /// products skip the others, whose probabilities are 0. The key-major partner of
    /// ``TileMask/visibleKeyIndices(tile:queries:lanes:)``.
    func visibleQueryIndices(tile: KeyTile, queries: PositionRun, keys: Range<Int>) -> Range<Int>

    /// Whether the pass calls ``takeScoreGradients(_:)`` and ``publishScoreGradients(_:)``
    /// (default `false`: the calls compile away). Such masks list runs of step 1.
    static var takesScoreGradients: Bool { get }

    /// Floats of per-worker scratch the score-gradient hooks need (zero-filled once per call,
    /// kept from tile to tile) for query tiles of `lanes` lanes, key blocks of `keyRows`
    /// rows and head dimension `headDim`. Default 0.
    static func scoreGradientScratchCount(lanes: Int, keyRows: Int, headDim: Int) -> Int

    /// Takes one tile's `dSᵀ` once it is complete, before its `dQ` part is added: may add to
    /// that part, and may compute into its scratch what ``publishScoreGradients(_:)`` adds.
    /// Runs concurrently with other tiles: writes only memory of this key block.
    func takeScoreGradients(_ tile: ScoreGradientTile)

    /// Called for the same tile while its key block holds the tile's `dQ` turn: every earlier
    /// block of the key/value head has added its part of this query tile, no later one has.
    /// Adds what the mask keeps of the tile into memory shared by the blocks (in block order).
    func publishScoreGradients(_ tile: ScoreGradientTile)

    /// The backward of ``TileMask/weightProbabilities(_:ld:keyStart:keyCount:queryStart:queryCount:)``:
    /// multiplies the tile's probabilities by the forward's weights and keeps the weights'
    /// own gradients (default: the weights alone).
    func weightProbabilitiesBackward(_ tile: WeightGradientTile)

    /// Whether the mask's score terms are a function `s′ = f(s)` of each raw score whose
    /// derivative the pass multiplies `dSᵀ` by (default `false`: the call compiles away; a
    /// mask whose terms only add to the score, derivative 1, leaves it `false`). Such masks
    /// add score terms (``TileMask/addsScoreTerms``) and list runs of step 1.
    static var differentiatesScoreTerms: Bool { get }

    /// ``TileMask/addScoreTerms(_:)`` (each raw score `s` of `tile` replaced by `f(s)`) that
    /// also writes `f′(s)` into `derivatives[jj · tile.ld + ii]`, for `jj < tile.keyCount`
    /// and the tile's lanes; 0 where `f(s) = −∞` (a pair the function hides). The pass uses
    /// them only where `P > 0`.
    func addScoreTerms(_ tile: ScoreTile, derivatives: UnsafeMutablePointer<Float>)
}

extension TransposedTileMask {
    func backwardQueryTileCount(queryLength: Int, queryTile: Int) -> Int { ceilDiv(queryLength, queryTile) }

    static var takesScoreGradients: Bool { false }
    static var differentiatesScoreTerms: Bool { false }
    @inline(__always) func addScoreTerms(_ tile: ScoreTile, derivatives: UnsafeMutablePointer<Float>) {
        addScoreTerms(tile)
    }
    static func scoreGradientScratchCount(lanes: Int, keyRows: Int, headDim: Int) -> Int { 0 }
    @inline(__always) func takeScoreGradients(_ tile: ScoreGradientTile) {}
    @inline(__always) func publishScoreGradients(_ tile: ScoreGradientTile) {}

    /// Default: the forward's weights, no gradient of their own.
    @inline(__always)
    func weightProbabilitiesBackward(_ tile: WeightGradientTile) {
        weightProbabilities(tile.probabilities, ld: tile.ld, keyStart: tile.keyStart, keyCount: tile.keyCount,
                            queryStart: tile.queryStart, queryCount: tile.queryCount)
    }
}

/// What a weighting mask's backward (``TransposedTileMask/weightProbabilitiesBackward(_:)``)
/// sees of one transposed tile (`[jj · ld + ii]`: key `keyStart + jj`, query
/// `queryStart + ii`): the unweighted probabilities `exp(s − lse)`, to multiply by the
/// weights in place; `dPᵀ = V dOᵀ`; `D = rowsum(dO ∘ O)` per lane; and the key block's
/// index `block` in the pass (per (b, key/value head), one work item each).
///
/// With `P = w · exp(s − lse)`, `∂L/∂w_ij = exp(s_ij − lse_i) · (dP_ij − D_i)`.
struct WeightGradientTile {
    var probabilities: UnsafeMutablePointer<Float>
    var probabilityGradients: UnsafePointer<Float>
    var rowDot: UnsafePointer<Float>
    var ld: Int
    var keyStart: Int, keyCount: Int, queryStart: Int, queryCount: Int
    var block: Int
}

/// What a score-gradient hook sees of one tile: `dSᵀ` (`scoreGradients[jj · ld + ii]`,
/// the gradient of the score before `scale`, i.e. `scale · P (dP − D)`: key `keyStart + jj`,
/// query `queryStart + ii`; zero on hidden pairs and padding lanes), the query rows
/// (`queryRows + ii · ldq`, unscaled, `dPad` columns of which `headDim` are real, the rest
/// zero), the tile's `dQ` part `queryGradients` (`lanes × dPad`, `ld = dPad`, added to `dQ`
/// after the hooks), the micro-kernel edge buffer, the mask's scratch (kept from tile to
/// tile) and the key block's index.
struct ScoreGradientTile {
    var scoreGradients: UnsafePointer<Float>
    var ld: Int
    /// `queryCount` rounded up to ``MicroTile/nr``.
    var lanes: Int
    var queryRows: UnsafePointer<Float>
    var ldq: Int
    var headDim: Int, dPad: Int
    var queryGradients: UnsafeMutablePointer<Float>
    var edge: UnsafeMutablePointer<Float>
    var scratch: UnsafeMutablePointer<Float>
    /// Rows of the pass's key blocks (the scratch count's `keyRows`).
    var keyRows: Int
    var keyStart: Int, keyCount: Int, queryStart: Int, queryCount: Int
    var block: Int
}

extension IntervalMask: TransposedTileMask {
    /// Query `i` sees key `j` iff `i + offset − left ≤ j ≤ i + offset + right` and `j < keyEnd`:
    /// the keys `first … last` of `keys` below `keyEnd` are seen by queries
    /// `first − offset − right … last − offset + left`.
    func forEachQueryTile(seeing keys: PositionRun, queryLength: Int, queryTile: Int,
                          _ body: (_ index: Int, _ queries: PositionRun, _ tile: KeyTile) -> Void) {
        precondition(keys.step == 1, "key-major listing takes contiguous keys")
        let first = keys.start, last = min(keys.last, keyEnd - 1)
        guard first <= last else { return }
        let visible = PositionRun(start: first, count: last - first + 1)
        let lo = max(0, first - offset - right), hi = min(queryLength - 1, last - offset + left)
        guard lo <= hi else { return }
        for t in (lo / queryTile)...(hi / queryTile) {
            let start = t * queryTile
            let queries = PositionRun(start: start, count: min(queryTile, queryLength - start))
            let full = queries.last + offset - left <= first && last <= queries.start + offset + right
            body(t, queries, KeyTile(keys: visible, fullyVisible: full))
        }
    }

    /// Keys `j` of `keys` are seen by queries `j − offset − right … j − offset + left`.
    func visibleQueryIndices(tile: KeyTile, queries: PositionRun, keys: Range<Int>) -> Range<Int> {
        guard !keys.isEmpty else { return 0..<0 }
        let first = tile.keys.position(keys.lowerBound), last = tile.keys.position(keys.upperBound - 1)
        return runIndices(queries, from: first - offset - right, through: last - offset + left)
    }
}
