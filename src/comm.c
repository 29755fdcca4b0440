/* comm: collectives of one rank group (see comm.h), for layout.c and every phase that
 * reduces gradients, exchanges tokens or passes activations. Host buffers go through
 * MPI; device buffers are handed to comm_nccl.c (CUDA build only).
 *
 * Counts are size_t but MPI counts are int, so every host transfer is split into pieces
 * of at most chunk_limit elements (INT_MAX by default). The all-to-all-v uses one
 * MPI_Alltoallv when every count and offset fits on every rank (one small agreement
 * allreduce decides), and otherwise pairwise non-blocking sends and receives in pieces,
 * so any size works. */
/* HAVE_CUDA comes from config.h in the autotools build, or from -DHAVE_CUDA by hand. */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif

#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "comm.h"
#include "comm_device.h"
#include "log.h"

/* The tag of the pieces of a chunked all-to-all; user tags stay below it (comm.h). */
#define COMM_TAG_ALLTOALLV (COMM_TAG_MAX + 1)

/* Groups up to this size use stack arrays for MPI_Alltoallv's int counts, so the step
 * loop does not allocate; larger groups allocate per call. */
#define COMM_STACK_PEERS 64

static size_t chunk_limit = INT_MAX;

size_t comm_set_chunk_limit(size_t elements)
{
    if (elements < 1 || elements > INT_MAX)
        fatal(EXIT_RUNTIME, "comm_set_chunk_limit: %zu is outside [1, INT_MAX]", elements);
    size_t previous = chunk_limit;
    chunk_limit = elements;
    return previous;
}

void comm_init(struct comm *c, MPI_Comm mpi)
{
    memset(c, 0, sizeof *c);
    c->mpi = mpi;
    /* Errors come back as codes so check_mpi names the call, file and line. */
    check_mpi(MPI_Comm_set_errhandler(mpi, MPI_ERRORS_RETURN));
    check_mpi(MPI_Comm_rank(mpi, &c->rank));
    check_mpi(MPI_Comm_size(mpi, &c->size));
}

void comm_free(struct comm *c)
{
#ifdef HAVE_CUDA
    comm_device_free(c);
#endif
    if (c->mpi != MPI_COMM_NULL) check_mpi(MPI_Comm_free(&c->mpi));
    c->mpi = MPI_COMM_NULL;
    c->nccl = NULL;
    c->stream = NULL;
    c->rank = 0;
    c->size = 0;
}

bool comm_device_supported(void)
{
#ifdef HAVE_CUDA
    return true;
#else
    return false;
#endif
}

void comm_enable_device(struct comm *c)
{
#ifdef HAVE_CUDA
    if (c->nccl) return;
    comm_device_enable(c);
#else
    (void)c;
    fatal(EXIT_RUNTIME, "comm_enable_device: device buffers need the CUDA build");
#endif
}

/* A device call on a build or group that cannot make it is a programming error. */
static void require_device(const struct comm *c, const char *what)
{
#ifdef HAVE_CUDA
    if (!c->nccl)
        fatal(EXIT_RUNTIME,
              "%s: device buffer on a group without comm_enable_device (programming error)", what);
#else
    (void)c;
    fatal(EXIT_RUNTIME, "%s: device buffers need the CUDA build", what);
#endif
}

static const char *type_name(enum comm_type type)
{
    switch (type) {
    case COMM_U8:
        return "u8";
    case COMM_I32:
        return "i32";
    case COMM_I64:
        return "i64";
    case COMM_U64:
        return "u64";
    case COMM_F32:
        return "f32";
    case COMM_F64:
        return "f64";
    case COMM_BF16:
        return "bf16";
    }
    return "unknown";
}

size_t comm_type_size(enum comm_type type)
{
    switch (type) {
    case COMM_U8:
        return 1;
    case COMM_I32:
        return 4;
    case COMM_I64:
        return 8;
    case COMM_U64:
        return 8;
    case COMM_F32:
        return 4;
    case COMM_F64:
        return 8;
    case COMM_BF16:
        return 2;
    }
    fatal(EXIT_RUNTIME, "comm: unknown element type %d (programming error)", (int)type);
}

static bool type_is_floating(enum comm_type type)
{
    return type == COMM_F32 || type == COMM_F64 || type == COMM_BF16;
}

/* bf16 travels as its uint16 storage; arithmetic on it goes through bf16_ops below. */
static MPI_Datatype mpi_type(enum comm_type type)
{
    switch (type) {
    case COMM_U8:
        return MPI_UINT8_T;
    case COMM_I32:
        return MPI_INT32_T;
    case COMM_I64:
        return MPI_INT64_T;
    case COMM_U64:
        return MPI_UINT64_T;
    case COMM_F32:
        return MPI_FLOAT;
    case COMM_F64:
        return MPI_DOUBLE;
    case COMM_BF16:
        return MPI_UINT16_T;
    }
    fatal(EXIT_RUNTIME, "comm: unknown element type %d (programming error)", (int)type);
}

