#!/bin/sh
# test-sweep: a 2 x 2 x 2 sweep over the demo deck (made tiny: 4 steps), submitted by
# jobs/esft-sweep to stand-in sbatch and srun commands that run the jobs here, in order,
# as Slurm would (the job array after its shared job, only if that succeeded). The shared
# phases (init, prepare, score) run once: one statistics file, one `score` line in all
# the metrics files, written before any point started and left alone by a second
# submission; select and train run per point from it. The summary names every point's
# state and the best point (the smallest best validation loss, checked against the CSV
# here), and draws one line per value of the second key. Also: the refusals (a deck with
# a sweep run plainly, a point before its shared phases or after another deck's, bad
# sweep blocks) and the commands jobs/esft-sweep would give (ESFT_LAUNCH_ECHO=1).
set -u
. "${ESFT_TOP_SRCDIR:-.}/tests/lib.sh"
test_begin sweep
unset ESFT ESFT_HOME ESFT_LAUNCHER ESFT_LAUNCH_ECHO ESFT_SWEEP_LAUNCH ESFT_SBATCH_TEMPLATE \
    ESFT_MAX_REQUEUES SLURM_JOB_ID SLURM_ARRAY_TASK_ID SLURM_RESTART_COUNT SLURM_SUBMIT_DIR \
    SLURM_JOB_NUM_NODES SLURM_GPUS_ON_NODE SLURM_NTASKS_PER_NODE SLURM_CPUS_PER_TASK
sweep="$src/jobs/esft-sweep"
jobs=$(cd "$src/jobs" && pwd) # as esft-sweep names its neighbours: without "..", whatever $src is
out="$tmp/runs"

# The demo deck with a sweep block; the overrides make it tiny and keep its files in $tmp.
cp "$src/input/demo.yaml" "$tmp/deck.yaml"
cat >>"$tmp/deck.yaml" <<'EOF'

sweep:
  select.top_p: [0.2, 0.4]
  select.score_function: [token, gate]
  train.lr: [1.0e-3, 3.0e-3]
EOF
set -- "run.output_dir=$out" "model.path=$out/model" "prepare.output=$out/data.h5" \
    "data.path=$out/data.h5" "prepare.inputs=[$src/input/data/demo.jsonl]" train.steps=4 \
    train.eval_every=2 train.checkpoint_every=0 score.n_sample_tokens=2048
deck="$tmp/deck.yaml"

# --- the points, their names and directories, and the split of the phases
expect 0 "--sweep list" "$esft" --sweep list "$deck" "$@"
cp "$tmp/out" "$tmp/list"
n=$(grep -c -v '^#' "$tmp/list")
[ "$n" = 8 ] && ok || fail "--sweep list: $n points, expected 8"
contains "$tmp/list" "# shared phases, once, in $out: init prepare score" "shared phases"
contains "$tmp/list" "# per-point phases: select train" "per-point phases"
contains "$tmp/list" "5	top_p-0.4_score_function-token_lr-3.0e-3	$out/sweep/top_p-0.4_score_function-token_lr-3.0e-3" \
    "point 5: name from its values (the last key fastest), its directory"
# a sweep over train alone shares select too
cat >"$tmp/train-only.yaml" <<EOF
$(grep -v '^#' "$src/input/demo.yaml")
sweep: {train.lr: [1e-3, 3e-3]}
EOF
expect 0 "--sweep list, train only" "$esft" --sweep list "$tmp/train-only.yaml" "$@"
contains "$tmp/out" "in $out: init prepare score select" "a train-only sweep shares select"

# --dry-run without a role checks the deck without its sweep
expect 0 "--dry-run of a sweep deck" "$esft" --dry-run "$deck" "$@"
contains "$tmp/out" "this is the deck without its sweep" "--dry-run of a sweep deck"

