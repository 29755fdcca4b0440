/* safetensors_internal: helpers the safetensors reader and writer (safetensors.c) share
 * with the stream writer (st_stream.c); not part of either module's surface. */
#ifndef ESFT_SAFETENSORS_INTERNAL_H
#define ESFT_SAFETENSORS_INTERNAL_H

#include <stddef.h>

/* The message, formatted into err (when err and errsize are not 0); returns -1. */
int st_fail(char *err, size_t errsize, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* "dir/name", malloc'd. */
char *st_join_path(const char *dir, const char *name);

#endif
