"""Triton kernels of :mod:`mtlsam_ext.kernels.triton_kernels`, split by kind.

* :mod:`.config`: the block-size rule and the interpreter switch;
* :mod:`.tables`: host-side chunk/block tables built from the segment tables;
* :mod:`.reduce`: deterministic two-stage reductions (``segment_sumsq``, ``gl_layer_stats``,
  ``gram``);
* :mod:`.elementwise`: ``mix_perturb_``, ``restore_``, ``combine_``, ``sub_``.

Importing any of these imports ``triton`` and raises ``ImportError`` where it is absent.
"""
