// The ISA path, chosen once at load from what the CPU reports; MIRROR_DEPLOY_Q4_ISA=avx2 forces the
// narrower path (to test it on an AVX-512 machine). Exported with C linkage so that `mirror-deploy
// devices` and the tests can ask which path runs, and why.
#include <cstdlib>
#include <cstring>
#include <string>

#include "dispatch.h"

namespace mirror_q4 {
namespace {

Isa detect(std::string& why) {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                      __builtin_cpu_supports("f16c");
    const bool vnni = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vnni");
    const char* forced = std::getenv("MIRROR_DEPLOY_Q4_ISA");
    if (forced && *forced) {
        if (!std::strcmp(forced, "avx2")) {
            why = avx2 ? "forced by MIRROR_DEPLOY_Q4_ISA=avx2" : "MIRROR_DEPLOY_Q4_ISA=avx2, but the CPU lacks AVX2/FMA/F16C";
            return avx2 ? Isa::avx2 : Isa::none;
        }
        if (!std::strcmp(forced, "avx512vnni")) {
            why = vnni ? "asked by MIRROR_DEPLOY_Q4_ISA=avx512vnni" : "MIRROR_DEPLOY_Q4_ISA=avx512vnni, but the CPU lacks AVX-512 VNNI";
            return vnni ? Isa::avx512vnni : Isa::none;
        }
        why = std::string("MIRROR_DEPLOY_Q4_ISA=") + forced + " is unknown (use avx2 or avx512vnni)";
        return Isa::none;
    }
    if (vnni) { why = "the CPU reports AVX-512 VNNI"; return Isa::avx512vnni; }
    if (avx2) { why = "the CPU reports AVX2 but not AVX-512 VNNI"; return Isa::avx2; }
    why = "the CPU lacks AVX2/FMA/F16C";
    return Isa::none;
}

struct Chosen {
    std::string why;
    Isa isa = detect(why);
};

const Chosen& chosen() {
    static const Chosen c;
    return c;
}

}  // namespace

Isa isa() { return chosen().isa; }

const char* isa_name(Isa i) {
    switch (i) {
        case Isa::avx512vnni: return "avx512vnni";
        case Isa::avx2: return "avx2";
        default: return "none";
    }
}

void matmul(Isa i, const Weights& w, const Activations& a, float* y, int64_t n0, int64_t n1) {
    if (i == Isa::avx512vnni) matmul_avx512vnni(w, a, y, n0, n1);
    else matmul_avx2(w, a, y, n0, n1);
}

}  // namespace mirror_q4

extern "C" {
const char* mirror_q4_isa() { return mirror_q4::isa_name(mirror_q4::isa()); }
const char* mirror_q4_why() { return mirror_q4::chosen().why.c_str(); }
int mirror_q4_abi() { return mirror_q4::kAbi; }
}
