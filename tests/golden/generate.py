#!/usr/bin/env python3
"""Golden fixtures for esft: tiny random MoE models produced by Hugging Face transformers.

Run from the repository root:   python3 tests/golden/generate.py
Needs torch, transformers (5.x), safetensors, numpy (CPU only). Writes tests/golden/<fixture>/.
See tests/golden/README.md for what is written and why.
"""

import copy
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

# ---------------------------------------------------------------- settings
B, T = 2, 13
SEGMENTS = [[(0, 13)], [(0, 6), (6, 7)]]      # per row: (start, length) of each packed sample
PROMPT_LEN = [[4], [2, 3]]                    # per sample: leading tokens whose label is -100
VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS = 101, 36, 3, 4, 2
EXPERTS, TOPK, EXPERT_W, DENSE_W, SHARED_W = 7, 2, 22, 30, 26
INIT_STD, NORM_STD, ROUTER_STD = 0.2, 0.1, 0.25
MIN_MARGIN = 1e-3                             # between consecutive sorted router probabilities
TOL = 1e-5
CLIP_QKV = 0.9                                # olmoe_clip_qkv: clamps a part of q, k and v
INPUT_SEED = 1234
# RoPE (rotate_half) needs an even head_dim, so 36/4 = 9 is impossible: qwen2_moe and olmoe (head_dim derived
# as hidden/heads, olmoe's q_norm is sized hidden_size) use 6 heads; qwen3_moe and mixtral keep 4 heads / 2 KV
# heads with an explicit head_dim (10 and 14) different from hidden/heads.

torch.set_num_threads(1)                      # fixed reduction order: bit-identical reruns

COMMON = dict(
    vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS,
    num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, hidden_act="silu",
    rms_norm_eps=1e-6, num_experts_per_tok=TOPK, tie_word_embeddings=False,
    pad_token_id=None, bos_token_id=None, eos_token_id=None,
    output_router_logits=True, router_aux_loss_coef=0.01, attention_dropout=0.0,
    max_position_embeddings=64,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)

FAMILIES = {
    "qwen2_moe": (transformers.Qwen2MoeConfig, dict(
        num_experts=EXPERTS, moe_intermediate_size=EXPERT_W, intermediate_size=DENSE_W,
        shared_expert_intermediate_size=SHARED_W, decoder_sparse_step=1, mlp_only_layers=[1],
        qkv_bias=True, norm_topk_prob=False, use_sliding_window=False,
        num_attention_heads=6, num_key_value_heads=2)),          # head_dim = 36/6 = 6 (derived)
    "qwen3_moe": (transformers.Qwen3MoeConfig, dict(
        num_experts=EXPERTS, moe_intermediate_size=EXPERT_W, intermediate_size=DENSE_W,
        decoder_sparse_step=1, mlp_only_layers=[], head_dim=10, attention_bias=False,
        norm_topk_prob=True, use_sliding_window=False, max_position_embeddings=256,
        # original 64 with head_dim 10 puts a fractional entry (0.5) in YaRN's ramp
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64})),
    "olmoe": (transformers.OlmoeConfig, dict(
        num_experts=EXPERTS, intermediate_size=EXPERT_W, norm_topk_prob=False,
        attention_bias=False, clip_qkv=None,
        num_attention_heads=6, num_key_value_heads=3)),          # head_dim = 36/6 = 6 (derived)
    "mixtral": (transformers.MixtralConfig, dict(
        num_local_experts=EXPERTS, intermediate_size=EXPERT_W, head_dim=14,
        tie_word_embeddings=True, sliding_window=None, router_jitter_noise=0.0)),
}
BASE_SEED = {"qwen2_moe": 100, "qwen3_moe": 200, "olmoe": 300, "mixtral": 400}


def modeling_module(model):
    return sys.modules[type(model).__module__]


# ---------------------------------------------------------------- inputs
def make_inputs():
    g = torch.Generator().manual_seed(INPUT_SEED)
    input_ids = torch.randint(0, VOCAB, (B, T), generator=g, dtype=torch.int64)
    position_ids = torch.zeros(B, T, dtype=torch.int64)
    segment_ids = torch.zeros(B, T, dtype=torch.int64)
    labels = input_ids.clone()
    for b, segs in enumerate(SEGMENTS):
        for s, (start, n) in enumerate(segs):
            position_ids[b, start:start + n] = torch.arange(n)
            segment_ids[b, start:start + n] = s
            labels[b, start:start + PROMPT_LEN[b][s]] = -100
    assert sum(n for _, n in SEGMENTS[0]) == T and sum(n for _, n in SEGMENTS[1]) == T
    return dict(input_ids=input_ids, position_ids=position_ids, segment_ids=segment_ids, labels=labels)


