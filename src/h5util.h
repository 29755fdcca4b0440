/* h5util: HDF5 error reporting shared by the modules that write HDF5 files (stats,
 * checkpoint). HDF5 prints its error stack by default; h5_quiet_begin/end turn that off
 * around a module's calls, and h5_fail puts the stack's outermost and deepest
 * descriptions into the module's own message instead. */
#ifndef ESFT_H5UTIL_H
#define ESFT_H5UTIL_H

#include <hdf5.h>
#include <stddef.h>

struct h5_quiet {
    H5E_auto2_t func;
    void *data;
};
void h5_quiet_begin(struct h5_quiet *q);
void h5_quiet_end(const struct h5_quiet *q);

/* "FILE: OBJECT: what: the library's reason" into err (object may be NULL), the reason
 * read from the error stack of the last failed call, which is then cleared. */
void h5_fail(char *err, size_t err_size, const char *file, const char *object, const char *what);

/* A scalar string attribute name = value (NUL-terminated, fixed length) on object; 0, or
 * -1 with h5_fail's message (path: the file's name, for it). */
int h5_put_attr_string(hid_t object, const char *name, const char *value, const char *path,
                       char *err, size_t err_size);

#endif