# --- refusals
expect 2 "a deck with a sweep run plainly" "$esft" "$deck" "$@"
contains "$tmp/err" "holds a sweep of 8 points" "plain run of a sweep deck"
expect 2 "a point before the shared phases" "$esft" "$deck" "$@" --sweep-point 0
contains "$tmp/err" "the shared phases of this sweep have not run to the end" "point first"
absent "$out/sweep/top_p-0.2_score_function-token_lr-1.0e-3" "point first"
expect 2 "a point past the last" "$esft" "$deck" "$@" --sweep-point 8
contains "$tmp/err" "the sweep of $deck has 8 points (0 to 7)" "point 8"
expect 2 "--sweep on a deck without a sweep" "$esft" --sweep list "$src/input/demo.yaml"
contains "$tmp/err" "has no sweep block" "no sweep block"
bad() { # WHAT BLOCK MESSAGE: a sweep block refused by --sweep list, naming its place
    printf 'phase: [score, select, train]\nmodel: {path: m}\ndata: {path: d.h5}\n%s\n' "$2" \
        >"$tmp/bad.yaml"
    expect 2 "$1" "$esft" --sweep list "$tmp/bad.yaml"
    contains "$tmp/err" "$3" "$1"
}
bad "value out of range" 'sweep: {select.top_p: [0.2, 2]}' "bad.yaml:4:9: sweep: select.top_p"
bad "value of the wrong type" 'sweep: {train.steps: [2, many]}' "train.steps"
bad "unknown key" 'sweep: {select.top: [0.1]}' "bad.yaml:4:9: sweep: select.top is not a deck key"
bad "phase swept" 'sweep: {phase: [score, select]}' "phase cannot be swept"
bad "parallel.ep swept" 'sweep: {parallel.ep: [1, 2]}' "the layout is the launcher's"
bad "run.output_dir swept" 'sweep: {run.output_dir: [a, b]}' "run.output_dir are the sweep's"
bad "zip of unequal lists" 'sweep: {mode: zip, train.lr: [1, 2], select.top_p: [0.1]}' \
    "mode zip pairs the i-th values"
bad "bad mode" 'sweep: {mode: cross, train.lr: [1]}' "mode must be grid"
bad "a value twice" 'sweep: {train.lr: [1, 1]}' "lists 1 twice"
printf 'phase: score\nmodel: {path: m}\ndata: {path: d.h5}\nsweep: {train.lr: [1, 2]}\n' >"$tmp/bad.yaml"
expect 2 "nothing reads it" "$esft" --sweep list "$tmp/bad.yaml"
contains "$tmp/err" "bad.yaml:4:9: sweep: no phase of this deck" "nothing reads it"
printf 'phase: [select, train]\nmodel: {path: m}\ndata: {path: d.h5}\nsweep:\n  mode: zip\n  train.lr: [1, 2]\n  select.top_p: [0.1, 0.2]\n' >"$tmp/zip.yaml"
expect 0 "zip" "$esft" --sweep list "$tmp/zip.yaml"
contains "$tmp/out" "1	lr-2_top_p-0.2	" "zip: the i-th values together, names in the sweep's key order"

# --- what jobs/esft-sweep would submit, and run outside Slurm
expect 0 "esft-sweep echo, Slurm" env ESFT_LAUNCH_ECHO=1 ESFT_SWEEP_LAUNCH=slurm ESFT="$esft" \
    "$sweep" --max-concurrent 3 --ep 1 "$deck" "$@"
[ "$(wc -l <"$tmp/out")" = 2 ] && ok || fail "esft-sweep echo: $(cat "$tmp/out")"
contains "$tmp/out" "sbatch --parsable --job-name=esft-shared --nodes=1 $jobs/esft.sbatch $deck --pp 1 --ep 1 run.output_dir=$out" \
    "the shared job"
contains "$tmp/out" "score.n_sample_tokens=2048 --sweep=shared" "the shared job's role"
contains "$tmp/out" "sbatch --parsable --job-name=esft-sweep --nodes=1 --array=0-7%3 --dependency=afterok:SHARED_JOB_ID $jobs/esft.sbatch $deck --pp 1 --ep 1 run.output_dir=$out" \
    "the job array after the shared job, at most 3 at once"
contains "$tmp/out" "score.n_sample_tokens=2048 --sweep-point=array" "each task its point"
expect 0 "esft-sweep echo, Slurm, GPUs per node" env ESFT_LAUNCH_ECHO=1 ESFT_SWEEP_LAUNCH=slurm \
    ESFT="$esft" "$sweep" -N 2 -G 4 "$deck" "$@"
