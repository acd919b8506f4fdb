"""The fine-tuning loop the CLI and the demo use: sequential freezing, DDP, AMP, distillation, resume.

    history = lrd.train.finetune(model, train_set, test_set, epochs=3, lr=0.01, schedule="rotate")
    print(history)

Launched under `torchrun`, it joins the process group (gloo on CPU, NCCL on GPU), shards the data
with DistributedSampler and wraps the model in DistributedDataParallel, re-wrapped at each phase
switch by `SequentialFreezer.wrap_ddp` (see lrdaccel.freezing for why).

Resume is exact. A checkpoint holds the model, optimizer, LR scheduler, grad scaler, freezer,
every rank's RNG states, the position (epoch, batch, step, the epoch's running loss) and the
history so far; it is written to a temporary file and renamed, by rank 0 only. The data order of
an epoch is a function of (seed, epoch) alone, so a resumed run skips the batches already done and
then sees exactly what the uninterrupted run saw: on CPU the two end bitwise equal.
"""

from __future__ import annotations

import math
import os
import random
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, DistributedSampler, TensorDataset, default_collate
from tqdm.auto import tqdm

from lrdaccel._modules import unwrap
from lrdaccel.freezing import SCHEDULES, SequentialFreezer
from lrdaccel.io import atomic_write

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_FORMAT = "lrdaccel.finetune"
CHECKPOINT_VERSION = 1
OPTIMIZERS = ("sgd", "adamw")
LR_SCHEDULES = ("cosine", "constant")
# Settings that may change between a run and its resumption without changing the result.
RESUME_FREE = ("checkpoint_dir", "checkpoint_every_steps", "resume", "max_steps", "eval_batch_size")


