/* checkpoint_write: writing a training checkpoint, every rank its own part, for the train
 * phase (see checkpoint.h for the file layout; the readers are in checkpoint.c).
 *
 * One HDF5 file per checkpoint, written with parallel HDF5 (the MPI-IO driver) by every
 * rank of the layout at once. The ranks create the attributes, groups and datasets
 * together (HDF5's metadata operations are collective, and its metadata is written
 * collectively at the flush); then every rank that holds a tensor writes a block of its
 * rows from its own memory. The holders of a tensor are the ranks of its stage, on every
 * data-parallel slot, with its EP rank (or every EP rank for a tensor they all hold);
 * they hold the same values, so the rows are split evenly among them and no tensor
 * travels between ranks: no rank holds more than its own tensors at any time. The rows
 * each rank wrote are recorded with the dataset (its `slices`), and the writer's layout
 * at the root (`layout`); the dataset's shape is the tensor's global shape, so a
 * checkpoint reads back under any layout.
 *
 * The tensors' data goes in independent MPI-IO writes, not collective ones: each is one
 * contiguous block of rows from one rank (nothing for collective buffering to merge),
 * and a collective H5Dwrite per dataset made every rank wait for every other once per
 * tensor: 30 s against 5 s for the 2,529 datasets of the 140M-parameter init model under
 * ep 4 (4 ranks on 2 cores, 2026-11-26).
 *
 * The checksums are those of version 2: of each tensor's values, computed by its
 * lowest-numbered holder and shared with every rank (attributes are written by all ranks
 * with the same value), and of the root attributes, which rank 0's values set for every
 * rank. The file goes to a dot-file in the checkpoint directory: it is flushed (MPI-IO
 * sync) and closed by every rank, then rank 0 fsyncs it, renames it to its real name and
 * fsyncs the directory, so a real name only ever names a complete file. Object
 * timestamps are off. */
#include "checkpoint.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <hdf5.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "checkpoint_internal.h"
#include "checksum.h"
#include "files.h"
#include "gather.h"
#include "h5util.h"
#include "log.h"

/* Bytes of MPI-IO's collective buffer per aggregating rank (the hint cb_buffer_size). */
#define CHECKPOINT_COLLECTIVE_BUFFER "4194304"

/* ---- attributes --------------------------------------------------------------------- */

/* An attribute of rows x columns elements (scalar when both are 1, a list when columns is
 * 1). */
static int put_attr(hid_t object, const char *name, hid_t file_type, hid_t mem_type,
                    const void *value, hsize_t rows, hsize_t columns, const char *path, char *err,
                    size_t err_size)
{
    hsize_t dims[2] = {rows, columns};
    hid_t space = rows == 1 && columns == 1 ? H5Screate(H5S_SCALAR)
                                            : H5Screate_simple(columns == 1 ? 1 : 2, dims, NULL);
    hid_t attr = H5Acreate2(object, name, file_type, space, H5P_DEFAULT, H5P_DEFAULT);
    int rc = 0;
    if (attr < 0 || H5Awrite(attr, mem_type, value) < 0) {
        h5_fail(err, err_size, path, name, "cannot write attribute");
        rc = -1;
    }
    if (attr >= 0) H5Aclose(attr);
    H5Sclose(space);
    return rc;
}

/* What the root attributes say, the same on every rank: rank 0's. */
struct root_attributes {
    struct train_position position;
    int64_t adam_step;
    uint64_t config_hash, data_hash, expert_config_hash;
    char *method, *deck_text; /* allocated */
};

static char *broadcast_string(const char *text, int rank, MPI_Comm comm)
{
    unsigned long long n = rank == 0 ? strlen(text ? text : "") : 0;
    check_mpi(MPI_Bcast(&n, 1, MPI_UNSIGNED_LONG_LONG, 0, comm));
    char *copy = xmalloc(n + 1);
    if (rank == 0) memcpy(copy, text ? text : "", n);
    copy[n] = '\0';
    for (unsigned long long at = 0; at < n; at += 1u << 30) {
        unsigned long long count = n - at < (1u << 30) ? n - at : (1u << 30);
        check_mpi(MPI_Bcast(copy + at, (int)count, MPI_CHAR, 0, comm));
    }
    return copy;
}

