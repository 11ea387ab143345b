"""The automatic precision choice against each explicit one: fine-tuning DenseNet121 through ``fit`` (as in the
``finetune`` rows) with ``precision="auto"`` beside the same run with "fp32" and with "bf16" (and "fp16" on a GPU).

Here the "reference" is the explicit choice, not a plain loop. ``auto`` is right when the precision it resolves to
is not slower than the one it passed over (goal: auto / other >= 1); the row of the choice ``auto`` resolved to
compares the same settings measured twice (its ratio shows the noise; no goal).
"""
from __future__ import annotations

from osteolib.engine import choose_precision
from osteolib.stages.finetune_config import FinetuneConfig

from bench.families.finetune import finetune_config, measure_osteolib
from bench.plan import Plan
from bench.timing import once

BACKBONE = "densenet121"


def plans(ctx) -> list[Plan]:
    batch = ctx.settings.batch_for(FinetuneConfig.batch_size)
    auto = choose_precision(ctx.device, "auto")
    explicit = ["fp32", "bf16"] + (["fp16"] if ctx.device.type == "cuda" else [])
    measure_auto = once(lambda: measure_osteolib(ctx, finetune_config(ctx, BACKBONE, batch, "auto")))
    out = []
    for choice in explicit:
        same = choice == auto.name
        out.append(Plan("precision", f"fit {BACKBONE}: auto ({auto.name}) vs {choice}", "images/s", measure_auto,
                        lambda c=choice: measure_osteolib(ctx, finetune_config(ctx, BACKBONE, batch, c)),
                        ctx.training_settings(batch, backbone=BACKBONE, auto_resolves_to=auto.name,
                                              auto_reason=auto.reason, explicit=choice),
                        goal=None if same else 1.0,
                        goal_note=(f"auto chose {choice}: the same settings measured twice" if same else
                                   f"auto chose {auto.name}; it must not be slower than {choice}")))
    return out
