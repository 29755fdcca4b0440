/* stats: the routing statistics file (see stats.h for its layout). Written by the score
 * phase with parallel HDF5 (stats_write, collective), read by the select phase
 * (stats_read, serial).
 *
 * Parallel HDF5 asks that every call that changes the file's metadata (file, group,
 * dataset and attribute creation, attribute writes) is made by every rank of the
 * communicator with the same arguments. So rank 0 broadcasts the file's identity first,
 * every rank creates the same objects and writes the same attributes, and only the raw
 * data is written independently: rank 0 the totals and samples, each scoring rank its
 * own row of /ranks/. Any failure is agreed over the communicator before the next
 * collective step, so no rank waits in a call the others skipped. */
#include "stats.h"

#include <errno.h>
#include <hdf5.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "h5util.h"
#include "log.h"

#define STATS_FORMAT "esft-routing-stats"
#define STATS_VERSION 2 /* 2 adds dataset_checksum, tokenizer, tokenizer_checksum */
#define STATS_MESSAGE_MAX 1024

/* ---- writing ------------------------------------------------------------------------ */

/* Every rank learns whether any rank failed. A rank that failed keeps its own message;
 * the others get the lowest failing rank's. Returns 0 when none failed, else -1. */
static int agree(MPI_Comm comm, int failed, char *err, size_t err_size)
{
    int rank, size;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &size);
    int mine = failed ? rank : size, first = size;
    check_mpi(MPI_Allreduce(&mine, &first, 1, MPI_INT, MPI_MIN, comm));
    if (first == size) return 0;
    char message[STATS_MESSAGE_MAX] = "";
    if (rank == first) snprintf(message, sizeof message, "%s", err);
    check_mpi(MPI_Bcast(message, sizeof message, MPI_CHAR, first, comm));
    if (!failed) snprintf(err, err_size, "rank %d: %s", first, message);
    return -1;
}

static int put_attr(hid_t file, const char *name, hid_t file_type, hid_t mem_type,
                    const void *value, const char *path, char *err, size_t err_size)
{
    hid_t space = H5Screate(H5S_SCALAR);
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

/* The file's identity attributes (see stats.h), written by every rank alike. */
static int put_attributes(hid_t file, const struct routing_stats *id, const char *deck_text,
                          const char *path, char *err, size_t err_size)
{
    int32_t version = STATS_VERSION;
    int32_t ints[] = {id->num_layers, id->num_experts, id->top_k, id->world,
                      id->pp,         id->dp,          id->ep};
    const char *int_names[] = {"num_layers", "num_experts", "top_k", "world", "pp", "dp", "ep"};
    int64_t seed = id->seed, n_sample_tokens = id->n_sample_tokens;
    uint8_t norm = id->norm_topk_prob ? 1 : 0;
    uint64_t hash = id->config_hash;
    if (h5_put_attr_string(file, "format", STATS_FORMAT, path, err, err_size) ||
        put_attr(file, "version", H5T_STD_I32LE, H5T_NATIVE_INT32, &version, path, err, err_size) ||
        h5_put_attr_string(file, "model_path", id->model_path, path, err, err_size) ||
        h5_put_attr_string(file, "model_type", id->model_type, path, err, err_size) ||
        put_attr(file, "config_hash", H5T_STD_U64LE, H5T_NATIVE_UINT64, &hash, path, err,
                 err_size) ||
        put_attr(file, "norm_topk_prob", H5T_STD_U8LE, H5T_NATIVE_UINT8, &norm, path, err,
                 err_size) ||
        h5_put_attr_string(file, "dataset", id->dataset, path, err, err_size) ||
        h5_put_attr_string(file, "dataset_checksum", id->dataset_checksum, path, err, err_size) ||
        h5_put_attr_string(file, "tokenizer", id->tokenizer, path, err, err_size) ||
        h5_put_attr_string(file, "tokenizer_checksum", id->tokenizer_checksum, path, err,
                        err_size) ||
        put_attr(file, "seed", H5T_STD_I64LE, H5T_NATIVE_INT64, &seed, path, err, err_size) ||
        put_attr(file, "n_sample_tokens", H5T_STD_I64LE, H5T_NATIVE_INT64, &n_sample_tokens, path,
                 err, err_size) ||
        h5_put_attr_string(file, "tokens_scored", id->tokens_scored, path, err, err_size) ||
        h5_put_attr_string(file, "deck", deck_text, path, err, err_size))
        return -1;
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++)
        if (put_attr(file, int_names[i], H5T_STD_I32LE, H5T_NATIVE_INT32, &ints[i], path, err,
                     err_size))
            return -1;
    return 0;
}

