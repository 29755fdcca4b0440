#!/bin/sh
# test-parallel: expert and pipeline parallelism give the numbers of one rank. On the
# demo model (8 experts, 4 MoE layers), in (pp, dp, ep): the score phase's token counts
# under (1,1,2), (1,2,2), (2,1,1) and (2,1,2) equal one rank's exactly (gate sums within
# 1e-6); 10 ESFT steps and 10 full fine-tuning steps under (1,1,2), (1,2,2), (2,1,1),
# (2,1,2) and (2,2,1) give the (1,1,1) loss curve within 1e-5, and so does ESFT with the
# load-balancing loss; on the trained_qwen2_moe golden fixture, ESFT and full fine-tuning
# under (2,1,1) and (2,2,1) give its 1-rank curve within 1e-5; a checkpoint written at (1,1,2) resumes at (2,1,1) on the
# uninterrupted curve, and so do checkpoints written at (1,1,4) and resumed at (2,1,2) and
# the reverse, rank 0's peak memory during each within 1.3x of the other ranks'; the adapter exported under EP and PP names the same tensors;
# layouts that do not fit the model are refused before anything is loaded or written.
set -u
. "${ESFT_TOP_SRCDIR:-.}/tests/lib.sh"
test_begin parallel
demo="$src/input/demo.yaml"
d="$tmp/demo"
common="model.path=$d/model data.path=$d/data.h5 prepare.output=$d/data.h5 prepare.inputs=[$src/input/data/demo.jsonl]"
# shellcheck disable=SC2086 # $common is a list of overrides
expect 0 "demo up to score" "$esft" "$demo" "phase=[init,prepare,score]" "run.output_dir=$d" $common

# Score: the same routing statistics under EP and PP. Layouts as "ranks pp ep".
for layout in "2 1 2" "4 1 2" "2 2 1" "4 2 2"; do
    set -- $layout
    out="$tmp/score-$1-$2-$3"
    # shellcheck disable=SC2086
    expect 0 "score on $1 ranks, pp $2, ep $3" $mpirun "$1" "$esft" "$demo" phase=score \
        "run.output_dir=$out" $common "parallel.pp=$2" "parallel.ep=$3"
    for run in "$d" "$out"; do
        # shellcheck disable=SC2086
        select_both "$demo" "$run" $common
    done
    same_scores "$d/select-token/expert_config.json" "$out/select-token/expert_config.json" 0 && ok ||
        fail "$1 ranks, pp $2, ep $3: token scores differ from one rank's"
    same_scores "$d/select-gate/expert_config.json" "$out/select-gate/expert_config.json" 1e-6 && ok ||
        fail "$1 ranks, pp $2, ep $3: gate scores differ from one rank's by more than 1e-6"
done

# Train: the same loss curves under EP, for ESFT and full fine-tuning.
# shellcheck disable=SC2086
"$esft" "$demo" phase=select "run.output_dir=$d" $common "select.stats=[$d/routing_stats.h5]" \
    select.top_p=0.5 >/dev/null 2>&1 && ok || fail "select"
short="train.expert_config=$d/expert_config.json train.steps=10 train.global_batch=8 train.eval_every=100 train.checkpoint_every=100"
for method in esft full; do
    # shellcheck disable=SC2086
    expect 0 "$method on 1 rank" "$esft" "$demo" phase=train "run.output_dir=$tmp/$method-1" \
        $common $short "train.method=$method"
    for layout in "2 1 2" "4 1 2" "2 2 1" "4 2 2" "4 2 1"; do
        set -- $layout
        out="$tmp/$method-$1-$2-$3"
        # shellcheck disable=SC2086
        expect 0 "$method on $1 ranks, pp $2, ep $3" $mpirun "$1" "$esft" "$demo" phase=train \
            "run.output_dir=$out" $common $short "train.method=$method" "parallel.pp=$2" "parallel.ep=$3"
        same_curve "$tmp/$method-1/metrics.jsonl" "$out/metrics.jsonl" 1e-5 && ok ||
            fail "$method, $1 ranks, pp $2, ep $3: not the 1-rank curve: $(paste -d' ' "$tmp/a.txt" "$tmp/b.txt" | head -n 3)"
    done
