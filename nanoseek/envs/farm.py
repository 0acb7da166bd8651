"""`farm`: one maize season on 1 ha in 8 decisions of 14 days (irrigate how many mm, apply how much nitrogen,
or harvest now); score = profit ($).

Soil water: the FAO-56 daily root-zone water balance (Allen, Pereira, Raes & Smith 1998, "Crop
evapotranspiration", FAO Irrigation and Drainage Paper 56, ch. 8), with no runoff and no capillary rise:
    D_i = D_{i-1} - P_i - I_i + ETa_i + DP_i                      (eq. 85; D = root-zone depletion, mm)
    DP_i = max(0, P_i + I_i - ETa_i - D_{i-1})                     (eq. 88; deep percolation)
    ETa_i = Ks_i * Kc_i * ET0_i,  Ks = 1 if D_{i-1} <= RAW else (TAW - D_{i-1}) / (TAW - RAW)   (eq. 84)
    TAW = 130 mm (a 1 m root zone of sandy loam, ~0.13 m3/m3 between field capacity and wilting; Table 19),
    RAW = p * TAW with p = 0.55 (maize, Table 22); D starts at 30 mm.
    Kc: maize (Tables 11-12) with the stages scaled to 112 days: 0.3 for days 0-17, rising to 1.2 by day 50,
    1.2 to day 87, falling to 0.35 at day 112.
Water is kept in whole tenths of a mm (each day's ETa, rain and DP rounded to 0.1 mm), which makes the
state discrete and the oracle's DP exact. Conservation (checked every period by the tests):
D_now = D_0 + sum(ETa) + sum(DP) - sum(P) - sum(I).

Weather (drawn from the seed before the season, independent of the actions): rain occurrence is a first-order
Markov chain (P(wet | dry) = 0.25, P(wet | wet) = 0.55) with exponential amounts, mean 7 mm times a
year factor ~ U(0.6, 1.4) (the structure of Richardson's WGEN, Water Resources Research 17(1), 1981);
mean temperature T = T_year + 3 sin(pi d / 112) + AR(1) noise (0.7, sd 1.5 degC), T_year ~ U(19, 23);
ET0 by Hargreaves (FAO-56 eq. 52): 0.0023 * 0.408 * Ra * (T + 17.8) * sqrt(Tmax - Tmin) with
Ra = 38 MJ/m2/day (mid-latitude summer) and a daily range of 13 degC, 8 on wet days.

Crop: growing degree days above 10 degC; the crop is ripe at 1250 degC-days ("grow" 100%) and fills grain
from 55%. Yield (t/ha) = 11 * fN * fill * (1 - loss) * max(0, 1 - Ky (1 - sum ETa / sum ETm)), Ky = 1.25:
the FAO-33 yield response to water (Doorenbos & Kassam 1979) with the sums over the days before the earlier
of harvest and ripeness (ETm = Kc * ET0); fill = the share of grain filling done at harvest (1 once ripe);
loss = 0.5% a day of field losses after ripeness; fN = 1 - 0.45 exp(-0.02 N) a Mitscherlich response to
the nitrogen N (kg/ha) applied before day 56 (later N is wasted). The harvest comes at a decision ("harvest")
or at day 112 on its own.
Money: maize $200/t, water $1.5/mm (= $0.15/m3), nitrogen $1.1/kg N (urea at ~$500/t); round figures of
the right order, not a calibration. An invalid reply costs $50 and counts as "w0 n0".

Policies: `random`: "harvest" with probability 1/8, else a uniform irrigation and nitrogen level. `heuristic`:
100 kg N at the first decision; irrigate when the depletion is over 60 mm, the depletion rounded down to 10 mm
(at most 80); harvest at the first decision after ripeness (with the `noise` knob, sim.py, some turns'
amounts one or two steps off). `oracle`: dynamic programming with the known
weather: for each reachable total N and each harvest day, the yield is linear in sum ETa, so the best
irrigation plan is an exact DP over the depletion (0..130 mm in 0.1 mm) and the 9 irrigation levels; the
best of those plans. An upper bound on every seed for any policy, which cannot see the weather ahead.
"""

from __future__ import annotations

import math
import random
import re
from typing import Any, ClassVar

import numpy as np

from nanoseek.envs.sim import ActionError, Simulator, plot_episodes

