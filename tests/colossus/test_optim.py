"""LAMB and LARS against float64 transcriptions of the papers' algorithms (written here, one
parameter at a time, no shared code with the optimizers), 50 steps on random problems, fp32 within
1e-6, every option toggled; LAMB against torch-optimizer's ``Lamb`` with its options matched.

The random problem: five parameters (a matrix, a zero-initialised matrix so the ``||w|| = 0``
convention is exercised, a 3-D tensor, a bias and a norm gain) in a decay and a no-decay group.
Gradients come from a least-squares loss on the fp32 parameters plus noise, so the trajectory is
a real optimisation; the reference gets the same gradients in float64."""

from __future__ import annotations

import math

import pytest
import torch

from colossus.optim import Lamb, Lars, param_groups

STEPS = 50
TOL = 1e-6
SHAPES = {"w1": (6, 5), "w0": (4, 3), "w3": (2, 3, 4), "bias": (5,), "norm": (7,)}
DECAY = ("w1", "w0", "w3")


def _err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest |got - ref| / (1 + |ref|): 1e-6 is fp32 rounding accumulated over 50 steps
    (absolute for entries below 1, relative above; torch.allclose(rtol=atol=1e-6) style)."""
    return ((got.detach().double() - ref).abs() / (1 + ref.abs())).max().item()


def _problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    params = {}
    for n, s in SHAPES.items():
        t = torch.randn(s, generator=g) * 0.5
        if n == "w0":
            t.zero_()
        if n == "norm":
            t = 1.0 + 0.1 * t
        params[n] = torch.nn.Parameter(t)
    targets = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    noise = [{n: torch.randn(s, generator=g) for n, s in SHAPES.items()} for _ in range(STEPS)]
    return params, targets, noise


def _grads(params, targets, noise, t, grad_scale=1.0):
    # gradient of 0.5 * ||w - target||^2, plus noise; varied scale across steps and params
    return {
        n: (grad_scale * (1 + (t % 3)) * ((p.detach() - targets[n]) + 0.3 * noise[t][n]))
        for n, p in params.items()
    }


def _groups(params, wd, exclude_adapt):
    return [
        {"params": [params[n] for n in DECAY], "weight_decay": wd},
        {
            "params": [params[n] for n in SHAPES if n not in DECAY],
            "weight_decay": 0.0,
            "exclude_from_adaptation": exclude_adapt,
        },
    ]


# ------------------------------------------------------------------------------ LAMB
def ref_lamb(w0, grads, lr, b1, b2, eps, wd, bc, phi_min, phi_max, trust_clip, excl, mgn):
    """LAMB, arXiv 1904.00962 Algorithm 2, in float64, parameter by parameter."""
    w = {n: t.double().clone() for n, t in w0.items()}
    m = {n: torch.zeros_like(t) for n, t in w.items()}
    v = {n: torch.zeros_like(t) for n, t in w.items()}
    for t, g in enumerate(grads, start=1):
        g = {n: x.double() for n, x in g.items()}
        if mgn is not None:
            total = math.sqrt(sum(float((x * x).sum()) for x in g.values()))
            g = {n: x / max(1.0, total / mgn) for n, x in g.items()}
        for n in w:
            decay = n in DECAY
            m[n] = b1 * m[n] + (1 - b1) * g[n]
            v[n] = b2 * v[n] + (1 - b2) * g[n] ** 2
            mh = m[n] / (1 - b1**t) if bc else m[n]
            vh = v[n] / (1 - b2**t) if bc else v[n]
            r = mh / (vh.sqrt() + eps)
            u = r + (wd if decay else 0.0) * w[n]
            wn, un = float(w[n].norm()), float(u.norm())
            phi = wn
            if phi_min is not None:
                phi = max(phi, phi_min)
            if phi_max is not None:
                phi = min(phi, phi_max)
            ratio = phi / un if wn > 0 and un > 0 else 1.0
            if trust_clip is not None:
                ratio = min(ratio, trust_clip)
            if not decay and excl:
                ratio = 1.0
            w[n] = w[n] - lr * ratio * u
    return w


LAMB_CASES = {
    "default": {},
    "no-bias-correction": {"bias_correction": False},
    "phi-max": {"phi_max": 1.0},
    "phi-min": {"phi_min": 3.0},
    "trust-clip": {"trust_clip": 0.8},
    "exclude-from-adaptation": {"exclude_adapt": True},
    "max-grad-norm": {"max_grad_norm": 2.0},
    "no-weight-decay": {"weight_decay": 0.0},
    "betas-eps": {"betas": (0.8, 0.99), "eps": 1e-4},
}


@pytest.fixture(params=["foreach", "fused"])
def fused(request, monkeypatch):
    """Both LAMB / LARS paths: ``fused`` runs the compiled kernels of offload.trust_fused on the
    tensors of at least 13 elements (w1, w3) and the multi-tensor path on the others, so the
    mixed bookkeeping is exercised too."""
    if request.param == "foreach":
        return False
    import offload.trust_fused as tf

    monkeypatch.setattr(tf, "FUSED_MIN_NUMEL", 13)
    return True


def _run_lamb(
    opts: dict,
    fused: bool | None = False,
    grad_as_workspace: bool = True,
    bucket: bool = False,
    out: list | None = None,
):
    """``bucket``: gradients are accumulated into the existing ``p.grad`` by backward after
    ``opt.zero_grad()`` instead of assigned; ``out`` receives the optimizer."""
    o = {"lr": 0.02, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 0.05, "fused": fused}
    o["grad_as_workspace"] = grad_as_workspace
    o.update(opts)
    excl = o.pop("exclude_adapt", False)
    params, targets, noise = _problem()
    w0 = {n: p.detach().clone() for n, p in params.items()}
    wd = o.pop("weight_decay")
    opt = Lamb(_groups(params, wd, excl), weight_decay=wd, **o)
    grads = []
    for t in range(STEPS):
        g = _grads(params, targets, noise, t)
        grads.append(g)
        for n, p in params.items():
            if bucket and p.grad is not None:  # a backward accumulating g into p.grad
                with torch.enable_grad():
                    (p * g[n]).sum().backward()
            else:
                p.grad = g[n].clone()
        opt.step()
        if bucket:
            opt.zero_grad(set_to_none=True)
    if out is not None:
        out.append(opt)
    if not grad_as_workspace and not bucket:  # the gradients are left as they were
        assert all(torch.equal(p.grad, grads[-1][n]) for n, p in params.items())
    if grad_as_workspace:  # the gradients were the workspace: no buffers of the optimizer's
        assert not opt._work
    elif fused:  # the compiled kernels took the large tensors: no workspace for them
        assert params["w1"] not in opt._work and params["bias"] in opt._work
    ref = ref_lamb(
        w0,
        grads,
        o["lr"],
        *o["betas"],
        o["eps"],
        wd,
        o.get("bias_correction", True),
        o.get("phi_min"),
        o.get("phi_max"),
        o.get("trust_clip"),
        excl,
        o.get("max_grad_norm"),
    )
    return params, ref


@pytest.mark.parametrize("grad_as_workspace", [True, False], ids=["grad-workspace", "keep-grad"])
@pytest.mark.parametrize("case", list(LAMB_CASES))
def test_lamb_matches_float64_paper(case, fused, grad_as_workspace):
    params, ref = _run_lamb(LAMB_CASES[case], fused, grad_as_workspace)
    moved = 0.0
    for n, p in params.items():
        err = _err(p, ref[n])
        assert err <= TOL, f"{case}: {n} differs by {err:.3g}"
        moved = max(moved, (ref[n] - _problem()[0][n].detach().double()).abs().max().item())
    assert moved > 0.1, "the problem should move the parameters"


def test_lamb_options_change_the_numbers():
    """Each option toggled is active on this problem (else the test above proves nothing)."""
    base, _ = _run_lamb({})
    for case, opts in LAMB_CASES.items():
        if case == "default":
            continue
        got, _ = _run_lamb(opts)
        diff = max((got[n] - base[n]).abs().max().item() for n in SHAPES)
        assert diff > 1e-4, f"option {case} changes nothing on the test problem"


@pytest.mark.parametrize("case", ["default", "no-weight-decay"])
def test_lamb_multi_tensor_fallback_matches_paper(case, monkeypatch):
    """The path without the fused kernel (bf16, devices without it) gives the same numbers."""
    import functools

    import colossus.optim.lamb as lamb_mod
    from offload.trust import lamb_direction_

    monkeypatch.setattr(
        lamb_mod, "lamb_direction_", functools.partial(lamb_direction_, fused=False)
    )
    params, ref = _run_lamb(LAMB_CASES[case])
    for n, p in params.items():
        err = _err(p, ref[n])
        assert err <= TOL, f"{n} differs by {err:.3g}"


@pytest.mark.parametrize("flat", [False, True], ids=["default", "flat"])
def test_lamb_matches_torch_optimizer(flat):
    """torch-optimizer's Lamb (debias=False, clamp_value=10, trust ratio for every parameter,
    decay on every parameter) is LAMB with bias_correction=False, phi_max=10."""
    import offload.trust_fused as tf

    torch_optimizer = pytest.importorskip("torch_optimizer")
    if flat and not tf.flat_available():
        pytest.skip(f"no compiled kernels here: {tf._KERNELS.error}")
    params, targets, noise = _problem()
    p2 = {n: torch.nn.Parameter(p.detach().clone()) for n, p in params.items()}
    ours = Lamb(
        list(params.values()),
        lr=0.02,
        weight_decay=0.05,
        bias_correction=False,
        phi_max=10.0,
        **(FLAT if flat else {}),
    )
    theirs = torch_optimizer.Lamb(
        list(p2.values()), lr=0.02, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.05,
        clamp_value=10, adam=False, debias=False,
    )  # fmt: skip
    for t in range(STEPS):
        g = _grads(params, targets, noise, t)
        for n in SHAPES:
            params[n].grad = g[n].clone()
            p2[n].grad = g[n].clone()
        ours.step()
        theirs.step()
    for n in SHAPES:
        err = _err(params[n], p2[n].detach().double())
        assert err <= TOL, f"{n}: {err:.3g} from torch-optimizer"


# ------------------------------------------------------------------------------ LAMB, flat buffers
FLAT = {"fused": True, "flat": True, "flat_block": 4}  # 4: parameters straddle and pad blocks


@pytest.fixture
def flat_kernel():
    import offload.trust_fused as tf

    if not (tf.flat_available() and tf.flat_available("larsf")):
        pytest.skip(f"no compiled kernels here: {tf._KERNELS.error}")


def _in_flat(fg, t: torch.Tensor, buf: torch.Tensor) -> bool:
    """Whether ``t``'s memory lies in the flat buffer ``buf`` of ``fg``."""
    lo = buf.data_ptr()
    return lo <= t.data_ptr() < lo + buf.numel() * buf.element_size()


