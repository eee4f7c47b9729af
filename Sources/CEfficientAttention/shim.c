// Most of the target's functions are `static inline` in include/CEfficientAttention.h;
// the parallel loop is defined here so that libdispatch's declaration stays out of the
// header Swift imports (Swift's Dispatch module declares it with its own types), and
// Swift reaches it by its symbol (Parallel.swift).
#include "CEfficientAttention.h"

#include <pthread.h>
#include <stddef.h>

// libdispatch's C entry point (dispatch/queue.h): `work(context, i)` for every
// `i < iterations` on the pool's threads, returning when all have run. A null queue is
// DISPATCH_APPLY_AUTO. Declared here with the queue as a plain pointer, its ABI.
extern void dispatch_apply_f(size_t iterations, void *queue, void *context, void (*work)(void *, size_t));

// A Swift closure `(Int, Int) -> Void` as the Swift calling convention passes it: the
// function, called with its context in the `swift_context` register.
typedef void (*ea_swift_body)(long item, long worker, void *context __attribute__((swift_context)))
    __attribute__((swiftcall));

// One parallel loop: the closure, the items, the next item to hand out.
struct ea_job {
    ea_swift_body body;
    void *context;
    long items;
    long next;
};

// Adds 1 to `*counter` atomically and returns the value before (relaxed ordering: the
// items a counter hands out are synchronised by the pool's completion barrier).
static inline long ea_next_item(long *counter) { return __atomic_fetch_add(counter, 1, __ATOMIC_RELAXED); }

static void ea_job_work(void *raw, size_t worker) {
    struct ea_job *job = raw;
    for (long item; (item = ea_next_item(&job->next)) < job->items;) job->body(item, (long)worker, job->context);
}

// The library's worker threads, in EA_POOLS pools: a pool's threads are created when a
// loop first needs them (at most EA_POOL_THREADS, beside the calling thread), then kept,
// each waiting for the pool's next loop. A loop's job lives on its caller's stack;
// starting and finishing it takes the pool's lock and two condition variables and
// allocates nothing. A loop takes the first pool no other loop holds, so loops running at
// once (other threads' calls, a loop inside a loop's body) each get a pool; only when
// every pool is busy does a loop run on libdispatch's pool (which allocates its
// continuations). Which threads run a loop never changes its results (Parallel.swift:
// items are independent of workers).
#define EA_POOLS 8
#define EA_POOL_THREADS 255

struct ea_pool {
    pthread_mutex_t lock;
    pthread_cond_t start, done;
    int busy;                         // a loop holds the pool
    long generation;                  // loops started so far
    long threads;                     // worker threads created (indices 1...threads)
    long startGeneration[EA_POOL_THREADS + 1];
    struct ea_job *job;               // the current loop's
    long helpers;                     // worker threads taking part in it (indices 1...helpers)
    long remaining;                   // of those, the ones not finished
};

static struct ea_pool pools[EA_POOLS] = {
    [0 ... EA_POOLS - 1] = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER}
};

static _Thread_local int ea_pool_thread_flag;

int ea_on_pool_thread(void) { return ea_pool_thread_flag; }

// A worker thread's argument: its pool and its index in it (1...EA_POOL_THREADS).
static void *ea_pool_thread(void *argument) {
    long code = (long)argument;
    struct ea_pool *pool = &pools[code / (EA_POOL_THREADS + 1)];
    long index = code % (EA_POOL_THREADS + 1);
    ea_pool_thread_flag = 1;
    pthread_mutex_lock(&pool->lock);
    long seen = pool->startGeneration[index];
    for (;;) {
        while (pool->generation == seen) pthread_cond_wait(&pool->start, &pool->lock);
        seen = pool->generation;
        if (index > pool->helpers) continue;
        struct ea_job *job = pool->job;
        pthread_mutex_unlock(&pool->lock);
        ea_job_work(job, (size_t)index);
        pthread_mutex_lock(&pool->lock);
        if (--pool->remaining == 0) pthread_cond_signal(&pool->done);
    }
    return NULL;
}

// Creates worker threads of `pool` until there are `wanted` (with its lock held); returns
// how many take part (fewer when the system refuses a thread).
static long ea_pool_grow(struct ea_pool *pool, long wanted) {
    while (pool->threads < wanted) {
        long index = pool->threads + 1;
        pool->startGeneration[index] = pool->generation;
        pthread_attr_t attributes;
        pthread_t thread;
        if (pthread_attr_init(&attributes) != 0) break;
        pthread_attr_setdetachstate(&attributes, PTHREAD_CREATE_DETACHED);
        long code = (pool - pools) * (EA_POOL_THREADS + 1) + index;
        int failed = pthread_create(&thread, &attributes, ea_pool_thread, (void *)code);
        pthread_attr_destroy(&attributes);
        if (failed) break;
        pool->threads = index;
    }
    return pool->threads < wanted ? pool->threads : wanted;
}

// The first pool no loop holds, taken (its lock released); NULL when every pool is busy.
static struct ea_pool *ea_take_pool(void) {
    for (int p = 0; p < EA_POOLS; p++) {
        struct ea_pool *pool = &pools[p];
        pthread_mutex_lock(&pool->lock);
        int taken = !pool->busy;
        pool->busy = 1;
        pthread_mutex_unlock(&pool->lock);
        if (taken) return pool;
    }
    return NULL;
}

// Called from Swift (Parallel.swift, `@_silgen_name`) with a non-escaping closure as its
// two words: `body(item, worker)` for every `item < items` on the calling thread and
// `workers − 1` pool threads, returning when all have run. Nothing is allocated once the
// pool's threads exist.
__attribute__((swiftcall)) void ea_parallel_for_each(long items, long workers, ea_swift_body body, void *context) {
    struct ea_job job = {body, context, items, 0};
    struct ea_pool *pool = ea_take_pool();
    if (pool == NULL) {
        dispatch_apply_f((size_t)workers, NULL, &job, ea_job_work);
        return;
    }
    pthread_mutex_lock(&pool->lock);
    long helpers = ea_pool_grow(pool, workers - 1 < EA_POOL_THREADS ? workers - 1 : EA_POOL_THREADS);
    pool->job = &job;
    pool->helpers = helpers;
    pool->remaining = helpers;
    pool->generation += 1;
    pthread_cond_broadcast(&pool->start);
    pthread_mutex_unlock(&pool->lock);
    ea_job_work(&job, 0);
    pthread_mutex_lock(&pool->lock);
    while (pool->remaining > 0) pthread_cond_wait(&pool->done, &pool->lock);
    pool->busy = 0;
    pthread_mutex_unlock(&pool->lock);
}
