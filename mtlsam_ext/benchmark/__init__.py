"""The step-time comparison the main job runs (``python -m mtlsam_ext.bench``), shipped with
the package: timing and peak-memory harness, the naive F-MTL baselines written like the
authors' training scripts, and the step benchmark. The heavier programs in the checkout's
``bench/`` import from here, never the other way."""
