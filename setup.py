"""Build the Cython attach-path extension ``zerofs_csi.nbd._nbd``.

Environment switches:
  ZEROFS_CSI_DEBUG_BUILD=1  annotated HTML, line tracing, no optimisation
  ZEROFS_CSI_WERROR=1       compiler warnings are errors (development builds)
"""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

debug = os.environ.get("ZEROFS_CSI_DEBUG_BUILD") == "1"
werror = os.environ.get("ZEROFS_CSI_WERROR") == "1"

compile_args = ["-O0", "-g"] if debug else ["-O2"]
compile_args += ["-Wall", "-Wno-unused-function"]
if werror:
    compile_args.append("-Werror")
macros = [("CYTHON_TRACE_NOGIL", "1")] if debug else []

directives = {
    "language_level": "3",
    "boundscheck": debug,
    "wraparound": False,
    "embedsignature": True,
    "linetrace": debug,
}

extensions = [
    Extension(
        "zerofs_csi.nbd._nbd",
        sources=["src/zerofs_csi/nbd/_nbd.pyx"],
        extra_compile_args=compile_args,
        define_macros=macros,
    )
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives=directives,
        annotate=debug,
        include_path=["src"],
    )
)
