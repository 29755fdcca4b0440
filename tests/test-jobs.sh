#!/bin/sh
# test-jobs: the Slurm job files under stand-in srun, mpirun and scontrol commands.
# jobs/esft-run builds the launch command a user expects from the layout on its command
# line, refuses layouts that cannot run, passes SIGUSR1 on to the ranks and returns the
# launcher's exit status (3 after a stop) unchanged. jobs/esft.sbatch, run as Slurm runs
# it (a copy in a spool directory, started in a user directory without jobs/), finds
# esft-run in an installation (`make install`), through ESFT_HOME, in a checkout and on
# PATH, and requeues its job when esft stopped (status 3), never otherwise, at most
# ESFT_MAX_REQUEUES times.
set -u
. "${ESFT_TOP_SRCDIR:-.}/tests/lib.sh"
test_begin jobs
run="$src/jobs/esft-run"
# The caller's own settings must not steer the scripts under test.
unset ESFT ESFT_HOME ESFT_LAUNCHER ESFT_LAUNCH_ECHO ESFT_MAX_REQUEUES \
    SLURM_JOB_ID SLURM_RESTART_COUNT SLURM_SUBMIT_DIR SLURM_JOB_NUM_NODES \
    SLURM_GPUS_ON_NODE SLURM_NTASKS_PER_NODE SLURM_CPUS_PER_TASK
# The launcher plumbing below runs stand-ins for decks that do not exist: esft-run's own
# check of the deck (esft --dry-run) is tested on its own, at the end.
ESFT_PREFLIGHT=0
export ESFT_PREFLIGHT

# --- esft-run: command lines and refusals.
out=$(ESFT_LAUNCH_ECHO=1 ESFT_LAUNCHER=srun ESFT=/opt/esft "$run" -N 2 -G 4 --ep 4 d.yaml train.lr=1e-5 2>"$tmp/err")
if [ $? = 0 ]; then ok; else fail "srun exit status"; fi
if [ "$out" = "srun --nodes=2 --ntasks-per-node=4 --gpus-per-task=1 --cpu-bind=cores --kill-on-bad-exit=0 --wait=120 /opt/esft d.yaml parallel.pp=1 parallel.ep=4 train.lr=1e-5" ]; then
    ok
else
    fail "srun command: $out"
fi
contains "$tmp/err" "8 ranks = pp 1 x dp 2 x ep 4" "layout line"

out=$(ESFT_LAUNCH_ECHO=1 ESFT_LAUNCHER=mpirun ESFT=esft "$run" -N 1 -G 8 --pp 2 --ep 2 d.yaml 2>/dev/null)
if [ "$out" = "mpirun -np 8 --map-by ppr:8:node --bind-to core esft d.yaml parallel.pp=2 parallel.ep=2" ]; then
    ok
else
    fail "mpirun command: $out"
fi

expect 2 "indivisible layout refused" env ESFT_LAUNCH_ECHO=1 "$run" -N 1 -G 6 --ep 4 d.yaml
contains "$tmp/err" "6 ranks (1 nodes x 6 GPUs) are not divisible by pp x ep = 4" "indivisible layout message"
expect 2 "zero nodes refused" env ESFT_LAUNCH_ECHO=1 "$run" -N 0 -G 6 d.yaml
expect 2 "missing deck refused" "$run" -N 1

# --- Stand-ins: srun and mpirun append their command line to $FAKE_LOG and exit with
# $FAKE_STATUS, as the launcher does with the ranks' status; scontrol appends its.
mkdir "$tmp/bin" "$tmp/spool" "$tmp/user"
cat >"$tmp/bin/srun" <<'FAKE'
#!/bin/sh
echo "$(basename "$0") $*" >>"$FAKE_LOG"
exit "${FAKE_STATUS:-0}"
FAKE
cat >"$tmp/bin/scontrol" <<'FAKE'
#!/bin/sh
echo "scontrol $*" >>"$FAKE_LOG"
exit "${FAKE_SCONTROL_STATUS:-0}"
FAKE
chmod +x "$tmp/bin/srun" "$tmp/bin/scontrol"
ln -s srun "$tmp/bin/mpirun"
fake_path="$tmp/bin:/usr/bin:/bin"

