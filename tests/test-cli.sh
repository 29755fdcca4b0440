#!/bin/sh
# test-cli: the esft program as a user meets it: --help/--version, every bad deck in
# tests/decks/bad (its `# expect: LINE:COL: TEXT` first line says which message it must
# get), the example decks in input/, overrides, layouts under several rank counts and
# the promise that a refused run writes nothing.
set -u
. "${ESFT_TOP_SRCDIR:-.}/tests/lib.sh"
test_begin cli

# Help and version.
expect 0 "--version" "$esft" --version
contains "$tmp/out" "esft 0.1.0" "--version"
contains "$tmp/out" "HDF5:" "--version"
expect 0 "--help" "$esft" --help
contains "$tmp/out" "usage: esft" "--help"
expect 0 "--help-deck" "$esft" --help-deck
contains "$tmp/out" "train.lr" "--help-deck"
expect 2 "no deck" "$esft"
expect 2 "unknown option" "$esft" --frobnicate deck.yaml
contains "$tmp/err" "unknown option '--frobnicate'" "unknown option"
expect 2 "missing deck file" "$esft" --dry-run "$tmp/absent.yaml"
contains "$tmp/err" "$tmp/absent.yaml: cannot open deck" "missing deck file"

# Every bad deck: status 2, its own FILE:LINE:COL and message, nothing written.
n_bad=0
for deck in "$src"/tests/decks/bad/*.yaml; do
    n_bad=$((n_bad + 1))
    expectation=$(sed -n '1s/^# expect: //p' "$deck")
    position=${expectation%%: *}
    text=${expectation#*: }
    if [ -z "$expectation" ]; then
        fail "$deck has no '# expect: LINE:COL: TEXT' first line"
        continue
    fi
    expect 2 "$deck" "$esft" --dry-run "$deck"
    contains "$tmp/err" "$deck:$position: " "$deck"
    contains "$tmp/err" "$text" "$deck"
    # Without --dry-run too, and no output directory appears.
    expect 2 "$deck (run)" "$esft" "$deck" "run.output_dir=$tmp/bad-out"
    [ -e "$tmp/bad-out" ] && fail "$deck: output directory created by a refused run" || ok
done
[ "$n_bad" -ge 10 ] && ok || fail "only $n_bad bad decks in tests/decks/bad"

# Every example deck prints its resolved deck and a layout (planned for 4 ranks), from a
# directory that has input/ and nothing else. The decks whose phases make their own
# inputs (init, prepare, the demo pipeline and comparison, the benchmark model) pass; those that read
# a real model, dataset or earlier phase's output that is not here are refused with
# status 2, each missing file named, before anything is written.
mkdir -p "$tmp/fresh"
ln -s "$src/input" "$tmp/fresh/input"
for deck in "$src"/input/*.yaml; do
    name=$(basename "$deck" .yaml)
    case $name in
    demo | demo-deepseek | demo-gpt-oss | compare | compare-large | init | prepare | bench-100m) want=0 ;;
    *) want=2 ;;
    esac
    (cd "$tmp/fresh" && "$esft" --dry-run --ranks 4 "input/$name.yaml" >"$tmp/out" 2>"$tmp/err")
    got=$?
    [ "$got" = "$want" ] && ok || fail "input/$name.yaml: dry run status $got, expected $want: $(cat "$tmp/err")"
    contains "$tmp/out" "layout: world 4 = pp 1 x dp " "input/$name.yaml"
done
for missing in "score: models/qwen3-moe/config.json" "score: data.path: data/math.h5"; do
    (cd "$tmp/fresh" && "$esft" --dry-run --ranks 4 input/score.yaml >"$tmp/out" 2>"$tmp/err")
    contains "$tmp/err" "$missing" "input/score.yaml dry run"
done
(cd "$tmp/fresh" && "$esft" --dry-run --ranks 4 input/train.yaml >"$tmp/out" 2>"$tmp/err")
contains "$tmp/err" "train: train.expert_config: out/score-math/expert_config.json is not a file" \
    "input/train.yaml dry run"
contains "$tmp/err" "3 problems with deck input/train.yaml; nothing was run" "input/train.yaml dry run"
n=$(find "$tmp/fresh" | wc -l)
[ "$n" = 2 ] && ok || fail "dry runs wrote into their directory: $(find "$tmp/fresh")"
# input/train.yaml under 4 ranks: pp 1 x dp 2 x ep 2, every rank in the table, then the
# refusal (its model is not here), once.
(cd "$tmp/fresh" && $mpirun 4 "$esft" --dry-run input/train.yaml >"$tmp/out" 2>"$tmp/err")
[ $? = 2 ] && ok || fail "input/train.yaml on 4 ranks: not refused"
contains "$tmp/out" "layout: world 4 = pp 1 x dp 2 x ep 2" "input/train.yaml on 4 ranks"
n=$(grep -c -E '^ +[0-3] +0 +[01] +[01] ' "$tmp/out")
[ "$n" = 4 ] && ok || fail "input/train.yaml on 4 ranks: $n rank lines in the table"
n=$(grep -c "problems with deck" "$tmp/err")
[ "$n" = 1 ] && ok || fail "input/train.yaml on 4 ranks: refusal printed $n times"

# Phases refused at the start, not after the earlier phases of the list did their work:
# a demo pipeline that ends with an unsupported combination (DenseMixer under method lora)
# writes nothing at all.
late="$tmp/late"
expect 2 "lora + densemixer at the end of a pipeline" "$esft" "$src/input/demo.yaml" "run.output_dir=$late" \
    "model.path=$late/model" "prepare.output=$late/data.h5" "data.path=$late/data.h5" \
    "prepare.inputs=[$src/input/data/demo.jsonl]" train.method=lora train.densemixer=true
contains "$tmp/err" "DenseMixer with train.method lora is not supported" "lora + densemixer at the end of a pipeline"
absent "$late" "lora + densemixer at the end of a pipeline"
expect 2 "dry run, lora + densemixer" "$esft" --dry-run "$src/input/demo.yaml" "run.output_dir=$late" \
    "model.path=$late/model" train.method=lora train.densemixer=true
absent "$late" "dry run, lora + densemixer"

# Overrides: applied after the deck, shown in the resolved deck; a bad one refused.
# (the demo deck's own paths are relative to where it is run: these runs point them at
# the source tree and a scratch directory, so they pass from any build directory)
here="model.path=$tmp/dm/model prepare.inputs=[$src/input/data/demo.jsonl]"
# shellcheck disable=SC2086 # $here is a list of overrides
expect 0 "override" "$esft" --dry-run "$src/input/demo.yaml" $here train.lr=3e-5 run.name=sweep-7
contains "$tmp/out" "sweep-7" "override run.name"
contains "$tmp/out" "lr: 3e-05" "override train.lr"
expect 2 "bad override value" "$esft" --dry-run "$src/input/demo.yaml" train.lr=fast
contains "$tmp/err" "command line" "bad override value"
contains "$tmp/err" "train.lr" "bad override value"
expect 2 "unknown override key" "$esft" --dry-run "$src/input/demo.yaml" train.learning_rate=1
contains "$tmp/err" "train.learning_rate" "unknown override key"

# Layouts: pp 1, ep 2 on 4 ranks gives dp 2; printed once, by rank 0.
# shellcheck disable=SC2086
expect 0 "np 4 layout" $mpirun 4 "$esft" --dry-run "$src/input/demo.yaml" $here parallel.ep=2
contains "$tmp/out" "layout: world 4 = pp 1 x dp 2 x ep 2" "np 4 layout"
n=$(grep -c "layout: world" "$tmp/out")
[ "$n" = 1 ] && ok || fail "np 4 layout: printed $n times"
# A world the grid does not divide: every rank ends, status 2, one message.
expect 2 "np 3 with ep 2" $mpirun 3 "$esft" --dry-run "$src/input/demo.yaml" parallel.ep=2
n=$(grep -c "layout for 3 ranks" "$tmp/err")
[ "$n" = 1 ] && ok || fail "np 3 with ep 2: message printed $n times"
# Experts not divisible by ep.
expect 2 "experts not divisible by ep" "$esft" --dry-run --ranks 2 "$src/input/demo.yaml" \
    parallel.ep=2 init.num_experts=7
contains "$tmp/err" "7" "experts not divisible by ep"
# Planning a layout for a larger job without launching it.
# shellcheck disable=SC2086
expect 0 "--ranks 8" "$esft" --dry-run --ranks 8 "$src/input/demo.yaml" $here parallel.ep=2 parallel.pp=2
contains "$tmp/out" "layout: world 8 = pp 2 x dp 2 x ep 2" "--ranks 8"

# eval with a dataset that is not there: status 2, the file named, nothing written.
expect 2 "eval, no dataset" "$esft" "$src/input/demo.yaml" phase=eval \
    "model.path=$src/tests/golden/qwen3_moe" "data.path=$tmp/none.h5" "run.output_dir=$tmp/out-dir"
contains "$tmp/err" "$tmp/none.h5" "eval, no dataset"
[ -e "$tmp/out-dir/eval.json" ] && fail "eval, no dataset: eval.json written" || ok


# Fatal errors: one rank failing ends every rank (status 1, its rank named, once); a
# collective error ends all with the given status and one message.
expect 1 "fatal on the last rank" $mpirun 3 "$build/tests/test_fatal" last-rank
contains "$tmp/err" "rank 2: error: deliberate failure on the last rank" "fatal on the last rank"
n=$(grep -c "deliberate failure" "$tmp/err")
[ "$n" = 1 ] && ok || fail "fatal on the last rank: message printed $n times"
expect 2 "fatal_all" $mpirun 3 "$build/tests/test_fatal" all
n=$(grep -c "every rank found the same problem" "$tmp/err")
[ "$n" = 1 ] && ok || fail "fatal_all: message printed $n times"
# An error some ranks found (fail_if_any): the lowest failing rank's own message, once,
# with its number unless it is rank 0; status 2; nothing when no rank failed.
expect 2 "fail_if_any on ranks 1 and 2" $mpirun 3 "$build/tests/test_fatal" some
contains "$tmp/err" "esft: rank 1: rank 1's own reason" "fail_if_any on ranks 1 and 2"
n=$(grep -c "own reason" "$tmp/err")
[ "$n" = 1 ] && ok || fail "fail_if_any on ranks 1 and 2: $n messages"
lacks "$tmp/err" "MPI_ABORT" "fail_if_any on ranks 1 and 2"
expect 2 "fail_if_any on every rank" $mpirun 3 "$build/tests/test_fatal" first
contains "$tmp/err" "esft: rank 0's own reason" "fail_if_any on every rank"
n=$(grep -c "own reason" "$tmp/err")
[ "$n" = 1 ] && ok || fail "fail_if_any on every rank: $n messages"
expect 0 "fail_if_any on no rank" $mpirun 3 "$build/tests/test_fatal" none

# init: a checkpoint written on 1 rank equals one written on 2; never overwrites; bad
# sizes refused; the run's metrics file records it.
init_deck="$src/tests/golden/init-qwen2-moe.yaml"
expect 0 "init on 1 rank" "$esft" "$init_deck" "model.path=$tmp/m1" "run.output_dir=$tmp/o1"
for f in config.json model.safetensors.index.json; do
    [ -s "$tmp/m1/$f" ] && ok || fail "init: $f not written"
done
n=$(find "$tmp/m1" -name 'model-0000?-of-00002.safetensors' | wc -l)
[ "$n" = 2 ] && ok || fail "init with init.shards 2 wrote $n shards of 2"
contains "$tmp/o1/metrics.jsonl" '"event": "init"' "init metrics"
contains "$tmp/o1/metrics.jsonl" '"event": "end", "status": 0' "init metrics"
expect 0 "init on 2 ranks" $mpirun 2 "$esft" "$init_deck" "model.path=$tmp/m2" "run.output_dir=$tmp/o2"
for f in "$tmp"/m1/*; do
    cmp -s "$f" "$tmp/m2/$(basename "$f")" && ok || fail "init: $(basename "$f") differs between 1 and 2 ranks"
done
cp "$tmp/m1/config.json" "$tmp/config.before"
expect 2 "init over an existing model" "$esft" "$init_deck" "model.path=$tmp/m1" "run.output_dir=$tmp/o3" init.hidden_size=48 init.head_dim=8
contains "$tmp/err" "already holds a checkpoint" "init over an existing model"
cmp -s "$tmp/m1/config.json" "$tmp/config.before" && ok || fail "init over an existing model changed it"
expect 2 "init with head_dim != hidden/heads for qwen2_moe" "$esft" "$init_deck" "model.path=$tmp/m4" "run.output_dir=$tmp/o4" init.head_dim=8
contains "$tmp/err" "init.head_dim (8) must be init.hidden_size / init.num_heads" "init head_dim"
[ -e "$tmp/m4" ] && fail "init with a bad head_dim created the model directory" || ok

# The pipeline through select on the demo deck; score bitwise identical on 1 and 3 ranks.
demo="$src/input/demo.yaml"
d="$tmp/demo"
paths="model.path=$d/model prepare.output=$d/data.h5 data.path=$d/data.h5 prepare.inputs=[$src/input/data/demo.jsonl]"
# shellcheck disable=SC2086 # $paths is a list of overrides
expect 0 "demo init + prepare" "$esft" "$demo" "phase=[init,prepare]" "run.output_dir=$d" $paths
for np in 1 3; do
    # shellcheck disable=SC2086
    expect 0 "score on $np ranks" $mpirun $np "$esft" "$demo" phase=score "run.output_dir=$d/np$np" $paths
done
expect 0 "score 1 vs 3 ranks" "$build/tests/test_score" compare "$d/np1/routing_stats.h5" "$d/np3/routing_stats.h5"
# shellcheck disable=SC2086
expect 0 "select" "$esft" "$demo" phase=select "run.output_dir=$d/np3" $paths
contains "$d/np3/expert_config.json" '"experts"' "select output"
# score refuses a dataset whose tokens the model cannot embed, and a missing model.
# shellcheck disable=SC2086
expect 2 "score with too small a vocabulary" "$esft" "$demo" phase=score "run.output_dir=$d/v" $paths \
    "model.path=$src/tests/golden/qwen3_moe"
contains "$tmp/err" "vocabulary" "score with too small a vocabulary"
[ -e "$d/v" ] && fail "refused score left $d/v behind" || ok
# shellcheck disable=SC2086
expect 2 "score without a model" "$esft" "$demo" phase=score "run.output_dir=$d/m" $paths "model.path=$d/absent"
contains "$tmp/err" "$d/absent/config.json" "score without a model"
[ -e "$d/m" ] && fail "refused score left $d/m behind" || ok

test_end test-cli
