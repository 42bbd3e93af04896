"""Analysis of modality sharing: modality gap, per-layer NMI, attention maps."""
