import pytest
import torch

from comer.training.schedulers import poly_warmup_scheduler, step_warmup_scheduler


def _optimizer(*lrs):
    params = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs]
    return torch.optim.SGD(params, lr=lrs[0])


def _lrs_over(scheduler, optimizer, iters):
    """lr of every group as used by optimizer step 0..iters-1 (the scheduler steps after each)."""
    out = []
    for _ in range(iters):
        out.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    return out


def test_poly_with_linear_warmup_hand_computed():
    # base 0.01, max 100 iters, warm-up 10 iters ratio 0.1, power 1, min 0.
    opt = _optimizer(0.01)
    lrs = _lrs_over(poly_warmup_scheduler(opt, 100, power=1.0, min_lr=0.0, warmup_iters=10, warmup_ratio=0.1),
                    opt, 100)
    # it 0: regular 0.01; k = (1 - 0) * 0.9 = 0.9 -> 0.001
    assert lrs[0][0] == pytest.approx(0.001, rel=1e-12)
    # it 5: regular 0.01 * 0.95 = 0.0095; k = 0.5 * 0.9 = 0.45 -> 0.0095 * 0.55 = 0.005225
    assert lrs[5][0] == pytest.approx(0.005225, rel=1e-12)
    # it 10: warm-up over: 0.01 * 0.9 = 0.009
    assert lrs[10][0] == pytest.approx(0.009, rel=1e-12)
    # it 99: 0.01 * 0.01
    assert lrs[99][0] == pytest.approx(1e-4, rel=1e-12)


def test_poly_power_and_min_lr_per_group_absolute():
    # mmcv: lr = (base - min) * (1 - it/max)^power + min, min_lr absolute for every group.
    opt = _optimizer(0.02, 0.005)
    lrs = _lrs_over(poly_warmup_scheduler(opt, 40, power=0.9, min_lr=1e-4, warmup_iters=0), opt, 21)
    for it in (0, 7, 20):
        for g, base in enumerate((0.02, 0.005)):
            expected = (base - 1e-4) * (1 - it / 40) ** 0.9 + 1e-4
            assert lrs[it][g] == pytest.approx(expected, rel=1e-12)


def test_ade20k_recipe_values():
    # 160k iters, 1500 warm-up, ratio 1e-6, lr 6e-5.
    opt = _optimizer(6e-5)
    sched = poly_warmup_scheduler(opt, 160000, power=1.0, min_lr=0.0, warmup_iters=1500, warmup_ratio=1e-6)
    values = {}
    for it in range(1501):
        values[it] = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
    assert values[0] == pytest.approx(6e-5 * 1e-6, rel=1e-9)
    k = (1 - 750 / 1500) * (1 - 1e-6)
    assert values[750] == pytest.approx(6e-5 * (1 - 750 / 160000) * (1 - k), rel=1e-12)
    assert values[1500] == pytest.approx(6e-5 * (1 - 1500 / 160000), rel=1e-12)


def test_step_with_warmup_hand_computed():
    opt = _optimizer(0.1)
    lrs = _lrs_over(step_warmup_scheduler(opt, 100, milestones=[20, 50], gamma=0.1, warmup_iters=4,
                                          warmup_ratio=0.001), opt, 60)
    # it 2: k = 0.5 * 0.999 -> 0.1 * 0.5005
    assert lrs[2][0] == pytest.approx(0.05005, rel=1e-12)
    assert lrs[4][0] == pytest.approx(0.1, rel=1e-12)
    assert lrs[19][0] == pytest.approx(0.1, rel=1e-12)
    assert lrs[20][0] == pytest.approx(0.01, rel=1e-12)
    assert lrs[50][0] == pytest.approx(0.001, rel=1e-12)


def test_resume_restores_the_position():
    opt = _optimizer(0.01)
    sched = poly_warmup_scheduler(opt, 100, warmup_iters=10, warmup_ratio=0.1)
    _lrs_over(sched, opt, 30)
    state = sched.state_dict()
    opt2 = _optimizer(0.01)
    sched2 = poly_warmup_scheduler(opt2, 100, warmup_iters=10, warmup_ratio=0.1)
    sched2.load_state_dict(state)
    opt2.step()
    sched2.step()
    # after load + one step: iteration 31
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.01 * (1 - 31 / 100), rel=1e-12)


@pytest.mark.parametrize("factory, kwargs, match", [
    (poly_warmup_scheduler, dict(max_iters=float("inf")), "max_iters"),
    (poly_warmup_scheduler, dict(max_iters=10, warmup_ratio=0.0), "warmup_ratio"),
    (poly_warmup_scheduler, dict(max_iters=10, warmup_iters=-1), "warmup_iters"),
    (step_warmup_scheduler, dict(max_iters=10, milestones=[5, 3]), "milestones"),
    (step_warmup_scheduler, dict(max_iters=10, milestones=[12]), "milestones"),
])
def test_bad_arguments_are_named(factory, kwargs, match):
    with pytest.raises(ValueError, match=match):
        factory(_optimizer(0.1), **kwargs)