/* The datasets of one file, in the order stats.h lists them. */
enum dataset_id {
    DS_MOE_LAYERS,
    DS_TOKENS,
    DS_COUNT,
    DS_GATE,
    DS_COACT,
    DS_RANK_TOKENS,
    DS_RANK_COUNT,
    DS_RANK_GATE,
    DS_SAMPLE_INDEX,
    DS_SAMPLE_TOKENS,
    DS_SAMPLE_COUNT,
    DS_SAMPLE_GATE,
    DS_COUNT_ALL
};

enum element { EL_I32, EL_U32, EL_U64, EL_F64 };

static const struct {
    const char *name;
    enum element element;
} datasets[DS_COUNT_ALL] = {
    {"/moe_layers", EL_I32},     {"/totals/tokens", EL_U64}, {"/totals/count", EL_U64},
    {"/totals/gate", EL_F64},    {"/totals/coact", EL_U64},  {"/ranks/tokens", EL_U64},
    {"/ranks/count", EL_U64},    {"/ranks/gate", EL_F64},    {"/samples/index", EL_U64},
    {"/samples/tokens", EL_U64}, {"/samples/count", EL_U32}, {"/samples/gate", EL_F64},
};

static hid_t file_type_of(enum element e)
{
    switch (e) {
    case EL_I32:
        return H5T_STD_I32LE;
    case EL_U32:
        return H5T_STD_U32LE;
    case EL_U64:
        return H5T_STD_U64LE;
    default:
        return H5T_IEEE_F64LE;
    }
}

static hid_t memory_type_of(enum element e)
{
    switch (e) {
    case EL_I32:
        return H5T_NATIVE_INT32;
    case EL_U32:
        return H5T_NATIVE_UINT32;
    case EL_U64:
        return H5T_NATIVE_UINT64;
    default:
        return H5T_NATIVE_DOUBLE;
    }
}

/* Shapes [up to 3] of every dataset for Lm MoE layers, E experts, R ranks, S samples. */
static int dataset_shape(enum dataset_id id, hsize_t Lm, hsize_t E, hsize_t R, hsize_t S,
                         hsize_t dims[3])
{
    switch (id) {
    case DS_MOE_LAYERS:
    case DS_TOKENS:
        dims[0] = Lm;
        return 1;
    case DS_COUNT:
    case DS_GATE:
        dims[0] = Lm;
        dims[1] = E;
        return 2;
    case DS_COACT:
        dims[0] = Lm;
        dims[1] = E;
        dims[2] = E;
        return 3;
    case DS_RANK_TOKENS:
        dims[0] = R;
        dims[1] = Lm;
        return 2;
    case DS_RANK_COUNT:
    case DS_RANK_GATE:
        dims[0] = R;
        dims[1] = Lm;
        dims[2] = E;
        return 3;
    case DS_SAMPLE_INDEX:
    case DS_SAMPLE_TOKENS:
        dims[0] = S;
        return 1;
    default:
        dims[0] = S;
        dims[1] = Lm;
        dims[2] = E;
        return 3;
    }
}

/* Rank 0's checks of what it is asked to write, before any file is touched. */
static int check_totals(const struct routing_stats *all, const char *path, char *err,
                        size_t err_size)
{
    const char *missing = NULL;
    if (!all->moe_layers)
        missing = "moe_layers";
    else if (!all->tokens)
        missing = "tokens";
    else if (!all->count)
        missing = "count";
    else if (!all->gate)
        missing = "gate";
    else if (all->n_samples > 0 && !all->sample_index)
        missing = "sample_index";
    else if (all->n_samples > 0 && !all->sample_tokens)
        missing = "sample_tokens";
    else if (all->n_samples > 0 && !all->sample_count)
        missing = "sample_count";
    else if (all->n_samples > 0 && !all->sample_gate)
        missing = "sample_gate";
    if (missing) {
        snprintf(err, err_size, "%s: cannot write statistics: array '%s' is missing", path,
                 missing);
        return -1;
    }
    if (all->n_moe_layers < 1 || all->num_experts < 1 || all->dp < 1 ||
        all->n_moe_layers > all->num_layers) {
        snprintf(err, err_size,
                 "%s: cannot write statistics: %d MoE layers of %d, %d experts, dp %d "
                 "(need 1 <= MoE layers <= layers, >= 1 expert, dp >= 1)",
                 path, all->n_moe_layers, all->num_layers, all->num_experts, all->dp);
        return -1;
    }
    /* /ranks/ has one row per data-parallel rank: R = dp (n_ranks may be left 0) */
    if (all->n_ranks != 0 && all->n_ranks != all->dp) {
        snprintf(err, err_size,
                 "%s: cannot write statistics: n_ranks %d but dp = %d "
                 "(one row of /ranks/ per data-parallel rank)",
                 path, all->n_ranks, all->dp);
        return -1;
    }
    return 0;
}

