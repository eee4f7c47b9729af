// Most of the target's functions are `static inline` in include/CEfficientAttention.h;
// `ea_parallel_apply` is defined here so that libdispatch's declaration stays out of the
// header Swift imports (Swift's Dispatch module declares it with its own types).
#include "CEfficientAttention.h"

#include <stddef.h>

// libdispatch's C entry point (dispatch/queue.h): `work(context, i)` for every
// `i < iterations` on the pool's threads, returning when all have run. A null queue is
// DISPATCH_APPLY_AUTO. Declared here with the queue as a plain pointer, its ABI.
extern void dispatch_apply_f(size_t iterations, void *queue, void *context, void (*work)(void *, size_t));

void ea_parallel_apply(long iterations, void *context, void (*work)(void *, long)) {
    // `long` and `size_t` share their representation on every supported target.
    dispatch_apply_f((size_t)iterations, NULL, context, (void (*)(void *, size_t))work);
}
