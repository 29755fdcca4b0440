/* device: CUDA device discovery and the fill kernel (see device.h). The fill kernel is
 * the smallest end-to-end check that the code compiled for this GPU's architecture runs
 * on it: tests/test_device.c fills a buffer on the device and reads it back. */
#include "device.h"

#include <cuda_runtime.h>
#include <stdio.h>

/* Only "no device" and "no driver at all" mean zero devices. cudaGetDeviceCount says
 * "insufficient driver" both where no driver is installed (a build machine) and where the
 * installed one is older than the runtime (CUDA 13 needs driver 580 or newer); the driver
 * version, 0 when none is installed, tells the two apart. The second is an error: a test
 * that skipped there would hide a machine that cannot run the kernels. */
extern "C" int device_count(void)
{
    int count = 0;
    cudaError_t status = cudaGetDeviceCount(&count);
    if (status == cudaSuccess) return count;
    cudaGetLastError(); /* clear the error, it is not sticky */
    int driver = -1;
    if (status == cudaErrorNoDevice ||
        (cudaDriverGetVersion(&driver) == cudaSuccess && driver == 0))
        return 0;
    return -1;
}

extern "C" void device_print_info(FILE *out)
{
    int runtime = 0, driver = 0;
    cudaRuntimeGetVersion(&runtime);
    cudaDriverGetVersion(&driver);
    fprintf(out, "CUDA runtime: %d.%d, driver: ", runtime / 1000, (runtime % 1000) / 10);
    if (driver)
        fprintf(out, "%d.%d\n", driver / 1000, (driver % 1000) / 10);
    else
        fprintf(out, "none\n");
    int count = 0;
    cudaError_t status = cudaGetDeviceCount(&count);
    if (status != cudaSuccess) {
        fprintf(out, "CUDA devices: none (%s)\n", cudaGetErrorString(status));
        cudaGetLastError();
        return;
    }
    for (int d = 0; d < count; d++) {
        cudaDeviceProp prop;
        if (cudaGetDeviceProperties(&prop, d) != cudaSuccess) continue;
        fprintf(out, "CUDA device %d: %s, %.1f GiB, compute capability %d.%d\n", d, prop.name,
                (double)prop.totalGlobalMem / (1024.0 * 1024.0 * 1024.0), prop.major,
                prop.minor);
    }
}

extern "C" int device_select(int local_rank, char *err, size_t err_size)
{
    int count = device_count();
    if (count == 0) {
        snprintf(err, err_size, "no CUDA device is visible to this process");
        return -1;
    }
    if (count < 0) {
        int n = 0;
        snprintf(err, err_size, "cudaGetDeviceCount: %s",
                 cudaGetErrorString(cudaGetDeviceCount(&n)));
        cudaGetLastError();
        return -1;
    }
    int device = local_rank % count;
    cudaError_t status = cudaSetDevice(device);
    if (status != cudaSuccess) {
        snprintf(err, err_size, "cudaSetDevice(%d): %s", device, cudaGetErrorString(status));
        return -1;
    }
    return device;
}

/* One thread per element, grid-stride so any n fits the grid limit. */
__global__ static void fill_f32_kernel(float *x, size_t n, float value)
{
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n;
         i += (size_t)gridDim.x * blockDim.x)
        x[i] = value;
}

extern "C" int device_fill_f32(float *x, size_t n, float value, char *err, size_t err_size)
{
    if (n == 0) return 0;
    const int threads = 256;
    size_t blocks = (n + threads - 1) / threads;
    if (blocks > 65535) blocks = 65535;
    fill_f32_kernel<<<(unsigned)blocks, threads>>>(x, n, value);
    cudaError_t status = cudaGetLastError();
    if (status == cudaSuccess) status = cudaDeviceSynchronize();
    if (status != cudaSuccess) {
        snprintf(err, err_size, "fill kernel: %s", cudaGetErrorString(status));
        return -1;
    }
    return 0;
}

extern "C" void *device_alloc(size_t bytes)
{
    void *p = NULL;
    if (cudaMalloc(&p, bytes ? bytes : 1) != cudaSuccess) return NULL;
    return p;
}

/* cudaFree returns the context's sticky error (an earlier illegal address, say) as well as
 * its own: reported, so that a test does not read on past a dead context in silence. */
extern "C" int device_free(void *p)
{
    cudaError_t status = cudaFree(p);
    if (status == cudaSuccess) return 0;
    fprintf(stderr, "device_free: cudaFree: %s\n", cudaGetErrorString(status));
    return -1;
}

extern "C" int device_copy_to_host(void *host, const void *device, size_t bytes)
{
    return cudaMemcpy(host, device, bytes, cudaMemcpyDeviceToHost) == cudaSuccess ? 0 : -1;
}

extern "C" int device_copy_to_device(void *device, const void *host, size_t bytes)
{
    return cudaMemcpy(device, host, bytes, cudaMemcpyHostToDevice) == cudaSuccess ? 0 : -1;
}
