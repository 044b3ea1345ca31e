// Runtime choice of the CPU variant of the hot kernels (grid_sample,
// affine_grid_sample, attention), and the registration of every CPU kernel
// with torch (the one TORCH_LIBRARY_IMPL for CPU).
//
// setup.py compiles the kernel files once per variant (see ../cpu_isa.h):
// `default` (plain x86-64, or whatever the target is elsewhere), and on x86-64
// `avx2` (AVX2 + FMA + F16C) and `avx512` (AVX-512 F/BW/VL/DQ). The capability
// `avx512_bf16` is the avx512 variant with its bfloat16 attention products on
// the AVX512-BF16 dot-product instruction (csrc/cpu/dot_tiles.h), and `avx512_amx`
// that variant with its bfloat16 attention on the AMX tiles (csrc/cpu/amx_tiles.h). This file is
// compiled with the plain flags only: it must run on every CPU, to find out
// which variant the CPU can run. The choice is made once, at the first call:
// the best capability the CPU supports, or a lower one named by the environment
// variable ATTNKERNELS_CPU_CAPABILITY (default, avx2, avx512, avx512_bf16, avx512_amx).
#include <torch/library.h>

#if defined(__x86_64__) && defined(__linux__)
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <cctype>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>

#include "cpu_kernels.h"

