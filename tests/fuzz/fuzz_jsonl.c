/* fuzz_jsonl: libFuzzer harness for the jsonl rows of the `prepare` phase (src/prepare.c,
 * prepare_format_row: conversation.c and sample.c with the byte tokenizer, in both
 * layouts). The input is a jsonl
 * file, cut into rows as the phase cuts it (newline, then a CR before it, blank rows
 * skipped). What prepare.h promises is checked on each row: a refused row leaves the
 * samples as they were; an accepted one appends ids below vocab_size and a 0/1 mask.
 * Seeds: tests/fuzz/corpus/jsonl (rows of input/data/demo.jsonl, the three formats, the
 * bad rows of tests/test-prepare.sh). */
#include <stdint.h>
#include <string.h>

#include "fuzz.h"
#include "prepare.h"
#include "tokenizer.h"

static int blank(const char *line, size_t length)
{
    for (size_t i = 0; i < length; i++)
        if (line[i] != ' ' && line[i] != '\t' && line[i] != '\r') return 0;
    return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct tokenizer tok;
    static int ready;
    char err[1024];
    if (!ready) {
        struct tokenizer_options byte = {.spec = "byte"};
        fuzz_require(tokenizer_open(&tok, &byte, err, sizeof err) == 0);
        ready = 1;
    }
    struct token_buffer samples = {0};
    const char *text = (const char *)data;
    for (size_t start = 0; start < size;) {
        const char *line = text + start;
        const char *newline = memchr(line, '\n', size - start);
        size_t length = newline ? (size_t)(newline - line) : size - start;
        start += length + 1;
        if (length > 0 && line[length - 1] == '\r') length--;
        if (blank(line, length)) continue;
        size_t before = samples.n;
        err[0] = '\0';
        char dropped[512];
        enum prepare_format format = (length & 1) ? FORMAT_TEMPLATE : FORMAT_ESFT_REFERENCE;
        if (prepare_format_row(&tok, format, line, length, &samples, dropped, sizeof dropped, err,
                               sizeof err) != 0) {
            fuzz_require(samples.n == before && err[0] != '\0');
            continue;
        }
        fuzz_require(samples.n > before);
        for (size_t i = before; i < samples.n; i++)
            fuzz_require(samples.ids[i] < tok.vocab_size && samples.loss_mask[i] <= 1);
    }
    token_buffer_free(&samples);
    return 0;
}
