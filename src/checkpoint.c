/* checkpoint: training checkpoints (HDF5), for the train phase (see checkpoint.h for the
 * file layout; the exports are in export.c, the loss chart in history.c).
 *
 * The files do not depend on the layout: tensors are stored whole under their Hugging
 * Face names. World rank 0 writes them with the serial HDF5 API (or the safetensors
 * writer); a tensor it does not hold comes from its holder on data-parallel slot 0, point
 * to point, one tensor at a time in parameter-table order (gather_to_rank0), and every
 * rank reads back exactly the tensors it holds under its own layout. A checkpoint goes
 * to a dot-file in the checkpoint directory: HDF5 closes it, the bytes are fsynced, the
 * file is renamed to its real name and the directory fsynced. A real name therefore
 * only ever names a complete file. Object timestamps are off, so the same state gives
 * the same bytes under any layout. Every tensor carries the checksum of its values and
 * the root the checksum of the attributes, computed by rank 0 from the values it writes,
 * so that damage done after the write (the disk, a copy, a hand) is found on reading.
 * Readers validate every attribute and the structure before they touch the model, and
 * each tensor's checksum as they read it. */
#include "checkpoint.h"

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

#define CHECKPOINT_FORMAT "esft-checkpoint"
#define CHECKPOINT_VERSION 2
/* the oldest version still read: 1, without checksums (read unverified) */
#define CHECKPOINT_VERSION_OLDEST 1
#define CHECKPOINT_MESSAGE_MAX 8192 /* a message checkpoint_agree carries: resume's refusals list keys */
#define CHECKPOINT_PATH_MAX 4200

/* ---- HDF5 files ---------------------------------------------------------------------- */

/* File access without HDF5's advisory locks: checkpoints are protected by the rename,
 * and locks fail on some parallel file systems. */
static hid_t file_access_plist(void)
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

/* A temporary file this module leaves when a write dies: ".step-<digits>.h5.tmp". */
static bool checkpoint_temporary_name(const char *name)
{
    size_t n = strlen(name);
    return strncmp(name, ".step-", 6) == 0 && n > 13 && strcmp(name + n - 7, ".h5.tmp") == 0;
}

struct step_list {
    long long *steps;
    int n, cap;
};

/* The steps of the real checkpoint names of dir; 0, -1 with errno on an unreadable
 * directory (ENOENT: none yet). */
static int list_checkpoints(const char *dir, struct step_list *list)
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

static int compare_steps(const void *a, const void *b)
{
    long long x = *(const long long *)a, y = *(const long long *)b;
    return (x > y) - (x < y);
}

int checkpoint_agree(int status, char *err, size_t err_size, MPI_Comm comm)
{
    return ranks_agree(status, err, err_size, comm);
}

/* ---- writing ------------------------------------------------------------------------ */

static int put_attr_string(hid_t file, const char *name, const char *value, const char *path,
                           char *err, size_t err_size)
{
    size_t n = strlen(value);
    hid_t type = H5Tcopy(H5T_C_S1);
    H5Tset_size(type, n > 0 ? n : 1);
    H5Tset_strpad(type, H5T_STR_NULLTERM);
    hid_t space = H5Screate(H5S_SCALAR);
    hid_t attr = H5Acreate2(file, name, type, space, H5P_DEFAULT, H5P_DEFAULT);
    int rc = 0;
    if (attr < 0 || H5Awrite(attr, type, n > 0 ? value : "") < 0) {
        h5_fail(err, err_size, path, name, "cannot write attribute");
        rc = -1;
    }
    if (attr >= 0) H5Aclose(attr);
    H5Sclose(space);
    H5Tclose(type);
    return rc;
}

/* An attribute of `count` elements (scalar when count is 1). */
static int put_attr(hid_t file, const char *name, hid_t file_type, hid_t mem_type,
                    const void *value, hsize_t count, const char *path, char *err, size_t err_size)
{
    hid_t space = count == 1 ? H5Screate(H5S_SCALAR) : H5Screate_simple(1, &count, NULL);
    hid_t attr = H5Acreate2(file, name, file_type, space, H5P_DEFAULT, H5P_DEFAULT);
    int rc = 0;
    if (attr < 0 || H5Awrite(attr, mem_type, value) < 0) {
        h5_fail(err, err_size, path, name, "cannot write attribute");
        rc = -1;
    }
    if (attr >= 0) H5Aclose(attr);
    H5Sclose(space);
    return rc;
}

