#!/bin/sh
# test-densemixer: train.method densemixer end to end on the demo task (a random qwen3_moe,
# the demo conversations): it lowers the validation loss and trains otherwise than full
# fine-tuning (its router gradient differs); the progress line reports DenseMixer's extra
# FLOPs; pp 2 gives the 1-rank curve, recompute and the device simulator the same
# curve bit for bit; dp 2 and ep 2 (its exchange of every token) on the 1-rank curve, and
# on the device simulator bit for bit; esft with train.densemixer runs; method lora is
# refused with the reason. The numbers against the PyTorch rule are test_densemixer's (golden
# fixtures).
set -u
. "${ESFT_TOP_SRCDIR:-.}/tests/lib.sh"
test_begin densemixer

demo_data
short="train.steps=6 train.global_batch=8 train.micro_batch=2 train.eval_every=3 train.checkpoint_every=100 train.lr=1.0e-3"

# shellcheck disable=SC2086
expect 0 "densemixer training" "$esft" "$demo" phase=train "run.output_dir=$d/dm" $common $short \
    train.method=densemixer
cat "$tmp/out" "$tmp/err" >"$tmp/log"
contains "$tmp/log" "train: densemixer," "the method named"
contains "$tmp/log" "DenseMixer's router gradient: the backward runs all" "the cost line"
contains "$tmp/log" "% DenseMixer)" "the progress line's DenseMixer FLOPs"
m="$d/dm/metrics.jsonl"
first=$(losses eval "$m" | head -n 1 | cut -d' ' -f2)
last=$(losses eval "$m" | tail -n 1 | cut -d' ' -f2)
awk -v a="$first" -v b="$last" 'BEGIN { exit !(b < a) }' && ok ||
    fail "densemixer did not lower the validation loss ($first -> $last)"
echo "validation loss: $first -> $last"

# full fine-tuning differs only in the router gradient: the first step's loss is the same
# (the forward is unchanged), the later ones are not
# shellcheck disable=SC2086
expect 0 "full training" "$esft" "$demo" phase=train "run.output_dir=$d/full" $common $short \
    train.method=full
same_curve "$m" "$d/full/metrics.jsonl" 0 1 && ok || fail "densemixer's first step differs from full's"
same_curve "$m" "$d/full/metrics.jsonl" 1e-9 && fail "densemixer trained as full does" || ok
# train.densemixer with method full is method densemixer
# shellcheck disable=SC2086
expect 0 "full + train.densemixer" "$esft" "$demo" phase=train "run.output_dir=$d/fulldm" $common \
    $short train.method=full train.densemixer=true
same_curve "$m" "$d/fulldm/metrics.jsonl" 0 && ok || fail "full + train.densemixer differs from densemixer"

# layouts and backends: the 1-rank curve (under ep 2 each rank runs its 4 experts on
# both ranks' tokens; the device simulator's exchanges go through host copies)
for layout in "1 1" "2 1" "1 2"; do
    set -- $layout
    # shellcheck disable=SC2086
    expect 0 "densemixer, pp $1 ep $2 on 2 ranks" $mpirun 2 "$esft" "$demo" phase=train \
        "run.output_dir=$d/dm-$1-$2" $common $short train.method=densemixer "parallel.pp=$1" \
        "parallel.ep=$2"
    same_curve "$m" "$d/dm-$1-$2/metrics.jsonl" 1e-5 && ok ||
        fail "pp $1 ep $2 does not give the 1-rank curve: $(paste -d' ' "$tmp/a.txt" "$tmp/b.txt" | head -n 3)"
done
# shellcheck disable=SC2086
expect 0 "densemixer, ep 2, cpu-devsim" $mpirun 2 "$esft" "$demo" phase=train \
    "run.output_dir=$d/dm-ep2-devsim" $common $short train.method=densemixer parallel.ep=2 \
    run.backend=cpu-devsim
same_curve "$d/dm-1-2/metrics.jsonl" "$d/dm-ep2-devsim/metrics.jsonl" 0 && ok ||
    fail "cpu-devsim changed densemixer's ep 2 curve"
# shellcheck disable=SC2086
expect 0 "densemixer, recompute" "$esft" "$demo" phase=train "run.output_dir=$d/recompute" $common \
    $short train.method=densemixer train.recompute=true
same_curve "$m" "$d/recompute/metrics.jsonl" 0 && ok || fail "recompute changed densemixer's curve"
# shellcheck disable=SC2086
expect 0 "densemixer, cpu-devsim" "$esft" "$demo" phase=train "run.output_dir=$d/devsim" $common \
    $short train.method=densemixer run.backend=cpu-devsim
same_curve "$m" "$d/devsim/metrics.jsonl" 0 && ok || fail "cpu-devsim changed densemixer's curve"

# ESFT's experts with DenseMixer's router gradient (the router frozen: it reaches the
# layers below through the router's input gradient)
# shellcheck disable=SC2086
expect 0 "score and select" "$esft" "$demo" "phase=[score,select]" "run.output_dir=$d" $common
# shellcheck disable=SC2086
expect 0 "esft + densemixer" "$esft" "$demo" phase=train "run.output_dir=$d/esftdm" $common $short \
    train.method=esft train.densemixer=true "train.expert_config=$d/expert_config.json"
# shellcheck disable=SC2086
expect 0 "esft" "$esft" "$demo" phase=train "run.output_dir=$d/esft" $common $short \
    train.method=esft "train.expert_config=$d/expert_config.json"
same_curve "$d/esft/metrics.jsonl" "$d/esftdm/metrics.jsonl" 1e-9 && fail "train.densemixer changed nothing under esft" || ok

# refused, with the reason
# shellcheck disable=SC2086
expect 2 "lora + densemixer" "$esft" "$demo" phase=train "run.output_dir=$d/lora" $common $short \
    train.method=lora train.densemixer=true
contains "$tmp/err" "DenseMixer with train.method lora is not supported" "lora refusal"
test_end test-densemixer
