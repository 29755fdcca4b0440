/* deck: the YAML input deck read into struct deck (see deck.h), for main and every phase.
 *
 * The schema table below is the one description of every key. Reading the file,
 * command-line overrides, defaults, the --dry-run printout (deck_print) and --help-deck
 * (deck_print_keys) all walk it. Defaults are written in deck syntax and go through the
 * same value parser as the file, so a default cannot be something the file could not say.
 *
 * The YAML text is read with libyaml's event parser into a small tree of nodes that keep
 * their position; walking that tree against the schema lets every error name
 * FILE:LINE:COL and the dotted key, and lets us collect every error rather than stop at
 * the first. libyaml marks are 0-based; messages are 1-based. */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif
#include "deck.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <yaml.h>

#include "hfconfig.h"
#include "log.h"

/* ---------------------------------------------------------------------------------- */
/* Names of enumerated values, in enum order (the index is the enum value).           */

static const char *const phase_names[] = {"init",  "prepare", "score", "select",
                                          "train", "eval",    NULL};
static const char *const backend_names[] = {"auto", "cpu", "cuda", "cpu-devsim", NULL};
static const char *const dtype_names[] = {"auto", "fp32", "bf16", "fp16", NULL};
static const char *const compute_names[] = {"auto", "fp32", "bf16", "fp16", "tf32", NULL};
static const char *const family_names[] = {"qwen2_moe",   "qwen3_moe",   "olmoe",
                                           "mixtral",     "deepseek_v2", "deepseek_v3",
                                           "glm4_moe",    "gpt_oss",     NULL};
static const char *const score_tokens_names[] = {"all", "loss", NULL};
static const char *const score_function_names[] = {"token", "gate", NULL};
static const char *const method_names[] = {"esft", "full",       "frozen_router",
                                           "lora", "densemixer", NULL};
static const char *const lr_schedule_names[] = {"constant", "linear", "cosine", NULL};
static const char *const bad_rows_names[] = {"abort", "skip", NULL};
static const char *const prepare_format_names[] = {"template", "esft_reference", NULL};
static const char *const bad_steps_names[] = {"stop", "skip", NULL};
static const char *const frozen_weights_names[] = {"fp32", "bf16", NULL};
static const char *const routing_names[] = {"topk", "c2r", NULL};
static const char *const placement_names[] = {"contiguous", "c2r", NULL};
static const char *const eval_split_names[] = {"all", "validation", NULL};

#define N_NAMES(array) (sizeof(array) / sizeof((array)[0]) - 1)
_Static_assert(N_NAMES(phase_names) == PHASE_COUNT, "phase names");
_Static_assert(N_NAMES(backend_names) == BACKEND_DEVSIM + 1, "backend names");
_Static_assert(N_NAMES(dtype_names) == DTYPE_FP16 + 1, "dtype names");
_Static_assert(N_NAMES(compute_names) == DTYPE_TF32 + 1, "compute dtype names");
_Static_assert(N_NAMES(frozen_weights_names) == FROZEN_BF16 + 1, "frozen weight dtype names");
_Static_assert(N_NAMES(routing_names) == ROUTING_C2R + 1, "routing names");
_Static_assert(N_NAMES(placement_names) == PLACEMENT_C2R + 1, "placement names");
_Static_assert(N_NAMES(score_tokens_names) == SCORE_TOKENS_LOSS + 1, "score.tokens names");
_Static_assert(N_NAMES(score_function_names) == SCORE_FUNCTION_GATE + 1, "score function names");
_Static_assert(N_NAMES(method_names) == METHOD_DENSEMIXER + 1, "method names");
_Static_assert(N_NAMES(lr_schedule_names) == LR_COSINE + 1, "lr schedule names");
_Static_assert(N_NAMES(bad_rows_names) == BAD_ROWS_SKIP + 1, "bad_rows names");
_Static_assert(N_NAMES(prepare_format_names) == FORMAT_ESFT_REFERENCE + 1, "format names");
_Static_assert(N_NAMES(bad_steps_names) == BAD_STEPS_SKIP + 1, "bad_steps names");
_Static_assert(N_NAMES(eval_split_names) == EVAL_SPLIT_VALIDATION + 1, "eval.split names");
/* Enum fields are written through an int pointer. */
_Static_assert(sizeof(enum train_method) == sizeof(int), "enum size");
_Static_assert(sizeof(enum phase) == sizeof(int), "enum size");

const char *phase_name(enum phase phase)
{
    return (unsigned)phase < PHASE_COUNT ? phase_names[phase] : "?";
}

/* ---------------------------------------------------------------------------------- */
/* The schema.                                                                        */

enum key_type {
    KEY_STRING, /* any non-empty text; keys without a default may be unset (~) */
    KEY_CHOICE, /* a string that must be one of `names` */
    KEY_INT,    /* int */
    KEY_INT64,  /* long long */
    KEY_DOUBLE, /* finite double */
    KEY_BOOL,   /* true/false, yes/no, on/off */
    KEY_ENUM,   /* an enum field; the value is the index in `names` */
    KEY_LIST,   /* char *[DECK_MAX_LIST] plus an int count */
    KEY_PHASES, /* the top-level `phase`: enum phase[PHASE_COUNT] plus a count */
};

/* Bounds of numeric keys. An open bound excludes its value (top_p in (0, 1]). */
enum { LO = 1, LO_OPEN = 2, HI = 4, HI_OPEN = 8 };

struct key {
    const char *path; /* "section.key", or "phase" */
    enum key_type type;
    size_t offset;            /* of the field in struct deck */
    size_t count_offset;      /* lists: of the int holding the entry count */
    const char *def;          /* default in deck syntax; NULL: unset, or an empty list */
    const char *const *names; /* KEY_ENUM, KEY_CHOICE, KEY_PHASES */
    unsigned bounds;
    double lo, hi;
    unsigned required_by; /* phases (bit 1 << phase) that need this key set */
    unsigned also_read_by; /* phases beyond its section's read_by that read it (sweep.c) */
    bool (*required_if)(const struct deck *deck); /* narrows required_by; NULL: always */
    const char *required_why;                     /* the condition, for the message */
    const char *help;
};

#define KEY(path_, type_, field)                                                                   \
    .path = (path_), .type = (type_), .offset = offsetof(struct deck, field)
#define COUNT(field) .count_offset = offsetof(struct deck, field)
#define BY(phase) (1u << PHASE_##phase)

static bool phase_listed(const struct deck *deck, enum phase phase)
{
    for (int i = 0; i < deck->n_phases; i++)
        if (deck->phases[i] == phase) return true;
    return false;
}

bool deck_lora_selects_experts(const struct deck *deck)
{
    if (deck->train.method != METHOD_LORA) return false;
    for (int i = 0; i < deck->train.n_lora_targets; i++)
        if (strcmp(deck->train.lora_targets[i], "selected") == 0) return true;
    return false;
}

/* train.expert_config is needed by method esft, unless select runs in the same deck:
 * then it defaults to select's output (deck_finish fills it in). */
static bool method_is_esft(const struct deck *deck)
{
    return deck->train.method == METHOD_ESFT && !phase_listed(deck, PHASE_SELECT);
}

/* model.c2r_config is needed by C2R routing, unless select runs in the same deck: then
 * it defaults to the C2R configuration select writes (deck_finish fills it in). */
static bool routing_is_c2r(const struct deck *deck)
{
    return deck->model.routing == ROUTING_C2R && !phase_listed(deck, PHASE_SELECT);
}

