#!/bin/sh
# test-train: the train phase end to end on the demo task (a random qwen3_moe, the demo
# conversations): ESFT lowers the validation loss; frozen tensors come out bitwise
# unchanged and only trainable tensors have optimizer state; 2 ranks give the 1-rank loss
# curve (global batch 8); a run stopped by SIGUSR1, or killed with SIGKILL mid-run,
# resumes to the uninterrupted run's curve bit for bit; a damaged checkpoint is refused by
# name and passed over by train.resume: auto (back on the curve); a checkpoint of another
# deck (lr, data) is refused unless forced; bad settings are refused; esft --apply-adapter
# rebuilds the merged export from the adapter.
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
# the ESFT reference's own adapter layout loads by its rule (strict), with esft's values
expect 0 "ESFT reference layout" "$check" reference "$d/model" "$d/esft/adapter"

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
# esft --apply-adapter: the adapter over the base model, written as a checkpoint, is the
# train phase's merged export byte for byte
expect 0 "apply-adapter" "$esft" --apply-adapter "$d/esft/adapter" "$demo" "model.path=$d/model" \
    "run.output_dir=$d/applied"
cmp -s "$d/esft/merged/model.safetensors" "$d/applied/merged/model.safetensors" && ok ||
    fail "apply-adapter: not the train phase's merged checkpoint"
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
        [ "$status" = 3 ] && ok || fail "SIGUSR1: exit status $status, want 3 (stopped, resumable)"
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

# Damaged checkpoints: 64 bytes of a tensor inverted on disk in the newest checkpoint of
# a 4-step run. Resuming that file by name is refused, naming the file and the tensor;
# train.resume: auto passes over it with a warning, falls back to step 2 and ends on the
# straight run's curve bit for bit; with every checkpoint damaged, auto is an error
# naming each. Under pp 2 only the last stage reads the damaged tensor: every rank
# decides the same.
damaged="$d/damaged"
# shellcheck disable=SC2086
expect 0 "damaged: first half" "$esft" "$demo" phase=train "run.output_dir=$damaged" $common $base \
    train.steps=4
tensor=$(head -n 1 "$d/trainable_tensors.txt")
newest="$damaged/checkpoints/step-00000004.h5"
expect 0 "damage step 4" "$check" damage "$newest" "/tensors/$tensor" 64
# shellcheck disable=SC2086
expect 2 "damaged checkpoint by name" "$esft" "$demo" phase=train "run.output_dir=$damaged" \
    $common $base "train.resume=$newest"
contains "$tmp/err" "$newest: damaged: tensor '$tensor' in /tensors does not match its checksum" \
    "damaged checkpoint by name"
# shellcheck disable=SC2086
expect 0 "damaged: auto falls back" "$esft" "$demo" phase=train "run.output_dir=$damaged" $common \
    $base
contains "$tmp/err" "warning: $newest: damaged: tensor '$tensor'" "damaged: the warning"
contains "$tmp/err" "falling back to $damaged/checkpoints/step-00000002.h5" "damaged: fallback"
contains "$tmp/out" "resuming from $damaged/checkpoints/step-00000002.h5 at step 2" "damaged: resume"
same_curve "$d/straight/metrics.jsonl" "$damaged/metrics.jsonl" 0 && ok ||
    fail "after a fallback the curve differs: $(diff "$tmp/a.txt" "$tmp/b.txt" | head -n 4)"
for step in 6 8; do
    expect 0 "damage step $step" "$check" damage "$damaged/checkpoints/step-0000000$step.h5" \
        "/adam_v/$tensor" 64
done
# shellcheck disable=SC2086
expect 2 "every checkpoint damaged" "$esft" "$demo" phase=train "run.output_dir=$damaged" $common \
    $base train.steps=10
contains "$tmp/err" "no intact checkpoint in $damaged/checkpoints" "every checkpoint damaged"
for step in 6 8; do
    contains "$tmp/err" "step-0000000$step.h5: damaged: tensor '$tensor' in /adam_v" \
        "every checkpoint damaged: step $step named"
done
last=$(tail -n 1 "$d/trainable_tensors.txt") # the highest layer's: the last stage holds it
damaged="$d/damaged-pp2"
newest="$damaged/checkpoints/step-00000004.h5"
# shellcheck disable=SC2086
expect 0 "damaged, pp 2: first half" $mpirun 2 "$esft" "$demo" phase=train \
    "run.output_dir=$damaged" $common $base train.steps=4 parallel.pp=2
