"""Churn risk and customer lifetime value (流失预测), nightly.

Per customer with purchase history: probability of being alive and expected purchases in the next
``horizon_days`` (BG/NBD), expected value per purchase (Gamma-Gamma), CLV = their product. The
model comes from the ``lifetimes`` library when the ``analytics`` extra is installed (it runs with
numpy 2 / pandas 3 / scipy 1.17); with scipy alone the published BG/NBD and Gamma-Gamma
log-likelihoods are fitted here (vectorized); customers with fewer than ``min_repeat`` repeat
purchases, or installs without scipy, get a rule-based risk (days since the last purchase against
their own typical gap). ``churn_method`` records which one scored each customer.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any

from sqlalchemy import distinct, func, literal, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from scrm.store.dialect import insert_select_ignore
from scrm.store.models import Conversion, LoyaltyAccount

log = logging.getLogger(__name__)
HAS_LIFETIMES = importlib.util.find_spec("lifetimes") is not None
HAS_SCIPY = importlib.util.find_spec("scipy") is not None


@dataclass(frozen=True)
class Summary:
    """Per-customer RFM summary in the model's units (days), as numpy arrays."""

    customer_id: Any
    frequency: Any  # repeat purchase days
    recency: Any  # first to last purchase, days
    T: Any  # first purchase to the end of the period, days
    monetary: Any  # mean value per purchase day


async def summary(session: AsyncSession, end: datetime, start: datetime | None = None) -> Summary:
    """One grouped query: purchase days, first/last purchase and spend per customer, up to ``end``."""
    import numpy as np

    day = func.date(Conversion.created_at)
    query = (select(Conversion.customer_id, func.count(distinct(day)), func.min(Conversion.created_at),
                    func.max(Conversion.created_at), func.sum(Conversion.amount))
             .where(Conversion.kind == "order", Conversion.created_at < end).group_by(Conversion.customer_id))
    if start is not None:
        query = query.where(Conversion.created_at >= start)
    rows = (await session.execute(query)).all()
    if not rows:
        empty = np.zeros(0)
        return Summary(np.zeros(0, dtype=np.int64), empty, empty, empty, empty)
    ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    days = np.fromiter((r[1] for r in rows), dtype=float, count=len(rows))
    first = np.array([_ts(r[2]) for r in rows], dtype="datetime64[s]")
    last = np.array([_ts(r[3]) for r in rows], dtype="datetime64[s]")
    spend = np.fromiter((float(r[4] or 0) for r in rows), dtype=float, count=len(rows))
    end64 = np.datetime64(end.replace(microsecond=0), "s")
    # Purchases are counted per day, so recency and T are whole days between purchase dates.
    first_d, last_d = first.astype("datetime64[D]"), last.astype("datetime64[D]")
    recency = (last_d - first_d).astype(float)
    T = (end64.astype("datetime64[D]") - first_d).astype(float)
    return Summary(ids, days - 1, recency, T, spend / days)


def _ts(value: Any) -> datetime:
    return value if isinstance(value, datetime) else datetime.fromisoformat(str(value))


# -- BG/NBD and Gamma-Gamma (Fader, Hardie & Lee 2005; Fader, Hardie & Lee 2005b), vectorized


def bgnbd_loglik(params: Any, x: Any, t_x: Any, T: Any) -> Any:
    """Per-customer BG/NBD log-likelihood for parameters (r, alpha, a, b)."""
    import numpy as np
    from scipy.special import gammaln

    r, alpha, a, b = params
    a1 = gammaln(r + x) - gammaln(r) + r * np.log(alpha)
    a2 = gammaln(a + b) + gammaln(b + x) - gammaln(b) - gammaln(a + b + x)
    a3 = -(r + x) * np.log(alpha + T)
    with np.errstate(divide="ignore", invalid="ignore"):
        a4 = np.where(x > 0, np.log(a) - np.log(np.maximum(b + x - 1, 1e-12)) - (r + x) * np.log(alpha + t_x),
                      -np.inf)
    return a1 + a2 + np.logaddexp(a3, a4)


