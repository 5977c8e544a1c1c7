// The extension module itself holds no Python functions: importing it runs the TORCH_LIBRARY
// registrations of the other files. An empty module init keeps it free of pybind11.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
