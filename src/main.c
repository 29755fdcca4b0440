/* main: the esft program. Starts MPI, reads the deck on rank 0 and shares it, applies
 * command-line overrides, checks the rank layout against the model, then runs the
 * deck's phases in order (or, with --dry-run, prints the resolved deck and the layout
 * table and stops before anything is written).
 *
 * Every rank parses the same deck text, so every rank reaches the same verdict on bad
 * input and they all exit together with status 2: nothing hangs waiting for a rank
 * that has already left. */
#include <errno.h>
#include <jansson.h>
#include <mpi.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "deck.h"
#include "hfconfig.h"
#include "layout.h"
#include "model.h"
#include "inspect.h"
#include "modelpath.h"
#include "log.h"
#include "memplan.h"
#include "phases.h"
#include "preflight.h"
#include "sweep.h"
#include "threads.h"
#include "version.h"

#define MAX_OVERRIDES 256
#define ERROR_BUFFER 16384

struct options {
    const char *deck_file;
    const char *overrides[MAX_OVERRIDES];
    int n_overrides;
    bool dry_run;
    long long inspect; /* --inspect N: show sample N as prepare makes it; -1: not asked */
    int ranks; /* --ranks N: plan the layout for N ranks (dry run only); 0 = world size */
    enum { SWEEP_NONE, SWEEP_LIST, SWEEP_SUMMARY, SWEEP_SHARED_PHASES } sweep; /* --sweep X */
    int sweep_point; /* --sweep-point N; -1: not asked */
    const char *apply_adapter; /* --apply-adapter PATH, or NULL */
};

static void print_usage(FILE *out)
{
    fprintf(out,
            "usage: esft [options] DECK.yaml [key.path=value ...]\n"
            "       mpirun -np N esft DECK.yaml [key.path=value ...]\n"
            "       esft --apply-adapter ADAPTER DECK.yaml [key.path=value ...]\n"
            "\n"
            "Expert-Specialized Fine-Tuning of Mixture-of-Experts models. The deck's `phase`\n"
            "selects what runs: init, prepare, score, select, train, eval (one or a list).\n"
            "\n"
            "options:\n"
            "  --dry-run      print the resolved deck (defaults filled in) and the rank\n"
            "                 layout table, check them and every file the phases need,\n"
            "                 write nothing; exit 0, or 2 with what a run would refuse\n"
            "  --ranks N      with --dry-run: plan the layout for N ranks instead of the\n"
            "                 number this job was started with\n"
            "  --inspect N    print sample N (from 0) as prepare makes it from the deck's\n"
            "                 prepare.inputs: its text with the loss-bearing tokens marked\n"
            "                 [[ ]], and its token ids; write nothing\n"
            "  --sweep list   a deck with a sweep block: print its points, their names and\n"
            "                 output directories, and which phases run once for all\n"
            "  --sweep shared run the sweep's shared phases (once, before the points)\n"
            "  --sweep-point N  run point N of the sweep (its per-point phases)\n"
            "  --sweep summary  write the table (markdown, CSV) and picture of the points'\n"
            "                 results into RUN.OUTPUT_DIR/sweep and print the table\n"
            "  --apply-adapter ADAPTER  instead of the deck's phases: model.path's checkpoint\n"
            "                 with the ESFT adapter ADAPTER (adapter.safetensors, or the\n"
            "                 train phase's adapter directory) put over it, written as a\n"
            "                 complete checkpoint in RUN.OUTPUT_DIR/merged\n"
            "  --help-deck    list every deck key with its type, default and meaning\n"
            "  --help         this text\n"
            "  --version      version, backends and library versions\n"
            "\n"
            "key.path=value   overrides a deck key after the deck is read, e.g.\n"
            "                 train.lr=3e-5 parallel.ep=4 phase=[score,select]\n"
            "\n"
            "exit status: 0 success, 1 run-time failure, 2 bad input (deck, layout, files),\n"
            "             3 stopped by SIGUSR1/SIGTERM after writing a checkpoint (resumable)\n");
}

