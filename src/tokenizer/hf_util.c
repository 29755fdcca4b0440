/* hf_util: the containers the tokenizer stages share (growing strings, id lists and
 * spans, an arena for the vocabulary's strings, the string and pair hash maps) and the
 * UTF-8 rules (validity, U+FFFD replacement). */
#include <stdbool.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hf_internal.h"

/* Out of memory: nothing sensible is left to do. */
__attribute__((noreturn)) static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("esft: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

void *hf_realloc(void *p, size_t size)
{
    void *q = realloc(p, size ? size : 1);
    if (!q) die("out of memory (tokenizer, %zu bytes)", size);
    return q;
}

void *hf_calloc(size_t count, size_t size)
{
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p) die("out of memory (tokenizer, %zu x %zu bytes)", count, size);
    return p;
}

static void *grow(void *p, size_t *capacity, size_t need, size_t item)
{
    if (need <= *capacity) return p;
    size_t c = *capacity ? *capacity : 16;
    while (c < need) c *= 2;
    void *q = realloc(p, c * item);
    if (!q) die("out of memory (tokenizer, %zu bytes)", c * item);
    *capacity = c;
    return q;
}

void hf_string_append(struct hf_string *s, const char *bytes, size_t n)
{
    s->data = grow(s->data, &s->capacity, s->n + n + 1, 1);
    if (n) memcpy(s->data + s->n, bytes, n);
    s->n += n;
    s->data[s->n] = 0;
}

void hf_string_swap(struct hf_string *a, struct hf_string *b)
{
    struct hf_string t = *a;
    *a = *b;
    *b = t;
}

void hf_string_free(struct hf_string *s)
{
    free(s->data);
    memset(s, 0, sizeof *s);
}

void hf_ids_push(struct hf_ids *ids, uint32_t id)
{
    ids->ids = grow(ids->ids, &ids->capacity, ids->n + 1, sizeof *ids->ids);
    ids->ids[ids->n++] = id;
}

void hf_ids_free(struct hf_ids *ids)
{
    free(ids->ids);
    memset(ids, 0, sizeof *ids);
}

void hf_spans_push(struct hf_spans *s, size_t start, size_t end, int64_t value)
{
    if (s->n + 1 > s->capacity) {
        size_t c = s->capacity;
        s->start = grow(s->start, &c, s->n + 1, sizeof *s->start);
        c = s->capacity;
        s->end = grow(s->end, &c, s->n + 1, sizeof *s->end);
        c = s->capacity;
        s->value = grow(s->value, &c, s->n + 1, sizeof *s->value);
        s->capacity = c;
    }
    s->start[s->n] = start;
    s->end[s->n] = end;
    s->value[s->n] = value;
    s->n++;
}

void hf_spans_free(struct hf_spans *s)
{
    free(s->start);
    free(s->end);
    free(s->value);
    memset(s, 0, sizeof *s);
}

char *hf_arena_copy(struct hf_arena *a, const char *bytes, size_t n)
{
    if (!a->block_size) a->block_size = 1 << 20;
    if (!a->n_blocks || a->used + n + 1 > a->block_size) {
        size_t size = n + 1 > a->block_size ? n + 1 : a->block_size;
        char **blocks = realloc(a->blocks, (a->n_blocks + 1) * sizeof *blocks);
        if (!blocks) die("out of memory (tokenizer strings)");
        a->blocks = blocks;
        a->blocks[a->n_blocks] = malloc(size);
        if (!a->blocks[a->n_blocks]) die("out of memory (tokenizer strings, %zu bytes)", size);
        a->n_blocks++;
        a->used = n + 1 > a->block_size ? a->block_size : 0;
        if (a->used) {
            /* an oversized string fills its own block; the next one starts a new block */
            char *p = a->blocks[a->n_blocks - 1];
            memcpy(p, bytes, n);
            p[n] = 0;
            return p;
        }
    }
    char *p = a->blocks[a->n_blocks - 1] + a->used;
    memcpy(p, bytes, n);
    p[n] = 0;
    a->used += n + 1;
    return p;
}

