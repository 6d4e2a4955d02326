// Which instructions Realm's CPU kernels may use, decided once from the CPU's features.
// REALM_KERNEL_ISA=avx2 or =scalar caps the choice, so that tests run every body on one machine.
#pragma once

#include <cstdlib>
#include <string>

namespace realm {

enum class Isa { scalar, avx2, avx512 };  // avx512: F, BW and VNNI

inline Isa kernel_isa() {
  static const Isa isa = [] {
    __builtin_cpu_init();
    const char* cap = std::getenv("REALM_KERNEL_ISA");
    const std::string most = cap ? cap : "";
    if (most != "scalar" && most != "avx2" && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw"))
      return Isa::avx512;
    if (most != "scalar" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c"))
      return Isa::avx2;
    return Isa::scalar;
  }();
  return isa;
}

}  // namespace realm
