"""Face alignment (dali_pipelines.align) against scikit-image and against known transforms."""

import io

import numpy as np
import pytest
from PIL import Image

from dali_pipelines.align import ARCFACE_TEMPLATE_112, align_face, estimate_similarity, transform_points
from tests.unit.eval_fixtures import aligned_face, loose_crop, placed, similarity

skimage_transform = pytest.importorskip("skimage.transform")


def test_template_is_the_public_arcface_reference():
    # insightface's arcface_dst for 112x112 (public constants).
    assert ARCFACE_TEMPLATE_112.shape == (5, 2)
    assert ARCFACE_TEMPLATE_112[0].tolist() == [38.2946, 51.6963]
    assert ARCFACE_TEMPLATE_112[4].tolist() == [70.7299, 92.2041]


@pytest.mark.parametrize("scale,angle,tx,ty", [(1.0, 0.0, 0.0, 0.0), (1.7, 23.0, 40.0, -12.0),
                                                (0.6, -140.0, 3.5, 80.0), (2.5, 90.0, -20.0, 5.0)])
def test_estimate_recovers_a_known_transform(scale, angle, tx, ty):
    m = similarity(scale, angle, tx, ty)
    src = ARCFACE_TEMPLATE_112
    dst = transform_points(m, src)
    got = estimate_similarity(src, dst)
    np.testing.assert_allclose(got, m, atol=1e-9)
    # and the inverse direction
    back = estimate_similarity(dst, src)
    np.testing.assert_allclose(np.vstack([back, [0, 0, 1]]) @ np.vstack([m, [0, 0, 1]]), np.eye(3), atol=1e-9)


def test_estimate_equals_scikit_image_on_noisy_points():
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = similarity(rng.uniform(0.3, 3), rng.uniform(-180, 180), *rng.uniform(-50, 50, 2))
        src = rng.uniform(0, 300, (5, 2))
        dst = transform_points(m, src) + rng.normal(0, 4.0, (5, 2))  # not exactly a similarity
        ref = skimage_transform.SimilarityTransform.from_estimate(src, dst)
        np.testing.assert_allclose(estimate_similarity(src, dst), ref.params[:2], atol=1e-8)


def test_estimate_rejects_degenerate_points():
    with pytest.raises(ValueError, match="coincide"):
        estimate_similarity(np.ones((5, 2)), ARCFACE_TEMPLATE_112)
    with pytest.raises(ValueError, match="shape"):
        estimate_similarity(np.zeros((4, 2)), ARCFACE_TEMPLATE_112)
    with pytest.raises(ValueError, match="non-finite"):
        estimate_similarity(np.full((5, 2), np.nan), ARCFACE_TEMPLATE_112)


def test_warp_equals_scikit_image_warp():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (150, 130, 3), dtype=np.uint8)
    lm = transform_points(similarity(1.3, 17.0, 20.0, 15.0), ARCFACE_TEMPLATE_112)
    got = align_face(img, lm)
    m = estimate_similarity(lm, ARCFACE_TEMPLATE_112)
    tf = skimage_transform.AffineTransform(matrix=np.linalg.inv(np.vstack([m, [0, 0, 1]])))
    ref = skimage_transform.warp(img.astype(np.float64), tf, output_shape=(112, 112), order=1, mode="constant",
                                 cval=0.0, preserve_range=True)
    diff = np.abs(got.astype(np.float64) - ref)
    # OpenCV interpolates with 1/32-pixel fixed-point weights: about a grey level on pixel noise.
    assert diff.mean() < 1.0 and diff.max() <= 6.0, (diff.mean(), diff.max())
    # A half-pixel convention slip would be far outside that.
    shifted = skimage_transform.warp(img.astype(np.float64), skimage_transform.AffineTransform(
        matrix=tf.params @ np.array([[1, 0, 0.5], [0, 1, 0.5], [0, 0, 1]])), output_shape=(112, 112), order=1,
        mode="constant", cval=0.0, preserve_range=True)
    assert np.abs(got - shifted).mean() > 10 * diff.mean()


@pytest.mark.parametrize("gid,scale,angle", [(3, 1.6, 20.0), (8, 1.25, -35.0), (11, 2.0, 180.0), (5, 0.9, 8.0)])
def test_alignment_recovers_the_aligned_face_from_a_jpeg_loose_crop(gid, scale, angle):
    face = aligned_face(gid)
    img, lm = loose_crop(face, *placed(scale, angle))
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    jpeg = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    jpeg_noise = np.abs(jpeg.astype(float) - img).mean()
    got = align_face(jpeg, lm).astype(np.float64)
    err = np.abs(got - face)[4:-4, 4:-4].mean()  # the outermost pixels mix in the canvas background
    # Within JPEG noise (plus the blur of two bilinear resamplings).
    assert err < min(2.0 * jpeg_noise + 0.5, 3.0), (err, jpeg_noise)
    # A wrong landmark order (eyes swapped) does not recover it: the test can fail.
    bad = align_face(jpeg, lm[[1, 0, 2, 4, 3]]).astype(np.float64)
    assert np.abs(bad - face)[4:-4, 4:-4].mean() > 3 * err


def test_align_face_checks_its_inputs():
    with pytest.raises(ValueError, match="uint8"):
        align_face(np.zeros((50, 50, 3), np.float32), ARCFACE_TEMPLATE_112)
    with pytest.raises(ValueError, match="template"):
        align_face(np.zeros((50, 50, 3), np.uint8), ARCFACE_TEMPLATE_112[:4])
    out = align_face(np.zeros((50, 50, 3), np.uint8), ARCFACE_TEMPLATE_112 * 0.4, size=56)
    assert out.shape == (56, 56, 3) and out.dtype == np.uint8
