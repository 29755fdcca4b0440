/* model_load: a checkpoint directory's tensors into the parameter table (model.h
 * model_load, model_check_checkpoint): every floating-point dtype, per-expert or fused
 * experts, DeepSeek-V3's fp8 blocks with their scales, gpt_oss's fused layout (transposed,
 * gate and up interleaved) and its MXFP4 experts; each rank reads only what it holds,
 * and every shape is checked from the headers before anything is allocated. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "log.h"
#include "model.h"
#include "model_internal.h"
#include "safetensors.h"

/* ---- loading ------------------------------------------------------------------------ */

/* Where a parameter's values are: its tensor from an element offset and, for an fp8
 * tensor, the scale tensor that multiplies it (NULL otherwise). A strided source (cols >
 * 0) reads the parameter's element (r, c) (r < numel / cols) from tensor element offset +
 * r * row_stride + c * col_stride: gpt_oss's fused experts, whose matrices esft holds
 * transposed or de-interleaved. An MXFP4 source (mxfp4_scales non-NULL; tensor is the
 * blocks) counts elements of the dequantised tensor. */
struct weight_source {
    const struct st_tensor *tensor;
    size_t offset;
    const struct st_tensor *scale; /* [..., ceil(R / block[0]), ceil(C / block[1])] */
    int block[2];
    size_t cols, row_stride, col_stride;
    const struct st_tensor *mxfp4_scales; /* [..., R, C / 32] u8 E8M0 exponents */
};

