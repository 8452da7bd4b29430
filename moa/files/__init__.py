"""Files: `adapters` (the one reader and writer of adapter.pth + adapter_params.json +
base_trained.pth), `lock` (one writer per output file), `settings` (the settings sidecar of an output),
`official` (checkpoints of the official MoA code). All-or-none writes: `moa.atomic`; PEFT folders:
`moa.lora.peft`."""
