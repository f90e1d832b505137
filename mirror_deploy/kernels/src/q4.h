// mirror-deploy's 4-bit matrix kernel: int4 weights x int8 dynamic activations, exact by construction.
//
// Weights W[N, K] are 4-bit codes q in 0..15 with a scale s and a minimum m per group of G inputs of a
// column: w = s * q - m (symmetric int4 has m = 8 s; a GGUF Q4_0 block is the same with its d).
// Layout (`codes`): column blocks of 16, then groups, then chunks of 8 inputs; one chunk is 64 bytes, byte
// 4 j + i holding column j's input 8 c + i in its low nibble and input 8 c + 4 + i in its high nibble, so
// one AND / one shift give the u8 operands of vpdpbusd for 16 columns x 4 inputs. `scales` and `mins` are
// fp16, [N / 16][K / G][16].
//
// Activations: each row is quantized to int8 per group of G by its own absolute maximum (a = amax / 127),
// with the group's sum of codes kept to fold the minimum in. Per row, per 16 columns:
//     y += s * (float(dot(q, xq)) * a) - m * (a * sum(xq))
// in that order, group after group. A row's instructions depend on nothing but that row, whatever the
// number of rows in the call or the thread that runs its columns: a row gets the same bits in a window as
// alone (what keeps speculative output equal to autoregressive output), and both ISA paths compute the
// same bits (the integer dot is exact; the float steps are the same IEEE operations).
#pragma once
#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace mirror_q4 {

constexpr int kCols = 16;      // columns per block (one 512-bit register of int32 sums)
constexpr int kChunk = 8;      // inputs per 64-byte chunk
constexpr int kMaxRows = 8;    // rows computed together; more rows run in passes of 8

struct Weights {
    const uint8_t* codes;     // [N/16][K/G][G/8][64]
    const uint16_t* scales;   // fp16 [N/16][K/G][16]
    const uint16_t* mins;     // fp16 [N/16][K/G][16]
    int64_t n, k, group;
};

struct Activations {          // one pass of up to kMaxRows rows
    const int8_t* codes;      // [rows][K]
    const float* scale;       // [rows][K/G]: a
    const float* offset;      // [rows][K/G]: a * sum of the group's codes
    int rows;
};

// Calls run(std::integral_constant<int, R>) with R = rows (1..kMaxRows): each row count gets its own
// unrolled instantiation of an ISA file's column loop.
template <typename Run>
void with_rows(int rows, Run run) {
    switch (rows) {
        case 1: return run(std::integral_constant<int, 1>{});
        case 2: return run(std::integral_constant<int, 2>{});
        case 3: return run(std::integral_constant<int, 3>{});
        case 4: return run(std::integral_constant<int, 4>{});
        case 5: return run(std::integral_constant<int, 5>{});
        case 6: return run(std::integral_constant<int, 6>{});
        case 7: return run(std::integral_constant<int, 7>{});
        default: return run(std::integral_constant<int, kMaxRows>{});
    }
}

// Quantize `rows` rows of x[rows][k] (row stride k) into `out` (same shape), `scale` and `offset`.
void quantize_rows(const float* x, int64_t rows, int64_t k, int64_t group, int8_t* out, float* scale,
                   float* offset);

// y[r][n0:n1] for the pass's rows (row stride n); n0, n1 multiples of 16.
void matmul_avx512vnni(const Weights& w, const Activations& a, float* y, int64_t n0, int64_t n1);
void matmul_avx2(const Weights& w, const Activations& a, float* y, int64_t n0, int64_t n1);

}  // namespace mirror_q4
