"""labfleet against Stable-Baselines3 on this machine: the same rl-zoo hyperparameters, pair by pair.

    python benchmarks/sb3_compare.py [--seeds 0] [--only ppo,dqn,ddpg]
    python benchmarks/sb3_compare.py --whole --seeds 0,1,2,3,4 --only ppo [--seeds-per-actor 5,1] [--in-process]
    python benchmarks/sb3_compare.py --env-limit

`--whole` compares what a user runs, for all the seeds at once: the whole `labfleet run` command (Ray and
MLflow start-up, the trial actors, tracking; once per `--seeds-per-actor` value) against SB3's whole
script per seed, `--parallel` of them at a time (default 2: the cores of this machine). With `--in-process`,
`labfleet run --in-process` (no Ray: every seed in the command's one process) is measured beside it. Returns are each
seed's final evaluation (20 episodes), read back from MLflow on the labfleet side.

Each side trains in a subprocess of its own with one torch thread (a labfleet trial's default), and the
pairs run one after the other so that they never share the CPU. Reported per side: whole-process wall time
(interpreter start, imports, training, evaluation), training throughput (env steps / training seconds) and
the final deterministic evaluation return over 20 episodes. labfleet runs its trainer with
`rollout_workers: 0`, the code a Ray trial actor runs. Needs `pip install -e '.[bench]'`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The shipped specs, set back to rl-zoo's exact hyperparameters where they depart from them.
PAIRS = {
    "ppo": {"spec": "cartpole_ppo.yaml", "steps": 100_000, "env": "CartPole-v1", "set": {}},
    "dqn": {"spec": "cartpole_dqn.yaml", "steps": 50_000, "env": "CartPole-v1",
            "set": {"hparams.learning_rate": 2.3e-3, "hparams.double_q": False, "hparams.n_step": 1}},
    "ddpg": {"spec": "pendulum_ddpg.yaml", "steps": 20_000, "env": "Pendulum-v1", "set": {}},
}

LABFLEET_SIDE = """
import json, sys, time
import torch
torch.set_num_threads(1)
from labfleet.algorithms import registry
from labfleet.spec.loading import load_spec
spec = load_spec(sys.argv[1], {"budget.env_steps": int(sys.argv[2]), "eval.episodes": 20,
                               "resources.rollout_workers": 0, **json.loads(sys.argv[4])})
trainer = registry.get(spec.algorithm).trainer(spec, int(sys.argv[3]), "cpu")
start = time.perf_counter()
while not trainer.done:
    trainer.train_iteration()
train_s = time.perf_counter() - start
result = trainer.evaluate()
print(json.dumps({"train_s": train_s, "steps": trainer.env_steps, "return": result["eval/return_mean"]}))
"""

SB3_SIDE = """
import json, sys, time
import numpy as np
import torch
torch.set_num_threads(1)
import gymnasium as gym
from stable_baselines3 import DDPG, DQN, PPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.noise import NormalActionNoise
algo, steps, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
if algo == "ppo":  # rl-zoo hyperparams/ppo.yml, CartPole-v1
    model = PPO("MlpPolicy", make_vec_env("CartPole-v1", n_envs=8, seed=seed), n_steps=32, batch_size=256,
                gae_lambda=0.8, gamma=0.98, n_epochs=20, ent_coef=0.0, learning_rate=lambda p: p * 1e-3,
                clip_range=lambda p: p * 0.2, seed=seed, device="cpu")
    eval_env = gym.make("CartPole-v1")
elif algo == "dqn":  # rl-zoo hyperparams/dqn.yml, CartPole-v1
    model = DQN("MlpPolicy", "CartPole-v1", learning_rate=2.3e-3, batch_size=64, buffer_size=100_000,
                learning_starts=1000, gamma=0.99, target_update_interval=10, train_freq=256, gradient_steps=128,
                exploration_fraction=0.16, exploration_final_eps=0.04, policy_kwargs=dict(net_arch=[256, 256]),
                seed=seed, device="cpu")
    eval_env = gym.make("CartPole-v1")
