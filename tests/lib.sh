# lib.sh: what the shell tests share, sourced by each (`. "$src/tests/lib.sh"`).
#   test_begin NAME        a private temporary directory $tmp, removed at exit
#   ok / fail TEXT         count a check; a failure prints TEXT and the last stderr
#   expect STATUS WHAT COMMAND...   run COMMAND (stdout -> $tmp/out, stderr -> $tmp/err)
#   contains / lacks FILE TEXT WHAT, absent PATH WHAT
#   losses EVENT METRICS   "step loss" of each step's last EVENT line of a metrics file
#   same_curve A B TOL [LAST]   the same steps (up to LAST), losses within a relative
#                          tolerance (0: identical text, so bitwise equal doubles)
#   test_end NAME          the closing line; the status says whether all passed
src=${ESFT_TOP_SRCDIR:-.}
build=${ESFT_TOP_BUILDDIR:-.}
mpirun=${TESTMPIRUN:-mpiexec --oversubscribe -n}
esft="$build/esft"
passed=0
failed=0

test_begin() {
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/esft-$1.XXXXXX")
    trap 'rm -rf "$tmp"' EXIT
}
ok() { passed=$((passed + 1)); }
fail() {
    failed=$((failed + 1))
    echo "FAILED: $*"
    [ -f "$tmp/err" ] && sed 's/^/    stderr: /' "$tmp/err" | tail -n 12
}
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
absent() { # PATH DESCRIPTION
    if [ -e "$1" ]; then fail "$2: $1 exists"; else ok; fi
}
# near A B TOL: true when A is within TOL of B, relatively (|A - B| < TOL |B|).
near() {
    awk -v a="$1" -v b="$2" -v t="$3" 'BEGIN { d = (a - b) / b; exit !(d < t && d > -t) }'
}
losses() {
    sed -n "s/.*\"event\": \"$1\", \"step\": \([0-9]*\), \"loss\": \([^,}]*\).*/\1 \2/p" "$2" |
        awk '{ loss[$1] = $2 } END { for (s in loss) print s, loss[s] }' | sort -n
}
# eval_loss_falls METRICS WHAT: the first and last validation losses of a run (set as
# first_eval, last_eval); a failure unless the last is below the first.
eval_loss_falls() {
    first_eval=$(losses eval "$1" | head -n 1 | cut -d' ' -f2)
    last_eval=$(losses eval "$1" | tail -n 1 | cut -d' ' -f2)
    awk -v a="$first_eval" -v b="$last_eval" 'BEGIN { exit !(b < a) }' && ok ||
        fail "$2 did not lower the validation loss ($first_eval -> $last_eval)"
}
same_curve() {
    last_step=${4:-1000000000}
    losses step "$1" | awk -v m="$last_step" '$1 <= m' >"$tmp/a.txt"
    losses step "$2" | awk -v m="$last_step" '$1 <= m' >"$tmp/b.txt"
    [ -s "$tmp/a.txt" ] || return 1
    if [ "$3" = 0 ]; then cmp -s "$tmp/a.txt" "$tmp/b.txt"; return; fi
    join "$tmp/a.txt" "$tmp/b.txt" | awk -v tol="$3" -v n="$(wc -l <"$tmp/a.txt")" '
        { d = $2 - $3; if (d < 0) d = -d; s = $2 < 0 ? -$2 : $2; if (d > tol * s) bad++; count++ }
        END { exit (bad > 0 || count != n) }'
}
# demo_data: the demo model and data made under $tmp/demo (one check); sets demo (the
# deck), d (the directory) and common (the overrides that point a deck at them).
demo_data() {
    demo="$src/input/demo.yaml"
    d="$tmp/demo"
    common="model.path=$d/model prepare.output=$d/data.h5 data.path=$d/data.h5 prepare.inputs=[$src/input/data/demo.jsonl]"
    # shellcheck disable=SC2086 # $common is a list of overrides
    expect 0 "demo model and data" "$esft" "$demo" "phase=[init,prepare]" "run.output_dir=$d" $common
}
# demo_experts FILE: an expert_config.json for the demo model (8 of its 4 x 8 experts)
demo_experts() {
    printf '{"experts": {"0": [1, 5], "1": [0, 2, 7], "2": [3], "3": [4, 6]}, "shared_experts": false, "non_expert_modules": false}\n' >"$1"
}
test_end() {
    echo "$1: $passed checks passed, $failed failed"
    [ "$failed" = 0 ]
}
# scores CONFIG: the per-layer score lists of an expert_config.json, one number a line
scores() {
    sed -n '/"scores"/,/}/p' "$1" | grep -o '[0-9][0-9.e+-]*' | grep -v '^[0-9]$'
}
# same_scores A B TOL: two expert_config.json files' scores, within TOL relative (and 1e-12)
same_scores() {
    scores "$1" >"$tmp/a.txt"
    scores "$2" >"$tmp/b.txt"
    paste -d' ' "$tmp/a.txt" "$tmp/b.txt" | awk -v n="$(wc -l <"$tmp/a.txt")" -v tol="$3" '
        { d = $1 - $2; if (d < 0) d = -d; if (d > tol * ($1 < 0 ? -$1 : $1) + 1e-12) bad++; count++ }
        END { exit (bad > 0 || count != n || n == 0) }'
}
# select_both DECK RUN OVERRIDES...: select with the token and with the gate score on
# RUN/routing_stats.h5, into RUN/select-token and RUN/select-gate (once)
select_both() {
    deck=$1
    run=$2
    shift 2
    for f in token gate; do
        [ -s "$run/select-$f/expert_config.json" ] && continue
        "$esft" "$deck" phase=select "run.output_dir=$run/select-$f" "$@" \
            "select.stats=[$run/routing_stats.h5]" "select.score_function=$f" >/dev/null 2>&1 ||
            fail "select ($f) on $run"
    done
}
