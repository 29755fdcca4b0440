/* dataset: reading (dataset.h) and writing (dataset_write.h) the HDF5 token dataset that
 * `prepare` writes and score, train and eval read.
 *
 * Serial HDF5 on whichever rank calls: readers open the file read-only each for itself,
 * the writer is one rank. HDF5's own error printing is switched off inside these calls;
 * its message is put into ours instead. */
#include "dataset.h"

#include <errno.h>
#include <fcntl.h>
#include <hdf5.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "checksum.h"
#include "dataset_write.h"
#include "log.h"
#include "tokenizer.h"

#define FORMAT_NAME "esft-tokens"
#define FORMAT_VERSION 2 /* 2 adds tokenizer_checksum and special_tokens; 1 is read */

/* ---- HDF5 error handling ---------------------------------------------------------- */

/* Silences HDF5's automatic error-stack printing for the duration of one public call. */
struct h5_quiet {
    H5E_auto2_t func;
    void *data;
};

static void h5_quiet_begin(struct h5_quiet *q)
{
    H5Eget_auto2(H5E_DEFAULT, &q->func, &q->data);
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
}

static void h5_quiet_end(const struct h5_quiet *q)
{
    H5Eset_auto2(H5E_DEFAULT, q->func, q->data);
}

struct h5_stack_text {
    char outer[160], inner[160];
};

static herr_t h5_stack_entry(unsigned n, const H5E_error2_t *entry, void *data)
{
    struct h5_stack_text *text = data;
    if (n == 0) snprintf(text->outer, sizeof text->outer, "%s", entry->desc);
    snprintf(text->inner, sizeof text->inner, "%s", entry->desc);
    return 0;
}

/* The HDF5 message of the latest failure passed through h5_note. It must be taken at
 * the failing call: the next HDF5 call (a close) empties the error stack. */
static char h5_last[400];

/* Returns status (an hid_t or herr_t); when it is a failure, keeps the error stack as
 * "outer: inner" (the API call's complaint and the deepest cause) in h5_last. */
static int64_t h5_note(int64_t status)
{
    if (status >= 0) return status;
    struct h5_stack_text text = {"", ""};
    H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, h5_stack_entry, &text);
    H5Eclear2(H5E_DEFAULT);
    if (!text.outer[0])
        snprintf(h5_last, sizeof h5_last, "no HDF5 message");
    else if (strcmp(text.outer, text.inner) == 0)
        snprintf(h5_last, sizeof h5_last, "%s", text.outer);
    else
        snprintf(h5_last, sizeof h5_last, "%s: %s", text.outer, text.inner);
    return status;
}

/* ---- reading ---------------------------------------------------------------------- */

/* Reads the scalar string attribute name of the root group into *value (malloc'd). */
static int read_string_attribute(hid_t file, const char *path, const char *name, char **value,
                                 char *err, size_t err_size)
{
    *value = NULL;
    if (H5Aexists_by_name(file, ".", name, H5P_DEFAULT) <= 0) {
        snprintf(err, err_size, "%s: attribute '%s' is missing", path, name);
        return -1;
    }
    hid_t attr = h5_note(H5Aopen_by_name(file, ".", name, H5P_DEFAULT, H5P_DEFAULT));
    hid_t type = attr >= 0 ? H5Aget_type(attr) : -1;
    hid_t space = attr >= 0 ? H5Aget_space(attr) : -1;
    int status = -1;
    if (attr < 0 || type < 0 || space < 0) {
        snprintf(err, err_size, "%s: cannot read attribute '%s': %s", path, name, h5_last);
    } else if (H5Tget_class(type) != H5T_STRING || H5Sget_simple_extent_npoints(space) != 1) {
        snprintf(err, err_size, "%s: attribute '%s' is not a single string", path, name);
    } else {
        hid_t memtype = H5Tcopy(H5T_C_S1);
        H5Tset_cset(memtype, H5Tget_cset(type)); /* HDF5 converts no ASCII <-> UTF-8 */
        if (H5Tis_variable_str(type) > 0) {
            char *text = NULL;
            H5Tset_size(memtype, H5T_VARIABLE);
            if (h5_note(H5Aread(attr, memtype, &text)) >= 0 && text) {
                *value = xstrdup(text);
                H5free_memory(text);
                status = 0;
            }
        } else {
            size_t size = H5Tget_size(type);
            char *text = xcalloc(size + 1, 1);
            H5Tset_size(memtype, size);
            H5Tset_strpad(memtype, H5T_STR_NULLPAD);
            if (h5_note(H5Aread(attr, memtype, text)) >= 0) {
                *value = text;
                status = 0;
            } else {
                free(text);
            }
        }
        H5Tclose(memtype);
        if (status != 0) {
            snprintf(err, err_size, "%s: cannot read attribute '%s': %s", path, name, h5_last);
        }
    }
    if (space >= 0) H5Sclose(space);
    if (type >= 0) H5Tclose(type);
    if (attr >= 0) H5Aclose(attr);
    return status;
}

