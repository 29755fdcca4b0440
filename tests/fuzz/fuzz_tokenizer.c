/* fuzz_tokenizer: libFuzzer harness for a Hugging Face tokenizer.json (src/tokenizer/,
 * hf_tokenizer_load_json, what prepare.tokenizer reads). The input is the file. For a file
 * that loads, what hf_tokenizer.h promises is checked on a fixed text (several scripts,
 * whitespace runs, digits, an added-token look-alike, bytes that are not UTF-8): encode
 * gives ids below the vocabulary size, decode of them succeeds, token ends never
 * decrease, and the normalized text is produced.
 * Seeds: tests/fuzz/corpus/tokenizer (small tokenizer.json files: byte-level BPE with the
 * GPT-2 regex, a Split sequence, added tokens, a TemplateProcessing post-processor,
 * merges in both forms). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fuzz.h"
#include "tokenizer/hf_tokenizer.h"

static const char text[] = "Hello, world! 12345 héllo 世界  \t\n\n  <|endoftext|>'s don't "
                           "\xF0\x9F\x99\x82 \xC3 \xFF end";

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char err[1024];
    struct hf_tokenizer *tok =
        hf_tokenizer_load_json("fuzz.json", (const char *)data, size, err, sizeof err);
    if (!tok) {
        fuzz_require(err[0] != '\0');
        return 0;
    }
    uint32_t vocab = hf_tokenizer_vocab_size(tok);
    for (int special = 0; special < 2; special++) {
        struct hf_ids ids = {0};
        if (hf_tokenizer_encode(tok, text, sizeof text - 1, special, &ids, err, sizeof err) == 0) {
            for (size_t i = 0; i < ids.n; i++) fuzz_require(ids.ids[i] < vocab);
            size_t length = 0;
            char *back = hf_tokenizer_decode(tok, ids.ids, ids.n, special, &length, err, sizeof err);
            fuzz_require(back != NULL && strlen(back) == length);
            free(back);
            size_t *ends = malloc((ids.n + 1) * sizeof *ends);
            if (hf_tokenizer_token_ends(tok, ids.ids, ids.n, ends) == 0)
                for (size_t i = 1; i < ids.n; i++) fuzz_require(ends[i] >= ends[i - 1]);
            free(ends);
        }
        hf_ids_free(&ids);
    }
    size_t length = 0;
    char *normalized = hf_tokenizer_normalize(tok, text, sizeof text - 1, &length, err, sizeof err);
    fuzz_require(normalized != NULL || err[0] != '\0');
    free(normalized);
    hf_tokenizer_free(tok);
    return 0;
}
