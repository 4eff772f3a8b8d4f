"""tcmalloc by re-execution: the process really runs on it, its children do not inherit it,
and a bad or unsatisfiable DISTSENT_ALLOCATOR is refused by name."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from distsent import allocator
from distsent.config import ConfigError
from tests.conftest import REPO, cli_env, run_cli

# What a re-executed process reports about itself and what a child of it would inherit.
PROBE = (
    "import json, os; from distsent.allocator import use_tcmalloc, active_allocator; use_tcmalloc(); "
    "print(json.dumps({'allocator': active_allocator(), 'preload': os.environ.get('LD_PRELOAD'), "
    "'marks': sorted(k for k in os.environ if k.startswith('DISTSENT_') and k != 'DISTSENT_ALLOCATOR')}))"
)


def probe(env: dict[str, str]) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=REPO, env={**cli_env(), **env}, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_reexecuted_process_runs_on_tcmalloc_and_children_do_not_inherit_it(tcmalloc: str):
    report = probe({"DISTSENT_ALLOCATOR": "auto", "LD_PRELOAD": ""})
    assert report == {"allocator": "tcmalloc", "preload": None, "marks": []}


def test_a_callers_ld_preload_is_handed_back_to_children(tcmalloc: str):
    # libm is loaded by every Python anyway: preloading it changes nothing but the variable.
    report = probe({"DISTSENT_ALLOCATOR": "tcmalloc", "LD_PRELOAD": "libm.so.6"})
    assert report == {"allocator": "tcmalloc", "preload": "libm.so.6", "marks": []}


def test_system_choice_leaves_the_process_alone():
    assert probe({"DISTSENT_ALLOCATOR": "system", "LD_PRELOAD": ""})["allocator"] == "system"


def test_unknown_choice_is_a_config_error_naming_the_variable():
    result = run_cli("train", "model.name=tiny-bert", check=False, env={"DISTSENT_ALLOCATOR": "jemalloc"})
    assert result.returncode == 2
    assert "DISTSENT_ALLOCATOR='jemalloc': choose one of auto, tcmalloc, system" in result.stderr


def test_required_tcmalloc_that_is_missing_is_refused(monkeypatch):
    monkeypatch.setenv("DISTSENT_ALLOCATOR", "tcmalloc")
    monkeypatch.delenv("DISTSENT_ALLOCATOR_REEXECUTED", raising=False)
    monkeypatch.setattr(allocator, "active_allocator", lambda: "system")
    monkeypatch.setattr(allocator, "find_tcmalloc", lambda: None)
    with pytest.raises(ConfigError, match="DISTSENT_ALLOCATOR=tcmalloc but no libtcmalloc was found"):
        allocator.use_tcmalloc()
