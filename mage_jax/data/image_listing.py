"""The folder lister: which image files a folder holds, for the folder sources and FID's sample folders.

`list_images` walks folders in sorted order, follows symbolic links but enters each real directory
once and lists each real file once (symlink cycles terminate; a file reached through two links is one
example), and counts what it leaves out (files without an image extension, hidden files, repeats, broken links
or special files).
"""

from __future__ import annotations

import collections
import dataclasses
import os

# torchvision IMG_EXTENSIONS plus a few; matched case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")


@dataclasses.dataclass(frozen=True)
class ImageListing:
  """What `list_images` found.

  Attributes:
    groups: the image paths under each root, in sorted walk order.
    ignored: files left out by name (no image extension, or hidden).
    repeats: directories and files reached again (through links or hard links), and links pointing back
      into the dataset: each listed once, at its real place.
    unreadable: image-named entries that are no regular file (broken links, FIFOs, ...) and subfolders that
      could not be listed.
    above: links to a folder that holds the dataset (its parent, `/`, ...), not followed: through one, the
      walk would list the dataset again under another class, and everything beside it.
  """

  groups: tuple[tuple[str, ...], ...]
  ignored: int
  repeats: int
  unreadable: tuple[str, ...]
  above: int = 0

  @property
  def paths(self) -> list[str]:
    return [p for group in self.groups for p in group]

  def summary(self) -> str:
    """'12 images; 3 non-image files ignored; ...' (the counts that are not zero)."""
    parts = [f"{len(self.paths)} images"]
    if self.ignored:
      parts.append(f"{self.ignored} non-image or hidden files ignored")
    if self.repeats:
      parts.append(f"{self.repeats} folders/files reached again through links listed once")
    if self.above:
      parts.append(f"{self.above} links to a folder above the dataset skipped")
    if self.unreadable:
      parts.append(f"{len(self.unreadable)} unreadable entries skipped (e.g. {self.unreadable[0]})")
    return "; ".join(parts)


def is_image_name(filename: str) -> bool:
  """An image extension (case-insensitive) on a name that is not hidden."""
  return filename.lower().endswith(IMAGE_EXTENSIONS) and not filename.startswith(".")


def _sorted_entries(path: str) -> list[os.DirEntry]:
  with os.scandir(path) as it:
    return sorted(it, key=lambda e: e.name)


def list_images(*roots: str, within: str | None = None) -> ImageListing:
  """Image files under each root, recursively, in sorted order; symlinks followed, each real dir/file once.

  Every real directory is entered once and every real file listed once, so symlink cycles terminate and a file
  reached through two links is one example. A link that points into the dataset (`within`, default the roots)
  is not followed: what it points to is listed at its real place (with class folders as roots and their parent
  as `within`, a file keeps the class of the folder it really is in); nor is a link to a folder holding the
  dataset (counted in `above`). Links to elsewhere (a dataset assembled from links) are followed; the first one
  found wins.

  Args:
    *roots: folders.
    within: the folder links must point outside of to be followed; default: each root.

  Returns:
    `ImageListing` with one group per root.

  Raises:
    FileNotFoundError / NotADirectoryError: a root is missing or not a folder.
  """
  for root in roots:
    if not os.path.isdir(root):
      if os.path.exists(root):
        raise NotADirectoryError(f"not a folder: {root}")
      raise FileNotFoundError(f"image folder not found: {root}")
  real_roots = [os.path.realpath(root) for root in roots]
  walk = _Walk((os.path.realpath(within),) if within is not None else tuple(real_roots))
  groups = []
  for root, real in zip(roots, real_roots):
    found: list[str] = []
    if real in real_roots[: len(groups)]:  # the same folder twice (a class folder linking to another)
      walk.counts["repeats"] += 1
    else:
      walk.run(root, found)
    groups.append(tuple(found))
  return ImageListing(
    tuple(groups), walk.counts["ignored"], walk.counts["repeats"], tuple(walk.unreadable), walk.counts["above"]
  )


class _Walk:
  """The state `list_images` shares across its roots: what was seen, what was left out."""

  def __init__(self, inside: tuple[str, ...]):
    self.inside = inside  # real paths: links into these are not followed
    self.seen: set[tuple[int, int]] = set()  # (st_dev, st_ino) of directories and files
    self.counts: collections.Counter = collections.Counter()
    self.unreadable: list[str] = []

  def _points_inside(self, path: str) -> bool:
    real = os.path.realpath(path)
    return any(real == r or real.startswith(r.rstrip(os.sep) + os.sep) for r in self.inside)

  def _points_above(self, path: str) -> bool:
    real = os.path.realpath(path).rstrip(os.sep) + os.sep
    return any(r.startswith(real) and r.rstrip(os.sep) + os.sep != real for r in self.inside)

  def _first_time(self, key: tuple[int, int]) -> bool:
    if key in self.seen:
      self.counts["repeats"] += 1
      return False
    self.seen.add(key)
    return True

  def run(self, root: str, found: list[str]) -> None:
    st = os.stat(root)
    if not self._first_time((st.st_dev, st.st_ino)):
      return
    # An explicit stack of (entries, device) instead of recursion: deep trees cannot hit the recursion limit.
    stack = [(iter(_sorted_entries(root)), st.st_dev)]
    while stack:
      entries, dev = stack[-1]
      entry = next(entries, None)
      if entry is None:
        stack.pop()
        continue
      try:
        self._visit(entry, dev, stack, found)
      except OSError:
        self.unreadable.append(entry.path)

  def _visit(self, entry: os.DirEntry, dev: int, stack: list, found: list[str]) -> None:
    is_link = entry.is_symlink()
    if is_link and not os.path.exists(entry.path):
      raise OSError("broken link")
    if is_link and self._points_inside(entry.path):
      self.counts["repeats"] += 1  # listed at its real place (or a cycle)
      return
    if is_link and self._points_above(entry.path):
      self.counts["above"] += 1
      return
    if entry.is_dir():  # follows links
      if entry.name.startswith("."):
        return
      st = entry.stat()
      if self._first_time((st.st_dev, st.st_ino)):
        stack.append((iter(_sorted_entries(entry.path)), st.st_dev))
      return
    if not is_image_name(entry.name):
      self.counts["ignored"] += 1
      return
    if not entry.is_file():
      raise OSError("not a regular file")  # broken link, FIFO (reading it would block), device, ...
    if is_link:
      st = entry.stat()
      key = (st.st_dev, st.st_ino)
    else:
      key = (dev, entry.inode())  # no stat call per file: 1.3M ImageNet files stay cheap
    if self._first_time(key):
      found.append(entry.path)
