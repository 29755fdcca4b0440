/* fuzz_deck: libFuzzer harness for the input deck (src/deck.c), read as main reads it:
 * deck_parse on the text, deck_override for each command-line assignment, deck_finish,
 * each step only when the one before found no error. An input is a deck; its lines that
 * start with "#=" (YAML comments to the parser) are the overrides, e.g. "#=train.lr=3e-5".
 * A deck that passes must print (deck_print, as --dry-run and the checkpoints do) as
 * YAML that parses back with no error to the same values: printed again, it differs at
 * most in the "# default" marks (the reread keys all come from a file).
 * Seeds: tests/fuzz/corpus/deck (the decks of input/ and tests/decks, with overrides). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "deck.h"
#include "fuzz.h"

#define ERR_SIZE 8192

/* The resolved deck as deck_print writes it, in a new allocation. */
static char *printed(const struct deck *deck, size_t *length)
{
    char *text = NULL;
    FILE *out = open_memstream(&text, length);
    fuzz_require(out != NULL);
    deck_print(deck, out);
    fuzz_require(fclose(out) == 0);
    return text;
}

/* Removes the "# default" marks and the padding before them, in place. */
static void strip_default_marks(char *text)
{
    const char *mark = "# default\n";
    char *out = text;
    for (char *line = text; *line;) {
        char *end = strchr(line, '\n');
        size_t length = end ? (size_t)(end - line) + 1 : strlen(line);
        size_t keep = length;
        if (length >= strlen(mark) &&
            strncmp(line + length - strlen(mark), mark, strlen(mark)) == 0) {
            keep = length - strlen(mark);
            while (keep > 0 && line[keep - 1] == ' ') keep--;
        }
        memmove(out, line, keep);
        out += keep;
        if (keep < length) *out++ = '\n';
        line += length;
    }
    *out = '\0';
}

/* Applies every "#=KEY=VALUE" line; returns the number of errors. */
static int apply_overrides(struct deck *deck, const char *text, size_t size, char *err)
{
    int n_errors = 0;
    for (size_t start = 0; start < size;) {
        const char *line = text + start;
        const char *newline = memchr(line, '\n', size - start);
        size_t length = newline ? (size_t)(newline - line) : size - start;
        if (length > 2 && line[0] == '#' && line[1] == '=') {
            char *assignment = strndup(line + 2, length - 2);
            fuzz_require(assignment != NULL);
            n_errors += deck_override(deck, assignment, err, ERR_SIZE);
            free(assignment);
        }
        start += length + 1;
    }
    return n_errors;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static char err[ERR_SIZE];
    const char *text = (const char *)data;
    struct deck deck;
    deck_defaults(&deck);
    if (deck_parse(&deck, "fuzz.yaml", text, size, err, ERR_SIZE) != 0 ||
        apply_overrides(&deck, text, size, err) != 0 || deck_finish(&deck, err, ERR_SIZE) != 0) {
        deck_free(&deck);
        return 0;
    }

    size_t length;
    char *first = printed(&deck, &length);
    struct deck again;
    deck_defaults(&again);
    int n_errors = deck_parse(&again, "fuzz.yaml", first, length, err, ERR_SIZE);
    if (n_errors) fprintf(stderr, "printed deck:\n%s\nerrors:\n%s", first, err);
    fuzz_require(n_errors == 0);
    char *second = printed(&again, &length);
    strip_default_marks(first);
    strip_default_marks(second);
    if (strcmp(first, second) != 0)
        fprintf(stderr, "printed deck:\n%s\nprinted again:\n%s", first, second);
    fuzz_require(strcmp(first, second) == 0);
    free(first);
    free(second);
    deck_free(&again);
    deck_free(&deck);
    return 0;
}
