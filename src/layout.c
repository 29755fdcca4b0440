/* layout: the rank grid world = pp * dp * ep (see layout.h and DESIGN.md, "Process
 * layout"). The arithmetic (grid checks, coordinates, which rank holds which layers and
 * experts) is pure so that tests and the select phase can use it without MPI;
 * layout_create turns a grid into the four group communicators main passes down. */
#include "layout.h"

#include <stdarg.h>
#include <string.h>

#include "log.h"

/* Appends to a one-line message; once it is full, further text is dropped. */
static void append(char *err, size_t err_size, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void append(char *err, size_t err_size, const char *fmt, ...)
{
    size_t used = strlen(err);
    if (used + 1 >= err_size) return;
    va_list args;
    va_start(args, fmt);
    vsnprintf(err + used, err_size - used, fmt, args);
    va_end(args);
}

static int model_layers(const struct layout_model *model)
{
    return model ? model->num_layers : 0;
}
static int model_experts(const struct layout_model *model)
{
    return model ? model->num_experts : 0;
}

/* Whether (pp, ep) fits the model, ignoring the world size. */
static int fits_model(int pp, int ep, const struct layout_model *model)
{
    int layers = model_layers(model), experts = model_experts(model);
    if (layers > 0 && pp > layers) return 0;
    if (experts > 0 && experts % ep != 0) return 0;
    return 1;
}

/* The (pp, ep) pairs that divide world and fit the model, as "(1,1) (1,2) ...". Long
 * lists are cut: the point is to show the user the shape of the valid choices. */
static void append_valid_pairs(char *err, size_t err_size, int world,
                               const struct layout_model *model)
{
    const int shown_max = 12;
    int shown = 0, more = 0;
    for (int pp = 1; pp <= world; pp++) {
        if (world % pp) continue;
        for (int ep = 1; ep <= world / pp; ep++) {
            if ((world / pp) % ep || !fits_model(pp, ep, model)) continue;
            if (shown < shown_max)
                append(err, err_size, "%s(%d,%d)", shown ? " " : "", pp, ep);
            else
                more++;
            shown++;
        }
    }
    if (more) append(err, err_size, " and %d more", more);
    if (shown == 0) append(err, err_size, "none");
}

int layout_grid_make(int world, int pp, int ep, const struct layout_model *model,
                     struct layout_grid *grid, char *err, size_t err_size)
{
    if (err_size > 0) err[0] = '\0';
    if (pp < 1) {
        append(err, err_size, "pp must be at least 1 (got %d)", pp);
        return -1;
    }
    if (ep < 1) {
        append(err, err_size, "ep must be at least 1 (got %d)", ep);
        return -1;
    }
    if (world < 1) {
        append(err, err_size, "the world must have at least 1 rank (got %d)", world);
        return -1;
    }
    long long per_slot = (long long)pp * ep; /* long long: pp * ep may exceed int */
    if (per_slot > world || world % per_slot != 0) {
        append(err, err_size,
               "world size %d is not divisible by pp x ep = %d x %d = %lld; valid (pp,ep) for "
               "%d ranks: ",
               world, pp, ep, per_slot, world);
        append_valid_pairs(err, err_size, world, model);
        if (per_slot <= world)
            append(err, err_size, "; or keep (%d,%d) and run on %lld or %lld ranks", pp, ep,
                   world / per_slot * per_slot, (world / per_slot + 1) * per_slot);
        else
            append(err, err_size, "; or keep (%d,%d) and run on a multiple of %lld ranks", pp, ep,
                   per_slot);
        return -1;
    }
    int layers = model_layers(model), experts = model_experts(model);
    if (layers > 0 && pp > layers) {
        append(err, err_size,
               "pp (%d) is larger than the model's %d decoder layers: every stage needs at "
               "least one layer; use pp <= %d",
               pp, layers, layers);
        return -1;
    }
    if (experts > 0 && experts % ep != 0) {
        append(err, err_size,
               "num_experts (%d) is not divisible by ep (%d): every EP rank holds an equal "
               "block of experts; ep values that divide %d and fit %d ranks with pp %d:",
               experts, ep, experts, world, pp);
        for (int e = 1; e <= world / pp; e++)
            if (experts % e == 0 && (world / pp) % e == 0) append(err, err_size, " %d", e);
        return -1;
    }
    memset(grid, 0, sizeof *grid);
    grid->world = world;
    grid->pp = pp;
    grid->ep = ep;
    grid->dp = (int)(world / per_slot);
    return 0;
}

struct layout_coords layout_coords_of(const struct layout_grid *grid, int world_rank)
{
    if (world_rank < 0 || world_rank >= grid->world)
        fatal(EXIT_RUNTIME, "layout_coords_of: rank %d outside a world of %d (programming error)",
              world_rank, grid->world);
    struct layout_coords coords;
    coords.ep_rank = world_rank % grid->ep;
    coords.dp_rank = (world_rank / grid->ep) % grid->dp;
    coords.pp_rank = world_rank / (grid->ep * grid->dp);
    return coords;
}

int layout_rank_of(const struct layout_grid *grid, struct layout_coords coords)
{
    if (coords.pp_rank < 0 || coords.pp_rank >= grid->pp || coords.dp_rank < 0 ||
        coords.dp_rank >= grid->dp || coords.ep_rank < 0 || coords.ep_rank >= grid->ep)
        fatal(EXIT_RUNTIME,
              "layout_rank_of: coordinates (pp %d, dp %d, ep %d) outside the grid pp %d x dp "
              "%d x ep %d (programming error)",
              coords.pp_rank, coords.dp_rank, coords.ep_rank, grid->pp, grid->dp, grid->ep);
    return (coords.pp_rank * grid->dp + coords.dp_rank) * grid->ep + coords.ep_rank;
}

void layout_experts_of(int num_experts, int ep, int ep_rank, int *first, int *count)
{
    /* layout_grid_make has told the user about a bad ep; here it is a caller's bug. */
    if (ep < 1 || ep_rank < 0 || ep_rank >= ep || num_experts < 0 || num_experts % ep != 0)
        fatal(EXIT_RUNTIME, "layout_experts_of: %d experts over ep %d, rank %d (programming error)",
              num_experts, ep, ep_rank);
    *count = num_experts / ep;
    *first = ep_rank * *count;
}

int layout_expert_owner(int num_experts, int ep, int expert)
{
    if (ep < 1 || num_experts < 1 || num_experts % ep != 0 || expert < 0 || expert >= num_experts)
        fatal(EXIT_RUNTIME, "layout_expert_owner: expert %d of %d over ep %d (programming error)",
              expert, num_experts, ep);
    return expert / (num_experts / ep);
}

/* Splits layout->world into one group: ranks with the same color, ordered by key. */
static void split(const struct layout *layout, int color, int key, struct comm *group)
{
    MPI_Comm mpi;
    check_mpi(MPI_Comm_split(layout->world.mpi, color, key, &mpi));
    comm_init(group, mpi);
}

void layout_create(struct layout *layout, const struct layout_grid *grid)
{
    memset(layout, 0, sizeof *layout);
    layout->grid = *grid;
    MPI_Comm world;
    check_mpi(MPI_Comm_dup(MPI_COMM_WORLD, &world));
    comm_init(&layout->world, world);
    if (layout->world.size != grid->world)
        fatal(EXIT_RUNTIME, "layout_create: grid for %d ranks in a world of %d (programming error)",
              grid->world, layout->world.size);
    layout->world_rank = layout->world.rank;
    struct layout_coords me = layout_coords_of(grid, layout->world_rank);
    layout->me = me;
    /* Colors name the group, keys order ranks inside it by the coordinate that varies. */
    split(layout, me.pp_rank, layout->world_rank, &layout->stage);
    split(layout, me.pp_rank * grid->dp + me.dp_rank, me.ep_rank, &layout->ep);
    split(layout, me.pp_rank * grid->ep + me.ep_rank, me.dp_rank, &layout->edp);
    split(layout, me.dp_rank * grid->ep + me.ep_rank, me.pp_rank, &layout->pp);
}

void layout_destroy(struct layout *layout)
{
    comm_free(&layout->pp);
    comm_free(&layout->edp);
    comm_free(&layout->ep);
    comm_free(&layout->stage);
    comm_free(&layout->world);
}

/* "first-last", "first" for one, "-" for none or unknown. */
static void format_range(char *out, size_t size, int first, int count)
{
    if (count <= 0)
        snprintf(out, size, "-");
    else if (count == 1)
        snprintf(out, size, "%d", first);
    else
        snprintf(out, size, "%d-%d", first, first + count - 1);
}

void layout_print(FILE *out, const struct layout_grid *grid, const struct layout_model *model)
{
    int layers = model_layers(model), experts = model_experts(model);
    fprintf(out, "layout: world %d = pp %d x dp %d x ep %d\n", grid->world, grid->pp, grid->dp,
            grid->ep);
    fprintf(out, "  %5s %5s %4s %4s  %-9s %s\n", "rank", "stage", "dp", "ep", "layers", "experts");
    for (int rank = 0; rank < grid->world; rank++) {
        struct layout_coords c = layout_coords_of(grid, rank);
        char layer_text[32] = "-", expert_text[32] = "-";
        if (layers > 0) {
            int first = -1, count = 0;
            if (model->stage_first) {
                first = model->stage_first[c.pp_rank];
                count = model->stage_first[c.pp_rank + 1] - first;
            } else if (grid->stage_layers[0] > 0) {
                first = 0;
                for (int s = 0; s < c.pp_rank; s++) first += grid->stage_layers[s];
                count = grid->stage_layers[c.pp_rank];
            } else if (grid->pp == 1) {
                first = 0, count = layers;
            }
            if (first >= 0) format_range(layer_text, sizeof layer_text, first, count);
            else snprintf(layer_text, sizeof layer_text, "by cost");
        }
        if (experts > 0 && experts % grid->ep == 0) {
            int first, count;
            layout_experts_of(experts, grid->ep, c.ep_rank, &first, &count);
            format_range(expert_text, sizeof expert_text, first, count);
        }
        fprintf(out, "  %5d %5d %4d %4d  %-9s %s\n", rank, c.pp_rank, c.dp_rank, c.ep_rank,
                layer_text, expert_text);
    }
}
