import CEfficientAttention

/// The tuning table: every cache-dependent block size, tile shape and cache budget of the
/// kernels, one row per target, with where each number came from. Kernels read their
/// values from ``Tuning/current``; nothing else in `Kernels/` holds a tuned number.
///
/// Rows and how one is chosen, once, at first use:
///
///     target                    chosen when                                         row
///     x86-64 with AVX-512       arch(x86_64) and the CPU reports AVX-512F           avx512
///                               (CPUID leaf 7 EBX bit 16, ZMM state enabled by the OS)
///     x86-64 with AVX2 and FMA  arch(x86_64) otherwise                              avx2
///     arm64                     arch(arm64)                                         arm64
///     anything else             —                                                   generic
///
/// Swift's `#if` cannot test CPU features, and neither the default build nor the `NativeCPU`
/// trait's `-target-cpu native` defines anything the source can see, so the x86-64 row is picked at run time from CPUID
/// (`ea_cpu_has_avx512f` in the C target): the same binary then reports the row of the CPU it
/// runs on, which is what runtime kernel dispatch will need. An x86-64 CPU with neither
/// AVX-512 nor AVX2 takes the AVX2 row too (its numbers are cache sizes, not instructions).
///
/// Where the numbers come from. Only the AVX-512 row was ever chosen on a machine (Zen 5:
/// 48 KiB L1d, 1 MiB L2 per core, 32 MiB L3; the attention tiles measured there with
/// `swift run -c release --traits NativeCPU attention-bench`, KernelDocs/Dense.md); the other rows are copies of
/// it, not tuned (the AVX2 row's one exception, decode's tile touches, moves no result), so
/// every target computes the same partitions and so bitwise the same results. (This AVX2 machine, an EPYC VM with 64 KiB L1d, 1 MiB L2 and 8 MiB L3 per
/// `lscpu`, selects the `avx2` row, equal to the AVX-512 row but for decode's tile touches,
/// which change no result.) Tune a row by measuring on
/// its target and recording the machine and command in its comment; a different row gives
/// different partitions, and results may then differ by rounding between targets.
///
/// Structural shapes are not in the table: they are compile-time constants fixed by the
/// code, not by caches — the micro-kernel's register tile `MR × NR = 8 × 32`
/// (``MicroTile``, two SIMD16 vectors per row; computed whole, or in four quarters without
/// AVX-512, ``MicroTile/splitsRegisterTile``, the same bits), the SIMD width of 16 lanes (`SIMD16<Float>`
/// throughout), decode's micro-kernel threshold ``DecodeAttention/microKernelRows`` and the
/// linear-attention scan's chunks (``LinearAttentionScan``).
struct Tuning: Sendable {
    /// GEMM cache blocks (``Gemm/Blocking``): `MC` rows of `A`, `KC` depth, `NC` columns of
    /// `B`. A `KC × NR` B micro-panel should stay in L1, an `MC × KC` A block in L2.
    var gemmRows: Int, gemmDepth: Int, gemmColumns: Int
    /// Tiled softmax attention (``TiledSoftmaxAttention/Tiling``): query rows per work item
    /// (the default; narrow bands take smaller ones) and keys per tile.
    var attentionQueryTile: Int, attentionKeyTile: Int
    /// Dense rows (each query sees every key, or a causal prefix) take `streamingQueryTile`
    /// queries per work item once a head's keys and values pass `residentKeyBytes`: every
    /// key tile fetched from L3 then serves that many queries before it leaves L2, instead of
    /// streaming the whole head again per ``attentionQueryTile`` queries.
    var streamingQueryTile: Int, residentKeyBytes: Int
    /// Decode (``DecodeAttention``): keys per split-KV chunk, query rows per work item on the
    /// micro-kernel path, and bytes of key rows per tile on the dot-product path (about
    /// half of L2, with as many bytes of value rows).
    var decodeSplit: Int, decodeRowTile: Int, decodeKeyTileBytes: Int
    /// Decode's one-row path touches each tile's value rows and the next tile's key rows with
    /// plain loads at the tile's start when the cache's elements are at least this many
    /// bytes, and leaves the two streams to the hardware prefetchers otherwise (`Int.max`:
    /// never touches). Memory traffic only: the same results either way.
    var decodeTouchedElementBytes: Int
    /// Query tiles for bands (local, strided, Longformer windows): a band of at most
    /// `narrowBand` keys takes `narrowBandQueryTile` queries per tile, one of at most
    /// `mediumBand` keys `mediumBandQueryTile`, wider ones ``attentionQueryTile``.
    var narrowBand: Int, narrowBandQueryTile: Int, mediumBand: Int, mediumBandQueryTile: Int
    /// The last-level cache the permuted-block kernel's head workers share: heads in flight
    /// whose workspaces fit in it run side by side.
    var sharedCacheBytes: Int
    /// Query slots of one permuted-block work item (its gathered rows stay in L2).
    var permutedItemQuerySlots: Int

