/* fuzz_safetensors: libFuzzer harness for one safetensors file (src/safetensors.c,
 * st_open): the input is the whole file (8-byte header length, JSON header, data area),
 * written to a temporary file since the reader maps a path. For a file that opens, the
 * header's promises are checked: tensors sorted by name, every view inside the data area
 * with numel x dtype-size bytes, views of different tensors disjoint; every tensor is
 * looked up by name and the floating-point ones converted to fp32 as the model loader
 * does.
 * Seeds: tests/fuzz/corpus/safetensors (small files laid out as esft's writer lays them
 * out, header padded to 8 bytes: f32, bf16, f16, f64 and i64 tensors, a scalar, an empty
 * tensor, fused experts' names, metadata, no tensor at all). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"
#include "safetensors.h"

static int is_float(enum st_dtype dtype)
{
    return dtype == ST_F32 || dtype == ST_BF16 || dtype == ST_F16 || dtype == ST_F64;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char err[1024];
    const char *path = fuzz_write_file("model.safetensors", data, size);
    struct st_file *f = st_open(path, err, sizeof err);
    if (!f) return 0;

    const unsigned char *area = f->data_area, *area_end = f->data_area + f->data_size;
    const unsigned char *map = f->map;
    fuzz_require(area >= map + 8 && area_end == map + f->map_size);
    for (int i = 0; i < f->n_tensors; i++) {
        const struct st_tensor *t = &f->tensors[i];
        if (i > 0) fuzz_require(strcmp(f->tensors[i - 1].name, t->name) < 0);
        fuzz_require(st_file_find(f, t->name) == t);
        fuzz_require(t->nbytes == (size_t)t->numel * st_dtype_size(t->dtype));
        const unsigned char *begin = t->data;
        fuzz_require(begin >= area && begin <= area_end && t->nbytes <= (size_t)(area_end - begin));
        for (int j = 0; j < i; j++) {
            const struct st_tensor *u = &f->tensors[j];
            const unsigned char *other = u->data;
            if (t->nbytes && u->nbytes)
                fuzz_require(begin + t->nbytes <= other || other + u->nbytes <= begin);
        }
        if (is_float(t->dtype) && t->numel <= 1 << 16) {
            float *values = malloc(((size_t)t->numel ? (size_t)t->numel : 1) * sizeof *values);
            fuzz_require(values != NULL);
            fuzz_require(st_read_f32(t, values, (size_t)t->numel, err, sizeof err) == 0);
            free(values);
        }
    }
    for (int i = 0; i < f->n_metadata; i++)
        fuzz_require(st_file_metadata(f, f->metadata_keys[i]) != NULL);
    st_close(f);
    return 0;
}