/* FP4 E2M1 values by their 4 bits (transformers integrations/mxfp4.py FP4_VALUES). */
static const float FP4_E2M1[16] = {+0.0f, +0.5f, +1.0f, +1.5f, +2.0f, +3.0f, +4.0f, +6.0f,
                                   -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

/* Element f of an MXFP4 tensor dequantised ([..., R, C] flattened; blocks [..., R, C / 32,
 * 16], scales [..., R, C / 32]): block f / 32 holds 16 bytes, the low nibble the even
 * element and the high nibble the odd one, and one exponent e: FP4_E2M1[nibble] * 2^(e -
 * 127). As convert_moe_packed_tensors: lut[nibble] times torch.ldexp's 2^(e - 127)
 * (2.0 ** 128 = inf for e = 255, as torch.pow gives). */
static float mxfp4_value(const struct weight_source *src, size_t f)
{
    const uint8_t *blocks = (const uint8_t *)src->tensor->data;
    const uint8_t *scales = (const uint8_t *)src->mxfp4_scales->data;
    size_t block = f / 32, within = f % 32;
    uint8_t byte = blocks[block * 16 + within / 2];
    int nibble = within % 2 ? byte >> 4 : byte & 0x0F;
    return FP4_E2M1[nibble] * ldexpf(1.0f, (int)scales[block] - 127);
}

static float scalar_f32(const struct st_tensor *t, size_t i)
{
    const unsigned char *at = (const unsigned char *)t->data + i * st_dtype_size(t->dtype);
    uint16_t h;
    float f;
    switch (t->dtype) {
    case ST_BF16:
        memcpy(&h, at, 2);
        return st_bf16_to_f32(h);
    case ST_F16:
        memcpy(&h, at, 2);
        return st_f16_to_f32(h);
    default:
        memcpy(&f, at, 4);
        return f; /* F32: locate admits no other scale dtype */
    }
}

/* count elements of an fp8 tensor [..., R, C] from element offset, dequantised:
 * w[r][c] = q[r][c] * scale[r / block[0]][c / block[1]], one fp32 product as transformers'
 * Fp8Dequantize (q.to(float32) * scale.to(float32)). Blocks at the right and bottom edges
 * may be partial (the scale grid rounds up, as DeepSeek's weight_dequant). */
static void dequantise_range(const struct weight_source *src, size_t count, float *out)
{
    const struct st_tensor *t = src->tensor;
    size_t R = (size_t)t->shape[t->rank - 2], C = (size_t)t->shape[t->rank - 1];
    size_t SR = (size_t)src->scale->shape[t->rank - 2], SC = (size_t)src->scale->shape[t->rank - 1];
    const uint8_t *q = (const uint8_t *)t->data;
    size_t f = src->offset;
    size_t matrix = f / (R * C), r = f / C % R, c = f % C;
    for (size_t i = 0; i < count; i++, f++) {
        float v = t->dtype == ST_F8_E4M3 ? st_f8_e4m3_to_f32(q[f]) : st_f8_e5m2_to_f32(q[f]);
        size_t block = (matrix * SR + r / (size_t)src->block[0]) * SC + c / (size_t)src->block[1];
        out[i] = v * scalar_f32(src->scale, block);
        if (++c == C) {
            c = 0;
            if (++r == R) r = 0, matrix++;
        }
    }
}

/* Element f of a float tensor, in fp32 (locate admits only float dtypes here). */
static float float_value(const struct st_tensor *t, size_t f)
{
    if (t->dtype != ST_F64) return scalar_f32(t, f);
    double d;
    memcpy(&d, (const unsigned char *)t->data + f * 8, 8);
    return (float)d;
}

/* count elements of a strided or MXFP4 source (see struct weight_source), in fp32. */
static void read_strided(const struct weight_source *src, size_t count, float *out)
{
    size_t cols = src->cols ? src->cols : count;
    size_t row_stride = src->cols ? src->row_stride : 0, col_stride = src->cols ? src->col_stride : 1;
    for (size_t i = 0; i < count; i++) {
        size_t f = src->offset + (i / cols) * row_stride + (i % cols) * col_stride;
        out[i] = src->mxfp4_scales ? mxfp4_value(src, f) : float_value(src->tensor, f);
    }
}

/* count elements of the source, converted (or dequantised) to fp32. */
static int read_range_f32(const struct weight_source *src, size_t count, float *out, char *err,
                          size_t err_size)
{
    const struct st_tensor *t = src->tensor;
    if (src->scale) {
        dequantise_range(src, count, out);
        return 0;
    }
    if (src->cols || src->mxfp4_scales) {
        read_strided(src, count, out);
        return 0;
    }
    const unsigned char *base = (const unsigned char *)t->data;
    size_t size = st_dtype_size(t->dtype);
    for (size_t i = 0; i < count; i++) {
        const unsigned char *at = base + (src->offset + i) * size;
        uint16_t h;
        switch (t->dtype) {
        case ST_F32: memcpy(&out[i], at, 4); break;
        case ST_BF16: memcpy(&h, at, 2); out[i] = st_bf16_to_f32(h); break;
        case ST_F16: memcpy(&h, at, 2); out[i] = st_f16_to_f32(h); break;
        case ST_F64: {
            double d;
            memcpy(&d, at, 8);
            out[i] = (float)d;
            break;
        }
        default:
            snprintf(err, err_size, "%s: tensor '%s': dtype %s is not a floating-point weight",
                     t->file, t->name, st_dtype_name(t->dtype));
            return -1;
        }
    }
    return 0;
}

/* The config.json keys behind p's shape, for messages ("vocab_size x hidden_size"). */
static const char *shape_keys(const struct model_config *c, const struct param *p)
{
    bool down = p->part == MLP_DOWN;
    static char text[3][96]; /* messages of one thread */
    const char *E = hfconfig_experts_key(c), *I = hfconfig_expert_width_key(c);
    if (c->attention == ATTENTION_MLA && p->kind == PARAM_ATTENTION) {
        static const struct {
            const char *suffix, *keys;
        } mla[] = {
            {".q_proj.weight", "num_attention_heads * (qk_nope_head_dim + qk_rope_head_dim) x hidden_size"},
            {".q_a_proj.weight", "q_lora_rank x hidden_size"},
            {".q_a_proj.bias", "q_lora_rank"},
            {".q_a_layernorm.weight", "q_lora_rank"},
            {".q_b_proj.weight", "num_attention_heads * (qk_nope_head_dim + qk_rope_head_dim) x q_lora_rank"},
            {".kv_a_proj_with_mqa.weight", "kv_lora_rank + qk_rope_head_dim x hidden_size"},
            {".kv_a_proj_with_mqa.bias", "kv_lora_rank + qk_rope_head_dim"},
            {".kv_a_layernorm.weight", "kv_lora_rank"},
            {".kv_b_proj.weight", "num_attention_heads * (qk_nope_head_dim + v_head_dim) x kv_lora_rank"},
            {".o_proj.weight", "hidden_size x num_attention_heads * v_head_dim"},
            {".o_proj.bias", "hidden_size"},
        };
        for (size_t i = 0; i < sizeof mla / sizeof mla[0]; i++) {
            size_t n = strlen(p->name), k = strlen(mla[i].suffix);
            if (n >= k && strcmp(p->name + n - k, mla[i].suffix) == 0) return mla[i].keys;
        }
    }
    switch (p->kind) {
    case PARAM_EMBEDDING:
    case PARAM_LM_HEAD:
        return "vocab_size x hidden_size";
    case PARAM_NORM:
        return "hidden_size";
    case PARAM_ROUTER:
        snprintf(text[0], sizeof text[0], p->rank == 1 ? "%s" : "%s x hidden_size", E);
        return text[0];
    case PARAM_EXPERT:
        if (p->rank == 1) return down ? "hidden_size" : I; /* gpt_oss's expert biases */
        snprintf(text[1], sizeof text[1], down ? "hidden_size x %s" : "%s x hidden_size", I);
        return text[1];
    case PARAM_SHARED_EXPERT:
        if (p->part == MLP_NONE) return "1 x hidden_size";
        if (c->family != HF_QWEN2_MOE) {
            snprintf(text[2], sizeof text[2],
                     down ? "hidden_size x n_shared_experts * %s" : "n_shared_experts * %s x hidden_size", I);
            return text[2];
        }
        return down ? "hidden_size x shared_expert_intermediate_size"
                    : "shared_expert_intermediate_size x hidden_size";
    case PARAM_DENSE_MLP:
        return down ? "hidden_size x intermediate_size" : "intermediate_size x hidden_size";
    case PARAM_ATTENTION:
        if (strstr(p->name, ".sinks")) return "num_attention_heads";
        if (strstr(p->name, "norm.weight"))
            return c->qk_norm == QK_NORM_PER_HEAD ? "head_dim"
                   : strstr(p->name, "q_norm")    ? "num_attention_heads * head_dim"
                                                  : "num_key_value_heads * head_dim";
        if (strstr(p->name, "o_proj.weight")) return "hidden_size x num_attention_heads * head_dim";
        if (strstr(p->name, "o_proj.bias")) return "hidden_size";
        if (strstr(p->name, "q_proj.weight")) return "num_attention_heads * head_dim x hidden_size";
        if (strstr(p->name, "q_proj.bias")) return "num_attention_heads * head_dim";
        if (strstr(p->name, ".weight")) return "num_key_value_heads * head_dim x hidden_size";
        return "num_key_value_heads * head_dim";
    default:
        return "?";
    }
}

static bool is_float_dtype(enum st_dtype dtype)
{
    return dtype == ST_F32 || dtype == ST_BF16 || dtype == ST_F16 || dtype == ST_F64;
}

static bool is_fp8_dtype(enum st_dtype dtype)
{
    return dtype == ST_F8_E4M3 || dtype == ST_F8_E5M2;
}

/* The matrices DeepSeek-V3 stores in fp8: the linear layers of the decoder layers
 * (attention projections, routed and shared experts, dense MLPs). Embedding, lm_head,
 * norms, biases and the router stay in a float dtype there, and transformers' fp8
 * integration leaves them unconverted (lm_head in modules_to_not_convert; the others are
 * no nn.Linear). */
static bool may_be_fp8(const struct param *p)
{
    if (p->rank != 2) return false;
    switch (p->kind) {
    case PARAM_ATTENTION:
    case PARAM_EXPERT:
    case PARAM_DENSE_MLP:
        return true;
    case PARAM_SHARED_EXPERT:
        return p->part != MLP_NONE; /* not qwen2_moe's shared_expert_gate [1, H] */
    default:
        return false;
    }
}

/* The fp8 tensor t's scale: "<t's name>_scale_inv", i.e. "<module>.weight_scale_inv"
 * (DeepSeek-V3, transformers' Fp8Quantize) or "experts.gate_up_proj_scale_inv" for fused
 * experts; a float tensor with one entry per block, [..., ceil(R / B0), ceil(C / B1)]. */
static int locate_scale(const struct model_config *c, const struct st_checkpoint *ckpt,
                        const struct param *p, struct weight_source *src, char *err,
                        size_t err_size)
{
    const struct st_tensor *t = src->tensor;
    if (!c->quantization.fp8) {
        snprintf(err, err_size,
                 "%s: tensor '%s' is %s (fp8), but %s/config.json has no "
                 "quantization_config (fp8 weights need its quant_method \"fp8\" and "
                 "weight_block_size)",
                 t->file, t->name, st_dtype_name(t->dtype), ckpt->dir);
        return -1;
    }
    if (!may_be_fp8(p)) {
        snprintf(err, err_size,
                 "%s: tensor '%s' is %s (fp8), where esft needs a float "
                 "weight: only the linear layers of decoder layers may be fp8, not a %s%s",
                 t->file, t->name, st_dtype_name(t->dtype), param_kind_name(p->kind),
                 p->rank == 1 ? " vector" : "");
        return -1;
    }
    char name[PARAM_NAME_MAX + 48];
    snprintf(name, sizeof name, "%s_scale_inv", t->name);
    const struct st_tensor *s = st_find(ckpt, name);
    if (!s) {
        snprintf(err, err_size,
                 "%s: tensor '%s' is %s (fp8), but its scale '%s' is not in the "
                 "checkpoint",
                 t->file, t->name, st_dtype_name(t->dtype), name);
        return -1;
    }
    if (s->dtype != ST_F32 && s->dtype != ST_BF16 && s->dtype != ST_F16) {
        snprintf(err, err_size, "%s: tensor '%s': dtype %s; an fp8 scale is F32, BF16 or F16",
                 s->file, s->name, st_dtype_name(s->dtype));
        return -1;
    }
    int64_t grid[ST_MAX_RANK];
    const int *B = c->quantization.block;
    for (int k = 0; k < t->rank - 2; k++) grid[k] = t->shape[k];
    grid[t->rank - 2] = (t->shape[t->rank - 2] + B[0] - 1) / B[0];
    grid[t->rank - 1] = (t->shape[t->rank - 1] + B[1] - 1) / B[1];
    if (st_check_shape(s, t->rank, grid, err, err_size) != 0) {
        size_t used = strlen(err);
        snprintf(err + used, err_size - used,
                 " (one scale per block of %s [%lld, %lld] in blocks "
                 "of [%d, %d], quantization_config.weight_block_size of %s/config.json)",
                 t->name, (long long)t->shape[t->rank - 2], (long long)t->shape[t->rank - 1], B[0],
                 B[1], ckpt->dir);
        return -1;
    }
    src->scale = s;
    src->block[0] = B[0];
    src->block[1] = B[1];
    return 0;
}

/* The MXFP4 pair "<fused>_blocks" [E, R, C / 32, 16] and "<fused>_scales" [E, R, C / 32],
 * both u8, of the matrix that dequantises to [E, R, C] (gate_up_proj: R = 2I, C = H;
 * down_proj: R = H, C = I; transformers transposes the last two dims after, esft reads
 * the [R, C] rows as they are). src->tensor = the blocks. Named errors for a missing
 * half, a wrong dtype or shape, or a C that is not whole blocks. */
static int locate_mxfp4(const struct model_config *c, const struct st_checkpoint *ckpt,
                        const char *fused, int64_t R, int64_t C, const char *dims,
                        struct weight_source *src, char *err, size_t err_size)
{
    char blocks_name[PARAM_NAME_MAX + 48], scales_name[PARAM_NAME_MAX + 48];
    snprintf(blocks_name, sizeof blocks_name, "%s_blocks", fused);
    snprintf(scales_name, sizeof scales_name, "%s_scales", fused);
    const struct st_tensor *blocks = st_find(ckpt, blocks_name), *scales = st_find(ckpt, scales_name);
    int64_t E = c->num_experts;
    if (!blocks || !scales) {
        snprintf(err, err_size, "%s: MXFP4 tensor '%s' not found (nor the unquantised '%s'; "
                 "an MXFP4 checkpoint stores each fused expert matrix as _blocks and _scales)",
                 ckpt->dir, blocks ? scales_name : blocks_name, fused);
        return -1;
    }
    if (!c->quantization.mxfp4) {
        snprintf(err, err_size, "%s: tensor '%s' is MXFP4, but %s/config.json has no "
                 "quantization_config with quant_method \"mxfp4\"", blocks->file, blocks_name,
                 ckpt->dir);
        return -1;
    }
    const struct st_tensor *pair[2] = {blocks, scales};
    for (int i = 0; i < 2; i++)
        if (pair[i]->dtype != ST_U8) {
            snprintf(err, err_size, "%s: tensor '%s': dtype %s; MXFP4 %s are U8", pair[i]->file,
                     pair[i]->name, st_dtype_name(pair[i]->dtype), i ? "scales" : "blocks");
            return -1;
        }
    if (C % 32 != 0) {
        snprintf(err, err_size, "%s: tensor '%s': rows of %lld values are not whole MXFP4 "
                 "blocks of 32 (%s of %s/config.json)", blocks->file, blocks_name, (long long)C,
                 dims, ckpt->dir);
        return -1;
    }
    if (st_expect_shape(blocks, err, err_size, E, R, C / 32, 16) != 0 ||
        st_expect_shape(scales, err, err_size, E, R, C / 32) != 0) {
        size_t n = strlen(err);
        snprintf(err + n, err_size - n, " (MXFP4 of the %s matrix of %s/config.json: blocks "
                 "[E, R, C/32, 16], scales [E, R, C/32])", dims, ckpt->dir);
        return -1;
    }
    src->tensor = blocks;
    src->mxfp4_scales = scales;
    return 0;
}

/* A gpt_oss routed expert's entry in transformers' fused layout (GptOssExperts, saved as
 * is by 5.24): mlp.experts.gate_up_proj [E, H, 2I] used as x @ W, gate the even columns
 * and up the odd ones, gate_up_proj_bias [E, 2I] (even / odd likewise), down_proj
 * [E, I, H], down_proj_bias [E, H]; or with MXFP4 the _blocks / _scales pairs of
 * gate_up_proj [E, 2I, H] and down_proj [E, H, I] before transformers' transpose. esft's
 * gate [I, H] is then gate[i][h] = gate_up_proj[e][h][2i], and down [H, I] is
 * down[h][i] = down_proj[e][i][h]. */
static int locate_gpt_oss_expert(const struct model *m, const struct st_checkpoint *ckpt,
                                 const struct param *p, struct weight_source *src, char *err,
                                 size_t err_size)
{
    const struct model_config *c = &m->cfg;
    size_t E = (size_t)c->num_experts, I = (size_t)c->expert_intermediate_size;
    size_t H = (size_t)c->hidden_size, e = (size_t)p->expert;
    bool down = p->part == MLP_DOWN, up = p->part == MLP_UP, bias = p->rank == 1;
    char fused[PARAM_NAME_MAX + 32];
    snprintf(fused, sizeof fused, "model.layers.%d.mlp.experts.%s%s", p->layer,
             down ? "down_proj" : "gate_up_proj", bias ? "_bias" : "");
    const struct st_tensor *t = st_find(ckpt, fused);
    int rc = 0;
    if (bias) {
        if (!t) {
            snprintf(err, err_size, "%s: tensor '%s' not found (nor the fused '%s')", ckpt->dir,
                     p->name, fused);
            return -1;
        }
        rc = down ? st_expect_shape(t, err, err_size, E, H) : st_expect_shape(t, err, err_size, E, 2 * I);
        if (rc != 0) {
            size_t n = strlen(err);
            snprintf(err + n, err_size - n, " (num_local_experts x %s of %s/config.json)",
                     down ? "hidden_size" : "2 * intermediate_size", ckpt->dir);
            return -1;
        }
        src->tensor = t;
        if (down) {
            src->offset = e * H;
        } else { /* gate_up_proj_bias[e][2i (+1)] */
            src->offset = e * 2 * I + (up ? 1 : 0);
            src->cols = I, src->row_stride = 0, src->col_stride = 2;
        }
    } else if (t) {
        rc = down ? st_expect_shape(t, err, err_size, E, I, H)
                  : st_expect_shape(t, err, err_size, E, H, 2 * I);
        if (rc != 0) {
            size_t n = strlen(err);
            snprintf(err + n, err_size - n, " (num_local_experts x %s of %s/config.json)",
                     down ? "intermediate_size x hidden_size" : "hidden_size x 2 * intermediate_size",
                     ckpt->dir);
            return -1;
        }
        src->tensor = t;
        if (down) { /* down[h][i] = down_proj[e][i][h] */
            src->offset = e * I * H;
            src->cols = I, src->row_stride = 1, src->col_stride = H;
        } else { /* gate[i][h] = gate_up_proj[e][h][2i], up: 2i + 1 */
            src->offset = e * H * 2 * I + (up ? 1 : 0);
            src->cols = H, src->row_stride = 2, src->col_stride = 2 * I;
        }
    } else if (down) { /* MXFP4: down_proj dequantises to [E, H, I], esft's [H, I] rows */
        if (locate_mxfp4(c, ckpt, fused, (int64_t)H, (int64_t)I,
                         "num_local_experts x hidden_size x intermediate_size", src, err,
                         err_size) != 0)
            return -1;
        src->offset = e * H * I;
    } else { /* MXFP4: gate_up_proj dequantises to [E, 2I, H]: gate row i is row 2i */
        if (locate_mxfp4(c, ckpt, fused, 2 * (int64_t)I, (int64_t)H,
                         "num_local_experts x 2 * intermediate_size x hidden_size", src, err,
                         err_size) != 0)
            return -1;
        src->offset = e * 2 * I * H + (up ? H : 0);
        src->cols = H, src->row_stride = 2 * H, src->col_stride = 1;
    }
    if (src->mxfp4_scales) return 0;
    if (!is_float_dtype(t->dtype)) {
        snprintf(err, err_size, "%s: tensor '%s': dtype %s is not a floating-point weight%s",
                 t->file, t->name, st_dtype_name(t->dtype),
                 is_fp8_dtype(t->dtype) ? " (fp8 is not read for gpt_oss's fused experts)" : "");
        return -1;
    }
    return 0;
}

/* Where p's weights are in the checkpoint: its own tensor from offset 0, or a routed
 * expert's matrix in the fused spelling (transformers 5 in memory): experts.gate_up_proj
 * [E, 2I, H] (gate rows first, then up) and experts.down_proj [E, H, I]. Checks that the
 * tensor is there, has the shape config.json gives and a floating-point dtype: from the
 * header alone, so before anything is allocated for it. */
static int locate(const struct model *m, const struct st_checkpoint *ckpt, const struct param *p,
                  struct weight_source *src, char *err, size_t err_size)
{
    const struct model_config *c = &m->cfg;
    const struct st_tensor *t = st_find(ckpt, p->name);
    *src = (struct weight_source){.tensor = NULL};
    size_t *offset = &src->offset;
    int rc = 0;
    if (t) {
        rc = p->rank == 2 ? st_expect_shape(t, err, err_size, p->shape[0], p->shape[1])
                          : st_expect_shape(t, err, err_size, p->shape[0]);
        if (rc != 0) {
            size_t n = strlen(err);
            snprintf(err + n, err_size - n, " (%s of %s/config.json)", shape_keys(c, p), ckpt->dir);
        }
    } else if (p->kind == PARAM_EXPERT && c->family == HF_GPT_OSS) {
        return locate_gpt_oss_expert(m, ckpt, p, src, err, err_size);
    } else if (p->kind == PARAM_EXPERT) {
        int64_t E = c->num_experts, I = c->expert_intermediate_size, H = c->hidden_size;
        char name[PARAM_NAME_MAX + 32];
        bool down = p->part == MLP_DOWN;
        snprintf(name, sizeof name, "model.layers.%d.%s.experts.%s", p->layer, model_moe_module(c),
                 down ? "down_proj" : "gate_up_proj");
        t = st_find(ckpt, name);
        if (!t) {
            snprintf(err, err_size, "%s: tensor '%s' not found (nor the fused '%s')", ckpt->dir,
                     p->name, name);
            return -1;
        }
        rc = down ? st_expect_shape(t, err, err_size, E, H, I)
                  : st_expect_shape(t, err, err_size, E, 2 * I, H);
        if (rc != 0) {
            const char *experts = hfconfig_experts_key(c), *width = hfconfig_expert_width_key(c);
            size_t n = strlen(err);
            if (down)
                snprintf(err + n, err_size - n, " (%s x hidden_size x %s of %s/config.json)",
                         experts, width, ckpt->dir);
            else
                snprintf(err + n, err_size - n, " (%s x 2 * %s x hidden_size of %s/config.json)",
                         experts, width, ckpt->dir);
        }
        *offset = (size_t)p->expert * (size_t)(down ? H * I : 2 * I * H);
        if (p->part == MLP_UP) *offset += (size_t)(I * H);
    } else {
        snprintf(err, err_size, "%s: tensor '%s' not found in the checkpoint", ckpt->dir, p->name);
        return -1;
    }
    if (rc != 0) return -1;
    src->tensor = t;
    if (is_fp8_dtype(t->dtype)) return locate_scale(c, ckpt, p, src, err, err_size);
    if (!is_float_dtype(t->dtype)) {
        snprintf(err, err_size, "%s: tensor '%s': dtype %s is not a floating-point weight", t->file,
                 t->name, st_dtype_name(t->dtype));
        return -1;
    }
    return 0;
}

int model_check_checkpoint(const struct model_config *cfg, const struct layout_grid *grid,
                           struct layout_coords coords, const char *dir, char *err, size_t err_size)
{
    struct st_checkpoint *ckpt = st_checkpoint_open(dir, err, err_size);
    if (!ckpt) return -1;
    struct model m;
    model_table(&m, cfg, grid, coords);
    int rc = 0;
    for (int i = 0; i < m.n_params && rc == 0; i++) {
        struct weight_source src;
        if (model_holds(&m.params[i], coords)) rc = locate(&m, ckpt, &m.params[i], &src, err, err_size);
    }
    model_free(&m);
    st_checkpoint_close(ckpt);
    return rc;
}

/* Logs the tensors of decoder layers past num_hidden_layers: the multi-token-prediction
 * layers deepseek_v3 and glm4_moe checkpoints carry (GLM-4.5: model.layers.92.*), which
 * transformers does not build and esft does not read. */
static void log_unused_layers(const struct model_config *c, const struct st_checkpoint *ckpt)
{
    int count = 0, lowest = -1, highest = -1;
    for (int i = 0; i < ckpt->n_tensors; i++) {
        int layer;
        if (sscanf(ckpt->tensors[i].name, "model.layers.%d.", &layer) != 1 || layer < c->num_layers)
            continue;
        count++;
        if (lowest < 0 || layer < lowest) lowest = layer;
        if (layer > highest) highest = layer;
    }
    if (count == 0) return;
    log_info("model: %d tensors of layer%s %d%s%.0d past num_hidden_layers %d are not used "
             "(multi-token prediction, num_nextn_predict_layers %d: transformers ignores them too)",
             count, highest > lowest ? "s" : "", lowest, highest > lowest ? "-" : "",
             highest > lowest ? highest : 0, c->num_layers, c->num_mtp_layers);
}

int model_load(struct model *m, const char *dir, char *err, size_t err_size)
{
    struct st_checkpoint *ckpt = st_checkpoint_open(dir, err, err_size);
    if (!ckpt) return -1;
    log_unused_layers(&m->cfg, ckpt);
    free(m->checkpoint_dir);
    m->checkpoint_dir = xstrdup(dir);
    /* a tensor held as bf16 is read in fp32 into one buffer, then rounded */
    size_t widest = 0;
    for (int i = 0; i < m->n_params; i++)
        if (m->params[i].data_bf16 && m->params[i].numel > widest) widest = m->params[i].numel;
    float *values = widest ? xmalloc(widest * sizeof(float)) : NULL;
    int rc = 0, dequantised = 0;
    for (int i = 0; i < m->n_params && rc == 0; i++) {
        const struct param *p = &m->params[i];
        struct weight_source src;
        if (!param_held(p) || p->kind == PARAM_LORA) continue; /* adapters: not in the base */
        rc = locate(m, ckpt, p, &src, err, err_size);
        if (rc == 0) rc = read_range_f32(&src, p->numel, p->data ? p->data : values, err, err_size);
        if (rc == 0 && p->data_bf16) st_f32_to_bf16_array(values, p->data_bf16, p->numel);
        dequantised += rc == 0 && src.scale;
    }
    free(values);
    if (rc == 0 && dequantised > 0)
        log_info("model: %d fp8 tensors dequantised to fp32 (rank 0's; blocks of [%d, %d], "
                 "quantization_config of %s/config.json)",
                 dequantised, m->cfg.quantization.block[0], m->cfg.quantization.block[1], dir);
    st_checkpoint_close(ckpt);
    return rc;
}

struct st_checkpoint *model_open_original(const struct model *m, char *err, size_t err_size)
{
    if (!m->checkpoint_dir) {
        snprintf(err, err_size, "the model was not loaded from a checkpoint");
        return NULL;
    }
    return st_checkpoint_open(m->checkpoint_dir, err, err_size);
}

int model_read_original(const struct model *m, const struct st_checkpoint *ckpt,
                        const struct param *p, float *out, char *err, size_t err_size)
{
    struct weight_source src;
    int rc = locate(m, ckpt, p, &src, err, err_size);
    if (rc == 0) rc = read_range_f32(&src, p->numel, out, err, err_size);
    return rc;
}

/* ---- adapters ------------------------------------------------------------------------ */

/* Why an adapter tensor is not the model's, when the file is another kind of adapter:
 * PEFT's (keys base_model.model.*), or the ESFT reference's layout (esft_reference/, keys
 * without "model."). */
static const char *adapter_hint(struct model *m, const char *name)
{
    if (strncmp(name, "base_model.model.", 17) == 0)
        return "; this is a LoRA adapter in PEFT's format (adapter_model.safetensors), not an "
               "ESFT adapter: its merged model is train.export_merged's";
    char prefixed[PARAM_NAME_MAX + 8];
    snprintf(prefixed, sizeof prefixed, "model.%s", name);
    if (model_find_param(m, prefixed))
        return "; this is the ESFT reference's layout (esft_reference/adapter.safetensors, "
               "names without \"model.\"): give the adapter.safetensors beside esft_reference/";
    return "";
}

/* The parameter an adapter tensor replaces, after checking its name, shape and dtype;
 * NULL with a message. */
static struct param *adapter_target(struct model *m, const char *path, const struct st_tensor *t,
                                    char *err, size_t err_size)
{
    struct param *p = model_find_param(m, t->name);
    if (!p || p->kind == PARAM_LORA) {
        snprintf(err, err_size, "%s: tensor '%s' is not a tensor of the model (%s)%s", path,
                 t->name, m->cfg.model_type, adapter_hint(m, t->name));
        return NULL;
    }
    bool same = t->rank == p->rank && t->shape[0] == p->shape[0] &&
                (p->rank == 1 || t->shape[1] == p->shape[1]);
    if (!same) {
        snprintf(err, err_size, "%s: tensor '%s' has shape [%lld%s%lld], the model's is "
                 "[%lld%s%lld]", path, t->name, (long long)t->shape[0], t->rank > 1 ? ", " : "",
                 t->rank > 1 ? (long long)t->shape[1] : 0LL, (long long)p->shape[0],
                 p->rank > 1 ? ", " : "", p->rank > 1 ? (long long)p->shape[1] : 0LL);
        return NULL;
    }
    if (!is_float_dtype(t->dtype)) {
        snprintf(err, err_size, "%s: tensor '%s': dtype %s is not a floating-point weight%s",
                 path, t->name, st_dtype_name(t->dtype),
                 is_fp8_dtype(t->dtype) ? " (an adapter is written in bf16, f16 or f32)" : "");
        return NULL;
    }
    return p;
}

static int check_adapter_file(struct model *m, const struct st_file *file, char *err,
                              size_t err_size)
{
    if (file->n_tensors == 0) {
        snprintf(err, err_size, "%s: the adapter holds no tensor", file->path);
        return -1;
    }
    for (int i = 0; i < file->n_tensors; i++)
        if (!adapter_target(m, file->path, &file->tensors[i], err, err_size)) return -1;
    return 0;
}

int model_check_adapter(struct model *m, const char *path, int *n_tensors, char *err,
                        size_t err_size)
{
    struct st_file *file = st_open(path, err, err_size);
    if (!file) return -1;
    int rc = check_adapter_file(m, file, err, err_size);
    *n_tensors = file->n_tensors;
    st_close(file);
    return rc;
}

int model_apply_adapter(struct model *m, const char *path, int *n_tensors, char *err,
                        size_t err_size)
{
    struct st_file *file = st_open(path, err, err_size);
    if (!file) return -1;
    int rc = check_adapter_file(m, file, err, err_size);
    *n_tensors = file->n_tensors;
    for (int i = 0; i < file->n_tensors && rc == 0; i++) {
        const struct st_tensor *t = &file->tensors[i];
        struct param *p = model_find_param(m, t->name);
        if (p->data) rc = st_read_f32(t, p->data, p->numel, err, err_size);
        if (p->data_bf16) { /* held as bf16 (model.frozen_weights): rounded as the base was */
            float *values = xmalloc(p->numel * sizeof(float));
            rc = st_read_f32(t, values, p->numel, err, err_size);
            if (rc == 0) st_f32_to_bf16_array(values, p->data_bf16, p->numel);
            free(values);
        }
    }
    st_close(file);
    return rc;
}
