"""The sweep's leaderboard at 80 columns: parameter names without `hparams.`, nothing cut, and the best
trial's parameters in full (issue 17). A real Optuna study, filled with finished trials."""

from __future__ import annotations

import io

import optuna
from rich.console import Console

from labfleet.orchestration.sweep_view import best_line, leaderboard
from labfleet.spec.models import SweepConfig

SWEEP = SweepConfig.model_validate({"metric": "eval/return_mean", "space": {
    "hparams.learning_rate": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
    "hparams.normalize_advantage": {"type": "categorical", "choices": [True, False]},
    "hparams.ent_coef": {"type": "float", "low": 0.0, "high": 0.1}}})


def _study() -> optuna.Study:
    study = optuna.create_study(direction="maximize", study_name="cartpole-ppo-sweep")
    distributions = {"hparams.learning_rate": optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True),
                     "hparams.normalize_advantage": optuna.distributions.CategoricalDistribution([True, False]),
                     "hparams.ent_coef": optuna.distributions.FloatDistribution(0.0, 0.1)}
    for value, lr in ((412.3456, 0.000612345678), (500.0, 0.00123456789), (87.5, 1.5e-5)):
        study.add_trial(optuna.trial.create_trial(
            params={"hparams.learning_rate": lr, "hparams.normalize_advantage": True, "hparams.ent_coef": 0.0123456},
            distributions=distributions, value=value))
    return study


def test_leaderboard_fits_80_columns_without_cutting_names():
    out = io.StringIO()
    Console(file=out, width=80, force_terminal=True, color_system=None).print(leaderboard(_study(), SWEEP))
    text = out.getvalue()
    assert "…" not in text and all(len(line) <= 80 for line in text.splitlines())
    assert "hparams." not in text
    lines = text.splitlines()
    header = [line for line in lines[:lines.index(next(x for x in lines if x.startswith("┡")))] if "┃" in line]
    columns = ["".join(cells) for cells in zip(*([c.strip() for c in line.split("┃")[1:-1]] for line in header),
                                                strict=True)]
    assert columns == ["trial", "state", "eval/return_mean", "learning_rate", "normalize_advantage", "ent_coef"]
    body = "".join(line.replace(" ", "") for line in lines)
    assert "500" in body and "0.000612" in body.replace("│", "")  # 3 significant figures, the token whole


def test_best_trials_parameters_are_printed_in_full():
    line = best_line(_study(), SWEEP)
    assert line == ("best: trial 1, eval/return_mean = 500.0; hparams.learning_rate=0.00123456789  "
                    "hparams.normalize_advantage=True  hparams.ent_coef=0.0123456")
