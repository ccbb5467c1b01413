/* This CPU's AVX-512 FMA peak: 12 independent FMA chains per thread, registers only.
 *   gcc -O2 -mavx512f -fopenmp benchmarks/micro/fma_peak.c -o /tmp/fma_peak && /tmp/fma_peak
 *   OMP_NUM_THREADS=1 /tmp/fma_peak                                  # one core
 * Prints GFLOP/s (2 per FMA lane) for three repetitions. */
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>

int main(void) {
  const long iters = 50000000;
  for (int rep = 0; rep < 3; rep++) {
    double t0 = omp_get_wtime();
    float sink = 0;
#pragma omp parallel reduction(+ : sink)
    {
      __m512 a[12];
      const __m512 b = _mm512_set1_ps(1.0000001f), c = _mm512_set1_ps(1e-7f);
      for (int i = 0; i < 12; i++) a[i] = _mm512_set1_ps((float)i);
      for (long it = 0; it < iters; it++)
#pragma GCC unroll 12
        for (int i = 0; i < 12; i++) a[i] = _mm512_fmadd_ps(a[i], b, c);
      __m512 s = a[0];
      for (int i = 1; i < 12; i++) s = _mm512_add_ps(s, a[i]);
      sink += _mm512_reduce_add_ps(s);
    }
    double t = omp_get_wtime() - t0;
    printf("threads %d: %.1f GFLOP/s (checksum %g)\n", omp_get_max_threads(),
           (double)iters * 12 * 16 * 2 * omp_get_max_threads() / t / 1e9, sink);
  }
  return 0;
}