/* Reads the scalar non-negative integer attribute name of the root group. */
static int read_integer_attribute(hid_t file, const char *path, const char *name, uint64_t *value,
                                  char *err, size_t err_size)
{
    if (H5Aexists_by_name(file, ".", name, H5P_DEFAULT) <= 0) {
        snprintf(err, err_size, "%s: attribute '%s' is missing", path, name);
        return -1;
    }
    hid_t attr = h5_note(H5Aopen_by_name(file, ".", name, H5P_DEFAULT, H5P_DEFAULT));
    hid_t type = attr >= 0 ? H5Aget_type(attr) : -1;
    hid_t space = attr >= 0 ? H5Aget_space(attr) : -1;
    int status = -1;
    if (attr < 0 || type < 0 || space < 0) {
        snprintf(err, err_size, "%s: cannot read attribute '%s': %s", path, name, h5_last);
    } else if (H5Tget_class(type) != H5T_INTEGER || H5Sget_simple_extent_npoints(space) != 1) {
        snprintf(err, err_size, "%s: attribute '%s' is not a single integer", path, name);
    } else if (H5Tget_sign(type) == H5T_SGN_2) {
        int64_t v = 0;
        if (H5Aread(attr, H5T_NATIVE_INT64, &v) < 0 || v < 0) {
            snprintf(err, err_size, "%s: attribute '%s' is not a non-negative integer", path, name);
        } else {
            *value = (uint64_t)v;
            status = 0;
        }
    } else if (h5_note(H5Aread(attr, H5T_NATIVE_UINT64, value)) < 0) {
        snprintf(err, err_size, "%s: cannot read attribute '%s': %s", path, name, h5_last);
    } else {
        status = 0;
    }
    if (space >= 0) H5Sclose(space);
    if (type >= 0) H5Tclose(type);
    if (attr >= 0) H5Aclose(attr);
    return status;
}

/* Checks that dataset /name exists, is one-dimensional and holds unsigned integers of
 * `bytes` bytes; returns its length in *length. */
static int check_dataset(hid_t file, const char *path, const char *name, size_t bytes,
                         const char *type_name, uint64_t *length, char *err, size_t err_size)
{
    if (H5Lexists(file, name, H5P_DEFAULT) <= 0) {
        snprintf(err, err_size, "%s: dataset /%s is missing", path, name);
        return -1;
    }
    hid_t dset = h5_note(H5Dopen2(file, name, H5P_DEFAULT));
    if (dset < 0) {
        snprintf(err, err_size, "%s: /%s is not a readable dataset: %s", path, name, h5_last);
        return -1;
    }
    hid_t type = H5Dget_type(dset);
    hid_t space = H5Dget_space(dset);
    int status = -1;
    hsize_t dims[1] = {0};
    if (type < 0 || H5Tget_class(type) != H5T_INTEGER || H5Tget_size(type) != bytes ||
        H5Tget_sign(type) != H5T_SGN_NONE) {
        snprintf(err, err_size, "%s: dataset /%s must hold %s", path, name, type_name);
    } else if (space < 0 || H5Sget_simple_extent_ndims(space) != 1) {
        snprintf(err, err_size, "%s: dataset /%s must be one-dimensional", path, name);
    } else {
        H5Sget_simple_extent_dims(space, dims, NULL);
        *length = dims[0];
        status = 0;
    }
    if (space >= 0) H5Sclose(space);
    if (type >= 0) H5Tclose(type);
    H5Dclose(dset);
    return status;
}