def fit_bgnbd(x: Any, t_x: Any, T: Any) -> dict[str, float]:
    """Maximum likelihood (log-parameters, Nelder-Mead then L-BFGS-B), as lifetimes does."""
    import numpy as np
    from scipy.optimize import minimize

    def objective(log_params: Any) -> float:
        return -float(np.sum(bgnbd_loglik(np.exp(log_params), x, t_x, T))) / len(x)

    start = np.log([1.0, max(float(np.mean(T)), 1.0), 1.0, 1.0])
    first = minimize(objective, start, method="Nelder-Mead", options={"maxiter": 4000, "xatol": 1e-8, "fatol": 1e-10})
    best = minimize(objective, first.x, method="L-BFGS-B")
    params = np.exp(best.x if best.fun <= first.fun else first.x)
    return dict(zip(("r", "alpha", "a", "b"), (float(p) for p in params)))


def bgnbd_p_alive(p: dict[str, float], x: Any, t_x: Any, T: Any) -> Any:
    import numpy as np

    r, alpha, a, b = p["r"], p["alpha"], p["a"], p["b"]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        ratio = np.where(x > 0, (a / (b + x - 1)) * np.exp((r + x) * (np.log(alpha + T) - np.log(alpha + t_x))), 0.0)
    return 1.0 / (1.0 + ratio)


def bgnbd_expected(p: dict[str, float], t: float, x: Any, t_x: Any, T: Any) -> Any:
    """Expected purchases in the next ``t`` days given each customer's history."""
    import numpy as np
    from scipy.special import hyp2f1

    r, alpha, a, b = p["r"], p["alpha"], p["a"], p["b"]
    z = t / (alpha + T + t)
    head = (a + b + x - 1) / (a - 1)
    tail = 1 - ((alpha + T) / (alpha + T + t)) ** (r + x) * hyp2f1(r + x, b + x, a + b + x - 1, z)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        denom = 1 + np.where(x > 0, (a / (b + x - 1)) * ((alpha + T) / (alpha + t_x)) ** (r + x), 0.0)
    return head * tail / denom


def fit_gamma_gamma(x: Any, m: Any) -> dict[str, float]:
    import numpy as np
    from scipy.optimize import minimize
    from scipy.special import gammaln

    def objective(log_params: Any) -> float:
        p, q, v = np.exp(log_params)
        ll = (gammaln(p * x + q) - gammaln(p * x) - gammaln(q) + q * np.log(v) + (p * x - 1) * np.log(m)
              + p * x * np.log(x) - (p * x + q) * np.log(x * m + v))
        return -float(np.sum(ll)) / len(x)

    best = minimize(objective, np.log([1.0, 1.0, 1.0]), method="Nelder-Mead", options={"maxiter": 4000})
    return dict(zip(("p", "q", "v"), (float(v) for v in np.exp(best.x))))


def gamma_gamma_value(g: dict[str, float], x: Any, m: Any) -> Any:
    p, q, v = g["p"], g["q"], g["v"]
    return ((q - 1) / (p * x + q - 1)) * (v * p / (q - 1)) + (p * x / (p * x + q - 1)) * m


@dataclass
class Fit:
    method: str
    bgnbd: dict[str, float]
    gamma_gamma: dict[str, float] | None


def fit(s: Summary, prefer_library: bool = True) -> Fit:
    """Fit both models on a summary: with lifetimes when installed, else the built-in scipy fit."""
    import numpy as np

    repeat = s.frequency > 0
    if prefer_library and HAS_LIFETIMES:
        from lifetimes import BetaGeoFitter, GammaGammaFitter
        from lifetimes.utils import ConvergenceError

        bgf = BetaGeoFitter(penalizer_coef=0.0)
        try:
            bgf.fit(s.frequency, s.recency, s.T)
        except ConvergenceError:  # lifetimes gives up on small or very regular bases: the built-in fit
            return fit(s, prefer_library=False)
        gamma = None
        if int(np.sum(repeat)) >= 3:
            ggf = GammaGammaFitter(penalizer_coef=0.0)
            try:
                ggf.fit(s.frequency[repeat], np.maximum(s.monetary[repeat], 1e-6))
                gamma = {k: float(v) for k, v in ggf.params_.items()}
            except Exception:  # noqa: BLE001  no usable spend variation: value falls back to each customer's own mean
                gamma = None
        return Fit("bgnbd", {k: float(v) for k, v in bgf.params_.items()}, gamma)
    gamma = (fit_gamma_gamma(s.frequency[repeat], np.maximum(s.monetary[repeat], 1e-6))
             if int(np.sum(repeat)) >= 3 else None)
    return Fit("bgnbd-scipy", fit_bgnbd(s.frequency, s.recency, s.T), gamma)


