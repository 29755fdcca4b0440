#!/usr/bin/env python3
"""bench_cpu_hf: transformers' side of the CPU benchmark (run-cpu.sh), in its fastest CPU
configuration. Developers only: CI does not run it (it needs torch and transformers).

One invocation times one phase on one checkpoint and prints "key: value" lines (the
fields of bench_forward.c) for run-cpu.sh to collect:

  forward   B x T tokens under torch.inference_mode(), labels = the tokens (the loss
            computed, as esft's forward does), the tokens of bench_forward.c
            (splitmix64, the same seed): the same batch as esft's.
  full      a training step on one block of T tokens: forward, backward, gradient
            clipping to 1.0, AdamW, gradients set to None; every parameter trains.
  esft      the same step with only the experts of --expert-config trainable.
  pick      one forward per experts implementation (--experts LIST); prints the fastest
            as "fastest experts: NAME".

The configuration: fp32, attn_implementation="sdpa", experts_implementation from
--experts (run-cpu.sh picks the fastest with `pick`), torch.optim.AdamW with fused=True
(the CPU fused kernel of torch >= 2.4; foreach where it is missing), the hyperparameters
of esft's defaults (lr 1e-5, betas 0.9/0.95, eps 1e-8, weight decay 0.1).

ESFT in transformers 5: a layer's experts are two fused 3-D parameters, [E, 2I, H] and
[E, H, I], so requires_grad cannot pick experts. Each is reparametrized
(torch.nn.utils.parametrize) so that the only trainable tensor is the stack of the
selected experts' slices, [k, 2I, H] and [k, H, I]; the full weight is the frozen
weight with those slices put in (index_copy, rebuilt once per forward under
parametrize.cached()). AdamW holds state only for the selected slices. transformers'
grouped GEMM still computes the weight gradient of every expert of the layer (of the
rebuilt weight), which index_copy's backward then cuts down to the selected slices:
that is the cost a transformers user pays, and it is timed as such.

The training block: T bytes of the first row of --text (a jsonl of {"text": ...} rows,
the file esft's prepare phase reads with the byte tokenizer), so both sides route the
same kind of tokens (esft's block starts at its own shuffled sample; the routing
statistics, not the exact tokens, drive the cost).

Usage: bench_cpu_hf.py PHASE MODEL_DIR [--batch 8] [--seq 512] [--iters 1] [--warmup 1]
           [--threads N] [--seed 1234] [--experts grouped_mm] [--text FILE]
           [--expert-config FILE]
"""
import argparse
import json
import os
import resource
import statistics
import time

import torch
import transformers
from torch.nn.utils import parametrize
from transformers import AutoConfig, AutoModelForCausalLM

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


def load(model_dir, experts):
    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="sdpa",
        experts_implementation=experts)


def make_adamw(params):
    kwargs = dict(lr=1e-5, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    try:
        opt = torch.optim.AdamW(params, fused=True, **kwargs)
        return opt, "fused"
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, foreach=True, **kwargs), "foreach"


class SelectedExperts(torch.nn.Module):
    """Parametrization of a fused [E, ...] expert weight: the frozen weight with the
    trainable [k, ...] slices of experts `ids` put in."""

    def __init__(self, full, ids):
        super().__init__()
        self.register_buffer("frozen", full.detach().clone())
        self.register_buffer("ids", torch.tensor(ids, dtype=torch.long))

    def forward(self, selected):
        return self.frozen.index_copy(0, self.ids, selected)

    def right_inverse(self, weight):
        return weight.index_select(0, self.ids)


def make_esft(model, expert_config):
    """Freezes the model and makes only the selected experts' slices trainable; returns
    (trainable parameters, count of selected experts)."""
    with open(expert_config) as f:
        selected = {int(k): v for k, v in json.load(f)["experts"].items()}
    for p in model.parameters():
        p.requires_grad_(False)
    trainable, chosen = [], 0
    for index, layer in enumerate(model.model.layers):
        ids = selected.get(index, [])
        if not ids:
            continue
        experts = layer.mlp.experts
        chosen += len(ids)
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(experts, name)
            parametrize.register_parametrization(experts, name, SelectedExperts(full, ids),
                                                 unsafe=True)
            original = experts.parametrizations[name].original
            original.requires_grad_(True)
            trainable.append(original)
    return trainable, chosen


