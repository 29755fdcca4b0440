#!/bin/sh
# test-cli: the esft program as a user meets it: --help/--version, every bad deck in
# tests/decks/bad (its `# expect: LINE:COL: TEXT` first line says which message it must
# get), the example decks in input/, overrides, layouts under several rank counts and
# the promise that a refused run writes nothing.
set -u
src=${ESFT_TOP_SRCDIR:-.}
build=${ESFT_TOP_BUILDDIR:-.}
mpirun=${TESTMPIRUN:-mpiexec --oversubscribe -n}
esft="$build/esft"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/esft-cli.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
passed=0
failed=0

ok() { passed=$((passed + 1)); }
fail() {
    failed=$((failed + 1))
    echo "FAILED: $*"
    [ -f "$tmp/err" ] && sed 's/^/    stderr: /' "$tmp/err" | head -n 12
}
# expect STATUS DESCRIPTION COMMAND...: runs COMMAND, stdout to $tmp/out, stderr to $tmp/err.
expect() {
    want=$1
    what=$2
    shift 2
    "$@" >"$tmp/out" 2>"$tmp/err"
    got=$?
    if [ "$got" = "$want" ]; then ok; else fail "$what: exit status $got, expected $want"; fi
}
contains() { # FILE TEXT DESCRIPTION
    if grep -F -q -- "$2" "$1"; then ok; else fail "$3: '$2' not in $(basename "$1")"; fi
}
lacks() { # FILE TEXT DESCRIPTION
    if grep -F -q -- "$2" "$1"; then fail "$3: '$2' found in $(basename "$1")"; else ok; fi
}

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

# Every example deck is valid and prints a layout.
for deck in "$src"/input/*.yaml; do
    expect 0 "$deck" "$esft" --dry-run "$deck"
    contains "$tmp/out" "layout: world 1 = pp 1 x dp 1 x ep 1" "$deck"
done

# Overrides: applied after the deck, shown in the resolved deck; a bad one refused.
expect 0 "override" "$esft" --dry-run "$src/input/demo.yaml" train.lr=3e-5 run.name=sweep-7
contains "$tmp/out" "sweep-7" "override run.name"
contains "$tmp/out" "lr: 3e-05" "override train.lr"
expect 2 "bad override value" "$esft" --dry-run "$src/input/demo.yaml" train.lr=fast
contains "$tmp/err" "command line" "bad override value"
contains "$tmp/err" "train.lr" "bad override value"
expect 2 "unknown override key" "$esft" --dry-run "$src/input/demo.yaml" train.learning_rate=1
contains "$tmp/err" "train.learning_rate" "unknown override key"

# Layouts: pp 1, ep 2 on 4 ranks gives dp 2; printed once, by rank 0.
expect 0 "np 4 layout" $mpirun 4 "$esft" --dry-run "$src/input/demo.yaml" parallel.ep=2
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
expect 0 "--ranks 8" "$esft" --dry-run --ranks 8 "$src/input/demo.yaml" parallel.ep=2 parallel.pp=2
contains "$tmp/out" "layout: world 8 = pp 2 x dp 2 x ep 2" "--ranks 8"

# A phase this version does not have yet: refused, and nothing is written.
expect 2 "unavailable phase" "$esft" "$src/input/demo.yaml" "run.output_dir=$tmp/out-dir"
[ -e "$tmp/out-dir" ] && fail "unavailable phase: output directory created" || ok

echo "test-cli: $passed checks passed, $failed failed"
[ "$failed" = 0 ]
