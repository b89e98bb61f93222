"""RecordIO format: round trips, layouts, bad input, DALI / MXNet compatibility."""

from __future__ import annotations

import importlib.util
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from dali_pipelines import FaceRecordDataset, RecordIOError, RecordReader, RecordWriter
from dali_pipelines.recordio import (
    MAGIC,
    frame_record,
    pack_image_record,
    read_index,
    unpack_image_record,
)

from .conftest import make_jpeg

M = struct.pack("<I", MAGIC)


def _write(path: Path, payloads: list[bytes], index: bool = True) -> Path:
    with RecordWriter(path, path.with_suffix(".idx") if index else None) as w:
        for k, p in enumerate(payloads):
            w.write(k, p)
    return path


PAYLOADS = [
    b"",  # empty
    b"abc",  # needs padding
    b"abcd" * 5,  # aligned, no padding
    b"abcd" + M + b"efgh",  # magic at an aligned position -> 2 parts
    b"ab" + M + b"cdef",  # unaligned magic -> stays single-part
    M,  # payload that is only the magic -> two empty parts
    M + M + b"xyz",  # consecutive magics -> three parts, last padded
    bytes(range(256)) * 40,  # larger
]


def test_round_trip_every_payload_kind(tmp_path: Path) -> None:
    rec = _write(tmp_path / "a.rec", PAYLOADS)
    with RecordReader(rec) as r:
        assert [r.read(k) for k in range(len(PAYLOADS))] == PAYLOADS
        assert r.idx_path is not None
    # Without an index the file is scanned and yields the same records.
    with RecordReader(rec, idx_path=False) as r:
        assert [p for _, p in r] == PAYLOADS
    assert os.path.getsize(rec) % 4 == 0


def test_multipart_framing_flags() -> None:
    framed = frame_record(b"abcd" + M + b"ef")
    first = struct.unpack_from("<I", framed, 4)[0]
    assert first >> 29 == 1 and first & ((1 << 29) - 1) == 4
    second = struct.unpack_from("<I", framed, 16)[0]
    assert second >> 29 == 3 and second & ((1 << 29) - 1) == 2
    middle = frame_record(M + M)
    flags = [struct.unpack_from("<I", middle, o)[0] >> 29 for o in (4, 12, 20)]
    assert flags == [1, 2, 3]


def test_image_record_header_scalar_and_vector() -> None:
    rec = unpack_image_record(pack_image_record(7.0, b"JPEG", id=3, id2=9))
    assert rec.header.flag == 0 and rec.header.label == 7.0 and rec.label is None
    assert (rec.header.id, rec.header.id2, rec.payload) == (3, 9, b"JPEG")
    vec = unpack_image_record(pack_image_record([5.0, 1.5, 2.0], b"img"))
    assert vec.header.flag == 3 and vec.payload == b"img"
    np.testing.assert_array_equal(vec.label, np.array([5.0, 1.5, 2.0], np.float32))
    assert vec.scalar_label == 5.0
    hdr = unpack_image_record(pack_image_record([10.0, 20.0], b""))
    assert hdr.payload == b"" and hdr.label is not None and hdr.label.tolist() == [10.0, 20.0]
    with pytest.raises(RecordIOError):
        unpack_image_record(b"short")


def test_insightface_layout_parsed(tiny_rec: Path) -> None:
    ds = FaceRecordDataset(tiny_rec)
    assert ds.layout == "insightface"
    assert len(ds) == 32 and ds.num_classes == 8
    assert ds.class_counts.dtype == np.int64 and ds.class_counts.tolist() == [4] * 8
    assert ds.identity_ranges is not None
    assert ds.identity_ranges[0].tolist() == [1, 5] and ds.identity_ranges[7].tolist() == [29, 33]
    assert ds.labels.tolist() == [c for c in range(8) for _ in range(4)]
    assert bytes(ds.encoded_image(5)) == make_jpeg(101)
    keys, _ = read_index(tiny_rec.with_suffix(".idx"))
    assert keys.tolist() == list(range(41))  # header + 32 images + 8 identity records


