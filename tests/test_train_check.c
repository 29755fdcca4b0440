/* test_train_check: checks on what a training run leaves behind, for tests/test-train.sh.
 *
 *   test_train_check frozen BASE_DIR MERGED_DIR NAMES.txt
 *       every tensor of the merged export not listed in NAMES.txt (one Hugging Face name
 *       per line: the trainable set) is bitwise equal to the base model's; every listed
 *       one differs from it somewhere (it trained).
 *   test_train_check optimizer CHECKPOINT.h5 NAMES.txt
 *       the checkpoint's /tensors, /adam_m and /adam_v hold exactly the listed names.
 *   test_train_check reference BASE_DIR ADAPTER_DIR
 *       ADAPTER_DIR/esft_reference loads as the ESFT reference loads an adapter
 *       (deepseek-ai/ESFT esft.py, its rule written again here): expert_cfg.json's
 *       "experts", "shared_experts", "non_expert_modules" make the parameters of the base
 *       model's inner module (its "model." tensors, named without the prefix) trainable;
 *       model.model.load_state_dict (strict) then needs the adapter's keys to be exactly
 *       those, and each tensor must equal esft's own adapter's "model." one bit for bit.
 *   test_train_check damage CHECKPOINT.h5 OBJECT BYTES
 *       inverts the first BYTES bytes of dataset OBJECT's raw data (/tensors/<name>, ...)
 *       in the file itself, behind HDF5's back, as a failing disk or a bad copy would:
 *       the file stays a valid HDF5 file holding other values.
 * Exit 0 when the checks hold (damage: when the bytes were inverted). */
#include <fcntl.h>
#include <hdf5.h>
#include <jansson.h>
#include <stdbool.h>
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

/* Whether the reference's to_esft makes inner-module tensor `name` a parameter. */
static int reference_trains(const char *name, const json_t *cfg)
{
    int layer = -1, expert = -1, used = 0;
    bool shared = strstr(name, ".mlp.shared_expert") != NULL;
    if (sscanf(name, "layers.%d.mlp.experts.%d.%n", &layer, &expert, &used) == 2 && used > 0) {
        char key[16];
        snprintf(key, sizeof key, "%d", layer);
        size_t i;
        const json_t *id;
        json_array_foreach(json_object_get(json_object_get(cfg, "experts"), key), i, id) {
            if (json_integer_value(id) == expert) return 1;
        }
        return 0;
    }
    if (shared) return json_is_true(json_object_get(cfg, "shared_experts"));
    return json_is_true(json_object_get(cfg, "non_expert_modules"));
}

static void reference(const char *base_dir, const char *adapter_dir)
{
    char err[1024], path[4200];
    struct st_checkpoint *base = st_checkpoint_open(base_dir, err, sizeof err);
    snprintf(path, sizeof path, "%s/esft_reference/adapter.safetensors", adapter_dir);
    struct st_file *ref = st_open(path, err, sizeof err);
    CHECK(ref != NULL, "%s", err);
    snprintf(path, sizeof path, "%s/adapter.safetensors", adapter_dir);
    struct st_file *own = st_open(path, err, sizeof err);
    snprintf(path, sizeof path, "%s/esft_reference/expert_cfg.json", adapter_dir);
    json_error_t jerr;
    json_t *cfg = json_load_file(path, 0, &jerr);
    CHECK(base && own && cfg, "cannot read the base model, the adapter or %s", path);
    if (!base || !ref || !own || !cfg) return;
    int wanted = 0;
    for (int i = 0; i < base->n_tensors; i++) {
        const char *name = base->tensors[i].name;
        if (strncmp(name, "model.", 6) != 0 || !reference_trains(name + 6, cfg)) continue;
        wanted++;
        const struct st_tensor *r = st_file_find(ref, name + 6);
        CHECK(r != NULL, "strict load: %s is missing from the reference layout", name + 6);
        const struct st_tensor *o = st_file_find(own, name);
        CHECK(o != NULL, "%s is missing from esft's adapter", name);
        if (r && o)
            CHECK(r->nbytes == o->nbytes && r->dtype == o->dtype &&
                      memcmp(r->data, o->data, r->nbytes) == 0,
                  "%s differs from esft's %s", name + 6, name);
    }
    CHECK(ref->n_tensors == wanted, "strict load: the reference layout holds %d tensors, the "
          "rule makes %d parameters", ref->n_tensors, wanted);
    CHECK(wanted > 0, "no trained tensor");
    printf("reference: %d tensors, keys and values as the ESFT reference loads them\n", wanted);
    json_decref(cfg);
    st_close(own);
    st_close(ref);
    st_checkpoint_close(base);
}

int main(int argc, char **argv)
{
    if (argc == 5 && strcmp(argv[1], "frozen") == 0) {
        read_names(argv[4]);
        frozen(argv[2], argv[3]);
    } else if (argc == 4 && strcmp(argv[1], "optimizer") == 0) {
        read_names(argv[3]);
        optimizer(argv[2]);
    } else if (argc == 4 && strcmp(argv[1], "reference") == 0) {
        reference(argv[2], argv[3]);
    } else if (argc == 5 && strcmp(argv[1], "damage") == 0) {
        damage(argv[2], argv[3], atol(argv[4]));
    } else {
        fprintf(stderr, "usage: test_train_check frozen BASE MERGED NAMES | optimizer CKPT NAMES "
                        "| reference BASE ADAPTER | damage CKPT OBJECT BYTES\n");
        return 2;
    }
    return check_done("test_train_check");
}
