"""End-to-end training throughput: images/s per device and the fraction of its peak FLOP/s.

Runs the real :class:`train.trainer.Trainer` (loader, backbone under DDP, Partial FC head,
optimizers, loss scaling) for ``--warmup + --steps`` optimizer steps and times the steps after the
warm-up (the warm-up absorbs ``torch.compile``, cuDNN autotuning and the loader's first fill).
Each timed step is closed by a device synchronisation, so the times are real. Reports, per rank
and as the job's median: images/s per device, the model FLOPs of a training step (backbone
forward x 3, counted by ``torch.utils.flop_counter`` at the configured input size, plus the head's
three ``N x K x D`` matmuls) and the achieved fraction of ``--peak-tflops`` (default: a table of
dense bf16/fp16 tensor-core peaks for known GPUs; none on a CPU unless given).

Data: ``--data-kind dali`` (the default) reads a RecordIO file through DALI, decoding JPEGs on the
GPU (``--decode mixed``) or the CPU; without ``--data`` the script first writes a synthetic
dataset (``dali_pipelines.synth_faces``) of ``--synth-identities`` x ``--synth-images``.
``--data-kind synthetic`` feeds random tensors (no decoding): the model's ceiling. On a GPU
machine, one process per GPU::

    torchrun --nproc-per-node 8 benchmarks/bench_train.py --config ms1mv3_r50 --backbone r50 \\
        --dtype bf16 --channels-last --compile --decode mixed --batch 128 --out r50.json

A CPU smoke run (what the tests do)::

    python benchmarks/bench_train.py --config cpu_demo --backbone iresnet_nano --data-kind synthetic \\
        --device cpu --steps 3 --warmup 1 --batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Dense (no sparsity) bf16/fp16 tensor-core peaks from the vendors' data sheets, TFLOP/s; matched
# as substrings of torch.cuda.get_device_name(). --peak-tflops overrides.
PEAK_TFLOPS = {
    "H200": 989.0, "H100 SXM": 989.0, "H100 80GB HBM3": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0,
    "A100": 312.0, "L40S": 362.0, "A10G": 70.0,
}


def backbone_flops(name: str, num_features: int, image_size: int) -> int:
    """Forward FLOPs of one image through the backbone (multiply-add = 2 FLOPs)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from partial_fc.backbones import build_backbone

    model = build_backbone(name, num_features=num_features).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, 3, image_size, image_size))
    return int(counter.get_total_flops())


def peak_tflops(device_name: str, override: Optional[float]) -> Optional[float]:
    """The peak to compare with: ``override``, else the table's entry for ``device_name``."""
    if override:
        return override
    for key, value in PEAK_TFLOPS.items():
        if key in device_name:
            return value
    return None


