/* safetensors: see safetensors.h. Reading maps a file, checks the whole header against
 * the file before any view is made, and keeps views sorted by name for binary search;
 * writing hands the entries to st_stream (the header, the shard split, the atomic
 * replacement of the target files). */
#include "safetensors.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "log.h"
#include "safetensors_internal.h"
#include "st_stream.h"

/* safetensors data is little-endian; the f32/f64 paths below copy bytes straight. */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "esft's safetensors reader assumes a little-endian host"
#endif

int st_fail(char *err, size_t errsize, const char *fmt, ...)
{
    if (err && errsize) {
        va_list args;
        va_start(args, fmt);
        vsnprintf(err, errsize, fmt, args);
        va_end(args);
    }
    return -1;
}

char *st_join_path(const char *dir, const char *name)
{
    size_t n = strlen(dir) + strlen(name) + 2;
    char *path = xmalloc(n);
    snprintf(path, n, "%s/%s", dir, name);
    return path;
}

/* ---- dtypes ------------------------------------------------------------------------ */

static const struct {
    const char *name;
    size_t size;
} dtype_table[ST_DTYPE_COUNT] = {
    [ST_BOOL] = {"BOOL", 1}, [ST_U8] = {"U8", 1},           [ST_I8] = {"I8", 1},
    [ST_I16] = {"I16", 2},   [ST_U16] = {"U16", 2},         [ST_F16] = {"F16", 2},
    [ST_BF16] = {"BF16", 2}, [ST_I32] = {"I32", 4},         [ST_U32] = {"U32", 4},
    [ST_F32] = {"F32", 4},   [ST_F64] = {"F64", 8},         [ST_I64] = {"I64", 8},
    [ST_U64] = {"U64", 8},   [ST_F8_E4M3] = {"F8_E4M3", 1}, [ST_F8_E5M2] = {"F8_E5M2", 1},
};

const char *st_dtype_name(enum st_dtype dtype)
{
    return (unsigned)dtype < ST_DTYPE_COUNT ? dtype_table[dtype].name : "?";
}

size_t st_dtype_size(enum st_dtype dtype)
{
    return (unsigned)dtype < ST_DTYPE_COUNT ? dtype_table[dtype].size : 0;
}

int st_dtype_parse(const char *name, enum st_dtype *out)
{
    for (int i = 0; i < ST_DTYPE_COUNT; i++)
        if (strcmp(name, dtype_table[i].name) == 0) {
            *out = (enum st_dtype)i;
            return 0;
        }
    return -1;
}

/* ---- scalar conversions ------------------------------------------------------------ */

static uint32_t f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* bf16 is the top half of an IEEE binary32: widening is exact. */
float st_bf16_to_f32(uint16_t h)
{
    return bits_f32((uint32_t)h << 16);
}

/* IEEE binary16: 1 sign, 5 exponent (bias 15), 10 mantissa bits. */
float st_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1fu;
    uint32_t mantissa = h & 0x3ffu;
    if (exponent == 0) {
        if (mantissa == 0) return bits_f32(sign);
        /* subnormal: mantissa * 2^-24; normalise so the leading 1 becomes implicit */
        uint32_t e = 127 - 15 + 1;
        while (!(mantissa & 0x400u)) {
            mantissa <<= 1;
            e--;
        }
        mantissa &= 0x3ffu;
        return bits_f32(sign | (e << 23) | (mantissa << 13));
    }
    if (exponent == 31) return bits_f32(sign | 0x7f800000u | (mantissa << 13));
    return bits_f32(sign | ((exponent - 15 + 127) << 23) | (mantissa << 13));
}

float st_f8_e4m3_to_f32(uint8_t b)
{
    uint32_t sign = (uint32_t)(b & 0x80u) << 24;
    uint32_t exponent = (b >> 3) & 0xfu;
    uint32_t mantissa = b & 0x7u;
    /* NaN: the exponent field all ones, as torch widens it (0x7F -> 0x7FF00000, quiet) */
    if (exponent == 0xfu && mantissa == 0x7u)
        return bits_f32(sign | 0x7f800000u | (mantissa << 20));
    if (exponent == 0) {
        /* subnormal: mantissa * 2^-9, exact in binary32 */
        float magnitude = (float)mantissa * 0x1p-9f;
        return sign ? -magnitude : magnitude;
    }
    return bits_f32(sign | ((exponent - 7 + 127) << 23) | (mantissa << 20));
}

