"""Activation-aware (method="whiten") vs plain (method="svd") decomposition at the same ranks.

Two real models, each decomposed both ways from the same plan:

- all-MiniLM-L6-v2 at ratios 1.5 / 2 / 3: sentence embeddings (mean-pooled over the attention
  mask, as sentence-transformers does) of 40 English sentences, compared with the original's:
  cosine, relative L2 error, and a task metric: paraphrase retrieval (each evaluation sentence has
  one paraphrase among the 40; is its nearest neighbour that paraphrase?). Calibration uses 40
  other sentences on other subjects.
- The zoo's "fmnist-cnn" trained on Fashion-MNIST, at ratios 2 / 3 (the 1-channel stem kept, as
  the demo does): logits error and test accuracy right after decomposition, and after one epoch
  of fine-tuning (lrd.finetune, all factors trainable, SGD, cosine LR). Calibration:
  8 batches of 128 training images.

"Layer output error" is per decomposed layer, on held-out inputs the ORIGINAL model feeds it:
||y - y_hat|| / ||y|| over all its outputs, then the mean over layers. It isolates what each
method optimises from how errors compound through the network.

Run:  .venv/bin/python benchmarks/whiten_report.py            (~10 min on 2 idle CPU cores)
      .venv/bin/python benchmarks/whiten_report.py --quick    (small slices, a smoke test)
Writes benchmarks/results/whiten_report.json and whiten_report.md. The trained CNN is cached in
benchmarks/scratch/ (git-ignored) with its training recipe, and retrained when the recipe differs.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.stats import spearmanr
from torch import nn
from torch.utils.data import TensorDataset

import lrdaccel as lrd
from lrdaccel import data, zoo
from lrdaccel.bench.demo_pipeline import keep_input_layer
from lrdaccel.training.evaluate import accuracy
from lrdaccel.training.loop import finetune

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SCRATCH = HERE / "scratch"
METHODS = ("svd", "whiten")

# Calibration: everyday prose on subjects the evaluation set does not use.
CALIBRATION_SENTENCES = [
    "The library extended its opening hours during the exam period.",
    "A small bakery on the corner sells fresh bread every morning.",
    "The orchestra rehearsed the symphony for three weeks before the concert.",
    "Volunteers cleaned the beach and collected several bags of plastic.",
    "The old bridge was closed for repairs after the inspection.",
    "My grandmother taught me how to knit scarves and hats.",
    "The city council approved a plan to build more bicycle lanes.",
    "He practised the piano for an hour before dinner.",
    "The hotel room had a balcony with a view of the harbour.",
    "Farmers are worried that the dry summer will ruin the harvest.",
    "The documentary explains how honeybees communicate with each other.",
    "She renewed her passport a month before the trip.",
    "The restaurant changes its menu with the seasons.",
    "Our neighbours adopted a kitten from the animal shelter.",
    "The lecture on medieval history was surprisingly entertaining.",
    "A power cut left the whole street in darkness for two hours.",
    "The teacher asked the students to read the first chapter at home.",
    "They painted the kitchen a pale shade of yellow.",
    "The marathon route passes through the historic centre of town.",
    "Fresh snow made the ski slopes perfect on Saturday.",
    "The committee will announce the winners of the poetry prize next week.",
    "He repaired the bicycle chain with a borrowed tool.",
    "The ferry crossing was rough because of the strong wind.",
    "Local artists decorated the walls of the underpass with murals.",
    "The pharmacy on Main Street is open until midnight.",
    "Our team spent the afternoon planning the next product release.",
    "The garden party was moved indoors because of the rain.",
    "She wrote a long letter to her friend who lives abroad.",
    "The zoo welcomed two baby elephants this spring.",
    "A new study links regular exercise to better sleep.",
    "The theatre sold out every performance of the comedy.",
    "He prefers tea without sugar in the afternoon.",
    "The castle ruins attract thousands of tourists each summer.",
    "The printer in the office keeps jamming on thick paper.",
    "Migrating geese flew over the lake in a long line.",
    "The chef recommended the grilled fish with lemon sauce.",
    "Our flat is a short walk from the railway station.",
    "The children built a sandcastle with a moat around it.",
    "The conference will take place online this year.",
    "An old clock ticked loudly in the quiet hallway.",
]

# Evaluation: 20 paraphrase pairs (sentence 2k and 2k+1 say the same thing), other subjects.
EVALUATION_SENTENCES = [
    "A dog is sleeping on the porch in the sun.", "The puppy naps in the sunshine outside the front door.",
    "The stock market fell sharply on Monday morning.", "Share prices dropped steeply at the start of the week.",
    "My flight was cancelled because of the storm.", "The airline called off my plane due to bad weather.",
    "The new medicine reduced symptoms in most patients.", "Most people who took the new drug felt better.",
    "Please install the latest update to protect your computer.", "Update your PC to the newest version to stay secure.",
    "The football club celebrated its victory in the city centre.", "Fans and players partied downtown after the team won.",
    "The meeting has been moved to Thursday afternoon.", "We rescheduled the meeting for Thursday after lunch.",
    "Ice on the highway caused several car accidents.", "Several crashes happened because the motorway was icy.",
    "The company announced record profits this quarter.", "The firm reported its highest earnings ever for the quarter.",
    "Mix the butter and sugar before adding the eggs.", "Cream the sugar with the butter, then add the eggs.",
    "Astronomers discovered a planet orbiting a nearby star.", "Scientists found a new world circling a close star.",
    "The train was late again this morning.", "This morning my train was delayed once more.",
    "She is learning to speak Japanese.", "She is studying the Japanese language.",
    "The kids played football in the park until dark.", "The children kicked a ball around the park until night fell.",
    "The museum is free on the first Sunday of every month.", "Entry to the museum costs nothing on the first Sunday of each month.",
    "Turn off the lights when you leave the room.", "Switch the lights off when you go out of the room.",
    "The price of petrol went up again.", "Fuel has become more expensive once again.",
    "He lost his keys somewhere in the shopping centre.", "He misplaced his keys while at the mall.",
    "The volcano erupted, sending ash high into the sky.", "Ash shot far into the air when the volcano blew.",
    "I can't find my glasses anywhere.", "My spectacles seem to have vanished.",
]


# ---- shared measurements ----------------------------------------------------------------------


@torch.no_grad()
def layer_output_errors(original: nn.Module, decomposed: nn.Module, names: list[str], batches) -> dict[str, float]:
    """||y - y_hat|| / ||y|| per decomposed layer, each fed the inputs the ORIGINAL model gives it."""
    sums = {name: [0.0, 0.0] for name in names}
    handles = []

    def hook_for(name):
        replacement = decomposed.get_submodule(name)

        def hook(_module, args, output):
            sums[name][0] += float((output - replacement(args[0])).double().square().sum())
            sums[name][1] += float(output.double().square().sum())

        return hook

    was_training = original.training
    original.eval()
    try:
        for name in names:
            handles.append(original.get_submodule(name).register_forward_hook(hook_for(name)))
        for batch in batches:
            if isinstance(batch, Mapping):  # a tokenizer's BatchEncoding
                original(**batch)
            else:
                original(batch)
    finally:
        for handle in handles:
            handle.remove()
        original.train(was_training)
    return {name: math.sqrt(err / norm) if norm else float("nan") for name, (err, norm) in sums.items()}


def decompose_copy(model: nn.Module, plan: lrd.Plan, method: str, calibration) -> tuple[nn.Module, float]:
    """A decomposed copy of `model` (the original stays intact), and the seconds it took."""
    copied = copy.deepcopy(model)
    start = time.perf_counter()
    lrd.decompose(copied, plan, method=method, calibration=calibration if method == "whiten" else None)
    return copied.eval(), time.perf_counter() - start


# ---- MiniLM -----------------------------------------------------------------------------------


@torch.no_grad()
def sentence_embeddings(model: nn.Module, batch) -> torch.Tensor:
    """Mean of the last hidden states over real tokens (sentence-transformers' pooling)."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def paraphrase_top1(embeddings: torch.Tensor) -> float:
    """Share of sentences whose nearest other sentence (cosine) is their paraphrase partner."""
    unit = F.normalize(embeddings.double(), dim=1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-2.0)
    partner = torch.arange(len(unit)) ^ 1
    return float((similarity.argmax(1) == partner).double().mean())


def similarity_spearman(reference: torch.Tensor, embeddings: torch.Tensor) -> float:
    """Rank correlation of all pairwise cosine similarities with the original model's."""
    def pairwise(e):
        unit = F.normalize(e.double(), dim=1)
        rows, cols = torch.triu_indices(len(e), len(e), offset=1)
        return (unit @ unit.T)[rows, cols].numpy()

    return float(spearmanr(pairwise(reference), pairwise(embeddings)).statistic)


def minilm_section(ratios: tuple[float, ...], batch_size: int = 8) -> dict:
    tokenizer = zoo.minilm_tokenizer()
    original = zoo.minilm().eval()

    def encode(sentences):
        return [tokenizer(sentences[i:i + batch_size], padding=True, truncation=True, return_tensors="pt")
                for i in range(0, len(sentences), batch_size)]

    calibration = encode(CALIBRATION_SENTENCES)
    evaluation = tokenizer(EVALUATION_SENTENCES, padding=True, truncation=True, return_tensors="pt")
    reference = sentence_embeddings(original, evaluation)
    rows = []
    for ratio in ratios:
        plan = lrd.plan(original, ratio=ratio, min_rank=1)
        names = [row.name for row in plan.decomposed]
        for method in METHODS:
            model, seconds = decompose_copy(original, plan, method, calibration)
            embeddings = sentence_embeddings(model, evaluation)
            layer_errors = layer_output_errors(original, model, names, [evaluation])
            rows.append({
                "ratio": ratio, "method": method, "layers": len(names),
                "params": sum(p.numel() for p in model.parameters()),
                "layer_output_error_mean": _mean(layer_errors.values()),
                "embedding_rel_error": float(((embeddings - reference).norm(dim=1) / reference.norm(dim=1)).mean()),
                "cosine_mean": float(F.cosine_similarity(embeddings, reference).mean()),
                "cosine_min": float(F.cosine_similarity(embeddings, reference).min()),
                "paraphrase_top1": paraphrase_top1(embeddings),
                "similarity_spearman": similarity_spearman(reference, embeddings),
                "decompose_seconds": seconds,
            })
            print(_row_text("minilm", rows[-1]), flush=True)
    return {
        "model": "all-MiniLM-L6-v2 (zoo.minilm)",
        "params": sum(p.numel() for p in original.parameters()),
        "calibration": f"{len(CALIBRATION_SENTENCES)} sentences in batches of {batch_size} "
                       f"({sum(int(b['attention_mask'].sum()) for b in calibration)} real tokens)",
        "evaluation": f"{len(EVALUATION_SENTENCES)} other sentences (20 paraphrase pairs)",
        "original_paraphrase_top1": paraphrase_top1(reference),
        "rows": rows,
    }


# ---- Fashion-MNIST CNN ------------------------------------------------------------------------

# The base model's recipe; the cache is reused only when it matches exactly.
CNN_RECIPE = {"model": "fmnist-cnn", "seed": 0, "epochs": 2, "lr": 0.05, "batch_size": 128, "optimizer": "sgd",
              "momentum": 0.9, "lr_schedule": "cosine", "normalize": "data.normalize"}


def trained_cnn(train: TensorDataset, progress: bool) -> tuple[nn.Module, dict]:
    """The base model: from the cache when it was trained by this recipe on this many images."""
    SCRATCH.mkdir(parents=True, exist_ok=True)
    weights, recipe_file = SCRATCH / "whiten_fmnist_cnn.safetensors", SCRATCH / "whiten_fmnist_cnn.json"
    recipe = {**CNN_RECIPE, "train_images": len(train)}
    torch.manual_seed(recipe["seed"])
    model = zoo.get("fmnist-cnn").build()
    if weights.is_file() and recipe_file.is_file() and json.loads(recipe_file.read_text()) == recipe:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(weights))
        return model.eval(), {"trained_here": False, "train_seconds": None}
    start = time.perf_counter()
    finetune(model, train, None, epochs=CNN_RECIPE["epochs"], lr=CNN_RECIPE["lr"], schedule=None,
             batch_size=CNN_RECIPE["batch_size"], seed=CNN_RECIPE["seed"], progress=progress)
    from safetensors.torch import save_file

    save_file(model.state_dict(), weights)
    recipe_file.write_text(json.dumps(recipe, indent=2, sort_keys=True))
    return model.eval(), {"trained_here": True, "train_seconds": time.perf_counter() - start}


