"""One rank's head step, for ``bench_head.py`` and ``webface42m_scale.py``: our head vs a reference.

The reference is the widely used Partial FC v2 *design*, written here from its description for
the benchmark only: a dense ``[C_local, D]`` weight Parameter per shard, the sampled rows indexed
out of it (so autograd builds a dense ``[C_local, D]`` gradient, zero on unsampled rows), cosine
logits, the ArcFace margin applied to the target logits under ``no_grad`` (straight-through), a
distributed softmax cross-entropy that keeps its softmax for backward, and ``torch.optim.SGD``
with momentum and weight decay over the whole shard.

Memory is measured as the growth of the process's peak resident set (``ru_maxrss``) from just
before the head is built to the end of the timed steps, in a fresh process per configuration:
torch's CPU allocator returns large blocks (> 32 MB, every tensor that matters here) to the
operating system when freed, so the peak RSS follows the peak of live tensors. ``tracemalloc``
would miss torch's allocations entirely.
"""

from __future__ import annotations

import datetime
import math
import os
import resource
import statistics
import time
import traceback
from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from partial_fc import PartialFCHead
from partial_fc.distributed import ParallelContext, all_gather_no_grad, all_gather_with_grad, all_reduce_no_grad
from partial_fc.optim import SparseRowSGD
from partial_fc.sharding import ClassPartition, step_seed

__all__ = ["ReferencePartialFCv2", "run_rank", "device_steps", "spawn", "spawn_fn", "maxrss_bytes", "rss_bytes"]

LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4


def maxrss_bytes() -> int:
    """Peak resident set of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    """Current resident set of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class _RefCrossEntropy(torch.autograd.Function):
    """Distributed softmax CE that keeps the softmax for backward (the reference's design)."""

    @staticmethod
    def forward(fctx, logits, target, ctx):
        gmax = all_reduce_no_grad(logits.max(dim=1, keepdim=True).values, ctx, op=dist.ReduceOp.MAX)
        logits = logits - gmax
        logits.exp_()
        total = all_reduce_no_grad(logits.sum(dim=1, keepdim=True), ctx)
        logits.div_(total)
        has = target >= 0
        rows = torch.nonzero(has).squeeze(1)
        prob = torch.zeros(target.shape[0], 1, device=logits.device)
        prob[rows, 0] = logits[rows, target[rows]]
        prob = all_reduce_no_grad(prob, ctx)
        fctx.save_for_backward(logits, rows, target)
        return prob.clamp_min(1e-30).log().mean().neg()

    @staticmethod
    def backward(fctx, grad):
        softmax, rows, target = fctx.saved_tensors
        g = softmax.clone()
        g[rows, target[rows]] -= 1.0
        g.mul_(grad / softmax.shape[0])
        return g, None, None


