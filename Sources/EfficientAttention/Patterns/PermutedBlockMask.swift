/// Which key slots a query slot sees in permuted-block attention (``PermutedBlockAttention``):
/// a reach and the rules that restrict it (stored fields, no array: a call builds one
/// without allocating). A query slot sees the key slots of the blocks within ``reach`` that
/// pass every rule set; key padding (keys at or past the key length) is never visible.
struct BlockVisibility: Equatable {
    /// The blocks whose keys a query's block attends to.
    enum Reach: Equatable {
        /// Its own block only (routing clusters).
        case sameBlock
        /// Its own block and the one before it, the first block's predecessor being the
        /// last (LSH chunks).
        case withPreviousBlock
    }

    var reach: Reach
    /// Whether keys must share the query's bucket (LSH without `attendAcrossBuckets`).
    var sameBucket = false
    /// `keyPosition ≤ queryPosition + offset` on original positions (`offset = Nk − Nq`);
    /// `nil`: no causal rule.
    var causalOffset: Int? = nil
    /// `keyPosition != queryPosition`: a query never sees itself (shared-QK LSH; the self
    /// rule of ``PermutedBlockAttention`` gives a query with no other key itself back).
    var notSelf = false

    /// Whether blocks see the block before them.
    var withPrevious: Bool { reach == .withPreviousBlock }
    /// Whether any rule restricts the keys within reach.
    var hasRules: Bool { sameBucket || causalOffset != nil || notSelf }
}

/// The mask of permuted-block attention after queries and keys have been permuted into
/// block order (LSH chunks of the bucket-sorted order, k-means clusters).
///
/// Queries and keys live in *slots* of one work item: query slot `s` holds the original
/// query `queryPosition[s]` of block `queryBlock[s]`; the item's query slots start at a
/// block boundary, blocks of `queryBlockSize` slots. Key slots hold `predecessorBlocks`
/// (0 or 1) blocks of `keyBlockSize` slots before the keys of the item's own blocks (LSH's
/// look-back chunk). Key slot `t` is visible to query slot `s` iff (``BlockVisibility``):
///
/// - `keyBlock[t] == queryBlock[s]`, or with ``BlockVisibility/Reach/withPreviousBlock``
///   `keyBlock[t] == previous(queryBlock[s])` where `previous(0) = blocks − 1` (LSH chunks
///   attend to the previous chunk, wrapping); a key slot with `keyBlock[t] == −1` (key
///   padding, a short previous chunk) is never visible;
/// - ``BlockVisibility/sameBucket``: `keyBucket[t] == queryBucket[s]`;
/// - ``BlockVisibility/causalOffset``: `keyPosition[t] ≤ queryPosition[s] + offset`;
/// - ``BlockVisibility/notSelf``: `keyPosition[t] != queryPosition[s]`.
///
/// Every per-slot array holds at least `slots + 16` entries (the kernel masks whole
/// 16-lane vectors). Pointers are borrowed from ``PermutedBlockAttention``'s workspace.
struct PermutedBlockMask: TileMask {
    var queryBlock: UnsafePointer<Int32>
    var queryBucket: UnsafePointer<Int32>
    var queryPosition: UnsafePointer<Int32>
    var keyBlock: UnsafePointer<Int32>
    var keyBucket: UnsafePointer<Int32>
    var keyPosition: UnsafePointer<Int32>
    var keySlots: Int
    var queryBlockSize: Int
    var keyBlockSize: Int
    var predecessorBlocks: Int
    var blocks: Int
    /// The rule, unpacked once for the masking loop.
    private let withPrevious: Bool, sameBucket: Bool, causalOffset: Int?, notSelf: Bool
    /// True when nothing but the block decides visibility (no rule, no predecessor block,
    /// no padded keys): tiles of a single query block are then fully visible.
    var blocksOnly: Bool

