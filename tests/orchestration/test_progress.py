"""What the progress display and the summary show a person, rendered by rich at 80 columns."""

from __future__ import annotations

import io

from rich.console import Console

from labfleet.orchestration.progress import ProgressBoard, summary_table


def _console() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, width=80, force_terminal=True, color_system=None), out


def test_summary_names_each_rows_own_metric_and_never_cuts_a_name():
    rows = [
        {"trial": "quickstart-frozenlake-qlearning", "seed": "0", "status": "FINISHED", "steps": "400000",
         "metric": "eval/return_mean", "value": "0.74", "time": "41s"},
        {"trial": "quickstart-frozenlake-value-iteration", "seed": "0", "status": "FINISHED", "steps": "2000",
         "metric": "eval/return_mean", "value": "0.746", "time": "2s"},
        {"trial": "quickstart-digits-vae", "seed": "0", "status": "FINISHED", "steps": "4000",
         "metric": "eval/neg_elbo", "value": "108.5", "time": "60s"},
        {"trial": "quickstart-ring-gan", "seed": "0", "status": "FINISHED", "steps": "16000",
         "metric": "eval/modes_covered", "value": "8", "time": "90s"},
    ]
    console, out = _console()
    console.print(summary_table("labfleet results", rows))
    text = out.getvalue()
    assert all(len(line) <= 80 for line in text.splitlines())
    names: list[str] = []  # the trial column, its folded lines joined per row
    for line in text.splitlines():
        if not line.startswith("│"):
            continue
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if cells[1]:  # the seed column opens a row
            names.append(cells[0])
        else:
            names[-1] += cells[0]
    assert names == [row["trial"] for row in rows]
    assert "…" not in text, "a name or value was cut"
    lines = text.splitlines()
    assert any("neg_elbo" in line and "108.5" in line for line in lines)  # each row shows its own metric
    assert any("modes_cove" in line for line in lines)


def test_a_waiting_seed_shows_pending_and_a_finished_sweep_bar_goes():
    console, out = _console()
    with ProgressBoard(console, hide_finished=True) as board:
        board.add("a", "trial 0 seed=0", 100)
        board._progress.refresh()
        assert "PENDING" in out.getvalue()
        board.update("a", 50, "eval/return_mean=20 3000 sps")
        board._progress.refresh()
        assert "3000 sps" in out.getvalue()
        board.add("b", "trial 1 seed=0", 100)
        board.finish("a", "FINISHED")
        # gone, not only hidden: rich would otherwise keep (and walk) every bar of a 2,000-trial sweep
        assert [task.description for task in board._progress.tasks] == ["trial 1 seed=0"]
        board.update("a", 100, "late")  # a result after the end changes nothing
        board.finish("a", "FINISHED")


def test_at_80_columns_no_number_is_cut():
    """A narrow terminal loses the bar, then the ETA, then the elapsed time, never a number; the sweep's
    table keeps each value and state whole (a long head folds instead)."""
    import io

    from rich.console import Console

    from labfleet.orchestration.progress import ProgressBoard
    from labfleet.orchestration.sweep_view import fitted_table, short_state

    out = io.StringIO()
    console = Console(file=out, width=80, force_terminal=True, color_system=None)
    board = ProgressBoard(console)
    with board:
        board.add(("a", 0), "quickstart-cartpole-reinforce seed=0", 100000)
        board.update(("a", 0), 40960, "eval/return_mean=409.3 1234 sps")
        board.add(("b", 1), "quickstart-pendulum-ddpg seed=1", 20000)
    last = out.getvalue().rsplit("\x1b[2K", 1)[-1]
    assert "…" not in last and "40960/100000" in last and "eval/return_mean=409.3 1234 sps" in last, last
    assert "0/20000" in last and all(len(line) <= 80 for line in last.splitlines())

    rows = [([str(n), short_state(state), "0.000646612", "256", "0.0931"], "") for n, state in
            ((12, "COMPLETE"), (13, "PRUNED"), (14, "RUNNING"))]
    table = fitted_table("cartpole-ppo-sweep: eval/return_mean (maximize)",
                         ["trial", "state", "learning_rate", "batch_size", "ent_coef_with_a_long_name", "latest"],
                         [([*cells, "487.5"], style) for cells, style in rows])
    out = io.StringIO()
    Console(file=out, width=80, color_system=None).print(table)
    text = out.getvalue()
    for token in ("done", "pruned", "run", "0.000646612", "487.5", "0.0931"):
        assert token in text, (token, text)
    assert "…" not in text and all(len(line) <= 80 for line in text.splitlines())


def test_the_pbt_table_shows_current_values_waiting_members_and_exploits():
    import optuna

    from labfleet.orchestration.sweep_view import TrialBoard
    from labfleet.spec.loading import resolve_spec_data

    spec = resolve_spec_data({
        "name": "pbt", "algorithm": "value_iteration", "env": "FrozenLake-v1", "budget": {"iterations": 40},
        "sweep": {"metric": "eval/return_mean", "direction": "maximize", "n_trials": 4, "max_parallel": 2,
                  "space": {"hparams.gamma": {"type": "float", "low": 0.5, "high": 0.999}}}}, "pbt.yaml",
        check_env=False)
    study = optuna.create_study(study_name="pbt", direction="maximize")
    console, out = _console()
    board = ProgressBoard(console, hide_finished=True)
    view = TrialBoard(study, spec.sweep, board)
    view.exploited({"step": 2000, "from_trial": 0, "to_trial": 3, "old": {"hparams.gamma": 0.5},
                    "new": {"hparams.gamma": 0.9876543}})
    view.refresh([(0, "RUNNING", {"hparams.gamma": 0.99}, 0.71), (3, "WAITING", {"hparams.gamma": 0.9876543}, None)])
    console.print(board.below)
    text = out.getvalue()
    assert "wait" in text and "run" in text and "0.988" in text  # the value it trains with now, 3 figures
    assert "step 2000: trial 3 took trial 0's weights; gamma 0.5->0.988" in " ".join(text.split())
