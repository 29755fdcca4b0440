#!/bin/sh
# test-select: the select phase as a user meets it through the esft program: a deck whose
# statistics file is missing (listed, or the default this run's score output) ends with
# status 2, a message naming the file, and none of select's outputs written.
# (tests/test_select.c covers the selection itself and the files a good run writes.)
set -u
. "${ESFT_TOP_SRCDIR:-.}/tests/lib.sh"
test_begin select
# nothing_written DIR DESCRIPTION: none of select's outputs (nor their temporary files).
nothing_written() {
    for f in expert_config.json expert_config.svg trainable_tensors.txt expert_config_tasks.svg \
        expert_config.json.tmp expert_config.svg.tmp trainable_tensors.txt.tmp \
        expert_config_tasks.svg.tmp; do
        if [ -e "$1/$f" ]; then fail "$2: $f written by a refused run"; else ok; fi
    done
}

model="$src/tests/golden/qwen2_moe"

# A listed statistics file that does not exist.
cat >"$tmp/missing.yaml" <<EOF
phase: select
run:
  output_dir: $tmp/out-missing
model:
  path: $model
select:
  stats: [$tmp/absent_stats.h5]
  top_p: 0.2
EOF
expect 2 "missing stats file" "$esft" "$tmp/missing.yaml"
contains "$tmp/err" "$tmp/absent_stats.h5" "missing stats file"
contains "$tmp/err" "cannot open statistics file" "missing stats file"
nothing_written "$tmp/out-missing" "missing stats file"

# The same under 3 ranks: one message, every rank ends with status 2.
expect 2 "missing stats file, 3 ranks" $mpirun 3 "$esft" "$tmp/missing.yaml"
contains "$tmp/err" "$tmp/absent_stats.h5" "missing stats file, 3 ranks"
n=$(grep -c "absent_stats.h5" "$tmp/err")
[ "$n" = 1 ] && ok || fail "missing stats file, 3 ranks: message printed $n times"
nothing_written "$tmp/out-missing" "missing stats file, 3 ranks"

# Two task files, both missing: refused, naming the first, and no tasks picture.
cat >"$tmp/missing-task.yaml" <<EOF
phase: select
run:
  output_dir: $tmp/out-missing-task
model:
  path: $model
select:
  stats: [$tmp/absent_math.h5, $tmp/absent_code.h5]
  union_tasks: true
EOF
expect 2 "missing task file" "$esft" "$tmp/missing-task.yaml"
contains "$tmp/err" "$tmp/absent_math.h5" "missing task file"
nothing_written "$tmp/out-missing-task" "missing task file"

# No select.stats: the default is this run's score output, run.output_dir/score.output.
cat >"$tmp/default.yaml" <<EOF
phase: select
run:
  output_dir: $tmp/out-default
model:
  path: $model
score:
  output: math_stats.h5
EOF
expect 2 "default stats file missing" "$esft" "$tmp/default.yaml"
contains "$tmp/err" "$tmp/out-default/math_stats.h5" "default stats file missing"
nothing_written "$tmp/out-default" "default stats file missing"

# A file that is not a statistics file (a model's config.json) is refused by name.
cat >"$tmp/not-stats.yaml" <<EOF
phase: select
run:
  output_dir: $tmp/out-not-stats
model:
  path: $model
select:
  stats: [$model/config.json]
EOF
expect 2 "not a statistics file" "$esft" "$tmp/not-stats.yaml"
contains "$tmp/err" "$model/config.json: not an HDF5 file" "not a statistics file"
nothing_written "$tmp/out-not-stats" "not a statistics file"

test_end test-select
