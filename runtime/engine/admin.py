"""Dev-endpoint commands (sleep, wake_up, is_sleeping, reset_prefix_cache) run in the busy loop
(engine-core process)."""

from __future__ import annotations

import logging

from fornax.runtime.engine.contract import EngineCore
from fornax.runtime.engine.messages import AdminCommand, AdminResult
from fornax.runtime.errors import RequestError

logger = logging.getLogger(__name__)

COMMANDS = ("sleep", "wake_up", "is_sleeping", "reset_prefix_cache")


def is_sleeping(core: EngineCore) -> bool:
    return core.sleep_mode is not None and core.sleep_mode.is_sleeping


def run_admin(core: EngineCore, cmd: AdminCommand) -> AdminResult:
    """Run one command between steps (nothing else touches the engine meanwhile)."""
    qid = cmd.query_id
    if cmd.command not in COMMANDS:
        return AdminResult(qid, 400, f"unknown command {cmd.command!r}")
    mode = core.sleep_mode
    if mode is None:
        if cmd.command == "is_sleeping":
            return AdminResult(qid, 200, "", False)
        return AdminResult(qid, 501, f"{cmd.command} is not available for this model's engine")
    try:
        if cmd.command == "sleep":
            if cmd.level not in (1, 2):
                return AdminResult(qid, 400, f"sleep level must be 1 or 2, got {cmd.level}")
            if core.has_unfinished_requests():
                num = len(core.scheduler.requests)
                return AdminResult(qid, 409, f"cannot sleep while {num} request(s) are in "
                                   "flight; retry when they have finished", is_sleeping(core))
            mode.sleep(cmd.level)
        elif cmd.command == "wake_up":
            mode.wake_up()
        elif cmd.command == "reset_prefix_cache":
            if not mode.reset_prefix_cache():
                return AdminResult(qid, 409, "the prefix cache cannot be reset while running "
                                   "requests hold cached blocks", is_sleeping(core), value=False)
    except RequestError as exc:
        return AdminResult(qid, 409, str(exc), is_sleeping(core))
    except Exception as exc:  # sleeping/waking failed: report it, the engine keeps serving
        logger.exception("%s failed", cmd.command)
        return AdminResult(qid, 500, f"{cmd.command} failed: {type(exc).__name__}: {exc}",
                           is_sleeping(core))
    if cmd.command in ("sleep", "wake_up"):
        logger.info("%s done: the engine is %s", cmd.command,
                    "asleep" if is_sleeping(core) else "awake")
    return AdminResult(qid, 200, "", is_sleeping(core))