static const struct key schema[] = {
    {KEY("phase", KEY_PHASES, phases), COUNT(n_phases), .names = phase_names,
     .help = "phase or list of phases to run, in order (required)"},

    /* run */
    {KEY("run.name", KEY_STRING, run.name), .def = "esft",
     .also_read_by = BY(INIT) | BY(PREPARE) | BY(SCORE) | BY(SELECT) | BY(TRAIN) | BY(EVAL),
     .help = "run name, used in file names and log lines"},
    {KEY("run.output_dir", KEY_STRING, run.output_dir), .def = "out/{name}",
     .also_read_by = BY(INIT) | BY(PREPARE) | BY(SCORE) | BY(SELECT) | BY(TRAIN) | BY(EVAL),
     .help = "directory for every file the run writes; {name} stands for run.name"},
    {KEY("run.seed", KEY_INT64, run.seed), .def = "5934875", .bounds = LO, .lo = 0,
     .also_read_by = BY(INIT) | BY(SCORE) | BY(SELECT) | BY(TRAIN) | BY(EVAL),
     .help = "seed of every random choice (init, sampling, shuffling); ESFT reference value"},
    {KEY("run.backend", KEY_ENUM, run.backend), .def = "auto", .names = backend_names,
     .also_read_by = BY(SCORE) | BY(TRAIN) | BY(EVAL),
     .help = "compute backend: cpu, cuda (one GPU per rank), cpu-devsim (the CPU ops on "
             "buffers the host cannot read: a test of the GPU path without a GPU); auto: "
             "the ESFT_BACKEND environment variable if set, else cpu"},

    /* model */
    {KEY("model.path", KEY_STRING, model.path),
     .required_by = BY(INIT) | BY(SCORE) | BY(TRAIN) | BY(EVAL),
     .also_read_by = BY(INIT) | BY(PREPARE) | BY(SELECT),
     .help = "Hugging Face checkpoint directory (read; the init phase writes it)"},
    {KEY("model.dtype", KEY_ENUM, model.dtype), .def = "auto", .names = compute_names,
     .help = "compute dtype: fp32 (auto); with run.backend cuda also tf32 (fp32 weights and "
             "activations, products on the TF32 tensor cores) or bf16 (GEMMs against frozen "
             "weights on bf16 operands, the rest tf32; fp32 weights, activations and sums); "
             "fp16 is not implemented"},
    {KEY("model.frozen_weights", KEY_ENUM, model.frozen_weights), .def = "fp32",
     .names = frozen_weights_names,
     .help = "how the frozen weight matrices are held (score, train, eval; every backend): fp32, "
             "or bf16 (half their memory: attention, expert, shared and dense MLP matrices and an "
             "untied lm_head that do not train are rounded to bf16 and multiplied as such with "
             "fp32 sums, against fp32 activations on the CPU and bf16-rounded ones on cuda; "
             "norms, biases, routers, the embedding and trainable tensors stay fp32)"},

    {KEY("model.routing", KEY_ENUM, model.routing), .def = "topk", .names = routing_names,
     .help = "how the routers choose (score, train, eval): topk (the family's own), or c2r "
             "(collaboration-constrained: the first expert by the router, the other k-1 among "
             "its top-T collaborators of model.c2r_config)"},
    {KEY("model.c2r_config", KEY_STRING, model.c2r_config),
     .required_by = BY(SCORE) | BY(TRAIN) | BY(EVAL), .required_if = routing_is_c2r,
     .required_why = "model.routing c2r",
     .help = "config.json holding C2R's top_t and collaborative_list (select writes one with "
             "select.c2r_top_t); default with select in the phase list: select's"},

    /* data */
    {KEY("data.path", KEY_STRING, data.path), .required_by = BY(SCORE) | BY(TRAIN) | BY(EVAL),
     .help = "token dataset (HDF5, written by the prepare phase)"},
    {KEY("data.seq_len", KEY_INT, data.seq_len), .def = "4096", .bounds = LO, .lo = 1,
     .help = "tokens per packed block"},
    {KEY("data.pack", KEY_BOOL, data.pack), .def = "true",
     .help = "pack samples into blocks with per-sample attention masks and position restarts"},

    /* parallel (dp is derived from the world size, so it is not a key) */
    {KEY("parallel.pp", KEY_INT, parallel.pp), .def = "1", .bounds = LO, .lo = 1,
     .help = "pipeline stages"},
    {KEY("parallel.ep", KEY_INT, parallel.ep), .def = "1", .bounds = LO, .lo = 1,
     .help = "expert-parallel group size (ranks sharing one layer's experts)"},
    {KEY("parallel.stage_layers", KEY_LIST, parallel.stage_layers), COUNT(parallel.n_stage_layers),
     .help = "decoder layers of each pipeline stage, e.g. [13, 11]; empty: balanced by cost"},
    {KEY("parallel.expert_placement", KEY_ENUM, parallel.expert_placement), .def = "contiguous",
     .names = placement_names,
     .help = "which EP rank holds which expert: contiguous blocks; c2r (score only: the "
             "placement from the co-activation counts and the all-to-all bytes it would save "
             "are reported, the exchange itself stays contiguous; train and eval refuse it)"},

    /* init: the random model the init phase writes */
    {KEY("init.family", KEY_CHOICE, init.family), .def = "qwen3_moe", .names = family_names,
     .help = "model family (architecture and tensor names)"},
    {KEY("init.hidden_size", KEY_INT, init.hidden_size), .def = "64", .bounds = LO | HI, .lo = 1,
     .hi = HFCONFIG_MAX_HIDDEN, .help = "hidden size H"},
    {KEY("init.num_layers", KEY_INT, init.num_layers), .def = "2", .bounds = LO | HI, .lo = 1,
     .hi = HFCONFIG_MAX_LAYERS, .help = "decoder layers"},
    {KEY("init.num_heads", KEY_INT, init.num_heads), .def = "4", .bounds = LO | HI, .lo = 1,
     .hi = HFCONFIG_MAX_HEADS, .help = "attention (query) heads"},
    {KEY("init.num_kv_heads", KEY_INT, init.num_kv_heads), .def = "2", .bounds = LO | HI, .lo = 1,
     .hi = HFCONFIG_MAX_HEADS,
     .help = "key/value heads (grouped-query attention); must divide num_heads"},
    {KEY("init.head_dim", KEY_INT, init.head_dim), .def = "16", .bounds = LO | HI, .lo = 2,
     .hi = HFCONFIG_MAX_HEAD_DIM, .help = "width of one attention head (even, for RoPE)"},
    {KEY("init.vocab_size", KEY_INT, init.vocab_size), .def = "320", .bounds = LO | HI, .lo = 1,
     .hi = HFCONFIG_MAX_VOCAB,
     .help = "vocabulary size (the byte tokenizer needs 256 plus its special tokens)"},
    {KEY("init.intermediate_size", KEY_INT, init.intermediate_size), .def = "128",
     .bounds = LO | HI, .lo = 1, .hi = HFCONFIG_MAX_INTERMEDIATE,
     .help = "dense MLP width (and the expert width of mixtral, olmoe and gpt_oss)"},
    {KEY("init.moe_intermediate_size", KEY_INT, init.moe_intermediate_size), .def = "32",
     .bounds = LO | HI, .lo = 1, .hi = HFCONFIG_MAX_INTERMEDIATE,
     .help = "expert width (qwen, deepseek and glm families)"},
    {KEY("init.n_shared_experts", KEY_INT, init.n_shared_experts), .def = "1", .bounds = LO | HI,
     .lo = 0, .hi = 64, .help = "shared experts, each moe_intermediate_size wide (deepseek, glm)"},
    {KEY("init.first_k_dense_replace", KEY_INT, init.first_k_dense_replace), .def = "1",
     .bounds = LO | HI, .lo = 0, .hi = HFCONFIG_MAX_LAYERS,
     .help = "leading dense (non-MoE) layers (deepseek, glm)"},
    {KEY("init.n_group", KEY_INT, init.n_group), .def = "1", .bounds = LO | HI, .lo = 1,
     .hi = HFCONFIG_MAX_EXPERTS,
     .help = "expert groups of the router (deepseek, glm; deepseek_v2 with more than 1: "
             "group_limited_greedy)"},
    {KEY("init.topk_group", KEY_INT, init.topk_group), .def = "1", .bounds = LO | HI, .lo = 1,
     .hi = HFCONFIG_MAX_EXPERTS, .help = "groups a token may route to (at most n_group)"},
    {KEY("init.routed_scaling_factor", KEY_DOUBLE, init.routed_scaling_factor), .def = "1",
     .bounds = LO | LO_OPEN, .lo = 0,
     .help = "factor on the routed experts' weights (deepseek, glm)"},
    {KEY("init.kv_lora_rank", KEY_INT, init.kv_lora_rank), .def = "32", .bounds = LO | HI, .lo = 1,
     .hi = HFCONFIG_MAX_HIDDEN, .help = "compressed key-value width (deepseek MLA)"},
    {KEY("init.q_lora_rank", KEY_INT, init.q_lora_rank), .def = "0", .bounds = LO | HI, .lo = 0,
     .hi = HFCONFIG_MAX_HIDDEN, .help = "compressed query width (deepseek MLA); 0: a plain q_proj"},
    {KEY("init.qk_nope_head_dim", KEY_INT, init.qk_nope_head_dim), .def = "16", .bounds = LO | HI,
     .lo = 0, .hi = HFCONFIG_MAX_HEAD_DIM, .help = "query/key width without RoPE (deepseek MLA)"},
    {KEY("init.qk_rope_head_dim", KEY_INT, init.qk_rope_head_dim), .def = "8", .bounds = LO | HI,
     .lo = 2, .hi = HFCONFIG_MAX_HEAD_DIM,
     .help = "query/key width with RoPE (deepseek MLA; even)"},
    {KEY("init.v_head_dim", KEY_INT, init.v_head_dim), .def = "16", .bounds = LO | HI, .lo = 1,
     .hi = HFCONFIG_MAX_HEAD_DIM, .help = "value width per head (deepseek MLA)"},
    {KEY("init.shared_expert_intermediate_size", KEY_INT, init.shared_expert_intermediate_size),
     .def = "0", .bounds = LO | HI, .lo = 0, .hi = HFCONFIG_MAX_INTERMEDIATE,
     .help = "shared expert width (qwen2_moe); 0: none"},
    {KEY("init.num_experts", KEY_INT, init.num_experts), .def = "8", .bounds = LO | HI, .lo = 1,
     .hi = HFCONFIG_MAX_EXPERTS, .help = "routed experts per MoE layer E"},
    {KEY("init.top_k", KEY_INT, init.top_k), .def = "2", .bounds = LO, .lo = 1,
     .help = "experts chosen per token K (at most num_experts)"},
    {KEY("init.norm_topk_prob", KEY_BOOL, init.norm_topk_prob), .def = "true",
     .help = "renormalise the top-k routing weights to sum to 1"},
    {KEY("init.tie_word_embeddings", KEY_BOOL, init.tie_word_embeddings), .def = "false",
     .help = "share the embedding matrix with lm_head"},
    {KEY("init.sliding_window", KEY_INT, init.sliding_window), .def = "128", .bounds = LO | HI,
     .lo = 0, .hi = 1 << 30,
     .help = "attention window of the sliding layers (gpt_oss: layers 0, 2, ...); 0: none"},
    {KEY("init.swiglu_limit", KEY_DOUBLE, init.swiglu_limit), .def = "7", .bounds = LO | LO_OPEN,
     .lo = 0, .help = "clamp of the experts' SwiGLU (gpt_oss)"},
    {KEY("init.rope_theta", KEY_DOUBLE, init.rope_theta), .def = "10000", .bounds = LO | LO_OPEN,
     .lo = 0, .help = "RoPE base"},
    {KEY("init.init_std", KEY_DOUBLE, init.init_std), .def = "0.02", .bounds = LO | LO_OPEN,
     .lo = 0, .help = "standard deviation of the normal initialisation"},
    {KEY("init.dtype", KEY_ENUM, init.dtype), .def = "auto", .names = dtype_names,
     .help = "dtype of the written tensors; auto: bf16"},
    {KEY("init.shards", KEY_INT, init.shards), .def = "1", .bounds = LO, .lo = 1,
     .help = "number of safetensors files"},

    /* prepare */
    {KEY("prepare.inputs", KEY_LIST, prepare.inputs), COUNT(prepare.n_inputs),
     .required_by = BY(PREPARE), .help = "jsonl files of conversations (a path or a list)"},
    {KEY("prepare.output", KEY_STRING, prepare.output), .required_by = BY(PREPARE),
     .help = "token dataset written (HDF5)"},
    {KEY("prepare.tokenizer", KEY_STRING, prepare.tokenizer), .def = "auto",
     .help = "auto (model.path's tokenizer.json if it has one, else byte), byte, or a "
             "tokenizer.json or the directory holding it"},
    {KEY("prepare.format", KEY_ENUM, prepare.format), .def = "template",
     .names = prepare_format_names,
     .help = "template: the tokenizer's chat template; esft_reference: the ESFT reference's "
             "User:/Assistant: layout"},
    {KEY("prepare.chat_template", KEY_STRING, prepare.chat_template),
     .help = "a named chat template of tokenizer_config.json, or a .jinja file; unset: the "
             "tokenizer's default"},
    {KEY("prepare.template_kwargs", KEY_LIST, prepare.template_kwargs),
     COUNT(prepare.n_template_kwargs),
     .help = "name=value variables for the chat template (enable_thinking=false, ...)"},
    {KEY("prepare.date", KEY_STRING, prepare.date),
     .help = "YYYY-MM-DD the template's strftime_now gives; unset: today"},
    {KEY("prepare.extra_inputs", KEY_LIST, prepare.extra_inputs), COUNT(prepare.n_extra_inputs),
     .help = "jsonl files of a second dataset, prepared beside the first with the same "
             "tokenizer and format into prepare.extra_output (a general set for "
             "eval.extra_data); empty: none"},
    {KEY("prepare.extra_output", KEY_STRING, prepare.extra_output),
     .help = "the second dataset written (HDF5); needed with prepare.extra_inputs"},
    {KEY("prepare.bad_rows", KEY_ENUM, prepare.bad_rows), .def = "abort", .names = bad_rows_names,
     .help = "what a malformed jsonl row does: abort the run, or skip it with a warning"},

    /* score */
    {KEY("score.n_sample_tokens", KEY_INT64, score.n_sample_tokens), .def = "131072", .bounds = LO,
     .lo = 1, .help = "tokens' worth of whole samples to score (ESFT reference)"},
    {KEY("score.tokens", KEY_ENUM, score.tokens), .def = "all", .names = score_tokens_names,
     .help = "tokens scored: all (as the reference) or only loss-bearing ones"},
    {KEY("score.coactivation", KEY_BOOL, score.coactivation), .def = "true",
     .help = "also record expert co-activation counts (L x E x E)"},
    {KEY("score.output", KEY_STRING, score.output), .def = "routing_stats.h5",
     .also_read_by = BY(SELECT),
     .help = "routing statistics file (HDF5), relative to run.output_dir"},

    /* select */
    {KEY("select.stats", KEY_LIST, select.stats), COUNT(select.n_stats),
     .help = "statistics files; empty: this run's score.output"},
    {KEY("select.score_function", KEY_ENUM, select.score_function), .def = "token",
     .names = score_function_names, .help = "expert score: token share or mean gate weight"},
    {KEY("select.top_p", KEY_DOUBLE, select.top_p), .def = "0.2", .bounds = LO | LO_OPEN | HI,
     .lo = 0, .hi = 1,
     .help = "per layer, add experts by descending score until their sum reaches top_p"},
    {KEY("select.train_shared_experts", KEY_BOOL, select.train_shared_experts), .def = "false",
     .help = "train the shared experts too"},
    {KEY("select.train_non_expert_modules", KEY_BOOL, select.train_non_expert_modules),
     .def = "false", .help = "train attention, norms, embeddings and routers too"},
    {KEY("select.union_tasks", KEY_BOOL, select.union_tasks), .def = "false",
     .help = "with several statistics files: one config, the union of each task's experts"},
    {KEY("select.output", KEY_STRING, select.output), .def = "expert_config.json",
     .also_read_by = BY(TRAIN),
     .help = "expert configuration written, relative to run.output_dir"},
    {KEY("select.bootstrap", KEY_INT, select.bootstrap), .def = "0", .bounds = LO | HI, .lo = 0,
     .hi = 100000,
     .help = "resamples of the scored samples for the selection's stability (0: none); "
             "seeded by run.seed"},
    {KEY("select.stability_target", KEY_DOUBLE, select.stability_target), .def = "0.9",
     .bounds = LO | LO_OPEN | HI, .lo = 0, .hi = 1,
     .help = "mean Jaccard similarity at which enough tokens were scored"},
    {KEY("select.c2r_top_t", KEY_INT, select.c2r_top_t), .def = "0", .bounds = LO | HI, .lo = 0,
     .hi = HFCONFIG_MAX_EXPERTS - 1,
     .help = "C2R: also write c2r_config.json (the model's config.json plus top_t and each "
             "MoE layer's collaborative_list: every expert's top_t most co-activated experts) "
             "in run.output_dir; 0: none"},

    /* train */
    {KEY("train.method", KEY_ENUM, train.method), .def = "esft", .names = method_names,
     .help = "what trains: selected experts (esft), everything, all but routers, LoRA, "
             "everything with DenseMixer's router gradient (densemixer)"},
    {KEY("train.densemixer", KEY_BOOL, train.densemixer), .def = "false",
     .help = "DenseMixer's router gradient with methods esft, full, frozen_router: the "
             "backward runs every expert on every token for the router (E/K x the expert "
             "forward FLOPs); forward and expert gradients unchanged"},
    {KEY("train.expert_config", KEY_STRING, train.expert_config), .required_by = BY(TRAIN),
     .required_if = method_is_esft, .required_why = "method esft",
     .help = "expert_config.json naming the experts to train (method esft, and method lora "
             "with targets selected); default with select in the phase list: select's output"},
    {KEY("train.lr", KEY_DOUBLE, train.lr), .def = "1e-5", .bounds = LO, .lo = 0,
     .help = "peak learning rate"},
    {KEY("train.weight_decay", KEY_DOUBLE, train.weight_decay), .def = "0.1", .bounds = LO, .lo = 0,
     .help = "AdamW decoupled weight decay"},
    {KEY("train.beta1", KEY_DOUBLE, train.beta1), .def = "0.9", .bounds = LO | HI | HI_OPEN,
     .lo = 0, .hi = 1, .help = "AdamW first-moment decay"},
    {KEY("train.beta2", KEY_DOUBLE, train.beta2), .def = "0.95", .bounds = LO | HI | HI_OPEN,
     .lo = 0, .hi = 1, .help = "AdamW second-moment decay"},
    {KEY("train.eps", KEY_DOUBLE, train.eps), .def = "1e-8", .bounds = LO | LO_OPEN, .lo = 0,
     .help = "AdamW epsilon"},
    {KEY("train.clip_grad", KEY_DOUBLE, train.clip_grad), .def = "1.0", .bounds = LO, .lo = 0,
     .help = "global gradient-norm clip; 0: off"},
    {KEY("train.aux_loss_coef", KEY_DOUBLE, train.aux_loss_coef), .def = "0", .bounds = LO, .lo = 0,
     .help = "balance loss weight, off by default: transformers' load_balancing_loss_func "
             "(qwen, olmoe, mixtral); for deepseek_v2 the ESFT reference's sequence-level "
             "loss (aux_loss_alpha, 0.001 in DeepSeek-V2-Lite); refused for deepseek_v3 and "
             "glm4_moe"},
    {KEY("train.lr_schedule", KEY_ENUM, train.lr_schedule), .def = "constant",
     .names = lr_schedule_names, .help = "learning-rate schedule after warmup"},
    {KEY("train.warmup_steps", KEY_INT, train.warmup_steps), .def = "0", .bounds = LO, .lo = 0,
     .help = "linear warmup steps (at most train.steps)"},
    {KEY("train.steps", KEY_INT, train.steps), .def = "500", .bounds = LO, .lo = 1,
     .help = "optimizer steps"},
    {KEY("train.global_batch", KEY_INT, train.global_batch), .def = "16", .bounds = LO, .lo = 1,
     .help = "blocks per optimizer step, over all ranks"},
    {KEY("train.micro_batch", KEY_INT, train.micro_batch), .def = "1", .bounds = LO, .lo = 1,
     .help = "blocks per forward/backward on one rank"},
    {KEY("train.checkpoint_every", KEY_INT, train.checkpoint_every), .def = "100", .bounds = LO,
     .lo = 0, .help = "steps between checkpoints; 0: only at the end"},
    {KEY("train.keep_checkpoints", KEY_INT, train.keep_checkpoints), .def = "2", .bounds = LO,
     .lo = 1, .help = "checkpoints kept on disk (older ones are deleted)"},
    {KEY("train.eval_every", KEY_INT, train.eval_every), .def = "100", .bounds = LO, .lo = 0,
     .help = "steps between validation passes; 0: never"},
    {KEY("train.log_every", KEY_INT, train.log_every), .def = "1", .bounds = LO, .lo = 1,
     .help = "steps between progress lines and metrics records"},
    {KEY("train.val_fraction", KEY_DOUBLE, train.val_fraction), .def = "0.02",
     .bounds = LO | HI | HI_OPEN, .lo = 0, .hi = 1,
     .also_read_by = BY(EVAL),
     .help = "fraction of the samples held out for validation (eval.split validation "
             "evaluates them)"},
    {KEY("train.resume", KEY_STRING, train.resume), .def = "auto",
     .help = "auto (the newest intact checkpoint in run.output_dir, if any), force (the same, "
             "even if its deck differs), never, or a checkpoint path"},
    {KEY("train.bad_steps", KEY_ENUM, train.bad_steps), .def = "stop", .names = bad_steps_names,
     .help = "a step with no loss-bearing target or a non-finite loss or gradient norm: stop "
             "(checkpoint the last good step, exit 1) or skip its batch (counted)"},
    {KEY("train.export_merged", KEY_BOOL, train.export_merged), .def = "false",
     .help = "also export a merged, complete Hugging Face checkpoint"},
    {KEY("train.recompute", KEY_BOOL, train.recompute), .def = "false",
     .help = "recompute each layer's forward in the backward pass (activation "
             "checkpointing): keep only each layer's input, one layer's activations in all; "
             "gradients bitwise unchanged, about one more forward per step"},
    {KEY("train.lora.r", KEY_INT, train.lora_rank), .def = "8", .bounds = LO, .lo = 1,
     .help = "LoRA rank r (method lora)"},
    {KEY("train.lora.alpha", KEY_DOUBLE, train.lora_alpha), .def = "16", .bounds = LO | LO_OPEN,
     .lo = 0, .help = "LoRA alpha; the update B A is scaled by alpha / r (method lora)"},
    {KEY("train.lora.rslora", KEY_BOOL, train.lora_rslora), .def = "false",
     .help = "rank-stabilised LoRA: scale by alpha / sqrt(r) instead (PEFT's use_rslora)"},
    {KEY("train.lora.targets", KEY_LIST, train.lora_targets), COUNT(train.n_lora_targets),
     .def = "[q_proj, k_proj, v_proj, o_proj]",
     .help = "modules that get adapters: q_proj, k_proj, v_proj, o_proj, q_a_proj, q_b_proj, "
             "kv_a_proj_with_mqa, kv_b_proj, attention, gate_proj, up_proj, down_proj, "
             "dense_mlp (non-MoE layers), shared_experts, experts (every routed expert), "
             "selected (train.expert_config's experts)"},
    {KEY("train.lora.train_router", KEY_BOOL, train.lora_train_router), .def = "false",
     .help = "method lora: train the MoE routers too (in full; PEFT modules_to_save)"},

    /* eval */
    {KEY("eval.adapter", KEY_STRING, eval.adapter),
     .help = "trained-tensor safetensors applied on the model, or a LoRA adapter directory "
             "(adapter_config.json + adapter_model.safetensors) folded in; unset: with train earlier in "
             "the phase list, what it trained (run.output_dir/adapter/adapter.safetensors; "
             "method lora: eval.model is its merged checkpoint instead), else none; none: "
             "the model as it is"},
    {KEY("eval.model", KEY_STRING, eval.model),
     .help = "checkpoint directory evaluated instead of model.path (a merged export); unset: "
             "model.path, or run.output_dir/merged after a train of method lora"},
    {KEY("eval.split", KEY_ENUM, eval.split), .def = "all", .names = eval_split_names,
     .help = "samples of data.path evaluated: all, or validation (those train holds out: "
             "train.val_fraction of them, drawn with run.seed)"},
    {KEY("eval.extra_data", KEY_LIST, eval.extra_data), COUNT(eval.n_extra_data),
     .help = "more token datasets (HDF5), each evaluated whole beside data.path (eval.json's "
             "extra); empty: none"},
    {KEY("eval.batch", KEY_INT, eval.batch), .def = "1", .bounds = LO, .lo = 1,
     .help = "blocks per forward pass on one rank"},
};