/* What every rank needs to create the same objects: rank 0's identity. */
struct write_plan {
    struct routing_stats id; /* rank 0's struct; its pointers are not used elsewhere */
    long long deck_length;
    int has_coact;
    int status;
    char message[STATS_MESSAGE_MAX];
};

static int write_whole(hid_t dset, enum element e, const void *data, hsize_t n)
{
    if (n == 0) return 0;
    return H5Dwrite(dset, memory_type_of(e), H5S_ALL, H5S_ALL, H5P_DEFAULT, data) < 0 ? -1 : 0;
}

/* Row `row` of a dataset [R, ...]: a hyperslab, independent transfer. */
static int write_row(hid_t dset, enum element e, int row, const void *data)
{
    hid_t space = H5Dget_space(dset);
    int rank = H5Sget_simple_extent_ndims(space);
    hsize_t dims[3], start[3] = {0, 0, 0}, count[3];
    H5Sget_simple_extent_dims(space, dims, NULL);
    start[0] = (hsize_t)row;
    count[0] = 1;
    for (int i = 1; i < rank; i++) count[i] = dims[i];
    hid_t memory = H5Screate_simple(rank, count, NULL);
    int rc = -1;
    if (H5Sselect_hyperslab(space, H5S_SELECT_SET, start, NULL, count, NULL) >= 0 &&
        H5Dwrite(dset, memory_type_of(e), memory, space, H5P_DEFAULT, data) >= 0)
        rc = 0;
    H5Sclose(memory);
    H5Sclose(space);
    return rc;
}