def test_plain_layout_unshuffled_and_shuffled(tmp_path: Path) -> None:
    labels = [2, 0, 1, 1, 2, 2, 0]
    rec = tmp_path / "plain.rec"
    with RecordWriter(rec, rec.with_suffix(".idx")) as w:
        for k, lab in enumerate(labels):
            w.write_image(k, float(lab), make_jpeg(k))
    ds = FaceRecordDataset(rec)
    assert ds.layout == "plain" and ds.num_classes == 3
    assert ds.labels.tolist() == labels and ds.class_counts.tolist() == [2, 2, 3]
    # im2rec-style label vectors (flag > 0): the class is label[0].
    rec2 = tmp_path / "vec.rec"
    with RecordWriter(rec2, rec2.with_suffix(".idx")) as w:
        for k in range(4):
            w.write_image(k, [float(k % 2), 0.5], make_jpeg(k))
    ds2 = FaceRecordDataset(rec2)
    assert ds2.labels.tolist() == [0, 1, 0, 1] and ds2.class_counts.tolist() == [2, 2]
    assert bytes(ds2.encoded_image(3)) == make_jpeg(3)


def test_multipart_image_record_in_dataset(tmp_path: Path) -> None:
    payload = b"\xff\xd8" + b"xx" + M * 3 + b"tail"
    rec = tmp_path / "mp.rec"
    with RecordWriter(rec, rec.with_suffix(".idx")) as w:
        w.write_image(0, 1.0, make_jpeg(0))
        w.write_image(1, 0.0, payload[2:] + b"\x00\x00")  # 24-byte header keeps magic aligned
    ds = FaceRecordDataset(rec)
    assert bytes(ds.encoded_image(1)) == payload[2:] + b"\x00\x00"
    assert ds.labels.tolist() == [1, 0]


# ----------------------------------------------------------------------------- bad input


def test_bad_magic_names_file_and_offset(tiny_rec: Path) -> None:
    with RecordReader(tiny_rec) as r:
        off = r.offset_of(3)
    data = bytearray(tiny_rec.read_bytes())
    data[off : off + 4] = b"\x00\x01\x02\x03"
    tiny_rec.write_bytes(bytes(data))
    with pytest.raises(RecordIOError, match=rf"tiny.rec.*bad magic.*offset {off}"):
        FaceRecordDataset(tiny_rec)


def test_truncated_file(tiny_rec: Path) -> None:
    with RecordReader(tiny_rec) as r:
        off = r.offset_of(40)  # last identity record
        off_img = r.offset_of(32)
    data = tiny_rec.read_bytes()
    tiny_rec.write_bytes(data[: off_img + 100])  # cut inside the last image record
    with pytest.raises(RecordIOError, match=r"beyond the end"):
        FaceRecordDataset(tiny_rec)  # the index now points past EOF
    with pytest.raises(RecordIOError, match=rf"truncated record at offset {off_img}"):
        RecordReader(tiny_rec, idx_path=False)
    assert off > off_img


def test_index_offset_beyond_eof(tiny_rec: Path) -> None:
    idx = tiny_rec.with_suffix(".idx")
    lines = idx.read_text().splitlines()
    lines[5] = "5\t99999999"
    idx.write_text("\n".join(lines) + "\n")
    with pytest.raises(RecordIOError, match=r"key 5 has offset 99999999 beyond the end of .*tiny.rec"):
        RecordReader(tiny_rec)


def test_index_pointing_inside_record(tiny_rec: Path) -> None:
    idx = tiny_rec.with_suffix(".idx")
    keys, offs = read_index(idx)
    offs[3] += 4
    idx.write_text("".join(f"{k}\t{o}\n" for k, o in zip(keys, offs)))
    with pytest.raises(RecordIOError, match=rf"offset {offs[3]}"):
        FaceRecordDataset(tiny_rec)


