"""BERT pretraining with VRGD optimizers: data (:mod:`.corpus`, :mod:`.data`) and models (:mod:`.models`).

Submodules import ``datasets``/``transformers`` lazily, so ``import ds_vrgd.pretrain`` is cheap.
"""
