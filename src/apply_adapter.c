/* apply_adapter: `esft --apply-adapter ADAPTER DECK`: model.path's checkpoint with an
 * ESFT adapter's tensors (the train phase's adapter.safetensors) put over it, or a LoRA
 * adapter directory (PEFT's or method lora's) folded in (peft_adapter.h), written as
 * a complete Hugging Face checkpoint in RUN.OUTPUT_DIR/merged (export_merged). The
 * merged checkpoint is what tools without esft's adapter format load: transformers 5
 * holds a layer's routed experts fused (experts.gate_up_proj [E, 2I, H], down_proj
 * [E, H, I]), so the adapter's per-expert tensors name no parameter there, while its
 * loader fuses a checkpoint's per-expert tensors itself.
 *
 * Collective over the layout like a phase: the model is split over pp and ep as the
 * deck's parallel section says, every rank reads what it holds; everything the user can
 * get wrong (the adapter, the model, the output directory) is refused, status 2, before
 * the weights are read. */
#include <stdio.h>
#include <string.h>

#include "export.h"
#include "files.h"
#include "hfconfig.h"
#include "log.h"
#include "model.h"
#include "peft_adapter.h"
#include "phases.h"

/* The adapter file: ADAPTER itself, or ADAPTER/adapter.safetensors for a directory (the
 * train phase's RUN.OUTPUT_DIR/adapter), or ADAPTER for a LoRA adapter directory
 * (adapter_config.json: *lora set). 0, or -1 with why. */
static int adapter_file(const char *adapter, char *path, size_t size, bool *lora, char *err,
                        size_t err_size)
{
    *lora = peft_adapter_is(adapter);
    if (*lora) {
        snprintf(path, size, "%s", adapter);
        return 0;
    }
    if (!is_directory(adapter)) {
        if (!path_exists(adapter)) {
            snprintf(err, err_size, "--apply-adapter %s: no such file or directory", adapter);
            return -1;
        }
        snprintf(path, size, "%s", adapter);
        return 0;
    }
    if (path_join(path, size, adapter, "adapter.safetensors", err, err_size)) return -1;
    if (path_exists(path)) return 0;
    char peft[4200];
    if (path_join(peft, sizeof peft, adapter, "adapter_model.safetensors", err, err_size))
        return -1;
    snprintf(err, err_size, "--apply-adapter %s: no adapter.safetensors there%s", adapter,
             path_exists(peft) ? " (adapter_model.safetensors without adapter_config.json: a "
                                 "LoRA adapter needs both)"
                               : "");
    return -1;
}

int phase_apply_adapter(const struct deck *deck, const struct layout *layout, const char *adapter)
{
    const struct layout_grid *grid = &layout->grid;
    char err[4096], path[4200], dir[4200], config[4300];
    bool lora;
    int rc = adapter_file(adapter, path, sizeof path, &lora, err, sizeof err);
    if (rc == 0 && (path_join(dir, sizeof dir, deck->run.output_dir, "merged", err, sizeof err) ||
                    path_join(config, sizeof config, dir, "config.json", err, sizeof err)))
        rc = -1;
    if (rc == 0 && path_exists(config)) {
        snprintf(err, sizeof err,
                 "%s already holds a checkpoint (config.json); remove it or "
                 "choose another run.output_dir",
                 dir);
        rc = -1;
    }
    fail_if_any(rc != 0, EXIT_INPUT, "apply-adapter: %s", err);

    struct model_config cfg;
    if (hfconfig_load(deck->model.path, &cfg, err, sizeof err) != 0)
        fatal_all(EXIT_INPUT, "apply-adapter: %s", err);
    fail_if_any(model_check_checkpoint(&cfg, grid, layout->me, deck->model.path, err, sizeof err),
                EXIT_INPUT, "apply-adapter: %s", err);
    struct model model;
    model_create(&model, &cfg, grid, layout->me);
    model.ep_comm = &layout->ep;
    model.pp_comm = &layout->pp;
    int n_tensors = 0;
    if (!lora)
        fail_if_any(model_check_adapter(&model, path, &n_tensors, err, sizeof err) != 0,
                    EXIT_INPUT, "apply-adapter: %s (base model %s)", err, deck->model.path);
    fail_if_any(model_load(&model, deck->model.path, err, sizeof err) != 0, EXIT_INPUT,
                "apply-adapter: %s", err);
    fail_if_any((lora ? peft_adapter_apply(&model, path, &n_tensors, err, sizeof err)
                      : model_apply_adapter(&model, path, &n_tensors, err, sizeof err)) != 0,
                EXIT_INPUT, "apply-adapter: %s (base model %s)", err, deck->model.path);
    log_info("apply-adapter: %d tensors of %s over %s", n_tensors, path, deck->model.path);
    if (export_merged(dir, &model, deck->model.path, (size_t)5 << 30, MPI_COMM_WORLD, err,
                      sizeof err) != 0)
        fatal_all(EXIT_RUNTIME, "apply-adapter: %s", err);
    log_info("apply-adapter: merged checkpoint -> %s", dir);
    metrics_write("apply_adapter", "\"adapter\": \"%s\", \"tensors\": %d", path, n_tensors);
    model_free(&model);
    return 0;
}
