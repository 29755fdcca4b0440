/* checkpoint: training checkpoints (HDF5), for the train phase: their names, the listing
 * of a checkpoint directory and the readers (see checkpoint.h for the file layout; the
 * writer is checkpoint_write.c, the exports export.c, the loss chart history.c).
 *
 * The files do not depend on the layout that reads them: tensors are stored whole under
 * their Hugging Face names, and every rank reads back, on its own with the serial HDF5
 * API, exactly the tensors it holds under its own layout, whatever layout wrote them.
 * Readers validate every attribute and the structure (in version 3 also that each
 * tensor's recorded slices cover it exactly) before they touch the model, and each
 * tensor's checksum as they read it. Versions 2 (gathered to rank 0 by older esft) and 1
 * (no checksums, read unverified) are still read. */
#include "checkpoint.h"
#include "checkpoint_internal.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <hdf5.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "checksum.h"
#include "files.h"
#include "gather.h"
#include "hfconfig.h"
#include "h5util.h"
#include "log.h"
#include "safetensors.h"

#define CHECKPOINT_MESSAGE_MAX 8192 /* a message checkpoint_agree carries: resume's refusals list keys */

/* ---- HDF5 files ---------------------------------------------------------------------- */

hid_t checkpoint_file_access(void)
{
    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
#if (H5_VERS_MAJOR == 1 && H5_VERS_MINOR == 10 && H5_VERS_RELEASE >= 7) || H5_VERSION_GE(1, 12, 1)
    H5Pset_file_locking(fapl, 0, 1);
#endif
    /* the 1.8 object format stores attributes of any size (the deck may pass 64 KiB) */
    H5Pset_libver_bounds(fapl, H5F_LIBVER_V18, H5F_LIBVER_LATEST);
    return fapl;
}

/* ---- checkpoint names ------------------------------------------------------------------ */

/* The step of a real checkpoint name "step-NNNNNNNN.h5" (the canonical %08lld spelling
 * only: temporary files and look-alikes are not checkpoints). */
static bool checkpoint_name_step(const char *name, long long *step)
{
    if (strncmp(name, "step-", 5) != 0) return false;
    const char *p = name + 5;
    long long value = 0;
    int digits = 0;
    while (*p >= '0' && *p <= '9') {
        if (value > (LLONG_MAX - 9) / 10) return false;
        value = value * 10 + (*p - '0');
        p++;
        digits++;
    }
    if (digits < 8 || strcmp(p, ".h5") != 0) return false;
    char canonical[64];
    snprintf(canonical, sizeof canonical, "step-%08lld.h5", value);
    if (strcmp(canonical, name) != 0) return false;
    *step = value;
    return true;
}

bool checkpoint_temporary_name(const char *name)
{
    size_t n = strlen(name);
    return strncmp(name, ".step-", 6) == 0 && n > 13 && strcmp(name + n - 7, ".h5.tmp") == 0;
}

int checkpoint_list_steps(const char *dir, struct step_list *list)
{
    list->steps = NULL;
    list->n = list->cap = 0;
    DIR *d = opendir(dir);
    if (!d) return -1;
    struct dirent *entry;
    while ((entry = readdir(d)) != NULL) {
        long long step;
        if (!checkpoint_name_step(entry->d_name, &step)) continue;
        if (list->n == list->cap) {
            list->cap = list->cap ? 2 * list->cap : 16;
            long long *grown = realloc(list->steps, (size_t)list->cap * sizeof *grown);
            if (!grown) fatal(EXIT_RUNTIME, "out of memory listing %s", dir);
            list->steps = grown;
        }
        list->steps[list->n++] = step;
    }
    closedir(d);
    return 0;
}

int checkpoint_compare_steps(const void *a, const void *b)
{
    long long x = *(const long long *)a, y = *(const long long *)b;
    return (x > y) - (x < y);
}

int checkpoint_agree(int status, char *err, size_t err_size, MPI_Comm comm)
{
    return ranks_agree(status, err, err_size, comm);
}

