"""Time one layer alone, original or decomposed at a rank, on the input it sees in the model,
under the runtime the model will run in.

Timing uses torch.utils.benchmark (it synchronises CUDA, runs blocks of calls, and reports the
median), after an explicit warm-up so one-off costs (allocator, cuDNN autotuning, compiling)
stay out. `infer` is one forward (eager: under inference mode); `train` is forward plus backward
with the input requiring a gradient and every weight trainable, as for a layer inside a network
being fine-tuned. Candidates are built with `LayerClass.like` (right shapes, no SVD): values do
not change speed.

Per runtime (`lrdaccel.measure.runtimes`):
    eager: the module as it is.
    compile: each candidate compiled alone (torch.compile, freezing for inference) after
        `torch._dynamo.reset()`, so compiled code does not pile up on the shared Conv2d.forward
        (guards checked per call would skew later candidates). A 4-d conv input is fed
        channels_last: inductor runs conv graphs in channels_last, so inside a compiled model a
        layer sees no layout conversion, and timed alone it must not pay one either. Compiling a
        conv chain costs 0.2-0.4 s once inductor is warm (convs become oneDNN calls, and
        inductor's code cache serves identical kernels again).
    onnxruntime: the candidate exported once per layer and kind; other ranks reuse that graph
        with their own weights (`deploy.onnx_session.reweighted`; exporting costs ~2 s, a session
        ~10 ms), and every session's output is checked against PyTorch before it is timed.
    int8: the candidate's int8 copy (`measure.runtimes.int8_model`: dynamic int8 Linear, static
        int8 convs calibrated on the timing input), timed eager under inference mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from lrdaccel._settings import check_int, check_number
from lrdaccel.factorize.ranks import Rank
from lrdaccel.layers import BranchedTuckerConv2d, entry_for
from lrdaccel.layers.merged import BottleneckChain
from lrdaccel.layers.svd import dense_linear_weight
from lrdaccel.measure.runtimes import int8_model, runtime_forward
from lrdaccel.measure.timer import median_seconds
from lrdaccel.rankopt.capture import InputSpec

COMPILE_WARMUP = 2  # calls after the compiling one: the first runs of freshly compiled code still allocate


@dataclass(frozen=True, eq=False)
class TimingJob:
    """One thing to time: `dense` itself when `rank` is None, else its decomposition at `rank`.

    Attributes:
        dense: the original layer (for kind "merged": its bottleneck branch, a BottleneckChain),
            already on `device` and in `dtype`.
        kind: "svd", "tucker2" or "merged" (how `rank` is read).
        rank: None for the original layer; an int (SVD) or (rank_in, rank_out) (Tucker-2).
        input: the layer's input as captured in the model (shape and memory format are used).
        objective: "infer" or "train".
        device, dtype: where and in what precision to time.
        runtime: "eager", "compile", "onnxruntime" or "int8".
        form: the decomposed layer's execution form ("conv" or "linear", `SVDConv2d.FORMS`);
            None for the layer's default.
        branches: > 1 times a Tucker-2 rank as a branched core (`BranchedTuckerConv2d`).
        compile_mode: torch.compile's mode under runtime "compile".
    """

    dense: nn.Module
    kind: str
    rank: Rank
    input: InputSpec
    objective: str
    device: torch.device
    dtype: torch.dtype
    runtime: str = "eager"
    form: str | None = None
    branches: int = 1
    compile_mode: str = "default"

    @property
    def channels_last(self) -> bool:
        """Feed (and lay out) the layer channels_last: as captured, or as a compiled model runs convs."""
        conv_input = len(self.input.shape) == 4 and isinstance(self.dense, (nn.Conv2d, BottleneckChain))
        return self.input.memory_format == "channels_last" or (self.runtime == "compile" and conv_input)

    def build(self) -> nn.Module:
        """The module to time, in the mode and memory format of the objective and input."""
        if self.rank is None:
            module = self.dense
        elif self.kind == "merged":
            module = self.dense.narrowed(self.rank)
        elif self.branches > 1:
            module = BranchedTuckerConv2d.like(self.dense, self.rank, branches=self.branches)
        else:
            module = entry_for(self.dense).layer_class.like(self.dense, self.rank)
        if self.form is not None:
            module.set_form(self.form)
        module.train(self.objective == "train")
        if self.objective == "train":
            for parameter in module.parameters():
                parameter.requires_grad_(True)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        return module

    def make_input(self) -> torch.Tensor:
        x = torch.randn(self.input.shape, device=self.device, dtype=self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x.requires_grad_(self.objective == "train")


Timer = Callable[[TimingJob], float]
"""Anything that maps a TimingJob to milliseconds; BenchmarkTimer is the real one, tests inject fakes."""


class BenchmarkTimer:
    """The real timer: the median of torch.utils.benchmark's blocked_autorange, in milliseconds,
    under the job's runtime.

    Args:
        min_run_time: seconds of repeated calls per measurement (more: steadier, slower search).
        warmup: calls before measuring (blocked_autorange's block-size estimate warms up too);
            under "compile" at least the compiling call and COMPILE_WARMUP more.
    """

    def __init__(self, min_run_time: float = 0.2, warmup: int = 1):
        check_number("min_run_time", min_run_time, above=0)
        check_int("warmup", warmup, 0)
        self.min_run_time, self.warmup = min_run_time, warmup
        self._graphs: dict[tuple, object] = {}  # exported ONNX graph per layer and kind, reused across ranks

    def __call__(self, job: TimingJob) -> float:
        module, x = job.build(), job.make_input()
        if job.runtime == "onnxruntime":
            return self._onnxruntime_ms(job, module, x)
        if job.runtime == "int8":
            return self._int8_ms(module, x)
        warmup = self.warmup
        if job.runtime == "compile":
            import torch._dynamo

            torch._dynamo.reset()
            warmup = max(warmup, 1 + COMPILE_WARMUP)
        forward, calls = runtime_forward(module, job.runtime, fullgraph=True, compile_mode=job.compile_mode)
        inference = job.objective == "infer"
        step = (lambda: forward(x)) if inference else train_step(forward, module, x)
        with calls(inference):
            return median_seconds(step, self.min_run_time, warmup) * 1e3

    def _int8_ms(self, module: nn.Module, x: torch.Tensor) -> float:
        quantized = int8_model(module.eval(), x)
        with torch.inference_mode():
            return median_seconds(lambda: quantized(x), self.min_run_time, self.warmup) * 1e3

    def _onnxruntime_ms(self, job: TimingJob, module: nn.Module, x: torch.Tensor) -> float:
        from lrdaccel.deploy.onnx_session import export_program, reweighted, session_step

        key = (layer_signature(job.dense), input_signature(job.input), job.kind if job.rank is not None else None,
               job.form, job.branches)
        module.eval()
        with torch.no_grad():
            expected = module(x).numpy()
        graph = self._graphs.get(key)
        proto = reweighted(graph, module) if graph is not None else None
        session = _checked_session(proto, x, expected) if proto is not None else None
        if session is None:  # first rank of this layer, or a graph the weights could not be swapped into
            proto = export_program(module, x, optimize=False).model_proto
            self._graphs[key] = proto
            session = _checked_session(proto, x, expected)
        if session is None:
            raise RuntimeError(f"ONNX Runtime does not reproduce {layer_signature(job.dense)} at {job.rank} "
                               f"on {input_signature(job.input)}: the exported graph is wrong")
        return median_seconds(session_step(session, x), self.min_run_time, self.warmup) * 1e3


def _checked_session(proto, x: torch.Tensor, expected: np.ndarray):
    """A session for `proto` if it reproduces `expected` on `x` (to float32 rounding), else None."""
    from lrdaccel.deploy.onnx_session import feeds, make_session

    session = make_session(proto.SerializeToString())
    got = session.run(None, feeds(session, x))[0]
    scale = max(1.0, float(np.abs(expected).max()))
    return session if got.shape == expected.shape and float(np.abs(got - expected).max()) <= 1e-4 * scale else None


def train_step(forward: Callable[[torch.Tensor], torch.Tensor], module: nn.Module,
               x: torch.Tensor) -> Callable[[], None]:
    """Forward (through `forward`, the module or its compiled form) + backward to the input and
    every weight of `module`, without accumulating into .grad."""
    params = [p for p in module.parameters() if p.requires_grad]
    with torch.no_grad():
        grad_out = torch.randn_like(module(x))

    def step() -> None:
        torch.autograd.grad(forward(x), [x, *params], grad_out)

    return step


def layer_signature(dense: nn.Module) -> str:
    """Everything about a dense layer (or a bottleneck run alone) that its speed depends on,
    except the input and rank."""
    if isinstance(dense, BottleneckChain):
        return dense.signature()
    if isinstance(dense, nn.Conv2d):
        weight = "x".join(str(d) for d in dense.weight.shape)
        return (f"Conv2d {weight} stride={tuple(dense.stride)} padding={dense.padding} "
                f"dilation={tuple(dense.dilation)} {dense.padding_mode} bias={dense.bias is not None}")
    out_features, in_features = dense_linear_weight(dense).shape
    return f"{type(dense).__name__} {out_features}x{in_features} bias={dense.bias is not None}"


def input_signature(spec: InputSpec) -> str:
    return f"input {'x'.join(str(d) for d in spec.shape)} {spec.memory_format}"
