#!/bin/sh
# test-lora: train.method lora end to end on the demo task (a random qwen3_moe, the demo
# conversations): the adapters lower the validation loss; the PEFT adapter
# (adapter_model.safetensors + adapter_config.json) and the merged checkpoint are written,
# and the merged model's eval loss is below the base model's; a run stopped at step 4 and
# resumed writes the uninterrupted run's adapter and merged weights bit for bit; pp 2 (its
# own gradient path across stages) and the device simulator write the same adapter bit for
# bit; train_router adds the routers as modules_to_save; over bf16 frozen weights
# (model.frozen_weights) the adapters train and the merged export is refused; unknown
# targets are refused with the reason. Routed experts (targets experts, selected): the
# adapter holds PEFT's fused target_parameters tensors, the loss falls, the merged model's
# eval loss is below the base's, a resumed run and the device simulator write the same
# adapter bit for bit, ep 2 ends at the 1-rank run's validation loss (1e-6 relative; the
# rows of an expert are summed in another order), --apply-adapter of the adapter
# directory writes the merged export's bytes and eval.adapter gives its loss, and
# selected trains only
# expert_config's experts. Latent attention (deepseek_v3): its five projections adapted,
# the loss falls, the device simulator bit for bit. The numbers against PEFT itself are
# test_lora's (golden fixtures).
set -u
. "${ESFT_TOP_SRCDIR:-.}/tests/lib.sh"
test_begin lora

demo="$src/input/demo.yaml"
d="$tmp/demo"
common="model.path=$d/model prepare.output=$d/data.h5 data.path=$d/data.h5 prepare.inputs=[$src/input/data/demo.jsonl]"
lora="train.method=lora train.lora.r=4 train.lora.alpha=8 train.lora.targets=[attention] train.steps=8 train.eval_every=4 train.checkpoint_every=4 train.export_merged=true train.lr=1.0e-2"
# shellcheck disable=SC2086 # $common and $lora are lists of overrides
expect 0 "demo model and data" "$esft" "$demo" "phase=[init,prepare]" "run.output_dir=$d" $common

# shellcheck disable=SC2086
expect 0 "lora training" "$esft" "$demo" phase=train "run.output_dir=$d/lora" $common $lora
m="$d/lora/metrics.jsonl"
first=$(losses eval "$m" | head -n 1 | cut -d' ' -f2)
last=$(losses eval "$m" | tail -n 1 | cut -d' ' -f2)
awk -v a="$first" -v b="$last" 'BEGIN { exit !(b < a) }' && ok ||
    fail "lora did not lower the validation loss ($first -> $last)"
echo "validation loss: $first -> $last"
for f in adapter/adapter_model.safetensors adapter/adapter_config.json merged/config.json; do
    [ -s "$d/lora/$f" ] && ok || fail "lora training: $f not written"
done
contains "$d/lora/adapter/adapter_config.json" '"peft_type": "LORA"' "adapter_config.json"
contains "$d/lora/adapter/adapter_config.json" '"model.layers.0.self_attn.q_proj"' "adapter_config.json"
contains "$d/lora/adapter/adapter_model.safetensors" \
    'base_model.model.model.layers.1.self_attn.o_proj.lora_B.weight' "adapter names"

value() { sed -n "s/.*\"$1\": \([^,]*\),*/\1/p" "$2"; }
expect 0 "eval, base" "$esft" "$demo" phase=eval "run.output_dir=$d/eval-base" "model.path=$d/model" \
    "data.path=$d/data.h5"
expect 0 "eval, merged" "$esft" "$demo" phase=eval "run.output_dir=$d/eval-merged" \
    "model.path=$d/lora/merged" "data.path=$d/data.h5"
base=$(value loss "$d/eval-base/eval.json")
merged=$(value loss "$d/eval-merged/eval.json")
awk -v a="$merged" -v b="$base" 'BEGIN { exit !(a < b) }' && ok || fail "eval: merged $merged, base $base"
echo "eval loss: base $base, merged lora $merged"

