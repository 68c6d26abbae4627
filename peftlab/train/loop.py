"""The training loop: one run from a resolved config to a finished run directory.

Read top to bottom, a batch goes: sampler -> collate -> device -> forward (autocast)
-> backward (no gradient sync until the last micro-batch of an accumulation window)
-> method.before_clip -> clip -> optimizer.step -> method.after_optimizer_step
-> scheduler.step -> zero_grad -> method.after_zero_grad. Everything that decides the numbers (model init,
dropout, data order) is seeded, and every piece of it is checkpointed, so a killed
run resumed from its last checkpoint ends with the same numbers as one never stopped.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch

from .. import checkpoints as ckpt
from ..build import best_metric, build, build_base
from ..data.batches import EpochBatches
from ..data.instruction import write_generations
from ..errors import PeftlabError
from ..evaluation import best_model_state, evaluate, make_test_dataset
from ..io import CsvLog, write_json
from ..models.hf import make_adapter_portable, set_label_names
from ..tracking import LOSS_COLUMNS, close_logger, gpu_memory_mb, peak_memory_mb, run_metadata, setup_logger
from . import fast, guards, quant_linear
from . import lock as run_lock
from . import sharding
from .checkpointing import TrainerState, copy_best, finish, prepare_run_dir, prune, repair_best
from .early_stop import judge
from .early_stop import summary as early_summary

# The long-format per-module log: one row per (step, module, metric); runs with different module sets stack.
MODULE_LOG_COLUMNS = ["step", "module", "metric", "value"]


def _device_choice(cfg) -> bool:
    """Return ``cpu`` flag for Accelerator, erroring if CUDA was asked for and is absent."""
    if cfg.system.device == "cuda" and not torch.cuda.is_available():
        raise PeftlabError("system.device=cuda but no CUDA GPU is visible; use --system.device=cpu or auto.")
    if cfg.system.dtype == "fp16" and (cfg.system.device == "cpu" or not torch.cuda.is_available()):
        raise PeftlabError("system.dtype=fp16 needs a CUDA GPU; on CPU use bf16 or fp32.")
    # auto without a GPU is CPU: Accelerator(cpu=True) is what joins a launcher's process group over gloo
    # (with cpu=False and no CUDA, accelerate ignores torchrun's WORLD_SIZE and each process runs alone)
    return cfg.system.device == "cpu" or (cfg.system.device == "auto" and not torch.cuda.is_available())


def _forget_other_precision(mp: str) -> None:
    """Let a second run in the same process choose its own mixed precision. accelerate keeps one
    process-wide ``AcceleratorState`` and refuses a new ``Accelerator`` whose ``mixed_precision`` differs
    from the first one's ("restart your runtime"), so a fp32 run followed by a bf16 run in one notebook or
    test session failed. Only that state is dropped (the earlier run is finished); the process group
    (``PartialState``) is kept."""
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if shared and shared.get("_mixed_precision") not in (None, mp):
        AcceleratorState._reset_state(reset_partial_state=False)


class Trainer:
    """Builds everything for one run and trains it; ``Trainer(cfg).run()`` returns results_final."""

    def __init__(self, cfg, console: bool = True):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        self.cfg = cfg
        t = cfg.training
        cpu = _device_choice(cfg)
        if cfg.system.num_threads:
            torch.set_num_threads(cfg.system.num_threads)
        mp = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[cfg.system.dtype]
        kwargs = {}
        if cfg.logging.report_to:
            kwargs["log_with"] = list(cfg.logging.report_to)
        _forget_other_precision(mp)
        self.accelerator = Accelerator(
            cpu=cpu, mixed_precision=mp, project_dir=cfg.output.dir,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)], **kwargs,
        )
        acc = self.accelerator
        self.rank, self.world = acc.process_index, acc.num_processes
        launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if launched != self.world:  # several processes racing on one run directory would corrupt it
            raise PeftlabError(
                f"The launcher started {launched} processes but they did not join one process group (this one sees "
                f"{self.world}, on {acc.device}); with system.device={cfg.system.device} check that every process can reach "
                "the device, or pass --system.device=cpu to train on CPU over gloo.")
        self.run_dir, self.resume_ckpt = prepare_run_dir(cfg) if acc.is_main_process else (Path(cfg.output.dir).expanduser(), None)
        acc.wait_for_everyone()
        if not acc.is_main_process and t.resume_from is not None:
            self.resume_ckpt = ckpt.resolve(t.resume_from, self.run_dir)
        self.log = setup_logger(self.run_dir, acc.is_main_process, console)
        self.console = console
        if acc.is_main_process:
            removed = ckpt.clean_partial(self.run_dir / "checkpoints")
            for p in removed:
                self.log.info(f"removed the leftovers of an interrupted checkpoint save: {p.name}")
        self._build()

    # ------------------------------------------------------------------ setup
    def _build(self) -> None:
        cfg, acc, log = self.cfg, self.accelerator, self.log
        t = cfg.training
        log.info(f"peftlab run {self.run_dir} | method={cfg.method} model={cfg.model.name} data={cfg.data.dataset} "
                 f"| {self.world} process(es) on {acc.device}, precision {cfg.system.dtype}")
        sharded = cfg.system.sharding != "none"
        self.sharded: Optional[sharding.Sharded] = None
        if sharded:
            sharding.ensure_process_group(acc.device)
        b = build(cfg, accelerator=acc, run_dir=self.run_dir, log=log, structure=self._resume_structure(), optimizer=not sharded)
        self.task, self.raw, self.num_labels = b.task, b.raw, b.num_labels
        self.tokenizer, self.model_info, self.method = b.tokenizer, b.model_info, b.method
        self.train_ds, self.val_ds, self.collate = b.train_ds, b.val_ds, b.collate
        self.batches = EpochBatches(len(self.train_ds), t.batch_size, t.seed, self.rank, self.world,
                                    lengths=b.train_lengths)
        self.micro_per_epoch, self.steps_per_epoch = b.plan.micro_per_epoch, b.plan.steps_per_epoch
        self.total_steps, self.num_epochs = b.plan.total_steps, b.plan.num_epochs
        info, model = self.model_info, b.model
        if self.task == "classification":

            set_label_names(model, self.raw.label_names)  # saved/merged models name their classes
        trainable, effective = self.method.param_counts(model)
        self.param_counts = {"trainable_params": trainable, "effective_params": effective, "total_params": info.num_params}
        log.info(f"trainable parameters: {trainable:,} ({100 * trainable / max(info.num_params, 1):.3f}% of {info.num_params:,})")
        self.scheduler = b.scheduler
        if not sharded:
            self.model, self.optimizer = acc.prepare(model, b.optimizer)
            self.model = fast.drop_output_upcast(acc, self.model, acc.device)
            self._speed_levers()
        else:  # the speed levers change how frozen weights are stored: before they are sharded
            self.model = model
            self._speed_levers()
            self.sharded = sharding.shard(model, self.method, acc.device, self.world)
            opt, self.scheduler = sharding.build_optimizer(self.method, model, self.total_steps, t)
            self.optimizer = acc.prepare(opt)
            log.info(f"system.sharding=fsdp: {self.sharded.blocks} transformer blocks and the root sharded over {self.world} process(es); "
                     + ", ".join(f"{k}={v:,}" for k, v in self.sharded.summary().items()))
        if cfg.system.compile:
            mode = None if cfg.system.compile_mode == "default" else cfg.system.compile_mode
            if cfg.system.compile_scope == "blocks":  # in place: the module tree, its names and the state dict stay as they are
                blocks = sharding.transformer_blocks(self.unwrapped(), "system.compile_scope=blocks", "system.compile_scope=model")
                for block in blocks:
                    block.compile(mode=mode)
                log.info(f"system.compile_scope=blocks: {len(blocks)} transformer blocks ({type(blocks[0]).__name__}) compiled in place")
            else:
                self.model = torch.compile(self.model, mode=mode)
        self.cudagraphs = bool(cfg.system.compile and cfg.system.compile_mode in ("reduce-overhead", "max-autotune")
                               and acc.device.type == "cuda")
        self.losses = fast.DeviceLosses()
        self.train_loss = None if sharded else fast.fused_lm_loss(self.unwrapped(), cfg.system.fused_cross_entropy, self.task, acc.device, self.world,
                                             cfg.system.compile and cfg.system.compile_scope == "model", autocast=acc.autocast,
                                             chunk_kernel=cfg.system.chunked_cross_entropy)
        if self.train_loss is not None:
            log.info(f"system.fused_cross_entropy={cfg.system.fused_cross_entropy}: LM-head linear + cross-entropy fused ({self.train_loss.kind})")
        self.prefetch = fast.prefetch_enabled(cfg.system.prefetch, acc.device)
        self.attention = fast.attention_context(cfg.system.attention_kernel, acc.device)
        self.gc = fast.GcControl(cfg.system.gc_control, acc.device, cfg.training.log_steps)
        self.state = TrainerState()
        self.loss_log = CsvLog(self.run_dir / "loss_log.csv", LOSS_COLUMNS)
        self.module_log = CsvLog(self.run_dir / "module_metrics.csv", MODULE_LOG_COLUMNS)
        wide = self.method.wide_module_log
        self.wide_log = CsvLog(self.run_dir / wide[0]) if wide else None
        self.memory_log = CsvLog(self.run_dir / "epoch_peak_memory.csv", ["epoch", "step", "peak_memory_mb", "memory_kind"])
        self.eval_log = CsvLog(self.run_dir / "eval_log.csv")  # one row per evaluation (epoch ends and eval_steps)
        self.state.world_size = self.world
        if self.resume_ckpt is not None:
            self._restore(self.resume_ckpt)
            trainable, effective = self.method.param_counts(self.unwrapped())
            self.param_counts.update(trainable_params=trainable, effective_params=effective)
        elif acc.is_main_process:
            for f in ("loss_log.csv", "module_metrics.csv", "epoch_peak_memory.csv", "eval_log.csv", "method.json", *(wide[:1] if wide else ())):
                (self.run_dir / f).unlink(missing_ok=True)
            if t.resume_from == "latest":
                log.info("resume_from=latest: no complete checkpoint found, starting from the beginning")
        if acc.is_main_process:
            meta = run_metadata(cfg, self.world)
            meta["_meta"].update(task=self.task, num_labels=self.num_labels, label_names=self.raw.label_names,
                                 base_model=self.model_info.source)
            cfg_path = self.run_dir / "config.json"
            if self.resume_ckpt is not None and cfg_path.is_file():
                # keep the provenance of the original start; record each resume beside it
                old = json.loads(cfg_path.read_text())
                for k in ("task", "num_labels", "label_names", "base_model"):  # a config.json restored from a checkpoint's copy
                    old.setdefault("_meta", {}).setdefault(k, meta["_meta"][k])  # lacks them; they are facts of this build
                old.setdefault("_meta", {}).setdefault("resumes", []).append(
                    {k: meta["_meta"][k] for k in ("versions", "git_commit", "command", "created", "host")}
                    | {"from_checkpoint": self.resume_ckpt.name})
                meta = old
            write_json(cfg_path, meta)
            write_json(self.run_dir / "method.json", self.method.structure(self.unwrapped()))
        if cfg.logging.report_to:
            flat = {f"{s}.{k}": v for s, sec in cfg.to_dict().items() if isinstance(sec, dict) for k, v in sec.items()}
            acc.init_trackers(cfg.logging.project, config={k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in flat.items()},
                              init_kwargs={"wandb": {"name": cfg.logging.run_name or self.run_dir.name}})

    def _speed_levers(self) -> None:
        """The GPU levers that change how the model is stored or computed (docs/gpu-speed.md); off on CPU by default."""
        cfg, acc, log = self.cfg, self.accelerator, self.log
        dt = fast.frozen_cast_dtype(cfg.system.frozen_weights, acc.device, cfg.system.dtype)
        if dt is not None:
            n = fast.cast_frozen_weights(self.unwrapped(), dt)
            if n:
                log.info(f"system.frozen_weights: {n:,} frozen matmul weights stored in {cfg.system.dtype} (the values autocast uses)")
        if quant_linear.quant_linear_enabled(cfg.system.quant_linear, acc.device):
            n = quant_linear.install_quant_linear(self.unwrapped())
            if n:
                log.info(f"system.quant_linear: {n} 4-bit linear layers computed by peftlab's forward (bitsandbytes' numbers)")
        if self.task == "causal_lm" and fast.pad_vocab_enabled(cfg.system.pad_vocab, acc.device):
            padded = fast.pad_lm_head(self.unwrapped())
            if padded:
                log.info(f"system.pad_vocab: LM head computed at {padded} columns (zero rows, sliced off) for aligned GPU matmuls")

    def unwrapped(self) -> torch.nn.Module:
        # accelerate's unwrap walks every module (about 1 ms on GPT-2); the loop asks several times a step,
        # so the answer is kept until self.model is replaced
        cached = self.__dict__.get("_unwrapped")
        if cached is not None and cached[0] is self.model:
            return cached[1]
        m = self.accelerator.unwrap_model(self.model)
        m = getattr(m, "_orig_mod", m)
        self._unwrapped = (self.model, m)
        return m

    def _loss(self, model, batch: dict) -> torch.Tensor:
        with self.accelerator.autocast():
            return model(**batch).loss

    def _batch(self, ds, idx: list[int]) -> dict:
        b = self.collate([ds[i] for i in idx])
        return {k: v.to(self.accelerator.device) for k, v in b.items()}

    def _resume_structure(self) -> Optional[dict]:
        """The method structure recorded in the checkpoint to resume (None: fresh start or older run)."""
        if self.resume_ckpt is None or not (self.resume_ckpt / "method.json").is_file():
            return None
        return json.loads((self.resume_ckpt / "method.json").read_text())

    # ------------------------------------------------------------ checkpoints
    def _restore(self, path: Path) -> None:
        data = ckpt.load(path, self.rank)
        if data["model_state"] is None:  # a sharded checkpoint (system.sharding=fsdp, sharded trainables)
            if self.sharded is None:
                raise PeftlabError(f"Checkpoint {path} is sharded (model_state.dcp/); resume it with system.sharding=fsdp.")
            self.sharded.load(path, self.method, self.unwrapped(), self.optimizer)
        else:
            self.method.load_model_state(self.unwrapped(), data["model_state"])
            self.optimizer.load_state_dict(data["optimizer"])
        self.scheduler.load_state_dict(data["scheduler"])
        self.method.load_state_dict(data["method_state"])
        if data["scaler"] is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(data["scaler"])
        st = dict(data["trainer_state"])
        rng = st.pop("rng")
        saved_world = st.get("world_size", 1)
        if saved_world != self.world:
            raise PeftlabError(
                f"Checkpoint {path} was written by {saved_world} process(es) but this run has {self.world}; the data position, "
                "schedule and RNG depend on it. Resume with the same number of processes."
            )
        ckpt.check_trainer_state(st, path, total_steps=self.total_steps, steps_per_epoch=self.steps_per_epoch)
        self.state = TrainerState(**st)
        if data["rng"] is None:
            raise PeftlabError(f"Checkpoint {path} has no RNG state for process {self.rank}; resume with the number of processes it was saved with.")
        ckpt.set_torch_rng_state(data["rng"])
        ckpt.set_python_rng_state(rng)
        if self.accelerator.is_main_process:
            repaired = repair_best(self.run_dir, self.state, self.best_metric()[0])
            if repaired is not None:
                self.log.info(f"restored best/ from {repaired.name} (an earlier run stopped before copying it)")
        if self.accelerator.is_main_process:
            self.loss_log.truncate_after(self.state.global_step)
            self.module_log.truncate_after(self.state.global_step)
            if self.wide_log is not None:
                self.wide_log.truncate_after(self.state.global_step)
            self.memory_log.truncate_after(self.state.global_step)
            self.eval_log.truncate_after(self.state.global_step)
        self.log.info(f"resumed from {path} at step {self.state.global_step} (epoch {self.state.epoch + 1}, step {self.state.step_in_epoch} of the epoch)")

    def save_checkpoint(self, name: str) -> Path:
        acc = self.accelerator
        root = self.run_dir / "checkpoints"
        final = root / name
        tmp = ckpt.tmp_dir_for(final)
        if acc.is_main_process:
            ckpt.begin(final)
        acc.wait_for_everyone()
        ckpt.write_rank_rng(tmp, self.rank)
        dcp = self.sharded is not None and self.sharded.sharded_trainables
        finite = self.sharded.save(tmp, self.method, self.unwrapped(), self.optimizer) if dcp else None  # every process
        acc.wait_for_everyone()
        if acc.is_main_process:
            ckpt.write_main(
                tmp, model_state=None if dcp else self.method.model_state(self.unwrapped()), optimizer=None if dcp else self.optimizer,
                scheduler=self.scheduler, method_state=self.method.state_dict(), trainer_state=self.state.to_dict(), scaler=acc.scaler,
                finite=finite,
            )
            try:
                write_json(tmp / "method.json", self.method.structure(self.unwrapped()))
                write_json(tmp / ckpt.CONFIG_FILE, self.cfg.to_dict())  # the identity travels with the checkpoint
            except PeftlabError:  # the disk filled up on these small files: give the partial save's space back too
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            ckpt.commit(tmp, final)

            prune(root, self.cfg.training.save_total_limit, self.cfg.output.keep_checkpoints)
        acc.wait_for_everyone()
        return final

    # ------------------------------------------------------------- evaluation
    def evaluate(self) -> dict[str, float]:
        acc = self.accelerator
        metrics = evaluate(self.model, self.val_ds, self.collate, self.cfg, self.task, self.num_labels, acc.device,
                           autocast=acc.autocast, rank=self.rank, world=self.world, reduce=acc.reduce,
                           lockstep=self.sharded is not None)
        guards.check_metrics(self, metrics)  # an infinite perplexity is a divergence, not a "completed" run
        return metrics

    def best_metric(self) -> tuple[str, bool]:
        return best_metric(self.cfg, self.task)

    # ------------------------------------------------------------------- loop
    def run(self) -> dict[str, Any]:
        """Train to the end (or resume to it) and return the results_final dict."""
        try:
            return self._run()
        finally:
            self.gc.close()  # Python's garbage collection as it was, also after an error

    def _run(self) -> dict[str, Any]:
        acc, cfg, t, st, log = self.accelerator, self.cfg, self.cfg.training, self.state, self.log
        done_file = self.run_dir / "results_final.json"
        if done_file.is_file() and (st.global_step >= self.total_steps or st.stopped_early
                                    or json.loads(done_file.read_text()).get("early_stopping", {}).get("stopped")):
            log.info(f"run already finished ({st.global_step} steps); nothing to do")
            return json.loads(done_file.read_text())
        best_name, higher = self.best_metric()
        log.info(f"training {self.total_steps} optimizer steps ({self.steps_per_epoch} per epoch, {self.num_epochs} epoch(s)); "
                 f"global batch {t.batch_size * self.world * t.gradient_accumulation_steps}")
        bar = None
        if acc.is_main_process and cfg.logging.progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.total_steps, initial=st.global_step, desc=f"{cfg.method}", dynamic_ncols=True, leave=self.console)
        model, opt, accum = self.model, self.optimizer, t.gradient_accumulation_steps
        model.train()
        t_start = time.time() - st.elapsed
        while st.global_step < self.total_steps and not st.stopped_early:
            e = st.epoch
            epoch_t0 = time.time() - st.epoch_elapsed
            stream = fast.device_batches(self.batches.epoch(e, start=st.step_in_epoch * accum),
                                         lambda idx: self.collate([self.train_ds[i] for i in idx]), acc.device, self.prefetch)
            while st.step_in_epoch < self.steps_per_epoch and st.global_step < self.total_steps:
                step_loss = torch.zeros((), device=acc.device)
                for m in range(accum):
                    batch = next(stream)
                    if self.cudagraphs:  # a new step: outputs of the previous graph replay may be overwritten
                        torch.compiler.cudagraph_mark_step_begin()
                    sync = m == accum - 1
                    with (contextlib.nullcontext() if sync or self.world == 1 else acc.no_sync(model)):
                        with self.attention():
                            loss = self._loss(model, batch) if self.train_loss is None else self.train_loss(batch)
                        extra = self.method.loss_extra(self.unwrapped())
                        total = loss if extra is None else loss + extra
                        acc.backward(total / accum)
                    step_loss += loss.detach().float() / accum
                if self.sharded is not None:  # the replicated adapter's gradients, averaged as DDP would
                    self.sharded.sync_grads()
                self.method.before_clip(self.unwrapped())
                if t.max_grad_norm is not None:
                    acc.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                fast.optimizer_step(opt)
                lr = self.scheduler.get_last_lr()[0]
                if not acc.optimizer_step_was_skipped:  # fp16: the scaler skipped a step with inf/nan grads
                    self.method.after_optimizer_step(self.unwrapped(), lr)
                    self.scheduler.step()
                opt.zero_grad(set_to_none=True)
                self.method.after_zero_grad(self.unwrapped())
                self.losses.append(acc.reduce(step_loss, "mean"))  # stays on the device until read below
                st.global_step += 1
                st.step_in_epoch += 1
                self.gc.step(st.global_step)
                st.elapsed = time.time() - t_start
                st.epoch_elapsed = time.time() - epoch_t0
                epoch_end = st.step_in_epoch == self.steps_per_epoch or st.global_step == self.total_steps
                saving = bool(t.save_steps and st.global_step % t.save_steps == 0)
                evaluating = bool(t.eval_steps and st.global_step % t.eval_steps == 0 and not epoch_end)
                if bar is not None:
                    bar.update(1)
                if st.global_step % t.log_steps == 0 or epoch_end or saving or evaluating:
                    loss_val = self._read_losses()  # the only host sync of the step, every log_steps
                    extra_metrics = self.method.step_metrics(self.unwrapped())
                    if bar is not None:
                        post = {"loss": f"{loss_val:.4f}", "lr": f"{lr:.2e}", "mem": f"{self._mem_mb():.0f}MB",
                                **self.method.progress_fields(extra_metrics)}
                        bar.set_postfix(post, refresh=False)
                    if st.global_step % t.log_steps == 0:
                        self._log_step(e, lr, extra_metrics)
                saved = self._eval_point(e, best_name, higher) if evaluating else False
                if saving and not epoch_end and not saved:
                    st.epoch_end = False
                    self.save_checkpoint(f"step-{st.global_step}")
                if st.stopped_early:
                    if not saved:  # the final state of the run, for load_run(which="final") and an exact record
                        st.epoch_end = False
                        self.save_checkpoint(f"step-{st.global_step}")
                    break
            if st.stopped_early:
                log.info(f"early stopping at step {st.global_step}: {st.evals_without_improvement} evaluations without an "
                         f"improvement of {best_name} (patience {t.early_stopping_patience}); best {best_name}={st.best_value:.4f} at step {st.best_step}")
                break
            self._end_epoch(e, time.time() - epoch_t0, best_name, higher)
        if bar is not None:
            bar.close()
        return self._finish(time.time() - t_start, best_name)

    def _read_losses(self) -> float:
        """Add the losses kept on the device to the running sums, in step order; return the last."""
        st, val = self.state, float("nan")
        values = list(self.losses.flush())
        guards.check_losses(self, values)  # non-finite loss or weights: stop naming the step, status diverged
        for val in values:
            st.epoch_loss_sum += val
            st.epoch_loss_count += 1
            st.window_loss_sum += val
            st.window_count += 1
        return val

    def _mem_mb(self) -> float:
        if self.accelerator.device.type == "cuda":
            return gpu_memory_mb()
        return peak_memory_mb("cpu")[0]

    def _log_step(self, epoch: int, lr: float, extra: dict) -> None:
        st = self.state
        mean = st.window_loss_sum / max(st.window_count, 1)
        st.window_loss_sum, st.window_count = 0.0, 0
        if self.accelerator.is_main_process:
            self.loss_log.write({"epoch": epoch + 1, "step": st.global_step, "train_loss": mean, "learning_rate": lr,
                                 "gpu_memory_mb": gpu_memory_mb(), "sparsity": extra.get("sparsity")})
            detail = self.method.module_metrics(self.unwrapped())
            if detail:
                for module, values in detail.items():
                    for metric, value in (values.items() if isinstance(values, dict) else [("value", values)]):
                        self.module_log.write({"step": st.global_step, "module": module, "metric": metric, "value": value})
                if self.wide_log is not None:
                    metric = self.method.wide_module_log[1]
                    self.wide_log.write({"epoch": epoch + 1, "step": st.global_step, f"overall_{metric}": extra.get(metric),
                                         **{m: v.get(metric) if isinstance(v, dict) else v for m, v in detail.items()}})
        if self.cfg.logging.report_to:
            self.accelerator.log({"train_loss": mean, "learning_rate": lr, **extra}, step=st.global_step)

    def _end_epoch(self, e: int, seconds: float, best_name: str, higher: bool) -> None:
        st, log, acc = self.state, self.log, self.accelerator
        metrics = self.evaluate()
        if self.cfg.data.eval_generate and acc.is_main_process:  # instruction data: readable generations each epoch
            write_generations(self.unwrapped(), self.tokenizer, self.val_ds, self.cfg, self.run_dir, e + 1)
        train_loss = st.epoch_loss_sum / max(st.epoch_loss_count, 1)
        trainable, effective = self.method.param_counts(self.unwrapped())
        self.param_counts.update(trainable_params=trainable, effective_params=effective)
        row = {"epoch": e + 1, "step": st.global_step, "train_loss": train_loss, **metrics, "epoch_time": seconds,
               "gpu_memory_mb": gpu_memory_mb(), "trainable_params": trainable, "effective_params": effective,
               **self.method.step_metrics(self.unwrapped())}
        for k, v in row.items():
            st.history.setdefault(k, []).append(v)
        shown = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())
        log.info(f"epoch {e + 1} summary: {shown}")
        if self.cfg.logging.report_to:
            acc.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=st.global_step)
        value = metrics[best_name]
        improved = self._judge(e, metrics, best_name, higher, "epoch")
        st.epoch += 1
        st.step_in_epoch = 0
        st.epoch_loss_sum, st.epoch_loss_count, st.epoch_elapsed = 0.0, 0, 0.0
        st.epoch_end = True
        if acc.is_main_process:
            write_json(self.run_dir / "training_history.json", st.history)
            peak, kind = peak_memory_mb(acc.device.type)
            st.peak_memory_mb = max(st.peak_memory_mb, peak)
            self.memory_log.write({"epoch": e + 1, "step": st.global_step, "peak_memory_mb": peak, "memory_kind": kind})
        if acc.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        path = self.save_checkpoint(f"epoch-{e + 1}")
        if improved and acc.is_main_process:
            best = self.run_dir / "best"
            copy_best(self.run_dir, path, row, best_name)
            log.info(f"new best {best_name}={value:.4f} at step {st.global_step} -> {best}")

    def _judge(self, e: int, metrics: dict, best_name: str, higher: bool, kind: str) -> bool:
        """Record one evaluation (best/, early stopping, eval_log.csv); return whether it is a new best."""

        st = self.state
        improved = judge(st, metrics[best_name], higher, self.cfg.training)
        st.last_eval = {"step": st.global_step, **metrics}
        if self.accelerator.is_main_process:
            self.eval_log.write({"epoch": e + 1, "step": st.global_step, "kind": kind, **metrics, "best_value": st.best_value,
                                 "best_step": st.best_step, "evals_without_improvement": st.evals_without_improvement})
        return improved

    def _eval_point(self, e: int, best_name: str, higher: bool) -> bool:
        """Evaluation every eval_steps inside an epoch; a new best is checkpointed and becomes best/.
        Returns whether a checkpoint was written at this step."""
        st, acc = self.state, self.accelerator
        metrics = self.evaluate()
        improved = self._judge(e, metrics, best_name, higher, "step")
        shown = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
        self.log.info(f"step {st.global_step} evaluation: {shown}")
        if self.cfg.logging.report_to:
            acc.log(metrics, step=st.global_step)
        if not improved:
            return False
        st.epoch_end = False
        path = self.save_checkpoint(f"step-{st.global_step}")
        if acc.is_main_process:
            copy_best(self.run_dir, path, {"epoch": e + 1, "step": st.global_step, **metrics}, best_name)
            self.log.info(f"new best {best_name}={st.best_value:.4f} at step {st.global_step} -> {self.run_dir / 'best'}")
        return True

    def _finish(self, wall: float, best_name: str) -> dict[str, Any]:
        acc, st = self.accelerator, self.state
        peak, kind = peak_memory_mb(acc.device.type)
        peak = max(peak, st.peak_memory_mb)

        last = {k: v[-1] for k, v in st.history.items()} if st.history else {}
        if st.last_eval and st.last_eval.get("step", -1) > last.get("step", -1):  # stopped early inside an epoch
            last.update({k: v for k, v in st.last_eval.items() if k.startswith("val_")})
        results = {
            "status": "completed",
            "method": self.cfg.method,
            "model": self.cfg.model.name,
            "dataset": self.cfg.data.dataset,
            "task": self.task,
            "seed": self.cfg.training.seed,
            "global_step": st.global_step,
            "epochs": st.epoch,
            "final": {k: v for k, v in last.items() if k.startswith("val_") or k == "train_loss"},
            "best": {"metric": best_name, "value": st.best_value, "step": st.best_step},
            "early_stopping": early_summary(st, self.cfg.training),
            **self.param_counts,
            "wall_time_s": st.elapsed,
            "peak_memory_mb": peak,
            "peak_memory_kind": kind,
            "world_size": self.world,
            "method_summary": self.method.summary(),
        }
        ms = results["method_summary"]
        if isinstance(ms, dict) and "overhead_s" in ms and st.elapsed > 0:
            # extra work a method did before training (e.g. BA-LoRA phases 1-3), relative to training time
            ms["overhead_fraction_of_training"] = ms["overhead_s"] / st.elapsed
        if acc.is_main_process:
            write_json(self.run_dir / "method.json", self.method.structure(self.unwrapped()))
            # sharded trainables (full fine-tuning under FSDP): exported whole from the final checkpoint
            whole = sharding.whole_model(self.run_dir) if self.sharded is not None and self.sharded.sharded_trainables else self.unwrapped()
            out = self.method.export(whole, self.run_dir, self.tokenizer)
            results["export"] = str(out)

            if self.model_info.builtin:
                self._save_base_model(out)
            base = self.run_dir / "base_model"
            make_adapter_portable(out, self.cfg, self.run_dir, base if base.is_dir() else None)
        acc.wait_for_everyone()
        test = self._evaluate_test()  # after the export: it loads best/'s weights into the model
        if test:
            results["test"] = test
        if acc.is_main_process and self.cfg.output.keep_checkpoints == "final_only":

            removed = finish(self.run_dir, "final_only", st.global_step)
            self.log.info(f"output.keep_checkpoints=final_only: removed {len(removed)} checkpoint(s)/best files; kept the final checkpoint and adapter")
        if acc.is_main_process:
            write_json(self.run_dir / "results_final.json", results)
            self.log.info(f"done in {st.elapsed:.1f}s: " + ", ".join(f"{k}={v:.4f}" for k, v in results["final"].items()) + f"; results in {self.run_dir}")
        if self.cfg.logging.report_to:
            acc.end_training()
        acc.wait_for_everyone()
        return results

    def _evaluate_test(self) -> Optional[dict]:
        """Once, at the end: the test split (if the task has one) with best/'s weights."""
        from safetensors.torch import load_file

        test_ds = make_test_dataset(self.raw, self.tokenizer, self.cfg, model=self.unwrapped())
        if test_ds is None or len(test_ds) == 0:
            return None
        state = best_model_state(self.run_dir)
        if state is None:
            self.log.info("test split present but no best checkpoint to evaluate; skipped")
            return None
        ckpt.verify(state.parent)  # best/ (or the checkpoint it points to) against its manifest, as every reader does
        if state.name == ckpt.SHARDED_MODEL:  # every process reads its shards
            self.sharded.load(state.parent, self.method, self.unwrapped())
        else:
            self.method.load_model_state(self.unwrapped(), load_file(str(state)))
        acc = self.accelerator
        metrics = evaluate(self.model, test_ds, self.collate, self.cfg, self.task, self.num_labels, acc.device, autocast=acc.autocast,
                           rank=self.rank, world=self.world, reduce=acc.reduce, prefix="test", cap=False,
                           lockstep=self.sharded is not None)
        out = {**metrics, "checkpoint": "best", "step": self.state.best_step, "examples": len(test_ds)}
        shown = ", ".join(f"{k.replace('test_', 'test ')}={v:.4f}" for k, v in metrics.items())
        if "test_accuracy" in metrics:
            self.log.info(f"Test accuracy: {metrics['test_accuracy']:.4f} ({len(test_ds)} test examples, best checkpoint of step {self.state.best_step}; {shown})")
        else:
            self.log.info(f"Test perplexity: {metrics['test_perplexity']:.4f} ({len(test_ds)} test blocks, best checkpoint of step {self.state.best_step}; {shown})")
        return out

    def _save_base_model(self, export_dir: Path) -> None:
        """Built-in tiny models have no hub copy: save the base so the adapter can be reloaded."""
        base = self.run_dir / "base_model"
        if not hasattr(self.unwrapped(), "get_base_model"):  # only adapters point at a base model
            return
        # Save the original (unadapted) weights of the base architecture.

        fresh, _, _ = build_base(self.cfg, self.task, self.num_labels)
        fresh.save_pretrained(base, safe_serialization=True)
        self.tokenizer.save_pretrained(base)
        # adapter_config.json names it relative to the run directory (make_adapter_portable, in _finish)


def train(cfg, console: bool = True) -> dict[str, Any]:
    """Train one run described by ``cfg`` and return its results_final dict."""
    try:
        trainer = Trainer(cfg, console=console)
        return trainer.run()
    finally:
        sharding.release_process_group()  # a single-process run's own group (system.sharding=fsdp)
        run_lock.release(Path(cfg.output.dir))
        close_logger()
