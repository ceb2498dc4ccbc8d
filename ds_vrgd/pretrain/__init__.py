"""BERT pretraining with VRGD optimizers: data (:mod:`.corpus`, :mod:`.data`), models (:mod:`.models`),
training (:mod:`.train`, ``python -m ds_vrgd.pretrain``) and its records (:mod:`.report`).

Submodules import ``datasets``/``transformers`` lazily, so ``import ds_vrgd.pretrain`` is cheap.
How to run it: docs/pretraining.md.
"""
