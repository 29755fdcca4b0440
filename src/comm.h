/* comm: collectives over one group of ranks, on host buffers (MPI) and, in the CUDA
 * build, on device buffers (NCCL). Every call is collective over the group unless it
 * says otherwise; counts are in elements. Callers never see MPI or NCCL types except
 * the MPI communicator a group is built from.
 *
 * Device buffers: a group must be enabled for device use first (comm_enable_device),
 * which creates the group's NCCL communicator from a unique id broadcast over its MPI
 * communicator. Device calls are enqueued on the group's stream and the call returns
 * after the stream is synchronised, so the caller may read the buffer at once. */
#ifndef ESFT_COMM_H
#define ESFT_COMM_H

#include <mpi.h>
#include <stdbool.h>
#include <stddef.h>

enum comm_type { COMM_U8, COMM_I32, COMM_I64, COMM_U64, COMM_F32, COMM_F64, COMM_BF16 };
enum comm_op { COMM_SUM, COMM_MEAN, COMM_MAX, COMM_MIN };
enum comm_memory { COMM_HOST, COMM_DEVICE };

struct comm {
    MPI_Comm mpi; /* owned: freed by comm_free */
    int rank;     /* this rank's index in the group */
    int size;     /* ranks in the group */
    void *nccl;   /* ncclComm_t once comm_enable_device succeeded, else NULL */
    void *stream; /* cudaStream_t of the group's device calls, else NULL */
};

/* Takes ownership of mpi (a communicator from MPI_Comm_split or MPI_Comm_dup). */
void comm_init(struct comm *c, MPI_Comm mpi);
void comm_free(struct comm *c);

/* True when this build can move device buffers (CUDA build). */
bool comm_device_supported(void);
/* Collective: create the group's NCCL communicator on the current CUDA device. */
void comm_enable_device(struct comm *c);

size_t comm_type_size(enum comm_type type);

/* In place. COMM_MEAN divides the sum by the group size (floating types only). */
void comm_allreduce(const struct comm *c, void *buf, size_t count, enum comm_type type,
                    enum comm_op op, enum comm_memory memory);

/* Rank i sends send_counts[j] elements from send + send_offsets[j] to rank j, and
 * receives recv_counts[j] elements from rank j into recv + recv_offsets[j]. Offsets in
 * elements. Counts may be zero. */
void comm_alltoallv(const struct comm *c, const void *send, const size_t *send_counts,
                    const size_t *send_offsets, void *recv, const size_t *recv_counts,
                    const size_t *recv_offsets, enum comm_type type, enum comm_memory memory);

/* Point to point (not collective). tag is ignored for device buffers (NCCL orders
 * messages between a pair of ranks by call order). Host tags are in [0, COMM_TAG_MAX]:
 * the tag above it is reserved for the chunked all-to-all. */
#define COMM_TAG_MAX 32766
void comm_send(const struct comm *c, const void *buf, size_t count, enum comm_type type,
               int peer, int tag, enum comm_memory memory);
void comm_recv(const struct comm *c, void *buf, size_t count, enum comm_type type, int peer,
               int tag, enum comm_memory memory);

/* A send that returns at once (host buffers; on device buffers it completes before it
 * returns, NCCL ordering sends by call order). buf must stay untouched until
 * comm_wait(request). Lets a pipeline schedule post its sends and go on to its next
 * receive, so no two stages wait on each other's sends. */
enum { COMM_REQUEST_INLINE = 4 };
struct comm_request {
    MPI_Request *pieces; /* one per chunk of at most the chunk limit: inline, or allocated
                          * for a message of more than COMM_REQUEST_INLINE chunks */
    int n;
    MPI_Request inline_pieces[COMM_REQUEST_INLINE];
};
void comm_send_start(const struct comm *c, const void *buf, size_t count, enum comm_type type,
                     int peer, int tag, enum comm_memory memory, struct comm_request *request);
/* Waits for a comm_send_start to complete (a request with n == 0: returns at once). */
void comm_wait(struct comm_request *request);

void comm_broadcast(const struct comm *c, void *buf, size_t count, enum comm_type type,
                    int root, enum comm_memory memory);
void comm_barrier(const struct comm *c);

/* Tests only: the most elements one MPI call carries (default INT_MAX, MPI's count
 * type); longer host transfers are split into pieces of at most this many. Returns the
 * previous limit. Not collective: every rank must set the same value. */
size_t comm_set_chunk_limit(size_t elements);

#endif
