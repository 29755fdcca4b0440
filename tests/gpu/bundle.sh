#!/bin/sh
# bundle: packs what tests/gpu/device-check.sh runs on a GPU machine into one file, so that
# a machine with a GPU, a CUDA driver and nothing of esft's own dependencies can run it.
#
#   tests/gpu/bundle.sh [OUTPUT]        (`make gpu-bundle` runs it after building)
#
# OUTPUT defaults to .gpu/esft-gpu-bundle.tar.xz in the build directory. The archive holds
# one folder, esft-gpu/, laid out like the build tree so that the test scripts find
# everything where they look for it:
#   esft, tests/test_* (the built test programs; only those named in ESFT_BUNDLE_TESTS,
#   space-separated, where it is set: the device tool's transfer counts the working tree
#   and the bundle together against 64 MiB), tests/bench/bench_* (built benchmark
#   programs) and tests/bench/*.py, tests/gpu/device-check.sh, tests/golden/, tests/decks/,
#   tests/*.sh (the shell tests and lib.sh), input/ (the demo decks and data);
#   lib/        every shared library that ldd lists for those programs, for orted and for
#               Open MPI's and PMIx's components, except the ones the GPU machine brings:
#               glibc's, libstdc++ and libgcc_s (its newer ones serve), and the CUDA
#               driver stack (libcuda, libcudart, libcublas, libcublasLt, libnccl, libcudnn);
#   lib/cuda-fallback/  libcudart, for a machine that lacks this CUDA major version (put
#               last on the library path by device-check.sh, so the machine's own comes first);
#   lib/openmpi3/, lib/pmix/   Open MPI's and PMIx's components (MPI singletons load them);
#   bin/orted   the Open MPI daemon a singleton starts;
#   share/openmpi/   Open MPI's help texts, so its error messages are readable;
#   MANIFEST    what went in, where each library came from, and the build's esft --version.
# Prints the archive's path and size; fails when a listed library is not found here, or
# when the archive is not under 64 MiB (what the GPU machine's transfer takes).
set -eu

src=${ESFT_TOP_SRCDIR:-$(cd "$(dirname "$0")/../.." && pwd)}
build=${ESFT_TOP_BUILDDIR:-$src}
output=${1:-$build/.gpu/esft-gpu-bundle.tar.xz}
limit_bytes=$((64 * 1024 * 1024))
ompi_components=${ESFT_OMPI_COMPONENTS:-/usr/lib/x86_64-linux-gnu/openmpi/lib/openmpi3}
pmix_components=${ESFT_PMIX_COMPONENTS:-/usr/lib/x86_64-linux-gnu/pmix2/lib/pmix}
ompi_share=${ESFT_OMPI_SHARE:-/usr/share/openmpi}

fail() {
    echo "bundle: $*" >&2
    exit 1
}

[ -x "$build/esft" ] || fail "$build/esft is not built (run make first)"
[ -x "$build/tests/test_device" ] || fail "$build/tests/test_device is not built (make gpu-bundle builds it)"
orted=$(command -v orted) || fail "orted not found (Debian package openmpi-bin)"
[ -d "$ompi_components" ] || fail "no Open MPI component folder at $ompi_components (set ESFT_OMPI_COMPONENTS)"

stage=$(mktemp -d "${TMPDIR:-/tmp}/esft-bundle.XXXXXX")
trap 'rm -rf "$stage"' EXIT
root="$stage/esft-gpu"
mkdir -p "$root/bin" "$root/lib/cuda-fallback" "$root/lib/openmpi3" "$root/lib/pmix" \
    "$root/share" "$root/tests/bench" "$root/tests/gpu"

# The programs: esft, every built test program, every built benchmark program.
cp "$build/esft" "$root/"
for f in "$build"/tests/test_*; do
    case $f in *.c | *.o | *.sh) continue ;; esac
    if [ -n "${ESFT_BUNDLE_TESTS:-}" ]; then
        case " $ESFT_BUNDLE_TESTS " in *" ${f##*/} "*) ;; *) continue ;; esac
    fi
    [ -f "$f" ] && [ -x "$f" ] && cp "$f" "$root/tests/"
