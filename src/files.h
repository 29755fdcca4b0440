/* files: small file-system helpers shared by the phases and the log. */
#ifndef ESFT_FILES_H
#define ESFT_FILES_H

/* mkdir -p: creates path and its missing parents. 0, or -1 with errno set. */
int make_directories(const char *path);

#include <stddef.h>
#include <stdio.h>

/* Finishes a file written to the temporary path tmp: checks for write errors, flushes,
 * fsyncs, closes, and renames it to path, so readers see the old file or the whole new
 * one. On any failure tmp is removed. Closes out in every case. 0, or -1 with a message. */
int file_commit(FILE *out, const char *tmp, const char *path, char *err, size_t err_size);

#endif
