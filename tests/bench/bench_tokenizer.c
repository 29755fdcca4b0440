/* bench_tokenizer: esft's tokenizer.json encode throughput on the test corpus, one thread.
 * tests/bench/bench_tokenizer_hf.py prints the `tokenizers` library's on the same records,
 * for a side-by-side comparison (neither is part of make check).
 *
 * Usage: bench_tokenizer TOKENIZER.json[.gz] CORPUS.bin.gz [SECONDS]
 *   CORPUS: records ended by byte 0x1E (tests/tokenizer/corpus.bin.gz). Every record is
 *   encoded (add_special_tokens true) in turn, the whole corpus repeated until SECONDS
 *   (default 3) have passed; prints MB/s and tokens/s. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../gzfile.h"
#include "tokenizer/hf_tokenizer.h"

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: bench_tokenizer TOKENIZER.json[.gz] CORPUS.bin.gz [SECONDS]\n");
        return 2;
    }
    double seconds = argc > 3 ? atof(argv[3]) : 3.0;
    size_t json_size, corpus_size;
    char *json = read_gz(argv[1], &json_size);
    char *corpus = read_gz(argv[2], &corpus_size);
    if (!json || !corpus) {
        fprintf(stderr, "bench_tokenizer: cannot read %s\n", !json ? argv[1] : argv[2]);
        return 2;
    }
    char err[1024];
    double t0 = now();
    struct hf_tokenizer *tok = hf_tokenizer_load_json(argv[1], json, json_size, err, sizeof err);
    double load_s = now() - t0;
    free(json);
    if (!tok) {
        fprintf(stderr, "%s\n", err);
        return 2;
    }
    struct hf_ids ids = {0};
    size_t bytes = 0, tokens = 0, records = 0, passes = 0;
    t0 = now();
    double elapsed;
    do {
        for (char *r = corpus, *end; r < corpus + corpus_size; r = end + 1) {
            end = memchr(r, 0x1E, (size_t)(corpus + corpus_size - r));
            if (!end) break;
            ids.n = 0;
            if (hf_tokenizer_encode(tok, r, (size_t)(end - r), true, &ids, err, sizeof err)) {
                fprintf(stderr, "%s\n", err);
                return 1;
            }
            bytes += (size_t)(end - r);
            tokens += ids.n;
            records++;
        }
        passes++;
        elapsed = now() - t0;
    } while (elapsed < seconds);
    printf("esft       %-40s load %.2f s  encode %.2f MB/s  %.0f tokens/s  (%zu records x %zu, "
           "1 thread)\n",
           argv[1], load_s, (double)bytes / elapsed / 1e6, (double)tokens / elapsed,
           records / passes, passes);
    hf_ids_free(&ids);
    hf_tokenizer_free(tok);
    free(corpus);
    return 0;
}
