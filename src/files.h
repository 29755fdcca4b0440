/* files: small file-system helpers shared by the phases and the log. */
#ifndef ESFT_FILES_H
#define ESFT_FILES_H

/* mkdir -p: creates path and its missing parents. 0, or -1 with errno set. */
int make_directories(const char *path);

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

/* Finishes a file written to the temporary path tmp: checks for write errors, flushes,
 * fsyncs, closes, and renames it to path, so readers see the old file or the whole new
 * one. On any failure tmp is removed. Closes out in every case. 0, or -1 with a message. */
int file_commit(FILE *out, const char *tmp, const char *path, char *err, size_t err_size);

/* dir/name into out; -1 with a message when it does not fit. */
int path_join(char *out, size_t size, const char *dir, const char *name, char *err,
              size_t err_size);
/* fsync of a file or (flags O_RDONLY | O_DIRECTORY) a directory; -1 with errno set. */
int fsync_path(const char *path, int flags);
bool path_exists(const char *path);
/* Whether path names a directory / a regular file (following links). */
bool is_directory(const char *path);
bool is_regular_file(const char *path);
/* The whole of a file as a malloc'd, NUL-terminated string (its length in *length),
 * refusing files above max_bytes. NULL with "PATH: what is wrong" in err. */
char *file_read(const char *path, size_t max_bytes, size_t *length, char *err, size_t err_size);
/* Writes path through path.tmp: `body` fills the open file, then file_commit renames
 * it. 0, or -1 with a message. */
typedef void (*file_body)(FILE *out, const void *context);
int file_write_atomically(const char *path, file_body body, const void *context, char *err,
                          size_t err_size);
/* Copies src to dst through dst.tmp (file_commit). 0, or -1 with a message. */
int copy_file(const char *src, const char *dst, char *err, size_t err_size);

/* Text into an XML or SVG file: & < > " escaped (the pictures of select and train). */
void xml_write_text(FILE *out, const char *s);
/* The opening of an SVG picture on a white background (closed by "</svg>"). */
void svg_begin(FILE *out, int width, int height);
/* The colour of t in [0, 1] on the viridis colour map, as "#rrggbb" (out: 8 bytes). */
void svg_viridis(double t, char out[8]);

#endif
