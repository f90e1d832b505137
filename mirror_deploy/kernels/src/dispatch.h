#pragma once
#include "q4.h"

namespace mirror_q4 {

constexpr int kAbi = 1;   // bumped with the weight layout: the Python side refuses a library of another

enum class Isa { none, avx2, avx512vnni };

Isa isa();
const char* isa_name(Isa i);
void matmul(Isa i, const Weights& w, const Activations& a, float* y, int64_t n0, int64_t n1);

}  // namespace mirror_q4
