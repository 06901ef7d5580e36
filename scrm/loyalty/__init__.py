"""Retention and value: points and tiers, referrals, surveys, staff follow-ups, recommendations, churn.

Everything is off until the config has a ``[loyalty]`` section. Chat commands come in through
:mod:`scrm.loyalty.commands` (customers) and :mod:`scrm.staff.loyalty` (staff); periodic work
(crediting conversions, tiers, surveys, tasks, nightly scores) through :mod:`scrm.loyalty.jobs`.
"""