/* Reads /offsets[0..count) and checks them against the token count. */
static int read_offsets(struct dataset *ds, uint64_t count, char *err, size_t err_size)
{
    ds->offsets = xmalloc(count * sizeof *ds->offsets);
    hid_t dset = h5_note(H5Dopen2((hid_t)ds->file, "offsets", H5P_DEFAULT));
    herr_t read =
        dset >= 0
            ? h5_note(H5Dread(dset, H5T_NATIVE_UINT64, H5S_ALL, H5S_ALL, H5P_DEFAULT, ds->offsets))
            : -1;
    if (dset >= 0) H5Dclose(dset);
    if (read < 0) {
        snprintf(err, err_size, "%s: cannot read /offsets: %s", ds->path, h5_last);
        return -1;
    }
    if (ds->offsets[0] != 0) {
        snprintf(err, err_size, "%s: /offsets[0] is %llu; it must be 0", ds->path,
                 (unsigned long long)ds->offsets[0]);
        return -1;
    }
    for (uint64_t i = 1; i < count; i++)
        if (ds->offsets[i] < ds->offsets[i - 1]) {
            snprintf(err, err_size,
                     "%s: /offsets[%llu] = %llu is less than /offsets[%llu] = %llu "
                     "(offsets must never decrease)",
                     ds->path, (unsigned long long)i, (unsigned long long)ds->offsets[i],
                     (unsigned long long)(i - 1), (unsigned long long)ds->offsets[i - 1]);
            return -1;
        }
    if (ds->offsets[count - 1] != ds->n_tokens) {
        snprintf(err, err_size,
                 "%s: the last offset, /offsets[%llu] = %llu, must equal the length of "
                 "/tokens (%llu)",
                 ds->path, (unsigned long long)(count - 1),
                 (unsigned long long)ds->offsets[count - 1], (unsigned long long)ds->n_tokens);
        return -1;
    }
    return 0;
}

static int open_checked(struct dataset *ds, const char *path, char *err, size_t err_size)
{
    if (access(path, R_OK) != 0) {
        snprintf(err, err_size, "%s: cannot open token dataset: %s", path, strerror(errno));
        return -1;
    }
    hid_t file = h5_note(H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT));
    if (file < 0) {
        snprintf(err, err_size, "%s: not a readable HDF5 file (%s)", path, h5_last);
        return -1;
    }
    ds->file = file;

    char *format = NULL;
    if (read_string_attribute(file, path, "format", &format, err, err_size) != 0) return -1;
    bool right_format = strcmp(format, FORMAT_NAME) == 0;
    if (!right_format)
        snprintf(err, err_size,
                 "%s: attribute 'format' is '%.100s', expected '%s' (not an "
                 "esft token dataset)",
                 path, format, FORMAT_NAME);
    free(format);
    if (!right_format) return -1;
    uint64_t version = 0;
    if (read_integer_attribute(file, path, "version", &version, err, err_size) != 0) return -1;
    if (version != FORMAT_VERSION && version != 1) {
        snprintf(err, err_size,
                 "%s: attribute 'version' is %llu; this esft reads versions 1 and %d", path,
                 (unsigned long long)version, FORMAT_VERSION);
        return -1;
    }

    uint64_t n_tokens = 0, n_offsets = 0, n_mask = 0;
    if (check_dataset(file, path, "tokens", 4, "uint32", &n_tokens, err, err_size) != 0 ||
        check_dataset(file, path, "offsets", 8, "uint64", &n_offsets, err, err_size) != 0 ||
        check_dataset(file, path, "loss_mask", 1, "uint8", &n_mask, err, err_size) != 0)
        return -1;
    if (n_offsets < 1) {
        snprintf(err, err_size, "%s: dataset /offsets is empty; it needs n_samples + 1 entries",
                 path);
        return -1;
    }
    if (n_mask != n_tokens) {
        snprintf(err, err_size,
                 "%s: dataset /loss_mask has %llu entries, /tokens has %llu; "
                 "they must be equal",
                 path, (unsigned long long)n_mask, (unsigned long long)n_tokens);
        return -1;
    }
    ds->n_tokens = n_tokens;
    ds->n_samples = n_offsets - 1;

    uint64_t n_samples_attr = 0, n_tokens_attr = 0, rows_skipped = 0;
    char *sources = NULL;
    if (read_string_attribute(file, path, "tokenizer", &ds->tokenizer, err, err_size) != 0 ||
        read_integer_attribute(file, path, "vocab_size", &ds->vocab_size, err, err_size) != 0 ||
        read_integer_attribute(file, path, "n_samples", &n_samples_attr, err, err_size) != 0 ||
        read_integer_attribute(file, path, "n_tokens", &n_tokens_attr, err, err_size) != 0 ||
        read_integer_attribute(file, path, "rows_skipped", &rows_skipped, err, err_size) != 0 ||
        read_string_attribute(file, path, "sources", &sources, err, err_size) != 0)
        return -1;
    free(sources);
    /* version 1 predates tokenizer files: its datasets are the byte tokenizer's */
    if (version >= 2 && (read_string_attribute(file, path, "tokenizer_checksum",
                                               &ds->tokenizer_checksum, err, err_size) != 0 ||
                         read_string_attribute(file, path, "special_tokens", &ds->special_tokens,
                                               err, err_size) != 0))
        return -1;
    if (version < 2) {
        ds->tokenizer_checksum = xstrdup("");
        ds->special_tokens = xstrdup("");
    }
    if (ds->vocab_size == 0) {
        snprintf(err, err_size, "%s: attribute 'vocab_size' is 0", path);
        return -1;
    }
    if (n_samples_attr != ds->n_samples) {
        snprintf(err, err_size,
                 "%s: attribute 'n_samples' is %llu but /offsets holds %llu "
                 "samples",
                 path, (unsigned long long)n_samples_attr, (unsigned long long)ds->n_samples);
        return -1;
    }
    if (n_tokens_attr != ds->n_tokens) {
        snprintf(err, err_size,
                 "%s: attribute 'n_tokens' is %llu but /tokens holds %llu "
                 "tokens",
                 path, (unsigned long long)n_tokens_attr, (unsigned long long)ds->n_tokens);
        return -1;
    }
    return read_offsets(ds, n_offsets, err, err_size);
}

