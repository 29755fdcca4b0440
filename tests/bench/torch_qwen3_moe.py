#!/usr/bin/env python3
"""torch_qwen3_moe: transformers' Qwen3MoeForCausalLM on the Qwen3-30B-A3B layer shape that
bench_kernels times (hidden 2048, 128 experts top-8 of width 768, 32 query and 4 KV heads of
128, vocab 151936), with a few layers, for comparison with esft on the same GPU. Developers
only: torch and transformers are neither build nor test dependencies of esft.

Three timings, each the median of --iters steps after --warmup untimed ones, by CUDA events
(a host clock on the CPU):
  score  forward with labels under torch.no_grad() (the loss over every token), what
         `esft score` computes;
  full   full fine-tuning step: forward, backward, fused AdamW over every parameter;
  esft   ESFT step: only --trainable of the experts of each layer are trained, nothing
         else. transformers 5 stores each layer's experts as two fused tensors
         (experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I]), so one expert cannot
         be frozen alone: the two tensors stay trainable, a gradient hook zeroes the rows of
         the frozen experts, and AdamW runs with weight_decay 0 so those rows never move.
         autograd still computes the weight gradient of all E experts, so this step does
         the full-FT expert work that esft skips; its time is what transformers costs for
         ESFT, its FLOPs are counted as ESFT's true FLOPs anyway (see below).

FLOPs as esft counts them (src/flops.c, Megatron's model-FLOPs convention): 2 per
multiply-add; the active parameters a token meets (q, k, v, o; router; its top-k experts'
gate, up and down; the LM head; not the embedding); causal attention 2 * d_attn * (L + 1)
per token and layer forward (L = sequence length); training = 3x forward (full FT);
ESFT's true FLOPs = 4 x active + 3 x attention + 2 x (the trainable share of the routed
expert work), the share taken as trainable/E (a freshly initialised router spreads tokens
evenly). MFU against --peak-tflops (989: H100/H200 dense bf16).

bf16 weights, the pure-bf16 step (AdamW states in bf16, no fp32 master copy), sdpa
attention (causal, no mask tensor), the experts implementation --experts (transformers 5's
default and fastest built-in one is grouped_mm, torch._grouped_mm; eager is the
per-expert loop), no gradient checkpointing. Peak memory per timing:
torch.cuda.max_memory_allocated.

Usage: torch_qwen3_moe.py [--layers 4] [--batch 4] [--seq 4096] [--warmup 2] [--iters 10]
                          [--trainable 16] [--experts grouped_mm] [--peak-tflops 989]
                          [--modes score,full,esft] [--tiny]
--tiny: 2 layers, hidden 64, 8 experts (top-2, 2 trainable) of width 32, 4/2 heads of 16,
vocab 512, batch 2 x seq 64, on the CPU when no GPU is visible: a check that the script
runs end to end.
"""
import argparse
import statistics
import sys
import time


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--trainable", type=int, default=16, help="trained experts per layer (esft)")
    p.add_argument("--experts", default="grouped_mm", help="transformers experts implementation")
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--modes", default="score,full,esft")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--save", metavar="DIR",
                   help="also write the randomly initialised model (bf16 safetensors) to DIR, "
                        "so that esft can be timed on the same weights")
    return p.parse_args()


def model_config(args, Qwen3MoeConfig):
    if args.tiny:
        shape = dict(vocab_size=512, hidden_size=64, moe_intermediate_size=32, num_experts=8,
                     num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2,
                     head_dim=16, intermediate_size=128)
    else:
        shape = dict(vocab_size=151936, hidden_size=2048, moe_intermediate_size=768,
                     num_experts=128, num_experts_per_tok=8, num_attention_heads=32,
                     num_key_value_heads=4, head_dim=128, intermediate_size=6144)
    return Qwen3MoeConfig(num_hidden_layers=args.layers, decoder_sparse_step=1,
                          mlp_only_layers=[], norm_topk_prob=True, tie_word_embeddings=False,
                          max_position_embeddings=max(4096, args.seq), use_cache=False,
                          output_router_logits=False, rms_norm_eps=1e-6, **shape)


