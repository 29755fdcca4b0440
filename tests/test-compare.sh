#!/bin/sh
# test-compare: input/compare.yaml, the paper's methods side by side (a zip sweep over
# train.method and select.score_function), run whole (shared phases, 6 points, summary;
# 10 training steps instead of 20), and its table held to facts computed here:
#   - a row per method, each done, every loss finite;
#   - trained parameters from the model's config.json (and each ESFT point's
#     expert_config.json): full and densemixer train the whole model, frozen_router all
#     but the routers, ESFT its selected experts (3 x hidden x moe_intermediate each),
#     LoRA r x (in + out) per adapted projection (q, k, v, o; r = 8, the deck's default);
#   - optimizer bytes = 8 x trained parameters (AdamW's two fp32 moments, one rank);
#   - each point's eval loss is its trained model's (not the base model's): within the
#     adapter's bf16 rounding of its own last validation loss, on the same held-out
#     samples (eval.split validation), and unlike the base model's, evaluated here too;
#   - the general dataset (prepare.extra_*, eval.extra_data) has a column with every
#     point's loss; curves.svg draws one training curve per point.
set -u
. "${ESFT_TOP_SRCDIR:-.}/tests/lib.sh"
test_begin compare
unset ESFT ESFT_HOME ESFT_LAUNCHER ESFT_LAUNCH_ECHO ESFT_SWEEP_LAUNCH SLURM_JOB_ID
out="$tmp/runs"
deck="$src/input/compare.yaml"
set -- "run.output_dir=$out" "model.path=$out/model" "prepare.output=$out/data.h5" \
    "data.path=$out/data.h5" "prepare.inputs=[$src/input/data/demo.jsonl]" \
    "prepare.extra_inputs=[$src/input/data/general.jsonl]" "prepare.extra_output=$out/general.h5" \
    "eval.extra_data=[$out/general.h5]" train.steps=10 train.eval_every=5

expect 0 "--sweep list" "$esft" --sweep list "$deck" "$@"
n=$(grep -c -v '^#' "$tmp/out")
[ "$n" = 6 ] && ok || fail "compare.yaml: $n points, expected 6"
contains "$tmp/out" "# per-point phases: select train eval" "select, train and eval per point"
expect 0 "the shared phases" "$esft" "$deck" "$@" --sweep shared
[ -s "$out/general.h5" ] && ok || fail "prepare wrote no second dataset"
i=0
while [ $i -lt 6 ]; do
    expect 0 "point $i" "$esft" "$deck" "$@" --sweep-point $i
    i=$((i + 1))
done
expect 0 "--sweep summary" "$esft" --sweep summary "$deck" "$@"
csv="$out/sweep/summary.csv"
contains "$tmp/out" "6 points (6 done, 0 running, 0 stopped, 0 failed, 0 not started)" "every point done"

# column NAME: the CSV column of that header
column() { head -n 1 "$csv" | tr ',' '\n' | grep -n -x -F "$1" | cut -d: -f1; }
# cell METHOD SCORE_FUNCTION COLUMN
cell() {
    awk -F, -v m="$1" -v f="$2" -v c="$(column "$3")" 'NR > 1 && $3 == m && $4 == f { print $c }' "$csv"
}
for c in trained_parameters optimizer_bytes eval_loss eval_loss_general.h5 final_val_loss step_seconds; do
    [ -n "$(column "$c")" ] && ok || fail "summary.csv has no column $c"
done

# the model's parameter counts, from its config.json
config="$out/model/config.json"
get() { sed -n "s/.*\"$1\": *\([0-9]*\).*/\1/p" "$config" | head -n 1; }
H=$(get hidden_size) L=$(get num_hidden_layers) NH=$(get num_attention_heads)
KV=$(get num_key_value_heads) D=$(get head_dim) V=$(get vocab_size) I=$(get moe_intermediate_size)
E=$(get num_experts)
grep -q '"tie_word_embeddings": false' "$config" && ok || fail "the test counts an untied lm_head"
grep -q '"mlp_only_layers": \[\]' "$config" && ok || fail "the test counts MoE in every layer"
attention=$((H * NH * D + 2 * H * KV * D + NH * D * H + 2 * D)) # q, k, v, o; q_norm, k_norm
router=$((E * H))
expert=$((3 * H * I))
total=$((2 * V * H + H + L * (attention + 2 * H + router + E * expert)))
lora=$((L * 8 * ((H + NH * D) + 2 * (H + KV * D) + (NH * D + H))))
for pair in esft:token esft:gate full:token frozen_router:token lora:token densemixer:token; do
    m=${pair%%:*} f=${pair#*:}
    dir="$out/sweep/method-$(echo "$m" | tr _ -)_score_function-$f"
    case $m in
    esft) # the experts its expert_config.json names
        chosen=$(sed -n '/"experts"/,/}/p' "$dir/expert_config.json" | grep -o '\[[0-9, ]*\]' |
            tr -d '[]' | tr ',' '\n' | grep -c '[0-9]')
        want=$((chosen * expert)) ;;
    full | densemixer) want=$total ;;
    frozen_router) want=$((total - L * router)) ;;
    lora) want=$lora ;;
    esac
    got=$(cell "$m" "$f" trained_parameters)
    [ "$got" = "$want" ] && ok || fail "$m/$f: $got trained parameters, expected $want"
    bytes=$(cell "$m" "$f" optimizer_bytes)
    [ "$bytes" = "$((8 * want))" ] && ok || fail "$m/$f: $bytes optimizer bytes, expected 8 x $want"
    [ "$(cell "$m" "$f" status)" = done ] && ok || fail "$m/$f: not done"
    for c in final_loss final_val_loss eval_loss eval_loss_general.h5 step_seconds; do
        v=$(cell "$m" "$f" "$c")
        awk -v v="$v" 'BEGIN { exit !(v + 0 == v && v != "" && v > 0 && v < 1e6) }' && ok ||
            fail "$m/$f: $c is '$v'"
    done
    # its eval is its own trained model's, on the samples train validated on
    awk -v a="$(cell "$m" "$f" eval_loss)" -v b="$(cell "$m" "$f" final_val_loss)" \
        'BEGIN { d = a - b; if (d < 0) d = -d; exit !(d < 2e-3 * b) }' && ok ||
        fail "$m/$f: eval loss $(cell "$m" "$f" eval_loss) is not its last validation loss $(cell "$m" "$f" final_val_loss)"
    contains "$dir/eval.json" '"split": "validation"' "$m/$f: the held-out split"
