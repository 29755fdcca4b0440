/* fixture: what the golden-fixture tests share: walking the fixture folders, and the
 * batch a fixture's expected.safetensors stores (input_ids, position_ids, segment_ids,
 * labels, as transformers saw them) turned into esft's struct batch. Header-only, for
 * the test programs. */
#ifndef ESFT_TESTS_FIXTURE_H
#define ESFT_TESTS_FIXTURE_H

#include <dirent.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "check.h"
#include "hfconfig.h"
#include "log.h"
#include "model.h"
#include "safetensors.h"

/* An int64 tensor of n elements as int32 (a failed check and zeros when it is not so). */
static inline int32_t *fixture_i64(const struct st_file *f, const char *name, size_t n)
{
    const struct st_tensor *t = st_file_find(f, name);
    CHECK(t && t->dtype == ST_I64 && (size_t)t->numel == n, "%s", name);
    int32_t *out = xcalloc(n ? n : 1, sizeof *out);
    for (size_t i = 0; t && t->dtype == ST_I64 && (size_t)t->numel == n && i < n; i++) {
        int64_t v;
        memcpy(&v, (const char *)t->data + 8 * i, 8);
        out[i] = (int32_t)v;
    }
    return out;
}

/* The stored batch: B rows of T tokens, flattened; a sample starts at each row and where
 * segment_ids changes; targets are the next token's label (-100 past a row's end). */
struct fixture_batch {
    int32_t *tokens, *positions, *segments, *labels, *starts, *targets;
    struct batch batch;
};

static inline void fixture_batch_read(const struct st_file *expected, struct fixture_batch *f)
{
    const struct st_tensor *ids = st_file_find(expected, "input_ids");
    CHECK(ids && ids->rank == 2, "input_ids");
    int B = ids ? (int)ids->shape[0] : 0, T = ids ? (int)ids->shape[1] : 0, N = B * T;
    f->tokens = fixture_i64(expected, "input_ids", (size_t)N);
    f->positions = fixture_i64(expected, "position_ids", (size_t)N);
    f->segments = fixture_i64(expected, "segment_ids", (size_t)N);
    f->labels = fixture_i64(expected, "labels", (size_t)N);
    f->starts = xcalloc((size_t)(N ? N : 1), sizeof *f->starts);
    f->targets = xcalloc((size_t)(N ? N : 1), sizeof *f->targets);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            int n = b * T + t;
            f->starts[n] = t == 0 || f->segments[n] != f->segments[n - 1] ? n : f->starts[n - 1];
            f->targets[n] = t + 1 < T ? f->labels[n + 1] : -100;
        }
    f->batch = (struct batch){.N = N, .tokens = f->tokens, .positions = f->positions,
                              .sample_start = f->starts, .targets = f->targets};
}

/* A fixture folder's config.json and expected.safetensors (with its batch read into
 * *batch); NULL, with a failed check, when either cannot be read. */
static inline struct st_file *fixture_open(const char *dir, struct model_config *cfg,
                                           struct fixture_batch *batch)
{
    char err[1024], path[4200];
    if (hfconfig_load(dir, cfg, err, sizeof err) != 0) {
        CHECK(0, "%s", err);
        return NULL;
    }
    snprintf(path, sizeof path, "%s/expected.safetensors", dir);
    struct st_file *expected = st_open(path, err, sizeof err);
    CHECK(expected != NULL, "%s", err);
    if (expected) fixture_batch_read(expected, batch);
    return expected;
}

static inline void fixture_batch_free(struct fixture_batch *f)
{
    free(f->tokens), free(f->positions), free(f->segments), free(f->labels);
    free(f->starts), free(f->targets);
}

/* check(dir, name, context) for every folder under golden that holds the file probe;
 * returns how many. */
static inline int fixture_each(const char *golden, const char *probe,
                               void (*check)(const char *dir, const char *name, void *context),
                               void *context)
{
    DIR *d = opendir(golden);
    CHECK(d != NULL, "cannot open %s", golden);
    int fixtures = 0;
    struct dirent *entry;
    while (d && (entry = readdir(d))) {
        char dir[4096], path[4200];
        struct stat st;
        snprintf(dir, sizeof dir, "%s/%s", golden, entry->d_name);
        snprintf(path, sizeof path, "%s/%s", dir, probe);
        if (entry->d_name[0] == '.' || stat(path, &st) != 0) continue;
        check(dir, entry->d_name, context);
        fixtures++;
    }
    if (d) closedir(d);
    return fixtures;
}

#endif