    init(queryBlock: UnsafePointer<Int32>, queryBucket: UnsafePointer<Int32>, queryPosition: UnsafePointer<Int32>,
         keyBlock: UnsafePointer<Int32>, keyBucket: UnsafePointer<Int32>, keyPosition: UnsafePointer<Int32>,
         keySlots: Int, queryBlockSize: Int, keyBlockSize: Int, predecessorBlocks: Int, blocks: Int,
         visibility: BlockVisibility, blocksOnly: Bool) {
        self.queryBlock = queryBlock
        self.queryBucket = queryBucket
        self.queryPosition = queryPosition
        self.keyBlock = keyBlock
        self.keyBucket = keyBucket
        self.keyPosition = keyPosition
        self.keySlots = keySlots
        self.queryBlockSize = queryBlockSize
        self.keyBlockSize = keyBlockSize
        self.predecessorBlocks = predecessorBlocks
        self.blocks = blocks
        withPrevious = visibility.withPrevious
        sameBucket = visibility.sameBucket
        causalOffset = visibility.causalOffset
        notSelf = visibility.notSelf
        self.blocksOnly = blocksOnly
    }

    func forEachKeyTile(queries: PositionRun, tileSize: Int, _ body: (KeyTile) -> Void) {
        // Query slots come in contiguous tiles (the default partition).
        // Local blocks first...last see key blocks first...last + predecessorBlocks.
        let first = queries.start / queryBlockSize, last = (queries.start + queries.count - 1) / queryBlockSize
        let full = blocksOnly && first == last
        var start = first * keyBlockSize
        var end = min((last + 1 + predecessorBlocks) * keyBlockSize, keySlots)
        // A tile holding every block of the round (an item from block 0 to the last, one
        // query tile): the predecessor copy of the last block serves both the first block's
        // look-back and the last block itself, so its own copy is not listed (it would be
        // seen twice).
        if predecessorBlocks == 1 && first == 0 && queryBlock[0] == 0 && last == blocks - 1 {
            end = min((last + 1) * keyBlockSize, keySlots)
        }
        while start < end {
            let count = min(tileSize, end - start)
            body(KeyTile(keys: PositionRun(start: start, count: count), fullyVisible: full))
            start += count
        }
    }

    func maskScores(_ scores: UnsafeMutablePointer<Float>, ld: Int, tile: KeyTile, queries: PositionRun) {
        let keyStart = tile.keys.start, keyCount = tile.keys.count
        let queryStart = queries.start, queryCount = queries.count
        typealias Lanes = SIMD16<Int32>
        let minusInfinity = Vec16(repeating: -.infinity)
        let lastBlock = Lanes(repeating: Int32(blocks - 1))
        let zero = Lanes(repeating: 0), one = Lanes(repeating: 1)
        let offset = Int32(clamping: causalOffset ?? 0)
        let causal = causalOffset != nil
        for jj in 0..<keyCount {
            let t = keyStart + jj
            let row = scores + jj * ld
            let block = keyBlock[t]
            guard block >= 0 else {
                var ii = 0
                while ii < queryCount { store16(minusInfinity, row + ii); ii += 16 }
                continue
            }
            let keyBlockLanes = Lanes(repeating: block)
            let bucket = Lanes(repeating: keyBucket[t])
            let position = keyPosition[t]
            let limit = Lanes(repeating: position &- offset)   // visible iff queryPosition ≥ limit
            let own = Lanes(repeating: position)
            var ii = 0
            while ii < queryCount {
                let s = queryStart + ii
                let queryBlocks = UnsafeRawPointer(queryBlock + s).loadUnaligned(as: Lanes.self)
                var seen = queryBlocks .== keyBlockLanes
                if withPrevious {
                    var previous = queryBlocks &- one
                    previous.replace(with: lastBlock, where: queryBlocks .== zero)
                    seen = seen .| (previous .== keyBlockLanes)
                }
                if sameBucket {
                    let buckets = UnsafeRawPointer(queryBucket + s).loadUnaligned(as: Lanes.self)
                    seen = seen .& (buckets .== bucket)
                }
                if causal || notSelf {
                    let positions = UnsafeRawPointer(queryPosition + s).loadUnaligned(as: Lanes.self)
                    if causal { seen = seen .& (positions .>= limit) }
                    if notSelf { seen = seen .& (positions .!= own) }
                }
                var v = load16(row + ii)
                v.replace(with: minusInfinity, where: .!seen)
                store16(v, row + ii)
                ii += 16
            }
        }
    }
}
