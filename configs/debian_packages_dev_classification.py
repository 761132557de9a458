"""``debian_packages_dev.py`` without its regression task: the ten classification tasks.

Before regression targets were standardised (issue 15), the size task's squared error
dominated the summed loss; this config measured the loss rule and the recipe on the
other ten tasks alone, and still tells what the size task costs them
(benchmarks/README.md, the ablation):

    python benchmarks/quality.py --config configs/debian_packages_dev_classification.py \\
        --modes mtop --seeds 0 --max-train 8000 --steps 250 --split validation \\
        --no-reference --out workdirs/q/dev8k-noreg \\
        --recipe labelled:train.task_loss=labelled --recipe batch:train.task_loss=batch
"""

from pathlib import Path

from mtop_jax.config import parse_arg
from mtop_jax.config.loading import load_config


def get_config(arg: str | None = None):
    """``arg``: ``mode=<mtop|shared|prefix|single>,steps=N,seed=S`` (a bare word is the mode)."""
    arg = parse_arg(arg, mode="mtop", steps=750, seed=0)
    dev = Path(__file__).with_name("debian_packages_dev.py")
    c = load_config(f"{dev}:mode={arg.mode},steps={arg.steps},seed={arg.seed}")
    c.data.tasks = {name: spec for name, spec in c.data.tasks.items()
                    if spec.get("kind", "classification") != "regression"}
    return c
