"""rl-baselines3-zoo hyperparameter files as labfleet specs (`labfleet zoo-import FILE ENV_ID ALGO`).

A zoo entry is a mapping of SB3 argument names, which labfleet's hyperparameters share, plus a few keys of
the zoo's own: `n_timesteps` (the budget), `policy` (CnnPolicy: the Nature CNN), `policy_kwargs` (a Python
expression such as "dict(net_arch=[64, 64], activation_fn=nn.ReLU)", read here by parsing it, never by
evaluating it), `normalize` (hparams.normalize), `frame_stack` and `env_wrapper` (env_wrappers; SB3's
AtariWrapper as gymnasium's AtariPreprocessing). The zoo's `atari` entry serves every Atari game id. Where an
entry leaves a value to SB3 and labfleet's default differs (n_envs, PPO's n_steps and batch_size, DQN's
buffer), SB3's is written; a PPO minibatch larger than the rollout becomes the rollout, as SB3 runs it. What
labfleet cannot take is left out of the spec and named, each with why, in comments at the top of the spec and
on stderr, beside what was written differently.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from typing import Any

import yaml

ACTIVATIONS = {"ReLU": "relu", "Tanh": "tanh"}


@dataclass
class Imported:
    spec: dict[str, Any]
    notes: list[str] = field(default_factory=list)  # what was left out, and why
    changes: list[str] = field(default_factory=list)  # what was written differently from the entry, and why


# What rl-zoo runs where an entry names a value: SB3's defaults (rl-zoo's n_envs is 1), written into the spec
# where labfleet's own defaults differ, so that the spec trains as the zoo would.
SB3_DEFAULTS: dict[str, dict[str, Any]] = {
    "ppo": {"n_envs": 1, "n_steps": 2048, "batch_size": 64},
    "a2c": {"n_envs": 1},
    "dqn": {"n_envs": 1, "buffer_size": 1_000_000},
    "ddpg": {"n_envs": 1},
}


def is_atari(env_id: str) -> bool:
    """Whether `env_id` is one of ale-py's Atari games (the zoo's `atari` entry covers them all)."""
    if env_id.startswith("ALE/") or "NoFrameskip" in env_id:
        return True
    import gymnasium as gym

    try:
        import ale_py

        gym.register_envs(ale_py)
    except ImportError:
        return False
    entry = gym.registry.get(env_id)
    return entry is not None and "ale_py" in str(entry.entry_point)


def _entry_key(document: dict[str, Any], env_id: str) -> str:
    """The entry of `env_id`: its own, else the zoo's `atari` entry for an Atari game."""
    if env_id == "atari":
        raise ValueError("the zoo's `atari` entry serves every Atari game: name the game, e.g. "
                         "BreakoutNoFrameskip-v4 or ALE/Pong-v5")
    if env_id in document:
        return env_id
    if "atari" in document and is_atari(env_id):
        return "atari"
    known = ", ".join(k for k in document if k != "default")
    raise KeyError(f"no entry for {env_id!r} (the file has: {known})")


def _sb3_semantics(algorithm: str, hparams: dict[str, Any], changes: list[str]) -> None:
    """Write what SB3 would do where labfleet's defaults or checks differ: SB3's defaults where the entry names
    no value (`SB3_DEFAULTS`), and a PPO minibatch larger than the rollout (SB3 then takes the whole rollout
    as one minibatch; labfleet refuses batch_size > n_envs * n_steps)."""
    defaults = {k: v for k, v in SB3_DEFAULTS.get(algorithm, {}).items() if k not in hparams}
    if defaults:
        hparams.update(defaults)
        changes.append("SB3's defaults, which the entry leaves to it: " + ", ".join(f"{k}={v}" for k, v in
                                                                                     defaults.items()))
    if algorithm == "ppo":
        rollout = int(hparams["n_envs"]) * int(hparams["n_steps"])
        if int(hparams["batch_size"]) > rollout:
            changes.append(f"batch_size={rollout}, not {hparams['batch_size']}: it exceeds n_envs * n_steps "
                           f"({rollout}), where SB3 takes the whole rollout as one minibatch")
            hparams["batch_size"] = rollout


def _literal(node: ast.AST, where: str) -> Any:
    """A literal, a list, a {...} or dict(...) of them, or `nn.<Name>` (as "Name"); else ValueError."""
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in ("nn", "th"):
        return node.attr
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        return {kw.arg: _literal(kw.value, f"{where}.{kw.arg}") for kw in node.keywords}
    if isinstance(node, ast.Dict):
        return {_literal(k, where) if k is not None else None: _literal(v, where)
                for k, v in zip(node.keys, node.values, strict=True)}
    if isinstance(node, ast.List | ast.Tuple):
        return [_literal(item, where) for item in node.elts]
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise ValueError(f"{where} is not a literal ({ast.unparse(node)}): it is not evaluated") from None


