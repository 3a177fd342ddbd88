"""One served model's part of the server settings (`fornax serve` -> API workers, JSON)."""

from __future__ import annotations

import msgspec

from fornax.runtime.engine.messages import EngineHandshake


class ModelSettings(msgspec.Struct, omit_defaults=True):
    """What differs between the models of a many-model server: the engine each one runs in (its
    IPC directory and READY handshake), its names, template and generation defaults."""

    ipc_dir: str
    engine: EngineHandshake
    served_model_names: list[str]
    model_root: str
    model_aliases: list[str] = []
    chat_template: str | None = None
    generation_config: str = "auto"
    cache_config_info: dict[str, str] = {}
    reasoning_parser: str | None = None  # None: the server's --reasoning-parser
    tool_call_parser: str | None = None  # None: the server's --tool-call-parser
