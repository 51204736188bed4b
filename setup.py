"""Build script: cythonises ``_fastcore/*.pyx`` into the ``blockproxy`` namespace.

``BLOCKPROXY_NO_EXTENSIONS=1`` at build time skips the extension (the pure-Python twin
is used at run time).  ``BLOCKPROXY_CYTHON_ANNOTATE=1`` writes Cython's HTML annotation
next to the sources, and ``BLOCKPROXY_CYTHON_TRACE=1`` enables line tracing for profilers.
"""

import os

from setuptools import find_packages, setup

NO_EXTENSIONS = os.environ.get("BLOCKPROXY_NO_EXTENSIONS", "") not in ("", "0")
ANNOTATE = os.environ.get("BLOCKPROXY_CYTHON_ANNOTATE", "") not in ("", "0")
TRACE = os.environ.get("BLOCKPROXY_CYTHON_TRACE", "") not in ("", "0")


def extensions():
    if NO_EXTENSIONS:
        return []
    from Cython.Build import cythonize
    from setuptools import Extension

    macros: list[tuple[str, str]] = []
    directives = {"language_level": "3", "boundscheck": False, "wraparound": False,
                  "cdivision": True, "initializedcheck": False}
    if TRACE:
        macros.append(("CYTHON_TRACE_NOGIL", "1"))
        directives.update(linetrace=True, binding=True)
    ext = Extension(
        "blockproxy._fastcore",
        ["_fastcore/_fastcore.pyx"],
        define_macros=macros,
        # Identical floating-point results to the pure-Python twin: no fused multiply-add.
        extra_compile_args=["-O2", "-ffp-contract=off"],
    )
    return cythonize([ext], compiler_directives=directives, annotate=ANNOTATE)


# The profiles in ``profiles/`` are package data of both packages: the proxy and the
# emulator read them with readers of their own, and neither imports the other.
setup(
    packages=find_packages(include=["blockproxy", "blockproxy.*", "loadgen", "loadgen.*"])
    + ["blockproxy.profiles", "loadgen.profiles"],
    package_dir={"blockproxy.profiles": "profiles", "loadgen.profiles": "profiles"},
    package_data={"blockproxy.profiles": ["*.json"], "loadgen.profiles": ["*.json"],
                  "loadgen": ["data/*"]},
    ext_modules=extensions(),
    zip_safe=False,
)
