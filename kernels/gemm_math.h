/* gemm_math: how the row-major GEMMs of backend.h map onto cuBLAS's column-major GEMM,
 * written once for kernels/gemm.cu and the host, so the CPU build checks the mapping
 * (tests/test_dense_math.c replays each plan with a plain column-major GEMM and compares
 * it with the CPU backend) without a GPU.
 *
 * A row-major [R, C] matrix is the column-major [C, R] matrix with leading dimension C:
 * its transpose. So for y[N,O] = x[N,I] w[O,I]^T, cuBLAS computes y^T = w x^T, with
 * y^T column-major [O, N]: A = w (column-major [I, O], used transposed), B = x (column-
 * major [I, N]). The plans below are the three products of a linear layer:
 *   forward   y[N,O]   = x[N,I]  w[O,I]^T   C = y,  A = w,  B = x
 *   input     dx[N,I]  = dy[N,O] w[O,I]     C = dx, A = w,  B = dy
 *   weight    dw[O,I] += dy^T x             C = dw, A = x,  B = dy */
#ifndef ESFT_KERNELS_GEMM_MATH_H
#define ESFT_KERNELS_GEMM_MATH_H

/* C = op(A) op(B) (+ beta C) in column-major terms: op(A) is m x k, op(B) k x n. */
struct gemm_plan {
    int trans_a, trans_b; /* 1: the operand is used transposed */
    int m, n, k;
    int lda, ldb, ldc;
};

enum gemm_product { GEMM_FORWARD, GEMM_INPUT_GRAD, GEMM_WEIGHT_GRAD };

/* The plan of one product of a linear layer with N rows, I inputs, O outputs. */
static inline struct gemm_plan gemm_plan_of(enum gemm_product product, int N, int I, int O)
{
    struct gemm_plan p;
    switch (product) {
    case GEMM_FORWARD: /* y^T[O,N] = (w^T[I,O])^T x^T[I,N] */
        p.trans_a = 1, p.trans_b = 0, p.m = O, p.n = N, p.k = I, p.lda = I, p.ldb = I, p.ldc = O;
        break;
    case GEMM_INPUT_GRAD: /* dx^T[I,N] = w^T[I,O] dy^T[O,N] */
        p.trans_a = 0, p.trans_b = 0, p.m = I, p.n = N, p.k = O, p.lda = I, p.ldb = O, p.ldc = I;
        break;
    default: /* GEMM_WEIGHT_GRAD: dw^T[I,O] = x^T[I,N] (dy^T[O,N])^T */
        p.trans_a = 0, p.trans_b = 1, p.m = I, p.n = O, p.k = N, p.lda = I, p.ldb = O, p.ldc = I;
        break;
    }
    return p;
}

#endif