def text_block(path, count):
    with open(path) as f:
        text = json.loads(f.readline())["text"]
    data = list(text.encode("utf-8"))
    if len(data) < count:
        raise SystemExit(f"bench_cpu_hf: the first row of {path} has {len(data)} bytes, "
                         f"fewer than {count}")
    return data[:count]


def print_timings(seconds, tokens, extra):
    print(f"iterations: {len(seconds)}")
    for key, value in extra:
        print(f"{key}: {value}")
    print(f"median seconds per iteration: {statistics.median(seconds):.4f}")
    print(f"min seconds per iteration: {min(seconds):.4f}")
    print(f"max seconds per iteration: {max(seconds):.4f}")
    print(f"tokens per second: {tokens / statistics.median(seconds):.1f}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(f"peak rss mib: {peak:.1f}", flush=True)


def time_forward(model, input_ids, warmup, iters):
    model.eval()
    seconds = []
    with torch.inference_mode():
        for i in range(warmup + iters):
            start = time.perf_counter()
            out = model(input_ids=input_ids, labels=input_ids, use_cache=False)
            if i >= warmup:
                seconds.append(time.perf_counter() - start)
    return seconds, float(out.loss)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=["forward", "full", "esft", "pick"])
    parser.add_argument("model_dir")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--iters", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--experts", default="grouped_mm")
    parser.add_argument("--text", help="jsonl of {\"text\": ...} rows (full, esft)")
    parser.add_argument("--expert-config", help="esft's expert_config.json (esft)")
    args = parser.parse_args()

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(args.model_dir)
    T = args.seq

    print(f"implementation: transformers {transformers.__version__} (torch {torch.__version__}, "
          f"sdpa, experts {args.experts}, fp32)")
    print(f"threads: {torch.get_num_threads()}")
    print(f"phase: {args.phase}")

    if args.phase in ("forward", "pick"):
        B = args.batch
        input_ids = torch.tensor(bench_tokens(args.seed, B * T, config.vocab_size),
                                 dtype=torch.long).view(B, T)
        print(f"batch: {B} x {T}")
        print(f"tokens per iteration: {B * T}")
        if args.phase == "pick":
            best = None
            for experts in args.experts.split(","):
                # batched_mm gathers a copy of the [2I, H] and [H, I] weights per token-slot
                need = B * T * config.num_experts_per_tok * 3 * config.moe_intermediate_size \
                    * config.hidden_size * 4
                if experts == "batched_mm" and need > available_bytes() // 2:
                    print(f"experts {experts}: skipped: it gathers {need / 2**30:.1f} GiB of "
                          f"expert weights per layer")
                    continue
                try:
                    model = load(args.model_dir, experts)
                    seconds, _ = time_forward(model, input_ids, args.warmup, args.iters)
                except Exception as e:  # an implementation this torch cannot run
                    print(f"experts {experts}: skipped: {type(e).__name__}")
                    continue
                finally:
                    model = None
                median = statistics.median(seconds)
                print(f"experts {experts}: {median:.4f} s")
                if best is None or median < best[1]:
                    best = (experts, median)
            if best is None:
                raise SystemExit("bench_cpu_hf: no experts implementation ran")
            print(f"fastest experts: {best[0]}")
            return
        model = load(args.model_dir, args.experts)
        seconds, loss = time_forward(model, input_ids, args.warmup, args.iters)
        print_timings(seconds, B * T, [("loss", f"{loss:.6f}")])
        return

    if not args.text:
        raise SystemExit("bench_cpu_hf: full and esft need --text")
    input_ids = torch.tensor(text_block(args.text, T), dtype=torch.long).view(1, T)
    print(f"batch: 1 x {T}")
    print(f"tokens per iteration: {T}")
    model = load(args.model_dir, args.experts)
    model.train()
    extra = []
    if args.phase == "full":
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        if not args.expert_config:
            raise SystemExit("bench_cpu_hf: esft needs --expert-config")
        params, chosen = make_esft(model, args.expert_config)
        extra.append(("selected experts", chosen))
    opt, kind = make_adamw(params)
    extra.append(("optimizer", f"AdamW ({kind})"))
    extra.append(("trainable parameters", sum(p.numel() for p in params)))
    seconds = []
    for i in range(args.warmup + args.iters):
        start = time.perf_counter()
        with parametrize.cached():
            loss = model(input_ids=input_ids, labels=input_ids, use_cache=False).loss
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            seconds.append(time.perf_counter() - start)
    extra.append(("loss", f"{float(loss.detach()):.6f}"))
    print_timings(seconds, T, extra)


if __name__ == "__main__":
    main()
