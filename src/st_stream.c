/* st_stream: safetensors files written tensor by tensor at offsets fixed up front, by one
 * process or by every rank of a communicator (see st_stream.h). */
#include "st_stream.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <mpi.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "log.h"
#include "safetensors_internal.h"

/* fp32 values converted per piece by st_stream_write_f32: what the conversion holds. */
#define CONVERT_PIECE ((size_t)1 << 20)

struct stream_tensor {
    char *name;
    enum st_dtype dtype;
    int rank;
    int64_t shape[ST_MAX_RANK];
    int64_t numel;
    size_t nbytes;
    int file;       /* index into files */
    size_t offset;  /* of its first byte in the file (header included) */
    size_t written; /* bytes written so far */
};

struct stream_file {
    char *path, *tmp;
    int fd;
    bool created;           /* by this process: removed when the stream is freed unfinished */
    unsigned char *head;    /* the header (its length, the JSON, the padding) until created */
    size_t head_size, size; /* the header's bytes and the whole file's */
};

struct st_stream {
    int n, capacity;
    struct stream_tensor *tensors; /* sorted by name once open */
    int n_files;
    struct stream_file *files;
    char *index_path, *index_text; /* a sharded directory's index, written last */
    bool opened, finished;
    /* shared: every rank of comm writes (MPI_COMM_NULL: this process alone); creator:
     * this process made the temporary files (it renames them) */
    MPI_Comm comm;
    bool creator;
};

struct st_stream *st_stream_new(void)
{
    return st_stream_new_shared(MPI_COMM_NULL);
}

struct st_stream *st_stream_new_shared(MPI_Comm comm)
{
    struct st_stream *s = xcalloc(1, sizeof(struct st_stream));
    s->comm = comm;
    return s;
}

void st_stream_free(struct st_stream *s)
{
    if (!s) return;
    for (int i = 0; i < s->n_files; i++) {
        struct stream_file *f = &s->files[i];
        if (f->fd >= 0) close(f->fd);
        if (!s->finished && f->created && f->tmp) unlink(f->tmp);
        free(f->path);
        free(f->tmp);
        free(f->head);
    }
    free(s->files);
    for (int i = 0; i < s->n; i++) free(s->tensors[i].name);
    free(s->tensors);
    free(s->index_path);
    free(s->index_text);
    free(s);
}

int st_stream_declare(struct st_stream *s, const char *name, enum st_dtype dtype, int rank,
                      const int64_t *shape, char *err, size_t errsize)
{
    if (s->opened) return st_fail(err, errsize, "tensor '%s': declared after the opening", name);
    if ((unsigned)dtype >= ST_DTYPE_COUNT)
        return st_fail(err, errsize, "tensor '%s': invalid dtype %d", name, (int)dtype);
    if (rank < 0 || rank > ST_MAX_RANK)
        return st_fail(err, errsize, "tensor '%s': rank %d outside 0..%d", name, rank, ST_MAX_RANK);
    if (strcmp(name, "__metadata__") == 0 || name[0] == '\0')
        return st_fail(err, errsize, "tensor name '%s' is reserved", name);
    struct stream_tensor t = {.dtype = dtype, .rank = rank, .numel = 1};
    for (int i = 0; i < rank; i++) {
        if (shape[i] < 0)
            return st_fail(err, errsize, "tensor '%s': shape[%d] is negative (%lld)", name, i,
                           (long long)shape[i]);
        if (shape[i] != 0 && t.numel > INT64_MAX / shape[i])
            return st_fail(err, errsize, "tensor '%s': shape product overflows", name);
        t.shape[i] = shape[i];
        t.numel *= shape[i];
    }
    t.nbytes = (size_t)t.numel * st_dtype_size(dtype);
    if (s->n == s->capacity) {
        s->capacity = s->capacity ? 2 * s->capacity : 64;
        struct stream_tensor *grown = realloc(s->tensors, (size_t)s->capacity * sizeof *grown);
        if (!grown) fatal(EXIT_RUNTIME, "out of memory growing a safetensors stream");
        s->tensors = grown;
    }
    t.name = xstrdup(name);
    s->tensors[s->n++] = t;
    return 0;
}

