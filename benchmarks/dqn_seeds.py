"""DQN on CartPole over many seeds, with its evaluations on the way (docs/benchmarks.md, "DQN on
CartPole: what the spec rests on").

    python benchmarks/dqn_seeds.py 9520-9535 [--set eval.select_best=false eval.every_steps=2500 ...]

Each seed trains `experiments/cartpole_dqn.yaml` (with the overrides) in-process on one torch thread, two
seeds at a time, as a trial actor runs it: `train_iteration()` until the budget is spent, and `evaluate()` at
the steps a trial actor evaluates at (`eval.every_steps`, by default a tenth of the budget;
`labfleet.orchestration.trial.SeedSlot`) and at the end. One line per seed: the seed, the evaluation of the
network training ended with, the final `eval/return_mean` (with `eval.select_best`, the selected network
evaluated on fresh episodes; otherwise the same as the first), the evaluations on the way, the env step of
the selected network, and the seconds it took.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time
from pathlib import Path

import yaml

SPEC = Path(__file__).resolve().parent.parent / "experiments" / "cartpole_dqn.yaml"


def run(job: tuple[int, dict]) -> tuple[int, float, float, list[float], int, int]:
    seed, overrides = job
    import torch

    from labfleet import metrics as M
    from labfleet.algorithms import registry
    from labfleet.orchestration.trial import SeedSlot
    from labfleet.spec.loading import load_spec

    torch.set_num_threads(1)
    spec = load_spec(SPEC, overrides)
    trainer = registry.get("dqn").trainer(spec, seed, "cpu")
    slot = SeedSlot(spec, trainer, None)  # when a trial actor evaluates
    started, on_the_way = time.time(), []
    while not trainer.done:
        trainer.train_iteration()
        if slot.eval_due(trainer):
            on_the_way.append(round(trainer.evaluate()[M.EVAL_RETURN_MEAN], 1))
    final = trainer.evaluate()
    end = final.get(M.LAST_RETURN_MEAN, final[M.EVAL_RETURN_MEAN])
    return (seed, round(end, 1), round(final[M.EVAL_RETURN_MEAN], 1), on_the_way,
            int(final.get(M.SELECTED_STEP, trainer.env_steps)), round(time.time() - started))


def seeds_of(text: str) -> list[int]:
    if "-" in text and "," not in text:
        low, high = text.split("-")
        return list(range(int(low), int(high) + 1))
    return [int(s) for s in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("seeds", help="a range 9520-9535 or a list 1,2,3")
    parser.add_argument("--set", nargs="*", default=[], metavar="PATH=VALUE", help="spec overrides (YAML values)")
    args = parser.parse_args()
    overrides = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    seeds = seeds_of(args.seeds)
    results = []
    with mp.get_context("spawn").Pool(2) as pool:
        for result in pool.imap_unordered(run, [(seed, overrides) for seed in seeds]):
            print(*result, flush=True)
            results.append(result)
    for label, column in (("the network training ended with", 1), ("the final eval/return_mean", 2)):
        values = [r[column] for r in results]
        print(f"{label}: {sum(v < 475 for v in values)} of {len(values)} below 475, mean "
              f"{sum(values) / len(values):.1f}")


if __name__ == "__main__":
    main()
