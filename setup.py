"""Build script: the metadata lives in setup.cfg; this adds the optional C speedup.

``stn_diffusers._speedups`` (one Gauss–Newton step in C) is built when a C compiler is present; where
none is, the build goes on without it (``optional=True``) and the package runs its PyTorch path.
"""

import sys

from setuptools import Extension, setup

# Reassociating sums lets the compiler vectorise the kernel's reductions; no flag assumes finite math
# (the kernel tests for NaN).
compile_args = (
    []
    if sys.platform == "win32"
    else ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fassociative-math", "-fno-signed-zeros"]
)

setup(
    ext_modules=[
        Extension(
            "stn_diffusers._speedups",
            ["stn_diffusers/_speedups.c"],
            extra_compile_args=compile_args,
            optional=True,
        )
    ]
)
