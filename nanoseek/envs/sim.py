"""What the three simulators (`farm`, `budget`, `inventory`) share: a season of decisions, strict actions,
invalid replies, the three reference policies and the normalised score.

A simulator draws its whole exogenous future (weather, shocks, demand) from the seed at `reset`, before any
action, so an episode is a deterministic function of (seed, actions) and "the known future" is well defined.
Each assistant turn is one decision: `_parse` reads it strictly (only surrounding whitespace is ignored; an
`ActionError` says why not), `_advance` simulates one period and returns the score it earned. An invalid
reply gets the explanation plus the next observation, counts as a turn, costs `penalty` score units and the
period runs with `null_action` (nothing ordered, irrigated or spent): it never lengthens an episode.

Scores: `total` is the episode's score in the env's own units (profit in $, welfare points). The references
on a seed are the mean total of `N_RANDOM` random-policy episodes (seeded from the seed), the heuristic's
and the oracle's total. `score()` = (total - random) / (oracle - random), clipped to [-1, 1]: every oracle
here is the exact optimum with the known future, so nothing reaches above 1 (the tests check it), and the
lower clip keeps one disastrous episode from dominating a mean. Unlike the other envs' scores it can be
negative: a table of means must show random at 0 (issue 14), which a clip at 0 would lift. The episode's
return is the same number, all of it the last turn's reward: an episode cut short (the context full) returns
0, the random level. (Per-turn rewards of the score earned each period were tried first: a cut episode then
kept several periods' earnings, a return of ~6 against at most 1 for a finished one, an incentive to run out
of context: truncations rose from 3% to 14% in 6 RL steps; docs/LOG.md, 2026-12-01, simulators.)
`success()`: the episode beat (strictly) the heuristic's total on its seed.

The `noise` knob (default 0, in [0, 1]) makes the `heuristic` player noisy, for SFT transcripts with some
spread (`nanoseek data make --env farm --policy heuristic --set noise=0.3`): each turn, with probability
`noise`, it plays `_perturbed_action`, the rule's action with its numbers moved a step or two (never a random
action: a uniform farm action harvests early one time in eight). The references stay the clean policies'
(noise 0), and with noise 0 no random number is drawn: the transcripts are the rule's own. A model fine-tuned
only on the rule's transcripts copies its actions exactly (farm: token entropy ~0.005 at temperature 0.7),
which leaves RL nothing to explore (docs/LOG.md, 2026-12-01, third session, simulators).
"""

from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Any, ClassVar

from nanoseek.envs.base import Env, Message, StepResult, step_info
from nanoseek.errors import InputError

N_RANDOM = 16  # random-policy episodes averaged into a seed's random reference


