#!/usr/bin/env python3
"""bench_forward_hf: throughput of transformers' forward pass on the checkpoint and batch
that bench_forward (esft) times, for run-forward.sh. Developers only: CI does not run it.

Same batch as bench_forward.c: B rows of T tokens, one sample per row, positions 0..T-1,
labels = the tokens (transformers shifts them: the next token, the last one not counted),
token[i] = splitmix64(seed + (i + 1) * 0x9E3779B97F4A7C15) mod V. fp32 on the CPU (esft's
CPU backend is fp32), torch.inference_mode(), eager attention.

Each experts implementation asked for (--experts, default eager,grouped_mm,batched_mm)
prints one block of the same fields as bench_forward; "eager" is the reference the ratio
in run-forward.sh is taken against. An implementation that fails or would not fit in
memory prints "skipped: <why>" instead of its timings.

Usage: bench_forward_hf.py MODEL_DIR [--batch 8] [--seq 512] [--iters 5] [--warmup 1]
                           [--threads N] [--seed 1234] [--experts eager,grouped_mm,...]
"""
import argparse
import os
import statistics
import time

MASK64 = (1 << 64) - 1


def splitmix64(z):
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def bench_tokens(seed, count, vocab):
    return [splitmix64((seed + (i + 1) * 0x9E3779B97F4A7C15) & MASK64) % vocab
            for i in range(count)]


def available_bytes():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def default_threads():
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else os.cpu_count()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--experts", default="eager,grouped_mm,batched_mm",
                        help="comma-separated experts implementations to time")
    args = parser.parse_args()

    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    torch.set_num_threads(args.threads)
    config = AutoConfig.from_pretrained(args.model_dir)
    B, T = args.batch, args.seq
    N = B * T
    input_ids = torch.tensor(bench_tokens(args.seed, N, config.vocab_size),
                             dtype=torch.long).view(B, T)
    H, I, K = config.hidden_size, config.moe_intermediate_size, config.num_experts_per_tok

    for experts in args.experts.split(","):
        print(f"implementation: transformers {experts} (experts {experts}, attention eager, fp32)")
        print(f"threads: {torch.get_num_threads()}")
        print(f"batch: {B} x {T}")
        print(f"tokens per iteration: {N}")
        if experts == "batched_mm":
            # batched_mm gathers a copy of the [2I, H] and [H, I] weights per token-slot
            need = N * K * 3 * I * H * 4
            if need > available_bytes() // 2:
                print(f"skipped: batched_mm gathers {need / 2**30:.1f} GiB of expert weights "
                      f"per layer ({available_bytes() / 2**30:.1f} GiB available)\n", flush=True)
                continue
        try:
            t = time.perf_counter()
            model = AutoModelForCausalLM.from_pretrained(
                args.model_dir, dtype=torch.float32, attn_implementation="eager",
                experts_implementation=experts)
            model.eval()
            load = time.perf_counter() - t
            seconds = []
            with torch.inference_mode():
                for i in range(args.warmup + args.iters):
                    t = time.perf_counter()
                    out = model(input_ids=input_ids, labels=input_ids, use_cache=False)
                    if i >= args.warmup:
                        seconds.append(time.perf_counter() - t)
            loss = float(out.loss)
        except Exception as e:  # report and go on with the next implementation
            print(f"skipped: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}\n",
                  flush=True)
            continue
        finally:
            out = model = None
        median = statistics.median(seconds)
        print(f"load seconds: {load:.2f}")
        print(f"warmup: {args.warmup}")
        print(f"iterations: {args.iters}")
        print(f"loss: {loss:.6f}")
        print(f"median seconds per iteration: {median:.4f}")
        print(f"min seconds per iteration: {min(seconds):.4f}")
        print(f"tokens per second: {N / median:.1f}\n", flush=True)


if __name__ == "__main__":
    main()
