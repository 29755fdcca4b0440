/* attention_flash: tiled causal attention within packed samples on the tensor cores (see
 * attention_flash.h), for the CUDA backend's tf32 and bf16 modes.
 *
 * Every product is mma.sync.m16n8k16 (bf16 in, fp32 accumulate), each warp owning 16 rows
 * of its block. The fragment layouts are the PTX ISA's ("Matrix fragments for
 * mma.m16n8k16 with floating point type"): with g = lane / 4 and t = lane % 4, A (16x16,
 * row-major) holds rows g and g + 8, columns 2t, 2t + 1 and 8 + 2t, 9 + 2t; B (16x8)
 * holds rows (k) 2t, 2t + 1 and 8 + 2t, 9 + 2t of column g; C (16x8) holds rows g and
 * g + 8, columns 2t, 2t + 1. Two adjacent C tiles of one row block are therefore one A
 * fragment (FlashAttention-2's trick), so probabilities go from the score product to the
 * value product without shared memory. Tiles are loaded from the fp32 inputs, rounded to
 * bf16 into shared memory, and a matrix whose B operand needs its other axis contiguous
 * (V, K, q, dout) is also stored transposed. Rows are padded by 8 bf16, so that the 32
 * lanes' 4-byte fragment loads fall in 32 different banks.
 *
 * Scores are kept in the log2 domain (scale * log2(e) folded into one factor) so that
 * every exponential is one exp2f; the log-sum-exp is stored in natural log. */
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <limits.h>
#include <math.h>
#include <stdio.h>

#include "attention_flash.h"

enum {
    FLASH_WARPS = 4,
    FLASH_THREADS = FLASH_WARPS * 32,
    FLASH_ROWS = FLASH_WARPS * 16, /* queries of a forward / dq block, keys of a dk-dv block */
    FLASH_TILE = 64,               /* keys per tile (forward, dq); queries per tile (dk-dv) */
    FLASH_PAD = 8,                 /* bf16 of padding after each shared-memory row */
};

#define FLASH_LOG2E 1.4426950408889634f
#define FLASH_LN2 0.6931471805599453f

/* ---- fragments -------------------------------------------------------------------- */

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi)
{
    __nv_bfloat162 p = __floats2bfloat162_rn(lo, hi); /* .x, the lower half, is lo */
    return *reinterpret_cast<uint32_t *>(&p);
}

__device__ __forceinline__ uint16_t to_bf16(float x)
{
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}

