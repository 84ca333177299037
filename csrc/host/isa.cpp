// Run-time choice between the instruction-set variants of the host loops.
#include <cstdlib>
#include <cstring>

#include "multi_tensor_host.h"

namespace fastmup {
namespace host {

Isa& isa_override() {
  static Isa isa = [] {
    const char* env = std::getenv("FASTMUP_HOST_ISA");
    if (env != nullptr && std::strcmp(env, "generic") == 0) return Isa::kGeneric;
    return Isa::kAuto;
  }();
  return isa;
}

bool use_avx2() {
#if FASTMUP_HAVE_AVX2
  static const bool has_avx2 = __builtin_cpu_supports("avx2");
  const Isa isa = isa_override();
  return has_avx2 && isa != Isa::kGeneric;
#else
  return false;
#endif
}

const char* isa_name() { return use_avx2() ? "avx2" : "generic"; }

}  // namespace host
}  // namespace fastmup
