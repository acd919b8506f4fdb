"""One race, one seed: every variant trains in lockstep on the same batches, timed step by step.

Step k draws one batch and hands that very object to every variant in turn (the order rotates
each step, so none always runs first, after the data fetch or another's cache traffic). Only a
variant's own work is timed: forward, loss, backward, optimizer step, scheduler and freezer
step (on CUDA, synchronised). Drawing batches and evaluating are not timed. Because the
variants alternate step by step, whatever else the machine does slows them alike: their
training seconds compare like interleaved benchmark repeats.

Each variant trains with its own random stream (lrdaccel.racing.streams), seeded from the seed and
its name: its dropout draws, and so its curve, are the same whichever variants race beside it.

Each variant's curve starts with an evaluation before its first step, at its setup time (what
it spent factorizing, calibrating, pruning: counted as training time), then one evaluation at
each of `config.evaluations` evenly spaced steps. The target and the speed-ups are scored from
the curves afterwards (lrdaccel.racing.scoring.score_seed).
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lrdaccel._modules import call_model, move_inputs, output_tensor
from lrdaccel.measure.counting import count_params
from lrdaccel.measure.steps import Placement, inference_phase
from lrdaccel.measure.timer import Workload, measure_interleaved, ratio_to_baseline
from lrdaccel.racing.config import RaceConfig
from lrdaccel.racing.contestants import BuildContext, Built, VariantSpec
from lrdaccel.tasks.data import RaceData
from lrdaccel.racing.scoring import chance_accuracy, score_seed
from lrdaccel.racing.streams import RandomStream
from lrdaccel.racing.variants import build_variant, check_before_building
from lrdaccel.training.task import distillation_loss

Clock = Callable[[], float]


@dataclass
class _Contestant:
    spec: VariantSpec
    built: Built
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    forward: Callable
    setup_seconds: float
    stream: RandomStream
    seconds: float = 0.0
    curve: list[list] = field(default_factory=list)
    digest: Any = field(default_factory=hashlib.sha256)
    diverged_at: int | None = None


def run_seed(start: nn.Module, data: RaceData, specs: list[VariantSpec], config: RaceConfig, seed: int,
             keep: list[str], *, progress: bool = True, clock: Clock = time.perf_counter,
             trained: dict[str, nn.Module] | None = None) -> dict:
    """Race every variant of `specs` from `start` (not changed) on `data`; the results of this seed.

    `keep`: module names no variant compresses (the classifier's new head). `trained`, where
    given, receives each variant's served model after training, by name."""
    placement = Placement.default_for(config.device, autocast_bf16=config.amp, channels_last=False)
    device = torch.device(config.device)
    steps = config.steps(data.size("train"))
    batches = _batches(data.size("train"), config.batch_size, steps, seed)
    start = placement.place_model(copy.deepcopy(start))
    context = _context(data, batches, config, keep, steps, device)
    teacher = None
    if any(spec.options.get("kd") for spec in specs):
        teacher = copy.deepcopy(start).eval().requires_grad_(False)
    check_before_building(specs, start, context)
    contestants = []
    for spec in specs:
        torch.manual_seed(seed)
        began = clock()
        built = build_variant(spec, copy.deepcopy(start), context)
        if config.freeze_embeddings:
            for module in built.model.modules():
                if isinstance(module, nn.Embedding):
                    module.weight.requires_grad_(False)
        _sync(device)
        stream = RandomStream(seed, spec.name, device)
        contestants.append(_contestant(spec, built, config, steps, clock() - began, stream))
        context.built[spec.name] = built.model
        context.kinds[spec.name] = spec.kind
    for contestant in contestants:
        _evaluate(contestant, data, config, placement, step=0)
    at = _evaluation_steps(steps, config.evaluations)
    bar = tqdm(total=steps, desc=f"race (seed {seed})", unit="step", disable=not progress)
    for step, indices in enumerate(batches, 1):
        inputs, labels = data.batch("train", indices)
        inputs, labels = placement.place_inputs(inputs), labels.to(device)
        key = torch.as_tensor(indices, dtype=torch.int64).numpy().tobytes()
        shift = step % len(contestants)
        for contestant in contestants[shift:] + contestants[:shift]:
            if contestant.diverged_at is None:
                contestant.digest.update(key)
                with contestant.stream.active():
                    _train_step(contestant, inputs, labels, teacher, placement, device, clock, step)
        if step in at:
            for contestant in contestants:
                _evaluate(contestant, data, config, placement, step)
            bar.set_postfix({c.spec.name: f"{c.curve[-1][2]:.1f}" for c in contestants})  # full names
        bar.update(1)
    bar.close()
    if trained is not None:
        trained.update({contestant.spec.name: _served(contestant) for contestant in contestants})
    return _results(contestants, start, data, config, placement, seed, steps)


def _batches(size: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """The race's batches: a fresh permutation of the training items each epoch, drawn from
    `seed` alone, cut into batches (the last one of an epoch may be smaller), `steps` of them."""
    generator = torch.Generator().manual_seed(seed)
    batches: list[list[int]] = []
    while len(batches) < steps:
        order = torch.randperm(size, generator=generator).tolist()
        batches += [order[i:i + batch_size] for i in range(0, size, batch_size)]
    return batches[:steps]


def _context(data: RaceData, batches: list[list[int]], config: RaceConfig, keep: list[str], steps: int,
             device: torch.device) -> BuildContext:
    """Builders read the race's first training batches (as a user calibrates on training data)."""
    inputs, labels = [], []
    for indices in batches[:config.calibration_batches]:
        x, y = data.batch("train", indices)
        inputs.append(move_inputs(x, device))
        labels.append(y.to(device))
    return BuildContext(inputs, labels, inputs[0], list(keep), steps)


def _contestant(spec: VariantSpec, built: Built, config: RaceConfig, steps: int, setup: float,
                stream: RandomStream) -> _Contestant:
    model = built.model
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr * built.lr_scale, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(config.lr_schedule, steps, config.warmup))
    forward = torch.compile(model, dynamic=True) if config.compile else model
    model.train()
    return _Contestant(spec, built, optimizer, scheduler, forward, setup, stream)


def lr_factor(schedule: str, steps: int, warmup: float) -> Callable[[int], float]:
    """The learning-rate multiplier at each step: linear warm-up over `warmup` of the steps, then
    linear decay to zero at the end, cosine decay, or constant."""
    warm = round(warmup * steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, steps - warm)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _train_step(contestant: _Contestant, inputs: Any, labels: torch.Tensor, teacher: nn.Module | None,
                placement: Placement, device: torch.device, clock: Clock, step: int) -> None:
    built = contestant.built
    _sync(device)
    began = clock()
    with placement.autocast():
        logits = output_tensor(call_model(contestant.forward, inputs)).float()
    loss = F.cross_entropy(logits, labels)
    if built.kd:
        with torch.no_grad(), placement.autocast():
            reference = output_tensor(call_model(teacher, inputs)).float()
        loss = built.kd * distillation_loss(logits, reference, 1.0) + (1 - built.kd) * loss
    if not torch.isfinite(loss):
        contestant.diverged_at = step
        return
    loss.backward()
    contestant.optimizer.step()
    contestant.optimizer.zero_grad(set_to_none=True)
    contestant.scheduler.step()
    if built.freezer is not None:
        built.freezer.step()
    _sync(device)
    contestant.seconds += clock() - began


def _evaluation_steps(steps: int, evaluations: int) -> set[int]:
    return {max(1, round(steps * k / evaluations)) for k in range(1, evaluations + 1)}


@torch.no_grad()
def evaluate(model: nn.Module, data: RaceData, batch_size: int, placement: Placement) -> float:
    """Accuracy in percent on the evaluation split, the model in eval mode (its modes restored)."""
    training = model.training
    model.eval()
    correct = 0
    try:
        for indices in data.eval_batches(batch_size):
            inputs, labels = data.batch("eval", indices)
            with placement.autocast():
                logits = output_tensor(call_model(model, placement.place_inputs(inputs)))
            correct += int((logits.argmax(-1).cpu() == labels).sum())
    finally:
        model.train(training)
    return 100.0 * correct / data.size("eval")


def _evaluate(contestant: _Contestant, data: RaceData, config: RaceConfig, placement: Placement, step: int) -> None:
    accuracy = evaluate(contestant.built.model, data, config.eval_batch_size, placement)
    contestant.curve.append([contestant.setup_seconds + contestant.seconds, step, accuracy])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _served(contestant: _Contestant) -> nn.Module:
    built = contestant.built
    return (built.served(built.model) if built.served else built.model).eval()


def _inference_speedups(contestants: list[_Contestant], data: RaceData, config: RaceConfig,
                        placement: Placement) -> dict[str, dict]:
    """Each served model's inference throughput over the original's, timed interleaved on one
    evaluation batch."""
    size = min(config.infer_batch_size, data.size("eval"))
    inputs, _ = data.batch("eval", list(range(size)))
    inputs = placement.place_inputs(inputs)
    workloads = [Workload(c.spec.name, [inference_phase(_served(c), inputs, placement)]) for c in contestants]
    timings = measure_interleaved(workloads, repeats=config.infer_repeats, warmup=1, min_run_time=0.2, alternate=True)
    baseline = contestants[0].spec.name
    return {c.spec.name: ratio_to_baseline(timings, c.spec.name, baseline) for c in contestants}


def param_digest(model: nn.Module) -> str:
    """SHA-256 of the model's state (names and bytes): equal digests, bitwise equal models."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _results(contestants: list[_Contestant], start: nn.Module, data: RaceData, config: RaceConfig,
             placement: Placement, seed: int, steps: int) -> dict:
    speedups = _inference_speedups(contestants, data, config, placement)
    start_params = count_params(start)
    rows = []
    for contestant in contestants:
        served = _served(contestant)
        rows.append({
            "name": contestant.spec.name,
            "kind": contestant.spec.kind,
            "options": {key: value if isinstance(value, (str, int, float, bool)) else type(value).__name__
                        for key, value in contestant.spec.options.items()},
            "lr_multiplier": contestant.built.lr_scale,
            "params": count_params(served) / start_params,
            "param_count": count_params(served),
            "trainable_params": sum(p.numel() for p in contestant.built.model.parameters() if p.requires_grad),
            "final_accuracy": contestant.curve[-1][2],
            "train_seconds": contestant.setup_seconds + contestant.seconds,
            "setup_seconds": contestant.setup_seconds,
            "curve": contestant.curve,
            "infer_speedup": speedups[contestant.spec.name]["median"],
            "infer_speedup_spread": speedups[contestant.spec.name],
            "data_order_digest": contestant.digest.hexdigest(),
            "param_digest": param_digest(contestant.built.model),
            "diverged_at_step": contestant.diverged_at,
            "notes": contestant.built.notes,
        })
    embeddings = sum(p.numel() for m in start.modules() if isinstance(m, nn.Embedding) for p in m.parameters())
    result = {"seed": seed, "steps": steps, "train_items": data.size("train"), "eval_items": data.size("eval"),
              "embedding_params": embeddings, "variants": rows}
    return score_seed(result, config.margin, chance_accuracy(data.labels("eval")))
