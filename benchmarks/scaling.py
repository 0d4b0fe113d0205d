"""Data-parallel scaling of one training variant: tokens/s per GPU on N GPUs against one GPU.

Used by `train_throughput.py --gpus N`. Each world size runs in fresh processes (NCCL on GPUs,
gloo on CPU), the model wrapped in DistributedDataParallel, every rank on its own batches; the
efficiency is tokens/s per GPU at N over tokens/s on one GPU, both measured in the same invocation.
"""

from __future__ import annotations

import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def measure_scaling(variant_name: str, gpus: int, steps: int, warmup: int, build, make_batches, shape, lr: float) -> list[dict]:
    """Rows for world sizes 1 and `gpus`: tokens/s in total and per GPU, and the scaling efficiency."""
    rows = []
    for world in sorted({1, gpus}):
        results = mp.get_context("spawn").Manager().dict()
        port = _free_port()
        mp.spawn(_rank, args=(world, port, variant_name, steps, warmup, build, make_batches, shape, lr, results), nprocs=world, join=True)
        step_s = max(results[rank] for rank in range(world))  # the slowest rank sets the pace
        tokens = world * build.batch_of(variant_name) * shape.sequence_length
        rows.append({"world_size": world, "step_s": step_s, "tokens_per_s": tokens / step_s, "tokens_per_s_per_gpu": tokens / step_s / world})
    single = rows[0]["tokens_per_s_per_gpu"]
    for row in rows:
        row["efficiency"] = row["tokens_per_s_per_gpu"] / single
    return rows


def _rank(rank, world, port, variant_name, steps, warmup, build, make_batches, shape, lr, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    device = torch.device(f"cuda:{rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    model, optimizer, _ = build(variant_name, shape, device, lr)
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank] if cuda else None)
    batches = make_batches(shape, build.batch_of(variant_name), device, count=2, seed=1 + rank)

    def step(batch) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = ddp(**batch).loss  # through the wrapper: its hooks all-reduce the LoRA gradients
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(warmup):
        step(batches[i % 2])
    times = []
    for i in range(steps):
        if cuda:
            torch.cuda.synchronize(device)
        dist.barrier()
        started = time.perf_counter()
        step(batches[i % 2])
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - started)
    results[rank] = statistics.median(times)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
