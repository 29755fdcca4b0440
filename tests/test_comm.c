/* test_comm: the MPI test of src/comm.c and layout_create, for any rank count (make
 * check runs it at np 1, 2, 3 and 4). Every expected value is computed here in closed
 * form or from the rank-order formula, independently of layout.c's arithmetic. The
 * host suite runs twice: with MPI's full counts, and with the chunk limit lowered to 3
 * elements so that the split paths (allreduce, broadcast, send/recv pieces, pairwise
 * all-to-all) run on small buffers. Device calls run only in a CUDA build that sees a
 * GPU per rank; otherwise they are skipped. */
/* HAVE_CUDA comes from config.h in the autotools build, or from -DHAVE_CUDA by hand. */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef HAVE_CUDA
#include <cuda_runtime.h>

#include "device.h"
#endif

#include "check.h"
#include "comm.h"
#include "layout.h"
#include "log.h"

static int world_rank, world_size;

/* ---- layout_create: group sizes and members for every (pp, ep) dividing the world ---- */

/* The world ranks of my group, in group order, gathered over the group itself. */
static int *members(const struct comm *group)
{
    int *ranks = calloc((size_t)group->size, sizeof *ranks);
    MPI_Allgather(&world_rank, 1, MPI_INT, ranks, 1, MPI_INT, group->mpi);
    return ranks;
}

static void check_group(const char *name, const struct comm *group, int size, int my_index,
                        const int *expected, int pp, int ep)
{
    CHECK(group->size == size, "pp %d ep %d: %s group has %d ranks, want %d", pp, ep, name,
          group->size, size);
    CHECK(group->rank == my_index, "pp %d ep %d: rank %d is %d in its %s group, want %d", pp, ep,
          world_rank, group->rank, name, my_index);
    if (group->size != size) return;
    int *got = members(group);
    for (int k = 0; k < size; k++)
        CHECK(got[k] == expected[k], "pp %d ep %d: rank %d's %s group[%d] is %d, want %d", pp, ep,
              world_rank, name, k, got[k], expected[k]);
    free(got);
}

static void test_layouts(void)
{
    for (int pp = 1; pp <= world_size; pp++)
        for (int ep = 1; ep <= world_size; ep++) {
            if (world_size % (pp * ep)) continue;
            struct layout_grid grid;
            char err[512];
            int rc = layout_grid_make(world_size, pp, ep, NULL, &grid, err, sizeof err);
            CHECK(rc == 0, "pp %d ep %d: %s", pp, ep, err);
            if (rc) continue;
            int dp = world_size / (pp * ep);
            /* world_rank = (pp_rank * dp + dp_rank) * ep + ep_rank, inverted. */
            int my_ep = world_rank % ep, my_dp = world_rank / ep % dp;
            int my_pp = world_rank / (ep * dp);
            struct layout layout;
            layout_create(&layout, &grid);
            CHECK(layout.world_rank == world_rank && layout.me.pp_rank == my_pp &&
                      layout.me.dp_rank == my_dp && layout.me.ep_rank == my_ep,
                  "pp %d ep %d: rank %d has coords (%d,%d,%d), want (%d,%d,%d)", pp, ep, world_rank,
                  layout.me.pp_rank, layout.me.dp_rank, layout.me.ep_rank, my_pp, my_dp, my_ep);
            int *expected = calloc((size_t)world_size, sizeof *expected);
            for (int k = 0; k < world_size; k++) expected[k] = k;
            check_group("world", &layout.world, world_size, world_rank, expected, pp, ep);
            /* stage: every dp*ep rank of my stage, in world order. */
            for (int k = 0; k < dp * ep; k++) expected[k] = my_pp * dp * ep + k;
            check_group("stage", &layout.stage, dp * ep, my_dp * ep + my_ep, expected, pp, ep);
            /* ep: the ep consecutive ranks of my dp slot. */
            for (int k = 0; k < ep; k++) expected[k] = (my_pp * dp + my_dp) * ep + k;
            check_group("ep", &layout.ep, ep, my_ep, expected, pp, ep);
            /* edp: my ep index in every dp replica of my stage. */
            for (int k = 0; k < dp; k++) expected[k] = (my_pp * dp + k) * ep + my_ep;
            check_group("edp", &layout.edp, dp, my_dp, expected, pp, ep);
            /* pp: my (dp, ep) slot in every stage. */
            for (int k = 0; k < pp; k++) expected[k] = (k * dp + my_dp) * ep + my_ep;
            check_group("pp", &layout.pp, pp, my_pp, expected, pp, ep);
            free(expected);
            layout_destroy(&layout);
            CHECK(layout.world.mpi == MPI_COMM_NULL && layout.ep.mpi == MPI_COMM_NULL,
                  "layout_destroy leaves communicators");
        }
}

