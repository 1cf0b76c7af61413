"""The SDK's tokenizers, offline: a SamplingClient made from a base model name loads the model's
tokenizer by that name (`AutoTokenizer.from_pretrained("loopstream/tiny-llama")`, the SDK
unchanged), which the API has written into this machine's Hugging Face cache
(api/tinker/hf_cache.py). No Hub is reachable from the test machines."""

from __future__ import annotations

import tinker

from infra.settings import Settings

TINY = "loopstream/tiny-llama"


def _base_url() -> str:
    from api.config import get_api_settings

    api = get_api_settings()
    return f"http://{api.api_host}:{api.api_port}"


def test_a_sampling_client_of_a_base_model_gets_its_tokenizer_offline(
    services: Settings, api_key: str
) -> None:
    client = tinker.ServiceClient(base_url=_base_url(), api_key=api_key)
    try:
        sampler = client.create_sampling_client(base_model=TINY)
        tokenizer = sampler.get_tokenizer()
        text = "loopstream: héllo ✓"
        tokens = tokenizer.encode(text, add_special_tokens=False)
        assert tokens == list(text.encode())  # the tiny model's ids are the UTF-8 bytes
        assert tokenizer.decode(tokens) == text
    finally:
        client.close("success").result()