static void broadcast_root(struct root_attributes *root, const struct model *model,
                           const struct adamw *opt, const struct train_position *position,
                           const struct checkpoint_run *run, int rank, MPI_Comm comm)
{
    root->position = *position;
    root->adam_step = opt->step;
    uint64_t words[4 + 3] = {0};
    if (rank == 0) {
        memcpy(words, position->rng, sizeof position->rng);
        words[4] = model->cfg.hash;
        words[5] = run->data_hash;
        words[6] = run->expert_config_hash;
    }
    long long where[4] = {position->step, position->epoch, position->block, opt->step};
    check_mpi(MPI_Bcast(words, 7, MPI_UINT64_T, 0, comm));
    check_mpi(MPI_Bcast(where, 4, MPI_LONG_LONG, 0, comm));
    memcpy(root->position.rng, words, sizeof root->position.rng);
    root->config_hash = words[4];
    root->data_hash = words[5];
    root->expert_config_hash = words[6];
    root->position.step = where[0];
    root->position.epoch = where[1];
    root->position.block = where[2];
    root->adam_step = where[3];
    root->method = broadcast_string(run->method, rank, comm);
    root->deck_text = broadcast_string(run->deck_text, rank, comm);
}

/* The attributes of the checkpoint, and the layout that wrote it. */
static int put_attributes(hid_t file, const char *path, const struct root_attributes *root,
                          const struct layout_grid *grid, char *err, size_t err_size)
{
    int32_t version = CHECKPOINT_VERSION;
    int32_t layout[3] = {grid->pp, grid->dp, grid->ep};
    int64_t step = root->position.step, epoch = root->position.epoch;
    int64_t block = root->position.block;
    struct checkpoint_info info = {.version = version,
                                   .position = root->position,
                                   .adam_step = root->adam_step,
                                   .config_hash = root->config_hash,
                                   .method = root->method,
                                   .deck_text = root->deck_text,
                                   .data_hash = root->data_hash,
                                   .expert_config_hash = root->expert_config_hash};
    uint64_t sum = checkpoint_attributes_checksum(&info);
#define PUT(name, ftype, mtype, value, n)                                                          \
    put_attr(file, name, ftype, mtype, value, n, 1, path, err, err_size)
    if (h5_put_attr_string(file, "format", CHECKPOINT_FORMAT, path, err, err_size) ||
        PUT("version", H5T_STD_I32LE, H5T_NATIVE_INT32, &version, 1) ||
        PUT("step", H5T_STD_I64LE, H5T_NATIVE_INT64, &step, 1) ||
        PUT("epoch", H5T_STD_I64LE, H5T_NATIVE_INT64, &epoch, 1) ||
        PUT("block", H5T_STD_I64LE, H5T_NATIVE_INT64, &block, 1) ||
        PUT("rng", H5T_STD_U64LE, H5T_NATIVE_UINT64, root->position.rng, 4) ||
        PUT("adam_step", H5T_STD_I64LE, H5T_NATIVE_INT64, &root->adam_step, 1) ||
        PUT("config_hash", H5T_STD_U64LE, H5T_NATIVE_UINT64, &root->config_hash, 1) ||
        h5_put_attr_string(file, "method", root->method, path, err, err_size) ||
        h5_put_attr_string(file, "deck", root->deck_text, path, err, err_size) ||
        PUT("data_hash", H5T_STD_U64LE, H5T_NATIVE_UINT64, &root->data_hash, 1) ||
        PUT("expert_config_hash", H5T_STD_U64LE, H5T_NATIVE_UINT64, &root->expert_config_hash, 1) ||
        PUT("checksum", H5T_STD_U64LE, H5T_NATIVE_UINT64, &sum, 1) ||
        PUT("layout", H5T_STD_I32LE, H5T_NATIVE_INT32, layout, 3))
        return -1;
#undef PUT
    return 0;
}

/* ---- who writes what ------------------------------------------------------------------ */

/* The ranks that hold p, ascending: its stage, every data-parallel slot, its EP rank (or
 * every EP rank of the stage). Their number. */
static int holders_of(const struct model *model, const struct param *p, int *ranks)
{
    const struct layout_grid *grid = &model->grid;
    int n = 0;
    for (int d = 0; d < grid->dp; d++)
        for (int e = 0; e < grid->ep; e++)
            if (p->ep_rank < 0 || p->ep_rank == e)
                ranks[n++] = layout_rank_of(grid, (struct layout_coords){p->stage, d, e});
    return n;
}

/* p's rows split evenly among its holders: slices[3 k .. 3 k + 2] = writer rank, first row,
 * row count, for the holders with at least one row. Their number. */
