/* version: what this esft binary is and which libraries it runs with (--version). */
#ifndef ESFT_VERSION_H
#define ESFT_VERSION_H

#include <stdio.h>

/* Program version, backend and the run-time versions of MPI, HDF5, libyaml, jansson,
 * the BLAS and, in the CUDA build, the CUDA runtime, driver and visible devices. */
void version_print(FILE *out);

#endif