def rule_risk(s: Summary) -> Any:
    """Days since the last purchase against twice the customer's own typical gap (else 90 days), 0-1."""
    import numpy as np

    silent = s.T - s.recency
    with np.errstate(divide="ignore", invalid="ignore"):
        gap = np.where(s.frequency > 0, s.recency / np.maximum(s.frequency, 1), 90.0)
    return np.clip(silent / np.maximum(2 * gap, 1.0), 0.0, 1.0)


@dataclass(frozen=True)
class ScoreResult:
    scored: int
    by_model: int
    method: str
    params: dict[str, float]


async def score(session: AsyncSession, now: datetime, method: str = "auto", min_repeat: int = 1,
                horizon_days: int = 90, tier: str = "") -> ScoreResult:
    """Score every customer with purchases; model where there is enough history, rules elsewhere."""
    import numpy as np

    s = await summary(session, now + timedelta(seconds=1))  # purchases up to and including now
    n = len(s.customer_id)
    if not n:
        return ScoreResult(0, 0, "none", {})
    await insert_select_ignore(session, LoyaltyAccount.__table__, ["customer_id", "balance", "tier", "updated_at"],
                               select(Conversion.customer_id, literal(0), literal(tier), literal(now)).distinct()
                               .where(Conversion.kind == "order"))
    risk = rule_risk(s)
    p_alive = 1.0 - risk
    expected = np.full(n, np.nan)
    clv = np.full(n, np.nan)
    methods = np.full(n, "rules", dtype=object)
    params: dict[str, float] = {}
    used = "rules"
    modelled = s.frequency >= max(min_repeat, 0)
    if method == "auto" and (HAS_LIFETIMES or HAS_SCIPY) and int(np.sum(s.frequency > 0)) >= 3:
        try:
            fitted = fit(s)
        except Exception as exc:  # noqa: BLE001  a degenerate base (e.g. everyone bought once) cannot be fitted: rules it is
            log.warning("churn model not fitted (%s: %s); rule-based risk for everyone", type(exc).__name__, exc)
            fitted = None
        if fitted is not None:
            used, params = fitted.method, {**fitted.bgnbd, **(fitted.gamma_gamma or {})}
            m_alive = bgnbd_p_alive(fitted.bgnbd, s.frequency, s.recency, s.T)
            m_exp = bgnbd_expected(fitted.bgnbd, float(horizon_days), s.frequency, s.recency, s.T)
            value = (gamma_gamma_value(fitted.gamma_gamma, s.frequency, s.monetary) if fitted.gamma_gamma
                     else s.monetary)
            value = np.where(s.frequency > 0, value, s.monetary)
            p_alive = np.where(modelled, m_alive, p_alive)
            risk = np.where(modelled, 1.0 - m_alive, risk)
            expected = np.where(modelled, m_exp, expected)
            clv = np.where(modelled, m_exp * value, clv)
            methods = np.where(modelled, fitted.method, methods)
    rows = [{"customer_id": int(cid), "p_alive": round(float(pa), 4), "churn_risk": round(float(rk), 4),
             "expected_purchases": None if np.isnan(ex) else round(float(ex), 4),
             "clv": None if np.isnan(cv) else round(float(cv), 2), "churn_method": str(md), "scored_at": now}
            for cid, pa, rk, ex, cv, md in zip(s.customer_id, p_alive, risk, expected, clv, methods)]
    for start in range(0, len(rows), 5000):
        await session.execute(update(LoyaltyAccount), rows[start:start + 5000])
    return ScoreResult(n, int(np.sum(methods != "rules")), used, params)


