/* threads: OpenMP thread count and wait policy per rank (see threads.h). */
#define _GNU_SOURCE /* sched_getaffinity, CPU_COUNT */
#include "threads.h"

#include <omp.h>
#include <sched.h>
#include <stdlib.h>
#include <unistd.h>

void threads_set_wait_policy(char **argv)
{
    if (getenv("OMP_WAIT_POLICY") || getenv("GOMP_SPINCOUNT") || getenv("ESFT_WAIT_POLICY_SET"))
        return;
    if (setenv("OMP_WAIT_POLICY", "passive", 1) != 0 ||
        setenv("ESFT_WAIT_POLICY_SET", "1", 1) != 0)
        return;
    execv("/proc/self/exe", argv);
    /* no /proc (or exec refused): go on with libgomp's default */
}

/* CPUs this process may run on. */
static int usable_cpus(void)
{
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0) return CPU_COUNT(&set);
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

int threads_choose(MPI_Comm world)
{
    if (getenv("OMP_NUM_THREADS")) return omp_get_max_threads();
    /* the ranks of this node, and how many of them share this rank's CPUs: a launcher
     * that binds each rank to its own cores leaves every mask apart */
    MPI_Comm node;
    if (MPI_Comm_split_type(world, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node) != MPI_SUCCESS)
        return omp_get_max_threads();
    int on_node = 1;
    MPI_Comm_size(node, &on_node);
    cpu_set_t mine;
    int sharing = on_node;
    if (sched_getaffinity(0, sizeof mine, &mine) == 0) {
        cpu_set_t *all = malloc((size_t)on_node * sizeof *all);
        if (all && MPI_Allgather(&mine, sizeof mine, MPI_BYTE, all, sizeof mine, MPI_BYTE, node) ==
                       MPI_SUCCESS) {
            sharing = 0;
            for (int r = 0; r < on_node; r++) {
                cpu_set_t both;
                CPU_AND(&both, &mine, &all[r]);
                sharing += CPU_COUNT(&both) > 0;
            }
        }
        free(all);
    }
    MPI_Comm_free(&node);
    int threads = usable_cpus() / (sharing > 0 ? sharing : 1);
    if (threads < 1) threads = 1;
    omp_set_num_threads(threads);
    return threads;
}
