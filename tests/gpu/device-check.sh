#!/bin/bash
# device-check: esft's checks and benchmarks on a GPU machine, from the bundle that
# tests/gpu/bundle.sh makes (`make gpu-bundle`), within 8 minutes.
#
#   bash tests/gpu/device-check.sh [--dry-run] [BUNDLE]
#
# Run from the repository root (or anywhere: only the bundle is read). It unpacks the
# bundle into a temporary folder, puts the bundle's libraries first on the library path
# (then the machine's CUDA libraries), records the machine (nvidia-smi, driver, GPU, date)
# and runs each step with its own time limit; a failing step does not stop the others:
#   libraries       ldd over every bundled program: nothing missing but what the machine
#                   must bring; where the CUDA libraries come from
#   esft-version    the bundled esft starts (an MPI singleton) and sees the GPU
#   test_device     the kernels against the CPU backend, with CUDA_LAUNCH_BLOCKING=1 (an
#                   error is reported at the kernel that made it), then without; group by
#                   group (`test_device GROUP`) where test_device lists its groups, one a
#                   line, for `test_device --list` (asked with no GPU visible, so that a
#                   test_device without groups only skips)
#   test_comm       the comm layer as an MPI singleton: host paths and NCCL on the GPU
#   cpu-reference   the demo deck (input/demo.yaml, trimmed) on the CPU backend: init,
#                   prepare, score, select, train, eval; the curve the GPU must follow
#   backend-probe   whether this esft accepts run.backend: cuda (esft --dry-run)
#   golden-cuda     the golden fixtures' forward, gradients, eval and score on backend
#                   cuda (test_golden, test_grad 1 1, test_eval, test_score with
#                   ESFT_BACKEND=cuda) against transformers' committed values, to the
#                   programs' own (CPU) tolerances: the CUDA backend computes in fp32; a
#                   program must say that it ran on cuda to be believed, and test_golden
#                   and test_grad must name every fixture (the deepseek_v2, deepseek_v3,
#                   glm4_moe and gpt_oss ones included: MLA, the grouped, sigmoid and
#                   top-k-then-softmax routers, sinks and windows on the GPU)
#   phases-cuda     score and select, then train and eval, on backend cuda from the same
#                   model, data and (for train) the CPU's expert selection, against the CPU
#                   reference: the same selection, the train loss curve and the eval loss
#                   within the bf16 tolerances below
#   methods-cuda    full fine-tuning, the frozen router, LoRA (attention; attention and
#                   the routed experts), DenseMixer and ESFT with train.recompute, 5 steps
#                   each on the CPU and on cuda from the demo's files: the curves within
#                   fp32's bound
#   bench_kernels   tests/bench/bench_kernels, where the bundle has it
#   torch-qwen3-moe tests/bench/torch_qwen3_moe.py (transformers' Qwen3-MoE on the same
#                   shapes: 2 layers, batch 1 x 4096), where the bundle has it; with the
#                   machine's python3 and its own libraries (not the bundle's); it also
#                   writes its random model for the next step
#   esft-bench      esft on backend cuda on that same model (tests/gpu/bench-esft.yaml):
#                   prepare, score 8192 tokens, select, 4 ESFT steps of 4096 tokens;
#                   tokens/s of score and train from esft's own log
# Steps (c) and (d) run only when the binary accepts run.backend: cuda; until then they
# report "not run: run.backend cuda not available in this build".
#
# Without a GPU (no nvidia-smi, or nvidia-smi lists none) or with --dry-run, every step
# that needs the GPU reports "skipped: no device"; the others (libraries, esft-version,
# test_comm's host paths, cpu-reference, backend-probe) run, so the bundle is checked here.
#
# Output, in $OUT (default: out/device-check):
#   summary.txt        one line per step: name | status | seconds | key figures
#   device-check.log   every step's command and output (long outputs: head and tail)
#   extras.tar.gz      full outputs, nvidia-smi -q, the bundle's MANIFEST, the curves
# Exit status: 0 when no step failed.
#
# Environment:
#   ESFT_GPU_BUNDLE     the bundle (default .gpu/esft-gpu-bundle.tar.xz)
#   OUT                 the output folder
#   ESFT_CHECK_SECONDS  the whole run's time budget (default 450); a step that would pass
#                       it is cut short or reported "not run: out of time"
#   ESFT_CUDA_LIBDIRS   where the machine's CUDA libraries are (default
#                       /usr/local/cuda/lib64:/usr/lib/x86_64-linux-gnu)
#   ESFT_DEVICE_GROUPS  test_device groups to run one by one (default: what --list says,
#                       else the whole program at once)
#   ESFT_KEEP=1         keep the unpacked bundle (its path is printed)
#   ESFT_BENCH_KERNELS_ARGS  arguments of bench_kernels (e.g. "--sections attention")
#   ESFT_BENCH_VARIANTS   esft-bench's variants (default "tf32 bf16 tf32-loop tf32-full
#                       tf32-recompute bf16-store"; a name is a dtype with any of -loop,
#                       -full, -recompute, -store, -whole: see variant_settings)
#   ESFT_PROFILE_VARIANTS the variants trained again under ESFT_CUDA_PROFILE=1 (default
#                       "tf32 bf16 tf32-loop bf16-store")
#   ESFT_CHECK_STEPS    the steps to run, by name (test_device test_comm golden-cuda
#                       phases-cuda methods-cuda bench_kernels torch-qwen3-moe esft-bench; default all):
#                       a short lease runs the checks and the benchmarks in two calls; the
#                       bundle, libraries, esft-version, cpu-reference and backend-probe
#                       steps always run
set -u

