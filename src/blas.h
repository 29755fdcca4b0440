/* blas: the CBLAS the CPU backend's GEMMs run on, chosen at configure time
 * (--with-blas=openblas, the default; blis; or another CBLAS the user names). The CPU
 * backend calls it from inside OpenMP's loops, one call per block of a fixed shape, so
 * the library itself must run single-threaded: that is what keeps the results bitwise
 * the same for any thread count (cpu_ops.c's banner). */
#ifndef ESFT_BLAS_H
#define ESFT_BLAS_H

#include <stddef.h>

/* Make the library run each call on the calling thread alone (OpenBLAS and BLIS; for
 * another library its own setting does it, e.g. MKL_NUM_THREADS=1: README). */
void blas_use_one_thread(void);

/* One line naming the library, its version and build as it reports them at run time
 * (OpenBLAS's configuration string, BLIS's version and kernel set), or the link flags
 * configure was given for another library. */
const char *blas_description(void);

#endif
