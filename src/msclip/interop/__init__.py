"""Bridges to other evaluation tools. Each module imports its tool lazily, so `import msclip.interop` needs none.

* `clip_benchmark`: a CLIP_benchmark model loader (`load_msclip`) and `register()`, which adds the model
  type "msclip" to CLIP_benchmark's loader table (docs/clip-benchmark.md).
"""
