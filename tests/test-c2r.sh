#!/bin/sh
# test-c2r: C2R as a user meets it through the esft program, on a small random qwen3_moe
# model: score (2 ranks, ep 2) with parallel.expert_placement c2r reports the all-to-all
# bytes of both placements and writes the c2r placement; select with select.c2r_top_t
# writes c2r_config.json (config.json plus top_t and collaborative_list); train with
# model.routing c2r runs, its losses differ from top-k routing, the device simulator
# gives the CPU's losses bit for bit and ep 2 the one-rank curve; what is not implemented
# is refused before anything runs. (test_grad holds C2R's routing and gradients to
# PyTorch; test_c2r the pure parts.)
set -u
. "${ESFT_TOP_SRCDIR:-.}/tests/lib.sh"
test_begin c2r

cat >"$tmp/deck.yaml" <<EOF
phase: [init, prepare, score, select]
run:
  output_dir: $tmp/run
model:
  path: $tmp/model
init:
  family: qwen3_moe
  hidden_size: 32
  num_layers: 2
  num_heads: 2
  num_kv_heads: 1
  head_dim: 16
  vocab_size: 272
  intermediate_size: 64
  moe_intermediate_size: 16
  num_experts: 8
  top_k: 2
prepare:
  inputs: [$src/input/data/demo.jsonl]
  output: $tmp/data.h5
  tokenizer: byte
data:
  path: $tmp/data.h5
  seq_len: 128
score:
  n_sample_tokens: 2048
parallel:
  ep: 2
  expert_placement: c2r
select:
  c2r_top_t: 3
train:
  steps: 2
  global_batch: 2
  micro_batch: 1
  method: full
  lr: 1.0e-2
EOF
expect 0 "score and select with C2R" $mpirun 2 "$esft" "$tmp/deck.yaml"
contains "$tmp/out" "all-to-all per training step, ep 2" "placement report"
contains "$tmp/out" "c2r placement" "placement report"
contains "$tmp/run/c2r_config.json" '"top_t": 3' "c2r_config.json"
contains "$tmp/run/c2r_config.json" '"collaborative_list"' "c2r_config.json"
contains "$tmp/run/c2r_config.json" '"num_experts": 8' "c2r_config.json keeps config.json"
contains "$tmp/run/expert_placement.json" '"placement":"c2r"' "expert_placement.json"
# one row per destination rank never sends more than one row per (token, expert)
line=$(grep "all-to-all per training step" "$tmp/out")
slot=$(echo "$line" | sed 's/.*as esft sends \([0-9.]*\) MiB.*/\1/')
contiguous=$(echo "$line" | sed 's/.*contiguous placement \([0-9.]*\) MiB.*/\1/')
awk -v a="$slot" -v b="$contiguous" 'BEGIN { exit !(b > 0 && b <= a) }' && ok ||
    fail "placement report: contiguous $contiguous MiB above one row per slot $slot MiB"

# training under C2R routing: CPU and device simulator alike, not top-k's curve
common="phase=[train] model.c2r_config=$tmp/run/c2r_config.json parallel.ep=1 parallel.expert_placement=contiguous"
expect 0 "train, c2r, cpu" "$esft" "$tmp/deck.yaml" $common model.routing=c2r run.output_dir="$tmp/cpu" run.backend=cpu
contains "$tmp/out" "C2R routing, the other 1 experts among the first one's top 3" "train c2r"
expect 0 "train, c2r, devsim" "$esft" "$tmp/deck.yaml" $common model.routing=c2r run.output_dir="$tmp/devsim" run.backend=cpu-devsim
expect 0 "train, top-k" "$esft" "$tmp/deck.yaml" $common run.output_dir="$tmp/topk" run.backend=cpu
same_curve "$tmp/cpu/metrics.jsonl" "$tmp/devsim/metrics.jsonl" 0 && ok ||
    fail "c2r: the device simulator's losses differ from the CPU's"
expect 0 "train, c2r, ep 2" $mpirun 2 "$esft" "$tmp/deck.yaml" $common model.routing=c2r parallel.ep=2 run.output_dir="$tmp/ep2" run.backend=cpu
same_curve "$tmp/cpu/metrics.jsonl" "$tmp/ep2/metrics.jsonl" 1e-6 && ok ||
    fail "c2r: ep 2 gives another loss curve than one rank"
same_curve "$tmp/cpu/metrics.jsonl" "$tmp/topk/metrics.jsonl" 0 &&
    fail "c2r: the same losses as top-k routing" || ok

# refused before anything runs
expect 2 "placement c2r in train" "$esft" "$tmp/deck.yaml" $common parallel.expert_placement=c2r run.output_dir="$tmp/no1"
contains "$tmp/err" "parallel.expert_placement c2r is not implemented for train" "placement c2r in train"
absent "$tmp/no1" "placement c2r in train"
printf '{"top_t": 1, "collaborative_list": [[], []]}\n' >"$tmp/bad.json"
expect 2 "bad c2r_config" "$esft" "$tmp/deck.yaml" phase=[train] model.routing=c2r model.c2r_config="$tmp/bad.json" parallel.ep=1 parallel.expert_placement=contiguous run.output_dir="$tmp/no3"
contains "$tmp/err" "collaborative_list[0] must hold 8 lists" "bad c2r_config"
expect 2 "placement c2r without ep" "$esft" "$tmp/deck.yaml" phase=[score] parallel.ep=1 run.output_dir="$tmp/no4"
contains "$tmp/err" "parallel.expert_placement c2r needs parallel.ep above 1" "placement c2r without ep"
expect 2 "c2r_top_t without co-activation" "$esft" "$tmp/deck.yaml" "phase=[score,select]" parallel.ep=1 parallel.expert_placement=contiguous score.coactivation=false run.output_dir="$tmp/no5"
contains "$tmp/err" "no co-activation counts" "c2r_top_t without co-activation"
absent "$tmp/no5/c2r_config.json" "c2r_top_t without co-activation"

test_end test-c2r