@pytest.mark.parametrize(
    "case,bucket",
    [(c, True) for c in LAMB_CASES] + [("default", False), ("max-grad-norm", False)],
    ids=[*LAMB_CASES, "default-foreign-grads", "max-grad-norm-foreign-grads"],
)
def test_lamb_flat_matches_float64_paper(case, bucket, flat_kernel):
    """Every option on the flat-buffer path (one compiled pass 1 per group over [rows, 4]
    blocks), within the tolerance of the per-tensor paths; gradients accumulated into the
    zeroed buffer (bucket) or assigned as new tensors (copied into the buffer at the step)."""
    out: list = []
    params, ref = _run_lamb({**LAMB_CASES[case], **FLAT}, True, True, bucket=bucket, out=out)
    opt = out[0]
    assert len(opt._flat) == 2, "both groups should be in flat buffers"
    for fg in opt._flat.values():
        assert fg.current()
        for p in fg.params:
            assert _in_flat(fg, p, fg.w) and _in_flat(fg, opt.state[p]["exp_avg"], fg.m)
            assert p.grad is not None and _in_flat(fg, p.grad, fg.g)
        # the padding stays zero in every buffer
        mask = torch.ones(fg.w.numel(), dtype=torch.bool)
        for p, s in zip(fg.params, fg.starts):
            mask[s : s + p.numel()] = False
        for buf in (fg.w, fg.m, fg.v):
            assert mask.any() and not buf.view(-1)[mask].any()
    for n, p in params.items():
        err = _err(p, ref[n])
        assert err <= TOL, f"{case}: {n} differs by {err:.3g}"


