"""The memory preflight: byte counting, the scaling math, and refusing a run that cannot fit before its model is
built (with overrides that fit), without ever allocating what the run would need."""
from __future__ import annotations

import importlib
import logging

import pytest
import torch
import torch.nn as nn

from app_utils import SMALL_BACKBONE, TINY_SYNTHETIC, compose_config
from comer.app import preflight, train
from comer.app.memory_probe import AvailableMemory, TensorAllocations, cgroup_headroom, meminfo_available
from comer.app.preflight import (GIB, MemoryPreflightError, StepMemory, StepPlan, check_memory, largest_fitting_crop,
                                 measure_step_memory)

FLOAT_BYTES = 4
MIB = 2**20

TRAIN_MODULE = importlib.import_module("comer.app.train")  # comer.app.train is also the function

# The other tests' configs skip the preflight (app_utils.TEST_DEFAULTS); these check it.
CHECK_ON = "preflight.memory_check=true"


def tiny(*overrides: str) -> list[str]:
    """TINY_SYNTHETIC with the check on and some of its keys set otherwise."""
    keys = {o.split("=", 1)[0] for o in overrides}
    return [*(o for o in TINY_SYNTHETIC if o.split("=", 1)[0] not in keys), CHECK_ON, *overrides]


# -- counting bytes ------------------------------------------------------------------------------------------------
def test_tensor_allocations_count_new_storages_until_freed():
    with TensorAllocations() as counter:
        a = torch.ones(1000, 250)  # 1 MB
        view = a[:10].t()  # a view: no new memory
        a.mul_(2)  # in place: no new memory
        assert counter.allocated() == 1000 * 250 * FLOAT_BYTES
        b = a + 1
        assert counter.allocated() == counter.peak() == 2 * 1000 * 250 * FLOAT_BYTES
        del a
        assert counter.allocated() == 2 * 1000 * 250 * FLOAT_BYTES, "the view keeps a's storage alive"
        del view, b
        assert counter.allocated() == 0 and counter.peak() == 2 * 1000 * 250 * FLOAT_BYTES
        counter.reset_peak()
        assert counter.peak() == 0


def test_tensors_made_before_are_not_counted_but_their_gradients_are():
    weight = nn.Parameter(torch.zeros(500, 500))
    with TensorAllocations() as counter:
        (weight * 2).sum().backward()
    assert weight.grad is not None
    assert counter.allocated() == weight.grad.nbytes, "only the new gradient stays"


# -- the scaling math with known numbers -----------------------------------------------------------------------------
STEP = StepMemory(weights=100 * MIB, gradients=100 * MIB, optimizer_state=200 * MIB, optimizer_temporaries=300 * MIB,
                  activations_per_sample=250 * MIB)


def test_step_memory_scales_the_activations_by_the_batch_and_the_pixels():
    assert STEP.resident == 400 * MIB
    assert STEP.total(1) == 400 * MIB + 300 * MIB, "the optimizer step's temporaries are the larger peak"
    assert STEP.total(4) == 400 * MIB + 4 * 250 * MIB
    assert STEP.total(4, pixel_ratio=0.5) == 400 * MIB + 2 * 250 * MIB
    assert STEP.total(4, pixel_ratio=0.25) == 400 * MIB + 300 * MIB
    assert STEP.largest_batch(1400 * MIB) == 4 and STEP.largest_batch(1399 * MIB) == 3
    assert STEP.largest_batch(699 * MIB) == 0


def test_largest_fitting_crop_keeps_the_aspect_and_the_divisor():
    # 16 samples of 512x512: 400 + 16 x 250 MiB = 4400 MiB. 1400 MiB leave 1000 MiB for activations: a quarter of
    # the pixels, 256x256.
    assert largest_fitting_crop(STEP, (512, 512), 16, 32, 1400 * MIB) == (256, 256)
    assert largest_fitting_crop(STEP, (512, 1024), 16, 32, 1400 * MIB) == (256, 512)
    assert largest_fitting_crop(STEP, (512, 1024), 16, 32, 1399 * MIB) == (224, 448)
    assert largest_fitting_crop(STEP, (512, 512), 16, 32, 500 * MIB) is None


def test_one_sample_predicts_a_larger_batch():
    """The activations of one sample, times the batch, bound the measured peak of a batch of four from above,
    and closely for a network in fp32 (little that does not grow with the batch)."""
    network = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))

    def step_loss(batch):
        return network(torch.randn(batch, 3, 64, 64)).square().mean()

    step = measure_step_memory(network, torch.optim.AdamW(network.parameters()), step_loss, TensorAllocations())
    weights = sum(p.nbytes for p in network.parameters())
    assert step.weights == step.gradients == weights and step.optimizer_state >= 2 * weights
    with TensorAllocations() as counter:  # the gradients exist: backward accumulates into them, as in the probe
        step_loss(4).backward()
    assert 0.95 * 4 * step.activations_per_sample <= counter.peak() <= 4 * step.activations_per_sample


