"""Joining a running Ray cluster by address (`--address`), refusing at once one that cannot be:
ray.init retries an address where nothing listens for minutes, silently, meets a dashboard URL
with a traceback, and tries a cluster that wants a token it was not given for 20 s.

Ray's token authentication: ray.init sends this machine's token (RAY_AUTH_TOKEN, or
~/.ray/auth_token) to an explicit address only when RAY_AUTH_MODE=token, so a user who gives
their cluster's address would be refused by it. Token mode is turned on when the cluster asks
for a token, one exists, and the mode is not set; the token itself is never read here.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from pathlib import Path

import ray

from moe_ray.system import package_folder

PROBE_TIMEOUT_S = 5.0


class ClusterAddressError(ConnectionError):
    """An --address that no Ray cluster answers; the message says what to give instead."""


def token_available() -> bool:
    """A token where Ray looks for one: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    return (
        any(os.environ.get(k) for k in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"))
        or (Path.home() / ".ray" / "auth_token").is_file()
    )


def enable_token_auth(local: bool = False) -> None:
    """Use Ray's token authentication in this process (and its children) when a token is
    available and RAY_AUTH_MODE is not set explicitly. A `local` Ray started here makes its own
    token when there is none, as Ray does by default; set here, Ray does not warn that it did."""
    if "RAY_AUTH_MODE" not in os.environ and (local or token_available()):
        os.environ["RAY_AUTH_MODE"] = "token"
        try:  # let Ray's cached config see the mode
            from ray._raylet import Config

            Config.initialize("")
        except Exception:
            pass


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
        enable_token_auth()  # cannot ask the cluster: send the token if there is one
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
    check_token_accepted(address, host_port)


@contextlib.contextmanager
def _stderr_muted():
    """File descriptor 2 to /dev/null for a moment: what C++ code writes there too."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def check_token_accepted(address: str, host_port: str) -> None:
    """One GCS call (0.2 s) to learn whether the cluster takes this process as it is, else with
    this machine's token (token mode is turned on only then: a cluster without authentication
    is joined as Ray would join it). A refused token fails ray.init only after 20 s of retries,
    with a bare ConnectionError."""
    try:
        from ray._raylet import GcsClient
        from ray.exceptions import AuthenticationError, RpcError
    except ImportError:  # a private API: when it moves, send the token if there is one
        enable_token_auth()
        return

    def accepted(muted: bool = False) -> bool:
        # Ray's C++ client logs a refusal itself; a first one, before the token is tried, is expected.
        with _stderr_muted() if muted else contextlib.nullcontext():
            try:
                GcsClient(address=host_port)
            except AuthenticationError:
                return False
        return True

    asked = time.monotonic()
    try:
        if accepted(muted=token_available()):
            return
        if "RAY_AUTH_MODE" not in os.environ and token_available():
            enable_token_auth()
            if accepted():
                return
    except RpcError as err:
        if "Timed out" not in str(err):
            return  # not an answer about the address or the token: ray.init reports it
        raise ClusterAddressError(
            f"--address {address}: something listens at {host_port}, but no Ray cluster answered there in "
            f"{time.monotonic() - asked:.0f} s: give the head's GCS port (6379 by default; 8265 is its dashboard, "
            "which `moe-ray submit --address http://HEAD:8265` takes)"
        ) from None
    except Exception:  # not an answer about the token: ray.init reports it
        return
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "token":
        has = "this machine's token (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token) is not the cluster's"
    elif token_available():
        has = f"RAY_AUTH_MODE={os.environ['RAY_AUTH_MODE']} here keeps this machine's token from being sent"
    else:
        has = "this machine has no Ray token"
    raise ClusterAddressError(
        f"--address {address}: the Ray cluster at {host_port} uses token authentication and "
        f"{has}: copy the cluster's token (`ray get-auth-token` on its head) to ~/.ray/auth_token, "
        "or set RAY_AUTH_TOKEN, and unset RAY_AUTH_MODE or set it to token"
    )


def capacity_problem(workers: int, per_worker: dict[str, float], fewer: str, local: bool = False) -> str | None:
    """Why the cluster this process is connected to can never hold `workers` workers of
    `per_worker` resources each, with the fix (`fewer`: how the caller asks for fewer), or None.
    The limit is what an autoscaler may grow the cluster to when it has one (Ray Train checks
    the same), else what it has now: Ray Train would wait for the missing resources without
    end, retrying every minute. `local`: the run's Ray is this machine's own, which no node joins."""
    limit = None
    try:
        from ray._private.state import state

        limit = state.get_max_resources_from_cluster_config()
    except Exception:  # a private API: without it, what the cluster has now
        pass
    has = "can grow to" if limit else "has"
    limit = limit or ray.cluster_resources()
    where = "this machine's Ray" if local else "the cluster"
    more = "run the job on a Ray cluster (--address)" if local else "add nodes"
    for name, each in per_worker.items():
        need, have = each * workers, limit.get(name, 0)
        if each > 0 and need > have + 1e-9:
            why = f"{workers} workers need {need:g} {name} ({each:g} each) and {where} {has} {have:g} in all"
            if fit := int(have / each + 1e-9):
                return f"{why}, so at most {fit} fit: {more}, or {fewer}"
            if name == "GPU":
                gpus = "run the job on a cluster with GPU nodes (--address)" if local else "add GPU nodes"
                return f"{why}: {gpus}, or set resources.use_gpu: auto (it trains on CPUs where there is no GPU)"
            return f"{why}: {more}"
    return None


def join(address: str, ship_code: bool = False, env_vars: dict[str, str] | None = None, **init_kwargs) -> None:
    """ray.init(address=...) once the address answers, with this machine's token if it wants one.
    `ship_code`: the cluster's workers and tasks run this moe-ray (Ray's `py_modules`), not the
    one its nodes have installed, as `moe-ray submit` does; `env_vars` are set in them. Neither
    inside a Ray job (a submitted run): its runtime_env has both, and one given here would replace it."""
    check_cluster_address(address)
    if "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ and (ship_code or env_vars):
        env = {"py_modules": [package_folder()]} if ship_code else {}
        init_kwargs["runtime_env"] = env | ({"env_vars": env_vars} if env_vars else {})
    ray.init(address=address, **init_kwargs)


# Lines that Ray's own processes send to the driver and that tell a moe-ray user nothing to act on:
# Ray Train's PreemptionWatcher actor is warned about at ERROR on every run (ray-project/ray#53727).
RAY_NOISE = ("Actor with class name: 'PreemptionWatcher'",)


def hide_ray_noise() -> None:
    """Drop RAY_NOISE lines from the worker output Ray forwards to this driver (a private hook:
    where it moves, the lines show)."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:  # pragma: no cover
        return

    def without_noise(handler):
        def handle(data):
            lines = [line for line in data.get("lines", []) if not any(n in line for n in RAY_NOISE)]
            if lines:
                handler({**data, "lines": lines})

        handle.moe_ray_filtered = True
        return handle

    with dispatcher._lock:
        dispatcher.handlers = [
            (name, handler if getattr(handler, "moe_ray_filtered", False) else without_noise(handler))
            for name, handler in dispatcher.handlers
        ]
