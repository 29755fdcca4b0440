/* prepare: the `prepare` phase. Reads jsonl rows (conversations, prompt/completion
 * pairs, plain documents), formats and tokenizes each into one sample with its loss mask
 * (tokenizer.h), and writes the token dataset (dataset.h) in one piece at the end, so a
 * refused run leaves no file. Rank 0 does the work; the other ranks wait for its verdict
 * and leave with it. */
#include "prepare.h"

#include <errno.h>
#include <jansson.h>
#include <mpi.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "dataset_write.h"
#include "files.h"
#include "log.h"

#define MAX_WARNINGS 20 /* bad rows printed under bad_rows: skip; the rest are counted */
#define MESSAGE_SIZE 8192

/* ---- one row ----------------------------------------------------------------------- */

static const char *json_type_name(const json_t *value)
{
    switch (json_typeof(value)) {
    case JSON_OBJECT:
        return "an object";
    case JSON_ARRAY:
        return "an array";
    case JSON_STRING:
        return "a string";
    case JSON_INTEGER:
        return "an integer";
    case JSON_REAL:
        return "a number";
    case JSON_TRUE:
    case JSON_FALSE:
        return "a boolean";
    case JSON_NULL:
        return "null";
    }
    return "a JSON value";
}

/* {"messages": [...]}: the list -> chat messages -> one sample. */
static int format_messages(const struct tokenizer *tok, const json_t *list,
                           struct token_buffer *out, char *err, size_t err_size)
{
    if (!json_is_array(list)) {
        snprintf(err, err_size, "\"messages\" is %s, not a list", json_type_name(list));
        return -1;
    }
    size_t n = json_array_size(list);
    if (n == 0) {
        snprintf(err, err_size, "\"messages\" is an empty list");
        return -1;
    }
    if (n > INT32_MAX) {
        snprintf(err, err_size, "\"messages\" has %zu entries", n);
        return -1;
    }
    struct chat_message *messages = xcalloc(n, sizeof *messages);
    int status = -1;
    for (size_t i = 0; i < n; i++) {
        const json_t *entry = json_array_get(list, i);
        struct chat_message *msg = &messages[i];
        if (!json_is_object(entry)) {
            snprintf(err, err_size, "message %zu is %s, not an object", i + 1,
                     json_type_name(entry));
            goto done;
        }
        const json_t *role = json_object_get(entry, "role");
        const json_t *content = json_object_get(entry, "content");
        const json_t *mask = json_object_get(entry, "mask");
        if (!role || !json_is_string(role)) {
            snprintf(err, err_size, "message %zu: \"role\" is %s; it must be a string", i + 1,
                     role ? json_type_name(role) : "missing");
            goto done;
        }
        if (chat_role_parse(json_string_value(role), &msg->role) != 0) {
            snprintf(err, err_size,
                     "message %zu: unknown role \"%.64s\" (expected user, "
                     "assistant or system)",
                     i + 1, json_string_value(role));
            goto done;
        }
        if (!content || !json_is_string(content)) {
            snprintf(err, err_size, "message %zu: \"content\" is %s; it must be a string", i + 1,
                     content ? json_type_name(content) : "missing");
            goto done;
        }
        msg->content = json_string_value(content);
        msg->length = json_string_length(content);
        if (mask) {
            if (!json_is_integer(mask) ||
                (json_integer_value(mask) != 0 && json_integer_value(mask) != 1)) {
                snprintf(err, err_size, "message %zu: \"mask\" must be 0 or 1", i + 1);
                goto done;
            }
            msg->no_loss = json_integer_value(mask) == 1;
        }
    }
    status = tokenizer_format_chat(tok, messages, (int)n, out, err, err_size);
done:
    free(messages);
    return status;
}