/* c (16x8) += a (16x16) b (16x8) */
__device__ __forceinline__ void mma(float c[4], const uint32_t a[4], const uint32_t b[2])
{
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

/* The A fragment of the 16x16 block at (row0, col0) of a row-major bf16 matrix m[.][ld]. */
__device__ __forceinline__ void load_a(uint32_t a[4], const uint16_t *m, int ld, int row0, int col0)
{
    int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const uint16_t *p = m + (row0 + g) * ld + col0 + 2 * t;
    a[0] = *reinterpret_cast<const uint32_t *>(p);
    a[1] = *reinterpret_cast<const uint32_t *>(p + 8 * ld);
    a[2] = *reinterpret_cast<const uint32_t *>(p + 8);
    a[3] = *reinterpret_cast<const uint32_t *>(p + 8 * ld + 8);
}

/* The B fragment of the 16x8 block (k from k0, n from n0) of a matrix stored n-major:
 * element (k, n) at m[n * ld + k]. */
__device__ __forceinline__ void load_b(uint32_t b[2], const uint16_t *m, int ld, int n0, int k0)
{
    int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const uint16_t *p = m + (n0 + g) * ld + k0 + 2 * t;
    b[0] = *reinterpret_cast<const uint32_t *>(p);
    b[1] = *reinterpret_cast<const uint32_t *>(p + 8);
}

/* The A fragment of k-chunk kk from C tiles c[2kk] and c[2kk + 1] of the same rows. */
__device__ __forceinline__ void a_from_c(uint32_t a[4], const float c0[4], const float c1[4])
{
    a[0] = pack_bf16(c0[0], c0[1]);
    a[1] = pack_bf16(c0[2], c0[3]);
    a[2] = pack_bf16(c1[0], c1[1]);
    a[3] = pack_bf16(c1[2], c1[3]);
}

/* c = A B for the warp's 16 rows: A rows [row0, row0 + 16) of the row-major bf16 tile
 * a[.][lda] over k = 16 KT, B the n-major bf16 tile b (element (k, n) at b[n * ldb + k]),
 * NT blocks of 8 output columns. */
template <int KT, int NT>
__device__ __forceinline__ void mma_rows(float c[NT][4], const uint16_t *a, int lda, int row0,
                                         const uint16_t *b, int ldb)
{
    for (int j = 0; j < NT; j++) c[j][0] = c[j][1] = c[j][2] = c[j][3] = 0.0f;
    for (int kk = 0; kk < KT; kk++) {
        uint32_t fa[4];
        load_a(fa, a, lda, row0, kk * 16);
        for (int j = 0; j < NT; j++) {
            uint32_t fb[2];
            load_b(fb, b, ldb, j * 8, kk * 16);
            mma(c[j], fa, fb);
        }
    }
}

/* c += P B: P the warp's 16 rows over k = 16 KT held as C fragments p[2 KT] (rounded to
 * bf16 as the A operand), B the n-major bf16 tile b[.][ldb], NT blocks of 8 columns. */
template <int KT, int NT>
__device__ __forceinline__ void mma_add_from_c(float c[NT][4], float p[2 * KT][4], const uint16_t *b,
                                               int ldb)
{
    for (int kk = 0; kk < KT; kk++) {
        uint32_t fa[4];
        a_from_c(fa, p[2 * kk], p[2 * kk + 1]);
        for (int n = 0; n < NT; n++) {
            uint32_t fb[2];
            load_b(fb, b, ldb, n * 8, kk * 16);
            mma(c[n], fa, fb);
        }
    }
}

/* Rows [row0, row0 + R) and columns [col, col + D) of a row-major fp32 matrix x[N][width],
 * rounded to bf16: into s[R][ld] when s, and transposed into st[D][ldt] when st. Rows at
 * or past N are zeros. width and col are multiples of 4, so each row is 16-byte aligned
 * when x is. */
template <int R, int D>
__device__ void load_tile(uint16_t *s, int ld, uint16_t *st, int ldt, const float *x, size_t width,
                          int col, int row0, int N)
{
    bool vector = (reinterpret_cast<uintptr_t>(x) & 15) == 0;
    for (int e = threadIdx.x; e < R * D / 4; e += FLASH_THREADS) {
        int r = e / (D / 4), c = e % (D / 4) * 4;
        float4 f = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (row0 + r < N) {
            const float *p = x + (size_t)(row0 + r) * width + col + c;
            if (vector)
                f = *reinterpret_cast<const float4 *>(p);
            else
                f = make_float4(p[0], p[1], p[2], p[3]);
        }
        if (s) {
            *reinterpret_cast<uint32_t *>(s + r * ld + c) = pack_bf16(f.x, f.y);
            *reinterpret_cast<uint32_t *>(s + r * ld + c + 2) = pack_bf16(f.z, f.w);
        }
        if (st) {
            st[(c + 0) * ldt + r] = to_bf16(f.x);
            st[(c + 1) * ldt + r] = to_bf16(f.y);
            st[(c + 2) * ldt + r] = to_bf16(f.z);
            st[(c + 3) * ldt + r] = to_bf16(f.w);
        }
    }
}

/* ---- forward ---------------------------------------------------------------------- */

template <int D> struct forward_smem {
    static constexpr int LD = D + FLASH_PAD, LDT = FLASH_TILE + FLASH_PAD;
    static constexpr size_t bytes =
        2 * ((size_t)FLASH_ROWS * LD + (size_t)FLASH_TILE * LD + (size_t)D * LDT);
};

/* Block (x = gridDim.x - 1 - blockIdx.x: queries [64 x, 64 x + 64); blockIdx.y: head h). Warp w
 * owns rows 16 w .. 16 w + 15; this thread rows g and g + 8 of them (r = 0, 1 below). The keys run
 * from the first query's sample start to the last query, in tiles of 64; the mask
 * (key j visible to query i when sample_start[i] <= j <= i) does the rest. With OUTPUT
 * false only lse is written (the backward's recomputation): no values are read. */
template <int D, bool OUTPUT>
__global__ void __launch_bounds__(FLASH_THREADS)
    flash_forward_kernel(float *out, float *lse, const float *q, const float *k, const float *v,
                         const int32_t *sample_start, int N, int nH, int nKV, float scale_log2)
{
    using S = forward_smem<D>;
    extern __shared__ __align__(16) unsigned char smem[];
    uint16_t *sq = reinterpret_cast<uint16_t *>(smem);
    uint16_t *sk = sq + FLASH_ROWS * S::LD;
    uint16_t *svt = sk + FLASH_TILE * S::LD;
    __shared__ int row_start[FLASH_ROWS];

    /* the last query blocks first: within a sample they see the most keys, so the long
     * blocks start early and the short ones fill in behind them */
    int q0 = (gridDim.x - 1 - blockIdx.x) * FLASH_ROWS, h = blockIdx.y, kvh = h / (nH / nKV);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    size_t qw = (size_t)nH * D, kvw = (size_t)nKV * D;

    load_tile<FLASH_ROWS, D>(sq, S::LD, nullptr, 0, q, qw, h * D, q0, N);
    for (int r = threadIdx.x; r < FLASH_ROWS; r += FLASH_THREADS)
        row_start[r] = q0 + r < N ? sample_start[q0 + r] : INT_MAX; /* INT_MAX: sees nothing */
    __syncthreads();

    int row[2] = {warp * 16 + g, warp * 16 + g + 8};
    int query[2] = {q0 + row[0], q0 + row[1]};
    int first[2] = {row_start[row[0]], row_start[row[1]]};
    int key_begin = row_start[0], key_end = min(q0 + FLASH_ROWS, N);

    float o[D / 8][4], m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    for (int n = 0; n < D / 8; n++) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;

    for (int k0 = key_begin; k0 < key_end; k0 += FLASH_TILE) {
        __syncthreads(); /* the last tile's readers are done */
        load_tile<FLASH_TILE, D>(sk, S::LD, nullptr, 0, k, kvw, kvh * D, k0, N);
        if (OUTPUT) load_tile<FLASH_TILE, D>(nullptr, 0, svt, S::LDT, v, kvw, kvh * D, k0, N);
        __syncthreads();

        /* s = q k^T (16 rows x 64 keys per warp) */
        float s[FLASH_TILE / 8][4];
        mma_rows<D / 16, FLASH_TILE / 8>(s, sq, S::LD, warp * 16, sk, S::LD);

        /* the mask, the scale, and each row's largest visible score */
        float tile_max[2] = {-INFINITY, -INFINITY};
        for (int j = 0; j < FLASH_TILE / 8; j++)
            for (int e = 0; e < 4; e++) {
                int r = e / 2, key = k0 + j * 8 + 2 * t + e % 2;
                bool seen = key >= first[r] && key <= query[r];
                s[j][e] = seen ? s[j][e] * scale_log2 : -INFINITY;
                tile_max[r] = fmaxf(tile_max[r], s[j][e]);
            }
        float shift[2];
        for (int r = 0; r < 2; r++) {
            /* the four lanes of a quad hold one row */
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
            tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
            float m_new = fmaxf(m[r], tile_max[r]);
            shift[r] = m_new == -INFINITY ? 0.0f : m_new; /* a row with nothing seen yet */
            float alpha = exp2f(m[r] - shift[r]);         /* 0 while m is -inf */
            m[r] = m_new;
            l[r] *= alpha;
            for (int n = 0; n < D / 8; n++) {
                o[n][2 * r] *= alpha;
                o[n][2 * r + 1] *= alpha;
            }
        }
        for (int j = 0; j < FLASH_TILE / 8; j++)
            for (int e = 0; e < 4; e++) {
                float p = exp2f(s[j][e] - shift[e / 2]); /* 0 where masked */
                s[j][e] = p;
                l[e / 2] += p; /* this lane's share; the quad's lanes are added at the end */
            }

        /* o += p v (16 rows x D per warp), p as the A operand straight from s */
        if (OUTPUT) mma_add_from_c<FLASH_TILE / 16, D / 8>(o, s, svt, S::LDT);
    }

    for (int r = 0; r < 2; r++) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        if (query[r] >= N) continue; /* every real row sees itself: l > 0 */
        if (OUTPUT) {
            float inv = 1.0f / l[r];
            float *dst = out + (size_t)query[r] * qw + (size_t)h * D + 2 * t;
            for (int n = 0; n < D / 8; n++) {
                dst[n * 8] = o[n][2 * r] * inv;
                dst[n * 8 + 1] = o[n][2 * r + 1] * inv;
            }
        }
        if (lse && t == 0) lse[(size_t)h * N + query[r]] = (m[r] + log2f(l[r])) * FLASH_LN2;
    }
}

