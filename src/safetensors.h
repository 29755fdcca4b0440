/* safetensors: read and write Hugging Face safetensors files and checkpoint directories.
 *
 * Callers: the model loader (st_checkpoint_open, st_find/st_get, st_expect_shape,
 * st_read_f32), the `init` and `export` phases (st_writer), tests.
 *
 * File format (huggingface/safetensors, README "Format"): 8 bytes little-endian u64 N,
 * then N bytes of UTF-8 JSON (an object; may be padded with trailing spaces), then the
 * data area. Each header entry maps a tensor name to {"dtype", "shape", "data_offsets":
 * [begin, end]}, offsets relative to the start of the data area; the optional
 * "__metadata__" entry is a string -> string map. Data is little-endian, row-major.
 *
 * Files are mmapped read-only; every size, shape and offset is checked against the file
 * before a view is handed out. Readers never exit: they return NULL or -1 and write a
 * message naming the file (and the tensor) into err. */
#ifndef ESFT_SAFETENSORS_H
#define ESFT_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

/* The dtypes esft accepts; safetensors' sub-byte types and F8_E8M0 are rejected on read.
 * The fp8 ones hold block-quantised weights (DeepSeek-V3): the loader multiplies them by
 * their scale tensor; st_read_f32 refuses them, since a value alone is not the weight. */
enum st_dtype {
    ST_BOOL,
    ST_U8,
    ST_I8,
    ST_I16,
    ST_U16,
    ST_F16,
    ST_BF16,
    ST_I32,
    ST_U32,
    ST_F32,
    ST_F64,
    ST_I64,
    ST_U64,
    ST_F8_E4M3, /* torch.float8_e4m3fn */
    ST_F8_E5M2, /* torch.float8_e5m2 */
    ST_DTYPE_COUNT
};

/* "BF16", "F32", ... as spelled in the header. */
const char *st_dtype_name(enum st_dtype dtype);
/* Bytes per element. */
size_t st_dtype_size(enum st_dtype dtype);
/* Header spelling -> dtype; -1 when the spelling is not one esft accepts. */
int st_dtype_parse(const char *name, enum st_dtype *out);

#define ST_MAX_RANK 8
/* Largest header accepted, the same cap as the reference reader (safetensors
 * MAX_HEADER_SIZE = 100,000,000): a bigger one is a corrupt length field. */
#define ST_MAX_HEADER_BYTES 100000000ULL

/* A view of one tensor inside a mapped file. `data` points into the mapping and is not
 * necessarily aligned to the element size: read it with memcpy or st_read_f32. */
struct st_tensor {
    const char *name;
    enum st_dtype dtype;
    int rank;
    int64_t shape[ST_MAX_RANK];
    int64_t numel;    /* product of shape (1 for rank 0) */
    const void *data; /* numel * dtype size bytes */
    size_t nbytes;
    const char *file; /* path of the file it lives in */
};

/* One mapped file. Tensors are sorted by name (strcmp order). Read-only to callers. */
struct st_file {
    char *path;
    void *map;
    size_t map_size;
    const unsigned char *data_area; /* start of the data area inside map */
    size_t data_size;
    int n_tensors;
    struct st_tensor *tensors;
    int n_metadata;
    char **metadata_keys;
    char **metadata_values;
};

/* Maps and validates one file. NULL and a message in err on any problem. */
struct st_file *st_open(const char *path, char *err, size_t errsize);
void st_close(struct st_file *file);
/* A tensor of this file, or NULL. */
const struct st_tensor *st_file_find(const struct st_file *file, const char *name);
/* A __metadata__ value, or NULL. */
const char *st_file_metadata(const struct st_file *file, const char *key);

/* A checkpoint directory: model.safetensors, or the shards named by
 * model.safetensors.index.json. `tensors` (sorted by name) is the iteration order; the
 * views point into the shards' mappings. */
struct st_checkpoint {
    char *dir;
    int n_files;
    struct st_file **files;
    int n_tensors;
    struct st_tensor *tensors;
};

struct st_checkpoint *st_checkpoint_open(const char *dir, char *err, size_t errsize);
void st_checkpoint_close(struct st_checkpoint *ckpt);
/* Binary search by name; NULL when absent. */
const struct st_tensor *st_find(const struct st_checkpoint *ckpt, const char *name);
/* st_find that writes "DIR: tensor 'NAME' not found" into err when absent. */
const struct st_tensor *st_get(const struct st_checkpoint *ckpt, const char *name, char *err,
                               size_t errsize);

