#!/bin/sh
# test-families: the deepseek_v2, deepseek_v3, glm4_moe and gpt_oss families through every
# phase (gpt_oss: sinks, biases, a sliding window that bites, fused experts written).
# For each, init writes a small model of the family (deepseek_v2: MLA without q_lora_rank,
# group-limited greedy routing; deepseek_v3: MLA with q_lora_rank, sigmoid routing with
# groups; glm4_moe: GQA with partial rotary, sigmoid routing; all with a shared expert and
# a dense first layer); the score phase's statistics under (pp, dp, ep) = (1,1,2) and
# (2,1,1) select what one rank's select (token and gate scores, within 1e-6), 5 ESFT steps
# under those layouts give the 1-rank loss curve within 1e-5, the merged export loads
# back, and eval runs on it. The golden fixtures (test_golden, test_grad) hold the math to
# transformers; this holds the phases and the layouts to one rank.
set -u
. "${ESFT_TOP_SRCDIR:-.}/tests/lib.sh"
test_begin families
demo="$src/input/demo.yaml"
data="$tmp/data.h5"
# shellcheck disable=SC2086
expect 0 "prepare the demo data" "$esft" "$demo" phase=prepare "run.output_dir=$tmp/prep" \
    "prepare.output=$data" "prepare.inputs=[$src/input/data/demo.jsonl]"