static int slices_of(const struct model *model, const struct param *p, int *ranks, int64_t *slices)
{
    int n = holders_of(model, p, ranks), k = 0;
    int64_t rows = p->shape[0];
    for (int j = 0; j < n; j++) {
        int64_t first = rows * j / n, last = rows * (j + 1) / n;
        if (last == first) continue;
        slices[3 * k] = ranks[j];
        slices[3 * k + 1] = first;
        slices[3 * k + 2] = last - first;
        k++;
    }
    return k;
}

/* ---- the file ------------------------------------------------------------------------- */

/* The checkpoint while every rank writes it: the temporary file, open, and its real name. */
struct checkpoint_out {
    char dir[CHECKPOINT_PATH_MAX], path[CHECKPOINT_PATH_MAX], tmp[CHECKPOINT_PATH_MAX];
    hid_t file, dcpl, dxpl, groups[3];
    struct h5_quiet quiet;
};

static int checkpoint_names(struct checkpoint_out *out, const char *output_dir, long long step,
                            char *err, size_t err_size)
{
    char name[64], tmp_name[64];
    snprintf(name, sizeof name, "step-%08lld.h5", step);
    snprintf(tmp_name, sizeof tmp_name, ".step-%08lld.h5.tmp", step);
    return path_join(out->dir, sizeof out->dir, output_dir, "checkpoints", err, err_size) ||
                   path_join(out->path, sizeof out->path, out->dir, name, err, err_size) ||
                   path_join(out->tmp, sizeof out->tmp, out->dir, tmp_name, err, err_size)
               ? -1
               : 0;
}

/* Rank 0: the checkpoint directory. */
static int make_checkpoint_directory(const char *dir, char *err, size_t err_size)
{
    struct stat st;
    int failure = make_directories(dir) != 0 || stat(dir, &st) != 0 ? errno : 0;
    if (failure == 0 && !S_ISDIR(st.st_mode)) failure = ENOTDIR; /* a file of that name */
    if (failure != 0) {
        snprintf(err, err_size, "%s: cannot create directory: %s", dir, strerror(failure));
        return -1;
    }
    return 0;
}

/* Every rank: creates the temporary file over comm, its attributes and (empty) groups. */
static int open_checkpoint(struct checkpoint_out *out, const struct root_attributes *root,
                           const struct layout_grid *grid, MPI_Comm comm, char *err,
                           size_t err_size)
{
    hid_t fcpl = H5Pcreate(H5P_FILE_CREATE), fapl = checkpoint_file_access();
    hid_t gcpl = H5Pcreate(H5P_GROUP_CREATE);
    /* MPI-IO's collective buffers (the metadata's collective write, on the ranks that
     * aggregate it: rank 0 among them) held to 4 MiB: ROMIO's default is 16 MiB, Open
     * MPI's OMPIO 32 MiB */
    MPI_Info info;
    check_mpi(MPI_Info_create(&info));
    check_mpi(MPI_Info_set(info, "cb_buffer_size", CHECKPOINT_COLLECTIVE_BUFFER));
    H5Pset_fapl_mpio(fapl, comm, info);
    check_mpi(MPI_Info_free(&info));
    /* metadata read by one rank and shared, written by all together: fewer small I/Os */
    H5Pset_all_coll_metadata_ops(fapl, 1);
    H5Pset_coll_metadata_write(fapl, 1);
    out->dcpl = H5Pcreate(H5P_DATASET_CREATE);
    /* no modification times; space allocated at creation (as parallel HDF5 does anyway)
     * and never filled: every byte is written by a holder */
    H5Pset_obj_track_times(fcpl, 0);
    H5Pset_obj_track_times(gcpl, 0);
    H5Pset_obj_track_times(out->dcpl, 0);
    H5Pset_alloc_time(out->dcpl, H5D_ALLOC_TIME_EARLY);
    H5Pset_fill_time(out->dcpl, H5D_FILL_TIME_NEVER);
    out->dxpl = H5Pcreate(H5P_DATASET_XFER);
    H5Pset_dxpl_mpio(out->dxpl, H5FD_MPIO_INDEPENDENT); /* see the banner */
    out->file = H5Fcreate(out->tmp, H5F_ACC_TRUNC, fcpl, fapl);
    int rc = 0;
    if (out->file < 0) {
        h5_fail(err, err_size, out->tmp, NULL, "cannot create checkpoint");
        rc = -1;
    }
    if (rc == 0) rc = put_attributes(out->file, out->tmp, root, grid, err, err_size);
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
    return rc;
}