for status in 0 1 2 3; do
    rm -f "$tmp/fake.log"
    expect $status "esft-run returns the launcher's status $status" \
        env PATH="$fake_path" FAKE_LOG="$tmp/fake.log" FAKE_STATUS=$status ESFT_LAUNCHER=srun \
        "$run" -N 1 -G 2 d.yaml
done
contains "$tmp/fake.log" "srun --nodes=1 --ntasks-per-node=2" "esft-run started srun"

# Signal forwarding: a stand-in launcher that stops at once on SIGUSR1 with status 3, as
# esft does after its checkpoint. esft-run must pass the signal on and return that 3,
# not the 128 + 10 of its own interrupted wait, though the launcher may be gone by the
# time the trap returns (a race, so several tries, with each shell at hand).
mkdir "$tmp/sig"
cat >"$tmp/sig/mpirun" <<'FAKE'
#!/bin/sh
trap 'kill $sleeper; echo USR1 >>"$FAKE_LOG"; exit 3' USR1
sleep 10 &
sleeper=$!
echo started >>"$FAKE_LOG"
wait
exit 5
FAKE
chmod +x "$tmp/sig/mpirun"
for shell in sh bash; do
    command -v $shell >/dev/null 2>&1 || continue
    for try in 1 2 3 4 5; do
        rm -f "$tmp/fake.log"
        PATH="$tmp/sig:$PATH" FAKE_LOG="$tmp/fake.log" ESFT_LAUNCHER=mpirun $shell "$run" -N 1 -G 1 d.yaml 2>/dev/null &
        pid=$!
        i=0
        while ! grep -q started "$tmp/fake.log" 2>/dev/null && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
        kill -USR1 $pid
        wait $pid
        status=$?
        if grep -q USR1 "$tmp/fake.log"; then ok; else fail "$shell, try $try: SIGUSR1 not forwarded to the launcher"; fi
        if [ $status = 3 ]; then ok; else fail "$shell, try $try: exit status $status after the signal, expected the launcher's 3"; fi
    done
done

# --- esft.sbatch as Slurm runs it: a copy in the spool directory, started in the user's
# directory (no jobs/ there), with the job's variables; the stand-ins on PATH.
# batch TEMPLATE [VAR=VALUE ...]: exit status -> $batch_status, stderr -> $tmp/err, the
# stand-ins' command lines -> $tmp/fake.log.
batch() {
    cp "$1" "$tmp/spool/slurm_script"
    shift
    rm -f "$tmp/fake.log"
    (cd "$tmp/user" && env PATH="$fake_path" FAKE_LOG="$tmp/fake.log" SLURM_JOB_ID=42 \
        SLURM_SUBMIT_DIR="$tmp/user" SLURM_JOB_NUM_NODES=1 SLURM_GPUS_ON_NODE=2 "$@" \
        bash "$tmp/spool/slurm_script" d.yaml --ep 2 train.lr=1e-5) >/dev/null 2>"$tmp/err"
    batch_status=$?
}
status_is() { # STATUS WHAT
    if [ "$batch_status" = "$1" ]; then ok; else fail "$2: exit status $batch_status, expected $1"; fi
}
# launched_with ESFT_PATH WHAT: the job started that esft with the job's arguments.
launched_with() {
    contains "$tmp/fake.log" "--wait=120 $1 d.yaml parallel.pp=1 parallel.ep=2 train.lr=1e-5" "$2"
}
not_launched() { # WHAT
    if [ -s "$tmp/fake.log" ]; then fail "$1: launched anyway"; else ok; fi
}
# requeued COUNT WHAT: scontrol was asked COUNT times (0 or 1) to requeue job 42.
requeued() {
    n=$(grep -c "^scontrol" "$tmp/fake.log" 2>/dev/null)
    n=${n:-0}
    if [ "$n" = "$1" ]; then ok; else fail "$2: scontrol called $n times, expected $1"; fi
    if [ "$1" = 1 ]; then contains "$tmp/fake.log" "scontrol requeue 42" "$2"; fi
}
template="$src/jobs/esft.sbatch"