const char *const checkpoint_groups[3] = {"tensors", "adam_m", "adam_v"};

/* The root checksum of a version-2 or later checkpoint over its attributes (checkpoint.h). */
uint64_t checkpoint_attributes_checksum(const struct checkpoint_info *info)
{
    int32_t version = info->version;
    int64_t where[3] = {info->position.step, info->position.epoch, info->position.block};
    int64_t adam_step = info->adam_step;
    uint64_t hashes[3] = {info->config_hash, info->data_hash, info->expert_config_hash};
    struct checksum c;
    checksum_begin(&c);
    checksum_add(&c, &version, sizeof version);
    checksum_add(&c, where, sizeof where);
    checksum_add(&c, info->position.rng, sizeof info->position.rng);
    checksum_add(&c, &adam_step, sizeof adam_step);
    checksum_add(&c, hashes, sizeof hashes);
    checksum_add(&c, info->method, strlen(info->method) + 1);
    checksum_add(&c, info->deck_text, strlen(info->deck_text) + 1);
    return checksum_end(&c);
}

/* ---- finding and reading -------------------------------------------------------------- */

int checkpoint_list(const char *output_dir, long long **steps, char *err, size_t err_size)
{
    *steps = NULL;
    char dir[CHECKPOINT_PATH_MAX];
    if (path_join(dir, sizeof dir, output_dir, "checkpoints", err, err_size)) return -1;
    struct step_list list;
    if (checkpoint_list_steps(dir, &list) != 0) {
        if (errno == ENOENT) return 0;
        snprintf(err, err_size, "%s: cannot list checkpoints: %s", dir, strerror(errno));
        return -1;
    }
    if (list.n > 1) qsort(list.steps, (size_t)list.n, sizeof *list.steps, checkpoint_compare_steps);
    for (int i = 0; i < list.n / 2; i++) { /* newest first */
        long long step = list.steps[i];
        list.steps[i] = list.steps[list.n - 1 - i];
        list.steps[list.n - 1 - i] = step;
    }
    if (list.n == 0) {
        free(list.steps);
        list.steps = NULL;
    }
    *steps = list.steps;
    return list.n;
}

int checkpoint_path(const char *output_dir, long long step, char *path, size_t path_size, char *err,
                    size_t err_size)
{
    int n = snprintf(path, path_size, "%s/checkpoints/step-%08lld.h5", output_dir, step);
    if (n < 0 || (size_t)n >= path_size) {
        snprintf(err, err_size, "%s/checkpoints/step-%08lld.h5: path too long", output_dir, step);
        return -1;
    }
    return 0;
}

int checkpoint_latest(const char *output_dir, char *path, size_t path_size, char *err,
                      size_t err_size)
{
    long long *steps;
    int n = checkpoint_list(output_dir, &steps, err, err_size);
    if (n <= 0) return n;
    int rc = checkpoint_path(output_dir, steps[0], path, path_size, err, err_size);
    free(steps);
    return rc == 0 ? 1 : -1;
}

/* Opens attribute `name` of the file root; -1 with "PATH: attribute 'NAME' missing". */
static hid_t open_attr(hid_t file, const char *name, const char *path, char *err, size_t err_size)
{
    htri_t exists = H5Aexists(file, name);
    if (exists <= 0) {
        H5Eclear2(H5E_DEFAULT);
        snprintf(err, err_size, "%s: not an esft checkpoint: attribute '%s' missing", path, name);
        return -1;
    }
    hid_t attr = H5Aopen(file, name, H5P_DEFAULT);
    if (attr < 0) h5_fail(err, err_size, path, name, "cannot open attribute");
    return attr;
}