#define N_KEYS ((int)(sizeof schema / sizeof schema[0]))

/* Sections in the order deck_print writes them. Their positions in the file are kept in
 * deck->origins after the schema rows: a missing required key is reported where its
 * section is. */
static const struct section {
    const char *name, *help;
    /* The phases whose result a key of the section changes (bit 1 << phase), beyond
     * those a row names in also_read_by. A sweep (sweep.c) runs a phase once for every
     * point when it reads a swept key, once for all of them when it does not. */
    unsigned read_by;
} sections[] = {
    {"run", "identity of the run and where it writes", 0},
    {"model", "the model read (or written by init)", BY(SCORE) | BY(TRAIN) | BY(EVAL)},
    {"data", "the token dataset", BY(SCORE) | BY(TRAIN) | BY(EVAL)},
    /* the layout changes how a phase computes, not its result (statistics and
     * checkpoints do not depend on it) */
    {"parallel", "process layout; dp is derived: world size / (pp * ep)", 0},
    {"init", "the random model written by the init phase", BY(INIT)},
    {"prepare", "jsonl conversations -> token dataset", BY(PREPARE)},
    {"score", "routing statistics of the model on the data", BY(SCORE)},
    {"select", "statistics -> expert configuration", BY(SELECT)},
    {"train", "fine-tuning", BY(TRAIN)},
    {"eval", "loss, perplexity and token accuracy", BY(EVAL)},
};

#define N_SECTIONS ((int)(sizeof sections / sizeof sections[0]))
#define N_ORIGINS (N_KEYS + N_SECTIONS)

/* Keys that exist in the struct but are computed, not read: setting one is an error that
 * says why. */
static const char *derived_message(const char *path)
{
    if (strcmp(path, "parallel.dp") == 0)
        return "parallel.dp is derived from the world size (dp = world / (pp * ep)) "
               "and cannot be set";
    return NULL;
}