/* /GROUP/<name> = data as fp32 with p's shape, with the checksum of its bytes. */
static int put_tensor(hid_t group, const char *group_name, const struct param *p, const float *data,
                      hid_t dcpl, const char *path, char *err, size_t err_size)
{
    hsize_t dims[2] = {(hsize_t)p->shape[0], p->rank > 1 ? (hsize_t)p->shape[1] : 1};
    hid_t space = H5Screate_simple(p->rank, dims, NULL);
    hid_t dset = H5Dcreate2(group, p->name, H5T_IEEE_F32LE, space, H5P_DEFAULT, dcpl, H5P_DEFAULT);
    char object[PARAM_NAME_MAX + 32];
    snprintf(object, sizeof object, "/%s/%s", group_name, p->name);
    int rc = 0;
    if (dset < 0 || H5Dwrite(dset, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, data) < 0) {
        h5_fail(err, err_size, path, object, "cannot write");
        rc = -1;
    }
    if (rc == 0) {
        uint64_t sum = checksum64(data, p->numel * sizeof(float));
        rc = put_attr(dset, "checksum", H5T_STD_U64LE, H5T_NATIVE_UINT64, &sum, 1, path, err,
                      err_size);
    }
    if (dset >= 0) H5Dclose(dset);
    H5Sclose(space);
    return rc;
}

static const char *const checkpoint_groups[3] = {"tensors", "adam_m", "adam_v"};

/* Rank 0's checkpoint while it is written: the temporary file, open, and its real name. */
struct checkpoint_out {
    char dir[CHECKPOINT_PATH_MAX], path[CHECKPOINT_PATH_MAX], tmp[CHECKPOINT_PATH_MAX];
    hid_t file, dcpl, groups[3];
    struct h5_quiet quiet;
};

/* The root checksum of a version-2 checkpoint over its attributes (checkpoint.h). */
static uint64_t attributes_checksum(const struct checkpoint_info *info)
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

/* The attributes of the checkpoint. */
static int put_attributes(hid_t file, const char *path, const struct model *model,
                          const struct adamw *opt, const struct train_position *position,
                          const struct checkpoint_run *run, char *err, size_t err_size)
{
    int32_t version = CHECKPOINT_VERSION;
    int64_t step = position->step, epoch = position->epoch, block = position->block;
    int64_t adam_step = opt->step;
    uint64_t hash = model->cfg.hash;
    const char *deck_text = run->deck_text ? run->deck_text : "";
    struct checkpoint_info info = {.version = version,
                                   .position = *position,
                                   .adam_step = adam_step,
                                   .config_hash = hash,
                                   .method = (char *)run->method,
                                   .deck_text = (char *)deck_text,
                                   .data_hash = run->data_hash,
                                   .expert_config_hash = run->expert_config_hash};
    uint64_t sum = attributes_checksum(&info);
    if (put_attr_string(file, "format", CHECKPOINT_FORMAT, path, err, err_size) ||
        put_attr(file, "version", H5T_STD_I32LE, H5T_NATIVE_INT32, &version, 1, path, err,
                 err_size) ||
        put_attr(file, "step", H5T_STD_I64LE, H5T_NATIVE_INT64, &step, 1, path, err, err_size) ||
        put_attr(file, "epoch", H5T_STD_I64LE, H5T_NATIVE_INT64, &epoch, 1, path, err, err_size) ||
        put_attr(file, "block", H5T_STD_I64LE, H5T_NATIVE_INT64, &block, 1, path, err, err_size) ||
        put_attr(file, "rng", H5T_STD_U64LE, H5T_NATIVE_UINT64, position->rng, 4, path, err,
                 err_size) ||
        put_attr(file, "adam_step", H5T_STD_I64LE, H5T_NATIVE_INT64, &adam_step, 1, path, err,
                 err_size) ||
        put_attr(file, "config_hash", H5T_STD_U64LE, H5T_NATIVE_UINT64, &hash, 1, path, err,
                 err_size) ||
        put_attr_string(file, "method", run->method, path, err, err_size) ||
        put_attr_string(file, "deck", deck_text, path, err, err_size) ||
        put_attr(file, "data_hash", H5T_STD_U64LE, H5T_NATIVE_UINT64, &run->data_hash, 1, path, err,
                 err_size) ||
        put_attr(file, "expert_config_hash", H5T_STD_U64LE, H5T_NATIVE_UINT64,
                 &run->expert_config_hash, 1, path, err, err_size) ||
        put_attr(file, "checksum", H5T_STD_U64LE, H5T_NATIVE_UINT64, &sum, 1, path, err, err_size))
        return -1;
    return 0;
}

/* Rank 0: creates the checkpoint directory and the temporary file with its attributes
 * and (empty) groups; the tensors follow. On failure nothing is left open or on disk. */
