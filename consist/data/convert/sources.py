"""Input members of file-per-molecule formats: one file, a directory, or a tar archive (streamed).

Archives are read as a stream (`tarfile` mode "r|"): members are decompressed one at a time and
never extracted to disk, so a `.tar.xz` of 10^5 JSON records needs memory for one record (and
tarfile's list of member headers). An archive cut short anywhere, mid-member or between members, is
detected: by the decompressor (.gz / .bz2 / .xz) and by the missing end-of-archive blocks.
"""

from __future__ import annotations

import bz2
import fnmatch
import gzip
import lzma
import os
import tarfile
import zlib
from pathlib import Path
from typing import BinaryIO, Iterator

from consist.data.convert.report import ConversionReport

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


def is_archive(path: Path) -> bool:
  return path.name.endswith(ARCHIVE_SUFFIXES)


def members(path: str | Path, pattern: str,
            report: ConversionReport) -> Iterator[tuple[str, bytes]]:
  """Yields (where, content) for each file matching `pattern` (a glob on the base name).

  `path` is a single file, a tar archive, or a directory walked recursively in sorted order, whose
  matching files and tar archives are read in turn. An archive cut short is reported to `report`
  as one "truncated" record (raised, or counted under skip_bad).

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: nothing in `path` matches.
  """
  path = Path(path)
  if not path.exists():
    raise FileNotFoundError(f"{path}: no such file or directory")
  found = False
  for file in _walk(path) if path.is_dir() else [path]:
    if is_archive(file):
      found = True
      yield from _archive_members(file, pattern, report)
    elif file == path or fnmatch.fnmatch(file.name, pattern):
      found = True
      yield str(file), file.read_bytes()
  if not found:
    raise ValueError(f"{path}: no files matching {pattern!r} and no tar archives")


def _walk(root: Path) -> Iterator[Path]:
  """Files under `root`, depth first, sorted by name in each directory."""
  for parent, dirs, files in os.walk(root):
    dirs.sort()
    for name in sorted(files):
      yield Path(parent) / name


def _open_decompressed(path: Path) -> BinaryIO:
  """The archive's tar byte stream. gzip / bz2 / lzma raise EOFError where a compressed stream
  ends early, which tarfile's own stream decompression does not (it stops silently)."""
  for suffixes, opener in (((".gz", ".tgz"), gzip.open), ((".bz2", ".tbz2"), bz2.open),
                           ((".xz", ".txz"), lzma.open)):
    if path.name.endswith(suffixes):
      return opener(path, "rb")
  return open(path, "rb")


class _TailKeeper:
  """Read-only file wrapper that remembers the last 1024 bytes read.

  A tar ends with two zero 512-byte blocks (then zero padding); tarfile stops silently at the end of
  data too, so an archive cut between two members is only told apart by its missing trailer.
  """

  def __init__(self, f: BinaryIO):
    self._f = f
    self.tail = b""

  def read(self, size: int = -1) -> bytes:
    data = self._f.read(size)
    if data:
      self.tail = (self.tail + data)[-2 * tarfile.BLOCKSIZE:]
    return data

  def ends_with_trailer(self) -> bool:
    while self.read(1 << 20):  # through the end (a cut compressed stream raises EOFError here)
      pass
    return len(self.tail) == 2 * tarfile.BLOCKSIZE and not any(self.tail)


def _archive_members(path: Path, pattern: str,
                     report: ConversionReport) -> Iterator[tuple[str, bytes]]:
  found = 0
  position = "at its start"
  try:
    with _open_decompressed(path) as raw:
      stream = _TailKeeper(raw)
      with tarfile.open(fileobj=stream, mode="r|") as tar:
        for info in tar:
          if not info.isfile() or not fnmatch.fnmatch(Path(info.name).name, pattern):
            continue
          position = f"in member {info.name}"
          content = tar.extractfile(info).read()
          if len(content) != info.size:
            raise EOFError(f"member has {len(content)} of {info.size} bytes")
          found += 1
          position = f"after member {info.name}"
          yield f"{path}: {info.name}", content
      if not stream.ends_with_trailer():
        raise EOFError("no end-of-archive blocks")
  except (tarfile.ReadError, EOFError, OSError, lzma.LZMAError, zlib.error) as e:
    if found == 0 and not path.stat().st_size:
      raise ValueError(f"{path}: empty file") from e
    report.lose(f"{path}: {position}", "truncated",
                f"archive ends mid-record or is corrupt ({type(e).__name__}: {e})")
    return
  if found == 0:
    raise ValueError(f"{path}: archive holds no files matching {pattern!r}")