int stats_write(const char *path, MPI_Comm comm, const struct routing_stats *all,
                const struct stats_rank_part *mine, char *err, size_t err_size)
{
    int rank, size;
    MPI_Comm_rank(comm, &rank);
    MPI_Comm_size(comm, &size);
    if (err_size > 0) err[0] = '\0';

    /* 1. Rank 0 checks its data and tells every rank what the file holds. */
    struct write_plan *plan = xcalloc(1, sizeof *plan);
    if (rank == 0) {
        plan->id = *all;
        plan->deck_length = all->deck ? (long long)strlen(all->deck) : 0;
        plan->has_coact = all->coact != NULL;
        plan->id.n_ranks = all->dp;
        if (check_totals(all, path, plan->message, sizeof plan->message) != 0) plan->status = -1;
    }
    check_mpi(MPI_Bcast(plan, sizeof *plan, MPI_BYTE, 0, comm));
    if (plan->status != 0) {
        snprintf(err, err_size, "%s", plan->message);
        free(plan);
        return -1;
    }
    const struct routing_stats *id = &plan->id;
    char *deck_text = xcalloc((size_t)plan->deck_length + 1, 1);
    if (rank == 0 && plan->deck_length > 0) memcpy(deck_text, all->deck, (size_t)plan->deck_length);
    if (plan->deck_length > 0)
        check_mpi(MPI_Bcast(deck_text, (int)plan->deck_length, MPI_CHAR, 0, comm));
    const hsize_t Lm = (hsize_t)id->n_moe_layers, E = (hsize_t)id->num_experts,
                  R = (hsize_t)id->n_ranks, S = id->n_samples;

    /* 2. Each row of /ranks/ is written by exactly one rank. */
    int row = mine ? mine->rank : -1;
    int failed = 0;
    if (row >= (int)R || row < -1) {
        snprintf(err, err_size, "%s: this rank's row %d of /ranks/ is outside [0, %d)", path, row,
                 (int)R);
        failed = 1;
    } else if (row >= 0 && (!mine->tokens || !mine->count || !mine->gate)) {
        snprintf(err, err_size, "%s: this rank's row %d of /ranks/ has no data", path, row);
        failed = 1;
    }
    if (agree(comm, failed, err, err_size) != 0) goto fail_early;
    int *writers = xcalloc(R, sizeof *writers), *total = xcalloc(R, sizeof *total);
    if (row >= 0) writers[row] = 1;
    check_mpi(MPI_Allreduce(writers, total, (int)R, MPI_INT, MPI_SUM, comm));
    for (hsize_t r = 0; r < R && !failed; r++)
        if (total[r] != 1) {
            if (rank == 0)
                snprintf(err, err_size, "%s: row %d of /ranks/ is claimed by %d ranks (want 1)",
                         path, (int)r, total[r]);
            failed = 1;
        }
    free(writers);
    free(total);
    if (failed) {
        /* every rank saw the same totals; rank 0 has the message */
        char message[STATS_MESSAGE_MAX];
        snprintf(message, sizeof message, "%s", rank == 0 ? err : "");
        check_mpi(MPI_Bcast(message, sizeof message, MPI_CHAR, 0, comm));
        snprintf(err, err_size, "%s", message);
        goto fail_early;
    }

    /* 3. Create path.tmp and every object in it, collectively. */
    struct h5_quiet quiet;
    h5_quiet_begin(&quiet);
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    hid_t fapl = H5Pcreate(H5P_FILE_ACCESS);
    H5Pset_fapl_mpio(fapl, comm, MPI_INFO_NULL);
    hid_t file = H5Fcreate(tmp, H5F_ACC_TRUNC, H5P_DEFAULT, fapl);
    H5Pclose(fapl);
    if (file < 0) h5_fail(err, err_size, tmp, "/", "cannot create the file");
    if (agree(comm, file < 0, err, err_size) != 0) {
        h5_quiet_end(&quiet);
        goto fail_early;
    }

    hid_t dset[DS_COUNT_ALL];
    for (int i = 0; i < DS_COUNT_ALL; i++) dset[i] = H5I_INVALID_HID;
    failed = put_attributes(file, id, deck_text, tmp, err, err_size) != 0;
    const char *groups[] = {"/totals", "/ranks", "/samples"};
    for (int g = 0; g < 3 && !failed; g++) {
        hid_t group = H5Gcreate2(file, groups[g], H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        if (group < 0) {
            h5_fail(err, err_size, tmp, groups[g], "cannot create group");
            failed = 1;
        } else {
            H5Gclose(group);
        }
    }
    for (int i = 0; i < DS_COUNT_ALL && !failed; i++) {
        if (i == DS_COACT && !plan->has_coact) continue;
        hsize_t dims[3];
        int ndims = dataset_shape((enum dataset_id)i, Lm, E, R, S, dims);
        hid_t space = H5Screate_simple(ndims, dims, NULL);
        dset[i] = H5Dcreate2(file, datasets[i].name, file_type_of(datasets[i].element), space,
                             H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        H5Sclose(space);
        if (dset[i] < 0) {
            h5_fail(err, err_size, tmp, datasets[i].name, "cannot create dataset");
            failed = 1;
        }
    }
    failed = agree(comm, failed, err, err_size) != 0;

    /* 4. Raw data, independently: rank 0 the totals and samples, each rank its row. */
    if (!failed && rank == 0) {
        const void *data[DS_COUNT_ALL] = {[DS_MOE_LAYERS] = all->moe_layers,
                                          [DS_TOKENS] = all->tokens,
                                          [DS_COUNT] = all->count,
                                          [DS_GATE] = all->gate,
                                          [DS_COACT] = all->coact,
                                          [DS_SAMPLE_INDEX] = all->sample_index,
                                          [DS_SAMPLE_TOKENS] = all->sample_tokens,
                                          [DS_SAMPLE_COUNT] = all->sample_count,
                                          [DS_SAMPLE_GATE] = all->sample_gate};
        for (int i = 0; i < DS_COUNT_ALL && !failed; i++) {
            if (i >= DS_RANK_TOKENS && i <= DS_RANK_GATE) continue;
            if (dset[i] < 0) continue;
            hsize_t dims[3], n = 1;
            int ndims = dataset_shape((enum dataset_id)i, Lm, E, R, S, dims);
            for (int d = 0; d < ndims; d++) n *= dims[d];
            if (write_whole(dset[i], datasets[i].element, data[i], n) != 0) {
                h5_fail(err, err_size, tmp, datasets[i].name, "cannot write");
                failed = 1;
            }
        }
    }
    if (!failed && row >= 0) {
        const void *data[3] = {mine->tokens, mine->count, mine->gate};
        for (int i = DS_RANK_TOKENS; i <= DS_RANK_GATE && !failed; i++)
            if (write_row(dset[i], datasets[i].element, row, data[i - DS_RANK_TOKENS]) != 0) {
                h5_fail(err, err_size, tmp, datasets[i].name, "cannot write this rank's row");
                failed = 1;
            }
    }

    /* 5. Close (collective), agree, and publish the file under its name. */
    for (int i = 0; i < DS_COUNT_ALL; i++)
        if (dset[i] >= 0) H5Dclose(dset[i]);
    if (H5Fclose(file) < 0 && !failed) {
        h5_fail(err, err_size, tmp, "/", "cannot close the file");
        failed = 1;
    }
    h5_quiet_end(&quiet);
    failed = agree(comm, failed, err, err_size) != 0;
    if (!failed) {
        char message[STATS_MESSAGE_MAX] = "";
        int renamed = 0;
        if (rank == 0 && rename(tmp, path) != 0) {
            snprintf(message, sizeof message, "cannot rename %.450s to %.450s: %s", tmp, path,
                     strerror(errno));
            renamed = -1;
        }
        check_mpi(MPI_Bcast(&renamed, 1, MPI_INT, 0, comm));
        if (renamed != 0) {
            check_mpi(MPI_Bcast(message, sizeof message, MPI_CHAR, 0, comm));
            snprintf(err, err_size, "%s", message);
            failed = 1;
        }
    }
    if (failed && rank == 0) remove(tmp);
    free(deck_text);
    free(plan);
    return failed ? -1 : 0;

fail_early:
    free(deck_text);
    free(plan);
    return -1;
}

/* ---- reading ------------------------------------------------------------------------ */

struct reader {
    hid_t file;
    const char *path;
    char *err;
    size_t err_size;
};

static int attr_open(struct reader *r, const char *name, hid_t *attr)
{
    htri_t exists = H5Aexists(r->file, name);
    if (exists <= 0) {
        snprintf(r->err, r->err_size,
                 "%s: attribute '%s' is missing (not a statistics file "
                 "written by esft score?)",
                 r->path, name);
        return -1;
    }
    *attr = H5Aopen(r->file, name, H5P_DEFAULT);
    if (*attr < 0) {
        h5_fail(r->err, r->err_size, r->path, name, "cannot open attribute");
        return -1;
    }
    return 0;
}

/* A scalar string attribute (fixed or variable length) into out[size]. */
static int get_attr_string(struct reader *r, const char *name, char *out, size_t size)
{
    hid_t attr;
    if (attr_open(r, name, &attr) != 0) return -1;
    hid_t type = H5Aget_type(attr), space = H5Aget_space(attr);
    int rc = 0;
    if (H5Tget_class(type) != H5T_STRING || H5Sget_simple_extent_npoints(space) != 1) {
        snprintf(r->err, r->err_size, "%s: attribute '%s' is not a string", r->path, name);
        rc = -1;
    } else if (H5Tis_variable_str(type) > 0) {
        hid_t memory = H5Tcopy(H5T_C_S1);
        H5Tset_size(memory, H5T_VARIABLE);
        char *value = NULL;
        if (H5Aread(attr, memory, &value) < 0) {
            h5_fail(r->err, r->err_size, r->path, name, "cannot read attribute");
            rc = -1;
        } else {
            snprintf(out, size, "%s", value ? value : "");
            H5free_memory(value);
        }
        H5Tclose(memory);
    } else {
        size_t n = H5Tget_size(type);
        char *value = xcalloc(n + 1, 1);
        hid_t memory = H5Tcopy(H5T_C_S1);
        H5Tset_size(memory, n + 1);
        H5Tset_strpad(memory, H5T_STR_NULLTERM);
        if (H5Aread(attr, memory, value) < 0) {
            h5_fail(r->err, r->err_size, r->path, name, "cannot read attribute");
            rc = -1;
        } else if (strlen(value) >= size) {
            snprintf(r->err, r->err_size, "%s: attribute '%s' is longer than %zu bytes", r->path,
                     name, size - 1);
            rc = -1;
        } else {
            memcpy(out, value, strlen(value) + 1);
        }
        H5Tclose(memory);
        free(value);
    }
    H5Sclose(space);
    H5Tclose(type);
    H5Aclose(attr);
    return rc;
}

/* A scalar string attribute of any length, allocated. */
static int get_attr_text(struct reader *r, const char *name, char **out)
{
    hid_t attr;
    if (attr_open(r, name, &attr) != 0) return -1;
    hid_t type = H5Aget_type(attr);
    size_t n = H5Tis_variable_str(type) > 0 ? 0 : H5Tget_size(type);
    H5Tclose(type);
    H5Aclose(attr);
    size_t size = n > 0 ? n + 1 : 1 << 20;
    *out = xcalloc(size, 1);
    return get_attr_string(r, name, *out, size);
}

/* A scalar integer attribute, converted to long long (unsigned: to uint64). */
static int get_attr_integer(struct reader *r, const char *name, long long *value, uint64_t *u)
{
    hid_t attr;
    if (attr_open(r, name, &attr) != 0) return -1;
    hid_t type = H5Aget_type(attr), space = H5Aget_space(attr);
    int rc = 0;
    if (H5Tget_class(type) != H5T_INTEGER || H5Sget_simple_extent_npoints(space) != 1) {
        snprintf(r->err, r->err_size, "%s: attribute '%s' is not an integer", r->path, name);
        rc = -1;
    } else if (u ? H5Aread(attr, H5T_NATIVE_UINT64, u) < 0
                 : H5Aread(attr, H5T_NATIVE_LLONG, value) < 0) {
        h5_fail(r->err, r->err_size, r->path, name, "cannot read attribute");
        rc = -1;
    }
    H5Sclose(space);
    H5Tclose(type);
    H5Aclose(attr);
    return rc;
}

static int get_attr_int(struct reader *r, const char *name, int *out)
{
    long long value = 0;
    if (get_attr_integer(r, name, &value, NULL) != 0) return -1;
    if (value < 0 || value > 1 << 30) {
        snprintf(r->err, r->err_size, "%s: attribute '%s' = %lld is out of range", r->path, name,
                 value);
        return -1;
    }
    *out = (int)value;
    return 0;
}

static const char *element_name(enum element e)
{
    switch (e) {
    case EL_I32:
        return "int32";
    case EL_U32:
        return "uint32";
    case EL_U64:
        return "uint64";
    default:
        return "float64";
    }
}

static bool type_is(hid_t type, enum element e)
{
    H5T_class_t cls = H5Tget_class(type);
    size_t size = H5Tget_size(type);
    if (e == EL_F64) return cls == H5T_FLOAT && size == 8;
    if (cls != H5T_INTEGER) return false;
    H5T_sign_t sign = H5Tget_sign(type);
    if (e == EL_I32) return size == 4 && sign == H5T_SGN_2;
    if (e == EL_U32) return size == 4 && sign == H5T_SGN_NONE;
    return size == 8 && sign == H5T_SGN_NONE;
}

static bool link_exists(hid_t file, const char *name)
{
    /* each component in turn: H5Lexists fails on a missing intermediate group */
    char partial[256];
    for (const char *p = name + 1;; p++) {
        if (*p == '/' || *p == '\0') {
            snprintf(partial, sizeof partial, "%.*s", (int)(p - name), name);
            if (H5Lexists(file, partial, H5P_DEFAULT) <= 0) return false;
            if (*p == '\0') return true;
        }
    }
}

/* Reads dataset `id`, checking its element type and that its shape is `want` (ndims
 * entries; an entry of (hsize_t)-1 accepts any extent and reports it back). */
static void *read_dataset(struct reader *r, enum dataset_id id, int ndims, hsize_t want[3])
{
    const char *name = datasets[id].name;
    enum element e = datasets[id].element;
    if (!link_exists(r->file, name)) {
        snprintf(r->err, r->err_size, "%s: dataset %s is missing", r->path, name);
        return NULL;
    }
    hid_t dset = H5Dopen2(r->file, name, H5P_DEFAULT);
    if (dset < 0) {
        h5_fail(r->err, r->err_size, r->path, name, "cannot open dataset");
        return NULL;
    }
    hid_t type = H5Dget_type(dset), space = H5Dget_space(dset);
    void *data = NULL;
    int got_ndims = H5Sget_simple_extent_ndims(space);
    hsize_t got[H5S_MAX_RANK];
    if (got_ndims >= 0 && got_ndims <= H5S_MAX_RANK) H5Sget_simple_extent_dims(space, got, NULL);
    bool shape_ok = got_ndims == ndims;
    for (int d = 0; d < ndims && shape_ok; d++)
        shape_ok = want[d] == (hsize_t)-1 || want[d] == got[d];
    if (!type_is(type, e)) {
        snprintf(r->err, r->err_size, "%s: dataset %s: element type is not %s", r->path, name,
                 element_name(e));
    } else if (!shape_ok) {
        char have[128] = "", expect[128] = "";
        for (int d = 0; d < got_ndims && d < 3; d++)
            snprintf(have + strlen(have), sizeof have - strlen(have), "%s%llu", d ? ", " : "",
                     (unsigned long long)got[d]);
        for (int d = 0; d < ndims; d++) {
            if (want[d] == (hsize_t)-1)
                snprintf(expect + strlen(expect), sizeof expect - strlen(expect), "%s*",
                         d ? ", " : "");
            else
                snprintf(expect + strlen(expect), sizeof expect - strlen(expect), "%s%llu",
                         d ? ", " : "", (unsigned long long)want[d]);
        }
        snprintf(r->err, r->err_size,
                 "%s: dataset %s has shape [%s], expected [%s] from the "
                 "file's attributes and /moe_layers",
                 r->path, name, have, expect);
    } else {
        size_t n = 1;
        for (int d = 0; d < ndims; d++) {
            want[d] = got[d];
            n *= (size_t)got[d];
        }
        size_t element_size = e == EL_I32 || e == EL_U32 ? 4 : 8;
        data = xmalloc(n > 0 ? n * element_size : 1);
        if (n > 0 && H5Dread(dset, memory_type_of(e), H5S_ALL, H5S_ALL, H5P_DEFAULT, data) < 0) {
            h5_fail(r->err, r->err_size, r->path, name, "cannot read dataset");
            free(data);
            data = NULL;
        }
    }
    H5Sclose(space);
    H5Tclose(type);
    H5Dclose(dset);
    return data;
}

static int read_attributes(struct reader *r, struct routing_stats *s)
{
    char format[64];
    long long version = 0, seed = 0, n_sample_tokens = 0, norm = 0;
    if (get_attr_string(r, "format", format, sizeof format) != 0) return -1;
    if (strcmp(format, STATS_FORMAT) != 0) {
        snprintf(r->err, r->err_size, "%s: attribute 'format' is '%s', expected '%s'", r->path,
                 format, STATS_FORMAT);
        return -1;
    }
    if (get_attr_integer(r, "version", &version, NULL) != 0) return -1;
    if (version != STATS_VERSION && version != 1) {
        snprintf(r->err, r->err_size,
                 "%s: statistics format version %lld; this esft reads versions 1 and %d",
                 r->path, version, STATS_VERSION);
        return -1;
    }
    if (version >= 2 &&
        (get_attr_string(r, "dataset_checksum", s->dataset_checksum,
                         sizeof s->dataset_checksum) ||
         get_attr_string(r, "tokenizer", s->tokenizer, sizeof s->tokenizer) ||
         get_attr_string(r, "tokenizer_checksum", s->tokenizer_checksum,
                         sizeof s->tokenizer_checksum)))
        return -1;
    if (get_attr_string(r, "model_path", s->model_path, sizeof s->model_path) ||
        get_attr_string(r, "model_type", s->model_type, sizeof s->model_type) ||
        get_attr_integer(r, "config_hash", NULL, &s->config_hash) ||
        get_attr_int(r, "num_layers", &s->num_layers) ||
        get_attr_int(r, "num_experts", &s->num_experts) || get_attr_int(r, "top_k", &s->top_k) ||
        get_attr_integer(r, "norm_topk_prob", &norm, NULL) ||
        get_attr_string(r, "dataset", s->dataset, sizeof s->dataset) ||
        get_attr_integer(r, "seed", &seed, NULL) ||
        get_attr_integer(r, "n_sample_tokens", &n_sample_tokens, NULL) ||
        get_attr_string(r, "tokens_scored", s->tokens_scored, sizeof s->tokens_scored) ||
        get_attr_int(r, "world", &s->world) || get_attr_int(r, "pp", &s->pp) ||
        get_attr_int(r, "dp", &s->dp) || get_attr_int(r, "ep", &s->ep) ||
        get_attr_text(r, "deck", &s->deck))
        return -1;
    s->norm_topk_prob = norm != 0;
    s->seed = seed;
    s->n_sample_tokens = n_sample_tokens;
    if (s->num_experts < 1 || s->num_layers < 1 || s->top_k < 1 || s->top_k > s->num_experts) {
        snprintf(r->err, r->err_size,
                 "%s: attributes num_layers %d, num_experts %d, top_k %d "
                 "do not describe a MoE model",
                 r->path, s->num_layers, s->num_experts, s->top_k);
        return -1;
    }
    return 0;
}

static int read_datasets(struct reader *r, struct routing_stats *s)
{
    const hsize_t any = (hsize_t)-1;
    hsize_t dims[3] = {any, any, any};
    if (!(s->moe_layers = read_dataset(r, DS_MOE_LAYERS, 1, dims))) return -1;
    hsize_t Lm = dims[0], E = (hsize_t)s->num_experts;
    s->n_moe_layers = (int)Lm;
    if (Lm < 1 || Lm > (hsize_t)s->num_layers) {
        snprintf(r->err, r->err_size,
                 "%s: dataset /moe_layers has %llu entries for %d decoder "
                 "layers",
                 r->path, (unsigned long long)Lm, s->num_layers);
        return -1;
    }
    for (hsize_t l = 0; l < Lm; l++)
        if (s->moe_layers[l] < 0 || s->moe_layers[l] >= s->num_layers ||
            (l > 0 && s->moe_layers[l] <= s->moe_layers[l - 1])) {
            snprintf(r->err, r->err_size,
                     "%s: dataset /moe_layers: entry %llu (%d) is not an "
                     "increasing decoder-layer index below num_layers %d",
                     r->path, (unsigned long long)l, (int)s->moe_layers[l], s->num_layers);
            return -1;
        }
    hsize_t d1[3] = {Lm}, d2[3] = {Lm, E}, d3[3] = {Lm, E, E};
    if (!(s->tokens = read_dataset(r, DS_TOKENS, 1, d1))) return -1;
    if (!(s->count = read_dataset(r, DS_COUNT, 2, d2))) return -1;
    d2[0] = Lm;
    d2[1] = E;
    if (!(s->gate = read_dataset(r, DS_GATE, 2, d2))) return -1;
    if (link_exists(r->file, datasets[DS_COACT].name) &&
        !(s->coact = read_dataset(r, DS_COACT, 3, d3)))
        return -1;

    hsize_t R = (hsize_t)s->dp, r2[3] = {R, Lm}, r3[3] = {R, Lm, E};
    if (!(s->rank_tokens = read_dataset(r, DS_RANK_TOKENS, 2, r2))) return -1;
    if (!(s->rank_count = read_dataset(r, DS_RANK_COUNT, 3, r3))) return -1;
    r3[0] = R;
    r3[1] = Lm;
    r3[2] = E;
    if (!(s->rank_gate = read_dataset(r, DS_RANK_GATE, 3, r3))) return -1;
    s->n_ranks = (int)R;

    hsize_t s1[3] = {any};
    if (!(s->sample_index = read_dataset(r, DS_SAMPLE_INDEX, 1, s1))) return -1;
    hsize_t S = s1[0];
    s->n_samples = S;
    s1[0] = S;
    hsize_t s3[3] = {S, Lm, E};
    if (!(s->sample_tokens = read_dataset(r, DS_SAMPLE_TOKENS, 1, s1))) return -1;
    if (!(s->sample_count = read_dataset(r, DS_SAMPLE_COUNT, 3, s3))) return -1;
    s3[0] = S;
    s3[1] = Lm;
    s3[2] = E;
    if (!(s->sample_gate = read_dataset(r, DS_SAMPLE_GATE, 3, s3))) return -1;
    return 0;
}

int stats_read(const char *path, struct routing_stats *stats, char *err, size_t err_size)
{
    memset(stats, 0, sizeof *stats);
    FILE *probe = fopen(path, "rb");
    if (!probe) {
        snprintf(err, err_size, "%s: cannot open statistics file: %s", path, strerror(errno));
        return -1;
    }
    fclose(probe);
    struct h5_quiet quiet;
    h5_quiet_begin(&quiet);
    int rc = -1;
    if (H5Fis_hdf5(path) <= 0) {
        snprintf(err, err_size, "%s: not an HDF5 file", path);
    } else {
        struct reader r = {.path = path, .err = err, .err_size = err_size};
        r.file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
        if (r.file < 0) {
            h5_fail(err, err_size, path, "/", "cannot open");
        } else {
            rc = read_attributes(&r, stats) == 0 && read_datasets(&r, stats) == 0 ? 0 : -1;
            H5Fclose(r.file);
        }
    }
    h5_quiet_end(&quiet);
    if (rc != 0) stats_free(stats);
    return rc;
}

void stats_free(struct routing_stats *s)
{
    free(s->deck);
    free(s->moe_layers);
    free(s->tokens);
    free(s->count);
    free(s->gate);
    free(s->coact);
    free(s->rank_tokens);
    free(s->rank_count);
    free(s->rank_gate);
    free(s->sample_index);
    free(s->sample_tokens);
    free(s->sample_count);
    free(s->sample_gate);
    s->deck = NULL;
    s->moe_layers = NULL;
    s->tokens = s->count = s->coact = s->rank_tokens = s->rank_count = NULL;
    s->gate = s->rank_gate = s->sample_gate = NULL;
    s->sample_index = s->sample_tokens = NULL;
    s->sample_count = NULL;
}
