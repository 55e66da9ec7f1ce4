"""vLLM's runtime adapter endpoints, POST /v1/load_lora_adapter and /v1/unload_lora_adapter:
present only when runtime updating is allowed (VLLM_ALLOW_RUNTIME_LORA_UPDATING or
PAGEDSERVE_ALLOW_RUNTIME_LORA_UPDATING set true), as in vLLM."""

from __future__ import annotations

import os

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field

from services.frontend.errors import APIError, bad_request
from services.frontend.state import FrontendState

ENV_FLAGS = ("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "PAGEDSERVE_ALLOW_RUNTIME_LORA_UPDATING")


def runtime_updating_allowed() -> bool:
    return any(os.environ.get(name, "").lower() in ("1", "true", "yes", "on") for name in ENV_FLAGS)


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=256)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str = Field(min_length=1, max_length=256)
    lora_int_id: int | None = None


def add_lora_routes(app: FastAPI, state: FrontendState) -> None:
    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> PlainTextResponse:
        state.require_ready()
        try:
            state.loras.load(body.lora_name, body.lora_path, state.served_names())
        except ValueError as exc:
            raise bad_request(str(exc), "lora_path" if "adapter" in str(exc) else "lora_name") from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> PlainTextResponse:
        state.require_ready()
        lora = state.loras.get(body.lora_name)
        if lora is None or (body.lora_int_id is not None and body.lora_int_id != lora.lora_int_id):
            raise APIError(404, f"The lora adapter '{body.lora_name}' cannot be found.", param="lora_name",
                           code="model_not_found")
        state.loras.unload(body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