static int format_prompt_completion(const struct tokenizer *tok, const json_t *prompt,
                                    const json_t *completion, struct token_buffer *out, char *err,
                                    size_t err_size)
{
    if (!prompt || !completion) {
        snprintf(err, err_size, "\"%s\" without \"%s\"", prompt ? "prompt" : "completion",
                 prompt ? "completion" : "prompt");
        return -1;
    }
    if (!json_is_string(prompt) || !json_is_string(completion)) {
        const json_t *bad = json_is_string(prompt) ? completion : prompt;
        snprintf(err, err_size, "\"%s\" is %s; it must be a string",
                 bad == prompt ? "prompt" : "completion", json_type_name(bad));
        return -1;
    }
    struct chat_message messages[2] = {
        {ROLE_USER, json_string_value(prompt), json_string_length(prompt), false},
        {ROLE_ASSISTANT, json_string_value(completion), json_string_length(completion), false},
    };
    char why[512];
    if (tokenizer_format_chat(tok, messages, 2, out, why, sizeof why) != 0) {
        snprintf(err, err_size, "%s (message 1 is the prompt, 2 the completion)", why);
        return -1;
    }
    return 0;
}

int prepare_format_row(const struct tokenizer *tok, const char *line, size_t length,
                       struct token_buffer *out, char *err, size_t err_size)
{
    /* Checked before jansson, whose message for a bad byte is less direct. */
    size_t bad;
    if (!utf8_valid(line, length, &bad)) {
        snprintf(err, err_size, "invalid UTF-8 at byte %zu of the row (0x%02x)", bad + 1,
                 (unsigned char)line[bad]);
        return -1;
    }
    json_error_t error;
    json_t *row =
        json_loadb(line, length, JSON_DECODE_ANY | JSON_REJECT_DUPLICATES | JSON_ALLOW_NUL, &error);
    if (!row) {
        snprintf(err, err_size, "invalid JSON at column %d: %s", error.column, error.text);
        return -1;
    }
    int status = -1;
    if (!json_is_object(row)) {
        snprintf(err, err_size, "the row is %s; it must be an object", json_type_name(row));
        goto done;
    }
    const json_t *messages = json_object_get(row, "messages");
    const json_t *prompt = json_object_get(row, "prompt");
    const json_t *completion = json_object_get(row, "completion");
    const json_t *text = json_object_get(row, "text");
    int formats = (messages != NULL) + (prompt || completion) + (text != NULL);
    if (formats == 0) {
        snprintf(err, err_size,
                 "the row has none of \"messages\", \"prompt\" + "
                 "\"completion\", \"text\"");
    } else if (formats > 1) {
        snprintf(err, err_size,
                 "the row mixes formats (\"messages\", \"prompt\" + "
                 "\"completion\", \"text\"); give exactly one");
    } else if (messages) {
        status = format_messages(tok, messages, out, err, err_size);
    } else if (text) {
        if (!json_is_string(text)) {
            snprintf(err, err_size, "\"text\" is %s; it must be a string", json_type_name(text));
        } else {
            status = tokenizer_format_text(tok, json_string_value(text), json_string_length(text),
                                           out, err, err_size);
        }
    } else {
        status = format_prompt_completion(tok, prompt, completion, out, err, err_size);
    }
done:
    json_decref(row);
    return status;
}

/* ---- the phase --------------------------------------------------------------------- */

struct prepare_run {
    const struct deck *deck;
    const struct tokenizer *tok;
    struct token_buffer all; /* every sample's tokens and loss mask, concatenated */
    uint64_t *offsets;       /* [n_samples + 1] */
    uint64_t n_samples, offsets_capacity;
    uint64_t rows_skipped, no_loss_samples, loss_tokens;
    char message[MESSAGE_SIZE]; /* why the run stopped (rank 0) */
};

/* Records the end of the sample just appended: offsets[n_samples + 1] = offset. */
static void push_offset(struct prepare_run *run, uint64_t offset)
{
    if (run->n_samples + 2 > run->offsets_capacity) {
        uint64_t capacity = run->offsets_capacity ? 2 * run->offsets_capacity : 1024;
        uint64_t *grown = realloc(run->offsets, capacity * sizeof *grown);
        if (!grown)
            fatal(EXIT_RUNTIME, "out of memory for %llu sample offsets",
                  (unsigned long long)capacity);
        run->offsets = grown;
        run->offsets_capacity = capacity;
    }
    run->offsets[++run->n_samples] = offset;
}

