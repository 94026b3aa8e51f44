import os

import pytest
import torch

from mtlsam_ext.ops import available_backends

# Deterministic, single-threaded by default so results do not depend on the machine.
torch.set_num_threads(int(os.environ.get("MTLSAM_TEST_THREADS", "2")))

CPU_BACKENDS = available_backends("cpu")


@pytest.fixture(params=CPU_BACKENDS)
def backend(request) -> str:
    return request.param