def _flat_vs_per_tensor(mutate, steps: int = 6, cls=Lamb):
    """Run flat and per-tensor ``cls`` side by side on the test problem, calling
    ``mutate(t, params, opt)`` before each step; returns both parameter dicts and optimizers."""
    runs = []
    kw = {"lr": 0.02} if cls is Lamb else {"lr": 0.1, "momentum": 0.9, "trust_coefficient": 0.2}
    for opts in (FLAT, {"fused": False}):
        params, targets, noise = _problem()
        opt = cls(_groups(params, 0.05, False), weight_decay=0.05, **kw, **opts)
        for t in range(steps):
            g = _grads(params, targets, noise, t)
            for n, p in params.items():
                p.grad = g[n].clone()
            mutate(t, params, opt)
            opt.step()
        runs.append((params, opt))
    return runs


@pytest.mark.parametrize("cls", [Lamb, Lars])
def test_flat_skips_params_without_grad(cls, flat_kernel):
    """A parameter whose gradient is None at a step is skipped as on the per-tensor path: its
    state and weight are untouched (exactly), LAMB's step count does not advance."""
    seen = {}
    key = "exp_avg" if cls is Lamb else "momentum_buffer"

    def drop(t, params, opt):
        if t in (2, 3):
            params["w3"].grad = None
            params["bias"].grad = None
            if opt.flat:
                st = opt.state[params["w3"]]
                seen[t] = (params["w3"].detach().clone(), st[key].clone())
        elif t == 4 and opt.flat:
            st = opt.state[params["w3"]]
            assert torch.equal(params["w3"], seen[2][0])
            assert torch.equal(st[key], seen[2][1])

    (flat, fopt), (ref, ropt) = _flat_vs_per_tensor(drop, cls=cls)
    assert fopt._flat
    if cls is Lamb:
        assert fopt.state[flat["w3"]]["step"].item() == 4
    for n in SHAPES:
        assert _err(flat[n], ref[n].detach().double()) <= TOL, n
        for key in fopt._flat_keys:
            a, b = fopt.state[flat[n]][key], ropt.state[ref[n]][key]
            assert _err(a, b.double()) <= TOL, (n, key)


