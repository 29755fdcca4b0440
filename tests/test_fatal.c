/* test_fatal: the helper program of the fatal-error test in tests/test-cli.sh.
 *
 *   test_fatal MODE
 *   MODE last-rank: every rank but the last waits in a barrier, the last calls fatal():
 *                   the job must end (MPI_Abort) with status 1 and one message naming
 *                   the failing rank, and not hang.
 *   MODE all:       every rank calls fatal_all(2, ...): status 2, one message.
 *   MODE some:      every rank but rank 0 fails in fail_if_any(2, ...): status 2, one
 *                   message, rank 1's, naming rank 1.
 *   MODE first:     every rank fails in fail_if_any(2, ...): rank 0's message, without a
 *                   rank number.
 *   MODE none:      no rank fails in fail_if_any: it returns, status 0. */
#include <mpi.h>
#include <string.h>
#include <time.h>

#include "log.h"

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    int rank, size;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    log_init(rank, size);
    const char *mode = argc > 1 ? argv[1] : "last-rank";
    if (strcmp(mode, "all") == 0) fatal_all(EXIT_INPUT, "every rank found the same problem");
    if (strcmp(mode, "some") == 0 || strcmp(mode, "first") == 0 || strcmp(mode, "none") == 0) {
        int failed = strcmp(mode, "first") == 0 || (strcmp(mode, "some") == 0 && rank > 0);
        fail_if_any(failed, EXIT_INPUT, "rank %d's own reason", rank);
        MPI_Finalize();
        return 0;
    }
    if (rank == size - 1) {
        /* the others are waiting in the barrier by now */
        nanosleep(&(struct timespec){.tv_sec = 0, .tv_nsec = 200000000}, NULL);
        fatal(EXIT_RUNTIME, "deliberate failure on the last rank");
    }
    MPI_Barrier(MPI_COMM_WORLD);
    MPI_Finalize();
    return 0;
}