namespace attnkernels {
namespace cpu {

ATTNKERNELS_DECLARE_CPU_KERNELS(generic)
#if defined(ATTNKERNELS_CPU_VARIANTS)  // set by setup.py when it builds the avx2 and avx512 objects
ATTNKERNELS_DECLARE_CPU_KERNELS(avx2)
ATTNKERNELS_DECLARE_CPU_KERNELS(avx512)
#endif

namespace {

enum class Capability { Default = 0, Avx2 = 1, Avx512 = 2, Avx512Bf16 = 3, Avx512Amx = 4 };

const char* name_of(Capability capability) {
  switch (capability) {
    case Capability::Avx512Amx: return "avx512_amx";
    case Capability::Avx512Bf16: return "avx512_bf16";
    case Capability::Avx512: return "avx512";
    case Capability::Avx2: return "avx2";
    default: return "default";
  }
}

// Whether the CPU has AMX-BF16 and the OS lets this process use the tile registers: Linux gives a
// process the (8 KiB) tile state only when it asks for it (ARCH_REQ_XCOMP_PERM for XTILEDATA).
bool amx_usable() {
#if defined(ATTNKERNELS_CPU_VARIANTS) && defined(__x86_64__) && defined(__linux__)
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool amx_bf16 = (edx >> 22) & 1u, amx_tile = (edx >> 24) & 1u;
  if (!amx_bf16 || !amx_tile) return false;
  constexpr long kRequestPermission = 0x1023;  // ARCH_REQ_XCOMP_PERM
  constexpr long kTileData = 18;               // XFEATURE_XTILEDATA
  return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
#else
  return false;
#endif
}

// The highest variant that this build has and this CPU (and OS) can run.
Capability best_supported() {
#if defined(ATTNKERNELS_CPU_VARIANTS) && defined(__x86_64__)
  // libgcc's cpu model also checks that the OS saves the AVX / AVX-512 registers.
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (avx2 && avx512 && __builtin_cpu_supports("avx512bf16")) {
    return amx_usable() ? Capability::Avx512Amx : Capability::Avx512Bf16;
  }
  if (avx2 && avx512) return Capability::Avx512;
  if (avx2) return Capability::Avx2;
#endif
  return Capability::Default;
}

struct Selection {
  Capability capability = Capability::Default;
  std::string note;  // why the requested variant is not the one in use; empty when it is
  CpuKernels kernels;
};

Selection select() {
  Selection chosen;
  const Capability best = best_supported();
  chosen.capability = best;
  const char* requested = std::getenv("ATTNKERNELS_CPU_CAPABILITY");
  if (requested != nullptr && *requested != '\0') {
    std::string name(requested);
    for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    const std::string use = std::string("; using the best available variant, '") + name_of(best) + "'.";
    if (name == "default" || name == "avx2" || name == "avx512" || name == "avx512_bf16" || name == "avx512_amx") {
      const Capability wanted = name == "avx512_amx"    ? Capability::Avx512Amx
                                : name == "avx512_bf16" ? Capability::Avx512Bf16
                                : name == "avx512"    ? Capability::Avx512
                                : name == "avx2"      ? Capability::Avx2
                                                      : Capability::Default;
      if (wanted <= best) {
        chosen.capability = wanted;
      } else {
#if defined(ATTNKERNELS_CPU_VARIANTS)
        const char* why = wanted == Capability::Avx512Amx
                              ? "this CPU lacks AVX-512 (F, BW, VL and DQ), AVX512-BF16 or AMX-BF16, or the OS "
                                "did not grant the AMX tile state"
                          : wanted == Capability::Avx512Bf16 ? "this CPU lacks AVX-512 (F, BW, VL and DQ) or AVX512-BF16"
                          : wanted == Capability::Avx512 ? "this CPU lacks AVX-512 (F, BW, VL and DQ)"
                                                         : "this CPU lacks AVX2, FMA or F16C";
#else
        const char* why = "this build of attnkernels has only the default CPU variant (it was not built for x86-64)";
#endif
        chosen.note = "attnkernels: ATTNKERNELS_CPU_CAPABILITY=" + std::string(requested) + " cannot be used: " +
                      why + use;
      }
    } else {
      chosen.note = "attnkernels: ATTNKERNELS_CPU_CAPABILITY=" + std::string(requested) +
                    " is not one of 'default', 'avx2', 'avx512', 'avx512_bf16', 'avx512_amx'" + use;
    }
  }
  switch (chosen.capability) {
#if defined(ATTNKERNELS_CPU_VARIANTS)
    case Capability::Avx512Amx:
    case Capability::Avx512Bf16:
    case Capability::Avx512: chosen.kernels = ATTNKERNELS_CPU_KERNELS_OF(avx512); break;
    case Capability::Avx2: chosen.kernels = ATTNKERNELS_CPU_KERNELS_OF(avx2); break;
#endif
    default: chosen.kernels = ATTNKERNELS_CPU_KERNELS_OF(generic);
  }
  return chosen;
}

const Selection& selection() {
  static const Selection chosen = select();
  return chosen;
}

// The kernel registered for an op: calls the chosen variant's entry in the table.
template <auto Entry>
struct ChosenVariant;

template <typename Result, typename... Args, Result (*CpuKernels::*Entry)(Args...)>
struct ChosenVariant<Entry> {
  static Result call(Args... args) { return (selection().kernels.*Entry)(std::forward<Args>(args)...); }
};

}  // namespace

PathChoice path_choice_from_environment(const char* variable) {
  const char* value = std::getenv(variable);
  if (value == nullptr || *value == '\0' || std::strcmp(value, "auto") == 0) return PathChoice::Measure;
  if (std::strcmp(value, "on") == 0) return PathChoice::On;
  if (std::strcmp(value, "off") == 0) return PathChoice::Off;
  TORCH_CHECK(false, variable, " must be 'on', 'off' or 'auto' (unset: auto), got '", value, "'");
}

// For attnkernels.cpu_capability() (csrc/ops.cpp).
const char* cpu_capability_name() { return name_of(selection().capability); }
const char* cpu_capability_note() { return selection().note.c_str(); }
std::string cpu_sampling_paths() { return selection().kernels.sampling_paths(); }
bool bf16_dot_products_enabled() { return selection().capability >= Capability::Avx512Bf16; }
bool amx_tiles_enabled() { return selection().capability == Capability::Avx512Amx; }

// Every CPU kernel of the library is registered here.
TORCH_LIBRARY_IMPL(attnkernels, CPU, m) {
  m.impl("grid_sample", &ChosenVariant<&CpuKernels::grid_sample>::call);
  m.impl("grid_sample_backward", &ChosenVariant<&CpuKernels::grid_sample_backward>::call);
  m.impl("affine_grid", &affine_grid_cpu);
  m.impl("affine_grid_backward", &affine_grid_backward_cpu);
  m.impl("affine_grid_sample", &ChosenVariant<&CpuKernels::affine_grid_sample>::call);
  m.impl("affine_grid_sample_backward", &ChosenVariant<&CpuKernels::affine_grid_sample_backward>::call);
  m.impl("attention", &ChosenVariant<&CpuKernels::attention>::call);
  m.impl("attention_backward", &ChosenVariant<&CpuKernels::attention_backward>::call);
}

}  // namespace cpu
}  // namespace attnkernels
