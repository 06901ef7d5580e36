"""Recommendations, history import, churn/CLV scoring and the BG/NBD fit.

The fit test uses the CDNOW sample shipped inside the ``lifetimes`` package (the ``analytics``
extra) and compares both the library's fit and the built-in scipy fit with the published
parameters (Fader, Hardie & Lee 2005: r=0.243, alpha=4.414, a=0.793, b=2.426). The holdout test
stores orders drawn from a BG/NBD with known parameters, in a history that ended years ago."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import date, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from sqlalchemy import insert, select

from scrm import segments
from scrm.clock import ManualClock
from scrm.loyalty import churn, jobs, recommend
from scrm.loyalty.history import ImportResult, import_batch, read_orders
from scrm.profile import customer_view
from scrm.service import Service
from scrm.store.engine import make_engine, make_sessionmaker
from scrm.store.migrate import upgrade
from scrm.store.models import Conversion, Customer, LoyaltyAccount
from tests.conftest import cli_env
from tests.test_loyalty import LOYALTY

PUBLISHED = {"r": 0.243, "alpha": 4.414, "a": 0.793, "b": 2.426}
NOW = datetime(2026, 11, 27, 3, 0)


def cdnow() -> churn.Summary:
    pytest.importorskip("lifetimes")
    from lifetimes.datasets import load_cdnow_summary

    data = load_cdnow_summary(index_col=[0])
    return churn.Summary(np.asarray(data.index), data["frequency"].to_numpy(float), data["recency"].to_numpy(float),
                         data["T"].to_numpy(float), np.zeros(len(data)))


@pytest.mark.parametrize("library", [True, False], ids=["lifetimes", "scipy"])
def test_bgnbd_fit_matches_the_published_cdnow_parameters(library):
    s = cdnow()
    fitted = churn.fit(s, prefer_library=library).bgnbd if library else churn.fit_bgnbd(s.frequency, s.recency, s.T)
    for name, value in PUBLISHED.items():
        assert fitted[name] == pytest.approx(value, rel=0.01), (name, fitted)
    # p_alive and expected purchases agree with the library's own conditional formulas.
    from lifetimes import BetaGeoFitter

    bgf = BetaGeoFitter()
    bgf.params_ = __import__("pandas").Series(fitted)
    ours = churn.bgnbd_expected(fitted, 39.0, s.frequency, s.recency, s.T)
    theirs = bgf.conditional_expected_number_of_purchases_up_to_time(39, s.frequency, s.recency, s.T)
    assert np.allclose(ours, np.asarray(theirs), rtol=1e-6)
    assert np.allclose(churn.bgnbd_p_alive(fitted, s.frequency, s.recency, s.T),
                       np.asarray(bgf.conditional_probability_alive(s.frequency, s.recency, s.T)), rtol=1e-6)


@pytest.fixture
async def svc(make_config):
    service = Service(make_config(LOYALTY), ManualClock(NOW))
    await service.start(scheduler=False)
    yield service
    await service.stop()


def _history(n: int = 60) -> list[str]:
    """Synthetic order history: regular buyers (every ~20 days) and lapsed ones (stopped 200 days ago)."""
    rng = np.random.default_rng(7)
    lines = []
    for c in range(1, n + 1):
        lapsed = c % 3 == 0
        day = NOW - timedelta(days=int(rng.integers(300, 420)))
        stop = NOW - timedelta(days=int(rng.integers(150, 250)) if lapsed else 1)
        mean_gap = float(rng.uniform(8, 40))
        k = 0
        while day < stop:
            items = [{"sku": "A", "name": "奶粉", "quantity": 1, "price": 100}]
            if c % 2 == 0:
                items.append({"sku": "B", "name": "奶瓶", "quantity": 1, "price": 50})
            elif c % 5 == 0:
                items.append({"sku": "C", "name": "辅食", "quantity": 2, "price": 20})
            lines.append(json.dumps({"order_id": f"H{c}-{k}", "customer": f"#{c}", "date": day.isoformat(),
                                     "amount": float(rng.integers(80, 300)), "items": items}))
            day += timedelta(days=1 + int(rng.exponential(mean_gap)))
            k += 1
    return lines


async def test_import_recommend_and_score(svc, tmp_path):
    async with svc.sessions() as s, s.begin():
        for c in range(1, 61):
            s.add(Customer(id=c, display_name=f"c{c}", first_seen_at=NOW - timedelta(days=500),
                           last_seen_at=NOW, attributes={}))
    path = tmp_path / "orders.jsonl"
    path.write_text("\n".join(_history() + ['{"order_id": "X", "customer": "#999", "date": "2026-01-01"}',
                                            "not json"]) + "\n", "utf-8")
    for round_ in range(2):  # idempotent by order id
        result = ImportResult()
        with path.open(encoding="utf-8") as handle:
            batch = list(read_orders(path, handle))
        async with svc.sessions() as s, s.begin():
            await import_batch(s, batch, NOW, result)
        assert len(result.rejected) == 2 and "line" in result.rejected[0]
        assert (result.orders > 500) if round_ == 0 else (result.orders == 0 and result.skipped > 500)
    assert (await jobs.sweep(svc)).points == 0  # history earns no points

    night = await jobs.nightly(svc)
    assert night.pairs >= 2 and night.churn.scored == 60
    async with svc.sessions() as s:
        # Customer 5 bought A and C: B ("bought with A" by half the base) is not recommended to them
        # unless its lift says so; customer 1 (A only) gets something they have not bought.
        recs = await recommend.recommend_for(s, 1, 3)
        assert recs and all(r["sku"] != "A" for r in recs)
        account = await s.get(LoyaltyAccount, 1)
        assert [r["sku"] for r in account.recommendations] == [r["sku"] for r in recs]
        assert recommend.recommend({"recommendations": account.recommendations}, 1) in ("奶瓶", "辅食")
        lapsed, regular = await s.get(LoyaltyAccount, 3), await s.get(LoyaltyAccount, 1)
        assert lapsed.churn_risk > regular.churn_risk and lapsed.churn_method == regular.churn_method
        expected_method = regular.churn_method
        assert expected_method in (("bgnbd", "bgnbd-scipy") if churn.HAS_LIFETIMES else
                                   ("bgnbd-scipy",) if churn.HAS_SCIPY else ("rules",))
        if expected_method != "rules":
            assert regular.clv > 0 and 0 <= lapsed.p_alive < regular.p_alive <= 1
        # Between the two customers' risks, whichever method scored them (models and the rule-based
        # fallback of an install without the analytics extra put them on different scales).
        threshold = round((lapsed.churn_risk + regular.churn_risk) / 2, 6)
        at_risk = (await s.scalars(select(Customer.id).where(
            segments.condition(f"churn_risk > {threshold} and points >= 0", NOW)).order_by(Customer.id))).all()
        assert 3 in at_risk and 1 not in at_risk
        view = await customer_view(s, await s.get(Customer, 3))
        assert view["loyalty"]["churn"]["method"] == expected_method


def test_rule_risk_is_days_silent_against_own_gap():
    s = churn.Summary(np.array([1, 2, 3]), np.array([4.0, 0.0, 4.0]), np.array([80.0, 0.0, 80.0]),
                      np.array([90.0, 10.0, 400.0]), np.array([10.0, 10.0, 10.0]))
    risk = churn.rule_risk(s)
    assert risk[0] == pytest.approx(10 / 40) and risk[1] == pytest.approx(10 / 180) and risk[2] == 1.0


def test_cli_conversions_import_and_analytics_fit(tmp_path, store):
    env = cli_env(store)  # the chat below must not find a service someone left on the configured port

    def scrm(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "scrm", *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300, check=False)

    assert scrm("init").returncode == 0
    chat = subprocess.run([sys.executable, "-m", "scrm", "chat", "--as", "customer:ann"], cwd=tmp_path, env=env,
                          input="你好\n", capture_output=True, text=True, timeout=120, check=False)
    assert chat.returncode == 0, chat.stderr
    orders = tmp_path / "orders.csv"
    orders.write_text("order_id,customer,date,amount,sku,name,quantity,price\n"
                      "O1,console:ann,2026-01-05,120,A,奶粉,1,100\n"
                      "O1,console:ann,2026-01-05,120,B,奶瓶,1,20\n"
                      "O2,console:ann,2026-03-01,80,A,奶粉,1,80\n"
                      "O3,console:nobody,2026-03-01,80,A,奶粉,1,80\n", "utf-8")
    first = scrm("conversions", "import", str(orders))
    assert first.returncode == 1 and "imported 2 orders (3 items)" in first.stdout and "line 5" in first.stderr
    again = scrm("conversions", "import", str(orders))
    assert "imported 0 orders" in again.stdout and "2 already present" in again.stdout
    report = scrm("referrals", "report")
    assert report.returncode == 0 and "captures 0" in report.stdout
    fit = scrm("analytics", "fit", "--calibration-end", "2026-02-01")
    if churn.HAS_LIFETIMES or churn.HAS_SCIPY:
        # Two orders from one customer cannot identify four parameters: a clear message, no traceback.
        assert fit.returncode in (0, 1) and "Traceback" not in fit.stderr
    else:
        assert fit.returncode == 2 and "analytics extra" in fit.stderr


# A BG/NBD with known parameters (alpha in days: a purchase every 80 days on average while alive),
# 5000 customers whose first purchases fall in the first 12 weeks of 2019, 78 weeks of calibration
# and the rest of 2020 as the holdout; the store's last order is over five years before any "today".
BGNBD = {"r": 0.5, "alpha": 40.0, "a": 1.0, "b": 4.0}
HISTORY_START, CALIBRATION_END, OBSERVED_UNTIL = datetime(2019, 1, 1), date(2020, 6, 30), datetime(2021, 1, 1)


def bgnbd_orders(n: int, seed: int) -> list[tuple[int, datetime, float]]:
    """Orders (customer, time, amount) drawn as the BG/NBD says: a Poisson purchase rate per customer
    from Gamma(r, alpha), and after each repeat purchase the customer drops out with a p from Beta(a, b)."""
    rng = np.random.default_rng(seed)
    rate = rng.gamma(BGNBD["r"], 1 / BGNBD["alpha"], n)
    drop = rng.beta(BGNBD["a"], BGNBD["b"], n)
    span = (OBSERVED_UNTIL - HISTORY_START).days
    orders = []
    for c in range(n):
        t = float(rng.integers(0, 84)) + float(rng.uniform(0.3, 0.7))  # first purchase, days from the start
        times = [t]
        while (t := t + float(rng.exponential(1 / rate[c]))) < span:
            times.append(t)
            if rng.random() < drop[c]:  # dropping out happens after a repeat purchase, never after the first
                break
        spend = float(rng.gamma(4.0, 50.0))
        orders += [(c + 1, HISTORY_START + timedelta(days=t), round(float(rng.gamma(8.0, spend / 8)), 2))
                   for t in times]
    return orders


def expected_table(orders: list[tuple[int, datetime, float]],
                   holdout_end: date) -> list[tuple[str, int, float, float]]:
    """The holdout table's actual column counted straight from the orders: purchase days per customer
    before the calibration end and from it through the holdout end, grouped by repeat days (0..6+);
    with each group's standard error, the noise a prediction is judged against."""
    before: dict[int, set[date]] = {}
    after: dict[int, set[date]] = {}
    for customer, at, _ in orders:
        day = at.date()
        if day < CALIBRATION_END:
            before.setdefault(customer, set()).add(day)
        elif day <= holdout_end:
            after.setdefault(customer, set()).add(day)
    groups: dict[int, list[int]] = {}
    for customer, days in before.items():
        groups.setdefault(min(len(days) - 1, 6), []).append(len(after.get(customer, ())))
    return [(f"{k}+" if k == 6 else str(k), len(groups[k]), float(np.mean(groups[k])),
             float(np.std(groups[k], ddof=1) / np.sqrt(len(groups[k])))) for k in sorted(groups)]


