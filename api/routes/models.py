"""GET /v1/models and /v1/models/{id}: every served model, its names and state (API workers)."""

from __future__ import annotations

from fornax.api.protocol.openai import ModelCard, ModelList, ModelPermission
from fornax.api.server.errors import APIError
from fornax.api.server.http import Request, Response, json_response
from fornax.api.server.state import AppState


def _card(state: AppState, name: str) -> ModelCard:
    s = state.settings
    perm = ModelPermission(id=f"modelperm-{s.created}", created=s.created)
    return ModelCard(id=name, created=s.created, root=s.model_root,
                     max_model_len=state.max_model_len, permission=[perm],
                     status="failed" if state.engine.dead else "loaded")


async def list_models(req: Request) -> Response:
    return json_response(ModelList([_card(state, n) for state in req.state.models.states
                                    for n in state.settings.served_model_names]))


async def get_model(req: Request) -> Response:
    model_id = req.path_params["model"]
    try:
        state = req.state.models.find(model_id)
        name = state.resolve_model(model_id)
    except APIError:
        raise APIError(404, f"The model `{model_id}` does not exist.", "model") from None
    return json_response(_card(state, name))
