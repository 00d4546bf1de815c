"""The demo's changing configuration, and the standalone simulator
(``python -m monitor.simulator``) that can serve it."""

from __future__ import annotations

import argparse
import copy
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Final

from monitor.simulator.http import SimulatedGenAuth
from monitor.simulator.state import DEFAULT_DATA

__all__ = ["DEMO_SCENARIO", "main", "run_scenario"]


def _step(base: Mapping[str, Any], **changes: Any) -> dict[str, Any]:
    """A deep copy of ``base`` with top-level keys, or ``sub__key`` nested keys, replaced."""
    out = copy.deepcopy(dict(base))
    for path, value in changes.items():
        head, _, tail = path.partition("__")
        if tail:
            out[head][tail] = value
        else:
            out[head] = value
    return out


_HOST_MOVED = _step(DEFAULT_DATA, smtpConfig__smtp_host="smtp.mail-relay.example.net")
_ROTATED = _step(_HOST_MOVED, smtpConfig__senderPass="demo-smtp-passw0rd-2")
_DISABLED = _step(_ROTATED, enabled=False)
_REENABLED = _step(_ROTATED, enabled=True)
_SENDGRID = _step(_REENABLED, type="sendgrid")

#: One demo cycle; each step differs from the one before in a way the monitor reports:
#: SMTP host moved, SMTP password rotated, provider disabled, re-enabled, switched to SendGrid,
#: and (wrapping around to the first step) back to custom SMTP on the original host.
DEMO_SCENARIO: Final[list[dict[str, Any]]] = [
    copy.deepcopy(DEFAULT_DATA),
    _HOST_MOVED,
    _ROTATED,
    _DISABLED,
    _REENABLED,
    _SENDGRID,
]


def run_scenario(sim: SimulatedGenAuth, *, period: float, stop: threading.Event) -> None:
    """Serve :data:`DEMO_SCENARIO` step by step, one step every ``period`` s, until ``stop``.

    The first step is served at once; after the last one the cycle starts again.
    """
    if period <= 0:
        raise ValueError("period must be > 0")
    step = 0
    sim.set_data(DEMO_SCENARIO[step])
    while not stop.wait(period):
        step = (step + 1) % len(DEMO_SCENARIO)
        sim.set_data(DEMO_SCENARIO[step])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m monitor.simulator",
        description="Serve a simulated GenAuth management API (email provider) on loopback.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--access-key-id", default="demo-userpool")
    parser.add_argument("--access-key-secret", default="demo-secret")
    parser.add_argument("--token-ttl", type=int, default=7200, help="token lifetime in seconds")
    parser.add_argument(
        "--scenario-period",
        type=float,
        default=0.0,
        help="cycle through the demo configurations every N seconds (0 = serve a fixed config)",
    )
    args = parser.parse_args(argv)
    sim = SimulatedGenAuth(
        access_key_id=args.access_key_id,
        access_key_secret=args.access_key_secret,
        token_ttl=args.token_ttl,
        host=args.host,
        port=args.port,
    )
    stop = threading.Event()
    with sim:
        print(f"base_url          = {sim.base_url}")
        print(f"access_key_id     = {sim.access_key_id}")
        print(f"access_key_secret = {sim.access_key_secret}")
        print(f"userpool_id       = {sim.userpool_id}")
        print("Ctrl-C to stop.", flush=True)
        scenario: threading.Thread | None = None
        if args.scenario_period > 0:
            scenario = threading.Thread(
                target=run_scenario,
                args=(sim,),
                kwargs={"period": args.scenario_period, "stop": stop},
                daemon=True,
            )
            scenario.start()
        try:
            while not stop.wait(3600):
                pass
        except KeyboardInterrupt:
            pass
        finally:
            stop.set()
            if scenario is not None:
                scenario.join(timeout=5)
    return 0
