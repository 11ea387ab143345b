"""One stage (pretrain or finetune) of a run folder with a profile's parameters::

    torchrun --nproc_per_node 2 -m osteolib.cli.stage finetune --run-dir runs/<run> \\
        --profile smoke --execution 04_finetune-backbone=densenet121-scenario=random-seed=0
    torchrun --nproc_per_node 2 -m osteolib.cli.stage pretrain --run-dir runs/<run> \\
        --profile smoke --execution 01_chest_mae-backbone=vit_small-patch_size=8 --set epochs=5

``--execution`` is a name ``osteo list`` prints; ``--set NAME=VALUE`` overrides a parameter. The stage is
run in every process; ranks other than 0 give the stage a scratch run folder whose parent is the real one
(they read the earlier stages' checkpoints through it, and their copies of the stage's own output files go
to the scratch folder, which is deleted), so the real run folder is written by rank 0 alone.
"""
from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

from osteolib.cli.osteo import parse_overrides
from osteolib.cli.profiles import ProfileError, load_profile
import torch.distributed as dist

from osteolib.engine import DistributedContext, barrier, context, init_process_group
from osteolib.study import NOTEBOOK_SCENARIO
from osteolib.utils import config_from

def _stage_parameters(profile: str | None, execution: str | None, overrides: Sequence[str]) -> dict[str, Any]:
    """The execution's parameters (as ``osteo run`` would pass them), plus ``notebook``, then ``--set``."""
    parameters: dict[str, Any] = {}
    if execution and not profile:
        raise ProfileError("--execution needs --profile (the profile the execution name comes from)")
    if profile:
        loaded = load_profile(profile)
        executions = {e.name: e for e in loaded.executions()}
        if execution is None:
            raise ProfileError(f"--profile {profile}: name the execution to run with --execution; one of "
                               f"{sorted(executions)}")
        if execution not in executions:
            raise ProfileError(f"--execution {execution!r} is not in profile {loaded.name}; `osteo list --profile "
                               f"{loaded.name}` prints the names: {sorted(executions)}")
        parameters.update(executions[execution].parameters, notebook=executions[execution].notebook)
    parameters.update(parse_overrides(overrides))
    return parameters


def _pretrain_scenario(parameters: dict[str, Any]) -> str:
    if "scenario" in parameters:
        return str(parameters["scenario"])
    notebook = parameters.get("notebook")
    if notebook not in NOTEBOOK_SCENARIO:
        raise ValueError(f"pretrain: cannot tell the scenario: pass --profile/--execution of notebook "
                         f"{sorted(NOTEBOOK_SCENARIO)} or --set scenario=<one of osteolib.study.SCENARIOS>")
    return NOTEBOOK_SCENARIO[notebook].format(crop_mode=parameters.get("crop_mode", "random"))


