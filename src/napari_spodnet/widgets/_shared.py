"""The parts of the dock widgets in one namespace (for scripts and tests).

Each part lives in a module with one job:

* :mod:`._settings`: session settings (:func:`get_settings`) and the Qt binding to them;
* :mod:`._models`: networks trained in this session (:func:`get_model_registry`);
* :mod:`._layers`: layer identity (``unique_id``, proxy-safe), kinds, placement of results,
  adding / refreshing result layers, grid / overlays (no Qt);
* :mod:`._pickers`: layer, device and model choosers;
* :mod:`._jobs`: background jobs on napari workers; :mod:`._controls`: spin boxes, progress row;
* :mod:`._plots`: the live curve; :mod:`._notify`: notifications and error wording.
"""

from ._controls import ProgressRow, make_spin
from ._jobs import PROGRESS_UPDATES_PER_SECOND, Job, JobControl, JobWidget
from ._layers import (
    KINDS,
    METADATA_KEY,
    RESULT_KINDS,
    add_or_update_image,
    contains_layer,
    current_frame,
    display_range,
    find_layer,
    grid_cell,
    grid_model,
    is_observation_candidate,
    is_psf_candidate,
    jsonable,
    layer_by_key,
    layer_key,
    observation_problem,
    plane_series,
    psf_array,
    registered_placement,
    same_layer,
    scale_bar,
    series_plane_placement,
    show_scale_bar_if_physical,
    spatial_units,
    spod_kind,
    spod_meta,
    text_overlay,
    value_problem,
)
from ._models import ModelRegistry, RegisteredModel, get_model_registry, model_summary, reset_model_registry
from ._notify import error_message, notify_error, notify_info, notify_warning
from ._pickers import DevicePicker, LayerListPicker, LayerPicker, ModelSourcePicker, checkpoint_problem
from ._plots import CurvePlot
from ._settings import SettingsBinder, SpodnetSettings, get_settings, reset_settings

__all__ = [name for name in dir() if not name.startswith("_")]
