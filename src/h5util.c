/* h5util: HDF5 error reporting (see h5util.h). */
#include "h5util.h"

#include <stdio.h>
#include <string.h>

void h5_quiet_begin(struct h5_quiet *q)
{
    H5Eget_auto2(H5E_DEFAULT, &q->func, &q->data);
    H5Eset_auto2(H5E_DEFAULT, NULL, NULL);
}

void h5_quiet_end(const struct h5_quiet *q)
{
    H5Eset_auto2(H5E_DEFAULT, q->func, q->data);
}

struct h5_walk {
    char first[256], deepest[256];
    int n;
};

static herr_t h5_walk_entry(unsigned n, const H5E_error2_t *entry, void *data)
{
    struct h5_walk *w = data;
    const char *desc = entry->desc ? entry->desc : "";
    if (n == 0) snprintf(w->first, sizeof w->first, "%s", desc);
    snprintf(w->deepest, sizeof w->deepest, "%s", desc);
    w->n++;
    return 0;
}

void h5_fail(char *err, size_t err_size, const char *file, const char *object, const char *what)
{
    struct h5_walk w = {.n = 0};
    H5Ewalk2(H5E_DEFAULT, H5E_WALK_DOWNWARD, h5_walk_entry, &w);
    char reason[600];
    if (w.n == 0)
        snprintf(reason, sizeof reason, "HDF5 error");
    else if (w.n == 1 || strcmp(w.first, w.deepest) == 0)
        snprintf(reason, sizeof reason, "%s", w.first);
    else
        snprintf(reason, sizeof reason, "%s (%s)", w.first, w.deepest);
    H5Eclear2(H5E_DEFAULT);
    if (object)
        snprintf(err, err_size, "%s: %s: %s: %s", file, object, what, reason);
    else
        snprintf(err, err_size, "%s: %s: %s", file, what, reason);
}
