"""One module per row family; each has ``plans(ctx) -> list[Plan]`` (see :mod:`bench.plan`), named as in
:data:`bench.settings.FAMILIES`. A family may prepare its data in ``plans``; the timing happens in the plans' sides."""
