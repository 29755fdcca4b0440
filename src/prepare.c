/* prepare: the `prepare` phase. Reads jsonl rows of every shape conversation.h accepts,
 * formats and tokenizes each into one sample with its loss mask (sample.h), and writes the
 * token dataset (dataset.h) in one piece at the end, so a refused run leaves no file.
 * Every rank reads the inputs and formats the rows r with r mod ranks == its rank; rank 0
 * gathers the samples in row order and writes them, so the file is the same for any
 * number of ranks. */
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

#include "conversation.h"
#include "dataset_write.h"
#include "files.h"
#include "log.h"
#include "sample.h"

#define MAX_WARNINGS 20 /* bad rows printed under bad_rows: skip; the rest are counted */
#define MESSAGE_SIZE 8192
#define NOTE_SIZE 1536  /* one warning or error about a row */
#define MAX_DROPPED 32  /* distinct unused keys reported per rank */
#define CHUNK ((size_t)1 << 30) /* bytes per message when rank 0 gathers the samples */

/* ---- one row ----------------------------------------------------------------------- */

int prepare_format_row(const struct tokenizer *tok, enum prepare_format format, const char *line,
                       size_t length, struct token_buffer *out, char *dropped,
                       size_t dropped_size, char *err, size_t err_size)
{
    struct conversation c;
    if (conversation_parse(line, length, &c, err, err_size) != 0) return -1;
    int rc = sample_format(tok, format, &c, out, err, err_size);
    if (dropped) snprintf(dropped, dropped_size, "%s", rc == 0 ? c.dropped : "");
    conversation_free(&c);
    return rc;
}

/* ---- the phase --------------------------------------------------------------------- */

/* A message about one row, and the row's place in the inputs (row: counted over the
 * non-blank lines of every input in order). */
struct note {
    uint64_t row;
    char text[NOTE_SIZE - sizeof(uint64_t)];
};

/* What one rank made of its rows. */
struct share {
    struct token_buffer all; /* its samples' tokens and loss masks, concatenated */
    uint64_t *rows, *lengths; /* [n_samples]: each sample's row and token count */
    uint64_t n_samples, capacity;
    uint64_t n_rows;          /* rows in all inputs (every rank counts them all) */
    uint64_t n_bad;           /* its bad rows */
    struct note bad[MAX_WARNINGS + 1]; /* the first ones */
    uint64_t n_dropping;      /* its rows with keys dropped */
    struct note dropped[MAX_DROPPED]; /* "KEY\tFILE:LINE", the first row of each key */
    int n_dropped;
    uint64_t *per_file; /* [3 * inputs]: samples, tokens, bad rows of each input */
};

static void push_sample(struct share *sh, uint64_t row, uint64_t length)
{
    if (sh->n_samples == sh->capacity) {
        sh->capacity = sh->capacity ? 2 * sh->capacity : 1024;
        sh->rows = realloc(sh->rows, sh->capacity * sizeof *sh->rows);
        sh->lengths = realloc(sh->lengths, sh->capacity * sizeof *sh->lengths);
        if (!sh->rows || !sh->lengths)
            fatal(EXIT_RUNTIME, "out of memory for %llu sample offsets",
                  (unsigned long long)sh->capacity);
    }
    sh->rows[sh->n_samples] = row;
    sh->lengths[sh->n_samples++] = length;
}

/* Records the keys a row dropped: each key's first row. */
static void note_dropped(struct share *sh, uint64_t row, const char *keys, const char *path,
                         uint64_t line)
{
    sh->n_dropping++;
    for (const char *p = keys; *p;) {
        const char *comma = strchr(p, ',');
        size_t len = comma ? (size_t)(comma - p) : strlen(p);
        bool known = false;
        for (int i = 0; i < sh->n_dropped && !known; i++)
            known = !strncmp(sh->dropped[i].text, p, len) && sh->dropped[i].text[len] == '\t';
        if (!known && sh->n_dropped < MAX_DROPPED) {
            struct note *n = &sh->dropped[sh->n_dropped++];
            n->row = row;
            snprintf(n->text, sizeof n->text, "%.*s\t%s:%llu", (int)len, p, path,
                     (unsigned long long)line);
        }
        p += len + (comma ? 2 : 0);
    }
}

