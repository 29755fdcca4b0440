/* deck: the YAML input deck parsed into a typed, validated struct.
 *
 * Every key the program knows is one row of a schema table in deck.c (its path, type,
 * default, range, which phases require it, a help line). Parsing, command-line
 * overrides (`train.lr=3e-5`), defaults, the resolved-deck printout of --dry-run and the
 * help text all come from that table, so they cannot drift apart.
 *
 * Errors a user can cause are reported as `FILE:LINE:COL: message` naming the key; the
 * caller exits with status 2 (EXIT_INPUT) and writes nothing. */
#ifndef ESFT_DECK_H
#define ESFT_DECK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

enum phase { PHASE_INIT, PHASE_PREPARE, PHASE_SCORE, PHASE_SELECT, PHASE_TRAIN, PHASE_EVAL,
             PHASE_COUNT };
const char *phase_name(enum phase phase);

enum dtype_choice { DTYPE_AUTO, DTYPE_FP32, DTYPE_BF16, DTYPE_FP16, DTYPE_TF32 };
enum score_tokens { SCORE_TOKENS_ALL, SCORE_TOKENS_LOSS };
enum score_function { SCORE_FUNCTION_TOKEN, SCORE_FUNCTION_GATE };
enum train_method { METHOD_ESFT, METHOD_FULL, METHOD_FROZEN_ROUTER, METHOD_LORA,
                    METHOD_DENSEMIXER };
enum lr_schedule { LR_CONSTANT, LR_LINEAR, LR_COSINE };
enum bad_rows { BAD_ROWS_ABORT, BAD_ROWS_SKIP };
enum prepare_format { FORMAT_TEMPLATE, FORMAT_ESFT_REFERENCE };
enum bad_steps { BAD_STEPS_STOP, BAD_STEPS_SKIP };
enum eval_split { EVAL_SPLIT_ALL, EVAL_SPLIT_VALIDATION };
enum backend_choice { BACKEND_AUTO, BACKEND_CPU, BACKEND_CUDA, BACKEND_DEVSIM };
/* The deck name of a backend choice ("auto", "cpu", "cuda", "cpu-devsim"). */
const char *deck_backend_name(enum backend_choice choice);

#define DECK_MAX_LIST 64 /* most entries in a list-valued key */

struct deck_run {
    char *name;       /* run name, used in file names and logs */
    char *output_dir; /* every file the run writes goes here; "{name}" in the deck stands
                         for run.name (default out/{name}), replaced by deck_finish */
    long long seed;
    enum backend_choice backend;
};

/* How the frozen weight matrices are held (model.frozen_weights; model_store_frozen_bf16). */
enum frozen_weights_choice { FROZEN_FP32, FROZEN_BF16 };
/* How the routers choose (model.routing): their own top-k, or C2R (c2r.h). */
enum routing_choice { ROUTING_TOPK, ROUTING_C2R };
/* Which EP rank holds which expert (parallel.expert_placement; c2r.h). */
enum expert_placement_choice { PLACEMENT_CONTIGUOUS, PLACEMENT_C2R };

struct deck_model {
    char *path; /* Hugging Face checkpoint directory (read; `init` writes it) */
    enum dtype_choice dtype; /* compute dtype: fp32 (auto), or tf32 on cuda */
    enum frozen_weights_choice frozen_weights; /* fp32, or bf16 (half the memory) */
    enum routing_choice routing;
    char *c2r_config; /* config.json with C2R's top_t and collaborative_list (routing c2r) */
};

struct deck_data {
    char *path;  /* token dataset (HDF5) */
    int seq_len; /* tokens per packed block */
    bool pack;   /* pack samples with per-sample masks and position restarts */
};

struct deck_parallel {
    int pp; /* pipeline stages */
    int ep; /* expert-parallel group size */
    int dp; /* derived: world / (pp * ep); not a key */
    char *stage_layers[DECK_MAX_LIST]; /* decoder layers per stage; empty: balanced by cost */
    int n_stage_layers;
    enum expert_placement_choice expert_placement;
};

