"""Dock widget 2, "Train SPoD-Net": layer-wise training (core.training.Trainer) in a worker.

The work runs on a napari generator ``thread_worker`` that iterates
:meth:`Trainer.run_iter` and yields each :class:`TrainingProgress` (after every epoch of
every step): the GUI thread updates the progress bar, the status line and the live loss
curves (train and validation). Stop calls :meth:`Trainer.cancel` (checked before every
optimisation step, so the worker stops within one step) and the best model so far
(lowest validation loss) is kept. A finished or stopped model is registered in the
session's model registry, so the Recover and FISTA widgets offer it at once, and can be
saved as a checkpoint (core.checkpoint.save_checkpoint).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QLabel,
    QPushButton,
)

from ..core.checkpoint import save_checkpoint
from ..core.training import (
    PRESET_DESCRIPTIONS,
    PRESETS,
    Trainer,
    TrainingConfig,
    TrainingError,
    TrainingProgress,
    loss_unit,
    reference_iteration,
    worth_text,
)
from ..core.validation import SPoDInputError
from ._controls import ProgressRow, make_spin
from ._jobs import Job, JobWidget
from ._layers import is_observation_candidate, is_psf_candidate, observation_problem, psf_array, value_problem
from ._models import get_model_registry
from ._notify import error_message, notify_error, notify_info, notify_warning
from ._pickers import DevicePicker, LayerListPicker, LayerPicker
from ._plots import CurvePlot

#: TrainingConfig fields a preset sets, and the settings (= widget fields) they fill
_PRESET_FIELDS = ("lr", "epochs", "batch_size", "n_crops", "crop_size", "dense_stage_epochs")


#: "start from" choices that are not session models
_NEW_NETWORK = "new network (FISTA steps)"
#: suffix of the loss curves of the dense-structure stage
_DENSE_CURVES = " (with dense clusters)"
_SHIPPED = "fine-tune the shipped model"


def _stage_label(p: TrainingProgress) -> str:
    """Where a progress update is in the schedule, for the status line."""
    if p.stage == "end-to-end":
        return "all layers"
    if p.stage == "dense":
        return "dense-structure stage"
    return f"layer {p.layer}/{p.n_layers} · {p.stage}"


def _train_work(control, observations, psf, config: TrainingConfig, device: str, n_channels: int, initial=None):
    """Generator run in the worker: build the Trainer, yield its progress, return the network."""
    trainer = Trainer(observations, psf, config, device=device, n_channels=n_channels, initial=initial)
    control.on_cancel(trainer.cancel)
    net = yield from trainer.run_iter()
    return {"net": net, "cancelled": trainer.cancelled, "history": list(trainer.history)}


class TrainWidget(JobWidget):
    """Train a SPoD-Net on one or more observation layers; live loss curves; Stop keeps the best model."""

    _applying_preset = False  # shared by all Train widgets (see _apply_preset)

    job_title = "Training"
    tab_title = "Train"

    def __init__(self, napari_viewer, parent=None):
        super().__init__(napari_viewer, parent)
        self.registry = get_model_registry()
        self.model = None
        self.model_name: str | None = None
        self._epoch_count = 0
        self._loss_unit = "objective (eq. 5)"

        s = self.settings
        self.layers_list = LayerListPicker(napari_viewer, is_observation_candidate, prefer_kind="observation")
        self.psf_picker = LayerPicker(napari_viewer, is_psf_candidate, shared_key="psf_layer", prefer_kind="psf")
        self.preset_combo = QComboBox()
        tips = []
        for name, preset in PRESETS.items():  # every preset core.training defines, with its cost where it says
            self.preset_combo.addItem(name, name)
            description = PRESET_DESCRIPTIONS.get(name)
            if description:
                self.preset_combo.setItemData(self.preset_combo.count() - 1, description, Qt.ItemDataRole.ToolTipRole)
                tips.append(f"{name}: {description}")
        self.preset_combo.addItem("custom", "custom")
        tips.append("custom: your own values.")
        self.preset_combo.setToolTip("\n".join(tips) if len(tips) > 1 else
                                     "quick: a few minutes on a laptop CPU; paper: the paper's schedule (GPU hours); "
                                     "custom: your own values.")
        self.preset_description = QLabel("")
        self.preset_description.setWordWrap(True)
        self.binder.bind("preset", self.preset_combo)
        self.n_layers_spin = self.binder.bind("n_layers", make_spin(1, 50, s.n_layers, tooltip="Network layers M."))
        self.alpha_spin = self.binder.bind("alpha", make_spin(0.0, 1.0, s.alpha, decimals=3, step=0.01,
                                                              tooltip="Leak of the leaky soft threshold (LST)."))
        self.momentum_check = self.binder.bind("momentum", QCheckBox("learned FISTA momentum"))
        self.momentum_check.setToolTip("Each layer starts from an extrapolated point, as in FISTA "
                                       "(not in the paper; the shipped model uses it).")
        self.lam_spin = self.binder.bind("lam", make_spin(0.0, 100.0, s.lam, decimals=6, step=0.01,
                                                          tooltip="λ of the objective (on normalised intensities)."))
        self.lr_spin = self.binder.bind("lr", make_spin(1e-7, 1.0, s.lr, decimals=6, step=1e-4,
                                                        tooltip="Adam learning rate."))
        self.epochs_spin = self.binder.bind("epochs", make_spin(1, 100000, s.epochs, tooltip="Epochs per step."))
        self.batch_spin = self.binder.bind("batch_size", make_spin(1, 1024, s.batch_size, tooltip="Crops per batch."))
        self.crops_spin = self.binder.bind("n_crops", make_spin(1, 100000, s.n_crops,
                                                                tooltip="Random training crops (N)."))
        self.dense_spin = self.binder.bind("dense_stage_epochs", make_spin(
            0, 100000, s.dense_stage_epochs,
            tooltip="A last stage of this many epochs in which half the crops are simulated dense puncta clusters "
                    "blurred with your PSF, at a fifth of the rates: keeps the network from failing on dense "
                    "structure that your training data lack (0: none; not when fine-tuning)."))
        self.crop_spin = self.binder.bind("crop_size", make_spin(8, 4096, s.crop_size, step=8,
                                                                 tooltip="Observation crop size in pixels."))
        self.device_picker = DevicePicker(self.binder)
        self.start_from_combo = QComboBox()
        self.start_from_combo.setToolTip(
            "New network: 10 FISTA steps, trained from scratch. Fine-tune: start from a trained network (same PSF) "
            "and train it further on these layers at a fifth of the preset's rates; end-to-end presets only "
            "(quick, standard). The layer count and λ are the network's.")
        self._fill_start_from()
        self.registry.changed.connect(self._fill_start_from)
        self.start_from_combo.currentIndexChanged.connect(self._on_start_from_chosen)

        self.start_button = QPushButton("Start training")
        self.save_button = QPushButton("Save checkpoint…")
        self.save_button.setEnabled(False)
        self.progress = ProgressRow()
        self.plot = CurvePlot(xlabel="epoch", ylabel="loss L")
        # the dense stage's curves: the same quantities on other crops, so the same colours, dashed
        self.plot.set_style("train" + _DENSE_CURVES, color="C0", linestyle="--")
        self.plot.set_style("validation" + _DENSE_CURVES, color="C1", linestyle="--")
        self.model_label = QLabel("No model trained in this session yet.")
        self.model_label.setWordWrap(True)

        data_box = QGroupBox("Data")
        form = QFormLayout(data_box)
        form.addRow("training layers", self.layers_list)
        form.addRow("PSF", self.psf_picker)
        cfg_box = QGroupBox("Settings")
        form = QFormLayout(cfg_box)
        form.addRow("start from", self.start_from_combo)
        form.addRow("preset", self.preset_combo)
        form.addRow(self.preset_description)
        form.addRow("layers", self.n_layers_spin)
        form.addRow("α (LST leak)", self.alpha_spin)
        form.addRow("", self.momentum_check)
        form.addRow("λ", self.lam_spin)
        form.addRow("learning rate", self.lr_spin)
        form.addRow("epochs per step", self.epochs_spin)
        form.addRow("batch size", self.batch_spin)
        form.addRow("training crops", self.crops_spin)
        form.addRow("crop size", self.crop_spin)
        form.addRow("dense-structure epochs", self.dense_spin)
        form.addRow("device", self.device_picker)

        layout = self.controls_layout()
        layout.addWidget(data_box)
        layout.addWidget(cfg_box)
        layout.addWidget(self.start_button)
        layout.addWidget(self.progress)
        layout.addWidget(self.plot)
        layout.addWidget(self.model_label)
        layout.addWidget(self.save_button)
        layout.addStretch(1)

        self.preset_combo.currentIndexChanged.connect(self._on_preset_chosen)
        for spin in (self.lr_spin, self.epochs_spin, self.batch_spin, self.crops_spin, self.crop_spin,
                     self.dense_spin):
            spin.valueChanged.connect(self._on_field_edited)
        self.start_button.clicked.connect(self.toggle)
        self.save_button.clicked.connect(self._save_dialog)
        self._show_preset_description()

    # ------------------------------------------------------------------ start from
    def _fill_start_from(self) -> None:
        try:
            current = self.start_from_combo.currentText()
        except RuntimeError:  # the widget was closed; the registry outlives it
            return
        self.start_from_combo.blockSignals(True)
        self.start_from_combo.clear()
        self.start_from_combo.addItem(_NEW_NETWORK, None)
        self.start_from_combo.addItem(_SHIPPED, ("shipped", None))
        for name in self.registry.names():
            self.start_from_combo.addItem(f"fine-tune '{name}'", ("registry", name))
        index = self.start_from_combo.findText(current)
        self.start_from_combo.setCurrentIndex(max(index, 0))
        self.start_from_combo.blockSignals(False)

    def _on_start_from_chosen(self, _index: int) -> None:
        # a network to fine-tune brings its own layer count, λ and momentum
        new = self.start_from_combo.currentData() is None
        for spin in (self.n_layers_spin, self.lam_spin, self.alpha_spin, self.momentum_check, self.dense_spin):
            spin.setEnabled(new)

    def initial_network(self):
        """The network to fine-tune (None: a new one); raises SPoDInputError when it cannot be had."""
        choice = self.start_from_combo.currentData()
        if choice is None:
            return None
        if choice[0] == "shipped":
            from ..core.checkpoint import load_checkpoint
            from ..core.recover import DEFAULT_MODEL_PATH

            if not DEFAULT_MODEL_PATH.is_file():
                raise SPoDInputError("this installation has no shipped model; start from a new network.")
            return load_checkpoint(DEFAULT_MODEL_PATH)
        entry = self.registry.get(choice[1])
        if entry is None:
            raise SPoDInputError(f"the model '{choice[1]}' is no longer in this session; choose another one.")
        return entry.net

    # ------------------------------------------------------------------ presets
    def set_preset(self, name: str) -> None:
        self.settings.preset = name
        self._apply_preset(name)

    def _on_preset_chosen(self, _index: int) -> None:
        self._apply_preset(self.preset_combo.currentData())
        self._show_preset_description()

    def _show_preset_description(self) -> None:
        name = self.preset_combo.currentData()
        # config() builds "custom" on the quick recipe: say so rather than leave the line empty
        custom = ("Your own learning rate, epochs, batch size, crops, crop size and dense-structure epochs on the "
                  "quick recipe (end to end).")
        self.preset_description.setText(PRESET_DESCRIPTIONS.get(name, custom if name == "custom" else ""))

    def _apply_preset(self, name) -> None:
        if name not in PRESETS:
            return
        # shared by every Train widget: all of them see the fields change through the shared settings,
        # and none may take the half-applied preset for a user's edit
        TrainWidget._applying_preset = True
        try:
            preset = TrainingConfig.preset(name)  # a field the preset leaves out takes the default
            for key in _PRESET_FIELDS:
                setattr(self.settings, key, getattr(preset, key))
        finally:
            TrainWidget._applying_preset = False

    def _on_field_edited(self, *_):
        if self._applying_preset:
            return
        preset = self.settings.preset
        if preset in PRESETS:
            values = TrainingConfig.preset(preset)
            if any(getattr(self.settings, k) != getattr(values, k) for k in _PRESET_FIELDS):
                self.settings.preset = "custom"

    def config(self) -> TrainingConfig:
        """The TrainingConfig the current fields describe."""
        s = self.settings
        base = s.preset if s.preset in PRESETS else "quick"
        overrides = {k: getattr(s, k) for k in _PRESET_FIELDS}
        cfg = TrainingConfig.preset(base, n_layers=int(s.n_layers), alpha=float(s.alpha), lam=float(s.lam),
                                    momentum=bool(s.momentum), **overrides)
        if s.preset not in PRESETS:
            cfg = replace(cfg, preset_name="custom")
        # validation crops never exceed the training crops (small data sets, quick tries)
        return replace(cfg, n_val_crops=max(1, min(cfg.n_val_crops, cfg.n_crops)))

    # ------------------------------------------------------------------ run
    def cancel(self) -> None:
        """Stop training after the current step; the best model so far is kept."""
        if self.is_running():
            self._job.cancel()
            self.start_button.setEnabled(False)
            self.start_button.setText("Stopping…")
            self.progress.set_text("Stopping after the current step; keeping the best model so far…")

    def start(self) -> Job | None:
        if self.is_running():
            return None
        layers = self.layers_list.selected_layers()
        if not layers:
            self.refuse("select one or more observation layers (the list under 'training layers').")
            return None
        psf_layer = self.psf_picker.layer()
        if psf_layer is None:
            self.refuse("choose a PSF layer.")
            return None
        n = self.settings.n_channels
        for layer in layers:
            problem = observation_problem(layer.data.shape, n) or value_problem(layer.data)
            if problem:
                self.refuse(f"training layer '{layer.name}': {problem}")
                return None
        try:
            psf = psf_array(psf_layer)
        except Exception as exc:
            self.refuse(f"PSF '{psf_layer.name}': {error_message(exc)}")
            return None
        try:
            config = self.config()
            config.validate()
            initial = self.initial_network()
        except (SPoDInputError, TypeError, ValueError) as exc:
            self.refuse(f"settings: {error_message(exc)}")
            return None
        if initial is not None:
            if config.schedule != "end-to-end":
                self.refuse(f"fine-tuning needs an end-to-end preset (quick or standard), not '{self.settings.preset}'.")
                return None
            if tuple(initial.psf_shape) != tuple(psf.shape):
                self.refuse(f"the network to fine-tune was trained with a {initial.psf_shape[0]} x "
                            f"{initial.psf_shape[1]} PSF; '{psf_layer.name}' is {psf.shape[0]} x {psf.shape[1]}.")
                return None
            # a fifth of the preset's rates; the Trainer adopts the network's structure (layers, λ, ...). No
            # dense stage: fine-tuning adapts the network to the user's own data.
            config = config.for_fine_tuning()
        observations = [layer.data for layer in layers]
        self._sources = [layer.name for layer in layers]
        self._epoch_count = 0
        # the relative loss is in units of FISTA's excess objective at the reference iteration, not an objective
        # (set before clear(), whose full redraw shows it)
        self.plot.axes.set_ylabel(f"loss (1 = FISTA at {reference_iteration(config.equivalent_iterations)} it.)"
                                  if config.relative_loss else "loss L", fontsize=8)
        self.plot.clear()
        self._loss_unit = loss_unit(config)
        self.progress.set_busy()
        self.progress.set_text("Preparing training crops…")
        self.start_button.setText("Stop")
        self._job = Job(self, title="Training", on_progress=self._on_progress, on_result=self._on_result,
                        on_cancelled=self._on_cancelled, on_error=self._on_error, on_finished=self._on_finished)
        return self._job.start_generator(_train_work, observations, psf, config,
                                         self.device_picker.device(), n, initial)

    def _on_progress(self, items) -> None:
        for p in items:
            if not isinstance(p, TrainingProgress):
                continue
            if p.epoch == 0:  # a stage being prepared: news, no losses yet
                self.progress.set_text(p.message)
                continue
            self._epoch_count += 1
            if self._epoch_count == 1 and p.fraction > 0:
                # the whole schedule's extent, so that the x axis need not grow (a full plot redraw)
                self.plot.set_x_range(0, max(1.0, round(self._epoch_count / p.fraction)))
            # the dense stage trains and validates on other crops: its losses are other curves, not a jump
            suffix = _DENSE_CURVES if p.stage == "dense" else ""
            self.plot.append("train" + suffix, self._epoch_count, p.train_loss)
            self.plot.append("validation" + suffix, self._epoch_count, p.val_loss)
            self.progress.set_fraction(p.fraction)
            text = (f"{_stage_label(p)} · epoch {p.epoch}/{p.epochs} — "
                    f"train {p.train_loss:.4g}, validation {p.val_loss:.4g} · {p.elapsed:.0f} s")
            if p.fista_equivalent is not None:
                text += " · worth " + worth_text(p.fista_equivalent, p.fista_equivalent_worst)
            self.progress.set_text(text)

    def _on_result(self, out) -> None:
        net, cancelled = out["net"], out["cancelled"]
        training = (net.metadata or {}).get("training", {})
        info = {"sources": self._sources, "cancelled": cancelled, "best_val_loss": training.get("best_val_loss"),
                "seconds": training.get("seconds")}
        self.model = net
        self.model_name = self.registry.add(net, info=info)
        net.metadata.setdefault("name", self.model_name)
        self.save_button.setEnabled(True)
        best = training.get("best_val_loss")
        text = (f"{'Stopped early' if cancelled else 'Training finished'}: {net.n_layers} layer(s) in "
                f"{training.get('seconds', 0):.1f} s"
                + (f", best validation loss {best:.4g} ({self._loss_unit})" if best is not None else ""))
        if cancelled:
            # a partial model is offered, never silently chosen in place of the user's model
            text += (f". Kept the best model so far as '{self.model_name}': offered in Recover and FISTA "
                     "comparison, but not selected there.")
            self.progress.set_text(f"Stopped at {100 * self.progress.fraction():.0f} % of the schedule.")
        else:
            if training.get("unchanged"):
                # minutes of fine-tuning must not look like a new model
                text += (f". No epoch beat the model it started from on the validation crops: '{self.model_name}' "
                         "is that model, unchanged. Try more epochs, or data the model does not yet recover well")
            text += f". Selected in the Recover and FISTA comparison widgets as '{self.model_name}'."
            self.progress.set_fraction(1.0)
            self.progress.set_text("Done.")
        self.model_label.setText(text)
        self.plot.flush()
        self.scroll.scroll_to_end()  # the result line and Save, below the fold of a short dock
        notify_info(text)

    def _on_cancelled(self) -> None:
        self.progress.set_text("Training stopped; no model was kept.")

    def _on_error(self, exc) -> None:
        if self._job is not None and self._job.cancel_requested and isinstance(exc, TrainingError):
            # stopped before any layer finished an epoch: nothing to keep
            self.progress.set_text(str(exc))
            notify_warning(f"Training stopped: {exc}")
            return
        self.progress.set_text(f"Training failed: {error_message(exc)}")
        notify_error(f"Training failed: {error_message(exc)}")

    def _on_finished(self) -> None:
        self.start_button.setEnabled(True)
        self.start_button.setText("Start training")
        if self.progress.bar.maximum() == 0:  # still "busy": ended before the first epoch
            self.progress.set_fraction(0.0)

    # ------------------------------------------------------------------ checkpoint
    def _save_dialog(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save the SPoD-Net checkpoint", "spodnet.safetensors",
                                              "Checkpoints (*.safetensors)")
        if path:
            self.save_checkpoint_to(path)

    def save_checkpoint_to(self, path) -> Path | None:
        if self.model is None:
            notify_error("Train a model before saving a checkpoint.")
            return None
        path = Path(path)
        if not path.suffix:
            path = path.with_suffix(".safetensors")
        try:
            written = save_checkpoint(self.model, path, extra_metadata={"name": self.model_name})
        except Exception as exc:
            notify_error(f"Could not save the checkpoint: {error_message(exc)}")
            return None
        notify_info(f"Saved the model to {written}.")
        self.settings.checkpoint_path = str(written)
        return written

