"""Every ``/api/v1`` endpoint, collected from the module of each resource (each declares its own
``ENDPOINTS``); the app serves and documents exactly this list."""

from __future__ import annotations

from scrm.api import (
    campaigns,
    codes,
    conversations,
    coupons,
    customers,
    orders,
    reports,
    segments,
    tags,
    webhooks,
)
from scrm.api.framework import Endpoint

ENDPOINTS: list[Endpoint] = (
    orders.ENDPOINTS
    + coupons.ENDPOINTS
    + customers.ENDPOINTS
    + campaigns.ENDPOINTS
    + conversations.ENDPOINTS
    + codes.ENDPOINTS
    + tags.ENDPOINTS
    + segments.ENDPOINTS
    + reports.ENDPOINTS
    + webhooks.ENDPOINTS
)
