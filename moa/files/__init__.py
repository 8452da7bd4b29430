"""Files: `atomic` (all-or-none writes), `adapters` (the one reader and writer of adapter.pth +
adapter_params.json + base_trained.pth), `peft` (PEFT's adapter folder in and out)."""
