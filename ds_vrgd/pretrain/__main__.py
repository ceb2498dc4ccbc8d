"""``python -m ds_vrgd.pretrain``: BERT pretraining (see :mod:`ds_vrgd.pretrain.train`)."""

import sys

from ds_vrgd.pretrain.train import main

if __name__ == "__main__":
    sys.exit(main())
