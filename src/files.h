/* files: small file-system helpers shared by the phases and the log. */
#ifndef ESFT_FILES_H
#define ESFT_FILES_H

/* mkdir -p: creates path and its missing parents. 0, or -1 with errno set. */
int make_directories(const char *path);

#endif
