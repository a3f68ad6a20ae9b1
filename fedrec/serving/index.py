"""The item-embedding index: the whole catalogue encoded once and kept on disk.

``RUN/serving/items-round-NNNN-<quantization>.npy`` holds the unit-norm item
embeddings [I, D] (float32) of that checkpoint (``...-b<digest>.npy`` with a
device's own ``lora_B`` merged in); a JSON file beside it records the
catalogue fingerprint and model it was built from, so an index is reused only for
the catalogue and weights it describes and rebuilt otherwise.
"""

from __future__ import annotations

import json
import logging
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


def item_index(trained: TrainedModel, rebuild: bool = False) -> torch.Tensor:
    """Unit-norm embeddings of every catalogue item [I, D], from disk when still valid."""
    path = index_path(trained)
    meta_path = path.with_suffix(".json")
    description = _description(trained)
    if not rebuild and path.exists() and meta_path.exists():
        if json.loads(meta_path.read_text()) == description:
            return torch.from_numpy(np.load(path))
        log.info("%s describes another catalogue or model; rebuilding it", path)
    log.info("encoding %d catalogue items into %s", trained.prepared.num_items, path)
    embeddings = encode_items(trained.model, trained.table, torch.device("cpu")).float()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, embeddings.numpy())
    tmp.replace(path)
    meta_path.write_text(json.dumps(description, indent=2))
    return embeddings
