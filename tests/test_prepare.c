/* test_prepare: the prepare phase end to end under bad_rows: skip (every rank reads the
 * file it wrote back through dataset_open / dataset_read_sample), and the dataset reader
 * on malformed files made with the HDF5 API here. Any rank count; run as an MPI program.
 * The abort path ends the process, so tests/test-prepare.sh covers it through esft.
 *
 * Special ids: 256 BOS  257 EOS  258 <|system|>  259 <|user|>  260 <|assistant|>  261 EOT */
#include <hdf5.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "dataset.h"
#include "dataset_write.h"
#include "deck.h"
#include "log.h"
#include "prepare.h"

enum { BOS = 256, EOS = 257, SYS = 258, USR = 259, AST = 260, EOT = 261 };
#define LONG_TEXT 100000 /* bytes of one row's text: lines of any length are read */

static char dir[256];

static void write_text(const char *path, const char *text)
{
    FILE *f = fopen(path, "wb");
    if (!f || fputs(text, f) < 0 || fclose(f) != 0) {
        fprintf(stderr, "cannot write %s\n", path);
        exit(1);
    }
}

static void write_inputs(const char *a, const char *b)
{
    /* a.jsonl: line -> what it is */
    char *long_row = malloc(LONG_TEXT + 64);
    strcpy(long_row, "{\"text\": \"");
    memset(long_row + strlen(long_row), 'x', LONG_TEXT);
    strcpy(long_row + 10 + LONG_TEXT, "\"}\n");
    size_t size = LONG_TEXT + 4096;
    char *text = malloc(size);
    snprintf(text, size,
             "{\"messages\": [{\"role\": \"system\", \"content\": \"S\"}, {\"role\": \"user\", "
             "\"content\": \"Hi\"}, {\"role\": \"assistant\", \"content\": \"Yo\"}]}\n" /* 1 */
             "\n"                                                           /* 2 blank */
             "{\"prompt\": \"2+2\", \"completion\": \"4\"}\n"               /* 3 */
             "{\"text\": \"x\"\n"                                           /* 4 bad JSON */
             "{\"text\": \"ok\"}\r\n"                                       /* 5 CRLF */
             "[1]\n"                                                        /* 6 not an object */
             "{\"messages\": []}\n"                                         /* 7 empty */
             "{\"messages\": [{\"role\": \"tool\", \"content\": \"x\"}]}\n" /* 8 role */
             "{\"messages\": [{\"role\": \"user\", \"content\": \"only user\"}]}\n" /* 9 */
             "{\"text\": \"\xC3\x28\"}\n" /* 10 bad UTF-8 */
             "   \t \n"                   /* 11 blank */
             "%s",                        /* 12 long */
             long_row);
    write_text(a, text);
    /* b.jsonl, no newline at the end */
    write_text(b, "{\"prompt\": 1, \"completion\": \"x\"}\n{\"text\": \"\xC3\xA9\"}");
    free(text);
    free(long_row);
}

static void set_string(char **field, const char *value)
{
    free(*field);
    *field = xstrdup(value);
}

static void check_sample(const struct dataset *ds, uint64_t i, const uint32_t *ids,
                         const uint8_t *mask, size_t n, const char *what)
{
    CHECK(dataset_sample_length(ds, i) == n, "%s: length %llu, expected %zu", what,
          (unsigned long long)dataset_sample_length(ds, i), n);
    if (dataset_sample_length(ds, i) != n) return;
    uint32_t got_ids[64];
    uint8_t got_mask[64];
    char err[512];
    CHECK(dataset_read_sample(ds, i, got_ids, got_mask, err, sizeof err) == 0, "%s: %s", what, err);
    for (size_t t = 0; t < n; t++) {
        CHECK(got_ids[t] == ids[t], "%s: token %zu is %u, expected %u", what, t, got_ids[t],
              ids[t]);
        CHECK(got_mask[t] == mask[t], "%s: mask %zu is %u, expected %u", what, t, got_mask[t],
              mask[t]);
    }
}

