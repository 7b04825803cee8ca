import os
import shutil

# Without a GPU, Triton kernels run in its interpreter; this must be set before torch imports triton.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist (`pytest -n 2`, the README's test command) the workers share the machine's cores: each
# takes its share for torch's intra-op threads instead of all of them (2 workers x 2 threads on 2 cores thrash).
_XDIST_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _XDIST_WORKERS > 1:
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // _XDIST_WORKERS))


def pytest_configure(config):
    # Runs that choose the W&B logger never reach for the network from a test.
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _seed_and_restore_globals():
    torch.manual_seed(0)
    yield
    # train()/evaluate() make process-wide choices (kernel implementations, trusted checkpoint files);
    # do not leak them into the next test.
    from comer.checkpoint import trust_checkpoint_files
    from comer.kernels import set_ms_deform_attn_impl, set_roi_align_impl
    set_ms_deform_attn_impl(None)
    set_roi_align_impl(None)
    trust_checkpoint_files(None)
