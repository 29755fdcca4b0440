#!/usr/bin/env python3
"""Golden fixtures for the MLA / grouped-router families: deepseek_v2, deepseek_v3, glm4_moe.

Run from the repository root:   python3 tests/golden/generate_families.py [fixture ...]
Needs torch, transformers (5.x), safetensors, numpy (CPU only). Writes tests/golden/<fixture>/ for the
fixtures below only (the ones of generate.py are left alone). Inputs, weight init, the packed-vs-reference
comparison, the checkpoint-name mapping and the reload check are generate.py's; what differs here:
  - these routers return their top-k ids unsorted (torch.topk(sorted=False)), so the capture sorts each
    token's ids (and weights alike) by the score the top-k was taken over;
  - transformers has no load-balancing loss for these families: no aux_loss / grad_aux entries;
  - the sigmoid routers carry a buffer, e_score_correction_bias, drawn non-zero and saved with the weights;
  - the seed loop also requires a margin between the kept and the dropped expert groups.
See tests/golden/README.md.
"""

import json
import math
import os
import re
import shutil
import sys
import tempfile

import numpy as np
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import generate as G  # noqa: E402  (shared settings and checks; importing it runs nothing, and pins 1 thread)

torch.set_num_threads(1)                      # fixed reduction order: bit-identical reruns

BIAS_STD = 0.1                                # e_score_correction_bias ~ N(0, BIAS_STD)
MAX_ATTEMPTS = 200

COMMON = dict(
    vocab_size=G.VOCAB, hidden_size=G.HIDDEN, num_hidden_layers=G.LAYERS,
    num_attention_heads=4, hidden_act="silu", rms_norm_eps=1e-6, tie_word_embeddings=False,
    pad_token_id=None, bos_token_id=None, eos_token_id=None, attention_dropout=0.0,
    output_router_logits=False,               # no aux loss in these families: it would only return the logits
    max_position_embeddings=64, intermediate_size=30, moe_intermediate_size=10,
    n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1, first_k_dense_replace=1,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)


def yarn(mscale):
    # original 64 with a rope dim of 8 puts a fractional entry (0.5) in YaRN's ramp (low 0, high 2)
    return {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
            "mscale": mscale, "mscale_all_dim": mscale}


MLA = dict(num_key_value_heads=4,             # MLA expands k/v to every head itself: no GQA grouping
           kv_lora_rank=12, qk_nope_head_dim=6, v_head_dim=8)

# name: (model_type, config class, config arguments, first weight seed)
FIXTURES = {
    "deepseek_v2": ("deepseek_v2", transformers.DeepseekV2Config, dict(
        MLA, q_lora_rank=None, qk_rope_head_dim=4, topk_method="greedy", n_group=1, topk_group=1,
        routed_scaling_factor=1.0, norm_topk_prob=False), 500),
    "deepseek_v2_grouped": ("deepseek_v2", transformers.DeepseekV2Config, dict(
        MLA, q_lora_rank=16, qk_rope_head_dim=8, topk_method="group_limited_greedy", n_group=4, topk_group=2,
        routed_scaling_factor=1.5, norm_topk_prob=False, attention_bias=True,
        max_position_embeddings=256, rope_parameters=yarn(0.707)), 600),
    "deepseek_v3": ("deepseek_v3", transformers.DeepseekV3Config, dict(
        MLA, q_lora_rank=16, qk_rope_head_dim=8, n_group=4, topk_group=2, norm_topk_prob=True,
        routed_scaling_factor=2.5, rope_interleave=True, attention_bias=False, n_shared_experts=2,
        max_position_embeddings=256, rope_parameters=yarn(1.0)), 700),
    "glm4_moe": ("glm4_moe", transformers.Glm4MoeConfig, dict(
        num_key_value_heads=2, head_dim=12, use_qk_norm=True, attention_bias=True, n_group=2, topk_group=1,
        norm_topk_prob=True, routed_scaling_factor=1.8, moe_intermediate_size=8,     # 8: stays under 200 KB
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}), 800),
    "glm4_moe_no_qk_norm": ("glm4_moe", transformers.Glm4MoeConfig, dict(
        num_key_value_heads=2, head_dim=12, use_qk_norm=False, attention_bias=True, n_group=2, topk_group=1,
        norm_topk_prob=True, routed_scaling_factor=1.8, moe_intermediate_size=8,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}), 900),
}
MTP_FIXTURES = {"glm4_moe"}
# parts of the router whose removal must change some token's expert set (see bites()); glm4_moe_no_qk_norm
# also has tokens whose set changes if non-selected groups are masked with 0.0 instead of -inf: a kept
# group has corrected scores s + bias < 0 among its best k
REQUIRE = {"deepseek_v2_grouped": ("group",), "deepseek_v3": ("group", "bias"), "glm4_moe": ("group", "bias"),
           "glm4_moe_no_qk_norm": ("group", "bias", "mask_value")}                   # get GLM-4.5-style multi-token-prediction tensors in their file


