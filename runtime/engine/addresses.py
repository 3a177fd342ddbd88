"""Per-instance IPC addresses of one engine core, derived from its temp dir (any process)."""

from __future__ import annotations

import os


def input_address(ipc_dir: str) -> str:
    """ZMQ ROUTER the engine binds; API workers connect DEALERs to it."""
    return f"ipc://{os.path.join(ipc_dir, 'engine-input')}"


def alive_path(ipc_dir: str) -> str:
    """Unix stream socket the engine holds open; EOF on it means the engine process is gone."""
    return os.path.join(ipc_dir, "engine-alive.sock")


def handshake_address(ipc_dir: str) -> str:
    """ZMQ PULL the launcher binds; the engine sends its READY (or failure) there."""
    return f"ipc://{os.path.join(ipc_dir, 'engine-handshake')}"


def output_address(ipc_dir: str, client_id: str) -> str:
    """ZMQ PULL one API worker binds; the engine connects a PUSH to send it results."""
    return f"ipc://{os.path.join(ipc_dir, f'out-{client_id}')}"
