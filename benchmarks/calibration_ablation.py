"""Accuracy without long fine-tuning: what each calibration step adds, one at a time.

Steps (each row adds one thing to the row above it, same ranks unless allocation changes them):
  svd           plain truncated SVD / HOOI, one ratio for every layer
  whiten        activation-aware factorization on calibration inputs (padded tokens excluded)
  seq           + sequential statistics: each layer fitted to the partly decomposed model's inputs
  seq+last      + the last factor (and bias) re-solved in closed form against the original output
  seq+joint     + both SVD factors re-solved at once (reduced-rank regression; Tucker-2 as last)
  alloc+whiten  ranks allocated under the same budget by Fisher sensitivity, whitened
  alloc+seq     allocation + sequential + joint re-solve (the full pipeline)
  ... +bn       BatchNorm statistics re-estimated on unlabeled training images (CNN, EfficientNet)
  ... +distill  unlabeled distillation for a fixed budget of CPU seconds (MiniLM)
  ... +1/3 ep   fine-tuning for a third of an epoch (Fashion-MNIST models)

Models and data (every calibration, distillation and training input is disjoint from the
evaluation inputs):
- all-MiniLM-L6-v2: cosine of mean-pooled sentence embeddings to the original's on 256 held-out
  sentences of lrdaccel.calibration.corpora's evaluation split; calibration 1024 and distillation 8192
  sentences of its calibration split.
- EfficientNet-Lite0 (its 1x1 convs): top-1 agreement and mean KL(original || decomposed) on the
  20 ImageNet images foolbox ships. There is no ImageNet data offline besides those 20, so two
  calibration sources are reported: "photos" (random crops and flips of the three real photos
  that ship with scikit-learn and matplotlib: real, but three scenes) and "2-fold" (crops of the
  other 10 foolbox images calibrate the model that is evaluated on these 10, both ways round).
- Fashion-MNIST CNN and ViT (zoo "fmnist-cnn", "fmnist-vit"), trained here by the recipe of
  benchmarks/accuracy_fmnist.py and cached in benchmarks/scratch/: test accuracy (10,000 images)
  right after decomposition and after 1/3 epoch of fine-tuning (one pass over a random third of
  the training images, AdamW with cosine decay, labels plus distillation from the original, no
  freezing); calibration and BatchNorm images come from the training split. Allocation uses the
  task loss's Fisher (the calibration images' labels), with a parameter or a MAC budget.

Times are process CPU seconds with one thread (on a shared machine wall time varies with the
other jobs; CPU time is what an idle core would take), reported next to the wall time.

    .venv/bin/python benchmarks/calibration_ablation.py --models minilm --ratios 1.5,2
    .venv/bin/python benchmarks/calibration_ablation.py --models effnet,fmnist-cnn,fmnist-vit

Writes benchmarks/results/calibration_<model>.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import lrdaccel as lrd
from lrdaccel import data, zoo
from lrdaccel.calibration import corpora
from lrdaccel.bench.demo_pipeline import keep_input_layer
from lrdaccel.measure.counting import count_macs
from lrdaccel.planning.allocation import allocate_ranks
from lrdaccel.calibration import recalibrate_batchnorm
from lrdaccel.training.distill import distill
from lrdaccel.training.evaluate import accuracy
from lrdaccel.training.loop import finetune

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SCRATCH = HERE / "scratch"
RATIOS = (1.25, 1.5, 2.0, 3.0)
ORIGINAL_TRAINING = {"fmnist-cnn": (4, 3e-3), "fmnist-vit": (6, 2e-3)}  # as benchmarks/accuracy_fmnist.py


class Clock:
    """Process CPU seconds and wall seconds since creation."""

    def __init__(self):
        self.cpu, self.wall = time.process_time(), time.perf_counter()

    def __call__(self) -> dict:
        return {"cpu_s": round(time.process_time() - self.cpu, 1), "wall_s": round(time.perf_counter() - self.wall, 1)}


def decompose_step(original, plan, step: str, calibration):
    """A decomposed copy of `original` by `plan` and one of the steps, with its clock."""
    model = copy.deepcopy(original)
    clock = Clock()
    if step == "svd":
        lrd.decompose(model, plan)
    elif step == "whiten":
        lrd.decompose(model, plan, method="whiten", calibration=calibration)
    else:
        lrd.decompose(model, plan, method="whiten", sequential=True, calibration=calibration,
                      refit={"seq": "none", "seq+last": "last", "seq+joint": "joint"}[step])
    return model.eval(), clock()


def plans_for(original, ratio, calibration, labels=None, budget="params", **plan_settings):
    uniform = lrd.plan(original, ratio=ratio, **plan_settings)
    clock = Clock()
    allocated = allocate_ranks(original, uniform, calibration, labels=labels, budget=budget,
                               min_rank=plan_settings.get("min_rank", 8))
    return uniform, allocated, clock()


def candidate_share(plan) -> float:
    totals = plan.totals()
    return totals["params_after"] / totals["params_before"]


# ---- MiniLM ---------------------------------------------------------------------------------------


def minilm(args) -> dict:
    tokenizer, original = zoo.minilm_tokenizer(), zoo.minilm().eval()
    calibration = corpora.tokenized_batches(tokenizer, corpora.sentences("calibration", limit=1024, seed=0), 64)
    evaluation = corpora.tokenized_batches(tokenizer, corpora.sentences("evaluation", limit=256, seed=1), 64)
    train = corpora.tokenized_batches(tokenizer, corpora.sentences("calibration", limit=8192, seed=7), 32)
    random.Random(0).shuffle(train)  # sorted by length inside corpora; the loop reorders per epoch anyway
    held = corpora.tokenized_batches(tokenizer, corpora.sentences("evaluation", limit=128, seed=2), 64)

    def embed(model, batches):
        with torch.no_grad():
            return torch.cat([_pooled(model(**b).last_hidden_state, b["attention_mask"]) for b in batches])

    reference = embed(original, evaluation)

    def cosines(model) -> dict:
        cos = F.cosine_similarity(embed(model, evaluation), reference, dim=-1)
        return {"cosine": float(cos.mean()), "cosine_min": float(cos.min())}

    params = sum(p.numel() for p in original.parameters())
    rows = []
    for ratio in args.ratios:
        uniform, allocated, alloc_clock = plans_for(original, ratio, calibration)
        print(f"MiniLM ratio {ratio:g}: allocation {alloc_clock}", flush=True)
        for plan_name, plan, steps in (("uniform", uniform, args.steps), ("allocated", allocated, ("whiten", "seq+joint"))):
            for step in steps:
                model, clock = decompose_step(original, plan, step, calibration)
                row = {"ratio": ratio, "plan": plan_name, "step": step, **cosines(model), **clock,
                       "params_ratio": sum(p.numel() for p in model.parameters()) / params,
                       "candidate_share": candidate_share(plan)}
                if plan_name == "allocated":
                    row["allocation"] = {**plan.meta["allocation"], **alloc_clock}
                rows.append(row)
                print(json.dumps(row), flush=True)
                if plan_name == "allocated" and step == "seq+joint" and ratio in args.distill_ratios:
                    rows.append({"ratio": ratio, "plan": plan_name, "step": "seq+joint+distill",
                                 **distill_for(model, original, train, held, args, cosines)})
                    print(json.dumps(rows[-1]), flush=True)
    return {"model": "all-MiniLM-L6-v2", "params": params, "calibration_sentences": 1024,
            "evaluation_sentences": 256, "distillation_sentences": 8192, "rows": rows}


def _pooled(hidden, mask):
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1)


def distill_for(student, teacher, train, held, args, score) -> dict:
    """Distil in chunks of steps until the CPU-second budget is spent, resuming from the
    checkpoint each time (exact), and score after each chunk."""
    curve, cpu, wall, steps = [], 0.0, 0.0, 0
    with tempfile.TemporaryDirectory() as checkpoints:
        settings = dict(lr=args.distill_lr, warmup_steps=20, lr_schedule="constant", loss="cosine+mse",
                        epochs=100, schedule=args.distill_freeze, every_steps=50, checkpoint_dir=checkpoints,
                        progress=False)
        while cpu < args.distill_seconds:
            clock = Clock()
            distill(student, teacher, train, max_steps=steps + args.distill_chunk, resume=steps > 0, **settings)
            spent = clock()
            cpu, wall, steps = cpu + spent["cpu_s"], wall + spent["wall_s"], steps + args.distill_chunk
            curve.append({"steps": steps, "cpu_s": round(cpu, 1), "wall_s": round(wall, 1), **score(student.eval())})
            print(f"  distill {curve[-1]}", flush=True)
    return {**curve[-1], "curve": curve, "distill": {k: v for k, v in settings.items() if k != "checkpoint_dir"}}


# ---- EfficientNet-Lite0 -----------------------------------------------------------------------------


def _pretrained_agreement():
    spec = importlib.util.spec_from_file_location("pretrained_agreement", HERE / "pretrained_agreement.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PHOTOS = (("sklearn", "datasets/images/china.jpg"), ("sklearn", "datasets/images/flower.jpg"),
          ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"))


def random_crops(images, n: int, seed: int, mean, std) -> torch.Tensor:
    """n random resized crops (scale 0.08-1, aspect 3/4-4/3) with flips, 224x224, normalised."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        image = images[i % len(images)]
        w, h = image.size
        area = w * h * rng.uniform(0.08, 1.0)
        aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = min(w, int(round(math.sqrt(area * aspect)))), min(h, int(round(math.sqrt(area / aspect))))
        left, top = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
        crop = image.crop((left, top, left + cw, top + ch)).resize((224, 224), Image.BILINEAR)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        array = np.asarray(crop.convert("RGB"), dtype=np.float32) / 255.0
        out.append((torch.from_numpy(array).permute(2, 0, 1) - mean) / std)
    return torch.stack(out)


