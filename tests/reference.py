"""Independent single-process dense references for the head's losses and bank.

Written plainly (full W, F.cross_entropy, Python loops for the bank) so that a bug shared by the
sharded implementation and its single-process path cannot hide: the tests compare against these.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def margin_logits(emb, weight, labels, m1, m2, m3, s, grad_mode="exact"):
    """Dense margin logits ``[N, C]`` with the target logit ``cos(m1*theta + m2) - m3``."""
    cos = F.normalize(emb, dim=1) @ F.normalize(weight, dim=1).t()
    cos = cos.clamp(-1, 1)
    n = torch.arange(labels.numel())
    tc = cos[n, labels]
    theta = torch.acos(tc.clamp(-1 + 1e-7, 1 - 1e-7))
    m1, m2, m3 = (torch.as_tensor(v, dtype=tc.dtype).expand_as(tc) for v in (m1, m2, m3))
    u = m1 * theta + m2
    val = torch.where(u <= math.pi, torch.cos(u) - m3, tc - m3 - m2 * torch.sin(m2))
    if grad_mode == "straight_through":
        val = tc + (val - tc).detach()
    return cos.index_put((n, labels), val) * s


def margin_ce(emb, weight, labels, m1, m2, m3, s, grad_mode="exact"):
    return F.cross_entropy(margin_logits(emb, weight, labels, m1, m2, m3, s, grad_mode), labels)


def contrastive(emb, centers, valid, tau, labels, classes):
    """Con loss over the class subset ``classes`` (sorted global ids); masked where invalid."""
    f = F.normalize(emb, dim=1)
    pos = {int(c): i for i, c in enumerate(classes.tolist())}
    logits = f @ centers[classes].t() / tau[classes]
    logits = logits.masked_fill(~valid[classes].unsqueeze(0), -math.inf)
    keep = valid[labels]
    tgt = torch.tensor([pos[int(y)] for y in labels])
    return F.cross_entropy(logits[keep], tgt[keep])


def aligning(weight, centers, valid, labels):
    present = [c for c in sorted(set(labels.tolist())) if bool(valid[c])]
    idx = torch.tensor(present, dtype=torch.long)
    return (1 - F.cosine_similarity(weight[idx], centers[idx], dim=1)).mean()


def center(emb, centers, valid, labels):
    f = F.normalize(emb, dim=1)
    keep = valid[labels]
    return (1 - (f[keep] * centers[labels[keep]]).sum(1)).mean()


def triplet(emb, centers, valid, labels, classes, margin):
    f = F.normalize(emb, dim=1)
    losses = []
    for i, y in enumerate(labels.tolist()):
        if not bool(valid[y]):
            continue
        negs = [c for c in classes.tolist() if c != y and bool(valid[c])]
        if not negs:
            continue
        sims = f[i] @ centers[torch.tensor(negs)].t()
        losses.append(F.relu(margin + sims.max() - f[i] @ centers[y]))
    return torch.stack(losses).sum() / len(losses)


def bank_update(state, feats, labels, m_c=0.9, m_phi=0.9):
    """Loop-based bank update on a dict of dense tensors (centers, counts, mean_dist, dist_obs)."""
    feats = F.normalize(feats, dim=1)
    for y in sorted(set(labels.tolist())):
        fy = feats[labels == y]
        k = fy.shape[0]
        mean = fy.mean(0)
        if state["counts"][y] == 0:
            c = F.normalize(mean, dim=0)
            d = (fy - c).norm(dim=1).mean() if k >= 2 else None
            state["centers"][y] = c
        else:
            old = state["centers"][y].clone()
            d = (fy - old).norm(dim=1).mean()
            state["centers"][y] = F.normalize(m_c * old + (1 - m_c) * mean, dim=0)
        if d is not None:
            if state["dist_obs"][y] == 0:
                state["mean_dist"][y] = d
            else:
                state["mean_dist"][y] = m_phi * state["mean_dist"][y] + (1 - m_phi) * d
            state["dist_obs"][y] += k
        state["counts"][y] += k
    return state


def phi(state, alpha=10.0, class_counts=None):
    z = state["counts"].double() if class_counts is None else class_counts.double()
    out = state["mean_dist"].double() / torch.log(z + alpha)
    return torch.where(state["dist_obs"] > 0, out, torch.full_like(out, float("nan")))
