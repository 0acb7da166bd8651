"""What an environment is: a seeded, multi-turn episode the model acts in by writing assistant turns.

    env = make("guess_number", n=100)
    messages = env.reset(seed=0)                  # the opening chat messages
    result = env.step(assistant_text)             # StepResult(messages, reward, done, info)

`reset` returns the opening messages (system/user); each `step` takes one assistant turn and returns the
messages the environment appends (a `user` reply, or `tool` results), the turn's reward and whether the
episode is over. An episode's return is the sum of its turns' rewards; `score()` is its normalised score in
[0, 1] and `success()` whether it counts as solved. `step` never raises on any text: a malformed tool call
or an unreadable action is part of the episode (an error message, a zero reward), not a crash.

A subclass sets `name`, `description`, `defaults` (its knobs, `max_turns` among them), `policies` (the
scripted players with no model: "random", "expert", ...), the tools it offers (`tool_set`, from
`nanoseek.envs.tools`), and implements `_reset(seed)`, `respond(text)` (a turn that is not a tool call) and
`act(policy, messages, rng)`. Tool-calling turns are handled here: the calls run, their results come back
as `tool` messages and the episode goes on (until `max_turns`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, ClassVar

from nanoseek.envs.tools import Tool, tool_turn
from nanoseek.errors import InputError, unknown
from nanoseek.values import parse_value

Message = dict[str, Any]

# Seeds from here up are for held-out evaluation; training episodes and SFT transcripts use seeds below it,
# so an environment's held-out episodes are never the ones it was trained on (as the tasks' test split).
HELD_OUT_SEED_START = 1_000_000


@dataclass
class StepResult:
    """What the environment does with one assistant turn."""

    messages: list[Message]  # what it appends (role "user" or "tool"); [] when done
    reward: float  # this turn's reward (an episode's return = the sum over its turns)
    done: bool
    info: dict[str, Any] = field(default_factory=dict)  # {"tool_calls": n, "tool_errors": n, "invalid": bool}


def step_info(tool_calls: int = 0, tool_errors: int = 0, invalid: bool = False) -> dict[str, Any]:
    """The info every step reports (the runner sums tool_calls and tool_errors over an episode)."""
    return {"tool_calls": tool_calls, "tool_errors": tool_errors, "invalid": invalid}


class Env:
    """One episode at a time, seeded, no global state. See the module docstring."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {"max_turns": 1}  # knob -> default (its type is the knob's type)
    policies: ClassVar[tuple[str, ...]] = ("random", "expert")
    tool_set: ClassVar[tuple[Tool, ...]] = ()  # the tools the model may call ((): none)
    # True when reset and step are cheap and always end (plain Python, bounded work): the episode runner then
    # calls them in its own thread, with no worker thread and no time limit (`nanoseek.envs.episodes`)
    inline: ClassVar[bool] = False

    max_turns: int

    def __init__(self, **knobs: Any) -> None:
        self.knobs = resolve_knobs(self.name, self.defaults, knobs)
        for knob, value in self.knobs.items():
            if not isinstance(getattr(type(self), knob, None), property):  # `tools` (a knob too) is read from knobs
                setattr(self, knob, value)
        if self.max_turns < 1:
            raise InputError(f"env {self.name}: max_turns must be at least 1, got {self.max_turns}")
        self.turns = 0
        self.done = False
        self.tool_calls = 0
        self.tool_errors = 0

    # ------------------------------------------------------------------ the episode
    @property
    def tools(self) -> list[dict[str, Any]]:
        """The OpenAI function schemas of the tools offered ([] if none): what the chat template renders."""
        return [tool.schema() for tool in self.tool_set]

    def reset(self, seed: int) -> list[Message]:
        """Start an episode from `seed`: its opening chat messages."""
        self.turns, self.done, self.tool_calls, self.tool_errors = 0, False, 0, 0
        return self._reset(seed)

    def step(self, assistant_text: str) -> StepResult:
        """Take one assistant turn: run its tool calls, or else treat it as the action (`respond`)."""
        if self.done:
            return StepResult([], 0.0, True, step_info(invalid=True))
        self.turns += 1
        last = self.turns >= self.max_turns
        tools = {tool.name: tool for tool in self.tool_set}
        turn = tool_turn(assistant_text, tools) if tools else None
        if turn is not None:
            self.tool_calls += turn.calls
            self.tool_errors += turn.errors
            self.done = last  # a tool call in the last turn ends the episode unanswered
            return StepResult([] if last else turn.messages, 0.0, last, step_info(turn.calls, turn.errors))
        result = self.respond(assistant_text)
        if last and not result.done:
            result = StepResult([], result.reward, True, result.info)
        self.done = result.done
        return result

    def _reset(self, seed: int) -> list[Message]:
        raise NotImplementedError

    def respond(self, text: str) -> StepResult:
        """The environment's answer to a turn that is not a tool call (the model's action or answer)."""
        raise NotImplementedError

    def score(self) -> float:
        """The episode's normalised score in [0, 1] (so far)."""
        raise NotImplementedError

    def success(self) -> bool:
        """Whether the episode counts as solved."""
        return self.score() >= 1.0

    # ------------------------------------------------------------------ baselines with no model
    def act(self, policy: str, messages: list[Message], rng: random.Random) -> str:
        """The next assistant text of the scripted `policy`, given the conversation so far."""
        raise NotImplementedError

    def check_policy(self, policy: str) -> None:
        if policy not in self.policies:
            raise InputError(f"env {self.name}: {unknown('policy', policy, self.policies)}")

    def __repr__(self) -> str:
        knobs = ", ".join(f"{k}={v!r}" for k, v in self.knobs.items())
        return f"{type(self).__name__}({knobs})"


def resolve_knobs(env: str, defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The defaults with `given` applied, each value read as its default's type (a string from the command
    line is parsed: "n=1000", "tools=false"); an unknown knob or a bad value is one line naming it."""
    out = dict(defaults)
    for knob, value in given.items():
        if knob not in defaults:
            raise InputError(f"env {env}: {unknown('knob', knob, sorted(defaults))}")
        default = defaults[knob]
        kind = tuple[type(default[0]) if default else str, ...] if isinstance(default, tuple) else type(default)
        try:
            out[knob] = parse_value(value, kind, f"env {env}: knob {knob}")
        except ValueError as e:
            raise InputError(str(e)) from None
    return out
