"""Measures the activation memory autograd keeps per sample for each registered backbone.

``python benchmarks/measure_backbone_activations.py`` prints the table that
``partial_fc/planner.py`` holds as ``BACKBONE_TABLE``: exact parameter counts and the bytes of the
distinct tensors saved for backward in one fp32 forward pass of a 112x112 image (counted with
``torch.autograd.graph.saved_tensors_hooks``, batch 2 divided by 2, each storage counted once;
parameters themselves are excluded). Under autocast most saved activations are half precision,
which the planner models by scaling with the dtype size.
"""

from __future__ import annotations

import argparse

import torch

from partial_fc.backbones import build_backbone, list_backbones


def saved_bytes_per_sample(name: str, batch: int = 2) -> tuple[int, int]:
    """Returns ``(parameters, saved activation bytes per sample)`` for backbone ``name``."""
    torch.manual_seed(0)
    model = build_backbone(name).train()
    params = sum(p.numel() for p in model.parameters())
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        if st.data_ptr() not in param_ptrs:
            seen[st.data_ptr()] = st.nbytes()
        return t

    x = torch.rand(batch, 3, 112, 112)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return params, sum(seen.values()) // batch


def main(argv: list[str] | None = None) -> None:
    """Prints ``name: (parameters, bytes per sample)`` lines for the planner's table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("names", nargs="*", default=list_backbones())
    args = parser.parse_args(argv)
    for name in args.names:
        params, per_sample = saved_bytes_per_sample(name)
        print(f'    "{name}": ({params}, {per_sample}),', flush=True)


if __name__ == "__main__":
    main()