def block_causal_mask(segment_ids, dtype=torch.float32):
    """Additive 4D mask [B,1,T,T]: 0 where key j is visible to query i, finfo.min elsewhere."""
    t = segment_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    allowed = (causal[None] & same)[:, None]
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


# ---------------------------------------------------------------- model building
def build_model(family, seed, extra=None):
    cls, kw = FAMILIES[family]
    args = dict(COMMON)
    args.update(kw)
    args.update(extra or {})
    cfg = cls(**args)
    model = transformers.AutoModelForCausalLM.from_config(
        cfg, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + NORM_STD * torch.randn(p.shape, generator=g))
            elif is_router(name):
                p.copy_(ROUTER_STD * torch.randn(p.shape, generator=g))
            else:
                p.copy_(INIT_STD * torch.randn(p.shape, generator=g))
    model.eval()   # no dropout; training-mode differences (mixtral jitter) are disabled anyway
    return model


def is_router(name):
    return re.fullmatch(r"model\.layers\.\d+\.mlp\.gate\.weight", name) is not None


def router_modules(model):
    out = {}
    for name, mod in model.named_modules():
        m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.gate", name)
        if m and type(mod).__name__.endswith("TopKRouter"):
            out[int(m.group(1))] = mod
    return out


def round_to_bf16(model):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    return m


# ---------------------------------------------------------------- HF checkpoint names
def to_checkpoint_names(family, tensors):
    """In-memory (transformers 5, fused experts) names -> names save_pretrained writes."""
    out = {}
    mix = family.startswith("mixtral")
    for name, t in tensors.items():
        m = re.fullmatch(r"(model\.layers\.\d+)\.mlp\.experts\.(gate_up_proj|down_proj)", name)
        if m:
            pre = m.group(1) + (".block_sparse_moe" if mix else ".mlp") + ".experts"
            for e in range(t.shape[0]):
                if m.group(2) == "gate_up_proj":
                    inter = t.shape[1] // 2
                    out[f"{pre}.{e}.{'w1' if mix else 'gate_proj'}.weight"] = t[e, :inter]
                    out[f"{pre}.{e}.{'w3' if mix else 'up_proj'}.weight"] = t[e, inter:]
                else:
                    out[f"{pre}.{e}.{'w2' if mix else 'down_proj'}.weight"] = t[e]
            continue
        if mix:
            name = re.sub(r"\.mlp\.gate\.weight$", ".block_sparse_moe.gate.weight", name)
        out[name] = t
    return out


def read_checkpoint(d):
    files = sorted(f for f in os.listdir(d) if f.endswith(".safetensors") and f.startswith("model"))
    out = {}
    for f in files:
        with safe_open(os.path.join(d, f), "pt") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out, files


# ---------------------------------------------------------------- runs
class Capture:
    """Forward hooks on every router: collects (logits, topk weights, topk ids) per layer, per call."""

    def __init__(self, model):
        self.data = {}
        self.handles = []
        for layer, mod in router_modules(model).items():
            self.handles.append(mod.register_forward_hook(self._hook(layer)))

    def _hook(self, layer):
        def hook(_mod, _inp, out):
            logits, weights, ids = out
            self.data.setdefault(layer, []).append((logits, weights, ids))
        return hook

    def take(self):
        d = {l: tuple(torch.cat([c[i] for c in calls], 0) for i in range(3)) for l, calls in self.data.items()}
        self.data = {}
        return dict(sorted(d.items()))

    def close(self):
        for h in self.handles:
            h.remove()


def ce_loss(model, logits, labels):
    loss = model.loss_function(logits=logits, labels=labels, vocab_size=model.config.vocab_size)
    # independent check of the convention: logits[t] predicts labels[t+1], mean over non -100
    lg = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    lb = labels[:, 1:].reshape(-1)
    ref = F.cross_entropy(lg, lb, ignore_index=-100, reduction="mean")
    assert torch.allclose(loss, ref, atol=1e-6, rtol=0), (loss, ref)
    return loss


