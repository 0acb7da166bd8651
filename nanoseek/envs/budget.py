"""`budget`: a city's budget over 2 years in 8 quarterly decisions, split across health, education and roads
(what is not spent is saved; overspending is debt), with lagged, saturating effects on three service indices,
random shocks (a storm, a downturn) and a welfare score.

State at the start of quarter t: the balance B_t ($M; negative = debt) and the indices I_k(t) (0-100 points)
of the services k = health, education, roads, plus the spending still in its lag. Each quarter:
    spend x_k in 0..25 $M on each service (the reply "H E R")
    B_{t+1} = (1 + r) B_t + R_t - sum_k x_k - E_t                  (the government budget identity)
    I_k(t+1) = (1 - d_k) I_k(t) + m_k(t - L_k) * a_k (1 - exp(-x_k(t - L_k) / s_k))
    W_t = mean_k I_k(t+1)                                          (welfare in quarter t)
Score = sum_t W_t + MU * B_8 (index points; MU = 0.25 points per $M left at the end, debt counts negative).
The spending effect is a distributed lag with geometric decay (Koyck, "Distributed Lags and Investment
Analysis", 1954) after a delay L_k, with diminishing (exponential, Mitscherlich-type) returns to spending;
the balance follows the government budget identity (e.g. Blanchard, "Macroeconomics", the chapter on debt),
one interest rate r = 2% a quarter on debt and reserves alike. Parameters (a, s, d, L):
health (14, 10, 0.20, 0), education (4, 12, 0.05, 2), roads (7, 10, 0.10, 1): education acts late and lasts,
health acts at once and fades. They are illustrative (each index sits near 50 at 13 $M a quarter, where the
city starts), not calibrated to a city. Revenue R_t = 40 $M a quarter; the balance starts at 10 $M.
Shocks (drawn from the seed before the first quarter; each shown when it happens): with probability 0.6 a
storm in a uniform quarter: it costs E = 8 $M, the roads index drops 15 points, and roads spending that
quarter and the next counts twice (m = 2, repairs); with probability 0.6 a downturn starting in a uniform
quarter 1..6: revenue 30 $M for 3 quarters, and health spending then counts 1.5 times (more need).
An invalid reply costs 3 points and counts as "0 0 0".
Conservation (checked every quarter by the tests): B_t = B_0 + revenue + interest earned - spending -
emergencies - interest paid.

Policies: `random`: each amount uniform in 0..25. `heuristic`: spend the quarter's revenue in equal shares
(R // 3 each; with the `noise` knob, sim.py, some turns' amounts 1-3 off). `oracle`: the exact optimum
with the known shocks: the score is a sum over (service, quarter) of C_k,s * g_k(x_k,s) - MU (1 + r)^(7 - s) x_k,s,
with C_k,s = m_k,s sum_{t >= s + L_k} (1 - d_k)^(t - s - L_k) / 3, separable and concave in each amount, so each amount
is its own argmax over 0..25. An upper bound on every seed for any policy, which cannot see the shocks ahead.
"""

from __future__ import annotations

import math
import random
import re
from typing import Any, ClassVar

from nanoseek.envs.sim import ActionError, Simulator, plot_episodes

QUARTERS, MAX_SPEND, REVENUE, DOWN_REVENUE, START_BALANCE = 8, 25, 40, 30, 10.0
RATE, MU, STORM_COST, STORM_DAMAGE = 0.02, 0.25, 8, 15.0
SERVICES = ("health", "education", "roads")
GAIN, SCALE, DECAY, LAG = (14.0, 4.0, 7.0), (10.0, 12.0, 10.0), (0.2, 0.05, 0.1), (0, 2, 1)
BASE_SPEND = 13  # what the city spent a quarter before the episode (the lagged spending in the pipeline)
ACTION = re.compile(r"(\d{1,3}) (\d{1,3}) (\d{1,3})")


def effect(k: int, x: float) -> float:
    return GAIN[k] * (1 - math.exp(-x / SCALE[k]))


