"""GET /v1/models and /v1/models/{id}: every served model, its names and state; POST
/v1/models/{id}/load and /unload on a many-model server (API workers)."""

from __future__ import annotations

from fornax.api.protocol.openai import ModelCard, ModelList, ModelPermission
from fornax.api.server.errors import APIError
from fornax.api.server.http import Request, Response, json_response
from fornax.api.server.state import AppState


def _card(state: AppState, name: str, status: str) -> ModelCard:
    s = state.settings
    perm = ModelPermission(id=f"modelperm-{s.created}", created=s.created)
    return ModelCard(id=name, created=s.created, root=s.model_root,
                     max_model_len=state.max_model_len, permission=[perm], status=status)


async def list_models(req: Request) -> Response:
    models = req.state.models
    statuses = await models.model_states()
    return json_response(ModelList([
        _card(state, n, status) for state, status in zip(models.states, statuses, strict=True)
        for n in state.settings.served_model_names]))


def _find(req: Request, model_id: str) -> tuple[AppState, str]:
    try:
        state = req.state.models.find(model_id)
        return state, state.resolve_model(model_id)
    except APIError:
        raise APIError(404, f"The model `{model_id}` does not exist.", "model") from None


async def get_model(req: Request) -> Response:
    state, name = _find(req, req.path_params["model"])
    models = req.state.models
    status = (await models.model_states())[models.states.index(state)]
    return json_response(_card(state, name, status))


async def model_action(req: Request) -> Response:
    """POST /v1/models/{id}/load (answers once the model is loaded) and /unload (its engine
    drains its requests, then stops); behind the API key."""
    model_id, _, action = req.path_params["rest"].rpartition("/")
    if action not in ("load", "unload") or not model_id:
        raise APIError(404, f"no route {req.path} (POST /v1/models/{{id}}/load or /unload)")
    state, name = _find(req, model_id)
    models = req.state.models
    statuses = await models.admin(action, state)
    return json_response(_card(state, name, statuses[models.states.index(state)]))
