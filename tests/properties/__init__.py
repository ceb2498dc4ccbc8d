"""Properties of the optimizers in one process: the GSNR factor's bounds and invariances, samples and
fallbacks, checkpoints, dtypes, gsnr_stats, and inputs that fail clearly (options, ds_config names).
Add a test here for an invariant or an error message."""
