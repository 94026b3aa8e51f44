"""Kernels: pure functions on flat 1-D tensors and segment tables, one module per backend.

``torch_ref`` is the reference that defines every op; compiled (``mtlsam_ext._C``) and
Triton kernels must match it within the per-dtype tolerances of the test suite.
"""