async def test_holdout_ends_at_the_last_order_and_checks_per_frequency(store, tmp_path):
    pytest.importorskip("lifetimes")
    orders = bgnbd_orders(5000, seed=21)
    engine = make_engine(store["url"], store.get("schema_name"))
    try:
        await upgrade(engine)
        async with make_sessionmaker(engine)() as s, s.begin():
            seen = {c: at for c, at, _ in reversed(orders)}
            await s.execute(insert(Customer), [{"id": c, "display_name": f"c{c}", "first_seen_at": at,
                                                "last_seen_at": at, "attributes": {}} for c, at in seen.items()])
            await s.execute(insert(Conversion), [{"customer_id": c, "kind": "order", "order_id": f"G{i}",
                                                  "amount": amount, "created_at": at}
                                                 for i, (c, at, amount) in enumerate(orders)])
        async with make_sessionmaker(engine)() as s:
            check = await churn.holdout(s, CALIBRATION_END)
    finally:
        await engine.dispose()

    last = max(at for _, at, _ in orders).date()
    assert last >= date(2020, 12, 25) and check.last_order == check.holdout_end == last
    assert check.holdout_days == (last - CALIBRATION_END).days + 1 and 180 <= check.holdout_days <= 185
    assert check.holdout_weeks == pytest.approx(check.holdout_days / 7)
    # The parameters come back (a and b are the least determined: their standard errors here are ~10%).
    for name, tolerance in (("r", 0.1), ("alpha", 0.1), ("a", 0.25), ("b", 0.25)):
        assert check.fit.bgnbd[name] == pytest.approx(BGNBD[name], rel=tolerance), (name, check.fit.bgnbd)
    # The actual column is what the orders say; the model's predictions are close to it in every group.
    expected = expected_table(orders, last)
    assert [r.repeat for r in check.rows] == ["0", "1", "2", "3", "4", "5", "6+"]
    assert [(r.repeat, r.customers) for r in check.rows] == [(k, n) for k, n, _, _ in expected]
    assert [r.actual for r in check.rows] == pytest.approx([mean for _, _, mean, _ in expected], abs=1e-9)
    for r, (_, _, _, se) in zip(check.rows, expected):
        assert abs(r.predicted - r.actual) < 3 * se, (r, se)
    assert check.mae == pytest.approx(np.mean([abs(r.predicted - r.actual) for r in check.rows]))
    assert check.mae < 0.1  # customers buy 0.16 (no repeat in calibration) to 2.1 (6+) times in the holdout

    # The command prints the same check, in JSON and as text.
    from click.testing import CliRunner

    from scrm.cli import main

    config = tmp_path / "config.toml"
    config.write_text("[store]\n" + "".join(f'{k} = "{v}"\n' for k, v in store.items()), "utf-8")

    async def scrm(*args: str) -> Any:  # the command runs its own event loop: in a thread
        return await asyncio.to_thread(CliRunner().invoke, main, ["-c", str(config), "analytics", "fit", *args])

    as_json = await scrm("--calibration-end", f"{CALIBRATION_END}", "--json")
    assert as_json.exit_code == 0, as_json.output
    doc = json.loads(as_json.stdout)
    assert doc["holdout_end"] == last.isoformat() and doc["holdout_days"] == check.holdout_days
    assert doc["holdout_weeks"] == round(check.holdout_days / 7, 2) and doc["mae"] == round(check.mae, 4)
    assert doc["bgnbd"] == pytest.approx(check.fit.bgnbd)
    assert doc["table"] == [{"repeat": r.repeat, "customers": r.customers, "predicted": round(r.predicted, 4),
                             "actual": round(r.actual, 4)} for r in check.rows]
    text = await scrm("--calibration-end", f"{CALIBRATION_END}")
    assert text.exit_code == 0, text.output
    assert f"holdout {CALIBRATION_END} to {last}: {check.holdout_days} days ({check.holdout_weeks:.1f} weeks)" \
        in text.stdout
    six = check.rows[-1]
    assert f"    6+ | {six.customers:>9} | {six.predicted:>9.3f} | {six.actual:>6.3f}" in text.stdout.splitlines()
    assert f"mean absolute error {check.mae:.3f}" in text.stdout
    # An explicit holdout end: a shorter holdout, fewer purchases; one past the data says so.
    short = json.loads((await scrm("--calibration-end", f"{CALIBRATION_END}", "--holdout-end", "2020-09-29",
                                   "--json")).stdout)
    assert short["holdout_days"] == 92
    assert [row["actual"] for row in short["table"]] == pytest.approx(
        [mean for *_, mean, _ in expected_table(orders, date(2020, 9, 29))], abs=1e-4)
    beyond = await scrm("--calibration-end", f"{CALIBRATION_END}", "--holdout-end", "2021-06-30")
    assert beyond.exit_code == 0 and f"the last order is on {last}" in beyond.stdout
    wrong = await scrm("--calibration-end", "2021-03-01", "--holdout-end", "2021-01-01")
    assert wrong.exit_code == 2 and "no holdout days" in wrong.stderr
