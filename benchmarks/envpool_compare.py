"""`env_backend: envpool` against gymnasium's vector envs on this machine.

    python benchmarks/envpool_compare.py --env-limit [--seconds 5]
    python benchmarks/envpool_compare.py --train [--only ppo-cartpole,ppo-hopper,...] [--seeds 0]

`--env-limit`: the environments alone, stepped with random actions in this process, as a trainer makes them
(`EnvMaker.make_vector`): microseconds per vector step, env steps/s, and the process's CPU time over wall
time (EnvPool steps in a thread of its own, and its caller waits for it by spinning).

`--train`: a shipped spec's trainer, in a subprocess of its own with one torch thread and `rollout_workers: 0`
(the code a Ray trial actor runs), once per backend, one after the other so that they never share the CPU:
training throughput (env steps / training seconds), the process's CPU time over its wall time, and the final
evaluation (20 episodes) on the same backend.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TASKS = {  # name: (spec, env steps, overrides)
    "ppo-cartpole": ("cartpole_ppo.yaml", 100_000, {}),
    "ppo-hopper": ("mujoco/hopper_ppo.yaml", 50_000, {}),
    "ppo-halfcheetah": ("mujoco/halfcheetah_ppo.yaml", 50_000, {}),
    "ddpg-pendulum": ("pendulum_ddpg.yaml", 20_000, {}),
}

TRAIN = """
import json, os, sys, time
import torch
torch.set_num_threads(1)
from labfleet.algorithms import registry
from labfleet.spec.loading import load_spec
path, overrides, seed = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
spec = load_spec(path, {**overrides, "resources.rollout_workers": 0, "eval.episodes": 20})
trainer = registry.get(spec.algorithm).trainer(spec, seed, "cpu")
wall, cpu = time.perf_counter(), time.process_time()
while not trainer.done:
    trainer.train_iteration()
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
result = trainer.evaluate()
print(json.dumps({"steps": trainer.env_steps, "seconds": wall, "cpu": cpu / wall,
                  "eval": result["eval/return_mean"]}))
"""


def env_limit(seconds: float) -> None:
    from labfleet.rollout.envs import EnvMaker

    print("| env | n envs | backend | us / vector step | env steps/s | CPU / wall |")
    print("|---|---|---|---|---|---|")
    for env, counts in (("CartPole-v1", (1, 8, 40)), ("Pendulum-v1", (1, 8)), ("Hopper-v5", (1, 8))):
        for n in counts:
            for backend in ("gymnasium", "envpool"):
                envs = EnvMaker(env, backend=backend).make_vector(n)
                envs.reset(seed=list(range(n)))
                envs.action_space.seed(0)
                actions = [envs.action_space.sample() for _ in range(64)]
                steps, wall, cpu = 0, time.perf_counter(), time.process_time()
                while time.perf_counter() - wall < seconds:
                    envs.step(actions[steps % 64])
                    steps += 1
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                print(f"| {env} | {n} | {backend} | {wall / steps * 1e6:.0f} | {steps * n / wall:,.0f} | "
                      f"{cpu / wall:.2f} |", flush=True)
                envs.close()


def train(only: list[str], seeds: list[int]) -> None:
    print("| task | steps | seed | backend | train steps/s | CPU / wall | eval return (20 ep) |")
    print("|---|---|---|---|---|---|---|")
    for name in only:
        spec, steps, overrides = TASKS[name]
        for seed in seeds:
            rates = {}
            for backend in ("gymnasium", "envpool"):
                sets = {**overrides, "budget.env_steps": steps, "env_backend": backend}
                out = subprocess.run([sys.executable, "-c", TRAIN, str(REPO / "experiments" / spec), json.dumps(sets),
                                      str(seed)], capture_output=True, text=True, check=True, cwd=REPO)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                rates[backend] = r["steps"] / r["seconds"]
                print(f"| {name} | {steps} | {seed} | {backend} | {rates[backend]:,.0f} | {r['cpu']:.2f} | "
                      f"{r['eval']:.1f} |", flush=True)
            print(f"| {name} | | {seed} | **envpool / gymnasium** | **{rates['envpool'] / rates['gymnasium']:.2f}x** "
                  f"| | |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-limit", action="store_true")
    parser.add_argument("--train", action="store_true")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--only", default=",".join(TASKS))
    parser.add_argument("--seeds", default="0")
    args = parser.parse_args()
    if args.env_limit:
        env_limit(args.seconds)
    if args.train:
        train(args.only.split(","), [int(s) for s in args.seeds.split(",")])


if __name__ == "__main__":
    main()