float st_f8_e5m2_to_f32(uint8_t b)
{
    return st_f16_to_f32((uint16_t)(b << 8));
}

uint16_t st_f32_to_bf16(float f)
{
    uint32_t u = f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u); /* quiet NaN */
    /* round to nearest even on the 16 dropped bits; a carry into the exponent is the
     * correct result, up to and including infinity */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

uint16_t st_f32_to_f16(float f)
{
    uint32_t u = f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t x = u & 0x7fffffffu;
    if (x > 0x7f800000u) return sign | 0x7e00u; /* NaN -> quiet NaN */
    /* 65520 = halfway between the largest half (65504) and 2^16: ties go to the even
     * neighbour, which is infinity */
    if (x >= 0x477ff000u) return sign | 0x7c00u;
    if (x >= 0x38800000u) { /* >= 2^-14: a normal half */
        uint32_t v = x - ((uint32_t)(127 - 15) << 23);
        v += 0xfffu + ((v >> 13) & 1u);
        return sign | (uint16_t)(v >> 13);
    }
    /* subnormal half: m * 2^-24 with m = round(|f| * 2^24) */
    uint32_t exponent = x >> 23;
    if (exponent < 102) return sign; /* below 2^-25: rounds to zero */
    uint32_t mantissa = (x & 0x7fffffu) | 0x800000u;
    uint32_t shift = 126 - exponent; /* 14..24 */
    uint32_t m = mantissa >> shift;
    uint32_t rest = mantissa & ((1u << shift) - 1);
    uint32_t half = 1u << (shift - 1);
    if (rest > half || (rest == half && (m & 1u))) m++;
    return sign | (uint16_t)m;
}

void st_f32_to_bf16_array(const float *in, uint16_t *out, size_t n)
{
    for (size_t i = 0; i < n; i++) out[i] = st_f32_to_bf16(in[i]);
}

void st_f32_to_dtype_array(const float *in, void *out, size_t n, enum st_dtype dtype)
{
    if (dtype == ST_BF16)
        st_f32_to_bf16_array(in, out, n);
    else if (dtype == ST_F16)
        st_f32_to_f16_array(in, out, n);
    else
        memcpy(out, in, n * sizeof(float));
}

void st_f32_to_f16_array(const float *in, uint16_t *out, size_t n)
{
    for (size_t i = 0; i < n; i++) out[i] = st_f32_to_f16(in[i]);
}

/* ---- reading one file -------------------------------------------------------------- */

static int tensor_by_name(const void *a, const void *b)
{
    return strcmp(((const struct st_tensor *)a)->name, ((const struct st_tensor *)b)->name);
}

static int tensor_by_offset(const void *a, const void *b)
{
    const struct st_tensor *x = *(const struct st_tensor *const *)a;
    const struct st_tensor *y = *(const struct st_tensor *const *)b;
    const char *px = x->data, *py = y->data;
    if (px != py) return px < py ? -1 : 1;
    return x->nbytes < y->nbytes ? -1 : x->nbytes > y->nbytes;
}

static const char *json_kind(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT:
        return "an object";
    case JSON_ARRAY:
        return "an array";
    case JSON_STRING:
        return "a string";
    case JSON_INTEGER:
        return "an integer";
    case JSON_REAL:
        return "a real number";
    case JSON_TRUE:
    case JSON_FALSE:
        return "a boolean";
    case JSON_NULL:
        return "null";
    }
    return "?";
}

static void supported_dtypes(char *buf, size_t size)
{
    size_t used = 0;
    buf[0] = '\0';
    for (int i = 0; i < ST_DTYPE_COUNT && used < size; i++)
        used +=
            (size_t)snprintf(buf + used, size - used, "%s%s", i ? ", " : "", dtype_table[i].name);
}

/* Fills t from one header entry; checks dtype, shape and offsets against the data area. */
static int parse_entry(const struct st_file *f, const char *name, json_t *entry,
                       struct st_tensor *t, char *err, size_t errsize)
{
    const char *path = f->path;
    if (!json_is_object(entry))
        return st_fail(err, errsize, "%s: tensor '%s': entry is %s, expected an object", path, name,
                       json_kind(entry));

