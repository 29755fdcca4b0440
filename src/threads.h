/* threads: how many OpenMP threads each rank runs, and how they wait, so that a node
 * whose cores are shared (other jobs, or more ranks than cores) slows down in proportion
 * instead of collapsing.
 *
 * OpenMP threads that busy-wait between parallel regions (libgomp's default: about
 * 300,000 spins) keep their cores while they wait; when another process wants those
 * cores, the waiting threads and the thread they wait for take turns, and a step can
 * take ten times as long (measured on the demo: README, "Threads"). esft therefore
 * runs with the passive wait policy unless the user chose one (OMP_WAIT_POLICY or
 * GOMP_SPINCOUNT), and gives the ranks of a node no more threads together than the node
 * has cores (unless OMP_NUM_THREADS says otherwise). */
#ifndef ESFT_THREADS_H
#define ESFT_THREADS_H

#include <mpi.h>

/* Before MPI_Init: libgomp reads its wait policy when it is loaded, before main, so
 * unless the user set one, the program starts itself again with OMP_WAIT_POLICY=passive
 * (same process, same arguments; ESFT_WAIT_POLICY_SET marks the second start). Returns
 * only when no restart was needed or exec failed. */
void threads_set_wait_policy(char **argv);

/* After MPI_Init: unless OMP_NUM_THREADS is set, each rank of a node runs
 * max(1, cores it may use / ranks on the node sharing them) threads. Returns the count. */
int threads_choose(MPI_Comm world);

#endif