@pytest.mark.parametrize("cls", [Lamb, Lars])
def test_flat_rebuilds_when_storage_changes(cls, flat_kernel):
    """``p.data`` replaced (a parameter moved out of its slot): the step sees it and builds new
    buffers from the current values and moments instead of stepping on stale storage."""

    def move(t, params, opt):
        if t == 3:
            with torch.no_grad():
                params["w1"].data = params["w1"].data.clone()  # new storage, same values
                params["w1"].data.add_(0.01)  # and changed: the step must use this
        if t == 3 and opt.flat:
            assert not all(fg.current() for fg in opt._flat.values())

    (flat, fopt), (ref, _) = _flat_vs_per_tensor(move, cls=cls)
    assert all(fg.current() for fg in fopt._flat.values())
    for n in SHAPES:
        assert _err(flat[n], ref[n].detach().double()) <= TOL, n


def test_lamb_flat_state_dict(flat_kernel):
    """``state_dict`` is per parameter (exp_avg / exp_avg_sq views of the flat buffers), loads
    into a per-tensor LAMB and back; ``load_state_dict`` copies into the flat views (before the
    first step or after) instead of rebinding, and the runs continue identically."""
    import copy

    params, targets, noise = _problem()
    opt = Lamb(_groups(params, 0.05, False), lr=0.02, **FLAT)

    def step(ps, o, t):
        g = _grads(ps, targets, noise, t)
        for n, p in ps.items():
            p.grad = g[n].clone()
        o.step()

    for t in range(3):
        step(params, opt, t)
    sd = copy.deepcopy(opt.state_dict())
    assert sorted(sd["state"][0]) == ["exp_avg", "exp_avg_sq", "step"]
    assert sd["state"][0]["exp_avg"].shape == SHAPES["w1"]
    others = []
    for opts, before in ((FLAT, True), (FLAT, False), ({"fused": False}, True)):
        ps = {n: torch.nn.Parameter(p.detach().clone()) for n, p in params.items()}
        o = Lamb(_groups(ps, 0.05, False), lr=0.02, **opts)
        if not before:  # a first step builds the buffers, then the state is loaded over it
            for p in ps.values():
                p.grad = torch.zeros_like(p)
            o.step()
            with torch.no_grad():
                for n, p in ps.items():
                    p.copy_(params[n])
            fg_m = [fg.m for fg in o._flat.values()]
        o.load_state_dict(copy.deepcopy(sd))
        if not before:
            for fg in o._flat.values():
                assert any(fg.m is m for m in fg_m)
                for p in fg.params:
                    assert _in_flat(fg, o.state[p]["exp_avg_sq"], fg.v)
        others.append((ps, o))
    for t in range(3, 6):
        step(params, opt, t)
        for ps, o in others:
            step(ps, o, t)
    for ps, o in others:
        for n in SHAPES:
            assert _err(ps[n], params[n].detach().double()) <= TOL, n
            assert o.state[ps[n]]["step"].item() == 6