def aux_loss(model, routers):
    lb = modeling_module(model).load_balancing_loss_func
    cfg = model.config
    return lb(tuple(r[0] for r in routers.values()), cfg.num_experts, cfg.num_experts_per_tok, None)


def grads_of(model, loss, aux):
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]
    g = torch.autograd.grad(loss, params, retain_graph=True)
    grads = dict(zip(names, g))
    rnames = [n for n in names if is_router(n)]
    ga = torch.autograd.grad(aux, [dict(model.named_parameters())[n] for n in rnames], retain_graph=True)
    return grads, dict(zip(rnames, ga))


def per_sample_logits(model, inp, **kwargs):
    """The batch's logits with each packed sample its own forward pass (batch 1, positions 0..n-1)."""
    rows = []
    for b, segs in enumerate(SEGMENTS):
        pieces = []
        for start, n in segs:
            ids = inp["input_ids"][b:b + 1, start:start + n]
            pos = torch.arange(n)[None]
            pieces.append(model(input_ids=ids, position_ids=pos, use_cache=False, **kwargs).logits)
        rows.append(torch.cat(pieces, 1))
    return torch.cat(rows, 0)


def run_reference(model, inp):
    """Independent reference: each packed sample is its own forward pass (batch 1, positions 0..n-1)."""
    cap = Capture(model)
    logits = per_sample_logits(model, inp, output_router_logits=False)
    routers = cap.take()
    cap.close()
    loss = ce_loss(model, logits, inp["labels"])
    aux = aux_loss(model, routers)
    grads, grads_aux = grads_of(model, loss, aux)
    return dict(logits=logits, routers=routers, loss=loss, aux=aux, grads=grads, grads_aux=grads_aux)


def run_packed(model, inp, mode):
    """transformers' own packed handling: 'posids' = position_ids only (auto-detected packing, 2D mask None);
    '4d' = explicit additive block-diagonal causal mask."""
    cap = Capture(model)
    kw = dict(input_ids=inp["input_ids"], position_ids=inp["position_ids"], use_cache=False)
    if mode == "posids":
        out = model(**kw, labels=inp["labels"], output_router_logits=True)
    else:
        out = model(**kw, attention_mask=block_causal_mask(inp["segment_ids"]), output_router_logits=False)
    routers = cap.take()
    cap.close()
    loss = ce_loss(model, out.logits, inp["labels"])
    aux = aux_loss(model, routers)
    grads, grads_aux = grads_of(model, loss, aux)
    res = dict(logits=out.logits, routers=routers, loss=loss, aux=aux, grads=grads, grads_aux=grads_aux)
    if mode == "posids":
        res["hf_loss"] = out.loss          # = CE + coef * aux (transformers adds it in place)
        res["hf_aux"] = out.aux_loss
    return res


def maxdiff(a, b):
    return (a.detach().double() - b.detach().double()).abs().max().item()


def compare(ref, other, what):
    """Max abs differences by kind; every one must be <= TOL and the top-k ids identical."""
    d = {"router": 0.0, "logits": 0.0, "loss": 0.0, "grad": 0.0}
    assert ref["routers"].keys() == other["routers"].keys()
    for l in ref["routers"]:
        a, b = ref["routers"][l], other["routers"][l]
        assert torch.equal(a[2], b[2]), f"{what}: top-k ids differ at layer {l}"
        d["router"] = max(d["router"], maxdiff(a[0], b[0]), maxdiff(a[1], b[1]))
    d["logits"] = maxdiff(ref["logits"], other["logits"])
    d["loss"] = max(maxdiff(ref["loss"], other["loss"]), maxdiff(ref["aux"], other["aux"]))
    for n in ref["grads"]:
        d["grad"] = max(d["grad"], maxdiff(ref["grads"][n], other["grads"][n]))
    for n in ref["grads_aux"]:
        d["grad"] = max(d["grad"], maxdiff(ref["grads_aux"][n], other["grads_aux"][n]))
    worst = max(d.values())
    assert worst <= TOL, f"{what}: max abs difference {d} > {TOL}"
    return " ".join(f"{k} {v:.1e}" for k, v in d.items())


def min_margin(routers):
    worst = math.inf
    for logits, _, _ in routers.values():
        p = torch.softmax(logits.detach().double(), -1)
        s = p.sort(-1, descending=True).values[:, :TOPK + 1]
        worst = min(worst, (s[:, :-1] - s[:, 1:]).min().item())
    return worst