class HoldoutError(ValueError):
    """The asked-for holdout cannot be checked (no orders, no days, no calibration customers): a usage
    problem to state plainly, unlike a model that fails to fit."""


@dataclass(frozen=True)
class HoldoutRow:
    """Customers with the same number of repeat purchase days in calibration (``repeat``: 0..5, 6+),
    and their mean repeat purchase days in the holdout: the model's and the counted."""

    repeat: str
    customers: int
    predicted: float
    actual: float


@dataclass(frozen=True)
class HoldoutCheck:
    """A fit on the purchases before ``calibration_end`` against the purchases from that day through
    ``holdout_end`` (inclusive), per calibration-frequency group, as Fader, Hardie & Lee (2005) check
    the BG/NBD on CDNOW; ``mae`` is the mean absolute error over the table's rows."""

    fit: Fit
    rows: list[HoldoutRow]
    calibration_end: date
    holdout_end: date
    last_order: date
    mae: float

    @property
    def holdout_days(self) -> int:
        return (self.holdout_end - self.calibration_end).days + 1

    @property
    def holdout_weeks(self) -> float:
        return self.holdout_days / 7

    def as_dict(self) -> dict[str, Any]:
        """The check for ``--json``: the same figures the text output prints."""
        return {"method": self.fit.method, "calibration_end": self.calibration_end.isoformat(),
                "holdout_end": self.holdout_end.isoformat(), "last_order": self.last_order.isoformat(),
                "holdout_days": self.holdout_days, "holdout_weeks": round(self.holdout_weeks, 2),
                "bgnbd": self.fit.bgnbd, "gamma_gamma": self.fit.gamma_gamma,
                "table": [{"repeat": r.repeat, "customers": r.customers, "predicted": round(r.predicted, 4),
                           "actual": round(r.actual, 4)} for r in self.rows],
                "mae": round(self.mae, 4)}


async def last_order_day(session: AsyncSession) -> date | None:
    """The day of the store's latest order: where a holdout on an old history really ends."""
    latest = await session.scalar(select(func.max(Conversion.created_at)).where(Conversion.kind == "order"))
    return None if latest is None else _ts(latest).date()


async def holdout(session: AsyncSession, calibration_end: date | None = None, holdout_end: date | None = None,
                  default_days: int = 90) -> HoldoutCheck:
    """Fit on purchases before ``calibration_end``; compare predicted with actual purchase days from
    then through ``holdout_end`` (default: the last order's day, not today, so that a history that
    ended long ago is not compared with years without data), per calibration-frequency group.
    Without ``calibration_end`` the holdout is the last ``default_days`` days."""
    import numpy as np

    last = await last_order_day(session)
    if last is None:
        raise HoldoutError("no orders in the store")
    end = holdout_end or last
    first = calibration_end or end - timedelta(days=default_days - 1)
    if first > end:
        raise HoldoutError(f"the calibration end {first} is after the holdout end {end}: no holdout days")
    first_at = datetime.combine(first, time())
    cal = await summary(session, first_at)
    if not len(cal.customer_id):
        raise HoldoutError(f"no orders before {first}: nothing to fit")
    days = (end - first).days + 1
    fitted = fit(cal)
    predicted = bgnbd_expected(fitted.bgnbd, float(days), cal.frequency, cal.recency, cal.T)
    after = await summary(session, datetime.combine(end + timedelta(days=1), time()), start=first_at)
    actual_by_id = dict(zip(after.customer_id.tolist(), (after.frequency + 1).tolist()))
    actual = np.array([actual_by_id.get(int(c), 0.0) for c in cal.customer_id])
    bucket = np.minimum(cal.frequency, 6).astype(int)
    rows = [HoldoutRow(f"{k}+" if k == 6 else str(k), int(mask.sum()), float(predicted[mask].mean()),
                       float(actual[mask].mean()))
            for k in range(7) if (mask := bucket == k).any()]
    mae = float(np.mean([abs(r.predicted - r.actual) for r in rows]))
    return HoldoutCheck(fitted, rows, first, end, last, mae)