# stopped at step 4, resumed to 8: the same files as the uninterrupted run
# shellcheck disable=SC2086
expect 0 "lora, 4 steps" "$esft" "$demo" phase=train "run.output_dir=$d/resumed" $common $lora \
    train.steps=4 train.export_merged=false
# shellcheck disable=SC2086
expect 0 "lora, resumed to 8" "$esft" "$demo" phase=train "run.output_dir=$d/resumed" $common $lora
contains "$tmp/out" "resuming from" "lora resume"
for f in adapter/adapter_model.safetensors merged/model.safetensors; do
    cmp -s "$d/lora/$f" "$d/resumed/$f" && ok || fail "resumed run: $f differs"
done

# pipeline parallel: the adapters of each stage's layers live there
# shellcheck disable=SC2086
expect 0 "lora, pp 2" $mpirun 2 "$esft" "$demo" phase=train "run.output_dir=$d/pp2" $common $lora \
    parallel.pp=2 train.export_merged=false
cmp -s "$d/lora/adapter/adapter_model.safetensors" "$d/pp2/adapter/adapter_model.safetensors" && ok ||
    fail "pp 2: the adapter differs from 1 rank's"

# the device simulator (the backend orchestration the CUDA backend runs) writes the same
# adapter as the CPU backend
# shellcheck disable=SC2086
expect 0 "lora, cpu-devsim" "$esft" "$demo" phase=train "run.output_dir=$d/devsim" $common $lora \
    run.backend=cpu-devsim train.export_merged=false
cmp -s "$d/lora/adapter/adapter_model.safetensors" "$d/devsim/adapter/adapter_model.safetensors" &&
    ok || fail "cpu-devsim: the adapter differs from the CPU backend's"

# train.lora.train_router: the routers train in full, saved as PEFT's modules_to_save
# shellcheck disable=SC2086
expect 0 "lora + routers" "$esft" "$demo" phase=train "run.output_dir=$d/router" $common $lora \
    train.steps=2 train.export_merged=false train.lora.train_router=true
contains "$d/router/adapter/adapter_config.json" '"model.layers.0.mlp.gate"' "modules_to_save"
contains "$d/router/adapter/adapter_model.safetensors" 'base_model.model.model.layers.0.mlp.gate.weight' \
    "the router's modules_to_save copy"

# over frozen weights held as bf16 (model.frozen_weights): the adapters stay fp32 and keep
# their initial A (the storage is laid out again for bf16), so they train: the validation
# loss falls and ends within 1e-2 (relative) of the fp32 run's; the merged export, which
# would fold B A into the bf16 weights, is refused before anything is written
# shellcheck disable=SC2086
expect 0 "lora, bf16 frozen weights" "$esft" "$demo" phase=train "run.output_dir=$d/bf16" $common \
    $lora model.frozen_weights=bf16 train.export_merged=false
m16="$d/bf16/metrics.jsonl"
first16=$(losses eval "$m16" | head -n 1 | cut -d' ' -f2)
last16=$(losses eval "$m16" | tail -n 1 | cut -d' ' -f2)
awk -v a="$first16" -v b="$last16" 'BEGIN { exit !(b < a) }' && ok ||
    fail "lora over bf16 weights did not lower the validation loss ($first16 -> $last16)"
near "$last16" "$last" 1e-2 && ok ||
    fail "lora over bf16 weights: final validation loss $last16, fp32 $last"
echo "validation loss over bf16 frozen weights: $first16 -> $last16 (fp32: $last)"
# shellcheck disable=SC2086
expect 2 "lora, bf16, merged export refused" "$esft" "$demo" phase=train \
    "run.output_dir=$d/bad" $common $lora model.frozen_weights=bf16
contains "$tmp/err" "model.frozen_weights bf16 is not supported yet" "bf16 merged export refused"
absent "$d/bad" "bf16 merged export refused"

# routed experts: every expert's gate_up_proj and down_proj pair
ex="train.method=lora train.lora.r=4 train.lora.alpha=8 train.lora.targets=[attention,experts] train.steps=4 train.eval_every=4 train.checkpoint_every=2 train.lr=1.0e-2"
# shellcheck disable=SC2086
expect 0 "lora on experts" "$esft" "$demo" phase=train "run.output_dir=$d/ex" $common $ex \
    train.export_merged=true
