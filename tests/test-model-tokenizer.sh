#!/bin/sh
# test-model-tokenizer: a checkpoint that carries its own tokenizer and chat template (the
# real Qwen2/Qwen3 tokenizer of tests/tokenizer/qwen, the Qwen3 MoE template) through
# prepare -> score -> select -> train -> eval, the model's vocabulary sized to the
# tokenizer (151,936 as Qwen3's); and the refusals that keep ids the model cannot read
# out of training: a byte-tokenized dataset given to that model is refused before any
# work, by a phase and by the check before a deck's first phase.
set -u
. "${ESFT_TOP_SRCDIR:-.}/tests/lib.sh"
test_begin model-tokenizer

demo="$src/input/demo.yaml"
d="$tmp/run"
m="$d/model"
small="init.hidden_size=32 init.num_layers=2 init.num_heads=2 init.num_kv_heads=1 init.head_dim=16 init.intermediate_size=64 init.moe_intermediate_size=16 init.vocab_size=151936"
# shellcheck disable=SC2086 # $small is a list of overrides
expect 0 "init" "$esft" "$demo" phase=init "run.output_dir=$d" "model.path=$m" $small
gzip -dc "$src/tests/tokenizer/qwen/tokenizer.json.gz" >"$m/tokenizer.json"
cp "$src/tests/chat/qwen3_moe.jinja" "$m/chat_template.jinja"
echo '{"bos_token": null, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}' \
    >"$m/tokenizer_config.json"

# prepare.tokenizer: auto finds the checkpoint's tokenizer; the whole pipeline runs on it.
common="run.output_dir=$d model.path=$m prepare.output=$d/data.h5 data.path=$d/data.h5 prepare.inputs=[$src/input/data/demo.jsonl] prepare.tokenizer=auto train.steps=6 train.eval_every=3 train.checkpoint_every=0 score.n_sample_tokens=2048"
# shellcheck disable=SC2086
expect 0 "prepare to train" "$esft" "$demo" "phase=[prepare,score,select,train]" $common
contains "$tmp/out" "prepare: tokenizer $m/tokenizer.json (vocabulary 151669, chat template $m/chat_template.jinja)" "prepare to train"
contains "$tmp/out" "prepare: 64 samples" "prepare to train"
[ -s "$d/expert_config.json" ] && ok || fail "select wrote no expert_config.json"
# the selection says what produced it: the dataset and the tokenizer it was made with
contains "$d/expert_config.json" "\"tokenizer\": \"$m/tokenizer.json\"" "provenance"
contains "$d/expert_config.json" "\"dataset\": \"$d/data.h5\"" "provenance"
[ -s "$d/adapter/adapter.safetensors" ] && ok || fail "train wrote no adapter"
# shellcheck disable=SC2086
expect 0 "eval" "$esft" "$demo" phase=eval $common "eval.adapter=$d/adapter/adapter.safetensors"
[ -s "$d/eval.json" ] && ok || fail "eval wrote no eval.json"

# A byte-tokenized dataset: refused by score before any work, naming both tokenizers.
# shellcheck disable=SC2086
expect 0 "byte dataset" "$esft" "$demo" phase=prepare $common prepare.tokenizer=byte \
    "prepare.output=$d/byte.h5"
rm -rf "$d/score-byte"
# shellcheck disable=SC2086
expect 2 "byte dataset refused" "$esft" "$demo" phase=score $common "data.path=$d/byte.h5" \
    "run.output_dir=$d/score-byte"
contains "$tmp/err" "$d/byte.h5 was tokenized by byte (the built-in byte tokenizer)" "byte dataset refused"
contains "$tmp/err" "has its own tokenizer ($m/tokenizer.json" "byte dataset refused"
absent "$d/score-byte/routing_stats.h5" "byte dataset refused"
# ... and by the check before the first phase, when prepare is set up with byte in the
# same deck: nothing is written, not even the dataset.
# shellcheck disable=SC2086
expect 2 "byte prepare refused" "$esft" "$demo" "phase=[prepare,score]" $common \
    prepare.tokenizer=byte "prepare.output=$d/never.h5" "data.path=$d/never.h5"
contains "$tmp/err" "as prepare is set up in this deck" "byte prepare refused"
absent "$d/never.h5" "byte prepare refused"

test_end test-model-tokenizer