@dataclass
class FinetuneConfig:
    """Everything that decides a fine-tuning run's result (stored in each checkpoint).

    Attributes:
        epochs: passes over the training data.
        lr: peak learning rate.
        optimizer: "sgd" (with `momentum`) or "adamw".
        momentum: SGD momentum.
        weight_decay: L2 (SGD) or decoupled (AdamW) weight decay.
        lr_schedule: "cosine" (to zero over the run, per step) or "constant".
        schedule: freezing schedule ("rotate", "freeze_one", "static") or None for no freezing.
        every_epochs: epochs per freezing phase.
        every_steps: optimizer steps per freezing phase (overrides every_epochs).
        freeze_undecomposed: keep every layer outside the decomposed ones frozen.
        batch_size: per process.
        eval_batch_size: per process, for evaluation.
        alpha: weight of the distillation loss when a teacher is given (1 - alpha on the task loss).
        temperature: softening temperature of the distillation KL.
        amp: autocast (bfloat16 on CPU; float16 with a grad scaler on CUDA).
        checkpoint_dir: where `checkpoint.pt` is written (None: no checkpoints).
        checkpoint_every_steps: also checkpoint every N steps (default: end of each epoch only).
        resume: continue from `checkpoint_dir/checkpoint.pt`.
        max_steps: stop after this many optimizer steps in all (a checkpoint is written there).
        seed: seeds the RNGs and the data order.
    """

    epochs: int = 1
    lr: float = 0.01
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_schedule: str = "cosine"
    schedule: str | None = "rotate"
    every_epochs: int = 1
    every_steps: int | None = None
    freeze_undecomposed: bool = False
    batch_size: int = 64
    eval_batch_size: int = 256
    alpha: float = 0.5
    temperature: float = 4.0
    amp: bool = False
    checkpoint_dir: str | None = None
    checkpoint_every_steps: int | None = None
    resume: bool = False
    max_steps: int | None = None
    seed: int = 0

    def __post_init__(self):
        for name in ("epochs", "every_epochs", "batch_size", "eval_batch_size"):
            _check_positive_int(name, getattr(self, name))
        for name in ("every_steps", "checkpoint_every_steps", "max_steps"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.schedule is not None and self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES} or None, got {self.schedule!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if self.momentum < 0 or self.weight_decay < 0:
            raise ValueError(f"momentum and weight_decay must be >= 0, got {self.momentum!r}, {self.weight_decay!r}")
        if (self.resume or self.checkpoint_every_steps) and not self.checkpoint_dir:
            raise ValueError("resume and checkpoint_every_steps need checkpoint_dir")


@dataclass
class EpochRecord:
    epoch: int  # 0-based
    train_loss: float  # mean over the epoch's samples (all processes)
    test_loss: float | None
    test_accuracy: float | None
    train_seconds: float
    eval_seconds: float
    trainable_share: float  # mean over the epoch's steps of the trainable share of all parameters
    phases: list[int] = field(default_factory=list)


@dataclass
class History:
    epochs: list[EpochRecord] = field(default_factory=list)
    completed: bool = False  # False when max_steps stopped the run early
    global_step: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"{'epoch':>5} {'train loss':>10} {'test acc':>8} {'train s':>8} {'share':>6}  phases"]
        for r in self.epochs:
            acc = f"{100 * r.test_accuracy:7.2f}%" if r.test_accuracy is not None else f"{'-':>8}"
            lines.append(f"{r.epoch + 1:>5} {r.train_loss:>10.4f} {acc} {r.train_seconds:>8.1f} "
                         f"{100 * r.trainable_share:>5.1f}%  {r.phases}")
        if not self.completed:
            lines.append(f"stopped at step {self.global_step} (max_steps)")
        return "\n".join(lines)


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
            logits, weighted by alpha, plus the task loss); never updated.
        transform: applied to each input batch on the device (e.g. `lrdaccel.data.normalize`).
        device: default: this process's CUDA device if there is one, else CPU.
        progress: tqdm bars (rank 0 only).

    Returns:
        History: one EpochRecord per finished epoch (restored ones included after a resume).

    Raises:
        ValueError: a bad setting, a checkpoint of another run or model, an empty dataset.
        FileNotFoundError: resume=True without a checkpoint.
    """
    if config is None:
        config = FinetuneConfig()
    unknown = sorted(set(settings) - {f.name for f in fields(FinetuneConfig)})
    if unknown:
        raise ValueError(f"unknown finetune settings {unknown}; known: {[f.name for f in fields(FinetuneConfig)]}")
    config = replace(config, **settings)
    if len(train_data) == 0:
        raise ValueError("train_data is empty")
    created = init_distributed()
    try:
        return _Run(model, train_data, eval_data, config, teacher, transform, device, progress).run()
    finally:
        if created:
            dist.destroy_process_group()


class _Run:
    """One fine-tuning run's state; `run()` drives it, the rest are its steps."""

    def __init__(self, model, train_data, eval_data, config, teacher, transform, device, progress):
        self.config, self.train_data, self.eval_data = config, train_data, eval_data
        self.teacher, self.transform, self.progress = teacher, transform, progress
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.device = torch.device(device) if device is not None else _default_device()
        self.model = unwrap(model).to(self.device)
        if teacher is not None:
            teacher.to(self.device).eval()
        _seed_everything(config.seed)
        # The optimizer gets every parameter trainable now, before the freezer freezes any of them.
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = _make_optimizer(params, config)
        self.freezer = None
        if config.schedule is not None:
            self.freezer = SequentialFreezer(self.model, config.schedule, config.every_epochs,
                                             config.every_steps, config.freeze_undecomposed)
            self.freezer.check_optimizer(self.optimizer)
        self.steps_per_epoch = math.ceil(len(self._epoch_indices(0)) / config.batch_size)
        total = config.epochs * self.steps_per_epoch
        cosine = config.lr_schedule == "cosine"
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)) if cosine else 1.0)
        self.amp_dtype = torch.float16 if self.device.type == "cuda" else torch.bfloat16
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp and self.device.type == "cuda")
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
        bar = tqdm(total=self.steps_per_epoch, initial=self.batch, desc=f"epoch {self.epoch + 1}/{config.epochs}",
                   disable=not self.progress or self.rank != 0, leave=False, dynamic_ncols=True)
        self.model.train()
        start = time.perf_counter()
        try:
            while self.batch < self.steps_per_epoch:
                chunk = indices[self.batch * config.batch_size:(self.batch + 1) * config.batch_size]
                loss, n = self._train_step(_fetch(self.train_data, chunk))
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
                    self.running["train_seconds"] += time.perf_counter() - start
                    self._save_checkpoint()
                    return False
                if config.checkpoint_every_steps and self.global_step % config.checkpoint_every_steps == 0:
                    self.running["train_seconds"] += time.perf_counter() - start
                    self._save_checkpoint()
                    start = time.perf_counter()
        finally:
            bar.close()
        self.running["train_seconds"] += time.perf_counter() - start
        return True

    def _train_step(self, batch) -> tuple[float, int]:
        inputs, labels = self._to_device(batch)
        net = self._network()
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.config.amp):
            logits = _logits(net(inputs))
            loss = F.cross_entropy(logits.float(), labels)
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_logits = _logits(self.teacher(inputs)).float()
                loss = self.config.alpha * _distillation_loss(logits.float(), teacher_logits, self.config.temperature) \
                    + (1 - self.config.alpha) * loss
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.item(), len(labels)

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

    @property
    def _share(self) -> float:
        total = sum(p.numel() for p in self.model.parameters())
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad) / total

    def _finish_epoch(self) -> None:
        self._sync_buffers()
        running = self.running
        totals = self._all_sum([running["loss_sum"], running["seen"]])
        test_loss, test_accuracy, eval_seconds = self._evaluate()
        share = running["share_sum"] / running["steps"] if self.freezer is not None and running["steps"] else 1.0
        record = EpochRecord(self.epoch, totals[0] / max(totals[1], 1), test_loss, test_accuracy,
                             running["train_seconds"], eval_seconds, share, list(running["phases"]))
        self.history.epochs.append(record)
        if self.progress and self.rank == 0:
            acc = f", test accuracy {100 * test_accuracy:.2f}%" if test_accuracy is not None else ""
            tqdm.write(f"epoch {self.epoch + 1}/{self.config.epochs}: train loss {record.train_loss:.4f}{acc}, "
                       f"{record.train_seconds:.1f} s, trainable {100 * share:.1f}%")
        self.epoch, self.batch = self.epoch + 1, 0
        self._reset_running()
        self._save_checkpoint()

    @torch.no_grad()
    def _evaluate(self) -> tuple[float | None, float | None, float]:
        if self.eval_data is None or len(self.eval_data) == 0:
            return None, None, 0.0
        start = time.perf_counter()
        self.model.eval()
        indices = list(range(self.rank, len(self.eval_data), self.world))
        loss_sum, correct = 0.0, 0
        size = self.config.eval_batch_size
        for i in range(0, len(indices), size):
            inputs, labels = self._to_device(_fetch(self.eval_data, indices[i:i + size]))
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.config.amp):
                logits = _logits(self.model(inputs)).float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            correct += (logits.argmax(-1) == labels).sum().item()
        self.model.train()
        loss_sum, correct = self._all_sum([loss_sum, correct])
        n = len(self.eval_data)
        return loss_sum / n, correct / n, time.perf_counter() - start

    # ---- data ----------------------------------------------------------------------------------

    def _epoch_indices(self, epoch: int) -> list[int]:
        """This process's sample order for an epoch: a function of (seed, epoch, rank) only."""
        sampler = DistributedSampler(self.train_data, num_replicas=self.world, rank=self.rank,
                                     shuffle=True, seed=self.config.seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    def _to_device(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, labels = batch[0].to(self.device), batch[1].to(self.device)
        if self.transform is not None:
            inputs = self.transform(inputs)
        return inputs, labels

    # ---- distributed helpers -------------------------------------------------------------------

    def _all_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    @property
    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

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
        return {k: v for k, v in asdict(self.config).items() if k not in RESUME_FREE}

    def _save_checkpoint(self) -> None:
        if self.checkpoint_path is None:
            return
        self._sync_buffers()
        rng = _rng_state()
        states = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(states, rng)
        else:
            states = [rng]
        if self.rank == 0:
            checkpoint = {
                "format": CHECKPOINT_FORMAT,
                "version": CHECKPOINT_VERSION,
                "config": self._config_dict(),
                "world_size": self.world,
                "teacher": self.teacher is not None,
                "position": {"epoch": self.epoch, "batch": self.batch, "global_step": self.global_step},
                "running": dict(self.running),
                "history": [asdict(r) for r in self.history.epochs],
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
                "freezer": self.freezer.state_dict() if self.freezer is not None else None,
                "rng": states,
            }
            self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.checkpoint_path, lambda path: torch.save(checkpoint, path))
        if self.world > 1:
            dist.barrier()

    def _load_checkpoint(self) -> None:
        path = self.checkpoint_path
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no checkpoint to resume from")
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # torch raises several types for a file that is not a checkpoint
            raise ValueError(f"{path}: not a readable lrdaccel checkpoint ({error})") from None
        if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path}: not an lrdaccel fine-tuning checkpoint")
        if checkpoint.get("version", 0) > CHECKPOINT_VERSION:
            raise ValueError(f"{path}: checkpoint version {checkpoint.get('version')} is newer than this "
                             f"lrdaccel reads; upgrade lrdaccel")
        saved, mine = checkpoint["config"], self._config_dict()
        differs = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in mine.items() if saved.get(k) != v]
        if checkpoint["teacher"] != (self.teacher is not None):
            differs.append(f"teacher: saved {checkpoint['teacher']}, now {self.teacher is not None}")
        if differs:
            raise ValueError(f"{path}: the checkpoint is from a run with other settings: " + "; ".join(differs))
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
        _set_rng_state(states[self.rank] if self.rank < len(states) else states[0])


# ---- helpers ---------------------------------------------------------------------------------


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def init_distributed() -> bool:
    """Join the process group torchrun describes, if any. Returns True if this call created it."""
    if not dist.is_available() or dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return True


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _make_optimizer(params: list[nn.Parameter], config: FinetuneConfig) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def _fetch(dataset: Dataset, indices: list[int]):
    """A batch: one indexing call on a TensorDataset, else the default collate of the items."""
    if isinstance(dataset, TensorDataset):
        return dataset[torch.as_tensor(indices, dtype=torch.long)]
    return default_collate([dataset[i] for i in indices])


def _logits(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if getattr(output, "logits", None) is not None:
        return output.logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ValueError(f"the model returned {type(output).__name__}; expected logits (a tensor or .logits)")


def _distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) on temperature-softened logits, scaled by T^2 (Hinton et al.)."""
    return F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                    log_target=True, reduction="batchmean") * temperature ** 2


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    """RNG states in types `torch.load(weights_only=True)` reads back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
