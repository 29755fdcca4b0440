/* modelpath: see modelpath.h. The cache layout is huggingface_hub's (its "Manage the
 * cache" guide): hub/models--{owner}--{name}/ holding refs/{branch} (a commit hash),
 * snapshots/{commit}/ (the files, as links into blobs/) and blobs/. */
#include "modelpath.h"

#include <ctype.h>
#include <dirent.h>
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "hfconfig.h"
#include "log.h"
#include "model.h"
#include "files.h"
#include "phases.h"

#define MODELPATH_MAX 4096

/* "owner/name" as the Hub spells repository ids: two parts of letters, digits, '.', '_'
 * and '-', each starting with a letter or digit, at most 96 characters. */
static bool looks_like_hub_id(const char *path)
{
    const char *slash = strchr(path, '/');
    if (!slash || strchr(slash + 1, '/')) return false;
    const char *parts[2] = {path, slash + 1};
    size_t lengths[2] = {(size_t)(slash - path), strlen(slash + 1)};
    for (int i = 0; i < 2; i++) {
        if (lengths[i] == 0 || lengths[i] > 96 || !isalnum((unsigned char)parts[i][0]))
            return false;
        for (size_t j = 0; j < lengths[i]; j++) {
            char c = parts[i][j];
            if (!isalnum((unsigned char)c) && c != '.' && c != '_' && c != '-') return false;
        }
    }
    return true;
}

/* The hub cache directory, by huggingface_hub's precedence. */
static void hub_cache(char *out, size_t size)
{
    const char *v;
    if ((v = getenv("HF_HUB_CACHE")) && *v)
        snprintf(out, size, "%s", v);
    else if ((v = getenv("HF_HOME")) && *v)
        snprintf(out, size, "%s/hub", v);
    else if ((v = getenv("XDG_CACHE_HOME")) && *v)
        snprintf(out, size, "%s/huggingface/hub", v);
    else
        snprintf(out, size, "%s/.cache/huggingface/hub", (v = getenv("HOME")) ? v : "");
}

/* The revision refs/main names, when its snapshot is there; "" otherwise. */
static void main_revision(const char *repo, char *revision, size_t size)
{
    char path[MODELPATH_MAX + 64];
    revision[0] = '\0';
    snprintf(path, sizeof path, "%s/refs/main", repo);
    FILE *f = fopen(path, "r");
    if (!f) return;
    char line[256] = "";
    if (!fgets(line, sizeof line, f)) line[0] = '\0';
    fclose(f);
    size_t n = strcspn(line, " \t\r\n");
    line[n] = '\0';
    if (n == 0 || strchr(line, '/') || strcmp(line, ".") == 0 || strcmp(line, "..") == 0) return;
    snprintf(path, sizeof path, "%s/snapshots/%s", repo, line);
    if (is_directory(path)) snprintf(revision, size, "%s", line);
}

/* The only snapshot, else the newest (latest modification; ties to the greater name).
 * Returns how many there are; revision is "" when none. */
static int newest_revision(const char *repo, char *revision, size_t size)
{
    char dir[MODELPATH_MAX + 64], path[2 * MODELPATH_MAX];
    snprintf(dir, sizeof dir, "%s/snapshots", repo);
    revision[0] = '\0';
    DIR *d = opendir(dir);
    if (!d) return 0;
    int count = 0;
    time_t newest = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        struct stat st;
        if (e->d_name[0] == '.') continue;
        snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
        if (stat(path, &st) != 0 || !S_ISDIR(st.st_mode)) continue;
        if (count == 0 || st.st_mtime > newest ||
            (st.st_mtime == newest && strcmp(e->d_name, revision) > 0)) {
            newest = st.st_mtime;
            snprintf(revision, size, "%s", e->d_name);
        }
        count++;
    }
    closedir(d);
    return count;
}

