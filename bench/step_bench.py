"""End-to-end optimizer-step benchmark: MTLSAM's methods against the naive F-MTL baselines.

The program lives in the package (:mod:`mtlsam_ext.benchmark.step`, also the main job
``python -m mtlsam_ext.bench``); this entry point keeps ``python -m bench.step_bench`` working
from the repository root with every option (see ``--help``).
"""

from mtlsam_ext.benchmark.step import main

if __name__ == "__main__":
    main(prog="python -m bench.step_bench")
