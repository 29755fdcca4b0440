/* log: see log.h. Progress goes to stdout from rank 0; warnings and errors go to stderr
 * from the rank that has them, so a message is printed once and names its rank. */
#include "log.h"

#include "files.h"

#include <ctype.h>
#include <errno.h>
#include <mpi.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static int world_rank = 0;
static int world_size = 1;
static FILE *metrics_file = NULL;
static double metrics_start = 0.0;
static void metrics_end(int status);

void log_init(int rank, int size)
{
    world_rank = rank;
    world_size = size;
}

int log_rank(void) { return world_rank; }

static int mpi_active(void)
{
    int initialized = 0, finalized = 0;
    MPI_Initialized(&initialized);
    MPI_Finalized(&finalized);
    return initialized && !finalized;
}

/* "esft: " on rank 0 of a one-rank run, "esft: rank N: " otherwise. */
static void print_prefix(FILE *out, int with_rank)
{
    if (with_rank && world_size > 1)
        fprintf(out, "esft: rank %d: ", world_rank);
    else
        fprintf(out, "esft: ");
}

void log_info(const char *fmt, ...)
{
    if (world_rank != 0) return;
    va_list args;
    va_start(args, fmt);
    fputs("esft: ", stdout);
    vfprintf(stdout, fmt, args);
    fputc('\n', stdout);
    fflush(stdout);
    va_end(args);
}

void log_warn(const char *fmt, ...)
{
    va_list args;
    va_start(args, fmt);
    print_prefix(stderr, 1);
    fputs("warning: ", stderr);
    vfprintf(stderr, fmt, args);
    fputc('\n', stderr);
    fflush(stderr);
    va_end(args);
}

void fatal(int code, const char *fmt, ...)
{
    va_list args;
    va_start(args, fmt);
    fflush(stdout);
    print_prefix(stderr, 1);
    fputs("error: ", stderr);
    vfprintf(stderr, fmt, args);
    fputc('\n', stderr);
    fflush(stderr);
    va_end(args);
    metrics_end(code); /* this rank's file, if it writes one (rank 0) */
    if (mpi_active() && world_size > 1) MPI_Abort(MPI_COMM_WORLD, code);
    if (mpi_active()) MPI_Finalize();
    exit(code);
}

void fatal_all(int code, const char *fmt, ...)
{
    if (world_rank == 0) {
        va_list args;
        va_start(args, fmt);
        fflush(stdout);
        fputs("esft: ", stderr);
        vfprintf(stderr, fmt, args);
        fputc('\n', stderr);
        fflush(stderr);
        va_end(args);
    }
    metrics_end(code);
    metrics_close();
    if (mpi_active()) MPI_Finalize();
    exit(code);
}

int ranks_agree(int status, char *err, size_t err_size, MPI_Comm comm)
{
    int rank = 0, size = 1;
    check_mpi(MPI_Comm_rank(comm, &rank));
    check_mpi(MPI_Comm_size(comm, &size));
    int first = status != 0 ? rank : size;
    check_mpi(MPI_Allreduce(MPI_IN_PLACE, &first, 1, MPI_INT, MPI_MIN, comm));
    if (first == size) return 0;
    char message[8192] = "";
    if (rank == first) snprintf(message, sizeof message, "%s", err);
    check_mpi(MPI_Bcast(&status, 1, MPI_INT, first, comm));
    check_mpi(MPI_Bcast(message, sizeof message, MPI_CHAR, first, comm));
    int world = 0;
    if (first != 0) { /* name the failing rank as the user knows it: its world rank */
        MPI_Group group, world_group;
        check_mpi(MPI_Comm_group(comm, &group));
        check_mpi(MPI_Comm_group(MPI_COMM_WORLD, &world_group));
        check_mpi(MPI_Group_translate_ranks(group, 1, &first, world_group, &world));
        MPI_Group_free(&group);
        MPI_Group_free(&world_group);
    }
    if (world != 0)
        snprintf(err, err_size, "rank %d: %s", world, message);
    else
        snprintf(err, err_size, "%s", message);
    return status;
}

void fail_if_any(int failed, int code, const char *fmt, ...)
{
    char message[8192] = "";
    if (failed) {
        va_list args;
        va_start(args, fmt);
        vsnprintf(message, sizeof message, fmt, args);
        va_end(args);
    }
    if (!mpi_active() || world_size == 1) {
        if (failed) fatal_all(code, "%s", message);
        return;
    }
    if (ranks_agree(failed ? code : 0, message, sizeof message, MPI_COMM_WORLD) != 0)
        fatal_all(code, "%s", message);
}

void check_mpi_failed(int err, const char *call, const char *file, int line)
{
    char message[MPI_MAX_ERROR_STRING] = "";
    int length = 0;
    if (MPI_Error_string(err, message, &length) != MPI_SUCCESS)
        snprintf(message, sizeof message, "MPI error %d", err);
    fatal(EXIT_RUNTIME, "%s:%d: %s failed: %s", file, line, call, message);
}

