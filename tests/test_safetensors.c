/* test_safetensors: the safetensors reader, writer and conversions.
 *
 * Expected values are worked out by hand from the IEEE 754 / bfloat16 bit layouts and
 * the safetensors format description, not taken from the program's output. Malformed
 * files are crafted byte by byte in a temporary directory. With a directory argument
 * (default tests/golden, or $ESFT_TOP_SRCDIR/tests/golden) every fixture checkpoint
 * produced by transformers must open and convert. The streaming writer (st_stream) is
 * held to a file whose bytes are written out here by hand.
 *
 * Usage: test_safetensors [GOLDEN_DIR] */
#include <dirent.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "../src/safetensors.h"
#include "../src/st_stream.h"
#include "check.h"

static char tmpdir[64];

static char *path_in(const char *dir, const char *name)
{
    static char buf[4][512];
    static int next = 0;
    char *p = buf[next++ % 4];
    snprintf(p, sizeof buf[0], "%s/%s", dir, name);
    return p;
}

static void write_bytes(const char *path, const void *bytes, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (!f) {
        perror(path);
        exit(1);
    }
    if (n) fwrite(bytes, 1, n, f);
    fclose(f);
}

/* A safetensors file: 8-byte length (header_len, or the real one when < 0), the header
 * text as given, then data_len bytes of 0xAB. */
static void write_crafted(const char *path, const char *header, long long header_len,
                          size_t data_len)
{
    size_t h = strlen(header);
    unsigned long long len = header_len < 0 ? h : (unsigned long long)header_len;
    size_t n = 8 + h + data_len;
    unsigned char *b = malloc(n);
    for (int i = 0; i < 8; i++) b[i] = (unsigned char)(len >> (8 * i));
    memcpy(b + 8, header, h);
    memset(b + 8 + h, 0xAB, data_len);
    write_bytes(path, b, n);
    free(b);
}

static void remove_tree(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, "..")) continue;
        char p[1024];
        snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
        struct stat sb;
        if (lstat(p, &sb) == 0 && S_ISDIR(sb.st_mode))
            remove_tree(p);
        else
            unlink(p);
    }
    closedir(d);
    rmdir(dir);
}

static uint32_t bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

