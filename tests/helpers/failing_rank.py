"""`tunesmith train` as torchrun runs it, except that rank 1 fails in its second step: for the
test that a failing rank stops the whole job with its own one-line error."""

import os
import sys

from tunesmith.train.loop import Run, TrainingError

original = Run.train_step


def train_step(self, step):
    if os.environ.get("RANK") == "1" and step == 1:
        raise TrainingError(f"step {step + 1}: a planted failure on this rank")
    return original(self, step)


Run.train_step = train_step

if __name__ == "__main__":
    from tunesmith.cli import main

    sys.argv = ["tunesmith", *sys.argv[1:]]
    main()