def test_lamb_flat_zero_grad_keeps_backward_in_the_bucket(flat_kernel):
    """After ``zero_grad(set_to_none=True)`` the gradients are zeroed views of the buffer and a
    real backward accumulates into them (no new gradient tensors); the same run without flat
    buffers gives the same weights."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 6), torch.randn(16, 2)
    runs = []
    for opts in (FLAT, {"fused": False}):
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
        opt = Lamb(param_groups(model, 0.01), lr=1e-2, **opts)
        for t in range(4):
            torch.nn.functional.mse_loss(model(x), y).backward()
            if opts is FLAT and t > 0:
                for fg in opt._flat.values():
                    assert all(_in_flat(fg, p.grad, fg.g) for p in fg.params)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if opts is FLAT:
                assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
        runs.append(model)
    for a, b in zip(runs[0].parameters(), runs[1].parameters()):
        assert _err(a, b.detach().double()) <= TOL


class _TwoHeads(torch.nn.Module):
    """A trunk and two heads; ``forward(x, head)`` uses one head only, so backward does not
    reach the other's parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = torch.nn.Linear(6, 5)
        self.heads = torch.nn.ModuleList(torch.nn.Linear(5, 2) for _ in range(2))

    def forward(self, x: torch.Tensor, head: int) -> torch.Tensor:
        return self.heads[head](torch.tanh(self.trunk(x)))


@pytest.mark.parametrize("set_to_none", [True, False], ids=["none", "zeros"])
@pytest.mark.parametrize("cls", [Lamb, Lars])
def test_flat_unreached_params_as_per_tensor(cls, set_to_none, flat_kernel):
    """A real backward that reaches one head only: after ``zero_grad(set_to_none=True)`` the
    flat path skips the other head (weights, moments and LAMB's step count exactly kept), as
    the per-tensor path does with its None gradients; after ``set_to_none=False`` both step
    it with a zero gradient (weight decay moves it). Same weights and state within 1e-6."""
    torch.manual_seed(0)
    x, y = torch.randn(16, 6), torch.randn(16, 2)
    kw = {"lr": 0.02} if cls is Lamb else {"lr": 0.1, "momentum": 0.9, "trust_coefficient": 0.2}
    runs = []
    for opts in (FLAT, {"fused": False}):
        torch.manual_seed(1)
        model = _TwoHeads()
        opt = cls(param_groups(model, 0.05, exclude_1d=False), weight_decay=0.05, **kw, **opts)
        for t in range(6):
            head = 0 if t in (0, 2, 3, 4) else 1  # head 1: steps 1 and 5
            if t == 3 and opts is FLAT:
                kept = model.heads[1].weight.detach().clone()
            torch.nn.functional.mse_loss(model(x, head), y).backward()
            opt.step()
            if t == 3 and opts is FLAT:
                moved = not torch.equal(model.heads[1].weight, kept)
                assert moved != set_to_none, "head 1 (unreached) stepped iff set_to_none=False"
            opt.zero_grad(set_to_none=set_to_none)
        if opts is FLAT:
            assert opt._flat, "the flat path should have run"
        runs.append((model, opt))
    (fm, fo), (rm, ro) = runs
    for (n, a), b in zip(fm.named_parameters(), rm.parameters()):
        assert _err(a, b.detach().double()) <= TOL, n
        for key in fo._flat_keys:
            assert _err(fo.state[a][key], ro.state[b][key].double()) <= TOL, (n, key)
        if cls is Lamb:
            assert fo.state[a]["step"].item() == ro.state[b]["step"].item(), n
    if cls is Lamb:
        assert fo.state[fm.heads[1].weight]["step"].item() == (
            2 if set_to_none else 5
        )  # step 0: None in both modes


def test_flat_rebuild_removes_the_old_hooks(flat_kernel):
    """A rebuilt flat group (``p.data`` moved) drops the old group's hooks: one hook per
    parameter stays registered."""
    model = torch.nn.Linear(4, 3)
    opt = Lamb(model.parameters(), lr=1e-2, **FLAT)
    for t in range(3):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        opt.zero_grad()
        if t == 0:
            with torch.no_grad():
                model.weight.data = model.weight.data.clone()
    assert len(opt._flat) == 1
    for p in model.parameters():
        assert len(p._post_accumulate_grad_hooks) == 1


