"""Budget alerts: each soft threshold crossed is a log line, a row in the ledger's `alerts`
table (the dashboard shows them) and, when flowc.yaml names one, a POST to a webhook."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx

from flowc.config import AlertsConfig
from flowc.cost import amount, usd
from runtime.access.budgets import Alert
from runtime.access.store import AccessStore

log = logging.getLogger("flowc.alerts")


def payload(alert: Alert) -> dict[str, Any]:
    return {"type": "budget_threshold", "scope": alert.scope.kind, "name": alert.scope.name,
            "threshold_percent": alert.threshold, "limit_usd": amount(alert.limit),
            "spent_usd": amount(alert.spent), "period": alert.period,
            "period_start": alert.period_start.isoformat()}


class Alerter:
    """Called on the event loop as a threshold is crossed; the row and the webhook go out
    in the background so the request that crossed it does not wait for them."""

    def __init__(self, config: AlertsConfig, store: AccessStore) -> None:
        self.config = config
        self.store = store
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, alert: Alert) -> None:
        log.warning("budget alert: %s has spent %s of its %s %s budget (%d%%)",
                    alert.scope, usd(alert.spent), usd(alert.limit), alert.period,
                    alert.threshold)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # outside the server (a `flowc run`): the row is written now
            self._save(alert)
            return
        task = loop.create_task(self._deliver(alert))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _save(self, alert: Alert) -> bool:
        """False: another instance sharing the store recorded this alert first."""
        try:
            return self.store.add_alert(alert) is not False
        except Exception:
            log.exception("could not record the budget alert for %s", alert.scope)
            return True

    async def _deliver(self, alert: Alert) -> None:
        first = await asyncio.to_thread(self._save, alert)
        if self.config.webhook and first:
            try:
                async with httpx.AsyncClient(timeout=10.0) as client:
                    r = await client.post(self.config.webhook, json=payload(alert))
                    r.raise_for_status()
            except httpx.HTTPError as exc:
                log.warning("budget alert webhook %s failed: %s", self.config.webhook, exc)

    async def drain(self) -> None:
        """Wait for alerts still being delivered (at shutdown)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