static char *string_attribute(const char *path, const char *name)
{
    hid_t file = H5Fopen(path, H5F_ACC_RDONLY, H5P_DEFAULT);
    hid_t attr = H5Aopen_by_name(file, ".", name, H5P_DEFAULT, H5P_DEFAULT);
    hid_t type = H5Aget_type(attr);
    size_t size = H5Tget_size(type);
    char *value = calloc(size + 1, 1);
    H5Aread(attr, type, value);
    H5Tclose(type);
    H5Aclose(attr);
    H5Fclose(file);
    return value;
}

static void test_phase(int rank)
{
    char a[512], b[512], output[512], tmp[600];
    snprintf(a, sizeof a, "%s/a.jsonl", dir);
    snprintf(b, sizeof b, "%s/b.jsonl", dir);
    snprintf(output, sizeof output, "%s/new/sub/data.h5", dir); /* parents do not exist */
    if (rank == 0) write_inputs(a, b);
    MPI_Barrier(MPI_COMM_WORLD);

    struct deck deck;
    deck_defaults(&deck);
    deck.file = xstrdup("test.yaml");
    set_string(&deck.prepare.inputs[0], a);
    set_string(&deck.prepare.inputs[1], b);
    deck.prepare.n_inputs = 2;
    set_string(&deck.prepare.output, output);
    deck.prepare.bad_rows = BAD_ROWS_SKIP;
    CHECK(phase_prepare(&deck, NULL) == 0, "phase_prepare");
    deck_free(&deck);

    snprintf(tmp, sizeof tmp, "%s.tmp", output);
    CHECK(access(tmp, F_OK) != 0, "%s left behind", tmp);
    struct dataset ds;
    char err[1024];
    if (dataset_open(&ds, output, err, sizeof err) != 0) {
        CHECK(0, "dataset_open: %s", err);
        return;
    }
    /* Kept: a:1, a:3, a:5, a:9 (no loss-bearing token), a:12 (long), b:2. */
    CHECK(ds.n_samples == 6, "n_samples %llu", (unsigned long long)ds.n_samples);
    const uint64_t offsets[] = {0, 13, 23, 27, 40, 40 + LONG_TEXT + 2, 44 + LONG_TEXT + 2};
    for (int i = 0; i <= 6 && ds.n_samples == 6; i++)
        CHECK(ds.offsets[i] == offsets[i], "offsets[%d] = %llu, expected %llu", i,
              (unsigned long long)ds.offsets[i], (unsigned long long)offsets[i]);
    CHECK(ds.n_tokens == offsets[6], "n_tokens %llu", (unsigned long long)ds.n_tokens);
    CHECK(ds.vocab_size == 262, "vocab_size %llu", (unsigned long long)ds.vocab_size);
    CHECK(strcmp(ds.tokenizer, "byte") == 0, "tokenizer %s", ds.tokenizer);

    if (ds.n_samples == 6) {
        const uint32_t ids0[] = {BOS, SYS, 83, EOT, USR, 72, 105, EOT, AST, 89, 111, EOT, EOS};
        const uint8_t mask0[] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0};
        check_sample(&ds, 0, ids0, mask0, 13, "a.jsonl:1 messages");
        const uint32_t ids1[] = {BOS, USR, 50, 43, 50, EOT, AST, 52, EOT, EOS};
        const uint8_t mask1[] = {0, 0, 0, 0, 0, 0, 0, 1, 1, 0};
        check_sample(&ds, 1, ids1, mask1, 10, "a.jsonl:3 prompt/completion");
        const uint32_t ids2[] = {BOS, 111, 107, EOS};
        const uint8_t mask2[] = {0, 1, 1, 1};
        check_sample(&ds, 2, ids2, mask2, 4, "a.jsonl:5 text, CRLF");
        const uint32_t ids3[] = {BOS, USR, 111, 110, 108, 121, 32, 117, 115, 101, 114, EOT, EOS};
        const uint8_t mask3[13] = {0};
        check_sample(&ds, 3, ids3, mask3, 13, "a.jsonl:9 user only");
        const uint32_t ids5[] = {BOS, 195, 169, EOS};
        const uint8_t mask5[] = {0, 1, 1, 1};
        check_sample(&ds, 5, ids5, mask5, 4, "b.jsonl:2 text, no final newline");
        /* The long row: 'x' (120) throughout, tokens only (mask NULL is allowed). */
        uint32_t *ids4 = malloc((LONG_TEXT + 2) * sizeof *ids4);
        CHECK(dataset_read_sample(&ds, 4, ids4, NULL, err, sizeof err) == 0, "%s", err);
        int all_x = ids4[0] == BOS && ids4[LONG_TEXT + 1] == EOS;
        for (int t = 1; t <= LONG_TEXT; t++) all_x = all_x && ids4[t] == 120;
        CHECK(all_x, "the long row's tokens");
        CHECK(dataset_read_sample(&ds, 6, ids4, NULL, err, sizeof err) != 0 &&
                  strstr(err, "sample 6 does not exist") != NULL,
              "sample 6: %s", err);
        free(ids4);
    }
    dataset_close(&ds);

    /* Attributes as h5py would see them. */
    if (rank == 0) {
        hid_t file = H5Fopen(output, H5F_ACC_RDONLY, H5P_DEFAULT);
        uint64_t skipped = 0, version = 0;
        hid_t attr = H5Aopen_by_name(file, ".", "rows_skipped", H5P_DEFAULT, H5P_DEFAULT);
        H5Aread(attr, H5T_NATIVE_UINT64, &skipped);
        H5Aclose(attr);
        attr = H5Aopen_by_name(file, ".", "version", H5P_DEFAULT, H5P_DEFAULT);
        H5Aread(attr, H5T_NATIVE_UINT64, &version);
        H5Aclose(attr);
        H5Fclose(file);
        /* a:4, a:6, a:7, a:8, a:10, b:1 */
        CHECK(skipped == 6, "rows_skipped %llu", (unsigned long long)skipped);
        CHECK(version == 2, "version %llu", (unsigned long long)version);
        char *checksum = string_attribute(output, "tokenizer_checksum");
        CHECK(strcmp(checksum, "") == 0, "the byte tokenizer's identity is '%s'", checksum);
        free(checksum);
        char *format = string_attribute(output, "format");
        CHECK(strcmp(format, "esft-tokens") == 0, "format %s", format);
        free(format);
        char *sources = string_attribute(output, "sources");
        char expected[1100];
        snprintf(expected, sizeof expected, "%s\n%s", a, b);
        CHECK(strcmp(sources, expected) == 0, "sources '%s'", sources);
        free(sources);
    }
}