started=$(date +%s)
budget=${ESFT_CHECK_SECONDS:-450}
dry_run=no
bundle=${ESFT_GPU_BUNDLE:-.gpu/esft-gpu-bundle.tar.xz}
for arg in "$@"; do
    case $arg in
    --dry-run) dry_run=yes ;;
    -h | --help)
        sed -n '2,/^set -u/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
        exit 0
        ;;
    -*) echo "device-check: unknown option $arg" >&2; exit 2 ;;
    *) bundle=$arg ;;
    esac
done
out=${OUT:-out/device-check}
mkdir -p "$out" || exit 1
out=$(cd "$out" && pwd)
summary="$out/summary.txt"
log="$out/device-check.log"
: >"$log"
work=$(mktemp -d "${TMPDIR:-/tmp}/esft-device-check.XXXXXX") || exit 1
extras="$work/extras"
mkdir -p "$extras"
if [ "${ESFT_KEEP:-0}" = 1 ]; then
    trap 'echo "device-check: kept $work"' EXIT
else
    trap 'rm -rf "$work"' EXIT
fi
failures=0

# ---- the summary and the log ---------------------------------------------------------
# record NAME STATUS SECONDS FIGURES: one summary line.
record() {
    printf '%-18s | %s | %ss | %s\n' "$1" "$2" "$3" "$4" | tee -a "$summary" "$log"
    case $2 in failed*) failures=$((failures + 1)) ;; esac
}
left() { echo $((budget - ($(date +%s) - started))); }
# limit MAX: a step's time limit, MAX seconds or what is left of the budget (less 15 s
# for packing the outputs); empty when nothing is left.
limit() {
    l=$(($(left) - 15))
    [ "$l" -gt "$1" ] && l=$1
    [ "$l" -ge 5 ] && echo "$l"
}
# run_step NAME MAX COMMAND...: COMMAND under `timeout`, its output in $work/NAME.out
# (kept whole in the extras, head and tail in the log); sets $status (124: timed out,
# 200: not started for want of time) and $seconds.
run_step() {
    name=$1
    t=$(limit "$2")
    shift 2
    output="$work/$name.out"
    : >"$output"
    if [ -z "$t" ]; then
        status=200
        seconds=0
        echo "==== $name: not run: out of time" >>"$log"
        return
    fi
    echo "==== $name (limit ${t}s): $*" >>"$log"
    s=$(date +%s)
    if declare -F "$1" >/dev/null; then
        # a function of this script: run by a bash that is given it and its variables
        timeout -k 10 "$t" bash -c "$(declare -p b d work demo_deck esft files short bundle_env bench_model variant method_settings 2>/dev/null)
$(declare -f "$1"); $1" >"$output" 2>&1
    else
        timeout -k 10 "$t" "$@" >"$output" 2>&1
    fi
    status=$?
    seconds=$(($(date +%s) - s))
    lines=$(wc -l <"$output")
    if [ "$lines" -gt 400 ]; then
        {
            head -n 150 "$output"
            echo "[... $((lines - 300)) lines: whole output in extras.tar.gz, $name.out ...]"
            tail -n 150 "$output"
        } >>"$log"
    else
        cat "$output" >>"$log"
    fi
    echo "---- $name: exit status $status after ${seconds}s" >>"$log"
    cp "$output" "$extras/"
}
# verdict: the status word of the last run_step for a program that exits 0 when passed.
verdict() {
    case $status in
    0) echo passed ;;
    77) echo "skipped: $(tail -n 1 "$output")" ;;
    124 | 137) echo "failed: timed out after ${seconds}s" ;;
    200) echo "not run: out of time" ;;
    *) echo "failed: exit status $status" ;;
    esac
}
# gpu_verdict: the same for a program that needs the GPU: with one listed by nvidia-smi,
# its skip (exit 77) is a failure, since it means CUDA saw no device.
gpu_verdict() {
    if [ "$status" = 77 ]; then
        echo "failed: skipped although nvidia-smi lists a GPU: $(tail -n 1 "$output" | cut -c 1-100)"
    else
        verdict
    fi
}
# checks FILE: the "N checks, M failed" figure of a test program and its first failure.
checks() {
    c=$(grep -E '[0-9]+ checks, [0-9]+ failed' "$1" | tail -n 1 | sed 's/.*: \([0-9]* checks\)/\1/')
    first=$(grep -m 1 'check failed' "$1" | sed 's/: check failed: .*: /: /' | cut -c 1-160)
    echo "${c:-no check count}${first:+; first failure: $first}"
}

# ---- the machine ---------------------------------------------------------------------
: >"$summary"
{
    echo "# esft device check, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), host $(uname -n)"
} | tee -a "$log" "$summary"
device=no
if [ $dry_run = no ] && command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU '; then
    device=yes