int dataset_open(struct dataset *ds, const char *path, char *err, size_t err_size)
{
    memset(ds, 0, sizeof *ds);
    ds->file = -1;
    struct h5_quiet quiet;
    h5_quiet_begin(&quiet);
    ds->path = xstrdup(path);
    int status = open_checked(ds, path, err, err_size);
    if (status != 0) dataset_close(ds);
    h5_quiet_end(&quiet);
    return status;
}

int dataset_check_model(const struct dataset *ds, const char *model_dir, int model_vocab_size,
                        char *err, size_t err_size)
{
    char model_sum[17], why[1024];
    int has = tokenizer_model_identity(model_dir, model_sum, why, sizeof why);
    if (has < 0) {
        snprintf(err, err_size, "%s", why);
        return -1;
    }
    const char *sum = ds->tokenizer_checksum ? ds->tokenizer_checksum : "";
    if (has && strcmp(sum, model_sum) != 0) {
        snprintf(err, err_size,
                 "%s was tokenized by %s (%s%s) but the model %s has its own tokenizer "
                 "(%s/tokenizer.json, checksum %s): its ids would mean other tokens to the "
                 "model; run prepare with prepare.tokenizer: auto (or that file)",
                 ds->path, ds->tokenizer, sum[0] ? "checksum " : "the built-in byte tokenizer",
                 sum, model_dir, model_dir, model_sum);
        return -1;
    }
    if (ds->vocab_size > (uint64_t)model_vocab_size) {
        snprintf(err, err_size,
                 "%s holds token ids up to %llu (tokenizer %s) but the model's vocabulary has %d "
                 "entries",
                 ds->path, (unsigned long long)ds->vocab_size - 1, ds->tokenizer,
                 model_vocab_size);
        return -1;
    }
    return 0;
}

void dataset_close(struct dataset *ds)
{
    if (ds->file >= 0) {
        struct h5_quiet quiet;
        h5_quiet_begin(&quiet);
        H5Fclose((hid_t)ds->file);
        h5_quiet_end(&quiet);
    }
    free(ds->path);
    free(ds->offsets);
    free(ds->tokenizer);
    free(ds->tokenizer_checksum);
    free(ds->special_tokens);
    memset(ds, 0, sizeof *ds);
    ds->file = -1;
}

