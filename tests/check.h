/* check.h: the assertions of esft's C test programs.
 *
 * A test program makes any number of CHECKs and ends with `return check_done("name");`:
 * exit status 0 when every check held, 1 otherwise (77 is "skipped", see
 * tests/run-tests). Failed checks print file, line, the condition and a message. */
#ifndef ESFT_TESTS_CHECK_H
#define ESFT_TESTS_CHECK_H

#include <math.h>
#include <stddef.h>
#include <stdio.h>

static int check_count_ = 0;
static int check_failed_ = 0;

#define CHECK(cond, ...)                                                                 \
    do {                                                                                 \
        check_count_++;                                                                  \
        if (!(cond)) {                                                                   \
            check_failed_++;                                                             \
            fprintf(stderr, "%s:%d: check failed: %s: ", __FILE__, __LINE__, #cond);     \
            fprintf(stderr, __VA_ARGS__);                                                \
            fputc('\n', stderr);                                                         \
        }                                                                                \
    } while (0)

/* |a - b| <= tol * max(|a|, |b|, floor): relative error with an absolute floor. */
static inline int check_close(double a, double b, double tol, double floor_)
{
    double scale = fmax(fmax(fabs(a), fabs(b)), floor_);
    return fabs(a - b) <= tol * scale;
}

/* max |a - b| over max |b| (floored at 1e-30): the worst error of a against the reference
 * b, relative to b's largest element. */
static inline double check_worst_relative(const float *a, const float *b, size_t n)
{
    double diff = 0, scale = 1e-30;
    for (size_t i = 0; i < n; i++) {
        diff = fmax(diff, fabs((double)a[i] - b[i]));
        scale = fmax(scale, fabs((double)b[i]));
    }
    return diff / scale;
}

static inline int check_done(const char *name)
{
    printf("%s: %d checks, %d failed\n", name, check_count_, check_failed_);
    return check_failed_ ? 1 : 0;
}

#endif
