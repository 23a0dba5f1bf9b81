"""DeViT: a large ViT decomposed into N small device ViTs, fused by a learned head.

Modules: `decompose` (class subsets), `ensemble` (the stacked model, registered
as ``devit_tiny_patch16``), `stages` (the training configs), `assemble` (the
ensemble's initial checkpoint from the sub-models), `export` (one TFLite file per
device + the fusion head + a manifest). The device runtime is
`vit_edge.runtime.worker` / `vit_edge.runtime.collab`.
"""
