/* fuzz_safetensors_index: libFuzzer harness for a sharded checkpoint's index,
 * model.safetensors.index.json (src/safetensors.c, st_checkpoint_open). The input is the
 * index; it lies in a directory that also holds two small shards written once by esft's
 * own writer and a file that is not a safetensors file, so a weight_map can name real
 * shards, missing ones, a bad one, or paths that leave the directory. For an index that
 * opens: tensors sorted by name and found by st_find, each view inside one of the opened
 * shards.
 * Seeds: tests/fuzz/corpus/safetensors_index (indexes over the shards below, in the
 * layout of tests/golden/qwen3_moe_bf16_sharded's). */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "fuzz.h"
#include "safetensors.h"

/* The shards: model-00001-of-00002 holds a.weight [2, 3] f32 and b.bias [3] bf16,
 * model-00002-of-00002 holds c.weight [4] f16 and an empty d.empty [0, 2] f32. */
static void write_shards(void)
{
    static const float a[6] = {1, 2, 3, 4, 5, 6};
    static const uint16_t b[3] = {0x3f80, 0x4000, 0x4040}, c[4] = {0x3c00, 0x4000, 0x4200, 0};
    const int64_t a_shape[2] = {2, 3}, b_shape[1] = {3}, c_shape[1] = {4}, d_shape[2] = {0, 2};
    char err[512];
    struct st_writer *one = st_writer_new(), *two = st_writer_new();
    fuzz_require(st_writer_add(one, "a.weight", ST_F32, 2, a_shape, a, err, sizeof err) == 0);
    fuzz_require(st_writer_add(one, "b.bias", ST_BF16, 1, b_shape, b, err, sizeof err) == 0);
    fuzz_require(st_writer_add(two, "c.weight", ST_F16, 1, c_shape, c, err, sizeof err) == 0);
    fuzz_require(st_writer_add(two, "d.empty", ST_F32, 2, d_shape, a, err, sizeof err) == 0);
    fuzz_require(st_writer_write(one, fuzz_path("model-00001-of-00002.safetensors"), 1, err,
                                 sizeof err) == 0);
    fuzz_require(st_writer_write(two, fuzz_path("model-00002-of-00002.safetensors"), 0, err,
                                 sizeof err) == 0);
    st_writer_free(one);
    st_writer_free(two);
    static const uint8_t not_safetensors[] = "{\"model_type\": \"qwen3_moe\"}\n";
    fuzz_write_file("config.json", not_safetensors, sizeof not_safetensors - 1);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int ready;
    if (!ready) {
        write_shards();
        ready = 1;
    }
    char err[2048];
    fuzz_write_file("model.safetensors.index.json", data, size);
    struct st_checkpoint *c = st_checkpoint_open(fuzz_directory(), err, sizeof err);
    if (!c) return 0;

    for (int i = 0; i < c->n_tensors; i++) {
        const struct st_tensor *t = &c->tensors[i];
        if (i > 0) fuzz_require(strcmp(c->tensors[i - 1].name, t->name) < 0);
        fuzz_require(st_find(c, t->name) == t);
        int inside = 0;
        for (int s = 0; s < c->n_files; s++) {
            const struct st_file *f = c->files[s];
            const unsigned char *begin = t->data, *area = f->data_area;
            if (t->file == f->path && begin >= area && begin <= area + f->data_size &&
                t->nbytes <= f->data_size - (size_t)(begin - area))
                inside = 1;
        }
        fuzz_require(inside);
    }
    st_checkpoint_close(c);
    return 0;
}
