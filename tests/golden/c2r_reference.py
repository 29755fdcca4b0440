#!/usr/bin/env python3
"""C2R (collaboration-constrained routing) written by hand in PyTorch, on the golden fixtures: the routing
ids and weights of every MoE layer, the logits, the loss and every gradient when each router is replaced by
its C2R version.

Run from the repository root:   python3 tests/golden/c2r_reference.py
Needs torch, transformers (5.x), safetensors. Reads tests/golden/<fixture>/ (the fixtures listed below) and
writes, beside each expected.safetensors:
  c2r_config.json     the fixture's config.json plus "top_t" and "collaborative_list" (one entry per decoder
                      layer: [] for a dense layer, else E lists of top_t expert ids), the file esft reads
                      with model.routing: c2r;
  c2r.safetensors     c2r.<layer>.topk_ids int32 [N, K] and c2r.<layer>.topk_weights [N, K] (tokens in
                      esft's order: row-major over the fixture's [2, 13] batch), logits, loss and grad.<name>
                      (checkpoint names, as expected.safetensors).

The rule (shared/reference/esft-semantics.md section 5, with the selection scores and weights of each
family's router): c = the router's selection score (softmax probabilities; DeepSeek-V2's group-limited
greedy: the probabilities with the dropped groups at 0; DeepSeek-V3 / GLM-4.5: sigmoid + bias with the
dropped groups at -inf; gpt_oss: the logits). e1 = argmax c; the other K-1 are the K-1 largest c among
e1's top_t collaborators, in descending order. The weights are the family's own rule over the chosen K
ids, taken from the unmasked values (probabilities, sigmoid scores; gpt_oss: softmax over the chosen
logits). The lists are drawn at random (seeded) rather than from co-activation counts: any list is a
valid C2R input, and a random one makes the constraint bite more often. The script checks that every
choice it makes has a margin (so float reordering in esft cannot flip it); it redraws the lists if not.
"""

import json
import os
import sys
import types

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import generate as G  # noqa: E402  (inputs, loss convention, checkpoint names; pins 1 thread)
import transformers  # noqa: E402

torch.set_num_threads(1)
FIXTURES = ["qwen2_moe", "qwen3_moe", "olmoe", "mixtral", "deepseek_v2_grouped", "deepseek_v3",
            "glm4_moe", "gpt_oss"]
MIN_MARGIN = 1e-4


def routers(model):
    """{decoder layer: router module} (mlp.gate, or gpt_oss's mlp.router)."""
    out = {}
    for name, mod in model.named_modules():
        parts = name.split(".")
        if len(parts) == 5 and parts[:2] == ["model", "layers"] and parts[3] == "mlp" and parts[4] in ("gate", "router") \
                and type(mod).__name__.lower().endswith("router"):
            out[int(parts[2])] = mod
    return out