/* A numeric attribute of `count` elements, converted to mem_type. */
static int get_attr(hid_t file, const char *name, hid_t mem_type, void *value, hssize_t count,
                    const char *path, char *err, size_t err_size)
{
    hid_t attr = open_attr(file, name, path, err, err_size);
    if (attr < 0) return -1;
    hid_t space = H5Aget_space(attr), type = H5Aget_type(attr);
    int rc = 0;
    H5T_class_t cls = H5Tget_class(type);
    if (H5Sget_simple_extent_npoints(space) != count || (cls != H5T_INTEGER && cls != H5T_FLOAT)) {
        snprintf(err, err_size, "%s: attribute '%s': expected %lld number%s", path, name,
                 (long long)count, count == 1 ? "" : "s");
        rc = -1;
    } else if (H5Aread(attr, mem_type, value) < 0) {
        h5_fail(err, err_size, path, name, "cannot read attribute");
        rc = -1;
    }
    H5Tclose(type);
    H5Sclose(space);
    H5Aclose(attr);
    return rc;
}

/* A fixed-length string attribute, returned in a new allocation. */
static char *get_attr_string(hid_t file, const char *name, const char *path, char *err,
                             size_t err_size)
{
    hid_t attr = open_attr(file, name, path, err, err_size);
    if (attr < 0) return NULL;
    hid_t space = H5Aget_space(attr), type = H5Aget_type(attr);
    char *value = NULL;
    if (H5Tget_class(type) != H5T_STRING || H5Tis_variable_str(type) != 0 ||
        H5Sget_simple_extent_npoints(space) != 1) {
        snprintf(err, err_size, "%s: attribute '%s': expected a fixed-length string", path, name);
    } else {
        size_t n = H5Tget_size(type);
        value = xcalloc(n + 1, 1);
        if (H5Aread(attr, type, value) < 0) {
            h5_fail(err, err_size, path, name, "cannot read attribute");
            free(value);
            value = NULL;
        }
    }
    H5Tclose(type);
    H5Sclose(space);
    H5Aclose(attr);
    return value;
}

void checkpoint_info_free(struct checkpoint_info *info)
{
    free(info->method);
    free(info->deck_text);
    info->method = info->deck_text = NULL;
}

/* Every attribute of the open file into info, checked (the format, a version this esft
 * reads, and in version 2 the attributes' checksum). 0, or CHECKPOINT_DAMAGED or
 * CHECKPOINT_FOREIGN with a message; info holds no allocation on failure. */
