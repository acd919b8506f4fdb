"""Which int8 library `lrd.quantize` uses: torchao's CPU int8 dynamic path against PyTorch's own
`torch.ao.quantization.quantize_dynamic` (per-tensor and per-channel weight scales) on the real
all-MiniLM-L6-v2: one batch of 64 WordNet glosses of at most 40 tokens, 1 thread, eager,
interleaved (lrdaccel.measure.timer), and the cosine of mean-pooled embeddings against fp32 on
that batch.

    python benchmarks/int8_library_choice.py        # ~2 min

Writes benchmarks/results/int8_serving/library_choice.{json,md}.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from lrdaccel import zoo  # noqa: E402
from lrdaccel.calibration import corpora  # noqa: E402
from lrdaccel.measure.timer import Phase, Workload, measure_interleaved, spread  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "int8_serving"


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    import torchao

    tokenizer, original = zoo.minilm_tokenizer(), zoo.minilm().eval()
    texts = [t for t in corpora.sentences("calibration", kinds="gloss", limit=400)
             if len(tokenizer(t)["input_ids"]) <= 40][:64]
    batch = corpora.tokenized_batches(tokenizer, texts, batch_size=64, max_length=40)[0]
    models = {"fp32": original}
    models["torchao Int8DynamicActivationInt8WeightConfig"] = copy.deepcopy(original)
    quantize_(models["torchao Int8DynamicActivationInt8WeightConfig"], Int8DynamicActivationInt8WeightConfig())
    qconfigs = {"per-tensor": torch.ao.quantization.default_dynamic_qconfig,
                "per-channel": torch.ao.quantization.per_channel_dynamic_qconfig}
    for name, qconfig in qconfigs.items():
        models[f"torch.ao quantize_dynamic {name}"] = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(original), {torch.nn.Linear: qconfig})
    mask = batch["attention_mask"].unsqueeze(-1).float()

    def pooled(model) -> torch.Tensor:
        with torch.inference_mode():
            return (model(**batch).last_hidden_state * mask).sum(1) / mask.sum(1)

    reference = pooled(original)
    steps = [Workload(name, [Phase(lambda m=model: pooled(m))]) for name, model in models.items()]
    timings = measure_interleaved(steps, repeats=5, warmup=1, min_run_time=0.5, alternate=True)
    rows = [{"name": name, "ms": spread([s * 1e3 for s in timings.seconds[name]]),
             "cosine": float(F.cosine_similarity(pooled(model), reference).mean())} for name, model in models.items()]
    OUT.mkdir(parents=True, exist_ok=True)
    results = {"torch": torch.__version__, "torchao": torchao.__version__, "threads": 1, "rows": rows}
    (OUT / "library_choice.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [f"torch {torch.__version__}, torchao {torchao.__version__}, 1 thread, 5 interleaved repeats "
             f"(the machine shared with other jobs)", "", "| int8 path | time (ms) min / median / max | cosine |",
             "|---|---|---|"]
    lines += [f"| {r['name']} | {r['ms']['min']:.0f} / {r['ms']['median']:.0f} / {r['ms']['max']:.0f} | "
              f"{r['cosine']:.3f} |" for r in rows]
    (OUT / "library_choice.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