@torch.no_grad()
def logits_rel_error(reference: nn.Module, model: nn.Module, images: torch.Tensor) -> float:
    expected = reference(images)
    return float((model(images) - expected).norm() / expected.norm())


def cnn_section(ratios: tuple[float, ...], train_limit: int | None, test_limit: int | None,
                calibration_batches: int, progress: bool) -> dict:
    raw_train, raw_test = data.load("fashion-mnist", "train", limit=train_limit), \
        data.load("fashion-mnist", "test", limit=test_limit)
    train = TensorDataset(data.normalize(raw_train.tensors[0]), raw_train.tensors[1])
    test = TensorDataset(data.normalize(raw_test.tensors[0]), raw_test.tensors[1])
    original, base_info = trained_cnn(train, progress)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(1))
    calibration = list(train.tensors[0][order[:calibration_batches * 128]].split(128))
    held_out = test.tensors[0][:1024]
    original_accuracy = accuracy(original, test, progress=False)
    rows = []
    for ratio in ratios:
        # min_rank=1: decompose every layer the ratio allows, small ones included (plan's default
        # keeps ranks below 8); more decomposed layers make the comparison harder, not easier.
        plan = lrd.plan(original, ratio=ratio, filter_fn=keep_input_layer(1), min_rank=1)
        names = [row.name for row in plan.decomposed]
        for method in METHODS:
            model, seconds = decompose_copy(original, plan, method, calibration)
            errors = layer_output_errors(original, model, names, held_out.split(256))
            row = {
                "ratio": ratio, "method": method, "layers": len(names),
                "params": sum(p.numel() for p in model.parameters()),
                "layer_output_error_mean": _mean(errors.values()),
                # Tucker-2 (3x3 convs) and SVD (1x1 shortcuts, classifier) apart: each method's own test.
                "tucker2_layer_output_error_mean": _mean(errors[r.name] for r in plan.decomposed if r.kind == "tucker2"),
                "svd_layer_output_error_mean": _mean(errors[r.name] for r in plan.decomposed if r.kind == "svd"),
                "logits_rel_error": logits_rel_error(original, model, held_out),
                "accuracy_decomposed": accuracy(model, test, progress=False),
                "decompose_seconds": seconds,
            }
            start = time.perf_counter()
            history = finetune(model, train, test, epochs=1, lr=0.01, schedule=None, batch_size=128, seed=0,
                               progress=progress)
            row["accuracy_finetuned_1_epoch"] = history.epochs[-1].test_accuracy
            row["finetune_seconds"] = time.perf_counter() - start
            rows.append(row)
            print(_row_text("fmnist-cnn", rows[-1]), flush=True)
    return {
        "model": "zoo fmnist-cnn trained on Fashion-MNIST by " + json.dumps(CNN_RECIPE, sort_keys=True),
        "base": base_info,
        "params": sum(p.numel() for p in original.parameters()),
        "original_accuracy": original_accuracy,
        "train_images": len(train), "test_images": len(test),
        "calibration": f"{len(calibration)} batches of 128 training images (seed 1)",
        "finetune": "1 epoch, lrd.finetune: SGD momentum 0.9, lr 0.01 cosine, batch 128, no freezing",
        "rows": rows,
    }