    json_t *dtype = json_object_get(entry, "dtype");
    if (!dtype) return st_fail(err, errsize, "%s: tensor '%s': no 'dtype'", path, name);
    if (!json_is_string(dtype))
        return st_fail(err, errsize, "%s: tensor '%s': 'dtype' is %s, expected a string", path,
                       name, json_kind(dtype));
    if (st_dtype_parse(json_string_value(dtype), &t->dtype) != 0) {
        char list[160];
        supported_dtypes(list, sizeof list);
        return st_fail(err, errsize, "%s: tensor '%s': dtype '%s' is not supported (supported: %s)",
                       path, name, json_string_value(dtype), list);
    }

    json_t *shape = json_object_get(entry, "shape");
    if (!shape) return st_fail(err, errsize, "%s: tensor '%s': no 'shape'", path, name);
    if (!json_is_array(shape))
        return st_fail(err, errsize, "%s: tensor '%s': 'shape' is %s, expected an array", path,
                       name, json_kind(shape));
    size_t rank = json_array_size(shape);
    if (rank > ST_MAX_RANK)
        return st_fail(err, errsize, "%s: tensor '%s': rank %zu exceeds the supported %d", path,
                       name, rank, ST_MAX_RANK);
    t->rank = (int)rank;
    t->numel = 1;
    for (size_t i = 0; i < rank; i++) {
        json_t *d = json_array_get(shape, i);
        if (!json_is_integer(d))
            return st_fail(err, errsize, "%s: tensor '%s': shape[%zu] is %s, expected an integer",
                           path, name, i, json_kind(d));
        json_int_t v = json_integer_value(d);
        if (v < 0)
            return st_fail(err, errsize, "%s: tensor '%s': shape[%zu] is negative (%lld)", path,
                           name, i, (long long)v);
        t->shape[i] = (int64_t)v;
        if (v != 0 && t->numel > INT64_MAX / v)
            return st_fail(err, errsize, "%s: tensor '%s': shape product overflows", path, name);
        t->numel *= (int64_t)v;
    }
    size_t esize = st_dtype_size(t->dtype);
    if ((uint64_t)t->numel > (uint64_t)SIZE_MAX / esize)
        return st_fail(err, errsize, "%s: tensor '%s': byte size overflows", path, name);
    size_t expected = (size_t)t->numel * esize;

    json_t *offsets = json_object_get(entry, "data_offsets");
    if (!offsets) return st_fail(err, errsize, "%s: tensor '%s': no 'data_offsets'", path, name);
    if (!json_is_array(offsets) || json_array_size(offsets) != 2 ||
        !json_is_integer(json_array_get(offsets, 0)) ||
        !json_is_integer(json_array_get(offsets, 1)))
        return st_fail(err, errsize, "%s: tensor '%s': 'data_offsets' is not [begin, end] integers",
                       path, name);
    json_int_t begin = json_integer_value(json_array_get(offsets, 0));
    json_int_t end = json_integer_value(json_array_get(offsets, 1));
    if (begin < 0 || end < 0)
        return st_fail(err, errsize, "%s: tensor '%s': data_offsets [%lld, %lld] are negative",
                       path, name, (long long)begin, (long long)end);
    if (begin > end)
        return st_fail(err, errsize, "%s: tensor '%s': data_offsets [%lld, %lld] begin after end",
                       path, name, (long long)begin, (long long)end);
    if ((unsigned long long)end > f->data_size)
        return st_fail(
            err, errsize,
            "%s: tensor '%s': data_offsets [%lld, %lld] end beyond the data area (%zu bytes)", path,
            name, (long long)begin, (long long)end, f->data_size);
    if ((size_t)(end - begin) != expected) {
        char dims[160];
        size_t used = 0;
        dims[0] = '\0';
        for (int i = 0; i < t->rank && used < sizeof dims; i++)
            used += (size_t)snprintf(dims + used, sizeof dims - used, "%s%lld", i ? ", " : "",
                                     (long long)t->shape[i]);
        return st_fail(err, errsize,
                       "%s: tensor '%s': data_offsets [%lld, %lld] hold %lld bytes, but %s [%s] "
                       "needs %zu",
                       path, name, (long long)begin, (long long)end, (long long)(end - begin),
                       st_dtype_name(t->dtype), dims, expected);
    }
    t->data = f->data_area + begin;
    t->nbytes = expected;
    t->file = f->path;
    return 0;
}