    /// Chosen on Zen 5 (48 KiB L1d, 1 MiB L2, 32 MiB L3). GEMM blocks from the cache sizes,
    /// not swept (KernelDocs/MicroKernels.md): a 256 × 32 B micro-panel is 32 KiB of L1d,
    /// a 128 × 256 A block 128 KiB of L2. Attention tiles 128 × 64 measured with
    /// `swift run -c release --traits NativeCPU attention-bench` (KernelDocs/Dense.md: within noise of the best
    /// for D = 64 and 128). Decode: split 2048 so a 32K cache feeds 16 work items
    /// (KernelDocs/MultiQuery.md), 64 KiB key tiles (CHANGELOG.md, read bandwidth by turn
    /// length). Dense rows: 512 queries per tile once a head's keys and values pass 1 MiB (the
    /// L2), measured with `attention-bench --variants dense --seq 2048,8192,32768` and
    /// `--dim 128` for query tiles 128, 256, 512 and 1024 (KernelDocs/Dense.md, "Long
    /// sequences"). Band tiles 32 up to 384 keys, 64 up to 1024, measured for local attention
    /// (KernelDocs/Local.md). Shared cache: the 32 MiB L3. Permuted-block items of about
    /// 1024 query slots (KernelDocs/LSH.md), so that an item's gathered rows stay in L2.
    /// One-row decode touches Float32, Float16 and BFloat16 tiles, not Int8 ones (stop 58,
    /// KernelDocs/MultiQuery.md, "Int8 rows on the Zen 5": Int8 does more arithmetic per
    /// byte, and the prefetchers keep up with it).
    static let avx512 = Tuning(gemmRows: 128, gemmDepth: 256, gemmColumns: 512,
                               attentionQueryTile: 128, attentionKeyTile: 64,
                               streamingQueryTile: 512, residentKeyBytes: 1 << 20,
                               decodeSplit: 2048, decodeRowTile: 128, decodeKeyTileBytes: 64 << 10,
                               decodeTouchedElementBytes: 2,
                               narrowBand: 384, narrowBandQueryTile: 32, mediumBand: 1024, mediumBandQueryTile: 64,
                               sharedCacheBytes: 32 << 20, permutedItemQuerySlots: 1024)
    /// Copied from the AVX-512 row (this VM, AVX2 + FMA, selects it), but for one entry
    /// measured on a Zen 3 EPYC VM (AVX2 + FMA, 32 KiB L1d, 512 KiB L2): its hardware
    /// prefetchers stream one-row decode's keys and values faster than the plain loads at
    /// each tile's start, `decodeTouchedElementBytes` `.max` (KernelDocs/MultiQuery.md, "One row on
    /// the Zen 3"; `attention-bench --variants multi-query --decode --cache 32768 --heads 32
    /// --kv-heads 32 --dim 128 --cache-precision f32|f16|int8`). It changes memory
    /// traffic only, so the row still computes the AVX-512 row's partitions and bits.
    static let avx2: Tuning = {
        var row = avx512
        row.decodeTouchedElementBytes = .max
        return row
    }()
    /// Not tuned: copied from the AVX-512 row.
    static let arm64 = avx512
    /// Not tuned: copied from the AVX-512 row.
    static let generic = avx512

    /// The row of the CPU this process runs on, chosen once at first use (see the table).
    static let current: Tuning = {
        #if arch(x86_64)
        return ea_cpu_has_avx512f() != 0 ? avx512 : avx2
        #elseif arch(arm64)
        return arm64
        #else
        return generic
        #endif
    }()
}
