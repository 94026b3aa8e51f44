"""Build script. The compiled extension (``mtlsam_ext._C``, C++/CUDA kernels from csrc/) is
optional: without a compiler, or with ``MTLSAM_SKIP_EXT=1``, the pure-torch package installs.

Install with ``pip install --no-build-isolation -e .`` so the build sees the torch already
installed instead of pulling another one into an isolated environment.
"""

from setuptools import setup

setup()
