/* fuzz.h: what the libFuzzer harnesses of tests/fuzz/ share (see README, "Fuzzing and
 * sanitizers").
 *
 * Some readers take a path, not bytes: a harness writes the input into a file of its
 * own temporary directory (made once per process under $TMPDIR, removed at exit) and
 * hands the reader that path. fuzz_require stops the run (libFuzzer reports a crash with
 * the input) when a reader breaks a promise its header makes. */
#ifndef ESFT_TESTS_FUZZ_H
#define ESFT_TESTS_FUZZ_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define FUZZ_MAX_FILES 8

static char fuzz_dir_[512];
static char fuzz_files_[FUZZ_MAX_FILES][600];
static int fuzz_n_files_;

static void fuzz_cleanup_(void)
{
    for (int i = 0; i < fuzz_n_files_; i++) unlink(fuzz_files_[i]);
    if (fuzz_dir_[0]) rmdir(fuzz_dir_);
}

/* The harness's directory, made on the first call. */
static inline const char *fuzz_directory(void)
{
    if (!fuzz_dir_[0]) {
        const char *tmp = getenv("TMPDIR");
        snprintf(fuzz_dir_, sizeof fuzz_dir_, "%s/esft-fuzz-XXXXXX", tmp && *tmp ? tmp : "/tmp");
        if (!mkdtemp(fuzz_dir_)) {
            perror("fuzz: mkdtemp");
            abort();
        }
        atexit(fuzz_cleanup_);
    }
    return fuzz_dir_;
}

/* The path of `name` in the harness's directory; the file is removed at exit. Call with
 * the same few names over and over (at most FUZZ_MAX_FILES different ones). */
static inline const char *fuzz_path(const char *name)
{
    char path[600];
    snprintf(path, sizeof path, "%s/%s", fuzz_directory(), name);
    for (int i = 0; i < fuzz_n_files_; i++)
        if (strcmp(fuzz_files_[i], path) == 0) return fuzz_files_[i];
    if (fuzz_n_files_ == FUZZ_MAX_FILES) abort();
    memcpy(fuzz_files_[fuzz_n_files_], path, sizeof path);
    return fuzz_files_[fuzz_n_files_++];
}

/* Writes size bytes to fuzz_path(name) and returns that path. */
static inline const char *fuzz_write_file(const char *name, const uint8_t *data, size_t size)
{
    const char *path = fuzz_path(name);
    FILE *f = fopen(path, "wb");
    if (!f || (size && fwrite(data, 1, size, f) != size) || fclose(f) != 0) {
        perror(path);
        abort();
    }
    return path;
}

#define fuzz_require(cond)                                                                         \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "%s:%d: the reader broke its promise: %s\n", __FILE__, __LINE__,       \
                    #cond);                                                                        \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

#endif