def _synth(out: Path, identities: int, images: int) -> Path:
    from dali_pipelines.synth_faces import SynthConfig, generate_synthetic_dataset

    rec = out / "train.rec"
    if not rec.exists():
        generate_synthetic_dataset(out, SynthConfig(train_identities=identities, images_per_identity=images,
                                                    ver_identities=2, ver_images_per_identity=2, ver_pairs=2,
                                                    cluster_identities=2, cluster_images_per_identity=2),
                                   progress=False)
    return rec


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs the benchmark; prints one JSON summary (rank 0) and writes it to ``--out``; returns 0."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="ms1mv3_r50", help="base recipe (name or TOML path)")
    p.add_argument("--backbone", default=None, help="backbone name override (e.g. r50, r100)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None)
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    p.add_argument("--data-kind", choices=["dali", "synthetic"], default="dali")
    p.add_argument("--decode", choices=["auto", "mixed", "cpu"], default="auto", help="DALI JPEG decoding")
    p.add_argument("--data", default=None, help="a train.rec (default: a synthetic one written first)")
    p.add_argument("--num-classes", type=int, default=None,
                   help="classes in --data (default: the recipe's; the synthetic set's without --data)")
    p.add_argument("--synth-identities", type=int, default=1000)
    p.add_argument("--synth-images", type=int, default=20)
    p.add_argument("--batch", type=int, default=None, help="images per device per step")
    p.add_argument("--device", default=None, help="run.device override (cuda, cpu)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak for the fraction")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--workdir", default=None,
                   help="run directory and synthetic data (default: TMPDIR/pfc_bench_train_<run id>; on several "
                        "nodes give a shared path, the trainer writes its final checkpoint there)")
    p.add_argument("--out", default=None, help="write the JSON summary here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")

    import torch

    from train.config import load_config
    from train.trainer import Trainer

    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    # One directory per job, the same on every rank of a node (torchrun sets the run id).
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", str(os.getpid()))
    work = Path(args.workdir or Path(tempfile.gettempdir()) / f"pfc_bench_train_{run_id}")
    sets = [f"run.output_dir={json.dumps(str(work / 'runs'))}", 'run.name="bench_train"',
            f"run.max_steps={args.warmup + args.steps}", f"run.log_every={args.warmup + args.steps}",
            "checkpoint.every_steps=0", 'checkpoint.resume="none"', "evaluation.every_steps=0",
            "evaluation.bin_files=[]", "export.onnx=false", "metrics.prometheus=false", "metrics.progress_bar=false",
            f"data.kind={json.dumps(args.data_kind)}", f"data.dali_decode={json.dumps(args.decode)}"]
    if args.backbone:
        sets.append(f"backbone.name={json.dumps(args.backbone)}")
    if args.dtype:
        sets.append(f"precision.dtype={json.dumps(args.dtype)}")
    if args.channels_last:
        sets.append("backbone.channels_last=true")
    if args.compile:
        sets.append("backbone.compile=true")
    if args.batch:
        sets.append(f"data.batch_size={args.batch}")
    if args.device:
        sets.append(f"run.device={json.dumps(args.device)}")
    if args.data_kind == "dali":
        rec = Path(args.data) if args.data else work / "synth" / "train.rec"
        if not args.data:
            marker = work / "synth" / ".done"
            if local_rank == 0:  # one writer per node; the node's other ranks wait for its marker
                _synth(rec.parent, args.synth_identities, args.synth_images)
                marker.touch()
            while not marker.exists():
                time.sleep(1)
        sets.append(f"data.train_rec={json.dumps(str(rec))}")
    else:
        sets += [f"data.synth.identities={args.synth_identities}", 'data.train_rec=""',
                 f"data.synth.images_per_identity={args.synth_images}"]
    # The head must agree with the data's class count (the recipe's is the real dataset's).
    classes = args.num_classes or (None if args.data else args.synth_identities)
    if classes:
        sets.append(f"head.num_classes={classes}")
    cfg = load_config(args.config, [*sets, *args.sets])

    trainer = Trainer(cfg, handle_signals=False)
    device = trainer.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    marks: list[tuple[int, float, int]] = []

    def on_step(step: int, images: int) -> None:
        sync()
        marks.append((step, time.perf_counter(), images))

    try:
        summary = trainer.fit(on_step=on_step)
        head = trainer.head
        global_batch = trainer.derived.global_batch
        sampled = head.last_stats.get("num_sampled_local", float(head.num_local_classes))
        con = head.last_stats.get("con_sampled_local", 0.0)
    finally:
        trainer.close()

    timed = [(t1 - t0, n) for (s0, t0, _), (s1, t1, n) in zip(marks, marks[1:]) if s0 >= args.warmup]
    if not timed:
        raise SystemExit(f"no timed steps: {len(marks)} steps ran, warm-up {args.warmup}")
    step_s = statistics.median(t for t, _ in timed)
    images = statistics.median(n for _, n in timed)
    b = cfg.backbone
    fwd = backbone_flops(b.name, b.num_features, cfg.data.synth.image_size)
    d = cfg.head.embedding_size
    # Head per rank: logits and their two gradients over the global batch and the sampled rows,
    # plus Con's similarity and gradient matmuls when the method has one.
    head_flops = 2 * global_batch * d * (3 * sampled + 2 * con)
    flops = 3 * fwd * images + head_flops
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_tflops(name, args.peak_tflops)
    achieved = flops / step_s / 1e12
    result = dict(
        rank=rank, device=name, backbone=b.name, dtype=cfg.precision.dtype, channels_last=b.channels_last,
        compile=b.compile, data_kind=args.data_kind, decode=cfg.data.dali_decode, batch_per_device=images,
        world_size=trainer.world, steps_timed=len(timed), step_s_median=step_s, images_per_s_per_device=images / step_s,
        backbone_forward_gflops_per_image=fwd / 1e9, step_tflops=flops / 1e12, achieved_tflops=achieved,
        peak_tflops=peak, fraction_of_peak=(achieved / peak) if peak else None, head_method=cfg.head.method,
        head_sampled_classes=sampled, final_loss=summary.get("final_loss"),
    )
    if rank == 0:
        print(json.dumps(result, indent=1))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
