"""The distclip demo from a source checkout (its code is :mod:`distclip.demo`, also ``distclip demo``).

    torchrun --nproc_per_node 2 launch/train_char_lstm.py --config configs/demo.yaml

A character-level LSTM trained with DDP on Python's own standard-library source, clipped per layer
group; ``--help`` lists the options. Kept so that this command keeps working: ``distclip demo``
runs the same code from any installation (it starts its own ranks).
"""

import sys

from distclip.demo import CharLSTM, LiveLine, main, sample, stdlib_text  # noqa: F401 (tests load the model and data)

if __name__ == "__main__":
    sys.exit(main())