/* Reads elements [start, start + count) of dataset name as memtype into buf. */
static int read_range(const struct dataset *ds, const char *name, hid_t memtype, uint64_t start,
                      uint64_t count, void *buf, char *err, size_t err_size)
{
    hid_t dset = h5_note(H5Dopen2((hid_t)ds->file, name, H5P_DEFAULT));
    hid_t filespace = dset >= 0 ? H5Dget_space(dset) : -1;
    hsize_t offset[1] = {start}, size[1] = {count};
    hid_t memspace = H5Screate_simple(1, size, NULL);
    int status = -1;
    if (filespace >= 0 && memspace >= 0 &&
        h5_note(H5Sselect_hyperslab(filespace, H5S_SELECT_SET, offset, NULL, size, NULL)) >= 0 &&
        h5_note(H5Dread(dset, memtype, memspace, filespace, H5P_DEFAULT, buf)) >= 0)
        status = 0;
    if (status != 0) {
        snprintf(err, err_size, "%s: cannot read /%s[%llu:%llu]: %s", ds->path, name,
                 (unsigned long long)start, (unsigned long long)(start + count), h5_last);
    }
    if (memspace >= 0) H5Sclose(memspace);
    if (filespace >= 0) H5Sclose(filespace);
    if (dset >= 0) H5Dclose(dset);
    return status;
}

int dataset_read_sample(const struct dataset *ds, uint64_t i, uint32_t *tokens, uint8_t *loss_mask,
                        char *err, size_t err_size)
{
    return dataset_read_prefix(ds, i, UINT64_MAX, tokens, loss_mask, err, err_size);
}

int dataset_read_prefix(const struct dataset *ds, uint64_t i, uint64_t max_tokens,
                        uint32_t *tokens, uint8_t *loss_mask, char *err, size_t err_size)
{
    if (i >= ds->n_samples) {
        snprintf(err, err_size, "%s: sample %llu does not exist (the dataset has %llu)", ds->path,
                 (unsigned long long)i, (unsigned long long)ds->n_samples);
        return -1;
    }
    uint64_t start = ds->offsets[i], length = dataset_sample_length(ds, i);
    if (length > max_tokens) length = max_tokens;
    if (length == 0) return 0;
    struct h5_quiet quiet;
    h5_quiet_begin(&quiet);
    int status = 0;
    if (tokens &&
        read_range(ds, "tokens", H5T_NATIVE_UINT32, start, length, tokens, err, err_size) != 0)
        status = -1;
    if (status == 0 && loss_mask &&
        read_range(ds, "loss_mask", H5T_NATIVE_UINT8, start, length, loss_mask, err, err_size) != 0)
        status = -1;
    h5_quiet_end(&quiet);
    if (status != 0) return -1;
    /* Cheap here and it keeps a bad id from becoming an out-of-bounds embedding row. */
    for (uint64_t j = 0; tokens && j < length; j++)
        if (tokens[j] >= ds->vocab_size) {
            snprintf(err, err_size,
                     "%s: sample %llu, token %llu is %u, not below vocab_size "
                     "%llu",
                     ds->path, (unsigned long long)i, (unsigned long long)j, tokens[j],
                     (unsigned long long)ds->vocab_size);
            return -1;
        }
    for (uint64_t j = 0; loss_mask && j < length; j++)
        if (loss_mask[j] > 1) {
            snprintf(err, err_size, "%s: sample %llu, loss_mask[%llu] is %u; it must be 0 or 1",
                     ds->path, (unsigned long long)i, (unsigned long long)j, loss_mask[j]);
            return -1;
        }
    return 0;
}

/* Elements per slice of dataset_hash: 64 MiB of tokens at a time. */
#define HASH_SLICE ((uint64_t)1 << 24)

int dataset_hash(const struct dataset *ds, uint64_t *hash, char *err, size_t err_size)
{
    struct checksum c;
    checksum_begin(&c);
    checksum_add(&c, ds->offsets, (size_t)(ds->n_samples + 1) * sizeof *ds->offsets);
    uint64_t slice = ds->n_tokens < HASH_SLICE ? ds->n_tokens : HASH_SLICE;
    uint32_t *buf = xmalloc((slice ? slice : 1) * sizeof *buf);
    struct h5_quiet quiet;
    h5_quiet_begin(&quiet);
    int status = 0;
    for (int pass = 0; pass < 2 && status == 0; pass++) { /* tokens, then the loss mask */
        const char *name = pass == 0 ? "tokens" : "loss_mask";
        hid_t memtype = pass == 0 ? H5T_NATIVE_UINT32 : H5T_NATIVE_UINT8;
        size_t size = pass == 0 ? sizeof(uint32_t) : sizeof(uint8_t);
        for (uint64_t at = 0; at < ds->n_tokens && status == 0; at += slice) {
            uint64_t count = ds->n_tokens - at < slice ? ds->n_tokens - at : slice;
            status = read_range(ds, name, memtype, at, count, buf, err, err_size);
            if (status == 0) checksum_add(&c, buf, (size_t)count * size);
        }
    }
    h5_quiet_end(&quiet);
    free(buf);
    *hash = checksum_end(&c);
    return status;
}

