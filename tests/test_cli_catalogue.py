"""`labfleet list` and `labfleet show` match the registry and the hyperparameter models."""

from __future__ import annotations

import gymnasium as gym
import pytest
from typer.testing import CliRunner

from labfleet.algorithms import registry
from labfleet.cli import app


def test_list_algorithms_matches_the_registry_in_80_columns():
    result = CliRunner().invoke(app, ["list", "algorithms"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    listed = {line.split()[0] for line in result.output.splitlines() if line and not line.startswith(" ")}
    assert listed == set(registry.names())
    for name in registry.names():
        assert registry.get(name).summary.split()[0] in result.output


def test_list_envs_lists_what_can_be_made_and_marks_the_rest():
    result = CliRunner().invoke(app, ["list", "envs"])
    assert result.exit_code == 0
    available, _, rest = result.output.partition("Registered, but not available here:")
    rest, _, pooled = rest.partition("With env_backend: envpool (EnvPool's own ids):")
    assert {"CartPole-v1", "Pong-v5"} <= set(pooled.split())  # EnvPool's ids, listed apart
    ready = set(available.split())
    missing = {line.strip().split(":")[0] for line in rest.splitlines() if line.strip()}
    assert ready | missing == set(gym.registry) and not ready & missing
    assert {"CartPole-v1", "FrozenLake-v1", "Pendulum-v1", "Taxi-v4"} <= ready
    assert "HalfCheetah-v2" in missing and "use the -v5 version" in rest
    # every id listed as available is made here; of the 352 Atari ids (one entry point, a ROM each: about
    # 25 s to make them all), every 8th
    atari = sorted(i for i in ready if gym.registry[i].entry_point == "ale_py.env:AtariEnv")
    for env_id in sorted(ready - set(atari)) + atari[::8]:
        if env_id.startswith(("gymnasium.envs.mujoco", "Humanoid")):
            continue
        gym.make(env_id).close()

def test_list_envs_in_a_fresh_process_includes_atari():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "labfleet", "list", "envs"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "ALE/Pong-v5" in done.stdout.split("Registered, but not")[0]


def test_help_names_values_as_the_readme_does():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "labfleet", "sweep", "-h"], capture_output=True, text=True,
                          timeout=60, env={**__import__("os").environ, "COLUMNS": "80"})
    assert done.returncode == 0
    assert "KEY=VALUE" in done.stdout and "<list[str]>" not in done.stdout and "SET_" not in done.stdout
    assert all(len(line) <= 80 for line in done.stdout.splitlines())
    quiet = next(line for line in done.stdout.splitlines() if "--quiet" in line)
    assert "<bool>" not in quiet and "QUIET" not in quiet


def test_list_rejects_other_words():
    result = CliRunner().invoke(app, ["list", "planets"])
    assert result.exit_code == 2 and "expected algorithms, envs or datasets" in result.output


def test_list_datasets_matches_the_dataset_table():
    from labfleet.data.datasets import DATASETS

    result = CliRunner().invoke(app, ["list", "datasets"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    listed = {line.split("│")[1].strip() for line in result.output.splitlines()
              if line.startswith("│") and line.split("│")[1].strip()}
    assert listed == set(DATASETS) >= {"digits", "ring8", "grid25"}


def test_show_prints_every_hyperparameter_in_full_in_80_columns():
    result = CliRunner().invoke(app, ["show", "ppo"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for name in registry.get("ppo").hparams.model_fields:
        assert any(line.startswith(f"{name}: ") for line in lines), name  # never cut: it is typed into specs
    at = next(i for i, line in enumerate(lines) if line.startswith("clip_range: "))
    assert "0.2" in lines[at] and "Surrogate clipping epsilon" in lines[at + 1]
    assert "normalize_advantage: bool = true" in result.output


def test_show_yaml_is_a_spec_that_validates(tmp_path):
    for name in registry.names():
        result = CliRunner().invoke(app, ["show", name, "--yaml"])
        assert result.exit_code == 0, result.output
        spec = tmp_path / f"{name}.yaml"
        spec.write_text(result.output)
        checked = CliRunner().invoke(app, ["validate", str(spec)])
        assert checked.exit_code == 0, (name, checked.output, result.output)
        assert f"algorithm: {name}" in result.output and "  # " in result.output  # documented defaults


def test_show_unknown_algorithm():
    result = CliRunner().invoke(app, ["show", "ppo2"])
    assert result.exit_code == 2 and "unknown algorithm 'ppo2'" in result.output


@pytest.mark.slow
def test_shell_completion_offers_spec_files_algorithms_and_set_keys():
    import os
    import subprocess
    import sys

    from tests.conftest import EXPERIMENTS

    def complete(words: str, index: int) -> list[str]:
        env = {**os.environ, "_LABFLEET_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(index)}
        done = subprocess.run([sys.executable, "-c", "from labfleet.cli import main; main()"], env=env,
                              cwd=EXPERIMENTS, capture_output=True, text=True, timeout=60)
        return done.stdout.split()

    assert "cartpole_ppo.yaml" in complete("labfleet run cartpole_p", 2)
    assert complete("labfleet show pp", 2) == ["ppo"]
    assert "hparams.clip_range=" in complete("labfleet run cartpole_ppo.yaml --set hparams.cl", 4)