done
[ "$(cell full token trained_parameters)" = "$total" ] && ok || fail "full does not train the whole model"
# select's choice is named for the methods that train it only
[ -n "$(cell esft gate experts_chosen)" ] && [ -z "$(cell lora token experts_chosen)" ] && ok ||
    fail "experts: esft '$(cell esft gate experts_chosen)', lora '$(cell lora token experts_chosen)'"

# The base model on the same samples: every method moved away from it.
sed '/^sweep:/,$d' "$deck" >"$tmp/base.yaml"
expect 0 "eval of the base model" "$esft" "$tmp/base.yaml" "$@" phase=eval eval.adapter=none \
    "run.output_dir=$out/base"
base=$(sed -n 's/^  "loss": \([^,]*\),*/\1/p' "$out/base/eval.json")
grep -q '"adapter": null' "$out/base/eval.json" && ok || fail "eval.adapter none applied an adapter"
for pair in esft:token full:token lora:token; do
    a=$(cell "${pair%%:*}" "${pair#*:}" eval_loss)
    awk -v a="$a" -v b="$base" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(d > 1e-3) }' && ok ||
        fail "$pair: eval loss $a is the base model's ($base)"
done

# A failure after the run's first event leaves an end line (a summary reads it as failed,
# not running): select runs, then eval is given a file that is no adapter.
expect 2 "eval of a file that is no adapter" "$esft" "$tmp/base.yaml" "$@" "phase=[select, eval]" \
    "select.stats=[$out/routing_stats.h5]" "eval.adapter=$config" "run.output_dir=$out/bad"
tail -n 1 "$out/bad/metrics.jsonl" | grep -q '"event": "end", "status": 2' && ok ||
    fail "a failed eval left no end line: $(tail -n 1 "$out/bad/metrics.jsonl")"

# Derived, not written: eval after a shared train (a sweep over eval's own keys) reads
# the shared run's adapter; method lora's eval needs its merged checkpoint.
cp "$tmp/base.yaml" "$tmp/eval-sweep.yaml"
echo 'sweep: {eval.batch: [1, 2]}' >>"$tmp/eval-sweep.yaml"
expect 0 "--sweep list, eval alone per point" "$esft" --sweep list "$tmp/eval-sweep.yaml" "$@"
contains "$tmp/out" "# per-point phases: eval" "a sweep over eval.batch shares train"
# (the shared run of this deck never ran: its adapter is missing, and so named)
expect 2 "--dry-run of that point" "$esft" --dry-run "$tmp/eval-sweep.yaml" "$@" --sweep-point 1
contains "$tmp/out" "adapter: \"$out/adapter/adapter.safetensors\"" "a per-point eval after a shared train"
contains "$tmp/err" "eval.adapter: $out/adapter/adapter.safetensors is not a file" \
    "the shared run's adapter, checked before the point runs"
expect 0 "--dry-run, method lora" "$esft" --dry-run "$tmp/base.yaml" "$@" train.method=lora \
    "phase=[train, eval]"
contains "$tmp/out" "model: \"$out/merged\"" "lora: eval reads the merged checkpoint"
expect 2 "method lora without its merged checkpoint" "$esft" --dry-run "$tmp/base.yaml" "$@" \
    train.method=lora train.export_merged=false "phase=[train, eval]"
contains "$tmp/err" "eval after a train of method lora evaluates its merged checkpoint" \
    "lora without train.export_merged"

# The training curves: one line per point, named by it.
n=$(grep -c '<polyline' "$out/sweep/curves.svg")
[ "$n" = 6 ] && ok || fail "curves.svg: $n lines, expected 6"
contains "$out/sweep/curves.svg" "method-lora_score_function-token" "curves.svg legend"
contains "$out/sweep/summary.md" "| eval loss general.h5 |" "the general dataset's column"

test_end test-compare
