"""Several processes, one mesh: `jax.distributed.initialize` from flags (or the cluster's own variables), checked first.

On pods each host runs one process; locally `scripts/launch_local.sh` starts N processes of fake CPU devices.
"""

from __future__ import annotations

import re
import socket
import time

import jax

from moe_jax.config import ConfigError


def initialize(
    coordinator: str | None,
    num_processes: int | None,
    process_id: int | None,
    local_devices: int | None = None,
    timeout: int = 60,
    heartbeat: int = 20,
    auto: bool = False,
) -> None:
    """Joins the job. With `auto`, JAX detects everything itself (Slurm, TPU pods, ...); otherwise all three of
    coordinator, num_processes and process_id are needed. `local_devices` asks for that many fake CPU devices here."""
    if not auto:
        if coordinator is None or num_processes is None or process_id is None:
            raise ConfigError("--coordinator, --num-processes and --process-id go together (or use --distributed)")
        if not re.fullmatch(r"[\w.\-]+:\d+", coordinator):
            raise ConfigError(f"--coordinator={coordinator!r}: expected HOST:PORT, e.g. 10.0.0.1:1234")
        if num_processes < 1:
            raise ConfigError(f"--num-processes={num_processes}: must be a positive integer")
        if not 0 <= process_id < num_processes:
            raise ConfigError(
                f"--process-id={process_id}: valid 0..{num_processes - 1} for --num-processes={num_processes}"
            )
        if process_id != 0:
            _wait_for_coordinator(coordinator, timeout)
    if local_devices is not None:
        if local_devices < 1:
            raise ConfigError(f"--local-devices={local_devices}: must be a positive integer")
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", local_devices)
    try:
        if auto:
            jax.distributed.initialize(initialization_timeout=timeout, heartbeat_timeout_seconds=heartbeat)
        else:
            jax.distributed.initialize(
                coordinator_address=coordinator,
                num_processes=num_processes,
                process_id=process_id,
                initialization_timeout=timeout,
                heartbeat_timeout_seconds=heartbeat,
            )
    except Exception as e:  # noqa: BLE001 (JAX raises several kinds; all mean the same to a user)
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        where = "the cluster's coordinator" if auto else f"--coordinator={coordinator}"
        raise ConfigError(f"{where}: could not join the job within {timeout} s ({first})") from None


def _wait_for_coordinator(address: str, timeout: int) -> None:
    """JAX aborts the whole process (no exception) when the coordinator never answers: probe it first."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise ConfigError(
                    f"--coordinator={address}: could not join the job within {timeout} s (nothing answers there: is "
                    "process 0 running, and is the port reachable?)"
                ) from None
            time.sleep(0.2)


def lost_peer_message(e: Exception) -> str:
    first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
    return f"lost contact with the other processes (a peer failed, was killed or is unreachable): {first}"
