"""`labfleet zoo-import`: an rl-baselines3-zoo hyperparameter file (its format: `!!float` tags, the zoo's own
keys, policy_kwargs as a Python expression) becomes a spec that validates; what labfleet cannot take is
named; policy_kwargs is parsed, never evaluated."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from labfleet.cli import app
from labfleet.spec.zoo import parse_policy_kwargs

ZOO_PPO = """\
atari:
  env_wrapper:
    - stable_baselines3.common.atari_wrappers.AtariWrapper
  frame_stack: 4
  policy: 'CnnPolicy'
  n_envs: 8
  n_timesteps: !!float 1e7
CartPole-v1:
  n_envs: 8
  n_timesteps: !!float 1e5
  policy: 'MlpPolicy'
  n_steps: 32
  batch_size: 256
  gae_lambda: 0.8
  gamma: 0.98
  n_epochs: 20
  ent_coef: 0.0
  learning_rate: lin_0.001
  clip_range: lin_0.2
Pendulum-v1:
  normalize: true
  n_envs: 4
  n_timesteps: !!float 1e5
  policy: 'MlpPolicy'
  n_steps: 1024
  gae_lambda: 0.95
  gamma: 0.9
  learning_rate: !!float 1e-3
  use_sde: True
  policy_kwargs: "dict(log_std_init=-2, activation_fn=nn.ReLU, net_arch=dict(pi=[256, 256], vf=[256, 256]))"
Evil-v0:
  policy_kwargs: "__import__('os').system('touch {marker}')"
"""


def _zoo(tmp_path: Path) -> Path:
    path = tmp_path / "ppo.yml"
    path.write_text(ZOO_PPO.replace("{marker}", str(tmp_path / "owned")))
    return path


def test_a_zoo_entry_becomes_a_spec_that_validates(tmp_path: Path):
    out = tmp_path / "cartpole.yaml"
    result = CliRunner().invoke(app, ["zoo-import", str(_zoo(tmp_path)), "CartPole-v1", "ppo", "--out", str(out)])
    assert result.exit_code == 0, result.output
    spec = yaml.safe_load(out.read_text())
    assert spec["budget"] == {"env_steps": 100000} and spec["env"] == "CartPole-v1"
    assert spec["hparams"]["learning_rate"] == "lin_0.001" and spec["hparams"]["n_epochs"] == 20
    checked = CliRunner().invoke(app, ["validate", str(out)])
    assert checked.exit_code == 0, checked.output


def test_what_labfleet_cannot_take_is_named(tmp_path: Path):
    out = tmp_path / "pendulum.yaml"
    result = CliRunner().invoke(app, ["zoo-import", str(_zoo(tmp_path)), "Pendulum-v1", "ppo", "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    spec = yaml.safe_load(text)
    assert spec["hparams"]["net_arch"] == [256, 256] and spec["hparams"]["activation"] == "relu"
    for word in ("use_sde=True", "log_std_init=-2"):
        assert word in text, word  # in the spec's comments
    assert spec["hparams"]["normalize"] == {"obs": True, "reward": True}
    assert CliRunner().invoke(app, ["validate", str(out)]).exit_code == 0


def test_atari_wrappers_frame_stacking_and_normalize_settings_are_mapped(tmp_path: Path):
    """SB3's AtariWrapper becomes gymnasium's AtariPreprocessing with train-only reward clipping, then the
    frame stack; CnnPolicy the Nature CNN; a normalize dict(...) is parsed, never evaluated."""
    zoo = tmp_path / "ppo.yml"
    zoo.write_text(ZOO_PPO.replace("atari:", "ALE/Pong-v5:") + """MountainCarContinuous-v0:
  normalize: "dict(norm_obs=True, norm_reward=False)"
  n_timesteps: 20000
  env_wrapper:
    - no_such_package.wrappers.Whatever