class ActionError(ValueError):
    """An assistant turn that is not a valid action: `kind` (for counting) and the explanation it gets."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Simulator(Env):
    """A simulator's episode loop; a subclass supplies the world (see the module docstring)."""

    policies: ClassVar[tuple[str, ...]] = ("random", "heuristic", "oracle")
    n_decisions: ClassVar[int]
    penalty: ClassVar[float]  # score units an invalid reply costs
    null_action: ClassVar[Any]  # what an invalid reply counts as
    noise: float  # the knob (module docstring); each subclass's defaults has it at 0.0

    def __init__(self, **knobs: Any) -> None:
        super().__init__(**knobs)
        if not 0.0 <= self.noise <= 1.0:
            raise InputError(f"env {self.name}: knob noise must be in [0, 1], got {self.noise}")

    # ------------------------------------------------------------------ what a subclass implements
    def _new_world(self, seed: int) -> None:
        """Draw the exogenous future from `seed` and set the initial state (`self.t` = 0 decisions made)."""
        raise NotImplementedError

    def _opening(self) -> str:
        raise NotImplementedError

    def _parse(self, text: str) -> Any:
        """The action `text` states, or ActionError."""
        raise NotImplementedError

    def _advance(self, action: Any) -> float:
        """Simulate one decision period under `action` (may end the season); the score it earned."""
        raise NotImplementedError

    def _finished(self) -> bool:
        raise NotImplementedError

    def _row(self) -> str:
        """The observation after a period: one row of the table the opening message heads."""
        raise NotImplementedError

    def _random_action(self, rng: random.Random) -> str:
        raise NotImplementedError

    def _heuristic_action(self) -> str:
        raise NotImplementedError

    def _oracle_action(self) -> str:
        raise NotImplementedError

    def _perturbed_action(self, rng: random.Random) -> str:
        """The heuristic's action with its numbers moved a step or two (the noisy heuristic's other turns)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the episode
    def _reset(self, seed: int) -> list[Message]:
        self.seed = seed
        self.total = 0.0
        self.invalid = 0
        self.log: list[dict[str, Any]] = []  # one record per period (state and decision), for plots and tests
        self._new_world(seed)
        return [{"role": "user", "content": self._opening()}]

    def respond(self, text: str) -> StepResult:
        explanation = ""
        try:
            action = self._parse(text.strip())
        except ActionError as e:
            explanation = f"invalid: {e} (cost {self.penalty:g}; counted as {self.null_text})\n"
            action = self.null_action
            self.invalid += 1
            earned = -self.penalty
        else:
            earned = 0.0
        earned += self._advance(action)
        if self.turns >= self.max_turns:  # out of turns: the rest of the season runs with the null action
            while not self._finished():
                earned += self._advance(self.null_action)
        self.total += earned
        done = self._finished()
        reward = self.score() if done and getattr(self, "scoring", True) else 0.0
        messages = [] if done else [{"role": "user", "content": explanation + self._row()}]
        info = step_info(invalid=bool(explanation))
        return StepResult(messages, reward, done, info)

    null_text: ClassVar[str] = ""  # the null action as a reply

    # ------------------------------------------------------------------ scores
    def references(self) -> tuple[float, float, float]:
        """(random, heuristic, oracle) totals on this episode's seed and knobs (cached per seed); the clean
        policies' whatever this episode's `noise`."""
        knobs = dict(self.knobs, noise=0.0)
        return _references(type(self), tuple(sorted(knobs.items())), self.seed)

    def score(self) -> float:
        """(total - random) / (oracle - random) on this seed, clipped to [-1, 1]; 0 before the end."""
        if not self._finished():
            return 0.0
        rand, _, oracle = self.references()
        return max(-1.0, min(1.0, (self.total - rand) / max(oracle - rand, 1e-9)))

    def success(self) -> bool:
        return self._finished() and self.total > self.references()[1] + 1e-9

    def plot_vs_oracle(self, path: str | Path, label: str = "model") -> None:
        """One PNG of this (finished) episode beside the oracle's on the same seed (for the eval report)."""
        oracle = type(self)(**self.knobs)
        oracle.scoring = False
        play(oracle, "oracle", self.seed, random.Random(0))
        self.plot(str(path), {label: self.log, "oracle": oracle.log})

    @staticmethod
    def plot(path: str, logs: dict[str, list[dict[str, Any]]]) -> None:
        """The state over the episode and the decisions, one line style per episode (`plot_episodes`)."""
        raise NotImplementedError

    def act(self, policy: str, messages: list[Message], rng: random.Random) -> str:
        self.check_policy(policy)
        if policy == "random":
            return self._random_action(rng)
        if policy == "oracle":
            return self._oracle_action()
        if self.noise > 0 and rng.random() < self.noise:
            return self._perturbed_action(rng)
        return self._heuristic_action()


def play(env: Simulator, policy: str, seed: int, rng: random.Random) -> float:
    """Play one episode of `env` on `seed` with a scripted policy; its total score (env units)."""
    messages = env.reset(seed)
    while not env.done:
        text = env.act(policy, messages, rng)
        result = env.step(text)
        messages += [{"role": "assistant", "content": text}, *result.messages]
    return env.total


@functools.lru_cache(maxsize=4096)
def _references(cls: type[Simulator], knobs: tuple[tuple[str, Any], ...], seed: int) -> tuple[float, float, float]:
    """A pure function of (class, knobs, seed), cached: the episodes of a group share their seed's references."""

    def total(policy: str, rng_seed: int = 0) -> float:
        env = cls(**dict(knobs))
        env.scoring = False  # its own last turn must not ask for references (it is computing them)
        return play(env, policy, seed, random.Random(rng_seed))

    rand = sum(total("random", seed * 1000 + i) for i in range(N_RANDOM)) / N_RANDOM
    return rand, total("heuristic"), total("oracle")


def plot_episodes(
    path: str | Path, title: str, logs: dict[str, list[dict[str, Any]]], lines: list[str], marks: list[str], unit: str
) -> None:
    """One PNG: each episode's state keys `lines` over the periods and its decisions `marks` as markers, the
    episodes (e.g. {"model": ..., "oracle": ...}) told apart by line style; all keys in the same `unit`."""
    from nanoseek.plots import figure

    styles, markers = ["-", "--", ":", "-."], ["o", "x", "^", "s"]
    with figure(path, legend_fontsize=7) as ax:
        for e, (label, log) in enumerate(logs.items()):
            xs = [r["t"] for r in log]
            for k, key in enumerate(lines):
                ax.plot(xs, [r[key] for r in log], styles[e % 4], color=f"C{k}", label=f"{label}: {key}")
            for k, key in enumerate(marks):
                ax.plot(xs, [r[key] for r in log], markers[e % 4], color=f"C{len(lines) + k}", label=f"{label}: {key}")
        ax.set_title(title)
        ax.set_xlabel("decision")
        ax.set_ylabel(unit)


__all__ = ["N_RANDOM", "ActionError", "Simulator", "play", "plot_episodes"]
