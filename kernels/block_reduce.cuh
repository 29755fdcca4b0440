/* block_reduce: sums and maxima over a thread block, in a fixed order (each warp by
 * shuffles halving the distance, then warp 0 over the warps' results), so a block of a
 * given size gives the same value on every run. blockDim.x must be a multiple of 32 and
 * at most 1024; every thread of the block must call, and every thread gets the result. */
#ifndef ESFT_KERNELS_BLOCK_REDUCE_CUH
#define ESFT_KERNELS_BLOCK_REDUCE_CUH

template <typename T> struct reduce_sum {
    __device__ static T apply(T a, T b) { return a + b; }
    __device__ static T identity() { return (T)0; }
};

template <typename T> struct reduce_max {
    __device__ static T apply(T a, T b) { return a > b ? a : b; }
    __device__ static T identity() { return (T)-INFINITY; }
};

template <typename T, typename Op> __device__ T block_reduce(T value)
{
    __shared__ T warps[32];
    __shared__ T result;
    int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
    for (int step = 16; step > 0; step /= 2) value = Op::apply(value, __shfl_xor_sync(0xffffffffu, value, step));
    if (lane == 0) warps[warp] = value;
    __syncthreads();
    if (warp == 0) {
        value = lane < n_warps ? warps[lane] : Op::identity();
        for (int step = 16; step > 0; step /= 2)
            value = Op::apply(value, __shfl_xor_sync(0xffffffffu, value, step));
        if (lane == 0) result = value;
    }
    __syncthreads();
    value = result;
    __syncthreads(); /* the next call may overwrite result and warps */
    return value;
}

template <typename T> __device__ T block_sum(T value) { return block_reduce<T, reduce_sum<T> >(value); }
template <typename T> __device__ T block_max(T value) { return block_reduce<T, reduce_max<T> >(value); }

#endif