static int parse_metadata(struct st_file *f, json_t *meta, char *err, size_t errsize)
{
    if (!json_is_object(meta))
        return st_fail(err, errsize, "%s: '__metadata__' is %s, expected an object of strings",
                       f->path, json_kind(meta));
    size_t n = json_object_size(meta);
    f->metadata_keys = xcalloc(n ? n : 1, sizeof(char *));
    f->metadata_values = xcalloc(n ? n : 1, sizeof(char *));
    const char *key;
    json_t *value;
    json_object_foreach(meta, key, value)
    {
        if (!json_is_string(value))
            return st_fail(err, errsize, "%s: '__metadata__' key '%s' is %s, expected a string",
                           f->path, key, json_kind(value));
        f->metadata_keys[f->n_metadata] = xstrdup(key);
        f->metadata_values[f->n_metadata] = xstrdup(json_string_value(value));
        f->n_metadata++;
    }
    return 0;
}

static int parse_header(struct st_file *f, char *err, size_t errsize)
{
    const unsigned char *bytes = f->map;
    uint64_t header_len = 0;
    for (int i = 7; i >= 0; i--) header_len = (header_len << 8) | bytes[i];
    if (header_len > f->map_size - 8)
        return st_fail(err, errsize, "%s: header length %llu exceeds the file (%zu bytes)", f->path,
                       (unsigned long long)header_len, f->map_size);
    if (header_len > ST_MAX_HEADER_BYTES)
        return st_fail(err, errsize, "%s: header length %llu exceeds the limit of %llu bytes",
                       f->path, (unsigned long long)header_len, ST_MAX_HEADER_BYTES);
    f->data_area = bytes + 8 + header_len;
    f->data_size = f->map_size - 8 - (size_t)header_len;

    json_error_t jerr;
    json_t *root =
        json_loadb((const char *)bytes + 8, (size_t)header_len, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return st_fail(err, errsize, "%s: header is not valid JSON: %s (at byte %d)", f->path,
                       jerr.text, jerr.position);
    int rc = 0;
    if (!json_is_object(root)) {
        rc = st_fail(err, errsize, "%s: header is %s, expected a JSON object", f->path,
                     json_kind(root));
        goto done;
    }
    size_t n = json_object_size(root);
    f->tensors = xcalloc(n ? n : 1, sizeof(struct st_tensor));
    const char *key;
    json_t *value;
    json_object_foreach(root, key, value)
    {
        if (strcmp(key, "__metadata__") == 0) {
            if ((rc = parse_metadata(f, value, err, errsize)) != 0) goto done;
            continue;
        }
        struct st_tensor *t = &f->tensors[f->n_tensors];
        if ((rc = parse_entry(f, key, value, t, err, errsize)) != 0) goto done;
        t->name = xstrdup(key);
        f->n_tensors++;
    }

    /* No two tensors may share bytes. Empty tensors own none and are skipped. */
    struct st_tensor **order = xmalloc((f->n_tensors ? f->n_tensors : 1) * sizeof *order);
    int n_order = 0;
    for (int i = 0; i < f->n_tensors; i++)
        if (f->tensors[i].nbytes) order[n_order++] = &f->tensors[i];
    qsort(order, (size_t)n_order, sizeof *order, tensor_by_offset);
    const struct st_tensor *furthest = NULL; /* the tensor ending last so far */
    for (int i = 0; i < n_order && rc == 0; i++) {
        const unsigned char *begin = order[i]->data;
        if (furthest && begin < (const unsigned char *)furthest->data + furthest->nbytes)
            rc = st_fail(err, errsize, "%s: tensor '%s' overlaps tensor '%s' in the data area",
                         f->path, order[i]->name, furthest->name);
        if (!furthest ||
            begin + order[i]->nbytes > (const unsigned char *)furthest->data + furthest->nbytes)
            furthest = order[i];
    }
    free(order);
    qsort(f->tensors, (size_t)f->n_tensors, sizeof *f->tensors, tensor_by_name);
done:
    json_decref(root);
    return rc;
}

struct st_file *st_open(const char *path, char *err, size_t errsize)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        st_fail(err, errsize, "%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        st_fail(err, errsize, "%s: cannot stat: %s", path, strerror(errno));
        close(fd);
        return NULL;
    }
    if (!S_ISREG(sb.st_mode)) {
        st_fail(err, errsize, "%s: not a regular file", path);
        close(fd);
        return NULL;
    }
    if (sb.st_size < 8) {
        st_fail(err, errsize, "%s: file is %lld bytes, shorter than the 8-byte header length", path,
                (long long)sb.st_size);
        close(fd);
        return NULL;
    }
    void *map = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    int map_errno = errno;
    close(fd);
    if (map == MAP_FAILED) {
        st_fail(err, errsize, "%s: cannot mmap: %s", path, strerror(map_errno));
        return NULL;
    }
    struct st_file *f = xcalloc(1, sizeof *f);
    f->path = xstrdup(path);
    f->map = map;
    f->map_size = (size_t)sb.st_size;
    if (parse_header(f, err, errsize) != 0) {
        st_close(f);
        return NULL;
    }
    return f;
}

