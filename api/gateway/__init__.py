"""The inference gateway: its own FastAPI service in front of deployment replicas on Ray
(docs/serving.md). `python -m api.gateway` serves it on `gateway_host:gateway_port`."""