/* Returns -1 to continue, or the exit status when the options alone decide it. */
static int parse_options(int argc, char **argv, struct options *opt, int rank)
{
    memset(opt, 0, sizeof *opt);
    opt->inspect = -1;
    opt->sweep_point = -1;
    for (int i = 1; i < argc; i++) {
        const char *arg = argv[i];
        if (strcmp(arg, "--help") == 0 || strcmp(arg, "-h") == 0) {
            if (rank == 0) print_usage(stdout);
            return 0;
        } else if (strcmp(arg, "--version") == 0) {
            if (rank == 0) version_print(stdout);
            return 0;
        } else if (strcmp(arg, "--help-deck") == 0) {
            if (rank == 0) deck_print_keys(stdout);
            return 0;
        } else if (strcmp(arg, "--dry-run") == 0) {
            opt->dry_run = true;
        } else if (strcmp(arg, "--ranks") == 0 || strncmp(arg, "--ranks=", 8) == 0) {
            const char *value = arg[7] == '=' ? arg + 8 : (i + 1 < argc ? argv[++i] : "");
            char *end = NULL;
            long n = strtol(value, &end, 10);
            if (!*value || *end || n < 1 || n > 1000000) {
                if (rank == 0) fprintf(stderr, "esft: --ranks needs a rank count >= 1, got '%s'\n", value);
                return EXIT_INPUT;
            }
            opt->ranks = (int)n;
        } else if (strcmp(arg, "--inspect") == 0 || strncmp(arg, "--inspect=", 10) == 0) {
            const char *value = arg[9] == '=' ? arg + 10 : (i + 1 < argc ? argv[++i] : "");
            char *end = NULL;
            long long n = strtoll(value, &end, 10);
            if (!*value || *end || n < 0) {
                if (rank == 0)
                    fprintf(stderr, "esft: --inspect needs a sample number >= 0, got '%s'\n",
                            value);
                return EXIT_INPUT;
            }
            opt->inspect = n;
        } else if (strcmp(arg, "--sweep") == 0 || strncmp(arg, "--sweep=", 8) == 0) {
            const char *value = arg[7] == '=' ? arg + 8 : (i + 1 < argc ? argv[++i] : "");
            if (strcmp(value, "list") == 0) {
                opt->sweep = SWEEP_LIST;
            } else if (strcmp(value, "summary") == 0) {
                opt->sweep = SWEEP_SUMMARY;
            } else if (strcmp(value, "shared") == 0) {
                opt->sweep = SWEEP_SHARED_PHASES;
            } else {
                if (rank == 0)
                    fprintf(stderr, "esft: --sweep needs list, shared or summary, got '%s'\n",
                            value);
                return EXIT_INPUT;
            }
        } else if (strcmp(arg, "--sweep-point") == 0 || strncmp(arg, "--sweep-point=", 14) == 0) {
            const char *value = arg[13] == '=' ? arg + 14 : (i + 1 < argc ? argv[++i] : "");
            char *end = NULL;
            long n = strtol(value, &end, 10);
            if (!*value || *end || n < 0 || n >= SWEEP_MAX_POINTS) {
                if (rank == 0)
                    fprintf(stderr, "esft: --sweep-point needs a point number >= 0, got '%s'\n",
                            value);
                return EXIT_INPUT;
            }
            opt->sweep_point = (int)n;
        } else if (strcmp(arg, "--apply-adapter") == 0 ||
                   strncmp(arg, "--apply-adapter=", 16) == 0) {
            const char *value = arg[15] == '=' ? arg + 16 : (i + 1 < argc ? argv[++i] : "");
            if (!*value) {
                if (rank == 0)
                    fprintf(stderr, "esft: --apply-adapter needs the adapter (its "
                            "adapter.safetensors or the directory holding it)\n");
                return EXIT_INPUT;
            }
            opt->apply_adapter = value;
        } else if (arg[0] == '-' && arg[1] != '\0') {
            if (rank == 0)
                fprintf(stderr, "esft: unknown option '%s' (see esft --help)\n", arg);
            return EXIT_INPUT;
        } else if (strchr(arg, '=')) {
            if (opt->n_overrides == MAX_OVERRIDES) {
                if (rank == 0) fprintf(stderr, "esft: more than %d overrides\n", MAX_OVERRIDES);
                return EXIT_INPUT;
            }
            opt->overrides[opt->n_overrides++] = arg;
        } else if (!opt->deck_file) {
            opt->deck_file = arg;
        } else {
            if (rank == 0)
                fprintf(stderr, "esft: two decks given ('%s' and '%s'); run one deck at a time, "
                        "or list the phases in one deck\n", opt->deck_file, arg);
            return EXIT_INPUT;
        }
    }
    if (!opt->deck_file) {
        if (rank == 0) {
            fprintf(stderr, "esft: no deck given\n");
            print_usage(stderr);
        }
        return EXIT_INPUT;
    }
    if (opt->sweep && opt->sweep_point >= 0) {
        if (rank == 0) fprintf(stderr, "esft: --sweep and --sweep-point are separate runs\n");
        return EXIT_INPUT;
    }
    if (opt->apply_adapter && (opt->dry_run || opt->inspect >= 0 || opt->sweep ||
                               opt->sweep_point >= 0)) {
        if (rank == 0)
            fprintf(stderr, "esft: --apply-adapter is a run of its own; it does not combine "
                    "with --dry-run, --inspect, --sweep or --sweep-point\n");
        return EXIT_INPUT;
    }
    if (opt->ranks && !opt->dry_run) {
        if (rank == 0) fprintf(stderr, "esft: --ranks is only meaningful with --dry-run\n");
        return EXIT_INPUT;
    }
    return -1;
}