static bool blank(const char *line, size_t length)
{
    for (size_t i = 0; i < length; i++)
        if (line[i] != ' ' && line[i] != '\t' && line[i] != '\r') return false;
    return true;
}

/* One input file. Returns 0, or the exit status with run->message set. */
static int read_input(struct prepare_run *run, const char *path)
{
    double start = wall_time();
    FILE *file = fopen(path, "rb");
    if (!file) {
        snprintf(run->message, sizeof run->message, "%s: cannot open input: %s", path,
                 strerror(errno));
        return EXIT_INPUT;
    }
    struct stat info;
    if (fstat(fileno(file), &info) == 0 && S_ISDIR(info.st_mode)) {
        snprintf(run->message, sizeof run->message, "%s: is a directory, not a jsonl file", path);
        fclose(file);
        return EXIT_INPUT;
    }
    uint64_t samples_before = run->n_samples, tokens_before = run->all.n, line_number = 0;
    uint64_t skipped_here = 0;
    char *line = NULL;
    size_t line_capacity = 0;
    ssize_t got;
    int status = 0;
    while ((got = getline(&line, &line_capacity, file)) >= 0) {
        line_number++;
        size_t length = (size_t)got;
        if (length > 0 && line[length - 1] == '\n') length--;
        if (length > 0 && line[length - 1] == '\r') length--;
        if (blank(line, length)) continue;
        char why[1024];
        size_t sample_start = run->all.n;
        if (prepare_format_row(run->tok, line, length, &run->all, why, sizeof why) != 0) {
            if (run->deck->prepare.bad_rows == BAD_ROWS_ABORT) {
                snprintf(run->message, sizeof run->message,
                         "%s:%llu: %s (prepare.bad_rows is abort; set it to skip to drop "
                         "bad rows)",
                         path, (unsigned long long)line_number, why);
                status = EXIT_INPUT;
                break;
            }
            if (run->rows_skipped < MAX_WARNINGS)
                log_warn("%s:%llu: %s; row skipped", path, (unsigned long long)line_number, why);
            run->rows_skipped++;
            skipped_here++;
            continue;
        }
        uint64_t loss = 0;
        for (size_t t = sample_start; t < run->all.n; t++) loss += run->all.loss_mask[t];
        if (loss == 0) run->no_loss_samples++;
        run->loss_tokens += loss;
        push_offset(run, run->all.n);
    }
    if (status == 0 && ferror(file)) {
        snprintf(run->message, sizeof run->message, "%s: read error after line %llu: %s", path,
                 (unsigned long long)line_number, strerror(errno));
        status = EXIT_RUNTIME;
    }
    free(line);
    fclose(file);
    if (status == 0)
        log_info("prepare: %s: %llu rows, %llu tokens, %llu bad rows skipped, %.2f s", path,
                 (unsigned long long)(run->n_samples - samples_before),
                 (unsigned long long)(run->all.n - tokens_before), (unsigned long long)skipped_here,
                 wall_time() - start);
    return status;
}

/* Creates the directory that will hold path. */
static int make_parent_directory(const char *path, char *message, size_t size)
{
    char *dir = xstrdup(path);
    char *slash = strrchr(dir, '/');
    int status = 0;
    if (slash && slash != dir) {
        *slash = '\0';
        if (make_directories(dir) != 0) {
            snprintf(message, size, "cannot create directory %s for prepare.output: %s", dir,
                     strerror(errno));
            status = -1;
        }
    }
    free(dir);
    return status;
}

