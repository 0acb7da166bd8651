"""Episodes under continuous batching: many environments at once, each sequence's KV cache kept across turns.

    episodes = run_episodes(engine, tokenizer, envs, seeds, SamplingParams(max_new_tokens=64), group_size=8)
    ep.token_ids, ep.logprobs, ep.policy_mask   # everything after the prompt; 1 = the policy wrote it

`envs` holds group_size environments per seed (group g = envs[g*G:(g+1)*G], all reset with seeds[g]).
Each group's opening prompt is one engine request of n = G samples (the prompt is prefilled once). When
a sequence ends its turn (a stop token, or the turn's token limit), its environment steps on the turn's
text in a worker thread with a time limit, while the engine keeps decoding the others (an environment whose
calls are cheap and bounded, `Env.inline` (a prompt row, a task's verifier), is called in the loop's own
thread instead: no thread, no time limit). The new messages are rendered by the chat template (what
follows the assistant turn, up to and including the next assistant generation prompt) and appended to the
sequence's cache (`Engine.continue_sequence`): the history is never prefilled again. An episode ends when
its environment says done, at max_turns, when the context is full (`truncated`), or when its environment
raises or runs past the time limit (`error`: that episode only; the others go on).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from nanoseek.engine import Engine, SamplingParams
from nanoseek.engine.requests import Request, SequenceState
from nanoseek.envs.base import Env, Message, StepResult

ENV_TIMEOUT_S = 30.0  # default limit on one reset or step of an environment
_TURN = "\x00nanoseek-assistant-turn\x00"  # stands for an assistant turn's text when rendering what follows it


@dataclass
class Episode:
    """One finished episode: its tokens (with who wrote them), transcript and outcome."""

    env: str
    seed: int
    sample: int  # which of its group's samples
    prompt_ids: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)  # after the prompt: the policy's turns and the env's replies
    logprobs: list[float] = field(default_factory=list)  # the engine's log-prob of each policy token (0 elsewhere)
    policy_mask: list[int] = field(default_factory=list)  # 1: the policy wrote it (trained), 0: the environment
    messages: list[Message] = field(default_factory=list)
    tools: list[dict[str, Any]] = field(default_factory=list)
    turn_rewards: list[float] = field(default_factory=list)
    turn_spans: list[tuple[int, int]] = field(default_factory=list)  # each policy turn's [start, end) in token_ids
    turns: int = 0
    return_: float = 0.0  # the sum of the turn rewards
    score: float = 0.0
    success: bool = False
    truncated: bool = False  # the context filled up before the episode ended
    error: str | None = None  # the environment raised or hung: the episode ended there
    tool_calls: int = 0
    tool_errors: int = 0
    finish_reasons: list[str] = field(default_factory=list)  # each turn's engine finish reason
    wall_s: float = 0.0

    @property
    def texts(self) -> list[str]:
        """The assistant turns' texts."""
        return [m["content"] for m in self.messages if m["role"] == "assistant"]

    @property
    def policy_tokens(self) -> int:
        return sum(self.policy_mask)

    def to_dict(self) -> dict[str, Any]:
        """The transcript record `nanoseek eval --env` writes (no token ids)."""
        keys = ("env", "seed", "sample", "messages", "turn_rewards", "turns", "return_", "score", "success")
        out = {k: getattr(self, k) for k in keys}
        out.update(
            truncated=self.truncated,
            error=self.error,
            tool_calls=self.tool_calls,
            tool_errors=self.tool_errors,
            policy_tokens=self.policy_tokens,
            tokens=len(self.prompt_ids) + len(self.token_ids),
        )
        return out


