#!/bin/sh
# test-memplan: the memory estimate of `esft --dry-run` against the demo model's training.
# The estimate's cpu weights are the weights per rank that train reports; its cpu total is
# within 25% of the peak resident set that the training run's ranks reach (GNU time's
# %M, the whole process: README "Sizing a job" gives the ratios measured, within 4%), under
# 1 and 2 ranks, and under ep 2; without the expert configuration both bounds are
# printed, the upper one the larger; method lora is refused with the reason.
set -u
. "${ESFT_TOP_SRCDIR:-.}/tests/lib.sh"
test_begin memplan

demo_data
demo_experts "$tmp/experts.json"
train="phase=train train.expert_config=$tmp/experts.json train.steps=2 train.eval_every=0 train.checkpoint_every=2 train.resume=never"

# the largest of a column over the table's rows ("  stage ep_rank | ..."): $4 cpu
# weights, $10 cpu total
column() { awk -v c="$2" '/^  [0-9]+ +[0-9]+ +\|/ { if ($c > m) m = $c } END { print m + 0 }' "$1"; }

timer=/usr/bin/time
[ -x "$timer" ] && "$timer" -f %M true >/dev/null 2>&1 || timer=""
for layout in "1 1" "2 1" "2 2"; do
    # shellcheck disable=SC2086 # two words: ranks and ep
    set -- $layout
    n=$1 ep=$2
    o="$d/run-$n-$ep"
    # shellcheck disable=SC2086
    expect 0 "dry run, $n ranks, ep $ep" "$esft" --dry-run --ranks "$n" "$demo" $common $train \
        "run.output_dir=$o" "parallel.ep=$ep"
    cp "$tmp/out" "$tmp/plan"
    contains "$tmp/plan" "# memory per rank for training (the deck's trainable set" "the estimate's title"
    contains "$tmp/plan" "trainable experts from $tmp/experts.json" "the expert configuration named"
    rows=$(grep -c '^  [0-9]* *[0-9]* *|' "$tmp/plan")
    [ "$rows" = "$ep" ] && ok || fail "$rows rows for ep $ep"
    estimate=$(column "$tmp/plan" 10)
    wts=$(column "$tmp/plan" 4)
    if [ -n "$timer" ]; then
        # shellcheck disable=SC2086
        # each rank's line appended to a file of its own: in the forwarded stderr two ranks'
        # lines can run together
        rm -f "$tmp/rss"
        expect 0 "training, $n ranks, ep $ep" $mpirun "$n" "$timer" -a -o "$tmp/rss" -f "maxrss %M" "$esft" "$demo" \
            $common $train "run.output_dir=$o" "parallel.ep=$ep"
    else
        # shellcheck disable=SC2086
        expect 0 "training, $n ranks, ep $ep" $mpirun "$n" "$esft" "$demo" $common $train \
            "run.output_dir=$o" "parallel.ep=$ep"
    fi
    cat "$tmp/out" "$tmp/err" >"$tmp/log"
    reported=$(sed -n 's/.*train: weights per rank \([0-9.]*\) MiB.*/\1/p' "$tmp/log" | head -n 1)
    awk -v a="$wts" -v b="$reported" 'BEGIN { d = a - b; exit !(b > 0 && d < 0.06 && d > -0.06) }' &&
        ok || fail "estimated weights $wts MiB, train reports $reported MiB ($n ranks, ep $ep)"
    if [ -n "$timer" ]; then
        peak=$(awk '/^maxrss/ { if ($2 > m) m = $2 } END { print m / 1024 }' "$tmp/rss")
        awk -v e="$estimate" -v p="$peak" 'BEGIN { exit !(p > 0 && e / p > 0.75 && e / p < 1.25) }' &&
            ok || fail "estimate $estimate MiB, measured peak $peak MiB ($n ranks, ep $ep)"
        echo "$n ranks, ep $ep: estimate $estimate MiB, measured peak $peak MiB"
    fi
done
[ -n "$timer" ] || echo "no GNU time at /usr/bin/time: the estimates are not compared with the peaks"

# no expert configuration yet (select writes it in the same deck): both bounds
# shellcheck disable=SC2086
expect 0 "dry run without the expert configuration" "$esft" --dry-run "$demo" $common \
    "run.output_dir=$d/none" "phase=[score,select,train]"
contains "$tmp/out" "is not there yet: the estimate is bounded" "the bounds said"
contains "$tmp/out" "(lower bound: no routed expert trains" "the lower bound"
contains "$tmp/out" "(upper bound: every routed expert trains" "the upper bound"
low=$(grep -A3 "lower bound" "$tmp/out" | column /dev/stdin 10)
high=$(grep -A3 "upper bound" "$tmp/out" | column /dev/stdin 5)
awk -v l="$(grep -A3 "lower bound" "$tmp/out" | column /dev/stdin 5)" -v h="$high" \
    'BEGIN { exit !(l == 0 && h > 0) }' && ok || fail "gradients of the bounds: lower not 0 or upper 0"
[ -n "$low" ] && ok || fail "no lower bound total"

# shellcheck disable=SC2086
expect 0 "dry run of a lora deck" "$esft" --dry-run "$demo" $common "run.output_dir=$d/lora" \
    phase=train train.method=lora
contains "$tmp/out" "# memory: not estimated: train.method lora" "lora refused"

test_end test-memplan
