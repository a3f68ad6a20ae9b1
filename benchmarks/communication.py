"""Bytes of one adapter upload (what a client sends) against the whole model.

Prints the figures for the configured model and LoRA settings; the last line is
``upload_share_of_model=<adapter bytes / model bytes>``.

    python benchmarks/communication.py [--model minilm-l6] [--r 8] [--freeze-a] [--wire-dtype int8] [--quick]

``--wire-dtype float16|int8`` measures the update as those clients send it
(fedrec.model.wire; the bytes depend on the shapes only, not on the values).
"""

from __future__ import annotations

import argparse
import json

from flwr.app import ArrayRecord

from fedrec.config import LoraSettings, ModelConfig
from fedrec.model.adapters import adapter_state, state_bytes
from fedrec.model.build import build_recommender
from fedrec.model.wire import WIRE_DTYPES, encode_update


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--target-modules", default="query,value")
    parser.add_argument("--freeze-a", action="store_true", help="FFA-LoRA: only lora_B is sent")
    parser.add_argument("--wire-dtype", default="float32", choices=WIRE_DTYPES)
    parser.add_argument("--quick", action="store_true", help="same run (it is already quick)")
    args = parser.parse_args()
    model = build_recommender(ModelConfig(name=args.model), LoraSettings(r=args.r, target_modules=args.target_modules, freeze_a=args.freeze_a))
    state = adapter_state(model.encoder)
    params = list(model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in params)
    adapter_bytes = state_bytes(state)
    wire_bytes = ArrayRecord(encode_update(state, state, args.wire_dtype)).count_bytes()
    figures = {
        "model": args.model,
        "lora_r": args.r,
        "target_modules": args.target_modules,
        "freeze_a": args.freeze_a,
        "wire_dtype": args.wire_dtype,
        "model_params": sum(p.numel() for p in params),
        "adapter_params": sum(t.numel() for t in state.values()),
        "model_bytes": model_bytes,
        "adapter_bytes_fp32": adapter_bytes,
        "arrayrecord_bytes": wire_bytes,
    }
    print(json.dumps(figures, indent=2))
    print(f"upload_share_of_model={wire_bytes / model_bytes:.6f}")


if __name__ == "__main__":
    main()
