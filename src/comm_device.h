/* comm_device: the private hooks between comm.c (which checks arguments and picks host
 * or device) and comm_nccl.c (which moves device buffers with NCCL). Included by those
 * two files only; callers use comm.h. Argument checks (types, MEAN on integers, peer
 * ranges) are done once in comm.c before a hook is called. */
#ifndef ESFT_COMM_DEVICE_H
#define ESFT_COMM_DEVICE_H

#include <stddef.h>

#include "comm.h"

#ifdef HAVE_CUDA
/* Collective over c: rank 0 makes an NCCL unique id, broadcasts it over c->mpi, every
 * rank joins; sets c->nccl and c->stream. */
void comm_device_enable(struct comm *c);
/* Destroys c->nccl and c->stream (no-op when NULL). Not collective. */
void comm_device_free(struct comm *c);

void comm_device_allreduce(const struct comm *c, void *buf, size_t count, enum comm_type type,
                           enum comm_op op);
void comm_device_alltoallv(const struct comm *c, const void *send, const size_t *send_counts,
                           const size_t *send_offsets, void *recv, const size_t *recv_counts,
                           const size_t *recv_offsets, enum comm_type type);
void comm_device_send(const struct comm *c, const void *buf, size_t count, enum comm_type type,
                      int peer);
void comm_device_recv(const struct comm *c, void *buf, size_t count, enum comm_type type, int peer);
void comm_device_broadcast(const struct comm *c, void *buf, size_t count, enum comm_type type,
                           int root);
#endif

#endif
