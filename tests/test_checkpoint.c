/* test_checkpoint: training checkpoints, the exports and the loss curve (src/checkpoint.c,
 * src/checkpoint_write.c, src/export.c, src/history.c).
 * An MPI program: run it under any rank count (run-tests uses 1, 2 and 4).
 *   - a tiny qwen3_moe model built in memory, every tensor on every rank (data
 *     parallelism), with a hand-chosen trainable set (experts 1 of layer 0 and 2 of
 *     layer 1, and the final norm): write -> scramble -> read gives back every trainable
 *     tensor, m, v, the AdamW step and the position bit for bit;
 *     the same state writes the same bytes; frozen tensors are not touched;
 *   - keep = 2 over 4 writes leaves the newest 2; stray temporary files and look-alike
 *     names are not checkpoints, and a write removes the strays;
 *   - refused reads (another method, another config hash, a missing or an extra tensor,
 *     a wrong shape, another version, truncated and foreign files): a message naming
 *     the file (and the tensor), the model left as it was, and the kind (damaged or
 *     foreign);
 *   - checksums: checksum64 against values worked out from its definition (and in any
 *     pieces); the attributes read back (checkpoint_read_info); a version-2 file (the
 *     gathered format of older esft) reads, verified; slices missing or not covering a
 *     tensor's rows: damaged; a tensor, m or v changed
 *     behind the checksum's back, a changed attribute, a missing checksum: damaged,
 *     naming the file and the tensor; a version-1 file (no checksums) still reads,
 *     unverified; under a split layout only the rank holding a damaged tensor finds it,
 *     and checkpoint_agree gives every rank its verdict and message;
 *   - export_adapter (bf16, f16, f32), export_merged (one file and shards, tokenizer
 *     files, refusals), plot_loss_curve (n = 1, constant losses, no data);
 *   - layouts: under every (pp, dp, ep) of the world (on 2 ranks (1,2,1), (1,1,2),
 *     (2,1,1)), with tensors spread over every stage and EP rank trainable, and with all
 *     trainable: a checkpoint written under each layout (and by rank 0 alone, a 1-rank
 *     model over MPI_COMM_SELF) holds the same tensors and checksums (its slices record
 *     which rank wrote which rows), and reads back under every layout and
 *     under 1 rank with every held weight, m and v bit for bit and frozen tensors
 *     untouched; the adapter and merged exports under each layout hold every tensor
 *     with its value; errors of one rank (its optimizer state, a model made for another
 *     communicator) reach every rank, and a read refuses another trainable set on every
 *     rank, even where only another rank holds the difference.
 * Modes for tests/test-checkpoint-kill.sh:
 *   test_checkpoint write-forever DIR   resumes from DIR's newest checkpoint, then writes
 *                                       one (about 12 MB) per step until killed
 *   test_checkpoint verify DIR          every checkpoint under a real name reads back
 *                                       with the values its step implies */
#include <ctype.h>
#include <dirent.h>
#include <errno.h>
#include <hdf5.h>
#include <jansson.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "check.h"
#include "checkpoint.h"
#include "checksum.h"
#include "deck.h"
#include "export.h"
#include "hfconfig.h"
#include "history.h"
#include "layout.h"
#include "log.h"
#include "model.h"
#include "optim.h"
#include "safetensors.h"
#include "tiny_model.h"

static int world_rank, world_size;
static char tmpdir[1024];

static bool contains(const char *text, const char *part)
{
    return strstr(text, part) != NULL;
}

static bool file_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

static long file_size(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 ? (long)st.st_size : -1;
}

/* The whole file in a new allocation (NUL-terminated); NULL when unreadable. */
static char *slurp(const char *path, long *size)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *text = malloc((size_t)n + 1);
    if (fread(text, 1, (size_t)n, f) != (size_t)n) n = 0;
    text[n] = '\0';
    fclose(f);
    if (size) *size = n;
    return text;
}

static void write_text(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "cannot create %s: %s\n", path, strerror(errno));
        return;
    }
    fputs(text, f);
    fclose(f);
}

/* Copies the first `size` bytes of src to dst (a truncated checkpoint). */
static void copy_prefix(const char *src, const char *dst, long size)
{
    long n;
    char *data = slurp(src, &n);
    FILE *f = fopen(dst, "wb");
    if (data && f && size <= n) fwrite(data, 1, (size_t)size, f);
    if (f) fclose(f);
    free(data);
}

/* ---- the models ------------------------------------------------------------------------ */

/* The tiny qwen3_moe of the unit tests (tiny_model.h), bf16. */
static void tiny_config(struct model_config *cfg)
{
    tiny_model_config(HF_QWEN3_MOE, HF_DTYPE_BF16, cfg);
    cfg->hash = 0x0123456789abcdefULL; /* as if read from a config.json */
}

/* Weights that differ per tensor and element, not representable exactly in bf16. */
static void fill_weights(struct model *m)
{
    for (int i = 0; i < m->n_params; i++) {
        struct param *p = &m->params[i];
        if (!p->data) continue;
        for (size_t j = 0; j < p->numel; j++)
            p->data[j] = 0.01f * (float)(i + 1) + 0.0013f * (float)j - 0.3f;
    }
}

/* The tiny model as rank `rank` of grid holds it, with the trainable set named in
 * `names` (NULL: every tensor) and the AdamW state initialised (zero). */
static void tiny_model_on(struct model *m, struct adamw *opt, const struct layout_grid *grid,
                          int rank, const char *const *names, int n_names)
{
    struct model_config cfg;
    tiny_config(&cfg);
    model_create(m, &cfg, grid, layout_coords_of(grid, rank));
    bool *mask = xcalloc((size_t)m->n_params, sizeof *mask);
    for (int k = 0; k < m->n_params && !names; k++) mask[k] = true;
    for (int k = 0; k < n_names && names; k++) {
        struct param *p = model_find_param(m, names[k]);
        if (!p) {
            fprintf(stderr, "no tensor %s in the tiny model\n", names[k]);
            MPI_Abort(MPI_COMM_WORLD, 1);
        }
        mask[p - m->params] = true;
    }
    model_set_trainable(m, mask);
    free(mask);
    struct deck_train train = {
        .lr = 1e-4, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8, .weight_decay = 0.1};
    adamw_init(opt, m, &train);
}

/* A model with the trainable set named in `names`, every tensor on every rank (data
 * parallelism over the world); weights, m, v and the gradients given known values. */
static void tiny_model(struct model *m, struct adamw *opt, const char *const *names, int n_names)
{
    struct layout_grid data_parallel = {.world = world_size, .pp = 1, .dp = world_size, .ep = 1};
    tiny_model_on(m, opt, &data_parallel, world_rank, names, n_names);
    fill_weights(m);
    for (size_t k = 0; k < opt->n; k++) {
        opt->m[k] = 0.5f + 0.001f * (float)k;
        opt->v[k] = 1e-4f * (float)(k + 1);
        m->grad_storage[k] = -0.25f + 0.002f * (float)k;
    }
}

#define EXPERT(l, e, part) "model.layers." #l ".mlp.experts." #e "." part ".weight"
/* Mask A: experts 1 of layer 0 and 2 of layer 1, and the final norm. */
static const char *const mask_a[] = {EXPERT(0, 1, "gate_proj"), EXPERT(0, 1, "up_proj"),
                                     EXPERT(0, 1, "down_proj"), EXPERT(1, 2, "gate_proj"),
                                     EXPERT(1, 2, "up_proj"),   EXPERT(1, 2, "down_proj"),
                                     "model.norm.weight"};
/* Mask B: expert 3 of layer 1 instead of 2 (A's layer-1 expert is missing). */
static const char *const mask_b[] = {EXPERT(0, 1, "gate_proj"), EXPERT(0, 1, "up_proj"),
                                     EXPERT(0, 1, "down_proj"), EXPERT(1, 3, "gate_proj"),
                                     EXPERT(1, 3, "up_proj"),   EXPERT(1, 3, "down_proj"),
                                     "model.norm.weight"};
/* Mask C: A without the final norm (A's checkpoint has a tensor too many). */
static const char *const mask_c[] = {EXPERT(0, 1, "gate_proj"), EXPERT(0, 1, "up_proj"),
                                     EXPERT(0, 1, "down_proj"), EXPERT(1, 2, "gate_proj"),
                                     EXPERT(1, 2, "up_proj"),   EXPERT(1, 2, "down_proj")};
#define COUNT(a) ((int)(sizeof(a) / sizeof((a)[0])))

/* The run record of a checkpoint written with method and deck text (no input hashes). */
#define RUN(method_, deck_) (&(struct checkpoint_run){.method = (method_), .deck_text = (deck_)})

static const struct train_position position_a = {
    .step = 7, .epoch = 1, .block = 3, .rng = {1, 2, 0x8000000000000000ULL, 0xffffffffffffffffULL}};

/* A copy of everything a checkpoint holds, to compare after a read. */
struct snapshot {
    float *weights; /* every weight of the model (storage) */
    float *m, *v;
    long long adam_step;
};

static void take_snapshot(struct snapshot *s, const struct model *m, const struct adamw *opt)
{
    s->weights = xmalloc(m->storage_floats * sizeof(float));
    memcpy(s->weights, m->storage, m->storage_floats * sizeof(float));
    s->m = xmalloc((opt->n ? opt->n : 1) * sizeof(float));
    s->v = xmalloc((opt->n ? opt->n : 1) * sizeof(float));
    memcpy(s->m, opt->m, opt->n * sizeof(float));
    memcpy(s->v, opt->v, opt->n * sizeof(float));
    s->adam_step = opt->step;
}

static void free_snapshot(struct snapshot *s)
{
    free(s->weights);
    free(s->m);
    free(s->v);
}

static bool same_as_snapshot(const struct snapshot *s, const struct model *m,
                             const struct adamw *opt)
{
    return memcmp(s->weights, m->storage, m->storage_floats * sizeof(float)) == 0 &&
           memcmp(s->m, opt->m, opt->n * sizeof(float)) == 0 &&
           memcmp(s->v, opt->v, opt->n * sizeof(float)) == 0 && s->adam_step == opt->step;
}

/* Every value a checkpoint holds changed; frozen weights too (a read must not touch them). */
static void scramble(struct model *m, struct adamw *opt, struct train_position *position)
{
    for (size_t k = 0; k < m->storage_floats; k++) m->storage[k] = -9.0f - (float)k;
    for (size_t k = 0; k < opt->n; k++) opt->m[k] = opt->v[k] = 42.0f;
    opt->step = 99;
    memset(position, 0, sizeof *position);
}

/* ---- round trip ------------------------------------------------------------------------ */