static int read_info(hid_t file, const char *path, struct checkpoint_info *info, char *err,
                     size_t err_size)
{
    memset(info, 0, sizeof *info);
    char *format = get_attr_string(file, "format", path, err, err_size);
    if (!format) return CHECKPOINT_DAMAGED;
    bool ours = strcmp(format, CHECKPOINT_FORMAT) == 0;
    if (!ours)
        snprintf(err, err_size, "%s: not an esft checkpoint (format '%s', expected '%s')", path,
                 format, CHECKPOINT_FORMAT);
    free(format);
    if (!ours) return CHECKPOINT_DAMAGED;
    int32_t version;
    if (get_attr(file, "version", H5T_NATIVE_INT32, &version, 1, path, err, err_size))
        return CHECKPOINT_DAMAGED;
    if (version < CHECKPOINT_VERSION_OLDEST || version > CHECKPOINT_VERSION) {
        snprintf(err, err_size,
                 "%s: checkpoint format version %d; this esft reads versions %d to %d only", path,
                 (int)version, CHECKPOINT_VERSION_OLDEST, CHECKPOINT_VERSION);
        return CHECKPOINT_FOREIGN;
    }
    info->version = version;
    info->verified = version >= 2;
    int64_t step, epoch, block, adam_step;
    uint64_t stored_sum = 0;
    if (get_attr(file, "step", H5T_NATIVE_INT64, &step, 1, path, err, err_size) ||
        get_attr(file, "epoch", H5T_NATIVE_INT64, &epoch, 1, path, err, err_size) ||
        get_attr(file, "block", H5T_NATIVE_INT64, &block, 1, path, err, err_size) ||
        get_attr(file, "rng", H5T_NATIVE_UINT64, info->position.rng, 4, path, err, err_size) ||
        get_attr(file, "adam_step", H5T_NATIVE_INT64, &adam_step, 1, path, err, err_size) ||
        get_attr(file, "config_hash", H5T_NATIVE_UINT64, &info->config_hash, 1, path, err,
                 err_size) ||
        (info->verified &&
         (get_attr(file, "data_hash", H5T_NATIVE_UINT64, &info->data_hash, 1, path, err,
                   err_size) ||
          get_attr(file, "expert_config_hash", H5T_NATIVE_UINT64, &info->expert_config_hash, 1,
                   path, err, err_size) ||
          get_attr(file, "checksum", H5T_NATIVE_UINT64, &stored_sum, 1, path, err, err_size))))
        return CHECKPOINT_DAMAGED;
    info->position.step = step;
    info->position.epoch = epoch;
    info->position.block = block;
    info->adam_step = adam_step;
    info->method = get_attr_string(file, "method", path, err, err_size);
    info->deck_text = info->method ? get_attr_string(file, "deck", path, err, err_size) : NULL;
    if (!info->deck_text) {
        checkpoint_info_free(info);
        return CHECKPOINT_DAMAGED;
    }
    if (info->verified) {
        uint64_t sum = checkpoint_attributes_checksum(info);
        if (sum != stored_sum) {
            snprintf(err, err_size,
                     "%s: damaged: its attributes (step, data position, random state, AdamW "
                     "step, hashes, method, deck) do not match their checksum (stored %016" PRIx64
                     ", computed %016" PRIx64 ")",
                     path, stored_sum, sum);
            checkpoint_info_free(info);
            return CHECKPOINT_DAMAGED;
        }
    }
    if (step < 0 || epoch < 0 || block < 0 || adam_step < 0) {
        snprintf(err, err_size, "%s: negative step, epoch, block or adam_step", path);
        checkpoint_info_free(info);
        return CHECKPOINT_DAMAGED;
    }
    return 0;
}

/* The checkpoint belongs to this model (config hash) and this method. */
static int check_identity(const struct checkpoint_info *info, const struct model *model,
                          const char *method, const char *path, char *err, size_t err_size)
{
    if (info->config_hash != model->cfg.hash) {
        snprintf(err, err_size,
                 "%s: written for another base model (config hash %016" PRIx64
                 ", this model's config.json hashes to %016" PRIx64 ")",
                 path, info->config_hash, model->cfg.hash);
        return CHECKPOINT_FOREIGN;
    }
    if (strcmp(info->method, method) != 0) {
        snprintf(err, err_size, "%s: written by a run of method '%s'; this run's method is '%s'",
                 path, info->method, method);
        return CHECKPOINT_FOREIGN;
    }
    return 0;
}

/* Version 3: the rows each writer wrote (attribute `slices`, [k][3] of writer rank, first
 * row, row count) cover the tensor's rows exactly, in order, each once. */