# ---- output -----------------------------------------------------------------------------------


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _row_text(model: str, row: dict) -> str:
    keys = [k for k in row if k not in ("ratio", "method", "layers", "params")]
    return f"{model} ratio {row['ratio']} {row['method']:<6} " + " ".join(
        f"{k}={row[k]:.4f}" if isinstance(row[k], float) else f"{k}={row[k]}" for k in keys)


def markdown(results: dict) -> str:
    lines = ["# Activation-aware (whiten) vs plain (svd) decomposition, same ranks", "",
             f"Command: `{results['command']}`; {results['machine']}; {results['seconds']:.0f} s wall time "
             f"(on a shared machine: other jobs' load stretches it). One seed per row.", "",
             "Layer output error: per decomposed layer, ||y - y_hat|| / ||y|| on held-out inputs the original "
             "model feeds it, averaged over layers. 'acc. decomposed' keeps the original BatchNorm statistics "
             "and is an argmax over heavily perturbed logits, so it is noisier than the logits error.", ""]
    section = results.get("minilm")
    if section:
        lines += [f"## {section['model']}", "",
                  f"Calibration: {section['calibration']}. Evaluation: {section['evaluation']}. "
                  f"Original paraphrase top-1: {section['original_paraphrase_top1']:.3f}.", "",
                  "| ratio | method | layer out. err (mean) | embedding rel. err | cosine mean | cosine min "
                  "| paraphrase top-1 | similarity Spearman |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in section["rows"]:
            lines.append(f"| {r['ratio']} | {r['method']} | {r['layer_output_error_mean']:.3f} | "
                         f"{r['embedding_rel_error']:.3f} | {r['cosine_mean']:.3f} | {r['cosine_min']:.3f} | "
                         f"{r['paraphrase_top1']:.3f} | {r['similarity_spearman']:.3f} |")
        lines.append("")
    section = results.get("cnn")
    if section:
        lines += [f"## Fashion-MNIST CNN ({section['params']:,} params, {section['test_images']} test images)", "",
                  f"Original test accuracy {100 * section['original_accuracy']:.2f}%. Calibration: "
                  f"{section['calibration']}. Fine-tuning: {section['finetune']}.", "",
                  "| ratio | method | layer out. err (mean) | Tucker-2 layers | SVD layers | logits rel. err "
                  "| acc. decomposed | acc. +1 epoch |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in section["rows"]:
            lines.append(f"| {r['ratio']} | {r['method']} | {r['layer_output_error_mean']:.3f} | "
                         f"{r['tucker2_layer_output_error_mean']:.3f} | {r['svd_layer_output_error_mean']:.3f} | "
                         f"{r['logits_rel_error']:.3f} | {100 * r['accuracy_decomposed']:.2f}% | "
                         f"{100 * r['accuracy_finetuned_1_epoch']:.2f}% |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small slices and one ratio each: a smoke test")
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--skip-cnn", action="store_true")
    parser.add_argument("--progress", action="store_true", help="tqdm bars for training")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    results = {"command": " ".join(["python benchmarks/whiten_report.py", *sys.argv[1:]]),
               "machine": f"{platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads, CPU"}
    previous_path = RESULTS / "whiten_report.json"
    previous = json.loads(previous_path.read_text()) if previous_path.is_file() and not args.quick else {}
    for section, skipped in (("minilm", args.skip_minilm), ("cnn", args.skip_cnn)):
        if skipped and section in previous:  # a skipped section keeps its last results
            results[section] = previous[section]
    if not args.skip_minilm:
        results["minilm"] = minilm_section((2.0,) if args.quick else (1.5, 2.0, 3.0))
    if not args.skip_cnn:
        if args.quick:
            results["cnn"] = cnn_section((2.0,), 2048, 1024, 2, args.progress)
        else:
            results["cnn"] = cnn_section((2.0, 3.0), None, None, 8, args.progress)
    results["seconds"] = time.perf_counter() - start
    if args.quick:
        print(markdown(results))
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "whiten_report.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    (RESULTS / "whiten_report.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
