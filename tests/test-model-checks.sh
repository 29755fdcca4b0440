#!/bin/sh
# test-model-checks: the model at model.path as a user meets it. A load failure that only
# one rank sees (an expert tensor that only EP rank 1 loads) is reported once, by rank 0,
# with the failing rank's own message and number, and every rank exits with status 2.
set -u
. "${ESFT_TOP_SRCDIR:-.}/tests/lib.sh"
test_begin model-checks

# A small model (8 experts) and the demo data, then a copy without one expert tensor of
# layer 0 that only EP rank 1 (experts 4-7) loads under parallel.ep=2.
demo="$src/input/demo.yaml"
paths="data.path=$tmp/data.h5 prepare.output=$tmp/data.h5 prepare.inputs=[$src/input/data/demo.jsonl]"
# shellcheck disable=SC2086 # $paths is a list of overrides
expect 0 "init + prepare" "$esft" "$demo" "phase=[init,prepare]" "model.path=$tmp/model" \
    "run.output_dir=$tmp/o" $paths
missing=model.layers.0.mlp.experts.7.up_proj.weight
expect 0 "a checkpoint without $missing" "$build/tests/test_model_load" drop "$tmp/model" \
    "$tmp/no-expert" "$missing"

# train, eval and score under ep 2: rank 1's message, once, with its rank; status 2; no
# MPI_Abort.
for phase in train eval score; do
    # shellcheck disable=SC2086
    expect 2 "$phase, expert missing on rank 1" $mpirun 2 "$esft" "$demo" "phase=$phase" \
        "model.path=$tmp/no-expert" "run.output_dir=$tmp/out-$phase" parallel.ep=2 \
        train.method=full $paths
    n=$(grep -c "$missing" "$tmp/err")
    [ "$n" = 1 ] && ok || fail "$phase: the missing tensor is named $n times"
    contains "$tmp/err" "esft: rank 1: $phase: $tmp/no-expert: tensor '$missing' not found" \
        "$phase, expert missing on rank 1"
    lacks "$tmp/err" "MPI_ABORT" "$phase, expert missing on rank 1"
    lacks "$tmp/err" "failed on another rank" "$phase, expert missing on rank 1"
done

test_end test-model-checks