static int check_slices(hid_t dset, const char *group, const struct param *p, const char *path,
                        char *err, size_t err_size)
{
    if (H5Aexists(dset, "slices") <= 0) {
        H5Eclear2(H5E_DEFAULT);
        snprintf(err, err_size, "%s: damaged: tensor '%s' in /%s has no slices attribute", path,
                 p->name, group);
        return CHECKPOINT_DAMAGED;
    }
    hid_t attr = H5Aopen(dset, "slices", H5P_DEFAULT);
    hid_t space = attr >= 0 ? H5Aget_space(attr) : -1, type = attr >= 0 ? H5Aget_type(attr) : -1;
    hsize_t dims[2] = {0, 0};
    bool shaped = space >= 0 && H5Sget_simple_extent_ndims(space) == 2 &&
                  H5Sget_simple_extent_dims(space, dims, NULL) == 2 && dims[1] == 3 &&
                  dims[0] >= 1 && dims[0] <= (hsize_t)1 << 20 &&
                  H5Tget_class(type) == H5T_INTEGER;
    int64_t *slices = shaped ? xmalloc(dims[0] * 3 * sizeof *slices) : NULL;
    bool read = shaped && H5Aread(attr, H5T_NATIVE_INT64, slices) >= 0;
    int64_t next = 0; /* the first row not yet covered */
    for (hsize_t k = 0; read && k < dims[0]; k++) {
        const int64_t *s = slices + 3 * k;
        if (s[0] < 0 || s[1] != next || s[2] < 1 || s[2] > p->shape[0] - next) break;
        next += s[2];
    }
    int rc = 0;
    if (!read || next != p->shape[0]) {
        H5Eclear2(H5E_DEFAULT);
        snprintf(err, err_size,
                 "%s: damaged: the slices recorded for tensor '%s' in /%s do not cover its %lld "
                 "rows once each",
                 path, p->name, group, (long long)p->shape[0]);
        rc = CHECKPOINT_DAMAGED;
    }
    free(slices);
    if (type >= 0) H5Tclose(type);
    if (space >= 0) H5Sclose(space);
    if (attr >= 0) H5Aclose(attr);
    return rc;
}

/* /GROUP/<p->name> exists, is floating point and has p's shape (and, from version 3,
 * slices that cover it). */
static int check_tensor(hid_t file, const char *group, const struct param *p, int version,
                        const char *path, char *err, size_t err_size)
{
    char object[PARAM_NAME_MAX + 32];
    snprintf(object, sizeof object, "/%s/%s", group, p->name);
    htri_t exists = H5Lexists(file, object, H5P_DEFAULT);
    if (exists <= 0) {
        H5Eclear2(H5E_DEFAULT);
        snprintf(err, err_size,
                 "%s: tensor '%s' missing from /%s (the checkpoint was written with another "
                 "set of trainable tensors)",
                 path, p->name, group);
        return CHECKPOINT_FOREIGN;
    }
    hid_t dset = H5Dopen2(file, object, H5P_DEFAULT);
    if (dset < 0) {
        h5_fail(err, err_size, path, object, "cannot open");
        return CHECKPOINT_DAMAGED;
    }
    hid_t space = H5Dget_space(dset), type = H5Dget_type(dset);
    hsize_t dims[8] = {0};
    int rank = H5Sget_simple_extent_ndims(space);
    if (rank >= 0 && rank <= 8) H5Sget_simple_extent_dims(space, dims, NULL);
    int rc = 0;
    if (H5Tget_class(type) != H5T_FLOAT) {
        snprintf(err, err_size, "%s: tensor '%s' in /%s is not floating point", path, p->name,
                 group);
        rc = CHECKPOINT_DAMAGED;
    } else if (rank != p->rank || (hsize_t)p->shape[0] != dims[0] ||
               (p->rank > 1 && (hsize_t)p->shape[1] != dims[1])) {
        char got[128] = "";
        size_t used = 0;
        for (int d = 0; d < rank && d < 8 && used < sizeof got; d++)
            used += (size_t)snprintf(got + used, sizeof got - used, "%s%llu", d ? ", " : "",
                                     (unsigned long long)dims[d]);
        char want[64];
        if (p->rank > 1)
            snprintf(want, sizeof want, "%lld, %lld", (long long)p->shape[0],
                     (long long)p->shape[1]);
        else
            snprintf(want, sizeof want, "%lld", (long long)p->shape[0]);
        snprintf(err, err_size, "%s: tensor '%s' in /%s: expected shape [%s], got [%s]", path,
                 p->name, group, want, got);
        rc = CHECKPOINT_FOREIGN;
    }
    if (rc == 0 && version >= CHECKPOINT_VERSION_SHARDED)
        rc = check_slices(dset, group, p, path, err, err_size);
    H5Tclose(type);
    H5Sclose(space);
    H5Dclose(dset);
    return rc;
}

