"""Alert delivery: payloads, one module per sink, and the outbox worker."""

from __future__ import annotations

from monitor.alerts.alertmanager import AlertmanagerSink
from monitor.alerts.slack import SlackSink
from monitor.alerts.webhook import WebhookSink
from monitor.alerts.worker import DeliveryWorker, Sink

__all__ = ["AlertmanagerSink", "DeliveryWorker", "Sink", "SlackSink", "WebhookSink"]