""")
    out = tmp_path / "pong.yaml"
    result = CliRunner().invoke(app, ["zoo-import", str(zoo), "ALE/Pong-v5", "ppo", "--out", str(out)])
    assert result.exit_code == 0, result.output
    spec = yaml.safe_load(out.read_text())
    assert [w["type"] for w in spec["env_wrappers"]] == ["AtariPreprocessing", "ClipReward", "FrameStackObservation"]
    assert spec["env_wrappers"][1]["train_only"] and spec["env_wrappers"][2]["kwargs"] == {"stack_size": 4}
    assert spec["hparams"]["encoder"] == "nature_cnn"
    out = tmp_path / "car.yaml"
    result = CliRunner().invoke(app, ["zoo-import", str(zoo), "MountainCarContinuous-v0", "ppo", "--out", str(out)])
    assert result.exit_code == 0, result.output
    spec = yaml.safe_load(out.read_text())
    assert spec["hparams"]["normalize"] == {"obs": True, "reward": False} and "env_wrappers" not in spec
    assert "no_such_package.wrappers.Whatever" in out.read_text()  # named as left out
    assert CliRunner().invoke(app, ["validate", str(out)]).exit_code == 0


def test_policy_kwargs_is_parsed_not_evaluated(tmp_path: Path):
    zoo = _zoo(tmp_path)
    result = CliRunner().invoke(app, ["zoo-import", str(zoo), "Evil-v0", "ppo"])
    assert result.exit_code == 2 and "policy_kwargs must be dict(...)" in result.output
    assert not (tmp_path / "owned").exists()
    assert parse_policy_kwargs("dict(net_arch=[64, 64], activation_fn=nn.Tanh)") == {
        "net_arch": [64, 64], "activation_fn": "Tanh"}
    missing = CliRunner().invoke(app, ["zoo-import", str(zoo), "LunarLander-v3", "ppo"])
    assert missing.exit_code == 2 and "CartPole-v1" in missing.output


# Two entries as rl-zoo's hyperparams/ppo.yml has them (the MuJoCo defaults name no n_envs: the zoo's is 1).
ZOO_REAL = """\
atari:
  env_wrapper:
    - stable_baselines3.common.atari_wrappers.AtariWrapper
  frame_stack: 4
  policy: 'CnnPolicy'
  n_envs: 8
  n_steps: 128
  n_epochs: 4
  batch_size: 256
  n_timesteps: !!float 1e7
  learning_rate: lin_2.5e-4
  clip_range: lin_0.1
  vf_coef: 0.5
  ent_coef: 0.01
MountainCarContinuous-v0:
  normalize: true
  n_envs: 1
  policy: 'MlpPolicy'
  batch_size: 256
  n_steps: 8
  gamma: 0.9999
  learning_rate: !!float 7.77e-05
  ent_coef: 0.00429
  clip_range: 0.1
  n_epochs: 10
  gae_lambda: 0.9
  max_grad_norm: 5
  vf_coef: 0.19
  use_sde: True
  policy_kwargs: "dict(log_std_init=-3.29, ortho_init=False)"
HalfCheetah-v4: &mujoco-defaults
  normalize: true
  n_timesteps: !!float 1e6
  policy: 'MlpPolicy'
"""


def _import(tmp_path: Path, env_id: str) -> tuple[int, str, dict | None]:
    import subprocess
    import sys

    zoo = tmp_path / "ppo.yml"
    zoo.write_text(ZOO_REAL)
    out = tmp_path / f"{env_id.replace('/', '_')}.yaml"
    done = subprocess.run([sys.executable, "-m", "labfleet", "zoo-import", str(zoo), env_id, "ppo", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    return done.returncode, done.stderr, yaml.safe_load(out.read_text()) if out.exists() else None


@pytest.mark.slow
def test_zoo_defaults_are_written_as_sb3_runs_them(tmp_path: Path):
    """SB3's defaults where an entry names none (labfleet's n_envs of 8 would make 8x longer rollouts), and a
    minibatch larger than the rollout taken as the whole rollout (SB3's behaviour), each said on stderr;
    gymnasium's and MuJoCo's notices while the env is checked are not shown."""
    code, stderr, spec = _import(tmp_path, "HalfCheetah-v4")
    assert code == 0 and spec is not None, stderr
    assert (spec["hparams"]["n_envs"], spec["hparams"]["n_steps"], spec["hparams"]["batch_size"]) == (1, 2048, 64)
    assert "SB3's defaults, which the entry leaves to it: n_envs=1, n_steps=2048, batch_size=64" in stderr
    assert "WARN" not in stderr and "deprecated" not in stderr, stderr
    code, stderr, spec = _import(tmp_path, "MountainCarContinuous-v0")
    assert code == 0 and spec is not None, stderr
    assert spec["hparams"]["batch_size"] == 8 and spec["hparams"]["n_steps"] == 8
    assert "SB3 takes the whole rollout as one minibatch" in stderr
    assert CliRunner().invoke(app, ["validate", str(tmp_path / "MountainCarContinuous-v0.yaml")]).exit_code == 0


def test_the_atari_entry_serves_every_atari_game(tmp_path: Path):
    code, stderr, spec = _import(tmp_path, "BreakoutNoFrameskip-v4")
    assert code == 0 and spec is not None, stderr
    assert spec["env"] == "BreakoutNoFrameskip-v4" and spec["hparams"]["encoder"] == "nature_cnn"
    assert spec["env_wrappers"][0]["type"] == "AtariPreprocessing" and spec["hparams"]["n_envs"] == 8
    code, stderr, spec = _import(tmp_path, "atari")
    assert code == 2 and spec is None and "name the game" in stderr