/* ---- backward --------------------------------------------------------------------- */

/* delta[h, i] = <dout[i, h], out[i, h]> = sum_j P_ij dP_ij (the softmax backward's row
 * term), one warp per (token, head), in fp32. */
__global__ void flash_delta_kernel(float *delta, const float *dout, const float *out, int N, int nH,
                                   int Dh)
{
    long item = (long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (item >= (long)N * nH) return;
    int i = (int)(item / nH), h = (int)(item % nH), lane = threadIdx.x % 32;
    const float *a = dout + (size_t)i * nH * Dh + (size_t)h * Dh;
    const float *b = out + (size_t)i * nH * Dh + (size_t)h * Dh;
    float sum = 0.0f;
    for (int d = lane; d < Dh; d += 32) sum += a[d] * b[d];
    for (int step = 16; step > 0; step /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, step);
    if (lane == 0) delta[(size_t)h * N + i] = sum;
}

template <int D> struct dq_smem {
    static constexpr int LD = D + FLASH_PAD, LDT = FLASH_TILE + FLASH_PAD;
    static constexpr size_t bytes =
        2 * (2 * (size_t)FLASH_ROWS * LD + 2 * (size_t)FLASH_TILE * LD + (size_t)D * LDT);
};

/* dq for queries [64 x, 64 x + 64) (x counted from the last block) of head blockIdx.y: per key
 * tile, the probabilities p = exp(s - lse) again, dp = dout v^T, ds = p (dp - delta), dq += ds k;
 * dq = scale dq. */
template <int D>
__global__ void __launch_bounds__(FLASH_THREADS)
    flash_dq_kernel(float *dq, const float *dout, const float *q, const float *k, const float *v,
                    const float *lse, const float *delta, const int32_t *sample_start, int N,
                    int nH, int nKV, float scale)
{
    using S = dq_smem<D>;
    extern __shared__ __align__(16) unsigned char smem[];
    uint16_t *sq = reinterpret_cast<uint16_t *>(smem);
    uint16_t *sdo = sq + FLASH_ROWS * S::LD;
    uint16_t *sk = sdo + FLASH_ROWS * S::LD;
    uint16_t *sv = sk + FLASH_TILE * S::LD;
    uint16_t *skt = sv + FLASH_TILE * S::LD;
    __shared__ int row_start[FLASH_ROWS];

    /* the last query blocks first: within a sample they see the most keys, so the long
     * blocks start early and the short ones fill in behind them */
    int q0 = (gridDim.x - 1 - blockIdx.x) * FLASH_ROWS, h = blockIdx.y, kvh = h / (nH / nKV);
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    size_t qw = (size_t)nH * D, kvw = (size_t)nKV * D;
    float scale_log2 = scale * FLASH_LOG2E;

    load_tile<FLASH_ROWS, D>(sq, S::LD, nullptr, 0, q, qw, h * D, q0, N);
    load_tile<FLASH_ROWS, D>(sdo, S::LD, nullptr, 0, dout, qw, h * D, q0, N);
    for (int r = threadIdx.x; r < FLASH_ROWS; r += FLASH_THREADS)
        row_start[r] = q0 + r < N ? sample_start[q0 + r] : INT_MAX;
    __syncthreads();

    int row[2] = {warp * 16 + g, warp * 16 + g + 8};
    int query[2] = {q0 + row[0], q0 + row[1]};
    int first[2] = {row_start[row[0]], row_start[row[1]]};
    float row_lse[2], row_delta[2];
    for (int r = 0; r < 2; r++) {
        bool real = query[r] < N;
        row_lse[r] = real ? lse[(size_t)h * N + query[r]] * FLASH_LOG2E : 0.0f;
        row_delta[r] = real ? delta[(size_t)h * N + query[r]] : 0.0f;
    }
    int key_begin = row_start[0], key_end = min(q0 + FLASH_ROWS, N);

    float acc[D / 8][4];
    for (int n = 0; n < D / 8; n++) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;

    for (int k0 = key_begin; k0 < key_end; k0 += FLASH_TILE) {
        __syncthreads();
        load_tile<FLASH_TILE, D>(sk, S::LD, skt, S::LDT, k, kvw, kvh * D, k0, N);
        load_tile<FLASH_TILE, D>(sv, S::LD, nullptr, 0, v, kvw, kvh * D, k0, N);
        __syncthreads();

        float s[FLASH_TILE / 8][4], dp[FLASH_TILE / 8][4];
        mma_rows<D / 16, FLASH_TILE / 8>(s, sq, S::LD, warp * 16, sk, S::LD);
        mma_rows<D / 16, FLASH_TILE / 8>(dp, sdo, S::LD, warp * 16, sv, S::LD);
        for (int j = 0; j < FLASH_TILE / 8; j++)
            for (int e = 0; e < 4; e++) {
                int r = e / 2, key = k0 + j * 8 + 2 * t + e % 2;
                bool seen = key >= first[r] && key <= query[r];
                float p = seen ? exp2f(s[j][e] * scale_log2 - row_lse[r]) : 0.0f;
                s[j][e] = p * (dp[j][e] - row_delta[r]); /* ds */
            }
        mma_add_from_c<FLASH_TILE / 16, D / 8>(acc, s, skt, S::LDT);
    }

    for (int r = 0; r < 2; r++) {
        if (query[r] >= N) continue;
        float *dst = dq + (size_t)query[r] * qw + (size_t)h * D + 2 * t;
        for (int n = 0; n < D / 8; n++) {
            dst[n * 8] = acc[n][2 * r] * scale;
            dst[n * 8 + 1] = acc[n][2 * r + 1] * scale;
        }
    }
}

template <int D, int Q> struct dkdv_smem {
    static constexpr int LD = D + FLASH_PAD, LDT = Q + FLASH_PAD;
    static constexpr size_t bytes =
        2 * (2 * (size_t)FLASH_ROWS * LD + 2 * (size_t)Q * LD + 2 * (size_t)D * LDT);
};

/* dk, dv for keys [64 x, 64 x + 64) of KV head blockIdx.y, in the transposed problem: warp
 * w owns keys 16 w .. 16 w + 15 (the rows), the queries are the columns. For each query
 * head of the group, for each tile of Q queries from the block's first key to the last
 * query that sees its last key: p^T = exp(k q^T scale - lse), dv += p^T dout,
 * dp^T = v dout^T, ds^T = p^T (dp^T - delta), dk += ds^T q; dk = scale dk. */
template <int D, int Q>
__global__ void __launch_bounds__(FLASH_THREADS)
    flash_dkdv_kernel(float *dk, float *dv, const float *dout, const float *q, const float *k,
                      const float *v, const float *lse, const float *delta,
                      const int32_t *sample_start, int N, int nH, int nKV, float scale)
{
    using S = dkdv_smem<D, Q>;
    extern __shared__ __align__(16) unsigned char smem[];
    uint16_t *sk = reinterpret_cast<uint16_t *>(smem);
    uint16_t *sv = sk + FLASH_ROWS * S::LD;
    uint16_t *sq = sv + FLASH_ROWS * S::LD;
    uint16_t *sdo = sq + Q * S::LD;
    uint16_t *sqt = sdo + Q * S::LD;
    uint16_t *sdot = sqt + D * S::LDT;
    __shared__ int col_start[Q];
    __shared__ float col_lse[Q], col_delta[Q];

    int k0 = blockIdx.x * FLASH_ROWS, kvh = blockIdx.y, group = nH / nKV;
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    size_t qw = (size_t)nH * D, kvw = (size_t)nKV * D;
    float scale_log2 = scale * FLASH_LOG2E;
    int key[2] = {k0 + warp * 16 + g, k0 + warp * 16 + g + 8};
    int key_last = min(k0 + FLASH_ROWS, N) - 1;

    load_tile<FLASH_ROWS, D>(sk, S::LD, nullptr, 0, k, kvw, kvh * D, k0, N);
    load_tile<FLASH_ROWS, D>(sv, S::LD, nullptr, 0, v, kvw, kvh * D, k0, N);

    float acc_k[D / 8][4], acc_v[D / 8][4];
    for (int n = 0; n < D / 8; n++)
        for (int e = 0; e < 4; e++) acc_k[n][e] = acc_v[n][e] = 0.0f;

    for (int h = kvh * group; h < (kvh + 1) * group; h++)
        /* queries before k0 see none of these keys; sample_start is non-decreasing, so
         * once a tile's first query starts past the last key, no later query sees it */
        for (int q0 = k0; q0 < N && sample_start[q0] <= key_last; q0 += Q) {
            __syncthreads(); /* the last tile's readers are done (and sk, sv are loaded) */
            load_tile<Q, D>(sq, S::LD, sqt, S::LDT, q, qw, h * D, q0, N);
            load_tile<Q, D>(sdo, S::LD, sdot, S::LDT, dout, qw, h * D, q0, N);
            for (int c = threadIdx.x; c < Q; c += FLASH_THREADS) {
                int i = q0 + c;
                bool real = i < N;
                col_start[c] = real ? sample_start[i] : INT_MAX;
                col_lse[c] = real ? lse[(size_t)h * N + i] * FLASH_LOG2E : 0.0f;
                col_delta[c] = real ? delta[(size_t)h * N + i] : 0.0f;
            }
            __syncthreads();

            /* s^T = k q^T (16 keys x Q queries per warp), then p^T */
            float s[Q / 8][4];
            mma_rows<D / 16, Q / 8>(s, sk, S::LD, warp * 16, sq, S::LD);
            for (int j = 0; j < Q / 8; j++)
                for (int e = 0; e < 4; e++) {
                    int c = j * 8 + 2 * t + e % 2, i = q0 + c, kj = key[e / 2];
                    bool seen = kj >= col_start[c] && kj <= i;
                    s[j][e] = seen ? exp2f(s[j][e] * scale_log2 - col_lse[c]) : 0.0f;
                }

            /* dv += p^T dout */
            mma_add_from_c<Q / 16, D / 8>(acc_v, s, sdot, S::LDT);

            /* dp^T = v dout^T, ds^T = p^T (dp^T - delta) into s */
            float dp[Q / 8][4];
            mma_rows<D / 16, Q / 8>(dp, sv, S::LD, warp * 16, sdo, S::LD);
            for (int j = 0; j < Q / 8; j++)
                for (int e = 0; e < 4; e++) {
                    int c = j * 8 + 2 * t + e % 2;
                    s[j][e] *= dp[j][e] - col_delta[c];
                }

            /* dk += ds^T q */
            mma_add_from_c<Q / 16, D / 8>(acc_k, s, sqt, S::LDT);
        }

    for (int r = 0; r < 2; r++) {
        if (key[r] >= N) continue;
        size_t at = (size_t)key[r] * kvw + (size_t)kvh * D + 2 * t;
        for (int n = 0; n < D / 8; n++) {
            dk[at + n * 8] = acc_k[n][2 * r] * scale;
            dk[at + n * 8 + 1] = acc_k[n][2 * r + 1] * scale;
            dv[at + n * 8] = acc_v[n][2 * r];
            dv[at + n * 8 + 1] = acc_v[n][2 * r + 1];
        }
    }
}

/* ---- launchers -------------------------------------------------------------------- */

/* Queries per tile of the dk-dv kernel: 64 at Dh 64; 32 at Dh 128, where dk and dv's
 * accumulators alone take 128 registers a thread. */
template <int D> struct dkdv_queries {
    static constexpr int value = D == 128 ? 32 : 64;
};

static int report(const char *what, char *err, size_t err_size)
{
    cudaError_t status = cudaGetLastError();
    if (status == cudaSuccess) return 0;
    snprintf(err, err_size, "%s: %s", what, cudaGetErrorString(status));
    return -1;
}

static int check_shape(const char *op, int N, int nH, int nKV, int Dh, char *err, size_t err_size)
{
    if (!attention_flash_supports(Dh)) {
        snprintf(err, err_size, "%s: head width %d (the kernels are built for 64 and 128)", op, Dh);
        return -1;
    }
    if (N < 0 || nH < 1 || nKV < 1 || nH % nKV != 0) {
        snprintf(err, err_size, "%s: %d tokens, %d query heads, %d KV heads", op, N, nH, nKV);
        return -1;
    }
    return 0;
}

/* Shared memory past 48 KiB must be asked for, per kernel. */
template <typename Kernel>
static int allow_smem(Kernel kernel, size_t bytes, const char *what, char *err, size_t err_size)
{
    cudaError_t status =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes);
    if (status == cudaSuccess) return 0;
    snprintf(err, err_size, "%s: %zu bytes of shared memory: %s", what, bytes,
             cudaGetErrorString(status));
    return -1;
}

