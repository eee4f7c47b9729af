// Small C helpers for the EfficientAttention kernels: what Swift cannot express directly.
#ifndef C_EFFICIENT_ATTENTION_H
#define C_EFFICIENT_ATTENTION_H

/// Asks for the cache line holding `p` for reading, kept in every cache level
/// (`prefetcht0` on x86-64, `prfm pldl1keep` on arm64; nothing where the target has no
/// prefetch). Never faults, whatever `p` is.
static inline void ea_prefetch_read(const void *p) { __builtin_prefetch(p, 0, 3); }

/// Asks for the cache line holding `p` for writing, kept in every cache level
/// (`prefetchw` on x86-64 where available, `prfm pstl1keep` on arm64). Never faults.
static inline void ea_prefetch_write(const void *p) { __builtin_prefetch(p, 1, 3); }

#endif
