/* st_stream: a safetensors file, or a sharded checkpoint directory, written tensor by
 * tensor, for the writers that never hold every tensor at once (the exports, export.c;
 * the safetensors writer, safetensors.c, writes through it too, so both give the same
 * bytes), by one process or by every rank of a communicator together.
 *
 * Every tensor's name, dtype and shape is declared first; opening then fixes the files
 * (the shard split), writes each file's header at the start of PATH.tmp, and each
 * tensor's bytes may then be written at their place in any order and in pieces
 * (pwrite). Finishing checks that every byte was written, fsyncs and renames each file
 * to its name (the index of a sharded directory last); freeing an unfinished stream
 * removes its temporary files. The format and the split are those of safetensors.h's
 * writer (st_writer_write, st_writer_write_checkpoint).
 *
 * Shared (st_stream_new_shared): every rank of the communicator declares the same tensors
 * and opens the stream (collective): each lays the files out alike, rank 0 creates them
 * with their headers and full sizes, then the others open them; each rank then writes
 * the bytes of the tensors it was given (no rank writes another's, none holds more than
 * the piece it converts), and finishing (collective) checks that the ranks together wrote
 * every byte once, makes each rank's writes durable, and has rank 0 rename the files. The
 * files must be on a file system every rank sees (opening says so when they are not).
 * Opening and finishing give every rank the same status and message (ranks_agree, log.h):
 * one rank's failure fails them all, and freeing the stream on rank 0 then removes the
 * temporary files. */
#ifndef ESFT_ST_STREAM_H
#define ESFT_ST_STREAM_H

#include <mpi.h>
#include <stddef.h>
#include <stdint.h>

#include "safetensors.h"

struct st_stream;

struct st_stream *st_stream_new(void);
/* A stream every rank of comm writes (see above); MPI_COMM_NULL: st_stream_new. */
struct st_stream *st_stream_new_shared(MPI_Comm comm);
/* Removes the temporary files of a stream not finished (shared: rank 0 does). */
void st_stream_free(struct st_stream *s);

/* One tensor of the files; before opening. -1 + err on a bad rank, a negative dimension or
 * a reserved name (a duplicate name fails the opening). */
int st_stream_declare(struct st_stream *s, const char *name, enum st_dtype dtype, int rank,
                      const int64_t *shape, char *err, size_t errsize);

/* One file, PATH (written as PATH.tmp until finished); with_metadata adds {"format": "pt"}. */
int st_stream_open_file(struct st_stream *s, const char *path, int with_metadata, char *err,
                        size_t errsize);
/* DIR/model.safetensors when the tensors fit in max_shard_bytes (0: no limit), else the
 * shards DIR/model-0000i-of-0000n.safetensors and DIR/model.safetensors.index.json. */
int st_stream_open_checkpoint(struct st_stream *s, const char *dir, size_t max_shard_bytes,
                              char *err, size_t errsize);

/* Bytes [at, at + n) of tensor `name`'s data. -1 + err for an unknown name, a range
 * outside the tensor, a failed write. */
int st_stream_write(struct st_stream *s, const char *name, size_t at, const void *data, size_t n,
                    char *err, size_t errsize);
/* Values [first, first + count) of tensor `name` (in elements) from fp32 values, converted
 * to its dtype (BF16, F16 rounded as st_f32_to_dtype_array; F32 as is) a bounded piece at
 * a time. */
int st_stream_write_f32(struct st_stream *s, const char *name, size_t first, const float *values,
                        size_t count, char *err, size_t errsize);

/* Every tensor written in full (shared: by the ranks together): each file fsynced and
 * renamed, the directory fsynced, the index (when sharded) written last. 0, or -1 + err
 * (the temporary files removed by st_stream_free). */
int st_stream_finish(struct st_stream *s, char *err, size_t errsize);

#endif
