"""What a file is, from its first bytes: the one place that tells an export from an ONNX model, a pickle,
a web page or a spreadsheet.

Users hand dermcam files by path (``ckpt restore FILE``, ``evaluate FILE``, ``explain -c FILE``,
``train --pretrained PATH``, a metadata CSV), and the wrong file is a common mistake: the ONNX export
instead of the safetensors one, a ``torch.save`` pickle, a Git LFS pointer, the HTML page a download
link returned, an Excel workbook instead of its CSV. Without a look at the bytes, such a file fails
deep inside a parser with a figure ("its header claims 7011452225 bytes"); :func:`sniff` names it
instead, so the message can say what the file is and what was expected. Nothing is parsed beyond
magic numbers and, for text, the first characters: this module never unpickles or decodes anything.
"""

from __future__ import annotations

import struct
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from dermcam.errors import BadInputError

HEAD_BYTES = 4096  # what sniff_file reads: enough for every signature below


@dataclass(frozen=True)
class FileKind:
    """``code`` for callers to branch on (``safetensors``, ``torch``, ``onnx``, ``pickle``, ``text``...);
    ``description`` for messages ("X is {description}")."""

    code: str
    description: str


# torch.save's legacy (non-zip) format pickles this magic number first (torch/serialization.py).
_TORCH_LEGACY_MAGIC = b"\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"


# Fields of ONNX's ModelProto that follow ir_version (field 1, a varint): their protobuf tags.
_ONNX_NEXT_TAGS = {0x12, 0x1A, 0x22, 0x28, 0x32, 0x3A, 0x42, 0x72, 0x82}


# Fixed signatures, checked in order: (prefix, code, description).
_MAGIC = (
    (b"version https://git-lfs", "lfs", "a Git LFS pointer, not the file itself (fetch it with 'git lfs pull')"),
    (b"\x93NUMPY", "numpy", "a NumPy array file (.npy)"),
    (b"\x89HDF\r\n\x1a\n", "hdf5", "an HDF5 file (a Keras .h5 model?)"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "office", "an old-style Office file (.xls, .doc)"),
    (b"\xff\xd8\xff", "image", "a JPEG image"),
    (b"\x89PNG\r\n\x1a\n", "image", "a PNG image"),
    (b"GIF87a", "image", "a GIF image"),
    (b"GIF89a", "image", "a GIF image"),
    (b"II*\x00", "image", "a TIFF image"),
    (b"MM\x00*", "image", "a TIFF image"),
    (b"%PDF-", "pdf", "a PDF document"),
    (b"\x1f\x8b", "gzip", "a gzip archive"),
)


def sniff(head: bytes) -> FileKind | None:
    """What a file starting with ``head`` (its first bytes, ideally :data:`HEAD_BYTES`) is, or None
    when it is nothing recognisable (then the caller's own parser says what is wrong)."""
    if not head:
        return FileKind("empty", "an empty file")
    if len(head) >= 9 and head[8:9] == b"{" and 1 < struct.unpack("<Q", head[:8])[0] < 1 << 32:
        return FileKind("safetensors", "a safetensors file")
    for prefix, code, description in _MAGIC:
        if head.startswith(prefix):
            return FileKind(code, description)
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return FileKind("image", "a WebP image")
    if head.startswith(b"BM") and len(head) >= 14 and head[6:10] == b"\0\0\0\0":
        return FileKind("image", "a BMP image")
    if head.startswith(b"PK\x03\x04"):
        return _zip_kind(head)
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        if _TORCH_LEGACY_MAGIC in head[:32]:
            return FileKind("torch", "a PyTorch checkpoint (torch.save, legacy format)")
        return FileKind("pickle", "a Python pickle")
    if _is_onnx(head):
        return FileKind("onnx", "an ONNX model")
    return _text_kind(head)


def sniff_file(path: Path) -> FileKind | None:
    """:func:`sniff` on the file's first bytes; None when it cannot be read (the caller reports that)."""
    try:
        with open(path, "rb") as handle:
            return sniff(handle.read(HEAD_BYTES))
    except OSError:
        return None


def check_kind(path: Path, accepted: Collection[str], expected: str) -> FileKind | None:
    """The kind of the file at ``path`` (None: not recognised), or a one-line :class:`BadInputError`
    naming it when it is a recognised kind outside ``accepted`` (codes); ``expected`` ends the message
    ("a dermcam export; dermcam reads .safetensors exports")."""
    kind = sniff_file(path)
    if kind is not None and kind.code not in accepted:
        raise BadInputError(f"{path}: this is {kind.description}, not {expected}")
    return kind


def _zip_kind(head: bytes) -> FileKind:
    if b"data.pkl" in head:  # torch.save's zip format: archive/data.pkl, archive/data/0, ...
        return FileKind("torch", "a PyTorch checkpoint (torch.save)")
    if b"[Content_Types].xml" in head:
        return FileKind("office", "an Office file (.xlsx, .docx: save the sheet as CSV)")
    return FileKind("zip", "a zip archive")


def _is_onnx(head: bytes) -> bool:
    """A serialized ModelProto: ir_version (field 1, a small varint) first, then one of its other fields."""
    return len(head) >= 3 and head[0] == 0x08 and 1 <= head[1] <= 0x20 and head[2] in _ONNX_NEXT_TAGS


def _text_kind(head: bytes) -> FileKind | None:
    """HTML, XML, JSON or plain text, when ``head`` is UTF-8 text without control characters."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # not a character cut off by the read: not UTF-8 text
            return None
        text = head[:exc.start].decode("utf-8")
    text = text.removeprefix("\ufeff")
    if any(ord(c) < 32 and c not in "\t\r\n\f" for c in text):
        return None
    start = text.lstrip().lower()
    if start.startswith(("<!doctype html", "<html")) or "<html" in start[:1024]:
        return FileKind("html", "an HTML page (a download that saved a web page instead of the file?)")
    if start.startswith("<?xml"):
        return FileKind("xml", "an XML file")
    if start.startswith(("{", "[")):
        return FileKind("json", "a JSON text file")
    return FileKind("text", "a text file")
