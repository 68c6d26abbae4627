"""The README's commands, taken from README.md itself: every `peftlab ...` line names a real
subcommand whose parser accepts it, and the "one run" lines (train, resume, re-run from a
run's config.json) work as written on tiny settings."""

from __future__ import annotations

import json
import re
import shlex

import pytest

from conftest import ROOT

README = (ROOT / "README.md").read_text()
TINY = ["--training.max_steps=4", "--data.max_train_examples=64", "--data.max_val_examples=32",
        "--logging.progress_bar=false", "--training.save_steps=0"]


def readme_commands() -> list[list[str]]:
    """Every `peftlab ...` command of the README's bash blocks, continuation lines joined,
    comments dropped, `[optional ...]` groups removed."""
    out = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            line = line.split("  #")[0].strip()
            if not line.startswith("peftlab "):
                continue
            line = re.sub(r"\[[^\]]*\]", "", line)
            out.append(shlex.split(line)[1:])
    return out


def test_readme_lists_commands():
    cmds = readme_commands()
    assert len(cmds) >= 10
    assert {c[0] for c in cmds} >= {"train", "sweep", "estimate", "bounds", "analyze", "export", "data"}


@pytest.mark.parametrize("argv", readme_commands(), ids=lambda a: " ".join(a)[:60])
def test_every_readme_command_parses(argv):
    from peftlab.cli import COMMANDS, build_parser

    assert argv[0] in COMMANDS, f"README names `peftlab {argv[0]}`, which is not a command"
    args, extra = build_parser(argv[0]).parse_known_args(argv)
    assert args.command == argv[0]
    for e in extra:  # whatever argparse leaves over must be a --section.key=value override
        assert re.fullmatch(r"--([a-z_]+\.[a-z_.]+|method)(=.*)?", e), f"`{e}` in `peftlab {' '.join(argv)}` is neither an option nor an override"


def test_one_run_lines_work_as_written(tmp_path, monkeypatch):
    """train with overrides -> --resume RUN_DIR -> RUN_DIR/config.json as a config."""
    from peftlab.cli import main

    train, resume, again = [c for c in readme_commands() if c[0] == "train"][:3]
    assert "--resume" in resume and again[1].endswith("config.json")
    monkeypatch.chdir(ROOT)
    run = tmp_path / "dora16"

    def swap(argv):  # the README's paths under tmp_path, plus tiny settings
        return [a.replace("runs/dora16-again", str(tmp_path / "again")).replace("runs/dora16", str(run)) for a in argv]

    assert main([*swap(train), *TINY]) == 0
    first = json.loads((run / "results_final.json").read_text())
    assert first["method"] == "dora" and first["status"] == "completed"
    assert main(swap(resume)) == 0  # finished: nothing more to do, with the run's own configuration
    assert json.loads((run / "results_final.json").read_text())["final"] == first["final"]
    assert main([*swap(again), *TINY]) == 0
    second = json.loads((tmp_path / "again" / "results_final.json").read_text())
    assert second["final"] == first["final"]  # same configuration and seed: the same numbers


@pytest.mark.parametrize("argv", [["train"], ["config"], ["data", "prepare"], ["profile"], ["export"], ["compare"], ["sweep"],
                                  ["estimate"], ["bounds"], ["analyze"]], ids=" ".join)
def test_help_has_no_sphinx_markup(argv, capsys):
    from peftlab.cli import main

    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    text = capsys.readouterr().out
    assert text.strip() and not re.search(r":(mod|class|func|meth|attr):`|``", text), text