/* ---- bfloat16 on the host: the top 16 bits of an IEEE float ---- */

static float bf16_to_float(uint16_t h)
{
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Round to nearest, ties to even: add 0x7fff plus the lowest kept bit, then truncate.
 * NaN is kept a (quiet) NaN, since the carry could otherwise turn it into infinity. */
static uint16_t float_to_bf16(float f)
{
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu))
        return (uint16_t)((bits >> 16) | 0x0040u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return (uint16_t)(bits >> 16);
}

/* MPI user functions: inout[i] = in[i] (op) inout[i], each result rounded to bf16, as a
 * device reduction in bf16 would do. */
static void bf16_sum(void *in, void *inout, int *len, MPI_Datatype *type)
{
    (void)type;
    const uint16_t *a = in;
    uint16_t *b = inout;
    for (int i = 0; i < *len; i++) b[i] = float_to_bf16(bf16_to_float(a[i]) + bf16_to_float(b[i]));
}

static void bf16_max(void *in, void *inout, int *len, MPI_Datatype *type)
{
    (void)type;
    const uint16_t *a = in;
    uint16_t *b = inout;
    for (int i = 0; i < *len; i++)
        if (bf16_to_float(a[i]) > bf16_to_float(b[i])) b[i] = a[i];
}

static void bf16_min(void *in, void *inout, int *len, MPI_Datatype *type)
{
    (void)type;
    const uint16_t *a = in;
    uint16_t *b = inout;
    for (int i = 0; i < *len; i++)
        if (bf16_to_float(a[i]) < bf16_to_float(b[i])) b[i] = a[i];
}

/* Created on first use (MPI_Op_create is local, not collective) and kept until
 * MPI_Finalize, which releases them. */
static MPI_Op bf16_ops[3] = {MPI_OP_NULL, MPI_OP_NULL, MPI_OP_NULL};

static MPI_Op mpi_op(enum comm_type type, enum comm_op op)
{
    /* MEAN is a SUM followed by a division. */
    int index = op == COMM_MAX ? 1 : op == COMM_MIN ? 2 : 0;
    if (type != COMM_BF16) return index == 1 ? MPI_MAX : index == 2 ? MPI_MIN : MPI_SUM;
    if (bf16_ops[index] == MPI_OP_NULL) {
        MPI_User_function *fn = index == 1 ? bf16_max : index == 2 ? bf16_min : bf16_sum;
        check_mpi(MPI_Op_create(fn, 1, &bf16_ops[index]));
    }
    return bf16_ops[index];
}

/* buf[i] /= divisor, in buf's own floating type. */
static void divide(void *buf, size_t count, enum comm_type type, int divisor)
{
    if (type == COMM_F32) {
        float *x = buf;
        for (size_t i = 0; i < count; i++) x[i] /= (float)divisor;
    } else if (type == COMM_F64) {
        double *x = buf;
        for (size_t i = 0; i < count; i++) x[i] /= (double)divisor;
    } else {
        uint16_t *x = buf;
        for (size_t i = 0; i < count; i++)
            x[i] = float_to_bf16(bf16_to_float(x[i]) / (float)divisor);
    }
}

static void check_op(enum comm_type type, enum comm_op op)
{
    comm_type_size(type); /* rejects unknown types */
    if (op != COMM_SUM && op != COMM_MEAN && op != COMM_MAX && op != COMM_MIN)
        fatal(EXIT_RUNTIME, "comm_allreduce: unknown operation %d (programming error)", (int)op);
    if (op == COMM_MEAN && !type_is_floating(type))
        fatal(EXIT_RUNTIME,
              "comm_allreduce: COMM_MEAN on integer type %s is not defined "
              "(programming error: reduce with COMM_SUM and divide where the rounding is "
              "chosen)",
              type_name(type));
}

static void check_peer(const struct comm *c, int peer, const char *what)
{
    if (peer < 0 || peer >= c->size)
        fatal(EXIT_RUNTIME, "%s: rank %d is outside the group of %d ranks (programming error)",
              what, peer, c->size);
}

static void check_tag(int tag, const char *what)
{
    if (tag < 0 || tag > COMM_TAG_MAX)
        fatal(EXIT_RUNTIME, "%s: tag %d is outside [0, %d] (programming error)", what, tag,
              COMM_TAG_MAX);
}

static size_t min_size(size_t a, size_t b)
{
    return a < b ? a : b;
}

