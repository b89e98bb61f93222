"""IJB-B face clustering on the official subtasks, in memory that grows with N x k, not N x N.

The IJB-B release's clustering protocol is one CSV per subtask (7 subtasks of 32 to 1,845
subjects; the paper reports the three largest, 512, 1,024 and 1,845 subjects, the last with about
68k faces). Each row is one face to cluster::

    TEMPLATE_ID,SUBJECT_ID,FILENAME,FACE_X,FACE_Y,FACE_WIDTH,FACE_HEIGHT[,...]

Columns are found by name (case-insensitive; any others are ignored); ``FILENAME`` is relative to
the IJB-B image folder. Faces are cropped by their box with :data:`~train.evaluate.faces.BOX_MARGIN`
around it, or aligned from 5 landmarks when a landmark file gives them (lines
``TEMPLATE_ID x1 y1 ... x5 y5``, image coordinates; keyed by TEMPLATE_ID because one image can
hold several faces).

Algorithms, on L2-normalised float32 features (cosine geometry):

- **K-means** (scikit-learn, ``k`` = the subtask's subject count): memory ``O(N D + k D)``.
- **DBSCAN** (scikit-learn) on a precomputed sparse radius graph built block by block
  (:func:`radius_graph`), ``eps`` from the k-distance rule computed on a chunked k-NN
  (:func:`knn_cosine`): memory ``O(N D + edges within eps)``.
- **Agglomerative, average linkage on a k-NN graph** (scikit-learn with ``connectivity``): the
  third method. Average linkage is what the unconstrained protocol runs on small sets; restricted
  to each face's ``--cluster-knn`` nearest neighbours it needs ``O(N k)`` memory instead of an
  ``N x N`` matrix (37 GB in float64 at 68k faces), and face identities are local in the
  embedding, so merges across non-neighbours are the ones a good clustering never makes. The k-NN
  graph's connected components are joined through their centroids' nearest neighbours so that the
  cut at ``k`` clusters is always defined.
"""

from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .clustering import ClusteringRun, clustering_scores

__all__ = [
    "ClusteringSubtask",
    "IJBB_ALGORITHMS",
    "SubtaskConfig",
    "agglomerative_knn",
    "cluster_subtask",
    "dbscan_sparse",
    "knn_cosine",
    "radius_graph",
    "read_clustering_csv",
    "read_landmarks_by_template",
]

IJBB_ALGORITHMS = ("kmeans", "dbscan", "agglomerative")
_REQUIRED = ("TEMPLATE_ID", "SUBJECT_ID", "FILENAME", "FACE_X", "FACE_Y", "FACE_WIDTH", "FACE_HEIGHT")


@dataclass
class ClusteringSubtask:
    """One protocol CSV: ``N`` faces with template id, subject, file and box ``[N, 4]`` (x, y, w, h)."""

    name: str
    template_ids: np.ndarray
    subjects: np.ndarray
    filenames: list[str]
    boxes: np.ndarray

    @property
    def num_subjects(self) -> int:
        return int(len(np.unique(self.subjects)))