enum modelpath_found modelpath_resolve(const char *path, char *out, size_t out_size, char *note,
                                       size_t note_size)
{
    snprintf(out, out_size, "%s", path);
    note[0] = '\0';
    if (is_directory(path)) return MODELPATH_DIRECTORY;
    if (!looks_like_hub_id(path)) return MODELPATH_ABSENT;

    char cache[MODELPATH_MAX], repo[MODELPATH_MAX + 128], revision[256];
    hub_cache(cache, sizeof cache);
    const char *slash = strchr(path, '/');
    snprintf(repo, sizeof repo, "%s/models--%.*s--%s", cache, (int)(slash - path), path, slash + 1);
    main_revision(repo, revision, sizeof revision);
    char why[64] = "refs/main";
    if (!revision[0]) {
        int count = newest_revision(repo, revision, sizeof revision);
        if (count > 1)
            snprintf(why, sizeof why, "the newest of %d; refs/main names none", count);
        else
            snprintf(why, sizeof why, "its only snapshot");
    }
    if (!revision[0]) {
        snprintf(note, note_size,
                 "model.path '%s' is not a directory, and the Hugging Face cache has no snapshot "
                 "of it (%s); esft reads local checkpoint directories: download one with "
                 "`huggingface-cli download %s --local-dir DIR` (or `hf download %s --local-dir "
                 "DIR`) and set model.path: DIR",
                 path, repo, path, path);
        return MODELPATH_ABSENT;
    }
    snprintf(out, out_size, "%s/snapshots/%s", repo, revision);
    snprintf(note, note_size, "the Hugging Face cache's snapshot %s (%s): %s", revision, why, out);
    return MODELPATH_CACHED;
}

/* What rank 0 found, for every rank. */
struct verdict {
    int status; /* 0 there and good, 1 not there yet, 2 bad */
    int cached; /* path is a hub id's snapshot directory */
    char path[MODELPATH_MAX];
    char message[8192];
};

static void look(const struct deck *deck, bool dry_run, struct verdict *v)
{
    char note[MODELPATH_MAX + 512];
    enum modelpath_found found =
        modelpath_resolve(deck->model.path, v->path, sizeof v->path, note, sizeof note);
    if (found == MODELPATH_ABSENT) {
        v->status = 1;
        snprintf(v->message, sizeof v->message, "%s", note);
        return;
    }
    v->cached = found == MODELPATH_CACHED;
    if (v->cached) log_info("model.path %s: %s", deck->model.path, note);
    char config[MODELPATH_MAX + 32];
    snprintf(config, sizeof config, "%s/config.json", v->path);
    if (access(config, F_OK) != 0) { /* not there yet: main says so when a phase needs it */
        v->status = 1;
        return;
    }
    struct model_config cfg;
    struct layout_grid one = {.world = 1, .pp = 1, .dp = 1, .ep = 1};
    if (hfconfig_load(v->path, &cfg, v->message, sizeof v->message) != 0 ||
        (dry_run && model_check_checkpoint(&cfg, &one, (struct layout_coords){0, 0, 0}, v->path,
                                           v->message, sizeof v->message) != 0))
        v->status = 2;
}

static void prepare(struct deck *deck, bool dry_run, bool reads, char *why, size_t why_size)
{
    why[0] = '\0';
    bool inits = false;
    for (int i = 0; i < deck->n_phases; i++) {
        enum phase p = deck->phases[i];
        inits |= p == PHASE_INIT;
        reads |= p == PHASE_SCORE || p == PHASE_SELECT || p == PHASE_TRAIN || p == PHASE_EVAL;
    }
    if (inits) { /* the same deck on every rank, the same verdict */
        struct model_config cfg;
        char err[4096];
        if (init_config(deck, &cfg, err, sizeof err) != 0) fatal_all(EXIT_INPUT, "%s", err);
        return;
    }
    if (!reads || !deck->model.path || !deck->model.path[0]) return;

    struct verdict *v = xcalloc(1, sizeof *v);
    if (log_rank() == 0) look(deck, dry_run, v);
    check_mpi(MPI_Bcast(v, sizeof *v, MPI_BYTE, 0, MPI_COMM_WORLD));
    if (v->status == 2) fatal_all(EXIT_INPUT, "%s", v->message);
    if (v->cached) {
        free(deck->model.path);
        deck->model.path = xstrdup(v->path);
    }
    if (v->status == 1) snprintf(why, why_size, "%s", v->message);
    free(v);
}

void modelpath_prepare(struct deck *deck, bool dry_run, char *why, size_t why_size)
{
    prepare(deck, dry_run, false, why, why_size);
}

void modelpath_prepare_read(struct deck *deck, char *why, size_t why_size)
{
    prepare(deck, false, true, why, why_size);
}