/* ---- dataset_open on malformed files --------------------------------------------- */

enum fault {
    FAULT_NONE,
    FAULT_NO_LOSS_MASK,
    FAULT_NO_TOKENS,
    FAULT_FORMAT,
    FAULT_VERSION,
    FAULT_NO_CHECKSUM, /* version 2 without the tokenizer's identity */
    FAULT_NO_TOKENIZER,
    FAULT_OFFSETS_DECREASE,
    FAULT_OFFSETS_OVERRUN,
    FAULT_OFFSETS_START,
    FAULT_MASK_LENGTH,
    FAULT_TOKENS_TYPE,
    FAULT_OFFSETS_2D,
    FAULT_N_SAMPLES,
    FAULT_TOKEN_RANGE,
    FAULT_MASK_VALUE,
};

static void attr_string(hid_t file, const char *name, const char *value)
{
    /* variable-length, as h5py writes a Python str */
    hid_t type = H5Tcopy(H5T_C_S1);
    H5Tset_size(type, H5T_VARIABLE);
    hid_t space = H5Screate(H5S_SCALAR);
    hid_t attr = H5Acreate2(file, name, type, space, H5P_DEFAULT, H5P_DEFAULT);
    H5Awrite(attr, type, &value);
    H5Aclose(attr);
    H5Sclose(space);
    H5Tclose(type);
}