else:  # rl-zoo hyperparams/ddpg.yml, Pendulum-v1
    model = DDPG("MlpPolicy", "Pendulum-v1", gamma=0.98, buffer_size=200_000, learning_starts=10_000,
                 action_noise=NormalActionNoise(np.zeros(1), 0.1 * np.ones(1)), gradient_steps=1, train_freq=1,
                 learning_rate=1e-3, policy_kwargs=dict(net_arch=[400, 300]), seed=seed, device="cpu")
    eval_env = gym.make("Pendulum-v1")
start = time.perf_counter()
model.learn(total_timesteps=steps)
train_s = time.perf_counter() - start
eval_env.reset(seed=10_000 + seed)
mean, _ = evaluate_policy(model, eval_env, n_eval_episodes=20, deterministic=True)
print(json.dumps({"train_s": train_s, "steps": steps, "return": float(mean)}))
"""


def run_side(code: str, args: list[str]) -> dict:
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    result["sps"] = result["steps"] / result["train_s"]
    return result


def whole_labfleet(pair: dict, seeds: list[int], per_actor: int, cpus: float | None = None,
                   in_process: bool = False) -> dict:
    """The whole `labfleet run` of every seed; its wall time and each seed's final eval return."""
    import tempfile

    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory(prefix="labfleet-bench-") as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        sets = {"seeds": json.dumps(seeds), "budget.env_steps": pair["steps"], "eval.episodes": 20,
                "resources.seeds_per_actor": per_actor, **pair["set"]}
        if cpus is not None:  # an actor's CPUs (and torch threads); the spec's own otherwise
            sets["resources.cpus_per_trial"] = cpus
        cmd = [sys.executable, "-m", "labfleet", "run", str(REPO / "experiments" / pair["spec"]),
               "--tracking-uri", uri] + (["--in-process"] if in_process else [])
        for key, value in sets.items():
            cmd += ["--set", f"{key}={value}"]
        start = time.perf_counter()
        subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, check=True)
        wall = time.perf_counter() - start
        client = MlflowClient(uri)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  "tags.`labfleet.role` = 'seed'")
        returns = [r.data.metrics["eval/return_mean"] for r in runs]
    return {"wall_s": wall, "returns": returns}


def whole_sb3(name: str, pair: dict, seeds: list[int], parallel: int) -> dict:
    """SB3's script once per seed, `parallel` processes at a time; the total wall time and the returns."""
    start = time.perf_counter()
    pending, running, returns = list(seeds), [], []
    while pending or running:
        while pending and len(running) < parallel:
            seed = pending.pop(0)
            running.append(subprocess.Popen([sys.executable, "-c", SB3_SIDE, name, str(pair["steps"]), str(seed)],
                                            stdout=subprocess.PIPE, text=True))
        proc = running.pop(0)
        out, _ = proc.communicate()
        assert proc.returncode == 0, f"SB3 exited {proc.returncode}"
        returns.append(json.loads(out.strip().splitlines()[-1])["return"])
    return {"wall_s": time.perf_counter() - start, "returns": returns}


def env_limit(seconds: float = 5.0) -> None:
    """Steps/s of the environments alone: labfleet's vector envs (gymnasium's SyncVectorEnv of CartPoles with
    its wrappers, as a trainer makes them) stepped with random actions, for one seed's 8 envs and for five
    seeds' 40, and gymnasium's own vectorised `CartPoleVectorEnv` for comparison."""
    import gymnasium as gym
    import numpy as np

    from labfleet.rollout.envs import EnvMaker
    from labfleet.spec.loading import load_spec

    spec = load_spec(REPO / "experiments" / "cartpole_ppo.yaml")
    print("| environments | steps/s (random actions) |")
    print("|---|---|")
    cases = [(f"labfleet EnvMaker, {n} CartPoles (SyncVectorEnv)", lambda n=n: EnvMaker.from_spec(spec).make_vector(n))
             for n in (8, 40)]
    cases.append(("gymnasium CartPoleVectorEnv, 40 envs", lambda: gym.make_vec(
        "CartPole-v1", num_envs=40, vectorization_mode="vector_entry_point")))
    for label, make in cases:
        envs = make()
        envs.reset(seed=0)
        rng = np.random.default_rng(0)
        steps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            envs.step(rng.integers(0, 2, size=envs.num_envs))
            steps += envs.num_envs
        print(f"| {label} | {steps / (time.perf_counter() - start):,.0f} |")
        envs.close()