done
for f in "$build"/tests/bench/bench_*; do
    case $f in *.c | *.o | *.py | *.sh) continue ;; esac
    [ -f "$f" ] && [ -x "$f" ] && cp "$f" "$root/tests/bench/"
done
cp "$orted" "$root/bin/"
cp -R "$ompi_components"/. "$root/lib/openmpi3/"
[ -d "$pmix_components" ] && cp -R "$pmix_components"/. "$root/lib/pmix/"
cp -R "$ompi_share" "$root/share/openmpi"

# The data and scripts they read.
cp "$src"/tests/bench/*.py "$src"/tests/bench/*.sh "$root/tests/bench/" 2>/dev/null || true
cp "$src"/tests/gpu/*.sh "$src"/tests/gpu/*.yaml "$root/tests/gpu/"
cp "$src"/tests/*.sh "$src/tests/run-tests" "$root/tests/"
cp -R "$src/tests/golden" "$src/tests/decks" "$root/tests/"
cp -R "$src/input" "$root/"
rm -rf "$root/tests/golden/__pycache__"

# The shared libraries: ldd over every ELF file in the bundle (programs and components),
# keeping each library under the name the programs ask for (its soname).
#   provided: what the GPU machine brings and must come from there
provided='^(linux-vdso|linux-gate|ld-linux.*|libc|libm|libmvec|libpthread|libdl|librt|libutil|libresolv|libanl|libnsl|libBrokenLocale|libthread_db|libnss_.*|libstdc\+\+|libgcc_s|libcuda|libcudart|libcublas|libcublasLt|libnccl|libcudnn.*|libnvidia-.*)\.so'
libs="$stage/libs.txt"
: >"$libs"
missing=""
for f in $(find "$root" -type f \( -perm -u+x -o -name '*.so*' \) | sort); do
    head -c 4 "$f" | grep -q 'ELF' || continue
    ldd "$f" >"$stage/ldd.txt" 2>/dev/null || continue
    while read -r name arrow path rest; do
        [ "$arrow" = "=>" ] || continue
        if [ "$path" = "not" ]; then
            echo "$name" | grep -Eq "$provided" || missing="$missing $name(${f#"$stage"/})"
            continue
        fi
        echo "$name $path" >>"$libs"
    done <"$stage/ldd.txt"
done
[ -z "$missing" ] || fail "libraries not found here:$missing"
sort -u "$libs" -o "$libs"
while read -r name path; do
    if echo "$name" | grep -Eq "$provided"; then
        case $name in libcudart.so.*) cp -L "$path" "$root/lib/cuda-fallback/$name" ;; esac
        continue
    fi
    [ -e "$root/lib/$name" ] || cp -L "$path" "$root/lib/$name"
done <"$libs"

# What went in.
{
    echo "esft GPU bundle, made $(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(uname -n)"
    (cd "$src" && git describe --always --dirty 2>/dev/null) | sed 's/^/source: /' || true
    "$build/esft" --version 2>&1 | sed 's/^/  /'
    echo "libraries (name, taken from):"
    sed 's/^/  /' "$libs"
    echo "files:"
    (cd "$stage" && find esft-gpu -type f | sort | sed 's/^/  /')
} >"$root/MANIFEST"

mkdir -p "$(dirname "$output")"
tar -C "$stage" -cf - esft-gpu | xz -T0 -6 >"$output.tmp"
mv "$output.tmp" "$output"
bytes=$(wc -c <"$output")
echo "bundle: $output: $bytes bytes ($((bytes / 1024 / 1024)) MiB; $(du -sh "$root" | cut -f1) unpacked)"
[ "$bytes" -lt "$limit_bytes" ] || fail "$output is not under 64 MiB"
