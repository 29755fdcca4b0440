/* test_deck: the input-deck parser (src/deck.c).
 *
 * Every expected value and every expected `LINE:COL` below is written by hand from the
 * YAML text next to it. Usage: test_deck [BAD_DIR [GOOD_DIR]] (defaults
 * tests/decks/bad and tests/decks/good): each bad deck's first line is
 * `# expect: LINE:COL: TEXT`, and parsing it must report `PATH:LINE:COL: ...TEXT...`;
 * each good deck must parse and finish with no error. */
#ifdef HAVE_CONFIG_H
#include "config.h"
#endif
#include <dirent.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "deck.h"

#define ERR_SIZE 8192

/* As main does it: defaults, then the file on top. */
static int parse(struct deck *deck, const char *file, const char *text, char *err)
{
    deck_defaults(deck);
    return deck_parse(deck, file, text, strlen(text), err, ERR_SIZE);
}

/* True when some line of err starts with `prefix` and contains `text`. */
static int has_error(const char *err, const char *prefix, const char *text)
{
    const char *line = err;
    while (line && *line) {
        const char *end = strchr(line, '\n');
        size_t n = end ? (size_t)(end - line) : strlen(line);
        char buf[2048];
        if (n >= sizeof buf) n = sizeof buf - 1;
        memcpy(buf, line, n);
        buf[n] = '\0';
        if (strncmp(buf, prefix, strlen(prefix)) == 0 && strstr(buf, text)) return 1;
        line = end ? end + 1 : NULL;
    }
    return 0;
}

static int count_lines(const char *err)
{
    int n = 0;
    for (; *err; err++) n += *err == '\n';
    return n;
}

static int same_string(const char *a, const char *b)
{
    return (a == NULL && b == NULL) || (a && b && strcmp(a, b) == 0);
}

/* ---------------------------------------------------------------------------------- */

static const char *full_deck = "phase: [prepare, score, select, train, eval]\n" /* 1 */
                               "run:\n"
                               "  name: full\n"
                               "  output_dir: /scratch/out\n"
                               "  seed: 42\n" /* 5 */
                               "  backend: cpu\n"
                               "model:\n"
                               "  path: /models/tiny\n"
                               "  dtype: fp32\n"
                               "data:\n" /* 10 */
                               "  path: data/tokens.h5\n"
                               "  seq_len: 512\n"
                               "  pack: no\n"
                               "parallel:\n"
                               "  pp: 2\n" /* 15 */
                               "  ep: 4\n"
                               "init:\n"
                               "  family: mixtral\n"
                               "  hidden_size: 128\n"
                               "  num_layers: 3\n" /* 20 */
                               "  num_heads: 8\n"
                               "  num_kv_heads: 4\n"
                               "  head_dim: 32\n"
                               "  vocab_size: 1000\n"
                               "  intermediate_size: 256\n" /* 25 */
                               "  moe_intermediate_size: 64\n"
                               "  shared_expert_intermediate_size: 96\n"
                               "  num_experts: 16\n"
                               "  top_k: 4\n"
                               "  norm_topk_prob: false\n" /* 30 */
                               "  tie_word_embeddings: yes\n"
                               "  rope_theta: 1e6\n"
                               "  init_std: 0.01\n"
                               "  dtype: fp16\n"
                               "  shards: 3\n" /* 35 */
                               "prepare:\n"
                               "  inputs: [a.jsonl, \"b c.jsonl\"]\n"
                               "  output: data/tokens.h5\n"
                               "  tokenizer: tok/tokenizer.json\n"
                               "  bad_rows: skip\n" /* 40 */
                               "score:\n"
                               "  n_sample_tokens: 10000000000\n"
                               "  tokens: loss\n"
                               "  coactivation: off\n"
                               "  output: stats.h5\n" /* 45 */
                               "select:\n"
                               "  stats:\n"
                               "    - s1.h5\n"
                               "    - s2.h5\n"
                               "  score_function: gate\n" /* 50 */
                               "  top_p: 1\n"
                               "  train_shared_experts: true\n"
                               "  train_non_expert_modules: TRUE\n"
                               "  union_tasks: On\n"
                               "  output: cfg.json\n" /* 55 */
                               "train:\n"
                               "  method: lora\n"
                               "  expert_config: cfg.json\n"
                               "  lr: 3e-5\n"
                               "  weight_decay: 0\n" /* 60 */
                               "  beta1: 0.8\n"
                               "  beta2: 0.999\n"
                               "  eps: 1e-6\n"
                               "  clip_grad: 0.5\n"
                               "  aux_loss_coef: 0.001\n" /* 65 */
                               "  lr_schedule: cosine\n"
                               "  warmup_steps: 10\n"
                               "  steps: 100\n"
                               "  global_batch: 32\n"
                               "  micro_batch: 2\n" /* 70 */
                               "  checkpoint_every: 0\n"
                               "  keep_checkpoints: 5\n"
                               "  eval_every: 0\n"
                               "  log_every: 10\n"
                               "  val_fraction: 0.1\n" /* 75 */
                               "  resume: never\n"
                               "  export_merged: true\n"
                               "  recompute: false\n"
                               "  lora.r: 8\n"
                               "  lora: {alpha: 32.5, rslora: true, targets: [q_proj, dense_mlp], "
                               "train_router: true}\n" /* 80 */
                               "eval:\n"
                               "  adapter: out/adapter.safetensors\n"
                               "  batch: 4\n";