@contextlib.contextmanager
def _rank_run(run_dir: Path, ctx: DistributedContext | None) -> Iterator[Any]:
    """The Run this process gives the stage: the real one on rank 0 (or single process); elsewhere a scratch
    run whose parent is the real one, deleted afterwards."""
    from osteolib.runs import Run, new_run

    if ctx is None or ctx.is_main:
        yield Run(run_dir)
        return
    scratch = Path(tempfile.mkdtemp(prefix=f"osteolib-rank{ctx.rank}-"))
    try:
        yield new_run(f"rank{ctx.rank}", root=scratch, parent=run_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _rank0_first(ctx: DistributedContext | None, build: Any) -> Any:
    """``build()`` in rank 0 first (it may write a shared cache), then in the other ranks."""
    if ctx is None:
        return build()
    result = build() if ctx.is_main else None
    barrier()
    return result if ctx.is_main else build()


def _run_pretrain(run: Any, real: Any, parameters: dict[str, Any], ctx: DistributedContext | None) -> None:
    from osteolib.data import external
    from osteolib.data import sources as datasets
    from osteolib.stages import pretrain
    from osteolib.data import splits
    from osteolib.data import read_audit
    from osteolib.data import ImageCache
    from osteolib.data import read_split_manifest

    scenario = _pretrain_scenario(parameters)
    config = config_from(pretrain.PretrainConfig, parameters, scenario=scenario)
    if scenario == "chest_mae":
        pool = datasets.load_pool(parameters.get("chest_datasets", ["synthetic_chest"]), parameters.get("data_root"),
                                  parameters.get("chest_options", {}))
        # as notebook 01: the external test set (notebook 00's external_test) is never pretrained on
        pool, _ = external.exclude_external(pool, external.read_external_set(real))
        val_fraction = float(parameters.get("val_fraction", 0.05))
        manifest = splits.patient_split(pool, ratios=[1 - val_fraction, val_fraction, 0.0], seed=config.seed,
                                        keep_existing=False)
        cache = _rank0_first(ctx, lambda: ImageCache.build(manifest, config.image_size, progress=False))
        mean, std = cache.pixel_stats(manifest.loc[manifest["split"] == "train", "image_id"])
    else:
        manifest = read_split_manifest(real.find("data/manifest.csv"))
        audit = read_audit(real.find("data/audit.json"))
        mean, std = audit["normalisation"]["mean"], audit["normalisation"]["std"]
        cache = _rank0_first(ctx, lambda: ImageCache.build(manifest, config.image_size, progress=False))
    result = pretrain.pretrain(run, config, manifest, cache, mean, std, quiet=ctx is not None and not ctx.is_main)
    if ctx is None or ctx.is_main:
        print(f"osteolib.cli.stage: {scenario}/{config.backbone} -> {result.checkpoint}", flush=True)


def _run_finetune(run: Any, real: Any, parameters: dict[str, Any], ctx: DistributedContext | None) -> None:
    from osteolib.data import external
    from osteolib.stages import finetune
    from osteolib.data import read_audit
    from osteolib.data import ImageCache
    from osteolib.data import read_split_manifest

    config = config_from(finetune.FinetuneConfig, parameters)
    manifest = read_split_manifest(real.find("data/manifest.csv"))
    audit = read_audit(real.find("data/audit.json"))
    mean, std = audit["normalisation"]["mean"], audit["normalisation"]["std"]
    cache = _rank0_first(ctx, lambda: ImageCache.build(manifest, config.image_size, progress=False))
    # as notebook 04: the external test set, when notebook 00 made one, is scored once after selection
    external_set = external.read_external_set(real)
    external_data = None if external_set is None else (
        external_set, _rank0_first(ctx, lambda: ImageCache.build(external_set, config.image_size, progress=False)))
    result = finetune.finetune(run, config, manifest, cache, mean, std, classes=audit["classes"], external=external_data)
    if ctx is None or ctx.is_main:
        print(f"osteolib.cli.stage: {result.name}: validation AUC {result.valid_auc:.4f} -> "
              f"{result.predictions_path}", flush=True)


STAGES = {"pretrain": _run_pretrain, "finetune": _run_finetune}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m osteolib.cli.stage",
        description="Run one training stage of a run folder, distributed when started by torchrun.")
    parser.add_argument("stage", choices=sorted(STAGES))
    parser.add_argument("--run-dir", required=True, help="the run folder (earlier stages' outputs are read from it)")
    parser.add_argument("--profile", help="profile whose parameters the stage takes (with --execution)")
    parser.add_argument("--execution", help="execution name as `osteo list` prints it, e.g. 04_finetune-...")
    parser.add_argument("--set", nargs="+", default=[], metavar="NAME=VALUE", help="override a parameter")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir).resolve()
    if not (run_dir / "run.json").is_file():
        print(f"osteolib.cli.stage: error: {run_dir} is not a run folder (no run.json); start one with "
              f"`osteo run --only 00`", file=sys.stderr)
        return 1
    parameters = _stage_parameters(args.profile, args.execution, args.set)
    expected = ("04_finetune",) if args.stage == "finetune" else tuple(NOTEBOOK_SCENARIO)
    if parameters.get("notebook", expected[0]) not in expected:
        print(f"osteolib.cli.stage: error: --execution {args.execution} belongs to notebook "
              f"{parameters['notebook']}, not to the {args.stage} stage ({', '.join(expected)})", file=sys.stderr)
        return 1
    ctx = context()
    joined = init_process_group(ctx) if ctx is not None else False
    try:
        from osteolib.runs import Run

        with _rank_run(run_dir, ctx) as run:
            STAGES[args.stage](run, Run(run_dir), parameters, ctx)
    finally:
        if joined:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
