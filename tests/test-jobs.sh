#!/bin/sh
# test-jobs: jobs/esft-run builds the launch command a user expects from the layout on
# its command line, refuses layouts that cannot run, and passes SIGUSR1 on to the ranks.
set -u
src=${ESFT_TOP_SRCDIR:-.}
run="$src/jobs/esft-run"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/esft-jobs.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
passed=0
failed=0
check() { # DESCRIPTION TEST...
    what=$1
    shift
    if "$@"; then passed=$((passed + 1)); else failed=$((failed + 1)); echo "FAILED: $what"; fi
}

out=$(ESFT_LAUNCH_ECHO=1 ESFT_LAUNCHER=srun ESFT=/opt/esft "$run" -N 2 -G 4 --ep 4 d.yaml train.lr=1e-5 2>"$tmp/err")
check "srun exit status" [ $? = 0 ]
check "srun command" [ "$out" = "srun --nodes=2 --ntasks-per-node=4 --gpus-per-task=1 --cpu-bind=cores --kill-on-bad-exit=1 /opt/esft d.yaml parallel.pp=1 parallel.ep=4 train.lr=1e-5" ]
check "layout line" grep -q "8 ranks = pp 1 x dp 2 x ep 4" "$tmp/err"

out=$(ESFT_LAUNCH_ECHO=1 ESFT_LAUNCHER=mpirun ESFT=esft "$run" -N 1 -G 8 --pp 2 --ep 2 d.yaml 2>/dev/null)
check "mpirun command" [ "$out" = "mpirun -np 8 --map-by ppr:8:node --bind-to core esft d.yaml parallel.pp=2 parallel.ep=2" ]

ESFT_LAUNCH_ECHO=1 "$run" -N 1 -G 6 --ep 4 d.yaml >/dev/null 2>"$tmp/err"
check "indivisible layout refused" [ $? = 2 ]
check "indivisible layout message" grep -q "6 ranks (1 nodes x 6 GPUs) are not divisible by pp x ep = 4" "$tmp/err"
ESFT_LAUNCH_ECHO=1 "$run" -N 0 -G 6 d.yaml >/dev/null 2>&1
check "zero nodes refused" [ $? = 2 ]
"$run" -N 1 >/dev/null 2>&1
check "missing deck refused" [ $? = 2 ]

# Signal forwarding: a stand-in launcher records the signal it gets.
cat >"$tmp/fake-mpirun" <<'FAKE'
#!/bin/sh
trap 'echo USR1 >"$FAKE_LOG"; exit 0' USR1
echo started >"$FAKE_LOG"
i=0
while [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
exit 3
FAKE
chmod +x "$tmp/fake-mpirun"
mkdir "$tmp/bin"
ln -s "$tmp/fake-mpirun" "$tmp/bin/mpirun"
PATH="$tmp/bin:$PATH" FAKE_LOG="$tmp/fake.log" ESFT_LAUNCHER=mpirun "$run" -N 1 -G 1 d.yaml 2>/dev/null &
pid=$!
i=0
while [ ! -s "$tmp/fake.log" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
kill -USR1 $pid
wait $pid
status=$?
check "signal forwarded to the launcher" grep -q USR1 "$tmp/fake.log"
check "launcher's exit status kept after the signal" [ $status = 0 ]

echo "test-jobs: $passed checks passed, $failed failed"
[ "$failed" = 0 ]
