"""PPO on MuJoCo locomotion with the shipped specs (CleanRL's ppo_continuous_action settings), and
Stable-Baselines3's PPO with the same settings side by side for speed.

    python benchmarks/mujoco_ppo.py [--envs hopper,halfcheetah] [--seeds 100,101,102] [--steps 1000000]
                                    [--jobs 2] [--sb3-steps 0]

Each (env, seed) trains labfleet's trainer alone (no Ray, no MLflow) in a process of its own, `--jobs` at
a time with one torch thread each, and is evaluated on 10 deterministic episodes at the end (its spec
also evaluates every 50k steps; those curves are printed as they come). With `--sb3-steps N`, SB3's PPO
(VecNormalize, the same hyperparameters) and labfleet each train N steps of the first env and seed, one
after the other in one process, for a like-for-like steps/s.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPECS = {"hopper": ("hopper_ppo.yaml", "Hopper-v5"), "halfcheetah": ("halfcheetah_ppo.yaml", "HalfCheetah-v5"),
         "inverted_pendulum": ("inverted_pendulum_ppo.yaml", "InvertedPendulum-v5")}


def labfleet_run(name: str, seed: int, steps: int) -> tuple[str, int, float, float, list[tuple[int, float]]]:
    import torch

    from labfleet.algorithms import registry
    from labfleet.spec.loading import load_spec

    torch.set_num_threads(1)
    spec = load_spec(REPO / "experiments" / "mujoco" / SPECS[name][0], {"budget.env_steps": steps})
    started = time.perf_counter()
    trainer = registry.get("ppo").trainer(spec, seed, "cpu")
    every = spec.eval.every_steps or steps // 10
    curve, next_eval = [], every
    while not trainer.done:
        trainer.train_iteration()
        if trainer.env_steps >= next_eval and not trainer.done:
            next_eval += every
            curve.append((trainer.env_steps, trainer.evaluate()["eval/return_mean"]))
            print(f"  {name} seed {seed} step {trainer.env_steps}: {curve[-1][1]:.1f}", flush=True)
    elapsed = time.perf_counter() - started
    final = trainer.evaluate()["eval/return_mean"]
    trainer.close()
    return name, seed, final, elapsed, curve


def sb3_run(env_id: str, seed: int, steps: int) -> float:
    """Seconds for SB3's PPO with the spec's settings (CleanRL's), VecNormalize for obs and reward."""
    import torch
    from stable_baselines3 import PPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    torch.set_num_threads(1)
    started = time.perf_counter()
    env = VecNormalize(make_vec_env(env_id, n_envs=1, seed=seed), gamma=0.99)
    model = PPO("MlpPolicy", env, n_steps=2048, batch_size=64, n_epochs=10, gamma=0.99, gae_lambda=0.95,
                learning_rate=lambda p: 3e-4 * p, clip_range=0.2, clip_range_vf=0.2, ent_coef=0.0, vf_coef=0.5,
                max_grad_norm=0.5, policy_kwargs={"net_arch": [64, 64]}, seed=seed, device="cpu")
    model.learn(steps)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", default="hopper,halfcheetah")
    parser.add_argument("--seeds", default="100,101,102")
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--sb3-steps", type=int, default=0)
    args = parser.parse_args()
    envs, seeds = args.envs.split(","), [int(s) for s in args.seeds.split(",")]
    if args.sb3_steps:
        name, seed = envs[0], seeds[0]
        theirs = sb3_run(SPECS[name][1], seed, args.sb3_steps)
        ours = labfleet_run(name, seed, args.sb3_steps)[3]
        print(f"{SPECS[name][1]}, {args.sb3_steps} steps, one thread: labfleet {ours:.1f} s "
              f"({args.sb3_steps / ours:.0f} steps/s), SB3 {theirs:.1f} s ({args.sb3_steps / theirs:.0f} steps/s)")
        return
    with ProcessPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(labfleet_run, name, seed, args.steps) for name in envs for seed in seeds]
        results = [f.result() for f in futures]
    print("| env | seed | final eval return | wall s |")
    print("|---|---|---|---|")
    for name, seed, final, elapsed, _ in results:
        print(f"| {SPECS[name][1]} | {seed} | {final:.1f} | {elapsed:.0f} |")


if __name__ == "__main__":
    main()
