"""Run under torchrun: train with spt.train.train, then each rank writes the trainable tensors it ended with.

    python -m torch.distributed.run --nproc_per_node 2 tests/helpers/ddp_train.py OUT_DIR -- TRAIN_ARGS...

Rank r writes OUT_DIR/rank{r}.safetensors, so a test can check that the replicas agree exactly.
"""

from __future__ import annotations

import sys
from pathlib import Path

from safetensors.torch import save_file

import spt.train as train_mod
from spt.config import load_config, parse_overrides


def main() -> None:
    out, args = Path(sys.argv[1]), sys.argv[3:]
    config = args[args.index("--config") + 1]
    overrides = parse_overrides([a for a in args if a.startswith("--") and "=" in a])
    built = []
    real_build = train_mod.build_method
    train_mod.build_method = lambda *a, **k: built.append(real_build(*a, **k)) or built[-1]
    train_mod.train(load_config(config, overrides), out / "run", progress=False)
    from spt import distributed

    state = {k: v.contiguous() for k, v in built[0].model.named_parameters() if v.requires_grad}
    save_file({k: v.detach() for k, v in state.items()}, str(out / f"rank{distributed.rank()}.safetensors"))


if __name__ == "__main__":
    main()
