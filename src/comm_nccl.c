/* comm_nccl: the device-buffer half of comm (see comm.h and comm_device.h), CUDA build
 * only. One NCCL communicator and one non-blocking stream per group; every call
 * enqueues on that stream and synchronises it before returning, so callers may use the
 * buffer at once (comm.h's contract). comm.c has already checked types and ranks. */
/* HAVE_CUDA comes from config.h in the autotools build, or from -DHAVE_CUDA by hand. */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#ifdef HAVE_CUDA

#include <cuda_runtime.h>
#include <nccl.h>

#include "check_cuda.h"
#include "comm_device.h"
#include "log.h"

static ncclDataType_t nccl_type(enum comm_type type)
{
    switch (type) {
    case COMM_U8:
        return ncclUint8;
    case COMM_I32:
        return ncclInt32;
    case COMM_I64:
        return ncclInt64;
    case COMM_U64:
        return ncclUint64;
    case COMM_F32:
        return ncclFloat32;
    case COMM_F64:
        return ncclFloat64;
    case COMM_BF16:
        return ncclBfloat16;
    }
    fatal(EXIT_RUNTIME, "comm: unknown element type %d (programming error)", (int)type);
}

static ncclRedOp_t nccl_op(enum comm_op op)
{
    switch (op) {
    case COMM_SUM:
        return ncclSum;
    case COMM_MEAN:
        return ncclAvg;
    case COMM_MAX:
        return ncclMax;
    case COMM_MIN:
        return ncclMin;
    }
    fatal(EXIT_RUNTIME, "comm: unknown operation %d (programming error)", (int)op);
}

static ncclComm_t nccl_of(const struct comm *c)
{
    return (ncclComm_t)c->nccl;
}
static cudaStream_t stream_of(const struct comm *c)
{
    return (cudaStream_t)c->stream;
}

void comm_device_enable(struct comm *c)
{
    /* The id is made once, by the group's rank 0, and travels over the group's own MPI
     * communicator: every group gets its own NCCL communicator (DESIGN.md). */
    ncclUniqueId id;
    if (c->rank == 0) check_nccl(ncclGetUniqueId(&id));
    check_mpi(MPI_Bcast(&id, (int)sizeof id, MPI_BYTE, 0, c->mpi));
    /* A blocking stream (not cudaStreamNonBlocking): the kernels, cuBLAS and every
     * cudaMemcpy run on the legacy default stream, and a collective must start only after
     * the work that produced its buffer. A pageable host-to-device cudaMemcpy may return
     * before its DMA lands; only a blocking stream is ordered after it. The stream sync
     * after each call orders what follows. */
    cudaStream_t stream;
    check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamDefault));
    ncclComm_t nccl;
    check_nccl(ncclCommInitRank(&nccl, c->size, id, c->rank));
    c->nccl = nccl;
    c->stream = stream;
}

void comm_device_free(struct comm *c)
{
    if (c->nccl) check_nccl(ncclCommDestroy(nccl_of(c)));
    if (c->stream) check_cuda(cudaStreamDestroy(stream_of(c)));
    c->nccl = NULL;
    c->stream = NULL;
}

void comm_device_allreduce(const struct comm *c, void *buf, size_t count, enum comm_type type,
                           enum comm_op op)
{
    check_nccl(
        ncclAllReduce(buf, buf, count, nccl_type(type), nccl_op(op), nccl_of(c), stream_of(c)));
    check_cuda(cudaStreamSynchronize(stream_of(c)));
}

void comm_device_alltoallv(const struct comm *c, const void *send, const size_t *send_counts,
                           const size_t *send_offsets, void *recv, const size_t *recv_counts,
                           const size_t *recv_offsets, enum comm_type type)
{
    size_t element = comm_type_size(type);
    ncclDataType_t datatype = nccl_type(type);
    const char *send_bytes = send;
    char *recv_bytes = recv;
    /* One group: NCCL schedules every pair's send and receive together, so no ordering
     * between peers can deadlock. Zero counts post nothing. */
    check_nccl(ncclGroupStart());
    for (int peer = 0; peer < c->size; peer++) {
        if (send_counts[peer] > 0)
            check_nccl(ncclSend(send_bytes + send_offsets[peer] * element, send_counts[peer],
                                datatype, peer, nccl_of(c), stream_of(c)));
        if (recv_counts[peer] > 0)
            check_nccl(ncclRecv(recv_bytes + recv_offsets[peer] * element, recv_counts[peer],
                                datatype, peer, nccl_of(c), stream_of(c)));
    }
    check_nccl(ncclGroupEnd());
    check_cuda(cudaStreamSynchronize(stream_of(c)));
}

void comm_device_send(const struct comm *c, const void *buf, size_t count, enum comm_type type,
                      int peer)
{
    if (count == 0) return;
    check_nccl(ncclSend(buf, count, nccl_type(type), peer, nccl_of(c), stream_of(c)));
    check_cuda(cudaStreamSynchronize(stream_of(c)));
}

void comm_device_recv(const struct comm *c, void *buf, size_t count, enum comm_type type, int peer)
{
    if (count == 0) return;
    check_nccl(ncclRecv(buf, count, nccl_type(type), peer, nccl_of(c), stream_of(c)));
    check_cuda(cudaStreamSynchronize(stream_of(c)));
}

void comm_device_broadcast(const struct comm *c, void *buf, size_t count, enum comm_type type,
                           int root)
{
    check_nccl(ncclBroadcast(buf, buf, count, nccl_type(type), root, nccl_of(c), stream_of(c)));
    check_cuda(cudaStreamSynchronize(stream_of(c)));
}

#else
/* ISO C wants a translation unit to declare something; a typedef emits no code. */
typedef int comm_nccl_not_built;
#endif