def test_lamb_flat_needs_grad_workspace():
    with pytest.raises(ValueError, match="grad_as_workspace"):
        Lamb([torch.nn.Parameter(torch.ones(2))], flat=True, grad_as_workspace=False)


# ------------------------------------------------------------------------------ LARS
def ref_lars(w0, grads, lrs, mom, wd, eta, eps, nesterov, larc, inside, excl, mgn):
    """LARS, arXiv 1708.03888 Algorithm 1, in float64, parameter by parameter (plus the
    documented variants: Nesterov, LARC clipping, lr outside the momentum buffer)."""
    w = {n: t.double().clone() for n, t in w0.items()}
    buf = {n: torch.zeros_like(t) for n, t in w.items()}
    for t, g in enumerate(grads):
        lr = lrs[t]
        g = {n: x.double() for n, x in g.items()}
        if mgn is not None:
            total = math.sqrt(sum(float((x * x).sum()) for x in g.values()))
            g = {n: x / max(1.0, total / mgn) for n, x in g.items()}
        for n in w:
            decay = n in DECAY
            beta = wd if decay else 0.0
            wn, gn = float(w[n].norm()), float(g[n].norm())
            local = eta * wn / (gn + beta * wn + eps) if wn > 0 and gn > 0 else 1.0
            if larc:
                local = min(local / lr, 1.0)
            if not decay and excl:
                local = 1.0
            d = g[n] + beta * w[n]
            if inside:
                step_d, outer = lr * local * d, 1.0
            else:
                step_d, outer = local * d, lr
            if mom == 0:
                w[n] = w[n] - outer * step_d
                continue
            buf[n] = mom * buf[n] + step_d
            upd = step_d + mom * buf[n] if nesterov else buf[n]
            w[n] = w[n] - outer * upd
    return w


LARS_CASES = {
    "default": {},
    "nesterov": {"nesterov": True},
    "larc-clip": {"larc_clip": True},
    "lr-outside-momentum": {"lr_inside_momentum": False},
    "eps": {"eps": 0.5},
    "no-momentum": {"momentum": 0.0},
    "exclude-from-adaptation": {"exclude_adapt": True},
    "max-grad-norm": {"max_grad_norm": 2.0},
    "no-weight-decay": {"weight_decay": 0.0},
    "eta": {"trust_coefficient": 0.02},
}


def _lr_at(t: int) -> float:
    return 0.1 * (0.5 + 0.5 * math.cos(math.pi * t / STEPS))  # a schedule: the lr changes


def _run_lars(opts: dict, fused: bool | None = False, bucket: bool = False, out=None):
    """``bucket`` / ``out``: as in :func:`_run_lamb`."""
    o = {"momentum": 0.9, "weight_decay": 5e-3, "trust_coefficient": 0.2, "eps": 0.0}
    o["fused"] = fused
    o.update(opts)
    excl = o.pop("exclude_adapt", False)
    params, targets, noise = _problem(1)
    w0 = {n: p.detach().clone() for n, p in params.items()}
    wd = o.pop("weight_decay")
    opt = Lars(_groups(params, wd, excl), lr=_lr_at(0), weight_decay=wd, **o)
    grads = []
    for t in range(STEPS):
        g = _grads(params, targets, noise, t)
        grads.append(g)
        for n, p in params.items():
            if bucket and p.grad is not None:  # a backward accumulating g into p.grad
                with torch.enable_grad():
                    (p * g[n]).sum().backward()
            else:
                p.grad = g[n].clone()
        for group in opt.param_groups:
            group["lr"] = _lr_at(t)
        opt.step()
        if bucket:
            opt.zero_grad(set_to_none=True)
    if out is not None:
        out.append(opt)
    ref = ref_lars(
        w0,
        grads,
        [_lr_at(t) for t in range(STEPS)],
        o["momentum"],
        wd,
        o["trust_coefficient"],
        o["eps"],
        o.get("nesterov", False),
        o.get("larc_clip", False),
        o.get("lr_inside_momentum", True),
        excl,
        o.get("max_grad_norm"),
    )
    return params, ref, w0


@pytest.mark.parametrize("case", list(LARS_CASES))
def test_lars_matches_float64_paper(case, fused):
    params, ref, w0 = _run_lars(LARS_CASES[case], fused)
    for n, p in params.items():
        err = _err(p, ref[n])
        assert err <= TOL, f"{case}: {n} differs by {err:.3g}"
    moved = max((ref[n] - w0[n].double()).abs().max().item() for n in SHAPES)
    assert moved > 0.05, "the problem should move the parameters"