# ---------------------------------------------------------------- model building
def build_model(name, seed):
    """As generate.build_model (same draws, same order), plus e_score_correction_bias ~ N(0, BIAS_STD)."""
    _, cls, kw, _ = FIXTURES[name]
    args = dict(COMMON)
    args.update(kw)
    cfg = cls(**args)
    model = transformers.AutoModelForCausalLM.from_config(
        cfg, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + G.NORM_STD * torch.randn(p.shape, generator=g))
            elif G.is_router(pname):
                p.copy_(G.ROUTER_STD * torch.randn(p.shape, generator=g))
            else:
                p.copy_(G.INIT_STD * torch.randn(p.shape, generator=g))
        for bname, b in model.named_buffers():
            if bname.endswith("e_score_correction_bias"):
                b.copy_(BIAS_STD * torch.randn(b.shape, generator=g))
    model.eval()
    return model


def router_modules(model):
    out = {}
    for mname, mod in model.named_modules():
        parts = mname.split(".")
        if len(parts) == 5 and parts[:2] == ["model", "layers"] and parts[3:] == ["mlp", "gate"]:
            assert type(mod).__name__.lower().endswith("topkrouter"), type(mod).__name__
            out[int(parts[2])] = mod
    return out


# ---------------------------------------------------------------- router semantics (transformers 5.24)
def selection(mod, logits, grouped=True, use_bias=True, mask_value=None):
    """(group scores or None, masked selection scores, weights per expert) in float64, re-derived from the
    router logits the way the router module computes them (Capture checks this against the module's output).
    grouped / use_bias / mask_value give the variants that min_bites() compares against."""
    x = logits.detach().double()
    n, e = x.shape
    if type(mod).__name__ == "DeepseekV2TopkRouter":
        sel = torch.softmax(x, -1)
        weight = sel * mod.routed_scaling_factor             # never renormalised, always scaled
        if mod.topk_method == "greedy":
            return None, sel, weight
        assert mod.topk_method == "group_limited_greedy", mod.topk_method
        group = sel.view(n, mod.num_group, e // mod.num_group).max(-1).values
        fill = 0.0 if mask_value is None else mask_value
    else:                                                     # DeepseekV3TopkRouter / Glm4MoeTopkRouter
        weight = torch.sigmoid(x)                             # s of the chosen, normalised in router_weights
        sel = weight + (mod.e_score_correction_bias.double() if use_bias else 0.0)
        group = sel.view(n, mod.num_group, e // mod.num_group).topk(2, -1).values.sum(-1)
        fill = float("-inf") if mask_value is None else mask_value
    if not grouped:
        return group, sel, weight
    keep = torch.zeros_like(group, dtype=torch.bool)
    keep.scatter_(1, group.topk(mod.topk_group, -1).indices, True)
    mask = keep.repeat_interleave(e // mod.num_group, 1)
    return group, sel.masked_fill(~mask, fill), weight


def chosen_set(sel, k):
    return sel.topk(k, -1).indices.sort(-1).values


def bites(model, routers):
    """Tokens (summed over MoE layers) whose chosen expert set would differ: 'group' without the group limit,
    'bias' without e_score_correction_bias, 'mask_value' with the other masking value (0.0 instead of -inf
    for the sigmoid routers). Shows which part of the router the fixture actually tests."""
    mods = router_modules(model)
    out = {"group": 0, "bias": 0, "mask_value": 0}
    for l, (logits, _, ids) in routers.items():
        mod, k = mods[l], ids.shape[1]
        base = chosen_set(selection(mod, logits)[1], k)
        variants = {"group": dict(grouped=False), "bias": dict(use_bias=False), "mask_value": dict(mask_value=0.0)}
        if type(mod).__name__ == "DeepseekV2TopkRouter":
            variants = {"group": dict(grouped=False), "mask_value": dict(mask_value=float("-inf"))}
            if mod.topk_method == "greedy":
                continue
        for what, kw in variants.items():
            out[what] += (chosen_set(selection(mod, logits, **kw)[1], k) != base).any(-1).sum().item()
    return out


def router_weights(mod, per_expert, ids):
    w = per_expert.gather(1, ids)
    if type(mod).__name__ != "DeepseekV2TopkRouter":
        if mod.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        w = w * mod.routed_scaling_factor
    return w


class Capture(G.Capture):
    """generate.py's capture with these routers' hooks: (logits, topk weights, topk ids) per layer, per call, each token's ids
    sorted by descending selection score (weights in the same order). Checks the module's chosen set and
    weights against selection()/router_weights()."""

    def __init__(self, model, check=True):
        self.check = check                    # off while picking seeds (a near-tie may differ in float64)
        self.data = {}
        self.handles = []
        self.modules = router_modules(model)
        for layer, mod in self.modules.items():
            self.handles.append(mod.register_forward_hook(self._hook(layer)))

    def _hook(self, layer):
        def hook(mod, _inp, out):
            logits, weights, ids = out
            _, sel, per_expert = selection(mod, logits)
            order = torch.sort(sel.gather(1, ids), dim=-1, descending=True, stable=True).indices
            ids_s, w_s = ids.gather(1, order), weights.gather(1, order)
            if self.check:
                mine = sel.topk(ids.shape[1], -1).indices
                assert torch.equal(mine.sort(-1).values, ids.sort(-1).values), f"layer {layer}: router set"
                assert torch.equal(mine, ids_s), f"layer {layer}: sort by selection score"
                w_mine = router_weights(mod, per_expert, ids_s)
                assert (w_mine - w_s.detach().double()).abs().max().item() < 1e-6, f"layer {layer}: weights"
            self.data.setdefault(layer, []).append((logits, w_s, ids_s))
        return hook



def min_margins(model, routers):
    """Smallest gap (a) between the topk_group-th and the next group score, (b) between consecutive sorted
    masked selection scores among the top k+1, over every token of every MoE layer."""
    mods = router_modules(model)
    worst_g, worst_e = math.inf, math.inf
    for l, (logits, _, ids) in routers.items():
        group, sel, _ = selection(mods[l], logits)
        if group is not None:
            gs = group.sort(-1, descending=True).values
            k = mods[l].topk_group
            worst_g = min(worst_g, (gs[:, k - 1] - gs[:, k]).min().item())
        s = sel.sort(-1, descending=True).values[:, :ids.shape[1] + 1]
        worst_e = min(worst_e, (s[:, :-1] - s[:, 1:]).min().item())   # -inf - -inf would be nan: never (>= k+1 kept)
    return worst_g, worst_e


# ---------------------------------------------------------------- runs (generate.py's, without the aux loss)
def grads_of(model, loss):
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    g = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True, materialize_grads=True)
    return dict(zip(names, g))


def result(model, logits, routers, labels):
    loss = G.ce_loss(model, logits, labels)
    # aux / grads_aux: zero placeholders so that generate.compare can be used unchanged (no aux loss here)
    return dict(logits=logits, routers=routers, loss=loss, aux=torch.zeros(()), grads=grads_of(model, loss),
                grads_aux={})


def run_reference(model, inp):
    """Independent reference: each packed sample is its own forward pass (batch 1, positions 0..n-1)."""
    cap = Capture(model)
    logits = G.per_sample_logits(model, inp)
    routers = cap.take()
    cap.close()
    return result(model, logits, routers, inp["labels"])


def run_packed(model, inp, mode):
    """transformers' own packed handling: 'posids' = position_ids only (packing detected, mask None);
    '4d' = explicit additive block-diagonal causal mask."""
    cap = Capture(model)
    kw = dict(input_ids=inp["input_ids"], position_ids=inp["position_ids"], use_cache=False)
    if mode == "posids":
        out = model(**kw, labels=inp["labels"], output_router_logits=True)
    else:
        out = model(**kw, attention_mask=G.block_causal_mask(inp["segment_ids"]))
    routers = cap.take()
    cap.close()
    res = result(model, out.logits, routers, inp["labels"])
    if mode == "posids":
        # with labels and output_router_logits on, .loss is the plain CE: these families add no aux loss
        assert out.aux_loss is None and torch.equal(out.loss, res["loss"]), (out.aux_loss, out.loss, res["loss"])
        assert len(out.router_logits) == len(routers)
    return res


def pick_model(name, inp):
    base = FIXTURES[name][3]
    for attempt in range(MAX_ATTEMPTS):
        seed = base + attempt
        model = build_model(name, seed)
        with torch.no_grad():
            cap = Capture(model, check=False)
            for b, segs in enumerate(G.SEGMENTS):
                for start, n in segs:
                    model(input_ids=inp["input_ids"][b:b + 1, start:start + n],
                          position_ids=torch.arange(n)[None], use_cache=False)
            routers = cap.take()
            cap.close()
        mg, me = min_margins(model, routers)
        if min(mg, me) <= G.MIN_MARGIN:
            print(f"  {name}: seed {seed} has a router near-tie (group {mg:.2e}, expert {me:.2e}), reseeding")
            continue
        bite = bites(model, routers)
        missing = [w for w in REQUIRE.get(name, ()) if bite[w] == 0]
        if missing:
            print(f"  {name}: seed {seed}: no token depends on the router's {missing}, reseeding")
            continue
        return model, seed, mg, me, bite
    raise RuntimeError("no seed without router near-ties that tests what the fixture is for")


# ---------------------------------------------------------------- writing
def attention_constants(model):
    layers = model.model.layers
    scaling = {float(l.self_attn.scaling) for l in layers}
    assert len(scaling) == 1
    rot = model.model.rotary_emb
    return dict(scaling=torch.tensor(scaling.pop(), dtype=torch.float32),
                inv_freq=rot.inv_freq.detach().float().contiguous(),
                rope_attention_scaling=torch.tensor(float(rot.attention_scaling), dtype=torch.float32))


def expected_tensors(family, model, inp, ref):
    t = {k: inp[k].contiguous() for k in ("input_ids", "position_ids", "segment_ids", "labels")}
    t["logits"] = ref["logits"].detach().float().contiguous()
    for l, (logits, weights, ids) in ref["routers"].items():
        t[f"router.{l}.topk_ids"] = ids.to(torch.int32).contiguous()
        t[f"router.{l}.topk_weights"] = weights.detach().float().contiguous()
        t[f"router.{l}.logits"] = logits.detach().float().contiguous()
    t["loss"] = ref["loss"].detach().float().reshape(())
    for n, g in G.to_checkpoint_names(family, ref["grads"]).items():
        t[f"grad.{n}"] = g.float().contiguous()
    t.update(attention_constants(model))
    return t


def mtp_tensors(model, seed):
    """GLM-4.5 stores its multi-token-prediction layer at index num_hidden_layers (92 in GLM-4.5, 46 in Air)
    in the same files: eh_proj [H, 2H], enorm, hnorm, shared_head.norm (and .head, embed_tokens) plus a whole
    decoder layer. A few of those names, random values; transformers must ignore them."""
    cfg = model.config
    h, e, pre = cfg.hidden_size, cfg.n_routed_experts, f"model.layers.{cfg.num_hidden_layers}"
    g = torch.Generator().manual_seed(seed + 100000)
    shapes = {
        "eh_proj.weight": (h, 2 * h), "enorm.weight": (h,), "hnorm.weight": (h,),
        "shared_head.norm.weight": (h,), "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,), "mlp.gate.weight": (e, h),
        "mlp.gate.e_score_correction_bias": (e,),
    }
    return {f"{pre}.{k}": (G.INIT_STD * torch.randn(s, generator=g)).contiguous() for k, s in shapes.items()}


def add_to_checkpoint(d, extra):
    path = os.path.join(d, "model.safetensors")
    with safe_open(path, "pt") as h:
        meta = h.metadata()
        tens = {k: h.get_tensor(k) for k in h.keys()}
    assert meta == {"format": "pt"} and not set(extra) & set(tens)
    tens.update(extra)
    save_file(tens, path, metadata=meta)


def check_load(d, model, inp, ref, extra):
    """from_pretrained gives the same parameters and buffers, reports exactly the extra (MTP) tensors as
    unexpected and nothing missing, and the same logits (generate.check_reload)."""
    m, info = transformers.AutoModelForCausalLM.from_pretrained(
        d, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32,
        output_loading_info=True)
    assert set(info["unexpected_keys"]) == set(extra), info["unexpected_keys"]
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    mine, theirs = model.state_dict(), m.state_dict()
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k
    G.check_reload(d, inp, ref)


def save_fixture(name, model, seed, inp):
    family = FIXTURES[name][0]
    d = os.path.join(HERE, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    ref = run_reference(model, inp)
    w_pos = G.compare(ref, run_packed(model, inp, "posids"), f"{name} packed(position_ids)")
    w_4d = G.compare(ref, run_packed(model, inp, "4d"), f"{name} packed(4D mask)")
    tens = expected_tensors(family, model, inp, ref)
    save_file(tens, os.path.join(d, "expected.safetensors"), metadata={"fixture": name})

    model.save_pretrained(d)
    extra = mtp_tensors(model, seed) if name in MTP_FIXTURES else {}
    if extra:
        add_to_checkpoint(d, extra)

    # the checkpoint holds the parameters under the names the gradients use, the persistent buffers
    # (e_score_correction_bias) under their own names, and the MTP extras; nothing else
    saved, files = G.read_checkpoint(d)
    assert files == ["model.safetensors"], files
    params = G.to_checkpoint_names(family, dict(model.named_parameters()))
    state = model.state_dict()
    buffers = {k: v for k, v in model.named_buffers() if k in state}
    assert all(k.endswith(".mlp.gate.e_score_correction_bias") for k in buffers), sorted(buffers)
    mine = {**params, **buffers, **extra}
    assert saved.keys() == mine.keys(), sorted(set(saved) ^ set(mine))
    for k, v in mine.items():
        assert saved[k].dtype == torch.float32 and torch.equal(saved[k], v.detach()), k
    assert {k[len("grad."):] for k in tens if k.startswith("grad.")} == params.keys()
    if buffers:
        assert min(v.abs().min().item() for v in buffers.values()) > 0

    check_load(d, model, inp, ref, extra)
    nparam = sum(p.numel() for p in model.parameters())
    size = os.path.getsize(os.path.join(d, "model.safetensors"))
    print(f"{name}: {nparam} parameters, loss {ref['loss'].item():.6f}, scaling {tens['scaling'].item():.7f}, "
          f"inv_freq {[round(x, 9) for x in tens['inv_freq'].tolist()]}, "
          f"rope attention_scaling {tens['rope_attention_scaling'].item()}, model.safetensors {size} bytes"
          f"{f', {len(extra)} MTP tensors' if extra else ''}\n"
          f"  packed row vs per-sample reference, max abs diff: position_ids only: {w_pos}; 4D mask: {w_4d}")
    for f in os.listdir(d):
        os.chmod(os.path.join(d, f), 0o644)
    return ref, tens, nparam


# ---------------------------------------------------------------- fp8 (DeepSeek-V3's block-quantised checkpoints)
# name: (fixture whose model is quantised, weight_block_size). Blocks [8, 24]: not square (a loader that swaps
# the two sizes fails), and partial edge blocks both ways: rows 36, 20, 30, 10 are no multiple of 8, columns 36,
# 32, 30 no multiple of 24 and 16, 12, 10, 20 narrower than one block. (Of the small block sizes tried, [8, 16],
# [16, 8], [16, 16], [12, 16], [4, 16] give the dequantised model a router near-tie below G.MIN_MARGIN.)
FP8_FIXTURES = {"deepseek_v3_fp8": ("deepseek_v3", [8, 24])}
FP8_MAX = 448.0                               # torch.finfo(torch.float8_e4m3fn).max
# the linear layers DeepSeek-V3 stores in fp8: attention projections, routed / shared expert and dense MLP
# matrices of decoder layers; not the embedding, lm_head, norms, router gate or its correction bias
FP8_LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|"
                        r"o_proj)|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))\.weight")
FP8_BF16_SCALE = "model.layers.2.self_attn.o_proj.weight"   # its scale stored in bf16 (some checkpoints do)


def checkpoint_state(model):
    """The tensors save_pretrained writes, under their checkpoint names: parameters and persistent buffers."""
    state = model.state_dict()
    out = G.to_checkpoint_names(model.config.model_type, dict(model.named_parameters()))
    out.update({k: v for k, v in model.named_buffers() if k in state})
    return {k: v.detach().contiguous() for k, v in out.items()}


def quantise_fp8(w, block, scale_dtype=torch.float32):
    """DeepSeek's weight_quant (inference/kernel.py) for one [R, C] matrix and blocks [b0, b1], partial edge
    blocks included: per block s = amax / 448, q = e4m3(w / s) (round to nearest even). Returns (q, scale_inv
    [ceil(R/b0), ceil(C/b1)]) with scale_inv = s in scale_dtype, the value q is divided by."""
    R, C = w.shape
    b0, b1 = block
    s = torch.empty((-(-R // b0), -(-C // b1)), dtype=torch.float32)
    q = torch.empty((R, C), dtype=torch.float8_e4m3fn)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1].float()
            amax = blk.abs().max()
            scale = (amax / FP8_MAX if amax > 0 else torch.tensor(1.0)).to(scale_dtype).float()
            s[i, j] = scale
            q[i * b0:(i + 1) * b0, j * b1:(j + 1) * b1] = (blk / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, s.to(scale_dtype)


def dequantise_torch(q, s, block):
    """w = q * scale_inv of its block, one fp32 product per element (transformers' Fp8Dequantize arithmetic)."""
    R, C = q.shape
    full = s.float().repeat_interleave(block[0], 0)[:R].repeat_interleave(block[1], 1)[:, :C]
    return q.float() * full


def e4m3_numpy(byte):
    """An independent e4m3 decode: 1 sign, 4 exponent bits (bias 7), 3 mantissa bits, subnormals, S.1111.111 NaN."""
    sign = -1.0 if byte & 0x80 else 1.0
    e, m = (byte >> 3) & 0xF, byte & 0x7
    if e == 0xF and m == 0x7:
        return np.nan
    if e == 0:
        return sign * m * 2.0 ** -9
    return sign * (1 + m / 8) * 2.0 ** (e - 7)


def dequantise_numpy(q, s, block):
    """The same, element by element in numpy from the raw bytes (checks dequantise_torch and torch's decode)."""
    table = np.array([e4m3_numpy(b) for b in range(256)], dtype=np.float64)
    raw = q.view(torch.uint8).numpy()
    sc = s.float().numpy()
    out = np.empty(raw.shape, dtype=np.float32)
    for i in range(raw.shape[0]):
        for j in range(raw.shape[1]):
            out[i, j] = np.float32(table[raw[i, j]]) * sc[i // block[0], j // block[1]]   # exact fp8 -> fp32, one rounding
    return torch.from_numpy(out)


def quantised_checkpoint(state, block, bf16_scale=None):
    """{checkpoint name: tensor} -> (fp8 checkpoint tensors, {name: dequantised fp32}) for the FP8_LINEAR names."""
    out, deq = {}, {}
    for k, v in state.items():
        if not FP8_LINEAR.fullmatch(k):
            out[k] = v
            continue
        q, s = quantise_fp8(v, block, torch.bfloat16 if k == bf16_scale else torch.float32)
        d = dequantise_torch(q, s, block)
        assert torch.equal(d, dequantise_numpy(q, s, block)), k
        out[k], out[k + "_scale_inv"], deq[k] = q.contiguous(), s.contiguous(), d.contiguous()
    return out, deq


def write_config(d, extra):
    """config.json with extra keys, in transformers' layout (to_json_string: indent 2, sorted keys)."""
    path = os.path.join(d, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(extra)
    with open(path, "w") as f:
        f.write(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def load_dequantised(d, **kw):
    return transformers.AutoModelForCausalLM.from_pretrained(
        d, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32, **kw)


def check_transformers_fp8(model, block, tmp):
    """What transformers 5.24 does with an fp8 checkpoint on CPU: with blocks that divide every shape it
    dequantises on load (FineGrainedFP8Config(dequantize=True), which the quantizer also switches on by itself
    without a GPU) to exactly the weights of dequantise_numpy; with partial edge blocks it refuses. Returns
    the refusal's message for the fixture's block size."""
    state = checkpoint_state(model)
    for b, ok in (([2, 2], True), (block, False)):
        d = os.path.join(tmp, f"fp8_{b[0]}x{b[1]}")
        model.save_pretrained(d)
        quant, deq = quantised_checkpoint(state, b)
        save_file(quant, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
        write_config(d, {"quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                                                 "quant_method": "fp8", "weight_block_size": b}})
        for how, kw in (("dequantize=True", dict(quantization_config=transformers.FineGrainedFP8Config(
                dequantize=True, weight_block_size=tuple(b)))), ("config.json alone", {})):
            try:
                m = load_dequantised(d, **kw)
            except RuntimeError as e:   # the load report's summary of Fp8Dequantize's ValueErrors, one per tensor
                assert not ok and "conversion of the weights" in str(e), f"blocks {b}, {how}: {e}"
                refusal = ("from_pretrained raises RuntimeError (conversion errors): Fp8Dequantize's ValueError "
                           "'Weight shape (R, C) not divisible by scale grid' for the matrices with partial blocks")
                print(f"  transformers, blocks {b}, {how}: refused ({e})")
                continue
            assert ok, f"blocks {b}, {how}: transformers loaded partial blocks"
            got = G.to_checkpoint_names("deepseek_v3", dict(m.named_parameters()))
            for k, v in deq.items():
                assert torch.equal(got[k].detach(), v), f"blocks {b}, {how}: {k}"
            print(f"  transformers, blocks {b}, {how}: {len(deq)} dequantised weights bit-identical to numpy's")
    return refusal


def fp8_fixture(name, inp):
    base_name, block = FP8_FIXTURES[name]
    family = FIXTURES[base_name][0]
    model, seed, _, _, _ = pick_model(base_name, inp)
    base, _ = G.read_checkpoint(os.path.join(HERE, base_name))
    state = checkpoint_state(model)
    assert base.keys() == state.keys() and all(torch.equal(base[k], state[k]) for k in base), \
        f"the model of seed {seed} is not the {base_name} fixture's"
    quant, deq = quantised_checkpoint(state, block, FP8_BF16_SCALE)
    d = os.path.join(HERE, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    with tempfile.TemporaryDirectory() as tmp:
        refusal = check_transformers_fp8(model, block, tmp)
        # the dequantised model, through transformers' own loading of an fp32 checkpoint
        fp32 = os.path.join(tmp, "dequantised")
        model.save_pretrained(fp32)
        save_file({k: deq.get(k, v) for k, v in state.items()}, os.path.join(fp32, "model.safetensors"),
                  metadata={"format": "pt"})
        model = load_dequantised(fp32)
        model.eval()
        got = checkpoint_state(model)
        assert all(torch.equal(got[k], deq.get(k, state[k])) for k in state)
        ref = run_reference(model, inp)
        mg, me = min_margins(model, ref["routers"])
        assert min(mg, me) > G.MIN_MARGIN, f"dequantised model has a router near-tie ({mg}, {me})"
        w_pos = G.compare(ref, run_packed(model, inp, "posids"), f"{name} packed(position_ids)")
        w_4d = G.compare(ref, run_packed(model, inp, "4d"), f"{name} packed(4D mask)")
        tens = expected_tensors(family, model, inp, ref)
        model.save_pretrained(d)
    save_file(quant, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})
    write_config(d, {"quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                             "weight_block_size": block}})
    save_file(tens, os.path.join(d, "expected.safetensors"), metadata={"fixture": name})
    save_file({f"dequantized.{k}": v for k, v in deq.items()}, os.path.join(d, "dequantized.safetensors"),
              metadata={"fixture": name})
    worst = max((deq[k] - state[k]).abs().max().item() / state[k].abs().max().item() for k in deq)
    sizes = {f: os.path.getsize(os.path.join(d, f)) for f in sorted(os.listdir(d))}
    for f in sizes:
        os.chmod(os.path.join(d, f), 0o644)
    print(f"{name}: {base_name}'s model (seed {seed}), {len(deq)} fp8 tensors in blocks {block}, worst relative "
          f"quantisation error {worst:.3f}; dequantised model: loss {ref['loss'].item():.6f}, margins group "
          f"{mg:.2e} expert {me:.2e}; packed vs reference: {w_pos} / {w_4d}; files {sizes}\n"
          f"  transformers with these blocks: {refusal}")
    return ref, tens


def main():
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}")
    names = sys.argv[1:] or list(FIXTURES) + list(FP8_FIXTURES)
    unknown = set(names) - set(FIXTURES) - set(FP8_FIXTURES)
    assert not unknown, f"unknown fixtures {sorted(unknown)}; known: {list(FIXTURES) + list(FP8_FIXTURES)}"
    inp = G.make_inputs()
    table = []
    for name in names:
        if name in FP8_FIXTURES:
            ref, tens = fp8_fixture(name, inp)
            table.append(f"| {name} | {sum(t.numel() for k, t in tens.items() if k.startswith('grad.'))} | "
                         f"{ref['loss'].item():.6f} | {tens['scaling'].item():.7f} |")
            continue
        model, seed, mg, me, bite = pick_model(name, inp)
        print(f"{name}: weight seed {seed}, smallest margins: group {mg:.2e}, expert {me:.2e}; tokens whose "
              f"expert set changes without the group limit / the bias / with the other mask value: "
              f"{bite['group']} / {bite['bias']} / {bite['mask_value']} (of {len(router_modules(model)) * G.B * G.T} "
              f"token-layers)")
        ref, tens, nparam = save_fixture(name, model, seed, inp)
        table.append(f"| {name} | {nparam} | {ref['loss'].item():.6f} | {tens['scaling'].item():.7f} |")
    print("\n| fixture | params | loss | scaling |\n|---|---|---|---|\n" + "\n".join(table))


if __name__ == "__main__":
    main()
