"""Many task adapters on one model: `registry`, `embedding` (pooled base states), `selector`,
`fusion` (the adapter bank, top-1 and weighted fusion), `routing` (per-row routing for example.py),
`lorahub` (gradient-free combination weights)."""