static int open_checkpoint(struct checkpoint_out *out, const char *output_dir,
                           const struct model *model, const struct adamw *opt,
                           const struct train_position *position, const struct checkpoint_run *run,
                           char *err, size_t err_size)
{
    out->file = out->dcpl = -1;
    for (int g = 0; g < 3; g++) out->groups[g] = -1;
    char name[64], tmp_name[64];
    snprintf(name, sizeof name, "step-%08lld.h5", position->step);
    snprintf(tmp_name, sizeof tmp_name, ".step-%08lld.h5.tmp", position->step);
    if (path_join(out->dir, sizeof out->dir, output_dir, "checkpoints", err, err_size) ||
        path_join(out->path, sizeof out->path, out->dir, name, err, err_size) ||
        path_join(out->tmp, sizeof out->tmp, out->dir, tmp_name, err, err_size))
        return -1;
    struct stat st;
    int failure = make_directories(out->dir) != 0 || stat(out->dir, &st) != 0 ? errno : 0;
    if (failure == 0 && !S_ISDIR(st.st_mode)) failure = ENOTDIR; /* a file of that name */
    if (failure != 0) {
        snprintf(err, err_size, "%s: cannot create directory: %s", out->dir, strerror(failure));
        return -1;
    }
    h5_quiet_begin(&out->quiet);
    hid_t fcpl = H5Pcreate(H5P_FILE_CREATE), fapl = file_access_plist();
    hid_t gcpl = H5Pcreate(H5P_GROUP_CREATE);
    out->dcpl = H5Pcreate(H5P_DATASET_CREATE);
    /* no modification times: the same state writes the same bytes */
    H5Pset_obj_track_times(fcpl, 0);
    H5Pset_obj_track_times(gcpl, 0);
    H5Pset_obj_track_times(out->dcpl, 0);
    out->file = H5Fcreate(out->tmp, H5F_ACC_TRUNC, fcpl, fapl);
    int rc = 0;
    if (out->file < 0) {
        h5_fail(err, err_size, out->tmp, NULL, "cannot create checkpoint");
        rc = -1;
    }
    if (rc == 0) rc = put_attributes(out->file, out->tmp, model, opt, position, run, err, err_size);
    for (int g = 0; g < 3 && rc == 0; g++) {
        out->groups[g] =
            H5Gcreate2(out->file, checkpoint_groups[g], H5P_DEFAULT, gcpl, H5P_DEFAULT);
        if (out->groups[g] < 0) {
            h5_fail(err, err_size, out->tmp, checkpoint_groups[g], "cannot create group");
            rc = -1;
        }
    }
    H5Pclose(fcpl);
    H5Pclose(fapl);
    H5Pclose(gcpl);
    if (rc != 0) {
        for (int g = 0; g < 3; g++)
            if (out->groups[g] >= 0) H5Gclose(out->groups[g]);
        if (out->file >= 0) H5Fclose(out->file);
        H5Pclose(out->dcpl);
        h5_quiet_end(&out->quiet);
        unlink(out->tmp);
    }
    return rc;
}

/* The tensor_sink of checkpoint_write: a tensor and its AdamW m and v into the file. */
static int put_checkpoint_tensor(const struct param *p, const float *const *parts, void *sink,
                                 char *err, size_t err_size)
{
    struct checkpoint_out *out = sink;
    for (int g = 0; g < 3; g++)
        if (put_tensor(out->groups[g], checkpoint_groups[g], p, parts[g], out->dcpl, out->tmp, err,
                       err_size))
            return -1;
    return 0;
}

/* Deletes the oldest real checkpoints beyond `keep` and stray temporary files. Failures
 * are warnings: the checkpoint just written is complete. */
static void prune_checkpoints(const char *dir, int keep)
{
    struct step_list list;
    if (list_checkpoints(dir, &list) != 0) {
        log_warn("cannot list %s to delete old checkpoints: %s", dir, strerror(errno));
        return;
    }
    if (list.n > 1) qsort(list.steps, (size_t)list.n, sizeof *list.steps, compare_steps);
    char path[CHECKPOINT_PATH_MAX];
    for (int i = 0; i < list.n - keep; i++) {
        snprintf(path, sizeof path, "%s/step-%08lld.h5", dir, list.steps[i]);
        if (unlink(path) != 0 && errno != ENOENT)
            log_warn("cannot delete old checkpoint %s: %s", path, strerror(errno));
    }
    free(list.steps);
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *entry;
    while ((entry = readdir(d)) != NULL) {
        if (!checkpoint_temporary_name(entry->d_name)) continue;
        snprintf(path, sizeof path, "%s/%s", dir, entry->d_name);
        if (unlink(path) != 0 && errno != ENOENT)
            log_warn("cannot delete stray temporary file %s: %s", path, strerror(errno));
    }
    closedir(d);
}

/* Rank 0: closes the temporary file; when everything went in (rc 0), fsyncs it, renames
 * it to its real name, fsyncs the directory and prunes; otherwise deletes it. */