static int find_key(const char *path)
{
    for (int i = 0; i < N_KEYS; i++)
        if (strcmp(schema[i].path, path) == 0) return i;
    return -1;
}

static int find_section(const char *name)
{
    for (int s = 0; s < N_SECTIONS; s++)
        if (strcmp(sections[s].name, name) == 0) return s;
    return -1;
}

/* The section index of a key, -1 for `phase`. */
static int section_of(const struct key *key)
{
    const char *dot = strchr(key->path, '.');
    if (!dot) return -1;
    for (int s = 0; s < N_SECTIONS; s++) {
        size_t n = strlen(sections[s].name);
        if ((size_t)(dot - key->path) == n && strncmp(key->path, sections[s].name, n) == 0)
            return s;
    }
    return -1;
}

static const char *leaf_of(const struct key *key)
{
    const char *dot = strchr(key->path, '.');
    return dot ? dot + 1 : key->path;
}

static void *field(struct deck *deck, const struct key *key)
{
    return (char *)deck + key->offset;
}
static const void *field_c(const struct deck *deck, const struct key *key)
{
    return (const char *)deck + key->offset;
}
static int *count_field(struct deck *deck, const struct key *key)
{
    return (int *)((char *)deck + key->count_offset);
}
static int count_c(const struct deck *deck, const struct key *key)
{
    return *(const int *)((const char *)deck + key->count_offset);
}

int deck_key_readers(const char *path, unsigned *readers)
{
    int i = find_key(path);
    if (i < 0) return -1;
    int s = section_of(&schema[i]);
    *readers = schema[i].type == KEY_PHASES
                   ? (1u << PHASE_COUNT) - 1
                   : (s >= 0 ? sections[s].read_by : 0) | schema[i].also_read_by;
    return 0;
}

/* ---------------------------------------------------------------------------------- */
/* Error collection.                                                                  */

struct errors {
    char *buf; /* caller's buffer; NULL when size is 0 */
    size_t size, used;
    int count;
};

static void errors_init(struct errors *errors, char *buf, size_t size)
{
    errors->buf = size ? buf : NULL;
    errors->size = size;
    errors->used = 0;
    errors->count = 0;
    if (errors->buf) errors->buf[0] = '\0';
}

/* Appends one line. Every error is counted; text that does not fit is cut, and the
 * buffer always stays NUL-terminated. */
