"""`labfleet validate`: every shipped spec passes; a corpus of malformed specs is refused with exit 2, the
file and the field named, no traceback, and nothing written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from labfleet.cli import app
from tests.conftest import EXPERIMENTS, REPO, run_cli

SHIPPED = sorted(p for p in EXPERIMENTS.rglob("*.yaml"))

BASE = {
    "name": "cartpole-test",
    "algorithm": "reinforce",
    "env": "CartPole-v1",
    "seeds": [0, 1],
    "budget": {"env_steps": 10000},
    "hparams": {"learning_rate": 0.001, "n_envs": 4, "gamma": 0.99},
}


def _set(path: str, value):
    def change(data: dict) -> dict:
        node = data
        parts = path.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        return data
    return change


def _drop(key: str):
    def change(data: dict) -> dict:
        data.pop(key)
        return data
    return change


# (case id, change to BASE, field path the message must name, a word the message must contain)
CORPUS = [
    ("unknown-top-field", _set("algoritm", "ppo"), "algoritm", "did you mean 'algorithm'"),
    ("missing-name", _drop("name"), "name", "missing"),
    ("name-with-space", _set("name", "my run"), "name", "letters, digits"),
    ("unknown-algorithm", _set("algorithm", "ppo2"), "algorithm", "available"),
    ("seeds-not-list", _set("seeds", "abc"), "seeds", "list"),
    ("negative-seed", _set("seeds", [-1]), "seeds.0", "greater than or equal"),
    ("duplicate-seeds", _set("seeds", [1, 1]), "seeds", "distinct"),
    ("empty-seeds", _set("seeds", []), "seeds", "at least 1"),
    ("missing-budget", _drop("budget"), "budget", "missing"),
    ("two-budgets", _set("budget", {"env_steps": 10, "epochs": 2}), "budget", "exactly one"),
    ("zero-budget", _set("budget", {"env_steps": 0}), "budget.env_steps", "greater than 0"),
    ("unknown-budget-field", _set("budget", {"steps": 10}), "budget.steps", "allowed: env_steps, epochs"),
    ("rl-budget-in-epochs", _set("budget", {"epochs": 3}), "budget.epochs", "env_steps"),
    ("unknown-hparam", _set("hparams.lr", 0.1), "hparams.lr", "allowed:"),
    ("gamma-above-one", _set("hparams.gamma", 1.5), "hparams.gamma", "less than or equal to 1"),
    ("lr-word", _set("hparams.learning_rate", "fast"), "hparams.learning_rate", "lin_"),
    ("lr-bad-lin", _set("hparams.learning_rate", "lin_abc"), "hparams.learning_rate", "lin_"),
    ("lr-negative", _set("hparams.learning_rate", -0.1), "hparams.learning_rate", "positive"),
    ("lin-and-schedule", lambda d: _set("hparams.lr_schedule", {"type": "exponential", "gamma": 0.9})(
        _set("hparams.learning_rate", "lin_0.001")(d)), "hparams", "already is a linear schedule"),
    ("optimizer-unknown", _set("hparams.optimizer", {"type": "adamax"}), "hparams.optimizer.type", "sgd"),
    ("nesterov-with-adam", _set("hparams.optimizer", {"type": "adam", "nesterov": True}), "hparams.optimizer",
     "nesterov"),
    ("schedule-unknown", _set("hparams.lr_schedule", {"type": "cosine"}), "hparams.lr_schedule", "step"),
    ("schedule-missing-field", _set("hparams.lr_schedule", {"type": "step"}), "hparams.lr_schedule.step_size",
     "missing"),
    ("zero-envs", _set("hparams.n_envs", 0), "hparams.n_envs", "greater than 0"),
    ("net-arch-not-list", _set("hparams.net_arch", 64), "hparams.net_arch", "list"),
    ("env-typo", _set("env", "CartPole-v9"), "env", "CartPole-v1"),
    ("env-missing", _drop("env"), "env", "needs an env"),
    ("env-bad-module", _set("env", "no_such_module_xyz:Env"), "env", "cannot import"),
    ("env-bad-kwargs", _set("env_kwargs", {"no_such_option": 1}), "env_kwargs", "could not be made"),
    ("dataset-for-rl", _set("dataset", "digits"), "dataset", "env"),
    ("observation-space", _set("env", "Blackjack-v1"), "algorithm", "observations"),
    ("zero-cpus", _set("resources", {"cpus_per_trial": 0}), "resources.cpus_per_trial", "greater than 0"),
    ("unknown-resource", _set("resources", {"gpu": 1}), "resources.gpu", "gpus_per_trial"),
    ("rollout-workers-must-divide", _set("resources", {"rollout_workers": 3}), "resources.rollout_workers",
     "must divide hparams.n_envs (4)"),
    ("ddpg-needs-continuous", _set("algorithm", "ddpg"), "algorithm", "continuous action space"),
    ("qlearning-needs-discrete-obs", _set("algorithm", "qlearning"), "algorithm", "discrete observations"),
    ("value-iteration-needs-model", lambda d: _set("budget", {"iterations": 10})(
        _set("hparams", {})(_set("algorithm", "value_iteration")(d))), "algorithm", "transition model"),
    ("ppo-batch-too-large", lambda d: _set("hparams", {"n_envs": 2, "n_steps": 8, "batch_size": 64})(
        _set("algorithm", "ppo")(d)), "hparams", "batch_size (64) exceeds n_envs * n_steps (16)"),
    ("zero-eval-episodes", _set("eval", {"episodes": 0}), "eval.episodes", "greater than 0"),
    ("bad-device", _set("device", "tpu"), "device", "cuda:N"),
    ("tracking-typo", _set("tracking", {"url": "x"}), "tracking.url", "uri"),
    ("sweep-direction", _set("sweep", {"direction": "up"}), "sweep.direction", "maximize"),
    ("sweep-log-low-zero", _set("sweep", {"space": {"hparams.learning_rate": {"type": "float", "low": 0,
                                                                               "high": 1, "log": True}}}),
     "sweep.space.hparams.learning_rate", "low > 0"),
    ("sweep-categorical-empty", _set("sweep", {"space": {"hparams.gamma": {"type": "categorical"}}}),
     "sweep.space.hparams.gamma", "choices"),
]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(EXPERIMENTS)))
def test_shipped_specs_validate(path: Path) -> None:
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert "ok:" in result.output


def _check_refused(result, spec_file: Path, field: str, word: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines, "no problem was printed"
    wanted = f"{spec_file}: {field}: "
    matching = [line for line in lines if line.startswith(wanted)]
    assert matching, f"no line starts with {wanted!r}:\n{result.output}"
    assert any(word in line for line in matching), f"{word!r} not in {matching}"


@pytest.mark.parametrize(("change", "field", "word"), [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS])
def test_malformed_spec_is_refused(tmp_path: Path, change, field: str, word: str) -> None:
    import copy

    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(change(copy.deepcopy(BASE)), sort_keys=False))
    result = CliRunner().invoke(app, ["validate", str(spec_file)])
    _check_refused(result, spec_file, field, word)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"], "validate wrote a file"


def test_corpus_is_large_enough() -> None:
    assert len(CORPUS) >= 25


def test_problem_names_the_yaml_line(tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text("name: x\nalgorithm: reinforce\nenv: CartPole-v1\nbudget: {env_steps: 100}\n"
                         "hparams:\n  n_envs: 4\n  gamma: 7\n")
    result = CliRunner().invoke(app, ["validate", str(spec_file)])
    assert result.exit_code == 2
    assert f"{spec_file}: hparams.gamma: " in result.output
    assert "(line 7)" in result.output


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text("name: x\nalgorithm: [reinforce\nenv: CartPole-v1\n")
    result = CliRunner().invoke(app, ["validate", str(spec_file)])
    assert result.exit_code == 2
    assert f"{spec_file}: line " in result.output and "invalid YAML" in result.output


def test_top_level_must_be_mapping(tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text("- a\n- b\n")
    result = CliRunner().invoke(app, ["validate", str(spec_file)])
    assert result.exit_code == 2 and "expected a mapping" in result.output


def test_missing_file(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "cannot read file" in result.output


def test_every_problem_of_a_spec_is_listed(tmp_path: Path) -> None:
    data = {**BASE, "seeds": [1, 1], "hparams": {"gamma": 2, "n_envs": 0}}
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(data))
    result = CliRunner().invoke(app, ["validate", str(spec_file)])
    assert result.exit_code == 2
    for field in ("seeds", "hparams.gamma", "hparams.n_envs"):
        assert f"{spec_file}: {field}: " in result.output


def test_bad_set_option(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["validate", str(EXPERIMENTS / "cartpole_reinforce.yaml"), "--set", "novalue"])
    assert result.exit_code == 2 and "--set: novalue: expected KEY=VALUE" in result.output


def test_set_override_is_validated(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["validate", str(EXPERIMENTS / "cartpole_reinforce.yaml"),
                                      "--set", "hparams.gamma=3"])
    assert result.exit_code == 2 and "hparams.gamma" in result.output


def test_real_process_exit_code_and_stderr(tmp_path: Path) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump({**BASE, "algorithm": "nope"}))
    result = run_cli("validate", str(spec_file), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith(f"{spec_file}: algorithm: unknown algorithm 'nope'")
    assert "Traceback" not in result.stderr + result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


def test_suite_problems_name_the_entry_file(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**BASE, "hparams": {"gamma": 9}}))
    suite_file = tmp_path / "suite.yaml"
    suite_file.write_text(yaml.safe_dump({"name": "s", "experiments": [{"spec": "bad.yaml"},
                                                                       {"spec": "missing.yaml"}]}))
    result = CliRunner().invoke(app, ["validate", str(suite_file)])
    assert result.exit_code == 2
    assert f"{tmp_path / 'bad.yaml'}: hparams.gamma: " in result.output
    assert f"{suite_file}: experiments.1.spec: no such file" in result.output


def test_readme_exists_with_two_commands() -> None:
    text = (REPO / "README.md").read_text()
    assert "labfleet suite experiments/quickstart.yaml" in text
    assert "pytest" in text
