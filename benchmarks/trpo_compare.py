"""TRPO: labfleet's trainer against sb3-contrib's TRPO with the same rl-zoo settings, side by side.

    python benchmarks/trpo_compare.py [--seeds 100,101,102] [--steps 100000]

Each seed trains once with each library, one after the other in this process (no Ray, no MLflow), and
is evaluated on 20 deterministic episodes. Prints final returns and wall-clock seconds.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def labfleet_run(seed: int, steps: int) -> tuple[float, float]:
    from labfleet.algorithms import registry
    from labfleet.spec.loading import load_spec

    spec = load_spec(REPO / "experiments" / "cartpole_trpo.yaml", {"budget.env_steps": steps, "eval.episodes": 20})
    started = time.perf_counter()
    trainer = registry.get("trpo").trainer(spec, seed, "cpu")
    while not trainer.done:
        trainer.train_iteration()
    elapsed = time.perf_counter() - started
    return trainer.evaluate()["eval/return_mean"], elapsed


def sb3_run(seed: int, steps: int) -> tuple[float, float]:
    import gymnasium as gym
    from sb3_contrib import TRPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy

    started = time.perf_counter()
    model = TRPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=2, seed=seed), n_steps=512, batch_size=512,
                 cg_damping=1e-3, gae_lambda=0.98, gamma=0.99, learning_rate=1e-3, n_critic_updates=20, seed=seed,
                 device="cpu")
    model.learn(steps)
    elapsed = time.perf_counter() - started
    mean, _ = evaluate_policy(model, gym.make("CartPole-v1"), n_eval_episodes=20, deterministic=True)
    return float(mean), elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="100,101,102")
    parser.add_argument("--steps", type=int, default=100_000)
    args = parser.parse_args()
    print("| seed | labfleet return | labfleet s | sb3-contrib return | sb3-contrib s |")
    print("|---|---|---|---|---|")
    for seed in (int(s) for s in args.seeds.split(",")):
        ours, ours_s = labfleet_run(seed, args.steps)
        theirs, theirs_s = sb3_run(seed, args.steps)
        print(f"| {seed} | {ours:.1f} | {ours_s:.1f} | {theirs:.1f} | {theirs_s:.1f} |", flush=True)


if __name__ == "__main__":
    main()