static void errors_add(struct errors *errors, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void errors_add(struct errors *errors, const char *fmt, ...)
{
    errors->count++;
    if (!errors->buf || errors->used + 1 >= errors->size) return;
    size_t room = errors->size - errors->used;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(errors->buf + errors->used, room, fmt, ap);
    va_end(ap);
    if (n < 0) {
        errors->buf[errors->used] = '\0';
    } else if ((size_t)n + 1 < room) {
        errors->buf[errors->used + n] = '\n';
        errors->buf[errors->used + n + 1] = '\0';
        errors->used += (size_t)n + 1;
    } else {
        errors->used = errors->size - 1; /* full; vsnprintf left the NUL */
        if (errors->size >= 2) errors->buf[errors->size - 2] = '\n';
    }
}

struct pos {
    int line, col; /* 1-based */
};

/* Where messages go and how they are prefixed: a deck file ("FILE:LINE:COL: key: ..."),
 * or one command-line assignment ("command line: ASSIGNMENT: ..."), which also serves
 * for the schema's own defaults. */
struct source {
    const char *file;
    const char *assignment;
    struct errors *errors;
};

/* Reports an error at `at`. `key` names the key the message is about; NULL when the
 * message names it itself. On the command line the assignment already names the key. */
static void report(const struct source *src, struct pos at, const char *key, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void report(const struct source *src, struct pos at, const char *key, const char *fmt, ...)
{
    char msg[768];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    if (src->file && key)
        errors_add(src->errors, "%s:%d:%d: %s: %s", src->file, at.line, at.col, key, msg);
    else if (src->file)
        errors_add(src->errors, "%s:%d:%d: %s", src->file, at.line, at.col, msg);
    else
        errors_add(src->errors, "command line: %s: %s", src->assignment, msg);
}

/* User text shown in a message: control characters (a newline would split the message)
 * become '?', and long text is cut. */
static void shown_text(const char *text, char *buf, size_t size)
{
    const size_t max = size < 64 ? size - 1 : 60;
    size_t n = 0;
    for (; text[n] && n < max; n++)
        buf[n] = ((unsigned char)text[n] < 0x20 || text[n] == 0x7f) ? '?' : text[n];
    buf[n] = '\0';
    if (text[n] && size > n + 3) strcpy(buf + n, "...");
}

/* "a, b, c" from a NULL-terminated name list. */
static void join_names(const char *const *names, char *buf, size_t size)
{
    size_t used = 0;
    buf[0] = '\0';
    for (int i = 0; names[i] && used + 1 < size; i++) {
        int n = snprintf(buf + used, size - used, "%s%s", i ? ", " : "", names[i]);
        if (n < 0) break;
        used += (size_t)n;
    }
}

/* ---------------------------------------------------------------------------------- */
/* YAML -> a tree of positioned nodes.                                                */

enum node_kind { NODE_SCALAR, NODE_SEQUENCE, NODE_MAPPING };

struct node {
    enum node_kind kind;
    struct pos pos;
    char *text;          /* scalar */
    size_t length;       /* scalar bytes (text may hold a NUL from an escape) */
    bool plain;          /* plain scalar: may be null (~, null, empty) */
    bool anchored;       /* carries &anchor */
    bool alias;          /* was *alias (rejected; text is empty) */
    struct node **items; /* sequence items, or mapping keys and values alternating */
    int n_items, cap_items;
};

#define MAX_DEPTH 16 /* a deck is three levels deep; this stops pathological nesting */

static void node_free(struct node *node)
{
    if (!node) return;
    for (int i = 0; i < node->n_items; i++) node_free(node->items[i]);
    free(node->items);
    free(node->text);
    free(node);
}

static void node_append(struct node *node, struct node *item)
{
    if (node->n_items == node->cap_items) {
        int cap = node->cap_items ? 2 * node->cap_items : 8;
        struct node **items = xmalloc((size_t)cap * sizeof *items);
        if (node->n_items) memcpy(items, node->items, (size_t)node->n_items * sizeof *items);
        free(node->items);
        node->items = items;
        node->cap_items = cap;
    }
    node->items[node->n_items++] = item;
}

static struct node *new_scalar(const char *text, size_t length, bool plain, struct pos pos)
{
    struct node *node = xcalloc(1, sizeof *node);
    node->kind = NODE_SCALAR;
    node->pos = pos;
    node->text = xmalloc(length + 1);
    memcpy(node->text, text, length);
    node->text[length] = '\0';
    node->length = length;
    node->plain = plain;
    return node;
}

static bool is_null(const struct node *node)
{
    if (node->kind != NODE_SCALAR || !node->plain) return false;
    const char *t = node->text;
    return !t[0] || !strcmp(t, "~") || !strcmp(t, "null") || !strcmp(t, "Null") ||
           !strcmp(t, "NULL");
}

struct loader {
    yaml_parser_t parser;
    const struct source *src;
    const char *text;
    size_t length;
};

static struct pos mark_pos(yaml_mark_t mark)
{
    return (struct pos){(int)mark.line + 1, (int)mark.column + 1};
}

/* Reader errors (bad UTF-8) carry a byte offset, not a mark. */
static struct pos offset_pos(const char *text, size_t length, size_t offset)
{
    struct pos pos = {1, 1};
    for (size_t i = 0; i < offset && i < length; i++) {
        if (text[i] == '\n') {
            pos.line++;
            pos.col = 1;
        } else {
            pos.col++;
        }
    }
    return pos;
}

static void report_yaml_error(struct loader *ld)
{
    const yaml_parser_t *p = &ld->parser;
    const char *problem = p->problem ? p->problem : "unknown error";
    const char *what = ld->src->file ? "malformed YAML" : "malformed value";
    if (p->error == YAML_READER_ERROR) {
        struct pos at = offset_pos(ld->text, ld->length, p->problem_offset);
        report(ld->src, at, NULL, "%s: %s (byte 0x%02x)", what, problem,
               (unsigned)p->problem_value & 0xffu);
    } else if (p->context) {
        struct pos ctx = mark_pos(p->context_mark);
        report(ld->src, mark_pos(p->problem_mark), NULL, "%s: %s (%s at %d:%d)", what, problem,
               p->context, ctx.line, ctx.col);
    } else {
        report(ld->src, mark_pos(p->problem_mark), NULL, "%s: %s", what, problem);
    }
}

static bool next_event(struct loader *ld, yaml_event_t *event)
{
    if (yaml_parser_parse(&ld->parser, event)) return true;
    report_yaml_error(ld);
    return false;
}

/* Builds the node that starts with `event` (which this function deletes), reading the
 * events of its children. NULL after a reported error. */
static struct node *load_node(struct loader *ld, yaml_event_t *event, int depth)
{
    struct pos pos = mark_pos(event->start_mark);
    struct node *node = NULL;
    switch (event->type) {
    case YAML_ALIAS_EVENT:
        node = new_scalar("", 0, false, pos);
        node->alias = true;
        yaml_event_delete(event);
        return node;
    case YAML_SCALAR_EVENT:
        node = new_scalar((const char *)event->data.scalar.value, event->data.scalar.length,
                          event->data.scalar.style == YAML_PLAIN_SCALAR_STYLE, pos);
        node->anchored = event->data.scalar.anchor != NULL;
        yaml_event_delete(event);
        return node;
    case YAML_SEQUENCE_START_EVENT:
    case YAML_MAPPING_START_EVENT:
        break;
    default: /* the parser only gives node events here */
        yaml_event_delete(event);
        report(ld->src, pos, NULL, "malformed YAML: unexpected event");
        return NULL;
    }

    node = xcalloc(1, sizeof *node);
    node->pos = pos;
    node->kind = event->type == YAML_SEQUENCE_START_EVENT ? NODE_SEQUENCE : NODE_MAPPING;
    node->anchored = node->kind == NODE_SEQUENCE ? event->data.sequence_start.anchor != NULL
                                                 : event->data.mapping_start.anchor != NULL;
    yaml_event_type_t end =
        node->kind == NODE_SEQUENCE ? YAML_SEQUENCE_END_EVENT : YAML_MAPPING_END_EVENT;
    yaml_event_delete(event);
    if (depth >= MAX_DEPTH) {
        report(ld->src, pos, NULL, "nesting deeper than %d levels", MAX_DEPTH);
        node_free(node);
        return NULL;
    }
    for (;;) {
        yaml_event_t child_event;
        if (!next_event(ld, &child_event)) {
            node_free(node);
            return NULL;
        }
        if (child_event.type == end) {
            yaml_event_delete(&child_event);
            return node;
        }
        struct node *child = load_node(ld, &child_event, depth + 1);
        if (!child) {
            node_free(node);
            return NULL;
        }
        node_append(node, child);
    }
}

/* Parses one YAML document. Returns false after a reported error; *root is NULL for an
 * empty stream. */
static bool load_yaml(const char *text, size_t length, const struct source *src, struct node **root)
{
    struct loader ld = {.src = src, .text = text, .length = length};
    *root = NULL;
    if (!yaml_parser_initialize(&ld.parser)) fatal(EXIT_RUNTIME, "libyaml: out of memory");
    yaml_parser_set_input_string(&ld.parser, (const unsigned char *)text, length);

    bool ok = false;
    yaml_event_t event;
    if (!next_event(&ld, &event)) goto done; /* stream start */
    yaml_event_delete(&event);
    if (!next_event(&ld, &event)) goto done;
    if (event.type == YAML_STREAM_END_EVENT) { /* nothing but comments */
        yaml_event_delete(&event);
        ok = true;
        goto done;
    }
    yaml_event_delete(&event); /* document start */
    if (!next_event(&ld, &event)) goto done;
    *root = load_node(&ld, &event, 0);
    if (!*root) goto done;
    if (!next_event(&ld, &event)) goto done; /* document end */
    yaml_event_delete(&event);
    if (!next_event(&ld, &event)) goto done;
    if (event.type == YAML_DOCUMENT_START_EVENT) {
        report(src, mark_pos(event.start_mark), NULL,
               "a deck is one YAML document; found a second one");
        yaml_event_delete(&event);
        goto done;
    }
    yaml_event_delete(&event);
    ok = true;
done:
    if (!ok) {
        node_free(*root);
        *root = NULL;
    }
    yaml_parser_delete(&ld.parser);
    return ok;
}

/* ---------------------------------------------------------------------------------- */
/* Values: one scalar or list -> one field.                                           */

union value {
    char *s;
    long long i;
    double d;
    bool b;
    int e;
};

/* "'abc'", "nothing", "a list", "a mapping": what the deck gave, for messages. */
static const char *describe(const struct node *node, char *buf, size_t size)
{
    if (node->kind == NODE_SEQUENCE) return "a list";
    if (node->kind == NODE_MAPPING) return "a mapping";
    if (is_null(node)) return "nothing";
    char text[80];
    shown_text(node->text, text, sizeof text);
    snprintf(buf, size, "'%s'", text);
    return buf;
}

static const char *expected(const struct key *key, enum key_type type, char *buf, size_t size)
{
    switch (type) {
    case KEY_STRING:
        return "a string";
    case KEY_INT:
    case KEY_INT64:
        return "an integer";
    case KEY_DOUBLE:
        return "a number";
    case KEY_BOOL:
        return "true or false";
    case KEY_LIST:
        return "a string or a list of strings";
    case KEY_PHASES:
        return "a phase name or a list of phase names";
    case KEY_CHOICE:
    case KEY_ENUM:
        break;
    }
    char names[200];
    join_names(key->names, names, sizeof names);
    snprintf(buf, size, "one of %s", names);
    return buf;
}

/* ">= 1", "> 0", "in (0, 1]" */
static void format_range(const struct key *key, char *buf, size_t size)
{
    unsigned b = key->bounds;
    if ((b & LO) && (b & HI))
        snprintf(buf, size, "in %c%.10g, %.10g%c", (b & LO_OPEN) ? '(' : '[', key->lo, key->hi,
                 (b & HI_OPEN) ? ')' : ']');
    else if (b & LO)
        snprintf(buf, size, "%s %g", (b & LO_OPEN) ? ">" : ">=", key->lo);
    else if (b & HI)
        snprintf(buf, size, "%s %.10g", (b & HI_OPEN) ? "<" : "<=", key->hi);
    else
        snprintf(buf, size, "any value");
}

static bool in_range(const struct key *key, double x)
{
    unsigned b = key->bounds;
    if ((b & LO) && ((b & LO_OPEN) ? !(x > key->lo) : !(x >= key->lo))) return false;
    if ((b & HI) && ((b & HI_OPEN) ? !(x < key->hi) : !(x <= key->hi))) return false;
    return true;
}

static bool parse_bool(const char *t, bool *out)
{
    static const char *const yes[] = {"true", "yes", "on"}, *const no[] = {"false", "no", "off"};
    for (int i = 0; i < 3; i++) {
        if (strcasecmp(t, yes[i]) == 0) return *out = true, true;
        if (strcasecmp(t, no[i]) == 0) return *out = false, true;
    }
    return false;
}

/* Decimal integer, optional sign, nothing else (no spaces, no 1e3, no 0x). Returns 0,
 * 1 for not an integer, 2 for out of the long long range. */
static int parse_integer(const char *t, long long *out)
{
    const char *digits = (*t == '-' || *t == '+') ? t + 1 : t;
    if (!*digits) return 1;
    for (const char *c = digits; *c; c++)
        if (*c < '0' || *c > '9') return 1;
    errno = 0;
    *out = strtoll(t, NULL, 10);
    return errno == ERANGE ? 2 : 0;
}

/* Reads one scalar node as a value of `type` for `key` (a list entry is read with its
 * element type). Reports and returns false when it is not a valid value. `may_unset`:
 * a null string is allowed and reads as NULL. */
static bool parse_scalar(const struct key *key, enum key_type type, const struct node *v,
                         const struct source *src, bool may_unset, union value *out)
{
    char got[96];
    if (v->kind != NODE_SCALAR || (is_null(v) && !(type == KEY_STRING && may_unset))) {
        char want[256];
        report(src, v->pos, key->path, "expected %s, got %s",
               expected(key, type, want, sizeof want), describe(v, got, sizeof got));
        return false;
    }
    if (type == KEY_STRING && is_null(v)) {
        out->s = NULL;
        return true;
    }
    if (strlen(v->text) != v->length) {
        report(src, v->pos, key->path, "contains a NUL character");
        return false;
    }
    const char *t = v->text;
    char shown[80];
    shown_text(t, shown, sizeof shown);

    switch (type) {
    case KEY_STRING:
        if (!t[0]) {
            report(src, v->pos, key->path, "must not be empty");
            return false;
        }
        out->s = xstrdup(t);
        return true;

    case KEY_CHOICE:
    case KEY_ENUM:
    case KEY_PHASES:
        for (int i = 0; key->names[i]; i++) {
            if (strcmp(t, key->names[i]) == 0) {
                if (type == KEY_CHOICE)
                    out->s = xstrdup(t);
                else
                    out->e = i;
                return true;
            }
        }
        char names[200];
        join_names(key->names, names, sizeof names);
        report(src, v->pos, key->path, "'%s' is not one of %s", shown, names);
        return false;

    case KEY_BOOL:
        if (parse_bool(t, &out->b)) return true;
        report(src, v->pos, key->path, "expected true or false, got '%s'", shown);
        return false;

    case KEY_INT:
    case KEY_INT64: {
        long long x;
        int status = parse_integer(t, &x);
        if (status == 1) {
            report(src, v->pos, key->path, "expected an integer, got '%s'", shown);
            return false;
        }
        if (status == 2 || (type == KEY_INT && (x < INT_MIN || x > INT_MAX))) {
            report(src, v->pos, key->path, "'%s' does not fit in a %d-bit integer", shown,
                   type == KEY_INT ? 32 : 64);
            return false;
        }
        if (!in_range(key, (double)x)) {
            char range[64];
            format_range(key, range, sizeof range);
            report(src, v->pos, key->path, "must be %s, got %s", range, shown);
            return false;
        }
        out->i = x;
        return true;
    }

    case KEY_DOUBLE: {
        char *end;
        errno = 0;
        double x = strtod(t, &end);
        bool spaces = isspace((unsigned char)t[0]);
        if (end == t || *end || spaces || isnan(x) || (isinf(x) && errno != ERANGE)) {
            report(src, v->pos, key->path, "expected a number, got '%s'", shown);
            return false;
        }
        if (isinf(x)) { /* overflow; underflow to a tiny value is accepted */
            report(src, v->pos, key->path, "'%s' is too large for a double", shown);
            return false;
        }
        if (!in_range(key, x)) {
            char range[64];
            format_range(key, range, sizeof range);
            report(src, v->pos, key->path, "must be %s, got %s", range, shown);
            return false;
        }
        out->d = x;
        return true;
    }

    case KEY_LIST:
        break;
    }
    return false;
}

static void free_list(char **entries, int *count)
{
    for (int i = 0; i < *count; i++) {
        free(entries[i]);
        entries[i] = NULL;
    }
    *count = 0;
}

/* A list key: a list, a single scalar (a one-entry list) or null (empty). The field
 * changes only when every entry is valid. */
static bool set_list(struct deck *deck, const struct key *key, const struct node *v,
                     const struct source *src)
{
    const bool phases = key->type == KEY_PHASES;
    const enum key_type item_type = phases ? KEY_PHASES : KEY_STRING;
    struct node *const *items;
    int n;
    const struct node *single[1] = {v};
    char got[96], want_buf[256];
    const char *want = expected(key, key->type, want_buf, sizeof want_buf);

    if (v->kind == NODE_MAPPING) {
        report(src, v->pos, key->path, "expected %s, got a mapping", want);
        return false;
    }
    if (v->kind == NODE_SCALAR && is_null(v)) {
        items = NULL;
        n = 0;
    } else if (v->kind == NODE_SCALAR) {
        items = (struct node *const *)single;
        n = 1;
    } else {
        items = v->items;
        n = v->n_items;
    }
    if (n > DECK_MAX_LIST) {
        report(src, v->pos, key->path, "at most %d entries, got %d", DECK_MAX_LIST, n);
        return false;
    }
    if (phases && n == 0 && v->kind == NODE_SEQUENCE) { /* a null phase is unset */
        report(src, v->pos, key->path, "expected %s, got an empty list", want);
        return false;
    }

    union value values[DECK_MAX_LIST];
    bool ok = true;
    int n_read = 0;
    for (int i = 0; i < n; i++) {
        const struct node *item = items[i];
        if (item->alias || item->anchored) {
            report(src, item->pos, key->path, "anchors and aliases are not supported");
            ok = false;
            continue;
        }
        if (item->kind != NODE_SCALAR) {
            report(src, item->pos, key->path, "expected %s, got %s",
                   phases ? "a phase name" : "a string", describe(item, got, sizeof got));
            ok = false;
            continue;
        }
        union value value;
        if (!parse_scalar(key, item_type, item, src, false, &value)) {
            ok = false;
            continue;
        }
        if (phases) {
            bool twice = false;
            for (int j = 0; j < n_read; j++) twice |= values[j].e == value.e;
            if (twice) {
                report(src, item->pos, key->path, "'%s' is listed twice", phase_names[value.e]);
                ok = false;
                continue;
            }
        }
        values[n_read++] = value;
    }
    if (!ok) {
        if (!phases)
            for (int i = 0; i < n_read; i++) free(values[i].s);
        return false;
    }

    int *count = count_field(deck, key);
    if (phases) {
        enum phase *list = field(deck, key);
        for (int i = 0; i < n_read; i++) list[i] = (enum phase)values[i].e;
    } else {
        char **list = field(deck, key);
        free_list(list, count);
        for (int i = 0; i < n_read; i++) list[i] = values[i].s;
    }
    *count = n_read;
    return true;
}

/* Sets schema row `row` from node `v`. The field changes only when `v` is valid. */
static bool set_key(struct deck *deck, int row, const struct node *v, const struct source *src)
{
    const struct key *key = &schema[row];
    if (v->alias || v->anchored) {
        report(src, v->pos, key->path, "anchors and aliases are not supported");
        return false;
    }
    if (key->type == KEY_LIST || key->type == KEY_PHASES) return set_list(deck, key, v, src);

    union value value;
    if (!parse_scalar(key, key->type, v, src, key->def == NULL, &value)) return false;
    void *p = field(deck, key);
    switch (key->type) {
    case KEY_STRING:
    case KEY_CHOICE:
        free(*(char **)p);
        *(char **)p = value.s;
        break;
    case KEY_INT:
        *(int *)p = (int)value.i;
        break;
    case KEY_INT64:
        *(long long *)p = value.i;
        break;
    case KEY_DOUBLE:
        *(double *)p = value.d;
        break;
    case KEY_BOOL:
        *(bool *)p = value.b;
        break;
    case KEY_ENUM:
        *(int *)p = value.e;
        break;
    case KEY_LIST:
    case KEY_PHASES:
        break;
    }
    return true;
}

/* Reads `text` (a default or the value of an override) as a one-value YAML document and
 * sets row `row` from it; an empty text is a null. */
static bool set_key_from_text(struct deck *deck, int row, const char *text,
                              const struct source *src)
{
    struct node *root;
    if (!load_yaml(text, strlen(text), src, &root)) return false;
    if (!root) root = new_scalar("", 0, true, (struct pos){1, 1});
    bool ok = set_key(deck, row, root, src);
    node_free(root);
    return ok;
}

/* ---------------------------------------------------------------------------------- */
/* Suggestions for unknown names.                                                     */

/* Optimal-string-alignment distance (Levenshtein plus adjacent transposition), capped
 * for long names since only small distances lead to a suggestion. */
static int edit_distance(const char *a, const char *b)
{
    enum { MAX = 64 };
    size_t n = strlen(a), m = strlen(b);
    if (n >= MAX || m >= MAX) return MAX;
    int d[MAX][MAX];
    for (size_t i = 0; i <= n; i++) d[i][0] = (int)i;
    for (size_t j = 0; j <= m; j++) d[0][j] = (int)j;
    for (size_t i = 1; i <= n; i++) {
        for (size_t j = 1; j <= m; j++) {
            int cost = a[i - 1] != b[j - 1];
            int best = d[i - 1][j] + 1;
            if (d[i][j - 1] + 1 < best) best = d[i][j - 1] + 1;
            if (d[i - 1][j - 1] + cost < best) best = d[i - 1][j - 1] + cost;
            if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] &&
                d[i - 2][j - 2] + 1 < best)
                best = d[i - 2][j - 2] + 1;
            d[i][j] = best;
        }
    }
    return d[n][m];
}

