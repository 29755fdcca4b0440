/* gemm_peak: the machine's fp32 GEMM peak as esft can reach it, for the CPU benchmark
 * (run-cpu.sh prints each row's GFLOP/s against it).
 *
 * Usage: gemm_peak [--size n] [--repeats r]
 *
 * esft calls its BLAS single-threaded from inside OpenMP's loops (cpu_ops.c), so the
 * peak is measured the same way: every OpenMP thread runs its own n x n x n
 * cblas_sgemm (default n = 1536) on its own matrices at the same time, with the BLAS
 * esft was configured with (blas.h); the best of r repeats (default 5) counts, 2 n^3
 * FLOPs per thread. Prints "key: value" lines. */
#include <cblas.h>
#undef I
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "blas.h"
#include "log.h"

int main(int argc, char **argv)
{
    int n = 1536, repeats = 5;
    for (int i = 1; i < argc; i++) {
        if (i + 1 < argc && !strcmp(argv[i], "--size"))
            n = atoi(argv[++i]);
        else if (i + 1 < argc && !strcmp(argv[i], "--repeats"))
            repeats = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: gemm_peak [--size 1536] [--repeats 5]\n");
            return 2;
        }
    }
    if (n < 1 || repeats < 1) {
        fprintf(stderr, "gemm_peak: --size and --repeats must be positive\n");
        return 2;
    }
    blas_use_one_thread();
    int threads = omp_get_max_threads();
    size_t count = (size_t)n * n;
    float *matrices = xmalloc((size_t)threads * 3 * count * sizeof(float));
#pragma omp parallel for schedule(static, 1)
    for (int t = 0; t < threads; t++) /* first touch on the thread that uses them */
        for (size_t i = 0; i < 3 * count; i++)
            matrices[(size_t)t * 3 * count + i] = (float)((i * 7 + (size_t)t) % 13) * 0.01f;
    double best = 0;
    for (int r = 0; r < repeats; r++) {
        double start = omp_get_wtime();
#pragma omp parallel num_threads(threads)
        {
            float *a = matrices + (size_t)omp_get_thread_num() * 3 * count;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, n, n, 1.0f, a, n,
                        a + count, n, 0.0f, a + 2 * count, n);
        }
        double seconds = omp_get_wtime() - start;
        double rate = 2.0 * n * (double)n * n * threads / seconds / 1e9;
        if (rate > best) best = rate;
    }
    printf("blas: %s\n", blas_description());
    printf("threads: %d\n", threads);
    printf("size: %d\n", n);
    printf("repeats: %d\n", repeats);
    printf("gemm peak gflops: %.1f\n", best);
    printf("gemm peak gflops per thread: %.1f\n", best / threads);
    free(matrices);
    return 0;
}
