/* checksum: the 64-bit checksum esft stores in and computes over its files (checkpoint
 * tensors and attributes, the training data, the expert configuration), for checkpoint.c
 * and resume.c. Fast enough for gigabytes (one multiply per 8 bytes) and not
 * cryptographic: it finds damage and tells inputs apart, it does not resist forgery.
 *
 * Definition, so that another program can recompute it (K = 0x9e3779b97f4a7c15, the odd
 * 64-bit golden-ratio constant of Knuth's multiplicative hashing; arithmetic mod 2^64):
 *   h = 0x243f6a8885a308d3
 *   for each 8-byte word w of the bytes read little-endian (the last word zero-padded):
 *       h = (h ^ w) * K;  h ^= h >> 32
 *   h ^= the number of bytes;  h *= K;  h ^= h >> 29
 * For a fixed word every step is a bijection of h, so a change confined to one word
 * always changes the checksum; the right shift carries changes in high bits down, where
 * the next multiply spreads them over the whole word. */
#ifndef ESFT_CHECKSUM_H
#define ESFT_CHECKSUM_H

#include <stddef.h>
#include <stdint.h>

/* A checksum computed piece by piece: the result does not depend on how the bytes are
 * cut into pieces. */
struct checksum {
    uint64_t h, length;
    unsigned char pending[8]; /* the bytes of an unfinished word */
    unsigned n_pending;
};

void checksum_begin(struct checksum *c);
void checksum_add(struct checksum *c, const void *data, size_t n);
uint64_t checksum_end(const struct checksum *c);

/* The checksum of n bytes in one call. */
uint64_t checksum64(const void *data, size_t n);

/* checksum64 of a file's bytes, read a slice at a time. 0, or -1 with a message naming
 * the file. */
int checksum_file(const char *path, uint64_t *sum, char *err, size_t err_size);

#endif
