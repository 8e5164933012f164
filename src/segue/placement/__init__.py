"""Where weights and activations live: memory profiles, their estimates, and the transforms that apply them.

Modules, lowest first (each imports only those above it in this list, never ``segue.loader``):

- ``tensors``: the run device and dtype, a module's tensors and bytes, moving them (``place``).
- ``profiles``: ``Profile`` (offload, block swap, tiled decode, fp8, text encoder on the CPU) and the
  registry ``PROFILES`` of named profiles ("gpu", "offload", "block-swap", "fp8", "low").
- ``offload``: ``ComponentOffload``, weights in CPU memory moved in around a component's calls.
- ``block_swap``: ``BlockSwap``, the DiT's blocks streamed through a few device slots.
- ``tiled_vae``: ``tiled_decode``, the exact VAE decode in row bands with bounded memory.
- ``estimate``: ``estimate_memory`` / ``memory_table`` / ``trace_peak``, device bytes of a generation
  under each profile, traced on meta tensors.
- ``apply``: ``apply_profile`` (the one function that applies a profile), ``remove_profile``,
  ``choose_profile`` / ``pick_profile`` ("auto").

Import what you need from its module (``from segue.placement.apply import apply_profile``): this file
imports nothing, so that ``segue.load`` pays only for the modules a run uses.
"""
