"""Users' modules are files, not names: two specs whose `env: myenvs:Env` are different files each get their
own file or are refused naming both, a user's file never stands in for a module labfleet already imported,
and a spec's directory goes on Ray's path only where the spec's import paths need it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from labfleet.usercode import ModuleClash, code_dirs, import_path
from tests.conftest import run_cli

ENV = """
import gymnasium as gym
import numpy as np


class Env(gym.Env):
    observation_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(1, np.float32), {{}}

    def step(self, action):
        self.t += 1
        return np.zeros(1, np.float32), {reward}, False, self.t >= 10, {{}}
"""


def _spec_dir(root: Path, name: str, reward: float, module: str = "myenvs") -> Path:
    directory = root / name
    directory.mkdir()
    (directory / f"{module}.py").write_text(ENV.format(reward=reward))
    (directory / "spec.yaml").write_text(yaml.safe_dump({
        "name": f"env-{name}", "algorithm": "reinforce", "env": f"{module}:Env", "seeds": [0],
        "budget": {"env_steps": 512}, "hparams": {"n_envs": 2, "n_steps": 16}, "eval": {"episodes": 2},
        "tracking": {"experiment": "modules"}}))
    return directory / "spec.yaml"


@pytest.mark.slow
def test_one_module_name_in_two_directories_is_refused_naming_both_files(tracking_uri, tmp_path: Path) -> None:
    a, b = _spec_dir(tmp_path, "dirA", 1.0), _spec_dir(tmp_path, "dirB", 5.0)
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"name": "clash", "experiments": [{"spec": str(a)}, {"spec": str(b)}]}))
    for command in ("validate", "suite"):
        result = run_cli(command, str(suite), "--tracking-uri", tracking_uri, cwd=tmp_path) \
            if command == "suite" else run_cli(command, str(suite), cwd=tmp_path)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "Traceback" not in result.stderr
        assert str(a.parent / "myenvs.py") in result.stderr and str(b.parent / "myenvs.py") in result.stderr, \
            result.stderr
        assert "rename one of the two files" in result.stderr
    assert not (tmp_path / "m.db").exists(), "the refused suite wrote a store"


@pytest.mark.slow
def test_each_spec_alone_trains_its_own_file(tracking_uri, tmp_path: Path) -> None:
    """The same module name in two directories, one command each: each evaluates its own reward (10 steps
    of 1, then of 5), in one store."""
    uri = tracking_uri
    for name, reward in (("dirA", 1.0), ("dirB", 5.0)):
        spec = _spec_dir(tmp_path, name, reward)
        result = run_cli("run", str(spec), "--tracking-uri", uri, "--quiet", cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("modules")
    returns = sorted(r.data.metrics["eval/return_mean"] for r in
                     client.search_runs([exp.experiment_id], "tags.`labfleet.role` = 'seed'"))
    assert returns == [10.0, 50.0]


def test_a_later_command_in_one_process_gets_its_own_file(tmp_path: Path) -> None:
    """One process (a notebook, a test session) validates two projects in turn, each with its own
    `clashmod_one.py`: each gets its own file, not the module the first one left in sys.modules."""
    _spec_dir(tmp_path, "one", 1.0, module="clashmod_one")
    other = tmp_path / "two"
    other.mkdir()
    (other / "clashmod_one.py").write_text(ENV.format(reward=2.0))
    try:
        first = import_path("clashmod_one:Env", tmp_path / "one")
        assert sys.modules["clashmod_one"].__file__ == str(tmp_path / "one" / "clashmod_one.py")
        second = import_path("clashmod_one:Env", other)
        assert second is not first
        assert sys.modules["clashmod_one"].__file__ == str(other / "clashmod_one.py")
        assert import_path("clashmod_one:Env", other) is second  # the same file again: the same module
    finally:
        sys.modules.pop("clashmod_one", None)


def test_a_users_file_never_stands_in_for_an_installed_module(tmp_path: Path) -> None:
    spec = _spec_dir(tmp_path, "shadow", 1.0, module="typing_extensions")
    result = run_cli("validate", str(spec), cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "typing_extensions" in result.stderr and "rename one of the two files" in result.stderr
    with pytest.raises(ModuleClash):
        import_path("typing_extensions:Env", spec.parent)


@pytest.mark.slow
def test_only_the_directories_import_paths_need_go_on_rays_path(tracking_uri, tmp_path: Path) -> None:
    """A spec naming only built-ins puts nothing on Ray's path: a `typing_extensions.py` beside it (which
    would break every Ray process that imports the real one) is never imported."""
    from labfleet.spec.loading import load_spec

    plain = tmp_path / "plain"
    plain.mkdir()
    marker = tmp_path / "imported"
    (plain / "typing_extensions.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise SystemExit(3)\n")
    (plain / "spec.yaml").write_text(yaml.safe_dump({
        "name": "plain", "algorithm": "reinforce", "env": "CartPole-v1", "seeds": [0],
        "budget": {"env_steps": 512}, "hparams": {"n_envs": 2, "n_steps": 16}, "eval": {"episodes": 1}}))
    assert code_dirs([(load_spec(plain / "spec.yaml", {}), plain)]) == ([], [])
    custom = _spec_dir(tmp_path, "custom", 1.0)
    assert code_dirs([(load_spec(custom, {}), custom.parent)]) == ([str(custom.parent.resolve())], [])
    result = run_cli("run", str(plain / "spec.yaml"), "--tracking-uri", tracking_uri, "--quiet",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert not marker.exists(), "a file beside the spec was imported by a Ray process"
