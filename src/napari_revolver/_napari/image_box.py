"""The *Image and model* group: which image, which channel, how read, which weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSizePolicy,
    QSpinBox,
)

from ..core.scale import MAX_SCALE, MIN_SCALE
from .box import SessionBox
from .session import ImageState, Session

DEFAULT_WEIGHTS = "shipped weights"


def image_layers(viewer: Any) -> list[Any]:
    """Return the viewer's Image layers, in layer-list order."""
    from napari.layers import Image

    return [layer for layer in viewer.layers if isinstance(layer, Image)]


class ImageBox(SessionBox):
    """Chooses the image and how it is read; shows the session's current image.

    Parameters are those of :class:`~.box.SessionBox` without ``title``.
    """

    def __init__(self, session: Session, report: Callable[[str, str], None]) -> None:
        super().__init__("Image and model", session, report)
        form = QFormLayout(self)
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        self.image_combo = QComboBox()
        self.image_combo.setToolTip("Image layer to segment (2D, Z stack, time-lapse, T x Z, RGB)")
        form.addRow("Image", self.image_combo)
        self.channel_axis = QComboBox()
        self.channel_axis.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToContents)
        self.channel_axis.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.channel_axis.setToolTip(
            "For a multichannel image shown as one layer: its channel axis"
        )
        self.channel_index = QSpinBox()
        self.channel_index.setToolTip("Channel to segment")
        form.addRow("Channel axis", self.channel_axis)
        form.addRow("Channel", self.channel_index)
        wrow = QHBoxLayout()
        self.weights_label = QLabel(DEFAULT_WEIGHTS)
        self.weights_label.setToolTip(
            "Network weights: the shipped default or a file from `revolver train`"
        )
        self.weights_button = QPushButton("Choose…")
        self.weights_default = QPushButton("Default")
        wrow.addWidget(self.weights_label, 1)
        wrow.addWidget(self.weights_button)
        wrow.addWidget(self.weights_default)
        form.addRow("Weights", wrow)
        self.device_combo = QComboBox()
        self.device_combo.addItems(["auto", "cpu", "cuda", "mps"])
        form.addRow("Device", self.device_combo)
        srow = QHBoxLayout()
        self.store_label = QLabel("in memory")
        self.store_label.setToolTip(
            "Where this image's slice features are kept: memory only, or "
            "a zarr store reused across sessions (revolver precompute)"
        )
        self.store_button = QPushButton("Store…")
        self.store_clear = QPushButton("Memory")
        srow.addWidget(self.store_label, 1)
        srow.addWidget(self.store_button)
        srow.addWidget(self.store_clear)
        form.addRow("Features", srow)
        self.invert_check = QCheckBox("Dark objects on a light background (invert)")
        self.invert_check.setToolTip(
            "Brightfield, H&E: intensities are reversed so objects look like the bright "
            "objects of fluorescence. Applies to tasks guided on this image; a task keeps "
            "its setting when applied to another image."
        )
        form.addRow(self.invert_check)
        self.scale_spin = QDoubleSpinBox()
        self.scale_spin.setRange(MIN_SCALE, MAX_SCALE)
        self.scale_spin.setSingleStep(0.25)
        self.scale_spin.setDecimals(2)
        self.scale_spin.setValue(1.0)
        self.scale_spin.setKeyboardTracking(False)  # one change when typing is done
        self.scale_spin.setToolTip(
            "Each slice is resized by this factor before the network. 0.5 for large objects "
            "with textured insides, such as mitochondria in EM at a few nm per pixel (better, "
            "and 2-3x faster); keep 1 for cells outlined by thin membranes. Points, masks and "
            "labels stay in the image's pixels. Applies to tasks guided on this image; a task "
            "keeps its scale when applied to another image."
        )
        form.addRow("Scale", self.scale_spin)

        self.image_combo.currentIndexChanged.connect(self._image_chosen)
        self.channel_axis.currentIndexChanged.connect(self._image_chosen)
        self.channel_index.valueChanged.connect(self._image_chosen)
        self.weights_button.clicked.connect(self._choose_weights)
        self.weights_default.clicked.connect(lambda: self.set_weights(None))
        self.device_combo.currentTextChanged.connect(lambda _: self.set_weights(session.weights))
        self.store_button.clicked.connect(self._choose_store)
        self.store_clear.clicked.connect(lambda: self.set_store(None))
        self.invert_check.toggled.connect(self.set_invert)
        self.scale_spin.valueChanged.connect(self.set_scale)
        session.events.image_changed.connect(self._show_image)

    # ------------------------------------------------------------ the image
    def refresh_layers(self, *_: Any) -> None:
        """Fill the image list from the viewer's layers (keeps the current choice)."""
        names = [layer.name for layer in image_layers(self.session.viewer)]
        current = self.image_combo.currentText()
        self.image_combo.blockSignals(True)
        self.image_combo.clear()
        self.image_combo.addItems(names)
        if current in names:
            self.image_combo.setCurrentText(current)
        self.image_combo.blockSignals(False)
        if names and (self.session.image is None or current not in names):
            self._image_chosen()

    def layer_named(self, name: str) -> Any:
        """Return the Image layer called ``name`` (``None`` if there is none)."""
        return next((x for x in image_layers(self.session.viewer) if x.name == name), None)

    def _image_chosen(self, *_: Any) -> None:
        layer = self.layer_named(self.image_combo.currentText())
        if layer is None:
            return
        self._sync_channel_controls(layer)
        axis = self.channel_axis.currentData()
        try:
            state = self.session.set_image(
                layer, axis, self.channel_index.value() if axis is not None else None
            )
        except (ValueError, FileNotFoundError, ImportError) as exc:
            self.report("error", f"Cannot use image {layer.name!r}: {exc}")
            return
        info = state.predictor.info
        self._show_image(state)
        self.report(
            "status",
            f"Image {layer.name!r}: {info.n_slices} slice(s) of "
            f"{info.slice_shape[0]} x {info.slice_shape[1]}.",
        )

    def _show_image(self, state: ImageState | None) -> None:
        if state is None:
            return
        self.invert_check.blockSignals(True)
        self.invert_check.setChecked(state.spec.invert)
        self.invert_check.blockSignals(False)
        self.scale_spin.blockSignals(True)
        self.scale_spin.setValue(state.spec.scale)
        self.scale_spin.blockSignals(False)
        self.store_label.setText(Path(state.store).name if state.store else "in memory")
        if self.image_combo.currentText() != state.layer.name:
            self.image_combo.blockSignals(True)
            self.image_combo.setCurrentText(state.layer.name)
            self.image_combo.blockSignals(False)

    def _sync_channel_controls(self, layer: Any) -> None:
        current = self.channel_axis.currentData()
        self.channel_axis.blockSignals(True)
        self.channel_axis.clear()
        self.channel_axis.addItem("none", None)
        if not getattr(layer, "rgb", False):
            for ax in range(max(0, layer.ndim - 2)):
                self.channel_axis.addItem(f"axis {ax} (size {layer.data.shape[ax]})", ax)
        self.channel_axis.setCurrentIndex(max(0, self.channel_axis.findData(current)))
        self.channel_axis.blockSignals(False)
        axis = self.channel_axis.currentData()
        self.channel_index.blockSignals(True)
        self.channel_index.setEnabled(axis is not None)
        self.channel_index.setRange(0, layer.data.shape[axis] - 1 if axis is not None else 0)
        self.channel_index.blockSignals(False)

    # ------------------------------------------------------------ the model
    def _choose_weights(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Network weights", "", "safetensors (*.safetensors)"
        )
        if path:
            self.set_weights(path)

    def set_weights(self, path: str | None) -> None:
        """Use other weights (``None``: the shipped ones) on the chosen device."""
        self.session.cancel_run()
        previous = self.session.weights, self.session.device
        try:
            self.session.set_model(path, self.device_combo.currentText())
        except (ValueError, FileNotFoundError, ImportError, RuntimeError) as exc:
            self.report("error", f"Cannot use these weights or device: {exc}")
            self.session.set_model(*previous)
            self.device_combo.blockSignals(True)
            self.device_combo.setCurrentText(previous[1])
            self.device_combo.blockSignals(False)
            return
        self.weights_label.setText(Path(path).name if path else DEFAULT_WEIGHTS)
        self.report("status", f"Weights: {self.weights_label.text()}; tasks are guided again.")

    def set_invert(self, on: bool) -> None:
        """Read the current image with reversed intensities (dark objects on light) or not."""
        self.session.cancel_run()
        try:
            self.session.set_invert(bool(on))
        except ValueError as exc:
            self.report("error", f"Cannot change the image's intensities: {exc}")
            return
        self.store_label.setText("in memory")
        self.report(
            "status",
            "Intensities reversed: dark objects are segmented like bright ones."
            if on
            else "Intensities as recorded.",
        )

    def set_scale(self, scale: float) -> None:
        """Resize the current image's slices by ``scale`` before the network."""
        self.session.cancel_run()
        try:
            state = self.session.set_scale(float(scale))
        except ValueError as exc:
            self.report("error", f"Cannot change the image's scale: {exc}")
            return
        self.store_label.setText("in memory")
        h, w = state.predictor.work_info.slice_shape
        self.report(
            "status",
            f"Scale {scale:g}: the network sees slices of {h} x {w}; results stay in the "
            "image's pixels."
            if scale != 1
            else "Scale 1: slices as recorded.",
        )

    def _choose_store(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Feature store (a .zarr folder)")
        if path:
            self.set_store(path)

    def set_store(self, path: str | None) -> None:
        """Keep the current image's features in a zarr store (``None``: memory only)."""
        self.session.cancel_run()
        try:
            self.session.use_store(path)
        except (ValueError, OSError) as exc:
            self.report("error", f"Cannot use the feature store {path}: {exc}")
            return
        self.store_label.setText(Path(path).name if path else "in memory")
        self.report(
            "status",
            f"Features of this image are kept in {path}."
            if path
            else "Features are kept in memory.",
        )


__all__ = ["DEFAULT_WEIGHTS", "ImageBox", "image_layers"]