/* The allocation watch (log.h): a count of the checked allocations made while it is on,
 * the first places named when ESFT_ALLOC_TRACE is set. Atomic: ops allocate inside
 * OpenMP regions. */
static bool watch_on;
static bool watch_trace;
static long long watch_count;

void alloc_watch_start(void)
{
    const char *trace = getenv("ESFT_ALLOC_TRACE");
    watch_trace = trace && *trace && strcmp(trace, "0") != 0;
    __atomic_store_n(&watch_count, 0, __ATOMIC_RELAXED);
    watch_on = true;
}

long long alloc_watch_stop(void)
{
    watch_on = false;
    return __atomic_load_n(&watch_count, __ATOMIC_RELAXED);
}

static void watch(size_t bytes, const char *file, int line)
{
    if (!watch_on) return;
    long long n = __atomic_fetch_add(&watch_count, 1, __ATOMIC_RELAXED);
    if (watch_trace && n < 64) log_info("allocation in the step loop: %zu bytes at %s:%d", bytes, file, line);
}

void alloc_watch_note(size_t bytes, const char *file, int line)
{
    watch(bytes, file, line);
}

void *xmalloc_at(size_t size, const char *file, int line)
{
    watch(size, file, line);
    void *p = malloc(size ? size : 1);
    if (!p) fatal(EXIT_RUNTIME, "%s:%d: out of memory allocating %zu bytes", file, line, size);
    return p;
}

void *xcalloc_at(size_t count, size_t size, const char *file, int line)
{
    watch(count * size, file, line);
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p)
        fatal(EXIT_RUNTIME, "%s:%d: out of memory allocating %zu x %zu bytes", file, line,
              count, size);
    return p;
}

void *kept_buffer_at(struct kept *k, size_t bytes, const char *file, int line)
{
    if (bytes > k->bytes || !k->p) {
        free(k->p);
        k->p = xmalloc_at(bytes, file, line);
        k->bytes = bytes;
    }
    return k->p;
}

void *kept_zeroed_at(struct kept *k, size_t bytes, const char *file, int line)
{
    void *p = kept_buffer_at(k, bytes, file, line);
    memset(p, 0, bytes);
    return p;
}

char *xstrdup_at(const char *s, const char *file, int line)
{
    size_t n = strlen(s) + 1;
    char *p = xmalloc_at(n, file, line);
    memcpy(p, s, n);
    return p;
}

