"""Evaluation of the paper's three tasks, split by concern (imports only go down this list):

- `data`: image / mask folders, pairing by name, loading in a fixed geometry;
- `models`: LPIPS, Inception and CLIP from local weights only (`Unavailable` otherwise);
- `report`: statistics, CSV / Markdown / JSON, image grids, atomic writes;
- `inception`: FID and Inception Score through torchmetrics;
- `decoders`: the VAEs compared in inpainting (baseline lookup, vanilla / paste / ours);
- tasks: `inpainting` (ImageNet-style reconstruction), `pbe` (Paint-by-Example, COCOEE),
  `t2i` (text-to-image FID / IS).

scripts/evaluate.py is the command line (--task inpaint|pbe|t2i); docs/evaluation.md the protocols.
Nothing here imports `ldm_asym.train`.
"""
