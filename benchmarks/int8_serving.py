"""Int8 serving, side by side: every form of a model (original, LRD ratio 2 whitened, pruned to
LRD's parameters) in fp32 and int8, in PyTorch (`lrd.quantize`) and ONNX Runtime
(`lrd.export_onnx(..., quantize="int8")`), 1 thread, interleaved, with fidelity.

- minilm: the real all-MiniLM-L6-v2; timed on one batch of 64 WordNet glosses of at most 40
  tokens; fidelity is the cosine of mean-pooled embeddings against the fp32 original on held-out
  glosses (lrdaccel.calibration.corpora's evaluation split). LRD is whitened with 256 other
  calibration glosses; dynamic int8 (no calibration needed).
- fmnist-cnn: the Fashion-MNIST CNN trained here (benchmarks/starting_models.py, cached); timed
  on a batch of 64 test images; fidelity is test accuracy. LRD keeps the layer reading the image
  and is whitened with 1,024 training images; int8 convs are static, calibrated on 512 of them.

No fine-tuning anywhere: the fidelity columns are what each form loses as built.

    python benchmarks/int8_serving.py                       # ~8 min on a loaded 2-core machine
    python benchmarks/int8_serving.py --models fmnist-cnn --repeats 3

Writes benchmarks/results/int8_serving/{results.json,results.md}.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
import lrdaccel as lrd  # noqa: E402
from lrdaccel import zoo  # noqa: E402
from lrdaccel.bench.demo_pipeline import keep_input_layer  # noqa: E402
from lrdaccel.calibration import corpora  # noqa: E402
from lrdaccel.data import standardized_splits  # noqa: E402
from lrdaccel.deploy.onnx_session import make_session, run_session, feeds, session_step  # noqa: E402
from lrdaccel.measure.counting import count_params  # noqa: E402
from lrdaccel.measure.timer import Phase, Workload, measure_interleaved, spread  # noqa: E402
from lrdaccel.peers import prune  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from starting_models import trained_fmnist_cnn  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "int8_serving"
BATCH = 64


def glosses(split: str, tokenizer, count: int, max_tokens: int = 40) -> list[str]:
    texts = corpora.sentences(split, kinds="gloss", limit=count * 3)
    return [t for t in texts if len(tokenizer(t)["input_ids"]) <= max_tokens][:count]


def minilm_forms() -> tuple[dict, dict, list, callable]:
    tokenizer = zoo.minilm_tokenizer()
    original = zoo.minilm().eval()
    batch = corpora.tokenized_batches(tokenizer, glosses("calibration", tokenizer, BATCH), BATCH, 40)[0]
    calibration = corpora.tokenized_batches(tokenizer, glosses("calibration", tokenizer, 320)[64:], 64, 40)
    held_out = corpora.tokenized_batches(tokenizer, glosses("evaluation", tokenizer, 448), 64, 40)
    decomposed = copy.deepcopy(original)
    lrd.decompose(decomposed, ratio=2.0, method="whiten", calibration=calibration)
    pruned, _ = prune(original, batch, target_params=count_params(decomposed))

    def pooled(output, inputs) -> torch.Tensor:
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        return (torch.as_tensor(output) * mask).sum(1) / mask.sum(1)

    with torch.inference_mode():
        reference = torch.cat([pooled(original(**b).last_hidden_state, b) for b in held_out])

    def fidelity(run) -> float:
        got = torch.cat([pooled(run(b), b) for b in held_out])
        return float(F.cosine_similarity(got, reference).mean())

    return {"original": original, "lrd": decomposed, "pruned": pruned}, batch, calibration[:2], \
        ("cosine", fidelity, held_out)


def cnn_forms() -> tuple[dict, torch.Tensor, list, tuple]:
    original = trained_fmnist_cnn("fmnist-cnn", train_limit=30000, progress=False)
    train, test = standardized_splits("fashion-mnist", train_limit=30000)
    images, labels = test.tensors
    batch = images[:BATCH]
    calibration = list(train.tensors[0][:1024].split(128))
    decomposed = copy.deepcopy(original)
    lrd.decompose(decomposed, ratio=2.0, method="whiten", calibration=calibration,
                  filter_fn=keep_input_layer(1))
    pruned, _ = prune(original, batch, target_params=count_params(decomposed))
    test_batches = list(images.split(1000))

    def fidelity(run) -> float:
        predicted = torch.cat([torch.as_tensor(run(b)).argmax(-1) for b in test_batches])
        return float((predicted == labels).float().mean() * 100)

    return {"original": original, "lrd": decomposed, "pruned": pruned}, batch, calibration[:4], \
        ("test accuracy %", fidelity, test_batches)


def call(model, inputs):
    out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


def run_model(name: str, repeats: int, scratch: Path) -> dict:
    forms, batch, calibration, (metric, fidelity, _) = minilm_forms() if name == "minilm" else cnn_forms()
    static = calibration if name == "fmnist-cnn" else None
    runners, steps, params, exports = {}, [], {}, {}
    for form, model in forms.items():
        params[form] = count_params(model)
        quantized = lrd.quantize(model, "int8", calibration=static)
        for precision, torch_model in (("fp32", model), ("int8", quantized)):
            label = f"{form} {precision} PyTorch"
            runners[label] = torch.inference_mode()(lambda b, m=torch_model: call(m, b))
            steps.append(Workload(label, [Phase(lambda m=torch_model: runners_step(m, batch))]))
            path = scratch / f"{name}-{form}-{precision}.onnx"
            began = time.perf_counter()
            report = lrd.export_onnx(model, batch, path, quantize="int8" if precision == "int8" else None,
                                     calibration=static if precision == "int8" else None)
            exports[f"{form} {precision}"] = {"seconds": time.perf_counter() - began, "worst": report.worst,
                                             "cosine": min((c["cosine"] for c in report.checks if "cosine" in c),
                                                           default=None)}
            session = make_session(str(path))
            label = f"{form} {precision} ONNX Runtime"
            runners[label] = lambda b, s=session: run_session(s, feeds(s, b))[0]
            steps.append(Workload(label, [Phase(session_step(session, batch))]))
    print(f"{name}: forms built and exported; timing {len(steps)} workloads x {repeats} repeats", flush=True)
    timings = measure_interleaved(steps, repeats=repeats, warmup=1, min_run_time=0.3, alternate=True)
    base = timings.seconds["original fp32 PyTorch"]
    rows = []
    for label, seconds in timings.seconds.items():
        form = label.split()[0]
        rows.append({"name": label, "params": params[form], "ms": spread([s * 1e3 for s in seconds]),
                     "speedup": spread([b / s for b, s in zip(base, seconds)]),
                     metric: fidelity(runners[label])})
    return {"metric": metric, "rows": rows, "exports": exports}


def runners_step(model, batch):
    with torch.inference_mode():
        return call(model, batch)


def markdown(results: dict) -> str:
    lines = [f"Int8 serving ({results['date']}, {results['machine']}, {results['threads']} thread, "
             f"{results['repeats']} interleaved repeats; the machine was shared with other jobs). Batch {BATCH}; "
             "time min / median / max; speed-up is the median over repeats of the original fp32 PyTorch time "
             "over the row's, in the same repeat.", ""]
    for name, model in results["models"].items():
        metric = model["metric"]
        lines += [f"### {name}", "", f"| form | params | time (ms) | speed-up | {metric} |", "|---|---|---|---|---|"]
        for row in model["rows"]:
            ms = row["ms"]
            lines.append(f"| {row['name']} | {row['params'] / 1e6:.2f}M | {ms['min']:.1f} / {ms['median']:.1f} / "
                         f"{ms['max']:.1f} | {row['speedup']['median']:.2f}x | {row[metric]:.3f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="minilm,fmnist-cnn")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    results = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
               "threads": torch.get_num_threads(), "repeats": args.repeats, "torch": torch.__version__,
               "models": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models.split(","):
            began = time.perf_counter()
            results["models"][name] = run_model(name, args.repeats, Path(scratch))
            results["models"][name]["seconds"] = time.perf_counter() - began
            print(f"{name} done in {results['models'][name]['seconds']:.0f} s", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "results.md").write_text(markdown(results) + "\n")
    print(markdown(results))


if __name__ == "__main__":
    main()
