// AVX-512 VNNI path: 16 columns per register, vpdpbusd per row, each 64-byte chunk unpacked once for
// every row of the pass. Compiled with -mavx512f -mavx512bw -mavx512vnni -mf16c; called only where the
// CPU reports them (dispatch.cpp).
#include <immintrin.h>

#include <cstring>

#include "q4.h"

namespace mirror_q4 {
namespace {

template <int R>
void column_block(const Weights& w, const Activations& a, float* y, int64_t cb) {
    const int64_t groups = w.k / w.group, chunks = w.group / kChunk;
    const uint8_t* codes = w.codes + cb * groups * chunks * 64;
    const uint16_t* scales = w.scales + cb * groups * kCols;
    const uint16_t* mins = w.mins + cb * groups * kCols;
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    __m512 out[R];
    for (int r = 0; r < R; ++r) out[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
        // At 1-2 rows, two sums per row (low and high nibbles), added at the group's end: one chain of
        // dependent vpdpbusd per row bounded such a call by the instruction's latency (more rows already
        // interleave their chains, and the extra registers and adds slowed 4 rows). Integer sums are
        // exact in any order, so the bits are the same either way.
        constexpr bool split = R <= 2;
        __m512i dot[R], dot_hi[R];
        for (int r = 0; r < R; ++r) dot[r] = dot_hi[r] = _mm512_setzero_si512();
        const uint8_t* c = codes + g * chunks * 64;
        const int64_t k0 = g * w.group;
        for (int64_t ch = 0; ch < chunks; ++ch) {
            const __m512i packed = _mm512_loadu_si512(c + ch * 64);
            const __m512i lo = _mm512_and_si512(packed, nibble);
            const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(packed, 4), nibble);
            for (int r = 0; r < R; ++r) {
                int32_t x0, x1;
                const int8_t* xr = a.codes + r * w.k + k0 + ch * kChunk;
                std::memcpy(&x0, xr, 4);
                std::memcpy(&x1, xr + 4, 4);
                dot[r] = _mm512_dpbusd_epi32(dot[r], lo, _mm512_set1_epi32(x0));
                if constexpr (split) {
                    dot_hi[r] = _mm512_dpbusd_epi32(dot_hi[r], hi, _mm512_set1_epi32(x1));
                } else {
                    dot[r] = _mm512_dpbusd_epi32(dot[r], hi, _mm512_set1_epi32(x1));
                }
            }
        }
        if constexpr (split) {
            for (int r = 0; r < R; ++r) dot[r] = _mm512_add_epi32(dot[r], dot_hi[r]);
        }
#ifdef MIRROR_Q4_BROKEN_SCALE   // a deliberately wrong build, for the test that the kernel's check catches one
        const __m512 s = _mm512_mul_ps(_mm512_set1_ps(1.25f),
                                       _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + g * kCols))));
#else
        const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + g * kCols)));
#endif
        const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(mins + g * kCols)));
        for (int r = 0; r < R; ++r) {
            const int64_t at = r * groups + g;
            const __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(dot[r]), _mm512_set1_ps(a.scale[at]));
            out[r] = _mm512_fmadd_ps(t, s, out[r]);
            out[r] = _mm512_fnmadd_ps(m, _mm512_set1_ps(a.offset[at]), out[r]);
        }
    }
    for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + r * w.n + cb * kCols, out[r]);
}

template <int R>
void columns(const Weights& w, const Activations& a, float* y, int64_t n0, int64_t n1) {
    for (int64_t cb = n0 / kCols; cb < n1 / kCols; ++cb) column_block<R>(w, a, y, cb);
}

}  // namespace

void matmul_avx512vnni(const Weights& w, const Activations& a, float* y, int64_t n0, int64_t n1) {
    with_rows(a.rows, [&](auto rows) { columns<decltype(rows)::value>(w, a, y, n0, n1); });
}

}  // namespace mirror_q4