/* Rank 0's whole job. Returns 0, or the exit status with run->message set. */
static int prepare_all(struct prepare_run *run)
{
    const struct deck_prepare *p = &run->deck->prepare;
    double start = wall_time();
    run->offsets_capacity = 1024;
    run->offsets = xmalloc(run->offsets_capacity * sizeof *run->offsets);
    run->offsets[0] = 0;
    for (int i = 0; i < p->n_inputs; i++) {
        int status = read_input(run, p->inputs[i]);
        if (status != 0) return status;
    }
    if (run->rows_skipped > MAX_WARNINGS)
        log_warn("%llu more bad rows skipped, not shown",
                 (unsigned long long)(run->rows_skipped - MAX_WARNINGS));
    if (run->n_samples == 0) {
        snprintf(run->message, sizeof run->message,
                 "prepare: no usable row in prepare.inputs (%llu bad rows skipped); nothing "
                 "to write to %s",
                 (unsigned long long)run->rows_skipped, p->output);
        return EXIT_INPUT;
    }
    if (make_parent_directory(p->output, run->message, sizeof run->message) != 0)
        return EXIT_RUNTIME;
    struct dataset_contents contents = {
        .tokens = run->all.ids,
        .loss_mask = run->all.loss_mask,
        .n_tokens = run->all.n,
        .offsets = run->offsets,
        .n_samples = run->n_samples,
        .tokenizer = run->tok->name,
        .vocab_size = run->tok->vocab_size,
        .sources = (const char *const *)p->inputs,
        .n_sources = p->n_inputs,
        .rows_skipped = run->rows_skipped,
    };
    if (dataset_write(p->output, &contents, run->message, sizeof run->message) != 0)
        return EXIT_RUNTIME;
    double seconds = wall_time() - start;
    /* what the later phases will cut (score, train and eval keep data.seq_len tokens) */
    int seq_len = run->deck->data.seq_len;
    unsigned long long longer = 0;
    for (uint64_t i = 0; i < run->n_samples; i++)
        longer += run->offsets[i + 1] - run->offsets[i] > (uint64_t)seq_len;
    if (longer)
        log_warn("prepare: %llu of %llu samples are longer than data.seq_len (%d): score, "
                 "train and eval will cut them to it", longer,
                 (unsigned long long)run->n_samples, seq_len);
    log_info("prepare: %llu samples, %llu tokens (%llu loss-bearing), %llu bad rows skipped, "
             "%llu samples with no loss-bearing token -> %s (%.2f s)",
             (unsigned long long)run->n_samples, (unsigned long long)run->all.n,
             (unsigned long long)run->loss_tokens, (unsigned long long)run->rows_skipped,
             (unsigned long long)run->no_loss_samples, p->output, seconds);
    metrics_write("prepare",
                  "\"samples\": %llu, \"tokens\": %llu, \"loss_tokens\": %llu, "
                  "\"rows_skipped\": %llu, \"no_loss_samples\": %llu, \"longer_than_seq_len\": "
                  "%llu, \"seconds\": %.3f",
                  (unsigned long long)run->n_samples, (unsigned long long)run->all.n,
                  (unsigned long long)run->loss_tokens, (unsigned long long)run->rows_skipped,
                  (unsigned long long)run->no_loss_samples, longer, seconds);
    return 0;
}

int phase_prepare(const struct deck *deck, const struct layout *layout)
{
    (void)layout;
    struct tokenizer tok;
    char err[1024];
    /* Every rank reads the same deck, so every rank reaches this verdict. */
    if (tokenizer_open(&tok, deck->prepare.tokenizer, err, sizeof err) != 0) {
        char where[4096];
        deck_where(deck, "prepare.tokenizer", where, sizeof where);
        fatal_all(EXIT_INPUT, "%s: prepare.tokenizer: %s", where, err);
    }
    int rank = 0;
    check_mpi(MPI_Comm_rank(MPI_COMM_WORLD, &rank));
    struct prepare_run *run = xcalloc(1, sizeof *run);
    int status = 0;
    if (rank == 0) {
        run->deck = deck;
        run->tok = &tok;
        status = prepare_all(run);
        token_buffer_free(&run->all);
        free(run->offsets);
    }
    check_mpi(MPI_Bcast(&status, 1, MPI_INT, 0, MPI_COMM_WORLD));
    if (status != 0) fatal_all(status, "%s", run->message);
    free(run);
    tokenizer_close(&tok);
    return 0;
}
