/* test_fatal: the helper program of the fatal-error test in tests/test-cli.sh.
 *
 *   test_fatal MODE
 *   MODE last-rank: every rank but the last waits in a barrier, the last calls fatal():
 *                   the job must end (MPI_Abort) with status 1 and one message naming
 *                   the failing rank, and not hang.
 *   MODE all:       every rank calls fatal_all(2, ...): status 2, one message. */
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
    if (argc > 1 && strcmp(argv[1], "all") == 0)
        fatal_all(EXIT_INPUT, "every rank found the same problem");
    if (rank == size - 1) {
        /* the others are waiting in the barrier by now */
        nanosleep(&(struct timespec){.tv_sec = 0, .tv_nsec = 200000000}, NULL);
        fatal(EXIT_RUNTIME, "deliberate failure on the last rank");
    }
    MPI_Barrier(MPI_COMM_WORLD);
    MPI_Finalize();
    return 0;
}
