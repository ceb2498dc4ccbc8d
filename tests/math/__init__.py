"""The algorithm against float64: every VR optimizer step equals an independent float64 reading of
docs/design.md (support/reference.py), and the GSNR estimator on real BERT gradients does on every path.
Add a test here when it checks a number the design defines."""