/* ---- writing ---------------------------------------------------------------------- */

static int check_contents(const char *path, const struct dataset_contents *c, char *err,
                          size_t err_size)
{
    if (c->offsets[0] != 0 || c->offsets[c->n_samples] != c->n_tokens) {
        snprintf(err, err_size, "%s: offsets must run from 0 to the token count %llu", path,
                 (unsigned long long)c->n_tokens);
        return -1;
    }
    for (uint64_t i = 1; i <= c->n_samples; i++)
        if (c->offsets[i] < c->offsets[i - 1]) {
            snprintf(err, err_size, "%s: offsets[%llu] < offsets[%llu]", path,
                     (unsigned long long)i, (unsigned long long)(i - 1));
            return -1;
        }
    for (uint64_t t = 0; t < c->n_tokens; t++)
        if (c->tokens[t] >= c->vocab_size || c->loss_mask[t] > 1) {
            snprintf(err, err_size,
                     "%s: token %llu (id %u, mask %u) is out of range for "
                     "vocab_size %llu",
                     path, (unsigned long long)t, c->tokens[t], c->loss_mask[t],
                     (unsigned long long)c->vocab_size);
            return -1;
        }
    return 0;
}

static herr_t write_string_attribute(hid_t file, const char *name, const char *value)
{
    size_t length = strlen(value);
    hid_t type = H5Tcopy(H5T_C_S1);
    H5Tset_size(type, length ? length : 1);
    H5Tset_strpad(type, H5T_STR_NULLPAD);
    H5Tset_cset(type, H5T_CSET_UTF8); /* paths may be any UTF-8; h5py then reads a str */
    hid_t space = H5Screate(H5S_SCALAR);
    hid_t attr = h5_note(H5Acreate2(file, name, type, space, H5P_DEFAULT, H5P_DEFAULT));
    herr_t status = attr >= 0 ? h5_note(H5Awrite(attr, type, length ? value : "")) : -1;
    if (attr >= 0) H5Aclose(attr);
    H5Sclose(space);
    H5Tclose(type);
    return status;
}

static herr_t write_integer_attribute(hid_t file, const char *name, hid_t filetype, uint64_t value)
{
    hid_t space = H5Screate(H5S_SCALAR);
    hid_t attr = h5_note(H5Acreate2(file, name, filetype, space, H5P_DEFAULT, H5P_DEFAULT));
    herr_t status = attr >= 0 ? h5_note(H5Awrite(attr, H5T_NATIVE_UINT64, &value)) : -1;
    if (attr >= 0) H5Aclose(attr);
    H5Sclose(space);
    return status;
}

static herr_t write_array(hid_t file, const char *name, hid_t filetype, hid_t memtype,
                          uint64_t count, const void *data)
{
    hsize_t dims[1] = {count};
    hid_t space = H5Screate_simple(1, dims, NULL);
    hid_t dcpl = H5Pcreate(H5P_DATASET_CREATE);
    H5Pset_obj_track_times(dcpl, 0); /* no timestamps: the same data gives the same bytes */
    hid_t dset = h5_note(H5Dcreate2(file, name, filetype, space, H5P_DEFAULT, dcpl, H5P_DEFAULT));
    H5Pclose(dcpl);
    herr_t status = dset >= 0 ? 0 : -1;
    if (dset >= 0 && count > 0)
        status = h5_note(H5Dwrite(dset, memtype, H5S_ALL, H5S_ALL, H5P_DEFAULT, data));
    if (dset >= 0) H5Dclose(dset);
    H5Sclose(space);
    return status;
}