/* How far a typo may be from a known name and still be suggested. */
static int max_typo(const char *name)
{
    size_t n = strlen(name);
    return n <= 3 ? 1 : n <= 8 ? 2 : 3;
}

/* The known key closest to `section.leaf`: a near leaf in the same section, else the
 * same leaf in another section (train.seed -> run.seed). `section` may be NULL (a
 * top-level name). Returns NULL when nothing is close. */
static const char *suggest_key(const char *section, const char *leaf)
{
    const char *best = NULL;
    int best_distance = max_typo(leaf) + 1;
    if (section) {
        for (int i = 0; i < N_KEYS; i++) {
            int s = section_of(&schema[i]);
            if (s < 0 || strcmp(sections[s].name, section) != 0) continue;
            int d = edit_distance(leaf, leaf_of(&schema[i]));
            if (d < best_distance) best = schema[i].path, best_distance = d;
        }
        if (best) return best;
    }
    for (int i = 0; i < N_KEYS; i++)
        if (section_of(&schema[i]) >= 0 && strcmp(leaf_of(&schema[i]), leaf) == 0)
            return schema[i].path;
    return NULL;
}

static const char *suggest_section(const char *name)
{
    const char *best = NULL;
    int best_distance = max_typo(name) + 1;
    for (int s = 0; s < N_SECTIONS; s++) {
        int d = edit_distance(name, sections[s].name);
        if (d < best_distance) best = sections[s].name, best_distance = d;
    }
    if (!best && edit_distance(name, "phase") <= max_typo(name)) best = "phase";
    return best ? best : suggest_key(NULL, name); /* a key written at the top level */
}

/* Names that users of the Python training stacks (transformers' TrainingArguments,
 * ms-swift, PEFT) write, and what esft calls them: matched on the key's last part,
 * wherever it is written. */
static const struct foreign_key {
    const char *name, *hint;
} foreign_keys[] = {
    {"learning_rate", "train.lr"},
    {"max_steps", "train.steps"},
    {"num_train_epochs", "train.steps (esft counts optimizer steps, not epochs)"},
    {"per_device_train_batch_size", "train.micro_batch (blocks per forward/backward on one rank)"},
    {"train_batch_size", "train.global_batch (blocks per optimizer step over all ranks)"},
    {"gradient_accumulation_steps",
     "train.global_batch (= micro_batch x accumulation steps x data ranks; esft derives the "
     "accumulation)"},
    {"warmup_ratio", "train.warmup_steps (a step count: the ratio times train.steps)"},
    {"lr_scheduler_type", "train.lr_schedule"},
    {"max_grad_norm", "train.clip_grad"},
    {"adam_beta1", "train.beta1"},
    {"adam_beta2", "train.beta2"},
    {"adam_epsilon", "train.eps"},
    {"save_steps", "train.checkpoint_every"},
    {"save_total_limit", "train.keep_checkpoints"},
    {"eval_steps", "train.eval_every"},
    {"logging_steps", "train.log_every"},
    {"resume_from_checkpoint", "train.resume"},
    {"router_aux_loss_coef", "train.aux_loss_coef"},
    {"output_router_logits", "train.aux_loss_coef (> 0 adds the load-balancing loss)"},
    {"model_name_or_path", "model.path"},
    {"max_seq_length", "data.seq_len"},
    {"max_length", "data.seq_len"},
    {"packing", "data.pack"},
    {"lora_r", "train.lora.r"},
    {"lora_alpha", "train.lora.alpha"},
    {"use_rslora", "train.lora.rslora"},
    {"target_modules", "train.lora.targets"},
};

static const char *foreign_hint(const char *path)
{
    const char *dot = strrchr(path, '.');
    const char *leaf = dot ? dot + 1 : path;
    for (size_t i = 0; i < sizeof foreign_keys / sizeof foreign_keys[0]; i++)
        if (strcmp(leaf, foreign_keys[i].name) == 0) return foreign_keys[i].hint;
    return NULL;
}

/* "unknown key train.lrr (did you mean train.lr?)", for a path split at its first dot. */
static void report_unknown(const struct source *src, struct pos at, const char *path)
{
    char shown[80];
    shown_text(path, shown, sizeof shown);
    const char *dot = strchr(path, '.');
    const char *hint = foreign_hint(path);
    if (hint) {
        report(src, at, NULL, "unknown key %s (did you mean %s?)", shown, hint);
        return;
    }
    if (!dot && !src->file) { /* a command-line key without a section */
        hint = suggest_section(path);
        if (hint)
            report(src, at, NULL, "unknown key %s (did you mean %s?)", shown, hint);
        else
            report(src, at, NULL, "unknown key %s (keys are section.key, e.g. train.lr)", shown);
        return;
    }
    if (!dot) {
        hint = suggest_section(path);
        char names[200] = "phase";
        for (int s = 0; s < N_SECTIONS; s++) {
            size_t used = strlen(names);
            snprintf(names + used, sizeof names - used, ", %s", sections[s].name);
        }
        if (hint)
            report(src, at, NULL, "unknown section '%s' (did you mean %s?)", shown, hint);
        else
            report(src, at, NULL, "unknown section '%s' (known: %s)", shown, names);
        return;
    }
    char section[64];
    size_t n =
        (size_t)(dot - path) < sizeof section - 1 ? (size_t)(dot - path) : sizeof section - 1;
    memcpy(section, path, n);
    section[n] = '\0';
    if (find_section(section) < 0) {
        hint = suggest_section(section);
        if (hint)
            report(src, at, NULL, "unknown key %s: no section '%s' (did you mean %s?)", shown,
                   section, hint);
        else
            report(src, at, NULL, "unknown key %s: no section '%s'", shown, section);
        return;
    }
    hint = suggest_key(section, dot + 1);
    if (hint)
        report(src, at, NULL, "unknown key %s (did you mean %s?)", shown, hint);
    else
        report(src, at, NULL, "unknown key %s (esft --help-deck lists the keys)", shown);
}

/* ---------------------------------------------------------------------------------- */
/* Defaults, parsing, overrides.                                                      */

void deck_defaults(struct deck *deck)
{
    memset(deck, 0, sizeof *deck);
    /* calloc: every origin starts as ORIGIN_DEFAULT, line 0 */
    deck->origins = xcalloc(N_ORIGINS, sizeof *deck->origins);
    for (int row = 0; row < N_KEYS; row++) {
        if (!schema[row].def) continue; /* unset string, empty list */
        char buf[512];
        struct errors errors;
        errors_init(&errors, buf, sizeof buf);
        struct source src = {.assignment = schema[row].path, .errors = &errors};
        if (!set_key_from_text(deck, row, schema[row].def, &src)) {
            /* a bad schema row is a bug in this file, not a user error */
            fprintf(stderr, "esft: internal error: default of %s: %s", schema[row].path, buf);
            abort();
        }
    }
}

/* Sets a key read from the deck file; `k` is the key node (its position is the key's
 * origin), `first` holds where each row was first seen. */
static void read_key(struct deck *deck, int row, const struct node *k, const struct node *v,
                     const struct source *src, struct pos *first)
{
    if (first[row].line) {
        report(src, k->pos, schema[row].path, "duplicate key (first at %d:%d)", first[row].line,
               first[row].col);
        return;
    }
    first[row] = k->pos;
    if (set_key(deck, row, v, src))
        deck->origins[row] = (struct deck_origin){k->pos.line, k->pos.col, ORIGIN_FILE};
}

/* Whether some key's path starts with prefix + ".": a nested mapping (train: {lora: {r: 8}}). */
static bool is_key_group(const char *prefix)
{
    size_t n = strlen(prefix);
    for (int i = 0; i < N_KEYS; i++)
        if (strncmp(schema[i].path, prefix, n) == 0 && schema[i].path[n] == '.') return true;
    return false;
}

static void read_mapping(struct deck *deck, int s, const char *prefix, const struct node *map,
                         const struct source *src, struct pos *first)
{
    for (int i = 0; i + 1 < map->n_items; i += 2) {
        const struct node *k = map->items[i], *v = map->items[i + 1];
        char got[96];
        if (k->alias || k->anchored) {
            report(src, k->pos, sections[s].name, "anchors and aliases are not supported");
            continue;
        }
        if (k->kind != NODE_SCALAR || is_null(k)) {
            report(src, k->pos, sections[s].name, "expected a key name, got %s",
                   describe(k, got, sizeof got));
            continue;
        }
        size_t size = strlen(prefix) + strlen(k->text) + 2;
        char *path = xmalloc(size);
        snprintf(path, size, "%s.%s", prefix, k->text);
        int row = find_key(path);
        const char *derived = derived_message(path);
        if (derived)
            report(src, k->pos, NULL, "%s", derived);
        else if (row < 0 && v->kind == NODE_MAPPING && !v->alias && !v->anchored &&
                 is_key_group(path))
            read_mapping(deck, s, path, v, src, first);
        else if (row < 0)
            report_unknown(src, k->pos, path);
        else
            read_key(deck, row, k, v, src, first);
        free(path);
    }
}

