/* test_layout: the layout arithmetic of src/layout.c, serial (one rank, no mpirun
 * needed): grid checks and their messages, the rank order of DESIGN.md against a table
 * worked by hand, expert and layer placement, and the printed table. MPI_Init only
 * because layout's programming-error path ends ranks through MPI. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "layout.h"
#include "log.h"

static void test_grid_good(void)
{
    struct {
        int world, pp, ep, layers, experts, dp;
    } cases[] = {
        {1, 1, 1, 0, 0, 1}, {8, 2, 2, 0, 0, 2},    {4, 1, 2, 12, 8, 2},  {6, 1, 3, 4, 6, 2},
        {8, 8, 1, 8, 0, 1}, {16, 2, 8, 24, 64, 1}, {12, 3, 2, 3, 60, 2}, {5, 1, 1, 1, 1, 5},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct layout_model model = {.num_layers = cases[i].layers, .num_experts = cases[i].experts};
        struct layout_grid grid = {.world = 0};
        char err[256];
        int rc = layout_grid_make(cases[i].world, cases[i].pp, cases[i].ep, &model, &grid, err,
                                  sizeof err);
        CHECK(rc == 0, "world %d pp %d ep %d: %s", cases[i].world, cases[i].pp, cases[i].ep, err);
        CHECK(grid.world == cases[i].world && grid.pp == cases[i].pp && grid.ep == cases[i].ep &&
                  grid.dp == cases[i].dp,
              "case %zu: got world %d pp %d dp %d ep %d", i, grid.world, grid.pp, grid.dp, grid.ep);
    }
    /* A NULL model is "unknown": only the world is checked. */
    struct layout_grid grid;
    char err[256];
    CHECK(layout_grid_make(6, 3, 2, NULL, &grid, err, sizeof err) == 0 && grid.dp == 1,
          "NULL model: %s", err);
}

/* The call fails and its one-line reason contains every expected fragment. */
static void expect_error(int world, int pp, int ep, int layers, int experts,
                         const char *const *fragments)
{
    struct layout_model model = {.num_layers = layers, .num_experts = experts};
    struct layout_grid grid;
    char err[512];
    int rc = layout_grid_make(world, pp, ep, &model, &grid, err, sizeof err);
    CHECK(rc == -1, "world %d pp %d ep %d layers %d experts %d accepted", world, pp, ep, layers,
          experts);
    CHECK(strchr(err, '\n') == NULL, "reason is not one line: %s", err);
    for (const char *const *f = fragments; *f; f++)
        CHECK(strstr(err, *f) != NULL, "reason lacks \"%s\": %s", *f, err);
}

static void test_grid_bad(void)
{
    /* 6 ranks, pp 2 x ep 2 = 4: the divisors of 6 give (pp,ep) pairs; 4 and 8 are the
     * multiples of 4 around 6. */
    expect_error(6, 2, 2, 0, 0,
                 (const char *const[]){"world size 6 is not divisible", "pp x ep = 2 x 2 = 4",
                                       "(1,1) (1,2) (1,3) (1,6)", "(2,3)", "(6,1)", "4 or 8 ranks",
                                       NULL});
    /* With a model of 2 layers and 4 experts, only pp <= 2 and ep dividing 4 are offered:
     * (1,1) (1,2) (2,1). */
    expect_error(6, 2, 2, 2, 4,
                 (const char *const[]){"valid (pp,ep) for 6 ranks: (1,1) (1,2) (2,1);", NULL});
    /* pp x ep larger than the world. */
    expect_error(4, 2, 4, 0, 0,
                 (const char *const[]){"pp x ep = 2 x 4 = 8", "a multiple of 8 ranks", NULL});
    expect_error(4, 0, 1, 0, 0, (const char *const[]){"pp must be at least 1 (got 0)", NULL});
    expect_error(4, 1, -2, 0, 0, (const char *const[]){"ep must be at least 1 (got -2)", NULL});
    expect_error(0, 1, 1, 0, 0, (const char *const[]){"at least 1 rank (got 0)", NULL});
    /* 6 experts over ep 4; ep values dividing both 6 experts and 4 ranks: 1 2. */
    expect_error(
        4, 1, 4, 0, 6,
        (const char *const[]){"num_experts (6) is not divisible by ep (4)", ": 1 2", NULL});
    expect_error(4, 4, 1, 2, 0,
                 (const char *const[]){"pp (4) is larger than the model's 2 decoder layers",
                                       "pp <= 2", NULL});
    /* pp * ep overflowing int must not be taken for a divisor. */
    expect_error(8, 1 << 20, 1 << 20, 0, 0, (const char *const[]){"a multiple of", NULL});

    /* A tiny buffer truncates the reason but stays a terminated string. */
    char tiny[8];
    struct layout_grid grid;
    CHECK(layout_grid_make(6, 2, 2, NULL, &grid, tiny, sizeof tiny) == -1 && strlen(tiny) == 7,
          "tiny buffer: \"%s\"", tiny);
}

