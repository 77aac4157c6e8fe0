"""Fused LAMB (two passes) and LARS (one apply pass) kernels, compiled by ``torch.compile``
(Inductor's C++ backend on CPU): the fewest memory passes the algorithms allow.

LAMB cannot apply any part of an update before it knows the whole parameter's ``||u||``, so a
step is at least two passes. Per parameter (flat fp32 views ``w, g, m, v``), two variants:

* the gradient as workspace (``Lamb(grad_as_workspace=True)``, the default, and ``ChunkLamb``,
  whose gradient shards are consumed anyway): :func:`lamb_pass1_into_grad_` reads ``g, m, v, w``
  and writes ``m, v`` and ``d = -u`` (the update ``u = m_hat / (sqrt(v_hat) + eps) + wd * w``)
  into ``g``, returning ``[||w||^2, ||u||^2]``: the same 7 element accesses as fused AdamW, in
  one loop; pass 2 is then the native ``w += lr * ratio * d`` (``torch._foreach_addcmul_``
  over all tensors at once: 3 accesses, no compiled call, no recomputation);
* the gradient left intact (``grad_as_workspace=False``): :func:`lamb_pass1_` reads
  ``g, m, v, w`` and writes ``m, v`` only (6 accesses); :func:`lamb_pass2_` reads ``w, m, v``,
  recomputes ``u`` and writes ``w -= lr * ratio * u`` (4 accesses, one compiled call per
  tensor).

10 accesses per parameter either way, against 14 for the multi-tensor path of
:mod:`offload.trust` and 7 for fused AdamW; the first variant is faster (on a 2-core CPU: pass 2
as a plain axpy, no sqrt / division, half the compiled calls). LARS's apply
(:func:`lars_apply_fused_`) is one pass of 5 accesses (buffer, gradient and weight read, buffer
and weight written) where the ``_foreach_*`` path takes 11.

Why ``torch.compile`` and not hand-written code: Inductor generates the vectorised, OpenMP-parallel
C++ loop (and a Triton kernel on GPUs) from the few lines below, with no extension for users to
build; the compiled code is cached on disk (``TORCHINDUCTOR_CACHE_DIR``), so only the first
process pays the compile (tens of seconds on a small CPU; ``colossus bench optim`` reports it).
Shapes are dynamic (one graph for every tensor size, plus one for sizes up to 4096 where
Inductor picks a different reduction), so steps never recompile. The scalars (betas, bias
corrections, learning rate times trust ratio) are tensors, so schedules do not recompile either.
``realize_reads_threshold=0`` makes Inductor store ``m`` and ``v`` from the same loop that sums
``||u||^2`` (otherwise it emits a second loop that reads ``g, m, v`` again); the stored ``d`` is
the value that is also squared and summed (storing ``-u`` while summing ``u * u`` made Inductor
write ``u`` to a temporary and read it again in a second loop; generated code checked).

Tensors smaller than :data:`FUSED_MIN_NUMEL` stay on the multi-tensor path: a compiled call
costs tens of microseconds of Python dispatch, which for a bias is more than its memory time.

Example::

    >>> import torch
    >>> from offload.trust_fused import fused_available, lamb_hparams, lamb_bias_coefs
    >>> from offload.trust_fused import lamb_pass1_, lamb_pass2_, lamb_pass1_into_grad_
    >>> w, g = torch.ones(8), torch.full((8,), 0.5)
    >>> m, v = torch.zeros(8), torch.zeros(8)
    >>> if fused_available():
    ...     hp = lamb_hparams(0.9, 0.999, 1e-6, 0.0)
    ...     coef = lamb_bias_coefs(torch.ones(1), 0.9, 0.999)[0]
    ...     sq = lamb_pass1_(w, g, m, v, hp, coef)  # ||w||^2 = 8, ||u||^2 = 8 (u = 1)
    ...     lamb_pass2_(w, m, v, hp, coef, torch.tensor(0.5))  # lr * ratio = 0.5
    ...     ok = bool(torch.allclose(sq, torch.tensor([8.0, 8.0]))) and bool((w - 0.5).abs().max() < 1e-5)
    ...     # the same step with the gradient as workspace: g becomes d = -u, then a native axpy
    ...     w2, m2, v2 = torch.ones(8), torch.zeros(8), torch.zeros(8)
    ...     sq2 = lamb_pass1_into_grad_(w2, g, m2, v2, hp, coef)
    ...     _ = w2.add_(g, alpha=0.5)  # w += lr * ratio * d
    ...     ok = ok and bool(torch.allclose(sq2, sq)) and bool(torch.allclose(w2, w))
    ... else:
    ...     ok = True  # no C++ compiler: the optimizers use the multi-tensor path
    >>> ok
    True
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable

import torch

FUSED_MIN_NUMEL = 1 << 16
"""Tensors (or shard segments) with fewer elements use the multi-tensor path in ``auto`` and
``fused=True`` mode alike (per-call overhead beats their memory time)."""

_OPTIONS = {"realize_reads_threshold": 0}


# the kernels: plain tensor code that Inductor fuses; hp / c / scale are small tensors so that
# changing values never recompile
def _lamb_pass1(w, g, m, v, hp, c):
    # hp: beta1, 1 - beta1, beta2, 1 - beta2, eps, weight_decay, 1 / grad_scale
    # c: 1 / (1 - beta1^t), 1 / sqrt(1 - beta2^t)   (ones without bias correction)
    g = g * hp[6]
    m_new = m * hp[0] + g * hp[1]
    v_new = v * hp[2] + g * g * hp[3]
    u = (m_new * c[0]) / (v_new.sqrt() * c[1] + hp[4]) + hp[5] * w
    m.copy_(m_new)
    v.copy_(v_new)
    return torch.stack([(w * w).sum(), (u * u).sum()])


def _lamb_pass1_into_grad(w, g, m, v, hp, c):
    # pass 1 that also stores d = -u into the gradient (read just before in the same loop), so
    # pass 2 is a native axpy; the same 7 element accesses as fused AdamW
    # the gradient scale is folded into the coefficients (hp[7], hp[8]): one multiply and one
    # scalar load per vector less (the loop reloads every scalar after each store: the
    # compiler cannot rule out aliasing); ~5 % of this kernel on one core
    m_new = m * hp[0] + g * hp[7]
    v_new = v * hp[2] + g * g * hp[8]
    # d = -u is the only value both stored and reduced: Inductor then stores it from the loop
    # (with u stored as -u, it materialised u in a temporary and read it again for the norm)
    d = (m_new * c[0]) / (v_new.sqrt() * -c[1] - hp[4]) - hp[5] * w
    m.copy_(m_new)
    v.copy_(v_new)
    g.copy_(d)
    return torch.stack([(w * w).sum(), (d * d).sum()])


def _lamb_flat_pass1(w, g, m, v, rc):
    # the flat-buffer pass 1 (Lamb(flat=True)): w, g, m, v are [rows, block] (one parameter per
    # row), rc [rows, 8] the per-row coefficients b1, (1 - b1) / gs, b2, (1 - b2) / gs^2,
    # 1 / (1 - b1^t), -1 / sqrt(1 - b2^t), -eps, wd: the formulas of _lamb_pass1_into_grad.
    # Per-row scalars are also what keeps Inductor's loop two-dimensional: with per-group
    # scalars it collapsed the elementwise part into one 1-D loop that could not fuse with the
    # row sums, and emitted three loops (w read twice, d stored to a temporary and read back)
    r = [rc[:, k : k + 1] for k in range(8)]
    m_new = m * r[0] + g * r[1]
    v_new = v * r[2] + g * g * r[3]
    d = (m_new * r[4]) / (v_new.sqrt() * r[5] + r[6]) - r[7] * w
    m.copy_(m_new)
    v.copy_(v_new)
    g.copy_(d)
    return (w * w).sum(1), (d * d).sum(1)


def _lars_flat_apply(w, g, buf, rc):
    # the flat-buffer LARS apply (Lars(flat=True)): w, g, buf are [rows, block], rc [rows, 6]
    # the per-row scale (lr * ratio or ratio), weight decay, momentum, lr outside the buffer,
    # nesterov (0 / 1), gradient divisor (global-norm clipping; 1 without): _lars_apply's
    # formulas with the per-row scalars (the per-row loads keep Inductor's loop 2-D, as above)
    r = [rc[:, k : k + 1] for k in range(6)]
    d = r[0] * (g / r[5] + r[1] * w)
    b = buf * r[2] + d
    buf.copy_(b)
    w.sub_(r[3] * (b + r[4] * (d + r[2] * b - b)))


def _lamb_pass2(w, m, v, hp, c, scale):
    u = (m * c[0]) / (v.sqrt() * c[1] + hp[4]) + hp[5] * w
    w.sub_(scale * u)


def _lars_apply(w, g, buf, hp, scale):
    # hp: momentum, weight_decay, lr_outside, nesterov (0 / 1); scale = local lr (0-d)
    d = scale * (g + hp[1] * w)
    b = buf * hp[0] + d
    buf.copy_(b)
    w.sub_(hp[2] * (b + hp[3] * (d + hp[0] * b - b)))


class _Compiled:
    """The compiled kernels, built on first use; ``ok`` is None until tried, then whether the
    probe compiled and matched eager on this machine (a C++ compiler is needed)."""

    def __init__(self) -> None:
        self.ok: bool | None = None
        self.error: str | None = None
        self.compile_s = 0.0
        self.fns: dict[str, Callable] = {}
        self._lock = threading.Lock()
        self.flat: dict[str, bool] = {}  # flat kernel name -> compiled and checked
        self.flat_compile_s = 0.0

    def probe_flat(self, name: str) -> bool:
        """A flat-buffer kernel (``lamb1f``: :func:`lamb_flat_pass1_`, ``larsf``:
        :func:`lars_flat_apply_`), compiled and checked on first use only (only
        ``flat=True`` optimizers pay its compile time)."""
        if not self.probe():
            return False
        with self._lock:
            if name not in self.flat:
                t = time.perf_counter()
                fn = _lamb_flat_pass1 if name == "lamb1f" else _lars_flat_apply
                try:
                    compiled = torch.compile(fn, dynamic=True, fullgraph=True, options=_OPTIONS)
                    gen = torch.Generator().manual_seed(0)
                    # rows of at most 4096 (Inductor's reduction split), like the default
                    # block and the tests' blocks: one graph for all of them
                    k = 3 if name == "lamb1f" else 2
                    ts = [torch.rand(3, 1000, generator=gen) for _ in range(k + 1)]
                    if name == "lamb1f":
                        rc = [0.9, 0.1, 0.999, 0.001, 1.5, -1.2, -1e-6, 0.01]
                    else:
                        rc = [0.01, 1e-4, 0.9, 1.0, 1.0, 1.5]
                    rc = torch.tensor(rc).repeat(3, 1)
                    ref = [t.clone() for t in ts]
                    got, want = compiled(*ts, rc), fn(*ref, rc)
                    pairs = list(zip(ts, ref)) + (list(zip(got, want)) if got else [])
                    for a, b in pairs:
                        if not torch.allclose(a, b, rtol=1e-5, atol=1e-6):
                            raise RuntimeError("compiled flat kernel disagrees with eager")
                    self.fns[name] = compiled
                    self.flat[name] = True
                except Exception as e:  # the caller falls back to the per-tensor path
                    self.flat[name], self.error = False, f"{type(e).__name__}: {e}"
                self.flat_compile_s += time.perf_counter() - t
            return self.flat[name]

    def probe(self) -> bool:
        with self._lock:
            if self.ok is None:
                t = time.perf_counter()
                try:
                    for name, fn in (
                        ("lamb1", _lamb_pass1),
                        ("lamb1g", _lamb_pass1_into_grad),
                        ("lamb2", _lamb_pass2),
                        ("lars", _lars_apply),
                    ):
                        self.fns[name] = torch.compile(
                            fn, dynamic=True, fullgraph=True, options=_OPTIONS
                        )
                    self._check()
                    self.ok = True
                except Exception as e:  # any compile failure means: use the multi-tensor path
                    self.ok, self.error = False, f"{type(e).__name__}: {e}"
                self.compile_s = time.perf_counter() - t
            return self.ok

    def _check(self) -> None:
        # one size above Inductor's 4096 reduction split (the large tensors use that graph)
        n = FUSED_MIN_NUMEL + 3 if FUSED_MIN_NUMEL > 4096 else 4099
        gen = torch.Generator().manual_seed(0)
        w, g, m, v = (torch.rand(n, generator=gen) for _ in range(4))
        hp = lamb_hparams(0.9, 0.999, 1e-6, 0.01)
        c = torch.tensor([1.5, 1.2])
        ref = [t.clone() for t in (w, g, m, v)]
        sq = self.fns["lamb1"](w, g, m, v, hp, c)
        sq_ref = _lamb_pass1(*ref, hp, c)
        into = [t.clone() for t in (w, g, m, v)]
        into_ref = [t.clone() for t in into]
        sq_g = self.fns["lamb1g"](*into, hp, c)
        sq_g_ref = _lamb_pass1_into_grad(*into_ref, hp, c)
        self.fns["lamb2"](w, m, v, hp, c, torch.tensor(0.1))
        _lamb_pass2(ref[0], ref[2], ref[3], hp, c, torch.tensor(0.1))
        buf, buf_ref = torch.zeros(n), torch.zeros(n)
        lhp = torch.tensor([0.9, 1e-4, 1.0, 1.0])
        self.fns["lars"](w, g, buf, lhp, torch.tensor(0.01))
        _lars_apply(ref[0], ref[1], buf_ref, lhp, torch.tensor(0.01))
        pairs = [(sq, sq_ref), (w, ref[0]), (m, ref[2]), (v, ref[3]), (buf, buf_ref)]
        pairs += [(sq_g, sq_g_ref), *zip(into, into_ref)]
        for a, b in pairs:
            if not torch.allclose(a, b, rtol=1e-5, atol=1e-6):
                raise RuntimeError("compiled kernel disagrees with eager")


_KERNELS = _Compiled()
_warned = False


def fused_available(required: bool = False) -> bool:
    """Whether the compiled kernels work here (compiles them on the first call). ``required``
    (the user asked for ``fused=True``): raise when they do not; else warn once and return
    False, so the caller takes the multi-tensor path."""
    global _warned
    if _KERNELS.probe():
        return True
    msg = f"fused LAMB/LARS kernels did not compile ({_KERNELS.error})"
    if required:
        raise RuntimeError(msg + "; use fused=None or False for the multi-tensor path")
    if not _warned:
        _warned = True
        warnings.warn(msg + "; using the multi-tensor path", RuntimeWarning, stacklevel=3)
    return False


def compile_seconds() -> float:
    """Wall time the first :func:`fused_available` (and :func:`flat_available`) spent
    compiling and checking the kernels."""
    return _KERNELS.compile_s + _KERNELS.flat_compile_s


def flat_available(name: str = "lamb1f") -> bool:
    """Whether the flat-buffer kernel ``name`` works here (``lamb1f``: LAMB's pass 1,
    ``larsf``: LARS's apply; compiled and checked on the first call; False, with the reason in
    ``_KERNELS.error``, when not: the optimizers then take the per-tensor path)."""
    return _KERNELS.probe_flat(name)


def want_fused(fused: bool | None, device: torch.device) -> bool:
    """Resolve the ``fused`` option: None (auto) = on CPU when the kernels compile; True =
    required (error if they do not compile); False = never."""
    if fused is False:
        return False
    if fused is None and device.type != "cpu":  # only the CPU path is measured and tested
        return False
    return fused_available(required=fused is True)


def fusable(*ts: torch.Tensor) -> bool:
    """Tensors one fused call can take: plain (no tensor subclass such as DTensor), fp32,
    contiguous, at least :data:`FUSED_MIN_NUMEL` elements (and at least 2: Inductor
    specialises sizes 0 and 1)."""
    n = ts[0].numel()
    return n >= max(2, FUSED_MIN_NUMEL) and all(
        type(t) in (torch.Tensor, torch.nn.Parameter)
        and t.dtype == torch.float32
        and t.is_contiguous()
        for t in ts
    )


def lamb_hparams(
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    grad_scale: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The per-group scalars of the LAMB kernels as one tensor (gradients are divided by
    ``grad_scale``, a 0-d tensor, when given: global-norm pre-normalisation): beta1,
    1 - beta1, beta2, 1 - beta2, eps, weight decay, 1 / grad_scale, then for
    :func:`lamb_pass1_into_grad_` (1 - beta1) / grad_scale and (1 - beta2) / grad_scale^2."""
    hp = torch.tensor(
        [beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, weight_decay, 1.0, 1.0 - beta1, 1.0 - beta2],
        device=device,
    )
    if grad_scale is not None:
        inv = 1.0 / grad_scale
        hp[6] = inv
        hp[7] = (1.0 - beta1) * inv
        hp[8] = (1.0 - beta2) * inv * inv
    return hp