eval_loss_falls "$d/ex/metrics.jsonl" "lora on experts"
firstx=$first_eval lastx=$last_eval
contains "$d/ex/adapter/adapter_config.json" '"mlp.experts.gate_up_proj"' "target_parameters"
contains "$d/ex/adapter/adapter_model.safetensors" \
    'base_model.model.model.layers.1.mlp.experts.base_layer.lora_B.weight' "fused expert pairs"
expect 0 "eval, merged experts" "$esft" "$demo" phase=eval "run.output_dir=$d/eval-ex" \
    "model.path=$d/ex/merged" "data.path=$d/data.h5"
mergedx=$(value loss "$d/eval-ex/eval.json")
awk -v a="$mergedx" -v b="$base" 'BEGIN { exit !(a < b) }' && ok ||
    fail "eval: merged experts $mergedx, base $base"
echo "lora on experts: validation loss $firstx -> $lastx; eval: base $base, merged $mergedx"
# the adapter directory read back: --apply-adapter folds it into the base as the merged
# export did (the same bytes), eval.adapter gives the merged model's loss (1e-4: the
# merged checkpoint is rounded to the demo's bf16, the fold is not)
expect 0 "--apply-adapter of the expert pairs" "$esft" --apply-adapter "$d/ex/adapter" "$demo" \
    "model.path=$d/model" "run.output_dir=$d/ex-applied"
cmp -s "$d/ex/merged/model.safetensors" "$d/ex-applied/merged/model.safetensors" && ok ||
    fail "--apply-adapter of a LoRA adapter: not train.export_merged's checkpoint"
expect 0 "eval.adapter, expert pairs" "$esft" "$demo" phase=eval "run.output_dir=$d/eval-exad" \
    "model.path=$d/model" "data.path=$d/data.h5" "eval.adapter=$d/ex/adapter"
folded=$(value loss "$d/eval-exad/eval.json")
near "$folded" "$mergedx" 1e-4 &&
    ok || fail "eval.adapter: loss $folded, the merged checkpoint's $mergedx"
echo "eval.adapter (LoRA directory): $folded, merged checkpoint $mergedx"
# shellcheck disable=SC2086
expect 0 "lora on experts, 2 steps" "$esft" "$demo" phase=train "run.output_dir=$d/ex-resumed" \
    $common $ex train.steps=2 train.export_merged=false
# shellcheck disable=SC2086
expect 0 "lora on experts, resumed" "$esft" "$demo" phase=train "run.output_dir=$d/ex-resumed" \
    $common $ex train.export_merged=false
cmp -s "$d/ex/adapter/adapter_model.safetensors" "$d/ex-resumed/adapter/adapter_model.safetensors" &&
    ok || fail "lora on experts, resumed: the adapter differs"
# shellcheck disable=SC2086
expect 0 "lora on experts, cpu-devsim" "$esft" "$demo" phase=train "run.output_dir=$d/ex-devsim" \
    $common $ex run.backend=cpu-devsim train.export_merged=false
cmp -s "$d/ex/adapter/adapter_model.safetensors" "$d/ex-devsim/adapter/adapter_model.safetensors" &&
    ok || fail "lora on experts, cpu-devsim: the adapter differs from the CPU backend's"
# shellcheck disable=SC2086
expect 0 "lora on experts, ep 2" $mpirun 2 "$esft" "$demo" phase=train "run.output_dir=$d/ex-ep2" \
    $common $ex parallel.ep=2 train.export_merged=false
lastep=$(losses eval "$d/ex-ep2/metrics.jsonl" | tail -n 1 | cut -d' ' -f2)
near "$lastep" "$lastx" 1e-6 && ok ||
    fail "lora on experts, ep 2: final validation loss $lastep, 1 rank $lastx"
# its adapter, each rank writing its experts' share of the fused tensors, read back
expect 0 "eval.adapter, ep 2's adapter" "$esft" "$demo" phase=eval "run.output_dir=$d/eval-ep2" \
    "model.path=$d/model" "data.path=$d/data.h5" "eval.adapter=$d/ex-ep2/adapter"
