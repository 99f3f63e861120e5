/* Fused float32 GEMM + top-2 for k-means' CPU search (built by setup.py, loaded by pipeline.geometry.kmeans_fused
 * with ctypes; without a C compiler the search runs numpy's GEMM instead).
 *
 * ``fused_top2(xa, b, n, base, k, ldb, j1, second)``: per row of xa (b, n) float32, the column of the smallest
 * of its k dot products with the columns of base (n, ldb) float32 and the smallest of the others, computed in
 * registers (see fused_top2_kernel.h). Each dot product is n float32 multiply-adds (fused or not), so the error
 * bound of pipeline.geometry.kmeans_assign, which holds for any summation order, covers it. One instance per
 * instruction set, picked at run time: AVX-512 (16 floats a vector), AVX2 + FMA (8), and portable C (4). */

#include <math.h>
#include <stdint.h>

#define CAT2_(a, b) a##b
#define CAT_(a, b) CAT2_(a, b)

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define X86_ 1
#define KERNEL top2_avx512
#define TARGET __attribute__((target("avx512f,avx2,fma")))
#define W 16
#define R 6
#define C 2
#include "fused_top2_kernel.h"
#undef KERNEL
#undef TARGET
#undef W
#undef R
#undef C

#define KERNEL top2_avx2
#define TARGET __attribute__((target("avx2,fma")))
#define W 8
#define R 3
#define C 2
#include "fused_top2_kernel.h"
#undef KERNEL
#undef TARGET
#undef W
#undef R
#undef C
#endif

#define KERNEL top2_portable
#define TARGET
#define W 4
#define R 3
#define C 2
#include "fused_top2_kernel.h"
#undef KERNEL
#undef TARGET
#undef W
#undef R
#undef C

/* The widest instance this CPU runs: 512, 256 or 128 (bits a vector). */
int fused_top2_width(void) {
#ifdef X86_
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return 512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 256;
#endif
    return 128;
}

/* ``width``: the instance to run (fused_top2_width() or less: 128 always runs); ldb: k rounded up to a multiple of
 * 32 (every instance reads whole blocks of W * C columns, the columns past k never counted). */
void fused_top2(int width, const float *xa, int64_t b, int64_t n, const float *base, int64_t k, int64_t ldb,
                int64_t *j1, float *second) {
#ifdef X86_
    if (width >= 512) {
        top2_avx512(xa, b, n, base, k, ldb, j1, second);
        return;
    }
    if (width >= 256) {
        top2_avx2(xa, b, n, base, k, ldb, j1, second);
        return;
    }
#endif
    top2_portable(xa, b, n, base, k, ldb, j1, second);
}