struct deck_init {
    char *family; /* qwen2_moe, qwen3_moe, olmoe, mixtral, deepseek_v2, deepseek_v3, glm4_moe,
                   * gpt_oss */
    int hidden_size, num_layers, num_heads, num_kv_heads, head_dim, vocab_size;
    int intermediate_size;     /* dense MLP width (and mixtral/olmoe/gpt_oss expert width) */
    int sliding_window;        /* gpt_oss: window of the sliding layers; 0 = none */
    double swiglu_limit;       /* gpt_oss: clamp of the experts' SwiGLU */
    int moe_intermediate_size; /* expert width (qwen families) */
    int shared_expert_intermediate_size; /* qwen2_moe; 0 = none */
    /* deepseek_v2 / deepseek_v3 / glm4_moe */
    int n_shared_experts, first_k_dense_replace, n_group, topk_group;
    double routed_scaling_factor;
    int kv_lora_rank, q_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim; /* MLA */
    int num_experts, top_k;
    bool norm_topk_prob, tie_word_embeddings;
    double rope_theta, init_std;
    enum dtype_choice dtype; /* dtype of the written tensors (auto: bf16) */
    int shards;              /* number of safetensors files */
};

struct deck_prepare {
    char *inputs[DECK_MAX_LIST]; /* jsonl files */
    int n_inputs;
    char *output;   /* dataset written (HDF5) */
    char *tokenizer; /* "auto", "byte", or a tokenizer.json (or its directory) */
    enum prepare_format format; /* the chat template, or the ESFT reference's layout */
    char *chat_template;        /* a named template of tokenizer_config.json, or a file */
    char *template_kwargs[DECK_MAX_LIST]; /* "name=value" passed to the chat template */
    int n_template_kwargs;
    char *date; /* YYYY-MM-DD that strftime_now formats; unset: today */
    char *extra_inputs[DECK_MAX_LIST]; /* jsonl files of a second dataset ... */
    int n_extra_inputs;
    char *extra_output; /* ... written here, with the same tokenizer (unset: none) */
    enum bad_rows bad_rows;
};

struct deck_score {
    long long n_sample_tokens;
    enum score_tokens tokens;
    bool coactivation;
    char *output; /* statistics file (HDF5), relative to run.output_dir */
};

struct deck_select {
    char *stats[DECK_MAX_LIST]; /* statistics files; default: this run's score output */
    int n_stats;
    enum score_function score_function;
    double top_p;
    bool train_shared_experts, train_non_expert_modules, union_tasks;
    char *output; /* expert_config.json, relative to run.output_dir */
    int bootstrap;           /* resamples for the stability figures; 0: none */
    double stability_target; /* mean Jaccard that counts as stable */
    int c2r_top_t;           /* C2R collaborators per expert written (c2r_config.json); 0: none */
};

struct deck_train {
    enum train_method method;
    char *expert_config; /* required for method esft */
    double lr, weight_decay, beta1, beta2, eps, clip_grad, aux_loss_coef;
    enum lr_schedule lr_schedule;
    int warmup_steps, steps, global_batch, micro_batch;
    int checkpoint_every, keep_checkpoints, eval_every, log_every;
    double val_fraction;
    char *resume; /* "auto", "force", "never" or a checkpoint path */
    enum bad_steps bad_steps; /* a step without loss-bearing targets or with a non-finite
                                 loss or gradient norm: stop the run, or skip the batch */
    bool export_merged, recompute;
    /* DenseMixer's router gradient (densemixer.h) with methods esft, full and
     * frozen_router; method densemixer is full with it */
    bool densemixer;
    /* method lora (lora.h): rank, alpha, rsLoRA scaling, the adapted modules, and
     * whether the routers train too */
    int lora_rank;
    double lora_alpha;
    bool lora_rslora, lora_train_router;
    char *lora_targets[DECK_MAX_LIST];
    int n_lora_targets;
};

