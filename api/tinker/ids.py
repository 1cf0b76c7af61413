"""How Tinker's ids and paths name loopstream's runs, samplers and checkpoints.

- A Tinker model id is `<session>:train:<n>` (the SDK derives it itself for models loaded from a
  checkpoint); its loops run is `<session>-train-<n>`, its sampler `<session>-sampler-<n>`, and
  it lives in a loops session of its own (the loops rule is one active trainer per session,
  while a Tinker session may hold several training clients). A loops run id that is not of that
  form is its own Tinker model id, so runs made through /v1/loops are reachable too.
- `tinker://<model id>/(weights|sampler_weights)/<name>` is
  `bt://loops:<run id>/(weights|sampler_weights)/<name>`: the same checkpoint.
- A sampling session id is `<run id>~<kind>~<name>~<nonce>` (pinned to a checkpoint of the run),
  `<run id>~from~<source run id>~<kind>~<name>~<nonce>` (the run's sampler pinned to a
  published checkpoint of another workspace's run) or `<run id>~base~<nonce>` (the run's
  sampler, following its latest weights): self-describing, so it survives an API restart; the
  nonce keeps request ids of two clients apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from commands.loops import CHECKPOINT_URI, checkpoint_uri

_TINKER_RUN = re.compile(r"^(?P<session>[a-z0-9][a-z0-9-]*)-train-(?P<n>\d+)$")
_MODEL_ID = re.compile(r"^(?P<session>[a-z0-9][a-z0-9-]*):train:(?P<n>\d+)$")
TINKER_PATH = re.compile(
    r"^tinker://(?P<model_id>[^/]+)/(?P<kind>weights|sampler_weights)/(?P<name>[^/]+)$"
)


def run_id_of(model_id: str) -> str:
    match = _MODEL_ID.match(model_id)
    return f"{match['session']}-train-{match['n']}" if match else model_id


def sampler_id_of(model_id: str) -> str:
    match = _MODEL_ID.match(model_id)
    return f"{match['session']}-sampler-{match['n']}" if match else model_id


def model_id_of(run_id: str) -> str:
    match = _TINKER_RUN.match(run_id)
    return f"{match['session']}:train:{match['n']}" if match else run_id


def model_id_for(session_id: str, model_seq_id: int) -> str:
    return f"{session_id}:train:{model_seq_id}"


def bt_uri(tinker_path: str) -> str:
    """tinker://... -> bt://loops:...; a bt://loops: URI is accepted as it is."""
    if CHECKPOINT_URI.match(tinker_path):
        return tinker_path
    match = TINKER_PATH.match(tinker_path)
    if match is None:
        raise ValueError(
            f"path {tinker_path!r} must look like tinker://<model_id>/(weights|sampler_weights)/"
            "<name>"
        )
    uri = checkpoint_uri(run_id_of(match["model_id"]), match["kind"], match["name"])  # type: ignore[arg-type]
    if not CHECKPOINT_URI.match(uri):
        raise ValueError(f"path {tinker_path!r} does not name a loopstream checkpoint")
    return uri


def tinker_path(uri: str) -> str:
    match = CHECKPOINT_URI.match(uri)
    if match is None:
        raise ValueError(f"not a checkpoint URI: {uri!r}")
    return f"tinker://{model_id_of(match['run_id'])}/{match['kind']}/{match['name']}"


@dataclass(frozen=True)
class SamplingSession:
    run_id: str
    checkpoint_uri: str | None  # None: follow the sampler's latest weights
    nonce: str

    @property
    def id(self) -> str:
        if self.checkpoint_uri is None:
            return f"{self.run_id}~base~{self.nonce}"
        match = CHECKPOINT_URI.match(self.checkpoint_uri)
        assert match is not None
        pinned = f"{match['kind']}~{match['name']}~{self.nonce}"
        if match["run_id"] != self.run_id:
            return f"{self.run_id}~from~{match['run_id']}~{pinned}"
        return f"{self.run_id}~{pinned}"

    @classmethod
    def parse(cls, sampling_session_id: str) -> SamplingSession:
        parts = sampling_session_id.split("~")
        if len(parts) == 3 and parts[1] == "base":
            return cls(parts[0], None, parts[2])
        if len(parts) == 4:
            uri = checkpoint_uri(parts[0], parts[1], parts[2])  # type: ignore[arg-type]
            if CHECKPOINT_URI.match(uri):
                return cls(parts[0], uri, parts[3])
        if len(parts) == 6 and parts[1] == "from":
            uri = checkpoint_uri(parts[2], parts[3], parts[4])  # type: ignore[arg-type]
            if CHECKPOINT_URI.match(uri):
                return cls(parts[0], uri, parts[5])
        raise ValueError(f"unknown sampling session {sampling_session_id!r}")
