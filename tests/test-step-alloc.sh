#!/bin/sh
# test-step-alloc: the train step loop allocates nothing once it has run a step (STYLE.md;
# issue 18 item 5). Every step event of metrics.jsonl carries "allocations", the largest
# over the ranks of the checked host allocations and backend buffers made inside the
# step's body (log.h, alloc_watch); steps 2 and 3 must hold 0, under the methods and the
# layouts that reach different code (esft, full, lora, densemixer; pp 2, ep 2, dp 2; the
# device simulator). The first step may allocate: ops keep their scratch at the largest
# size asked. ESFT_ALLOC_TRACE=1 names the places of a failing run.
set -u
. "${ESFT_TOP_SRCDIR:-.}/tests/lib.sh"
test_begin step-alloc

demo="$src/input/demo.yaml"
d="$tmp/demo"
common="model.path=$d/model prepare.output=$d/data.h5 data.path=$d/data.h5 prepare.inputs=[$src/input/data/demo.jsonl]"
# shellcheck disable=SC2086 # $common is a list of overrides
expect 0 "demo model and data" "$esft" "$demo" "phase=[init,prepare]" "run.output_dir=$d" $common
printf '{"experts": {"0": [1, 5], "1": [0, 2, 7], "2": [3], "3": [4, 6]}, "shared_experts": false, "non_expert_modules": false}\n' >"$tmp/experts.json"
train="phase=train train.steps=3 train.eval_every=0 train.checkpoint_every=0 train.resume=never train.expert_config=$tmp/experts.json"

run=0
check() { # RANKS DESCRIPTION OVERRIDES...
    n=$1 what=$2
    shift 2
    run=$((run + 1))
    o="$tmp/run-$run"
    # shellcheck disable=SC2086
    if [ "$n" = 1 ]; then
        expect 0 "$what" "$esft" "$demo" $common $train "run.output_dir=$o" "$@"
    else
        expect 0 "$what" $mpirun "$n" "$esft" "$demo" $common $train "run.output_dir=$o" "$@"
    fi
    counts=$(grep '"event": "step"' "$o/metrics.jsonl" | sed 's/.*"allocations": \([0-9]*\).*/\1/' | tr '\n' ' ')
    set -- $counts
    if [ $# -ne 3 ]; then
        fail "$what: $# step events with an allocation count ($counts)"
    elif [ "$2" = 0 ] && [ "$3" = 0 ]; then
        ok
    else
        fail "$what: allocations per step $counts (steps 2 and 3 must be 0)"
    fi
}

check 1 "esft, 1 rank" train.method=esft
check 1 "full, device simulator" train.method=full run.backend=cpu-devsim
check 1 "lora" train.method=lora
check 2 "densemixer, ep 2" train.method=densemixer parallel.ep=2
check 2 "full, pp 2" train.method=full parallel.pp=2
check 2 "esft, dp 2, device simulator" train.method=esft run.backend=cpu-devsim
test_end step-alloc
