/* test_moe_math: the CUDA MoE kernels' index arithmetic (kernels/moe_math.h), run on the
 * host. The device permutation's three passes, replayed tile by tile exactly as the
 * kernels do them, give the CPU backend's expert_offsets, slot_of_row and row_of_slot
 * bit for bit, for tile sizes 1, 7, 256 and larger than M, on random routings (skewed,
 * some experts empty) and on M = 0; the launch sizes cover their work with no spare
 * block. Needs no GPU. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "check.h"
#include "log.h"
#include "moe_math.h"
#include "rng.h"

/* The three passes of moe_permute_by_expert with tiles of `tile` slots. */
static void device_permute(int32_t *offsets, int32_t *slot_of_row, int32_t *row_of_slot,
                           const int32_t *ids, int M, int E, int tile)
{
    int tiles = permute_tiles(M, tile);
    int *counts = xcalloc((size_t)(tiles ? tiles : 1) * E, sizeof *counts);
    int *start = xcalloc((size_t)(tiles ? tiles : 1) * E, sizeof *start);
    for (int t = 0; t < tiles; t++) { /* pass 1: each block counts its tile */
        int end = (t + 1) * tile < M ? (t + 1) * tile : M;
        permute_count_tile(counts + (size_t)t * E, ids, t * tile, end);
    }
    int run = 0; /* pass 2: the exclusive scan over experts, then each expert's runs */
    for (int e = 0; e < E; e++) {
        offsets[e] = run;
        run += permute_scan_expert(start, counts, tiles, E, e, run);
    }
    offsets[E] = run;
    for (int s = 0; s < M; s++) { /* pass 3: each slot its row */
        int row = permute_row_of(ids, start, E, tile, s);
        slot_of_row[row] = s;
        row_of_slot[s] = row;
    }
    free(counts);
    free(start);
}

static void check_permutation(int N, int K, int E, int skew, struct rng *rng)
{
    int M = N * K;
    int32_t *ids = xmalloc((size_t)(M ? M : 1) * sizeof *ids);
    for (int n = 0; n < N; n++) /* K distinct experts per token, skewed towards low ids */
        for (int k = 0; k < K; k++) {
            int e;
            bool again;
            do {
                /* skewed: 3 draws in 4 among the first K + 1 experts (others stay empty) */
                int pool = skew && rng_below(rng, 4) != 0 && K + 1 < E ? K + 1 : E;
                e = (int)rng_below(rng, (uint64_t)pool);
                again = false;
                for (int j = 0; j < k; j++) again |= ids[n * K + j] == e;
            } while (again);
            ids[n * K + k] = e;
        }
    size_t bytes = (size_t)(M ? M : 1) * sizeof(int32_t);
    int32_t *want_offsets = xmalloc((size_t)(E + 1) * sizeof(int32_t)), *want_sor = xmalloc(bytes),
            *want_ros = xmalloc(bytes);
    backend_cpu()->permute_by_expert(want_offsets, want_sor, want_ros, ids, N, K, E);
    int tiles[] = {1, 7, PERMUTE_TILE, M + 5};
    for (size_t i = 0; i < sizeof tiles / sizeof tiles[0]; i++) {
        int32_t *offsets = xmalloc((size_t)(E + 1) * sizeof(int32_t)), *sor = xmalloc(bytes),
                *ros = xmalloc(bytes);
        device_permute(offsets, sor, ros, ids, M, E, tiles[i]);
        CHECK(memcmp(offsets, want_offsets, (size_t)(E + 1) * sizeof(int32_t)) == 0 &&
                  memcmp(sor, want_sor, (size_t)M * sizeof(int32_t)) == 0 &&
                  memcmp(ros, want_ros, (size_t)M * sizeof(int32_t)) == 0,
              "N %d K %d E %d skew %d tile %d: not the CPU backend's permutation", N, K, E, skew,
              tiles[i]);
        free(offsets), free(sor), free(ros);
    }
    free(ids), free(want_offsets), free(want_sor), free(want_ros);
}

static void check_launch(void)
{
    size_t sizes[] = {1, 255, 256, 257, 1000003, (size_t)MAX_GRID_BLOCKS * 256 + 1, (size_t)1 << 40};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        size_t n = sizes[i];
        int blocks = launch_blocks(n, 256);
        bool covers = (size_t)blocks * 256 >= n, minimal = (size_t)(blocks - 1) * 256 < n;
        /* past the grid limit the kernels stride: the cap, and no more */
        if ((n + 255) / 256 > (size_t)MAX_GRID_BLOCKS)
            CHECK(blocks == MAX_GRID_BLOCKS, "n %zu: %d blocks, want the cap", n, blocks);
        else
            CHECK(covers && minimal, "n %zu: %d blocks of 256", n, blocks);
    }
    CHECK(launch_blocks(0, 256) == 1, "an empty launch still has a block");
    for (int R = 1; R <= 1000; R++) {
        int blocks = launch_warp_blocks(R, 256), per = warp_rows_per_block(256);
        CHECK(per == 8 && blocks * per >= R && (blocks - 1) * per < R, "R %d: %d blocks", R, blocks);
    }
    for (int E = 1; E <= ROUTER_MAX_EXPERTS; E++) {
        int per = router_per_lane(E);
        CHECK(per * WARP >= E && (per - 1) * WARP < E, "E %d: %d per lane", E, per);
    }
}

/* expert_of_row (the device grouped bias's lookup) against a walk of the offsets, with
 * empty experts first, inside and last. */
static void check_expert_of_row(struct rng *rng)
{
    enum { E = 9 };
    for (int trial = 0; trial < 50; trial++) {
        int32_t offsets[E + 1] = {0};
        for (int e = 0; e < E; e++)
            offsets[e + 1] = offsets[e] + (rng_below(rng, 3) == 0 ? 0 : (int)rng_below(rng, 5));
        for (int r = 0; r < offsets[E]; r++) {
            int want = 0;
            while (!(offsets[want] <= r && r < offsets[want + 1])) want++;
            CHECK(expert_of_row(offsets, E, r) == want, "trial %d row %d: expert %d, want %d",
                  trial, r, expert_of_row(offsets, E, r), want);
        }
    }
}

int main(void)
{
    struct rng rng;
    rng_seed(&rng, 20261123);
    int shapes[][3] = {{1, 1, 1}, {5, 2, 7}, {100, 2, 8}, {300, 8, 128}, {1000, 6, 64}, {17, 4, 4}};
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++)
        for (int skew = 0; skew < 2; skew++)
            check_permutation(shapes[i][0], shapes[i][1], shapes[i][2], skew, &rng);
    check_permutation(0, 2, 8, 0, &rng);
    check_launch();
    check_expert_of_row(&rng);
    return check_done("test_moe_math");
}
