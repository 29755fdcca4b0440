/* test_train_check: checks on what a training run leaves behind, for tests/test-train.sh.
 *
 *   test_train_check frozen BASE_DIR MERGED_DIR NAMES.txt
 *       every tensor of the merged export not listed in NAMES.txt (one Hugging Face name
 *       per line: the trainable set) is bitwise equal to the base model's; every listed
 *       one differs from it somewhere (it trained).
 *   test_train_check optimizer CHECKPOINT.h5 NAMES.txt
 *       the checkpoint's /tensors, /adam_m and /adam_v hold exactly the listed names.
 *   test_train_check damage CHECKPOINT.h5 OBJECT BYTES
 *       inverts the first BYTES bytes of dataset OBJECT's raw data (/tensors/<name>, ...)
 *       in the file itself, behind HDF5's back, as a failing disk or a bad copy would:
 *       the file stays a valid HDF5 file holding other values.
 * Exit 0 when the checks hold (damage: when the bytes were inverted). */
#include <fcntl.h>
#include <hdf5.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "log.h"
#include "safetensors.h"

static int n_names = 0;
static char names[4096][192];

static void read_names(const char *path)
{
    FILE *f = fopen(path, "r");
    CHECK(f != NULL, "cannot open %s", path);
    if (!f) return;
    while (n_names < 4096 && fgets(names[n_names], sizeof names[0], f)) {
        names[n_names][strcspn(names[n_names], "\n")] = '\0';
        if (names[n_names][0]) n_names++;
    }
    fclose(f);
}

static int listed(const char *name)
{
    for (int i = 0; i < n_names; i++)
        if (strcmp(names[i], name) == 0) return 1;
    return 0;
}

static void frozen(const char *base_dir, const char *merged_dir)
{
    char err[1024];
    struct st_checkpoint *base = st_checkpoint_open(base_dir, err, sizeof err);
    CHECK(base != NULL, "%s", err);
    struct st_checkpoint *merged = st_checkpoint_open(merged_dir, err, sizeof err);
    CHECK(merged != NULL, "%s", err);
    if (!base || !merged) return;
    CHECK(base->n_tensors == merged->n_tensors, "%d tensors in the base, %d merged", base->n_tensors,
          merged->n_tensors);
    int unchanged = 0, trained = 0;
    for (int i = 0; i < base->n_tensors; i++) {
        const struct st_tensor *a = &base->tensors[i], *b = st_find(merged, a->name);
        CHECK(b != NULL, "%s missing from the merged export", a->name);
        if (!b) continue;
        int same = a->nbytes == b->nbytes && a->dtype == b->dtype && memcmp(a->data, b->data, a->nbytes) == 0;
        if (listed(a->name)) {
            CHECK(!same, "trainable %s did not change", a->name);
            trained++;
        } else {
            CHECK(same, "frozen %s changed", a->name);
            unchanged++;
        }
    }
    CHECK(trained == n_names, "%d of the %d listed tensors found", trained, n_names);
    printf("frozen: %d tensors bitwise unchanged, %d trained\n", unchanged, trained);
    st_checkpoint_close(base);
    st_checkpoint_close(merged);
}

struct group_names {
    int n;
    int wrong;
};

static herr_t visit(hid_t group, const char *name, const H5L_info_t *info, void *data)
{
    (void)group, (void)info;
    struct group_names *g = data;
    g->n++;
    if (!listed(name)) {
        g->wrong++;
        fprintf(stderr, "unexpected tensor in the checkpoint: %s\n", name);
    }
    return 0;
}

static void optimizer(const char *checkpoint)
{
    hid_t file = H5Fopen(checkpoint, H5F_ACC_RDONLY, H5P_DEFAULT);
    CHECK(file >= 0, "cannot open %s", checkpoint);
    if (file < 0) return;
    const char *groups[3] = {"/tensors", "/adam_m", "/adam_v"};
    for (int i = 0; i < 3; i++) {
        struct group_names g = {0, 0};
        hid_t group = H5Gopen2(file, groups[i], H5P_DEFAULT);
        CHECK(group >= 0, "%s: no group %s", checkpoint, groups[i]);
        if (group < 0) continue;
        H5Literate(group, H5_INDEX_NAME, H5_ITER_INC, NULL, visit, &g);
        H5Gclose(group);
        CHECK(g.wrong == 0 && g.n == n_names, "%s%s: %d entries (%d not trainable), %d trainable "
              "tensors", checkpoint, groups[i], g.n, g.wrong, n_names);
        printf("%s: %d entries, all trainable\n", groups[i], g.n);
    }
    H5Fclose(file);
}

static void damage(const char *checkpoint, const char *object, long bytes)
{
    hid_t file = H5Fopen(checkpoint, H5F_ACC_RDONLY, H5P_DEFAULT);
    CHECK(file >= 0, "cannot open %s", checkpoint);
    if (file < 0) return;
    hid_t dset = H5Dopen2(file, object, H5P_DEFAULT);
    CHECK(dset >= 0, "%s: no dataset %s", checkpoint, object);
    haddr_t offset = dset >= 0 ? H5Dget_offset(dset) : HADDR_UNDEF;
    hsize_t size = dset >= 0 ? H5Dget_storage_size(dset) : 0;
    if (dset >= 0) H5Dclose(dset);
    H5Fclose(file);
    CHECK(offset != HADDR_UNDEF && bytes > 0 && (hsize_t)bytes <= size,
          "%s: %s is not %ld contiguous bytes (%llu stored)", checkpoint, object, bytes,
          (unsigned long long)size);
    if (offset == HADDR_UNDEF || bytes <= 0 || (hsize_t)bytes > size) return;
    unsigned char buf[4096];
    if (bytes > (long)sizeof buf) bytes = sizeof buf;
    int fd = open(checkpoint, O_RDWR);
    CHECK(fd >= 0, "cannot open %s for writing", checkpoint);
    if (fd < 0) return;
    ssize_t got = pread(fd, buf, (size_t)bytes, (off_t)offset);
    for (long k = 0; k < bytes; k++) buf[k] ^= 0xff;
    ssize_t put = got == bytes ? pwrite(fd, buf, (size_t)bytes, (off_t)offset) : -1;
    close(fd);
    CHECK(put == bytes, "%s: cannot rewrite %ld bytes at %llu", checkpoint, bytes,
          (unsigned long long)offset);
    printf("damage: %ld bytes of %s inverted at offset %llu of %s\n", bytes, object,
           (unsigned long long)offset, checkpoint);
}

int main(int argc, char **argv)
{
    if (argc == 5 && strcmp(argv[1], "frozen") == 0) {
        read_names(argv[4]);
        frozen(argv[2], argv[3]);
    } else if (argc == 4 && strcmp(argv[1], "optimizer") == 0) {
        read_names(argv[3]);
        optimizer(argv[2]);
    } else if (argc == 5 && strcmp(argv[1], "damage") == 0) {
        damage(argv[2], argv[3], atol(argv[4]));
    } else {
        fprintf(stderr, "usage: test_train_check frozen BASE MERGED NAMES | optimizer CKPT NAMES "
                        "| damage CKPT OBJECT BYTES\n");
        return 2;
    }
    return check_done("test_train_check");
}
