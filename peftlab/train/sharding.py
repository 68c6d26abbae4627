"""``system.sharding=fsdp``: the model sharded across processes with torch's FSDP2 (``fully_shard``).

What is sharded, and why this way:

* ``fully_shard`` is applied to every transformer block (the classes the model lists in
  ``_no_split_modules``, as Accelerate's and transformers' wrapping policies read them) and then
  to the root: each block's frozen weights are one communication group, all-gathered just before
  the block runs and freed after it, so a process holds 1/N of the frozen base plus one block.
* The method says how its trainable tensors live (:attr:`peftlab.methods.base.Method.sharding`):
  ``replicate`` (the adapters: LoRA, DoRA's magnitudes, SoRA's gates, SubLoRA's w) keeps them whole
  on every process, outside FSDP (``ignored_params``), as plain tensors whose gradients
  :meth:`Sharded.sync_grads` averages over the processes in one flat all-reduce before the
  method's ``before_clip`` hook, so every hook (proximal gate steps, importance, projections)
  sees the ordinary tensors it was written for and the adapter's optimizer state stays whole;
  ``shard`` (full fine-tuning) lets FSDP shard them with the base: parameters, gradients
  (reduce-scattered at every backward) and AdamW's moments are 1/N per process.
* Accelerate's own FSDP2 path (``FullyShardedDataParallelPlugin(fsdp_version=2)``) shards every
  parameter of a block in one group and takes ignored *modules*, not parameters, so it cannot
  keep SoRA's gates or SubLoRA's substituted tensors plain; the accelerator still provides the
  device, the process group, autocast and the reductions of the loop.

Numbers: the same global batches as one process (``EpochBatches``), gradients averaged as DDP
averages them, the optimizer built after sharding (over the sharded parameters where FSDP owns
them), so a run on N processes gives the losses of a 1-process run up to summation order
(tests/test_sharding.py). A single process (``peftlab train`` without a launcher) gets a
process group of one, so ``system.sharding=fsdp`` also runs alone.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from .. import checkpoints as ckpt
from ..errors import PeftlabError
from ..optim.schedule import build_scheduler
from ..runs import load_run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_CREATED: list[bool] = [False]  # whether this module made the current process group (a run of one process)


def ensure_process_group(device: torch.device) -> bool:
    """A process group to shard over: the launcher's (joined by the accelerator), or one of a single
    process. Returns whether it was created here (then :func:`release_process_group` ends it)."""
    if dist.is_available() and dist.is_initialized():
        return False
    if int(os.environ.get("WORLD_SIZE", "1") or 1) != 1:  # a launcher's group the accelerator did not join
        raise PeftlabError("system.sharding=fsdp: the launcher started several processes but no process group exists; "
                           "launch with torchrun or accelerate launch (docs/training.md#sharding).")
    cuda = device.type == "cuda"
    if cuda and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                            device_id=device if cuda else None)
    _CREATED[0] = True
    return True


def release_process_group() -> None:
    """End the single-process group :func:`ensure_process_group` made (a launcher's group is left alone)."""
    if _CREATED[0] and dist.is_initialized():
        dist.destroy_process_group()
    _CREATED[0] = False


def transformer_blocks(model: torch.nn.Module, setting: str = "system.sharding=fsdp",
                       instead: str = "system.sharding=none") -> list[torch.nn.Module]:
    """The repeated blocks of a transformers model (its ``_no_split_modules`` classes), outermost first;
    a model that declares none gets the children of its longest ``nn.ModuleList``."""
    inner = model
    for _ in range(4):  # wrappers (peft's PeftModel, SubLoRA's subspace model) lead to the transformers model
        if getattr(inner, "_no_split_modules", None) or not hasattr(inner, "get_base_model"):
            break
        inner = inner.get_base_model()
    names = set(getattr(inner, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if blocks:
        return [b for b in blocks if not any(o is not b and any(x is b for x in o.modules()) for o in blocks)]
    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    if not lists:
        raise PeftlabError(f"{setting} found no transformer blocks in {type(inner).__name__} (no _no_split_modules and no "
                           f"nn.ModuleList of layers); use {instead} for this model.")
    return list(max(lists, key=len))


@dataclass
class Sharded:
    """A model sharded with FSDP2, and what the loop needs of it."""

    model: torch.nn.Module
    world: int
    replicated: list[torch.nn.Parameter] = field(default_factory=list)
    blocks: int = 0

    def sync_grads(self) -> None:
        """Average the gradients of the replicated (adapter) tensors over the processes, in one flat
        all-reduce per dtype; FSDP has already reduce-scattered those of the sharded tensors."""
        if self.world == 1:
            return
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p in self.replicated:
            if p.grad is not None:
                by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in by_dtype.values():
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat.div_(self.world)
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()

    @property
    def sharded_trainables(self) -> bool:
        """Whether FSDP owns trainable tensors (full fine-tuning): then checkpoints are sharded (DCP)."""
        return any(p.requires_grad and is_sharded_tensor(p) for p in self.model.parameters())

    def _params(self, method, model) -> dict[str, torch.Tensor]:
        # what Method.model_state holds for a method with sharded trainables: the trainable parameters
        return {n: p for n, p in method.trainable_parameters(model)}

    def save(self, tmp, method, model, optimizer) -> bool:
        """Every process: its shards of the trainable tensors and of the optimizer state into checkpoint
        ``tmp`` (``model_state.dcp/``, ``optimizer.dcp/``); returns whether every tensor was finite."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        params = self._params(method, model)
        osd = get_optimizer_state_dict(model, _inner(optimizer))
        ckpt.write_sharded(tmp, {n: p.detach() for n, p in params.items()}, osd)
        return self.all_finite(params.values())

    def load(self, path, method, model, optimizer=None) -> None:
        """Every process: the trainable tensors (and, given ``optimizer``, its state) of a sharded checkpoint,
        in place, whatever the process count that wrote them (torch.distributed.checkpoint reshards)."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

        with torch.no_grad():
            ckpt.load_sharded(path, ckpt.SHARDED_MODEL, {n: p.detach() for n, p in self._params(method, model).items()})
        if optimizer is not None:
            inner = _inner(optimizer)
            osd = get_optimizer_state_dict(model, inner)  # creates the (lazy) AdamW state to load into
            ckpt.load_sharded(path, ckpt.SHARDED_OPTIMIZER, osd)
            set_optimizer_state_dict(model, inner, osd)

    def all_finite(self, tensors) -> bool:
        """Finite everywhere, over every process's shards (a collective)."""
        ok = torch.ones((), device=next(iter(self.model.parameters())).device)
        for t in tensors:
            local = t.to_local() if is_sharded_tensor(t) else t
            if local.is_floating_point() and not bool(torch.isfinite(local).all()):
                ok.zero_()
        if self.world > 1:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        return bool(ok.item())

    def summary(self) -> dict[str, Any]:
        from torch.distributed.tensor import DTensor

        sharded = sum(p.numel() for p in self.model.parameters() if isinstance(p, DTensor))
        local = sum(p.to_local().numel() for p in self.model.parameters() if isinstance(p, DTensor))
        return {"blocks": self.blocks, "sharded_params": sharded, "local_sharded_params": local,
                "replicated_params": sum(p.numel() for p in self.replicated)}


def shard(model: torch.nn.Module, method, device: torch.device, world: int) -> Sharded:
    """Apply ``fully_shard`` to every transformer block of ``model`` and to its root, in place.

    With ``method.sharding == "replicate"`` the method's :meth:`replicated_parameters` stay outside
    FSDP (whole, plain tensors on every process); with ``"shard"`` everything is sharded."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if method.sharding is None:  # the config check refuses it first; this guards other callers
        raise PeftlabError(f"system.sharding=fsdp does not support method={method.name}: {method.sharding_refusal}")
    mesh = init_device_mesh(device.type, (world,))
    replicated = list({id(p): p for p in method.replicated_parameters(model)}.values()) if method.sharding == "replicate" else []
    ignored = set(replicated)
    blocks = transformer_blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh, ignored_params=ignored)
    # the root reshards after forward too (torch's default keeps it gathered for the backward): after an
    # evaluation (a forward with no backward) every parameter is the sharded one the optimizer holds
    fully_shard(model, mesh=mesh, ignored_params=ignored, reshard_after_forward=True)
    for p in replicated:  # fully_shard does not move ignored parameters
        if p.device != device:
            p.data = p.data.to(device)
    return Sharded(model=model, world=world, replicated=replicated, blocks=len(blocks))


def whole_model(run_dir) -> torch.nn.Module:
    """The trained model of a sharded run, whole, in this process: rebuilt by ``load_run`` from its
    newest checkpoint (the final one, at the end of training), its sharded tensors read whole."""
    return load_run(run_dir, which="latest").model


def _inner(optimizer):
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def build_optimizer(method, model: torch.nn.Module, total_steps: int, training) -> tuple[torch.optim.Optimizer, Any]:
    """The method's optimizer and LR schedule over the sharded model's parameters (FSDP replaced the
    ones it shards by DTensors, so an optimizer built before sharding would hold stale tensors)."""
    optimizer = method.build_optimizer(model)
    return optimizer, build_scheduler(optimizer, total_steps, training)


def is_sharded_tensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


__all__ = ["Sharded", "shard", "build_optimizer", "ensure_process_group", "release_process_group", "transformer_blocks",
           "is_sharded_tensor"]