TURN_DAYS, DECISIONS = 14, 8
SEASON = TURN_DAYS * DECISIONS
TAW, RAW, START_DEPLETION = 1300, 715, 300  # tenths of a mm
N_DEADLINE = 56  # N applied from this day on is wasted
RIPE_GDD, FILL_FROM = 1250.0, 0.55
YMAX, KY, PRICE, WATER_COST, N_COST = 11.0, 1.25, 200.0, 1.5, 1.1
IRRIGATION = tuple(range(0, 81, 10))  # mm
NITROGEN = tuple(range(0, 101, 20))  # kg/ha
ACTION = re.compile(r"w(\d{1,3}) n(\d{1,3})")


def crop_coefficient(day: int) -> float:
    """FAO-56 maize Kc, the stages scaled to the 112-day season."""
    if day < 18:
        return 0.3
    if day < 50:
        return 0.3 + 0.9 * (day - 18) / 32
    if day < 87:
        return 1.2
    return 1.2 - 0.85 * (day - 87) / 25


def n_factor(n: float) -> float:
    return 1 - 0.45 * math.exp(-0.02 * n)


class Farm(Simulator):
    name: ClassVar[str] = "farm"
    description: ClassVar[str] = "a maize season in 14-day decisions: irrigation, nitrogen, harvest; profit (FAO-56)"
    defaults: ClassVar[dict[str, Any]] = {"max_turns": DECISIONS, "noise": 0.0}
    n_decisions: ClassVar[int] = DECISIONS
    penalty: ClassVar[float] = 50.0
    null_action: ClassVar[Any] = (0, 0)
    null_text: ClassVar[str] = "w0 n0"

    def _new_world(self, seed: int) -> None:
        rng = random.Random(seed)
        rain_scale, t_year = rng.uniform(0.6, 1.4), rng.uniform(19, 23)
        wet, noise, rain, et0, gdd = False, 0.0, [], [], [0.0]
        for day in range(SEASON):
            wet = rng.random() < (0.55 if wet else 0.25)
            rain.append(round(rng.expovariate(1 / 7) * rain_scale * 10) if wet else 0)
            noise = 0.7 * noise + rng.gauss(0, 1.5)
            temp = t_year + 3 * math.sin(math.pi * day / SEASON) + noise
            et0.append(0.0023 * 0.408 * 38 * (temp + 17.8) * math.sqrt(8 if wet else 13))
            gdd.append(gdd[-1] + max(0.0, temp - 10))
        self.rain: list[int] = rain  # tenths of a mm per day
        self.etm = [round(crop_coefficient(d) * 10 * et0[d]) for d in range(SEASON)]
        self.gdd = gdd  # gdd[d]: degree-days before day d
        self.ripe_day = next((d for d, g in enumerate(gdd) if g >= RIPE_GDD), SEASON + 1)
        self.t, self.depletion, self.n_applied, self.harvested = 0, START_DEPLETION, 0, False
        # the water ledger (tenths of a mm) and what counts toward the yield
        self.ledger = {"rain": 0, "irrigation": 0, "eta": 0, "dp": 0}
        self.eta_counted = 0  # ETa on the days before ripeness
        self.last_rain = 0
        self.yield_t = 0.0
        self._tables: tuple[np.ndarray, np.ndarray] | None = None
        self._plan: dict[tuple[int, int, int], str] = {}  # the oracle's action in each state it will reach

    # ------------------------------------------------------------------ the model
    def _period(self, depletion: Any, irrigation: Any, k: int) -> dict[str, Any]:
        """Period k's 14 days of the water balance from `depletion` with `irrigation` on its first day (tenths
        of a mm): the end depletion and the period's sums. Whole numbers for the episode, or arrays (broadcast)
        for the oracle's tables: the same arithmetic, rounding half to even both ways."""
        vector = isinstance(depletion, np.ndarray)
        minimum, maximum = (np.minimum, np.maximum) if vector else (min, max)
        to_int = (lambda x: np.rint(x).astype(np.int64)) if vector else round
        d = depletion + 0 * irrigation
        sums = {key: 0 * d for key in ("rain", "irrigation", "eta", "dp", "eta_counted")}
        for day in range(k * TURN_DAYS, (k + 1) * TURN_DAYS):
            rain = self.rain[day]
            inflow = rain + (irrigation if day == k * TURN_DAYS else 0)
            eta = to_int(minimum(1.0, (TAW - d) / (TAW - RAW)) * self.etm[day])  # Ks = 1 up to RAW (eq. 84)
            dp = maximum(0, inflow - eta - d)
            d = d - inflow + eta + dp
            sums["rain"] += rain
            sums["irrigation"] += inflow - rain
            sums["eta"] += eta
            sums["dp"] += dp
            if day < self.ripe_day:
                sums["eta_counted"] += eta
        sums["depletion"] = d
        return sums

    def _revenue_terms(self, day: int, n_applied: int) -> tuple[float, float]:
        """(a, b): a harvest on `day` (before that day's water) earns max(0, a + b * ETa counted), ETa in
        tenths of a mm; linear in ETa, which is what makes the oracle's DP exact."""
        cutoff = min(day, self.ripe_day)
        etm = float(sum(self.etm[:cutoff]))
        fill = 1.0 if day >= self.ripe_day else (self.gdd[day] / RIPE_GDD - FILL_FROM) / (1 - FILL_FROM)
        loss = 0.005 * max(0, day - self.ripe_day)
        scale = PRICE * YMAX * n_factor(n_applied) * min(1.0, max(0.0, fill)) * (1 - loss)
        return (scale * (1 - KY), scale * KY / etm) if etm > 0 else (0.0, 0.0)

    def _revenue(self, day: int, n_applied: int, eta_counted: int) -> float:
        a, b = self._revenue_terms(day, n_applied)
        return max(0.0, a + b * eta_counted)

    def _opening(self) -> str:
        return (
            f"Maize 1 ha, {DECISIONS} turns of {TURN_DAYS} days. Reply wX nY (irrigate X mm 0-80 step 10, "
            f"nitrogen Y kg 0-100 step 20, none after day {N_DEADLINE}) or harvest. "
            f"Water $1.5/mm, N $1.1/kg, crop up to ${PRICE * YMAX:.0f}. Stress when depl>{RAW // 10}, "
            f"ripe at grow 100.\nday rain depl grow\n{self._row()}"
        )

    def _row(self) -> str:
        grow = int(100 * self.gdd[self.t * TURN_DAYS] / RIPE_GDD)
        return f"{self.t * TURN_DAYS} {round(self.last_rain / 10)} {round(self.depletion / 10)} {grow}"

    def _parse(self, text: str) -> tuple[int, int] | str:
        if text == "harvest":
            return text
        m = ACTION.fullmatch(text)
        if not m:
            raise ActionError("syntax", "reply exactly wX nY or harvest")
        water, n = int(m.group(1)), int(m.group(2))
        if water not in IRRIGATION or n not in NITROGEN:
            raise ActionError("range", "X must be 0-80 step 10, Y 0-100 step 20")
        return water, n

    def _finished(self) -> bool:
        return self.harvested

    def _advance(self, action: tuple[int, int] | str) -> float:
        day = self.t * TURN_DAYS
        record = {"t": self.t, "depletion": self.depletion / 10, "grow": 100 * self.gdd[day] / RIPE_GDD}
        if action == "harvest":
            return self._harvest(day, record | {"irrigation": 0, "nitrogen": 0, "harvest": 1})
        water, n = action
        if day < N_DEADLINE:
            self.n_applied += n
        sums = self._period(self.depletion, water * 10, self.t)
        for key in self.ledger:
            self.ledger[key] += sums[key]
        self.eta_counted += sums["eta_counted"]
        self.depletion = sums["depletion"]
        self.last_rain = sums["rain"]
        self.t += 1
        cost = WATER_COST * water + N_COST * n
        record |= {"irrigation": water, "nitrogen": n, "harvest": 0, "rain": self.last_rain / 10}
        if self.t == DECISIONS:
            return self._harvest(SEASON, record) - cost
        self.log.append(record)
        return -cost

    def _harvest(self, day: int, record: dict[str, Any]) -> float:
        self.harvested = True
        revenue = self._revenue(day, self.n_applied, self.eta_counted)
        self.yield_t = revenue / PRICE
        self.log.append(record | {"yield": self.yield_t})
        return revenue

    # ------------------------------------------------------------------ policies
    def _random_action(self, rng: random.Random) -> str:
        if rng.random() < 1 / 8:
            return "harvest"
        return f"w{rng.choice(IRRIGATION)} n{rng.choice(NITROGEN)}"

    def _heuristic_action(self) -> str:
        if self.gdd[self.t * TURN_DAYS] >= RIPE_GDD:
            return "harvest"
        depletion = round(self.depletion / 10)
        water = min(80, depletion // 10 * 10) if depletion > 60 else 0
        return f"w{water} n{100 if self.t == 0 else 0}"

    def _perturbed_action(self, rng: random.Random) -> str:
        """Irrigation and (before the N deadline) nitrogen one or two steps off the rule's, clipped to their
        ranges; a harvest stays a harvest (the rule's timing is right, and a late one costs 0.5% a day)."""
        action = self._heuristic_action()
        if action == "harvest":
            return action
        water, n = self._parse(action)
        water = min(80, max(0, water + 10 * rng.choice((-2, -1, 1, 2))))
        if self.t * TURN_DAYS < N_DEADLINE:
            n = min(100, max(0, n + 20 * rng.choice((-2, -1, 1, 2))))
        return f"w{water} n{n}"

    def _oracle_action(self) -> str:
        state = (self.t, self.depletion, self.n_applied)
        if state not in self._plan:  # the first decision, or someone else played before: plan from here
            self._plan = self._best_plan()[1]
        return self._plan[state]

    def _period_tables(self) -> tuple[np.ndarray, np.ndarray]:
        """For each period, irrigation level and start depletion: the end depletion and the ETa counted."""
        if self._tables is None:
            depletion = np.arange(TAW + 1)[None, :]
            irrigation = np.array(IRRIGATION)[:, None] * 10
            periods = [self._period(depletion, irrigation, k) for k in range(DECISIONS)]
            self._tables = (
                np.stack([p["depletion"] for p in periods]),
                np.stack([p["eta_counted"] for p in periods]),
            )
        return self._tables

    def oracle_value(self) -> float:
        """The hindsight optimum's profit from the current state on (the DP's own number)."""
        return self._best_plan()[0]

    def _best_plan(self) -> tuple[float, dict[tuple[int, int, int], str]]:
        """The hindsight optimum from the current state: its profit from here on and its actions."""
        ends, etas = self._period_tables()
        t, n_done = self.t, self.n_applied
        n_decisions_left = sum(1 for k in range(t, DECISIONS) if k * TURN_DAYS < N_DEADLINE)
        # more than 160 kg in all never pays: the revenue's slope in N is at most 2200 * 0.45 * 0.02 e^(-0.02 N),
        # under the $1.1/kg from 145 kg on
        n_totals = range(n_done, max(n_done, min(n_done + 100 * n_decisions_left, 160)) + 1, 20)
        best: tuple[float, dict[tuple[int, int, int], str]] = (-math.inf, {})
        for harvest_turn in range(t, DECISIONS + 1):
            day = harvest_turn * TURN_DAYS
            if harvest_turn < DECISIONS and self._revenue_terms(day, n_done) == (0.0, 0.0):
                continue  # nothing to sell yet: waiting with no costs does at least as well
            for n_total in n_totals:
                a, b = self._revenue_terms(day, n_total)
                value, choices = np.zeros(TAW + 1), []
                for k in range(harvest_turn - 1, t - 1, -1):
                    q = b * etas[k] - WATER_COST * np.array(IRRIGATION)[:, None] + value[ends[k]]
                    choices.append(q.argmax(axis=0))
                    value = q.max(axis=0)
                total = a + b * self.eta_counted + float(value[self.depletion]) - N_COST * (n_total - n_done)
                if total > best[0]:
                    best = (total, self._actions(choices[::-1], harvest_turn, n_total - n_done))
        return best

    def _actions(self, choices: list[np.ndarray], harvest_turn: int, n_more: int) -> dict[tuple[int, int, int], str]:
        """A DP plan as the action in each state (decision, depletion, N applied) it passes through."""
        ends, _ = self._period_tables()
        plan, depletion, n_applied = {}, self.depletion, self.n_applied
        for i, k in enumerate(range(self.t, harvest_turn)):
            level = int(choices[i][depletion])
            n = min(100, n_more) if k * TURN_DAYS < N_DEADLINE else 0
            plan[(k, depletion, n_applied)] = f"w{IRRIGATION[level]} n{n}"
            n_more, n_applied, depletion = n_more - n, n_applied + n, int(ends[k][level][depletion])
        if harvest_turn < DECISIONS:
            plan[(harvest_turn, depletion, n_applied)] = "harvest"
        return plan

    @staticmethod
    def plot(path: str, logs: dict[str, list[dict[str, Any]]]) -> None:
        """Root-zone depletion and the irrigation and nitrogen decisions, per episode (e.g. model vs oracle)."""
        plot_episodes(path, "farm: depletion and decisions", logs, ["depletion"], ["irrigation", "nitrogen"], "mm, kg")


__all__ = ["Farm"]