def lamb_bias_coefs(
    steps: torch.Tensor, beta1: float, beta2: float, bias_correction: bool = True
) -> torch.Tensor:
    """``[n, 2]``: ``1 / (1 - beta1^t)`` and ``1 / sqrt(1 - beta2^t)`` for each step count
    ``t`` in ``steps`` (counts after incrementing); ones without bias correction. Row ``i`` is
    the ``c`` argument of the kernels for tensor ``i``."""
    steps = steps.double()  # corrections in float64, as torch's fused AdamW computes them
    if not bias_correction:
        return torch.ones(len(steps), 2, device=steps.device)
    c1 = 1.0 / (1.0 - beta1**steps)
    c2 = (1.0 - beta2**steps).rsqrt()
    return torch.stack([c1, c2], 1).float()


def lamb_pass1_(w, g, m, v, hp, c) -> torch.Tensor:
    """Pass 1 on one flat tensor: moments updated in place; returns ``[||w||^2, ||u||^2]``."""
    return _KERNELS.fns["lamb1"](w.view(-1), g.view(-1), m.view(-1), v.view(-1), hp, c)


def lamb_pass1_into_grad_(w, g, m, v, hp, c) -> torch.Tensor:
    """Pass 1 that also overwrites the gradient with ``d = -u`` (the gradient is consumed):
    moments updated in place; returns ``[||w||^2, ||u||^2]``. Pass 2 is then the native
    ``w += lr * ratio * d`` (``torch._foreach_addcmul_``), 3 element accesses."""
    return _KERNELS.fns["lamb1g"](w.view(-1), g.view(-1), m.view(-1), v.view(-1), hp, c)