template <int D, bool OUTPUT>
static int forward(float *out, float *lse, const float *q, const float *k, const float *v,
                   const int32_t *sample_start, int N, int nH, int nKV, float scale, char *err,
                   size_t err_size)
{
    size_t bytes = forward_smem<D>::bytes;
    if (allow_smem(flash_forward_kernel<D, OUTPUT>, bytes, "attention flash forward", err,
                   err_size))
        return -1;
    dim3 grid((N + FLASH_ROWS - 1) / FLASH_ROWS, nH);
    flash_forward_kernel<D, OUTPUT><<<grid, FLASH_THREADS, bytes>>>(
        out, lse, q, k, v, sample_start, N, nH, nKV, scale * FLASH_LOG2E);
    return report("attention flash forward", err, err_size);
}

template <int D>
static int backward(float *dq, float *dk, float *dv, const float *dout, const float *q,
                    const float *k, const float *v, const float *lse, const float *delta,
                    const int32_t *sample_start, int N, int nH, int nKV, float scale, char *err,
                    size_t err_size)
{
    constexpr int Q = dkdv_queries<D>::value;
    size_t bytes = dkdv_smem<D, Q>::bytes;
    if (allow_smem(flash_dkdv_kernel<D, Q>, bytes, "attention flash dk dv", err, err_size))
        return -1;
    dim3 grid_kv((N + FLASH_ROWS - 1) / FLASH_ROWS, nKV);
    flash_dkdv_kernel<D, Q><<<grid_kv, FLASH_THREADS, bytes>>>(dk, dv, dout, q, k, v, lse, delta,
                                                               sample_start, N, nH, nKV, scale);
    if (report("attention flash dk dv", err, err_size)) return -1;
    bytes = dq_smem<D>::bytes;
    if (allow_smem(flash_dq_kernel<D>, bytes, "attention flash dq", err, err_size)) return -1;
    dim3 grid_q((N + FLASH_ROWS - 1) / FLASH_ROWS, nH);
    flash_dq_kernel<D><<<grid_q, FLASH_THREADS, bytes>>>(dq, dout, q, k, v, lse, delta,
                                                         sample_start, N, nH, nKV, scale);
    return report("attention flash dq", err, err_size);
}

