/* inspect: one sample as prepare would make it (see inspect.h). */
#include "inspect.h"

#include <stdio.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "prepare.h"
#include "tokenizer.h"

static void print_sample(const struct tokenizer *tok, const struct token_buffer *buf,
                         const char *path, uint64_t line, uint64_t n, FILE *out)
{
    size_t loss = 0;
    for (size_t i = 0; i < buf->n; i++) loss += buf->loss_mask[i];
    fprintf(out, "sample %llu: %s:%llu, %zu tokens, %zu loss-bearing\n", (unsigned long long)n,
            path, (unsigned long long)line, buf->n, loss);
    fprintf(out, "tokenizer: %s (vocabulary %llu)%s%s\n", tok->name,
            (unsigned long long)tok->vocab_size, tok->chat ? ", chat template " : "",
            tok->chat ? tok->chat_name : "");
    fprintf(out, "--- text (loss-bearing tokens between [[ and ]]) ---\n");
    for (size_t i = 0; i < buf->n;) {
        size_t j = i;
        while (j < buf->n && buf->loss_mask[j] == buf->loss_mask[i]) j++;
        size_t length;
        char *text = tokenizer_decode(tok, buf->ids + i, j - i, &length);
        if (buf->loss_mask[i]) fputs("[[", out);
        fwrite(text, 1, length, out);
        if (buf->loss_mask[i]) fputs("]]", out);
        free(text);
        i = j;
    }
    fprintf(out, "\n--- token ids (* marks a loss-bearing token) ---\n");
    for (size_t i = 0; i < buf->n; i++)
        fprintf(out, "%u%s%c", buf->ids[i], buf->loss_mask[i] ? "*" : "",
                (i + 1) % 16 == 0 || i + 1 == buf->n ? '\n' : ' ');
}

int inspect_sample(const struct deck *deck, uint64_t n, FILE *out, char *err, size_t err_size)
{
    const struct deck_prepare *p = &deck->prepare;
    if (p->n_inputs == 0) {
        snprintf(err, err_size, "--inspect: the deck has no prepare.inputs to read samples from");
        return EXIT_INPUT;
    }
    struct tokenizer tok;
    if (prepare_open_tokenizer(deck, false, &tok, err, err_size) != 0) return EXIT_INPUT;
    uint64_t samples = 0;
    int status = -1;
    struct token_buffer buf = {0};
    for (int f = 0; f < p->n_inputs && status < 0; f++) {
        struct jsonl_reader reader;
        if (jsonl_open(&reader, p->inputs[f], err, err_size) != 0) {
            status = EXIT_INPUT;
            break;
        }
        const char *text;
        size_t length;
        int got = 0;
        while (status < 0 && (got = jsonl_next(&reader, &text, &length, err, err_size)) > 0) {
            char why[2048], dropped[512];
            buf.n = 0;
            if (prepare_format_row(&tok, p->format, text, length, &buf, dropped, sizeof dropped,
                                   why, sizeof why) != 0) {
                if (p->bad_rows == BAD_ROWS_SKIP) continue;
                snprintf(err, err_size,
                         "%s:%llu: %s (prepare.bad_rows is abort: prepare stops here)",
                         p->inputs[f], (unsigned long long)reader.line_number, why);
                status = EXIT_INPUT;
                break;
            }
            if (samples++ < n) continue;
            print_sample(&tok, &buf, p->inputs[f], reader.line_number, n, out);
            if (dropped[0]) fprintf(out, "keys not used (dropped): %s\n", dropped);
            status = 0;
        }
        if (status < 0 && got < 0) status = EXIT_RUNTIME;
        jsonl_close(&reader);
    }
    if (status < 0) {
        snprintf(err, err_size, "--inspect %llu: prepare.inputs hold %llu samples (numbered from 0)",
                  (unsigned long long)n, (unsigned long long)samples);
        status = EXIT_INPUT;
    }
    token_buffer_free(&buf);
    tokenizer_close(&tok);
    return status;
}
