/* test_device: the CUDA build's smoke test. Fills a device buffer with the fill kernel
 * and reads it back, which proves the kernels were compiled for this GPU. Skipped (exit
 * 77) in the CPU-only build and where no GPU is visible. */
#include <stdio.h>
#include <stdlib.h>

#include "check.h"
#include "config.h"
#ifdef HAVE_CUDA
#include "device.h"
#endif

int main(void)
{
#ifndef HAVE_CUDA
    printf("test_device: skipped: this is the CPU-only build\n");
    return 77;
#else
    if (device_count() == 0) {
        printf("test_device: skipped: no CUDA device visible\n");
        return 77;
    }
    char err[256];
    CHECK(device_select(0, err, sizeof err) == 0, "%s", err);
    const size_t n = 1000003; /* odd: not a multiple of the block size */
    float *x = device_alloc(n * sizeof(float));
    CHECK(x != NULL, "cudaMalloc of %zu floats", n);
    if (!x) return check_done("test_device");
    CHECK(device_fill_f32(x, n, 3.25f, err, sizeof err) == 0, "%s", err);
    float *host = malloc(n * sizeof(float));
    CHECK(device_copy_to_host(host, x, n * sizeof(float)) == 0, "copy back");
    size_t wrong = 0;
    for (size_t i = 0; i < n; i++) wrong += host[i] != 3.25f;
    CHECK(wrong == 0, "%zu of %zu elements not filled", wrong, n);
    free(host);
    device_free(x);
    return check_done("test_device");
#endif
}