double wall_time(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

struct duration_text duration_text(double seconds)
{
    struct duration_text d;
    if (!(seconds >= 0) || seconds > 1e9) {
        snprintf(d.text, sizeof d.text, "?");
    } else if (seconds < 60) {
        snprintf(d.text, sizeof d.text, "%.0f s", seconds);
    } else if (seconds < 3600) {
        long s = (long)(seconds + 0.5);
        snprintf(d.text, sizeof d.text, "%ldm%02lds", s / 60, s % 60);
    } else {
        long m = (long)(seconds / 60 + 0.5);
        snprintf(d.text, sizeof d.text, "%ldh%02ldm", m / 60, m % 60);
    }
    return d;
}

/* The file is created at the first event after "start", so a run refused before it did
 * anything leaves no output directory behind; the start line waits in a buffer. Every
 * line carries the wall-clock time (UTC) and the run id (UTC start time and process id
 * of rank 0), so the segments of a resumed run can be told apart in one file. */
static char metrics_path[4096];
static char *metrics_pending;
static char metrics_run_id[64];

void metrics_open(const char *output_dir)
{
    metrics_start = wall_time();
    if (world_rank != 0) return;
    snprintf(metrics_path, sizeof metrics_path, "%s", output_dir);
    free(metrics_pending);
    metrics_pending = NULL;
    time_t now = time(NULL);
    struct tm utc;
    gmtime_r(&now, &utc);
    char stamp[32];
    strftime(stamp, sizeof stamp, "%Y%m%dT%H%M%SZ", &utc);
    snprintf(metrics_run_id, sizeof metrics_run_id, "%s-%ld", stamp, (long)getpid());
}

const char *metrics_run(void) { return metrics_run_id; }

static void metrics_create(void)
{
    if (make_directories(metrics_path) != 0)
        fatal(EXIT_RUNTIME, "cannot create output directory %s: %s", metrics_path,
              strerror(errno));
    char path[4200];
    snprintf(path, sizeof path, "%s/metrics.jsonl", metrics_path);
    metrics_file = fopen(path, "a");
    if (!metrics_file) fatal(EXIT_RUNTIME, "cannot open %s: %s", path, strerror(errno));
    if (metrics_pending) fputs(metrics_pending, metrics_file);
    free(metrics_pending);
    metrics_pending = NULL;
}

/* printf into a new buffer. */
static char *format_new(const char *fmt, va_list args)
{
    va_list again;
    va_copy(again, args);
    int n = vsnprintf(NULL, 0, fmt, args);
    char *text = n >= 0 ? malloc((size_t)n + 1) : NULL;
    if (!text) fatal(EXIT_RUNTIME, "out of memory (metrics line)");
    vsnprintf(text, (size_t)n + 1, fmt, again);
    va_end(again);
    return text;
}

static char *format_new_of(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static char *format_new_of(const char *fmt, ...)
{
    va_list args;
    va_start(args, fmt);
    char *text = format_new(fmt, args);
    va_end(args);
    return text;
}

/* JSON has no NaN or infinity: printf's nan, -nan, inf and -inf outside strings become
 * null, so that every reader accepts every line. */
char *json_null_nonfinite(const char *text)
{
    char *result = xmalloc(2 * strlen(text) + 1); /* "nan" -> "null" grows by a third */
    char *out = result;
    bool in_string = false;
    for (const char *c = text; *c;) {
        if (in_string) {
            if (*c == '\\' && c[1]) *out++ = *c++;
            else if (*c == '"') in_string = false;
            *out++ = *c++;
            continue;
        }
        if (*c == '"') {
            in_string = true;
            *out++ = *c++;
            continue;
        }
        const char *word = c + (*c == '-' || *c == '+');
        size_t n = 0;
        if (strncmp(word, "nan", 3) == 0 || strncmp(word, "inf", 3) == 0) n = 3;
        if (n && strncmp(word, "infinity", 8) == 0) n = 8;
        bool alone = n && (c == text || !isalnum((unsigned char)c[-1])) &&
                     !isalnum((unsigned char)word[n]);
        if (alone) {
            memcpy(out, "null", 4);
            out += 4;
            c = word + n;
            continue;
        }
        *out++ = *c++;
    }
    *out = '\0';
    return result;
}

void metrics_write(const char *event, const char *fields_fmt, ...)
{
    if (world_rank != 0 || !metrics_path[0]) return;
    char *fields = NULL;
    if (fields_fmt && fields_fmt[0]) {
        va_list args;
        va_start(args, fields_fmt);
        char *raw = format_new(fields_fmt, args);
        va_end(args);
        fields = json_null_nonfinite(raw);
        free(raw);
    }
    time_t now = time(NULL);
    struct tm utc;
    gmtime_r(&now, &utc);
    char stamp[32];
    strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%SZ", &utc);
    char *line = format_new_of("{\"time\": %.3f, \"wall_time\": \"%s\", \"run_id\": \"%s\", "
                               "\"event\": \"%s\"%s%s}\n", wall_time() - metrics_start, stamp,
                               metrics_run_id, event, fields ? ", " : "", fields ? fields : "");
    free(fields);
    if (!metrics_file && strcmp(event, "start") == 0) {
        size_t old = metrics_pending ? strlen(metrics_pending) : 0;
        metrics_pending = realloc(metrics_pending, old + strlen(line) + 1);
        if (!metrics_pending) fatal(EXIT_RUNTIME, "out of memory (metrics line)");
        strcpy(metrics_pending + old, line);
        free(line);
        return;
    }
    if (!metrics_file) metrics_create();
    fputs(line, metrics_file);
    fflush(metrics_file);
    free(line);
}

/* The "end" line of a run that fails: written only where the file exists (a run refused
 * before its first event leaves none), so that a clean failure never reads as a run
 * still going (sweep summaries). */
static void metrics_end(int status)
{
    if (!metrics_file) return;
    metrics_write("end", "\"status\": %d", status);
    fflush(metrics_file);
}

void host_name(char *buf, size_t size)
{
    if (size == 0) return;
    if (gethostname(buf, size) != 0) buf[0] = '\0';
    buf[size - 1] = '\0';
    for (char *c = buf; *c; c++) /* kept as plain JSON string content */
        if (*c == '"' || *c == '\\' || (unsigned char)*c < 0x20) *c = '-';
}

int process_start_ticks(long pid, unsigned long long *ticks)
{
    char path[64], text[1024];
    snprintf(path, sizeof path, "/proc/%ld/stat", pid);
    FILE *file = fopen(path, "r");
    if (!file) return -1;
    size_t n = fread(text, 1, sizeof text - 1, file);
    fclose(file);
    text[n] = '\0';
    /* field 2 is the command in parentheses (it may hold spaces): count after its end */
    const char *field = strrchr(text, ')');
    if (!field) return -1;
    for (int i = 2; i < 22 && field; i++) field = strchr(field + 1, ' ');
    if (!field || sscanf(field, " %llu", ticks) != 1) return -1;
    return 0;
}

void metrics_close(void)
{
    if (metrics_file) fclose(metrics_file);
    metrics_file = NULL;
    metrics_path[0] = '\0';
}
