#!/bin/sh
# run-tokenizer.sh: esft's and the `tokenizers` library's encode throughput side by side
# on the tokenizer test corpus, for each fixture tokenizer (make bench-tokenizer).
# PYTHON (default python3) must have `tokenizers` installed; without it only esft's line
# is printed.
set -u
srcdir=${ESFT_TOP_SRCDIR:-.}
bench=${BENCH_TOKENIZER:-tests/bench/bench_tokenizer}
python=${PYTHON:-python3}
seconds=${SECONDS_PER_RUN:-3}
corpus="$srcdir/tests/tokenizer/corpus.bin.gz"
echo "tokenizer encode throughput, $(date -u +%Y-%m-%d), $(uname -n), $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | sed 's/.*: //')"
for family in olmoe qwen mixtral mixtral_metaspace deepseek-v2 deepseek-v3 glm45 gpt-oss; do
    json="$srcdir/tests/tokenizer/$family/tokenizer.json.gz"
    "$bench" "$json" "$corpus" "$seconds" || exit 1
    if "$python" -c 'import tokenizers' 2>/dev/null; then
        "$python" "$srcdir/tests/bench/bench_tokenizer_hf.py" "$json" "$corpus" "$seconds"
    else
        echo "tokenizers: not installed for $python (pip install tokenizers)"
    fi
done
