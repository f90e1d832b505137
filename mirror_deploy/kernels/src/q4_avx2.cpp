// AVX2 path (any x86-64 since Haswell/Zen 1): each 64-byte chunk is read as two halves of 8 columns;
// u8 x s8 products by vpmaddubsw (at most 4 x 15 x 127 before widening: never saturates) and widened by
// vpmaddwd, so the integer dot equals vpdpbusd's; the float steps are AVX-512's, so are the bits.
// Compiled with -mavx2 -mfma -mf16c.
#include <immintrin.h>

#include <cstring>

#include "q4.h"

namespace mirror_q4 {
namespace {

template <int R>
void half_block(const Weights& w, const Activations& a, float* y, int64_t cb, int half) {
    const int64_t groups = w.k / w.group, chunks = w.group / kChunk;
    const uint8_t* codes = w.codes + cb * groups * chunks * 64 + half * 32;
    const uint16_t* scales = w.scales + cb * groups * kCols + half * 8;
    const uint16_t* mins = w.mins + cb * groups * kCols + half * 8;
    const __m256i nibble = _mm256_set1_epi8(0x0F);
    const __m256i ones = _mm256_set1_epi16(1);
    __m256 out[R];
    for (int r = 0; r < R; ++r) out[r] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
        __m256i dot[R];
        for (int r = 0; r < R; ++r) dot[r] = _mm256_setzero_si256();
        const uint8_t* c = codes + g * chunks * 64;
        const int64_t k0 = g * w.group;
        for (int64_t ch = 0; ch < chunks; ++ch) {
            const __m256i packed = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(c + ch * 64));
            const __m256i lo = _mm256_and_si256(packed, nibble);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(packed, 4), nibble);
            for (int r = 0; r < R; ++r) {
                int32_t x0, x1;
                const int8_t* xr = a.codes + r * w.k + k0 + ch * kChunk;
                std::memcpy(&x0, xr, 4);
                std::memcpy(&x1, xr + 4, 4);
                const __m256i pairs = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(x0)),
                                                       _mm256_maddubs_epi16(hi, _mm256_set1_epi32(x1)));
                dot[r] = _mm256_add_epi32(dot[r], _mm256_madd_epi16(pairs, ones));
            }
        }
#ifdef MIRROR_Q4_BROKEN_SCALE
        const __m256 s = _mm256_mul_ps(_mm256_set1_ps(1.25f),
                                       _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + g * kCols))));
#else
        const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + g * kCols)));
#endif
        const __m256 m = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(mins + g * kCols)));
        for (int r = 0; r < R; ++r) {
            const int64_t at = r * groups + g;
            const __m256 t = _mm256_mul_ps(_mm256_cvtepi32_ps(dot[r]), _mm256_set1_ps(a.scale[at]));
            out[r] = _mm256_fmadd_ps(t, s, out[r]);
            out[r] = _mm256_fnmadd_ps(m, _mm256_set1_ps(a.offset[at]), out[r]);
        }
    }
    for (int r = 0; r < R; ++r) _mm256_storeu_ps(y + r * w.n + cb * kCols + half * 8, out[r]);
}

template <int R>
void columns(const Weights& w, const Activations& a, float* y, int64_t n0, int64_t n1) {
    for (int64_t cb = n0 / kCols; cb < n1 / kCols; ++cb) {
        half_block<R>(w, a, y, cb, 0);
        half_block<R>(w, a, y, cb, 1);
    }
}

}  // namespace

void matmul_avx2(const Weights& w, const Activations& a, float* y, int64_t n0, int64_t n1) {
    with_rows(a.rows, [&](auto rows) { columns<decltype(rows)::value>(w, a, y, n0, n1); });
}

}  // namespace mirror_q4
