"""Methods stay plug-ins: the generic packages name no method.

What generic code needs to know of a method comes from the method class (its attributes and
class methods, docs/adding-a-method.md); a string literal naming a registered method (``"lora"``)
or one of its config keys (``"rsvd.rank"``) in a generic package is a method test in disguise.
The names come from the registry, so a new method is covered without touching this file.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The generic packages and modules (relative to peftlab/).
GENERIC = ["train", "build.py", "export.py", "bounds", "analysis", "studies", "evaluation.py", "runs", "profiling.py", "cli"]

# Known hits still to be removed: empty since issue 29, and it stays empty (never add one; a stale
# entry fails too). An entry is
# "path:line: source line"; it matches on path and source line, so that an edit above it does not
# break the test (the line number is the one the hit had when it was listed).
PENDING: list[str] = []


def method_names() -> set[str]:
    from peftlab.methods import METHODS

    return set(METHODS)


def names_a_method(value: str, names: set[str]) -> bool:
    """``value`` is a method's name, or a dotted config key of a method's section (``"sora.lambda_"``)."""
    if value in names:
        return True
    head, dot, rest = value.partition(".")
    return bool(dot) and head in names and rest != "" and not any(c.isspace() for c in value)


def hits_in(path: Path, root: Path, names: set[str]) -> list[tuple[str, int, str]]:
    """(path relative to ``root``, line, source line) of every string literal in ``path`` that names a method."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    out = []
    for node in ast.walk(ast.parse(text, filename=str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and names_a_method(node.value, names):
            out.append((path.relative_to(root).as_posix(), node.lineno, lines[node.lineno - 1].strip()))
    return sorted(set(out))


def generic_files(root: Path) -> list[Path]:
    files = []
    for part in GENERIC:
        p = root / "peftlab" / part
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            files.extend(sorted(p.rglob("*.py")))
    return files


def problems(root: Path, names: set[str], pending: list[str]) -> tuple[list[str], list[str]]:
    """(hits not in ``pending`` as "path:line: source line", entries of ``pending`` that match no hit)."""
    allowed = {}
    for entry in pending:
        path, _, rest = entry.partition(":")
        allowed[(path, rest.partition(": ")[2])] = entry
    new, seen = [], set()
    for f in generic_files(root):
        for path, line, src in hits_in(f, root, names):
            if (path, src) in allowed:
                seen.add((path, src))
            else:
                new.append(f"{path}:{line}: {src}")
    stale = [entry for key, entry in allowed.items() if key not in seen]
    return new, stale


def check(root: Path, names: set[str], pending: list[str]) -> None:
    new, stale = problems(root, names, pending)
    assert not new, ("generic code names a method (take what it needs from the method class instead, "
                     "docs/adding-a-method.md):\n" + "\n".join(new))
    assert not stale, "PENDING entries whose hit is gone: remove them from tests/test_architecture_methods.py:\n" + "\n".join(stale)


def test_generic_packages_name_no_method():
    check(ROOT, method_names(), PENDING)


def test_every_generic_package_exists():
    missing = [p for p in GENERIC if not (ROOT / "peftlab" / p).exists()]
    assert not missing, f"GENERIC lists {missing}, which are not in peftlab/: keep the list in step with the package"


@pytest.mark.parametrize("literal", ['"lora"', "'ba_lora'", '"rsvd.rank"', 'f"{x}" + "sora"'])
def test_the_checker_catches_a_planted_method_name(tmp_path, literal):
    """A method name planted in a generic package fails the check, naming file and line."""
    (tmp_path / "peftlab" / "analysis").mkdir(parents=True)
    (tmp_path / "peftlab" / "analysis" / "planted.py").write_text(f'"""Docs may say lora."""\n\nx = 1\nif m == {literal}:\n    pass\n')
    with pytest.raises(AssertionError, match=r"peftlab/analysis/planted\.py:4: if m =="):
        check(tmp_path, {"lora", "ba_lora", "rsvd", "sora"}, [])


def test_the_checker_leaves_prose_and_other_words_alone(tmp_path):
    (tmp_path / "peftlab" / "cli").mkdir(parents=True)
    (tmp_path / "peftlab" / "cli" / "ok.py").write_text(
        '"""LoRA and lora in prose."""\nA = "lora adapters"\nB = "loraplus"\nC = "lora."\nD = "not lora.r"\nE = cfg.lora.r\n')
    check(tmp_path, {"lora"}, [])


def test_pending_entries_allow_their_hit_and_go_stale_when_it_goes(tmp_path):
    f = tmp_path / "peftlab" / "train" / "old.py"
    f.parent.mkdir(parents=True)
    f.write_text('\nif cfg.method == "full":\n    pass\n')
    entry = 'peftlab/train/old.py:2: if cfg.method == "full":'
    check(tmp_path, {"full"}, [entry])
    f.write_text('\n\n\nif cfg.method == "full":\n    pass\n')  # moved down: still the listed hit
    check(tmp_path, {"full"}, [entry])
    f.write_text("\nif cfg.method == x:\n    pass\n")  # fixed: the entry must go
    with pytest.raises(AssertionError, match="PENDING entries whose hit is gone"):
        check(tmp_path, {"full"}, [entry])