done
# The same on a golden fixture: trained_qwen2_moe (3 layers, 7 experts with a gated
# shared expert, vocabulary 270, so the demo's byte tokens fit). Its 7 experts admit no ep
# below 7; the pipeline layouts (2,1,1) and (2,2,1) are checked here, ESFT and full.
fx="$src/tests/golden/trained_qwen2_moe"
fxcommon="model.path=$fx data.path=$d/data.h5"
# shellcheck disable=SC2086
"$esft" "$demo" phase=score "run.output_dir=$tmp/fx" $fxcommon >/dev/null 2>&1 &&
    "$esft" "$demo" phase=select "run.output_dir=$tmp/fx" $fxcommon \
        "select.stats=[$tmp/fx/routing_stats.h5]" select.top_p=0.5 >/dev/null 2>&1 && ok ||
    fail "score and select on the fixture"
fxshort="train.expert_config=$tmp/fx/expert_config.json train.steps=10 train.global_batch=8 train.eval_every=100 train.checkpoint_every=100"
for method in esft full; do
    # shellcheck disable=SC2086
    expect 0 "fixture, $method on 1 rank" "$esft" "$demo" phase=train \
        "run.output_dir=$tmp/fx-$method-1" $fxcommon $fxshort "train.method=$method"
    for layout in "2 2 1" "4 2 1"; do
        set -- $layout
        out="$tmp/fx-$method-$1-$2-$3"
        # shellcheck disable=SC2086
        expect 0 "fixture, $method on $1 ranks, pp $2" $mpirun "$1" "$esft" "$demo" phase=train \
            "run.output_dir=$out" $fxcommon $fxshort "train.method=$method" "parallel.pp=$2"
        same_curve "$tmp/fx-$method-1/metrics.jsonl" "$out/metrics.jsonl" 1e-5 && ok ||
            fail "fixture, $method, $1 ranks, pp $2: not the 1-rank curve: $(paste -d' ' "$tmp/a.txt" "$tmp/b.txt" | head -n 3)"
    done
done
# the deck's own stage split: 1 layer, then 3
# shellcheck disable=SC2086
expect 0 "esft, stages of 1 and 3 layers" $mpirun 2 "$esft" "$demo" phase=train \
    "run.output_dir=$tmp/split" $common $short parallel.pp=2 "parallel.stage_layers=[1,3]"
grep -q "pipeline stages: layers 0-0, 1-3" "$tmp/out" && ok || fail "the stage split is not reported"
same_curve "$tmp/esft-1/metrics.jsonl" "$tmp/split/metrics.jsonl" 1e-5 && ok ||
    fail "stages of 1 and 3 layers: not the 1-rank curve"
# with the load-balancing loss (ESFT: frozen routers; in full fine-tuning a large
# coefficient drives the routers to near-ties, where 1e-9 differences flip a top-k choice)
aux="train.aux_loss_coef=0.5 train.micro_batch=2"
# shellcheck disable=SC2086
expect 0 "aux on 1 rank" "$esft" "$demo" phase=train "run.output_dir=$tmp/aux-1" $common $short $aux
# shellcheck disable=SC2086
expect 0 "aux, pp 2, ep 2" $mpirun 4 "$esft" "$demo" phase=train "run.output_dir=$tmp/aux-4" \
    $common $short $aux parallel.pp=2 parallel.ep=2
same_curve "$tmp/aux-1/metrics.jsonl" "$tmp/aux-4/metrics.jsonl" 1e-5 && ok ||
    fail "aux loss, pp 2, ep 2: not the 1-rank curve: $(paste -d' ' "$tmp/a.txt" "$tmp/b.txt" | head -n 3)"
grep -q '"expert_weights_mib"' "$tmp/esft-2-1-2/metrics.jsonl" && ok || fail "no memory report"

# The adapter exported under EP and under PP names the 1-rank adapter's tensors.
names() { grep -a -o '"model\.[^"]*"' "$1" | sort; }
names "$tmp/esft-1/adapter/adapter.safetensors" >"$tmp/a.txt"
for run in esft-2-1-2 esft-2-2-1; do
    names "$tmp/$run/adapter/adapter.safetensors" >"$tmp/b.txt"
    [ -s "$tmp/a.txt" ] && cmp -s "$tmp/a.txt" "$tmp/b.txt" && ok ||
        fail "the adapter of $run names other tensors: $(diff "$tmp/a.txt" "$tmp/b.txt" | head -n 4)"
done