/* Rank 0 reads the deck file and broadcasts its text, so a job of thousands of ranks
 * opens the file once. Returns the text (NUL-terminated) or exits every rank. */
static char *read_deck_text(const char *path, size_t *length)
{
    long long size = -1;
    char *text = NULL;
    char reason[512] = "";
    if (log_rank() == 0) {
        FILE *file = fopen(path, "rb");
        if (!file) {
            snprintf(reason, sizeof reason, "%s: cannot open deck: %s", path, strerror(errno));
        } else {
            if (fseek(file, 0, SEEK_END) == 0) size = ftell(file);
            if (size < 0 || fseek(file, 0, SEEK_SET) != 0) {
                snprintf(reason, sizeof reason, "%s: cannot read deck", path);
                size = -1;
            } else if (size > (16 << 20)) {
                snprintf(reason, sizeof reason, "%s: deck is %lld bytes; a deck above 16 MiB "
                         "is surely not a deck", path, size);
                size = -1;
            } else {
                text = xmalloc((size_t)size + 1);
                if (fread(text, 1, (size_t)size, file) != (size_t)size) {
                    snprintf(reason, sizeof reason, "%s: read error: %s", path, strerror(errno));
                    size = -1;
                }
            }
            fclose(file);
        }
    }
    check_mpi(MPI_Bcast(&size, 1, MPI_LONG_LONG, 0, MPI_COMM_WORLD));
    if (size < 0) fatal_all(EXIT_INPUT, "%s", reason);
    if (!text) text = xmalloc((size_t)size + 1);
    check_mpi(MPI_Bcast(text, (int)size, MPI_CHAR, 0, MPI_COMM_WORLD));
    text[size] = '\0';
    *length = (size_t)size;
    return text;
}

/* Rank 0 prints every message (one per line) of a failed parse step, then all ranks
 * leave with status 2. */
static void fail_on_deck_errors(int n_errors, const char *messages, const char *deck_file)
{
    if (n_errors == 0) return;
    if (log_rank() == 0) {
        fflush(stdout);
        fputs(messages, stderr);
        if (messages[0] && messages[strlen(messages) - 1] != '\n') fputc('\n', stderr);
    }
    fatal_all(EXIT_INPUT, "%d problem%s with deck %s; nothing was run", n_errors,
              n_errors == 1 ? "" : "s", deck_file);
}

