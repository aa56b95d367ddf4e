"""The napari plugin layer: the only place napari and Qt may appear."""
