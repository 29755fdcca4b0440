/* blas: the configured CBLAS's thread setting and description (see blas.h). */
#include "blas.h"

#include <stdio.h>

#include "config.h"

#if defined(ESFT_BLAS_OPENBLAS)
/* OpenBLAS's own controls; declared here because not every cblas.h declares them. */
void openblas_set_num_threads(int threads);
char *openblas_get_config(void);
#elif defined(ESFT_BLAS_BLIS)
#include <blis.h>
#endif

void blas_use_one_thread(void)
{
#if defined(ESFT_BLAS_OPENBLAS)
    openblas_set_num_threads(1);
#elif defined(ESFT_BLAS_BLIS)
    bli_thread_set_num_threads(1);
#endif
}

const char *blas_description(void)
{
    static char text[256];
#if defined(ESFT_BLAS_OPENBLAS)
    snprintf(text, sizeof text, "%s", openblas_get_config()); /* "OpenBLAS 0.3.21 ..." */
#elif defined(ESFT_BLAS_BLIS)
    snprintf(text, sizeof text, "BLIS %s (kernels %s, threading %s)", bli_info_get_version_str(),
             bli_arch_string(bli_arch_query_id()), bli_info_get_enable_openmp() ? "openmp"
             : bli_info_get_enable_pthreads() ? "pthreads" : "none");
#else
    snprintf(text, sizeof text, "%s (its thread count is the library's own setting)",
             ESFT_BUILD_BLAS);
#endif
    return text;
}