/* /GROUP/<name>: p's global shape, its checksum and slices (collective), and the rows this
 * rank writes (none when `data` is NULL or count is 0). */
static int put_tensor(struct checkpoint_out *out, int g, const struct param *p, const float *data,
                      uint64_t sum, const int64_t *slices, int n_slices, int64_t first,
                      int64_t count, char *err, size_t err_size)
{
    hsize_t dims[2] = {(hsize_t)p->shape[0], p->rank > 1 ? (hsize_t)p->shape[1] : 1};
    hid_t file_space = H5Screate_simple(p->rank, dims, NULL);
    hid_t dset = H5Dcreate2(out->groups[g], p->name, H5T_IEEE_F32LE, file_space, H5P_DEFAULT,
                            out->dcpl, H5P_DEFAULT);
    char object[PARAM_NAME_MAX + 32];
    snprintf(object, sizeof object, "/%s/%s", checkpoint_groups[g], p->name);
    int rc = 0;
    if (dset < 0) {
        h5_fail(err, err_size, out->tmp, object, "cannot create");
        H5Sclose(file_space);
        return -1;
    }
    if (put_attr(dset, "checksum", H5T_STD_U64LE, H5T_NATIVE_UINT64, &sum, 1, 1, out->tmp, err,
                 err_size) ||
        put_attr(dset, "slices", H5T_STD_I64LE, H5T_NATIVE_INT64, slices, (hsize_t)n_slices, 3,
                 out->tmp, err, err_size))
        rc = -1;
    /* the rows this rank writes, if any (an independent write) */
    if (data && count > 0) {
        size_t row_floats = p->numel / (size_t)p->shape[0];
        hsize_t count_floats = (hsize_t)count * row_floats;
        hsize_t start[2] = {(hsize_t)first, 0}, block[2] = {(hsize_t)count, dims[1]};
        hid_t memory_space = H5Screate_simple(1, &count_floats, NULL);
        H5Sselect_hyperslab(file_space, H5S_SELECT_SET, start, NULL, block, NULL);
        if (H5Dwrite(dset, H5T_NATIVE_FLOAT, memory_space, file_space, out->dxpl,
                     data + (size_t)first * row_floats) < 0 &&
            rc == 0) {
            h5_fail(err, err_size, out->tmp, object, "cannot write");
            rc = -1;
        }
        H5Sclose(memory_space);
    }
    H5Dclose(dset);
    H5Sclose(file_space);
    return rc;
}

/* Deletes the oldest real checkpoints beyond `keep` and stray temporary files. Failures
 * are warnings: the checkpoint just written is complete. */