@pytest.mark.parametrize(
    "case,bucket",
    [(c, True) for c in LARS_CASES] + [("default", False), ("max-grad-norm", False)],
    ids=[*LARS_CASES, "default-foreign-grads", "max-grad-norm-foreign-grads"],
)
def test_lars_flat_matches_float64_paper(case, bucket):
    """Every option on the flat-buffer LARS path (one compiled apply per group over [rows, 4]
    blocks; momentum 0 takes the per-tensor path), gradients into the bucket or assigned."""
    import offload.trust_fused as tf

    if not tf.flat_available("larsf"):
        pytest.skip(f"no compiled kernels here: {tf._KERNELS.error}")
    out: list = []
    params, ref, w0 = _run_lars({**LARS_CASES[case], **FLAT}, True, bucket=bucket, out=out)
    opt = out[0]
    flat = LARS_CASES[case].get("momentum", 0.9) > 0
    assert len(opt._flat) == (2 if flat else 0)
    for fg in opt._flat.values():
        for p in fg.params:
            assert _in_flat(fg, p, fg.w) and _in_flat(fg, p.grad, fg.g)
            assert _in_flat(fg, opt.state[p]["momentum_buffer"], fg.bufs["momentum_buffer"])
    for n, p in params.items():
        err = _err(p, ref[n])
        assert err <= TOL, f"{case}: {n} differs by {err:.3g}"


def test_lars_options_change_the_numbers():
    base, _, _ = _run_lars({})
    for case, opts in LARS_CASES.items():
        if case == "default":
            continue
        got, _, _ = _run_lars(opts)
        diff = max((got[n] - base[n]).abs().max().item() for n in SHAPES)
        assert diff > 1e-5, f"option {case} changes nothing on the test problem"


# ------------------------------------------------------------------------------ plumbing
def test_norm_reducer_called_once_per_step_with_all_columns():
    import offload.trust_fused as tf

    params, targets, noise = _problem()
    calls = []

    def reducer(sq, columns):
        calls.append((tuple(sq.shape), len(columns)))

    opts = [
        Lamb(_groups(params, 0.01, True), lr=1e-3, norm_reducer=reducer),
        Lars(_groups(params, 0.01, True), lr=1e-3, norm_reducer=reducer),
    ]
    if tf.flat_available():
        opts.append(Lamb(_groups(params, 0.01, True), lr=1e-3, norm_reducer=reducer, **FLAT))
    for opt in opts:
        calls.clear()
        for t in range(3):
            g = _grads(params, targets, noise, t)
            for n, p in params.items():
                p.grad = g[n]
            opt.step()
        assert calls == [((2, len(SHAPES)), len(SHAPES))] * 3, calls


def test_fused_kernels_do_not_recompile(monkeypatch):
    """Steps with new step counts, learning rates, grad-norm scales and tensor sizes run the
    kernels compiled before: sizes are dynamic and every scalar is a tensor (dynamo's counter
    of compiled graphs stays put after the first steps)."""
    from torch._dynamo.utils import counters

    import offload.trust_fused as tf

    monkeypatch.setattr(tf, "FUSED_MIN_NUMEL", 13)
    if not tf.fused_available():
        pytest.skip(f"no compiled kernels here: {tf._KERNELS.error}")
    g = torch.Generator().manual_seed(0)
    shapes = [(6, 5), (2, 3, 4), (50, 100), (300, 250), (7,)]
    runs = []
    flat = {"max_grad_norm": 1.0, "flat": True, "flat_block": 64}
    for cls, kw in ((Lamb, {"max_grad_norm": 1.0}), (Lars, {"momentum": 0.9}), (Lamb, flat)):
        ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in shapes]
        runs.append((cls(ps, lr=1e-2, fused=True, **kw), ps))
    seen = []
    for t in range(8):
        if t == 2:
            seen = dict(counters["stats"])
        for opt, ps in runs:
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g) * (1 + t)
            opt.param_groups[0]["lr"] *= 0.9  # a schedule
            opt.step()
    assert seen and seen["unique_graphs"] > 0
    assert dict(counters["stats"])["unique_graphs"] == seen["unique_graphs"]