void comm_allreduce(const struct comm *c, void *buf, size_t count, enum comm_type type,
                    enum comm_op op, enum comm_memory memory)
{
    check_op(type, op);
    if (count == 0) return;
    if (memory == COMM_DEVICE) {
        require_device(c, "comm_allreduce");
#ifdef HAVE_CUDA
        comm_device_allreduce(c, buf, count, type, op);
#endif
        return;
    }
    size_t element = comm_type_size(type);
    MPI_Datatype datatype = mpi_type(type);
    MPI_Op reduction = mpi_op(type, op);
    char *bytes = buf;
    for (size_t done = 0; done < count;) {
        size_t n = min_size(count - done, chunk_limit);
        check_mpi(MPI_Allreduce(MPI_IN_PLACE, bytes + done * element, (int)n, datatype, reduction,
                                c->mpi));
        done += n;
    }
    if (op == COMM_MEAN && c->size > 1) divide(buf, count, type, c->size);
}

/* Pairwise fallback for counts or offsets MPI_Alltoallv's ints cannot hold: every piece
 * of at most chunk_limit elements is its own message. Messages between one pair on one
 * tag arrive in the order they were sent, so the pieces need no numbering. */
static void alltoallv_pieces(const struct comm *c, const char *send, const size_t *send_counts,
                             const size_t *send_offsets, char *recv, const size_t *recv_counts,
                             const size_t *recv_offsets, size_t element, MPI_Datatype datatype)
{
    size_t requests = 0;
    for (int peer = 0; peer < c->size; peer++)
        requests += (send_counts[peer] + chunk_limit - 1) / chunk_limit +
                    (recv_counts[peer] + chunk_limit - 1) / chunk_limit;
    if (requests > INT_MAX)
        fatal(EXIT_RUNTIME, "comm_alltoallv: %zu messages needed (programming error)", requests);
    MPI_Request *request = xmalloc((requests ? requests : 1) * sizeof *request);
    size_t posted = 0;
    /* Receives first, so no send waits on an unposted receive. */
    for (int peer = 0; peer < c->size; peer++)
        for (size_t done = 0; done < recv_counts[peer];) {
            size_t n = min_size(recv_counts[peer] - done, chunk_limit);
            check_mpi(MPI_Irecv(recv + (recv_offsets[peer] + done) * element, (int)n, datatype,
                                peer, COMM_TAG_ALLTOALLV, c->mpi, &request[posted++]));
            done += n;
        }
    for (int peer = 0; peer < c->size; peer++)
        for (size_t done = 0; done < send_counts[peer];) {
            size_t n = min_size(send_counts[peer] - done, chunk_limit);
            check_mpi(MPI_Isend(send + (send_offsets[peer] + done) * element, (int)n, datatype,
                                peer, COMM_TAG_ALLTOALLV, c->mpi, &request[posted++]));
            done += n;
        }
    check_mpi(MPI_Waitall((int)posted, request, MPI_STATUSES_IGNORE));
    free(request);
}

void comm_alltoallv(const struct comm *c, const void *send, const size_t *send_counts,
                    const size_t *send_offsets, void *recv, const size_t *recv_counts,
                    const size_t *recv_offsets, enum comm_type type, enum comm_memory memory)
{
    size_t element = comm_type_size(type);
    if (memory == COMM_DEVICE) {
        require_device(c, "comm_alltoallv");
#ifdef HAVE_CUDA
        comm_device_alltoallv(c, send, send_counts, send_offsets, recv, recv_counts, recv_offsets,
                              type);
#endif
        return;
    }
    MPI_Datatype datatype = mpi_type(type);
    bool fits = true;
    for (int peer = 0; peer < c->size; peer++)
        if (send_counts[peer] > chunk_limit || send_offsets[peer] > chunk_limit ||
            recv_counts[peer] > chunk_limit || recv_offsets[peer] > chunk_limit)
            fits = false;
    /* Every rank decides alone; a mixed choice would deadlock, so agree first. The
     * agreement is one tiny collective, cheap beside the exchange it protects. */
    int fits_here = fits, fits_everywhere = 0;
    check_mpi(MPI_Allreduce(&fits_here, &fits_everywhere, 1, MPI_INT, MPI_LAND, c->mpi));
    if (!fits_everywhere) {
        alltoallv_pieces(c, send, send_counts, send_offsets, recv, recv_counts, recv_offsets,
                         element, datatype);
        return;
    }
    int stack[4 * COMM_STACK_PEERS];
    int *ints = c->size <= COMM_STACK_PEERS ? stack : xmalloc(4 * (size_t)c->size * sizeof *ints);
    int *sc = ints, *so = ints + c->size, *rc = ints + 2 * c->size, *ro = ints + 3 * c->size;
    for (int peer = 0; peer < c->size; peer++) {
        sc[peer] = (int)send_counts[peer];
        so[peer] = (int)send_offsets[peer];
        rc[peer] = (int)recv_counts[peer];
        ro[peer] = (int)recv_offsets[peer];
    }
    check_mpi(MPI_Alltoallv(send, sc, so, datatype, recv, rc, ro, datatype, c->mpi));
    if (ints != stack) free(ints);
}