static void prune_checkpoints(const char *dir, int keep)
{
    struct step_list list;
    if (checkpoint_list_steps(dir, &list) != 0) {
        log_warn("cannot list %s to delete old checkpoints: %s", dir, strerror(errno));
        return;
    }
    if (list.n > 1) qsort(list.steps, (size_t)list.n, sizeof *list.steps, checkpoint_compare_steps);
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

/* Every rank: flushes and closes the file (collective). 0, or -1 with a message. */
static int close_checkpoint(struct checkpoint_out *out, int rc, char *err, size_t err_size)
{
    if (out->file >= 0 && rc == 0 && H5Fflush(out->file, H5F_SCOPE_GLOBAL) < 0) {
        h5_fail(err, err_size, out->tmp, NULL, "cannot flush checkpoint");
        rc = -1;
    }
    for (int g = 0; g < 3; g++)
        if (out->groups[g] >= 0) H5Gclose(out->groups[g]);
    if (out->file >= 0 && H5Fclose(out->file) < 0 && rc == 0) {
        h5_fail(err, err_size, out->tmp, NULL, "cannot close checkpoint");
        rc = -1;
    }
    H5Pclose(out->dcpl);
    H5Pclose(out->dxpl);
    return rc;
}

/* Rank 0, once every rank has closed the file: fsyncs it, renames it to its real name,
 * fsyncs the directory and prunes; after a failure anywhere (rc), deletes it. */
static int publish_checkpoint(struct checkpoint_out *out, int rc, int keep, char *err,
                              size_t err_size)
{
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

/* ---- the write ------------------------------------------------------------------------ */

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

/* The checksums of every trainable tensor's three parts (sums[3 t + g], t counting the
 * trainable tensors in table order), computed by each tensor's lowest-numbered holder and
 * known to every rank. */
static void share_checksums(const struct model *model, const struct adamw *opt, int rank,
                            int *ranks, uint64_t *sums, int n_trainable, MPI_Comm comm)
{
    memset(sums, 0, (size_t)n_trainable * 3 * sizeof *sums);
    size_t offset = 0;
    int t = 0;
    for (int i = 0; i < model->n_params; i++) {
        const struct param *p = &model->params[i];
        if (!p->trainable) continue;
        if (gather_checkpointed(p)) {
            if (holders_of(model, p, ranks) > 0 && ranks[0] == rank) {
                const float *parts[3] = {p->data, opt->m + offset, opt->v + offset};
                for (int g = 0; g < 3; g++)
                    sums[3 * t + g] = checksum64(parts[g], p->numel * sizeof(float));
            }
            offset += p->numel;
        }
        t++;
    }
    /* one holder contributes each: the exclusive or is its value */
    check_mpi(MPI_Allreduce(MPI_IN_PLACE, sums, 3 * n_trainable, MPI_UINT64_T, MPI_BXOR, comm));
}

/* Every trainable tensor and its AdamW m and v into the open file, each rank its slices. */
static int put_tensors(struct checkpoint_out *out, const struct model *model,
                       const struct adamw *opt, int rank, MPI_Comm comm, char *err, size_t err_size)
{
    const struct layout_grid *grid = &model->grid;
    int *ranks = xmalloc((size_t)grid->world * sizeof *ranks);
    int64_t *slices = xmalloc((size_t)grid->world * 3 * sizeof *slices);
    int n_trainable = 0;
    for (int i = 0; i < model->n_params; i++) n_trainable += model->params[i].trainable;
    uint64_t *sums = xmalloc((size_t)(n_trainable ? n_trainable : 1) * 3 * sizeof *sums);
    share_checksums(model, opt, rank, ranks, sums, n_trainable, comm);
    int rc = 0, t = 0;
    size_t offset = 0; /* into this rank's AdamW state */
    for (int i = 0; i < model->n_params; i++) {
        const struct param *p = &model->params[i];
        if (!p->trainable) continue;
        const float *parts[3] = {NULL, NULL, NULL};
        if (gather_checkpointed(p)) {
            parts[0] = p->data;
            parts[1] = opt->m + offset;
            parts[2] = opt->v + offset;
            offset += p->numel;
        }
        int n_slices = slices_of(model, p, ranks, slices);
        int64_t first = 0, count = 0;
        for (int k = 0; k < n_slices; k++)
            if (slices[3 * k] == rank) first = slices[3 * k + 1], count = slices[3 * k + 2];
        if (count > 0 && !parts[0] && rc == 0) {
            snprintf(err, err_size,
                     "checkpoint_write: rank %d should hold %s under pp %d, dp %d, ep %d but "
                     "does not (programming error)",
                     rank, p->name, grid->pp, grid->dp, grid->ep);
            rc = -1;
        }
        /* after a failure every rank still takes part in every collective call */
        for (int g = 0; g < 3; g++) {
            int put = put_tensor(out, g, p, parts[g], sums[3 * t + g], slices, n_slices, first,
                                 count, err, err_size);
            if (rc == 0) rc = put;
        }
        t++;
    }
    free(sums);
    free(slices);
    free(ranks);
    return rc;
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
    struct checkpoint_out out = {.file = -1, .dcpl = -1, .dxpl = -1, .groups = {-1, -1, -1}};
    rc = checkpoint_names(&out, output_dir, position->step, err, err_size);
    if (rc == 0 && rank == 0) rc = make_checkpoint_directory(out.dir, err, err_size);
    if (checkpoint_agree(rc, err, err_size, comm)) return -1;
    struct root_attributes root;
    broadcast_root(&root, model, opt, position, run, rank, comm);
    h5_quiet_begin(&out.quiet);
    rc = open_checkpoint(&out, &root, &model->grid, comm, err, err_size);
    free(root.method);
    free(root.deck_text);
    /* a file every rank opened (H5Fcreate is collective: it fails on all or on none) */
    if (out.file >= 0) {
        int tensors = put_tensors(&out, model, opt, rank, comm, err, err_size);
        if (rc == 0) rc = tensors;
    }
    rc = close_checkpoint(&out, rc, err, err_size);
    h5_quiet_end(&out.quiet);
    rc = checkpoint_agree(rc, err, err_size, comm);
    if (rank == 0) rc = publish_checkpoint(&out, rc, keep, err, err_size);
    return checkpoint_agree(rc, err, err_size, comm);
}
