#!/bin/sh
# long-jsonl: COUNT conversations of about LENGTH characters each (arithmetic drills, the
# demo's kind of text, run together), as prepare's jsonl; for benchmarks that need long
# samples without a data set. Usage: tests/gpu/long-jsonl.sh COUNT LENGTH > FILE
set -eu
count=${1:-16}
length=${2:-4200}
awk -v count="$count" -v length_="$length" 'BEGIN {
    srand(20261126)
    for (c = 0; c < count; c++) {
        q = ""; a = ""
        while (length(q) + length(a) < length_) {
            x = int(rand() * 100); y = int(rand() * 100)
            q = q sprintf("What is %d + %d? ", x, y)
            a = a sprintf("%d + %d = %d. ", x, y, x + y)
        }
        printf "{\"messages\": [{\"role\": \"user\", \"content\": \"%s\"}, ", q
        printf "{\"role\": \"assistant\", \"content\": \"%s\"}]}\n", a
    }
}'
