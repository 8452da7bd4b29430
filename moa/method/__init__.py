"""The paper's method: `config` (every adapter flag), `experts` (LoRA, HydraLoRA, MoLoRA, parallel
adapter, prompt), `routers` (type routers and expert routers), `inject` (the one seam that attaches
them to a llama Transformer), `state` (adapter tensors in memory, LoRA merging), `stats` (router
statistics)."""
