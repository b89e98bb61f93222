"""PartialFCHead.defer_input_checks: input problems become device flags (no host read), bad
labels index nothing, non-finite embeddings stay out of the bank, and the deferred error is the
one forward would have raised."""

from __future__ import annotations

import pytest
import torch

from partial_fc import PartialFCHead


def _head():
    head = PartialFCHead(num_classes=10, embedding_size=8, method="s6", sample_rate=0.5)
    head.defer_input_checks = True
    return head


def test_bad_label_is_flagged_not_raised():
    head = _head()
    emb = torch.randn(4, 8)
    out = head(emb, torch.tensor([1, 2, 37, 4]))  # 37 is outside [0, 10): no IndexError
    assert torch.isfinite(out["loss"])
    assert head.input_flags.tolist() == [True, False]
    err = head.input_error()
    assert isinstance(err, ValueError) and "label 37" in str(err)
    plain = PartialFCHead(num_classes=10, embedding_size=8, method="s6", sample_rate=0.5)
    with pytest.raises(ValueError, match="label 37"):
        plain(emb, torch.tensor([1, 2, 37, 4]))


def test_nonfinite_embeddings_stay_out_of_the_bank():
    head = _head()
    head(torch.randn(4, 8), torch.tensor([1, 2, 3, 4]))
    centers = head.bank.centers.clone()
    emb = torch.randn(4, 8)
    emb[1, 0] = float("nan")  # class 2's sample
    out = head(emb, torch.tensor([1, 2, 3, 4]))
    assert head.input_flags.tolist() == [False, True]
    assert not torch.isfinite(out["loss"])  # the trainer skips the step
    assert torch.isfinite(head.bank.centers).all()
    assert torch.equal(head.bank.centers[2], centers[2])  # untouched
    assert not torch.equal(head.bank.centers[1], centers[1])  # finite rows still update
    assert isinstance(head.input_error(), FloatingPointError)
