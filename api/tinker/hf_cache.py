"""loopstream's own base models' tokenizers, where Hugging Face looks a model name up offline.

The SDK's `SamplingClient.get_tokenizer()` calls `AutoTokenizer.from_pretrained(<base model
name>)`: for `loopstream/tiny-llama` that is a Hub name, and no Hub has it (nor is one reachable
where loopstream is tested). The SDK cannot be pointed elsewhere (the TrainingClient can: the
server names a local folder as its `tokenizer_id`), but `huggingface_hub` resolves a name from its
local cache when the Hub does not answer, or does not know the name. So the API writes the
tokenizer into that cache, in the cache's own layout:

    <hub cache>/models--loopstream--tiny-llama/
        refs/main                    the revision below
        snapshots/<revision>/        config.json, tokenizer.json, tokenizer_config.json, ...
        .no_exist/<revision>/        one empty file per optional file the folder lacks

`<hub cache>` is `huggingface_hub.constants.HF_HUB_CACHE` (~/.cache/huggingface/hub, or
$HF_HUB_CACHE / $HF_HOME/hub), so it serves SDK clients on the machine the API runs on. The
revision is a digest of the files: a changed tokenizer is a new snapshot, and `refs/main` moves
to it. The `.no_exist` markers matter: without them, transformers asks the Hub for each optional
file (`tokenizer.model`, `added_tokens.json`, ...) and `huggingface_hub` 1.x fails on the second
connection error instead of falling back to the cache.

Only names of loopstream's own models are written (the tiny model): a model folder copied from
the Hub under the model root has its real Hub entry, which this must not overwrite.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from gpu_workers.models import resolve_base_model
from infra.settings import Settings

# What AutoTokenizer (and AutoConfig, which it reads first) may ask for.
TOKENIZER_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
)


def hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def publish_tokenizer(folder: Path, repo_id: str, *, hub_cache: Path | None = None) -> Path:
    """Make `AutoTokenizer.from_pretrained(repo_id)` load the tokenizer in `folder`, with no
    network. Idempotent; returns the snapshot folder. A reader never sees half a snapshot (it is
    written beside its place and renamed in; `refs/main` moves last)."""
    repo = (hub_cache or hub_cache_dir()) / f"models--{repo_id.replace('/', '--')}"
    present = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    digest = hashlib.sha1(usedforsecurity=False)
    for name in present:
        digest.update(name.encode() + b"\0" + (folder / name).read_bytes() + b"\0")
    revision = digest.hexdigest()  # 40 hex digits, like a Hub commit hash
    snapshot = repo / "snapshots" / revision
    if not snapshot.is_dir():
        snapshot.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{revision}.", dir=snapshot.parent))
        staging.chmod(0o755)  # mkdtemp's 0700 would hide it from the machine's other users
        try:
            for name in present:
                shutil.copyfile(folder / name, staging / name)
            try:
                staging.rename(snapshot)
            except OSError:
                if not snapshot.is_dir():  # else another process wrote the same files first
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    no_exist = repo / ".no_exist" / revision
    no_exist.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if name not in present:
            (no_exist / name).touch()
    ref = repo / "refs" / "main"
    if not ref.is_file() or ref.read_text() != revision:
        ref.parent.mkdir(parents=True, exist_ok=True)
        staged_ref = ref.with_name(f".main.{os.getpid()}")
        staged_ref.write_text(revision)  # no newline: huggingface_hub reads the file as is
        staged_ref.replace(ref)
    return snapshot


def publish_own_tokenizers(settings: Settings, *, hub_cache: Path | None = None) -> list[str]:
    """The tokenizers of loopstream's own base models (the tiny model, made here if it is not
    yet), under their names; returns those names."""
    name = settings.tiny_model_name
    publish_tokenizer(resolve_base_model(settings, name), name, hub_cache=hub_cache)
    return [name]