void st_close(struct st_file *f)
{
    if (!f) return;
    for (int i = 0; i < f->n_tensors; i++) free((char *)f->tensors[i].name);
    free(f->tensors);
    for (int i = 0; i < f->n_metadata; i++) {
        free(f->metadata_keys[i]);
        free(f->metadata_values[i]);
    }
    free(f->metadata_keys);
    free(f->metadata_values);
    if (f->map) munmap(f->map, f->map_size);
    free(f->path);
    free(f);
}

static const struct st_tensor *find_sorted(const struct st_tensor *tensors, int n, const char *name)
{
    int lo = 0, hi = n - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2;
        int c = strcmp(name, tensors[mid].name);
        if (c == 0) return &tensors[mid];
        if (c < 0)
            hi = mid - 1;
        else
            lo = mid + 1;
    }
    return NULL;
}

const struct st_tensor *st_file_find(const struct st_file *f, const char *name)
{
    return find_sorted(f->tensors, f->n_tensors, name);
}

const char *st_file_metadata(const struct st_file *f, const char *key)
{
    for (int i = 0; i < f->n_metadata; i++)
        if (strcmp(f->metadata_keys[i], key) == 0) return f->metadata_values[i];
    return NULL;
}

/* ---- checkpoint directories -------------------------------------------------------- */

static int file_exists(const char *path)
{
    struct stat sb;
    return stat(path, &sb) == 0;
}

/* Index format (transformers save_pretrained): {"metadata": {...}, "weight_map":
 * {tensor name: shard file name}}. Only mapped tensors are visible, as in transformers. */
