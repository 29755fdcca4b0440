/* gzfile.h: the whole of a gzip (or plain) file in memory, for the tests and benchmarks
 * that read the committed .gz fixtures (tests/tokenizer/). */
#ifndef ESFT_TESTS_GZFILE_H
#define ESFT_TESTS_GZFILE_H

#include <stdlib.h>
#include <zlib.h>

/* The file's bytes, NUL-terminated, with their count in *size; NULL if it cannot be
 * read. The caller frees it. */
static inline char *read_gz(const char *path, size_t *size)
{
    gzFile f = gzopen(path, "rb");
    if (!f) return NULL;
    size_t n = 0, capacity = 1 << 20;
    char *data = malloc(capacity + 1);
    int got = 0;
    while (data && (got = gzread(f, data + n, (unsigned)(capacity - n))) > 0) {
        n += (size_t)got;
        if (n == capacity) {
            capacity *= 2;
            char *grown = realloc(data, capacity + 1);
            if (!grown) free(data);
            data = grown;
        }
    }
    gzclose(f);
    if (data && got < 0) {
        free(data);
        data = NULL;
    }
    if (data) data[n] = 0;
    *size = n;
    return data;
}

#endif
