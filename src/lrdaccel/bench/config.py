"""What the paper table measures: its rows (`Variant`) and its settings (`BenchConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lrdaccel import zoo
from lrdaccel._settings import check_choice, check_int, check_number
from lrdaccel.factorize.ranks import check_ratio
from lrdaccel.measure.runtimes import INFERENCE_ONLY, RUNTIMES, check_compile_mode, check_runtime
from lrdaccel.measure.steps import Placement
from lrdaccel.measure.timer import OBJECTIVES
from lrdaccel.peers._extra import require_peers

FULL_MODELS = ("resnet50", "resnet101", "resnet152", "vit-b16")
QUICK_MODELS = ("resnet-mini", "vit-tiny")
QUICK_SETTINGS = {"models": list(QUICK_MODELS), "batch_size": 2, "min_run_time": 0.05, "rank_budget_s": 2.0,
                  "rank_min_run_time": 0.05, "quick": True}


@dataclass(frozen=True)
class Variant:
    """One row of the table.

    Attributes:
        key: short id used in the results JSON.
        label: what the table shows.
        plan: None for the original, "ratio", "optimized" or "merged" (`lrd.plan(..., merge=True)`:
            bottlenecks merged into three narrower convs, the other layers at ratio ranks).
        schedule: SequentialFreezer schedule while training, None for no freezing.
        infer_as: the row whose inference measurement this one shares (same inference graph).
        peer: for a peer's row (what users would pick instead of LRD), its kind ("prune"); its
            `plan` is then the LRD plan whose whole-model parameters it is matched to.
    """

    key: str
    label: str
    plan: str | None = None
    schedule: str | None = None
    infer_as: str | None = None
    peer: str | None = None


INFER_OURS = ("lrd", "lrd_opt", "lrd_merge")  # distinct inference graphs of ours (freezing rows share them)
TRAIN_OURS = ("lrd", "lrd_opt", "lrd_seq", "lrd_both", "lrd_static", "lrd_merge")
VARIANTS = (
    Variant("original", "original"),
    Variant("lrd", "LRD (ratio ranks)", plan="ratio"),
    Variant("lrd_opt", "LRD + rank optimization", plan="optimized"),
    Variant("lrd_seq", "LRD + sequential freezing", plan="ratio", schedule="rotate", infer_as="lrd"),
    Variant("lrd_both", "LRD + both", plan="optimized", schedule="rotate", infer_as="lrd_opt"),
    Variant("lrd_static", "LRD + static freezing", plan="ratio", schedule="static", infer_as="lrd"),
    Variant("lrd_merge", "LRD + merging", plan="merged"),
)
VARIANT_KEYS = tuple(v.key for v in VARIANTS)
PEERS = ("prune",)  # LoRA is no speed peer: it is served merged, as the original
# Channel pruning matched to each LRD plan the table measures: ratio ranks always; the optimized
# plan where "+ rank optimization" is a row, since the search moves the parameter count (layers
# kept whole, ranks snapped to steps) and that row deserves a peer of its own size.
PEER_VARIANTS = (
    Variant("prune", "channel pruning (torch-pruning) at LRD's parameters", plan="ratio", peer="prune"),
    Variant("prune_opt", "channel pruning (torch-pruning) at LRD + rank optimization's parameters",
            plan="optimized", peer="prune"),
)


@dataclass
class BenchConfig:
    """What `run_bench` measures.

    Attributes:
        models: zoo names.
        ratio: per-layer compression ratio (> 1).
        batch_size: batch of every timed step (>= 1).
        repeats: interleaved measurements per step (>= 1; the table's min/median/max are over these).
        warmup: untimed calls per step before measuring (>= 0).
        min_run_time: seconds one measurement lasts at least (fast steps are repeated).
        objective: what rank optimization times per layer: "infer" (forward, as Paper B's
            Algorithm 1) or "train" (forward + backward); under onnxruntime and int8 always "infer".
        runtimes: what to run in, one table each ("eager", "compile", "onnxruntime", "int8"; the
            last two inference only, on the CPU; "int8" is every row quantized by `lrd.quantize`,
            its rows named int8/original, int8/lrd, int8/prune...): ranks are optimized for each,
            every ratio is against the original in the same runtime, and one line compares our
            best with the original's best.
        compile_mode: torch.compile's mode under "compile": "default", "reduce-overhead" (CUDA
            graphs), "max-autotune" (autotuned kernels + CUDA graphs; minutes to compile) or
            "max-autotune-no-cudagraphs"; recorded with each compile table.
        rank_runtime: the runtime rank optimization times layers in; None: each table's own. With
            "eager", every table uses the eager-optimized ranks (compiling each candidate layer
            costs minutes on a GPU; a warm timing cache makes the eager search free).
        variants: the rows to measure, by key (original is always measured), e.g.
            original,lrd,lrd_opt,lrd_merge; None: every row. Merging applies to bottleneck
            convs only: a model without any (a ViT) shows no merging row, with a note.
        train: time training steps too (under eager and compile; every freezing phase under
            compile is a compiled graph of its own); off: the inference tables only.
        device: the torch device to run on, e.g. cpu, cuda.
        autocast_bf16: run under bf16 autocast (None: on for cuda, off elsewhere).
        channels_last: channels_last memory format for conv models (None: on for cuda, off elsewhere).
        timing_cache: rank optimization's timing cache: None for its default file, "none" for
            no file, or a path.
        rank_budget_s: seconds rank optimization may spend timing each distinct layer.
        rank_min_run_time: seconds of repeated calls per layer timing in the rank search.
        peers: what users would pick instead, as rows of every table: "prune" adds channel
            pruning (torch-pruning, magnitude importance) at the whole-model parameters of
            "LRD (ratio ranks)", and of "LRD + rank optimization" where that is a row and the
            search moved its parameters by more than 2%. Needs `pip install lrdaccel[peers]`
            (checked here, before any work); a model torch-pruning cannot prune (GPT-2's Conv1D)
            has no pruning row, with a note saying why.
        profile: record the top operators of one inference and one training cycle of the
            original and of "LRD + both" (torch.profiler), to explain the ratios.
        quick: a fast look; recorded in the results.
    """

    models: list[str] = field(default_factory=lambda: list(FULL_MODELS))
    ratio: float = 2.0
    batch_size: int = 16
    repeats: int = 5
    warmup: int = 1
    min_run_time: float = 0.2
    objective: str = "infer"
    runtimes: list[str] = field(default_factory=lambda: ["eager"])
    compile_mode: str = "default"
    rank_runtime: str | None = None
    variants: list[str] | None = None
    peers: list[str] = field(default_factory=list)
    train: bool = True
    device: str = "cpu"
    autocast_bf16: bool | None = None
    channels_last: bool | None = None
    timing_cache: str | None = None
    rank_budget_s: float = 20.0
    rank_min_run_time: float = 0.2
    profile: bool = True
    quick: bool = False

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("models: give at least one zoo model")
        for name in self.models:
            zoo.get(name)  # raises ValueError naming the unknown model
        check_int("batch_size", self.batch_size, 1)
        check_int("repeats", self.repeats, 1)
        check_int("warmup", self.warmup, 0)
        check_ratio(self.ratio)
        check_number("min_run_time", self.min_run_time, at_least=0)
        check_number("rank_budget_s", self.rank_budget_s, above=0)
        check_number("rank_min_run_time", self.rank_min_run_time, above=0)
        check_choice("objective", self.objective, OBJECTIVES)
        placement = Placement.default_for(self.device, self.autocast_bf16, self.channels_last)  # checks the device
        self.autocast_bf16, self.channels_last = placement.autocast_bf16, placement.channels_last
        if not self.runtimes or len(set(self.runtimes)) != len(self.runtimes):
            raise ValueError(f"runtimes: give each of {RUNTIMES} at most once, at least one; got {self.runtimes}")
        for runtime in self.runtimes:
            check_runtime(runtime, "infer", self.device)
            if runtime in INFERENCE_ONLY and self.autocast_bf16:
                raise ValueError(f"runtimes: {runtime} runs its own float or int8 kernels; bf16 autocast does not apply")
            if runtime == "compile" and self.warmup < 1:
                raise ValueError("warmup must be >= 1 under runtime 'compile' (the first call compiles)")
        check_compile_mode(self.compile_mode)
        if self.rank_runtime is not None:
            check_runtime(self.rank_runtime, "infer", self.device)
        if self.variants is not None:
            unknown = [key for key in self.variants if key not in VARIANT_KEYS]
            if unknown or not self.variants:
                raise ValueError(f"variants: choose among {', '.join(VARIANT_KEYS)}; got {self.variants}")
        if (isinstance(self.peers, str) or any(kind not in PEERS for kind in self.peers)
                or len(set(self.peers)) != len(self.peers)):
            raise ValueError(f"peers: choose among {', '.join(PEERS)}, each at most once; got {self.peers}")
        for kind in self.peers:
            require_peers(kind, f"peers {kind!r}")  # before any work: MissingDependency with the pip hint

    @classmethod
    def quick_config(cls, **overrides) -> "BenchConfig":
        """A fast look: small models, tiny batch, short measurements; `overrides` still apply."""
        return cls(**{**QUICK_SETTINGS, **overrides})

    @property
    def placement(self) -> Placement:
        return Placement(self.device, self.autocast_bf16, self.channels_last, compile_mode=self.compile_mode)

    def rows(self) -> list[Variant]:
        """The rows measured: the original, the chosen ones, and the model each chosen freezing
        row freezes (its inference is that model's)."""
        chosen = set(VARIANT_KEYS if self.variants is None else self.variants) | {"original"}
        chosen |= {v.infer_as for v in VARIANTS if v.key in chosen and v.infer_as}
        rows = [v for v in VARIANTS if v.key in chosen]
        plans = {v.plan for v in rows}
        return rows + [v for v in PEER_VARIANTS if v.peer in self.peers and v.plan in plans | {"ratio"}]

    @property
    def cache(self):
        """The `cache=` argument of `optimize_ranks`."""
        return timing_cache_arg(self.timing_cache)


def timing_cache_arg(value: str | None):
    """--timing-cache as optimize_ranks takes it: None (default file), False ("none"), or a path."""
    if value is None:
        return None
    return False if value == "none" else value
