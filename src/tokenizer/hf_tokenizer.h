/* hf_tokenizer: a Hugging Face tokenizer.json read and run exactly as the `tokenizers`
 * library runs it, for the byte-level BPE families (Qwen2/Qwen3, OLMoE/GPT-NeoX, ...) and
 * the SentencePiece-derived BPE of Mistral/Mixtral (byte fallback, "▁" for spaces).
 * Callers: prepare (later) and the tokenizer tests and benchmark.
 *
 * Encoding follows the library's order: added tokens are split out of the raw text first
 * (longest match; lstrip, rstrip, single_word); the rest is normalized (NFC, Prepend,
 * Replace, Sequence), normalized added tokens are split out of that, then each piece is
 * pre-tokenized (Split with every behavior and invert, ByteLevel, Digits, Metaspace with
 * every prepend_scheme, Sequence) and run through the BPE model (byte_fallback, unk,
 * fuse_unk); the post-processor (TemplateProcessing, ByteLevel, Sequence) adds its special
 * tokens when asked. Decoders: ByteLevel, Replace, ByteFallback, Fuse, Strip, Metaspace,
 * Sequence; invalid UTF-8 as U+FFFD where the library puts it.
 *
 * A construct the file uses that is not implemented here is a load error naming it (and
 * the file), never a silent difference.
 *
 * Text given to encode may hold bytes that are not UTF-8: each maximal invalid subpart
 * becomes U+FFFD first, as Python's bytes.decode("utf-8", errors="replace") does before
 * a str reaches the library. */
#ifndef ESFT_HF_TOKENIZER_H
#define ESFT_HF_TOKENIZER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct hf_tokenizer;

/* A growing list of token ids. */
struct hf_ids {
    uint32_t *ids; /* [n] */
    size_t n, capacity;
};

void hf_ids_free(struct hf_ids *ids);

/* Reads a tokenizer.json. Returns the tokenizer, or NULL with "PATH: what is wrong" in
 * err. */
struct hf_tokenizer *hf_tokenizer_load(const char *path, char *err, size_t err_size);

/* The same from `size` bytes of JSON already in memory; `name` stands for the file in
 * messages. */
struct hf_tokenizer *hf_tokenizer_load_json(const char *name, const char *json, size_t size,
                                            char *err, size_t err_size);

void hf_tokenizer_free(struct hf_tokenizer *tok);

/* Appends the ids of `length` bytes of text to out (the library's
 * encode(text, add_special_tokens)). Returns 0, or -1 with the reason in err. */
int hf_tokenizer_encode(const struct hf_tokenizer *tok, const char *text, size_t length,
                        bool add_special_tokens, struct hf_ids *out, char *err, size_t err_size);

/* The text of n ids (the library's decode(ids, skip_special_tokens)): a malloc'd,
 * NUL-terminated UTF-8 string with its length in *length, or NULL with the reason in
 * err (an id outside the vocabulary is skipped, as the library does). */
char *hf_tokenizer_decode(const struct hf_tokenizer *tok, const uint32_t *ids, size_t n,
                          bool skip_special_tokens, size_t *length, char *err, size_t err_size);

/* Where each of n ids ends in the text it spells: ends[i] is the byte length of the
 * first i + 1 tokens' bytes. A token's bytes: an added token's content; a model token's
 * text through the decoder's steps that map one token alone, before UTF-8 repair
 * (ByteLevel: its bytes; Replace: e.g. SentencePiece's "▁" as a space; ByteFallback:
 * "<0xNN>" as that one byte; Metaspace: its replacement as a space), not the steps that
 * join or trim the whole text (Fuse, Strip, Metaspace's dropped first "▁"). Returns 0, or
 * -1 if an id has no token. */
int hf_tokenizer_token_ends(const struct hf_tokenizer *tok, const uint32_t *ids, size_t n,
                            size_t *ends);

/* The text the tokens of `length` bytes of text spell, under the rule above: invalid UTF-8
 * repaired, added tokens kept as matched, the rest normalized, pre-tokenized and each word
 * mapped by those same decoder steps. So for Mixtral "Hi there" gives " Hi there" (the
 * "▁" its Prepend normalizer or Metaspace pre-tokenizer puts in front, as a space) and a
 * character the vocabulary lacks its own bytes, which its <0xNN> tokens spell. The tokens
 * of encode(text, add_special_tokens=false) spell exactly this text, their token_ends
 * ending at its length, unless the model emits an unk token (whose text is not the text
 * it stands for) or an added token takes white space with lstrip/rstrip; callers compare
 * the totals to be sure. A
 * malloc'd, NUL-terminated string with its length, or NULL with the reason in err. */
char *hf_tokenizer_normalize(const struct hf_tokenizer *tok, const char *text, size_t length,
                             size_t *out_length, char *err, size_t err_size);

/* One more than the largest id of the vocabulary and the added tokens. */
uint32_t hf_tokenizer_vocab_size(const struct hf_tokenizer *tok);

/* The id of a token's exact text (added tokens first, then the model's vocabulary);
 * -1 if none. */
int64_t hf_tokenizer_token_to_id(const struct hf_tokenizer *tok, const char *token, size_t length);

/* The text of an id (NUL-terminated, owned by tok), with its length; NULL if none. An
 * added token with normalized=true gives its normalized form, as the library does. */
const char *hf_tokenizer_id_to_token(const struct hf_tokenizer *tok, uint32_t id, size_t *length);

#endif
