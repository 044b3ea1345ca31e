// Every schema of the attnkernels operator library, in one place. Kernels are
// registered once per backend, in csrc/cpu/cpu_dispatch.cpp and
// csrc/cuda/cuda_registration.cu; fake kernels and autograd in
// attnkernels/_library/*.py.
//
// Integer enums follow torch: interpolation 0 bilinear, 1 nearest, 2 bicubic;
// padding 0 zeros, 1 border, 2 reflection. Backward ops take an output mask
// and return an empty tensor for a gradient that was not asked for.
#include <Python.h>
#include <torch/library.h>

#include <string>

TORCH_LIBRARY(attnkernels, m) {
  // Sampling. input (N, C, [D,] H, W), grid (N, [Do,] Ho, Wo, 2 or 3).
  m.def("grid_sample(Tensor input, Tensor grid, int interpolation, int padding, bool align_corners) -> Tensor");
  m.def(
      "grid_sample_backward(Tensor grad_output, Tensor input, Tensor grid, int interpolation, int padding, "
      "bool align_corners, bool[2] output_mask) -> (Tensor, Tensor)");
  // theta (N, 2, 3) or (N, 3, 4); size (N, C, [D,] H, W) of the output.
  m.def("affine_grid(Tensor theta, int[] size, bool align_corners) -> Tensor");
  m.def("affine_grid_backward(Tensor grad_grid, int[] size, bool align_corners) -> Tensor");
  m.def(
      "affine_grid_sample(Tensor input, Tensor theta, int[] size, int interpolation, int padding, "
      "bool align_corners) -> Tensor");
  m.def(
      "affine_grid_sample_backward(Tensor grad_output, Tensor input, Tensor theta, int[] size, int interpolation, "
      "int padding, bool align_corners, bool[2] output_mask) -> (Tensor, Tensor)");

  // ---------------------------------------------------------------- attention
  // query (B, Hq, L, E), key (B, Hkv, S, E), value (B, Hkv, S, Ev), Hq % Hkv == 0
  // (GQA: query head h reads kv head h / (Hq / Hkv)); attn_mask None or
  // (B, Hq, L, S) (broadcast views allowed), bool (true = attend) or of the
  // accumulation dtype (float32; float64 for float64 inputs), added to the
  // scaled scores. dropout_seed: one int64, drawn from torch's generator, from
  // which the kernel derives the dropout mask (backward regenerates it).
  // Returns out (B, Hq, L, Ev) and lse (B, Hq, L) in the accumulation dtype.
  m.def(
      "attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, float dropout_p, bool is_causal, "
      "float scale, Tensor? dropout_seed) -> (Tensor, Tensor)");
  // Gradients to query, key, value and a float attn_mask; grad_lse optional.
  m.def(
      "attention_backward(Tensor grad_out, Tensor? grad_lse, Tensor query, Tensor key, Tensor value, "
      "Tensor? attn_mask, Tensor out, Tensor lse, float dropout_p, bool is_causal, float scale, "
      "Tensor? dropout_seed, bool[4] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");
}

namespace attnkernels {
namespace cpu {
// csrc/cpu/cpu_dispatch.cpp: the CPU variant in use, and why it is not the requested one ("" if it is).
const char* cpu_capability_name();
const char* cpu_capability_note();
std::string cpu_sampling_paths();
}  // namespace cpu
}  // namespace attnkernels

namespace {

PyObject* cpu_capability(PyObject*, PyObject*) { return PyUnicode_FromString(attnkernels::cpu::cpu_capability_name()); }

PyObject* cpu_capability_note(PyObject*, PyObject*) {
  return PyUnicode_FromString(attnkernels::cpu::cpu_capability_note());
}

PyObject* cpu_sampling_paths(PyObject*, PyObject*) {
  return PyUnicode_FromString(attnkernels::cpu::cpu_sampling_paths().c_str());
}

PyMethodDef module_methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS, "The CPU variant of the kernels in use: default, avx2, avx512 or avx512_bf16."},
    {"cpu_capability_note", cpu_capability_note, METH_NOARGS,
     "Why the variant in use is not the one ATTNKERNELS_CPU_CAPABILITY asks for ('' when it is)."},
    {"cpu_sampling_paths", cpu_sampling_paths, METH_NOARGS,
     "Which CPU-dependent paths the variant's sampling forwards take (measuring them on first use)."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

// `import attnkernels._C` loads this library, which runs the registrations
// above; the module's only members report the CPU variant in use and its paths.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, module_methods};
  return PyModule_Create(&module_def);
}
