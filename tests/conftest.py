import os
import shutil

# Without a GPU, Triton kernels run in its interpreter; this must be set before torch imports triton.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


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
