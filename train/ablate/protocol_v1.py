"""Protocol ``ablate-v1``: how the first study evaluates a trained backbone.

- **Verification**: the generator's ``verification.bin`` (pairs of identities disjoint from
  training). k-fold accuracy and TAR at FAR 1e-3 / 1e-4 over all pairs, and over the *hard*
  pairs: the hardest third of the verification identities by the generator's ground-truth
  difficulty (``identities.json``) is "hard"; a genuine pair is hard when its identity is hard,
  an impostor pair when at least one of its two identities is (the generator's
  ``pair_difficulty`` is the max of the two; :func:`train.ablate.data.hard_pair_mask`). Images
  shared by several pairs are embedded once.
- **Clustering**: the generator's clustering split (identities disjoint from both), K-means on the
  L2-normalised embeddings with k = the true number of identities, seeded with the run's seed;
  NMI and BCubed F from :mod:`train.evaluate.clustering`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .data import EvalData

__all__ = ["METRICS", "evaluate_run"]

#: Reported metrics, in table order: (key, column title).
METRICS: tuple[tuple[str, str], ...] = (
    ("acc", "Acc"),
    ("tar_1e-3", "TAR@1e-3"),
    ("tar_1e-4", "TAR@1e-4"),
    ("hard_acc", "Acc hard"),
    ("hard_tar_1e-3", "TAR@1e-3 hard"),
    ("hard_tar_1e-4", "TAR@1e-4 hard"),
    ("nmi", "NMI"),
    ("bcubed_f", "BCubed F"),
)


def _verification(scores: np.ndarray, issame: np.ndarray, fars: Sequence[float], prefix: str) -> dict[str, float]:
    from ..evaluate.verification import tar_at_far, ten_fold_accuracy

    acc, _, _ = ten_fold_accuracy(scores, issame)
    out = {f"{prefix}acc": acc}
    for far, tar in tar_at_far(scores, issame, fars).items():
        out[f"{prefix}tar_{far:.0e}".replace("e-0", "e-")] = tar
    return out


def evaluate_run(model, data: EvalData, *, seed: int, fars: Sequence[float] = (1e-3, 1e-4),
                 batch_size: int = 256) -> dict[str, float]:
    """Verification (all and hard pairs) and clustering figures of one trained backbone.

    Args:
        model: The backbone, ``[B, 3, 112, 112] -> [B, D]``; evaluated in ``eval()`` mode.
        data: The decoded held-out splits.
        seed: K-means seed.

    Returns:
        ``{metric: value}`` with the keys of :data:`METRICS` plus pair counts and cluster counts.
    """
    from sklearn.cluster import KMeans

    from ..evaluate.clustering import clustering_scores
    from ..evaluate.runner import embed_images

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        ver = embed_images(model, data.ver_images, device, batch_size).numpy().astype(np.float64)
        clu = embed_images(model, data.cluster_images, device, batch_size).numpy().astype(np.float64)
    finally:
        model.train(was_training)
    a, b = data.pair_index[:, 0], data.pair_index[:, 1]
    scores = (ver[a] * ver[b]).sum(1)
    out = _verification(scores, data.issame, fars, "")
    out.update(_verification(scores[data.hard], data.issame[data.hard], fars, "hard_"))
    k = int(np.unique(data.cluster_labels).size)
    pred = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(clu)
    cs = clustering_scores(data.cluster_labels, pred)
    out.update(nmi=cs.nmi, bcubed_f=cs.bcubed_f, pairwise_f=cs.pairwise_f)
    out.update(pairs=int(len(scores)), hard_pairs=int(data.hard.sum()),
               hard_impostors=int((data.hard & ~data.issame).sum()), clusters=k)
    return out
