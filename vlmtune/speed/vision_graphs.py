"""A frozen vision tower replayed as one CUDA graph per input shape.

With LoRA on the language model only, the vision tower is frozen and runs forward only, on inputs
of one shape per batch size: what CUDA graphs were made for. Launched op by op, its 24 layers of
small kernels are launch-bound at the start of every step (the GPU's queue is empty after the last
step's synchronize), and compiling them (`compile_decoder_layers(..., vision=True)`) only moved
the wait to the CPU: on the H200 it cut the tower's kernels from about 13 ms to a few, and the step
did not get faster (benchmarks/NOTES.md). Replayed from a graph the tower costs one launch: on the
H200 benchmark (7B LLaVA shape, batch 8) the step gained 1.7-2.9 %, with the tower's layers
compiled under the graph 0.4-0.5 % more.

Each distinct call (tensor shapes and dtypes, the other arguments, the autocast state) is captured
once, after warm-up calls on a side stream (which also trigger any torch.compile), into a memory
pool of its own, so graphs of different batch sizes never share memory. The outputs are cloned
out of the graph's buffers: a caller may keep them (a trained projector saves its input for the
backward) past the next replay. Calls that need autograd (a tower with trainable weights or inputs
that require grad), calls off CUDA and calls during another capture run the tower eagerly.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils import _pytree as pytree

from vlmtune.families import vision_module_names

WARMUP_CALLS = 3  # before capture: cuBLAS picks its kernels, torch.compile compiles, on a side stream
# Past this many distinct call signatures new ones run eagerly: a dynamic-resolution tower (Qwen2-VL)
# sees a new shape nearly every batch, and capturing each would cost more than it saves.
MAX_GRAPHS = 8


def graph_frozen_vision_towers(model: nn.Module) -> int:
    """Replay each frozen vision tower of `model` from CUDA graphs; returns how many were wrapped."""
    wrapped = 0
    for name in _outermost(vision_module_names(model)):
        tower = model.get_submodule(name)
        if isinstance(tower.forward, FrozenForwardGraphs) or any(param.requires_grad for param in tower.parameters()):
            continue  # LoRA on the vision tower (or already wrapped): its calls need autograd
        tower.forward = FrozenForwardGraphs(tower.forward, tower)
        wrapped += 1
    return wrapped


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: list[torch.Tensor]  # the static buffers each call's tensors are copied into
    outputs: object  # the forward's result, living in the graph's pool


class FrozenForwardGraphs:
    """`forward` (a frozen module's bound forward), captured per call signature and replayed."""

    def __init__(self, forward, module: nn.Module):
        self.eager = forward
        self.module = module
        self.captured: dict[tuple, _Captured] = {}

    def __call__(self, *args, **kwargs):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        if not self._can_replay(tensors):
            return self.eager(*args, **kwargs)
        key = _signature(leaves, spec)
        captured = self.captured.get(key)
        if captured is None:
            if len(self.captured) >= MAX_GRAPHS:
                return self.eager(*args, **kwargs)
            captured = self.captured[key] = self._capture(leaves, spec)
        for static, live in zip(captured.inputs, tensors):
            static.copy_(live)
        captured.graph.replay()
        return pytree.tree_map_only(torch.Tensor, torch.Tensor.clone, captured.outputs)

    def _can_replay(self, tensors: list[torch.Tensor]) -> bool:
        if not tensors or not all(tensor.is_cuda for tensor in tensors) or torch.cuda.is_current_stream_capturing():
            return False
        needs_grad = torch.is_grad_enabled() and (
            any(tensor.requires_grad for tensor in tensors) or any(param.requires_grad for param in self.module.parameters())
        )
        return not needs_grad

    def _capture(self, leaves: list, spec) -> _Captured:
        static = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        args, kwargs = pytree.tree_unflatten(static, spec)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with _checkpointing_off(self.module):
            with torch.cuda.stream(side):
                for _ in range(WARMUP_CALLS):
                    self.eager(*args, **kwargs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):  # a private pool: graphs of other shapes replay in any order
                outputs = self.eager(*args, **kwargs)
        return _Captured(graph, [leaf for leaf in static if isinstance(leaf, torch.Tensor)], outputs)


@contextmanager
def _checkpointing_off(module: nn.Module):
    """transformers' gradient checkpointing switched off inside `module` (its layers' and encoders'
    `gradient_checkpointing` flags): a frozen tower keeps nothing for a backward, so checkpointing it
    saves nothing, and its RNG-state bookkeeping is host work a capture should not record."""
    switched = [part for part in module.modules() if getattr(part, "gradient_checkpointing", False) is True]
    for part in switched:
        part.gradient_checkpointing = False
    try:
        yield
    finally:
        for part in switched:
            part.gradient_checkpointing = True


def _signature(leaves: list, spec) -> tuple:
    """What a captured graph is valid for: tensor shapes, dtypes and devices, every other argument, autocast."""
    parts = [
        (tuple(leaf.shape), leaf.dtype, leaf.device) if isinstance(leaf, torch.Tensor) else ("value", repr(leaf))
        for leaf in leaves
    ]
    autocast = (torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda"))
    return (str(spec), tuple(parts), autocast)


def _outermost(names: list[str]) -> list[str]:
    """Module names without those nested in another listed one (CogAgent's towers are siblings, not nested)."""
    return [name for name in names if not any(name.startswith(other + ".") for other in names if other != name)]
