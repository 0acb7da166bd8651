"""`inventory`: a shop orders stock for 8 weeks with a 2-week lead time, seasonal random demand, holding,
ordering and stock-out costs; score = profit ($).

The model is the textbook periodic-review inventory system with lost sales and a fixed lead time (Silver,
Pyke & Peterson, "Inventory Management and Production Planning and Scheduling", 3rd ed., ch. 7; Zipkin,
"Foundations of Inventory Management", ch. 9), one review per week.

State at the start of week t: stock on hand x_t (units, after that week's arrival) and the orders in transit.
Each week t = 0..7:
    order q_t in 0..100 units, paid at once: C*q_t + K*[q_t > 0]; it arrives at the start of week t + L
    demand d_t; sold s_t = min(x_t, d_t); lost l_t = d_t - s_t (each costs the goodwill G beyond the lost sale)
    profit_t = P*s_t - G*l_t - H*(x_t - s_t) - C*q_t - K*[q_t > 0]
    x_{t+1} = min(x_t - s_t + a_{t+1}, CAP); what arrives beyond CAP is discarded (paid for, lost)
At the end, stock on hand and still in transit is sold off at the salvage value S per unit.
Conservation (checked every week by the tests): initial stock + arrivals = sold + discarded + on hand.

Demand: mean mu_t = base + trend*t, plus PROMO in one promotion week; base ~ U(12, 25), trend ~ U(-2, 3)
units/week, the promotion week uniform in 1..7; all stated in the opening message as the forecast row.
The realised d_t is gamma-Poisson (negative binomial, the usual over-dispersed retail demand):
d_t ~ Poisson(mu_t * g_t), g_t ~ Gamma(shape 8, scale 1/8) (coefficient of variation ~ 0.35 + Poisson's).
Prices: P = $10 sale, C = $5 purchase, K = $50 per order, H = $0.20 per unit-week (a perishable good; ~200%
a year of its cost, against the 20-40% of durable goods), G = $2, S = $1 (a fifth of the cost); round
illustrative figures, not calibrated to a business. Units: items, $, weeks.

Start: 30 units on hand, 20 ordered before week 0 arriving in week 1.

Policies: `random` orders a uniform 0..100 each week. `heuristic`: order-up-to on the inventory position
(on hand + on order): the forecast demand of the lead time plus the review week (this week and the next two)
plus 30% safety stock; orders under 15 units skipped (the fixed fee). It ignores that orders placed in the last
two weeks arrive too late, and the spread of the demand (with the `noise` knob, sim.py, some orders 10-20
units off). `oracle`: dynamic programming
with the known future (the realised demand): with the demand known the order placed in week t only decides
what arrives in week t + 2, so the exact optimum is a one-dimensional DP over the stock on hand before each
arrival (0..CAP, whole units) and the arrival (0..100); an upper bound on every seed for any policy, which
cannot see the demand ahead. Orders that would arrive after week 7 are never worth it (S < C).
"""

from __future__ import annotations

import math
import random
import re
from typing import Any, ClassVar

import numpy as np

from nanoseek.envs.sim import ActionError, Simulator, plot_episodes

WEEKS, LEAD, MAX_ORDER, CAP = 8, 2, 100, 200
PRICE, COST, FEE, HOLD, GOODWILL, SALVAGE = 10.0, 5.0, 50.0, 0.2, 2.0, 1.0
PROMO = 25.0
START_STOCK, START_ARRIVALS = 30, {1: 20}
ACTION = re.compile(r"order (\d{1,4})")


def poisson(rng: random.Random, mean: float) -> int:
    """A Poisson draw by Knuth's product of uniforms (means here stay under ~100)."""
    limit, k, p = math.exp(-mean), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k