def group_mask(sel, n_group, topk_group, top_two):
    n, e = sel.shape
    grouped = sel.view(n, n_group, e // n_group)
    score = grouped.topk(2, -1).values.sum(-1) if top_two else grouped.max(-1).values
    keep = torch.zeros_like(score, dtype=torch.bool)
    keep.scatter_(1, score.topk(topk_group, -1).indices, True)
    return keep.repeat_interleave(e // n_group, 1)


def c2r_choice(c, lists, k):
    """ids [N, k]: argmax of c, then the k-1 largest c among its collaborators lists[e1], descending, equal
    scores (the masked experts' fill value) to the lower id (a stable sort of the ids in ascending order)."""
    first = c.argmax(-1)
    cand = lists[first].sort(-1).values                   # [N, T], ascending ids
    best = torch.sort(c.gather(1, cand), stable=True, dim=-1, descending=True).indices[:, :k - 1]
    return torch.cat([first[:, None], cand.gather(1, best)], 1)


def margins(c, lists, k, fill=None):
    """The smallest gap between a chosen score and the next one it was preferred to; two scores that both
    hold the masked experts' fill value are an exact tie that both sides break to the lower id."""
    top2 = c.topk(2, -1).values
    gap = (top2[:, 0] - top2[:, 1]).min().item()
    cand = c.gather(1, lists[c.argmax(-1)]).sort(-1, descending=True).values
    upto = min(k, cand.shape[1])
    for j in range(upto - 1):
        a, b = cand[:, j], cand[:, j + 1]
        tie = (a == b) & (a == fill) if fill is not None else torch.zeros_like(a, dtype=torch.bool)
        d = torch.where(tie, torch.full_like(a, float("inf")), a - b)
        gap = min(gap, d.min().item())
    return gap


def c2r_forward(mod, hidden, lists, k, family, record):
    """The router's forward with the C2R choice: returns (logits, weights, ids) as the family's router does."""
    kind = type(mod).__name__
    if kind == "GptOssTopKRouter":
        logits = F.linear(hidden, mod.weight, mod.bias)
        ids = c2r_choice(logits, lists, k)
        record.append(margins(logits, lists, k))
        weights = torch.softmax(logits.gather(1, ids), dim=1)
        return logits, weights, ids
    hidden = hidden.reshape(-1, mod.weight.shape[1])
    if kind in ("DeepseekV3TopkRouter", "Glm4MoeTopkRouter"):
        logits = F.linear(hidden.float(), mod.weight.float())
        s = logits.sigmoid()
        c = s + mod.e_score_correction_bias
        c = c.masked_fill(~group_mask(c, mod.num_group, mod.topk_group, True), float("-inf"))
        ids = c2r_choice(c, lists, k)
        record.append(margins(c, lists, k, float("-inf")))
        w = s.gather(1, ids)
        if mod.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return logits, w * mod.routed_scaling_factor, ids
    if kind == "DeepseekV2TopkRouter":
        logits = F.linear(hidden.float(), mod.weight.float())
        p = logits.softmax(-1, dtype=torch.float32)
        c = p
        if mod.topk_method == "group_limited_greedy":
            c = p.masked_fill(~group_mask(p, mod.num_group, mod.topk_group, False), 0.0)
        ids = c2r_choice(c, lists, k)
        record.append(margins(c, lists, k, 0.0 if c is not p else None))
        return logits, p.gather(1, ids) * mod.routed_scaling_factor, ids
    # qwen2_moe, qwen3_moe, olmoe, mixtral: softmax, then the top-k's probabilities
    logits = F.linear(hidden, mod.weight)
    p = torch.softmax(logits.float(), dim=-1)
    ids = c2r_choice(p, lists, k)
    record.append(margins(p, lists, k))
    w = p.gather(1, ids)
    if family == "mixtral" or getattr(mod, "norm_topk_prob", False):
        w = w / w.sum(-1, keepdim=True)
    return logits, w.to(logits.dtype), ids


def draw_lists(num_layers, moe, E, T, seed):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for l in range(num_layers):
        if l not in moe:
            continue
        rows = []
        for e in range(E):
            others = [j for j in range(E) if j != e]
            perm = torch.randperm(E - 1, generator=g)[:T].tolist()
            rows.append([others[i] for i in perm])
        out[l] = torch.tensor(rows, dtype=torch.long)
    return out


def run(name, inp):
    d = os.path.join(HERE, name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        d, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32)
    model.eval()
    cfg = model.config
    mods = routers(model)
    E = mods[next(iter(mods))].weight.shape[0]
    k = cfg.num_experts_per_tok
    T = 3 if E <= 7 else 4                   # at least k - 1, fewer than E - 1: the constraint bites
    for attempt in range(50):
        lists = draw_lists(cfg.num_hidden_layers, mods, E, T, 1000 + attempt)
        record = []
        captured = {}
        for l, mod in mods.items():
            def forward(self, hidden, l=l):
                out = c2r_forward(self, hidden, lists[l], k, cfg.model_type, record)
                captured.setdefault(l, []).append(out)
                return out
            mod.forward = types.MethodType(forward, mod)
        rows = []
        for b, segs in enumerate(G.SEGMENTS):
            pieces = []
            for start, n in segs:
                pieces.append(model(input_ids=inp["input_ids"][b:b + 1, start:start + n],
                                    position_ids=torch.arange(n)[None], use_cache=False).logits)
            rows.append(torch.cat(pieces, 1))
        logits = torch.cat(rows, 0)
        if min(record) > MIN_MARGIN:
            break
    else:
        raise SystemExit(f"{name}: no list draw with a margin above {MIN_MARGIN}")
    loss = G.ce_loss(model, logits, inp["labels"])
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(loss, [p for _, p in model.named_parameters()], allow_unused=True,
                                materialize_grads=True)
    out = {"logits": logits.detach().float().contiguous(), "loss": loss.detach().float().reshape(())}
    plain = 0
    for l, calls in captured.items():
        ids = torch.cat([c[2] for c in calls], 0)
        out[f"c2r.{l}.topk_ids"] = ids.to(torch.int32).contiguous()
        out[f"c2r.{l}.topk_weights"] = torch.cat([c[1] for c in calls], 0).detach().float().contiguous()
        plain += (ids[:, 1:].sort(-1).values !=
                  torch.cat([c[0] for c in calls], 0).float().topk(k, -1).indices[:, 1:].sort(-1).values).any(-1).sum().item()
    grads = dict(zip(names, grads))
    named = grads if cfg.model_type == "gpt_oss" else G.to_checkpoint_names(cfg.model_type, grads)
    for n, g in named.items():
        out[f"grad.{n}"] = g.detach().float().contiguous()
    save_file(out, os.path.join(d, "c2r.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(d, "config.json")) as f:
        config = json.load(f)
    config["top_t"] = T
    config["collaborative_list"] = [lists[l].tolist() if l in lists else [] for l in range(cfg.num_hidden_layers)]
    with open(os.path.join(d, "c2r_config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    print(f"{name}: top_t {T}, list seed {1000 + attempt}, margin {min(record):.2e}, loss {loss.item():.7f}, "
          f"{plain} token-layers whose other experts differ from the logits' plain top-k")


def main():
    inp = G.make_inputs()
    for name in sys.argv[1:] or FIXTURES:
        run(name, inp)


if __name__ == "__main__":
    main()