def read_clustering_csv(path: str | Path) -> ClusteringSubtask:
    """Reads one IJB-B clustering subtask CSV (see the module docstring).

    Raises:
        ValueError: A missing column, a malformed row (file and line named), a template id
            listed twice, or no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"clustering protocol file {path} does not exist")
    tids, subs, files, boxes = [], [], [], []
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path} is empty (expected a header with {', '.join(_REQUIRED)})")
        cols = {h.strip().upper(): i for i, h in enumerate(header)}
        missing = [c for c in _REQUIRED if c not in cols]
        if missing:
            raise ValueError(f"{path}:1: header lacks {missing} (has {header})")
        at = [cols[c] for c in _REQUIRED]
        seen: dict[int, int] = {}
        for row in reader:
            n = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) <= max(at):
                raise ValueError(f"{path}:{n}: {len(row)} fields, the header has {len(header)}")
            v = [row[i].strip() for i in at]
            try:
                tid, sub = int(v[0]), int(v[1])
                box = [float(x) for x in v[3:]]
            except ValueError:
                raise ValueError(f"{path}:{n}: TEMPLATE_ID and SUBJECT_ID must be integers and the face box numbers, "
                                 f"got {v}") from None
            if not v[2]:
                raise ValueError(f"{path}:{n}: empty FILENAME")
            if not all(math.isfinite(b) for b in box) or box[2] <= 0 or box[3] <= 0:
                raise ValueError(f"{path}:{n}: face box {box} needs finite values and a positive width and height")
            if tid in seen:
                raise ValueError(f"{path}:{n}: TEMPLATE_ID {tid} already on line {seen[tid]}")
            seen[tid] = n
            tids.append(tid)
            subs.append(sub)
            files.append(v[2])
            boxes.append(box)
    if not tids:
        raise ValueError(f"{path} has no faces")
    return ClusteringSubtask(name=path.stem, template_ids=np.asarray(tids, np.int64),
                             subjects=np.asarray(subs, np.int64), filenames=files,
                             boxes=np.asarray(boxes, np.float64))


def read_landmarks_by_template(path: str | Path) -> dict[int, np.ndarray]:
    """``{TEMPLATE_ID: [5, 2]}`` from lines ``TEMPLATE_ID x1 y1 ... x5 y5`` (file:line errors)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"landmark file {path} does not exist")
    out: dict[int, np.ndarray] = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            cols = line.split()
            if not cols:
                continue
            if len(cols) != 11:
                raise ValueError(f"{path}:{n}: expected 'TEMPLATE_ID x1 y1 ... x5 y5' (11 columns), got {len(cols)}")
            try:
                tid, pts = int(cols[0]), np.array([float(c) for c in cols[1:]]).reshape(5, 2)
            except ValueError:
                raise ValueError(f"{path}:{n}: not a template id and 10 numbers: {line.strip()!r}") from None
            if not np.isfinite(pts).all():
                raise ValueError(f"{path}:{n}: non-finite landmark")
            out[tid] = pts
    return out


# ----------------------------------------------------------------------------- neighbours
def _unit(features: np.ndarray) -> np.ndarray:
    f = np.asarray(features, dtype=np.float32)
    if f.ndim != 2:
        raise ValueError(f"features must be [N, D], got {f.shape}")
    norm = np.linalg.norm(f, axis=1, keepdims=True)
    if not np.isfinite(f).all() or (norm == 0).any():
        raise ValueError("non-finite or zero features: the model produced degenerate embeddings")
    return f / norm


