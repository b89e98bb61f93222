"""Training-step throughput of a backbone: ``python -m partial_fc.backbones.benchmark NAME``.

Measures forward + backward + SGD step on random 112x112 inputs, which is the number that
matters for the CPU demo (data loading and the classifier are not included).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from .registry import build_backbone


def measure(
    name: str,
    batch: int = 64,
    steps: int = 10,
    repeats: int = 3,
    warmup: int = 3,
    channels_last: bool = False,
) -> list[float]:
    """Times training steps of a registered backbone on the current default device (CPU).

    Args:
        name: Registry name.
        batch: Images per step.
        steps: Steps per timed repeat.
        repeats: Number of timed repeats (reported separately to expose machine noise).
        warmup: Untimed steps first, so one-off allocation and kernel selection are excluded.
        channels_last: Use the channels_last memory format for model and input.

    Returns:
        Images per second for each repeat.
    """
    torch.manual_seed(0)
    model = build_backbone(name).train()
    x = torch.rand(batch, 3, 112, 112) * 2 - 1
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()

    for _ in range(warmup):
        step()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        rates.append(steps * batch / (time.perf_counter() - start))
    return rates


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point; prints per-repeat and median images/s."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("name", nargs="?", default="iresnet_nano")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args(argv)
    rates = measure(args.name, args.batch, args.steps, args.repeats,
                    channels_last=args.channels_last)  # fmt: skip
    print(
        f"{args.name}: batch {args.batch}, {torch.get_num_threads()} threads, "
        f"forward+backward+step: {', '.join(f'{r:.0f}' for r in rates)} img/s "
        f"(median {statistics.median(rates):.0f})"
    )


if __name__ == "__main__":
    main()
