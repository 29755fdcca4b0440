/* densemixer: DenseMixer's dense pass (see densemixer.h). */
#include "densemixer.h"

#include <stdlib.h>

#include "comm.h"
#include "log.h"

/* For each local expert j: column j of out (rows of out_ld floats) = <g[r], E_j(x[r])>
 * over x, g [rows, H]. */
static void local_dots(const struct model *m, const struct backend *ops,
                       struct forward_workspace *ws, int l, const float *x, const float *g,
                       int rows, float *out, int out_ld)
{
    const struct model_config *c = &m->cfg;
    const struct layer_weights *w = &m->layers[l];
    int H = c->hidden_size, I = c->expert_intermediate_size;
    for (int j = 0; j < m->n_local_experts; j++) {
        ops->linear(ws->dense_gate, x, w->expert_gate[j], NULL, rows, H, I, false);
        ops->linear(ws->dense_up, x, w->expert_up[j], NULL, rows, H, I, false);
        ops->glu(ws->dense_act, ws->dense_gate, ws->dense_up, (size_t)rows * I, c->hidden_act);
        ops->linear(ws->dense_out, ws->dense_act, w->expert_down[j], NULL, rows, I, H, false);
        ops->row_dots(out + j, out_ld, g, ws->dense_out, rows, H);
    }
}

/* All-to-all over the EP group in floats, on host memory or (staged) through the
 * workspace's host copies: send_total and recv_total the floats sent and received. */
static void exchange(const struct model *m, struct forward_workspace *ws, const float *send,
                     size_t send_total, float *recv, size_t recv_total)
{
    int ep = m->grid.ep;
    size_t *sc = ws->ep_counts, *rc = sc + ep, *so = ws->ep_offsets, *ro = so + ep;
    if (!ws->staged) {
        comm_alltoallv(m->ep_comm, send, sc, so, recv, rc, ro, COMM_F32, COMM_HOST);
        return;
    }
    if (send_total) ws->mem->download(ws->h_dense_send, send, send_total * sizeof(float));
    comm_alltoallv(m->ep_comm, ws->h_dense_send, sc, so, ws->h_dense_recv, rc, ro, COMM_F32,
                   COMM_HOST);
    if (recv_total) ws->mem->upload(recv, ws->h_dense_recv, recv_total * sizeof(float));
}

/* Every EP rank's rows [n_d, width] of src, in rank order, into dst [sum n_d, width]. */
static void gather_all(const struct model *m, struct forward_workspace *ws, const float *src,
                       int N, const int *n_of, int width, float *dst)
{
    int ep = m->grid.ep;
    size_t *sc = ws->ep_counts, *rc = sc + ep, *so = ws->ep_offsets, *ro = so + ep, at = 0;
    for (int d = 0; d < ep; d++) {
        sc[d] = (size_t)N * width, so[d] = 0;
        rc[d] = (size_t)n_of[d] * width, ro[d] = at;
        at += rc[d];
    }
    exchange(m, ws, src, (size_t)N * width, dst, at);
}

void densemixer_dots(const struct model *m, const struct backend *ops,
                     struct forward_workspace *ws, const struct layer_activations *a,
                     const float *dy, int N, int l)
{
    const struct model_config *c = &m->cfg;
    int H = c->hidden_size, E = c->num_experts, ep = m->grid.ep, L = m->n_local_experts;
    if (ep == 1) {
        local_dots(m, ops, ws, l, a->hn, dy, N, ws->dense_dots, E);
        return;
    }
    /* every rank's tokens here: how many each has, then their inputs and gradients */
    int *n_of = ws->dense_tokens;
    for (int d = 0; d < ep; d++) n_of[d] = 0;
    n_of[m->me.ep_rank] = N;
    comm_allreduce(m->ep_comm, n_of, (size_t)ep, COMM_I32, COMM_SUM, COMM_HOST);
    int rows = 0;
    for (int d = 0; d < ep; d++) rows += n_of[d];
    gather_all(m, ws, a->hn, N, n_of, H, ws->dense_x);
    gather_all(m, ws, dy, N, n_of, H, ws->dense_g);
    /* this rank's experts on all of them: [rows, L] */
    local_dots(m, ops, ws, l, ws->dense_x, ws->dense_g, rows, ws->dense_local, L);
    /* rank d's rows go back to it; from rank q come this rank's rows for q's experts */
    size_t *sc = ws->ep_counts, *rc = sc + ep, *so = ws->ep_offsets, *ro = so + ep, at = 0;
    for (int d = 0; d < ep; d++) {
        sc[d] = (size_t)n_of[d] * L, so[d] = at;
        at += sc[d];
        rc[d] = (size_t)N * L, ro[d] = (size_t)d * N * L;
    }
    exchange(m, ws, ws->dense_local, at, ws->dense_recv, (size_t)ep * N * L);
    for (int q = 0; q < ep && N > 0; q++) /* q's experts are [q L, (q + 1) L) */
        ops->copy_columns(ws->dense_dots + (size_t)q * L, E, ws->dense_recv + (size_t)q * N * L, L,
                          N, L, false);
}
