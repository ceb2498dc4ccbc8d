"""ds_vrgd inside other tools as users start them: DeepSpeed config names and registration, the DeepSpeed
internals it relies on, Hugging Face Trainer and accelerate, the real launchers. Add a test here when it
checks how ds_vrgd is found, configured or launched."""
