"""SDK for models and deployments (`/v1/models`), next to `ServiceClient` (api/client.py).

    from api.client import ServiceClient
    from api.deploy_client import DeploymentsClient

    deploys = DeploymentsClient(ServiceClient())
    model = deploys.deploy_checkpoints(run_id).result()  # latest sampler_weights checkpoint
    deploys.deactivate(model["model_id"], model["deployment_id"]).result()

Writes return an `APIFuture` whose result is the route's answer (`model_id`, `deployment_id`,
...) once the command was accepted; a refusal raises `RequestRejectedError` with the reason and
field (a delta checkpoint: seed 002's promotability rule). Refusals the API sees at once are
`LoopsError`s (400/404/409, with `field`).
"""

from __future__ import annotations

import uuid
from typing import Any

from api.client import APIFuture, Json, ServiceClient


class DeploymentsClient:
    def __init__(self, service: ServiceClient) -> None:
        self.service = service
        self.http = service.http

    def _write(self, method: str, path: str, body: Json | None = None) -> APIFuture[Json]:
        request_id = str(uuid.uuid4())

        def send() -> Json:
            return self.http.request(method, path, json=body, request_id=request_id)

        accepted = send()
        return APIFuture(
            self.http, request_id, transform=lambda result: {**accepted, "result": result},
            resubmit=send,
        )  # fmt: skip

    # --- models ---------------------------------------------------------------------------------

    def deploy_checkpoints(
        self,
        run_id: str,
        *,
        checkpoint_name: str | None = None,
        name: str | None = None,
        deployment: Json | None = None,
    ) -> APIFuture[Json]:
        """`truss train deploy_checkpoints --run-id`: a model from the run's sampler_weights
        checkpoint (`checkpoint_name`, else the latest) and its first deployment
        (`deployment`: name, development, resources, min_replica, max_replica)."""
        body: dict[str, Any] = {"run_id": run_id, "deployment": deployment or {}}
        if checkpoint_name is not None:
            body["checkpoint_name"] = checkpoint_name
        if name is not None:
            body["name"] = name
        return self._write("POST", "/v1/models", body)

    def create_model(self, **body: Any) -> APIFuture[Json]:
        """The general form: one of run_id (+ checkpoint_name), checkpoint_uri, base_model;
        optional name and deployment."""
        return self._write("POST", "/v1/models", body)

    def list_models(self, *, limit: int = 100) -> list[Json]:
        return list(self.http.request("GET", "/v1/models", params={"limit": limit})["models"])

    def get_model(self, model_id: str) -> Json:
        return self.http.request("GET", f"/v1/models/{model_id}")

    # --- deployments ----------------------------------------------------------------------------

    def create_deployment(self, model_id: str, **body: Any) -> APIFuture[Json]:
        """name, development, resources {accelerator, cpu, memory, instance_type},
        min_replica, max_replica."""
        return self._write("POST", f"/v1/models/{model_id}/deployments", body)

    def list_deployments(self, model_id: str) -> list[Json]:
        page = self.http.request("GET", f"/v1/models/{model_id}/deployments")
        return list(page["deployments"])

    def get_deployment(self, model_id: str, deployment_id: str) -> Json:
        return self.http.request("GET", f"/v1/models/{model_id}/deployments/{deployment_id}")

    def activate(self, model_id: str, deployment_id: str) -> APIFuture[Json]:
        return self._write("POST", f"/v1/models/{model_id}/deployments/{deployment_id}/activate")

    def deactivate(self, model_id: str, deployment_id: str) -> APIFuture[Json]:
        path = f"/v1/models/{model_id}/deployments/{deployment_id}/deactivate"
        return self._write("POST", path)

    def delete(self, model_id: str, deployment_id: str) -> APIFuture[Json]:
        return self._write("DELETE", f"/v1/models/{model_id}/deployments/{deployment_id}")

    def change_resources(
        self, model_id: str, deployment_id: str, resources: Json, *, name: str | None = None
    ) -> APIFuture[Json]:
        """Another instance type deploys a copy; the result names the new deployment."""
        body: dict[str, Any] = {"resources": resources}
        if name is not None:
            body["name"] = name
        path = f"/v1/models/{model_id}/deployments/{deployment_id}/resources"
        return self._write("PATCH", path, body)

    # --- weights (seed 002's weight sync into a deployment) --------------------------------------

    def update_weights(
        self,
        model_id: str,
        deployment_id: str,
        checkpoint_uri: str,
        *,
        warmup: bool = True,
        warmup_max_retries: int = 10,
        reset_prompt_cache: bool = True,
    ) -> APIFuture[Json]:
        """Hot-load a sampler_weights checkpoint (a base, or a delta onto what the replicas
        serve) into the deployment's replicas. The future is done once the update is recorded;
        follow the replicas with `get_weights`."""
        body = {"checkpoint_uri": checkpoint_uri, "warmup": warmup,
                "warmup_max_retries": warmup_max_retries,
                "reset_prompt_cache": reset_prompt_cache}  # fmt: skip
        path = f"/v1/models/{model_id}/deployments/{deployment_id}/weights"
        return self._write("POST", path, body)

    def get_weights(self, model_id: str, deployment_id: str) -> Json:
        """The target weights and every live replica's served version, digest and last
        hotload (`ready`, `synced`)."""
        path = f"/v1/models/{model_id}/deployments/{deployment_id}/weights"
        return self.http.request("GET", path)
