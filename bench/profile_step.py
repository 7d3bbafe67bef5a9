"""Where the time of one training step goes, beside plain inference of the same batch: torch.profiler's operator
table of each (``bench/limits.py``'s pipelines, prompts and settings), and the share of the time the named kernels
take on both sides.

    .venv/bin/python bench/profile_step.py --family sd --k all --compare checkpoint_memory_budget_gb=100

One warm-up of each, then one profiled call of each. Prints the top operators by self CPU time for both, then one
JSON line with each side's total self CPU time and the seconds of its attention kernels (forward and backward).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import limits  # noqa: E402
from common import KERNELS, PROMPTS, emit, kernel_seconds, kernel_summary  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True, choices=sorted(limits.SETTINGS))
    parser.add_argument("--k", type=limits.parse_k, default="all", help="truncation depth: a number or 'all' (default)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--threads", type=limits.positive_int, default=2)
    parser.add_argument("--rows", type=limits.positive_int, default=15, help="operators shown per table")
    parser.add_argument("--compare", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override of the training side (bench/limits.py's --compare)")
    args = parser.parse_args()
    limits.check_training_args(parser, args)
    from alignprop_core.errors import ConfigError

    try:
        overrides = {key: value for spec in args.compare for key, value in limits.parse_overrides(spec).items()}
    except ConfigError as exc:
        parser.error(str(exc))
    warnings.filterwarnings("ignore")
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(args.threads)
    prompts = [PROMPTS[i % args.batch] for i in range(args.batch)]
    with tempfile.TemporaryDirectory() as tmp:
        folder = limits.build_folder(args.family, Path(tmp))
        pipe = limits.inference_pipeline(folder, args.family)
        trainer = limits.trainer_for(folder, args.family, args.k, args, f"{tmp}/out", **overrides)
        runs = {"inference": lambda: limits.inference(pipe, args.family, prompts, args, args.size),
                "train_step": trainer.train_step}
        result = {}
        for name, run in runs.items():
            run()  # warm-up
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                run()
            events = prof.key_averages()
            print(f"===== {name}")
            print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
            total = kernel_summary(events)["self_cpu_s"]
            attention = kernel_seconds(events, KERNELS["attention"])
            result[name] = {"self_cpu_s": total, "attention_kernels_s": attention,
                            "attention_share": sum(attention.values()) / total}
    emit({**vars(args), **result, "torch": torch.__version__})


if __name__ == "__main__":
    main()
