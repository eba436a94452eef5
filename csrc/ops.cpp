// pyengine._C: schemas of the pyengine custom ops and the Python module that loads them.
//
// Every op lives in the `pyengine` torch library namespace, is declared here (one schema per
// op), and has its backend kernels registered next to their sources:
//   csrc/cpu/<op>.cpp   TORCH_LIBRARY_IMPL(pyengine, CPU, m)
//   csrc/cuda/<op>.cu   TORCH_LIBRARY_IMPL(pyengine, CUDA, m)   (CUDA variant only)
// Fake (meta) implementations for torch.compile / torch.export are registered from Python
// (pyengine/ops/*.py, torch.library.register_fake).
//
// Importing pyengine._C (after torch) runs the static registrations below.
#include <torch/extension.h>
#include <torch/library.h>

TORCH_LIBRARY(pyengine, m) {
  // Batched importance statistics over all leading dims of x ([..., C]):
  //   out[0] = sum |x|,  out[1] = sum x^2,  out[2] = sum |x * g| (zeros when g is None).
  // Output: float32 [3, C]; accumulation in fp32 (CUDA) or fp64 (CPU) for every input dtype.
  // set_python_module: the Python module that registers the op's fake impl (torch imports it
  // when it needs the fake impl and finds none); it applies to the defs that follow it.
  m.set_python_module("pyengine.ops.importance");
  m.def("importance_reduce(Tensor x, Tensor? g=None) -> Tensor");
  // Later ops (varlen_attention, masked_ffn) add their schemas here, each after a
  // m.set_python_module("pyengine.ops.<module that registers its fake impl>") line.
}

namespace {
bool has_cuda() {
#ifdef PYENGINE_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "pyengine C++/CUDA kernels; the ops are torch.ops.pyengine.*";
  m.def("has_cuda", &has_cuda, "True when this build of pyengine._C contains the CUDA kernels");
}
