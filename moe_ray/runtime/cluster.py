"""Joining a running Ray cluster by address (`--address`), refusing at once one that cannot be:
ray.init retries an address where nothing listens for minutes, silently, and meets a dashboard
URL with a traceback."""

from __future__ import annotations

import os
import socket

import ray

PROBE_TIMEOUT_S = 5.0


class ClusterAddressError(ConnectionError):
    """An --address that no Ray cluster answers; the message says what to give instead."""


def gcs_address(address: str) -> str | None:
    """host:port that `address` names, as ray.init reads it (for 'auto': RAY_ADDRESS, else the
    last `ray start` on this machine), or None when Ray cannot tell."""
    if address.startswith("ray://"):
        return address[len("ray://") :].split("/")[0]
    try:
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(address)
    except ValueError as err:
        raise ClusterAddressError(
            f"--address {address}: not a Ray cluster address ({err}): give the head's HOST:6379, or 'auto' on a node"
        ) from None
    except Exception:  # a private API: when it moves, ray.init says what it says
        return None


def check_cluster_address(address: str) -> None:
    given = (os.environ.get("RAY_ADDRESS") or address) if address == "auto" else address
    if given.startswith(("http://", "https://")):
        named = "RAY_ADDRESS" if given != address else "--address"
        raise ClusterAddressError(
            f"{named} {given} is a Ray dashboard (the Jobs API that `moe-ray submit` uses); this command "
            "joins the cluster itself: give its GCS address (HEAD:6379), or 'auto' on one of its nodes. From "
            f"outside the cluster, submit the job instead: moe-ray submit JOB --address {given}"
        )
    host_port = gcs_address(address)
    if host_port is None:
        if address == "auto":
            raise ClusterAddressError(
                "--address auto: no Ray cluster was started on this machine (ray start) and RAY_ADDRESS is not "
                "set: give the cluster's address (HEAD:6379), or leave --address out for an embedded local Ray"
            )
        return
    host, _, port = host_port.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=PROBE_TIMEOUT_S).close()
    except (OSError, ValueError):
        # Ray may put this node's IP for a loopback address: name what the user gave, and for
        # 'auto' where it led.
        at = f" at {host_port} (RAY_ADDRESS, or the last `ray start` on this machine)" if address == "auto" else ""
        raise ClusterAddressError(
            f"--address {address}: no Ray cluster answers{at}: check the address (the head's GCS port, 6379 by "
            "default), start one (ray start --head), or leave --address out for an embedded local Ray"
        ) from None


def join(address: str, **init_kwargs) -> None:
    """ray.init(address=...) once the address answers."""
    check_cluster_address(address)
    ray.init(address=address, **init_kwargs)
