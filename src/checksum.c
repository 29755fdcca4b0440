/* checksum: the 64-bit checksum of esft's files (definition in checksum.h). */
#include "checksum.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>

/* words are the bytes read little-endian: memcpy into a uint64_t is that on this host */
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "esft's checksum assumes a little-endian host"
#endif

#define CHECKSUM_START 0x243f6a8885a308d3ULL
#define CHECKSUM_K 0x9e3779b97f4a7c15ULL

static uint64_t mix_word(uint64_t h, uint64_t word)
{
    h = (h ^ word) * CHECKSUM_K;
    return h ^ (h >> 32);
}

void checksum_begin(struct checksum *c)
{
    c->h = CHECKSUM_START;
    c->length = 0;
    c->n_pending = 0;
}

void checksum_add(struct checksum *c, const void *data, size_t n)
{
    const unsigned char *p = data;
    c->length += n;
    if (c->n_pending > 0) { /* finish the word an earlier piece began */
        size_t take = 8 - c->n_pending < n ? 8 - c->n_pending : n;
        memcpy(c->pending + c->n_pending, p, take);
        c->n_pending += (unsigned)take;
        p += take;
        n -= take;
        if (c->n_pending < 8) return;
        uint64_t word;
        memcpy(&word, c->pending, 8);
        c->h = mix_word(c->h, word);
        c->n_pending = 0;
    }
    uint64_t h = c->h;
    for (; n >= 8; p += 8, n -= 8) {
        uint64_t word;
        memcpy(&word, p, 8);
        h = mix_word(h, word);
    }
    c->h = h;
    memcpy(c->pending, p, n);
    c->n_pending = (unsigned)n;
}

uint64_t checksum_end(const struct checksum *c)
{
    uint64_t h = c->h;
    if (c->n_pending > 0) {
        unsigned char last[8] = {0};
        memcpy(last, c->pending, c->n_pending);
        uint64_t word;
        memcpy(&word, last, 8);
        h = mix_word(h, word);
    }
    h ^= c->length;
    h *= CHECKSUM_K;
    return h ^ (h >> 29);
}

uint64_t checksum64(const void *data, size_t n)
{
    struct checksum c;
    checksum_begin(&c);
    checksum_add(&c, data, n);
    return checksum_end(&c);
}

int checksum_file(const char *path, uint64_t *sum, char *err, size_t err_size)
{
    FILE *in = fopen(path, "rb");
    if (!in) {
        snprintf(err, err_size, "%s: cannot open: %s", path, strerror(errno));
        return -1;
    }
    struct checksum c;
    checksum_begin(&c);
    char buf[65536];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, in)) > 0) checksum_add(&c, buf, n);
    int failed = ferror(in);
    fclose(in);
    if (failed) {
        snprintf(err, err_size, "%s: read failed", path);
        return -1;
    }
    *sum = checksum_end(&c);
    return 0;
}
