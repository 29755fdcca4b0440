/* log: progress lines, warnings, fatal errors that end every rank, the checking macros,
 * checked allocation, and the run's metrics file (JSON lines).
 *
 * Exit codes used by the whole program (see README, "Exit status"):
 *   0 success, 1 runtime failure (I/O, MPI, CUDA, numerics), 2 bad input (deck, layout,
 *   files a user supplied), 3 stopped by a signal after writing a checkpoint: resumable
 *   (job scripts requeue on it). */
#ifndef ESFT_LOG_H
#define ESFT_LOG_H

#include <mpi.h>
#include <stddef.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

#define EXIT_RUNTIME 1
#define EXIT_INPUT 2
#define EXIT_STOPPED 3

/* Set once by main, after MPI_Init: the world rank is printed in error messages. */
void log_init(int world_rank, int world_size);
int log_rank(void);

/* Rank 0 only, to stdout, flushed: "esft: message". */
void log_info(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Any rank, to stderr: "esft: warning: message" (rank 0) or "esft: rank N: warning: ...". */
void log_warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* This rank alone found an error: print it once with the rank number and end every rank
 * through MPI_Abort(MPI_COMM_WORLD, code) (plain exit when MPI is not initialised). */
__attribute__((noreturn)) void fatal(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Every rank reached the same error on the same data (a bad deck, a bad layout): rank 0
 * prints "esft: message", every rank finalises MPI and exits with code. Must be called
 * by all ranks of MPI_COMM_WORLD, else it hangs: use fatal() when unsure. */
__attribute__((noreturn)) void fatal_all(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* An error that only some ranks may have found (a tensor one EP rank loads, a file one
 * rank reads). Collective over MPI_COMM_WORLD: every rank says whether it failed, and when
 * none did, it returns. Otherwise the message of the lowest-numbered failing rank
 * (formatted from fmt on that rank; the others' fmt is not used) travels to rank 0, which
 * prints it once, "esft: rank N: message" ("esft: message" when N is 0), and every rank
 * finalises MPI and exits with code, as fatal_all: no MPI_Abort, no rank left waiting. */
void fail_if_any(int failed, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

/* The verdict of fail_if_any without leaving: collective over comm, 0 when every rank's
 * status is 0; otherwise, on every rank, the status of the lowest-numbered failing rank
 * and its message in err, prefixed "rank N: " (N its world rank) unless N is 0. */
int ranks_agree(int status, char *err, size_t err_size, MPI_Comm comm);

/* Checking macros: report file, line and the library's message, then fatal(). */
void check_mpi_failed(int err, const char *call, const char *file, int line);
#define check_mpi(call)                                                                  \
    do {                                                                                 \
        int check_mpi_err_ = (call);                                                     \
        if (check_mpi_err_ != 0) check_mpi_failed(check_mpi_err_, #call, __FILE__, __LINE__); \
    } while (0)

void *xmalloc_at(size_t size, const char *file, int line);
void *xcalloc_at(size_t count, size_t size, const char *file, int line);
char *xstrdup_at(const char *s, const char *file, int line);
#define xmalloc(size) xmalloc_at((size), __FILE__, __LINE__)
#define xcalloc(count, size) xcalloc_at((count), (size), __FILE__, __LINE__)
#define xstrdup(s) xstrdup_at((s), __FILE__, __LINE__)

/* A host buffer kept between calls and grown to the largest size asked, so that a loop
 * allocates only when a call needs more than any call before it (its first). For the
 * scratch of code called from one thread at a time; kept_zeroed also zeroes the bytes. */
struct kept {
    void *p;
    size_t bytes;
};
#define kept_buffer(k, bytes) kept_buffer_at((k), (bytes), __FILE__, __LINE__)
#define kept_zeroed(k, bytes) kept_zeroed_at((k), (bytes), __FILE__, __LINE__)
void *kept_buffer_at(struct kept *k, size_t bytes, const char *file, int line);
void *kept_zeroed_at(struct kept *k, size_t bytes, const char *file, int line);

/* The allocation watch: between alloc_watch_start and alloc_watch_stop (the train step
 * loop's body), every xmalloc / xcalloc / xstrdup and every backend buffer allocation
 * (alloc_watch_note) is counted; alloc_watch_stop returns the count. With ESFT_ALLOC_TRACE=1
 * the first 64 are logged with their file and line. STYLE.md: the step loop allocates
 * nothing, and the step events of metrics.jsonl carry the count to show it. */
void alloc_watch_start(void);
long long alloc_watch_stop(void);
void alloc_watch_note(size_t bytes, const char *file, int line);

/* Metrics: one JSON object per line in OUTPUT_DIR/metrics.jsonl, written by rank 0
 * only (other ranks' calls do nothing). metrics_open creates output_dir if needed. */
void metrics_open(const char *output_dir);
/* Writes {"time": seconds since metrics_open, "wall_time": "UTC ISO 8601", "run_id":
 * "...", "event": event, <fields>} where fields is a printf-formatted fragment of JSON
 * members, e.g. "\"step\": %d, \"loss\": %.6f". A non-finite number printed there
 * (nan, inf) is written as null: every line is valid JSON. */
void metrics_write(const char *event, const char *fields_fmt, ...)
    __attribute__((format(printf, 2, 3)));
void metrics_close(void);
/* This host's name (gethostname; "" when unknown), with the bytes a JSON string would
 * need escaped replaced by '-', as metrics start lines write it. */
void host_name(char *buf, size_t size);
/* The start time of process pid (field 22 of /proc/PID/stat: clock ticks after boot),
 * which with the pid names one process for as long as the machine runs. 0, or -1 when no
 * such process is there (or no /proc). For the start line's process identity, which
 * sweep summaries check to tell a killed run from a running one. */
int process_start_ticks(long pid, unsigned long long *ticks);
/* This run's id (rank 0; empty elsewhere): UTC start time and process id. */
const char *metrics_run(void);
/* A copy of text (to free) with printf's nan, -nan, inf, -inf outside JSON strings
 * written as null. */
char *json_null_nonfinite(const char *text);

/* Seconds from a monotonic clock. */
double wall_time(void);

/* A duration for people: "42 s", "12m05s", "3h07m" ("?" when not finite). */
struct duration_text {
    char text[32];
};
struct duration_text duration_text(double seconds);

#ifdef __cplusplus
}
#endif

#endif
