// Activation quantization, shared by both ISA paths (so both see the same int8 codes).
#include <cmath>

#include "q4.h"

namespace mirror_q4 {

void quantize_rows(const float* x, int64_t rows, int64_t k, int64_t group, int8_t* out, float* scale,
                   float* offset) {
    const int64_t groups = k / group;
    for (int64_t r = 0; r < rows; ++r) {
        for (int64_t g = 0; g < groups; ++g) {
            const float* xs = x + r * k + g * group;
            int8_t* q = out + r * k + g * group;
            float amax = 0.f;
            for (int64_t i = 0; i < group; ++i) amax = std::fmax(amax, std::fabs(xs[i]));
            const float a = amax / 127.f;
            const float inv = amax > 0.f ? 127.f / amax : 0.f;
            int32_t sum = 0;
            for (int64_t i = 0; i < group; ++i) {
                const int32_t v = static_cast<int32_t>(std::nearbyint(xs[i] * inv));
                q[i] = static_cast<int8_t>(v > 127 ? 127 : (v < -127 ? -127 : v));
                sum += q[i];
            }
            scale[r * groups + g] = a;
            offset[r * groups + g] = a * static_cast<float>(sum);
        }
    }
}

}  // namespace mirror_q4