contains "$tmp/out" "sbatch --parsable --job-name=esft-sweep --nodes=2 --gpus-per-node=4 --ntasks-per-node=4 --array=0-7 --dependency" \
    "-N and -G given to sbatch, no concurrency limit"
expect 0 "esft-sweep echo, local" env ESFT_LAUNCH_ECHO=1 ESFT_SWEEP_LAUNCH=local ESFT="$esft" \
    "$sweep" "$deck" "$@"
[ "$(wc -l <"$tmp/out")" = 10 ] && ok || fail "esft-sweep local echo: $(wc -l <"$tmp/out") lines"
contains "$tmp/out" "$jobs/esft-run -N 1 -G 1 --pp 1 --ep 1 $deck run.output_dir=$out" "local: esft-run"
contains "$tmp/out" "--sweep=shared" "local: shared first"
contains "$tmp/out" "--sweep-point=7" "local: the last point"
contains "$tmp/out" "--sweep summary $deck" "local: the summary at the end"
expect 2 "esft-sweep refuses a bad sweep before submitting" env ESFT_SWEEP_LAUNCH=slurm \
    ESFT="$esft" "$sweep" "$tmp/bad.yaml" 'sweep.mode=zip'
absent "$out" "nothing written before the run"

# --- Stand-ins: sbatch runs the batch script at once (each task of an array in turn,
# with the job's variables), unless its afterok dependency failed, and prints the job id;
# srun drops its options and runs the program (one rank).
mkdir "$tmp/bin" "$tmp/jobs"
cat >"$tmp/bin/sbatch" <<'FAKE'
#!/bin/sh
echo "sbatch $*" >>"$FAKE_LOG"
id=$(( $(ls "$FAKE_JOBS" | wc -l) + 100 ))
array="" dependency=""
while [ $# -gt 0 ]; do
    case $1 in
    --array=*) array=${1#--array=} ;;
    --dependency=afterok:*) dependency=${1#--dependency=afterok:} ;;
    --*) ;;
    *) break ;;
    esac
    shift
done
status=0
if [ -n "$dependency" ] && [ "$(cat "$FAKE_JOBS/$dependency")" != 0 ]; then
    status=never