# A checkpoint written under (1,1,2) resumes under (2,1,1): 5 steps at ep 2, then to
# step 10 in 2 pipeline stages, on the uninterrupted curve.
out="$tmp/relayout"
# shellcheck disable=SC2086
expect 0 "5 steps at ep 2" $mpirun 2 "$esft" "$demo" phase=train "run.output_dir=$out" $common \
    $short train.steps=5 parallel.ep=2
# shellcheck disable=SC2086
expect 0 "resumed at pp 2" $mpirun 2 "$esft" "$demo" phase=train "run.output_dir=$out" $common \
    $short train.resume=auto parallel.pp=2
grep -q "resuming from" "$tmp/out" && ok || fail "the pp 2 run did not resume"
same_curve "$tmp/esft-1/metrics.jsonl" "$out/metrics.jsonl" 1e-5 && ok ||
    fail "resumed under another layout: not the 1-rank curve: $(paste -d' ' "$tmp/a.txt" "$tmp/b.txt" | head -n 8)"

# Checkpoints written by every rank under (1,1,4) resume under (2,1,2), and the other way
# round: 5 steps, then to step 10 under the other layout, on the uninterrupted curve.
# Rank 0's peak memory during the checkpoint written under (1,1,4) (metrics.jsonl: the
# first of the first pair's, the second of the second's) is within 1.3x of the smallest
# of the other ranks', which hold the same share: it holds no more than its own tensors.
for pair in "1 4 2 2 1" "2 2 1 4 2"; do
    set -- $pair
    out="$tmp/relayout-$1-$2"
    # shellcheck disable=SC2086
    expect 0 "5 steps at pp $1 ep $2" $mpirun 4 "$esft" "$demo" phase=train "run.output_dir=$out" \
        $common $short train.steps=5 parallel.pp=$1 parallel.ep=$2
    # shellcheck disable=SC2086
    expect 0 "resumed at pp $3 ep $4" $mpirun 4 "$esft" "$demo" phase=train "run.output_dir=$out" \
        $common $short train.resume=auto parallel.pp=$3 parallel.ep=$4
    grep -q "resuming from" "$tmp/out" && ok || fail "the pp $3 ep $4 run did not resume"
    same_curve "$tmp/esft-1/metrics.jsonl" "$out/metrics.jsonl" 1e-5 && ok ||
        fail "written at pp $1 ep $2, resumed at pp $3 ep $4: not the 1-rank curve: $(paste -d' ' "$tmp/a.txt" "$tmp/b.txt" | head -n 8)"
    grep '"checkpoint"' "$out/metrics.jsonl" | tr -d '[],' | awk -v ep4="$5" '
        { n++; if (n != ep4) next
          for (i = 1; i < NF; i++) {
              if ($i == "\"rank0_peak_rss_mib\":") r0 = $(i + 1)
              if ($i == "\"others_peak_rss_mib\":") least = $(i + 1) }
          print "checkpoint peak: rank 0 " r0 " MiB, others from " least " MiB" }
        END { exit (n != 2 || r0 == "" || r0 > 1.3 * least) }' >"$tmp/peaks.txt" && ok ||
        fail "ep 4: rank 0's checkpoint memory above 1.3x the others': $(cat "$tmp/peaks.txt")"
done

# Layouts that do not fit the model: status 2, the reason, nothing written.
# shellcheck disable=SC2086
expect 2 "ep 3 with 8 experts" $mpirun 3 "$esft" "$demo" phase=train "run.output_dir=$tmp/bad" \
    $common $short parallel.ep=3
grep -q "num_experts (8) is not divisible by ep (3)" "$tmp/err" && ok || fail "ep 3: message"
# shellcheck disable=SC2086
expect 2 "pp 5 with 4 layers" $mpirun 5 "$esft" "$demo" phase=score "run.output_dir=$tmp/bad" \
    $common parallel.pp=5
grep -q "pp (5) is larger than the model's 4 decoder layers" "$tmp/err" && ok || fail "pp 5: message"
# shellcheck disable=SC2086
expect 2 "a stage split of 3 layers" $mpirun 2 "$esft" "$demo" phase=score "run.output_dir=$tmp/bad" \
    $common parallel.pp=2 "parallel.stage_layers=[1,2]"
grep -q "parallel.stage_layers adds up to 3 layers; the model has 4" "$tmp/err" && ok ||
    fail "stage_layers: message"
[ -e "$tmp/bad" ] && fail "a refused layout left $tmp/bad" || ok

test_end test-parallel