def parse_policy_kwargs(text: str) -> dict[str, Any]:
    """"dict(net_arch=[64, 64], activation_fn=nn.ReLU)" -> {"net_arch": [64, 64], "activation_fn": "ReLU"}:
    literals, dict(...) and `nn.<Name>` only; anything else is a ValueError (nothing is evaluated)."""
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as exc:
        raise ValueError(f"policy_kwargs is not an expression: {exc.msg}") from None
    if not (isinstance(tree, ast.Dict) or (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name)
                                           and tree.func.id == "dict")):
        raise ValueError("policy_kwargs must be dict(...) or {...} of literals and nn.<Activation>")
    return {str(k): v for k, v in _literal(tree, "policy_kwargs").items()}


def _policy_kwargs(value: Any, hparams: dict[str, Any], notes: list[str]) -> None:
    kwargs = parse_policy_kwargs(value) if isinstance(value, str) else dict(value)
    arch = kwargs.pop("net_arch", None)
    if isinstance(arch, dict):
        pi, vf = arch.get("pi"), arch.get("vf")
        if pi == vf and pi is not None:
            arch = pi
        else:
            notes.append(f"policy_kwargs.net_arch {arch}: separate policy and value widths are not supported "
                         f"(labfleet uses one net_arch for both)")
            arch = None
    if isinstance(arch, list) and arch and isinstance(arch[0], dict):  # SB3 < 1.8: [dict(pi=..., vf=...)]
        notes.append(f"policy_kwargs.net_arch {arch}: the old shared-layers form is not supported")
        arch = None
    if arch is not None:
        hparams["net_arch"] = arch
    activation = kwargs.pop("activation_fn", None)
    if activation is not None:
        if activation in ACTIVATIONS:
            hparams["activation"] = ACTIVATIONS[activation]
        else:
            notes.append(f"policy_kwargs.activation_fn nn.{activation}: labfleet has {', '.join(ACTIVATIONS)}")
    for key, item in kwargs.items():
        notes.append(f"policy_kwargs.{key}={item!r}: not a labfleet hyperparameter")


_NORMALIZE_KEYS = {"norm_obs": "obs", "norm_reward": "reward", "clip_obs": "clip_obs",
                   "clip_reward": "clip_reward", "epsilon": "epsilon"}


def _normalize(value: Any, extra: Any, hparams: dict[str, Any], notes: list[str]) -> None:
    """The zoo's `normalize: true` or "dict(norm_obs=True, norm_reward=False)" (parsed, never evaluated)
    as hparams.normalize; VecNormalize's own gamma is the algorithm's here."""
    if isinstance(value, str):
        value = _literal(ast.parse(value.strip(), mode="eval").body, "normalize")
    if isinstance(value, bool):
        settings: dict[str, Any] = {"obs": value, "reward": value}
    elif isinstance(value, dict):
        settings = {"obs": True, "reward": True}
        for key, item in value.items():
            if key in _NORMALIZE_KEYS:
                settings[_NORMALIZE_KEYS[key]] = item
            else:
                notes.append(f"normalize.{key}={item!r}: not a setting of labfleet's normalisation")
    else:
        raise ValueError(f"normalize must be true, false or dict(...), not {value!r}")
    if extra is not None:
        notes.append(f"normalize_kwargs={extra!r}: not read (labfleet's normalize takes obs, reward, clip_obs, "
                     f"clip_reward, epsilon)")
    hparams["normalize"] = settings


# SB3's AtariWrapper in gymnasium's wrappers: no-op starts, frame skip with max-pooling, 84x84 grayscale,
# and its reward clipping (for training only, so evaluations report the game's score).
_ATARI_WRAPPER: list[dict[str, Any]] = [
    {"type": "AtariPreprocessing",
     "kwargs": {"noop_max": 30, "frame_skip": 4, "screen_size": 84, "grayscale_obs": True}},
    {"type": "ClipReward", "kwargs": {"min_reward": -1.0, "max_reward": 1.0}, "train_only": True},
]