/* The model dimensions a layout must fit: from the deck's init section when this run
 * writes the model, else from the checkpoint's config.json. Returns false (with why)
 * when the model is not there yet. Keys per the Hugging Face configs of the supported
 * families: num_hidden_layers; num_experts (qwen2_moe, qwen3_moe, olmoe),
 * num_local_experts (mixtral, gpt_oss), n_routed_experts (deepseek, glm4_moe). */
static bool model_shape(const struct deck *deck, struct layout_model *model, char *why,
                        size_t why_size)
{
    memset(model, 0, sizeof *model);
    for (int i = 0; i < deck->n_phases; i++)
        if (deck->phases[i] == PHASE_INIT) {
            model->num_layers = deck->init.num_layers;
            model->num_experts = deck->init.num_experts;
            return true;
        }
    if (!deck->model.path || !deck->model.path[0]) {
        snprintf(why, why_size, "model.path is not set");
        return false;
    }
    char path[4096];
    snprintf(path, sizeof path, "%s/config.json", deck->model.path);
    json_error_t error;
    json_t *config = json_load_file(path, 0, &error);
    if (!config) {
        snprintf(why, why_size, "%.2000s: %.1000s", path, error.text);
        return false;
    }
    model->num_layers = (int)json_integer_value(json_object_get(config, "num_hidden_layers"));
    const char *expert_keys[] = {"num_experts", "num_local_experts", "n_routed_experts"};
    for (size_t k = 0; k < sizeof expert_keys / sizeof expert_keys[0]; k++) {
        json_t *value = json_object_get(config, expert_keys[k]);
        if (json_is_integer(value)) model->num_experts = (int)json_integer_value(value);
    }
    json_decref(config);
    return true;
}

/* Whether a phase reads the model at model.path (init writes it; prepare needs none;
 * select only uses it, when set, to name tensors). */
static bool phase_reads_model(enum phase phase)
{
    return phase == PHASE_SCORE || phase == PHASE_TRAIN || phase == PHASE_EVAL;
}

static int run_phase(enum phase phase, const struct deck *deck, const struct layout *layout)
{
    switch (phase) {
    case PHASE_INIT: return phase_init(deck, layout);
    case PHASE_PREPARE: return phase_prepare(deck, layout);
    case PHASE_SCORE: return phase_score(deck, layout);
    case PHASE_SELECT: return phase_select(deck, layout);
    case PHASE_TRAIN: return phase_train(deck, layout);
    case PHASE_EVAL: return phase_eval(deck, layout);
    default: fatal_all(EXIT_RUNTIME, "phase '%s' has no implementation", phase_name(phase));
    }
}

/* A deck with a sweep block (sweep.h) runs one role of its sweep: the shared phases or
 * one point, whose deck replaces *deck; or, for --sweep list and summary, rank 0 writes
 * and every rank leaves. Returns -1 to go on running *deck, else the exit status.
 * *shared_text: the mark the shared phases leave when they succeed (NULL for a point). */
