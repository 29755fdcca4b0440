/* cuda_ops: the CUDA backend's op table (see cuda_ops.c for what it does and does not do
 * yet). CUDA build only. */
#ifndef ESFT_CUDA_OPS_H
#define ESFT_CUDA_OPS_H

#include "backend.h"

/* The op table over device pointers. */
const struct backend *backend_cuda(void);

/* on: fp32 GEMMs (linear layers, experts, attention) on the TF32 tensor cores
 * (model.dtype: tf32); off: true fp32 products, the default. */
void backend_cuda_set_tf32(bool on);
/* on (model.dtype: bf16): GEMMs against frozen weights run on bf16 operands (a bf16 copy
 * of each weight the model declares constant, the other operand rounded to bf16), fp32
 * outputs and sums; set before model_attach. */
void backend_cuda_set_bf16(bool on);

/* Frees the cuBLAS handle and the scratch buffer the ops keep between calls. */
void backend_cuda_release(void);

#endif
