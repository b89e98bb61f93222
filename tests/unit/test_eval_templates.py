"""IJB-style template verification: parsing, aggregation by hand, TAR at FAR, the synthetic protocol."""

import numpy as np
import pytest

from train.evaluate.templates import (
    aggregate_templates,
    evaluate_templates,
    make_synthetic_template_protocol,
    read_template_list,
    read_template_pairs,
)


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_aggregation_by_hand():
    # Template 0: two images along x (one of norm 3) and one along y; template 1: one image.
    f = np.array([[3.0, 0.0], [1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    t = np.array([0, 0, 0, 1])
    got = aggregate_templates(f, t, 2)
    # Normalised images: (1,0), (1,0), (0,1) -> mean (2/3, 1/3) -> normalised (2, 1)/sqrt(5).
    assert got[0] == pytest.approx(np.array([2.0, 1.0]) / np.sqrt(5))
    assert got[1] == pytest.approx(np.array([1.0, 1.0]) / np.sqrt(2))
    # Media pooling: the two x images are one medium -> media (1,0) and (0,1) -> (1, 1)/sqrt(2).
    pooled = aggregate_templates(f, t, 2, media_index=np.array([5, 5, 6, 7]))
    assert pooled[0] == pytest.approx(np.array([1.0, 1.0]) / np.sqrt(2))


def test_aggregation_errors():
    with pytest.raises(ValueError, match="two templates"):
        aggregate_templates(np.eye(2), np.array([0, 1]), 2, media_index=np.array([0, 0]))
    with pytest.raises(ValueError, match="no entries"):
        aggregate_templates(np.eye(2), np.array([0, 0]), 2)
    with pytest.raises(ValueError, match="degenerate"):
        aggregate_templates(np.zeros((1, 2)), np.array([0]), 1)


def test_parsing_and_tar_at_far(tmp_path):
    # 4 templates of subjects 7, 7, 8, 9; features chosen so scores are known exactly.
    tl = _write(tmp_path, "t.txt", "# comment\nA 0 7 m1\nA 1 7 m1\nB 2 7\n\nC 3 8 x\nD 4 9 x\n")
    tp = _write(tmp_path, "p.txt", "A B 1\nA C 0\nA D 0\nB C 0\nB D 0\nC D 0\n")
    templates = read_template_list(tl)
    pairs = read_template_pairs(tp, templates)
    assert templates.template_ids == ["A", "B", "C", "D"] and list(templates.subject) == [7, 7, 8, 9]
    assert list(templates.template_index) == [0, 0, 1, 2, 3]
    # Media: A's m1 is one medium; B (no media column) and C/D's 'x' are separate media per template.
    assert len(np.unique(templates.media_index)) == 4
    assert list(pairs.issame) == [True, False, False, False, False, False]
    feats = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    r = evaluate_templates(feats, templates, pairs, fars=(1e-1, 0.2, 1.0))
    # Genuine score 0.8; impostors: A-C 0, A-D 0, B-C 0.6, B-D 0, C-D 0 (5 negatives).
    assert r.pair_scores == pytest.approx([0.8, 0.0, 0.0, 0.6, 0.0, 0.0])
    assert r.omitted_fars == [1e-1]  # 5 impostor pairs cannot measure 1e-1
    assert r.tar == {0.2: 1.0, 1.0: 1.0}
    assert r.scores.gap == pytest.approx(0.8 - 0.12)
    pooled = evaluate_templates(feats, templates, pairs, media_pooling=True, fars=(0.2,))
    assert pooled.media_pooling and pooled.tar == {0.2: 1.0}


def test_tar_when_impostors_outscore_a_genuine_pair(tmp_path):
    tl = _write(tmp_path, "t.txt", "A 0 1\nB 1 1\nC 2 2\nD 3 2\n")
    tp = _write(tmp_path, "p.txt", "A B 1\nC D 1\nA C 0\nA D 0\nB C 0\nB D 0\n")
    templates = read_template_list(tl)
    pairs = read_template_pairs(tp, templates)
    e = np.eye(4)
    a = e[0]
    b = 0.6 * e[0] + 0.8 * e[1]
    c = 0.8 * e[0] + 0.6 * e[2]
    d = 0.9 * c + np.sqrt(0.19) * e[3]
    r = evaluate_templates(np.stack([a, b, c, d]), templates, pairs, fars=(0.25, 0.5))
    # Genuine: AB 0.6, CD 0.9; impostors: AC 0.8, AD 0.72, BC 0.48, BD 0.432.
    assert r.pair_scores == pytest.approx([0.6, 0.9, 0.8, 0.72, 0.48, 0.432])
    # FAR <= 1/4 allows one impostor (AC): the threshold stops above AD (0.72), so only CD passes.
    # FAR <= 2/4 allows AC and AD: the threshold goes down to just above BC (0.48), AB passes too.
    assert r.tar == {0.25: 0.5, 0.5: 1.0}
    assert r.scores.gap == pytest.approx(0.75 - (0.8 + 0.72 + 0.48 + 0.432) / 4)


@pytest.mark.parametrize("text, match", [
    ("A 0\n", "expected 'TEMPLATE IMAGE LABEL"),
    ("A 0 x\n", "not an integer"),
    ("A 0 1\nA 1 2\n", "one subject"),
    ("# nothing\n", "no template entries"),
])
def test_template_list_errors(tmp_path, text, match):
    with pytest.raises(ValueError, match=match):
        read_template_list(_write(tmp_path, "t.txt", text))


@pytest.mark.parametrize("text, match", [
    ("A Z 0\n", "'Z' is not in the template list"),
    ("A B 2\n", "must be 0 or 1"),
    ("A B 0\n", "subjects are 1 and 1"),
    ("A B\n", "expected 'TEMPLATE1 TEMPLATE2 LABEL'"),
])
def test_template_pair_errors(tmp_path, text, match):
    templates = read_template_list(_write(tmp_path, "t.txt", "A 0 1\nB 1 1\nC 2 2\n"))
    with pytest.raises(ValueError, match=match):
        read_template_pairs(_write(tmp_path, "p.txt", text), templates)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="template list"):
        read_template_list(tmp_path / "nope.txt")


def test_synthetic_protocol(tmp_path):
    labels = np.repeat(np.arange(6), 10)
    t_path, p_path = make_synthetic_template_protocol(labels, tmp_path, templates_per_identity=3, seed=1)
    templates = read_template_list(t_path)
    pairs = read_template_pairs(p_path, templates)  # also checks every label against the subjects
    assert templates.num_templates == 18
    # Every image is used exactly once, by a template of its own identity.
    assert sorted(int(i) for i in templates.images) == list(range(60))
    subj = templates.subject[templates.template_index]
    assert (labels[[int(i) for i in templates.images]] == subj).all()
    # All 6 * C(3, 2) = 18 genuine pairs and all C(18, 2) - 18 = 135 impostor pairs.
    assert pairs.issame.sum() == 18 and (~pairs.issame).sum() == 135
    assert templates.media_index is not None
    capped = make_synthetic_template_protocol(labels, tmp_path / "c", templates_per_identity=3, max_impostor_pairs=40)
    p2 = read_template_pairs(capped[1], read_template_list(capped[0]))
    assert (~p2.issame).sum() == 40 and p2.issame.sum() == 18
    with pytest.raises(ValueError, match=">= 2"):
        make_synthetic_template_protocol(labels, tmp_path, templates_per_identity=1)
