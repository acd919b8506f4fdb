"""The runtimes speed is measured under, defined once, and how a model's step runs in each.

Users who care about speed rarely serve eager PyTorch, and which rank is fastest depends on the
runtime (eager 1x1 convs at small batch take a per-sample path that oneDNN and ONNX Runtime do
not), so every speed figure and every rank choice names its runtime:

- "eager": PyTorch as it is.
- "compile": `torch.compile` with inductor. Inference runs under no_grad with inductor's
  freezing on (weights become constants, convs prepacked for oneDNN), as an inference server
  would compile; training compiles the forward (the backward through AOTAutograd) and leaves the
  optimizer eager. The first call compiles: callers warm up before timing. The compile mode is
  the user's (COMPILE_MODES): on a GPU people serve "max-autotune" (Triton templates tried
  against cuBLAS/cuDNN per shape, minutes to compile) or "reduce-overhead" (CUDA graphs: one
  launch per step instead of one per kernel), and which one ran is part of every figure. Under
  CUDA graphs each step starts a new graph generation (`torch.compiler.cudagraph_mark_step_begin`),
  so a step never reads outputs the next replay overwrites; on the CPU those modes compile
  as the default does, without graphs.
- "onnxruntime": exported with torch.onnx (the dynamo exporter) and run by an ONNX Runtime
  InferenceSession on the CPU with torch's thread count. Inference only: there is no training
  step to time there. An optional extra: `pip install lrdaccel[onnx]`.
- "int8": eager PyTorch on the int8 copy `lrd.quantize` makes (dynamic int8 Linear; convs static
  int8, calibrated on the timed inputs: ranges change values, not speed). What a CPU server
  does first; inference only, on the CPU.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager, Iterator

import torch
from torch import nn

from lrdaccel._modules import call_model
from lrdaccel._settings import check_choice

RUNTIMES = ("eager", "compile", "onnxruntime", "int8")
INFERENCE_ONLY = ("onnxruntime", "int8")  # no training step to time there
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
# Dynamo keeps compiled code per code object (every nn.Conv2d shares Conv2d.forward), so model
# variants and freezing phases (requires_grad is guarded) add entries; past its default limit
# of 8 Dynamo would silently run eager code, and a "compiled" time would be an eager one.
RECOMPILE_LIMIT = 256


def check_runtime(runtime: str, objective: str = "infer", device: torch.device | str = "cpu") -> None:
    """A known runtime that can run `objective` on `device`.

    Raises:
        ValueError: an unknown runtime; training or a non-CPU device under "onnxruntime";
            ONNX Runtime not installed (saying how to install it); training or a non-CPU
            device under "int8".
    """
    check_choice("runtime", runtime, RUNTIMES)
    if runtime not in INFERENCE_ONLY:
        return
    if objective == "train":
        raise ValueError(f"runtime {runtime!r} runs inference only: training is timed under 'eager' or "
                         f"'compile' (objective='train'), or choose objective='infer'")
    if torch.device(device).type != "cpu":
        raise ValueError(f"runtime {runtime!r} is timed on the CPU; got device {str(device)!r}")
    if runtime == "onnxruntime":
        from lrdaccel.deploy.onnx_session import onnxruntime

        onnxruntime()


def check_compile_mode(mode: str) -> None:
    """Raises ValueError for a mode torch.compile does not take (naming the ones it does)."""
    check_choice("compile_mode", mode, COMPILE_MODES)


def runtime_label(runtime: str, compile_mode: str = "default") -> str:
    """The runtime and the version of whatever runs the model outside torch (for cache keys and
    reports): "eager", "compile", "compile max-autotune", "onnxruntime 1.32.0"."""
    if runtime == "compile" and compile_mode != "default":
        return f"compile {compile_mode}"
    if runtime == "int8":
        return f"int8 {torch.backends.quantized.engine}"  # the kernels' engine (x86, fbgemm, qnnpack)
    if runtime != "onnxruntime":
        return runtime  # torch's version is part of every key already
    from lrdaccel.deploy.onnx_session import onnxruntime

    return f"onnxruntime {onnxruntime().__version__}"


@contextlib.contextmanager
def compiled_calls(inference: bool) -> Iterator[None]:
    """The context every call of a torch.compile'd module runs in (its first call compiles).

    Inference: no_grad and inductor freezing. Always: a recompile limit high enough for model
    variants and freezing phases, and an error instead of a silent eager fallback past it.
    """
    import torch._dynamo
    import torch._inductor.config as inductor_config

    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
        if inference:
            with torch.no_grad(), inductor_config.patch(freezing=True):
                yield
        else:
            with torch.enable_grad():
                yield


def runtime_forward(model: nn.Module, runtime: str, fullgraph: bool = False,
                    compile_mode: str = "default") -> tuple[Callable[..., Any], Callable[[bool], ContextManager]]:
    """(what to call in place of `model`, context(inference) to call it in) for eager or compile;
    `fullgraph` makes a graph break an error (for one layer, where a break would time eager code);
    `compile_mode` is torch.compile's `mode` (ignored by eager).

    Raises:
        ValueError: "onnxruntime" or "int8" (inference only: use `inference_step`), an unknown
            runtime or mode.
    """
    check_choice("runtime", runtime, RUNTIMES)
    check_compile_mode(compile_mode)
    if runtime == "eager":
        return model, _eager_calls
    if runtime == "compile":
        mode = None if compile_mode == "default" else compile_mode
        compiled = torch.compile(model, dynamic=False, fullgraph=fullgraph, mode=mode)
        return (_new_graph_step(compiled) if compile_mode in CUDA_GRAPH_MODES else compiled), compiled_calls
    raise ValueError(f"runtime {runtime!r} has no differentiable forward: it runs inference only")


def _new_graph_step(compiled: Callable[..., Any]) -> Callable[..., Any]:
    """`compiled`, each call starting a new CUDA graph generation (a no-op without CUDA graphs)."""
    def forward(*args: Any, **kwargs: Any) -> Any:
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(*args, **kwargs)

    return forward


@contextlib.contextmanager
def _eager_calls(inference: bool) -> Iterator[None]:
    with torch.inference_mode() if inference else torch.enable_grad():
        yield


def int8_model(model: nn.Module, inputs: Any) -> nn.Module:
    """The model as runtime "int8" serves it: `lrd.quantize`'s int8 copy, convs calibrated on
    `inputs` (one batch as the model is called)."""
    from lrdaccel.deploy.quantize import quantizable_convs, quantize

    return quantize(model, "int8", calibration=[inputs] if quantizable_convs(model) else None)


def inference_step(model: nn.Module, inputs: Any, runtime: str = "eager",
                   autocast: Callable[[], ContextManager] | None = None,
                   compile_mode: str = "default") -> Callable[[], Any]:
    """One forward of `model` on `inputs` under `runtime` (and torch.compile `compile_mode`), as a
    no-argument callable.

    The model should be in eval mode. Under "onnxruntime" the model is exported and a session
    created here (seconds); under "int8" its int8 copy is made here; under "compile" the first
    call compiles.

    Raises:
        ValueError: an unknown runtime; for "onnxruntime" autocast, a model the exporter cannot
            take, or ONNX Runtime not installed; for "int8" autocast or a model with no layer to
            quantize.
    """
    check_runtime(runtime)
    if runtime == "onnxruntime":
        from lrdaccel.deploy.onnx_session import export_program, make_session, session_step

        if autocast is not None:
            raise ValueError("runtime 'onnxruntime' runs the exported float graph: bf16 autocast does not apply")
        session = make_session(export_program(model, inputs).model_proto.SerializeToString())
        return session_step(session, inputs)
    if runtime == "int8":
        if autocast is not None:
            raise ValueError("runtime 'int8' runs int8 kernels: bf16 autocast does not apply")
        forward, calls = int8_model(model, inputs), _eager_calls
    else:
        forward, calls = runtime_forward(model, runtime, compile_mode=compile_mode)
    autocast = autocast or contextlib.nullcontext

    def step() -> Any:
        with calls(True), autocast():
            return call_model(forward, inputs)

    return step
