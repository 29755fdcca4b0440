#!/bin/sh
# test-prepare: the prepare phase through the esft program: a good run on 1 and 2 ranks
# (same bytes), a bad row under bad_rows: abort (status 2, `FILE:LINE:` on stderr, nothing
# written, an older dataset left as it was), the same under skip (warned, counted, at
# most 20 printed), an input that cannot be opened, missing and bad tokenizer files, a
# checkpoint's tokenizer and template (1 and 3 ranks, same bytes; --inspect; unused keys
# reported), inputs with no usable row. Dataset contents are checked in tests/test_prepare.c.
set -u
. "${ESFT_TOP_SRCDIR:-.}/tests/lib.sh"
test_begin prepare
# deck NAME INPUTS OUTPUT BAD_ROWS [TOKENIZER]: writes $tmp/NAME.yaml.
deck() {
    {
        echo "phase: prepare"
        echo "run:"
        echo "  output_dir: $tmp/run-$1"
        echo "prepare:"
        echo "  inputs: [$2]"
        echo "  output: $3"
        echo "  bad_rows: $4"
        [ $# -ge 5 ] && echo "  tokenizer: $5"
    } >"$tmp/$1.yaml"
}

good='{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}'
{
    echo "$good"
    echo '{"prompt": "2+2", "completion": "4"}'
    echo '{"text": "unterminated"'
    echo '{"text": "fine"}'
} >"$tmp/bad.jsonl"

# A good run: the example data, on 1 rank and on 2; the same file both times.
deck good "$src/input/data/demo.jsonl" "$tmp/data/demo.h5" abort
expect 0 "good run" "$esft" "$tmp/good.yaml"
[ -s "$tmp/data/demo.h5" ] && ok || fail "good run: $tmp/data/demo.h5 not written"
absent "$tmp/data/demo.h5.tmp" "good run"
contains "$tmp/out" "demo.jsonl: 64 rows" "good run: per-file line"
contains "$tmp/out" "prepare: 64 samples" "good run: summary"
contains "$tmp/run-good/metrics.jsonl" '"event": "prepare"' "good run: metrics"
contains "$tmp/run-good/metrics.jsonl" '"samples": 64' "good run: metrics"
expect 0 "good run on 2 ranks" $mpirun 2 "$esft" "$tmp/good.yaml" "prepare.output=$tmp/data/demo-2.h5"
cmp -s "$tmp/data/demo.h5" "$tmp/data/demo-2.h5" && ok || fail "1 and 2 ranks wrote different files"
n=$(grep -c "prepare: 64 samples" "$tmp/out")
[ "$n" = 1 ] && ok || fail "good run on 2 ranks: summary printed $n times"

# A bad row under abort: status 2, FILE:LINE: on stderr, no output, no directory.
deck abort "$tmp/bad.jsonl" "$tmp/abort-out/bad.h5" abort
expect 2 "bad row, abort" "$esft" "$tmp/abort.yaml"
contains "$tmp/err" "$tmp/bad.jsonl:3: invalid JSON" "bad row, abort"
absent "$tmp/abort-out/bad.h5" "bad row, abort"
absent "$tmp/abort-out" "bad row, abort"
expect 2 "bad row, abort, 3 ranks" $mpirun 3 "$esft" "$tmp/abort.yaml"
n=$(grep -c "$tmp/bad.jsonl:3:" "$tmp/err")
[ "$n" = 1 ] && ok || fail "bad row, abort, 3 ranks: message printed $n times"
absent "$tmp/abort-out" "bad row, abort, 3 ranks"
# An older dataset at the output path is left as it was.
cp "$tmp/data/demo.h5" "$tmp/data/before.h5"
expect 2 "bad row over an existing dataset" "$esft" "$tmp/abort.yaml" "prepare.output=$tmp/data/demo.h5"
cmp -s "$tmp/data/demo.h5" "$tmp/data/before.h5" && ok || fail "a refused run changed the existing dataset"

# The same under skip: warned with FILE:LINE:, counted, the rest written.
expect 0 "bad row, skip" "$esft" "$tmp/abort.yaml" prepare.bad_rows=skip
contains "$tmp/err" "warning: $tmp/bad.jsonl:3: invalid JSON" "bad row, skip"
contains "$tmp/out" "prepare: 3 samples" "bad row, skip"
contains "$tmp/out" "1 bad rows skipped" "bad row, skip"
[ -s "$tmp/abort-out/bad.h5" ] && ok || fail "bad row, skip: nothing written"
contains "$tmp/run-abort/metrics.jsonl" '"rows_skipped": 1' "bad row, skip: metrics"

# Many bad rows under skip: 20 printed, the rest counted.
i=0
: >"$tmp/many.jsonl"
while [ $i -lt 25 ]; do
    echo '{"messages": []}' >>"$tmp/many.jsonl"
    echo "$good" >>"$tmp/many.jsonl"
    i=$((i + 1))
done
deck many "$tmp/many.jsonl" "$tmp/many.h5" skip
expect 0 "25 bad rows, skip" "$esft" "$tmp/many.yaml"
n=$(grep -c "many.jsonl:[0-9]*: \"messages\" is an empty list" "$tmp/err")
[ "$n" = 20 ] && ok || fail "25 bad rows, skip: $n warnings printed, expected 20"
contains "$tmp/err" "5 more bad rows skipped" "25 bad rows, skip"
contains "$tmp/out" "prepare: 25 samples" "25 bad rows, skip"
contains "$tmp/err" "many.jsonl:39:" "25 bad rows, skip: line numbers"
if grep -F -q "many.jsonl:41:" "$tmp/err"; then fail "25 bad rows, skip: the 21st printed"; else ok; fi

# Nothing usable: status 2, nothing written.
deck none "$tmp/bad.jsonl" "$tmp/none.h5" skip
printf '\n[1]\n\n' >"$tmp/only-bad.jsonl"
expect 2 "no usable row" "$esft" "$tmp/none.yaml" "prepare.inputs=[$tmp/only-bad.jsonl]"
contains "$tmp/err" "no usable row" "no usable row"
absent "$tmp/none.h5" "no usable row"

# An input that cannot be opened: named, status 2, nothing written.
deck missing "$tmp/bad.jsonl, $tmp/absent.jsonl" "$tmp/missing.h5" skip
expect 2 "missing input" "$esft" "$tmp/missing.yaml"
contains "$tmp/err" "$tmp/absent.jsonl: cannot open input" "missing input"
absent "$tmp/missing.h5" "missing input"
expect 2 "directory as input" "$esft" "$tmp/missing.yaml" "prepare.inputs=[$tmp]"
contains "$tmp/err" "$tmp: is a directory" "directory as input"

# A tokenizer file that is not there: named with the deck position, once over 2 ranks.
deck tok "$src/input/data/demo.jsonl" "$tmp/tok.h5" abort gpt2/tokenizer.json
expect 2 "missing tokenizer" $mpirun 2 "$esft" "$tmp/tok.yaml"
contains "$tmp/err" "$tmp/tok.yaml:8:3: prepare.tokenizer" "missing tokenizer"
contains "$tmp/err" "gpt2/tokenizer.json: no such file" "missing tokenizer"
n=$(grep -c "no such file" "$tmp/err")
[ "$n" = 1 ] && ok || fail "missing tokenizer: message printed $n times"
absent "$tmp/tok.h5" "missing tokenizer"

# Bad tokenizer files: each named with what is wrong, status 2, nothing written.
mkdir -p "$tmp/tk"
cat >"$tmp/tk/good.json" <<'JSON'
{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
 "pre_tokenizer":{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":true},
 "post_processor":null,"decoder":{"type":"ByteLevel","add_prefix_space":true,"trim_offsets":true,"use_regex":true},
 "model":{"type":"BPE","dropout":null,"unk_token":null,"continuing_subword_prefix":null,"end_of_word_suffix":null,"fuse_unk":false,"byte_fallback":false,"ignore_merges":false,"vocab":{"a":0,"b":1,"ab":2},"merges":["a b"]}}
JSON
head -c 200 "$tmp/tk/good.json" >"$tmp/tk/truncated.json"
sed 's/"type":"BPE"/"type":"Unigram"/' "$tmp/tk/good.json" >"$tmp/tk/unigram.json"
sed 's/"pre_tokenizer":{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":true}/"pre_tokenizer":{"type":"Split","pattern":{"Regex":"(a"},"behavior":"Isolated","invert":false}/' \
    "$tmp/tk/good.json" >"$tmp/tk/regex.json"
sed 's/"merges":\["a b"\]/"merges":["a c"]/' "$tmp/tk/good.json" >"$tmp/tk/merges.json"
for bad in "truncated:not valid JSON" "unigram:model type \"Unigram\" is not implemented" \
    "regex:does not compile" "merges:token \"c\" is not in the vocabulary"; do
    name=${bad%%:*}
    expect 2 "tokenizer $name" "$esft" "$tmp/tok.yaml" "prepare.tokenizer=$tmp/tk/$name.json"
    contains "$tmp/err" "$tmp/tk/$name.json" "tokenizer $name"
    contains "$tmp/err" "${bad#*:}" "tokenizer $name"
    absent "$tmp/tok.h5" "tokenizer $name"
done
# A tokenizer without a chat template cannot format conversations: said before any work,
# naming the first conversation row.
expect 2 "no chat template" "$esft" "$tmp/tok.yaml" "prepare.tokenizer=$tmp/tk/good.json"
contains "$tmp/err" "demo.jsonl:1 is a conversation, and $tmp/tk/good.json has no chat template" "no chat template"
absent "$tmp/tok.h5" "no chat template"

# A checkpoint's tokenizer and template (Qwen3): the same file from 1 and 3 ranks, the
# tokenizer's identity recorded, and a byte-tokenized dataset refused by a model that
# carries the tokenizer, before any work.
mkdir -p "$tmp/qwen"
gzip -dc "$src/tests/tokenizer/qwen/tokenizer.json.gz" >"$tmp/qwen/tokenizer.json"
cp "$src/tests/chat/qwen3_moe.jinja" "$tmp/qwen/chat_template.jinja"
echo '{"bos_token": null, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}' \
    >"$tmp/qwen/tokenizer_config.json"
deck qwen "$src/input/data/demo.jsonl" "$tmp/data/qwen-1.h5" abort "$tmp/qwen"
expect 0 "qwen tokenizer" "$esft" "$tmp/qwen.yaml"
contains "$tmp/out" "tokenizer $tmp/qwen/tokenizer.json (vocabulary 151669, chat template" "qwen tokenizer"
expect 0 "qwen tokenizer, 3 ranks" $mpirun 3 "$esft" "$tmp/qwen.yaml" "prepare.output=$tmp/data/qwen-3.h5"
cmp -s "$tmp/data/qwen-1.h5" "$tmp/data/qwen-3.h5" && ok || fail "qwen: 1 and 3 ranks wrote different files"
expect 0 "qwen inspect" "$esft" --inspect 1 "$tmp/qwen.yaml"
contains "$tmp/out" "<|im_start|>assistant" "qwen inspect"
contains "$tmp/out" "[[<think>" "qwen inspect"
contains "$tmp/out" "<|im_end|>]]" "qwen inspect"
# unused keys: warned once per key with FILE:LINE, counted
printf '%s\n' '{"prompt": "a", "completion": "b", "id": 1}' '{"prompt": "c", "completion": "d", "id": 2, "src": "x"}' \
    >"$tmp/extra.jsonl"
expect 0 "unused keys" $mpirun 2 "$esft" "$tmp/qwen.yaml" "prepare.inputs=[$tmp/extra.jsonl]" "prepare.output=$tmp/data/extra.h5"
contains "$tmp/err" "$tmp/extra.jsonl:1: key \"id\" is not used" "unused keys"
contains "$tmp/err" "$tmp/extra.jsonl:2: key \"src\" is not used" "unused keys"
contains "$tmp/err" "2 rows had keys dropped" "unused keys"
n=$(grep -c 'key "id"' "$tmp/err")
[ "$n" = 1 ] && ok || fail "unused keys: id reported $n times"
# a UTF-8 byte order mark at the start of a file, CRLF line ends, blank lines: the rows
printf '\357\273\277{"prompt": "a", "completion": "b"}\r\n\r\n  \n{"text": "c"}\r\n' >"$tmp/bom.jsonl"
expect 0 "byte order mark" "$esft" "$tmp/qwen.yaml" "prepare.inputs=[$tmp/bom.jsonl]" "prepare.output=$tmp/data/bom.h5"
contains "$tmp/out" "prepare: 2 samples" "byte order mark"

test_end test-prepare
