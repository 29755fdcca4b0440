#!/bin/sh
# test-export: the exports written by the ranks that hold the tensors (tests/test_export.c:
# the ESFT adapter and its ESFT-reference layout, the merged checkpoint in shards, the
# LoRA adapter, gpt_oss's fused experts, bf16 frozen weights; each file read back and
# compared with values converted there, and a write failing on one rank) on 1 rank and
# under (pp, dp, ep) = (1,1,4), (2,1,2) and (1,2,2): every layout writes the same files,
# byte for byte, and nothing else.
set -u
. "${ESFT_TOP_SRCDIR:-.}/tests/lib.sh"
test_begin export

# shellcheck disable=SC2086 # mpirun is a command line
expect 0 "1 rank" $mpirun 1 "$build/tests/test_export" "$tmp/one" 1 1
# The files of an export run: every file but the inputs (the base checkpoint, the
# expert_config given) and the failed export's directory, which must stay empty.
files() {
    (cd "$1" && find . -type f ! -path './base/*' ! -name expert_config-source.json | sort)
}
files "$tmp/one" >"$tmp/one.list"
[ "$(wc -l <"$tmp/one.list")" -ge 12 ] && ok || fail "1 rank: only $(wc -l <"$tmp/one.list") files"
for layout in "1 4" "2 2" "1 2"; do
    set -- $layout
    name="pp$1-ep$2"
    # shellcheck disable=SC2086
    expect 0 "$name" $mpirun 4 "$build/tests/test_export" "$tmp/$name" "$1" "$2"
    files "$tmp/$name" >"$tmp/$name.list"
    cmp -s "$tmp/one.list" "$tmp/$name.list" && ok ||
        fail "$name: other files than 1 rank's: $(diff "$tmp/one.list" "$tmp/$name.list" | tr '\n' ' ')"
    while read -r f; do
        cmp -s "$tmp/one/$f" "$tmp/$name/$f" && ok || fail "$name: $f differs from 1 rank's"
    done <"$tmp/one.list"
done
test_end test-export
