"""Training speed of the presets on this machine: steps/s and tokens/s at batch 8.

Runs ``genecorpus.model.pretrain`` on the published 500-cell Genecorpus-30M sample (cells of ~2,048 tokens,
so every batch is full at either max length) and reads the speed of the training steps alone (no
evaluation, checkpoint or setup) from each model's ``genecorpus_model.json``::

    python benchmarks/pretrain_speed.py [--shared ../shared] [--steps 10] [--out /tmp/pretrain-speed]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from genecorpus.model.pretrain import pretrain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--lengths", default="2048,512")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "pretrain-speed")
    args = parser.parse_args()
    sample = args.shared / "genecorpus-sample" / "genecorpus_500_samples.parquet"
    tdict = args.shared / "geneformer-dicts" / "token_dictionary_gc30M.pkl"
    print(f"torch threads: {__import__('torch').get_num_threads()}, load average: {os.getloadavg()[0]:.1f}")
    print(f"{'preset':<8}{'max length':>11}{'steps':>7}{'steps/s':>10}{'tokens/s':>11}")
    for preset in args.presets.split(","):
        for max_length in (int(x) for x in args.lengths.split(",")):
            result = pretrain(sample, args.out / f"{preset}-{max_length}", preset=preset, max_steps=args.steps,
                              batch_size=8, max_length=max_length, val_cells=8, eval_every=10**6,
                              token_dictionary=tdict, overwrite=True)
            t = result.info["training"]
            print(f"{preset:<8}{max_length:>11}{t['steps']:>7}{t['steps_per_second']:>10.3f}"
                  f"{t['tokens_per_second']:>11,}", flush=True)


if __name__ == "__main__":
    main()
