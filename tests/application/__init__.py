"""The applications built on ds_vrgd: BERT pretraining data and training (ds_vrgd.pretrain, launch/) and
the experiments of benchmarks/. Add a test here when it exercises a pipeline end to end."""
