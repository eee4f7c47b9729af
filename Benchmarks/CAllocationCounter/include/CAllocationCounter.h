// Counts heap allocations (malloc, calloc, realloc, posix_memalign, aligned_alloc,
// memalign) made by the whole process, for the benchmark's allocations-per-call column
// and the tests that assert a steady-state call allocates nothing.
//
// On Linux with glibc the allocation functions are defined here and forward to glibc's
// `__libc_*` entry points: an executable's definitions take precedence over libc's for
// every shared library (the Swift runtime, Foundation, Dispatch), so each allocation is
// counted with one relaxed atomic add. Elsewhere nothing is interposed and
// `ea_allocation_counting_supported()` is 0.
#ifndef C_ALLOCATION_COUNTER_H
#define C_ALLOCATION_COUNTER_H

/// Allocations made by the process so far (0 where counting is unsupported).
long ea_allocation_count(void);

/// Allocations made by the calling thread so far (0 where counting is unsupported).
long ea_thread_allocation_count(void);

/// Allocations made so far by the library's kept worker threads (EfficientAttention's
/// parallel loops; 0 where counting is unsupported).
long ea_pool_allocation_count(void);

/// 1 where allocations are counted (Linux, glibc), else 0.
int ea_allocation_counting_supported(void);

#endif
