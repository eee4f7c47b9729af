#include "CAllocationCounter.h"
#include "CEfficientAttention.h"

// Any libc header defines __GLIBC__ on glibc.
#include <errno.h>
#include <stddef.h>

// Under AddressSanitizer or ThreadSanitizer their runtime owns malloc: interposing it here
// too (with glibc's own allocator behind) crashes the runtime's start-up (its interceptors'
// dlsym calls calloc before it is ready). Counting is then unsupported and the allocation
// tests skip, as on other platforms.
#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define EA_SANITIZED 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define EA_SANITIZED 1
#endif

#if defined(__linux__) && defined(__GLIBC__) && !defined(EA_SANITIZED)
#include <stdatomic.h>

extern void *__libc_malloc(size_t size);
extern void *__libc_calloc(size_t count, size_t size);
extern void *__libc_realloc(void *pointer, size_t size);
extern void *__libc_memalign(size_t alignment, size_t size);

static _Atomic long allocations;
static _Thread_local long thread_allocations;
static _Atomic long pool_allocations;

static inline void count_one(void) {
    atomic_fetch_add_explicit(&allocations, 1, memory_order_relaxed);
    thread_allocations += 1;
    if (ea_on_pool_thread()) atomic_fetch_add_explicit(&pool_allocations, 1, memory_order_relaxed);
}

void *malloc(size_t size) {
    count_one();
    return __libc_malloc(size);
}

void *calloc(size_t count, size_t size) {
    count_one();
    return __libc_calloc(count, size);
}

void *realloc(void *pointer, size_t size) {
    count_one();
    return __libc_realloc(pointer, size);
}

void *memalign(size_t alignment, size_t size) {
    count_one();
    return __libc_memalign(alignment, size);
}

void *aligned_alloc(size_t alignment, size_t size) {
    count_one();
    return __libc_memalign(alignment, size);
}

int posix_memalign(void **result, size_t alignment, size_t size) {
    // posix_memalign's own contract: a power of two multiple of sizeof(void *).
    if (alignment % sizeof(void *) != 0 || (alignment & (alignment - 1)) != 0) return EINVAL;
    count_one();
    void *pointer = __libc_memalign(alignment, size);
    if (pointer == NULL) return ENOMEM;
    *result = pointer;
    return 0;
}

long ea_allocation_count(void) {
    return atomic_load_explicit(&allocations, memory_order_relaxed);
}

long ea_thread_allocation_count(void) { return thread_allocations; }

long ea_pool_allocation_count(void) { return atomic_load_explicit(&pool_allocations, memory_order_relaxed); }

int ea_allocation_counting_supported(void) { return 1; }

#else

long ea_allocation_count(void) { return 0; }

long ea_thread_allocation_count(void) { return 0; }

long ea_pool_allocation_count(void) { return 0; }

int ea_allocation_counting_supported(void) { return 0; }

#endif
