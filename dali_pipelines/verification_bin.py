"""Safe reading and writing of LFW-style verification ``.bin`` files.

A ``.bin`` is a pickle of ``(images, issame)``: ``images`` is a list of encoded
JPEG bytes in pair order (images ``2i`` and ``2i+1`` form pair ``i``) and
``issame`` a list (or numpy array) of booleans, one per pair.

Unpickling untrusted data can run arbitrary code, because a pickle may name
any importable callable (``os.system``...) and call it. ``SafeUnpickler``
resolves names only from a fixed allow-list:

* nothing from builtins is needed: lists, tuples, bytes, str, ints, floats,
  bools and None are pickle opcodes that involve no name lookup;
* for numpy boolean arrays/scalars found in real files, exactly
  ``numpy.core.multiarray._reconstruct`` (and its numpy-2 spelling
  ``numpy._core.multiarray._reconstruct``), ``numpy.ndarray``, ``numpy.dtype``
  and ``numpy.core.multiarray.scalar``;
* ``_codecs.encode``, replaced by a function that only turns a str into bytes
  with latin-1 (how Python 3 writes ``bytes`` in protocol-2 pickles).

The numpy entries only allocate an array / dtype / scalar from the bytes given;
an object-dtype array's elements are further pickled objects and go through the
same allow-list, so they cannot smuggle in a callable. ``persistent_load`` is
refused. After loading, the result must have the exact expected structure (a
list of bytes, booleans, two images per pair), else it is rejected.

Anything else raises ``UnsafePickleError`` naming the file and the refused
global, before anything is called.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


class UnsafePickleError(pickle.UnpicklingError):
    """A ``.bin`` file references a global outside the allow-list or has the wrong shape."""


def _np_reconstruct() -> Any:
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    return _reconstruct


def _np_scalar() -> Any:
    try:
        from numpy._core.multiarray import scalar  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core.multiarray import scalar  # type: ignore[no-redef]
    return scalar


def _latin1_encode(text: Any, encoding: str = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode`` as used by protocol-2 pickles of ``bytes``.

    Python 3 pickles ``bytes`` at protocol <= 2 as ``_codecs.encode(str, 'latin1')``.
    Only that exact use is accepted: a str and the latin-1 codec, nothing else.
    """
    if not isinstance(text, str) or encoding.lower().replace("-", "").replace("_", "") != "latin1":
        raise UnsafePickleError(f"_codecs.encode is allowed only for latin-1 text, got {encoding!r}")
    return text.encode("latin-1")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("_codecs", "encode"): lambda: _latin1_encode,
    ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
    ("numpy.core.multiarray", "scalar"): _np_scalar,
    ("numpy._core.multiarray", "scalar"): _np_scalar,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickler whose ``find_class`` resolves only the numpy allow-list above.

    Args:
        file: Binary file object.
        source: Name used in error messages.
    """

    def __init__(self, file: io.BufferedIOBase | io.BytesIO, source: str) -> None:
        # encoding='bytes' turns Python-2 str objects (old .bin files) into bytes.
        super().__init__(file, encoding="bytes")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        factory = _ALLOWED.get((module, name))
        if factory is None:
            raise UnsafePickleError(
                f"{self.source}: refusing to load global {module}.{name}; a verification .bin "
                "may contain only lists of bytes and booleans (numpy bool arrays allowed). "
                "Regenerate the file with write_verification_bin()."
            )
        return factory()

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.source}: persistent ids are not allowed in a .bin file")


def load_verification_bin(path: str | os.PathLike[str]) -> tuple[list[bytes], np.ndarray]:
    """Loads a verification ``.bin`` without executing code from it.

    Args:
        path: The ``.bin`` file.

    Returns:
        ``(images, issame)``: ``2P`` encoded images in pair order and
        ``issame [P] bool``.

    Raises:
        UnsafePickleError: Disallowed content or wrong structure.
    """
    src = str(path)
    with open(path, "rb") as f:
        try:
            obj = SafeUnpickler(f, src).load()
        except UnsafePickleError:
            raise
        except Exception as e:
            raise UnsafePickleError(f"{src}: not a valid verification .bin pickle ({e})") from e
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise UnsafePickleError(f"{src}: expected a pickled (images, issame) pair, got {type(obj).__name__}")
    raw_images, raw_same = obj
    if not isinstance(raw_images, (list, tuple)):
        raise UnsafePickleError(f"{src}: images must be a list of bytes, got {type(raw_images).__name__}")
    images: list[bytes] = []
    for i, im in enumerate(raw_images):
        if isinstance(im, (bytes, bytearray)):
            images.append(bytes(im))
        elif isinstance(im, np.ndarray) and im.dtype == np.uint8 and im.ndim == 1:
            images.append(im.tobytes())
        else:
            raise UnsafePickleError(f"{src}: image {i} is {type(im).__name__}, expected bytes")
    if isinstance(raw_same, np.ndarray):
        if raw_same.dtype == object or raw_same.ndim != 1:
            raise UnsafePickleError(f"{src}: issame must be a 1-D boolean array")
        issame = raw_same.astype(bool)
    elif isinstance(raw_same, (list, tuple)):
        if not all(isinstance(v, (bool, int, np.bool_, np.integer)) for v in raw_same):
            raise UnsafePickleError(f"{src}: issame must contain booleans only")
        issame = np.asarray([bool(v) for v in raw_same], dtype=bool)
    else:
        raise UnsafePickleError(f"{src}: issame must be a list of bools, got {type(raw_same).__name__}")
    if len(images) != 2 * len(issame):
        raise UnsafePickleError(
            f"{src}: {len(images)} images for {len(issame)} pairs; expected exactly 2 per pair"
        )
    return images, issame


def write_verification_bin(path: str | os.PathLike[str], images: Sequence[bytes],
                           issame: Sequence[bool] | np.ndarray) -> Path:
    """Writes a verification ``.bin`` (plain lists, loadable by the safe loader).

    Args:
        path: Output file.
        images: ``2P`` encoded images; ``2i`` and ``2i+1`` form pair ``i``.
        issame: ``P`` booleans.
    """
    same = [bool(v) for v in issame]
    imgs = [bytes(b) for b in images]
    if len(imgs) != 2 * len(same):
        raise ValueError(f"need 2 images per pair: got {len(imgs)} images for {len(same)} pairs")
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "wb") as f:
        pickle.dump((imgs, same), f, protocol=4)
    os.replace(tmp, p)
    return p