class Inventory(Simulator):
    name: ClassVar[str] = "inventory"
    description: ClassVar[str] = "a shop orders stock for 8 weeks: 2-week lead time, seasonal random demand; profit"
    defaults: ClassVar[dict[str, Any]] = {"max_turns": WEEKS, "noise": 0.0}
    n_decisions: ClassVar[int] = WEEKS
    penalty: ClassVar[float] = 20.0
    null_action: ClassVar[Any] = 0
    null_text: ClassVar[str] = "order 0"

    def _new_world(self, seed: int) -> None:
        rng = random.Random(seed)
        base, trend, promo = rng.uniform(12, 25), rng.uniform(-2, 3), rng.randint(1, WEEKS - 1)
        self.forecast = [round(base + trend * t + (PROMO if t == promo else 0.0)) for t in range(WEEKS)]
        self.demand = [poisson(rng, mu * rng.gammavariate(8, 1 / 8)) for mu in self.forecast]
        self.t, self.stock = 0, START_STOCK
        self.arrivals: dict[int, int] = dict(START_ARRIVALS)  # week -> units arriving at its start
        # the ledger of units, for the conservation check: in = start + arrived; out = sold + discarded
        self.arrived = self.sold = self.discarded = 0
        self.last = (0, 0)  # (demand, lost) of the week just played
        self._dp: tuple[dict[int, np.ndarray], dict[int, np.ndarray]] | None = None

    def _opening(self) -> str:
        return (
            f"Shop, {WEEKS} weeks. Reply: order N (N 0-{MAX_ORDER} units, arrives after {LEAD} weeks). "
            f"Price {PRICE:g}, cost {COST:g} +{FEE:g}/order, hold {HOLD:g}/unit/week, lost sale -{GOODWILL:g}, "
            f"leftover {SALVAGE:g}.\nforecast {' '.join(map(str, self.forecast))}\n"
            f"week demand lost stock onorder\n{self._row()}"
        )

    def _row(self) -> str:
        return f"{self.t} {self.last[0]} {self.last[1]} {self.stock} {sum(self.arrivals.values())}"

    def _parse(self, text: str) -> int:
        m = ACTION.fullmatch(text)
        if not m:
            raise ActionError("syntax", "reply exactly: order N")
        q = int(m.group(1))
        if q > MAX_ORDER:
            raise ActionError("range", f"N must be 0-{MAX_ORDER}")
        return q

    def _finished(self) -> bool:
        return self.t >= WEEKS

    def _advance(self, q: int) -> float:
        t, d = self.t, self.demand[self.t]
        profit = -(COST * q + (FEE if q else 0.0))
        if q:
            self.arrivals[t + LEAD] = self.arrivals.get(t + LEAD, 0) + q
        sold = min(self.stock, d)
        self.stock -= sold
        self.sold += sold
        profit += PRICE * sold - GOODWILL * (d - sold) - HOLD * self.stock
        self.log.append({"t": t, "order": q, "stock": self.stock + sold, "demand": d, "sold": sold})
        self.t = t + 1
        self.last = (d, d - sold)
        arrival = self.arrivals.pop(self.t, 0) if self.t < WEEKS else 0
        self.arrived += arrival
        room = CAP - self.stock
        self.discarded += max(0, arrival - room)
        self.stock += min(arrival, room)
        if self._finished():  # sell off what is left and what is still coming
            profit += SALVAGE * (self.stock + sum(self.arrivals.values()))
        return profit

    # ------------------------------------------------------------------ policies
    def _random_action(self, rng: random.Random) -> str:
        return f"order {rng.randint(0, MAX_ORDER)}"

    def _heuristic_action(self) -> str:
        position = self.stock + sum(self.arrivals.values())
        q = round(1.3 * sum(self.forecast[self.t : self.t + LEAD + 1])) - position
        return f"order {min(q, MAX_ORDER) if q >= 15 else 0}"

    def _perturbed_action(self, rng: random.Random) -> str:
        """The rule's order 10 or 20 units off, clipped to 0-100."""
        q = int(self._heuristic_action().split()[1]) + 10 * rng.choice((-2, -1, 1, 2))
        return f"order {min(MAX_ORDER, max(0, q))}"

    def _oracle_action(self) -> str:
        if self.t + LEAD >= WEEKS:
            return "order 0"
        stock = self.stock  # roll the known demand forward to the week the order lands
        for week in range(self.t, self.t + LEAD):
            stock -= min(stock, self.demand[week])
            stock = min(CAP, stock + (self.arrivals.get(week + 1, 0) if week + 1 < self.t + LEAD else 0))
        return f"order {int(self._plan()[1][self.t + LEAD][stock])}"

    def _plan(self) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
        """The hindsight DP: value[w][x] = the best profit from the arrival of week w on, with x units on hand
        before it (and nothing else still coming); best[w][x] = the arrival that achieves it."""
        if self._dp is None:
            xs, ys = np.arange(CAP + 1)[:, None], np.arange(MAX_ORDER + 1)[None, :]
            value = {WEEKS: SALVAGE * np.arange(CAP + 1, dtype=np.float64)}
            best: dict[int, np.ndarray] = {}
            for w in range(WEEKS - 1, LEAD - 1, -1):
                d = self.demand[w]
                stock = np.minimum(xs + ys, CAP)
                sold = np.minimum(stock, d)
                gain = PRICE * sold - GOODWILL * (d - sold) - HOLD * (stock - sold) - COST * ys - FEE * (ys > 0)
                total = gain + value[w + 1][stock - sold]
                best[w] = total.argmax(axis=1)
                value[w] = total.max(axis=1)
            self._dp = (value, best)
        return self._dp

    def oracle_value(self) -> float:
        """The hindsight optimum's profit from the start of the episode (the DP's own number)."""
        stock, profit = START_STOCK, 0.0
        for week in range(LEAD):  # the first weeks' arrivals are fixed
            d = self.demand[week]
            sold = min(stock, d)
            stock -= sold
            profit += PRICE * sold - GOODWILL * (d - sold) - HOLD * stock
            stock = min(CAP, stock + START_ARRIVALS.get(week + 1, 0)) if week + 1 < LEAD else stock
        return profit + float(self._plan()[0][LEAD][stock])

    @staticmethod
    def plot(path: str, logs: dict[str, list[dict[str, Any]]]) -> None:
        """Stock on hand (before each week's sales) and the orders, per episode (e.g. model vs oracle)."""
        plot_episodes(path, "inventory: stock and orders", logs, ["stock", "demand"], ["order"], "units")


__all__ = ["Inventory"]
