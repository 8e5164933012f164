"""Speed options for the Wan DiT, applied from outside the model (function and module swaps, hooks).

Modules:

- ``attention``: a registry of self-attention kernels (SDPA restricted to one backend, FlashAttention 3,
  SageAttention) and ``set_attention_backend`` / ``best_backend``. All but ``sage`` are lossless.
- ``fuse``: one q/k/v projection per block (``fuse_qkv`` / ``unfuse_qkv``) and RoPE in real arithmetic
  from precomputed cos/sin tables (``fast_rope`` / ``remove_fast_rope``). Lossless within rounding.
- ``compile``: regional ``torch.compile`` of every DiT block (``compile_blocks`` / ``uncompile_blocks``).
- ``cache``: step caching (lossy), installed as the DiT's blocks runner.
- ``fp8``: fp8 weights and matmuls (lossy; separate module).
- ``options``: ``SpeedOptions``, the choices ``segue.load(speed=...)`` applies (with the memory profiles of
  ``segue.placement`` and LoRAs) in the one order they compose (``segue.loader.build_pipeline``).

CFG as one batch of two is a guidance strategy of the pipeline (``segue.sampling.guidance.OneBatch``).
"""
