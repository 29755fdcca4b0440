# ESFT_CHECK_CUDA: the optional CUDA backend.
#
# --with-cuda[=DIR]  require CUDA (DIR: toolkit root, default: from nvcc on PATH)
# --without-cuda     CPU-only build
# (default)          use CUDA when nvcc is found, else build CPU-only without complaint
#
# Sets and substitutes NVCC, CUDA_HOME, CUDA_CFLAGS, CUDA_LIBS, CUDA_ARCH,
# NVCC_GENCODE; defines HAVE_CUDA and the automake conditional HAVE_CUDA.
AC_DEFUN([ESFT_CHECK_CUDA], [
AC_ARG_WITH([cuda],
  [AS_HELP_STRING([--with-cuda@<:@=DIR@:>@],
    [build the CUDA backend (DIR: CUDA toolkit root); default: when nvcc is found])],
  [], [with_cuda=check])
AC_ARG_VAR([NVCC], [CUDA compiler])
AC_ARG_VAR([NVCCFLAGS], [extra flags for nvcc])
AC_ARG_VAR([CUDA_ARCH], [GPU architectures to compile for, space separated compute capabilities; each gets its machine code and its PTX (default: 90)])
: ${CUDA_ARCH="90"}

esft_cuda=no
AS_IF([test "x$with_cuda" != xno], [
  esft_cuda_path="$PATH"
  AS_IF([test "x$with_cuda" != xyes && test "x$with_cuda" != xcheck],
        [esft_cuda_path="$with_cuda/bin:$PATH"])
  AS_IF([test "x$with_cuda" = xcheck], [esft_cuda_path="$PATH:/usr/local/cuda/bin"])
  AC_PATH_PROG([NVCC], [nvcc], [], [$esft_cuda_path])
  AS_IF([test -n "$NVCC"], [
    AS_IF([test "x$with_cuda" != xyes && test "x$with_cuda" != xcheck],
          [CUDA_HOME="$with_cuda"],
          [CUDA_HOME=`AS_DIRNAME(["$NVCC"])`; CUDA_HOME=`AS_DIRNAME(["$CUDA_HOME"])`])
    CUDA_CFLAGS="-I$CUDA_HOME/include"
    esft_cuda_libdir="$CUDA_HOME/lib64"
    AS_IF([test -d "$esft_cuda_libdir"], [], [esft_cuda_libdir="$CUDA_HOME/lib"])
    esft_save_CPPFLAGS="$CPPFLAGS"; esft_save_LIBS="$LIBS"; esft_save_LDFLAGS="$LDFLAGS"
    CPPFLAGS="$CPPFLAGS $CUDA_CFLAGS"
    LDFLAGS="$LDFLAGS -L$esft_cuda_libdir"
    esft_cuda=yes
    AC_CHECK_HEADER([cuda_runtime.h], [], [esft_cuda=no; esft_cuda_missing="cuda_runtime.h"])
    AC_CHECK_HEADER([cublas_v2.h], [], [esft_cuda=no; esft_cuda_missing="cublas_v2.h"])
    AC_CHECK_HEADER([nccl.h], [], [esft_cuda=no; esft_cuda_missing="nccl.h (NCCL)"])
    AC_CHECK_LIB([cudart], [cudaMalloc], [:], [esft_cuda=no; esft_cuda_missing="libcudart"])
    AC_CHECK_LIB([cublas], [cublasCreate_v2], [:], [esft_cuda=no; esft_cuda_missing="libcublas"], [-lcudart])
    AC_CHECK_LIB([cublasLt], [cublasLtCreate], [:], [esft_cuda=no; esft_cuda_missing="libcublasLt"], [-lcudart])
    AC_CHECK_LIB([nccl], [ncclCommInitRank], [:], [esft_cuda=no; esft_cuda_missing="libnccl"], [-lcudart])
    CPPFLAGS="$esft_save_CPPFLAGS"; LIBS="$esft_save_LIBS"; LDFLAGS="$esft_save_LDFLAGS"
    CUDA_LIBS="-L$esft_cuda_libdir -Wl,-rpath,$esft_cuda_libdir -lnccl -lcublasLt -lcublas -lcudart -lstdc++"
    esft_cuda_version=`"$NVCC" --version | sed -n 's/.*release \([[0-9.]]*\).*/\1/p'`
  ], [esft_cuda_missing="nvcc"])
  AS_IF([test "x$esft_cuda" = xno && test "x$with_cuda" != xcheck],
    [AC_MSG_ERROR([--with-cuda was given but $esft_cuda_missing was not found.
hint: install the CUDA toolkit with cuBLAS and NCCL (or pass --with-cuda=DIR), or configure --without-cuda])])
])

NVCC_GENCODE=""
AS_IF([test "x$esft_cuda" = xyes], [
  for esft_arch in $CUDA_ARCH; do
    AS_CASE([$esft_arch], [*[[!0-9a]]*|""],
      [AC_MSG_ERROR([CUDA_ARCH entry '$esft_arch' is not a compute capability like 90 or 100a])])
    dnl machine code for the architecture, and its PTX for newer GPUs to JIT-compile
    NVCC_GENCODE="$NVCC_GENCODE -gencode arch=compute_$esft_arch,code=sm_$esft_arch -gencode arch=compute_$esft_arch,code=compute_$esft_arch"
  done
  AC_DEFINE([HAVE_CUDA], [1], [Define to 1 to build the CUDA backend.])
])
AM_CONDITIONAL([HAVE_CUDA], [test "x$esft_cuda" = xyes])
AC_SUBST([CUDA_HOME])
AC_SUBST([CUDA_CFLAGS])
AC_SUBST([CUDA_LIBS])
AC_SUBST([NVCC_GENCODE])
])