static int tensor_by_name(const void *a, const void *b)
{
    return strcmp(((const struct stream_tensor *)a)->name, ((const struct stream_tensor *)b)->name);
}

/* Sorts the tensors by name (the order of the headers and the data); -1 on a duplicate. */
static int sort_tensors(struct st_stream *s, char *err, size_t errsize)
{
    qsort(s->tensors, (size_t)s->n, sizeof *s->tensors, tensor_by_name);
    for (int i = 1; i < s->n; i++)
        if (strcmp(s->tensors[i - 1].name, s->tensors[i].name) == 0)
            return st_fail(err, errsize, "tensor '%s' added twice", s->tensors[i].name);
    return 0;
}

static int write_all(int fd, const void *buf, size_t n)
{
    const char *p = buf;
    while (n > 0) {
        ssize_t k = write(fd, p, n);
        if (k < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

static int pwrite_all(int fd, const void *buf, size_t n, size_t offset)
{
    const char *p = buf;
    while (n > 0) {
        ssize_t k = pwrite(fd, p, n, (off_t)offset);
        if (k < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += k;
        n -= (size_t)k;
        offset += (size_t)k;
    }
    return 0;
}

/* fsync of the directory makes a rename itself durable. */
static void sync_parent_dir(const char *path)
{
    const char *slash = strrchr(path, '/');
    char *dir = slash ? strndup(path, (size_t)(slash - path) + (slash == path)) : strdup(".");
    if (!dir) return;
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd >= 0) {
        fsync(fd);
        close(fd);
    }
    free(dir);
}

/* The temporary name of path: path.tmp, malloc'd. */
static char *temporary_name(const char *path)
{
    size_t n = strlen(path) + 5;
    char *tmp = xmalloc(n);
    snprintf(tmp, n, "%s.tmp", path);
    return tmp;
}

/* f's header written at the start of its temporary file, created (emptied), and the file
 * sized (so that a tensor written early leaves no doubt about its length). */
static int create_file(struct stream_file *f, char *err, size_t errsize)
{
    f->fd = open(f->tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (f->fd < 0) return st_fail(err, errsize, "%s: cannot create: %s", f->tmp, strerror(errno));
    f->created = true;
    if (write_all(f->fd, f->head, f->head_size) != 0)
        return st_fail(err, errsize, "%s: write failed: %s", f->tmp, strerror(errno));
    if (ftruncate(f->fd, (off_t)f->size) != 0)
        return st_fail(err, errsize, "%s: cannot size the file: %s", f->tmp, strerror(errno));
    return 0;
}

/* f's temporary file, which another rank created, opened for writing. Not found, or
 * another size: the ranks do not see the same file system. */
static int attach_file(struct stream_file *f, char *err, size_t errsize)
{
    f->fd = open(f->tmp, O_WRONLY | O_CLOEXEC);
    struct stat st;
    if (f->fd < 0 || fstat(f->fd, &st) != 0)
        return st_fail(err, errsize,
                       "%s: cannot open the file rank 0 created: %s (the output directory must "
                       "be on a file system every rank sees)",
                       f->tmp, strerror(errno));
    if ((size_t)st.st_size != f->size)
        return st_fail(err, errsize,
                       "%s: %lld bytes, not the %zu rank 0 made it (the output directory must be "
                       "on a file system every rank sees)",
                       f->tmp, (long long)st.st_size, f->size);
    return 0;
}

/* f's writes made durable: fsynced and closed. */
static int sync_file(struct stream_file *f, char *err, size_t errsize)
{
    int fd = f->fd;
    f->fd = -1;
    if (fsync(fd) != 0) {
        st_fail(err, errsize, "%s: fsync failed: %s", f->tmp, strerror(errno));
        close(fd);
        return -1;
    }
    if (close(fd) != 0)
        return st_fail(err, errsize, "%s: close failed: %s", f->tmp, strerror(errno));
    return 0;
}

/* f's temporary file (synced) renamed to its name, the rename made durable. */
static int rename_file(struct stream_file *f, char *err, size_t errsize)
{
    if (rename(f->tmp, f->path) != 0)
        return st_fail(err, errsize, "%s: cannot rename to %s: %s", f->tmp, f->path,
                       strerror(errno));
    sync_parent_dir(f->path);
    free(f->tmp);
    f->tmp = NULL; /* renamed: nothing left to remove */
    return 0;
}

/* The header of tensors [first, last) (sorted), padded with spaces to a multiple of 8 as
 * the reference writer does, made for file `file` (not written yet); the tensors' places
 * and the file's size set. */
static int lay_out_file(struct st_stream *s, int first, int last, int file, int with_metadata,
                        char *err, size_t errsize)
{
    json_t *header = json_object();
    if (with_metadata) {
        json_t *meta = json_object();
        json_object_set_new(meta, "format", json_string("pt"));
        json_object_set_new(header, "__metadata__", meta);
    }
    size_t offset = 0;
    for (int i = first; i < last; i++) {
        const struct stream_tensor *e = &s->tensors[i];
        json_t *shape = json_array();
        for (int d = 0; d < e->rank; d++) json_array_append_new(shape, json_integer(e->shape[d]));
        json_t *t = json_object();
        json_object_set_new(t, "dtype", json_string(st_dtype_name(e->dtype)));
        json_object_set_new(t, "shape", shape);
        json_object_set_new(
            t, "data_offsets",
            json_pack("[II]", (json_int_t)offset, (json_int_t)(offset + e->nbytes)));
        json_object_set_new(header, e->name, t);
        offset += e->nbytes;
    }
    struct stream_file *f = &s->files[file];
    char *text = json_dumps(header, JSON_COMPACT | JSON_PRESERVE_ORDER);
    json_decref(header);
    if (!text) return st_fail(err, errsize, "%s: cannot encode the header", f->path);
    size_t len = strlen(text);
    size_t padded = (len + 7) / 8 * 8;
    f->head_size = 8 + padded;
    f->head = xmalloc(f->head_size);
    for (int i = 0; i < 8; i++) f->head[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    memcpy(f->head + 8, text, len);
    memset(f->head + 8 + len, ' ', padded - len);
    free(text);
    size_t at = f->head_size;
    for (int i = first; i < last; i++) {
        s->tensors[i].file = file;
        s->tensors[i].offset = at;
        at += s->tensors[i].nbytes;
    }
    f->size = at;
    return 0;
}

/* The files laid out: [first[k], first[k+1]) the tensors of file k, at paths[k]. */
static int lay_out(struct st_stream *s, int n_files, const int *first, char **paths,
                   int with_metadata, char *err, size_t errsize)
{
    s->opened = true;
    s->files = xcalloc((size_t)n_files, sizeof *s->files);
    s->n_files = n_files;
    for (int k = 0; k < n_files; k++) {
        s->files[k].fd = -1;
        s->files[k].path = xstrdup(paths[k]);
        s->files[k].tmp = temporary_name(paths[k]);
    }
    for (int k = 0; k < n_files; k++)
        if (lay_out_file(s, first[k], first[k + 1], k, with_metadata, err, errsize) != 0) return -1;
    return 0;
}

/* The files laid out opened: created by this process alone, or, shared, by rank 0 of the
 * communicator, then opened by the others (every rank's status agreed). */
static int open_laid_out(struct st_stream *s, char *err, size_t errsize)
{
    int rank = 0;
    if (s->comm != MPI_COMM_NULL) check_mpi(MPI_Comm_rank(s->comm, &rank));
    int rc = 0;
    if (rank == 0) {
        s->creator = true;
        for (int k = 0; k < s->n_files && rc == 0; k++)
            rc = create_file(&s->files[k], err, errsize);
    }
    for (int k = 0; k < s->n_files; k++) {
        free(s->files[k].head);
        s->files[k].head = NULL;
    }
    if (s->comm == MPI_COMM_NULL) return rc;
    if (ranks_agree(rc, err, errsize, s->comm)) return -1;
    for (int k = 0; k < s->n_files && rc == 0 && rank != 0; k++)
        rc = attach_file(&s->files[k], err, errsize);
    return ranks_agree(rc, err, errsize, s->comm);
}

int st_stream_open_file(struct st_stream *s, const char *path, int with_metadata, char *err,
                        size_t errsize)
{
    if (sort_tensors(s, err, errsize) != 0) return -1;
    int first[2] = {0, s->n};
    char *paths[1] = {(char *)path};
    if (lay_out(s, 1, first, paths, with_metadata, err, errsize) != 0) return -1;
    return open_laid_out(s, err, errsize);
}

int st_stream_open_checkpoint(struct st_stream *s, const char *dir, size_t max_shard_bytes,
                              char *err, size_t errsize)
{
    if (sort_tensors(s, err, errsize) != 0) return -1;
    /* first[k]: the first tensor of shard k; a shard closes when the next tensor would pass
     * the limit (a tensor larger than the limit gets a shard of its own) */
    int *first = xmalloc((size_t)(s->n + 2) * sizeof *first);
    int n_shards = 1;
    first[0] = 0;
    size_t used = 0, total_size = 0;
    int64_t total_parameters = 0;
    for (int i = 0; i < s->n; i++) {
        if (max_shard_bytes && used > 0 && used + s->tensors[i].nbytes > max_shard_bytes) {
            first[n_shards++] = i;
            used = 0;
        }
        used += s->tensors[i].nbytes;
        total_size += s->tensors[i].nbytes;
        total_parameters += s->tensors[i].numel;
    }
    first[n_shards] = s->n;
    char **paths = xmalloc((size_t)n_shards * sizeof *paths);
    json_t *weight_map = json_object();
    for (int k = 0; k < n_shards; k++) {
        char name[64];
        if (n_shards == 1)
            snprintf(name, sizeof name, "model.safetensors");
        else
            st_shard_name(k + 1, n_shards, name, sizeof name);
        paths[k] = st_join_path(dir, name);
        for (int i = first[k]; i < first[k + 1]; i++)
            json_object_set_new(weight_map, s->tensors[i].name, json_string(name));
    }
    if (n_shards > 1) {
        /* what transformers 5.23 save_pretrained writes (checked by saving a model) */
        json_t *index = json_object();
        json_object_set_new(index, "metadata",
                            json_pack("{sIsI}", "total_parameters", (json_int_t)total_parameters,
                                      "total_size", (json_int_t)total_size));
        json_object_set(index, "weight_map", weight_map);
        s->index_text = json_dumps(index, JSON_INDENT(2) | JSON_SORT_KEYS);
        json_decref(index);
        s->index_path = st_join_path(dir, "model.safetensors.index.json");
    }
    json_decref(weight_map);
    int rc = lay_out(s, n_shards, first, paths, 1, err, errsize);
    if (rc == 0) rc = open_laid_out(s, err, errsize);
    for (int k = 0; k < n_shards; k++) free(paths[k]);
    free(paths);
    free(first);
    return rc;
}

static struct stream_tensor *find_tensor(struct st_stream *s, const char *name)
{
    struct stream_tensor key = {.name = (char *)name};
    return bsearch(&key, s->tensors, (size_t)s->n, sizeof *s->tensors, tensor_by_name);
}

int st_stream_write(struct st_stream *s, const char *name, size_t at, const void *data, size_t n,
                    char *err, size_t errsize)
{
    struct stream_tensor *t = s->opened ? find_tensor(s, name) : NULL;
    if (!t) return st_fail(err, errsize, "tensor '%s' is not one of the stream's", name);
    if (at > t->nbytes || n > t->nbytes - at)
        return st_fail(err, errsize, "tensor '%s': bytes [%zu, %zu) outside its %zu", name, at,
                       at + n, t->nbytes);
    struct stream_file *f = &s->files[t->file];
    if (pwrite_all(f->fd, data, n, t->offset + at) != 0)
        return st_fail(err, errsize, "%s: write failed: %s", f->tmp, strerror(errno));
    t->written += n;
    return 0;
}

int st_stream_write_f32(struct st_stream *s, const char *name, size_t first, const float *values,
                        size_t count, char *err, size_t errsize)
{
    struct stream_tensor *t = s->opened ? find_tensor(s, name) : NULL;
    if (!t) return st_fail(err, errsize, "tensor '%s' is not one of the stream's", name);
    size_t size = st_dtype_size(t->dtype);
    if (t->dtype == ST_F32)
        return st_stream_write(s, name, first * size, values, count * size, err, errsize);
    if (t->dtype != ST_BF16 && t->dtype != ST_F16)
        return st_fail(err, errsize, "tensor '%s': fp32 values cannot be written as %s", name,
                       st_dtype_name(t->dtype));
    if (first > (size_t)t->numel || count > (size_t)t->numel - first)
        return st_fail(err, errsize, "tensor '%s': values [%zu, %zu) outside its %lld", name, first,
                       first + count, (long long)t->numel);
    size_t piece = count < CONVERT_PIECE ? count : CONVERT_PIECE;
    void *converted = xmalloc(piece ? piece * size : 1);
    int rc = 0;
    for (size_t at = 0; at < count && rc == 0; at += piece) {
        size_t k = count - at < piece ? count - at : piece;
        st_f32_to_dtype_array(values + at, converted, k, t->dtype);
        rc = st_stream_write(s, name, (first + at) * size, converted, k * size, err, errsize);
    }
    free(converted);
    return rc;
}

/* This process's checks before the files are renamed: every tensor's bytes written once
 * (shared: summed over the ranks, which write a tensor each), its own writes durable. */
static int check_written(struct st_stream *s, char *err, size_t errsize)
{
    uint64_t *written = xmalloc((size_t)(s->n ? s->n : 1) * sizeof *written);
    for (int i = 0; i < s->n; i++) written[i] = s->tensors[i].written;
    if (s->comm != MPI_COMM_NULL)
        check_mpi(MPI_Allreduce(MPI_IN_PLACE, written, s->n, MPI_UINT64_T, MPI_SUM, s->comm));
    int rc = 0;
    for (int i = 0; i < s->n && rc == 0; i++)
        if (written[i] != s->tensors[i].nbytes)
            rc = st_fail(err, errsize, "%s: tensor '%s': %llu of its %zu bytes written",
                         s->files[s->tensors[i].file].path, s->tensors[i].name,
                         (unsigned long long)written[i], s->tensors[i].nbytes);
    free(written);
    for (int k = 0; k < s->n_files && rc == 0; k++) rc = sync_file(&s->files[k], err, errsize);
    return rc;
}

/* The creator: the files renamed to their names, then the index (when sharded). */
static int rename_files(struct st_stream *s, char *err, size_t errsize)
{
    for (int k = 0; k < s->n_files; k++)
        if (rename_file(&s->files[k], err, errsize) != 0) return -1;
    if (!s->index_text) return 0;
    struct stream_file index = {
        .fd = -1, .path = s->index_path, .tmp = temporary_name(s->index_path)};
    int rc = 0;
    index.fd = open(index.tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (index.fd < 0)
        rc = st_fail(err, errsize, "%s: cannot create: %s", index.tmp, strerror(errno));
    if (rc == 0 && (write_all(index.fd, s->index_text, strlen(s->index_text)) != 0 ||
                    write_all(index.fd, "\n", 1) != 0))
        rc = st_fail(err, errsize, "%s: write failed: %s", index.tmp, strerror(errno));
    if (rc == 0) rc = sync_file(&index, err, errsize);
    if (rc == 0) rc = rename_file(&index, err, errsize);
    if (index.fd >= 0) close(index.fd);
    if (index.tmp) unlink(index.tmp);
    free(index.tmp);
    return rc;
}

int st_stream_finish(struct st_stream *s, char *err, size_t errsize)
{
    if (!s->opened) return st_fail(err, errsize, "safetensors stream finished before its opening");
    int rc = check_written(s, err, errsize);
    if (s->comm != MPI_COMM_NULL && ranks_agree(rc, err, errsize, s->comm)) return -1;
    if (rc == 0 && s->creator) rc = rename_files(s, err, errsize);
    if (s->comm != MPI_COMM_NULL) rc = ranks_agree(rc, err, errsize, s->comm);
    if (rc == 0) s->finished = true;
    return rc;
}