fi
if [ $device = yes ]; then
    gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1 | head -n 1)
    cuda_version=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/\1/p' | head -n 1)
    echo "# device: $gpu; CUDA (driver) $cuda_version; $(nvidia-smi -L | wc -l) GPU(s)" | tee -a "$log" "$summary"
    nvidia-smi >>"$log" 2>&1
    nvidia-smi -q >"$extras/nvidia-smi-q.txt" 2>&1
else
    reason="no nvidia-smi, or it lists no GPU"
    [ $dry_run = yes ] && reason="--dry-run"
    echo "# device: none ($reason): every GPU step is skipped" | tee -a "$log" "$summary"
fi
echo "# cpu: $(nproc) cores; $(sed -n 's/^model name[^:]*: //p' /proc/cpuinfo 2>/dev/null | head -n 1)" |
    tee -a "$log" "$summary"
skip_gpu() { record "$1" "skipped: no device" 0 "${2:-}"; }
# want STEP: whether ESFT_CHECK_STEPS asks for STEP (all when unset); else records that.
want() {
    [ -z "${ESFT_CHECK_STEPS:-}" ] && return 0
    case " $ESFT_CHECK_STEPS " in *" $1 "*) return 0 ;; esac
    record "$1" "not run: not in ESFT_CHECK_STEPS" 0 ""
    return 1
}

# ---- the bundle ----------------------------------------------------------------------
if [ ! -f "$bundle" ]; then
    record bundle "failed: $bundle not found (make gpu-bundle makes it)" 0 ""
    exit 1
fi
bytes=$(wc -c <"$bundle")
s=$(date +%s)
if ! tar -C "$work" -xJf "$bundle"; then
    record bundle "failed: cannot unpack $bundle" $(($(date +%s) - s)) "$bytes bytes"
    exit 1
fi
b="$work/esft-gpu"
source_line=$(sed -n 's/^source: //p' "$b/MANIFEST")
record bundle passed $(($(date +%s) - s)) "$bundle: $bytes bytes ($((bytes / 1048576)) MiB), source ${source_line:-unknown}, unpacked in $work"
cp "$b/MANIFEST" "$extras/"

# The bundle's programs run with the bundle's libraries first, then the machine's CUDA
# libraries, then the bundle's libcudart (a fallback for a machine without it). Open MPI
# and PMIx load their components and help texts from the bundle, and a program started
# alone (an MPI singleton) starts the bundle's orted (OPAL_BINDIR), which needs no ssh
# with the isolated launcher; so it runs on the Open MPI it was built with, whatever the
# machine has. Singletons talk to themselves only: shared memory and self, no network.
cuda_libdirs=${ESFT_CUDA_LIBDIRS:-/usr/local/cuda/lib64:/usr/lib/x86_64-linux-gnu}
mkdir -p "$b/lib/hwloc"
bundle_env=(env
    "LD_LIBRARY_PATH=$b/lib:$cuda_libdirs:$b/lib/cuda-fallback"
    "PATH=$b/bin:$PATH"
    "OMPI_MCA_mca_base_component_path=$b/lib/openmpi3"
    "PMIX_MCA_mca_base_component_path=$b/lib/pmix"
    "OPAL_PKGDATADIR=$b/share/openmpi"
    "OPAL_BINDIR=$b/bin"
    "OMPI_MCA_plm=${OMPI_MCA_plm:-isolated}"
    "OMPI_MCA_pml=${OMPI_MCA_pml:-ob1}"
    "OMPI_MCA_btl=${OMPI_MCA_btl:-self,vader}"
    "OMPI_MCA_osc=${OMPI_MCA_osc:-^ucx}"
    "HWLOC_PLUGINS_PATH=$b/lib/hwloc"
    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1)
esft=("${bundle_env[@]}" "$b/esft")

# ---- libraries -----------------------------------------------------------------------
# Nothing may be missing but the CUDA libraries, and those only where no GPU is.
check_libraries() {
    for f in "$b/esft" "$b"/tests/test_* "$b"/tests/bench/bench_* "$b/bin/orted" "$b"/lib/openmpi3/*.so; do
        case $f in *.py | *.sh) continue ;; esac
        [ -f "$f" ] || continue
        echo "== ${f#"$b"/}"
        "${bundle_env[@]}" ldd "$f" 2>&1
    done
}
run_step libraries 60 check_libraries
missing=$(grep 'not found' "$output" | awk '{print $1}' | sort -u | tr '\n' ' ')
cuda_missing=$(echo "$missing" | tr ' ' '\n' | grep -E '^lib(cuda|cudart|cublas|cublasLt|nccl|cudnn)' | tr '\n' ' ')
other_missing=$(echo "$missing" | tr ' ' '\n' | grep -vE '^lib(cuda|cudart|cublas|cublasLt|nccl|cudnn)' | grep . | tr '\n' ' ')
from=""
for lib in libcudart.so libcublas.so libcublasLt.so libnccl.so; do
    where=$(grep -m 1 "^[[:space:]]*${lib}[.0-9]* => /" "$output" | awk '{print $3}')
    from="$from${from:+, }$lib: ${where:-not found}"
done
if [ $status != 0 ] && [ $status != 1 ]; then
    record libraries "$(verdict)" "$seconds" ""
elif [ -n "$other_missing" ]; then
    record libraries "failed: not found: $other_missing" "$seconds" "$from"
elif [ -n "$cuda_missing" ] && [ $device = yes ]; then
    record libraries "failed: CUDA libraries not found: $cuda_missing" "$seconds" "$from"
else
    record libraries passed "$seconds" "every non-CUDA library from the bundle or the system's glibc/libstdc++; $from"
fi

# ---- esft --version --------------------------------------------------------------------
run_step esft-version 30 "${esft[@]}" --version
record esft-version "$(verdict)" "$seconds" "$(grep -E '^(backends|MPI|CUDA)' "$output" | sed 's/, package:.*//' |
    paste -sd ';' -)"

