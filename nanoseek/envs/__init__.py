"""Environments: multi-turn episodes, tool use and single-turn tasks behind one interface.

    from nanoseek.envs import make
    env = make("guess_number", n=100)        # or "task:arithmetic", "calculator_arithmetic", ...
    messages = env.reset(seed=0)
    result = env.step("<assistant text>")     # StepResult(messages, reward, done, info)

- `base`: `Env` and `StepResult` (the contract), knob handling.
- `tools`: the `<tool_call>` format, parsing, running a call with its errors caught, the built-in tools
  `calculator` (`calculator.py`, exact, no eval) and `python` (the code sandbox).
- `task`: `task:NAME`, a built-in single-turn task as a one-turn environment.
- `guess_number`, `calculator_arithmetic`: the built-in multi-turn and tool-using environments.
- `reasoning_gym`: `reasoning_gym:DATASET` (the optional `reasoning-gym` package).
- `baselines`: `play_policy(env, policy, seed)`, an episode played by a scripted policy with no model.

Adding an environment: subclass `Env` in a module here and add it to `_BUILTIN` below (or call `register`).
"""

from __future__ import annotations

import importlib
from typing import Any

from nanoseek.envs.base import HELD_OUT_SEED_START, Env, StepResult
from nanoseek.errors import InputError, unknown

# name -> "module:Class", imported when first made (reasoning_gym imports an optional package)
_BUILTIN: dict[str, str] = {
    "task": "nanoseek.envs.task:TaskEnv",
    "guess_number": "nanoseek.envs.guess_number:GuessNumber",
    "calculator_arithmetic": "nanoseek.envs.calculator_arithmetic:CalculatorArithmetic",
    "reasoning_gym": "nanoseek.envs.reasoning_gym:ReasoningGymEnv",
    "farm": "nanoseek.envs.farm:Farm",
    "budget": "nanoseek.envs.budget:Budget",
    "inventory": "nanoseek.envs.inventory:Inventory",
}
ENVS: dict[str, type[Env]] = {}


def register(cls: type[Env]) -> type[Env]:
    """Add an environment class to the registry under `cls.name` (an error if another class has the name)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if ENVS.get(cls.name, cls) is not cls:
        raise ValueError(f"a different environment is already registered as {cls.name!r}")
    ENVS[cls.name] = cls
    return cls


def env_class(name: str) -> type[Env]:
    """The class registered as `name` (importing a built-in one on first use); a one-line error if none."""
    if name not in ENVS and name in _BUILTIN:
        module, cls = _BUILTIN[name].split(":")
        register(getattr(importlib.import_module(module), cls))
    if name not in ENVS:
        raise unknown("env", name, list_envs())
    return ENVS[name]


def list_envs() -> list[str]:
    return sorted(set(_BUILTIN) | set(ENVS))


def make(spec: str, **knobs: Any) -> Env:
    """A new environment from `NAME` or `NAME:ARG` (`task:arithmetic`, `reasoning_gym:leg_counting`)."""
    name, _, arg = spec.partition(":")
    cls = env_class(name)
    if getattr(cls, "takes_arg", False):
        return cls(arg or None, **knobs)
    if arg:
        raise InputError(f"env {name} takes no argument (got {spec!r}); write just {name}")
    return cls(**knobs)


def describe() -> list[dict[str, Any]]:
    """What `nanoseek env list` shows: each environment's name, description, knobs with defaults, policies,
    tools, and for `NAME:ARG` environments the ARGs there are (or why there are none: a package missing)."""
    out = []
    for name in list_envs():
        cls = env_class(name)
        takes_arg = getattr(cls, "takes_arg", False)
        try:
            args = cls.arguments() if takes_arg else []
        except InputError as e:  # an optional package missing: listed with why
            args = [str(e)]
        out.append(
            {
                "name": name + (":ARG" if takes_arg else ""),
                "description": cls.description,
                "knobs": dict(cls.defaults),
                "policies": cls.policies,
                "tools": [tool.name for tool in cls.tool_set],
                "args": args,
            }
        )
    return out


__all__ = ["ENVS", "HELD_OUT_SEED_START", "Env", "StepResult", "describe", "env_class", "list_envs", "make", "register"]