static void test_full_deck(void)
{
    struct deck d;
    char err[ERR_SIZE];
    int n = parse(&d, "full.yaml", full_deck, err);
    CHECK(n == 0, "full deck: %d errors:\n%s", n, err);
    n = deck_finish(&d, err, sizeof err);
    CHECK(n == 0, "full deck finish: %d errors:\n%s", n, err);

    CHECK(d.n_phases == 5, "n_phases %d", d.n_phases);
    CHECK(d.phases[0] == PHASE_PREPARE && d.phases[1] == PHASE_SCORE &&
              d.phases[2] == PHASE_SELECT && d.phases[3] == PHASE_TRAIN &&
              d.phases[4] == PHASE_EVAL,
          "phase order");
    CHECK(same_string(d.file, "full.yaml"), "file %s", d.file);

    CHECK(same_string(d.run.name, "full"), "run.name %s", d.run.name);
    CHECK(same_string(d.run.output_dir, "/scratch/out"), "run.output_dir");
    CHECK(d.run.seed == 42, "run.seed %lld", d.run.seed);
    CHECK(d.run.backend == BACKEND_CPU, "run.backend");

    CHECK(same_string(d.model.path, "/models/tiny"), "model.path");
    CHECK(d.model.dtype == DTYPE_FP32, "model.dtype");

    CHECK(same_string(d.data.path, "data/tokens.h5"), "data.path");
    CHECK(d.data.seq_len == 512, "data.seq_len %d", d.data.seq_len);
    CHECK(d.data.pack == false, "data.pack");

    CHECK(d.parallel.pp == 2, "parallel.pp");
    CHECK(d.parallel.ep == 4, "parallel.ep");

    CHECK(same_string(d.init.family, "mixtral"), "init.family");
    CHECK(d.init.hidden_size == 128, "init.hidden_size");
    CHECK(d.init.num_layers == 3, "init.num_layers");
    CHECK(d.init.num_heads == 8, "init.num_heads");
    CHECK(d.init.num_kv_heads == 4, "init.num_kv_heads");
    CHECK(d.init.head_dim == 32, "init.head_dim");
    CHECK(d.init.vocab_size == 1000, "init.vocab_size");
    CHECK(d.init.intermediate_size == 256, "init.intermediate_size");
    CHECK(d.init.moe_intermediate_size == 64, "init.moe_intermediate_size");
    CHECK(d.init.shared_expert_intermediate_size == 96, "init.shared_expert_intermediate_size");
    CHECK(d.init.num_experts == 16, "init.num_experts");
    CHECK(d.init.top_k == 4, "init.top_k");
    CHECK(d.init.norm_topk_prob == false, "init.norm_topk_prob");
    CHECK(d.init.tie_word_embeddings == true, "init.tie_word_embeddings");
    CHECK(d.init.rope_theta == 1e6, "init.rope_theta %g", d.init.rope_theta);
    CHECK(d.init.init_std == 0.01, "init.init_std");
    CHECK(d.init.dtype == DTYPE_FP16, "init.dtype");
    CHECK(d.init.shards == 3, "init.shards");

    CHECK(d.prepare.n_inputs == 2, "prepare.n_inputs %d", d.prepare.n_inputs);
    CHECK(same_string(d.prepare.inputs[0], "a.jsonl"), "prepare.inputs[0]");
    CHECK(same_string(d.prepare.inputs[1], "b c.jsonl"), "prepare.inputs[1]");
    CHECK(same_string(d.prepare.output, "data/tokens.h5"), "prepare.output");
    CHECK(same_string(d.prepare.tokenizer, "tok/tokenizer.json"), "prepare.tokenizer");
    CHECK(d.prepare.bad_rows == BAD_ROWS_SKIP, "prepare.bad_rows");

    CHECK(d.score.n_sample_tokens == 10000000000LL, "score.n_sample_tokens");
    CHECK(d.score.tokens == SCORE_TOKENS_LOSS, "score.tokens");
    CHECK(d.score.coactivation == false, "score.coactivation");
    CHECK(same_string(d.score.output, "stats.h5"), "score.output");

    CHECK(d.select.n_stats == 2, "select.n_stats");
    CHECK(same_string(d.select.stats[0], "s1.h5") && same_string(d.select.stats[1], "s2.h5"),
          "select.stats");
    CHECK(d.select.score_function == SCORE_FUNCTION_GATE, "select.score_function");
    CHECK(d.select.top_p == 1.0, "select.top_p");
    CHECK(d.select.train_shared_experts == true, "select.train_shared_experts");
    CHECK(d.select.train_non_expert_modules == true, "select.train_non_expert_modules");
    CHECK(d.select.union_tasks == true, "select.union_tasks");
    CHECK(same_string(d.select.output, "cfg.json"), "select.output");

    CHECK(d.train.method == METHOD_LORA, "train.method");
    CHECK(same_string(d.train.expert_config, "cfg.json"), "train.expert_config");
    CHECK(d.train.lr == 3e-5, "train.lr");
    CHECK(d.train.weight_decay == 0.0, "train.weight_decay");
    CHECK(d.train.beta1 == 0.8, "train.beta1");
    CHECK(d.train.beta2 == 0.999, "train.beta2");
    CHECK(d.train.eps == 1e-6, "train.eps");
    CHECK(d.train.clip_grad == 0.5, "train.clip_grad");
    CHECK(d.train.aux_loss_coef == 0.001, "train.aux_loss_coef");
    CHECK(d.train.lr_schedule == LR_COSINE, "train.lr_schedule");
    CHECK(d.train.warmup_steps == 10, "train.warmup_steps");
    CHECK(d.train.steps == 100, "train.steps");
    CHECK(d.train.global_batch == 32, "train.global_batch");
    CHECK(d.train.micro_batch == 2, "train.micro_batch");
    CHECK(d.train.checkpoint_every == 0, "train.checkpoint_every");
    CHECK(d.train.keep_checkpoints == 5, "train.keep_checkpoints");
    CHECK(d.train.eval_every == 0, "train.eval_every");
    CHECK(d.train.log_every == 10, "train.log_every");
    CHECK(d.train.val_fraction == 0.1, "train.val_fraction");
    CHECK(same_string(d.train.resume, "never"), "train.resume");
    CHECK(d.train.export_merged == true, "train.export_merged");
    CHECK(d.train.recompute == false, "train.recompute");
    CHECK(d.train.lora_rank == 8, "train.lora.r");
    CHECK(d.train.lora_alpha == 32.5, "train.lora.alpha (a nested mapping)");
    CHECK(d.train.lora_rslora && d.train.lora_train_router, "train.lora.rslora, train_router");
    CHECK(d.train.n_lora_targets == 2 && same_string(d.train.lora_targets[0], "q_proj") &&
              same_string(d.train.lora_targets[1], "dense_mlp"),
          "train.lora.targets");

    CHECK(same_string(d.eval.adapter, "out/adapter.safetensors"), "eval.adapter");
    CHECK(d.eval.batch == 4, "eval.batch");

    /* positions: keys, sections; a key written nowhere is the file */
    char where[256];
    deck_where(&d, "train.lr", where, sizeof where);
    CHECK(strcmp(where, "full.yaml:59:3") == 0, "where train.lr: %s", where);
    deck_where(&d, "parallel.ep", where, sizeof where);
    CHECK(strcmp(where, "full.yaml:16:3") == 0, "where parallel.ep: %s", where);
    deck_where(&d, "eval.batch", where, sizeof where);
    CHECK(strcmp(where, "full.yaml:83:3") == 0, "where eval.batch: %s", where);
    deck_where(&d, "phase", where, sizeof where);
    CHECK(strcmp(where, "full.yaml:1:1") == 0, "where phase: %s", where);
    deck_where(&d, "eval", where, sizeof where);
    CHECK(strcmp(where, "full.yaml:81:1") == 0, "where section eval: %s", where);
    deck_free(&d);
}

