"""Run under torchrun: train each method with spt.train.train, then each rank writes the trainable tensors
it ended with, so a test can check that the replicas agree exactly and match one process.

    python -m torch.distributed.run --nproc_per_node 2 tests/helpers/ddp_train.py OUT_DIR METHODS -- TRAIN_ARGS...

METHODS is comma-separated (spt,pt,lora,...). Rank r writes OUT_DIR/METHOD/rank{r}.safetensors; one launch
(one process start-up) serves every method.
"""

from __future__ import annotations

import sys
from pathlib import Path

from safetensors.torch import save_file

import spt.train as train_mod
from spt import distributed
from spt.config import load_config, parse_overrides


def main() -> None:
    out, methods, args = Path(sys.argv[1]), sys.argv[2].split(","), sys.argv[4:]
    config = args[args.index("--config") + 1]
    overrides = parse_overrides([a for a in args if a.startswith("--") and "=" in a])
    real_build = train_mod.build_method
    for method in methods:
        built = []
        train_mod.build_method = lambda *a, _b=built, **k: _b.append(real_build(*a, **k)) or _b[-1]
        train_mod.train(load_config(config, {**overrides, "method": method}), out / method / "run", progress=False)
        state = {k: v.detach().contiguous() for k, v in built[0].model.named_parameters() if v.requires_grad}
        save_file(state, str(out / method / f"rank{distributed.rank()}.safetensors"))


if __name__ == "__main__":
    main()