void hf_arena_free(struct hf_arena *a)
{
    for (size_t i = 0; i < a->n_blocks; i++) free(a->blocks[i]);
    free(a->blocks);
    memset(a, 0, sizeof *a);
}

/* FNV-1a */
static uint64_t hash_bytes(const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)s[i]) * 1099511628211ull;
    return h;
}

static size_t table_size(size_t expected)
{
    size_t size = 64;
    while (size < 2 * expected + 16) size *= 2;
    return size;
}

static void *zeroed(size_t n, size_t item)
{
    void *p = calloc(n, item);
    if (!p) die("out of memory (tokenizer table of %zu entries)", n);
    return p;
}

void hf_string_map_init(struct hf_string_map *m, size_t expected)
{
    size_t size = table_size(expected);
    m->keys = zeroed(size, sizeof *m->keys);
    m->key_length = zeroed(size, sizeof *m->key_length);
    m->value = zeroed(size, sizeof *m->value);
    m->mask = size - 1;
    m->n = 0;
}

static void string_map_rehash(struct hf_string_map *m)
{
    struct hf_string_map old = *m;
    hf_string_map_init(m, 2 * old.n);
    for (size_t i = 0; i <= old.mask; i++)
        if (old.keys[i]) hf_string_map_put(m, old.keys[i], old.key_length[i], old.value[i]);
    hf_string_map_free(&old);
}

void hf_string_map_put(struct hf_string_map *m, const char *key, size_t length, uint32_t value)
{
    if (2 * (m->n + 1) > m->mask + 1) string_map_rehash(m);
    size_t i = hash_bytes(key, length) & m->mask;
    while (m->keys[i]) {
        if (m->key_length[i] == length && !memcmp(m->keys[i], key, length)) {
            m->value[i] = value;
            return;
        }
        i = (i + 1) & m->mask;
    }
    m->keys[i] = key;
    m->key_length[i] = (uint32_t)length;
    m->value[i] = value;
    m->n++;
}

int64_t hf_string_map_get(const struct hf_string_map *m, const char *key, size_t length)
{
    if (!m->keys) return -1;
    size_t i = hash_bytes(key, length) & m->mask;
    while (m->keys[i]) {
        if (m->key_length[i] == length && !memcmp(m->keys[i], key, length)) return m->value[i];
        i = (i + 1) & m->mask;
    }
    return -1;
}

void hf_string_map_free(struct hf_string_map *m)
{
    free(m->keys);
    free(m->key_length);
    free(m->value);
    memset(m, 0, sizeof *m);
}

static const uint64_t NO_PAIR = UINT64_MAX;

static uint64_t hash_pair(uint64_t key)
{
    key ^= key >> 33;
    key *= 0xff51afd7ed558ccdull;
    key ^= key >> 33;
    return key;
}

void hf_pair_map_init(struct hf_pair_map *m, size_t expected)
{
    size_t size = table_size(expected);
    m->keys = malloc(size * sizeof *m->keys);
    if (!m->keys) die("out of memory (merges table)");
    for (size_t i = 0; i < size; i++) m->keys[i] = NO_PAIR;
    m->rank = zeroed(size, sizeof *m->rank);
    m->merged = zeroed(size, sizeof *m->merged);
    m->mask = size - 1;
    m->n = 0;
}

void hf_pair_map_put(struct hf_pair_map *m, uint32_t left, uint32_t right, uint32_t rank,
                     uint32_t merged)
{
    if (2 * (m->n + 1) > m->mask + 1) {
        struct hf_pair_map old = *m;
        hf_pair_map_init(m, 2 * old.n);
        for (size_t i = 0; i <= old.mask; i++)
            if (old.keys[i] != NO_PAIR)
                hf_pair_map_put(m, (uint32_t)(old.keys[i] >> 32), (uint32_t)old.keys[i],
                                old.rank[i], old.merged[i]);
        hf_pair_map_free(&old);
    }
    uint64_t key = (uint64_t)left << 32 | right;
    size_t i = hash_pair(key) & m->mask;
    while (m->keys[i] != NO_PAIR && m->keys[i] != key) i = (i + 1) & m->mask;
    if (m->keys[i] == NO_PAIR) m->n++;
    m->keys[i] = key;
    m->rank[i] = rank;
    m->merged[i] = merged;
}