static void test_defaults(void)
{
    struct deck d;
    deck_defaults(&d);
    CHECK(d.n_phases == 0, "no default phase");
    CHECK(same_string(d.run.name, "esft"), "run.name %s", d.run.name);
    CHECK(same_string(d.run.output_dir, "out/{name}"), "run.output_dir");
    CHECK(d.run.seed == 5934875, "run.seed %lld", d.run.seed);
    CHECK(d.run.backend == BACKEND_AUTO, "run.backend");
    CHECK(d.model.path == NULL, "model.path unset");
    CHECK(d.model.dtype == DTYPE_AUTO, "model.dtype");
    CHECK(d.data.path == NULL, "data.path unset");
    CHECK(d.data.seq_len == 4096, "data.seq_len");
    CHECK(d.data.pack == true, "data.pack");
    CHECK(d.parallel.pp == 1 && d.parallel.ep == 1, "parallel");
    CHECK(same_string(d.init.family, "qwen3_moe"), "init.family");
    CHECK(d.init.hidden_size == 64 && d.init.num_layers == 2 && d.init.num_heads == 4 &&
              d.init.num_kv_heads == 2 && d.init.head_dim == 16,
          "init shape");
    CHECK(d.init.vocab_size == 320, "init.vocab_size");
    CHECK(d.init.intermediate_size == 128 && d.init.moe_intermediate_size == 32 &&
              d.init.shared_expert_intermediate_size == 0,
          "init widths");
    CHECK(d.init.num_experts == 8 && d.init.top_k == 2, "init experts");
    CHECK(d.init.norm_topk_prob == true && d.init.tie_word_embeddings == false, "init bools");
    CHECK(d.init.rope_theta == 10000.0 && d.init.init_std == 0.02, "init doubles");
    CHECK(d.init.dtype == DTYPE_AUTO && d.init.shards == 1, "init dtype, shards");
    CHECK(d.prepare.n_inputs == 0 && d.prepare.output == NULL, "prepare unset");
    CHECK(same_string(d.prepare.tokenizer, "auto"), "prepare.tokenizer");
    CHECK(d.prepare.format == FORMAT_TEMPLATE && d.prepare.chat_template == NULL &&
              d.prepare.n_template_kwargs == 0 && d.prepare.date == NULL,
          "prepare.format, chat_template, template_kwargs, date");
    CHECK(d.prepare.bad_rows == BAD_ROWS_ABORT, "prepare.bad_rows");
    CHECK(d.score.n_sample_tokens == 131072, "score.n_sample_tokens");
    CHECK(d.score.tokens == SCORE_TOKENS_ALL && d.score.coactivation == true, "score");
    CHECK(same_string(d.score.output, "routing_stats.h5"), "score.output");
    CHECK(d.select.n_stats == 0, "select.stats empty");
    CHECK(d.select.score_function == SCORE_FUNCTION_TOKEN && d.select.top_p == 0.2, "select");
    CHECK(!d.select.train_shared_experts && !d.select.train_non_expert_modules &&
              !d.select.union_tasks,
          "select bools");
    CHECK(same_string(d.select.output, "expert_config.json"), "select.output");
    CHECK(d.train.method == METHOD_ESFT && d.train.expert_config == NULL, "train.method");
    CHECK(d.train.lr == 1e-5 && d.train.weight_decay == 0.1, "train lr, wd");
    CHECK(d.train.beta1 == 0.9 && d.train.beta2 == 0.95 && d.train.eps == 1e-8, "adamw");
    CHECK(d.train.clip_grad == 1.0 && d.train.aux_loss_coef == 0.0, "clip, aux");
    CHECK(d.train.lr_schedule == LR_CONSTANT && d.train.warmup_steps == 0, "schedule");
    CHECK(d.train.steps == 500 && d.train.global_batch == 16 && d.train.micro_batch == 1,
          "steps, batches");
    CHECK(same_string(d.train.resume, "auto"), "train.resume");
    CHECK(d.train.recompute == false && d.train.export_merged == false, "train bools");
    CHECK(d.train.lora_rank == 8 && d.train.lora_alpha == 16.0 && !d.train.lora_rslora &&
              !d.train.lora_train_router && d.train.n_lora_targets == 4 &&
              same_string(d.train.lora_targets[3], "o_proj"),
          "lora");
    CHECK(d.eval.adapter == NULL && d.eval.batch == 1, "eval");
    CHECK(d.origins != NULL && d.origins[0].kind == ORIGIN_DEFAULT, "origins default");
    deck_free(&d);
    deck_free(&d); /* safe twice: pointers were cleared */
}

static void test_phases(void)
{
    struct deck d;
    char err[ERR_SIZE];
    CHECK(parse(&d, "p.yaml", "phase: select\n", err) == 0, "scalar phase: %s", err);
    CHECK(d.n_phases == 1 && d.phases[0] == PHASE_SELECT, "scalar phase value");
    CHECK(deck_finish(&d, err, sizeof err) == 0, "select needs nothing: %s", err);
    deck_free(&d);

    CHECK(parse(&d, "p.yaml", "phase:\n  - eval\n  - init\n", err) == 0, "block list: %s", err);
    CHECK(d.n_phases == 2 && d.phases[0] == PHASE_EVAL && d.phases[1] == PHASE_INIT, "order kept");
    deck_free(&d);

    CHECK(strcmp(phase_name(PHASE_PREPARE), "prepare") == 0, "phase_name");
    CHECK(strcmp(phase_name(PHASE_EVAL), "eval") == 0, "phase_name eval");
}

/* Which phases each key changes the result of (sweeps share the phases that read no
 * swept key), and the sweep block, which the deck's parser passes over for sweep.c. */
static void test_readers(void)
{
    unsigned r = 0;
    CHECK(deck_key_readers("select.top_p", &r) == 0 && r == 1u << PHASE_SELECT,
          "select.top_p read by select alone: %#x", r);
    CHECK(deck_key_readers("train.lr", &r) == 0 && r == 1u << PHASE_TRAIN, "train.lr: %#x", r);
    CHECK(deck_key_readers("score.output", &r) == 0 &&
              r == ((1u << PHASE_SCORE) | (1u << PHASE_SELECT)),
          "score.output read by score and select: %#x", r);
    CHECK(deck_key_readers("select.output", &r) == 0 &&
              r == ((1u << PHASE_SELECT) | (1u << PHASE_TRAIN)),
          "select.output read by select and train: %#x", r);
    CHECK(deck_key_readers("run.seed", &r) == 0 && (r & (1u << PHASE_INIT)) &&
              (r & (1u << PHASE_TRAIN)) && !(r & (1u << PHASE_PREPARE)),
          "run.seed: %#x", r);
    CHECK(deck_key_readers("data.seq_len", &r) == 0 &&
              r == ((1u << PHASE_SCORE) | (1u << PHASE_TRAIN) | (1u << PHASE_EVAL)),
          "data.seq_len: %#x", r);
    CHECK(deck_key_readers("parallel.ep", &r) == 0 && r == 0, "the layout: %#x", r);
    CHECK(deck_key_readers("phase", &r) == 0 && r == (1u << PHASE_COUNT) - 1, "phase: %#x", r);
    CHECK(deck_key_readers("train.lora.r", &r) == 0 && r == 1u << PHASE_TRAIN, "lora.r: %#x", r);
    CHECK(deck_key_readers("select.top", &r) == -1, "unknown key");
    CHECK(deck_key_readers("sweep.mode", &r) == -1, "the sweep block is no key of the deck");

    struct deck d;
    char err[ERR_SIZE];
    CHECK(parse(&d, "s.yaml", "phase: select\nsweep:\n  select.top_p: [0.1, 0.2]\n  "
                "nonsense: {a: b}\nselect: {top_p: 0.3}\n", err) == 0,
          "a sweep block is passed over: %s", err);
    CHECK(d.select.top_p == 0.3, "the deck's own value stays: %g", d.select.top_p);
    deck_free(&d);
}

/* One small bad deck, one expected error at an exact position. */
static void expect_error(const char *text, const char *prefix, const char *message)
{
    struct deck d;
    char err[ERR_SIZE];
    int n = parse(&d, "t.yaml", text, err);
    if (n == 0) n = deck_finish(&d, err, sizeof err);
    CHECK(n >= 1 && has_error(err, prefix, message), "deck:\n%s\nwant %s ...%s...\ngot (%d):\n%s",
          text, prefix, message, n, err);
    deck_free(&d);
}