foldedep=$(value loss "$d/eval-ep2/eval.json")
near "$foldedep" "$folded" 1e-6 &&
    ok || fail "eval.adapter of ep 2's adapter: loss $foldedep, 1 rank's $folded"
# selected: only expert_config's experts train (4 of the 4 x 8)
printf '%s\n' '{"experts": {"0": [2], "1": [5, 6], "2": [], "3": [3]},' \
    '"shared_experts": false, "non_expert_modules": false}' > "$d/ec.json"
# shellcheck disable=SC2086
expect 0 "lora on selected experts" "$esft" "$demo" phase=train "run.output_dir=$d/sel" $common \
    $ex "train.lora.targets=[selected]" "train.expert_config=$d/ec.json" train.steps=2 \
    train.export_merged=false
# each pair r (H + 2I) + r (I + H) = 4 (64 + 64) + 4 (32 + 64) = 896
contains "$d/sel/metrics.jsonl" '"trainable_parameters": 3584,' "selected: 4 experts' pairs train"
# shellcheck disable=SC2086
expect 2 "selected without expert_config" "$esft" "$demo" phase=train "run.output_dir=$d/bad" \
    $common train.method=lora "train.lora.targets=[selected]"
contains "$tmp/err" "train.expert_config, which is not set" "selected without expert_config"
absent "$d/bad" "selected without expert_config"
# shellcheck disable=SC2086
expect 2 "selected, expert_config missing" "$esft" "$demo" phase=train "run.output_dir=$d/bad" \
    $common train.method=lora "train.lora.targets=[selected]" "train.expert_config=$d/none.json"
contains "$tmp/err" "train.expert_config: $d/none.json is not a file" "expert_config missing"
absent "$d/bad" "selected, expert_config missing"

# multi-head latent attention (deepseek_v3 with q_lora_rank): q_a_proj, q_b_proj,
# kv_a_proj_with_mqa, kv_b_proj and o_proj adapted; the device simulator writes the CPU's
# adapter bit for bit
dsc="model.path=$d/ds prepare.output=$d/data.h5 data.path=$d/data.h5 prepare.inputs=[$src/input/data/demo.jsonl]"
# shellcheck disable=SC2086
expect 0 "deepseek_v3 demo model" "$esft" "$demo" phase=init "run.output_dir=$d" $dsc \
    init.family=deepseek_v3 init.q_lora_rank=16
mla="train.method=lora train.lora.r=4 train.lora.alpha=8 train.lora.targets=[attention] train.steps=4 train.eval_every=4 train.lr=1.0e-2 train.export_merged=false"
# shellcheck disable=SC2086
expect 0 "lora on latent attention" "$esft" "$demo" phase=train "run.output_dir=$d/mla" $dsc $mla
eval_loss_falls "$d/mla/metrics.jsonl" "lora on latent attention"
for module in q_a_proj q_b_proj kv_a_proj_with_mqa kv_b_proj o_proj; do
    contains "$d/mla/adapter/adapter_config.json" "\"model.layers.1.self_attn.$module\"" \
        "latent attention targets"
done
# shellcheck disable=SC2086
expect 0 "lora on latent attention, cpu-devsim" "$esft" "$demo" phase=train \
    "run.output_dir=$d/mla-devsim" $dsc $mla run.backend=cpu-devsim
cmp -s "$d/mla/adapter/adapter_model.safetensors" "$d/mla-devsim/adapter/adapter_model.safetensors" &&
    ok || fail "lora on latent attention, cpu-devsim: the adapter differs from the CPU backend's"
echo "lora on latent attention: validation loss $first_eval -> $last_eval"
# shellcheck disable=SC2086
expect 2 "unknown target refused" "$esft" "$demo" phase=train "run.output_dir=$d/bad" $common \
    train.method=lora "train.lora.targets=[w1]"
contains "$tmp/err" "unknown target 'w1'" "unknown target refused"

test_end test-lora