static void attr_integer(hid_t file, const char *name, hid_t type, long long value)
{
    hid_t space = H5Screate(H5S_SCALAR);
    hid_t attr = H5Acreate2(file, name, type, space, H5P_DEFAULT, H5P_DEFAULT);
    H5Awrite(attr, H5T_NATIVE_LLONG, &value);
    H5Aclose(attr);
    H5Sclose(space);
}

static void array(hid_t file, const char *name, hid_t type, hid_t memtype, int rank_, hsize_t n,
                  const void *data)
{
    hsize_t dims[2] = {n, 1};
    hid_t space = H5Screate_simple(rank_, dims, NULL);
    hid_t dset = H5Dcreate2(file, name, type, space, H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT);
    H5Dwrite(dset, memtype, H5S_ALL, H5S_ALL, H5P_DEFAULT, data);
    H5Dclose(dset);
    H5Sclose(space);
}

/* Two samples, tokens [5, 6, 7 | 8, 9, 10], written without dataset_write, with one fault. */
static void write_raw(const char *path, enum fault fault)
{
    uint32_t tokens[6] = {5, 6, 7, 8, 9, 10};
    uint8_t mask[6] = {0, 1, 1, 0, 1, 1};
    uint64_t offsets[3] = {0, 3, 6};
    if (fault == FAULT_OFFSETS_DECREASE) offsets[1] = 7, offsets[2] = 6;
    if (fault == FAULT_OFFSETS_OVERRUN) offsets[2] = 7;
    if (fault == FAULT_OFFSETS_START) offsets[0] = 1;
    if (fault == FAULT_TOKEN_RANGE) tokens[4] = 262;
    if (fault == FAULT_MASK_VALUE) mask[4] = 2;
    hid_t file = H5Fcreate(path, H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT);
    if (fault != FAULT_NO_TOKENS)
        array(file, "tokens", fault == FAULT_TOKENS_TYPE ? H5T_STD_I32LE : H5T_STD_U32LE,
              H5T_NATIVE_UINT32, 1, 6, tokens);
    array(file, "offsets", H5T_STD_U64LE, H5T_NATIVE_UINT64, fault == FAULT_OFFSETS_2D ? 2 : 1, 3,
          offsets);
    if (fault != FAULT_NO_LOSS_MASK)
        array(file, "loss_mask", H5T_STD_U8LE, H5T_NATIVE_UINT8, 1,
              fault == FAULT_MASK_LENGTH ? 5 : 6, mask);
    attr_string(file, "format", fault == FAULT_FORMAT ? "other-tokens" : "esft-tokens");
    attr_integer(file, "version", H5T_STD_I64LE,
                 fault == FAULT_VERSION ? 3 : fault == FAULT_NO_CHECKSUM ? 2 : 1);
    if (fault != FAULT_NO_TOKENIZER) attr_string(file, "tokenizer", "byte");
    attr_integer(file, "vocab_size", H5T_STD_U64LE, 262);
    attr_string(file, "sources", "x.jsonl");
    attr_integer(file, "n_samples", H5T_STD_U64LE, fault == FAULT_N_SAMPLES ? 3 : 2);
    attr_integer(file, "n_tokens", H5T_STD_U64LE, 6);
    attr_integer(file, "rows_skipped", H5T_STD_U64LE, 0);
    H5Fclose(file);
}