static void test_errors(void)
{
    expect_error("phase: score\ntrain:\n  lrr: 1\n",
                 "t.yaml:3:3: ", "unknown key train.lrr (did you mean train.lr?)");
    expect_error("phase: score\ntrain:\n  seed: 1\n",
                 "t.yaml:3:3: ", "unknown key train.seed (did you mean run.seed?)");
    expect_error("phase: score\ntrain:\n  zzzzzz: 1\n", "t.yaml:3:3: ", "unknown key train.zzzzzz");
    expect_error("phase: score\ntrian:\n  lr: 1\n",
                 "t.yaml:2:1: ", "unknown section 'trian' (did you mean train?)");
    expect_error("phase: score\nlr: 1\n",
                 "t.yaml:2:1: ", "unknown section 'lr' (did you mean train.lr?)");
    expect_error("phase: train\ntrain:\n  lr: abc\n",
                 "t.yaml:3:7: ", "train.lr: expected a number, got 'abc'");
    expect_error("train: {lr: nan}\n", "t.yaml:1:13: ", "train.lr: expected a number, got 'nan'");
    expect_error("train: {lr: inf}\n", "t.yaml:1:13: ", "train.lr: expected a number, got 'inf'");
    expect_error("train: {lr: 1e999}\n", "t.yaml:1:13: ", "train.lr: '1e999' is too large");
    expect_error("train: {lr: 1e-5x}\n", "t.yaml:1:13: ", "expected a number, got '1e-5x'");
    expect_error("train:\n  steps: 1.5\n",
                 "t.yaml:2:10: ", "train.steps: expected an integer, got '1.5'");
    expect_error("train:\n  steps: 1_000\n", "t.yaml:2:10: ", "expected an integer, got '1_000'");
    expect_error("data:\n  seq_len: 3000000000\n",
                 "t.yaml:2:12: ", "data.seq_len: '3000000000' does not fit in a 32-bit integer");
    expect_error("phase: score\nscore:\n  n_sample_tokens: 99999999999999999999\n", "t.yaml:3:20: ",
                 "score.n_sample_tokens: '99999999999999999999' does not fit in a 64-bit integer");
    expect_error("parallel:\n  ep: 0\n", "t.yaml:2:7: ", "parallel.ep: must be >= 1, got 0");
    expect_error("select: {top_p: 0}\n", "t.yaml:1:17: ", "select.top_p: must be in (0, 1], got 0");
    expect_error("train:\n  beta2: 1\n", "t.yaml:2:10: ", "train.beta2: must be in [0, 1), got 1");
    expect_error("train:\n  lr: -1e-5\n", "t.yaml:2:7: ", "train.lr: must be >= 0, got -1e-5");
    expect_error("train:\n  method: foo\n", "t.yaml:2:11: ",
                 "train.method: 'foo' is not one of esft, full, frozen_router, lora, densemixer");
    expect_error("init:\n  family: llama\n", "t.yaml:2:11: ",
                 "init.family: 'llama' is not one of qwen2_moe, qwen3_moe, olmoe, mixtral");
    expect_error("data: {pack: maybe}\n",
                 "t.yaml:1:14: ", "data.pack: expected true or false, got 'maybe'");
    expect_error("train:\n  lr: 1\n  lr: 2\n",
                 "t.yaml:3:3: ", "train.lr: duplicate key (first at 2:3)");
    expect_error("phase: score\nphase: train\n",
                 "t.yaml:2:1: ", "phase: duplicate key (first at 1:1)");
    expect_error("train:\n  lr: 1\nrun: {}\ntrain:\n  eps: 1\n",
                 "t.yaml:4:1: ", "duplicate section train (first at 1:1)");
    expect_error("train:\n  lr: {a: 1}\n",
                 "t.yaml:2:7: ", "train.lr: expected a number, got a mapping");
    expect_error("run:\n  name: [a, b]\n",
                 "t.yaml:2:9: ", "run.name: expected a string, got a list");
    expect_error("phase: score\nrun: fast\n",
                 "t.yaml:2:6: ", "run: expected a mapping of keys, got 'fast'");
    expect_error("phase: {score: 1}\n", "t.yaml:1:8: ", "phase: expected a phase name or a list");
    expect_error("prepare: {inputs: [a, [b]]}\n",
                 "t.yaml:1:23: ", "prepare.inputs: expected a string, got a list");
    expect_error("run: {name: \"\"}\n", "t.yaml:1:13: ", "run.name: must not be empty");
    expect_error("run:\n  name:\n", "t.yaml:2:8: ", "run.name: expected a string, got nothing");
    expect_error("phase: score\ntrain: [1, 2\n", "t.yaml:3:1: ", "malformed YAML: ");
    expect_error("phase: score\nmodel:\n\tpath: m\n", "t.yaml:3:1: ", "malformed YAML: ");
    expect_error("", "t.yaml:1:1: ", "empty deck");
    expect_error("# just a comment\n\n", "t.yaml:1:1: ", "empty deck");
    expect_error("- phase\n- train\n", "t.yaml:1:1: ", "a deck is a mapping of sections");
    expect_error("score\n", "t.yaml:1:1: ", "a deck is a mapping of sections");
    expect_error("phase: score\n---\nphase: train\n", "t.yaml:2:1: ", "one YAML document");
    expect_error("phase: score\ntrain: {lr: &x 1, eps: *x}\n",
                 "t.yaml:2:13: ", "train.lr: anchors and aliases are not supported");
    expect_error("phase: score\ntrain: {lr: &x 1, eps: *x}\n",
                 "t.yaml:2:24: ", "train.eps: anchors and aliases are not supported");
    expect_error("parallel:\n  dp: 2\n",
                 "t.yaml:2:3: ", "parallel.dp is derived from the world size");
    expect_error("phase: trian\n", "t.yaml:1:8: ",
                 "phase: 'trian' is not one of init, prepare, score, select, train, eval");
    expect_error("phase: [score, select, score]\n",
                 "t.yaml:1:24: ", "phase: 'score' is listed twice");
    expect_error("phase: []\n", "t.yaml:1:8: ",
                 "phase: expected a phase name or a list of phase names, got an empty list");
    expect_error("run: {name: x}\n", "t.yaml:1:1: ", "phase is required");
    expect_error("run: {name: x}\nphase:\n", "t.yaml:2:1: ", "phase is required");
}

static void test_many_errors(void)
{
    const char *text = "phase: [score, trian]\n"
                       "run:\n"
                       "  nmae: x\n"
                       "  seed: -4\n"
                       "data:\n"
                       "  seq_len: ten\n"
                       "parallel:\n"
                       "  pp: 0\n";
    struct deck d;
    char err[ERR_SIZE];
    int n = parse(&d, "m.yaml", text, err);
    CHECK(n == 5, "five errors, got %d:\n%s", n, err);
    CHECK(count_lines(err) == 5, "one line each:\n%s", err);
    CHECK(has_error(err, "m.yaml:1:16: ", "phase: 'trian' is not one of"), "%s", err);
    CHECK(has_error(err, "m.yaml:3:3: ", "unknown key run.nmae (did you mean run.name?)"), "%s",
          err);
    CHECK(has_error(err, "m.yaml:4:9: ", "run.seed: must be >= 0, got -4"), "%s", err);
    CHECK(has_error(err, "m.yaml:6:12: ", "data.seq_len: expected an integer, got 'ten'"), "%s",
          err);
    CHECK(has_error(err, "m.yaml:8:7: ", "parallel.pp: must be >= 1, got 0"), "%s", err);
    /* a rejected value leaves the default in place */
    CHECK(d.run.seed == 5934875 && d.parallel.pp == 1, "defaults kept");
    deck_free(&d);

    /* a small buffer is cut, stays terminated, and every error is still counted */
    char small[24];
    memset(&d, 0, sizeof d); /* a zeroed deck: deck_parse fills the defaults itself */
    n = deck_parse(&d, "m.yaml", text, strlen(text), small, sizeof small);
    CHECK(n == 5, "count with small buffer %d", n);
    CHECK(strlen(small) < sizeof small, "small buffer terminated");
    CHECK(strncmp(small, "m.yaml:1:16: phase:", 19) == 0, "small buffer starts: %s", small);
    deck_free(&d);
    deck_defaults(&d);
    n = deck_parse(&d, "m.yaml", text, strlen(text), NULL, 0);
    CHECK(n == 5, "count with no buffer %d", n);
    deck_free(&d);
}