def main_whole(args: argparse.Namespace) -> None:
    seeds = [int(s) for s in args.seeds.split(",")]
    print("| algorithm | env | steps | seeds | side | whole command (s) | speed-up | eval returns (20 ep) |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.only.split(","):
        pair = PAIRS[name]
        if args.sb3_seconds:  # SB3's side measured before (same seeds, same machine): only labfleet runs
            theirs, rows = {"wall_s": args.sb3_seconds, "returns": []}, []
        else:
            theirs = whole_sb3(name, pair, seeds, args.parallel)
            rows = [(f"SB3, {args.parallel} processes at a time", theirs)]
        for per_actor in [int(k) for k in args.seeds_per_actor.split(",")]:
            for in_process in [False, True] if args.in_process else [False]:
                label = (f"labfleet run{' --in-process' * in_process}, seeds_per_actor {per_actor}"
                         + (f", cpus_per_trial {args.cpus_per_trial:g}" if args.cpus_per_trial else ""))
                rows.append((label, whole_labfleet(pair, seeds, per_actor, args.cpus_per_trial, in_process)))
        for side, r in rows:
            returns = ", ".join(f"{x:.0f}" for x in sorted(r["returns"]))
            print(f"| {name} | {pair['env']} | {pair['steps']} | {len(seeds)} | {side} | {r['wall_s']:.1f} | "
                  f"{theirs['wall_s'] / r['wall_s']:.2f}x | {returns} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--only", default=",".join(PAIRS))
    parser.add_argument("--whole", action="store_true", help="whole commands, all seeds at once (see above)")
    parser.add_argument("--seeds-per-actor", default="5,1", help="labfleet's resources.seeds_per_actor values")
    parser.add_argument("--parallel", type=int, default=2, help="SB3 scripts at a time (--whole)")
    parser.add_argument("--in-process", action="store_true", help="also `labfleet run --in-process` (--whole)")
    parser.add_argument("--cpus-per-trial", type=float, default=None,
                        help="labfleet's resources.cpus_per_trial (--whole; the spec's own by default)")
    parser.add_argument("--sb3-seconds", type=float, default=None,
                        help="(--whole) SB3's whole time from an earlier run; SB3 is not run again")
    parser.add_argument("--env-limit", action="store_true", help="steps/s of the environments alone")
    args = parser.parse_args()
    if args.env_limit:
        env_limit()
        return
    if args.whole:
        main_whole(args)
        return
    rows = []
    for name in args.only.split(","):
        pair = PAIRS[name]
        for seed in [int(s) for s in args.seeds.split(",")]:
            ours = run_side(LABFLEET_SIDE, [str(REPO / "experiments" / pair["spec"]), str(pair["steps"]), str(seed),
                                            json.dumps(pair["set"])])
            theirs = run_side(SB3_SIDE, [name, str(pair["steps"]), str(seed)])
            rows.append((name, pair["env"], pair["steps"], seed, ours, theirs))
            print(json.dumps({"algo": name, "seed": seed, "labfleet": ours, "sb3": theirs}), flush=True)
    print()
    print("| algorithm | env | steps | seed | side | whole process (s) | train steps/s | eval return (20 ep) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, env, steps, seed, ours, theirs in rows:
        for side, r in (("labfleet", ours), ("SB3", theirs)):
            print(f"| {name} | {env} | {steps} | {seed} | {side} | {r['wall_s']:.1f} | {r['sps']:.0f} | "
                  f"{r['return']:.1f} |")
        print(f"| {name} | | | | **labfleet / SB3 throughput** | | **{ours['sps'] / theirs['sps']:.2f}x** | |")


if __name__ == "__main__":
    main()