def forward_routers(model, inp):
    with torch.no_grad():
        cap = Capture(model)
        for b, segs in enumerate(SEGMENTS):
            for start, n in segs:
                model(input_ids=inp["input_ids"][b:b + 1, start:start + n],
                      position_ids=torch.arange(n)[None], use_cache=False)
        r = cap.take()
        cap.close()
    return r


def pick_model(family, inp, also_bf16=False, extra=None):
    for attempt in range(50):
        seed = BASE_SEED[family] + attempt
        model = build_model(family, seed, extra)
        margins = [min_margin(forward_routers(model, inp))]
        if also_bf16:
            margins.append(min_margin(forward_routers(round_to_bf16(model), inp)))
        if min(margins) > MIN_MARGIN:
            return model, seed, min(margins)
        print(f"  {family}: seed {seed} has a router near-tie (margin {min(margins):.2e}), reseeding")
    raise RuntimeError("no seed without router near-ties")


# ---------------------------------------------------------------- writing
def expected_tensors(family, model, inp, ref, hf):
    t = {k: inp[k].contiguous() for k in ("input_ids", "position_ids", "segment_ids", "labels")}
    t["logits"] = ref["logits"].detach().float().contiguous()
    for l, (logits, weights, ids) in ref["routers"].items():
        t[f"router.{l}.topk_ids"] = ids.to(torch.int32).contiguous()
        t[f"router.{l}.topk_weights"] = weights.detach().float().contiguous()
        t[f"router.{l}.logits"] = logits.detach().float().contiguous()
    t["loss"] = ref["loss"].detach().float().reshape(())
    t["aux_loss"] = ref["aux"].detach().float().reshape(())
    coef = model.config.router_aux_loss_coef
    t["loss_with_aux"] = (ref["loss"] + coef * ref["aux"]).detach().float().reshape(())
    assert maxdiff(t["loss_with_aux"], hf["hf_loss"]) <= TOL and maxdiff(t["aux_loss"], hf["hf_aux"]) <= TOL
    for n, g in to_checkpoint_names(family, ref["grads"]).items():
        t[f"grad.{n}"] = g.float().contiguous()
    for n, g in to_checkpoint_names(family, ref["grads_aux"]).items():
        t[f"grad_aux.{n}"] = g.float().contiguous()
    return t


def save_fixture(name, family, model, inp, save_dtype=torch.float32, shard=None):
    d = os.path.join(HERE, name)
    if os.path.isdir(d):
        shutil.rmtree(d)
    os.makedirs(d)
    ref = run_reference(model, inp)
    pos = run_packed(model, inp, "posids")
    d4 = run_packed(model, inp, "4d")
    w_pos = compare(ref, pos, f"{name} packed(position_ids)")
    w_4d = compare(ref, d4, f"{name} packed(4D mask)")
    tens = expected_tensors(family, model, inp, ref, pos)
    save_file(tens, os.path.join(d, "expected.safetensors"), metadata={"fixture": name})

    to_save = model if save_dtype == torch.float32 else copy.deepcopy(model).to(save_dtype)
    kw = {} if shard is None else {"max_shard_size": shard}
    to_save.save_pretrained(d, **kw)

    # the checkpoint holds exactly the parameters under the names the gradients use
    saved, files = read_checkpoint(d)
    mine = to_checkpoint_names(family, dict(model.named_parameters()))
    assert saved.keys() == mine.keys(), sorted(set(saved) ^ set(mine))
    for k, v in mine.items():
        assert saved[k].dtype == save_dtype and torch.equal(saved[k].float(), v.detach().float()), k
    assert {k[len("grad."):] for k in tens if k.startswith("grad.")} == saved.keys()
    if shard is not None:
        assert len(files) >= 2 and os.path.exists(os.path.join(d, "model.safetensors.index.json"))

    check_reload(d, inp, ref)
    nparam = sum(p.numel() for p in model.parameters())
    print(f"{name}: {nparam} parameters, loss {ref['loss'].item():.6f}, aux {ref['aux'].item():.6f}, "
          f"loss+coef*aux {tens['loss_with_aux'].item():.6f}; files {files}\n"
          f"  packed row vs per-sample reference, max abs diff: position_ids only: {w_pos}; "
          f"4D mask: {w_4d}")
    for f in os.listdir(d):
        os.chmod(os.path.join(d, f), 0o644)
    return ref


