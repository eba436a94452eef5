// pyengine._C: schemas of the pyengine custom ops and the Python module that loads them.
//
// Every op lives in the `pyengine` torch library namespace, is declared here (one schema per
// op), and has its backend kernels registered next to their sources:
//   csrc/cpu/<op>.cpp   TORCH_LIBRARY_IMPL(pyengine, CPU, m)
//   csrc/cuda/<op>.cu   TORCH_LIBRARY_IMPL(pyengine, CUDA, m)   (CUDA variant only)
// Fake (meta) implementations for torch.compile / torch.export are registered from Python
// (pyengine/ops/<op>/library.py, torch.library.register_fake).
//
// Importing pyengine._C (after torch) runs the static registrations below. The module itself is
// a plain CPython extension (PyInit__C), not pybind11/torch/extension.h: it only has to exist
// and say whether it holds CUDA kernels, and the light headers keep a fresh build short.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(pyengine, m) {
  // Batched importance statistics over all leading dims of x ([..., C]):
  //   out[0] = sum |x|,  out[1] = sum x^2,  out[2] = sum |x * g| (zeros when g is None).
  // Output: float32 [3, C]; accumulation in fp32 (CUDA) or fp64 (CPU) for every input dtype.
  // set_python_module: the Python module that registers the op's fake impl (torch imports it
  // when it needs the fake impl and finds none); it applies to the defs that follow it.
  m.set_python_module("pyengine.ops.importance_reduce.library");
  m.def("importance_reduce(Tensor x, Tensor? g=None) -> Tensor");

  // The csrc backends of the three hot ops, run by the "cpu" / "cuda" backend classes in
  // pyengine/ops/<op>/backends.py (their fake impls: pyengine/ops/<op>/library.py). Named
  // *_fwd / *_many so they never clash with the Python-side custom ops
  // (pyengine::varlen_attention, ...).
  m.set_python_module("pyengine.ops.varlen_attention.library");
  // Varlen-head attention forward. q, k: [B, Nq|Nk, sum(qk_dims)], v: [B, Nk, sum(v_dims)],
  // heads packed in order, last dim contiguous (stride 1). Head h: softmax(q_h k_h^T * scales[h])
  // v_h; qk_dims[h] == 0 gives uniform attention. Output: [B, Nq, sum(v_dims)], v's dtype.
  m.def("varlen_attention_fwd(Tensor q, Tensor k, Tensor v, int[] qk_dims, int[] v_dims, "
        "float[] scales) -> Tensor");
  m.set_python_module("pyengine.ops.masked_ffn.library");
  // Masked FFN forward: fc2((act(fc1(x)) * gate)[..., keep]) with dense weights w1 [H, in],
  // w2 [out, H]; keep: int indices of kept neurons (None: all); gate: per-neuron multipliers
  // over the full hidden width H (broadcast over x's leading dims); act: "gelu", "gelu_tanh",
  // "relu" or "silu". Output: [..., out].
  m.def("masked_ffn_fwd(Tensor x, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, Tensor? keep, "
        "Tensor? gate, str act) -> Tensor");
  m.set_python_module("pyengine.ops.importance_reduce.library");
  // importance_reduce of every xs[i] ([..., C_i]) with gs[i] (empty list: no g) in one call.
  // Output: float32 [3 * sum(C_i)], packed per tensor: entry i is a contiguous [3, C_i] block.
  m.def("importance_reduce_many(Tensor[] xs, Tensor?[] gs) -> Tensor");
}

namespace {

PyObject* has_cuda(PyObject* /*self*/, PyObject* /*args*/) {
#ifdef PYENGINE_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef kMethods[] = {
    {"has_cuda", has_cuda, METH_NOARGS,
     "True when this build of pyengine._C contains the CUDA kernels"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef kModule = {
    PyModuleDef_HEAD_INIT, "_C", "pyengine C++/CUDA kernels; the ops are torch.ops.pyengine.*",
    -1, kMethods, nullptr, nullptr, nullptr, nullptr,
};

}  // namespace

// the module is pyengine._C (setup.py); torch.utils.cpp_extension names it in
// TORCH_EXTENSION_NAME
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
