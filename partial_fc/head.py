"""PartialFCHead: the model-parallel classifier with the cluster-guided losses.

One step, on every rank (see docs/method.md for the formulas and docs/distributed.md for the
gradient contracts):

1. all-gather the embeddings (with gradient) and labels of the global batch;
2. sample this rank's classes (all positives + random negatives);
3. score the whole global batch against the sampled local class centers; apply the (possibly
   cluster-guided) margin to target logits on their owner rank; distributed softmax cross-entropy;
4. optional: cluster contrastive loss (fused and chunked, against the sampled cluster centers or
   a sample of its own with ``con_sample_rate``), or center / triplet loss, and the
   cluster-aligning loss between W and C for the batch's classes;
5. in training mode, update this rank's shard of the Cluster-Center Bank from the gathered batch,
   *after* the losses used the previous centers (with ``phi_refresh = "offline"`` the bank is
   left to :func:`partial_fc.cluster.offline_refresh` instead).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .cluster import (
    ClusterBank,
    ConcentrationStats,
    class_permutation,
    concentration_stats,
    normalized_concentration,
    permuted_phi,
)
from .config import PartialFCConfig
from .distributed import (
    ParallelContext,
    all_gather_no_grad,
    all_gather_with_grad,
    all_reduce_no_grad,
    check_equal_batch_sizes,
)
from .fused import fused_margin_cross_entropy
from .fused_contrastive import fused_cluster_contrastive
from .losses import center_loss, center_triplet_loss, cluster_aligning_loss
from .margins import MarginParams, build_margin
from .sharding import ClassPartition, con_step_seed, sample_classes, step_seed

__all__ = ["PartialFCHead", "init_class_centers"]

_INIT_BLOCK = 65536


def init_class_centers(
    start: int, size: int, embedding_size: int, std: float, seed: int, device=None
) -> torch.Tensor:
    """Initial rows ``[start, start + size)`` of W, independent of how classes are sharded.

    Rows are drawn in fixed blocks of 65,536 classes, each from its own seeded generator, so class
    ``y`` gets the same initial vector whatever the world size (a run on 2 ranks and on 8 ranks
    start from the same W, and tests can rebuild the dense W).

    Returns:
        ``[size, embedding_size]`` fp32.
    """
    out = torch.empty(size, embedding_size)
    first, last = start // _INIT_BLOCK, (start + size - 1) // _INIT_BLOCK
    for block in range(first, last + 1):
        b0 = block * _INIT_BLOCK
        gen = torch.Generator().manual_seed(step_seed(seed, block, 0x5EED))
        rows = torch.randn(_INIT_BLOCK, embedding_size, generator=gen).mul_(std)  # in place: one block-sized temporary
        lo, hi = max(start, b0), min(start + size, b0 + _INIT_BLOCK)
        out[lo - start : hi - start] = rows[lo - b0 : hi - b0]
    return out.to(device)


class PartialFCHead(nn.Module):
    """Sharded Partial FC classifier with CG-ArcFace, cluster contrastive and aligning losses.

    Args:
        config: A :class:`PartialFCConfig`; keyword options override its fields (or build one).
        process_group: The model-parallel group (default group; single process when
            ``torch.distributed`` is not initialised).
        class_counts: Optional ``[num_classes]`` dataset image counts (feed the concentration).
        device: Device of the shard's parameters and buffers.
        **options: Any :class:`PartialFCConfig` field, e.g. ``num_classes=..., method="s6"``.

    Attributes:
        weight: ``[num_local_classes, embedding_size]`` Parameter, this rank's shard of W. With
            ``row_update="lazy"`` and ``sample_rate < 1`` its gradient is row-sparse (a COO tensor
            of the sampled rows); step it with :class:`partial_fc.optim.SparseRowSGD` or
            :class:`partial_fc.optim.SparseRowAdamW`.
        bank: The :class:`ClusterBank` of this shard, or ``None`` when the method needs none.
        class_start: First class id owned by this rank.
        num_local_classes: Classes owned by this rank.
        last_stats: Floats from the latest training step (phi and margin statistics, sample size).
            Reading it copies the step's statistics to the host (one device sync): they are kept
            as device tensors during the step and read only when asked (the trainer asks on log
            steps only).
        defer_input_checks: When True (the trainer sets it), the per-step input checks of
            ``validate_inputs`` (labels in range, finite embeddings) do not read the device: their
            verdict is kept in :attr:`input_flags` for the caller to read together with its own
            once-per-step values (:meth:`input_error` builds the message), labels outside the
            range are treated as no class on any rank so nothing indexes out of bounds, and the
            cross-rank batch-size check is left to the caller (the trainer's loaders always
            deliver full batches).
    """

    def __init__(
        self,
        config: Optional[PartialFCConfig] = None,
        *,
        process_group: Optional[dist.ProcessGroup] = None,
        class_counts: Optional[torch.Tensor] = None,
        device: Optional[torch.device] = None,
        **options,
    ) -> None:
        super().__init__()
        if config is None and "num_classes" not in options:
            raise TypeError("PartialFCHead needs num_classes= (or a PartialFCConfig)")
        self.config = PartialFCConfig.from_kwargs(config, **options) if options else config
        cfg = self.config
        self.ctx = ParallelContext.from_group(process_group)
        self.partition = ClassPartition(cfg.num_classes, self.ctx.world_size)
        self.class_start, end = self.partition.range(self.ctx.rank)
        self.num_local_classes = end - self.class_start
        self.weight = nn.Parameter(
            init_class_centers(self.class_start, self.num_local_classes, cfg.embedding_size, cfg.init_std, cfg.seed, device)
        )
        preset = cfg.preset
        self.margin_fn = build_margin(
            preset.margin, m=cfg.margin_m, m1=cfg.m1, m2=cfg.m2, m3=cfg.m3,
            m_min=cfg.m_min, m_max=cfg.m_max, direction=cfg.margin_direction,
        )
        self.uses_concentration = bool(getattr(self.margin_fn, "uses_concentration", False))
        self.aux = preset.aux
        self.align = preset.align
        self.bank: Optional[ClusterBank] = None
        if cfg.needs_bank:
            local_counts = None
            if class_counts is not None:
                class_counts = torch.as_tensor(class_counts, dtype=torch.int64)
                if class_counts.shape != (cfg.num_classes,):
                    raise ValueError(
                        f"class_counts must have shape ({cfg.num_classes},), got {tuple(class_counts.shape)}"
                    )
                local_counts = class_counts[self.class_start : end]
            self.bank = ClusterBank(
                self.num_local_classes, cfg.embedding_size, momentum=cfg.bank_momentum,
                phi_momentum=cfg.phi_momentum, alpha=cfg.phi_alpha, class_counts=local_counts, device=device,
                count_norm=cfg.phi_count_norm,
            )
        # The phi-shuffle control: the global class whose phi each local class takes. Derived
        # from the seed, so not part of the state dict.
        source = None
        if cfg.phi_shuffle != "none" and self.bank is not None:
            source = class_permutation(cfg.num_classes, cfg.seed)[self.class_start : end].to(device)
        self.register_buffer("phi_source", source, persistent=False)
        self.log_tau: Optional[nn.Parameter] = None
        if self.aux == "contrastive" and cfg.temperature == "learnable":
            self.log_tau = nn.Parameter(torch.tensor(math.log(cfg.tau), device=device))
            if self.ctx.is_distributed:
                # Each rank's gradient covers only its shard's logits; the true gradient is their sum.
                self.log_tau.register_hook(lambda g: all_reduce_no_grad(g, self.ctx))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64, device=device))
        # Host mirror of the step buffer (read every step for the sampler's seed): valid while the
        # buffer's version counter is the one it was read at, so a checkpoint load (an in-place
        # copy into the buffer) is noticed and re-read once.
        self._host_step: tuple[tuple[int, int], int] = ((0, -1), 0)
        self._stats: dict[str, object] = {}
        self.defer_input_checks = False
        self.input_flags: Optional[torch.Tensor] = None
        self._deferred_inputs: Optional[tuple[torch.Tensor, torch.Tensor, int]] = None
        self._finite_rows: Optional[torch.Tensor] = None

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"method={c.method}, num_classes={c.num_classes}, shard=[{self.class_start}, "
            f"{self.class_start + self.num_local_classes}), rank={self.ctx.rank}/{self.ctx.world_size}, "
            f"sample_rate={c.sample_rate}"
        )

    # ----------------------------------------------------------------------------------------------
    def _validate(self, emb: torch.Tensor, labels: torch.Tensor) -> None:
        cfg = self.config
        if emb.dim() != 2 or emb.shape[1] != cfg.embedding_size:
            raise ValueError(f"embeddings must be [B, {cfg.embedding_size}], got {tuple(emb.shape)}")
        if labels.dim() != 1 or labels.shape[0] != emb.shape[0]:
            raise ValueError(f"labels must be [B] with B={emb.shape[0]}, got {tuple(labels.shape)}")
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")

    @property
    def last_stats(self) -> dict[str, float]:
        """The latest training step's statistics as floats (one device read; see the class doc)."""
        tensors = [(k, v) for k, v in self._stats.items() if isinstance(v, torch.Tensor)]
        out = {k: float(v) for k, v in self._stats.items() if not isinstance(v, torch.Tensor)}
        if tensors:
            values = torch.stack([v.detach().float().reshape(()) for _, v in tensors]).tolist()
            out.update(zip((k for k, _ in tensors), values))
        return out

    def host_step(self) -> int:
        """``int(self.step)`` without a device read on ordinary steps (see ``_host_step``)."""
        key, value = self._host_step
        if key != (id(self.step), self.step._version):
            value = int(self.step)  # after construction, a load or a replaced buffer: one read
            self._host_step = ((id(self.step), self.step._version), value)
        return value

    def _check_global(self, global_emb: torch.Tensor, global_labels: torch.Tensor, local_batch: int) -> torch.Tensor:
        """Validates the gathered batch; returns the labels to use (out-of-range ones -> -1 when deferred)."""
        # Both checks read gathered tensors, so every rank reaches the same verdict and raises
        # together instead of leaving the others blocked in the next collective.
        n = self.config.num_classes
        bad_label = (global_labels < 0) | (global_labels >= n)
        bad_emb = ~torch.isfinite(global_emb.detach()).all(dim=1)
        if self.defer_input_checks:
            # No device read: the caller reads the flags with its once-per-step values. An
            # out-of-range label belongs to no shard (-1 - class_start < 0 on every rank).
            self.input_flags = torch.stack([bad_label.any(), bad_emb.any()])
            self._deferred_inputs = (global_labels, global_emb.detach(), local_batch)
            self._finite_rows = ~bad_emb  # the bank learns from finite embeddings only
            return torch.where(bad_label, torch.full_like(global_labels, -1 - n), global_labels)
        self._raise_input_errors(bad_label, bad_emb, global_labels, local_batch)
        return global_labels

    def input_error(self) -> Optional[Exception]:
        """The error :meth:`forward` would have raised on the latest deferred check, or ``None``.

        Reads the device (call it only when :attr:`input_flags` said something is wrong).
        """
        if self._deferred_inputs is None:
            return None
        labels, emb, local_batch = self._deferred_inputs
        n = self.config.num_classes
        try:
            self._raise_input_errors((labels < 0) | (labels >= n), ~torch.isfinite(emb).all(dim=1), labels,
                                     local_batch)
        except (ValueError, FloatingPointError) as e:
            return e
        return None

    def _raise_input_errors(self, bad_label, bad_emb, global_labels, local_batch: int) -> None:
        n = self.config.num_classes
        flags = torch.stack([bad_label.any(), bad_emb.any()]).tolist()
        if flags[0]:
            i = int(torch.nonzero(bad_label)[0])
            raise ValueError(
                f"label {int(global_labels[i])} on rank {i // local_batch} (sample {i % local_batch}) is "
                f"outside [0, {n}): check the dataset's class count against head.num_classes"
            )
        if flags[1]:
            ranks = sorted({int(i) // local_batch for i in torch.nonzero(bad_emb).flatten()})
            raise FloatingPointError(
                f"non-finite embeddings from rank(s) {ranks}: the backbone diverged (lower the learning "
                "rate, enable gradient clipping, or check the input data)"
            )

    def _phi_views(self, phi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(phi for the margin, phi for the temperature)`` of every local class: the bank's, or
        the permuted ones of the ``phi_shuffle`` control (collective when shuffling)."""
        mode = self.config.phi_shuffle
        if self.phi_source is None or mode == "none":
            return phi, phi
        shuffled = permuted_phi(phi, self.phi_source, [self.partition.range(r) for r in range(self.ctx.world_size)],
                                self.ctx)
        return (shuffled if mode in ("margin", "both") else phi,
                shuffled if mode in ("temperature", "both") else phi)

    def _lambda(self, local_class: torch.Tensor, stats: Optional[ConcentrationStats],
                phi_all: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Normalised concentration for target classes (NaN = warm-up margin).

        ``phi_all`` is the ``[C_local]`` phi the margin reads (default: the bank's).
        """
        cfg = self.config
        if not self.uses_concentration or self.bank is None or self.host_step() < cfg.margin_warmup_steps:
            return None
        phi = self.bank.phi(local_class) if phi_all is None else phi_all[local_class]
        if stats is None:
            return torch.full_like(phi, float("nan")) if cfg.margin_warmup_unseen else torch.ones_like(phi)
        return normalized_concentration(phi, stats, unknown="nan" if cfg.margin_warmup_unseen else "max")

    def _temperature(self, index: Optional[torch.Tensor], stats: Optional[ConcentrationStats], k: int, device,
                     phi_all: Optional[torch.Tensor] = None):
        cfg = self.config
        if cfg.temperature == "learnable":
            return self.log_tau.exp()  # 0-d: one temperature for all centers, with a gradient
        if cfg.temperature == "fixed" or stats is None or stats.mean_clipped <= 0:
            return torch.full((k,), cfg.tau, device=device)
        if phi_all is None:
            phi = self.bank.phi(index)
        else:
            phi = phi_all if index is None else phi_all[index]
        phi = torch.where(torch.isnan(phi), torch.full_like(phi, stats.max), phi)
        ratio = (phi.clamp(stats.lo, stats.hi) / stats.mean_clipped).clamp(*cfg.tau_ratio_range)
        return cfg.tau * ratio

    def _weight_rows(self, index: torch.Tensor) -> torch.Tensor:
        """``[P, D]`` rows of W wired for the configured gradient (``row_update``).

        ``"lazy"`` gathers with a sparse backward: W's gradient is a row-sparse COO tensor, never
        a dense ``[C, D]`` one (for :mod:`partial_fc.optim`); ``"dense"`` indexes the Parameter.
        """
        if self.config.row_update == "lazy":
            return F.embedding(index, self.weight, sparse=True)
        return self.weight[index]

    # ----------------------------------------------------------------------------------------------
    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """One head step on this rank's batch.

        Args:
            local_embeddings: ``[B, D]`` backbone outputs of this rank (any float dtype).
            local_labels: ``[B]`` integer class ids in ``[0, num_classes)``.

        Returns:
            Dict of scalars identical on every rank: ``loss`` (the total to back-propagate),
            ``ce`` (margin softmax), ``con`` (the contrastive slot: Con, center or triplet loss),
            ``ali`` (cluster aligning); disabled terms are zero tensors.

        Raises:
            ValueError: Labels outside ``[0, num_classes)``, wrong shapes, or unequal batch sizes
                across ranks (raised on every rank).
            FloatingPointError: Non-finite embeddings on any rank (raised on every rank).
        """
        cfg, ctx = self.config, self.ctx
        self._validate(local_embeddings, local_labels)
        device = local_embeddings.device
        local_batch = local_embeddings.shape[0]
        if cfg.validate_inputs and not self.defer_input_checks:
            check_equal_batch_sizes(local_batch, device, ctx)
        global_labels = all_gather_no_grad(local_labels.to(torch.int64), ctx)
        grad_scale = float(ctx.world_size) if cfg.embedding_grad == "ddp_mean" else 1.0
        global_emb = all_gather_with_grad(local_embeddings, ctx, grad_scale)
        if cfg.validate_inputs:
            global_labels = self._check_global(global_emb, global_labels, local_batch)

        step = self.host_step()
        gen = None
        if cfg.sample_rate < 1.0:
            gen = torch.Generator(device=device).manual_seed(step_seed(cfg.seed, step, ctx.rank))
        sampled = sample_classes(global_labels, self.class_start, self.num_local_classes, cfg.sample_rate, gen)
        index, target = sampled.index, sampled.target
        rows = torch.nonzero(target >= 0).squeeze(1)
        cols = target[rows]
        local_class = global_labels[rows] - self.class_start  # shard-local class of each target

        stats = None
        phi_margin = phi_temp = None
        if self.bank is not None:
            # Offline phi: the bank must have been filled by a refresh pass. Checked over all ranks
            # (one tiny all-reduce, offline mode only) so every rank raises together.
            if cfg.phi_refresh == "offline" and self.training and not bool(all_reduce_no_grad(
                    self.bank.counts.any().to(torch.float32).reshape(1), ctx, op=dist.ReduceOp.MAX)[0] > 0):
                raise RuntimeError(
                    "head.phi_refresh = 'offline' needs the bank filled by partial_fc.cluster.offline_refresh "
                    "before the first training step (pfc ablate does this every epoch; pfc train does not)")
            phi_now = self.bank.phi()
            stats = concentration_stats(phi_now, ctx, cfg.phi_percentiles, cfg.phi_bins)
            phi_margin, phi_temp = self._phi_views(phi_now)

        feats = F.normalize(global_emb, dim=1)
        lam = self._lambda(local_class, stats, phi_margin)
        params = self.margin_fn(lam, rows.numel(), device)
        # Scores may run in autocast's low precision; everything after them is fp32. The sampled
        # rows are gathered inside (twice, not kept); W's gradient is row-sparse when lazy.
        ce = fused_margin_cross_entropy(feats, self.weight, rows, cols, params, cfg.margin_grad, cfg.s, ctx,
                                        index=index, sparse_grad=cfg.row_update == "lazy")
        zero = ce.new_zeros(())
        con, ali = zero, zero
        con_sampled = None
        bank = self.bank
        sample_mask = None
        if self.aux is not None:
            # Samples whose class has a cluster center (the owner knows; every rank gets the mask).
            own_valid = torch.zeros(target.shape[0], device=device)
            own_valid[rows] = bank.valid(local_class).float()
            sample_mask = all_reduce_no_grad(own_valid, ctx) > 0
        if self.aux == "contrastive":
            con_index, con_target = index, target
            if cfg.con_sample_rate is not None:
                con_gen = None
                if cfg.con_sample_rate < 1.0:
                    con_gen = torch.Generator(device=device).manual_seed(con_step_seed(cfg.seed, step, ctx.rank))
                con_s = sample_classes(global_labels, self.class_start, self.num_local_classes,
                                       cfg.con_sample_rate, con_gen)
                con_index, con_target = con_s.index, con_s.target
            k_con = self.num_local_classes if con_index is None else con_index.shape[0]
            con_sampled = k_con
            tau = self._temperature(con_index, stats, k_con, device, phi_temp)
            # Chunked online softmax: no [N, K] buffer, no [K, D] copy of the centers; both
            # gradients are computed in forward, before the bank's in-place update below. Its
            # matmuls follow autocast like the CE's; its softmax state is fp32.
            con = fused_cluster_contrastive(feats, bank.centers, con_target, tau, bank.valid(con_index), ctx,
                                            sample_mask, index=con_index)
        with torch.autocast(device_type=device.type, enabled=False):
            feats = feats.float()
            if self.aux in ("center", "triplet"):
                # A copy: the bank is updated in place below, before backward reads these centers.
                centers = bank.centers.clone() if index is None else bank.centers[index]
                if self.aux == "center":
                    con = center_loss(feats, target, centers, sample_mask, ctx)
                else:
                    con = center_triplet_loss(feats, target, centers, bank.valid(index), sample_mask,
                                              cfg.triplet_margin, ctx)
            if self.align:
                present = torch.unique(local_class)
                present = present[bank.valid(present)]
                w_rows = self.weight[present] if index is None else self._weight_rows(present)
                ali = cluster_aligning_loss(w_rows, bank.centers[present], ctx)
            loss = ce + cfg.con_weight * con + cfg.ali_weight * ali

        if self.training:
            self._record_stats(stats, params, sampled.num_sampled, ctx, con_sampled)
            if self.bank is not None and cfg.phi_refresh == "online":
                local_all = global_labels - self.class_start
                in_shard = (local_all >= 0) & (local_all < self.num_local_classes)
                if self.defer_input_checks and self._finite_rows is not None:
                    # Non-finite embeddings were not refused (the step will be skipped): keep them
                    # out of the bank, without reading the device.
                    in_shard = in_shard & self._finite_rows
                self.bank.update(feats.detach(), torch.where(in_shard, local_all, torch.full_like(local_all, -1)))
            self.step += 1
            self._host_step = ((id(self.step), self.step._version), step + 1)
        return {"loss": loss, "ce": ce, "con": con, "ali": ali}

    def _record_stats(self, stats, params, num_sampled: int, ctx: ParallelContext,
                      con_sampled: Optional[int] = None) -> None:
        # Device tensors stay device tensors here (no sync); ``last_stats`` reads them on demand.
        s: dict[str, object] = {"num_sampled_local": float(num_sampled)}
        if con_sampled is not None:
            s["con_sampled_local"] = float(con_sampled)
        if stats is not None:
            s.update(phi_min=stats.min, phi_mean=stats.mean, phi_max=stats.max,
                     phi_lo=stats.lo, phi_hi=stats.hi, phi_known=float(stats.num_known))
        if params.m2.numel():  # the additive angular margin actually applied to this step's targets
            m2 = params.m2.detach()
            s.update(margin_min=m2.min(), margin_max=m2.max(), margin_mean=m2.mean())
        if self.log_tau is not None:
            s["tau"] = self.log_tau.detach().exp()
        self._stats = s

    @torch.no_grad()
    def class_margins(self) -> tuple[torch.Tensor, torch.Tensor, MarginParams]:
        """Concentration, normalised concentration and margin of every local class, as the next
        training step would apply them (warm-up and unseen-class rules included).

        Collective when distributed (the phi statistics are global): every rank must call it.

        Returns:
            ``(phi [C_local], lam [C_local], params)``: phi and lambda are NaN where unknown (and
            all NaN when the method has no bank); ``params`` holds ``m1, m2, m3`` of shape
            ``[C_local]``. phi and lambda are the class's own; with ``phi_shuffle`` the margins
            follow the permuted phi.
        """
        cfg = self.config
        device = self.weight.device
        n = self.num_local_classes
        phi = torch.full((n,), float("nan"), device=device)
        lam_out = phi.clone()
        stats = None
        phi_margin = None
        if self.bank is not None:
            phi = self.bank.phi()
            stats = concentration_stats(phi, self.ctx, cfg.phi_percentiles, cfg.phi_bins)
            if stats is not None:
                lam_out = normalized_concentration(phi, stats, unknown="nan")
            phi_margin, _ = self._phi_views(phi)
        lam = self._lambda(torch.arange(n, device=device), stats, phi_margin)
        return phi, lam_out, self.margin_fn(lam, n, device)

    @torch.no_grad()
    def concentration(self) -> torch.Tensor:
        """``[num_local_classes]`` phi of this shard (NaN where unknown); empty if no bank."""
        if self.bank is None:
            return torch.empty(0)
        return self.bank.phi()
