"""Expiry, for real: short-lived TUF metadata, bootstrap tokens and device certificates that lapse.

Nothing fakes the clock: the test signs a timestamp that expires in two seconds (with the same keys
and repository code ``edgefleet publish`` uses), creates a token with a one-second ttl, and runs a
gateway that issues certificates valid for seconds; then it lets the time pass. (Skewing the agent's
clock with a ``sitecustomize`` shim would only move Python's clock: TLS checks certificates against
the real one, so real expiry is the honest test.)

- *expired metadata*: a device that was off while the repository's timestamp lapsed refuses it
  (``MetadataExpired``, the role named), keeps serving its version, and installs by itself once
  fresh metadata is published (recovery: fresh metadata → the new version served);
- *expired bootstrap token*: enrollment fails at once with an error that says the token expired;
- *short certificates*: the running agent renews before expiry and keeps working past the first
  certificate's end; an agent that was off while its certificate expired says so clearly (it must
  be enrolled again) and keeps serving its models; given a token pinned to its name it enrolls
  again by itself (recovery: restart with the token → the next version served).
"""

from __future__ import annotations

import re
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from edgefleet_core.signing.keys import KeySet
from edgefleet_core.signing.repository import ExpiryPolicy, TufRepository
from edgefleet_core.store.local import LocalStore
from edgefleet_operator.fleet.state import FleetState
from tests.support.agent_faults import (
    CLASS,
    MODEL,
    NAMESPACE,
    launch,
    model_status,
    predict,
    publish_versions,
    record,
    records,
    serving,
)
from tests.support.fleet import FleetSite, Process, cli, fleet_site, gateway_address, wait_for
from tests.support.reliability import scenario, trials

pytestmark = [pytest.mark.reliability, pytest.mark.integration]

GATEWAY_READY = re.compile(r"gateway listening fleet=(\S+):(\d+) enroll=(\S+):(\d+)")
SHORT_TIMESTAMP = timedelta(seconds=2)
EXPIRED_ERROR = r"ERROR .*certificate expired at .*enroll"
"""What an agent with an expired certificate logs: the expiry, and that it must be enrolled again."""
CERTIFICATE_S = 9.0
"""Lifetime of the certificates the short-certificate gateway issues (renewed at about two thirds)."""
# `edgefleet gateway serve` has no option for the certificate lifetime: the same server, started
# with a GatewayConfig that sets it, printing the same ready line.
_SHORT_CERTIFICATE_GATEWAY = """
import asyncio, sys
from datetime import timedelta
from pathlib import Path
from edgefleet_core.store.url import open_store
from edgefleet_operator.cli import _serve
from edgefleet_operator.gateway.server import GatewayConfig, GatewayServer
config = GatewayConfig(listen="127.0.0.1:0", enroll_listen="127.0.0.1:0", poll_interval=0.05,
                       status_interval=0.2, heartbeat_interval=1.0,
                       certificate_validity=timedelta(seconds=float(sys.argv[3])))
asyncio.run(_serve(GatewayServer(config, open_store(sys.argv[1]), Path(sys.argv[2]))))
"""


def _repository(site: FleetSite, expiry: ExpiryPolicy | None = None) -> TufRepository:
    return TufRepository(LocalStore(site.folder / "store"), KeySet.load(site.keys), expiry=expiry)


def _agent(site: FleetSite, name: str, gateway: Process, token: str | None) -> Process:
    fleet, enroll = gateway_address(gateway)
    return site.start_agent(name, gateway=fleet, enroll_gateway=enroll, token=token)


