/* files: see files.h. */
#include "files.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "log.h"

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

int path_join(char *out, size_t size, const char *dir, const char *name, char *err,
                size_t err_size)
{
    int n = snprintf(out, size, "%s/%s", dir, name);
    if (n < 0 || (size_t)n >= size) {
        snprintf(err, err_size, "%s/%s: path too long", dir, name);
        return -1;
    }
    return 0;
}

int fsync_path(const char *path, int flags)
{
    int fd = open(path, flags | O_CLOEXEC);
    if (fd < 0) return -1;
    int rc = fsync(fd);
    int saved = errno;
    close(fd);
    errno = saved;
    return rc;
}

bool path_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

/* Copies src to dst through dst.tmp, fsync and rename. */
int copy_file(const char *src, const char *dst, char *err, size_t err_size)
{
    FILE *in = fopen(src, "rb");
    if (!in) {
        snprintf(err, err_size, "%s: cannot open: %s", src, strerror(errno));
        return -1;
    }
    char tmp[4200];
    if (snprintf(tmp, sizeof tmp, "%s.tmp", dst) >= (int)sizeof tmp) {
        snprintf(err, err_size, "%s: path too long", dst);
        fclose(in);
        return -1;
    }
    FILE *out = fopen(tmp, "wb");
    if (!out) {
        snprintf(err, err_size, "%s: cannot create: %s", tmp, strerror(errno));
        fclose(in);
        return -1;
    }
    char buf[65536];
    size_t n;
    bool failed = false;
    while (!failed && (n = fread(buf, 1, sizeof buf, in)) > 0) failed = fwrite(buf, 1, n, out) != n;
    if (ferror(in)) {
        snprintf(err, err_size, "%s: read failed: %s", src, strerror(errno));
        fclose(in);
        fclose(out);
        remove(tmp);
        return -1;
    }
    fclose(in);
    return file_commit(out, tmp, dst, err, err_size); /* a failed fwrite left ferror(out) set */
}

void xml_write_text(FILE *out, const char *s)
{
    for (; *s; s++) {
        switch (*s) {
        case '&':
            fputs("&amp;", out);
            break;
        case '<':
            fputs("&lt;", out);
            break;
        case '>':
            fputs("&gt;", out);
            break;
        case '"':
            fputs("&quot;", out);
            break;
        default:
            fputc(*s, out);
        }
    }
}

void svg_begin(FILE *out, int width, int height)
{
    fputs("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n", out);
    fprintf(out,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" "
            "viewBox=\"0 0 %d %d\" font-family=\"DejaVu Sans, Arial, sans-serif\">\n",
            width, height, width, height);
    fprintf(out, "<rect width=\"%d\" height=\"%d\" fill=\"white\"/>\n", width, height);
}

/* Colour of t in [0, 1]: the viridis colour map (matplotlib), sampled at nine points and
 * interpolated linearly. */
void svg_viridis(double t, char out[8])
{
    static const unsigned char stops[9][3] = {{68, 1, 84},    {71, 44, 122},  {59, 81, 139},
                                              {44, 113, 142}, {33, 144, 141}, {39, 173, 129},
                                              {92, 200, 99},  {170, 220, 50}, {253, 231, 37}};
    if (!(t > 0)) t = 0;
    if (t > 1) t = 1;
    double x = t * 8;
    int i = (int)x;
    if (i > 7) i = 7;
    double f = x - i;
    int rgb[3];
    for (int k = 0; k < 3; k++)
        rgb[k] = (int)lround(stops[i][k] + f * (stops[i + 1][k] - stops[i][k]));
    snprintf(out, 8, "#%02x%02x%02x", rgb[0] & 255, rgb[1] & 255, rgb[2] & 255);
}

int file_write_atomically(const char *path, file_body body, const void *context, char *err,
                          size_t err_size)
{
    char tmp[4200];
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *out = fopen(tmp, "w");
    if (!out) {
        snprintf(err, err_size, "cannot create %s: %s", tmp, strerror(errno));
        return -1;
    }
    body(out, context);
    return file_commit(out, tmp, path, err, err_size);
}

bool is_directory(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

bool is_regular_file(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

char *file_read(const char *path, size_t max_bytes, size_t *length, char *err, size_t err_size)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(err, err_size, "%s: cannot open: %s", path, strerror(errno));
        return NULL;
    }
    size_t cap = 1 << 16, len = 0;
    char *text = xmalloc(cap + 1);
    for (;;) {
        size_t k = fread(text + len, 1, cap - len, f);
        len += k;
        if (len < cap) break;
        if (cap >= max_bytes) {
            fclose(f);
            free(text);
            snprintf(err, err_size, "%s: larger than %zu bytes", path, max_bytes);
            return NULL;
        }
        cap *= 2;
        char *grown = realloc(text, cap + 1);
        if (!grown) fatal(EXIT_RUNTIME, "out of memory reading %s", path);
        text = grown;
    }
    int failed = ferror(f);
    fclose(f);
    if (failed) {
        snprintf(err, err_size, "%s: read error", path);
        free(text);
        return NULL;
    }
    text[len] = '\0';
    *length = len;
    return text;
}