static void read_deck(struct deck *deck, const struct node *root, const struct source *src)
{
    char got[96];
    if (root->alias || root->anchored) {
        report(src, root->pos, NULL, "anchors and aliases are not supported");
        return;
    }
    if (root->kind != NODE_MAPPING) {
        report(src, root->pos, NULL,
               "a deck is a mapping of sections (phase: ..., train: {...}), got %s",
               describe(root, got, sizeof got));
        return;
    }
    struct pos first[N_KEYS] = {{0, 0}};
    const int phase_row = find_key("phase");
    for (int i = 0; i + 1 < root->n_items; i += 2) {
        const struct node *k = root->items[i], *v = root->items[i + 1];
        if (k->alias || k->anchored) {
            report(src, k->pos, NULL, "anchors and aliases are not supported");
            continue;
        }
        if (k->kind != NODE_SCALAR || is_null(k)) {
            report(src, k->pos, NULL, "expected a section name, got %s",
                   describe(k, got, sizeof got));
            continue;
        }
        if (strcmp(k->text, "phase") == 0) {
            read_key(deck, phase_row, k, v, src, first);
            continue;
        }
        if (strcmp(k->text, DECK_SWEEP_SECTION) == 0) /* sweep.c reads and checks it */
            continue;
        int s = find_section(k->text);
        if (s < 0) {
            report_unknown(src, k->pos, k->text);
            continue;
        }
        struct deck_origin *origin = &deck->origins[N_KEYS + s];
        if (origin->kind == ORIGIN_FILE) {
            report(src, k->pos, NULL, "duplicate section %s (first at %d:%d)", sections[s].name,
                   origin->line, origin->col);
            continue;
        }
        *origin = (struct deck_origin){k->pos.line, k->pos.col, ORIGIN_FILE};
        if (v->alias || v->anchored) {
            report(src, v->pos, sections[s].name, "anchors and aliases are not supported");
        } else if (v->kind == NODE_MAPPING) {
            read_mapping(deck, s, sections[s].name, v, src, first);
        } else if (!is_null(v)) { /* `eval:` with nothing under it is an empty section */
            report(src, v->pos, sections[s].name, "expected a mapping of keys, got %s",
                   describe(v, got, sizeof got));
        }
    }
}

int deck_parse(struct deck *deck, const char *file, const char *text, size_t length, char *err,
               size_t err_size)
{
    if (!deck->origins) deck_defaults(deck); /* a zeroed struct; usually main did this */
    free(deck->file);
    deck->file = xstrdup(file);
    struct errors errors;
    errors_init(&errors, err, err_size);
    struct source src = {.file = deck->file, .errors = &errors};
    struct node *root;
    if (load_yaml(text, length, &src, &root)) {
        if (!root || is_null(root))
            report(&src, root ? root->pos : (struct pos){1, 1}, NULL,
                   "empty deck: expected a mapping of sections (phase: ..., train: {...})");
        else
            read_deck(deck, root, &src);
    }
    node_free(root);
    return errors.count;
}

int deck_override(struct deck *deck, const char *assignment, char *err, size_t err_size)
{
    struct errors errors;
    errors_init(&errors, err, err_size);
    char shown[256];
    shown_text(assignment, shown, sizeof shown);
    struct source src = {.assignment = shown, .errors = &errors};
    const struct pos nowhere = {0, 0};

    const char *eq = strchr(assignment, '=');
    if (!eq || eq == assignment) {
        report(&src, nowhere, NULL, "expected key.path=value");
        return errors.count;
    }
    size_t n = (size_t)(eq - assignment);
    char *path = xmalloc(n + 1);
    memcpy(path, assignment, n);
    path[n] = '\0';
    int row = find_key(path);
    const char *derived = derived_message(path);
    if (derived)
        report(&src, nowhere, NULL, "%s", derived);
    else if (row < 0)
        report_unknown(&src, nowhere, path);
    else if (set_key_from_text(deck, row, eq + 1, &src))
        deck->origins[row] = (struct deck_origin){0, 0, ORIGIN_OVERRIDE};
    free(path);
    return errors.count;
}

/* ---------------------------------------------------------------------------------- */
/* Whole-deck checks.                                                                 */

static bool is_unset(const struct deck *deck, const struct key *key)
{
    if (key->type == KEY_LIST || key->type == KEY_PHASES) return count_c(deck, key) == 0;
    if (key->type == KEY_STRING) return *(char *const *)field_c(deck, key) == NULL;
    return false;
}

static void origin_text(const struct deck *deck, const struct deck_origin *origin, char *buf,
                        size_t size)
{
    const char *file = deck->file ? deck->file : "command line";
    if (origin->kind == ORIGIN_FILE)
        snprintf(buf, size, "%s:%d:%d", file, origin->line, origin->col);
    else if (origin->kind == ORIGIN_OVERRIDE)
        snprintf(buf, size, "command line");
    else
        snprintf(buf, size, "%s", file);
}

void deck_where(const struct deck *deck, const char *key, char *buf, size_t size)
{
    if (!size) return;
    int row = find_key(key);
    int s = find_section(key);
    if (deck->origins && row >= 0)
        origin_text(deck, &deck->origins[row], buf, size);
    else if (deck->origins && s >= 0)
        origin_text(deck, &deck->origins[N_KEYS + s], buf, size);
    else
        snprintf(buf, size, "%s", deck->file ? deck->file : "command line");
}

const char *deck_eval_adapter(const struct deck *deck)
{
    const char *adapter = deck->eval.adapter;
    return adapter && strcmp(adapter, "none") != 0 ? adapter : NULL;
}

const char *deck_eval_model(const struct deck *deck)
{
    return deck->eval.model ? deck->eval.model : deck->model.path;
}

const char *deck_backend_name(enum backend_choice choice)
{
    return backend_names[choice];
}

/* eval after train in the same deck evaluates what that train made, as train reads what
 * select wrote: the trained tensors it exports over model.path, or, for method lora
 * (whose adapter is PEFT's, which eval does not read), its merged checkpoint. A deck
 * names eval.adapter (none: the model as it is) or eval.model to evaluate something
 * else. */
static void derive_eval_model(struct deck *deck, struct errors *errors)
{
    int train = -1, eval = -1;
    for (int i = 0; i < deck->n_phases; i++) {
        if (deck->phases[i] == PHASE_TRAIN && train < 0) train = i;
        if (deck->phases[i] == PHASE_EVAL) eval = i;
    }
    if (train < 0 || eval < train || deck->eval.adapter || deck->eval.model) return;
    const char *dir = deck->run.output_dir;
    size_t size = strlen(dir) + sizeof "/adapter/adapter.safetensors";
    if (deck->train.method != METHOD_LORA) {
        deck->eval.adapter = xmalloc(size);
        snprintf(deck->eval.adapter, size, "%s/adapter/adapter.safetensors", dir);
    } else if (deck->train.export_merged) {
        deck->eval.model = xmalloc(size);
        snprintf(deck->eval.model, size, "%s/merged", dir);
    } else {
        char where[4200];
        deck_where(deck, "train.method", where, sizeof where);
        errors_add(errors, "%s: eval after a train of method lora evaluates its merged "
                   "checkpoint (eval reads no PEFT adapter): set train.export_merged: true, or "
                   "eval.adapter: none to evaluate model.path as it is", where);
    }
}

int deck_finish(struct deck *deck, char *err, size_t err_size)
{
    struct errors errors;
    errors_init(&errors, err, err_size);
    char where[512], names[200];
    const char *file = deck->file ? deck->file : "command line";

    const struct deck_origin *phase_origin = &deck->origins[find_key("phase")];
    if (deck->n_phases == 0) {
        join_names(phase_names, names, sizeof names);
        if (deck->file && phase_origin->kind == ORIGIN_FILE) /* `phase: ~` */
            errors_add(&errors, "%s:%d:%d: phase is required (one of %s, or a list of them)", file,
                       phase_origin->line, phase_origin->col, names);
        else if (deck->file)
            errors_add(&errors, "%s:1:1: phase is required (one of %s, or a list of them)", file,
                       names);
        else
            errors_add(&errors, "command line: phase is required (one of %s)", names);
        return errors.count;
    }
    unsigned selected = 0;
    for (int i = 0; i < deck->n_phases; i++) selected |= 1u << deck->phases[i];

    /* Required keys, reported where their section is (else where `phase` is): that is
     * where the user has to add them. */
    for (int row = 0; row < N_KEYS; row++) {
        const struct key *key = &schema[row];
        if (!(key->required_by & selected) || !is_unset(deck, key)) continue;
        if (key->required_if && !key->required_if(deck)) continue;
        enum phase needing = deck->phases[0];
        for (int i = deck->n_phases - 1; i >= 0; i--)
            if (key->required_by & (1u << deck->phases[i])) needing = deck->phases[i];
        const struct deck_origin *section = &deck->origins[N_KEYS + section_of(key)];
        origin_text(deck, section->kind == ORIGIN_FILE ? section : phase_origin, where,
                    sizeof where);
        if (key->required_why)
            errors_add(&errors, "%s: %s is required by phase %s (%s)", where, key->path,
                       phase_name(needing), key->required_why);
        else
            errors_add(&errors, "%s: %s is required by phase %s", where, key->path,
                       phase_name(needing));
    }

    /* auto: the environment's choice (the test suite runs its phase tests again under
     * ESFT_BACKEND=cpu-devsim), else the CPU */
    if (deck->run.backend == BACKEND_AUTO) {
        const char *env = getenv("ESFT_BACKEND");
        if (env && *env) {
            int found = -1;
            for (int i = 1; backend_names[i]; i++)
                if (strcmp(env, backend_names[i]) == 0) found = i;
            if (found < 0)
                errors_add(&errors, "environment: ESFT_BACKEND=%s names no backend (cpu, cuda, "
                           "cpu-devsim)", env);
            else
                deck->run.backend = (enum backend_choice)found;
        }
    }
    if ((selected & BY(SELECT)) && deck->select.bootstrap > 0 && deck->select.union_tasks) {
        deck_where(deck, "select.bootstrap", where, sizeof where);
        errors_add(&errors, "%s: select.bootstrap with select.union_tasks is not implemented "
                   "yet (the stability of a summed selection only)", where);
    }
    if ((selected & (BY(SCORE) | BY(TRAIN) | BY(EVAL))) && deck->model.dtype == DTYPE_FP16) {
        deck_where(deck, "model.dtype", where, sizeof where);
        errors_add(&errors, "%s: model.dtype: fp16 is not implemented (use fp32, or tf32 or "
                   "bf16 with run.backend cuda)", where);
    }
    if ((selected & (BY(SCORE) | BY(TRAIN) | BY(EVAL))) &&
        (deck->model.dtype == DTYPE_TF32 || deck->model.dtype == DTYPE_BF16) &&
        deck->run.backend != BACKEND_CUDA) {
        deck_where(deck, "model.dtype", where, sizeof where);
        errors_add(&errors, "%s: model.dtype: %s is a mode of the GPU's tensor cores: it needs "
                   "run.backend: cuda (run.backend is %s; the CPU computes in fp32)", where,
                   compute_names[deck->model.dtype], backend_names[deck->run.backend]);
    }
#ifndef HAVE_CUDA
    if (deck->run.backend == BACKEND_CUDA) {
        deck_where(deck, "run.backend", where, sizeof where);
        errors_add(&errors, "%s: run.backend: cuda: this esft was built without CUDA "
                   "(configure found no CUDA toolkit, or --without-cuda); use cpu or auto", where);
    }
#endif

    /* Keys that constrain each other, checked for the phases that use them. */
    if (selected & BY(INIT)) {
        const struct deck_init *in = &deck->init;
        if (in->num_heads % in->num_kv_heads != 0) {
            deck_where(deck, "init.num_kv_heads", where, sizeof where);
            errors_add(&errors, "%s: init.num_kv_heads (%d) must divide init.num_heads (%d)", where,
                       in->num_kv_heads, in->num_heads);
        }
        if (in->head_dim % 2 != 0) {
            deck_where(deck, "init.head_dim", where, sizeof where);
            errors_add(&errors, "%s: init.head_dim (%d) must be even (RoPE rotates pairs)", where,
                       in->head_dim);
        }
        if (in->top_k > in->num_experts) {
            deck_where(deck, "init.top_k", where, sizeof where);
            errors_add(&errors, "%s: init.top_k (%d) is larger than init.num_experts (%d)", where,
                       in->top_k, in->num_experts);
        }
    }
    if ((selected & BY(PREPARE)) &&
        (deck->prepare.n_extra_inputs > 0) != (deck->prepare.extra_output != NULL)) {
        bool inputs = deck->prepare.n_extra_inputs > 0;
        deck_where(deck, inputs ? "prepare.extra_inputs" : "prepare.extra_output", where,
                   sizeof where);
        errors_add(&errors, "%s: prepare.%s needs prepare.%s (the second dataset's %s)", where,
                   inputs ? "extra_inputs" : "extra_output",
                   inputs ? "extra_output" : "extra_inputs", inputs ? "file" : "rows");
    }
    if (selected & BY(TRAIN)) {
        const struct deck_train *tr = &deck->train;
        if (tr->micro_batch > tr->global_batch) {
            deck_where(deck, "train.micro_batch", where, sizeof where);
            errors_add(&errors, "%s: train.micro_batch (%d) is larger than train.global_batch (%d)",
                       where, tr->micro_batch, tr->global_batch);
        }
        if (tr->warmup_steps > tr->steps) {
            deck_where(deck, "train.warmup_steps", where, sizeof where);
            errors_add(&errors, "%s: train.warmup_steps (%d) is more than train.steps (%d)", where,
                       tr->warmup_steps, tr->steps);
        }
    }
    if (errors.count) return errors.count;

    /* Derived values: run.output_dir's {name} (so that `run.name=lr3e-5` alone gives a
     * member of a sweep its own directory, and its own checkpoints to resume), then
     * train.expert_config from select's output when select runs in the same deck. */
    const char *placeholder = strstr(deck->run.output_dir, "{name}");
    if (placeholder) {
        size_t head = (size_t)(placeholder - deck->run.output_dir);
        size_t size = strlen(deck->run.output_dir) + strlen(deck->run.name) + 1;
        char *dir = xmalloc(size);
        snprintf(dir, size, "%.*s%s%s", (int)head, deck->run.output_dir, deck->run.name,
                 placeholder + strlen("{name}"));
        free(deck->run.output_dir);
        deck->run.output_dir = dir;
    }
    if (strstr(deck->run.output_dir, "{name}")) {
        deck_where(deck, "run.output_dir", where, sizeof where);
        errors_add(&errors, "%s: run.output_dir may hold {name} once", where);
    }
    if (deck->model.routing == ROUTING_C2R && !deck->model.c2r_config &&
        phase_listed(deck, PHASE_SELECT)) {
        size_t size = strlen(deck->run.output_dir) + sizeof "/c2r_config.json";
        deck->model.c2r_config = xmalloc(size);
        snprintf(deck->model.c2r_config, size, "%s/c2r_config.json", deck->run.output_dir);
    }
    derive_eval_model(deck, &errors);
    if ((deck->train.method == METHOD_ESFT || deck_lora_selects_experts(deck)) &&
        !deck->train.expert_config && phase_listed(deck, PHASE_SELECT)) {
        size_t size = strlen(deck->run.output_dir) + strlen(deck->select.output) + 2;
        deck->train.expert_config = xmalloc(size);
        if (deck->select.output[0] == '/')
            snprintf(deck->train.expert_config, size, "%s", deck->select.output);
        else
            snprintf(deck->train.expert_config, size, "%s/%s", deck->run.output_dir,
                     deck->select.output);
    }
    return errors.count;
}

