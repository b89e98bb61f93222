import math

import pytest
import torch
import torch.nn.functional as F

from partial_fc.cluster import ClusterBank, concentration_stats, normalized_concentration
from partial_fc.distributed import ParallelContext
from tests import reference as ref


def test_bank_update_matches_brute_force():
    torch.manual_seed(0)
    c, d = 12, 8
    bank = ClusterBank(c, d, momentum=0.9, phi_momentum=0.8)
    state = {"centers": torch.zeros(c, d), "counts": torch.zeros(c, dtype=torch.long),
             "mean_dist": torch.zeros(c), "dist_obs": torch.zeros(c, dtype=torch.long)}
    for step in range(6):
        labels = torch.randint(0, c, (20,))
        feats = torch.randn(20, d)
        bank.update(F.normalize(feats, dim=1), labels)
        ref.bank_update(state, feats, labels, m_c=0.9, m_phi=0.8)
    torch.testing.assert_close(bank.centers, state["centers"])
    torch.testing.assert_close(bank.counts, state["counts"])
    torch.testing.assert_close(bank.mean_dist, state["mean_dist"])
    torch.testing.assert_close(bank.dist_obs, state["dist_obs"])
    torch.testing.assert_close(bank.phi().double(), ref.phi(state), equal_nan=True)


def test_bank_ignores_nonlocal_and_first_single_sample_has_no_phi():
    bank = ClusterBank(4, 3)
    feats = F.normalize(torch.randn(3, 3), dim=1)
    bank.update(feats, torch.tensor([-1, 2, -1]))
    assert bank.counts.tolist() == [0, 0, 1, 0]
    torch.testing.assert_close(bank.centers[2], feats[1])
    assert torch.isnan(bank.phi()).all()  # one sample: no distance yet
    assert bank.valid().tolist() == [False, False, True, False]


def test_phi_uses_dataset_counts():
    bank = ClusterBank(2, 3, class_counts=torch.tensor([50, 0]))
    bank.mean_dist.fill_(0.5)
    bank.dist_obs.fill_(2)
    bank.counts.fill_(4)
    torch.testing.assert_close(bank.phi(), torch.tensor([0.5 / math.log(60), 0.5 / math.log(14)]))


def test_stats_exact_at_extremes_and_close_at_percentiles():
    torch.manual_seed(1)
    phi = torch.rand(5000) ** 2
    phi[::7] = float("nan")
    ctx = ParallelContext()
    known = phi[~torch.isnan(phi)]
    s = concentration_stats(phi, ctx, (0.0, 100.0))
    assert s.lo == pytest.approx(float(known.min())) and s.hi == pytest.approx(float(known.max()))
    assert s.num_known == known.numel()
    assert s.mean == pytest.approx(float(known.mean()), rel=1e-6)
    s = concentration_stats(phi, ctx, (10.0, 90.0), bins=4096)
    width = (float(known.max()) - float(known.min())) / 4096
    assert abs(s.lo - float(torch.quantile(known, 0.1))) <= width
    assert abs(s.hi - float(torch.quantile(known, 0.9))) <= width
    assert s.mean_clipped == pytest.approx(float(known.clamp(s.lo, s.hi).mean()), rel=1e-6)


def test_stats_none_when_nothing_known():
    assert concentration_stats(torch.full((4,), float("nan")), ParallelContext()) is None


def test_normalized_concentration():
    phi = torch.tensor([0.0, 1.0, 2.0, 3.0, float("nan")])
    s = concentration_stats(phi, ParallelContext(), (0.0, 100.0))
    lam = normalized_concentration(phi, s)
    torch.testing.assert_close(lam[:4], torch.tensor([0.0, 1 / 3, 2 / 3, 1.0]))
    assert torch.isnan(lam[4])
    assert float(normalized_concentration(phi, s, unknown="max")[4]) == 1.0
