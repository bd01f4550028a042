"""Build ringlm: maps the top-level folders into one package and compiles the Cython hot paths.

The repository root is the `ringlm` package: `ext/` installs as `ringlm.ext`,
`server/` as `ringlm.server`, and so on, so nothing called `server` or `client`
lands in site-packages. The Cython extensions are required (no pure-Python
fallback); OpenMP is used when the compiler has it.
"""

import os
import subprocess
import sys
import tempfile

import numpy
from Cython.Build import cythonize
from setuptools import Extension, find_packages, setup

# The folders that install under ringlm; tests/, benchmarks/, docs/ and scripts/ stay out of the wheel.
FOLDERS = ["idl", "ext", "server", "client"]

CYTHON_MODULES = ["_bpe", "_sampling", "_ring", "_wire"]


def packages() -> list[str]:
    """ringlm and every package under FOLDERS, found on disk rather than listed: a subpackage missing
    from a hand-kept list would pass the tests under a lenient editable install and still be left out
    of the wheel."""
    found = find_packages(include=[*FOLDERS, *(f"{folder}.*" for folder in FOLDERS)])
    return ["ringlm", *(f"ringlm.{name}" for name in found)]


def compiler_has_openmp() -> bool:
    """True when the C compiler builds and links a trivial OpenMP program."""
    if os.environ.get("RINGLM_NO_OPENMP"):
        return False
    source = "#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "omp.c")
        with open(path, "w") as f:
            f.write(source)
        cc = os.environ.get("CC", "cc")
        result = subprocess.run([cc, "-fopenmp", path, "-o", os.path.join(tmp, "omp")],
                                capture_output=True)
        return result.returncode == 0


def extensions() -> list:
    openmp = ["-fopenmp"] if sys.platform != "win32" and compiler_has_openmp() else []
    modules = []
    for name in CYTHON_MODULES:
        source = os.path.join("ext", f"{name}.pyx")
        if not os.path.exists(source):
            continue
        modules.append(Extension(
            f"ringlm.ext.{name}",
            [source],
            language="c++",
            include_dirs=[numpy.get_include(), "ext"],
            extra_compile_args=["-O3", "-std=c++17", *openmp],
            extra_link_args=openmp,
            define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
        ))
    return cythonize(modules, language_level=3, compiler_directives={
        "boundscheck": False, "wraparound": False, "cdivision": True,
        "initializedcheck": False,
    })


# The ring client, its load test and `ringlm loadtest`: no torch, no gguf (`pip install ringlm[client]`).
CLIENT = [
    "numpy>=1.26",
    "gevent>=24.2",
    "rich>=13",          # the load test's progress bar
]
# Everything a worker needs: the model, the tokenizer, the engine and the Thrift server.
SERVER = [
    "numpy>=1.26",
    "gevent>=24.2",
    "torch>=2.1",
    "gguf>=0.10",
    "safetensors>=0.4",
    "jinja2>=3.1",       # chat templates
    "regex>=2024.9",     # the tokenizer's Unicode character classes
    "prometheus_client>=0.20",
]
PLOT = ["matplotlib>=3.7"]   # `ringlm loadtest --plot`
ZOOKEEPER = ["kazoo>=2.9"]   # discovery: workers registering, clients watching
# Independent implementations the tests compare against, and the benchmarks' peers.
TEST_ORACLES = [
    "pytest>=8",
    "pytest-timeout>=2.3",
    "hypothesis>=6.100",
    "tokenizers>=0.20",
    "tiktoken>=0.7",
    "transformers>=4.45",
    "accelerate>=1.0",
    "thrift>=0.17",
    "grpcio>=1.60",
    "uhashring>=2.3",
    "flask>=3.0",        # bench_e2e's naive baseline server
]

setup(
    # build_py leaves the setup script out of a package's modules, and the root is a package here; under
    # pip, sys.argv[0] (its default) is pip's build hook, so ringlm.setup would otherwise ship.
    script_name="setup.py",
    name="ringlm",
    version="0.1.0",
    description="Language-model serving over Thrift: gevent workers, Cython hot paths, a consistent-hash client.",
    license="Apache-2.0",
    python_requires=">=3.11",
    package_dir={"ringlm": "."},   # and so ringlm.server.model -> server/model
    packages=packages(),
    package_data={"ringlm.idl": ["*.thrift"], "ringlm.ext": ["*.pyx", "*.pxd", "*.h"]},
    ext_modules=extensions(),
    # The base is the Thrift contract every part speaks; an extra per role adds the rest (README: Set-up).
    install_requires=["thriftpy2>=0.5"],
    extras_require={
        "client": CLIENT,
        "server": SERVER,
        "plot": PLOT,
        "zookeeper": ZOOKEEPER,
        "dev": list(dict.fromkeys([*CLIENT, *SERVER, *PLOT, *ZOOKEEPER, *TEST_ORACLES])),
    },
    entry_points={"console_scripts": ["ringlm = ringlm.cli:main"]},
)