static int sweep_setup(struct sweep *sw, struct deck *deck, const struct options *opt,
                       char *messages, char **shared_text)
{
    *shared_text = NULL;
    if (!sw->present) {
        if (opt->sweep || opt->sweep_point >= 0)
            fatal_all(EXIT_INPUT, "%s has no sweep block (sweep: {select.top_p: [0.1, 0.2], "
                      "...}); see README, Sweeps", opt->deck_file);
        return -1;
    }
    fail_on_deck_errors(sweep_plan(sw, deck, messages, ERROR_BUFFER), messages, opt->deck_file);
    if (opt->sweep == SWEEP_LIST || opt->sweep == SWEEP_SUMMARY) {
        int status = 0;
        if (log_rank() == 0) {
            if (opt->sweep == SWEEP_LIST)
                sweep_list(sw, stdout);
            else if (sweep_summary(sw, stdout, messages, ERROR_BUFFER) != 0)
                status = EXIT_RUNTIME;
            fflush(stdout);
        }
        check_mpi(MPI_Bcast(&status, 1, MPI_INT, 0, MPI_COMM_WORLD));
        if (status) fatal_all(status, "sweep summary: %s", messages);
        return 0;
    }
    int role = opt->sweep_point;
    if (opt->sweep == SWEEP_SHARED_PHASES) {
        role = SWEEP_SHARED;
        if (sw->n_shared == 0) {
            log_info("sweep: every phase reads a swept key: nothing is shared, each point runs "
                     "them all");
            return 0;
        }
        /* run once: again only when the deck's shared part changed (init never overwrites
         * a model, so a second run of the same deck would be refused anyway) */
        int done = log_rank() == 0 && !opt->dry_run &&
                   sweep_check_shared(sw, messages, ERROR_BUFFER) == 0;
        check_mpi(MPI_Bcast(&done, 1, MPI_INT, 0, MPI_COMM_WORLD));
        if (done) {
            log_info("sweep: the shared phases already ran from this deck (%s/sweep/shared.yaml); "
                     "nothing to do", sw->base_dir);
            return 0;
        }
        *shared_text = sweep_shared_text(sw);
    } else if (role < 0 && (opt->dry_run || opt->inspect >= 0 || opt->apply_adapter)) {
        log_info("sweep: %d points; this is the deck without its sweep (--sweep shared or "
                 "--sweep-point N: the deck of a role)", sw->n_points);
        return -1;
    } else if (role < 0) {
        fatal_all(EXIT_INPUT, "%s holds a sweep of %d points: run its shared phases with "
                  "--sweep shared, then each point with --sweep-point N (--sweep list names "
                  "them), or all of them with jobs/esft-sweep", opt->deck_file, sw->n_points);
    } else if (role >= sw->n_points) {
        fatal_all(EXIT_INPUT, "--sweep-point %d: the sweep of %s has %d points (0 to %d)", role,
                  opt->deck_file, sw->n_points, sw->n_points - 1);
    }
    deck_free(deck);
    fail_on_deck_errors(sweep_deck(sw, role, deck, messages, ERROR_BUFFER), messages,
                        opt->deck_file);
    if (role >= 0 && !opt->dry_run) { /* the shared phases ran, from this deck */
        int status = log_rank() == 0 ? sweep_check_shared(sw, messages, ERROR_BUFFER) : 0;
        check_mpi(MPI_Bcast(&status, 1, MPI_INT, 0, MPI_COMM_WORLD));
        if (status) fatal_all(EXIT_INPUT, "sweep point %d (%s): %s", role, sw->names[role],
                              messages);
        log_info("sweep point %d of %d: %s -> %s", role, sw->n_points, sw->names[role],
                 deck->run.output_dir);
    }
    return -1;
}