def test_schema_fused_option():
    from colossus import TrainingConfig
    from colossus.optim import build_optimizer

    for name in ("lamb", "lars"):
        cfg = TrainingConfig().with_overrides([f"optim.name={name}", "optim.fused=false"])
        opt = build_optimizer(torch.nn.Linear(4, 4), cfg.optim, torch.device("cpu"))
        assert opt.fused is False
    assert TrainingConfig().with_overrides(["optim.name=lamb"]).optim.fused is None


def test_param_groups_by_name():
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(
        BertConfig(
            vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=32, max_position_embeddings=16,
        )
    )  # fmt: skip
    dec, nodec = param_groups(model, 0.01)
    assert all(p.ndim >= 2 for p in dec["params"])
    assert any("LayerNorm" in n for n in nodec["names"]) and any(
        "bias" in n for n in nodec["names"]
    )
    assert "bert.embeddings.word_embeddings.weight" in dec["names"]
    assert nodec["weight_decay"] == 0.0 and nodec["exclude_from_adaptation"] is True
    dec2, nodec2 = param_groups(model, 0.01, exclude=("bias", "norm", "emb"))
    assert "bert.embeddings.word_embeddings.weight" in nodec2["names"]
    assert len(dec2["params"]) < len(dec["params"])


def test_bad_options_are_errors():
    p = [torch.nn.Parameter(torch.ones(2))]
    with pytest.raises(ValueError, match="betas"):
        Lamb(p, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="nesterov"):
        Lars(p, momentum=0.0, nesterov=True)
    with pytest.raises(ValueError, match="lr > 0"):
        Lars(p, lr=0.0)


# ------------------------------------------------------------------------------ schema + Trainer
def test_schema_names_and_option_errors():
    from colossus import ConfigError, TrainingConfig

    cfg = TrainingConfig().with_overrides(["optim.name=lamb", "optim.phi_max=10"])
    assert (cfg.optim.resolved_eps, cfg.optim.resolved_betas) == (1e-6, (0.9, 0.999))
    assert TrainingConfig().optim.resolved_betas == (0.9, 0.95)  # adamw unchanged
    with pytest.raises(ConfigError, match="optim.momentum applies to lars only"):
        TrainingConfig().with_overrides(["optim.name=lamb", "optim.momentum=0.5"])
    with pytest.raises(ConfigError, match="optim.phi_max applies to lamb only"):
        TrainingConfig.from_dict({"optim": {"name": "lars", "phi_max": 3.0}})
    with pytest.raises(ConfigError, match="optim.name"):
        TrainingConfig().with_overrides(["optim.name=sgd"])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lamb", "lars"])
def test_trainer_chunk_equals_none(name, tmp_path):
    """The same run under strategy none and strategy chunk (parameters straddling chunks, one
    process): same losses; ``optim.exclude`` decides decay in both (``emb`` added here)."""
    from conftest import tiny_gpt2, token_blocks

    from colossus import Trainer, TrainingConfig

    optim = {"name": name, "lr": 3e-3 if name == "lamb" else 0.5, "exclude": ["bias", "ln_", "wpe"]}
    if name == "lars":
        optim["trust_coefficient"] = 0.02
    losses = {}
    for strat in ("none", "chunk"):
        cfg = TrainingConfig(
            name="o",
            optim=optim,
            schedule={"name": "constant"},
            strategy={"name": strat, "chunk": {"chunk_size": 1500}}
            if strat == "chunk"
            else {"name": "none"},
            train={"max_steps": 6, "batch_size": 4, "run_dir": str(tmp_path / strat), "seed": 0},
            checkpoint={"save_final": False},
            logging={"progress": False, "plot": False},
        )
        tr = Trainer(tiny_gpt2(), cfg, train_dataset=token_blocks())
        if strat == "chunk":
            no_decay = {s.name for c in tr.strategy.mgr.chunks if not c.decay for s in c.slots}
            assert "transformer.wpe.weight" in no_decay and "transformer.wte.weight" not in no_decay
            assert type(tr.optimizer).__name__ == f"Chunk{name.capitalize()}"
        else:
            assert type(tr.optimizer).__name__ == name.capitalize()
        tr.train()
        losses[strat] = [
            r["loss"]
            for r in map(__import__("json").loads, (tmp_path / strat / "metrics.jsonl").open())
            if "loss" in r
        ]
    assert len(losses["none"]) == 6
    assert max(abs(a - b) for a, b in zip(losses["none"], losses["chunk"])) <= 1e-5
