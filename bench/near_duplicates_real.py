"""False pairs of the copy detector (osteolib.data.duplicates) on real radiographs: NIH ChestX-ray14 images of
different patients, where every reported pair between two patients is a false one.

    .venv/bin/python bench/near_duplicates_real.py [--images 600] [--seed 0] [--data-root ../shared/data]
                                                   [--out bench/results/near_duplicates_real.json]

Samples ``--images`` images of the NIH subset (seeded), runs :func:`find_copies` with every verified candidate kept,
and counts the pairs the detector's defaults report between different patients (false) and within one patient
(follow-up radiographs, which the patient-level split keeps together anyway). Writes JSON with the CPU model.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from osteolib.data.duplicates import DEFAULT_MIN_MATCHES, DEFAULT_MIN_TEXTURE, find_copies
from osteolib.data.sources import load_dataset
from osteolib.paths import require_real_data_root
from osteolib.utils import cpu_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", default="bench/results/near_duplicates_real.json")
    args = parser.parse_args()
    table = load_dataset("nih_cxr14", require_real_data_root(args.data_root))
    sample = table.sample(n=min(args.images, len(table)), random_state=args.seed).reset_index(drop=True)
    started = time.perf_counter()
    every = find_copies(sample, min_matches=1, min_texture=-np.inf)
    seconds = time.perf_counter() - started
    reported = (every["matches"] >= DEFAULT_MIN_MATCHES) & (every["texture"] >= DEFAULT_MIN_TEXTURE)
    between = every["patient_a"] != every["patient_b"]
    result = {
        "benchmark": "near_duplicates_real", "cpu": cpu_model(), "cpu_count": os.cpu_count(),
        "python": platform.python_version(), "settings": vars(args),
        "min_matches": DEFAULT_MIN_MATCHES, "min_texture": DEFAULT_MIN_TEXTURE,
        "images": len(sample), "patients": int(sample["patient_id"].nunique()),
        "detector_seconds_including_decode": round(seconds, 1),
        "candidates_between_patients": int(between.sum()),
        "false_pairs": int((reported & between).sum()),
        "most_matches_between_patients": int(every.loc[between, "matches"].max()) if between.any() else None,
        "highest_texture_between_patients": float(every.loc[between, "texture"].max()) if between.any() else None,
        "pairs_within_a_patient": int((reported & ~between).sum()),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