int main(int argc, char **argv)
{
    threads_set_wait_policy(argv); /* may start the program again, before MPI */
    check_mpi(MPI_Init(&argc, &argv));
    int world_rank = 0, world_size = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &world_size);
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    log_init(world_rank, world_size);

    struct options opt;
    int status = parse_options(argc, argv, &opt, world_rank);
    if (status >= 0) {
        MPI_Finalize();
        return status;
    }

    size_t length = 0;
    char *text = read_deck_text(opt.deck_file, &length);
    struct deck deck;
    deck_defaults(&deck);
    char *messages = xcalloc(ERROR_BUFFER, 1);
    fail_on_deck_errors(deck_parse(&deck, opt.deck_file, text, length, messages, ERROR_BUFFER),
                        messages, opt.deck_file);
    int n_errors = 0;
    for (int i = 0; i < opt.n_overrides; i++) {
        size_t used = strlen(messages);
        n_errors += deck_override(&deck, opt.overrides[i], messages + used, ERROR_BUFFER - used);
    }
    fail_on_deck_errors(n_errors, messages, opt.deck_file);
    fail_on_deck_errors(deck_finish(&deck, messages, ERROR_BUFFER), messages, opt.deck_file);
    if (opt.apply_adapter) /* the deck gives the model, the layout and the output directory */
        deck.n_phases = 0;
    struct sweep sweep;
    char *shared_text = NULL;
    fail_on_deck_errors(sweep_read(&sweep, opt.deck_file, text, length, opt.overrides,
                                   opt.n_overrides, messages, ERROR_BUFFER),
                        messages, opt.deck_file);
    status = sweep_setup(&sweep, &deck, &opt, messages, &shared_text);
    if (status >= 0) {
        sweep_free(&sweep);
        deck_free(&deck);
        free(text);
        free(messages);
        MPI_Finalize();
        return status;
    }
    free(text);
    /* model.path: a hub id becomes its snapshot in the Hugging Face cache; config.json (or
     * the init section) is checked now, --dry-run included; model_absent says why it is
     * not there, when there is more to say */
    char model_absent[8192];
    if (opt.apply_adapter)
        modelpath_prepare_read(&deck, model_absent, sizeof model_absent);
    else
        modelpath_prepare(&deck, opt.dry_run, model_absent, sizeof model_absent);
    if (opt.inspect >= 0) { /* rank 0 looks; every rank leaves with its status */
        char *why_not = xcalloc(8192, 1);
        int inspected = world_rank == 0 ? inspect_sample(&deck, (uint64_t)opt.inspect, stdout,
                                                         why_not, 8192)
                                        : 0;
        fflush(stdout);
        check_mpi(MPI_Bcast(&inspected, 1, MPI_INT, 0, MPI_COMM_WORLD));
        if (inspected != 0) fatal_all(inspected, "%s", why_not);
        MPI_Finalize();
        return 0;
    }

    /* The layout: pp and ep from the deck, dp from the number of ranks. */
    int planned_ranks = opt.ranks ? opt.ranks : world_size;
    struct layout_model model;
    char why[4096] = "";
    bool model_known = model_shape(&deck, &model, why, sizeof why);
    if (!model_known && model_absent[0]) snprintf(why, sizeof why, "%s", model_absent);
    bool needs_model = opt.apply_adapter != NULL;
    for (int i = 0; i < deck.n_phases; i++) needs_model |= phase_reads_model(deck.phases[i]);
    /* a model that init writes later in this deck is known from the init section */
    if (!model_known && needs_model && !opt.dry_run)
        fatal_all(EXIT_INPUT, "cannot read the model's configuration: %s", why);
    struct layout_grid grid;
    char reason[1024];
    if (layout_grid_make(planned_ranks, deck.parallel.pp, deck.parallel.ep,
                         model_known ? &model : NULL, &grid, reason, sizeof reason) != 0) {
        char where[4200];
        deck_where(&deck, "parallel.ep", where, sizeof where);
        fatal_all(EXIT_INPUT, "%s: layout for %d rank%s: %s", where, planned_ranks,
                  planned_ranks == 1 ? "" : "s", reason);
    }
    deck.parallel.dp = grid.dp;
    if (deck.parallel.n_stage_layers > 0) { /* the deck's own split of the layers */
        char where[4200];
        deck_where(&deck, "parallel.stage_layers", where, sizeof where);
        if (deck.parallel.n_stage_layers != grid.pp || grid.pp > LAYOUT_MAX_STAGES)
            fatal_all(EXIT_INPUT, "%s: parallel.stage_layers has %d entries; it needs one per "
                      "pipeline stage (pp %d)", where, deck.parallel.n_stage_layers, grid.pp);
        int sum = 0;
        for (int s = 0; s < grid.pp; s++) {
            char *end;
            long n = strtol(deck.parallel.stage_layers[s], &end, 10);
            if (*end || end == deck.parallel.stage_layers[s] || n < 1 || n > HFCONFIG_MAX_LAYERS)
                fatal_all(EXIT_INPUT, "%s: parallel.stage_layers entry %d is '%s'; each must be a "
                          "whole number of layers, at least 1", where, s + 1,
                          deck.parallel.stage_layers[s]);
            grid.stage_layers[s] = (int)n;
            sum += (int)n;
        }
        if (model_known && sum != model.num_layers)
            fatal_all(EXIT_INPUT, "%s: parallel.stage_layers adds up to %d layers; the model has %d",
                      where, sum, model.num_layers);
    }

    /* Everything every phase of the list needs, checked before the first one runs: rank
     * 0 reads the files, every rank gets the verdict. */
    int n_problems = 0;
    if (world_rank == 0)
        n_problems = preflight_check(&deck, &grid, messages, ERROR_BUFFER);
    check_mpi(MPI_Bcast(&n_problems, 1, MPI_INT, 0, MPI_COMM_WORLD));

    if (opt.dry_run) {
        if (world_rank == 0) {
            printf("# esft %s: resolved deck %s\n", PACKAGE_VERSION, opt.deck_file);
            deck_print(&deck, stdout);
            printf("\n");
            if (!model_known)
                printf("# model not read (%s): the layout is not checked against it\n", why);
            /* the stage split as the run will make it, when the config is there to read */
            struct model_config cfg;
            char ignored[256];
            int split[LAYOUT_MAX_STAGES + 1];
            if (model_known && grid.pp > 1 && deck.model.path &&
                hfconfig_load(deck.model.path, &cfg, ignored, sizeof ignored) == 0 &&
                cfg.num_layers == model.num_layers) {
                model_split_layers(&cfg, &grid, split);
                model.stage_first = split;
            }
            layout_print(stdout, &grid, model_known ? &model : NULL);
            memplan_print(stdout, &deck, &grid);
            fflush(stdout);
        }
        if (n_problems > 0) /* after the printout, so that a refused deck can be read too */
            fail_on_deck_errors(n_problems, messages, opt.deck_file);
        free(shared_text);
        sweep_free(&sweep);
        deck_free(&deck);
        free(messages);
        MPI_Finalize();
        return 0;
    }
    fail_on_deck_errors(n_problems, messages, opt.deck_file);

    struct layout layout;
    layout_create(&layout, &grid);
    int threads = threads_choose(MPI_COMM_WORLD);
    metrics_open(deck.run.output_dir);
    /* who runs: host, pid and the pid's start time, so that a reader can tell a run that
     * is still going from one killed without an end line (sweep summaries) */
    char host[256];
    unsigned long long pid_start = 0;
    host_name(host, sizeof host);
    if (process_start_ticks((long)getpid(), &pid_start) != 0) pid_start = 0; /* unknown */
    metrics_write("start", "\"deck\": \"%s\", \"world\": %d, \"pp\": %d, \"dp\": %d, \"ep\": %d, "
                  "\"threads\": %d, \"host\": \"%s\", \"pid\": %ld, \"pid_start\": %llu",
                  opt.deck_file, grid.world, grid.pp, grid.dp, grid.ep, threads, host,
                  (long)getpid(), pid_start);
    /* the sweep's shared phases: their mark goes while they rewrite what the points read,
     * and comes back when they have all succeeded */
    if (shared_text && world_rank == 0) sweep_unmark_shared(&sweep);
    if (opt.apply_adapter) status = phase_apply_adapter(&deck, &layout, opt.apply_adapter);
    for (int i = 0; i < deck.n_phases; i++) {
        log_info("phase %s", phase_name(deck.phases[i]));
        status = run_phase(deck.phases[i], &deck, &layout);
        if (status != 0) break;
    }
    if (shared_text && status == 0) {
        int failed = world_rank == 0 &&
                     sweep_mark_shared(&sweep, shared_text, messages, ERROR_BUFFER) != 0;
        fail_if_any(failed, EXIT_RUNTIME, "sweep: %s", messages);
    }
    free(shared_text);
    sweep_free(&sweep);
    metrics_write("end", "\"status\": %d", status);
    metrics_close();
    layout_destroy(&layout);
    deck_free(&deck);
    free(messages);
    MPI_Finalize();
    return status;
}
