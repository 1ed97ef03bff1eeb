/* The worker threads of attnlab's compiled kernels: pthreads, never OpenMP (torch ships its
 * own OpenMP runtime, and two in one process fight over the cores). */
#ifndef ATTNLAB_THREADS_H
#define ATTNLAB_THREADS_H

#include <pthread.h>
#include <stddef.h>
#ifdef __SSE__
#include <xmmintrin.h>
#endif

#define ATTNLAB_MAX_THREADS 64

/* work(record t) for t < count, the records `size` bytes apart: record 0 on the calling
 * thread, the others on threads of their own (on the calling thread too where one cannot
 * be made). Returns when all are done. */
static inline void attnlab_run_workers(void *(*work)(void *), void *records, size_t size,
                                       int count) {
    pthread_t ids[ATTNLAB_MAX_THREADS];
    int created[ATTNLAB_MAX_THREADS] = {0};
    char *at = records;
    for (int t = 1; t < count; t++) {
        created[t] = pthread_create(&ids[t], NULL, work, at + t * size) == 0;
        if (!created[t]) work(at + t * size);
    }
    work(at);
    for (int t = 1; t < count; t++)
        if (created[t]) pthread_join(ids[t], NULL);
}

/* Flush-to-zero and denormals-are-zero on the calling thread (a subnormal operand slows
 * every product and exp many times over); returns the control word that
 * attnlab_restore_subnormals puts back. */
static inline unsigned int attnlab_flush_subnormals(void) {
#ifdef __SSE__
    const unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr | 0x8040);
    return csr;
#else
    return 0;
#endif
}

static inline void attnlab_restore_subnormals(unsigned int csr) {
#ifdef __SSE__
    _mm_setcsr(csr);
#else
    (void)csr;
#endif
}

#endif