def check_reload(d, inp, ref):
    m = transformers.AutoModelForCausalLM.from_pretrained(
        d, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32)
    m.eval()
    with torch.no_grad():
        out = m(input_ids=inp["input_ids"], position_ids=inp["position_ids"], use_cache=False)
    diff = maxdiff(out.logits, ref["logits"])
    assert diff <= TOL, f"{d}: reloaded logits differ by {diff}"
    print(f"  reload {os.path.basename(d)}: from_pretrained logits max abs diff {diff:.2e}")
    return m


def v4_config(cfg):
    """v5 config.json (rope_parameters, dtype) -> v4 key style (rope_theta, rope_scaling, torch_dtype)."""
    out = {}
    for k, v in cfg.items():
        if k == "rope_parameters":
            rp = dict(v)
            out["rope_theta"] = rp.pop("rope_theta")
            rtype = rp.pop("rope_type")
            out["rope_scaling"] = None if rtype == "default" and not rp else {"rope_type": rtype, **rp}
        elif k == "dtype":
            out["torch_dtype"] = v
        else:
            out[k] = v
    return dict(sorted(out.items()))


def init_fixture(inp):
    """A checkpoint written by esft's init phase, loaded and run by transformers: shows
    that init's output is a checkpoint transformers reads, and gives esft a fixture of
    its own writing. Needs ./esft built; the deck's seed is raised until no router
    near-tie remains."""
    esft = os.path.join(ROOT, "esft")
    if not os.access(esft, os.X_OK):
        print("init_qwen2_moe: skipped (build ./esft first)")
        return
    deck = os.path.join(HERE, "init-qwen2-moe.yaml")
    d = os.path.join(HERE, "init_qwen2_moe")
    for seed in range(11, 61):
        if os.path.isdir(d):
            shutil.rmtree(d)
        with tempfile.TemporaryDirectory() as out:
            subprocess.run([esft, deck, f"model.path={d}", f"run.output_dir={out}",
                            f"run.seed={seed}"], check=True, cwd=ROOT)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            d, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32)
        model.eval()
        margin = min_margin(forward_routers(model, inp))
        if margin > MIN_MARGIN:
            break
        print(f"  init_qwen2_moe: seed {seed} has a router near-tie ({margin:.2e}), reseeding")
    else:
        raise RuntimeError("no init seed without router near-ties")
    ref = run_reference(model, inp)
    pos = run_packed(model, inp, "posids")
    w_pos = compare(ref, pos, "init_qwen2_moe packed(position_ids)")
    tens = expected_tensors("qwen2_moe", model, inp, ref, pos)
    save_file(tens, os.path.join(d, "expected.safetensors"), metadata={"fixture": "init_qwen2_moe"})
    nparam = sum(p.numel() for p in model.parameters())
    print(f"init_qwen2_moe: esft init seed {seed}, {nparam} parameters, loss "
          f"{ref['loss'].item():.6f}; files {sorted(os.listdir(d))}; packed vs reference {w_pos}")
    for f in os.listdir(d):
        os.chmod(os.path.join(d, f), 0o644)