/* Writes every dataset and attribute into the open file; returns the first failure. */
static herr_t write_all(hid_t file, const struct dataset_contents *c, const char *sources)
{
    herr_t status = 0;
    if (status >= 0)
        status =
            write_array(file, "tokens", H5T_STD_U32LE, H5T_NATIVE_UINT32, c->n_tokens, c->tokens);
    if (status >= 0)
        status = write_array(file, "offsets", H5T_STD_U64LE, H5T_NATIVE_UINT64, c->n_samples + 1,
                             c->offsets);
    if (status >= 0)
        status = write_array(file, "loss_mask", H5T_STD_U8LE, H5T_NATIVE_UINT8, c->n_tokens,
                             c->loss_mask);
    if (status >= 0) status = write_string_attribute(file, "format", FORMAT_NAME);
    if (status >= 0)
        status = write_integer_attribute(file, "version", H5T_STD_I32LE, FORMAT_VERSION);
    if (status >= 0) status = write_string_attribute(file, "tokenizer", c->tokenizer);
    if (status >= 0)
        status = write_string_attribute(file, "tokenizer_checksum",
                                        c->tokenizer_checksum ? c->tokenizer_checksum : "");
    if (status >= 0)
        status = write_string_attribute(file, "special_tokens",
                                        c->special_tokens ? c->special_tokens : "");
    if (status >= 0)
        status = write_integer_attribute(file, "vocab_size", H5T_STD_U64LE, c->vocab_size);
    if (status >= 0) status = write_string_attribute(file, "sources", sources);
    if (status >= 0)
        status = write_integer_attribute(file, "n_samples", H5T_STD_U64LE, c->n_samples);
    if (status >= 0) status = write_integer_attribute(file, "n_tokens", H5T_STD_U64LE, c->n_tokens);
    if (status >= 0)
        status = write_integer_attribute(file, "rows_skipped", H5T_STD_U64LE, c->rows_skipped);
    return status;
}

static char *join_sources(const struct dataset_contents *c)
{
    size_t length = 1;
    for (int i = 0; i < c->n_sources; i++) length += strlen(c->sources[i]) + 1;
    char *joined = xmalloc(length);
    joined[0] = '\0';
    size_t at = 0;
    for (int i = 0; i < c->n_sources; i++) {
        size_t n = strlen(c->sources[i]);
        if (i > 0) joined[at++] = '\n';
        memcpy(joined + at, c->sources[i], n);
        at += n;
    }
    joined[at] = '\0';
    return joined;
}

/* Flushes a closed file's data to the disk before it is renamed into place. */
static int sync_file(const char *path)
{
    int fd = open(path, O_RDONLY);
    if (fd < 0) return -1;
    int status = fsync(fd);
    close(fd);
    return status;
}

int dataset_write(const char *path, const struct dataset_contents *contents, char *err,
                  size_t err_size)
{
    if (check_contents(path, contents, err, err_size) != 0) return -1;
    size_t n = strlen(path);
    char *tmp = xmalloc(n + 5);
    memcpy(tmp, path, n);
    memcpy(tmp + n, ".tmp", 5);
    char *sources = join_sources(contents);

    struct h5_quiet quiet;
    h5_quiet_begin(&quiet);
    /* The 1.8 file format at least: attributes larger than 64 KiB (a long sources list)
     * need its dense attribute storage. */
    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
    H5Pset_libver_bounds(fapl, H5F_LIBVER_V18, H5F_LIBVER_LATEST);
    hid_t fcpl = H5Pcreate(H5P_FILE_CREATE);
    H5Pset_obj_track_times(fcpl, 0); /* the root group's header, too */
    hid_t file = h5_note(H5Fcreate(tmp, H5F_ACC_TRUNC, fcpl, fapl));
    H5Pclose(fcpl);
    H5Pclose(fapl);
    int status = 0;
    if (file < 0) {
        snprintf(err, err_size, "%s: cannot create: %s", tmp, h5_last);
        status = -1;
    } else {
        herr_t written = write_all(file, contents, sources);
        herr_t closed = H5Fclose(file);
        if (written >= 0) h5_note(closed);
        if (written < 0 || closed < 0) {
            snprintf(err, err_size, "%s: write failed: %s", tmp, h5_last);
            status = -1;
        } else if (sync_file(tmp) != 0) {
            snprintf(err, err_size, "%s: cannot sync to disk: %s", tmp, strerror(errno));
            status = -1;
        } else if (rename(tmp, path) != 0) {
            snprintf(err, err_size, "cannot rename %s to %s: %s", tmp, path, strerror(errno));
            status = -1;
        }
        if (status != 0) unlink(tmp);
    }
    h5_quiet_end(&quiet);
    free(sources);
    free(tmp);
    return status;
}
