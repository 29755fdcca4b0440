/* check_cuda: the checking macros of the CUDA build (check_cuda, check_nccl), for
 * comm_nccl.c, the CUDA backend and kernels/. Like check_mpi, they report file, line,
 * the call and the library's own message, then end every rank through fatal().
 *
 * check_nccl expands to ncclGetErrorString, so only a file that includes <nccl.h> may
 * use it; this header does not pull NCCL into kernel files that do not need it. Usable
 * from C and from CUDA C++ (.cu) files. */
#ifndef ESFT_CHECK_CUDA_H
#define ESFT_CHECK_CUDA_H

#include <cuda_runtime.h>

#include "log.h"

#define check_cuda(call)                                                                           \
    do {                                                                                           \
        cudaError_t check_cuda_err_ = (call);                                                      \
        if (check_cuda_err_ != cudaSuccess)                                                        \
            fatal(EXIT_RUNTIME, "%s:%d: %s failed: %s", __FILE__, __LINE__, #call,                 \
                  cudaGetErrorString(check_cuda_err_));                                            \
    } while (0)

/* NCCL's own message is terse ("unhandled system error"); its log says which link or
 * peer failed, hence the hint. */
#define check_nccl(call)                                                                           \
    do {                                                                                           \
        ncclResult_t check_nccl_err_ = (call);                                                     \
        if (check_nccl_err_ != ncclSuccess)                                                        \
            fatal(EXIT_RUNTIME,                                                                    \
                  "%s:%d: %s failed: %s\nhint: rerun with NCCL_DEBUG=WARN for NCCL's "             \
                  "own diagnosis",                                                                 \
                  __FILE__, __LINE__, #call, ncclGetErrorString(check_nccl_err_));                 \
    } while (0)

#endif
