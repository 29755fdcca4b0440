/* gpt_oss_layout: esft's per-expert gpt_oss tensors -> transformers' fused expert layout,
 * for the writers of whole checkpoints (init's write_checkpoint, export_merged).
 *
 * transformers 5.24 (models/gpt_oss/modeling_gpt_oss.py, GptOssExperts) holds a layer's
 * routed experts as four tensors, used as x @ W:
 *   mlp.experts.gate_up_proj      [E, H, 2I]  gate the even columns, up the odd ones
 *   mlp.experts.gate_up_proj_bias [E, 2I]     even / odd likewise
 *   mlp.experts.down_proj         [E, I, H]
 *   mlp.experts.down_proj_bias    [E, H]
 * esft's parameter table holds expert e's gate_proj.weight [I, H], up_proj.weight [I, H],
 * down_proj.weight [H, I] and their biases [I], [I], [H] (model.h); the loader reads the
 * fused tensors back through strided views (model.c, locate_gpt_oss_expert). So
 *   gate_up_proj[e][h][2i] = gate[i][h],  gate_up_proj[e][h][2i+1] = up[i][h],
 *   down_proj[e][i][h] = down[h][i].
 *
 * The tensors may arrive in any order: the fuser collects a layer's per-expert tensors
 * into fp32 buffers and hands the four fused tensors to a sink once the layer's last one
 * has arrived; the sliced fuser (export_merged's, where each EP rank writes its own
 * experts' values at their offsets in the shared file) hands over each expert's rows of
 * them instead, as soon as they are complete (an expert's tensors are all on one rank),
 * and a rank's sliced fuser sees only its own experts. */
#ifndef ESFT_GPT_OSS_LAYOUT_H
#define ESFT_GPT_OSS_LAYOUT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "hfconfig.h"
#include "model.h"

/* Receives one fused tensor (fp32, row-major, `numel` values) of one layer; data is only
 * valid during the call (NULL from gpt_oss_fuser_list). 0, or -1 with a message. */
typedef int (*gpt_oss_fused_sink)(const char *name, int rank, const int64_t *shape,
                                  const float *data, size_t numel, void *context, char *err,
                                  size_t err_size);

struct gpt_oss_fuser;

/* A fuser for cfg's layers (cfg->family must be HF_GPT_OSS); nothing is allocated per
 * layer until its first tensor arrives. */
struct gpt_oss_fuser *gpt_oss_fuser_new(const struct model_config *cfg, gpt_oss_fused_sink sink,
                                        void *context);
void gpt_oss_fuser_free(struct gpt_oss_fuser *fuser);

/* Receives expert e's part of one fused tensor: its values [first, first + count) (fp32,
 * the fused tensor's row-major order; data valid during the call). 0, or -1 + message. */
typedef int (*gpt_oss_slice_sink)(const char *name, size_t first, const float *data, size_t count,
                                  void *context, char *err, size_t err_size);

/* A fuser that hands each expert's part of the fused tensors to sink as soon as it is
 * complete (its gate and up both arrived: they interleave), rather than whole layers:
 * it holds one expert's rows at most, for a writer that places values at their offsets
 * (the merged export). gpt_oss_fuser_list still names the whole fused tensors. */
struct gpt_oss_fuser *gpt_oss_fuser_new_sliced(const struct model_config *cfg,
                                               gpt_oss_slice_sink sink, void *context);

/* Whether the fuser takes p (a routed expert's matrix or bias of a gpt_oss model). */
bool gpt_oss_fuser_takes(const struct gpt_oss_fuser *fuser, const struct param *p);

/* Places p's values (data: p's shape, fp32) in its layer's fused tensors; after the
 * layer's last expert tensor, hands the four fused tensors to the sink and frees the
 * layer's buffers. 0, or -1 with a message (a tensor given twice, the sink's failure). */
int gpt_oss_fuser_take(struct gpt_oss_fuser *fuser, const struct param *p, const float *data,
                       char *err, size_t err_size);

/* Every fused tensor the fuser will hand over, in turn, to sink with data NULL: their
 * names and shapes, known before any tensor arrives (a writer that places each tensor in
 * its file as it comes declares them first). 0, or the sink's -1. */
int gpt_oss_fuser_list(const struct gpt_oss_fuser *fuser, gpt_oss_fused_sink sink, void *context,
                       char *err, size_t err_size);

/* 0 when every layer's fused tensors were handed over; -1 naming the first layer that
 * still misses expert tensors. (Not for a sliced fuser that sees one rank's experts:
 * the merged export checks instead that the ranks together wrote every byte.) */
int gpt_oss_fuser_finish(const struct gpt_oss_fuser *fuser, char *err, size_t err_size);

/* The values the fused tensors of every layer hold (as many as the per-expert entries
 * they replace). */
size_t gpt_oss_fused_numel(const struct model_config *cfg);

#endif