# ---- (a) test_device -------------------------------------------------------------------
if ! want test_device; then
    :
elif [ $device = no ]; then
    skip_gpu test_device
else
    groups=${ESFT_DEVICE_GROUPS:-}
    # A test_device that knows groups lists them without touching the GPU; one that does
    # not, run with no GPU visible, only says it skips.
    if [ -z "$groups" ] && CUDA_VISIBLE_DEVICES="" timeout 20 "${bundle_env[@]}" "$b/tests/test_device" --list \
        >"$work/groups.txt" 2>/dev/null; then
        groups=$(grep -E '^[A-Za-z0-9_-]+$' "$work/groups.txt" | tr '\n' ' ')
    fi
    for mode in blocking async; do
        blocking=1
        [ $mode = async ] && blocking=0
        if [ -z "$groups" ]; then
            run_step "test_device-$mode" 90 "${bundle_env[@]}" CUDA_LAUNCH_BLOCKING=$blocking "$b/tests/test_device"
            record "test_device-$mode" "$(gpu_verdict)" "$seconds" "CUDA_LAUNCH_BLOCKING=$blocking, all groups; $(checks "$output")"
        else
            for group in $groups; do
                run_step "test_device-$mode-$group" 45 "${bundle_env[@]}" CUDA_LAUNCH_BLOCKING=$blocking \
                    "$b/tests/test_device" "$group"
                record "test_device-$mode-$group" "$(gpu_verdict)" "$seconds" "CUDA_LAUNCH_BLOCKING=$blocking; $(checks "$output")"
            done
        fi
    done
fi

# ---- (b) test_comm as a singleton --------------------------------------------------------
if want test_comm; then
run_step test_comm 60 "${bundle_env[@]}" "$b/tests/test_comm"
v=$(verdict)
if [ "$v" = passed ] && [ $device = yes ] && grep -q 'device calls skipped' "$output"; then
    v="failed: device calls skipped on a machine with a GPU"
fi
device_note="host and NCCL device calls"
[ $device = no ] && device_note="host calls only (no device)"
record test_comm "$v" "$seconds" "np 1 singleton, $device_note; $(checks "$output")"
fi

# ---- the CPU reference: the demo deck, trimmed -------------------------------------------
# Its files (model, data, selection) are what the GPU runs start from, and its curve is
# what they must follow.
d="$work/demo"
demo_deck="$b/input/demo.yaml"
files=("model.path=$d/model" "prepare.output=$d/data.h5" "data.path=$d/data.h5"
    "prepare.inputs=[$b/input/data/demo.jsonl]")
short=(train.steps=10 train.eval_every=5 train.checkpoint_every=100)
cpu_reference() {
    cd "$work" &&
        "${esft[@]}" "$demo_deck" "phase=[init,prepare,score,select]" run.backend=cpu "run.output_dir=$d/cpu" \
            "${files[@]}" "train.expert_config=$d/cpu/expert_config.json" &&
        "${esft[@]}" "$demo_deck" "phase=[train,eval]" run.backend=cpu "run.output_dir=$d/cpu/run" "${files[@]}" \
            "train.expert_config=$d/cpu/expert_config.json" "${short[@]}" \
            "eval.adapter=$d/cpu/run/adapter/adapter.safetensors"
}
run_step cpu-reference 120 cpu_reference
# value KEY FILE: a number of a flat JSON file.
value() { sed -n "s/.*\"$1\": \([^,]*\),*/\1/p" "$2"; }
# curve METRICS: "step loss" of each training step (its last line per step).
curve() {
    sed -n 's/.*"event": "step", "step": \([0-9]*\), "loss": \([^,}]*\).*/\1 \2/p' "$1" |
        awk '{ loss[$1] = $2 } END { for (s in loss) print s, loss[s] }' | sort -n
}
cpu_ok=no
if [ $status = 0 ] && [ -s "$d/cpu/run/eval.json" ]; then
    cpu_ok=yes
    curve "$d/cpu/run/metrics.jsonl" >"$extras/curve-cpu.txt"
    cp "$d/cpu/run/eval.json" "$extras/eval-cpu.json"
    cpu_eval=$(value loss "$d/cpu/run/eval.json")
    record cpu-reference passed "$seconds" "$(awk 'NR == 1 { a = $2 } { b = $2; n = NR }
        END { printf "demo deck, %d ESFT steps: loss %.6f -> %.6f", n, a, b }' "$extras/curve-cpu.txt"), eval loss $(
        printf '%.6f' "$cpu_eval")"
else
    v=$(verdict)
    [ "$v" = passed ] && v="failed: no eval.json"
    record cpu-reference "$v" "$seconds" "$(tail -n 1 "$output" | cut -c 1-160)"