static void test_overrides(void)
{
    struct deck d;
    char err[ERR_SIZE];
    CHECK(parse(&d, "o.yaml", "phase: score\ntrain:\n  lr: 1e-4\n", err) == 0, "%s", err);

    CHECK(deck_override(&d, "train.lr=3e-5", err, sizeof err) == 0, "lr override: %s", err);
    CHECK(d.train.lr == 3e-5, "lr overridden %g", d.train.lr);
    char where[256];
    deck_where(&d, "train.lr", where, sizeof where);
    CHECK(strcmp(where, "command line") == 0, "where override: %s", where);
    CHECK(d.origins[0].kind == ORIGIN_FILE, "phase from file");

    CHECK(deck_override(&d, "phase=[score, select]", err, sizeof err) == 0, "%s", err);
    CHECK(d.n_phases == 2 && d.phases[0] == PHASE_SCORE && d.phases[1] == PHASE_SELECT,
          "phase list override");
    CHECK(deck_override(&d, "phase=train", err, sizeof err) == 0, "%s", err);
    CHECK(d.n_phases == 1 && d.phases[0] == PHASE_TRAIN, "phase scalar override");
    CHECK(deck_override(&d, "prepare.inputs=[x.jsonl, \"y z.jsonl\"]", err, sizeof err) == 0, "%s",
          err);
    CHECK(d.prepare.n_inputs == 2 && same_string(d.prepare.inputs[1], "y z.jsonl"),
          "list override");
    CHECK(deck_override(&d, "prepare.inputs=one.jsonl", err, sizeof err) == 0, "%s", err);
    CHECK(d.prepare.n_inputs == 1 && same_string(d.prepare.inputs[0], "one.jsonl"), "single entry");
    CHECK(deck_override(&d, "data.pack=off", err, sizeof err) == 0 && d.data.pack == false, "bool");
    CHECK(deck_override(&d, "run.name=my run", err, sizeof err) == 0 &&
              same_string(d.run.name, "my run"),
          "string with a space");
    CHECK(deck_override(&d, "train.expert_config=cfg.json", err, sizeof err) == 0 &&
              same_string(d.train.expert_config, "cfg.json"),
          "optional string set");
    CHECK(deck_override(&d, "train.expert_config=", err, sizeof err) == 0 &&
              d.train.expert_config == NULL,
          "optional string unset");
    CHECK(deck_override(&d, "init.family=olmoe", err, sizeof err) == 0 &&
              same_string(d.init.family, "olmoe"),
          "choice");
    CHECK(deck_override(&d, "score.n_sample_tokens=5000000000", err, sizeof err) == 0 &&
              d.score.n_sample_tokens == 5000000000LL,
          "int64");

    /* bad overrides: exact messages, value and origin unchanged */
    CHECK(deck_override(&d, "train.lr=abc", err, sizeof err) == 1, "bad number");
    CHECK(strcmp(err, "command line: train.lr=abc: expected a number, got 'abc'\n") == 0, "%s",
          err);
    CHECK(d.train.lr == 3e-5, "value kept");
    CHECK(deck_override(&d, "train.lrr=1", err, sizeof err) == 1, "unknown key");
    CHECK(strcmp(err,
                 "command line: train.lrr=1: unknown key train.lrr (did you mean train.lr?)\n") ==
              0,
          "%s", err);
    CHECK(deck_override(&d, "lr=1", err, sizeof err) == 1 &&
              strcmp(err, "command line: lr=1: unknown key lr (did you mean train.lr?)\n") == 0,
          "%s", err);
    CHECK(deck_override(&d, "trian.lr=1", err, sizeof err) == 1 &&
              has_error(err, "command line: trian.lr=1: ", "did you mean train?"),
          "%s", err);
    CHECK(deck_override(&d, "parallel.dp=2", err, sizeof err) == 1 &&
              has_error(err, "command line: parallel.dp=2: ", "derived from the world size"),
          "%s", err);
    CHECK(deck_override(&d, "parallel.ep=0", err, sizeof err) == 1 &&
              strcmp(err, "command line: parallel.ep=0: must be >= 1, got 0\n") == 0,
          "%s", err);
    CHECK(deck_override(&d, "train.method=foo", err, sizeof err) == 1 &&
              has_error(err, "command line: train.method=foo: ", "'foo' is not one of esft"),
          "%s", err);
    CHECK(deck_override(&d, "train.lr", err, sizeof err) == 1 &&
              strcmp(err, "command line: train.lr: expected key.path=value\n") == 0,
          "%s", err);
    CHECK(deck_override(&d, "=3", err, sizeof err) == 1, "no key");
    CHECK(deck_override(&d, "phase=[score, nope]", err, sizeof err) == 1 &&
              has_error(err, "command line: phase=[score, nope]: ", "'nope' is not one of init"),
          "%s", err);
    CHECK(d.n_phases == 1 && d.phases[0] == PHASE_TRAIN, "phases kept");
    CHECK(deck_override(&d, "train.lr=[1, 2]", err, sizeof err) == 1 &&
              has_error(err, "command line: ", "expected a number, got a list"),
          "%s", err);
    CHECK(deck_override(&d, "phase=[score", err, sizeof err) == 1 &&
              has_error(err, "command line: phase=[score: ", "malformed value"),
          "%s", err);
    CHECK(deck_override(&d, "run.name=", err, sizeof err) == 1 &&
              has_error(err, "command line: run.name=: ", "expected a string, got nothing"),
          "%s", err);
    CHECK(same_string(d.run.name, "my run"), "name kept");
    deck_free(&d);

    /* overrides alone, with no file: requirements are placed on the command line */
    deck_defaults(&d);
    CHECK(deck_override(&d, "phase=eval", err, sizeof err) == 0, "%s", err);
    int n = deck_finish(&d, err, sizeof err);
    CHECK(n == 2, "eval needs model and data: %d\n%s", n, err);
    CHECK(has_error(err, "command line: ", "model.path is required by phase eval"), "%s", err);
    deck_free(&d);
}

static void test_where(void)
{
    struct deck d;
    char err[ERR_SIZE], where[256];
    CHECK(parse(&d, "w.yaml", "phase: score\ntrain:\n  steps: 7\n", err) == 0, "%s", err);
    deck_where(&d, "train.steps", where, sizeof where);
    CHECK(strcmp(where, "w.yaml:3:3") == 0, "file key: %s", where);
    deck_where(&d, "train.lr", where, sizeof where);
    CHECK(strcmp(where, "w.yaml") == 0, "default key: %s", where);
    deck_where(&d, "train", where, sizeof where);
    CHECK(strcmp(where, "w.yaml:2:1") == 0, "section: %s", where);
    deck_where(&d, "run", where, sizeof where);
    CHECK(strcmp(where, "w.yaml") == 0, "absent section: %s", where);
    deck_where(&d, "no.such", where, sizeof where);
    CHECK(strcmp(where, "w.yaml") == 0, "unknown key: %s", where);
    char tiny[4];
    deck_where(&d, "train.steps", tiny, sizeof tiny);
    CHECK(strcmp(tiny, "w.y") == 0, "truncated where: %s", tiny);
    deck_free(&d);
}

static int finish_count(const char *text, char *err)
{
    struct deck d;
    int n = parse(&d, "r.yaml", text, err);
    if (n == 0)
        n = deck_finish(&d, err, ERR_SIZE);
    else
        n = -n;
    deck_free(&d);
    return n;
}

