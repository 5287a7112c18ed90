"""Project files describe the code and its measurements, not how it was made.

Scans the tracked text files (`git ls-files`; without git, the tree less
.git, build and *.egg-info folders) for words that name the process that
produced the repository or documents outside it, and fails listing
file:line for each. The raw logs and JSON of the measurement folders
(docs/measurements/<run>/) are kept as written and are not scanned; their
.md indexes are. Where a fact came from outside the repository, the file
should state the fact and its primary source (a paper, a transformers
module, a measured run under docs/measurements/).
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess

ROOT = pathlib.Path(__file__).resolve().parent.parent
SELF = "tests/test_project_words.py"
_SKIP_DIRS = {".git", "build", "__pycache__", ".pytest_cache"}

# This test's own word list, from the "begin" marker to the "end" marker,
# is the one part of this file that is not scanned.
# words: begin
_ORDINAL = (r"(?:first|second|third|fourth|fifth|sixth|seventh|eighth|ninth"
            r"|tenth|eleventh|twelfth|thirteenth|fourteenth|fifteenth"
            r"|sixteenth|seventeenth|eighteenth|nineteenth|twentieth"
            r"|\d+(?:st|nd|rd|th))")
FORBIDDEN = {
    "session": re.compile(r"\bsessions?\b", re.I),
    "lease": re.compile(r"\bleases?\b", re.I),
    "metered": re.compile(r"\bmetered\b", re.I),
    "the issue": re.compile(r"\bthe issue\b", re.I),
    "ANCHORS.md": re.compile(r"\bANCHORS\.md\b", re.I),
    "QWEN35_SPEC": re.compile(r"\bQWEN35_SPEC\b", re.I),
    "DESIGN.md": re.compile(r"\bDESIGN\.md\b", re.I),
    "DESIGN §": re.compile(r"\bDESIGN §", re.I),
    "../shared": re.compile(r"\.\./shared\b"),
    # "the ninth GPU run", "the fifteenth and sixteenth sessions", ...
    "ordinal run": re.compile(
        rf"\b{_ORDINAL}(?:[\s-]+(?:and|or|to)[\s-]+(?:the[\s-]+)?{_ORDINAL})?"
        r"[\s-]+(?:sessions?|leases?|(?:GPU|H100|H200|TPU)[\s-]+"
        r"(?:runs?|calls?))\b", re.I),
}
# Matches inside these spans are allowed: pytest's own fixture scope.
# (Identifiers such as the `session_tmp` fixture do not match at all: "_"
# is a word character, so there is no word boundary after the word.)
ALLOWED = (re.compile(r"""scope=["']session["']"""),)

# Lines with the hits the scanner must report, and lines it must pass.
_HITS = {
    "Timed in the fifteenth session.": {"session", "ordinal run"},
    "the Sixth H100 run": {"ordinal run"},
    "one metered GPU call": {"metered"},
    "A lease of 15 minutes": {"lease"},
    "within the issue's bound": {"the issue"},
    "see ANCHORS.md and DESIGN §2": {"ANCHORS.md", "DESIGN §"},
    "QWEN35_SPEC.md §5, DESIGN.md, ../shared/x": {
        "QWEN35_SPEC", "DESIGN.md", "../shared"},
}
_CLEAN = (
    '@pytest.fixture(scope="session")',
    "def session_tmp(tmp_path_factory):",
    "released checkpoints; a first call compiles; its issue #640",
    "a fifth fewer instructions; an eighth of the sequence",
)
# words: end


def hits_in_line(line: str) -> list[tuple[str, str]]:
  """(word, matched text) for every forbidden match on `line` that is not
  inside an allowed span."""
  allowed = [m.span() for pattern in ALLOWED for m in pattern.finditer(line)]
  found = []
  for word, pattern in FORBIDDEN.items():
    for m in pattern.finditer(line):
      if not any(a <= m.start() and m.end() <= b for a, b in allowed):
        found.append((word, m.group(0)))
  return found


def _listed_files(root: pathlib.Path, use_git: bool) -> list[str]:
  """Tracked files, relative and '/'-separated; the tree without git."""
  if use_git:
    try:
      out = subprocess.run(["git", "ls-files", "-z"], cwd=root, check=True,
                           capture_output=True, timeout=30).stdout
      return [p for p in out.decode("utf-8").split("\0") if p]
    except (OSError, subprocess.SubprocessError):
      pass  # no git, or no repository here: walk the tree
  files = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames
                   if d not in _SKIP_DIRS and not d.endswith(".egg-info")]
    rel = pathlib.Path(dirpath).relative_to(root)
    files.extend((rel / f).as_posix() for f in filenames)
  return files


def _raw_measurement(path: str) -> bool:
  """A raw log / JSON / profile of a run: docs/measurements/<run>/<file>
  that is not markdown."""
  parts = path.split("/")
  return (len(parts) == 4 and parts[:2] == ["docs", "measurements"]
          and not path.endswith(".md"))


def scan(root: pathlib.Path, use_git: bool = True) -> list[str]:
  """'path:line: word: text' for every forbidden word in the text files
  (`use_git`: the files git tracks, else every file under `root`)."""
  problems = []
  for path in sorted(_listed_files(root, use_git)):
    if _raw_measurement(path):
      continue
    try:
      data = (root / path).read_bytes()
    except OSError:  # listed but absent (deleted, not yet committed)
      continue
    if b"\0" in data[:8192]:
      continue  # binary
    own_list = False
    for number, line in enumerate(
        data.decode("utf-8", errors="replace").splitlines(), 1):
      if path == SELF and line.strip() in ("# words: begin", "# words: end"):
        own_list = line.strip() == "# words: begin"
        continue
      if own_list:
        continue
      for word, text in hits_in_line(line):
        problems.append(f"{path}:{number}: {word}: {text!r}: "
                        f"{line.strip()[:120]}")
  return problems


def test_scanner_finds_each_word_and_passes_the_allowed():
  for line, words in _HITS.items():
    assert {w for w, _ in hits_in_line(line)} == words, line
  for line in _CLEAN:
    assert hits_in_line(line) == [], line


def test_scan_reports_file_and_line(tmp_path):
  (tmp_path / "docs" / "measurements" / "run").mkdir(parents=True)
  (tmp_path / "a.md").write_text("fine\n" + next(iter(_HITS)) + "\n")
  (tmp_path / "b.py").write_text('@pytest.fixture(scope="session")\n')
  (tmp_path / "docs" / "measurements" / "run" / "x.log").write_text(
      next(iter(_HITS)))  # a raw log: not scanned
  (tmp_path / "docs" / "measurements" / "run" / "index.md").write_text(
      "\n\n" + next(iter(_HITS)))  # its index: scanned
  (tmp_path / "blob.bin").write_bytes(b"\0" + next(iter(_HITS)).encode())
  found = scan(tmp_path, use_git=False)
  assert sorted(p.split(": ")[0] for p in found) == [
      "a.md:2", "a.md:2", "docs/measurements/run/index.md:3",
      "docs/measurements/run/index.md:3"], found


def test_project_files_have_no_forbidden_words():
  problems = scan(ROOT)
  assert not problems, ("words that belong to how the project was made, "
                        "or documents outside it:\n" + "\n".join(problems))
