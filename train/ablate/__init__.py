"""``pfc ablate``: the paper's ablation study (baseline, s1..s6, center/triplet variants) on CPU.

One command generates (or reuses) a synthetic identity dataset, trains every variant for every
seed with the same recipe and budget, evaluates each trained backbone on the held-out splits and
writes ``results.json`` (every run) and ``table.md`` (mean +- std over seeds)::

    pfc ablate --out runs/ablate                          # the first study (docs/results-first-study.md)
    pfc ablate --out runs/ablate --variants arcface s6 --seeds 0 1
    pfc ablate --out runs/s6opts --runs-dir runs/ablate/runs --data runs/ablate/data \\
        --variants s6-options                             # a second table; reuses arcface and s6
    pfc ablate --quick --out /tmp/smoke                   # a tiny smoke run (seconds)
    pfc ablate --spec train/studies/cg_study.toml --out runs/cg_study   # issue 17's study (study-v2)

A spec file (``--spec``) holds a ``[study]`` table: :class:`StudySpec` fields (dataset, budget,
``protocol``) plus ``variants``, ``seeds``, ``jobs``, ``threads``, ``order``; command-line options
override it. ``protocol = "study-v2"`` evaluates with :mod:`train.ablate.protocol_v2` (all held-out
pairs, identity groups, probe identification, phi diagnostics) and also writes ``study.md``
(paired differences with 95% intervals, :mod:`train.ablate.stats`).

Variants are preset names (``arcface``, ``s1``...``s6``, ``s2_center``...), groups (``paper``,
``s6-options``, ``cg-study``) or a preset with head options, ``METHOD:key=value[:key=value...]`` (a key without
a dot is a ``head.`` key; values are TOML literals or bare strings), e.g.
``s6:margin_direction=looser_smaller:tau=0.05``.

The rooms, one job each:

========================= ======================================================================
``spec.py``               what a study is: :class:`StudySpec`, :class:`Variant`, groups, spec files
``data.py``               the dataset (made or reused), decoded held-out data, hard identities
``protocol_v1.py``        protocol ``ablate-v1``: verification (all and hard pairs), clustering
``protocol_v2.py``        protocol ``study-v2``: held-out groups, probes, phi, hooks, ``study.md``
``stats.py``              statistics of study-v2 (all-pair TAR, correlations, paired intervals)
``contrasts.py``          study-v2: each control against the variant it controls
``identity_effects.py``   study-v2: per-class gain regressed on size, nuisance, family; margin rho
``forest.py``             study-v2: ``differences.png`` (paired differences with intervals)
``runner.py``             one run (config, fingerprint, reuse, train + evaluate), workers, the study loop
``report.py``             ``results.json``, ``table.md``, paired differences, ``ablation.png``
``cli.py``                ``pfc ablate``'s options (``add_arguments``), ``run``, ``main``
========================= ======================================================================

Importing this package is light (numpy, no torch or matplotlib); training code loads on use.
"""

from .cli import main
from .data import hard_identities, hard_pair_mask
from .protocol_v1 import METRICS
from .report import aggregate, format_delta_table, format_table, paired_deltas
from .runner import run_study
from .spec import GROUPS, PROTOCOL, StudySpec, Variant, parse_variants

__all__ = [
    "Variant", "StudySpec", "PROTOCOL", "METRICS", "GROUPS", "parse_variants", "hard_identities",
    "hard_pair_mask", "aggregate", "format_table", "paired_deltas", "format_delta_table", "run_study", "main",
]