struct deck_eval {
    char *adapter; /* trained-tensor safetensors applied on the model; "none": none (unset:
                      derived by deck_finish from a train earlier in the deck) */
    char *model;   /* checkpoint evaluated instead of model.path (unset: model.path) */
    enum eval_split split;
    char *extra_data[DECK_MAX_LIST]; /* more datasets, each evaluated whole */
    int n_extra_data;
    int batch;
};

/* Where a value came from, for error messages on cross-checks made after parsing. */
struct deck_origin {
    int line, col; /* 1-based; 0 when not from the file */
    enum { ORIGIN_DEFAULT, ORIGIN_FILE, ORIGIN_OVERRIDE } kind;
};

struct deck {
    char *file; /* the deck's path, as given */
    enum phase phases[PHASE_COUNT];
    int n_phases;
    struct deck_run run;
    struct deck_model model;
    struct deck_data data;
    struct deck_parallel parallel;
    struct deck_init init;
    struct deck_prepare prepare;
    struct deck_score score;
    struct deck_select select;
    struct deck_train train;
    struct deck_eval eval;
    struct deck_origin *origins; /* one per schema row (private to deck.c) */
};

/* Fills every key with its default. */
void deck_defaults(struct deck *deck);

/* Parses YAML text on top of a deck from deck_defaults (a zeroed struct is defaulted
 * here); file is the name used in messages. Returns the number of errors found
 * (0 = success); err is overwritten with this call's messages, one per line, each
 * `FILE:LINE:COL: message`, cut to err_size (every error is still counted). Unknown
 * keys, wrong types, out-of-range values, duplicate keys and malformed YAML are errors. */
int deck_parse(struct deck *deck, const char *file, const char *text, size_t length,
               char *err, size_t err_size);

/* Applies one `key.path=value` override on top of the parsed deck (the value is read as
 * a YAML scalar or flow sequence; an empty value unsets an optional string). Returns 0, or
 * 1 with `command line: ...` in err (overwritten, as by deck_parse). */
int deck_override(struct deck *deck, const char *assignment, char *err, size_t err_size);

/* Checks what needs the whole deck: keys required by the selected phases, keys that
 * depend on each other. Returns the number of errors, messages as deck_parse. */
int deck_finish(struct deck *deck, char *err, size_t err_size);

/* Writes "FILE:LINE:COL" (or "FILE" for a default, "command line" for an override) for
 * a key such as "parallel.ep", to prefix messages of checks made elsewhere. */
void deck_where(const struct deck *deck, const char *key, char *buf, size_t size);

/* Whether the deck trains with method lora on the experts of train.expert_config
 * (train.lora.targets names selected). */
bool deck_lora_selects_experts(const struct deck *deck);

/* The resolved deck as YAML that deck_parse reads back to the same struct; keys left at
 * their default are marked with a `# default` comment. */
void deck_print(const struct deck *deck, FILE *out);

/* The value of a key such as "train.lr" as deck_print writes it, into buf (cut to size):
 * for messages that compare two decks. 0, or -1 for a key the schema does not have. */
int deck_value_text(const struct deck *deck, const char *key, char *buf, size_t size);

/* The phases (bit 1 << phase) whose result the key such as "select.top_p" changes, from
 * the schema, into *readers: its section's phases and the row's own additions
 * (score.output is read by select, select.output by train, run.seed by init, score,
 * select and train; the layout by none). 0, or -1 for a key the schema does not have.
 * For sweeps (sweep.h). */
int deck_key_readers(const char *path, unsigned *readers);

/* The top-level section a deck may hold beside the schema's: the sweep block, read by
 * sweep.c; deck_parse passes over it. */
#define DECK_SWEEP_SECTION "sweep"

/* The adapter eval applies, NULL for none (eval.adapter unset or "none"). */
const char *deck_eval_adapter(const struct deck *deck);
/* The checkpoint eval reads: eval.model, else model.path. */
const char *deck_eval_model(const struct deck *deck);

/* Every key with its type, default and help line (for --help-deck). */
void deck_print_keys(FILE *out);

void deck_free(struct deck *deck);

#endif