/* ---- element access through double, exact for the values used here ---- */

static uint16_t to_bf16(float f)
{
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    return (uint16_t)(bits >> 16); /* the test only stores values exact in bf16 */
}

static float from_bf16(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static void put(enum comm_type type, void *buf, size_t i, double value)
{
    switch (type) {
    case COMM_U8:
        ((uint8_t *)buf)[i] = (uint8_t)value;
        break;
    case COMM_I32:
        ((int32_t *)buf)[i] = (int32_t)value;
        break;
    case COMM_I64:
        ((int64_t *)buf)[i] = (int64_t)value;
        break;
    case COMM_U64:
        ((uint64_t *)buf)[i] = (uint64_t)value;
        break;
    case COMM_F32:
        ((float *)buf)[i] = (float)value;
        break;
    case COMM_F64:
        ((double *)buf)[i] = value;
        break;
    case COMM_BF16:
        ((uint16_t *)buf)[i] = to_bf16((float)value);
        break;
    }
}

static double get(enum comm_type type, const void *buf, size_t i)
{
    switch (type) {
    case COMM_U8:
        return ((const uint8_t *)buf)[i];
    case COMM_I32:
        return ((const int32_t *)buf)[i];
    case COMM_I64:
        return (double)((const int64_t *)buf)[i];
    case COMM_U64:
        return (double)((const uint64_t *)buf)[i];
    case COMM_F32:
        return ((const float *)buf)[i];
    case COMM_F64:
        return ((const double *)buf)[i];
    case COMM_BF16:
        return from_bf16(((const uint16_t *)buf)[i]);
    }
    return 0.0;
}

static const char *type_names[] = {"u8", "i32", "i64", "u64", "f32", "f64", "bf16"};
static const char *op_names[] = {"sum", "mean", "max", "min"};

/* ---- allreduce ---- */

/* Rank r holds sign(i) * (r+1) * (i+1) * scale at i: sign -1 at odd i for signed types,
 * scale 2^33 for 64-bit integers (values beyond 32 bits). With n ranks and S = n(n+1)/2:
 *   sum = sign*S*(i+1)*scale, mean = sign*(n+1)/2*(i+1), and max/min are the n or 1
 *   multiples, swapped where the sign is negative. Counts stay small so that every bf16
 *   partial sum is an integer below 256, exact in bf16's 8 significant bits. */
static void test_allreduce_one(const struct comm *world, enum comm_type type, enum comm_op op)
{
    const size_t count = 10;
    int is_signed = type != COMM_U64 && type != COMM_U8;
    double scale = (type == COMM_I64 || type == COMM_U64) ? 8589934592.0 : 1.0;
    void *buf = calloc(count, comm_type_size(type));
    for (size_t i = 0; i < count; i++) {
        double sign = (is_signed && i % 2) ? -1.0 : 1.0;
        put(type, buf, i, sign * (world_rank + 1) * (double)(i + 1) * scale);
    }
    comm_allreduce(world, buf, count, type, op, COMM_HOST);
    double n = world_size, sum_ranks = n * (n + 1) / 2;
    for (size_t i = 0; i < count; i++) {
        double sign = (is_signed && i % 2) ? -1.0 : 1.0, v = (double)(i + 1) * scale, want = 0;
        switch (op) {
        case COMM_SUM:
            want = sign * sum_ranks * v;
            break;
        case COMM_MEAN:
            want = sign * (n + 1) / 2 * v;
            break;
        case COMM_MAX:
            want = sign > 0 ? n * v : -v;
            break;
        case COMM_MIN:
            want = sign > 0 ? v : -n * v;
            break;
        }
        /* bf16 mean can be inexact ((n+1)/2*(i+1) needs more than 8 bits for some n). */
        double tol = type == COMM_BF16 ? 1.0 / 128 : type == COMM_F32 ? 1e-6 : 0.0;
        double got = get(type, buf, i);
        CHECK(tol > 0 ? check_close(got, want, tol, 0.0) : got == want,
              "allreduce %s %s [%zu]: got %.17g, want %.17g", type_names[type], op_names[op], i,
              got, want);
    }
    free(buf);
}

static void test_allreduce(const struct comm *world)
{
    enum comm_type types[] = {COMM_I32, COMM_I64, COMM_U64, COMM_F32, COMM_F64, COMM_BF16};
    enum comm_op ops[] = {COMM_SUM, COMM_MEAN, COMM_MAX, COMM_MIN};
    for (size_t t = 0; t < sizeof types / sizeof types[0]; t++)
        for (size_t o = 0; o < sizeof ops / sizeof ops[0]; o++) {
            int floating = types[t] == COMM_F32 || types[t] == COMM_F64 || types[t] == COMM_BF16;
            if (ops[o] == COMM_MEAN && !floating) continue; /* a fatal programming error */
            test_allreduce_one(world, types[t], ops[o]);
        }

    /* u64 above 2^63 must compare as unsigned: rank r holds 2^63 + r. */
    uint64_t big[2] = {UINT64_C(1) << 63, UINT64_C(1) << 63};
    big[0] += (uint64_t)world_rank;
    big[1] += (uint64_t)world_rank;
    comm_allreduce(world, &big[0], 1, COMM_U64, COMM_MAX, COMM_HOST);
    comm_allreduce(world, &big[1], 1, COMM_U64, COMM_MIN, COMM_HOST);
    CHECK(big[0] == (UINT64_C(1) << 63) + (uint64_t)(world_size - 1) && big[1] == UINT64_C(1) << 63,
          "u64 max/min above 2^63: %llu %llu", (unsigned long long)big[0],
          (unsigned long long)big[1]);

    /* u8 sums wrap modulo 256 like C's own arithmetic: rank r holds 100 + r. */
    uint8_t small = (uint8_t)(100 + world_rank);
    comm_allreduce(world, &small, 1, COMM_U8, COMM_SUM, COMM_HOST);
    CHECK(small == (uint8_t)(100 * world_size + world_size * (world_size - 1) / 2), "u8 sum: %d",
          small);

    /* bf16 rounds each partial sum to nearest even. Rank 0 holds a, rank 1 b, the rest
     * zeros, so whatever order MPI adds in, the one inexact addition is a + b:
     * 256 + 1 = 257 is a tie between 256 and 258 -> 256 (even); 256 + 3 = 259 -> 260;
     * 258 + 2.5 = 260.5 -> 260; 1 + 2^-8 -> 1 (tie, even). */
    if (world_size >= 2) {
        float a[4] = {256, 256, 258, 1}, b[4] = {1, 3, 2.5f, 1.0f / 256};
        float want[4] = {256, 260, 260, 1};
        uint16_t x[4];
        for (int i = 0; i < 4; i++)
            x[i] = to_bf16(world_rank == 0 ? a[i] : world_rank == 1 ? b[i] : 0.0f);
        comm_allreduce(world, x, 4, COMM_BF16, COMM_SUM, COMM_HOST);
        for (int i = 0; i < 4; i++)
            CHECK(from_bf16(x[i]) == want[i], "bf16 rounding [%d]: got %g, want %g", i,
                  from_bf16(x[i]), want[i]);
    }

    /* A count of zero is a no-op, even with a NULL buffer. */
    comm_allreduce(world, NULL, 0, COMM_F32, COMM_SUM, COMM_HOST);
}

/* ---- alltoallv ---- */

/* Rank i sends (i+j)%3 * scale elements to rank j, valued src*1000000 + dst*1000 + idx.
 * Send and receive blocks are laid out in reverse peer order with a one-element gap
 * before each, so offsets are neither zero nor packed; gaps must stay untouched. */
static void test_alltoallv(const struct comm *world, int scale, enum comm_type type,
                           enum comm_memory memory)
{
    int n = world_size, me = world_rank;
    size_t *send_counts = calloc((size_t)n, sizeof(size_t)),
           *send_offsets = calloc((size_t)n, sizeof(size_t)),
           *recv_counts = calloc((size_t)n, sizeof(size_t)),
           *recv_offsets = calloc((size_t)n, sizeof(size_t));
    size_t send_total = 0, recv_total = 0;
    for (int j = n - 1; j >= 0; j--) {
        send_counts[j] = (size_t)((me + j) % 3 * scale);
        recv_counts[j] = (size_t)((j + me) % 3 * scale);
        send_offsets[j] = send_total + 1;
        recv_offsets[j] = recv_total + 1;
        send_total += send_counts[j] + 1;
        recv_total += recv_counts[j] + 1;
    }
    size_t element = comm_type_size(type);
    char *send = calloc(send_total, element), *recv = calloc(recv_total, element);
    for (size_t k = 0; k < recv_total; k++) put(type, recv, k, -1);
    for (int j = 0; j < n; j++)
        for (size_t idx = 0; idx < send_counts[j]; idx++)
            put(type, send, send_offsets[j] + idx, me * 1000000.0 + j * 1000.0 + (double)idx);
    if (memory == COMM_HOST) {
        comm_alltoallv(world, send, send_counts, send_offsets, recv, recv_counts, recv_offsets,
                       type, COMM_HOST);
    } else {
#ifdef HAVE_CUDA
        void *send_device, *recv_device;
        cudaMalloc(&send_device, send_total * element);
        cudaMalloc(&recv_device, recv_total * element);
        cudaMemcpy(send_device, send, send_total * element, cudaMemcpyHostToDevice);
        cudaMemcpy(recv_device, recv, recv_total * element, cudaMemcpyHostToDevice);
        comm_alltoallv(world, send_device, send_counts, send_offsets, recv_device, recv_counts,
                       recv_offsets, type, COMM_DEVICE);
        cudaMemcpy(recv, recv_device, recv_total * element, cudaMemcpyDeviceToHost);
        cudaFree(send_device);
        cudaFree(recv_device);
#endif
    }
    for (int j = 0; j < n; j++) {
        CHECK(get(type, recv, recv_offsets[j] - 1) == -1, "alltoallv x%d: gap before %d written",
              scale, j);
        for (size_t idx = 0; idx < recv_counts[j]; idx++) {
            double want = j * 1000000.0 + me * 1000.0 + (double)idx;
            double got = get(type, recv, recv_offsets[j] + idx);
            CHECK(got == want, "alltoallv %s x%d: from %d [%zu]: got %.0f, want %.0f",
                  type_names[type], scale, j, idx, got, want);
        }
    }
    free(send);
    free(recv);
    free(send_counts);
    free(send_offsets);
    free(recv_counts);
    free(recv_offsets);
}

/* ---- send/recv ring, broadcast, barrier ---- */

static void test_ring(const struct comm *world, size_t count)
{
    int next = (world_rank + 1) % world_size, prev = (world_rank + world_size - 1) % world_size;
    int64_t *out = calloc(count + 1, sizeof *out), *in = calloc(count + 1, sizeof *in);
    for (size_t i = 0; i < count; i++) out[i] = (int64_t)world_rank * 1000 + (int64_t)i;
    in[count] = -7; /* guard: a receive must not write past count */
    /* Even ranks send first, odd ranks receive first, so blocking sends cannot all wait
     * on each other (one rank sends to itself: MPI buffers short messages). */
    if (world_rank % 2 == 0) {
        comm_send(world, out, count, COMM_I64, next, 5, COMM_HOST);
        comm_recv(world, in, count, COMM_I64, prev, 5, COMM_HOST);
    } else {
        comm_recv(world, in, count, COMM_I64, prev, 5, COMM_HOST);
        comm_send(world, out, count, COMM_I64, next, 5, COMM_HOST);
    }
    for (size_t i = 0; i < count; i++)
        CHECK(in[i] == (int64_t)prev * 1000 + (int64_t)i, "ring %zu: [%zu] = %lld from %d", count,
              i, (long long)in[i], prev);
    CHECK(in[count] == -7, "ring %zu: received past count", count);
    free(out);
    free(in);
}

static void test_broadcast(const struct comm *world)
{
    int root = world_size - 1;
    double values[11];
    uint8_t bytes[5];
    for (int i = 0; i < 11; i++) values[i] = world_rank == root ? 0.5 * i - 2 : -99.0;
    for (int i = 0; i < 5; i++) bytes[i] = (uint8_t)(world_rank == root ? 200 + i : 0);
    comm_broadcast(world, values, 11, COMM_F64, root, COMM_HOST);
    comm_broadcast(world, bytes, 5, COMM_U8, root, COMM_HOST);
    for (int i = 0; i < 11; i++)
        CHECK(values[i] == 0.5 * i - 2, "broadcast f64 [%d] = %g", i, values[i]);
    for (int i = 0; i < 5; i++) CHECK(bytes[i] == 200 + i, "broadcast u8 [%d] = %d", i, bytes[i]);
}

static void test_host(const struct comm *world)
{
    test_allreduce(world);
    test_alltoallv(world, 1, COMM_I32, COMM_HOST);
    test_alltoallv(world, 4, COMM_F64, COMM_HOST);
    test_ring(world, 7);
    test_ring(world, 0);
    test_broadcast(world);
    comm_barrier(world);
}

/* ---- device calls: CUDA build, one visible GPU per rank on the node ---- */

#ifdef HAVE_CUDA
static int device_usable(void)
{
    MPI_Comm node;
    int local_rank, local_size, devices = 0;
    MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node);
    MPI_Comm_rank(node, &local_rank);
    MPI_Comm_size(node, &local_size);
    MPI_Comm_free(&node);
    devices = device_count(); /* 0: no driver or no device; < 0: a driver CUDA cannot use */
    CHECK(devices >= 0, "rank %d: CUDA cannot count the devices (an old driver?)", world_rank);
    if (devices < 0) {
        device_print_info(stderr);
        devices = 0;
    }
    /* NCCL refuses two ranks of one communicator on one GPU. */
    int ok = devices >= local_size, all = 0;
    MPI_Allreduce(&ok, &all, 1, MPI_INT, MPI_LAND, MPI_COMM_WORLD);
    if (all) cudaSetDevice(local_rank);
    return all;
}

