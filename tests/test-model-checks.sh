#!/bin/sh
# test-model-checks: the model at model.path as a user meets it.
# - A load failure that only one rank sees (an expert tensor that only EP rank 1 loads) is
#   reported once, by rank 0, with the failing rank's own message and number, and every
#   rank exits with status 2.
# - Sizes are checked before anything is allocated or written: config.json sizes beyond
#   esft's limits, sizes the checkpoint's tensors do not have, init sizes (or their
#   products) beyond the limits; --dry-run reads and checks config.json as the run does.
# - A hub id (owner/name) is found in a Hugging Face cache; without one, the message says
#   how to download the model.
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

# A copy of the model whose config.json has sed expression $2 applied.
variant() {
    mkdir "$tmp/$1" && cp "$tmp/model/"* "$tmp/$1/" &&
        sed "$2" "$tmp/model/config.json" >"$tmp/$1/config.json"
}

# --dry-run reads config.json: no experts is refused as the run refuses it.
variant no-experts 's/"num_experts": 8/"num_experts": 0/; s/"num_local_experts": 8/"num_local_experts": 0/'
for dry in --dry-run ""; do
    # shellcheck disable=SC2086 # $dry is an option or nothing
    expect 2 "num_experts 0 $dry" "$esft" $dry "$demo" phase=score "model.path=$tmp/no-experts" \
        "run.output_dir=$tmp/out-no-experts" $paths
    contains "$tmp/err" "$tmp/no-experts/config.json: key 'num_experts': must be positive, got 0" \
        "num_experts 0 $dry"
    absent "$tmp/out-no-experts" "num_experts 0 $dry"
done

# train.aux_loss_coef > 0 on a deepseek / glm router is refused before anything runs:
# transformers adds no aux loss there, and esft's softmax balance loss would be another.
# preflight reads only config.json and sees that a weights file exists.
mkdir -p "$tmp/glm"
cat >"$tmp/glm/config.json" <<'EOF'
{"model_type": "glm4_moe", "architectures": ["Glm4MoeForCausalLM"], "hidden_size": 64,
 "intermediate_size": 128, "moe_intermediate_size": 32, "num_hidden_layers": 2,
 "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 272,
 "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
 "n_shared_experts": 1, "first_k_dense_replace": 1}
EOF
: >"$tmp/glm/model.safetensors"
# shellcheck disable=SC2086 # $paths is a list of overrides
expect 2 "aux loss on glm4_moe" "$esft" "$demo" phase=train "model.path=$tmp/glm" \
    "run.output_dir=$tmp/out-glm" train.method=full train.aux_loss_coef=0.01 $paths
contains "$tmp/err" "train.aux_loss_coef (0.01) must be 0 for glm4_moe ($tmp/glm): its sigmoid \
router has no balance loss in transformers, and the ESFT reference's sequence-level loss is \
DeepSeek-V2's (softmax scores)" "aux loss on glm4_moe"
absent "$tmp/out-glm" "aux loss on glm4_moe"

# Sizes beyond esft's limits: refused by name, status 2 (not 'out of memory', status 1).
variant wide 's/"hidden_size": 64/"hidden_size": 2147483647/'
# shellcheck disable=SC2086
expect 2 "hidden_size 2147483647" $mpirun 2 "$esft" "$demo" phase=score "model.path=$tmp/wide" \
    "run.output_dir=$tmp/out-wide" $paths
contains "$tmp/err" "$tmp/wide/config.json: key 'hidden_size': 2147483647 exceeds esft's limit of 65536" \
    "hidden_size 2147483647"
lacks "$tmp/err" "out of memory" "hidden_size 2147483647"
absent "$tmp/out-wide" "hidden_size 2147483647"

# Sizes within the limits that the tensors do not have (a terabyte of embedding): found
# in the safetensors headers before the model is allocated, by --dry-run too.
variant huge 's/"hidden_size": 64/"hidden_size": 65536/; s/"vocab_size": 272/"vocab_size": 4194304/'
for dry in --dry-run ""; do
    # shellcheck disable=SC2086
    expect 2 "sizes the tensors lack $dry" $mpirun 2 "$esft" $dry "$demo" phase=score \
        "model.path=$tmp/huge" "run.output_dir=$tmp/out-huge" parallel.ep=2 $paths
    contains "$tmp/err" "tensor 'model.embed_tokens.weight': expected shape [4194304, 65536], got [272, 64] (vocab_size x hidden_size of $tmp/huge/config.json)" \
        "sizes the tensors lack $dry"
    n=$(grep -c "expected shape" "$tmp/err")
    [ "$n" = 1 ] && ok || fail "sizes the tensors lack $dry: reported $n times"
    lacks "$tmp/err" "out of memory" "sizes the tensors lack $dry"
    absent "$tmp/out-huge" "sizes the tensors lack $dry"
done

