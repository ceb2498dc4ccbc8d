"""The VR optimizers with the variance reduction off (vr=False, gamma=0) against their peers: torch.optim
and pytorch_optimizer. Add a test here when it compares with another library's optimizer."""