class ReferencePartialFCv2(nn.Module):
    """The dense-shard reference design (see the module docstring). ArcFace only.

    Args:
        num_classes: All classes. embedding_size: D. sample_rate: in (0, 1]. ctx: parallel context.
        s, m: ArcFace scale and margin. seed: sampler seed.
    """

    def __init__(self, num_classes: int, embedding_size: int, sample_rate: float, ctx: ParallelContext,
                 s: float = 64.0, m: float = 0.5, seed: int = 0, device: Optional[torch.device] = None) -> None:
        super().__init__()
        self.ctx, self.s, self.m, self.sample_rate, self.seed = ctx, s, m, sample_rate, seed
        part = ClassPartition(num_classes, ctx.world_size)
        self.start, end = part.range(ctx.rank)
        self.num_local = end - self.start
        self.weight = nn.Parameter(torch.normal(0, 0.01, (self.num_local, embedding_size)).to(device))
        self.steps = 0

    def forward(self, local_emb: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        ctx = self.ctx
        labels = all_gather_no_grad(local_labels, ctx)
        emb = all_gather_with_grad(local_emb, ctx, float(ctx.world_size))
        local = labels - self.start
        is_local = (local >= 0) & (local < self.num_local)
        dev = self.weight.device
        gen = torch.Generator(device=dev).manual_seed(step_seed(self.seed, self.steps, ctx.rank))
        self.steps += 1
        scores = torch.rand(self.num_local, generator=gen, device=dev)
        scores[local[is_local]] = 2.0
        k = max(int(math.ceil(self.sample_rate * self.num_local)), int((scores == 2.0).sum()))
        index = torch.topk(scores, k, sorted=False).indices.sort().values
        remap = torch.full((self.num_local,), -1, dtype=torch.int64, device=dev)
        remap[index] = torch.arange(k, device=dev)
        target = torch.where(is_local, remap[local.clamp(0, self.num_local - 1)], torch.full_like(local, -1))
        weight = self.weight[index]  # dense [C_local, D] gradient in backward
        # Under autocast the matmul runs in bf16 and the softmax in fp32 (the design's own cast).
        logits = F.linear(F.normalize(emb), F.normalize(weight)).float().clamp(-1, 1)
        rows = torch.nonzero(target >= 0).squeeze(1)
        with torch.no_grad():  # the margin shifts values only (straight-through gradient)
            t = logits[rows, target[rows]]
            theta = torch.acos(t)
            logits[rows, target[rows]] = torch.cos(theta + self.m)
        logits = logits * self.s
        return _RefCrossEntropy.apply(logits, target, ctx)


def design_method(design: str) -> tuple[str, Optional[float]]:
    """``(method, con_sample_rate)`` of one of our designs: ``ours_arcface``, ``ours_s6`` or
    ``ours_s6_con<rate>`` (s6 whose Con term draws its own sample, e.g. ``ours_s6_con0.05``)."""
    if design == "ours_arcface":
        return "arcface", None
    if design == "ours_s6":
        return "s6", None
    if design.startswith("ours_s6_con"):
        try:
            return "s6", float(design[len("ours_s6_con"):])
        except ValueError:
            pass
    raise ValueError(f"unknown design {design!r}: use reference, ours_arcface, ours_s6 or ours_s6_con<rate>")


def _build(design: str, num_classes: int, dim: int, rate: float, ctx: ParallelContext,
           device: Optional[torch.device] = None):
    if design == "reference":
        head = ReferencePartialFCv2(num_classes, dim, rate, ctx, device=device)
        opt = torch.optim.SGD([head.weight], lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
        return head, opt
    method, con_rate = design_method(design)
    head = PartialFCHead(num_classes=num_classes, embedding_size=dim, sample_rate=rate, method=method,
                         con_sample_rate=con_rate, validate_inputs=False, device=device)
    opt = SparseRowSGD([head.weight], lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    return head, opt


def run_rank(rank: int, world_size: int, design: str, num_classes: int, dim: int, rate: float, batch: int,
             steps: int, warmup: int, emulate_world: int = 1, group: Optional[Any] = None) -> dict:
    """Builds one rank's head and times ``steps`` head steps after ``warmup`` untimed ones.

    A head step is forward, backward, optimizer step and zero_grad of the head, at fixed embeddings
    (a leaf ``[batch, dim]`` tensor, so the embedding gradient is computed but goes nowhere).

    Args:
        emulate_world: In a single process (``world_size == 1``), stand in for one rank of a job of
            this many ranks: the shard holds ``num_classes / emulate_world`` classes and the batch
            is the global one (``emulate_world * batch``); collectives are skipped.

    Returns:
        Per-rank figures: median / all step seconds, peak RSS growth, bytes of persistent state.
    """
    ctx = ParallelContext.from_group(group)
    shard_classes = num_classes if emulate_world == 1 else ClassPartition(num_classes, emulate_world).size(0)
    local_batch = batch * emulate_world
    g = torch.Generator().manual_seed(1234 + rank)  # embeddings and labels: their own streams
    embs = [torch.randn(local_batch, dim, generator=g) for _ in range(2)]
    labels = [torch.randint(0, shard_classes, (local_batch,), generator=g) for _ in range(2)]
    base_peak, base_rss = maxrss_bytes(), rss_bytes()
    head, opt = _build(design, shard_classes, dim, rate, ctx)
    times = []
    for i in range(warmup + steps):
        emb = embs[i % 2].clone().requires_grad_()
        if ctx.is_distributed:
            dist.barrier()
        t0 = time.perf_counter()
        out = head(emb, labels[i % 2])
        loss = out["loss"] if isinstance(out, dict) else out
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        if i >= warmup:
            times.append(dt)
    state = sum(t.numel() * t.element_size() for t in head.state_dict().values())
    state += sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    return dict(rank=rank, step_s=statistics.median(times), times=times, peak_bytes=maxrss_bytes() - base_peak,
                peak_rss_bytes=maxrss_bytes(), base_rss_bytes=base_rss, state_bytes=state,
                loss=float(loss.detach()))


def _entry(rank: int, world_size: int, rdv: str, out: str, threads: int, kwargs: dict, fn=None) -> None:
    torch.set_num_threads(threads)
    try:
        group = None
        if world_size > 1:
            dist.init_process_group("gloo", init_method=f"file://{rdv}", rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=1800))
        result = ("ok", (fn or run_rank)(rank, world_size, **kwargs))
        if world_size > 1:
            dist.destroy_process_group()
    except BaseException:  # noqa: BLE001 - reported by the parent
        result = ("error", traceback.format_exc())
    torch.save(result, out)


def spawn(world_size: int, workdir: str, threads: int, timeout: float, **kwargs) -> list[dict]:
    """Runs :func:`run_rank` on ``world_size`` fresh gloo processes; returns per-rank dicts."""
    return spawn_fn(None, world_size, workdir, threads, timeout, **kwargs)


def spawn_fn(fn, world_size: int, workdir: str, threads: int, timeout: float, **kwargs) -> list:
    """Runs ``fn(rank, world_size, **kwargs)`` (default :func:`run_rank`, a module-level function)
    on ``world_size`` fresh gloo processes; returns the per-rank results."""
    import torch.multiprocessing as mp

    os.makedirs(workdir, exist_ok=True)
    tag = f"{time.monotonic_ns()}"
    rdv = os.path.join(workdir, f"rdv_{tag}")
    outs = [os.path.join(workdir, f"r{r}_{tag}.pt") for r in range(world_size)]
    mpc = mp.get_context("spawn")
    procs = [mpc.Process(target=_entry, args=(r, world_size, rdv, outs[r], threads, kwargs, fn)) for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
    results = []
    for r, path in enumerate(outs):
        if not os.path.exists(path):
            raise RuntimeError(f"rank {r} left no result (exit code {procs[r].exitcode}; killed for memory or time?)")
        status, value = torch.load(path, weights_only=False)  # written by our own child process above
        os.remove(path)
        if status != "ok":
            raise RuntimeError(f"rank {r} failed:\n{value}")
        results.append(value)
    return results


def interleaved_rank(rank: int, world_size: int, designs: list, num_classes: int, dim: int, rate: float,
                     batch: int, steps: int, warmup: int, emulate_world: int = 1) -> dict:
    """Times several designs in one process, one step of each in turn (round robin).

    On a shared machine the load changes from minute to minute; taking the designs' steps in
    turn exposes them to the same load, so their *ratios* stay meaningful when absolute times are
    not. Reports the median wall and process-CPU seconds per design. Memory is not measured here
    (all designs live in this process); use :func:`run_rank` in fresh processes for that.
    """
    ctx = ParallelContext.from_group(None)
    shard_classes = num_classes if emulate_world == 1 else ClassPartition(num_classes, emulate_world).size(0)
    local_batch = batch * emulate_world
    g = torch.Generator().manual_seed(1234 + rank)
    embs = [torch.randn(local_batch, dim, generator=g) for _ in range(2)]
    labels = [torch.randint(0, shard_classes, (local_batch,), generator=g) for _ in range(2)]
    built = {d: _build(d, shard_classes, dim, rate, ctx) for d in designs}
    wall = {d: [] for d in designs}
    cpu = {d: [] for d in designs}
    for i in range(warmup + steps):
        for d in designs:
            head, opt = built[d]
            emb = embs[i % 2].clone().requires_grad_()
            if ctx.is_distributed:
                dist.barrier()
            t0, c0 = time.perf_counter(), time.process_time()
            out = head(emb, labels[i % 2])
            (out["loss"] if isinstance(out, dict) else out).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= warmup:
                wall[d].append(time.perf_counter() - t0)
                cpu[d].append(time.process_time() - c0)
    return {d: dict(wall_s=statistics.median(wall[d]), cpu_s=statistics.median(cpu[d]), walls=wall[d], cpus=cpu[d])
            for d in designs}


def device_steps(design: str, num_classes: int, dim: int, rate: float, batch: int, steps: int, warmup: int,
                 emulate_world: int = 1, device: str = "cuda", autocast: Optional[str] = None) -> dict:
    """One emulated rank's head step on ``device`` (CUDA: event-timed, memory from the allocator).

    The step is the same as :func:`run_rank`'s (forward, backward, optimizer step, zero_grad at
    fixed embeddings), for one rank of an ``emulate_world``-rank job (collectives skipped). On CUDA
    the time of each step is taken between two CUDA events on the current stream, and memory is
    ``torch.cuda.max_memory_allocated`` over building the head and the steps, minus what was
    allocated before (the embeddings): the head's state plus its peak of temporaries. On CPU (the
    dry run of ``benchmarks/gpu_check.sh``) times are wall-clock and memory is the state's bytes.

    Args:
        autocast: ``"bf16"`` to run the step under bf16 autocast (the scores in bf16), else fp32.

    Returns:
        ``{"step_ms": median, "times_ms": [...], "peak_bytes": ..., "state_bytes": ..., "loss": ...}``.
    """
    dev = torch.device(device)
    cuda = dev.type == "cuda"
    ctx = ParallelContext.from_group(None)
    shard_classes = num_classes if emulate_world == 1 else ClassPartition(num_classes, emulate_world).size(0)
    local_batch = batch * emulate_world
    g = torch.Generator().manual_seed(1234)
    embs = [torch.randn(local_batch, dim, generator=g).to(dev) for _ in range(2)]
    labels = [torch.randint(0, shard_classes, (local_batch,), generator=g).to(dev) for _ in range(2)]
    if cuda:
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
    head, opt = _build(design, shard_classes, dim, rate, ctx, device=dev)
    times = []
    loss = None
    for i in range(warmup + steps):
        emb = embs[i % 2].clone().requires_grad_()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast == "bf16"):
            out = head(emb, labels[i % 2])
        loss = out["loss"] if isinstance(out, dict) else out
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            end.record()
            end.synchronize()
            dt = start.elapsed_time(end)
        else:
            dt = (time.perf_counter() - t0) * 1e3
        if i >= warmup:
            times.append(dt)
    state = sum(t.numel() * t.element_size() for t in head.state_dict().values())
    state += sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    peak = torch.cuda.max_memory_allocated(dev) - base if cuda else state
    result = dict(design=design, step_ms=statistics.median(times), times_ms=times, peak_bytes=int(peak),
                  state_bytes=int(state), loss=float(loss.detach()), shard_classes=shard_classes,
                  global_batch=local_batch)
    del head, opt, embs, labels, emb, out, loss
    if cuda:
        torch.cuda.empty_cache()
    return result