expect 0 "damage step 4 (pp 2)" "$check" damage "$newest" "/tensors/$last" 64
# shellcheck disable=SC2086
expect 2 "damaged checkpoint by name, pp 2" $mpirun 2 "$esft" "$demo" phase=train \
    "run.output_dir=$damaged" $common $base "train.resume=$newest" parallel.pp=2
contains "$tmp/err" "$newest: damaged: tensor '$last' in /tensors" "damaged by name, pp 2"
# shellcheck disable=SC2086
expect 0 "damaged, pp 2: auto falls back" $mpirun 2 "$esft" "$demo" phase=train \
    "run.output_dir=$damaged" $common $base train.steps=6 parallel.pp=2
[ "$(grep -c "falling back to $damaged/checkpoints/step-00000002.h5" "$tmp/err")" = 1 ] && ok ||
    fail "damaged, pp 2: not one fallback warning"
same_curve "$d/straight/metrics.jsonl" "$damaged/metrics.jsonl" 1e-5 6 && ok ||
    fail "damaged, pp 2: the curve differs: $(paste -d' ' "$tmp/a.txt" "$tmp/b.txt" | head -n 6)"

# Another run's checkpoint (README's sweep in one output directory): after a run to step
# 3, the same directory with another train.lr is refused before training (on 1 and on 2
# ranks), naming the key with both values and the ways out; a longer train.steps
# continues on the straight run's curve; the same data under another path continues;
# another dataset is refused naming data.path; a train.steps below the checkpoint's is
# refused; train.resume: force continues, with a warning listing the differences.
sweep="$d/sweep"
# shellcheck disable=SC2086
expect 0 "sweep: 3 steps" "$esft" "$demo" phase=train "run.output_dir=$sweep" $common $base \
    train.steps=3
# shellcheck disable=SC2086
expect 2 "another lr" "$esft" "$demo" phase=train "run.output_dir=$sweep" $common $base \
    train.steps=6 train.lr=3e-5
contains "$tmp/err" "step-00000003.h5 was written by a run whose deck differs" "another lr"
grep -q "^  train.lr: checkpoint [0-9.e-]*, deck 3e-05$" "$tmp/err" && ok ||
    fail "another lr: train.lr not named with both values"
contains "$tmp/err" "train.resume: force" "another lr: the hint"
lacks "$sweep/metrics.jsonl" '"step": 4,' "another lr: trained"
# shellcheck disable=SC2086
expect 2 "another lr and global batch, 2 ranks" $mpirun 2 "$esft" "$demo" phase=train "run.output_dir=$sweep" \
    $common $base train.steps=6 train.lr=3e-5 train.global_batch=8
contains "$tmp/err" "train.global_batch: checkpoint 4, deck 8" "another global batch, 2 ranks"
contains "$tmp/err" "train.lr: checkpoint" "another lr, 2 ranks"
# shellcheck disable=SC2086
expect 0 "longer train.steps" "$esft" "$demo" phase=train "run.output_dir=$sweep" $common $base \
    train.steps=5
contains "$tmp/out" "resuming from $sweep/checkpoints/step-00000003.h5 at step 3" "longer steps"
same_curve "$d/straight/metrics.jsonl" "$sweep/metrics.jsonl" 0 5 && ok ||
    fail "longer train.steps: the curve differs: $(diff "$tmp/a.txt" "$tmp/b.txt" | head -n 4)"
cp "$d/data.h5" "$tmp/moved.h5"
# shellcheck disable=SC2086
expect 0 "the same data moved" "$esft" "$demo" phase=train "run.output_dir=$sweep" $common $base \
    train.steps=6 "data.path=$tmp/moved.h5"
contains "$tmp/out" "resuming from $sweep/checkpoints/step-00000005.h5" "the same data moved"
head -n 40 "$src/input/data/demo.jsonl" >"$tmp/other.jsonl"
expect 0 "another dataset: prepare" "$esft" "$demo" phase=prepare "run.output_dir=$tmp/prepare" \
    "prepare.inputs=[$tmp/other.jsonl]" "prepare.output=$tmp/other.h5"
# shellcheck disable=SC2086
expect 2 "another dataset" "$esft" "$demo" phase=train "run.output_dir=$sweep" $common $base \
    train.steps=7 "data.path=$tmp/other.h5"
contains "$tmp/err" "data.path: checkpoint data hash" "another dataset"
contains "$tmp/err" "other.h5" "another dataset: its path"
# shellcheck disable=SC2086
expect 2 "a shorter train.steps" "$esft" "$demo" phase=train "run.output_dir=$sweep" $common \
    $base train.steps=4
