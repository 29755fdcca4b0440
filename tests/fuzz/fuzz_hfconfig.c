/* fuzz_hfconfig: libFuzzer harness for a Hugging Face config.json (src/hfconfig.c): the
 * input is the file's text, read by hfconfig_parse (what hfconfig_load does after reading
 * the file). A config that passes must survive the way `init` and the merged export pass
 * it on: hfconfig_write, then hfconfig_load, gives the same struct (but the hash).
 * Seeds: tests/fuzz/corpus/hfconfig (every tests/golden/ config.json: v4 and v5 keys,
 * the four families, RoPE default and YaRN). */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include "fuzz.h"
#include "hfconfig.h"

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
    fuzz_require(memcmp(&cfg, &again, sizeof cfg) == 0);
    return 0;
}
