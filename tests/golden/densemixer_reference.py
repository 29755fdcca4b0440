#!/usr/bin/env python3
"""DenseMixer golden fixtures for esft: the DenseMixer gradient rule in PyTorch autograd.

Run from the repository root (after tests/golden/generate.py made the fixtures):
    python3 tests/golden/densemixer_reference.py
Needs torch, transformers (5.x), safetensors. The PyPI `densemixer` package patches the
transformers v4 MoE blocks (an indexable expert ModuleList), which transformers 5's fused
experts are not; so its rule (densemixer 1.0.1, densemixer/models/*_custom.py, as
shared/reference/methods-lora-densemixer.md states it) is written here on transformers 5's
modules, with autograd doing the differentiation:
  - forward value: the sparse output, sparse.detach() + (dense - dense.detach());
  - dense path: every expert on every token, dense = sum_e r_e E_e(x) with r_e = p_e
    (norm_topk_prob false) or, with norm_topk_prob, p_e / S on the top-k and
    p_e / stopgrad(S) off it (S the top-k probabilities' sum: "partscale");
  - each expert output's gradient is masked to the tokens routed to that expert, so the
    expert weights and the expert path's input gradient are the sparse ones.
For each fixture in FIXTURES it runs the golden batch as generate.py's reference does (each
packed sample its own forward) and writes tests/golden/<name>/densemixer_expected.safetensors:
    grad.<checkpoint name>   d loss / d tensor under DenseMixer, for every tensor
    loss                     the mean cross-entropy (the sparse forward's, bit for bit)
"""

import os
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import generate as G  # noqa: E402  (the golden batch, names and loss conventions)
import lora_reference as L  # noqa: E402  (loading a fixture, the per-sample reference run)

# norm_topk_prob true (partscale), false, and a shared expert beside the routed ones
FIXTURES = ["qwen3_moe", "olmoe", "qwen2_moe"]

torch.set_num_threads(1)


def densemixer_experts(experts, router):
    """Replaces experts.forward(x, ids, weights) by DenseMixer's; the router keeps its
    probabilities (with their graph) for it."""
    sparse_forward = experts.forward
    router_forward = router.forward

    def routed(hidden):
        logits, scores, ids = router_forward(hidden)
        router.probs = F.softmax(F.linear(hidden.reshape(-1, router.hidden_dim), router.weight),
                                 dtype=torch.float, dim=-1)
        return logits, scores, ids

    def forward(x, ids, weights):
        sparse = sparse_forward(x, ids, weights)
        p = router.probs
        chosen = F.one_hot(ids, experts.num_experts).sum(1) > 0  # [N, E]
        if router.norm_topk_prob:
            total = p.gather(1, ids).sum(-1, keepdim=True)
            r = torch.where(chosen, p / total, p / total.detach())
        else:
            r = p
        dense = torch.zeros_like(x)
        for e in range(experts.num_experts):
            gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
            y = F.linear(experts.act_fn(gate) * up, experts.down_proj[e])
            keep = chosen[:, e:e + 1]
            y = torch.where(keep, y, y.detach())  # the gradient of unrouted tokens stops here
            dense = dense + r[:, e:e + 1].to(y.dtype) * y
        return sparse.detach() + (dense - dense.detach())

    router.forward = routed
    experts.forward = forward


def make_fixture(name, inp):
    d = os.path.join(HERE, name)
    model = L.load(d)
    sparse_loss = L.reference(model, inp).detach()
    for layer in model.model.layers:
        if hasattr(layer.mlp, "experts"):  # qwen2_moe may have dense layers
            densemixer_experts(layer.mlp.experts, layer.mlp.gate)
    loss = L.reference(model, inp)
    assert torch.equal(loss.detach(), sparse_loss), (loss.item(), sparse_loss.item())
    names = [n for n, _ in model.named_parameters()]
    grads = torch.autograd.grad(loss, [p for _, p in model.named_parameters()])
    out = {"loss": loss.detach().reshape(())}
    for n, g in G.to_checkpoint_names(name, dict(zip(names, grads))).items():
        out["grad." + n] = g.float().contiguous()
    save_file(out, os.path.join(d, "densemixer_expected.safetensors"), metadata={"format": "pt"})
    print(f"{name}: {len(out) - 1} gradients, loss {loss.item():.6f} (the sparse forward's)")


def main():
    inp = G.make_inputs()
    for name in FIXTURES:
        make_fixture(name, inp)


if __name__ == "__main__":
    main()
