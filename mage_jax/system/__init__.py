"""Process life of the binaries: absl start-up and one-line errors (`runtime`), the allocator, Ctrl-C, atomic file
writes and what `--force` may remove.
"""