class Budget(Simulator):
    name: ClassVar[str] = "budget"
    description: ClassVar[str] = "a city's budget, 8 quarters: health, education, roads; lags, shocks, debt; welfare"
    defaults: ClassVar[dict[str, Any]] = {"max_turns": QUARTERS, "noise": 0.0}
    n_decisions: ClassVar[int] = QUARTERS
    penalty: ClassVar[float] = 3.0
    null_action: ClassVar[Any] = (0, 0, 0)
    null_text: ClassVar[str] = "0 0 0"

    def _new_world(self, seed: int) -> None:
        rng = random.Random(seed)
        storm = rng.randrange(QUARTERS) if rng.random() < 0.6 else None
        down = rng.randint(1, QUARTERS - 2) if rng.random() < 0.6 else None
        self.storm, self.down = storm, down
        self.revenue = [DOWN_REVENUE if down is not None and down <= q < down + 3 else REVENUE for q in range(QUARTERS)]
        # m[k][q]: how much spending on k in quarter q counts
        self.mult = [[1.0] * QUARTERS for _ in SERVICES]
        for q in range(QUARTERS):
            if storm is not None and q in (storm, storm + 1):
                self.mult[2][q] = 2.0
            if self.revenue[q] == DOWN_REVENUE:
                self.mult[0][q] = 1.5
        self.t, self.balance = 0, START_BALANCE
        self.index = [effect(k, BASE_SPEND) / DECAY[k] for k in range(len(SERVICES))]
        self.spent: list[tuple[int, ...]] = []  # the spending of each quarter so far
        self.ledger = {"revenue": 0.0, "interest_in": 0.0, "spending": 0.0, "emergency": 0.0, "interest_out": 0.0}
        self._shock()

    def _shock(self) -> None:
        """What happens at the start of quarter t before the decision: the storm's damage."""
        if self.t == self.storm:
            self.index[2] -= STORM_DAMAGE

    def _event(self) -> str:
        if self.t == self.storm:
            return " storm"
        return " downturn" if self.t == self.down else ""

    def _opening(self) -> str:
        return (
            f"City budget, {QUARTERS} quarters. Reply H E R ($M to health, education, roads; 0-{MAX_SPEND} each). "
            f"Unspent is saved, debt costs {RATE:.0%}/q. Score: mean index + {MU:g}/$M at end.\n"
            f"q rev bal h e r\n{self._row()}"
        )

    def _row(self) -> str:
        indices = " ".join(str(round(i)) for i in self.index)
        return f"{self.t} {self.revenue[self.t]} {round(self.balance)} {indices}{self._event()}"

    def _parse(self, text: str) -> tuple[int, ...]:
        m = ACTION.fullmatch(text)
        if not m:
            raise ActionError("syntax", "reply exactly three whole numbers H E R")
        amounts = tuple(int(g) for g in m.groups())
        if max(amounts) > MAX_SPEND:
            raise ActionError("range", f"each amount must be 0-{MAX_SPEND}")
        return amounts

    def _finished(self) -> bool:
        return self.t >= QUARTERS

    def _advance(self, amounts: tuple[int, ...]) -> float:
        t = self.t
        self.spent.append(amounts)
        interest = RATE * self.balance
        emergency = STORM_COST if t == self.storm else 0
        self.ledger["interest_in" if interest > 0 else "interest_out"] += abs(interest)
        self.ledger["revenue"] += self.revenue[t]
        self.ledger["spending"] += sum(amounts)
        self.ledger["emergency"] += emergency
        self.balance += interest + self.revenue[t] - sum(amounts) - emergency
        for k in range(len(SERVICES)):
            s = t - LAG[k]  # the quarter whose spending acts now
            x, m = (self.spent[s][k], self.mult[k][s]) if s >= 0 else (BASE_SPEND, 1.0)
            self.index[k] = (1 - DECAY[k]) * self.index[k] + m * effect(k, x)
        welfare = sum(self.index) / len(SERVICES)
        self.log.append({"t": t, **dict(zip(SERVICES, self.index)), "welfare": welfare, "balance": self.balance})
        self.log[-1] |= {f"{name} $M": x for name, x in zip(SERVICES, amounts)}
        self.t += 1
        if self._finished():
            return welfare + MU * self.balance
        self._shock()
        return welfare

    # ------------------------------------------------------------------ policies
    def _random_action(self, rng: random.Random) -> str:
        return " ".join(str(rng.randint(0, MAX_SPEND)) for _ in SERVICES)

    def _heuristic_action(self) -> str:
        share = self.revenue[self.t] // len(SERVICES)
        return " ".join([str(share)] * len(SERVICES))

    def _perturbed_action(self, rng: random.Random) -> str:
        """Each of the rule's amounts 1-3 $M off, clipped to 0-25."""
        moved = (int(x) + rng.choice((-3, -2, -1, 1, 2, 3)) for x in self._heuristic_action().split())
        return " ".join(str(min(MAX_SPEND, max(0, x))) for x in moved)

    def _oracle_action(self) -> str:
        return " ".join(str(self._best_amount(k, self.t)) for k in range(len(SERVICES)))

    def _best_amount(self, k: int, s: int) -> int:
        """The amount on service k in quarter s that maximises its own (separable) term of the score."""
        weight = self.mult[k][s] * sum((1 - DECAY[k]) ** (t - s - LAG[k]) for t in range(s + LAG[k], QUARTERS))
        price = MU * (1 + RATE) ** (QUARTERS - 1 - s)
        values = [weight / len(SERVICES) * effect(k, x) - price * x for x in range(MAX_SPEND + 1)]
        return max(range(MAX_SPEND + 1), key=values.__getitem__)

    @staticmethod
    def plot(path: str, logs: dict[str, list[dict[str, Any]]]) -> None:
        """The welfare and the spending on each service, per episode (e.g. model vs oracle)."""
        marks = [f"{name} $M" for name in SERVICES]
        plot_episodes(path, "budget: welfare and spending", logs, ["welfare"], marks, "points, $M")


__all__ = ["Budget"]