# An installation: `make install` into a temporary prefix (the esft built for the tests
# and these scripts). Its template knows where esft-run is; esft-run finds esft beside it.
prefix="$tmp/prefix"
if env -u MAKEFLAGS -u MFLAGS -u MAKELEVEL make -C "$build" install prefix="$prefix" >"$tmp/install.log" 2>&1; then
    ok
else
    fail "make install prefix=$prefix in $build: $(tail -n 3 "$tmp/install.log")"
fi
installed="$prefix/share/esft/esft.sbatch"
for file in "$prefix/bin/esft" "$prefix/bin/esft-run" "$prefix/bin/esft-sweep" "$installed"; do
    if [ -f "$file" ]; then ok; else fail "make install did not write $file"; fi
done
batch "$installed"
status_is 0 "installed template"
launched_with "$prefix/bin/esft" "installed template from a user directory runs the installed esft"

# ESFT_HOME: an installation prefix, or a checkout (jobs/esft-run, esft built beside).
batch "$template" ESFT_HOME="$prefix"
launched_with "$prefix/bin/esft" "ESFT_HOME=installation prefix"
checkout="$tmp/checkout"
mkdir -p "$checkout/jobs"
cp "$run" "$checkout/jobs/esft-run"
printf '#!/bin/sh\nexit 0\n' >"$checkout/esft"
chmod +x "$checkout/jobs/esft-run" "$checkout/esft"
batch "$template" ESFT_HOME="$checkout"
launched_with "$checkout/jobs/../esft" "ESFT_HOME=checkout"
batch "$template" ESFT_HOME="$tmp/nowhere"
status_is 2 "ESFT_HOME without esft-run"
not_launched "ESFT_HOME without esft-run"
contains "$tmp/err" "ESFT_HOME=$tmp/nowhere holds neither bin/esft-run" "ESFT_HOME without esft-run"

# Submitted from the checkout (sbatch jobs/esft.sbatch there), the in-tree use.
batch "$template" SLURM_SUBMIT_DIR="$checkout"
launched_with "$checkout/jobs/../esft" "submitted from the checkout"

# PATH, and nowhere at all.
batch "$template" PATH="$prefix/bin:$fake_path"
launched_with "$prefix/bin/esft" "esft-run on PATH"
batch "$template"
status_is 2 "no esft-run anywhere"
not_launched "no esft-run anywhere"
contains "$tmp/err" "esft-run not found" "no esft-run anywhere"
contains "$tmp/err" "hint: set ESFT_HOME" "no esft-run anywhere"

# Requeue on status 3 only, through `scontrol requeue` (which needs --requeue), with the
# signal going to the ranks, not to the batch shell (no B:), so that it sees the status.
for status in 0 1 2 3; do
    batch "$template" ESFT_HOME="$prefix" FAKE_STATUS=$status
    status_is $status "batch script returns esft's status $status"
    if [ $status = 3 ]; then requeued 1 "status 3"; else requeued 0 "status $status"; fi
done
contains "$tmp/err" "requeueing job 42 (1 of at most 10)" "requeue message"
contains "$template" "#SBATCH --requeue" "template asks for a requeueable job"
contains "$template" "#SBATCH --open-mode=append" "template appends the requeued job's output"
contains "$template" "#SBATCH --signal=USR1@" "template asks for SIGUSR1 before the limit"
lacks "$template" "--signal=B:" "SIGUSR1 goes to the ranks, not to the batch shell"

