"""The training loop the CLI and the demo use: sequential freezing, DDP, AMP, distillation, resume.

    history = lrd.finetune(model, train_set, test_set, epochs=3, lr=0.01, schedule="rotate")
    print(history)

One loop (`Run`) drives both verbs; a `Task` says what a step trains on and how a run is scored:
`finetune` fits labelled data (`_Labelled`, here), `lrd.distill` fits a teacher's outputs on
unlabeled batches (lrdaccel.training.distill).

Launched under `torchrun`, it joins the process group (gloo on CPU, NCCL on GPU), shards the data
with DistributedSampler and wraps the model in DistributedDataParallel, re-wrapped at each phase
switch by `SequentialFreezer.wrap_ddp` (see lrdaccel.training.distributed for why).

Resume is exact. A checkpoint (lrdaccel.training.checkpoint) holds the model, optimizer, LR
scheduler, grad scaler, freezer, every rank's RNG states, the position (epoch, batch, step, the
epoch's running loss) and the history so far. The data order of an epoch is a function of
(seed, epoch) alone, so a resumed run skips the batches already done and then sees exactly what
the uninterrupted run saw: on CPU the two end bitwise equal.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import Dataset, DistributedSampler
from tqdm.auto import tqdm

from lrdaccel._modules import check_real_weights, unwrap
from lrdaccel._settings import parse_device, resolve
from lrdaccel.training.checkpoint import (
    CHECKPOINT_NAME,
    check_same_run,
    read_checkpoint,
    rng_state,
    seed_everything,
    set_rng_state,
    write_checkpoint,
)
from lrdaccel.training.config import RESUME_FREE, FinetuneConfig
from lrdaccel.training.distributed import all_sum, default_device, process_group, rank_and_world
from lrdaccel.training.freezer import SequentialFreezer
from lrdaccel.training.history import EpochRecord, History
from lrdaccel.measure.timer import synchronize
from lrdaccel.training.task import LabelledTask, Task, amp_dtype, needs_grad_scaler


def finetune(model: nn.Module, train_data: Dataset, eval_data: Dataset | None = None,
             config: FinetuneConfig | None = None, *, teacher: nn.Module | None = None,
             transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
             device: str | torch.device | None = None, progress: bool = True, **settings) -> History:
    """Fine-tune a (decomposed) classifier in place and return its per-epoch history.

    Args:
        model: maps an input batch to logits (a tensor, or an output with `.logits`).
        train_data, eval_data: datasets of (input, label) pairs, e.g. from `lrdaccel.data.load`.
        config: a FinetuneConfig; keyword `settings` override its fields (epochs=3, lr=0.1, ...).
        teacher: the original model, for knowledge distillation (KL on temperature-softened
            logits, weighted by alpha, plus the task loss); never updated. Without labels, see
            `lrd.distill`.
        transform: applied to each input batch on the device (e.g. `lrdaccel.data.normalize`).
        device: default: this process's CUDA device if there is one, else CPU. AMP (amp=True) runs
            bfloat16 autocast there, without a grad scaler (amp_dtype="float16" adds one).
        progress: tqdm bars (rank 0 only).

    Returns:
        History: one EpochRecord per finished epoch (restored ones included after a resume).

    Raises:
        ValueError: a bad setting, a checkpoint of another run or model, an empty dataset, weights
            on the meta device.
        FileNotFoundError: resume=True without a checkpoint.
    """
    config = resolve(FinetuneConfig, config, settings, "finetune")
    if device is not None:
        parse_device(device)  # a device this machine lacks fails here, before any work
    if len(train_data) == 0:
        raise ValueError("train_data is empty")
    check_real_weights(unwrap(model), "finetune")
    if teacher is not None:
        check_real_weights(unwrap(teacher), "finetune: the teacher")
    with process_group():
        task = LabelledTask(train_data, eval_data, teacher, transform, config)
        return Run(model, task, config, device, progress).run()


class Run:
    """One training run's state; `run()` drives it, the rest are its steps."""

    def __init__(self, model: nn.Module, task: Task, config, device, progress: bool):
        self.config, self.task, self.progress = config, task, progress
        self.rank, self.world = rank_and_world()
        self.device = parse_device(device) if device is not None else default_device()
        self.model = unwrap(model).to(self.device)
        if task.teacher is not None:
            task.teacher.to(self.device).eval()
        seed_everything(config.seed)
        # The optimizer gets every parameter trainable now, before the freezer freezes any of them.
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{task.verb}: the model has no trainable parameter")
        self.optimizer = _make_optimizer(params, config)
        self.freezer = None
        if config.schedule is not None:
            self.freezer = SequentialFreezer(self.model, config.schedule, config.every_epochs,
                                             config.every_steps, config.freeze_undecomposed)
            self.freezer.check_optimizer(self.optimizer)
        self.steps_per_epoch = math.ceil(len(self._epoch_indices(0)) / task.items_per_step)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_factor(config.lr_schedule, config.epochs * self.steps_per_epoch,
                                       getattr(config, "warmup_steps", 0)))
        self.amp_dtype = amp_dtype(config)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=needs_grad_scaler(config))
        self.history = History()
        self.epoch, self.batch, self.global_step = 0, 0, 0
        self._reset_running()
        self._ddp = None
        self.checkpoint_path = Path(config.checkpoint_dir) / CHECKPOINT_NAME if config.checkpoint_dir else None
        if config.resume:
            self._load_checkpoint()

    # ---- the loop ------------------------------------------------------------------------------

    def run(self) -> History:
        config = self.config
        try:
            while self.epoch < config.epochs:
                if self.freezer is not None:
                    self.freezer.set_epoch(self.epoch)
                if not self._train_epoch():
                    self.history.global_step = self.global_step
                    return self.history
                self._finish_epoch()
            self.history.completed = True
            self.history.global_step = self.global_step
            return self.history
        finally:
            if self.freezer is not None:
                self.freezer.restore()

    def _train_epoch(self) -> bool:
        """Train the rest of the current epoch; False if max_steps stopped the run."""
        config = self.config
        indices = self._epoch_indices(self.epoch)
        per_step = self.task.items_per_step
        bar = tqdm(total=self.steps_per_epoch, initial=self.batch, desc=f"epoch {self.epoch + 1}/{config.epochs}",
                   disable=not self.progress or self.rank != 0, leave=False, dynamic_ncols=True)
        self.task.train_mode(self.model)
        start = self._clock()
        try:
            while self.batch < self.steps_per_epoch:
                chunk = indices[self.batch * per_step:(self.batch + 1) * per_step]
                loss, n = self._train_step(self.task.fetch(chunk, self.device))
                self.batch += 1
                self.global_step += 1
                self.running["loss_sum"] += loss * n
                self.running["seen"] += n
                if self.freezer is not None:
                    self.running["share_sum"] += self._share
                    if self.freezer.phase not in self.running["phases"]:
                        self.running["phases"].append(self.freezer.phase)
                    self.freezer.step()
                self.running["steps"] += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                if config.max_steps is not None and self.global_step >= config.max_steps:
                    self.running["train_seconds"] += self._clock() - start
                    self._save_checkpoint()
                    return False
                if config.checkpoint_every_steps and self.global_step % config.checkpoint_every_steps == 0:
                    self.running["train_seconds"] += self._clock() - start
                    self._save_checkpoint()
                    start = self._clock()
        finally:
            bar.close()
        self.running["train_seconds"] += self._clock() - start
        return True

    def _train_step(self, batch) -> tuple[float, int]:
        net = self._network()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.config.amp):
            loss, n = self.task.loss(net, batch)
        if not torch.isfinite(loss) and not self.scaler.is_enabled():  # the scaler skips overflowing steps itself
            raise ValueError(f"{self.task.verb}: the loss is {loss.item()} at step {self.global_step + 1}; "
                             f"lower lr or check the data")
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.item(), n

    def _network(self) -> nn.Module:
        """The module to call: the model itself, or its DDP wrapper for the current trainable set."""
        if self.world == 1:
            return self.model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        if self.freezer is not None:
            return self.freezer.wrap_ddp(self.model, device_ids=device_ids)
        if self._ddp is None:
            self._ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        return self._ddp

    def _clock(self) -> float:
        """Wall time once the device has finished the work queued so far: CUDA runs
        asynchronously, and a time read without waiting would miss the steps still running."""
        synchronize(self.device)
        return time.perf_counter()

    @property
    def _share(self) -> float:
        total = sum(p.numel() for p in self.model.parameters())
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad) / total

    def _finish_epoch(self) -> None:
        self._sync_buffers()
        running = self.running
        totals = self._all_sum([running["loss_sum"], running["seen"]])
        test_loss, test_score, eval_seconds = self._evaluate()
        share = running["share_sum"] / running["steps"] if self.freezer is not None and running["steps"] else 1.0
        record = EpochRecord(self.epoch, totals[0] / max(totals[1], 1), test_loss, None,
                             running["train_seconds"], eval_seconds, share, list(running["phases"]))
        setattr(record, self.task.score, test_score)
        self.history.epochs.append(record)
        if self.progress and self.rank == 0:
            what = self.task.score.removeprefix("test_")
            score = f", test {what} {100 * test_score:.2f}%" if test_score is not None else ""
            tqdm.write(f"epoch {self.epoch + 1}/{self.config.epochs}: train loss {record.train_loss:.4f}{score}, "
                       f"{record.train_seconds:.1f} s, trainable {100 * share:.1f}%")
        self.epoch, self.batch = self.epoch + 1, 0
        self._reset_running()
        self._save_checkpoint()

    @torch.no_grad()
    def _evaluate(self) -> tuple[float | None, float | None, float]:
        if not self.task.has_evaluation:
            return None, None, 0.0
        start = self._clock()
        self.model.eval()
        loss_sum, score_sum, n = self.task.evaluate(self.model, self.device, self.rank, self.world)
        self.task.train_mode(self.model)
        loss_sum, score_sum, n = self._all_sum([loss_sum, score_sum, n])
        return loss_sum / max(n, 1), score_sum / max(n, 1), self._clock() - start

    # ---- data ----------------------------------------------------------------------------------

    def _epoch_indices(self, epoch: int) -> list[int]:
        """This process's item order for an epoch: a function of (seed, epoch, rank) only."""
        sampler = DistributedSampler(range(self.task.size), num_replicas=self.world, rank=self.rank,
                                     shuffle=True, seed=self.config.seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    # ---- distributed helpers -------------------------------------------------------------------

    def _all_sum(self, values: list[float]) -> list[float]:
        return all_sum(values, self.device)

    def _sync_buffers(self) -> None:
        """DDP broadcasts buffers before each forward, so after the last one they differ per rank."""
        if self.world > 1:
            for buffer in self.model.buffers():
                dist.broadcast(buffer, 0)

    # ---- checkpoints ---------------------------------------------------------------------------

    def _reset_running(self) -> None:
        self.running = {"loss_sum": 0.0, "seen": 0, "share_sum": 0.0, "steps": 0, "train_seconds": 0.0,
                        "phases": []}

    def _config_dict(self) -> dict:
        return _decisive(asdict(self.config))

    def _save_checkpoint(self) -> None:
        if self.checkpoint_path is None:
            return
        self._sync_buffers()
        rng = rng_state()
        states = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(states, rng)
        else:
            states = [rng]
        if self.rank == 0:
            write_checkpoint(self.checkpoint_path, {
                "config": self._config_dict(),
                "world_size": self.world,
                **self.task.describe(),
                "position": {"epoch": self.epoch, "batch": self.batch, "global_step": self.global_step},
                "running": dict(self.running),
                "history": [asdict(r) for r in self.history.epochs],
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
                "freezer": self.freezer.state_dict() if self.freezer is not None else None,
                "rng": states,
            }, verb=self.task.verb)
        if self.world > 1:
            dist.barrier()

    def _load_checkpoint(self) -> None:
        path = self.checkpoint_path
        checkpoint = read_checkpoint(path, verb=self.task.verb)
        described = self.task.describe()
        check_same_run(path, {**_decisive(checkpoint["config"]), **{k: checkpoint.get(k) for k in described}},
                       {**self._config_dict(), **described})
        try:
            self.model.load_state_dict(checkpoint["model"])
        except RuntimeError as error:
            raise ValueError(f"{path}: the checkpoint does not match the model: {error}") from None
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if self.scaler.is_enabled() and checkpoint["scaler"]:
            self.scaler.load_state_dict(checkpoint["scaler"])
        if self.freezer is not None:
            self.freezer.load_state_dict(checkpoint["freezer"])
        position = checkpoint["position"]
        self.epoch, self.batch, self.global_step = position["epoch"], position["batch"], position["global_step"]
        self.running = dict(checkpoint["running"])
        self.history.epochs = [EpochRecord(**r) for r in checkpoint["history"]]
        states = checkpoint["rng"]
        set_rng_state(states[self.rank] if self.rank < len(states) else states[0])


# ---- helpers ---------------------------------------------------------------------------------


def _decisive(config: dict) -> dict:
    """The settings a resumed run must share with its checkpoint. The autocast dtype counts only
    with AMP on; a checkpoint from before `amp_dtype` existed ran float16 on CUDA, bfloat16 on CPU."""
    decisive = {k: v for k, v in config.items() if k not in RESUME_FREE}
    if not decisive.get("amp"):
        decisive.pop("amp_dtype", None)
    elif "amp_dtype" not in decisive:
        decisive["amp_dtype"] = "float16" if torch.cuda.is_available() else "bfloat16"
    return decisive


def _make_optimizer(params: list[nn.Parameter], config) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _lr_factor(schedule: str, total_steps: int, warmup_steps: int = 0) -> Callable[[int], float]:
    """The LR multiplier at each step: a linear warm-up, then cosine to zero or constant."""
    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
        return warm * (0.5 * (1 + math.cos(math.pi * step / total_steps)) if schedule == "cosine" else 1.0)

    return factor
