"""Speed options for the Wan DiT, applied from outside the model (function and module swaps, wrappers).

Modules:

- ``attention``: a registry of self-attention kernels (SDPA restricted to one backend, FlashAttention 3,
  SageAttention) and ``set_attention_backend`` / ``best_backend``. All but ``sage`` are lossless.
- ``fuse``: one q/k/v projection per block (``fuse_qkv`` / ``unfuse_qkv``) and RoPE in real arithmetic
  from precomputed cos/sin tables (``fast_rope`` / ``remove_fast_rope``). Lossless within rounding.
- ``compile``: regional ``torch.compile`` of every DiT block (``compile_blocks`` / ``uncompile_blocks``).
- ``cache``: step caching (lossy; separate module).
- ``fp8``: fp8 weights and matmuls (lossy; separate module).
- ``options``: ``SpeedOptions`` and ``build_pipeline``, which apply all of the above (and the memory
  profiles of ``segue.offload`` and LoRAs) in the one order they compose; ``segue.load(speed=...)``.

CFG as one batch of two lives on the pipeline: ``Pipeline.cfg_batch = True``.
"""
