// Small C helpers for the EfficientAttention kernels: what Swift cannot express directly.
#ifndef C_EFFICIENT_ATTENTION_H
#define C_EFFICIENT_ATTENTION_H

/// Asks for the cache line holding `p` for reading, kept in every cache level
/// (`prefetcht0` on x86-64, `prfm pldl1keep` on arm64; nothing where the target has no
/// prefetch). Never faults, whatever `p` is.
static inline void ea_prefetch_read(const void *p) { __builtin_prefetch(p, 0, 3); }

/// Asks for the cache line holding `p` for reading into the outer caches only
/// (`prefetcht1` on x86-64: L2 and beyond, not L1; `prfm pldl2keep` on arm64): for data
/// needed a while later, so it does not push the working set out of L1. Never faults.
static inline void ea_prefetch_read_l2(const void *p) { __builtin_prefetch(p, 0, 2); }

/// Asks for the cache line holding `p` for writing, kept in every cache level
/// (`prefetchw` on x86-64 where available, `prfm pstl1keep` on arm64). Never faults.
static inline void ea_prefetch_write(const void *p) { __builtin_prefetch(p, 1, 3); }

/// 1 on one of the library's kept worker threads (shim.c's pool), else 0.
int ea_on_pool_thread(void);

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

/// 1 when the CPU this runs on executes AVX-512F and the OS saves its registers, else 0
/// (always 0 off x86-64). CPUID leaf 7 EBX bit 16 (AVX512F), leaf 1 ECX bit 27 (OSXSAVE),
/// and XCR0 bits 1, 2, 5, 6, 7 (SSE, AVX, opmask and ZMM state). Used once, to pick the
/// tuning row (Kernels/Tuning.swift); needs no library beyond the compiler's header.
static inline int ea_cpu_has_avx512f(void) {
#if defined(__x86_64__) || defined(__i386__)
    unsigned int a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 27))) return 0;
    unsigned int lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    if ((lo & 0xE6u) != 0xE6u) return 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    return (b & (1u << 16)) != 0;
#else
    return 0;
#endif
}

#endif