static void test_malformed(int rank)
{
    char path[512], err[1024];
    snprintf(path, sizeof path, "%s/raw-%d.h5", dir, rank);
    struct dataset ds;

    /* The fault-free file, written by a different writer (variable-length strings, a
     * signed version), reads. */
    write_raw(path, FAULT_NONE);
    CHECK(dataset_open(&ds, path, err, sizeof err) == 0, "raw file: %s", err);
    if (ds.n_samples == 2) {
        uint32_t ids[3];
        uint8_t mask[3];
        CHECK(dataset_read_sample(&ds, 1, ids, mask, err, sizeof err) == 0, "%s", err);
        CHECK(ids[0] == 8 && ids[1] == 9 && ids[2] == 10, "sample 1: %u %u %u", ids[0], ids[1],
              ids[2]);
        CHECK(mask[0] == 0 && mask[1] == 1 && mask[2] == 1, "sample 1 mask");
    }
    dataset_close(&ds);

    struct {
        enum fault fault;
        const char *message;
    } cases[] = {
        {FAULT_NO_LOSS_MASK, "dataset /loss_mask is missing"},
        {FAULT_NO_TOKENS, "dataset /tokens is missing"},
        {FAULT_FORMAT, "attribute 'format' is 'other-tokens', expected 'esft-tokens'"},
        {FAULT_VERSION, "attribute 'version' is 3; this esft reads versions 1 and 2"},
        {FAULT_NO_CHECKSUM, "attribute 'tokenizer_checksum' is missing"},
        {FAULT_NO_TOKENIZER, "attribute 'tokenizer' is missing"},
        {FAULT_OFFSETS_DECREASE, "/offsets[2] = 6 is less than /offsets[1] = 7"},
        {FAULT_OFFSETS_OVERRUN, "/offsets[2] = 7, must equal the length of /tokens (6)"},
        {FAULT_OFFSETS_START, "/offsets[0] is 1; it must be 0"},
        {FAULT_MASK_LENGTH, "/loss_mask has 5 entries, /tokens has 6"},
        {FAULT_TOKENS_TYPE, "dataset /tokens must hold uint32"},
        {FAULT_OFFSETS_2D, "dataset /offsets must be one-dimensional"},
        {FAULT_N_SAMPLES, "attribute 'n_samples' is 3 but /offsets holds 2"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        write_raw(path, cases[i].fault);
        err[0] = '\0';
        CHECK(dataset_open(&ds, path, err, sizeof err) != 0, "fault %d accepted",
              (int)cases[i].fault);
        CHECK(strstr(err, cases[i].message) != NULL, "fault %d: '%s', expected '%s'",
              (int)cases[i].fault, err, cases[i].message);
        CHECK(strncmp(err, path, strlen(path)) == 0, "fault %d: file not named: %s",
              (int)cases[i].fault, err);
        CHECK(ds.offsets == NULL && ds.path == NULL, "fault %d: not cleaned up",
              (int)cases[i].fault);
    }

    /* Values checked when a sample is read. */
    write_raw(path, FAULT_TOKEN_RANGE);
    CHECK(dataset_open(&ds, path, err, sizeof err) == 0, "%s", err);
    uint32_t ids[3];
    uint8_t mask[3];
    CHECK(dataset_read_sample(&ds, 0, ids, mask, err, sizeof err) == 0, "sample 0: %s", err);
    CHECK(dataset_read_sample(&ds, 1, ids, mask, err, sizeof err) != 0 &&
              strstr(err, "token 1 is 262, not below vocab_size 262") != NULL,
          "token range: %s", err);
    dataset_close(&ds);
    write_raw(path, FAULT_MASK_VALUE);
    CHECK(dataset_open(&ds, path, err, sizeof err) == 0, "%s", err);
    CHECK(dataset_read_sample(&ds, 1, ids, mask, err, sizeof err) != 0 &&
              strstr(err, "loss_mask[1] is 2") != NULL,
          "mask value: %s", err);
    dataset_close(&ds);

    /* Not HDF5 at all; not there. */
    write_text(path, "{\"tokens\": [1, 2, 3]}\n");
    CHECK(dataset_open(&ds, path, err, sizeof err) != 0, "a text file accepted");
    CHECK(strstr(err, path) && strstr(err, "not a readable HDF5 file"), "text file: %s", err);
    unlink(path);
    CHECK(dataset_open(&ds, path, err, sizeof err) != 0, "a missing file accepted");
    CHECK(strstr(err, path) && strstr(err, "No such file"), "missing file: %s", err);
}

/* dataset_write: refuses contents a reader would refuse, writes an empty dataset, and
 * the same contents give the same bytes. */
static void test_write(int rank)
{
    char path[512], again[512], err[1024];
    snprintf(path, sizeof path, "%s/w-%d.h5", dir, rank);
    snprintf(again, sizeof again, "%s/w2-%d.h5", dir, rank);
    const char *sources[] = {"one.jsonl"};
    uint32_t tokens[4] = {1, 2, 3, 4};
    uint8_t mask[4] = {1, 1, 0, 0};
    uint64_t bad_offsets[3] = {0, 3, 2};
    struct dataset_contents c = {.tokens = tokens,
                                 .loss_mask = mask,
                                 .n_tokens = 4,
                                 .offsets = bad_offsets,
                                 .n_samples = 2,
                                 .tokenizer = "byte",
                                 .vocab_size = 262,
                                 .sources = sources,
                                 .n_sources = 1};
    CHECK(dataset_write(path, &c, err, sizeof err) != 0, "decreasing offsets written");
    CHECK(access(path, F_OK) != 0, "a refused write left a file");
    uint64_t offsets[3] = {0, 2, 4};
    c.offsets = offsets;
    tokens[3] = 262;
    CHECK(dataset_write(path, &c, err, sizeof err) != 0, "token 262 written");
    tokens[3] = 4;
    CHECK(dataset_write(path, &c, err, sizeof err) == 0, "%s", err);
    CHECK(dataset_write(again, &c, err, sizeof err) == 0, "%s", err);
    FILE *f1 = fopen(path, "rb"), *f2 = fopen(again, "rb");
    int same = f1 && f2;
    while (same) {
        int x = fgetc(f1), y = fgetc(f2);
        if (x != y) same = 0;
        if (x == EOF || y == EOF) break;
    }
    if (f1) fclose(f1);
    if (f2) fclose(f2);
    CHECK(same, "two writes of the same contents differ");

    uint64_t empty_offsets[1] = {0};
    struct dataset_contents empty = {.tokens = tokens,
                                     .loss_mask = mask,
                                     .n_tokens = 0,
                                     .offsets = empty_offsets,
                                     .n_samples = 0,
                                     .tokenizer = "byte",
                                     .vocab_size = 262,
                                     .sources = sources,
                                     .n_sources = 1};
    CHECK(dataset_write(path, &empty, err, sizeof err) == 0, "empty: %s", err);
    struct dataset ds;
    CHECK(dataset_open(&ds, path, err, sizeof err) == 0, "empty: %s", err);
    CHECK(ds.n_samples == 0 && ds.n_tokens == 0, "empty: %llu samples",
          (unsigned long long)ds.n_samples);
    dataset_close(&ds);
    unlink(path);
    unlink(again);
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    int rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    int size = 1;
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    log_init(rank, size);
    if (rank == 0) {
        snprintf(dir, sizeof dir, "%s/esft-prepare.XXXXXX",
                 getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
        if (!mkdtemp(dir)) {
            perror("mkdtemp");
            MPI_Abort(MPI_COMM_WORLD, 1);
        }
    }
    MPI_Bcast(dir, sizeof dir, MPI_CHAR, 0, MPI_COMM_WORLD);

    test_phase(rank);
    test_malformed(rank);
    test_write(rank);

    MPI_Barrier(MPI_COMM_WORLD);
    if (rank == 0) {
        char command[600];
        snprintf(command, sizeof command, "rm -rf '%s'", dir);
        if (system(command) != 0) fprintf(stderr, "could not remove %s\n", dir);
    }
    int failed = check_done("test_prepare");
    int any_failed = 0;
    MPI_Allreduce(&failed, &any_failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    MPI_Finalize();
    return any_failed;
}