shape="init.num_layers=4 init.num_experts=8 init.top_k=2 init.n_shared_experts=1 init.first_k_dense_replace=1 init.init_std=0.2"
for family in deepseek_v2 deepseek_v3 glm4_moe gpt_oss; do
    case $family in
    deepseek_v2) extra="init.n_group=4 init.topk_group=2 init.routed_scaling_factor=1.5 init.kv_lora_rank=24 init.qk_nope_head_dim=8 init.qk_rope_head_dim=8 init.v_head_dim=12" ;;
    deepseek_v3) extra="init.n_group=4 init.topk_group=2 init.routed_scaling_factor=2.5 init.q_lora_rank=24 init.kv_lora_rank=24 init.qk_nope_head_dim=8 init.qk_rope_head_dim=8 init.v_head_dim=12 init.top_k=3" ;;
    glm4_moe) extra="init.n_group=2 init.topk_group=1 init.routed_scaling_factor=1.8 init.num_kv_heads=2 init.head_dim=16" ;;
    # sinks, biases, a window of 6 (below the demo samples' lengths) on layers 0 and 2,
    # experts written fused (gate_up_proj, down_proj and their biases)
    gpt_oss) extra="init.intermediate_size=32 init.num_kv_heads=2 init.head_dim=16 init.sliding_window=6 init.swiglu_limit=7" ;;
    esac
    d="$tmp/$family"
    common="model.path=$d/model data.path=$data init.family=$family $shape $extra"
    # shellcheck disable=SC2086
    expect 0 "$family: init and score" "$esft" "$demo" "phase=[init,score]" "run.output_dir=$d" $common
    grep -q "\"model_type\": \"$family\"" "$d/model/config.json" && ok || fail "$family: config.json model_type"
    if [ "$family" = gpt_oss ]; then
        grep -q '"sliding_window": 6' "$d/model/config.json" && ok || fail "gpt_oss: sliding_window"
        "$build/tests/test_model_load" drop "$d/model" "$d/no-fused" \
            model.layers.1.mlp.experts.gate_up_proj_bias >/dev/null 2>&1 && ok ||
            fail "gpt_oss: init did not write the fused model.layers.1.mlp.experts.gate_up_proj_bias"
    fi
    # Score under EP and PP: the same statistics as one rank's.
    for layout in "2 1 2" "2 2 1"; do
        set -- $layout
        out="$d/score-$2-$3"
        # shellcheck disable=SC2086
        expect 0 "$family: score, pp $2, ep $3" $mpirun "$1" "$esft" "$demo" phase=score \
            "run.output_dir=$out" $common "parallel.pp=$2" "parallel.ep=$3"
        for run in "$d" "$out"; do
            # shellcheck disable=SC2086
            select_both "$demo" "$run" $common
        done
        for f in token gate; do
            same_scores "$d/select-$f/expert_config.json" "$out/select-$f/expert_config.json" 1e-6 &&
                ok || fail "$family: pp $2, ep $3: $f scores differ from one rank's"
        done
    done
    # Train: the 1-rank curve under EP and PP.
    # shellcheck disable=SC2086
    "$esft" "$demo" phase=select "run.output_dir=$d" $common "select.stats=[$d/routing_stats.h5]" \
        select.top_p=0.5 >/dev/null 2>&1 && ok || fail "$family: select"
    short="train.expert_config=$d/expert_config.json train.steps=5 train.global_batch=4 train.eval_every=100 train.checkpoint_every=100"
    # shellcheck disable=SC2086
    expect 0 "$family: esft on 1 rank" "$esft" "$demo" phase=train "run.output_dir=$d/train-1" \
        $common $short train.export_merged=true
    for layout in "2 1 2" "2 2 1"; do
        set -- $layout
        out="$d/train-$2-$3"
        # shellcheck disable=SC2086
        expect 0 "$family: esft, pp $2, ep $3" $mpirun "$1" "$esft" "$demo" phase=train \
            "run.output_dir=$out" $common $short "parallel.pp=$2" "parallel.ep=$3"
        same_curve "$d/train-1/metrics.jsonl" "$out/metrics.jsonl" 1e-5 && ok ||
            fail "$family, pp $2, ep $3: not the 1-rank curve: $(paste -d' ' "$tmp/a.txt" "$tmp/b.txt" | head -n 3)"
    done
    if [ "$family" = deepseek_v2 ]; then
        # The ESFT reference's sequence-level balance loss (train.aux_loss_coef): each
        # layer's term is its own, so EP, PP and the device simulator give the 1-rank curve.
        aux="train.aux_loss_coef=0.05"
        # shellcheck disable=SC2086
        expect 0 "$family: aux loss on 1 rank" "$esft" "$demo" phase=train \
            "run.output_dir=$d/aux-1" $common $short $aux
        grep -q '"aux_loss": [1-9]' "$d/aux-1/metrics.jsonl" && ok || fail "$family: no aux loss reported"
        for layout in "2 1 2" "2 2 1" "1 1 1 cpu-devsim"; do
            set -- $layout
            # shellcheck disable=SC2086
            expect 0 "$family: aux loss, pp $2, ep $3 ${4:-}" $mpirun "$1" "$esft" "$demo" \
                phase=train "run.output_dir=$d/aux-$2-$3" $common $short $aux "parallel.pp=$2" \
                "parallel.ep=$3" "run.backend=${4:-cpu}"
            same_curve "$d/aux-1/metrics.jsonl" "$d/aux-$2-$3/metrics.jsonl" 1e-5 && ok ||
                fail "$family, aux loss, pp $2, ep $3 ${4:-}: not the 1-rank curve"
        done
        same_curve "$d/train-1/metrics.jsonl" "$d/aux-1/metrics.jsonl" 1e-9 &&
            fail "$family: the aux loss changed nothing" || ok
    fi
    # The merged export: the base config.json as it was, and a checkpoint eval reads.
    cmp -s "$d/model/config.json" "$d/train-1/merged/config.json" && ok ||
        fail "$family: the merged export's config.json is not the base model's"
    if [ "$family" = gpt_oss ]; then
        "$build/tests/test_model_load" drop "$d/train-1/merged" "$d/merged-no-fused" \
            model.layers.0.mlp.experts.down_proj >/dev/null 2>&1 && ok ||
            fail "gpt_oss: the merged export has no fused model.layers.0.mlp.experts.down_proj"
    fi
    # shellcheck disable=SC2086
    expect 0 "$family: eval on the merged export" "$esft" "$demo" phase=eval \
        "run.output_dir=$d/eval" $common "model.path=$d/train-1/merged"
    [ -s "$d/eval/eval.json" ] && ok || fail "$family: no eval.json"
done

# The CUDA backend has these families' ops (tests/test_device.c holds them to the CPU's on
# a GPU): its preflight accepts each family (a dry run; a build without CUDA refuses
# run.backend cuda itself).
for family in deepseek_v2 deepseek_v3 glm4_moe gpt_oss; do
    if grep -q '^#define HAVE_CUDA 1' "$build/config.h"; then
        expect 0 "$family on the cuda backend: a dry run" "$esft" --dry-run "$demo" phase=score \
            run.backend=cuda "run.output_dir=$tmp/cuda" "model.path=$tmp/$family/model" \
            "data.path=$data"
    else
        expect 2 "$family on the cuda backend, CPU-only build" "$esft" --dry-run "$demo" \
            phase=score run.backend=cuda "run.output_dir=$tmp/cuda" "model.path=$tmp/$family/model" \
            "data.path=$data"
        contains "$tmp/err" "built without CUDA" "cuda backend in a CPU-only build: message"
    fi
done
[ -e "$tmp/cuda" ] && fail "a dry run left $tmp/cuda" || ok

test_end test-families
