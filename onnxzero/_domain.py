"""The custom-op domain: the one constant shared by Python and C++.

runtime_ops/CMakeLists.txt reads DOMAIN and OP_VERSION from this file with a
regex and compiles them into the library, so the rewriter and the kernels can
never disagree on the name.
"""

DOMAIN = "ai.onnxzero"
OP_VERSION = 1
