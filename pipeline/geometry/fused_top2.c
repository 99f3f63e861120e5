/* Fused GEMM + top-2 for k-means' CPU search (built by setup.py, loaded by pipeline.geometry.kmeans_fused with
 * ctypes; without a C compiler the search runs numpy's GEMM instead).
 *
 * ``fused_top2_f32(width, xa, b, n, base, k, ldb, j1, second)`` (and ``_f64``): per row of xa (b, n), whose last
 * column is 1 (kmeans_terms' x''), the column of the smallest of its k dot products with the columns of base (n,
 * ldb) and the smallest of the others, computed in registers (see fused_top2_kernel.h). Each dot product is the
 * column's last entry (times 1: exact) plus n - 1 multiply-adds (fused or not) in the array's precision, an n-term
 * sum in one order, so the error bound of pipeline.geometry.kmeans_terms, which holds for any summation order,
 * covers it. One instance per precision and instruction set, picked by ``width``: AVX-512 (512-bit vectors),
 * AVX2 + FMA (256), portable C (128, any CPU; GCC or clang vector extensions). */

#include <math.h>
#include <stdint.h>

#define CAT2_(a, b) a##b
#define CAT_(a, b) CAT2_(a, b)

#if defined(__GNUC__) && defined(__x86_64__)
#define X86_ 1
#include <immintrin.h>
#endif

/* MIN_(a, b) = (a < b ? a : b) and MAX_(a, b) = (a > b ? a : b) lane by lane (b when either is NaN): x86's min and
 * max instructions, one operation each where a compare and a blend would be two; SEL_ is the portable form. */
#define SEL_(m, a, b) ((VF_)(((m) & (VI_)(a)) | (~(m) & (VI_)(b))))

/* float32: 16, 8 and 4 lanes; float64: 8, 4 and 2. R and C keep the accumulators and each row's lane state in
 * the instruction set's registers (32 zmm, 16 ymm). */
#define REAL float
#define INDEX int32_t
#ifdef X86_
#define KERNEL top2_f32_avx512
#define MIN_(a, b) ((VF_)_mm512_min_ps((a), (b)))
#define MAX_(a, b) ((VF_)_mm512_max_ps((a), (b)))
#define TARGET __attribute__((target("avx512f,avx2,fma")))
#define W 16
#define R 6
#define C 2
#include "fused_top2_kernel.h"
#define KERNEL top2_f32_avx2
#define MIN_(a, b) ((VF_)_mm256_min_ps((a), (b)))
#define MAX_(a, b) ((VF_)_mm256_max_ps((a), (b)))
#define TARGET __attribute__((target("avx2,fma")))
#define W 8
#define R 3
#define C 2
#include "fused_top2_kernel.h"
#endif
#define KERNEL top2_f32_portable
#define MIN_(a, b) SEL_((a) < (b), a, b)
#define MAX_(a, b) SEL_((a) > (b), a, b)
#define TARGET
#define W 4
#define R 3
#define C 2
#include "fused_top2_kernel.h"
#undef REAL
#undef INDEX

#define REAL double
#define INDEX int64_t
#ifdef X86_
#define KERNEL top2_f64_avx512
#define MIN_(a, b) ((VF_)_mm512_min_pd((a), (b)))
#define MAX_(a, b) ((VF_)_mm512_max_pd((a), (b)))
#define TARGET __attribute__((target("avx512f,avx2,fma")))
#define W 8
#define R 6
#define C 2
#include "fused_top2_kernel.h"
#define KERNEL top2_f64_avx2
#define MIN_(a, b) ((VF_)_mm256_min_pd((a), (b)))
#define MAX_(a, b) ((VF_)_mm256_max_pd((a), (b)))
#define TARGET __attribute__((target("avx2,fma")))
#define W 4
#define R 3
#define C 2
#include "fused_top2_kernel.h"
#endif
#define KERNEL top2_f64_portable
#define MIN_(a, b) SEL_((a) < (b), a, b)
#define MAX_(a, b) SEL_((a) > (b), a, b)
#define TARGET
#define W 2
#define R 3
#define C 2
#include "fused_top2_kernel.h"
#undef REAL
#undef INDEX

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
void fused_top2_f32(int width, const float *xa, int64_t b, int64_t n, const float *base, int64_t k, int64_t ldb,
                    int64_t *j1, float *second) {
#ifdef X86_
    if (width >= 512) {
        top2_f32_avx512(xa, b, n, base, k, ldb, j1, second);
        return;
    }
    if (width >= 256) {
        top2_f32_avx2(xa, b, n, base, k, ldb, j1, second);
        return;
    }
#endif
    top2_f32_portable(xa, b, n, base, k, ldb, j1, second);
}

void fused_top2_f64(int width, const double *xa, int64_t b, int64_t n, const double *base, int64_t k, int64_t ldb,
                    int64_t *j1, double *second) {
#ifdef X86_
    if (width >= 512) {
        top2_f64_avx512(xa, b, n, base, k, ldb, j1, second);
        return;
    }
    if (width >= 256) {
        top2_f64_avx2(xa, b, n, base, k, ldb, j1, second);
        return;
    }
#endif
    top2_f64_portable(xa, b, n, base, k, ldb, j1, second);
}

/* The first 16 hex digits of the sha256 of fused_top2.c and fused_top2_kernel.h this was built from (setup.py
 * defines it): pipeline.geometry.kmeans_fused refuses a build whose sources have changed since. */
#ifndef FUSED_TOP2_SOURCE
#define FUSED_TOP2_SOURCE "unknown"
#endif
const char *const fused_top2_source = FUSED_TOP2_SOURCE;
