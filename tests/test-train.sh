#!/bin/sh
# test-train: the train phase end to end on the demo task (a random qwen3_moe, the demo
# conversations): ESFT lowers the validation loss; frozen tensors come out bitwise
# unchanged and only trainable tensors have optimizer state; 2 ranks give the 1-rank loss
# curve (global batch 8); a run stopped by SIGUSR1, or killed with SIGKILL mid-run,
# resumes to the uninterrupted run's curve bit for bit; bad settings are refused.
set -u
. "${ESFT_TOP_SRCDIR:-.}/tests/lib.sh"
test_begin train
check="$build/tests/test_train_check"

demo="$src/input/demo.yaml"
d="$tmp/demo"
common="model.path=$d/model prepare.output=$d/data.h5 data.path=$d/data.h5 prepare.inputs=[$src/input/data/demo.jsonl] train.expert_config=$d/expert_config.json"
# shellcheck disable=SC2086 # $common is a list of overrides
expect 0 "demo up to select" "$esft" "$demo" "phase=[init,prepare,score,select]" "run.output_dir=$d" $common

# ESFT lowers the validation loss; exports the adapter, the merged model and the curve.
# shellcheck disable=SC2086
expect 0 "esft training" "$esft" "$demo" phase=train "run.output_dir=$d/esft" $common \
    train.export_merged=true
m="$d/esft/metrics.jsonl"
first=$(losses eval "$m" | head -n 1 | cut -d' ' -f2)
last=$(losses eval "$m" | tail -n 1 | cut -d' ' -f2)
awk -v a="$first" -v b="$last" 'BEGIN { exit !(b < a) }' && ok ||
    fail "esft did not lower the validation loss ($first -> $last)"
echo "validation loss: $first -> $last"
for f in adapter/adapter.safetensors adapter/expert_config.json merged/config.json loss.svg; do
    [ -s "$d/esft/$f" ] && ok || fail "esft training: $f not written"
done
expect 0 "frozen tensors unchanged" "$check" frozen "$d/model" "$d/esft/merged" "$d/trainable_tensors.txt"
latest=$(ls "$d/esft/checkpoints/"step-*.h5 | tail -n 1)
expect 0 "optimizer state only for trainable tensors" "$check" optimizer "$latest" "$d/trainable_tensors.txt"

# Eval: the adapter over the base model gives the merged model's numbers exactly, and a
# lower loss than the base model; under pp 2 and ep 2 the same loss; a bad adapter is
# refused naming the tensor, with no eval.json.
value() { sed -n "s/.*\"$1\": \([^,]*\),*/\1/p" "$2"; }
evaldata="model.path=$d/model data.path=$d/data.h5"
expect 0 "eval, base" "$esft" "$demo" phase=eval "run.output_dir=$d/eval-base" $evaldata
expect 0 "eval, adapter" "$esft" "$demo" phase=eval "run.output_dir=$d/eval-adapter" $evaldata \
    "eval.adapter=$d/esft/adapter/adapter.safetensors"
expect 0 "eval, merged" "$esft" "$demo" phase=eval "run.output_dir=$d/eval-merged" \
    "model.path=$d/esft/merged" "data.path=$d/data.h5"
base=$(value loss "$d/eval-base/eval.json")
adapted=$(value loss "$d/eval-adapter/eval.json")
merged=$(value loss "$d/eval-merged/eval.json")
[ -n "$adapted" ] && [ "$adapted" = "$merged" ] && ok || fail "eval: adapter $adapted, merged $merged"
awk -v a="$adapted" -v b="$base" 'BEGIN { exit !(a < b) }' && ok || fail "eval: trained $adapted, base $base"
echo "eval loss: base $base, trained $adapted"
for layout in "2 1" "1 2"; do
    set -- $layout
    # shellcheck disable=SC2086
    expect 0 "eval, pp $1 ep $2" $mpirun 2 "$esft" "$demo" phase=eval "run.output_dir=$d/eval-$1-$2" \
        $evaldata "eval.adapter=$d/esft/adapter/adapter.safetensors" "parallel.pp=$1" "parallel.ep=$2"
    other=$(value loss "$d/eval-$1-$2/eval.json")
    awk -v a="$adapted" -v b="$other" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(d <= 1e-6 * a) }' &&
        ok || fail "eval under pp $1 ep $2: loss $other, one rank $adapted"
done
# (one tensor renamed in the header, its length kept: perl is in every Debian system)
perl -0777 -pe 's/model\.layers\./model.lagers./' "$d/esft/adapter/adapter.safetensors" \
    >"$tmp/bad-adapter.safetensors"
expect 2 "eval, bad adapter" "$esft" "$demo" phase=eval "run.output_dir=$d/eval-bad" $evaldata \
    "eval.adapter=$tmp/bad-adapter.safetensors"
contains "$tmp/err" "is not a tensor of the model" "bad adapter message"
absent "$d/eval-bad/eval.json" "a refused eval"

# The same run on 2 ranks (global batch 8): the same loss curve within 1e-5.
short="train.steps=10 train.global_batch=8 train.eval_every=100 train.checkpoint_every=100"
# shellcheck disable=SC2086
expect 0 "1 rank" "$esft" "$demo" phase=train "run.output_dir=$d/np1" $common $short
# shellcheck disable=SC2086
expect 0 "2 ranks" $mpirun 2 "$esft" "$demo" phase=train "run.output_dir=$d/np2" $common $short
same_curve "$d/np1/metrics.jsonl" "$d/np2/metrics.jsonl" 1e-5 && ok ||
    fail "2 ranks do not give the 1-rank loss curve: $(paste -d' ' "$tmp/a.txt" "$tmp/b.txt" | head -n 3)"