/* The NCCL stream must run after the work already queued on the legacy default stream,
 * where the kernels, cuBLAS and cudaMemset run: an asynchronous memset of 256 MiB, then at
 * once an all-to-all out of the buffer it writes. On a stream not ordered after the
 * memset (cudaStreamNonBlocking), NCCL would read what was there before. */
static void test_device_ordering(struct comm *world)
{
    const size_t count = (size_t)64 << 20; /* int32 elements, divided among the ranks */
    size_t per_rank = count / (size_t)world_size,
           bytes = per_rank * (size_t)world_size * sizeof(int32_t);
    void *send = NULL, *recv = NULL;
    CHECK(cudaMalloc(&send, bytes) == cudaSuccess && cudaMalloc(&recv, bytes) == cudaSuccess,
          "cudaMalloc of 2 x %zu bytes", bytes);
    if (!send || !recv) {
        cudaFree(send), cudaFree(recv);
        return;
    }
    size_t *counts = xmalloc((size_t)world_size * sizeof(size_t)),
           *offsets = xmalloc((size_t)world_size * sizeof(size_t));
    for (int r = 0; r < world_size; r++) counts[r] = per_rank, offsets[r] = (size_t)r * per_rank;
    CHECK(cudaMemset(send, 0, bytes) == cudaSuccess && cudaMemset(recv, 0, bytes) == cudaSuccess &&
              cudaDeviceSynchronize() == cudaSuccess,
          "cudaMemset");
    CHECK(cudaMemsetAsync(send, 0x41, bytes, 0) == cudaSuccess, "cudaMemsetAsync");
    comm_alltoallv(world, send, counts, offsets, recv, counts, offsets, COMM_I32, COMM_DEVICE);
    int32_t *host = xmalloc(bytes);
    CHECK(cudaMemcpy(host, recv, bytes, cudaMemcpyDeviceToHost) == cudaSuccess, "cudaMemcpy");
    size_t stale = 0;
    for (size_t i = 0; i < per_rank * (size_t)world_size; i++) stale += host[i] != 0x41414141;
    CHECK(stale == 0,
          "device all-to-all after an asynchronous memset on the default stream: %zu of "
          "%zu elements stale",
          stale, per_rank * (size_t)world_size);
    free(host), free(counts), free(offsets);
    cudaFree(send), cudaFree(recv);
}