# The limit: SLURM_RESTART_COUNT requeues so far against ESFT_MAX_REQUEUES (default 10).
batch "$template" ESFT_HOME="$prefix" FAKE_STATUS=3 SLURM_RESTART_COUNT=9
requeued 1 "9 requeues so far, limit 10"
contains "$tmp/err" "(10 of at most 10)" "9 requeues so far, limit 10"
batch "$template" ESFT_HOME="$prefix" FAKE_STATUS=3 SLURM_RESTART_COUNT=10
status_is 3 "limit reached"
requeued 0 "10 requeues so far, limit 10"
contains "$tmp/err" "not requeued: requeued 10 times already (ESFT_MAX_REQUEUES=10)" "limit reached"
batch "$template" ESFT_HOME="$prefix" FAKE_STATUS=3 SLURM_RESTART_COUNT=2 ESFT_MAX_REQUEUES=2
requeued 0 "ESFT_MAX_REQUEUES=2 after 2"
batch "$template" ESFT_HOME="$prefix" FAKE_STATUS=3 SLURM_RESTART_COUNT=1 ESFT_MAX_REQUEUES=2
requeued 1 "ESFT_MAX_REQUEUES=2 after 1"
batch "$template" ESFT_HOME="$prefix" FAKE_STATUS=3 ESFT_MAX_REQUEUES=0
requeued 0 "ESFT_MAX_REQUEUES=0"
batch "$template" ESFT_HOME="$prefix" FAKE_STATUS=3 ESFT_MAX_REQUEUES=many
status_is 2 "bad ESFT_MAX_REQUEUES"
not_launched "bad ESFT_MAX_REQUEUES"
contains "$tmp/err" "ESFT_MAX_REQUEUES must be a number >= 0, got 'many'" "bad ESFT_MAX_REQUEUES"

# scontrol refused (a site that forbids requeueing): say how to resume, keep status 3.
batch "$template" ESFT_HOME="$prefix" FAKE_STATUS=3 FAKE_SCONTROL_STATUS=1
status_is 3 "failed requeue"
contains "$tmp/err" "scontrol requeue 42 failed" "failed requeue"
contains "$tmp/err" "hint: submit the same command again" "failed requeue"

# Outside Slurm (bash esft.sbatch on a workstation, through mpirun): nothing to requeue.
batch "$template" ESFT_HOME="$prefix" FAKE_STATUS=3 SLURM_JOB_ID=
status_is 3 "stop outside Slurm"
requeued 0 "outside Slurm"
contains "$tmp/fake.log" "mpirun -np 2" "outside Slurm: mpirun"
contains "$tmp/err" "not in a Slurm job: run the same command again to resume" "outside Slurm"

# esft-run checks the deck with esft --dry-run before it launches anything: a deck whose
# model is not there is refused with status 2, and the launcher never starts; a deck
# that a run would accept is launched.
rm -f "$tmp/fake.log"
expect 2 "esft-run refuses a deck a run would refuse" env PATH="$fake_path" FAKE_LOG="$tmp/fake.log" \
    FAKE_STATUS=0 ESFT_LAUNCHER=mpirun ESFT_PREFLIGHT=1 ESFT="$esft" "$run" -N 1 -G 2 \
    "$src/input/demo.yaml" phase=score "model.path=$tmp/no-model" "data.path=$tmp/no-data.h5" \
    "run.output_dir=$tmp/never"
contains "$tmp/err" "$tmp/no-model/config.json" "esft-run's check names the missing model"
contains "$tmp/err" "nothing was launched" "esft-run's check"
if [ -s "$tmp/fake.log" ]; then fail "esft-run launched a refused deck"; else ok; fi
absent "$tmp/never" "esft-run's check"
expect 0 "esft-run launches a deck a run would accept" env PATH="$fake_path" FAKE_LOG="$tmp/fake.log" \
    FAKE_STATUS=0 ESFT_LAUNCHER=mpirun ESFT_PREFLIGHT=1 ESFT="$esft" "$run" -N 1 -G 2 \
    "$src/input/demo.yaml" "run.output_dir=$tmp/demo-ok" "model.path=$tmp/demo-ok/model" \
    "prepare.output=$tmp/demo-ok/data.h5" "data.path=$tmp/demo-ok/data.h5" \
    "prepare.inputs=[$src/input/data/demo.jsonl]"
contains "$tmp/fake.log" "mpirun -np 2" "esft-run launched the accepted deck"

test_end test-jobs
