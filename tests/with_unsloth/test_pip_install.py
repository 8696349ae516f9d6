"""install.py keeps a preinstalled CUDA torch (Kaggle/Colab) and installs the pinned one on a bare machine:
pip's own dry-run report (`--dry-run --report`), resolved against PyPI, for the README's install command.
The dry-runs are started at session start (conftest.py, pip_check.py) and read here."""

import json

import pytest


def wait(dry_runs, name) -> dict:
    process, report = dry_runs[name]
    assert process.wait(timeout=1200) == 0, report.with_suffix(".log").read_text()[-3000:]
    return {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
            for item in json.loads(report.read_text())["install"]}


def test_install_keeps_a_preinstalled_torch(pip_dry_runs):
    """Next to torch 2.9.1 / torchvision 0.24.1, install.py installs the stack around them: no torch or
    torchvision in what pip would install, and an xformers built for torch 2.9 (0.0.33.x), not 0.0.35 (torch 2.10+)."""
    planned = wait(pip_dry_runs, "install.py, torch 2.9")
    assert "torch" not in planned and "torchvision" not in planned, planned
    assert planned["unsloth"] == "2026.10.7" and planned["transformers"] == "5.17.0"
    assert planned["xformers"].startswith("0.0.33"), planned["xformers"]


def test_the_former_install_replaced_it(pip_dry_runs):
    """The control: the README's former command (pip install -r requirements.txt, with its xformers==0.0.35 pin)
    next to the same torch 2.9.1 replaces it. Without the pin, pip 23.2 happens to keep torch (requirements-core
    names it directly, so the resolver settles it before xformers); install.py's constraint makes that a rule
    rather than a resolver preference that differs between pip versions and a bare `pip install unsloth`."""
    planned = wait(pip_dry_runs, "former pip -r, torch 2.9")
    assert planned.get("torch", "2.9.1") != "2.9.1", planned
    assert planned["xformers"] == "0.0.35"


def test_bare_machine_gets_the_pinned_torch(pip_dry_runs):
    planned = wait(pip_dry_runs, "install.py, bare")
    assert (planned.get("torch"), planned.get("torchvision")) == ("2.14.1", "0.29.1"), planned


def test_torch_outside_the_range_is_one_line(monkeypatch, capsys):
    """A torch install.py cannot keep ends in one line naming it and the fix (exit 2); a CUDA build's local
    version (+cu124) is kept exactly."""
    import importlib.util

    from tests.with_unsloth.pip_check import ROOT

    spec = importlib.util.spec_from_file_location("install_script", ROOT / "install.py")
    install = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(install)
    monkeypatch.setattr(install, "installed", lambda name: {"torch": "2.3.1"}.get(name))
    with pytest.raises(SystemExit) as stopped:
        install.constraints()
    assert stopped.value.code == 2
    assert "error: torch 2.3.1 is installed; this kit needs torch 2.4 to 2.14" in capsys.readouterr().err
    monkeypatch.setattr(install, "installed", lambda name: {"torch": "2.6.0+cu124"}.get(name))
    lines, summary = install.constraints()
    assert lines == ["torch==2.6.0+cu124"] and "keeping the installed torch 2.6.0+cu124" in summary