class _Calls:
    """Environment calls in daemon threads: results arrive on a queue, each call has a deadline. A call that
    hangs keeps its thread (Python cannot stop one) but never blocks the runner or the interpreter's exit.
    An `inline` call runs at once in the caller's thread (no thread, no deadline); its result comes with the
    next `poll`."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s, self.results = timeout_s, queue.Queue()
        self.deadlines: dict[int, float] = {}  # episode -> when its call times out
        self.ready: list[tuple[int, Any, str | None]] = []  # inline calls' results, not yet polled

    @property
    def pending(self) -> bool:
        return bool(self.deadlines or self.ready)

    def start(self, episode: int, fn: Callable[[], Any], inline: bool = False) -> None:
        def run() -> tuple[int, Any, str | None]:
            try:
                return episode, fn(), None
            except Exception as e:  # an environment's bug ends its episode, nothing else
                return episode, None, f"{type(e).__name__}: {e}"

        if inline:
            self.ready.append(run())
            return
        self.deadlines[episode] = time.monotonic() + self.timeout_s
        threading.Thread(target=lambda: self.results.put(run()), daemon=True, name=f"env-{episode}").start()

    def poll(self, wait: bool) -> list[tuple[int, Any, str | None]]:
        """Calls that ended (waiting for one, up to the next deadline, if `wait` and none has), then the
        expired ones."""
        out, self.ready = self.ready, []
        if not self.deadlines:  # no thread running (inline calls only): nothing to read or time out
            return out
        wait = wait and not out
        timeout = max(0.0, min(self.deadlines.values()) - time.monotonic()) if wait else None
        try:
            while True:
                item = self.results.get(timeout=timeout) if wait and not out else self.results.get_nowait()
                if item[0] in self.deadlines:  # not already given up on
                    del self.deadlines[item[0]]
                    out.append(item)
        except queue.Empty:
            pass
        now = time.monotonic()
        for episode, deadline in list(self.deadlines.items()):
            if now >= deadline:
                del self.deadlines[episode]
                out.append((episode, None, f"timed out after {self.timeout_s:g} s"))
        return out


def render_after_turn(
    tokenizer: Any, history: list[Message], new: list[Message], tools: list[dict[str, Any]], stop_text: str
) -> str:
    """The text the chat template puts after an assistant turn (whose messages before it are `history`):
    the end of that turn, the `new` messages and the next assistant generation prompt. `stop_text`: the
    turn's own stop token's text, already in the cache, so left out."""
    text = tokenizer.apply_chat_template(
        [*history, {"role": "assistant", "content": _TURN}, *new], tools=tools or None, add_generation_prompt=True
    )
    after = text[text.index(_TURN) + len(_TURN) :]
    return after[len(stop_text) :] if stop_text and after.startswith(stop_text) else after


def run_episodes(
    engine: Engine,
    tokenizer: Any,
    envs: Sequence[Env],
    seeds: Sequence[int],
    params: SamplingParams,
    group_size: int = 1,
    max_turns: int | None = None,
    env_timeout_s: float = ENV_TIMEOUT_S,
    reprefill: bool = False,
) -> list[Episode]:
    """Play len(seeds) x group_size episodes at once; see the module docstring. `params.max_new_tokens` is
    each turn's limit; `params.n` is replaced by the group size. Episodes come back in `envs` order.
    `reprefill`: each turn is a new request that prefills the whole transcript again, the way without a
    continuation API (the baseline benchmarks/multiturn.py measures; the same tokens when greedy)."""
    G = group_size
    if len(envs) != len(seeds) * G:
        raise ValueError(f"run_episodes: {len(envs)} envs for {len(seeds)} seeds x group_size {G}")
    if len({id(env) for env in envs}) != len(envs):
        raise ValueError("run_episodes: every episode needs its own env object")
    t0 = time.perf_counter()
    episodes = [Episode(env=env.name, seed=seeds[i // G], sample=i % G, tools=env.tools) for i, env in enumerate(envs)]
    calls = _Calls(env_timeout_s)
    requests: dict[int, tuple[Request, int]] = {}  # episode -> its engine request and which sample it is
    seqs: dict[int, SequenceState] = {}  # episode -> its engine sequence, once admitted
    generating: set[int] = set()  # episodes whose sequence is producing a turn
    live = set(range(len(envs)))

    def append(i: int, delta: list[int]) -> None:
        """The environment's reply into episode i's sequence, and the next turn queued."""
        if not reprefill:
            engine.continue_sequence(seqs[i], delta, params.max_new_tokens)
            return
        engine.release_sequence(seqs.pop(i))
        ep = episodes[i]
        requests[i] = (engine.submit(ep.prompt_ids + ep.token_ids, replace(params, n=1), index=i, keep=True), 0)

    def end(i: int, error: str | None = None, truncated: bool = False) -> None:
        ep = episodes[i]
        ep.error, ep.truncated = ep.error or error, ep.truncated or truncated
        if error is None:
            ep.score, ep.success = float(envs[i].score()), bool(envs[i].success())
        ep.wall_s = time.perf_counter() - t0
        if i in seqs:
            engine.release_sequence(seqs[i])
        live.discard(i)
        generating.discard(i)

    with engine.inference():  # eval and inference mode held once for the whole loop
        try:
            # --- openings: every env resets in its thread; a group's identical prompts share one request
            for i, env in enumerate(envs):
                calls.start(i, lambda env=env, seed=seeds[i // G]: env.reset(seed), inline=env.inline)
            openings: dict[int, list[Message]] = {}
            while calls.pending:
                for i, messages, error in calls.poll(wait=True):
                    if error is not None:
                        end(i, f"reset: {error}")
                    else:
                        openings[i] = list(messages)
            prompts: dict[tuple[int, tuple[int, ...]], list[int]] = {}  # (group, prompt ids) -> episodes
            for i in sorted(openings):
                ep = episodes[i]
                ep.messages = openings[i]
                text = tokenizer.apply_chat_template(ep.messages, tools=ep.tools or None, add_generation_prompt=True)
                ep.prompt_ids = tokenizer.encode(text)
                prompts.setdefault((i // G, tuple(ep.prompt_ids)), []).append(i)
            for (group, ids), members in prompts.items():
                try:
                    request = engine.submit(list(ids), replace(params, n=len(members)), index=group, keep=True)
                except ValueError as e:  # the opening alone does not fit the context
                    for i in members:
                        end(i, truncated=True, error=f"prompt: {e}")
                    continue
                for k, i in enumerate(members):
                    requests[i] = (request, k)
                    generating.add(i)
            # --- the loop: decode, step the environments whose turn ended, append their replies
            while live:
                if engine.has_work:
                    engine.step()
                for i in sorted(generating):
                    request, k = requests[i]
                    if i not in seqs and request.seqs:
                        seqs[i] = request.seqs[k]
                    if i not in seqs or seqs[i].finish_reason is None:
                        continue
                    generating.discard(i)
                    _take_turn(engine, episodes[i], seqs[i])
                    text = episodes[i].messages[-1]["content"]
                    calls.start(i, lambda env=envs[i], text=text: env.step(text), inline=envs[i].inline)
                for i, result, error in calls.poll(wait=not engine.has_work):
                    if error is not None:
                        end(i, f"step: {error}")
                        continue
                    _after_step(engine, tokenizer, episodes[i], seqs[i], result, max_turns, append, end, i)
                    if i in live:
                        generating.add(i)
        except BaseException:  # no half-played episode left in the engine
            for request in {id(r): r for r, _ in requests.values()}.values():
                engine.abort(request)
            raise
    return episodes


def _take_turn(engine: Engine, ep: Episode, seq: SequenceState) -> None:
    """Record a finished turn: its tokens (policy), log-probs and text."""
    start = len(ep.token_ids)
    ep.token_ids += seq.tokens
    ep.logprobs += seq.logprobs
    ep.policy_mask += [1] * len(seq.tokens)
    ep.turn_spans.append((start, len(ep.token_ids)))
    ep.finish_reasons.append(seq.finish_reason)
    ep.turns += 1
    ep.messages.append({"role": "assistant", "content": engine.text(seq) or ""})


def _after_step(
    engine: Engine,
    tokenizer: Any,
    ep: Episode,
    seq: SequenceState,
    result: StepResult,
    max_turns: int | None,
    append: Callable[[int, list[int]], None],
    end: Callable[..., None],
    i: int,
) -> None:
    """Book the environment's step; end the episode, or append its reply to the sequence's cache."""
    ep.turn_rewards.append(float(result.reward))
    ep.return_ += float(result.reward)
    ep.tool_calls += int(result.info.get("tool_calls", 0))
    ep.tool_errors += int(result.info.get("tool_errors", 0))
    history = ep.messages[:-1]
    ep.messages += result.messages
    if result.done or not result.messages or (max_turns is not None and ep.turns >= max_turns):
        end(i)
        return
    stop_text = tokenizer.decode([seq.stop]) if isinstance(seq.stop, int) else ""
    delta = tokenizer.encode(render_after_turn(tokenizer, history, result.messages, ep.tools, stop_text))
    if seq.position >= engine.max_seq_len - 1 or len(delta) > engine.room(seq):
        end(i, truncated=True)
        return
    ep.token_ids += delta
    ep.logprobs += [0.0] * len(delta)
    ep.policy_mask += [0] * len(delta)
    append(i, delta)


__all__ = ["ENV_TIMEOUT_S", "Episode", "render_after_turn", "run_episodes"]