static void test_requirements(void)
{
    char err[ERR_SIZE];
    CHECK(finish_count("phase: init\n", err) == 1 &&
              has_error(err, "r.yaml:1:1: ", "model.path is required by phase init"),
          "%s", err);
    CHECK(finish_count("phase: init\nmodel:\n  dtype: fp32\n", err) == 1 &&
              has_error(err, "r.yaml:2:1: ", "model.path is required by phase init"),
          "section position: %s", err);
    CHECK(finish_count("phase: init\nmodel: {path: m}\n", err) == 0, "init ok: %s", err);

    CHECK(finish_count("phase: prepare\nprepare: {tokenizer: byte}\n", err) == 2, "%s", err);
    CHECK(has_error(err, "r.yaml:2:1: ", "prepare.inputs is required by phase prepare"), "%s", err);
    CHECK(has_error(err, "r.yaml:2:1: ", "prepare.output is required by phase prepare"), "%s", err);
    CHECK(finish_count("phase: prepare\nprepare: {inputs: a.jsonl, output: t.h5}\n", err) == 0,
          "prepare ok: %s", err);

    CHECK(finish_count("phase: score\n", err) == 2, "%s", err);
    CHECK(has_error(err, "r.yaml:1:1: ", "model.path is required by phase score"), "%s", err);
    CHECK(has_error(err, "r.yaml:1:1: ", "data.path is required by phase score"), "%s", err);
    CHECK(finish_count("phase: score\nmodel: {path: m}\ndata: {path: d}\n", err) == 0, "%s", err);

    CHECK(finish_count("phase: select\n", err) == 0, "select needs nothing: %s", err);

    const char *train = "phase: train\nmodel: {path: m}\ndata: {path: d}\ntrain:\n  lr: 1e-5\n";
    CHECK(finish_count(train, err) == 1 &&
              has_error(err, "r.yaml:4:1: ",
                        "train.expert_config is required by phase train (method esft)"),
          "%s", err);
    CHECK(finish_count("phase: train\nmodel: {path: m}\ndata: {path: d}\ntrain: {method: full}\n",
                       err) == 0,
          "full needs no expert config: %s", err);
    CHECK(finish_count("phase: train\nmodel: {path: m}\ndata: {path: d}\n"
                       "train: {expert_config: e.json}\n",
                       err) == 0,
          "esft with config: %s", err);

    CHECK(finish_count("phase: eval\nmodel: {path: m}\n", err) == 1 &&
              has_error(err, "r.yaml:1:1: ", "data.path is required by phase eval"),
          "%s", err);
    /* the first phase needing a key, in deck order, is named */
    CHECK(finish_count("phase: [eval, score]\ndata: {path: d}\n", err) == 1 &&
              has_error(err, "r.yaml:1:1: ", "model.path is required by phase eval"),
          "%s", err);

    /* keys that constrain each other */
    CHECK(
        finish_count("phase: init\nmodel: {path: m}\ninit:\n  num_heads: 6\n  num_kv_heads: 4\n",
                     err) == 1 &&
            has_error(err, "r.yaml:5:3: ", "init.num_kv_heads (4) must divide init.num_heads (6)"),
        "%s", err);
    CHECK(finish_count("phase: init\nmodel: {path: m}\ninit: {top_k: 9}\n", err) == 1 &&
              has_error(err, "r.yaml:3:8: ", "init.top_k (9) is larger than init.num_experts (8)"),
          "%s", err);
    CHECK(finish_count("phase: init\nmodel: {path: m}\ninit: {head_dim: 15}\n", err) == 1 &&
              has_error(err, "r.yaml:3:8: ", "init.head_dim (15) must be even"),
          "%s", err);
    CHECK(
        finish_count("phase: train\nmodel: {path: m}\ndata: {path: d}\n"
                     "train: {method: full, steps: 5, warmup_steps: 6}\n",
                     err) == 1 &&
            has_error(err, "r.yaml:4:33: ", "train.warmup_steps (6) is more than train.steps (5)"),
        "%s", err);
#ifdef HAVE_CUDA
    CHECK(finish_count("phase: select\nrun:\n  backend: cuda\n", err) == 0, "%s", err);
#else
    CHECK(finish_count("phase: select\nrun:\n  backend: cuda\n", err) == 1 &&
              has_error(err, "r.yaml:3:3: ", "run.backend: cuda: this esft was built without CUDA"),
          "%s", err);
#endif
    CHECK(finish_count("phase: select\nrun:\n  backend: cpu-devsim\n", err) == 0, "%s", err);
    /* model.dtype: fp32, or tf32 and bf16 on the GPU; fp16 is refused, not ignored */
    CHECK(finish_count("phase: eval\nmodel: {path: m, dtype: fp16}\ndata: {path: d}\n", err) == 1 &&
              has_error(err, "r.yaml:2:18: ", "model.dtype: fp16 is not implemented"), "%s", err);
    CHECK(finish_count("phase: eval\nmodel: {path: m, dtype: bf16}\ndata: {path: d}\n", err) == 1 &&
              has_error(err, "r.yaml:2:18: ", "model.dtype: bf16 is a mode of the GPU's tensor cores"),
          "%s", err);
    CHECK(finish_count("phase: eval\nmodel: {path: m, dtype: tf32}\ndata: {path: d}\n", err) == 1 &&
              has_error(err, "r.yaml:2:18: ", "model.dtype: tf32 is a mode of the GPU's tensor cores"),
          "%s", err);
    CHECK(finish_count("phase: select\nmodel: {dtype: fp16}\n", err) == 0, "%s", err);
    /* model.frozen_weights: fp32 (the default) or bf16, on every backend; nothing else */
    {
        struct deck fw;
        CHECK(parse(&fw, "r.yaml", "phase: eval\nmodel: {path: m, frozen_weights: bf16}\n", err) ==
                      0 &&
                  fw.model.frozen_weights == FROZEN_BF16,
              "model.frozen_weights: bf16: %s", err);
        deck_free(&fw);
        CHECK(parse(&fw, "r.yaml", "phase: eval\nmodel: {path: m}\n", err) == 0 &&
                  fw.model.frozen_weights == FROZEN_FP32,
              "model.frozen_weights defaults to fp32: %s", err);
        deck_free(&fw);
        CHECK(parse(&fw, "r.yaml", "phase: eval\nmodel: {path: m, frozen_weights: fp8}\n", err) !=
                      0 &&
                  has_error(err, "r.yaml:2:", "model.frozen_weights"),
              "model.frozen_weights: fp8 refused by file:line: %s", err);
        deck_free(&fw);
    }
    CHECK(finish_count("phase: select\nselect: {bootstrap: 100, union_tasks: true}\n", err) == 1 &&
              has_error(err, "", "select.bootstrap with select.union_tasks is not implemented"),
          "%s", err);
    CHECK(finish_count("phase: select\nselect: {bootstrap: 100}\n", err) == 0, "%s", err);
    CHECK(finish_count("phase: train\nmodel: {path: m}\ndata: {path: d}\n"
                       "train: {method: full, recompute: true}\n", err) == 0, "%s", err);
#ifdef HAVE_CUDA
    CHECK(finish_count("phase: eval\nrun: {backend: cuda}\nmodel: {path: m, dtype: tf32}\n"
                       "data: {path: d}\n", err) == 0, "%s", err);
#endif
    /* run.backend auto: the environment's ESFT_BACKEND, which must name a backend */
    const char *saved = getenv("ESFT_BACKEND");
    setenv("ESFT_BACKEND", "gpu", 1);
    CHECK(finish_count("phase: select\n", err) == 1 &&
              has_error(err, "", "ESFT_BACKEND=gpu names no backend"), "%s", err);
    setenv("ESFT_BACKEND", "cpu-devsim", 1);
    CHECK(finish_count("phase: select\nrun:\n  backend: cpu\n", err) == 0, "%s", err);
    if (saved) setenv("ESFT_BACKEND", saved, 1);
    else unsetenv("ESFT_BACKEND");
    /* init keys are not checked when init does not run */
    CHECK(finish_count("phase: select\ninit: {top_k: 9}\n", err) == 0, "%s", err);
}

