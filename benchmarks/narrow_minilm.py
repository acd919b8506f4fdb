"""The narrow form on the real all-MiniLM-L6-v2, no training, 1 thread: fidelity and serving speed
against the factorized form and torch-pruning at the same parameters.

Fidelity: cosine of mean-pooled embeddings (real tokens only) of 600 held-out WordNet noun glosses
(`wordnet-supersense`'s eval split, at most 40 tokens) against the original's; calibration: 256
glosses of the train split. Serving: one batch of 64 eval glosses (at most 40 tokens, padded to the
longest), eager, every model timed interleaved (lrdaccel.measure.timer), min/median/max of the
speed-up over the original per repeat.

Variants:
- narrow FFN r2: `lrd.plan(model, ratio=2, form="narrow", exclude=r".*attention.*")`: each FFN
  keeps half its neurons, the output projection refitted (pivoted QR selection);
- narrow r2: `lrd.plan(model, ratio=2, form="narrow")`: the FFNs as above and every attention
  head keeps half its dimensions (query/key and value/output jointly, whitened SVD per head);
- factorized FFN r2 (whitened SVD of the same twelve Linears at ratio 2: the same parameters);
- narrow FFN + factorized attention r2: the FFNs narrowed, the attention Linears whitened SVD at
  ratio 2 (every Linear at ratio 2);
- lrd r2 whitened: every Linear whitened SVD at ratio 2 (lrdaccel 0.3.0's `lrd` ratio 2);
- prune at the parameters of narrow FFN r2 and of narrow r2 (the other variants have about the
  same counts as one of them): torch-pruning, magnitude, heads and FFN neurons (`lrdaccel.peers.prune`).

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/narrow_minilm.py     # ~5 min on one core

Writes benchmarks/results/narrow/minilm.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import lrdaccel as lrd
from lrdaccel import peers, zoo
from lrdaccel.measure.counting import count_params
from lrdaccel.measure.timer import Phase, Workload, measure_interleaved, ratio_to_baseline, spread
from lrdaccel.planning import Plan
from lrdaccel.tasks.text import wordnet_supersense

FFN = r"encoder\.layer\.\d+\.(intermediate|output)\.dense"
MAX_TOKENS = 40


def tokenize(tokenizer, texts: list[str]) -> dict:
    return dict(tokenizer(texts, padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt"))


@torch.no_grad()
def embeddings(model, batches: list[dict]) -> torch.Tensor:
    pooled = []
    for batch in batches:
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(pooled)


def chunks(tokenizer, texts: list[str], size: int) -> list[dict]:
    return [tokenize(tokenizer, texts[i:i + size]) for i in range(0, len(texts), size)]


def variants(original, calibration: list[dict], example: dict) -> dict:
    """name -> (model, seconds to build)."""
    built = {}

    def make(name, plan, **settings):
        start = time.perf_counter()
        model = copy.deepcopy(original)
        lrd.decompose(model, plan, calibration=calibration, **settings)
        built[name] = (model, time.perf_counter() - start)

    narrow = lrd.plan(original, ratio=2, form="narrow", example_inputs=example, exclude=r".*attention.*")
    make("narrow FFN r2", narrow)
    make("narrow r2 (FFN + attention heads)", lrd.plan(original, ratio=2, form="narrow", example_inputs=example))
    make("factorized FFN r2 (whitened)", lrd.plan(original, ratio=2, include=FFN), method="whiten")
    factor = lrd.plan(original, ratio=2)
    mixed = Plan([factor[row.name] if row.name in {r.name for r in factor.changed} and row.kind == "keep" else row
                  for row in narrow], ratio=2.0)
    make("narrow FFN + factorized attention r2", mixed, method="whiten")
    make("lrd r2 (whitened)", factor, method="whiten")
    before = count_params(original)
    for name in ("narrow FFN r2", "narrow r2 (FFN + attention heads)"):  # the others: about the same counts
        fraction = count_params(built[name][0]) / before
        start = time.perf_counter()
        pruned, _ = peers.prune(original, example, params_fraction=fraction)
        built[f"prune at {name}"] = (pruned.eval(), time.perf_counter() - start)
    return built


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/narrow")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--eval", type=int, default=600)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    started = time.perf_counter()
    original, tokenizer = zoo.minilm().eval(), zoo.minilm_tokenizer()
    splits = wordnet_supersense()
    calibration = chunks(tokenizer, splits.train_texts[:256], 32)
    evaluation = chunks(tokenizer, splits.eval_texts[:args.eval], 100)
    serving = tokenize(tokenizer, splits.eval_texts[:64])
    reference = embeddings(original, evaluation)
    models = {"original": (original, 0.0), **variants(original, calibration, calibration[0])}
    rows = {}
    for name, (model, seconds) in models.items():
        cosine = F.cosine_similarity(embeddings(model, evaluation), reference).mean().item()
        rows[name] = {"params": count_params(model), "cosine": round(cosine, 4), "build_s": round(seconds, 1)}

    def step(model):
        def serve():
            with torch.no_grad():
                return model(**serving)
        return serve

    workloads = [Workload(name, [Phase(step(model))]) for name, (model, _) in models.items()]
    timings = measure_interleaved(workloads, repeats=args.repeats, warmup=2, min_run_time=1.0, alternate=True)
    for name in models:
        rows[name]["ms"] = {k: round(v * 1e3, 1) for k, v in spread(timings.seconds[name]).items() if k != "values"}
        rows[name]["speedup"] = {k: round(v, 3) for k, v in ratio_to_baseline(timings, name, "original").items()
                                 if k != "values"}
    report = {"model": "all-MiniLM-L6-v2", "threads": 1, "eval_glosses": args.eval, "calibration_glosses": 256,
              "serving_batch": list(serving["input_ids"].shape), "repeats": args.repeats,
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__,
              "seconds": round(time.perf_counter() - started), "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "minilm.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "minilm.md").write_text(markdown(report))
    print(markdown(report))
    return 0


def markdown(report: dict) -> str:
    before = report["rows"]["original"]["params"]
    lines = [f"all-MiniLM-L6-v2, no training, {report['threads']} thread, eager; cosine of mean-pooled embeddings "
             f"of {report['eval_glosses']} held-out WordNet glosses vs the original; serving batch "
             f"{report['serving_batch']} (glosses, <= {MAX_TOKENS} tokens), {report['repeats']} interleaved repeats.",
             "", "| model | params | cosine | median ms | speed-up median (min-max) |", "|---|---|---|---|---|"]
    for name, row in report["rows"].items():
        s = row["speedup"]
        lines.append(f"| {name} | {row['params'] / 1e6:.2f}M ({row['params'] / before:.3f}x) | {row['cosine']:.3f} | "
                     f"{row['ms']['median']:.0f} | {s['median']:.2f}x ({s['min']:.2f}-{s['max']:.2f}) |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
