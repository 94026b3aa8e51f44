"""``python -m mtlsam_ext.bench``: the main job, the step-time comparison on a default model.

It runs :mod:`mtlsam_ext.benchmark.step` with K = 10 tasks unless ``--tasks`` is given (every
other option is passed through; ``--help`` lists them): MTLSAM's methods side by side with the
naive F-MTL baselines written like the authors' training scripts, with times, peak memory,
measured pass counts and ratios, on the main job's MLP (CPU) or the MLP and ResNet-18 (CUDA).
Everything it needs ships with the package, so an installed wheel runs the same comparison
as a source checkout.
"""

from __future__ import annotations

import sys

from mtlsam_ext.benchmark.step import main as step_main


def main(argv: list[str] | None = None) -> None:
    step_main(list(sys.argv[1:] if argv is None else argv), prog="python -m mtlsam_ext.bench",
              tasks="10")


if __name__ == "__main__":
    main()