# -- available memory ------------------------------------------------------------------------------------------------
def test_meminfo_and_cgroup_limits(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16000000 kB\nMemFree:         1000 kB\nMemAvailable:    8000000 kB\n")
    assert meminfo_available(meminfo) == 8000000 * 1024
    self_cgroup = tmp_path / "cgroup"
    self_cgroup.write_text("0::/job/step\n")
    root = tmp_path / "fs"
    (root / "job" / "step").mkdir(parents=True)
    (root / "job" / "step" / "memory.max").write_text("max\n")
    (root / "job" / "step" / "memory.current").write_text("100\n")
    assert cgroup_headroom(self_cgroup, root) is None
    (root / "job" / "memory.max").write_text(f"{4 * GIB}\n")  # a limit on the parent applies too
    (root / "job" / "memory.current").write_text(f"{GIB}\n")
    assert cgroup_headroom(self_cgroup, root) == 3 * GIB
    self_cgroup.write_text("4:memory:/docker/abc\n")  # cgroup v1
    (root / "memory" / "docker" / "abc").mkdir(parents=True)
    (root / "memory" / "docker" / "abc" / "memory.limit_in_bytes").write_text(f"{2 * GIB}\n")
    (root / "memory" / "docker" / "abc" / "memory.usage_in_bytes").write_text(f"{GIB // 2}\n")
    assert cgroup_headroom(self_cgroup, root) == 3 * GIB // 2


# -- the guard -------------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_machine(monkeypatch):
    """A machine with `available` bytes whose probe measures `step` (the config's real network is never built
    at its real size)."""
    machine = {}

    def probe(cfg, plan):
        machine["plan"] = plan
        return machine["step"]

    monkeypatch.setattr(preflight, "available_memory", lambda device: AvailableMemory(machine["available"], "test"))
    monkeypatch.setattr(preflight, "probe_step_memory", probe)
    return machine


def test_a_run_that_cannot_fit_is_refused_with_overrides_that_fit(tmp_path, fake_machine, monkeypatch):
    """The ADE20K recipe (global batch 16 of 512x512) on a machine with 1.4 GiB: refused before the model is built
    or a logger starts, with the largest batch and crop that fit within 80 % (preflight.warn_fraction) of it:
    1120 MiB leave 720 MiB for activations of 250 MiB per 512x512 sample: 2 samples, or 16 of 192x192."""
    fake_machine.update(available=1400 * MIB, step=STEP)
    built = []
    monkeypatch.setattr(TRAIN_MODULE, "build_model", lambda cfg: built.append(cfg))
    cfg = compose_config("train", ["task=ade20k", "backbone=comer_t", "trainer=cpu", "data.root=/nowhere", CHECK_ON],
                         tmp_path)
    monkeypatch.setattr(TRAIN_MODULE, "build_datamodule", lambda cfg, stage: None)
    with pytest.raises(MemoryPreflightError) as refused:
        train(cfg)
    message = str(refused.value)
    assert fake_machine["plan"].batch == 16 and fake_machine["plan"].crop == (512, 512)
    assert f"needs about {STEP.total(16) / GIB:.2f} GiB" in message and "1.37 GiB available (test)" in message
    assert "global_batch_size=2  (per-device batch 2: about 0.88 GiB)" in message
    assert "data.crop_size=[192,192]" in message
    assert "preflight.memory_check=false" in message
    assert not built and not (tmp_path / "outputs" / cfg.run_name / "run" / "checkpoints").exists()


def test_without_a_global_batch_the_data_batch_is_suggested(tmp_path, fake_machine):
    fake_machine.update(available=1400 * MIB, step=STEP)
    cfg = compose_config("train", tiny("data.batch_size=8"), tmp_path)
    with pytest.raises(MemoryPreflightError, match=r"data.batch_size=2  \(per-device batch 2"):
        check_memory(cfg)


def test_weights_that_alone_do_not_fit_are_refused_before_any_probe(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight, "available_memory", lambda device: AvailableMemory(MIB, "test"))
    monkeypatch.setattr(preflight, "probe_step_memory", lambda cfg, plan: pytest.fail("the probe must not run"))
    cfg = compose_config("train", tiny(), tmp_path)
    with pytest.raises(MemoryPreflightError, match=r"weights and gradients of this model alone need"):
        check_memory(cfg)


def test_close_to_the_limit_warns(tmp_path, fake_machine, caplog):
    fake_machine.update(available=STEP.total(2) + MIB, step=STEP)
    cfg = compose_config("train", tiny("data.batch_size=2"), tmp_path)
    with caplog.at_level(logging.WARNING, logger="comer.app.preflight"):
        assert check_memory(cfg) is STEP
    assert "above 80% of it" in caplog.text


def test_the_check_can_be_skipped(tmp_path, fake_machine):
    fake_machine.update(available=MIB, step=STEP)
    cfg = compose_config("train", [*TINY_SYNTHETIC, "preflight.memory_check=false"], tmp_path)
    assert check_memory(cfg) is None and "plan" not in fake_machine


def test_a_fitting_config_passes_with_a_real_probe(tmp_path):
    """A tiny synthetic run (a 4-block ViT-CoMer), measured for real on this machine: every part is there."""
    cfg = compose_config("train", tiny(*SMALL_BACKBONE), tmp_path)
    step = check_memory(cfg)
    assert isinstance(step, StepMemory)
    assert step.gradients <= step.weights and step.optimizer_state >= 2 * step.gradients
    assert 0 < step.activations_per_sample < GIB and step.total(2) < 2 * GIB


def test_plan_reads_devices_nodes_and_precision(tmp_path):
    cfg = compose_config("train", ["task=ade20k", "trainer=cpu", "trainer.devices=2", "data.root=/nowhere"], tmp_path)
    plan = preflight.step_plan(cfg)
    assert plan == StepPlan(torch.device("cpu"), 8, (512, 512), "16-mixed", 2, 2) and plan.shares_memory
    assert preflight.autocast_dtype(plan.precision, plan.device) == torch.bfloat16  # Lightning's fp16 AMP on a CPU
