#!/bin/sh
# test-bench-cpu: tests/bench/run-cpu.sh --quick end to end on its toy model, with a
# stand-in for transformers' side that prints fixed timings, so that the script's runs
# and its table are checked where torch is not installed (CI). No timing is asserted:
# the table must hold the three phases of both programs, each ratio must be the stand-in's
# seconds over esft's median as the run files give them, and without transformers' files
# the table must say that it holds esft's rows only.
set -u
. "${ESFT_TOP_SRCDIR:-.}/tests/lib.sh"
test_begin bench-cpu

# the stand-in: "key: value" lines of bench_cpu_hf.py, 0.5 s for any phase
cat >"$tmp/hf.sh" <<'STUB'
phase=$1
echo "implementation: transformers stand-in (torch none, sdpa, experts grouped_mm, fp32)"
echo "threads: 1"
[ "$phase" = pick ] && { echo "fastest experts: grouped_mm"; exit 0; }
echo "tokens per iteration: 64"
echo "median seconds per iteration: 0.5000"
echo "peak rss mib: 700.0"
STUB

run="$src/tests/bench/run-cpu.sh"
export ESFT="$esft" BENCH_FORWARD="$build/tests/bench/bench_forward" GEMM_PEAK="$build/tests/bench/gemm_peak"
export BENCH_CPU_OUT="$tmp/bench" BENCH_CPU_HF="sh $tmp/hf.sh"
expect 0 "run-cpu.sh --quick" sh "$run" --quick --threads 1
cp "$tmp/out" "$tmp/table.txt"
for row in "| forward 2 x 64 " "| full train step 1 x 64 " "| ESFT train step 1 x 64 "; do
    contains "$tmp/table.txt" "$row" "the table's row"
done
[ "$(grep -c '^|  *| transformers |' "$tmp/table.txt")" = 3 ] && ok ||
    fail "three transformers rows expected"
contains "$tmp/table.txt" "experts grouped_mm (forward), grouped_mm (train steps)" "the picked implementation"
contains "$tmp/table.txt" "GFLOP/s (1 threads, gemm_peak)" "the GEMM peak"
contains "$tmp/table.txt" "esft BLAS: " "the BLAS"

# each ratio: 0.5 s over esft's seconds in its run file (a forward's median, a step's
# difference of metrics times), to the table's two decimals
for phase in forward full esft; do
    seconds=$(sed -n 's/^median seconds per iteration: //p; s/^seconds: //p' \
        "$tmp/bench/runs/r1.$phase.esft.txt")
    want=$(awk -v s="$seconds" 'BEGIN { printf "%.2fx", 0.5 / s }')
    contains "$tmp/table.txt" " $want |" "$phase: the ratio 0.5 s / $seconds s"
done

# without transformers' files: esft's rows and the note
rm -f "$tmp/bench/runs/"*.hf.txt
expect 0 "run-cpu.sh --report" sh "$run" --quick --report
contains "$tmp/out" "transformers: not run" "the esft-only note"
[ "$(grep -c '^| .* | esft  ' "$tmp/out")" = 3 ] && ok || fail "three esft rows expected"
lacks "$tmp/out" "| transformers |" "no transformers row"

expect 2 "an unknown option" sh "$run" --bogus
test_end bench-cpu
