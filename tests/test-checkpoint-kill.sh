#!/bin/sh
# test-checkpoint-kill: a checkpoint is never torn. `test_checkpoint write-forever DIR`
# resumes from DIR's newest checkpoint and writes one checkpoint (about 12 MB) per step
# until it is killed; this script kills it with SIGKILL at random moments, several times,
# and after each kill `test_checkpoint verify DIR` must read back every checkpoint under
# a real name (step-*.h5) with exactly the values its step implies. A kill during a write
# may leave a temporary file (.step-*.h5.tmp), which checkpoint_latest ignores and the
# next write deletes; the number of such kills is printed, as evidence that kills landed
# inside writes.
set -u
build=${ESFT_TOP_BUILDDIR:-.}
mpirun=${TESTMPIRUN:-mpiexec --oversubscribe -n}
program="$build/tests/test_checkpoint"
rounds=${ESFT_KILL_ROUNDS:-10}
tmp=$(mktemp -d "${TMPDIR:-/tmp}/esft-kill.XXXXXX")
launcher=""
cleanup() {
    [ -n "$launcher" ] && kill -9 "$launcher" 2>/dev/null
    [ -s "$tmp/out/pid" ] && kill -9 "$(cat "$tmp/out/pid")" 2>/dev/null
    rm -rf "$tmp"
}
trap cleanup EXIT
passed=0
failed=0
torn_kills=0

ok() { passed=$((passed + 1)); }
fail() {
    failed=$((failed + 1))
    echo "FAILED: $*"
}
show() { # FILE: its last lines, indented
    [ -f "$1" ] && sed 's/^/    /' "$1" | tail -n 12
}

# A random delay of 0 to SPAN - 1 milliseconds, in seconds.
random_delay() {
    n=$(od -An -N2 -tu2 /dev/urandom | tr -d ' ')
    ms=$((n % $1))
    printf '%d.%03d' $((ms / 1000)) $((ms % 1000))
}
# The kills land within span ms of the writer's start: 300 at first, doubled (up to 9600)
# after each round while no checkpoint has been completed yet, so that a slow build (the
# sanitizers' writes take longer than 300 ms) still completes some.
span=300

round=1
while [ $round -le "$rounds" ]; do
    rm -f "$tmp/out/pid"
    # shellcheck disable=SC2086 # TESTMPIRUN is a command line
    $mpirun 1 "$program" write-forever "$tmp/out" >"$tmp/writer.log" 2>&1 &
    launcher=$!
    # the writer announces its pid once it has resumed and is about to write
    waited=0
    while [ ! -s "$tmp/out/pid" ] && [ $waited -lt 600 ] && kill -0 $launcher 2>/dev/null; do
        sleep 0.05
        waited=$((waited + 1))
    done
    if [ ! -s "$tmp/out/pid" ]; then
        fail "round $round: the writer did not start (resuming from the newest checkpoint)"
        show "$tmp/writer.log"
        kill -9 $launcher 2>/dev/null
        wait $launcher 2>/dev/null
        launcher=""
        break
    fi
    pid=$(cat "$tmp/out/pid")
    delay=$(random_delay $span)
    sleep "$delay"
    kill -9 "$pid"
    wait $launcher 2>/dev/null
    launcher=""
    n_tmp=$(find "$tmp/out/checkpoints" -name '.step-*.h5.tmp' 2>/dev/null | wc -l)
    [ "$n_tmp" -gt 0 ] && torn_kills=$((torn_kills + 1))
    # shellcheck disable=SC2086
    if $mpirun 1 "$program" verify "$tmp/out" >"$tmp/verify.log" 2>&1; then
        ok
        echo "round $round: killed after ${delay}s: $(tail -n 1 "$tmp/verify.log")"
    else
        fail "round $round: killed after ${delay}s: a checkpoint under a real name does not read back"
        show "$tmp/verify.log"
    fi
    if [ -z "$(find "$tmp/out/checkpoints" -name 'step-*.h5' 2>/dev/null)" ] && [ $span -lt 9600 ]; then
        span=$((span * 2))
    fi
    round=$((round + 1))
done

# the rounds must have produced checkpoints at all (else nothing was tested)
n_real=$(find "$tmp/out/checkpoints" -name 'step-*.h5' 2>/dev/null | wc -l)
if [ "$n_real" -gt 0 ]; then ok; else fail "no checkpoint was ever completed"; fi
echo "kills that left a temporary file (inside a write): $torn_kills of $rounds"
echo "$passed passed, $failed failed"
[ $failed -eq 0 ]