/* Values deck_finish derives: run.output_dir's {name}, and train.expert_config from
 * select's output when select runs in the same deck. */
static void test_derived(void)
{
    char err[ERR_SIZE];
    struct deck d;
    CHECK(parse(&d, "r.yaml", "phase: [select, train]\nmodel: {path: m}\ndata: {path: d}\n", err) == 0,
          "%s", err);
    CHECK(deck_override(&d, "run.name=lr3e-5", err, ERR_SIZE) == 0, "%s", err);
    CHECK(deck_finish(&d, err, ERR_SIZE) == 0, "select then train needs no expert_config: %s", err);
    CHECK(same_string(d.run.output_dir, "out/lr3e-5"), "output_dir follows run.name: %s",
          d.run.output_dir);
    CHECK(same_string(d.train.expert_config, "out/lr3e-5/expert_config.json"),
          "expert_config from select: %s", d.train.expert_config);
    deck_free(&d);
    CHECK(parse(&d, "r.yaml", "phase: train\nrun:\n  name: a\n  output_dir: runs/{name}/x\n"
                "model: {path: m}\ndata: {path: d}\ntrain: {method: full}\n", err) == 0, "%s", err);
    CHECK(deck_finish(&d, err, ERR_SIZE) == 0, "%s", err);
    CHECK(same_string(d.run.output_dir, "runs/a/x"), "{name} inside: %s", d.run.output_dir);
    CHECK(d.train.expert_config == NULL, "no select, no default expert_config");
    deck_free(&d);
    CHECK(parse(&d, "r.yaml", "phase: train\nrun: {output_dir: fixed}\n"
                "model: {path: m}\ndata: {path: d}\ntrain: {method: full}\n", err) == 0, "%s", err);
    CHECK(deck_finish(&d, err, ERR_SIZE) == 0, "%s", err);
    CHECK(same_string(d.run.output_dir, "fixed"), "an explicit directory stays: %s", d.run.output_dir);
    deck_free(&d);
}

/* Every field, written out, so that a key the printer forgets shows up here. */
static void check_same(const struct deck *a, const struct deck *b, const char *what)
{
#define SAME(f) CHECK(a->f == b->f, "%s: " #f " differs", what)
#define SAME_DOUBLE(f)                                                                             \
    CHECK(memcmp(&a->f, &b->f, sizeof(double)) == 0, "%s: " #f " %.17g vs %.17g", what, a->f, b->f)
#define SAME_STR(f)                                                                                \
    CHECK(same_string(a->f, b->f), "%s: " #f " '%s' vs '%s'", what, a->f ? a->f : "(null)",        \
          b->f ? b->f : "(null)")
    SAME(n_phases);
    for (int i = 0; i < a->n_phases && i < PHASE_COUNT; i++) SAME(phases[i]);
    SAME_STR(run.name);
    SAME_STR(run.output_dir);
    SAME(run.seed);
    SAME(run.backend);
    SAME_STR(model.path);
    SAME(model.dtype);
    SAME_STR(data.path);
    SAME(data.seq_len);
    SAME(data.pack);
    SAME(parallel.pp);
    SAME(parallel.ep);
    SAME(parallel.dp);
    SAME_STR(init.family);
    SAME(init.hidden_size);
    SAME(init.num_layers);
    SAME(init.num_heads);
    SAME(init.num_kv_heads);
    SAME(init.head_dim);
    SAME(init.vocab_size);
    SAME(init.intermediate_size);
    SAME(init.sliding_window);
    SAME_DOUBLE(init.swiglu_limit);
    SAME(init.moe_intermediate_size);
    SAME(init.shared_expert_intermediate_size);
    SAME(init.num_experts);
    SAME(init.top_k);
    SAME(init.norm_topk_prob);
    SAME(init.tie_word_embeddings);
    SAME_DOUBLE(init.rope_theta);
    SAME_DOUBLE(init.init_std);
    SAME(init.dtype);
    SAME(init.shards);
    SAME(prepare.n_inputs);
    for (int i = 0; i < a->prepare.n_inputs && i < DECK_MAX_LIST; i++) SAME_STR(prepare.inputs[i]);
    SAME_STR(prepare.output);
    SAME_STR(prepare.tokenizer);
    SAME(prepare.bad_rows);
    SAME(score.n_sample_tokens);
    SAME(score.tokens);
    SAME(score.coactivation);
    SAME_STR(score.output);
    SAME(select.n_stats);
    for (int i = 0; i < a->select.n_stats && i < DECK_MAX_LIST; i++) SAME_STR(select.stats[i]);
    SAME(select.score_function);
    SAME_DOUBLE(select.top_p);
    SAME(select.train_shared_experts);
    SAME(select.train_non_expert_modules);
    SAME(select.union_tasks);
    SAME_STR(select.output);
    SAME(train.method);
    SAME_STR(train.expert_config);
    SAME_DOUBLE(train.lr);
    SAME_DOUBLE(train.weight_decay);
    SAME_DOUBLE(train.beta1);
    SAME_DOUBLE(train.beta2);
    SAME_DOUBLE(train.eps);
    SAME_DOUBLE(train.clip_grad);
    SAME_DOUBLE(train.aux_loss_coef);
    SAME(train.lr_schedule);
    SAME(train.warmup_steps);
    SAME(train.steps);
    SAME(train.global_batch);
    SAME(train.micro_batch);
    SAME(train.checkpoint_every);
    SAME(train.keep_checkpoints);
    SAME(train.eval_every);
    SAME(train.log_every);
    SAME_DOUBLE(train.val_fraction);
    SAME_STR(train.resume);
    SAME(train.export_merged);
    SAME(train.recompute);
    SAME(train.lora_rank);
    SAME_DOUBLE(train.lora_alpha);
    SAME(train.lora_rslora);
    SAME(train.lora_train_router);
    SAME(train.n_lora_targets);
    SAME_STR(eval.adapter);
    SAME(eval.batch);
#undef SAME
#undef SAME_DOUBLE
#undef SAME_STR
}

/* deck_print -> text; the caller frees. */
static char *print_to_string(const struct deck *d)
{
    char *text = NULL;
    size_t size = 0;
    FILE *out = open_memstream(&text, &size);
    deck_print(d, out);
    fclose(out);
    return text;
}

static void round_trip(const struct deck *d, const char *what)
{
    char *text = print_to_string(d);
    struct deck back;
    char err[ERR_SIZE];
    int n = parse(&back, "printed.yaml", text, err);
    CHECK(n == 0, "%s: printed deck does not parse:\n%s\n%s", what, err, text);
    check_same(d, &back, what);
    deck_free(&back);
    free(text);
}

static void replace(char **field, const char *value)
{
    free(*field);
    *field = value ? strdup(value) : NULL;
}

static void test_round_trip(void)
{
    struct deck d;
    deck_defaults(&d);
    round_trip(&d, "defaults");
    char *text = print_to_string(&d);
    CHECK(strstr(text, "\n  lr: 1e-05") != NULL, "default lr printed:\n%s", text);
    CHECK(strstr(text, "\n  path: ~") != NULL, "unset path printed as ~");
    CHECK(strstr(text, "\nphase: ~") != NULL, "no phase printed as ~");
    free(text);
    deck_free(&d);

    char err[ERR_SIZE];
    CHECK(parse(&d, "full.yaml", full_deck, err) == 0, "%s", err);
    round_trip(&d, "full deck");
    text = print_to_string(&d);
    /* set keys carry no comment; defaulted ones do */
    CHECK(strstr(text, "\n  seq_len: 512\n") != NULL, "set key without comment:\n%s", text);
    CHECK(strstr(text, "\nphase: [prepare, score, select, train, eval]\n") != NULL, "phases");
    CHECK(strstr(text, "\n  inputs: [\"a.jsonl\", \"b c.jsonl\"]\n") != NULL, "list");
    free(text);
    deck_free(&d);

    /* values that YAML would misread if printed carelessly */
    CHECK(parse(&d, "x.yaml", "phase: [train, select]\n", err) == 0, "%s", err);
    replace(&d.run.name, "quote\"back\\slash\nnewline\ttab: #hash");
    replace(&d.run.output_dir, "yes");
    replace(&d.model.path, " leading space, trailing ");
    replace(&d.data.path, "123");
    replace(&d.train.resume, "~");
    replace(&d.train.expert_config, "- [x] {y}: 'z' & *a !b %c @d `e");
    replace(&d.eval.adapter, "\xc3\xbc"
                             "n"
                             "\xc3\xaf"
                             "c"
                             "\xc3\xb6"
                             "d"
                             "\xc3\xa9"
                             " \x01 ctrl");
    replace(&d.score.output, "null");
    d.prepare.n_inputs = 3;
    d.prepare.inputs[0] = strdup("a, b");
    d.prepare.inputs[1] = strdup("]");
    d.prepare.inputs[2] = strdup("true");
    d.train.lr = 0.1 + 0.2; /* 0.30000000000000004 */
    d.train.val_fraction = 1.0 / 3.0;
    d.init.init_std = 5e-324; /* smallest subnormal */
    d.init.rope_theta = 1e20;
    d.train.lora_alpha = 123456789.125;
    d.train.aux_loss_coef = 0.0;
    d.run.seed = 9223372036854775807LL;
    d.score.n_sample_tokens = 1;
    round_trip(&d, "tricky values");
    text = print_to_string(&d);
    CHECK(strstr(text, "\n  lr: 0.30000000000000004 ") != NULL, "shortest round-trip double:\n%s",
          text);
    CHECK(strstr(text, "\n  name: \"quote\\\"back\\\\slash\\nnewline\\ttab: #hash\" ") != NULL,
          "escaped string:\n%s", text);
    free(text);
    deck_free(&d);
}

static void test_print_keys(void)
{
    char *text = NULL;
    size_t size = 0;
    FILE *out = open_memstream(&text, &size);
    deck_print_keys(out);
    fclose(out);
    const char *expect[] = {"phase",
                            "run.seed",
                            "parallel.ep",
                            "init.family",
                            "qwen2_moe",
                            "prepare.bad_rows",
                            "score.n_sample_tokens",
                            "select.top_p",
                            "(0, 1]",
                            "train.expert_config",
                            "method esft",
                            "train.lora.alpha",
                            "eval.batch",
                            "5934875"};
    for (size_t i = 0; i < sizeof expect / sizeof expect[0]; i++)
        CHECK(strstr(text, expect[i]) != NULL, "print_keys lacks %s", expect[i]);
    CHECK(strstr(text, "parallel.dp:") == NULL, "dp is not a key");
    free(text);
}

/* ---------------------------------------------------------------------------------- */
/* The deck files.                                                                    */

static char *read_file(const char *path, size_t *length)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap + 1);
    size_t got;
    while ((got = fread(buf + n, 1, cap - n, f)) > 0) {
        n += got;
        if (n == cap) buf = realloc(buf, (cap *= 2) + 1);
    }
    fclose(f);
    buf[n] = '\0';
    *length = n;
    return buf;
}