static bool blank(const char *line, size_t length)
{
    for (size_t i = 0; i < length; i++)
        if (line[i] != ' ' && line[i] != '\t' && line[i] != '\r') return false;
    return true;
}

int jsonl_open(struct jsonl_reader *r, const char *path, char *err, size_t err_size)
{
    memset(r, 0, sizeof *r);
    r->path = path;
    r->file = fopen(path, "rb");
    if (!r->file) {
        snprintf(err, err_size, "%s: cannot open input: %s", path, strerror(errno));
        return -1;
    }
    struct stat info;
    if (fstat(fileno(r->file), &info) == 0 && S_ISDIR(info.st_mode)) {
        snprintf(err, err_size, "%s: is a directory, not a jsonl file", path);
        fclose(r->file);
        r->file = NULL;
        return -1;
    }
    return 0;
}

int jsonl_next(struct jsonl_reader *r, const char **text, size_t *length, char *err,
               size_t err_size)
{
    ssize_t got;
    while ((got = getline(&r->line, &r->capacity, r->file)) >= 0) {
        r->line_number++;
        char *t = r->line;
        size_t n = (size_t)got;
        if (r->line_number == 1 && n >= 3 && !memcmp(t, "\xEF\xBB\xBF", 3)) {
            t += 3; /* a UTF-8 byte order mark */
            n -= 3;
        }
        if (n > 0 && t[n - 1] == '\n') n--;
        if (n > 0 && t[n - 1] == '\r') n--;
        if (blank(t, n)) continue;
        *text = t;
        *length = n;
        return 1;
    }
    if (ferror(r->file)) {
        snprintf(err, err_size, "%s: read error after line %llu: %s", r->path,
                 (unsigned long long)r->line_number, strerror(errno));
        return -1;
    }
    return 0;
}

void jsonl_close(struct jsonl_reader *r)
{
    free(r->line);
    if (r->file) fclose(r->file);
    memset(r, 0, sizeof *r);
}

/* One input file: counts its rows and formats this rank's. Returns 0, or the exit
 * status with message set (every rank reaches the same verdict on opening a file). */
