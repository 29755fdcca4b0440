#!/bin/sh
# test-apply-adapter: esft --apply-adapter on the golden fixtures' ESFT adapters
# (tests/golden/<fixture>/esft_adapter/, made by esft_adapter_reference.py): each merged
# checkpoint (gpt_oss's in transformers' fused layout) keeps the base's config.json and, loaded as a plain model, gives the logits
# of transformers with the adapter applied (test_apply_adapter with MERGED_ROOT); on 2
# ranks (pp 2, dp 2) the merged checkpoint is the same bit for bit; an adapter given as
# its directory is taken; a LoRA adapter directory as PEFT saved it (expert pairs on
# mixtral) is folded in, pp 2 writing 1 rank's bytes; the user's mistakes are refused with
# status 2 and nothing written: a missing adapter, another family's adapter, a PEFT
# adapter file without its adapter_config.json, a DoRA adapter, an output that holds a
# checkpoint already, --dry-run with --apply-adapter.
set -u
. "${ESFT_TOP_SRCDIR:-.}/tests/lib.sh"
test_begin apply-adapter

golden="$src/tests/golden"
deck="$src/input/demo.yaml"
for fixture in qwen2_moe qwen3_moe olmoe mixtral gpt_oss; do
    expect 0 "$fixture: --apply-adapter" "$esft" --apply-adapter \
        "$golden/$fixture/esft_adapter/adapter.safetensors" "$deck" "model.path=$golden/$fixture" \
        "run.output_dir=$tmp/$fixture"
    contains "$tmp/out" "tensors of $golden/$fixture/esft_adapter/adapter.safetensors over" \
        "$fixture: tensors applied"
    cmp -s "$golden/$fixture/config.json" "$tmp/$fixture/merged/config.json" && ok ||
        fail "$fixture: the merged config.json is not the base's"
done
expect 0 "logits of the merged checkpoints" "$build/tests/test_apply_adapter" "$golden" "$tmp"
cat "$tmp/out"

# the adapter's directory; 2 ranks as pp 2, then as dp 2
q="$golden/qwen3_moe"
expect 0 "adapter directory" "$esft" --apply-adapter "$q/esft_adapter" "$deck" "model.path=$q" \
    "run.output_dir=$tmp/dir"
cmp -s "$tmp/qwen3_moe/merged/model.safetensors" "$tmp/dir/merged/model.safetensors" && ok ||
    fail "adapter directory: another merged checkpoint"
expect 0 "pp 2" $mpirun 2 "$esft" --apply-adapter "$q/esft_adapter" "$deck" "model.path=$q" \
    "run.output_dir=$tmp/pp2" parallel.pp=2
cmp -s "$tmp/qwen3_moe/merged/model.safetensors" "$tmp/pp2/merged/model.safetensors" && ok ||
    fail "pp 2: the merged checkpoint differs from 1 rank's"
expect 0 "dp 2" $mpirun 2 "$esft" --apply-adapter "$q/esft_adapter" "$deck" "model.path=$q" \
    "run.output_dir=$tmp/dp2"
cmp -s "$tmp/qwen3_moe/merged/model.safetensors" "$tmp/dp2/merged/model.safetensors" && ok ||
    fail "dp 2: the merged checkpoint differs from 1 rank's"

# a LoRA adapter directory as PEFT saved it (tests/golden/lora_reference.py) folded in;
# pp 2 writes 1 rank's bytes; test_lora holds the fold to PEFT's merged logits
m="$golden/mixtral"
expect 0 "LoRA adapter with expert pairs" "$esft" --apply-adapter "$m/lora_experts_adapter" \
    "$deck" "model.path=$m" "run.output_dir=$tmp/lora"
contains "$tmp/out" "36 tensors of $m/lora_experts_adapter over" "LoRA adapter folded in"
expect 0 "LoRA adapter, pp 2" $mpirun 2 "$esft" --apply-adapter "$m/lora_experts_adapter" \
    "$deck" "model.path=$m" "run.output_dir=$tmp/lora-pp2" parallel.pp=2
cmp -s "$tmp/lora/merged/model.safetensors" "$tmp/lora-pp2/merged/model.safetensors" && ok ||
    fail "LoRA adapter, pp 2: the merged checkpoint differs from 1 rank's"
mkdir "$tmp/dora" && cp "$m/lora_experts_adapter/adapter_model.safetensors" "$tmp/dora/" &&
    sed 's/"use_dora": false/"use_dora": true/' "$m/lora_experts_adapter/adapter_config.json" \
        >"$tmp/dora/adapter_config.json"
expect 2 "DoRA adapter refused" "$esft" --apply-adapter "$tmp/dora" "$deck" "model.path=$m" \
    "run.output_dir=$tmp/bad"
contains "$tmp/err" "adapter_config.json: key 'use_dora'" "DoRA adapter refused"
absent "$tmp/bad/merged" "DoRA adapter refused"

# refusals: status 2, the reason, nothing written
expect 2 "missing adapter" "$esft" --apply-adapter "$tmp/none.safetensors" "$deck" "model.path=$q" \
    "run.output_dir=$tmp/bad"
contains "$tmp/err" "none.safetensors: no such file or directory" "missing adapter"
absent "$tmp/bad/merged" "missing adapter"
expect 2 "another family's adapter" $mpirun 2 "$esft" --apply-adapter "$q/esft_adapter" "$deck" \
    "model.path=$golden/mixtral" "run.output_dir=$tmp/bad"
contains "$tmp/err" "is not a tensor of the model (mixtral)" "another family's adapter"
absent "$tmp/bad/merged" "another family's adapter"
mkdir "$tmp/peft" && cp "$q/esft_adapter/adapter.safetensors" "$tmp/peft/adapter_model.safetensors"
expect 2 "PEFT adapter directory" "$esft" --apply-adapter "$tmp/peft" "$deck" "model.path=$q" \
    "run.output_dir=$tmp/bad"
contains "$tmp/err" "without adapter_config.json" "PEFT adapter directory"
absent "$tmp/bad/merged" "PEFT adapter directory"
expect 2 "output holds a checkpoint" "$esft" --apply-adapter "$q/esft_adapter" "$deck" \
    "model.path=$q" "run.output_dir=$tmp/qwen3_moe"
contains "$tmp/err" "already holds a checkpoint" "output holds a checkpoint"
expect 2 "with --dry-run" "$esft" --dry-run --apply-adapter "$q/esft_adapter" "$deck" \
    "model.path=$q" "run.output_dir=$tmp/bad"
contains "$tmp/err" "does not combine with --dry-run" "with --dry-run"
absent "$tmp/bad" "refusals"

test_end test-apply-adapter