def token_flops(c, attended, trainable_share):
    """esft's token_flops and token_flops_trainable (src/flops.c) for this config."""
    H = c.hidden_size
    q = c.num_attention_heads * c.head_dim
    kv = c.num_key_value_heads * c.head_dim
    active = routed = attention = 0.0
    for _ in range(c.num_hidden_layers):
        active += H * q * 2 + H * kv * 2
        attention += 2.0 * q * attended
        experts = 3.0 * H * c.moe_intermediate_size * c.num_experts_per_tok
        active += H * c.num_experts + experts
        routed += experts
    active += H * c.vocab_size
    forward = 2.0 * active + attention
    training = 3.0 * forward
    esft = 4.0 * active + 3.0 * attention + 2.0 * trainable_share * routed
    return forward, training, esft


class Timer:
    def __init__(self, torch, cuda):
        self.torch, self.cuda = torch, cuda

    def __call__(self, fn, warmup, iters):
        torch = self.torch
        for _ in range(warmup):
            fn()
        if self.cuda:
            torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            if self.cuda:
                start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                stop.record()
                stop.synchronize()
                times.append(start.elapsed_time(stop))
            else:
                t0 = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t0))
        return statistics.median(times), times


def main():
    args = parse()
    if args.tiny:
        args.layers, args.batch, args.seq = 2, 2, 64
        args.trainable = min(args.trainable, 2)
        args.iters, args.warmup = min(args.iters, 3), min(args.warmup, 1)
    import torch
    import transformers
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cuda = torch.cuda.is_available()
    if not cuda and not args.tiny:
        print("skipped: no CUDA device (use --tiny for a CPU check)")
        return 0
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16
    torch.manual_seed(args.seed)
    config = model_config(args, Qwen3MoeConfig)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"device {torch.cuda.get_device_name() if cuda else 'cpu'}")
    print(f"config: {args.layers} layers, hidden {config.hidden_size}, {config.num_experts} experts "
          f"top-{config.num_experts_per_tok} of width {config.moe_intermediate_size}, "
          f"{config.num_attention_heads}/{config.num_key_value_heads} heads of {config.head_dim}, "
          f"vocab {config.vocab_size}; batch {args.batch} x seq {args.seq}, bf16, sdpa")

    t0 = time.perf_counter()
    experts = args.experts
    try:
        with device:
            model = Qwen3MoeForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa",
                                                     experts_implementation=experts)
    except (ValueError, ImportError, KeyError) as e:
        print(f"experts implementation {experts} refused ({e}); falling back to eager")
        experts = "eager"
        with device:
            model = Qwen3MoeForCausalLM._from_config(config, dtype=dtype, attn_implementation="sdpa",
                                                     experts_implementation=experts)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e9:.3f}e9 parameters, built in {time.perf_counter() - t0:.1f} s, "
          f"experts implementation {model.config._experts_implementation}")

    if args.save:
        t1 = time.perf_counter()
        model.save_pretrained(args.save)
        print(f"model written to {args.save} in {time.perf_counter() - t1:.1f} s")

    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    input_ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen).to(device)
    labels = input_ids.clone()

    def forward_loss():
        return model(input_ids=input_ids, labels=labels).loss

    # one forward to make sure the experts implementation runs here at all
    try:
        with torch.no_grad():
            forward_loss()
    except (RuntimeError, NotImplementedError) as e:
        if experts == "eager":
            raise
        print(f"experts implementation {experts} failed on this device ({str(e).splitlines()[0]}); "
              "falling back to eager")
        experts = "eager"
        model.set_experts_implementation("eager")

    tokens = args.batch * args.seq
    attended = args.seq + 1.0  # 2 x mean keys per token of one causal document
    share = args.trainable / config.num_experts
    f_forward, f_training, f_esft = token_flops(config, attended, share)
    timer = Timer(torch, cuda)
    rows = []

    def report(mode, ms, flops_per_token, ft_flops_per_token, note):
        """ft_flops_per_token: the full-fine-tuning-equivalent FLOPs of the same step"""
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
        tflops = flops_per_token * tokens / (ms * 1e-3) / 1e12
        ft_tflops = ft_flops_per_token * tokens / (ms * 1e-3) / 1e12
        rows.append((mode, ms, tokens / (ms * 1e-3), tflops, 100 * tflops / args.peak_tflops,
                     100 * ft_tflops / args.peak_tflops, peak))
        print(f"  {mode}: {ms:.2f} ms, {tokens / (ms * 1e-3):,.0f} tokens/s, {tflops:.1f} TFLOP/s, "
              f"MFU {100 * tflops / args.peak_tflops:.1f}% (full-FT equivalent "
              f"{100 * ft_tflops / args.peak_tflops:.1f}%), peak memory {peak:.1f} GiB ({note})",
              flush=True)

    modes = args.modes.split(",")
    if "score" in modes:
        if cuda:
            torch.cuda.reset_peak_memory_stats()

        def score():
            with torch.no_grad():
                forward_loss()

        ms, _ = timer(score, args.warmup, args.iters)
        report("score forward", ms, f_forward, f_forward, "no grad, loss over every token")

    def train_step_fn(params, optimizer):
        def step():
            loss = forward_loss()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return step

    if "full" in modes:
        for p in model.parameters():
            p.requires_grad_(True)
        params = [p for p in model.parameters()]
        optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, fused=cuda)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        ms, _ = timer(train_step_fn(params, optimizer), args.warmup, args.iters)
        report("full FT step", ms, f_training, f_training, "fwd + bwd + fused AdamW, every parameter")
        del optimizer
        for p in params:
            p.grad = None
        if cuda:
            torch.cuda.empty_cache()

    if "esft" in modes:
        hooks, params = [], []
        gen_e = torch.Generator(device="cpu").manual_seed(args.seed + 1)
        for p in model.parameters():
            p.requires_grad_(False)
        for layer in model.model.layers:
            experts_module = layer.mlp.experts
            chosen = torch.randperm(config.num_experts, generator=gen_e)[: args.trainable]
            mask = torch.zeros(config.num_experts, 1, 1, dtype=dtype, device=device)
            mask[chosen.to(device)] = 1
            for p in (experts_module.gate_up_proj, experts_module.down_proj):
                p.requires_grad_(True)
                hooks.append(p.register_hook(lambda g, m=mask: g * m))
                params.append(p)
        before = [p.detach().clone() for p in params] if args.tiny else None
        optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, fused=cuda)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        ms, _ = timer(train_step_fn(params, optimizer), args.warmup, args.iters)
        report("ESFT step", ms, f_esft, f_training,
               f"{args.trainable}/{config.num_experts} experts per layer by gradient mask; "
               "autograd computes every expert's dw")
        if before is not None:  # the mask holds: frozen experts unchanged, chosen ones moved
            moved = [(b - p.detach()).abs().flatten(1).amax(1) > 0 for b, p in zip(before, params)]
            counts = sorted({int(m.sum()) for m in moved})
            print(f"  check: experts changed per fused tensor {counts} (expected [{args.trainable}])")
            if counts != [args.trainable]:
                print("FAILED: the gradient mask let frozen experts change")
                return 1
        for h in hooks:
            h.remove()

    print(f"\nFLOPs per token (esft's counting): forward {f_forward / 1e9:.3f} G, full training "
          f"{f_training / 1e9:.3f} G, ESFT true {f_esft / 1e9:.3f} G (trainable share {share:.3f})")
    print(f"{'mode':<14} {'ms':>9} {'tokens/s':>11} {'TFLOP/s':>8} {'MFU %':>6} {'FT-eq %':>8} "
          f"{'peak GiB':>9}")
    for mode, ms, tps, tf, mfu, ft_mfu, peak in rows:
        print(f"{mode:<14} {ms:9.2f} {tps:11,.0f} {tf:8.1f} {mfu:6.1f} {ft_mfu:8.1f} {peak:9.1f}")
    print(f"transformers {transformers.__version__}, experts {model.config._experts_implementation}, "
          f"{args.layers} layers, batch {args.batch} x seq {args.seq}, MFU vs {args.peak_tflops:g} TFLOP/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