def _env_wrappers(value: Any, notes: list[str]) -> list[dict[str, Any]]:
    """The zoo's `env_wrapper` (a dotted name, a {name: kwargs} mapping, or a list of them) as env_wrappers:
    SB3's AtariWrapper becomes gymnasium's AtariPreprocessing (plus train-only reward clipping); any other
    class is named by import path, and is kept only when it imports as a gymnasium.Wrapper subclass."""
    from labfleet.rollout.envs import wrapper_class

    out: list[dict[str, Any]] = []
    for item in value if isinstance(value, list) else ([] if value is None else [value]):
        name, kwargs = (next(iter(item.items())) if isinstance(item, dict) else (item, None))
        if name.rsplit(".", 1)[-1] == "AtariWrapper":
            out += [{**w, "kwargs": dict(w["kwargs"])} for w in _ATARI_WRAPPER]
            if kwargs:
                notes.append(f"env_wrapper AtariWrapper kwargs {kwargs!r}: AtariPreprocessing's defaults are used")
            continue
        module, _, attr = str(name).rpartition(".")
        path = f"{module}:{attr}"
        try:
            wrapper_class(path)
        except (ImportError, TypeError) as exc:
            notes.append(f"env_wrapper {name}: {exc}")
            continue
        out.append({"type": path, "kwargs": dict(kwargs) if isinstance(kwargs, dict) else {}})
    return out


def zoo_entry(document: dict[str, Any], env_id: str, algorithm: str) -> Imported:
    """The spec for `env_id` of a zoo file (already parsed), with notes on what was left out or changed."""
    entry = dict(document[_entry_key(document, env_id)])
    notes: list[str] = []
    changes: list[str] = []
    hparams: dict[str, Any] = {}
    steps = entry.pop("n_timesteps", None)
    policy = entry.pop("policy", "MlpPolicy")
    if policy == "CnnPolicy":
        hparams["encoder"] = "nature_cnn"
    elif policy != "MlpPolicy":
        notes.append(f"policy {policy}: labfleet's encoders are an MLP's input or the Nature-DQN CNN")
    if "policy_kwargs" in entry:
        _policy_kwargs(entry.pop("policy_kwargs"), hparams, notes)
    if "normalize" in entry:
        _normalize(entry.pop("normalize"), entry.pop("normalize_kwargs", None), hparams, notes)
    wrappers = _env_wrappers(entry.pop("env_wrapper", None), notes)
    if "frame_stack" in entry:  # stacked after the zoo's own wrappers, as its VecFrameStack is
        wrappers.append({"type": "FrameStackObservation", "kwargs": {"stack_size": int(entry.pop("frame_stack"))}})
    for key in ("callback", "vec_env_wrapper", "env_kwargs", "use_sde", "sde_sample_freq"):
        if key in entry:
            notes.append(f"{key}={entry.pop(key)!r}: not supported by labfleet yet")
    hparams.update(entry)
    _sb3_semantics(algorithm, hparams, changes)
    spec: dict[str, Any] = {"name": f"{env_id.lower().replace('/', '-')}-{algorithm}", "algorithm": algorithm,
                            "env": env_id, "seeds": [0, 1, 2],
                            "budget": {"env_steps": int(float(steps)) if steps is not None else 100_000},
                            "hparams": hparams, "eval": {"episodes": 10}, "tracking": {"experiment": env_id}}
    if wrappers:
        spec["env_wrappers"] = wrappers
        if any(w["type"] == "AtariPreprocessing" for w in wrappers):  # it skips frames itself
            spec["env_kwargs"] = {"frameskip": 1}
    if steps is None:
        notes.append("no n_timesteps: budget.env_steps is 100000; set your own")
    return Imported(spec, notes, changes)


def drop_rejected(imported: Imported, problems: list[tuple[str, str]]) -> None:
    """Leave out the hparams labfleet's model refuses (named by `problems`: (field path, message))."""
    for path, message in problems:
        parts = path.split(".")
        if len(parts) >= 2 and parts[0] == "hparams" and parts[1] in imported.spec["hparams"]:
            value = imported.spec["hparams"].pop(parts[1])
            imported.notes.append(f"{parts[1]}={value!r}: {message}")


def render(imported: Imported, source: str) -> str:
    head = [f"# Imported by labfleet zoo-import from {source}."]
    if imported.changes:
        head.append("# Written as SB3 would run the entry:")
        head += [f"#   - {change}" for change in imported.changes]
    if imported.notes:
        head.append("# Left out (labfleet cannot take them):")
        head += [f"#   - {note}" for note in imported.notes]
    return "\n".join(head) + "\n" + yaml.safe_dump(imported.spec, sort_keys=False)
