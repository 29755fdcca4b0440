/* fuzz_hfconfig: libFuzzer harness for a Hugging Face config.json (src/hfconfig.c): the
 * input is the file's text, read by hfconfig_parse (what hfconfig_load does after reading
 * the file). A config that passes must survive the way `init` and the merged export pass
 * it on: hfconfig_write, then hfconfig_load, gives the same struct (but the hash), its
 * reals as hfconfig_write prints them: to 15 significant digits.
 * Seeds: tests/fuzz/corpus/hfconfig (every tests/golden/ config.json: v4 and v5 keys,
 * the four families, RoPE default and YaRN). */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "fuzz.h"
#include "hfconfig.h"

/* A real read back from the written file: equal to the parsed one as printed with 15
 * significant digits (JSON_REAL_PRECISION(15) in hfconfig_write) is equal. */
static void as_written(double *read_back, double parsed)
{
    char a[40], b[40];
    snprintf(a, sizeof a, "%.15g", *read_back);
    snprintf(b, sizeof b, "%.15g", parsed);
    if (strcmp(a, b) == 0) *read_back = parsed;
}

/* The reals of c read back as those of cfg where hfconfig_write's printing explains the
 * difference; attention_scaling, computed from printed reals, to 1e-13. */
static void forgive_printing(struct model_config *c, const struct model_config *cfg)
{
    struct hf_rope *r = &c->rope;
    const struct hf_rope *p = &cfg->rope;
    as_written(&r->theta, p->theta);
    as_written(&r->factor, p->factor);
    as_written(&r->beta_fast, p->beta_fast);
    as_written(&r->beta_slow, p->beta_slow);
    as_written(&r->attention_factor, p->attention_factor);
    as_written(&r->mscale, p->mscale);
    as_written(&r->mscale_all_dim, p->mscale_all_dim);
    as_written(&r->partial_rotary_factor, p->partial_rotary_factor);
    if (fabs(r->attention_scaling - p->attention_scaling) <= 1e-13 * fabs(p->attention_scaling))
        r->attention_scaling = p->attention_scaling;
    as_written(&c->rms_norm_eps, cfg->rms_norm_eps);
    as_written(&c->initializer_range, cfg->initializer_range);
    as_written(&c->clip_qkv, cfg->clip_qkv);
    as_written(&c->routed_scaling_factor, cfg->routed_scaling_factor);
    as_written(&c->router_aux_loss_coef, cfg->router_aux_loss_coef);
    as_written(&c->router_jitter_noise, cfg->router_jitter_noise);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct model_config cfg, again; /* ~1.5 KB each; zeroed padding for memcmp */
    char err[1024];
    memset(&cfg, 0, sizeof cfg);
    if (hfconfig_parse((const char *)data, size, "config.json", &cfg, err, sizeof err) != 0)
        return 0;

    fuzz_path("config.json");
    fuzz_path("config.json.tmp"); /* removed at exit should a write fail half-way */
    int written = hfconfig_write(fuzz_directory(), &cfg, err, sizeof err);
    if (written != 0) fprintf(stderr, "hfconfig_write: %s\n", err);
    fuzz_require(written == 0);
    memset(&again, 0, sizeof again);
    int read = hfconfig_load(fuzz_directory(), &again, err, sizeof err);
    if (read != 0) fprintf(stderr, "hfconfig_load of the written config: %s\n", err);
    fuzz_require(read == 0);
    again.hash = cfg.hash;
    forgive_printing(&again, &cfg);
    fuzz_require(memcmp(&cfg, &again, sizeof cfg) == 0);
    return 0;
}
