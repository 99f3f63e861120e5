/* One instance of the fused GEMM + top-2 kernel (included by fused_top2.c once per precision and instruction set).
 *
 * Defines (undefined again at the end, but for REAL and INDEX):
 *           KERNEL  the function's name     TARGET  its __attribute__((target)) string, or none
 *           REAL    float or double         INDEX   the signed integer of REAL's size (a lane's column)
 *           W       REALs per vector        R, C    rows and vectors of centroids held in registers at once
 *           MIN_, MAX_                      lane-wise (a < b ? a : b), (a > b ? a : b)
 *
 * For each row i of ``xa`` (b, n), whose last column is 1 (never read), it computes the n-term dot products in
 * REAL with the k columns of ``base`` (n, ldb; ldb >= k rounded up to W * C, the padding never read as a result)
 * in registers, each starting from the column's last entry, and keeps per vector
 * lane the smallest entry, its column and the second smallest: no tile is written. Returns per row the smallest
 * entry's column ``j1`` (ties: the lowest column) and the smallest of the other entries ``second`` (equal to the
 * smallest when it occurs twice), as numpy's ``argmin`` and ``min`` of the tile with j1's entry masked would for
 * finite entries (NaN entries are skipped, and a row with a non-finite term can make its padding NaN: callers
 * pass finite rows, kmeans_terms._fits keeps entries far from overflow). */

#define VF_ CAT_(vf_, KERNEL)
#define VI_ CAT_(vi_, KERNEL)
typedef REAL VF_ __attribute__((vector_size(sizeof(REAL) * W)));
typedef INDEX VI_ __attribute__((vector_size(sizeof(REAL) * W)));

TARGET static void CAT_(rows_, KERNEL)(const REAL *xa, int64_t r0, int rr, int64_t n, const REAL *base, int64_t k,
                                       int64_t ldb, VF_ pad[C], int64_t *j1, REAL *second) {
    VI_ lane;
    VF_ inf;
    for (int l = 0; l < W; l++) {
        lane[l] = l;
        inf[l] = INFINITY;
    }
    VF_ b1[R], b2[R];
    VI_ i1[R];
    const REAL *x[R];
    for (int r = 0; r < R; r++) {
        b1[r] = inf;
        b2[r] = inf;
        i1[r] = lane * 0;
        x[r] = xa + (r0 + (r < rr ? r : 0)) * n; /* a short block repeats its first row */
    }
    const int64_t last = (k - 1) / (W * C) * (W * C);
    for (int64_t j = 0; j < k; j += W * C) {
        VF_ acc[R][C];
        const REAL *col = base + j;
        for (int c = 0; c < C; c++) { /* xa's last term is 1: each sum starts from base's last row */
            VF_ y;
            __builtin_memcpy(&y, col + (n - 1) * ldb + c * W, sizeof(VF_));
            for (int r = 0; r < R; r++) acc[r][c] = y;
        }
#pragma GCC unroll 4
        for (int64_t q = 0; q < n - 1; q++) {
            VF_ y[C];
            for (int c = 0; c < C; c++) __builtin_memcpy(&y[c], col + q * ldb + c * W, sizeof(VF_));
            for (int r = 0; r < R; r++)
                for (int c = 0; c < C; c++) acc[r][c] += x[r][q] * y[c];
        }
        for (int c = 0; c < C; c++) {
            if (j == last)
                for (int r = 0; r < R; r++) acc[r][c] += pad[c];
            const VI_ index = lane + (INDEX)(j + c * W);
            for (int r = 0; r < R; r++) {
                const VF_ a = acc[r][c];
                /* second = min(second, max(first, a)); first = min(first, a) with its column (the first one) */
                const VI_ below = a < b1[r];
                b2[r] = MIN_(MAX_(a, b1[r]), b2[r]);
                b1[r] = MIN_(a, b1[r]);
                i1[r] = (below & index) | (~below & i1[r]);
            }
        }
    }
    for (int r = 0; r < rr; r++) {
        REAL best = INFINITY, next = INFINITY;
        INDEX at = k;
        int lane_at = -1;
        for (int l = 0; l < W; l++)
            if (b1[r][l] < best || (b1[r][l] == best && i1[r][l] < at)) {
                best = b1[r][l];
                at = i1[r][l];
                lane_at = l;
            }
        for (int l = 0; l < W; l++) {
            if (b2[r][l] < next) next = b2[r][l];
            if (l != lane_at && b1[r][l] < next) next = b1[r][l];
        }
        j1[r0 + r] = at;
        second[r0 + r] = next;
    }
}

TARGET static void KERNEL(const REAL *xa, int64_t b, int64_t n, const REAL *base, int64_t k, int64_t ldb,
                          int64_t *j1, REAL *second) {
    const int64_t last = (k - 1) / (W * C) * (W * C);
    VF_ pad[C];
    for (int c = 0; c < C; c++)
        for (int l = 0; l < W; l++) pad[c][l] = last + c * W + l < k ? 0 : INFINITY;
    int64_t r0 = 0;
    for (; r0 + R <= b; r0 += R) CAT_(rows_, KERNEL)(xa, r0, R, n, base, k, ldb, pad, j1, second);
    if (r0 < b) CAT_(rows_, KERNEL)(xa, r0, (int)(b - r0), n, base, k, ldb, pad, j1, second);
}

/* the next instance defines its own */
#undef VF_
#undef VI_
#undef KERNEL
#undef TARGET
#undef W
#undef R
#undef C
#undef MIN_
#undef MAX_
