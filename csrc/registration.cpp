// Op schemas of the mtlsam library and the Python module that loads them.
//
// Every op mirrors a function of mtlsam_ext/kernels/torch_ref.py (the reference): same
// arguments, same accumulation dtype (float32 for 16/32-bit inputs, float64 for float64),
// same results within the tolerances of tests/tolerances.py. Segment tables are int64.
// Backends register implementations with TORCH_LIBRARY_IMPL(mtlsam, CPU|CUDA, m).
#include <Python.h>
#include <torch/library.h>

#include "cpu/simd_sums.h"

TORCH_LIBRARY(mtlsam, m) {
  // Per-segment sum of (T x)^2, T = scale (or 1). -> [S] in the accumulation dtype.
  m.def("segment_sumsq(Tensor x, Tensor offsets, Tensor? scale) -> Tensor");
  // Per sampled segment p and task k: <T g0, T local_k> and ||T local_k||^2. -> ([K,P], [K,P])
  m.def(
      "gl_layer_stats(Tensor g0, Tensor local, Tensor starts, Tensor lengths, "
      "Tensor local_starts, Tensor? scale) -> (Tensor, Tensor)");
  // param = backup + T^2 (coef[s] g0 + local_coef[p] local) with T = |backup|; when
  // save_backup, backup := param first. local is a 1-D row addressed by local_starts.
  m.def(
      "mix_perturb_(Tensor(a!) param, Tensor(b!) backup, Tensor g0, Tensor coef, "
      "Tensor offsets, Tensor? local, Tensor? local_coef, Tensor? starts, Tensor? lengths, "
      "Tensor? local_starts, bool adaptive, bool save_backup) -> ()");
  m.def("restore_(Tensor(a!) param, Tensor backup) -> ()");
  // K x K Gram of a [K, N] matrix, exactly symmetric, in the accumulation dtype.
  m.def("gram(Tensor rows) -> Tensor");
  // Per-segment K x K Grams of a [K, N] matrix: [S, K, K], exactly symmetric, in the
  // accumulation dtype; segment s spans columns [offsets[s], offsets[s + 1]).
  m.def("segment_gram(Tensor rows, Tensor offsets) -> Tensor");
  // out = sum_i w_i rows_i accumulated in row order in the accumulation dtype.
  m.def("combine_(Tensor(a!) out, Tensor rows, Tensor weights) -> ()");
  m.def("sub_(Tensor(a!) rows, Tensor other) -> ()");
  // F-MTL: sam -= loss in place, and the K x K Gram of the resulting (stored) flat rows.
  m.def("flat_gram_(Tensor(a!) sam, Tensor loss) -> Tensor");
}

// The instruction set the CPU reductions picked at load ("avx2" or "baseline").
static PyObject* cpu_isa(PyObject*, PyObject*) {
  return PyUnicode_FromString(mtlsam::cpu::simd_isa());
}

static PyMethodDef mtlsam_methods[] = {
    {"cpu_isa", cpu_isa, METH_NOARGS, "Instruction set of the CPU reductions in use."},
    {nullptr, nullptr, 0, nullptr}};

// An importable module: `import mtlsam_ext._C` runs the static registrations above.
static struct PyModuleDef mtlsam_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1,
                                           mtlsam_methods};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&mtlsam_module); }