extern "C" int attention_flash_supports(int Dh)
{
    return Dh == 64 || Dh == 128;
}

extern "C" size_t attention_flash_workspace(int N, int nH)
{
    return 2 * (size_t)(N > 0 ? N : 1) * (size_t)(nH > 0 ? nH : 1) * sizeof(float);
}

extern "C" int attention_flash_forward(float *out, float *lse, const float *q, const float *k,
                                       const float *v, const int32_t *sample_start, int N, int nH,
                                       int nKV, int Dh, float scale, char *err, size_t err_size)
{
    if (check_shape("attention flash forward", N, nH, nKV, Dh, err, err_size)) return -1;
    if (N == 0) return 0;
    if (Dh == 64)
        return forward<64, true>(out, lse, q, k, v, sample_start, N, nH, nKV, scale, err, err_size);
    return forward<128, true>(out, lse, q, k, v, sample_start, N, nH, nKV, scale, err, err_size);
}

extern "C" int attention_flash_backward(float *dq, float *dk, float *dv, const float *dout,
                                        const float *q, const float *k, const float *v,
                                        const float *out, const float *lse,
                                        const int32_t *sample_start, int N, int nH, int nKV, int Dh,
                                        float scale, void *workspace, char *err, size_t err_size)
{
    if (check_shape("attention flash backward", N, nH, nKV, Dh, err, err_size)) return -1;
    if (N == 0) return 0;
    float *own_lse = (float *)workspace, *delta = own_lse + (size_t)N * nH;
    if (!lse) {
        int failed = Dh == 64 ? forward<64, false>(NULL, own_lse, q, k, v, sample_start, N, nH, nKV,
                                                   scale, err, err_size)
                              : forward<128, false>(NULL, own_lse, q, k, v, sample_start, N, nH,
                                                    nKV, scale, err, err_size);
        if (failed) return -1;
        lse = own_lse;
    }
    long items = (long)N * nH;
    flash_delta_kernel<<<(unsigned)((items + 7) / 8), 256>>>(delta, dout, out, N, nH, Dh);
    if (report("attention flash delta", err, err_size)) return -1;
    if (Dh == 64)
        return backward<64>(dq, dk, dv, dout, q, k, v, lse, delta, sample_start, N, nH, nKV, scale,
                            err, err_size);
    return backward<128>(dq, dk, dv, dout, q, k, v, lse, delta, sample_start, N, nH, nKV, scale,
                         err, err_size);
}