def knn_cosine(features: np.ndarray, k: int, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` most similar rows (itself included), by blocks of ``block`` rows.

    Args:
        features: ``[N, D]`` L2-normalised float32.
        k: Neighbours per row (at most N).
        block: Rows per similarity block (peak extra memory about ``block x N`` float32).

    Returns:
        ``(index [N, k] int64, cosine distance [N, k] float32)``, nearest first, itself first.
    """
    import torch

    f = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    n = f.shape[0]
    k = min(int(k), n)
    idx = np.empty((n, k), np.int64)
    dist = np.empty((n, k), np.float32)
    for s in range(0, n, block):
        sim = f[s : s + block] @ f.T
        rows = torch.arange(sim.shape[0])
        sim[rows, s + rows] = float("inf")  # itself first, whatever rounding says
        top, part = torch.topk(sim, k, dim=1, largest=True, sorted=True)
        d = (1.0 - top).clamp_(0.0, 2.0)
        d[:, 0] = 0.0
        idx[s : s + block] = part.numpy()
        dist[s : s + block] = d.numpy()
    return idx, dist


def radius_graph(features: np.ndarray, eps: float, block: int = 1024, max_edges: int = 400_000_000):
    """Sparse ``[N, N]`` CSR of cosine distances ``<= eps`` (diagonal included, stored as 0),
    built by blocks of rows; DBSCAN with ``metric="precomputed"`` reads it.

    Raises:
        ValueError: More than ``max_edges`` edges (``eps`` too large for memory).
    """
    from scipy.sparse import csr_matrix

    f = np.asarray(features, dtype=np.float32)
    n = f.shape[0]
    rows, cols, vals, total = [], [], [], 0
    for s in range(0, n, block):
        d = 1.0 - f[s : s + block] @ f.T
        r = np.arange(d.shape[0])
        d[r, s + r] = 0.0
        rr, cc = np.nonzero(d <= eps)
        total += len(rr)
        if total > max_edges:
            raise ValueError(f"DBSCAN eps {eps:.4f} links more than {max_edges} pairs of {n} faces; lower --dbscan-eps "
                             "or --dbscan-quantile")
        rows.append((rr + s).astype(np.int64))
        cols.append(cc.astype(np.int64))
        # Stored entries are the neighbours (explicit zeros included: the diagonal and duplicates).
        vals.append(np.maximum(d[rr, cc], 0.0).astype(np.float32))
    g = csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n, n))
    g.sort_indices()
    return g


def dbscan_sparse(features: np.ndarray, min_samples: int = 3, eps: Optional[float] = None, quantile: float = 0.7,
                  block: int = 1024) -> tuple[np.ndarray, dict]:
    """DBSCAN on cosine distance through a sparse radius graph (memory ``O(edges)``).

    ``eps`` ``None``: the k-distance rule (the ``quantile`` of each face's distance to its
    ``min_samples``-th nearest face, itself first), as :func:`train.evaluate.clustering.dbscan_eps`.
    """
    from sklearn.cluster import DBSCAN

    f = _unit(features)
    rule = eps is None
    if rule:
        _, dist = knn_cosine(f, min_samples, block)
        eps = float(max(np.quantile(dist[:, -1], quantile), 1e-6))
    g = radius_graph(f, eps, block)
    labels = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(g)
    return labels, {"eps": eps, "min_samples": min_samples, "graph_edges": int(g.nnz),
                    "eps_rule": f"k-distance quantile {quantile}" if rule else "fixed"}


def _connect(conn, f: np.ndarray, block: int):
    """Adds edges until the graph is connected: each component to its centroid-nearest other
    component (through the members nearest the two centroids)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = f.shape[0]
    while True:
        ncomp, comp = connected_components(conn, directed=False)
        if ncomp == 1:
            return conn
        cent = np.zeros((ncomp, f.shape[1]), np.float32)
        np.add.at(cent, comp, f)
        cent /= np.maximum(np.linalg.norm(cent, axis=1, keepdims=True), 1e-12)
        # representative of each component: the member most similar to its centroid
        sim_c = (f * cent[comp]).sum(1)
        order = np.lexsort((-sim_c, comp))
        rep = order[np.r_[0, np.nonzero(np.diff(comp[order]))[0] + 1]]
        nn = np.empty(ncomp, np.int64)
        for s in range(0, ncomp, block):
            sim = cent[s : s + block] @ cent.T
            r = np.arange(sim.shape[0])
            sim[r, s + r] = -np.inf
            nn[s : s + block] = np.argmax(sim, 1)
        extra = coo_matrix((np.ones(ncomp), (rep, rep[nn])), shape=(n, n))
        conn = ((conn + extra + extra.T) > 0).astype(np.float64).tocsr()


def _edge_cosine(f: np.ndarray, rows: np.ndarray, cols: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """Cosine distance of each graph edge, ``chunk`` edges at a time (float64)."""
    out = np.empty(len(rows), np.float64)
    for s in range(0, len(rows), chunk):
        a = f[rows[s : s + chunk]].astype(np.float64)
        b = f[cols[s : s + chunk]].astype(np.float64)
        out[s : s + chunk] = 1.0 - np.einsum("ij,ij->i", a, b)
    return out


def _average_linkage_on_graph(graph, n_clusters: int) -> np.ndarray:
    """Average-linkage agglomeration restricted to the edges of a connected symmetric CSR
    ``graph`` whose data are the edge distances; labels after cutting at ``n_clusters``.

    scikit-learn's algorithm (the same merge rule, heap and per-node maps, from its compiled
    helpers) with one change: scikit-learn computes the edge distances from two gathered
    ``[edges, D]`` copies of the features (12 GB at 68k faces x 30 neighbours x 512-d); here the
    distances come in, computed in chunks. The tests check it against scikit-learn.
    """
    from heapq import heapify, heappop, heappush

    from sklearn.cluster import _hierarchical_fast as _hierarchical
    from sklearn.utils._fast_dict import IntFloatDict

    n = graph.shape[0]
    n_nodes = 2 * n - n_clusters
    A = np.empty(n_nodes, dtype=object)
    heap = []
    indptr, indices, data = graph.indptr, graph.indices.astype(np.intp), graph.data.astype(np.float64)
    for i in range(n):
        lo, hi = indptr[i], indptr[i + 1]
        row, d = indices[lo:hi], data[lo:hi]
        keep = row != i
        row, d = row[keep], d[keep]
        A[i] = IntFloatDict(np.ascontiguousarray(row), np.ascontiguousarray(d))
        heap.extend(_hierarchical.WeightedEdge(w, i, r) for r, w in zip(row.tolist(), d.tolist()) if r < i)
    heapify(heap)
    used = np.ones(n_nodes, dtype=np.intp)
    parent = np.arange(n_nodes, dtype=np.intp)
    for k in range(n, n_nodes):
        while True:
            edge = heappop(heap)
            if used[edge.a] and used[edge.b]:
                break
        i, j = edge.a, edge.b
        parent[i] = parent[j] = k
        n_i, n_j = used[i], used[j]
        used[k] = n_i + n_j
        used[i] = used[j] = False
        merged = _hierarchical.average_merge(A[i], A[j], used, n_i, n_j)
        for col, d in merged:
            A[col].append(k, d)
            heappush(heap, _hierarchical.WeightedEdge(d, k, col))
        A[k] = merged
        A[i] = A[j] = 0
    # The tree stops at n_clusters roots: each sample's label is its root (as scikit-learn cuts a
    # tree it did not complete).
    heads = np.copy(_hierarchical.hc_get_heads(parent, copy=False)[:n])
    return np.searchsorted(np.unique(heads), heads)


def agglomerative_knn(features: np.ndarray, n_clusters: int, knn: int = 30, block: int = 1024) -> tuple[np.ndarray, dict]:
    """Average-linkage agglomerative clustering (cosine) restricted to a k-NN graph.

    Memory: the graph (edges x (index + distance)) and the merge structures, ``O(N k)``; no
    ``N x N`` matrix and no ``edges x D`` copy.
    """
    from scipy.sparse import coo_matrix, csr_matrix

    f = _unit(features)
    n = f.shape[0]
    n_clusters = min(int(n_clusters), n)
    idx, _ = knn_cosine(f, min(knn + 1, n), block)
    rows = np.repeat(np.arange(n), idx.shape[1] - 1)
    conn = csr_matrix((np.ones(len(rows)), (rows, idx[:, 1:].ravel())), shape=(n, n))
    conn = ((conn + conn.T) > 0).astype(np.float64).tocsr()
    conn = _connect(conn, f, block).tocoo()
    off = conn.row != conn.col
    r, c = conn.row[off], conn.col[off]
    graph = coo_matrix((_edge_cosine(f, r, c), (r, c)), shape=(n, n)).tocsr()
    graph.sort_indices()
    labels = _average_linkage_on_graph(graph, n_clusters)
    return labels, {"n_clusters": n_clusters, "linkage": "average", "knn": knn, "graph_edges": int(graph.nnz // 2)}


@dataclass(frozen=True)
class SubtaskConfig:
    """Settings of :func:`cluster_subtask`."""

    algorithms: tuple[str, ...] = IJBB_ALGORITHMS
    seed: int = 0
    kmeans_n_init: int = 10
    kmeans_max_iter: int = 300
    dbscan_eps: Optional[float] = None
    dbscan_min_samples: int = 3
    dbscan_quantile: float = 0.7
    knn: int = 30
    block: int = 1024

    def __post_init__(self) -> None:
        bad = [a for a in self.algorithms if a not in IJBB_ALGORITHMS]
        if bad or not self.algorithms:
            raise ValueError(f"unknown clustering algorithm(s) {bad}; choose from {list(IJBB_ALGORITHMS)}")
        if self.knn < 1 or self.block < 1 or self.kmeans_n_init < 1 or self.dbscan_min_samples < 1:
            raise ValueError("knn, block, kmeans_n_init and dbscan_min_samples must be >= 1")


def cluster_subtask(features: np.ndarray, subjects: np.ndarray, config: SubtaskConfig = SubtaskConfig()
                    ) -> list[ClusteringRun]:
    """Clusters one subtask's faces with each algorithm and scores against the subjects."""
    from sklearn.cluster import KMeans

    f = _unit(features)
    subjects = np.asarray(subjects).ravel()
    if subjects.shape[0] != f.shape[0]:
        raise ValueError(f"{f.shape[0]} features for {subjects.shape[0]} subjects")
    k = int(len(np.unique(subjects)))
    runs = []
    for algo in config.algorithms:
        t0 = time.perf_counter()
        if algo == "kmeans":
            pred = KMeans(n_clusters=k, n_init=config.kmeans_n_init, max_iter=config.kmeans_max_iter,
                          random_state=config.seed).fit_predict(f)
            params = {"k": k, "n_init": config.kmeans_n_init}
        elif algo == "dbscan":
            pred, params = dbscan_sparse(f, config.dbscan_min_samples, config.dbscan_eps, config.dbscan_quantile,
                                         config.block)
        else:
            pred, params = agglomerative_knn(f, k, config.knn, config.block)
        secs = time.perf_counter() - t0
        runs.append(ClusteringRun(num_identities=k, num_samples=int(f.shape[0]), algorithm=algo,
                                  scores=clustering_scores(subjects, pred), params=params, seconds=secs,
                                  noise_fraction=float((np.asarray(pred) < 0).mean()),
                                  indices=np.arange(f.shape[0]), predictions=np.asarray(pred)))
    return runs


def evaluate_ijbb_clustering(
    embedder, csvs: Sequence[str | Path], images: str | Path, *, landmarks: Optional[str | Path] = None,
    flip: bool = True, batch_size: int = 128, workers: int = 2, progress: bool = True,
    config: SubtaskConfig = SubtaskConfig(),
) -> tuple[list[dict], list[ClusteringRun]]:
    """Embeds every face of the given subtasks once, then clusters each subtask.

    Returns:
        ``(subtasks, runs)``: per subtask ``{"name", "file", "num_faces", "num_subjects"}``, and
        the runs of all subtasks in order (``ClusteringRun.params["subtask"]`` names theirs).
    """
    from .faces import FaceSpec, check_images_exist, iter_face_batches

    tasks = [read_clustering_csv(p) for p in csvs]
    lms = read_landmarks_by_template(landmarks) if landmarks else {}
    faces: dict[int, FaceSpec] = {}
    for t, path in zip(tasks, csvs):
        for tid, fn, box in zip(t.template_ids, t.filenames, t.boxes):
            spec = FaceSpec(fn, landmarks=lms.get(int(tid)), box=None if int(tid) in lms else tuple(box))
            old = faces.setdefault(int(tid), spec)
            if old.path != spec.path:
                raise ValueError(f"{path}: TEMPLATE_ID {tid} is {spec.path} here but {old.path} in an earlier subtask")
    images = Path(images)
    check_images_exist(images, [s.path for s in faces.values()], "the clustering protocol")
    order = sorted(faces)
    feats = None
    pos = 0
    for batch in iter_face_batches(images, [faces[t] for t in order], batch_size=batch_size,
                                   size=embedder.image_size, workers=workers, progress=progress,
                                   desc="IJB-B clustering faces"):
        e = embedder.embed(batch, batch_size, flip).numpy().astype(np.float32)
        if feats is None:
            feats = np.empty((len(order), e.shape[1]), np.float32)
        feats[pos : pos + len(e)] = e
        pos += len(e)
    ids = np.asarray(order, np.int64)
    info, runs = [], []
    for t, path in zip(tasks, csvs):
        rows = np.searchsorted(ids, t.template_ids)
        sub_runs = cluster_subtask(feats[rows], t.subjects, config)
        for r in sub_runs:
            r.params["subtask"] = t.name
        runs += sub_runs
        info.append({"name": t.name, "file": str(path), "num_faces": int(len(rows)), "num_subjects": t.num_subjects})
    return info, runs
