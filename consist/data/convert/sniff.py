"""What a file looks like, from its first bytes: for errors that say "FILE: not an ASE database (it
looks like extended XYZ text: try --format extxyz)" instead of a decoder's or a library's message.
Reads at most `HEAD_BYTES` bytes, read-only."""

from __future__ import annotations

from pathlib import Path

from consist.data.convert.report import ConversionError

HEAD_BYTES = 1 << 16

# kind -> (description, the launch.convert format that reads it or "")
KINDS = {
    "empty": ("an empty file", ""),
    "sqlite": ("an SQLite database", "asedb"),
    "hdf5": ("an HDF5 file", "spice"),
    "archive": ("a compressed file or tar archive", "qm9 or pubchemqc"),
    "xyz": ("(extended) XYZ text", "extxyz"),
    "sdf": ("SDF / MOL text", "pcqm4mv2"),
    "json": ("JSON text", "asedb (an ASE JSON database) or pubchemqc"),
    "text": ("text", ""),
    "binary": ("binary data", ""),
}
_MAGIC = ((b"SQLite format 3\x00", "sqlite"), (b"\x89HDF\r\n\x1a\n", "hdf5"), (b"\x1f\x8b", "archive"),
          (b"BZh", "archive"), (b"\xfd7zXZ\x00", "archive"))


def kind_of(path: Path) -> str:
  """One of KINDS, from the first HEAD_BYTES bytes of the file `path`."""
  with open(path, "rb") as f:
    head = f.read(HEAD_BYTES)
  if not head:
    return "empty"
  for magic, kind in _MAGIC:
    if head.startswith(magic):
      return kind
  if len(head) > 262 and head[257:262] == b"ustar":
    return "archive"
  try:
    text = head.decode("utf-8")
  except UnicodeDecodeError as e:
    if e.start < len(head) - 4 or b"\x00" in head:  # not just a multi-byte character cut at the end
      return "binary"
    text = head[:e.start].decode("utf-8")
  stripped = text.lstrip()
  if stripped[:1] in ("{", "["):
    return "json"
  if "M  END" in text or "V2000" in text or "V3000" in text or "$$$$" in text:
    return "sdf"
  first = stripped.split("\n", 1)[0].split()
  if first and first[0].isdigit() and text.count("\n") >= 1:
    return "xyz"
  return "text"


def describe(path: Path) -> str:
  """'it looks like X: try --format Y' (or just 'it is X')."""
  kind = kind_of(path)
  what, fmt = KINDS[kind]
  if kind == "empty":
    return "it is an empty file"
  return f"it looks like {what}" + (f": try --format {fmt}" if fmt else "")


def check_input_file(path: Path, fmt: str) -> None:
  """FileNotFoundError if missing; ConversionError naming the file if it is a directory."""
  if path.is_dir():
    raise ConversionError(f"{path}: is a directory; --format {fmt} reads one file")
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such file")
