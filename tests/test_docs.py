"""The documentation cannot drift from the code: every command it shows parses, every path it names exists."""

import re
import shlex

import pytest

from conftest import REPO, run_cli

DOCS = [
  REPO / "README.md",
  REPO / "launch" / "README.md",
  REPO / "bench" / "README.md",
  *sorted((REPO / "docs").glob("*.md")),
]
# Paths the docs name inside the repository (others are outputs, user data or other projects' files).
REPO_DIRS = ("configs", "mage_jax", "bench", "launch", "tests", "docs", ".ci")


def _blocks(text: str):
  """Fenced code blocks (``` or ```bash) with backslash continuations joined."""
  for block in re.findall(r"```(?:bash|sh|shell)?\n(.*?)```", text, re.S):
    yield re.sub(r"\\\n\s*", " ", block)


def _commands():
  """(doc, command line) for every `python -m mage_jax.<binary>` line of the docs."""
  for doc in DOCS:
    for block in _blocks(doc.read_text()):
      for line in block.splitlines():
        line = line.split(" #")[0].strip()
        if re.match(r"^(\w+=\S+\s+)*(\S*/)?python3? -m mage_jax\.", line):
          yield doc.relative_to(REPO), line


COMMANDS = sorted(set(_commands()))


def test_docs_show_commands():
  assert len(COMMANDS) >= 10, COMMANDS


@pytest.mark.parametrize("doc,line", COMMANDS, ids=[f"{doc}:{line[:60]}" for doc, line in COMMANDS])
def test_documented_command_parses(doc, line, tmp_path):
  """Each command goes through its binary's real flag parsing (and config loading), with stand-in paths for
  shell variables (a one-letter variable is a loop index: 0)."""
  stand_in = lambda m: "0" if len(m.group(1)) == 1 else str(tmp_path / m.group(1))
  words = shlex.split(re.sub(r"\$\{?(\w+)\}?", stand_in, line))
  env = dict(w.split("=", 1) for w in words[: words.index("-m")] if re.match(r"^\w+=", w))
  module = words[words.index("-m") + 1]
  run = run_cli(module, *words[words.index("-m") + 2 :], MAGE_JAX_PARSE_ONLY="1", **env)
  assert run.returncode == 0, f"{doc}: {line}\n{run.stderr[-2000:]}"
  assert run.stdout.startswith("flags parsed"), run.stdout


def _named_paths(text: str):
  for token in re.findall(r"`([^`\s]+)`", text) + re.findall(
    r"(?<![\w./-])((?:configs|mage_jax|bench|launch|"
    r"tests|docs)/[\w./-]+\.(?:py|sh|md|json))",
    text,
  ):
    token = token.split(":")[0].rstrip(".,)")
    if token.split("/")[0] in REPO_DIRS and re.match(r"^[\w./-]+$", token) and "." in token.split("/")[-1]:
      yield token


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_named_paths_exist(doc):
  missing = sorted(
    {p for p in _named_paths(doc.read_text()) if not (REPO / p).exists() and not (doc.parent / p).exists()}
  )
  assert not missing, f"{doc.relative_to(REPO)} names files that do not exist: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_no_template_text_reaches_a_reader(doc):
  """A placeholder left for a figure (RESULTS_PLACEHOLDER, COST_TABLE, CPU_..._AFTER) is a figure missing."""
  leftovers = re.findall(
    r"\b[A-Z][A-Z0-9]*_(?:[A-Z0-9]+_)*"
    r"(?:PLACEHOLDER|TABLE|NOTE|AFTER|BEFORE|TODO|TBD|RESULTS|READING)\b",
    doc.read_text(),
  )
  assert not leftovers, leftovers


# The implementation spec the code was written from is not shipped: a user can follow a citation of the MAGE
# paper, of the official LTH14/mage (or MaskGIT) code, or of docs/, but not one of "spec §N".
SPEC_CITATIONS = ("spec §", "spec/MAGE.md", "MAGE.md §", "(§")
USER_FACING_DIRS = ("mage_jax", "configs", "bench", "launch", "docs")


def test_no_spec_citations_reach_a_user():
  files = [REPO / "README.md", REPO / "setup.py"]
  files += [
    p for d in USER_FACING_DIRS for p in sorted((REPO / d).rglob("*")) if p.suffix in (".py", ".md") and p.is_file()
  ]
  needles = [s.lower() for s in SPEC_CITATIONS]
  hits = [
    f"{p.relative_to(REPO)}:{n}: {line.strip()}"
    for p in files
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
    if any(s in line.lower() for s in needles)
  ]
  assert len(files) > 50, files
  assert not hits, "\n".join(hits)
