/* st_stream: safetensors files written tensor by tensor at offsets fixed up front (see
 * st_stream.h). */
#include "st_stream.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "log.h"

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
};

struct st_stream {
    int n, capacity;
    struct stream_tensor *tensors; /* sorted by name once open */
    int n_files;
    struct stream_file *files;
    char *index_path, *index_text; /* a sharded directory's index, written last */
    bool opened, finished;
};

static int fail(char *err, size_t errsize, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static int fail(char *err, size_t errsize, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errsize, fmt, ap);
    va_end(ap);
    return -1;
}

static char *join_path(const char *dir, const char *name)
{
    size_t n = strlen(dir) + strlen(name) + 2;
    char *path = xmalloc(n);
    snprintf(path, n, "%s/%s", dir, name);
    return path;
}

struct st_stream *st_stream_new(void)
{
    return xcalloc(1, sizeof(struct st_stream));
}

void st_stream_free(struct st_stream *s)
{
    if (!s) return;
    for (int i = 0; i < s->n_files; i++) {
        struct stream_file *f = &s->files[i];
        if (f->fd >= 0) close(f->fd);
        if (!s->finished && f->tmp) unlink(f->tmp);
        free(f->path);
        free(f->tmp);
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
    if (s->opened) return fail(err, errsize, "tensor '%s': declared after the opening", name);
    if ((unsigned)dtype >= ST_DTYPE_COUNT)
        return fail(err, errsize, "tensor '%s': invalid dtype %d", name, (int)dtype);
    if (rank < 0 || rank > ST_MAX_RANK)
        return fail(err, errsize, "tensor '%s': rank %d outside 0..%d", name, rank, ST_MAX_RANK);
    if (strcmp(name, "__metadata__") == 0 || name[0] == '\0')
        return fail(err, errsize, "tensor name '%s' is reserved", name);
    struct stream_tensor t = {.dtype = dtype, .rank = rank, .numel = 1};
    for (int i = 0; i < rank; i++) {
        if (shape[i] < 0)
            return fail(err, errsize, "tensor '%s': shape[%d] is negative (%lld)", name, i,
                        (long long)shape[i]);
        if (shape[i] != 0 && t.numel > INT64_MAX / shape[i])
            return fail(err, errsize, "tensor '%s': shape product overflows", name);
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
            return fail(err, errsize, "tensor '%s' added twice", s->tensors[i].name);
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

/* PATH.tmp created (emptied) for f; -1 + err. */
static int create_file(struct stream_file *f, const char *path, char *err, size_t errsize)
{
    size_t n = strlen(path) + 5;
    f->path = xstrdup(path);
    f->tmp = xmalloc(n);
    snprintf(f->tmp, n, "%s.tmp", path);
    f->fd = open(f->tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (f->fd < 0) {
        fail(err, errsize, "%s: cannot create: %s", f->tmp, strerror(errno));
        free(f->tmp);
        f->tmp = NULL; /* nothing to remove */
        return -1;
    }
    return 0;
}

/* f's temporary file fsynced, closed and renamed to its name. */
static int commit_file(struct stream_file *f, char *err, size_t errsize)
{
    int fd = f->fd;
    f->fd = -1;
    if (fsync(fd) != 0) {
        fail(err, errsize, "%s: fsync failed: %s", f->tmp, strerror(errno));
        close(fd);
        return -1;
    }
    if (close(fd) != 0) return fail(err, errsize, "%s: close failed: %s", f->tmp, strerror(errno));
    if (rename(f->tmp, f->path) != 0)
        return fail(err, errsize, "%s: cannot rename to %s: %s", f->tmp, f->path, strerror(errno));
    sync_parent_dir(f->path);
    free(f->tmp);
    f->tmp = NULL; /* renamed: nothing left to remove */
    return 0;
}

/* The header of tensors [first, last) (sorted), padded with spaces to a multiple of 8 as
 * the reference writer does, written at the start of file `file`; the tensors' offsets set. */
static int write_header(struct st_stream *s, int first, int last, int file, int with_metadata,
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
    if (!text) return fail(err, errsize, "%s: cannot encode the header", f->path);
    size_t len = strlen(text);
    size_t padded = (len + 7) / 8 * 8;
    unsigned char *head = xmalloc(8 + padded);
    for (int i = 0; i < 8; i++) head[i] = (unsigned char)((uint64_t)padded >> (8 * i));
    memcpy(head + 8, text, len);
    memset(head + 8 + len, ' ', padded - len);
    free(text);
    int rc = write_all(f->fd, head, 8 + padded);
    free(head);
    if (rc != 0) return fail(err, errsize, "%s: write failed: %s", f->tmp, strerror(errno));
    size_t at = 8 + padded;
    for (int i = first; i < last; i++) {
        s->tensors[i].file = file;
        s->tensors[i].offset = at;
        at += s->tensors[i].nbytes;
    }
    /* the file's full size now, so that a tensor written early leaves no doubt about it */
    if (ftruncate(f->fd, (off_t)at) != 0)
        return fail(err, errsize, "%s: cannot size the file: %s", f->tmp, strerror(errno));
    return 0;
}

/* Opens the files: [first[k], first[k+1]) the tensors of file k, at paths[k]. */
static int open_files(struct st_stream *s, int n_files, const int *first, char **paths, char *err,
                      size_t errsize)
{
    s->opened = true;
    s->files = xcalloc((size_t)n_files, sizeof *s->files);
    for (int k = 0; k < n_files; k++) s->files[k].fd = -1;
    for (int k = 0; k < n_files; k++) {
        s->n_files = k + 1;
        if (create_file(&s->files[k], paths[k], err, errsize) != 0 ||
            write_header(s, first[k], first[k + 1], k, 1, err, errsize) != 0)
            return -1;
    }
    return 0;
}

int st_stream_open_file(struct st_stream *s, const char *path, int with_metadata, char *err,
                        size_t errsize)
{
    if (sort_tensors(s, err, errsize) != 0) return -1;
    s->opened = true;
    s->files = xcalloc(1, sizeof *s->files);
    s->files[0].fd = -1;
    s->n_files = 1;
    if (create_file(&s->files[0], path, err, errsize) != 0) return -1;
    return write_header(s, 0, s->n, 0, with_metadata, err, errsize);
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
        paths[k] = join_path(dir, name);
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
        s->index_path = join_path(dir, "model.safetensors.index.json");
    }
    json_decref(weight_map);
    int rc = open_files(s, n_shards, first, paths, err, errsize);
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
    if (!t) return fail(err, errsize, "tensor '%s' is not one of the stream's", name);
    if (at > t->nbytes || n > t->nbytes - at)
        return fail(err, errsize, "tensor '%s': bytes [%zu, %zu) outside its %zu", name, at, at + n,
                    t->nbytes);
    struct stream_file *f = &s->files[t->file];
    if (pwrite_all(f->fd, data, n, t->offset + at) != 0)
        return fail(err, errsize, "%s: write failed: %s", f->tmp, strerror(errno));
    t->written += n;
    return 0;
}

int st_stream_write_f32(struct st_stream *s, const char *name, size_t first, const float *values,
                        size_t count, char *err, size_t errsize)
{
    struct stream_tensor *t = s->opened ? find_tensor(s, name) : NULL;
    if (!t) return fail(err, errsize, "tensor '%s' is not one of the stream's", name);
    size_t size = st_dtype_size(t->dtype);
    if (t->dtype == ST_F32)
        return st_stream_write(s, name, first * size, values, count * size, err, errsize);
    if (t->dtype != ST_BF16 && t->dtype != ST_F16)
        return fail(err, errsize, "tensor '%s': fp32 values cannot be written as %s", name,
                    st_dtype_name(t->dtype));
    if (first > (size_t)t->numel || count > (size_t)t->numel - first)
        return fail(err, errsize, "tensor '%s': values [%zu, %zu) outside its %lld", name, first,
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

int st_stream_finish(struct st_stream *s, char *err, size_t errsize)
{
    if (!s->opened) return fail(err, errsize, "safetensors stream finished before its opening");
    for (int i = 0; i < s->n; i++)
        if (s->tensors[i].written != s->tensors[i].nbytes)
            return fail(err, errsize, "%s: tensor '%s': %zu of its %zu bytes written",
                        s->files[s->tensors[i].file].path, s->tensors[i].name,
                        s->tensors[i].written, s->tensors[i].nbytes);
    for (int k = 0; k < s->n_files; k++)
        if (commit_file(&s->files[k], err, errsize) != 0) return -1;
    if (s->index_text) {
        struct stream_file index = {.fd = -1};
        int rc = create_file(&index, s->index_path, err, errsize);
        if (rc == 0 && (write_all(index.fd, s->index_text, strlen(s->index_text)) != 0 ||
                        write_all(index.fd, "\n", 1) != 0))
            rc = fail(err, errsize, "%s: write failed: %s", index.tmp, strerror(errno));
        if (rc == 0) rc = commit_file(&index, err, errsize);
        if (index.fd >= 0) close(index.fd);
        if (index.tmp) unlink(index.tmp);
        free(index.path);
        free(index.tmp);
        if (rc != 0) return -1;
    }
    s->finished = true;
    return 0;
}