def trained_fixture(inp):
    """A checkpoint merged by esft's train phase (ESFT on the demo task), loaded and run by
    transformers: shows that the merged export is a checkpoint transformers reads and that
    its logits are the ones esft computes (test_golden checks the C side on it)."""
    esft = os.path.join(ROOT, "esft")
    if not os.access(esft, os.X_OK):
        print("trained_qwen2_moe: skipped (build ./esft first)")
        return
    deck = os.path.join(HERE, "train-qwen2-moe.yaml")
    d = os.path.join(HERE, "trained_qwen2_moe")
    for seed in range(21, 71):
        if os.path.isdir(d):
            shutil.rmtree(d)
        with tempfile.TemporaryDirectory() as out:
            subprocess.run([esft, deck, f"run.output_dir={out}", f"model.path={out}/model",
                            f"prepare.output={out}/data.h5", f"data.path={out}/data.h5",
                            f"train.expert_config={out}/expert_config.json", f"run.seed={seed}"],
                           check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
            shutil.copytree(os.path.join(out, "merged"), d)
            base = transformers.AutoModelForCausalLM.from_pretrained(
                os.path.join(out, "model"), attn_implementation="eager",
                experts_implementation="eager", dtype=torch.float32)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            d, attn_implementation="eager", experts_implementation="eager", dtype=torch.float32)
        model.eval()
        margin = min_margin(forward_routers(model, inp))
        if margin > MIN_MARGIN:
            break
        print(f"  trained_qwen2_moe: seed {seed} has a router near-tie ({margin:.2e}), reseeding")
    else:
        raise RuntimeError("no train seed without router near-ties")
    changed = [n for n, p in model.named_parameters()
               if not torch.equal(p, dict(base.named_parameters())[n])]
    assert changed, "the merged export equals the base model: nothing trained"
    ref = run_reference(model, inp)
    pos = run_packed(model, inp, "posids")
    compare(ref, pos, "trained_qwen2_moe packed(position_ids)")
    tens = expected_tensors("qwen2_moe", model, inp, ref, pos)
    save_file(tens, os.path.join(d, "expected.safetensors"), metadata={"fixture": "trained_qwen2_moe"})
    print(f"trained_qwen2_moe: esft train seed {seed}; transformers loads the merged export; "
          f"{len(changed)} parameter tensors differ from the base (in memory, fused experts "
          f"count once per layer); loss {ref['loss'].item():.6f}")
    for f in os.listdir(d):
        os.chmod(os.path.join(d, f), 0o644)


def clip_fixture(inp):
    """olmoe with clip_qkv: q, k, v clamped to [-CLIP_QKV, CLIP_QKV] after the QK-norms, so
    gradients pass through the clamp (zero where it bites). Checks that the clamp bites."""
    model, seed, margin = pick_model("olmoe", inp, extra={"clip_qkv": CLIP_QKV})
    print(f"olmoe_clip_qkv: weight seed {seed}, smallest router margin {margin:.2e}")
    ref = save_fixture("olmoe_clip_qkv", "olmoe", model, inp)
    model.config.clip_qkv = None           # read at forward time by the attention
    unclipped = run_reference(model, inp)
    model.config.clip_qkv = CLIP_QKV
    diff = maxdiff(unclipped["logits"], ref["logits"])
    assert diff > 1e-2, f"clip_qkv {CLIP_QKV} barely changes the logits ({diff})"
    print(f"  the clamp changes the logits by up to {diff:.3f}")


def main():
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}")
    inp = make_inputs()
    if sys.argv[1:] == ["olmoe_clip_qkv"]:   # just this one (the others unchanged)
        clip_fixture(inp)
        return
    seeds = {}
    for family in FAMILIES:
        bf16 = family == "qwen3_moe"
        model, seed, margin = pick_model(family, inp, also_bf16=bf16)
        seeds[family] = seed
        print(f"{family}: weight seed {seed}, smallest router margin {margin:.2e}")
        save_fixture(family, family, model, inp)
        if bf16:
            rounded = round_to_bf16(model)
            save_fixture("qwen3_moe_bf16_sharded", family, rounded, inp,
                         save_dtype=torch.bfloat16, shard="100KB")
        if family == "mixtral":
            src, dst = os.path.join(HERE, "mixtral"), os.path.join(HERE, "mixtral_v4config")
            if os.path.isdir(dst):
                shutil.rmtree(dst)
            os.makedirs(dst)
            for f in ("model.safetensors", "expected.safetensors", "generation_config.json"):
                if os.path.exists(os.path.join(src, f)):
                    shutil.copyfile(os.path.join(src, f), os.path.join(dst, f))   # real copies, no links
            with open(os.path.join(src, "config.json")) as f:
                cfg = json.load(f)
            assert "rope_parameters" in cfg and "dtype" in cfg and "rope_theta" not in cfg, \
                "transformers no longer writes v5-style config keys: update v4_config()"
            with open(os.path.join(dst, "config.json"), "w") as f:
                json.dump(v4_config(cfg), f, indent=2)
                f.write("\n")
            m = check_reload(dst, inp, run_reference(model, inp))
            assert m.config.rope_parameters == model.config.rope_parameters
            assert m.config.tie_word_embeddings
            for f in os.listdir(dst):
                os.chmod(os.path.join(dst, f), 0o644)
            print("mixtral_v4config: v4-style config.json loads to the same model")
    clip_fixture(inp)
    init_fixture(inp)
    trained_fixture(inp)


if __name__ == "__main__":
    main()