bool hf_pair_map_get(const struct hf_pair_map *m, uint32_t left, uint32_t right, uint32_t *rank,
                     uint32_t *merged)
{
    uint64_t key = (uint64_t)left << 32 | right;
    size_t i = hash_pair(key) & m->mask;
    while (m->keys[i] != NO_PAIR) {
        if (m->keys[i] == key) {
            *rank = m->rank[i];
            *merged = m->merged[i];
            return true;
        }
        i = (i + 1) & m->mask;
    }
    return false;
}

void hf_pair_map_free(struct hf_pair_map *m)
{
    free(m->keys);
    free(m->rank);
    free(m->merged);
    memset(m, 0, sizeof *m);
}

/* Unicode 15, table 3-7: a lead byte's sequence length and the range of its second
 * byte; false for a byte that cannot start a multi-byte sequence. */
static bool lead_byte(unsigned char b, size_t *len, unsigned char *lo, unsigned char *hi)
{
    *lo = 0x80, *hi = 0xBF;
    if (b >= 0xC2 && b <= 0xDF)
        *len = 2;
    else if (b >= 0xE0 && b <= 0xEF) {
        *len = 3;
        if (b == 0xE0) *lo = 0xA0;
        if (b == 0xED) *hi = 0x9F;
    } else if (b >= 0xF0 && b <= 0xF4) {
        *len = 4;
        if (b == 0xF0) *lo = 0x90;
        if (b == 0xF4) *hi = 0x8F;
    } else
        return false;
    return true;
}

/* The well-formed byte sequences (Unicode 15, table 3-7). */
size_t hf_utf8_valid_length(const unsigned char *s, size_t n)
{
    if (n == 0) return 0;
    unsigned char b = s[0], lo, hi;
    if (b < 0x80) return 1;
    size_t len;
    if (!lead_byte(b, &len, &lo, &hi)) return 0;
    if (n < len) return 0;
    if (s[1] < lo || s[1] > hi) return 0;
    for (size_t i = 2; i < len; i++)
        if (s[i] < 0x80 || s[i] > 0xBF) return 0;
    return len;
}

/* The length of the maximal subpart at s: the longest prefix of a well-formed sequence
 * (at least 1 byte), the unit that becomes one U+FFFD. */
static size_t maximal_subpart(const unsigned char *s, size_t n)
{
    unsigned char lo, hi;
    size_t len;
    if (!lead_byte(s[0], &len, &lo, &hi)) return 1;
    size_t i = 1;
    if (i < n && i < len && s[i] >= lo && s[i] <= hi) {
        i++;
        while (i < n && i < len && s[i] >= 0x80 && s[i] <= 0xBF) i++;
    }
    return i;
}

void hf_utf8_replace_invalid(const char *text, size_t n, struct hf_string *out)
{
    const unsigned char *s = (const unsigned char *)text;
    size_t i = 0, run = 0;
    while (i < n) {
        size_t len = hf_utf8_valid_length(s + i, n - i);
        if (len) {
            i += len;
            continue;
        }
        hf_string_append(out, text + run, i - run);
        hf_string_append(out, "\xEF\xBF\xBD", 3);
        i += maximal_subpart(s + i, n - i);
        run = i;
    }
    hf_string_append(out, text + run, n - run);
}

size_t hf_utf8_decode(const char *text, int32_t *codepoint)
{
    const unsigned char *s = (const unsigned char *)text;
    if (s[0] < 0x80) {
        *codepoint = s[0];
        return 1;
    }
    if (s[0] < 0xE0) {
        *codepoint = (s[0] & 0x1F) << 6 | (s[1] & 0x3F);
        return 2;
    }
    if (s[0] < 0xF0) {
        *codepoint = (s[0] & 0x0F) << 12 | (s[1] & 0x3F) << 6 | (s[2] & 0x3F);
        return 3;
    }
    *codepoint = (s[0] & 0x07) << 18 | (s[1] & 0x3F) << 12 | (s[2] & 0x3F) << 6 | (s[3] & 0x3F);
    return 4;
}