static void test_device(struct comm *world)
{
    comm_enable_device(world);
    CHECK(world->nccl != NULL && world->stream != NULL, "comm_enable_device set no handles");
    const size_t count = 10;
    float host[10], *dev;
    cudaMalloc((void **)&dev, count * sizeof *dev);
    for (size_t i = 0; i < count; i++) host[i] = (float)((world_rank + 1) * (i + 1));
    cudaMemcpy(dev, host, sizeof host, cudaMemcpyHostToDevice);
    comm_allreduce(world, dev, count, COMM_F32, COMM_MEAN, COMM_DEVICE);
    cudaMemcpy(host, dev, sizeof host, cudaMemcpyDeviceToHost);
    for (size_t i = 0; i < count; i++)
        CHECK(check_close(host[i], (world_size + 1) / 2.0 * (double)(i + 1), 1e-6, 0),
              "device mean [%zu] = %g", i, host[i]);
    for (size_t i = 0; i < count; i++) host[i] = world_rank == 0 ? (float)i : -1.0f;
    cudaMemcpy(dev, host, sizeof host, cudaMemcpyHostToDevice);
    comm_broadcast(world, dev, count, COMM_F32, 0, COMM_DEVICE);
    cudaMemcpy(host, dev, sizeof host, cudaMemcpyDeviceToHost);
    for (size_t i = 0; i < count; i++)
        CHECK(host[i] == (float)i, "device broadcast [%zu] = %g", i, host[i]);
    cudaFree(dev);
    test_alltoallv(world, 1, COMM_I32, COMM_DEVICE);
    test_alltoallv(world, 4, COMM_I64, COMM_DEVICE);
    test_device_ordering(world);
}
#endif

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world_size);
    log_init(world_rank, world_size);

    test_layouts();

    MPI_Comm dup;
    MPI_Comm_dup(MPI_COMM_WORLD, &dup);
    struct comm world;
    comm_init(&world, dup);
    CHECK(world.rank == world_rank && world.size == world_size && world.nccl == NULL,
          "comm_init: rank %d size %d", world.rank, world.size);

    test_host(&world);
    size_t full = comm_set_chunk_limit(3);
    test_host(&world);
    comm_set_chunk_limit(full);

    if (comm_device_supported()) {
#ifdef HAVE_CUDA
        if (device_usable())
            test_device(&world);
        else if (world_rank == 0)
            printf("test_comm: device calls skipped (no GPU per rank)\n");
#endif
    } else if (world_rank == 0) {
        printf("test_comm: device calls skipped (host-only build)\n");
    }
    comm_free(&world);
    CHECK(world.mpi == MPI_COMM_NULL, "comm_free leaves the communicator");

    /* The exit status must fail on every rank if any rank failed; only rank 0 prints the
     * summary (each rank has already printed its own failed checks). */
    int local[2] = {check_count_, check_failed_}, total[2] = {0, 0};
    MPI_Allreduce(local, total, 2, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    MPI_Finalize();
    if (world_rank != 0) return total[1] ? 1 : 0;
    check_count_ = total[0];
    check_failed_ = total[1];
    char name[64];
    snprintf(name, sizeof name, "test_comm (np %d)", world_size);
    return check_done(name);
}