static int close_checkpoint(struct checkpoint_out *out, int rc, int keep, char *err,
                            size_t err_size)
{
    for (int g = 0; g < 3; g++) H5Gclose(out->groups[g]);
    if (H5Fclose(out->file) < 0 && rc == 0) {
        h5_fail(err, err_size, out->tmp, NULL, "cannot close checkpoint");
        rc = -1;
    }
    H5Pclose(out->dcpl);
    h5_quiet_end(&out->quiet);
    if (rc != 0) {
        unlink(out->tmp);
        return -1;
    }
    if (fsync_path(out->tmp, O_RDONLY) != 0) {
        snprintf(err, err_size, "%s: fsync failed: %s", out->tmp, strerror(errno));
        unlink(out->tmp);
        return -1;
    }
    if (rename(out->tmp, out->path) != 0) {
        snprintf(err, err_size, "cannot rename %s to %s: %s", out->tmp, out->path, strerror(errno));
        unlink(out->tmp);
        return -1;
    }
    if (fsync_path(out->dir, O_RDONLY | O_DIRECTORY) != 0) {
        snprintf(err, err_size, "%s: fsync of the directory failed: %s", out->dir, strerror(errno));
        return -1;
    }
    prune_checkpoints(out->dir, keep);
    return 0;
}

/* What every rank checks before a write: the model was built for comm, and this rank's
 * optimizer state matches the trainable tensors it holds. */
static int check_writable(const struct model *model, const struct adamw *opt,
                          const struct train_position *position, const struct checkpoint_run *run,
                          MPI_Comm comm, char *err, size_t err_size)
{
    if (!run || !run->method || !run->method[0]) {
        snprintf(err, err_size, "checkpoint_write: no method given");
        return -1;
    }
    if (position->step < 0) {
        snprintf(err, err_size, "checkpoint_write: negative step %lld", position->step);
        return -1;
    }
    if (gather_check_layout(model, comm, "checkpoint_write", err, err_size)) return -1;
    size_t held = 0;
    for (int i = 0; i < model->n_params; i++)
        if (gather_checkpointed(&model->params[i])) held += model->params[i].numel;
    if (held != model->grad_floats || opt->n != held || (held > 0 && (!opt->m || !opt->v))) {
        snprintf(err, err_size,
                 "checkpoint_write: optimizer state of %zu values for %zu trainable values "
                 "(adamw_init after model_set_trainable)",
                 opt->n, held);
        return -1;
    }
    return 0;
}

int checkpoint_write(const char *output_dir, const struct model *model, const struct adamw *opt,
                     const struct train_position *position, const struct checkpoint_run *run,
                     int keep, MPI_Comm comm, char *err, size_t err_size)
{
    if (keep < 1) {
        /* the same argument on every rank: every rank returns here */
        snprintf(err, err_size, "checkpoint_write: keep must be at least 1, got %d", keep);
        return -1;
    }
    int rank;
    check_mpi(MPI_Comm_rank(comm, &rank));
    int rc = check_writable(model, opt, position, run, comm, err, err_size);
    if (checkpoint_agree(rc, err, err_size, comm)) return -1;
    struct checkpoint_out out = {.file = -1};
    if (rank == 0) rc = open_checkpoint(&out, output_dir, model, opt, position, run, err, err_size);
    if (checkpoint_agree(rc, err, err_size, comm)) return -1;
    rc = gather_to_rank0(model, opt, true, 3, comm, put_checkpoint_tensor, &out, err, err_size);
    if (rank == 0) rc = close_checkpoint(&out, rc, keep, err, err_size);
    return checkpoint_agree(rc, err, err_size, comm);
}

/* ---- finding and reading -------------------------------------------------------------- */

int checkpoint_list(const char *output_dir, long long **steps, char *err, size_t err_size)
{
    *steps = NULL;
    char dir[CHECKPOINT_PATH_MAX];
    if (path_join(dir, sizeof dir, output_dir, "checkpoints", err, err_size)) return -1;
    struct step_list list;
    if (list_checkpoints(dir, &list) != 0) {
        if (errno == ENOENT) return 0;
        snprintf(err, err_size, "%s: cannot list checkpoints: %s", dir, strerror(errno));
        return -1;
    }
    if (list.n > 1) qsort(list.steps, (size_t)list.n, sizeof *list.steps, compare_steps);
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
        uint64_t sum = attributes_checksum(info);
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

/* /GROUP/<p->name> exists, is floating point and has p's shape. */
static int check_tensor(hid_t file, const char *group, const struct param *p, const char *path,
                        char *err, size_t err_size)
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
            if ((rc = check_tensor(file, checkpoint_groups[g], p, path, err, err_size))) return rc;
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
    hid_t fapl = file_access_plist();
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