def efficientnet(args) -> dict:
    from PIL import Image

    pa = _pretrained_agreement()
    original = zoo.efficientnet_lite0()
    images, labels, names = pa.imagenet_images()
    mean, std = torch.tensor(pa.IMAGENET_MEAN)[:, None, None], torch.tensor(pa.IMAGENET_STD)[:, None, None]
    with torch.no_grad():
        reference = original(images)
    photos = [Image.open(Path(importlib.util.find_spec(package).submodule_search_locations[0]) / path).convert("RGB")
              for package, path in PHOTOS]
    foolbox = Path(importlib.util.find_spec("foolbox").submodule_search_locations[0]) / "data"
    originals = [Image.open(foolbox / name).convert("RGB") for name in names]
    half = len(images) // 2
    folds = {"photos": [(None, torch.arange(len(images)))],
             "2-fold": [(torch.arange(half), torch.arange(half, len(images))),
                        (torch.arange(half, len(images)), torch.arange(half))]}

    def calibration_for(source, calibrate_on, seed):
        pool = photos if source == "photos" else [originals[i] for i in calibrate_on.tolist()]
        crops = random_crops(pool, args.effnet_images, seed, mean, std)
        return list(crops.split(16))

    variants = (("uniform", "svd", False), ("uniform", "svd", True), ("uniform", "whiten", False),
                ("uniform", "whiten", True), ("uniform", "seq+joint", True), ("allocated", "whiten", True))
    rows = []
    for ratio in args.ratios:
        uniform = lrd.plan(original, ratio=ratio, filter_fn=pa.decomposable_1x1)
        for source, fold_list in folds.items():
            if source == "photos" and ratio != 1.5:
                continue  # the out-of-distribution source, once, at the ratio of the target
            for plan_name, step, bn in variants:
                if step == "svd" and source == "photos":
                    continue  # plain SVD needs no calibration data: reported with the 2-fold BatchNorm data
                logits, clocks = torch.empty_like(reference), []
                for k, (calibrate_on, evaluate_on) in enumerate(fold_list):
                    calibration = calibration_for(source, calibrate_on, seed=k)
                    plan = uniform
                    if plan_name == "allocated":
                        plan = allocate_ranks(original, uniform, calibration, min_rank=8)
                    model, clock = decompose_step(original, plan, step, calibration)
                    if bn:
                        recalibrate_batchnorm(model, calibration)
                        model.eval()
                    clocks.append(clock)
                    with torch.no_grad():
                        logits[evaluate_on] = model(images[evaluate_on])
                agree = (logits.argmax(-1) == reference.argmax(-1)).float()
                row = {"ratio": ratio, "calibration": source, "plan": plan_name, "step": step + ("+bn" if bn else ""),
                       "top1_agreement": float(agree.mean()),
                       "top1_accuracy": float((logits.argmax(-1) == labels).float().mean()),
                       "kl": float(F.kl_div(F.log_softmax(logits, -1), F.log_softmax(reference, -1),
                                            reduction="batchmean", log_target=True)),
                       "candidate_share": candidate_share(plan),
                       "cpu_s": sum(c["cpu_s"] for c in clocks), "wall_s": sum(c["wall_s"] for c in clocks)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return {"model": "EfficientNet-Lite0 (1x1 convs)", "images": len(images),
            "original_top1_accuracy": float((reference.argmax(-1) == labels).float().mean()),
            "calibration_crops": args.effnet_images, "rows": rows}


# ---- Fashion-MNIST ------------------------------------------------------------------------------------


def trained_original(name: str, train, seed: int = 0) -> torch.nn.Module:
    """The zoo model trained by benchmarks/accuracy_fmnist.py's recipe, cached in scratch/."""
    epochs, lr = ORIGINAL_TRAINING[name]
    path = SCRATCH / f"{name}-adamw{epochs}-lr{lr:g}-seed{seed}.safetensors"
    torch.manual_seed(seed)
    model = zoo.get(name).build()
    if path.is_file():
        from safetensors.torch import load_file

        model.load_state_dict(load_file(path))
        return model.eval()
    finetune(model, train, None, epochs=epochs, lr=lr, optimizer="adamw", weight_decay=1e-4, schedule=None,
             batch_size=128, seed=seed, device="cpu", progress=False)
    SCRATCH.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model.eval()


def fmnist(name: str, args) -> dict:
    train, test = data.standardized_splits("fashion-mnist")
    original = trained_original(name, train)
    base = accuracy(original, test, progress=False)
    print(f"{name}: original {100 * base:.2f}%", flush=True)
    images = train.tensors[0]
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(1))
    calibration = list(images[order[:args.fmnist_calibration * 128]].split(128))
    bn_batches = list(images[order[-args.fmnist_bn * 128:]].split(128))
    labels = [train.tensors[1][chunk] for chunk in order[:args.fmnist_calibration * 128].split(128)]
    settings = dict(filter_fn=keep_input_layer(1))
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in original.modules())
    # A third of an epoch: one pass over a random third of the training images, the cosine LR
    # schedule run to its end over it.
    pick = torch.randperm(len(train), generator=torch.Generator().manual_seed(3))[:len(train) // 3]
    third = TensorDataset(*(t[pick] for t in train.tensors))
    rows = []
    for ratio in args.ratios:
        uniform, allocated, alloc_clock = plans_for(original, ratio, calibration, labels=labels, **settings)
        _, by_macs, _ = plans_for(original, ratio, calibration, labels=labels, budget="macs", **settings)
        plans = {"uniform": uniform, "allocated": allocated, "allocated (MACs)": by_macs}
        variants = [("uniform", step) for step in args.fmnist_steps] + [
            ("allocated", "whiten"), ("allocated", "seq+joint"), ("allocated (MACs)", "seq+joint")]
        for plan_name, step in variants:
            plan = plans[plan_name]
            model, clock = decompose_step(original, plan, step, calibration)
            row = {"ratio": ratio, "plan": plan_name, "step": step, "accuracy": accuracy(model, test, progress=False),
                   **clock, "candidate_share": candidate_share(plan),
                   "params": sum(p.numel() for p in model.parameters()),
                   "macs": count_macs(model, calibration[0][:1]), "kept": [r.name for r in plan if
                                                                         r.reason.startswith("kept: too")]}
            if has_bn:
                recalibrate_batchnorm(model, bn_batches)
                row["accuracy_bn"] = accuracy(model.eval(), test, progress=False)
            if plan_name != "uniform" and step == "seq+joint" or (plan_name == "uniform" and step == "svd"):
                tuned = copy.deepcopy(model)
                clock = Clock()
                finetune(tuned, third, None, teacher=original, epochs=1, lr=args.fmnist_lr, optimizer="adamw",
                         weight_decay=1e-4, schedule=None, batch_size=128, seed=1, device="cpu", progress=False)
                row["accuracy_third_epoch"] = accuracy(tuned, test, progress=False)
                row["third_epoch"] = clock()
            rows.append(row)
            print(json.dumps(row), flush=True)
    return {"model": name, "original_accuracy": base, "params": sum(p.numel() for p in original.parameters()),
            "macs": count_macs(original, calibration[0][:1]),
            "calibration_images": args.fmnist_calibration * 128, "bn_images": args.fmnist_bn * 128,
            "fisher": "task loss (the calibration images' labels)", "rows": rows}


# ---- report -------------------------------------------------------------------------------------------


def markdown(result: dict, meta: dict) -> str:
    rows = result["rows"]
    lines = [f"# {result['model']}: calibration steps, one at a time", "",
             f"Command: `{meta['command']}`; {meta['machine']}; load average {meta['load']}; {meta['created']}. "
             f"Times: process CPU seconds with one thread (wall seconds in the JSON).", ""]
    if "cosine" in rows[0]:
        lines += ["| ratio | plan | step | candidate params | cosine mean | cosine min | CPU s |", "|---|---|---|---|---|---|---|"]
        share = 0.0
        for r in rows:
            share = r.get("candidate_share", share)  # a distillation row trains the model of the row above
            lines.append(f"| {r['ratio']:g} | {r['plan']} | {r['step']} | {share:.3f}x | "
                         f"{r['cosine']:.4f} | {r['cosine_min']:.4f} | {r['cpu_s']:.1f} |")
    elif "top1_agreement" in rows[0]:
        lines += ["| ratio | calibration | plan | step | candidate params | top-1 agreement | KL | top-1 accuracy | CPU s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['ratio']:g} | {r['calibration']} | {r['plan']} | {r['step']} | "
                         f"{r['candidate_share']:.3f}x | {100 * r['top1_agreement']:.0f}% | {r['kl']:.3f} | "
                         f"{100 * r['top1_accuracy']:.0f}% | {r['cpu_s']:.1f} |")
    else:
        lines += [f"Original test accuracy {100 * result['original_accuracy']:.2f}%, {result['params']:,} parameters, "
                  f"{result['macs']:,} MACs per image.", "",
                  "| ratio | plan | step | candidate params | model params | model MACs | accuracy | + BN re-estimated "
                  "| after 1/3 epoch | CPU s |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            bn = f"{100 * r['accuracy_bn']:.2f}%" if "accuracy_bn" in r else "-"
            third = f"{100 * r['accuracy_third_epoch']:.2f}%" if "accuracy_third_epoch" in r else "-"
            lines.append(f"| {r['ratio']:g} | {r['plan']} | {r['step']} | {r['candidate_share']:.3f}x | "
                         f"{r['params'] / result['params']:.3f}x | {r['macs'] / result['macs']:.3f}x | "
                         f"{100 * r['accuracy']:.2f}% | {bn} | {third} | {r['cpu_s']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,effnet,fmnist-cnn,fmnist-vit")
    parser.add_argument("--ratios", default=",".join(f"{r:g}" for r in RATIOS))
    parser.add_argument("--steps", default="svd,whiten,seq,seq+last,seq+joint",
                        help="uniform-plan steps to run (the allocated plan always runs whiten and seq+joint)")
    parser.add_argument("--distill-ratios", default="1.5,2", help="MiniLM ratios to distil after the full pipeline")
    parser.add_argument("--distill-seconds", type=float, default=300, help="CPU seconds of distillation (default 300)")
    parser.add_argument("--distill-chunk", type=int, default=80, help="steps between scores (default 80)")
    parser.add_argument("--distill-lr", type=float, default=1e-4)
    parser.add_argument("--distill-freeze", default=None, help="freezing schedule during distillation (default none)")
    parser.add_argument("--effnet-images", type=int, default=64, help="calibration crops per fold (default 64)")
    parser.add_argument("--fmnist-calibration", type=int, default=8, help="calibration batches of 128 (default 8)")
    parser.add_argument("--fmnist-bn", type=int, default=20, help="BatchNorm batches of 128 (default 20)")
    parser.add_argument("--fmnist-lr", type=float, default=5e-4, help="1/3-epoch fine-tuning AdamW lr (default 5e-4)")
    parser.add_argument("--fmnist-steps", default="svd,whiten,seq,seq+joint", help="uniform-plan steps for the "
                                                                                 "Fashion-MNIST models")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "calibration"), help="output prefix")
    parser.add_argument("--render", nargs="+", metavar="JSON", help="only rewrite the Markdown of these results")
    args = parser.parse_args(argv)
    if args.render:
        for path in map(Path, args.render):
            result = json.loads(path.read_text())
            path.with_suffix(".md").write_text(markdown(result, result["meta"]))
        return 0
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    args.ratios = [float(r) for r in args.ratios.split(",")]
    args.steps = tuple(s for s in args.steps.split(",") if s)
    args.fmnist_steps = tuple(s for s in args.fmnist_steps.split(",") if s)
    args.distill_ratios = [float(r) for r in args.distill_ratios.split(",") if r]
    meta = {"command": "python benchmarks/calibration_ablation.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), "
                       f"torch {torch.__version__}, lrdaccel {lrd.__version__}",
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    runners = {"minilm": minilm, "effnet": efficientnet, "fmnist-cnn": lambda a: fmnist("fmnist-cnn", a),
               "fmnist-vit": lambda a: fmnist("fmnist-vit", a)}
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        clock = Clock()
        meta["load"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
        result = runners[name](args)
        result.update(meta=dict(meta), seconds=clock())
        out = f"{args.out}_{name}"
        Path(out + ".json").write_text(json.dumps(result, indent=1) + "\n")
        Path(out + ".md").write_text(markdown(result, meta))
        print(markdown(result, meta), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