struct extra_search {
    struct model *model;
    char extra[PARAM_NAME_MAX + 64];
    int n;
};

static herr_t find_extra(hid_t group, const char *name, const H5L_info_t *info, void *data)
{
    (void)group;
    (void)info;
    struct extra_search *s = data;
    s->n++;
    const struct param *p = model_find_param(s->model, name);
    if (p && p->trainable) return 0;
    snprintf(s->extra, sizeof s->extra, "%s", name);
    return 1; /* stop: the first tensor the model does not train */
}

/* Every link of /GROUP is a trainable tensor of the model (held here or not). */
static int check_no_extra(hid_t file, const char *group, struct model *model, const char *path,
                          char *err, size_t err_size)
{
    hid_t g = H5Gopen2(file, group, H5P_DEFAULT);
    if (g < 0) {
        h5_fail(err, err_size, path, group, "cannot open group");
        return CHECKPOINT_DAMAGED;
    }
    struct extra_search search = {.model = model, .extra = "", .n = 0};
    herr_t rc = H5Literate(g, H5_INDEX_NAME, H5_ITER_INC, NULL, find_extra, &search);
    if (rc < 0) h5_fail(err, err_size, path, group, "cannot list group");
    H5Gclose(g);
    if (rc < 0) return CHECKPOINT_DAMAGED;
    if (search.extra[0]) {
        const struct param *p = model_find_param(model, search.extra);
        snprintf(err, err_size,
                 "%s: tensor '%s' in /%s is %s (the checkpoint was written with another set "
                 "of trainable tensors)",
                 path, search.extra, group,
                 !p ? "not a tensor of this model" : "not trainable in this run");
        return CHECKPOINT_FOREIGN;
    }
    return 0;
}

/* /GROUP/<p->name> into out; with `verify`, checked against the tensor's checksum. */
static int read_tensor(hid_t file, const char *group, const struct param *p, float *out,
                       bool verify, const char *path, char *err, size_t err_size)
{
    char object[PARAM_NAME_MAX + 32];
    snprintf(object, sizeof object, "/%s/%s", group, p->name);
    hid_t dset = H5Dopen2(file, object, H5P_DEFAULT);
    int rc = 0;
    if (dset < 0 || H5Dread(dset, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, out) < 0) {
        h5_fail(err, err_size, path, object, "cannot read");
        rc = CHECKPOINT_DAMAGED;
    }
    if (rc == 0 && verify) {
        uint64_t stored = 0, sum = checksum64(out, p->numel * sizeof(float));
        if (H5Aexists(dset, "checksum") <= 0) {
            H5Eclear2(H5E_DEFAULT);
            snprintf(err, err_size, "%s: damaged: tensor '%s' in /%s has no checksum", path,
                     p->name, group);
            rc = CHECKPOINT_DAMAGED;
        } else if (get_attr(dset, "checksum", H5T_NATIVE_UINT64, &stored, 1, path, err, err_size)) {
            rc = CHECKPOINT_DAMAGED;
        } else if (stored != sum) {
            snprintf(err, err_size,
                     "%s: damaged: tensor '%s' in /%s does not match its checksum (stored "
                     "%016" PRIx64 ", computed %016" PRIx64 ")",
                     path, p->name, group, stored, sum);
            rc = CHECKPOINT_DAMAGED;
        }
    }
    if (dset >= 0) H5Dclose(dset);
    return rc;
}