static float from_bits(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* ---- conversions ------------------------------------------------------------------- */

static void test_bf16(void)
{
    /* bf16 = top 16 bits of binary32: 1.0 = 0x3F800000, -2.5 = -1.25 * 2^1 = 0xC0200000 */
    CHECK(st_f32_to_bf16(1.0f) == 0x3F80, "1.0 -> %04x", st_f32_to_bf16(1.0f));
    CHECK(st_f32_to_bf16(-2.5f) == 0xC020, "-2.5 -> %04x", st_f32_to_bf16(-2.5f));
    CHECK(st_bf16_to_f32(0x3F80) == 1.0f, "0x3F80");
    CHECK(st_bf16_to_f32(0xC020) == -2.5f, "0xC020");
    /* smallest subnormal: 0x0001 = 2^-126 * 2^-7 = 2^-133 */
    CHECK(st_bf16_to_f32(0x0001) == ldexpf(1.0f, -133), "bf16 subnormal");
    CHECK(st_f32_to_bf16(ldexpf(1.0f, -133)) == 0x0001, "to bf16 subnormal");
    CHECK(bits(st_bf16_to_f32(0x0001)) == 0x00010000u, "bf16 subnormal bits");
    /* largest finite: 0x7F7F = (2 - 2^-7) * 2^127 */
    CHECK(st_bf16_to_f32(0x7F7F) == ldexpf(2.0f - ldexpf(1.0f, -7), 127), "bf16 max");
    CHECK(st_f32_to_bf16(ldexpf(2.0f - ldexpf(1.0f, -7), 127)) == 0x7F7F, "to bf16 max");
    CHECK(st_f32_to_bf16(INFINITY) == 0x7F80, "inf");
    CHECK(st_f32_to_bf16(-INFINITY) == 0xFF80, "-inf");
    CHECK(isinf(st_bf16_to_f32(0x7F80)) && st_bf16_to_f32(0x7F80) > 0, "0x7F80 is +inf");
    uint16_t nan16 = st_f32_to_bf16(NAN);
    CHECK((nan16 & 0x7F80) == 0x7F80 && (nan16 & 0x007F) != 0, "NaN -> %04x", nan16);
    /* a NaN whose payload lives only in the dropped low bits must stay NaN */
    uint16_t low_nan = st_f32_to_bf16(from_bits(0x7F800001));
    CHECK((low_nan & 0x7F80) == 0x7F80 && (low_nan & 0x007F) != 0, "low NaN -> %04x", low_nan);
    CHECK(isnan(st_bf16_to_f32(0x7FC0)), "0x7FC0 is NaN");
    /* ties to even: 0x3F808000 lies halfway between 0x3F80 and 0x3F81 -> 0x3F80 (even);
     * 0x3F818000 halfway between 0x3F81 and 0x3F82 -> 0x3F82; just above half rounds up */
    CHECK(st_f32_to_bf16(from_bits(0x3F808000)) == 0x3F80, "tie down");
    CHECK(st_f32_to_bf16(from_bits(0x3F818000)) == 0x3F82, "tie up");
    CHECK(st_f32_to_bf16(from_bits(0x3F808001)) == 0x3F81, "above half");
    CHECK(st_f32_to_bf16(from_bits(0x3F807FFF)) == 0x3F80, "below half");
    /* FLT_MAX 0x7F7FFFFF is above the tie 0x7F7F8000 -> rounds to inf */
    CHECK(st_f32_to_bf16(from_bits(0x7F7FFFFF)) == 0x7F80, "FLT_MAX -> inf");
    CHECK(st_f32_to_bf16(-0.0f) == 0x8000, "-0");
}

static void test_f16(void)
{
    /* binary16: 1.0 = exp 15 -> 0x3C00; -2.5 = -1.25 * 2^1: 0x8000 | 16<<10 | 0x100 */
    CHECK(st_f32_to_f16(1.0f) == 0x3C00, "1.0 -> %04x", st_f32_to_f16(1.0f));
    CHECK(st_f32_to_f16(-2.5f) == 0xC100, "-2.5 -> %04x", st_f32_to_f16(-2.5f));
    CHECK(st_f16_to_f32(0x3C00) == 1.0f, "0x3C00");
    CHECK(st_f16_to_f32(0xC100) == -2.5f, "0xC100");
    /* subnormals: 0x0001 = 2^-24, 0x03FF = 1023 * 2^-24; smallest normal 0x0400 = 2^-14 */
    CHECK(st_f16_to_f32(0x0001) == ldexpf(1.0f, -24), "f16 smallest subnormal");
    CHECK(st_f16_to_f32(0x03FF) == 1023.0f * ldexpf(1.0f, -24), "f16 largest subnormal");
    CHECK(st_f16_to_f32(0x0400) == ldexpf(1.0f, -14), "f16 smallest normal");
    CHECK(st_f16_to_f32(0x8001) == -ldexpf(1.0f, -24), "negative subnormal");
    CHECK(st_f32_to_f16(ldexpf(1.0f, -24)) == 0x0001, "to smallest subnormal");
    CHECK(st_f32_to_f16(1023.0f * ldexpf(1.0f, -24)) == 0x03FF, "to largest subnormal");
    CHECK(st_f32_to_f16(ldexpf(1.0f, -14)) == 0x0400, "to smallest normal");
    CHECK(st_f32_to_f16(-ldexpf(1.0f, -24)) == 0x8001, "to negative subnormal");
    /* 2^-25 is halfway between 0 and 2^-24: ties to even -> 0; 3 * 2^-25 is halfway
     * between 1 and 2 units -> 2; a hair above 2^-25 -> 1 unit */
    CHECK(st_f32_to_f16(ldexpf(1.0f, -25)) == 0x0000, "2^-25 -> 0");
    CHECK(st_f32_to_f16(3.0f * ldexpf(1.0f, -25)) == 0x0002, "3*2^-25 -> 2 units");
    CHECK(st_f32_to_f16(ldexpf(1.0f, -25) * 1.0001f) == 0x0001, "just above 2^-25");
    CHECK(st_f32_to_f16(ldexpf(1.0f, -30)) == 0x0000, "underflow");
    /* largest subnormal + half a unit (1023.5 * 2^-24): tie, 1023 odd -> 1024 = 0x0400 */
    CHECK(st_f32_to_f16(1023.5f * ldexpf(1.0f, -24)) == 0x0400, "subnormal tie into normal");
    /* max 65504 = 0x7BFF; 65520 is the tie with 2^16 -> inf; just below stays max */
    CHECK(st_f16_to_f32(0x7BFF) == 65504.0f, "f16 max");
    CHECK(st_f32_to_f16(65504.0f) == 0x7BFF, "to f16 max");
    CHECK(st_f32_to_f16(65519.0f) == 0x7BFF, "65519 -> max");
    CHECK(st_f32_to_f16(65520.0f) == 0x7C00, "65520 -> inf");
    CHECK(st_f32_to_f16(1e10f) == 0x7C00, "overflow -> inf");
    CHECK(st_f32_to_f16(-1e10f) == 0xFC00, "overflow -> -inf");
    CHECK(st_f32_to_f16(INFINITY) == 0x7C00, "inf");
    CHECK(isinf(st_f16_to_f32(0xFC00)) && st_f16_to_f32(0xFC00) < 0, "0xFC00 is -inf");
    uint16_t nan16 = st_f32_to_f16(NAN);
    CHECK((nan16 & 0x7C00) == 0x7C00 && (nan16 & 0x03FF) != 0, "NaN -> %04x", nan16);
    CHECK(isnan(st_f16_to_f32(0x7E00)), "0x7E00 is NaN");
    /* ties in the normal range: 1 + 2^-11 halfway between 0x3C00 and 0x3C01 -> 0x3C00;
     * 1 + 3 * 2^-11 halfway between 0x3C01 and 0x3C02 -> 0x3C02 */
    CHECK(st_f32_to_f16(1.0f + ldexpf(1.0f, -11)) == 0x3C00, "tie down");
    CHECK(st_f32_to_f16(1.0f + 3.0f * ldexpf(1.0f, -11)) == 0x3C02, "tie up");
    CHECK(st_f32_to_f16(-0.0f) == 0x8000, "-0");
    CHECK(signbit(st_f16_to_f32(0x8000)) && st_f16_to_f32(0x8000) == 0.0f, "0x8000 is -0");
    /* 0.1 = 0x3DCCCCCD; in binary16 0x2E66 (0.0999755859375) */
    CHECK(st_f32_to_f16(0.1f) == 0x2E66, "0.1 -> %04x", st_f32_to_f16(0.1f));
}

/* ---- writer / reader round trip ---------------------------------------------------- */

static int contains(const char *s, const char *part)
{
    return strstr(s, part) != NULL;
}

/* Every fp8 e4m3 byte as torch widens it to float32 (the bits of
 * torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float(), torch 2.15). */
static const uint32_t torch_e4m3[256] = {
    0x00000000, 0x3B000000, 0x3B800000, 0x3BC00000, 0x3C000000, 0x3C200000, 0x3C400000, 0x3C600000,
    0x3C800000, 0x3C900000, 0x3CA00000, 0x3CB00000, 0x3CC00000, 0x3CD00000, 0x3CE00000, 0x3CF00000,
    0x3D000000, 0x3D100000, 0x3D200000, 0x3D300000, 0x3D400000, 0x3D500000, 0x3D600000, 0x3D700000,
    0x3D800000, 0x3D900000, 0x3DA00000, 0x3DB00000, 0x3DC00000, 0x3DD00000, 0x3DE00000, 0x3DF00000,
    0x3E000000, 0x3E100000, 0x3E200000, 0x3E300000, 0x3E400000, 0x3E500000, 0x3E600000, 0x3E700000,
    0x3E800000, 0x3E900000, 0x3EA00000, 0x3EB00000, 0x3EC00000, 0x3ED00000, 0x3EE00000, 0x3EF00000,
    0x3F000000, 0x3F100000, 0x3F200000, 0x3F300000, 0x3F400000, 0x3F500000, 0x3F600000, 0x3F700000,
    0x3F800000, 0x3F900000, 0x3FA00000, 0x3FB00000, 0x3FC00000, 0x3FD00000, 0x3FE00000, 0x3FF00000,
    0x40000000, 0x40100000, 0x40200000, 0x40300000, 0x40400000, 0x40500000, 0x40600000, 0x40700000,
    0x40800000, 0x40900000, 0x40A00000, 0x40B00000, 0x40C00000, 0x40D00000, 0x40E00000, 0x40F00000,
    0x41000000, 0x41100000, 0x41200000, 0x41300000, 0x41400000, 0x41500000, 0x41600000, 0x41700000,
    0x41800000, 0x41900000, 0x41A00000, 0x41B00000, 0x41C00000, 0x41D00000, 0x41E00000, 0x41F00000,
    0x42000000, 0x42100000, 0x42200000, 0x42300000, 0x42400000, 0x42500000, 0x42600000, 0x42700000,
    0x42800000, 0x42900000, 0x42A00000, 0x42B00000, 0x42C00000, 0x42D00000, 0x42E00000, 0x42F00000,
    0x43000000, 0x43100000, 0x43200000, 0x43300000, 0x43400000, 0x43500000, 0x43600000, 0x43700000,
    0x43800000, 0x43900000, 0x43A00000, 0x43B00000, 0x43C00000, 0x43D00000, 0x43E00000, 0x7FF00000,
    0x80000000, 0xBB000000, 0xBB800000, 0xBBC00000, 0xBC000000, 0xBC200000, 0xBC400000, 0xBC600000,
    0xBC800000, 0xBC900000, 0xBCA00000, 0xBCB00000, 0xBCC00000, 0xBCD00000, 0xBCE00000, 0xBCF00000,
    0xBD000000, 0xBD100000, 0xBD200000, 0xBD300000, 0xBD400000, 0xBD500000, 0xBD600000, 0xBD700000,
    0xBD800000, 0xBD900000, 0xBDA00000, 0xBDB00000, 0xBDC00000, 0xBDD00000, 0xBDE00000, 0xBDF00000,
    0xBE000000, 0xBE100000, 0xBE200000, 0xBE300000, 0xBE400000, 0xBE500000, 0xBE600000, 0xBE700000,
    0xBE800000, 0xBE900000, 0xBEA00000, 0xBEB00000, 0xBEC00000, 0xBED00000, 0xBEE00000, 0xBEF00000,
    0xBF000000, 0xBF100000, 0xBF200000, 0xBF300000, 0xBF400000, 0xBF500000, 0xBF600000, 0xBF700000,
    0xBF800000, 0xBF900000, 0xBFA00000, 0xBFB00000, 0xBFC00000, 0xBFD00000, 0xBFE00000, 0xBFF00000,
    0xC0000000, 0xC0100000, 0xC0200000, 0xC0300000, 0xC0400000, 0xC0500000, 0xC0600000, 0xC0700000,
    0xC0800000, 0xC0900000, 0xC0A00000, 0xC0B00000, 0xC0C00000, 0xC0D00000, 0xC0E00000, 0xC0F00000,
    0xC1000000, 0xC1100000, 0xC1200000, 0xC1300000, 0xC1400000, 0xC1500000, 0xC1600000, 0xC1700000,
    0xC1800000, 0xC1900000, 0xC1A00000, 0xC1B00000, 0xC1C00000, 0xC1D00000, 0xC1E00000, 0xC1F00000,
    0xC2000000, 0xC2100000, 0xC2200000, 0xC2300000, 0xC2400000, 0xC2500000, 0xC2600000, 0xC2700000,
    0xC2800000, 0xC2900000, 0xC2A00000, 0xC2B00000, 0xC2C00000, 0xC2D00000, 0xC2E00000, 0xC2F00000,
    0xC3000000, 0xC3100000, 0xC3200000, 0xC3300000, 0xC3400000, 0xC3500000, 0xC3600000, 0xC3700000,
    0xC3800000, 0xC3900000, 0xC3A00000, 0xC3B00000, 0xC3C00000, 0xC3D00000, 0xC3E00000, 0xFFF00000,

};

static void test_f8(void)
{
    int wrong = 0;
    for (int b = 0; b < 256; b++) {
        uint32_t got = bits(st_f8_e4m3_to_f32((uint8_t)b));
        if (got != torch_e4m3[b] && wrong++ < 8)
            CHECK(0, "e4m3 0x%02X -> 0x%08X, torch 0x%08X", b, got, torch_e4m3[b]);
    }
    CHECK(wrong == 0, "%d of 256 e4m3 bytes differ from torch", wrong);
    /* by hand: 1.0 = 0 0111 000; 448 = 0 1111 110 (1.75 * 2^8), the largest; subnormals
     * m * 2^-9; 0x7F / 0xFF NaN (no infinities); 0x80 negative zero */
    CHECK(st_f8_e4m3_to_f32(0x38) == 1.0f, "e4m3 0x38 is 1");
    CHECK(st_f8_e4m3_to_f32(0x7E) == 448.0f && st_f8_e4m3_to_f32(0xFE) == -448.0f, "e4m3 +-448");
    CHECK(st_f8_e4m3_to_f32(0x01) == 0x1p-9f && st_f8_e4m3_to_f32(0x07) == 7 * 0x1p-9f,
          "e4m3 subnormals");
    CHECK(st_f8_e4m3_to_f32(0x08) == 0x1p-6f, "e4m3 smallest normal 2^-6");
    CHECK(isnan(st_f8_e4m3_to_f32(0x7F)) && isnan(st_f8_e4m3_to_f32(0xFF)), "e4m3 NaN");
    CHECK(st_f8_e4m3_to_f32(0x80) == 0.0f && signbit(st_f8_e4m3_to_f32(0x80)), "e4m3 -0");
    CHECK(st_f8_e4m3_to_f32(0x77) == 240.0f, "e4m3 0x77 = 1.875 * 2^7");
    /* e5m2 = the top byte of a binary16 */
    CHECK(st_f8_e5m2_to_f32(0x3C) == 1.0f && st_f8_e5m2_to_f32(0x7B) == 57344.0f, "e5m2 1, max");
    CHECK(st_f8_e5m2_to_f32(0x01) == 0x1p-16f, "e5m2 smallest subnormal");
    CHECK(isinf(st_f8_e5m2_to_f32(0x7C)) && st_f8_e5m2_to_f32(0xFC) < 0, "e5m2 infinities");
    CHECK(isnan(st_f8_e5m2_to_f32(0x7D)) && isnan(st_f8_e5m2_to_f32(0xFF)), "e5m2 NaN");

    /* a file holding fp8: the header is accepted, st_read_f32 refuses without the scale */
    char path[300], err[512];
    snprintf(path, sizeof path, "%s/f8.safetensors", tmpdir);
    uint8_t q[4] = {0x38, 0x7E, 0x01, 0x80};
    struct st_writer *w = st_writer_new();
    CHECK(st_writer_add(w, "w", ST_F8_E4M3, 2, (int64_t[]){2, 2}, q, err, sizeof err) == 0, "%s",
          err);
    CHECK(st_writer_add(w, "v", ST_F8_E5M2, 1, (int64_t[]){4}, q, err, sizeof err) == 0, "%s", err);
    CHECK(st_writer_write(w, path, 0, err, sizeof err) == 0, "%s", err);
    st_writer_free(w);
    struct st_file *f = st_open(path, err, sizeof err);
    CHECK(f != NULL, "fp8 file: %s", err);
    if (!f) return;
    const struct st_tensor *t = st_file_find(f, "w");
    CHECK(t && t->dtype == ST_F8_E4M3 && t->nbytes == 4 && memcmp(t->data, q, 4) == 0,
          "F8_E4M3 view");
    t = st_file_find(f, "v");
    CHECK(t && t->dtype == ST_F8_E5M2, "F8_E5M2 view");
    float out[4];
    CHECK(t && st_read_f32(t, out, 4, err, sizeof err) != 0 && contains(err, "weight_scale_inv"),
          "st_read_f32 on fp8: %s", err);
    st_close(f);
}

static void test_round_trip(void)
{
    char err[1024];
    float a[6] = {1.0f, -2.5f, 0.5f, 3.0f, -0.0f, 65504.0f};
    uint16_t b[4] = {0x3F80, 0xC020, 0x0001, 0x7F80}; /* 1, -2.5, 2^-133, inf as bf16 */
    uint16_t h[1] = {0x3C00};                         /* 1.0 as f16 */
    int64_t ints[2] = {-7, 1LL << 40};
    double d[2] = {0.25, -1e300};
    float scalar = 42.0f;
    struct st_writer *w = st_writer_new();
    CHECK(st_writer_add(w, "z.last", ST_F32, 2, (int64_t[]){2, 3}, a, err, sizeof err) == 0, "%s",
          err);
    CHECK(st_writer_add(w, "a.bf16", ST_BF16, 1, (int64_t[]){4}, b, err, sizeof err) == 0, "%s",
          err);
    CHECK(st_writer_add(w, "m.f16", ST_F16, 2, (int64_t[]){1, 1}, h, err, sizeof err) == 0, "%s",
          err);
    CHECK(st_writer_add(w, "i.i64", ST_I64, 1, (int64_t[]){2}, ints, err, sizeof err) == 0, "%s",
          err);
    CHECK(st_writer_add(w, "d.f64", ST_F64, 1, (int64_t[]){2}, d, err, sizeof err) == 0, "%s", err);
    CHECK(st_writer_add(w, "e.empty", ST_U8, 2, (int64_t[]){0, 5}, NULL, err, sizeof err) == 0,
          "%s", err);
    CHECK(st_writer_add(w, "s.scalar", ST_F32, 0, NULL, &scalar, err, sizeof err) == 0, "%s", err);
    CHECK(st_writer_add(w, "bad", ST_F32, 1, (int64_t[]){-1}, a, err, sizeof err) != 0 &&
              contains(err, "negative"),
          "negative dim accepted: %s", err);
    char *path = path_in(tmpdir, "rt.safetensors");
    CHECK(st_writer_write(w, path, 1, err, sizeof err) == 0, "%s", err);
    CHECK(access(path_in(tmpdir, "rt.safetensors.tmp"), F_OK) != 0, "tmp file left behind");

    /* header length: 8-byte LE, multiple of 8, data area starts right after */
    FILE *f = fopen(path, "rb");
    unsigned char len8[8] = {0};
    CHECK(f && fread(len8, 1, 8, f) == 8, "read length");
    if (f) fclose(f);
    uint64_t hl = 0;
    for (int i = 7; i >= 0; i--) hl = hl << 8 | len8[i];
    CHECK(hl % 8 == 0, "header length %llu not a multiple of 8", (unsigned long long)hl);
    struct stat sb;
    stat(path, &sb);
    /* data: 16 (f64) + 0 + 16 (i64) + 2 (f16) + 4 (scalar) + 24 (f32) + 8 (bf16) = 70 */
    CHECK((uint64_t)sb.st_size == 8 + hl + 70, "file size %lld", (long long)sb.st_size);

    struct st_file *sf = st_open(path, err, sizeof err);
    CHECK(sf != NULL, "%s", err);
    if (sf) {
        CHECK(sf->n_tensors == 7, "n_tensors %d", sf->n_tensors);
        CHECK(sf->data_size == 70, "data size %zu", sf->data_size);
        const char *fmt = st_file_metadata(sf, "format");
        CHECK(fmt && strcmp(fmt, "pt") == 0, "metadata format");
        /* sorted by name; data in name order: a.bf16 first at offset 0 */
        CHECK(strcmp(sf->tensors[0].name, "a.bf16") == 0, "first %s", sf->tensors[0].name);
        CHECK(sf->tensors[0].data == sf->data_area, "a.bf16 not at offset 0");
        const struct st_tensor *t = st_file_find(sf, "z.last");
        CHECK(t && t->dtype == ST_F32 && t->rank == 2 && t->shape[0] == 2 && t->shape[1] == 3,
              "z.last meta");
        CHECK(t && (const unsigned char *)t->data == sf->data_area + 46, "z.last offset");
        float got[6];
        CHECK(t && st_read_f32(t, got, 6, err, sizeof err) == 0, "%s", err);
        CHECK(t && memcmp(got, a, sizeof a) == 0, "z.last values");
        t = st_file_find(sf, "a.bf16");
        float g4[4];
        CHECK(t && st_read_f32(t, g4, 4, err, sizeof err) == 0, "%s", err);
        CHECK(g4[0] == 1.0f && g4[1] == -2.5f && g4[2] == ldexpf(1.0f, -133) && isinf(g4[3]),
              "bf16 values %g %g %g %g", g4[0], g4[1], g4[2], g4[3]);
        t = st_file_find(sf, "m.f16");
        float g1;
        CHECK(t && st_read_f32(t, &g1, 1, err, sizeof err) == 0 && g1 == 1.0f, "f16 value");
        t = st_file_find(sf, "d.f64");
        float g2[2];
        CHECK(t && st_read_f32(t, g2, 2, err, sizeof err) == 0 && g2[0] == 0.25f && isinf(g2[1]) &&
                  g2[1] < 0,
              "f64 values");
        t = st_file_find(sf, "i.i64");
        int64_t gi[2];
        CHECK(t && t->nbytes == 16, "i64 size");
        if (t) memcpy(gi, t->data, 16);
        CHECK(t && gi[0] == -7 && gi[1] == (1LL << 40), "i64 values");
        CHECK(t && st_read_f32(t, g2, 2, err, sizeof err) != 0 && contains(err, "i.i64"),
              "i64 read as float accepted");
        t = st_file_find(sf, "e.empty");
        CHECK(t && t->numel == 0 && t->nbytes == 0 && t->rank == 2 && t->shape[1] == 5, "empty");
        t = st_file_find(sf, "s.scalar");
        CHECK(t && t->rank == 0 && t->numel == 1, "scalar");
        CHECK(st_file_find(sf, "nope") == NULL, "found a missing tensor");

        t = st_file_find(sf, "z.last");
        CHECK(t && st_expect_shape(t, err, sizeof err, 2, 3) == 0, "shape ok: %s", err);
        CHECK(t && st_expect_shape(t, err, sizeof err, 3, 2) != 0 && contains(err, "'z.last'") &&
                  contains(err, "expected shape [3, 2], got [2, 3]") &&
                  contains(err, "rt.safetensors"),
              "shape message: %s", err);
        CHECK(t && st_expect_shape(t, err, sizeof err, 6) != 0 &&
                  contains(err, "expected shape [6], got [2, 3]"),
              "rank message: %s", err);
        CHECK(t && st_read_f32(t, got, 5, err, sizeof err) != 0 && contains(err, "z.last"),
              "count mismatch accepted");
        st_close(sf);
    }

    /* duplicate names are refused at write time; nothing is left behind */
    CHECK(st_writer_add(w, "a.bf16", ST_BF16, 1, (int64_t[]){4}, b, err, sizeof err) == 0, "%s",
          err);
    CHECK(st_writer_write(w, path_in(tmpdir, "dup.safetensors"), 0, err, sizeof err) != 0 &&
              contains(err, "a.bf16"),
          "duplicate accepted: %s", err);
    CHECK(access(path_in(tmpdir, "dup.safetensors"), F_OK) != 0, "duplicate file written");
    st_writer_free(w);

    /* without metadata: no __metadata__ entry */
    w = st_writer_new();
    st_writer_add(w, "x", ST_F32, 1, (int64_t[]){1}, &scalar, err, sizeof err);
    CHECK(st_writer_write(w, path_in(tmpdir, "nometa.safetensors"), 0, err, sizeof err) == 0, "%s",
          err);
    sf = st_open(path_in(tmpdir, "nometa.safetensors"), err, sizeof err);
    CHECK(sf && sf->n_metadata == 0 && sf->n_tensors == 1, "no metadata");
    st_close(sf);
    st_writer_free(w);
}

static void test_sharded(void)
{
    char err[1024];
    char dir[600];
    snprintf(dir, sizeof dir, "%s/sharded", tmpdir);
    mkdir(dir, 0755);
    enum { N = 5 };
    float data[N][10];
    for (int i = 0; i < N; i++)
        for (int j = 0; j < 10; j++) data[i][j] = (float)(i * 100 + j);
    struct st_writer *w = st_writer_new();
    const char *names[N] = {"model.layers.1.w", "model.layers.0.w", "lm_head.weight",
                            "model.norm.weight", "model.embed_tokens.weight"};
    for (int i = 0; i < N; i++)
        st_writer_add(w, names[i], ST_F32, 2, (int64_t[]){2, 5}, data[i], err, sizeof err);
    /* 40 bytes each, limit 100: two per shard in name order -> 3 shards */
    CHECK(st_writer_write_checkpoint(w, dir, 100, err, sizeof err) == 0, "%s", err);
    CHECK(access(path_in(dir, "model-00001-of-00003.safetensors"), F_OK) == 0, "shard 1");
    CHECK(access(path_in(dir, "model-00003-of-00003.safetensors"), F_OK) == 0, "shard 3");
    CHECK(access(path_in(dir, "model.safetensors"), F_OK) != 0, "single file written");
    struct st_checkpoint *c = st_checkpoint_open(dir, err, sizeof err);
    CHECK(c != NULL, "%s", err);
    if (c) {
        CHECK(c->n_files == 3 && c->n_tensors == N, "files %d tensors %d", c->n_files,
              c->n_tensors);
        for (int i = 0; i < N; i++) {
            const struct st_tensor *t = st_find(c, names[i]);
            float got[10];
            CHECK(t && st_read_f32(t, got, 10, err, sizeof err) == 0 &&
                      memcmp(got, data[i], sizeof got) == 0,
                  "tensor %s", names[i]);
        }
        /* name order: lm_head, embed_tokens | layers.0, layers.1 | norm */
        const struct st_tensor *t = st_find(c, "model.norm.weight");
        CHECK(t && contains(t->file, "model-00003-of-00003.safetensors"), "norm in shard 3");
        t = st_find(c, "model.layers.0.w");
        CHECK(t && contains(t->file, "model-00002-of-00003.safetensors"), "layer 0 in shard 2");
        for (int i = 1; i < c->n_tensors; i++)
            CHECK(strcmp(c->tensors[i - 1].name, c->tensors[i].name) < 0, "iteration order");
        CHECK(st_get(c, "missing.weight", err, sizeof err) == NULL &&
                  contains(err, "missing.weight") && contains(err, "sharded"),
              "st_get message: %s", err);
        st_checkpoint_close(c);
    }
    /* the index as transformers writes it */
    FILE *f = fopen(path_in(dir, "model.safetensors.index.json"), "rb");
    char text[4096] = {0};
    if (f) {
        size_t n = fread(text, 1, sizeof text - 1, f);
        text[n] = '\0';
        fclose(f);
    }
    CHECK(contains(text, "\"total_size\": 200"), "total_size: %s", text);
    CHECK(contains(text, "\"total_parameters\": 50"), "total_parameters");
    CHECK(contains(text, "\"lm_head.weight\": \"model-00001-of-00003.safetensors\""), "map");
    st_writer_free(w);

    /* no limit: a single model.safetensors */
    snprintf(dir, sizeof dir, "%s/single", tmpdir);
    mkdir(dir, 0755);
    w = st_writer_new();
    st_writer_add(w, "x", ST_F32, 2, (int64_t[]){2, 5}, data[0], err, sizeof err);
    CHECK(st_writer_write_checkpoint(w, dir, 0, err, sizeof err) == 0, "%s", err);
    c = st_checkpoint_open(dir, err, sizeof err);
    CHECK(c && c->n_files == 1 && st_find(c, "x"), "single checkpoint: %s", err);
    st_checkpoint_close(c);
    st_writer_free(w);
    char name[64];
    st_shard_name(1, 2, name, sizeof name);
    CHECK(strcmp(name, "model-00001-of-00002.safetensors") == 0, "shard name %s", name);
}

/* ---- malformed input --------------------------------------------------------------- */

/* The file must be refused with a message containing every listed part. */
static void expect_bad_file(const char *file, const char *what, const char *part1,
                            const char *part2)
{
    char err[1024] = "";
    struct st_file *f = st_open(path_in(tmpdir, file), err, sizeof err);
    CHECK(f == NULL, "%s: accepted", what);
    st_close(f);
    CHECK(contains(err, file), "%s: message lacks the file name: %s", what, err);
    CHECK(!part1 || contains(err, part1), "%s: message lacks '%s': %s", what, part1, err);
    CHECK(!part2 || contains(err, part2), "%s: message lacks '%s': %s", what, part2, err);
}

static void test_malformed_files(void)
{
    write_bytes(path_in(tmpdir, "empty.safetensors"), "", 0);
    expect_bad_file("empty.safetensors", "empty file", "file is 0 bytes", "8-byte header");

    write_bytes(path_in(tmpdir, "x.safetensors"), "\x01\x02\x03\x04\x05", 5);
    expect_bad_file("x.safetensors", "5-byte file",
                    "x.safetensors: file is 5 bytes, shorter than the 8-byte header length", NULL);

    const char *ok = "{\"t\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}";
    write_crafted(path_in(tmpdir, "long.safetensors"), ok, 999999, 8);
    char want[128];
    snprintf(want, sizeof want, "header length 999999 exceeds the file (%zu bytes)",
             8 + strlen(ok) + 8);
    expect_bad_file("long.safetensors", "length beyond file", want, NULL);

    /* a length with the top bit set must not wrap around */
    write_crafted(path_in(tmpdir, "huge.safetensors"), ok, (long long)(~0ULL >> 1), 8);
    expect_bad_file("huge.safetensors", "huge length", "exceeds the file", NULL);

    write_crafted(path_in(tmpdir, "notjson.safetensors"), "{\"t\": [1, 2", -1, 0);
    expect_bad_file("notjson.safetensors", "non-JSON", "not valid JSON", NULL);

    write_crafted(path_in(tmpdir, "array.safetensors"), "[1, 2, 3]    ", -1, 0);
    expect_bad_file("array.safetensors", "header not an object", "expected a JSON object", NULL);

    write_crafted(path_in(tmpdir, "dtype.safetensors"),
                  "{\"w.e8m0\":{\"dtype\":\"F8_E8M0\",\"shape\":[2],\"data_offsets\":[0,2]}}", -1,
                  2);
    expect_bad_file("dtype.safetensors", "unknown dtype", "'w.e8m0'",
                    "dtype 'F8_E8M0' is not supported");

    write_crafted(path_in(tmpdir, "size.safetensors"),
                  "{\"w.size\":{\"dtype\":\"F32\",\"shape\":[2,2],\"data_offsets\":[0,12]}}", -1,
                  16);
    expect_bad_file("size.safetensors", "size mismatch", "'w.size'", "needs 16");

    write_crafted(path_in(tmpdir, "beyond.safetensors"),
                  "{\"model.layers.0.mlp.gate.weight\":{\"dtype\":\"F32\",\"shape\":[16],"
                  "\"data_offsets\":[100,164]}}",
                  -1, 150);
    expect_bad_file("beyond.safetensors", "offsets beyond data",
                    "tensor 'model.layers.0.mlp.gate.weight': data_offsets [100, 164] end beyond "
                    "the data area (150 bytes)",
                    NULL);

    write_crafted(path_in(tmpdir, "overlap.safetensors"),
                  "{\"a\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[0,16]},"
                  "\"b.over\":{\"dtype\":\"F32\",\"shape\":[4],\"data_offsets\":[8,24]}}",
                  -1, 24);
    expect_bad_file("overlap.safetensors", "overlap", "'b.over'", "overlaps");

    /* one tensor wholly inside another, listed first: still an overlap */
    write_crafted(path_in(tmpdir, "inside.safetensors"),
                  "{\"small\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[4,6]},"
                  "\"big\":{\"dtype\":\"U8\",\"shape\":[16],\"data_offsets\":[0,16]}}",
                  -1, 16);
    expect_bad_file("inside.safetensors", "nested overlap", "'small'", "overlaps");

    write_crafted(path_in(tmpdir, "negative.safetensors"),
                  "{\"w.neg\":{\"dtype\":\"F32\",\"shape\":[-2,2],\"data_offsets\":[0,16]}}", -1,
                  16);
    expect_bad_file("negative.safetensors", "negative shape", "'w.neg'", "negative");

    write_crafted(path_in(tmpdir, "order.safetensors"),
                  "{\"w.ord\":{\"dtype\":\"F32\",\"shape\":[0],\"data_offsets\":[8,0]}}", -1, 16);
    expect_bad_file("order.safetensors", "begin after end", "'w.ord'", "begin after end");

    write_crafted(path_in(tmpdir, "shapetype.safetensors"),
                  "{\"w.st\":{\"dtype\":\"F32\",\"shape\":\"2\",\"data_offsets\":[0,8]}}", -1, 8);
    expect_bad_file("shapetype.safetensors", "shape not array", "'w.st'", "'shape'");

    write_crafted(path_in(tmpdir, "real.safetensors"),
                  "{\"w.real\":{\"dtype\":\"F32\",\"shape\":[2.0],\"data_offsets\":[0,8]}}", -1, 8);
    expect_bad_file("real.safetensors", "real in shape", "'w.real'", "shape[0]");

    write_crafted(path_in(tmpdir, "nodtype.safetensors"),
                  "{\"w.nd\":{\"shape\":[2],\"data_offsets\":[0,8]}}", -1, 8);
    expect_bad_file("nodtype.safetensors", "no dtype", "'w.nd'", "dtype");

    write_crafted(path_in(tmpdir, "offs.safetensors"),
                  "{\"w.off\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0]}}", -1, 8);
    expect_bad_file("offs.safetensors", "one offset", "'w.off'", "data_offsets");

    write_crafted(path_in(tmpdir, "rank.safetensors"),
                  "{\"w.rank\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1],"
                  "\"data_offsets\":[0,1]}}",
                  -1, 1);
    expect_bad_file("rank.safetensors", "rank 9", "'w.rank'", "rank 9");

    write_crafted(path_in(tmpdir, "overflow.safetensors"),
                  "{\"w.big\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296],"
                  "\"data_offsets\":[0,8]}}",
                  -1, 8);
    expect_bad_file("overflow.safetensors", "shape overflow", "'w.big'", "overflow");

    write_crafted(path_in(tmpdir, "meta.safetensors"), "{\"__metadata__\":{\"format\":1}}", -1, 0);
    expect_bad_file("meta.safetensors", "metadata not string", "__metadata__", "format");

    write_crafted(path_in(tmpdir, "dupkey.safetensors"),
                  "{\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                  "\"w\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}",
                  -1, 2);
    expect_bad_file("dupkey.safetensors", "duplicate key", "not valid JSON", "duplicate");

    write_crafted(path_in(tmpdir, "entry.safetensors"), "{\"w.entry\": 5}", -1, 0);
    expect_bad_file("entry.safetensors", "entry not object", "'w.entry'", "expected an object");

    /* valid: header padded with spaces, empty tensor, gaps between tensors allowed */
    write_crafted(path_in(tmpdir, "good.safetensors"),
                  "{\"e\":{\"dtype\":\"F32\",\"shape\":[0,3],\"data_offsets\":[4,4]},"
                  "\"w\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[4,6]}}        ",
                  -1, 8);
    char err[1024];
    struct st_file *f = st_open(path_in(tmpdir, "good.safetensors"), err, sizeof err);
    CHECK(f && f->n_tensors == 2 && f->data_size == 8, "good file refused: %s", err);
    st_close(f);

    CHECK(st_open(path_in(tmpdir, "no-such.safetensors"), err, sizeof err) == NULL &&
              contains(err, "no-such.safetensors"),
          "missing file: %s", err);
    CHECK(st_open(tmpdir, err, sizeof err) == NULL && contains(err, "not a regular file"),
          "directory: %s", err);
}

static void make_dir(const char *name, char *out, size_t size)
{
    snprintf(out, size, "%s/%s", tmpdir, name);
    mkdir(out, 0755);
}

/* The checkpoint directory must be refused with a message containing both parts. */
static void expect_bad_checkpoint(const char *dir, const char *what, const char *part1,
                                  const char *part2)
{
    char err[2048] = "";
    struct st_checkpoint *c = st_checkpoint_open(dir, err, sizeof err);
    CHECK(c == NULL, "%s: accepted", what);
    st_checkpoint_close(c);
    CHECK(!part1 || contains(err, part1), "%s: message lacks '%s': %s", what, part1, err);
    CHECK(!part2 || contains(err, part2), "%s: message lacks '%s': %s", what, part2, err);
}

static void test_malformed_index(void)
{
    char dir[600];
    const char *shard = "{\"a.w\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]}}";

    make_dir("idx_missing", dir, sizeof dir);
    write_crafted(path_in(dir, "model-00001-of-00002.safetensors"), shard, -1, 2);
    const char *index = "{\"metadata\": {\"total_size\": 4}, \"weight_map\": {"
                        "\"a.w\": \"model-00001-of-00002.safetensors\","
                        "\"b.w\": \"model-00002-of-00002.safetensors\"}}";
    write_bytes(path_in(dir, "model.safetensors.index.json"), index, strlen(index));
    expect_bad_checkpoint(dir, "missing shard", "model-00002-of-00002.safetensors", "'b.w'");

    make_dir("idx_absent", dir, sizeof dir);
    write_crafted(path_in(dir, "model-00001-of-00001.safetensors"), shard, -1, 2);
    index = "{\"weight_map\": {\"a.w\": \"model-00001-of-00001.safetensors\","
            "\"ghost.weight\": \"model-00001-of-00001.safetensors\"}}";
    write_bytes(path_in(dir, "model.safetensors.index.json"), index, strlen(index));
    expect_bad_checkpoint(dir, "tensor absent from shard", "'ghost.weight'",
                          "model-00001-of-00001.safetensors");

    make_dir("idx_badjson", dir, sizeof dir);
    write_bytes(path_in(dir, "model.safetensors.index.json"), "{\"weight_map\": ", 15);
    expect_bad_checkpoint(dir, "index not JSON", "model.safetensors.index.json", "not valid JSON");

    make_dir("idx_nomap", dir, sizeof dir);
    write_bytes(path_in(dir, "model.safetensors.index.json"), "{\"metadata\": {}}", 16);
    expect_bad_checkpoint(dir, "index without weight_map", "model.safetensors.index.json",
                          "weight_map");

    make_dir("idx_maptype", dir, sizeof dir);
    write_bytes(path_in(dir, "model.safetensors.index.json"), "{\"weight_map\": [1]}", 19);
    expect_bad_checkpoint(dir, "weight_map not object", "weight_map", "expected an object");

    make_dir("idx_value", dir, sizeof dir);
    index = "{\"weight_map\": {\"a.w\": 3}}";
    write_bytes(path_in(dir, "model.safetensors.index.json"), index, strlen(index));
    expect_bad_checkpoint(dir, "weight_map value not string", "'a.w'", "file name");

    make_dir("idx_escape", dir, sizeof dir);
    index = "{\"weight_map\": {\"a.w\": \"../x.safetensors\"}}";
    write_bytes(path_in(dir, "model.safetensors.index.json"), index, strlen(index));
    expect_bad_checkpoint(dir, "shard outside the directory", "'a.w'", "../x.safetensors");

    make_dir("idx_badshard", dir, sizeof dir);
    write_bytes(path_in(dir, "model-00001-of-00001.safetensors"), "\x01\x02", 2);
    index = "{\"weight_map\": {\"a.w\": \"model-00001-of-00001.safetensors\"}}";
    write_bytes(path_in(dir, "model.safetensors.index.json"), index, strlen(index));
    expect_bad_checkpoint(dir, "corrupt shard", "model-00001-of-00001.safetensors",
                          "shorter than the 8-byte header length");

    make_dir("empty_dir", dir, sizeof dir);
    expect_bad_checkpoint(dir, "empty directory", "empty_dir", "model.safetensors");

    make_dir("bad_single", dir, sizeof dir);
    write_bytes(path_in(dir, "model.safetensors"), "abc", 3);
    expect_bad_checkpoint(dir, "corrupt single file", "model.safetensors", "3 bytes");
}

/* ---- golden fixtures --------------------------------------------------------------- */

static void test_golden(const char *golden)
{
    DIR *d = opendir(golden);
    if (!d) {
        printf("test_safetensors: no fixtures at %s, golden checks skipped\n", golden);
        return;
    }
    int fixtures = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        char dir[1024];
        snprintf(dir, sizeof dir, "%s/%s", golden, e->d_name);
        struct stat sb;
        if (stat(dir, &sb) != 0 || !S_ISDIR(sb.st_mode)) continue;
        char probe[1100];
        snprintf(probe, sizeof probe, "%s/config.json", dir);
        if (access(probe, F_OK) != 0) continue;
        fixtures++;
        char err[2048];
        struct st_checkpoint *c = st_checkpoint_open(dir, err, sizeof err);
        CHECK(c != NULL, "fixture %s: %s", dir, err);
        if (!c) continue;
        CHECK(c->n_tensors > 0, "fixture %s: no tensors", dir);
        CHECK(st_find(c, "model.embed_tokens.weight") != NULL, "fixture %s: no embedding", dir);
        for (int i = 0; i < c->n_tensors; i++) {
            const struct st_tensor *t = &c->tensors[i];
            if (t->dtype != ST_F32 && t->dtype != ST_BF16 && t->dtype != ST_F16) continue;
            float *v = malloc((size_t)(t->numel ? t->numel : 1) * sizeof *v);
            int rc = st_read_f32(t, v, (size_t)t->numel, err, sizeof err);
            CHECK(rc == 0, "fixture %s: %s", dir, err);
            int finite = 1;
            for (int64_t k = 0; rc == 0 && k < t->numel; k++) finite &= isfinite(v[k]) != 0;
            CHECK(finite, "fixture %s: tensor %s has non-finite values", dir, t->name);
            free(v);
        }
        st_checkpoint_close(c);
        snprintf(probe, sizeof probe, "%s/expected.safetensors", dir);
        if (access(probe, F_OK) == 0) {
            struct st_file *f = st_open(probe, err, sizeof err);
            CHECK(f != NULL, "%s", err);
            st_close(f);
        }
    }
    closedir(d);
    printf("test_safetensors: %d golden fixtures opened from %s\n", fixtures, golden);
}

