/* log: see log.h. Progress goes to stdout from rank 0; warnings and errors go to stderr
 * from the rank that has them, so a message is printed once and names its rank. */
#include "log.h"

#include "files.h"

#include <errno.h>
#include <mpi.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>

static int world_rank = 0;
static int world_size = 1;
static FILE *metrics_file = NULL;
static double metrics_start = 0.0;

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
    if (metrics_file) fflush(metrics_file);
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
    metrics_close();
    if (mpi_active()) MPI_Finalize();
    exit(code);
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
    int first = failed ? world_rank : world_size;
    check_mpi(MPI_Allreduce(MPI_IN_PLACE, &first, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD));
    if (first == world_size) return;
    if (first != 0) check_mpi(MPI_Bcast(message, sizeof message, MPI_CHAR, first, MPI_COMM_WORLD));
    if (first == 0) fatal_all(code, "%s", message);
    fatal_all(code, "rank %d: %s", first, message);
}

void check_mpi_failed(int err, const char *call, const char *file, int line)
{
    char message[MPI_MAX_ERROR_STRING] = "";
    int length = 0;
    if (MPI_Error_string(err, message, &length) != MPI_SUCCESS)
        snprintf(message, sizeof message, "MPI error %d", err);
    fatal(EXIT_RUNTIME, "%s:%d: %s failed: %s", file, line, call, message);
}

void *xmalloc_at(size_t size, const char *file, int line)
{
    void *p = malloc(size ? size : 1);
    if (!p) fatal(EXIT_RUNTIME, "%s:%d: out of memory allocating %zu bytes", file, line, size);
    return p;
}

void *xcalloc_at(size_t count, size_t size, const char *file, int line)
{
    void *p = calloc(count ? count : 1, size ? size : 1);
    if (!p)
        fatal(EXIT_RUNTIME, "%s:%d: out of memory allocating %zu x %zu bytes", file, line,
              count, size);
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


/* The file is created at the first event after "start", so a run refused before it did
 * anything leaves no output directory behind; the start line waits in a buffer. */
static char metrics_path[4096];
static char metrics_pending[8192];

void metrics_open(const char *output_dir)
{
    metrics_start = wall_time();
    if (world_rank != 0) return;
    snprintf(metrics_path, sizeof metrics_path, "%s", output_dir);
    metrics_pending[0] = '\0';
}

static void metrics_create(void)
{
    if (make_directories(metrics_path) != 0)
        fatal(EXIT_RUNTIME, "cannot create output directory %s: %s", metrics_path,
              strerror(errno));
    char path[4200];
    snprintf(path, sizeof path, "%s/metrics.jsonl", metrics_path);
    metrics_file = fopen(path, "a");
    if (!metrics_file) fatal(EXIT_RUNTIME, "cannot open %s: %s", path, strerror(errno));
    fputs(metrics_pending, metrics_file);
    metrics_pending[0] = '\0';
}

void metrics_write(const char *event, const char *fields_fmt, ...)
{
    if (world_rank != 0 || !metrics_path[0]) return;
    if (!metrics_file && strcmp(event, "start") == 0) {
        size_t used = strlen(metrics_pending);
        int n = snprintf(metrics_pending + used, sizeof metrics_pending - used,
                         "{\"time\": 0.000, \"event\": \"start\"");
        va_list args;
        va_start(args, fields_fmt);
        if (n > 0 && fields_fmt && fields_fmt[0]) {
            used = strlen(metrics_pending);
            snprintf(metrics_pending + used, sizeof metrics_pending - used, ", ");
            used = strlen(metrics_pending);
            vsnprintf(metrics_pending + used, sizeof metrics_pending - used, fields_fmt, args);
        }
        va_end(args);
        used = strlen(metrics_pending);
        snprintf(metrics_pending + used, sizeof metrics_pending - used, "}\n");
        return;
    }
    if (!metrics_file) metrics_create();
    fprintf(metrics_file, "{\"time\": %.3f, \"event\": \"%s\"", wall_time() - metrics_start,
            event);
    if (fields_fmt && fields_fmt[0]) {
        va_list args;
        va_start(args, fields_fmt);
        fputs(", ", metrics_file);
        vfprintf(metrics_file, fields_fmt, args);
        va_end(args);
    }
    fputs("}\n", metrics_file);
    fflush(metrics_file);
}

void metrics_close(void)
{
    if (metrics_file) fclose(metrics_file);
    metrics_file = NULL;
    metrics_path[0] = '\0';
}
