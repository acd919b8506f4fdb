"""The demo: the whole pipeline on real data in minutes on a laptop CPU.

Train a CNN on Fashion-MNIST (or MNIST 5k where the Debian dataset is not installed), plan a
decomposition at ratio 2, optimize the ranks by timing the layers on this machine under the
runtime it will be served in, then race (lrd.race): the original and the model decomposed at
those ranks (whitened on training images, sequential freezing) fine-tune the same extra epoch on
the same batches, side by side, evaluated along the way, so the accuracy each reaches in what
training time is measured, not assumed (an earlier demo gave only the decomposed model the extra
epoch). Then measure what changed: parameters, MACs, test accuracy, inference and training
throughput as ratios to the original under each runtime (side by side, interleaved); and the
deploy step: BatchNorm folded, exported to ONNX, checked with ONNX Runtime. Writes results.json,
report.md, report.png, plan.json, race/ (the race's results.json, report.md, race.png), the
decomposed model and model.onnx.

What every step needs is checked before the first one runs: the dataset (`lrdaccel.data.require`)
must be there, while a step whose optional extra is missing (the deploy step without
lrdaccel[onnx], report.png without lrdaccel[plot]) is skipped with a note. Each file is written as
soon as what it holds exists (plan.json after planning, model/ after fine-tuning, results.json
before the report is drawn), and a deploy step that fails is recorded in the results and the
report instead of discarding them.

The defaults are chosen for a speed-up that is real on a CPU: the CNN is wide enough (3x3 convs
of 64-256 channels) that convolutions take the time rather than per-layer overheads (at 32-128
channels eager PyTorch ran the decomposed model no faster than the original), ranks are chosen
for torch.compile, where time follows the work saved, and the wider model trains on half of
Fashion-MNIST for two epochs and fine-tunes for one, so the whole run still fits in minutes.
The report says what each stage cost (wall and CPU seconds). At one thread under a load of 3-7
(benchmarks/results/demo_0.4): 20 min 31 s wall, 9.9 CPU minutes (training the original 4.2,
the race 4.7, throughput 0.8 plus compiling in worker processes); 1.66x inference and 1.88x
training compiled, 1.43x / 1.61x eager, -0.42 points. Earlier demos spent much more evaluating:
after each pretraining epoch (the race's first evaluation is of the same model), and 8 times in
the race in batches of 512 (now 4, in batches of 128: 1.7x faster per image here).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lrdaccel import data, zoo
from lrdaccel._extras import install_hint, missing
from lrdaccel._settings import check_choice, check_int, check_number
from lrdaccel.bench.config import timing_cache_arg
from lrdaccel.bench.demo_stages import Stages
from lrdaccel.bench.report import MARKDOWN_NAME, render_markdown, write_report
from lrdaccel.bench.schema import DEMO_FORMAT, record_end_load, results_header
from lrdaccel.bench.workloads import training_phases
from lrdaccel.factorize.ranks import check_ratio
from lrdaccel.deploy import export_onnx
from lrdaccel.io import save
from lrdaccel.measure.counting import count_macs, count_params
from lrdaccel.measure.runtimes import INFERENCE_ONLY, check_runtime
from lrdaccel.measure.steps import Placement, inference_phase
from lrdaccel.measure.timer import OBJECTIVES, Workload, measure_interleaved, ratio_to_baseline, spread
from lrdaccel.planning import Plan
from lrdaccel.planning import plan as make_plan
from lrdaccel.rankopt import optimize_ranks
from lrdaccel.racing.api import race
from lrdaccel.racing.config import RaceConfig
from lrdaccel.racing.contestants import VariantSpec
from lrdaccel.racing.variants import checked_options
from lrdaccel.training.freezer import SCHEDULES
from lrdaccel.training.loop import finetune as run_finetune

ONNX_NAME = "model.onnx"
RACE_DIR = "race"
DECOMPOSED = "lrd(plan=plan.json)"  # the race's name for the model decomposed at the demo's ranks
DEMO_MODELS = ("fmnist-cnn-wide", "fmnist-cnn", "fmnist-vit")
QUICK_SETTINGS = {"model": "fmnist-cnn", "train_limit": 512, "test_limit": 256, "epochs": 1, "finetune_epochs": 2,
                  "evaluations": 2, "batch_size": 64, "repeats": 2, "min_run_time": 0.0, "rank_budget_s": 0.5,
                  "runtime": "eager", "runtimes": ["eager"], "deploy": False, "quick": True}


@dataclass
class DemoConfig:
    """Settings of `run_demo`; the defaults fit in a few minutes on two CPU cores.

    Attributes:
        out: directory for the results (created).
        dataset: a `lrdaccel.data` name; None picks Fashion-MNIST where installed, else MNIST 5k.
        model: the model to train: "fmnist-cnn-wide", "fmnist-cnn" or "fmnist-vit".
        ratio: per-layer compression ratio (> 1).
        epochs: epochs to train the original.
        finetune_epochs: the race: epochs both the original and the decomposed model fine-tune on.
        evaluations: test-set evaluations of each model spread over the race (plus one before it):
            the points of its curve. Each passes both models over the whole test set (measured,
            one thread, batches of 512: 54 s, against 82 s of training between two of four
            points), so many points make the race mostly evaluating; earlier demos used 8.
        schedule: SequentialFreezer schedule of the decomposed model in the race (six phases).
        objective: what rank optimization times per layer: "infer" or "train".
        runtime: what the ranks are optimized for and the headline ratios measured in: "eager",
            "compile" or "onnxruntime" (inference only).
        runtimes: the runtimes throughput is reported in (each against the original in the same
            runtime: int8 against the original in int8, the baseline a CPU user serves with;
            `runtime` is added where missing); onnxruntime and int8 report inference only.
        deploy: end with the deploy step: BatchNorm folded, exported to model.onnx, checked with
            ONNX Runtime (skipped, with a note, where it is not installed).
        batch_size: training batch, and the one batch every inference figure of the demo is
            timed on: the throughput table and the race's inference speed-up alike.
        lr: peak AdamW learning rate training the original (cosine decay over the run).
        finetune_lr: peak AdamW learning rate of the race, for both (cosine decay over the run).
        train_limit: use only the first N training images (None: all).
        test_limit: use only the first N test images (None: all).
        repeats: interleaved throughput measurements (also the race's inference timing); three
            give a median and a spread, and each training repeat times every freezing phase.
        min_run_time: seconds one throughput measurement lasts at least.
        seed: weights and shuffling.
        optimize: time the layers and optimize the ranks (False: decompose at the ratio ranks).
        timing_cache: rank optimization's timing cache: None (its default file), "none", or a path.
        rank_budget_s: seconds rank optimization may spend timing each distinct layer.
        quick: recorded in the results (a small slice for tests and a first look).
    """

    out: str = "demo_out"
    dataset: str | None = None
    model: str = "fmnist-cnn-wide"
    ratio: float = 2.0
    epochs: int = 2
    finetune_epochs: int = 1
    evaluations: int = 4
    schedule: str = "rotate"
    objective: str = "infer"
    runtime: str = "compile"
    runtimes: list[str] = field(default_factory=lambda: ["eager", "compile", "int8"])
    deploy: bool = True
    batch_size: int = 128
    lr: float = 3e-3
    finetune_lr: float = 1e-3
    train_limit: int | None = 30000
    test_limit: int | None = None
    repeats: int = 3
    min_run_time: float = 0.2
    seed: int = 0
    optimize: bool = True
    timing_cache: str | None = None
    rank_budget_s: float = 5.0
    quick: bool = False

    def __post_init__(self) -> None:
        if self.dataset is None:
            self.dataset = next((name for name in ("fashion-mnist", "mnist5k") if data.available(name)), "mnist5k")
        if self.dataset not in data.NAMES:
            raise ValueError(f"dataset must be one of {data.NAMES}, got {self.dataset!r}")
        if self.model not in DEMO_MODELS:
            raise ValueError(f"model must be one of {DEMO_MODELS}, got {self.model!r}")
        check_choice("schedule", self.schedule, SCHEDULES)
        check_choice("objective", self.objective, OBJECTIVES)
        for runtime in self.runtimes:
            check_runtime(runtime, "infer")
        check_runtime(self.runtime, self.objective)
        if len(set(self.runtimes)) != len(self.runtimes):
            raise ValueError(f"runtimes must name each runtime once, got {self.runtimes}")
        if self.runtime not in self.runtimes:
            self.runtimes = [*self.runtimes, self.runtime]
        for what in ("epochs", "finetune_epochs", "evaluations", "batch_size", "repeats"):
            check_int(what, getattr(self, what), 1)
        for what in ("train_limit", "test_limit"):
            check_int(what, getattr(self, what), 1, optional=True)
        check_ratio(self.ratio)
        for what in ("lr", "finetune_lr", "rank_budget_s"):
            check_number(what, getattr(self, what), above=0)

    @classmethod
    def quick_config(cls, **overrides) -> "DemoConfig":
        """The whole pipeline on a small slice, in seconds: for tests and a first look."""
        return cls(**{**QUICK_SETTINGS, **overrides})


def keep_input_layer(in_channels: int) -> Callable[[nn.Module, str], bool]:
    """A plan filter that keeps the layer reading the image: with one input channel its
    Tucker-2 input rank is 1 and the ratio's budget leaves an output rank of 2 to 6, which loses
    most of what the layer does while saving a fraction of a percent of the model."""

    def accept(module: nn.Module, name: str) -> bool:
        return not (isinstance(module, nn.Conv2d) and module.in_channels == in_channels)

    return accept


def _pretrain(model: nn.Module, train, config: DemoConfig, progress: bool) -> list[dict]:
    """The original from scratch with lrdaccel's fine-tuning loop: AdamW, cosine decay. Not
    evaluated here: the race's first evaluation is of this very model, so its accuracy is that."""
    history = run_finetune(model, train, None, epochs=config.epochs, lr=config.lr, optimizer="adamw",
                           weight_decay=1e-4, schedule=None, batch_size=config.batch_size, seed=config.seed,
                           device="cpu", progress=progress)
    return [{"epoch": r.epoch + 1, "loss": r.train_loss, "seconds": r.train_seconds} for r in history.epochs]


def _race(original: nn.Module, train, test, plan: Plan, schedule: str | None, config: DemoConfig, out: Path,
          progress: bool) -> tuple[dict, dict[str, nn.Module]]:
    """The original and the decomposed model fine-tune `finetune_epochs` more on the same batches
    (lrd.race): (the race's results, each trained model by name). It evaluates in batches of the
    training batch, not larger: on this CPU, one thread, the wide CNN evaluated 1,010 images per CPU
    second in batches of 128 against 578 in batches of 512, whose activations overflow the caches."""
    options = checked_options("lrd", {"plan": plan, "freeze": schedule or "none"}, DECOMPOSED)
    race_config = RaceConfig(
        budget_epochs=config.finetune_epochs, batch_size=config.batch_size, eval_batch_size=config.batch_size,
        lr=config.finetune_lr, lr_schedule="cosine", warmup=0.0, evaluations=config.evaluations,
        freeze_embeddings=False, calibration_batches=2 if config.quick else 8, infer_batch_size=config.batch_size,
        infer_repeats=config.repeats, seed=config.seed)
    trained: dict[str, nn.Module] = {}
    results = race(original, train, test, [VariantSpec("original", "original", checked_options("original", {}, "original")),
                                           VariantSpec(DECOMPOSED, "lrd", options)],
                   config=race_config, out=out / RACE_DIR, describe={"model": config.model, "task": config.dataset},
                   progress=progress, trained=trained)
    return results, trained


def _warm_up(workloads: list[Workload]) -> float:
    """One untimed call of every phase (what measure_interleaved's warm-up does), here so that
    its cost is known: under compile it is the compiling, one graph per freezing phase."""
    began = time.perf_counter()
    for workload in workloads:
        for phase in workload.phases:
            if phase.prepare is not None:
                phase.prepare()
            phase.step()
    return time.perf_counter() - began


def _throughput(original: nn.Module, decomposed: nn.Module, inputs: torch.Tensor, config: DemoConfig,
                schedule: str | None, progress: bool) -> tuple[dict, float]:
    """Inference and training throughput of both models under each runtime, all inference steps
    interleaved in one run and all training steps in another; training of the decomposed model
    averaged over one cycle of the freezing schedule. Ratios are against the original in the
    same runtime. Also returns the seconds of the warm-up calls (compiling, first calls)."""
    original, decomposed = copy.deepcopy(original), copy.deepcopy(decomposed)
    infer, train = [], []
    for runtime in config.runtimes:
        placement = Placement(runtime=runtime)
        infer += [Workload(f"{runtime}/original", [inference_phase(original, inputs, placement)]),
                  Workload(f"{runtime}/decomposed", [inference_phase(decomposed, inputs, placement)])]
        if runtime not in INFERENCE_ONLY:
            train += [Workload(f"{runtime}/original", training_phases(original, inputs, placement)),
                      Workload(f"{runtime}/decomposed", training_phases(decomposed, inputs, placement, schedule))]
    warm = _warm_up(infer) + _warm_up(train)
    infer_t = measure_interleaved(infer, config.repeats, 0, config.min_run_time, progress)
    train_t = measure_interleaved(train, config.repeats, 0, config.min_run_time, progress) if train else None
    per_s = lambda seconds: spread([config.batch_size / s for s in seconds])  # noqa: E731
    by_runtime = {}
    for runtime in config.runtimes:
        entry = {"infer_ratio": ratio_to_baseline(infer_t, f"{runtime}/decomposed", f"{runtime}/original"),
                 "original": {"infer_items_per_s": per_s(infer_t.seconds[f"{runtime}/original"])},
                 "decomposed": {"infer_items_per_s": per_s(infer_t.seconds[f"{runtime}/decomposed"])}}
        if runtime not in INFERENCE_ONLY:
            entry["train_ratio"] = ratio_to_baseline(train_t, f"{runtime}/decomposed", f"{runtime}/original")
            entry["original"]["train_items_per_s"] = per_s(train_t.seconds[f"{runtime}/original"])
            entry["decomposed"]["train_items_per_s"] = per_s(train_t.seconds[f"{runtime}/decomposed"])
            entry["decomposed"]["train_phases"] = len(train_t.per_phase[f"{runtime}/decomposed"][0])
        by_runtime[runtime] = entry
    return by_runtime, warm


def skipped_steps(config: DemoConfig) -> dict[str, str]:
    """The steps whose optional extra is missing here, each with its note (checked before any work)."""
    skipped = {}
    if config.deploy and missing("onnx"):
        module = missing("onnx")
        skipped["deploy"] = (f"the deploy step needs {module}, which is not installed ({install_hint(module)}); "
                             f"no {ONNX_NAME} was written")
    if missing("plot"):
        skipped["plot"] = (f"report.png needs matplotlib, which is not installed ({install_hint('matplotlib')}); "
                           f"only report.md was written")
    return skipped


def _deploy(decomposed: nn.Module, inputs: torch.Tensor, out: Path) -> dict:
    """Fold BatchNorm, export to ONNX and check it with ONNX Runtime. A failure is recorded, not
    raised: the results of every earlier step are still written (and the CLI exits non-zero)."""
    try:
        report = export_onnx(copy.deepcopy(decomposed).eval(), inputs, out / ONNX_NAME, fuse=True)
    except Exception as error:  # whatever the export raises, the run so far is kept and the error recorded
        message = " ".join(str(error).split())
        return {"skipped": f"the deploy step failed ({type(error).__name__}: {message})", "failed": True}
    return {"file": ONNX_NAME, "max_abs_diff": max(report.max_abs_diff.values()),
            "max_abs_output": report.max_abs_output, "batch_sizes": sorted(report.max_abs_diff),
            "folded": len(report.fused.fused), "unfused": len(report.fused.skipped),
            "batchnorm_left": len(report.fused.left), "seconds": round(report.export_seconds, 1)}


def _curve(row: dict) -> list[dict]:
    """A race curve as the demo reports it: accuracy (a fraction) by step and training seconds."""
    return [{"step": step, "seconds": seconds, "accuracy": accuracy / 100} for seconds, step, accuracy in row["curve"]]


def _race_row(row: dict) -> dict:
    """A race variant as the demo reports it: the race's figures, with the variant's learning-rate
    multiplier (the race's lr times it is the rate the variant trained at)."""
    return {key: row[key] for key in ("name", "train_seconds", "setup_seconds", "time_to_target_s",
                                      "speedup_to_target", "infer_speedup", "lr_multiplier")}


def _layer_rows(ratio_plan: Plan, plan: Plan) -> list[dict]:
    return [{"name": row.name, "ratio_rank": base.rank if base.decomposed else None, "kind": row.kind,
             "rank": row.rank, "reason": row.reason, "params_before": row.params_before,
             "params_after": row.params_after}
            for row, base in zip(plan, ratio_plan)]


def run_demo(config: DemoConfig, progress: bool = True, verbose: bool = True) -> dict:
    """Run the pipeline, write the files under `config.out`, and return the results dict.

    Raises:
        ValueError: the dataset is not installed (MissingDependency, saying how to get it), before
            any work.
    """
    data.require(config.dataset)
    skipped = skipped_steps(config)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    stages = Stages(verbose)
    results = results_header(DEMO_FORMAT, asdict(config))
    torch.manual_seed(config.seed)
    train, test = stages.run(f"load {config.dataset}", lambda: data.standardized_splits(
        config.dataset, config.train_limit, config.test_limit))
    spec = zoo.get(config.model)
    original = spec.build()
    pretraining = stages.run(f"train the original ({config.epochs} epoch{'s' if config.epochs > 1 else ''})",
                             lambda: _pretrain(original, train, config, progress))

    inputs = train.tensors[0][:config.batch_size]
    ratio_plan = make_plan(original, ratio=config.ratio, filter_fn=keep_input_layer(spec.input_shape[0]))
    plan, notes = ratio_plan, []
    if config.optimize:
        plan = stages.run(f"optimize ranks for {config.runtime} (timing layers)", lambda: optimize_ranks(
            original, ratio_plan, inputs, objective=config.objective, runtime=config.runtime,
            cache=timing_cache_arg(config.timing_cache), budget_s=config.rank_budget_s,
            min_run_time=0.05 if config.quick else 0.1, progress=progress))
    plan.save(out / "plan.json")
    schedule = config.schedule
    if not plan.decomposed:
        schedule = None
        notes.append("rank optimization found no layer faster decomposed on this machine, so every layer "
                     "stayed as it was and fine-tuning ran without freezing")
    race_stage = f"race: both models fine-tune {config.finetune_epochs} epoch(s) ({schedule or 'no'} freezing)"
    raced, trained = stages.run(race_stage, lambda: _race(original, train, test, plan, schedule, config, out, progress))
    timed = sum(row["train_seconds"] for row in raced["variants"])
    stages.part(race_stage, "training, as the race times it (steps, each model's setup)", timed)
    evaluations = len(raced["variants"][0]["curve"])
    stages.part(race_stage, f"the rest: {evaluations} evaluations of each model on the {len(test):,} test images, "
                            f"the race's inference timing", stages.seconds(race_stage) - timed)
    tuned, decomposed = trained["original"], trained[DECOMPOSED]
    save(decomposed, out / "model")
    throughput_stage = f"throughput under {', '.join(config.runtimes)} (interleaved)"
    throughput, warm = stages.run(throughput_stage,
                                  lambda: _throughput(tuned, decomposed, inputs, config, schedule, progress))
    stages.part(throughput_stage, "the first call of every step" + (
        " (under compile: compiling, a graph per freezing phase)" if "compile" in config.runtimes else ""), warm)
    stages.part(throughput_stage, f"{config.repeats} timed repeats", stages.seconds(throughput_stage) - warm)
    headline = throughput[config.runtime]
    deployed = None
    if "deploy" in skipped:
        deployed = {"skipped": skipped["deploy"]}
    elif config.deploy:
        deployed = stages.run("deploy: fold BatchNorm, export to ONNX, check it",
                              lambda: _deploy(decomposed, inputs, out))
    notes += [note for step, note in skipped.items() if step != "deploy"]

    one = inputs[:1]
    counts = {name: {"params": count_params(model), "macs": count_macs(model, one)}
              for name, model in (("original", tuned), ("decomposed", decomposed))}
    rows = {row["name"]: row for row in raced["variants"]}
    results.update({
        "dataset": {"name": config.dataset, "train_size": len(train), "test_size": len(test)},
        "model": config.model,
        "pretrained": {"accuracy": rows["original"]["curve"][0][2] / 100, "history": pretraining},
        "original": {**counts["original"], "accuracy": rows["original"]["final_accuracy"] / 100,
                     "history": _curve(rows["original"])},
        "decomposed": {**counts["decomposed"], "accuracy": rows[DECOMPOSED]["final_accuracy"] / 100,
                       "accuracy_before_finetune": rows[DECOMPOSED]["curve"][0][2] / 100,
                       "history": _curve(rows[DECOMPOSED]), "layers": _layer_rows(ratio_plan, plan)},
        "race": {"folder": RACE_DIR,  # no target (None) where the original ends at or below chance
                 "target_accuracy": None if raced["target_accuracy"] is None else raced["target_accuracy"] / 100,
                 "steps": raced["seeds"][0]["steps"], "lr": config.finetune_lr,
                 "infer_batch_size": raced["config"]["infer_batch_size"],
                 "variants": [_race_row(row) for row in raced["variants"]]},
        "ratios": {"params": counts["decomposed"]["params"] / counts["original"]["params"],
                   "macs": counts["decomposed"]["macs"] / counts["original"]["macs"],
                   "infer": headline["infer_ratio"], "train": headline.get("train_ratio")},
        "throughput": {"original": headline["original"], "decomposed": headline["decomposed"],
                       "batch_size": config.batch_size, "runtime": config.runtime, "by_runtime": throughput},
        "deploy": deployed,
        "notes": notes,
    })
    results.update(stages.record())
    record_end_load(results)
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    if "plot" in skipped:
        (out / MARKDOWN_NAME).write_text(render_markdown(results))
    else:
        write_report(results, out)
    return results