@pytest.mark.timeout(600)  # full mode (EDGEFLEET_RELIABILITY=full) runs more trials
def test_expired_metadata_is_refused_and_fresh_metadata_lets_the_update_through(tmp_path: Path) -> None:
    record_ = scenario("TUF timestamp expired", guards="served version, install reports")
    with fleet_site(tmp_path / "site") as site:
        publish_versions(site, tmp_path / "models", width=256)
        state = FleetState(LocalStore(site.folder / "store"))
        gateway = site.start_gateway()
        agent = _agent(site, "expiry", gateway, site.token(CLASS))
        current = "1.0.0"
        revision = site.assign(model=MODEL, version=current, devices=("expiry",))
        wait_for("the first install", lambda: record(state, "expiry", revision, "succeeded"), timeout=60)
        for _ in range(trials(1, 3)):
            target = "2.0.0" if current == "1.0.0" else "1.0.0"
            with record_.trial() as trial:
                # The device is off while the repository's timestamp lapses (`gateway assign` itself
                # refuses expired metadata, so the assignment is made before).
                agent.terminate()
                revision = site.assign(model=MODEL, version=target, devices=("expiry",))
                _repository(site, ExpiryPolicy(timestamp=SHORT_TIMESTAMP)).refresh_timestamp()
                expires = datetime.now(UTC) + SHORT_TIMESTAMP
                wait_for("the timestamp to expire", lambda: datetime.now(UTC) > expires)  # noqa: B023
                agent = _agent(site, "expiry", gateway, None)
                refused = wait_for("the refusal reported", lambda: record(state, "expiry", revision), timeout=60)  # noqa: B023
                assert (refused.outcome, refused.reason) == ("failed", "MetadataExpired"), refused
                assert refused.failed_phase == "verify", refused
                assert "timestamp" in refused.message.lower(), refused.message
                assert "expired" in refused.message.lower(), refused.message
                assert serving(agent, current)
                assert predict(agent) == current
                _repository(site).refresh_timestamp()  # what the operator's renewal does
                renewed = time.monotonic()
                wait_for(f"{target} served after fresh metadata", lambda: serving(agent, target), timeout=60)  # noqa: B023
                trial.recovered(time.monotonic() - renewed)
                wait_for("the success reported", lambda: record(state, "expiry", revision, "succeeded"))  # noqa: B023
                assert {r.reason for r in records(state, "expiry", revision)} == {"MetadataExpired", "Installed"}
                current = target
    summary = record_.summary()
    print(f"{record_.name}: {summary}")
    assert summary["failures"] == 0


def test_certificates_and_tokens_expire_for_real(tmp_path: Path) -> None:
    record_ = scenario("device certificate lifetime", guards="gateway access, served version")
    with fleet_site(tmp_path / "site") as site:
        publish_versions(site, tmp_path / "models", width=256, versions=("1.0.0", "2.0.0"))
        state = FleetState(LocalStore(site.folder / "store"))
        gateway = launch(site, "gateway-short-certs",
                         [sys.executable, "-c", _SHORT_CERTIFICATE_GATEWAY, site.store_url, str(site.pki),
                          str(CERTIFICATE_S)], GATEWAY_READY)  # fmt: skip
        late_token = site.token(CLASS, ttl="1s")
        # Both devices enroll now, so that their certificates' lifetimes run out together.
        renewer = _agent(site, "renewer", gateway, site.token(CLASS))
        sleeper = _agent(site, "sleeper", gateway, site.token(CLASS))
        issued = time.monotonic()
        revision = site.assign(model=MODEL, version="1.0.0", devices=("sleeper",))
        wait_for("the install", lambda: record(state, "sleeper", revision, "succeeded"), timeout=30)
        sleeper.terminate()
        assert "certificate renewed" not in sleeper.output()

        # An expired bootstrap token: refused at once, saying why.
        with pytest.raises(AssertionError, match="exited with 1") as refused:
            _agent(site, "late", gateway, late_token)
        assert re.search(r"token.*expired|expired.*token", str(refused.value), re.IGNORECASE), str(refused.value)

        with record_.trial():
            # Renewed while running: still served by the gateway after the first certificate ended.
            wait_for("a renewal", lambda: "certificate renewed" in renewer.output(), timeout=CERTIFICATE_S * 2)
            wait_for("the first certificates to end", lambda: time.monotonic() - issued > CERTIFICATE_S + 1)
            revision = site.assign(model=MODEL, version="1.0.0", devices=("renewer",))
            wait_for("an install after the first certificate ended",
                     lambda: record(state, "renewer", revision, "succeeded"), timeout=30)  # fmt: skip
        with record_.trial() as trial:
            # Off while its certificate expired: a clear error, still serving, and a new token fixes it.
            sleeper = _agent(site, "sleeper", gateway, None)
            wait_for("the expiry named", lambda: re.search(EXPIRED_ERROR, sleeper.output()), timeout=30)
            status = model_status(sleeper)
            assert status is not None
            assert status.active_version == "1.0.0"
            sleeper.terminate()
            back = time.monotonic()
            # Replacing an enrollment takes a token pinned to the device's name (the gateway's rule).
            pinned = cli("gateway", "token", "create", "--store", site.store_url, "--namespace", NAMESPACE,
                         "--device-class", CLASS, "--device-name", "sleeper").strip()  # fmt: skip
            sleeper = _agent(site, "sleeper", gateway, pinned)
            site.assign(model=MODEL, version="2.0.0", devices=("sleeper",))
            wait_for("an install after enrolling again", lambda: serving(sleeper, "2.0.0"), timeout=60)
            trial.recovered(time.monotonic() - back)
    summary = record_.summary()
    print(f"{record_.name}: {summary}")
    assert summary["failures"] == 0
