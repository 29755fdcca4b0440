/* hf_bpe: the BPE model of tokenizer.json, as the library's BPE::tokenize runs it: the
 * word becomes one symbol per character (its vocabulary id; else its bytes as <0xNN>
 * tokens under byte_fallback; else the unk token, runs of them fused under fuse_unk; else
 * nothing), then the pair of adjacent symbols with the lowest merge rank is merged, the
 * leftmost first among equals, until no pair has a merge. With ignore_merges a word that
 * is itself in the vocabulary is that one token. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "hf_internal.h"

struct symbol {
    uint32_t id;
    int prev, next; /* neighbours in the word, -1 at the ends */
    bool gone;      /* merged into its left neighbour */
};

struct merge {
    uint32_t rank, merged;
    int pos; /* the left symbol of the pair */
};

/* A min-heap on (rank, pos). */
struct heap {
    struct merge *items;
    size_t n, capacity;
};

static bool before(const struct merge *a, const struct merge *b)
{
    return a->rank != b->rank ? a->rank < b->rank : a->pos < b->pos;
}

static void heap_push(struct heap *h, struct merge m)
{
    if (h->n == h->capacity) {
        h->capacity = h->capacity ? 2 * h->capacity : 64;
        h->items = hf_realloc(h->items, h->capacity * sizeof *h->items);
    }
    size_t i = h->n++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!before(&m, &h->items[parent])) break;
        h->items[i] = h->items[parent];
        i = parent;
    }
    h->items[i] = m;
}

static struct merge heap_pop(struct heap *h)
{
    struct merge top = h->items[0], last = h->items[--h->n];
    size_t i = 0;
    for (;;) {
        size_t child = 2 * i + 1;
        if (child >= h->n) break;
        if (child + 1 < h->n && before(&h->items[child + 1], &h->items[child])) child++;
        if (!before(&h->items[child], &last)) break;
        h->items[i] = h->items[child];
        i = child;
    }
    if (h->n) h->items[i] = last;
    return top;
}

struct word {
    struct symbol *symbols;
    size_t n, capacity;
};

static void word_add(struct word *w, uint32_t id)
{
    if (w->n == w->capacity) {
        w->capacity = w->capacity ? 2 * w->capacity : 64;
        w->symbols = hf_realloc(w->symbols, w->capacity * sizeof *w->symbols);
    }
    int i = (int)w->n++;
    w->symbols[i] = (struct symbol){.id = id, .prev = i - 1, .next = -1};
    if (i > 0) w->symbols[i - 1].next = i;
}

static void push_pair(const struct hf_bpe *bpe, const struct word *w, int pos, struct heap *h)
{
    int next = w->symbols[pos].next;
    if (next < 0) return;
    uint32_t rank, merged;
    if (hf_pair_map_get(&bpe->merges, w->symbols[pos].id, w->symbols[next].id, &rank, &merged))
        heap_push(h, (struct merge){.rank = rank, .merged = merged, .pos = pos});
}

static void merge_all(const struct hf_bpe *bpe, struct word *w, struct heap *h)
{
    h->n = 0;
    for (size_t i = 0; i + 1 < w->n; i++) push_pair(bpe, w, (int)i, h);
    while (h->n) {
        struct merge m = heap_pop(h);
        struct symbol *left = &w->symbols[m.pos];
        if (left->gone || left->next < 0) continue;
        struct symbol *right = &w->symbols[left->next];
        /* the pair may have changed since this entry was pushed */
        uint32_t rank, merged;
        if (!hf_pair_map_get(&bpe->merges, left->id, right->id, &rank, &merged) ||
            merged != m.merged)
            continue;
        left->id = m.merged;
        right->gone = true;
        left->next = right->next;
        if (right->next >= 0) w->symbols[right->next].prev = m.pos;
        if (left->prev >= 0) push_pair(bpe, w, left->prev, h);
        push_pair(bpe, w, m.pos, h);
    }
}

void hf_bpe_encode(const struct hf_bpe *bpe, const char *text, size_t n, struct hf_ids *out)
{
    if (n == 0) return;
    if (bpe->ignore_merges) {
        int64_t id = hf_string_map_get(&bpe->vocab, text, n);
        if (id >= 0) {
            hf_ids_push(out, (uint32_t)id);
            return;
        }
    }
    struct word w = {0};
    struct heap h = {0};
    bool pending_unk = false;
    for (size_t i = 0; i < n;) {
        size_t len = hf_utf8_valid_length((const unsigned char *)text + i, n - i);
        if (!len) len = 1;
        int64_t id = hf_string_map_get(&bpe->vocab, text + i, len);
        if (id >= 0) {
            if (pending_unk) word_add(&w, (uint32_t)bpe->unk_id);
            pending_unk = false;
            word_add(&w, (uint32_t)id);
            i += len;
            continue;
        }
        if (bpe->byte_fallback) {
            int64_t bytes[4];
            bool all = true;
            for (size_t k = 0; k < len; k++) {
                char name[8];
                snprintf(name, sizeof name, "<0x%02X>", (unsigned char)text[i + k]);
                bytes[k] = hf_string_map_get(&bpe->vocab, name, strlen(name));
                all = all && bytes[k] >= 0;
            }
            if (all) {
                /* the library adds these without flushing a pending unk */
                for (size_t k = 0; k < len; k++) word_add(&w, (uint32_t)bytes[k]);
                i += len;
                continue;
            }
        }
        if (bpe->unk_id >= 0) {
            if (pending_unk && !bpe->fuse_unk) word_add(&w, (uint32_t)bpe->unk_id);
            pending_unk = true;
        }
        i += len;
    }
    if (pending_unk) word_add(&w, (uint32_t)bpe->unk_id);
    merge_all(bpe, &w, &h);
    for (int i = w.n ? 0 : -1; i >= 0; i = w.symbols[i].next) hf_ids_push(out, w.symbols[i].id);
    free(w.symbols);
    free(h.items);
}

void hf_bpe_free(struct hf_bpe *bpe)
{
    hf_string_map_free(&bpe->vocab);
    hf_pair_map_free(&bpe->merges);
    free(bpe->id_text);
    free(bpe->id_length);
    memset(bpe, 0, sizeof *bpe);
}
