"""The ``[data]`` section and its nested ``[data.synth]`` table (the generated demo dataset)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .checking import _Section

DATA_KINDS = ("dali", "torch", "synthetic")
DALI_DECODE = ("auto", "cpu", "mixed")


@dataclass(frozen=True)
class SynthDataConfig(_Section):
    """The ``[data.synth]`` section: the demo dataset the project generates.

    The generator (``pfc synth``, :mod:`dali_pipelines.synth_faces`) writes ``<out_dir>/train.rec``
    and ``train.idx`` (MXNet RecordIO, one identity label per record; ``SynthDataConfig.train_rec``)
    and ``<out_dir>/verification.bin`` (``SynthDataConfig.verification_bin``), LFW-style pairs from
    held-out identities.

    Attributes:
        identities: Training identities (>= 2).
        images_per_identity: Images per identity (>= 2).
        seed: Generator seed; the same seed gives the same files.
        out_dir: Output directory.
        image_size: Side of the square images.
        verification_pairs: Pairs in the `.bin` (even: half genuine, half impostor).
        family_size: Identities per look-alike family block (1 = no families). Family members share
            most of their generative parameters, so they are hard to tell apart.
        family_fraction: Probability that a block of `family_size` identities is a family.
        family_share: Fraction of the generative parameters family members share, in [0, 1].
        size_distribution: `"fixed"` (`images_per_identity` images each) or `"powerlaw"`
            (long-tailed class sizes in [`images_min`, `images_max`]).
        images_min: Smallest power-law class size.
        images_max: Largest power-law class size.
        size_exponent: Exponent `a` of p(n) ~ n^-a for the power-law sizes (1 = log-uniform).
        probe_images_per_identity: Unseen images per training identity in `probe.rec`
            (closed-set identification of the trained classes; 0 = none).

    The defaults make the same bytes as before these options existed. `data.kind = "synthetic"`
    (random tensors, no files) uses only `identities` and `images_per_identity`.
    """

    _SECTION = "data.synth"

    identities: int = 100
    images_per_identity: int = 20
    seed: int = 0
    out_dir: str = "data/synth"
    image_size: int = 112
    verification_pairs: int = 400
    family_size: int = 1
    family_fraction: float = 0.5
    family_share: float = 0.8
    size_distribution: str = "fixed"
    images_min: int = 2
    images_max: int = 200
    size_exponent: float = 1.0
    probe_images_per_identity: int = 0

    def _validate(self) -> None:
        self._min("identities", 2)
        self._min("images_per_identity", 2)
        self._min("seed", 0)
        if not self.out_dir:
            self._fail("out_dir", "must not be empty")
        self._min("image_size", 16)
        self._min("verification_pairs", 2)
        if self.verification_pairs % 2:
            self._fail("verification_pairs", f"must be even (half genuine, half impostor), got "
                                              f"{self.verification_pairs}")
        self._min("family_size", 1)
        for key in ("family_fraction", "family_share"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                self._fail(key, f"must be in [0, 1], got {getattr(self, key)}")
        self._enum("size_distribution", ("fixed", "powerlaw"))
        self._min("images_min", 1)
        if self.images_max < self.images_min:
            self._fail("images_max", f"must be >= images_min ({self.images_min}), got {self.images_max}")
        self._min("size_exponent", 0)
        self._min("probe_images_per_identity", 0)

    @property
    def train_rec(self) -> str:
        """Path of the generated training ``.rec``."""
        return str(Path(self.out_dir) / "train.rec")

    @property
    def verification_bin(self) -> str:
        """Path of the generated verification ``.bin``."""
        return str(Path(self.out_dir) / "verification.bin")

    @property
    def num_samples(self) -> int:
        """Number of training images."""
        return self.identities * self.images_per_identity


@dataclass(frozen=True)
class DataConfig(_Section):
    """The ``[data]`` section: the training set and its loader.

    Attributes:
        kind: One of `"dali"`, `"torch"`, `"synthetic"`. DALI over RecordIO, a torch DataLoader over
            RecordIO, or random tensors made on the fly (no files; `synth.identities` classes and
            `synth.identities * synth.images_per_identity` images per epoch).
        train_rec: The training `.rec` (the `.idx` sits next to it, `DataConfig.train_idx`) or a
            shard manifest `.json` written by `pfc pack --shards` (docs/data.md). Required for
            `dali`/`torch`; an error with `synthetic`, which would ignore it.
        batch_size: Images per rank per micro-step.
        num_workers: DataLoader workers (`torch`).
        dali_threads: DALI CPU threads per rank (`dali`).
        dali_decode: One of `"auto"`, `"cpu"`, `"mixed"`. JPEG decoding: `mixed` is GPU-assisted;
            `auto` picks mixed on CUDA, else cpu.
        prefetch: Batches prepared ahead per rank.
        drop_last: Drop the incomplete last global batch of an epoch.
        flip: Random horizontal flip.
        shuffle: Reshuffle every epoch.
        strict_decode: Fail on a record that does not decode; `false` skips and counts it.
        image_size: Side of the square training images (>= 16); records of another size are
            center-cropped or padded. The backbone gets it as `input_size` when it is not 112
            (`iresnet_nano` at 56 is 4x cheaper: the cluster-guidance study uses it).
    """

    _SECTION = "data"

    kind: str = "synthetic"
    train_rec: str = ""
    batch_size: int = 128
    num_workers: int = 4
    dali_threads: int = 4
    dali_decode: str = "auto"
    prefetch: int = 2
    drop_last: bool = True
    flip: bool = True
    shuffle: bool = True
    strict_decode: bool = True
    image_size: int = 112
    synth: SynthDataConfig = field(default_factory=SynthDataConfig)

    def _validate(self) -> None:
        self._enum("kind", DATA_KINDS)
        self._min("image_size", 16)
        if self.kind == "synthetic" and self.train_rec:
            self._fail("train_rec", f"= {self.train_rec!r} is ignored by data.kind = \"synthetic\"; set "
                                    "data.kind = \"dali\" or \"torch\" to read it, or remove train_rec")
        if self.kind != "synthetic":
            if not self.train_rec:
                self._fail("train_rec", f"is required with data.kind = {self.kind!r} (the path of a "
                                        "RecordIO .rec file), or set data.kind = \"synthetic\"")
            if not self.train_rec.endswith((".rec", ".json")):
                self._fail("train_rec", "must name a .rec file (its .idx next to it) or a shard manifest "
                                        f".json written by `pfc pack --shards`, got {self.train_rec!r}")
        self._min("batch_size", 1)
        self._min("num_workers", 0)
        self._min("dali_threads", 1)
        self._enum("dali_decode", DALI_DECODE)
        self._min("prefetch", 1)

    @property
    def train_idx(self) -> str:
        """Path of the ``.idx`` index next to ``train_rec``."""
        return str(Path(self.train_rec).with_suffix(".idx")) if self.train_rec else ""

