"""Hostile and careless input (issue 14, section 6): every case exits 2 naming the file and the field, with
no traceback, nothing written and nothing that the spec names called; a fuzz test of the loader."""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from labfleet.cli import app
from labfleet.spec.loading import parse_set_options, parse_yaml
from tests.conftest import run_cli
from tests.spec.test_validate import BASE, _check_refused, _set

SWEEP = {"metric": "eval/return_mean", "n_trials": 2,
         "space": {"hparams.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}}


def _write(tmp_path: Path, data: dict) -> Path:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(data, sort_keys=False))
    return spec_file


def test_env_that_names_a_function_is_never_called(tmp_path: Path) -> None:
    """`env: "os:system"` used to run its `env_kwargs.command` inside `labfleet validate`."""
    marker = tmp_path / "owned"
    spec_file = _write(tmp_path, {**BASE, "env": "os:system", "env_kwargs": {"command": f"touch {marker}"}})
    result = run_cli("validate", str(spec_file), cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert f"{spec_file}: env: os:system must name a gymnasium.Env subclass" in result.stderr
    assert not marker.exists(), "validate ran the command the spec named"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


def test_run_refuses_a_function_env_before_anything_starts(tmp_path: Path) -> None:
    marker = tmp_path / "owned"
    spec_file = _write(tmp_path, {**BASE, "env": "subprocess:call", "env_kwargs": {"args": ["touch", str(marker)]}})
    result = run_cli("run", str(spec_file), cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"], "run wrote a file"


@pytest.mark.parametrize(("env", "word"), [
    ("collections:OrderedDict", "the class OrderedDict"),           # a class, but not an environment
    ("gymnasium.wrappers:TimeLimit", "the class TimeLimit"),        # a wrapper is not an environment
    ("gymnasium.envs.classic_control.cartpole:CartPoleEnv", None),  # a real Env subclass is fine
])
def test_only_env_subclasses_are_made(tmp_path: Path, env: str, word: str | None) -> None:
    result = CliRunner().invoke(app, ["validate", str(_write(tmp_path, {**BASE, "env": env}))])
    if word is None:
        assert result.exit_code == 0, result.output
    else:
        _check_refused(result, tmp_path / "spec.yaml", "env", word)


def test_custom_env_resolves_next_to_the_spec(tmp_path: Path) -> None:
    """`env: myenvs.grid:Grid` is found beside the spec, whatever the working directory."""
    project = tmp_path / "proj"
    (project / "myenvs").mkdir(parents=True)
    (project / "myenvs" / "__init__.py").write_text("")
    (project / "myenvs" / "grid.py").write_text(
        "import gymnasium as gym\nimport numpy as np\n\n"
        "class Grid(gym.Env):\n"
        "    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)\n"
        "    action_space = gym.spaces.Discrete(2)\n"
        "    def reset(self, *, seed=None, options=None):\n"
        "        super().reset(seed=seed)\n"
        "        return np.zeros(2, np.float32), {}\n"
        "    def step(self, action):\n"
        "        return np.zeros(2, np.float32), 1.0, True, False, {}\n")
    (project / "own_env.yaml").write_text(yaml.safe_dump({**BASE, "env": "myenvs.grid:Grid"}))
    result = run_cli("validate", "proj/own_env.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("content", "word"), [
    (b"\x00\x01\xff\xfe binary", "not UTF-8"),
    ("name: x\nalgorithm: reinforce\n".encode("utf-16"), "not UTF-8"),
    (b"name: caf\xe9\n", "byte 9 (line 1)"),
    (("a: " + "[" * 3000 + "]" * 3000 + "\n").encode(), "nested too deeply"),
    (b"name: x\nseeds: [0]\nname: y\n", "duplicate key 'name' (first given on line 1)"),
    (b"name: x\nhparams:\n  gamma: 0.9\n  gamma: 0.5\n", "duplicate key 'gamma'"),
])
def test_unreadable_files_are_refused(tmp_path: Path, content: bytes, word: str) -> None:
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_bytes(content)
    result = CliRunner().invoke(app, ["validate", str(spec_file)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.output.startswith(f"{spec_file}: ") and word in result.output, result.output


CASES = [
    ("absurd-n-envs", _set("hparams.n_envs", 1_000_000_000), "hparams.n_envs", "less than or equal to 16384"),
    ("absurd-buffer", lambda d: {**d, "algorithm": "dqn", "hparams": {"buffer_size": 10 ** 10}},
     "hparams.buffer_size", "less than or equal"),
    ("absurd-batch", lambda d: {**d, "algorithm": "ppo", "hparams": {"batch_size": 10 ** 9}},
     "hparams.batch_size", "less than or equal"),
    ("absurd-width", _set("hparams.net_arch", [64, 10 ** 8]), "hparams.net_arch.1", "less than or equal"),
    ("sweep-path-missing", lambda d: {**d, "sweep": {**SWEEP, "space": {"hparams.no_such": {
        "type": "float", "low": 0.1, "high": 0.2}}}}, "sweep.space.hparams.no_such", "unknown field"),
    ("sweep-float-for-int", lambda d: {**d, "sweep": {**SWEEP, "space": {"hparams.n_envs": {
        "type": "float", "low": 2.0, "high": 8.0}}}}, "sweep.space.hparams.n_envs", "integer"),
    ("sweep-objective-never-logged", lambda d: {**d, "sweep": {**SWEEP, "metric": "eval/retrun_mean"}},
     "sweep.metric", "eval/return_mean, eval/return_std"),
    ("tracking-scheme", _set("tracking", {"uri": "ftp://example/store"}), "tracking.uri", "unsupported"),
    # an experiment name becomes a directory under the store's artifact root, and is printed
    ("experiment-traversal", _set("tracking", {"experiment": "../../../../X/escape"}), "tracking.experiment",
     "not a valid experiment or study name"),
    ("experiment-markup", _set("tracking", {"experiment": "lab[/x]runs"}), "tracking.experiment",
     "not a valid experiment or study name"),
    ("experiment-escape", _set("tracking", {"experiment": "lab\x1b]8;;http://x\x1b\\runs"}), "tracking.experiment",
     "not a valid experiment"),
    ("study-traversal", lambda d: {**d, "sweep": {**SWEEP, "study_name": "a/../../b"}}, "sweep.study_name",
     "not a valid experiment or study name"),
    ("name-final-newline", _set("name", "good\n"), "name", "not a valid name"),
    ("device-final-newline", _set("device", "cpu\n"), "device", "expected auto, cpu"),
    ("cuda-without-a-gpu", _set("device", "cuda"), "device", "needs resources.gpus_per_trial above 0"),
    ("gan-pac", lambda d: {"name": "g", "algorithm": "gan", "dataset": "ring8", "budget": {"iterations": 10},
                           "hparams": {"batch_size": 30, "pac": 4}}, "hparams.pac", "multiple of pac (4)"),
    ("gan-pac-per-worker", lambda d: {"name": "g", "algorithm": "gan", "dataset": "ring8",
                                      "budget": {"iterations": 10}, "hparams": {"batch_size": 48, "pac": 4},
                                      "resources": {"data_parallel": 8}}, "hparams.pac", "48 / data_parallel 8 = 6"),
    ("seeds-per-actor-with-pbt", lambda d: {**d, "resources": {"seeds_per_actor": 2}, "sweep": {
        **SWEEP, "scheduler": {"type": "pbt", "perturbation_interval": 100, "mutations": {
            "hparams.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}}}}},
     "resources.seeds_per_actor", "use 1 with sweep.scheduler"),
    ("share-actors-shape", lambda d: {**d, "resources": {"seeds_per_actor": 4}, "sweep": {
        **SWEEP, "share_actors": True, "space": {"hparams.n_envs": {"type": "int", "low": 2, "high": 8}}}},
     "sweep.space.hparams.n_envs", "takes per seed: hparams.ent_coef, hparams.gamma"),
    ("share-actors-rollout-workers", lambda d: {**d, "resources": {"seeds_per_actor": 4, "rollout_workers": 2},
                                                "sweep": {**SWEEP, "share_actors": True}},
     "resources.rollout_workers", "use 0 with sweep.share_actors"),
    ("share-actors-one-seed-an-actor", lambda d: {**d, "sweep": {**SWEEP, "share_actors": True}},
     "resources.seeds_per_actor", "set it to 2 or more"),
    ("share-actors-unbatched", lambda d: {"name": "e", "algorithm": "es", "env": "CartPole-v1",
                                          "budget": {"env_steps": 1000}, "resources": {"seeds_per_actor": 2},
                                          "sweep": {**SWEEP, "share_actors": True}},
     "sweep.share_actors", "no batched trainer"),
    ("seeds-per-actor-data-parallel", lambda d: {"name": "g", "algorithm": "gan", "dataset": "ring8",
                                                 "budget": {"iterations": 10},
                                                 "resources": {"data_parallel": 2, "seeds_per_actor": 2}},
     "resources.seeds_per_actor", "cannot also train data-parallel"),
]


@pytest.mark.parametrize(("change", "field", "word"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_spec_is_refused(tmp_path: Path, change, field: str, word: str) -> None:
    spec_file = _write(tmp_path, change(copy.deepcopy(BASE)))
    _check_refused(CliRunner().invoke(app, ["validate", str(spec_file)]), spec_file, field, word)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"], "validate wrote a file"


def test_set_values_parse_like_numbers() -> None:
    """YAML 1.1 reads 3e-4 and 1e5 as strings; specs and --set read them as numbers."""
    assert parse_set_options(["hparams.learning_rate=3e-4", "budget.env_steps=1e5", "x=1_000", "y=.5",
                              "z=-2E+3", "w=abc", "v=1.0e-5"]) == {
        "hparams.learning_rate": 3e-4, "budget.env_steps": 1e5, "x": 1000, "y": 0.5, "z": -2000.0, "w": "abc",
        "v": 1e-5}
    assert parse_yaml("lr: 3e-4\nsteps: 1e5\nname: 1e5x\n")[0] == {"lr": 3e-4, "steps": 1e5, "name": "1e5x"}


def test_documented_set_command_validates_and_says_from_set(tmp_path: Path) -> None:
    from tests.conftest import EXPERIMENTS

    spec = str(EXPERIMENTS / "cartpole_ppo.yaml")
    ok = CliRunner().invoke(app, ["validate", spec, "--set", "hparams.learning_rate=3e-4",
                                  "--set", "budget.env_steps=1e5"])
    assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(app, ["validate", spec, "--set", "hparams.gamma=3e4"])
    assert bad.exit_code == 2
    assert f"{spec}: hparams.gamma: Input should be less than or equal to 1 (from --set)" in bad.output


# --- fuzz: whatever the bytes, validate exits 0 or 2 and prints no traceback -----------------------

_runner = CliRunner()


def _validate_bytes(tmp_path: Path, content: bytes) -> None:
    spec_file = tmp_path / "fuzz.yaml"
    spec_file.write_bytes(content)
    result = _runner.invoke(app, ["validate", str(spec_file)])
    assert result.exit_code in (0, 2), (content, result.output, result.exception)
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), \
        repr(result.exception)


_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=12))
_keys = st.one_of(st.sampled_from(["name", "algorithm", "env", "seeds", "budget", "hparams", "env_steps",
                                   "n_envs", "sweep", "space", "experiments", "spec", "resources", "eval"]),
                  st.text(max_size=8))
_documents = st.recursive(_scalars, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(_keys, children, max_size=5)), max_leaves=20)
_fuzz = settings(max_examples=150, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])


@_fuzz
@given(content=st.binary(max_size=200))
def test_fuzz_arbitrary_bytes(tmp_path: Path, content: bytes) -> None:
    _validate_bytes(tmp_path, content)


@pytest.mark.slow
@_fuzz
@given(document=st.dictionaries(_keys, _documents, max_size=6))
def test_fuzz_arbitrary_yaml_documents(tmp_path: Path, document: dict) -> None:
    """Both alone and laid over a valid spec, so that the fuzz reaches the algorithm's own checks."""
    for data in (document, {**BASE, **document}):
        _validate_bytes(tmp_path, yaml.safe_dump(data, allow_unicode=True).encode())


def test_unreachable_address_fails_within_seconds(tmp_path: Path) -> None:
    import time

    from tests.conftest import EXPERIMENTS

    started = time.monotonic()
    result = run_cli("run", str(EXPERIMENTS / "cartpole_reinforce.yaml"), "--address", "127.0.0.1:9",
                     cwd=tmp_path, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "--address: no Ray cluster answers at 127.0.0.1:9" in result.stderr
    assert time.monotonic() - started < 30
    assert list(tmp_path.iterdir()) == [], "run wrote a file"


def test_a_training_function_cannot_share_its_actor_between_seeds(tmp_path: Path) -> None:
    from tests.conftest import EXPERIMENTS

    result = run_cli("validate", str(EXPERIMENTS / "custom" / "digits_function.yaml"), "--set",
                     "resources.seeds_per_actor=2", cwd=tmp_path)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "resources.seeds_per_actor" in result.stdout + result.stderr
    assert "training function" in result.stdout + result.stderr


@pytest.mark.slow
def test_user_text_is_neither_markup_nor_raw_terminal_escapes(tmp_path: Path) -> None:
    """A training function's error with rich markup and an OSC-8 link in it: the summary prints it as
    written (no MarkupError after the runs finished), with the escape shown, not sent to the terminal."""
    (tmp_path / "boom.py").write_text("def main(config, ctx):\n"
                                      "    raise ValueError('bad [/x] \\x1b]8;;http://evil\\x1b\\\\ link \\u202e')\n")
    spec_file = _write(tmp_path, {"name": "boom", "algorithm": "boom:main", "seeds": [0],
                                  "budget": {"iterations": 1}, "resources": {"max_retries": 0}})
    result = run_cli("run", str(spec_file), "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", cwd=tmp_path)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "Traceback" not in out and "MarkupError" not in out
    assert "bad [/x]" in result.stdout
    assert "\x1b]8" not in out and "\u202e" not in out
    assert "\\x1b]8" in result.stdout  # shown as an escape


@pytest.mark.parametrize("uri", ["postgresql://u:PW@h:5432/db?sslmode=require&password=PW",
                                 "postgresql://h/db?password=PW", "http://u:PW@h:5000/?token=PW",
                                 "http://u:s3c/PW@h:5000"])
def test_redacted_uris_hold_no_password(uri: str) -> None:
    from labfleet.tracking.uri import redact_uri

    shown = redact_uri(uri)
    assert "PW" not in shown, shown
    assert redact_uri("sqlite:///mlflow.db") == "sqlite:///mlflow.db"


@pytest.mark.parametrize("value", ["0", "-5", "nan", "inf", "1"])
def test_reconcile_refuses_a_stale_after_that_would_end_live_drivers_runs(tmp_path: Path, value: str) -> None:
    result = CliRunner().invoke(app, ["reconcile", f"--stale-after={value}", "--tracking-uri",
                                      f"sqlite:///{tmp_path / 'm.db'}"])
    assert result.exit_code == 2, result.output
    assert "--stale-after: expected seconds, at least 60" in result.output
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target", ["it's", "a\"b", "both'\""])
def test_report_targets_with_quotes_are_looked_up_not_pasted(tmp_path: Path, target: str) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    MlflowClient(uri).create_experiment("present")
    result = CliRunner().invoke(app, ["report", target, "--tracking-uri", uri, "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "labfleet report: TARGET:" in result.output


def _laughs(anchor_at: str) -> str:
    """Nine aliases of nine aliases, eight levels deep (43 million values), hung under `anchor_at`."""
    lines = [f"{anchor_at}:", "  l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 8)]
    return "\n".join(lines) + "\n"


BOMBS = [
    ("function-hparams", "name: f\nalgorithm: mymod:main\nseeds: [0]\nbudget: {iterations: 1}\n" + _laughs("hparams")),
    ("dataset-kwargs", "name: v\nalgorithm: vae\ndataset: digits\nbudget: {epochs: 1}\n" + _laughs("dataset_kwargs")),
    ("categorical-choices", "name: p\nalgorithm: ppo\nenv: CartPole-v1\n" + _laughs("x")
     + "sweep:\n  metric: eval/return_mean\n  space:\n    hparams.gamma: {type: categorical, choices: *l7}\n"),
    ("circular", "name: c\nalgorithm: reinforce\nenv: CartPole-v1\nhparams: &h\n  n_envs: *h\n"),
    ("suite-of-aliases", "name: s\ne: &e {spec: spec.yaml}\nexperiments:\n" + "  - *e\n" * 50_000),
]


@pytest.mark.parametrize("text", [b[1] for b in BOMBS], ids=[b[0] for b in BOMBS])
def test_alias_bombs_are_refused_before_they_expand(tmp_path: Path, text: str) -> None:
    import resource

    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(text)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = CliRunner().invoke(app, ["validate", str(bomb)])
    assert result.exit_code == 2, result.output
    assert f"{bomb}: invalid YAML:" in result.output
    assert "alias" in result.output or "contains itself" in result.output
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB on Linux
    assert grown < 200_000, f"validation grew the process by {grown} KiB"


def test_counts_are_bounded(tmp_path: Path) -> None:
    """Without aliases: 1001 categorical choices and a suite of 501 entries are refused by count."""
    spec = _write(tmp_path, {**BASE, "sweep": {**SWEEP, "space": {"hparams.gamma": {
        "type": "categorical", "choices": [0.9 + i * 1e-5 for i in range(1001)]}}}})
    result = CliRunner().invoke(app, ["validate", str(spec)])
    assert result.exit_code == 2 and "sweep.space.hparams.gamma.choices" in result.output, result.output
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"name": "s", "experiments": [{"spec": "spec.yaml"}] * 501}))
    result = CliRunner().invoke(app, ["validate", str(suite)])
    assert result.exit_code == 2 and "experiments" in result.output and "500" in result.output, result.output


def test_a_suite_naming_a_device_or_a_huge_file_reads_at_most_a_page(tmp_path: Path) -> None:
    huge = tmp_path / "huge.yaml"
    with open(huge, "wb") as handle:  # a sparse 8 GiB file: reading it whole would take the machine down
        handle.truncate(8 << 30)
    suite = tmp_path / "suite.yaml"
    suite.write_text(yaml.safe_dump({"name": "s", "experiments": [{"spec": str(huge)}, {"spec": "/dev/zero"}]}))
    result = CliRunner().invoke(app, ["validate", str(suite)])
    assert result.exit_code == 2, result.output
    assert f"{huge}: the file has more than" in result.output
    assert "/dev/zero" in result.output


@pytest.mark.parametrize("option", [["--set", "tracking.uri=http://u:PW@127.0.0.1:5000"],
                                    ["--set", "env_kwargs.url=postgresql://u:PW@h/db"],
                                    ["--tracking-uri", "http://u:s3c/PW@127.0.0.1:5000"],
                                    ["--tracking-uri", "postgresql://h/db?password=PW"]])
def test_submit_refuses_a_password_on_the_jobs_command_line(tmp_path: Path, option: list[str]) -> None:
    spec_file = _write(tmp_path, BASE)
    result = CliRunner().invoke(app, ["submit", str(spec_file), "--address", "http://127.0.0.1:1", *option])
    assert result.exit_code == 2, result.output
    assert "holds a password" in result.output and "PW" not in result.output


def test_a_submission_ships_no_secrets_and_follows_no_link_outside(tmp_path: Path) -> None:
    """What Ray's own packaging makes of the submitted directory with labfleet's excludes: no dotenv file,
    no key, and nothing behind a link that leads out of the directory."""
    import zipfile

    from ray._private.runtime_env.packaging import create_package

    from labfleet.orchestration.jobs import shipping_excludes

    work, home = tmp_path / "work", tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("PRIVATE KEY")
    work.mkdir()
    _write(work, BASE)
    (work / ".env").write_text("MLFLOW_TRACKING_PASSWORD=PW\n")
    (work / "keys").symlink_to(home / ".ssh")
    (work / "data").mkdir()
    (work / "data" / "inside.txt").write_text("kept")
    (work / "alias").symlink_to(work / "data")  # a link inside the directory is fine
    excludes, outside = shipping_excludes(work)
    assert outside == [("/keys", str((home / ".ssh").resolve()))]
    package = tmp_path / "package.zip"
    create_package(str(work), package, include_gitignore=True, excludes=excludes)
    names = zipfile.ZipFile(package).namelist()
    assert "spec.yaml" in names and "data/inside.txt" in names, names
    assert not [n for n in names if ".env" in n or "id_ed25519" in n or n.startswith("keys")], names


def test_params_and_the_logged_spec_hold_no_password() -> None:
    from labfleet.tracking.runs import flatten, redact_tree

    spec = {"env_kwargs": {"db": "postgresql://u:PW@h/db", "api": "https://h/x?token=PW"},
            "tracking": {"uri": "http://u:PW@h:5000"}, "hparams": {"password": "PW"}}
    assert "PW" not in json.dumps(flatten(spec))
    assert "PW" not in json.dumps({k: v for k, v in redact_tree(spec).items() if k != "hparams"})


@pytest.mark.parametrize("uri", ["http://127.0.0.1:99999", "http://127.0.0.1:abc", "http://[::1:5000",
                                 "http://u:s3c/PW@h:5000", "postgresql://u:PW@h:70000/db", "sqlite:///a\nb.db"])
def test_malformed_tracking_uris_are_bad_input_and_show_no_password(tmp_path: Path, uri: str) -> None:
    spec_file = _write(tmp_path, BASE)
    for args in (["validate", str(spec_file), "--set", f"tracking.uri={json.dumps(uri)}"],
                 ["run", str(spec_file), "--tracking-uri", uri]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, result.output
        assert "tracking.uri" in result.output or "--tracking-uri" in result.output, result.output
        assert "PW" not in result.output and "s3c" not in result.output, result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spec.yaml"]


def test_report_out_naming_a_file_is_bad_input(tmp_path: Path) -> None:
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    result = CliRunner().invoke(app, ["report", "x", "--out", str(taken), "--tracking-uri",
                                      f"sqlite:///{tmp_path / 'm.db'}"])
    assert result.exit_code == 2, result.output
    assert "--out" in result.output and "is a file" in result.output
    assert taken.read_text() == "mine"


def _damaged_stores(directory: Path) -> dict[str, Path]:
    """SQLite files a careless colleague or a full disk leaves: garbage, a truncated store, a half-made one
    (tables but no schema version), one of another schema version."""
    import sqlite3

    from mlflow.tracking import MlflowClient

    stores = {name: directory / f"{name}.db" for name in ("garbage", "truncated", "half", "other-version")}
    stores["garbage"].write_bytes(bytes(range(256)) * 20)
    good = directory / "good.db"
    MlflowClient(f"sqlite:///{good}").search_experiments()
    data = good.read_bytes()
    stores["truncated"].write_bytes(data[: len(data) // 2])
    with contextlib.closing(sqlite3.connect(stores["half"])) as db:
        db.execute("CREATE TABLE experiments (x)")
        db.commit()
    with contextlib.closing(sqlite3.connect(stores["other-version"])) as db:
        db.execute("CREATE TABLE alembic_version (version_num)")
        db.execute("INSERT INTO alembic_version VALUES ('0123abcd')")
        db.commit()
    return stores


@pytest.mark.slow
def test_damaged_stores_are_refused_at_once_before_ray_starts(tmp_path: Path) -> None:
    import time as _time

    spec_file = _write(tmp_path, BASE)
    for name, store in _damaged_stores(tmp_path).items():
        before = store.read_bytes()
        started = _time.monotonic()
        result = CliRunner().invoke(app, ["run", str(spec_file), "--tracking-uri", f"sqlite:///{store}"])
        assert result.exit_code == 2, (name, result.output)
        assert f"tracking.uri: {store}" in result.output or str(store) in result.output, (name, result.output)
        assert _time.monotonic() - started < 60, f"{name}: MLflow's retries ran"
        assert store.read_bytes() == before, f"{name}: the store was written"
    result = CliRunner().invoke(app, ["sweep", str(_write(tmp_path, {**BASE, "sweep": SWEEP})), "--storage",
                                      f"sqlite:///{tmp_path / 'garbage.db'}", "--tracking-uri",
                                      f"sqlite:///{tmp_path / 'fresh.db'}"])
    assert result.exit_code == 2 and "--storage" in result.output, result.output
    assert not (tmp_path / "fresh.db").exists(), "a store was made before the storage was refused"


@pytest.mark.slow
def test_a_locked_storage_is_refused_in_seconds(tmp_path: Path) -> None:
    import sqlite3

    storage = tmp_path / "optuna.db"
    holder = sqlite3.connect(storage, isolation_level=None)
    holder.execute("CREATE TABLE studies (x)")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        result = CliRunner().invoke(app, ["sweep", str(_write(tmp_path, {**BASE, "sweep": SWEEP})), "--storage",
                                          f"sqlite:///{storage}", "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"])
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert result.exit_code == 2, result.output
    assert "locked by another process" in result.output
    assert not (tmp_path / "m.db").exists()


def _no_crash(result) -> None:
    assert result.exit_code in (0, 2), (result.output, result.exception)
    assert "Traceback" not in result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), \
        repr(result.exception)


_entry = st.fixed_dictionaries({"spec": st.sampled_from(["spec.yaml", "missing.yaml", "../spec.yaml", "",
                                                         "/dev/zero"])},
                                optional={"set": st.dictionaries(_keys, _documents, max_size=3),
                                          "sweep": st.booleans()})


@_fuzz
@given(suite=st.fixed_dictionaries({"experiments": st.lists(_entry, max_size=4)},
                                   optional={"name": st.text(max_size=10), "tracking": st.dictionaries(
                                       st.sampled_from(["experiment", "uri", "other"]), _scalars, max_size=2)}))
def test_fuzz_suites(tmp_path: Path, suite: dict) -> None:
    _write(tmp_path, BASE)
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(suite))
    _no_crash(_runner.invoke(app, ["validate", str(path)]))


_space = st.dictionaries(st.sampled_from(["hparams.learning_rate", "hparams.gamma", "hparams.n_envs", "seeds",
                                          "hparams", "x.y"]),
                         st.dictionaries(st.sampled_from(["type", "low", "high", "log", "step", "choices"]),
                                         _documents, max_size=4), max_size=3)


@_fuzz
@given(sweep=st.fixed_dictionaries({"space": _space}, optional={
    "metric": st.sampled_from(["eval/return_mean", "eval/nope", ""]), "n_trials": _scalars,
    "max_parallel": _scalars, "sampler": st.dictionaries(st.sampled_from(["type", "seed"]), _scalars, max_size=2),
    "pruner": st.dictionaries(st.sampled_from(["type", "lower"]), _scalars, max_size=2),
    "study_name": st.text(max_size=12), "storage": st.text(max_size=20)}))
def test_fuzz_sweeps(tmp_path: Path, sweep: dict) -> None:
    _no_crash(_runner.invoke(app, ["validate", str(_write(tmp_path, {**BASE, "sweep": sweep}))]))


_uris = st.one_of(st.text(max_size=30), st.builds(
    lambda scheme, user, host, port, rest: f"{scheme}://{user}{host}{port}{rest}",
    st.sampled_from(["http", "https", "sqlite", "postgresql", "file", "ftp", ""]),
    st.sampled_from(["", "u@", "u:p/w@", "u:p@"]), st.sampled_from(["127.0.0.1", "[::1", "[::1]", "h"]),
    st.sampled_from(["", ":5000", ":99999", ":x"]), st.text(max_size=10)))


@_fuzz
@given(items=st.lists(st.text(max_size=30), max_size=3), uri=_uris)
def test_fuzz_set_options_and_tracking_uris(tmp_path: Path, items: list[str], uri: str) -> None:
    spec = _write(tmp_path, BASE)
    args = [arg for item in items for arg in ("--set", item)]
    _no_crash(_runner.invoke(app, ["validate", str(spec), *args]))
    _no_crash(_runner.invoke(app, ["validate", str(spec), "--set", f"tracking.uri={json.dumps(uri)}"]))
    if "\x00" not in uri:
        result = _runner.invoke(app, ["reconcile", "--tracking-uri", uri, "--dry-run"])
        assert result.exit_code in (0, 2), (uri, result.output, result.exception)


@_fuzz
@given(target=st.text(max_size=20))
def test_fuzz_report_targets(tmp_path: Path, empty_store: Path, target: str) -> None:
    import shutil

    store = tmp_path / "m.db"
    if not store.exists():
        shutil.copyfile(empty_store, store)
    result = _runner.invoke(app, ["report", target, "--tracking-uri", f"sqlite:///{store}", "--out",
                                  str(tmp_path / "out")])
    assert result.exit_code == 2, (target, result.output, result.exception)
    assert "Traceback" not in result.output


def test_a_database_without_its_driver_module_is_bad_input(tmp_path: Path) -> None:
    spec_file = _write(tmp_path, {**BASE, "sweep": SWEEP})
    for args, field in ((["run", str(spec_file), "--tracking-uri", "mysql://root@127.0.0.1/test"], "tracking.uri"),
                        (["validate", str(spec_file), "--set", "sweep.storage=mysql://root@127.0.0.1/test"],
                         "sweep.storage")):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2, result.output
        assert field in result.output and "needs the Python module MySQLdb" in result.output, result.output
