"""The napari-free core: model, feature cache, guidance, propagation, IO and training."""
