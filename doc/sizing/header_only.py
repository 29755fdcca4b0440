#!/usr/bin/env python3
# header_only.py DIR: writes DIR/model.safetensors for DIR/config.json with every tensor
# esft expects (qwen3_moe or deepseek_v2) declared in bf16 and no data (a sparse file of
# the declared size), so that `esft --dry-run` sizes a model whose weights are not here.
import json, struct, sys, os
d = sys.argv[1]; c = json.load(open(d + "/config.json"))
H, V, L = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
t = {}
def add(name, *shape): t[name] = shape
add("model.embed_tokens.weight", V, H); add("model.norm.weight", H); add("lm_head.weight", V, H)
for l in range(L):
    p = f"model.layers.{l}."
    add(p + "input_layernorm.weight", H); add(p + "post_attention_layernorm.weight", H)
    a = p + "self_attn."
    if c["model_type"] == "deepseek_v2":
        nH, dn, dr, dv, C = c["num_attention_heads"], c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
        add(a + "q_proj.weight", nH * (dn + dr), H); add(a + "kv_a_proj_with_mqa.weight", C + dr, H)
        add(a + "kv_a_layernorm.weight", C); add(a + "kv_b_proj.weight", nH * (dn + dv), C)
        add(a + "o_proj.weight", H, nH * dv)
        E, I, moe = c["n_routed_experts"], c["moe_intermediate_size"], l >= c["first_k_dense_replace"]
    else:
        nH, nKV, Dh = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        add(a + "q_proj.weight", nH * Dh, H); add(a + "k_proj.weight", nKV * Dh, H)
        add(a + "v_proj.weight", nKV * Dh, H); add(a + "o_proj.weight", H, nH * Dh)
        add(a + "q_norm.weight", Dh); add(a + "k_norm.weight", Dh)
        E, I, moe = c["num_experts"], c["moe_intermediate_size"], True
    m = p + "mlp."
    if not moe:
        D = c["intermediate_size"]
        add(m + "gate_proj.weight", D, H); add(m + "up_proj.weight", D, H); add(m + "down_proj.weight", H, D)
        continue
    add(m + "gate.weight", E, H)
    for e in range(E):
        add(m + f"experts.{e}.gate_proj.weight", I, H); add(m + f"experts.{e}.up_proj.weight", I, H)
        add(m + f"experts.{e}.down_proj.weight", H, I)
    S = c.get("n_shared_experts") or 0
    if S:
        add(m + "shared_experts.gate_proj.weight", S * I, H); add(m + "shared_experts.up_proj.weight", S * I, H)
        add(m + "shared_experts.down_proj.weight", H, S * I)
header, off = {}, 0
for name, shape in t.items():
    n = 1
    for s in shape: n *= s
    header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + 2 * n]}
    off += 2 * n
text = json.dumps(header).encode(); text += b" " * (-len(text) % 8)
with open(d + "/model.safetensors", "wb") as f:
    f.write(struct.pack("<Q", len(text))); f.write(text); f.truncate(8 + len(text) + off)
print(d, len(t), "tensors,", off / 2 / 1e9, "B parameters")