fi

# ---- backend probe -------------------------------------------------------------------
# The deck refuses run.backend: cuda until a phase runs on the GPU; its message names
# run.backend. Probed on the very deck the GPU phases run.
cuda_backend=unknown
cuda_refusal="the backend probe did not answer"
if [ $cpu_ok = yes ]; then
    run_step backend-probe 30 "${esft[@]}" --dry-run "$demo_deck" "phase=[score,select,train,eval]" \
        run.backend=cuda "run.output_dir=$d/probe" "${files[@]}" "train.expert_config=$d/cpu/expert_config.json" \
        "eval.adapter=$d/cpu/run/adapter/adapter.safetensors"
    if [ $status = 0 ]; then
        cuda_backend=yes
        record backend-probe passed "$seconds" "run.backend: cuda accepted"
    elif [ $status = 2 ] && grep -q 'run.backend' "$output"; then
        cuda_backend=no
        cuda_refusal="run.backend cuda not available in this build"
        record backend-probe passed "$seconds" "run.backend: cuda refused: $(grep -m 1 'run.backend' "$output" | sed 's/.*run.backend: //' | cut -c 1-100)"
    else
        record backend-probe "$(verdict)" "$seconds" "$(tail -n 1 "$output" | cut -c 1-160)"
    fi
else
    record backend-probe "not run: no CPU reference files" 0 ""
fi

# ---- (c) the golden fixtures on backend cuda -------------------------------------------------
# The CUDA backend computes in fp32 (cuBLAS with fp32 compute, fp32 kernels), so the
# programs' own tolerances hold: logits 1e-4 of the largest, gradients 1e-3, loss 1e-5.
golden_tolerance="the CPU's (fp32)"
if ! want golden-cuda; then
    :
elif [ $device = no ]; then
    skip_gpu golden-cuda "tolerances: $golden_tolerance"
elif [ $cuda_backend != yes ]; then
    record golden-cuda "not run: $cuda_refusal" 0 "tolerances: $golden_tolerance"
