/* c2r: collaboration-constrained routing (C2R) and the expert placement that goes with it,
 * for the select, score, train and eval phases (shared/reference/esft-semantics.md,
 * sections 1 and 5).
 *
 * Collaborative lists. From the score phase's co-activation counts coact[l][i][j]
 * (tokens whose top-k holds both i and j), CL[l][e] is every other expert by descending
 * coact[l][e][*], ties to the lower id; C2R keeps its first T (top_t). select writes them
 * (select.c2r_top_t) as c2r_config.json in run.output_dir: the model's config.json, every
 * key kept, plus
 *   "top_t": T,
 *   "collaborative_list": [one entry per decoder layer: [] for a dense layer, else E lists
 *                          of T expert ids, list e being expert e's collaborators]
 *
 * Routing (model.routing: c2r): the first expert is the router's own first choice (argmax
 * of its selection score); the other k-1 are the best of that expert's T collaborators by
 * the same score; the weights follow the family's rule over the chosen k (backend.h's
 * struct router_params, moe_math.h's router_select_c2r_row). The router's backward needs
 * only the chosen ids, so it is the family's own.
 *
 * Placement (parallel.expert_placement: c2r). Greedy, per MoE layer, into ep groups of
 * E/ep experts: take the expert pairs by descending coact (ties to the lower pair); two
 * unplaced experts open a new group together while fewer than ep groups are open, else
 * join the first group with room for both; an unplaced expert joins its placed partner's
 * group while that group has room; pairs of two placed experts are skipped. Experts still unplaced
 * then fill the groups with room in id order. Group g is EP rank g. What it saves: a token whose
 * experts live on D distinct EP ranks needs one copy of its row per remote rank when rows are sent
 * once per destination (C2R's scheme); from a source rank drawn uniformly, D (1 - 1/ep) remote
 * copies on average. esft's exchange sends one row per (token, expert) slot, K (1 - 1/ep) on
 * average whatever the placement. */
#ifndef ESFT_C2R_H
#define ESFT_C2R_H

#include <stddef.h>
#include <stdint.h>

#include "deck.h"
#include "hfconfig.h"
#include "stats.h"

struct model;

#define C2R_CONFIG_NAME "c2r_config.json" /* what select writes, in run.output_dir */

/* Every decoder layer's lists, as c2r_config.json holds them. */
struct c2r_lists {
    int top_t, num_layers, num_experts;
    int32_t *collaborators; /* [num_layers, E, top_t]; a dense layer's rows are -1 */
};

/* One layer's lists [E, T] from its counts coact [E, E] (T <= E - 1). */
void c2r_layer_lists(const uint64_t *coact, int E, int T, int32_t *lists);

/* c2r_config.json at path (through path.tmp): config.json of model_dir plus top_t and the
 * lists of the summed co-activation counts of n_stats statistics files of that model.
 * 0, or -1 with a message (a file without /totals/coact, T out of [1, E - 1], a write
 * error). */
int c2r_write_config(const char *path, const char *model_dir,
                     const struct routing_stats *const *stats, const char *const *stats_paths,
                     int n_stats, int T, char *err, size_t err_size);

/* Reads and checks path against the model cfg: top_t in [max(1, K - 1), E - 1], one entry
 * per decoder layer, each MoE layer's E lists of T distinct ids in [0, E) without the
 * expert itself. 0, or -1 with a message naming the file and the entry. */
int c2r_read_config(const char *path, const struct model_config *cfg, struct c2r_lists *lists,
                    char *err, size_t err_size);
void c2r_lists_free(struct c2r_lists *lists);

/* The model routes by C2R from now on: the lists copied to its backend (after
 * model_attach). */
void c2r_attach(struct model *m, const struct c2r_lists *lists);

/* What a phase does with model.routing and parallel.expert_placement after model_attach:
 * with routing c2r, reads model.c2r_config and attaches it (ending every rank with a
 * message on a bad file); refuses
 * expert_placement c2r when refuse_placement (train, eval). */
void c2r_phase_setup(const struct deck *deck, struct model *m, const char *phase,
                     int refuse_placement);

/* rank_of_expert [E]: experts [r E/ep, (r+1) E/ep) on rank r. */
void c2r_placement_contiguous(int E, int ep, int32_t *rank_of_expert);
/* rank_of_expert [E]: the greedy placement above from one layer's coact [E, E]. */
void c2r_placement_greedy(const uint64_t *coact, int E, int ep, int32_t *rank_of_expert);
/* The sum over N tokens of the distinct ranks among each token's K experts ids [N, K]. */
uint64_t c2r_destinations(const int32_t *ids, int N, int K, const int32_t *rank_of_expert);

/* The score phase's report for parallel.expert_placement: c2r. Each rank keeps the routing
 * of the tokens it scores (c2r_kept_add, per MoE layer; K int32 per token per layer),
 * then c2r_placement_report (collective over MPI_COMM_WORLD; coact [Lm, E, E] complete on
 * world rank 0) computes each layer's greedy placement for the deck's parallel.ep on rank
 * 0, counts every kept token's destination ranks under it and under the contiguous
 * placement, logs the all-to-all bytes of a training step under each (train.global_batch
 * x data.seq_len tokens, rows of H fp32, dispatch and combine in the forward and the
 * backward) and writes the placement to run.output_dir/expert_placement.json:
 *   {"ep": ep, "placement": "c2r", "rank_of_expert": [per decoder layer: [] or E ranks]} */
struct c2r_kept {
    int n_moe_layers, top_k;
    int32_t **ids;  /* [Lm] -> [tokens, K] */
    size_t *tokens; /* [Lm] */
    size_t *capacity;
};
void c2r_kept_init(struct c2r_kept *kept, int n_moe_layers, int top_k);
void c2r_kept_add(struct c2r_kept *kept, int m, const int32_t *ids, int N);
void c2r_kept_free(struct c2r_kept *kept);
struct layout;
void c2r_placement_report(const struct deck *deck, const struct layout *layout,
                          const struct model_config *cfg, const int32_t *moe_layers,
                          const uint64_t *coact, const struct c2r_kept *kept);

#endif