# init: a size beyond its limit is a deck error; sizes within their limits whose
# products are not are refused too; fast, with or without --dry-run, nothing written.
for dry in --dry-run ""; do
    start=$(date +%s)
    # shellcheck disable=SC2086
    expect 2 "init.num_experts=2147483647 $dry" "$esft" $dry "$demo" phase=init \
        "model.path=$tmp/init-big" "run.output_dir=$tmp/out-init" init.num_experts=2147483647
    [ $(($(date +%s) - start)) -le 20 ] && ok || fail "init.num_experts=2147483647 $dry: slow refusal"
    contains "$tmp/err" "init.num_experts=2147483647: must be in [1, 4096], got 2147483647" \
        "init.num_experts=2147483647 $dry"
    # shellcheck disable=SC2086
    expect 2 "init with 6 million tensors $dry" "$esft" $dry "$demo" phase=init \
        "model.path=$tmp/init-big" "run.output_dir=$tmp/out-init" init.num_experts=4096 \
        init.num_layers=512
    contains "$tmp/err" "num_hidden_layers 512 and num_experts 4096 give" \
        "init with 6 million tensors $dry"
    contains "$tmp/err" "more than esft's limit of 1048576" "init with 6 million tensors $dry"
    absent "$tmp/init-big" "refused init $dry"
    absent "$tmp/out-init" "refused init $dry"
done

# A hub id: found in a Hugging Face cache (HF_HOME/hub/models--owner--name), the snapshot
# refs/main names, logged and used by --dry-run and the run.
snapshots="$tmp/hf/hub/models--o--n/snapshots"
mkdir -p "$snapshots/abc" "$snapshots/old" "$tmp/hf/hub/models--o--n/refs"
for f in "$tmp/model/"*; do ln -s "$f" "$snapshots/abc/"; done
printf abc >"$tmp/hf/hub/models--o--n/refs/main"
# shellcheck disable=SC2086
expect 0 "hub id, --dry-run" env HF_HOME="$tmp/hf" "$esft" --dry-run "$demo" phase=score model.path=o/n $paths
contains "$tmp/out" "model.path o/n: the Hugging Face cache's snapshot abc (refs/main): $snapshots/abc" \
    "hub id, --dry-run"
contains "$tmp/out" "path: \"$snapshots/abc\"" "hub id, --dry-run prints the snapshot"
# shellcheck disable=SC2086
expect 0 "hub id, score" env HF_HOME="$tmp/hf" $mpirun 2 "$esft" "$demo" phase=score model.path=o/n \
    "run.output_dir=$tmp/out-hub" parallel.ep=2 $paths
contains "$tmp/out" "snapshot abc (refs/main)" "hub id, score"
[ -s "$tmp/out-hub/routing_stats.h5" ] && ok || fail "hub id, score: no statistics written"
# HF_HUB_CACHE wins over HF_HOME.
# shellcheck disable=SC2086
expect 0 "hub id, HF_HUB_CACHE" env HF_HOME="$tmp/none" HF_HUB_CACHE="$tmp/hf/hub" "$esft" --dry-run \
    "$demo" phase=score model.path=o/n $paths
contains "$tmp/out" "snapshot abc (refs/main)" "hub id, HF_HUB_CACHE"
# Without refs/main: the only snapshot, else the newest.
mkdir -p "$tmp/hf/hub/models--o--one/snapshots/s1" "$tmp/hf/hub/models--o--two/snapshots/newer" \
    "$tmp/hf/hub/models--o--two/snapshots/older"
for f in "$tmp/model/"*; do
    for d in models--o--one/snapshots/s1 models--o--two/snapshots/newer models--o--two/snapshots/older; do
        ln -s "$f" "$tmp/hf/hub/$d/"
    done
done
touch -d 2001-01-01 "$tmp/hf/hub/models--o--two/snapshots/older"
# shellcheck disable=SC2086
expect 0 "hub id, one snapshot" env HF_HOME="$tmp/hf" "$esft" --dry-run "$demo" phase=score model.path=o/one $paths
contains "$tmp/out" "snapshot s1 (its only snapshot)" "hub id, one snapshot"
# shellcheck disable=SC2086
expect 0 "hub id, two snapshots" env HF_HOME="$tmp/hf" "$esft" --dry-run "$demo" phase=score model.path=o/two $paths
contains "$tmp/out" "snapshot newer (the newest of 2; refs/main names none)" "hub id, two snapshots"
# Not in the cache: status 2 and how to download it.
# shellcheck disable=SC2086
expect 2 "hub id not in the cache" env HF_HOME="$tmp/none" "$esft" "$demo" phase=score \
    model.path=Qwen/Qwen3-30B-A3B "run.output_dir=$tmp/out-nohub" $paths
contains "$tmp/err" "model.path 'Qwen/Qwen3-30B-A3B' is not a directory" "hub id not in the cache"
contains "$tmp/err" "esft reads local checkpoint directories" "hub id not in the cache"
contains "$tmp/err" "huggingface-cli download Qwen/Qwen3-30B-A3B --local-dir DIR" "hub id not in the cache"
absent "$tmp/out-nohub" "hub id not in the cache"

test_end test-model-checks