static int compare_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* The .yaml files of dir, sorted; NULL-terminated. */
static char **list_decks(const char *dir, int *count)
{
    *count = 0;
    DIR *d = opendir(dir);
    if (!d) return NULL;
    char **names = calloc(1024, sizeof *names);
    struct dirent *entry;
    while ((entry = readdir(d)) && *count < 1023) {
        size_t n = strlen(entry->d_name);
        if (n > 5 && strcmp(entry->d_name + n - 5, ".yaml") == 0)
            names[(*count)++] = strdup(entry->d_name);
    }
    closedir(d);
    qsort(names, (size_t)*count, sizeof *names, compare_names);
    return names;
}

static void test_bad_decks(const char *dir)
{
    int count;
    char **names = list_decks(dir, &count);
    CHECK(names && count >= 12, "%s: want at least 12 bad decks, found %d", dir, count);
    for (int i = 0; i < count; i++) {
        char path[1024];
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        size_t length;
        char *text = read_file(path, &length);
        CHECK(text != NULL, "cannot read %s", path);
        if (!text) continue;
        int line, col, used = 0;
        char want[512] = "";
        int fields = sscanf(text, "# expect: %d:%d: %n", &line, &col, &used);
        CHECK(fields == 2 && used > 0, "%s: first line is not '# expect: LINE:COL: TEXT'", path);
        if (fields == 2 && used > 0) {
            const char *start = text + used, *end = strchr(start, '\n');
            size_t n = end ? (size_t)(end - start) : strlen(start);
            if (n >= sizeof want) n = sizeof want - 1;
            memcpy(want, start, n);
            want[n] = '\0';
            struct deck d;
            char err[ERR_SIZE];
            deck_defaults(&d);
            int errors = deck_parse(&d, path, text, length, err, sizeof err);
            if (errors == 0) errors = deck_finish(&d, err, sizeof err);
            char prefix[1100];
            snprintf(prefix, sizeof prefix, "%s:%d:%d: ", path, line, col);
            CHECK(errors > 0 && want[0] && has_error(err, prefix, want),
                  "%s: want %s...%s...\ngot (%d):\n%s", path, prefix, want, errors, err);
            deck_free(&d);
        }
        free(text);
        free(names[i]);
    }
    free(names);
}

static void test_good_decks(const char *dir)
{
    int count;
    char **names = list_decks(dir, &count);
    CHECK(names && count >= 2, "%s: want good decks, found %d", dir, count);
    for (int i = 0; i < count; i++) {
        char path[1024];
        snprintf(path, sizeof path, "%s/%s", dir, names[i]);
        size_t length;
        char *text = read_file(path, &length);
        CHECK(text != NULL, "cannot read %s", path);
        if (!text) continue;
        struct deck d;
        char err[ERR_SIZE];
        deck_defaults(&d);
        int errors = deck_parse(&d, path, text, length, err, sizeof err);
        if (errors == 0) errors = deck_finish(&d, err, sizeof err);
        CHECK(errors == 0, "%s: %d errors:\n%s", path, errors, err);
        round_trip(&d, path);
        deck_free(&d);
        free(text);
        free(names[i]);
    }
    free(names);
}

int main(int argc, char **argv)
{
    const char *bad_dir = argc > 1 ? argv[1] : "tests/decks/bad";
    char good_dir[1024];
    if (argc > 2) {
        snprintf(good_dir, sizeof good_dir, "%s", argv[2]);
    } else { /* the sibling of the bad directory */
        snprintf(good_dir, sizeof good_dir, "%s", bad_dir);
        size_t n = strlen(good_dir);
        while (n > 0 && good_dir[n - 1] == '/') good_dir[--n] = '\0';
        if (n >= 3 && strcmp(good_dir + n - 3, "bad") == 0)
            snprintf(good_dir + n - 3, sizeof good_dir - (n - 3), "good");
    }

    test_full_deck();
    test_defaults();
    test_phases();
    test_readers();
    test_errors();
    test_many_errors();
    test_overrides();
    test_where();
    test_requirements();
    test_derived();
    test_round_trip();
    test_print_keys();
    test_bad_decks(bad_dir);
    test_good_decks(good_dir);
    return check_done("test_deck");
}