/* ---------------------------------------------------------------------------------- */
/* Printing.                                                                          */

/* Double-quoted YAML string: every byte that YAML would read differently is escaped. */
static void print_quoted(const char *s, FILE *out)
{
    fputc('"', out);
    for (const unsigned char *c = (const unsigned char *)s; *c; c++) {
        switch (*c) {
        case '"':
            fputs("\\\"", out);
            break;
        case '\\':
            fputs("\\\\", out);
            break;
        case '\n':
            fputs("\\n", out);
            break;
        case '\t':
            fputs("\\t", out);
            break;
        case '\r':
            fputs("\\r", out);
            break;
        default:
            if (*c < 0x20 || *c == 0x7f)
                fprintf(out, "\\x%02x", *c);
            else
                fputc(*c, out); /* UTF-8 passes through: libyaml accepted it */
        }
    }
    fputc('"', out);
}

/* The shortest %g text that reads back to exactly x; whole numbers without an exponent
 * (10000, not 1e+04) since decks are read by people. */
static void format_double(double x, char *buf, size_t size)
{
    if (x == floor(x) && fabs(x) < 1e15) {
        snprintf(buf, size, "%.0f", x);
        return;
    }
    for (int digits = 1; digits <= 17; digits++) {
        snprintf(buf, size, "%.*g", digits, x);
        if (strtod(buf, NULL) == x) return;
    }
}

static void print_value(const struct deck *deck, const struct key *key, FILE *out)
{
    const void *p = field_c(deck, key);
    char buf[48];
    switch (key->type) {
    case KEY_STRING:
    case KEY_CHOICE: {
        const char *s = *(char *const *)p;
        if (!s)
            fputs("~", out);
        else if (key->type == KEY_CHOICE)
            fputs(s, out); /* one of the schema's names: plain is safe */
        else
            print_quoted(s, out);
        break;
    }
    case KEY_INT:
        fprintf(out, "%d", *(const int *)p);
        break;
    case KEY_INT64:
        fprintf(out, "%lld", *(const long long *)p);
        break;
    case KEY_DOUBLE:
        format_double(*(const double *)p, buf, sizeof buf);
        fputs(buf, out);
        break;
    case KEY_BOOL:
        fputs(*(const bool *)p ? "true" : "false", out);
        break;
    case KEY_ENUM:
        fputs(key->names[*(const int *)p], out);
        break;
    case KEY_LIST: {
        char *const *list = p;
        fputc('[', out);
        for (int i = 0; i < count_c(deck, key); i++) {
            if (i) fputs(", ", out);
            print_quoted(list[i], out);
        }
        fputc(']', out);
        break;
    }
    case KEY_PHASES: {
        const enum phase *list = p;
        if (count_c(deck, key) == 0) { /* unset: `phase: []` would be an error */
            fputs("~", out);
            break;
        }
        if (count_c(deck, key) == 1) {
            fputs(phase_name(list[0]), out);
            break;
        }
        fputc('[', out);
        for (int i = 0; i < count_c(deck, key); i++)
            fprintf(out, "%s%s", i ? ", " : "", phase_name(list[i]));
        fputc(']', out);
        break;
    }
    }
}

/* One `key: value` line, with `# default` aligned when the value was not set. */
static void print_line(const struct deck *deck, int row, const char *indent, FILE *out)
{
    const struct key *key = &schema[row];
    char *line = NULL;
    size_t size = 0;
    FILE *mem = open_memstream(&line, &size);
    if (!mem) fatal(EXIT_RUNTIME, "open_memstream: %s", strerror(errno));
    fprintf(mem, "%s%s: ", indent, leaf_of(key));
    print_value(deck, key, mem);
    fclose(mem);
    bool is_default = !deck->origins || deck->origins[row].kind == ORIGIN_DEFAULT;
    if (is_default)
        fprintf(out, "%-40s # default\n", line);
    else
        fprintf(out, "%s\n", line);
    free(line);
}

int deck_value_text(const struct deck *deck, const char *key, char *buf, size_t size)
{
    int row = find_key(key);
    if (row < 0 || size == 0) return -1;
    char *text = NULL;
    size_t length = 0;
    FILE *mem = open_memstream(&text, &length);
    if (!mem) fatal(EXIT_RUNTIME, "open_memstream: %s", strerror(errno));
    print_value(deck, &schema[row], mem);
    fclose(mem);
    snprintf(buf, size, "%s", text);
    free(text);
    return 0;
}

void deck_print(const struct deck *deck, FILE *out)
{
    fputs("# esft deck, resolved", out);
    if (deck->file) {
        char shown[256];
        shown_text(deck->file, shown, sizeof shown);
        fprintf(out, " from %s", shown);
    }
    fputs("\n", out);
    for (int row = 0; row < N_KEYS; row++)
        if (section_of(&schema[row]) < 0) print_line(deck, row, "", out);
    for (int s = 0; s < N_SECTIONS; s++) {
        fprintf(out, "\n%s:\n", sections[s].name);
        for (int row = 0; row < N_KEYS; row++)
            if (section_of(&schema[row]) == s) print_line(deck, row, "  ", out);
        if (strcmp(sections[s].name, "parallel") == 0)
            fputs("  # dp is derived: world size / (pp * ep)\n", out);
    }
}

void deck_print_keys(FILE *out)
{
    fputs("Deck keys. A deck is a YAML mapping: `phase` at the top level, the other keys\n"
          "inside their section (train: {lr: 3e-5}); on the command line, train.lr=3e-5.\n\n",
          out);
    int last_section = -2;
    for (int row = 0; row < N_KEYS; row++) {
        const struct key *key = &schema[row];
        int s = section_of(key);
        if (s != last_section && s >= 0)
            fprintf(out, "\n%s: %s\n", sections[s].name, sections[s].help);
        last_section = s;

        char type[256], names[200];
        switch (key->type) {
        case KEY_STRING:
            snprintf(type, sizeof type, "string");
            break;
        case KEY_CHOICE:
        case KEY_ENUM:
            join_names(key->names, names, sizeof names);
            snprintf(type, sizeof type, "one of %s", names);
            break;
        case KEY_PHASES:
            join_names(key->names, names, sizeof names);
            snprintf(type, sizeof type, "one or a list of %s", names);
            break;
        case KEY_INT:
        case KEY_INT64:
        case KEY_DOUBLE: {
            char range[64];
            format_range(key, range, sizeof range);
            snprintf(type, sizeof type, "%s %s", key->type == KEY_DOUBLE ? "number" : "integer",
                     range);
            break;
        }
        case KEY_BOOL:
            snprintf(type, sizeof type, "true or false");
            break;
        case KEY_LIST:
            snprintf(type, sizeof type, "list of strings");
            break;
        }
        fprintf(out, "  %s: %s; ", key->path, type);
        if (key->def)
            fprintf(out, "default %s", key->def);
        else if (key->type == KEY_LIST)
            fputs("default []", out);
        else if (key->type == KEY_PHASES)
            fputs("required", out);
        else
            fputs("default unset", out);
        if (key->required_by) {
            fputs("; required by", out);
            for (int p = 0; p < PHASE_COUNT; p++)
                if (key->required_by & (1u << p)) fprintf(out, " %s", phase_names[p]);
            if (key->required_why) fprintf(out, " (%s)", key->required_why);
        }
        fprintf(out, "\n      %s\n", key->help);
    }
}

void deck_free(struct deck *deck)
{
    if (deck->origins) { /* a parsed or defaulted deck: the schema knows its strings */
        for (int row = 0; row < N_KEYS; row++) {
            const struct key *key = &schema[row];
            if (key->type == KEY_STRING || key->type == KEY_CHOICE) {
                char **s = field(deck, key);
                free(*s);
                *s = NULL;
            } else if (key->type == KEY_LIST) {
                free_list(field(deck, key), count_field(deck, key));
            }
        }
    }
    free(deck->origins);
    deck->origins = NULL;
    free(deck->file);
    deck->file = NULL;
}