grep -q '"aux_loss": [0-9]' "$d/np1/metrics.jsonl" && ok || fail "the aux loss is not reported when off"

# With the load-balancing loss (2 micro-batches per rank on 2 ranks, 4 on 1): training
# changes (its gradient reaches the selected experts of lower layers through the router
# inputs), and 2 ranks still give the 1-rank curve: a micro-batch holds the same blocks
# for any rank count.
aux="train.aux_loss_coef=0.5 train.micro_batch=2"
# shellcheck disable=SC2086
expect 0 "aux, 1 rank" "$esft" "$demo" phase=train "run.output_dir=$d/aux1" $common $short $aux
# shellcheck disable=SC2086
expect 0 "aux, 2 ranks" $mpirun 2 "$esft" "$demo" phase=train "run.output_dir=$d/aux2" $common $short $aux
same_curve "$d/aux1/metrics.jsonl" "$d/aux2/metrics.jsonl" 1e-5 && ok ||
    fail "with the aux loss, 2 ranks do not give the 1-rank curve: $(paste -d' ' "$tmp/a.txt" "$tmp/b.txt" | head -n 3)"
same_curve "$d/np1/metrics.jsonl" "$d/aux1/metrics.jsonl" 1e-9 && fail "the aux loss changed nothing" || ok

# Resume: 8 steps straight; 4 steps then 8 with resume (same constant schedule); a run
# stopped by SIGUSR1; a run killed with SIGKILL. All end on the same curve, bit for bit.
base="train.steps=8 train.global_batch=4 train.checkpoint_every=2 train.eval_every=100"
# shellcheck disable=SC2086
expect 0 "straight run" "$esft" "$demo" phase=train "run.output_dir=$d/straight" $common $base
# shellcheck disable=SC2086
expect 0 "first half" "$esft" "$demo" phase=train "run.output_dir=$d/halves" $common $base train.steps=4
# shellcheck disable=SC2086
expect 0 "second half" "$esft" "$demo" phase=train "run.output_dir=$d/halves" $common $base
contains_resume=$(grep -c "resuming from" "$tmp/out")
[ "$contains_resume" = 1 ] && ok || fail "second half did not resume"
same_curve "$d/straight/metrics.jsonl" "$d/halves/metrics.jsonl" 0 && ok ||
    fail "resumed curve differs: $(diff "$tmp/a.txt" "$tmp/b.txt" | head -n 4)"

for how in USR1 KILL; do
    out="$d/signal-$how"
    # a long run, stopped after step 3 (whichever step the signal lands on, the
    # resumed run must reproduce steps 1-8 of the straight run)
    # shellcheck disable=SC2086
    "$esft" "$demo" phase=train "run.output_dir=$out" $common $base train.steps=400 >"$tmp/run.out" 2>&1 &
    pid=$!
    i=0
    until [ -f "$out/metrics.jsonl" ] && grep -q '"step": 3,' "$out/metrics.jsonl"; do
        i=$((i + 1))
        [ $i -gt 600 ] && break
        sleep 0.05
    done
    kill -"$how" $pid 2>/dev/null
    wait $pid 2>/dev/null
    status=$?
    if [ "$how" = USR1 ]; then
        [ "$status" = 0 ] && ok || fail "SIGUSR1: exit status $status"
        grep -q "stopped by signal" "$tmp/run.out" && ok || fail "SIGUSR1: no stop message"
    fi
    for f in "$out"/checkpoints/step-*.h5; do
        [ -e "$f" ] || continue
        expect 0 "$how: $(basename "$f") reads" "$check" optimizer "$f" "$d/trainable_tensors.txt"
    done
    # shellcheck disable=SC2086
    expect 0 "resume after $how" "$esft" "$demo" phase=train "run.output_dir=$out" $common $base \
        train.steps=12
    grep -q "resuming from" "$tmp/out" && ok || fail "after $how: no resume"
    same_curve "$d/straight/metrics.jsonl" "$out/metrics.jsonl" 0 8 && ok ||
        fail "after $how the curve differs: $(diff "$tmp/a.txt" "$tmp/b.txt" | head -n 4)"
done

# Refused settings: nothing trains, status 2, the deck position named.
# shellcheck disable=SC2086
expect 2 "indivisible global batch" $mpirun 2 "$esft" "$demo" phase=train "run.output_dir=$d/bad" $common \
    train.global_batch=5
grep -q "train.global_batch (5) is not divisible" "$tmp/err" && ok || fail "indivisible global batch message"
# shellcheck disable=SC2086
expect 2 "missing expert config" "$esft" "$demo" phase=train "run.output_dir=$d/bad" $common \
    "train.expert_config=$d/absent.json"
grep -q "absent.json" "$tmp/err" && ok || fail "missing expert config message"
# One layer under two spellings ("2" and "02") is refused (it overflowed the layer's list).
printf '{"experts": {"2": [1], "02": [3]}}\n' >"$tmp/twice.json"
# shellcheck disable=SC2086
expect 2 "a layer spelled twice" "$esft" "$demo" phase=train "run.output_dir=$d/bad" $common \
    "train.expert_config=$tmp/twice.json"
grep -q 'experts key "02" is not a MoE layer' "$tmp/err" && ok || fail "a layer spelled twice message"
# shellcheck disable=SC2086
expect 2 "lora not yet" "$esft" "$demo" phase=train "run.output_dir=$d/bad" $common train.method=lora
[ -e "$d/bad" ] && fail "a refused train run left $d/bad" || ok

test_end test-train