/* Converts a BF16/F16/F32/F64 tensor to fp32; count must equal numel. 0 or -1 + err
 * (also for an fp8 tensor: its values mean nothing without their scales). */
int st_read_f32(const struct st_tensor *t, float *out, size_t count, char *err, size_t errsize);

/* 0 when t has exactly this shape, else -1 and "FILE: tensor 'NAME': expected shape
 * [a, b], got [c]" in err. */
int st_check_shape(const struct st_tensor *t, int rank, const int64_t *dims, char *err,
                   size_t errsize);
/* st_expect_shape(t, err, errsize, E, I, H): the dims listed inline. */
#define st_expect_shape(t, err, errsize, ...)                                                      \
    st_check_shape((t), (int)(sizeof((int64_t[]){__VA_ARGS__}) / sizeof(int64_t)),                 \
                   (int64_t[]){__VA_ARGS__}, (err), (errsize))

/* Scalar conversions. Round to nearest, ties to even; NaN stays NaN (quiet), overflow
 * gives infinity, f16 underflow gives subnormals then signed zero. */
float st_bf16_to_f32(uint16_t h);
float st_f16_to_f32(uint16_t h);
uint16_t st_f32_to_bf16(float f);
uint16_t st_f32_to_f16(float f);
/* fp8, exact (every fp8 value is a float). E4M3 as torch.float8_e4m3fn (OCP FP8 "E4M3"):
 * 1 sign, 4 exponent bits (bias 7), 3 mantissa bits, subnormals m * 2^-9, no infinities,
 * 0x7F and 0xFF NaN, largest 448. E5M2 (torch.float8_e5m2): the top byte of an IEEE
 * binary16, infinities and NaNs included. */
float st_f8_e4m3_to_f32(uint8_t b);
float st_f8_e5m2_to_f32(uint8_t b);
/* Array forms for writers. */
void st_f32_to_bf16_array(const float *in, uint16_t *out, size_t n);
void st_f32_to_f16_array(const float *in, uint16_t *out, size_t n);
/* in[n] fp32 -> out in dtype (ST_BF16, ST_F16 rounded as above; anything else: fp32 as is). */
void st_f32_to_dtype_array(const float *in, void *out, size_t n, enum st_dtype dtype);

/* Writer: collect (name, dtype, shape, data) entries, then write one file, or shards and
 * an index. The data pointers are borrowed and must stay valid until the write. */
struct st_writer;
struct st_writer *st_writer_new(void);
void st_writer_free(struct st_writer *w);
/* -1 + err on a bad rank or a negative dimension; a duplicate name fails the write. */
int st_writer_add(struct st_writer *w, const char *name, enum st_dtype dtype, int rank,
                  const int64_t *shape, const void *data, char *err, size_t errsize);
/* Header with tensors sorted by name, data in the same order, header padded with spaces
 * to a multiple of 8; with_metadata adds {"format": "pt"} (what transformers writes).
 * Written to PATH.tmp, fsynced, renamed to PATH, directory fsynced: a crash leaves
 * either the old file or the new one, never a torn file. */
int st_writer_write(const struct st_writer *w, const char *path, int with_metadata, char *err,
                    size_t errsize);
/* Writes DIR/model.safetensors when the tensors fit in max_shard_bytes (0: no limit),
 * else DIR/model-0000i-of-0000n.safetensors (tensors in name order, a new shard when the
 * next one would pass the limit) and DIR/model.safetensors.index.json, the index last. */
int st_writer_write_checkpoint(const struct st_writer *w, const char *dir, size_t max_shard_bytes,
                               char *err, size_t errsize);
/* The smallest max_shard_bytes for which st_writer_write_checkpoint writes at most
 * n_shards files (as many as the tensors allow); 0 when n_shards <= 1. */
size_t st_writer_shard_limit(const struct st_writer *w, int n_shards);
/* "model-00001-of-00002.safetensors" (1-based index, the transformers spelling). */
void st_shard_name(int index, int count, char *buf, size_t bufsize);

#endif