else
    range=${array%%%*}
    first=${range%-*} last=${range#*-}
    [ -n "$array" ] || first=0 last=0
    i=$first
    while [ "$i" -le "$last" ]; do
        if [ -n "$array" ]; then task="SLURM_ARRAY_TASK_ID=$i"; else task="NO_ARRAY=1"; fi
        env SLURM_JOB_ID=$id "$task" SLURM_SUBMIT_DIR="$PWD" SLURM_JOB_NUM_NODES=1 \
            SLURM_GPUS_ON_NODE=1 bash "$@" >>"$FAKE_LOG.jobs" 2>&1 || status=$?
        i=$((i + 1))
    done
fi
echo "$status" >"$FAKE_JOBS/$id"
echo "$id"
FAKE
cat >"$tmp/bin/srun" <<'FAKE'
#!/bin/sh
echo "srun $*" >>"$FAKE_LOG"
while [ $# -gt 0 ]; do case $1 in --*) shift ;; *) break ;; esac; done
exec "$@"
FAKE
chmod +x "$tmp/bin/sbatch" "$tmp/bin/srun"
submit_sweep() { # WHAT: jobs/esft-sweep under the stand-ins, from $tmp
    (cd "$tmp" && env PATH="$tmp/bin:$PATH" FAKE_LOG="$tmp/fake.log" FAKE_JOBS="$tmp/jobs" \
        ESFT="$esft" ESFT_HOME="$src" ESFT_PREFLIGHT=0 "$sweep" --max-concurrent 2 "$deck" "$@") \
        >"$tmp/out" 2>"$tmp/err"
}
submit_sweep "$@"
[ $? = 0 ] && ok || fail "esft-sweep under the stand-ins: $(tail -n 20 "$tmp/fake.log.jobs")"
contains "$tmp/err" "shared phases: job 100" "esft-sweep names the shared job"
contains "$tmp/err" "points: job array 101 (0-7%2)" "esft-sweep names the job array"
contains "$tmp/fake.log" "--dependency=afterok:100" "the array waits for the shared job"
n=$(grep -c "^srun .*--sweep-point=[0-7]" "$tmp/fake.log")
[ "$n" = 8 ] && ok || fail "srun started $n points, expected 8"

# Scored once: one statistics file, one score line in every metrics file there is, and
# every point started after it was written.
stats="$out/routing_stats.h5"
n=$(find "$out" -name routing_stats.h5 | wc -l)
[ "$n" = 1 ] && ok || fail "$n statistics files, expected 1 ($stats)"
n=$(cat $(find "$out" -name metrics.jsonl) | grep -c '"event": "score"')
[ "$n" = 1 ] && ok || fail "$n score lines in the metrics files, expected 1"
n=$(find "$out/sweep" -name metrics.jsonl -newer "$stats" | wc -l)
[ "$n" = 8 ] && ok || fail "$n points' metrics newer than the statistics, expected 8"
n=$(cat "$out"/sweep/*/metrics.jsonl | grep -c '"event": "select"')
[ "$n" = 8 ] && ok || fail "$n select lines in the points' metrics, expected 8"
for f in expert_config.json adapter/adapter.safetensors loss.svg; do
    n=$(ls "$out"/sweep/*/$f 2>/dev/null | wc -l)
    [ "$n" = 8 ] && ok || fail "$n points wrote $f, expected 8"
done
# the points differ in what they select: top_p 0.4 trains more experts than 0.2
a=$(grep -o '"experts_chosen": [0-9]*' "$out/sweep/top_p-0.2_score_function-token_lr-1.0e-3/metrics.jsonl")
b=$(grep -o '"experts_chosen": [0-9]*' "$out/sweep/top_p-0.4_score_function-token_lr-1.0e-3/metrics.jsonl")
[ "${a##* }" -lt "${b##* }" ] && ok || fail "experts chosen: top_p 0.2 $a, top_p 0.4 $b"

# A second submission does not score again: the shared job finds its mark and stops.
before=$(ls -l --time-style=+%s.%N "$stats")
(cd "$tmp" && env PATH="$tmp/bin:$PATH" FAKE_LOG="$tmp/fake.log" FAKE_JOBS="$tmp/jobs" \
    ESFT="$esft" ESFT_HOME="$src" "$esft" "$deck" "$@" --sweep shared) >"$tmp/out" 2>"$tmp/err"
contains "$tmp/out" "the shared phases already ran from this deck" "second shared run"
[ "$(ls -l --time-style=+%s.%N "$stats")" = "$before" ] && ok || fail "the statistics file was rewritten"
# A point of a deck whose shared part differs refuses to mix with these outputs.
expect 2 "a point over another deck's shared outputs" "$esft" "$deck" "$@" \
    score.n_sample_tokens=4096 --sweep-point 0
contains "$tmp/err" "was written by the shared phases of another deck" "another deck's shared outputs"
contains "$tmp/err" "this deck:   n_sample_tokens: 4096" "the difference named"

# --- the summary
expect 0 "--sweep summary" "$esft" --sweep summary "$deck" "$@"
cp "$tmp/out" "$tmp/summary.txt"
for f in summary.md summary.csv summary.svg; do
    [ -s "$out/sweep/$f" ] && ok || fail "summary: $f not written"
done
contains "$tmp/summary.txt" "8 points (8 done, 0 running, 0 stopped, 0 failed, 0 not started)" "summary counts"
contains "$tmp/summary.txt" "shared phases (init, prepare, score) in $out: done" "summary: the shared run"
n=$(grep -c ',done,' "$out/sweep/summary.csv")
[ "$n" = 8 ] && ok || fail "summary.csv: $n points done, expected 8"
# the best point, by the CSV's best_val_loss column (12th), as the summary names it
column=$(head -n 1 "$out/sweep/summary.csv" | tr ',' '\n' | grep -n '^best_val_loss$' | cut -d: -f1)
best=$(tail -n +2 "$out/sweep/summary.csv" | sort -t, -k"$column","$column" -g | head -n 1 | cut -d, -f1,2)
contains "$tmp/summary.txt" "best: point ${best%%,*}, ${best#*,} (best validation loss" "the best point"
contains "$out/sweep/summary.md" "| ${best%%,*} | ${best#*,} **best** |" "the best point marked in the table"
n=$(grep -c '<polyline' "$out/sweep/summary.svg")
[ "$n" = 2 ] && ok || fail "summary.svg: $n lines, expected one per value of select.score_function"
contains "$out/sweep/summary.svg" "select.score_function = gate" "summary.svg legend"
contains "$out/sweep/summary.svg" ">select.top_p</text>" "summary.svg x axis"
grep -q '"trainable_parameters": [0-9]*, "parameters": [0-9]' "$out/sweep/top_p-0.2_score_function-token_lr-1.0e-3/metrics.jsonl" &&
    ok || fail "train's summary line without the model's parameter count"
# Points running, failed and not started are shown as such.
rm -rf "$out/sweep/top_p-0.4_score_function-gate_lr-3.0e-3"
echo '{"event": "start"}' >>"$out/sweep/top_p-0.4_score_function-gate_lr-1.0e-3/metrics.jsonl"
printf '{"event": "start"}\n{"event": "end", "status": 1}\n' \
    >>"$out/sweep/top_p-0.4_score_function-token_lr-3.0e-3/metrics.jsonl"
# Start lines that name their process: one still there (this host), one gone (its pid
# ended), one on another host (not checked from here).
sleep 300 &
alive=$!
alive_start=$(sed 's/.*) //' "/proc/$alive/stat" | cut -d' ' -f20)
gone=$(sh -c 'echo $$')
host=$(hostname)
printf '{"event": "start", "host": "%s", "pid": %s, "pid_start": %s}\n' "$host" "$alive" \
    "$alive_start" >>"$out/sweep/top_p-0.2_score_function-gate_lr-3.0e-3/metrics.jsonl"
printf '{"event": "start", "host": "%s", "pid": %s, "pid_start": 1}\n' "$host" "$gone" \
    >>"$out/sweep/top_p-0.2_score_function-gate_lr-1.0e-3/metrics.jsonl"
printf '{"event": "start", "host": "elsewhere.invalid", "pid": 1, "pid_start": 1}\n' \
    >>"$out/sweep/top_p-0.2_score_function-token_lr-3.0e-3/metrics.jsonl"
expect 0 "--sweep summary, some points unfinished" "$esft" --sweep summary "$deck" "$@"
kill "$alive"
contains "$tmp/out" "8 points (2 done, 3 running, 0 stopped, 2 failed, 1 not started)" "summary states"
contains "$tmp/out" "| running (pid $alive on $host) |" "a running point's process"
contains "$tmp/out" "| failed (no end; pid $gone on $host is gone) |" "a killed point"
contains "$tmp/out" "| running (pid 1 on elsewhere.invalid) |" "a point on another host"
# the pid of a gone point reused by another process: still gone
printf '{"event": "start", "host": "%s", "pid": %s, "pid_start": 1}\n' "$host" "$$" \
    >>"$out/sweep/top_p-0.2_score_function-token_lr-3.0e-3/metrics.jsonl"
expect 0 "--sweep summary, a reused pid" "$esft" --sweep summary "$deck" "$@"
contains "$tmp/out" "| failed (no end; pid $$ on $host is gone) |" "a reused pid"
contains "$tmp/out" "| 7 | top_p-0.4_score_function-gate_lr-3.0e-3 | 0.4 | gate | 3.0e-3 | not started |" "not started"
contains "$tmp/out" "| running |" "running"
contains "$tmp/out" "| failed (status 1) |" "failed"

# The batch template outside a job array refuses the array's point.
expect 2 "--sweep-point=array outside an array" env PATH="$tmp/bin:$PATH" FAKE_LOG="$tmp/fake.log" \
    ESFT_HOME="$src" bash "$src/jobs/esft.sbatch" "$deck" --sweep-point=array
contains "$tmp/err" "outside a job array" "--sweep-point=array outside an array"

test_end test-sweep
