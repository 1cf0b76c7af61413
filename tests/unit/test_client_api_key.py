"""Which API key the SDK sends: the one given, else $LOOPSTREAM_API_KEY, else the default key
file; none at all is a clear error at the first request, not a 401 from the server."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from api.client import MissingApiKeyError, ServiceClient, resolve_api_key
from infra.settings import Settings


def _client_seeing(seen: list[httpx.Request], api_key: str | None) -> ServiceClient:
    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"models": []})

    transport = httpx.MockTransport(answer)
    http = httpx.Client(base_url="http://loopstream.test", transport=transport)
    return ServiceClient("http://loopstream.test", api_key=api_key, http_client=http)


def test_a_given_key_is_sent_as_the_api_key_authorization_header() -> None:
    seen: list[httpx.Request] = []
    with _client_seeing(seen, "tml-abc.secret") as client:
        client.http.request("GET", "/v1/loops/models")
    assert seen[0].headers["Authorization"] == "Api-Key tml-abc.secret"


def test_the_environment_key_comes_before_the_key_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "api-key").write_text("tml-file.secret\n")
    monkeypatch.setenv("LOOPSTREAM_API_KEY", "tml-env.secret")
    assert resolve_api_key(None, Settings(data_dir=tmp_path)) == "tml-env.secret"
    assert resolve_api_key("tml-given.secret", Settings(data_dir=tmp_path)) == "tml-given.secret"


def test_without_key_or_environment_the_default_key_file_is_read(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("LOOPSTREAM_API_KEY", raising=False)
    (tmp_path / "api-key").write_text("tml-file.secret\n")
    assert resolve_api_key(None, Settings(data_dir=tmp_path)) == "tml-file.secret"


def test_no_key_anywhere_is_a_clear_error_before_any_request(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("LOOPSTREAM_API_KEY", raising=False)
    assert resolve_api_key(None, Settings(data_dir=tmp_path)) is None
    seen: list[httpx.Request] = []
    with _client_seeing(seen, None) as client:
        client.http.api_key = resolve_api_key(None, Settings(data_dir=tmp_path))
        with pytest.raises(MissingApiKeyError, match="LOOPSTREAM_API_KEY"):
            client.http.request("GET", "/v1/loops/models")
    assert seen == []
