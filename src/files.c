/* files: see files.h. */
#include "files.h"

#include <errno.h>
#include <stdbool.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

int make_directories(const char *path)
{
    char buf[4096];
    size_t n = strlen(path);
    if (n == 0 || n >= sizeof buf) {
        errno = ENAMETOOLONG;
        return -1;
    }
    memcpy(buf, path, n + 1);
    for (char *p = buf + 1; *p; p++) {
        if (*p != '/') continue;
        *p = '\0';
        if (mkdir(buf, 0777) != 0 && errno != EEXIST) return -1;
        *p = '/';
    }
    if (mkdir(buf, 0777) != 0 && errno != EEXIST) return -1;
    return 0;
}

int file_commit(FILE *out, const char *tmp, const char *path, char *err, size_t err_size)
{
    bool failed = ferror(out) != 0 || fflush(out) != 0 || fsync(fileno(out)) != 0;
    int saved = errno;
    if (fclose(out) != 0 && !failed) {
        failed = true;
        saved = errno;
    }
    if (failed) {
        snprintf(err, err_size, "%s: write failed: %s", tmp, strerror(saved));
        remove(tmp);
        return -1;
    }
    if (rename(tmp, path) != 0) {
        snprintf(err, err_size, "cannot rename %s to %s: %s", tmp, path, strerror(errno));
        remove(tmp);
        return -1;
    }
    return 0;
}
