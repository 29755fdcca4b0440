/* test_c2r: C2R's pure parts (c2r.h): the collaborative lists from co-activation counts
 * (order, ties, the expert itself never listed), the c2r_config.json round trip and its
 * refusals, and the greedy expert placement: equal groups, and on routing whose
 * co-activation is skewed (experts e and e + E/2 chosen together) fewer destination ranks
 * per token than the contiguous placement, counted independently here.
 * Usage: test_c2r (run from the build directory; writes under /tmp) */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "c2r.h"
#include "check.h"
#include "hfconfig.h"
#include "log.h"
#include "rng.h"

static void test_lists(void)
{
    /* 4 experts: expert 0 co-activates 3 > 1 = 2 (tie to the lower id: 1 first) */
    const uint64_t coact[16] = {0, 5, 5, 9, /**/ 5, 0, 1, 0, /**/ 5, 1, 0, 2, /**/ 9, 0, 2, 0};
    int32_t lists[4 * 3];
    c2r_layer_lists(coact, 4, 3, lists);
    const int32_t want[12] = {3, 1, 2, /**/ 0, 2, 3, /**/ 0, 3, 1, /**/ 0, 2, 1};
    for (int i = 0; i < 12; i++)
        CHECK(lists[i] == want[i], "list entry %d: %d, want %d", i, lists[i], want[i]);
    int32_t two[4 * 1];
    c2r_layer_lists(coact, 4, 1, two);
    CHECK(two[0] == 3 && two[1] == 0 && two[2] == 0 && two[3] == 0, "top_t 1");
}

static void write_text(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    CHECK(f != NULL, "%s", path);
    if (!f) return;
    fputs(text, f);
    fclose(f);
}

static void test_config(void)
{
    struct model_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.num_layers = 2, cfg.num_experts = 4, cfg.top_k = 2;
    cfg.is_moe[0] = false, cfg.is_moe[1] = true;
    const char *path = "/tmp/esft-test-c2r.json";
    struct c2r_lists lists;
    char err[1024];
    write_text(path, "{\"top_t\": 2, \"collaborative_list\": [[], [[1,2],[0,3],[3,0],[2,1]]]}");
    CHECK(c2r_read_config(path, &cfg, &lists, err, sizeof err) == 0, "%s", err);
    CHECK(lists.top_t == 2 && lists.collaborators[0] == -1 && lists.collaborators[8] == 1 &&
              lists.collaborators[15] == 1,
          "read lists");
    c2r_lists_free(&lists);
    struct {
        const char *text, *message;
    } bad[] = {
        {"{\"top_t\": 0, \"collaborative_list\": [[], [[],[],[],[]]]}", "top_t must be"},
        {"{\"top_t\": 4, \"collaborative_list\": [[], [[1,2],[0,3],[3,0],[2,1]]]}",
         "top_t must be"},
        {"{\"top_t\": 2, \"collaborative_list\": [[[1,2],[0,3],[3,0],[2,1]]]}", "2 entries"},
        {"{\"top_t\": 2, \"collaborative_list\": [[1], [[1,2],[0,3],[3,0],[2,1]]]}", "is dense"},
        {"{\"top_t\": 2, \"collaborative_list\": [[], [[1,2],[0,3],[3,0]]]}", "4 lists"},
        {"{\"top_t\": 2, \"collaborative_list\": [[], [[1,1],[0,3],[3,0],[2,1]]]}", "[1][0][1]"},
        {"{\"top_t\": 2, \"collaborative_list\": [[], [[1,2],[1,3],[3,0],[2,1]]]}", "not 1 itself"},
        {"{\"top_t\": 2, \"collaborative_list\": [[], [[1,2],[0,3],[3,4],[2,1]]]}", "in [0, 4)"},
        {"{\"top_t\": 2, \"collaborative_list\": [[], [[1,2],[0,3],[3,0],[2]]]}",
         "[1][3] must hold"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        write_text(path, bad[i].text);
        err[0] = '\0';
        CHECK(c2r_read_config(path, &cfg, &lists, err, sizeof err) != 0, "bad %zu accepted", i);
        CHECK(strstr(err, bad[i].message) != NULL, "bad %zu: '%s' lacks '%s'", i, err,
              bad[i].message);
    }
    unlink(path);
}

/* Distinct ranks of one token, counted with a bitmask (an independent count). */
static int ranks_of(const int32_t *ids, int K, const int32_t *rank_of)
{
    unsigned mask = 0;
    for (int k = 0; k < K; k++) mask |= 1u << rank_of[ids[k]];
    return __builtin_popcount(mask);
}

static void test_placement(void)
{
    enum { E = 16, K = 2, N = 4000, EP = 4 };
    int32_t contiguous[E], greedy[E];
    c2r_placement_contiguous(E, EP, contiguous);
    for (int e = 0; e < E; e++) CHECK(contiguous[e] == e / 4, "contiguous %d", e);
    /* skewed routing: a token picks a random expert e, and most often e + E/2 with it */
    struct rng rng;
    rng_seed(&rng, 7);
    int32_t *ids = xmalloc((size_t)N * K * sizeof *ids);
    uint64_t *coact = xcalloc((size_t)E * E, sizeof *coact);
    for (int n = 0; n < N; n++) {
        int a = (int)rng_below(&rng, E), b;
        if (rng_below(&rng, 10) < 8)
            b = (a + E / 2) % E;
        else
            do b = (int)rng_below(&rng, E);
            while (b == a);
        ids[n * K] = a, ids[n * K + 1] = b;
        coact[a * E + b]++, coact[b * E + a]++;
    }
    c2r_placement_greedy(coact, E, EP, greedy);
    int members[EP] = {0};
    for (int e = 0; e < E; e++) {
        CHECK(greedy[e] >= 0 && greedy[e] < EP, "expert %d on rank %d", e, greedy[e]);
        if (greedy[e] >= 0 && greedy[e] < EP) members[greedy[e]]++;
    }
    for (int r = 0; r < EP; r++)
        CHECK(members[r] == E / EP, "rank %d holds %d experts", r, members[r]);
    for (int e = 0; e < E / 2; e++)
        CHECK(greedy[e] == greedy[e + E / 2], "experts %d and %d apart", e, e + E / 2);
    uint64_t by_contiguous = 0, by_greedy = 0;
    for (int n = 0; n < N; n++) {
        by_contiguous += (uint64_t)ranks_of(ids + n * K, K, contiguous);
        by_greedy += (uint64_t)ranks_of(ids + n * K, K, greedy);
    }
    CHECK(c2r_destinations(ids, N, K, contiguous) == by_contiguous, "destinations (contiguous)");
    CHECK(c2r_destinations(ids, N, K, greedy) == by_greedy, "destinations (greedy)");
    CHECK(by_greedy < by_contiguous * 3 / 4, "greedy %llu destinations, contiguous %llu",
          (unsigned long long)by_greedy, (unsigned long long)by_contiguous);
    printf("skewed routing, %d tokens, top-%d of %d experts over ep %d: %llu destination ranks "
           "contiguous, %llu c2r\n",
           N, K, E, EP, (unsigned long long)by_contiguous, (unsigned long long)by_greedy);
    /* one expert per rank: nothing to group */
    int32_t single[4];
    c2r_placement_greedy(coact, 4, 4, single);
    for (int e = 0; e < 4; e++) CHECK(single[e] >= 0 && single[e] < 4, "E = ep");
    free(ids);
    free(coact);
}

int main(void)
{
    test_lists();
    test_config();
    test_placement();
    return check_done("test_c2r");
}
