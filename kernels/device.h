/* device: CUDA device discovery and the smallest kernels every other part relies on
 * (fill, copy checks). C linkage; implemented in kernels/device.cu. */
#ifndef ESFT_KERNELS_DEVICE_H
#define ESFT_KERNELS_DEVICE_H

#include <stddef.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Number of visible CUDA devices; 0 when no driver is installed or no device is visible;
 * -1 on any other error (a driver older than the runtime, a broken installation), whose
 * message device_print_info shows. */
int device_count(void);

/* Runtime and driver versions and each visible device (name, memory, compute
 * capability), or why none is visible. */
void device_print_info(FILE *out);

/* Selects device local_rank % device_count() for this process. Returns the device index,
 * or -1 with a reason in err when no device is usable. */
int device_select(int local_rank, char *err, size_t err_size);

/* x[i] = value for i < n, on the device (x is device memory). Returns 0 or -1 with a
 * reason in err (the CUDA error string). */
int device_fill_f32(float *x, size_t n, float value, char *err, size_t err_size);

/* Device memory helpers for tests and the comm layer: return NULL / -1 on failure
 * (device_free also prints cudaFree's message to stderr). */
void *device_alloc(size_t bytes);
int device_free(void *p);
int device_copy_to_host(void *host, const void *device, size_t bytes);
int device_copy_to_device(void *device, const void *host, size_t bytes);

#ifdef __cplusplus
}
#endif

#endif