def lamb_flat_pass1_(
    w: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, rc: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1 over flat ``[rows, block]`` buffers (each row belongs to one parameter; ``rc``
    ``[rows, 8]``: the per-row coefficients, see ``colossus.optim.flat``): moments updated in
    place, ``d = -u`` stored into ``g``; returns the per-row sums ``||w||^2`` and ``||u||^2``.
    One loop over the rows (the row sums taken while storing; generated code checked)."""
    return _KERNELS.fns["lamb1f"](w, g, m, v, rc)


def lamb_pass2_(w, m, v, hp, c, scale: torch.Tensor) -> None:
    """Pass 2: ``w -= scale * u`` (``scale`` = learning rate times trust ratio, 0-d)."""
    _KERNELS.fns["lamb2"](w.view(-1), m.view(-1), v.view(-1), hp, c, scale)


def lars_hparams(
    momentum: float, weight_decay: float, lr_outside: float, nesterov: bool, device="cpu"
) -> torch.Tensor:
    """The per-group scalars of :func:`lars_apply_fused_`."""
    return torch.tensor(
        [momentum, weight_decay, lr_outside, float(nesterov)], device=device, dtype=torch.float32
    )


def lars_flat_apply_(w: torch.Tensor, g: torch.Tensor, buf: torch.Tensor, rc: torch.Tensor) -> None:
    """:func:`lars_apply_fused_` over flat ``[rows, block]`` buffers in one call, ``rc``
    ``[rows, 6]`` the per-row scale, weight decay, momentum, lr outside the buffer, nesterov and
    gradient divisor (``colossus.optim.lars``)."""
    _KERNELS.fns["larsf"](w, g, buf, rc)


def lars_apply_fused_(w, g, buf, hp, scale: torch.Tensor) -> None:
    """One pass: ``buf = momentum * buf + scale * (g + wd * w)``; ``w -= lr_outside * buf``
    (Nesterov: ``w -= lr_outside * (scale * (g + wd * w) + momentum * buf)``), as
    :func:`offload.trust.lars_apply_` with momentum."""
    _KERNELS.fns["lars"](w.view(-1), g.view(-1), buf.view(-1), hp, scale)