static void test_round_trip(void)
{
    int shapes[][3] = {{1, 1, 1}, {2, 2, 2}, {1, 4, 1}, {3, 1, 2}, {2, 3, 2}, {4, 1, 4}, {2, 5, 3}};
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++) {
        struct layout_grid grid = {.world = shapes[s][0] * shapes[s][1] * shapes[s][2],
                                   .pp = shapes[s][0], .dp = shapes[s][1], .ep = shapes[s][2]};
        for (int rank = 0; rank < grid.world; rank++) {
            struct layout_coords c = layout_coords_of(&grid, rank);
            CHECK(c.pp_rank >= 0 && c.pp_rank < grid.pp && c.dp_rank >= 0 && c.dp_rank < grid.dp &&
                      c.ep_rank >= 0 && c.ep_rank < grid.ep,
                  "grid %zu rank %d: coords out of range", s, rank);
            CHECK(layout_rank_of(&grid, c) == rank, "grid %zu rank %d: round trip gives %d", s,
                  rank, layout_rank_of(&grid, c));
        }
    }
}

/* DESIGN.md: ep varies fastest, then dp, then pp. Worked by hand for (2,2,2). */
static void test_rank_table(void)
{
    static const int table[8][3] = {/* pp, dp, ep */
                                    {0, 0, 0}, {0, 0, 1}, {0, 1, 0}, {0, 1, 1},
                                    {1, 0, 0}, {1, 0, 1}, {1, 1, 0}, {1, 1, 1}};
    struct layout_grid grid = {.world = 8, .pp = 2, .dp = 2, .ep = 2};
    for (int rank = 0; rank < 8; rank++) {
        struct layout_coords c = layout_coords_of(&grid, rank);
        CHECK(c.pp_rank == table[rank][0] && c.dp_rank == table[rank][1] &&
                  c.ep_rank == table[rank][2],
              "rank %d: got (%d,%d,%d), want (%d,%d,%d)", rank, c.pp_rank, c.dp_rank, c.ep_rank,
              table[rank][0], table[rank][1], table[rank][2]);
        struct layout_coords want = {table[rank][0], table[rank][1], table[rank][2]};
        CHECK(layout_rank_of(&grid, want) == rank, "table row %d maps to rank %d", rank,
              layout_rank_of(&grid, want));
    }
}

static void test_experts(void)
{
    int expert_counts[] = {1, 2, 4, 6, 8, 16, 60, 64, 256};
    for (size_t k = 0; k < sizeof expert_counts / sizeof expert_counts[0]; k++) {
        int experts = expert_counts[k];
        for (int ep = 1; ep <= experts; ep++) {
            if (experts % ep) continue;
            int *owned = calloc((size_t)experts, sizeof *owned);
            for (int r = 0; r < ep; r++) {
                int first = -1, count = -1;
                layout_experts_of(experts, ep, r, &first, &count);
                CHECK(count == experts / ep && first == r * (experts / ep),
                      "E %d ep %d rank %d: [%d, +%d)", experts, ep, r, first, count);
                for (int e = first; e < first + count && e >= 0 && e < experts; e++) {
                    owned[e]++;
                    CHECK(layout_expert_owner(experts, ep, e) == r,
                          "E %d ep %d: owner(%d) = %d, experts_of says %d", experts, ep, e,
                          layout_expert_owner(experts, ep, e), r);
                }
            }
            for (int e = 0; e < experts; e++)
                CHECK(owned[e] == 1, "E %d ep %d: expert %d owned %d times", experts, ep, e,
                      owned[e]);
            free(owned);
        }
    }
    /* Hand-worked: 64 experts over ep 4, rank 2 holds 32..47. */
    int first, count;
    layout_experts_of(64, 4, 2, &first, &count);
    CHECK(first == 32 && count == 16, "64/4 rank 2: [%d, +%d)", first, count);
    CHECK(layout_expert_owner(64, 4, 47) == 2 && layout_expert_owner(64, 4, 48) == 3,
          "owners of 47 and 48");
}

static void test_print(void)
{
    char *text = NULL;
    size_t size = 0;
    FILE *out = open_memstream(&text, &size);
    struct layout_grid grid = {.world = 4, .pp = 1, .dp = 2, .ep = 2};
    struct layout_model model = {.num_layers = 12, .num_experts = 8};
    layout_print(out, &grid, &model);
    fclose(out);
    CHECK(strncmp(text, "layout: world 4 = pp 1 x dp 2 x ep 2\n", 37) == 0, "header: %s", text);
    /* Rank 3 = (pp 0, dp 1, ep 1): all 12 layers, experts 4-7. */
    CHECK(strstr(text, "      3     0    1    1  0-11      4-7\n") != NULL, "rank 3 row: %s", text);
    int lines = 0;
    for (const char *p = text; *p; p++) lines += *p == '\n';
    CHECK(lines == 2 + 4, "%d lines (header, column names, 4 ranks): %s", lines, text);
    free(text);

    /* Unknown model: dashes. */
    out = open_memstream(&text, &size);
    struct layout_grid grid2 = {.world = 8, .pp = 2, .dp = 2, .ep = 2};
    layout_print(out, &grid2, NULL);
    fclose(out);
    CHECK(strstr(text, "      5     1    0    1  -         -\n") != NULL, "unknown model: %s",
          text);
    free(text);
    layout_print(stdout, &grid2, &(struct layout_model){.num_layers = 7, .num_experts = 4});
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    log_init(0, 1);
    test_grid_good();
    test_grid_bad();
    test_round_trip();
    test_rank_table();
    test_experts();
    test_print();
    MPI_Finalize();
    return check_done("test_layout");
}