def test_label_out_of_range(tmp_path: Path) -> None:
    rec = tmp_path / "l.rec"
    with RecordWriter(rec, rec.with_suffix(".idx")) as w:
        w.write_image(0, 0.0, make_jpeg(0))
        off = w.write_image(1, 5.0, make_jpeg(1))
    with pytest.raises(RecordIOError, match=rf"l.rec: image record key 1 at offset {off} has label 5.0 outside \[0, 3\)"):
        FaceRecordDataset(rec, num_classes=3)
    rec2 = tmp_path / "neg.rec"
    with RecordWriter(rec2, rec2.with_suffix(".idx")) as w:
        w.write_image(0, -1.0, make_jpeg(0))
    with pytest.raises(RecordIOError, match="label -1.0"):
        FaceRecordDataset(rec2)


def test_insightface_label_beyond_identity_count(tmp_path: Path) -> None:
    from dali_pipelines.recordio import RecordWriter as W

    rec = tmp_path / "bad.rec"
    with W(rec, rec.with_suffix(".idx")) as w:
        w.write(0, pack_image_record([3.0, 4.0], b""))  # images 1..2, one identity (key 3)
        w.write_image(1, 0.0, make_jpeg(1))
        w.write_image(2, 4.0, make_jpeg(2))  # class 4 of a 1-class file
        w.write(3, pack_image_record([1.0, 3.0], b""))
    with pytest.raises(RecordIOError, match=r"key 2 .* outside \[0, 1\)"):
        FaceRecordDataset(rec)


# ----------------------------------------------------------------------------- compatibility


def test_dali_reader_reads_our_files(tmp_path: Path) -> None:
    """DALI's fn.readers.mxnet parses our writer's output: same labels and bytes."""
    from dali_pipelines.dali import mxnet_reader_pipeline

    rec = tmp_path / "compat.rec"
    tricky = b"\xff\xd8" + b"\x00" * 6 + M + b"rest of image" + M  # multi-part after the header
    payloads = {1: make_jpeg(1), 2: tricky, 3: make_jpeg(3), 4: make_jpeg(4)}
    with RecordWriter(rec, rec.with_suffix(".idx")) as w:
        w.write(0, pack_image_record([5.0, 7.0], b""))
        w.write_image(1, 0.0, payloads[1])
        w.write_image(2, [1.0, 0.25], payloads[2])  # label vector, multi-part
        w.write_image(3, 1.0, payloads[3])
        w.write_image(4, 0.0, payloads[4])
        w.write(5, pack_image_record([1.0, 3.0], b""))
        w.write(6, pack_image_record([3.0, 5.0], b""))
    ds = FaceRecordDataset(rec)
    assert ds.layout == "insightface" and ds.labels.tolist() == [0, 1, 1, 0]
    idx = ds.image_index_path(tmp_path / "cache")
    pipe = mxnet_reader_pipeline(rec, idx, batch_size=4, decode=False)
    data, labels = pipe.run()
    got = [np.array(data.at(i)).tobytes() for i in range(4)]
    assert got == [payloads[k] for k in (1, 2, 3, 4)]
    lab = [np.array(labels.at(i)).tolist() for i in range(4)]
    assert lab == [[0.0], [1.0, 0.25], [1.0], [0.0]]
    assert [bytes(ds.encoded_image(i)) for i in range(4)] == got


def test_dali_reader_decodes_synthetic_rec(tiny_rec: Path) -> None:
    from dali_pipelines.dali import mxnet_reader_pipeline

    ds = FaceRecordDataset(tiny_rec)
    pipe = mxnet_reader_pipeline(tiny_rec, ds.image_index_path(), batch_size=32, flip=False)
    images, labels = pipe.run()
    assert np.array(images.at(0)).shape == (3, 112, 112)
    assert [int(np.array(labels.at(i))[0]) for i in range(32)] == ds.labels.tolist()


@pytest.mark.skipif(importlib.util.find_spec("mxnet") is None, reason="mxnet is not installed (retired; needs numpy<1.24)")
def test_mxnet_cross_check(tiny_rec: Path) -> None:  # pragma: no cover - needs mxnet
    import mxnet as mx  # type: ignore[import-not-found]

    r = mx.recordio.MXIndexedRecordIO(str(tiny_rec.with_suffix(".idx")), str(tiny_rec), "r")
    header, img = mx.recordio.unpack(r.read_idx(3))
    ds = FaceRecordDataset(tiny_rec)
    assert img == bytes(ds.encoded_image(2)) and header.label == ds.labels[2]
