"""What ``vae_tile_size`` saves: the peak memory of the VAE decode's forward+backward at 1024 px, on paper.

The method is bench/flow_memory.py's (docs/flow-memory.md): the published VAE configs built on the meta device, the
family's decode run on fake tensors with the rules of a CUDA bf16 run, and the peak of the live activation bytes
(weights excluded) tracked through forward and backward. Each VAE is measured decoding in one pass and in 512 px
tiles, each without and with ``vae_checkpointing``; tiles are switched on by the family adapter, as training does.
SD3.5-medium's and Z-Image-Turbo's VAEs are FLUX.1-dev's architecture. Nothing is downloaded or computed. Run:

    OMP_NUM_THREADS=1 .venv/bin/python bench/vae_tiles.py [--models a,b] [--size 1024] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from flow_memory import GIB, MODELS, measure_vae, parse_models  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "vae_tiles.json"
DEFAULT_MODELS = ("flux1-dev", "flux2-klein-4b", "qwen-image")  # the three VAE architectures of bench/flow_memory.py
TILES = (None, 512)  # 256 px tiles: 36 decoder calls at 1024 px, each traced op by op (too slow here)


def measure(model: str, size: int) -> list[dict]:
    rows = []
    for tile in TILES:
        for checkpointing in (False, True):
            result = measure_vae(model, size, block_ckpt=checkpointing, tile=tile)
            rows.append({"model": model, "size": size, "vae_tile_size": tile, "vae_checkpointing": checkpointing,
                         "peak_gib": None if result is None else round(result["peak"] / GIB, 3)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help="comma-separated, from: " + ", ".join(MODELS))
    parser.add_argument("--size", type=int, default=1024, help="image side in px (default 1024)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    models = parse_models(parser, args.models)
    if args.size < 64 or args.size % 64:
        parser.error(f"--size: got {args.size}, allowed: a multiple of 64 px")
    if args.out.is_dir():
        parser.error(f"--out: '{args.out}' is a folder; give a JSON file path")
    started = time.perf_counter()
    rows = [row for model in models for row in measure(model, args.size)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": "OMP_NUM_THREADS=1 .venv/bin/python bench/vae_tiles.py"
                                    + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])),
                                    "method": "bench/flow_memory.py measure_vae: peak live activation bytes, fake "
                                    "tensors, CUDA bf16 rules, weights excluded", "rows": rows,
                                    "seconds": round(time.perf_counter() - started, 1)}, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