static int read_checkpoint_file(hid_t file, const char *path, struct model *model,
                                struct adamw *opt, struct train_position *position,
                                const char *method, char *err, size_t err_size)
{
    struct checkpoint_info info;
    int rc = read_info(file, path, &info, err, err_size);
    if (rc != 0) return rc;
    rc = check_identity(&info, model, method, path, err, err_size);
    checkpoint_info_free(&info);
    if (rc != 0) return rc;
    /* everything is checked before the model and the optimizer are touched: the whole
     * trainable set against the whole table (the same verdict on every rank, whatever
     * the layout), then this rank's share of the state */
    size_t held = 0;
    for (int i = 0; i < model->n_params; i++) {
        const struct param *p = &model->params[i];
        if (!p->trainable) continue;
        if (gather_checkpointed(p)) held += p->numel;
        for (int g = 0; g < 3; g++)
            if ((rc = check_tensor(file, checkpoint_groups[g], p, info.version, path, err,
                                    err_size))) return rc;
    }
    for (int g = 0; g < 3; g++)
        if ((rc = check_no_extra(file, checkpoint_groups[g], model, path, err, err_size)))
            return rc;
    if (opt->n != held || (held > 0 && (!opt->m || !opt->v))) {
        snprintf(err, err_size,
                 "%s: optimizer state of %zu values for %zu trainable values "
                 "(adamw_init after model_set_trainable)",
                 path, opt->n, held);
        return CHECKPOINT_FOREIGN;
    }
    size_t offset = 0;
    for (int i = 0; i < model->n_params; i++) {
        struct param *p = &model->params[i];
        if (!gather_checkpointed(p)) continue;
        if ((rc = read_tensor(file, "tensors", p, p->data, info.verified, path, err, err_size)) ||
            (rc = read_tensor(file, "adam_m", p, opt->m + offset, info.verified, path, err,
                              err_size)) ||
            (rc = read_tensor(file, "adam_v", p, opt->v + offset, info.verified, path, err,
                              err_size)))
            return rc;
        offset += p->numel;
    }
    opt->step = info.adam_step;
    *position = info.position;
    return 0;
}

/* Opens a checkpoint read-only: *file, or CHECKPOINT_DAMAGED with a message (a missing
 * file, not HDF5, truncated). Inside the caller's h5_quiet. */
static int open_checkpoint_file(const char *path, hid_t *file, char *err, size_t err_size)
{
    struct stat st;
    if (stat(path, &st) != 0) {
        snprintf(err, err_size, "%s: cannot open checkpoint: %s", path, strerror(errno));
        return CHECKPOINT_DAMAGED;
    }
    htri_t is_hdf5 = H5Fis_hdf5(path);
    if (is_hdf5 <= 0) {
        H5Eclear2(H5E_DEFAULT);
        snprintf(err, err_size, "%s: not an HDF5 file (a damaged or foreign checkpoint)", path);
        return CHECKPOINT_DAMAGED;
    }
    hid_t fapl = checkpoint_file_access();
    *file = H5Fopen(path, H5F_ACC_RDONLY, fapl);
    /* the reason first: the next HDF5 call clears the error stack */
    if (*file < 0) h5_fail(err, err_size, path, NULL, "cannot open checkpoint");
    H5Pclose(fapl);
    return *file < 0 ? CHECKPOINT_DAMAGED : 0;
}

int checkpoint_read_info(const char *path, struct checkpoint_info *info, char *err, size_t err_size)
{
    memset(info, 0, sizeof *info);
    struct h5_quiet quiet;
    h5_quiet_begin(&quiet);
    hid_t file;
    int rc = open_checkpoint_file(path, &file, err, err_size);
    if (rc == 0) {
        rc = read_info(file, path, info, err, err_size);
        H5Fclose(file);
        H5Eclear2(H5E_DEFAULT);
    }
    h5_quiet_end(&quiet);
    return rc;
}

int checkpoint_read(const char *path, struct model *model, struct adamw *opt,
                    struct train_position *position, const char *method, char *err, size_t err_size)
{
    struct h5_quiet quiet;
    h5_quiet_begin(&quiet);
    hid_t file;
    int rc = open_checkpoint_file(path, &file, err, err_size);
    if (rc == 0) {
        rc = read_checkpoint_file(file, path, model, opt, position, method, err, err_size);
        H5Fclose(file);
        H5Eclear2(H5E_DEFAULT);
    }
    h5_quiet_end(&quiet);
    return rc;
}

