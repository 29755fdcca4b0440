/* version: the --version report. Library versions are asked of the libraries at run
 * time (not copied from configure), so a binary moved to another machine reports what
 * it really loaded. */
#include "version.h"

#include <hdf5.h>
#include <jansson.h>
#include <mpi.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <yaml.h>

#include "blas.h"
#include "config.h"
#ifdef HAVE_CUDA
#include "device.h"
#endif


void version_print(FILE *out)
{
    fprintf(out, "%s\n", PACKAGE_STRING);
#ifdef HAVE_CUDA
    fprintf(out, "backends: cpu, cpu-devsim, cuda (built with CUDA %s for sm %s)\n", ESFT_BUILD_CUDA,
            ESFT_BUILD_CUDA_ARCH);
#else
    fprintf(out, "backends: cpu, cpu-devsim (built without CUDA)\n");
#endif
    char mpi[MPI_MAX_LIBRARY_VERSION_STRING];
    int length = 0;
    MPI_Get_library_version(mpi, &length);
    char *newline = strchr(mpi, '\n');
    if (newline) *newline = '\0';
    fprintf(out, "MPI: %s\n", mpi);
    unsigned major = 0, minor = 0, release = 0;
    H5get_libversion(&major, &minor, &release);
    fprintf(out, "HDF5: %u.%u.%u%s\n", major, minor, release,
#ifdef H5_HAVE_PARALLEL
            " (parallel)"
#else
            " (serial)"
#endif
    );
    fprintf(out, "libyaml: %s\n", yaml_get_version_string());
    fprintf(out, "jansson: %s\n", jansson_version_str());
    fprintf(out, "BLAS: %s\n", blas_description());
    const char *policy = getenv("OMP_WAIT_POLICY"), *spins = getenv("GOMP_SPINCOUNT");
    fprintf(out, "OpenMP: up to %d threads, wait policy %s%s%s\n", omp_get_max_threads(),
            policy ? policy : "default", spins ? ", GOMP_SPINCOUNT " : "", spins ? spins : "");
#ifdef HAVE_CUDA
    device_print_info(out);
#endif
}
