"""The item-embedding index: the whole catalogue encoded once and kept on disk.

``RUN/serving/items-round-NNNN-<quantization>.npy`` holds the unit-norm item
embeddings [I, D] (float32) of that checkpoint (``...-b<digest>.npy`` with a
device's own ``lora_B`` merged in); a JSON file beside it records the
catalogue fingerprint and model it was built from, so an index is reused only for
the catalogue and weights it describes and rebuilt otherwise. Items added after
training (``--new-items``) are encoded alone into ``...-new-<digest>.npy`` and
appended to the run's index, which is neither rebuilt nor changed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fedrec.evaluation import encode_items
from fedrec.serving.trained import TrainedModel, checkpoint_name

log = logging.getLogger(__name__)


def index_path(trained: TrainedModel) -> Path:
    """Where the index of this run, round (or averaged rounds) and quantization lives."""
    own_b = f"-b{trained.local_adapters}" if trained.local_adapters else ""
    name = f"items-{checkpoint_name(trained.server_round, trained.averaged_rounds)}-{trained.quantization}{own_b}.npy"
    return trained.run_dir / "serving" / name


def new_items_index_path(trained: TrainedModel) -> Path:
    """Where the embeddings of the items added after training live (``--new-items``)."""
    path = index_path(trained)
    return path.with_name(f"{path.stem}-new-{trained.new_items_digest}.npy")


def _description(trained: TrainedModel) -> dict:
    return {
        "catalogue_digest": trained.prepared.catalogue_digest,
        "num_items": trained.prepared.num_items,
        "model": trained.config.model.name,
        "max_item_tokens": trained.config.model.max_item_tokens,
        "server_round": trained.server_round,
        "averaged_rounds": list(trained.averaged_rounds),
        "quantization": trained.quantization,
        "local_adapters": trained.local_adapters,
    }


def _cached(path: Path, description: dict, encode: Callable[[], torch.Tensor], rebuild: bool) -> torch.Tensor:
    """The array at ``path`` if its JSON matches ``description``, else ``encode()`` saved there."""
    meta_path = path.with_suffix(".json")
    if not rebuild and path.exists() and meta_path.exists():
        if json.loads(meta_path.read_text()) == description:
            return torch.from_numpy(np.load(path))
        log.info("%s describes another catalogue or model; rebuilding it", path)
    embeddings = encode().float()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, embeddings.numpy())
    tmp.replace(path)
    meta_path.write_text(json.dumps(description, indent=2))
    return embeddings


def item_index(trained: TrainedModel, rebuild: bool = False) -> torch.Tensor:
    """Unit-norm embeddings of every served catalogue item [I, D], from disk when still valid."""
    run_items = trained.prepared.num_items
    path = index_path(trained)

    def encode_run_items() -> torch.Tensor:
        log.info("encoding %d catalogue items into %s", run_items, path)
        return encode_items(trained.model, trained.table, torch.device("cpu"), only=np.arange(run_items))[:run_items]

    embeddings = _cached(path, _description(trained), encode_run_items, rebuild)
    if trained.new_items is None:
        return embeddings
    added = np.arange(run_items, len(trained.catalogue))
    new_path = new_items_index_path(trained)

    def encode_new_items() -> torch.Tensor:
        log.info("encoding %d items added after training into %s", len(added), new_path)
        return encode_items(trained.model, trained.table, torch.device("cpu"), only=added)[run_items:]

    description = {**_description(trained), "new_items": trained.new_items_digest}
    return torch.cat([embeddings, _cached(new_path, description, encode_new_items, rebuild)])