else
    for program in test_golden test_grad test_eval test_score; do
        args=("$b/tests/golden")
        [ $program = test_grad ] && args+=(1 1) # the layout variant: on the backend named
        [ $program = test_score ] && args+=("$work/score-cuda")
        run_step "golden-cuda-$program" 90 "${bundle_env[@]}" ESFT_BACKEND=cuda "$b/tests/$program" "${args[@]}"
        v=$(gpu_verdict)
        if ! grep -q -E 'backend:? cuda|on cuda' "$output"; then
            v="failed: $program does not say it ran on backend cuda"
        fi
        # test_golden and test_grad name each fixture they ran (every tests/golden/*/
        # with an expected.safetensors: deepseek_v2/v3, glm4_moe, gpt_oss and their
        # variants too); one missing means the program stopped early
        missing=""
        if [ $program = test_golden ] || [ $program = test_grad ]; then
            for fixture in "$b"/tests/golden/*/expected.safetensors; do
                name=$(basename "$(dirname "$fixture")")
                grep -q "^$name[: ]" "$output" || missing="$missing $name"
            done
        fi
        [ -n "$missing" ] && v="failed: $program did not run the fixtures$missing"
        record "golden-cuda-$program" "$v" "$seconds" "tolerances: $golden_tolerance; $(checks "$output")"
    done
fi

# ---- (d) score, select, train, eval on backend cuda against the CPU reference ------------------
curve_tolerance=1e-2
eval_tolerance=1e-2
score_tolerance=2e-2 # absolute: a score is a share of the routed tokens
# numbers KEY FILE: the numbers of the block "KEY": { ... } of expert_config.json, one a line.
numbers() {
    sed -n "/\"$1\": {/,/}/p" "$2" | sed '1d; s/"[0-9]*"://' | tr -c '0-9.e+-' '\n' | grep -E '^[-+]?[0-9.]'
}
if ! want phases-cuda; then
    :
elif [ $device = no ]; then
    skip_gpu phases-cuda "tolerances: train curve $curve_tolerance, eval loss $eval_tolerance (relative), expert scores $score_tolerance"
elif [ $cuda_backend != yes ]; then
    record phases-cuda "not run: $cuda_refusal" 0 ""
else
    cuda_phases() {
        cd "$work" &&
            "${esft[@]}" "$demo_deck" "phase=[score,select]" run.backend=cuda "run.output_dir=$d/cuda" \
                "${files[@]}" "train.expert_config=$d/cuda/expert_config.json"
        select_status=$?
        # train from the CPU's selection, so that the curves compare like with like
        "${esft[@]}" "$demo_deck" "phase=[train,eval]" run.backend=cuda "run.output_dir=$d/cuda/run" "${files[@]}" \
            "train.expert_config=$d/cpu/expert_config.json" "${short[@]}" \
            "eval.adapter=$d/cuda/run/adapter/adapter.safetensors" && [ $select_status = 0 ]
    }
    run_step phases-cuda 150 cuda_phases
    v=$(verdict)
    figures=""
    if [ -s "$d/cuda/run/metrics.jsonl" ]; then
        curve "$d/cuda/run/metrics.jsonl" >"$extras/curve-cuda.txt"
        worst=$(join "$extras/curve-cpu.txt" "$extras/curve-cuda.txt" |
            awk '{ d = $2 - $3; if (d < 0) d = -d; r = d / ($2 < 0 ? -$2 : $2); if (r > w) w = r; n++ }
                 END { printf "%.3g %d", w, n }')
        steps=${worst#* }
        worst=${worst% *}
        figures="train curve: $steps of $(wc -l <"$extras/curve-cpu.txt") steps, worst relative difference $worst (tolerance $curve_tolerance)"
        awk -v w="$worst" -v t="$curve_tolerance" 'BEGIN { exit !(w <= t) }' || v="failed: train curve off the CPU's"
        [ "$steps" = "$(wc -l <"$extras/curve-cpu.txt")" ] || v="failed: train curve has $steps steps"
    fi
    if [ -s "$d/cuda/run/eval.json" ]; then
        cp "$d/cuda/run/eval.json" "$extras/eval-cuda.json"
        gpu_eval=$(value loss "$d/cuda/run/eval.json")
        rel=$(awk -v a="$cpu_eval" -v b="$gpu_eval" 'BEGIN { d = a - b; if (d < 0) d = -d; printf "%.3g", d / a }')
        figures="$figures; eval loss GPU $gpu_eval, CPU $cpu_eval, relative $rel (tolerance $eval_tolerance)"
        awk -v r="$rel" -v t="$eval_tolerance" 'BEGIN { exit !(r <= t) }' || v="failed: eval loss off the CPU's"
    fi
    if [ -s "$d/cuda/expert_config.json" ]; then
        cp "$d/cuda/expert_config.json" "$extras/expert_config-cuda.json"
        worst=$(paste <(numbers scores "$d/cpu/expert_config.json") <(numbers scores "$d/cuda/expert_config.json") |
            awk '{ d = $1 - $2; if (d < 0) d = -d; if (d > w) w = d; n++ } END { printf "%.3g %d", w, n }')
        figures="$figures; score: ${worst#* } expert scores, worst difference ${worst% *} (tolerance $score_tolerance)"
        awk -v w="${worst% *}" -v t="$score_tolerance" 'BEGIN { exit !(w <= t) }' || v="failed: expert scores off the CPU's"
        if [ "$(numbers experts "$d/cpu/expert_config.json")" = "$(numbers experts "$d/cuda/expert_config.json")" ]; then
            figures="$figures; select: the CPU's experts"
        else
            figures="$figures; select: other experts than the CPU's (a near-tie at the top_p cut, if the scores are within tolerance)"
        fi
    fi
    cp "$d/cuda/run/metrics.jsonl" "$extras/metrics-cuda.jsonl" 2>/dev/null
    record phases-cuda "$v" "$seconds" "${figures#; }"

    # the same training on the tensor cores: model.dtype tf32 (10-bit products), then
    # bf16 (frozen weights' GEMMs on bf16 operands): the CPU's curve within the bound;
    # score first in the same process, so train and eval run on models made after one
    # was freed (the bf16 copies must not outlive their model)
    for dtype in tf32 bf16; do
        eval "${dtype}_phases() {
            cd \"\$work\" && \"\${esft[@]}\" \"\$demo_deck\" 'phase=[score,train,eval]' run.backend=cuda \
                model.dtype=$dtype \"run.output_dir=\$d/$dtype\" \"\${files[@]}\" \
                \"train.expert_config=\$d/cpu/expert_config.json\" \"\${short[@]}\" \
                \"eval.adapter=\$d/$dtype/adapter/adapter.safetensors\"
        }"
        run_step "phases-cuda-$dtype" 90 "${dtype}_phases"
        v=$(verdict)
        figures=""
        if [ -s "$d/$dtype/metrics.jsonl" ]; then
            curve "$d/$dtype/metrics.jsonl" >"$extras/curve-$dtype.txt"
            worst=$(join "$extras/curve-cpu.txt" "$extras/curve-$dtype.txt" |
                awk '{ d = $2 - $3; if (d < 0) d = -d; r = d / ($2 < 0 ? -$2 : $2); if (r > w) w = r; n++ }
                     END { printf "%.3g %d", w, n }')
            figures="train curve: ${worst#* } steps, worst relative difference ${worst% *} (tolerance $curve_tolerance)"
            awk -v w="${worst% *}" -v t="$curve_tolerance" 'BEGIN { exit !(w <= t) }' ||
                v="failed: $dtype train curve off the CPU's"
        fi
        if [ -s "$d/$dtype/eval.json" ]; then
            figures="$figures; eval loss $dtype $(value loss "$d/$dtype/eval.json"), CPU $cpu_eval"
        fi
        record "phases-cuda-$dtype" "$v" "$seconds" "${figures#; }"
    done
fi
# ---- (d2) the other training methods on backend cuda against the CPU ---------------------
# Each from the demo's files, 5 steps on the CPU and on cuda (fp32): full fine-tuning, the
# frozen router, LoRA on attention and on the routed experts (their pairs through the
# grouped ops), DenseMixer, and ESFT with train.recompute; each cuda curve within the
# fp32 bound of the CPU's.
method_tolerance=1e-4
method_variants=(full "train.method=full" frozen_router "train.method=frozen_router"
    lora-attention "train.method=lora" lora-experts "train.method=lora train.lora.targets=[attention,experts]"
    densemixer "train.method=densemixer" esft-recompute "train.recompute=true")
if ! want methods-cuda; then
    :
elif [ $device = no ]; then
    skip_gpu methods-cuda "tolerance: train curve $method_tolerance"
elif [ $cuda_backend != yes ] || [ $cpu_ok != yes ]; then
    record methods-cuda "not run: ${cuda_refusal}" 0 ""
else
    for ((i = 0; i < ${#method_variants[@]}; i += 2)); do
        variant=${method_variants[i]}
        method_settings=${method_variants[i + 1]}
        method_run() {
            cd "$work" || return 1
            for backend in cpu cuda; do
                # shellcheck disable=SC2086
                "${esft[@]}" "$demo_deck" "phase=[train]" run.backend=$backend \
                    "run.output_dir=$d/method-$variant-$backend" "${files[@]}" \
                    "train.expert_config=$d/cpu/expert_config.json" train.steps=5 train.eval_every=0 \
                    train.checkpoint_every=0 $method_settings || return 1
            done
        }
        run_step "methods-cuda-$variant" 60 method_run
        v=$(gpu_verdict)
        figures=""
        if [ -s "$d/method-$variant-cuda/metrics.jsonl" ] && [ -s "$d/method-$variant-cpu/metrics.jsonl" ]; then
            worst=$(join <(curve "$d/method-$variant-cpu/metrics.jsonl") <(curve "$d/method-$variant-cuda/metrics.jsonl") |
                awk '{ d = $2 - $3; if (d < 0) d = -d; r = d / ($2 < 0 ? -$2 : $2); if (r > w) w = r; n++ }
                     END { printf "%.3g %d", w, n }')
            figures="$method_settings: ${worst#* } steps, worst relative difference ${worst% *} (tolerance $method_tolerance)"
            awk -v w="${worst% *}" -v t="$method_tolerance" 'BEGIN { exit !(w <= t) }' ||
                v="failed: the $variant curve is off the CPU's"
            [ "${worst#* }" = 5 ] || v="failed: the $variant curves have ${worst#* } common steps, not 5"
        fi
        record "methods-cuda-$variant" "$v" "$seconds" "$figures"
    done
fi
[ -s "$d/cpu/run/metrics.jsonl" ] && cp "$d/cpu/run/metrics.jsonl" "$extras/metrics-cpu.jsonl"
[ -s "$d/cpu/expert_config.json" ] && cp "$d/cpu/expert_config.json" "$extras/expert_config-cpu.json"

# ---- (e) benchmarks ------------------------------------------------------------------
# figures FILE: the lines of a benchmark's output that carry its figures.
figures() {
    grep -E 'tokens/s|TFLOP|MFU|GB/s|[0-9] ?ms\b' "$1" | tail -n 6 | tr -s ' ' | cut -c 1-120 | paste -sd ';' -
}
if ! want bench_kernels; then
    :
elif [ ! -x "$b/tests/bench/bench_kernels" ]; then
    record bench_kernels "skipped: not in this bundle" 0 ""
elif [ $device = no ]; then
    skip_gpu bench_kernels
else
    # shellcheck disable=SC2086 # ESFT_BENCH_KERNELS_ARGS is a list of arguments
    run_step bench_kernels 120 "${bundle_env[@]}" "$b/tests/bench/bench_kernels" ${ESFT_BENCH_KERNELS_ARGS:-}
    record bench_kernels "$(gpu_verdict)" "$seconds" "$(figures "$output")"
fi
if ! want torch-qwen3-moe; then
    :
elif [ ! -f "$b/tests/bench/torch_qwen3_moe.py" ]; then
    record torch-qwen3-moe "skipped: not in this bundle" 0 ""
elif [ $device = no ]; then
    skip_gpu torch-qwen3-moe
else
    # the machine's python3, torch and libraries: none of the bundle's
    run_step torch-qwen3-moe 200 env PYTHONUNBUFFERED=1 python3 "$b/tests/bench/torch_qwen3_moe.py" \
        --layers 2 --batch 1 --seq 4096 --save "$work/bench-model"
    record torch-qwen3-moe "$(verdict)" "$seconds" "$(figures "$output")"
fi

# steady FILE: the mean step time over the second half of the training steps, from the
# cumulative tokens/s that esft logs after each step (step n at rate r: n * 4096 / r s).
steady() {
    sed -n 's/.*train: step \([0-9]*\)\/\([0-9]*\) .* \([0-9.]*\) tokens\/s.*/\1 \2 \3/p' "$1" |
        awk '{ t[$1] = $1 * 4096 / $3; n = $2 } END { h = int(n / 2); if (n < 2 || !(n in t)) { print "no step times"; exit }
               printf "steps %d-%d: %.1f ms/step (%.0f tokens/s)", h + 1, n, 1e3 * (t[n] - t[h]) / (n - h), (n - h) * 4096 / (t[n] - t[h]) }'
}
# ---- (e') esft on the same model -----------------------------------------------------------
bench_model="$work/bench-model"
if ! want esft-bench; then
    :