static int open_index(struct st_checkpoint *c, const char *index_path, char *err, size_t errsize)
{
    json_error_t jerr;
    json_t *root = json_load_file(index_path, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return st_fail(err, errsize, "%s: not valid JSON: %s (line %d, column %d)", index_path,
                       jerr.text, jerr.line, jerr.column);
    int rc = 0;
    json_t *map = json_is_object(root) ? json_object_get(root, "weight_map") : NULL;
    if (!json_is_object(root)) {
        rc = st_fail(err, errsize, "%s: expected a JSON object", index_path);
        goto done;
    }
    if (!map) {
        rc = st_fail(err, errsize, "%s: no 'weight_map'", index_path);
        goto done;
    }
    if (!json_is_object(map)) {
        rc = st_fail(err, errsize, "%s: 'weight_map' is %s, expected an object", index_path,
                     json_kind(map));
        goto done;
    }
    size_t n = json_object_size(map);
    c->files = xcalloc(n ? n : 1, sizeof *c->files);
    char **names = xcalloc(n ? n : 1, sizeof *names);
    c->tensors = xcalloc(n ? n : 1, sizeof *c->tensors);
    const char *key;
    json_t *value;
    json_object_foreach(map, key, value)
    {
        if (!json_is_string(value)) {
            rc = st_fail(err, errsize, "%s: weight_map['%s'] is %s, expected a file name",
                         index_path, key, json_kind(value));
            break;
        }
        const char *shard = json_string_value(value);
        /* shards live in the checkpoint directory itself */
        if (shard[0] == '\0' || strchr(shard, '/') || strcmp(shard, ".") == 0 ||
            strcmp(shard, "..") == 0) {
            rc = st_fail(err, errsize, "%s: weight_map['%s'] = '%s' is not a file name in %s",
                         index_path, key, shard, c->dir);
            break;
        }
        int s = 0;
        while (s < c->n_files && strcmp(names[s], shard) != 0) s++;
        if (s == c->n_files) {
            char *path = st_join_path(c->dir, shard);
            char inner[768];
            c->files[s] = st_open(path, inner, sizeof inner);
            free(path);
            if (!c->files[s]) {
                rc = st_fail(err, errsize, "%s: shard '%s' (tensor '%s'): %s", index_path, shard,
                             key, inner);
                break;
            }
            names[s] = xstrdup(shard);
            c->n_files++;
        }
        const struct st_tensor *t = st_file_find(c->files[s], key);
        if (!t) {
            rc = st_fail(err, errsize, "%s: tensor '%s' is mapped to %s, which has no such tensor",
                         index_path, key, c->files[s]->path);
            break;
        }
        c->tensors[c->n_tensors++] = *t;
    }
    for (int s = 0; s < c->n_files; s++) free(names[s]);
    free(names);
    if (rc == 0) qsort(c->tensors, (size_t)c->n_tensors, sizeof *c->tensors, tensor_by_name);
done:
    json_decref(root);
    return rc;
}

struct st_checkpoint *st_checkpoint_open(const char *dir, char *err, size_t errsize)
{
    struct st_checkpoint *c = xcalloc(1, sizeof *c);
    c->dir = xstrdup(dir);
    char *single = st_join_path(dir, "model.safetensors");
    char *index = st_join_path(dir, "model.safetensors.index.json");
    int rc = 0;
    /* transformers looks for the single file first, then the index */
    if (file_exists(single)) {
        c->files = xcalloc(1, sizeof *c->files);
        c->files[0] = st_open(single, err, errsize);
        if (!c->files[0]) {
            rc = -1;
        } else {
            c->n_files = 1;
            c->n_tensors = c->files[0]->n_tensors;
            c->tensors = xmalloc((c->n_tensors ? c->n_tensors : 1) * sizeof *c->tensors);
            memcpy(c->tensors, c->files[0]->tensors, c->n_tensors * sizeof *c->tensors);
        }
    } else if (file_exists(index)) {
        rc = open_index(c, index, err, errsize);
    } else {
        rc = st_fail(err, errsize, "%s: no model.safetensors or model.safetensors.index.json", dir);
    }
    free(single);
    free(index);
    if (rc != 0) {
        st_checkpoint_close(c);
        return NULL;
    }
    return c;
}

void st_checkpoint_close(struct st_checkpoint *c)
{
    if (!c) return;
    for (int i = 0; i < c->n_files; i++) st_close(c->files[i]);
    free(c->files);
    free(c->tensors);
    free(c->dir);
    free(c);
}

const struct st_tensor *st_find(const struct st_checkpoint *c, const char *name)
{
    return find_sorted(c->tensors, c->n_tensors, name);
}

const struct st_tensor *st_get(const struct st_checkpoint *c, const char *name, char *err,
                               size_t errsize)
{
    const struct st_tensor *t = st_find(c, name);
    if (!t) st_fail(err, errsize, "%s: tensor '%s' not found in the checkpoint", c->dir, name);
    return t;
}

/* ---- conversion and shape checks --------------------------------------------------- */

int st_read_f32(const struct st_tensor *t, float *out, size_t count, char *err, size_t errsize)
{
    if (count != (size_t)t->numel)
        return st_fail(err, errsize, "%s: tensor '%s': asked for %zu values, it holds %lld",
                       t->file, t->name, count, (long long)t->numel);
    const unsigned char *p = t->data;
    switch (t->dtype) {
    case ST_F32:
        memcpy(out, p, count * 4);
        return 0;
    case ST_BF16:
        for (size_t i = 0; i < count; i++)
            out[i] = st_bf16_to_f32((uint16_t)(p[2 * i] | (p[2 * i + 1] << 8)));
        return 0;
    case ST_F16:
        for (size_t i = 0; i < count; i++)
            out[i] = st_f16_to_f32((uint16_t)(p[2 * i] | (p[2 * i + 1] << 8)));
        return 0;
    case ST_F64:
        for (size_t i = 0; i < count; i++) {
            double d;
            memcpy(&d, p + 8 * i, 8);
            out[i] = (float)d;
        }
        return 0;
    case ST_F8_E4M3:
    case ST_F8_E5M2:
        return st_fail(err, errsize,
                       "%s: tensor '%s': dtype %s is block-quantised: its values need their "
                       "weight_scale_inv tensor (only model weights are read that way)",
                       t->file, t->name, st_dtype_name(t->dtype));
    default:
        return st_fail(err, errsize, "%s: tensor '%s': dtype %s is not a floating-point type",
                       t->file, t->name, st_dtype_name(t->dtype));
    }
}

static void format_dims(char *buf, size_t size, int rank, const int64_t *dims)
{
    size_t used = (size_t)snprintf(buf, size, "[");
    for (int i = 0; i < rank && used < size; i++)
        used +=
            (size_t)snprintf(buf + used, size - used, "%s%lld", i ? ", " : "", (long long)dims[i]);
    if (used < size) snprintf(buf + used, size - used, "]");
}

int st_check_shape(const struct st_tensor *t, int rank, const int64_t *dims, char *err,
                   size_t errsize)
{
    int same = t->rank == rank;
    for (int i = 0; same && i < rank; i++) same = t->shape[i] == dims[i];
    if (same) return 0;
    char want[200], got[200];
    format_dims(want, sizeof want, rank, dims);
    format_dims(got, sizeof got, t->rank, t->shape);
    return st_fail(err, errsize, "%s: tensor '%s': expected shape %s, got %s", t->file, t->name,
                   want, got);
}

/* ---- writing ----------------------------------------------------------------------- */

struct st_entry {
    char *name;
    enum st_dtype dtype;
    int rank;
    int64_t shape[ST_MAX_RANK];
    const void *data;
    size_t nbytes;
    int64_t numel;
};

struct st_writer {
    int n, capacity;
    struct st_entry *entries;
};

struct st_writer *st_writer_new(void)
{
    return xcalloc(1, sizeof(struct st_writer));
}

void st_writer_free(struct st_writer *w)
{
    if (!w) return;
    for (int i = 0; i < w->n; i++) free(w->entries[i].name);
    free(w->entries);
    free(w);
}

int st_writer_add(struct st_writer *w, const char *name, enum st_dtype dtype, int rank,
                  const int64_t *shape, const void *data, char *err, size_t errsize)
{
    if ((unsigned)dtype >= ST_DTYPE_COUNT)
        return st_fail(err, errsize, "tensor '%s': invalid dtype %d", name, (int)dtype);
    if (rank < 0 || rank > ST_MAX_RANK)
        return st_fail(err, errsize, "tensor '%s': rank %d outside 0..%d", name, rank, ST_MAX_RANK);
    if (strcmp(name, "__metadata__") == 0 || name[0] == '\0')
        return st_fail(err, errsize, "tensor name '%s' is reserved", name);
    struct st_entry e = {.dtype = dtype, .rank = rank, .data = data, .numel = 1};
    for (int i = 0; i < rank; i++) {
        if (shape[i] < 0)
            return st_fail(err, errsize, "tensor '%s': shape[%d] is negative (%lld)", name, i,
                           (long long)shape[i]);
        if (shape[i] != 0 && e.numel > INT64_MAX / shape[i])
            return st_fail(err, errsize, "tensor '%s': shape product overflows", name);
        e.shape[i] = shape[i];
        e.numel *= shape[i];
    }
    e.nbytes = (size_t)e.numel * st_dtype_size(dtype);
    if (e.nbytes && !data) return st_fail(err, errsize, "tensor '%s': no data", name);
    if (w->n == w->capacity) {
        w->capacity = w->capacity ? 2 * w->capacity : 64;
        struct st_entry *grown = realloc(w->entries, (size_t)w->capacity * sizeof *grown);
        if (!grown) fatal(EXIT_RUNTIME, "out of memory growing a safetensors writer");
        w->entries = grown;
    }
    e.name = xstrdup(name);
    w->entries[w->n++] = e;
    return 0;
}

static int entry_ptr_by_name(const void *a, const void *b)
{
    return strcmp((*(const struct st_entry *const *)a)->name,
                  (*(const struct st_entry *const *)b)->name);
}

/* Entries sorted by name; -1 + err on a duplicate name. */
static const struct st_entry **sorted_entries(const struct st_writer *w, char *err, size_t errsize)
{
    const struct st_entry **order = xmalloc((w->n ? w->n : 1) * sizeof *order);
    for (int i = 0; i < w->n; i++) order[i] = &w->entries[i];
    qsort(order, (size_t)w->n, sizeof *order, entry_ptr_by_name);
    for (int i = 1; i < w->n; i++)
        if (strcmp(order[i - 1]->name, order[i]->name) == 0) {
            st_fail(err, errsize, "tensor '%s' added twice", order[i]->name);
            free(order);
            return NULL;
        }
    return order;
}

/* The entries through a stream: declared, the files opened (one file at path, or a
 * checkpoint directory at path), each entry's bytes written, finished. */
static int write_through_stream(const struct st_writer *w, const char *path, int with_metadata,
                                size_t max_shard_bytes, bool checkpoint, char *err, size_t errsize)
{
    struct st_stream *s = st_stream_new();
    int rc = 0;
    for (int i = 0; i < w->n && rc == 0; i++) {
        const struct st_entry *e = &w->entries[i];
        rc = st_stream_declare(s, e->name, e->dtype, e->rank, e->shape, err, errsize);
    }
    if (rc == 0)
        rc = checkpoint ? st_stream_open_checkpoint(s, path, max_shard_bytes, err, errsize)
                        : st_stream_open_file(s, path, with_metadata, err, errsize);
    for (int i = 0; i < w->n && rc == 0; i++) {
        const struct st_entry *e = &w->entries[i];
        rc = st_stream_write(s, e->name, 0, e->data, e->nbytes, err, errsize);
    }
    if (rc == 0) rc = st_stream_finish(s, err, errsize);
    st_stream_free(s);
    return rc;
}

int st_writer_write(const struct st_writer *w, const char *path, int with_metadata, char *err,
                    size_t errsize)
{
    return write_through_stream(w, path, with_metadata, 0, false, err, errsize);
}

void st_shard_name(int index, int count, char *buf, size_t bufsize)
{
    snprintf(buf, bufsize, "model-%05d-of-%05d.safetensors", index, count);
}

/* Shards the greedy rule of st_writer_write_checkpoint makes under a byte limit. */
static int count_shards(const struct st_entry **order, int n, size_t limit)
{
    int shards = 1;
    size_t used = 0;
    for (int i = 0; i < n; i++) {
        if (used > 0 && used + order[i]->nbytes > limit) {
            shards++;
            used = 0;
        }
        used += order[i]->nbytes;
    }
    return shards;
}

size_t st_writer_shard_limit(const struct st_writer *w, int n_shards)
{
    char err[256];
    const struct st_entry **order = sorted_entries(w, err, sizeof err);
    if (!order || n_shards <= 1) {
        free(order);
        return 0;
    }
    size_t total = 0, largest = 0;
    for (int i = 0; i < w->n; i++) {
        total += order[i]->nbytes;
        if (order[i]->nbytes > largest) largest = order[i]->nbytes;
    }
    /* the smallest limit giving at most n_shards: count_shards never rises as the limit
     * grows, so bisect between the even share and the whole */
    size_t low = total / (size_t)n_shards, high = total;
    if (low < largest) low = largest;
    while (low < high) {
        size_t mid = low + (high - low) / 2;
        if (count_shards(order, w->n, mid) <= n_shards)
            high = mid;
        else
            low = mid + 1;
    }
    free(order);
    return low;
}

int st_writer_write_checkpoint(const struct st_writer *w, const char *dir, size_t max_shard_bytes,
                               char *err, size_t errsize)
{
    return write_through_stream(w, dir, 1, max_shard_bytes, true, err, errsize);
}