contains "$tmp/err" "is at step 6, past this deck's train.steps (4): nothing to train" \
    "a shorter train.steps"
# shellcheck disable=SC2086
expect 0 "force" "$esft" "$demo" phase=train "run.output_dir=$sweep" $common $base train.steps=7 \
    train.lr=3e-5 train.resume=force
contains "$tmp/err" "train.resume: force: continuing $sweep/checkpoints/step-00000006.h5" "force"
contains "$tmp/err" "train.lr: checkpoint" "force: the difference listed"
contains "$tmp/out" "resuming from $sweep/checkpoints/step-00000006.h5 at step 6" "force: resumed"

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
[ -e "$d/bad" ] && fail "a refused train run left $d/bad" || ok

# model.frozen_weights: bf16 on an fp32 checkpoint (so the rounding changes values): the
# merged export's frozen tensors are the checkpoint's, bit for bit (read again, not their
# bf16 rounding); 2 ranks (ep 2: experts gathered from the other rank) give the 1-rank
# curve, and the device simulator the CPU's, bit for bit.
b="$tmp/bf16"
expect 0 "fp32 demo model" "$esft" "$demo" phase=init "run.output_dir=$b" "model.path=$b/model" \
    init.dtype=fp32
bf16="model.path=$b/model data.path=$d/data.h5 train.expert_config=$d/expert_config.json"
bf16="$bf16 model.frozen_weights=bf16 train.steps=4 train.global_batch=8 train.eval_every=2"
# shellcheck disable=SC2086
expect 0 "bf16 frozen weights" "$esft" "$demo" phase=train "run.output_dir=$b/np1" $bf16 \
    train.export_merged=true
cat "$tmp/out" "$tmp/err" | grep -q "frozen matrices bf16" && ok ||
    fail "bf16 frozen weights: the weights line does not say so"
expect 0 "bf16 frozen weights: frozen tensors exported unchanged" "$check" frozen "$b/model" \
    "$b/np1/merged" "$d/trainable_tensors.txt"
# shellcheck disable=SC2086
expect 0 "bf16 frozen weights, ep 2" $mpirun 2 "$esft" "$demo" phase=train "run.output_dir=$b/np2" \
    $bf16 parallel.ep=2 train.export_merged=true
same_curve "$b/np1/metrics.jsonl" "$b/np2/metrics.jsonl" 1e-5 && ok ||
    fail "bf16 frozen weights: ep 2 does not give the 1-rank curve"
expect 0 "bf16 frozen weights, ep 2: frozen tensors exported unchanged" "$check" frozen "$b/model" \
    "$b/np2/merged" "$d/trainable_tensors.txt"
# shellcheck disable=SC2086
expect 0 "bf16 frozen weights, devsim" "$esft" "$demo" phase=train "run.output_dir=$b/sim" $bf16 \
    run.backend=cpu-devsim
same_curve "$b/np1/metrics.jsonl" "$b/sim/metrics.jsonl" 0 && ok ||
    fail "bf16 frozen weights: the device simulator's curve differs from the CPU's"
# shellcheck disable=SC2086
expect 0 "fp32 frozen weights, same model" "$esft" "$demo" phase=train "run.output_dir=$b/fp32" \
    $bf16 model.frozen_weights=fp32
if same_curve "$b/np1/metrics.jsonl" "$b/fp32/metrics.jsonl" 0; then
    fail "bf16 frozen weights: the curve is bitwise fp32's on an fp32 checkpoint (bf16 not used?)"
else
    ok
fi
same_curve "$b/np1/metrics.jsonl" "$b/fp32/metrics.jsonl" 1e-2 && ok ||
    fail "bf16 frozen weights: the curve is not within 1e-2 of fp32's"
# eval with the adapter over bf16 frozen weights (the adapter's tensors rounded as the
# base's): within 1e-2 of the fp32 eval, and not equal to it
for fw in fp32 bf16; do
    expect 0 "eval, adapter, $fw frozen weights" "$esft" "$demo" phase=eval \
        "run.output_dir=$b/eval-$fw" "model.path=$b/model" "data.path=$d/data.h5" \
        "eval.adapter=$b/np1/adapter/adapter.safetensors" "model.frozen_weights=$fw"
done
e32=$(value loss "$b/eval-fp32/eval.json")
e16=$(value loss "$b/eval-bf16/eval.json")
awk -v a="$e32" -v b="$e16" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(a != b && d < 1e-2 * a) }' &&
    ok || fail "eval with bf16 frozen weights: loss $e16, fp32 $e32"

test_end test-train