elif [ $device = no ]; then
    skip_gpu esft-bench
elif [ $cuda_backend != yes ]; then
    record esft-bench "not run: $cuda_refusal" 0 ""
elif [ ! -s "$bench_model/config.json" ]; then
    record esft-bench "not run: torch_qwen3_moe.py wrote no model" 0 ""
else
    esft_bench() {
        e="$work/bench-esft"
        mkdir -p "$e" && sh "$b/tests/gpu/long-jsonl.sh" 16 4200 >"$e/long.jsonl" &&
            cd "$work" && "${esft[@]}" "$b/tests/gpu/bench-esft.yaml" "run.output_dir=$e/out" \
            "model.path=$bench_model" "prepare.inputs=[$e/long.jsonl]" "prepare.output=$e/data.h5" \
            "data.path=$e/data.h5"
    }
    run_step esft-bench 200 esft_bench
    record esft-bench "$(verdict)" "$seconds" "$(grep -E 'score: [0-9]+ tokens in|train: step [0-9]+/' "$output" |
        sed 's/.*\(score: \|train: step \)/\1/' | cut -c 1-150 | paste -sd ';' -)"
    # the same score and steps on the tensor cores, one variant after another (names in
    # ESFT_BENCH_VARIANTS; default below): tf32, bf16; tf32 with the experts' GEMMs one call
    # per expert (ESFT_CUDA_GROUPED=loop), the baseline of the grouped call; a full
    # fine-tuning step; the ESFT step with train.recompute; bf16 mode over frozen weights
    # stored in bf16 (model.frozen_weights: bf16); *-whole: the LM head over the whole
    # vocabulary at once (ESFT_VOCAB_CHUNK=151936, no chunk recomputed in the backward)
    # variant_settings NAME: dtype, the experts' GEMM form, the deck's extra settings and
    # the environment of variant NAME
    variant_settings() {
        dtype=${1%%-*} grouped=batched chunk=${ESFT_VOCAB_CHUNK:-} store=fp32
        phases="'phase=[score,train]'"
        case $1 in *-loop*) grouped=loop ;; esac
        case $1 in *-full*) phases="'phase=[train]' train.method=full" ;; esac
        case $1 in *-recompute*) phases="'phase=[train]' train.recompute=true" ;; esac
        case $1 in *-store*) store=bf16 ;; esac
        case $1 in *-whole*) chunk=151936 ;; esac
        env_prefix="ESFT_CUDA_GROUPED=$grouped${chunk:+ ESFT_VOCAB_CHUNK=$chunk}"
    }
    for variant in ${ESFT_BENCH_VARIANTS:-tf32 bf16 tf32-loop tf32-full tf32-recompute bf16-store}; do
        variant_settings "$variant"
        eval "esft_bench_${variant//-/_}() {
            e=\"\$work/bench-esft\"
            cd \"\$work\" && $env_prefix \"\${esft[@]}\" \"\$b/tests/gpu/bench-esft.yaml\" \
                $phases model.dtype=$dtype model.frozen_weights=$store \"run.output_dir=\$e/$variant\" \
                \"model.path=\$bench_model\" \"data.path=\$e/data.h5\" \
                \"train.expert_config=\$e/out/expert_config.json\"
        }"
        run_step "esft-bench-$variant" 120 "esft_bench_${variant//-/_}"
        record "esft-bench-$variant" "$(verdict)" "$seconds" "$(steady "$output"); $(grep -E 'score: [0-9]+ tokens in' "$output" |
            sed 's/.*\(score: \)/\1/' | cut -c 1-80)"
    done
    # where the time goes: the same training under ESFT_CUDA_PROFILE=1 (a device sync
    # before and after each op, each op timed; variants in ESFT_PROFILE_VARIANTS); the
    # table is in the step's output
    for variant in ${ESFT_PROFILE_VARIANTS:-tf32 bf16 tf32-loop bf16-store}; do
        variant_settings "$variant"
        phases=$(echo "$phases" | sed "s/score,//")
        eval "esft_profile_${variant//-/_}() {
            e=\"\$work/bench-esft\"
            cd \"\$work\" && ESFT_CUDA_PROFILE=1 $env_prefix \"\${esft[@]}\" \
                \"\$b/tests/gpu/bench-esft.yaml\" $phases model.dtype=$dtype model.frozen_weights=$store \
                \"run.output_dir=\$e/profile-$variant\" \"model.path=\$bench_model\" \
                \"data.path=\$e/data.h5\" \"train.expert_config=\$e/out/expert_config.json\"
        }"
        run_step "esft-profile-$variant" 120 "esft_profile_${variant//-/_}"
        record "esft-profile-$variant" "$(verdict)" "$seconds" "$(grep 'cuda profile' "$output" | sed -n '2,6p' |
            sed 's/.*cuda profile: *//' | tr -s ' ' | cut -c 1-90 | paste -sd ';' -)"
    done
fi

# ---- the end -------------------------------------------------------------------------
total=$(($(date +%s) - started))
echo "# $failures step(s) failed; ${total}s in all (budget ${budget}s)" | tee -a "$log" "$summary"
cp "$summary" "$extras/"
tar -C "$work" -czf "$out/extras.tar.gz" extras 2>>"$log"
echo "device-check: $summary, $log, $out/extras.tar.gz"
[ "$failures" = 0 ]