/* ---- the streaming writer ---------------------------------------------------------- */

static unsigned char *read_file_bytes(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *bytes = malloc(size > 0 ? (size_t)size : 1);
    *n = fread(bytes, 1, (size_t)size, f);
    fclose(f);
    return bytes;
}

static void test_stream(void)
{
    char err[1024];
    /* tensors declared out of name order, written in pieces, out of order */
    struct st_stream *s = st_stream_new();
    CHECK(st_stream_declare(s, "b", ST_F32, 1, (int64_t[]){2}, err, sizeof err) == 0, "%s", err);
    CHECK(st_stream_declare(s, "a", ST_BF16, 1, (int64_t[]){3}, err, sizeof err) == 0, "%s", err);
    char *path = path_in(tmpdir, "stream.safetensors");
    CHECK(st_stream_open_file(s, path, 1, err, sizeof err) == 0, "%s", err);
    const float b[2] = {1.0f, -2.0f}, a[3] = {1.0f, 0.5f, -3.0f};
    CHECK(st_stream_write(s, "b", 4, &b[1], 4, err, sizeof err) == 0, "%s", err);
    CHECK(st_stream_write_f32(s, "a", 0, a, 3, err, sizeof err) == 0, "%s", err);
    CHECK(st_stream_write(s, "b", 4, &b[0], 8, err, sizeof err) != 0 && contains(err, "outside"),
          "a range past the tensor: %s", err);
    CHECK(st_stream_write(s, "c", 0, &b[0], 4, err, sizeof err) != 0 && contains(err, "'c'"),
          "an unknown tensor: %s", err);
    CHECK(st_stream_write(s, "b", 0, &b[0], 4, err, sizeof err) == 0, "%s", err);
    CHECK(access(path, F_OK) != 0, "the file is there before the finish");
    CHECK(st_stream_finish(s, err, sizeof err) == 0, "%s", err);
    st_stream_free(s);
    /* the expected bytes: header (name order, padded with spaces to 8), then a's bf16
     * (1.0 = 0x3F80, 0.5 = 0x3F00, -3.0 = 0xC040) and b's f32, little-endian */
    const char *json = "{\"__metadata__\":{\"format\":\"pt\"},"
                       "\"a\":{\"dtype\":\"BF16\",\"shape\":[3],\"data_offsets\":[0,6]},"
                       "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[6,14]}}";
    size_t len = strlen(json), padded = (len + 7) / 8 * 8;
    unsigned char want[512];
    for (int i = 0; i < 8; i++) want[i] = (unsigned char)(padded >> (8 * i));
    memcpy(want + 8, json, len);
    memset(want + 8 + len, ' ', padded - len);
    const unsigned char data[14] = {0x80, 0x3F, 0x00, 0x3F, 0x40, 0xC0, 0x00,
                                    0x00, 0x80, 0x3F, 0x00, 0x00, 0x00, 0xC0};
    memcpy(want + 8 + padded, data, sizeof data);
    size_t n = 0;
    unsigned char *got = read_file_bytes(path, &n);
    CHECK(got && n == 8 + padded + sizeof data && memcmp(got, want, n) == 0,
          "stream file: %zu bytes, expected %zu, or different bytes", n, 8 + padded + sizeof data);
    free(got);
    CHECK(access(path_in(tmpdir, "stream.safetensors.tmp"), F_OK) != 0, "tmp file left behind");

    /* a tensor left unwritten: the finish fails naming it, and nothing is left */
    s = st_stream_new();
    st_stream_declare(s, "x", ST_F32, 1, (int64_t[]){2}, err, sizeof err);
    st_stream_declare(s, "y", ST_F32, 1, (int64_t[]){2}, err, sizeof err);
    path = path_in(tmpdir, "unfinished.safetensors");
    CHECK(st_stream_open_file(s, path, 1, err, sizeof err) == 0, "%s", err);
    CHECK(st_stream_write(s, "x", 0, b, 8, err, sizeof err) == 0, "%s", err);
    CHECK(st_stream_finish(s, err, sizeof err) != 0 && contains(err, "'y'") &&
              contains(err, "0 of its 8 bytes"),
          "unfinished stream: %s", err);
    st_stream_free(s);
    CHECK(access(path, F_OK) != 0 &&
              access(path_in(tmpdir, "unfinished.safetensors.tmp"), F_OK) != 0,
          "an unfinished stream left a file");

    /* a tensor converted in several pieces (more than a million values) and a sharded
     * directory: the values read back as the whole array converted at once */
    enum { BIG = 1500007 };
    float *values = malloc(BIG * sizeof *values);
    uint16_t *bf16 = malloc(BIG * sizeof *bf16);
    for (int i = 0; i < BIG; i++) values[i] = (float)(i % 1000) * 0.001f - 0.25f;
    st_f32_to_bf16_array(values, bf16, BIG);
    char dir[600];
    snprintf(dir, sizeof dir, "%s/streamed", tmpdir);
    mkdir(dir, 0755);
    s = st_stream_new();
    st_stream_declare(s, "big", ST_BF16, 2, (int64_t[]){BIG, 1}, err, sizeof err);
    st_stream_declare(s, "small", ST_F32, 1, (int64_t[]){2}, err, sizeof err);
    CHECK(st_stream_open_checkpoint(s, dir, 1000, err, sizeof err) == 0, "%s", err);
    CHECK(st_stream_write_f32(s, "small", 0, b, 2, err, sizeof err) == 0, "%s", err);
    CHECK(st_stream_write_f32(s, "big", 0, values, BIG, err, sizeof err) == 0, "%s", err);
    CHECK(st_stream_finish(s, err, sizeof err) == 0, "%s", err);
    st_stream_free(s);
    struct st_checkpoint *c = st_checkpoint_open(dir, err, sizeof err);
    CHECK(c && c->n_files == 2, "streamed checkpoint: %s", err);
    const struct st_tensor *t = c ? st_find(c, "big") : NULL;
    CHECK(t && t->nbytes == BIG * 2 && memcmp(t->data, bf16, t->nbytes) == 0 &&
              contains(t->file, "model-00001-of-00002.safetensors"),
          "big tensor's bytes");
    if (c) st_checkpoint_close(c);
    free(values);
    free(bf16);
}

int main(int argc, char **argv)
{
    snprintf(tmpdir, sizeof tmpdir, "/tmp/esft-test-st-XXXXXX");
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        return 1;
    }
    test_bf16();
    test_f16();
    test_f8();
    test_round_trip();
    test_sharded();
    test_stream();
    test_malformed_files();
    test_malformed_index();

    char golden[1024];
    const char *srcdir = getenv("ESFT_TOP_SRCDIR");
    if (argc > 1)
        snprintf(golden, sizeof golden, "%s", argv[1]);
    else if (srcdir)
        snprintf(golden, sizeof golden, "%s/tests/golden", srcdir);
    else
        snprintf(golden, sizeof golden, "tests/golden");
    test_golden(golden);

    remove_tree(tmpdir);
    return check_done("test_safetensors");
}
