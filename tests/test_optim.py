"""The run's optimizer: torch's AdamW loop by default (bitwise the seeds'), the fused kernel on request."""
import argparse

import torch

from util.optim import build_optimizer, use_fused


def _args(**kw):
    return argparse.Namespace(**{"sgd": False, "lr": 1e-2, "weight_decay": 1e-4, "fused_optimizer": True, **kw})


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g)) for shape in ((7, 5), (5,), (3, 4, 2))]


def _run(optimizer, params, steps, start=0):
    for i in range(start, start + steps):
        g = torch.Generator().manual_seed(100 + i)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        optimizer.step()


def test_fused_is_the_seeds_adamw_update_up_to_rounding():
    fused_params, loop_params = _params(), _params()
    fused = build_optimizer([{"params": fused_params[:2]}, {"params": fused_params[2:], "lr": 1e-3}], _args())
    loop = build_optimizer([{"params": loop_params[:2]}, {"params": loop_params[2:], "lr": 1e-3}],
                           _args(fused_optimizer=False))
    assert isinstance(fused, torch.optim.AdamW) and all(g["fused"] for g in fused.param_groups)
    assert not any(g["fused"] for g in loop.param_groups)
    _run(fused, fused_params, 5)
    _run(loop, loop_params, 5)
    for a, b, start in zip(fused_params, loop_params, _params()):  # the same update up to the last bit's rounding
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        assert (a - start).abs().min() > 1e-4  # five steps moved every entry


def test_resume_keeps_the_asked_implementation_bitwise():
    params = _params()
    straight = build_optimizer(params, _args())
    _run(straight, params, 4)
    resumed_params = _params()
    first = build_optimizer(resumed_params, _args())
    _run(first, resumed_params, 2)
    state = first.state_dict()
    second = build_optimizer(resumed_params, _args())
    second.load_state_dict(state)  # a checkpoint's groups replace the implementation ...
    use_fused(second, True)  # ... and main.py puts back the asked one
    assert all(g["fused"] for g in second.param_groups)
    _run(second, resumed_params, 2, start=2)
    for a, b in zip(params, resumed_params):
        assert torch.equal(a, b)


def test_a_default_loop_checkpoint_continues_fused_and_back():
    params = _params()
    loop = build_optimizer(params, _args(fused_optimizer=False))
    _run(loop, params, 2)
    fused = build_optimizer(params, _args())
    fused.load_state_dict(loop.state_dict())  # an official checkpoint: torch's default loop
    use_fused(fused, True)
    _run(fused, params, 1, start=2)
    assert fused.state[params[0]]["step"].dtype == torch.float32 and int(fused.state[params[0]]["step"]) == 3
    back = build_optimizer(params, _args(fused_optimizer=False))
    back.load_state_dict(fused.state_dict())
    use_fused(back, False)
    _run(back, params, 1, start=3)
    assert not any(g["fused"] for g in back.param_groups) and int(back.state[params[0]]["step"]) == 4


def test_sgd_is_untouched():
    opt = build_optimizer(_params(), _args(sgd=True))
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.9
    use_fused(opt, True)  # not an AdamW: nothing to switch
    assert not opt.param_groups[0].get("fused")


def test_fp16_scaler_skips_a_non_finite_step_in_both_implementations():
    results = []
    for fused in (True, False):
        params = [torch.nn.Parameter(torch.ones(4))]
        optimizer = build_optimizer(params, _args(fused_optimizer=fused))
        scaler = torch.amp.GradScaler("cpu")
        for factor in (float("inf"), 1.0):  # the first step overflows: skipped, the scale halves
            optimizer.zero_grad()
            scaler.scale(params[0].sum() * factor).backward()
            scaler.unscale_(optimizer)  # as engine.py does before clipping
            scaler.step(optimizer)
            scaler.update()
            if factor != 1.0:
                assert torch.equal(params[0].detach(), torch.ones(4)) and not optimizer.state[params[0]]
        assert int(optimizer.state[params[0]]["step"]) == 1 and scaler.get_scale() == 32768.0
        results.append(params[0].detach().clone())
    torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=0)


def test_default_is_the_official_loop_bitwise():
    import main
    args = main.get_args_parser().parse_args(["--lr", "1e-2"])
    assert args.fused_optimizer is False
    ours_params, official_params = _params(), _params()
    ours = build_optimizer(ours_params, args)
    official = torch.optim.AdamW(official_params, lr=1e-2, weight_decay=args.weight_decay)  # the seeds' call
    assert not any(g["fused"] for g in ours.param_groups)
    _run(ours, ours_params, 5)
    _run(official, official_params, 5)
    assert all(torch.equal(a, b) for a, b in zip(ours_params, official_params))