void comm_send(const struct comm *c, const void *buf, size_t count, enum comm_type type, int peer,
               int tag, enum comm_memory memory)
{
    size_t element = comm_type_size(type);
    check_peer(c, peer, "comm_send");
    if (memory == COMM_DEVICE) {
        require_device(c, "comm_send");
#ifdef HAVE_CUDA
        comm_device_send(c, buf, count, type, peer);
#endif
        return;
    }
    check_tag(tag, "comm_send");
    const char *bytes = buf;
    /* A zero-length message still travels, so a receiver expecting none is matched. */
    size_t done = 0;
    do {
        size_t n = min_size(count - done, chunk_limit);
        check_mpi(MPI_Send(bytes + done * element, (int)n, mpi_type(type), peer, tag, c->mpi));
        done += n;
    } while (done < count);
}

void comm_send_start(const struct comm *c, const void *buf, size_t count, enum comm_type type,
                     int peer, int tag, enum comm_memory memory, struct comm_request *request)
{
    request->pieces = NULL;
    request->n = 0;
    if (memory == COMM_DEVICE) {
        comm_send(c, buf, count, type, peer, tag, memory);
        return;
    }
    check_peer(c, peer, "comm_send_start");
    check_tag(tag, "comm_send_start");
    size_t element = comm_type_size(type), limit = chunk_limit;
    size_t pieces = count == 0 ? 1 : (count + limit - 1) / limit;
    request->pieces = pieces <= COMM_REQUEST_INLINE ? request->inline_pieces
                                                    : xmalloc(pieces * sizeof *request->pieces);
    const char *bytes = buf;
    size_t done = 0;
    do { /* the same pieces as comm_send, so comm_recv takes either */
        size_t n = min_size(count - done, limit);
        check_mpi(MPI_Isend(bytes + done * element, (int)n, mpi_type(type), peer, tag, c->mpi,
                            &request->pieces[request->n++]));
        done += n;
    } while (done < count);
}

void comm_wait(struct comm_request *request)
{
    if (request->n > 0)
        check_mpi(MPI_Waitall(request->n, request->pieces, MPI_STATUSES_IGNORE));
    if (request->pieces != request->inline_pieces) free(request->pieces);
    request->pieces = NULL;
    request->n = 0;
}

void comm_recv(const struct comm *c, void *buf, size_t count, enum comm_type type, int peer,
               int tag, enum comm_memory memory)
{
    size_t element = comm_type_size(type);
    check_peer(c, peer, "comm_recv");
    if (memory == COMM_DEVICE) {
        require_device(c, "comm_recv");
#ifdef HAVE_CUDA
        comm_device_recv(c, buf, count, type, peer);
#endif
        return;
    }
    check_tag(tag, "comm_recv");
    char *bytes = buf;
    size_t done = 0;
    do {
        size_t n = min_size(count - done, chunk_limit);
        MPI_Status status;
        check_mpi(
            MPI_Recv(bytes + done * element, (int)n, mpi_type(type), peer, tag, c->mpi, &status));
        /* A shorter message means the two sides disagree on the count: say so here
         * rather than let the caller read stale data. */
        int received = 0;
        check_mpi(MPI_Get_count(&status, mpi_type(type), &received));
        if ((size_t)received != n)
            fatal(EXIT_RUNTIME,
                  "comm_recv: expected %zu %s elements from rank %d (tag %d), got %d "
                  "(programming error: send and receive counts differ)",
                  n, type_name(type), peer, tag, received);
        done += n;
    } while (done < count);
}

void comm_broadcast(const struct comm *c, void *buf, size_t count, enum comm_type type, int root,
                    enum comm_memory memory)
{
    size_t element = comm_type_size(type);
    check_peer(c, root, "comm_broadcast");
    if (count == 0) return;
    if (memory == COMM_DEVICE) {
        require_device(c, "comm_broadcast");
#ifdef HAVE_CUDA
        comm_device_broadcast(c, buf, count, type, root);
#endif
        return;
    }
    char *bytes = buf;
    for (size_t done = 0; done < count;) {
        size_t n = min_size(count - done, chunk_limit);
        check_mpi(MPI_Bcast(bytes + done * element, (int)n, mpi_type(type), root, c->mpi));
        done += n;
    }
}

void comm_barrier(const struct comm *c)
{
    check_mpi(MPI_Barrier(c->mpi));
}
