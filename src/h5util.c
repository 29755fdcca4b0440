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

int h5_put_attr_string(hid_t object, const char *name, const char *value, const char *path,
                       char *err, size_t err_size)
{
    size_t n = strlen(value);
    hid_t type = H5Tcopy(H5T_C_S1);
    H5Tset_size(type, n > 0 ? n : 1);
    H5Tset_strpad(type, H5T_STR_NULLTERM);
    hid_t space = H5Screate(H5S_SCALAR);
    hid_t attr = H5Acreate2(object, name, type, space, H5P_DEFAULT, H5P_DEFAULT);
    int rc = 0;
    if (attr < 0 || H5Awrite(attr, type, n > 0 ? value : "") < 0) {
        h5_fail(err, err_size, path, name, "cannot write attribute");
        rc = -1;
    }
    if (attr >= 0) H5Aclose(attr);
    H5Sclose(space);
    H5Tclose(type);
    return rc;
}