static int read_input(const struct deck *deck, const struct tokenizer *tok, int file_index,
                      int rank, int size, struct share *sh, char *message, size_t message_size)
{
    const char *path = deck->prepare.inputs[file_index];
    struct jsonl_reader reader;
    if (jsonl_open(&reader, path, message, message_size) != 0) return EXIT_INPUT;
    uint64_t *counts = sh->per_file + 3 * file_index;
    bool abort_on_bad = deck->prepare.bad_rows == BAD_ROWS_ABORT;
    const char *text;
    size_t length;
    int got;
    while ((got = jsonl_next(&reader, &text, &length, message, message_size)) > 0) {
        uint64_t row = sh->n_rows++, line_number = reader.line_number;
        if ((int)(row % (uint64_t)size) != rank) continue;
        if (abort_on_bad && sh->n_bad) continue; /* this rank's verdict is in */
        char why[1024], dropped[512];
        size_t sample_start = sh->all.n;
        if (prepare_format_row(tok, deck->prepare.format, text, length, &sh->all, dropped,
                               sizeof dropped, why, sizeof why) != 0) {
            if (sh->n_bad <= MAX_WARNINGS) {
                struct note *n = &sh->bad[sh->n_bad];
                n->row = row;
                snprintf(n->text, sizeof n->text, "%s:%llu: %s", path,
                         (unsigned long long)line_number, why);
            }
            sh->n_bad++;
            counts[2]++;
            continue;
        }
        if (dropped[0]) note_dropped(sh, row, dropped, path, line_number);
        push_sample(sh, row, sh->all.n - sample_start);
        counts[0]++;
        counts[1] += sh->all.n - sample_start;
    }
    jsonl_close(&reader);
    return got < 0 ? EXIT_RUNTIME : 0;
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

/* Point to point in pieces of at most CHUNK bytes (MPI counts are ints). */
static void send_bytes(const void *data, size_t n, int to)
{
    for (size_t at = 0; at < n; at += CHUNK) {
        size_t k = n - at < CHUNK ? n - at : CHUNK;
        check_mpi(MPI_Send((const char *)data + at, (int)k, MPI_BYTE, to, 0, MPI_COMM_WORLD));
    }
}

static void recv_bytes(void *data, size_t n, int from)
{
    for (size_t at = 0; at < n; at += CHUNK) {
        size_t k = n - at < CHUNK ? n - at : CHUNK;
        check_mpi(MPI_Recv((char *)data + at, (int)k, MPI_BYTE, from, 0, MPI_COMM_WORLD,
                           MPI_STATUS_IGNORE));
    }
}

/* The samples of every rank on rank 0, in row order: tokens into all, offsets [S + 1]. */
static void gather_samples(struct share *sh, int rank, int size, struct token_buffer *all,
                           uint64_t **offsets, uint64_t *n_samples)
{
    uint64_t mine[2] = {sh->n_samples, sh->all.n};
    uint64_t *counts = rank == 0 ? xcalloc(2 * (size_t)size, sizeof *counts) : NULL;
    check_mpi(MPI_Gather(mine, 2, MPI_UINT64_T, counts, 2, MPI_UINT64_T, 0, MPI_COMM_WORLD));
    if (rank != 0) {
        send_bytes(sh->rows, sh->n_samples * sizeof *sh->rows, 0);
        send_bytes(sh->lengths, sh->n_samples * sizeof *sh->lengths, 0);
        send_bytes(sh->all.ids, sh->all.n * sizeof *sh->all.ids, 0);
        send_bytes(sh->all.loss_mask, sh->all.n, 0);
        return;
    }
    struct share *from = xcalloc((size_t)size, sizeof *from);
    uint64_t total_samples = 0, total_tokens = 0;
    for (int r = 0; r < size; r++) {
        total_samples += counts[2 * r];
        total_tokens += counts[2 * r + 1];
        if (r == 0) {
            from[0] = *sh;
            continue;
        }
        struct share *f = &from[r];
        f->n_samples = counts[2 * r];
        f->all.n = counts[2 * r + 1];
        f->rows = xmalloc(f->n_samples * sizeof *f->rows + 1);
        f->lengths = xmalloc(f->n_samples * sizeof *f->lengths + 1);
        f->all.ids = xmalloc(f->all.n * sizeof *f->all.ids + 1);
        f->all.loss_mask = xmalloc(f->all.n + 1);
        recv_bytes(f->rows, f->n_samples * sizeof *f->rows, r);
        recv_bytes(f->lengths, f->n_samples * sizeof *f->lengths, r);
        recv_bytes(f->all.ids, f->all.n * sizeof *f->all.ids, r);
        recv_bytes(f->all.loss_mask, f->all.n, r);
    }
    token_buffer_reserve(all, total_tokens);
    *offsets = xmalloc((total_samples + 1) * sizeof **offsets);
    (*offsets)[0] = 0;
    uint64_t *next = xcalloc((size_t)size, sizeof *next), *at = xcalloc((size_t)size, sizeof *at);
    uint64_t s = 0;
    for (uint64_t row = 0; row < sh->n_rows && s < total_samples; row++) {
        int r = (int)(row % (uint64_t)size);
        struct share *f = &from[r];
        if (next[r] >= f->n_samples || f->rows[next[r]] != row) continue; /* a bad row */
        uint64_t n = f->lengths[next[r]++];
        memcpy(all->ids + all->n, f->all.ids + at[r], n * sizeof *all->ids);
        memcpy(all->loss_mask + all->n, f->all.loss_mask + at[r], n);
        all->n += n;
        at[r] += n;
        (*offsets)[++s] = all->n;
    }
    *n_samples = s;
    for (int r = 1; r < size; r++) {
        free(from[r].rows);
        free(from[r].lengths);
        token_buffer_free(&from[r].all);
    }
    free(from);
    free(next);
    free(at);
    free(counts);
}

static int by_row(const void *a, const void *b)
{
    uint64_t x = ((const struct note *)a)->row, y = ((const struct note *)b)->row;
    return x < y ? -1 : x > y;
}

/* Fixed-size notes of every rank on rank 0 (n per rank), sorted by row; returns how many
 * of them are in use (the others have row UINT64_MAX). */
static struct note *gather_notes(const struct note *mine, int n_mine, int n, int rank, int size,
                                 int *used)
{
    struct note *send = xcalloc((size_t)n, sizeof *send);
    for (int i = 0; i < n; i++) send[i].row = UINT64_MAX;
    memcpy(send, mine, (size_t)n_mine * sizeof *send);
    struct note *all = rank == 0 ? xcalloc((size_t)n * size, sizeof *all) : NULL;
    check_mpi(MPI_Gather(send, (int)(n * sizeof *send), MPI_BYTE, all, (int)(n * sizeof *send),
                         MPI_BYTE, 0, MPI_COMM_WORLD));
    free(send);
    *used = 0;
    if (rank != 0) return NULL;
    qsort(all, (size_t)n * size, sizeof *all, by_row);
    while (*used < n * size && all[*used].row != UINT64_MAX) (*used)++;
    return all;
}

/* The unused keys, each once at its first row, on rank 0. */
static void report_dropped(struct share *sh, int rank, int size)
{
    uint64_t rows = 0;
    check_mpi(MPI_Reduce(&sh->n_dropping, &rows, 1, MPI_UINT64_T, MPI_SUM, 0, MPI_COMM_WORLD));
    int used;
    struct note *all = gather_notes(sh->dropped, sh->n_dropped, MAX_DROPPED, rank, size, &used);
    if (rank != 0) return;
    for (int i = 0; i < used; i++) {
        char *tab = strchr(all[i].text, '\t');
        if (!tab) continue;
        *tab = '\0';
        bool seen = false;
        for (int k = 0; k < i && !seen; k++) seen = !strcmp(all[k].text, all[i].text);
        if (!seen)
            log_warn("%s: key \"%s\" is not used for training and is dropped (reported once "
                     "per key)", tab + 1, all[i].text);
    }
    if (rows)
        log_warn("prepare: %llu rows had keys dropped", (unsigned long long)rows);
    free(all);
}

/* Every rank's share of the rows. Returns 0, or the exit status with message set on every
 * rank. */
static int prepare_rows(const struct deck *deck, const struct tokenizer *tok, int rank,
                        int size, struct share *sh, char *message, size_t message_size)
{
    const struct deck_prepare *p = &deck->prepare;
    for (int i = 0; i < p->n_inputs; i++) {
        double start = wall_time();
        int status = read_input(deck, tok, i, rank, size, sh, message, message_size);
        /* every rank opened and read the same files: a failure is every rank's */
        int worst = status;
        check_mpi(MPI_Allreduce(&status, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD));
        if (worst != 0) {
            if (status == 0) snprintf(message, message_size, "%s: read error", p->inputs[i]);
            return worst;
        }
        uint64_t counts[3];
        check_mpi(MPI_Reduce(sh->per_file + 3 * i, counts, 3, MPI_UINT64_T, MPI_SUM, 0,
                             MPI_COMM_WORLD));
        if (rank == 0 && p->bad_rows == BAD_ROWS_SKIP)
            log_info("prepare: %s: %llu rows, %llu tokens, %llu bad rows skipped, %.2f s",
                     p->inputs[i], (unsigned long long)counts[0], (unsigned long long)counts[1],
                     (unsigned long long)counts[2], wall_time() - start);
        else if (rank == 0)
            log_info("prepare: %s: %llu rows, %llu tokens, %.2f s", p->inputs[i],
                     (unsigned long long)counts[0], (unsigned long long)counts[1],
                     wall_time() - start);
    }
    int n_bad_notes = sh->n_bad < MAX_WARNINGS + 1 ? (int)sh->n_bad : MAX_WARNINGS + 1;
    int used;
    struct note *bad = gather_notes(sh->bad, n_bad_notes, MAX_WARNINGS + 1, rank, size, &used);
    uint64_t n_bad = 0;
    check_mpi(MPI_Allreduce(&sh->n_bad, &n_bad, 1, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD));
    int status = 0;
    if (rank == 0 && n_bad && p->bad_rows == BAD_ROWS_ABORT) {
        snprintf(message, message_size,
                 "%s (prepare.bad_rows is abort; set it to skip to drop bad rows)", bad[0].text);
        status = EXIT_INPUT;
    } else if (rank == 0 && n_bad) {
        for (int i = 0; i < used && i < MAX_WARNINGS; i++)
            log_warn("%s; row skipped", bad[i].text);
        if (n_bad > MAX_WARNINGS)
            log_warn("%llu more bad rows skipped, not shown",
                     (unsigned long long)(n_bad - MAX_WARNINGS));
    }
    free(bad);
    sh->n_bad = n_bad; /* from here on: every rank's */
    check_mpi(MPI_Bcast(&status, 1, MPI_INT, 0, MPI_COMM_WORLD));
    if (status == 0) report_dropped(sh, rank, size);
    return status;
}

/* Rank 0: the dataset from the gathered samples. Returns 0, or the exit status with
 * message set. */
static int write_dataset(const struct deck *deck, const struct tokenizer *tok,
                         const struct token_buffer *all, const uint64_t *offsets,
                         uint64_t n_samples, uint64_t rows_skipped, double start, char *message,
                         size_t message_size)
{
    const struct deck_prepare *p = &deck->prepare;
    if (make_parent_directory(p->output, message, message_size) != 0) return EXIT_RUNTIME;
    char specials[64] = "";
    if (tok->bos >= 0 || tok->eos >= 0)
        snprintf(specials, sizeof specials, "bos=%lld eos=%lld", (long long)tok->bos,
                 (long long)tok->eos);
    struct dataset_contents contents = {
        .tokens = all->ids,
        .loss_mask = all->loss_mask,
        .n_tokens = all->n,
        .offsets = offsets,
        .n_samples = n_samples,
        .tokenizer = tok->name,
        .tokenizer_checksum = tok->checksum,
        .special_tokens = specials,
        .vocab_size = tok->vocab_size,
        .sources = (const char *const *)p->inputs,
        .n_sources = p->n_inputs,
        .rows_skipped = rows_skipped,
    };
    if (dataset_write(p->output, &contents, message, message_size) != 0) return EXIT_RUNTIME;
    double seconds = wall_time() - start;
    uint64_t loss_tokens = 0, no_loss = 0;
    for (uint64_t i = 0; i < n_samples; i++) {
        uint64_t loss = 0;
        for (uint64_t t = offsets[i]; t < offsets[i + 1]; t++) loss += all->loss_mask[t];
        loss_tokens += loss;
        no_loss += loss == 0;
    }
    /* what the later phases will cut (score, train and eval keep data.seq_len tokens) */
    int seq_len = deck->data.seq_len;
    unsigned long long longer = 0;
    for (uint64_t i = 0; i < n_samples; i++)
        longer += offsets[i + 1] - offsets[i] > (uint64_t)seq_len;
    if (longer)
        log_warn("prepare: %llu of %llu samples are longer than data.seq_len (%d): score, "
                 "train and eval will cut them to it", longer, (unsigned long long)n_samples,
                 seq_len);
    log_info("prepare: %llu samples, %llu tokens (%llu loss-bearing), %llu bad rows skipped, "
             "%llu samples with no loss-bearing token -> %s (%.2f s)",
             (unsigned long long)n_samples, (unsigned long long)all->n,
             (unsigned long long)loss_tokens, (unsigned long long)rows_skipped,
             (unsigned long long)no_loss, p->output, seconds);
    metrics_write("prepare",
                  "\"samples\": %llu, \"tokens\": %llu, \"loss_tokens\": %llu, "
                  "\"rows_skipped\": %llu, \"no_loss_samples\": %llu, \"longer_than_seq_len\": "
                  "%llu, \"seconds\": %.3f",
                  (unsigned long long)n_samples, (unsigned long long)all->n,
                  (unsigned long long)loss_tokens, (unsigned long long)rows_skipped,
                  (unsigned long long)no_loss, longer, seconds);
    return 0;
}

int prepare_first_conversation(const struct deck *deck, int max_rows, char *where,
                               size_t where_size)
{
    int looked = 0;
    for (int i = 0; i < deck->prepare.n_inputs && looked < max_rows; i++) {
        struct jsonl_reader reader;
        char err[512];
        if (jsonl_open(&reader, deck->prepare.inputs[i], err, sizeof err) != 0) continue;
        const char *text;
        size_t length;
        int found = 0;
        while (!found && looked < max_rows &&
               jsonl_next(&reader, &text, &length, err, sizeof err) > 0) {
            looked++;
            struct conversation c;
            if (conversation_parse(text, length, &c, err, sizeof err) != 0) continue;
            found = !c.is_text;
            conversation_free(&c);
        }
        if (found)
            snprintf(where, where_size, "%s:%llu", reader.path,
                     (unsigned long long)reader.line_number);
        jsonl_close(&reader);
        if (found) return 1;
    }
    return 0;
}

int prepare_open_tokenizer(const struct deck *deck, bool model_made, struct tokenizer *tok,
                           char *err, size_t err_size)
{
    const struct deck_prepare *p = &deck->prepare;
    struct tokenizer_options options = {
        .spec = p->tokenizer,
        .model_path = deck->model.path,
        .model_made = model_made,
        .chat_template = p->chat_template,
        .template_kwargs = p->template_kwargs,
        .n_template_kwargs = p->n_template_kwargs,
        .date = p->date,
    };
    char why[2048];
    if (tokenizer_open(tok, &options, why, sizeof why) == 0) return 0;
    char where[4096];
    deck_where(deck, "prepare.tokenizer", where, sizeof where);
    snprintf(err, err_size, "%s: prepare.tokenizer: %s", where, why);
    return -1;
}

/* prepare.inputs into prepare.output. */
static void prepare_dataset(const struct deck *deck)
{
    struct tokenizer tok;
    char err[4096];
    /* Every rank reads the same deck and files, so every rank reaches this verdict. */
    if (prepare_open_tokenizer(deck, false, &tok, err, sizeof err) != 0)
        fatal_all(EXIT_INPUT, "%s", err);
    int rank = 0, size = 1;
    check_mpi(MPI_Comm_rank(MPI_COMM_WORLD, &rank));
    check_mpi(MPI_Comm_size(MPI_COMM_WORLD, &size));
    if (rank == 0)
        log_info("prepare: tokenizer %s (vocabulary %llu%s%s), %s over %d rank%s", tok.name,
                 (unsigned long long)tok.vocab_size, tok.chat ? ", chat template " : "",
                 tok.chat ? tok.chat_name : "",
                 deck->prepare.format == FORMAT_ESFT_REFERENCE ? "ESFT reference layout"
                 : tok.hf                                      ? "chat template"
                                                               : "fixed chat layout",
                 size, size == 1 ? "" : "s");
    double start = wall_time();
    struct share *sh = xcalloc(1, sizeof *sh);
    sh->per_file = xcalloc(3 * (size_t)deck->prepare.n_inputs, sizeof *sh->per_file);
    char *message = xcalloc(1, MESSAGE_SIZE);
    int status = prepare_rows(deck, &tok, rank, size, sh, message, MESSAGE_SIZE);
    struct token_buffer all = {0};
    uint64_t *offsets = NULL, n_samples = 0;
    if (status == 0) {
        gather_samples(sh, rank, size, &all, &offsets, &n_samples);
        if (rank == 0 && n_samples == 0) {
            snprintf(message, MESSAGE_SIZE,
                     "prepare: no usable row in prepare.inputs (%llu bad rows skipped); nothing "
                     "to write to %s",
                     (unsigned long long)sh->n_bad, deck->prepare.output);
            status = EXIT_INPUT;
        } else if (rank == 0) {
            status = write_dataset(deck, &tok, &all, offsets, n_samples, sh->n_bad, start,
                                   message, MESSAGE_SIZE);
        }
    }
    check_mpi(MPI_Bcast(&status, 1, MPI_INT, 0, MPI_COMM_WORLD));
    if (status != 0) fatal_all(status, "%s", message);
    token_buffer_free(&all);
    token_buffer_free(&sh->all);
    free(offsets);
    free(sh->rows);
    free(sh->lengths);
    free(sh->per_file);
    free(sh);
    free(message);
    tokenizer_close(&tok);
}

int phase_prepare(const struct deck *deck, const struct layout *layout)
{
    (void)layout;
    prepare_dataset(deck);
    if (deck->prepare.n_extra_inputs == 0) return 0;
    /* the second dataset: the same tokenizer, format and template over other rows */
    struct deck extra = *deck;
    memcpy(extra.prepare.inputs, deck->prepare.extra_inputs, sizeof extra.prepare.inputs);
    extra.prepare.n_inputs = deck->prepare.n_extra_inputs;
    extra.prepare.output = deck->prepare.extra_output;
    prepare_dataset(&extra);
    return 0;
}