static void test_round_trip(void)
{
    struct model m;
    struct adamw opt;
    tiny_model(&m, &opt, mask_a, COUNT(mask_a));
    opt.step = 7;
    CHECK(opt.n == 2 * 3 * (5 * 8) + 8,
          "mask A: 2 experts x 3 matrices of 5 x 8, + norm 8 = 248, got %zu", opt.n);
    /* a deck past HDF5's 64 KiB compact-attribute limit */
    size_t deck_size = 100000;
    char *deck = xmalloc(deck_size + 1);
    for (size_t k = 0; k < deck_size; k++) deck[k] = k % 64 == 63 ? '\n' : (char)('a' + k % 26);
    deck[deck_size] = '\0';

    char out1[1200], out2[1200], path1[1300], path2[1300], err[2048];
    snprintf(out1, sizeof out1, "%s/run1", tmpdir);
    snprintf(out2, sizeof out2, "%s/run2", tmpdir);
    snprintf(path1, sizeof path1, "%s/checkpoints/step-00000007.h5", out1);
    snprintf(path2, sizeof path2, "%s/checkpoints/step-00000007.h5", out2);
    int rc = checkpoint_write(out1, &m, &opt, &position_a, RUN("esft", deck), 2, MPI_COMM_WORLD,
                              err, sizeof err);
    CHECK(rc == 0, "checkpoint_write: %s", err);
    /* the second copy in a later second of the clock, so that a timestamp would show */
    if (world_rank == 0) {
        time_t first = time(NULL);
        while (time(NULL) == first) nanosleep(&(struct timespec){0, 20000000}, NULL);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    rc = checkpoint_write(out2, &m, &opt, &position_a, RUN("esft", deck), 2, MPI_COMM_WORLD, err,
                          sizeof err);
    CHECK(rc == 0, "checkpoint_write (second directory): %s", err);
    if (world_rank == 0) {
        CHECK(file_exists(path1), "%s not written", path1);
        char tmp[1300];
        snprintf(tmp, sizeof tmp, "%s/checkpoints/.step-00000007.h5.tmp", out1);
        CHECK(!file_exists(tmp), "%s left behind", tmp);
        long n1, n2;
        char *a = slurp(path1, &n1), *b = slurp(path2, &n2);
        CHECK(a && b && n1 == n2 && memcmp(a, b, (size_t)n1) == 0,
              "the same state wrote different bytes (%ld and %ld bytes)", n1, n2);
        /* expected size: 3 x 248 floats of data at least */
        CHECK(n1 > 3 * 248 * 4, "checkpoint of %ld bytes is too small", n1);
        free(a);
        free(b);
        /* the deck attribute, read with HDF5 itself */
        hid_t file = H5Fopen(path1, H5F_ACC_RDONLY, H5P_DEFAULT);
        hid_t attr = H5Aopen(file, "deck", H5P_DEFAULT);
        hid_t type = H5Aget_type(attr);
        size_t n = H5Tget_size(type);
        char *text = xcalloc(n + 1, 1);
        H5Aread(attr, type, text);
        CHECK(n == deck_size && strcmp(text, deck) == 0, "deck attribute of %zu bytes differs", n);
        free(text);
        H5Tclose(type);
        H5Aclose(attr);
        H5Fclose(file);
    }
    MPI_Barrier(MPI_COMM_WORLD);

    struct snapshot want;
    take_snapshot(&want, &m, &opt);
    float frozen_before = m.params[0].data[0];
    float grad_before = m.grad_storage[5];
    struct train_position position;
    scramble(&m, &opt, &position);
    float frozen_scrambled = m.params[0].data[0];
    rc = checkpoint_read(path1, &m, &opt, &position, "esft", err, sizeof err);
    CHECK(rc == 0, "checkpoint_read: %s", err);
    size_t offset = 0;
    for (int i = 0; i < m.n_params; i++) {
        const struct param *p = &m.params[i];
        size_t at = (size_t)(p->data - m.storage);
        if (p->trainable) {
            CHECK(memcmp(p->data, want.weights + at, p->numel * sizeof(float)) == 0,
                  "tensor %s differs after the read", p->name);
            CHECK(memcmp(opt.m + offset, want.m + offset, p->numel * sizeof(float)) == 0,
                  "adam m of %s differs", p->name);
            CHECK(memcmp(opt.v + offset, want.v + offset, p->numel * sizeof(float)) == 0,
                  "adam v of %s differs", p->name);
            offset += p->numel;
        } else {
            CHECK(p->data[0] == -9.0f - (float)at, "frozen tensor %s was overwritten", p->name);
        }
    }
    CHECK(offset == opt.n, "trainable values %zu, state %zu", offset, opt.n);
    CHECK(frozen_scrambled != frozen_before && m.params[0].data[0] == frozen_scrambled,
          "frozen embedding touched");
    CHECK(m.grad_storage[5] == grad_before, "gradients touched");
    CHECK(opt.step == 7, "adam step %lld, want 7", opt.step);
    CHECK(position.step == 7 && position.epoch == 1 && position.block == 3,
          "position %lld/%lld/%lld, want 7/1/3", position.step, position.epoch, position.block);
    CHECK(memcmp(position.rng, position_a.rng, sizeof position.rng) == 0, "rng differs");
    free_snapshot(&want);
    free(deck);

    /* keep < 1 is refused on every rank, nothing written */
    char out3[1200];
    snprintf(out3, sizeof out3, "%s/run3", tmpdir);
    rc = checkpoint_write(out3, &m, &opt, &position_a, RUN("esft", ""), 0, MPI_COMM_WORLD, err,
                          sizeof err);
    CHECK(rc != 0 && contains(err, "keep"), "keep 0 accepted: %s", err);
    CHECK(!file_exists(out3), "keep 0 wrote %s", out3);
    adamw_free(&opt);
    model_free(&m);
}

/* ---- keep and latest ------------------------------------------------------------------ */

/* The names in dir, sorted, joined by spaces. */
static void list_names(const char *dir, char *out, size_t size)
{
    out[0] = '\0';
    struct dirent **entries;
    int n = scandir(dir, &entries, NULL, alphasort);
    for (int i = 0; i < n; i++) {
        if (strcmp(entries[i]->d_name, ".") && strcmp(entries[i]->d_name, ".."))
            snprintf(out + strlen(out), size - strlen(out), "%s%s", out[0] ? " " : "",
                     entries[i]->d_name);
        free(entries[i]);
    }
    if (n >= 0) free(entries);
}

static void test_keep_and_latest(void)
{
    struct model m;
    struct adamw opt;
    tiny_model(&m, &opt, mask_a, COUNT(mask_a));
    char out[1200], dir[1300], path[1400], names[2048], err[2048];
    snprintf(out, sizeof out, "%s/keep", tmpdir);
    snprintf(dir, sizeof dir, "%s/checkpoints", out);

    CHECK(checkpoint_latest(out, path, sizeof path, err, sizeof err) == 0,
          "latest of a directory without checkpoints");
    if (world_rank == 0) {
        mkdir(out, 0755);
        mkdir(dir, 0755);
        /* a crash's leftover: removed by the next successful write */
        snprintf(path, sizeof path, "%s/.step-00000015.h5.tmp", dir);
        write_text(path, "torn");
    }
    MPI_Barrier(MPI_COMM_WORLD);
    for (long long step = 10; step <= 40; step += 10) {
        struct train_position position = position_a;
        position.step = step;
        opt.step = step;
        int rc = checkpoint_write(out, &m, &opt, &position, RUN("esft", "deck"), 2, MPI_COMM_WORLD,
                                  err, sizeof err);
        CHECK(rc == 0, "write step %lld: %s", step, err);
    }
    if (world_rank == 0) {
        list_names(dir, names, sizeof names);
        CHECK(strcmp(names, "step-00000030.h5 step-00000040.h5") == 0,
              "keep 2 of steps 10..40 left: %s", names);
        /* none of these is a checkpoint */
        const char *others[] = {".step-00000099.h5.tmp", "step-00000100.h5.part",
                                "step-123.h5",           "step-000000200.h5",
                                "step-0000005x.h5",      "xstep-00000300.h5"};
        for (int i = 0; i < COUNT(others); i++) {
            snprintf(path, sizeof path, "%s/%s", dir, others[i]);
            write_text(path, "not a checkpoint");
        }
    }
    MPI_Barrier(MPI_COMM_WORLD);
    int found = checkpoint_latest(out, path, sizeof path, err, sizeof err);
    char want[1400];
    snprintf(want, sizeof want, "%s/step-00000040.h5", dir);
    CHECK(found == 1 && strcmp(path, want) == 0, "latest: %d %s, want %s", found, path, want);
    long long *steps = NULL;
    int n_steps = checkpoint_list(out, &steps, err, sizeof err);
    CHECK(n_steps == 2 && steps[0] == 40 && steps[1] == 30, "list: %d checkpoints, newest %lld",
          n_steps, n_steps > 0 ? steps[0] : -1);
    free(steps);
    CHECK(checkpoint_list(tmpdir, &steps, err, sizeof err) == 0 && steps == NULL,
          "list of a directory without checkpoints");
    /* a step past 8 digits is still a checkpoint, and the newest */
    MPI_Barrier(MPI_COMM_WORLD);
    if (world_rank == 0) {
        snprintf(path, sizeof path, "%s/step-123456789.h5", dir);
        write_text(path, "x");
    }
    MPI_Barrier(MPI_COMM_WORLD);
    found = checkpoint_latest(out, path, sizeof path, err, sizeof err);
    CHECK(found == 1 && contains(path, "/step-123456789.h5"), "latest with 9 digits: %s", path);
    MPI_Barrier(MPI_COMM_WORLD);
    if (world_rank == 0) remove(path);
    /* a write deletes the stray temporary file and keeps the newest 2 */
    struct train_position position = position_a;
    position.step = 50;
    CHECK(checkpoint_write(out, &m, &opt, &position, RUN("esft", "deck"), 2, MPI_COMM_WORLD, err,
                           sizeof err) == 0,
          "write step 50: %s", err);
    if (world_rank == 0) {
        snprintf(path, sizeof path, "%s/.step-00000099.h5.tmp", dir);
        CHECK(!file_exists(path), "stray %s not deleted", path);
        snprintf(path, sizeof path, "%s/step-00000030.h5", dir);
        CHECK(!file_exists(path), "step 30 kept beyond keep 2");
        snprintf(path, sizeof path, "%s/step-00000100.h5.part", dir);
        CHECK(file_exists(path), "a file that is not esft's was deleted");
    }
    /* an unreadable checkpoint directory: an error, not "none" */
    char bad[1300];
    snprintf(bad, sizeof bad, "%s/file-not-dir", tmpdir);
    if (world_rank == 0) {
        mkdir(bad, 0755);
        snprintf(path, sizeof path, "%s/checkpoints", bad);
        write_text(path, "a file");
    }
    MPI_Barrier(MPI_COMM_WORLD);
    found = checkpoint_latest(bad, path, sizeof path, err, sizeof err);
    CHECK(found == -1 && contains(err, bad), "checkpoints is a file: %d %s", found, err);
    /* rank 0 cannot create the directory: every rank gets the failure and its message */
    err[0] = '\0';
    int rc = checkpoint_write(bad, &m, &opt, &position, RUN("esft", "deck"), 2, MPI_COMM_WORLD, err,
                              sizeof err);
    CHECK(rc == -1 && contains(err, bad) && contains(err, "cannot create directory"),
          "write into an uncreatable directory: %d %s", rc, err);
    adamw_free(&opt);
    model_free(&m);
}

/* ---- refused reads ------------------------------------------------------------------- */

/* checkpoint_read must fail with `status` and every part in err, leaving model and state
 * unchanged. */
static void expect_refused(const char *what, int status, const char *path, struct model *m,
                           struct adamw *opt, const char *method, const char *part1,
                           const char *part2)
{
    struct snapshot before;
    take_snapshot(&before, m, opt);
    struct train_position position = {.step = -5};
    char err[2048] = "";
    int rc = checkpoint_read(path, m, opt, &position, method, err, sizeof err);
    CHECK(rc == status, "%s: status %d, want %d (%s)", what, rc, status, err);
    CHECK(contains(err, path), "%s: message does not name %s: %s", what, path, err);
    CHECK(!part1 || contains(err, part1), "%s: message lacks '%s': %s", what, part1, err);
    CHECK(!part2 || contains(err, part2), "%s: message lacks '%s': %s", what, part2, err);
    CHECK(same_as_snapshot(&before, m, opt) && position.step == -5,
          "%s: model or optimizer changed by a refused read", what);
    free_snapshot(&before);
}

static void test_refused(void)
{
    struct model a, b, c;
    struct adamw opt_a, opt_b, opt_c;
    tiny_model(&a, &opt_a, mask_a, COUNT(mask_a));
    tiny_model(&b, &opt_b, mask_b, COUNT(mask_b));
    tiny_model(&c, &opt_c, mask_c, COUNT(mask_c));
    char good[1300], path[1400], err[2048];
    snprintf(good, sizeof good, "%s/run1/checkpoints/step-00000007.h5", tmpdir);

    expect_refused("another method", CHECKPOINT_FOREIGN, good, &a, &opt_a, "fft", "'esft'",
                   "'fft'");
    a.cfg.hash ^= 1;
    expect_refused("another config hash", CHECKPOINT_FOREIGN, good, &a, &opt_a, "esft",
                   "config hash", NULL);
    a.cfg.hash ^= 1;
    /* B trains layer 1's expert 3, which A's checkpoint lacks */
    expect_refused("missing tensor", CHECKPOINT_FOREIGN, good, &b, &opt_b, "esft",
                   "'model.layers.1.mlp.experts.3.gate_proj.weight'", "missing");
    /* C trains all of A's tensors but the final norm: one tensor too many */
    expect_refused("extra tensor", CHECKPOINT_FOREIGN, good, &c, &opt_c, "esft",
                   "'model.norm.weight'", "not trainable");
    /* B's own checkpoint into A: A's layer-1 expert 2 is missing */
    char out_b[1200];
    snprintf(out_b, sizeof out_b, "%s/run-b", tmpdir);
    CHECK(checkpoint_write(out_b, &b, &opt_b, &position_a, RUN("esft", ""), 1, MPI_COMM_WORLD, err,
                           sizeof err) == 0,
          "write B: %s", err);
    snprintf(path, sizeof path, "%s/checkpoints/step-00000007.h5", out_b);
    expect_refused("missing tensor (B's file)", CHECKPOINT_FOREIGN, path, &a, &opt_a, "esft",
                   "'model.layers.1.mlp.experts.2.gate_proj.weight'", "missing");
    expect_refused("no such file", CHECKPOINT_DAMAGED, "/nonexistent/step-00000001.h5", &a, &opt_a,
                   "esft", NULL, NULL);

    /* damaged copies made by rank 0 */
    char trunc[4][1300], foreign[1300], version[1300], shape[1300], format[1300];
    long size = file_size(good);
    long cuts[4] = {0, 100, size / 2, size - 1};
    for (int k = 0; k < 4; k++)
        snprintf(trunc[k], sizeof trunc[k], "%s/truncated-%d.h5", tmpdir, k);
    snprintf(foreign, sizeof foreign, "%s/foreign.h5", tmpdir);
    snprintf(version, sizeof version, "%s/version4.h5", tmpdir);
    snprintf(shape, sizeof shape, "%s/shape.h5", tmpdir);
    snprintf(format, sizeof format, "%s/format.h5", tmpdir);
    if (world_rank == 0) {
        for (int k = 0; k < 4; k++) copy_prefix(good, trunc[k], cuts[k]);
        write_text(foreign, "PK\003\004 not an HDF5 file at all, but long enough to be read");
        copy_prefix(good, version, size);
        copy_prefix(good, shape, size);
        copy_prefix(good, format, size);
        hid_t file = H5Fopen(version, H5F_ACC_RDWR, H5P_DEFAULT);
        hid_t attr = H5Aopen(file, "version", H5P_DEFAULT);
        int v = 4;
        H5Awrite(attr, H5T_NATIVE_INT, &v);
        H5Aclose(attr);
        H5Fclose(file);
        /* /tensors/model.norm.weight replaced by a [3] dataset */
        file = H5Fopen(shape, H5F_ACC_RDWR, H5P_DEFAULT);
        H5Ldelete(file, "/tensors/model.norm.weight", H5P_DEFAULT);
        hsize_t three = 3;
        hid_t space = H5Screate_simple(1, &three, NULL);
        hid_t dset = H5Dcreate2(file, "/tensors/model.norm.weight", H5T_IEEE_F32LE, space,
                                H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
        float zeros[3] = {0, 0, 0};
        H5Dwrite(dset, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, zeros);
        H5Dclose(dset);
        H5Sclose(space);
        H5Fclose(file);
        /* another program's HDF5 file: no format attribute */
        file = H5Fopen(format, H5F_ACC_RDWR, H5P_DEFAULT);
        H5Adelete(file, "format");
        H5Fclose(file);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    for (int k = 0; k < 4; k++) {
        char what[64];
        snprintf(what, sizeof what, "truncated to %ld bytes", cuts[k]);
        /* an empty file has no HDF5 signature; the others fail HDF5's end-of-file check */
        expect_refused(what, CHECKPOINT_DAMAGED, trunc[k], &a, &opt_a, "esft",
                       k == 0 ? "not an HDF5 file" : "truncated", NULL);
    }
    expect_refused("foreign file", CHECKPOINT_DAMAGED, foreign, &a, &opt_a, "esft",
                   "not an HDF5 file", NULL);
    expect_refused("version 4", CHECKPOINT_FOREIGN, version, &a, &opt_a, "esft", "version 4", NULL);
    expect_refused("wrong shape", CHECKPOINT_FOREIGN, shape, &a, &opt_a, "esft",
                   "'model.norm.weight'", "expected shape [8], got [3]");
    expect_refused("no format attribute", CHECKPOINT_DAMAGED, format, &a, &opt_a, "esft",
                   "'format'", NULL);
    /* the good file still reads after all that */
    struct train_position position;
    CHECK(checkpoint_read(good, &a, &opt_a, &position, "esft", err, sizeof err) == 0,
          "good checkpoint: %s", err);
    adamw_free(&opt_a);
    adamw_free(&opt_b);
    adamw_free(&opt_c);
    model_free(&a);
    model_free(&b);
    model_free(&c);
}

/* ---- checksums ------------------------------------------------------------------------ */

static void test_checksum(void)
{
    /* worked out from checksum.h's definition by a separate implementation */
    static const struct {
        const char *text;
        uint64_t sum;
    } known[] = {{"", 0xf7e27bed97b0321eULL},
                 {"a", 0x8baa873a8bf61041ULL},
                 {"abc", 0x8f1fb3372f0d8200ULL},
                 {"esft checkpoint", 0x3ed013607f5e3af8ULL}};
    for (int k = 0; k < COUNT(known); k++) {
        uint64_t sum = checksum64(known[k].text, strlen(known[k].text));
        CHECK(sum == known[k].sum, "checksum64(\"%s\") = %016llx, want %016llx", known[k].text,
              (unsigned long long)sum, (unsigned long long)known[k].sum);
    }
    unsigned char bytes[100];
    for (int k = 0; k < 100; k++) bytes[k] = (unsigned char)k;
    uint64_t whole = checksum64(bytes, sizeof bytes);
    CHECK(whole == 0x1e350b86ad09b4d0ULL, "checksum64 of bytes 0..99 = %016llx",
          (unsigned long long)whole);
    int differ = 0;
    for (int i = 0; i <= 100; i++)
        for (int j = i; j <= 100; j++) { /* in three pieces, cut anywhere */
            struct checksum c;
            checksum_begin(&c);
            checksum_add(&c, bytes, (size_t)i);
            checksum_add(&c, bytes + i, (size_t)(j - i));
            checksum_add(&c, bytes + j, (size_t)(100 - j));
            differ += checksum_end(&c) != whole;
        }
    CHECK(differ == 0, "%d ways of cutting 100 bytes into 3 pieces change the checksum", differ);
    /* two sign flips in the high halves of two words (which a plain multiply-xor chain
     * would miss) */
    float values[16];
    for (int k = 0; k < 16; k++) values[k] = 0.5f + (float)k;
    uint64_t before = checksum64(values, sizeof values);
    values[1] = -values[1];
    values[3] = -values[3];
    CHECK(checksum64(values, sizeof values) != before, "two sign flips left the checksum");
}

/* Inverts the bits of the first `bytes` bytes of dataset `object`'s values through HDF5
 * itself, leaving its checksum attribute as it was: damage a reader must find. */
static void invert_values(const char *path, const char *object, size_t bytes)
{
    hid_t file = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    hid_t dset = H5Dopen2(file, object, H5P_DEFAULT);
    hid_t space = H5Dget_space(dset);
    size_t n = (size_t)H5Sget_simple_extent_npoints(space);
    float *values = xmalloc(n * sizeof(float));
    herr_t rc = H5Dread(dset, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, values);
    unsigned char *b = (unsigned char *)values;
    for (size_t k = 0; k < bytes && k < n * sizeof(float); k++) b[k] ^= 0xff;
    if (rc >= 0) rc = H5Dwrite(dset, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, values);
    CHECK(rc >= 0 && bytes <= n * sizeof(float), "cannot damage %s in %s", object, path);
    free(values);
    H5Sclose(space);
    H5Dclose(dset);
    H5Fclose(file);
}

/* checkpoint_read of a damaged file into mask A's model: CHECKPOINT_DAMAGED, naming the
 * file and every part. */
static void expect_damaged(const char *what, const char *path, const char *part1, const char *part2)
{
    struct model m;
    struct adamw opt;
    tiny_model(&m, &opt, mask_a, COUNT(mask_a));
    struct train_position position;
    char err[2048] = "";
    int rc = checkpoint_read(path, &m, &opt, &position, "esft", err, sizeof err);
    CHECK(rc == CHECKPOINT_DAMAGED, "%s: status %d, want damaged (%s)", what, rc, err);
    CHECK(contains(err, path), "%s: message does not name %s: %s", what, path, err);
    CHECK(!part1 || contains(err, part1), "%s: message lacks '%s': %s", what, part1, err);
    CHECK(!part2 || contains(err, part2), "%s: message lacks '%s': %s", what, part2, err);
    adamw_free(&opt);
    model_free(&m);
}

/* The root checksum of a version-2 or later file, worked out here from its definition in
 * checkpoint.h (not with the library's code): checksum64 of version (int32), step, epoch,
 * block, rng[4], adam_step, config_hash, data_hash, expert_config_hash, then method and
 * deck with their NULs. */
static uint64_t root_checksum(int32_t version, const struct checkpoint_info *info)
{
    size_t n_deck = strlen(info->deck_text) + 1, n_method = strlen(info->method) + 1;
    size_t n = 4 + 8 * 11 + n_method + n_deck;
    unsigned char *bytes = xmalloc(n), *at = bytes;
    int64_t words[11] = {info->position.step, info->position.epoch, info->position.block};
    uint64_t *u = (uint64_t *)(words + 3);
    for (int k = 0; k < 4; k++) u[k] = info->position.rng[k];
    words[7] = info->adam_step;
    u[5] = info->config_hash;
    u[6] = info->data_hash;
    u[7] = info->expert_config_hash;
    memcpy(at, &version, 4);
    at += 4;
    memcpy(at, words, sizeof words);
    at += sizeof words;
    memcpy(at, info->method, n_method);
    at += n_method;
    memcpy(at, info->deck_text, n_deck);
    uint64_t sum = checksum64(bytes, n);
    free(bytes);
    return sum;
}

/* Rewrites a checkpoint in place as the gathered format (version 2) of older esft wrote
 * it: version 2, no `layout`, no `slices`, its root checksum recomputed. */
static void rewrite_as_version_2(const char *path, const char *const *names, int n_names)
{
    struct checkpoint_info info;
    char err[2048];
    CHECK(checkpoint_read_info(path, &info, err, sizeof err) == 0, "%s", err);
    hid_t file = H5Fopen(path, H5F_ACC_RDWR, H5P_DEFAULT);
    hid_t attr = H5Aopen(file, "version", H5P_DEFAULT);
    int two = 2;
    H5Awrite(attr, H5T_NATIVE_INT, &two);
    H5Aclose(attr);
    H5Adelete(file, "layout");
    uint64_t sum = root_checksum(2, &info);
    attr = H5Aopen(file, "checksum", H5P_DEFAULT);
    H5Awrite(attr, H5T_NATIVE_UINT64, &sum);
    H5Aclose(attr);
    const char *groups[] = {"tensors", "adam_m", "adam_v"};
    for (int g = 0; g < 3; g++)
        for (int k = 0; k < n_names; k++) {
            char object[256];
            snprintf(object, sizeof object, "/%s/%s", groups[g], names[k]);
            H5Adelete_by_name(file, object, "slices", H5P_DEFAULT);
        }
    H5Fclose(file);
    checkpoint_info_free(&info);
}

static void test_damaged(void)
{
    char good[1300], err[2048];
    snprintf(good, sizeof good, "%s/run1/checkpoints/step-00000007.h5", tmpdir);

    /* the attributes, input hashes included, read back whole */
    struct model m;
    struct adamw opt;
    tiny_model(&m, &opt, mask_a, COUNT(mask_a));
    char out[1200], hashed[1300];
    snprintf(out, sizeof out, "%s/hashes", tmpdir);
    snprintf(hashed, sizeof hashed, "%s/checkpoints/step-00000007.h5", out);
    struct checkpoint_run run = {.method = "esft",
                                 .deck_text = "train: {lr: 3e-5}\n",
                                 .data_hash = 0x0123456789abcdefULL,
                                 .expert_config_hash = 0xfedcba9876543210ULL};
    opt.step = 5;
    CHECK(checkpoint_write(out, &m, &opt, &position_a, &run, 1, MPI_COMM_WORLD, err, sizeof err) ==
              0,
          "write with hashes: %s", err);
    struct checkpoint_info info;
    int rc = checkpoint_read_info(hashed, &info, err, sizeof err);
    CHECK(rc == 0 && info.version == 3 && info.verified && info.position.step == 7 &&
              info.position.epoch == 1 && info.position.block == 3 &&
              memcmp(info.position.rng, position_a.rng, sizeof info.position.rng) == 0 &&
              info.adam_step == 5 && info.config_hash == m.cfg.hash &&
              info.data_hash == run.data_hash &&
              info.expert_config_hash == run.expert_config_hash &&
              strcmp(info.method, "esft") == 0 && strcmp(info.deck_text, run.deck_text) == 0,
          "checkpoint_read_info: %d %s", rc, err);
    checkpoint_info_free(&info);

    /* the good file's values, to compare a version-1 read with */
    struct train_position position;
    CHECK(checkpoint_read(good, &m, &opt, &position, "esft", err, sizeof err) == 0, "good: %s",
          err);
    struct snapshot want;
    take_snapshot(&want, &m, &opt);

    char tensor[1300], adam_v[1300], step[1300], deck[1300], unsummed[1300], v1[1300];
    snprintf(tensor, sizeof tensor, "%s/damaged-tensor.h5", tmpdir);
    snprintf(adam_v, sizeof adam_v, "%s/damaged-adam-v.h5", tmpdir);
    snprintf(step, sizeof step, "%s/damaged-step.h5", tmpdir);
    snprintf(deck, sizeof deck, "%s/damaged-deck.h5", tmpdir);
    snprintf(unsummed, sizeof unsummed, "%s/no-checksum.h5", tmpdir);
    snprintf(v1, sizeof v1, "%s/version1.h5", tmpdir);
    long size = file_size(good);
    if (world_rank == 0) {
        const char *copies[] = {tensor, adam_v, step, deck, unsummed, v1};
        for (int k = 0; k < COUNT(copies); k++) copy_prefix(good, copies[k], size);
        /* 64 bytes of an expert's weights, and one value of the norm's v */
        invert_values(tensor, "/tensors/" EXPERT(1, 2, "up_proj"), 64);
        invert_values(adam_v, "/adam_v/model.norm.weight", 4);
        /* the step, and one character of the deck, rewritten in place */
        hid_t file = H5Fopen(step, H5F_ACC_RDWR, H5P_DEFAULT);
        hid_t attr = H5Aopen(file, "step", H5P_DEFAULT);
        long long eight = 8;
        H5Awrite(attr, H5T_NATIVE_LLONG, &eight);
        H5Aclose(attr);
        H5Fclose(file);
        file = H5Fopen(deck, H5F_ACC_RDWR, H5P_DEFAULT);
        attr = H5Aopen(file, "deck", H5P_DEFAULT);
        hid_t type = H5Aget_type(attr);
        char *text = xcalloc(H5Tget_size(type) + 1, 1);
        H5Aread(attr, type, text);
        text[10] = text[10] == 'x' ? 'y' : 'x';
        H5Awrite(attr, type, text);
        free(text);
        H5Tclose(type);
        H5Aclose(attr);
        H5Fclose(file);
        /* a tensor without its checksum */
        file = H5Fopen(unsummed, H5F_ACC_RDWR, H5P_DEFAULT);
        H5Adelete_by_name(file, "/adam_m/" EXPERT(0, 1, "down_proj"), "checksum", H5P_DEFAULT);
        H5Fclose(file);
        /* what esft wrote before checksums: version 1, no checksums, no input hashes */
        file = H5Fopen(v1, H5F_ACC_RDWR, H5P_DEFAULT);
        attr = H5Aopen(file, "version", H5P_DEFAULT);
        int one = 1;
        H5Awrite(attr, H5T_NATIVE_INT, &one);
        H5Aclose(attr);
        const char *root[] = {"checksum", "data_hash", "expert_config_hash"};
        for (int k = 0; k < COUNT(root); k++) H5Adelete(file, root[k]);
        const char *groups[] = {"tensors", "adam_m", "adam_v"};
        for (int g = 0; g < COUNT(groups); g++)
            for (int k = 0; k < COUNT(mask_a); k++) {
                char object[256];
                snprintf(object, sizeof object, "/%s/%s", groups[g], mask_a[k]);
                H5Adelete_by_name(file, object, "checksum", H5P_DEFAULT);
            }
        H5Fclose(file);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    expect_damaged("64 bytes of a tensor inverted", tensor, "'" EXPERT(1, 2, "up_proj") "'",
                   "does not match its checksum");
    expect_damaged("one value of adam_v inverted", adam_v, "'model.norm.weight' in /adam_v",
                   "checksum");
    expect_damaged("no checksum", unsummed, "'" EXPERT(0, 1, "down_proj") "' in /adam_m",
                   "no checksum");
    /* a damaged attribute is found before the model is touched */
    struct model a;
    struct adamw opt_a;
    tiny_model(&a, &opt_a, mask_a, COUNT(mask_a));
    expect_refused("the step rewritten", CHECKPOINT_DAMAGED, step, &a, &opt_a, "esft", "attributes",
                   "checksum");
    expect_refused("the deck rewritten", CHECKPOINT_DAMAGED, deck, &a, &opt_a, "esft", "attributes",
                   "checksum");
    rc = checkpoint_read_info(step, &info, err, sizeof err);
    CHECK(rc == CHECKPOINT_DAMAGED && contains(err, step) && contains(err, "checksum"),
          "checkpoint_read_info of a rewritten step: %d %s", rc, err);
    checkpoint_info_free(&info);

    /* version 1 reads, unverified, with every value */
    rc = checkpoint_read_info(v1, &info, err, sizeof err);
    CHECK(rc == 0 && info.version == 1 && !info.verified && info.data_hash == 0 &&
              info.position.step == 7,
          "checkpoint_read_info of version 1: %d %s", rc, err);
    checkpoint_info_free(&info);
    scramble(&m, &opt, &position);
    rc = checkpoint_read(v1, &m, &opt, &position, "esft", err, sizeof err);
    size_t offset = 0;
    int wrong = 0;
    for (int i = 0; i < m.n_params; i++) {
        const struct param *p = &m.params[i];
        if (!p->trainable) continue;
        size_t at = (size_t)(p->data - m.storage);
        wrong += memcmp(p->data, want.weights + at, p->numel * sizeof(float)) != 0 ||
                 memcmp(opt.m + offset, want.m + offset, p->numel * sizeof(float)) != 0 ||
                 memcmp(opt.v + offset, want.v + offset, p->numel * sizeof(float)) != 0;
        offset += p->numel;
    }
    CHECK(rc == 0 && wrong == 0 && position.step == 7, "version 1: %d, %d tensors differ: %s", rc,
          wrong, err);

    /* the gathered format of older esft (version 2) reads, verified, with every value;
     * version 3's slices are checked: missing or not covering the rows, damaged */
    char v2[1300], no_slices[1300], gap[1300];
    snprintf(v2, sizeof v2, "%s/version2.h5", tmpdir);
    snprintf(no_slices, sizeof no_slices, "%s/no-slices.h5", tmpdir);
    snprintf(gap, sizeof gap, "%s/slices-gap.h5", tmpdir);
    if (world_rank == 0) {
        const char *copies[] = {v2, no_slices, gap};
        for (int k = 0; k < COUNT(copies); k++) copy_prefix(good, copies[k], size);
        rewrite_as_version_2(v2, mask_a, COUNT(mask_a));
        hid_t file = H5Fopen(no_slices, H5F_ACC_RDWR, H5P_DEFAULT);
        H5Adelete_by_name(file, "/adam_v/model.norm.weight", "slices", H5P_DEFAULT);
        H5Fclose(file);
        /* the first writer's rows start at 1: row 0 written by nobody (the attribute
         * made anew: HDF5 1.10 cannot rewrite one in place there) */
        const char *object = "/tensors/" EXPERT(0, 1, "up_proj");
        file = H5Fopen(gap, H5F_ACC_RDWR, H5P_DEFAULT);
        hid_t attr = H5Aopen_by_name(file, object, "slices", H5P_DEFAULT, H5P_DEFAULT);
        hid_t space = H5Aget_space(attr);
        hssize_t n = H5Sget_simple_extent_npoints(space);
        long long *slices = xcalloc((size_t)n, sizeof *slices);
        H5Aread(attr, H5T_NATIVE_LLONG, slices);
        H5Aclose(attr);
        H5Adelete_by_name(file, object, "slices", H5P_DEFAULT);
        slices[1] += 1;
        slices[2] -= 1;
        attr = H5Acreate_by_name(file, object, "slices", H5T_STD_I64LE, space, H5P_DEFAULT,
                                 H5P_DEFAULT, H5P_DEFAULT);
        CHECK(attr >= 0 && H5Awrite(attr, H5T_NATIVE_LLONG, slices) >= 0, "slices rewritten");
        free(slices);
        H5Sclose(space);
        H5Aclose(attr);
        H5Fclose(file);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    rc = checkpoint_read_info(v2, &info, err, sizeof err);
    CHECK(rc == 0 && info.version == 2 && info.verified && info.position.step == 7,
          "checkpoint_read_info of version 2: %d %s", rc, err);
    checkpoint_info_free(&info);
    scramble(&m, &opt, &position);
    rc = checkpoint_read(v2, &m, &opt, &position, "esft", err, sizeof err);
    offset = 0;
    wrong = 0;
    for (int i = 0; i < m.n_params; i++) {
        const struct param *p = &m.params[i];
        if (!p->trainable) continue;
        size_t at = (size_t)(p->data - m.storage);
        wrong += memcmp(p->data, want.weights + at, p->numel * sizeof(float)) != 0 ||
                 memcmp(opt.m + offset, want.m + offset, p->numel * sizeof(float)) != 0 ||
                 memcmp(opt.v + offset, want.v + offset, p->numel * sizeof(float)) != 0;
        offset += p->numel;
    }
    CHECK(rc == 0 && wrong == 0 && position.step == 7, "version 2: %d, %d tensors differ: %s", rc,
          wrong, err);
    expect_damaged("no slices", no_slices, "'model.norm.weight' in /adam_v", "no slices");
    expect_damaged("slices with a gap", gap, "'" EXPERT(0, 1, "up_proj") "' in /tensors",
                   "do not cover");
    free_snapshot(&want);
    adamw_free(&opt_a);
    model_free(&a);
    adamw_free(&opt);
    model_free(&m);
}

/* ---- exports -------------------------------------------------------------------------- */

static void test_export_adapter(void)
{
    struct model m;
    struct adamw opt;
    tiny_model(&m, &opt, mask_a, COUNT(mask_a));
    char dir[1200], path[1300], config[1300], copied[1300], err[2048];
    snprintf(dir, sizeof dir, "%s/adapter/sub", tmpdir);
    snprintf(path, sizeof path, "%s/adapter.safetensors", dir);
    snprintf(config, sizeof config, "%s/expert_config-src.json", tmpdir);
    snprintf(copied, sizeof copied, "%s/expert_config.json", dir);
    const char *config_text =
        "{\"experts\": {\"0\": [1], \"1\": [2]}, \"shared_experts\": false}\n";
    if (world_rank == 0) write_text(config, config_text);
    MPI_Barrier(MPI_COMM_WORLD);
    int rc = export_adapter(dir, &m, config, MPI_COMM_WORLD, err, sizeof err);
    CHECK(rc == 0, "export_adapter: %s", err);
    if (world_rank == 0) {
        struct st_file *f = st_open(path, err, sizeof err);
        CHECK(f != NULL, "st_open: %s", err);
        if (f) {
            CHECK(f->n_tensors == COUNT(mask_a), "adapter has %d tensors, want %d", f->n_tensors,
                  COUNT(mask_a));
            const char *format = st_file_metadata(f, "format");
            CHECK(format && strcmp(format, "pt") == 0, "metadata format: %s",
                  format ? format : "(none)");
            for (int k = 0; k < COUNT(mask_a); k++) {
                const struct param *p = model_find_param(&m, mask_a[k]);
                const struct st_tensor *t = st_file_find(f, mask_a[k]);
                CHECK(t != NULL, "adapter lacks %s", mask_a[k]);
                if (!t) continue;
                CHECK(t->dtype == ST_BF16 && t->rank == p->rank && t->shape[0] == p->shape[0] &&
                          (p->rank == 1 || t->shape[1] == p->shape[1]),
                      "%s: dtype or shape", p->name);
                int wrong = 0;
                for (size_t j = 0; j < p->numel && t->dtype == ST_BF16; j++) {
                    uint16_t got;
                    memcpy(&got, (const char *)t->data + 2 * j, 2);
                    wrong += got != st_f32_to_bf16(p->data[j]);
                }
                CHECK(wrong == 0, "%s: %d bf16 values differ", p->name, wrong);
            }
            st_close(f);
        }
        char *text = slurp(copied, NULL);
        CHECK(text && strcmp(text, config_text) == 0, "expert_config.json not copied");
        free(text);
    }
    /* f32 and f16 bases, no expert config */
    enum hf_dtype dtypes[2] = {HF_DTYPE_F32, HF_DTYPE_F16};
    enum st_dtype want[2] = {ST_F32, ST_F16};
    for (int d = 0; d < 2; d++) {
        m.cfg.dtype = dtypes[d];
        snprintf(dir, sizeof dir, "%s/adapter-%d", tmpdir, d);
        snprintf(path, sizeof path, "%s/adapter.safetensors", dir);
        MPI_Barrier(MPI_COMM_WORLD);
        CHECK(export_adapter(dir, &m, NULL, MPI_COMM_WORLD, err, sizeof err) == 0, "export %d: %s",
              d, err);
        if (world_rank != 0) continue;
        snprintf(copied, sizeof copied, "%s/expert_config.json", dir);
        CHECK(!file_exists(copied), "expert_config.json without a source");
        struct st_file *f = st_open(path, err, sizeof err);
        CHECK(f != NULL, "st_open: %s", err);
        if (!f) continue;
        const struct param *p = model_find_param(&m, "model.norm.weight");
        const struct st_tensor *t = st_file_find(f, p->name);
        int wrong = 0;
        for (size_t j = 0; t && t->dtype == want[d] && j < p->numel; j++) {
            if (want[d] == ST_F32) {
                float got;
                memcpy(&got, (const char *)t->data + 4 * j, 4);
                wrong += memcmp(&got, &p->data[j], 4) != 0;
            } else {
                uint16_t got;
                memcpy(&got, (const char *)t->data + 2 * j, 2);
                wrong += got != st_f32_to_f16(p->data[j]);
            }
        }
        CHECK(t && t->dtype == want[d] && wrong == 0, "%s dtype %d: %d values differ", p->name, d,
              wrong);
        st_close(f);
    }
    adamw_free(&opt);
    model_free(&m);
}

static void test_export_merged(void)
{
    struct model m;
    struct adamw opt;
    tiny_model(&m, &opt, mask_a, COUNT(mask_a));
    char base[1200], dir[1200], path[1300], err[2048];
    snprintf(base, sizeof base, "%s/base", tmpdir);
    snprintf(dir, sizeof dir, "%s/merged", tmpdir);
    const char *copied[] = {"tokenizer.json", "generation_config.json", "merges.txt"};
    if (world_rank == 0) {
        mkdir(base, 0755);
        CHECK(hfconfig_write(base, &m.cfg, err, sizeof err) == 0, "base config: %s", err);
        for (int k = 0; k < COUNT(copied); k++) {
            snprintf(path, sizeof path, "%s/%s", base, copied[k]);
            char text[128];
            snprintf(text, sizeof text, "contents of %s\n", copied[k]);
            write_text(path, text);
        }
    }
    MPI_Barrier(MPI_COMM_WORLD);
    int rc = export_merged(dir, &m, base, 0, MPI_COMM_WORLD, err, sizeof err);
    CHECK(rc == 0, "export_merged: %s", err);
    if (world_rank == 0) {
        struct st_checkpoint *ck = st_checkpoint_open(dir, err, sizeof err);
        CHECK(ck != NULL, "st_checkpoint_open: %s", err);
        if (ck) {
            CHECK(ck->n_tensors == m.n_params && ck->n_files == 1,
                  "%d tensors in %d files, want %d in 1", ck->n_tensors, ck->n_files, m.n_params);
            int wrong = 0;
            for (int i = 0; i < m.n_params; i++) {
                const struct param *p = &m.params[i];
                const struct st_tensor *t = st_find(ck, p->name);
                if (!t || t->dtype != ST_BF16 || t->numel != (int64_t)p->numel) {
                    wrong++;
                    continue;
                }
                for (size_t j = 0; j < p->numel; j++) {
                    uint16_t got;
                    memcpy(&got, (const char *)t->data + 2 * j, 2);
                    wrong += got != st_f32_to_bf16(p->data[j]);
                }
            }
            CHECK(wrong == 0, "merged checkpoint: %d wrong tensors or values", wrong);
            st_checkpoint_close(ck);
        }
        struct model_config cfg;
        CHECK(hfconfig_load(dir, &cfg, err, sizeof err) == 0, "config: %s", err);
        CHECK(cfg.hidden_size == 8 && cfg.num_layers == 2 && cfg.num_heads == 2 &&
                  cfg.num_kv_heads == 1 && cfg.head_dim == 4 && cfg.vocab_size == 11 &&
                  cfg.expert_intermediate_size == 5 && cfg.num_experts == 4 && cfg.top_k == 2 &&
                  cfg.family == HF_QWEN3_MOE && cfg.dtype == HF_DTYPE_BF16,
              "merged config.json sizes differ");
        for (int k = 0; k < COUNT(copied); k++) {
            char from[1300];
            snprintf(from, sizeof from, "%s/%s", base, copied[k]);
            snprintf(path, sizeof path, "%s/%s", dir, copied[k]);
            char *a = slurp(from, NULL), *b = slurp(path, NULL);
            CHECK(a && b && strcmp(a, b) == 0, "%s not copied", copied[k]);
            free(a);
            free(b);
        }
        snprintf(path, sizeof path, "%s/vocab.json", dir);
        CHECK(!file_exists(path), "vocab.json made up");
    }

    /* a base config.json with a quantization_config (fp8, as DeepSeek-V3's): the merged
     * weights are unquantised, so the copy drops that key and keeps everything else in
     * transformers' layout, here the very bytes hfconfig_write wrote before the key */
    char base_q[1200], dir_q[1200];
    snprintf(base_q, sizeof base_q, "%s/base-fp8", tmpdir);
    snprintf(dir_q, sizeof dir_q, "%s/merged-from-fp8", tmpdir);
    char *plain = NULL;
    if (world_rank == 0) {
        mkdir(base_q, 0755);
        CHECK(hfconfig_write(base_q, &m.cfg, err, sizeof err) == 0, "base config: %s", err);
        snprintf(path, sizeof path, "%s/config.json", base_q);
        plain = slurp(path, NULL);
        json_t *config = json_load_file(path, 0, NULL);
        json_object_set_new(config, "quantization_config",
                            json_pack("{s:s, s:s, s:s, s:[i, i]}", "quant_method", "fp8", "fmt",
                                      "e4m3", "activation_scheme", "dynamic", "weight_block_size",
                                      128, 128));
        CHECK(json_dump_file(config, path, JSON_INDENT(2) | JSON_SORT_KEYS) == 0, "%s", path);
        json_decref(config);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    rc = export_merged(dir_q, &m, base_q, 0, MPI_COMM_WORLD, err, sizeof err);
    CHECK(rc == 0, "export_merged from an fp8 base: %s", err);
    if (world_rank == 0) {
        snprintf(path, sizeof path, "%s/config.json", dir_q);
        char *merged = slurp(path, NULL);
        CHECK(plain && merged && strcmp(plain, merged) == 0,
              "config.json of an export from an fp8 base: not the base's without "
              "quantization_config:\n%s",
              merged ? merged : "(none)");
        free(merged);
        free(plain);
    }

    /* refusals (rank 0's, on every rank): an existing checkpoint, the base directory */
    rc = export_merged(dir, &m, base, 0, MPI_COMM_WORLD, err, sizeof err);
    CHECK(rc != 0 && contains(err, dir) && contains(err, "config.json"),
          "export over an existing checkpoint: %s", err);
    char base_alias[1300];
    snprintf(base_alias, sizeof base_alias, "%s/./", base);
    rc = export_merged(base_alias, &m, base, 0, MPI_COMM_WORLD, err, sizeof err);
    CHECK(rc != 0 && contains(err, "base"), "export into the base directory: %s", err);

    /* shards of at most 600 bytes: the largest tensor (11 x 8 bf16 = 176 bytes) fits */
    snprintf(dir, sizeof dir, "%s/merged-sharded", tmpdir);
    rc = export_merged(dir, &m, NULL, 600, MPI_COMM_WORLD, err, sizeof err);
    CHECK(rc == 0, "sharded export: %s", err);
    if (world_rank == 0) {
        snprintf(path, sizeof path, "%s/model.safetensors.index.json", dir);
        CHECK(file_exists(path), "no index for a sharded export");
        struct st_checkpoint *ck = st_checkpoint_open(dir, err, sizeof err);
        CHECK(ck && ck->n_tensors == m.n_params && ck->n_files > 1, "sharded: %s",
              ck ? "wrong counts" : err);
        if (ck) st_checkpoint_close(ck);
        snprintf(path, sizeof path, "%s/tokenizer.json", dir);
        CHECK(!file_exists(path), "tokenizer.json without a base directory");
    }
    /* a model made for another layout than the communicator's */
    struct model other;
    struct layout_grid grid = {.world = 2, .pp = 1, .dp = 1, .ep = 2};
    model_create(&other, &m.cfg, &grid, (struct layout_coords){0, 0, 1});
    snprintf(dir, sizeof dir, "%s/merged-other-layout", tmpdir);
    rc = export_merged(dir, &other, base, 0, MPI_COMM_SELF, err, sizeof err);
    CHECK(rc != 0 && contains(err, "rank 1 of the layout pp 1, dp 1, ep 2") &&
              contains(err, "rank 0 of 1"),
          "export of a model made for another layout: %s", err);
    CHECK(!file_exists(dir), "refused export created %s", dir);
    model_free(&other);
    adamw_free(&opt);
    model_free(&m);
}

/* ---- layouts ---------------------------------------------------------------------------- */

/* The layouts of the tiny model on n ranks: every (pp, ep) that layout_grid_make accepts
 * (pp up to its 2 layers, ep dividing its 4 experts). */
static int tiny_grids(int n, struct layout_grid *grids, int max)
{
    struct layout_model fits = {.num_layers = 2, .num_experts = 4};
    int count = 0;
    for (int pp = 1; pp <= n; pp++)
        for (int ep = 1; ep <= n; ep++) {
            char err[1024];
            struct layout_grid grid;
            if (count < max && layout_grid_make(n, pp, ep, &fits, &grid, err, sizeof err) == 0)
                grids[count++] = grid;
        }
    return count;
}

/* The value of element j of tensor i of the parameter table: part 0 the weights, 1 the
 * AdamW m, 2 v. Distinct per tensor, element and part, the same under every layout, and
 * not representable in bf16 (so a conversion would show). */
static float layout_value(int i, size_t j, int part)
{
    return 0.001f * (float)((i * 131 + (long long)j * 7 + part * 977) % 10007) - 3.0001f;
}

/* The weights, m and v this rank holds, set to layout_value. */
static void fill_layout_values(struct model *m, struct adamw *opt)
{
    size_t offset = 0;
    for (int i = 0; i < m->n_params; i++) {
        struct param *p = &m->params[i];
        if (!p->data) continue;
        for (size_t j = 0; j < p->numel; j++) p->data[j] = layout_value(i, j, 0);
        if (!p->trainable) continue;
        for (size_t j = 0; j < p->numel; j++) {
            opt->m[offset + j] = layout_value(i, j, 1);
            opt->v[offset + j] = layout_value(i, j, 2);
        }
        offset += p->numel;
    }
    opt->step = 11;
}

/* The values a read must replace (and must leave alone in frozen tensors). */
#define FROZEN_MARK (-7.5f)
static void mark_layout_values(struct model *m, struct adamw *opt)
{
    for (size_t k = 0; k < m->storage_floats; k++) m->storage[k] = FROZEN_MARK;
    for (size_t k = 0; k < opt->n; k++) opt->m[k] = opt->v[k] = 42.0f;
    opt->step = 0;
}

/* The values this rank holds that differ from what fill_layout_values wrote, bit for bit:
 * trainable weights, m and v read back, frozen weights still FROZEN_MARK. */
static int wrong_layout_values(const struct model *m, const struct adamw *opt)
{
    int wrong = 0;
    size_t offset = 0;
    for (int i = 0; i < m->n_params; i++) {
        const struct param *p = &m->params[i];
        if (!p->data) continue;
        for (size_t j = 0; j < p->numel; j++) {
            float want = p->trainable ? layout_value(i, j, 0) : FROZEN_MARK;
            wrong += memcmp(&p->data[j], &want, sizeof want) != 0;
        }
        if (!p->trainable) continue;
        for (size_t j = 0; j < p->numel; j++) {
            float want_m = layout_value(i, j, 1), want_v = layout_value(i, j, 2);
            wrong += memcmp(&opt->m[offset + j], &want_m, sizeof want_m) != 0;
            wrong += memcmp(&opt->v[offset + j], &want_v, sizeof want_v) != 0;
        }
        offset += p->numel;
    }
    return wrong + (opt->step != 11);
}

static void grid_name(const struct layout_grid *grid, char *out, size_t size)
{
    snprintf(out, size, "pp%d-dp%d-ep%d", grid->pp, grid->dp, grid->ep);
}

/* Tensors on every stage and EP rank of the layouts: the embedding (first stage), layer
 * 0's router and expert 1, layer 1's query and expert 2 (EP rank 1 under ep 2; the last
 * stage under pp 2), the final norm and lm_head (last stage). */
static const char *const mask_spread[] = {"model.embed_tokens.weight",
                                          "model.layers.0.mlp.gate.weight",
                                          EXPERT(0, 1, "gate_proj"),
                                          EXPERT(0, 1, "up_proj"),
                                          EXPERT(0, 1, "down_proj"),
                                          "model.layers.1.self_attn.q_proj.weight",
                                          EXPERT(1, 2, "gate_proj"),
                                          EXPERT(1, 2, "up_proj"),
                                          EXPERT(1, 2, "down_proj"),
                                          "model.norm.weight",
                                          "lm_head.weight"};
/* mask_spread with layer 1's expert 3 for expert 2: under ep 2, both on EP rank 1 only. */
static const char *const mask_spread_other[] = {"model.embed_tokens.weight",
                                                "model.layers.0.mlp.gate.weight",
                                                EXPERT(0, 1, "gate_proj"),
                                                EXPERT(0, 1, "up_proj"),
                                                EXPERT(0, 1, "down_proj"),
                                                "model.layers.1.self_attn.q_proj.weight",
                                                EXPERT(1, 3, "gate_proj"),
                                                EXPERT(1, 3, "up_proj"),
                                                EXPERT(1, 3, "down_proj"),
                                                "model.norm.weight",
                                                "lm_head.weight"};

/* Reads path under grid (this rank's share) and checks every value it holds. */
static void check_read_under(const char *path, const struct layout_grid *grid, int rank,
                             const char *const *names, int n_names, const char *what)
{
    struct model m;
    struct adamw opt;
    tiny_model_on(&m, &opt, grid, rank, names, n_names);
    mark_layout_values(&m, &opt);
    struct train_position position = {.step = -1};
    char err[2048], reader[64];
    grid_name(grid, reader, sizeof reader);
    int rc = checkpoint_read(path, &m, &opt, &position, "esft", err, sizeof err);
    CHECK(rc == 0, "%s, read under %s on rank %d: %s", what, reader, rank, err);
    int wrong = wrong_layout_values(&m, &opt);
    CHECK(rc == 0 && wrong == 0, "%s, read under %s on rank %d: %d values differ", what, reader,
          rank, wrong);
    CHECK(position.step == position_a.step && position.block == position_a.block &&
              memcmp(position.rng, position_a.rng, sizeof position.rng) == 0,
          "%s, read under %s: position differs", what, reader);
    adamw_free(&opt);
    model_free(&m);
}

/* Every value of an export on rank 0 against layout_value (bf16, the tiny model's dtype):
 * the trainable tensors (adapter) or all (merged), and no other tensor. */
static void check_export(const struct model *table, bool trainable_only,
                         const struct st_tensor *(*find)(const void *, const char *),
                         const void *file, int n_tensors, const char *what)
{
    int n_want = 0, wrong = 0, missing = 0;
    for (int i = 0; i < table->n_params; i++) {
        const struct param *p = &table->params[i];
        if (trainable_only && !p->trainable) continue;
        n_want++;
        const struct st_tensor *t = find(file, p->name);
        if (!t || t->dtype != ST_BF16 || t->rank != p->rank || t->numel != (int64_t)p->numel) {
            missing++;
            continue;
        }
        for (size_t j = 0; j < p->numel; j++) {
            uint16_t got;
            memcpy(&got, (const char *)t->data + 2 * j, 2);
            wrong += got != st_f32_to_bf16(layout_value(i, j, 0));
        }
    }
    CHECK(n_tensors == n_want && missing == 0 && wrong == 0,
          "%s: %d tensors, want %d; %d missing or misshapen, %d values differ", what, n_tensors,
          n_want, missing, wrong);
}

static const struct st_tensor *find_in_file(const void *file, const char *name)
{
    return st_file_find(file, name);
}

static const struct st_tensor *find_in_checkpoint(const void *checkpoint, const char *name)
{
    return st_find(checkpoint, name);
}

/* Writes under every layout of the world and reads under every other (and under one
 * rank, on rank 0); the files are the same bytes whatever the writer's layout. Then the
 * exports under every layout. */
/* Two checkpoints hold the same datasets in /tensors, /adam_m and /adam_v, with the same
 * bytes and the same checksum attributes. */
struct dataset_compare {
    hid_t other;
    int n, differ;
};

static herr_t compare_dataset(hid_t group, const char *name, const H5L_info_t *info, void *data)
{
    (void)info;
    struct dataset_compare *c = data;
    c->n++;
    hid_t a = H5Dopen2(group, name, H5P_DEFAULT), b = H5Dopen2(c->other, name, H5P_DEFAULT);
    hid_t space_a = a >= 0 ? H5Dget_space(a) : -1, space_b = b >= 0 ? H5Dget_space(b) : -1;
    hssize_t na = space_a >= 0 ? H5Sget_simple_extent_npoints(space_a) : -1;
    hssize_t nb = space_b >= 0 ? H5Sget_simple_extent_npoints(space_b) : -2;
    if (space_a >= 0) H5Sclose(space_a);
    if (space_b >= 0) H5Sclose(space_b);
    bool same = na == nb && na >= 0;
    if (same) {
        float *x = xcalloc((size_t)na + 1, sizeof *x), *y = xcalloc((size_t)na + 1, sizeof *y);
        uint64_t sa = 0, sb = 1;
        same = H5Dread(a, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, x) >= 0 &&
               H5Dread(b, H5T_NATIVE_FLOAT, H5S_ALL, H5S_ALL, H5P_DEFAULT, y) >= 0 &&
               memcmp(x, y, (size_t)na * sizeof *x) == 0;
        hid_t attr_a = H5Aopen(a, "checksum", H5P_DEFAULT);
        hid_t attr_b = H5Aopen(b, "checksum", H5P_DEFAULT);
        same = same && attr_a >= 0 && attr_b >= 0 &&
               H5Aread(attr_a, H5T_NATIVE_UINT64, &sa) >= 0 &&
               H5Aread(attr_b, H5T_NATIVE_UINT64, &sb) >= 0 && sa == sb;
        if (attr_a >= 0) H5Aclose(attr_a);
        if (attr_b >= 0) H5Aclose(attr_b);
        free(x);
        free(y);
    }
    c->differ += !same;
    if (a >= 0) H5Dclose(a);
    if (b >= 0) H5Dclose(b);
    return 0;
}

static bool same_tensors(const char *path_a, const char *path_b)
{
    hid_t fa = H5Fopen(path_a, H5F_ACC_RDONLY, H5P_DEFAULT);
    hid_t fb = H5Fopen(path_b, H5F_ACC_RDONLY, H5P_DEFAULT);
    bool same = fa >= 0 && fb >= 0;
    const char *groups[] = {"tensors", "adam_m", "adam_v"};
    for (int g = 0; g < 3 && same; g++) {
        hid_t ga = H5Gopen2(fa, groups[g], H5P_DEFAULT), gb = H5Gopen2(fb, groups[g], H5P_DEFAULT);
        H5G_info_t ia, ib;
        same = ga >= 0 && gb >= 0 && H5Gget_info(ga, &ia) >= 0 && H5Gget_info(gb, &ib) >= 0 &&
               ia.nlinks == ib.nlinks && ia.nlinks > 0;
        struct dataset_compare c = {.other = gb};
        if (same) H5Literate(ga, H5_INDEX_NAME, H5_ITER_INC, NULL, compare_dataset, &c);
        same = same && c.differ == 0 && (hsize_t)c.n == ia.nlinks;
        if (ga >= 0) H5Gclose(ga);
        if (gb >= 0) H5Gclose(gb);
    }
    if (fa >= 0) H5Fclose(fa);
    if (fb >= 0) H5Fclose(fb);
    return same;
}

static void test_layouts_with(const char *const *names, int n_names, const char *label)
{
    struct layout_grid grids[16];
    int n_grids = tiny_grids(world_size, grids, 16);
    CHECK(n_grids >= 1, "no layout of the tiny model on %d ranks", world_size);
    struct layout_grid one = {.world = 1, .pp = 1, .dp = 1, .ep = 1};
    char out[1300], path[1400], first[1400] = "", err[2048], writer[64];
    /* the one-rank model: the parameter table every layout shares */
    struct model whole;
    struct adamw whole_opt;
    tiny_model_on(&whole, &whole_opt, &one, 0, names, n_names);
    for (int w = 0; w <= n_grids; w++) {
        /* w == n_grids: rank 0 alone writes a one-rank model over MPI_COMM_SELF */
        bool alone = w == n_grids;
        const struct layout_grid *grid = alone ? &one : &grids[w];
        if (alone && world_rank != 0) break;
        grid_name(grid, writer, sizeof writer);
        snprintf(out, sizeof out, "%s/layouts-%s-%s%s", tmpdir, label, writer,
                 alone ? "-self" : "");
        snprintf(path, sizeof path, "%s/checkpoints/step-00000007.h5", out);
        struct model m;
        struct adamw opt;
        tiny_model_on(&m, &opt, grid, alone ? 0 : world_rank, names, n_names);
        CHECK(m.n_params == whole.n_params, "%s: %d tensors, the one-rank table %d", writer,
              m.n_params, whole.n_params);
        int same_names = 0;
        for (int i = 0; i < m.n_params && i < whole.n_params; i++)
            same_names += strcmp(m.params[i].name, whole.params[i].name) == 0;
        CHECK(same_names == whole.n_params, "%s: the parameter table differs from one rank's",
              writer);
        fill_layout_values(&m, &opt);
        int rc = checkpoint_write(out, &m, &opt, &position_a, RUN("esft", "deck: layouts\n"), 1,
                                  alone ? MPI_COMM_SELF : MPI_COMM_WORLD, err, sizeof err);
        CHECK(rc == 0, "write under %s: %s", writer, err);
        adamw_free(&opt);
        model_free(&m);
        if (!alone) MPI_Barrier(MPI_COMM_WORLD);
        /* the tensors do not depend on the layout: the first writer's values and
         * checksums (the slices and the root's layout record who wrote what) */
        if (world_rank == 0 && w == 0) snprintf(first, sizeof first, "%s", path);
        if (world_rank == 0 && w > 0)
            CHECK(same_tensors(first, path), "written under %s: not the tensors of %s", writer,
                  first);
        for (int r = 0; r < n_grids && !alone; r++)
            check_read_under(path, &grids[r], world_rank, names, n_names, writer);
        if (world_rank == 0) check_read_under(path, &one, 0, names, n_names, writer);
    }
    MPI_Barrier(MPI_COMM_WORLD);

    /* the exports: rank 0 gets every tensor it lacks from its holder */
    for (int w = 0; w < n_grids; w++) {
        grid_name(&grids[w], writer, sizeof writer);
        struct model m;
        struct adamw opt;
        tiny_model_on(&m, &opt, &grids[w], world_rank, names, n_names);
        fill_layout_values(&m, &opt);
        char adapter[1300], merged[1300], what[256];
        snprintf(adapter, sizeof adapter, "%s/adapter-%s-%s", tmpdir, label, writer);
        snprintf(merged, sizeof merged, "%s/merged-%s-%s", tmpdir, label, writer);
        int rc = export_adapter(adapter, &m, NULL, MPI_COMM_WORLD, err, sizeof err);
        CHECK(rc == 0, "export_adapter under %s: %s", writer, err);
        rc = export_merged(merged, &m, NULL, 0, MPI_COMM_WORLD, err, sizeof err);
        CHECK(rc == 0, "export_merged under %s: %s", writer, err);
        if (world_rank == 0) {
            snprintf(path, sizeof path, "%s/adapter.safetensors", adapter);
            struct st_file *f = st_open(path, err, sizeof err);
            CHECK(f != NULL, "adapter under %s: %s", writer, err);
            snprintf(what, sizeof what, "adapter under %s", writer);
            if (f) check_export(&whole, true, find_in_file, f, f->n_tensors, what);
            if (f) st_close(f);
            struct st_checkpoint *ck = st_checkpoint_open(merged, err, sizeof err);
            CHECK(ck != NULL, "merged under %s: %s", writer, err);
            snprintf(what, sizeof what, "merged under %s", writer);
            if (ck) check_export(&whole, false, find_in_checkpoint, ck, ck->n_tensors, what);
            if (ck) st_checkpoint_close(ck);
        }
        adamw_free(&opt);
        model_free(&m);
        MPI_Barrier(MPI_COMM_WORLD);
    }
    adamw_free(&whole_opt);
    model_free(&whole);
}

/* Refusals under a split layout reach every rank with one message. */
static void test_layout_refusals(void)
{
    struct layout_grid grids[16];
    int n_grids = tiny_grids(world_size, grids, 16);
    /* the layout with the most EP ranks: layer 1's experts 2 and 3 off rank 0 under ep 2 */
    const struct layout_grid *grid = &grids[0];
    for (int g = 1; g < n_grids; g++)
        if (grids[g].ep > grid->ep) grid = &grids[g];
    char out[1300], path[1400], err[2048];
    snprintf(out, sizeof out, "%s/layout-refusals", tmpdir);
    snprintf(path, sizeof path, "%s/checkpoints/step-00000007.h5", out);
    struct model m;
    struct adamw opt;
    tiny_model_on(&m, &opt, grid, world_rank, mask_spread, COUNT(mask_spread));
    fill_layout_values(&m, &opt);

    /* the last rank's optimizer state does not match its tensors: every rank fails */
    size_t n = opt.n;
    if (world_rank == world_size - 1) opt.n = n + 1;
    err[0] = '\0';
    int rc = checkpoint_write(out, &m, &opt, &position_a, RUN("esft", ""), 1, MPI_COMM_WORLD, err,
                              sizeof err);
    CHECK(rc != 0 && contains(err, "optimizer state"), "a bad optimizer state on rank %d: %d %s",
          world_size - 1, rc, err);
    CHECK(!file_exists(path), "a refused write left %s", path);
    opt.n = n;

    /* a model made for another layout than the communicator's */
    rc = checkpoint_write(out, &m, &opt, &position_a, RUN("esft", ""), 1, MPI_COMM_SELF, err,
                          sizeof err);
    if (world_size > 1)
        CHECK(rc != 0 && contains(err, "built for rank") && contains(err, "of 1"),
              "a %d-rank model over MPI_COMM_SELF: %d %s", world_size, rc, err);
    rc = export_adapter(out, &m, NULL, MPI_COMM_SELF, err, sizeof err);
    if (world_size > 1)
        CHECK(rc != 0 && contains(err, "built for rank"), "export_adapter over MPI_COMM_SELF: %s",
              err);
    MPI_Barrier(MPI_COMM_WORLD);

    /* the trainable set is checked whole: rank 0 refuses a checkpoint of another set
     * even where the difference lies in tensors only another rank holds */
    rc = checkpoint_write(out, &m, &opt, &position_a, RUN("esft", ""), 1, MPI_COMM_WORLD, err,
                          sizeof err);
    CHECK(rc == 0, "write under ep %d: %s", grid->ep, err);
    struct model other;
    struct adamw other_opt;
    tiny_model_on(&other, &other_opt, grid, world_rank, mask_spread_other,
                  COUNT(mask_spread_other));
    expect_refused("another set of experts, under a split layout", CHECKPOINT_FOREIGN, path, &other,
                   &other_opt, "esft", "'model.layers.1.mlp.experts.3.gate_proj.weight'",
                   "missing");
    adamw_free(&other_opt);
    model_free(&other);
    tiny_model_on(&other, &other_opt, grid, world_rank, mask_spread, COUNT(mask_spread) - 1);
    expect_refused("one tensor fewer, under a split layout", CHECKPOINT_FOREIGN, path, &other,
                   &other_opt, "esft", "'lm_head.weight'", "not trainable");
    adamw_free(&other_opt);
    model_free(&other);

    /* a damaged tensor only some ranks hold: those ranks find it, and checkpoint_agree
     * gives every rank their verdict and message */
    char damaged[1400];
    snprintf(damaged, sizeof damaged, "%s/damaged-spread.h5", out);
    if (world_rank == 0) {
        copy_prefix(path, damaged, file_size(path));
        invert_values(damaged, "/tensors/" EXPERT(1, 2, "gate_proj"), 64);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    struct train_position position;
    rc = checkpoint_read(damaged, &m, &opt, &position, "esft", err, sizeof err);
    bool holder = model_find_param(&m, EXPERT(1, 2, "gate_proj"))->data != NULL;
    CHECK(rc == (holder ? CHECKPOINT_DAMAGED : 0), "rank %d (%s the tensor): status %d: %s",
          world_rank, holder ? "holding" : "without", rc, err);
    rc = checkpoint_agree(rc, err, sizeof err, MPI_COMM_WORLD);
    CHECK(rc == CHECKPOINT_DAMAGED && contains(err, damaged) &&
              contains(err, "'" EXPERT(1, 2, "gate_proj") "'"),
          "agreed verdict on rank %d: %d %s", world_rank, rc, err);
    /* the lowest failing rank's status and message, its rank named unless it is 0 */
    snprintf(err, sizeof err, "message of rank %d", world_rank);
    rc = checkpoint_agree(world_rank == world_size - 1 ? CHECKPOINT_FOREIGN : 0, err, sizeof err,
                          MPI_COMM_WORLD);
    char want[64];
    if (world_size > 1)
        snprintf(want, sizeof want, "rank %d: message of rank %d", world_size - 1, world_size - 1);
    else
        snprintf(want, sizeof want, "message of rank 0");
    CHECK(rc == CHECKPOINT_FOREIGN && strcmp(err, want) == 0, "agree: %d '%s', want '%s'", rc, err,
          want);
    snprintf(err, sizeof err, "unchanged");
    CHECK(checkpoint_agree(0, err, sizeof err, MPI_COMM_WORLD) == 0 &&
              strcmp(err, "unchanged") == 0,
          "agree with no failure: %s", err);
    adamw_free(&opt);
    model_free(&m);
}

static void test_layouts(void)
{
    test_layouts_with(mask_spread, COUNT(mask_spread), "spread");
    test_layouts_with(NULL, 0, "all");
    MPI_Barrier(MPI_COMM_WORLD);
    test_layout_refusals();
}

/* ---- loss curve ------------------------------------------------------------------------ */

/* A printed NaN or infinity ("nan", "-nan", "inf") as a word of the SVG text. */
static bool has_non_finite(const char *svg)
{
    const char *words[2] = {"nan", "inf"};
    for (int w = 0; w < 2; w++)
        for (const char *at = strstr(svg, words[w]); at; at = strstr(at + 1, words[w])) {
            bool letter_before = at > svg && isalpha((unsigned char)at[-1]);
            bool letter_after = isalpha((unsigned char)at[3]);
            if (!letter_before && !letter_after) return true;
        }
    return false;
}

static void test_plot(void)
{
    char path[1300], err[1024];
    snprintf(path, sizeof path, "%s/loss.svg", tmpdir);
    long long steps[5] = {1, 2, 3, 4, 5}, eval_steps[2] = {2, 4};
    double loss[5] = {4.0, 3.5, 3.25, 3.0, 2.875}, eval_loss[2] = {3.6, 3.1};
    int rc = plot_loss_curve(path, "run <a> & b", steps, loss, 5, eval_steps, eval_loss, 2, err,
                             sizeof err);
    CHECK(rc == 0, "plot: %s", err);
    char *svg = slurp(path, NULL);
    CHECK(svg && (strncmp(svg, "<?xml", 5) == 0 || strncmp(svg, "<svg", 4) == 0),
          "not an SVG file");
    if (svg) {
        CHECK(contains(svg, "<polyline") && contains(svg, "<circle") && contains(svg, "</svg>"),
              "curve, eval points or the end missing");
        CHECK(contains(svg, "run &lt;a&gt; &amp; b"), "title not escaped");
        CHECK(contains(svg, ">step<") && contains(svg, ">loss<"), "axis labels missing");
        CHECK(contains(svg, "evaluation loss") && contains(svg, "training loss"), "legend missing");
        CHECK(!has_non_finite(svg), "non-finite coordinates");
    }
    free(svg);
    char tmp[1400];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    CHECK(!file_exists(tmp), "%s left behind", tmp);

    /* one point; constant losses; nothing at all */
    rc = plot_loss_curve(path, "one", steps, loss, 1, NULL, NULL, 0, err, sizeof err);
    svg = slurp(path, NULL);
    CHECK(rc == 0 && svg && !has_non_finite(svg) && contains(svg, "<circle"), "n = 1: %s",
          rc ? err : "bad file");
    free(svg);
    double flat[5] = {2, 2, 2, 2, 2};
    rc = plot_loss_curve(path, "flat", steps, flat, 5, steps, flat, 1, err, sizeof err);
    svg = slurp(path, NULL);
    CHECK(rc == 0 && svg && !has_non_finite(svg), "constant losses: %s", rc ? err : "bad file");
    free(svg);
    rc = plot_loss_curve(path, "empty", NULL, NULL, 0, NULL, NULL, 0, err, sizeof err);
    svg = slurp(path, NULL);
    CHECK(rc == 0 && svg && contains(svg, "</svg>") && !has_non_finite(svg), "no data: %s",
          rc ? err : "bad file");
    free(svg);
    snprintf(path, sizeof path, "%s/no/such/dir/loss.svg", tmpdir);
    rc = plot_loss_curve(path, "x", steps, loss, 5, NULL, NULL, 0, err, sizeof err);
    CHECK(rc != 0 && contains(err, "no/such/dir"), "unwritable path: %s", err);
}

/* ---- write-forever and verify (tests/test-checkpoint-kill.sh) ------------------------- */

/* Big enough that a write takes a while: about 1 M trainable floats, 12 MB a file. */
static void big_model(struct model *m, struct adamw *opt)
{
    struct model_config cfg;
    char err[512];
    hfconfig_defaults(HF_QWEN3_MOE, &cfg);
    cfg.hidden_size = 64;
    cfg.num_layers = 2;
    cfg.num_heads = 4;
    cfg.num_kv_heads = 2;
    cfg.head_dim = 16;
    cfg.vocab_size = 3000;
    cfg.intermediate_size = 128;
    cfg.expert_intermediate_size = 96;
    cfg.num_experts = 16;
    cfg.top_k = 2;
    if (hfconfig_finish(&cfg, "big", err, sizeof err) != 0) {
        fprintf(stderr, "big config: %s\n", err);
        exit(1);
    }
    cfg.hash = 0x5eedULL;
    struct layout_grid one = {.world = 1, .pp = 1, .dp = 1, .ep = 1};
    model_create(m, &cfg, &one, (struct layout_coords){0, 0, 0});
    bool *mask = xmalloc((size_t)m->n_params * sizeof *mask);
    for (int i = 0; i < m->n_params; i++) mask[i] = true;
    model_set_trainable(m, mask);
    free(mask);
    struct deck_train train = {.lr = 1e-4, .beta1 = 0.9, .beta2 = 0.999, .eps = 1e-8};
    adamw_init(opt, m, &train);
}

/* The value of element j of tensor i in group g (0 weights, 1 m, 2 v) at `step`. */
static float step_value(long long step, int i, size_t j, int g)
{
    return (float)((step * 31 + i * 17 + (long long)j + g * 5) % 100003) * 1e-4f;
}

static void fill_step(struct model *m, struct adamw *opt, long long step)
{
    size_t offset = 0;
    for (int i = 0; i < m->n_params; i++) {
        struct param *p = &m->params[i];
        for (size_t j = 0; j < p->numel; j++) {
            p->data[j] = step_value(step, i, j, 0);
            opt->m[offset + j] = step_value(step, i, j, 1);
            opt->v[offset + j] = step_value(step, i, j, 2);
        }
        offset += p->numel;
    }
    opt->step = step;
}

/* Reads path and checks every value against its step; 0 when it all holds. */
static int verify_file(const char *path, struct model *m, struct adamw *opt)
{
    char err[2048];
    struct train_position position;
    if (checkpoint_read(path, m, opt, &position, "esft", err, sizeof err) != 0) {
        fprintf(stderr, "verify: %s\n", err);
        return -1;
    }
    long long s = position.step;
    int wrong = 0;
    size_t offset = 0;
    for (int i = 0; i < m->n_params; i++) {
        const struct param *p = &m->params[i];
        for (size_t j = 0; j < p->numel; j++) {
            float want[3] = {step_value(s, i, j, 0), step_value(s, i, j, 1),
                             step_value(s, i, j, 2)};
            wrong += memcmp(&p->data[j], &want[0], 4) != 0;
            wrong += memcmp(&opt->m[offset + j], &want[1], 4) != 0;
            wrong += memcmp(&opt->v[offset + j], &want[2], 4) != 0;
        }
        offset += p->numel;
    }
    char name[64];
    snprintf(name, sizeof name, "/step-%08lld.h5", s);
    bool name_matches = contains(path, name);
    if (wrong || opt->step != s || position.epoch != s / 10 || position.block != s % 10 ||
        position.rng[3] != (uint64_t)s + 3 || !name_matches) {
        fprintf(stderr, "verify: %s: step %lld: %d wrong values, adam step %lld, epoch %lld%s\n",
                path, s, wrong, opt->step, position.epoch,
                name_matches ? "" : ", step differs from the name");
        return -1;
    }
    return 0;
}

static int write_forever(const char *out)
{
    struct model m;
    struct adamw opt;
    big_model(&m, &opt);
    char path[1400], err[2048];
    long long step = 1;
    int found = checkpoint_latest(out, path, sizeof path, err, sizeof err);
    if (found < 0) {
        fprintf(stderr, "write-forever: %s\n", err);
        return 1;
    }
    if (found == 1) {
        /* resume: the newest checkpoint must be whole */
        if (verify_file(path, &m, &opt) != 0) return 1;
        step = opt.step + 1;
    }
    /* the pid, for the killer: written whole (tmp + rename) */
    if (world_rank == 0) {
        char pid_path[1300], pid_tmp[1300];
        snprintf(pid_path, sizeof pid_path, "%s/pid", out);
        snprintf(pid_tmp, sizeof pid_tmp, "%s/pid.tmp", out);
        mkdir(out, 0755);
        FILE *f = fopen(pid_tmp, "w");
        if (!f) return 1;
        fprintf(f, "%ld\n", (long)getpid());
        fclose(f);
        rename(pid_tmp, pid_path);
    }
    /* until killed (a minute at most, in case the killer is gone) */
    double start = wall_time();
    for (; wall_time() - start < 60; step++) {
        fill_step(&m, &opt, step);
        struct train_position position = {.step = step, .epoch = step / 10, .block = step % 10};
        for (int k = 0; k < 4; k++) position.rng[k] = (uint64_t)step + (uint64_t)k;
        if (checkpoint_write(out, &m, &opt, &position, RUN("esft", "deck: write-forever\n"), 3,
                             MPI_COMM_WORLD, err, sizeof err) != 0) {
            fprintf(stderr, "write-forever: %s\n", err);
            return 1;
        }
    }
    adamw_free(&opt);
    model_free(&m);
    return 0;
}

static int verify(const char *out)
{
    struct model m;
    struct adamw opt;
    big_model(&m, &opt);
    char path[1600], dir[1300], err[2048];
    int found = checkpoint_latest(out, path, sizeof path, err, sizeof err);
    if (found < 0) {
        fprintf(stderr, "verify: %s\n", err);
        return 1;
    }
    if (found == 0) {
        printf("verify: no checkpoint yet\n");
        return 0;
    }
    int failed = verify_file(path, &m, &opt) != 0;
    long long newest = opt.step;
    /* every file under a real name, not only the newest */
    snprintf(dir, sizeof dir, "%s/checkpoints", out);
    DIR *d = opendir(dir);
    int n = 0, n_tmp = 0;
    struct dirent *e;
    while (d && (e = readdir(d)) != NULL) {
        if (strncmp(e->d_name, "step-", 5) == 0) {
            snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
            failed |= verify_file(path, &m, &opt) != 0;
            n++;
        } else if (e->d_name[0] == '.' && strstr(e->d_name, ".tmp")) {
            n_tmp++;
        }
    }
    if (d) closedir(d);
    printf("verify: %d checkpoints read back whole (newest step %lld), %d temporary files\n", n,
           newest, n_tmp);
    adamw_free(&opt);
    model_free(&m);
    return failed;
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world_size);
    log_init(world_rank, world_size);
    if (argc == 3 && (strcmp(argv[1], "write-forever") == 0 || strcmp(argv[1], "verify") == 0)) {
        int rc = strcmp(argv[1], "verify") == 0 ? verify(argv[2]) : write_forever(argv[2]);
        MPI_Finalize();
        return rc;
    }
    if (argc != 1) {
        if (world_rank == 0)
            fprintf(stderr, "usage: test_checkpoint [write-forever DIR | verify DIR]\n");
        MPI_Finalize();
        return 2;
    }

    if (world_rank == 0) {
        snprintf(tmpdir, sizeof tmpdir, "%s/esft-checkpoint.XXXXXX",
                 getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
        if (!mkdtemp(tmpdir)) tmpdir[0] = '\0';
    }
    MPI_Bcast(tmpdir, sizeof tmpdir, MPI_CHAR, 0, MPI_COMM_WORLD);
    if (!tmpdir[0]) {
        fprintf(stderr, "test_checkpoint: cannot create a temporary directory\n");
        MPI_Abort(MPI_COMM_WORLD, 1);
    }

    test_round_trip();
    MPI_Barrier(MPI_COMM_WORLD);
    test_keep_and_latest();
    MPI_Barrier(MPI_COMM_WORLD);
    test_refused();
    MPI_Barrier(MPI_COMM_WORLD);
    test_checksum();
    test_damaged();
    MPI_Barrier(MPI_COMM_WORLD);
    test_export_adapter();
    MPI_Barrier(MPI_COMM_WORLD);
    test_export_merged();
    MPI_Barrier(MPI_COMM_WORLD);
    test_layouts();
    MPI_Barrier(MPI_COMM_WORLD);
    if (world_rank == 0) test_plot();

    int failed = check_failed_;
    MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    MPI_Barrier(MPI_COMM_WORLD);
    if (world_rank == 0 && failed == 0 && !getenv("ESFT_KEEP_TMP")) {
        char command[1200];
        snprintf(command, sizeof command, "rm -rf '%s'", tmpdir);
        if (system(command) != 0) fprintf(stderr, "could not remove %s\n", tmpdir);
    }
    char name[64];
    snprintf(name, sizeof name, "test_checkpoint (rank %d of %d)", world_rank, world_size);
    int rc = check_done(name);
    MPI_Finalize();
    return failed ? 1 : rc;
}
