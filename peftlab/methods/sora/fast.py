"""SoRA's gate step for GPUs: every gate in one flat update on the device, no host synchronisation.

The per-gate step of :meth:`peftlab.methods.sora.method.SoRA.after_optimizer_step` runs about a dozen
small kernels per adapted module and reads ``isfinite(grad).all()`` back to the host for each
one: on GPT-2 (12 gates) that is some 150 kernel launches and 12 device synchronisations per
optimizer step, and each synchronisation drains the GPU queue the loop has built up.

:class:`FlatGateStep` does the same step on the concatenation of all gates: the gradients are
concatenated (one kernel), the Adam moments and step counts live in flat device tensors (the
per-gate ``exp_avg`` / ``exp_avg_sq`` the method keeps are views into them, so its state dict
is unchanged), and the result is copied back to the gate parameters in place with one
multi-tensor copy. A gate whose gradient holds a non-finite entry is left untouched, moments
and step count included, exactly as in the per-gate step; the decision is a device-side mask,
and the number of such skips per gate is counted on the device and read when the loop reads
its metrics (every ``training.log_steps``). The step counts are per entry (equal within a
gate) and the bias corrections ``1 - beta**k`` are computed on the device in float64.

``sora.fast_path`` chooses: ``auto`` (default) = on CUDA, off on the CPU (CPU runs keep their
numbers); ``on`` = everywhere; ``off`` = the per-gate step. Both compute the same function; in
float64 they agree to rounding (``tests/test_sora_fast.py``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch


def use_fast_path(setting: str, device) -> bool:
    """``sora.fast_path`` -> whether the flat gate step (and SDoRA's cached ``||W0||²``) is used on ``device``."""
    if setting == "on":
        return True
    if setting == "off":
        return False
    return torch.device(device).type == "cuda"


class FlatGateStep:
    """Adam on the gate gradients, then the proximal threshold, for all gates at once.

    Args:
        gates: the gate parameters (one per adapted module), all on one device with one dtype.
        states: per gate the method's Adam state ``{"step": int, "exp_avg": t, "exp_avg_sq": t}``;
            its tensors are replaced by views into the flat moments (same values), its ``step``
            is brought up to date by :meth:`sync_steps`.
    """

    def __init__(self, gates: list[torch.Tensor], states: list[dict[str, Any]]):
        if not gates or len(gates) != len(states):
            raise ValueError("FlatGateStep needs one Adam state per gate and at least one gate")
        p0 = gates[0]
        self.device, self.dtype = p0.device, p0.dtype
        self.gates, self.states = gates, states
        self.sizes = [g.numel() for g in gates]
        sizes = torch.tensor(self.sizes, device=self.device)
        self.seg = torch.repeat_interleave(torch.arange(len(gates), device=self.device), sizes)  # entry -> gate
        self.starts = [sum(self.sizes[:i]) for i in range(len(gates))]
        self.m = torch.cat([st["exp_avg"].detach().reshape(-1).to(self.device, self.dtype) for st in states])
        self.v = torch.cat([st["exp_avg_sq"].detach().reshape(-1).to(self.device, self.dtype) for st in states])
        self.k = torch.cat([torch.full((n,), float(st["step"]), dtype=torch.float64, device=self.device)
                            for n, st in zip(self.sizes, states)])
        for st, a, n in zip(states, self.starts, self.sizes):
            st["exp_avg"], st["exp_avg_sq"] = self.m[a:a + n].view_as(st["exp_avg"]), self.v[a:a + n].view_as(st["exp_avg_sq"])
        self.skipped = torch.zeros(len(gates), device=self.device)  # non-finite gate gradients since the last read
        self._present: dict[tuple[bool, ...], torch.Tensor] = {}

    @staticmethod
    def supports(gates: list[torch.Tensor]) -> bool:
        """One device and one floating dtype for every gate (else the per-gate step is used)."""
        return bool(gates) and len({(g.device, g.dtype) for g in gates}) == 1 and gates[0].is_floating_point()

    def matches(self, gates: list[torch.Tensor]) -> bool:
        return (len(gates) == len(self.gates) and all(a is b for a, b in zip(gates, self.gates))
                and gates[0].device == self.device and gates[0].dtype == self.dtype)

    def _present_mask(self, present: tuple[bool, ...]) -> torch.Tensor:
        mask = self._present.get(present)
        if mask is None:
            mask = torch.tensor(present, device=self.device)[self.seg]
            self._present[present] = mask
        return mask

    @torch.no_grad()
    def step(self, eta: float, tau: float, betas: tuple[float, float], eps: float, reference: bool) -> None:
        """One gate step: Adam with step size ``eta``, then soft-thresholding by ``tau`` (the public
        code's sequential thresholding with ``reference``). Gates without a gradient or with a
        non-finite one keep their values, moments and step counts."""
        b1, b2 = betas
        grads = [g.grad for g in self.gates]
        present = tuple(gr is not None for gr in grads)
        if not any(present):
            return
        grads = [gr if gr is not None else torch.zeros_like(p) for gr, p in zip(grads, self.gates)]
        g = torch.cat([gr.reshape(-1) for gr in grads]).to(self.dtype)
        p = torch.cat([x.detach().reshape(-1) for x in self.gates])
        bad = torch.zeros(len(self.gates), device=self.device).index_add_(0, self.seg, (~torch.isfinite(g)).float())
        ok_gate = bad == 0
        ok = ok_gate[self.seg]
        if not all(present):  # a missing gradient (zeros here) is finite: never counted as skipped
            ok = ok & self._present_mask(present)
        self.skipped.add_((bad > 0).float())
        m = torch.where(ok, self.m.mul(b1).add_(g, alpha=1 - b1), self.m)
        v = torch.where(ok, self.v.mul(b2).addcmul_(g, g, value=1 - b2), self.v)
        k = self.k + ok
        # bias corrections in float64 (as the per-gate step's Python floats); where k == 0 they are
        # zero and the quotients below are inf/nan, but those entries are masked out by ``ok``
        bc2 = (1 - torch.pow(b2, k)).to(self.dtype)
        step_size = (eta / (1 - torch.pow(b1, k))).to(self.dtype)
        denom = (v / bc2).sqrt_().add_(eps)
        new = torch.addcmul(p, m / denom, step_size, value=-1.0)  # p - eta / (1 - b1^k) * m / denom
        if tau > 0:
            if reference:  # t[t > tau] -= tau; t[t < -tau] += tau; t[|t| < tau] = 0, in sequence
                new = torch.where(new > tau, new - tau, new)
                new = torch.where(new < -tau, new + tau, new)
                new = torch.where(new.abs() < tau, torch.zeros_like(new), new)
            else:
                new = torch.sign(new) * (new.abs() - tau).clamp_min(0.0)
        new = torch.where(ok, new, p)
        self.m.copy_(m)
        self.v.copy_(v)
        self.k.copy_(k)
        torch._foreach_copy_([x.data.view(-1) for x in self.gates], list(new.split(self.sizes)))

    def sync_steps(self) -> None:
        """Write the device step counts into the per-gate states (one device read; for checkpoints)."""
        ks = self.k[torch.tensor(self.starts, device=self.device)].tolist()
        for st, k in zip(self.states, ks):
            st["step"] = int(k)

    def read_skipped(self) -> Optional[list[int]]:
        """Per gate, how many steps were skipped for a non-finite gradient since the last read (then reset);
        ``None`` when there were none. One device read."""
        counts = self.skipped.tolist()
        if not any(counts):
            return None
        self.skipped.zero_()
        return [int(c) for c in counts]
