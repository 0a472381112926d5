"""`mvit ARGS` as one torchrun rank, also keeping what this rank did, for tests of the distributed path.

Run as `python -m torch.distributed.run --nproc_per_node 2 tests/ddp_train.py train CONFIG ...`. Into
the folder `$MVIT_RANK_RECORDS` (never the run folder), each rank writes `rank<R>.json`: the training
steps it took in each epoch (dataset index and sample indices), and `rank<R>.safetensors`: its weights
when its last training epoch ended.
"""

import json
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

from mvit.cli.app import main
from mvit.train import trainer as training


def record_steps_and_weights(folder: Path, rank: str) -> None:
    real_plan, real_epoch = training.epoch_steps, training.Trainer._train_epoch
    steps: dict[int, list] = {}

    def plan(tasks, config, epoch, processes):
        chosen = real_plan(tasks, config, epoch, processes)
        steps[epoch] = [[int(task), [int(i) for i in batch]] for task, batch in chosen]
        return chosen

    def train_epoch(self, epoch, *args, **kwargs):
        result = real_epoch(self, epoch, *args, **kwargs)
        weights = {name: tensor.detach().cpu().contiguous() for name, tensor in self.model.state_dict().items()}
        save_file(weights, str(folder / f"rank{rank}.safetensors"))  # overwritten each epoch: the last one stays
        (folder / f"rank{rank}.json").write_text(json.dumps({"steps": steps}))
        return result

    training.epoch_steps, training.Trainer._train_epoch = plan, train_epoch


if __name__ == "__main__":
    record_steps_and_weights(Path(os.environ["MVIT_RANK_RECORDS"]), os.environ.get("RANK", "0"))
    sys.argv = ["mvit", *sys.argv[1:]]
    main()
